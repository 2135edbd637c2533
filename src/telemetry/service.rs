//! The gRPC face of the telemetry hub: converts between protobuf and domain
//! types, maps errors to statuses, and ends every stream on shutdown.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Hub, Report, Sample, TelemetryError,
    alerts::{Alert, AlertEngine},
    pacer::Pacer,
    route::TelemetryServer,
    watch::{Pattern, Visible, WatchError, WatchItem, WatchOptions},
};
use crate::{
    auth::{self, Action, Resource},
    config::AlertRuleConfig,
    proto::telemetry::{
        AlertEvent, AlertResponse, HistoryRequest, HistoryResponse, ListServicesRequest,
        ListServicesResponse, LiveMarker, MetricsPayload, MetricsRequest, MetricsResponse,
        ServiceEntry, WatchEvent, WatchRequest, telemetry_service_server, watch_event,
    },
    rpc::{StreamLog, shutting_down},
    shutdown::Shutdown,
};

/// A response stream as tonic's generated routes (and `super::route`) take it.
pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `telemetry.TelemetryService` implementation.
#[derive(Debug, Clone)]
pub struct TelemetryService {
    hub: Arc<Hub>,
    rules: Arc<[AlertRuleConfig]>,
    shutdown: Shutdown,
}

impl TelemetryService {
    /// A service over `hub`, whose streams end when `shutdown` triggers.
    pub fn new(hub: Arc<Hub>, shutdown: Shutdown) -> Self {
        let rules = hub.config().rules.clone().into();
        Self {
            hub,
            rules,
            shutdown,
        }
    }

    /// The hub behind this service.
    pub(super) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The server of this service, with message size limits: tonic's
    /// generated routes, and the server's own for Subscribe.
    pub fn into_server(self, max_message_size: usize) -> TelemetryServer {
        let generated = telemetry_service_server::TelemetryServiceServer::new(self.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size);
        TelemetryServer::new(self, generated, max_message_size)
    }

    /// Opens a Subscribe stream: the subscription is made (or refused) now,
    /// and the stream yields each sample the pacer lets through, made into
    /// a message by `message`. tonic's generated route sends them as
    /// `MetricsResponse`s; the server's own route (`super::route`) as
    /// ready-made gRPC frames.
    pub(super) fn updates<M: Send + 'static>(
        &self,
        request: Request<MetricsRequest>,
        message: impl Fn(Sample) -> M + Send + 'static,
    ) -> Result<BoxStream<M>, Status> {
        let mut log = StreamLog::open(&request, "Subscribe", &request.get_ref().service_name);
        let identity = auth::layer::identity(request.extensions());
        // Before subscribing: a subscription to an unknown name registers it.
        auth::authorize(
            &identity,
            Resource::Telemetry,
            Action::Read,
            &request.get_ref().service_name,
        )
        .inspect_err(|denied| log.end(format!("refused: {}", denied.message())))?;
        let MetricsRequest {
            service_name,
            interval_ms,
        } = request.into_inner();
        let mut subscription = self.hub.subscribe(&service_name).map_err(|e| {
            log.end(format!("refused: {e}"));
            status(&e)
        })?;
        let mut pacer = Pacer::new(self.hub.effective_interval(interval_ms));
        let shutdown = self.shutdown.clone();
        let counters = self.hub.counters().clone();
        let mut last_seq = 0u64;
        // No task per subscriber: tonic polls this stream, and the broker
        // wakes it when a new sample arrives. On shutdown the server closes
        // the hub, which ends the subscription: waiting on the broker alone
        // spares every delivery a poll of the shutdown token.
        let stream = async_stream::stream! {
            loop {
                let Some(mut sample) = subscription.next().await else {
                    if shutdown.is_triggered() {
                        log.end("server shutting down");
                        yield Err(shutting_down());
                    } else {
                        log.end("service removed");
                    }
                    break;
                };
                // One message per interval: a sample that comes too soon
                // waits, and whatever arrives meanwhile replaces it.
                let mut now = Instant::now();
                if let Some(until) = pacer.hold_until(now) {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => {
                            log.end("server shutting down");
                            yield Err(shutting_down());
                            break;
                        }
                        () = tokio::time::sleep_until(until) => {}
                    }
                    if let Some(newer) = subscription.newest() {
                        sample = newer;
                    }
                    now = Instant::now();
                }
                pacer.sent(now);
                // Two relaxed atomic adds at most: counting costs the
                // fan-out nothing measurable.
                if last_seq > 0 && sample.seq > last_seq + 1 {
                    counters.coalesced.increment(sample.seq - last_seq - 1);
                }
                last_seq = sample.seq;
                counters.deliveries.increment(1);
                yield Ok(message(sample));
            }
        };
        Ok(Box::pin(stream))
    }
}

fn status(err: &TelemetryError) -> Status {
    match err {
        TelemetryError::EmptyName
        | TelemetryError::NameTooLong { .. }
        | TelemetryError::NameNotPrintable
        | TelemetryError::BadValue { .. } => Status::invalid_argument(err.to_string()),
        TelemetryError::UnknownService(_) => Status::not_found(err.to_string()),
        TelemetryError::TooManyServices { .. } | TelemetryError::ShareExhausted(_) => {
            Status::resource_exhausted(err.to_string())
        }
        TelemetryError::Closed => shutting_down(),
        TelemetryError::Unavailable(_) => Status::unavailable(err.to_string()),
    }
}

impl From<Sample> for MetricsResponse {
    fn from(s: Sample) -> Self {
        Self {
            service_name: s.service.to_string(),
            cpu_usage: s.cpu_usage,
            memory_mb: s.memory_mb,
            request_count: s.request_count,
            timestamp_ms: s.timestamp_ms,
        }
    }
}

impl From<MetricsPayload> for Report {
    fn from(p: MetricsPayload) -> Self {
        Self {
            service: p.service_name,
            cpu_usage: p.cpu_usage,
            memory_mb: p.memory_mb,
            request_count: p.request_count,
            timestamp_ms: p.timestamp_ms,
        }
    }
}

impl From<Alert> for AlertResponse {
    fn from(a: Alert) -> Self {
        Self {
            alert_type: a.alert_type,
            message: a.message,
            value: a.value,
            timestamp_ms: a.timestamp_ms,
        }
    }
}

fn watch_event(item: WatchItem) -> WatchEvent {
    let event = match item {
        WatchItem::Backfill { service, samples } => watch_event::Event::Backfill(HistoryResponse {
            service_name: service.to_string(),
            samples: samples.into_iter().map(MetricsResponse::from).collect(),
        }),
        WatchItem::Sample(sample) => watch_event::Event::Sample(sample.into()),
        WatchItem::Alert(record) => watch_event::Event::Alert(AlertEvent {
            service_name: record.service.to_string(),
            alert: Some(AlertResponse::from(record.alert.clone())),
        }),
        WatchItem::Live(timestamp_ms) => watch_event::Event::Live(LiveMarker { timestamp_ms }),
    };
    WatchEvent { event: Some(event) }
}

/// What woke a stream up.
enum Wake<T> {
    Shutdown,
    Next(T),
}

#[tonic::async_trait]
impl telemetry_service_server::TelemetryService for TelemetryService {
    async fn get_snapshot(
        &self,
        request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let name = request.into_inner().service_name;
        auth::authorize(&identity, Resource::Telemetry, Action::Read, &name)?;
        let sample = self.hub.snapshot(&name).map_err(|e| status(&e))?;
        Ok(Response::new(sample.into()))
    }

    type SubscribeStream = BoxStream<MetricsResponse>;

    async fn subscribe(
        &self,
        request: Request<MetricsRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.updates(request, MetricsResponse::from)
            .map(Response::new)
    }

    type LiveFeedStream = BoxStream<AlertResponse>;

    async fn live_feed(
        &self,
        request: Request<Streaming<MetricsPayload>>,
    ) -> Result<Response<Self::LiveFeedStream>, Status> {
        let mut log = StreamLog::open(&request, "LiveFeed", "");
        let identity = auth::layer::identity(request.extensions());
        let mut inbound = request.into_inner();
        let hub = Arc::clone(&self.hub);
        let shutdown = self.shutdown.clone();
        let mut engine =
            AlertEngine::new(Arc::clone(&self.rules), hub.config().alert_repeat_interval);
        // Alerts of a payload are yielded before the next payload is read,
        // so on shutdown every accepted payload's alerts are delivered
        // before the closing status.
        let stream = async_stream::stream! {
            let mut position: u64 = 0;
            // The name this call published last, held against the sweep of
            // silent services while the call is open.
            let mut pin: Option<super::FeedPin> = None;
            loop {
                let woke = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => Wake::Shutdown,
                    message = inbound.message() => Wake::Next(message),
                };
                let payload = match woke {
                    Wake::Shutdown => {
                        log.end("server shutting down");
                        yield Err(shutting_down());
                        break;
                    }
                    Wake::Next(Ok(Some(payload))) => payload,
                    Wake::Next(Ok(None)) => {
                        log.end(format!("client finished sending after {position} payloads"));
                        break;
                    }
                    Wake::Next(Err(err)) => {
                        // An undecodable or oversized payload (or the
                        // client's reset) ends the call with its status,
                        // never with OK.
                        let failed = Status::new(
                            err.code(),
                            format!("payload {} could not be read: {}", position + 1, err.message()),
                        );
                        log.end(format!("client stream failed after {position} payloads: {err}"));
                        yield Err(failed);
                        break;
                    }
                };
                position += 1;
                log.set_subject(&payload.service_name);
                let name = payload.service_name.clone();
                // Before publishing: publishing also registers the name.
                if let Err(denied) = auth::authorize(&identity, Resource::Telemetry, Action::Publish, &name) {
                    let denied = Status::permission_denied(format!(
                        "payload {position} (service {name:?}): {}",
                        denied.message()
                    ));
                    log.end(denied.message().to_owned());
                    yield Err(denied);
                    break;
                }
                let publisher = identity.is_authenticated().then(|| identity.name());
                if pin.as_ref().is_none_or(|pin| pin.name() != name) {
                    pin = Some(hub.pin_feed(&name));
                }
                match hub
                    .admit_name(&name, publisher)
                    .and_then(|()| hub.ingest(payload.into()))
                {
                    Ok(sample) => {
                        for alert in engine.evaluate(&sample) {
                            // Every watcher sees it too.
                            hub.raise_alert(Arc::clone(&sample.service), alert.clone());
                            yield Ok(AlertResponse::from(alert));
                        }
                    }
                    Err(err) => {
                        hub.unadmit_name(&name);
                        let bad = Status::new(
                            status(&err).code(),
                            format!("payload {position} (service {name:?}): {err}"),
                        );
                        log.end(bad.message().to_owned());
                        yield Err(bad);
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        // Only the names the caller may read.
        let services = self
            .hub
            .services()
            .map_err(|e| status(&e))?
            .into_iter()
            .filter(|(name, _)| identity.allows(Resource::Telemetry, Action::Read, name))
            .map(|(service_name, latest)| ServiceEntry {
                service_name,
                latest: latest.map(MetricsResponse::from),
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    type WatchStream = BoxStream<WatchEvent>;

    /// Delivers only the services (samples, backfill, alerts) whose names
    /// the caller may `telemetry:read`, services that appear later
    /// included, as ListServices lists only those.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut log = StreamLog::open(&request, "Watch", &request.get_ref().pattern);
        let identity = auth::layer::identity(request.extensions());
        // Asked once per service the stream meets and once per alert.
        let visible =
            Visible::only(move |name| identity.allows(Resource::Telemetry, Action::Read, name));
        let WatchRequest {
            pattern,
            interval_ms,
            backfill_samples,
            alerts,
            backfill_alerts,
        } = request.into_inner();
        if pattern.len() > super::MAX_NAME_LEN {
            let err = Status::invalid_argument(format!(
                "pattern is {} bytes; the limit is {}",
                pattern.len(),
                super::MAX_NAME_LEN
            ));
            log.end(format!("refused: {}", err.message()));
            return Err(err);
        }
        if self.shutdown.is_triggered() {
            log.end("refused: server shutting down");
            return Err(shutting_down());
        }
        let opened = self.hub.watch(WatchOptions {
            pattern: Pattern::new(&pattern),
            visible,
            interval: self.hub.effective_interval(interval_ms),
            backfill_samples: backfill_samples as usize,
            alerts,
            backfill_alerts: backfill_alerts as usize,
        });
        let mut watch = match opened {
            Ok(watch) => watch,
            Err(err) => {
                let err = status(&err);
                log.end(format!("refused: {}", err.message()));
                return Err(err);
            }
        };
        let counters = self.hub.counters().clone();
        let shutdown = self.shutdown.clone();
        // No task per watcher: tonic polls this stream; `Watch::next` waits
        // on the hub's change feed (and the alert feed).
        let stream = async_stream::stream! {
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        log.end("server shutting down");
                        yield Err(shutting_down());
                        break;
                    }
                    next = watch.next() => next,
                };
                let counts = watch.take_counts();
                if counts.delivered > 0 {
                    counters.deliveries.increment(counts.delivered);
                }
                if counts.coalesced > 0 {
                    counters.coalesced.increment(counts.coalesced);
                }
                match next {
                    Some(Ok(item)) => yield Ok(watch_event(item)),
                    Some(Err(err @ WatchError::AlertsLagged { .. })) => {
                        log.end(err.to_string());
                        yield Err(Status::resource_exhausted(err.to_string()));
                        break;
                    }
                    None => {
                        log.end("hub closed");
                        yield Err(shutting_down());
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    /// Needs `telemetry:read:<name>`.
    async fn get_history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let HistoryRequest {
            service_name,
            limit,
        } = request.into_inner();
        auth::authorize(&identity, Resource::Telemetry, Action::Read, &service_name)?;
        let samples = self
            .hub
            .history(&service_name, limit as usize)
            .map_err(|e| status(&e))?;
        Ok(Response::new(HistoryResponse {
            service_name,
            samples: samples.into_iter().map(MetricsResponse::from).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::config::TelemetryConfig;

    /// The server mounts `route::TelemetryServer`, whose own Subscribe route
    /// the integration tests cover; the generated one, for whoever mounts
    /// the generated server alone, sends the same samples as messages.
    #[tokio::test]
    async fn the_generated_subscribe_sends_the_samples_as_messages() {
        let hub = Arc::new(Hub::new(TelemetryConfig::default()));
        let service = TelemetryService::new(Arc::clone(&hub), Shutdown::new());
        let report = Report {
            service: "edge".into(),
            cpu_usage: 1.5,
            memory_mb: 2.0,
            request_count: 3,
            timestamp_ms: 4,
        };
        let sample = hub.ingest(report).unwrap();
        let mut request = Request::new(MetricsRequest {
            service_name: "edge".into(),
            interval_ms: 0,
        });
        request
            .extensions_mut()
            .insert(crate::auth::Identity::anonymous());
        let mut updates = telemetry_service_server::TelemetryService::subscribe(&service, request)
            .await
            .unwrap()
            .into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first, MetricsResponse::from(sample));

        let mut empty = Request::new(MetricsRequest::default());
        empty
            .extensions_mut()
            .insert(crate::auth::Identity::anonymous());
        let refused = telemetry_service_server::TelemetryService::subscribe(&service, empty)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);

        // Without the auth layer's identity, nothing is allowed.
        let bare = Request::new(MetricsRequest {
            service_name: "edge".into(),
            interval_ms: 0,
        });
        let denied = telemetry_service_server::TelemetryService::subscribe(&service, bare)
            .await
            .err()
            .unwrap();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }

    /// New-user finding 3: a subscriber waiting before the publisher
    /// starts got its second sample a quarter interval early (held until
    /// three quarters of the interval, then the newest sample by then, an
    /// older one still). Time is paused, so the spacing is exact: with a
    /// sample every 50 ms and a 400 ms interval, consecutive samples'
    /// timestamps are at least 400 - 50 ms apart (the old code: 250 or 300
    /// for the first gap).
    #[tokio::test(start_paused = true)]
    async fn a_held_sample_waits_its_whole_interval_even_right_after_the_first() {
        let hub = Arc::new(Hub::new(TelemetryConfig::default()));
        let service = TelemetryService::new(Arc::clone(&hub), Shutdown::new());
        let mut request = Request::new(MetricsRequest {
            service_name: "pace".into(),
            interval_ms: 400,
        });
        request
            .extensions_mut()
            .insert(crate::auth::Identity::anonymous());
        let mut updates = telemetry_service_server::TelemetryService::subscribe(&service, request)
            .await
            .unwrap()
            .into_inner();
        let start = Instant::now();
        let publisher = tokio::spawn(async move {
            loop {
                let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap();
                hub.ingest(Report {
                    service: "pace".into(),
                    cpu_usage: 1.0,
                    memory_mb: 1.0,
                    request_count: 1,
                    timestamp_ms: 1_000_000 + elapsed,
                })
                .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut stamps = Vec::new();
        while stamps.len() < 8 {
            stamps.push(updates.next().await.unwrap().unwrap().timestamp_ms);
        }
        publisher.abort();
        let gaps: Vec<u64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&gap| gap >= 350), "gaps {gaps:?}");
        // And no fewer than one per interval: the pacer does not fall behind.
        assert!(gaps.iter().all(|&gap| gap <= 450), "gaps {gaps:?}");
    }
}
