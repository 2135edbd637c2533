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
    /// Join a cluster: NATS server URLs, comma-separated or repeated, e.g.
    /// `nats://10.0.0.5:4222` (config `cluster.nats`; see docs/cluster.md).
    #[arg(long, value_name = "NATS_URL", value_delimiter = ',')]
    pub cluster: Vec<String>,
    /// Print the effective configuration as TOML-like JSON and exit.
    #[arg(long)]
    pub print_config: bool,
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
        if !self.cluster.is_empty() {
            config.cluster.nats.clone_from(&self.cluster);
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
    let rt = runtime::build(&config.runtime).context("cannot start the async runtime")?;
    rt.block_on(serve(config))
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
