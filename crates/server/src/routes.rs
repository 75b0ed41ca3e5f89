//! The HTTP handlers: one function per route, each a thin shell over auth, preparation and
//! response shaping.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::api::{ChatRequest, CompletionRequest};
use crate::error::ApiError;
use crate::modules::ModuleError;
use crate::services::{Caller, Refusal};
use crate::usage::UsageQuery;

use crate::accounting::*;
use crate::auth::*;
use crate::prepare::*;
use crate::respond::*;
use crate::server::*;

/// JSON body extractor whose failures are OpenAI-style errors, never axum's plain-text ones.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyTimeout>()
            .map_or(std::time::Duration::from_secs(30), |t| t.0);
        let bytes = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "the request body did not arrive within {} s",
                        limit.as_secs_f64()
                    ),
                )
            })?
            .map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_body(format!("the request body is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::bad_body("the request body must be a JSON object"));
        }
        serde_json::from_value(value)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_body(format!("invalid request: {e}")))
    }
}

/// `/health`: 200 while the server can generate; 503 once the scheduler thread has died or
/// while draining for shutdown (so a load balancer stops sending requests).
pub(crate) async fn health(State(st): St) -> Response {
    if !st.sched.alive() {
        let body = json!({"status": "error", "reason": "the scheduler thread has stopped"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if st.draining.load(Ordering::SeqCst) {
        let body = json!({"status": "draining"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

/// `/live`: 200 while the server works, draining included (a liveness probe must not kill a
/// server that is finishing its requests); 503 once the scheduler thread has died, which a
/// restart cures. `/health` is the readiness signal.
pub(crate) async fn live(State(st): St) -> Response {
    if !st.sched.alive() {
        let body = json!({"status": "error", "reason": "the scheduler thread has stopped"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

/// Module residency counters: how often the memory budget evicted a module and how often an
/// evicted one was read back for a request (what module-affine routing saves).
fn module_counters(st: &AppState) -> String {
    format!(
        "# HELP modu_module_evictions_total Modules whose weights were dropped to fit --module-mem.\n\
         # TYPE modu_module_evictions_total counter\nmodu_module_evictions_total {}\n\
         # HELP modu_module_reloads_total Evicted modules read back in for a request.\n\
         # TYPE modu_module_reloads_total counter\nmodu_module_reloads_total {}\n",
        st.modules.evictions(),
        st.modules.reloads()
    )
}

pub(crate) async fn metrics(State(st): St, headers: HeaderMap) -> Response {
    if let Err(e) = require_metrics_reader(&st, &headers) {
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render() + &module_counters(&st) + &crate::gaie::render(&st),
    )
        .into_response()
}

/// `GET /v1/models`: the base model and the modules. With keys configured it needs one, as
/// OpenAI's does, and a service sees only the modules it may use (module names are one
/// service's business, not another's); a metrics key may not list.
pub(crate) async fn models(State(st): St, headers: HeaderMap) -> Response {
    let caller = match caller(&st, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if st.services.auth && caller == Caller::Metrics {
        return ApiError::from(Refusal::Forbidden(
            "a metrics key may only read /metrics".into(),
        ))
        .into_response();
    }
    let mut data =
        vec![json!({"id": st.id, "object": "model", "created": st.started, "owned_by": "modu"})];
    for m in st.modules.list() {
        if let (true, Caller::Service(i)) = (st.services.auth, &caller) {
            if st.services.check_allowed(*i, &m.name).is_err() {
                continue;
            }
        }
        data.push(json!({
            "id": m.name, "object": "model", "created": st.started, "owned_by": "modu",
            "parent": st.id, "module": {"rank": m.rank, "alpha": m.alpha, "resident": m.resident},
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) fn module_error(e: ModuleError) -> ApiError {
    let (status, param) = match &e {
        ModuleError::NotFound(_) => (StatusCode::NOT_FOUND, "name"),
        ModuleError::BadName(_) | ModuleError::BaseName(_) => (StatusCode::BAD_REQUEST, "name"),
        ModuleError::Load { .. } => (StatusCode::BAD_REQUEST, "path"),
        ModuleError::OutsideDirs(_) => (StatusCode::FORBIDDEN, "path"),
    };
    ApiError {
        param: Some(param.into()),
        ..ApiError::new(status, "invalid_request_error", format!("{e:#}"))
    }
}

/// `GET /v1/modules`: every module, with its file, for the admin key (or anyone, without
/// keys); a service's key sees only the modules it may use, without file paths.
pub(crate) async fn list_modules(State(st): St, headers: HeaderMap) -> Response {
    let caller = match caller(&st, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut list = st.modules.list();
    match caller {
        Caller::Admin => {}
        _ if !st.services.auth => {}
        Caller::Metrics => {
            return ApiError::from(Refusal::Forbidden(
                "a metrics key may only read /metrics".into(),
            ))
            .into_response()
        }
        Caller::Service(i) => {
            list.retain(|m| st.services.check_allowed(i, &m.name).is_ok());
            for m in &mut list {
                m.path = String::new();
            }
        }
    }
    let full = caller == Caller::Admin || !st.services.auth;
    Json(json!({
        "object": "list",
        "base": st.id,
        "resident_bytes": if full { json!(st.modules.resident_bytes()) } else { Value::Null },
        "evictions": if full { json!(st.modules.evictions()) } else { Value::Null },
        "reloads": if full { json!(st.modules.reloads()) } else { Value::Null },
        "data": list,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadModule {
    name: String,
    path: String,
}

pub(crate) async fn load_module(
    State(st): St,
    headers: HeaderMap,
    body: Result<ApiJson<LoadModule>, ApiError>,
) -> Response {
    if let Err(e) = require_admin(&st, &headers, "loading modules") {
        return e.into_response();
    }
    let ApiJson(req) = match body {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let path = match st.modules.check_dir(std::path::Path::new(&req.path)) {
        Ok(p) => p,
        Err(e) => return module_error(e).into_response(),
    };
    // Reading and validating the file blocks: keep it off the async workers (and it never
    // touches the scheduler thread, so running streams go on).
    let reg = st.modules.clone();
    let res = tokio::task::spawn_blocking(move || reg.load(&req.name, &path)).await;
    match res {
        Ok(Ok(summary)) => (StatusCode::OK, Json(json!(summary))).into_response(),
        Ok(Err(e)) => module_error(e).into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "loading the module failed",
        )
        .into_response(),
    }
}

pub(crate) async fn unload_module(
    State(st): St,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = require_admin(&st, &headers, "unloading modules") {
        return e.into_response();
    }
    match st.modules.unload(&name) {
        Ok(()) => Json(json!({"name": name, "deleted": true})).into_response(),
        Err(e) => module_error(e).into_response(),
    }
}

pub(crate) async fn chat(
    State(st): St,
    headers: HeaderMap,
    body: Result<ApiJson<ChatRequest>, ApiError>,
) -> Response {
    st.metrics.requests_chat.fetch_add(1, Ordering::Relaxed);
    match admit_request(&st, &headers, Kind::Chat, body, prepare_chat, |r| &r.common).await {
        Ok((p, acct)) => respond(st, Kind::Chat, p, acct).await,
        Err(e) => failed(&st, e),
    }
}

pub(crate) async fn completions(
    State(st): St,
    headers: HeaderMap,
    body: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Response {
    st.metrics
        .requests_completion
        .fetch_add(1, Ordering::Relaxed);
    match admit_request(
        &st,
        &headers,
        Kind::Completion,
        body,
        prepare_completion,
        |r| &r.common,
    )
    .await
    {
        Ok((p, acct)) => respond(st, Kind::Completion, p, acct).await,
        Err(e) => failed(&st, e),
    }
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct UsageParams {
    service: Option<String>,
    module: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

/// `GET /v1/usage`: the admin key (or anyone, with authentication off) sees every service; a
/// service's key sees only its own records.
pub(crate) async fn usage_endpoint(
    State(st): St,
    headers: HeaderMap,
    Query(q): Query<UsageParams>,
) -> Response {
    let caller = match caller(&st, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut service = q.service.filter(|s| !s.is_empty());
    if st.services.auth {
        if caller == Caller::Metrics {
            return ApiError::from(Refusal::Forbidden(
                "a metrics key may only read /metrics".into(),
            ))
            .into_response();
        }
        if let Caller::Service(i) = caller {
            let own = &st.services.list[i].name;
            if service.as_ref().is_some_and(|s| s != own) {
                return ApiError::from(Refusal::Forbidden(format!(
                    "a service key may read only its own usage (`{own}`)"
                )))
                .into_response();
            }
            service = Some(own.clone());
        }
    }
    let query = UsageQuery {
        service,
        module: q.module.filter(|s| !s.is_empty()),
        from: q.from.filter(|s| !s.is_empty()),
        to: q.to.filter(|s| !s.is_empty()),
        group_by: q
            .group_by
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    match tokio::task::block_in_place(|| st.usage.query(&query)) {
        Ok(rows) => Json(json!({"object": "list", "data": rows})).into_response(),
        Err(crate::usage::UsageError::Invalid(m)) => ApiError::invalid("query", m).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// `GET /v1/services`: the services the caller may see, with their modules and limits.
pub(crate) async fn services_endpoint(State(st): St, headers: HeaderMap) -> Response {
    let caller = match caller(&st, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let visible = |i: usize| match caller {
        Caller::Admin => true,
        Caller::Metrics => !st.services.auth,
        Caller::Service(j) => !st.services.auth || i == j,
    };
    let data: Vec<Value> = st
        .services
        .list
        .iter()
        .enumerate()
        .filter(|(i, _)| visible(*i))
        .map(|(_, s)| {
            let l = &s.config.limits;
            json!({
                "name": s.name,
                "priority": s.config.priority,
                "allowed_modules": s.config.allowed_modules.clone().unwrap_or_else(|| vec![st.id.clone()]),
                "default_module": s.config.default_module.clone().unwrap_or_else(|| st.id.clone()),
                "limits": {
                    "requests_per_minute": l.requests_per_minute,
                    "tokens_per_minute": l.tokens_per_minute,
                    "max_concurrent": l.max_concurrent,
                    "max_tokens_per_request": l.max_tokens_per_request,
                },
            })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "auth": st.services.auth,
        "admin": caller == Caller::Admin,
        "base_model": st.id,
        "price_per_hour": st.services.machine.price_per_hour,
    }))
    .into_response()
}

pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../assets/dashboard.html"))
}

pub(crate) async fn dashboard_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/dashboard.js"),
    )
        .into_response()
}

pub(crate) async fn dashboard_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/dashboard.css"),
    )
        .into_response()
}
