//! Authentication and authorization: who is calling, and may they do this.
//!
//! - [`scope`]: scopes (`resource:action:pattern`) and the glob matcher.
//! - [`token`]: static tokens, looked up by their SHA-256, and `token new`.
//! - [`jwt`]: JWT verification (HS256 / ES256 / RS256 / EdDSA).
//! - [`cert`]: the identity of a verified client certificate.
//! - [`layer`]: the tower layer every request passes ([`AuthLayer`]), which
//!   puts an [`Identity`] in the request's extensions or answers
//!   UNAUTHENTICATED before any handler runs, and ends streams when their
//!   credentials expire; and [`authorize`], the one question services ask.
//!
//! Authentication is on as soon as a static token, a JWT key or a client
//! certificate entry is configured. With it off, every request carries the
//! anonymous identity, which is allowed everything.
//!
//! Secrets never leave this module: no token, `authorization` value or key
//! appears in a log line or a status message.

pub mod cert;
pub mod jwt;
pub mod layer;
pub mod scope;
pub mod token;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

pub use cert::PeerCertificates;
pub use layer::{AuthLayer, authorize, authorize_any};
pub use scope::{Action, Resource, Scope, Scopes};

/// Longest identity name, in bytes (a chat sender's limit).
pub const MAX_IDENTITY_LEN: usize = 128;

/// Longest bearer token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The identity name of every caller while authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// `[auth]`: how callers are identified.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Static bearer tokens (`[[auth.tokens]]`).
    pub tokens: Vec<TokenEntry>,
    /// JWT verification (`[auth.jwt]`), if any.
    pub jwt: Option<JwtConfig>,
    /// Scopes of client-certificate identities (`[[auth.certs]]`).
    pub certs: Vec<CertEntry>,
    /// Health checks need no credentials (Kubernetes probes).
    pub open_health: bool,
    /// Reflection needs no credentials (`grpcurl list`).
    pub open_reflection: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            jwt: None,
            certs: Vec::new(),
            open_health: true,
            open_reflection: true,
        }
    }
}

/// One static token: the file holds only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The identity the token stands for.
    pub identity: String,
    /// Hex SHA-256 of the token (64 hex digits).
    pub sha256: String,
    /// What it may do.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// One client-certificate identity's scopes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    /// The certificate's subject CN (or first DNS SAN).
    pub identity: String,
    /// What it may do.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `[auth.jwt]`: which JWTs are accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// File holding the HS256/384/512 shared secret (at least 32 bytes;
    /// surrounding whitespace is ignored).
    pub secret_file: Option<PathBuf>,
    /// PEM public key for ES256/384, RS256/384/512, PS256/384/512 or EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// Accepted `alg` values, e.g. `["ES256"]`; `none` is never accepted.
    pub algorithms: Vec<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            secret_file: None,
            public_key_file: None,
            algorithms: Vec::new(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
        }
    }
}

fn check_identity(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IDENTITY_LEN || name.chars().any(char::is_control) {
        return Err(format!(
            "{field} {name:?} must be 1 to {MAX_IDENTITY_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

impl AuthConfig {
    /// Whether any credential is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.jwt.is_some() || !self.certs.is_empty()
    }

    /// Checks what can be checked without reading files.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.tokens.iter().enumerate() {
            check_identity(&format!("auth.tokens[{i}].identity"), &entry.identity)?;
            token::parse_digest(&entry.sha256)
                .map_err(|e| format!("auth.tokens[{i}].sha256: {e}"))?;
            if !seen.insert(entry.sha256.to_ascii_lowercase()) {
                return Err(format!(
                    "auth.tokens[{i}].sha256 repeats an earlier entry's: each token maps to one identity"
                ));
            }
            Scopes::parse(entry.scopes.iter().map(String::as_str))
                .map_err(|e| format!("auth.tokens[{i}].scopes: {e}"))?;
        }
        for (i, entry) in self.certs.iter().enumerate() {
            check_identity(&format!("auth.certs[{i}].identity"), &entry.identity)?;
            Scopes::parse(entry.scopes.iter().map(String::as_str))
                .map_err(|e| format!("auth.certs[{i}].scopes: {e}"))?;
        }
        if let Some(jwt) = &self.jwt {
            jwt::Algorithms::parse(jwt)?;
        }
        Ok(())
    }
}

/// How an identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A static token.
    Token,
    /// A JWT.
    Jwt,
    /// A verified client certificate.
    Certificate,
    /// Authentication is off.
    None,
}

impl Method {
    /// The method as WhoAmI names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Token => "token",
            Method::Jwt => "jwt",
            Method::Certificate => "certificate",
            Method::None => "none",
        }
    }
}

#[derive(Debug)]
struct IdentityInner {
    name: Arc<str>,
    scopes: Scopes,
    method: Method,
    expires_at: Option<SystemTime>,
}

/// Who is calling, what they may do, and until when. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Identity(Arc<IdentityInner>);

impl Identity {
    /// An authenticated identity.
    pub fn new(name: &str, scopes: Scopes, method: Method, expires_at: Option<SystemTime>) -> Self {
        Self(Arc::new(IdentityInner {
            name: Arc::from(name),
            scopes,
            method,
            expires_at,
        }))
    }

    /// The caller while authentication is off: allowed everything.
    pub fn anonymous() -> Self {
        Self::new(ANONYMOUS, Scopes::all(), Method::None, None)
    }

    /// The name (token identity, JWT `sub`, certificate CN or DNS SAN).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The name, shared.
    pub fn shared_name(&self) -> Arc<str> {
        Arc::clone(&self.0.name)
    }

    /// The scopes granted.
    pub fn scopes(&self) -> &Scopes {
        &self.0.scopes
    }

    /// How it was established.
    pub fn method(&self) -> Method {
        self.0.method
    }

    /// Whether it came from credentials (authentication is on).
    pub fn is_authenticated(&self) -> bool {
        self.0.method != Method::None
    }

    /// When its credentials expire (JWT `exp` plus the leeway), if ever.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.0.expires_at
    }

    /// Whether its credentials have expired.
    pub fn is_expired(&self) -> bool {
        self.0.expires_at.is_some_and(|at| SystemTime::now() >= at)
    }

    /// Whether it may do `action` on `resource` named `name`.
    pub fn allows(&self, resource: Resource, action: Action, name: &str) -> bool {
        self.0.scopes.allows(resource, action, name)
    }

    /// The identity in `extensions` (put there by [`AuthLayer`]).
    pub fn of(extensions: &http::Extensions) -> Option<&Identity> {
        extensions.get::<Identity>()
    }
}

/// Why credentials were not accepted. The messages never contain the
/// credentials themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a bearer token nor a client certificate.
    #[error(
        "missing credentials: send request metadata `authorization: Bearer <token>` \
         (or a client certificate)"
    )]
    Missing,
    /// The `authorization` value is not `Bearer <token>`.
    #[error("malformed `authorization` metadata: expected `Bearer <token>`")]
    Malformed,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the bearer token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// No static token has that hash (and it is not a JWT).
    #[error("unknown token")]
    UnknownToken,
    /// A JWT whose signature does not verify.
    #[error("invalid token: bad signature")]
    BadSignature,
    /// A JWT past its `exp` (plus leeway).
    #[error("token expired")]
    Expired,
    /// A JWT that is otherwise unacceptable.
    #[error("invalid token: {0}")]
    InvalidJwt(String),
    /// A client certificate without a usable identity.
    #[error("client certificate not usable: {0}")]
    Certificate(String),
}

/// Why the authenticator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A configured key or secret file cannot be read.
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not a `source()`).
        cause: std::io::Error,
    },
    /// A configured key or secret is unusable.
    #[error("{0}")]
    Key(String),
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// Turns credentials into identities, as configured.
pub struct Authenticator {
    enabled: bool,
    tokens: HashMap<token::TokenDigest, Identity>,
    jwt: Option<jwt::JwtVerifier>,
    certs: HashMap<String, Scopes>,
    open_health: bool,
    open_reflection: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.is_some())
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the authenticator, reading the JWT key files.
    pub fn from_config(config: &AuthConfig) -> Result<Self, SetupError> {
        config.validate().map_err(SetupError::Config)?;
        let mut tokens = HashMap::new();
        for entry in &config.tokens {
            let digest = token::parse_digest(&entry.sha256).map_err(SetupError::Config)?;
            let scopes = Scopes::parse(entry.scopes.iter().map(String::as_str))
                .map_err(|e| SetupError::Config(e.to_string()))?;
            tokens.insert(
                digest,
                Identity::new(&entry.identity, scopes, Method::Token, None),
            );
        }
        let mut certs = HashMap::new();
        for entry in &config.certs {
            let scopes = Scopes::parse(entry.scopes.iter().map(String::as_str))
                .map_err(|e| SetupError::Config(e.to_string()))?;
            certs.insert(entry.identity.clone(), scopes);
        }
        let jwt = config.jwt.as_ref().map(jwt::JwtVerifier::new).transpose()?;
        Ok(Self {
            enabled: config.enabled(),
            tokens,
            jwt,
            certs,
            open_health: config.open_health,
            open_reflection: config.open_reflection,
        })
    }

    /// Authentication off: everyone is anonymous.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            tokens: HashMap::new(),
            jwt: None,
            certs: HashMap::new(),
            open_health: true,
            open_reflection: true,
        }
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether health checks are served without credentials.
    pub fn open_health(&self) -> bool {
        self.open_health
    }

    /// Whether reflection is served without credentials.
    pub fn open_reflection(&self) -> bool {
        self.open_reflection
    }

    /// The identity of a caller presenting `authorization` (the raw
    /// metadata value, if any) and the verified client certificate chain
    /// `certs` (leaf first, if any). A bearer token, when sent, decides:
    /// a bad one is refused even beside a good certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    ) -> Result<Identity, AuthError> {
        if !self.enabled {
            return Ok(Identity::anonymous());
        }
        if let Some(value) = authorization {
            let token = bearer(value)?;
            return self.token(token);
        }
        match certs.and_then(<[_]>::first) {
            Some(leaf) => {
                let name = cert::identity(leaf.as_ref())?;
                let scopes = self.certs.get(&name).cloned().unwrap_or_default();
                Ok(Identity::new(&name, scopes, Method::Certificate, None))
            }
            None => Err(AuthError::Missing),
        }
    }

    /// The identity of a bearer token (static or JWT).
    pub fn token(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLong);
        }
        // A JWT has three dot-separated parts; static tokens have no dot.
        if token.contains('.') {
            return match &self.jwt {
                Some(jwt) => jwt.verify(token),
                None => Err(AuthError::UnknownToken),
            };
        }
        self.tokens
            .get(&token::digest(token))
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }
}

/// The token of an `authorization: Bearer <token>` value.
pub fn bearer(value: &[u8]) -> Result<&str, AuthError> {
    if value.len() > MAX_TOKEN_LEN + 16 {
        return Err(AuthError::TooLong);
    }
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = text.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config_with_token(token: &str) -> AuthConfig {
        AuthConfig {
            tokens: vec![TokenEntry {
                identity: "alice".into(),
                sha256: hex::encode(token::digest(token)),
                scopes: vec!["telemetry:read:*".into()],
            }],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn static_tokens_are_found_by_hash() {
        let token = token::generate().unwrap();
        let auth = Authenticator::from_config(&config_with_token(&token)).unwrap();
        assert!(auth.enabled());
        let header = format!("Bearer {token}");
        let who = auth.authenticate(Some(header.as_bytes()), None).unwrap();
        assert_eq!(who.name(), "alice");
        assert_eq!(who.method(), Method::Token);
        assert!(who.allows(Resource::Telemetry, Action::Read, "x"));
        assert!(!who.allows(Resource::Telemetry, Action::Publish, "x"));
        let lower = format!("bearer {token}");
        assert!(auth.authenticate(Some(lower.as_bytes()), None).is_ok());
        assert_eq!(
            auth.authenticate(Some(b"Bearer nope"), None).unwrap_err(),
            AuthError::UnknownToken
        );
        assert_eq!(
            auth.authenticate(None, None).unwrap_err(),
            AuthError::Missing
        );
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"token",
            b"\xff\xfe",
        ] {
            assert_eq!(
                auth.authenticate(Some(bad), None).unwrap_err(),
                AuthError::Malformed,
                "{bad:?}"
            );
        }
        // The message never repeats the token.
        let err = auth
            .authenticate(Some(b"Bearer secret-value"), None)
            .unwrap_err();
        assert!(!err.to_string().contains("secret-value"));
    }

    #[test]
    fn disabled_means_anonymous_with_everything() {
        let auth = Authenticator::from_config(&AuthConfig::default()).unwrap();
        assert!(!auth.enabled());
        let who = auth.authenticate(None, None).unwrap();
        assert_eq!(who.name(), ANONYMOUS);
        assert!(!who.is_authenticated());
        assert!(who.allows(Resource::Upload, Action::Write, "anything"));
    }

    #[test]
    fn config_is_checked() {
        let mut config = config_with_token("t");
        config.tokens[0].scopes = vec!["files:read:*".into()];
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("auth.tokens[0].scopes")
        );
        let mut config = config_with_token("t");
        config.tokens[0].sha256 = "abc".into();
        assert!(config.validate().unwrap_err().contains("sha256"));
        let mut config = config_with_token("t");
        config.tokens.push(config.tokens[0].clone());
        assert!(config.validate().unwrap_err().contains("repeats"));
        let mut config = config_with_token("t");
        config.tokens[0].identity = String::new();
        assert!(config.validate().unwrap_err().contains("identity"));
    }
}
