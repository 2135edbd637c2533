//! Authentication and authorization over loopback: every rule on every RPC
//! shape (unary, server streaming through Subscribe's own route, client
//! streaming, bidirectional), with no side effect on refusal.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{TestServer, WAIT, payload, request, test_config, within};
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use streamhub::{
    auth::{AuthConfig, CertEntry, JwtConfig, TokenEntry, token},
    chat::service::{HISTORY_KEY, LAST_SEQ_KEY, MEMBER_KEY, ROOM_KEY},
    config::Config,
    proto::{
        chat::{ChatMessage, MessageKind, SendRequest, chat_service_client::ChatServiceClient},
        fileupload::{
            DownloadRequest, FileChunk, ListFilesRequest, QueryUploadRequest,
            file_upload_service_client::FileUploadServiceClient,
        },
        streamhub::{WhoAmIRequest, server_service_client::ServerServiceClient},
        telemetry::{ListServicesRequest, telemetry_service_client::TelemetryServiceClient},
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, transport::Channel};

const ADMIN: &str = "tok-admin";
const READER: &str = "tok-reader";
const ALICE: &str = "tok-alice";
const SECRET: &[u8] = b"test-secret-of-at-least-thirty-two-bytes";

fn entry(identity: &str, token: &str, scopes: &[&str]) -> TokenEntry {
    TokenEntry {
        identity: identity.into(),
        sha256: hex::encode(token::digest(token)),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// Tokens: admin (`*`), reader (reads `api-*` and `public-*` files), alice
/// (publishes and reads `api-*`, writes `alice-*`, chats in `dev-*`); and
/// HS256 JWTs signed with [`SECRET`].
fn auth_config(dir: &tempfile::TempDir) -> Config {
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let mut config = test_config();
    config.auth = AuthConfig {
        tokens: vec![
            entry("admin", ADMIN, &["*"]),
            entry(
                "reader",
                READER,
                &["telemetry:read:api-*", "upload:read:public-*"],
            ),
            entry(
                "alice",
                ALICE,
                &[
                    "telemetry:publish:api-*",
                    "telemetry:read:api-*",
                    "upload:write:alice-*",
                    "upload:read:alice-*",
                    "chat:join:dev-*",
                ],
            ),
        ],
        jwt: Some(JwtConfig {
            secret_file: Some(secret),
            algorithms: vec!["HS256".into()],
            leeway: Duration::ZERO,
            ..JwtConfig::default()
        }),
        ..AuthConfig::default()
    };
    config
}

async fn start() -> (TestServer, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(auth_config(&keys)).await;
    (server, keys)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(sub: &str, scope: &str, exp: u64, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": sub, "scope": scope, "exp": exp}),
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// `message` with `authorization` set to `value` (if any).
fn with<T>(message: T, value: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = value {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Every way of not being authenticated, with what it is.
fn bad_credentials() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("no token", None),
        ("malformed", Some("Basic dXNlcjpwYXNz".into())),
        ("unknown static token", Some(bearer("tok-nobody"))),
        (
            "bad signature",
            Some(bearer(&jwt(
                "admin",
                "*",
                now() + 600,
                b"not-the-server-secret-but-as-long-as-it",
            ))),
        ),
        (
            "expired",
            Some(bearer(&jwt("admin", "*", now() - 600, SECRET))),
        ),
    ]
}

fn assert_code(what: &str, status: &Status, code: Code) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
}

fn assert_denied(what: &str, status: &Status, scope: &str) {
    assert_code(what, status, Code::PermissionDenied);
    assert!(
        status.message().contains(scope),
        "{what}: {:?} should name {scope}",
        status.message()
    );
}

/// An Upload call sending `chunks` of `name`.
async fn upload(
    channel: Channel,
    auth: Option<&str>,
    name: &str,
    chunks: Vec<Vec<u8>>,
) -> Result<(), Status> {
    let n = chunks.len();
    let chunks: Vec<FileChunk> = chunks
        .into_iter()
        .enumerate()
        .map(|(i, data)| FileChunk {
            filename: name.into(),
            data,
            chunk_index: u32::try_from(i).unwrap(),
            is_last: i + 1 == n,
            ..FileChunk::default()
        })
        .collect();
    let mut client = FileUploadServiceClient::new(channel);
    within(
        "upload",
        client.upload(with(futures::stream::iter(chunks), auth)),
    )
    .await
    .map(|_| ())
}

async fn held(channel: Channel, name: &str) -> (u64, bool) {
    let mut client = FileUploadServiceClient::new(channel);
    let status = client
        .query_upload(with(
            QueryUploadRequest {
                filename: name.into(),
            },
            Some(&bearer(ADMIN)),
        ))
        .await
        .unwrap()
        .into_inner();
    (status.committed_size, status.stored)
}

async fn service_names(channel: Channel, auth: &str) -> Vec<String> {
    let mut client = TelemetryServiceClient::new(channel);
    client
        .list_services(with(ListServicesRequest {}, Some(auth)))
        .await
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.service_name)
        .collect()
}

/// Opens a Chat call in `room`; returns the sender, the stream and the
/// room's last seq at joining.
async fn join(
    channel: Channel,
    auth: Option<&str>,
    room: &str,
    member: Option<&str>,
) -> Result<
    (
        mpsc::Sender<ChatMessage>,
        tonic::Streaming<ChatMessage>,
        u64,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(16);
    let mut request = with(ReceiverStream::new(rx), auth);
    request
        .metadata_mut()
        .insert(ROOM_KEY, room.parse().unwrap());
    request
        .metadata_mut()
        .insert(HISTORY_KEY, "100".parse().unwrap());
    if let Some(member) = member {
        request
            .metadata_mut()
            .insert(MEMBER_KEY, member.parse().unwrap());
    }
    let mut client = ChatServiceClient::new(channel);
    let response = within("chat", client.chat(request)).await?;
    let last = response
        .metadata()
        .get(LAST_SEQ_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    Ok((tx, response.into_inner(), last))
}

/// Publishes one sample of `name` with credentials `auth`.
async fn publish_as(channel: Channel, auth: &str, name: &str) {
    let mut telemetry = TelemetryServiceClient::new(channel);
    let mut feed = telemetry
        .live_feed(with(
            futures::stream::iter(vec![payload(name, 1.0, 1.0, 0)]),
            Some(auth),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(within("feed", feed.next()).await.is_none());
}

fn say(sender: &str, text: &str) -> ChatMessage {
    ChatMessage {
        sender: sender.into(),
        message: text.into(),
        ..ChatMessage::default()
    }
}

/// The next message of a member's stream, or the status it ended with.
async fn next(stream: &mut tonic::Streaming<ChatMessage>) -> Result<ChatMessage, Status> {
    match within("chat message", stream.next()).await {
        Some(item) => item,
        None => Err(Status::ok("stream ended")),
    }
}

#[tokio::test]
async fn unauthenticated_calls_are_refused_on_every_shape_with_no_side_effect() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    for (what, auth) in bad_credentials() {
        let auth = auth.as_deref();
        // Unary.
        let mut telemetry = TelemetryServiceClient::new(channel.clone());
        let status = telemetry
            .get_snapshot(with(request("api-1", 0), auth))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        if what == "expired" {
            assert_eq!(status.message(), "token expired");
        }
        let status = telemetry
            .list_services(with(ListServicesRequest {}, auth))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        // Server streaming, through Subscribe's own route.
        let status = telemetry
            .subscribe(with(request("api-new", 0), auth))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        // Bidirectional: LiveFeed.
        let status = telemetry
            .live_feed(with(
                futures::stream::iter(vec![payload("api-sneaky", 1.0, 1.0, 0)]),
                auth,
            ))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        // Client streaming: Upload.
        let status = upload(
            channel.clone(),
            auth,
            "alice-x.bin",
            vec![vec![7; 1000], vec![8; 10]],
        )
        .await
        .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        // Bidirectional: Chat.
        let Err(status) = join(channel.clone(), auth, "dev-1", None).await else {
            panic!("{what}: chat joined");
        };
        assert_code(what, &status, Code::Unauthenticated);
        // Server streaming: Download; and WhoAmI.
        let mut files = FileUploadServiceClient::new(channel.clone());
        let status = files
            .download(with(
                DownloadRequest {
                    filename: "alice-x.bin".into(),
                    chunk_size: 0,
                },
                auth,
            ))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        let mut server_service = ServerServiceClient::new(channel.clone());
        let status = server_service
            .who_am_i(with(WhoAmIRequest {}, auth))
            .await
            .unwrap_err();
        assert_code(what, &status, Code::Unauthenticated);
        // The status never repeats the credentials.
        if let Some(auth) = auth {
            assert!(
                !status
                    .message()
                    .contains(auth.trim_start_matches("Bearer "))
            );
        }
    }
    // Nothing happened: no name registered, no byte held, no message stored.
    assert!(
        service_names(channel.clone(), &bearer(ADMIN))
            .await
            .is_empty()
    );
    assert_eq!(held(channel.clone(), "alice-x.bin").await, (0, false));
    let (_tx, _stream, last) = join(channel.clone(), Some(&bearer(ADMIN)), "dev-1", None)
        .await
        .unwrap();
    assert_eq!(last, 0, "no chat message stored");
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn missing_scopes_are_refused_naming_the_scope_before_any_side_effect() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let alice = bearer(ALICE);
    let reader = bearer(READER);
    let mut telemetry = TelemetryServiceClient::new(channel.clone());

    // Unary and Subscribe's route: reading outside api-*.
    let status = telemetry
        .get_snapshot(with(request("web-1", 0), Some(&alice)))
        .await
        .unwrap_err();
    assert_denied("snapshot", &status, "telemetry:read:web-1");
    let status = telemetry
        .subscribe(with(request("web-1", 0), Some(&alice)))
        .await
        .unwrap_err();
    assert_denied("subscribe", &status, "telemetry:read:web-1");

    // LiveFeed: the allowed name is published, the other refused and not
    // registered.
    let mut feed = telemetry
        .live_feed(with(
            futures::stream::iter(vec![
                payload("api-1", 1.0, 1.0, 0),
                payload("web-1", 1.0, 1.0, 0),
            ]),
            Some(&alice),
        ))
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match within("live feed", feed.next()).await {
            Some(Ok(_alert)) => {}
            Some(Err(status)) => break status,
            None => panic!("the feed ended without refusing web-1"),
        }
    };
    assert_denied("live feed", &status, "telemetry:publish:web-1");
    assert!(status.message().contains("payload 2"), "{status:?}");
    assert_eq!(
        service_names(channel.clone(), &bearer(ADMIN)).await,
        ["api-1"]
    );
    // The reader may read but not publish.
    let status = telemetry
        .live_feed(with(
            futures::stream::iter(vec![payload("api-2", 1.0, 1.0, 0)]),
            Some(&reader),
        ))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_denied("reader feed", &status, "telemetry:publish:api-2");

    // Upload: refused before a byte is written.
    let status = upload(
        channel.clone(),
        Some(&alice),
        "bob-x.bin",
        vec![vec![1; 500]],
    )
    .await
    .unwrap_err();
    assert_denied("upload", &status, "upload:write:bob-x.bin");
    assert_eq!(held(channel.clone(), "bob-x.bin").await, (0, false));
    let mut files = FileUploadServiceClient::new(channel.clone());
    let status = files
        .query_upload(with(
            QueryUploadRequest {
                filename: "bob-x.bin".into(),
            },
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_denied("query", &status, "upload:write:bob-x.bin");
    let status = files
        .cancel_upload(with(
            streamhub::proto::fileupload::CancelUploadRequest {
                filename: "bob-x.bin".into(),
            },
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_denied("cancel", &status, "upload:write:bob-x.bin");
    upload(
        channel.clone(),
        Some(&bearer(ADMIN)),
        "bob-x.bin",
        vec![vec![1; 10]],
    )
    .await
    .unwrap();
    let status = files
        .download(with(
            DownloadRequest {
                filename: "bob-x.bin".into(),
                chunk_size: 0,
            },
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_denied("download", &status, "upload:read:bob-x.bin");

    // Chat: joining outside dev-* is refused and announces nothing.
    let Err(status) = join(channel.clone(), Some(&alice), "ops", None).await else {
        panic!("joined ops");
    };
    assert_denied("chat", &status, "chat:join:ops");
    let (_tx, _stream, last) = join(channel.clone(), Some(&bearer(ADMIN)), "ops", None)
        .await
        .unwrap();
    assert_eq!(last, 0, "no join notice stored for the refused member");
    drop(files);
    drop(telemetry);
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn lists_show_only_what_the_identity_may_read() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let admin = bearer(ADMIN);
    for name in ["api-1", "api-2", "web-1"] {
        publish_as(channel.clone(), &admin, name).await;
    }
    let mut all = service_names(channel.clone(), &admin).await;
    all.sort();
    assert_eq!(all, ["api-1", "api-2", "web-1"]);
    let mut visible = service_names(channel.clone(), &bearer(READER)).await;
    visible.sort();
    assert_eq!(visible, ["api-1", "api-2"]);

    for name in ["public-a.txt", "secret.txt"] {
        upload(channel.clone(), Some(&admin), name, vec![b"x".to_vec()])
            .await
            .unwrap();
    }
    let mut files = FileUploadServiceClient::new(channel.clone());
    let listed: Vec<String> = files
        .list_files(with(ListFilesRequest {}, Some(&bearer(READER))))
        .await
        .unwrap()
        .into_inner()
        .files
        .into_iter()
        .map(|f| f.filename)
        .collect();
    assert_eq!(listed, ["public-a.txt"]);
    drop(files);
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn chat_senders_are_the_identity() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let alice = bearer(ALICE);
    let (watch_tx, mut watcher, _) = join(channel.clone(), Some(&bearer(ADMIN)), "dev-1", None)
        .await
        .unwrap();

    // A chat-member naming someone else is refused.
    let Err(status) = join(channel.clone(), Some(&alice), "dev-1", Some("mallory")).await else {
        panic!("joined under another name");
    };
    assert_code("member", &status, Code::PermissionDenied);

    let (tx, mut stream, _) = join(channel.clone(), Some(&alice), "dev-1", None)
        .await
        .unwrap();
    // The join notices name the identities (the watcher's own first).
    let notice = next(&mut watcher).await.unwrap();
    assert_eq!(notice.kind, i32::from(MessageKind::KindJoined));
    assert_eq!(notice.sender, "admin");
    let notice = next(&mut watcher).await.unwrap();
    assert_eq!(notice.kind, i32::from(MessageKind::KindJoined));
    assert_eq!(notice.sender, "alice");
    // An empty sender is filled in.
    tx.send(say("", "hello")).await.unwrap();
    let message = loop {
        let message = next(&mut watcher).await.unwrap();
        if message.kind == i32::from(MessageKind::KindMember) {
            break message;
        }
    };
    assert_eq!(
        (message.sender.as_str(), message.message.as_str()),
        ("alice", "hello")
    );
    // A spoofed sender ends the call with PERMISSION_DENIED; nothing stored.
    tx.send(say("bob", "it was me")).await.unwrap();
    let status = loop {
        match next(&mut stream).await {
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    assert_code("spoof", &status, Code::PermissionDenied);
    assert!(status.message().contains("\"bob\""), "{status:?}");
    // The leave notice names alice; no message from "bob" ever arrives.
    let left = next(&mut watcher).await.unwrap();
    assert_eq!(left.kind, i32::from(MessageKind::KindLeft), "{left:?}");
    assert_eq!(left.sender, "alice");
    drop((tx, watch_tx, stream, watcher));
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn an_expiring_jwt_ends_subscribe_and_chat_with_unauthenticated() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let admin = bearer(ADMIN);
    publish_as(channel.clone(), &admin, "api-1").await;
    // Expires within two seconds (leeway 0).
    let token = bearer(&jwt(
        "carol",
        "telemetry:read:* chat:join:*",
        now() + 2,
        SECRET,
    ));

    let mut telemetry = TelemetryServiceClient::new(channel.clone());
    let mut updates = telemetry
        .subscribe(with(request("api-1", 100), Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        within("first sample", updates.next())
            .await
            .unwrap()
            .is_ok()
    );
    let (_tx, mut stream, _) = join(channel.clone(), Some(&token), "dev-1", None)
        .await
        .unwrap();

    let ended = loop {
        match within("subscribe end", updates.next()).await {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("subscribe ended without a status"),
        }
    };
    assert_code("subscribe", &ended, Code::Unauthenticated);
    assert_eq!(ended.message(), "token expired");
    let ended = loop {
        match next(&mut stream).await {
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    assert_code("chat", &ended, Code::Unauthenticated);
    assert_eq!(ended.message(), "token expired");
    // A new call with it is refused outright.
    let status = telemetry
        .get_snapshot(with(request("api-1", 0), Some(&token)))
        .await
        .unwrap_err();
    assert_code("after expiry", &status, Code::Unauthenticated);
    drop(telemetry);
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn whoami_reports_identity_scopes_and_method() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let mut client = ServerServiceClient::new(channel.clone());
    let me = client
        .who_am_i(with(WhoAmIRequest {}, Some(&bearer(READER))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, "reader");
    assert_eq!(me.method, "token");
    assert!(me.auth_enabled);
    assert_eq!(me.scopes, ["telemetry:read:api-*", "upload:read:public-*"]);
    assert_eq!(me.expires_at_ms, 0);
    let exp = now() + 600;
    let token = bearer(&jwt("dave", "chat:join:*", exp, SECRET));
    let me = client
        .who_am_i(with(WhoAmIRequest {}, Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((me.identity.as_str(), me.method.as_str()), ("dave", "jwt"));
    assert_eq!(me.expires_at_ms, exp * 1000);
    // GetServerInfo needs server:read:info.
    let status = client
        .get_server_info(with(
            streamhub::proto::streamhub::ServerInfoRequest {},
            Some(&token),
        ))
        .await
        .unwrap_err();
    assert_denied("server info", &status, "server:read:info");
    drop(client);
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_are_open_unless_closed() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };

    async fn probe(channel: Channel) -> (Result<(), Status>, Result<(), Status>) {
        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ());
        let list = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let reflection = match ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter(vec![list]))
            .await
        {
            Ok(response) => match response.into_inner().next().await {
                Some(Ok(_)) => Ok(()),
                Some(Err(status)) => Err(status),
                None => Err(Status::unknown("no answer")),
            },
            Err(status) => Err(status),
        };
        (health, reflection)
    }

    let (server, _keys) = start().await;
    let (health, reflection) = probe(server.channel().await).await;
    health.unwrap();
    reflection.unwrap();
    server.stop().await;

    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.auth.open_health = false;
    config.auth.open_reflection = false;
    let server = TestServer::start_with(config).await;
    let (health, reflection) = probe(server.channel().await).await;
    assert_code("health", &health.unwrap_err(), Code::Unauthenticated);
    assert_code(
        "reflection",
        &reflection.unwrap_err(),
        Code::Unauthenticated,
    );
    server.stop().await;
}

#[tokio::test]
async fn es256_jwts_from_a_public_key() {
    let keys = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = keys.path().join("jwt.pub.pem");
    std::fs::write(&public, pair.public_key_pem()).unwrap();
    let mut config = test_config();
    config.auth.jwt = Some(JwtConfig {
        public_key_file: Some(public),
        algorithms: vec!["ES256".into()],
        issuer: Some("https://idp.test".into()),
        ..JwtConfig::default()
    });
    let server = TestServer::start_with(config).await;
    let signer = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let sign = |iss: &str| {
        encode(
            &Header::new(Algorithm::ES256),
            &serde_json::json!({"sub": "erin", "scope": "telemetry:read:*", "exp": now() + 600, "iss": iss}),
            &signer,
        )
        .unwrap()
    };
    let mut client = ServerServiceClient::new(server.channel().await);
    let me = client
        .who_am_i(with(
            WhoAmIRequest {},
            Some(&bearer(&sign("https://idp.test"))),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, "erin");
    let status = client
        .who_am_i(with(
            WhoAmIRequest {},
            Some(&bearer(&sign("https://evil.test"))),
        ))
        .await
        .unwrap_err();
    assert_code("issuer", &status, Code::Unauthenticated);
    // An HS256 token "signed" with the public key as secret is refused.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "erin", "exp": now() + 600, "iss": "https://idp.test"}),
        &EncodingKey::from_secret(pair.public_key_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let status = client
        .who_am_i(with(WhoAmIRequest {}, Some(&bearer(&confused))))
        .await
        .unwrap_err();
    assert_code("algorithm confusion", &status, Code::Unauthenticated);
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn per_identity_limits_streams_and_upload_quota() {
    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.limits.max_streams_per_identity = 2;
    config.upload.quota_per_identity = Some(1000);
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let alice = bearer(ALICE);
    publish_as(channel.clone(), &bearer(ADMIN), "api-1").await;

    let mut telemetry = TelemetryServiceClient::new(channel.clone());
    let mut first = telemetry
        .subscribe(with(request("api-1", 100), Some(&alice)))
        .await
        .unwrap()
        .into_inner();
    let mut second = telemetry
        .subscribe(with(request("api-1", 100), Some(&alice)))
        .await
        .unwrap()
        .into_inner();
    assert!(within("first", first.next()).await.unwrap().is_ok());
    assert!(within("second", second.next()).await.unwrap().is_ok());
    let status = telemetry
        .get_snapshot(with(request("api-1", 0), Some(&alice)))
        .await
        .unwrap_err();
    assert_code("third call", &status, Code::ResourceExhausted);
    // Other identities are not affected.
    telemetry
        .get_snapshot(with(request("api-1", 0), Some(&bearer(READER))))
        .await
        .unwrap();
    drop(first);
    // Once a stream closes, the call is allowed again (its end travels to
    // the server asynchronously: wait for it).
    within("a free slot", async {
        loop {
            match telemetry
                .get_snapshot(with(request("api-1", 0), Some(&alice)))
                .await
            {
                Ok(_) => break,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    drop(second);

    // Quota: 600 + 300 fit, another 300 does not; bytes are discarded.
    upload(
        channel.clone(),
        Some(&alice),
        "alice-1.bin",
        vec![vec![1; 600]],
    )
    .await
    .unwrap();
    upload(
        channel.clone(),
        Some(&alice),
        "alice-2.bin",
        vec![vec![2; 300]],
    )
    .await
    .unwrap();
    let status = upload(
        channel.clone(),
        Some(&alice),
        "alice-3.bin",
        vec![vec![3; 50], vec![3; 250]],
    )
    .await
    .unwrap_err();
    assert_code("quota", &status, Code::ResourceExhausted);
    assert!(status.message().contains("alice"), "{status:?}");
    assert_eq!(held(channel.clone(), "alice-3.bin").await, (0, false));
    // Replacing one's own file counts the new size only.
    upload(
        channel.clone(),
        Some(&alice),
        "alice-2.bin",
        vec![vec![2; 350]],
    )
    .await
    .unwrap();
    // Another identity has its own quota.
    upload(
        channel.clone(),
        Some(&bearer(ADMIN)),
        "admin.bin",
        vec![vec![4; 900]],
    )
    .await
    .unwrap();
    drop(telemetry);
    drop(channel);
    server.stop().await;
}

#[tokio::test]
async fn client_certificate_identities_get_their_configured_scopes() {
    use std::convert::Infallible;
    use streamhub::auth::{AuthLayer, Authenticator, Identity, PeerCertificates};
    use tower::{Layer, Service, ServiceExt};

    let mut params = rcgen::CertificateParams::new(vec!["device-7.example".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device-7");
    let key = rcgen::KeyPair::generate().unwrap();
    let der = params.self_signed(&key).unwrap().der().clone();

    let config = AuthConfig {
        certs: vec![CertEntry {
            identity: "device-7".into(),
            scopes: vec!["telemetry:publish:device-7".into()],
        }],
        ..AuthConfig::default()
    };
    let auth = Arc::new(Authenticator::from_config(&config).unwrap());
    let echo = tower::service_fn(|request: http::Request<()>| async move {
        let who = Identity::of(request.extensions()).map_or("none".to_owned(), |i| {
            format!("{} {}", i.name(), i.scopes().texts().join(","))
        });
        Ok::<_, Infallible>(http::Response::new(tonic::body::Body::new(who)))
    });
    let mut service = AuthLayer::new(auth, 0).layer(echo);
    let call = |certs: Option<PeerCertificates>| {
        let mut request = http::Request::builder()
            .uri("/telemetry.TelemetryService/LiveFeed")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        if let Some(certs) = certs {
            request.extensions_mut().insert(certs);
        }
        request
    };
    let response = service
        .ready()
        .await
        .unwrap()
        .call(call(Some(PeerCertificates(Arc::new(vec![der])))))
        .await
        .unwrap();
    let body = http_body_util_collect(response.into_body()).await;
    assert_eq!(body, "device-7 telemetry:publish:device-7");
    let refused = service
        .ready()
        .await
        .unwrap()
        .call(call(None))
        .await
        .unwrap();
    assert_eq!(refused.headers()["grpc-status"], "16");
}

async fn http_body_util_collect(mut body: axum::body::Body) -> String {
    use http_body::Body as _;
    let mut out = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame.unwrap().into_data() {
            out.extend_from_slice(&data);
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn serve_refuses_a_public_address_without_tls_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output();
    let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("streamhub token new"), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never listened");
}

#[tokio::test]
async fn the_cli_makes_tokens_and_uses_them() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args([
            "--json",
            "token",
            "new",
            "--identity",
            "ci",
            "--scope",
            "telemetry:read:*",
        ])
        .output();
    let output = tokio::time::timeout(WAIT, output).await.unwrap().unwrap();
    assert!(output.status.success(), "{output:?}");
    let made: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let token = made["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 43, "at least 256 bits");
    let config_text = made["config"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamhub.toml");
    std::fs::write(&file, config_text).unwrap();
    let mut config = Config::load(&streamhub::config::Sources {
        file: Some(file),
        ..Default::default()
    })
    .unwrap();
    config.telemetry.self_sample_interval = Duration::ZERO;
    let server = TestServer::start_with(config).await;

    let whoami = |token: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
        command.args(["--server", &server.url(), "whoami"]);
        command.env_remove("STREAMHUB_TOKEN");
        if let Some(token) = token {
            command.env("STREAMHUB_TOKEN", token);
        }
        command.output()
    };
    let output = tokio::time::timeout(WAIT, whoami(Some(&token)))
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("identity: ci"), "{stdout}");
    assert!(stdout.contains("telemetry:read:*"), "{stdout}");
    let output = tokio::time::timeout(WAIT, whoami(None))
        .await
        .unwrap()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(!stderr.contains(&token));
    server.stop().await;
}

#[tokio::test]
async fn an_expiring_jwt_ends_a_live_feed_and_an_upload_which_keeps_its_bytes() {
    let (server, _keys) = start().await;
    let channel = server.channel().await;
    let admin = bearer(ADMIN);
    // Expires within two to three seconds (leeway 0).
    let token = bearer(&jwt(
        "feeder",
        "telemetry:publish:* upload:write:*",
        now() + 3,
        SECRET,
    ));

    // LiveFeed: a sample before expiry is published; the call then ends
    // with UNAUTHENTICATED while the client still has it open.
    let (feed_tx, feed_rx) = mpsc::channel(4);
    let mut telemetry = TelemetryServiceClient::new(channel.clone());
    let mut alerts = within(
        "live feed",
        telemetry.live_feed(with(ReceiverStream::new(feed_rx), Some(&token))),
    )
    .await
    .unwrap()
    .into_inner();
    feed_tx.send(payload("api-exp", 1.0, 1.0, 0)).await.unwrap();
    within("the sample", async {
        while !service_names(channel.clone(), &admin)
            .await
            .contains(&"api-exp".to_owned())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Upload: chunk 0 is written, then the token expires mid-call.
    let (up_tx, up_rx) = mpsc::channel(4);
    let mut files = FileUploadServiceClient::new(channel.clone());
    let upload = tokio::spawn({
        let token = token.clone();
        async move {
            files
                .upload(with(ReceiverStream::new(up_rx), Some(&token)))
                .await
        }
    });
    up_tx
        .send(FileChunk {
            filename: "expiring.bin".into(),
            data: vec![5; 1000],
            chunk_index: 0,
            ..FileChunk::default()
        })
        .await
        .unwrap();
    within("chunk 0 written", async {
        while held(channel.clone(), "expiring.bin").await.0 < 1000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let ended = match within("live feed end", alerts.next()).await {
        Some(Err(status)) => status,
        other => panic!("the feed should end with a status: {other:?}"),
    };
    assert_code("live feed", &ended, Code::Unauthenticated);
    assert_eq!(ended.message(), "token expired");
    let ended = within("upload end", upload).await.unwrap().unwrap_err();
    assert_code("upload", &ended, Code::Unauthenticated);
    assert_eq!(ended.message(), "token expired");
    // The bytes written are kept for a resume with a fresh credential.
    let (kept, stored) = held(channel.clone(), "expiring.bin").await;
    assert_eq!((kept, stored), (1000, false));
    let mut files = FileUploadServiceClient::new(channel.clone());
    let done = files
        .upload(with(
            futures::stream::iter(vec![FileChunk {
                filename: "expiring.bin".into(),
                data: vec![5; 500],
                chunk_index: 1,
                offset: Some(1000),
                is_last: true,
                ..FileChunk::default()
            }]),
            Some(&admin),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.total_bytes, done.resumed_from), (1500, 1000));
    assert!(held(channel.clone(), "expiring.bin").await.1, "stored");
    // A payload after expiry is not published.
    let _ = feed_tx.send(payload("api-late", 1.0, 1.0, 0)).await;
    assert!(
        !service_names(channel.clone(), &admin)
            .await
            .contains(&"api-late".to_owned())
    );
    drop((feed_tx, up_tx, telemetry, files));
    drop(channel);
    server.stop().await;
}

/// What a person does: runs `token new` without `--json`, copies the
/// token and pastes the printed entry into a configuration file that has
/// other settings and tokens; the server started with it knows the token
/// as the identity with exactly the printed scopes.
#[tokio::test]
async fn token_new_text_output_pasted_into_a_config_authenticates_the_token() {
    let identity = "ci \"nightly\" ü";
    let scopes = [
        "telemetry:read:api-*",
        "upload:write:reports/*",
        "chat:join:*",
    ];
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
    command.args(["token", "new", "--identity", identity]);
    for scope in scopes {
        command.args(["--scope", scope]);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    // The token is the indented line after the first one.
    let token = stdout
        .lines()
        .nth(1)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no token line in {stdout}"));
    let entry = &stdout[stdout
        .find("[[auth.tokens]]")
        .unwrap_or_else(|| panic!("no entry in {stdout}"))..];
    assert!(!entry.contains(token), "the entry holds only the hash");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("streamhub.toml");
    let other = entry_text("other", "tok-other");
    std::fs::write(
        &file,
        format!("drain_timeout = \"5s\"\n\n[telemetry]\nself_sample_interval = \"0s\"\n\n{other}\n{entry}"),
    )
    .unwrap();
    let config = Config::load(&streamhub::config::Sources {
        file: Some(file),
        ..Default::default()
    })
    .unwrap();
    let server = TestServer::start_with(config).await;
    let mut client = ServerServiceClient::new(server.channel().await);
    let me = client
        .who_am_i(with(WhoAmIRequest {}, Some(&bearer(token))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity, identity);
    assert_eq!(me.method, "token");
    assert_eq!(me.scopes, scopes);
    let other = client
        .who_am_i(with(WhoAmIRequest {}, Some(&bearer("tok-other"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.identity, "other");
    // A token differing in one character is unknown.
    let mut wrong = token.to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    let status = client
        .who_am_i(with(WhoAmIRequest {}, Some(&bearer(&wrong))))
        .await
        .unwrap_err();
    assert_code("altered token", &status, Code::Unauthenticated);
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn the_cli_says_when_the_identity_may_not_see_every_service() {
    let (server, _keys) = start().await;
    let services = |token: String| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"));
        command
            .args(["--server", &server.url(), "services"])
            .env_remove("RUST_BACKTRACE")
            .env("STREAMHUB_TOKEN", token);
        async move {
            let output = tokio::time::timeout(WAIT, command.output())
                .await
                .unwrap()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
    };
    let reader = services(READER.to_owned()).await;
    assert!(
        reader.starts_with("no services visible to \"reader\": its scopes let it read only ")
            && reader.contains("api-*"),
        "{reader}"
    );
    let chatter = jwt("bob", "chat:join:*", now() + 600, SECRET);
    let bob = services(chatter).await;
    assert!(
        bob.starts_with(
            "no services visible to \"bob\": its scopes (chat:join:*) do not let it read any"
        ),
        "{bob}"
    );
    assert_eq!(
        services(ADMIN.to_owned()).await,
        "no services have reported yet"
    );
    server.stop().await;
}

/// A `[[auth.tokens]]` entry for `token`, as TOML.
fn entry_text(identity: &str, token: &str) -> String {
    token::config_entry(identity, &["telemetry:read:*".to_owned()], token)
}

/// Sends one message to `room` as `auth`.
async fn send_as(channel: Channel, auth: &str, room: &str) -> Result<(), Status> {
    let request = SendRequest {
        room: room.into(),
        message: Some(say("", "hello")),
    };
    within(
        "send",
        ChatServiceClient::new(channel).send(with(request, Some(auth))),
    )
    .await
    .map(drop)
}

#[tokio::test]
async fn one_identity_cannot_open_every_room() {
    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.chat.max_rooms = 3;
    config.chat.max_rooms_per_identity = 2;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let (alice, admin) = (bearer(ALICE), bearer(ADMIN));
    send_as(channel.clone(), &alice, "dev-1").await.unwrap();
    send_as(channel.clone(), &alice, "dev-2").await.unwrap();
    // Rooms already open take no new slot.
    send_as(channel.clone(), &alice, "dev-1").await.unwrap();
    let refused = send_as(channel.clone(), &alice, "dev-3").await.unwrap_err();
    assert_code("alice's third room", &refused, Code::ResourceExhausted);
    assert!(
        refused.message().contains("chat.max_rooms_per_identity"),
        "{refused:?}"
    );
    // Another identity still gets the slot alice could not take; then the
    // server-wide limit speaks, naming its key.
    send_as(channel.clone(), &admin, "ops").await.unwrap();
    let refused = send_as(channel.clone(), &admin, "ops-2").await.unwrap_err();
    assert_code("a fourth room", &refused, Code::ResourceExhausted);
    assert!(
        refused.message().contains("`chat.max_rooms`"),
        "{refused:?}"
    );
    // Joining a room alice opened is fine for admin.
    send_as(channel.clone(), &admin, "dev-2").await.unwrap();
    server.stop().await;
}

/// Rooms are charged to the identities in them, not to their opener: one
/// identity staying in the rooms another opened (the break-it tester's
/// share pinning) uses up its own share, never the other's.
#[tokio::test]
async fn staying_in_anothers_rooms_does_not_use_up_their_share() {
    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.chat.max_rooms = 10;
    config.chat.max_rooms_per_identity = 2;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let (alice, admin) = (bearer(ALICE), bearer(ADMIN));
    send_as(channel.clone(), &alice, "dev-pin-1").await.unwrap();
    send_as(channel.clone(), &alice, "dev-pin-2").await.unwrap();
    // Admin stays in both: they are admin's now, not alice's.
    let first = join(channel.clone(), Some(&admin), "dev-pin-1", None)
        .await
        .unwrap();
    let second = join(channel.clone(), Some(&admin), "dev-pin-2", None)
        .await
        .unwrap();
    send_as(channel.clone(), &alice, "dev-new")
        .await
        .expect("alice's share is free once she is in none of her rooms");
    // A second call in a room admin is in costs nothing more...
    let again = join(channel.clone(), Some(&admin), "dev-pin-1", None)
        .await
        .unwrap();
    // ...but a third room is beyond admin's own share.
    let refused = join(channel.clone(), Some(&admin), "dev-new", None)
        .await
        .unwrap_err();
    assert_code("admin's third room", &refused, Code::ResourceExhausted);
    assert!(
        refused.message().contains("chat.max_rooms_per_identity"),
        "{refused:?}"
    );
    // Leaving gives admin its share back.
    drop((first, again));
    within("admin's share back", async {
        loop {
            match join(channel.clone(), Some(&admin), "dev-new", None).await {
                Ok(joined) => break joined,
                Err(status) => assert_code("admin re-entering", &status, Code::ResourceExhausted),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(second);
    server.stop().await;
}

/// Publishes one report of `name` as `auth`; the status the feed ended with.
async fn try_publish_as(channel: Channel, auth: &str, name: &str) -> Result<(), Status> {
    let mut feed = TelemetryServiceClient::new(channel)
        .live_feed(with(
            futures::stream::iter(vec![payload(name, 1.0, 1.0, 0)]),
            Some(auth),
        ))
        .await?
        .into_inner();
    match within("feed", feed.next()).await {
        None => Ok(()),
        Some(Err(status)) => Err(status),
        Some(Ok(alert)) => panic!("unexpected alert {alert:?}"),
    }
}

#[tokio::test]
async fn one_identity_cannot_create_every_service_name() {
    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.telemetry.max_services_per_identity = 2;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let (alice, admin) = (bearer(ALICE), bearer(ADMIN));
    try_publish_as(channel.clone(), &alice, "api-1")
        .await
        .unwrap();
    try_publish_as(channel.clone(), &alice, "api-2")
        .await
        .unwrap();
    try_publish_as(channel.clone(), &alice, "api-1")
        .await
        .unwrap();
    let refused = try_publish_as(channel.clone(), &alice, "api-3")
        .await
        .unwrap_err();
    assert_code("alice's third name", &refused, Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("telemetry.max_services_per_identity"),
        "{refused:?}"
    );
    // Others still create names, and alice may report a name she did not
    // create.
    try_publish_as(channel.clone(), &admin, "api-3")
        .await
        .unwrap();
    try_publish_as(channel.clone(), &alice, "api-3")
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_name_charged_to_an_identity_is_given_back_when_its_service_is_dropped() {
    let keys = tempfile::tempdir().unwrap();
    let mut config = auth_config(&keys);
    config.telemetry.max_services_per_identity = 1;
    config.telemetry.service_ttl = Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let alice = bearer(ALICE);
    try_publish_as(channel.clone(), &alice, "api-1")
        .await
        .unwrap();
    // Refused while api-1 is charged to her; once it has been silent for
    // the ttl it is dropped and her share is back (on the old code it
    // never is).
    within("alice's share to come back", async {
        loop {
            match try_publish_as(channel.clone(), &alice, "api-2").await {
                Ok(()) => break,
                Err(refused) => {
                    assert_code("alice's second name", &refused, Code::ResourceExhausted);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.stop().await;
}
