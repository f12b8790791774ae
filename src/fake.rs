//! An embedded fake of Oblien's control plane, its workspace gateway and an OAuth2 token server.
//!
//! It backs `credgate demo` and the integration tests: two real listeners on 127.0.0.1, counters
//! for what was called, and switches for the faults credgate must survive. JWTs here are
//! `base64url(header).base64url(payload).base64url(random)`: nothing verifies a signature, the
//! gateway looks tokens up in the registry of those it issued.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// How the fake behaves: the credentials it accepts and the lifetimes of what it issues.
///
/// The defaults are demo values, not secrets, so this type may print.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The `X-Client-ID` the control plane accepts.
    pub client_id: String,
    /// The `X-Client-Secret` the control plane accepts.
    pub client_secret: String,
    /// Lifetime of gateway JWTs (`/enable`, `/token`), in whole seconds.
    pub gateway_token_lifetime: Duration,
    /// Lifetime of workspace tokens (`/workspace`), in whole seconds.
    pub workspace_token_lifetime: Duration,
    /// Lifetime of OAuth2 access tokens.
    pub oauth_token_lifetime: Duration,
    /// Whether OAuth2 responses carry `expires_in`.
    pub oauth_include_expires_in: bool,
    /// The path segment after the workspace id; any other answers 404.
    pub access_path: String,
    /// Port of the control-plane listener (0: any).
    pub api_port: u16,
    /// Port of the gateway listener (0: any).
    pub gateway_port: u16,
    /// The OAuth2 `client_id` `/oauth/token` accepts.
    pub oauth_client_id: String,
    /// The OAuth2 `client_secret` `/oauth/token` accepts.
    pub oauth_client_secret: String,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            client_id: "demo-client".into(),
            client_secret: "demo-secret".into(),
            gateway_token_lifetime: Duration::from_secs(60),
            workspace_token_lifetime: Duration::from_secs(30 * 24 * 3600),
            oauth_token_lifetime: Duration::from_secs(3600),
            oauth_include_expires_in: true,
            access_path: "internal-api-access".into(),
            api_port: 0,
            gateway_port: 0,
            oauth_client_id: "demo-oauth-client".into(),
            oauth_client_secret: "demo-oauth-secret".into(),
        }
    }
}

/// The control-plane and OAuth2 endpoints the fake counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /workspace/{id}/{access_path}/enable`
    Enable,
    /// `POST /workspace/{id}/{access_path}/token`
    Rotate,
    /// `POST /workspace/{id}/{access_path}/workspace`
    WorkspaceToken,
    /// `GET /workspace/{id}/{access_path}/token/raw`
    RawToken,
    /// `GET /workspace/{id}/{access_path}`
    Status,
    /// `POST /oauth/token`
    OAuthToken,
}

/// Where an OAuth2 client put its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    Body,
    /// `Authorization: Basic`.
    Basic,
}

/// What the last authenticated `/oauth/token` request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthRequest {
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// Form parameters other than grant type, client credentials, scope and audience.
    pub extra: Vec<(String, String)>,
}

/// A running fake. Its listeners and connections close when it is dropped.
pub struct FakeOblien {
    state: Arc<State>,
    api_addr: SocketAddr,
    gateway_addr: SocketAddr,
    /// Dropping it ends every task the fake spawned (see [`State::spawn`]).
    _stop: watch::Sender<()>,
}

impl FakeOblien {
    /// Binds both listeners on 127.0.0.1 and starts serving. Must be called inside a tokio
    /// runtime.
    pub fn start(opts: FakeOptions) -> std::io::Result<Self> {
        let bind = |port| {
            let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        };
        let (api, gateway) = (bind(opts.api_port)?, bind(opts.gateway_port)?);
        let (api_addr, gateway_addr) = (api.local_addr()?, gateway.local_addr()?);
        let (stop, stopped) = watch::channel(());
        let state = Arc::new(State {
            opts,
            gateway_port: gateway_addr.port(),
            stopped,
            inner: Mutex::default(),
        });
        state.spawn(accept_loop(api, state.clone(), api_service));
        state.spawn(accept_loop(gateway, state.clone(), gateway_service));
        Ok(Self {
            state,
            api_addr,
            gateway_addr,
            _stop: stop,
        })
    }

    /// The control plane and `/oauth/token`.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The workspace gateway (data plane).
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr
    }

    /// The options the fake was started with.
    pub fn options(&self) -> &FakeOptions {
        &self.state.opts
    }

    /// Requests that reached `endpoint`, whatever the answer (401s and injected faults count).
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        self.state.lock().calls.get(&endpoint).copied().unwrap_or(0)
    }

    /// Every request the gateway received.
    pub fn gateway_requests(&self) -> usize {
        self.state.lock().gateway_requests
    }

    /// Gateway requests answered 401.
    pub fn gateway_rejections(&self) -> usize {
        self.state.lock().gateway_rejections
    }

    /// The distinct access path segments control-plane requests used, first seen first.
    pub fn access_paths_seen(&self) -> Vec<String> {
        self.state.lock().access_paths.clone()
    }

    /// While on, every token endpoint (control plane and OAuth2) answers 503.
    pub fn set_token_endpoint_down(&self, down: bool) {
        self.state.lock().faults.token_down = down;
    }

    /// The next `n` token requests answer 429 with `Retry-After: retry_after_secs`.
    pub fn fail_next_token_requests_with_429(&self, n: usize, retry_after_secs: u64) {
        let faults = &mut self.state.lock().faults;
        faults.fail_429 = n;
        faults.retry_after_secs = retry_after_secs;
    }

    /// While on, the gateway answers 401 to everything.
    pub fn set_gateway_rejects_all(&self, reject: bool) {
        self.state.lock().faults.gateway_rejects_all = reject;
    }

    /// Rotates the workspace's connection token without issuing a JWT: its tokens stop working.
    pub fn revoke_workspace(&self, id: &str) {
        self.state.lock().rotate(id);
    }

    /// Token endpoints wait this long before answering.
    pub fn set_token_delay(&self, delay: Duration) {
        self.state.lock().faults.token_delay = delay;
    }

    /// The last `/oauth/token` request whose client authenticated.
    pub fn oauth_last_request(&self) -> Option<OAuthRequest> {
        self.state.lock().oauth_last.clone()
    }

    /// Stops serving; the same as dropping the value.
    pub fn shutdown(self) {}
}

type Res = Response<BoxBody<Bytes, Infallible>>;

struct State {
    opts: FakeOptions,
    gateway_port: u16,
    /// Changes (with an error) when the [`FakeOblien`] is dropped.
    stopped: watch::Receiver<()>,
    /// A std mutex, not tokio's: every critical section is a few map operations that never
    /// spans an `.await`, and the test controls are plain synchronous methods.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each workspace's current connection token: what rotation replaces.
    connections: HashMap<String, String>,
    /// Every JWT and OAuth2 access token issued, by value.
    issued: HashMap<String, Grant>,
    calls: HashMap<Endpoint, usize>,
    access_paths: Vec<String>,
    gateway_requests: usize,
    gateway_rejections: usize,
    faults: Faults,
    oauth_last: Option<OAuthRequest>,
}

#[derive(Default)]
struct Faults {
    token_down: bool,
    fail_429: usize,
    retry_after_secs: u64,
    gateway_rejects_all: bool,
    token_delay: Duration,
}

/// What an issued token is good for.
struct Grant {
    /// What the gateway's echo calls it: "gateway", "workspace" or "oauth2".
    credential: &'static str,
    /// The workspace and the connection token the grant was issued for (JWTs only).
    workspace: Option<(String, String)>,
    expires: SystemTime,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not take every later assertion down with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns a task that ends when the fake is dropped.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                _ = stopped.changed() => {}
            }
        });
    }

    fn count(&self, endpoint: Endpoint) {
        *self.lock().calls.entry(endpoint).or_default() += 1;
    }

    /// The configured delay, then an injected fault if one is due.
    async fn token_faults(&self) -> Option<Res> {
        let delay = self.lock().faults.token_delay;
        tokio::time::sleep(delay).await;
        let faults = &mut self.lock().faults;
        if faults.token_down {
            let msg = "Token service unavailable";
            return Some(cp_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                msg,
            ));
        }
        if faults.fail_429 > 0 {
            faults.fail_429 -= 1;
            let mut res = cp_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "Slow down");
            res.headers_mut()
                .insert(header::RETRY_AFTER, faults.retry_after_secs.into());
            return Some(res);
        }
        None
    }

    /// Counts a gateway request and says who `token` is, if the gateway accepts it.
    fn admit(&self, token: Option<&str>) -> Option<(&'static str, Option<String>)> {
        let mut inner = self.lock();
        inner.gateway_requests += 1;
        let who = token
            .filter(|_| !inner.faults.gateway_rejects_all)
            .and_then(|t| inner.identify(t));
        if who.is_none() {
            inner.gateway_rejections += 1;
        }
        who
    }
}

impl Inner {
    fn identify(&self, token: &str) -> Option<(&'static str, Option<String>)> {
        if let Some(grant) = self.issued.get(token) {
            let current = match &grant.workspace {
                Some((ws, conn)) => self.connections.get(ws) == Some(conn),
                None => true,
            };
            let ws = grant.workspace.as_ref().map(|(ws, _)| ws.clone());
            return (current && SystemTime::now() < grant.expires)
                .then_some((grant.credential, ws));
        }
        let (ws, _) = self.connections.iter().find(|(_, conn)| *conn == token)?;
        Some(("raw", Some(ws.clone())))
    }

    /// The workspace's connection token, created on first use.
    fn connection(&mut self, ws: &str) -> String {
        let conn = self.connections.entry(ws.to_owned());
        conn.or_insert_with(new_connection_token).clone()
    }

    fn rotate(&mut self, ws: &str) {
        self.connections
            .insert(ws.to_owned(), new_connection_token());
    }

    /// A JWT for the workspace's current connection token: a gateway JWT, or the long-lived
    /// workspace token when `endpoint` is [`Endpoint::WorkspaceToken`].
    fn issue_jwt(&mut self, endpoint: Endpoint, ws: &str, lifetime: Duration) -> String {
        let conn = self.connection(ws);
        let iat = unix_now();
        let exp = iat + lifetime.as_secs();
        let header = json!({"alg": "HS256", "typ": "JWT"});
        let claims = json!({"type": "workspace", "workspace_id": ws, "token": conn,
            "iat": iat, "exp": exp});
        let [header, claims] = [header, claims].map(|v| URL_SAFE_NO_PAD.encode(v.to_string()));
        let signature = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let jwt = format!("{header}.{claims}.{signature}");
        let grant = Grant {
            credential: match endpoint {
                Endpoint::WorkspaceToken => "workspace",
                _ => "gateway",
            },
            workspace: Some((ws.to_owned(), conn)),
            expires: UNIX_EPOCH + Duration::from_secs(exp),
        };
        self.issued.insert(jwt.clone(), grant);
        tracing::info!(
            ?endpoint,
            workspace = ws,
            lifetime_s = lifetime.as_secs(),
            "fake issued a token"
        );
        jwt
    }
}

async fn accept_loop<F>(
    listener: TcpListener,
    state: Arc<State>,
    handle: fn(Arc<State>, Request<Incoming>) -> F,
) where
    F: Future<Output = Res> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "fake: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let st = state.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(handle(st, req).await) }
        });
        let conn = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        state.spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The control plane and the OAuth2 token endpoint.
async fn api_service(state: Arc<State>, req: Request<Incoming>) -> Res {
    let path = req.uri().path().to_owned();
    if path == "/oauth/token" && req.method() == Method::POST {
        return oauth_token(&state, req).await;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let &["workspace", ws, access, ref rest @ ..] = segments.as_slice() else {
        return not_found();
    };
    {
        let seen = &mut state.lock().access_paths;
        if !seen.iter().any(|a| a == access) {
            seen.push(access.to_owned());
        }
    }
    let endpoint = match (req.method(), rest) {
        (&Method::POST, ["enable"]) => Endpoint::Enable,
        (&Method::POST, ["token"]) => Endpoint::Rotate,
        (&Method::POST, ["workspace"]) => Endpoint::WorkspaceToken,
        (&Method::GET, ["token", "raw"]) => Endpoint::RawToken,
        (&Method::GET, []) => Endpoint::Status,
        _ => return not_found(),
    };
    if access != state.opts.access_path {
        return not_found();
    }
    state.count(endpoint);
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    if header("x-client-id") != Some(&state.opts.client_id)
        || header("x-client-secret") != Some(&state.opts.client_secret)
    {
        let msg = "Invalid client credentials";
        return cp_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", msg);
    }
    if endpoint != Endpoint::Status {
        if let Some(res) = state.token_faults().await {
            return res;
        }
    }
    let lifetime = match endpoint {
        Endpoint::WorkspaceToken => state.opts.workspace_token_lifetime,
        _ => state.opts.gateway_token_lifetime,
    };
    let mut inner = state.lock();
    let body = match endpoint {
        Endpoint::Enable => {
            let token = inner.issue_jwt(endpoint, ws, lifetime);
            json!({"success": true, "enabled": true, "token": token})
        }
        Endpoint::Rotate => {
            inner.rotate(ws);
            json!({"success": true, "token": inner.issue_jwt(endpoint, ws, lifetime)})
        }
        Endpoint::WorkspaceToken => {
            json!({"success": true, "token": inner.issue_jwt(endpoint, ws, lifetime)})
        }
        Endpoint::RawToken => json!({"success": true, "token": inner.connection(ws),
            "ip": "127.0.0.1", "port": state.gateway_port}),
        Endpoint::Status => json!({"success": true, "enabled": true, "running": true}),
        Endpoint::OAuthToken => unreachable!("/oauth/token is routed above"),
    };
    json_response(StatusCode::OK, &body)
}

async fn oauth_token(state: &State, req: Request<Incoming>) -> Res {
    state.count(Endpoint::OAuthToken);
    if let Some(res) = state.token_faults().await {
        return res;
    }
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let body = read_body(req.into_body()).await;
    let form = parse_form(&String::from_utf8_lossy(&body));
    let param = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let (client_auth, id, secret) = match basic {
        Some((id, secret)) => (ClientAuth::Basic, Some(id), Some(secret)),
        None => (ClientAuth::Body, param("client_id"), param("client_secret")),
    };
    let opts = &state.opts;
    if id.as_ref() != Some(&opts.oauth_client_id)
        || secret.as_ref() != Some(&opts.oauth_client_secret)
    {
        let body = json!({"error": "invalid_client",
            "error_description": "Client authentication failed"});
        return json_response(StatusCode::UNAUTHORIZED, &body);
    }
    let scope = param("scope");
    state.lock().oauth_last = Some(OAuthRequest {
        client_auth,
        scope: scope.clone(),
        audience: param("audience"),
        extra: form
            .iter()
            .filter(|(k, _)| {
                let known = [
                    "grant_type",
                    "client_id",
                    "client_secret",
                    "scope",
                    "audience",
                ];
                !known.contains(&k.as_str())
            })
            .cloned()
            .collect(),
    });
    if param("grant_type").as_deref() != Some("client_credentials") {
        let body = json!({"error": "unsupported_grant_type",
            "error_description": "Only client_credentials is supported"});
        return json_response(StatusCode::BAD_REQUEST, &body);
    }
    let token = hex(&rand::random::<[u8; 20]>());
    let lifetime = opts.oauth_token_lifetime;
    let grant = Grant {
        credential: "oauth2",
        workspace: None,
        expires: SystemTime::now() + lifetime,
    };
    state.lock().issued.insert(token.clone(), grant);
    tracing::info!(
        endpoint = ?Endpoint::OAuthToken,
        lifetime_s = lifetime.as_secs(),
        "fake issued a token"
    );
    let mut body = json!({"access_token": token, "token_type": "bearer"});
    if opts.oauth_include_expires_in {
        body["expires_in"] = lifetime.as_secs().into();
    }
    if let Some(scope) = scope {
        body["scope"] = scope.into();
    }
    json_response(StatusCode::OK, &body)
}

/// The workspace gateway: authenticates, then echoes, streams or upgrades.
async fn gateway_service(state: Arc<State>, mut req: Request<Incoming>) -> Res {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let param = |name| {
        let form = parse_form(query.as_deref().unwrap_or_default());
        form.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    };
    let token = bearer(req.headers()).or_else(|| {
        (path == "/ws" || path.starts_with("/proxy"))
            .then(|| param("token"))
            .flatten()
    });
    let Some((credential, workspace)) = state.admit(token.as_deref()) else {
        return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"}));
    };
    match path.as_str() {
        "/ws" if is_websocket(req.headers()) => {
            let upgrade = hyper::upgrade::on(&mut req);
            state.spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                }
            });
            return Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .body(Full::default().boxed())
                .expect("static response");
        }
        "/sse" => {
            let events = Sse {
                sent: 0,
                next: Box::pin(tokio::time::sleep(Duration::ZERO)),
            };
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(events.boxed())
                .expect("static response");
        }
        "/slow" => {
            let ms = param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(0u64);
            tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
        }
        _ => {}
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.get_mut(name.as_str()) {
            Some(Value::String(v)) => *v = format!("{v}, {value}"),
            _ => _ = headers.insert(name.as_str().to_owned(), value.into()),
        }
    }
    let method = req.method().to_string();
    let body_len = read_body(req.into_body()).await.len();
    let echo = json!({"method": method, "path": path, "query": query, "headers": headers,
        "workspace_id": workspace, "credential": credential, "body_len": body_len});
    json_response(StatusCode::OK, &echo)
}

/// Three server-sent events, the first at once, then one every 100 ms.
struct Sse {
    sent: u32,
    next: Pin<Box<Sleep>>,
}

impl http_body::Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent == 3 {
            return Poll::Ready(None);
        }
        ready!(self.next.as_mut().poll(cx));
        self.sent += 1;
        self.next
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(100));
        let event = format!("id: {0}\ndata: {{\"n\":{0}}}\n\n", self.sent);
        Poll::Ready(Some(Ok(Frame::data(event.into()))))
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// `Authorization: Basic` per RFC 6749 §2.3.1: id and secret are form-urlencoded first.
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

fn parse_form(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

/// Form-decodes one value (RFC 6749 §2.3.1 encodes Basic credentials this way).
fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// A fresh raw connection token: 32 random bytes in hex.
fn new_connection_token() -> String {
    hex(&rand::random::<[u8; 32]>())
}

fn unix_now() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.unwrap_or_default().as_secs()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn read_body(body: Incoming) -> Bytes {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

fn json_response(status: StatusCode, body: &Value) -> Res {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("static response")
}

/// The control plane's error shape.
fn cp_error(status: StatusCode, code: &str, message: &str) -> Res {
    let body = json!({"success": false, "error": code, "code": code, "message": message});
    json_response(status, &body)
}

fn not_found() -> Res {
    cp_error(StatusCode::NOT_FOUND, "NOT_FOUND", "No such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CLIENT: [(&str, &str); 2] = [
        ("x-client-id", "demo-client"),
        ("x-client-secret", "demo-secret"),
    ];
    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    async fn send(
        addr: SocketAddr,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response<Incoming> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "fake");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
            .send_request(req.body(Full::<Bytes>::from(body.to_owned())).unwrap())
            .await
            .unwrap()
    }

    async fn call(
        addr: SocketAddr,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, Value) {
        let res = send(addr, method, uri, headers, body).await;
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// A control-plane call for workspace `ws_1` with the default client credentials.
    async fn control(fake: &FakeOblien, method: &str, tail: &str) -> (StatusCode, Value) {
        let uri = format!("/workspace/ws_1/internal-api-access{tail}");
        call(fake.api_addr(), method, &uri, &CLIENT, "").await
    }

    async fn token(fake: &FakeOblien, method: &str, tail: &str) -> String {
        let (status, body) = control(fake, method, tail).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn gateway(fake: &FakeOblien, token: &str) -> (StatusCode, Value) {
        let auth = format!("Bearer {token}");
        call(
            fake.gateway_addr(),
            "GET",
            "/files",
            &[("authorization", &auth)],
            "",
        )
        .await
    }

    async fn oauth(fake: &FakeOblien, headers: &[(&str, &str)], form: &str) -> (StatusCode, Value) {
        call(
            fake.api_addr(),
            "POST",
            "/oauth/token",
            &[&[FORM], headers].concat(),
            form,
        )
        .await
    }

    /// A JWT's `iat`, `exp` and inner connection token.
    fn claims(jwt: &str) -> (u64, u64, Value) {
        let payload = URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap();
        let claims: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            (&claims["type"], &claims["workspace_id"]),
            (&json!("workspace"), &json!("ws_1"))
        );
        (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
            claims["token"].clone(),
        )
    }

    #[tokio::test]
    async fn enable_returns_a_jwt_that_expires_after_the_lifetime() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let (status, body) = control(&fake, "POST", "/enable").await;
        assert_eq!((status, &body["enabled"]), (StatusCode::OK, &json!(true)));
        let (iat, exp, inner) = claims(body["token"].as_str().unwrap());
        assert_eq!(exp - iat, 60);
        assert!(unix_now().abs_diff(iat) <= 1);
        let (_, raw) = control(&fake, "GET", "/token/raw").await;
        assert_eq!(
            (&raw["token"], &raw["port"]),
            (&inner, &json!(fake.gateway_addr().port()))
        );
        let (iat, exp, _) = claims(&token(&fake, "POST", "/workspace").await);
        assert_eq!(exp - iat, 30 * 24 * 3600);
    }

    #[tokio::test]
    async fn enable_keeps_earlier_tokens_valid_but_rotate_and_revoke_do_not() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let first = token(&fake, "POST", "/enable").await;
        let second = token(&fake, "POST", "/enable").await;
        assert_ne!(first, second);
        assert_eq!(gateway(&fake, &first).await.0, StatusCode::OK);
        let rotated = token(&fake, "POST", "/token").await;
        assert_eq!(gateway(&fake, &first).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(gateway(&fake, &second).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(gateway(&fake, &rotated).await.0, StatusCode::OK);
        fake.revoke_workspace("ws_1");
        assert_eq!(gateway(&fake, &rotated).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            (fake.calls(Endpoint::Enable), fake.calls(Endpoint::Rotate)),
            (2, 1)
        );
        assert_eq!((fake.gateway_requests(), fake.gateway_rejections()), (5, 3));
    }

    #[tokio::test]
    async fn gateway_echoes_the_request_and_who_sent_it() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let auth = format!("Bearer {}", token(&fake, "GET", "/token/raw").await);
        let headers = [("authorization", auth.as_str()), ("x-trace", "a")];
        let (status, echo) = call(
            fake.gateway_addr(),
            "PUT",
            "/files?path=%2Fapp",
            &headers,
            "hello",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let expected = json!({"method": "PUT", "path": "/files", "query": "path=%2Fapp",
            "workspace_id": "ws_1", "credential": "raw", "body_len": 5});
        for (key, value) in expected.as_object().unwrap() {
            assert_eq!(&echo[key], value, "{key}");
        }
        assert_eq!(echo["headers"]["x-trace"], "a");
        let month = token(&fake, "POST", "/workspace").await;
        assert_eq!(gateway(&fake, &month).await.1["credential"], "workspace");

        let started = Instant::now();
        let res = send(fake.gateway_addr(), "GET", "/sse", &headers, "").await;
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
        let events = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&events).matches("data: ").count(),
            3
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn control_plane_rejects_wrong_secret_and_unknown_access_path() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let wrong = [CLIENT[0], ("x-client-secret", "nope")];
        let uri = "/workspace/ws_1/internal-api-access/enable";
        let (status, body) = call(fake.api_addr(), "POST", uri, &wrong, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let expected = json!({"success": false, "error": "UNAUTHORIZED", "code": "UNAUTHORIZED",
            "message": "Invalid client credentials"});
        assert_eq!(body, expected);
        let uri = "/workspace/ws_1/runtime-api-access/enable";
        assert_eq!(
            call(fake.api_addr(), "POST", uri, &CLIENT, "").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            fake.access_paths_seen(),
            ["internal-api-access", "runtime-api-access"]
        );
        assert_eq!(fake.calls(Endpoint::Enable), 1);
    }

    #[tokio::test]
    async fn oauth_accepts_body_and_basic_client_auth() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let form = "grant_type=client_credentials&client_id=demo-oauth-client\
            &client_secret=demo-oauth-secret&scope=read+write&audience=https%3A%2F%2Fapi&resource=r";
        let (status, res) = oauth(&fake, &[], form).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (&res["token_type"], &res["expires_in"]),
            (&json!("bearer"), &json!(3600))
        );
        assert_eq!(res["scope"], "read write");
        let access = res["access_token"].as_str().unwrap();
        assert!(!access.contains('.'), "opaque, not a JWT");
        let (_, echo) = gateway(&fake, access).await;
        assert_eq!(
            (&echo["credential"], &echo["workspace_id"]),
            (&json!("oauth2"), &Value::Null)
        );
        let expected = OAuthRequest {
            client_auth: ClientAuth::Body,
            scope: Some("read write".into()),
            audience: Some("https://api".into()),
            extra: vec![("resource".into(), "r".into())],
        };
        assert_eq!(fake.oauth_last_request(), Some(expected));

        let basic = format!(
            "Basic {}",
            STANDARD.encode("demo-oauth-client:demo-oauth-secret")
        );
        let (status, res) = oauth(
            &fake,
            &[("authorization", &basic)],
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!((status, res.get("scope")), (StatusCode::OK, None));
        assert_eq!(
            fake.oauth_last_request().unwrap().client_auth,
            ClientAuth::Basic
        );
        let wrong = "grant_type=client_credentials&client_id=demo-oauth-client&client_secret=x";
        let (status, res) = oauth(&fake, &[], wrong).await;
        assert_eq!(
            (status, &res["error"]),
            (StatusCode::UNAUTHORIZED, &json!("invalid_client"))
        );
        let (status, res) = oauth(&fake, &[("authorization", &basic)], "grant_type=password").await;
        assert_eq!(
            (status, &res["error"]),
            (StatusCode::BAD_REQUEST, &json!("unsupported_grant_type"))
        );
        assert_eq!(fake.calls(Endpoint::OAuthToken), 4);
    }

    #[tokio::test]
    async fn gateway_rejects_missing_and_expired_tokens() {
        let opts = FakeOptions {
            gateway_token_lifetime: Duration::from_secs(1),
            ..Default::default()
        };
        let fake = FakeOblien::start(opts).unwrap();
        let (status, body) = call(fake.gateway_addr(), "GET", "/files", &[], "").await;
        assert_eq!(
            (status, body),
            (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
        );
        let jwt = token(&fake, "POST", "/enable").await;
        let deadline = Instant::now() + Duration::from_secs(3);
        while gateway(&fake, &jwt).await.0 == StatusCode::OK {
            assert!(
                Instant::now() < deadline,
                "a 1 s token still works after 3 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(unix_now() >= claims(&jwt).1);
    }

    #[tokio::test]
    async fn ws_takes_the_token_from_the_query_and_echoes_bytes() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        let jwt = token(&fake, "POST", "/enable").await;
        let (status, _) = call(
            fake.gateway_addr(),
            "GET",
            &format!("/files?token={jwt}"),
            &[],
            "",
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "only /ws and /proxy take a query token"
        );
        let upgrade = [("connection", "Upgrade"), ("upgrade", "websocket")];
        let res = send(
            fake.gateway_addr(),
            "GET",
            &format!("/ws?token={jwt}"),
            &upgrade,
            "",
        )
        .await;
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(res).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut echoed = [0; 4];
        io.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
    }

    #[tokio::test]
    async fn token_faults_answer_503_and_429_then_recover() {
        let fake = FakeOblien::start(FakeOptions::default()).unwrap();
        fake.set_token_endpoint_down(true);
        let (status, body) = control(&fake, "POST", "/enable").await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::SERVICE_UNAVAILABLE, &json!("UNAVAILABLE"))
        );
        assert_eq!(
            control(&fake, "GET", "").await.0,
            StatusCode::OK,
            "status is no token endpoint"
        );
        fake.set_token_endpoint_down(false);
        fake.fail_next_token_requests_with_429(1, 7);
        let uri = "/workspace/ws_1/internal-api-access/token";
        let res = send(fake.api_addr(), "POST", uri, &CLIENT, "").await;
        assert_eq!(
            (res.status(), &res.headers()[header::RETRY_AFTER]),
            (
                StatusCode::TOO_MANY_REQUESTS,
                &"7".parse::<http::HeaderValue>().unwrap()
            )
        );
        let jwt = token(&fake, "POST", "/token").await;
        fake.set_gateway_rejects_all(true);
        assert_eq!(gateway(&fake, &jwt).await.0, StatusCode::UNAUTHORIZED);
        let calls = [Endpoint::Enable, Endpoint::Rotate, Endpoint::Status].map(|e| fake.calls(e));
        assert_eq!(calls, [1, 2, 1]);
    }

    #[test]
    fn form_decoding_handles_percent_escapes_and_plus() {
        assert_eq!(form_decode("a+b%20c%2Bd%3d%C3%A9"), "a b c+d=é");
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            parse_form("a=1&&b&c=%3D"),
            pairs(&[("a", "1"), ("b", ""), ("c", "=")])
        );
        assert_eq!(
            parse_basic("Basic aWQlM0E6cyUyNmM="),
            Some(("id:".into(), "s&c".into()))
        );
    }
}
