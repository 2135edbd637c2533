//! `streamhub.ServerService`: who the caller is (WhoAmI, open to every
//! authenticated caller) and how the server is doing (GetServerInfo,
//! scope `server:read:info`).

use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use crate::{
    auth::{self, Action, Resource},
    proto::streamhub::{
        ServerInfoRequest, ServerInfoResponse, WhoAmIRequest, WhoAmIResponse,
        server_service_server::{ServerService, ServerServiceServer},
    },
};

/// The name GetServerInfo is authorized under: scope `server:read:info`.
pub const INFO_NAME: &str = "info";

/// The `streamhub.ServerService` implementation.
#[derive(Debug, Clone)]
pub struct ServerInfoService {
    auth_enabled: bool,
}

impl ServerInfoService {
    /// A service for a server whose authentication is on or off.
    pub fn new(auth_enabled: bool) -> Self {
        Self { auth_enabled }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> ServerServiceServer<Self> {
        ServerServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ServerService for ServerInfoService {
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
        Err(Status::unimplemented(
            "GetServerInfo is not implemented yet",
        ))
    }
}
