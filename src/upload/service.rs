//! The gRPC face of uploads: converts between protobuf and domain types,
//! maps [`UploadError`]s to statuses, and decides what happens to the bytes
//! of a call that does not complete (kept for a resume, or discarded).

use std::{pin::Pin, sync::Arc, task::Poll, time::Duration};

use futures::Stream;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};

use super::{
    Chunk, Sequence, UploadError,
    limits::CallSlot,
    owners::Owners,
    stall::Stallable,
    store::{Store, StoredReader, Upload, expires_ms},
};
use crate::{
    auth::{self, Action, Resource},
    proto::fileupload::{
        CancelUploadRequest, CancelUploadResponse, DownloadChunk, DownloadRequest, FileChunk,
        FileInfo, ListFilesRequest, ListFilesResponse, ListUploadsRequest, ListUploadsResponse,
        PartialUpload, QueryUploadRequest, QueryUploadResponse, UploadResponse,
        file_upload_service_server,
    },
    rpc::{StreamLog, peer, shutting_down},
    shutdown::{SHUTTING_DOWN, Shutdown},
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Download chunk size when the request says 0.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;

/// Smallest download chunk; smaller requests are raised to it.
pub const MIN_CHUNK_SIZE: usize = 1024;

/// Largest download chunk; larger requests are lowered to it. A download
/// holds about one chunk ahead of what its client has taken.
pub const MAX_CHUNK_SIZE: usize = 1024 * 1024;

/// Room left in a message for the fields around a download chunk's data.
const MESSAGE_OVERHEAD: usize = 1024;

/// After the chunk marked `is_last`, how long the server waits for the
/// client to close its side before completing anyway. A chunk arriving in
/// that time fails the call (data after the last chunk).
const END_OF_STREAM_GRACE: Duration = Duration::from_secs(5);

/// The `fileupload.FileUploadService` implementation.
#[derive(Debug, Clone)]
pub struct UploadService {
    store: Arc<Store>,
    shutdown: Shutdown,
    max_chunk: usize,
    bytes: metrics::Counter,
    owners: Option<Arc<Owners>>,
}

impl UploadService {
    /// A service over `store` whose calls end when `shutdown` triggers;
    /// download chunks stay below `max_message_size`.
    pub fn new(store: Arc<Store>, shutdown: Shutdown, max_message_size: usize) -> Self {
        Self {
            store,
            shutdown,
            max_chunk: max_message_size
                .saturating_sub(MESSAGE_OVERHEAD)
                .clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
            bytes: metrics::Counter::noop(),
            owners: None,
        }
    }

    /// The service, counting the upload bytes it accepts in `bytes`
    /// (`streamhub_upload_bytes_total`).
    #[must_use]
    pub fn with_bytes_counter(mut self, bytes: metrics::Counter) -> Self {
        self.bytes = bytes;
        self
    }

    /// The tonic server wrapping this service, with message size limits.
    pub fn into_server(
        self,
        max_message_size: usize,
    ) -> file_upload_service_server::FileUploadServiceServer<Self> {
        file_upload_service_server::FileUploadServiceServer::new(self)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }

    /// Records who writes each upload in `owners`, and enforces
    /// `upload.quota_per_identity` for authenticated callers.
    pub fn with_owners(mut self, owners: Arc<Owners>) -> Self {
        self.owners = Some(owners);
        self
    }

    /// The bytes an authenticated caller may still write in this call
    /// (`None` = no per-identity quota), checked before anything is
    /// written; records the caller as the upload's owner.
    async fn identity_allowance(
        &self,
        identity: &crate::auth::Identity,
        name: &str,
        offset: u64,
    ) -> Result<Option<Allowance>, UploadError> {
        let Some(owners) = self.owners.as_ref().filter(|_| identity.is_authenticated()) else {
            return Ok(None);
        };
        let allowance = match self.store.config().quota_per_identity {
            None => None,
            Some(quota) => {
                let mut used = owners.usage(&self.store, identity.name()).await?;
                let status = self.store.status(name).await?;
                if offset == 0 && owners.owns_partial(name, identity.name()) {
                    // A fresh start discards the bytes held of this name.
                    used = used.saturating_sub(status.held);
                }
                if owners.owns_stored(name, identity.name()) {
                    // Completing replaces the caller's own file of that name.
                    used = used.saturating_sub(status.stored_size.unwrap_or(0));
                }
                if used >= quota {
                    return Err(UploadError::IdentityQuotaExceeded {
                        upload: name.to_owned(),
                        identity: identity.name().to_owned(),
                        index: 0,
                        quota,
                        used,
                    });
                }
                Some(Allowance {
                    identity: identity.name().to_owned(),
                    quota,
                    used,
                    written: 0,
                })
            }
        };
        owners.begin(name, identity.name());
        Ok(allowance)
    }
}

/// What one call may still write under its identity's quota.
#[derive(Debug)]
struct Allowance {
    identity: String,
    quota: u64,
    used: u64,
    written: u64,
}

impl Allowance {
    fn take(&mut self, upload: &str, index: u32, len: u64) -> Result<(), UploadError> {
        if self.used.saturating_add(self.written).saturating_add(len) > self.quota {
            return Err(UploadError::IdentityQuotaExceeded {
                upload: upload.to_owned(),
                identity: self.identity.clone(),
                index,
                quota: self.quota,
                used: self.used,
            });
        }
        self.written += len;
        Ok(())
    }
}

/// The status for an error.
fn status(err: &UploadError) -> Status {
    let message = err.to_string();
    match err {
        UploadError::EmptyStream
        | UploadError::BadName { .. }
        | UploadError::NameChanged { .. }
        | UploadError::FirstIndex { .. }
        | UploadError::OutOfOrder { .. }
        | UploadError::AfterLast { .. }
        | UploadError::ChunkOffset { .. }
        | UploadError::BadDigest { .. }
        | UploadError::DigestChanged { .. } => Status::invalid_argument(message),
        UploadError::ResumeOffset { .. } | UploadError::BadState { .. } => {
            Status::failed_precondition(message)
        }
        UploadError::NotAFile { .. } => Status::already_exists(message),
        UploadError::Busy { .. } | UploadError::LeaseLost { .. } => Status::aborted(message),
        UploadError::TooLarge { .. }
        | UploadError::QuotaExceeded { .. }
        | UploadError::DiskFull { .. }
        | UploadError::IdentityQuotaExceeded { .. }
        | UploadError::TooManyCalls { .. } => Status::resource_exhausted(message),
        UploadError::DigestMismatch { .. } => Status::data_loss(message),
        UploadError::NotFound { .. } => Status::not_found(message),
        UploadError::Unavailable(_) => Status::unavailable(message),
        UploadError::Io {
            action,
            cause: source,
            ..
        } => {
            // The message carries a server path: the log gets it, the
            // client gets what failed without it.
            tracing::error!(err = %message, "upload storage failure");
            Status::internal(format!(
                "upload storage failed to {action}: {}; the server log has the details",
                source.kind()
            ))
        }
        UploadError::Internal(_) => {
            tracing::error!(err = %message, "upload storage failure");
            Status::internal(message)
        }
    }
}

/// The deadline a client set with the `grpc-timeout` header, if any,
/// brought forward by a fifth of the timeout (at most 250 ms).
fn deadline_of(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    // End the call a little before the client's own timer does (it
    // started before the request arrived), so the client gets this
    // server's status, with the resume offset, rather than its own
    // CANCELLED.
    let margin = (timeout / 5).min(Duration::from_millis(250));
    Instant::now().checked_add(timeout - margin)
}

impl From<FileChunk> for Chunk {
    fn from(c: FileChunk) -> Self {
        Self {
            filename: c.filename,
            data: c.data,
            index: c.chunk_index,
            is_last: c.is_last,
            offset: c.offset,
            sha256: c.sha256,
        }
    }
}

/// What reading the next chunk gave.
enum Next {
    Chunk(Chunk),
    End,
    Failed(Status),
    Shutdown,
    /// No chunk for `upload.idle_timeout`.
    Idle,
    /// A new call took the name over.
    TakenOver,
    /// The call's deadline passed.
    Deadline,
}

/// What a call waits on besides its next chunk.
struct Waits<'a> {
    shutdown: &'a Shutdown,
    idle: Duration,
    deadline: Option<Instant>,
    takeover: Option<CancellationToken>,
}

async fn next(stream: &mut Streaming<FileChunk>, waits: &Waits<'_>) -> Next {
    let deadline = async {
        match waits.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    let taken = async {
        match &waits.takeover {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    // Biased: a chunk already here is taken without arming a timer.
    tokio::select! {
        biased;
        () = waits.shutdown.cancelled() => Next::Shutdown,
        () = taken => Next::TakenOver,
        item = stream.next() => match item {
            None => Next::End,
            Some(Ok(chunk)) => Next::Chunk(chunk.into()),
            Some(Err(status)) => Next::Failed(status),
        },
        () = tokio::time::sleep(waits.idle) => Next::Idle,
        () = deadline => Next::Deadline,
    }
}

/// How a call's stream of chunks ended.
enum Outcome {
    /// The last chunk arrived and the client closed its side (or waited).
    Complete,
    /// A chunk broke the protocol: the bytes before it are kept.
    Invalid(UploadError),
    /// Storing failed (size, quota, disk): the bytes are discarded.
    Storage(UploadError),
    /// The stream ended without a chunk marked `is_last`.
    Ended,
    /// The stream failed: the client went away, or sent something
    /// undecodable or too large.
    Failed(Status),
    /// The server is shutting down.
    Shutdown,
    /// No chunk arrived for `upload.idle_timeout`.
    Idle,
    /// A new call took the name over after this one went quiet.
    TakenOver,
    /// The call's deadline passed.
    Deadline,
}

async fn receive(
    seq: &mut Sequence,
    upload: &mut Upload,
    first: Chunk,
    stream: &mut Streaming<FileChunk>,
    waits: &Waits<'_>,
    bytes: &metrics::Counter,
    mut allowance: Option<Allowance>,
) -> Outcome {
    let mut chunk = first;
    loop {
        if let Some(allowance) = &mut allowance
            && let Err(err) = allowance.take(seq.name(), chunk.index, chunk.data.len() as u64)
        {
            return Outcome::Storage(err);
        }
        let len = chunk.data.len() as u64;
        if let Err(err) = upload
            .write(chunk.index, std::mem::take(&mut chunk.data))
            .await
        {
            return Outcome::Storage(err);
        }
        bytes.increment(len);
        if chunk.is_last {
            break;
        }
        // Batch chunks for the writer only while more are already here.
        let mut following = std::pin::pin!(next(stream, waits));
        let ready = match futures::poll!(following.as_mut()) {
            Poll::Ready(ready) => ready,
            Poll::Pending => {
                if let Err(err) = upload.flush().await {
                    return Outcome::Storage(err);
                }
                following.await
            }
        };
        chunk = match ready {
            Next::Chunk(chunk) => chunk,
            Next::End => return Outcome::Ended,
            Next::Failed(status) => return Outcome::Failed(status),
            Next::Shutdown => return Outcome::Shutdown,
            Next::Idle => return Outcome::Idle,
            Next::TakenOver => return Outcome::TakenOver,
            Next::Deadline => return Outcome::Deadline,
        };
        if let Err(err) = seq.next(&chunk) {
            return Outcome::Invalid(err);
        }
    }
    // The client should now close its side; anything else it sends is
    // data after the last chunk. A client that neither closes nor sends is
    // not waited for long: its upload is complete.
    match tokio::time::timeout(END_OF_STREAM_GRACE, next(stream, waits)).await {
        Ok(Next::Chunk(extra)) => match seq.next(&extra) {
            Err(err) => Outcome::Invalid(err),
            Ok(()) => Outcome::Complete, // unreachable: the sequence is finished
        },
        _ => Outcome::Complete,
    }
}

/// A message over the size limit ends the call with RESOURCE_EXHAUSTED,
/// as gRPC's status code table says (tonic reports OUT_OF_RANGE).
fn too_large_is_exhausted(failure: Status) -> Status {
    if failure.code() == tonic::Code::OutOfRange {
        Status::resource_exhausted(failure.message().to_owned())
    } else {
        failure
    }
}

fn resume_hint(name: &str, held: u64) -> String {
    format!(
        "nothing was published; {held} bytes of upload {name} are held: resume from offset {held}"
    )
}

#[tonic::async_trait]
impl file_upload_service_server::FileUploadService for UploadService {
    async fn upload(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let mut log = StreamLog::open(&request, "Upload", "");
        let peer = peer(&request);
        let identity = auth::layer::identity(request.extensions());
        let deadline = deadline_of(request.metadata());
        let _slot: CallSlot = self.store.upload_slot(&peer).map_err(|err| {
            log.end(format!("refused: {err}"));
            tracing::warn!(%peer, %err, "upload refused");
            status(&err)
        })?;
        let mut stream = request.into_inner();
        let mut waits = Waits {
            shutdown: &self.shutdown,
            idle: self.store.config().idle_timeout,
            deadline,
            takeover: None,
        };
        let first = match next(&mut stream, &waits).await {
            Next::Chunk(chunk) => chunk,
            Next::End => {
                log.end("empty stream");
                return Err(status(&UploadError::EmptyStream));
            }
            Next::Failed(failure) => {
                log.end(format!("stream failed before the first chunk: {failure}"));
                return Err(too_large_is_exhausted(failure));
            }
            Next::Shutdown => {
                log.end("server shutting down");
                return Err(shutting_down());
            }
            Next::Idle | Next::TakenOver => {
                log.end("no first chunk");
                return Err(Status::aborted(format!(
                    "no chunk arrived within {} of the call's start; nothing was stored",
                    humantime::format_duration(waits.idle)
                )));
            }
            Next::Deadline => {
                log.end("deadline passed before the first chunk");
                return Err(Status::deadline_exceeded(
                    "the call's deadline passed before its first chunk; nothing was stored",
                ));
            }
        };
        let refuse = |log: &mut StreamLog, err: UploadError| {
            log.end(format!("refused: {err}"));
            status(&err)
        };
        let (mut seq, start) = Sequence::first(&first).map_err(|e| refuse(&mut log, e))?;
        log.set_subject(&start.name);
        // Before the store is touched: no byte of a refused upload is written.
        auth::authorize(&identity, Resource::Upload, Action::Write, &start.name)
            .inspect_err(|denied| log.end(format!("refused: {}", denied.message())))?;
        let allowance = self
            .identity_allowance(&identity, &start.name, start.offset)
            .await
            .map_err(|e| refuse(&mut log, e))?;
        let mut upload = self
            .store
            .begin(&start.name, start.offset)
            .await
            .map_err(|e| refuse(&mut log, e))?;
        upload.set_peer(&peer);
        upload.set_deadline(deadline);
        waits.takeover = Some(upload.takeover_signal());
        if start.offset > 0 {
            tracing::info!(upload = %start.name, %peer, offset = start.offset, "upload resumed");
        }
        let name = start.name;
        let outcome = receive(
            &mut seq,
            &mut upload,
            first,
            &mut stream,
            &waits,
            &self.bytes,
            allowance,
        )
        .await;
        // The chunk that was in flight when the stream stopped.
        let during = u64::from(seq.last_index()) + 1;
        match outcome {
            Outcome::Complete => {
                let resumed_from = upload.start();
                match upload.finish(seq.expected_digest()).await {
                    Ok(stored) => {
                        if let Some(owners) =
                            self.owners.as_ref().filter(|_| identity.is_authenticated())
                        {
                            owners.published(&stored.name);
                        }
                        log.end("complete");
                        tracing::info!(
                            upload = %name,
                            %peer,
                            bytes = stored.size,
                            sha256 = %hex::encode(stored.sha256),
                            "upload complete"
                        );
                        Ok(Response::new(UploadResponse {
                            filename: stored.name,
                            total_bytes: stored.size,
                            total_chunks: seq.last_index().saturating_add(1),
                            success: true,
                            message: if resumed_from > 0 {
                                format!("Upload successful (resumed at offset {resumed_from})")
                            } else {
                                "Upload successful".to_owned()
                            },
                            sha256: stored.sha256.to_vec(),
                            resumed_from,
                        }))
                    }
                    Err(err) => {
                        log.end(format!("failed: {err}"));
                        tracing::warn!(upload = %name, %peer, %err, "upload not published");
                        Err(status(&err))
                    }
                }
            }
            Outcome::Invalid(err) => {
                let held = upload.suspend().await;
                log.end(format!("invalid: {err}"));
                let status = status(&err);
                // The hint says "nothing was published" itself.
                let message = status.message().trim_end_matches("; nothing was published");
                Err(Status::new(
                    status.code(),
                    format!("{message}; {}", resume_hint(&name, held)),
                ))
            }
            Outcome::Storage(err @ UploadError::LeaseLost { .. }) => {
                // The bytes may be another node's now: closed, not removed.
                let held = upload.suspend().await;
                log.end(format!("lease lost; {held} bytes held"));
                tracing::warn!(upload = %name, %peer, held, %err, "upload stopped");
                Err(status(&err))
            }
            Outcome::Storage(err) => {
                if let Err(discard) = upload.discard().await {
                    tracing::error!(upload = %name, err = %discard, "cannot discard upload bytes");
                }
                log.end(format!("failed: {err}"));
                tracing::warn!(upload = %name, %peer, %err, "upload failed");
                Err(status(&err))
            }
            Outcome::Ended => {
                let held = upload.suspend().await;
                let message = format!(
                    "the stream of upload {name} ended after chunk {} without a chunk marked is_last; {}",
                    seq.last_index(),
                    resume_hint(&name, held)
                );
                log.end(format!("ended without is_last; {held} bytes held"));
                tracing::warn!(upload = %name, %peer, held, "{message}");
                Err(Status::aborted(message))
            }
            Outcome::Idle => {
                let held = upload.suspend().await;
                let message = format!(
                    "upload {name} received no chunk for {} after chunk {} (upload.idle_timeout); {}",
                    humantime::format_duration(waits.idle),
                    seq.last_index(),
                    resume_hint(&name, held)
                );
                log.end(format!("idle; {held} bytes held"));
                tracing::warn!(upload = %name, %peer, held, "{message}");
                Err(Status::aborted(message))
            }
            Outcome::TakenOver => {
                let quiet = upload.quiet_for();
                let held = upload.suspend().await;
                let message = format!(
                    "upload {name} was taken over by a newer call after this one sent nothing for {:.1}s; {}",
                    quiet.as_secs_f64(),
                    resume_hint(&name, held)
                );
                log.end(format!("taken over; {held} bytes held"));
                tracing::warn!(upload = %name, %peer, held, "{message}");
                Err(Status::aborted(message))
            }
            Outcome::Deadline => {
                // Logged first: whoever enforces the deadline in front of
                // this handler may drop it any moment now (the bytes are
                // kept either way).
                let held = upload.position();
                log.end(format!("deadline passed; {held} bytes held"));
                tracing::warn!(
                    upload = %name,
                    %peer,
                    chunk = during,
                    held,
                    "deadline passed during chunk {during} of upload {name}; {held} bytes kept for a resume"
                );
                let held = upload.suspend().await;
                Err(Status::deadline_exceeded(format!(
                    "the call's deadline passed during chunk {during} of upload {name}; {}",
                    resume_hint(&name, held)
                )))
            }
            Outcome::Failed(failure) => {
                if upload.deadline_passed() {
                    let held = upload.position();
                    log.end(format!("deadline passed; {held} bytes held"));
                    tracing::warn!(
                        upload = %name,
                        %peer,
                        chunk = during,
                        held,
                        "deadline passed during chunk {during} of upload {name}; {held} bytes kept for a resume"
                    );
                    let held = upload.suspend().await;
                    Err(Status::deadline_exceeded(format!(
                        "the call's deadline passed during chunk {during} of upload {name}; {}",
                        resume_hint(&name, held)
                    )))
                } else if matches!(
                    failure.code(),
                    tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable
                ) {
                    let held = upload.position();
                    log.end(format!("client disconnected; {held} bytes held"));
                    tracing::warn!(
                        upload = %name,
                        %peer,
                        chunk = during,
                        held,
                        "client disconnected during chunk {during} of upload {name}; {held} bytes kept for a resume"
                    );
                    upload.suspend().await;
                    Err(failure)
                } else {
                    let held = upload.suspend().await;
                    let failure = too_large_is_exhausted(failure);
                    log.end(format!("unreadable chunk: {failure}"));
                    tracing::warn!(upload = %name, %peer, chunk = during, held, %failure, "unreadable chunk");
                    Err(Status::new(
                        failure.code(),
                        format!(
                            "chunk {during} of upload {name} could not be read: {}; {}",
                            failure.message(),
                            resume_hint(&name, held)
                        ),
                    ))
                }
            }
            Outcome::Shutdown => {
                let held = upload.suspend().await;
                log.end(format!("server shutting down; {held} bytes held"));
                tracing::info!(
                    upload = %name,
                    %peer,
                    chunk = during,
                    held,
                    "server shutting down during chunk {during} of upload {name}; {held} bytes kept for a resume"
                );
                Err(Status::unavailable(format!(
                    "{SHUTTING_DOWN}; {}",
                    resume_hint(&name, held)
                )))
            }
        }
    }

    async fn query_upload(
        &self,
        request: Request<QueryUploadRequest>,
    ) -> Result<Response<QueryUploadResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let name = request.into_inner().filename;
        auth::authorize(&identity, Resource::Upload, Action::Write, &name)?;
        let held = self.store.status(&name).await.map_err(|e| status(&e))?;
        Ok(Response::new(QueryUploadResponse {
            filename: name,
            committed_size: held.held,
            in_progress: held.in_progress,
            expires_at_ms: expires_ms(held.expires_at),
            stored: held.stored_size.is_some(),
            stored_size: held.stored_size.unwrap_or(0),
        }))
    }

    async fn cancel_upload(
        &self,
        request: Request<CancelUploadRequest>,
    ) -> Result<Response<CancelUploadResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let name = request.into_inner().filename;
        auth::authorize(&identity, Resource::Upload, Action::Write, &name)?;
        let discarded_bytes = self.store.cancel(&name).await.map_err(|e| status(&e))?;
        tracing::info!(upload = %name, discarded_bytes, "unfinished upload cancelled");
        Ok(Response::new(CancelUploadResponse { discarded_bytes }))
    }

    async fn list_files(
        &self,
        request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        auth::authorize_any(&identity, Resource::Upload, Action::Read)?;
        let files = self.store.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(ListFilesResponse {
            files: files
                .into_iter()
                // Only the files the caller may read.
                .filter(|f| identity.allows(Resource::Upload, Action::Read, &f.name))
                .map(|f| FileInfo {
                    filename: f.name,
                    size: f.size,
                    sha256: f.sha256.to_vec(),
                    modified_ms: f.modified_ms,
                })
                .collect(),
        }))
    }

    async fn list_uploads(
        &self,
        request: Request<ListUploadsRequest>,
    ) -> Result<Response<ListUploadsResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        auth::authorize_any(&identity, Resource::Upload, Action::Write)?;
        let partials = self.store.partials().await.map_err(|e| status(&e))?;
        Ok(Response::new(ListUploadsResponse {
            uploads: partials
                .into_iter()
                // Only the uploads the caller may write (resume or cancel).
                .filter(|p| identity.allows(Resource::Upload, Action::Write, &p.name))
                .map(|p| PartialUpload {
                    filename: p.name,
                    held_bytes: p.held,
                    in_progress: p.in_progress,
                    expires_at_ms: expires_ms(p.expires_at),
                })
                .collect(),
        }))
    }

    type DownloadStream = BoxStream<DownloadChunk>;

    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let mut log = StreamLog::open(&request, "Download", &request.get_ref().filename);
        let peer = peer(&request);
        let identity = auth::layer::identity(request.extensions());
        auth::authorize(
            &identity,
            Resource::Upload,
            Action::Read,
            &request.get_ref().filename,
        )
        .inspect_err(|denied| log.end(format!("refused: {}", denied.message())))?;
        let DownloadRequest {
            filename,
            chunk_size,
        } = request.into_inner();
        let chunk_size = match usize::try_from(chunk_size) {
            Ok(0) => DEFAULT_CHUNK_SIZE,
            Ok(n) => n,
            Err(_) => MAX_CHUNK_SIZE,
        }
        .clamp(MIN_CHUNK_SIZE, self.max_chunk);
        let slot = self.store.download_slot(&peer).map_err(|e| {
            log.end(format!("refused: {e}"));
            tracing::warn!(%peer, err = %e, "download refused");
            status(&e)
        })?;
        let reader = self.store.open_stored(&filename).await.map_err(|e| {
            log.end(format!("refused: {e}"));
            status(&e)
        })?;
        let idle = self.store.config().idle_timeout;
        // The open file and the call's slot, taken away by the watchdog
        // from a download whose client stops taking data.
        let name = filename.clone();
        let held = Stallable::spawn(
            Held {
                reader,
                _slot: slot,
            },
            idle,
            move |stalled: &Held| {
                tracing::warn!(
                    download = %name,
                    offset = stalled.reader.offset(),
                    "download stopped: its client took no data for {}",
                    humantime::format_duration(idle)
                );
            },
        );
        let store = Arc::clone(&self.store);
        let shutdown = self.shutdown.clone();
        // One chunk is read when the previous one has been taken: a client
        // that stops reading holds about one chunk, in HTTP/2's buffer.
        let stream = async_stream::stream! {
            let mut sent = 0u64;
            loop {
                if shutdown.is_triggered() {
                    log.end("server shutting down");
                    yield Err(shutting_down());
                    break;
                }
                let Some(Held { reader, _slot }) = held.take() else {
                    log.end("stalled: the client took no data");
                    yield Err(Status::aborted(format!(
                        "download of {filename} stopped: the client took no data for {} \
                         (upload.idle_timeout); {sent} bytes were sent; download again",
                        humantime::format_duration(idle)
                    )));
                    break;
                };
                let offset = reader.offset();
                let (reader, data) = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        log.end("server shutting down");
                        yield Err(shutting_down());
                        break;
                    }
                    read = store.read_chunk(reader, chunk_size) => read,
                };
                let data = match data {
                    Ok(data) => data,
                    Err(err) => {
                        log.end(format!("failed: {err}"));
                        yield Err(status(&err));
                        break;
                    }
                };
                let is_last = reader.is_done();
                sent = offset + data.len() as u64;
                let chunk = DownloadChunk {
                    data,
                    offset,
                    total_size: reader.size(),
                    is_last,
                    sha256: if is_last {
                        reader.digest().to_vec()
                    } else {
                        Vec::new()
                    },
                };
                if !is_last {
                    held.put(Held { reader, _slot });
                }
                yield Ok(chunk);
                if is_last {
                    log.end("complete");
                    break;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What an open download holds: its file and its slot.
struct Held {
    reader: StoredReader,
    _slot: CallSlot,
}
