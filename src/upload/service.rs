//! The gRPC face of uploads: converts between protobuf and domain types,
//! maps [`UploadError`]s to statuses, and decides what happens to the bytes
//! of a call that does not complete (kept for a resume, or discarded).

use std::{pin::Pin, sync::Arc, task::Poll, time::Duration};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{Chunk, Sequence, UploadError, store::Store, store::Upload, store::expires_ms};
use crate::{
    proto::fileupload::{
        CancelUploadRequest, CancelUploadResponse, DownloadChunk, DownloadRequest, FileChunk,
        FileInfo, ListFilesRequest, ListFilesResponse, QueryUploadRequest, QueryUploadResponse,
        UploadResponse, file_upload_service_server,
    },
    rpc::{StreamLog, peer, shutting_down},
    shutdown::{SHUTTING_DOWN, Shutdown},
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Download chunk size when the request says 0.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;

/// Room left in a message for the fields around a download chunk's data.
const MESSAGE_OVERHEAD: usize = 1024;

/// After the chunk marked `is_last`, how long the server waits for the
/// client to close its side before completing anyway. A chunk arriving in
/// that time fails the call (data after the last chunk).
const END_OF_STREAM_GRACE: Duration = Duration::from_secs(5);

/// Download chunks queued ahead of a slow reader.
const DOWNLOAD_QUEUE: usize = 4;

/// The `fileupload.FileUploadService` implementation.
#[derive(Debug, Clone)]
pub struct UploadService {
    store: Arc<Store>,
    shutdown: Shutdown,
    max_chunk: usize,
}

impl UploadService {
    /// A service over `store` whose calls end when `shutdown` triggers;
    /// download chunks stay below `max_message_size`.
    pub fn new(store: Arc<Store>, shutdown: Shutdown, max_message_size: usize) -> Self {
        Self {
            store,
            shutdown,
            max_chunk: max_message_size.saturating_sub(MESSAGE_OVERHEAD).max(1024),
        }
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
        UploadError::ResumeOffset { .. } => Status::failed_precondition(message),
        UploadError::Busy { .. } => Status::aborted(message),
        UploadError::TooLarge { .. }
        | UploadError::QuotaExceeded { .. }
        | UploadError::DiskFull { .. } => Status::resource_exhausted(message),
        UploadError::DigestMismatch { .. } => Status::data_loss(message),
        UploadError::NotFound { .. } => Status::not_found(message),
        UploadError::Unavailable(_) => Status::unavailable(message),
        UploadError::Io { .. } | UploadError::Internal(_) => {
            tracing::error!(err = %message, "upload storage failure");
            Status::internal(message)
        }
    }
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
}

async fn next(stream: &mut Streaming<FileChunk>, shutdown: &Shutdown) -> Next {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Next::Shutdown,
        item = stream.next() => match item {
            None => Next::End,
            Some(Ok(chunk)) => Next::Chunk(chunk.into()),
            Some(Err(status)) => Next::Failed(status),
        },
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
    /// undecodable.
    Failed(Status),
    /// The server is shutting down.
    Shutdown,
}

async fn receive(
    seq: &mut Sequence,
    upload: &mut Upload,
    first: Chunk,
    stream: &mut Streaming<FileChunk>,
    shutdown: &Shutdown,
) -> Outcome {
    let mut chunk = first;
    loop {
        if let Err(err) = upload
            .write(chunk.index, std::mem::take(&mut chunk.data))
            .await
        {
            return Outcome::Storage(err);
        }
        if chunk.is_last {
            break;
        }
        // Batch chunks for the writer only while more are already here.
        let mut following = std::pin::pin!(next(stream, shutdown));
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
        };
        if let Err(err) = seq.next(&chunk) {
            return Outcome::Invalid(err);
        }
    }
    // The client should now close its side; anything else it sends is
    // data after the last chunk. A client that neither closes nor sends is
    // not waited for long: its upload is complete.
    match tokio::time::timeout(END_OF_STREAM_GRACE, next(stream, shutdown)).await {
        Ok(Next::Chunk(extra)) => match seq.next(&extra) {
            Err(err) => Outcome::Invalid(err),
            Ok(()) => Outcome::Complete, // unreachable: the sequence is finished
        },
        _ => Outcome::Complete,
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
        let mut stream = request.into_inner();
        let first = match next(&mut stream, &self.shutdown).await {
            Next::Chunk(chunk) => chunk,
            Next::End => {
                log.end("empty stream");
                return Err(status(&UploadError::EmptyStream));
            }
            Next::Failed(status) => {
                log.end(format!("stream failed before the first chunk: {status}"));
                return Err(status);
            }
            Next::Shutdown => {
                log.end("server shutting down");
                return Err(shutting_down());
            }
        };
        let refuse = |log: &mut StreamLog, err: UploadError| {
            log.end(format!("refused: {err}"));
            status(&err)
        };
        let (mut seq, start) = Sequence::first(&first).map_err(|e| refuse(&mut log, e))?;
        log.set_subject(&start.name);
        let mut upload = self
            .store
            .begin(&start.name, start.offset)
            .await
            .map_err(|e| refuse(&mut log, e))?;
        upload.set_peer(&peer);
        if start.offset > 0 {
            tracing::info!(upload = %start.name, %peer, offset = start.offset, "upload resumed");
        }
        let name = start.name;
        let outcome = receive(&mut seq, &mut upload, first, &mut stream, &self.shutdown).await;
        // The chunk that was in flight when the stream stopped.
        let during = u64::from(seq.last_index()) + 1;
        match outcome {
            Outcome::Complete => {
                let resumed_from = upload.start();
                match upload.finish(seq.expected_digest()).await {
                    Ok(stored) => {
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
                Err(Status::new(
                    status.code(),
                    format!("{}; {}", status.message(), resume_hint(&name, held)),
                ))
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
            Outcome::Failed(failure) => {
                let held = upload.suspend().await;
                if matches!(
                    failure.code(),
                    tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable
                ) {
                    log.end(format!("client disconnected; {held} bytes held"));
                    tracing::warn!(
                        upload = %name,
                        %peer,
                        chunk = during,
                        held,
                        "client disconnected during chunk {during} of upload {name}; {held} bytes kept for a resume"
                    );
                    Err(failure)
                } else {
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
        let name = request.into_inner().filename;
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
        let name = request.into_inner().filename;
        let discarded_bytes = self.store.cancel(&name).await.map_err(|e| status(&e))?;
        tracing::info!(upload = %name, discarded_bytes, "unfinished upload cancelled");
        Ok(Response::new(CancelUploadResponse { discarded_bytes }))
    }

    async fn list_files(
        &self,
        _request: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        let files = self.store.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(ListFilesResponse {
            files: files
                .into_iter()
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
        _request: Request<crate::proto::fileupload::ListUploadsRequest>,
    ) -> Result<Response<crate::proto::fileupload::ListUploadsResponse>, Status> {
        Err(Status::unimplemented("ListUploads is not implemented yet"))
    }

    type DownloadStream = BoxStream<DownloadChunk>;

    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let mut log = StreamLog::open(&request, "Download", &request.get_ref().filename);
        let DownloadRequest {
            filename,
            chunk_size,
        } = request.into_inner();
        let chunk_size = match usize::try_from(chunk_size) {
            Ok(0) | Err(_) => DEFAULT_CHUNK_SIZE,
            Ok(n) => n,
        }
        .min(self.max_chunk);
        let mut reader = self.store.open_stored(&filename).await.map_err(|e| {
            log.end(format!("refused: {e}"));
            status(&e)
        })?;
        let (tx, mut rx) = mpsc::channel::<Result<DownloadChunk, Status>>(DOWNLOAD_QUEUE);
        // A blocking reader thread feeds the bounded queue; a failed send
        // means the client left (or shutdown dropped the stream).
        tokio::task::spawn_blocking(move || {
            loop {
                let offset = reader.offset();
                let data = match reader.read(chunk_size) {
                    Ok(data) => data,
                    Err(err) => {
                        let _ = tx.blocking_send(Err(status(&err)));
                        return;
                    }
                };
                let is_last = reader.is_done();
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
                if tx.blocking_send(Ok(chunk)).is_err() || is_last {
                    return;
                }
            }
        });
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        log.end("server shutting down");
                        yield Err(shutting_down());
                        break;
                    }
                    item = rx.recv() => match item {
                        Some(Ok(chunk)) => {
                            let last = chunk.is_last;
                            yield Ok(chunk);
                            if last {
                                log.end("complete");
                                break;
                            }
                        }
                        Some(Err(status)) => {
                            log.end(format!("failed: {}", status.message()));
                            yield Err(status);
                            break;
                        }
                        None => break,
                    },
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
