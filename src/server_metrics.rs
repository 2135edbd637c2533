//! The server's Prometheus metrics: one recorder per server, rendered in
//! the text exposition format at `GET /metrics` (see [`crate::web`]).
//!
//! # Why one recorder per server, not the global one
//!
//! The `metrics` crate's macros write to one process-wide recorder, and
//! the tests start many servers in one process: with the global recorder,
//! each would report the sum of all. So each server builds its own
//! [`PrometheusRecorder`] and registers its counters on it once, at
//! start-up; the code keeps the [`metrics::Counter`] handles and
//! increments them (one relaxed atomic add, nothing looked up). Values the
//! server already keeps elsewhere (open connections, open calls per
//! method) are copied into gauges at scrape time, and the process's CPU and
//! memory are collected then too, by `metrics-process` run against this
//! recorder with [`metrics::with_local_recorder`].
//!
//! The facade macros (`metrics::counter!("streamhub_…")`) still work for
//! anyone who adds a counter without a handle: the first server started
//! in a process also installs its recorder as the global one
//! ([`Metrics::install_global`]), which in the binary (one server) is
//! exactly right. In tests with several servers, facade counters land in
//! the first; use [`Metrics::counter`] to count per server.

use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::{calls::CallStats, chat::room::ChatCounters, telemetry::TelemetryCounters};

/// A source of the number of open connections (the transport's).
pub type ConnectionCount = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Where a metric is registered from (the recorder ignores it).
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// One server's metrics.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    connections: ConnectionCount,
    connections_gauge: Gauge,
    calls: Arc<CallStats>,
    /// `streamhub_open_streams{method}`, one per method, made on first use.
    open_streams: Mutex<Vec<(Arc<str>, Gauge)>>,
    process: metrics_process::Collector,
    telemetry: TelemetryCounters,
    chat: ChatCounters,
    upload_bytes: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Names and help texts of the counters the server feeds.
const COUNTERS: &[(&str, &str)] = &[
    (
        "streamhub_rpcs_total",
        "RPCs finished, by full method path and gRPC status code name",
    ),
    (
        "streamhub_telemetry_samples_total",
        "Telemetry samples accepted (LiveFeed and the server's own)",
    ),
    (
        "streamhub_telemetry_deliveries_total",
        "Samples sent to Subscribe and Watch streams",
    ),
    (
        "streamhub_telemetry_coalesced_total",
        "Samples a slow subscriber or watcher skipped because a newer one went instead",
    ),
    (
        "streamhub_telemetry_services_dropped_total",
        "Telemetry services dropped after telemetry.service_ttl without a sample",
    ),
    (
        "streamhub_upload_bytes_total",
        "Upload bytes accepted from clients",
    ),
    (
        "streamhub_chat_messages_total",
        "Chat messages stored (members' messages, joins and leaves)",
    ),
    (
        "streamhub_chat_cutoffs_total",
        "Chat members cut off because their queue was full",
    ),
];

impl Metrics {
    /// The metrics of one server, reading open connections from
    /// `connections`.
    pub fn new(connections: ConnectionCount) -> Self {
        let recorder = Arc::new(PrometheusBuilder::new().build_recorder());
        let calls = Arc::new(CallStats::new(Some(
            Arc::clone(&recorder) as Arc<dyn Recorder + Send + Sync>
        )));
        let handle = recorder.handle();
        for (name, help) in COUNTERS {
            recorder.describe_counter(KeyName::from(*name), None, SharedString::from(*help));
        }
        recorder.describe_gauge(
            KeyName::from("streamhub_connections"),
            None,
            SharedString::from("Open client connections"),
        );
        recorder.describe_gauge(
            KeyName::from("streamhub_open_streams"),
            None,
            SharedString::from("Open calls (streams and unary calls in progress), by method"),
        );
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&*recorder, || process.describe());
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let telemetry = TelemetryCounters {
            samples: counter("streamhub_telemetry_samples_total"),
            deliveries: counter("streamhub_telemetry_deliveries_total"),
            coalesced: counter("streamhub_telemetry_coalesced_total"),
            dropped: counter("streamhub_telemetry_services_dropped_total"),
        };
        let chat = ChatCounters {
            messages: counter("streamhub_chat_messages_total"),
            cutoffs: counter("streamhub_chat_cutoffs_total"),
        };
        let upload_bytes = counter("streamhub_upload_bytes_total");
        let connections_gauge =
            recorder.register_gauge(&Key::from_static_name("streamhub_connections"), &METADATA);
        Self {
            recorder,
            handle,
            connections,
            connections_gauge,
            calls,
            open_streams: Mutex::new(Vec::new()),
            process,
            telemetry,
            chat,
            upload_bytes,
        }
    }

    /// A counter named `name` with `labels` on this server's recorder
    /// (register once, keep the handle: incrementing it is one atomic
    /// add). Name it `streamhub_…_total`.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    /// The counters the telemetry hub feeds.
    pub fn telemetry(&self) -> TelemetryCounters {
        self.telemetry.clone()
    }

    /// The counters the chat room hub feeds.
    pub fn chat(&self) -> ChatCounters {
        self.chat.clone()
    }

    /// `streamhub_upload_bytes_total`.
    pub fn upload_bytes(&self) -> Counter {
        self.upload_bytes.clone()
    }

    /// The per-method call counts.
    pub fn calls(&self) -> &Arc<CallStats> {
        &self.calls
    }

    /// Open connections right now.
    pub fn connections(&self) -> u64 {
        (self.connections)()
    }

    /// Makes this server's recorder the process's global one, if no
    /// recorder is installed yet, so the facade macros reach it. Returns
    /// whether it did.
    pub fn install_global(&self) -> bool {
        metrics::set_global_recorder(Shared(Arc::clone(&self.recorder))).is_ok()
    }

    /// Every metric in the Prometheus text exposition format (version
    /// 0.0.4), after copying in the gauges and the process's CPU and
    /// memory.
    pub fn render(&self) -> String {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^53
        self.connections_gauge.set(self.connections() as f64);
        {
            let mut gauges = self
                .open_streams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (method, open) in self.calls.open_by_method() {
                let gauge = match gauges.iter().find(|(m, _)| *m == method) {
                    Some((_, gauge)) => gauge.clone(),
                    None => {
                        let key = Key::from_parts(
                            "streamhub_open_streams",
                            vec![Label::new("method", method.to_string())],
                        );
                        let gauge = self.recorder.register_gauge(&key, &METADATA);
                        gauges.push((method, gauge.clone()));
                        gauge
                    }
                };
                #[allow(clippy::cast_precision_loss)]
                gauge.set(open as f64);
            }
        }
        metrics::with_local_recorder(&*self.recorder, || self.process.collect());
        self.handle.render()
    }
}

/// Registers on `recorder` the counter of RPCs of `method` that ended with
/// `code`.
pub(crate) fn rpc_counter(recorder: &dyn Recorder, method: &str, code: &'static str) -> Counter {
    let key = Key::from_parts(
        "streamhub_rpcs_total",
        vec![
            Label::new("method", method.to_owned()),
            Label::new("code", code),
        ],
    );
    recorder.register_counter(&key, &METADATA)
}

/// The recorder shared between a server and the global slot.
struct Shared(Arc<PrometheusRecorder>);

impl Recorder for Shared {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> metrics::Histogram {
        self.0.register_histogram(key, metadata)
    }
}
