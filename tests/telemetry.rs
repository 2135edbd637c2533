//! Telemetry service over real loopback sockets: the contract, snapshot,
//! subscribe fan-out and back-pressure, live feed alerts and validation,
//! health, reflection, and shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    TestServer, assert_shutting_down, live_feed, open_live_feed, payload, publish, request,
    test_config, within,
};
use futures::StreamExt;
use streamhub::proto::telemetry::{
    ListServicesRequest, MetricsPayload, MetricsRequest, MetricsResponse,
    telemetry_service_client::TelemetryServiceClient,
};
use tonic::Code;

/// The contract files, unchanged, generated as a client by build.rs.
mod contract {
    pub mod telemetry {
        #![allow(clippy::all, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/contract/telemetry.rs"));
    }
}

#[tokio::test]
async fn a_client_generated_from_the_unchanged_contract_does_all_three_rpcs() {
    use contract::telemetry as c;
    let server = TestServer::start().await;
    let mut client =
        c::telemetry_service_client::TelemetryServiceClient::new(server.channel().await);

    // Bidirectional: a payload without the added request_count field.
    let payloads = vec![
        c::MetricsPayload {
            service_name: "api-gateway".into(),
            cpu_usage: 45.0,
            memory_mb: 2048.0,
            timestamp_ms: 0,
        },
        c::MetricsPayload {
            service_name: "api-gateway".into(),
            cpu_usage: 95.0,
            memory_mb: 2058.0,
            timestamp_ms: 0,
        },
    ];
    let mut alerts = client
        .live_feed(futures::stream::iter(payloads))
        .await
        .unwrap()
        .into_inner();
    let alert = within("alert", alerts.next()).await.unwrap().unwrap();
    assert_eq!(alert.alert_type, "CPU_HIGH");
    assert_eq!(
        alert.message,
        "api-gateway: CPU at 95.0% — above 90% threshold"
    );
    assert!(within("end", alerts.next()).await.is_none());

    // Unary.
    let snapshot = client
        .get_snapshot(c::MetricsRequest {
            service_name: "api-gateway".into(),
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snapshot.cpu_usage, 95.0);
    assert_eq!(snapshot.memory_mb, 2058.0);
    assert!(snapshot.timestamp_ms > 0);

    // Server streaming: the latest sample comes at once.
    let mut updates = client
        .subscribe(c::MetricsRequest {
            service_name: "api-gateway".into(),
            interval_ms: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("first update", updates.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, snapshot);
}

#[tokio::test]
async fn snapshot_returns_the_latest_sample_or_says_what_is_wrong() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = TelemetryServiceClient::new(channel.clone());

    let missing = client.get_snapshot(request("nobody", 0)).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("\"nobody\""),
        "{}",
        missing.message()
    );

    let empty = client.get_snapshot(request("", 0)).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("service_name"));

    let long = client
        .get_snapshot(request(&"x".repeat(201), 0))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(long.message().contains("201"), "{}", long.message());
    // Control characters are refused, as in room and file names (a
    // newline used to be accepted and shown in every list).
    let forged = client
        .get_snapshot(request("api\nroot", 0))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    assert!(
        forged.message().contains("service_name") && forged.message().contains("printable"),
        "{}",
        forged.message()
    );
    // 200 bytes is fine (just unknown).
    let max = client
        .get_snapshot(request(&"x".repeat(200), 0))
        .await
        .unwrap_err();
    assert_eq!(max.code(), Code::NotFound);

    let (_, status) = live_feed(
        channel.clone(),
        vec![MetricsPayload {
            request_count: 17,
            ..payload("db", 12.5, 300.0, 1_700_000_000_000)
        }],
    )
    .await;
    assert!(status.is_none());
    let snap = client
        .get_snapshot(request("db", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            snap.cpu_usage,
            snap.memory_mb,
            snap.request_count,
            snap.timestamp_ms
        ),
        (12.5, 300.0, 17, 1_700_000_000_000)
    );
}

#[tokio::test]
async fn subscribe_sends_each_new_sample_once_and_waits_for_unknown_services() {
    let mut config = test_config();
    config.telemetry.min_interval = Duration::from_millis(1);
    let server = TestServer::start_with(config).await;
    let mut client = TelemetryServiceClient::new(server.channel().await);

    // Not reported yet: the stream waits for the first sample.
    let mut updates = client
        .subscribe(request("late-agent", 1))
        .await
        .unwrap()
        .into_inner();
    // ListServices shows it as awaited.
    let list = client
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.services.len(), 1);
    assert!(list.services[0].latest.is_none());

    for cpu in [1.0, 2.0, 3.0] {
        publish(server.channel().await, "late-agent", cpu).await;
        let update = within("update", updates.next()).await.unwrap().unwrap();
        assert_eq!(update.cpu_usage, cpu);
    }
    // No duplicate: nothing more arrives without a new sample.
    let extra = tokio::time::timeout(Duration::from_millis(200), updates.next()).await;
    assert!(extra.is_err(), "unexpected message {extra:?}");
}

#[tokio::test]
async fn subscribe_requests_that_are_not_one_plain_message_are_refused_saying_why() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let path = http::uri::PathAndQuery::from_static("/telemetry.TelemetryService/Subscribe");

    // No request message at all: a client-streaming call that sends none.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let empty = futures::stream::empty::<MetricsRequest>();
    let refused = grpc
        .streaming::<_, _, MetricsResponse, _>(
            tonic::Request::new(empty),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    // A request cardinality violation: UNIMPLEMENTED, per the gRPC
    // status-code table.
    assert_eq!(refused.code(), Code::Unimplemented);
    assert!(
        refused.message().contains("no MetricsRequest"),
        "{}",
        refused.message()
    );

    let mut client = TelemetryServiceClient::new(channel);
    // Compressed with an encoding the server does not accept.
    let mut gzip = tonic::Request::new(request("edge", 0));
    gzip.metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    let refused = client.subscribe(gzip).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    assert!(refused.message().contains("gzip"), "{}", refused.message());

    // Larger than limits.max_message_size.
    let huge = request(&"x".repeat(5 * 1024 * 1024), 0);
    let refused = client.subscribe(huge).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("too large"),
        "{}",
        refused.message()
    );

    // The connection still serves a good request.
    publish(server.channel().await, "edge", 7.0).await;
    let mut updates = client
        .subscribe(request("edge", 0))
        .await
        .unwrap()
        .into_inner();
    let update = within("update", updates.next()).await.unwrap().unwrap();
    assert_eq!(update.cpu_usage, 7.0);
}

#[tokio::test]
async fn subscribe_interval_coalesces_to_the_newest_sample() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = TelemetryServiceClient::new(channel.clone());
    publish(channel.clone(), "busy", 1.0).await;
    // 0 means the default (1 s): the first sample comes at once, then the
    // ten published in quick succession collapse into the newest.
    let mut updates = client
        .subscribe(request("busy", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("first", updates.next())
            .await
            .unwrap()
            .unwrap()
            .cpu_usage,
        1.0
    );
    let first_at = std::time::Instant::now();
    let payloads = (2..=11)
        .map(|i| payload("busy", f64::from(i), 1.0, 0))
        .collect();
    let (_, status) = live_feed(channel, payloads).await;
    assert!(status.is_none());
    let next = within("coalesced", updates.next()).await.unwrap().unwrap();
    assert_eq!(next.cpu_usage, 11.0);
    // Paced: never sooner than three quarters of the interval after the
    // previous message (a lower bound, which no slowness can break).
    assert!(first_at.elapsed() >= Duration::from_millis(750));
}

#[tokio::test]
async fn one_sample_reaches_a_thousand_concurrent_subscribers() {
    let server = TestServer::start().await;
    publish(server.channel().await, "fanout", 1.0).await;
    let mut streams = Vec::new();
    // Ten connections of a hundred subscriptions each.
    for _ in 0..10 {
        let channel = server.channel().await;
        for _ in 0..100 {
            let mut client = TelemetryServiceClient::new(channel.clone());
            streams.push(
                client
                    .subscribe(request("fanout", 100))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }
    // Everyone is subscribed once they have the current sample.
    for stream in &mut streams {
        assert_eq!(
            within("first", stream.next())
                .await
                .unwrap()
                .unwrap()
                .cpu_usage,
            1.0
        );
    }
    publish(server.channel().await, "fanout", 2.0).await;
    let received = futures::future::join_all(streams.iter_mut().map(|s| s.next())).await;
    let ok = received
        .iter()
        .filter(|r| matches!(r, Some(Ok(m)) if m.cpu_usage == 2.0))
        .count();
    assert_eq!(ok, 1000);
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_delay_another() {
    let mut config = test_config();
    config.telemetry.min_interval = Duration::from_millis(1);
    let server = TestServer::start_with(config).await;
    let publisher = server.channel().await;
    publish(publisher.clone(), "hot", 0.0).await;

    // The stalled subscriber shares its connection with the healthy one.
    let shared = server.channel().await;
    let mut stalled = TelemetryServiceClient::new(shared.clone())
        .subscribe(request("hot", 1))
        .await
        .unwrap()
        .into_inner();
    let _ = within("stalled first", stalled.next()).await;
    let mut healthy = TelemetryServiceClient::new(shared)
        .subscribe(request("hot", 1))
        .await
        .unwrap()
        .into_inner();
    let _ = within("healthy first", healthy.next()).await;

    // Far more than the HTTP/2 window of the stalled stream, one at a time:
    // the healthy subscriber sees every one of them.
    let (tx, mut feed) = open_live_feed(&mut TelemetryServiceClient::new(publisher), 1).await;
    for i in 1..=2_000u32 {
        tx.send(payload("hot", f64::from(i) / 100.0, 1.0, 0))
            .await
            .unwrap();
        let mut seen = within("healthy update", healthy.next())
            .await
            .unwrap()
            .unwrap();
        // Coalescing may skip ahead, never back.
        while seen.cpu_usage < f64::from(i) / 100.0 {
            seen = within("healthy update", healthy.next())
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(seen.cpu_usage, f64::from(i) / 100.0);
    }
    drop(tx);
    assert!(within("feed end", feed.next()).await.is_none());
    drop(stalled);
}

#[tokio::test]
async fn subscribe_disconnect_cycles_leave_nothing_behind() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut client = TelemetryServiceClient::new(channel.clone());
    publish(channel.clone(), "known", 1.0).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    for i in 0..1_000 {
        // Half wait for a service that never reports, half get a sample.
        let name = if i % 2 == 0 {
            format!("ghost-{i}")
        } else {
            "known".into()
        };
        let mut stream = client
            .subscribe(request(&name, 0))
            .await
            .unwrap()
            .into_inner();
        if i % 2 == 1 {
            within("sample", stream.next()).await.unwrap().unwrap();
        }
        drop(stream);
    }

    // Ghost topics disappear with their last subscriber.
    within("ghost topics to go", async {
        loop {
            let list = client
                .list_services(ListServicesRequest {})
                .await
                .unwrap()
                .into_inner();
            let names: Vec<_> = list
                .services
                .iter()
                .map(|s| s.service_name.as_str())
                .collect();
            if names == ["known"] {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    // And no task outlives its stream (the server spawns none per stream).
    within("tasks to settle", async {
        while metrics.num_alive_tasks() > baseline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn alerts_fire_resolve_and_do_not_repeat_early() {
    let server = TestServer::start().await;
    let s = |t: u64| t * 1000;
    let mut payloads = vec![
        payload("api", 45.0, 1000.0, s(0)),
        payload("api", 95.0, 1000.0, s(1)),
    ];
    // Above the threshold for 59 more seconds: no repeat.
    payloads.extend((2..61).map(|t| payload("api", 96.0, 1000.0, s(t))));
    // 60 s after the first alert: one repeat; then back to normal.
    payloads.push(payload("api", 97.0, 1000.0, s(61)));
    payloads.push(payload("api", 50.0, 1000.0, s(62)));
    payloads.push(payload("api", 50.0, 5000.0, s(63)));
    payloads.push(payload("api", 50.0, 100.0, s(64)));

    let (alerts, status) = live_feed(server.channel().await, payloads).await;
    assert!(status.is_none(), "{status:?}");
    let got: Vec<_> = alerts
        .iter()
        .map(|a| (a.alert_type.as_str(), a.value, a.timestamp_ms))
        .collect();
    assert_eq!(
        got,
        [
            ("CPU_HIGH", 95.0, s(1)),
            ("CPU_HIGH", 97.0, s(61)),
            ("CPU_HIGH_RESOLVED", 50.0, s(62)),
            ("MEMORY_HIGH", 5000.0, s(63)),
            ("MEMORY_HIGH_RESOLVED", 100.0, s(64)),
        ]
    );
    assert_eq!(alerts[0].message, "api: CPU at 95.0% — above 90% threshold");
    assert_eq!(
        alerts[3].message,
        "api: Memory at 5000MB — above 4096MB threshold"
    );
}

#[tokio::test]
async fn alert_rules_and_repeat_interval_are_configurable() {
    let mut config = test_config();
    config.telemetry.alert_repeat_interval = Duration::from_secs(5);
    config.telemetry.rules = vec![streamhub::config::AlertRuleConfig {
        name: "REQUESTS_HIGH".into(),
        metric: streamhub::config::Metric::RequestCount,
        above: 1000.0,
    }];
    let server = TestServer::start_with(config).await;
    // Timestamps 1 s to 12 s (0 would mean "server time").
    let payloads = (1..=12)
        .map(|t| MetricsPayload {
            request_count: 5000,
            ..payload("web", 99.0, 9999.0, t * 1000)
        })
        .collect();
    let (alerts, _) = live_feed(server.channel().await, payloads).await;
    let types: Vec<_> = alerts
        .iter()
        .map(|a| (a.alert_type.as_str(), a.timestamp_ms))
        .collect();
    assert_eq!(
        types,
        [
            ("REQUESTS_HIGH", 1000),
            ("REQUESTS_HIGH", 6000),
            ("REQUESTS_HIGH", 11000)
        ]
    );
}

#[tokio::test]
async fn bad_payloads_end_the_feed_naming_field_and_position() {
    let server = TestServer::start().await;
    let cases = [
        (payload("ok", f64::NAN, 1.0, 0), "cpu_usage"),
        (payload("ok", 1.0, f64::INFINITY, 0), "memory_mb"),
        (payload("ok", -5.0, 1.0, 0), "cpu_usage"),
        (payload("", 1.0, 1.0, 0), "service_name"),
        (payload(&"n".repeat(201), 1.0, 1.0, 0), "service_name"),
    ];
    for (bad, field) in cases {
        let good = payload("ok", 95.0, 1.0, 0);
        let (alerts, status) =
            live_feed(server.channel().await, vec![good.clone(), good, bad]).await;
        // What was accepted before the bad payload was answered.
        assert_eq!(alerts.len(), 1);
        let status = status.expect("the feed ends with an error");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with("payload 3 "),
            "{}",
            status.message()
        );
        assert!(status.message().contains(field), "{}", status.message());
    }
}

#[tokio::test]
async fn the_number_of_services_is_bounded() {
    let mut config = test_config();
    config.telemetry.max_services = 3;
    let server = TestServer::start_with(config).await;
    let payloads = ["a", "b", "c", "d"]
        .iter()
        .map(|n| payload(n, 1.0, 1.0, 0))
        .collect();
    let (_, status) = live_feed(server.channel().await, payloads).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("payload 4"),
        "{}",
        status.message()
    );
    let mut client = TelemetryServiceClient::new(server.channel().await);
    let refused = client.subscribe(request("e", 0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // Known services keep working.
    client.get_snapshot(request("a", 0)).await.unwrap();
}

#[tokio::test]
async fn the_server_reports_its_own_host_metrics_and_rpc_count() {
    let mut config = test_config();
    config.telemetry.self_sample_interval = Duration::from_millis(200);
    config.telemetry.self_name = "hub-self".into();
    let server = TestServer::start_with(config).await;
    let mut client = TelemetryServiceClient::new(server.channel().await);
    let mut updates = client
        .subscribe(request("hub-self", 100))
        .await
        .unwrap()
        .into_inner();
    let first = within("self sample", updates.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.memory_mb > 1.0,
        "real memory, got {}",
        first.memory_mb
    );
    assert!((0.0..=100.0).contains(&first.cpu_usage));
    // The subscribe call itself was counted by the next sample.
    let second = within("self sample", updates.next())
        .await
        .unwrap()
        .unwrap();
    assert!(second.request_count >= 1);
    assert!(second.timestamp_ms > first.timestamp_ms);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "telemetry.TelemetryService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service} should be SERVING");
    }

    use tonic_reflection::pb::{v1, v1alpha};
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        }]))
        .await
        .unwrap()
        .into_inner();
    let response = within("reflection", responses.next())
        .await
        .unwrap()
        .unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"telemetry.TelemetryService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut responses = alpha
        .server_reflection_info(futures::stream::iter([v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "telemetry.TelemetryService".into(),
                ),
            ),
        }]))
        .await
        .unwrap()
        .into_inner();
    let response = within("reflection", responses.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable_and_health_watch_sees_not_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut server = TestServer::start().await;
    let channel = server.channel().await;
    publish(channel.clone(), "svc", 1.0).await;

    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("watch", watch.next()).await.unwrap().unwrap().status,
        1
    );

    let mut client = TelemetryServiceClient::new(channel.clone());
    let mut updates = client
        .subscribe(request("svc", 0))
        .await
        .unwrap()
        .into_inner();
    within("first", updates.next()).await.unwrap().unwrap();

    let (tx, mut alerts) = open_live_feed(&mut client, 4).await;
    tx.send(payload("svc", 99.0, 1.0, 0)).await.unwrap();
    assert_eq!(
        within("alert", alerts.next())
            .await
            .unwrap()
            .unwrap()
            .alert_type,
        "CPU_HIGH"
    );

    server.begin_shutdown();

    let end = within("subscribe end", updates.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_shutting_down("subscribe", &end);
    let end = within("live feed end", alerts.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_shutting_down("live feed", &end);

    // The watcher is told NOT_SERVING, then its stream ends.
    let mut saw_not_serving = false;
    while let Some(item) = within("watch", watch.next()).await {
        match item {
            Ok(response) => saw_not_serving |= response.status == 2,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                break;
            }
        }
    }
    assert!(saw_not_serving);
    // New calls are refused.
    let refused = client.get_snapshot(request("svc", 0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    drop(tx);
    server.stop().await;
}
