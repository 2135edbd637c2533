//! JWT verification with `jsonwebtoken`: `sub` is the identity, `scope`
//! the space-separated scopes, `exp` required; `iss` and `aud` checked
//! when configured. The header's `alg` must be one of the configured
//! algorithms (never `none`), and picks the key: HMAC algorithms the
//! secret, every other the public key, so an HMAC token can never be
//! verified with a public key as its secret.

use std::{
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, errors::ErrorKind};
use serde::Deserialize;

use super::{AuthError, Identity, JwtConfig, MAX_IDENTITY_LEN, Method, Scopes, SetupError};

/// Shortest accepted HMAC secret, in bytes (256 bits for HS256).
pub const MIN_SECRET_LEN: usize = 32;

/// Key families, as the key files are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
        _ => Family::Rsa,
    }
}

/// The configured algorithms, checked.
#[derive(Debug, Clone)]
pub struct Algorithms {
    list: Vec<Algorithm>,
    public: Option<Family>,
}

impl Algorithms {
    /// Checks `config.algorithms` against the key files configured.
    pub fn parse(config: &JwtConfig) -> Result<Self, String> {
        if config.algorithms.is_empty() {
            return Err(
                "auth.jwt.algorithms must list the accepted algorithms, e.g. [\"ES256\"]".into(),
            );
        }
        let mut list = Vec::new();
        let mut public = None;
        for name in &config.algorithms {
            if name.eq_ignore_ascii_case("none") {
                return Err("auth.jwt.algorithms: `none` is never accepted".into());
            }
            let alg = Algorithm::from_str(name).map_err(|_| {
                format!(
                    "auth.jwt.algorithms: unknown algorithm {name:?} (HS256, HS384, HS512, \
                     ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA)"
                )
            })?;
            match family(alg) {
                Family::Hmac => {
                    if config.secret_file.is_none() {
                        return Err(format!(
                            "auth.jwt.algorithms lists {name}, which needs auth.jwt.secret_file"
                        ));
                    }
                }
                other => {
                    if config.public_key_file.is_none() {
                        return Err(format!(
                            "auth.jwt.algorithms lists {name}, which needs auth.jwt.public_key_file"
                        ));
                    }
                    if public.is_some_and(|p| p != other) {
                        return Err(
                            "auth.jwt.algorithms: one public key serves one family (RS/PS, ES or EdDSA)".into(),
                        );
                    }
                    public = Some(other);
                }
            }
            list.push(alg);
        }
        Ok(Self { list, public })
    }
}

/// The claims read from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    exp: u64,
}

/// Verifies JWTs as configured.
pub struct JwtVerifier {
    secret: Option<DecodingKey>,
    public: Option<DecodingKey>,
    validation: Validation,
    leeway: Duration,
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|cause| SetupError::Read {
        what,
        path: path.to_path_buf(),
        cause,
    })
}

/// The HMAC key in the contents of `auth.jwt.secret_file`. A file that is
/// UTF-8 text is used as that text less ASCII whitespace (space, tab, CR,
/// LF, form feed) at both ends, so the newline an editor or `echo` adds
/// does not count; the text is the key as it is (base64 or hex is not
/// decoded). Any other file (random bytes) is used byte for byte, so a
/// binary secret that happens to end in a newline byte keeps it.
fn hmac_secret(contents: &[u8]) -> &[u8] {
    match std::str::from_utf8(contents) {
        Ok(text) => text.trim_ascii().as_bytes(),
        Err(_) => contents,
    }
}

impl JwtVerifier {
    /// Reads the key files of `config`.
    pub fn new(config: &JwtConfig) -> Result<Self, SetupError> {
        let algorithms = Algorithms::parse(config).map_err(SetupError::Config)?;
        let secret = match &config.secret_file {
            Some(path) => {
                let bytes = read("auth.jwt.secret_file", path)?;
                let trimmed = hmac_secret(&bytes);
                if trimmed.len() < MIN_SECRET_LEN {
                    return Err(SetupError::Key(format!(
                        "auth.jwt.secret_file holds {} bytes; an HMAC secret needs at least {MIN_SECRET_LEN}",
                        trimmed.len()
                    )));
                }
                Some(
                    DecodingKey::from_secret(trimmed)
                        .map_err(|e| SetupError::Key(format!("auth.jwt.secret_file: {e}")))?,
                )
            }
            None => None,
        };
        let public = match (&config.public_key_file, algorithms.public) {
            (Some(path), Some(family)) => {
                let pem = read("auth.jwt.public_key_file", path)?;
                let key = match family {
                    Family::Ec => DecodingKey::from_ec_pem(&pem),
                    Family::Ed => DecodingKey::from_ed_pem(&pem),
                    Family::Rsa | Family::Hmac => DecodingKey::from_rsa_pem(&pem),
                };
                Some(key.map_err(|e| {
                    SetupError::Key(format!(
                        "auth.jwt.public_key_file is not a PEM public key for {:?}: {e}",
                        config.algorithms
                    ))
                })?)
            }
            _ => None,
        };
        let mut validation = Validation::new(algorithms.list[0]);
        validation.algorithms = algorithms.list;
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            secret,
            public,
            validation,
            leeway: Duration::from_secs(config.leeway.as_secs()),
        })
    }

    /// The identity `token` stands for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = decode_header(token)
            .map_err(|_| AuthError::InvalidJwt("malformed JWT header".into()))?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::InvalidJwt(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = match family(header.alg) {
            Family::Hmac => self.secret.as_ref(),
            _ => self.public.as_ref(),
        }
        .ok_or_else(|| AuthError::InvalidJwt("no key for its algorithm".into()))?;
        let data = decode::<Claims>(token, key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::InvalidJwt("not valid yet (nbf)".into()),
            ErrorKind::InvalidIssuer => AuthError::InvalidJwt("wrong issuer (iss)".into()),
            ErrorKind::InvalidAudience => AuthError::InvalidJwt("wrong audience (aud)".into()),
            ErrorKind::MissingRequiredClaim(claim) => {
                AuthError::InvalidJwt(format!("missing claim {claim}"))
            }
            ErrorKind::InvalidAlgorithm => AuthError::InvalidJwt("algorithm not accepted".into()),
            // serde's text names the claim missing or of the wrong type.
            ErrorKind::Json(err) => AuthError::InvalidJwt(format!(
                "its claims must be sub (string), exp (number) and optionally scope \
                 (string): {}",
                err.to_string()
                    .split(" at line ")
                    .next()
                    .unwrap_or_default()
            )),
            _ => AuthError::InvalidJwt("malformed JWT".into()),
        })?;
        let Claims { sub, scope, exp } = data.claims;
        if sub.is_empty() || sub.len() > MAX_IDENTITY_LEN || sub.chars().any(char::is_control) {
            return Err(AuthError::InvalidJwt(format!(
                "sub must be 1 to {MAX_IDENTITY_LEN} bytes without control characters"
            )));
        }
        let (scopes, ignored) = Scopes::parse_lenient(scope.as_deref().unwrap_or(""));
        if !ignored.is_empty() {
            tracing::debug!(identity = %sub, ?ignored, "JWT scopes not understood (they grant nothing)");
        }
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|t| t.checked_add(self.leeway))
            .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)));
        Ok(Identity::new(&sub, scopes, Method::Jwt, Some(expires_at)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use jsonwebtoken::{EncodingKey, Header, encode};

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs_verifier(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut JwtConfig)) -> JwtVerifier {
        let path = dir.path().join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
        let mut config = JwtConfig {
            secret_file: Some(path),
            algorithms: vec!["HS256".into()],
            leeway: Duration::ZERO,
            ..JwtConfig::default()
        };
        tweak(&mut config);
        JwtVerifier::new(&config).unwrap()
    }

    fn hs(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_verify_and_carry_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let v = hs_verifier(&dir, |_| {});
        let token = hs(
            &serde_json::json!({"sub": "alice", "scope": "telemetry:read:* bogus", "exp": now() + 60}),
        );
        let who = v.verify(&token).unwrap();
        assert_eq!(who.name(), "alice");
        assert_eq!(who.scopes().texts(), ["telemetry:read:*"]);
        assert!(who.expires_at().is_some());

        let expired = hs(&serde_json::json!({"sub": "alice", "exp": now() - 10}));
        assert_eq!(v.verify(&expired).unwrap_err(), AuthError::Expired);
        let no_exp = hs(&serde_json::json!({"sub": "alice"}));
        // The message names the claim missing.
        match v.verify(&no_exp) {
            Err(AuthError::InvalidJwt(why)) => assert!(why.contains("`exp`"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let string_exp = hs(&serde_json::json!({"sub": "alice", "exp": "9999999999"}));
        assert!(v.verify(&string_exp).is_err());
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!").unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&forged).unwrap_err(), AuthError::BadSignature);
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert!(matches!(v.verify(&hs512), Err(AuthError::InvalidJwt(_))));
    }

    #[test]
    fn alg_none_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = hs_verifier(&dir, |_| {});
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(v.verify(none).is_err());
        let mut config = JwtConfig {
            secret_file: Some("x".into()),
            algorithms: vec!["none".into()],
            ..JwtConfig::default()
        };
        assert!(Algorithms::parse(&config).unwrap_err().contains("none"));
        config.algorithms = vec!["ES256".into()];
        assert!(
            Algorithms::parse(&config)
                .unwrap_err()
                .contains("public_key_file")
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let dir = tempfile::tempdir().unwrap();
        let v = hs_verifier(&dir, |c| {
            c.issuer = Some("https://idp".into());
            c.audience = Some("streamhub".into());
        });
        let exp = now() + 60;
        let good = hs(
            &serde_json::json!({"sub": "a", "exp": exp, "iss": "https://idp", "aud": "streamhub"}),
        );
        assert!(v.verify(&good).is_ok());
        let wrong_iss =
            hs(&serde_json::json!({"sub": "a", "exp": exp, "iss": "evil", "aud": "streamhub"}));
        assert!(v.verify(&wrong_iss).is_err());
        let no_aud = hs(&serde_json::json!({"sub": "a", "exp": exp, "iss": "https://idp"}));
        assert!(v.verify(&no_aud).is_err());
    }

    /// New-user finding 6: what the server makes of the secret file.
    #[test]
    fn a_text_secret_is_trimmed_and_not_decoded_and_a_binary_one_is_used_whole() {
        // Text: whitespace at both ends goes, inside stays.
        assert_eq!(hmac_secret(b"  abc def\r\n\n"), b"abc def");
        // Base64 text is the key as text, not the bytes it encodes.
        let b64 = b"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n";
        assert_eq!(hmac_secret(b64), &b64[..b64.len() - 1]);
        // Binary (not UTF-8): every byte, a trailing newline byte too.
        let binary = [0xff, 0x00, b' ', 0x80, b'\n'];
        assert_eq!(hmac_secret(&binary), binary);

        // End to end: a token signed with the text without its newline
        // verifies against a file with the newline.
        let dir = tempfile::tempdir().unwrap();
        let verifier = hs_verifier(&dir, |_| {});
        let token = hs(&serde_json::json!({"sub": "a", "exp": now() + 60, "scope": "*"}));
        assert!(verifier.verify(&token).is_ok());
        // A binary secret ending in a newline byte is used whole.
        let mut key = vec![0xfe; 40];
        key.push(b'\n');
        let path = dir.path().join("binary");
        std::fs::write(&path, &key).unwrap();
        let verifier = JwtVerifier::new(&JwtConfig {
            secret_file: Some(path),
            algorithms: vec!["HS256".into()],
            ..JwtConfig::default()
        })
        .unwrap();
        let signed = |key: &[u8]| {
            encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "a", "exp": now() + 60, "scope": "*"}),
                &EncodingKey::from_secret(key).unwrap(),
            )
            .unwrap()
        };
        assert!(verifier.verify(&signed(&key)).is_ok());
        assert!(verifier.verify(&signed(&key[..40])).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"short").unwrap();
        let config = JwtConfig {
            secret_file: Some(path),
            algorithms: vec!["HS256".into()],
            ..JwtConfig::default()
        };
        assert!(
            JwtVerifier::new(&config)
                .err()
                .unwrap()
                .to_string()
                .contains("at least")
        );
    }
}
