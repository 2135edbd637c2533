//! `streamhub token new` (a fresh static token and its config entry) and
//! `streamhub whoami` (the identity the server sees).

use anyhow::Context as _;
use serde::Serialize;

use super::{Context, status_error};
use crate::{
    auth::{self, Scopes},
    proto::streamhub::{WhoAmIRequest, server_service_client::ServerServiceClient},
};

/// Subcommands of `streamhub token`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random token (256 bits) and the `[[auth.tokens]]`
    /// entry to add to the server's configuration file. The file holds
    /// only the token's SHA-256; keep the token itself secret.
    New(NewArgs),
}

/// Arguments of `streamhub token new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The identity the token stands for (logs, chat sender, WhoAmI).
    #[arg(long)]
    pub identity: String,
    /// A scope, `resource:action:pattern` or `*` (repeatable), e.g.
    /// `telemetry:publish:api-*`, `upload:read:*`, `chat:join:dev-*`.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct NewToken<'a> {
    identity: &'a str,
    token: &'a str,
    sha256: String,
    scopes: &'a [String],
    config: &'a str,
}

/// `streamhub token …`.
pub fn run(ctx: &Context, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New(args) => new(ctx, &args),
    }
}

fn new(ctx: &Context, args: &NewArgs) -> anyhow::Result<()> {
    let config = auth::AuthConfig {
        tokens: vec![auth::TokenEntry {
            identity: args.identity.clone(),
            sha256: "0".repeat(64),
            scopes: args.scopes.clone(),
        }],
        ..auth::AuthConfig::default()
    };
    config.validate().map_err(|e| {
        // The configuration's keys, as this command's flags.
        anyhow::anyhow!(
            "{}",
            e.replace("auth.tokens[0].scopes", "--scope")
                .replace("auth.tokens[0].", "--")
        )
    })?;
    Scopes::parse(args.scopes.iter().map(String::as_str))?;
    let token = auth::token::generate().context("cannot read the system's random generator")?;
    let entry = auth::token::config_entry(&args.identity, &args.scopes, &token);
    ctx.emit(
        &NewToken {
            identity: &args.identity,
            token: &token,
            sha256: hex::encode(auth::token::digest(&token)),
            scopes: &args.scopes,
            config: &entry,
        },
        || {
            format!(
                "token (give it to {:?}; it is shown only now):\n  {token}\n\n\
                 add to the server's configuration file, then restart it:\n\n{entry}",
                args.identity
            )
        },
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct WhoAmIView {
    identity: String,
    scopes: Vec<String>,
    auth_enabled: bool,
    method: String,
    expires_at_ms: u64,
}

/// `streamhub whoami`: the identity and scopes the server sees for the
/// credentials given.
pub async fn whoami(ctx: &Context) -> anyhow::Result<()> {
    let me = identity(ctx).await?;
    let view = WhoAmIView {
        identity: me.identity,
        scopes: me.scopes,
        auth_enabled: me.auth_enabled,
        method: me.method,
        expires_at_ms: me.expires_at_ms,
    };
    ctx.emit(&view, || {
        let mut text = format!(
            "identity: {}\nmethod:   {}\nscopes:   {}",
            view.identity,
            view.method,
            if view.scopes.is_empty() {
                "(none)".to_owned()
            } else {
                view.scopes.join(" ")
            }
        );
        if !view.auth_enabled {
            text.push_str("\n(authentication is off on this server: everyone may do everything)");
        }
        if view.expires_at_ms > 0 {
            text.push_str(&format!(
                "\nexpires:  {}",
                super::format_ms(view.expires_at_ms)
            ));
        }
        text
    });
    Ok(())
}

/// The server's WhoAmI answer for this context's credentials.
pub async fn identity(ctx: &Context) -> anyhow::Result<crate::proto::streamhub::WhoAmIResponse> {
    let mut client = ServerServiceClient::new(ctx.connect().await?);
    Ok(client
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

/// What an empty list means for this identity: `empty` (e.g. "no files
/// stored yet") when it may read every name of `resource` (or the server
/// has no authentication), else that nothing is visible to it, naming the
/// scopes that limit what it sees. Falls back to `empty` when WhoAmI
/// cannot be asked.
pub async fn empty_list_text(
    ctx: &Context,
    resource: auth::Resource,
    what: &str,
    empty: &str,
) -> String {
    let Ok(me) = identity(ctx).await else {
        return empty.to_owned();
    };
    let action = auth::Action::Read;
    let needed = format!("{}:{}:*", resource.as_str(), action.as_str());
    let scopes = Scopes::parse_lenient(&me.scopes.join(" ")).0;
    if !me.auth_enabled || scopes.allows(resource, action, "*") {
        return empty.to_owned();
    }
    let relevant: Vec<String> = me
        .scopes
        .iter()
        .filter(|text| Scopes::parse([text.as_str()]).is_ok_and(|s| s.grants(resource, action)))
        .cloned()
        .collect();
    if relevant.is_empty() {
        format!(
            "no {what} visible to {:?}: its scopes ({}) do not let it read any \
             (it needs e.g. {needed})",
            me.identity,
            if me.scopes.is_empty() {
                "none".to_owned()
            } else {
                me.scopes.join(" ")
            }
        )
    } else {
        format!(
            "no {what} visible to {:?}: its scopes let it read only {} ({needed} would show all)",
            me.identity,
            relevant.join(" ")
        )
    }
}
