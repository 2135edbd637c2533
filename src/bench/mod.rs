//! The benchmark suite behind `streamhub bench SCENARIO`.
//!
//! Each scenario measures one performance promise of streamhub side by
//! side with its peers in one run, and returns a [`harness::Report`]: rows
//! of medians over repetitions, and the targets checked against
//! them. The CLI prints its summary and writes it as JSON, from which
//! `bench/tables.py` and `bench/plot.py` make the tables and plots of
//! BENCHMARKS.md.
//!
//! - [`harness`]: servers under test, pinning, `/proc` figures, wire
//!   counting, histograms, medians, the report.
//! - [`polling`]: scenario 1, polling versus streaming.
//! - [`fanout`]: scenario 2, one publisher to N subscribers.
//! - [`latency`]: scenario 5, publish-to-receipt latency next to a TCP
//!   ping-pong.
//! - [`upload`]: scenario 3, upload throughput next to iperf3 and `dd`.
//! - [`chat`]: scenario 4, a 1,000-member room at increasing send rates.
//! - [`cluster`]: issue 14, fan-out and chat over three cluster nodes next
//!   to one.
//! - [`dashboard`]: issue 13, dashboards watching through gRPC-Web next to
//!   native Subscribe.
//! - [`nats`]: `nats-server` and its Rust client, the fan-out yardstick.
//! - [`secure`]: TLS and a static token for the servers under test
//!   (`--secure`), and the "security" scenario comparing them with
//!   plaintext.
//!
//! A new scenario is a module with a `run(options, pinning)` returning its
//! settings, rows and checks, and a variant of [`Scenario`].
//!
//! Every load loop is bounded in count and time, and every connection goes
//! to 127.0.0.1.

pub mod chat;
pub mod cluster;
pub mod dashboard;
pub mod fanout;
pub mod harness;
pub mod latency;
pub mod nats;
pub mod polling;
pub mod secure;
pub mod upload;

use std::{path::PathBuf, time::Instant};

pub use harness::Pinning;
use harness::{Machine, Report};

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process could not be started.
    #[error("cannot start {what}: {cause}")]
    Spawn {
        /// What was started.
        what: String,
        /// The cause (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// A server never printed `listening on ADDR`.
    #[error("{what} did not say where it listens{log}")]
    NoListen {
        /// Which server.
        what: String,
        /// The end of its log.
        log: String,
    },
    /// Anything the setup found wrong.
    #[error("{0}")]
    Setup(String),
    /// A step did not finish in its time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An I/O error.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    /// A gRPC connection failed.
    #[error("connection failed: {0}")]
    Transport(tonic::transport::Error),
    /// A call failed.
    #[error("call failed: {0}")]
    Status(Box<tonic::Status>),
    /// The NATS client failed.
    #[error("nats: {0}")]
    Nats(String),
    /// The results could not be encoded.
    #[error("cannot encode results: {0}")]
    Json(serde_json::Error),
}

// Each cause below is in its variant's message, so it is not also a
// `source()` (a report of the chain would say it twice).
impl From<std::io::Error> for BenchError {
    fn from(err: std::io::Error) -> Self {
        BenchError::Io(err)
    }
}

impl From<tonic::transport::Error> for BenchError {
    fn from(err: tonic::transport::Error) -> Self {
        BenchError::Transport(err)
    }
}

impl From<serde_json::Error> for BenchError {
    fn from(err: serde_json::Error) -> Self {
        BenchError::Json(err)
    }
}

impl From<tonic::Status> for BenchError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(Box::new(status))
    }
}

/// The scenarios `streamhub bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1: pollers calling GetSnapshot versus streamers holding Subscribe.
    Polling,
    /// 2: one LiveFeed publisher, N subscribers (and nats-server).
    Fanout,
    /// 3: upload throughput per chunk size, on disk and tmpfs, next to
    /// iperf3 and dd; peak memory of a multi-GiB upload.
    Upload,
    /// 4: a chat room of many members, senders at increasing rates.
    Chat,
    /// 5: publish-to-receipt latency next to a TCP ping-pong.
    Latency,
    /// Issue 12: fan-out, upload and chat with TLS and a static token
    /// versus plaintext, in one run.
    Security,
    /// Issue 13: server CPU per sample for dashboards watching through
    /// gRPC-Web (HTTP/1.1), next to native Subscribe and native Watch.
    Dashboard,
    /// Issue 14: fan-out and chat latency with clients spread over three
    /// cluster nodes (nats-server -js) versus one node, and embedded.
    Cluster,
    /// Internal: the TCP echo server of the latency scenario.
    #[value(hide = true)]
    TcpEcho,
}

impl Scenario {
    /// The scenario's name, as in result file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::Fanout => "fanout",
            Self::Upload => "upload",
            Self::Chat => "chat",
            Self::Latency => "latency",
            Self::Security => "security",
            Self::Dashboard => "dashboard",
            Self::Cluster => "cluster",
            Self::TcpEcho => "tcp-echo",
        }
    }
}

/// A server a scenario can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// This server.
    Streamhub,
    /// The Python grpcio peer in `bench/peers/python`.
    Python,
    /// The Node grpc-js peer in `bench/peers/node`.
    Node,
    /// nats-server (fan-out only; included there unless `--no-nats`).
    Nats,
}

impl Target {
    /// The target's name in results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Streamhub => "streamhub",
            Self::Python => "python",
            Self::Node => "node",
            Self::Nats => "nats",
        }
    }

    /// The shortest Subscribe interval the target honours, in ms
    /// (streamhub is started with a 1 ms floor; the peers' is fixed).
    pub fn min_interval_ms(self) -> u64 {
        match self {
            Self::Streamhub | Self::Nats => 1,
            Self::Python | Self::Node => 100,
        }
    }
}

/// Settings of a benchmark run (every scenario reads the ones it needs).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Servers to measure, side by side in this run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "streamhub,python,node"
    )]
    pub targets: Vec<Target>,
    /// Leave nats-server out of the fan-out scenario.
    #[arg(long)]
    pub no_nats: bool,
    /// Measure the already running server at --server instead of starting
    /// one (one target only).
    #[arg(long)]
    pub external: bool,
    /// Process id of the --external server, for its CPU and memory.
    #[arg(long, requires = "external")]
    pub server_pid: Option<u32>,
    /// Serve streamhub with TLS (a throwaway CA and certificate) and one
    /// static token, and connect over https with the token (any scenario).
    #[arg(long)]
    pub secure: bool,
    /// NATS URLs the streamhub servers join (`serve --cluster`); set by
    /// the cluster scenario.
    #[arg(skip)]
    pub cluster_nats: Vec<String>,
    /// Server URL used with --external.
    #[arg(skip = String::new())]
    pub server: String,
    /// Extra `--set KEY=VALUE` settings for the streamhub server
    /// (repeatable), e.g. `limits.initial_stream_window_size=65535`.
    #[arg(long = "server-set", value_name = "KEY=VALUE")]
    pub server_set: Vec<String>,
    /// Repetitions of each configuration; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Seconds of warm-up before each measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Polling: clients, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Polling: pollers' GetSnapshot period and streamers' interval, in ms.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
    /// Polling: how often the service reports, in ms.
    #[arg(long, default_value_t = 1000)]
    pub report_ms: u64,
    /// Polling: how often the service reports in the quiet variant, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub quiet_report_ms: u64,
    /// Polling: measured window of the normal variant, in seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Polling: measured window of the quiet variant, in seconds.
    #[arg(long, default_value_t = 40.0)]
    pub quiet_duration: f64,
    /// Fan-out: subscriber counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub subscribers: Vec<usize>,
    /// Fan-out: most subscriptions per connection (streamhub allows 4096
    /// concurrent streams per connection by default).
    #[arg(long, default_value_t = 4000)]
    pub per_connection: usize,
    /// Fan-out: most subscriptions per connection to the Python peer
    /// (grpcio cancels calls while opening 1,000 or more on one connection).
    #[arg(long, default_value_t = 100)]
    pub python_per_connection: usize,
    /// Fan-out: samples sent one at a time to time their reach.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Fan-out: seconds of publishing as fast as subscribers keep up.
    #[arg(long, default_value_t = 5.0)]
    pub saturation: f64,
    /// Fan-out: samples in flight during saturation.
    #[arg(long, default_value_t = 4)]
    pub pipeline: u64,
    /// Cluster: also measure fan-out with every streamhub node held to
    /// this fraction of one core (a CFS quota in a cgroup; needs root),
    /// so that three nodes get three times one node's CPU, as on cores of
    /// their own. 0: not measured.
    #[arg(long, default_value_t = 0.0)]
    pub node_cpu_quota: f64,
    /// Fan-out: largest subscriber count tried on the Python and Node
    /// peers (larger counts are reported as not attempted).
    #[arg(long, default_value_t = 100_000)]
    pub peer_max_subscribers: usize,
    /// Dashboard: dashboards watching every service.
    #[arg(long, default_value_t = 100)]
    pub dashboards: usize,
    /// Dashboard: services reporting, each once per --report-ms.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    /// Upload: size of each timed upload, in MiB.
    #[arg(long, default_value_t = 512)]
    pub upload_mib: u64,
    /// Upload: chunk sizes to measure, e.g. `16KiB,64KiB,256KiB,1MiB`.
    #[arg(long, value_delimiter = ',', value_parser = parse_size,
          default_value = "16KiB,64KiB,256KiB,1MiB")]
    pub chunk_sizes: Vec<usize>,
    /// Upload: size of the upload whose peak server memory is read, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub big_upload_mib: u64,
    /// Upload: a folder on disk for the data directory.
    #[arg(long, default_value = "/var/tmp")]
    pub disk_dir: PathBuf,
    /// Upload: a folder on tmpfs for the data directory.
    #[arg(long, default_value = "/dev/shm")]
    pub tmpfs_dir: PathBuf,
    /// Upload: seconds of each iperf3 measurement.
    #[arg(long, default_value_t = 3.0)]
    pub iperf_seconds: f64,
    /// Chat: members of the room.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Chat: members that send (the first ones).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Chat: aggregate send rates to step through, in messages per second.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,50,100,200,400,800,1600,3200"
    )]
    pub chat_rates: Vec<u64>,
    /// Chat: seconds of sending at each rate.
    #[arg(long, default_value_t = 3.0)]
    pub step_seconds: f64,
    /// Chat: members per connection.
    #[arg(long, default_value_t = 100)]
    pub chat_per_connection: usize,
    /// Latency: samples timed per target.
    #[arg(long, default_value_t = 500)]
    pub samples: u64,
    /// Latency: most seconds spent timing one target.
    #[arg(long, default_value_t = 20.0)]
    pub max_seconds: f64,
    /// Seconds a server may take to start, or subscribers to be set up.
    #[arg(long, default_value_t = 90)]
    pub setup_timeout: u64,
    /// Do not pin the server and the load to different cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Cores for the server under test (taskset CPU list).
    #[arg(long, default_value = "1")]
    pub server_cpus: String,
    /// Cores for the load generator (taskset CPU list).
    #[arg(long, default_value = "0")]
    pub load_cpus: String,
    /// Where the reference peers live.
    #[arg(long, default_value = "bench/peers")]
    pub peers_dir: PathBuf,
    /// Internal (tcp-echo): address to listen on.
    #[arg(long, hide = true, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

/// Parses a size such as `65536`, `64KiB` or `1MiB`.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "m" | "mib" => 1024 * 1024,
        _ => return Err(format!("unknown unit in {text}: use KiB or MiB")),
    };
    n.checked_mul(scale)
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("size out of range: {text}"))
}

/// Runs `scenario` and returns its report. `pinning` is what
/// [`Pinning::apply`] did before the runtime was built.
pub async fn run(
    scenario: Scenario,
    options: &Options,
    pinning: Pinning,
) -> Result<Report, BenchError> {
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let machine = Machine::probe();
    let (settings, rows, checks) = match scenario {
        Scenario::Polling => polling::run(options, &pinning).await?,
        Scenario::Fanout => fanout::run(options, &pinning).await?,
        Scenario::Upload => upload::run(options, &pinning).await?,
        Scenario::Chat => chat::run(options, &pinning).await?,
        Scenario::Latency => latency::run(options, &pinning).await?,
        Scenario::Security => secure::run(options, &pinning).await?,
        Scenario::Dashboard => dashboard::run(options, &pinning).await?,
        Scenario::Cluster => cluster::run(options, &pinning).await?,
        Scenario::TcpEcho => {
            latency::echo_server(options.listen).await?;
            return Err(BenchError::Setup("the echo server stopped".into()));
        }
    };
    Ok(Report {
        scenario: scenario.name().to_owned(),
        started_at,
        elapsed_s: harness::secs(started),
        machine,
        pinning,
        settings,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rows,
        checks,
    })
}

/// The metrics a scenario's summary shows.
pub fn summary_keys(scenario: Scenario) -> &'static [&'static str] {
    match scenario {
        Scenario::Polling => &[
            "updates",
            "cpu_us_per_update",
            "bytes_per_update",
            "server_cpu_ms",
        ],
        Scenario::Fanout => &[
            "reach_p50_us",
            "reach_p99_us",
            "reach_max_us",
            "deliveries_per_s",
            "mem_per_sub_bytes",
        ],
        Scenario::Upload => &["mib_per_s", "server_cpu_pct", "server_hwm_kib"],
        Scenario::Chat => &[
            "acked_per_s",
            "deliveries_per_s",
            "latency_p50_us",
            "latency_p99_us",
            "best_deliveries_per_s_p99_under_50ms",
            "knee_rate_msgs_per_s",
        ],
        Scenario::Latency => &["latency_p50_us", "latency_p99_us", "latency_max_us"],
        Scenario::Security => &[
            "deliveries_per_s",
            "reach_p99_us",
            "mib_per_s",
            "latency_p50_us",
            "latency_p99_us",
        ],
        Scenario::Dashboard => &[
            "samples_per_s",
            "expected_per_s",
            "server_cpu_pct",
            "cpu_us_per_sample",
        ],
        Scenario::Cluster => &[
            "deliveries_per_s",
            "deliveries_per_core_s",
            "reach_p99_us",
            "latency_p50_us",
            "latency_p99_us",
        ],
        Scenario::TcpEcho => &[],
    }
}
