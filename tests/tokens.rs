//! Fetched tokens end to end: credgate (in-process) between a real client and the embedded fake
//! Oblien control plane, gateway and OAuth2 server, all on 127.0.0.1. Asserts are on what the
//! fake was asked for (exact call counts), what the upstream received and what the caller got.
//!
//! The fake's gateway JWTs carry `exp` in whole seconds, so a "4 s" token has 3 to 4 s left when
//! credgate reads it; timing bounds below allow for that.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use credgate::fake::{ClientAuth, Endpoint, FakeOblien, FakeOptions, OAuthRequest};
use futures_util::future::join_all;
use http::{header, Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier};
use tokio::time::MissedTickBehavior;

const CLIENT_SECRET: &str = "demo-secret";
const OAUTH_SECRET: &str = "demo-oauth-secret";

// ---------------------------------------------------------------- set-up

/// A fake whose gateway JWTs live `lifetime`.
fn fake_with_lifetime(lifetime: Duration) -> FakeOblien {
    FakeOblien::start(FakeOptions {
        gateway_token_lifetime: lifetime,
        ..FakeOptions::default()
    })
    .expect("start the fake")
}

/// A config with one route, `name` on `prefix`, forwarding to `upstream`; `auth` holds the
/// `[route.auth]` lines.
fn one_route(name: &str, prefix: &str, upstream: &str, auth: &str) -> String {
    shared_config(&format!(
        "[[route]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\n\
         [route.auth]\n{auth}\n"
    ))
}

/// The `oblien_gateway` route "ws" on `/w`, fetching from `fake` and forwarding to `upstream`;
/// `keys` are more `[route.auth]` lines.
fn oblien_config(fake: &FakeOblien, upstream: &str, keys: &str) -> String {
    let auth = format!(
        r#"type = "oblien_gateway"
api = "http://{api}"
client_id = "demo-client"
client_secret = "{CLIENT_SECRET}"
fetch_timeout = "2s"
{keys}"#,
        api = fake.api_addr(),
    );
    one_route("ws", "/w", upstream, &auth)
}

/// credgate with the "ws" route forwarding to the fake's gateway.
async fn start_oblien(fake: &FakeOblien, keys: &str) -> InProcess {
    let gateway = format!("http://{}", fake.gateway_addr());
    start_in_process(&oblien_config(fake, &gateway, keys)).await
}

/// A fixed workspace whose first token is fetched by the first request.
const WS_A_ON_DEMAND: &str = "workspace_id = \"ws_a\"\nprefetch = false";

/// credgate with the `oauth2_client_credentials` route "oauth" on `/o`, using the fake's
/// `/oauth/token` and forwarding to its gateway; `keys` are more `[route.auth]` lines.
async fn start_oauth(fake: &FakeOblien, keys: &str) -> InProcess {
    let auth = format!(
        r#"type = "oauth2_client_credentials"
token_url = "http://{api}/oauth/token"
client_id = "demo-oauth-client"
{keys}"#,
        api = fake.api_addr(),
    );
    let gateway = format!("http://{}", fake.gateway_addr());
    start_in_process(&one_route("oauth", "/o", &gateway, &auth)).await
}

/// The gateway's echo of a request that must have succeeded.
fn echo(r: &Reply) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

/// The `Authorization` the gateway received, from its echo.
fn echoed_authorization(r: &Reply) -> String {
    let e = echo(r);
    e["headers"]["authorization"]
        .as_str()
        .unwrap_or_else(|| panic!("no authorization in {e}"))
        .to_owned()
}

/// Asserts `r` is credgate's 503 `credentials_unavailable` for `route`; returns its message.
fn credentials_unavailable(r: &Reply, route: &str) -> String {
    credgate_error(
        r,
        StatusCode::SERVICE_UNAVAILABLE,
        "credentials_unavailable",
        Some(route),
    )
}

/// The claims of a gateway JWT (read, not verified).
fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

/// Sends `GET path` every 100 ms until `duration` has passed; returns each request's start
/// (relative to the first), how long it took, and its reply. Every reply must be 200.
async fn steady_traffic(
    cg: &InProcess,
    path: &str,
    duration: Duration,
) -> Vec<(Duration, Duration, Reply)> {
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut out = Vec::new();
    while started.elapsed() < duration {
        ticks.tick().await;
        let at = started.elapsed();
        let r = get(cg.addr(), path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "request at {at:?}: {}", r.text());
        out.push((at, started.elapsed() - at, r));
    }
    out
}

/// Asserts no request after the first took 150 ms or more: with the fake's token delay at
/// 300 ms and a request every 100 ms, a request that waited on a fetch would.
fn assert_no_request_waited(traffic: &[(Duration, Duration, Reply)]) {
    let waited: Vec<_> = traffic[1..]
        .iter()
        .filter(|(_, took, _)| *took >= Duration::from_millis(150))
        .map(|(at, took, _)| (at, took))
        .collect();
    assert!(waited.is_empty(), "requests waited on a fetch: {waited:?}");
}

// ---------------------------------------------------------------- single flight, refresh

#[tokio::test]
async fn hundred_concurrent_first_requests_cause_one_fetch() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    fake.set_token_delay(Duration::from_millis(200));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;

    let replies = join_all((0..100).map(|_| get(cg.addr(), "/w/files", &[]))).await;

    let tokens: HashSet<String> = replies.iter().map(echoed_authorization).collect();
    assert_eq!(tokens.len(), 1, "every request carried the one token");
    assert_eq!(fake.calls(Endpoint::Enable), 1);
    assert_eq!(fake.gateway_requests(), 100);
}

#[tokio::test]
async fn gateway_token_is_refreshed_in_the_background_at_a_fifth_of_its_life_left() {
    let fake = fake_with_lifetime(Duration::from_secs(4));
    fake.set_token_delay(Duration::from_millis(300));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;

    // Watch the Enable count while the traffic runs, to time each fetch.
    let fetch_times = async {
        let started = Instant::now();
        let (mut seen, mut times) = (0, Vec::new());
        while started.elapsed() < Duration::from_secs(10) {
            let n = fake.calls(Endpoint::Enable);
            if n > seen {
                times.push(started.elapsed());
                seen = n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times
    };
    let (traffic, fetches) = tokio::join!(
        steady_traffic(&cg, "/w/files", Duration::from_secs(10)),
        fetch_times
    );
    let enables = fake.calls(Endpoint::Enable);

    assert!(
        traffic[0].1 >= Duration::from_millis(250),
        "the first request waits for the first fetch, so a wait is visible ({:?})",
        traffic[0].1
    );
    assert_no_request_waited(&traffic);
    assert_eq!(fake.gateway_rejections(), 0);
    // 3-4 s tokens refreshed at 80%: a fetch every 2.3-3.2 s, so 4 or 5 in 10 s.
    assert!((4..=5).contains(&enables), "{enables} Enable calls in 10 s");
    for pair in fetches.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(2100) && gap <= Duration::from_millis(3500),
            "fetches at {fetches:?}"
        );
    }
}

#[tokio::test]
async fn per_workspace_token_in_use_is_refreshed_before_it_lapses() {
    let fake = fake_with_lifetime(Duration::from_secs(4));
    fake.set_token_delay(Duration::from_millis(300));
    let cg = start_oblien(&fake, "").await;

    // 4.2 s passes the point where the first token stops being used (at most 3.6 s) but not
    // the second refresh (at least 4.6 s).
    let traffic = steady_traffic(&cg, "/w/ws_a/files", Duration::from_millis(4200)).await;

    assert_no_request_waited(&traffic);
    assert_eq!(fake.calls(Endpoint::Enable), 2);
}

// ---------------------------------------------------------------- token endpoint down

#[tokio::test]
async fn token_endpoint_down_while_the_token_is_valid_keeps_traffic_flowing() {
    // A 9-10 s token refreshed 9 s before expiry: the refresh falls due within a second.
    let fake = fake_with_lifetime(Duration::from_secs(10));
    let cg = start_oblien(&fake, &format!("{WS_A_ON_DEMAND}\nrefresh_before = \"9s\"")).await;
    let first = get(cg.addr(), "/w/files", &[]).await;
    let token = echoed_authorization(&first);
    fake.set_token_endpoint_down(true);

    let traffic = steady_traffic(&cg, "/w/files", Duration::from_millis(2000)).await;

    for (at, _, r) in &traffic {
        assert_eq!(echoed_authorization(r), token, "request at {at:?}");
    }
    assert!(
        fake.calls(Endpoint::Enable) >= 2,
        "a refresh was tried while the endpoint was down"
    );
}

#[tokio::test]
async fn token_endpoint_down_past_expiry_fails_fast_then_recovers() {
    let fake = fake_with_lifetime(Duration::from_secs(2));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    echo(&get(cg.addr(), "/w/files", &[]).await);
    fake.set_token_endpoint_down(true);

    // The 1-2 s token stops being used at 90% of its life.
    let mut first_503 = None;
    for _ in 0..40 {
        let r = get(cg.addr(), "/w/files", &[]).await;
        if r.status != StatusCode::OK {
            first_503 = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_503 = first_503.expect("the token lapsed within 2 s");
    credentials_unavailable(&first_503, "ws");
    for _ in 0..10 {
        let started = Instant::now();
        let r = get(cg.addr(), "/w/files", &[]).await;
        let took = started.elapsed();
        let msg = credentials_unavailable(&r, "ws");
        assert!(took < Duration::from_millis(200), "503 took {took:?}");
        assert!(
            msg.contains("token") && msg.contains("HTTP 503"),
            "the message says the token endpoint failed and how: {msg}"
        );
        assert!(!msg.contains(CLIENT_SECRET), "{msg}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 11 failed requests; the fetches back off (1 s, 2 s, ...) instead of following them.
    let while_down = fake.calls(Endpoint::Enable);
    assert!(
        (2..=5).contains(&while_down),
        "{while_down} Enable calls while down"
    );

    fake.set_token_endpoint_down(false);
    let up = Instant::now();
    loop {
        let r = get(cg.addr(), "/w/files", &[]).await;
        if r.status == StatusCode::OK {
            break;
        }
        credentials_unavailable(&r, "ws");
        // At most three fetches have failed, so the next retry is at most 4 s away.
        assert!(
            up.elapsed() < Duration::from_secs(6),
            "no recovery 6 s after the endpoint came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.calls(Endpoint::Enable), while_down + 1);
}

// ---------------------------------------------------------------- 401 from the upstream

#[tokio::test]
async fn a_revoked_token_is_replaced_without_rotating_and_the_request_replayed() {
    // Another client of the workspace rotated its connection token: a fresh JWT (`enable`)
    // carries the new one. Rotating again would break that other client in turn.
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    let before = echoed_authorization(&get(cg.addr(), "/w/files", &[]).await);
    fake.revoke_workspace("ws_a");

    let r = get(cg.addr(), "/w/files?replayed=1", &[]).await;

    let after = echoed_authorization(&r);
    assert_ne!(after, before);
    assert_eq!(echo(&r)["query"], "replayed=1");
    assert_eq!(fake.calls(Endpoint::Rotate), 0);
    assert_eq!(fake.calls(Endpoint::Enable), 2);
    assert_eq!((fake.gateway_requests(), fake.gateway_rejections()), (3, 1));
    // The new token is cached like any other.
    assert_eq!(
        echoed_authorization(&get(cg.addr(), "/w/files", &[]).await),
        after
    );
    assert_eq!(fake.calls(Endpoint::Enable), 2);
}

#[tokio::test]
async fn two_credgates_sharing_a_workspace_do_not_rotate_each_others_tokens_away() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let a = start_oblien(&fake, WS_A_ON_DEMAND).await;
    let b = start_oblien(&fake, WS_A_ON_DEMAND).await;
    for cg in [&a, &b] {
        assert_eq!(get(cg.addr(), "/w/files", &[]).await.status, StatusCode::OK);
    }
    fake.revoke_workspace("ws_a");

    for i in 0..10 {
        let cg = if i % 2 == 0 { &a } else { &b };
        let r = get(cg.addr(), "/w/files", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    // Each met one 401 (its token from before the revocation) and fetched once more.
    assert_eq!(fake.gateway_rejections(), 2);
    assert_eq!(fake.calls(Endpoint::Rotate), 0);
}

#[tokio::test]
async fn a_token_fetched_after_a_401_and_rejected_too_is_then_rotated() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    assert_eq!(get(cg.addr(), "/w/files", &[]).await.status, StatusCode::OK);
    fake.set_gateway_rejects_all(true);

    // The first 401: a fresh JWT, no rotation; it is rejected too, and that 401 passes on.
    let r = get(cg.addr(), "/w/files", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(
        (fake.calls(Endpoint::Enable), fake.calls(Endpoint::Rotate)),
        (2, 0)
    );
    // After the quiet time (1 s after the first 401), the fresh JWT's rejection rotates.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(cg.addr(), "/w/files", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(
        (fake.calls(Endpoint::Enable), fake.calls(Endpoint::Rotate)),
        (2, 1)
    );
}

#[tokio::test]
async fn a_401_to_a_streamed_request_drops_the_token_for_the_next_one() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    let before = echoed_authorization(&get(cg.addr(), "/w/files", &[]).await);
    fake.revoke_workspace("ws_a");

    // A chunked body is streamed, so it cannot be replayed: the 401 passes through...
    let (tx, body) = channel_body();
    let mut req = request(Method::POST, "/w/files/write", &[]);
    *req.body_mut() = body;
    let sending = tokio::spawn(async move {
        tx.send(bytes::Bytes::from_static(b"streamed"))
            .await
            .unwrap();
    });
    let r = send(cg.addr(), req).await;
    sending.await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());

    // ...but the rejected token is dropped, so the next request carries a fresh one.
    let next = get(cg.addr(), "/w/files", &[]).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    assert_ne!(echoed_authorization(&next), before);
    assert_eq!(
        (fake.calls(Endpoint::Enable), fake.calls(Endpoint::Rotate)),
        (2, 0)
    );
    assert_eq!(
        fake.gateway_rejections(),
        1,
        "the next request did not meet a 401 first"
    );
}

#[tokio::test]
async fn token_rejected_again_after_a_fresh_fetch_returns_the_401() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    echo(&get(cg.addr(), "/w/files", &[]).await);
    fake.set_gateway_rejects_all(true);

    let r = get(cg.addr(), "/w/files", &[]).await;

    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"error": "unauthorized"}),
        "the gateway's own 401"
    );
    assert_eq!(
        (fake.calls(Endpoint::Enable), fake.calls(Endpoint::Rotate)),
        (2, 0)
    );
    assert_eq!(fake.gateway_requests(), 3, "one replay, no more");
}

/// An upstream's plan for rejecting one token: every request carrying it is held until all
/// `n` have arrived; then the first half is answered 401 at once and the second half only
/// after a request with another token (a replay) has come in, so some 401s for the old token
/// land before the new token is fetched and some after.
struct RejectAll {
    n: usize,
    token: Mutex<Option<String>>,
    arrived: AtomicUsize,
    all_in: Barrier,
    replayed: watch::Sender<bool>,
}

impl RejectAll {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            n,
            token: Mutex::new(None),
            arrived: AtomicUsize::new(0),
            all_in: Barrier::new(n),
            replayed: watch::Sender::new(false),
        })
    }

    async fn answer(&self, r: Received) -> http::Response<TestBody> {
        let auth = r.header("authorization").map(str::to_owned);
        let token = self.token.lock().unwrap().clone();
        if token.is_some() && auth == token {
            let i = self.arrived.fetch_add(1, Ordering::SeqCst);
            let _ = tokio::time::timeout(WAIT, self.all_in.wait()).await;
            if i >= self.n / 2 {
                let mut replayed = self.replayed.subscribe();
                let _ = tokio::time::timeout(WAIT, replayed.wait_for(|r| *r)).await;
            }
            return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "expired"}));
        }
        if token.is_some() {
            self.replayed.send_replace(true);
        }
        json_response(StatusCode::OK, &echo_json(&r))
    }
}

#[tokio::test]
async fn fifty_concurrent_401s_for_one_token_cause_one_fetch() {
    const N: usize = 50;
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let plan = RejectAll::new(N);
    let handler = {
        let plan = plan.clone();
        Handler::collect(move |r| {
            let plan = plan.clone();
            async move { plan.answer(r).await }
        })
    };
    let up = Upstream::start(handler).await;
    let cg = start_in_process(&oblien_config(&fake, &up.url(), WS_A_ON_DEMAND)).await;
    assert_eq!(get(cg.addr(), "/w/files", &[]).await.status, StatusCode::OK);
    let old = up.only().header("authorization").unwrap().to_owned();
    *plan.token.lock().unwrap() = Some(old.clone());

    let replies = join_all((0..N).map(|_| get(cg.addr(), "/w/files", &[]))).await;

    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(fake.calls(Endpoint::Rotate), 0);
    assert_eq!(
        fake.calls(Endpoint::Enable),
        2,
        "the first token, then one fetch"
    );
    let received = up.received();
    let carrying_old = received
        .iter()
        .filter(|r| r.header("authorization") == Some(&old))
        .count();
    assert_eq!(carrying_old, 1 + N, "the first request, then N rejected");
    let new: HashSet<_> = received
        .iter()
        .filter_map(|r| r.header("authorization"))
        .filter(|a| *a != old)
        .collect();
    assert_eq!(new.len(), 1, "every replay carried the one new token");
    assert_eq!(received.len(), 1 + 2 * N);
}

// ---------------------------------------------------------------- workspaces

#[tokio::test]
async fn each_workspace_in_the_path_gets_its_own_cached_token() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    fake.set_token_delay(Duration::from_millis(100));
    let cg = start_oblien(&fake, "").await;

    let paths: Vec<(String, &str, usize)> = (0..40)
        .map(|i| {
            let ws = if i % 2 == 0 { "ws_a" } else { "ws_b" };
            (format!("/w/{ws}/files/{i}?n={i}"), ws, i)
        })
        .collect();
    let mut replies = join_all(paths.iter().map(|(p, _, _)| get(cg.addr(), p, &[]))).await;
    for (p, _, _) in paths.iter().take(10) {
        replies.push(get(cg.addr(), p, &[]).await);
    }

    for (r, (_, ws, i)) in replies.iter().zip(paths.iter().chain(&paths)) {
        let e = echo(r);
        assert_eq!(e["workspace_id"], *ws, "{e}");
        assert_eq!(e["path"], format!("/files/{i}"), "{e}");
        assert_eq!(e["query"], format!("n={i}"), "{e}");
    }
    assert_eq!(fake.calls(Endpoint::Enable), 2);
}

#[tokio::test]
async fn workspace_outside_the_allow_list_is_refused_without_a_fetch() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, "workspaces = [\"ws_a\"]").await;

    let r = get(cg.addr(), "/w/ws_b/files", &[]).await;

    let msg = credgate_error(&r, StatusCode::FORBIDDEN, "forbidden_workspace", Some("ws"));
    assert!(msg.contains("ws_b"), "{msg}");
    assert_eq!(fake.calls(Endpoint::Enable), 0);
    assert_eq!(fake.gateway_requests(), 0);
    assert_eq!(
        echo(&get(cg.addr(), "/w/ws_a/files", &[]).await)["workspace_id"],
        "ws_a"
    );
    assert_eq!(fake.calls(Endpoint::Enable), 1);
}

#[tokio::test]
async fn runtime_api_access_path_is_used_for_every_fetch() {
    let fake = FakeOblien::start(FakeOptions {
        access_path: "runtime-api-access".into(),
        ..FakeOptions::default()
    })
    .unwrap();
    let cg = start_oblien(&fake, "access_path = \"runtime-api-access\"").await;

    let e = echo(&get(cg.addr(), "/w/ws_a/files", &[]).await);

    assert_eq!(
        (&e["workspace_id"], &e["credential"]),
        (&json!("ws_a"), &json!("gateway"))
    );
    assert_eq!(fake.access_paths_seen(), ["runtime-api-access"]);
    assert_eq!(fake.calls(Endpoint::Enable), 1);
}

// ---------------------------------------------------------------- where the token goes

#[tokio::test]
async fn ws_and_proxy_paths_carry_the_token_as_a_query_parameter() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let up = Upstream::echo().await;
    let cg = start_in_process(&oblien_config(&fake, &up.url(), "")).await;
    let caller = [("authorization", "Bearer caller-token")];

    for (path, expected) in [
        ("/w/ws_a/ws?token=caller-token&x=1", "/ws?x=1&token="),
        (
            "/w/ws_a/proxy/3000/api?x_oblien_target=3000&token=a&token=b",
            "/proxy/3000/api?x_oblien_target=3000&token=",
        ),
    ] {
        assert_eq!(get(cg.addr(), path, &caller).await.status, StatusCode::OK);
        let got = up.received().pop().unwrap();
        let bearer = got.header("authorization").unwrap();
        let token = bearer.strip_prefix("Bearer ").expect("a bearer token");
        assert_eq!(got.path_and_query(), format!("{expected}{token}"), "{path}");
        assert_eq!(jwt_claims(token)["workspace_id"], "ws_a");
    }
    // Other endpoints take the token from the header only.
    get(cg.addr(), "/w/ws_a/files?token=mine", &[]).await;
    assert_eq!(
        up.received().pop().unwrap().path_and_query(),
        "/files?token=mine"
    );
    assert_eq!(fake.calls(Endpoint::Enable), 1);
}

#[tokio::test]
async fn websocket_upgrade_reaches_the_gateway_with_a_token() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, "").await;

    let mut io = upgrade(cg.addr(), "/w/ws_a/ws?token=caller-token").await;
    io.write_all(b"ping through credgate").await.unwrap();
    let mut echoed = [0; 21];
    within("echo", io.read_exact(&mut echoed)).await.unwrap();

    assert_eq!(&echoed, b"ping through credgate");
    assert_eq!((fake.gateway_requests(), fake.gateway_rejections()), (1, 0));
}

/// Sends `GET path` with `Upgrade: websocket`, expects 101 and returns the upgraded connection.
async fn upgrade(addr: SocketAddr, path: &str) -> TokioIo<hyper::upgrade::Upgraded> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = request(
        Method::GET,
        path,
        &[
            ("host", &addr.to_string()),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ],
    );
    let res = within("101", sender.send_request(req)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    TokioIo::new(within("upgrade", hyper::upgrade::on(res)).await.unwrap())
}

#[tokio::test]
async fn raw_token_goes_to_the_address_the_api_returned() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let closed = format!("http://{}", closed_port());
    let cg = start_in_process(&oblien_config(&fake, &closed, "token = \"raw\"")).await;

    let e = echo(&get(cg.addr(), "/w/ws_a/files", &[]).await);

    assert_eq!(
        (&e["credential"], &e["workspace_id"]),
        (&json!("raw"), &json!("ws_a"))
    );
    assert_eq!(e["path"], "/files");
    assert_eq!(fake.calls(Endpoint::RawToken), 1);
}

#[tokio::test]
async fn caller_authorization_never_reaches_the_gateway() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oblien(&fake, WS_A_ON_DEMAND).await;
    let mut req = request(Method::GET, "/w/files", &[]);
    for v in ["Bearer caller-token", "Basic Y2FsbGVyOnNlY3JldA=="] {
        req.headers_mut()
            .append(header::AUTHORIZATION, v.parse().unwrap());
    }

    let r = send(cg.addr(), req).await;

    let e = echo(&r);
    assert_eq!(
        e["credential"], "gateway",
        "the gateway accepted credgate's token"
    );
    let auth = e["headers"]["authorization"].as_str().unwrap();
    let token = auth.strip_prefix("Bearer ").expect("a bearer token");
    assert_eq!(jwt_claims(token)["workspace_id"], "ws_a");
    assert!(
        !e.to_string().contains("caller") && !e.to_string().contains("Y2Fs"),
        "{e}"
    );
}

// ---------------------------------------------------------------- OAuth2

#[tokio::test]
async fn oauth2_body_client_auth_sends_scope_audience_and_params() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oauth(
        &fake,
        &format!(
            r#"client_secret = "{OAUTH_SECRET}"
client_auth = "body"
scope = "read write"
audience = "https://api.example"
params = {{ tenant = "t1", resource = "https://res.example" }}"#
        ),
    )
    .await;

    for _ in 0..3 {
        let e = echo(&get(cg.addr(), "/o/items", &[]).await);
        assert_eq!(
            (&e["credential"], &e["path"]),
            (&json!("oauth2"), &json!("/items"))
        );
    }

    let expected = OAuthRequest {
        client_auth: ClientAuth::Body,
        scope: Some("read write".into()),
        audience: Some("https://api.example".into()),
        extra: vec![
            ("resource".into(), "https://res.example".into()),
            ("tenant".into(), "t1".into()),
        ],
    };
    assert_eq!(fake.oauth_last_request(), Some(expected));
    assert_eq!(fake.calls(Endpoint::OAuthToken), 1);
}

#[tokio::test]
async fn oauth2_basic_client_auth() {
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oauth(
        &fake,
        &format!("client_secret = \"{OAUTH_SECRET}\"\nclient_auth = \"basic\"\nscope = \"read\""),
    )
    .await;

    let e = echo(&get(cg.addr(), "/o/items", &[]).await);

    assert_eq!(e["credential"], "oauth2");
    let expected = OAuthRequest {
        client_auth: ClientAuth::Basic,
        scope: Some("read".into()),
        audience: None,
        extra: vec![],
    };
    assert_eq!(fake.oauth_last_request(), Some(expected));
    assert_eq!(fake.calls(Endpoint::OAuthToken), 1);
}

#[tokio::test]
async fn oauth2_without_expires_in_uses_the_default_lifetime() {
    let fake = FakeOblien::start(FakeOptions {
        oauth_include_expires_in: false,
        ..FakeOptions::default()
    })
    .unwrap();
    let cg = start_oauth(
        &fake,
        &format!("client_secret = \"{OAUTH_SECRET}\"\ndefault_lifetime = \"2s\""),
    )
    .await;

    // Prefetched at start; a 2 s token is refreshed at 1.6 s, the next one at 3.2 s.
    let traffic = steady_traffic(&cg, "/o/items", Duration::from_millis(2500)).await;

    let tokens: HashSet<String> = traffic
        .iter()
        .map(|(_, _, r)| echoed_authorization(r))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_eq!(fake.calls(Endpoint::OAuthToken), 2);
}

#[tokio::test]
async fn oauth2_invalid_client_is_503_naming_the_error_but_not_the_secret() {
    const WRONG: &str = "wrong-secret-5e1f0c";
    let fake = fake_with_lifetime(Duration::from_secs(60));
    let cg = start_oauth(&fake, &format!("client_secret = \"{WRONG}\"")).await;

    let r = get(cg.addr(), "/o/items", &[]).await;

    let msg = credentials_unavailable(&r, "oauth");
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(!r.text().contains(WRONG), "{}", r.text());
    assert!(
        r.headers.values().all(|v| !v
            .as_bytes()
            .windows(WRONG.len())
            .any(|w| w == WRONG.as_bytes())),
        "{:?}",
        r.headers
    );
    assert_eq!(fake.gateway_requests(), 0);
}
