//! `type = "oauth2_client_credentials"`: OAuth2 client-credentials tokens (RFC 6749 §4.4).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{header, Method, Request};
use serde::Deserialize;

use super::tokens::{lifecycle_keys, Keying, TokenAuth};
use super::{Authenticator, BuildError};
use crate::config::Upstream;
use crate::forward::HttpClient;
use crate::secret::{Secret, SecretSpec};
use crate::token::{request_json, Fetch, FetchError, Fetched, Reason};

/// `[route.auth]` for OAuth2 client credentials.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Spec {
    pub token_url: String,
    pub client_id: SecretSpec,
    pub client_secret: SecretSpec,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// Extra form parameters sent with every token request.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// How the client authenticates: in the form body (default) or HTTP Basic.
    #[serde(default)]
    pub client_auth: ClientAuth,
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

/// Where the client id and secret go in a token request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Body,
    Basic,
}

pub(super) fn build(spec: &OAuth2Spec, route: &str) -> Result<Arc<dyn Authenticator>, BuildError> {
    let token_url =
        Upstream::parse(&spec.token_url).map_err(|m| BuildError::new("token_url", m))?;
    let client_id = spec
        .client_id
        .resolve()
        .map_err(|e| BuildError::new("client_id", e))?;
    let client_secret = spec
        .client_secret
        .resolve()
        .map_err(|e| BuildError::new("client_secret", e))?;
    super::warn_if_literal(&spec.client_id, "client_id", route);
    super::warn_if_literal(&spec.client_secret, "client_secret", route);
    for reserved in [
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "audience",
    ] {
        if spec.params.contains_key(reserved) {
            return Err(BuildError::new(
                format!("params.{reserved}"),
                "is set by credgate itself (use the dedicated key)",
            ));
        }
    }
    let policy = lifecycle_keys!(spec).check(Duration::from_secs(3600))?;
    let fetcher = OAuth2Fetcher {
        client: super::oblien::token_client()?,
        token_url,
        client_id,
        client_secret,
        spec: spec.clone(),
    };
    Ok(Arc::new(TokenAuth::new(
        route,
        "oauth2",
        Arc::new(fetcher),
        policy,
        Keying::Fixed(String::new()),
        Vec::new(),
    )))
}

struct OAuth2Fetcher {
    client: HttpClient,
    token_url: Upstream,
    client_id: Secret,
    client_secret: Secret,
    spec: OAuth2Spec,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

impl OAuth2Fetcher {
    /// The form body of a token request.
    fn form(&self) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if self.spec.client_auth == ClientAuth::Body {
            form.append_pair("client_id", self.client_id.expose());
            form.append_pair("client_secret", self.client_secret.expose());
        }
        if let Some(s) = &self.spec.scope {
            form.append_pair("scope", s);
        }
        if let Some(a) = &self.spec.audience {
            form.append_pair("audience", a);
        }
        for (k, v) in &self.spec.params {
            form.append_pair(k, v);
        }
        form.finish()
    }

    async fn fetch_token(&self) -> Result<Fetched, FetchError> {
        let body = self.form();
        let uri = crate::forward::upstream_uri(&self.token_url, true, "", None)
            .map_err(|e| FetchError::new(e.to_string()))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::HOST, self.token_url.host_header.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(crate::body::full(body))
            .map_err(|e| FetchError::new(e.to_string()))?;
        if self.spec.client_auth == ClientAuth::Basic {
            // RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let creds = format!(
                "{}:{}",
                enc(self.client_id.expose()),
                enc(self.client_secret.expose())
            );
            let value = crate::secret::sensitive_header(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            ))
            .map_err(|_| FetchError::new("client credentials cannot be sent in a header"))?;
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let json = request_json(&self.client, req).await?;
        let t: TokenResponse = serde_json::from_value(json)
            .map_err(|_| FetchError::new("the token response has no access_token"))?;
        if let Some(tt) = t
            .token_type
            .as_deref()
            .filter(|tt| !tt.eq_ignore_ascii_case("bearer"))
        {
            return Err(FetchError::new(format!(
                "token_type \"{tt}\" is not supported (only bearer)"
            )));
        }
        let expires_in = match t.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64);
        Ok(Fetched {
            value: Secret::from(t.access_token),
            expires_in,
            upstream: None,
        })
    }
}

impl Fetch for OAuth2Fetcher {
    fn fetch<'a>(
        &'a self,
        _key: &'a str,
        _reason: Reason,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>> {
        Box::pin(self.fetch_token())
    }
}
