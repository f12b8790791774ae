//! The authenticator shared by every fetched-token type: picks the token key, reads the cached
//! token, and turns it into a [`Grant`]. A token type only supplies its [`Fetch`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::{Authenticator, BuildError, Grant, GrantFuture};
use crate::error::ProxyError;
use crate::token::{Fetch, Lifecycle, Token, TokenSource};

/// Which token a request needs.
pub enum Keying {
    /// One token for the whole route.
    Fixed(String),
    /// The first path segment after the prefix names the key (an Oblien workspace id); it is
    /// removed from the upstream path. `allow`, when set, lists the keys callers may use.
    PathSegment { allow: Option<HashSet<String>> },
}

/// An [`Authenticator`] backed by a [`TokenSource`].
pub struct TokenAuth {
    source: Arc<TokenSource>,
    keying: Keying,
    /// Paths (after the key) whose endpoints take the token as a `token` query parameter.
    query_token_paths: Vec<String>,
}

const INJECTS: [HeaderName; 1] = [http::header::AUTHORIZATION];

impl TokenAuth {
    pub fn new(
        route: &str,
        kind: &'static str,
        fetcher: Arc<dyn Fetch>,
        policy: Lifecycle,
        keying: Keying,
        query_token_paths: Vec<String>,
    ) -> Self {
        let fixed = match &keying {
            Keying::Fixed(k) => Some(k.clone()),
            Keying::PathSegment { .. } => None,
        };
        Self {
            source: Arc::new(TokenSource::new(route, kind, fetcher, policy, fixed)),
            keying,
            query_token_paths,
        }
    }

    /// The token key of a request and the path the upstream sees: the fixed key and the whole
    /// path, or the workspace id split off the path (checked against the allow-list).
    fn split<'p>(&self, path: &'p str) -> Result<(String, &'p str), ProxyError> {
        let allow = match &self.keying {
            Keying::Fixed(k) => return Ok((k.clone(), path)),
            Keying::PathSegment { allow } => allow,
        };
        let rest = path.strip_prefix('/').unwrap_or("");
        let (seg, tail) = rest
            .find('/')
            .map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
        if seg.is_empty()
            || !seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ProxyError::BadRequest(
                "this route expects the workspace id as the first path segment: /<prefix>/<workspace_id>/...",
            ));
        }
        if allow.as_ref().is_some_and(|a| !a.contains(seg)) {
            return Err(ProxyError::ForbiddenWorkspace(seg.to_owned()));
        }
        Ok((seg.to_owned(), tail))
    }

    fn grant_for(token: Arc<Token>, query: bool) -> Grant {
        Grant {
            headers: token.headers.clone(),
            query_token: query.then(|| token.value.clone()),
            upstream: token.upstream.clone(),
            token: Some(token),
        }
    }

    /// The token source, for status and readiness.
    pub fn source(&self) -> &Arc<TokenSource> {
        &self.source
    }
}

impl Authenticator for TokenAuth {
    fn injects(&self) -> &[HeaderName] {
        &INJECTS
    }

    fn strips_authorization(&self) -> bool {
        true
    }

    fn upstream_path<'p>(&self, path: &'p str) -> Result<&'p str, ProxyError> {
        self.split(path).map(|(_, rest)| rest)
    }

    fn grant<'a>(&'a self, path: &mut &str) -> GrantFuture<'a> {
        let got = match &self.keying {
            // The hot path of a fixed key: no map lookup, no allocation.
            Keying::Fixed(_) => self.source.get_fixed(),
            Keying::PathSegment { .. } => match self.split(path) {
                Ok((key, rest)) => {
                    *path = rest;
                    self.source.get(&key)
                }
                Err(e) => return GrantFuture::Ready(Some(Err(e))),
            },
        };
        let query = self
            .query_token_paths
            .iter()
            .any(|q| crate::route::segment_prefix(path, q));
        match got {
            Ok(token) => GrantFuture::Ready(Some(Ok(Self::grant_for(token, query)))),
            Err(wait) => GrantFuture::Pending(Box::pin(async move {
                wait.await.map(|t| Self::grant_for(t, query))
            })),
        }
    }

    fn rejected(&self, grant: &Grant) -> bool {
        grant
            .token
            .as_ref()
            .is_some_and(|t| self.source.rejected(t))
    }

    fn start(&self) {
        self.source.start();
    }

    fn token_status(&self) -> Option<crate::token::TokenStatus> {
        Some(self.source.status())
    }
}

/// The lifecycle keys of a token type's spec. Each spec declares these fields itself
/// (`default_lifetime`, `refresh_before`, `skew`, `prefetch`, `fetch_timeout`) because serde's
/// `flatten` cannot be combined with `deny_unknown_fields`; this reads them in one place.
macro_rules! lifecycle_keys {
    ($spec:expr) => {
        $crate::auth::tokens::LifecycleKeys {
            default_lifetime: $spec.default_lifetime,
            refresh_before: $spec.refresh_before,
            skew: $spec.skew,
            prefetch: $spec.prefetch,
            fetch_timeout: $spec.fetch_timeout,
        }
    };
}
pub(super) use lifecycle_keys;

/// The lifecycle keys every token type accepts, as written (all optional).
pub struct LifecycleKeys {
    pub default_lifetime: Option<Duration>,
    pub refresh_before: Option<Duration>,
    pub skew: Option<Duration>,
    pub prefetch: Option<bool>,
    pub fetch_timeout: Option<Duration>,
}

impl LifecycleKeys {
    /// Checks the keys against each other and fills in defaults.
    pub fn check(self, default_lifetime: Duration) -> Result<Lifecycle, BuildError> {
        let mut l =
            Lifecycle::with_default_lifetime(self.default_lifetime.unwrap_or(default_lifetime));
        for (key, v) in [
            ("default_lifetime", Some(l.default_lifetime)),
            ("refresh_before", self.refresh_before),
            ("fetch_timeout", self.fetch_timeout),
        ] {
            if v.is_some_and(|d| d.is_zero()) {
                return Err(BuildError::new(key, "must be greater than zero"));
            }
        }
        l.refresh_before = self.refresh_before;
        l.skew = self.skew.unwrap_or(l.skew);
        l.prefetch = self.prefetch.unwrap_or(l.prefetch);
        l.fetch_timeout = self.fetch_timeout.unwrap_or(l.fetch_timeout);
        Ok(l)
    }
}
