//! `streamhub serve`: loads the configuration and runs the server until
//! SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::{
    config::{Config, Sources},
    runtime, server, shutdown,
};

/// Arguments of `streamhub serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "STREAMHUB_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for uploads, chat history and other durable state
    /// [default: ./streamhub-data].
    #[arg(long, env = "STREAMHUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (see the README for every key).
    #[arg(long, env = "STREAMHUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long shutdown may wait for streams to drain, e.g. `10s`
    /// [default: 10s].
    #[arg(long, env = "STREAMHUB_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Set any configuration key, e.g. `--set telemetry.max_services=500`
    /// (repeatable; wins over file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration as TOML-like JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Listen on a non-loopback address without TLS and authentication
    /// (e.g. behind a proxy that provides both). Logs a warning.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeArgs {
    /// The configuration these arguments select.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(&Sources {
            file: self.config.clone(),
            env: true,
            overrides: self.set.clone(),
        })?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir.clone_from(dir);
        }
        if let Some(timeout) = self.drain_timeout {
            config.drain_timeout = timeout;
        }
        Ok(config)
    }
}

/// Runs the server until a signal, then drains and returns. Builds its own
/// runtime from the configuration, so it must not be called from one.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    check_exposure(&config, args.insecure)?;
    let rt = runtime::build(&config.runtime).context("cannot start the async runtime")?;
    rt.block_on(serve(config))
}

/// Refuses a non-loopback listen address unless both TLS and
/// authentication are configured, or `insecure` is given (then warns).
pub fn check_exposure(config: &Config, insecure: bool) -> anyhow::Result<()> {
    let (tls, auth) = (config.tls.enabled(), config.auth.enabled());
    if config.listen.ip().is_loopback() || (tls && auth) {
        return Ok(());
    }
    let missing = match (tls, auth) {
        (false, false) => "TLS and authentication",
        (false, true) => "TLS",
        _ => "authentication",
    };
    if insecure {
        tracing::warn!(
            listen = %config.listen,
            "--insecure: listening on a non-loopback address without {missing}; anyone who \
             can reach it can read, overwrite and publish anything"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {} without {missing}: anyone who can reach that address \
         could read and overwrite every file, publish under any name and chat as anyone.\n\
         Set up both (see SECURITY.md):\n\
         \x20 1. `streamhub token new --identity NAME --scope SCOPE...` and add the printed \
         [[auth.tokens]] entry to the --config file;\n\
         \x20 2. serve with `--tls-cert FILE --tls-key FILE` (config tls.cert, tls.key).\n\
         Or listen on 127.0.0.1, or pass --insecure if something in front of streamhub \
         provides both.",
        config.listen
    )
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // One line on stdout, for people and for scripts that start the server
    // on port 0.
    println!("streamhub listening on {addr}");
    server::run(listener, config, shutdown::signal()).await?;
    Ok(())
}
