//! The RPCs added for the dashboard, over loopback: Watch (backfill then
//! live, patterns, services that appear later, slow watchers, alerts),
//! GetHistory, chat's WatchRoom and Send beside a bidirectional Chat
//! member, ListUploads, and GetServerInfo.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::time::Duration;

use common::{TestServer, open_live_feed, payload, publish, test_config, within};
use streamhub::proto::{
    chat::{
        ChatMessage, MessageKind, SendRequest, WatchRoomRequest,
        chat_service_client::ChatServiceClient,
    },
    fileupload::{
        FileChunk, ListUploadsRequest, file_upload_service_client::FileUploadServiceClient,
    },
    streamhub::{ServerInfoRequest, server_service_client::ServerServiceClient},
    telemetry::{
        HistoryRequest, MetricsPayload, WatchEvent, WatchRequest,
        telemetry_service_client::TelemetryServiceClient, watch_event::Event,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

fn sample_payload(service: &str, request_count: u64) -> MetricsPayload {
    MetricsPayload {
        request_count,
        ..payload(service, 10.0, 100.0, 0)
    }
}

async fn watch(channel: Channel, request: WatchRequest) -> Streaming<WatchEvent> {
    within("watch", TelemetryServiceClient::new(channel).watch(request))
        .await
        .unwrap()
        .into_inner()
}

async fn event(stream: &mut Streaming<WatchEvent>) -> Event {
    within("a watch event", stream.message())
        .await
        .unwrap()
        .expect("stream open")
        .event
        .expect("an event")
}

/// The next sample event, as (service, request_count).
async fn next_sample(stream: &mut Streaming<WatchEvent>) -> (String, u64) {
    match event(stream).await {
        Event::Sample(s) => (s.service_name, s.request_count),
        other => panic!("expected a sample, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_backfills_then_goes_live_for_matching_services_including_new_ones() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut feed = TelemetryServiceClient::new(channel.clone());
    let (tx, mut alerts) = open_live_feed(&mut feed, 16).await;
    for n in 1..=3 {
        tx.send(sample_payload("api-1", n)).await.unwrap();
    }
    tx.send(sample_payload("db", 1)).await.unwrap();
    // CPU above 90 %: an alert, which the watcher gets as backfill.
    tx.send(payload("api-1", 95.0, 100.0, 0)).await.unwrap();
    let alert = within("alert", alerts.message()).await.unwrap().unwrap();
    assert_eq!(alert.alert_type, "CPU_HIGH");

    let mut stream = watch(
        channel.clone(),
        WatchRequest {
            pattern: "api-*".into(),
            interval_ms: 100,
            backfill_samples: 3,
            alerts: true,
            backfill_alerts: 10,
        },
    )
    .await;
    match event(&mut stream).await {
        Event::Backfill(history) => {
            assert_eq!(history.service_name, "api-1");
            let counts: Vec<u64> = history.samples.iter().map(|s| s.request_count).collect();
            assert_eq!(counts, [2, 3, 0], "the last 3, oldest first");
        }
        other => panic!("expected api-1's backfill, got {other:?}"),
    }
    match event(&mut stream).await {
        Event::Alert(alert) => {
            assert_eq!(alert.service_name, "api-1");
            assert_eq!(alert.alert.unwrap().alert_type, "CPU_HIGH");
        }
        other => panic!("expected the backfilled alert, got {other:?}"),
    }
    assert!(matches!(event(&mut stream).await, Event::Live(m) if m.timestamp_ms > 0));

    // Live: a non-matching service is skipped, a new matching one
    // appears. The change feed keeps publish order, so "db" would have
    // come before "api-2".
    tx.send(sample_payload("db", 2)).await.unwrap();
    tx.send(sample_payload("api-2", 7)).await.unwrap();
    assert_eq!(next_sample(&mut stream).await, ("api-2".into(), 7));

    // A second LiveFeed call's alert reaches the watcher too.
    publish(channel.clone(), "api-3", 99.0).await;
    loop {
        match event(&mut stream).await {
            Event::Alert(alert) => {
                assert_eq!(alert.service_name, "api-3");
                break;
            }
            Event::Sample(s) => assert_eq!(s.service_name, "api-3"),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(tx);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_watcher_skips_to_the_newest_sample() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut stream = watch(
        channel.clone(),
        WatchRequest {
            pattern: "burst".into(),
            interval_ms: 100,
            ..WatchRequest::default()
        },
    )
    .await;
    assert!(matches!(event(&mut stream).await, Event::Live(_)));
    // 1000 samples in one call: at one sample per 100 ms at most, the
    // watcher gets the newest of each interval, never a queue of them.
    let published = 1000u64;
    let (_, status) = common::live_feed(
        channel.clone(),
        (1..=published)
            .map(|n| sample_payload("burst", n))
            .collect(),
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    let mut received = Vec::new();
    loop {
        let (service, count) = next_sample(&mut stream).await;
        assert_eq!(service, "burst");
        received.push(count);
        if count == published {
            break;
        }
    }
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate: {received:?}"
    );
    assert!(
        (received.len() as u64) < published,
        "skipped to the newest: {} of {published}",
        received.len()
    );
    server.stop().await;
}

#[tokio::test]
async fn watch_refuses_bad_patterns_and_ends_on_shutdown() {
    let mut server = TestServer::start().await;
    let channel = server.channel().await;
    let refused = TelemetryServiceClient::new(channel.clone())
        .watch(WatchRequest {
            pattern: "x".repeat(201),
            ..WatchRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("pattern"), "{refused:?}");

    let mut stream = watch(channel, WatchRequest::default()).await;
    assert!(matches!(event(&mut stream).await, Event::Live(_)));
    server.begin_shutdown();
    let status = within("the end of the watch", stream.message())
        .await
        .unwrap_err();
    common::assert_shutting_down("watch", &status);
    server.stop().await;
}

#[tokio::test]
async fn get_history_returns_the_newest_samples_oldest_first() {
    let mut config = test_config();
    config.telemetry.history = 4;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let (_, status) = common::live_feed(
        channel.clone(),
        (1..=6).map(|n| sample_payload("api", n)).collect(),
    )
    .await;
    assert!(status.is_none());
    let mut client = TelemetryServiceClient::new(channel);
    let history = |limit| HistoryRequest {
        service_name: "api".into(),
        limit,
    };
    let all = client.get_history(history(0)).await.unwrap().into_inner();
    assert_eq!(all.service_name, "api");
    let counts: Vec<u64> = all.samples.iter().map(|s| s.request_count).collect();
    assert_eq!(counts, [3, 4, 5, 6], "telemetry.history = 4 kept");
    let last2 = client.get_history(history(2)).await.unwrap().into_inner();
    let counts: Vec<u64> = last2.samples.iter().map(|s| s.request_count).collect();
    assert_eq!(counts, [5, 6]);

    let unknown = client
        .get_history(HistoryRequest {
            service_name: "nobody".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let empty = client
        .get_history(HistoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    server.stop().await;
}

fn chat_message(sender: &str, text: &str, key: &str) -> ChatMessage {
    ChatMessage {
        sender: sender.into(),
        message: text.into(),
        idempotency_key: key.into(),
        ..ChatMessage::default()
    }
}

async fn next_member_message(stream: &mut Streaming<ChatMessage>) -> ChatMessage {
    loop {
        let m = within("a chat message", stream.message())
            .await
            .unwrap()
            .expect("stream open");
        if m.kind == MessageKind::KindMember as i32 {
            return m;
        }
    }
}

#[tokio::test]
async fn watch_room_and_send_share_the_rooms_order_with_a_chat_member() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = ChatServiceClient::new(channel.clone());

    // A bidirectional member in room "dev".
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("chat-room", "dev".parse().unwrap());
    let mut member = client.chat(request).await.unwrap().into_inner();
    // A browser: WatchRoom, announced as "web".
    let mut browser = client
        .watch_room(WatchRoomRequest {
            room: "dev".into(),
            member: "web".into(),
            ..WatchRoomRequest::default()
        })
        .await
        .unwrap()
        .into_inner();

    tx.send(chat_message("ann", "one", "ann-1")).await.unwrap();
    let one = next_member_message(&mut member).await;
    let sent = client
        .send(SendRequest {
            room: "dev".into(),
            message: Some(chat_message("web", "two", "web-1")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.message, "two");
    assert!(sent.seq > one.seq, "stored after 'one'");
    assert!(sent.timestamp_ms > 0);
    tx.send(chat_message("ann", "three", "ann-2"))
        .await
        .unwrap();

    let seen_by = |messages: Vec<ChatMessage>| {
        messages
            .into_iter()
            .map(|m| (m.seq, m.message))
            .collect::<Vec<_>>()
    };
    let member_saw = seen_by(vec![
        one.clone(),
        next_member_message(&mut member).await,
        next_member_message(&mut member).await,
    ]);
    let browser_saw = seen_by(vec![
        next_member_message(&mut browser).await,
        next_member_message(&mut browser).await,
        next_member_message(&mut browser).await,
    ]);
    assert_eq!(member_saw, browser_saw, "one order for both");
    assert_eq!(
        member_saw
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>(),
        ["one", "two", "three"]
    );

    // The same send again (a retry): the stored original, not a new one.
    let again = client
        .send(SendRequest {
            room: "dev".into(),
            message: Some(chat_message("web", "two", "web-1")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.seq, sent.seq);

    // A browser that reconnects after "one" gets exactly what followed.
    let mut resumed = client
        .watch_room(WatchRoomRequest {
            room: "dev".into(),
            after_seq: Some(one.seq),
            ..WatchRoomRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let replay = seen_by(vec![
        next_member_message(&mut resumed).await,
        next_member_message(&mut resumed).await,
    ]);
    assert_eq!(replay, member_saw[1..]);
    tx.send(chat_message("ann", "four", "ann-3")).await.unwrap();
    assert_eq!(next_member_message(&mut resumed).await.message, "four");
    assert_eq!(next_member_message(&mut browser).await.message, "four");

    // Bad input says what and where.
    let bad = client
        .send(SendRequest {
            room: "dev".into(),
            message: Some(chat_message("", "x", "")),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("sender"), "{bad:?}");
    let missing = client.send(SendRequest::default()).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let forged = client
        .send(SendRequest {
            room: "dev".into(),
            message: Some(ChatMessage {
                kind: MessageKind::KindJoined.into(),
                ..chat_message("web", "joined", "")
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    let gap = client
        .watch_room(WatchRoomRequest {
            room: "dev".into(),
            after_seq: Some(999),
            ..WatchRoomRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gap.code(), Code::OutOfRange);
    drop(tx);
    server.stop().await;
}

#[tokio::test]
async fn the_browser_member_is_announced_and_history_comes_first() {
    let server = TestServer::start().await;
    let mut client = ChatServiceClient::new(server.channel().await);
    for text in ["a", "b", "c"] {
        client
            .send(SendRequest {
                room: String::new(), // the default room, "lobby"
                message: Some(chat_message("bot", text, "")),
            })
            .await
            .unwrap();
    }
    let mut browser = client
        .watch_room(WatchRoomRequest {
            history: 2,
            member: "web".into(),
            ..WatchRoomRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_member_message(&mut browser).await;
    let second = next_member_message(&mut browser).await;
    assert_eq!(
        (first.message.as_str(), second.message.as_str()),
        ("b", "c")
    );
    let joined = within("the join", browser.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(joined.kind, MessageKind::KindJoined as i32);
    assert_eq!(joined.sender, "web");
    server.stop().await;
}

#[tokio::test]
async fn list_uploads_shows_unfinished_uploads_and_what_is_held() {
    let server = TestServer::start().await;
    let mut client = FileUploadServiceClient::new(server.channel().await);
    assert!(
        client
            .list_uploads(ListUploadsRequest {})
            .await
            .unwrap()
            .into_inner()
            .uploads
            .is_empty()
    );
    // A stream that ends without is_last keeps its bytes for a resume.
    let chunks = vec![
        FileChunk {
            filename: "half.bin".into(),
            data: vec![7; 1000],
            chunk_index: 0,
            ..FileChunk::default()
        },
        FileChunk {
            data: vec![7; 500],
            chunk_index: 1,
            ..FileChunk::default()
        },
    ];
    let ended = client
        .upload(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Aborted);
    let uploads = client
        .list_uploads(ListUploadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .uploads;
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].filename, "half.bin");
    assert_eq!(uploads[0].held_bytes, 1500);
    assert!(!uploads[0].in_progress);
    assert!(uploads[0].expires_at_ms > 0);
    server.stop().await;
}

#[tokio::test]
async fn get_server_info_reports_version_connections_and_open_streams() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let before = streamhub::telemetry::now_ms();
    let subscribe = TelemetryServiceClient::new(channel.clone())
        .subscribe(common::request("api", 0))
        .await
        .unwrap()
        .into_inner();
    let mut info = ServerServiceClient::new(channel.clone());
    // The stream is open once its response headers arrived; the first
    // GetServerInfo may still race it, so ask until it shows.
    let response = within("Subscribe counted open", async {
        loop {
            let response = info
                .get_server_info(ServerInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            if response
                .streams
                .iter()
                .any(|s| s.method == "/telemetry.TelemetryService/Subscribe" && s.open == 1)
            {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(response.version, env!("CARGO_PKG_VERSION"));
    assert!(response.started_at_ms > 0 && response.started_at_ms <= before);
    assert!(response.open_connections >= 1, "{response:?}");
    assert!(
        response
            .streams
            .iter()
            .any(|s| s.method == "/streamhub.ServerService/GetServerInfo" && s.open == 1),
        "the call itself is open: {response:?}"
    );
    let methods: Vec<&str> = response.streams.iter().map(|s| s.method.as_str()).collect();
    let mut sorted = methods.clone();
    sorted.sort_unstable();
    assert_eq!(methods, sorted, "sorted by method");

    // Without authentication, the caller is anonymous and may do anything.
    let whoami = info
        .who_am_i(streamhub::proto::streamhub::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!whoami.auth_enabled);
    assert_eq!(whoami.identity, "anonymous");

    // Once the stream is gone, it is no longer counted.
    drop(subscribe);
    within("Subscribe counted closed", async {
        loop {
            let response = info
                .get_server_info(ServerInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            if !response
                .streams
                .iter()
                .any(|s| s.method == "/telemetry.TelemetryService/Subscribe")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.stop().await;
}
