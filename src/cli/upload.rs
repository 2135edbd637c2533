//! Upload subcommands: `upload` (resumable, with a progress bar),
//! `files` and `download` (verified against the stored SHA-256).

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Status};

use super::Channel;

use super::{Backoff, Context, format_ms, out, status_error, terminal_safe};
use crate::proto::fileupload::{
    DownloadRequest, FileChunk, ListFilesRequest, QueryUploadRequest, UploadResponse,
    file_upload_service_client::FileUploadServiceClient,
};

/// Largest chunk the CLI sends: fits the server's default message limit
/// (4 MiB + 64 KiB) with room for the other fields.
pub const MAX_CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// Largest message the CLI accepts or sends.
const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 64 * 1024;

/// Parses a byte size such as `65536`, `64KiB`, `64k`, `1MiB` or `1M`
/// (K and M are binary: 1024 and 1024²).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 64KiB or 1MiB"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?}; use KiB or MiB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn chunk_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size == 0 || size > MAX_CHUNK_SIZE {
        return Err(format!(
            "the chunk size must be 1 byte to 4 MiB, not {text}"
        ));
    }
    Ok(size)
}

fn client(channel: Channel) -> FileUploadServiceClient<Channel> {
    FileUploadServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Arguments of `streamhub upload`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The file to upload.
    pub file: PathBuf,
    /// Name to store it under [default: the file's own name].
    #[arg(long)]
    pub name: Option<String>,
    /// Bytes per chunk, e.g. 64KiB or 1MiB (at most 4 MiB).
    #[arg(long, default_value = "64KiB", value_parser = chunk_size, env = "STREAMHUB_CHUNK_SIZE")]
    pub chunk_size: u64,
    /// Start over even if the server holds part of this upload.
    #[arg(long)]
    pub restart: bool,
    /// How many times to reconnect and resume after a lost connection.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
}

/// The result line of `streamhub upload`.
#[derive(Debug, Serialize)]
struct UploadView {
    filename: String,
    total_bytes: u64,
    total_chunks: u32,
    sha256: String,
    resumed_from: u64,
    message: String,
}

/// `streamhub upload FILE`: uploads in chunks with the file's SHA-256,
/// resuming where the server stopped when run again after an interruption.
pub async fn upload(ctx: &Context, args: UploadArgs) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "{} has no usable file name; pass --name",
                    args.file.display()
                )
            })?,
    };
    let metadata = std::fs::metadata(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    anyhow::ensure!(
        !metadata.is_dir(),
        "{} is a directory: upload takes one file",
        args.file.display()
    );
    let size = metadata.len();
    let bar = progress_bar(ctx, size);
    let mut restart = args.restart;
    let mut attempt = 0u32;
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let result = upload_once(ctx, &args, &name, size, restart, &bar).await;
        let (failure, resumed) = match result {
            Ok((response, digest)) => {
                bar.finish_and_clear();
                if response.sha256 != digest {
                    bail!(
                        "the server stored {name} with SHA-256 {}, but the file's is {}",
                        hex::encode(&response.sha256),
                        hex::encode(digest)
                    );
                }
                let view = UploadView {
                    filename: response.filename,
                    total_bytes: response.total_bytes,
                    total_chunks: response.total_chunks,
                    sha256: hex::encode(&response.sha256),
                    resumed_from: response.resumed_from,
                    message: response.message,
                };
                ctx.emit(&view, || {
                    format!(
                        "uploaded {} ({}, {} chunk{}{}), sha256 {}",
                        terminal_safe(&view.filename),
                        HumanBytes(view.total_bytes),
                        view.total_chunks,
                        if view.total_chunks == 1 { "" } else { "s" },
                        if view.resumed_from > 0 {
                            format!(", resumed at {}", HumanBytes(view.resumed_from))
                        } else {
                            String::new()
                        },
                        view.sha256
                    )
                });
                return Ok(());
            }
            Err(Attempt::Fatal(err)) => {
                bar.abandon();
                return Err(err);
            }
            Err(Attempt::Status { status, resumed }) => (status, resumed),
            Err(Attempt::Busy) => {
                // Another call writes the name (QueryUpload says
                // in_progress): the server would answer ABORTED. Wait
                // and ask again, per --retries, saying so.
                if attempt >= args.retries {
                    bar.abandon();
                    bail!(
                        "another call is uploading {name} right now (the server answers ABORTED to a second writer); \
                         gave up after {} {} (--retries {}); run the same command again when it has ended",
                        attempt,
                        if attempt == 1 { "retry" } else { "retries" },
                        args.retries
                    );
                }
                attempt += 1;
                bar.suspend(|| {
                    ctx.note(
                        "waiting",
                        &format!(
                            "another call is uploading {name} right now; asking again in {:.1}s (retry {attempt} of {})",
                            backoff.delay().as_secs_f64(),
                            args.retries
                        ),
                    );
                });
                backoff.wait().await;
                continue;
            }
        };
        if failure.code() == Code::DataLoss && resumed && !restart {
            bar.suspend(|| {
                ctx.note(
                    "restarting",
                    &format!(
                        "the bytes the server held of {name} do not match this file; starting over"
                    ),
                );
            });
            restart = true;
            continue;
        }
        let retryable = matches!(
            failure.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::Aborted
                | Code::FailedPrecondition
        );
        // Another node may serve what this one refused.
        ctx.note_failure(&failure);
        if !retryable || attempt >= args.retries {
            bar.abandon();
            if retryable {
                bail!(
                    "upload of {name} interrupted: {}: {}; run the same command again to resume",
                    code_name(failure.code()),
                    failure.message()
                );
            }
            return Err(status_error(failure));
        }
        attempt += 1;
        bar.suspend(|| {
            ctx.note(
                "retrying",
                &format!(
                    "upload of {name} interrupted ({}: {}); resuming in {:.1}s",
                    code_name(failure.code()),
                    failure.message(),
                    backoff.delay().as_secs_f64()
                ),
            );
        });
        backoff.wait().await;
        restart = false;
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

fn progress_bar(ctx: &Context, size: u64) -> ProgressBar {
    if ctx.json {
        return ProgressBar::hidden();
    }
    // indicatif draws on stderr only when it is a terminal.
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(
        "{wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Starts the progress bar of one attempt at `offset`: rate and ETA count
/// only the bytes this attempt sends. (indicatif's estimator takes the
/// bytes between its last reading and the next as sent in that time; on
/// a resume its last reading is from before the offset, so without a
/// reading at the offset the resumed bytes would count as just sent.)
fn start_at(bar: &ProgressBar, offset: u64) {
    bar.set_position(offset);
    bar.tick();
    bar.reset_eta();
}

enum Attempt {
    /// A local problem, or one retrying cannot fix.
    Fatal(anyhow::Error),
    /// The server's answer; `resumed` when the call resumed held bytes.
    Status { status: Status, resumed: bool },
    /// Another call is writing the name now (`QueryUpload` says
    /// `in_progress`); nothing was sent.
    Busy,
}

impl From<Status> for Attempt {
    fn from(status: Status) -> Self {
        Attempt::Status {
            status,
            resumed: false,
        }
    }
}

async fn upload_once(
    ctx: &Context,
    args: &UploadArgs,
    name: &str,
    size: u64,
    restart: bool,
    bar: &ProgressBar,
) -> Result<(UploadResponse, [u8; 32]), Attempt> {
    let channel = ctx.connect().await.map_err(|e| Attempt::Status {
        status: Status::unavailable(format!("{e:#}")),
        resumed: false,
    })?;
    let mut client = client(channel);
    // Ask what the server holds. A name another call is writing now is
    // refused (ABORTED) by the server; the caller retries per --retries.
    // (A call that went quiet, say one whose network dropped, is not
    // `in_progress` after `upload.takeover_after`, and this call takes
    // the name over.)
    let status = client
        .query_upload(QueryUploadRequest {
            filename: name.to_owned(),
        })
        .await?
        .into_inner();
    if status.in_progress {
        return Err(Attempt::Busy);
    }
    let held = status.committed_size;
    let offset = if restart || held == 0 {
        0
    } else if held > size {
        bar.suspend(|| {
            ctx.note(
                "restarting",
                &format!(
                    "the server holds {} of {name}, more than this file's {}; starting over",
                    HumanBytes(held),
                    HumanBytes(size)
                ),
            );
        });
        0
    } else {
        bar.suspend(|| {
            ctx.note(
                "resuming",
                &format!(
                    "resuming upload of {name}: the server holds {} of {}",
                    HumanBytes(held),
                    HumanBytes(size)
                ),
            );
        });
        held
    };
    start_at(bar, offset);

    let (tx, rx) = mpsc::channel::<FileChunk>(4);
    let path = args.file.clone();
    let producer_name = name.to_owned();
    let chunk = args.chunk_size;
    let producer_bar = bar.clone();
    let producer = tokio::task::spawn_blocking(move || {
        produce(&path, &producer_name, offset, chunk, &tx, &producer_bar)
    });
    let result = client.upload(ReceiverStream::new(rx)).await;
    let produced = producer
        .await
        .map_err(|e| Attempt::Fatal(anyhow::anyhow!("file reader failed: {e}")))?;
    match (result, produced) {
        (Ok(response), Ok(Some(digest))) => Ok((response.into_inner(), digest)),
        (Ok(_), Ok(None)) => Err(Attempt::Fatal(anyhow::anyhow!(
            "the server answered before the whole file was sent"
        ))),
        (_, Err(err)) => Err(Attempt::Fatal(err)),
        (Err(status), Ok(_)) => Err(Attempt::Status {
            status,
            resumed: offset > 0,
        }),
    }
}

/// Reads the file from `offset` (hashing the bytes before it first) and
/// sends it in chunks; returns the whole file's digest, or `None` if the
/// call ended before everything was sent.
fn produce(
    path: &Path,
    name: &str,
    offset: u64,
    chunk_size: u64,
    tx: &mpsc::Sender<FileChunk>,
    bar: &ProgressBar,
) -> anyhow::Result<Option<[u8; 32]>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut left = offset;
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        file.read_exact(&mut buf[..want])
            .with_context(|| format!("cannot read {}", path.display()))?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    let chunk_size = usize::try_from(chunk_size).unwrap_or(1024 * 1024);
    // A resumed call keeps numbering chunks as if it had started at 0.
    let mut index = u32::try_from(offset.div_ceil(chunk_size as u64)).unwrap_or(u32::MAX);
    let mut position = offset;
    let mut first = true;
    loop {
        let want = usize::try_from((size - position).min(chunk_size as u64)).unwrap_or(chunk_size);
        let mut data = vec![0u8; want];
        file.read_exact(&mut data)
            .with_context(|| format!("cannot read {} (did it shrink?)", path.display()))?;
        hasher.update(&data);
        let is_last = position + want as u64 >= size;
        let chunk = FileChunk {
            filename: if first {
                name.to_owned()
            } else {
                String::new()
            },
            data,
            chunk_index: index,
            is_last,
            offset: Some(position),
            sha256: if is_last {
                hasher.clone().finalize().to_vec()
            } else {
                Vec::new()
            },
        };
        if tx.blocking_send(chunk).is_err() {
            return Ok(None);
        }
        position += want as u64;
        bar.set_position(position);
        if is_last {
            return Ok(Some(hasher.finalize().into()));
        }
        first = false;
        index = index.saturating_add(1);
    }
}

/// `streamhub files`: the stored files.
pub async fn files(ctx: &Context) -> anyhow::Result<()> {
    let mut client = client(ctx.connect().await?);
    let list = client
        .list_files(ListFilesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if list.files.is_empty() && !ctx.json {
        out(&super::token::empty_list_text(
            ctx,
            crate::auth::Resource::Upload,
            "files",
            "no files stored yet",
        )
        .await);
    }
    for file in &list.files {
        ctx.emit(
            &serde_json::json!({
                "filename": file.filename,
                "size": file.size,
                "sha256": hex::encode(&file.sha256),
                "modified_ms": file.modified_ms,
            }),
            || {
                format!(
                    "{:<32} {:>12}  {}  {}",
                    terminal_safe(&file.filename),
                    HumanBytes(file.size).to_string(),
                    hex::encode(&file.sha256),
                    format_ms(file.modified_ms)
                )
            },
        );
    }
    Ok(())
}

/// Arguments of `streamhub download`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Name of the stored file.
    pub name: String,
    /// Where to write it (a file, or a directory to put it in)
    /// [default: ./NAME].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Bytes per chunk asked of the server, e.g. 256KiB (at most 4 MiB).
    #[arg(long, default_value = "256KiB", value_parser = chunk_size)]
    pub chunk_size: u64,
}

/// `streamhub download NAME`: fetches a stored file into a temporary file,
/// checks its SHA-256, then renames it into place.
pub async fn download(ctx: &Context, args: DownloadArgs) -> anyhow::Result<()> {
    let target = match &args.output {
        Some(path) if path.is_dir() => path.join(&args.name),
        Some(path) => path.clone(),
        None => PathBuf::from(&args.name),
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("download");
    let temp = dir.join(format!(".{file_name}.streamhub-part"));
    let mut client = client(ctx.connect().await?);
    // Removes the partial file however the download ends: failure, or
    // Ctrl-C dropping this future.
    let mut partial = Partial(Some(temp.clone()));
    let mut stream = client
        .download(DownloadRequest {
            filename: args.name.clone(),
            chunk_size: u32::try_from(args.chunk_size).unwrap_or(u32::MAX),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = tokio::fs::File::create(&temp).await.with_context(|| {
        // The partial file is ours; the user named the target.
        format!(
            "cannot write {} (its partial file {} cannot be created)",
            target.display(),
            temp.display()
        )
    })?;
    let result = async {
        let mut hasher = Sha256::new();
        let mut position = 0u64;
        let mut bar: Option<ProgressBar> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(status_error)?;
            let bar = bar.get_or_insert_with(|| progress_bar(ctx, chunk.total_size));
            if chunk.offset != position {
                bail!(
                    "the server sent offset {} where {position} was expected",
                    chunk.offset
                );
            }
            hasher.update(&chunk.data);
            out.write_all(&chunk.data).await?;
            position += chunk.data.len() as u64;
            bar.set_position(position);
            if chunk.is_last {
                bar.finish_and_clear();
                let digest: [u8; 32] = hasher.finalize().into();
                if chunk.sha256 != digest {
                    bail!(
                        "SHA-256 mismatch: the server says {}, the bytes received hash to {}",
                        hex::encode(&chunk.sha256),
                        hex::encode(digest)
                    );
                }
                out.sync_all().await?;
                return Ok((position, digest));
            }
        }
        bail!("the download of {} ended before its last chunk", args.name)
    }
    .await;
    drop(out);
    let (size, digest) = result?;
    tokio::fs::rename(&temp, &target)
        .await
        .with_context(|| format!("cannot move the download to {}", target.display()))?;
    partial.0 = None;
    ctx.emit(
        &serde_json::json!({
            "filename": args.name,
            "path": target.display().to_string(),
            "size": size,
            "sha256": hex::encode(digest),
            "verified": true,
        }),
        || {
            format!(
                "downloaded {} to {} ({}), sha256 {} verified",
                terminal_safe(&args.name),
                target.display(),
                HumanBytes(size),
                hex::encode(digest)
            )
        },
    );
    Ok(())
}

/// A download's partial file, removed on drop unless it was moved into
/// place (`None`).
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_after_a_resume_counts_only_this_runs_bytes() {
        const HELD: u64 = 1 << 30;
        const SENT: u64 = 1 << 20;
        let bar = ProgressBar::hidden();
        bar.set_length(4 * HELD);
        // An earlier attempt moved the bar often (its drawing is rate
        // limited: a move right after a burst is not read at once).
        for position in 0..200 {
            bar.set_position(position);
        }
        let started = std::time::Instant::now();
        start_at(&bar, HELD);
        std::thread::sleep(Duration::from_millis(20));
        bar.set_position(HELD + SENT);
        bar.tick();
        // Whatever the speed of this machine, bytes per second times the
        // time since the start is about what this run sent (1 MiB), never
        // the gigabyte held before it.
        let counted = bar.per_sec() * started.elapsed().as_secs_f64();
        assert!(counted < (HELD / 4) as f64, "{counted} bytes counted");
        assert!(counted > 0.0);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 MB"), Ok(2 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3GiB").is_err());
        assert!(chunk_size("0").is_err());
        assert!(chunk_size("5MiB").is_err());
        assert_eq!(chunk_size("4MiB"), Ok(MAX_CHUNK_SIZE));
    }
}
