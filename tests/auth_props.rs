//! Property tests of the scope matcher and of token, JWT and certificate
//! parsing, hostile input included: never a panic, never a hang, and the
//! glob agrees with a simple reference.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use streamhub::auth::{
    Action, AuthConfig, Authenticator, JwtConfig, Resource, Scope, Scopes, TokenEntry, bearer,
    cert,
    scope::{MAX_SCOPE_LEN, glob_match},
    token,
};

/// The obvious exponential definition, for short inputs.
fn reference(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => (0..=n.len()).any(|i| reference(rest, &n[i..])),
        Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
    }
}

fn authenticator() -> (Authenticator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, [7u8; 32]).unwrap();
    let config = AuthConfig {
        tokens: vec![TokenEntry {
            identity: "a".into(),
            sha256: hex::encode(token::digest("known")),
            scopes: vec!["*".into()],
        }],
        jwt: Some(JwtConfig {
            secret_file: Some(secret),
            algorithms: vec!["HS256".into()],
            ..JwtConfig::default()
        }),
        ..AuthConfig::default()
    };
    (Authenticator::from_config(&config).unwrap(), dir)
}

proptest! {
    #[test]
    fn glob_agrees_with_the_reference(p in "[ab*]{0,8}", n in "[ab]{0,10}") {
        prop_assert_eq!(glob_match(&p, &n), reference(p.as_bytes(), n.as_bytes()));
    }

    #[test]
    fn star_matches_everything_and_literals_only_themselves(name in ".{0,64}") {
        prop_assert!(glob_match("*", &name));
        prop_assert!(glob_match(&name.replace('*', ""), &name.replace('*', "")));
        let prefix: String = name.chars().take(3).collect();
        let pattern = format!("{}*", prefix.replace('*', ""));
        prop_assert!(glob_match(&pattern, &name) || prefix.contains('*'));
    }

    #[test]
    fn hostile_globs_finish(stars in 1usize..40, len in 0usize..300) {
        // a*a*a*…b against aaaa…: the worst case of naive backtracking.
        let pattern = format!("{}b", "a*".repeat(stars));
        let name = "a".repeat(len);
        prop_assert!(!glob_match(&pattern, &name));
    }

    #[test]
    fn scope_parsing_never_panics(text in ".{0,600}") {
        if let Ok(scope) = Scope::parse(&text) {
            prop_assert!(text.len() <= MAX_SCOPE_LEN);
            prop_assert_eq!(scope.as_str(), text.as_str());
        }
        let (scopes, _ignored) = Scopes::parse_lenient(&text);
        let _ = scopes.allows(Resource::Upload, Action::Write, &text);
    }

    #[test]
    fn a_scope_allows_exactly_its_resource_action_and_pattern(
        name in "[a-z0-9.-]{1,20}",
        other in "[a-z0-9.-]{1,20}",
    ) {
        let scope = Scope::parse(&format!("upload:write:{name}")).unwrap();
        prop_assert!(scope.allows(Resource::Upload, Action::Write, &name));
        prop_assert!(!scope.allows(Resource::Upload, Action::Read, &name));
        prop_assert!(!scope.allows(Resource::Telemetry, Action::Publish, &name));
        prop_assert_eq!(scope.allows(Resource::Upload, Action::Write, &other), other == name);
    }

    #[test]
    fn bearer_values_never_panic_and_never_echo(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (auth, _dir) = authenticator();
        if let Ok(token) = bearer(&value) {
            prop_assert!(!token.is_empty());
            if let Err(err) = auth.token(token)
                && token.len() > 8
            {
                prop_assert!(!err.to_string().contains(token));
            }
        }
        let _ = auth.authenticate(Some(&value), None);
    }

    #[test]
    fn jwt_shaped_garbage_is_refused(
        a in "[A-Za-z0-9_-]{0,40}",
        b in "[A-Za-z0-9_-]{0,80}",
        c in "[A-Za-z0-9_-]{0,60}",
    ) {
        let (auth, _dir) = authenticator();
        let garbage = format!("{a}.{b}.{c}");
        let with_header = format!("eyJhbGciOiJIUzI1NiJ9.{b}.{c}");
        prop_assert!(auth.token(&garbage).is_err());
        prop_assert!(auth.token(&with_header).is_err());
    }

    #[test]
    fn certificate_garbage_is_refused(der in proptest::collection::vec(any::<u8>(), 0..400)) {
        prop_assert!(cert::identity(&der).is_err() || !der.is_empty());
    }

    #[test]
    fn digests_parse_only_64_hex_digits(text in ".{0,80}") {
        if token::parse_digest(&text).is_ok() {
            prop_assert_eq!(text.len(), 64);
            prop_assert!(text.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }
}

#[test]
fn a_truncated_or_flipped_certificate_is_never_a_panic() {
    let key = rcgen::KeyPair::generate().unwrap();
    let der = rcgen::CertificateParams::new(vec!["x.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .der()
        .to_vec();
    for cut in 0..der.len() {
        let _ = cert::identity(&der[..cut]);
    }
    for i in 0..der.len() {
        let mut flipped = der.clone();
        flipped[i] ^= 0xff;
        let _ = cert::identity(&flipped);
    }
}
