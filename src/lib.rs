//! streamhub: a gRPC streaming hub.
//!
//! Live telemetry pushed to any number of subscribers, metrics streamed in
//! with alerts streamed back, chunked uploads that never lose a byte, and
//! chat rooms over full-duplex streams.
//!
//! # Layout
//!
//! - [`server`]: wiring of services, health, reflection, limits, shutdown.
//! - [`config`]: settings from defaults, file, environment and flags.
//! - [`runtime`]: the server's tokio runtime (flavour, workers).
//! - [`shutdown`]: the cancellation token every stream watches.
//! - [`rpc`]: what all services share (stream logs, the request gate).
//! - [`broker`]: latest-value pub/sub, no gRPC types.
//! - [`telemetry`]: the telemetry hub, alert rules, host sampling, service.
//! - [`upload`]: chunked, resumable uploads: storage and service.
//! - [`chat`]: chat rooms: durable storage, the room hub, service.
//! - [`cluster`]: cluster mode: NATS implementations of the broker, the
//!   room hub and the upload leases.
//! - [`proto`]: generated protobuf code.
//! - [`codec`]: the telemetry service's codec (small per-call buffers).
//! - [`cli`]: the client subcommands of the `streamhub` binary.
//! - [`bench`]: the benchmark suite behind `streamhub bench`.

pub mod bench;
pub mod broker;
pub mod chat;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod proto;
pub mod rpc;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod upload;
