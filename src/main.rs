//! The `streamhub` binary: parses arguments, sets up logging, and calls the
//! library.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use streamhub::cli::{self, Context, Ended};
use tracing_subscriber::EnvFilter;

/// A gRPC streaming hub: live telemetry, metrics in and alerts out,
/// resumable chunked uploads, and chat rooms.
#[derive(Debug, Parser)]
#[command(name = "streamhub", version, about)]
struct Cli {
    /// Server URL the client subcommands talk to; several (comma-separated
    /// or repeated) for the nodes of a cluster: the first that answers is
    /// used, and a reconnect moves on to the next when a node is gone.
    #[arg(
        long,
        global = true,
        env = "STREAMHUB_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// Print one JSON object per line instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token sent with every call (see `streamhub token new`).
    #[arg(long, global = true, env = "STREAMHUB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, env = "STREAMHUB_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// PEM CA certificate to verify an https:// server with, instead of
    /// the system's roots.
    #[arg(long, global = true, env = "STREAMHUB_CA")]
    ca: Option<std::path::PathBuf>,
    /// PEM client certificate to present (mTLS); needs --key.
    #[arg(long, global = true, env = "STREAMHUB_CERT")]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "STREAMHUB_KEY")]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (until SIGTERM or Ctrl-C).
    Serve(cli::serve::ServeArgs),
    /// Show the latest sample of a service.
    Snapshot(cli::telemetry::SnapshotArgs),
    /// List the services the server knows, with their latest samples.
    Services,
    /// Print a service's samples as they arrive, until Ctrl-C.
    Subscribe(cli::telemetry::SubscribeArgs),
    /// Stream this machine's metrics through LiveFeed and print the alerts.
    Feed(cli::telemetry::FeedArgs),
    /// Upload a file in chunks, resuming where an interrupted upload stopped.
    Upload(cli::upload::UploadArgs),
    /// List the stored files with their sizes and SHA-256.
    Files,
    /// Download a stored file and verify its SHA-256.
    Download(cli::upload::DownloadArgs),
    /// Chat in a room: lines typed (or piped) are sent, messages received
    /// are shown; survives server restarts without loss or repeats.
    Chat(cli::chat::ChatArgs),
    /// A short tour of every streaming pattern against a running server.
    Demo(cli::demo::DemoArgs),
    /// Static tokens: `token new` prints a fresh one and its config entry.
    #[command(subcommand)]
    Token(cli::token::TokenCommand),
    /// Print the identity and scopes the server sees for your credentials.
    Whoami,
    /// Run a benchmark scenario and write its results as JSON.
    Bench(Box<cli::bench::BenchArgs>),
}

fn main() -> ExitCode {
    let matches = cli::args::prepare(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => cli::args::report(&err),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        // The NATS client logs every reconnect attempt at info.
        Command::Bench(_) => "info,async_nats=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr (`streamhub serve 2>&1 | head -1`) must not stop
        // the server: tracing would report the failed write with
        // `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .init();

    let command = match cli.command {
        // The server builds the runtime its configuration asks for; the
        // client's `--server` (and STREAMHUB_SERVER) is none of its business.
        Command::Serve(args) => return cli::serve::run(args),
        command => command,
    };
    let security = cli::Security {
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        token: cli.token,
        token_file: cli.token_file,
    };
    let ctx = Context::new(cli.server, cli.json, security)?;
    let result = match command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Snapshot(args) => block_on(cli::telemetry::snapshot(&ctx, args)),
        Command::Services => block_on(cli::telemetry::services(&ctx)),
        // Long-running commands: Ctrl-C ends them at any moment. Those that
        // stream until stopped end well; an upload or download ends as
        // interrupted.
        Command::Subscribe(args) => until_ctrl_c(cli::telemetry::subscribe(&ctx, args), None),
        Command::Feed(args) => until_ctrl_c(cli::telemetry::feed(&ctx, args), None),
        Command::Chat(args) => until_ctrl_c(cli::chat::run(&ctx, args), None),
        Command::Upload(args) => until_ctrl_c(
            cli::upload::upload(&ctx, args),
            Some((
                &ctx,
                "upload interrupted; run the same command again to resume",
            )),
        ),
        Command::Download(args) => until_ctrl_c(
            cli::upload::download(&ctx, args),
            Some((&ctx, "download interrupted")),
        ),
        Command::Files => block_on(cli::upload::files(&ctx)),
        Command::Demo(args) => until_ctrl_c(cli::demo::run(&ctx, args), None),
        Command::Whoami => block_on(cli::token::whoami(&ctx)),
        // These two talk to no server of the user's (or pick their own
        // runtime): their errors need no diagnosis.
        Command::Token(command) => return cli::token::run(&ctx, command),
        // The load generator pins itself, then builds its runtime.
        Command::Bench(args) => return cli::bench::run(&ctx.server, *args),
    };
    // A failure may come from a URL whose scheme the port does not speak.
    result.map_err(|err| cli::explain_failure(&ctx, err))
}

/// Runs a client subcommand on tokio's default multi-thread runtime.
fn block_on(command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(command)
}

/// Exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells
/// report it.
const INTERRUPTED: i32 = 130;

/// Runs a long-running client subcommand until it ends or Ctrl-C. On
/// Ctrl-C it exits 0 if `failure` is `None`, else says its text as a note
/// of its context (text, or a JSON event with `--json`) and exits 130.
fn until_ctrl_c(
    command: impl Future<Output = anyhow::Result<()>>,
    failure: Option<(&Context, &str)>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let ended = runtime.block_on(cli::until_interrupted(command));
    // Do not wait for blocking reads (standard input, a file) to finish.
    runtime.shutdown_background();
    match (ended, failure) {
        (Ended::Finished(result), _) => result,
        (Ended::Interrupted, None) => Ok(()),
        (Ended::Interrupted, Some((ctx, failure))) => {
            ctx.note("interrupted", failure);
            std::process::exit(INTERRUPTED);
        }
    }
}
