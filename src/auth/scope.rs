//! Scopes: what an identity may do, as `resource:action:pattern`.
//!
//! The pattern is a glob on names where `*` matches any run of characters
//! (the empty run included) and every other character matches itself. The
//! scope `*` alone allows everything; `*` in the resource or action place
//! matches every resource or action. There are only allows: a name is
//! permitted when any scope matches it, and nothing is permitted otherwise
//! (default deny).

use std::fmt;

/// Longest scope accepted, in bytes: bounds the matcher's work.
pub const MAX_SCOPE_LEN: usize = 512;

/// What a scope is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Telemetry services (names are service names).
    Telemetry,
    /// Stored files and uploads (names are file names).
    Upload,
    /// Chat rooms (names are room names).
    Chat,
    /// The server itself (names: `info`, `metrics`).
    Server,
}

impl Resource {
    /// The resource's name in a scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Telemetry => "telemetry",
            Resource::Upload => "upload",
            Resource::Chat => "chat",
            Resource::Server => "server",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "telemetry" => Resource::Telemetry,
            "upload" => Resource::Upload,
            "chat" => Resource::Chat,
            "server" => Resource::Server,
            _ => return None,
        })
    }
}

/// What is done to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `telemetry:publish`: LiveFeed under a service name.
    Publish,
    /// `telemetry:read`, `upload:read`, `server:read`.
    Read,
    /// `upload:write`: Upload, QueryUpload, CancelUpload, ListUploads.
    Write,
    /// `chat:join`: join, read and send in a room.
    Join,
}

impl Action {
    /// The action's name in a scope.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Read => "read",
            Action::Write => "write",
            Action::Join => "join",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "publish" => Action::Publish,
            "read" => Action::Read,
            "write" => Action::Write,
            "join" => Action::Join,
            _ => return None,
        })
    }

    /// Whether `self` is an action of `resource`.
    fn belongs_to(self, resource: Resource) -> bool {
        matches!(
            (resource, self),
            (Resource::Telemetry, Action::Publish | Action::Read)
                | (Resource::Upload, Action::Write | Action::Read)
                | (Resource::Chat, Action::Join)
                | (Resource::Server, Action::Read)
        )
    }
}

/// Why a scope was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Empty, or longer than [`MAX_SCOPE_LEN`].
    #[error("a scope must be 1 to {MAX_SCOPE_LEN} bytes")]
    Length,
    /// Not `*` nor three parts.
    #[error("scope {0:?} is not `*` nor `resource:action:pattern`")]
    Shape(String),
    /// Unknown resource.
    #[error("scope {0:?}: unknown resource (telemetry, upload, chat, server or *)")]
    Resource(String),
    /// Unknown action, or one the resource does not have.
    #[error(
        "scope {0:?}: unknown action for its resource (telemetry: publish, read; \
         upload: write, read; chat: join; server: read; or *)"
    )]
    Action(String),
    /// Whitespace or control characters.
    #[error("scope {0:?} contains whitespace or control characters")]
    Characters(String),
}

/// One parsed scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    text: String,
    /// `None` = any resource.
    resource: Option<Resource>,
    /// `None` = any action.
    action: Option<Action>,
    pattern: String,
}

impl Scope {
    /// Parses `text` (`*`, or `resource:action:pattern`; the pattern may
    /// itself contain `:`).
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        if text.is_empty() || text.len() > MAX_SCOPE_LEN {
            return Err(ScopeError::Length);
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ScopeError::Characters(text.to_owned()));
        }
        if text == "*" {
            return Ok(Self {
                text: text.to_owned(),
                resource: None,
                action: None,
                pattern: "*".to_owned(),
            });
        }
        let mut parts = text.splitn(3, ':');
        let (Some(resource), Some(action), Some(pattern)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(ScopeError::Shape(text.to_owned()));
        };
        if pattern.is_empty() {
            return Err(ScopeError::Shape(text.to_owned()));
        }
        let resource = match resource {
            "*" => None,
            other => {
                Some(Resource::parse(other).ok_or_else(|| ScopeError::Resource(text.to_owned()))?)
            }
        };
        let action = match action {
            "*" => None,
            other => {
                let action =
                    Action::parse(other).ok_or_else(|| ScopeError::Action(text.to_owned()))?;
                if let Some(resource) = resource
                    && !action.belongs_to(resource)
                {
                    return Err(ScopeError::Action(text.to_owned()));
                }
                Some(action)
            }
        };
        Ok(Self {
            text: text.to_owned(),
            resource,
            action,
            pattern: pattern.to_owned(),
        })
    }

    /// Whether this scope allows `action` on `resource` named `name`.
    pub fn allows(&self, resource: Resource, action: Action, name: &str) -> bool {
        self.resource.is_none_or(|r| r == resource)
            && self.action.is_none_or(|a| a == action)
            && glob_match(&self.pattern, name)
    }

    /// The scope as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A set of scopes: allows what any of them allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Every action on every name (the scope `*`).
    pub fn all() -> Self {
        Self(vec![Scope {
            text: "*".to_owned(),
            resource: None,
            action: None,
            pattern: "*".to_owned(),
        }])
    }

    /// Parses every scope of `texts`; the first bad one is the error.
    pub fn parse<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<Self, ScopeError> {
        texts
            .into_iter()
            .map(Scope::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Parses a space-separated list (a JWT's `scope` claim), keeping the
    /// scopes it understands and returning the ones it does not apart:
    /// those grant nothing.
    pub fn parse_lenient(text: &str) -> (Self, Vec<String>) {
        let mut scopes = Vec::new();
        let mut ignored = Vec::new();
        for item in text.split_ascii_whitespace() {
            match Scope::parse(item) {
                Ok(scope) => scopes.push(scope),
                Err(_) => ignored.push(item.chars().take(64).collect()),
            }
        }
        (Self(scopes), ignored)
    }

    /// Whether any scope allows `action` on `resource` named `name`.
    pub fn allows(&self, resource: Resource, action: Action, name: &str) -> bool {
        self.0.iter().any(|s| s.allows(resource, action, name))
    }

    /// Whether any scope allows `action` on `resource` for some name (a
    /// list call with none of them may list nothing).
    pub fn grants(&self, resource: Resource, action: Action) -> bool {
        self.0.iter().any(|s| {
            s.resource.is_none_or(|r| r == resource) && s.action.is_none_or(|a| a == action)
        })
    }

    /// The scopes as written.
    pub fn texts(&self) -> Vec<String> {
        self.0.iter().map(|s| s.text.clone()).collect()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of bytes
/// (none included) and every other byte matches itself.
///
/// Linear backtracking over the last `*` only: at most
/// `pattern.len() * name.len()` steps, never exponential.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` swallow one more byte and retry after it.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// The scope that would allow `action` on `resource` named `name`, for a
/// PERMISSION_DENIED message.
pub fn needed(resource: Resource, action: Action, name: &str) -> String {
    format!("{}:{}:{name}", resource.as_str(), action.as_str())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn grants_asks_for_any_pattern() {
        let scopes = Scopes::parse(["upload:read:public-*", "chat:*:dev"]).unwrap();
        assert!(scopes.grants(Resource::Upload, Action::Read));
        assert!(!scopes.grants(Resource::Upload, Action::Write));
        assert!(scopes.grants(Resource::Chat, Action::Join));
        assert!(!scopes.grants(Resource::Telemetry, Action::Read));
        assert!(Scopes::all().grants(Resource::Server, Action::Read));
        assert!(!Scopes::default().grants(Resource::Upload, Action::Read));
    }

    #[test]
    fn globs() {
        for (pattern, name) in [
            ("*", ""),
            ("*", "anything"),
            ("api-*", "api-"),
            ("api-*", "api-gateway"),
            ("reports/*", "reports/q1.pdf"),
            ("*.pdf", "a.pdf"),
            ("a*b*c", "abc"),
            ("a*b*c", "axxbyyc"),
            ("exact", "exact"),
            ("**", "x"),
            ("a*a*a*a*b", "aaaaaaaaab"),
        ] {
            assert!(glob_match(pattern, name), "{pattern} should match {name}");
        }
        for (pattern, name) in [
            ("api-*", "ap"),
            ("api-*", "web-api-1"),
            ("*.pdf", "a.pdf.exe"),
            ("exact", "exactly"),
            ("exact", "exac"),
            ("a*b*c", "acb"),
            ("", "x"),
            ("a*a*a*a*b", "aaaaaaaaaa"),
        ] {
            assert!(
                !glob_match(pattern, name),
                "{pattern} should not match {name}"
            );
        }
    }

    #[test]
    fn scopes_parse_and_allow() {
        let s = Scope::parse("telemetry:publish:api-*").unwrap();
        assert!(s.allows(Resource::Telemetry, Action::Publish, "api-1"));
        assert!(!s.allows(Resource::Telemetry, Action::Read, "api-1"));
        assert!(!s.allows(Resource::Telemetry, Action::Publish, "web"));
        let all = Scope::parse("*").unwrap();
        assert!(all.allows(Resource::Chat, Action::Join, "anything"));
        let any_action = Scope::parse("upload:*:x").unwrap();
        assert!(any_action.allows(Resource::Upload, Action::Write, "x"));
        assert!(any_action.allows(Resource::Upload, Action::Read, "x"));
        let colon = Scope::parse("chat:join:a:b").unwrap();
        assert!(colon.allows(Resource::Chat, Action::Join, "a:b"));
        for bad in [
            "",
            "telemetry",
            "telemetry:read",
            "telemetry:read:",
            "files:read:*",
            "telemetry:write:*",
            "chat:read:*",
            "upload:read:a b",
            "upload:read:a\nb",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Scope::parse(&"x".repeat(MAX_SCOPE_LEN + 1)).is_err());
    }

    #[test]
    fn lenient_lists_keep_what_they_understand() {
        let (scopes, ignored) = Scopes::parse_lenient("telemetry:read:*  openid chat:join:dev-*");
        assert_eq!(scopes.texts(), ["telemetry:read:*", "chat:join:dev-*"]);
        assert_eq!(ignored, ["openid"]);
        assert!(scopes.allows(Resource::Chat, Action::Join, "dev-1"));
        assert!(!scopes.allows(Resource::Upload, Action::Read, "x"));
        assert!(Scopes::default().is_empty());
    }
}
