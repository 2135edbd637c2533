//! TLS and a static token for the servers under test (`--secure`), and the
//! "security" scenario: what TLS plus authentication costs.
//!
//! With `--secure`, every streamhub the suite starts gets a throwaway CA
//! and a server certificate for `localhost` and 127.0.0.1 (made with
//! `rcgen` in the server's scratch folder), and a config file with one
//! `[[auth.tokens]]` entry (scope `*`). The load generator's connections
//! to that server then go over `https://` (verifying the certificate
//! against that CA) and carry `authorization: Bearer <token>` on every
//! call. Which servers are secure is kept in a registry keyed by address,
//! so [`super::harness::connect`] needs no other argument.
//!
//! The scenario runs, in one invocation and alternating repetition by
//! repetition, fan-out (`--subscribers`), upload at 64 KiB chunks on disk
//! and tmpfs (`--upload-mib`) and the chat ladder (`--chat-rates`), each
//! against a plaintext streamhub and a TLS-plus-token one.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    service::Interceptor,
};

use super::{
    BenchError, Options, Target, chat, fanout,
    harness::{Check, Metrics, Pinning, Row, ratio},
    upload,
};

/// The client's side of a secure server: the CA to verify it with and the
/// header to send.
#[derive(Clone)]
pub struct ClientSecurity {
    /// PEM certificate of the CA that signed the server's certificate.
    pub ca_pem: String,
    /// `Bearer <token>`, marked sensitive.
    pub authorization: AsciiMetadataValue,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity").finish_non_exhaustive()
    }
}

/// The server name the certificate is made for and the client checks.
pub const SERVER_NAME: &str = "localhost";

/// Adds `authorization: Bearer <token>` to every call, if there is one.
#[derive(Clone, Default)]
pub struct Bearer(pub Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bearer")
            .field(&self.0.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

static REGISTRY: Mutex<Option<HashMap<SocketAddr, Arc<ClientSecurity>>>> = Mutex::new(None);

fn registry() -> std::sync::MutexGuard<'static, Option<HashMap<SocketAddr, Arc<ClientSecurity>>>> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records that the server at `addr` wants TLS and a token.
pub fn register(addr: SocketAddr, client: ClientSecurity) {
    registry()
        .get_or_insert_with(HashMap::new)
        .insert(addr, Arc::new(client));
}

/// Forgets the server at `addr` (it stopped).
pub fn unregister(addr: SocketAddr) {
    if let Some(map) = registry().as_mut() {
        map.remove(&addr);
    }
}

/// The security of the server at `addr`, if it is a secure one.
pub fn lookup(addr: SocketAddr) -> Option<Arc<ClientSecurity>> {
    registry().as_ref().and_then(|map| map.get(&addr).cloned())
}

fn setup_error(what: &str, err: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("cannot make the {what} for --secure: {err}"))
}

/// Writes a fresh CA, a server certificate (with the CA after it) and its
/// key, and a config file with one static token into `dir`; returns the
/// `serve` arguments that use them and the client's side.
pub fn prepare(dir: &Path) -> Result<(Vec<String>, ClientSecurity), BenchError> {
    let ca_key = KeyPair::generate().map_err(|e| setup_error("CA key", e))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| setup_error("CA", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "streamhub bench CA");
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| setup_error("CA", e))?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().map_err(|e| setup_error("server key", e))?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])
        .map_err(|e| setup_error("server certificate", e))?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| setup_error("server certificate", e))?;

    let token = crate::auth::token::generate().map_err(|e| setup_error("token", e))?;
    let entry = crate::auth::token::config_entry("bench", &["*".to_owned()], &token);

    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let config_path = dir.join("auth.toml");
    std::fs::write(&cert_path, format!("{}{ca_pem}", cert.pem()))?;
    std::fs::write(&key_path, key.serialize_pem())?;
    std::fs::write(&config_path, entry)?;

    let mut authorization: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|e| setup_error("authorization header", e))?;
    authorization.set_sensitive(true);
    let args = vec![
        "--tls-cert".into(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
        "--config".into(),
        config_path.display().to_string(),
    ];
    Ok((
        args,
        ClientSecurity {
            ca_pem,
            authorization,
        },
    ))
}

/// The two modes compared, as named in the results.
const MODES: [(&str, bool); 2] = [("plaintext", false), ("tls+token", true)];

fn with_mode(options: &Options, secure: bool) -> Options {
    let mut o = options.clone();
    o.secure = secure;
    o.targets = vec![Target::Streamhub];
    o.no_nats = true;
    o.external = false;
    o
}

/// Runs the scenario: fan-out, upload and chat, plaintext against TLS plus
/// a static token, repetitions alternating between the two.
pub async fn run(
    options: &Options,
    pinning: &Pinning,
) -> Result<(serde_json::Value, Vec<Row>, Vec<Check>), BenchError> {
    let mut rows = Vec::new();

    // Fan-out.
    for &n in &options.subscribers {
        let mut runs: [Vec<Metrics>; 2] = [Vec::new(), Vec::new()];
        let mut failure: [Option<BenchError>; 2] = [None, None];
        for rep in 0..options.repetitions {
            for (i, (mode, secure)) in MODES.iter().enumerate() {
                if failure[i].is_some() {
                    continue;
                }
                tracing::info!(mode, subscribers = n, rep, "security: fan-out run");
                let o = with_mode(options, *secure);
                match fanout::run_once(Target::Streamhub, n, &o, pinning).await {
                    Ok(m) => runs[i].push(m),
                    Err(err) => {
                        tracing::warn!(mode, %err, "security: fan-out run failed");
                        failure[i] = Some(err);
                    }
                }
            }
        }
        for (i, (mode, _)) in MODES.iter().enumerate() {
            let config = [
                ("part", "fanout".to_owned()),
                ("security", (*mode).to_owned()),
                ("subscribers", n.to_string()),
            ];
            let r = std::mem::take(&mut runs[i]);
            rows.push(match (&failure[i], r.is_empty()) {
                (Some(err), true) => Row::failed("streamhub", &config, err),
                _ => Row::new("streamhub", &config, r),
            });
        }
    }

    // Upload, 64 KiB chunks, one server per mode and storage.
    let places = [
        ("disk", options.disk_dir.clone()),
        ("tmpfs", options.tmpfs_dir.clone()),
    ];
    for (storage, dir) in &places {
        let mut new_rows = Vec::new();
        for (mode, secure) in MODES {
            let config = [
                ("part", "upload".to_owned()),
                ("security", mode.to_owned()),
                ("storage", (*storage).to_owned()),
                ("chunk", "64KiB".to_owned()),
            ];
            let o = with_mode(options, secure);
            tracing::info!(mode, storage, "security: upload runs");
            let runs = upload::measure_default_chunk(&o, pinning, dir).await;
            new_rows.push(Row::of("streamhub", &config, runs));
        }
        rows.extend(new_rows);
    }

    // Chat ladder.
    for (mode, secure) in MODES {
        let o = with_mode(options, secure);
        let mut steps: Vec<Vec<Metrics>> = vec![Vec::new(); options.chat_rates.len()];
        let mut failure = None;
        for rep in 0..options.repetitions {
            tracing::info!(mode, rep, "security: chat ladder");
            match chat::ladder(Target::Streamhub, &o, pinning).await {
                Ok(ms) => {
                    for (slot, m) in steps.iter_mut().zip(ms) {
                        slot.push(m);
                    }
                }
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        for (i, &rate) in options.chat_rates.iter().enumerate() {
            let config = [
                ("part", "chat".to_owned()),
                ("security", mode.to_owned()),
                ("rate", rate.to_string()),
            ];
            let r = std::mem::take(&mut steps[i]);
            rows.push(match (&failure, r.is_empty()) {
                (Some(err), true) => Row::failed("streamhub", &config, err),
                (None, true) => Row::failed(
                    "streamhub",
                    &config,
                    &BenchError::Setup("not reached: an earlier rate saturated".into()),
                ),
                _ => Row::new("streamhub", &config, r),
            });
        }
    }

    let checks = checks(&rows, options);
    let settings = serde_json::json!({
        "subscribers": options.subscribers,
        "per_connection": options.per_connection,
        "rounds": options.rounds,
        "saturation_s": options.saturation,
        "pipeline": options.pipeline,
        "upload_mib": options.upload_mib,
        "upload_chunk": "64KiB",
        "chat_members": options.members,
        "chat_senders": options.senders,
        "chat_rates": options.chat_rates,
        "step_seconds": options.step_seconds,
        "repetitions": options.repetitions,
        "tls": "rustls, ECDSA P-256 server certificate from a throwaway CA, TLS 1.3, ALPN h2",
        "auth": "one [[auth.tokens]] static token, scope *; every call carries authorization: Bearer",
        "order": "fan-out repetitions alternate plaintext / tls+token",
    });
    Ok((settings, rows, checks))
}

fn checks(rows: &[Row], options: &Options) -> Vec<Check> {
    let get = |part: &str, mode: &str, key: &str, value: &str, metric: &str| {
        rows.iter()
            .find(|r| r.is("part", part) && r.is("security", mode) && r.is(key, value))
            .and_then(|r| r.get(metric))
    };
    let mut checks = Vec::new();
    for &n in &options.subscribers {
        let n = n.to_string();
        checks.push(Check::at_least(
            format!("{n} subscribers: fan-out deliveries/s, TLS+token / plaintext"),
            ratio(
                get("fanout", "tls+token", "subscribers", &n, "deliveries_per_s"),
                get("fanout", "plaintext", "subscribers", &n, "deliveries_per_s"),
            ),
            0.85,
        ));
    }
    for storage in ["disk", "tmpfs"] {
        checks.push(Check::at_least(
            format!("{storage}: upload MiB/s at 64 KiB chunks, TLS+token / plaintext"),
            ratio(
                get("upload", "tls+token", "storage", storage, "mib_per_s"),
                get("upload", "plaintext", "storage", storage, "mib_per_s"),
            ),
            0.75,
        ));
    }
    checks
}
