//! The request path, top to bottom: route -> auth -> rewrite -> forward -> respond.

use std::time::{Duration, Instant};

use http::{header, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::config::{Config, Route};
use crate::error::ProxyError;
use crate::forward::{self, Clients};
use crate::route::{RouteTable, Via};

/// Everything the request path needs, built once from a checked [`Config`].
pub struct Proxy {
    routes: Vec<RouteState>,
    table: RouteTable,
}

struct RouteState {
    route: Route,
    clients: Clients,
}

/// The per-request record behind the one log line each request gets.
struct Outcome<'a> {
    route: Option<&'a str>,
    upstream: Option<Duration>,
}

impl Proxy {
    pub fn new(config: Config) -> Result<Self, crate::StartError> {
        let table = RouteTable::new(&config.routes);
        let routes = config
            .routes
            .into_iter()
            .map(|route| {
                let clients = Clients::new(&route.timeouts, route.ca.as_deref())
                    .map_err(|e| crate::StartError::Tls(route.name.to_string(), e))?;
                Ok(RouteState { route, clients })
            })
            .collect::<Result<_, crate::StartError>>()?;
        Ok(Self { routes, table })
    }

    /// Handles one request from a caller; never fails (errors become JSON responses).
    pub async fn handle(&self, via: Via, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let mut outcome = Outcome {
            route: None,
            upstream: None,
        };
        let res = match self.forward(via, req, &mut outcome).await {
            Ok(res) => res,
            Err(e) => {
                tracing::debug!(route = outcome.route, error = %e, "request refused");
                e.into_response(outcome.route)
            }
        };
        tracing::info!(
            route = outcome.route.unwrap_or("-"),
            method = %method,
            path = uri.path(),
            status = res.status().as_u16(),
            upstream_ms = outcome.upstream.map(|d| d.as_secs_f64() * 1e3),
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
        res
    }

    async fn forward<'a>(
        &'a self,
        via: Via,
        mut req: Request<Incoming>,
        out: &mut Outcome<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        if req.method() == http::Method::CONNECT {
            return Err(ProxyError::ConnectNotSupported);
        }
        // 1. Route.
        let matched = self
            .table
            .find(via, req.version(), req.uri(), req.headers())?;
        let RouteState { route, clients } = &self.routes[matched.route];
        out.route = Some(&route.name);

        // 2. Credentials (a cached token or static headers: no waiting on the hot path).
        let mut rest = matched.rest;
        let grant = route.auth.grant(&mut rest).await?;

        // 3. Rewrite for the upstream.
        let uri = forward::upstream_uri(
            &route.upstream,
            matched.add_base_path,
            rest,
            req.uri().query(),
        )
        .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))?;
        let upgrade = forward::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let headers = &mut parts.headers;
        forward::strip_hop_by_hop(headers, upgrade);
        for name in route.auth.injects() {
            headers.remove(name);
        }
        if route.auth.strips_authorization() {
            headers.remove(header::AUTHORIZATION);
        }
        headers.insert(header::HOST, route.upstream.host_header.clone());
        for (name, value) in grant.headers.iter() {
            headers.insert(name.clone(), value.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;

        // 4. Forward.
        let client = if upgrade {
            &clients.http1
        } else {
            &clients.pooled
        };
        let sent = Instant::now();
        let res = tokio::time::timeout(
            route.timeouts.request,
            client.request(Request::from_parts(parts, Either::Left(body))),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(route.timeouts.request))?
        .map_err(|e| upstream_error(&route.name, e))?;
        out.upstream = Some(sent.elapsed());

        // 5. Respond.
        let mut res = res;
        let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
            tunnel(
                route.name.to_string(),
                client_upgrade,
                hyper::upgrade::on(&mut res),
            );
        }
        let (mut parts, body) = res.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers, switching);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

/// Logs why the upstream failed (the error chain names no secret) and classifies it.
fn upstream_error(route: &str, e: hyper_util::client::legacy::Error) -> ProxyError {
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    tracing::warn!(route, error = %chain, "upstream request failed");
    if e.is_connect() {
        ProxyError::UpstreamUnreachable
    } else {
        ProxyError::UpstreamFailed
    }
}

/// Copies bytes both ways between an upgraded caller and upstream until either side closes.
fn tunnel(route: String, client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
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
    });
}
