//! The body types credgate hands to hyper: streamed from the other side, or held in memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::pool::Lease;

/// A response body: the upstream's, passed through (with an idle deadline), or one credgate
/// holds (its own error bodies).
pub type Body = Either<IdleLimited, Full<Bytes>>;

/// A request body on its way upstream: the caller's, streamed through once, or one held in
/// memory (a small body kept so it can be replayed, or a token request).
pub type UpstreamBody = Either<CallerBody, Full<Bytes>>;

/// Bytes held in memory, as either body type.
pub fn full<S>(bytes: impl Into<Bytes>) -> Either<S, Full<Bytes>> {
    Either::Right(Full::new(bytes.into()))
}

/// An empty body, as either body type.
pub fn empty<S>() -> Either<S, Full<Bytes>> {
    full(Bytes::new())
}

/// The upstream's response body, passed through as it arrives. Fails (so hyper aborts the
/// caller's response) when the upstream stays silent longer than `idle` mid-body; the timer
/// is only armed once a read has to wait, so a body that is already there costs nothing.
///
/// With a lease, the upstream connection goes back to its pool once the body has ended (a
/// body dropped before its end closes the connection instead).
pub struct IdleLimited {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    lease: Option<Lease>,
}

impl IdleLimited {
    pub fn new(inner: Incoming, idle: Duration, lease: Option<Lease>) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            lease,
        }
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for IdleLimited {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended, so this is where most end.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

/// The upstream went silent mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} in the middle of a response body")]
pub struct UpstreamStalled(Duration);

impl http_body::Body for IdleLimited {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                // Trailers are a body's last frame, and hyper reads no further once it has
                // them: this is the end.
                let ended = match &frame {
                    None => true,
                    Some(Ok(f)) => f.is_trailers(),
                    Some(Err(_)) => false,
                };
                if ended {
                    this.release();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(UpstreamStalled(idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The caller's request body, streamed upstream. Remembers whether it failed (a malformed
/// chunk, a connection cut short), so that a failed exchange is blamed on the caller (400)
/// and not on the upstream (502).
pub struct CallerBody {
    inner: Incoming,
    failed: Arc<AtomicBool>,
}

impl CallerBody {
    /// Wraps `inner`; the flag turns true if reading it fails.
    pub fn new(inner: Incoming) -> (Self, Arc<AtomicBool>) {
        let failed = Arc::new(AtomicBool::new(false));
        (
            Self {
                inner,
                failed: failed.clone(),
            },
            failed,
        )
    }
}

impl http_body::Body for CallerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
