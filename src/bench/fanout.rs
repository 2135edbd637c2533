//! Scenario 2, fan-out: one LiveFeed publisher, N subscribers spread over
//! as many connections as `--per-connection` asks, and nats-server doing
//! the same job as the yardstick.
//!
//! Each sample carries a sequence number in `request_count`. A run:
//! 1. publishes sample 1 and opens the N subscriptions (each gets sample 1
//!    at once), and waits until all N have it: N subscriptions held;
//! 2. reads the server's memory, idle: memory per subscription is the
//!    growth since before the subscriptions, divided by N;
//! 3. rounds: one sample at a time, timed from publish to each receipt;
//!    the next only after every subscriber has it (reach p50/p99/max);
//! 4. saturation: publishes as fast as the subscribers keep up, with at
//!    most `--pipeline` samples in flight, for `--saturation` seconds:
//!    deliveries per second, and the server's CPU per delivery.
//!
//! The publisher runs on a thread of its own, with its own runtime, on the
//! load generator's cores: in real use it is a client of its own, and in
//! the subscribers' runtime each publish would wait until they had
//! processed the previous sample, so the server would sit idle between
//! samples.
//!
//! "Keeping up" is measured as progress: the sum over subscribers of the
//! newest sequence number received. A streamhub subscriber that falls
//! behind skips to the newest sample (the service's semantics), which
//! counts as progress for every sample skipped; nats-server queues every
//! message instead. Deliveries per second count messages actually
//! received.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{
    StreamExt, TryStreamExt,
    stream::{self, BoxStream, SelectAll},
};
use hdrhistogram::Histogram;
use tokio::{
    sync::{Notify, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    BenchError, Options, Target,
    harness::{
        BENCH_SERVICE, Check, Metrics, Pinning, ProcReader, ProcStats, Publisher, Row,
        ServerUnderTest, WireCounter, connect, histogram, latency_metrics, ratio, record,
    },
    nats,
};
use crate::proto::telemetry::{MetricsRequest, telemetry_service_client::TelemetryServiceClient};

/// Most samples a saturation phase may publish (bounds its memory and
/// length whatever the machine's speed).
const MAX_SATURATION_SAMPLES: u64 = 1_000_000;

/// Runs the scenario for every target and subscriber count.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut targets: Vec<Target> = options
        .targets
        .iter()
        .copied()
        .filter(|t| *t != Target::Nats)
        .collect();
    if !options.no_nats && !options.external {
        targets.push(Target::Nats);
    }
    let mut rows = Vec::new();
    for &n in &options.subscribers {
        for &target in &targets {
            let config = [("subscribers", n.to_string())];
            if matches!(target, Target::Python | Target::Node) && n > options.peer_max_subscribers {
                let err = BenchError::Setup(format!(
                    "not attempted: above --peer-max-subscribers {}",
                    options.peer_max_subscribers
                ));
                rows.push(Row::failed(target.name(), &config, &err));
                continue;
            }
            let mut runs = Vec::new();
            let mut failure = None;
            for rep in 0..options.repetitions {
                tracing::info!(target = target.name(), subscribers = n, rep, "fan-out run");
                match run_once(target, n, options, pinning).await {
                    Ok(m) => runs.push(m),
                    Err(err) => {
                        tracing::warn!(target = target.name(), subscribers = n, %err, "fan-out run failed");
                        failure = Some(err);
                        break;
                    }
                }
            }
            rows.push(match failure {
                Some(err) if runs.is_empty() => Row::failed(target.name(), &config, &err),
                _ => Row::new(target.name(), &config, runs),
            });
        }
    }
    let checks = checks(&rows, &options.subscribers);
    let settings = serde_json::json!({
        "subscribers": options.subscribers,
        "per_connection": options.per_connection,
        "python_per_connection": options.python_per_connection,
        "rounds": options.rounds,
        "saturation_s": options.saturation,
        "pipeline": options.pipeline,
        "repetitions": options.repetitions,
        "subscribe_interval_ms": 1,
        "peer_min_interval_ms": 100,
    });
    Ok((settings, rows, checks))
}

fn checks(rows: &[Row], counts: &[usize]) -> Vec<Check> {
    let get = |target: &str, n: usize, key: &str| {
        rows.iter()
            .find(|r| r.target == target && r.is("subscribers", &n.to_string()))
            .and_then(|r| r.get(key))
    };
    let mut checks = Vec::new();
    if let Some(&max) = counts.iter().max() {
        checks.push(Check::at_least(
            format!("subscriptions held (of {max})"),
            get("streamhub", max, "held"),
            100_000.0,
        ));
        checks.push(Check::at_most(
            format!("server memory per idle subscription at {max}, bytes"),
            get("streamhub", max, "mem_per_sub_bytes"),
            4096.0,
        ));
        checks.push(Check::at_most(
            format!("one sample reaching all {max}: p99 in µs"),
            get("streamhub", max, "reach_p99_us"),
            1_000_000.0,
        ));
    }
    for &n in counts {
        checks.push(Check::at_least(
            format!("{n} subscribers: deliveries/s, streamhub / nats-server"),
            ratio(
                get("streamhub", n, "deliveries_per_s"),
                get("nats", n, "deliveries_per_s"),
            ),
            0.5,
        ));
        for peer in ["python", "node"] {
            checks.push(Check::at_least(
                format!("{n} subscribers: deliveries/s, streamhub / {peer} (ahead of the peer)"),
                ratio(
                    get("streamhub", n, "deliveries_per_s"),
                    get(peer, n, "deliveries_per_s"),
                ),
                1.0,
            ));
        }
    }
    checks
}

/// What the subscriber tasks and the publisher share.
struct Shared {
    /// Sum over subscribers of the newest sequence number received.
    progress: AtomicU64,
    /// Messages received.
    messages: AtomicU64,
    /// Streams that ended with an error.
    errors: AtomicU64,
    /// When each sample was published, in ns since `base` (0: not yet).
    published: Vec<AtomicU64>,
    base: Instant,
    /// Samples below this number are timed into the rounds histogram.
    rounds_end: AtomicU64,
    /// The progress the publisher waits for (`u64::MAX` while it waits
    /// for none): subscribers wake it only once that is reached, not on
    /// every message.
    wanted: AtomicU64,
    notify: Notify,
}

impl Shared {
    fn mark_published(&self, seq: u64) {
        if let Some(slot) = usize::try_from(seq)
            .ok()
            .and_then(|i| self.published.get(i))
        {
            let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            slot.store(ns.max(1), Ordering::Release);
        }
    }

    fn since_published(&self, seq: u64) -> Option<Duration> {
        let slot = self.published.get(usize::try_from(seq).ok()?)?;
        let at = slot.load(Ordering::Acquire);
        (at != 0).then(|| self.base.elapsed().saturating_sub(Duration::from_nanos(at)))
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::Acquire)
    }
}

/// The publishing side, whatever the server.
enum FanPublisher {
    Grpc(Publisher),
    Nats(async_nats::Client),
}

impl FanPublisher {
    async fn publish(&self, shared: &Shared, seq: u64) -> Result<(), BenchError> {
        shared.mark_published(seq);
        match self {
            Self::Grpc(p) => p.publish(seq).await,
            Self::Nats(c) => nats::publish(c, seq).await,
        }
    }
}

/// A connection the subscriptions of one group share, kept open until the
/// run ends.
enum Conn {
    Grpc(#[allow(dead_code)] super::harness::BenchChannel), // held, not read
    Nats(#[allow(dead_code)] async_nats::Client),           // held, not read
}

async fn open_group(
    target: Target,
    addr: SocketAddr,
    count: usize,
) -> Result<(Conn, Vec<BoxStream<'static, Option<u64>>>), BenchError> {
    if target == Target::Nats {
        let client = nats::connect(addr).await?;
        let streams = nats::subscribe(&client, count).await?;
        return Ok((Conn::Nats(client), streams));
    }
    let channel = connect(addr, &WireCounter::default()).await?;
    let client = TelemetryServiceClient::new(channel.clone());
    let streams: Vec<BoxStream<'static, Option<u64>>> = stream::iter(0..count)
        .map(|_| {
            let mut client = client.clone();
            async move {
                let request = MetricsRequest {
                    service_name: BENCH_SERVICE.into(),
                    interval_ms: 1,
                };
                let updates = client.subscribe(request).await?.into_inner();
                let seqs = updates.map(|m| m.ok().map(|m| m.request_count)).boxed();
                Ok::<_, BenchError>(seqs)
            }
        })
        .buffer_unordered(512)
        .try_collect()
        .await?;
    Ok((Conn::Grpc(channel), streams))
}

/// Drives one group's subscriptions until `stop`: counts progress and
/// messages, and times the samples of the rounds.
async fn drive(
    streams: Vec<BoxStream<'static, Option<u64>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> (Histogram<u64>, Histogram<u64>) {
    let mut last = vec![0u64; streams.len()];
    let mut all: SelectAll<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.map(move |seq| (i, seq)))
        .collect();
    let mut rounds = histogram();
    let mut saturated = histogram();
    loop {
        let item = tokio::select! {
            () = stop.cancelled() => break,
            item = all.next() => item,
        };
        let Some((i, seq)) = item else { break };
        let Some(seq) = seq else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        shared.messages.fetch_add(1, Ordering::Relaxed);
        if let Some(prev) = last.get_mut(i)
            && seq > *prev
        {
            let step = seq - *prev;
            *prev = seq;
            let progress = shared.progress.fetch_add(step, Ordering::SeqCst) + step;
            if progress >= shared.wanted.load(Ordering::SeqCst) {
                shared.notify.notify_one();
            }
        }
        if seq >= 2
            && let Some(latency) = shared.since_published(seq)
        {
            if seq < shared.rounds_end.load(Ordering::Relaxed) {
                record(&mut rounds, latency);
            } else {
                record(&mut saturated, latency);
            }
        }
    }
    (rounds, saturated)
}

/// Waits until progress reaches `goal` or `limit` passes; true if reached.
async fn wait_progress(shared: &Shared, goal: u64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    // Published before progress is read, and the subscribers add to
    // progress before they read it (all sequentially consistent): either
    // this sees their progress or they see the goal and notify, and a
    // notification given before `notified()` is awaited is kept.
    shared.wanted.store(goal, Ordering::SeqCst);
    let reached = loop {
        if shared.progress.load(Ordering::SeqCst) >= goal {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::select! {
            () = shared.notify.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    };
    shared.wanted.store(u64::MAX, Ordering::SeqCst);
    reached
}

/// What the publisher does after the subscriptions are open.
struct Plan {
    /// Subscribers.
    all: u64,
    rounds: u64,
    /// Pause before each round's sample.
    gap: Duration,
    saturation: Duration,
    /// Samples in flight at most during saturation.
    pipeline: u64,
    /// Highest sample number that may be published.
    max_seq: u64,
}

/// What the saturation phase reads at its start and end.
struct Reading {
    /// The server's CPU and memory, if readable.
    server: Option<ProcStats>,
    /// This process's, the load generator's.
    load: ProcStats,
    /// Messages received.
    messages: u64,
    /// Subscribers' progress (see [`Shared::progress`]).
    progress: u64,
}

/// What the publisher measured.
struct Phases {
    /// Time for each round's sample to reach every subscriber, in ms.
    round_ms: Vec<f64>,
    /// Length of the saturation phase, in seconds.
    sat_s: f64,
    sat_before: Reading,
    sat_after: Reading,
    /// Samples published during saturation.
    published: u64,
}

/// Rounds (one sample at a time, each once every subscriber has the one
/// before), then saturation (publishing as fast as the subscribers keep
/// up, at most `pipeline` samples ahead).
async fn phases(
    publisher: Arc<FanPublisher>,
    shared: Arc<Shared>,
    plan: Plan,
    proc: Option<ProcReader>,
    load: ProcReader,
) -> Result<Phases, BenchError> {
    let reading = || -> Result<Reading, BenchError> {
        Ok(Reading {
            server: proc.as_ref().map(ProcReader::read).transpose()?,
            load: load.read()?,
            messages: shared.messages.load(Ordering::Relaxed),
            progress: shared.progress(),
        })
    };
    let mut round_ms = Vec::new();
    for seq in 2..2 + plan.rounds {
        tokio::time::sleep(plan.gap).await;
        let started = Instant::now();
        publisher.publish(&shared, seq).await?;
        if wait_progress(&shared, plan.all * seq, Duration::from_secs(30)).await {
            round_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }

    let sat_before = reading()?;
    let sat_started = Instant::now();
    let sat_end = sat_started + plan.saturation;
    let mut next = 2 + plan.rounds;
    let first = next;
    while Instant::now() < sat_end && next < plan.max_seq {
        let goal = plan.all * next.saturating_sub(plan.pipeline);
        if shared.progress() >= goal {
            publisher.publish(&shared, next).await?;
            next += 1;
        } else {
            let left = sat_end.saturating_duration_since(Instant::now());
            wait_progress(&shared, goal, left).await;
        }
    }
    let sat_s = sat_started.elapsed().as_secs_f64();
    let sat_after = reading()?;
    Ok(Phases {
        round_ms,
        sat_s,
        sat_before,
        sat_after,
        published: next - first,
    })
}

/// A thread with a runtime of its own for the publisher, on the load
/// generator's cores (it inherits their affinity).
struct PublisherThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PublisherThread {
    fn start() -> Result<Self, BenchError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-publisher".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `work` on the publisher's thread and waits for it.
    async fn run<F>(&self, work: F) -> Result<F::Output, BenchError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(work)
            .await
            .map_err(|e| BenchError::Setup(format!("the publisher's task failed: {e}")))
    }
}

impl Drop for PublisherThread {
    fn drop(&mut self) {
        // Ends the runtime's `block_on`; its remaining tasks are dropped
        // with it.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One fresh server of `target`, `n` subscribers, one measurement.
pub(crate) async fn run_once(
    target: Target,
    n: usize,
    options: &Options,
    pinning: &Pinning,
) -> Result<Metrics, BenchError> {
    let server = if target == Target::Nats {
        nats::start(options, pinning).await?
    } else {
        ServerUnderTest::start(target, options, pinning).await?
    };
    let result = measure(&server, target, n, options).await;
    if result.is_err() {
        tracing::debug!(log = %server.log_tail(), "server log");
    }
    server.stop().await;
    result
}

async fn measure(
    server: &ServerUnderTest,
    target: Target,
    n: usize,
    options: &Options,
) -> Result<Metrics, BenchError> {
    measure_on(&[server.addr], server.proc().await, target, n, options).await
}

/// Measures fan-out with the publisher on `addrs[0]` and the subscribers'
/// connections spread over `addrs` in turn (the nodes of a cluster);
/// `proc` reads the server side's CPU and memory (a group for a cluster).
pub(crate) async fn measure_on(
    addrs: &[SocketAddr],
    proc: Option<ProcReader>,
    target: Target,
    n: usize,
    options: &Options,
) -> Result<Metrics, BenchError> {
    let first = *addrs
        .first()
        .ok_or_else(|| BenchError::Setup("no server to measure".into()))?;
    let read = |p: &Option<ProcReader>| p.as_ref().map(ProcReader::read).transpose();
    // This process, the load generator: is it the one at its limit?
    let load = ProcReader::new(std::process::id()).await;
    let max_seq = 2 + options.rounds + MAX_SATURATION_SAMPLES;
    let shared = Arc::new(Shared {
        progress: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        published: (0..max_seq).map(|_| AtomicU64::new(0)).collect(),
        base: Instant::now(),
        rounds_end: AtomicU64::new(2 + options.rounds),
        wanted: AtomicU64::new(u64::MAX),
        notify: Notify::new(),
    });
    // The publisher's connection and tasks live on its own thread.
    let side = PublisherThread::start()?;
    let addr = first;
    let publisher = Arc::new(
        side.run(async move {
            Ok::<_, BenchError>(if target == Target::Nats {
                FanPublisher::Nats(nats::connect(addr).await?)
            } else {
                let channel = connect(addr, &WireCounter::default()).await?;
                FanPublisher::Grpc(Publisher::open(channel))
            })
        })
        .await??,
    );
    // gRPC subscribers get the latest sample on subscribing: publish it
    // first. nats-server keeps no latest value: publish once all listen.
    if target != Target::Nats {
        publisher.publish(&shared, 1).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = read(&proc)?;

    let setup_started = Instant::now();
    // grpcio cancels Subscribe calls beyond some hundreds per connection
    // (CANCELLED while opening); the Python peer gets narrower connections.
    let per = match target {
        Target::Python => options.python_per_connection,
        _ => options.per_connection,
    }
    .max(1);
    let sizes: Vec<usize> = (0..n.div_ceil(per)).map(|i| per.min(n - i * per)).collect();
    let connections = sizes.len();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut conns = Vec::new();
    let setup = async {
        let mut groups = stream::iter(sizes.into_iter().enumerate())
            .map(|(i, size)| open_group(target, addrs[i % addrs.len()], size))
            .buffer_unordered(4);
        while let Some(group) = groups.next().await {
            let (conn, streams) = group?;
            conns.push(conn);
            tasks.spawn(drive(streams, Arc::clone(&shared), stop.clone()));
        }
        Ok::<_, BenchError>(())
    };
    let limit = Duration::from_secs(options.setup_timeout);
    let outcome = async {
        tokio::time::timeout(limit, setup)
            .await
            .map_err(|_| BenchError::Timeout(format!("opening {n} subscriptions")))??;
        let all = u64::try_from(n).unwrap_or(u64::MAX);
        let primed = if target == Target::Nats {
            // nats-server keeps no last value, and a SUB can reach it after
            // the first publish (the subscriber's flush does not wait for
            // the server): repeat sample 1 until every subscriber has it.
            // Progress counts the highest sample seen, so repeats add none.
            let deadline = Instant::now() + limit;
            loop {
                publisher.publish(&shared, 1).await?;
                if wait_progress(&shared, all, Duration::from_millis(100)).await {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
            }
        } else {
            wait_progress(&shared, all, limit).await
        };
        if !primed {
            return Err(BenchError::Timeout(format!(
                "only {} of {n} subscribers received the first sample",
                shared.progress()
            )));
        }
        let setup_s = setup_started.elapsed().as_secs_f64();
        // Idle for a moment, then read the memory the subscriptions hold.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = read(&proc)?;

        let plan = Plan {
            all,
            rounds: options.rounds,
            gap: Duration::from_millis(target.min_interval_ms() + 20),
            saturation: Duration::from_secs_f64(options.saturation),
            pipeline: options.pipeline.max(1),
            max_seq,
        };
        let phases = side
            .run(phases(
                Arc::clone(&publisher),
                Arc::clone(&shared),
                plan,
                proc.clone(),
                load,
            ))
            .await??;
        Ok((setup_s, idle, phases))
    }
    .await;
    stop.cancel();
    let mut rounds = histogram();
    let mut saturated = histogram();
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok((r, s)) = joined {
                let _ = rounds.add(&r);
                let _ = saturated.add(&s);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    drop(conns);
    if let Some(FanPublisher::Grpc(p)) = Arc::into_inner(publisher) {
        p.close().await;
    }
    drop(side);
    let (
        setup_s,
        idle,
        Phases {
            mut round_ms,
            sat_s,
            sat_before,
            sat_after,
            published,
        },
    ) = outcome?;

    let mut m = latency_metrics("reach", &rounds);
    m.extend(latency_metrics("saturated_latency", &saturated));
    m.insert("subscribers".into(), n as f64);
    m.insert("connections".into(), connections as f64);
    m.insert("held".into(), n as f64);
    m.insert("setup_s".into(), setup_s);
    m.insert("rounds_complete".into(), round_ms.len() as f64);
    if !round_ms.is_empty() {
        m.insert("round_all_ms".into(), super::harness::median(&mut round_ms));
    }
    let messages = (sat_after.messages - sat_before.messages) as f64;
    m.insert("deliveries_per_s".into(), messages / sat_s);
    m.insert(
        "sample_deliveries_per_s".into(),
        (sat_after.progress - sat_before.progress) as f64 / sat_s,
    );
    m.insert("samples_per_s".into(), published as f64 / sat_s);
    m.insert(
        "stream_errors".into(),
        shared.errors.load(Ordering::Relaxed) as f64,
    );
    if let (Some(b), Some(i)) = (before, idle) {
        let grown = i.rss_kib.saturating_sub(b.rss_kib) as f64 * 1024.0;
        m.insert("mem_per_sub_bytes".into(), grown / n as f64);
        m.insert("server_rss_idle_kib".into(), i.rss_kib as f64);
    }
    m.insert(
        "load_cpu_pct".into(),
        super::harness::cpu_delta_us(&sat_before.load, &sat_after.load) / 1e4 / sat_s,
    );
    if let (Some(b), Some(a)) = (sat_before.server, sat_after.server) {
        let cpu_us = super::harness::cpu_delta_us(&b, &a);
        m.insert("server_cpu_pct".into(), cpu_us / 1e4 / sat_s);
        if messages > 0.0 {
            m.insert("cpu_ns_per_delivery".into(), cpu_us * 1000.0 / messages);
        }
        m.insert("server_hwm_kib".into(), a.hwm_kib as f64);
    }
    Ok(m)
}
