//! Tells a scheme mismatch apart from other connection failures: an
//! `http://` URL pointing at a TLS port, or `https://` at a plaintext one.
//!
//! Either fails deep down with a message that does not say so (an HTTP/2
//! "protocol error" or "connection closed", rustls' "InvalidContentType"),
//! so when a call or connection fails the client asks the port itself:
//! it sends HTTP/2's connection preface and looks at the first bytes that
//! come back. A TLS server answers those bytes with a TLS record (an alert,
//! first byte 0x15, or a handshake, 0x16); an HTTP server answers with an
//! HTTP/2 frame (its SETTINGS) or an HTTP/1 status line. Only done after a
//! failure, so a working connection costs nothing.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// How long the probe may take in all (connect, write, first bytes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2's client connection preface followed by an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Whether `text` already holds a mismatch message of [`mismatch`] (so it
/// is not diagnosed twice).
pub fn is_mismatch(text: &str) -> bool {
    text.contains("speaks TLS; use https://") || text.contains("does not speak TLS")
}

/// What a port speaks, as far as the probe can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// TLS (it answered plaintext HTTP/2 with a TLS record).
    Tls,
    /// Plaintext HTTP (an HTTP/2 frame or an HTTP/1 status line).
    Plaintext,
}

/// Asks the server at `server` (an `http://` or `https://` URL) what it
/// speaks. `None` when the probe could not tell (no answer, connection
/// refused, anything else).
pub async fn speaks(server: &str) -> Option<Speaks> {
    let uri: http::Uri = server.parse().ok()?;
    let host = uri.host()?.trim_matches(['[', ']']).to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    tokio::time::timeout(PROBE_TIMEOUT, async move {
        let mut stream = TcpStream::connect((host.as_str(), port)).await.ok()?;
        stream.write_all(PREFACE).await.ok()?;
        let mut first = [0u8; 8];
        let mut got = 0;
        // A frame header is 9 bytes, a TLS record header 5: 4 tell them apart.
        while got < 4 {
            match stream.read(&mut first[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        classify(&first[..got])
    })
    .await
    .ok()
    .flatten()
}

/// What the first bytes a server sent back say it speaks.
fn classify(first: &[u8]) -> Option<Speaks> {
    match first {
        [0x15 | 0x16, 0x03, ..] => Some(Speaks::Tls),
        [b'H', b'T', b'T', b'P', ..] => Some(Speaks::Plaintext),
        // An HTTP/2 frame header: 24-bit length, then the type (4: SETTINGS).
        [_, _, _, 0x04, ..] => Some(Speaks::Plaintext),
        _ => None,
    }
}

/// The error to show when `server`'s scheme does not match what its port
/// speaks, saying what to use instead; `None` when it matches or the probe
/// cannot tell.
pub async fn mismatch(server: &str) -> Option<String> {
    let (scheme, rest) = server.split_once("://")?;
    match (scheme, speaks(server).await?) {
        ("http", Speaks::Tls) => Some(format!(
            "the server at {server} speaks TLS; use https://{rest} (with --ca if its \
             certificate is not signed by a CA the system trusts)"
        )),
        ("https", Speaks::Plaintext) => Some(format!(
            "the server at {server} does not speak TLS (it answered in plaintext); \
             use http://{rest}"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{Speaks, classify};

    #[test]
    fn first_bytes_tell_tls_from_plaintext() {
        assert_eq!(classify(&[0x15, 0x03, 0x03, 0x00, 0x02]), Some(Speaks::Tls));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00]), Some(Speaks::Tls));
        assert_eq!(classify(&[0, 0, 0x18, 0x04, 0]), Some(Speaks::Plaintext));
        assert_eq!(classify(b"HTTP/1.1 400"), Some(Speaks::Plaintext));
        assert_eq!(classify(&[]), None);
    }
}
