//! Telemetry services that fall silent for `telemetry.service_ttl` are
//! dropped, over real loopback sockets: the slot goes to another client,
//! an open LiveFeed or a waiting Subscribe keeps its name, a watcher
//! forgets the name and sees it again when it is re-created.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestServer, open_live_feed, payload, publish, request, test_config, within};
use streamhub::{
    config::Config,
    proto::telemetry::{
        HistoryRequest, ListServicesRequest, MetricsPayload, WatchEvent, WatchRequest,
        telemetry_service_client::TelemetryServiceClient, watch_event::Event,
    },
};
use tonic::{Code, Streaming, transport::Channel};

/// A ttl short enough for a test, long enough that a sample published
/// just before a check is not gone by then, even on a loaded machine.
const TTL: Duration = Duration::from_secs(1);

fn config(max_services: usize) -> Config {
    let mut config = test_config();
    config.telemetry.service_ttl = TTL;
    config.telemetry.max_services = max_services;
    config
}

/// Names listed by ListServices.
async fn names(channel: Channel) -> Vec<String> {
    TelemetryServiceClient::new(channel)
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.service_name)
        .collect()
}

/// Waits (polling ListServices) until `name` is no longer listed.
async fn until_dropped(channel: &Channel, name: &str) {
    within(&format!("{name} to be dropped"), async {
        while names(channel.clone()).await.iter().any(|n| n == name) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn counted(service: &str, request_count: u64) -> MetricsPayload {
    MetricsPayload {
        request_count,
        ..payload(service, 1.0, 1.0, 0)
    }
}

#[tokio::test]
async fn a_silent_service_is_dropped_frees_its_slot_for_another_client_and_can_come_back() {
    let server = TestServer::start_with(config(1)).await;
    let first = server.channel().await;
    publish(first.clone(), "a", 1.0).await;
    let mut client = TelemetryServiceClient::new(first.clone());
    client.get_snapshot(request("a", 0)).await.unwrap();

    // Another client: refused while "a" holds the only slot, then (once
    // "a" has been silent for the ttl) admitted. On the old code the slot
    // is never freed and this times out.
    let other = server.channel().await;
    within("the slot of a to be freed for b", async {
        loop {
            let (_, status) =
                common::live_feed(other.clone(), vec![payload("b", 1.0, 1.0, 0)]).await;
            match status {
                None => break,
                Some(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // "a" is gone everywhere: latest sample, history, listing.
    let gone = client.get_snapshot(request("a", 0)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let gone = client
        .get_history(HistoryRequest {
            service_name: "a".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert_eq!(names(first.clone()).await, ["b"]);

    // Once "b" is gone too, "a" comes back as a new service: only its new
    // sample is known.
    until_dropped(&first, "b").await;
    common::live_feed(first.clone(), vec![counted("a", 42)]).await;
    let latest = client.get_snapshot(request("a", 0)).await.unwrap();
    assert_eq!(latest.into_inner().request_count, 42);
    let history = client
        .get_history(HistoryRequest {
            service_name: "a".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.samples.len(), 1, "{history:?}");
}

#[tokio::test]
async fn an_open_live_feed_or_a_waiting_subscriber_keeps_its_service() {
    let server = TestServer::start_with(config(10)).await;
    let channel = server.channel().await;
    let mut client = TelemetryServiceClient::new(channel.clone());

    // "fed": published once on a LiveFeed call that stays open.
    let (feed, mut alerts) = open_live_feed(&mut client, 4).await;
    feed.send(payload("fed", 1.0, 1.0, 0)).await.unwrap();
    within("fed to be published", async {
        while client.get_snapshot(request("fed", 0)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // "waited": a subscriber waits for it, then it is published on a
    // call that ends.
    let mut subscriber = client
        .subscribe(request("waited", 0))
        .await
        .unwrap()
        .into_inner();
    publish(channel.clone(), "waited", 1.0).await;
    within("the first sample", subscriber.message())
        .await
        .unwrap()
        .unwrap();
    // "control": published after both, held by nothing. Once it is
    // dropped, the older two were past their ttl in the same sweep.
    publish(channel.clone(), "control", 1.0).await;
    until_dropped(&channel, "control").await;
    assert_eq!(names(channel.clone()).await, ["fed", "waited"]);

    // Let go of both: then they go too.
    drop(subscriber);
    drop(feed);
    assert!(
        within("the feed to end", alerts.message())
            .await
            .unwrap()
            .is_none()
    );
    until_dropped(&channel, "fed").await;
    until_dropped(&channel, "waited").await;
}

async fn event(stream: &mut Streaming<WatchEvent>) -> Event {
    within("a watch event", stream.message())
        .await
        .unwrap()
        .expect("stream open")
        .event
        .expect("an event")
}

async fn watch(channel: Channel, pattern: &str) -> Streaming<WatchEvent> {
    TelemetryServiceClient::new(channel)
        .watch(WatchRequest {
            pattern: pattern.into(),
            interval_ms: 100,
            backfill_samples: 10,
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_watcher_forgets_a_dropped_service_and_follows_it_when_it_comes_back() {
    let server = TestServer::start_with(config(10)).await;
    let channel = server.channel().await;
    let mut watcher = watch(channel.clone(), "w*").await;
    assert!(matches!(event(&mut watcher).await, Event::Live(_)));
    common::live_feed(channel.clone(), vec![counted("w", 2)]).await;
    let Event::Sample(sample) = event(&mut watcher).await else {
        panic!("expected a sample");
    };
    assert_eq!(sample.service_name, "w");

    until_dropped(&channel, "w").await;
    // A new watcher gets no backfill of it: the backfill is over at once.
    let mut late = watch(channel.clone(), "w*").await;
    assert!(matches!(event(&mut late).await, Event::Live(_)));

    // "w" comes back, under its old id: both watchers send its first
    // sample (the old one, which last sent w's sample 2 under that id,
    // tells the new series from the old by its generation).
    common::live_feed(channel.clone(), vec![counted("w", 7)]).await;
    for stream in [&mut watcher, &mut late] {
        assert_eq!(sample_of(event(stream).await), ("w".into(), 7));
    }

    // Dropped again; its id goes to a service the watchers do not match
    // (nothing of it is sent), and "w" comes back under a new id.
    until_dropped(&channel, "w").await;
    publish(channel.clone(), "other", 1.0).await;
    common::live_feed(channel.clone(), vec![counted("w", 8)]).await;
    for stream in [&mut watcher, &mut late] {
        assert_eq!(sample_of(event(stream).await), ("w".into(), 8));
    }
}

fn sample_of(event: Event) -> (String, u64) {
    match event {
        Event::Sample(sample) => (sample.service_name, sample.request_count),
        other => panic!("expected a sample, got {other:?}"),
    }
}
