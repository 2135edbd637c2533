//! Server configuration: embedded defaults, then a TOML file, then
//! `STREAMHUB_*` environment variables, then command-line flags.
//!
//! Every setting has a default that serves. Nested keys are reached from the
//! environment with a double underscore (`STREAMHUB_TELEMETRY__MAX_SERVICES`)
//! and from the command line with `--set telemetry.max_services=5000`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file, variable or flag held a value that does not fit its setting:
    /// where (file, environment variable or `--set`), which key and what
    /// was expected, once per fault (see [`describe`]).
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A `--set` argument was not `key=value`.
    #[error("--set expects KEY=VALUE, got {0:?}")]
    BadOverride(String),
    /// The values parse but contradict each other.
    #[error("invalid configuration: {0}")]
    Inconsistent(String),
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on: an IP address and port, or a
    /// host name and port (`localhost:50051`) resolved at load time.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Directory for uploads, chat history and other durable state.
    pub data_dir: PathBuf,
    /// How long shutdown may take before open streams are cut off.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Transport limits (HTTP/2, TCP, message sizes).
    pub limits: Limits,
    /// Telemetry service settings.
    pub telemetry: TelemetryConfig,
    /// File upload service settings.
    pub upload: UploadConfig,
    /// Chat service settings.
    pub chat: ChatConfig,
    /// How the server's async runtime is built.
    pub runtime: RuntimeConfig,
    /// TLS for every connection (off unless a certificate is given).
    pub tls: TlsConfig,
    /// Plain HTTP routes and browser access (`/metrics`, `/files/`, the
    /// dashboard, gRPC-Web).
    pub http: HttpConfig,
    /// Authentication: static tokens, JWT, client certificates.
    pub auth: crate::auth::AuthConfig,
    /// Cluster mode over NATS (off unless `cluster.nats` lists a server).
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./streamhub-data"),
            drain_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            telemetry: TelemetryConfig::default(),
            upload: UploadConfig::default(),
            chat: ChatConfig::default(),
            runtime: RuntimeConfig::default(),
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// Server TLS (see `transport::tls`): on when `cert` and `key` are set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate, optionally followed by its
    /// chain (intermediates).
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM file with the CA certificates that sign client certificates;
    /// when set, every client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes and reloaded (SIGHUP
    /// reloads at once); zero checks only on SIGHUP.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsConfig {
    /// Whether the server serves TLS (`cert` and `key` both set).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// Cluster mode: several nodes sharing telemetry, chat and upload leases
/// through NATS (see `docs/cluster.md`). Off while `nats` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://HOST:PORT`, or `tls://…`); empty means a
    /// single node with the in-process broker and local storage. A list,
    /// or one string of comma-separated URLs (as `--cluster` takes them,
    /// and as `STREAMHUB_CLUSTER__NATS=nats://a:4222,nats://b:4222` gives).
    #[serde(deserialize_with = "url_list")]
    pub nats: Vec<String>,
    /// A NATS `.creds` file (JWT and nkey seed) to authenticate with.
    pub nats_creds: Option<PathBuf>,
    /// A PEM file of CA certificates to verify the NATS servers' TLS with.
    pub nats_tls_ca: Option<PathBuf>,
    /// This node's name, in logs and in NATS' connection list; empty means
    /// the host name plus the listen port (`host:50051`).
    pub node: String,
    /// JetStream replicas of the streams and buckets streamhub creates
    /// (1 for a single nats-server; 3 for a three-server NATS cluster).
    /// Applies when a stream is first created.
    pub replicas: usize,
    /// How long JetStream remembers a chat message's idempotency key
    /// across nodes (its duplicate window).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long an upload's lease on its name outlives its node: a crashed
    /// node's lease lapses after this. A live node renews it every third.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long connecting to NATS at start, and each cluster request
    /// (JetStream publish, stream look-up), may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats: Vec::new(),
            nats_creds: None,
            nats_tls_ca: None,
            node: String::new(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            lease_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Plain HTTP and browser settings (see [`crate::web`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Origins (e.g. `https://dash.example.com`) whose pages may call the
    /// server from a browser (CORS), besides the server's own origin. Empty:
    /// same-origin only. `*` allows any origin.
    pub cors_origins: Vec<String>,
    /// Whether `/metrics` counts calls (open and finished, per method) and
    /// telemetry samples and deliveries. Default true; false only to
    /// measure what counting costs (BENCHMARKS.md section 6): those
    /// series then stay at zero.
    pub count: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            count: true,
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }
}

/// How the server's tokio runtime is built (see [`crate::runtime`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `auto` (one thread when the process may run on one CPU, else one
    /// worker per CPU), `current-thread` or `multi-thread`.
    pub flavor: RuntimeFlavor,
    /// Worker threads of the multi-thread runtime; 0 means one per CPU the
    /// process may run on.
    pub worker_threads: usize,
}

/// The tokio scheduler the server runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeFlavor {
    /// `current-thread` when one CPU is available (or `worker_threads` is
    /// 1), else `multi-thread`.
    #[default]
    Auto,
    /// Every task on one thread.
    CurrentThread,
    /// A pool of worker threads with work stealing.
    MultiThread,
}

/// Limits tonic leaves off or at library defaults, set explicitly here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: open calls per connection.
    pub max_concurrent_streams: u32,
    /// Remotely reset streams waiting to be accepted before the connection
    /// is closed with GOAWAY (HTTP/2 rapid-reset protection).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset because of peer errors before it closes
    /// the connection (protection against peers provoking resets).
    pub max_local_error_reset_streams: usize,
    /// Largest encoded gRPC message accepted or sent, in bytes.
    pub max_message_size: usize,
    /// Interval of HTTP/2 PING frames that detect dead peers.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive idle time on accepted sockets.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// Close connections older than this (GOAWAY), so clients rebalance.
    /// Off by default: streams are meant to live long.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// Time given to calls on a connection past its maximum age.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Option<Duration>,
    /// HTTP/2 initial stream flow-control window, in bytes.
    pub initial_stream_window_size: u32,
    /// HTTP/2 initial connection flow-control window, in bytes.
    pub initial_connection_window_size: u32,
    /// Largest HTTP/2 frame payload the server accepts, in bytes (16 KiB
    /// to 16 MiB - 1).
    pub max_frame_size: u32,
    /// Largest header block (request metadata, decoded) a client may send,
    /// in bytes; bounds CONTINUATION floods and header bombs.
    pub max_header_list_size: u32,
    /// Time a new connection has to finish its TLS handshake and its HTTP/2
    /// preface (or send its first HTTP/1.1 request); then it is closed.
    /// Also the longest an HTTP/1.1 connection may wait for, or take to
    /// receive, each later request head.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection without an open stream for this long is closed (GOAWAY).
    /// Keepalive pings do not count as activity.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections open at once; more are closed as soon as they are
    /// accepted. Lowered at start to fit the file-descriptor limit.
    pub max_connections: usize,
    /// Most connections open at once from one client IP address, so one
    /// client cannot take every connection; more from it are closed as
    /// soon as they are accepted. Clients behind one NAT share it.
    pub max_connections_per_peer: usize,
    /// Bytes of gRPC messages one connection's calls may hold partly
    /// received (each call counted at the largest message it has started,
    /// for its whole life); a call that would pass it ends with
    /// RESOURCE_EXHAUSTED. At least `max_message_size`.
    pub connection_message_budget: usize,
    /// Calls one authenticated identity may have open at once (every RPC
    /// counts while it runs); beyond it, RESOURCE_EXHAUSTED. 0 = no limit.
    /// Applies only while authentication is on.
    pub max_streams_per_identity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 4096,
            max_pending_accept_reset_streams: 64,
            max_local_error_reset_streams: 256,
            max_message_size: 4 * 1024 * 1024 + 64 * 1024,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            max_connection_age: None,
            max_connection_age_grace: None,
            initial_stream_window_size: 1024 * 1024,
            initial_connection_window_size: 4 * 1024 * 1024,
            // Lets a client send a whole upload chunk in one DATA frame
            // instead of 16 KiB pieces: +21 % upload throughput at 1 MiB
            // chunks (BENCHMARKS.md, Tuning).
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            max_connections: 10_000,
            max_connections_per_peer: 2_000,
            connection_message_budget: 64 * 1024 * 1024,
            max_streams_per_identity: 0,
        }
    }
}

/// Telemetry service settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Name under which the server reports its own host's metrics. Empty
    /// (the default): `streamhub` on one node, `streamhub@<cluster.node>`
    /// in cluster mode, so nodes do not overwrite each other's values.
    pub self_name: String,
    /// How often the server samples its own host. Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub self_sample_interval: Duration,
    /// Interval used by Subscribe when the request says 0.
    #[serde(with = "humantime_serde")]
    pub default_interval: Duration,
    /// Shortest interval a subscriber may ask for; shorter ones are raised.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Most distinct service names the hub tracks.
    pub max_services: usize,
    /// Most service names one authenticated identity may create (a name
    /// counts for the identity whose report created it); 0: no
    /// per-identity limit.
    pub max_services_per_identity: usize,
    /// A service that has not reported for this long, with no open
    /// LiveFeed call publishing it and no Subscribe call waiting on it, is
    /// dropped: its slot, its per-identity charge, latest sample and
    /// history are freed; a later sample re-creates it. Zero: never.
    #[serde(with = "humantime_serde")]
    pub service_ttl: Duration,
    /// While a value stays above its threshold, repeat the alert at most
    /// this often.
    #[serde(with = "humantime_serde")]
    pub alert_repeat_interval: Duration,
    /// Alert rules run on every LiveFeed payload.
    pub rules: Vec<AlertRuleConfig>,
    /// Samples of history kept per service (a ring buffer of 32 bytes a
    /// sample, filled as samples arrive: 28 KiB per service at 900), for
    /// GetHistory and the backfill of Watch. At least 1.
    pub history: usize,
    /// Recent alerts kept for the backfill of Watch.
    pub alert_history: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            self_name: String::new(),
            self_sample_interval: Duration::from_secs(1),
            default_interval: Duration::from_millis(1000),
            min_interval: Duration::from_millis(100),
            max_services: 10_000,
            max_services_per_identity: 1_000,
            service_ttl: Duration::from_secs(3600),
            alert_repeat_interval: Duration::from_secs(60),
            rules: vec![
                AlertRuleConfig {
                    name: "CPU_HIGH".to_owned(),
                    metric: Metric::CpuUsage,
                    above: 90.0,
                },
                AlertRuleConfig {
                    name: "MEMORY_HIGH".to_owned(),
                    metric: Metric::MemoryMb,
                    above: 4096.0,
                },
            ],
            history: 900,
            alert_history: 1000,
        }
    }
}

/// File upload service settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadConfig {
    /// Largest file accepted, in bytes; a bigger upload fails with
    /// RESOURCE_EXHAUSTED and its bytes are discarded.
    pub max_file_size: u64,
    /// Most bytes all stored files and unfinished uploads may take together;
    /// none by default (only the disk's own size).
    pub quota: Option<u64>,
    /// Most bytes the stored files and unfinished uploads of one identity
    /// may take (applies while authentication is on); none by default.
    pub quota_per_identity: Option<u64>,
    /// How long the bytes of an unfinished upload are kept for a resume
    /// after its last write.
    #[serde(with = "humantime_serde")]
    pub partial_ttl: Duration,
    /// How often expired unfinished uploads are looked for (also once at
    /// startup).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Most Upload calls open at once on the whole server; more are
    /// refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_uploads: usize,
    /// Most Upload calls open at once on one connection; more are refused
    /// with RESOURCE_EXHAUSTED (so one client cannot take every slot).
    pub max_uploads_per_connection: usize,
    /// Most Download calls open at once on the whole server.
    pub max_concurrent_downloads: usize,
    /// Most Download calls open at once on one connection.
    pub max_downloads_per_connection: usize,
    /// An upload that receives no chunk for this long ends with ABORTED
    /// (its bytes kept for a resume); a download whose client takes no
    /// chunk for this long is stopped.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A call holding an upload name that has received no chunk for this
    /// long may be taken over by a new call for the name (the old call
    /// ends with ABORTED, its bytes kept).
    #[serde(with = "humantime_serde")]
    pub takeover_after: Duration,
    /// Most blocking file operations (writes, reads, fsyncs, re-hashing)
    /// of uploads and downloads running at once; the rest of tokio's
    /// blocking threads stay free for look-ups and chat storage.
    pub max_blocking_io: usize,
    /// Where uploads are stored; default `<data_dir>/uploads`. Nodes of a
    /// cluster pointed at one shared directory resume each other's uploads.
    pub dir: Option<PathBuf>,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            max_file_size: 16 * 1024 * 1024 * 1024,
            quota: None,
            quota_per_identity: None,
            partial_ttl: Duration::from_secs(24 * 60 * 60),
            sweep_interval: Duration::from_secs(10 * 60),
            max_concurrent_uploads: 256,
            max_uploads_per_connection: 32,
            max_concurrent_downloads: 256,
            max_downloads_per_connection: 32,
            idle_timeout: Duration::from_secs(60),
            takeover_after: Duration::from_secs(5),
            max_blocking_io: 64,
            dir: None,
        }
    }
}

/// Chat service settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Messages of history kept per room; older ones are deleted.
    pub history: u64,
    /// Largest accepted message text, in bytes.
    pub max_text_bytes: usize,
    /// Messages queued for one member before it is cut off with
    /// RESOURCE_EXHAUSTED as too slow.
    pub member_queue: usize,
    /// Idempotency keys remembered per room (the keys of the most recent
    /// messages that carried one).
    pub idempotency_window: usize,
    /// Announce joins and leaves of members that name themselves (request
    /// metadata `chat-member`) as server-originated messages.
    pub announce_members: bool,
    /// Most rooms open at once.
    pub max_rooms: usize,
    /// Most open rooms one authenticated identity may be in at once (a
    /// room counts for each identity with a call in it, until its last
    /// call there ends; a room nobody is in counts for its opener until
    /// somebody enters it); 0: no per-identity limit.
    pub max_rooms_per_identity: usize,
    /// A room with no members and nothing pending for this long is closed:
    /// its slot is free again, its history stays stored and it reopens on
    /// the next join or send.
    #[serde(with = "humantime_serde")]
    pub room_idle_timeout: Duration,
    /// Most messages written in one storage commit (one fsync).
    pub max_batch: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            history: 10_000,
            max_text_bytes: 64 * 1024,
            member_queue: 1024,
            idempotency_window: 10_000,
            announce_members: true,
            max_rooms: 10_000,
            max_rooms_per_identity: 1_000,
            room_idle_timeout: Duration::from_secs(5 * 60),
            max_batch: 1024,
        }
    }
}

/// One threshold rule: `name` fires when `metric` rises above `above`, and
/// `<name>_RESOLVED` when it falls back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleConfig {
    /// Alert type sent to clients, e.g. `CPU_HIGH`.
    pub name: String,
    /// The measured value the rule watches.
    pub metric: Metric,
    /// Threshold; the alert fires when the value is strictly above it.
    pub above: f64,
}

/// A value carried by a metrics sample.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// CPU usage in percent.
    CpuUsage,
    /// Memory in MB.
    MemoryMb,
    /// Request count.
    RequestCount,
}

/// Where configuration comes from, highest priority last.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// A TOML file, if any.
    pub file: Option<PathBuf>,
    /// Read `STREAMHUB_*` environment variables.
    pub env: bool,
    /// `key=value` overrides (dotted keys), applied last.
    pub overrides: Vec<String>,
}

/// Resolves `host:port` (an IP address, or a name such as `localhost`) to
/// one socket address: the first IPv4 address if there is one (so
/// `localhost` means 127.0.0.1 wherever `/etc/hosts` lists `::1` first),
/// else the first.
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    let all: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| {
            format!("{addr:?} is not an address such as 127.0.0.1:50051 or localhost:50051: {e}")
        })?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// A list of URLs given as a list or as one comma-separated string;
/// blanks around each URL and empty items are dropped.
fn url_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    let urls = match Urls::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom(
            "expected NATS URLs: a list, or one string of comma-separated URLs (`nats://a:4222,nats://b:4222`)",
        )
    })? {
        Urls::One(text) => text.split(',').map(str::to_owned).collect(),
        Urls::Many(urls) => urls,
    };
    Ok(urls
        .into_iter()
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect())
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    resolve(&text).map_err(serde::de::Error::custom)
}

/// Whether the environment variable `key` (prefix stripped, `__` turned
/// into `.`) names a server setting: its first part is a top-level key of
/// [`Config`]. The CLI's own variables (`STREAMHUB_SERVER`,
/// `STREAMHUB_CHAT_NAME`, `STREAMHUB_CONFIG`, …) share the prefix and are
/// not settings, so they are skipped; a typo below a known key
/// (`STREAMHUB_TELEMETRY__TYPO`) still reaches the checks and is refused.
fn is_setting(key: &str) -> bool {
    let top = key.split('.').next().unwrap_or(key);
    TOP_LEVEL_KEYS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(top))
}

/// Whether the environment variable of setting `key` (`limits.max_connections`:
/// `STREAMHUB_LIMITS__MAX_CONNECTIONS`, any case) is set but empty: such a
/// variable counts as unset (`STREAMHUB_LISTEN= streamhub serve` serves on
/// the default), as a shell user expects from `VAR= command`.
fn set_but_empty(key: &str) -> bool {
    let name = format!("STREAMHUB_{}", key.replace('.', "__"));
    std::env::vars_os().any(|(var, value)| {
        value.is_empty()
            && var
                .to_str()
                .is_some_and(|var| var.eq_ignore_ascii_case(&name))
    })
}

/// A figment error as a user reads it: for each fault, where it came
/// from (the file, the `STREAMHUB_…` variable, or `--set KEY`), the key as
/// the file spells it, and what was wrong; without figment's profile name
/// (`default.`) and without repeating itself.
fn describe(err: figment::Error) -> String {
    let faults: Vec<String> = err
        .into_iter()
        .map(|fault| {
            // figment's path already ends with an unknown field's name.
            let mut path = fault.path.clone();
            if let figment::error::Kind::UnknownField(field, _) = &fault.kind
                && path.last() != Some(field)
            {
                path.push(field.clone());
            }
            let key = path.join(".");
            let what = fault_text(&fault.kind);
            let origin = fault.metadata.as_ref().map(|md| {
                if md.name.contains("environment variable") {
                    format!(
                        "environment variable STREAMHUB_{}",
                        path.join("__").to_ascii_uppercase()
                    )
                } else if let Some(figment::Source::File(file)) = &md.source {
                    if key.is_empty() {
                        file.display().to_string()
                    } else {
                        format!("{}: key `{key}`", file.display())
                    }
                } else {
                    format!("--set {key}")
                }
            });
            match (origin, key.is_empty()) {
                (Some(origin), _) => format!("{origin}: {what}"),
                (None, false) => format!("key `{key}`: {what}"),
                (None, true) => what,
            }
        })
        .collect();
    faults.join("; ")
}

/// What was wrong with one key, in words: an unknown key lists the valid
/// ones at its level (figment's own text nests backticks), and a value
/// that is not a duration shows how one is written.
fn fault_text(kind: &figment::error::Kind) -> String {
    match kind {
        figment::error::Kind::UnknownField(field, expected) => {
            let valid: Vec<String> = expected.iter().map(|key| format!("`{key}`")).collect();
            format!(
                "unknown key `{field}`; the keys here are {}",
                valid.join(", ")
            )
        }
        kind => {
            let text = kind.to_string();
            if text.contains("expected a duration") {
                format!("{text} such as `5s`, `250ms`, `1m 30s` or `1day`")
            } else {
                text
            }
        }
    }
}

/// The top-level keys of [`Config`] (checked against its fields by a unit
/// test).
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "drain_timeout",
    "limits",
    "telemetry",
    "upload",
    "chat",
    "runtime",
    "tls",
    "http",
    "auth",
    "cluster",
];

impl Config {
    /// Loads the configuration from `sources` over the embedded defaults.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = &sources.file {
            figment = figment.merge(Toml::file_exact(file));
        }
        if sources.env {
            figment = figment.merge(
                Env::prefixed("STREAMHUB_")
                    .split("__")
                    .filter(|key| is_setting(key.as_str()) && !set_but_empty(key.as_str())),
            );
        }
        for item in &sources.overrides {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            // Parse the value like TOML would (numbers, booleans), falling
            // back to a plain string.
            let value: figment::value::Value = value
                .parse::<figment::value::Value>()
                .unwrap_or_else(|_| value.into());
            figment = figment.merge(Serialized::default(key.trim(), value));
        }
        let config: Config = figment
            .extract()
            .map_err(|err| ConfigError::Invalid(describe(err)))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as a TOML file that [`Config::load`] reads back
    /// (what `serve --print-config` prints). Settings that are off (`None`)
    /// are left out, which is how a file says "off".
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self)
            .map_err(|e| ConfigError::Inconsistent(format!("cannot write TOML: {e}")))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.telemetry;
        if t.self_name.len() > crate::telemetry::MAX_NAME_LEN {
            return Err(ConfigError::Inconsistent(format!(
                "telemetry.self_name must be at most {} bytes (empty for the default)",
                crate::telemetry::MAX_NAME_LEN
            )));
        }
        if t.min_interval.is_zero() {
            return Err(ConfigError::Inconsistent(
                "telemetry.min_interval must be above zero".into(),
            ));
        }
        if t.max_services == 0 {
            return Err(ConfigError::Inconsistent(
                "telemetry.max_services must be at least 1".into(),
            ));
        }
        if t.history == 0 {
            return Err(ConfigError::Inconsistent(
                "telemetry.history must be at least 1 (the latest sample)".into(),
            ));
        }
        for origin in &self.http.cors_origins {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(ConfigError::Inconsistent(format!(
                    "http.cors_origins: {origin:?} is not a valid origin"
                )));
            }
        }
        for rule in &t.rules {
            if rule.name.is_empty() || !rule.above.is_finite() {
                return Err(ConfigError::Inconsistent(format!(
                    "alert rule {:?} needs a name and a finite threshold",
                    rule.name
                )));
            }
        }
        if !(16_384..=16_777_215).contains(&self.limits.max_frame_size) {
            return Err(ConfigError::Inconsistent(
                "limits.max_frame_size must be 16384 to 16777215 bytes".into(),
            ));
        }
        let u = &self.upload;
        if u.max_file_size == 0 {
            return Err(ConfigError::Inconsistent(
                "upload.max_file_size must be at least 1 byte".into(),
            ));
        }
        if u.partial_ttl.is_zero() || u.sweep_interval.is_zero() {
            return Err(ConfigError::Inconsistent(
                "upload.partial_ttl and upload.sweep_interval must be above zero".into(),
            ));
        }
        for (name, value) in [
            ("upload.max_concurrent_uploads", u.max_concurrent_uploads),
            (
                "upload.max_uploads_per_connection",
                u.max_uploads_per_connection,
            ),
            (
                "upload.max_concurrent_downloads",
                u.max_concurrent_downloads,
            ),
            (
                "upload.max_downloads_per_connection",
                u.max_downloads_per_connection,
            ),
            ("upload.max_blocking_io", u.max_blocking_io),
        ] {
            if value == 0 {
                return Err(ConfigError::Inconsistent(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        if u.max_blocking_io > 256 {
            return Err(ConfigError::Inconsistent(
                "upload.max_blocking_io must be at most 256, so half of tokio's 512 \
                 blocking threads stay free for look-ups and chat storage"
                    .into(),
            ));
        }
        if u.idle_timeout.is_zero() || u.takeover_after.is_zero() {
            return Err(ConfigError::Inconsistent(
                "upload.idle_timeout and upload.takeover_after must be above zero".into(),
            ));
        }
        let c = &self.chat;
        for (name, value) in [
            ("chat.max_text_bytes", c.max_text_bytes),
            ("chat.member_queue", c.member_queue),
            ("chat.max_rooms", c.max_rooms),
            ("chat.max_batch", c.max_batch),
        ] {
            if value == 0 {
                return Err(ConfigError::Inconsistent(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        if c.room_idle_timeout.is_zero() {
            return Err(ConfigError::Inconsistent(
                "chat.room_idle_timeout must be above zero".into(),
            ));
        }
        if c.history == 0 {
            return Err(ConfigError::Inconsistent(
                "chat.history must be at least 1".into(),
            ));
        }
        if c.max_text_bytes + 1024 > self.limits.max_message_size {
            return Err(ConfigError::Inconsistent(format!(
                "chat.max_text_bytes ({}) must leave 1 KiB for the rest of a message \
                 within limits.max_message_size ({})",
                c.max_text_bytes, self.limits.max_message_size
            )));
        }
        let k = &self.cluster;
        if k.enabled() && (k.replicas == 0 || k.lease_ttl < Duration::from_secs(3)) {
            return Err(ConfigError::Inconsistent(
                "cluster.replicas must be at least 1 and cluster.lease_ttl at least 3s".into(),
            ));
        }
        if k.enabled() && (k.request_timeout.is_zero() || k.duplicate_window.is_zero()) {
            return Err(ConfigError::Inconsistent(
                "cluster.request_timeout and cluster.duplicate_window must be above zero".into(),
            ));
        }
        if self.limits.max_message_size < 1024 {
            return Err(ConfigError::Inconsistent(
                "limits.max_message_size must be at least 1024 bytes".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Inconsistent(
                "tls.cert and tls.key go together: set both (or neither)".into(),
            ));
        }
        self.auth.validate().map_err(ConfigError::Inconsistent)?;
        self.validate_transport()?;
        Ok(())
    }
}

impl Config {
    /// Checks the connection-layer settings (`limits.*` of the transport,
    /// `tls.*`).
    fn validate_transport(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.handshake_timeout.is_zero() || l.idle_timeout.is_zero() {
            return Err(ConfigError::Inconsistent(
                "limits.handshake_timeout and limits.idle_timeout must be above zero".into(),
            ));
        }
        if l.max_connections_per_peer == 0 {
            return Err(ConfigError::Inconsistent(
                "limits.max_connections_per_peer must be at least 1".into(),
            ));
        }
        if l.max_connections == 0 {
            return Err(ConfigError::Inconsistent(
                "limits.max_connections must be at least 1".into(),
            ));
        }
        if l.max_header_list_size < 1024 {
            return Err(ConfigError::Inconsistent(
                "limits.max_header_list_size must be at least 1024 bytes".into(),
            ));
        }
        if l.connection_message_budget < l.max_message_size {
            return Err(ConfigError::Inconsistent(format!(
                "limits.connection_message_budget ({}) must be at least \
                 limits.max_message_size ({})",
                l.connection_message_budget, l.max_message_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let config = Config::load(&Sources::default()).expect("defaults load");
        assert_eq!(config.listen.port(), 50051);
        assert_eq!(config.telemetry.rules.len(), 2);
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let sources = Sources {
            overrides: vec![
                "telemetry.max_services=5".into(),
                "drain_timeout=3s".into(),
                "limits.max_connection_age=5m".into(),
                "upload.quota=1000000".into(),
                "upload.partial_ttl=1h".into(),
                "telemetry.service_ttl=90s".into(),
            ],
            ..Sources::default()
        };
        let config = Config::load(&sources).expect("loads");
        assert_eq!(config.telemetry.max_services, 5);
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        assert_eq!(
            config.limits.max_connection_age,
            Some(Duration::from_secs(300))
        );
        assert_eq!(config.upload.quota, Some(1_000_000));
        assert_eq!(config.upload.partial_ttl, Duration::from_secs(3600));
        assert_eq!(config.telemetry.service_ttl, Duration::from_secs(90));
        let defaults = Config::load(&Sources::default()).expect("defaults load");
        assert_eq!(defaults.telemetry.service_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn runtime_flavor_is_chosen_by_name_and_unknown_names_are_refused() {
        let load = |flavor: &str| {
            Config::load(&Sources {
                overrides: vec![
                    format!("runtime.flavor={flavor}"),
                    "runtime.worker_threads=3".into(),
                ],
                ..Sources::default()
            })
        };
        let config = load("multi-thread").expect("loads");
        assert_eq!(config.runtime.flavor, RuntimeFlavor::MultiThread);
        assert_eq!(config.runtime.worker_threads, 3);
        assert_eq!(
            load("current-thread").expect("loads").runtime.flavor,
            RuntimeFlavor::CurrentThread
        );
        let err = load("fastest").expect_err("unknown flavour").to_string();
        assert!(
            err.contains("fastest") && err.contains("current-thread"),
            "{err}"
        );
    }

    #[test]
    fn file_is_read_and_typos_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("streamhub.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\n[telemetry]\nalert_repeat_interval = \"5s\"\n\
             [[telemetry.rules]]\nname = \"REQS_HIGH\"\nmetric = \"request_count\"\nabove = 1000.0\n",
        )
        .expect("write");
        let config = Config::load(&Sources {
            file: Some(path.clone()),
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(config.listen.port(), 6000);
        assert_eq!(config.telemetry.rules.len(), 1);
        assert_eq!(config.telemetry.rules[0].metric, Metric::RequestCount);

        std::fs::write(&path, "listn = \"127.0.0.1:6000\"\n").expect("write");
        let err = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .expect_err("typo rejected");
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn chat_settings_have_defaults_and_are_checked() {
        let config = Config::load(&Sources::default()).expect("defaults load");
        assert_eq!(config.chat.history, 10_000);
        assert_eq!(config.chat.member_queue, 1024);
        assert_eq!(config.chat.max_text_bytes, 64 * 1024);
        let config = Config::load(&Sources {
            overrides: vec!["chat.member_queue=8".into(), "chat.history=50".into()],
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!((config.chat.member_queue, config.chat.history), (8, 50));
        for bad in [
            "chat.member_queue=0",
            "chat.history=0",
            "chat.max_text_bytes=5000000",
        ] {
            let err = Config::load(&Sources {
                overrides: vec![bad.into()],
                ..Sources::default()
            })
            .expect_err("rejected");
            assert!(err.to_string().contains("chat."), "{bad}: {err}");
        }
    }

    #[test]
    fn the_top_level_keys_are_the_fields_of_config() {
        let value = serde_json::to_value(Config::default()).expect("serializes");
        let mut fields: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut known = TOP_LEVEL_KEYS.to_vec();
        fields.sort_unstable();
        known.sort_unstable();
        assert_eq!(fields, known);
        assert!(is_setting("telemetry.typo"));
        assert!(is_setting("LISTEN"));
        assert!(!is_setting("chat_name"));
        assert!(!is_setting("server"));
    }

    #[test]
    fn printed_toml_loads_back_to_the_same_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("printed.toml");
        let config = Config::load(&Sources {
            overrides: vec![
                "limits.max_connection_age=5m".into(),
                "upload.quota=1000".into(),
                "telemetry.min_interval=250ms".into(),
            ],
            ..Sources::default()
        })
        .expect("loads");
        let printed = config.to_toml().expect("prints");
        std::fs::write(&path, &printed).expect("write");
        let again = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .expect("the printed TOML loads");
        assert_eq!(again.to_toml().expect("prints"), printed);
        assert_eq!(
            again.limits.max_connection_age,
            Some(Duration::from_secs(300))
        );
        assert_eq!(again.limits.max_connection_age_grace, None);
    }

    #[test]
    fn listen_takes_host_names() {
        let config = Config::load(&Sources {
            overrides: vec!["listen=localhost:6001".into()],
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 6001)));
        assert_eq!(resolve("[::1]:5").expect("v6").port(), 5);
        assert!(resolve("no port").is_err());
    }

    #[test]
    fn upload_limits_have_defaults_and_are_checked() {
        let config = Config::load(&Sources::default()).expect("defaults load");
        assert_eq!(config.upload.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.upload.takeover_after, Duration::from_secs(5));
        assert_eq!(config.upload.max_uploads_per_connection, 32);
        for bad in [
            "upload.max_concurrent_uploads=0",
            "upload.max_downloads_per_connection=0",
            "upload.max_blocking_io=300",
            "upload.idle_timeout=0s",
        ] {
            let err = Config::load(&Sources {
                overrides: vec![bad.into()],
                ..Sources::default()
            })
            .expect_err("rejected");
            assert!(err.to_string().contains("upload."), "{bad}: {err}");
        }
    }

    #[test]
    fn cluster_is_off_by_default_and_checked_when_on() {
        let config = Config::load(&Sources::default()).expect("defaults load");
        assert!(!config.cluster.enabled());
        assert_eq!(config.upload.dir, None);
        let config = Config::load(&Sources {
            overrides: vec![
                "cluster.nats=[\"nats://a:4222\", \"nats://b:4222\"]".into(),
                "cluster.replicas=3".into(),
                "upload.dir=/srv/shared".into(),
            ],
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(config.cluster.nats.len(), 2);
        assert_eq!(config.cluster.replicas, 3);
        assert_eq!(config.upload.dir, Some(PathBuf::from("/srv/shared")));
        // One comma-separated string, as `--cluster` and an environment
        // variable give it (a list was the only form taken before).
        let config = Config::load(&Sources {
            overrides: vec!["cluster.nats=nats://a:4222, nats://b:4222,".into()],
            ..Sources::default()
        })
        .expect("a comma-separated string loads");
        assert_eq!(config.cluster.nats, ["nats://a:4222", "nats://b:4222"]);
        let err = Config::load(&Sources {
            overrides: vec!["cluster.nats=4".into()],
            ..Sources::default()
        })
        .expect_err("a number is no URL list");
        assert!(err.to_string().contains("comma-separated"), "{err}");
        let err = Config::load(&Sources {
            overrides: vec![
                "cluster.nats=[\"nats://a:4222\"]".into(),
                "cluster.lease_ttl=1s".into(),
            ],
            ..Sources::default()
        })
        .expect_err("too short a lease");
        assert!(err.to_string().contains("cluster.lease_ttl"), "{err}");
    }

    #[test]
    fn bad_override_is_reported() {
        let err = Config::load(&Sources {
            overrides: vec!["nonsense".into()],
            ..Sources::default()
        })
        .expect_err("rejected");
        assert!(err.to_string().contains("nonsense"));
    }
}
