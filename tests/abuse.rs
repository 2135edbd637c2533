//! Abuse of the connection layer, as an attacker would try it: connections
//! that never finish a handshake or never send a call, more connections
//! than allowed, rapid resets, CONTINUATION floods and header bombs, PING
//! and SETTINGS floods from a peer that does not read, empty DATA floods,
//! streams beyond the limit, half-sent messages on many streams,
//! HTTP/1.1 requests with huge headers, and a server out of descriptors.
//!
//! Each attack is bounded in count and time, and each test checks that
//! another client's calls keep succeeding. Raw HTTP/2 is written by hand
//! (frames and literal HPACK) where the `h2` crate would refuse to
//! misbehave; the `h2` client is used where a well-formed client is enough.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, test_config, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Asserts that `channel` still gets answers.
async fn assert_serves(what: &str, channel: &Channel) {
    let mut health = HealthClient::new(channel.clone());
    let response = within(what, health.check(HealthCheckRequest::default()))
        .await
        .unwrap_or_else(|status| panic!("{what}: {status:?}"));
    assert_eq!(response.into_inner().status, 1, "{what}: SERVING");
}

/// Waits until a new connection to `server` is admitted and answered (a
/// place was freed; the server may still be closing the old connection).
async fn wait_admitted(what: &str, server: &TestServer) {
    within(what, async {
        loop {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(server.url())
                .unwrap()
                .connect()
                .await
                && HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Asserts that a new client can connect and get answers.
async fn assert_new_client_served(what: &str, server: &TestServer) {
    let channel = server.channel().await;
    assert_serves(what, &channel).await;
}

/// Waits until the server closes `stream` (EOF or reset), reading and
/// discarding whatever it sends first.
async fn wait_closed(what: &str, stream: &mut TcpStream) {
    let mut buf = vec![0; 64 * 1024];
    within(what, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Descriptors open in this process (server and clients of every test
/// running at the moment).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

// --- Raw HTTP/2 ---------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// HPACK integer with an `n`-bit prefix under `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap());
        return;
    }
    out.push(first | u8::try_from(max).unwrap());
    value -= max;
    while value >= 128 {
        out.push(u8::try_from(value % 128).unwrap() | 0x80);
        value /= 128;
    }
    out.push(u8::try_from(value).unwrap());
}

/// A header block of literal fields (no indexing, no Huffman).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend(value.as_bytes());
    }
    out
}

/// The header block of a gRPC call to `path`.
fn grpc_request(path: &str) -> Vec<u8> {
    header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A raw TCP connection that has sent the preface and an empty SETTINGS.
async fn raw_http2(server: &TestServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();
    stream
}

/// Reads one frame: (type, flags, stream, payload); `None` at EOF.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], id, payload))
}

/// Writes `bytes` unless the peer stops reading for a while (the server
/// applying back-pressure is one of the good outcomes of a flood); returns
/// whether everything was written.
async fn write_or_stall(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// An `h2` client connection, driven in the background.
async fn h2_client(server: &TestServer) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn grpc_http_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

// --- Connections that do nothing ----------------------------------------

#[tokio::test]
async fn connections_that_never_finish_a_handshake_are_closed_after_the_handshake_timeout() {
    let mut config = test_config();
    config.limits.handshake_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(config).await;
    let client = server.channel().await;
    assert_serves("before", &client).await;

    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half_preface = TcpStream::connect(server.addr).await.unwrap();
    half_preface.write_all(&PREFACE[..10]).await.unwrap();
    // The preface and a SETTINGS header announcing 60 bytes, 6 of them sent.
    let mut half_settings = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(&frame(SETTINGS, 0, 0, &[0; 60])[..15]);
    half_settings.write_all(&bytes).await.unwrap();
    let mut half_request = TcpStream::connect(server.addr).await.unwrap();
    half_request
        .write_all(b"GET / HTTP/1.1\r\nHost: x")
        .await
        .unwrap();

    wait_closed("silent connection closed", &mut silent).await;
    wait_closed("half preface closed", &mut half_preface).await;
    wait_closed("half SETTINGS closed", &mut half_settings).await;
    wait_closed("half HTTP/1.1 request closed", &mut half_request).await;
    // A client that finished its handshake long before is untouched.
    assert_serves("after", &client).await;
    server.stop().await;
}

#[tokio::test]
async fn a_connection_without_open_streams_is_closed_after_the_idle_timeout_pings_or_not() {
    let mut config = test_config();
    config.limits.idle_timeout = Duration::from_millis(400);
    // Pings flow much more often than the idle timeout: they must not count.
    config.limits.http2_keepalive_interval = Duration::from_millis(50);
    let server = TestServer::start_with(config).await;

    // A stream open the whole time keeps its connection.
    let subscriber = server.channel().await;
    let mut telemetry =
        streamhub::proto::telemetry::telemetry_service_client::TelemetryServiceClient::new(
            subscriber.clone(),
        );
    let mut updates = within(
        "subscribe",
        telemetry.subscribe(common::request("idle-test", 0)),
    )
    .await
    .unwrap()
    .into_inner();

    // An HTTP/2 client that answers pings but opens no stream.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driven = tokio::spawn(conn);
    // An HTTP/1.1 client after one request.
    let mut http1 = TcpStream::connect(server.addr).await.unwrap();
    http1
        .write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    let ended = within("idle HTTP/2 connection closed", driven)
        .await
        .unwrap();
    assert!(ended.is_ok(), "closed with GOAWAY, not an error: {ended:?}");
    wait_closed("idle HTTP/1.1 connection closed", &mut http1).await;
    drop(send);

    // The subscriber's connection outlived two idle timeouts with its
    // stream open, and still delivers.
    common::publish(server.channel().await, "idle-test", 1.0).await;
    let sample = within("sample", futures::StreamExt::next(&mut updates))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sample.service_name, "idle-test");
    assert_serves("subscriber's connection", &subscriber).await;
    drop(updates);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once_while_others_keep_working() {
    let mut config = test_config();
    config.limits.max_connections = 4;
    // Only the cap may close the extra connections within the test's wait.
    config.limits.handshake_timeout = Duration::from_secs(600);
    let server = TestServer::start_with(config).await;
    let client = server.channel().await;
    assert_serves("first client", &client).await;
    let mut holders = Vec::new();
    for _ in 0..3 {
        holders.push(h2_client(&server).await);
    }
    let fds_before = open_fds();

    let mut refused = Vec::new();
    for _ in 0..200 {
        refused.push(TcpStream::connect(server.addr).await.unwrap());
    }
    for (i, stream) in refused.iter_mut().enumerate() {
        wait_closed(&format!("extra connection {i} closed"), stream).await;
    }
    drop(refused);
    assert!(
        open_fds() < fds_before + 100,
        "descriptors stay bounded: {} before, {} now",
        fds_before,
        open_fds()
    );
    assert_serves("first client after the flood", &client).await;

    // One connection goes: a new client gets its place.
    holders.pop();
    wait_admitted("a new client is admitted", &server).await;
    server.stop().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let mut config = test_config();
    config.limits.max_connections = 100;
    config.limits.max_connections_per_peer = 3;
    config.limits.handshake_timeout = Duration::from_secs(600);
    let server = TestServer::start_with(config).await;
    // 127.0.0.1 takes its three: one client and two idle holders.
    let client = server.channel().await;
    assert_serves("first client", &client).await;
    let holders = vec![h2_client(&server).await, h2_client(&server).await];
    // More from 127.0.0.1 are closed at once...
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    wait_closed("a fourth connection from 127.0.0.1 closed", &mut extra).await;
    assert_serves("first client after the refusal", &client).await;
    // ...while another address is served (all of 127.0.0.0/8 is loopback).
    let other = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    assert_serves("a client from 127.0.0.2", &other).await;
    // And 127.0.0.1 gets a place back when one of its connections goes.
    drop(holders);
    wait_admitted("127.0.0.1 admitted again", &server).await;
    server.stop().await;
}

// --- HTTP/2 floods ---------------------------------------------------------

#[tokio::test]
async fn rapid_resets_do_not_hurt_other_clients() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    let mut attacker = h2_client(&server).await;
    for _ in 0..20_000 {
        let Ok(ready) = within("stream capacity", attacker.clone().ready()).await else {
            // The server closed the attacker's connection: fine.
            break;
        };
        attacker = ready;
        let Ok((_, mut stream)) = attacker.send_request(
            grpc_http_request("/telemetry.TelemetryService/GetSnapshot"),
            false,
        ) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    assert_serves("bystander", &client).await;
    assert_new_client_served("new client", &server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_at_the_header_list_limit() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    let mut attacker = raw_http2(&server).await;
    let mut bytes = frame(
        HEADERS,
        0,
        1,
        &grpc_request("/telemetry.TelemetryService/GetSnapshot"),
    );
    // 4 MiB of header block in CONTINUATION frames that never end it.
    let fragment = header_block(&[("x-filler", &"a".repeat(16_000))]);
    for _ in 0..256 {
        bytes.extend(frame(CONTINUATION, 0, 1, &fragment));
    }
    // The server may close before it has read everything.
    let _ = write_or_stall(&mut attacker, &bytes).await;
    let mut goaway = false;
    within("attacker's connection closed", async {
        while let Some((kind, ..)) = read_frame(&mut attacker).await {
            goaway |= kind == GOAWAY;
        }
    })
    .await;
    assert!(goaway, "the server says why with GOAWAY");
    assert_serves("bystander", &client).await;
    server.stop().await;
}

/// The fields of a health check, plus `extra`.
fn health_check_fields<'a>(extra: (&'a str, &'a str)) -> Vec<u8> {
    header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        extra,
    ])
}

/// Sends `block` as one request on a new raw connection (in frames of at
/// most 16,000 bytes) and reads until the server answers it or refuses;
/// true if it was answered.
async fn answered(server: &TestServer, block: &[u8]) -> bool {
    let mut stream = raw_http2(server).await;
    let mut chunks = block.chunks(16_000).peekable();
    let first = chunks.next().unwrap();
    let flags = if chunks.peek().is_none() {
        END_HEADERS
    } else {
        0
    };
    let mut bytes = frame(HEADERS, flags | END_STREAM, 1, first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(CONTINUATION, flags, 1, chunk));
    }
    let _ = write_or_stall(&mut stream, &bytes).await;
    within("an answer or a refusal", async {
        loop {
            match read_frame(&mut stream).await {
                None | Some((GOAWAY, ..)) | Some((RST_STREAM, _, 1, _)) => return false,
                Some((HEADERS, _, 1, _)) => return true,
                Some(_) => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_oversized_header_block_is_refused_and_normal_metadata_is_not() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    // 8 KiB of metadata (a large bearer token) is served.
    let token = "t".repeat(8 * 1024);
    assert!(answered(&server, &health_check_fields(("authorization", &token))).await);
    // 64 KiB is refused.
    let big = "b".repeat(64 * 1024);
    assert!(!answered(&server, &health_check_fields(("x-big", &big))).await);
    assert_serves("bystander", &client).await;
    server.stop().await;
}

#[tokio::test]
async fn ping_and_settings_floods_from_a_peer_that_does_not_read_stay_bounded() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    for (name, flood) in [
        ("PING", frame(PING, 0, 0, &[7; 8])),
        ("SETTINGS", frame(SETTINGS, 0, 0, &[])),
    ] {
        let mut attacker = raw_http2(&server).await;
        let batch: Vec<u8> = flood.repeat(10_000);
        // Up to 100,000 frames, never reading an acknowledgment.
        for _ in 0..10 {
            if !write_or_stall(&mut attacker, &batch).await {
                break;
            }
        }
        assert_serves(&format!("bystander during the {name} flood"), &client).await;
        assert_new_client_served(&format!("new client during the {name} flood"), &server).await;
        drop(attacker);
    }
    server.stop().await;
}

#[tokio::test]
async fn an_empty_data_frame_flood_does_not_pile_up() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    let mut attacker = raw_http2(&server).await;
    let mut bytes = frame(
        HEADERS,
        END_HEADERS,
        1,
        &grpc_request("/fileupload.FileUploadService/Upload"),
    );
    bytes.extend(frame(DATA, 0, 1, &[]).repeat(20_000));
    for _ in 0..10 {
        if !write_or_stall(&mut attacker, &bytes).await {
            break;
        }
        bytes = frame(DATA, 0, 1, &[]).repeat(20_000);
    }
    assert_serves("bystander", &client).await;
    assert_new_client_served("new client", &server).await;
    server.stop().await;
}

#[tokio::test]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    let mut config = test_config();
    config.limits.max_concurrent_streams = 8;
    let server = TestServer::start_with(config).await;
    let client = server.channel().await;
    let mut attacker = raw_http2(&server).await;
    // 40 LiveFeed calls that stay open (no END_STREAM).
    let mut bytes = Vec::new();
    for i in 0..40u32 {
        bytes.extend(frame(
            HEADERS,
            END_HEADERS,
            2 * i + 1,
            &grpc_request("/telemetry.TelemetryService/LiveFeed"),
        ));
    }
    attacker.write_all(&bytes).await.unwrap();
    let mut refused = 0;
    within("the streams beyond the limit refused", async {
        while refused < 32 {
            let Some((kind, _, _, payload)) = read_frame(&mut attacker).await else {
                break;
            };
            // REFUSED_STREAM (7) or a GOAWAY for the whole connection.
            if kind == RST_STREAM && payload == [0, 0, 0, 7] {
                refused += 1;
            }
            if kind == GOAWAY {
                refused = 32;
            }
        }
    })
    .await;
    assert_eq!(refused, 32);
    assert_serves("bystander", &client).await;
    server.stop().await;
}

#[tokio::test]
async fn half_sent_messages_are_bounded_per_connection() {
    let mut config = test_config();
    config.limits.max_message_size = 1024 * 1024;
    // Room for two half-sent messages of 1,000,000 bytes, not three.
    config.limits.connection_message_budget = 2_500_000;
    let server = TestServer::start_with(config).await;
    let client = server.channel().await;
    let mut attacker = h2_client(&server).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        attacker = within("capacity", attacker.ready()).await.unwrap();
        let (response, mut body) = attacker
            .send_request(
                grpc_http_request("/fileupload.FileUploadService/Upload"),
                false,
            )
            .unwrap();
        // A message announcing 1,000,000 bytes, 100 of them sent.
        let mut message = vec![0];
        message.extend(1_000_000u32.to_be_bytes());
        message.extend([0; 100]);
        body.send_data(Bytes::from(message), false).unwrap();
        calls.push((Box::pin(response), body));
    }
    let (first, ..) = within(
        "the call past the budget ends",
        futures::future::select_all(calls.iter_mut().map(|(response, _)| response.as_mut())),
    )
    .await;
    let headers = first.unwrap();
    let status = headers
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let message = headers
        .headers()
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(
        status.as_deref(),
        Some("8"),
        "RESOURCE_EXHAUSTED: {message}"
    );
    assert!(message.contains("connection_message_budget"), "{message}");
    // Other connections have budgets of their own.
    assert_serves("bystander", &client).await;
    drop(calls);
    server.stop().await;
}

/// Sends one HTTP/1.1 `GET /metrics` carrying a header of `size` bytes and
/// returns the status line of the answer (empty if the server closed
/// without one).
async fn http1_get_with_header(server: &TestServer, size: usize) -> String {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "h".repeat(size)
    );
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    within("an HTTP/1.1 answer", async {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn http1_request_headers_are_bounded_by_max_header_list_size() {
    let server = TestServer::start().await;
    let client = server.channel().await;
    // 4 KiB of headers is served (the limit is 16 KiB).
    let line = http1_get_with_header(&server, 4 * 1024).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
    // 64 KiB, over `limits.max_header_list_size` but under hyper's own
    // default buffer (~400 KiB), is refused with 431 or a close.
    for _ in 0..20 {
        let line = http1_get_with_header(&server, 64 * 1024).await;
        assert!(
            line.is_empty() || line.starts_with("HTTP/1.1 431"),
            "{line:?}"
        );
    }
    assert_serves("bystander", &client).await;
    assert!(
        http1_get_with_header(&server, 100)
            .await
            .starts_with("HTTP/1.1 200")
    );
    server.stop().await;
}

/// `streamhub serve` under `prlimit --nofile=N:N`: its address and log.
struct LimitedServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LimitedServer {
    fn spawn(nofile: u32) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let mut child = std::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_streamhub"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn accept_errors_are_backed_off_and_logged_rate_limited_and_serving_resumes() {
    use streamhub::proto::fileupload::{
        FileChunk, file_upload_service_client::FileUploadServiceClient,
    };
    let found = std::process::Command::new("prlimit")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("STREAMHUB_REQUIRE_ALL").map_or(true, |v| v.is_empty() || v == "0"),
            "prlimit (util-linux) is required with STREAMHUB_REQUIRE_ALL=1"
        );
        println!("SKIPPED: accept errors: this test needs prlimit (util-linux) on the PATH");
        return;
    }
    let server = LimitedServer::spawn(64);
    let url = format!("http://{}", server.addr);
    let channel = common::connect(url.clone()).await;
    let chunk = FileChunk {
        filename: "f.bin".into(),
        data: vec![1; 1024 * 1024],
        is_last: true,
        ..FileChunk::default()
    };
    let uploaded = FileUploadServiceClient::new(channel.clone())
        .upload(futures::stream::iter([chunk]))
        .await
        .unwrap()
        .into_inner();
    assert!(uploaded.success);

    // Unread /files/ responses hold a file each, so the server runs out
    // of descriptors below its connection cap (64 - 32 = 32).
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut held = Vec::new();
    for _ in 0..30 {
        let request = http::Request::get("http://localhost/files/f.bin")
            .body(())
            .unwrap();
        let (response, _) = within("a stream", send.clone().ready())
            .await
            .unwrap()
            .send_request(request, true)
            .unwrap();
        let response = within("a response", response).await.unwrap();
        if response.status() != http::StatusCode::OK {
            break;
        }
        held.push(response);
    }
    // Connections until accept fails: the kernel completes them, the
    // server cannot take them.
    let mut waiting = Vec::new();
    let started = std::time::Instant::now();
    within("the accept error in the log", async {
        loop {
            if server.log().contains("cannot accept connections") {
                return;
            }
            waiting.push(TcpStream::connect(server.addr).await.unwrap());
            assert!(waiting.len() < 200, "no accept error after 200 connections");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Free the descriptors: the server accepts again and serves.
    drop(held);
    drop(send);
    driver.abort();
    drop(waiting);
    let fresh = within("a new client", common::connect(url)).await;
    assert_serves("after the accept errors", &fresh).await;
    // Backed off (the line says when it retries) and rate-limited (at
    // most one line a second while the errors last, not one per retry).
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot accept connections"))
        .collect();
    let most = 2 + usize::try_from(started.elapsed().as_secs()).unwrap();
    assert!(
        !lines.is_empty() && lines.len() <= most,
        "{} accept-error lines (at most {most}):\n{log}",
        lines.len()
    );
    assert!(lines[0].contains("retry_in"), "{}", lines[0]);
    drop(channel);
}
