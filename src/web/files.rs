//! `GET /files/NAME`: a stored file over plain HTTP, with `Content-Length`,
//! a strong `ETag` (its SHA-256), and single `Range` requests, so
//! `curl -C -` and browsers resume downloads.
//!
//! It needs the scope `upload:read:NAME`, as Download does: without it,
//! 403 naming the scope, before the store is looked at (so a refusal says
//! nothing about whether the file exists).
//!
//! Names follow Download's rules: a missing file, or a name that could not
//! be stored (a path separator, `..`, …), is 404, and no body names a
//! server path. The file is sent as `application/octet-stream` with
//! `Content-Disposition: attachment` and `nosniff`, so an uploaded HTML
//! file can never run as a page of the dashboard's origin.
//!
//! A response holds a download slot (`upload.max_concurrent_downloads`)
//! and its file under the same no-progress rule as gRPC Download
//! ([`crate::upload::stall`]): a client that takes no data for
//! `upload.idle_timeout` loses both, and its response ends.

use std::time::{Duration, UNIX_EPOCH};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{Extensions, HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::WebState;
use crate::{
    auth::{self, Action, Resource},
    upload::{StoredFile, UploadError, limits::CallSlot, stall::Stallable},
};

/// Bytes read from disk per piece of the response body.
const READ_CHUNK: usize = 64 * 1024;

/// What a `Range` header asks of a file of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Bytes `start..=end` (inclusive, within the file).
    Bytes {
        /// First byte.
        start: u64,
        /// Last byte.
        end: u64,
    },
    /// A valid range that starts beyond the file: 416.
    Unsatisfiable,
    /// Not a single byte range this server serves (another unit, several
    /// ranges, bad syntax): ignored, the whole file is sent.
    Ignored,
}

/// Reads a `Range` header value for a file of `size` bytes. Only one range
/// is served; several are answered with the whole file, which RFC 9110
/// allows.
pub fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value
        .trim()
        .split_once('=')
        .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
        .map(|(_, spec)| spec.trim())
    else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Ignored;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // A position past u64 is past any file: unsatisfiable, not ignored.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    let (first, last) = (first.trim(), last.trim());
    let last = match (last.is_empty(), number(last)) {
        (true, _) => None,
        (false, Some(n)) => Some(n),
        (false, None) => return RangeRequest::Ignored,
    };
    if first.is_empty() {
        // "-N": the last N bytes.
        return match last {
            None => RangeRequest::Ignored,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(suffix) => RangeRequest::Bytes {
                start: size.saturating_sub(suffix),
                end: size - 1,
            },
        };
    }
    let Some(start) = number(first) else {
        return RangeRequest::Ignored;
    };
    match last {
        Some(last) if last < start => RangeRequest::Ignored,
        _ if start >= size => RangeRequest::Unsatisfiable,
        last => RangeRequest::Bytes {
            start,
            end: last.map_or(size - 1, |last| last.min(size - 1)),
        },
    }
}

/// Whether an `If-None-Match` value names `etag` (or is `*`).
fn none_match(value: &HeaderValue, etag: &str) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',').map(str::trim).any(|tag| {
            tag == "*" || tag == etag || tag.strip_prefix("W/").is_some_and(|weak| weak == etag)
        })
    })
}

/// A `Content-Disposition` for `name`: plain if it is simple ASCII, else
/// RFC 5987 encoded.
fn disposition(name: &str) -> HeaderValue {
    let simple = name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ');
    let value = if simple {
        format!("attachment; filename=\"{name}\"")
    } else {
        let mut encoded = String::with_capacity(name.len() * 3);
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                encoded.push(char::from(b));
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        format!("attachment; filename*=UTF-8''{encoded}")
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("attachment"))
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `GET /files/{name}` (and HEAD): needs `upload:read:{name}` (403
/// naming the scope otherwise, before the store is looked at).
pub(super) async fn get_file(
    State(state): State<WebState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Response {
    let identity = auth::layer::identity(&extensions);
    if let Err(denied) = auth::authorize(&identity, Resource::Upload, Action::Read, &name) {
        return super::forbidden(&denied);
    }
    // The same caps as gRPC Download: each open response holds a file.
    let peer = extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr)
        .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
    let slot = match state.uploads.download_slot(&peer) {
        Ok(slot) => slot,
        Err(err) => return text(StatusCode::TOO_MANY_REQUESTS, format!("{err}\n")),
    };
    let (file, info) = match state.uploads.open_described(&name).await {
        Ok(opened) => opened,
        Err(err @ (UploadError::NotFound { .. } | UploadError::BadName { .. })) => {
            return text(StatusCode::NOT_FOUND, format!("{err}\n"));
        }
        Err(err) => {
            tracing::error!(file = %name, %err, "cannot open a stored file for HTTP");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("stored file {name:?} cannot be read\n"),
            );
        }
    };
    let idle = state.uploads.config().idle_timeout;
    respond(file, &info, &headers, slot, idle).await
}

/// The response for `file`; `slot` (a download slot) is held until the
/// body is done or dropped, or until the client has taken no data for
/// `idle` (`upload.idle_timeout`, as for gRPC Download).
async fn respond(
    file: std::fs::File,
    info: &StoredFile,
    request: &HeaderMap,
    slot: CallSlot,
    idle: Duration,
) -> Response {
    let size = info.size;
    let etag = format!("\"{}\"", hex::encode(info.sha256));
    let modified = UNIX_EPOCH + Duration::from_millis(info.modified_ms);
    let last_modified = httpdate::fmt_http_date(modified);

    let mut response = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");

    if request
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| none_match(v, &etag))
    {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }

    // If-Range: the range only if the file is still the one the client
    // has (by ETag, or by the exact Last-Modified date).
    let range_applies = request.get(header::IF_RANGE).is_none_or(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim() == etag || v.trim() == last_modified)
    });
    let range = match request.get(header::RANGE) {
        Some(value) if range_applies => match value.to_str() {
            Ok(value) => parse_range(value, size),
            Err(_) => RangeRequest::Ignored,
        },
        _ => RangeRequest::Ignored,
    };
    let (status, start, len) = match range {
        RangeRequest::Bytes { start, end } => {
            response =
                response.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            return response
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from(format!(
                    "the range asked for starts beyond the file's {size} bytes\n"
                )))
                .unwrap_or_default();
        }
        RangeRequest::Ignored => (StatusCode::OK, 0, size),
    };

    let mut file = tokio::fs::File::from_std(file);
    if start > 0
        && let Err(err) = file.seek(std::io::SeekFrom::Start(start)).await
    {
        tracing::error!(file = %info.name, %err, "cannot seek in a stored file");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored file {:?} cannot be read\n", info.name),
        );
    }
    // The file and the slot sit with the shared no-progress watchdog, as
    // a gRPC Download's do: a client that stops reading (its TCP window
    // full, so the body is not polled) loses them after
    // `upload.idle_timeout`, and the body then ends with an error (hyper
    // drops the connection) instead of holding the slot for ever.
    let name = info.name.clone();
    let held = Stallable::spawn((file.take(len), slot), idle, move |_| {
        tracing::warn!(
            file = %name,
            "GET /files/ response stopped: its client took no data for {}",
            humantime::format_duration(idle)
        );
    });
    let name = info.name.clone();
    let stream = async_stream::stream! {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let Some((mut reader, slot)) = held.take() else {
                yield Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("download of {name} stopped: the client took no data"),
                ));
                break;
            };
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    held.put((reader, slot));
                    yield Ok(Bytes::copy_from_slice(&buf[..n]));
                }
                Err(err) => {
                    yield Err(err);
                    break;
                }
            }
        }
    };
    let body = Body::from_stream(stream);
    response
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_DISPOSITION, disposition(&info.name))
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::{Bytes, Ignored, Unsatisfiable};
        let cases = [
            ("bytes=0-9", 100, Bytes { start: 0, end: 9 }),
            // Past u64: past any file, so unsatisfiable (it was ignored).
            ("bytes=99999999999999999999999-", 100, Unsatisfiable),
            ("bytes=90-", 100, Bytes { start: 90, end: 99 }),
            ("bytes=90-200", 100, Bytes { start: 90, end: 99 }),
            ("bytes=-10", 100, Bytes { start: 90, end: 99 }),
            ("bytes=-500", 100, Bytes { start: 0, end: 99 }),
            ("Bytes = 5-5", 100, Bytes { start: 5, end: 5 }),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=9-0", 100, Ignored),
            ("bytes=0-1,5-6", 100, Ignored),
            ("items=0-1", 100, Ignored),
            ("bytes=a-b", 100, Ignored),
            ("bytes=1-x", 100, Ignored),
            ("bytes=+1-2", 100, Ignored),
            ("bytes=", 100, Ignored),
        ];
        for (value, size, expected) in cases {
            assert_eq!(parse_range(value, size), expected, "{value} of {size}");
        }
    }

    #[test]
    fn etags_and_dispositions() {
        let etag = "\"ab\"";
        for (value, expected) in [
            ("\"ab\"", true),
            ("*", true),
            ("W/\"ab\"", true),
            ("\"x\", \"ab\"", true),
            ("\"x\"", false),
        ] {
            assert_eq!(
                none_match(&HeaderValue::from_static(value), etag),
                expected,
                "{value}"
            );
        }
        assert_eq!(
            disposition("report 1.txt"),
            "attachment; filename=\"report 1.txt\""
        );
        assert_eq!(
            disposition("naïve\".txt"),
            "attachment; filename*=UTF-8''na%C3%AFve%22.txt"
        );
    }
}
