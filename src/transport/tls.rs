//! Server TLS with rustls (ring provider): the configuration from PEM
//! files, and its reload without a restart.
//!
//! The certificate file holds the server certificate, optionally followed
//! by its chain; the key file its private key. With a client CA file, every
//! client must present a certificate that chains to one of its CAs (mutual
//! TLS); the verified chain reaches requests as
//! [`ConnInfo::client_certs`](super::ConnInfo::client_certs). ALPN offers
//! `h2` and `http/1.1`.
//!
//! [`TlsReloader`] holds the configuration in force. Each new connection
//! takes the one current when it is accepted, so connections already open
//! keep theirs. The files are read again on SIGHUP, and when their size or
//! modification time changes (checked every `tls.reload_interval`); a new
//! configuration that does not load is logged and the old one kept.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// Errors loading the TLS configuration. They name the file (for the log
/// and the command line, never for a client).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of `tls.cert` and `tls.key` was given, or a client CA
    /// without them.
    #[error("{0}")]
    Incomplete(&'static str),
    /// A PEM file could not be read or parsed.
    #[error("cannot read the TLS {what} from {path}: {cause}")]
    Pem {
        /// Which file: "certificate", "private key", "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: rustls_pki_types::pem::Error,
    },
    /// A file held no certificate.
    #[error("{path} holds no PEM certificate (expected \"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificate and key (e.g. they do not match).
    #[error("the TLS certificate {cert} and key {key} do not make a server configuration: {cause}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: rustls::Error,
    },
    /// A client CA certificate is not a usable trust anchor.
    #[error("the client CA file {path} holds a certificate that cannot be a trust anchor: {cause}")]
    ClientCaCert {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: rustls::Error,
    },
    /// The client CA certificates do not make a verifier.
    #[error("the client CA file {path} cannot verify clients: {cause}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: rustls::server::VerifierBuilderError,
    },
}

/// Where the TLS configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA certificates for client certificates (PEM), if clients must
    /// present one.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files `config` names: `None` when TLS is off.
    ///
    /// # Errors
    ///
    /// [`TlsError::Incomplete`] when only part of the pair is given.
    pub fn from_config(config: &TlsConfig) -> Result<Option<Self>, TlsError> {
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.client_ca.clone(),
            })),
            (None, None) if config.client_ca.is_some() => Err(TlsError::Incomplete(
                "tls.client_ca (--tls-client-ca) needs tls.cert and tls.key (--tls-cert, --tls-key)",
            )),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete(
                "tls.cert (--tls-cert) and tls.key (--tls-key) must be given together",
            )),
        }
    }

    /// Reads the files and builds the rustls configuration.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file that is missing, unreadable, not PEM,
    /// or that does not fit the others.
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs("certificate", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|cause| TlsError::Pem {
            what: "private key",
            path: self.key.clone(),
            cause,
        })?;
        let verifier = match &self.client_ca {
            Some(path) => Some(client_verifier(path, &provider)?),
            None => None,
        };
        let config_error = |cause| TlsError::Config {
            cert: self.cert.clone(),
            key: self.key.clone(),
            cause,
        };
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(config_error)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// What the files look like now (size and modification time), to see
    /// when they change.
    fn stamp(&self) -> Vec<Option<(u64, SystemTime)>> {
        let files = [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()];
        files
            .into_iter()
            .flatten()
            .map(|path| {
                std::fs::metadata(path)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |cause| TlsError::Pem {
        what,
        path: path.to_owned(),
        cause,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn client_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("client CA", path)? {
        roots.add(cert).map_err(|cause| TlsError::ClientCaCert {
            path: path.to_owned(),
            cause,
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|cause| TlsError::ClientCa {
            path: path.to_owned(),
            cause,
        })
}

/// The TLS configuration in force, reloadable.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The stamp of the files last tried, so a bad file is reported once,
    /// not at every check.
    tried: Mutex<Vec<Option<(u64, SystemTime)>>>,
}

impl TlsReloader {
    /// Loads the files `config` names; `None` when TLS is off.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] when the files are incomplete or do not load.
    pub fn from_config(config: &TlsConfig) -> Result<Option<Self>, TlsError> {
        TlsFiles::from_config(config)?.map(Self::load).transpose()
    }

    /// Loads `files`.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] when they do not load.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = files.load()?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            tried: Mutex::new(stamp),
        })
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.current.read().unwrap_or_else(PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Reads the files again and, if they load, puts them in force for new
    /// connections.
    ///
    /// # Errors
    ///
    /// The [`TlsError`] of the new files; the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = self.files.stamp();
        *self.tried.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        let config = self.files.load()?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// Reloads if the files changed since they were last tried.
    fn reload_if_changed(&self) {
        let changed =
            *self.tried.lock().unwrap_or_else(PoisonError::into_inner) != self.files.stamp();
        if changed {
            self.reload_logged("files changed");
        }
    }

    fn reload_logged(&self, why: &'static str) {
        match self.reload() {
            Ok(()) => tracing::info!(
                why,
                cert = %self.files.cert.display(),
                "TLS certificate and key reloaded; new connections use them"
            ),
            Err(err) => tracing::error!(
                why,
                %err,
                "TLS reload failed; the previous certificate and key stay in force"
            ),
        }
    }

    /// Reloads on SIGHUP and, every `interval` (unless zero), when the
    /// files changed; until `stop` is cancelled.
    /// `hangup` is created beforehand ([`Hangup::listen`]), so that a
    /// SIGHUP sent as soon as the server serves finds the handler in place
    /// instead of the default action (ending the process).
    pub async fn watch(
        self: Arc<Self>,
        mut hangup: Hangup,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let poll = !interval.is_zero();
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.reset();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = hangup.recv() => self.reload_logged("SIGHUP"),
                _ = ticks.tick(), if poll => self.reload_if_changed(),
            }
        }
    }
}

/// SIGHUP, where there is such a thing.
#[derive(Debug)]
pub struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    /// Installs the SIGHUP handler (a warning if it cannot be).
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|err| {
                    tracing::warn!(%err, "cannot listen for SIGHUP; TLS files are reloaded only when they change");
                })
                .ok();
            Self { signal }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes at the next SIGHUP; never, if there is none to wait for.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut() {
            if signal.recv().await.is_some() {
                return;
            }
            self.signal = None;
        }
        std::future::pending::<()>().await;
    }
}
