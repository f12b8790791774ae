//! Logging set-up: `RUST_LOG` filters, `--log-format` picks JSON or human-readable lines.
//!
//! Lines are formatted on the thread that logs. On runtime worker threads (those that have
//! parked once: tokio's park hook says so) they are gathered in a per-thread batch, handed on
//! [`BATCH_DELAY`] after its first line (a timer task on the thread's runtime) or at
//! [`BATCH_BYTES`]; other threads hand each line on at once. A dedicated thread writes what is
//! handed on to stderr, so a request never waits on a `write(2)`; when that thread falls behind,
//! logging threads wait (no line is dropped).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
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
/// ... or this long after its first line. Each hand-over wakes the writer thread: at a steady
/// trickle of requests, handing on at every park cost a wake-up per request (28 instead of 25
/// µs of CPU per request at 5,000 req/s), and the woken thread competed for the cores with the
/// requests themselves.
pub const BATCH_DELAY: Duration = Duration::from_millis(5);

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
        // Counted in messages, and a message is a batch of up to BATCH_BYTES: at most 8 MiB
        // wait for stderr before logging threads do.
        .buffered_lines_limit(256)
        .thread_name("credgate-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let _ = SINK.set(writer);
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Lines)
        .with_ansi(terminal);
    // Colours for a person at a terminal; otherwise the lean formatter below.
    let lean = match format {
        LogFormat::Pretty if terminal => None,
        LogFormat::Pretty => Some(Lean { json: false }),
        LogFormat::Json => Some(Lean { json: true }),
    };
    let installed = match lean {
        None => builder.compact().try_init(),
        Some(lean) => builder.event_format(lean).try_init(),
    };
    if let (Ok(()), Some(lean)) = (installed, lean) {
        let _ = LEAN.set(lean);
    }
    LogGuard(guard)
}

/// The park hook of runtime threads (`on_thread_park`): from the first call on, the thread
/// batches its lines.
pub fn on_park() {
    with_batch(|b| b.batching = true);
}

/// Hands this thread's batch on now.
pub fn flush_thread() {
    with_batch(Batch::hand_on);
}

/// Runs `f` on this thread's batch, unless the thread is ending or the batch is in use (a line
/// logged from inside the batch's own code).
fn with_batch(f: impl FnOnce(&mut Batch)) {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            f(&mut b);
        }
    });
}

thread_local! {
    static BATCH: RefCell<Batch> = const {
        RefCell::new(Batch { buf: Vec::new(), batching: false, armed: false, timer: None })
    };
}

struct Batch {
    buf: Vec<u8>,
    /// Set on threads that have parked once (runtime workers); others never batch.
    batching: bool,
    /// The timer is set (cleared only when it fires, so it is never set twice).
    armed: bool,
    /// Wakes this thread's timer task (spawned on its runtime at the first arming).
    timer: Option<std::sync::Arc<tokio::sync::Notify>>,
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
    }

    /// Has the thread's timer task hand the batch on in [`BATCH_DELAY`]. Called at a batch's first
    /// line, inside the runtime: the woken task sets its timer before the thread next parks.
    /// Where there is no current-thread runtime to run it, hands the batch on at once.
    fn arm(&mut self) {
        if self.timer.is_none() {
            // The timer task must run on this thread, to hand on this thread's batch.
            let Some(rt) = tokio::runtime::Handle::try_current()
                .ok()
                .filter(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
            else {
                return self.hand_on();
            };
            let wake = std::sync::Arc::new(tokio::sync::Notify::new());
            rt.spawn(hand_on_later(wake.clone()));
            self.timer = Some(wake);
        }
        if let Some(wake) = &self.timer {
            wake.notify_one();
            self.armed = true;
        }
    }
}

/// A runtime thread's log timer: each time it is woken, hands the thread's batch on
/// [`BATCH_DELAY`] later.
async fn hand_on_later(wake: std::sync::Arc<tokio::sync::Notify>) {
    /// When the task ends with its runtime: hands on what waits, and lets a later arming start
    /// a new timer.
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            with_batch(|b| {
                b.armed = false;
                b.timer = None;
                b.hand_on();
            });
        }
    }
    let _disarm = Disarm;
    loop {
        wake.notified().await;
        tokio::time::sleep(BATCH_DELAY).await;
        with_batch(|b| {
            b.armed = false;
            b.hand_on();
        });
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
            if b.buf.len() >= BATCH_BYTES {
                b.hand_on();
            } else if !b.armed {
                b.arm();
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

/// The line formats, written straight into the line buffer (one per request, so it is lean):
/// - text: `2026-11-23T13:22:21.503726Z  INFO credgate::proxy: request route="api" status=200`
/// - JSON: `{"timestamp":"…","level":"INFO","message":"request","route":"api",…,"target":"…"}`
///
/// credgate logs no spans, so only the event's own fields are written. Strings are quoted and
/// escaped in both formats, and control characters escaped everywhere, so no value can forge a
/// line or send escape sequences to a terminal.
#[derive(Clone, Copy)]
struct Lean {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for Lean
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        self.line(&mut w, meta.level().as_str(), meta.target(), |f| {
            event.record(f)
        })
    }
}

impl Lean {
    /// Writes one line, its fields written by `fields` in any order: in a text line the message
    /// comes first wherever it is written (the others are gathered aside meanwhile).
    fn line(
        &self,
        w: &mut Writer<'_>,
        level: &str,
        target: &str,
        fields: impl FnOnce(&mut Fields<'_, '_>),
    ) -> fmt::Result {
        if self.json {
            w.write_str("{\"timestamp\":\"")?;
            timestamp(w)?;
            w.write_str("\",\"level\":\"")?;
            w.write_str(level)?;
            w.write_str("\"")?;
            let mut f = Fields {
                w,
                rest: None,
                result: Ok(()),
            };
            fields(&mut f);
            f.result?;
            w.write_str(",\"target\":")?;
            json_str(w, target)?;
            w.write_str("}\n")
        } else {
            timestamp(w)?;
            // ` {level:>5} {target}:`, without the formatting machinery (this is per request).
            w.write_str(if level.len() < 5 { "  " } else { " " })?;
            w.write_str(level)?;
            w.write_str(" ")?;
            w.write_str(target)?;
            w.write_str(":")?;
            thread_local! {
                static REST: RefCell<String> = const { RefCell::new(String::new()) };
            }
            let write = |w: &mut Writer<'_>, rest: &mut String| {
                rest.clear();
                let mut f = Fields {
                    w,
                    rest: Some(rest),
                    result: Ok(()),
                };
                fields(&mut f);
                f.result?;
                w.write_str(rest)?;
                w.write_str("\n")
            };
            // A field that logs while being formatted gets a buffer of its own.
            REST.with(|rest| match rest.try_borrow_mut() {
                Ok(mut rest) => write(w, &mut rest),
                Err(_) => write(w, &mut String::new()),
            })
        }
    }
}

/// The formatter of the subscriber [`init`] installed, when it is one of ours: the request
/// line is then written without a tracing event (see [`RequestLine::log`]).
static LEAN: OnceLock<Lean> = OnceLock::new();

/// The target of the request line (a filter such as `RUST_LOG=credgate::proxy=warn` turns it off).
pub const REQUEST_TARGET: &str = "credgate::proxy";

/// The one line each request gets, at INFO. Its fields are named three times below: in the
/// event (without `init`), in the filter's question and in [`RequestLine::fields`]; a field
/// added to one goes in all three.
pub struct RequestLine<'a> {
    pub route: &'a str,
    pub method: &'a http::Method,
    pub path: &'a str,
    pub status: u16,
    pub attempts: u32,
    pub upstream_us: Option<u64>,
    pub total_us: u64,
}

impl RequestLine<'_> {
    /// Logs the line where the filter lets INFO through for [`REQUEST_TARGET`]. Under
    /// credgate's own formatter it is formatted without an event, byte for byte as the event
    /// would have been, and batched like any line: the event's dispatch and field visits cost
    /// about as much as writing the line.
    pub fn log(&self) {
        let Some(lean) = LEAN.get() else {
            tracing::info!(
                target: REQUEST_TARGET,
                route = self.route,
                method = %self.method,
                path = self.path,
                status = self.status,
                attempts = self.attempts,
                upstream_us = self.upstream_us,
                total_us = self.total_us,
                "request"
            );
            return;
        };
        // Asked as for an event with the event's fields, so that a filter naming fields
        // (`credgate::proxy[{status}]=info`) decides as it would for the event.
        let enabled = tracing::enabled!(
            kind: tracing::metadata::Kind::EVENT,
            target: REQUEST_TARGET,
            tracing::Level::INFO,
            message,
            route,
            method,
            path,
            status,
            attempts,
            upstream_us,
            total_us
        );
        if !enabled {
            return;
        }
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let write = |line: &mut String| {
            line.clear();
            if self.write(*lean, line).is_ok() {
                let _ = Lines.write_all(line.as_bytes());
            }
        };
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => write(&mut line),
            Err(_) => write(&mut String::new()),
        });
    }

    /// The line as `lean` writes it.
    fn write(&self, lean: Lean, line: &mut String) -> fmt::Result {
        if !lean.json
            && [self.route, self.method.as_str(), self.path]
                .iter()
                .all(|v| needs_no_escape(v))
        {
            return self.write_text(line);
        }
        lean.line(&mut Writer::new(line), "INFO", REQUEST_TARGET, |f| {
            self.fields(f)
        })
    }

    /// The text line where no value needs escaping (nearly every line): what [`Lean::line`]
    /// writes for [`Self::fields`], in a few appends instead of four or five per field.
    fn write_text(&self, line: &mut String) -> fmt::Result {
        timestamp(&mut Writer::new(line))?;
        line.push_str("  INFO ");
        line.push_str(REQUEST_TARGET);
        line.push_str(": request route=\"");
        line.push_str(self.route);
        line.push_str("\" method=");
        line.push_str(self.method.as_str());
        line.push_str(" path=\"");
        line.push_str(self.path);
        line.push_str("\" status=");
        line.push_str(itoa::Buffer::new().format(self.status));
        line.push_str(" attempts=");
        line.push_str(itoa::Buffer::new().format(self.attempts));
        if let Some(us) = self.upstream_us {
            line.push_str(" upstream_us=");
            line.push_str(itoa::Buffer::new().format(us));
        }
        line.push_str(" total_us=");
        line.push_str(itoa::Buffer::new().format(self.total_us));
        line.push('\n');
        Ok(())
    }

    /// The fields, in the order tracing records the event's.
    fn fields(&self, f: &mut Fields<'_, '_>) {
        f.string("message", "request", false);
        f.string("route", self.route, false);
        f.string("method", self.method.as_str(), true);
        f.string("path", self.path, false);
        f.plain("status", itoa::Buffer::new().format(self.status), false);
        f.plain("attempts", itoa::Buffer::new().format(self.attempts), false);
        if let Some(us) = self.upstream_us {
            f.plain("upstream_us", itoa::Buffer::new().format(us), false);
        }
        f.plain("total_us", itoa::Buffer::new().format(self.total_us), false);
    }
}

/// `2026-11-23T13:22:21.503726Z`; the part up to the seconds is formatted once a second.
fn timestamp(w: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(secs, prefix)| {
        if *secs != since.as_secs() {
            prefix.clear();
            // `2026-11-23T13:22:21Z`, kept without its `Z`.
            write!(prefix, "{}", humantime::format_rfc3339_seconds(now))?;
            prefix.pop();
            *secs = since.as_secs();
        }
        w.write_str(prefix)
    })?;
    let mut micros = *b".000000Z";
    let mut us = since.subsec_micros();
    for d in micros[1..7].iter_mut().rev() {
        *d = b'0' + (us % 10) as u8;
        us /= 10;
    }
    w.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
}

/// Writes an event's fields: `,"key":value` (JSON), or ` message key=value` (text, where the
/// fields other than the message go to `rest`).
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    rest: Option<&'a mut String>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Writes one field: its key, then the value `write` produces.
    fn field(&mut self, name: &str, write: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = match &mut self.rest {
            None => (|| {
                self.w.write_str(",\"")?;
                self.w.write_str(name)?;
                self.w.write_str("\":")?;
                write(self.w)
            })(),
            Some(_) if name == "message" => self
                .w
                .write_str(" ")
                .and_then(|()| write(&mut NoControls(self.w))),
            Some(rest) => {
                rest.push(' ');
                rest.push_str(name);
                rest.push('=');
                write(&mut NoControls(*rest))
            }
        };
    }

    /// A value with nothing to escape (a number, a bool, most strings), quoted or not: in a
    /// text line it goes straight into the fields gathered aside.
    fn plain(&mut self, name: &str, text: &str, quoted: bool) {
        debug_assert!(needs_no_escape(text), "{name} needs escaping");
        if let (Some(rest), Ok(()), false) =
            (self.rest.as_deref_mut(), &self.result, name == "message")
        {
            rest.push(' ');
            rest.push_str(name);
            rest.push('=');
            if quoted {
                rest.push('"');
                rest.push_str(text);
                rest.push('"');
            } else {
                rest.push_str(text);
            }
            return;
        }
        self.field(name, |w| {
            if quoted {
                w.write_str("\"")?;
                w.write_str(text)?;
                w.write_str("\"")
            } else {
                w.write_str(text)
            }
        });
    }

    /// A string value: a JSON string in JSON; in a text line quoted too, but for the message
    /// and, with `bare`, a value shown as it is (what `%value` gives, as for the method).
    fn string(&mut self, name: &str, value: &str, bare: bool) {
        let quoted = self.rest.is_none() || !(bare || name == "message");
        if needs_no_escape(value) {
            return self.plain(name, value, quoted);
        }
        self.field(name, |w| {
            if quoted {
                json_str(w, value)
            } else {
                w.write_str(value)
            }
        });
    }
}

/// Printable ASCII without `"` or `\`: the same in both formats, quoted or not (most values).
fn needs_no_escape(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field.name(), value, false);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let quoted = self.rest.is_none();
        self.field(field.name(), |w| {
            if quoted {
                w.write_str("\"")?;
                write!(JsonEscaped(w), "{value:?}")?;
                w.write_str("\"")
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.plain(field.name(), itoa::Buffer::new().format(value), false);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.plain(field.name(), itoa::Buffer::new().format(value), false);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.plain(field.name(), if value { "true" } else { "false" }, false);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field.name(), |w| write!(w, "{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

/// Passes text on with control characters (C0, DEL, C1: newlines, terminal escapes) escaped.
struct NoControls<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for NoControls<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if c.is_control() => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A JSON string, quoted and escaped.
fn json_str(w: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    w.write_str("\"")?;
    JsonEscaped(w).write_str(s)?;
    w.write_str("\"")
}

/// Escapes what it is given for the inside of a JSON string.
struct JsonEscaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What `Lean` writes for the events `emit` logs.
    fn logged(json: bool, emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Captured(sink.clone()))
            .event_format(Lean { json })
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// What `Lean` writes for one event with awkward values.
    fn line(json: bool) -> String {
        logged(json, || {
            let method = http::Method::GET;
            tracing::info!(route = "api", method = %method, path = "/a\"b\nc", status = 200u16, ok = true, "request");
            let forged = "x\n2026-01-01T00:00:00.000000Z  INFO forged\u{1b}[2J\u{9b}";
            tracing::warn!(error = %forged, "bad {}", forged);
        })
    }

    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_text_line_is_one_line_message_first() {
        let out = line(false);
        assert_eq!(out.lines().count(), 2, "{out}");
        let (l, forged) = out.split_once('\n').unwrap();
        assert_eq!(
            forged.split_once(" WARN ").unwrap().1,
            "credgate::telemetry::tests: bad x\\n2026-01-01T00:00:00.000000Z  INFO forged\\u{1b}[2J\\u{9b} error=x\\n2026-01-01T00:00:00.000000Z  INFO forged\\u{1b}[2J\\u{9b}\n"
        );
        let l = &format!("{l}\n");
        let (stamp, rest) = l.split_once(' ').unwrap();
        assert_eq!(stamp.len(), "2026-11-23T13:22:21.503726Z".len(), "{l}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.', "{l}");
        assert_eq!(
            rest,
            " INFO credgate::telemetry::tests: request route=\"api\" method=GET path=\"/a\\\"b\\nc\" status=200 ok=true\n"
        );
    }

    #[test]
    fn a_json_line_parses_with_every_field() {
        let out = line(true);
        assert_eq!(out.lines().count(), 2, "{out}");
        let (l, forged) = out.split_once('\n').unwrap();
        let w: serde_json::Value = serde_json::from_str(forged).unwrap();
        assert_eq!(
            w["error"],
            "x\n2026-01-01T00:00:00.000000Z  INFO forged\u{1b}[2J\u{9b}"
        );
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["route"], "api");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a\"b\nc");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ok"], true);
        assert_eq!(v["target"], "credgate::telemetry::tests");
        let stamp = v["timestamp"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(stamp).unwrap();
        let age = SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < Duration::from_secs(5), "{stamp}");
    }

    /// The request line written without an event is the line the event would have given.
    #[test]
    fn the_request_line_is_the_events_line() {
        let method = http::Method::from_bytes(b"PURGE").unwrap();
        let lines = [
            // Nothing to escape (the text line's short way).
            RequestLine {
                route: "api",
                method: &method,
                path: "/v1/x/y",
                status: 429,
                attempts: 3,
                upstream_us: Some(981),
                total_us: 1_000_002,
            },
            RequestLine {
                route: "-",
                method: &http::Method::GET,
                path: "/",
                status: 404,
                attempts: 0,
                upstream_us: None,
                total_us: 0,
            },
            RequestLine {
                route: "api",
                method: &http::Method::GET,
                path: "/a\"b\nc\u{1b}[2J",
                status: 200,
                attempts: 1,
                upstream_us: Some(1234),
                total_us: 1300,
            },
            RequestLine {
                route: "-",
                method: &method,
                path: "/caf\u{e9}/\u{85}/\u{7f}",
                status: 404,
                attempts: 0,
                upstream_us: None,
                total_us: 7,
            },
        ];
        for json in [false, true] {
            // Without `init`, `log` emits the event.
            let events = logged(json, || lines.iter().for_each(|l| l.log()));
            let mut direct = String::new();
            for l in &lines {
                let mut one = String::new();
                l.write(Lean { json }, &mut one).unwrap();
                direct.push_str(&one);
            }
            // All but the timestamps (the first 27 characters of a text line, 14 to 41 of JSON).
            let stamps = if json { 14..41 } else { 0..27 };
            let strip = |s: &str| -> Vec<String> {
                s.lines()
                    .map(|l| format!("{}{}", &l[..stamps.start], &l[stamps.end..]))
                    .collect()
            };
            assert_eq!(strip(&direct), strip(&events), "json: {json}");
            assert_eq!(direct.lines().count(), 4, "{direct}");
            assert!(!direct.contains('\u{1b}'), "{direct}");
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}e\u{7f}é").unwrap();
        assert_eq!(out, r#""a\"b\\c\nd\u0001e\u007fé""#);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}e\u{7f}é");
    }
}
