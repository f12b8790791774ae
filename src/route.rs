//! Route matching: dedicated listener, absolute URI (forward proxy), Host, longest path prefix.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, Uri, Version};

use crate::config::{Matcher, Route};
use crate::error::ProxyError;

/// Which listener a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A `[server] listen` address, shared by routes that match on host and prefix.
    Shared,
    /// A route's own `listen` address, by route name.
    Dedicated(Arc<str>),
}

/// A request's route, and the part of its path that goes upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'u> {
    /// Index into the route list the table was built from.
    pub route: usize,
    /// The path after the route's prefix: "" or "/...".
    pub rest: &'u str,
    /// False in forward-proxy mode, where the caller already names the full upstream path.
    pub add_base_path: bool,
}

/// The routes, indexed for matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Shared-listener routes: host-specific first, then longest prefix first.
    shared: Vec<(usize, Option<String>, Option<String>)>,
    dedicated: HashMap<Arc<str>, usize>,
    /// Upstream host -> routes, longest base path first (forward-proxy mode).
    by_upstream_host: HashMap<String, Vec<usize>>,
    upstreams: Vec<(u16, String)>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Self {
        let mut t = RouteTable::default();
        for (i, r) in routes.iter().enumerate() {
            match &r.matcher {
                Matcher::Shared { host, prefix } => {
                    t.shared.push((i, host.clone(), prefix.clone()))
                }
                Matcher::Listener(_) => {
                    t.dedicated.insert(r.name.clone(), i);
                }
            }
            t.by_upstream_host
                .entry(r.upstream.host.clone())
                .or_default()
                .push(i);
            t.upstreams
                .push((r.upstream.port, r.upstream.base_path.clone()));
        }
        let plen = |p: &Option<String>| p.as_deref().map_or(0, str::len);
        t.shared.sort_by(|a, b| {
            b.1.is_some()
                .cmp(&a.1.is_some())
                .then(plen(&b.2).cmp(&plen(&a.2)))
        });
        for list in t.by_upstream_host.values_mut() {
            list.sort_by_key(|&i| std::cmp::Reverse(t.upstreams[i].1.len()));
        }
        for (first, shadowed) in t.forward_shadowed() {
            let (a, b) = (&routes[first], &routes[shadowed]);
            tracing::info!(
                route = %a.name, also = %b.name, upstream = %b.upstream,
                "forward-proxy requests for this upstream go to the first route declared for it (with its credentials); the other is reached only through its own host or prefix"
            );
        }
        t
    }

    /// Pairs of shared-listener routes that a forward-proxy request cannot tell apart (same
    /// upstream host, port and base path): the first declared takes all such requests.
    fn forward_shadowed(&self) -> Vec<(usize, usize)> {
        let dedicated = |i: usize| self.dedicated.values().any(|&d| d == i);
        let mut pairs = Vec::new();
        for list in self.by_upstream_host.values() {
            for (n, &b) in list.iter().enumerate() {
                let first = list[..n].iter().copied().find(|&a| {
                    !dedicated(a) && !dedicated(b) && self.upstreams[a] == self.upstreams[b]
                });
                if let Some(a) = first {
                    pairs.push((a, b));
                }
            }
        }
        pairs.sort_unstable();
        pairs
    }

    /// Finds the route for a request.
    pub fn find<'u>(
        &self,
        via: &Via,
        version: Version,
        uri: &'u Uri,
        headers: &HeaderMap,
    ) -> Result<Matched<'u>, ProxyError> {
        let path = uri.path();
        check_path(path)?;
        // Absolute form over HTTP/1 is a forward-proxy request (HTTP/2 always carries an authority).
        if version != Version::HTTP_2 {
            if let Some(authority) = uri.authority() {
                if authority.as_str().contains('@') {
                    return Err(ProxyError::BadRequest(
                        "credentials in the request URL are not accepted",
                    ));
                }
                if !matches!(uri.scheme_str(), Some("http" | "https")) {
                    return Err(ProxyError::BadRequest(
                        "a forward-proxy request needs an http:// URL",
                    ));
                }
                if !port_is_valid(authority.as_str()) {
                    return Err(ProxyError::BadRequest("the URL's port is not a valid port"));
                }
                return self.find_forward(via, uri, path);
            }
        }
        match via {
            Via::Dedicated(name) => {
                let route = *self.dedicated.get(name).ok_or(ProxyError::NoRoute)?;
                Ok(Matched {
                    route,
                    rest: path,
                    add_base_path: true,
                })
            }
            Via::Shared => self.find_shared(request_host(version, uri, headers), path),
        }
    }

    fn find_shared<'u>(
        &self,
        host: Option<&str>,
        path: &'u str,
    ) -> Result<Matched<'u>, ProxyError> {
        for (route, rhost, prefix) in &self.shared {
            if let Some(rhost) = rhost {
                // Configured hosts are lowercase; the request's may be in any case.
                if !host.is_some_and(|h| h.eq_ignore_ascii_case(rhost)) {
                    continue;
                }
            }
            let rest = match prefix.as_deref() {
                None | Some("/") => path,
                Some(p) => match path.strip_prefix(p) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                    _ => continue,
                },
            };
            return Ok(Matched {
                route: *route,
                rest,
                add_base_path: true,
            });
        }
        Err(ProxyError::NoRoute)
    }

    fn find_forward<'u>(
        &self,
        via: &Via,
        uri: &'u Uri,
        path: &'u str,
    ) -> Result<Matched<'u>, ProxyError> {
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = uri.port_u16().filter(|&p| p != default_port);
        let forbidden = || ProxyError::ForbiddenHost(host.clone());
        let candidates = self
            .by_upstream_host
            .get(host.as_str())
            .ok_or_else(forbidden)?;
        let route = candidates
            .iter()
            .copied()
            .filter(|&i| port.is_none_or(|p| self.upstreams[i].0 == p))
            .filter(|&i| match via {
                Via::Dedicated(name) => self.dedicated.get(name) == Some(&i),
                Via::Shared => !self.dedicated.values().any(|&d| d == i),
            })
            .find(|&i| segment_prefix(path, &self.upstreams[i].1))
            .ok_or_else(forbidden)?;
        Ok(Matched {
            route,
            rest: path,
            add_base_path: false,
        })
    }
}

/// The request's host name (no port, no trailing dot, in the caller's case): the Host header,
/// or the URI authority in HTTP/2.
fn request_host<'a>(version: Version, uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match (version, uri.host()) {
        (Version::HTTP_2, Some(h)) => h,
        _ => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| &h[1..])?
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    Some(host.trim_end_matches('.'))
}

/// Whether an authority's port, if any, is a valid port number (`http` parses "99999"
/// without complaint and then reports no port at all).
fn port_is_valid(authority: &str) -> bool {
    let after_host = authority
        .rfind(']')
        .map_or(authority, |i| &authority[i + 1..]);
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => port.is_empty() || port.parse::<u16>().is_ok(),
    }
}

/// `base` is "" or a path that `path` starts with on a segment boundary.
pub(crate) fn segment_prefix(path: &str, base: &str) -> bool {
    base.is_empty()
        || path
            .strip_prefix(base)
            .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

/// Refuses dot segments, however an upstream might see them (plain, percent-encoded, or
/// beside an encoded slash or a backslash), so no path can climb out of its route.
fn check_path(path: &str) -> Result<(), ProxyError> {
    // A dot segment needs a '.', literal or encoded (%2e): most paths have neither.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return Ok(());
    }
    let is_dot = |seg: &str| seg == "." || seg == "..";
    if path.split('/').any(is_dot) || decoded_path(path).split(['/', '\\']).any(is_dot) {
        return Err(ProxyError::BadRequest(
            "the path has dot segments ('.' or '..'), which credgate does not forward",
        ));
    }
    Ok(())
}

/// The path as an upstream that decodes it would read it: percent-decoded (lossily), with
/// runs of slashes collapsed. Policy globs are matched against this.
pub fn decoded_path(path: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut out = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn table(toml_routes: &str) -> (RouteTable, Vec<String>) {
        let cfg = crate::config::parse(
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n{toml_routes}"),
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let names = cfg.routes.iter().map(|r| r.name.to_string()).collect();
        (RouteTable::new(&cfg.routes), names)
    }

    fn route(name: &str, extra: &str, upstream: &str) -> String {
        format!("[[route]]\nname = \"{name}\"\n{extra}\nupstream = \"{upstream}\"\nauth = {{ type = \"none\" }}\n")
    }

    fn find(
        t: &(RouteTable, Vec<String>),
        host: &str,
        uri: &str,
    ) -> Result<(String, String), ProxyError> {
        let uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
        let m = t.0.find(&Via::Shared, Version::HTTP_11, &uri, &h)?;
        Ok((t.1[m.route].clone(), m.rest.to_owned()))
    }

    #[test]
    fn routes_a_forward_proxy_request_cannot_tell_apart_are_named() {
        let t = table(
            &[
                route("root", "prefix = \"/r\"", "http://api:8080/v1"),
                route("read", "prefix = \"/ro\"", "http://api:8080/v1"),
                route("other-port", "prefix = \"/p\"", "http://api:9090/v1"),
                route("other-base", "prefix = \"/b\"", "http://api:8080/v2"),
                route("own", "listen = \"127.0.0.1:0\"", "http://api:8080/v1"),
            ]
            .concat(),
        );
        let named: Vec<_> =
            t.0.forward_shadowed()
                .into_iter()
                .map(|(a, b)| (t.1[a].as_str(), t.1[b].as_str()))
                .collect();
        assert_eq!(named, [("root", "read")]);
        // And the first declared is the one chosen.
        let uri: Uri = "http://api:8080/v1/x".parse().unwrap();
        let headers = HeaderMap::new();
        let m =
            t.0.find(&Via::Shared, Version::HTTP_11, &uri, &headers)
                .unwrap();
        assert_eq!(t.1[m.route], "root");
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = table(
            &[
                route("api", "prefix = \"/api\"", "http://a"),
                route("api-v2", "prefix = \"/api/v2\"", "http://b"),
                route("root", "prefix = \"/\"", "http://c"),
            ]
            .concat(),
        );
        assert_eq!(
            find(&t, "x", "/api/v2/x").unwrap(),
            ("api-v2".into(), "/x".into())
        );
        assert_eq!(
            find(&t, "x", "/api/v2").unwrap(),
            ("api-v2".into(), "".into())
        );
        assert_eq!(
            find(&t, "x", "/api/v2x").unwrap(),
            ("api".into(), "/v2x".into())
        );
        assert_eq!(
            find(&t, "x", "/apix").unwrap(),
            ("root".into(), "/apix".into())
        );
    }

    #[test]
    fn host_routes_beat_host_agnostic_ones() {
        let t = table(
            &[
                route("any", "prefix = \"/api\"", "http://a"),
                route("h", "host = \"op.localhost\"", "http://b"),
            ]
            .concat(),
        );
        assert_eq!(find(&t, "OP.localhost:8080", "/api/x").unwrap().0, "h");
        assert_eq!(find(&t, "other", "/api/x").unwrap().0, "any");
        assert!(matches!(
            find(&t, "other", "/nope"),
            Err(ProxyError::NoRoute)
        ));
    }

    #[test]
    fn segment_prefix_respects_segment_boundaries() {
        assert!(segment_prefix("/ws", "/ws"));
        assert!(segment_prefix("/ws/x", "/ws"));
        assert!(!segment_prefix("/wsx", "/ws"));
        assert!(!segment_prefix("/ws-status", "/ws"));
        assert!(segment_prefix("/anything", ""));
    }

    #[test]
    fn dot_segments_are_refused_even_encoded() {
        let t = table(&route("api", "prefix = \"/api\"", "http://a"));
        for p in [
            "/api/../other",
            "/api/%2e%2e/x",
            "/api/%2E./x",
            "/api/./x",
            "/api/..%2fother",
            "/api/..%5cother",
            "/api/..%2Fother",
            "/api%2f..%2fother",
        ] {
            assert!(
                matches!(find(&t, "x", p), Err(ProxyError::BadRequest(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn forward_mode_matches_upstream_host_and_refuses_others() {
        let t = table(
            &[
                route("ob", "prefix = \"/api\"", "https://api.oblien.com"),
                route("local", "prefix = \"/l\"", "http://127.0.0.1:9000/v1"),
            ]
            .concat(),
        );
        assert_eq!(
            find(&t, "ignored", "http://api.oblien.com/workspace?x=1").unwrap(),
            ("ob".into(), "/workspace".into())
        );
        assert_eq!(
            find(&t, "ignored", "http://127.0.0.1:9000/v1/x").unwrap().0,
            "local"
        );
        assert!(matches!(
            find(&t, "x", "http://127.0.0.1:9001/v1/x"),
            Err(ProxyError::ForbiddenHost(_))
        ));
        assert!(matches!(
            find(&t, "x", "http://127.0.0.1:9000/other"),
            Err(ProxyError::ForbiddenHost(_))
        ));
        assert!(matches!(
            find(&t, "x", "http://evil.example/x"),
            Err(ProxyError::ForbiddenHost(_))
        ));
        assert!(matches!(
            find(&t, "x", "http://u:p@api.oblien.com/x"),
            Err(ProxyError::BadRequest(_))
        ));
    }
}
