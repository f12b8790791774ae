//! The TOML config: raw serde structs, checked once at load into types that cannot be wrong.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use std::hash::{Hash, Hasher};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use http::HeaderName;

use crate::auth::{self, AuthSpec, Authenticator};
use crate::retry::{Pacer, RateLimitSpec, RetryPolicy, RetrySpec};
use crate::secret::{Secret, SecretSpec};

/// A config problem, naming the file, the route (when there is one) and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{}{msg}", file.display(), route.as_ref().map(|r| format!("route \"{r}\": ")).unwrap_or_default(), if key.is_empty() { String::new() } else { format!("{key}: ") })]
pub struct ConfigError {
    pub file: PathBuf,
    pub route: Option<String>,
    pub key: String,
    pub msg: String,
}

/// The checked config: everything a running credgate needs, secrets resolved.
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// Files whose change means a reload: the config itself, secret files, CA files.
    pub files: Vec<PathBuf>,
    pub server: Server,
    pub routes: Vec<Route>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("server", &self.server)
            .field("routes", &self.routes)
            .finish()
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Shared listeners: requests are routed by Host, prefix or absolute URI.
    pub listen: Vec<ListenAddr>,
    /// Permission bits of Unix socket listeners (default 0600: only credgate's user).
    pub socket_mode: u32,
    /// The admin listener (health, readiness, metrics, status), if any.
    pub admin: Option<SocketAddr>,
    /// Callers must present this token (Proxy-Authorization or `local_token_header`).
    pub local_token: Option<Secret>,
    /// A header that may carry the local token instead of Proxy-Authorization.
    pub local_token_header: Option<HeaderName>,
    /// How long in-flight requests may run on after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `unix:/path/to.sock`
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => a.fmt(f),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Per-route least privilege: which methods and upstream paths a route forwards.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// When set, only these methods are forwarded.
    pub allow_methods: Option<Vec<http::Method>>,
    /// When set, only upstream paths matching one of these globs are forwarded.
    pub allow_paths: Option<GlobSet>,
    /// Upstream paths matching any of these globs are refused.
    pub deny_paths: Option<GlobSet>,
}

impl Policy {
    /// Why a request with this method is refused, if it is.
    pub fn refuses_method(&self, method: &http::Method) -> Option<&'static str> {
        self.allow_methods
            .as_ref()
            .is_some_and(|m| !m.contains(method))
            .then_some("this route does not allow that method")
    }

    /// Whether any path rule is set (so the upstream path must be checked).
    pub fn has_path_rules(&self) -> bool {
        self.allow_paths.is_some() || self.deny_paths.is_some()
    }

    /// Why a request for this upstream path is refused, if it is.
    pub fn refuses_path(&self, upstream_path: &str) -> Option<&'static str> {
        if self
            .deny_paths
            .as_ref()
            .is_some_and(|g| g.is_match(upstream_path))
        {
            return Some("this route denies that path");
        }
        if self
            .allow_paths
            .as_ref()
            .is_some_and(|g| !g.is_match(upstream_path))
        {
            return Some("this route does not allow that path");
        }
        None
    }
}

/// One `[[route]]`.
pub struct Route {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub upstream: Upstream,
    pub timeouts: Timeouts,
    /// Extra trust roots for this upstream (PEM `ca_file`), on top of the system's.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    /// When and how requests are retried (429/503, connection failures, 401 refresh).
    pub retry: RetryPolicy,
    /// Client-side pacing, when `[route.rate_limit]` is set.
    pub rate_limit: Option<Arc<Pacer>>,
    /// Which methods and paths the route forwards.
    pub policy: Policy,
    /// The auth config as written, kept to tell whether a reload changed it.
    pub auth_spec: AuthSpec,
    /// A digest of the resolved secret values (never printed): a reload keeps a route's
    /// authenticator, and its cached tokens, only when spec and values are unchanged.
    pub auth_digest: u64,
    pub auth: Arc<dyn Authenticator>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("matcher", &self.matcher)
            .field("upstream", &self.upstream.to_string())
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .field("rate_limit", &self.rate_limit)
            .field("auth", &self.auth_spec)
            .finish()
    }
}

/// How requests reach a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// On the shared listeners, by Host and/or path prefix (at least one of the two is set).
    Shared {
        host: Option<String>,
        prefix: Option<String>,
    },
    /// Everything on its own listener; the whole path goes upstream.
    Listener(SocketAddr),
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listener(a) => write!(f, "listen {a}"),
            Self::Shared { host, prefix } => {
                let parts: Vec<String> = [
                    host.as_ref().map(|h| format!("host {h}")),
                    prefix.as_ref().map(|p| format!("prefix {p}")),
                ]
                .into_iter()
                .flatten()
                .collect();
                f.write_str(&parts.join(" "))
            }
        }
    }
}

/// Where a route forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Lowercase host name, without port or IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Prepended to every forwarded path; "" for none, else "/v1" (no trailing slash).
    pub base_path: String,
    /// The `Host` header sent upstream.
    pub host_header: HeaderValue,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl Upstream {
    /// Parses and checks an upstream URL (`http` or `https`, a host, optional base path).
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("\"{s}\" is not a URL ({e})"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("\"{s}\" has no scheme (use https:// or http://)"))?;
        let port_default = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            other => {
                return Err(format!(
                    "scheme {other} is not supported (use https:// or http://)"
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("\"{s}\" has no host"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not allowed: use [route.auth]".into());
        }
        if uri.query().is_some() {
            return Err(format!(
                "\"{s}\" has a query; an upstream is a scheme, host and optional base path"
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(port_default);
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid host".to_string())?;
        Ok(Self {
            scheme,
            authority,
            host,
            port,
            base_path,
            host_header,
        })
    }
}

/// Per-route timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP + TLS connect to the upstream.
    pub connect: Duration,
    /// The longest the upstream may stay silent: before its response head, and between the
    /// chunks of its body (like nginx's `proxy_read_timeout`).
    pub request: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(60),
            idle: Duration::from_secs(90),
        }
    }
}

/// Durations in the config: humantime strings ("30s", "10m"), at most ten years, so that
/// every deadline computed from them fits in an `Instant`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer};

    const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    /// Implemented for `Duration` and `Option<Duration>`.
    pub trait Bounded: Sized {
        fn longest(&self) -> Option<Duration>;
    }

    impl Bounded for Duration {
        fn longest(&self) -> Option<Duration> {
            Some(*self)
        }
    }

    impl Bounded for Option<Duration> {
        fn longest(&self) -> Option<Duration> {
            *self
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Bounded,
        humantime_serde::Serde<T>: Deserialize<'de>,
    {
        let v = humantime_serde::Serde::<T>::deserialize(d)?.into_inner();
        match v.longest() {
            Some(d) if d > MAX => Err(D::Error::custom(
                "a duration of more than ten years is not supported",
            )),
            _ => Ok(v),
        }
    }
}

// ---------------------------------------------------------------- raw TOML

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// One address or a list.
    #[serde(default)]
    listen: OneOrMany,
    socket_mode: Option<String>,
    admin: Option<String>,
    local_token: Option<SecretSpec>,
    local_token_header: Option<String>,
    #[serde(default)]
    allow_remote: bool,
    #[serde(default, with = "crate::config::duration")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    header_read_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    prefix: Option<String>,
    host: Option<String>,
    listen: Option<String>,
    upstream: String,
    ca_file: Option<PathBuf>,
    #[serde(default, with = "crate::config::duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "crate::config::duration")]
    idle_timeout: Option<Duration>,
    auth: AuthSpec,
    #[serde(default)]
    retry: RetrySpec,
    rate_limit: Option<RateLimitSpec>,
    allow_methods: Option<Vec<String>>,
    allow_paths: Option<Vec<String>>,
    deny_paths: Option<Vec<String>>,
}

// ---------------------------------------------------------------- checking

/// Reads, parses and checks a config file. Secrets are resolved here, so a missing
/// variable or unreadable file stops start-up instead of failing a request later.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        route: None,
        key: "".into(),
        msg: format!("cannot read config: {e}"),
    })?;
    parse(&text, path)
}

/// Parses and checks config text; `path` is used in messages and to resolve relative files.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let err = |route: Option<&str>, key: &str, msg: String| ConfigError {
        file: path.to_owned(),
        route: route.map(str::to_owned),
        key: key.to_owned(),
        msg,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        // toml's message names the key and line; keep it on one line.
        let m = e.message().to_owned();
        let at = e
            .span()
            .map(|s| format!(" (line {})", line_of(text, s.start)))
            .unwrap_or_default();
        err(None, "", format!("{m}{at}"))
    })?;

    let listen = match raw.server.listen {
        OneOrMany::None => vec!["127.0.0.1:8080".to_owned()],
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    let mut files = vec![path.to_owned()];
    let mut shared = Vec::new();
    for l in &listen {
        shared.push(parse_listen(l).map_err(|m| err(None, "server.listen", m))?);
    }
    let socket_mode = match raw.server.socket_mode.as_deref() {
        None => 0o600,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                err(
                    None,
                    "server.socket_mode",
                    format!("\"{m}\" is not an octal mode like \"0660\""),
                )
            })?,
    };
    let admin = raw
        .server
        .admin
        .as_deref()
        .map(parse_addr)
        .transpose()
        .map_err(|m| err(None, "server.admin", m))?;
    let local_token = match &raw.server.local_token {
        None => None,
        Some(spec) => {
            files.extend(spec.file().map(Path::to_owned));
            Some(
                spec.resolve()
                    .map_err(|e| err(None, "server.local_token", e.to_string()))?,
            )
        }
    };
    let local_token_header = raw
        .server
        .local_token_header
        .as_deref()
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                err(
                    None,
                    "server.local_token_header",
                    format!("\"{h}\" is not a header name"),
                )
            })
        })
        .transpose()?;
    if local_token_header.is_some() && local_token.is_none() {
        return Err(err(
            None,
            "server.local_token_header",
            "set local_token too".into(),
        ));
    }
    let server = Server {
        listen: shared,
        socket_mode,
        admin,
        local_token,
        local_token_header,
        shutdown_grace: raw.server.shutdown_grace.unwrap_or(Duration::from_secs(30)),
        header_read_timeout: raw
            .server
            .header_read_timeout
            .unwrap_or(Duration::from_secs(30)),
    };
    if raw.routes.is_empty() {
        return Err(err(None, "route", "no [[route]] is defined".into()));
    }

    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut matchers = Vec::new();
    let mut addrs: HashSet<SocketAddr> = server
        .listen
        .iter()
        .filter_map(|l| match l {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        })
        .chain(server.admin)
        .collect();
    let mut routes = Vec::with_capacity(raw.routes.len());
    for r in raw.routes {
        let name = r.name.as_str();
        let rerr = |key: &str, msg: String| err(Some(name), key, msg);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(rerr("name", "use letters, digits, '-', '_' or '.'".into()));
        }
        if !names.insert(name.to_owned()) {
            return Err(rerr("name", "another route has the same name".into()));
        }
        let upstream = Upstream::parse(&r.upstream).map_err(|m| rerr("upstream", m))?;
        let matcher = match (r.listen, r.host, r.prefix) {
            (Some(l), None, None) => {
                let addr = parse_addr(&l).map_err(|m| rerr("listen", m))?;
                // Port 0 asks the OS for a free port: two of them never collide.
                if addr.port() != 0 && !addrs.insert(addr) {
                    return Err(rerr(
                        "listen",
                        format!("{addr} is already used by [server] or another route"),
                    ));
                }
                Matcher::Listener(addr)
            }
            (Some(_), _, _) => return Err(rerr(
                "listen",
                "a route with its own listener takes every request on it: remove host and prefix"
                    .into(),
            )),
            (None, None, None) => {
                return Err(rerr(
                    "prefix",
                    "a route needs a prefix, a host, or its own listen address".into(),
                ))
            }
            (None, host, prefix) => {
                let host = host
                    .map(|h| check_host(&h))
                    .transpose()
                    .map_err(|m| rerr("host", m))?;
                let prefix = prefix
                    .map(|p| check_prefix(&p))
                    .transpose()
                    .map_err(|m| rerr("prefix", m))?;
                Matcher::Shared { host, prefix }
            }
        };
        if matches!(matcher, Matcher::Shared { .. }) && matchers.contains(&matcher) {
            return Err(rerr(
                "prefix",
                "another route matches exactly the same requests (same host and prefix)".into(),
            ));
        }
        matchers.push(matcher.clone());

        let ca = match r.ca_file {
            None => None,
            Some(f) => {
                let f = if f.is_relative() { base_dir.join(f) } else { f };
                let ca = read_ca(&f).map_err(|m| rerr("ca_file", m))?;
                files.push(f);
                Some(ca)
            }
        };
        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect: positive(r.connect_timeout, d.connect)
                .map_err(|m| rerr("connect_timeout", m))?,
            request: positive(r.request_timeout, d.request)
                .map_err(|m| rerr("request_timeout", m))?,
            idle: positive(r.idle_timeout, d.idle).map_err(|m| rerr("idle_timeout", m))?,
        };
        let retry = r
            .retry
            .check()
            .map_err(|(k, m)| rerr(&format!("retry.{k}"), m))?;
        let rate_limit = r
            .rate_limit
            .map(|rl| rl.check().map(Arc::new))
            .transpose()
            .map_err(|(k, m)| rerr(&format!("rate_limit.{k}"), m))?;
        let policy = check_policy(r.allow_methods, r.allow_paths, r.deny_paths)
            .map_err(|(k, m)| rerr(k, m))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for secret in r.auth.secrets() {
            files.extend(secret.file().map(Path::to_owned));
            // Resolved again by `auth::build` below, which reports any failure.
            if let Ok(v) = secret.resolve() {
                v.expose().hash(&mut hasher);
            }
        }
        if let AuthSpec::OblienGateway(o) = &r.auth {
            if o.token == auth::OblienToken::Raw && !upstream.base_path.is_empty() {
                // Raw tokens name the VM's own address: a base path would be checked by policy
                // but never sent.
                return Err(rerr(
                    "upstream",
                    "a raw-token route's upstream cannot have a base path".into(),
                ));
            }
        }
        let auth =
            auth::build(&r.auth, name).map_err(|e| rerr(&format!("auth.{}", e.key), e.msg))?;
        routes.push(Route {
            name: Arc::from(name),
            matcher,
            upstream,
            timeouts,
            ca,
            retry,
            rate_limit,
            policy,
            auth_spec: r.auth,
            auth_digest: hasher.finish(),
            auth,
        });
    }
    check_exposure(&server, &routes, raw.server.allow_remote).map_err(|(k, m)| err(None, k, m))?;
    files.sort();
    files.dedup();
    Ok(Config {
        source: path.to_owned(),
        files,
        server,
        routes,
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("\"{s}\" is not an IP:port address (e.g. \"127.0.0.1:8080\")"))
}

/// `127.0.0.1:8080` or `unix:/path/to.sock`.
fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    match s.strip_prefix("unix:") {
        Some(p) if p.starts_with('/') => Ok(ListenAddr::Unix(PathBuf::from(p))),
        Some(_) => Err(format!(
            "\"{s}\": a Unix socket path must be absolute (unix:/run/credgate/credgate.sock)"
        )),
        None => parse_addr(s).map(ListenAddr::Tcp),
    }
}

/// Credgate spends powerful keys for whoever reaches it: a listener beyond loopback needs a
/// local token (or an explicit `allow_remote = true`).
fn check_exposure(
    server: &Server,
    routes: &[Route],
    allow_remote: bool,
) -> Result<(), (&'static str, String)> {
    if server.local_token.is_some() || allow_remote {
        return Ok(());
    }
    let tcp = server.listen.iter().filter_map(|l| match l {
        ListenAddr::Tcp(a) => Some(*a),
        ListenAddr::Unix(_) => None,
    });
    let dedicated = routes.iter().filter_map(|r| match r.matcher {
        Matcher::Listener(a) => Some(a),
        Matcher::Shared { .. } => None,
    });
    match tcp.chain(dedicated).find(|a| !a.ip().is_loopback()) {
        Some(a) => Err((
            "server.listen",
            format!("{a} is not a loopback address: anyone who reaches it could spend these credentials; set [server] local_token (callers must then present it) or allow_remote = true"),
        )),
        None => Ok(()),
    }
}

fn check_policy(
    methods: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
) -> Result<Policy, (&'static str, String)> {
    let allow_methods = methods
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| ("allow_methods", format!("\"{m}\" is not an HTTP method")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let globs = |key: &'static str, pats: Option<Vec<String>>| {
        pats.map(|pats| {
            let mut b = GlobSetBuilder::new();
            for p in &pats {
                if !p.starts_with('/') {
                    return Err((
                        key,
                        format!(
                            "\"{p}\" must start with '/' (it is matched against the upstream path)"
                        ),
                    ));
                }
                b.add(
                    GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| (key, format!("\"{p}\": {e}")))?,
                );
            }
            b.build().map_err(|e| (key, e.to_string()))
        })
        .transpose()
    };
    Ok(Policy {
        allow_methods,
        allow_paths: globs("allow_paths", allow)?,
        deny_paths: globs("deny_paths", deny)?,
    })
}

fn positive(v: Option<Duration>, default: Duration) -> Result<Duration, String> {
    match v {
        Some(d) if d.is_zero() => Err("must be greater than zero".into()),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

fn check_host(h: &str) -> Result<String, String> {
    let h = h.to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c));
    if ok {
        Ok(h)
    } else {
        Err(format!(
            "\"{h}\" is not a host name (no scheme, port or path)"
        ))
    }
}

/// A prefix is `/` or `/seg[/seg...]`, stored without a trailing slash.
fn check_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("\"{p}\" must start with '/'"));
    }
    if p.contains(['?', '#', '%'])
        || p.contains("//")
        || p.split('/').any(|s| s == "." || s == "..")
    {
        return Err(format!(
            "\"{p}\" must be a plain path (no query, '%', '//' or dot segments)"
        ));
    }
    let trimmed = p.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<Config, String> {
        parse(toml, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    const OK: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        [[route]]
        name = "a"
        prefix = "/api/"
        upstream = "https://api.example.com/v1/"
        [route.auth]
        type = "bearer"
        token = "dev-literal"
    "#;

    #[test]
    fn a_good_config_is_normalised() {
        let c = check(OK).unwrap();
        let r = &c.routes[0];
        assert_eq!(
            r.matcher,
            Matcher::Shared {
                host: None,
                prefix: Some("/api".into())
            }
        );
        assert_eq!(r.upstream.base_path, "/v1");
        assert_eq!(r.upstream.port, 443);
        assert_eq!(r.upstream.host_header, "api.example.com");
    }

    #[test]
    fn errors_name_the_file_route_and_key() {
        let e = check(&OK.replace("https://api.example.com/v1/", "ftp://x")).unwrap_err();
        assert!(
            e.starts_with("test.toml: route \"a\": upstream: scheme ftp"),
            "{e}"
        );
        let e = check(&OK.replace("prefix = \"/api/\"", "prefix = \"api\"")).unwrap_err();
        assert!(
            e.contains("route \"a\": prefix: \"api\" must start with '/'"),
            "{e}"
        );
        let e = check(&OK.replace("name = \"a\"", "name = \"a\"\nbogus = 1")).unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = check(&OK.replace(
            "token = \"dev-literal\"",
            "token = { env = \"CREDGATE_UNSET_FOR_TEST\" }",
        ))
        .unwrap_err();
        assert!(
            e.contains(
                "route \"a\": auth.token: environment variable CREDGATE_UNSET_FOR_TEST is not set"
            ),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names_and_identical_matches_are_refused() {
        let two = format!("{OK}{}", &OK[OK.find("[[route]]").unwrap()..]);
        let e = check(&two).unwrap_err();
        assert!(e.contains("same name"), "{e}");
        let two = two.replacen("name = \"a\"", "name = \"b\"", 1);
        let e = check(&two).unwrap_err();
        assert!(e.contains("exactly the same requests"), "{e}");
    }

    #[test]
    fn debug_of_config_prints_no_secret() {
        let c = check(OK).unwrap();
        assert!(!format!("{c:?}").contains("dev-literal"));
    }
}
