//! One client connection: HTTP/1 or h2c told apart by its first bytes, and an HTTP/1 connection
//! that sits idle parked without hyper's buffers until its next request arrives.
//!
//! hyper keeps two 8 KiB buffers for every HTTP/1 connection for as long as it lives. Most of
//! a sidecar's connections are idle keep-alive ones, so once a connection has waited
//! [`PARK_AFTER`] for its next request with nothing left to write, it is taken apart
//! ([`http1::UpgradeableConnection::into_parts`]): what stays is the socket and the service,
//! and a new hyper connection is made when the socket is readable again. Whether hyper is
//! waiting for a request head is learnt from the one timer it starts for that wait, the header
//! read timeout, given to it here per connection. A parked connection keeps that timeout's
//! deadline: parking never gives a client more time than hyper would.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use crate::body::Body;
use crate::route::Via;
use crate::server::Shared;

/// How long an HTTP/1 connection waits for its next request before it parks (at most twice
/// this: a sweep every `PARK_AFTER` finds it). Parking and unparking cost about as much as a
/// small request, so a connection in use never parks; and a burst of callers that each send
/// one request holds hyper's buffers for this long (10,000 at once, one run each: 109 MiB at the
/// peak with 100 ms, 155 MiB with 250 ms).
pub const PARK_AFTER: Duration = Duration::from_millis(100);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells connections to finish, and waits until they have.
pub struct Drain(watch::Sender<bool>);

impl Default for Drain {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Drain {
    /// Taken when a connection is accepted: a shutdown waits for every one taken.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal(self.0.subscribe())
    }

    /// Asks every connection to finish its requests and close, and waits until all have.
    pub async fn shutdown(self) {
        self.0.send_replace(true);
        self.0.closed().await;
    }
}

/// One connection's view of [`Drain`].
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Whether a shutdown began before this connection was taken.
    fn was_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Whether a shutdown has begun since: one atomic load, for a connection that is polled
    /// anyway (while a [`Self::requested`] future of a clone wakes it).
    fn is_requested(&self) -> bool {
        self.0.has_changed().unwrap_or(true)
    }

    /// Completes when a shutdown has begun (or nobody is left to ask for one).
    async fn requested(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// A client stream credgate can wait on for readability without reading.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Stream for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl Stream for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
}

/// What serving one connection needs, taken when it is accepted.
pub struct Conn {
    pub shared: Arc<Shared>,
    pub stop: StopSignal,
    pub header_read_timeout: Duration,
    /// The admin listener's connection, served by [`crate::admin`].
    pub admin: bool,
    pub via: Via,
    /// Its place in its worker's count of connections (see `server::Workers`), freed when the
    /// connection ends.
    pub seat: Option<Counted>,
}

impl Conn {
    /// Serves `stream` on the current runtime until the client, an error or a shutdown ends it.
    pub fn serve(self, stream: impl Stream) {
        let open = Counted::new(&self.shared.metrics.open_connections);
        tokio::spawn(self.run(stream, open));
    }

    async fn run(self, stream: impl Stream, open: Counted) {
        let Conn {
            shared,
            stop,
            header_read_timeout,
            admin,
            via,
            seat,
        } = self;
        if stop.was_requested() {
            return;
        }
        let mut stream = TokioIo::new(stream);
        // A connection must bring a request within the header timeout; until its first bytes
        // it holds no more than its socket.
        let first_by = tokio::time::Instant::now() + header_read_timeout;
        let sniffed = tokio::select! {
            biased;
            _ = stop.clone().requested() => return,
            r = tokio::time::timeout_at(first_by, sniff(stream.inner_mut())) => r,
        };
        let ahead = match sniffed {
            Ok(Ok(ahead)) if !ahead.is_empty() => ahead,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => return tracing::debug!(error = %e, "connection ended with an error"),
            Err(_) => {
                return tracing::debug!("connection closed: no request within the header timeout")
            }
        };
        let idle = Arc::new(Idle::new(Some(Held {
            _open: open,
            _seat: seat,
            stop: stop.clone(),
        })));
        idle.keep_deadline(first_by);
        let io = ConnIo {
            stream,
            ahead,
            idle: idle.clone(),
        };
        let svc = Svc {
            shared,
            admin,
            via,
            idle: idle.clone(),
            requested: Arc::new(AtomicBool::new(false)),
        };
        if io.ahead.starts_with(H2_PREFACE) {
            // Boxed: the task of every HTTP/1 connection would otherwise carry room for it.
            Box::pin(serve_h2(io, svc, first_by, header_read_timeout, stop)).await
        } else {
            serve_h1(io, svc, idle, header_read_timeout, stop).await
        }
    }
}

/// Reads the first bytes, as many as it takes to tell the HTTP/2 preface from anything else
/// (at most its 24); empty if the client closed first.
async fn sniff(stream: &mut impl Stream) -> io::Result<Bytes> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        let read = stream.read(&mut buf[n..]).await?;
        n += read;
        if read == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            return Ok(Bytes::copy_from_slice(&buf[..n]));
        }
    }
}

async fn serve_h2<S: Stream>(
    io: ConnIo<S>,
    svc: Svc,
    first_by: tokio::time::Instant,
    idle_after: Duration,
    stop: StopSignal,
) {
    let requested = svc.requested.clone();
    let idle = svc.idle.clone();
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(io, svc);
    let mut conn = pin!(conn);
    let mut stop = pin!(stop.requested());
    // HTTP/2 has no header read timeout or idle timeout of its own. The connection is checked
    // at the header read timeout, then every such interval: with no request since the last
    // check and none still open, it goes (so at most two intervals after its last stream
    // ended, as an idle HTTP/1 connection goes after one). A handshake that never brought a
    // request is dropped; a connection that served some is sent a GOAWAY.
    let check = tokio::time::sleep_until(first_by);
    let mut check = pin!(check);
    let mut served = false;
    let mut stopping = false;
    let result = poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        while !stopping && check.as_mut().poll(cx).is_ready() {
            if requested.swap(false, Ordering::Relaxed)
                || idle.in_flight.load(Ordering::Relaxed) > 0
            {
                served = true;
                check
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle_after);
            } else if !served {
                tracing::debug!("connection closed: no request within the header timeout");
                return Poll::Ready(Ok(()));
            } else {
                tracing::debug!("idle HTTP/2 connection closed at the header read timeout");
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// What the serving loop polls an HTTP/1 connection for.
enum Turn {
    Ended(hyper::Result<()>),
    Park,
    Stop,
}

async fn serve_h1<S: Stream>(
    mut io: ConnIo<S>,
    mut svc: Svc,
    idle: Arc<Idle>,
    header_read_timeout: Duration,
    stop: StopSignal,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer {
            idle: idle.clone(),
            timeout: header_read_timeout,
        })
        .header_read_timeout(header_read_timeout)
        // A response is written from one buffer, its body copied in behind its head, not as a
        // queue of buffers handed to `writev`: fewer instructions for a small answer, and no
        // slower for a large one (1 GiB downloads measured faster). The buffer keeps the size
        // a large response grew it to (up to hyper's `max_buf_size`, about 400 KiB, and one
        // chunk) while the connection stays busy; parking an idle connection frees it.
        .writev(false);
    // Polled once to be woken by it; after that a cheap check tells whether it woke us.
    // Unconstrained: a poll refused for want of coop budget would register no wake-up.
    let mut stopped = pin!(tokio::task::unconstrained(stop.clone().requested()));
    let mut waiting_for_stop = false;
    loop {
        // Boxed: a parked connection's task keeps no room for it.
        let mut conn = Box::new(builder.serve_connection(io, svc).with_upgrades());
        let turn = poll_fn(|cx| {
            if let Poll::Ready(r) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(Turn::Ended(r));
            }
            if idle.may_park() {
                return Poll::Ready(Turn::Park);
            }
            let stop_now = if waiting_for_stop {
                stop.is_requested()
            } else {
                waiting_for_stop = true;
                stopped.as_mut().poll(cx).is_ready()
            };
            if stop_now {
                return Poll::Ready(Turn::Stop);
            }
            Poll::Pending
        })
        .await;
        let result = match turn {
            Turn::Ended(r) => r,
            Turn::Stop => {
                Pin::new(&mut *conn).graceful_shutdown();
                conn.await
            }
            Turn::Park => {
                let Some(parts) = conn.into_parts() else {
                    return; // upgraded: not reached, an upgrade ends the connection's turn
                };
                (io, svc) = (parts.io, parts.service);
                // The read buffer goes now, not at the end of this arm: keeping it while parked
                // would keep its whole allocation.
                let read_buf = parts.read_buf;
                if !read_buf.is_empty() {
                    io.ahead = Bytes::copy_from_slice(&read_buf);
                }
                drop(read_buf);
                // The header read timeout hyper was counting down still runs, and the next
                // hyper connection keeps it.
                let deadline = idle.head_deadline();
                let readable = poll_fn(|cx| io.stream.inner().poll_read_ready(cx));
                let parked = Counted::new(&svc.shared.metrics.idle_connections);
                // A request that came in is served (and then closed, if a shutdown began).
                let woke = tokio::select! {
                    biased;
                    r = readable => Some(r),
                    _ = stopped.as_mut() => None,
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::debug!("idle connection closed at the header read timeout");
                        None
                    }
                };
                drop(parked);
                idle.keep_deadline(deadline);
                match woke {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => {
                        return tracing::debug!(error = %e, "connection ended with an error")
                    }
                    None => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        return;
    }
}

/// The request path, per connection.
#[derive(Clone)]
struct Svc {
    shared: Arc<Shared>,
    admin: bool,
    via: Via,
    idle: Arc<Idle>,
    /// Set by each request; the h2 path takes it back at each of its idle checks.
    requested: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<Tracked>;
    type Error = Infallible;
    // Boxed: the request path's future is large, and an idle keep-alive connection should not
    // carry room for it between requests.
    type Future = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.requested.store(true, Ordering::Relaxed);
        let in_flight = InFlight::new(&self.idle);
        // One reference count taken per request: with several workers each one is a write to
        // a cache line all of them share.
        if self.admin {
            let shared = self.shared.clone();
            return Box::pin(async move {
                let res = crate::admin::handle(&shared, req).await;
                Ok(res.map(|body| Tracked { body, in_flight }))
            });
        }
        let proxy = self.shared.proxy.load_full();
        let via = self.via.clone();
        Box::pin(async move {
            let res = proxy.handle(&via, req, ConnRef(&in_flight.0)).await;
            Ok(res.map(|body| Tracked { body, in_flight }))
        })
    }
}

/// One request, from the service call until hyper drops its response body (which it does
/// once the body has ended, or when the exchange is abandoned).
struct InFlight(Arc<Idle>);

/// The connection a request came on, as the request path sees it.
#[derive(Clone, Copy)]
pub struct ConnRef<'a>(&'a Arc<Idle>);

impl ConnRef<'_> {
    /// Keeps the connection counted among open ones, seated on its worker and waited for by a
    /// shutdown for as long as the result lives: an upgraded connection leaves hyper, and its
    /// task ends, but it goes on in a tunnel.
    pub fn keep(self) -> KeptConn {
        KeptConn(self.0.clone())
    }
}

/// See [`ConnRef::keep`].
pub struct KeptConn(Arc<Idle>);

impl KeptConn {
    /// Completes when a shutdown begins (never, for a connection no shutdown waits for).
    pub async fn shutdown_begun(&self) {
        match &self.0.held {
            Some(held) => held.stop.clone().requested().await,
            None => std::future::pending().await,
        }
    }
}

/// What a connection holds for as long as anything holds its [`Idle`]: its task, its requests
/// and a tunnel it became (see [`ConnRef::keep`]).
struct Held {
    _open: Counted,
    _seat: Option<Counted>,
    stop: StopSignal,
}

impl InFlight {
    fn new(idle: &Arc<Idle>) -> Self {
        idle.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(idle.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts as in flight until it is dropped.
    pub struct Tracked {
        #[pin]
        body: Body,
        in_flight: InFlight,
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// One in a gauge while it lives.
pub struct Counted(Gauge);

impl Counted {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What an HTTP/1 connection's parts tell the serving loop; all on one task, so relaxed.
struct Idle {
    /// The connection's place in the counts and in the drain, freed with the last holder.
    held: Option<Held>,
    /// All hyper wrote has been flushed to the socket.
    flushed: AtomicBool,
    /// Bytes came in since hyper began to wait for a request head.
    got_bytes: AtomicBool,
    /// hyper has waited [`PARK_AFTER`] for a request head.
    park_due: AtomicBool,
    /// Requests whose response hyper still holds.
    in_flight: AtomicUsize,
    /// Watched by this thread's [`sweeper`].
    watched: AtomicBool,
    /// On a single-threaded runtime (credgate's workers), the [`sweeper`] of the connection's
    /// thread ends waits for a head at their deadline and parks idle connections; elsewhere
    /// (a test's multi-threaded runtime) a tokio timer ends those waits and nothing parks.
    swept: bool,
    /// The sweeper found the current wait for a head past its deadline.
    head_expired: AtomicBool,
    /// Counts waits for a head: a wait's end clears the state only if no later one began.
    head_waits: AtomicU64,
    /// When hyper began its current wait for a head (0: it is not waiting), as below.
    head_started: AtomicU64,
    /// Deadlines, as nanoseconds after `base`: of the current (or last) wait for a head, and
    /// one the next wait must keep (0: none).
    base: tokio::time::Instant,
    head_deadline: AtomicU64,
    kept_deadline: AtomicU64,
}

impl Idle {
    fn new(held: Option<Held>) -> Self {
        Self {
            held,
            flushed: AtomicBool::new(false),
            got_bytes: AtomicBool::new(false),
            park_due: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            watched: AtomicBool::new(false),
            swept: tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::CurrentThread,
            head_expired: AtomicBool::new(false),
            head_waits: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
            head_deadline: AtomicU64::new(0),
            kept_deadline: AtomicU64::new(0),
        }
    }

    /// Nothing would be lost by taking the connection apart now: hyper is waiting for a
    /// request head, has read none of it, has nothing left to write, and holds no response.
    fn may_park(&self) -> bool {
        self.park_due.load(Ordering::Relaxed)
            && self.flushed.load(Ordering::Relaxed)
            && !self.got_bytes.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// The next wait for a head ends by `deadline` at the latest.
    fn keep_deadline(&self, deadline: tokio::time::Instant) {
        self.kept_deadline
            .store(self.nanos(deadline), Ordering::Relaxed);
    }

    fn head_deadline(&self) -> tokio::time::Instant {
        self.at(self.head_deadline.load(Ordering::Relaxed))
    }

    /// Starts a wait for a head, begun at `started`, that hyper would end at `deadline`:
    /// returns when it ends, and the wait's number.
    fn start_head_wait(
        &self,
        started: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> (tokio::time::Instant, u64) {
        let deadline = match self.kept_deadline.swap(0, Ordering::Relaxed) {
            0 => deadline,
            kept => deadline.min(self.at(kept)),
        };
        self.head_deadline
            .store(self.nanos(deadline), Ordering::Relaxed);
        self.head_started
            .store(self.nanos(started), Ordering::Relaxed);
        self.head_expired.store(false, Ordering::Relaxed);
        self.got_bytes.store(false, Ordering::Relaxed);
        (
            deadline,
            self.head_waits.fetch_add(1, Ordering::Relaxed) + 1,
        )
    }

    /// Ends wait number `wait`, unless a later one has begun (hyper may replace a wait).
    fn end_head_wait(&self, wait: u64) {
        if self.head_waits.load(Ordering::Relaxed) == wait {
            self.head_started.store(0, Ordering::Relaxed);
            self.park_due.store(false, Ordering::Relaxed);
            self.head_expired.store(false, Ordering::Relaxed);
        }
    }

    /// The sweeper's look at a connection at `now`: flags a wait for a head that has reached
    /// its deadline or [`PARK_AFTER`]; returns whether that is news (the task must be woken).
    fn sweep(&self, now: tokio::time::Instant) -> bool {
        let started = match self.head_started.load(Ordering::Relaxed) {
            0 => return false,
            started => self.at(started),
        };
        let expired =
            now >= self.head_deadline() && !self.head_expired.swap(true, Ordering::Relaxed);
        let park = now.saturating_duration_since(started) >= PARK_AFTER
            && !self.park_due.swap(true, Ordering::Relaxed);
        expired || park
    }

    fn nanos(&self, t: tokio::time::Instant) -> u64 {
        let n = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX).max(1)
    }

    fn at(&self, nanos: u64) -> tokio::time::Instant {
        self.base + Duration::from_nanos(nanos)
    }
}

/// hyper's timer for one HTTP/1 server connection, whose only timer is the header read
/// timeout (`timeout`): it runs exactly while hyper waits for a request head.
#[derive(Clone)]
struct HeadTimer {
    idle: Arc<Idle>,
    timeout: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    /// hyper asks for `now + timeout` as each wait for a head begins.
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let (deadline, wait) = self.idle.start_head_wait(deadline - self.timeout, deadline);
        Box::pin(HeadWait {
            // A tokio timer per request costs a timer-wheel entry, and a wake-up syscall
            // whenever it is due sooner than any before it; the sweep is free.
            sleep: (!self.idle.swept).then(|| tokio::time::sleep_until(deadline)),
            waiting: Waiting(self.idle.clone(), wait),
        })
    }
}

pin_project_lite::pin_project! {
    /// The wait for a request head, until the header read timeout: ended by the sweeper (at
    /// most [`PARK_AFTER`] late), or by a tokio timer where there is no sweeper.
    struct HeadWait {
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        waiting: Waiting,
    }
}

/// Marks the end of a wait for a head (its number).
struct Waiting(Arc<Idle>, u64);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.end_head_wait(self.1);
    }
}

impl Future for HeadWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(sleep) = this.sleep.as_pin_mut() {
            return sleep.poll(cx);
        }
        // Polled only once the head is not all there: the connection may be idle.
        let idle = &this.waiting.0;
        sweeper::watch(idle, cx);
        if idle.head_expired.load(Ordering::Relaxed) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl hyper::rt::Sleep for HeadWait {}

/// Wakes this thread's connections that have waited [`PARK_AFTER`] for a head (to park), or
/// past their header read deadline (to close). One task per thread ticking every
/// [`PARK_AFTER`], instead of timers per request: each costs a timer-wheel entry, and a
/// wake-up syscall when it is due sooner than the runtime's next wake-up.
///
/// Assumes one runtime per thread, driven and dropped on that thread (credgate's workers and
/// main runtime): the state is thread-local, and a sweep on another runtime of the same thread
/// would not be driven.
mod sweeper {
    use std::cell::RefCell;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Weak};
    use std::task::{Context, Waker};

    use super::{Idle, PARK_AFTER};

    thread_local! {
        static WATCHED: RefCell<Watched> = const { RefCell::new(Watched { conns: Vec::new(), sweeping: false }) };
    }

    struct Watched {
        /// Each connection once, with its task's waker.
        conns: Vec<(Weak<Idle>, Waker)>,
        /// Whether this thread's sweep task exists (it may be settling, with no connection).
        sweeping: bool,
    }

    /// Whether a sweep runs on this thread.
    #[cfg(test)]
    pub(super) fn sweeping() -> bool {
        WATCHED.with(|w| w.borrow().sweeping)
    }

    /// Watches the connection of `idle` from now on (once per connection).
    pub(super) fn watch(idle: &Arc<Idle>, cx: &Context<'_>) {
        if idle.watched.swap(true, Ordering::Relaxed) {
            return;
        }
        let start = WATCHED.with(|w| {
            let mut w = w.borrow_mut();
            w.conns.push((Arc::downgrade(idle), cx.waker().clone()));
            !std::mem::replace(&mut w.sweeping, true)
        });
        if start {
            tokio::spawn(sweep());
        }
    }

    /// Ends this thread's sweep however the sweeping task ends: dropped with its runtime, it
    /// must not leave a later runtime on this thread believing a sweep still runs.
    struct Sweeping;

    impl Drop for Sweeping {
        fn drop(&mut self) {
            let _ = WATCHED.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.conns.clear();
                    w.sweeping = false;
                }
            });
        }
    }

    async fn sweep() {
        let _sweeping = Sweeping;
        let mut tick = tokio::time::interval(PARK_AFTER);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut settling = SETTLE_TICKS;
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let done = WATCHED.with(|w| {
                let mut w = w.borrow_mut();
                let before = w.conns.len();
                let mut woke = false;
                w.conns.retain(|(idle, waker)| {
                    let Some(idle) = idle.upgrade() else {
                        return false;
                    };
                    if idle.sweep(now) {
                        waker.wake_by_ref();
                        woke = true;
                    }
                    true
                });
                // A connection came, went or parks: memory was freed, or soon will be.
                settling = if woke || w.conns.len() != before {
                    SETTLE_TICKS
                } else {
                    settling.saturating_sub(1)
                };
                w.sweeping = settling > 0 || !w.conns.is_empty();
                !w.sweeping
            });
            if done {
                return;
            }
            if settling > 0 {
                // mimalloc returns freed pages to the system only when the thread that owns
                // them calls into it, so after a burst an idle worker kept them all (158 MiB
                // at 10,000 callers instead of 48; 107 instead of 26 once they had left). This
                // hands them back, after mimalloc's purge delay. A no-op when mimalloc is not
                // the allocator (the library inside a test).
                // SAFETY: mi_collect tidies this thread's heap; it takes no pointers.
                unsafe { libmimalloc_sys::mi_collect(false) };
            }
        }
    }

    /// Ticks after the last change among this thread's connections during which the sweep
    /// hands freed memory back (and goes on ticking if none is left): two of mimalloc's 1 s
    /// purge delays, one for the pages to come free and one for their purge.
    const SETTLE_TICKS: u32 = 25;
}

/// The client's stream as hyper sees it: bytes already read come first, and writes and
/// flushes are recorded in [`Idle`].
struct ConnIo<S> {
    stream: TokioIo<S>,
    ahead: Bytes,
    idle: Arc<Idle>,
}

impl<S: Stream> hyper::rt::Read for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                this.ahead = Bytes::new(); // and its allocation with it
            }
        } else {
            ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        }
        this.idle.got_bytes.store(true, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> hyper::rt::Write for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.idle.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.idle.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.stream)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.stream).poll_flush(cx));
        if r.is_ok() {
            this.idle.flushed.store(true, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    /// hyper may replace a running wait for a head (`Timer::reset`); the replaced one's end
    /// must not end the new one, or no sweep would ever time it out.
    #[tokio::test]
    async fn a_replaced_wait_for_a_head_does_not_end_its_successor() {
        let idle = Arc::new(Idle::new(None));
        assert!(idle.swept, "a current-thread runtime is swept");
        let timer = HeadTimer {
            idle: idle.clone(),
            timeout: Duration::from_secs(1),
        };
        let mut wait = timer.sleep(Duration::from_secs(1));
        timer.reset(&mut wait, Instant::now() + Duration::from_millis(10));
        assert_ne!(
            idle.head_started.load(Ordering::Relaxed),
            0,
            "the new wait runs"
        );
        let later = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(idle.sweep(later), "the new wait is past its deadline");
        assert!(idle.head_expired.load(Ordering::Relaxed));
        drop(wait);
        assert_eq!(
            idle.head_started.load(Ordering::Relaxed),
            0,
            "its end ends it"
        );
    }

    /// A sweep dropped with its runtime leaves the thread free to start another.
    #[test]
    fn a_sweep_dropped_with_its_runtime_lets_the_next_runtime_sweep() {
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _idle = watched().await;
                assert!(sweeper::sweeping(), "a sweep runs on this thread");
            });
            drop(rt);
            assert!(!sweeper::sweeping(), "the dropped sweep left no trace");
        }
    }

    /// A connection's idle state, watched by this thread's sweep (which has had a turn to run).
    async fn watched() -> Arc<Idle> {
        let idle = Arc::new(Idle::new(None));
        std::future::poll_fn(|cx| {
            sweeper::watch(&idle, cx);
            Poll::Ready(())
        })
        .await;
        tokio::task::yield_now().await;
        idle
    }

    #[test]
    fn a_sweep_goes_on_after_its_last_connection_then_ends_and_a_new_one_starts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true) // time advances by itself while the runtime waits
            .build()
            .unwrap();
        rt.block_on(async {
            drop(watched().await);
            // Two purge delays (2.5 s) after the connection left, the sweep still runs...
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(
                sweeper::sweeping(),
                "the sweep went on after its last connection"
            );
            // ...and after them it has ended.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!sweeper::sweeping(), "the sweep ended");
            // A new connection starts a new sweep.
            let _idle = watched().await;
            assert!(sweeper::sweeping(), "a new sweep runs");
        });
    }
}
