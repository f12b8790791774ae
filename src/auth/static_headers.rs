//! Static credentials: a fixed header set (`headers`), a bearer key (`bearer`), or `none`.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{header, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{Authenticator, BuildError, Grant, GrantFuture};
use crate::secret::{sensitive_header, SecretSpec};

/// `type = "headers"`: `headers = { "X-Client-ID" = { env = ".." }, ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersSpec {
    pub headers: BTreeMap<String, SecretSpec>,
}

/// `type = "bearer"`: `token = { env = ".." }` sent as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerSpec {
    pub token: SecretSpec,
}

/// Headers resolved once at load and attached to every request.
struct StaticHeaders {
    names: Vec<HeaderName>,
    grant: Grant,
    strips_authorization: bool,
}

impl Authenticator for StaticHeaders {
    fn injects(&self) -> &[HeaderName] {
        &self.names
    }

    fn strips_authorization(&self) -> bool {
        self.strips_authorization
    }

    fn grant<'a>(&'a self, _path: &mut &str) -> GrantFuture<'a> {
        GrantFuture::Ready(Some(Ok(self.grant.clone())))
    }
}

fn from_pairs(
    pairs: Vec<(HeaderName, HeaderValue)>,
    strips_authorization: bool,
) -> Arc<dyn Authenticator> {
    Arc::new(StaticHeaders {
        names: pairs.iter().map(|(n, _)| n.clone()).collect(),
        grant: Grant {
            headers: pairs.into(),
            ..Grant::default()
        },
        strips_authorization,
    })
}

pub(super) fn build_headers(
    spec: &HeadersSpec,
    route: &str,
) -> Result<Arc<dyn Authenticator>, BuildError> {
    if spec.headers.is_empty() {
        return Err(BuildError::new("headers", "name at least one header"));
    }
    let mut pairs = Vec::with_capacity(spec.headers.len());
    for (name, secret) in &spec.headers {
        let key = format!("headers.{name}");
        let hname = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| BuildError::new(&key, "not a valid header name"))?;
        if crate::forward::is_hop_by_hop(&hname) || hname == header::HOST {
            return Err(BuildError::new(
                &key,
                "this header cannot carry credentials",
            ));
        }
        let value = super::resolve_header(secret, &key, route)?;
        pairs.push((hname, value));
    }
    Ok(from_pairs(pairs, true))
}

pub(super) fn build_bearer(
    spec: &BearerSpec,
    route: &str,
) -> Result<Arc<dyn Authenticator>, BuildError> {
    let token = spec
        .token
        .resolve()
        .map_err(|e| BuildError::new("token", e))?;
    super::warn_if_literal(&spec.token, "token", route);
    let value = sensitive_header(&format!("Bearer {}", token.expose()))
        .map_err(|e| BuildError::new("token", e))?;
    Ok(from_pairs(vec![(header::AUTHORIZATION, value)], true))
}

pub(super) fn none() -> Arc<dyn Authenticator> {
    from_pairs(Vec::new(), false)
}
