//! Prometheus metrics: counters the request path bumps, token gauges read at scrape time.

use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::proxy::Proxy;
use crate::token::TokenStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type HistogramFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// Every metric credgate exports. Lives as long as the process, across config reloads.
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    retries: Family<RouteLabel, Counter>,
    upstream_429: Family<RouteLabel, Counter>,
    local_throttles: Family<RouteLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    /// Client connections currently open.
    pub open_connections: Gauge,
    /// Of those, HTTP/1 connections parked while they wait for their next request.
    pub idle_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            // 0.5 ms to ~16 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            retries: Family::default(),
            upstream_429: Family::default(),
            local_throttles: Family::default(),
            reloads: Family::default(),
            open_connections: Gauge::default(),
            idle_connections: Gauge::default(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// A route's metric handles, looked up once so the request path never touches a label map.
#[derive(Clone)]
pub struct RouteMetrics {
    /// Responses by status class (1xx..5xx).
    requests: [Counter; 5],
    latency: Histogram,
    pub retries: Counter,
    pub upstream_429: Counter,
    pub local_throttles: Counter,
}

impl RouteMetrics {
    /// Counts one response, and the upstream latency when the upstream was reached.
    pub fn observe(&self, status: u16, upstream: Option<Duration>) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
        if let Some(d) = upstream {
            self.latency.observe(d.as_secs_f64());
        }
    }
}

impl Metrics {
    /// The handles for one route.
    pub fn route(&self, name: &str) -> RouteMetrics {
        let l = RouteLabel {
            route: name.to_owned(),
        };
        let class = |c| {
            self.requests
                .get_or_create(&RequestLabels {
                    route: name.to_owned(),
                    class: c,
                })
                .clone()
        };
        RouteMetrics {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self.latency.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            upstream_429: self.upstream_429.get_or_create(&l).clone(),
            local_throttles: self.local_throttles.get_or_create(&l).clone(),
        }
    }

    /// Counts a config reload.
    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// The Prometheus text exposition, with token gauges read from `proxy` now.
    pub fn encode(&self, proxy: &Proxy) -> String {
        let mut r = Registry::with_prefix("credgate");
        r.register(
            "requests",
            "Responses sent to callers, by route and status class",
            self.requests.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            self.latency.clone(),
        );
        r.register(
            "retries",
            "Requests credgate replayed (429/503, connection failures)",
            self.retries.clone(),
        );
        r.register(
            "upstream_429",
            "429 Too Many Requests answers from upstreams",
            self.upstream_429.clone(),
        );
        r.register(
            "local_throttles",
            "Requests credgate answered 429 itself (pacing queue full, wait too long)",
            self.local_throttles.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by result",
            self.reloads.clone(),
        );
        r.register(
            "open_connections",
            "Client connections currently open",
            self.open_connections.clone(),
        );
        r.register(
            "idle_connections",
            "Client connections parked while they wait for their next request",
            self.idle_connections.clone(),
        );
        let tokens = proxy
            .routes()
            .iter()
            .filter_map(|r| Some((r.route.name.to_string(), r.route.auth.token_status()?)))
            .collect();
        r.register_collector(Box::new(TokenCollector { tokens }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Token fetch counts and seconds-to-expiry, as read from the token caches at scrape time.
#[derive(Debug)]
struct TokenCollector {
    tokens: Vec<(String, TokenStatus)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    route: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    route: String,
    result: &'static str,
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = SystemTime::now();
        let tokens = &self.tokens;
        let mut fetches = encoder.encode_descriptor(
            "token_fetches",
            "Token fetches, by route and result",
            None,
            MetricType::Counter,
        )?;
        for (route, status) in tokens {
            for (result, n) in [
                ("ok", status.keys.iter().map(|k| k.fetches_ok).sum::<u64>()),
                ("failed", status.keys.iter().map(|k| k.fetches_failed).sum()),
            ] {
                ConstCounter::new(n).encode(fetches.encode_family(&FetchLabels {
                    route: route.clone(),
                    result,
                })?)?;
            }
        }
        let mut expiry = encoder.encode_descriptor(
            "token_expires_in_seconds",
            "Seconds until each cached token expires (negative: expired)",
            None,
            MetricType::Gauge,
        )?;
        for (route, status) in tokens {
            for k in &status.keys {
                let Some(until) = k.valid_until else { continue };
                let secs = match until.duration_since(now) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                ConstGauge::new(secs).encode(expiry.encode_family(&TokenLabels {
                    route: route.clone(),
                    key: k.key.clone(),
                })?)?;
            }
        }
        Ok(())
    }
}
