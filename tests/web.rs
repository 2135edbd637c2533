//! The plain HTTP side of the server, over loopback HTTP/1.1 on the gRPC
//! port: `GET /files/NAME` with ranges and validators, `/metrics` parsed
//! as Prometheus text after known traffic, the embedded dashboard,
//! gRPC-Web and CORS.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::{TestServer, payload, test_config, within};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message;
use sha2::{Digest, Sha256};
use streamhub::proto::{
    chat::{ChatMessage, SendRequest, chat_service_client::ChatServiceClient},
    fileupload::{DownloadRequest, FileChunk, file_upload_service_client::FileUploadServiceClient},
    streamhub::ServerInfoResponse,
    telemetry::{
        WatchEvent, WatchRequest, telemetry_service_client::TelemetryServiceClient,
        watch_event::Event,
    },
};

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// One HTTP/1.1 request to the server.
async fn http(
    server: &TestServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = within(
        "an HTTP response",
        client.request(request.body(Full::new(body)).unwrap()),
    )
    .await
    .unwrap();
    let (parts, body) = response.into_parts();
    let body = within("the body", body.collect()).await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> Reply {
    http(server, Method::GET, path, headers, Bytes::new()).await
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", reply.headers))
        .to_str()
        .unwrap()
}

async fn upload(server: &TestServer, name: &str, data: &[u8]) {
    let mut client = FileUploadServiceClient::new(server.channel().await);
    let chunks: Vec<FileChunk> = data
        .chunks(4096)
        .enumerate()
        .map(|(i, piece)| FileChunk {
            filename: name.into(),
            data: piece.to_vec(),
            chunk_index: u32::try_from(i).unwrap(),
            is_last: (i + 1) * 4096 >= data.len(),
            ..FileChunk::default()
        })
        .collect();
    let response = client
        .upload(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert!(response.success);
}

#[tokio::test]
async fn files_are_served_with_length_etag_and_ranges() {
    let server = TestServer::start().await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    upload(&server, "data.bin", &data).await;
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&data)));

    let whole = get(&server, "/files/data.bin", &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body, data);
    assert_eq!(header(&whole, "content-length"), "100000");
    assert_eq!(header(&whole, "etag"), etag);
    assert_eq!(header(&whole, "accept-ranges"), "bytes");
    assert_eq!(header(&whole, "content-type"), "application/octet-stream");
    assert!(header(&whole, "content-disposition").contains("data.bin"));
    assert!(header(&whole, "last-modified").ends_with("GMT"));

    let part = get(&server, "/files/data.bin", &[("range", "bytes=1000-1999")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&part, "content-range"), "bytes 1000-1999/100000");
    assert_eq!(header(&part, "content-length"), "1000");
    assert_eq!(part.body, data[1000..2000]);

    // What `curl -C -` sends to resume: from an offset to the end.
    let tail = get(&server, "/files/data.bin", &[("range", "bytes=99990-")]).await;
    assert_eq!(tail.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.body, data[99_990..]);
    let suffix = get(&server, "/files/data.bin", &[("range", "bytes=-5")]).await;
    assert_eq!(header(&suffix, "content-range"), "bytes 99995-99999/100000");
    assert_eq!(suffix.body, data[99_995..]);

    let beyond = get(&server, "/files/data.bin", &[("range", "bytes=100000-")]).await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&beyond, "content-range"), "bytes */100000");

    // Validators: unchanged is 304; a range for another version is the
    // whole (current) file.
    let cached = get(&server, "/files/data.bin", &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
    let stale = get(
        &server,
        "/files/data.bin",
        &[("range", "bytes=0-9"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body.len(), data.len());
    let fresh = get(
        &server,
        "/files/data.bin",
        &[("range", "bytes=0-9"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(fresh.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(fresh.body, data[..10]);

    let head = http(&server, Method::HEAD, "/files/data.bin", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(header(&head, "content-length"), "100000");
    assert!(head.body.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn missing_and_invalid_names_are_404_without_server_paths() {
    let server = TestServer::start().await;
    let data_dir = server.data_dir.path().to_string_lossy().into_owned();
    for path in [
        "/files/missing.bin",
        "/files/..",
        "/files/%2E%2E%2Fsecret",
        "/files/.streamhub",
        "/files/a%2Fb",
        "/files/",
    ] {
        let reply = get(&server, path, &[]).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        let body = String::from_utf8_lossy(&reply.body);
        assert!(!body.contains(&data_dir), "{path}: {body}");
        assert!(!body.contains("uploads/"), "{path}: {body}");
    }
    server.stop().await;
}

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|got| got == *v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let server = TestServer::start().await;
    let channel = server.channel().await;

    // Telemetry: 3 samples, one Subscribe left open after its first.
    let mut subscribe = TelemetryServiceClient::new(channel.clone())
        .subscribe(common::request("api", 0))
        .await
        .unwrap()
        .into_inner();
    let (_, status) = common::live_feed(
        channel.clone(),
        vec![
            payload("api", 1.0, 1.0, 0),
            payload("api", 2.0, 1.0, 0),
            payload("api", 3.0, 1.0, 0),
        ],
    )
    .await;
    assert!(status.is_none());
    within("a sample", subscribe.message())
        .await
        .unwrap()
        .unwrap();
    // Uploads: 10,000 bytes. Chat: 2 messages.
    upload(&server, "m.bin", &[1u8; 10_000]).await;
    let mut chat = ChatServiceClient::new(channel.clone());
    for text in ["a", "b"] {
        chat.send(SendRequest {
            room: "m".into(),
            message: Some(ChatMessage {
                sender: "bot".into(),
                message: text.into(),
                ..ChatMessage::default()
            }),
        })
        .await
        .unwrap();
    }

    let reply = get(&server, "/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(header(&reply, "content-type").starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let metrics = scrape(&text);
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&metrics, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    assert_eq!(get("streamhub_telemetry_samples_total", &[]), 3.0);
    let delivered = get("streamhub_telemetry_deliveries_total", &[]);
    assert!(delivered >= 1.0, "{delivered}");
    assert!(get("streamhub_telemetry_coalesced_total", &[]) >= 0.0);
    // Default ttl (1 h): nothing dropped, but the counter is there.
    assert_eq!(get("streamhub_telemetry_services_dropped_total", &[]), 0.0);
    assert_eq!(get("streamhub_upload_bytes_total", &[]), 10_000.0);
    assert_eq!(get("streamhub_chat_messages_total", &[]), 2.0);
    assert_eq!(get("streamhub_chat_cutoffs_total", &[]), 0.0);
    assert_eq!(
        get(
            "streamhub_rpcs_total",
            &[
                ("method", "/fileupload.FileUploadService/Upload"),
                ("code", "OK")
            ]
        ),
        1.0
    );
    assert_eq!(
        get(
            "streamhub_rpcs_total",
            &[("method", "/chat.ChatService/Send"), ("code", "OK")]
        ),
        2.0
    );
    assert_eq!(
        get(
            "streamhub_open_streams",
            &[("method", "/telemetry.TelemetryService/Subscribe")]
        ),
        1.0
    );
    assert!(
        get("streamhub_connections", &[]) >= 2.0,
        "gRPC + this scrape"
    );
    assert!(get("process_resident_memory_bytes", &[]) > 0.0);
    assert!(get("process_cpu_seconds_total", &[]) >= 0.0);

    // A failing call is counted under its code.
    let missing = TelemetryServiceClient::new(channel.clone())
        .get_snapshot(common::request("nobody", 0))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let text = String::from_utf8(get_body(&server, "/metrics").await).unwrap();
    assert_eq!(
        value(
            &scrape(&text),
            "streamhub_rpcs_total",
            &[
                ("method", "/telemetry.TelemetryService/GetSnapshot"),
                ("code", "NOT_FOUND")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    server.stop().await;
}

async fn get_body(server: &TestServer, path: &str) -> Vec<u8> {
    get(server, path, &[]).await.body.to_vec()
}

#[tokio::test]
async fn two_servers_in_one_process_count_separately() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    common::publish(a.channel().await, "only-a", 1.0).await;
    let count = |text: Vec<u8>| {
        value(
            &scrape(&String::from_utf8(text).unwrap()),
            "streamhub_telemetry_samples_total",
            &[],
        )
    };
    assert_eq!(count(get_body(&a, "/metrics").await), Some(1.0));
    assert_eq!(count(get_body(&b, "/metrics").await), Some(0.0));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let server = TestServer::start().await;
    let index = get(&server, "/", &[]).await;
    assert_eq!(index.status, StatusCode::OK);
    assert!(header(&index, "content-type").starts_with("text/html"));
    assert_eq!(header(&index, "cache-control"), "no-cache");
    let etag = header(&index, "etag").to_owned();
    assert!(String::from_utf8_lossy(&index.body).contains("<html"));
    let again = get(&server, "/", &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let named = get(&server, "/index.html", &[]).await;
    assert_eq!(named.body, index.body);
    let missing = get(&server, "/no/such/page.js", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

/// A gRPC-Web frame of `message` (flag 0, big-endian length).
fn grpc_web_frame(message: &impl Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    Bytes::from(frame)
}

/// Splits a gRPC-Web response body into its (complete) messages and
/// trailers.
fn grpc_web_body(body: &[u8]) -> (Vec<Vec<u8>>, HashMap<String, String>) {
    let (mut messages, mut trailers) = (Vec::new(), HashMap::new());
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest.len() < 5 + len {
            break;
        }
        let payload = &rest[5..5 + len];
        if rest[0] & 0x80 == 0 {
            messages.push(payload.to_vec());
        } else {
            for line in String::from_utf8_lossy(payload).split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    trailers.insert(k.trim().to_lowercase(), v.trim().to_owned());
                }
            }
        }
        rest = &rest[5 + len..];
    }
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_over_http1_reaches_the_services() {
    let server = TestServer::start().await;
    let reply = http(
        &server,
        Method::POST,
        "/streamhub.ServerService/GetServerInfo",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
        ],
        grpc_web_frame(&streamhub::proto::streamhub::ServerInfoRequest {}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(header(&reply, "content-type").starts_with("application/grpc-web"));
    let (messages, trailers) = grpc_web_body(&reply.body);
    assert_eq!(trailers.get("grpc-status").map(String::as_str), Some("0"));
    let info = ServerInfoResponse::decode(messages[0].as_slice()).unwrap();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));

    // An unknown method is UNIMPLEMENTED, as for native gRPC.
    let unknown = http(
        &server,
        Method::POST,
        "/nope.Nope/Nope",
        &[("content-type", "application/grpc-web+proto")],
        Bytes::new(),
    )
    .await;
    assert_eq!(header(&unknown, "grpc-status"), "12");
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_over_grpc_web_on_http1() {
    let server = TestServer::start().await;
    common::publish(server.channel().await, "api", 5.0).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("{}/telemetry.TelemetryService/Watch", server.url()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(grpc_web_frame(&WatchRequest {
            pattern: "api".into(),
            ..WatchRequest::default()
        })))
        .unwrap();
    let response = within("the Watch response", client.request(request))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    let mut body = response.into_body();
    let mut received = Vec::new();
    // The stream stays open: read frames as they come, until the live
    // marker and the current sample have arrived.
    let events = loop {
        let frame = within("a body frame", body.frame())
            .await
            .expect("stream open")
            .unwrap();
        if let Some(data) = frame.data_ref() {
            received.extend_from_slice(data);
        }
        let (messages, _) = grpc_web_body(&received);
        if messages.len() >= 2 {
            break messages;
        }
    };
    let first = WatchEvent::decode(events[0].as_slice()).unwrap().event;
    assert!(matches!(first, Some(Event::Live(_))), "{first:?}");
    match WatchEvent::decode(events[1].as_slice()).unwrap().event {
        Some(Event::Sample(sample)) => {
            assert_eq!(sample.service_name, "api");
            assert!((sample.cpu_usage - 5.0).abs() < f64::EPSILON);
        }
        other => panic!("expected the sample, got {other:?}"),
    }
    drop(body);
    server.stop().await;
}

async fn preflight(server: &TestServer, origin: &str) -> Reply {
    http(
        server,
        Method::OPTIONS,
        "/telemetry.TelemetryService/Watch",
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,x-grpc-web"),
        ],
        Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn cors_is_same_origin_unless_configured() {
    let server = TestServer::start().await;
    let reply = preflight(&server, "http://elsewhere.example").await;
    assert!(
        !reply
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "{:?}",
        reply.headers
    );
    // Nor does a gRPC-Web call from another origin: the browser keeps the answer from that page.
    let answer = http(
        &server,
        Method::POST,
        "/streamhub.ServerService/GetServerInfo",
        &[
            ("origin", "http://elsewhere.example"),
            ("content-type", "application/grpc-web+proto"),
        ],
        grpc_web_frame(&streamhub::proto::streamhub::ServerInfoRequest {}),
    )
    .await;
    assert!(
        !answer
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "{:?}",
        answer.headers
    );
    server.stop().await;

    let mut config = test_config();
    config.http.cors_origins = vec!["http://dash.example".into()];
    let server = TestServer::start_with(config).await;
    let allowed = preflight(&server, "http://dash.example").await;
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        "http://dash.example"
    );
    assert!(header(&allowed, "access-control-allow-headers").contains("x-grpc-web"));
    let other = preflight(&server, "http://elsewhere.example").await;
    assert!(
        !other
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
    );
    let answer = http(
        &server,
        Method::POST,
        "/streamhub.ServerService/GetServerInfo",
        &[
            ("origin", "http://dash.example"),
            ("content-type", "application/grpc-web+proto"),
        ],
        grpc_web_frame(&streamhub::proto::streamhub::ServerInfoRequest {}),
    )
    .await;
    assert!(header(&answer, "access-control-expose-headers").contains("grpc-status"));
    server.stop().await;
}

/// An `h2` client connection, driven by a task the caller may abort.
async fn h2_connection(
    server: &TestServer,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// Sends `GET path` on `send` and returns the response head, its body
/// left unread.
async fn h2_get(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> http::Response<h2::RecvStream> {
    let request = Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap();
    let (response, _) = within("a free stream", send.clone().ready())
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    within("a response head", response).await.unwrap()
}

#[tokio::test]
async fn unread_files_responses_take_download_slots_and_give_them_back() {
    let mut config = test_config();
    config.upload.max_downloads_per_connection = 2;
    config.upload.max_concurrent_downloads = 3;
    let server = TestServer::start_with(config).await;
    // Much more than the HTTP/2 windows: an unread response stays open.
    upload(&server, "big.bin", &vec![7; 1024 * 1024]).await;

    let (mut first, first_task) = h2_connection(&server).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let response = h2_get(&mut first, "/files/big.bin").await;
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    // The connection's cap.
    let refused = h2_get(&mut first, "/files/big.bin").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // The server's cap: one more on another connection, then no more.
    let (mut second, second_task) = h2_connection(&server).await;
    let third = h2_get(&mut second, "/files/big.bin").await;
    assert_eq!(third.status(), StatusCode::OK);
    let refused = h2_get(&mut second, "/files/big.bin").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // A gRPC Download is refused too: the same slots.
    let mut client = FileUploadServiceClient::new(server.channel().await);
    let download = client
        .download(DownloadRequest {
            filename: "big.bin".into(),
            ..DownloadRequest::default()
        })
        .await;
    let status = match download {
        Err(status) => status,
        Ok(response) => within("the download's status", response.into_inner().message())
            .await
            .unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // The first client goes away without reading: its slots come back.
    drop(held);
    drop(first);
    first_task.abort();
    within("the slots to come back", async {
        loop {
            let (mut fresh, task) = h2_connection(&server).await;
            let response = h2_get(&mut fresh, "/files/big.bin").await;
            task.abort();
            if response.status() == StatusCode::OK {
                return;
            }
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(third);
    drop(second);
    second_task.abort();
    server.stop().await;
}

/// A `GET /files/` client that stops reading (HTTP/1.1, a tiny receive
/// window, so its response blocks on a full TCP buffer) loses its download
/// slot after `upload.idle_timeout`, as a stalled gRPC Download does: the
/// next client is served instead of getting 429 for ever.
#[tokio::test]
async fn a_files_client_that_stops_reading_frees_its_download_slot() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut config = test_config();
    config.upload.idle_timeout = Duration::from_millis(300);
    config.upload.max_concurrent_downloads = 1;
    let server = TestServer::start_with(config).await;
    let data = vec![7u8; 16 << 20];
    upload(&server, "big.bin", &data).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    stalled
        .write_all(b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The response has begun (so it holds the one slot); then no more is
    // read from this socket.
    let mut head = [0u8; 12];
    within(
        "the stalled response's status line",
        stalled.read_exact(&mut head),
    )
    .await
    .unwrap();
    assert_eq!(
        &head,
        b"HTTP/1.1 200",
        "{:?}",
        String::from_utf8_lossy(&head)
    );

    within("the stalled response's slot to be freed", async {
        loop {
            let reply = get(&server, "/files/big.bin", &[("range", "bytes=0-9")]).await;
            if reply.status == StatusCode::PARTIAL_CONTENT {
                assert_eq!(&reply.body[..], &data[..10]);
                break;
            }
            assert_eq!(
                reply.status,
                StatusCode::TOO_MANY_REQUESTS,
                "{:?}",
                reply.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(stalled);
}
