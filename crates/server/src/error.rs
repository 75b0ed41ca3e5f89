//! Errors: [`ApiError`] is what a client sees (OpenAI's `{"error": {...}}` body with a fitting
//! status), [`ServerError`] is what stops the server from starting.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to an HTTP client, shaped as OpenAI's so that its client libraries raise
/// their typed exceptions (`BadRequestError`, `NotFoundError`, `RateLimitError`, ...).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a request that is well-formed JSON but asks for something invalid.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for a body that is not the JSON the endpoint expects.
    pub fn bad_body(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("invalid_json"),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn model_not_found(name: &str, served: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{name}` does not exist; this server serves `{served}`."),
            )
        }
    }

    pub fn queue_full(retry_after: u64) -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "The server is busy: every batch slot and queue place is taken. Retry later.",
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body (also sent as an SSE event when a stream fails after it started).
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "refusing to listen on {0}: it is not a loopback address and no API keys are \
         configured, so anyone could use the server; configure services with keys \
         (`modu serve --config modu.toml`, keys from `modu key new SERVICE`) or pass \
         --allow-remote to serve without authentication"
    )]
    NotLoopback(String),
    #[error("invalid listen address {0:?}: {1}")]
    BadAddress(String, String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("loading the chat template: {0}")]
    Template(#[from] modu_engine::ChatTemplateError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("serving: {0}")]
    Io(std::io::Error),
}
