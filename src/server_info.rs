//! `streamhub.ServerService`: what the server says about itself: version,
//! start time, open connections and open calls per method
//! (`GetServerInfo`), and who the caller is (`WhoAmI`, answered by the
//! authentication layer once it exists; UNIMPLEMENTED until then).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    calls::CallStats,
    proto::streamhub::{
        MethodStreams, ServerInfoRequest, ServerInfoResponse, WhoAmIRequest, WhoAmIResponse,
        server_service_server::{self, ServerServiceServer},
    },
    server_metrics::ConnectionCount,
    telemetry::now_ms,
};

/// The `streamhub.ServerService` implementation.
#[derive(Clone)]
pub struct ServerService {
    started_at_ms: u64,
    connections: ConnectionCount,
    calls: Arc<CallStats>,
    node: String,
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
    pub fn new(connections: ConnectionCount, calls: Arc<CallStats>) -> Self {
        Self {
            started_at_ms: now_ms(),
            connections,
            calls,
            node: sysinfo::System::host_name().unwrap_or_default(),
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
        _request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        Err(Status::unimplemented("WhoAmI is not implemented yet"))
    }

    async fn get_server_info(
        &self,
        _request: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoResponse>, Status> {
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
            auth_enabled: false,
        }))
    }
}
