//! Every call ends with the status the gRPC spec gives it: undecodable
//! messages (INTERNAL), messages over the size limit (RESOURCE_EXHAUSTED),
//! request cardinality (UNIMPLEMENTED), deadlines (DEADLINE_EXCEEDED), on
//! every RPC, streaming ones included; and the standard services as their
//! specs say. Many cases need bytes tonic's client would never send, so
//! they go through a raw HTTP/2 client (`h2`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{TestServer, test_config, within};
use futures::StreamExt;
use prost::Message;
use streamhub::proto::{
    chat::ChatMessage,
    fileupload::{
        DownloadRequest, FileChunk, QueryUploadRequest,
        file_upload_service_client::FileUploadServiceClient,
    },
    telemetry::{ListServicesRequest, telemetry_service_client::TelemetryServiceClient},
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A string field claiming 5 bytes with 2 present: does not decode.
const GARBAGE: &[u8] = &[0x0a, 0x05, 0x61, 0x62];

/// One gRPC frame: not compressed, length, bytes.
fn frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).unwrap());
    frame.put_slice(message);
    frame.freeze()
}

/// Only the 5-byte header of a frame claiming `len` bytes.
fn header_claiming(len: u32) -> Bytes {
    let mut frame = BytesMut::with_capacity(5);
    frame.put_u8(0);
    frame.put_u32(len);
    frame.freeze()
}

fn encoded(message: &impl Message) -> Bytes {
    frame(&message.encode_to_vec())
}

/// How a raw call ended.
#[derive(Debug)]
struct Ended {
    /// The response messages before the status (raw bytes, frames joined).
    data: Vec<u8>,
    code: Code,
    message: String,
    /// The `chat-last-seq` the call ended with, if any.
    last_seq: Option<String>,
}

/// A raw gRPC call over its own HTTP/2 connection.
struct RawCall {
    send: h2::SendStream<Bytes>,
    response: h2::client::ResponseFuture,
}

impl RawCall {
    async fn open(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> Self {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let (client, connection) = within("handshake", h2::client::handshake(tcp))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = within("ready", client.ready()).await.unwrap();
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (response, send) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        Self { send, response }
    }

    fn send(&mut self, bytes: Bytes) {
        self.send.send_data(bytes, false).unwrap();
    }

    fn close(&mut self) {
        self.send.send_data(Bytes::new(), true).unwrap();
    }

    /// Waits for the call's status (in the headers of a trailers-only
    /// response, or in the trailers).
    async fn ended(self) -> Ended {
        let send = self.send;
        let response = within("response headers", self.response).await.unwrap();
        if let Some(ended) = status_in(response.headers(), Vec::new()) {
            return ended;
        }
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = within("response data", body.data()).await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = within("trailers", body.trailers())
            .await
            .unwrap()
            .expect("trailers");
        drop(send);
        status_in(&trailers, data).expect("grpc-status in trailers")
    }
}

fn status_in(headers: &http::HeaderMap, data: Vec<u8>) -> Option<Ended> {
    let status = tonic::Status::from_header_map(headers)?;
    Some(Ended {
        data,
        code: status.code(),
        message: status.message().to_owned(),
        last_seq: headers
            .get("chat-last-seq")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    })
}

fn assert_code(what: &str, ended: &Ended, code: Code) {
    assert_eq!(ended.code, code, "{what}: {ended:?}");
}

const LIVE_FEED: &str = "/telemetry.TelemetryService/LiveFeed";
const SUBSCRIBE: &str = "/telemetry.TelemetryService/Subscribe";
const GET_SNAPSHOT: &str = "/telemetry.TelemetryService/GetSnapshot";
const UPLOAD: &str = "/fileupload.FileUploadService/Upload";
const CHAT: &str = "/chat.ChatService/Chat";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

fn payload(service: &str) -> Bytes {
    encoded(&common::payload(service, 10.0, 20.0, 0))
}

fn chunk(name: &str, data: &[u8], is_last: bool) -> FileChunk {
    FileChunk {
        filename: name.into(),
        data: data.to_vec(),
        chunk_index: 0,
        is_last,
        offset: None,
        sha256: Vec::new(),
    }
}

fn chat_message(text: &str) -> Bytes {
    encoded(&ChatMessage {
        sender: "ann".into(),
        message: text.into(),
        ..ChatMessage::default()
    })
}

/// The bytes the server holds of upload `name`, once its call has ended.
async fn held(server: &TestServer, name: &str) -> u64 {
    let mut client = FileUploadServiceClient::new(server.channel().await);
    within("the upload's call to end", async {
        loop {
            let status = client
                .query_upload(QueryUploadRequest {
                    filename: name.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if !status.in_progress {
                return status.committed_size;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_message_that_does_not_decode_ends_every_kind_of_call_with_internal() {
    let server = TestServer::start().await;

    // The example: one valid payload, then bytes that do not decode.
    let mut feed = RawCall::open(&server, LIVE_FEED, &[]).await;
    feed.send(payload("edge"));
    feed.send(frame(GARBAGE));
    feed.close();
    assert_code("live feed", &feed.ended().await, Code::Internal);

    // Client streaming: the bytes before it stay held for a resume.
    let mut upload = RawCall::open(&server, UPLOAD, &[]).await;
    upload.send(encoded(&chunk("bad.bin", b"hello", false)));
    upload.send(frame(GARBAGE));
    upload.close();
    assert_code("upload", &upload.ended().await, Code::Internal);

    // Bidirectional chat: the reader task's failure ends the member's call
    // (before, the call stayed open with the failure unseen).
    let mut chat = RawCall::open(&server, CHAT, &[]).await;
    chat.send(chat_message("hi"));
    chat.send(frame(GARBAGE));
    let ended = chat.ended().await;
    assert_code("chat", &ended, Code::Internal);
    assert!(ended.message.contains("message 2"), "{ended:?}");

    // Server streaming, on the hand-written Subscribe route: a request
    // message followed by bytes that do not decode.
    let mut subscribe = RawCall::open(&server, SUBSCRIBE, &[]).await;
    subscribe.send(encoded(&common::request("edge", 0)));
    subscribe.send(frame(GARBAGE));
    assert_code("subscribe", &subscribe.ended().await, Code::Internal);

    // Unary.
    let mut snapshot = RawCall::open(&server, GET_SNAPSHOT, &[]).await;
    snapshot.send(frame(GARBAGE));
    snapshot.close();
    assert_code("get snapshot", &snapshot.ended().await, Code::Internal);

    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_ends_every_kind_of_call_with_resource_exhausted() {
    let mut config = test_config();
    config.limits.max_message_size = 2048;
    config.chat.max_text_bytes = 1000;
    let server = TestServer::start_with(config).await;
    let too_large = header_claiming(4096);

    let mut snapshot = RawCall::open(&server, GET_SNAPSHOT, &[]).await;
    snapshot.send(too_large.clone());
    assert_code(
        "get snapshot",
        &snapshot.ended().await,
        Code::ResourceExhausted,
    );

    let mut check = RawCall::open(&server, HEALTH_CHECK, &[]).await;
    check.send(header_claiming(5 * 1024 * 1024));
    assert_code(
        "health check",
        &check.ended().await,
        Code::ResourceExhausted,
    );

    let mut feed = RawCall::open(&server, LIVE_FEED, &[]).await;
    feed.send(payload("edge"));
    feed.send(too_large.clone());
    let ended = feed.ended().await;
    assert_code("live feed", &ended, Code::ResourceExhausted);
    assert!(ended.message.contains("payload 2"), "{ended:?}");

    let mut subscribe = RawCall::open(&server, SUBSCRIBE, &[]).await;
    subscribe.send(too_large.clone());
    assert_code(
        "subscribe",
        &subscribe.ended().await,
        Code::ResourceExhausted,
    );

    let mut chat = RawCall::open(&server, CHAT, &[]).await;
    chat.send(chat_message("hi"));
    chat.send(too_large.clone());
    assert_code("chat", &chat.ended().await, Code::ResourceExhausted);

    let mut reflection = RawCall::open(&server, REFLECTION_V1, &[]).await;
    reflection.send(too_large.clone());
    assert_code(
        "reflection",
        &reflection.ended().await,
        Code::ResourceExhausted,
    );

    // An upload keeps the bytes it had.
    let mut upload = RawCall::open(&server, UPLOAD, &[]).await;
    upload.send(encoded(&chunk("big.bin", b"kept", false)));
    upload.send(too_large.clone());
    let ended = upload.ended().await;
    assert_code("upload", &ended, Code::ResourceExhausted);
    assert!(ended.message.contains("resume from offset 4"), "{ended:?}");
    assert_eq!(held(&server, "big.bin").await, 4);

    // A response over the limit: tonic says OUT_OF_RANGE, the spec
    // RESOURCE_EXHAUSTED.
    let channel = server.channel().await;
    for i in 0..20 {
        common::publish(channel.clone(), &format!("{i:0>150}"), 1.0).await;
    }
    let refused = TelemetryServiceClient::new(channel)
        .list_services(ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    server.stop().await;
}

#[tokio::test]
async fn a_call_without_its_one_request_message_or_with_two_is_unimplemented() {
    let server = TestServer::start().await;

    let mut snapshot = RawCall::open(&server, GET_SNAPSHOT, &[]).await;
    snapshot.close();
    assert_code("get snapshot", &snapshot.ended().await, Code::Unimplemented);

    let mut subscribe = RawCall::open(&server, SUBSCRIBE, &[]).await;
    subscribe.close();
    assert_code("subscribe", &subscribe.ended().await, Code::Unimplemented);

    let mut twice = RawCall::open(&server, SUBSCRIBE, &[]).await;
    twice.send(encoded(&common::request("edge", 0)));
    twice.send(encoded(&common::request("edge", 0)));
    twice.close();
    assert_code("subscribe twice", &twice.ended().await, Code::Unimplemented);

    // The generated unary and server-streaming routes: before, the second
    // message was decoded and dropped, and the call answered as if sent once.
    common::publish(server.channel().await, "edge", 1.0).await;
    let health = encoded(&HealthCheckRequest::default());
    let download = encoded(&DownloadRequest {
        filename: "none.bin".into(),
        ..DownloadRequest::default()
    });
    let twice_each = [
        (GET_SNAPSHOT, encoded(&common::request("edge", 0))),
        (HEALTH_CHECK, health.clone()),
        ("/grpc.health.v1.Health/Watch", health),
        ("/fileupload.FileUploadService/Download", download),
    ];
    for (path, message) in twice_each {
        let mut call = RawCall::open(&server, path, &[]).await;
        call.send(message.clone());
        call.send(message);
        call.close();
        let ended = call.ended().await;
        assert_code(path, &ended, Code::Unimplemented);
        assert!(ended.message.contains(path), "says where: {ended:?}");
        assert!(ended.data.is_empty(), "{path}: answered nothing: {ended:?}");
    }
    // A second message that arrives in the same DATA frame as the first,
    // or starts in the middle of one, is seen too.
    let mut joined = BytesMut::new();
    joined.extend_from_slice(&encoded(&common::request("edge", 0)));
    joined.extend_from_slice(&encoded(&common::request("edge", 0))[..2]);
    let mut call = RawCall::open(&server, GET_SNAPSHOT, &[]).await;
    call.send(joined.freeze());
    assert_code("joined", &call.ended().await, Code::Unimplemented);
    // One message is still answered.
    let mut once = RawCall::open(&server, GET_SNAPSHOT, &[]).await;
    once.send(encoded(&common::request("edge", 0)));
    once.close();
    let ended = once.ended().await;
    assert_code("once", &ended, Code::Ok);
    assert!(!ended.data.is_empty(), "{ended:?}");

    server.stop().await;
}

#[tokio::test]
async fn grpc_timeout_ends_every_kind_of_call_with_deadline_exceeded() {
    let server = TestServer::start().await;
    let timeout = [("grpc-timeout", "300m")];

    // The example: a Subscribe whose client never cancels (here
    // for a service that never reports, so nothing else would end it).
    let mut subscribe = RawCall::open(&server, SUBSCRIBE, &timeout).await;
    subscribe.send(encoded(&common::request("silent", 0)));
    subscribe.close();
    assert_code(
        "subscribe",
        &subscribe.ended().await,
        Code::DeadlineExceeded,
    );

    let mut feed = RawCall::open(&server, LIVE_FEED, &timeout).await;
    feed.send(payload("edge"));
    assert_code("live feed", &feed.ended().await, Code::DeadlineExceeded);

    let mut chat = RawCall::open(&server, CHAT, &timeout).await;
    chat.send(chat_message("hi"));
    let ended = chat.ended().await;
    assert_code("chat", &ended, Code::DeadlineExceeded);
    assert!(!ended.data.is_empty(), "the message was delivered first");
    // Like every other ending of a chat call: the last seq it delivered.
    assert_eq!(ended.last_seq.as_deref(), Some("1"), "chat-last-seq");

    let mut watch = RawCall::open(&server, "/grpc.health.v1.Health/Watch", &timeout).await;
    watch.send(encoded(&HealthCheckRequest::default()));
    watch.close();
    assert_code("health watch", &watch.ended().await, Code::DeadlineExceeded);

    // Client streaming: before, tonic's own timeout answered CANCELLED.
    // The upload keeps its bytes for a resume.
    let mut upload = RawCall::open(&server, UPLOAD, &timeout).await;
    upload.send(encoded(&chunk("slow.bin", b"abc", false)));
    assert_code("upload", &upload.ended().await, Code::DeadlineExceeded);
    assert_eq!(held(&server, "slow.bin").await, 3);

    // A call that ends in time is untouched.
    let mut quick = RawCall::open(&server, GET_SNAPSHOT, &[("grpc-timeout", "10S")]).await;
    quick.send(encoded(&common::request("nobody", 0)));
    quick.close();
    assert_code("quick", &quick.ended().await, Code::NotFound);

    server.stop().await;
}

#[tokio::test]
async fn health_watch_of_an_unknown_service_says_service_unknown_and_stays_open() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let unknown = || HealthCheckRequest {
        service: "no.such.Service".into(),
    };
    // Check keeps NOT_FOUND.
    let check = health.check(unknown()).await.unwrap_err();
    assert_eq!(check.code(), Code::NotFound);

    let mut watch = health.watch(unknown()).await.unwrap().into_inner();
    let first = within("first status", watch.next()).await.unwrap().unwrap();
    assert_eq!(first.status, i32::from(ServingStatus::ServiceUnknown));
    // Still open: it ends only when the server shuts down.
    server.begin_shutdown();
    let end = within("end", watch.next()).await.unwrap().unwrap_err();
    common::assert_shutting_down("health watch", &end);
}

const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

#[tokio::test]
async fn a_reflection_request_that_does_not_decode_ends_the_call_with_internal() {
    let server = TestServer::start().await;
    for path in [REFLECTION_V1, REFLECTION_V1ALPHA] {
        let mut call = RawCall::open(&server, path, &[]).await;
        call.send(frame(GARBAGE));
        call.close();
        let ended = call.ended().await;
        assert_code(path, &ended, Code::Internal);
        assert!(ended.message.contains("request 1"), "{ended:?}");
    }
    server.stop().await;
}

/// The `grpc.reflection.v1` conversation of one test: requests in, answers
/// out, on one open stream.
mod v1_reflection {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic_reflection::pb::v1::{
        ExtensionRequest, ServerReflectionRequest, ServerReflectionResponse,
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    pub struct Conversation {
        requests: mpsc::Sender<ServerReflectionRequest>,
        answers: tonic::Streaming<ServerReflectionResponse>,
    }

    impl Conversation {
        pub async fn open(server: &TestServer) -> Self {
            let (requests, rx) = mpsc::channel(4);
            let answers = ServerReflectionClient::new(server.channel().await)
                .server_reflection_info(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            Self { requests, answers }
        }

        pub async fn ask(&mut self, request: MessageRequest) -> MessageResponse {
            let request = ServerReflectionRequest {
                host: "here".into(),
                message_request: Some(request),
            };
            self.requests.send(request.clone()).await.unwrap();
            let answer = within("reflection answer", self.answers.next())
                .await
                .expect("an answer, not the end of the stream")
                .expect("an answer, not a status");
            assert_eq!(answer.original_request, Some(request));
            answer.message_response.expect("message_response")
        }

        pub async fn end(mut self) -> Option<tonic::Status> {
            within("reflection end", self.answers.next())
                .await
                .and_then(Result::err)
        }

        /// The files of a FileDescriptorResponse, decoded.
        pub async fn files(
            &mut self,
            request: MessageRequest,
        ) -> Vec<prost_types::FileDescriptorProto> {
            match self.ask(request).await {
                MessageResponse::FileDescriptorResponse(files) => files
                    .file_descriptor_proto
                    .iter()
                    .map(|raw| prost_types::FileDescriptorProto::decode(&raw[..]).unwrap())
                    .collect(),
                other => panic!("expected files, got {other:?}"),
            }
        }

        pub async fn not_found(&mut self, request: MessageRequest) {
            match self.ask(request).await {
                MessageResponse::ErrorResponse(error) => {
                    assert_eq!(error.error_code, Code::NotFound as i32, "{error:?}");
                    assert!(!error.error_message.is_empty());
                }
                other => panic!("expected an ErrorResponse, got {other:?}"),
            }
        }
    }

    pub fn symbol(name: &str) -> MessageRequest {
        MessageRequest::FileContainingSymbol(name.into())
    }

    pub fn file(name: &str) -> MessageRequest {
        MessageRequest::FileByFilename(name.into())
    }

    pub fn extension(containing_type: &str, extension_number: i32) -> MessageRequest {
        MessageRequest::FileContainingExtension(ExtensionRequest {
            containing_type: containing_type.into(),
            extension_number,
        })
    }
}

#[tokio::test]
async fn a_failed_reflection_lookup_is_an_error_response_and_the_stream_stays_open() {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    use v1_reflection::{Conversation, extension, file, symbol};

    let mut server = TestServer::start().await;
    let mut talk = Conversation::open(&server).await;

    // Before, the first of these ended the whole stream with NOT_FOUND.
    talk.not_found(symbol("no.such.Symbol")).await;
    talk.not_found(file("no/such.proto")).await;
    talk.not_found(extension("telemetry.MetricsRequest", 100))
        .await;
    talk.not_found(MessageRequest::AllExtensionNumbersOfType(
        "no.such.Type".into(),
    ))
    .await;

    // grpcurl's `list`.
    let MessageResponse::ListServicesResponse(list) =
        talk.ask(MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected the services");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "telemetry.TelemetryService",
        "fileupload.FileUploadService",
        "chat.ChatService",
        "streamhub.ServerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }

    // grpcurl's `describe`: the file of a symbol, then each dependency by
    // name; services, methods, messages, fields, enums and nested types.
    let files = talk.files(symbol("telemetry.TelemetryService")).await;
    assert_eq!(files[0].name(), "telemetry.proto");
    assert!(
        files[0]
            .service
            .iter()
            .any(|s| s.name() == "TelemetryService")
    );
    for dependency in &files[0].dependency {
        let got = talk.files(file(dependency)).await;
        assert_eq!(got[0].name(), dependency);
    }
    for (name, in_file) in [
        ("telemetry.TelemetryService.Subscribe", "telemetry.proto"),
        ("telemetry.MetricsRequest", "telemetry.proto"),
        ("telemetry.MetricsRequest.service_name", "telemetry.proto"),
        ("chat.MessageKind", "chat.proto"),
        ("fileupload.FileUploadService.Download", "fileupload.proto"),
        (
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            "health.proto",
        ),
        ("grpc.health.v1.HealthCheckResponse", "health.proto"),
    ] {
        let got = talk.files(symbol(name)).await;
        assert!(
            got[0].name().ends_with(in_file),
            "{name}: {}",
            got[0].name()
        );
    }
    let got = talk
        .files(symbol("grpc.reflection.v1.ServerReflection"))
        .await;
    assert_eq!(got[0].package(), "grpc.reflection.v1");
    let got = talk.files(file("chat.proto")).await;
    assert_eq!(got[0].name(), "chat.proto");
    // The same file again: still answered.
    let got = talk.files(file("chat.proto")).await;
    assert_eq!(got[0].name(), "chat.proto");
    // No extensions are defined: an empty list for a known type.
    let MessageResponse::AllExtensionNumbersResponse(numbers) = talk
        .ask(MessageRequest::AllExtensionNumbersOfType(
            "telemetry.MetricsRequest".into(),
        ))
        .await
    else {
        panic!("expected extension numbers");
    };
    assert_eq!(numbers.base_type_name, "telemetry.MetricsRequest");
    assert!(numbers.extension_number.is_empty());

    // Still open; it ends on shutdown like every stream.
    talk.not_found(symbol("still.Open")).await;
    server.begin_shutdown();
    let end = talk.end().await.expect("a status");
    common::assert_shutting_down("reflection", &end);
}

#[tokio::test]
async fn v1alpha_reflection_answers_a_failed_lookup_and_stays_open() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = futures::stream::iter([
        ask(MessageRequest::FileContainingSymbol(
            "no.such.Symbol".into(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "chat.ChatService".into(),
        )),
    ]);
    let mut answers = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let first = within("first answer", answers.next())
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ErrorResponse(error)) = first.message_response else {
        panic!("expected an ErrorResponse: {first:?}");
    };
    assert_eq!(error.error_code, Code::NotFound as i32);
    let second = within("second answer", answers.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            second.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{second:?}"
    );
    // The client closed its side: the call ends with OK.
    assert!(within("end", answers.next()).await.is_none());
    server.stop().await;
}

/// A malformed `grpc-timeout` is refused with INTERNAL naming the header
/// and its form (as grpc-go does), before the handler runs: it used to be
/// ignored, so the call ran without the deadline its client meant.
#[tokio::test]
async fn a_malformed_grpc_timeout_is_internal_naming_the_header() {
    let server = TestServer::start().await;
    for bad in ["abc", "1", "-1S", "123456789S", "1x", "S"] {
        let mut call = RawCall::open(&server, GET_SNAPSHOT, &[("grpc-timeout", bad)]).await;
        call.send(encoded(&common::request("nobody", 0)));
        call.close();
        let ended = call.ended().await;
        assert_code(bad, &ended, Code::Internal);
        assert!(
            ended.message.contains("grpc-timeout") && ended.message.contains("8 digits"),
            "{bad}: {}",
            ended.message
        );
    }
    // A well-formed one still runs the call.
    let mut quick = RawCall::open(&server, GET_SNAPSHOT, &[("grpc-timeout", "10S")]).await;
    quick.send(encoded(&common::request("nobody", 0)));
    quick.close();
    assert_code("well-formed", &quick.ended().await, Code::NotFound);
    server.stop().await;
}
