//! Authorization of what the dashboard uses, over loopback: Watch delivers
//! only the services (and alerts) the identity may read, services that
//! appear later included; GetHistory needs `telemetry:read:<name>`;
//! ListUploads lists only names the identity may write (and ListFiles and
//! ListUploads refuse an identity with no scope for them at all); the plain HTTP
//! routes `GET /files/NAME` (`upload:read:NAME`) and `GET /metrics`
//! (`server:read:metrics`) answer 403 naming the scope.

#![allow(clippy::unwrap_used)] // tests

mod common;

use bytes::Bytes;
use common::{TestServer, payload, test_config, within};
use futures::StreamExt;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use streamhub::{
    auth::{AuthConfig, TokenEntry, token},
    config::Config,
    proto::{
        fileupload::{
            FileChunk, ListFilesRequest, ListUploadsRequest,
            file_upload_service_client::FileUploadServiceClient,
        },
        telemetry::{
            HistoryRequest, WatchEvent, WatchRequest,
            telemetry_service_client::TelemetryServiceClient, watch_event::Event,
        },
    },
};
use tonic::{Code, Request, Status, Streaming, transport::Channel};

const ADMIN: &str = "tok-admin";
const READER: &str = "tok-reader";
const WRITER: &str = "tok-writer";
const OPS: &str = "tok-ops";

fn entry(identity: &str, token: &str, scopes: &[&str]) -> TokenEntry {
    TokenEntry {
        identity: identity.into(),
        sha256: hex::encode(token::digest(token)),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// admin (`*`); reader (reads `api-*` services and `public-*` files);
/// writer (writes `mine-*` files); ops (`server:read:metrics` only).
fn config() -> Config {
    let mut config = test_config();
    config.auth = AuthConfig {
        tokens: vec![
            entry("admin", ADMIN, &["*"]),
            entry(
                "reader",
                READER,
                &["telemetry:read:api-*", "upload:read:public-*"],
            ),
            entry("writer", WRITER, &["upload:write:mine-*"]),
            entry("ops", OPS, &["server:read:metrics"]),
        ],
        ..AuthConfig::default()
    };
    config
}

fn with<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Publishes one sample of `name` as admin with `cpu` (above 90 raises a
/// CPU_HIGH alert) and waits for the feed to end.
async fn publish(channel: Channel, name: &str, cpu: f64) {
    let mut feed = TelemetryServiceClient::new(channel)
        .live_feed(with(
            futures::stream::iter(vec![payload(name, cpu, 100.0, 0)]),
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(item) = within("the feed", feed.next()).await {
        item.unwrap();
    }
}

async fn event(stream: &mut Streaming<WatchEvent>) -> Event {
    within("a watch event", stream.message())
        .await
        .unwrap()
        .expect("stream open")
        .event
        .expect("an event")
}

/// The service an event is about (`None` for the live marker).
fn about(event: &Event) -> Option<&str> {
    match event {
        Event::Backfill(b) => Some(&b.service_name),
        Event::Sample(s) => Some(&s.service_name),
        Event::Alert(a) => Some(&a.service_name),
        Event::Live(_) => None,
    }
}

#[tokio::test]
async fn watch_delivers_only_the_services_and_alerts_the_identity_may_read() {
    let server = TestServer::start_with(config()).await;
    let channel = server.channel().await;
    // Before the watch: backfill of samples and of alerts.
    publish(channel.clone(), "api-1", 95.0).await;
    publish(channel.clone(), "web-1", 95.0).await;

    let mut stream = within(
        "watch",
        TelemetryServiceClient::new(channel.clone()).watch(with(
            WatchRequest {
                pattern: String::new(),
                backfill_samples: 10,
                alerts: true,
                backfill_alerts: 10,
                ..WatchRequest::default()
            },
            READER,
        )),
    )
    .await
    .unwrap()
    .into_inner();
    let mut backfill = Vec::new();
    loop {
        let event = event(&mut stream).await;
        match about(&event) {
            Some(name) => backfill.push((matches!(event, Event::Alert(_)), name.to_owned())),
            None => break,
        }
    }
    backfill.sort();
    assert_eq!(
        backfill,
        [(false, "api-1".to_owned()), (true, "api-1".to_owned())],
        "the backfill holds api-1's samples and alert, nothing of web-1"
    );

    // Services that appear later: the unreadable one first, so without
    // the filter its sample and alert would come before api-2's.
    publish(channel.clone(), "web-2", 95.0).await;
    publish(channel.clone(), "api-2", 95.0).await;
    let (mut sample, mut alert) = (false, false);
    while !(sample && alert) {
        let event = event(&mut stream).await;
        assert_eq!(about(&event), Some("api-2"), "{event:?}");
        match event {
            Event::Sample(_) => sample = true,
            Event::Alert(_) => alert = true,
            other => panic!("unexpected {other:?}"),
        }
    }

    // An identity allowed everything sees every service.
    let mut all = TelemetryServiceClient::new(channel.clone())
        .watch(with(
            WatchRequest {
                backfill_samples: 1,
                ..WatchRequest::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    loop {
        match event(&mut all).await {
            Event::Backfill(b) => names.push(b.service_name),
            Event::Live(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    names.sort();
    assert_eq!(names, ["api-1", "api-2", "web-1", "web-2"]);
    drop((stream, all));
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn get_history_needs_telemetry_read_of_the_service() {
    let server = TestServer::start_with(config()).await;
    let channel = server.channel().await;
    publish(channel.clone(), "api-1", 10.0).await;
    publish(channel.clone(), "web-1", 10.0).await;
    let mut client = TelemetryServiceClient::new(channel.clone());
    let history = |name: &str| {
        with(
            HistoryRequest {
                service_name: name.into(),
                limit: 0,
            },
            READER,
        )
    };
    let got = client
        .get_history(history("api-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.samples.len(), 1);
    // Denied whether the service exists or not: no name is revealed.
    for name in ["web-1", "web-unknown"] {
        let status = client.get_history(history(name)).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(&format!("telemetry:read:{name}")),
            "{status:?}"
        );
    }
    drop(client);
    drop(channel);
    server.stop().await;
}

/// Leaves an unfinished upload of `name` holding some bytes.
async fn leave_partial(channel: Channel, name: &str) {
    let chunks = vec![FileChunk {
        filename: name.into(),
        data: vec![7; 100],
        chunk_index: 0,
        ..FileChunk::default()
    }];
    let ended: Status = FileUploadServiceClient::new(channel)
        .upload(with(futures::stream::iter(chunks), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
}

#[tokio::test]
async fn list_uploads_lists_only_names_the_identity_may_write() {
    let server = TestServer::start_with(config()).await;
    let channel = server.channel().await;
    leave_partial(channel.clone(), "mine-1.bin").await;
    leave_partial(channel.clone(), "theirs.bin").await;
    let mut client = FileUploadServiceClient::new(channel.clone());
    let names = |token: &'static str| {
        let mut client = client.clone();
        async move {
            let mut names: Vec<String> = client
                .list_uploads(with(ListUploadsRequest {}, token))
                .await
                .unwrap()
                .into_inner()
                .uploads
                .into_iter()
                .map(|u| u.filename)
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(names(ADMIN).await, ["mine-1.bin", "theirs.bin"]);
    assert_eq!(names(WRITER).await, ["mine-1.bin"]);
    // An identity with no upload:write scope at all is told so rather
    // than shown an empty list; the same for ListFiles and upload:read.
    let status = client
        .list_uploads(with(ListUploadsRequest {}, READER))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("upload:write"), "{status:?}");
    let status = client
        .list_files(with(ListFilesRequest {}, WRITER))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("upload:read"), "{status:?}");
    let status = client
        .list_uploads(ListUploadsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    drop(client);
    drop(channel);
    server.stop().await;
}

struct Reply {
    status: StatusCode,
    body: String,
}

/// `GET path` over HTTP/1.1 with `token` as bearer (if any).
async fn get(server: &TestServer, path: &str, token: Option<&str>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::builder()
        .method(Method::GET)
        .uri(format!("{}{path}", server.url()));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = within(
        "an HTTP response",
        client.request(request.body(Empty::new()).unwrap()),
    )
    .await
    .unwrap();
    let status = response.status();
    let body = within("the body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

#[tokio::test]
async fn http_files_need_upload_read_of_the_file() {
    let server = TestServer::start_with(config()).await;
    let channel = server.channel().await;
    for (name, data) in [("public-a.txt", "public"), ("secret.txt", "secret")] {
        let chunks = vec![FileChunk {
            filename: name.into(),
            data: data.as_bytes().to_vec(),
            chunk_index: 0,
            is_last: true,
            ..FileChunk::default()
        }];
        FileUploadServiceClient::new(channel.clone())
            .upload(with(futures::stream::iter(chunks), ADMIN))
            .await
            .unwrap();
    }

    let ok = get(&server, "/files/public-a.txt", Some(READER)).await;
    assert_eq!((ok.status, ok.body.as_str()), (StatusCode::OK, "public"));
    // Denied whether the file exists or not, before the store is asked.
    for name in ["secret.txt", "missing.txt"] {
        let denied = get(&server, &format!("/files/{name}"), Some(READER)).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN, "{name}");
        assert!(
            denied.body.contains(&format!("upload:read:{name}")),
            "{name}: {}",
            denied.body
        );
        assert!(!denied.body.contains("secret\n"));
    }
    // Allowed but missing: 404 as before.
    let missing = get(&server, "/files/public-missing.txt", Some(READER)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // The name is authorized as decoded (a percent-encoded name).
    let encoded = get(&server, "/files/secret%2Etxt", Some(READER)).await;
    assert_eq!(encoded.status, StatusCode::FORBIDDEN);
    let unauthenticated = get(&server, "/files/public-a.txt", None).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    let admin = get(&server, "/files/secret.txt", Some(ADMIN)).await;
    assert_eq!(
        (admin.status, admin.body.as_str()),
        (StatusCode::OK, "secret")
    );
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn http_metrics_need_server_read_metrics() {
    let server = TestServer::start_with(config()).await;
    let denied = get(&server, "/metrics", Some(READER)).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert!(
        denied.body.contains("server:read:metrics"),
        "{}",
        denied.body
    );
    assert!(!denied.body.contains("streamhub_"));
    let ok = get(&server, "/metrics", Some(OPS)).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.body.contains("streamhub_connections"), "{}", ok.body);
    let unauthenticated = get(&server, "/metrics", None).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    // The dashboard's own files stay open: the page must load to ask for
    // a token.
    let page = get(&server, "/", None).await;
    assert_eq!(page.status, StatusCode::OK);
    server.stop().await;
}
