//! Logging set-up: `RUST_LOG` filters, `--log-format` picks JSON or human-readable lines.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Keeps the log writer thread alive; dropping it flushes what is still queued.
#[must_use = "logs written after this guard is dropped may be lost"]
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides the default `info`.
///
/// Lines are formatted on the thread that logs but written by a dedicated thread, so a request
/// never waits on a `write(2)` to stderr; when that thread falls behind, logging threads wait
/// (no line is dropped).
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("credgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    LogGuard(guard)
}
