//! Scenario 3, upload: single-stream throughput of FileUploadService.Upload
//! for chunk sizes from 16 KiB to 1 MiB, SHA-256 and fsync included (the
//! server hashes and fsyncs before it answers), with the data directory on
//! disk and on tmpfs, next to the two limits measured in the same run: raw
//! TCP over loopback (iperf3, one stream) and the disk's durable write rate
//! (`dd conv=fsync`); and the server's peak memory during one multi-GiB
//! upload.
//!
//! Two more references show what one core allows of the server's own
//! per-byte work without any network: SHA-256 alone over bytes in memory,
//! and streamhub's upload store (hash, write, fsync) fed from memory. Both
//! run in the load generator, so on its core: the same model as the
//! server's, idle while they run.
//!
//! Every upload of a server reuses one file name, so the stored file is
//! replaced each time and the data directory never holds more than one
//! file and one partial upload.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{process::Command, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

use sha2::{Digest as _, Sha256};

use super::{
    BenchError, Options, Target,
    harness::{
        Check, Metrics, Pinning, ProcReader, Row, ServerUnderTest, WireCounter, bench_dir_in,
        connect, cpu_delta_us, ratio, repeat,
    },
};
use crate::{
    config::UploadConfig,
    proto::fileupload::{FileChunk, file_upload_service_client::FileUploadServiceClient},
    upload::{Store, store::WRITE_BATCH},
};

/// The chunk size the CLI uses by default, where the targets are checked.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the scenario.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let data = Arc::new(pattern(4 * 1024 * 1024 + 7));
    let size = options.upload_mib * 1024 * 1024;
    let places = [
        ("disk", options.disk_dir.clone()),
        ("tmpfs", options.tmpfs_dir.clone()),
    ];
    let mut rows = Vec::new();

    // The limits.
    let loopback = [("storage", "loopback".to_owned())];
    rows.push(Row::of("iperf3", &loopback, iperf3(options, pinning).await));
    for (storage, dir) in &places {
        let place = [("storage", (*storage).to_owned())];
        let runs =
            after_warm_up(options.repetitions, || dd(dir, options.upload_mib, pinning)).await;
        rows.push(Row::of("dd", &place, runs));
    }

    // The server's per-byte work on one core, without the network.
    let memory = [("storage", "memory".to_owned())];
    let runs = repeat(options.repetitions, |_| sha256_alone(size, &data)).await;
    rows.push(Row::of("sha256", &memory, runs));
    for (storage, dir) in &places {
        let runs = after_warm_up(options.repetitions, || {
            store_alone(dir, size, DEFAULT_CHUNK, &data)
        })
        .await;
        rows.push(Row::of("store", &config(storage, DEFAULT_CHUNK), runs));
    }

    // Throughput per target, storage and chunk size.
    for &target in options.targets.iter().filter(|t| **t != Target::Nats) {
        for (storage, dir) in &places {
            let server = match start_in(target, options, pinning, dir).await {
                Ok(server) => server,
                Err(err) => {
                    for &chunk in &options.chunk_sizes {
                        rows.push(Row::failed(target.name(), &config(storage, chunk), &err));
                    }
                    continue;
                }
            };
            let proc = server.proc().await;
            // Warm-up, as for dd: one unmeasured upload at the default chunk.
            if let Err(err) = upload(server.addr, proc.as_ref(), size, DEFAULT_CHUNK, &data).await {
                tracing::warn!(target = target.name(), %err, "warm-up upload failed");
            }
            for &chunk in &options.chunk_sizes {
                tracing::info!(target = target.name(), storage, chunk, "upload runs");
                let runs = repeat(options.repetitions, |_| async {
                    settle().await;
                    upload(server.addr, proc.as_ref(), size, chunk, &data).await
                })
                .await;
                rows.push(Row::of(target.name(), &config(storage, chunk), runs));
            }
            server.stop().await;
        }
    }

    // Peak memory during one big upload, on a fresh server on disk.
    let big = options.big_upload_mib * 1024 * 1024;
    for &target in options.targets.iter().filter(|t| **t != Target::Nats) {
        let config = [
            ("storage", "disk".to_owned()),
            ("chunk", chunk_name(DEFAULT_CHUNK)),
            ("file", format!("{} MiB", options.big_upload_mib)),
        ];
        tracing::info!(
            target = target.name(),
            mib = options.big_upload_mib,
            "big upload"
        );
        let result = async {
            let server = start_in(target, options, pinning, &options.disk_dir).await?;
            let proc = server.proc().await;
            settle().await;
            let result = upload(server.addr, proc.as_ref(), big, DEFAULT_CHUNK, &data).await;
            server.stop().await;
            result
        }
        .await;
        rows.push(Row::of(target.name(), &config, result.map(|m| vec![m])));
    }

    let checks = checks(&rows, options);
    let settings = serde_json::json!({
        "file_mib": options.upload_mib,
        "chunk_sizes": options.chunk_sizes,
        "default_chunk": DEFAULT_CHUNK,
        "big_upload_mib": options.big_upload_mib,
        "disk_dir": options.disk_dir,
        "disk_fs": fs_type(&options.disk_dir).await,
        "tmpfs_dir": options.tmpfs_dir,
        "tmpfs_fs": fs_type(&options.tmpfs_dir).await,
        "iperf3_seconds": options.iperf_seconds,
        "repetitions": options.repetitions,
        "client_sends_sha256": false,
    });
    Ok((settings, rows, checks))
}

fn chunk_name(chunk: usize) -> String {
    if chunk.is_multiple_of(1024 * 1024) {
        format!("{}MiB", chunk / (1024 * 1024))
    } else {
        format!("{}KiB", chunk / 1024)
    }
}

fn config(storage: &str, chunk: usize) -> [(&'static str, String); 2] {
    [
        ("storage", storage.to_owned()),
        ("chunk", chunk_name(chunk)),
    ]
}

fn checks(rows: &[Row], options: &Options) -> Vec<Check> {
    let get = |target: &str, storage: &str, chunk: Option<usize>, key: &str| {
        rows.iter()
            .find(|r| {
                r.target == target
                    && r.is("storage", storage)
                    && chunk.is_none_or(|c| r.is("chunk", &chunk_name(c)))
                    && !r.config.contains_key("file")
            })
            .and_then(|r| r.get(key))
    };
    let sh = |storage: &str| get("streamhub", storage, Some(DEFAULT_CHUNK), "mib_per_s");
    let mut checks = vec![
        Check::at_least(
            "disk: streamhub at 64 KiB chunks / dd conv=fsync",
            ratio(sh("disk"), get("dd", "disk", None, "mib_per_s")),
            0.9,
        ),
        Check::at_least(
            "tmpfs: streamhub at 64 KiB chunks / iperf3 single stream",
            ratio(sh("tmpfs"), get("iperf3", "loopback", None, "mib_per_s")),
            0.5,
        ),
    ];
    let big = rows
        .iter()
        .find(|r| r.target == "streamhub" && r.config.contains_key("file"))
        .and_then(|r| r.get("server_hwm_kib"))
        .map(|kib| kib / 1024.0);
    checks.push(Check::at_most(
        format!(
            "server peak memory (MiB) over a {} MiB upload",
            options.big_upload_mib
        ),
        big,
        64.0,
    ));
    for peer in ["python", "node"] {
        for storage in ["disk", "tmpfs"] {
            checks.push(Check::at_least(
                format!("{storage}: streamhub / {peer} throughput at 64 KiB (ahead of the peer)"),
                ratio(
                    sh(storage),
                    get(peer, storage, Some(DEFAULT_CHUNK), "mib_per_s"),
                ),
                1.0,
            ));
        }
    }
    checks
}

/// Uploads `--upload-mib` at the default chunk size `--repetitions` times
/// (after one unmeasured upload) to one fresh streamhub whose data
/// directory is under `parent` (the "security" scenario's upload part).
pub async fn measure_default_chunk(
    options: &Options,
    pinning: &Pinning,
    parent: &Path,
) -> Result<Vec<Metrics>, BenchError> {
    let data = Arc::new(pattern(4 * 1024 * 1024 + 7));
    let size = options.upload_mib * 1024 * 1024;
    let server = start_in(Target::Streamhub, options, pinning, parent).await?;
    let proc = server.proc().await;
    if let Err(err) = upload(server.addr, proc.as_ref(), size, DEFAULT_CHUNK, &data).await {
        tracing::warn!(%err, "warm-up upload failed");
    }
    let runs = repeat(options.repetitions, |_| async {
        settle().await;
        upload(server.addr, proc.as_ref(), size, DEFAULT_CHUNK, &data).await
    })
    .await;
    server.stop().await;
    runs
}

async fn start_in(
    target: Target,
    options: &Options,
    pinning: &Pinning,
    parent: &Path,
) -> Result<ServerUnderTest, BenchError> {
    let dir = bench_dir_in(parent, target.name())?;
    ServerUnderTest::start_with_dir(target, options, pinning, dir).await
}

/// Bytes that do not compress to nothing (xorshift).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Uploads `size` bytes in `chunk`-byte chunks; times it from the first
/// chunk to the server's answer.
async fn upload(
    addr: SocketAddr,
    proc: Option<&ProcReader>,
    size: u64,
    chunk: usize,
    data: &Arc<Vec<u8>>,
) -> Result<Metrics, BenchError> {
    let channel = connect(addr, &WireCounter::default()).await?;
    let mut client = FileUploadServiceClient::new(channel)
        .max_encoding_message_size(chunk + 64 * 1024)
        .max_decoding_message_size(4 * 1024 * 1024);
    let chunk = chunk.max(1);
    let chunks = size.div_ceil(chunk as u64).max(1);
    let (tx, rx) = mpsc::channel::<FileChunk>(16);
    let data = Arc::clone(data);
    let producer = tokio::spawn(async move {
        for i in 0..chunks {
            let message = FileChunk {
                filename: if i == 0 {
                    "bench-upload.bin".to_owned()
                } else {
                    String::new()
                },
                data: piece(&data, size, chunk, i).to_vec(),
                chunk_index: u32::try_from(i).unwrap_or(u32::MAX),
                is_last: i + 1 == chunks,
                offset: None,
                sha256: Vec::new(),
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    let before = proc.map(ProcReader::read).transpose()?;
    let started = Instant::now();
    let response = client.upload(ReceiverStream::new(rx)).await;
    let seconds = started.elapsed().as_secs_f64();
    let after = proc.map(ProcReader::read).transpose()?;
    producer.abort();
    let response = response?.into_inner();
    if !response.success || response.total_bytes != size {
        return Err(BenchError::Setup(format!(
            "upload not stored: {} ({} of {size} bytes)",
            response.message, response.total_bytes
        )));
    }
    let mut m = throughput(size, seconds);
    m.insert("bytes".into(), size as f64);
    m.insert("chunks".into(), chunks as f64);
    if let (Some(b), Some(a)) = (before, after) {
        m.insert(
            "server_cpu_pct".into(),
            cpu_delta_us(&b, &a) / 1e4 / seconds,
        );
        m.insert("server_hwm_kib".into(), a.hwm_kib as f64);
    }
    Ok(m)
}

/// `seconds` and `mib_per_s` of `bytes` moved in `seconds`.
fn throughput(bytes: u64, seconds: f64) -> Metrics {
    let mut m = Metrics::new();
    m.insert("seconds".into(), seconds);
    m.insert("mib_per_s".into(), bytes as f64 / MIB / seconds);
    m
}

/// Chunk `i` of a `size`-byte file cut in `chunk`-byte chunks: bytes of
/// `data` from a place that moves with `i`.
fn piece(data: &[u8], size: u64, chunk: usize, i: u64) -> &[u8] {
    let window = data.len() - chunk.min(data.len());
    let start = usize::try_from(i).unwrap_or(0).wrapping_mul(7919) % window.max(1);
    let len =
        usize::try_from(size.saturating_sub(i * chunk as u64).min(chunk as u64)).unwrap_or(chunk);
    &data[start..start + len.min(data.len() - start)]
}

/// SHA-256 over `size` bytes in memory, in slices of the store's write
/// batch, on one thread of the load generator.
async fn sha256_alone(size: u64, data: &Arc<Vec<u8>>) -> Result<Metrics, BenchError> {
    let data = Arc::clone(data);
    let seconds = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut hasher = Sha256::new();
        let slice = WRITE_BATCH.min(data.len()) as u64;
        let mut left = size;
        while left > 0 {
            let n = left.min(slice);
            hasher.update(&data[..usize::try_from(n).unwrap_or(0)]);
            left -= n;
        }
        std::hint::black_box(hasher.finalize());
        started.elapsed().as_secs_f64()
    })
    .await
    .map_err(|e| BenchError::Setup(format!("the hashing thread failed: {e}")))?;
    Ok(throughput(size, seconds))
}

/// streamhub's upload store alone: `size` bytes in `chunk`-byte chunks,
/// each copied into a fresh buffer as decoding a `FileChunk` does, hashed,
/// written and fsynced by the store's writer thread, as an upload to the
/// server would be, with no network in between.
async fn store_alone(
    dir: &Path,
    size: u64,
    chunk: usize,
    data: &Arc<Vec<u8>>,
) -> Result<Metrics, BenchError> {
    let dir = bench_dir_in(dir, "store")?;
    let failed = |e: crate::upload::UploadError| BenchError::Setup(format!("store: {e}"));
    let result = async {
        let store = Store::open(&dir, UploadConfig::default()).map_err(failed)?;
        let chunk = chunk.max(1);
        let chunks = size.div_ceil(chunk as u64).max(1);
        let started = Instant::now();
        let mut upload = store.begin("bench-upload.bin", 0).await.map_err(failed)?;
        for i in 0..chunks {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            upload
                .write(index, piece(data, size, chunk, i).to_vec())
                .await
                .map_err(failed)?;
        }
        let stored = upload.finish(None).await.map_err(failed)?;
        let seconds = started.elapsed().as_secs_f64();
        if stored.size != size {
            return Err(BenchError::Setup(format!(
                "store kept {} of {size} bytes",
                stored.size
            )));
        }
        let mut m = throughput(size, seconds);
        m.insert("bytes".into(), size as f64);
        Ok(m)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs `measure` once unmeasured, then `times` times after [`settle`]:
/// the first large write of a run is slow (the kernel finds and zeroes
/// fresh pages), whoever makes it.
async fn after_warm_up<F, Fut>(times: usize, mut measure: F) -> Result<Vec<Metrics>, BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Metrics, BenchError>>,
{
    measure().await?;
    repeat(times, |_| {
        let run = measure();
        async {
            settle().await;
            run.await
        }
    })
    .await
}

/// Flushes every dirty page of the machine (`sync`) before a measured
/// write, so no run pays for the writeback of the one before it.
async fn settle() {
    let synced = Command::new("sync").status().await;
    if !synced.is_ok_and(|s| s.success()) {
        tracing::warn!("sync failed; the next write may pay for earlier writeback");
    }
}

/// The disk's durable write rate: `dd` of `mib` MiB with `conv=fsync`,
/// pinned like the server.
async fn dd(dir: &Path, mib: u64, pinning: &Pinning) -> Result<Metrics, BenchError> {
    let dir = bench_dir_in(dir, "dd")?;
    let file = dir.join("dd.bin");
    let mut command = pinned(pinning, "dd");
    command
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args([
            "bs=1M",
            &format!("count={mib}"),
            "conv=fsync",
            "status=none",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = command.output().await?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    if !output.status.success() {
        return Err(BenchError::Setup(format!(
            "dd failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(throughput(mib * 1024 * 1024, seconds))
}

/// A command run on the server's cores when pinning.
fn pinned(pinning: &Pinning, program: &str) -> Command {
    match &pinning.server {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Raw TCP over loopback, one stream: iperf3's server pinned like ours,
/// its client on the load's cores.
async fn iperf3(options: &Options, pinning: &Pinning) -> Result<Vec<Metrics>, BenchError> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let mut server = pinned(pinning, "iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                BenchError::Setup("iperf3 is not installed (apt-get install -y iperf3)".into())
            }
            _ => BenchError::Io(e),
        })?;
    let runs = repeat(options.repetitions, |_| {
        iperf3_client(port, options.iperf_seconds)
    })
    .await;
    let _ = server.kill().await;
    runs
}

async fn iperf3_client(port: u16, seconds: f64) -> Result<Metrics, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J", "-t"])
            .arg(format!("{}", seconds.max(1.0).round()))
            .output()
            .await?;
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        if let Some(bps) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            let mut m = Metrics::new();
            m.insert("mib_per_s".into(), bps / 8.0 / MIB);
            return Ok(m);
        }
        // The server may not listen yet.
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&output.stdout)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The file system type of `dir` (`tmpfs`, `ext2/ext3`, ...).
async fn fs_type(dir: &PathBuf) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .await
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned())
}
