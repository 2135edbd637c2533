//! Shared test helpers: an in-process server on a loopback port 0, and a
//! spawned `streamhub serve` process for signal tests.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a subset

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::StreamExt;
use streamhub::config::Config;
use streamhub::proto::telemetry::{
    AlertResponse, MetricsPayload, MetricsRequest, telemetry_service_client::TelemetryServiceClient,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Generous bound for anything a test waits on; a hang fails instead of
/// blocking the suite.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), streamhub::server::ServerError>>,
}

/// A config for tests: self-sampling off (so only the test's data exists)
/// unless the test turns it on, and a temporary data directory.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.telemetry.self_sample_interval = Duration::ZERO;
    config.drain_timeout = Duration::from_secs(5);
    config
}

impl TestServer {
    /// Starts a server with [`test_config`].
    pub async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    /// Starts a server with `config` (its listen address and data directory
    /// are replaced).
    pub async fn start_with(mut config: Config) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        config.data_dir = data_dir.path().to_path_buf();
        Self::start_in(config, data_dir).await
    }

    /// Starts a server using an existing data directory (restart tests).
    pub async fn start_in(mut config: Config, data_dir: tempfile::TempDir) -> Self {
        config.data_dir = data_dir.path().to_path_buf();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(streamhub::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            data_dir,
            stop: Some(stop),
            task,
        }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new connection (its own HTTP/2 connection each call).
    pub async fn channel(&self) -> Channel {
        within(
            "connect",
            Endpoint::from_shared(self.url()).unwrap().connect(),
        )
        .await
        .unwrap()
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits until `run` returns; gives back the data
    /// directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.begin_shutdown();
        within("server shutdown", &mut self.task)
            .await
            .unwrap()
            .unwrap();
        self.data_dir
    }
}

/// A `streamhub serve` child process on a free loopback port.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Spawns the binary with `args` after `serve --listen 127.0.0.1:0`,
    /// and waits for its "listening on" line.
    pub fn spawn(data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn_on("127.0.0.1:0", data_dir, args, Stdio::null())
    }

    /// Spawns the binary listening on `listen`, its log (stderr) going to
    /// `log`, and waits for its "listening on" line.
    pub fn spawn_on(listen: &str, data_dir: &std::path::Path, args: &[&str], log: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamhub"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a signal (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    ///
    /// Async so the test's runtime keeps serving its client connections
    /// meanwhile: a draining server waits for its clients (for instance for
    /// the answer to the ping that follows its GOAWAY), and a test thread
    /// blocked here would leave that unanswered until the drain deadline.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a channel to `url` (a server started by the test).
pub async fn connect(url: String) -> Channel {
    within("connect", Endpoint::from_shared(url).unwrap().connect())
        .await
        .unwrap()
}

/// A LiveFeed payload (`request_count` 0).
pub fn payload(service: &str, cpu: f64, memory: f64, timestamp_ms: u64) -> MetricsPayload {
    MetricsPayload {
        service_name: service.into(),
        cpu_usage: cpu,
        memory_mb: memory,
        timestamp_ms,
        request_count: 0,
    }
}

/// A GetSnapshot / Subscribe request.
pub fn request(service: &str, interval_ms: u32) -> MetricsRequest {
    MetricsRequest {
        service_name: service.into(),
        interval_ms,
    }
}

/// Sends `payloads` on one LiveFeed call, half-closes, and returns every
/// alert and the final status (None for a clean end).
pub async fn live_feed(
    channel: Channel,
    payloads: Vec<MetricsPayload>,
) -> (Vec<AlertResponse>, Option<tonic::Status>) {
    let mut client = TelemetryServiceClient::new(channel);
    let mut alerts = within(
        "live feed",
        client.live_feed(futures::stream::iter(payloads)),
    )
    .await
    .unwrap()
    .into_inner();
    let mut got = Vec::new();
    loop {
        match within("alert", alerts.next()).await {
            Some(Ok(alert)) => got.push(alert),
            Some(Err(status)) => return (got, Some(status)),
            None => return (got, None),
        }
    }
}

/// Opens a LiveFeed call that stays open: payloads sent on the returned
/// sender go out in order, alerts come back on the returned stream.
pub async fn open_live_feed(
    client: &mut TelemetryServiceClient<Channel>,
    buffer: usize,
) -> (
    mpsc::Sender<MetricsPayload>,
    tonic::Streaming<AlertResponse>,
) {
    let (tx, rx) = mpsc::channel(buffer);
    let alerts = within("live feed", client.live_feed(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    (tx, alerts)
}

/// Asserts `status` is how a stream ends on shutdown: UNAVAILABLE saying
/// the server is shutting down.
pub fn assert_shutting_down(what: &str, status: &tonic::Status) {
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{what}: {status:?}"
    );
    assert!(
        status.message().contains("shutting down"),
        "{what}: {}",
        status.message()
    );
}

/// Publishes one sample and waits until the server has accepted it.
pub async fn publish(channel: Channel, service: &str, cpu: f64) {
    let (_, status) = live_feed(channel, vec![payload(service, cpu, 100.0, 0)]).await;
    assert!(status.is_none(), "{status:?}");
}
