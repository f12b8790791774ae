//! HTTP/1.1 connections to one plaintext upstream, kept for reuse: a checkout is a pop, a
//! connection comes back when its response body ends. Each thread has its own stack, so with
//! several workers a connection is reused on the thread whose runtime drives it.
//!
//! hyper-util's pooled client does the same job for every upstream (TLS, HTTP/2, any host),
//! and costs more per request for it: a keyed, hashed pool, a connect raced against every
//! checkout. A route's own `http://` upstream (a sidecar neighbour, a local service) is the
//! common case on the hot path, so it gets this; TLS upstreams keep the general client.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::body::UpstreamBody;

/// The idle connections of one upstream, most recently used on top.
pub struct H1Pool {
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// One stack per thread (threads share a stack beyond [`SHARDS`]).
    idle: [Shard; SHARDS],
    /// Whether the task that closes long-idle connections runs.
    reaping: AtomicBool,
}

const SHARDS: usize = 8;

/// A stack on cache lines of its own: workers lock theirs for every request, and two stacks
/// on one line would make each worker's lock evict the other's.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Idle>);

type Idle = Vec<Kept>;

/// An idle connection, since when it has been idle, and its request timer.
struct Kept {
    conn: SendRequest<UpstreamBody>,
    since: Instant,
    timer: RequestTimer,
}

/// A connection's request timer, re-armed for each request it carries. A tokio timer made
/// and dropped per request costs a timer-wheel insertion and removal, each under the wheel's
/// lock; moving a registered timer's deadline later, as each request's is, is one atomic
/// compare-exchange, and the wheel catches up only when the old deadline comes round (33.2k
/// -> 32.9k instructions per request). A timer that has fired (its connection sat idle longer
/// than the request timeout) is registered again under the lock. An idle connection's timer
/// stays in the wheel until its old deadline, then fires into a no-op waker.
struct RequestTimer {
    sleep: Pin<Box<Sleep>>,
    /// The thread it was made on. A timer belongs to that thread's runtime, which may stop
    /// before another thread's (beyond [`SHARDS`] threads, stacks are shared), and a timer
    /// polled after its runtime stopped panics: elsewhere a new one is made. (A pool lives
    /// and dies with its server's runtime, so a thread's runtime is the one the timer knows.)
    home: usize,
}

impl RequestTimer {
    fn new(deadline: tokio::time::Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            home: this_thread(),
        }
    }

    /// This timer, due at `deadline`, if it is this thread's; a new one otherwise.
    fn rearm(mut self, deadline: tokio::time::Instant) -> Self {
        if self.home != this_thread() {
            return Self::new(deadline);
        }
        self.sleep.as_mut().reset(deadline);
        self
    }
}

/// A number no other thread of the process has had.
fn this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static THIS: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    THIS.with(|t| *t)
}

/// This thread's stack in every pool.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A connection lent to one exchange. [`Lease::release`] hands it back once the response
/// has been read to its end; dropped otherwise, it closes the connection.
pub struct Lease {
    conn: SendRequest<UpstreamBody>,
    timer: RequestTimer,
    pool: Arc<H1Pool>,
}

/// The request's deadline passed before its response began.
#[derive(Debug)]
pub struct TimedOut;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to {0} failed")]
    Connect(String, #[source] std::io::Error),
    #[error("connecting to {0} timed out after {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("HTTP/1.1 handshake with {0} failed")]
    Handshake(String, #[source] hyper::Error),
    #[error("the exchange with the upstream failed")]
    Exchange {
        #[source]
        error: hyper::Error,
        /// Whether the connection had served a request before.
        reused: bool,
    },
}

impl PoolError {
    /// Whether nothing reached the upstream (so a kept body may be replayed).
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Exchange { .. })
    }

    /// Whether a reused connection closed before any response: the upstream closing an idle
    /// connection just as a request went out on it. The request was sent, so only one that is
    /// safe to repeat may be sent again.
    pub fn is_stale(&self) -> bool {
        let Self::Exchange {
            error,
            reused: true,
        } = self
        else {
            return false;
        };
        // A close (EOF) or a reset (the upstream closed with our request unread).
        let reset = std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            });
        error.is_incomplete_message() || reset
    }
}

impl H1Pool {
    pub fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            host: host.to_owned(),
            port,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Default::default(),
            reaping: AtomicBool::new(false),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one; idle
    /// connections are judged at `now` (the caller's clock read, the send's start). Fails with
    /// [`TimedOut`] if the response has not begun by `deadline` (connecting included).
    ///
    /// A connection the upstream closed while idle can fail a request before any of it was
    /// written; hyper hands such a request back, and it is sent once more on a new connection.
    /// With `new`, no idle connection is tried.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        now: Instant,
        deadline: tokio::time::Instant,
        new: bool,
    ) -> Result<Result<(Response<Incoming>, Lease), PoolError>, TimedOut> {
        let mut req = req;
        loop {
            let kept = if new { None } else { self.checkout(now) };
            let (mut conn, mut timer, fresh) = match kept {
                Some(Kept { conn, timer, .. }) => (conn, timer.rearm(deadline), false),
                None => {
                    let mut timer = RequestTimer::new(deadline);
                    match until(&mut timer, self.connect()).await? {
                        Ok(conn) => (conn, timer, true),
                        Err(e) => return Ok(Err(e)),
                    }
                }
            };
            let sent = until(&mut timer, conn.try_send_request(req)).await?;
            match sent {
                Ok(res) => {
                    let lease = Lease {
                        conn,
                        timer,
                        pool: self.clone(),
                    };
                    return Ok(Ok((res, lease)));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => {
                        return Ok(Err(PoolError::Exchange {
                            error: e.into_error(),
                            reused: !fresh,
                        }))
                    }
                },
            }
        }
    }

    /// The most recently used connection that can take a request (one may have closed since
    /// it was kept), not idle for longer than the idle timeout at `now`.
    fn checkout(&self, now: Instant) -> Option<Kept> {
        let mut idle = self.idle[shard()]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while let Some(kept) = idle.pop() {
            if now.saturating_duration_since(kept.since) >= self.idle_timeout {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if kept.conn.is_ready() {
                return Some(kept);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<UpstreamBody>, PoolError> {
        let name = || format!("{}:{}", self.host, self.port);
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(name(), self.connect_timeout))?
        .map_err(|e| PoolError::Connect(name(), e))?;
        let _ = stream.set_nodelay(true);
        let (conn, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PoolError::Handshake(name(), e))?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(conn)
    }

    /// Keeps `conn` for the next request once it can take one: the response has ended, but the
    /// request body may still be on its way (an upstream that answered an upload early), and
    /// a connection still sending must not keep the next caller waiting.
    fn put(self: &Arc<Self>, mut conn: SendRequest<UpstreamBody>, timer: RequestTimer) {
        if conn.is_closed() {
            return;
        }
        if !conn.is_ready() {
            let pool = self.clone();
            tokio::spawn(async move {
                let ready = tokio::time::timeout(pool.idle_timeout, conn.ready()).await;
                if matches!(ready, Ok(Ok(()))) {
                    pool.put(conn, timer);
                }
            });
            return;
        }
        {
            let mut idle = self.idle[shard()]
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.max_idle {
                idle.push(Kept {
                    conn,
                    since: Instant::now(),
                    timer,
                });
            }
        }
        // Read first: a swap would write the shared line at every request.
        if !self.reaping.load(Ordering::Relaxed) && !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Idle connections now held (for tests and status).
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|i| i.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Lease {
    /// Hands the connection back for the next request.
    pub fn release(self) {
        self.pool.put(self.conn, self.timer);
    }
}

/// Closes connections idle for longer than the pool's idle timeout, until the pool is gone
/// (a reload that drops the route drops its pool, and with it this task's last reference).
async fn reap(pool: Weak<H1Pool>) {
    let Some(every) = pool.upgrade().map(|p| p.idle_timeout / 2) else {
        return;
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.idle_timeout;
        for idle in &pool.idle {
            idle.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|k| k.since.elapsed() < timeout && !k.conn.is_closed());
        }
    }
}

/// Runs `work` until `timer` (armed) goes off. Either way the timer lets go of this task's
/// waker: it stays armed in the wheel until its next request, and should not keep the task
/// (or wake it) meanwhile.
///
/// The timer is polled outside the task's coop budget (as tokio's own `Timeout` does once the
/// work has used the budget up): a poll refused for want of budget would neither check the
/// deadline nor replace the waker.
async fn until<T>(timer: &mut RequestTimer, work: impl Future<Output = T>) -> Result<T, TimedOut> {
    let mut work = pin!(work);
    let sleep = &mut timer.sleep;
    let done = poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        pin!(tokio::task::unconstrained(sleep.as_mut()))
            .poll(cx)
            .map(|()| Err(TimedOut))
    })
    .await;
    let _ = pin!(tokio::task::unconstrained(sleep.as_mut()))
        .poll(&mut Context::from_waker(Waker::noop()));
    done
}
