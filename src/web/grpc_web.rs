//! gRPC-Web only where it is needed: a layer that sends gRPC-Web calls
//! (and HTTP/1.1 requests, which tonic-web answers with 400 unless they
//! are gRPC-Web) through `tonic_web`, and native gRPC over HTTP/2 straight
//! to the routes.
//!
//! `tonic_web::GrpcWebLayer` alone would do the same dispatch, but it
//! turns every native call's response body into `tonic::body::Body` and
//! the router then boxes that again into `axum::body::Body`: two more
//! pointer hops and dynamic calls for every message of every stream, the
//! fan-out path's largest cost (BENCHMARKS.md section 6). Here a native
//! call's response is passed on as the inner service made it.

use std::task::{Context, Poll};

use axum::body::Body;
use futures::future::{BoxFuture, Either};
use http::{Request, Response, Version, header};
use tower::{Layer, Service, ServiceExt, util::MapRequest};

/// The layer: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcWebLayer;

impl<S: Clone> Layer<S> for GrpcWebLayer {
    type Service = GrpcWeb<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcWeb {
            web: tonic_web::GrpcWebLayer::new().layer(MapRequest::new(
                inner.clone(),
                to_axum as fn(Request<tonic::body::Body>) -> Request<Body>,
            )),
            native: inner,
        }
    }
}

/// A gRPC-Web request's body, back in the routes' body type.
fn to_axum(request: Request<tonic::body::Body>) -> Request<Body> {
    request.map(Body::new)
}

/// What the inner service sees on the gRPC-Web path.
type ToAxum<S> = MapRequest<S, fn(Request<tonic::body::Body>) -> Request<Body>>;

/// The service produced by [`GrpcWebLayer`].
#[derive(Debug, Clone)]
pub struct GrpcWeb<S> {
    web: tonic_web::GrpcWebService<ToAxum<S>>,
    native: S,
}

/// Whether tonic-web must see `request`: a gRPC-Web call (its content
/// type, as tonic-web tells them apart), or anything not over HTTP/2.
fn for_tonic_web<B>(request: &Request<B>) -> bool {
    request.version() != Version::HTTP_2
        || request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web"))
}

impl<S> Service<Request<Body>> for GrpcWeb<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both paths end in clones of the same inner service.
        self.native.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !for_tonic_web(&request) {
            return Either::Left(self.native.call(request));
        }
        let web = self.web.clone();
        Either::Right(Box::pin(async move {
            let response = web.oneshot(request).await?;
            Ok(response.map(Body::new))
        }))
    }
}
