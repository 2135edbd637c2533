//! Static bearer tokens: generated at random, stored in the configuration
//! only as their SHA-256, and looked up by that hash (so no comparison of
//! secret bytes runs in time that depends on them).

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// A token's SHA-256.
pub type TokenDigest = [u8; 32];

/// What every generated token starts with, so one is recognised in a file
/// or a leak report.
pub const PREFIX: &str = "shub_";

/// Random bytes in a generated token (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// The SHA-256 of `token`.
pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Parses a hex SHA-256 (64 hex digits, either case).
pub fn parse_digest(hex_text: &str) -> Result<TokenDigest, String> {
    let mut digest = [0u8; 32];
    if hex_text.len() != 64 {
        return Err(format!(
            "must be 64 hex digits (a SHA-256), got {} characters",
            hex_text.chars().count()
        ));
    }
    hex::decode_to_slice(hex_text, &mut digest)
        .map_err(|_| "must be 64 hex digits (a SHA-256)".to_owned())?;
    Ok(digest)
}

/// A fresh random token: [`PREFIX`] and 32 random bytes in URL-safe
/// base64, from the operating system's generator.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The `[[auth.tokens]]` entry for `token`, as TOML.
pub fn config_entry(identity: &str, scopes: &[String], token: &str) -> String {
    // JSON string syntax is valid TOML basic-string syntax.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    let scopes = scopes
        .iter()
        .map(|s| quote(s))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[auth.tokens]]\nidentity = {}\nsha256 = \"{}\"\nscopes = [{scopes}]\n",
        quote(identity),
        hex::encode(digest(token))
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn generated_tokens_are_long_random_and_plain() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 43);
        assert!(!a.contains('.'), "never mistaken for a JWT");
    }

    #[test]
    fn the_entry_is_toml_that_loads() {
        let entry = config_entry("ci \"bot\"", &["upload:write:*".into()], "tok");
        let parsed: toml_check::Root = figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(&entry),
        )
        .extract()
        .unwrap();
        assert_eq!(parsed.auth.tokens[0].identity, "ci \"bot\"");
        assert_eq!(
            parse_digest(&parsed.auth.tokens[0].sha256).unwrap(),
            digest("tok")
        );
        assert_eq!(parsed.auth.tokens[0].scopes, ["upload:write:*"]);
    }

    mod toml_check {
        #[derive(serde::Deserialize)]
        pub struct Root {
            pub auth: crate::auth::AuthConfig,
        }
    }

    #[test]
    fn digests_parse() {
        assert!(parse_digest(&"ab".repeat(32)).is_ok());
        assert!(parse_digest(&"AB".repeat(32)).is_ok());
        assert!(parse_digest("ab").is_err());
        assert!(parse_digest(&"zz".repeat(32)).is_err());
    }
}
