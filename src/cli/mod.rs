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
    borrow::Cow,
    io::{ErrorKind, Write as _},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// Settings every client subcommand shares.
#[derive(Debug, Clone)]
pub struct Context {
    /// The server URL, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// Print one JSON object per line instead of text.
    pub json: bool,
}

impl Context {
    /// The settings of a client command; `server` must be an `http://` or
    /// `https://` URL (any other scheme, or none, is an error rather than
    /// a guess, so a request never goes out in plaintext by surprise).
    pub fn new(server: String, json: bool) -> anyhow::Result<Self> {
        check_server_url(&server)?;
        Ok(Self { server, json })
    }

    /// Opens a channel to the server.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(self.server.clone())
            .with_context(|| format!("invalid server URL {:?}", self.server))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.server))
    }

    /// Prints `value` as a JSON line, or `human` as text. Text that came
    /// from the server or other clients must pass through
    /// [`terminal_safe`] inside `human`.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string(value) {
                Ok(line) => out(&line),
                Err(err) => err_line(&format!("cannot encode output as JSON: {err}")),
            }
        } else {
            out(&human());
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
            err_line(&terminal_safe(text));
        }
    }
}

/// Writes one line of output to stdout. When the reader has gone away
/// (`streamhub subscribe x | head -1`) the command has nothing left to do:
/// it exits quietly instead of panicking as `println!` would.
pub fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if err.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        err_line(&format!("cannot write output: {err}"));
        std::process::exit(1);
    }
}

/// Writes one line to stderr, ignoring a closed stderr.
pub fn err_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Checks a `--server` URL: `http://` or `https://` and a host.
pub fn check_server_url(server: &str) -> anyhow::Result<()> {
    let uri: http::Uri = server.parse().map_err(|e| {
        anyhow::anyhow!("--server {server:?} is not a URL such as http://127.0.0.1:50051: {e}")
    })?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        Some("http" | "https") => anyhow::bail!("--server {server:?} names no host"),
        Some(other) => anyhow::bail!(
            "--server {server:?}: the scheme {other:?} is not supported; use http:// (or https://)"
        ),
        None => anyhow::bail!(
            "--server {server:?} has no scheme; write it as http://{server} (or https://)"
        ),
    }
}

/// Text from the server or from other clients (chat messages and sender
/// names, service names, alert messages, file names, status messages) as
/// it may be shown on a terminal: control characters (escape sequences
/// among them) and the Unicode controls that reorder text are shown as
/// escapes (`\u{1b}`, `\n`), never passed to the terminal.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_on_terminal) {
        return Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_on_terminal(c) {
            safe.extend(c.escape_default());
        } else {
            safe.push(c);
        }
    }
    Cow::Owned(safe)
}

fn unsafe_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// How a long-running command ended: by itself, or by Ctrl-C.
#[derive(Debug)]
pub enum Ended<T> {
    /// The command finished (or failed) by itself.
    Finished(T),
    /// The user pressed Ctrl-C (SIGINT).
    Interrupted,
}

/// Runs a long-running command until it ends or the user presses Ctrl-C,
/// at any moment: while connecting, streaming, or waiting to reconnect.
/// The handler is installed before the command starts, so no Ctrl-C falls
/// between two waits (once tokio handles SIGINT, one it is not waiting for
/// is lost, not fatal).
pub async fn until_interrupted<T>(command: impl Future<Output = T>) -> Ended<T> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    tokio::select! {
        biased;
        _ = &mut ctrl_c => Ended::Interrupted,
        result = command => Ended::Finished(result),
    }
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

/// A call's failure as text: its code and the server's message (made
/// safe for a terminal).
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), terminal_safe(status.message()))
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
    /// (Ctrl-C ends it: every command that waits here runs under
    /// [`until_interrupted`].)
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}
