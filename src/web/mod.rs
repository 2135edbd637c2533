//! Everything the server answers over plain HTTP, next to gRPC on the same
//! port, and what browsers need to call gRPC:
//!
//! - `GET /metrics`: Prometheus metrics ([`crate::server_metrics`]);
//!   needs `server:read:metrics`;
//! - `GET /files/NAME`: a stored file, with ranges ([`files`]); needs
//!   `upload:read:NAME`;
//! - `GET /` and the dashboard's other files, embedded at compile time
//!   ([`assets`]);
//! - gRPC-Web (`tonic-web`), for the dashboard's calls over HTTP/1.1 and
//!   HTTP/2, and CORS for the origins in `http.cors_origins` (none by
//!   default: same-origin only).
//!
//! [`app`] puts them together with the gRPC routes into the one
//! `axum::Router` the server serves. Order, outermost first: CORS (it
//! answers preflights itself), gRPC-Web ([`grpc_web`]: turns a gRPC-Web
//! call into gRPC and back; native calls pass untouched), the call layer
//! ([`crate::rpc::StatusLayer`]: deadlines, the spec's statuses, and the
//! count of calls per method, so it sees plain gRPC whichever way the call
//! came), [`AuthLayer`], the gRPC routes. These are one tower stack, added
//! to the router once, so a response body is boxed once on its way out. The plain HTTP
//! routes sit beside them; any other path is UNIMPLEMENTED for a gRPC
//! request, an embedded file for a browser, or 404.

pub mod assets;
pub mod files;
pub mod grpc_web;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tonic::service::Routes;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::{
    auth::{self, AuthLayer},
    config::HttpConfig,
    server_metrics::Metrics,
    upload,
};

/// What the plain HTTP routes need.
#[derive(Debug, Clone)]
pub struct WebState {
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    /// Stored files.
    pub uploads: Arc<upload::Store>,
}

/// The plain HTTP routes: `/metrics` (scope `server:read:metrics`) and
/// `/files/{name}` (scope `upload:read:{name}`); each answers 403 naming
/// the scope when the identity [`AuthLayer`] found lacks it.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/files/{name}", get(files::get_file))
        .with_state(state)
}

/// The whole application: the gRPC `routes` (counted unless
/// `http.count` is false, and reachable over gRPC-Web), the plain HTTP
/// routes, the embedded dashboard, and CORS as `http` configures it.
///
/// `auth` authenticates every gRPC call (native or gRPC-Web) and the
/// `/metrics` and `/files/` routes; the dashboard's own files are open
/// (they carry no data, and the page must load to ask for a token).
pub fn app(routes: Routes, state: WebState, http: &HttpConfig, auth: &AuthLayer) -> Router {
    let calls = http.count.then(|| Arc::clone(state.metrics.calls()));
    let grpc = routes.into_axum_router().layer(
        tower::ServiceBuilder::new()
            // Reached by gRPC-Web too; every call ends as the gRPC spec
            // says (grpc-timeout on every call, the spec's codes for
            // tonic's codec errors) and is counted as it ends;
            // authenticated before any handler runs.
            .layer(grpc_web::GrpcWebLayer)
            .layer(crate::rpc::StatusLayer::new(calls))
            .layer(auth.clone()),
    );
    let http_routes = router(state).layer(auth.clone());
    let app = grpc.merge(http_routes).fallback(fallback);
    match cors(http) {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// Headers of gRPC(-Web) responses a page on another origin may read.
const EXPOSED: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "chat-room",
    "chat-epoch",
    "chat-last-seq",
    "chat-oldest-seq",
    "content-range",
    "etag",
];

/// The CORS layer for `http.cors_origins`, or `None` (same-origin only:
/// without CORS headers a browser lets no other origin read a response).
pub fn cors(http: &HttpConfig) -> Option<CorsLayer> {
    if http.cors_origins.is_empty() {
        return None;
    }
    let origin = if http.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked by the configuration's validation; a bad one is skipped.
        AllowOrigin::list(
            http.cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(
                EXPOSED
                    .iter()
                    .map(|h| HeaderName::from_static(h))
                    .collect::<Vec<_>>(),
            )
            .max_age(Duration::from_secs(24 * 60 * 60)),
    )
}

/// The name `/metrics` is authorized under: scope `server:read:metrics`.
pub const METRICS_NAME: &str = "metrics";

/// PERMISSION_DENIED as HTTP: 403 with the message naming the scope
/// needed.
pub(crate) fn forbidden(denied: &tonic::Status) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", denied.message()),
    )
        .into_response()
}

/// `GET /metrics`: needs `server:read:metrics`.
async fn metrics(State(state): State<WebState>, extensions: axum::http::Extensions) -> Response {
    let identity = auth::layer::identity(&extensions);
    if let Err(denied) = auth::authorize(
        &identity,
        auth::Resource::Server,
        auth::Action::Read,
        METRICS_NAME,
    ) {
        return forbidden(&denied);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Any other path: UNIMPLEMENTED to gRPC, an embedded file, or 404.
async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if is_grpc(&headers) {
        return tonic::Status::unimplemented(format!("no method {}", uri.path()))
            .into_http::<Body>();
    }
    let path = uri.path().trim_start_matches('/');
    if let Some(response) = assets::serve(&method, path, &headers) {
        return response;
    }
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("nothing is served at {}\n", uri.path()),
    )
        .into_response()
}
