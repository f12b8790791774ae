//! Credentials: the `[route.auth]` types and the one trait every type implements.
//!
//! Adding a credential type is adding a module here: its `Spec` (the TOML shape), a
//! `build` that checks it and resolves its secrets, and an [`Authenticator`] impl. The only
//! other line to touch is its variant in [`AuthSpec`].

mod oauth2;
mod oblien;
mod static_headers;
mod tokens;

pub use oauth2::{ClientAuth, OAuth2Spec};
pub use oblien::{OblienSpec, OblienToken};
pub use tokens::TokenAuth;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::config::Upstream;
use crate::error::ProxyError;
use crate::secret::{Secret, SecretSpec};
use crate::token::Token;

/// `[route.auth]` as written: `type = "..."` picks the variant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuthSpec {
    /// Any set of static headers (Oblien's X-Client pair, OpenPanel's client headers, ...).
    Headers(static_headers::HeadersSpec),
    /// `Authorization: Bearer <token>` from a static key.
    Bearer(static_headers::BearerSpec),
    /// Oblien workspace tokens, fetched from the control plane and kept fresh.
    OblienGateway(oblien::OblienSpec),
    /// OAuth2 client-credentials tokens, fetched and kept fresh.
    #[serde(rename = "oauth2_client_credentials")]
    OAuth2ClientCredentials(oauth2::OAuth2Spec),
    /// No credentials: the caller's own `Authorization` passes through.
    None,
}

impl AuthSpec {
    /// The secrets this spec names (to watch their files and notice rotation).
    pub fn secrets(&self) -> Vec<&SecretSpec> {
        match self {
            Self::Headers(s) => s.headers.values().collect(),
            Self::Bearer(s) => vec![&s.token],
            Self::OblienGateway(s) => vec![&s.client_id, &s.client_secret],
            Self::OAuth2ClientCredentials(s) => vec![&s.client_id, &s.client_secret],
            Self::None => vec![],
        }
    }

    /// The name used in `type = "..."`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Headers(_) => "headers",
            Self::Bearer(_) => "bearer",
            Self::OblienGateway(_) => "oblien_gateway",
            Self::OAuth2ClientCredentials(_) => "oauth2_client_credentials",
            Self::None => "none",
        }
    }
}

/// A problem in `[route.auth]`: the key under `auth.` and what is wrong.
#[derive(Debug)]
pub struct BuildError {
    pub key: String,
    pub msg: String,
}

impl BuildError {
    pub fn new(key: impl Into<String>, msg: impl ToString) -> Self {
        Self {
            key: key.into(),
            msg: msg.to_string(),
        }
    }
}

/// Checks a spec, resolves its secrets and builds the authenticator for a route.
pub fn build(spec: &AuthSpec, route: &str) -> Result<Arc<dyn Authenticator>, BuildError> {
    match spec {
        AuthSpec::Headers(s) => static_headers::build_headers(s, route),
        AuthSpec::Bearer(s) => static_headers::build_bearer(s, route),
        AuthSpec::OblienGateway(s) => oblien::build(s, route),
        AuthSpec::OAuth2ClientCredentials(s) => oauth2::build(s, route),
        AuthSpec::None => Ok(static_headers::none()),
    }
}

/// Attaches a route's credentials to each request it forwards.
pub trait Authenticator: Send + Sync + 'static {
    /// Header names this route sets. The caller's values for them are always removed.
    fn injects(&self) -> &[HeaderName];

    /// Whether the caller's own `Authorization` is removed (every type that injects
    /// credentials does; `none` passes it through).
    fn strips_authorization(&self) -> bool;

    /// The path the upstream will see for `path` (the path after the route's prefix): a type
    /// that takes part of it (a workspace id) removes it, and refuses what it would refuse in
    /// [`grant`](Self::grant). Lets policy be checked before any token is fetched.
    fn upstream_path<'p>(&self, path: &'p str) -> Result<&'p str, ProxyError> {
        Ok(path)
    }

    /// The credentials for one request. `path` is the request path after the route's prefix;
    /// a type that takes part of it (a workspace id) advances it.
    fn grant<'a>(&'a self, path: &mut &str) -> GrantFuture<'a>;

    /// The upstream answered 401 to a request that carried `grant`. Returns true when a
    /// fresh credential will be used for a replay; false when replaying cannot help.
    fn rejected(&self, _grant: &Grant) -> bool {
        false
    }

    /// Begins background work (fetching a first token), once the runtime is up.
    fn start(&self) {}

    /// The state of each fetched token, for types that fetch tokens.
    fn token_status(&self) -> Option<crate::token::TokenStatus> {
        None
    }
}

/// Credentials for one request.
#[derive(Clone, Default)]
pub struct Grant {
    /// Headers to set (values marked sensitive).
    pub headers: Arc<[(HeaderName, HeaderValue)]>,
    /// Set the `token` query parameter to this (WebSocket endpoints that take it there).
    pub query_token: Option<Secret>,
    /// Send to this upstream instead of the route's (a token that names its own endpoint).
    pub upstream: Option<Arc<Upstream>>,
    /// The fetched token behind the grant, so a 401 can be traced back to it.
    pub token: Option<Arc<Token>>,
}

/// Resolves a secret into a sensitive header value, warning about literals.
fn resolve_header(secret: &SecretSpec, key: &str, route: &str) -> Result<HeaderValue, BuildError> {
    let value = secret.resolve().map_err(|e| BuildError::new(key, e))?;
    warn_if_literal(secret, key, route);
    value.header_value().map_err(|e| BuildError::new(key, e))
}

/// Literal secrets are for development; say so once at load.
fn warn_if_literal(secret: &SecretSpec, key: &str, route: &str) {
    if secret.is_literal() {
        tracing::warn!(route, key = %format!("auth.{key}"), "secret is written in the config file; use {{ env = \"..\" }} or {{ file = \"..\" }} outside development");
    }
}

/// The result of [`Authenticator::grant`]: ready at once on the hot path (static headers, a
/// cached token), or a future when a token must be fetched first.
pub enum GrantFuture<'a> {
    Ready(Option<Result<Grant, ProxyError>>),
    Pending(Pin<Box<dyn Future<Output = Result<Grant, ProxyError>> + Send + 'a>>),
}

impl Future for GrantFuture<'_> {
    type Output = Result<Grant, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            GrantFuture::Ready(r) => {
                Poll::Ready(r.take().expect("GrantFuture polled after completion"))
            }
            GrantFuture::Pending(f) => f.as_mut().poll(cx),
        }
    }
}
