//! Server wiring: services, health, reflection, transport limits, and the
//! graceful shutdown sequence. The gRPC routes are served inside
//! [`crate::web::app`], one router with gRPC-Web, `/metrics`, `/files/`
//! and the dashboard, over HTTP/1.1 and HTTP/2.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests
//! start a server on port 0 and stop it when they like.
//!
//! The gRPC services are one `tonic::service::Routes`, turned into an
//! `axum::Router` (where plain HTTP routes and tower layers join them) and
//! served by [`transport`](crate::transport): streamhub's own connection
//! layer (TLS, handshake and idle timeouts, the connection cap).
//!
//! Shutdown, in order: health goes NOT_SERVING; the token is cancelled, so
//! new calls are refused and every open stream delivers what it accepted
//! and ends with UNAVAILABLE; the transport stops accepting connections,
//! sends GOAWAY on each, closes those with no open stream, and waits for
//! the rest to close; if that takes longer than the drain timeout, whatever
//! is left is closed and `run` returns anyway. Chat rooms, on the token,
//! store and deliver every message already submitted, tell each member the
//! server is shutting down, and end its call with UNAVAILABLE; the chat
//! storage is closed last.

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::{RecoverErrorLayer, Routes};
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
    auth,
    chat::{
        ChatError, MessageLimits, StoreError,
        room::{LocalHub, RoomHub},
        service::ChatService,
        store::StorageHealth,
    },
    cluster::{
        self, Cluster, ClusterError, chat::NatsHub, lease::NatsLeases, telemetry::NatsBroker,
    },
    config::Config,
    proto,
    reflection::Reflection,
    rpc::{GateLayer, shutting_down},
    server_info::ServerService,
    server_metrics::Metrics,
    shutdown::Shutdown,
    telemetry::{self, Hub, service::TelemetryService},
    transport::{Transport, TransportError},
    upload::{self, service::UploadService},
    web::{self, WebState},
};

/// Errors that stop the server. Each names what failed and chains its
/// cause as its `source()` (not in its own text, so a report of the chain,
/// `{:#}`, says the cause once).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptors.
    #[error("cannot build the reflection service")]
    Reflection(#[from] crate::reflection::ReflectionError),
    /// The transport could not start (e.g. the TLS files do not load).
    #[error("cannot start the transport")]
    Transport(#[from] TransportError),
    /// The upload store could not be opened.
    #[error("cannot open the upload store")]
    Upload(#[from] upload::UploadError),
    /// The chat storage could not be opened.
    #[error("cannot open chat storage")]
    Chat(#[source] ChatError),
    /// Another process (most likely another streamhub) holds the chat
    /// storage of this data directory open.
    #[error(
        "another streamhub (or process) is using data directory {} (chat storage is locked)",
        path.display()
    )]
    DataDirInUse {
        /// The data directory.
        path: std::path::PathBuf,
    },
    /// The listener's address could not be read.
    #[error("cannot read the listener's address")]
    Listener(#[from] std::io::Error),
    /// The authentication settings cannot be used (e.g. a key file).
    #[error("cannot set up authentication")]
    Auth(#[from] crate::auth::SetupError),
    /// Cluster mode could not start (NATS unreachable, streams refused).
    #[error("cluster mode cannot start")]
    Cluster(#[from] ClusterError),
}

/// Names of the gRPC services served, as health knows them.
pub const SERVICE_NAMES: &[&str] = &[
    "telemetry.TelemetryService",
    "fileupload.FileUploadService",
    "chat.ChatService",
    "streamhub.ServerService",
];

/// How long closing the connections left at the drain deadline may take.
const FORCED_CLOSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a server on `listener` until `signal` completes, then shuts down
/// gracefully within `config.drain_timeout`.
pub async fn run<F>(listener: TcpListener, config: Config, signal: F) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send,
{
    run_ready(listener, config, signal, None).await
}

/// [`run`], telling `ready` the address it serves on once it can serve:
/// the data directory and every store are open (what `serve` waits for
/// before it prints "listening on").
pub async fn run_ready<F>(
    listener: TcpListener,
    config: Config,
    signal: F,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send,
{
    // First, so a bad TLS file stops the start before anything is opened.
    let transport = Transport::new(listener, &config.limits, &config.tls)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let local_addr = transport.local_addr();
    // Connection counters, for the log below and whoever reports them
    // (e.g. a metrics route built here).
    let conn_stats = transport.stats();

    let auth = Arc::new(auth::Authenticator::from_config(&config.auth)?);
    if auth.enabled() {
        tracing::info!(?auth, "authentication on");
    }
    let shutdown = Shutdown::new();
    let open = conn_stats.clone();
    let metrics = Arc::new(Metrics::new(Arc::new(move || open.open())));
    metrics.install_global();
    // One node: the in-process broker and local storage. Cluster mode: the
    // same interfaces implemented over NATS (src/cluster/).
    let cluster = if config.cluster.enabled() {
        Some(Cluster::connect(&config.cluster, local_addr).await?)
    } else {
        None
    };
    let mut telemetry_config = config.telemetry.clone();
    // Each node reports its own host under its own name.
    telemetry_config.self_name = telemetry::host::self_name(
        &config.telemetry.self_name,
        cluster.as_deref().map(Cluster::node),
    );
    let hub = Arc::new(
        match &cluster {
            Some(c) => {
                let records = Arc::new(telemetry::Records::new(&config.telemetry));
                let broker = NatsBroker::start(
                    Arc::clone(c),
                    Arc::clone(&records),
                    &config.telemetry,
                    &shutdown,
                )
                .await?;
                Hub::with_broker(telemetry_config, broker, records)
            }
            None => Hub::new(telemetry_config),
        }
        .with_counters(if config.http.count {
            metrics.telemetry()
        } else {
            telemetry::TelemetryCounters::default()
        }),
    );
    shutdown.spawn(telemetry::host::report_self(
        Arc::clone(&hub),
        shutdown.token(),
    ));
    shutdown.spawn(Arc::clone(&hub).sweep_periodically(shutdown.token()));
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
            let local = Arc::new(
                LocalHub::open(&dir, config.chat.clone(), shutdown.clone())
                    .map_err(|err| match err {
                        ChatError::Store(StoreError::Locked) => ServerError::DataDirInUse {
                            path: config.data_dir.clone(),
                        },
                        other => ServerError::Chat(other),
                    })?
                    .with_counters(metrics.chat()),
            );
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
    if let Some(local) = &chat_store {
        shutdown.spawn(report_storage_health(
            health.clone(),
            "chat.ChatService",
            local.storage_health(),
            shutdown.token(),
        ));
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

    let reflection = Reflection::new(
        &[
            proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
        shutdown.clone(),
    )?;

    let limits = &config.limits;
    let mut grpc = Routes::builder();
    grpc.add_service(health_service)
        .add_service(reflection.v1(limits.max_message_size))
        .add_service(reflection.v1alpha(limits.max_message_size))
        .add_service(
            TelemetryService::new(Arc::clone(&hub), shutdown.clone())
                .into_server(limits.max_message_size),
        )
        .add_service(
            upload_service(Arc::clone(&uploads), &config, &shutdown, auth.enabled())?
                .with_bytes_counter(metrics.upload_bytes())
                .into_server(limits.max_message_size),
        )
        .add_service(
            ChatService::new(Arc::clone(&chat), chat_limits, shutdown.clone())
                .into_server(limits.max_message_size),
        )
        .add_service(
            ServerService::new(
                {
                    let open = conn_stats.clone();
                    Arc::new(move || open.open())
                },
                Arc::clone(metrics.calls()),
                auth.enabled(),
            )
            .with_node_of(cluster.as_deref())
            .into_server(),
        );
    // gRPC (and gRPC-Web), /metrics, /files/, the dashboard: one router.
    let app = web::app(
        grpc.routes().prepare(),
        WebState { metrics, uploads },
        &config.http,
        &auth::AuthLayer::new(Arc::clone(&auth), limits.max_streams_per_identity),
    )
    .layer(GateLayer::new(shutdown.token(), hub.rpc_counter()));
    let app = tower::ServiceBuilder::new()
        // What tonic's server did around the routes: a service error
        // becomes a gRPC status.
        .layer(RecoverErrorLayer::new())
        .service(app);

    let force = CancellationToken::new();
    let tls = transport.is_tls();
    let serve = transport.serve(app, shutdown.token(), force.clone());
    tokio::pin!(serve);
    tracing::info!(addr = %local_addr, tls, data_dir = %config.data_dir.display(), "serving");
    if let Some(ready) = ready {
        let _ = ready.send(local_addr);
    }

    tokio::select! {
        // Ends only once the token is cancelled, which only the code below
        // does.
        () = &mut serve => return Ok(()),
        () = signal => {}
    }

    tracing::info!(
        drain_timeout = ?config.drain_timeout,
        connections = conn_stats.open(),
        "shutting down: draining open streams"
    );
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

    if tokio::time::timeout_at(deadline, &mut serve).await.is_err() {
        tracing::warn!("drain timeout passed: closing the remaining connections");
        force.cancel();
        // Each connection's task lets go of its connection at once.
        if tokio::time::timeout(FORCED_CLOSE, &mut serve)
            .await
            .is_err()
        {
            tracing::warn!("connections still closing; not waiting for them");
        }
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

/// Mirrors a store's health into the health service: NOT_SERVING while
/// its storage is failing and being reopened (the log says why), SERVING
/// again once it recovered. Stops at shutdown, which sets NOT_SERVING.
async fn report_storage_health(
    reporter: HealthReporter,
    service: &'static str,
    mut health: tokio::sync::watch::Receiver<StorageHealth>,
    token: tokio_util::sync::CancellationToken,
) {
    loop {
        let status = match &*health.borrow_and_update() {
            StorageHealth::Serving => ServingStatus::Serving,
            StorageHealth::Failed { reason } => {
                tracing::warn!(service, %reason, "{service} is NOT_SERVING: its storage failed");
                ServingStatus::NotServing
            }
        };
        if token.is_cancelled() {
            return;
        }
        reporter.set_service_status(service, status).await;
        tokio::select! {
            () = token.cancelled() => return,
            changed = health.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// The upload service; with authentication on, it records who owns each
/// upload (for `upload.quota_per_identity`).
fn upload_service(
    store: Arc<upload::Store>,
    config: &Config,
    shutdown: &Shutdown,
    auth_enabled: bool,
) -> Result<UploadService, ServerError> {
    let service = UploadService::new(store, shutdown.clone(), config.limits.max_message_size);
    if !auth_enabled {
        return Ok(service);
    }
    let owners = upload::owners::Owners::open(&config.data_dir)?;
    Ok(service.with_owners(owners))
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
        let shutdown = self.shutdown.clone();
        let mut inner = match self.inner.watch(request).await {
            Ok(watch) => watch.into_inner(),
            // The health protocol: an unknown service gets SERVICE_UNKNOWN
            // and the call stays open (the served set is fixed, so it stays
            // unknown) until the client leaves or the server shuts down.
            Err(status) if status.code() == tonic::Code::NotFound => {
                let stream = async_stream::stream! {
                    yield Ok(HealthCheckResponse { status: PbStatus::ServiceUnknown.into() });
                    shutdown.cancelled().await;
                    yield Err(shutting_down());
                };
                return Ok(Response::new(Box::pin(stream)));
            }
            Err(status) => return Err(status),
        };
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
