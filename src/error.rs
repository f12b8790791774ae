//! What credgate itself can fail at, and the one place that turns it into an HTTP response.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{self, Body};

/// An error produced by credgate (never by the upstream: upstream responses pass through).
///
/// Messages are written for the caller: they say what went wrong and what to do, and never
/// contain a secret or token. Detail for operators goes to the log at the point of failure.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("credgate is not an open proxy: no route forwards to host {0}")]
    ForbiddenHost(String),
    #[error("CONNECT is not supported: send plain http:// URLs through credgate (it adds credentials and upgrades to TLS itself)")]
    ConnectNotSupported,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("only the chunked transfer coding is supported")]
    UnsupportedTransferCoding,
    #[error("the request body did not arrive within {}s", .0.as_secs_f32())]
    BodyTimeout(Duration),
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream closed the connection or sent an invalid response")]
    UpstreamFailed,
    #[error("the upstream did not answer within {}s", .0.as_secs_f32())]
    UpstreamTimeout(Duration),
    #[error("credentials are unavailable: {0}")]
    CredentialsUnavailable(String),
    #[error("credgate needs its local token: send Proxy-Authorization: Bearer <token> (or Basic with the token as password)")]
    LocalTokenRequired { forward_proxy: bool },
    #[error("refused by this route's policy: {0}")]
    ForbiddenByPolicy(&'static str),
    #[error("workspace {0} is not in this route's allow-list")]
    ForbiddenWorkspace(String),
    #[error("rate limit: {reason}; retry after {}s", whole_seconds_up(retry_after))]
    Throttled {
        reason: &'static str,
        retry_after: Duration,
    },
}

impl ProxyError {
    /// The status and stable machine-readable code for each error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ProxyError::*;
        match self {
            NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ForbiddenHost(_) => (StatusCode::FORBIDDEN, "forbidden_host"),
            ConnectNotSupported => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            UnsupportedTransferCoding => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            UpstreamFailed => (StatusCode::BAD_GATEWAY, "upstream_error"),
            UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            CredentialsUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "credentials_unavailable")
            }
            ForbiddenWorkspace(_) => (StatusCode::FORBIDDEN, "forbidden_workspace"),
            LocalTokenRequired {
                forward_proxy: true,
            } => (
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "local_token_required",
            ),
            LocalTokenRequired {
                forward_proxy: false,
            } => (StatusCode::UNAUTHORIZED, "local_token_required"),
            ForbiddenByPolicy(_) => (StatusCode::FORBIDDEN, "forbidden_by_policy"),
            Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        }
    }

    /// The JSON error response: `{"error": code, "message": text, "route": name|null}`.
    pub fn into_response(self, route: Option<&str>) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            error: &'a str,
            message: String,
            route: Option<&'a str>,
        }
        let (status, code) = self.status_and_code();
        let json = serde_json::to_vec(&ErrorBody {
            error: code,
            message: self.to_string(),
            route,
        })
        .expect("error body serialises");
        let mut res = Response::new(body::full(Bytes::from(json)));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ProxyError::ConnectNotSupported => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            ProxyError::Throttled { retry_after, .. } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(whole_seconds_up(&retry_after)),
                );
            }
            ProxyError::LocalTokenRequired {
                forward_proxy: true,
            } => {
                h.insert(
                    header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"credgate\""),
                );
            }
            ProxyError::LocalTokenRequired {
                forward_proxy: false,
            } => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"credgate\""),
                );
            }
            _ => {}
        }
        res
    }
}

/// A wait in whole seconds, rounded up and at least 1: a caller coming back after 1 s of a
/// 1.9 s wait would be early.
fn whole_seconds_up(d: &Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credgates_own_retry_after_is_rounded_up_to_whole_seconds() {
        for (wait_ms, header) in [(1, "1"), (1000, "1"), (1001, "2"), (1900, "2"), (3000, "3")] {
            let res = ProxyError::Throttled {
                reason: "test",
                retry_after: Duration::from_millis(wait_ms),
            }
            .into_response(None);
            assert_eq!(res.headers()[header::RETRY_AFTER], header, "{wait_ms} ms");
        }
    }

    #[test]
    fn each_error_maps_to_its_status_and_code() {
        let cases = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::ForbiddenHost("x".into()), 403, "forbidden_host"),
            (ProxyError::ConnectNotSupported, 405, "method_not_allowed"),
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (
                ProxyError::UnsupportedTransferCoding,
                501,
                "not_implemented",
            ),
            (
                ProxyError::BodyTimeout(Duration::from_secs(1)),
                408,
                "request_timeout",
            ),
            (ProxyError::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ProxyError::UpstreamFailed, 502, "upstream_error"),
            (
                ProxyError::LocalTokenRequired {
                    forward_proxy: true,
                },
                407,
                "local_token_required",
            ),
            (
                ProxyError::LocalTokenRequired {
                    forward_proxy: false,
                },
                401,
                "local_token_required",
            ),
            (
                ProxyError::ForbiddenByPolicy("x"),
                403,
                "forbidden_by_policy",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::CredentialsUnavailable("x".into()),
                503,
                "credentials_unavailable",
            ),
            (
                ProxyError::ForbiddenWorkspace("x".into()),
                403,
                "forbidden_workspace",
            ),
            (
                ProxyError::Throttled {
                    reason: "x",
                    retry_after: Duration::from_secs(2),
                },
                429,
                "rate_limited",
            ),
        ];
        for (err, status, code) in cases {
            let (s, c) = err.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{err:?}");
        }
    }

    #[test]
    fn throttled_carries_retry_after() {
        let res = ProxyError::Throttled {
            reason: "queue full",
            retry_after: Duration::from_secs(3),
        }
        .into_response(Some("r"));
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
    }
}
