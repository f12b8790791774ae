//! Logging set-up: `RUST_LOG` filters, `--log-format` picks JSON or human-readable lines.
//!
//! Lines are formatted on the thread that logs. On runtime worker threads they are gathered in
//! a per-thread batch, handed on when the thread runs out of work (tokio's park hook), at
//! [`BATCH_BYTES`], or once the oldest line is [`BATCH_DELAY`] old; other threads hand each line
//! on at once. A dedicated thread writes what is handed on to stderr, so a request never waits
//! on a `write(2)`; when that thread falls behind, logging threads wait (no line is dropped).

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// A batch is handed on once it holds this much.
pub const BATCH_BYTES: usize = 32 * 1024;
/// ... or once its oldest line is this old (a worker that never runs out of work).
pub const BATCH_DELAY: Duration = Duration::from_millis(250);

/// Keeps the log writer thread alive; dropping it flushes what is still queued.
#[must_use = "logs written after this guard is dropped may be lost"]
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_thread();
    }
}

/// Where batches go: the writer thread's queue.
static SINK: OnceLock<NonBlocking> = OnceLock::new();

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides the default `info`.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("credgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let _ = SINK.set(writer);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Lines)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    LogGuard(guard)
}

/// Hands this thread's batch on and, from now on, batches its lines. Called by tokio each time
/// a worker runs out of work (`on_thread_park`), so lines wait at most until then.
pub fn flush_thread() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.batching = true;
            b.hand_on();
        }
    });
}

thread_local! {
    static BATCH: RefCell<Batch> = const { RefCell::new(Batch { buf: Vec::new(), oldest: None, batching: false }) };
}

struct Batch {
    buf: Vec<u8>,
    oldest: Option<Instant>,
    /// Set on threads that have parked once (runtime workers); others never batch.
    batching: bool,
}

impl Batch {
    fn hand_on(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(sink) = SINK.get() {
            // One message per batch; blocks (never drops) when the writer is behind.
            let _ = sink.clone().write_all(&self.buf);
        }
        self.buf.clear();
        self.oldest = None;
    }
}

impl Drop for Batch {
    /// A worker thread that ends hands on what it holds.
    fn drop(&mut self) {
        self.hand_on();
    }
}

/// The writer the formatter writes each finished line to.
struct Lines;

impl Write for Lines {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH.try_with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return false;
            };
            if !b.batching {
                return false;
            }
            b.buf.extend_from_slice(line);
            let oldest = *b.oldest.get_or_insert_with(Instant::now);
            if b.buf.len() >= BATCH_BYTES || oldest.elapsed() >= BATCH_DELAY {
                b.hand_on();
            }
            true
        });
        if batched != Ok(true) {
            if let Some(sink) = SINK.get() {
                sink.clone().write_all(line)?;
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
