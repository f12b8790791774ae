//! credgate: a local auth-injecting reverse proxy.
//!
//! Plain, unauthenticated HTTP comes in on localhost; credgate picks the route, attaches the
//! credentials that route needs and forwards the request upstream over TLS, streaming both ways.
//!
//! # Layout
//! - [`config`]: the TOML file, checked once at load into types that cannot be wrong.
//! - [`secret`]: where secrets come from, and a type that cannot print them.
//! - [`route`]: which route a request belongs to.
//! - [`auth`]: the credential types, one module each, behind one trait.
//! - [`token`]: the lifecycle every fetched token shares: cache, refresh, single-flight, backoff.
//! - [`retry`]: 429/Retry-After handling, the per-route cool-down gate and client-side pacing.
//! - [`proxy`]: the request path, top to bottom.
//! - [`forward`]: the upstream clients, hop-by-hop headers, upstream URIs.
//! - [`pool`]: reused HTTP/1.1 connections to a plaintext upstream.
//! - [`server`]: listeners, reload on SIGHUP or file change, graceful shutdown.
//! - [`conn`]: one client connection: HTTP/1 or h2c, parked without buffers while idle.
//! - [`alloc`]: the global allocator (mimalloc).
//! - [`admin`]: the admin listener: health, readiness, metrics, status.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: credgate's own errors and their one JSON shape.
//! - [`body`]: the body type handed to hyper.
//! - [`telemetry`]: logging set-up.
//! - [`demo`]: `credgate demo`, credgate in front of the fake on loopback.
//! - [`fake`]: a fake Oblien control plane, gateway and OAuth2 server, for the demo and tests.

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod body;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod fake;
pub mod forward;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod token;

/// Why credgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("route \"{0}\": TLS set-up failed: {1}")]
    Tls(String, rustls::Error),
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}
