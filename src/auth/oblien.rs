//! `type = "oblien_gateway"`: Oblien workspace tokens (gateway JWT, 30-day, raw) from api.oblien.com.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request};
use serde::Deserialize;

use super::tokens::{lifecycle_keys, Keying, TokenAuth};
use super::{Authenticator, BuildError};
use crate::config::{Timeouts, Upstream};
use crate::forward::{Clients, HttpClient};
use crate::secret::SecretSpec;
use crate::token::{request_json, Fetch, FetchError, Fetched, Reason};

/// `[route.auth]` for Oblien workspaces.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OblienSpec {
    /// The control plane that issues tokens, e.g. `https://api.oblien.com`.
    pub api: String,
    /// A fixed workspace; without it the first path segment after the prefix names one.
    pub workspace_id: Option<String>,
    /// With no fixed workspace: the workspaces callers may reach (others get 403).
    pub workspaces: Option<Vec<String>>,
    pub client_id: SecretSpec,
    pub client_secret: SecretSpec,
    /// Which token: `gateway` (~1 h JWT), `workspace` (30 days) or `raw` (direct to the VM).
    #[serde(default)]
    pub token: OblienToken,
    /// The path segment of the token endpoints (`runtime-api-access` in newer SDKs).
    #[serde(default = "default_access_path")]
    pub access_path: String,
    /// Paths whose endpoints (WebSockets) take the token as a `token` query parameter.
    #[serde(default = "default_query_token_paths")]
    pub query_token_paths: Vec<String>,
    #[serde(default, with = "crate::config::duration")]
    pub default_lifetime: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    pub refresh_before: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    pub skew: Option<Duration>,
    pub prefetch: Option<bool>,
    #[serde(default, with = "crate::config::duration")]
    pub fetch_timeout: Option<Duration>,
}

/// Which Oblien token a route uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OblienToken {
    #[default]
    Gateway,
    Workspace,
    Raw,
}

fn default_access_path() -> String {
    "internal-api-access".into()
}

fn default_query_token_paths() -> Vec<String> {
    vec!["/ws".into(), "/proxy".into()]
}

pub(super) fn build(spec: &OblienSpec, route: &str) -> Result<Arc<dyn Authenticator>, BuildError> {
    let api = Upstream::parse(&spec.api).map_err(|m| BuildError::new("api", m))?;
    let seg_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !seg_ok(&spec.access_path) {
        return Err(BuildError::new(
            "access_path",
            "must be one path segment, e.g. \"internal-api-access\"",
        ));
    }
    let keying = match (&spec.workspace_id, &spec.workspaces) {
        (Some(id), None) if seg_ok(id) => Keying::Fixed(id.clone()),
        (Some(_), None) => return Err(BuildError::new("workspace_id", "not a workspace id")),
        (Some(_), Some(_)) => {
            return Err(BuildError::new(
                "workspaces",
                "an allow-list only applies without a fixed workspace_id",
            ))
        }
        (None, allow) => {
            if let Some(bad) = allow.iter().flatten().find(|w| !seg_ok(w)) {
                return Err(BuildError::new(
                    "workspaces",
                    format!("\"{bad}\" is not a workspace id"),
                ));
            }
            Keying::PathSegment {
                allow: allow
                    .as_ref()
                    .map(|a| a.iter().cloned().collect::<HashSet<_>>()),
            }
        }
    };
    for p in &spec.query_token_paths {
        if !p.starts_with('/') {
            return Err(BuildError::new(
                "query_token_paths",
                format!("\"{p}\" must start with '/'"),
            ));
        }
    }
    let client_id = super::resolve_header(&spec.client_id, "client_id", route)?;
    let client_secret = super::resolve_header(&spec.client_secret, "client_secret", route)?;
    let (kind, default_lifetime) = match spec.token {
        OblienToken::Gateway => ("oblien gateway", Duration::from_secs(3600)),
        OblienToken::Workspace => ("oblien workspace", Duration::from_secs(30 * 24 * 3600)),
        OblienToken::Raw => ("oblien raw", Duration::from_secs(3600)),
    };
    let policy = lifecycle_keys!(spec).check(default_lifetime)?;
    let fetcher = OblienFetcher {
        client: token_client()?,
        api,
        access_path: spec.access_path.clone(),
        token: spec.token,
        client_id,
        client_secret,
    };
    Ok(Arc::new(TokenAuth::new(
        route,
        kind,
        Arc::new(fetcher),
        policy,
        keying,
        spec.query_token_paths.clone(),
    )))
}

/// The client token fetches use (system trust roots, default timeouts).
pub(super) fn token_client() -> Result<HttpClient, BuildError> {
    Ok(Clients::new(&Timeouts::default(), None)
        .map_err(|e| BuildError::new("", format!("TLS set-up failed: {e}")))?
        .pooled)
}

struct OblienFetcher {
    client: HttpClient,
    api: Upstream,
    access_path: String,
    token: OblienToken,
    client_id: HeaderValue,
    client_secret: HeaderValue,
}

impl OblienFetcher {
    async fn fetch_token(&self, workspace: &str, reason: Reason) -> Result<Fetched, FetchError> {
        // `enable` returns a fresh JWT without rotating the connection token, so other clients
        // of the workspace keep working. A 401 is most often one of them having rotated it:
        // a fresh JWT carries the new one. Rotating (`POST .../token`, which invalidates every
        // other client's token) is only for when that fresh JWT is rejected too; rotating at
        // the first 401 had two credgates sharing a workspace rotate each other's tokens away.
        let (method, endpoint) = match (self.token, reason) {
            (OblienToken::Gateway, Reason::RejectedAgain) => (Method::POST, "token"),
            (OblienToken::Gateway, _) => (Method::POST, "enable"),
            (OblienToken::Workspace, _) => (Method::POST, "workspace"),
            (OblienToken::Raw, _) => (Method::GET, "token/raw"),
        };
        let path = format!("/workspace/{workspace}/{}/{endpoint}", self.access_path);
        let uri = crate::forward::upstream_uri(&self.api, true, &path, None)
            .map_err(|e| FetchError::new(e.to_string()))?;
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, self.api.host_header.clone())
            .header("x-client-id", self.client_id.clone())
            .header("x-client-secret", self.client_secret.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(crate::body::empty())
            .map_err(|e| FetchError::new(e.to_string()))?;
        let json = request_json(&self.client, req).await?;
        if json.get("success").and_then(|v| v.as_bool()) == Some(false) {
            return Err(FetchError::new(format!(
                "Oblien API refused: {}",
                json.get("message")
                    .or_else(|| json.get("error"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("success: false")
            )));
        }
        let token = json
            .get("token")
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| FetchError::new("the Oblien API's answer has no token"))?;
        let upstream = match self.token {
            OblienToken::Raw => {
                let ip = json
                    .get("ip")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| FetchError::new("raw token answer has no ip"))?;
                let port = json
                    .get("port")
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| FetchError::new("raw token answer has no port"))?;
                let ip: std::net::IpAddr = ip
                    .parse()
                    .map_err(|_| FetchError::new("raw token answer has an invalid ip"))?;
                let addr = std::net::SocketAddr::new(
                    ip,
                    u16::try_from(port)
                        .map_err(|_| FetchError::new("raw token answer has an invalid port"))?,
                );
                Some(Upstream::parse(&format!("http://{addr}")).map_err(FetchError::new)?)
            }
            _ => None,
        };
        Ok(Fetched {
            value: crate::secret::Secret::from(token.to_owned()),
            expires_in: None,
            upstream,
        })
    }
}

impl Fetch for OblienFetcher {
    fn fetch<'a>(
        &'a self,
        key: &'a str,
        reason: Reason,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>> {
        Box::pin(self.fetch_token(key, reason))
    }
}
