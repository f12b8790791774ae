//! The lifecycle every fetched token shares: cache, proactive refresh, single-flight, backoff.
//!
//! Each token key (a route's one token, or one per workspace) has a [`Slot`] and one background
//! refresher task. The request path only reads the slot's current token (`ArcSwap::load`, no
//! lock, no await); it waits only when no usable token exists at all, and then on the refresher's
//! single fetch, never on a fetch of its own. So 100 concurrent first requests cause one fetch,
//! and 50 concurrent 401s for the same token cause one fetch.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::{watch, Notify};

use crate::config::Upstream;
use crate::error::ProxyError;
use crate::forward::HttpClient;
use crate::secret::{sensitive_header, Secret};

/// A token credgate fetched, with everything the request path needs precomputed.
pub struct Token {
    /// The key it was fetched for ("" for a route's single token, else a workspace id).
    pub key: Arc<str>,
    /// `Authorization: Bearer <token>` (value marked sensitive).
    pub headers: Arc<[(HeaderName, HeaderValue)]>,
    /// The bare value, for endpoints that take it as a query parameter.
    pub value: Secret,
    /// Where requests carrying this token go, when the token endpoint says (raw mode).
    pub upstream: Option<Arc<Upstream>>,
    pub fetched_at: Instant,
    pub expires_at: Instant,
    /// Wall-clock expiry, for status output.
    pub expires_at_wall: SystemTime,
    pub lifetime: Duration,
    /// When the background refresh of this token starts (jitter drawn once, at fetch).
    pub refresh_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("key", &self.key)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// What a token endpoint returned.
pub struct Fetched {
    pub value: Secret,
    /// `expires_in`, when the endpoint says; a JWT's own `exp` takes precedence.
    pub expires_in: Option<Duration>,
    pub upstream: Option<Upstream>,
}

/// Why a fetch failed: a message fit for callers and logs (never a secret), and the
/// endpoint's `Retry-After`, if it sent one.
#[derive(Debug, Clone)]
pub struct FetchError {
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl FetchError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Why a fetch is happening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No token yet, or the last one lapsed.
    Initial,
    /// The current token is nearing expiry.
    Refresh,
    /// The upstream rejected the current token with 401.
    Rejected,
    /// The upstream rejected the token fetched after a 401 too (the credentials behind it,
    /// not just the token, may be stale).
    RejectedAgain,
}

/// One kind of token endpoint (Oblien, OAuth2, ...).
pub trait Fetch: Send + Sync + 'static {
    /// Fetches a token for `key`.
    fn fetch<'a>(
        &'a self,
        key: &'a str,
        reason: Reason,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>>;
}

/// When to refresh, when to stop using a token, how to back off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// Used when the token is not a JWT and the endpoint gave no `expires_in`.
    pub default_lifetime: Duration,
    /// Refresh this long before expiry; default: when 20% of the lifetime is left.
    pub refresh_before: Option<Duration>,
    /// Never send a token with less than this left (capped at 10% of its lifetime).
    pub skew: Duration,
    /// Fetch at start-up rather than on first use.
    pub prefetch: bool,
    /// Give up on one fetch after this long.
    pub fetch_timeout: Duration,
    /// First wait after a failed fetch; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Lifecycle {
    pub fn with_default_lifetime(default_lifetime: Duration) -> Self {
        Self {
            default_lifetime,
            refresh_before: None,
            skew: Duration::from_secs(30),
            prefetch: true,
            fetch_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    fn skew(&self, lifetime: Duration) -> Duration {
        self.skew.min(lifetime / 10)
    }

    /// When a token fetched at `at` with `lifetime` should be replaced, with a little jitter
    /// (up to 2% of the lifetime, at most 5 s, always earlier) so that many keys spread out.
    fn refresh_at(&self, at: Instant, lifetime: Duration) -> Instant {
        // Never so early that fetches follow each other back to back (at least 10% of the
        // lifetime after the fetch), never so late that the token is unusable first.
        let earliest = lifetime / 10;
        let latest = self.skew(lifetime) + lifetime / 20;
        let before = self
            .refresh_before
            .unwrap_or(lifetime / 5)
            .clamp(latest, lifetime - earliest);
        let jitter = (lifetime / 50)
            .min(Duration::from_secs(5))
            .mul_f64(rand::random::<f64>());
        at + (lifetime - before).saturating_sub(jitter)
    }
}

/// A request waiting for a token: resolves once the refresher's fetch is done.
pub type TokenWait = Pin<Box<dyn Future<Output = Result<Arc<Token>, ProxyError>> + Send + 'static>>;

/// The state of a route's tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    /// One token for the whole route (else one per key a request named).
    pub fixed: bool,
    pub keys: Vec<KeyStatus>,
}

/// The public state of one token key, for readiness and status.
#[derive(Debug, Clone, Default)]
pub struct KeyStatus {
    pub key: String,
    pub valid_until: Option<SystemTime>,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    /// Whether a request could be sent with a token right now.
    pub usable: bool,
}

/// The token of one key and its refresher's state.
struct Slot {
    key: Arc<str>,
    current: ArcSwapOption<Token>,
    state: Mutex<SlotState>,
    /// Bumped after every fetch, so waiting requests re-check.
    fetched: watch::Sender<u64>,
    /// Asks the refresher to look again (first use, 401, ...).
    wake: Arc<Notify>,
    /// Set when a request uses the token; lets idle per-workspace tokens lapse.
    used: AtomicBool,
    /// Keep this key fresh even when unused (prefetched fixed keys).
    always: bool,
    /// Dropped from the key map: a request holding it must look the key up again.
    forgotten: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    /// Someone needs a token now (no usable one, or the current one was rejected).
    wanted: bool,
    rejected: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    last_refresh: Option<SystemTime>,
    fetches_ok: u64,
    fetches_failed: u64,
    /// Until then, a 401 does not drop the token: the one fetched after the last 401 was
    /// rejected too, so the credentials themselves are likely wrong (a 401 storm).
    rejections_quiet_until: Option<Instant>,
    /// Rejections in a row, each doubling the quiet time.
    rejections: u32,
    /// The current token (or the last, if it was rejected) was fetched after a 401.
    after_rejection: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Lets the refresher notice that nobody holds this key any more.
        self.wake.notify_one();
    }
}

impl Slot {
    fn usable(&self, policy: &Lifecycle) -> Option<Arc<Token>> {
        let t = self.current.load_full()?;
        (Instant::now() + policy.skew(t.lifetime) < t.expires_at).then_some(t)
    }

    /// Records that a request used the token. The first use after a fetch wakes the
    /// refresher, which then schedules the proactive refresh (an unused per-workspace token
    /// is left to lapse instead). Costs one relaxed load on the hot path afterwards.
    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) && !self.used.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// The reason a request cannot have a token right now, if a fetch just failed and the
    /// refresher is backing off (so the caller gets a 503 at once instead of hanging).
    fn failing(&self) -> Option<String> {
        let st = self.state.lock().expect("slot lock");
        match (st.retry_at, &st.last_error) {
            (Some(at), Some(e)) if at > Instant::now() => Some(e.clone()),
            _ => None,
        }
    }
}

/// The tokens of one route: one key, or one per workspace.
pub struct TokenSource {
    route: Arc<str>,
    kind: &'static str,
    fetcher: Arc<dyn Fetch>,
    policy: Lifecycle,
    /// Keys, created on first use (or at start for a fixed key). A std mutex: it is held
    /// only for a map lookup, never across an await.
    slots: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    fixed: Option<Arc<str>>,
    /// The fixed key's slot, once created (read without the map's lock).
    fixed_slot: std::sync::OnceLock<Arc<Slot>>,
}

impl TokenSource {
    /// `fixed`: the one key of this route, or None when keys come from requests.
    pub fn new(
        route: &str,
        kind: &'static str,
        fetcher: Arc<dyn Fetch>,
        policy: Lifecycle,
        fixed: Option<String>,
    ) -> Self {
        Self {
            route: route.into(),
            kind,
            fetcher,
            policy,
            slots: Mutex::new(HashMap::new()),
            fixed: fixed.map(Into::into),
            fixed_slot: std::sync::OnceLock::new(),
        }
    }

    /// Starts the fixed key's refresher and fetches its first token now, if `prefetch`.
    pub fn start(self: &Arc<Self>) {
        if let (Some(key), true) = (&self.fixed, self.policy.prefetch) {
            let slot = self.slot(key);
            slot.state.lock().expect("slot lock").wanted = true;
            slot.wake.notify_one();
        }
    }

    /// The current token for `key`: at once when one is usable; otherwise after the
    /// refresher's fetch, or a fast error when fetching is failing.
    pub fn get(self: &Arc<Self>, key: &str) -> Result<Arc<Token>, TokenWait> {
        self.get_from(&self.slot(key))
    }

    /// [`get`](Self::get) for the route's fixed key.
    pub fn get_fixed(self: &Arc<Self>) -> Result<Arc<Token>, TokenWait> {
        let key = self.fixed.as_deref().expect("a fixed key");
        self.get_from(self.fixed_slot.get_or_init(|| self.slot(key)))
    }

    fn get_from(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<Arc<Token>, TokenWait> {
        if let Some(t) = slot.usable(&self.policy) {
            slot.mark_used();
            return Ok(t);
        }
        let this = self.clone();
        let slot = slot.clone();
        Err(Box::pin(async move { this.wait(slot).await }))
    }

    async fn wait(self: Arc<Self>, mut slot: Arc<Slot>) -> Result<Arc<Token>, ProxyError> {
        let mut fetched = slot.fetched.subscribe();
        let deadline = Instant::now() + self.policy.fetch_timeout + Duration::from_secs(1);
        loop {
            // Not marked used: only a request after this fetch shows the key is in use (so a
            // one-off workspace costs one fetch, not a fetch and a refresh).
            if let Some(t) = slot.usable(&self.policy) {
                return Ok(t);
            }
            if let Some(reason) = slot.failing() {
                return Err(ProxyError::CredentialsUnavailable(format!(
                    "the {} token could not be fetched: {reason}",
                    self.kind
                )));
            }
            {
                let mut st = slot.state.lock().expect("slot lock");
                if slot.forgotten.load(Ordering::Relaxed) {
                    drop(st);
                    slot = self.slot(&slot.key);
                    fetched = slot.fetched.subscribe();
                    continue;
                }
                st.wanted = true;
            }
            slot.wake.notify_one();
            if tokio::time::timeout_at(deadline.into(), fetched.changed())
                .await
                .is_err()
            {
                return Err(ProxyError::CredentialsUnavailable(format!(
                    "the {} token endpoint did not answer in time",
                    self.kind
                )));
            }
        }
    }

    /// The upstream rejected `token` with 401. Drops it if it is still current (so many
    /// concurrent 401s for one token cause one fetch) and asks for a new one. Returns
    /// whether a replay can expect a different token. When the token fetched after a 401 is
    /// rejected too, further 401s pass through without a fetch for a quiet time that doubles
    /// (from `backoff_min` to `backoff_max`), so a 401 storm cannot become a fetch storm.
    pub fn rejected(&self, token: &Arc<Token>) -> bool {
        let Some(slot) = self
            .slots
            .lock()
            .expect("slots lock")
            .get(&token.key)
            .cloned()
        else {
            return false;
        };
        let current = slot.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let now = Instant::now();
            let mut st = slot.state.lock().expect("slot lock");
            if st.rejections_quiet_until.is_some_and(|q| now < q) {
                tracing::warn!(route = %self.route, token = self.kind, key = %token.key, "upstream rejected a fresh token too; passing the 401 on instead of fetching again");
                return false;
            }
            if st
                .rejections_quiet_until
                .is_some_and(|q| now > q + self.policy.backoff_max)
            {
                st.rejections = 0;
            }
            let quiet = (self.policy.backoff_min * 2u32.saturating_pow(st.rejections))
                .min(self.policy.backoff_max);
            st.rejections_quiet_until = Some(now + quiet);
            st.rejections += 1;
            tracing::info!(route = %self.route, token = self.kind, key = %token.key, "upstream rejected the token; fetching a new one");
            slot.current.store(None);
            st.rejected = true;
            st.wanted = true;
            drop(st);
            slot.wake.notify_one();
        }
        true
    }

    /// The state of every key, for readiness and status.
    pub fn status(&self) -> TokenStatus {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .expect("slots lock")
            .values()
            .cloned()
            .collect();
        let keys = slots
            .iter()
            .map(|s| {
                let st = s.state.lock().expect("slot lock");
                KeyStatus {
                    key: s.key.to_string(),
                    valid_until: s.current.load().as_ref().map(|t| t.expires_at_wall),
                    last_refresh: st.last_refresh,
                    last_error: st.last_error.clone(),
                    fetches_ok: st.fetches_ok,
                    fetches_failed: st.fetches_failed,
                    usable: s.usable(&self.policy).is_some(),
                }
            })
            .collect();
        TokenStatus {
            fixed: self.fixed.is_some(),
            keys,
        }
    }

    fn slot(self: &Arc<Self>, key: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(s) = slots.get(key) {
            return s.clone();
        }
        let key: Arc<str> = key.into();
        let slot = Arc::new(Slot {
            key: key.clone(),
            current: ArcSwapOption::empty(),
            state: Mutex::new(SlotState::default()),
            fetched: watch::Sender::new(0),
            wake: Arc::new(Notify::new()),
            used: AtomicBool::new(false),
            always: self.fixed.as_deref() == Some(&*key),
            forgotten: AtomicBool::new(false),
        });
        slots.insert(key, slot.clone());
        tokio::spawn(refresher(
            Arc::downgrade(self),
            Arc::downgrade(&slot),
            slot.wake.clone(),
        ));
        slot
    }
}

/// What the refresher should do next.
enum Next {
    FetchAt(Instant, Reason),
    /// Nothing to do until woken.
    Idle,
    /// Nothing to do until woken or until then.
    IdleUntil(Instant),
    /// The key is no longer needed.
    Forget,
}

impl TokenSource {
    fn next(&self, slot: &Slot) -> Next {
        let st = self.state_of(slot);
        let current = slot.current.load_full();
        let usable = current
            .as_ref()
            .is_some_and(|t| Instant::now() + self.policy.skew(t.lifetime) < t.expires_at);
        // A per-request key nobody waits for, whose token is gone or lapsed (unused, or its
        // fetches failing): forget it, rather than keep it, and its fetches, for good.
        // A failing key is kept until its backoff ends, so requests meanwhile get a fast 503
        // instead of a fetch each.
        let tried = st.fetches_ok + st.fetches_failed > 0;
        let backing_off = st.retry_at.is_some_and(|at| at > Instant::now());
        if !slot.always && !st.wanted && !usable && tried && !backing_off {
            return Next::Forget;
        }
        let rejected = if st.after_rejection {
            Reason::RejectedAgain
        } else {
            Reason::Rejected
        };
        if let Some(at) = st.retry_at {
            let reason = if st.rejected {
                rejected
            } else if slot.current.load().is_some() {
                Reason::Refresh
            } else {
                Reason::Initial
            };
            return Next::FetchAt(at, reason);
        }
        if st.rejected {
            return Next::FetchAt(Instant::now(), rejected);
        }
        match current {
            // Someone waits and the token is past its usable point: fetch now.
            Some(_) if st.wanted && !usable => Next::FetchAt(Instant::now(), Reason::Refresh),
            Some(t) if slot.always || slot.used.load(Ordering::Relaxed) => {
                Next::FetchAt(t.refresh_at, Reason::Refresh)
            }
            // Unused since its fetch: let it lapse, then forget the key.
            Some(t) if usable && !st.wanted => Next::IdleUntil(t.expires_at),
            _ if st.wanted => Next::FetchAt(Instant::now(), Reason::Initial),
            _ => Next::Idle,
        }
    }

    /// Drops a per-request key whose token lapsed unused, so that the workspace ids callers
    /// name cannot grow credgate without bound. False if a request wants it meanwhile.
    fn forget(&self, slot: &Arc<Slot>) -> bool {
        let mut slots = self.slots.lock().expect("slots lock");
        let st = slot.state.lock().expect("slot lock");
        if st.wanted {
            return false;
        }
        slot.forgotten.store(true, Ordering::Relaxed);
        if slots.get(&slot.key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(&slot.key);
        }
        tracing::debug!(route = %self.route, key = %slot.key, "token lapsed unused; key forgotten");
        true
    }

    fn state_of<'a>(&self, slot: &'a Slot) -> std::sync::MutexGuard<'a, SlotState> {
        slot.state.lock().expect("slot lock")
    }

    async fn fetch_once(&self, slot: &Slot, reason: Reason) {
        let started = Instant::now();
        let result = match tokio::time::timeout(
            self.policy.fetch_timeout,
            self.fetcher.fetch(&slot.key, reason),
        )
        .await
        {
            Ok(r) => r.and_then(|f| self.to_token(&slot.key, f, started)),
            Err(_) => Err(FetchError::new(format!(
                "no answer within {}s",
                self.policy.fetch_timeout.as_secs_f32()
            ))),
        };
        let mut st = slot.state.lock().expect("slot lock");
        match result {
            Ok(token) => {
                let refresh_in = token.refresh_at.saturating_duration_since(Instant::now());
                tracing::info!(
                    route = %self.route, token = self.kind, key = %slot.key, ?reason,
                    lifetime_s = token.lifetime.as_secs(), refresh_in_s = refresh_in.as_secs(),
                    "token fetched"
                );
                slot.current.store(Some(Arc::new(token)));
                slot.used.store(false, Ordering::Relaxed);
                *st = SlotState {
                    last_refresh: Some(SystemTime::now()),
                    fetches_ok: st.fetches_ok + 1,
                    fetches_failed: st.fetches_failed,
                    rejections_quiet_until: st.rejections_quiet_until,
                    rejections: st.rejections,
                    after_rejection: matches!(reason, Reason::Rejected | Reason::RejectedAgain),
                    ..SlotState::default()
                };
            }
            Err(e) => {
                let backoff = if st.backoff.is_zero() {
                    self.policy.backoff_min
                } else {
                    (st.backoff * 2).min(self.policy.backoff_max)
                };
                // Full jitter on the upper half keeps many keys from retrying in lockstep. The
                // endpoint's Retry-After is honoured up to the longest backoff: one odd answer
                // (a day) must not keep a route without credentials after the endpoint is back.
                let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0).max(
                    e.retry_after
                        .unwrap_or_default()
                        .min(self.policy.backoff_max),
                );
                tracing::warn!(route = %self.route, token = self.kind, key = %slot.key, ?reason, error = %e.message, retry_in_s = wait.as_secs_f32(), "token fetch failed");
                st.backoff = backoff;
                // Waiting requests get the fast 503 (`failing`); the key stays wanted only if
                // a request asks again.
                st.wanted = false;
                st.retry_at = Some(Instant::now() + wait);
                st.last_error = Some(e.message);
                st.fetches_failed += 1;
            }
        }
        drop(st);
        slot.fetched.send_modify(|n| *n += 1);
    }

    fn to_token(
        &self,
        key: &Arc<str>,
        f: Fetched,
        fetched_at: Instant,
    ) -> Result<Token, FetchError> {
        let now_wall = SystemTime::now();
        let lifetime = match jwt_expiry(f.value.expose()) {
            Some(exp) => exp
                .duration_since(now_wall)
                .map_err(|_| FetchError::new("the token endpoint returned an expired token"))?,
            None => f.expires_in.unwrap_or(self.policy.default_lifetime),
        };
        if lifetime.is_zero() {
            return Err(FetchError::new(
                "the token endpoint returned a token with no lifetime",
            ));
        }
        let bearer = sensitive_header(&format!("Bearer {}", f.value.expose())).map_err(|_| {
            FetchError::new("the token endpoint returned a token that cannot be sent in a header")
        })?;
        Ok(Token {
            key: key.clone(),
            headers: Arc::new([(http::header::AUTHORIZATION, bearer)]),
            value: f.value,
            upstream: f.upstream.map(Arc::new),
            fetched_at,
            expires_at: fetched_at + lifetime,
            expires_at_wall: now_wall + lifetime,
            lifetime,
            refresh_at: self.policy.refresh_at(fetched_at, lifetime),
        })
    }
}

/// One per key: sleeps until the next refresh (or a wake-up), fetches, repeats. Holds only
/// weak references while it sleeps, so it ends when its route is dropped (config reload).
async fn refresher(source: Weak<TokenSource>, slot: Weak<Slot>, wake: Arc<Notify>) {
    loop {
        let next = match (source.upgrade(), slot.upgrade()) {
            (Some(src), Some(slot)) => src.next(&slot),
            _ => return,
        };
        let reason = match next {
            Next::Idle => {
                wake.notified().await;
                continue;
            }
            Next::IdleUntil(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = wake.notified() => {}
                }
                continue;
            }
            Next::Forget => match (source.upgrade(), slot.upgrade()) {
                (Some(src), Some(slot)) if src.forget(&slot) => return,
                (Some(_), Some(_)) => continue,
                _ => return,
            },
            Next::FetchAt(at, reason) if at <= Instant::now() => reason,
            // Sleep, then look again: by then the key may be wanted, or unwanted.
            Next::FetchAt(at, _) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = wake.notified() => {}
                }
                continue;
            }
        };
        let (Some(src), Some(slot)) = (source.upgrade(), slot.upgrade()) else {
            return;
        };
        src.fetch_once(&slot, reason).await;
    }
}

/// The `exp` claim of a JWT, read without verifying it (credgate is not its audience).
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Claims {
        exp: f64,
    }
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&json).ok()?;
    (claims.exp.is_finite() && claims.exp > 0.0 && claims.exp < 1e11)
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(claims.exp))
}

/// Sends a token request and returns its JSON body. Non-2xx answers become a [`FetchError`]
/// whose message quotes the endpoint's own error fields (never the request's secrets).
pub async fn request_json(
    client: &HttpClient,
    req: Request<crate::body::UpstreamBody>,
) -> Result<serde_json::Value, FetchError> {
    let res = client
        .request(req)
        .await
        .map_err(|e| FetchError::new(format!("token endpoint unreachable: {e}")))?;
    let status = res.status();
    let retry_after = res
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| crate::retry::parse_retry_after(v, SystemTime::now()));
    let body: Bytes = http_body_util::Limited::new(res.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| FetchError::new(format!("token endpoint response unreadable: {e}")))?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if status.is_success() && json.is_object() {
        return Ok(json);
    }
    Err(FetchError {
        message: describe_error(status, &json),
        retry_after,
    })
}

/// "HTTP 401: invalid_client (Client authentication failed)" from the usual error shapes.
fn describe_error(status: StatusCode, json: &serde_json::Value) -> String {
    let field = |k: &str| {
        json.get(k)
            .and_then(|v| v.as_str())
            .map(|s| s.chars().take(200).collect::<String>())
    };
    let code = field("error").or_else(|| field("code"));
    let detail = field("error_description").or_else(|| field("message"));
    match (code, detail) {
        (Some(c), Some(d)) => format!("HTTP {}: {c} ({d})", status.as_u16()),
        (Some(c), None) | (None, Some(c)) => format!("HTTP {}: {c}", status.as_u16()),
        (None, None) if status.is_success() => {
            "the token endpoint's answer is not a JSON object".into()
        }
        (None, None) => format!("HTTP {}", status.as_u16()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode("{\"alg\":\"HS256\"}"),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn jwt_exp_is_read_without_verifying() {
        let t = jwt("{\"exp\":2000000000,\"workspace_id\":\"ws\"}");
        assert_eq!(
            jwt_expiry(&t),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(jwt_expiry(&jwt("{\"sub\":\"x\"}")), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry(&jwt("{\"exp\":-5}")), None);
    }

    #[test]
    fn refresh_starts_when_a_fifth_is_left_and_skew_is_capped() {
        let p = Lifecycle::with_default_lifetime(Duration::from_secs(3600));
        let at = Instant::now();
        let r = p.refresh_at(at, Duration::from_secs(100)) - at;
        assert!(
            r <= Duration::from_secs(80) && r >= Duration::from_secs(78),
            "{r:?}"
        );
        assert_eq!(p.skew(Duration::from_secs(4)), Duration::from_millis(400));
        assert_eq!(p.skew(Duration::from_secs(3600)), Duration::from_secs(30));
    }

    #[test]
    fn refresh_before_is_clamped_between_back_to_back_and_too_late() {
        let at = Instant::now();
        let lifetime = Duration::from_secs(120);
        // Longer than the lifetime: not a refetch loop, at least 10% of the lifetime later.
        let mut p = Lifecycle::with_default_lifetime(lifetime);
        p.refresh_before = Some(Duration::from_secs(300));
        assert!(
            p.refresh_at(at, lifetime) - at >= Duration::from_secs(12) - Duration::from_secs(3)
        );
        assert!(p.refresh_at(at, lifetime) > at);
        // Shorter than the skew: still before the token stops being usable.
        p.refresh_before = Some(Duration::from_secs(1));
        let unusable_at = at + lifetime - p.skew(lifetime);
        assert!(p.refresh_at(at, lifetime) < unusable_at);
    }

    struct Failing;

    impl Fetch for Failing {
        fn fetch<'a>(
            &'a self,
            _key: &'a str,
            _reason: Reason,
        ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>> {
            Box::pin(async { Err(FetchError::new("down")) })
        }
    }

    /// Answers the first fetch with a 429 asking for a day's wait, then issues tokens.
    struct BusyOnce(std::sync::atomic::AtomicUsize);

    impl Fetch for BusyOnce {
        fn fetch<'a>(
            &'a self,
            _key: &'a str,
            _reason: Reason,
        ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    let mut e = FetchError::new("HTTP 429");
                    e.retry_after = Some(Duration::from_secs(86_400));
                    return Err(e);
                }
                Ok(Fetched {
                    value: Secret::from("t".to_owned()),
                    expires_in: Some(Duration::from_secs(60)),
                    upstream: None,
                })
            })
        }
    }

    #[tokio::test]
    async fn a_token_endpoints_retry_after_is_capped_at_the_longest_backoff() {
        let mut policy = Lifecycle::with_default_lifetime(Duration::from_secs(60));
        policy.backoff_min = Duration::from_millis(50);
        policy.backoff_max = Duration::from_millis(200);
        let fetcher = Arc::new(BusyOnce(Default::default()));
        let source = Arc::new(TokenSource::new("r", "test", fetcher.clone(), policy, None));
        match source.get("k") {
            Ok(_) => panic!("the first fetch fails"),
            Err(wait) => assert!(wait.await.is_err()),
        }
        let started = Instant::now();
        let token = loop {
            match source.get("k") {
                Ok(t) => break t,
                Err(wait) => {
                    if let Ok(t) = wait.await {
                        break t;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "still no token: the day's Retry-After was honoured"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(token.value.expose(), "t");
        assert_eq!(fetcher.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failing_per_request_key_is_forgotten_after_its_backoff() {
        let mut policy = Lifecycle::with_default_lifetime(Duration::from_secs(60));
        policy.backoff_min = Duration::from_millis(50);
        policy.backoff_max = Duration::from_millis(100);
        let source = Arc::new(TokenSource::new(
            "r",
            "test",
            Arc::new(Failing),
            policy,
            None,
        ));
        let err = match source.get("ws_gone") {
            Ok(_) => panic!("no token can be fetched"),
            Err(wait) => wait.await.unwrap_err(),
        };
        assert!(err.to_string().contains("down"), "{err}");
        assert_eq!(source.status().keys.len(), 1);
        let mut forgotten = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if source.status().keys.is_empty() {
                forgotten = true;
                break;
            }
        }
        assert!(
            forgotten,
            "the key and its refresher must go once nobody wants it"
        );
    }

    #[test]
    fn error_bodies_are_described_without_secrets() {
        let j = serde_json::json!({"error": "invalid_client", "error_description": "Client authentication failed"});
        assert_eq!(
            describe_error(StatusCode::UNAUTHORIZED, &j),
            "HTTP 401: invalid_client (Client authentication failed)"
        );
        let j = serde_json::json!({"success": false, "error": "UNAVAILABLE", "message": "down"});
        assert_eq!(
            describe_error(StatusCode::SERVICE_UNAVAILABLE, &j),
            "HTTP 503: UNAVAILABLE (down)"
        );
        assert_eq!(
            describe_error(StatusCode::BAD_GATEWAY, &serde_json::Value::Null),
            "HTTP 502"
        );
    }
}
