//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status` and a small HTML page.
//!
//! Nothing here ever shows a secret or a token: only route names, auth types, expiry times,
//! error messages (which are written never to contain secrets) and counters.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::body::{self, Body};
use crate::proxy::{Proxy, RouteState};
use crate::server::Shared;

/// Answers one admin request.
pub async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let proxy = shared.proxy.load_full();
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let r = readiness(&proxy);
            let status = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &r)
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(&proxy),
        ),
        "/status" => json(StatusCode::OK, &status(&proxy)),
        "/" => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            html(&status(&proxy)),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz /readyz /metrics /status /\n",
        ),
    }
}

/// GETs `path` from an admin listener: (status, body). Used by `credgate health`.
pub async fn probe(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), work)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}

/// `/readyz`: ready when every route can authenticate now.
#[derive(Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// The routes that are not ready, and why.
    pub not_ready: Vec<NotReady>,
}

#[derive(Serialize)]
pub struct NotReady {
    pub route: String,
    pub reason: String,
}

/// Whether every route can authenticate now: static secrets were loaded at start (or the
/// config would not have loaded); a token route needs an unexpired token for each key it
/// knows, and a fixed-key route needs its first token.
pub fn readiness(proxy: &Proxy) -> Readiness {
    let not_ready: Vec<NotReady> = proxy
        .routes()
        .iter()
        .filter_map(|r| {
            let status = r.route.auth.token_status()?;
            let reason = if status.fixed && status.keys.is_empty() {
                Some("no token fetched yet".to_owned())
            } else {
                // A per-workspace token may lapse unused by design (the next request fetches
                // one); only a key whose fetch is failing makes such a route unready.
                status
                    .keys
                    .iter()
                    .find(|k| !k.usable && (status.fixed || k.last_error.is_some()))
                    .map(|k| {
                        let which = if k.key.is_empty() {
                            String::new()
                        } else {
                            format!(" for {}", k.key)
                        };
                        match &k.last_error {
                            Some(e) => format!("no usable token{which}: {e}"),
                            None => format!("no usable token{which} yet"),
                        }
                    })
            };
            reason.map(|reason| NotReady {
                route: r.route.name.to_string(),
                reason,
            })
        })
        .collect();
    Readiness {
        ready: not_ready.is_empty(),
        not_ready,
    }
}

#[derive(Serialize)]
struct Status {
    routes: Vec<RouteStatus>,
}

#[derive(Serialize)]
struct RouteStatus {
    name: String,
    matches: String,
    upstream: String,
    auth: &'static str,
    /// Header names credgate sets (never values).
    injects: Vec<String>,
    tokens: Vec<TokenView>,
    /// Seconds the route's cool-down gate stays closed (an upstream said "wait").
    cool_down_s: Option<f64>,
}

#[derive(Serialize)]
struct TokenView {
    key: String,
    usable: bool,
    valid_until: Option<u64>,
    expires_in_s: Option<i64>,
    last_refresh: Option<u64>,
    last_error: Option<String>,
    fetches_ok: u64,
    fetches_failed: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn status(proxy: &Proxy) -> Status {
    let now = SystemTime::now();
    Status {
        routes: proxy
            .routes()
            .iter()
            .map(|r| route_status(r, now))
            .collect(),
    }
}

fn route_status(r: &RouteState, now: SystemTime) -> RouteStatus {
    let route = &r.route;
    let tokens = route
        .auth
        .token_status()
        .map(|s| s.keys)
        .unwrap_or_default()
        .into_iter()
        .map(|k| TokenView {
            expires_in_s: k.valid_until.map(|v| match v.duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            }),
            valid_until: k.valid_until.map(unix),
            last_refresh: k.last_refresh.map(unix),
            key: k.key,
            usable: k.usable,
            last_error: k.last_error,
            fetches_ok: k.fetches_ok,
            fetches_failed: k.fetches_failed,
        })
        .collect();
    RouteStatus {
        name: route.name.to_string(),
        matches: route.matcher.to_string(),
        upstream: route.upstream.to_string(),
        auth: route.auth_spec.kind(),
        injects: route.auth.injects().iter().map(|h| h.to_string()).collect(),
        tokens,
        cool_down_s: r.cool_down.remaining().map(|d| d.as_secs_f64()),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("status serialises");
    body.push(b'\n');
    text(status, "application/json", body)
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(body::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained page (no external assets): one row per route, one line per token.
fn html(status: &Status) -> String {
    let mut rows = String::new();
    for r in &status.routes {
        let tokens = if r.tokens.is_empty() {
            if r.auth == "none" {
                "—".to_owned()
            } else {
                format!("static: {}", esc(&r.injects.join(", ")))
            }
        } else {
            r.tokens
                .iter()
                .map(|t| {
                    let key = if t.key.is_empty() {
                        String::new()
                    } else {
                        format!("<b>{}</b> ", esc(&t.key))
                    };
                    let state = match (t.usable, t.expires_in_s) {
                        (true, Some(s)) => {
                            format!("<span class=ok>valid</span>, expires in {}", human(s))
                        }
                        (false, _) => "<span class=bad>not usable</span>".to_owned(),
                        (true, None) => "valid".to_owned(),
                    };
                    let err = t
                        .last_error
                        .as_deref()
                        .map(|e| format!(" <span class=bad>last error: {}</span>", esc(e)))
                        .unwrap_or_default();
                    format!(
                        "{key}{state} ({} fetched, {} failed){err}",
                        t.fetches_ok, t.fetches_failed
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let gate = r
            .cool_down_s
            .map(|s| format!(" <span class=bad>cooling down {s:.1}s</span>"))
            .unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td>{}{gate}</td><td>{}</td><td>{}</td><td>{}</td><td>{tokens}</td></tr>\n",
            esc(&r.name),
            esc(&r.matches),
            esc(&r.upstream),
            r.auth
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>credgate</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.4em .7em;text-align:left;vertical-align:top}}\
         .ok{{color:#070}}.bad{{color:#b00}}</style></head><body><h1>credgate</h1>\
         <table><tr><th>route</th><th>matches</th><th>upstream</th><th>auth</th><th>credentials</th></tr>\n{rows}</table>\
         <p><a href=/status>/status</a> · <a href=/metrics>/metrics</a> · <a href=/readyz>/readyz</a></p></body></html>\n"
    )
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
