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

use crate::auth::{self, AuthSpec, Authenticator};
use crate::retry::{Pacer, RateLimitSpec, RetryPolicy, RetrySpec};

/// A config problem, naming the file, the route (when there is one) and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{key}: {msg}", file.display(), route.as_ref().map(|r| format!("route \"{r}\": ")).unwrap_or_default())]
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
    pub listen: Vec<SocketAddr>,
    /// How long in-flight requests may run on after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
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
    pub rate_limit: Option<Pacer>,
    /// The auth config as written, kept to tell whether a reload changed it.
    pub auth_spec: AuthSpec,
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
    /// From sending the request to receiving the upstream's response head.
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
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
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
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    auth: AuthSpec,
    #[serde(default)]
    retry: RetrySpec,
    rate_limit: Option<RateLimitSpec>,
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
    let mut shared = Vec::new();
    for l in &listen {
        shared.push(parse_addr(l).map_err(|m| err(None, "server.listen", m))?);
    }
    let server = Server {
        listen: shared,
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
    let mut addrs: HashSet<SocketAddr> = server.listen.iter().copied().collect();
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
                if !addrs.insert(addr) {
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
        if matchers.contains(&matcher) {
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
                Some(read_ca(&f).map_err(|m| rerr("ca_file", m))?)
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
            .map(|rl| rl.check())
            .transpose()
            .map_err(|(k, m)| rerr(&format!("rate_limit.{k}"), m))?;
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
            auth_spec: r.auth,
            auth,
        });
    }
    Ok(Config {
        source: path.to_owned(),
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
