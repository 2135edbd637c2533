//! Client subcommands of the `streamhub` binary, and `serve`.
//!
//! Each subcommand is a clap `Args` struct with a `run` function; `main.rs`
//! only parses and dispatches. Human-readable output by default, one JSON
//! object per line with `--json`.

pub mod args;
pub mod bench;
pub mod chat;
pub mod demo;
pub mod probe;
pub mod serve;
pub mod telemetry;
pub mod token;
pub mod upload;

use std::{
    borrow::Cow,
    io::{ErrorKind, Write as _},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// A connection to the server whose every call carries the credentials.
pub type Channel = InterceptedService<tonic::transport::Channel, Credentials>;

/// Settings every client subcommand shares.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The server URL, e.g. `http://127.0.0.1:50051` or `https://hub:50051`
    /// (the first of `servers`).
    pub server: String,
    /// Print one JSON object per line instead of text.
    pub json: bool,
    /// Every server URL given: the nodes of a cluster, tried in turn.
    pub servers: Vec<String>,
    /// How the client proves who it is and checks the server.
    pub security: Security,
    /// The index in `servers` of the last one that answered.
    current: Arc<AtomicUsize>,
}

/// The client's TLS and credential settings (`--ca`, `--cert`, `--key`,
/// `--token`, `--token-file`).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// PEM CA certificate(s) to verify the server with, instead of the
    /// system roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for mTLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Bearer token.
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
}

/// Adds `authorization: Bearer <token>` to every call, if there is a token.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Credentials")
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Security {
    /// The bearer token, from `--token` or `--token-file`.
    fn token(&self) -> anyhow::Result<Option<String>> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => anyhow::bail!("give --token or --token-file, not both"),
            (Some(token), None) => Ok(Some(token.trim().to_owned())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --token-file {}", path.display()))?;
                Ok(Some(text.trim().to_owned()))
            }
            (None, None) => Ok(None),
        }
    }

    /// The interceptor sending the token.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        let authorization = match self.token()? {
            None => None,
            Some(token) if token.is_empty() => anyhow::bail!("the token is empty"),
            Some(token) => {
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                        anyhow::anyhow!(
                            "the token holds characters that cannot be sent (printable ASCII only)"
                        )
                    })?;
                // Kept out of HPACK's table and out of Debug output.
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Credentials { authorization })
    }

    /// The TLS settings for an `https://` server whose host is `host`.
    fn tls(&self, host: &str) -> anyhow::Result<ClientTlsConfig> {
        let mut tls = ClientTlsConfig::new().domain_name(host);
        tls = match &self.ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read --ca {}", path.display()))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cannot read --cert {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("cannot read --key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => anyhow::bail!("--cert and --key go together: give both for a client certificate"),
        }
        Ok(tls)
    }
}

impl Context {
    /// The settings of a client command; `server` must be an `http://` or
    /// `https://` URL (any other scheme, or none, is an error rather than
    /// a guess, so a request never goes out in plaintext by surprise).
    ///
    /// Several `servers` are the nodes of a cluster: [`Context::connect`]
    /// starts from the one that answered last and tries each in turn. An
    /// empty list means the default `http://127.0.0.1:50051`.
    pub fn new(servers: Vec<String>, json: bool, security: Security) -> anyhow::Result<Self> {
        let mut servers: Vec<String> = servers
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            servers.push("http://127.0.0.1:50051".to_owned());
        }
        for server in &servers {
            check_server_url(server)?;
        }
        Ok(Self {
            server: servers[0].clone(),
            servers,
            json,
            security,
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The URL of the server last connected to (or to be tried first).
    pub fn current_server(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()]
    }

    /// Opens a channel to a server: the one that answered last, else each
    /// of the others in turn (failover between the nodes of a cluster).
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for step in 0..self.servers.len() {
            let index = (start + step) % self.servers.len();
            match self.connect_to(&self.servers[index]).await {
                Ok(channel) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no server URL given")))
    }

    /// Notes that the current server answered a call with `status`:
    /// UNAVAILABLE (a cluster node cut off from NATS, a node shutting down,
    /// storage that failed) makes the next [`Context::connect`] start from
    /// the next server URL, since another node may serve the call. No
    /// effect with one server or another status.
    pub fn note_failure(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::Unavailable && self.servers.len() > 1 {
            let from = self.current.load(Ordering::Relaxed);
            self.current
                .store((from + 1) % self.servers.len(), Ordering::Relaxed);
        }
    }

    /// Makes a one-shot call with failover: connects (see
    /// [`Context::connect`]) and runs `call`; while a node answers
    /// UNAVAILABLE, tries the next one, each server at most once.
    ///
    /// # Errors
    ///
    /// When no server could be reached, or the last answer was an error
    /// status (what the server said).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut tries = self.servers.len();
        loop {
            let status = match call(self.connect().await?).await {
                Ok(answer) => return Ok(answer),
                Err(status) => status,
            };
            tries -= 1;
            if tries == 0 || status.code() != tonic::Code::Unavailable {
                return Err(status_error(status));
            }
            self.note_failure(&status);
        }
    }

    /// Fails when the current server's port speaks the other scheme than
    /// its URL says (`http://` to a TLS port, `https://` to a plaintext
    /// one), saying which to use: a mistake no retry can mend. Asks the
    /// port (see [`probe`]); called after a failure, never on success.
    ///
    /// # Errors
    ///
    /// The mismatch, in words.
    ///
    /// Likewise a TLS server that asks for a client certificate when none
    /// was given (`--cert`/`--key`): the failed call rarely says so itself
    /// (see [`probe::asks_for_client_cert`]).
    pub async fn check_scheme(&self) -> anyhow::Result<()> {
        let server = self.current_server();
        if let Some(mismatch) = probe::mismatch(server).await {
            anyhow::bail!(mismatch);
        }
        if self.security.cert.is_none()
            && server.starts_with("https://")
            && probe::asks_for_client_cert(server).await == Some(true)
        {
            anyhow::bail!("{server} {NEEDS_CLIENT_CERT}");
        }
        Ok(())
    }

    /// Opens a channel to `server`: TLS for an `https://` URL (verified
    /// against `--ca` or the system roots, presenting `--cert`/`--key`),
    /// and the token on every call.
    async fn connect_to(&self, server: &str) -> anyhow::Result<Channel> {
        self.try_connect_to(server).await.map_err(|err| {
            if is_permanent_text(&format!("{err:#}")) {
                anyhow::Error::new(Permanent(format!("{err:#}")))
            } else {
                err
            }
        })
    }

    /// [`Context::connect_to`] before its errors are sorted.
    async fn try_connect_to(&self, server: &str) -> anyhow::Result<Channel> {
        let credentials = self
            .security
            .credentials()
            .map_err(|err| Permanent(format!("{err:#}")))?;
        let mut endpoint = Endpoint::from_shared(server.to_owned())
            .with_context(|| format!("invalid server URL {server:?}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let uri = endpoint.uri().clone();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        match uri.scheme_str() {
            Some("https") => {
                let tls = self
                    .security
                    .tls(&host)
                    .map_err(|err| Permanent(format!("{err:#}")))?;
                endpoint = endpoint.tls_config(tls)?;
            }
            _ if self.security.ca.is_some() || self.security.cert.is_some() => anyhow::bail!(
                "--ca, --cert and --key apply to TLS: use an https:// server URL (not {})",
                server
            ),
            _ => {}
        }
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(err) => {
                if let Some(mismatch) = probe::mismatch(server).await {
                    anyhow::bail!("cannot connect to {server}: {mismatch}");
                }
                return Err(self.connect_error(server, &host, err));
            }
        };
        Ok(InterceptedService::new(channel, credentials))
    }

    /// A failed connection as text, naming a refused certificate.
    fn connect_error(
        &self,
        server: &str,
        host: &str,
        err: tonic::transport::Error,
    ) -> anyhow::Error {
        {
            let chain = chain_text(&err);
            if chain.contains("certificate") || chain.contains("Certificate") {
                anyhow::anyhow!(
                    "cannot connect to {}: the server's TLS certificate was not accepted \
                     (it must be valid for the name {host:?} and signed by {}): {chain}",
                    server,
                    self.security.ca.as_ref().map_or_else(
                        || "a CA the system trusts".to_owned(),
                        |ca| format!("the CA in {}", ca.display())
                    )
                )
            } else if chain.contains("Connection refused") {
                // tonic repeats "tcp connect error"; say what it means.
                anyhow::anyhow!(
                    "cannot connect to {server}: nothing is listening there (connection \
                     refused); is `streamhub serve` running? --server (STREAMHUB_SERVER) \
                     picks another server"
                )
            } else {
                anyhow::anyhow!("cannot connect to {server}: {chain}")
            }
        }
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

/// A failed client command's error, with the reason when the server's
/// URL names the scheme its port does not speak (see
/// [`Context::check_scheme`]; the port is asked once, on this failure
/// path only).
pub fn explain_failure(ctx: &Context, err: anyhow::Error) -> anyhow::Error {
    let text = format!("{err:#}");
    // Only failures below gRPC can come from a mismatch: a server that
    // answered with a status of its own (NotFound, PermissionDenied, …)
    // was reached.
    let below_grpc = text.contains("cannot connect to")
        || ["Cancelled", "Unknown", "Unavailable", "Internal"]
            .iter()
            .any(|code| text.contains(&format!("server answered {code}:")));
    if !below_grpc || probe::is_mismatch(&text) || text.contains(NEEDS_CLIENT_CERT) {
        return err;
    }
    let checked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|runtime| runtime.block_on(ctx.check_scheme()));
    match checked {
        Ok(Err(mismatch)) => err.context(mismatch.to_string()),
        _ => err,
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
    if status.code() == tonic::Code::Unauthenticated
        && status.message() == crate::auth::layer::TOKEN_EXPIRED
    {
        return "Unauthenticated: the token expired; get a new token and run the command again"
            .to_owned();
    }
    let text = format!("{:?}: {}", status.code(), terminal_safe(status.message()));
    // A call that failed below gRPC (the connection, TLS) carries the
    // cause as its source: the innermost one says what happened.
    let mut cause = None;
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        cause = Some(err.to_string());
        source = err.source();
    }
    match cause {
        Some(cause) if cause.contains("CertificateRequired") => format!(
            "{text} ({}): the server {NEEDS_CLIENT_CERT}",
            terminal_safe(&cause)
        ),
        Some(cause)
            if ["BadCertificate", "UnknownCA", "CertificateExpired"]
                .iter()
                .any(|alert| cause.contains(alert)) =>
        {
            format!(
                "{text} ({}): the server did not accept the client certificate (--cert)",
                terminal_safe(&cause)
            )
        }
        Some(cause) if !text.contains(&cause) => format!("{text} ({})", terminal_safe(&cause)),
        _ => text,
    }
}

/// An error and its causes on one line, `outer: inner: …`, leaving out a
/// cause whose text the one before it already says (errors of other
/// crates, such as an I/O error wrapping a TLS error, often both show
/// their cause and return it as their source).
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !last.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        last = line;
        source = cause.source();
    }
    text
}

/// A client failure that no retry mends: the client's own settings
/// (`--ca`, `--cert`, `--key`, the token) are wrong or do not fit the
/// server (its certificate not accepted, the wrong scheme, a client
/// certificate required). Streaming commands stop on it instead of
/// reconnecting.
#[derive(Debug)]
pub struct Permanent(pub String);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}

/// Whether `err` is a [`Permanent`] failure.
pub fn is_permanent(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<Permanent>())
}

/// Whether a connection failure's text says it is one of the client's
/// settings, not the network.
fn is_permanent_text(text: &str) -> bool {
    probe::is_mismatch(text)
        || text.contains(NEEDS_CLIENT_CERT)
        || text.contains("TLS certificate was not accepted")
        || text.contains("did not accept the client certificate")
}

/// What to say of a server that asks for a client certificate none was
/// given for (after "the server" or its URL).
const NEEDS_CLIENT_CERT: &str =
    "requires a client certificate; give --cert and --key (or STREAMHUB_CERT and STREAMHUB_KEY)";

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

#[cfg(test)]
mod status_text_tests {
    use super::{chain_text, status_text};

    #[test]
    fn a_cause_the_error_before_it_already_says_is_left_out() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let wrapped = anyhow::Error::new(inner).context("invalid peer certificate: UnknownIssuer");
        let outer = wrapped.context("cannot connect");
        assert_eq!(
            chain_text(outer.as_ref()),
            "cannot connect: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn a_failure_below_grpc_names_its_cause_and_a_missing_client_certificate_says_so() {
        let plain = tonic::Status::not_found("no such file");
        assert_eq!(status_text(&plain), "NotFound: no such file");
        let alert = tonic::Status::from_error(Box::new(std::io::Error::other(
            "received fatal alert: CertificateRequired",
        )));
        let text = status_text(&alert);
        assert!(text.contains("CertificateRequired"), "{text}");
        assert!(text.contains("give --cert and --key"), "{text}");
        let refused = tonic::Status::from_error(Box::new(std::io::Error::other(
            "received fatal alert: UnknownCA",
        )));
        assert!(status_text(&refused).contains("did not accept the client certificate"));
    }
}
