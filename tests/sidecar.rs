//! credgate as a sidecar: the admin listener (`/readyz`, `/metrics`, `/status`, `/`), hot
//! reload (SIGHUP, a rotated secret file, a broken config), local access control (the exposure
//! check, `local_token`, Unix sockets, per-route policy) and `credgate health`.
//!
//! The real server runs in-process where that suffices ([`start_in_process`]); reloads, signals,
//! exit codes and logs use the real binary with `--log-format json`, its ports read from its
//! `listening` lines ([`start_binary`], or [`Launched`] where that does not fit). Everything
//! listens on loopback, in a temp dir of its own; every wait is bounded.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use credgate::fake::{Endpoint, FakeOblien, FakeOptions};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;
use tokio::sync::watch;

// ---------------------------------------------------------------- configs

/// `[server]` on 127.0.0.1:0 with an admin listener, plus `extra` lines.
/// `credgate_config_reloads_total{result=...}` in a scrape.
fn config_reloads(metrics: &[Sample], result: &str) -> Option<f64> {
    metric(
        metrics,
        "credgate_config_reloads_total",
        &[("result", result)],
    )
}

fn server(extra: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{extra}\n")
}

/// A `headers` route "api" on `/api` that sends `X-Api-Key: <key>` (`key` is a TOML value).
fn api_route(upstream: &str, key: &str) -> String {
    format!(
        r#"[[route]]
name = "api"
prefix = "/api"
upstream = "{upstream}"
[route.auth]
type = "headers"
headers = {{ "X-Api-Key" = {key} }}
"#
    )
}

/// TOML for a literal string.
fn lit(s: &str) -> String {
    format!("\"{s}\"")
}

/// Replaces `path` with `contents` the way secret managers do: write a temp file, rename it over.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

// ---------------------------------------------------------------- credgate binary

/// The real binary on a config file the test placed itself (support's [`start_binary`] writes
/// its own, and expects the process to keep running): `--log-format json`, stderr captured,
/// killed on drop.
struct Launched {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn launch(config: &Path) -> Launched {
    let mut child = Command::new(env!("CARGO_BIN_EXE_credgate"))
        .args(["--log-format", "json", "--config"])
        .arg(config)
        .env_remove("CREDGATE_CONFIG")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn credgate");
    let pipe = child.stderr.take().expect("stderr piped");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let reader = std::thread::spawn(move || {
        let mut pipe = BufReader::new(pipe);
        let mut line = Vec::new();
        while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    });
    Launched {
        child,
        stderr,
        reader: Some(reader),
    }
}

impl Launched {
    fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn records(&self, message: &str) -> Vec<Value> {
        records(&self.logs(), message)
    }

    /// Waits for a record whose message starts with `message` and that satisfies `pred`.
    async fn wait_for(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Value {
        poll_until(|| self.records(message).into_iter().find(&pred))
            .await
            .unwrap_or_else(|| panic!("no \"{message}\" log within {WAIT:?}:\n{}", self.logs()))
    }

    /// Waits for `n` `listening` lines; returns each listener's address by its name
    /// ("shared", "admin", "route NAME").
    async fn listening(&mut self, n: usize) -> HashMap<String, SocketAddr> {
        let lines = poll_until(|| {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("credgate exited with {status}:\n{}", self.logs());
            }
            let lines = self.records("listening");
            (lines.len() >= n).then_some(lines)
        })
        .await
        .unwrap_or_else(|| panic!("credgate did not log {n} listening lines:\n{}", self.logs()));
        lines
            .iter()
            .map(|l| {
                let addr = l["addr"].as_str().expect("addr field");
                let name = l["listener"].as_str().expect("listener field");
                (name.to_owned(), addr.parse().expect("addr is IP:port"))
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit by itself, and for its stderr to be read to the end.
    async fn exit(&mut self) -> ExitStatus {
        let status = poll_until(|| self.child.try_wait().expect("try_wait"))
            .await
            .unwrap_or_else(|| panic!("credgate did not exit in {WAIT:?}:\n{}", self.logs()));
        if let Some(reader) = self.reader.take() {
            reader.join().expect("stderr reader");
        }
        status
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON log records in `logs` whose message starts with `message`.
fn records(logs: &str, message: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// Runs `credgate ARGS` to completion off the runtime (the in-process server keeps serving).
async fn run_credgate(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_credgate"))
            .args(&args)
            .env_remove("CREDGATE_CONFIG")
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .output()
            .expect("run credgate")
    });
    within("credgate to exit", run).await.expect("join")
}

// ---------------------------------------------------------------- waiting and reading

/// Calls `check` every 50 ms until it returns `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /readyz`: the status and the JSON body.
async fn readyz(admin: SocketAddr) -> (StatusCode, Value) {
    let r = get(admin, "/readyz", &[]).await;
    (r.status, r.json())
}

/// The `X-Api-Key` the upstream received with its `i`-th request.
fn key_of(up: &Upstream, i: usize) -> String {
    up.received()[i]
        .header("x-api-key")
        .expect("x-api-key reached the upstream")
        .to_owned()
}

/// Asserts `r` is credgate's own error with this status and code.
fn assert_refused(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.error_code(), code, "{}", r.text());
}

// ---------------------------------------------------------------- Prometheus text

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the exposition strictly: every line is a comment or `name{labels} value` with a
/// finite value, every sample belongs to a declared family, and the text ends with `# EOF`.
fn parse_metrics(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "no final # EOF:\n{text}");
    let mut families = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split(' ');
            if words.next() == Some("TYPE") {
                families.push(words.next().expect("TYPE names a family").to_owned());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `name value`: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value is not a number: {line:?}"));
        assert!(value.is_finite(), "{line:?}");
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("labels not closed: {line:?}"));
                (name, parse_labels(inner, line))
            }
        };
        let valid_name = name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
        assert!(!name.is_empty() && valid_name, "bad metric name: {line:?}");
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "sample of an undeclared family: {line:?}"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

/// `k="v",k2="v2"` (values may hold `\"`, `\\` and `\n` escapes).
fn parse_labels(mut s: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label: {line:?}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape: {line:?}"),
                },
                Some((_, c)) => value.push(c),
                None => panic!("label value not closed: {line:?}"),
            }
        };
        assert!(
            labels.insert(key.to_owned(), value).is_none(),
            "label twice: {line:?}"
        );
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    labels
}

/// The value of the sample with exactly this name and these labels.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// Scrapes `/metrics` and parses it.
async fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let r = get(admin, "/metrics", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let ct = r.headers[header::CONTENT_TYPE].to_str().unwrap();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    parse_metrics(&r.text())
}

fn requests(samples: &[Sample], route: &str, class: &str) -> f64 {
    metric(
        samples,
        "credgate_requests_total",
        &[("route", route), ("class", class)],
    )
    .unwrap_or(0.0)
}

// ---------------------------------------------------------------- 1. readiness

#[tokio::test]
async fn readyz_follows_whether_the_route_has_a_usable_token() {
    let fake = FakeOblien::start(FakeOptions {
        gateway_token_lifetime: Duration::from_secs(3),
        ..FakeOptions::default()
    })
    .expect("start the fake");
    fake.set_token_endpoint_down(true);
    let cg = start_in_process(&(server("") + &oblien_route(&fake, "ws_a", ""))).await;

    // The prefetch fails: not ready, naming the route and the token endpoint's answer.
    let body = eventually("the failed prefetch shows in /readyz", WAIT, || async {
        let (status, body) = readyz(cg.admin_addr()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        body["not_ready"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("HTTP 503"))
            .then_some(body)
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    let not_ready = body["not_ready"].as_array().unwrap();
    assert_eq!(not_ready.len(), 1, "{body}");
    assert_eq!(not_ready[0]["route"], "ws", "{body}");
    let reason = not_ready[0]["reason"].as_str().unwrap();
    assert!(reason.contains("ws_a"), "names the workspace: {reason}");

    // The endpoint comes back: the backed-off retry (at most 2 s after the first) fetches a token.
    fake.set_token_endpoint_down(false);
    let body = eventually("/readyz turns 200", Duration::from_secs(5), || async {
        let (status, body) = readyz(cg.admin_addr()).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(body, json!({"ready": true, "not_ready": []}));
    let fetched = Instant::now();

    // Down again: still ready while the 2-3 s token lasts, not ready once it lapses.
    fake.set_token_endpoint_down(true);
    assert_eq!(readyz(cg.admin_addr()).await.0, StatusCode::OK);
    let body = eventually(
        "/readyz turns 503 again",
        Duration::from_secs(5),
        || async {
            let (status, body) = readyz(cg.admin_addr()).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        },
    )
    .await;
    let lapsed = fetched.elapsed();
    assert!(
        lapsed >= Duration::from_millis(1200) && lapsed <= Duration::from_millis(3500),
        "a 2-3 s token stopped counting as usable after {lapsed:?}"
    );
    assert_eq!(body["not_ready"][0]["route"], "ws", "{body}");
    let reason = body["not_ready"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("HTTP 503"),
        "says the refresh failed: {reason}"
    );
    cg.shutdown().await;
}

// ---------------------------------------------------------------- 2. metrics

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_exactly_the_requests_sent() {
    let fake = FakeOblien::start(FakeOptions::default()).expect("start the fake");
    let up = Upstream::echo().await;
    let toml =
        server("") + &api_route(&up.url(), &lit("key-one")) + &oblien_route(&fake, "ws_a", "");
    let cg = start_in_process(&toml).await;
    eventually("the prefetched token", WAIT, || async {
        (readyz(cg.admin_addr()).await.0 == StatusCode::OK).then_some(())
    })
    .await;

    let before = scrape(cg.admin_addr()).await;
    for _ in 0..5 {
        assert_eq!(get(cg.addr(), "/api/x", &[]).await.status, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(get(cg.addr(), "/w/files", &[]).await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_refused(
            &get(cg.addr(), "/nowhere", &[]).await,
            StatusCode::NOT_FOUND,
            "no_route",
        );
    }
    let after = scrape(cg.admin_addr()).await;

    let delta = |route, class| requests(&after, route, class) - requests(&before, route, class);
    assert_eq!(delta("api", "2xx"), 5.0);
    assert_eq!(delta("ws", "2xx"), 3.0);
    assert_eq!(delta("-", "4xx"), 2.0);
    assert_eq!(delta("api", "4xx") + delta("api", "5xx"), 0.0);
    let count = |s: &[Sample]| {
        metric(
            s,
            "credgate_upstream_latency_seconds_count",
            &[("route", "api")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count(&after) - count(&before), 5.0);
    assert_eq!(up.count(), 5);

    let fetches = |result| {
        metric(
            &after,
            "credgate_token_fetches_total",
            &[("route", "ws"), ("result", result)],
        )
    };
    assert_eq!(fetches("ok"), Some(1.0));
    assert_eq!(fetches("failed"), Some(0.0));
    assert_eq!(fake.calls(Endpoint::Enable), 1);
    let expires = metric(
        &after,
        "credgate_token_expires_in_seconds",
        &[("route", "ws"), ("key", "ws_a")],
    )
    .expect("an expiry gauge for the cached token");
    assert!(expires > 50.0 && expires <= 60.0, "{expires}");
    assert_eq!(
        metric(
            &after,
            "credgate_token_fetches_total",
            &[("route", "api"), ("result", "ok")]
        ),
        None,
        "a static route has no token"
    );
    cg.shutdown().await;
}

// ---------------------------------------------------------------- 3. no secrets on the admin pages

#[tokio::test]
async fn admin_pages_show_no_secret_and_no_token() {
    const CLIENT_SECRET: &str = "cs-sidecar-7f3b9c2e41d8";
    const API_KEY: &str = "ak-sidecar-5e0c1a9f77b2";
    const LOCAL_TOKEN: &str = "lt-sidecar-b61d04e3a9f5";
    let fake = FakeOblien::start(FakeOptions {
        client_secret: CLIENT_SECRET.into(),
        ..FakeOptions::default()
    })
    .expect("start the fake");
    let up = Upstream::echo().await;
    let toml = server(&format!("local_token = \"{LOCAL_TOKEN}\""))
        + &api_route(&up.url(), &lit(API_KEY))
        + &oblien_route(&fake, "ws_a", "");
    let cg = start_in_process(&toml).await;
    let auth = format!("Bearer {LOCAL_TOKEN}");
    let proxy_auth = [("proxy-authorization", auth.as_str())];

    let r = get(cg.addr(), "/w/files", &proxy_auth).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let bearer = r.json()["headers"]["authorization"]
        .as_str()
        .expect("the gateway saw an Authorization header")
        .to_owned();
    let jwt = bearer.strip_prefix("Bearer ").expect("a bearer token");
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).expect("JWT claims");
    let inner = claims["token"].as_str().expect("the connection token");
    let r = get(cg.addr(), "/api/x", &proxy_auth).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.only().header("x-api-key"), Some(API_KEY));

    let secrets = [CLIENT_SECRET, API_KEY, LOCAL_TOKEN, jwt, parts[2], inner];
    let status = get(cg.admin_addr(), "/status", &[]).await;
    let page = get(cg.admin_addr(), "/", &[]).await;
    let metrics = get(cg.admin_addr(), "/metrics", &[]).await;
    let ready = get(cg.admin_addr(), "/readyz", &[]).await;
    for (what, r) in [
        ("/status", &status),
        ("/", &page),
        ("/metrics", &metrics),
        ("/readyz", &ready),
    ] {
        assert_eq!(r.status, StatusCode::OK, "{what}");
        let text = r.text();
        for s in secrets {
            assert!(!text.contains(s), "{what} shows a secret or token:\n{text}");
        }
    }

    // They do describe the routes and the token, without the values.
    let s = status.json();
    let names: Vec<&str> = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "ws"], "{s}");
    assert_eq!(s["routes"][0]["injects"], json!(["x-api-key"]), "{s}");
    let token = &s["routes"][1]["tokens"][0];
    assert_eq!(
        (&token["key"], &token["usable"], &token["fetches_ok"]),
        (&json!("ws_a"), &json!(true), &json!(1)),
        "{s}"
    );
    let html = page.text();
    assert!(
        html.contains("<td>api") && html.contains("<td>ws"),
        "{html}"
    );
    cg.shutdown().await;
}

// ---------------------------------------------------------------- 4. SIGHUP

/// An upstream whose `/stream` answers one chunk, then the second once `gate` opens; every
/// other path answers 200 at once.
async fn gated_upstream(gate: watch::Receiver<bool>) -> Upstream {
    Upstream::start(Handler::stream(move |req: Request<Incoming>| {
        let mut gate = gate.clone();
        async move {
            if req.uri().path() != "/stream" {
                return json_response(StatusCode::OK, &json!({"ok": true}));
            }
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first chunk\n")).await;
                let _ = tokio::time::timeout(WAIT, gate.wait_for(|open| *open)).await;
                let _ = tx.send(Bytes::from_static(b"second chunk\n")).await;
            });
            Response::new(body)
        }
    }))
    .await
}

#[tokio::test]
async fn sighup_reloads_a_changed_header_while_a_stream_in_flight_completes() {
    let (open_gate, gate) = watch::channel(false);
    let up = gated_upstream(gate).await;
    // The config is reached through a symlink into a directory credgate does not watch, so
    // only the signal can make it notice the change.
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    let real = dir.path().join("real/credgate.toml");
    let config = dir.path().join("credgate.toml");
    let toml = |key: &str| server("") + &api_route(&up.url(), &lit(key));
    std::fs::write(&real, toml("key-one")).unwrap();
    std::os::unix::fs::symlink(&real, &config).unwrap();
    let mut cg = launch(&config);
    let addrs = cg.listening(2).await;
    let addr = addrs["shared"];

    let res = open(addr, request(Method::GET, "/api/stream", &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = within("the first chunk", body.frame())
        .await
        .expect("a frame")
        .expect("a good frame")
        .into_data()
        .expect("data");
    assert_eq!(first, "first chunk\n");

    std::fs::write(&real, toml("key-two")).unwrap();
    // Longer than the reloader's 250 ms debounce: the edit alone changes nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = get(addr, "/api/before", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    cg.signal("HUP");
    let reloaded = cg.wait_for("config reloaded", |_| true).await;
    assert_eq!(reloaded["trigger"], "SIGHUP", "{reloaded}");
    let r = get(addr, "/api/after", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.count(), 3);
    assert_eq!(
        key_of(&up, 0),
        "key-one",
        "the stream started before the reload"
    );
    assert_eq!(key_of(&up, 1), "key-one", "no reload without the signal");
    assert_eq!(
        key_of(&up, 2),
        "key-two",
        "the next request after the reload"
    );

    // The request that was in flight during the reload still completes, intact.
    open_gate.send(true).unwrap();
    let rest = within("the rest of the stream", body.collect())
        .await
        .expect("the stream ends cleanly")
        .to_bytes();
    assert_eq!(rest, "second chunk\n");
    assert_eq!(cg.records("config reloaded").len(), 1, "{}", cg.logs());
    assert!(cg.records("config reload rejected").is_empty());
    let metrics = scrape(addrs["admin"]).await;
    let reloads = |result| config_reloads(&metrics, result);
    assert_eq!(reloads("ok"), Some(1.0));
}

// ---------------------------------------------------------------- 5. secret file rotation

#[tokio::test]
async fn a_rotated_secret_file_is_used_without_a_signal() {
    let up = Upstream::echo().await;
    let secrets = TempDir::new();
    let secret = secrets.write("api-key", "key-one\n");
    let key = format!("{{ file = \"{}\" }}", secret.display());
    let cg = start_binary(&(server("") + &api_route(&up.url(), &key)), &[]).await;
    assert_eq!(get(cg.addr(), "/api/x", &[]).await.status, StatusCode::OK);
    assert_eq!(key_of(&up, 0), "key-one");

    replace_file(&secret, "key-two\n");
    let rotated = Instant::now();
    eventually(
        "the new key reaches the upstream",
        Duration::from_secs(5),
        || async {
            let r = get(cg.addr(), "/api/x", &[]).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            (key_of(&up, up.count() - 1) == "key-two").then_some(())
        },
    )
    .await;
    assert!(
        rotated.elapsed() >= Duration::from_millis(200),
        "the reload waits for the write burst to end"
    );
    let keys: Vec<String> = (0..up.count()).map(|i| key_of(&up, i)).collect();
    let switched = keys.iter().position(|k| k == "key-two").unwrap();
    assert!(
        keys[..switched].iter().all(|k| k == "key-one")
            && keys[switched..].iter().all(|k| k == "key-two"),
        "once switched, only the new key is sent: {keys:?}"
    );
    let metrics = scrape(cg.admin_addr()).await;
    let reloads = |result| config_reloads(&metrics, result);
    assert_eq!(reloads("ok"), Some(1.0), "one rename, one reload");
    assert_eq!(reloads("failed"), None);
    let reloaded = records(&cg.logs(), "config reloaded");
    assert_eq!(reloaded.len(), 1, "{}", cg.logs());
    assert_eq!(reloaded[0]["trigger"], "file change");
}

// ---------------------------------------------------------------- 6. a broken config

#[tokio::test]
async fn a_broken_config_is_rejected_and_the_old_one_keeps_serving() {
    let up = Upstream::echo().await;
    let cg = start_binary(&(server("") + &api_route(&up.url(), &lit("key-one"))), &[]).await;
    let config = cg.dir.path().join("credgate.toml");
    assert_eq!(get(cg.addr(), "/api/x", &[]).await.status, StatusCode::OK);

    let broken = server("") + &api_route(&up.url(), &lit("key-two")) + "[[route]\nname = \n";
    replace_file(&config, &broken);
    let rejected = cg
        .wait_for_log("config reload rejected", |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config reload rejected"))
        })
        .await;
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    let error = rejected["error"].as_str().expect("an error field");
    assert!(
        error.contains(&config.display().to_string()) && error.contains("line"),
        "names the file and line: {error}"
    );

    let r = get(cg.addr(), "/api/y", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.count(), 2);
    assert_eq!(key_of(&up, 1), "key-one", "the old config still serves");
    let metrics = scrape(cg.admin_addr()).await;
    let reloads = |result| config_reloads(&metrics, result);
    assert_eq!(reloads("failed"), Some(1.0));
    assert_eq!(reloads("ok"), None);
    assert!(
        records(&cg.logs(), "config reloaded").is_empty(),
        "{}",
        cg.logs()
    );
}

// ---------------------------------------------------------------- 7. exposure

#[tokio::test]
async fn a_non_loopback_listener_needs_a_local_token_or_allow_remote() {
    let up = Upstream::echo().await;
    let dir = TempDir::new();
    let route = api_route(&up.url(), &lit("key-one"));
    let config = dir.write(
        "exposed.toml",
        format!("[server]\nlisten = \"0.0.0.0:0\"\n{route}"),
    );
    let mut cg = launch(&config);
    let status = cg.exit().await;
    let logs = cg.logs();
    assert_eq!(status.code(), Some(2), "a config error:\n{logs}");
    assert!(logs.contains("local_token"), "says what to set:\n{logs}");
    assert!(cg.records("listening").is_empty(), "{logs}");

    let remote = format!("[server]\nlisten = \"0.0.0.0:0\"\nallow_remote = true\n{route}");
    let cg = start_binary(&remote, &[]).await;
    let bound = cg.addr();
    assert!(bound.ip().is_unspecified(), "{bound}");
    let loopback = SocketAddr::from(([127, 0, 0, 1], bound.port()));
    let r = get(loopback, "/api/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.only().header("x-api-key"), Some("key-one"));
}

// ---------------------------------------------------------------- 8. local token

#[tokio::test]
async fn local_token_is_required_and_never_forwarded() {
    const TOKEN: &str = "lt-4d2c81f0aa";
    let up = Upstream::echo().await;
    let toml = server(&format!(
        "local_token = \"{TOKEN}\"\nlocal_token_header = \"X-Credgate-Token\""
    )) + &api_route(&up.url(), &lit("key-one"));
    let cg = start_in_process(&toml).await;
    let basic = |pass: &str| format!("Basic {}", STANDARD.encode(format!("x:{pass}")));
    let forward = |extra: &str| {
        format!(
            "GET http://{up}/fw?q=1 HTTP/1.1\r\nHost: {up}\r\nConnection: close\r\n{extra}\r\n",
            up = up.addr()
        )
    };

    // Missing or wrong: 401 in reverse mode, 407 to a forward-proxy request.
    let r = get(cg.addr(), "/api/x", &[]).await;
    assert_refused(&r, StatusCode::UNAUTHORIZED, "local_token_required");
    assert!(r.headers.contains_key(header::WWW_AUTHENTICATE));
    for (name, value) in [
        ("proxy-authorization", "Bearer lt-wrong".to_owned()),
        ("proxy-authorization", basic("lt-wrong")),
        ("proxy-authorization", format!("Token {TOKEN}")),
        ("x-credgate-token", "lt-wrong".to_owned()),
        ("authorization", format!("Bearer {TOKEN}")),
    ] {
        let r = get(cg.addr(), "/api/x", &[(name, &value)]).await;
        assert_refused(&r, StatusCode::UNAUTHORIZED, "local_token_required");
    }
    for extra in ["", "Proxy-Authorization: Bearer lt-wrong\r\n"] {
        let r = raw(cg.addr(), &forward(extra)).await;
        assert_eq!(r.status, 407, "{}", r.head);
        assert_eq!(r.json()["error"], "local_token_required");
        assert!(
            r.headers().iter().any(|(k, _)| k == "proxy-authenticate"),
            "{}",
            r.head
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    // Right: Bearer, Basic with the token as password, the configured header.
    let bearer = format!("Bearer {TOKEN}");
    for (name, value) in [
        ("proxy-authorization", bearer.clone()),
        ("proxy-authorization", basic(TOKEN)),
        ("x-credgate-token", TOKEN.to_owned()),
    ] {
        let r = get(cg.addr(), "/api/x", &[(name, &value)]).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text());
    }
    let r = raw(
        cg.addr(),
        &forward(&format!("Proxy-Authorization: {}\r\n", basic(TOKEN))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = up.received();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].path_and_query(), "/fw?q=1");
    for r in &seen {
        assert_eq!(r.header("x-api-key"), Some("key-one"));
        assert_eq!(r.header("proxy-authorization"), None, "{r:?}");
        assert_eq!(r.header("x-credgate-token"), None, "{r:?}");
        let all: Vec<&str> = r.headers.values().map(|v| v.to_str().unwrap()).collect();
        assert!(!all.iter().any(|v| v.contains(TOKEN)), "{r:?}");
    }
    cg.shutdown().await;
}

// ---------------------------------------------------------------- 9. Unix socket

/// `GET path` over a Unix socket, read in full.
async fn get_unix(path: &Path, uri: &str) -> Reply {
    let stream = within("connect", tokio::net::UnixStream::connect(path))
        .await
        .expect("connect to the socket");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    let req = request(Method::GET, uri, &[("host", "localhost")]);
    let res = within("response", sender.send_request(req))
        .await
        .expect("send request");
    let (parts, body) = res.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The socket's permission bits, in octal ("600").
fn mode(path: &Path) -> String {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(path).expect("the socket exists");
    assert!(meta.file_type().is_socket(), "{}", path.display());
    format!("{:o}", meta.permissions().mode() & 0o777)
}

#[tokio::test]
async fn unix_socket_listener_has_owner_only_mode_and_forwards_with_credentials() {
    let up = Upstream::echo().await;
    let unix_config = |dir: &TempDir, extra: &str| -> (PathBuf, String) {
        let sock = dir.path().join("cg.sock");
        let toml = format!(
            "[server]\nlisten = \"unix:{}\"\n{extra}\n{}",
            sock.display(),
            api_route(&up.url(), &lit("key-one"))
        );
        (sock, toml)
    };

    let dir = TempDir::new();
    let (sock, toml) = unix_config(&dir, "");
    let cg = start_in_process(&toml).await;
    assert_eq!(mode(&sock), "600");
    let r = get_unix(&sock, "/api/over-unix").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = up.only();
    assert_eq!(seen.path_and_query(), "/over-unix");
    assert_eq!(seen.header("x-api-key"), Some("key-one"));
    cg.shutdown().await;
    assert!(!sock.exists(), "the socket is removed on shutdown");

    let dir = TempDir::new();
    let (sock, toml) = unix_config(&dir, "socket_mode = \"0660\"");
    let cg = start_in_process(&toml).await;
    assert_eq!(mode(&sock), "660");
    assert_eq!(get_unix(&sock, "/api/y").await.status, StatusCode::OK);
    assert_eq!(up.count(), 2);
    cg.shutdown().await;
}

#[tokio::test]
async fn a_unix_socket_added_by_a_reload_gets_the_reloaded_mode() {
    let up = Upstream::echo().await;
    let sockets = TempDir::new();
    let (a, b) = (sockets.path().join("a.sock"), sockets.path().join("b.sock"));
    let route = api_route(&up.url(), &lit("key-one"));
    let cg = start_binary(
        &format!("[server]\nlisten = \"unix:{}\"\n{route}", a.display()),
        &[],
    )
    .await;
    assert_eq!(mode(&a), "600");

    let reloaded = format!(
        "[server]\nlisten = [\"unix:{}\", \"unix:{}\"]\nsocket_mode = \"0660\"\n{route}",
        a.display(),
        b.display()
    );
    replace_file(&cg.dir.path().join("credgate.toml"), &reloaded);
    cg.wait_for_log("config reloaded", |l| l["message"] == "config reloaded")
        .await;
    assert_eq!(get_unix(&b, "/api/x").await.status, StatusCode::OK);
    assert_eq!(mode(&b), "660", "the reloaded config asks for 0660");
}

/// Each of two workers accepts on every listener: a reload that drops a listener closes it on
/// both (nothing answers there any more), and one it adds is served.
#[tokio::test]
async fn a_listener_dropped_by_a_reload_stops_accepting_on_every_worker() {
    let up = Upstream::echo().await;
    let own = |name: &str| {
        format!(
            "[server]\nlisten = []\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nauth = {{ type = \"none\" }}\n",
            up.url()
        )
    };
    let cg = start_binary(&own("old"), &[("CREDGATE_WORKERS", "2")]).await;
    let old = cg.route_addr("old");
    // A connection each, open at once: the two workers race to accept them.
    let requests = (0..16).map(|i| async move { get(old, &format!("/before/{i}"), &[]).await });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status, StatusCode::OK);
    }

    replace_file(&cg.dir.path().join("credgate.toml"), &own("new"));
    cg.wait_for_log("config reloaded", |l| l["message"] == "config reloaded")
        .await;

    let gone = tokio::net::TcpStream::connect(old).await;
    assert_eq!(
        gone.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "nothing listens where the dropped listener was"
    );
    let added = cg
        .wait_for_log("new listening", |l| {
            l["message"] == "listening" && l["listener"] == "route new"
        })
        .await;
    let new: SocketAddr = added["addr"].as_str().unwrap().parse().unwrap();
    let requests = (0..16).map(|i| async move { get(new, &format!("/after/{i}"), &[]).await });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(up.count(), 32);
}

// ---------------------------------------------------------------- 10. policy

#[tokio::test]
async fn route_policy_refuses_methods_and_paths_before_the_upstream() {
    let (open, guarded) = (Upstream::echo().await, Upstream::echo().await);
    let toml = format!(
        r#"{server}
[[route]]
name = "api"
prefix = "/api"
upstream = "{open}/v1"
allow_methods = ["GET"]
deny_paths = ["/v1/admin/**"]
[route.auth]
type = "headers"
headers = {{ "X-Api-Key" = "key-one" }}

[[route]]
name = "public"
prefix = "/pub"
upstream = "{guarded}/v1"
allow_paths = ["/v1/public/**", "/v1/health"]
[route.auth]
type = "headers"
headers = {{ "X-Api-Key" = "key-two" }}
"#,
        server = server(""),
        open = open.url(),
        guarded = guarded.url(),
    );
    let cg = start_in_process(&toml).await;

    let post = request(Method::POST, "/api/items", &[]);
    assert_refused(
        &send(cg.addr(), post).await,
        StatusCode::FORBIDDEN,
        "forbidden_by_policy",
    );
    for path in ["/api/admin/x", "/api/admin/a/b"] {
        let r = get(cg.addr(), path, &[]).await;
        assert_refused(&r, StatusCode::FORBIDDEN, "forbidden_by_policy");
        assert_eq!(r.json()["route"], "api");
    }
    for path in ["/pub/private", "/pub/publicity", "/pub/health/x"] {
        let r = get(cg.addr(), path, &[]).await;
        assert_refused(&r, StatusCode::FORBIDDEN, "forbidden_by_policy");
    }
    assert_eq!(
        (open.count(), guarded.count()),
        (0, 0),
        "refused: nothing sent"
    );

    for path in ["/api/items", "/api/administrator"] {
        assert_eq!(
            get(cg.addr(), path, &[]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    for path in ["/pub/public/a", "/pub/public/a/b", "/pub/health"] {
        assert_eq!(
            get(cg.addr(), path, &[]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let paths = |up: &Upstream| -> Vec<String> {
        up.received()
            .iter()
            .map(|r| r.path_and_query().to_owned())
            .collect()
    };
    assert_eq!(paths(&open), ["/v1/items", "/v1/administrator"]);
    assert_eq!(
        paths(&guarded),
        ["/v1/public/a", "/v1/public/a/b", "/v1/health"]
    );
    cg.shutdown().await;
}

#[tokio::test]
async fn a_path_refused_by_policy_fetches_no_token() {
    let fake = FakeOblien::start(FakeOptions::default()).expect("start the fake");
    let route = oblien_route(&fake, "ws_a", "")
        .replace("[route.auth]", "deny_paths = [\"/admin/**\"]\n[route.auth]");
    let cg = start_in_process(&(server("") + &route + "prefetch = false\n")).await;

    // While the token endpoint is down, and then while it is up.
    fake.set_token_endpoint_down(true);
    let r = get(cg.addr(), "/w/admin/x", &[]).await;
    assert_refused(&r, StatusCode::FORBIDDEN, "forbidden_by_policy");
    fake.set_token_endpoint_down(false);
    let r = get(cg.addr(), "/w/admin/y", &[]).await;
    assert_refused(&r, StatusCode::FORBIDDEN, "forbidden_by_policy");
    assert_eq!(
        (fake.calls(Endpoint::Enable), fake.gateway_requests()),
        (0, 0),
        "a refused request spends no credential"
    );
    cg.shutdown().await;
}

// ---------------------------------------------------------------- 11. credgate health

#[tokio::test]
async fn health_command_exits_0_when_ready_and_1_otherwise() {
    let up = Upstream::echo().await;
    let ready = start_in_process(&(server("") + &api_route(&up.url(), &lit("k")))).await;
    let out = run_credgate(&["health", "--admin", &ready.admin_addr().to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("the /readyz body"),
        json!({"ready": true, "not_ready": []})
    );

    let fake = FakeOblien::start(FakeOptions::default()).expect("start the fake");
    fake.set_token_endpoint_down(true);
    let waiting = start_in_process(&(server("") + &oblien_route(&fake, "ws_a", ""))).await;
    let out = run_credgate(&["health", "--admin", &waiting.admin_addr().to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let body: Value = serde_json::from_str(&stdout).expect("the /readyz body");
    assert_eq!(body["not_ready"][0]["route"], "ws", "{body}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready (HTTP 503)"));

    let nobody = closed_port();
    let out = run_credgate(&["health", "--admin", &nobody.to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&nobody.to_string()), "{stderr}");
    ready.shutdown().await;
    waiting.shutdown().await;
}
