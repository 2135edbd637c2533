//! Integration tests of the file upload service over loopback: validation,
//! integrity, resume after a client kill, a server kill and a shutdown,
//! concurrency, path traversal, memory use, listing, download and the CLI.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::{path::Path, time::Duration};

use common::{ServerProcess, TestServer, test_config, within};
use sha2::{Digest, Sha256};
use streamhub::proto::fileupload::{
    CancelUploadRequest, DownloadRequest, FileChunk, ListFilesRequest, QueryUploadRequest,
    QueryUploadResponse, UploadResponse, file_upload_service_client::FileUploadServiceClient,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Status, transport::Channel};

/// The unchanged contract, generated as a client only by build.rs.
#[allow(missing_docs, clippy::all, clippy::pedantic)] // generated code
mod contract {
    pub mod fileupload {
        include!(concat!(env!("OUT_DIR"), "/contract/fileupload.rs"));
    }
}

type Client = FileUploadServiceClient<Channel>;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn client(channel: Channel) -> Client {
    FileUploadServiceClient::new(channel)
        .max_decoding_message_size(8 * MIB)
        .max_encoding_message_size(8 * MIB)
}

/// Deterministic bytes that differ per `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Chunks of `data[start..]` of `size` bytes each: numbered as if the
/// upload had started at chunk 0, the first carrying the name and its
/// offset, the last `is_last` and the file's SHA-256 when `complete`.
fn chunks(name: &str, data: &[u8], start: usize, size: usize, complete: bool) -> Vec<FileChunk> {
    let mut out = Vec::new();
    let mut at = start;
    let mut index = u32::try_from(start.div_ceil(size)).unwrap();
    loop {
        let end = (at + size).min(data.len());
        let last = end == data.len();
        out.push(FileChunk {
            filename: if at == start {
                name.to_owned()
            } else {
                String::new()
            },
            data: data[at..end].to_vec(),
            chunk_index: index,
            is_last: last && complete,
            offset: (at == start && start > 0).then_some(at as u64),
            sha256: if last && complete {
                sha(data)
            } else {
                Vec::new()
            },
        });
        if last {
            return out;
        }
        at = end;
        index += 1;
    }
}

fn plain(name: &str, index: u32, data: &[u8], is_last: bool) -> FileChunk {
    FileChunk {
        filename: name.to_owned(),
        data: data.to_vec(),
        chunk_index: index,
        is_last,
        ..FileChunk::default()
    }
}

async fn send(client: &mut Client, chunks: Vec<FileChunk>) -> Result<UploadResponse, Status> {
    within("upload", client.upload(tokio_stream::iter(chunks)))
        .await
        .map(tonic::Response::into_inner)
}

async fn query(client: &mut Client, name: &str) -> QueryUploadResponse {
    client
        .query_upload(QueryUploadRequest {
            filename: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the server holds `held` bytes of `name` with `in_progress`
/// as given (polling the server's own answer, with a timeout).
async fn wait_for(client: &mut Client, name: &str, held: usize, in_progress: bool) {
    within(&format!("{name} to hold {held} bytes"), async {
        loop {
            let q = query(client, name).await;
            if q.committed_size == held as u64 && q.in_progress == in_progress {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn list_names(client: &mut Client) -> Vec<String> {
    client
        .list_files(ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files
        .into_iter()
        .map(|f| f.filename)
        .collect()
}

fn stored(data_dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(data_dir.join("uploads").join(name)).unwrap()
}

/// An upload call fed chunk by chunk from the test.
struct Feeder {
    tx: mpsc::Sender<FileChunk>,
    call: JoinHandle<Result<UploadResponse, Status>>,
}

impl Feeder {
    fn start(client: &Client) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client
                .upload(ReceiverStream::new(rx))
                .await
                .map(tonic::Response::into_inner)
        });
        Self { tx, call }
    }

    async fn feed(&self, chunks: impl IntoIterator<Item = FileChunk>) {
        for chunk in chunks {
            self.tx.send(chunk).await.unwrap();
        }
    }

    async fn outcome(self) -> Result<UploadResponse, Status> {
        drop(self.tx);
        within("upload outcome", self.call).await.unwrap()
    }
}

fn assert_status(result: Result<UploadResponse, Status>, code: Code, needle: &str) -> Status {
    let status = result.expect_err("the upload should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not contain {needle:?}",
        status.message()
    );
    status
}

#[tokio::test]
async fn invalid_streams_fail_with_statuses_saying_what_and_where() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);

    assert_status(
        send(&mut c, vec![]).await,
        Code::InvalidArgument,
        "empty stream",
    );
    assert_status(
        send(&mut c, vec![plain("", 0, b"x", true)]).await,
        Code::InvalidArgument,
        "invalid file name \"\": it is empty",
    );
    assert_status(
        send(
            &mut c,
            vec![
                plain("a.txt", 0, b"x", false),
                plain("b.txt", 1, b"y", true),
            ],
        )
        .await,
        Code::InvalidArgument,
        "chunk 1 of upload a.txt names another file, \"b.txt\"",
    );
    let gap: Vec<_> = [0, 1, 2, 3, 5]
        .into_iter()
        .map(|i| plain("report.pdf", i, b"data", i == 5))
        .collect();
    assert_status(
        send(&mut c, gap).await,
        Code::InvalidArgument,
        "chunk 5 arrived after chunk 3 of upload report.pdf",
    );
    assert_status(
        send(&mut c, vec![plain("late.bin", 2, b"x", true)]).await,
        Code::InvalidArgument,
        "its first chunk is chunk 2",
    );
    assert_status(
        send(
            &mut c,
            vec![plain("after.bin", 0, b"x", true), plain("", 1, b"y", false)],
        )
        .await,
        Code::InvalidArgument,
        "chunk 1 arrived after the last chunk (0) of upload after.bin",
    );
    // Said once, not once by the fault and again by the resume hint.
    let after = send(
        &mut c,
        vec![
            plain("after2.bin", 0, b"x", true),
            plain("", 1, b"y", false),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(
        after.message().matches("nothing was published").count(),
        1,
        "{after:?}"
    );
    let mut bad_digest = plain("digest.bin", 0, b"x", true);
    bad_digest.sha256 = vec![0; 16];
    assert_status(
        send(&mut c, vec![bad_digest]).await,
        Code::InvalidArgument,
        "sha256 of 16 bytes",
    );
    let mut bad_offset = plain("", 1, b"y", true);
    bad_offset.offset = Some(5);
    assert_status(
        send(
            &mut c,
            vec![plain("offset.bin", 0, b"abc", false), bad_offset],
        )
        .await,
        Code::InvalidArgument,
        "says offset 5, but the previous chunks end at offset 3",
    );
    // Bytes before a bad chunk are kept for a resume; nothing is published.
    assert!(list_names(&mut c).await.is_empty());
    assert_eq!(query(&mut c, "report.pdf").await.committed_size, 16);
    server.stop().await;
}

#[tokio::test]
async fn digest_mismatch_is_data_loss_and_publishes_nothing() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data = bytes(1, 300 * KIB);
    let mut sent = chunks("sum.bin", &data, 0, 64 * KIB, true);
    sent.last_mut().unwrap().sha256 = sha(b"something else");
    assert_status(
        send(&mut c, sent).await,
        Code::DataLoss,
        "nothing was published",
    );
    assert!(list_names(&mut c).await.is_empty());
    assert_eq!(query(&mut c, "sum.bin").await.committed_size, 0);

    // The right digest publishes, and the response carries it.
    let response = send(&mut c, chunks("sum.bin", &data, 0, 64 * KIB, true))
        .await
        .unwrap();
    assert_eq!(response.sha256, sha(&data));
    assert_eq!(stored(server.data_dir.path(), "sum.bin"), data);
    server.stop().await;
}

#[tokio::test]
async fn oversized_files_and_exhausted_quota_are_resource_exhausted() {
    let mut config = test_config();
    config.upload.max_file_size = 200 * KIB as u64;
    config.upload.quota = Some(300 * KIB as u64);
    let server = TestServer::start_with(config).await;
    let mut c = client(server.channel().await);

    let big = bytes(2, 250 * KIB);
    assert_status(
        send(&mut c, chunks("big.bin", &big, 0, 64 * KIB, true)).await,
        Code::ResourceExhausted,
        "exceeds the maximum file size of 204800 bytes at chunk 3",
    );
    assert_eq!(query(&mut c, "big.bin").await.committed_size, 0);

    let first = bytes(3, 150 * KIB);
    send(&mut c, chunks("one.bin", &first, 0, 64 * KIB, true))
        .await
        .unwrap();
    let second = bytes(4, 180 * KIB);
    assert_status(
        send(&mut c, chunks("two.bin", &second, 0, 64 * KIB, true)).await,
        Code::ResourceExhausted,
        "exhausts the storage quota of 307200 bytes",
    );
    assert_eq!(query(&mut c, "two.bin").await.committed_size, 0);
    assert_eq!(list_names(&mut c).await, ["one.bin"]);
    // While a replacement is written, old and new count; once it is
    // stored, only the new one does, so the quota has room again.
    let smaller = bytes(5, 100 * KIB);
    send(&mut c, chunks("one.bin", &smaller, 0, 64 * KIB, true))
        .await
        .unwrap();
    assert_eq!(stored(server.data_dir.path(), "one.bin"), smaller);
    send(&mut c, chunks("two.bin", &second, 0, 64 * KIB, true))
        .await
        .unwrap();
    assert_eq!(list_names(&mut c).await, ["one.bin", "two.bin"]);
    server.stop().await;
}

#[tokio::test]
async fn path_traversal_names_create_nothing_outside_uploads() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let marker = format!("streamhub-escape-{}", std::process::id());
    let names = [
        format!("../{marker}"),
        format!("../../{marker}"),
        format!("../../../../../../tmp/{marker}"),
        format!("/tmp/{marker}"),
        format!("..\\{marker}"),
        "sub/dir.txt".to_owned(),
        ".".to_owned(),
        "..".to_owned(),
        ".streamhub".to_owned(),
        "nul\0byte".to_owned(),
        "new\nline".to_owned(),
        "x".repeat(256),
    ];
    for name in &names {
        assert_status(
            send(&mut c, vec![plain(name, 0, b"escape", true)]).await,
            Code::InvalidArgument,
            "invalid file name",
        );
        let query = c
            .query_upload(QueryUploadRequest {
                filename: name.clone(),
            })
            .await;
        assert_eq!(query.unwrap_err().code(), Code::InvalidArgument, "{name:?}");
        let cancel = c
            .cancel_upload(CancelUploadRequest {
                filename: name.clone(),
            })
            .await;
        assert_eq!(
            cancel.unwrap_err().code(),
            Code::InvalidArgument,
            "{name:?}"
        );
        let download = c
            .download(DownloadRequest {
                filename: name.clone(),
                chunk_size: 0,
            })
            .await;
        assert_eq!(
            download.unwrap_err().code(),
            Code::InvalidArgument,
            "{name:?}"
        );
    }
    assert!(!std::env::temp_dir().join(&marker).exists());
    // No file anywhere in the data directory, and no directory besides the
    // upload store's own (the chat store keeps its database in `chat/`).
    let mut dirs = Vec::new();
    let mut stack = vec![server.data_dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.path() == server.data_dir.path().join("chat") {
                continue;
            }
            assert!(
                entry.file_type().unwrap().is_dir(),
                "unexpected file {}",
                entry.path().display()
            );
            let rel = entry
                .path()
                .strip_prefix(server.data_dir.path())
                .unwrap()
                .to_owned();
            dirs.push(rel.display().to_string());
            stack.push(entry.path());
        }
    }
    dirs.sort();
    assert_eq!(
        dirs,
        [
            "uploads",
            "uploads/.streamhub",
            "uploads/.streamhub/meta",
            "uploads/.streamhub/partial",
            "uploads/.streamhub/tmp"
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn seed_style_client_uploads_a_byte_identical_file() {
    use contract::fileupload::{
        FileChunk as SeedChunk, file_upload_service_client::FileUploadServiceClient as SeedClient,
    };
    let server = TestServer::start().await;
    let data = bytes(5, MIB + 12_345);
    const CHUNK: usize = 64 * 1024;
    let total = data.len().div_ceil(CHUNK);
    // Exactly the seed's client: four fields, chunk_index from 0.
    let seed_chunks: Vec<SeedChunk> = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, piece)| SeedChunk {
            filename: "seed.bin".to_string(),
            data: piece.to_vec(),
            chunk_index: i as u32,
            is_last: i == total - 1,
        })
        .collect();
    let mut seed = SeedClient::new(server.channel().await);
    let response = within("seed upload", seed.upload(tokio_stream::iter(seed_chunks)))
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
    assert_eq!(response.filename, "seed.bin");
    assert_eq!(response.total_bytes, data.len() as u64);
    assert_eq!(response.total_chunks, total as u32);
    assert_eq!(stored(server.data_dir.path(), "seed.bin"), data);

    // A second seed upload of the same name replaces the file whole.
    let other = bytes(6, 10_000);
    let response = within(
        "seed upload",
        seed.upload(tokio_stream::iter(vec![SeedChunk {
            filename: "seed.bin".to_string(),
            data: other.clone(),
            chunk_index: 0,
            is_last: true,
        }])),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(response.total_chunks, 1);
    assert_eq!(stored(server.data_dir.path(), "seed.bin"), other);
    server.stop().await;
}

#[tokio::test]
async fn stream_without_is_last_publishes_nothing_and_can_be_resumed() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data = bytes(7, 500 * KIB);
    let held = 320 * KIB;
    let status = assert_status(
        send(
            &mut c,
            chunks("part.bin", &data[..held], 0, 64 * KIB, false),
        )
        .await,
        Code::Aborted,
        "without a chunk marked is_last",
    );
    assert!(
        status.message().contains("resume from offset 327680"),
        "{status:?}"
    );
    assert!(list_names(&mut c).await.is_empty());
    let q = query(&mut c, "part.bin").await;
    assert_eq!(q.committed_size, held as u64);
    assert!(!q.in_progress);
    assert!(q.expires_at_ms > 0);

    // A resume at the wrong offset names the right one.
    assert_status(
        send(&mut c, chunks("part.bin", &data, 64 * KIB, 64 * KIB, true)).await,
        Code::FailedPrecondition,
        "resume from offset 327680",
    );
    let response = send(&mut c, chunks("part.bin", &data, held, 64 * KIB, true))
        .await
        .unwrap();
    assert_eq!(response.resumed_from, held as u64);
    assert_eq!(response.total_bytes, data.len() as u64);
    assert_eq!(response.sha256, sha(&data));
    assert_eq!(stored(server.data_dir.path(), "part.bin"), data);
    assert_eq!(query(&mut c, "part.bin").await.committed_size, 0);

    // CancelUpload discards held bytes.
    send(
        &mut c,
        chunks("drop.bin", &data[..held], 0, 64 * KIB, false),
    )
    .await
    .unwrap_err();
    let cancelled = c
        .cancel_upload(CancelUploadRequest {
            filename: "drop.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.discarded_bytes, held as u64);
    assert_eq!(query(&mut c, "drop.bin").await.committed_size, 0);
    server.stop().await;
}

#[tokio::test]
async fn client_killed_mid_upload_then_resumed_gives_an_identical_file() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data = bytes(8, 2 * MIB + 777);
    let all = chunks("killed.bin", &data, 0, 64 * KIB, true);

    let feeder = Feeder::start(&client(server.channel().await));
    feeder.feed(all[..10].to_vec()).await;
    wait_for(&mut c, "killed.bin", 10 * 64 * KIB, true).await;
    // Kill the client: the call is dropped mid-stream.
    feeder.call.abort();
    drop(feeder.tx);
    wait_for(&mut c, "killed.bin", 10 * 64 * KIB, false).await;
    assert!(list_names(&mut c).await.is_empty());

    let response = send(
        &mut c,
        chunks("killed.bin", &data, 10 * 64 * KIB, 64 * KIB, true),
    )
    .await
    .unwrap();
    assert_eq!(response.resumed_from, 10 * 64 * KIB as u64);
    assert_eq!(response.total_chunks, all.len() as u32);
    assert_eq!(stored(server.data_dir.path(), "killed.bin"), data);
    server.stop().await;
}

#[tokio::test]
async fn server_shutdown_stops_an_upload_with_unavailable_and_keeps_its_bytes() {
    let mut server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data = bytes(9, MIB);
    let all = chunks("drain.bin", &data, 0, 64 * KIB, true);
    let feeder = Feeder::start(&c);
    feeder.feed(all[..5].to_vec()).await;
    wait_for(&mut c, "drain.bin", 5 * 64 * KIB, true).await;
    server.begin_shutdown();
    let status = assert_status(
        within("upload outcome", feeder.call).await.unwrap(),
        Code::Unavailable,
        "resume from offset 327680",
    );
    assert!(status.message().contains("shutting down"));
    let dir = server.stop().await;

    let server = TestServer::start_in(test_config(), dir).await;
    let mut c = client(server.channel().await);
    assert_eq!(
        query(&mut c, "drain.bin").await.committed_size,
        5 * 64 * KIB as u64
    );
    send(
        &mut c,
        chunks("drain.bin", &data, 5 * 64 * KIB, 64 * KIB, true),
    )
    .await
    .unwrap();
    assert_eq!(stored(server.data_dir.path(), "drain.bin"), data);
    let dir = server.stop().await;

    // Held bytes expire: a restart with a tiny time to live sweeps them.
    let server = TestServer::start_in(test_config(), dir).await;
    let mut c = client(server.channel().await);
    send(&mut c, chunks("stale.bin", &data[..100], 0, 64, false))
        .await
        .unwrap_err();
    assert_eq!(query(&mut c, "stale.bin").await.committed_size, 100);
    let dir = server.stop().await;
    let mut config = test_config();
    config.upload.partial_ttl = Duration::from_millis(1);
    let server = TestServer::start_in(config, dir).await;
    let mut c = client(server.channel().await);
    assert_eq!(query(&mut c, "stale.bin").await.committed_size, 0);
    assert_eq!(list_names(&mut c).await, ["drain.bin"]);
    server.stop().await;
}

#[tokio::test]
async fn server_killed_mid_upload_then_restarted_resumes_to_an_identical_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(10, 3 * MIB + 5);
    let all = chunks("crash.bin", &data, 0, 128 * KIB, true);
    let held = 12 * 128 * KIB;
    {
        let mut process = ServerProcess::spawn(dir.path(), &[]);
        let channel = within(
            "connect",
            tonic::transport::Endpoint::from_shared(process.url())
                .unwrap()
                .connect(),
        )
        .await
        .unwrap();
        let mut c = client(channel);
        let feeder = Feeder::start(&c);
        feeder.feed(all[..12].to_vec()).await;
        wait_for(&mut c, "crash.bin", held, true).await;
        process.signal("KILL");
        process.wait_exit(Duration::from_secs(10)).await;
        assert!(feeder.outcome().await.is_err());
    }
    let process = ServerProcess::spawn(dir.path(), &[]);
    let channel = within(
        "connect",
        tonic::transport::Endpoint::from_shared(process.url())
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut c = client(channel);
    let q = query(&mut c, "crash.bin").await;
    assert_eq!(q.committed_size, held as u64);
    assert!(!q.in_progress);
    assert!(list_names(&mut c).await.is_empty());
    let response = send(&mut c, chunks("crash.bin", &data, held, 128 * KIB, true))
        .await
        .unwrap();
    assert_eq!(response.resumed_from, held as u64);
    assert_eq!(stored(dir.path(), "crash.bin"), data);
}

#[tokio::test]
async fn concurrent_uploads_of_one_name_never_mix() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let a = bytes(11, 600 * KIB);
    let b = bytes(12, 700 * KIB);

    // While one call writes the name, another is refused, naming why.
    let all_a = chunks("same.bin", &a, 0, 64 * KIB, true);
    let feeder = Feeder::start(&c);
    feeder.feed(all_a[..3].to_vec()).await;
    wait_for(&mut c, "same.bin", 3 * 64 * KIB, true).await;
    assert_status(
        send(&mut c, chunks("same.bin", &b, 0, 64 * KIB, true)).await,
        Code::Aborted,
        "upload same.bin is in progress on another call",
    );
    feeder.feed(all_a[3..].to_vec()).await;
    feeder.outcome().await.unwrap();
    assert_eq!(stored(server.data_dir.path(), "same.bin"), a);

    // Many racing uploads: the stored file is always one of them, whole.
    let contents: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(20 + i, 400 * KIB + i as usize))
        .collect();
    let calls: Vec<_> = contents
        .iter()
        .map(|data| {
            let mut c = c.clone();
            let sent = chunks("race.bin", data, 0, 32 * KIB, true);
            tokio::spawn(async move { send(&mut c, sent).await })
        })
        .collect();
    let mut succeeded = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(_) => succeeded.push(i),
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    assert!(!succeeded.is_empty());
    let result = stored(server.data_dir.path(), "race.bin");
    assert!(
        succeeded.iter().any(|&i| contents[i] == result),
        "the stored file is not one of the successful uploads"
    );
    server.stop().await;
}

#[tokio::test]
async fn stored_files_are_listed_and_downloaded_with_their_digest() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let one = bytes(30, 777 * KIB + 3);
    let two = bytes(31, 10);
    send(&mut c, chunks("b-one.bin", &one, 0, 100 * KIB, true))
        .await
        .unwrap();
    send(&mut c, chunks("a-two.bin", &two, 0, 64 * KIB, true))
        .await
        .unwrap();
    send(&mut c, vec![plain("empty.bin", 0, b"", true)])
        .await
        .unwrap();

    let files = c
        .list_files(ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files;
    let summary: Vec<_> = files
        .iter()
        .map(|f| (f.filename.as_str(), f.size, f.sha256.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("a-two.bin", 10, sha(&two)),
            ("b-one.bin", one.len() as u64, sha(&one)),
            ("empty.bin", 0, sha(b"")),
        ]
    );
    assert!(files.iter().all(|f| f.modified_ms > 0));

    // Records are a cache: without them the digest is recomputed.
    std::fs::remove_dir_all(server.data_dir.path().join("uploads/.streamhub/meta")).unwrap();
    std::fs::create_dir(server.data_dir.path().join("uploads/.streamhub/meta")).unwrap();
    let again = c
        .list_files(ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(again, files);

    for (name, data) in [
        ("b-one.bin", &one),
        ("a-two.bin", &two),
        ("empty.bin", &Vec::new()),
    ] {
        let mut stream = c
            .download(DownloadRequest {
                filename: name.to_owned(),
                chunk_size: 50_000,
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        let mut digest = Vec::new();
        while let Some(chunk) = within("download chunk", stream.next()).await {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.offset, got.len() as u64);
            assert_eq!(chunk.total_size, data.len() as u64);
            assert!(chunk.data.len() <= 50_000);
            got.extend_from_slice(&chunk.data);
            if chunk.is_last {
                digest = chunk.sha256;
            }
        }
        assert_eq!(&got, data, "{name}");
        assert_eq!(digest, sha(data), "{name}");
    }
    let missing = c
        .download(DownloadRequest {
            filename: "missing.bin".into(),
            chunk_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

/// Peak resident memory of a process, from /proc (Linux).
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_large_upload_keeps_server_memory_flat() {
    const TOTAL: usize = 256 * MIB;
    const CHUNK: usize = 256 * KIB;
    let dir = tempfile::tempdir().unwrap();
    let process = ServerProcess::spawn(dir.path(), &[]);
    let channel = within(
        "connect",
        tonic::transport::Endpoint::from_shared(process.url())
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut c = client(channel);
    // Warm up (first call, thread pools) before the baseline.
    send(
        &mut c,
        chunks("warm.bin", &bytes(40, 4 * MIB), 0, CHUNK, true),
    )
    .await
    .unwrap();
    let before = vm_hwm_kib(process.child.id());

    // Generate the chunks on the fly: the test holds one chunk at a time.
    let pattern = bytes(41, CHUNK + 4096);
    let (tx, rx) = mpsc::channel::<FileChunk>(2);
    let producer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let count = TOTAL / CHUNK;
        for i in 0..count {
            // Vary each chunk so the file is not periodic.
            let shift = i % 4096;
            let data = pattern[shift..shift + CHUNK].to_vec();
            hasher.update(&data);
            let last = i + 1 == count;
            let chunk = FileChunk {
                filename: if i == 0 {
                    "large.bin".into()
                } else {
                    String::new()
                },
                data,
                chunk_index: i as u32,
                is_last: last,
                offset: None,
                sha256: if last {
                    hasher.clone().finalize().to_vec()
                } else {
                    Vec::new()
                },
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        hasher.finalize().to_vec()
    });
    let response =
        tokio::time::timeout(Duration::from_secs(120), c.upload(ReceiverStream::new(rx)))
            .await
            .expect("large upload timed out")
            .unwrap()
            .into_inner();
    let digest = producer.await.unwrap();
    let after = vm_hwm_kib(process.child.id());
    assert_eq!(response.total_bytes, TOTAL as u64);
    assert_eq!(response.sha256, digest);
    assert_eq!(
        std::fs::metadata(dir.path().join("uploads/large.bin"))
            .unwrap()
            .len(),
        TOTAL as u64
    );
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!("server VmHWM {before} KiB before, {after} KiB after a 256 MiB upload");
    assert!(
        growth_mib < 24,
        "server peak memory grew by {growth_mib} MiB during a 256 MiB upload"
    );
}

#[tokio::test]
async fn cli_uploads_resumes_lists_and_downloads() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("cli.bin");
    let data = bytes(50, 900 * KIB + 1);
    std::fs::write(&source, &data).unwrap();
    // An interrupted earlier upload of the same file.
    send(
        &mut c,
        chunks("cli.bin", &data[..300 * KIB], 0, 100 * KIB, false),
    )
    .await
    .unwrap_err();

    let run = |args: Vec<String>| {
        let url = server.url();
        async move {
            let output = within(
                "streamhub CLI",
                tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
                    .arg("--server")
                    .arg(url)
                    .arg("--json")
                    .args(args)
                    .output(),
            )
            .await
            .unwrap();
            let stdout = String::from_utf8(output.stdout).unwrap();
            assert!(
                output.status.success(),
                "CLI failed: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            );
            stdout
                .lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let lines = run(vec![
        "upload".into(),
        source.display().to_string(),
        "--chunk-size".into(),
        "100KiB".into(),
    ])
    .await;
    assert_eq!(lines[0]["event"], "resuming", "{lines:?}");
    let result = lines.last().unwrap();
    assert_eq!(result["resumed_from"], 300 * KIB);
    assert_eq!(result["sha256"], hex::encode(sha(&data)));
    assert_eq!(stored(server.data_dir.path(), "cli.bin"), data);

    let files = run(vec!["files".into()]).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["filename"], "cli.bin");
    assert_eq!(files[0]["size"], data.len());

    let target = work.path().join("back.bin");
    let done = run(vec![
        "download".into(),
        "cli.bin".into(),
        "-o".into(),
        target.display().to_string(),
    ])
    .await;
    assert_eq!(done[0]["verified"], true);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    server.stop().await;
}

#[tokio::test]
async fn chunks_up_to_4_mib_fit_the_default_message_limit() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data = bytes(60, 4 * MIB + 1);
    for size in [MIB, 4 * MIB] {
        let response = send(&mut c, chunks("wide.bin", &data, 0, size, true))
            .await
            .unwrap();
        assert_eq!(response.total_chunks as usize, data.len().div_ceil(size));
        assert_eq!(stored(server.data_dir.path(), "wide.bin"), data);
    }
    let mut stream = c
        .download(DownloadRequest {
            filename: "wide.bin".into(),
            chunk_size: u32::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = within("download chunk", stream.next()).await {
        got.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(got, data);
    server.stop().await;
}

// ---- Hardening (issue 11): starvation, caps, idle calls, files that are
// not what they seem, takeover of a quiet upload, deadlines and sizes. ----

/// An upload call that sent `first` and then stays silent (its sender is
/// kept open).
struct Silent {
    _tx: mpsc::Sender<FileChunk>,
    call: JoinHandle<Result<UploadResponse, Status>>,
}

fn silent(client: &Client, first: FileChunk) -> Silent {
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(first).unwrap();
    let mut client = client.clone();
    let call = tokio::spawn(async move {
        client
            .upload(ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    Silent { _tx: tx, call }
}

/// The example: 512 silent uploads on one connection must not
/// hang anybody else's Upload, QueryUpload, ListFiles, CancelUpload,
/// Download or chat join (today each holds a blocking thread).
#[tokio::test]
async fn silent_uploads_on_one_connection_starve_nobody() {
    let server = TestServer::start().await;
    let mut other = client(server.channel().await);
    let data = bytes(70, 300 * KIB);
    send(&mut other, chunks("before.bin", &data, 0, 64 * KIB, true))
        .await
        .unwrap();

    let attacker = client(server.channel().await);
    let calls: Vec<Silent> = (0..512)
        .map(|n| silent(&attacker, plain(&format!("idle-{n}"), 0, b"x", false)))
        .collect();
    // Beyond the per-connection cap the calls are refused at once; the
    // others hold their one byte and wait.
    let cap = test_config().upload.max_uploads_per_connection;
    let mut held = Vec::new();
    for (n, call) in calls.into_iter().enumerate() {
        if call.call.is_finished() {
            let status = call.call.await.unwrap().unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("on this connection"),
                "{status:?}"
            );
        } else {
            held.push((n, call));
        }
    }
    let mut refused = 512 - held.len();
    let mut holding = Vec::new();
    for (n, call) in held {
        let Silent { _tx, call } = call;
        let mut call = call;
        tokio::select! {
            result = &mut call => {
                let status = result.unwrap().unwrap_err();
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
            () = async {
                let mut c = other.clone();
                wait_for(&mut c, &format!("idle-{n}"), 1, true).await;
            } => holding.push((_tx, call)),
        }
    }
    assert_eq!(holding.len(), cap);
    assert_eq!(refused, 512 - cap);

    // Everybody else is served promptly.
    within(
        "another client's upload",
        send(&mut other, chunks("after.bin", &data, 0, 64 * KIB, true)),
    )
    .await
    .unwrap();
    within(
        "query",
        other.query_upload(QueryUploadRequest {
            filename: "after.bin".into(),
        }),
    )
    .await
    .unwrap();
    let names = within("list", list_names(&mut other)).await;
    assert_eq!(names, ["after.bin", "before.bin"]);
    within(
        "cancel",
        other.cancel_upload(CancelUploadRequest {
            filename: "nothing-held".into(),
        }),
    )
    .await
    .unwrap();
    let mut stream = within(
        "download",
        other.download(DownloadRequest {
            filename: "before.bin".into(),
            chunk_size: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = within("download chunk", stream.next()).await {
        got.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(got, data);
    // A chat room nobody has opened yet.
    use streamhub::proto::chat::{ChatMessage, chat_service_client::ChatServiceClient};
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("chat-room", "fresh-room".parse().unwrap());
    let mut chat = within(
        "chat join",
        ChatServiceClient::new(server.channel().await).chat(request),
    )
    .await
    .unwrap()
    .into_inner();
    tx.send(ChatMessage {
        sender: "ann".into(),
        message: "hello".into(),
        ..ChatMessage::default()
    })
    .await
    .unwrap();
    let echoed = within("chat echo", chat.message()).await.unwrap().unwrap();
    assert_eq!(echoed.message, "hello");
    drop(holding);
    server.stop().await;
}

#[tokio::test]
async fn uploads_and_downloads_beyond_their_caps_are_resource_exhausted() {
    let mut config = test_config();
    config.upload.max_concurrent_uploads = 2;
    config.upload.max_uploads_per_connection = 1;
    config.upload.max_concurrent_downloads = 1;
    let server = TestServer::start_with(config).await;
    let a = client(server.channel().await);
    let b = client(server.channel().await);
    let mut c = client(server.channel().await);

    let first = silent(&a, plain("a.bin", 0, b"a", false));
    wait_for(&mut c, "a.bin", 1, true).await;
    assert_status(
        send(&mut a.clone(), vec![plain("a2.bin", 0, b"a", true)]).await,
        Code::ResourceExhausted,
        "too many uploads open on this connection: the limit is 1",
    );
    let second = silent(&b, plain("b.bin", 0, b"b", false));
    wait_for(&mut c, "b.bin", 1, true).await;
    assert_status(
        send(&mut c, vec![plain("c.bin", 0, b"c", true)]).await,
        Code::ResourceExhausted,
        "too many uploads open on this server: the limit is 2",
    );
    drop((first, second));
    within("a slot to come free", async {
        loop {
            match send(&mut c, vec![plain("c.bin", 0, b"c", true)]).await {
                Ok(_) => return,
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A download holds its slot until it ends (this one cannot end before
    // its client reads: the file is larger than the HTTP/2 windows).
    let big = bytes(77, 8 * MIB);
    send(&mut c, chunks("d.bin", &big, 0, MIB, true))
        .await
        .unwrap();
    let mut stream = c
        .download(DownloadRequest {
            filename: "d.bin".into(),
            chunk_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let refused = c
        .download(DownloadRequest {
            filename: "c.bin".into(),
            chunk_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("downloads"), "{refused:?}");
    while let Some(chunk) = within("download chunk", stream.next()).await {
        chunk.unwrap();
    }
    within("the download slot to come free", async {
        loop {
            if c.download(DownloadRequest {
                filename: "c.bin".into(),
                chunk_size: 0,
            })
            .await
            .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_idle_upload_ends_aborted_with_its_offset_and_resumes() {
    let mut config = test_config();
    config.upload.idle_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let mut c = client(server.channel().await);
    let data = bytes(71, 5 * 64 * KIB + 9);
    let all = chunks("idle.bin", &data, 0, 64 * KIB, true);
    let feeder = Feeder::start(&c);
    feeder.feed(all[..3].to_vec()).await;
    let status = assert_status(
        within("the idle upload to end", feeder.call).await.unwrap(),
        Code::Aborted,
        "resume from offset 196608",
    );
    assert!(status.message().contains("idle_timeout"), "{status:?}");
    wait_for(&mut c, "idle.bin", 3 * 64 * KIB, false).await;
    // A call that never sends its first chunk ends too.
    let (_tx, rx) = mpsc::channel::<FileChunk>(1);
    let status = within(
        "a call without chunks",
        c.clone().upload(ReceiverStream::new(rx)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let response = send(
        &mut c,
        chunks("idle.bin", &data, 3 * 64 * KIB, 64 * KIB, true),
    )
    .await
    .unwrap();
    assert_eq!(response.resumed_from, 3 * 64 * KIB as u64);
    assert_eq!(stored(server.data_dir.path(), "idle.bin"), data);
    server.stop().await;
}

/// A loopback TCP proxy for one connection that can be frozen: it stops
/// forwarding in both directions but keeps both sockets open, like a
/// client whose cable was pulled.
struct Proxy {
    addr: std::net::SocketAddr,
    freeze: tokio_util::sync::CancellationToken,
}

async fn proxy(target: std::net::SocketAddr) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let freeze = tokio_util::sync::CancellationToken::new();
    let frozen = freeze.clone();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
        let (ri, wi) = inbound.into_split();
        let (ro, wo) = outbound.into_split();
        let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut to: tokio::net::tcp::OwnedWriteHalf,
                    frozen: tokio_util::sync::CancellationToken| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = tokio::select! {
                    () = frozen.cancelled() => break,
                    n = from.read(&mut buf) => n.unwrap_or(0),
                };
                if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            // Frozen: hold both sockets open, forward nothing.
            std::future::pending::<()>().await;
            drop((from, to));
        };
        tokio::join!(pipe(ri, wo, frozen.clone()), pipe(ro, wi, frozen.clone()));
    });
    Proxy { addr, freeze }
}

/// Issue 11 item 5: the client vanishes without closing its connection;
/// a new call for the name takes over once the old one has been quiet for
/// `upload.takeover_after`, and the upload completes from the held offset.
#[tokio::test]
async fn a_quiet_holder_is_taken_over_and_the_resume_completes() {
    let mut config = test_config();
    config.upload.takeover_after = Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let mut c = client(server.channel().await);
    let data = bytes(72, 6 * 64 * KIB + 1);
    let all = chunks("cable.bin", &data, 0, 64 * KIB, true);

    let proxy = proxy(server.addr).await;
    let via_proxy = client(common::connect(format!("http://{}", proxy.addr)).await);
    let feeder = Feeder::start(&via_proxy);
    feeder.feed(all[..4].to_vec()).await;
    wait_for(&mut c, "cable.bin", 4 * 64 * KIB, true).await;
    proxy.freeze.cancel();

    // The holder goes quiet: QueryUpload stops calling it in progress, and
    // a resume takes the name over.
    wait_for(&mut c, "cable.bin", 4 * 64 * KIB, false).await;
    let response = send(
        &mut c,
        chunks("cable.bin", &data, 4 * 64 * KIB, 64 * KIB, true),
    )
    .await
    .unwrap();
    assert_eq!(response.resumed_from, 4 * 64 * KIB as u64);
    assert_eq!(stored(server.data_dir.path(), "cable.bin"), data);

    // A live holder is never displaced.
    let live = Feeder::start(&c);
    live.feed(chunks("live.bin", &data, 0, 64 * KIB, true)[..1].to_vec())
        .await;
    wait_for(&mut c, "live.bin", 64 * KIB, true).await;
    assert_status(
        send(&mut c, chunks("live.bin", &data, 0, 64 * KIB, true)).await,
        Code::Aborted,
        "in progress on another call",
    );
    drop(live);
    drop(feeder);
    server.stop().await;
}

/// New-user finding 1: `streamhub upload` of a name another call is
/// writing waited silently (up to 15 s, whatever `--retries` said), then
/// uploaded anyway. Now a busy name fails at once with `--retries 0`, and
/// each retry says that it waits.
#[tokio::test]
async fn cli_upload_of_a_busy_name_retries_only_per_retries_and_says_so() {
    let mut config = test_config();
    // The holder below never goes quiet for the length of the test.
    config.upload.takeover_after = Duration::from_secs(3600);
    let server = TestServer::start_with(config).await;
    let mut c = client(server.channel().await);
    let data = bytes(74, 3 * 64 * KIB);
    let holder = Feeder::start(&c);
    holder
        .feed(chunks("busy.bin", &data, 0, 64 * KIB, true)[..1].to_vec())
        .await;
    wait_for(&mut c, "busy.bin", 64 * KIB, true).await;

    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("busy.bin");
    std::fs::write(&source, &data).unwrap();
    let cli = |retries: &'static str| {
        let url = server.url();
        let source = source.clone();
        async move {
            within(
                "the CLI",
                tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
                    .arg("--server")
                    .arg(url)
                    .arg("upload")
                    .arg(&source)
                    .args(["--retries", retries])
                    .env_remove("RUST_BACKTRACE")
                    .stdin(std::process::Stdio::null())
                    .output(),
            )
            .await
            .unwrap()
        }
    };

    let output = cli("0").await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another call is uploading busy.bin right now")
            && stderr.contains("--retries 0")
            && !stderr.contains("asking again"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let output = cli("2").await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let waits: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("another call is uploading busy.bin right now; asking again"))
        .collect();
    assert_eq!(waits.len(), 2, "{stderr}");
    assert!(waits[1].contains("retry 2 of 2"), "{stderr}");
    assert!(
        stderr.contains("gave up after 2 retries (--retries 2)"),
        "{stderr}"
    );

    // The holder was never disturbed: it completes with its own bytes.
    holder
        .feed(chunks("busy.bin", &data, 0, 64 * KIB, true)[1..].to_vec())
        .await;
    holder.outcome().await.unwrap();
    assert_eq!(stored(server.data_dir.path(), "busy.bin"), data);
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_resource_exhausted_and_keeps_the_bytes() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let mut sent = chunks("big.bin", &bytes(73, 128 * KIB), 0, 64 * KIB, false);
    sent.push(FileChunk {
        data: vec![7; 5 * MIB],
        chunk_index: 2,
        ..FileChunk::default()
    });
    let status = assert_status(send(&mut c, sent).await, Code::ResourceExhausted, "");
    assert!(
        status.message().contains("resume from offset 131072"),
        "{status:?}"
    );
    assert_eq!(
        query(&mut c, "big.bin").await.committed_size,
        128 * KIB as u64
    );
    server.stop().await;
}

/// Reads a spawned server's log (stderr) into a shared buffer.
fn capture_log(process: &mut ServerProcess) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = process.child.stderr.take().unwrap();
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

async fn wait_log(log: &std::sync::Mutex<String>, needle: &str) {
    within(&format!("log line {needle:?}"), async {
        while !log.lock().unwrap().contains(needle) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_upload_past_its_deadline_keeps_its_bytes_and_says_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut process =
        ServerProcess::spawn_on("127.0.0.1:0", dir.path(), &[], std::process::Stdio::piped());
    let log = capture_log(&mut process);
    let mut c = client(common::connect(process.url()).await);
    let all = chunks("late.bin", &bytes(74, 3 * 64 * KIB), 0, 64 * KIB, true);
    let (tx, rx) = mpsc::channel(8);
    for chunk in &all[..2] {
        tx.send(chunk.clone()).await.unwrap();
    }
    // A ready connection, so the call's clock starts when it is sent.
    query(&mut c, "late.bin").await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(1000));
    let status = within("the deadline", c.upload(request)).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    wait_log(&log, "deadline passed during chunk").await;
    assert!(!log.lock().unwrap().contains("client disconnected"));
    wait_for(&mut c, "late.bin", 2 * 64 * KIB, false).await;
    drop(tx);
}

/// Bytes the process has read with read(2) and friends (Linux).
fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|line| line.strip_prefix("rchar:"))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn downloads_that_never_read_keep_the_server_bounded_and_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = ServerProcess::spawn_on(
        "127.0.0.1:0",
        dir.path(),
        &["--set", "upload.idle_timeout=1s"],
        std::process::Stdio::piped(),
    );
    let log = capture_log(&mut process);
    let pid = process.child.id();
    let mut c = client(common::connect(process.url()).await);
    let big = bytes(75, 64 * MIB);
    send(&mut c, chunks("big.bin", &big, 0, MIB, true))
        .await
        .unwrap();
    send(&mut c, chunks("small.bin", &big[..MIB], 0, 64 * KIB, true))
        .await
        .unwrap();

    let before = rchar(pid);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut reader = client(common::connect(process.url()).await);
        let mut stream = reader
            .download(DownloadRequest {
                filename: "big.bin".into(),
                chunk_size: 4 * MIB as u32,
            })
            .await
            .unwrap()
            .into_inner();
        let first = within("first chunk", stream.next()).await.unwrap().unwrap();
        assert!(first.data.len() <= MIB, "chunk size is clamped to 1 MiB");
        stalled.push((reader, stream));
    }
    // Let the server work on something else meanwhile.
    let mut stream = c
        .download(DownloadRequest {
            filename: "small.bin".into(),
            chunk_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = within("download chunk", stream.next()).await {
        chunk.unwrap();
    }
    let read = rchar(pid) - before;
    // Each stalled download holds about one chunk beyond the client's
    // HTTP/2 windows (2 MiB per stream by default), not tens of MiB.
    assert!(
        read < 32 * MIB as u64,
        "the server read {} MiB for downloads nobody reads",
        read / MIB as u64
    );

    // Stalled past upload.idle_timeout, each is stopped: the client gets
    // what was buffered, then ABORTED.
    wait_log(&log, "download stopped: its client took no data").await;
    let (_reader, mut stream) = stalled.remove(0);
    let end = within("the stalled download's end", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await;
    // The first stalled stream may have been stopped, or be one whose
    // watchdog fires later; either way it never completes silently.
    if let Some(status) = end {
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(status.message().contains("took no data"), "{status:?}");
    }
}

#[tokio::test]
async fn links_fifos_and_directories_under_uploads_are_never_followed_or_served() {
    let server = TestServer::start().await;
    let mut c = client(server.channel().await);
    let data_dir = server.data_dir.path();
    let uploads = data_dir.join("uploads");
    let own = uploads.join(".streamhub");
    let outside_dir = tempfile::tempdir().unwrap();
    let outside = outside_dir.path().join("secret.txt");
    std::fs::write(&outside, b"outside secret").unwrap();
    std::os::unix::fs::symlink(&outside, uploads.join("link")).unwrap();
    std::fs::create_dir(uploads.join("adir")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(uploads.join("fifo"))
        .status()
        .unwrap();
    assert!(fifo.success());
    std::os::unix::fs::symlink(&outside, own.join("partial/plink")).unwrap();
    std::os::unix::fs::symlink(&outside, own.join("meta/m.bin")).unwrap();

    let no_path = |status: &Status| {
        let message = status.message();
        assert!(
            !message.contains(data_dir.to_str().unwrap()) && !message.contains("/tmp"),
            "{message:?}"
        );
    };
    for name in ["link", "fifo", "adir"] {
        let status = within(
            "download",
            c.download(DownloadRequest {
                filename: name.into(),
                chunk_size: 0,
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{name}: {status:?}");
        no_path(&status);
        let q = within("query", query(&mut c, name)).await;
        assert!(
            !q.stored && q.stored_size == 0 && q.committed_size == 0,
            "{name}: {q:?}"
        );
    }
    assert!(within("list", list_names(&mut c)).await.is_empty());

    let status = assert_status(
        send(&mut c, vec![plain("adir", 0, b"x", true)]).await,
        Code::AlreadyExists,
        "not a stored file",
    );
    no_path(&status);

    // A link in the server's own state is never written through.
    let q = query(&mut c, "plink").await;
    assert_eq!(q.committed_size, 0);
    let status = assert_status(
        send(&mut c, vec![plain("plink", 0, b"overwrite", true)]).await,
        Code::FailedPrecondition,
        "not a regular file",
    );
    no_path(&status);
    let mut resume = plain("plink", 1, b"more", true);
    resume.offset = Some(14);
    let status = send(&mut c, vec![resume]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    no_path(&status);
    let cancelled = c
        .cancel_upload(CancelUploadRequest {
            filename: "plink".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.discarded_bytes, 0);

    // A link where a digest record goes is replaced, not followed.
    let data = bytes(76, 1000);
    send(&mut c, chunks("m.bin", &data, 0, 300, true))
        .await
        .unwrap();
    let files = c
        .list_files(ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].sha256, sha(&data));
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside secret");
    assert!(
        std::fs::symlink_metadata(own.join("partial/plink"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    server.stop().await;
}
