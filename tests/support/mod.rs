//! Test support: real upstreams that record what they receive, credgate started in-process
//! or as the real binary, and small HTTP clients. Everything listens on 127.0.0.1:0 and
//! every wait is bounded by [`WAIT`].
//!
//! # Layout
//! - [`TempDir`]: a scratch directory for config, secret and CA files, removed on drop.
//! - [`Upstream`] and [`Handler`]: a hyper HTTP/1 server (plain or TLS) that records each
//!   request and answers through a pluggable handler; [`WsEcho`] for WebSocket.
//! - [`TestCa`]: a throw-away CA and leaf for 127.0.0.1/localhost, and an untrusted cert.
//! - [`start_in_process`] ([`InProcess`]) and [`start_binary`] ([`Binary`]), both deref to
//!   [`Listeners`]; [`run_check`] for `credgate check`.
//! - [`send`], [`open`], [`get`] ([`Reply`]) and [`raw`] ([`RawReply`]): clients.
//! - [`pattern_body`] / [`PatternCheck`]: a large generated body and its cheap verifier.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server as ws_server;

/// The longest any single step of a test may wait (a bound for failures, not a sleep).
pub const WAIT: Duration = Duration::from_secs(10);

/// The body type upstreams answer with and clients send.
pub type TestBody = UnsyncBoxBody<Bytes, Infallible>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs `fut`, panicking with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// Calls `check` every 10 ms until it returns `Some`; `None` if that takes longer than [`WAIT`].
pub async fn poll_until<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let polling = async {
        loop {
            if let Some(v) = check() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, polling).await.ok()
}

/// A spawned task that is aborted when this handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------- scratch files

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "credgate-test-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` in this directory and returns the file's path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- bodies

/// A body held in memory.
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// An empty body.
pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A streamed body fed through the returned sender; it ends when the sender is dropped.
pub fn channel_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

/// The large-body pattern repeats every `PATTERN_PERIOD` bytes (a prime, so that a chunk lost,
/// repeated or reordered anywhere shows up as a mismatch).
const PATTERN_PERIOD: usize = 251;
const PATTERN_CHUNK: usize = 64 * 1024;

/// `PATTERN_CHUNK + PATTERN_PERIOD` bytes of the pattern, so any offset has a whole chunk after it.
fn pattern_bytes() -> &'static Bytes {
    static P: OnceLock<Bytes> = OnceLock::new();
    P.get_or_init(|| {
        (0..PATTERN_CHUNK + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// A `total`-byte streamed body of the pattern, generated lazily in 64 KiB chunks.
pub fn pattern_body(total: u64) -> TestBody {
    let stream = futures_util::stream::unfold(0u64, move |pos| async move {
        if pos >= total {
            return None;
        }
        let len = (total - pos).min(PATTERN_CHUNK as u64) as usize;
        let start = (pos % PATTERN_PERIOD as u64) as usize;
        let chunk = pattern_bytes().slice(start..start + len);
        Some((Ok::<_, Infallible>(Frame::data(chunk)), pos + len as u64))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Counts bytes and checks they follow the pattern of [`pattern_body`], without holding them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PatternCheck {
    pub bytes: u64,
    pub intact: bool,
}

impl PatternCheck {
    pub fn new() -> Self {
        Self {
            bytes: 0,
            intact: true,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = data.len().min(PATTERN_CHUNK);
            let start = (self.bytes % PATTERN_PERIOD as u64) as usize;
            self.intact &= data[..n] == pattern_bytes()[start..start + n];
            self.bytes += n as u64;
            data = &data[n..];
        }
    }

    /// Reads a whole body through the check.
    pub async fn drain<B>(mut body: B) -> Self
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        let mut check = Self::new();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.expect("body frame").data_ref() {
                check.feed(data);
            }
        }
        check
    }
}

// ---------------------------------------------------------------- upstreams

/// One request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// HTTP/1.1, or HTTP/2 when credgate negotiated it via ALPN.
    pub version: hyper::Version,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The whole body for [`Handler::collect`] upstreams; empty for [`Handler::stream`] ones.
    pub body: Bytes,
}

impl Received {
    /// The path and query the upstream saw (`/v1/x?q=1`).
    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("", |p| p.as_str())
    }

    /// The header's only value; panics if it was sent more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(
            all.len() <= 1,
            "{name} arrived {} times: {all:?}",
            all.len()
        );
        all.first().copied()
    }

    /// Every value of the header, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII header"))
            .collect()
    }
}

type CollectFn = dyn Fn(Received) -> BoxFuture<Response<TestBody>> + Send + Sync;
type StreamFn = dyn Fn(Request<Incoming>) -> BoxFuture<Response<TestBody>> + Send + Sync;

/// How an [`Upstream`] answers.
#[derive(Clone)]
pub enum Handler {
    /// Reads the whole body first (recorded), then answers from the [`Received`] request.
    Collect(Arc<CollectFn>),
    /// Gets the request with its body unread (only the head is recorded).
    Stream(Arc<StreamFn>),
}

impl Handler {
    pub fn collect<F, Fut>(f: F) -> Self
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::Collect(Arc::new(move |r| Box::pin(f(r))))
    }

    pub fn stream<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Self::Stream(Arc::new(move |r| Box::pin(f(r))))
    }

    /// 200 with [`echo_json`] of the request.
    pub fn echo() -> Self {
        Self::collect(|r| async move { json_response(StatusCode::OK, &echo_json(&r)) })
    }

    /// Waits `delay`, then answers like [`Handler::echo`].
    pub fn delayed(delay: Duration) -> Self {
        Self::collect(move |r| async move {
            tokio::time::sleep(delay).await;
            json_response(StatusCode::OK, &echo_json(&r))
        })
    }
}

/// `{"method", "path", "headers": {name: [values]}, "body_len"}`.
pub fn echo_json(r: &Received) -> Value {
    let mut headers: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, value) in &r.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>"));
    }
    json!({
        "method": r.method.as_str(),
        "path": r.path_and_query(),
        "headers": headers,
        "body_len": r.body.len(),
    })
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, v: &Value) -> Response<TestBody> {
    let mut res = Response::new(full(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0 that records every request it receives.
pub struct Upstream {
    addr: SocketAddr,
    scheme: &'static str,
    received: Arc<Mutex<Vec<Received>>>,
    _task: AbortOnDrop,
}

impl Upstream {
    /// A plain-HTTP upstream.
    pub async fn start(handler: Handler) -> Self {
        Self::serve(handler, None).await
    }

    /// An HTTPS upstream presenting `tls` (see [`TestCa`]).
    pub async fn start_tls(handler: Handler, tls: Arc<ServerConfig>) -> Self {
        Self::serve(handler, Some(TlsAcceptor::from(tls))).await
    }

    /// A plain-HTTP upstream answering with [`Handler::echo`].
    pub async fn echo() -> Self {
        Self::start(Handler::echo()).await
    }

    async fn serve(handler: Handler, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let log = received.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, log, tls) = (handler.clone(), log.clone(), tls.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let (handler, log) = (handler.clone(), log.clone());
                        async move { Ok::<_, Infallible>(answer(&handler, &log, req).await) }
                    });
                    // HTTP/1.1, or HTTP/2 when the client asks for it (ALPN or preface).
                    let http = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match tls {
                        None => {
                            http.serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await
                        }
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => {
                                http.serve_connection_with_upgrades(TokioIo::new(s), svc)
                                    .await
                            }
                            Err(_) => return, // the client refused our certificate
                        },
                    };
                });
            }
        });
        Self {
            addr,
            scheme,
            received,
            _task: AbortOnDrop(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (or `https://`), for an `upstream = ` line.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// How many requests have arrived (counted as soon as the head is read).
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The only request received; panics unless exactly one arrived.
    pub fn only(&self) -> Received {
        let all = self.received();
        assert_eq!(all.len(), 1, "expected exactly one upstream request");
        all.into_iter().next().unwrap()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for(&self, n: usize) {
        poll_until(|| (self.count() >= n).then_some(()))
            .await
            .unwrap_or_else(|| panic!("{n} request(s) did not reach the upstream in {WAIT:?}"))
    }
}

async fn answer(
    handler: &Handler,
    log: &Mutex<Vec<Received>>,
    req: Request<Incoming>,
) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let record = |body: Bytes| Received {
        method: parts.method.clone(),
        version: parts.version,
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body,
    };
    match handler {
        Handler::Stream(f) => {
            log.lock().unwrap().push(record(Bytes::new()));
            f(Request::from_parts(parts, body)).await
        }
        Handler::Collect(f) => {
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let r = record(body);
            log.lock().unwrap().push(r.clone());
            f(r).await
        }
    }
}

/// A WebSocket echo upstream (tokio-tungstenite) that records each handshake request.
pub struct WsEcho {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Received>>>,
    _task: AbortOnDrop,
}

impl WsEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let addr = listener.local_addr().expect("ws addr");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let log = handshakes.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                conns.spawn(async move {
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_hdr_async(stream, RecordHandshake(log)).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() {
                            break;
                        }
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            _task: AbortOnDrop(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn handshakes(&self) -> Vec<Received> {
        self.handshakes.lock().unwrap().clone()
    }
}

/// Records a WebSocket handshake request and accepts it unchanged.
struct RecordHandshake(Arc<Mutex<Vec<Received>>>);

impl ws_server::Callback for RecordHandshake {
    fn on_request(
        self,
        req: &ws_server::Request,
        res: ws_server::Response,
    ) -> Result<ws_server::Response, ws_server::ErrorResponse> {
        self.0.lock().unwrap().push(Received {
            method: req.method().clone(),
            version: req.version(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        Ok(res)
    }
}

// ---------------------------------------------------------------- TLS

/// A throw-away certificate authority; its leaf is valid for 127.0.0.1 and localhost.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "credgate test CA");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).expect("CA cert");
        Self { cert, key }
    }

    /// Writes the CA certificate as PEM into `dir`, for a route's `ca_file`.
    pub fn write_pem(&self, dir: &TempDir) -> PathBuf {
        dir.write("test-ca.pem", self.cert.pem())
    }

    /// A server config presenting a leaf for 127.0.0.1/localhost signed by this CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf = leaf_params()
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        server_config(vec![leaf.der().clone(), self.cert.der().clone()], &key)
    }

    /// Like [`TestCa::server_config`], offering HTTP/2 (then HTTP/1.1) via ALPN.
    pub fn server_config_h2(&self) -> Arc<ServerConfig> {
        let mut config = (*self.server_config()).clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A server config presenting a self-signed leaf that no `ca_file` trusts.
pub fn untrusted_server_config() -> Arc<ServerConfig> {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = leaf_params().self_signed(&key).expect("self-signed cert");
    server_config(vec![cert.der().clone()], &key)
}

fn leaf_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("leaf params");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p
}

fn server_config(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> Arc<ServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    Arc::new(config)
}

// ---------------------------------------------------------------- credgate in-process

/// A config with one shared listener on 127.0.0.1:0 followed by `routes` (`[[route]]` tables).
pub fn shared_config(routes: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{routes}")
}

/// Where a running credgate listens (TCP only). [`InProcess`] and [`Binary`] deref to this.
#[derive(Debug, Default)]
pub struct Listeners {
    shared: Vec<SocketAddr>,
    routes: HashMap<String, SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Listeners {
    /// The first shared listener.
    pub fn addr(&self) -> SocketAddr {
        *self
            .shared
            .first()
            .expect("credgate has no shared listener")
    }

    /// Every shared listener.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.shared
    }

    /// The address of the listener a route owns.
    pub fn route_addr(&self, route: &str) -> SocketAddr {
        *self
            .routes
            .get(route)
            .unwrap_or_else(|| panic!("route {route} has no listener of its own"))
    }

    /// The admin listener (`[server] admin`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("credgate has no admin listener")
    }
}

/// credgate running inside the test's runtime, built from the library.
pub struct InProcess {
    listeners: Listeners,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Parses `toml` (as if read from `credgate-test.toml`), binds and runs the real server.
pub async fn start_in_process(toml: &str) -> InProcess {
    let config = credgate::config::parse(toml, Path::new("credgate-test.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
    let names: Vec<String> = config.routes.iter().map(|r| r.name.to_string()).collect();
    let server = credgate::server::Server::bind(config)
        .await
        .unwrap_or_else(|e| panic!("credgate did not start: {e}"));
    let listeners = Listeners {
        shared: server.local_addrs(),
        routes: names
            .into_iter()
            .filter_map(|n| server.route_addr(&n).map(|a| (n, a)))
            .collect(),
        admin: server.admin_addr(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    InProcess {
        listeners,
        stop: Some(stop),
        task: Some(task),
    }
}

impl std::ops::Deref for InProcess {
    type Target = Listeners;

    fn deref(&self) -> &Listeners {
        &self.listeners
    }
}

impl InProcess {
    /// Stops accepting and waits for `run` to return (in-flight requests finish first).
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().expect("running").send(());
        let task = self.task.take().expect("running");
        within("credgate shutdown", task)
            .await
            .expect("server task");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------- credgate binary

/// The real `credgate` binary, run with `--log-format json`; killed on drop.
pub struct Binary {
    child: Child,
    stderr: Arc<Mutex<String>>,
    listeners: Listeners,
    /// Holds the config file (and anything else the test put there).
    pub dir: TempDir,
}

/// Writes `toml` to a temp dir and runs `credgate --log-format json --config F` with `env`
/// added (`RUST_LOG` defaults to `info`); returns once every listener has logged `listening`.
pub async fn start_binary(toml: &str, env: &[(&str, &str)]) -> Binary {
    let dir = TempDir::new();
    let config = dir.write("credgate.toml", toml);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credgate"));
    cmd.args(["--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("CREDGATE_CONFIG")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn credgate");
    let stderr = Arc::new(Mutex::new(String::new()));
    let pipe = child.stderr.take().expect("stderr piped");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut pipe = BufReader::new(pipe);
        let mut line = Vec::new();
        while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
    let mut bin = Binary {
        child,
        stderr,
        listeners: Listeners::default(),
        dir,
    };
    let expected = listener_count(toml);
    let listening = poll_until(|| {
        if let Ok(Some(status)) = bin.child.try_wait() {
            panic!("credgate exited with {status}:\n{}", bin.logs());
        }
        let lines: Vec<Value> = bin
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "listening")
            .collect();
        (lines.len() >= expected).then_some(lines)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "credgate did not log {expected} listening line(s):\n{}",
            bin.logs()
        )
    });
    // `{"message": "listening", "addr": "127.0.0.1:PORT" | "unix:/..", "listener": "shared" |
    // "admin" | "route NAME"}`; Unix sockets are left to the test that asked for them.
    for l in listening {
        let Ok(addr) = l["addr"].as_str().unwrap_or_default().parse::<SocketAddr>() else {
            continue;
        };
        match l["listener"].as_str().unwrap_or_default() {
            "shared" => bin.listeners.shared.push(addr),
            "admin" => bin.listeners.admin = Some(addr),
            other => {
                let route = other.strip_prefix("route ").unwrap_or_else(|| {
                    panic!("unexpected listening line {l}");
                });
                bin.listeners.routes.insert(route.to_owned(), addr);
            }
        }
    }
    bin
}

/// How many listeners a config binds: `[server] listen` (default one), `[server] admin`, and
/// each route's own.
fn listener_count(toml: &str) -> usize {
    let v: toml::Value = toml::from_str(toml).expect("test config is TOML");
    let server = v.get("server");
    let shared = match server.and_then(|s| s.get("listen")) {
        None => 1,
        Some(toml::Value::Array(a)) => a.len(),
        Some(_) => 1,
    };
    let admin = usize::from(server.is_some_and(|s| s.get("admin").is_some()));
    let own = v.get("route").and_then(|r| r.as_array()).map_or(0, |rs| {
        rs.iter().filter(|r| r.get("listen").is_some()).count()
    });
    shared + admin + own
}

impl std::ops::Deref for Binary {
    type Target = Listeners;

    fn deref(&self) -> &Listeners {
        &self.listeners
    }
}

impl Binary {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The stderr lines that are JSON log records.
    pub fn log_lines(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Waits for a log record matching `pred` and returns it.
    pub async fn wait_for_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        poll_until(|| self.log_lines().into_iter().find(&pred))
            .await
            .unwrap_or_else(|| panic!("no log line {what} within {WAIT:?}:\n{}", self.logs()))
    }

    /// Resident memory now and at its peak, from /proc/PID/status.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{key} missing from /proc status"))
        };
        Memory {
            rss_kib: kib("VmRSS:"),
            hwm_kib: kib("VmHWM:"),
        }
    }

    /// Sends a signal (`"TERM"`, `"INT"`, ...) with `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let exited = poll_until(|| self.child.try_wait().expect("try_wait")).await;
        exited.unwrap_or_else(|| panic!("credgate did not exit within {WAIT:?}:\n{}", self.logs()))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set sizes of a process, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The result of `credgate check`.
#[derive(Debug)]
pub struct CheckOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The config file that was checked (error messages name it).
    pub config: PathBuf,
    _dir: TempDir,
}

/// Runs `credgate check --config F` on `toml` with `env` added and logging off, so stderr holds
/// only what `check` itself prints.
pub fn run_check(toml: &str, env: &[(&str, &str)]) -> CheckOutput {
    let dir = TempDir::new();
    let config = dir.write("credgate.toml", toml);
    let out = Command::new(env!("CARGO_BIN_EXE_credgate"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .env_remove("CREDGATE_CONFIG")
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run credgate check");
    CheckOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        config,
        _dir: dir,
    }
}

// ---------------------------------------------------------------- clients

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The `error` code of a credgate error body.
    pub fn error_code(&self) -> String {
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {v}"))
            .to_owned()
    }
}

/// A request with an empty body; add headers with `.headers_mut()` or build your own.
pub fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).expect("valid test request")
}

/// `GET path` on a new connection, read in full.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(addr, request(Method::GET, path, headers)).await
}

/// Sends a request on a new HTTP/1.1 connection and reads the whole response.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Reply
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = open(addr, req).await.into_parts();
    let body = within("response body", body.collect())
        .await
        .expect("read response body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends a request on a new HTTP/1.1 connection and returns as soon as the head arrives,
/// leaving the body to stream. `Host` defaults to `addr`.
pub async fn open<B>(addr: SocketAddr, mut req: Request<B>) -> Response<Incoming>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if !req.headers().contains_key(header::HOST) {
        let host = HeaderValue::from_str(&addr.to_string()).unwrap();
        req.headers_mut().insert(header::HOST, host);
    }
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to credgate");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    within("response head", sender.send_request(req))
        .await
        .expect("send request")
}

/// A response read from a raw socket: the status, the head as text and the body bytes.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    /// Lowercase names and values of the response headers.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Writes `request` verbatim to a new connection and reads until the server closes it, so the
/// request should carry `Connection: close`. The body is not de-chunked.
pub async fn raw(addr: SocketAddr, request: &str) -> RawReply {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to credgate");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    within(
        "server to close the connection",
        stream.read_to_end(&mut buf),
    )
    .await
    .expect("read response");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    RawReply {
        status,
        head,
        body: buf[split + 4..].to_vec(),
    }
}

/// An address on 127.0.0.1 that refuses connections: a port bound but never listened on, and
/// kept bound until the test process ends. A port bound and closed again could meanwhile go to
/// another test's listener, or be picked as a connection's own source port (a connection to it
/// would then connect to itself).
pub fn closed_port() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    std::mem::forget(socket);
    addr
}

// ---------------------------------------------------------------- shared assertions and routes

/// Asserts `r` is credgate's own error `code` with `status` for `route`; returns its message.
pub fn credgate_error(r: &Reply, status: StatusCode, code: &str, route: Option<&str>) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (&v["error"], &v["route"]),
        (&json!(code), &json!(route)),
        "{v}"
    );
    v["message"].as_str().expect("a message").to_owned()
}

/// An `oblien_gateway` route "ws" on `/w` for one fixed workspace, fetching from `fake` and
/// forwarding to its gateway; `keys` are more `[route.auth]` lines.
pub fn oblien_route(fake: &credgate::fake::FakeOblien, workspace: &str, keys: &str) -> String {
    format!(
        r#"[[route]]
name = "ws"
prefix = "/w"
upstream = "http://{gateway}"
[route.auth]
type = "oblien_gateway"
api = "http://{api}"
workspace_id = "{workspace}"
client_id = "{id}"
client_secret = "{secret}"
fetch_timeout = "2s"
{keys}
"#,
        gateway = fake.gateway_addr(),
        api = fake.api_addr(),
        id = fake.options().client_id,
        secret = fake.options().client_secret,
    )
}
