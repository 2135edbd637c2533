//! The dashboard's files, embedded in the binary at compile time from
//! `web/dist/` (built by `web/`'s own toolchain and committed, so
//! `cargo build` never needs Node; `build.rs` rebuilds when they change).
//!
//! Content types come from the file name. Files under `assets/` carry a
//! content hash in their names (the bundler's convention), so they are
//! cached for a year as immutable; everything else (`index.html`) is
//! revalidated on every load with its `ETag`. When `NAME.gz` is embedded
//! too and the client accepts gzip, it is sent instead.

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use include_dir::{Dir, File, include_dir};
use sha2::{Digest as _, Sha256};

static DIST: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/web/dist");

/// Cache-Control of content-hashed assets.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The embedded file at `path` (relative, no leading `/`), if any.
pub fn file(path: &str) -> Option<&'static File<'static>> {
    if path.is_empty() || path.split('/').any(|part| part.is_empty() || part == "..") {
        return None;
    }
    DIST.get_file(path)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Serves the embedded file at `path` (`""` = `index.html`) to a GET or
/// HEAD request, or `None` if there is no such file.
pub fn serve(method: &Method, path: &str, headers: &HeaderMap) -> Option<Response> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let path = if path.is_empty() { "index.html" } else { path };
    let plain = file(path)?;
    let gzipped = file(&format!("{path}.gz")).filter(|_| accepts_gzip(headers));
    let body = gzipped.unwrap_or(plain).contents();

    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let content_type = if mime.type_() == "text" || mime.essence_str() == "application/javascript" {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_owned()
    };
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if gzipped.is_some() {
        response = response.header(header::CONTENT_ENCODING, "gzip");
    }
    if file(&format!("{path}.gz")).is_some() {
        response = response.header(header::VARY, "accept-encoding");
    }
    if path.starts_with("assets/") {
        response = response.header(header::CACHE_CONTROL, IMMUTABLE);
    } else {
        let etag = format!("\"{}\"", &hex::encode(Sha256::digest(body))[..32]);
        let fresh = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
        response = response
            .header(header::CACHE_CONTROL, "no-cache")
            .header(header::ETAG, etag);
        if fresh {
            return response
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .ok();
        }
    }
    response
        .header(header::CONTENT_LENGTH, HeaderValue::from(body.len()))
        .body(Body::from(body))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_embedded_and_paths_cannot_escape() {
        assert!(file("index.html").is_some());
        assert!(file("../Cargo.toml").is_none());
        assert!(file("/index.html").is_none());
        assert!(file("").is_none());
    }

    #[test]
    fn gzip_is_chosen_by_accept_encoding() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(with("gzip, deflate, br"));
        assert!(with("br;q=1.0, GZIP;q=0.5"));
        assert!(with("*"));
        assert!(!with("br"));
        assert!(!with("gzip;q=0"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
