//! streamhub: a gRPC streaming hub.
//!
//! Live telemetry pushed to any number of subscribers, metrics streamed in
//! with alerts streamed back, chunked uploads that never lose a byte, and
//! chat rooms over full-duplex streams.
//!
//! # Layout
//!
//! - [`auth`]: identities, credentials, scopes, the auth layer.
//! - [`server`]: wiring of services, health, reflection, limits, shutdown.
//! - [`reflection`]: gRPC server reflection (v1, v1alpha) as its spec says.
//! - [`transport`]: connections: accept loop, TLS, handshake and idle
//!   timeouts, connection cap, graceful drain.
//! - [`config`]: settings from defaults, file, environment and flags.
//! - [`runtime`]: the server's tokio runtime (flavour, workers).
//! - [`server_info`]: `streamhub.ServerService` (WhoAmI, GetServerInfo).
//! - [`shutdown`]: the cancellation token every stream watches.
//! - [`rpc`]: what all services share (stream logs, the request gate).
//! - [`calls`]: open calls per method, finished RPCs, open connections.
//! - [`server_metrics`]: the server's Prometheus metrics (one recorder per server).
//! - [`shares`]: per-identity shares of a server-wide count limit.
//! - [`web`]: the plain HTTP routes (`/metrics`, `/files/`, the dashboard's
//!   embedded assets), gRPC-Web and CORS.
//! - [`server_info`]: the `streamhub.ServerService` (version, uptime,
//!   connections, open streams).
//! - [`broker`]: latest-value pub/sub, no gRPC types.
//! - [`fsx`]: files under the data directory, opened without following
//!   symbolic links.
//! - [`telemetry`]: the telemetry hub, alert rules, host sampling, service.
//! - [`upload`]: chunked, resumable uploads: storage and service.
//! - [`chat`]: chat rooms: durable storage, the room hub, service.
//! - [`cluster`]: cluster mode: NATS implementations of the broker, the
//!   room hub and the upload leases.
//! - [`proto`]: generated protobuf code.
//! - [`codec`]: the telemetry service's codec (small per-call buffers).
//! - [`cli`]: the client subcommands of the `streamhub` binary.
//! - [`bench`]: the benchmark suite behind `streamhub bench`.

pub mod auth;
pub mod bench;
pub mod broker;
pub mod calls;
pub mod chat;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod fsx;
pub mod proto;
pub mod reflection;
pub mod rpc;
pub mod runtime;
pub mod server;
pub mod server_info;
pub mod server_metrics;
pub mod shares;
pub mod shutdown;
pub mod telemetry;
pub mod transport;
pub mod upload;
pub mod web;
