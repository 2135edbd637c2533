//! The identity of a verified client certificate: its subject CN, or its
//! first DNS subject alternative name. The TLS layer has verified the chain
//! against `tls.client_ca`; this only reads the leaf.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{AuthError, MAX_IDENTITY_LEN};

/// The verified client certificate chain of a request's connection (leaf
/// first), as the transport puts it in the request's extensions under
/// mTLS. The auth layer reads it from there.
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

/// The identity of the DER-encoded certificate `der`: its subject CN, or
/// its first DNS SAN when it has no CN.
pub fn identity(der: &[u8]) -> Result<String, AuthError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| AuthError::Certificate("cannot parse the certificate".into()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| {
            cn.as_str()
                .map(str::to_owned)
                .map_err(|_| AuthError::Certificate("the subject CN is not a string".into()))
        })
        .transpose()?;
    let name = match cn {
        Some(cn) => cn,
        None => {
            let san = cert.subject_alternative_name().map_err(|_| {
                AuthError::Certificate("unreadable subject alternative names".into())
            })?;
            san.and_then(|ext| {
                ext.value.general_names.iter().find_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
            })
            .ok_or_else(|| {
                AuthError::Certificate("it has neither a subject CN nor a DNS name".into())
            })?
        }
    };
    if name.is_empty() || name.len() > MAX_IDENTITY_LEN || name.chars().any(char::is_control) {
        return Err(AuthError::Certificate(format!(
            "its name must be 1 to {MAX_IDENTITY_LEN} bytes without control characters"
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn cn_first_then_dns_san() {
        assert_eq!(
            identity(&cert(Some("alice"), &["a.example"])).unwrap(),
            "alice"
        );
        assert_eq!(
            identity(&cert(None, &["bob.example", "c.example"])).unwrap(),
            "bob.example"
        );
        assert!(identity(&cert(None, &[])).is_err());
        assert!(identity(b"not a certificate").is_err());
        assert!(identity(&[]).is_err());
    }
}
