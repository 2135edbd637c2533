//! `streamhub serve`: loads the configuration and runs the server until
//! SIGTERM or Ctrl-C.

use std::{io::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::{
    config::{self, Config, Sources},
    runtime, server, shutdown,
};

/// Arguments of `streamhub serve`.
///
/// The flags have no environment fallback of their own: the settings they
/// set are read from `STREAMHUB_LISTEN`, `STREAMHUB_DATA_DIR`, … with every
/// other setting, so that a flag (and `--set`) always wins over the
/// environment.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:50051 or localhost:50051
    /// [default: 127.0.0.1:50051; env STREAMHUB_LISTEN].
    #[arg(long, value_parser = config::resolve)]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for uploads, chat history and other durable state
    /// [default: ./streamhub-data; env STREAMHUB_DATA_DIR].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (see the README for every key).
    #[arg(long, env = "STREAMHUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long shutdown may wait for streams to drain, e.g. `10s`
    /// [default: 10s; env STREAMHUB_DRAIN_TIMEOUT].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Set any configuration key, e.g. `--set telemetry.max_services=500`
    /// (repeatable; wins over file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Join a cluster: NATS server URLs, comma-separated or repeated, e.g.
    /// `nats://10.0.0.5:4222` (config `cluster.nats`; see docs/cluster.md).
    #[arg(long, value_name = "NATS_URL", value_delimiter = ',')]
    pub cluster: Vec<String>,
    /// Serve over TLS with this certificate (PEM; may hold the chain after
    /// the server certificate). Config key `tls.cert`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM). Config key `tls.key`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this file (PEM; mutual
    /// TLS). Config key `tls.client_ca`.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Print the effective configuration as TOML (which `--config` reads
    /// back) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Listen on a non-loopback address without TLS and authentication
    /// (e.g. behind a proxy that provides both). Logs a warning.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeArgs {
    /// The configuration these arguments select: defaults, then the file,
    /// then the environment, then `--set`, then the dedicated flags.
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
        if let Some(cert) = &self.tls_cert {
            config.tls.cert = Some(cert.clone());
        }
        if let Some(key) = &self.tls_key {
            config.tls.key = Some(key.clone());
        }
        if let Some(ca) = &self.tls_client_ca {
            config.tls.client_ca = Some(ca.clone());
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
        let toml = config.to_toml()?;
        std::io::stdout()
            .write_all(toml.as_bytes())
            .context("cannot print the configuration")?;
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
    let (ready, serving) = tokio::sync::oneshot::channel();
    let server = server::run_ready(listener, config, shutdown::signal(), Some(ready));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        Ok(addr) = serving => {
            // One line on stdout, for people and for scripts that start the
            // server on port 0, once it can serve. A closed stdout (the
            // reader went away) must not stop the server: the write's
            // error is ignored, as the log's are.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "streamhub listening on {addr}");
            let _ = out.flush();
        }
    }
    server.await?;
    Ok(())
}
