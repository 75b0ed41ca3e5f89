//! Who is calling, and what they may do: API keys, the admin key, and the refusals mapped to
//! OpenAI-shaped errors.

use axum::http::{header, HeaderMap, StatusCode};

use crate::error::ApiError;
use crate::services::{Caller, Refusal};

use crate::server::*;

/// Module administration (and the module list, which shows file paths) needs the admin key
/// when keys are configured.
pub(crate) fn require_admin(
    st: &AppState,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), ApiError> {
    match caller(st, headers)? {
        Caller::Admin => Ok(()),
        _ if !st.services.auth => Ok(()),
        Caller::Metrics | Caller::Service(_) => {
            Err(Refusal::Forbidden(format!("{what} needs the admin key")).into())
        }
    }
}

/// `/metrics` shows every service's counts: the admin key or a metrics key, when keys are
/// configured.
pub(crate) fn require_metrics_reader(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if st.services.metrics_public {
        return Ok(());
    }
    match caller(st, headers)? {
        Caller::Admin | Caller::Metrics => Ok(()),
        Caller::Service(_) if !st.services.auth => Ok(()),
        Caller::Service(_) => Err(Refusal::Forbidden(
            "/metrics needs the admin key or a metrics key ([metrics] key_hashes)".into(),
        )
        .into()),
    }
}

/// Checks every request passes before its route runs:
/// * a POST body must be declared `application/json` (415 otherwise): a web page cannot send
///   one cross-site without a CORS preflight, which this server never grants;
/// * without API keys, the `Host` must be a loopback name or one of `--allowed-host` (403
///   otherwise), so a DNS-rebound page cannot reach an open server;
/// * while draining, new generation and module requests get 503.
pub(crate) async fn request_guard(
    axum::extract::State(st): axum::extract::State<std::sync::Arc<AppState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !st.services.auth {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Err(e) = check_host(host, &st.allowed_hosts) {
            return e.into_response();
        }
    }
    if req.method() == axum::http::Method::POST {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return ApiError {
                code: Some("unsupported_media_type"),
                ..ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    format!(
                        "the request body must be JSON, sent with `Content-Type: application/json` (got {:?})",
                        ct.chars().take(100).collect::<String>()
                    ),
                )
            }
            .into_response();
        }
        if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
            .into_response();
        }
    }
    req.extensions_mut()
        .insert(BodyTimeout(st.limits.body_timeout));
    next.run(req).await
}

/// How long a handler may wait for the request body (set by [`request_guard`]).
#[derive(Clone, Copy)]
pub(crate) struct BodyTimeout(pub(crate) std::time::Duration);

/// `host[:port]` is loopback (`localhost`, `*.localhost`, `127.x.x.x`, `[::1]`) or allowed.
pub(crate) fn check_host(host: Option<&str>, allowed: &[String]) -> Result<(), ApiError> {
    let refuse = |why: String| {
        Err(ApiError {
            code: Some("host_not_allowed"),
            ..ApiError::new(StatusCode::FORBIDDEN, "permission_error", why)
        })
    };
    let Some(host) = host else {
        return refuse("the request has no Host header".into());
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name)) {
        return Ok(());
    }
    refuse(format!(
        "Host {:?} is not allowed: without API keys this server answers only loopback names \
         (add names with --allowed-host, or configure keys)",
        host.chars().take(100).collect::<String>()
    ))
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Unauthorized(m) => ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", m)
            },
            Refusal::Forbidden(m) => ApiError {
                code: Some("permission_denied"),
                ..ApiError::new(StatusCode::FORBIDDEN, "permission_error", m)
            },
            Refusal::Limited {
                message,
                retry_after,
            } => ApiError {
                code: Some("rate_limit_exceeded"),
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
        }
    }
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Who is calling: any valid key (or anyone, with authentication off).
pub(crate) fn caller(st: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    Ok(st.services.authenticate(authorization(headers))?)
}

/// A generation request's service: admin keys are for admin endpoints only.
pub(crate) fn service_of(st: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    match caller(st, headers)? {
        Caller::Service(i) => Ok(i),
        Caller::Metrics => Err(Refusal::Forbidden(
            "a metrics key may only read /metrics; generate with a service's key".into(),
        )
        .into()),
        Caller::Admin => Err(Refusal::Forbidden(
            "the admin key is for admin endpoints; generate with a service's key".into(),
        )
        .into()),
    }
}
