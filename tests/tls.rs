//! Server TLS: certificates made by rcgen in the test, tonic clients that
//! trust (or do not trust) their CA, mutual TLS, plaintext clients on the
//! TLS port, stalled handshakes, reload on file change and on SIGHUP with
//! open streams surviving, and what requests learn about their connection.

#![allow(clippy::unwrap_used)]

mod common;

use std::{convert::Infallible, path::Path, sync::Arc, time::Duration};

use common::{ServerProcess, TestServer, test_config, within};
use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use streamhub::{
    config::TlsConfig,
    proto::telemetry::telemetry_service_client::TelemetryServiceClient,
    transport::{ConnInfo, RequestBody, Transport},
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A test certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, with the CA's
    /// certificate after it (a chain).
    fn server(&self) -> Pair {
        self.server_for(&["localhost", "127.0.0.1"])
    }

    /// A server certificate for `names`, with the CA's certificate after it.
    fn server_for(&self, names: &[&str]) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: format!("{}{}", cert.pem(), self.pem),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate named `name`; expired if `expired`.
    fn client(&self, name: &str, expired: bool) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `contents` to `path` atomically (a rename), as a deployment tool
/// would.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Files of a TLS configuration in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server: &Pair, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.install(server);
        if let Some(ca) = client_ca {
            std::fs::write(files.client_ca(), &ca.pem).unwrap();
        }
        files
    }

    fn cert(&self) -> std::path::PathBuf {
        self.dir.path().join("server.crt")
    }

    fn key(&self) -> std::path::PathBuf {
        self.dir.path().join("server.key")
    }

    fn client_ca(&self) -> std::path::PathBuf {
        self.dir.path().join("clients.crt")
    }

    fn install(&self, server: &Pair) {
        replace(&self.cert(), &server.cert);
        replace(&self.key(), &server.key);
    }

    fn config(&self, mtls: bool) -> TlsConfig {
        TlsConfig {
            cert: Some(self.cert()),
            key: Some(self.key()),
            client_ca: mtls.then(|| self.client_ca()),
            reload_interval: Duration::from_millis(50),
        }
    }
}

async fn start(files: &Files, mtls: bool) -> TestServer {
    let mut config = test_config();
    config.tls = files.config(mtls);
    TestServer::start_with(config).await
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity`.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    within(
        "TLS connect",
        Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)?
            .connect(),
    )
    .await
}

/// A health check on `channel`.
async fn check(channel: Channel) -> Result<(), tonic::Status> {
    let response = within(
        "health check",
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await?;
    assert_eq!(response.into_inner().status, 1);
    Ok(())
}

/// Connects and checks; `Err` with what went wrong, either way.
async fn served(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Pair>,
) -> Result<(), String> {
    let channel = tls_channel(addr, ca, identity)
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
    check(channel)
        .await
        .map_err(|status| format!("call: {status:?}"))
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_is_served_over_tls() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(), None);
    let server = start(&files, false).await;
    served(server.addr, &ca, None).await.unwrap();
    // Another CA's client does not trust the server.
    let other = Ca::new("other CA");
    assert!(served(server.addr, &other, None).await.is_err());
    served(server.addr, &ca, None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_valid_client_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    let server = start(&files, true).await;
    let good = client_ca.client("alice", false);
    let first = tls_channel(server.addr, &server_ca, Some(&good))
        .await
        .unwrap();
    check(first.clone()).await.unwrap();

    let refused = [
        ("no client certificate", None),
        (
            "a certificate from another CA",
            Some(Ca::new("rogue CA").client("mallory", false)),
        ),
        (
            "an expired certificate",
            Some(client_ca.client("old", true)),
        ),
    ];
    for (what, identity) in &refused {
        let result = served(server.addr, &server_ca, identity.as_ref()).await;
        assert!(result.is_err(), "{what} must be refused");
    }
    // The first client's connection and new good clients keep working.
    check(first).await.unwrap();
    served(server.addr, &server_ca, Some(&good)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_fails_and_tls_clients_keep_working() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(), None);
    let server = start(&files, false).await;
    let tls = tls_channel(server.addr, &ca, None).await.unwrap();
    let plaintext = within("plaintext attempt", async {
        let channel = Endpoint::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .map_err(|err| format!("{err:?}"))?;
        check(channel).await.map_err(|status| format!("{status:?}"))
    })
    .await;
    assert!(plaintext.is_err(), "{plaintext:?}");
    check(tls).await.unwrap();
    served(server.addr, &ca, None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_handshake_timeout() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(), None);
    let mut config = test_config();
    config.tls = files.config(false);
    config.limits.handshake_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(config).await;
    let client = tls_channel(server.addr, &ca, None).await.unwrap();

    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, and no more.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    for (what, stream) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let mut buf = [0u8; 1024];
        within(what, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    check(client).await.unwrap();
    server.stop().await;
}

/// Waits until a client trusting `ca` is served.
async fn wait_served_by(addr: std::net::SocketAddr, ca: &Ca, what: &str) {
    within(what, async {
        while served(addr, ca, None).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn changed_certificate_files_are_reloaded_and_open_streams_survive() {
    let ca1 = Ca::new("first CA");
    let files = Files::new(&ca1.server(), None);
    let server = start(&files, false).await;
    let old = tls_channel(server.addr, &ca1, None).await.unwrap();
    let mut telemetry = TelemetryServiceClient::new(old.clone());
    let mut updates = telemetry
        .subscribe(common::request("reload", 0))
        .await
        .unwrap()
        .into_inner();
    common::publish(old.clone(), "reload", 1.0).await;
    within("first sample", updates.next())
        .await
        .unwrap()
        .unwrap();

    let ca2 = Ca::new("second CA");
    files.install(&ca2.server());
    wait_served_by(server.addr, &ca2, "the new certificate in force").await;
    assert!(
        served(server.addr, &ca1, None).await.is_err(),
        "new connections get the new certificate"
    );
    // The stream opened under the old certificate still delivers.
    common::publish(old.clone(), "reload", 2.0).await;
    let sample = within("sample after reload", updates.next())
        .await
        .unwrap()
        .unwrap();
    assert!((sample.cpu_usage - 2.0).abs() < f64::EPSILON);

    // A broken file is not put in force, and a later good one is.
    replace(&files.cert(), "-----BEGIN CERTIFICATE-----\nbroken\n");
    served(server.addr, &ca2, None).await.unwrap();
    let ca3 = Ca::new("third CA");
    files.install(&ca3.server());
    wait_served_by(server.addr, &ca3, "the third certificate in force").await;
    check(old).await.unwrap();
    drop(updates);
    server.stop().await;
}

#[test]
fn a_reload_that_fails_keeps_the_configuration_in_force() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(), None);
    let tls = streamhub::transport::tls::TlsReloader::from_config(&files.config(false))
        .unwrap()
        .unwrap();
    let before = Arc::clone(tls.acceptor().config());
    std::fs::write(files.key(), "not a key").unwrap();
    let err = tls.reload().unwrap_err().to_string();
    assert!(
        err.contains("server.key"),
        "the error names the file: {err}"
    );
    assert!(Arc::ptr_eq(&before, tls.acceptor().config()));
    // A key that does not match the certificate is refused too.
    std::fs::write(files.key(), ca.server().key).unwrap();
    assert!(tls.reload().is_err());
    assert!(Arc::ptr_eq(&before, tls.acceptor().config()));
    // Incomplete settings are refused at start.
    let mut config = files.config(false);
    config.key = None;
    assert!(streamhub::transport::tls::TlsReloader::from_config(&config).is_err());
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_a_running_server() {
    let ca1 = Ca::new("first CA");
    let files = Files::new(&ca1.server(), None);
    let data = tempfile::tempdir().unwrap();
    let cert = files.cert();
    let key = files.key();
    let server = ServerProcess::spawn(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            // Only SIGHUP reloads.
            "--set",
            "tls.reload_interval=0s",
        ],
    );
    let old = tls_channel(server.addr, &ca1, None).await.unwrap();
    check(old.clone()).await.unwrap();
    let ca2 = Ca::new("second CA");
    files.install(&ca2.server());
    server.signal("HUP");
    wait_served_by(server.addr, &ca2, "the new certificate after SIGHUP").await;
    check(old).await.unwrap();
}

/// What the probe app saw in a request's extensions, as response headers.
async fn probe(request: http::Request<RequestBody>) -> Result<http::Response<String>, Infallible> {
    let mut response = http::Response::new(String::new());
    let headers = response.headers_mut();
    if let Some(info) = request.extensions().get::<ConnInfo>() {
        headers.insert("x-tls", info.tls.to_string().parse().unwrap());
        headers.insert("x-remote", info.remote_addr.to_string().parse().unwrap());
        headers.insert("x-local", info.local_addr.to_string().parse().unwrap());
        let certs = info.client_certs.as_ref().map_or(0, |chain| chain.len());
        headers.insert("x-client-certs", certs.to_string().parse().unwrap());
    }
    if let Some(tcp) = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
    {
        let remote = tcp.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        headers.insert("x-tcp-remote", remote.parse().unwrap());
    }
    Ok(response)
}

/// Serves the probe app with `tls`; returns its address and stop token.
async fn serve_probe(tls: &TlsConfig) -> (std::net::SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let transport = Transport::new(listener, &test_config().limits, tls).unwrap();
    let addr = transport.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(transport.serve(
        tower::service_fn(probe),
        stop.clone(),
        CancellationToken::new(),
    ));
    (addr, stop)
}

/// One request to the probe; its response headers.
async fn ask_probe(channel: Channel) -> http::HeaderMap {
    let request = http::Request::builder()
        .method("POST")
        .uri("/probe")
        .body(tonic::body::Body::empty())
        .unwrap();
    within("probe", tower::ServiceExt::oneshot(channel, request))
        .await
        .unwrap()
        .headers()
        .clone()
}

#[tokio::test]
async fn requests_carry_their_connection_info_and_the_verified_client_chain() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    let (addr, stop) = serve_probe(&files.config(true)).await;
    let channel = tls_channel(addr, &server_ca, Some(&client_ca.client("alice", false)))
        .await
        .unwrap();
    let seen = ask_probe(channel).await;
    assert_eq!(seen["x-tls"], "true");
    assert_eq!(seen["x-client-certs"], "1");
    assert_eq!(seen["x-local"], addr.to_string().as_str());
    assert_eq!(
        seen["x-remote"], seen["x-tcp-remote"],
        "Request::remote_addr agrees"
    );
    stop.cancel();

    let (addr, stop) = serve_probe(&TlsConfig::default()).await;
    let seen = ask_probe(common::connect(format!("http://{addr}")).await).await;
    assert_eq!(seen["x-tls"], "false");
    assert_eq!(seen["x-client-certs"], "0");
    assert!(seen["x-remote"].to_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(seen["x-remote"], seen["x-tcp-remote"]);
    stop.cancel();
}

/// Writes `pair` as `NAME.pem` and `NAME.key` in `dir`; their paths.
fn write_pair(dir: &Path, name: &str, pair: &Pair) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.cert).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    (cert, key)
}

/// Runs the CLI with `args` (no credentials from the environment).
async fn cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
    command.args(args);
    for var in [
        "STREAMHUB_TOKEN",
        "STREAMHUB_CA",
        "STREAMHUB_CERT",
        "STREAMHUB_KEY",
        "STREAMHUB_SERVER",
    ] {
        command.env_remove(var);
    }
    within("the CLI", command.output()).await.unwrap()
}

#[tokio::test]
async fn mtls_certificate_identities_get_their_scopes_from_the_tls_layer_to_the_cli() {
    use streamhub::{
        auth::CertEntry,
        proto::streamhub::{WhoAmIRequest, server_service_client::ServerServiceClient},
    };
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    let mut config = test_config();
    config.tls = files.config(true);
    config.auth.certs = vec![CertEntry {
        identity: "device-7".into(),
        scopes: vec!["telemetry:read:*".into()],
    }];
    let server = TestServer::start_with(config).await;
    let device = client_ca.client("device-7", false);

    // A tonic client presenting the certificate: its CN is the identity,
    // with the configured scopes.
    let channel = tls_channel(server.addr, &server_ca, Some(&device))
        .await
        .unwrap();
    let me = within(
        "WhoAmI",
        ServerServiceClient::new(channel).who_am_i(WhoAmIRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (me.identity.as_str(), me.method.as_str()),
        ("device-7", "certificate")
    );
    assert_eq!(me.scopes, ["telemetry:read:*"]);
    assert!(me.auth_enabled);

    // The CLI over https:// with --ca, --cert and --key.
    let dir = files.dir.path();
    let ca = dir.join("server-ca.pem");
    std::fs::write(&ca, &server_ca.pem).unwrap();
    let (cert, key) = write_pair(dir, "device-7", &device);
    let url = format!("https://localhost:{}", server.addr.port());
    let output = cli(&[
        "--server".as_ref(),
        url.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--cert".as_ref(),
        cert.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "whoami".as_ref(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("identity: device-7"), "{stdout}");
    assert!(stdout.contains("certificate"), "{stdout}");
    assert!(stdout.contains("telemetry:read:*"), "{stdout}");

    // Without a client certificate the call fails, and says so however
    // the refusal reached the client (the server's TLS alert, or a closed
    // or broken connection when the server's close overtakes the alert):
    // the client asks the server whether it wants a certificate. The
    // streaming commands stop instead of reconnecting for ever.
    for command in [
        &["whoami"][..],
        &["whoami"],
        &["whoami"],
        &["subscribe", "anything"],
        &["feed", "--service", "device-7", "--simulate"],
    ] {
        let mut args = vec![
            "--server".as_ref(),
            url.as_ref(),
            "--ca".as_ref(),
            ca.as_os_str(),
        ];
        args.extend(command.iter().map(std::ffi::OsStr::new));
        let output = cli(&args).await;
        assert_eq!(output.status.code(), Some(1), "{command:?}: {output:?}");
        assert!(output.stdout.is_empty(), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("requires a client certificate; give --cert and --key"),
            "{command:?}: {stderr}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_cli_over_https_verifies_the_server_and_names_the_host_it_expected() {
    use streamhub::auth::{TokenEntry, token};
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(), None);
    let mut config = test_config();
    config.tls = files.config(false);
    let secret = "tok-over-tls";
    config.auth.tokens = vec![TokenEntry {
        identity: "ci".into(),
        sha256: hex::encode(token::digest(secret)),
        scopes: vec!["server:read:*".into()],
    }];
    let server = TestServer::start_with(config).await;
    let ca_file = files.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let url = format!("https://localhost:{}", server.addr.port());
    let whoami = |url: String, ca: Option<std::path::PathBuf>, token: Option<&'static str>| async move {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
        for var in [
            "STREAMHUB_TOKEN",
            "STREAMHUB_CA",
            "STREAMHUB_CERT",
            "STREAMHUB_KEY",
        ] {
            command.env_remove(var);
        }
        command.args(["--server", &url]);
        if let Some(ca) = ca {
            command.arg("--ca").arg(ca);
        }
        if let Some(token) = token {
            command.env("STREAMHUB_TOKEN", token);
        }
        command.arg("whoami");
        within("the CLI", command.output()).await.unwrap()
    };

    let output = whoami(url.clone(), Some(ca_file.clone()), Some(secret)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("identity: ci"), "{stdout}");
    assert!(stdout.contains("token"), "{stdout}");
    // The token went over TLS only: without --ca the system roots do not
    // know the test CA.
    let output = whoami(url.clone(), None, Some(secret)).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    // The cause is said once (rustls' error arrives wrapped in errors that
    // repeat it).
    assert_eq!(stderr.matches("UnknownIssuer").count(), 1, "{stderr}");
    // An untrusted server certificate is no reason to reconnect: the
    // streaming commands stop on it too.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
    for var in [
        "STREAMHUB_TOKEN",
        "STREAMHUB_CA",
        "STREAMHUB_CERT",
        "STREAMHUB_KEY",
    ] {
        command.env_remove(var);
    }
    command.args(["--server", &url, "subscribe", "anything"]);
    let output = within("subscribe", command.output()).await.unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("certificate was not accepted"), "{stderr}");
    // Plaintext to the TLS port fails rather than sending the token.
    let output = whoami(
        format!("http://localhost:{}", server.addr.port()),
        None,
        Some(secret),
    )
    .await;
    assert!(!output.status.success(), "{output:?}");
    server.stop().await;

    // A certificate for another name: the error names the name expected.
    let files = Files::new(&ca.server_for(&["hub.example.com"]), None);
    let mut config = test_config();
    config.tls = files.config(false);
    let server = TestServer::start_with(config).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let output = whoami(url, Some(ca_file), None).await;
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"localhost\""), "{stderr}");
    server.stop().await;
}
