//! Upstream connection reuse for plaintext upstreams: credgate against a raw TCP upstream on
//! 127.0.0.1 that counts the connections it accepts and sees closed.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the raw upstream treats a connection after answering.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Closes it 20 ms later, without saying so (as an upstream's idle timeout does).
    Close,
    /// Keeps it open, but closes it without an answer when the next request arrives (as an
    /// upstream that restarts closes every connection it holds, whatever is in flight).
    DropNext,
}

/// A raw HTTP/1.1 upstream: answers each GET with `conn-<n> req-<k>` (which connection, which
/// request on it), for `/trailers` chunked and with a trailer, or, for `/big`, with `BIG` bytes
/// sent in slices while the reader keeps up.
/// It waits its `delay` before answering, or, for `/wait/<ms>`, that many milliseconds.
struct RawUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

const BIG: usize = 8 << 20;

impl RawUpstream {
    async fn start(after: After, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let n = a.fetch_add(1, Ordering::SeqCst) + 1;
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut k = 0;
                    loop {
                        // Read one request head (GETs only: no body).
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break Some(i + 4);
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => break None,
                                Ok(r) => buf.extend_from_slice(&chunk[..r]),
                            }
                        };
                        let Some(end) = head_end else {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        k += 1;
                        if after == After::DropNext && k > 1 {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let wait = head
                            .strip_prefix("GET /wait/")
                            .and_then(|rest| rest.split(' ').next()?.parse().ok())
                            .map_or(delay, Duration::from_millis);
                        tokio::time::sleep(wait).await;
                        let ok = if head.starts_with("GET /big ") {
                            let hdr = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                            let mut ok = s.write_all(hdr.as_bytes()).await.is_ok();
                            let slice = vec![b'x'; 64 * 1024];
                            for _ in 0..BIG / slice.len() {
                                ok = ok && s.write_all(&slice).await.is_ok();
                            }
                            ok
                        } else if head.starts_with("GET /trailers ") {
                            let body = format!("conn-{n} req-{k}");
                            let res = format!(
                                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-sum: 1\r\n\r\n",
                                body.len()
                            );
                            s.write_all(res.as_bytes()).await.is_ok()
                        } else {
                            let body = format!("conn-{n} req-{k}");
                            let res = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            s.write_all(res.as_bytes()).await.is_ok()
                        };
                        if !ok || after == After::Close {
                            if ok {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            closed,
            _task: task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

fn config(up: &RawUpstream, extra: &str) -> String {
    shared_config(&format!(
        "[[route]]\nname = \"raw\"\nprefix = \"/\"\nupstream = \"http://{}\"\n{extra}\nauth = {{ type = \"none\" }}\n",
        up.addr
    ))
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "")).await;
    for k in 1..=30 {
        let r = get(cg.addr(), "/x", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), format!("conn-1 req-{k}"));
    }
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_request_lost_with_a_kept_connection_is_resent_on_a_new_one() {
    // Two kept connections, both of which the upstream drops as the next request arrives on
    // them: the request goes out on one, is lost, and is sent once more, on a new connection
    // (not on the other kept one, which would lose it too).
    let up = RawUpstream::start(After::DropNext, Duration::from_millis(200)).await;
    let cg = start_in_process(&config(&up, "")).await;
    let (a, b) = tokio::join!(get(cg.addr(), "/x", &[]), get(cg.addr(), "/x", &[]));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(up.accepted(), 2);

    let r = get(cg.addr(), "/x", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-3 req-1")
    );
    assert_eq!(up.accepted(), 3);
}

#[tokio::test]
async fn a_response_with_trailers_gives_its_connection_back() {
    // hyper stops reading a response body at its trailers (the last frame), so the end of the
    // body is never seen as such; the connection must go back to the pool all the same.
    let up = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "")).await;
    let r = get(cg.addr(), "/trailers", &[("te", "trailers")]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-1 req-1")
    );
    let r = get(cg.addr(), "/trailers", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-1 req-2")
    );
    let r = get(cg.addr(), "/x", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-1 req-3")
    );
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_kept_connection_times_each_request_from_its_own_start() {
    // A kept connection's request timer is re-armed for each request, not made anew: the
    // second request runs past the first one's deadline and must not be cut there, the third
    // must still be cut at its own.
    let up = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "request_timeout = \"600ms\"")).await;
    let r = get(cg.addr(), "/wait/0", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-1 req-1")
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get(cg.addr(), "/wait/400", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-1 req-2")
    );

    let started = std::time::Instant::now();
    let r = get(cg.addr(), "/wait/3000", &[]).await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    // The timed-out connection is not kept: the next request gets a new one.
    let r = get(cg.addr(), "/wait/0", &[]).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "conn-2 req-1")
    );
}

#[tokio::test]
async fn concurrent_requests_open_connections_that_are_then_kept() {
    let up = RawUpstream::start(After::KeepAlive, Duration::from_millis(200)).await;
    let cg = start_in_process(&config(&up, "")).await;
    for round in 0..3 {
        let all = (0..8).map(|_| get(cg.addr(), "/x", &[]));
        for r in futures_util::future::join_all(all).await {
            assert_eq!(r.status, StatusCode::OK, "round {round}: {}", r.text());
        }
    }
    // 8 at a time need 8 connections; later rounds reuse them.
    assert_eq!(up.accepted(), 8);
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let up = RawUpstream::start(After::Close, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "")).await;
    for k in 1..=20u64 {
        // Some land just as the upstream closes, some after; none may fail.
        tokio::time::sleep(Duration::from_millis(k % 4 * 10)).await;
        let r = get(cg.addr(), "/x", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "request {k}: {}", r.text());
        assert_eq!(r.text(), format!("conn-{} req-1", up.accepted()));
    }
    assert_eq!(up.accepted(), 20);
}

#[tokio::test]
async fn a_response_the_caller_abandoned_never_reaches_the_next_caller() {
    let up = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "")).await;
    let res = open(cg.addr(), request(http::Method::GET, "/big", &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);
    // The half-read connection is closed, not handed to the next request.
    for _ in 0..5 {
        let r = get(cg.addr(), "/x", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text().starts_with("conn-2 "), "{}", r.text());
    }
    poll_until(|| (up.closed() == 1).then_some(()))
        .await
        .expect("the abandoned upstream connection is closed");
}

#[tokio::test]
async fn idle_upstream_connections_close_after_idle_timeout() {
    let up = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let cg = start_in_process(&config(&up, "idle_timeout = \"300ms\"")).await;
    assert_eq!(get(cg.addr(), "/x", &[]).await.status, StatusCode::OK);
    assert_eq!(up.closed(), 0);
    poll_until(|| (up.closed() == 1).then_some(()))
        .await
        .expect("the idle connection is closed by credgate");
    // And the next request opens a new one.
    assert_eq!(get(cg.addr(), "/x", &[]).await.text(), "conn-2 req-1");
}

#[tokio::test]
async fn a_refused_connection_is_a_502_naming_no_detail() {
    let addr = closed_port();
    let cg = start_in_process(&shared_config(&format!(
        "[[route]]\nname = \"raw\"\nprefix = \"/\"\nupstream = \"http://{addr}\"\nauth = {{ type = \"none\" }}\n"
    )))
    .await;
    let r = get(cg.addr(), "/x", &[]).await;
    let body = credgate_error(
        &r,
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
        Some("raw"),
    );
    assert!(!body.contains("refused"), "{body}");
}

#[tokio::test]
async fn an_upload_answered_early_does_not_hold_up_the_next_request() {
    // The upstream answers a PUT at once and reads its body only as it comes; GETs get which
    // connection served them.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let Ok(r) = s.read(&mut buf).await else {
                    return;
                };
                let res = if buf[..r].starts_with(b"PUT ") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly".to_owned()
                } else {
                    format!("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn-{n}")
                };
                let _ = s.write_all(res.as_bytes()).await;
                while matches!(s.read(&mut buf).await, Ok(r) if r > 0) {}
            });
        }
    });
    let cg = start_in_process(&shared_config(&format!(
        "[[route]]\nname = \"raw\"\nprefix = \"/\"\nupstream = \"http://{addr}\"\nauth = {{ type = \"none\" }}\n"
    )))
    .await;

    let (upload, body) = channel_body();
    upload.send("first chunk".into()).await.unwrap();
    let put = http::Request::put("/upload").body(body).unwrap();
    let res = open(cg.addr(), put).await;
    assert_eq!(res.status(), StatusCode::OK);
    let early = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(early, "early");

    // The upload is still being sent on that connection: the next request must not wait for it.
    let next = tokio::time::timeout(Duration::from_secs(3), get(cg.addr(), "/x", &[]))
        .await
        .expect("the next request is not held up by the unfinished upload");
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(next.text(), "conn-2");
    drop(upload);
    upstream.abort();
}
