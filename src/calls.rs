//! What the server counts about its calls and connections: open calls per
//! gRPC method and RPCs finished per method and status code (kept by the
//! call layer in front of the gRPC routes, [`crate::rpc::StatusLayer`]),
//! and open connections.
//!
//! A call is open from the moment its request reaches the gRPC routes until
//! its response body is dropped (finished, or its client went away), so a
//! server stream counts for as long as it streams. Only the methods the
//! server serves are counted, so a client sending made-up paths cannot
//! grow the table or the metrics.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use metrics::{Counter, Recorder};
use prost::Message;

/// gRPC status codes by number, as `streamhub_rpcs_total`'s `code` label.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// One method's counts.
pub struct MethodStats {
    path: Arc<str>,
    open: AtomicU64,
    called: AtomicBool,
    finished: [OnceLock<Counter>; 17],
    recorder: Option<Arc<dyn Recorder + Send + Sync>>,
}

impl std::fmt::Debug for MethodStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodStats")
            .field("path", &self.path)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl MethodStats {
    fn finish(&self, code: usize) {
        let code = code.min(CODES.len() - 1);
        if let Some(recorder) = &self.recorder {
            self.finished[code]
                .get_or_init(|| {
                    crate::server_metrics::rpc_counter(&**recorder, &self.path, CODES[code])
                })
                .increment(1);
        }
    }
}

/// Open calls per method, and the counter of finished ones.
#[derive(Debug, Default)]
pub struct CallStats {
    methods: HashMap<Arc<str>, Arc<MethodStats>>,
}

/// Full paths of every method the server serves: streamhub's protos,
/// health, reflection.
fn served_methods() -> Vec<String> {
    let mut paths = Vec::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    for version in ["v1", "v1alpha"] {
        paths.push(format!(
            "/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
        ));
    }
    paths
}

impl CallStats {
    /// Counts for every method the server serves, registering the
    /// finished-call counters on `recorder` (if any) as codes occur.
    pub fn new(recorder: Option<Arc<dyn Recorder + Send + Sync>>) -> Self {
        let methods = served_methods()
            .into_iter()
            .map(|path| {
                let path: Arc<str> = Arc::from(path);
                let stats = MethodStats {
                    path: Arc::clone(&path),
                    open: AtomicU64::new(0),
                    called: AtomicBool::new(false),
                    finished: Default::default(),
                    recorder: recorder.clone(),
                };
                (path, Arc::new(stats))
            })
            .collect();
        Self { methods }
    }

    /// The methods called at least once, with their open calls, sorted by
    /// path.
    pub fn open_by_method(&self) -> Vec<(Arc<str>, u64)> {
        let mut open: Vec<_> = self
            .methods
            .values()
            .filter(|m| m.called.load(Ordering::Relaxed))
            .map(|m| (Arc::clone(&m.path), m.open.load(Ordering::Relaxed)))
            .collect();
        open.sort();
        open
    }

    /// Open calls of `path` (0 for a method never called or unknown).
    pub fn open(&self, path: &str) -> u64 {
        self.methods
            .get(path)
            .map_or(0, |m| m.open.load(Ordering::Relaxed))
    }
}

/// An open call: counted open until dropped, then counted finished with
/// the status it saw (CANCELLED if it saw none). Made by
/// [`CallStats::start`]; the call layer ([`crate::rpc::StatusLayer`])
/// keeps it in the call's response body, next to the deadline.
#[derive(Debug)]
pub struct OpenCall {
    method: Arc<MethodStats>,
    code: Option<usize>,
}

impl OpenCall {
    fn start(method: Arc<MethodStats>) -> Self {
        method.open.fetch_add(1, Ordering::Relaxed);
        method.called.store(true, Ordering::Relaxed);
        Self { method, code: None }
    }

    /// Notes the `grpc-status` in `headers` (the response headers of a
    /// trailers-only response, or trailers), if none was seen before.
    pub fn saw(&mut self, headers: &http::HeaderMap) {
        if self.code.is_none()
            && let Some(value) = headers.get("grpc-status")
        {
            self.code = Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(UNKNOWN),
            );
        }
    }

    /// The response body ended without trailers: counted as UNKNOWN
    /// unless a status was seen before.
    pub fn ended(&mut self) {
        if self.code.is_none() {
            self.code = Some(UNKNOWN);
        }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.method.open.fetch_sub(1, Ordering::Relaxed);
        self.method.finish(self.code.unwrap_or(CANCELLED));
    }
}

impl CallStats {
    /// Counts a call of `path` open until the returned guard is dropped;
    /// `None` (nothing counted) for a path the server does not serve.
    pub fn start(&self, path: &str) -> Option<OpenCall> {
        self.methods
            .get(path)
            .map(|method| OpenCall::start(Arc::clone(method)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_known() {
        let stats = CallStats::new(None);
        for path in [
            "/telemetry.TelemetryService/Subscribe",
            "/telemetry.TelemetryService/Watch",
            "/chat.ChatService/Chat",
            "/fileupload.FileUploadService/Upload",
            "/streamhub.ServerService/GetServerInfo",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(stats.methods.contains_key(path), "{path}");
        }
        assert!(!stats.methods.contains_key("/made.Up/Path"));
    }

    #[test]
    fn a_call_is_open_until_dropped() {
        let stats = CallStats::new(None);
        let path = "/chat.ChatService/Chat";
        let method = Arc::clone(&stats.methods[path]);
        let call = stats.start(path).expect("served");
        assert_eq!(Arc::as_ptr(&call.method), Arc::as_ptr(&method));
        assert_eq!(stats.open(path), 1);
        assert_eq!(stats.open_by_method(), [(Arc::from(path), 1)]);
        drop(call);
        assert_eq!(stats.open(path), 0);
    }
}
