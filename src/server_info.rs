//! `streamhub.ServerService`: what the server says about itself: version,
//! start time, open connections and open calls per method
//! (`GetServerInfo`, scope `server:read:info`), and who the caller is
//! (`WhoAmI`, open to every authenticated caller).

use std::{sync::Arc, time::UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::{
    auth::{self, Action, Resource},
    calls::CallStats,
    proto::streamhub::{
        MethodStreams, ServerInfoRequest, ServerInfoResponse, WhoAmIRequest, WhoAmIResponse,
        server_service_server::{self, ServerServiceServer},
    },
    server_metrics::ConnectionCount,
    telemetry::now_ms,
};

/// The name GetServerInfo is authorized under: scope `server:read:info`.
pub const INFO_NAME: &str = "info";

/// The `streamhub.ServerService` implementation.
#[derive(Clone)]
pub struct ServerService {
    started_at_ms: u64,
    connections: ConnectionCount,
    calls: Arc<CallStats>,
    node: String,
    auth_enabled: bool,
}

impl std::fmt::Debug for ServerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerService")
            .field("started_at_ms", &self.started_at_ms)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ServerService {
    /// The service of a server started now, reading open connections from
    /// `connections` and open calls from `calls`.
    /// `auth_enabled` says whether authentication is on.
    pub fn new(connections: ConnectionCount, calls: Arc<CallStats>, auth_enabled: bool) -> Self {
        Self {
            auth_enabled,
            started_at_ms: now_ms(),
            connections,
            calls,
            node: sysinfo::System::host_name().unwrap_or_default(),
        }
    }

    /// Names this server as its cluster node (`cluster.node`), which
    /// GetServerInfo then reports instead of the host name.
    #[must_use]
    pub fn with_node(mut self, node: &str) -> Self {
        node.clone_into(&mut self.node);
        self
    }

    /// [`ServerService::with_node`] for a cluster node; unchanged on a
    /// single node.
    #[must_use]
    pub fn with_node_of(self, cluster: Option<&crate::cluster::Cluster>) -> Self {
        match cluster {
            Some(cluster) => self.with_node(cluster.node()),
            None => self,
        }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> ServerServiceServer<Self> {
        ServerServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl server_service_server::ServerService for ServerService {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        let expires_at_ms = identity
            .expires_at()
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Ok(Response::new(WhoAmIResponse {
            identity: identity.name().to_owned(),
            scopes: identity.scopes().texts(),
            auth_enabled: self.auth_enabled,
            method: identity.method().as_str().to_owned(),
            expires_at_ms,
        }))
    }

    async fn get_server_info(
        &self,
        request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
        let identity = auth::layer::identity(request.extensions());
        auth::authorize(&identity, Resource::Server, Action::Read, INFO_NAME)?;
        let streams = self
            .calls
            .open_by_method()
            .into_iter()
            .filter(|(_, open)| *open > 0)
            .map(|(method, open)| MethodStreams {
                method: method.to_string(),
                open,
            })
            .collect();
        Ok(Response::new(ServerInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_ms: self.started_at_ms,
            open_connections: (self.connections)(),
            streams,
            node: self.node.clone(),
            auth_enabled: self.auth_enabled,
        }))
    }
}
