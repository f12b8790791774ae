//! One client connection: HTTP/1 or h2c told apart by its first bytes, and an HTTP/1 connection
//! that sits idle parked without hyper's buffers until its next request arrives.
//!
//! hyper keeps two 8 KiB buffers for every HTTP/1 connection for as long as it lives. Most of
//! a sidecar's connections are idle keep-alive ones, so once a connection has waited
//! [`PARK_AFTER`] for its next request with nothing left to write, it is taken apart
//! ([`http1::UpgradeableConnection::into_parts`]): what stays is the socket and the service,
//! and a new hyper connection is made when the socket is readable again. Whether hyper is
//! waiting for a request head is learnt from the one timer it starts for that wait, the header
//! read timeout, given to it here per connection.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long an HTTP/1 connection waits for its next request before it parks. Parking and
/// unparking cost about as much as a small request, so a connection in use never parks.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

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
}

impl Conn {
    /// Serves `stream` on the current runtime until the client, an error or a shutdown ends it.
    pub fn serve(self, stream: impl Stream) {
        let open = self.shared.metrics.open_connections.clone();
        open.inc();
        tokio::spawn(async move {
            self.run(stream).await;
            open.dec();
        });
    }

    async fn run(self, stream: impl Stream) {
        let Conn {
            shared,
            stop,
            header_read_timeout,
            admin,
            via,
        } = self;
        if stop.was_requested() {
            return;
        }
        let mut stream = TokioIo::new(stream);
        // A connection must bring a request within the header timeout; until its first bytes
        // it holds no more than its socket.
        let sniffed = tokio::select! {
            biased;
            _ = stop.clone().requested() => return,
            r = tokio::time::timeout(header_read_timeout, sniff(stream.inner_mut())) => r,
        };
        let ahead = match sniffed {
            Ok(Ok(ahead)) if !ahead.is_empty() => ahead,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => return tracing::debug!(error = %e, "connection ended with an error"),
            Err(_) => {
                return tracing::debug!("connection closed: no request within the header timeout")
            }
        };
        let idle = Arc::new(Idle::default());
        let io = ConnIo {
            stream,
            ahead,
            idle: idle.clone(),
        };
        let svc = Svc {
            shared,
            admin,
            via,
            started: Arc::new(AtomicBool::new(false)),
        };
        if io.ahead.starts_with(H2_PREFACE) {
            // Boxed: the task of every HTTP/1 connection would otherwise carry room for it.
            Box::pin(serve_h2(io, svc, header_read_timeout, stop)).await
        } else {
            let parked = svc.shared.metrics.idle_connections.clone();
            serve_h1(io, svc, idle, header_read_timeout, stop, &parked).await
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
    header_read_timeout: Duration,
    stop: StopSignal,
) {
    let started = svc.started.clone();
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(io, svc);
    let mut conn = pin!(conn);
    let mut stop = pin!(stop.requested());
    // HTTP/2 has no header read timeout of its own: a handshake without a request must not
    // keep the connection.
    let first = tokio::time::sleep(header_read_timeout);
    let mut first = pin!(first);
    let mut stopping = false;
    let result = poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        if !started.load(Ordering::Relaxed) && first.as_mut().poll(cx).is_ready() {
            tracing::debug!("connection closed: no request within the header timeout");
            return Poll::Ready(Ok(()));
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
    parked: &Gauge,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer(idle.clone()))
        .header_read_timeout(header_read_timeout);
    // Polled once to be woken by it; after that a cheap check tells whether it woke us.
    let mut stopped = pin!(stop.clone().requested());
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
                idle.park_due.store(false, Ordering::Relaxed);
                // What is left of the header read timeout hyper was counting down.
                let idle_left = header_read_timeout.saturating_sub(PARK_AFTER);
                let readable = poll_fn(|cx| io.stream.inner().poll_read_ready(cx));
                parked.inc();
                let woke = tokio::select! {
                    biased;
                    _ = stopped.as_mut() => None,
                    r = readable => Some(r),
                    _ = tokio::time::sleep(idle_left) => {
                        tracing::debug!("idle connection closed at the header read timeout");
                        None
                    }
                };
                parked.dec();
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
    /// Set by the first request (the h2 path waits for one within the header timeout).
    started: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<Body>;
    type Error = Infallible;
    // Boxed: the request path's future is large, and an idle keep-alive connection should not
    // carry room for it between requests.
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.started.store(true, Ordering::Relaxed);
        let shared = self.shared.clone();
        let via = self.via.clone();
        let admin = self.admin;
        Box::pin(async move {
            if admin {
                return Ok(crate::admin::handle(&shared, req).await);
            }
            let proxy = shared.proxy.load_full();
            Ok(proxy.handle(&via, req).await)
        })
    }
}

/// What an HTTP/1 connection's parts tell the serving loop; all on one task, so relaxed.
#[derive(Default)]
struct Idle {
    /// All hyper wrote has been flushed to the socket.
    flushed: AtomicBool,
    /// Bytes came in since hyper began to wait for a request head.
    got_bytes: AtomicBool,
    /// hyper has waited [`PARK_AFTER`] for a request head.
    park_due: AtomicBool,
}

impl Idle {
    /// Nothing would be lost by taking the connection apart now: hyper is waiting for a
    /// request head, has read none of it, and has nothing left to write.
    fn may_park(&self) -> bool {
        self.park_due.load(Ordering::Relaxed)
            && self.flushed.load(Ordering::Relaxed)
            && !self.got_bytes.load(Ordering::Relaxed)
    }
}

/// hyper's timer for one HTTP/1 server connection, whose only timer is the header read
/// timeout: it runs exactly while hyper waits for a request head.
#[derive(Clone)]
struct HeadTimer(Arc<Idle>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let park_at = tokio::time::Instant::now() + PARK_AFTER;
        let (first, then) = if park_at < deadline {
            (park_at, Some(deadline))
        } else {
            (deadline, None)
        };
        self.0.got_bytes.store(false, Ordering::Relaxed);
        Box::pin(HeadWait {
            sleep: tokio::time::sleep_until(first),
            then,
            waiting: Waiting(self.0.clone()),
        })
    }
}

pin_project_lite::pin_project! {
    /// The wait for a request head: first until parking is due, then until the timeout.
    struct HeadWait {
        #[pin]
        sleep: tokio::time::Sleep,
        then: Option<tokio::time::Instant>,
        waiting: Waiting,
    }
}

/// Clears `park_due` when the wait for a head ends.
struct Waiting(Arc<Idle>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.park_due.store(false, Ordering::Relaxed);
    }
}

impl Future for HeadWait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        ready!(this.sleep.as_mut().poll(cx));
        match this.then.take() {
            Some(deadline) => {
                this.waiting.0.park_due.store(true, Ordering::Relaxed);
                this.sleep.as_mut().reset(deadline);
                this.sleep.poll(cx)
            }
            None => Poll::Ready(()),
        }
    }
}

impl hyper::rt::Sleep for HeadWait {}

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
