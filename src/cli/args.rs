//! How the binary's command line is assembled beyond what clap's derive
//! says: client options kept out of `serve`, empty environment variables
//! counted as unset, and how a failed command reports its error.

use clap::{Arg, ArgAction, Command, builder::TypedValueParser as _};

/// The client options: global on the command line (`streamhub --server X
/// subscribe` and `streamhub subscribe --server X` both work) but not
/// `serve`'s, which listens rather than connects.
/// Each is its argument id and its long flag.
pub const CLIENT_OPTIONS: &[(&str, &str)] = &[
    ("server", "server"),
    ("json", "json"),
    ("token", "token"),
    ("token_file", "token-file"),
    ("ca", "ca"),
    ("cert", "cert"),
    ("key", "key"),
];

/// Finishes the derived command line:
///
/// - `serve` neither lists nor takes the client options: each is a hidden
///   argument of its own there that refuses any value with a message
///   pointing to serve's own flag (clap skips propagating a global
///   argument to a subcommand that has one with the same id).
/// - `token new` (offline) likewise, but for `--json`.
/// - An environment variable that is set but empty (`STREAMHUB_TOKEN=`)
///   counts as unset, for every argument read from the environment, as a
///   shell user expects from `VAR= command`.
pub fn prepare(command: Command) -> Command {
    let command = unset_empty_env(command);
    let command = command.mut_subcommand("serve", |serve| {
        refuse_client_options(serve, &[], |id| match id {
            "server" => "serve listens on --listen (or `listen` in the configuration)",
            "json" => "serve logs as text; --print-config prints TOML",
            _ => {
                "serve takes TLS files as --tls-cert/--tls-key/--tls-client-ca and tokens in [auth]"
            }
        })
    });
    // `token new` makes a token offline: it connects to no server, so the
    // connection options are not its (it keeps --json).
    command.mut_subcommand("token", |token| {
        token.mut_subcommand("new", |new| {
            refuse_client_options(
                new,
                &["json"],
                |_| "`token new` works offline and connects to no server",
            )
        })
    })
}

/// Gives `command` a hidden argument for each client option (but those
/// in `keep`) that refuses any value, saying `hint(id)`.
fn refuse_client_options(
    mut command: Command,
    keep: &[&str],
    hint: impl Fn(&str) -> &'static str,
) -> Command {
    let name = command.get_name().to_owned();
    for &(id, long) in CLIENT_OPTIONS {
        if keep.contains(&id) {
            continue;
        }
        let message = format!(
            "--{long} is an option of the client subcommands, not of {name}: {}",
            hint(id)
        );
        command =
            command.arg(
                Arg::new(id)
                    .long(long)
                    .hide(true)
                    .action(ArgAction::Set)
                    .num_args(0..=1)
                    .default_missing_value("")
                    .value_parser(clap::builder::StringValueParser::new().try_map(
                        move |_: String| -> Result<String, String> { Err(message.clone()) },
                    )),
            );
    }
    command
}

/// Drops the environment fallback of every argument whose variable is set
/// but empty, in `command` and all its subcommands.
fn unset_empty_env(command: Command) -> Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut command = command.mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|value| value.is_empty());
        if empty {
            arg.env(Option::<&'static str>::None)
        } else {
            arg
        }
    });
    for name in names {
        command = command.mut_subcommand(name, unset_empty_env);
    }
    command
}

/// Prints a failed command's error as `error: …` with its causes on one
/// line (each once: see [`super::chain_text`]), never a backtrace
/// (whatever `RUST_BACKTRACE` says), and gives the exit code 1.
pub fn report(err: &anyhow::Error) -> std::process::ExitCode {
    super::err_line(&format!("error: {}", super::chain_text(err.as_ref())));
    std::process::ExitCode::FAILURE
}
