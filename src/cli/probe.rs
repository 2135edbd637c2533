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

/// Whether the TLS server at `server` (an `https://` URL) asks clients
/// for a certificate (mTLS, `tls.client_ca`). `None` when the probe could
/// not tell (no TLS handshake got that far).
///
/// Needed because a client without one cannot tell from its failed call:
/// under TLS 1.3 its handshake completes before the server checks the
/// (empty) certificate, so the call fails with whatever the closing
/// connection looked like ("connection closed", "broken pipe") as often
/// as with the server's CertificateRequired alert. The probe handshakes
/// itself and notes whether a CertificateRequest came; it checks nothing
/// about the server and sends no request, so it trusts any certificate.
pub async fn asks_for_client_cert(server: &str) -> Option<bool> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let uri: http::Uri = server.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return Some(false);
    }
    let host = uri.host()?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let asked = Arc::new(AtomicBool::new(false));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_cert_resolver(Arc::new(NoteRequest(asked.clone())));
    let name = rustls_pki_types::ServerName::try_from(host.clone()).ok()?;
    let handshake = tokio::time::timeout(PROBE_TIMEOUT, async move {
        let stream = TcpStream::connect((host.as_str(), port)).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        // Whether it succeeds or the server refuses the empty certificate,
        // the CertificateRequest (if any) has been seen by then.
        let _ = connector.connect(name, stream).await;
        Some(())
    })
    .await;
    match (handshake, asked.load(Ordering::Relaxed)) {
        (_, true) => Some(true),
        (Ok(Some(())), false) => Some(false),
        _ => None,
    }
}

/// A client certificate resolver that has no certificate and notes that
/// the server asked for one.
#[derive(Debug)]
struct NoteRequest(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl rustls::client::ResolvesClientCert for NoteRequest {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Accepts any server certificate: the probe only looks at the handshake
/// and sends nothing over it.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls_pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
