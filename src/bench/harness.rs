//! What every scenario shares: starting (or targeting) the server under
//! test, pinning it and the load to different cores, reading its CPU time
//! and memory from `/proc`, counting bytes on the wire, latency histograms,
//! medians, and the JSON result file.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader, ReadBuf},
    net::TcpStream,
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri},
};

use super::{BenchError, Options, Target};
use crate::proto::telemetry::{MetricsPayload, telemetry_service_client::TelemetryServiceClient};

/// The service name every scenario publishes under.
pub const BENCH_SERVICE: &str = "bench-svc";

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Total memory in MiB.
    pub mem_total_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Load average when the run started (other work on the machine).
    pub loadavg: String,
}

impl Machine {
    /// Reads the machine's description from `/proc`.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        Self {
            // The machine's CPUs, not this process's affinity (the load
            // generator has pinned itself to one by now).
            nproc: match cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count()
            {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            cpu_model,
            mem_total_mib,
            kernel,
            loadavg,
        }
    }
}

/// Which cores the server and the load generator run on.
#[derive(Debug, Clone, Serialize)]
pub struct Pinning {
    /// CPU list given to `taskset` for the server, if pinned.
    pub server: Option<String>,
    /// CPU list the load generator pinned itself to, if pinned.
    pub load: Option<String>,
}

impl Pinning {
    /// Pins this process to the load cores and decides the server's cores,
    /// when `taskset` exists, the machine has two cores or more and
    /// pinning is wanted. Called before the load generator's runtime is
    /// built, so the runtime sizes itself from the pinned affinity.
    pub fn apply(options: &Options) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if options.no_pin || cores < 2 || !taskset(&["--version"]) {
            return Self {
                server: None,
                load: None,
            };
        }
        let pid = std::process::id().to_string();
        // -a: every thread of this process.
        let pinned = taskset(&["-a", "-p", "-c", &options.load_cpus, &pid]);
        Self {
            server: Some(options.server_cpus.clone()),
            load: pinned.then(|| options.load_cpus.clone()),
        }
    }
}

/// Runs `taskset` with `args`; true if it succeeded.
fn taskset(args: &[&str]) -> bool {
    std::process::Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU time and memory of a process, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcStats {
    /// User plus system CPU time, in microseconds, from `stat` (clock-tick
    /// resolution, usually 10 ms; includes threads that have exited).
    pub cpu_us: u64,
    /// Time on CPU of the live threads, in nanoseconds, from each thread's
    /// `schedstat` (nanosecond resolution), if readable.
    pub sched_ns: Option<u64>,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size, in KiB.
    pub hwm_kib: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
async fn clock_ticks() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Reads a process's CPU time and memory (or the sum over a group of
/// processes, e.g. the nodes of a cluster).
#[derive(Clone)]
pub struct ProcReader {
    pids: Vec<u32>,
    ticks_per_s: u64,
}

impl ProcReader {
    /// A reader for `pid`.
    pub async fn new(pid: u32) -> Self {
        Self::group(&[pid]).await
    }

    /// A reader whose figures are the sums over `pids`.
    pub async fn group(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            ticks_per_s: clock_ticks().await,
        }
    }

    /// The current figures: of the process, or summed over the group.
    pub fn read(&self) -> Result<ProcStats, BenchError> {
        let mut total = ProcStats {
            sched_ns: Some(0),
            ..ProcStats::default()
        };
        for &pid in &self.pids {
            let one = self.read_one(pid)?;
            total.cpu_us += one.cpu_us;
            total.sched_ns = total.sched_ns.zip(one.sched_ns).map(|(a, b)| a + b);
            total.rss_kib += one.rss_kib;
            total.hwm_kib += one.hwm_kib;
        }
        Ok(total)
    }

    fn read_one(&self, pid: u32) -> Result<ProcStats, BenchError> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which may contain spaces, in
        // parentheses: state is field 3, utime 14 and stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| BenchError::Setup(format!("unreadable /proc/{pid}/stat")))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let ticks = field(14) + field(15);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcStats {
            cpu_us: ticks * 1_000_000 / self.ticks_per_s,
            sched_ns: sched_ns(pid),
            rss_kib: kib("VmRSS:"),
            hwm_kib: kib("VmHWM:"),
        })
    }
}

fn sched_ns(pid: u32) -> Option<u64> {
    {
        let mut total = 0u64;
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let path = entry.ok()?.path().join("schedstat");
            // A thread may exit between listing and reading.
            if let Ok(text) = std::fs::read_to_string(path) {
                total += text.split_whitespace().next()?.parse::<u64>().ok()?;
            }
        }
        Some(total)
    }
}

/// Server CPU time between two readings, in microseconds: the
/// nanosecond-resolution thread figures when they agree with the
/// clock-tick ones within 20 ms (no thread came or went with much CPU
/// time), else the clock-tick figures.
pub fn cpu_delta_us(before: &ProcStats, after: &ProcStats) -> f64 {
    let ticks = after.cpu_us.saturating_sub(before.cpu_us) as f64;
    match (before.sched_ns, after.sched_ns) {
        (Some(b), Some(a)) if a >= b => {
            let precise = (a - b) as f64 / 1000.0;
            if (precise - ticks).abs() <= 20_000.0 {
                precise
            } else {
                ticks
            }
        }
        _ => ticks,
    }
}

/// A server under test: a process this run started, or one it was pointed
/// at.
pub struct ServerUnderTest {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, when known (for `/proc` figures).
    pub pid: Option<u32>,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    log: Option<PathBuf>,
    drain: Option<JoinHandle<()>>,
    /// Its CPU limit, if one was set ([`ServerUnderTest::limit_cpu`]);
    /// dropped (the cgroup removed) after the process has exited.
    quota: Option<CpuQuota>,
}

impl std::fmt::Debug for ServerUnderTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerUnderTest")
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

static SERVER_SEQ: AtomicU64 = AtomicU64::new(0);

impl ServerUnderTest {
    /// Starts the server of `target` on a loopback port chosen by the OS,
    /// pinned to `pinning.server`, and waits until it says where it listens.
    pub async fn start(
        target: Target,
        options: &Options,
        pinning: &Pinning,
    ) -> Result<Self, BenchError> {
        if options.external {
            let url: Uri = options
                .server
                .parse()
                .map_err(|e| BenchError::Setup(format!("bad --server URL: {e}")))?;
            let host = url.host().unwrap_or("127.0.0.1");
            let port = url.port_u16().unwrap_or(50051);
            let addr = tokio::net::lookup_host((host, port))
                .await?
                .next()
                .ok_or_else(|| BenchError::Setup(format!("cannot resolve {}", options.server)))?;
            return Ok(Self {
                addr,
                pid: options.server_pid,
                child: None,
                data_dir: None,
                log: None,
                drain: None,
                quota: None,
            });
        }
        Self::start_with_dir(target, options, pinning, bench_dir(target.name())?).await
    }

    /// Like [`Self::start`], with the server's scratch folder (holding its
    /// data directory) at `dir`.
    pub async fn start_with_dir(
        target: Target,
        options: &Options,
        pinning: &Pinning,
        dir: PathBuf,
    ) -> Result<Self, BenchError> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)?;
        let (program, mut args) = target_command(target, options, &data_dir)?;
        let security = if options.secure && target == Target::Streamhub {
            let (extra, client) = super::secure::prepare(&dir)?;
            args.extend(extra);
            Some(client)
        } else {
            None
        };
        let server =
            Self::spawn(target.name(), &program, &args, dir, options, pinning, false).await?;
        if let Some(client) = security {
            super::secure::register(server.addr, client);
        }
        Ok(server)
    }

    /// Starts `program` with `args` (pinned to the server's cores) and
    /// waits for its `listening on ADDR` line, on stdout or, with
    /// `addr_on_stderr`, on stderr. `dir` is removed when it stops.
    pub async fn spawn(
        what: &str,
        program: &Path,
        args: &[String],
        dir: PathBuf,
        options: &Options,
        pinning: &Pinning,
        addr_on_stderr: bool,
    ) -> Result<Self, BenchError> {
        let log = dir.join("server.log");
        let mut command = match &pinning.server {
            Some(cpus) => {
                // taskset execs the program, so the child's pid is the
                // server's own.
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if addr_on_stderr {
            command
                .stdout(std::fs::File::create(&log)?)
                .stderr(Stdio::piped());
        } else {
            command
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?);
        }
        let mut child = command.spawn().map_err(|cause| BenchError::Spawn {
            what: format!("{what} ({})", program.display()),
            cause,
        })?;
        let pid = child.id();
        let output: Pin<Box<dyn AsyncRead + Send>> = if addr_on_stderr {
            match child.stderr.take() {
                Some(err) => Box::pin(err),
                None => return Err(BenchError::Setup("no stderr from the server".into())),
            }
        } else {
            match child.stdout.take() {
                Some(out) => Box::pin(out),
                None => return Err(BenchError::Setup("no stdout from the server".into())),
            }
        };
        let mut lines = BufReader::new(output).lines();
        let found = tokio::time::timeout(Duration::from_secs(options.setup_timeout), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = parse_listening(&line) {
                    return Some(addr);
                }
            }
            None
        })
        .await;
        let addr = match found {
            Ok(Some(addr)) => addr,
            _ => {
                let _ = child.kill().await;
                return Err(BenchError::NoListen {
                    what: what.to_owned(),
                    log: tail(&log),
                });
            }
        };
        // Keep reading so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tracing::debug!(what, %addr, ?pid, "server started");
        Ok(Self {
            addr,
            pid,
            child: Some(child),
            data_dir: Some(dir),
            log: Some(log),
            drain: Some(drain),
            quota: None,
        })
    }

    /// Holds the server to `cores` of one core's time (a CFS bandwidth
    /// quota, see [`CpuQuota`]), so that several servers sharing the
    /// machine's cores each get the same fixed slice, as if each had a
    /// (smaller) core of its own.
    ///
    /// # Errors
    /// [`BenchError::Setup`] if the pid is unknown or the kernel's `cpu`
    /// cgroup controller cannot be written (not root, no cgroup fs).
    pub fn limit_cpu(&mut self, cores: f64) -> Result<(), BenchError> {
        let pid = self
            .pid
            .ok_or_else(|| BenchError::Setup("the server's pid is unknown".into()))?;
        self.quota = Some(CpuQuota::apply(pid, cores)?);
        Ok(())
    }

    /// A reader of the server's `/proc` figures, if its pid is known.
    pub async fn proc(&self) -> Option<ProcReader> {
        match self.pid {
            Some(pid) => Some(ProcReader::new(pid).await),
            None => None,
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and removes its
    /// data directory.
    pub async fn stop(mut self) {
        super::secure::unregister(self.addr);
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(drain) = self.drain.take() {
            drain.abort();
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.log.as_deref().map(tail).unwrap_or_default()
    }
}

/// A CPU bandwidth limit on one process: a cgroup of the kernel's `cpu`
/// controller with a CFS quota of `cores` × a 10 ms period (cgroup v1
/// `cpu.cfs_quota_us` / `cpu.cfs_period_us`, or v2 `cpu.max`; see the
/// kernel's Documentation/scheduler/sched-bwc.rst). The process (all its
/// threads) is moved into the group; the group is removed on drop, which
/// succeeds once the process has exited.
#[derive(Debug)]
pub struct CpuQuota {
    dir: PathBuf,
}

/// The CFS period of a [`CpuQuota`], in µs: short, so a throttled server
/// waits at most this long for its next slice.
const QUOTA_PERIOD_US: u64 = 10_000;

static QUOTA_SEQ: AtomicU64 = AtomicU64::new(0);

impl CpuQuota {
    /// Limits `pid` to `cores` of one core's time (0.2: 2 ms of every
    /// 10 ms; at least 1 ms, the kernel's smallest quota).
    ///
    /// # Errors
    /// [`BenchError::Setup`] naming the file that could not be written
    /// (the benchmark must run as root, with the `cpu` controller
    /// mounted).
    pub fn apply(pid: u32, cores: f64) -> Result<Self, BenchError> {
        let quota_us = ((cores * QUOTA_PERIOD_US as f64) as u64).max(1_000);
        let name = format!(
            "streamhub-bench-{}-{}",
            std::process::id(),
            QUOTA_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let write = |path: PathBuf, value: String| {
            std::fs::write(&path, value).map_err(|e| {
                BenchError::Setup(format!(
                    "cannot limit the server's CPU: writing {}: {e} (needs root and the cgroup cpu controller)",
                    path.display()
                ))
            })
        };
        let dir = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                BenchError::Setup(format!("cannot create the cgroup {}: {e}", dir.display()))
            })?;
            write(dir.join("cpu.cfs_period_us"), QUOTA_PERIOD_US.to_string())?;
            write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
            dir
        } else {
            // Let the root's children use the cpu controller (already so
            // on most systems; an error here shows when writing cpu.max).
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+cpu");
            let dir = v2.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                BenchError::Setup(format!("cannot create the cgroup {}: {e}", dir.display()))
            })?;
            write(dir.join("cpu.max"), format!("{quota_us} {QUOTA_PERIOD_US}"))?;
            dir
        };
        let quota = Self { dir };
        write(quota.dir.join("cgroup.procs"), pid.to_string())?;
        Ok(quota)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(8);
    if lines.is_empty() {
        String::new()
    } else {
        format!("; its log ends:\n{}", lines[start..].join("\n"))
    }
}

/// Finds the address in a server's "listening" line: streamhub's and the
/// peers' `listening on ADDR`, nats-server's `Listening for client
/// connections on ADDR`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    if !line.to_ascii_lowercase().contains("listening") {
        return None;
    }
    line.split_whitespace().last()?.parse().ok()
}

/// A fresh scratch folder for one server of this run.
pub fn bench_dir(what: &str) -> Result<PathBuf, BenchError> {
    bench_dir_in(&std::env::temp_dir(), what)
}

/// A fresh scratch folder under `parent`.
pub fn bench_dir_in(parent: &Path, what: &str) -> Result<PathBuf, BenchError> {
    let n = SERVER_SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!("streamhub-bench-{}-{what}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The program and arguments that start `target` on port 0.
fn target_command(
    target: Target,
    options: &Options,
    data_dir: &Path,
) -> Result<(PathBuf, Vec<String>), BenchError> {
    let data = data_dir.display().to_string();
    match target {
        Target::Streamhub => {
            let exe = std::env::current_exe()?;
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                data,
                "--drain-timeout".into(),
                "2s".into(),
                // Only the benchmark's own samples: no self-reporting.
                "--set".into(),
                "telemetry.self_sample_interval=0s".into(),
                // Let subscribers ask for any interval (the latency and
                // fan-out scenarios ask for 1 ms).
                "--set".into(),
                "telemetry.min_interval=1ms".into(),
            ];
            for url in &options.cluster_nats {
                args.push("--cluster".into());
                args.push(url.clone());
            }
            for setting in &options.server_set {
                args.push("--set".into());
                args.push(setting.clone());
            }
            Ok((exe, args))
        }
        Target::Python => {
            let python = options.peers_dir.join("python/.venv/bin/python");
            let script = options.peers_dir.join("python/server.py");
            if !python.exists() || !options.peers_dir.join("python/gen").exists() {
                return Err(BenchError::Setup(format!(
                    "the Python peer is not set up ({} missing): run bench/peers/setup.sh",
                    python.display()
                )));
            }
            Ok((
                python,
                vec![
                    script.display().to_string(),
                    "--port".into(),
                    "0".into(),
                    "--data-dir".into(),
                    data,
                ],
            ))
        }
        Target::Node => {
            let script = options.peers_dir.join("node/server.js");
            if !options.peers_dir.join("node/node_modules").exists() {
                return Err(BenchError::Setup(
                    "the Node peer is not set up (node_modules missing): run bench/peers/setup.sh"
                        .into(),
                ));
            }
            Ok((
                PathBuf::from("node"),
                vec![
                    script.display().to_string(),
                    "--port".into(),
                    "0".into(),
                    "--data-dir".into(),
                    data,
                ],
            ))
        }
        Target::Nats => Err(BenchError::Setup(
            "nats-server is started by the fan-out scenario itself".into(),
        )),
    }
}

/// Bytes read and written on the connections that share it.
#[derive(Debug, Clone, Default)]
pub struct WireCounter {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl WireCounter {
    /// Bytes received plus bytes sent so far.
    pub fn total(&self) -> u64 {
        self.read.load(Ordering::Relaxed) + self.written.load(Ordering::Relaxed)
    }
}

/// A TCP stream that counts the bytes through it (HTTP/2 frames and TLS
/// records if any; not TCP/IP headers).
#[derive(Debug)]
pub struct CountingStream {
    inner: TcpStream,
    counter: WireCounter,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counter.read.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.counter.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            self.counter.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A tonic connector whose connections count their bytes.
#[derive(Debug, Clone)]
pub struct CountingConnector {
    counter: WireCounter,
}

impl tower::Service<Uri> for CountingConnector {
    type Response = TokioIo<CountingStream>;
    type Error = io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let counter = self.counter.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let inner = TcpStream::connect((host.as_str(), port)).await?;
            inner.set_nodelay(true)?;
            Ok(TokioIo::new(CountingStream { inner, counter }))
        })
    }
}

/// Opens one HTTP/2 connection to `addr` whose bytes go to `counter`.
///
/// A server started with `--secure` is reached over `https://`, its
/// certificate checked against its throwaway CA, and every call carries
/// its token (see [`super::secure`]).
pub async fn connect(addr: SocketAddr, counter: &WireCounter) -> Result<BenchChannel, BenchError> {
    let security = super::secure::lookup(addr);
    let scheme = if security.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| BenchError::Setup(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(10));
    if let Some(security) = &security {
        endpoint = endpoint.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&security.ca_pem))
                .domain_name(super::secure::SERVER_NAME),
        )?;
    }
    let channel = endpoint
        .connect_with_connector(CountingConnector {
            counter: counter.clone(),
        })
        .await?;
    let bearer = super::secure::Bearer(security.map(|s| s.authorization.clone()));
    Ok(InterceptedService::new(channel, bearer))
}

/// A connection of the load generator: a tonic channel whose calls carry
/// the server's token, if it has one.
pub type BenchChannel = InterceptedService<Channel, super::secure::Bearer>;

/// A LiveFeed stream the scenarios publish samples through.
pub struct Publisher {
    tx: mpsc::Sender<MetricsPayload>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Opens a LiveFeed call on `channel`.
    ///
    /// The call runs in its own task: some servers send response headers
    /// only with their first alert, and the payloads must flow before that.
    pub fn open(channel: BenchChannel) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let mut client = TelemetryServiceClient::new(channel);
            match client.live_feed(ReceiverStream::new(rx)).await {
                Ok(response) => {
                    let mut alerts = response.into_inner();
                    while let Ok(Some(_)) = alerts.message().await {}
                }
                Err(status) => tracing::warn!(%status, "LiveFeed refused"),
            }
        });
        Self { tx, task }
    }

    /// Publishes the sample numbered `seq` (carried in `request_count`).
    pub async fn publish(&self, seq: u64) -> Result<(), BenchError> {
        let payload = MetricsPayload {
            service_name: BENCH_SERVICE.to_owned(),
            // Below every alert threshold: no alerts, only samples.
            cpu_usage: 10.0 + (seq % 50) as f64,
            memory_mb: 512.0,
            timestamp_ms: 0,
            request_count: seq,
        };
        self.tx
            .send(payload)
            .await
            .map_err(|_| BenchError::Setup("the LiveFeed call ended".into()))
    }

    /// Half-closes the call and waits briefly for it to end.
    pub async fn close(self) {
        drop(self.tx);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// A latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    // 3 significant digits, growing as needed; cannot fail for sigfig 3.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
}

/// Records `d` into `h`, in microseconds.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    // `record` grows the histogram as needed; `saturating_record` would
    // clamp to its current range instead.
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
}

/// p50, p99, max and mean of `h`, in microseconds, under `prefix`.
pub fn latency_metrics(prefix: &str, h: &Histogram<u64>) -> Metrics {
    let mut m = Metrics::new();
    if h.is_empty() {
        return m;
    }
    m.insert(format!("{prefix}_p50_us"), h.value_at_quantile(0.5) as f64);
    m.insert(format!("{prefix}_p99_us"), h.value_at_quantile(0.99) as f64);
    m.insert(format!("{prefix}_max_us"), h.max() as f64);
    m.insert(format!("{prefix}_mean_us"), h.mean());
    m.insert(format!("{prefix}_count"), h.len() as f64);
    m
}

/// Named figures of one run.
pub type Metrics = BTreeMap<String, f64>;

/// Runs one measurement `times` times (`run` gets the repetition's index)
/// and collects the metrics; the first error ends the repetitions.
pub async fn repeat<F, Fut>(times: usize, mut run: F) -> Result<Vec<Metrics>, BenchError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Metrics, BenchError>>,
{
    let mut runs = Vec::with_capacity(times);
    for rep in 0..times {
        runs.push(run(rep).await?);
    }
    Ok(runs)
}

/// The median of each metric over the runs (metrics missing from some runs
/// are the median of the runs that have them).
pub fn medians(runs: &[Metrics]) -> Metrics {
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let mut values: Vec<f64> = runs.iter().filter_map(|r| r.get(name).copied()).collect();
            (name.clone(), median(&mut values))
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One configuration measured against one target, with its repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The server measured (`streamhub`, `python`, `node`, `nats`, `tcp`).
    pub target: String,
    /// What was varied, e.g. `{"mode": "polling", "variant": "quiet"}`.
    pub config: BTreeMap<String, String>,
    /// Median of every metric over the repetitions.
    pub median: Metrics,
    /// Every repetition's metrics.
    pub runs: Vec<Metrics>,
    /// Why this row could not be measured, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Row {
    /// A row from its repetitions.
    pub fn new(target: &str, config: &[(&str, String)], runs: Vec<Metrics>) -> Self {
        Self {
            target: target.to_owned(),
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            median: medians(&runs),
            runs,
            error: None,
        }
    }

    /// A row that failed with `error`.
    pub fn failed(target: &str, config: &[(&str, String)], error: &BenchError) -> Self {
        let mut row = Self::new(target, config, Vec::new());
        row.error = Some(error.to_string());
        row
    }

    /// A row from its repetitions, or from the error that stopped them.
    pub fn of(
        target: &str,
        config: &[(&str, String)],
        runs: Result<Vec<Metrics>, BenchError>,
    ) -> Self {
        match runs {
            Ok(runs) => Self::new(target, config, runs),
            Err(err) => Self::failed(target, config, &err),
        }
    }

    /// The median of `metric`, if measured.
    pub fn get(&self, metric: &str) -> Option<f64> {
        self.median.get(metric).copied().filter(|v| v.is_finite())
    }

    /// Whether this row's config has `key` = `value`.
    pub fn is(&self, key: &str, value: &str) -> bool {
        self.config.get(key).is_some_and(|v| v == value)
    }
}

/// A target from the issue, checked against the measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is checked, in words.
    pub name: String,
    /// The goal, e.g. `>= 5`.
    pub goal: String,
    /// The measured value, if both sides were measured.
    pub value: Option<f64>,
    /// Whether the goal is met (false when not measured).
    pub met: bool,
}

impl Check {
    /// `value` must be at least `goal`.
    pub fn at_least(name: impl Into<String>, value: Option<f64>, goal: f64) -> Self {
        Self {
            name: name.into(),
            goal: format!(">= {goal}"),
            value,
            met: value.is_some_and(|v| v >= goal),
        }
    }

    /// `value` must be at most `goal`.
    pub fn at_most(name: impl Into<String>, value: Option<f64>, goal: f64) -> Self {
        Self {
            name: name.into(),
            goal: format!("<= {goal}"),
            value,
            met: value.is_some_and(|v| v <= goal),
        }
    }
}

/// `a / b` when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// Everything one `streamhub bench SCENARIO` run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
    /// The machine.
    pub machine: Machine,
    /// Cores used by the server and the load.
    pub pinning: Pinning,
    /// The scenario's parameters.
    pub settings: serde_json::Value,
    /// The command line that produced this report.
    pub command: String,
    /// One row per configuration and target.
    pub rows: Vec<Row>,
    /// The targets, checked.
    pub checks: Vec<Check>,
}

impl Report {
    /// Writes the report as pretty JSON to `path`, creating its folder.
    pub fn write(&self, path: &Path) -> Result<(), BenchError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n")?;
        Ok(())
    }

    /// A readable summary: one line per row with its main figures, then
    /// the checks.
    pub fn summary(&self, keys: &[&str]) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "== {} ({} rows, {:.1} s; server cpus {:?}, load cpus {:?})\n",
            self.scenario,
            self.rows.len(),
            self.elapsed_s,
            self.pinning.server,
            self.pinning.load
        );
        for row in &self.rows {
            let config: Vec<String> = row.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(out, "{:<10} {:<32}", row.target, config.join(" "));
            if let Some(err) = &row.error {
                let _ = write!(out, " ERROR: {err}");
            } else {
                for key in keys {
                    if let Some(v) = row.get(key) {
                        let _ = write!(out, " {key}={}", fmt_num(v));
                    }
                }
            }
            out.push('\n');
        }
        for check in &self.checks {
            let _ = writeln!(
                out,
                "[{}] {}: {} (goal {})",
                if check.met { "met" } else { "MISSED" },
                check.name,
                check
                    .value
                    .map_or_else(|| "not measured".to_owned(), fmt_num),
                check.goal
            );
        }
        out
    }
}

/// A number with sensible precision for a summary line.
pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Seconds since `start`, as a float.
pub fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
        let runs = vec![
            Metrics::from([("a".to_owned(), 1.0)]),
            Metrics::from([("a".to_owned(), 5.0), ("b".to_owned(), 2.0)]),
            Metrics::from([("a".to_owned(), 3.0)]),
        ];
        let m = medians(&runs);
        assert_eq!(m["a"], 3.0);
        assert_eq!(m["b"], 2.0);
    }

    #[test]
    fn listening_lines_of_every_server() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert_eq!(
            parse_listening("streamhub listening on 127.0.0.1:4000"),
            Some(addr)
        );
        assert_eq!(parse_listening("listening on 127.0.0.1:4000"), Some(addr));
        assert_eq!(
            parse_listening("[7] [INF] Listening for client connections on 127.0.0.1:4000"),
            Some(addr)
        );
        assert_eq!(parse_listening("starting"), None);
    }

    #[test]
    fn own_process_stats_are_readable() {
        let reader = ProcReader {
            pids: vec![std::process::id()],
            ticks_per_s: 100,
        };
        let stats = reader.read().expect("own /proc entry");
        assert!(stats.rss_kib > 0);
        assert!(stats.hwm_kib >= stats.rss_kib);
    }
}
