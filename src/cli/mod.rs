//! Client subcommands of the `streamhub` binary, and `serve`.
//!
//! Each subcommand is a clap `Args` struct with a `run` function; `main.rs`
//! only parses and dispatches. Human-readable output by default, one JSON
//! object per line with `--json`.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod serve;
pub mod telemetry;
pub mod upload;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// Settings every client subcommand shares.
#[derive(Debug, Clone)]
pub struct Context {
    /// The server URL, e.g. `http://127.0.0.1:50051` (the first of
    /// `servers`).
    pub server: String,
    /// Every server URL given: the nodes of a cluster, tried in turn.
    pub servers: Vec<String>,
    /// Print one JSON object per line instead of text.
    pub json: bool,
    /// The index in `servers` of the last one that answered.
    current: Arc<AtomicUsize>,
}

impl Context {
    /// A context for `servers` (at least one; an empty list means the
    /// default `http://127.0.0.1:50051`).
    pub fn new(servers: Vec<String>, json: bool) -> Self {
        let mut servers: Vec<String> = servers
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            servers.push("http://127.0.0.1:50051".to_owned());
        }
        Self {
            server: servers[0].clone(),
            servers,
            json,
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Opens a channel to a server: the one that answered last, else each
    /// of the others in turn (failover between the nodes of a cluster).
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..self.servers.len() {
            let index = (start + step) % self.servers.len();
            match connect_to(&self.servers[index]).await {
                Ok(channel) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no server URL given")))
    }

    /// The URL of the server last connected to (or to be tried first).
    pub fn current_server(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()]
    }

    /// Prints `value` as a JSON line, or `human` as text.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string(value) {
                Ok(line) => println!("{line}"),
                Err(err) => eprintln!("cannot encode output as JSON: {err}"),
            }
        } else {
            println!("{}", human());
        }
    }

    /// Prints a progress note: on stderr as text, or as a JSON event line.
    pub fn note(&self, event: &str, text: &str) {
        if self.json {
            self.emit(
                &serde_json::json!({ "event": event, "message": text }),
                String::new,
            );
        } else {
            eprintln!("{text}");
        }
    }
}

async fn connect_to(server: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("invalid server URL {server:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server}"))
}

/// Formats a Unix-millisecond timestamp as RFC 3339 (UTC).
pub fn format_ms(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Whether a failed call is worth retrying after a reconnect.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// A call's failure as text: its code and the server's message.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Turns a failed call into an error that says what the server said.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("server answered {}", status_text(&status))
}

/// Exponential backoff between reconnect attempts: 250 ms, doubling up to
/// a cap, back to 250 ms after a success.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);

    /// A backoff whose delay never exceeds `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max,
        }
    }

    /// The delay the next [`Backoff::wait`] will sleep.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Sleeps the current delay, then doubles it for the next attempt.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}
