//! The request path, top to bottom: local token and framing checks -> route -> policy ->
//! [turn (cool-down, pace) -> body -> credentials -> forward -> retry?] -> respond -> log, count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::{self, Body, CallerBody, UpstreamBody};
use crate::config::{Config, Route, Upstream};
use crate::conn::{ConnRef, KeptConn};
use crate::error::ProxyError;
use crate::forward::{self, Clients, ConnNeed};
use crate::metrics::{Metrics, RouteMetrics};
use crate::retry::CoolDown;
use crate::route::{RouteTable, Via};
use crate::secret::Secret;
use crate::telemetry::RequestLine;

/// Everything the request path needs, built once from a checked [`Config`].
pub struct Proxy {
    routes: Vec<RouteState>,
    table: RouteTable,
    local_token: Option<LocalToken>,
    /// Counts requests that matched no route.
    unrouted: RouteMetrics,
}

/// The token callers must present, and the extra header it may come in.
struct LocalToken {
    token: Secret,
    header: Option<http::HeaderName>,
}

/// A route and what credgate keeps for it while running.
pub struct RouteState {
    pub route: Route,
    clients: Clients,
    pub cool_down: Arc<CoolDown>,
    pub metrics: RouteMetrics,
}

/// The per-request record behind the one log line each request gets.
struct Outcome<'a> {
    route: Option<&'a RouteState>,
    upstream: Option<Duration>,
    /// When the last upstream exchange ended: the request's end too, unless something failed
    /// after it (what little follows an answer is not worth a clock read).
    answered: Option<Instant>,
    attempts: u32,
}

impl Proxy {
    /// Builds the request path for `config`. With `previous` (a reload), routes whose auth
    /// is unchanged keep their authenticator, and so their cached tokens.
    pub fn new(
        config: Config,
        metrics: &Metrics,
        previous: Option<&Proxy>,
    ) -> Result<Self, crate::StartError> {
        let table = RouteTable::new(&config.routes);
        let local_token = config.server.local_token.map(|token| LocalToken {
            token,
            header: config.server.local_token_header,
        });
        let routes = config
            .routes
            .into_iter()
            .map(|mut route| {
                // A reload keeps what an unchanged route has learnt: its cached tokens, its
                // cool-down, its pace.
                let old = previous
                    .into_iter()
                    .flat_map(|p| &p.routes)
                    .find(|old| old.route.name == route.name);
                if let Some(old) = old {
                    if old.route.auth_spec == route.auth_spec
                        && old.route.auth_digest == route.auth_digest
                    {
                        route.auth = old.route.auth.clone();
                    }
                    if let (Some(o), Some(n)) = (&old.route.rate_limit, &route.rate_limit) {
                        if o.spec == n.spec {
                            route.rate_limit = Some(o.clone());
                        }
                    }
                }
                let clients =
                    Clients::for_route(&route.upstream, &route.timeouts, route.ca.as_deref())
                        .map_err(|e| crate::StartError::Tls(route.name.to_string(), e))?;
                Ok(RouteState {
                    clients,
                    // The gate is the upstream's word: kept only while the upstream is the same.
                    cool_down: old
                        .filter(|o| o.route.upstream.to_string() == route.upstream.to_string())
                        .map_or_else(Default::default, |o| o.cool_down.clone()),
                    metrics: metrics.route(&route.name),
                    route,
                })
            })
            .collect::<Result<_, crate::StartError>>()?;
        Ok(Self {
            routes,
            table,
            local_token,
            unrouted: metrics.route("-"),
        })
    }

    /// Begins background work: fetching first tokens for routes that prefetch.
    pub fn start(&self) {
        for r in &self.routes {
            r.route.auth.start();
        }
    }

    /// The routes, for status and metrics.
    pub fn routes(&self) -> &[RouteState] {
        &self.routes
    }

    /// Handles one request from a caller; never fails (errors become JSON responses).
    pub async fn handle(
        &self,
        via: &Via,
        mut req: Request<Incoming>,
        conn: ConnRef<'_>,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // Taken out (not cloned): the request path reads it, the log line names its path.
        let uri = std::mem::take(req.uri_mut());
        let mut outcome = Outcome {
            route: None,
            upstream: None,
            answered: None,
            attempts: 0,
        };
        let res = match self.forward(via, &uri, req, conn, &mut outcome).await {
            Ok(res) => res,
            Err(e) => {
                let route = outcome.route.map(|r| &*r.route.name);
                tracing::debug!(route, error = %e, "request refused");
                e.into_response(route)
            }
        };
        outcome
            .route
            .map_or(&self.unrouted, |r| &r.metrics)
            .observe(res.status().as_u16(), outcome.upstream);
        RequestLine {
            route: outcome.route.map_or("-", |r| &r.route.name),
            method: &method,
            path: uri.path(),
            status: res.status().as_u16(),
            attempts: outcome.attempts,
            upstream_us: outcome.upstream.map(|d| d.as_micros() as u64),
            total_us: (outcome.answered.unwrap_or_else(Instant::now) - started).as_micros() as u64,
        }
        .log();
        res
    }

    async fn forward<'a>(
        &'a self,
        via: &Via,
        uri: &Uri,
        mut req: Request<Incoming>,
        conn: ConnRef<'_>,
        out: &mut Outcome<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(local) = &self.local_token {
            local.check(uri, &req)?;
        }
        if req.method() == http::Method::CONNECT {
            return Err(ProxyError::ConnectNotSupported);
        }
        check_framing(&req)?;
        let upgrade = forward::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // 1. Route.
        let matched = self.table.find(via, parts.version, uri, &parts.headers)?;
        let state = &self.routes[matched.route];
        let route = &state.route;
        out.route = Some(state);
        // 2. Policy, before anything is spent on the request (a turn, a token, its body).
        if let Some(why) = route.policy.refuses_method(&parts.method) {
            return Err(ProxyError::ForbiddenByPolicy(why));
        }
        if route.policy.has_path_rules() {
            let rest = route.auth.upstream_path(matched.rest)?;
            let base = if matched.add_base_path {
                route.upstream.base_path.as_str()
            } else {
                ""
            };
            // Matched as the upstream will read it: decoded, slashes collapsed.
            let path = crate::route::decoded_path(&format!("{base}{rest}"));
            let path = if path.is_empty() { "/" } else { &path };
            if let Some(why) = route.policy.refuses_path(path) {
                return Err(ProxyError::ForbiddenByPolicy(why));
            }
        }

        prepare_headers(
            &mut parts,
            route,
            upgrade,
            self.local_token.as_ref().and_then(|l| l.header.as_ref()),
        );

        let mut body = ReqBody::Once(Some(body));
        let mut attempt = 0;
        let mut refreshed = false;
        let mut resent = false;
        loop {
            attempt += 1;
            out.attempts = attempt;
            // 3. Wait for the route's turn: its cool-down (an upstream said "wait") and its pace,
            //    so every try, retries included, stays under the upstream's limit.
            state.wait_turn().await.inspect_err(|_| {
                state.metrics.local_throttles.inc();
            })?;

            // 4. On the first try, keep small bodies so the request can be replayed; stream the
            //    rest once.
            if attempt == 1 && !refreshed && !upgrade {
                body = body
                    .keep_if_small(
                        &parts.headers,
                        route.retry.max_replay_body,
                        route.timeouts.request,
                    )
                    .await?;
            }

            // 5. Credentials: a cached token or static headers; waits only when none is usable.
            let mut path = matched.rest;
            let grant = route.auth.grant(&mut path).await?;
            let upstream: &Upstream = grant.upstream.as_deref().unwrap_or(&route.upstream);
            let base = matched.add_base_path && !upstream.base_path.is_empty();
            let target = match (&grant.query_token, uri.path_and_query()) {
                // Nothing taken from the path, nothing added: the caller's target, shared. Not
                // an absolute-form target without a path (`http://host?a=1`, whose `?a=1` is no
                // HTTP/2 `:path`) nor `*`.
                (None, Some(pq)) if !base && pq.as_str().starts_with('/') && path == pq.path() => {
                    pq.clone()
                }
                (token, _) => {
                    let query = match token {
                        Some(t) => Some(with_token_param(uri.query(), t.expose())),
                        None => uri.query().map(str::to_owned),
                    };
                    forward::path_and_query(upstream, matched.add_base_path, path, query.as_deref())
                        .map_err(|_| {
                            ProxyError::BadRequest("the request path cannot be forwarded")
                        })?
                }
            };
            // Sized once for what is added: growing a full map moves and rehashes it.
            let added = grant.headers.len() + 1;
            let mut headers = if body.replayable() {
                // A copy goes upstream; the caller's headers stay for a replay.
                let mut copy = HeaderMap::with_capacity(parts.headers.len() + added);
                for (name, value) in &parts.headers {
                    copy.append(name.clone(), value.clone());
                }
                copy
            } else {
                let mut headers = std::mem::take(&mut parts.headers);
                headers.reserve(added);
                headers
            };
            if grant.upstream.is_some() {
                headers.insert(header::HOST, upstream.host_header.clone());
            }
            for (name, value) in grant.headers.iter() {
                headers.insert(name.clone(), value.clone());
            }
            let mut up_req = Request::new(body.next());
            *up_req.method_mut() = parts.method.clone();
            *up_req.uri_mut() = target.into();
            *up_req.version_mut() = Version::HTTP_11;
            *up_req.headers_mut() = headers;

            // 6. Forward.
            let own = grant.upstream.is_none();
            let need = if upgrade {
                ConnNeed::Upgrade
            } else if resent {
                ConnNeed::New
            } else {
                ConnNeed::Any
            };
            let sent = Instant::now();
            let deadline = sent + route.timeouts.request;
            let result = state
                .clients
                .send(upstream, own, need, up_req, sent.into_std(), deadline)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(route.timeouts.request))?;
            let answered = Instant::now();
            out.upstream = Some(answered - sent);
            out.answered = Some(answered);
            let (res, lease) = match result {
                Ok(sent) => sent,
                Err(e) if body.caller_failed() => {
                    tracing::debug!(route = %route.name, error = %e, "the caller's request body failed");
                    return Err(ProxyError::BadRequest(
                        "the request body was malformed or ended early",
                    ));
                }
                // The upstream closed an idle connection just as this went out on it: once, at
                // once, on a new connection, if repeating it is safe.
                Err(e)
                    if e.is_stale()
                        && !resent
                        && body.replayable()
                        && parts.method.is_idempotent() =>
                {
                    tracing::debug!(route = %route.name, error = %e.chain(), "resending on a new connection");
                    resent = true;
                    attempt -= 1;
                    continue;
                }
                Err(e) => {
                    let err = upstream_error(&route.name, e);
                    // Nothing reached the upstream: safe to try again with a kept body.
                    let connect_failed = matches!(err, ProxyError::UpstreamUnreachable);
                    if connect_failed && body.replayable() && attempt < route.retry.max_attempts {
                        // No upstream asked for this wait: it is credgate's backoff, and no
                        // longer than any one wait may be.
                        let wait = route
                            .retry
                            .wait_after(attempt, None)
                            .min(route.retry.max_wait);
                        retry_pause(state, attempt, wait, "connection failed").await;
                        continue;
                    }
                    return Err(err);
                }
            };

            // 7. Retry? A 401 to a fetched token: refresh once and replay.
            let status = res.status();
            //    The token is dropped even when the body cannot be replayed (a WebSocket, a
            //    streamed upload), so the caller's next request gets a fresh one.
            if status == StatusCode::UNAUTHORIZED
                && !refreshed
                && route.auth.rejected(&grant)
                && body.replayable()
            {
                refreshed = true;
                attempt -= 1;
                continue;
            }
            // 429/503: the upstream did not process it; wait as told and replay if allowed.
            if route.retry.statuses.contains(&status) {
                if status == StatusCode::TOO_MANY_REQUESTS {
                    state.metrics.upstream_429.inc();
                }
                let retry_after = res
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| crate::retry::parse_retry_after(v, std::time::SystemTime::now()));
                let wait = route.retry.wait_after(attempt, retry_after);
                if retry_after.is_some() {
                    state.cool_down.close_for(wait);
                }
                if attempt < route.retry.max_attempts
                    && body.replayable()
                    && wait <= route.retry.max_wait
                {
                    retry_pause(state, attempt, wait, status.as_str()).await;
                    continue;
                }
            }

            // 8. Respond.
            return Ok(respond(res, lease, client_upgrade, route, conn));
        }
    }
}

impl LocalToken {
    /// Accepts `Proxy-Authorization: Bearer <t>`, `Basic` with `<t>` as the password (so
    /// `HTTP_PROXY=http://x:<t>@127.0.0.1:8080` works), or the configured header. Compared in
    /// constant time. Forward-proxy requests get 407, others 401.
    fn check(&self, uri: &Uri, req: &Request<Incoming>) -> Result<(), ProxyError> {
        let h = req.headers();
        let from_proxy_auth = h.get(header::PROXY_AUTHORIZATION).and_then(|v| {
            let v = v.to_str().ok()?;
            let (scheme, cred) = v.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("bearer") {
                Some(cred.trim().as_bytes().to_vec())
            } else if scheme.eq_ignore_ascii_case("basic") {
                let decoded =
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, cred.trim())
                        .ok()?;
                let (_user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
                Some(pass.as_bytes().to_vec())
            } else {
                None
            }
        });
        let from_header = self
            .header
            .as_ref()
            .and_then(|name| h.get(name))
            .map(|v| v.as_bytes().to_vec());
        let want = self.token.expose().as_bytes();
        let ok = [from_proxy_auth, from_header]
            .into_iter()
            .flatten()
            .any(|got| subtle::ConstantTimeEq::ct_eq(got.as_slice(), want).into());
        if ok {
            Ok(())
        } else {
            Err(ProxyError::LocalTokenRequired {
                forward_proxy: uri.authority().is_some() && req.version() != Version::HTTP_2,
            })
        }
    }
}

/// Refuses requests whose framing an upstream could read differently than hyper did.
fn check_framing(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let h = req.headers();
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1 (absolute-form requests included).
    if req.version() == Version::HTTP_11 {
        let mut hosts = h.get_all(header::HOST).iter();
        if hosts.next().is_none() || hosts.next().is_some() {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 request needs exactly one Host header",
            ));
        }
    }
    // hyper decodes only `chunked`; another coding would reach the upstream undeclared.
    let other_coding = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .any(|c| !c.trim().eq_ignore_ascii_case("chunked"));
    if other_coding {
        return Err(ProxyError::UnsupportedTransferCoding);
    }
    Ok(())
}

/// Removes what must not reach the upstream and sets what must.
fn prepare_headers(
    parts: &mut Parts,
    route: &Route,
    upgrade: bool,
    local_header: Option<&http::HeaderName>,
) {
    let headers = &mut parts.headers;
    forward::strip_hop_by_hop(headers, upgrade);
    let injects = route.auth.injects();
    let strips_authorization = route.auth.strips_authorization();
    // Callers rarely send any of these: one pass over the few headers there are costs less
    // than a lookup per name.
    let removed = |name: &http::HeaderName| {
        injects.contains(name)
            || (strips_authorization && name == header::AUTHORIZATION)
            || local_header == Some(name)
    };
    if headers.keys().any(removed) {
        if let Some(name) = local_header {
            headers.remove(name);
        }
        for name in injects {
            headers.remove(name);
        }
        if strips_authorization {
            headers.remove(header::AUTHORIZATION);
        }
    }
    headers.insert(header::HOST, route.upstream.host_header.clone());
}

/// Passes the upstream's response on, tunnelling the connection if it switched protocols.
fn respond(
    mut res: Response<Incoming>,
    lease: Option<crate::pool::Lease>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    route: &Route,
    conn: ConnRef<'_>,
) -> Response<Body> {
    let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        tunnel(
            route.name.to_string(),
            client_upgrade,
            hyper::upgrade::on(&mut res),
            conn.keep(),
        );
    }
    let (mut parts, body) = res.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers, switching);
    Response::from_parts(
        parts,
        Either::Left(body::IdleLimited::new(body, route.timeouts.request, lease)),
    )
}

async fn retry_pause(state: &RouteState, attempt: u32, wait: Duration, why: &str) {
    state.metrics.retries.inc();
    tracing::info!(route = %state.route.name, attempt, wait_ms = wait.as_millis() as u64, why, "retrying");
    // If the caller goes away meanwhile, hyper drops this future: no upstream request follows.
    tokio::time::sleep(wait).await;
}

impl RouteState {
    /// Waits until the cool-down gate is open and the pacer grants a slot, with the gate still
    /// open; fails at once when either wait would exceed `max_wait`.
    async fn wait_turn(&self) -> Result<(), ProxyError> {
        let max_wait = self.route.retry.max_wait;
        loop {
            self.cool_down.pass(max_wait).await?;
            if let Some(pacer) = &self.route.rate_limit {
                pacer.acquire(max_wait).await?;
            }
            if self.cool_down.remaining().is_none() {
                return Ok(());
            }
        }
    }
}

/// A request body: kept in memory (replayable), or streamed through once.
enum ReqBody {
    Kept(Bytes),
    Once(Option<Incoming>),
    /// Sent; the flag says whether reading it from the caller failed.
    Sent(Arc<AtomicBool>),
}

impl ReqBody {
    /// Keeps a body whose declared length is at most `max`; streams the rest.
    async fn keep_if_small(
        self,
        headers: &HeaderMap,
        max: u64,
        within: Duration,
    ) -> Result<Self, ProxyError> {
        let Self::Once(Some(body)) = self else {
            return Ok(self);
        };
        if body.is_end_stream() {
            return Ok(Self::Kept(Bytes::new()));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match declared {
            Some(len) if len <= max => {
                let collect = Limited::new(body, max as usize).collect();
                let bytes = tokio::time::timeout(within, collect)
                    .await
                    .map_err(|_| ProxyError::BodyTimeout(within))?
                    .map_err(|_| {
                        ProxyError::BadRequest(
                            "the request body ended early or was longer than declared",
                        )
                    })?
                    .to_bytes();
                Ok(Self::Kept(bytes))
            }
            _ => Ok(Self::Once(Some(body))),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Kept(_))
    }

    /// The body for the next attempt (a streamed body is only ever sent once).
    fn next(&mut self) -> UpstreamBody {
        match self {
            Self::Kept(b) => body::full(b.clone()),
            Self::Once(b) => match b.take() {
                Some(incoming) => {
                    let (body, failed) = CallerBody::new(incoming);
                    *self = Self::Sent(failed);
                    Either::Left(body)
                }
                None => body::empty(),
            },
            Self::Sent(_) => body::empty(),
        }
    }

    /// Whether the caller's streamed body failed while being sent (so an upstream error is
    /// really the caller's).
    fn caller_failed(&self) -> bool {
        matches!(self, Self::Sent(f) if f.load(Ordering::Relaxed))
    }
}

/// The query with any `token` parameter the caller sent replaced by credgate's.
fn with_token_param(query: Option<&str>, token: &str) -> String {
    let mut q: String = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some("token"))
        .flat_map(|kv| [kv, "&"])
        .collect();
    q.push_str("token=");
    q.extend(form_urlencoded::byte_serialize(token.as_bytes()));
    q
}

/// Logs why the upstream failed (the error chain names no secret) and classifies it.
fn upstream_error(route: &str, e: forward::UpstreamError) -> ProxyError {
    tracing::warn!(route, error = %e.chain(), "upstream request failed");
    if e.is_connect() {
        ProxyError::UpstreamUnreachable
    } else {
        ProxyError::UpstreamFailed
    }
}

/// Copies bytes both ways between an upgraded caller and upstream until either side closes, or
/// a shutdown begins: a tunnel has no end to wait for, so it is closed then (its caller can
/// reconnect elsewhere). Until it ends it keeps the caller's connection counted, seated and
/// waited for by the shutdown (`conn`).
fn tunnel(
    route: String,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    conn: KeptConn,
) {
    tokio::spawn(async move {
        let copy = async {
            match tokio::try_join!(client, upstream) {
                Ok((c, u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        Ok((up, down)) => {
                            tracing::debug!(route, up, down, "upgraded connection closed")
                        }
                        Err(e) => tracing::debug!(route, error = %e, "upgraded connection ended"),
                    }
                }
                Err(e) => tracing::warn!(route, error = %e, "upgrade failed"),
            }
        };
        tokio::select! {
            () = copy => {}
            () = conn.shutdown_begun() => {
                tracing::debug!(route, "upgraded connection closed: shutting down");
            }
        }
        drop(conn);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_param_replaces_the_callers() {
        assert_eq!(with_token_param(None, "a.b"), "token=a.b");
        assert_eq!(
            with_token_param(Some("token=mine&x=1"), "t+/"),
            "x=1&token=t%2B%2F"
        );
        assert_eq!(
            with_token_param(Some("x_oblien_target=3000&tokenish=1"), "t"),
            "x_oblien_target=3000&tokenish=1&token=t"
        );
    }
}
