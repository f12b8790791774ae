//! The body type credgate hands to hyper: a streamed upstream body, or bytes it holds itself.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A body passed through untouched from the other side, or one credgate holds in memory
/// (its own error bodies, and small request bodies kept so they can be replayed).
pub type Body = Either<Incoming, Full<Bytes>>;

/// A body of bytes held in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    Either::Right(Full::new(Bytes::new()))
}
