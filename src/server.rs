//! Server wiring: services, health, reflection, transport limits, and the
//! graceful shutdown sequence.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! start a server on port 0 and stop it when they like.
//!
//! Shutdown, in order: health goes NOT_SERVING; the token is cancelled, so
//! new calls are refused and every open stream delivers what it accepted
//! and ends with UNAVAILABLE; tonic stops accepting connections and waits
//! for them to close; if that takes longer than the drain timeout, whatever
//! is left is dropped and `run` returns anyway. Chat rooms, on the token,
//! store and deliver every message already submitted, tell each member the
//! server is shutting down, and end its call with UNAVAILABLE; the chat
//! storage is closed last.

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_check_response::ServingStatus as PbStatus,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{
    chat::{
        ChatError, MessageLimits,
        room::{LocalHub, RoomHub},
        service::ChatService,
    },
    cluster::{
        self, Cluster, ClusterError, chat::NatsHub, lease::NatsLeases, telemetry::NatsBroker,
    },
    config::Config,
    proto,
    rpc::{GateLayer, shutting_down},
    shutdown::Shutdown,
    telemetry::{self, Hub, service::TelemetryService},
    upload::{self, service::UploadService},
};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The upload store could not be opened.
    #[error("cannot open the upload store: {0}")]
    Upload(#[from] upload::UploadError),
    /// The chat storage could not be opened.
    #[error("cannot open chat storage: {0}")]
    Chat(#[from] ChatError),
    /// The listener's address could not be read.
    #[error("listener error: {0}")]
    Listener(#[from] std::io::Error),
    /// Cluster mode could not start (NATS unreachable, streams refused).
    #[error("cluster mode: {0}")]
    Cluster(#[from] ClusterError),
}

/// Names of the gRPC services served, as health knows them.
pub const SERVICE_NAMES: &[&str] = &[
    "telemetry.TelemetryService",
    "fileupload.FileUploadService",
    "chat.ChatService",
];

/// Runs a server on `listener` until `signal` completes, then shuts down
/// gracefully within `config.drain_timeout`.
pub async fn run<F>(listener: TcpListener, config: Config, signal: F) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send,
{
    let local_addr = listener.local_addr()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;

    let shutdown = Shutdown::new();
    // One node: the in-process broker and local storage. Cluster mode: the
    // same interfaces implemented over NATS (src/cluster/).
    let cluster = if config.cluster.enabled() {
        Some(Cluster::connect(&config.cluster, local_addr).await?)
    } else {
        None
    };
    let hub = Arc::new(match &cluster {
        Some(c) => {
            let max = config.telemetry.max_services;
            let broker = NatsBroker::start(Arc::clone(c), max, &shutdown).await?;
            Hub::with_broker(config.telemetry.clone(), broker)
        }
        None => Hub::new(config.telemetry.clone()),
    });
    shutdown.spawn(telemetry::host::report_self(
        Arc::clone(&hub),
        shutdown.token(),
    ));
    let uploads = upload::Store::open(&config.data_dir, config.upload.clone())?;
    if let Some(c) = &cluster {
        uploads.set_shared_leases(NatsLeases::start(Arc::clone(c)).await?);
    }
    shutdown.spawn(Arc::clone(&uploads).sweep_periodically(shutdown.token()));

    let (chat, chat_store): (Arc<dyn RoomHub>, Option<Arc<LocalHub>>) = match &cluster {
        Some(c) => {
            let hub = NatsHub::new(Arc::clone(c), config.chat.clone(), shutdown.clone());
            (Arc::new(hub), None)
        }
        None => {
            let dir = config.data_dir.join("chat");
            let local = Arc::new(LocalHub::open(&dir, config.chat.clone(), shutdown.clone())?);
            (Arc::clone(&local) as Arc<dyn RoomHub>, Some(local))
        }
    };
    let chat_limits = MessageLimits {
        max_text_bytes: config.chat.max_text_bytes,
    };

    let health = HealthReporter::new();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in SERVICE_NAMES {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    if let Some(c) = &cluster {
        // Every service needs the cluster: NOT_SERVING while NATS is lost.
        shutdown.spawn(cluster::report_health(
            c.link(),
            health.clone(),
            SERVICE_NAMES,
            shutdown.token(),
        ));
    }
    let health_service = HealthServer::new(HealthGate {
        inner: HealthService::from_health_reporter(health.clone()),
        shutdown: shutdown.clone(),
    });

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let limits = &config.limits;
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .initial_stream_window_size(limits.initial_stream_window_size)
        .initial_connection_window_size(limits.initial_connection_window_size)
        .max_frame_size(limits.max_frame_size);
    if let Some(age) = limits.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(grace) = limits.max_connection_age_grace {
        builder = builder.max_connection_age_grace(grace);
    }

    let router = builder
        .layer(GateLayer::new(shutdown.token(), hub.rpc_counter()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            TelemetryService::new(Arc::clone(&hub), shutdown.clone())
                .into_server(limits.max_message_size),
        )
        .add_service(
            UploadService::new(uploads, shutdown.clone(), limits.max_message_size)
                .into_server(limits.max_message_size),
        )
        .add_service(
            ChatService::new(Arc::clone(&chat), chat_limits, shutdown.clone())
                .into_server(limits.max_message_size),
        );

    // serve_with_incoming ignores the builder's TCP options: set them here.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(limits.tcp_keepalive));

    let serve = router.serve_with_incoming_shutdown(incoming, shutdown.token().cancelled_owned());
    tokio::pin!(serve);
    tracing::info!(addr = %local_addr, data_dir = %config.data_dir.display(), "serving");

    tokio::select! {
        result = &mut serve => return result.map_err(ServerError::from),
        () = signal => {}
    }

    tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining open streams");
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for name in SERVICE_NAMES {
        health
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
    shutdown.trigger();
    // Subscribe streams wait on the broker alone: closing it ends them.
    hub.close();

    match tokio::time::timeout_at(deadline, &mut serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("drain timeout passed: closing the remaining connections"),
    }
    if tokio::time::timeout_at(deadline, shutdown.wait_tasks())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout passed: abandoning background tasks");
    }
    // Every room actor has stored what it accepted (or been abandoned):
    // let the storage writer finish and release the database.
    if let Some(store) = chat_store {
        store.close();
    }
    tracing::info!("shut down");
    Ok(())
}

/// The standard health service, with Watch streams that end on shutdown
/// (tonic-health's own never end, which would hold the drain open).
struct HealthGate {
    inner: HealthService,
    shutdown: Shutdown,
}

#[tonic::async_trait]
impl Health for HealthGate {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut inner = self.inner.watch(request).await?.into_inner();
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            use futures::StreamExt;
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    item = inner.next() => match item {
                        Some(item) => yield item,
                        None => return,
                    },
                }
            }
            // Say NOT_SERVING before ending, whether or not the watcher saw
            // the change race past.
            yield Ok(HealthCheckResponse { status: PbStatus::NotServing.into() });
            yield Err(shutting_down());
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
