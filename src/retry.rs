//! Rate limits: `Retry-After`, when a retry is safe, the per-route cool-down gate, and pacing.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{HeaderValue, StatusCode};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::error::ProxyError;

/// `[route.retry]` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub max_attempts: Option<u32>,
    #[serde(default, with = "crate::config::duration")]
    pub max_wait: Option<Duration>,
    pub statuses: Option<Vec<u16>>,
    #[serde(default, with = "crate::config::duration")]
    pub backoff_base: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    pub backoff_cap: Option<Duration>,
    pub max_replay_body: Option<u64>,
}

/// When and how a route retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub max_attempts: u32,
    /// The longest credgate holds a request for one wait; beyond it the answer passes through.
    pub max_wait: Duration,
    pub statuses: Vec<StatusCode>,
    /// Without `Retry-After`: full-jitter exponential backoff from `backoff_base` up to `backoff_cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Request bodies up to this size are kept so they can be replayed (retry, 401 refresh).
    pub max_replay_body: u64,
}

impl RetrySpec {
    /// Checks the spec; `Err` holds (key, message).
    pub fn check(&self) -> Result<RetryPolicy, (&'static str, String)> {
        let max_attempts = self.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            return Err(("max_attempts", "must be at least 1 (the first try)".into()));
        }
        let statuses = self
            .statuses
            .clone()
            .unwrap_or_else(|| vec![429, 503])
            .into_iter()
            .map(|s| {
                StatusCode::from_u16(s)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or(s)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|s| ("statuses", format!("{s} is not a 4xx or 5xx status")))?;
        let backoff_base = self.backoff_base.unwrap_or(Duration::from_millis(250));
        let backoff_cap = self.backoff_cap.unwrap_or(Duration::from_secs(8));
        if backoff_base.is_zero() || backoff_cap < backoff_base {
            return Err((
                "backoff_cap",
                "backoff_base must be positive and not above backoff_cap".into(),
            ));
        }
        Ok(RetryPolicy {
            max_attempts,
            max_wait: self.max_wait.unwrap_or(Duration::from_secs(30)),
            statuses,
            backoff_base,
            backoff_cap,
            max_replay_body: self.max_replay_body.unwrap_or(1 << 20),
        })
    }
}

impl RetryPolicy {
    /// How long to wait before try number `attempt + 1`: the upstream's `Retry-After`, or
    /// full-jitter backoff when it sent none.
    pub fn wait_after(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        retry_after.unwrap_or_else(|| {
            let exp = self
                .backoff_base
                .saturating_mul(1 << attempt.saturating_sub(1).min(16));
            exp.min(self.backoff_cap).mul_f64(rand::random::<f64>())
        })
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date (a date in the past means now).
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long wait".
        let secs = s.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs.min(u32::MAX as u64)));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// A route's cool-down: once an upstream says "wait N seconds", every request to the route
/// waits for that same moment instead of each one learning the limit by hitting it.
#[derive(Debug, Default)]
pub struct CoolDown {
    until: Mutex<Option<Instant>>,
}

impl CoolDown {
    /// Closes the gate until `at` (a later moment wins).
    /// Closes the gate for `wait`, at most an hour (so a hostile or broken `Retry-After`
    /// cannot shut a route for years); a later moment already set wins.
    pub fn close_for(&self, wait: Duration) {
        self.close_until(Instant::now() + wait.min(Duration::from_secs(3600)));
    }

    pub fn close_until(&self, at: Instant) {
        let mut until = self.until.lock().expect("cool-down lock");
        if until.is_none_or(|u| u < at) {
            *until = Some(at);
        }
    }

    /// How long the gate stays closed from now, if it is.
    pub fn remaining(&self) -> Option<Duration> {
        let until = *self.until.lock().expect("cool-down lock");
        until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Waits for the gate to open, or fails at once when that is further away than `max_wait`.
    pub async fn pass(&self, max_wait: Duration) -> Result<(), ProxyError> {
        while let Some(wait) = self.remaining() {
            if wait > max_wait {
                return Err(ProxyError::Throttled {
                    reason: "the upstream asked credgate to wait",
                    retry_after: wait,
                });
            }
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

/// `[route.rate_limit]` as written: `requests` per `per`, optional `burst` and `queue`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests: u32,
    #[serde(with = "crate::config::duration")]
    pub per: Duration,
    /// Requests that may go at once before pacing starts (default 1: evenly spaced, so no
    /// window of length `per` ever holds more than `requests`).
    pub burst: Option<u32>,
    /// How many requests may wait for their turn (default 1000); more get 429 at once.
    pub queue: Option<usize>,
}

/// Client-side pacing: requests over the rate wait their turn (bounded queue, bounded wait).
/// Waiting requests form a line: only its first asks the limiter, so turns go in arrival
/// order, and a request that the line ahead of it would hold past its longest wait is
/// refused as it arrives.
pub struct Pacer {
    /// As written, so a reload can tell whether the pace changed.
    pub spec: RateLimitSpec,
    limiter: DefaultDirectRateLimiter,
    queue: Semaphore,
    /// Held by the first request of the line (tokio's mutex is first come, first served).
    line: tokio::sync::Mutex<()>,
    /// Requests in the line.
    waiting: AtomicUsize,
    /// When the limiter last said its next turn falls.
    next_turn: Mutex<Instant>,
    interval: Duration,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl RateLimitSpec {
    pub fn check(&self) -> Result<Pacer, (&'static str, String)> {
        let requests =
            NonZeroU32::new(self.requests).ok_or(("requests", "must be at least 1".to_string()))?;
        if self.per.is_zero() {
            return Err(("per", "must be greater than zero".into()));
        }
        let burst = NonZeroU32::new(self.burst.unwrap_or(1))
            .ok_or(("burst", "must be at least 1".to_string()))?;
        let interval = self.per / requests.get();
        let quota = Quota::with_period(interval)
            .ok_or(("per", "too short for that many requests".to_string()))?
            .allow_burst(burst);
        let queue = self.queue.unwrap_or(1000);
        if !(1..=1_000_000).contains(&queue) {
            return Err(("queue", "must be between 1 and 1000000".into()));
        }
        Ok(Pacer {
            spec: self.clone(),
            limiter: RateLimiter::direct(quota),
            queue: Semaphore::new(queue),
            line: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            next_turn: Mutex::new(Instant::now()),
            interval,
        })
    }
}

impl Pacer {
    /// Waits for this request's turn. Fails at once with credgate's own 429 when the queue
    /// is full or the line ahead would hold it longer than `max_wait`.
    pub async fn acquire(&self, max_wait: Duration) -> Result<(), ProxyError> {
        let _place = self
            .queue
            .try_acquire()
            .map_err(|_| ProxyError::Throttled {
                reason: "too many requests are waiting for this route",
                retry_after: self.interval,
            })?;
        let ahead = self.waiting.load(Ordering::Relaxed);
        if ahead == 0 {
            match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    self.note_next_turn(&not_until);
                }
            }
        }
        // Its turn comes after those of the requests ahead, each a pace interval apart.
        let now = Instant::now();
        let next_turn = *self.next_turn.lock().unwrap_or_else(|e| e.into_inner());
        let expected = next_turn.saturating_duration_since(now)
            + self
                .interval
                .saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        let too_long = |retry_after| ProxyError::Throttled {
            reason: "the route's pace would hold this request too long",
            retry_after,
        };
        if expected > max_wait {
            return Err(too_long(expected));
        }
        let deadline = now + max_wait;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _in_line = InLine(&self.waiting);
        let _first = self.line.lock().await;
        loop {
            match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = self.note_next_turn(&not_until);
                    if Instant::now() + wait > deadline {
                        return Err(too_long(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Notes when the limiter's next turn falls; returns how long until then.
    fn note_next_turn(
        &self,
        not_until: &governor::NotUntil<governor::clock::QuantaInstant>,
    ) -> Duration {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        *self.next_turn.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() + wait;
        wait
    }
}

/// Counts a request in the line until it leaves it (its turn, a refusal, or its caller gone).
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7"), now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&later).unwrap(), now),
            Some(Duration::from_secs(5))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&past).unwrap(), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("soon"), now),
            None
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("-1"), now),
            None
        );
        let huge = parse_retry_after(&HeaderValue::from_static("99999999999999999999999"), now);
        assert_eq!(huge, Some(Duration::from_secs(u32::MAX as u64)));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetrySpec::default().check().unwrap();
        for attempt in 1..20 {
            let w = p.wait_after(attempt, None);
            assert!(w <= Duration::from_secs(8), "{w:?}");
        }
        assert!(p.wait_after(1, None) <= Duration::from_millis(250));
        assert_eq!(
            p.wait_after(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn bad_specs_name_their_key() {
        let bad = RetrySpec {
            max_attempts: Some(0),
            ..Default::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "max_attempts");
        let bad = RetrySpec {
            statuses: Some(vec![200]),
            ..Default::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "statuses");
        let bad = RateLimitSpec {
            requests: 0,
            per: Duration::from_secs(1),
            burst: None,
            queue: None,
        };
        assert_eq!(bad.check().unwrap_err().0, "requests");
    }

    #[tokio::test]
    async fn cool_down_fails_fast_past_max_wait() {
        let gate = CoolDown::default();
        gate.close_until(Instant::now() + Duration::from_secs(60));
        let started = Instant::now();
        let err = gate.pass(Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, ProxyError::Throttled { .. }));
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
