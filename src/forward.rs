//! Talking to upstreams: the pooled TLS client, hop-by-hop headers, the upstream URI.

use std::sync::{Arc, OnceLock};

use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::body::UpstreamBody;
use crate::config::{Timeouts, Upstream};
use crate::pool::{H1Pool, Lease, PoolError, TimedOut};

/// Idle connections kept per upstream and worker thread (as nginx's `keepalive 128` per worker):
/// a burst of concurrent requests opens as many connections as it needs, but only this many stay
/// open afterwards.
const MAX_IDLE_PER_UPSTREAM: usize = 128;

/// A pooled upstream client: HTTP/1.1, or HTTP/2 where the upstream offers it via ALPN.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// The clients of one route: `plain` for ordinary requests to the route's own `http://`
/// upstream, `pooled` for the others, `http1` for upgrades (WebSocket handshakes need
/// HTTP/1.1 even where the upstream speaks HTTP/2).
#[derive(Clone)]
pub struct Clients {
    pub pooled: HttpClient,
    pub http1: HttpClient,
    plain: Option<Arc<H1Pool>>,
}

/// What an exchange needs of the connection it goes out on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConnNeed {
    /// A kept connection will do.
    Any,
    /// A new one: a kept connection closed under this request's first try, and others kept
    /// to the same upstream may be closing too (an upstream restarting closes them all).
    New,
    /// HTTP/1.1, for a protocol switch (WebSocket handshakes), even where the upstream speaks
    /// HTTP/2.
    Upgrade,
}

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// Whether the connection could not be made (nothing reached the upstream).
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Pool(e) => e.is_connect(),
            Self::Client(e) => e.is_connect(),
        }
    }

    /// Whether a reused connection closed as the request went out (see [`PoolError::is_stale`]).
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Pool(e) if e.is_stale())
    }

    /// The message with all its causes, for a log line (none of them names a secret).
    pub fn chain(&self) -> String {
        let mut chain = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        chain
    }
}

impl Clients {
    /// The clients for a route whose own upstream is `upstream`.
    pub fn for_route(
        upstream: &Upstream,
        timeouts: &Timeouts,
        ca: Option<&[CertificateDer<'static>]>,
    ) -> Result<Self, rustls::Error> {
        let mut clients = Self::new(timeouts, ca)?;
        if upstream.scheme == http::uri::Scheme::HTTP {
            clients.plain = Some(Arc::new(H1Pool::new(
                &upstream.host,
                upstream.port,
                timeouts.connect,
                timeouts.idle,
                MAX_IDLE_PER_UPSTREAM,
            )));
        }
        Ok(clients)
    }

    /// Sends `req`, whose URI is origin-form (`/path?query`), to `upstream`; `own` says whether
    /// that is the route's own upstream, `now` is when (a clock read the caller made anyway).
    /// Returns the response and, for a pooled plaintext connection, the lease to hand back
    /// once the response body has been read; or [`TimedOut`] if the response has not begun by
    /// `deadline`.
    pub async fn send(
        &self,
        upstream: &Upstream,
        own: bool,
        need: ConnNeed,
        mut req: Request<UpstreamBody>,
        now: std::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<Result<(Response<Incoming>, Option<Lease>), UpstreamError>, TimedOut> {
        if let (Some(pool), true) = (&self.plain, own) {
            if need != ConnNeed::Upgrade {
                let sent = pool.send(req, now, deadline, need == ConnNeed::New).await?;
                return Ok(sent
                    .map(|(res, lease)| (res, Some(lease)))
                    .map_err(Into::into));
            }
        }
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.scheme = Some(upstream.scheme.clone());
        uri.authority = Some(upstream.authority.clone());
        *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path are set");
        let client = if need == ConnNeed::Upgrade {
            &self.http1
        } else {
            &self.pooled
        };
        let sent = tokio::time::timeout_at(deadline, client.request(req))
            .await
            .map_err(|_| TimedOut)?;
        Ok(sent.map(|res| (res, None)).map_err(Into::into))
    }

    /// Idle connections held for the route's own plaintext upstream.
    pub fn idle_plain(&self) -> usize {
        self.plain.as_ref().map_or(0, |p| p.idle_count())
    }

    pub fn new(
        timeouts: &Timeouts,
        ca: Option<&[CertificateDer<'static>]>,
    ) -> Result<Self, rustls::Error> {
        let tls = tls_config(ca)?;
        let build = |http2: bool| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(timeouts.connect));
            let b = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            let connector = if http2 {
                b.enable_all_versions().wrap_connector(http)
            } else {
                b.enable_http1().wrap_connector(http)
            };
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(timeouts.idle)
                .pool_max_idle_per_host(MAX_IDLE_PER_UPSTREAM)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(connector)
        };
        Ok(Self {
            pooled: build(true),
            http1: build(false),
            plain: None,
        })
    }
}

fn tls_config(
    ca: Option<&[CertificateDer<'static>]>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = system_roots().clone();
    for cert in ca.unwrap_or_default() {
        roots.add(cert.clone())?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Mozilla's roots (webpki-roots) plus the OS store, read once.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, "loaded OS trust store");
        roots
    })
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// proxy credentials a caller may send to credgate itself.
/// A `static`, not a `const`: a `const` array would be built (and dropped) at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const CONNECTION_INDEX: usize = 0;
const UPGRADE_INDEX: usize = 8;

/// Whether a header is hop-by-hop (never forwarded, never injectable).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_index(name).is_some()
}

/// The header's place in [`HOP_BY_HOP`]. Most names differ in length from every hop-by-hop
/// name, so one comparison rules them out (this runs for every header of every message).
fn hop_index(name: &HeaderName) -> Option<usize> {
    let name = name.as_str();
    if !matches!(name.len(), 2 | 7 | 10 | 16..=19) {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| h.as_str() == name)
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive (for a handshake).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the few headers present notes which hop-by-hop names occur (most messages
    // carry none, or only `Connection: keep-alive`); only those are removed.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Connection goes in every case: taken out with all its values in one lookup, which are
    // then read for the names it adds. Every Connection header counts, not only the first.
    // Tokens naming a fixed hop-by-hop header (`keep-alive`, `close`...) need no lookup.
    let mut named: Vec<HeaderName> = Vec::new();
    if present & (1 << CONNECTION_INDEX) != 0 {
        present &= !(1 << CONNECTION_INDEX);
        if let http::header::Entry::Occupied(e) = headers.entry(header::CONNECTION) {
            for value in e.remove_entry_mult().1 {
                // What most messages carry: no header named, nothing to parse.
                let v = value.as_bytes();
                if v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close") {
                    continue;
                }
                let tokens = value.to_str().unwrap_or("").split(',').map(str::trim);
                named.extend(
                    tokens
                        .filter(|t| {
                            !t.is_empty()
                                && !t.eq_ignore_ascii_case("close")
                                && !HOP_BY_HOP
                                    .iter()
                                    .any(|h| h.as_str().eq_ignore_ascii_case(t))
                        })
                        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
                );
            }
        }
    }
    for n in named {
        headers.remove(n);
    }
    let upgrade = (keep_upgrade && present & (1 << UPGRADE_INDEX) != 0)
        .then(|| headers.remove(header::UPGRADE))
        .flatten();
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
}

/// Whether a request asks to switch protocols (WebSocket and friends).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The upstream URI: `scheme://authority[base]path[?query]`.
pub fn upstream_uri(
    up: &Upstream,
    base: bool,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(path_and_query(up, base, path, query)?)
        .build()
}

/// The upstream request target: `[base]path[?query]`.
pub fn path_and_query(
    up: &Upstream,
    base: bool,
    path: &str,
    query: Option<&str>,
) -> Result<PathAndQuery, http::uri::InvalidUri> {
    let base = if base { up.base_path.as_str() } else { "" };
    let path = if path.is_empty() && base.is_empty() {
        "/"
    } else {
        path
    };
    let mut pq = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    /// `keep-alive` and `close` alone name no header; a later Connection header still does.
    #[test]
    fn every_connection_header_counts_after_a_plain_keep_alive() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("CLOSE"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn headers_named_by_any_connection_header_are_stripped() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        assert_eq!(HOP_BY_HOP[UPGRADE_INDEX], header::UPGRADE);
    }

    #[test]
    fn every_hop_by_hop_name_is_recognised() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["host", "x-connection", "trailers", "tes", "content-length"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn upgrade_survives_when_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn base_path_and_query_are_joined() {
        let up = Upstream::parse("http://127.0.0.1:9000/v1").unwrap();
        assert_eq!(
            upstream_uri(&up, true, "/x", Some("q=1")).unwrap(),
            "http://127.0.0.1:9000/v1/x?q=1"
        );
        assert_eq!(
            upstream_uri(&up, true, "", None).unwrap(),
            "http://127.0.0.1:9000/v1"
        );
        assert_eq!(
            upstream_uri(&up, false, "/v1/y", None).unwrap(),
            "http://127.0.0.1:9000/v1/y"
        );
        let root = Upstream::parse("https://api.oblien.com").unwrap();
        assert_eq!(
            upstream_uri(&root, true, "", Some("a")).unwrap(),
            "https://api.oblien.com/?a"
        );
    }
}
