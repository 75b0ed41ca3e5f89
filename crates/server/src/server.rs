//! The HTTP side: routes, request checking, tokenization, and turning the scheduler's events
//! into OpenAI responses (one JSON body, or server-sent events ending in `data: [DONE]`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use modu_engine::generate::{FinishReason, GenerateParams, GeneratedToken};
use modu_engine::{ChatMessage, ChatTemplate, Model, ModuleRef, Tokenizer};
use modu_gguf::GgufFile;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{check_logprobs, ChatRequest, Common, CompletionRequest, Content, PromptField};
use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::modules::{ModuleError, ModuleRegistry};
use crate::scheduler::{
    self, SchedulerConfig, SchedulerHandle, SeqEvent, SeqRequest, SeqStats, ServiceTag, SubmitError,
};
use crate::services::{ActiveGuard, Caller, Refusal, Services, ServicesConfig};
use crate::usage::{UsageDb, UsageQuery, UsageRecord};

/// A loaded model and what identifies it to clients.
pub struct ServedModel {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub file: Arc<GgufFile>,
    /// The id `/v1/models` reports and requests may name.
    pub id: String,
    /// Other names requests may use (file name, aliases).
    pub aliases: Vec<String>,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    pub parallel: usize,
    /// Requests that may wait for a batch slot before new ones get 429.
    pub max_queue: usize,
    /// Context length per sequence.
    pub ctx: usize,
    pub allow_remote: bool,
    /// Prompt tokens prefilled per scheduler step.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept for reusing the prompt prefixes of finished requests; 0 disables.
    pub prefix_cache_mem: usize,
    /// Bytes of paged KV cache for running sequences and cached prefixes together; 0 means
    /// enough for `parallel` sequences of `ctx` positions (no preemption).
    pub kv_mem: usize,
    /// Services, keys, limits and the machine's cost model ([`ServicesConfig::open`]: one open
    /// service, loopback only).
    pub services: ServicesConfig,
    /// LoRA modules to register at start: `(name, adapter file or PEFT directory)`.
    pub modules: Vec<(String, std::path::PathBuf)>,
    /// Bytes of module weights kept resident (0 = no limit); idle modules beyond it are
    /// evicted, least recently used first, and re-read on demand.
    pub module_mem: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            max_queue: 64,
            ctx: 4096,
            allow_remote: false,
            prefill_chunk: 64,
            prefix_cache_mem: 256 << 20,
            kv_mem: 0,
            services: ServicesConfig::open(),
            modules: Vec::new(),
            module_mem: 0,
        }
    }
}

struct AppState {
    sched: SchedulerHandle,
    tok: Arc<Tokenizer>,
    template: ChatTemplate,
    bos: String,
    eos: String,
    id: String,
    names: Vec<String>,
    ctx: usize,
    metrics: Arc<Metrics>,
    started: u64,
    services: Services,
    usage: UsageDb,
    modules: Arc<ModuleRegistry>,
}

type St = State<Arc<AppState>>;

/// Refuse non-loopback addresses unless allowed: without API keys the server has no
/// authentication, so listening beyond this machine must be a deliberate choice (pass
/// `allow_remote` true when keys are configured).
pub fn check_bind_address(host: &str, allow_remote: bool) -> Result<(), ServerError> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(());
    }
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|e: std::net::AddrParseError| {
            ServerError::BadAddress(host.to_string(), e.to_string())
        })?;
    if !ip.is_loopback() && !allow_remote {
        return Err(ServerError::NotLoopback(host.to_string()));
    }
    Ok(())
}

/// A running server (background threads). Dropping it shuts the server down.
pub struct ServerHandle {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl ServerHandle {
    /// Stop accepting, cancel in-flight work, and wait for the threads to end.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop_inner()
    }

    /// Wait until the server stops by itself (on ctrl-c or SIGTERM when started by [`serve`]).
    pub fn wait(mut self) -> Result<(), ServerError> {
        // Keep the shutdown sender alive while waiting: dropping it would stop the server.
        let _keep = self.shutdown.take();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(ServerError::Config("the server thread panicked".into()))),
            None => Ok(()),
        }
    }

    fn stop_inner(&mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(ServerError::Config("the server thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Start serving in background threads and return once the socket is bound. With
/// `on_signal`, ctrl-c and SIGTERM also shut it down.
pub fn start(
    served: ServedModel,
    config: ServeConfig,
    on_signal: bool,
) -> Result<ServerHandle, ServerError> {
    check_bind_address(
        &config.host,
        config.allow_remote || config.services.auth_enabled(),
    )?;
    // Without a database path (no config) usage is kept in memory for the dashboard.
    let usage = match &config.services.database {
        Some(p) => UsageDb::open(p).map_err(|e| {
            ServerError::Config(format!("opening the usage database {}: {e}", p.display()))
        }),
        None => UsageDb::in_memory().map_err(|e| ServerError::Config(e.to_string())),
    }?;
    if config.parallel == 0 {
        return Err(ServerError::Config("--parallel must be at least 1".into()));
    }
    if config.ctx < 2 {
        return Err(ServerError::Config("--ctx must be at least 2".into()));
    }
    let host = config.host.trim_start_matches('[').trim_end_matches(']');
    let addr_text = if host.contains(':') {
        format!("[{host}]:{}", config.port)
    } else {
        format!("{host}:{}", config.port)
    };
    let listener = std::net::TcpListener::bind(&addr_text).map_err(|source| ServerError::Bind {
        addr: addr_text.clone(),
        source,
    })?;
    listener.set_nonblocking(true).map_err(ServerError::Io)?;
    let addr = listener.local_addr().map_err(ServerError::Io)?;

    let template = ChatTemplate::for_model(&served.file)?;
    let tok = Arc::new(served.tokenizer);
    let text_of = |id: Option<u32>| {
        id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
            .unwrap_or_default()
    };
    let (bos, eos) = (text_of(tok.bos_id()), text_of(tok.eos_id()));
    let metrics = Arc::new(Metrics::default());
    let mut names = vec![served.id.clone()];
    names.extend(served.aliases.iter().cloned());
    let modules = Arc::new(ModuleRegistry::new(
        served.model.module_shapes().clone(),
        names.clone(),
        config.module_mem,
    ));
    for (name, path) in &config.modules {
        modules
            .load(name, path)
            .map_err(|e| ServerError::Config(e.to_string()))?;
    }
    let (sched, sched_thread) = scheduler::spawn(
        served.model,
        tok.clone(),
        SchedulerConfig {
            parallel: config.parallel,
            max_queue: config.max_queue,
            ctx: config.ctx,
            prefill_chunk: config.prefill_chunk,
            prefix_cache_mem: config.prefix_cache_mem,
            kv_mem: config.kv_mem,
        },
        metrics.clone(),
    )
    .map_err(ServerError::Runtime)?;
    let state = Arc::new(AppState {
        sched: sched.clone(),
        tok,
        template,
        bos,
        eos,
        id: served.id,
        names,
        ctx: config.ctx,
        metrics,
        started: unix_now(),
        services: Services::new(&config.services),
        usage,
        modules,
    });
    let app = router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("modu-http")
        .build()
        .map_err(ServerError::Runtime)?;
    let thread = std::thread::Builder::new()
        .name("modu-server".into())
        .spawn(move || {
            let sched_for_stop = sched.clone();
            let result = runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(ServerError::Io)?;
                let stop = async move {
                    if on_signal {
                        tokio::select! {
                            _ = rx => {}
                            _ = signal() => {}
                        }
                    } else {
                        let _ = rx.await;
                    }
                    // End running streams now instead of waiting for them to finish.
                    sched_for_stop.shutdown();
                };
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(ServerError::Io)
            });
            sched.shutdown();
            drop(sched);
            let _ = sched_thread.join();
            runtime.shutdown_background();
            result
        })
        .map_err(ServerError::Runtime)?;
    Ok(ServerHandle {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// Serve until ctrl-c or SIGTERM (the `modu serve` command). `on_ready` is told the bound
/// address.
pub fn serve(
    served: ServedModel,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let handle = start(served, config, true)?;
    on_ready(handle.addr);
    handle.wait()
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/usage", get(usage_endpoint))
        .route("/v1/services", get(services_endpoint))
        .route("/v1/modules", get(list_modules).post(load_module))
        .route("/v1/modules/{name}", axum::routing::delete(unload_module))
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
        })
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{:x}{:04x}",
        t,
        N.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// JSON body extractor whose failures are OpenAI-style errors, never axum's plain-text ones.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
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

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(st): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): St) -> Json<Value> {
    let mut data =
        vec![json!({"id": st.id, "object": "model", "created": st.started, "owned_by": "modu"})];
    for m in st.modules.list() {
        data.push(json!({
            "id": m.name, "object": "model", "created": st.started, "owned_by": "modu",
            "parent": st.id, "module": {"rank": m.rank, "alpha": m.alpha, "resident": m.resident},
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

/// Module administration needs the admin key when keys are configured.
fn require_admin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match caller(st, headers)? {
        Caller::Admin => Ok(()),
        Caller::Service(_) if !st.services.auth => Ok(()),
        Caller::Service(_) => Err(Refusal::Forbidden(
            "loading and unloading modules needs the admin key".into(),
        )
        .into()),
    }
}

fn module_error(e: ModuleError) -> ApiError {
    let (status, param) = match &e {
        ModuleError::NotFound(_) => (StatusCode::NOT_FOUND, "name"),
        ModuleError::BadName(_) | ModuleError::BaseName(_) => (StatusCode::BAD_REQUEST, "name"),
        ModuleError::Load { .. } => (StatusCode::BAD_REQUEST, "path"),
    };
    ApiError {
        param: Some(param.into()),
        ..ApiError::new(status, "invalid_request_error", format!("{e:#}"))
    }
}

async fn list_modules(State(st): St) -> Json<Value> {
    let list = st.modules.list();
    Json(json!({
        "object": "list",
        "base": st.id,
        "resident_bytes": st.modules.resident_bytes(),
        "evictions": st.modules.evictions(),
        "data": list,
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadModule {
    name: String,
    path: String,
}

async fn load_module(
    State(st): St,
    headers: HeaderMap,
    body: Result<ApiJson<LoadModule>, ApiError>,
) -> Response {
    if let Err(e) = require_admin(&st, &headers) {
        return e.into_response();
    }
    let ApiJson(req) = match body {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Reading and validating the file blocks: keep it off the async workers (and it never
    // touches the scheduler thread, so running streams go on).
    let reg = st.modules.clone();
    let res =
        tokio::task::spawn_blocking(move || reg.load(&req.name, std::path::Path::new(&req.path)))
            .await;
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

async fn unload_module(
    State(st): St,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = require_admin(&st, &headers) {
        return e.into_response();
    }
    match st.modules.unload(&name) {
        Ok(()) => Json(json!({"name": name, "deleted": true})).into_response(),
        Err(e) => module_error(e).into_response(),
    }
}

impl AppState {
    /// Check the prompt fits and cap `max_tokens` at the room left in the context.
    fn fit(
        &self,
        prompt: &[u32],
        params: &mut GenerateParams,
        param: &str,
    ) -> Result<(), ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "the prompt is empty"));
        }
        if prompt.len() >= self.ctx {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    param,
                    format!(
                        "the prompt is {} tokens but this server's context limit is {} tokens \
                         (including at least one generated token)",
                        prompt.len(),
                        self.ctx
                    ),
                )
            });
        }
        params.max_tokens = params.max_tokens.min(self.ctx - prompt.len());
        Ok(())
    }

    fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        arrived: Instant,
        service: ServiceTag,
        modules: (Vec<ModuleRef>, u64),
    ) -> Result<UnboundedReceiver<SeqEvent>, ApiError> {
        let (tx, rx) = unbounded_channel();
        match self.sched.submit(SeqRequest {
            prompt,
            params,
            events: tx,
            arrived,
            service,
            modules: modules.0,
            module_key: modules.1,
        }) {
            Ok(()) => Ok(rx),
            Err(SubmitError::QueueFull) => {
                self.metrics
                    .requests_rejected
                    .fetch_add(1, Ordering::Relaxed);
                Err(ApiError::queue_full(1))
            }
            Err(SubmitError::Stopped) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )),
        }
    }
}

/// What the endpoint-specific code needs to shape responses.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn failed(st: &AppState, e: ApiError) -> Response {
    st.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    e.into_response()
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

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Who is calling: any valid key (or anyone, with authentication off).
fn caller(st: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    Ok(st.services.authenticate(authorization(headers))?)
}

/// A generation request's service: admin keys are for admin endpoints only.
fn service_of(st: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    match caller(st, headers)? {
        Caller::Service(i) => Ok(i),
        Caller::Admin => Err(Refusal::Forbidden(
            "the admin key is for admin endpoints; generate with a service's key".into(),
        )
        .into()),
    }
}

/// Accounting context of one admitted request, carried until its last byte.
struct Acct {
    service: usize,
    module: String,
    /// The modules (pinned generations) and scales it runs with, and their prefix-cache key.
    run_modules: Vec<ModuleRef>,
    module_key: u64,
    endpoint: &'static str,
    request_id: String,
    arrived: Instant,
    /// Frees the service's concurrency slot when the response ends.
    _guard: ActiveGuard,
}

impl AppState {
    /// The modules a request runs with: the one `model` names (or the service's default;
    /// `base:NAME` also names module NAME) at `lora_scale`, plus any in its `lora` list.
    /// Modules the service may not use are refused (403), unknown ones are 404. Returns the
    /// name used for accounting, the modules with their scales, and the prefix-cache key.
    fn module_for(
        &self,
        service: usize,
        common: &Common,
    ) -> Result<(String, Vec<ModuleRef>, u64), ApiError> {
        let requested = common
            .model
            .as_deref()
            .map(|m| m.strip_prefix("base:").unwrap_or(m));
        let module = self
            .services
            .module_name(service, requested, &self.id, &self.names);
        // A name that is no module of this deployment is 404 before any permission check.
        let unknown =
            |m: &str| m != self.id && !self.modules.contains(m) && !self.services.knows_module(m);
        if unknown(&module) {
            return Err(ApiError::model_not_found(&module, &self.id));
        }
        self.services.check_allowed(service, &module)?;
        let scale_of = |s: Option<f32>, param: &str| -> Result<f32, ApiError> {
            match s {
                None => Ok(1.0),
                Some(v) if v.is_finite() && (-16.0..=16.0).contains(&v) => Ok(v),
                Some(v) => Err(ApiError::invalid(
                    param,
                    format!("{param} must be a finite number in [-16, 16], got {v}"),
                )),
            }
        };
        let mut refs: Vec<ModuleRef> = Vec::new();
        let mut key = std::collections::hash_map::DefaultHasher::new();
        let mut add = |name: &str, scale: f32, refs: &mut Vec<ModuleRef>| -> Result<(), ApiError> {
            let h = self.modules.get(name).map_err(|e| match e {
                // Named in the services config but not registered (yet).
                ModuleError::NotFound(_) if self.services.knows_module(name) => ApiError {
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                    ..ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        format!("the module `{name}` is not loaded on this server"),
                    )
                },
                ModuleError::NotFound(_) => ApiError::model_not_found(name, &self.id),
                other => module_error(other),
            })?;
            std::hash::Hash::hash(&(h.generation, scale.to_bits()), &mut key);
            refs.push((h.adapter, scale));
            Ok(())
        };
        if module != self.id {
            add(
                &module,
                scale_of(common.lora_scale, "lora_scale")?,
                &mut refs,
            )?;
        } else if common.lora_scale.is_some() && common.lora.is_none() {
            return Err(ApiError::invalid(
                "lora_scale",
                "lora_scale needs a module: name one in `model`",
            ));
        }
        for spec in common.lora.iter().flatten() {
            if unknown(&spec.name) {
                return Err(ApiError::model_not_found(&spec.name, &self.id));
            }
            self.services.check_allowed(service, &spec.name)?;
            add(&spec.name, scale_of(spec.scale, "lora.scale")?, &mut refs)?;
        }
        let key = if refs.is_empty() {
            0
        } else {
            std::hash::Hasher::finish(&key) | 1
        };
        Ok((module, refs, key))
    }

    /// Record a finished request: one committed SQLite row, the labelled metrics and the
    /// service's token window.
    fn account(&self, a: &Acct, status: &str, tokens: (usize, usize, usize), stats: &SeqStats) {
        let (prompt, completion, cached) = tokens;
        let duration = a.arrived.elapsed();
        let svc = &self.services.list[a.service];
        let m = self.metrics.service(&svc.name, &a.module);
        m.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        m.latency.observe(duration);
        if status == "error" {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.services.add_tokens(a.service, completion as u64);
        let machine = &self.services.machine;
        let rec = UsageRecord {
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            request_id: a.request_id.clone(),
            service: svc.name.clone(),
            module: a.module.clone(),
            endpoint: a.endpoint.into(),
            status: status.into(),
            prompt_tokens: prompt as u64,
            cached_tokens: cached as u64,
            completion_tokens: completion as u64,
            queue_s: stats.queued.as_secs_f64(),
            ttft_s: stats.ttft.map(|d| d.as_secs_f64()),
            duration_s: duration.as_secs_f64(),
            cpu_s: stats.cpu_s,
            energy_j: machine.energy_j(stats.wall_s, stats.cpu_s, stats.energy_j),
            cost: machine.cost(stats.cpu_s),
        };
        // The INSERT blocks briefly; tell the runtime so other tasks keep running.
        let result = tokio::task::block_in_place(|| self.usage.record(&rec));
        if let Err(e) = result {
            eprintln!("modu: recording usage of {}: {e}", rec.request_id);
        }
    }
}

/// Everything before the scheduler: key, body, module, prompt, limits.
fn admit_request<R>(
    st: &AppState,
    headers: &HeaderMap,
    kind: Kind,
    body: Result<ApiJson<R>, ApiError>,
    prepare: fn(&AppState, R) -> Result<Prepared, ApiError>,
    model_of: fn(&R) -> &Common,
) -> Result<(Prepared, Acct), ApiError> {
    let arrived = Instant::now();
    let service = service_of(st, headers)?;
    let ApiJson(req) = body?;
    let (module, run_modules, module_key) = match st.module_for(service, model_of(&req)) {
        Ok(m) => m,
        Err(e) => {
            let requested = model_of(&req).model.clone().unwrap_or_default();
            let name = &st.services.list[service].name;
            st.metrics
                .service(name, &requested)
                .errors
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let svc = &st.services.list[service];
    let counters = st.metrics.service(&svc.name, &module);
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let mut prepared = prepare(st, req).inspect_err(|_| {
        counters.errors.fetch_add(1, Ordering::Relaxed);
    })?;
    if let Some(max) = svc.config.limits.max_tokens_per_request {
        prepared.1.max_tokens = prepared.1.max_tokens.min(max.max(1));
    }
    let guard = st
        .services
        .admit(service, prepared.0.len() as u64)
        .inspect_err(|_| {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        })?;
    counters
        .prompt_tokens
        .fetch_add(prepared.0.len() as u64, Ordering::Relaxed);
    let acct = Acct {
        service,
        module,
        run_modules,
        module_key,
        endpoint: if kind == Kind::Chat {
            "chat"
        } else {
            "completions"
        },
        request_id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        arrived,
        _guard: guard,
    };
    Ok((prepared, acct))
}

async fn chat(
    State(st): St,
    headers: HeaderMap,
    body: Result<ApiJson<ChatRequest>, ApiError>,
) -> Response {
    st.metrics.requests_chat.fetch_add(1, Ordering::Relaxed);
    match admit_request(&st, &headers, Kind::Chat, body, prepare_chat, |r| &r.common) {
        Ok((p, acct)) => respond(st, Kind::Chat, p, acct).await,
        Err(e) => failed(&st, e),
    }
}

async fn completions(
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
    ) {
        Ok((p, acct)) => respond(st, Kind::Completion, p, acct).await,
        Err(e) => failed(&st, e),
    }
}

#[derive(serde::Deserialize, Default)]
struct UsageParams {
    service: Option<String>,
    module: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

/// `GET /v1/usage`: the admin key (or anyone, with authentication off) sees every service; a
/// service's key sees only its own records.
async fn usage_endpoint(
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
async fn services_endpoint(State(st): St, headers: HeaderMap) -> Response {
    let caller = match caller(&st, &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let visible = |i: usize| match caller {
        Caller::Admin => true,
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

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../assets/dashboard.html"))
}

async fn dashboard_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/dashboard.js"),
    )
        .into_response()
}

async fn dashboard_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/dashboard.css"),
    )
        .into_response()
}

type Prepared = (Vec<u32>, GenerateParams, Common);

fn prepare_chat(st: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!(
                    "unknown role {other:?} (expected system, developer, user, assistant or tool)"
                ),
                ))
            }
        };
        let content = match m.content(i)? {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content"),
                            format!(
                                "content parts of type {:?} are not supported; only text",
                                p.kind
                            ),
                        ));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(check_logprobs("top_logprobs", k.unwrap_or(0))?),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        _ => None,
    };
    let mut params = req.common.params(logprobs)?;
    let text = st
        .template
        .render(&messages, true, &st.bos, &st.eos)
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("the chat template rejected the messages: {e}"),
            )
        })?;
    let prompt = st
        .tok
        .encode(&text, true, true)
        .map_err(|e| ApiError::invalid("messages", format!("tokenizing the messages: {e}")))?;
    st.fit(&prompt, &mut params, "messages")?;
    Ok((prompt, params, req.common))
}

fn prepare_completion(st: &AppState, req: CompletionRequest) -> Result<Prepared, ApiError> {
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let logprobs = req
        .logprobs
        .map(|k| check_logprobs("logprobs", k))
        .transpose()?;
    let mut params = req.common.params(logprobs)?;
    let encode = |text: &str| {
        st.tok
            .encode(text, true, true)
            .map_err(|e| ApiError::invalid("prompt", format!("tokenizing the prompt: {e}")))
    };
    let prompt = match &req.prompt()? {
        PromptField::Text(t) => encode(t)?,
        PromptField::Texts(v) if v.len() == 1 => encode(&v[0])?,
        PromptField::Texts(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "exactly one prompt per request is supported, got {}",
                    v.len()
                ),
            ))
        }
        PromptField::Tokens(ids) => {
            let n = st.tok.vocab_size();
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is out of range (the vocabulary has {n} tokens)"),
                ));
            }
            ids.clone()
        }
    };
    st.fit(&prompt, &mut params, "prompt")?;
    Ok((prompt, params, req.common))
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn finish_str(f: FinishReason) -> &'static str {
    f.as_str()
}

/// Chat logprob entry for one token.
fn chat_logprob(tok: &Tokenizer, t: &GeneratedToken) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({
            "token": String::from_utf8_lossy(bytes),
            "logprob": lp,
            "bytes": bytes,
        })
    };
    let mut v = entry(t.id, t.logprob);
    v["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
    v
}

/// Completion logprobs (the legacy parallel-array shape) for a run of tokens.
fn completion_logprobs(tok: &Tokenizer, toks: &[GeneratedToken], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let mut tokens = vec![];
    let mut lps = vec![];
    let mut tops = vec![];
    let mut offsets = vec![];
    for t in toks {
        tokens.push(Value::from(t.piece.clone()));
        lps.push(Value::from(t.logprob));
        let mut m = serde_json::Map::new();
        for &(id, lp) in &t.top {
            m.insert(
                String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
                Value::from(lp),
            );
        }
        tops.push(Value::Object(m));
        offsets.push(Value::from(offset));
        offset += t.piece.len();
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

async fn respond(st: Arc<AppState>, kind: Kind, prepared: Prepared, acct: Acct) -> Response {
    let (prompt, params, common) = prepared;
    let want_logprobs = params.logprobs.is_some();
    let svc = &st.services.list[acct.service];
    let tag = ServiceTag {
        name: Arc::from(svc.name.as_str()),
        priority: svc.config.priority.max(1),
    };
    let mods = (acct.run_modules.clone(), acct.module_key);
    let rx = match st.submit(prompt, params, acct.arrived, tag, mods) {
        Ok(rx) => rx,
        Err(e) => {
            st.metrics
                .service(&svc.name, &acct.module)
                .errors
                .fetch_add(1, Ordering::Relaxed);
            return failed(&st, e);
        }
    };
    let id = acct.request_id.clone();
    if common.wants_stream() {
        stream_response(
            st,
            kind,
            rx,
            id,
            want_logprobs,
            common.include_usage(),
            acct,
        )
    } else {
        collect_response(st, kind, rx, id, want_logprobs, acct).await
    }
}

async fn collect_response(
    st: Arc<AppState>,
    kind: Kind,
    mut rx: UnboundedReceiver<SeqEvent>,
    id: String,
    want_logprobs: bool,
    acct: Acct,
) -> Response {
    let mut text = String::new();
    let mut toks: Vec<GeneratedToken> = vec![];
    let (finish, p, c, cached) = loop {
        match rx.recv().await {
            Some(SeqEvent::Text { text: t, token }) => {
                text.push_str(&t);
                if let Some(token) = token {
                    toks.push(token);
                }
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                stats,
            }) => {
                st.account(
                    &acct,
                    finish_str(finish),
                    (prompt_tokens, completion_tokens, cached_tokens),
                    &stats,
                );
                break (finish, prompt_tokens, completion_tokens, cached_tokens);
            }
            Some(SeqEvent::Error(m)) => {
                st.account(&acct, "error", (0, toks.len(), 0), &SeqStats::default());
                return failed(&st, ApiError::internal(m));
            }
            None => return failed(&st, ApiError::internal("the scheduler stopped")),
        }
    };
    let created = unix_now();
    let body = match kind {
        Kind::Chat => {
            let logprobs = if want_logprobs {
                json!({"content": toks.iter().map(|t| chat_logprob(&st.tok, t)).collect::<Vec<_>>()})
            } else {
                Value::Null
            };
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": st.id,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": finish_str(finish),
                }],
                "usage": usage(p, c, cached),
            })
        }
        Kind::Completion => {
            let logprobs = if want_logprobs {
                completion_logprobs(&st.tok, &toks, 0)
            } else {
                Value::Null
            };
            json!({
                "id": id, "object": "text_completion", "created": created, "model": st.id,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_str(finish)}],
                "usage": usage(p, c, cached),
            })
        }
    };
    Json(body).into_response()
}

/// State of one SSE stream: chunks ready to send, then the events still to come.
struct StreamState {
    st: Arc<AppState>,
    kind: Kind,
    rx: UnboundedReceiver<SeqEvent>,
    id: String,
    created: u64,
    want_logprobs: bool,
    include_usage: bool,
    ready: std::collections::VecDeque<String>,
    text_offset: usize,
    done: bool,
    acct: Acct,
    generated: usize,
}

impl StreamState {
    fn chunk(&self, delta_or_text: Value, logprobs: Value, finish: Option<&str>) -> String {
        let mut choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": delta_or_text}),
            Kind::Completion => json!({"index": 0, "text": delta_or_text}),
        };
        choice["logprobs"] = logprobs;
        choice["finish_reason"] = finish.map(Value::from).unwrap_or(Value::Null);
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.st.id,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    fn empty_delta(&self) -> Value {
        match self.kind {
            Kind::Chat => json!({}),
            Kind::Completion => Value::from(""),
        }
    }

    /// Turn one scheduler event into chunks.
    fn on_event(&mut self, ev: Option<SeqEvent>) {
        match ev {
            Some(SeqEvent::Text { text, token }) => {
                if token.is_some() {
                    self.generated += 1;
                }
                let logprobs = match (&token, self.want_logprobs) {
                    (Some(t), true) => match self.kind {
                        Kind::Chat => json!({"content": [chat_logprob(&self.st.tok, t)]}),
                        Kind::Completion => {
                            let v = completion_logprobs(
                                &self.st.tok,
                                std::slice::from_ref(t),
                                self.text_offset,
                            );
                            self.text_offset += t.piece.len();
                            v
                        }
                    },
                    _ => Value::Null,
                };
                if text.is_empty() && logprobs.is_null() {
                    return; // nothing to tell yet (held-back bytes or stop-string prefix)
                }
                let delta = match self.kind {
                    Kind::Chat => json!({"content": text}),
                    Kind::Completion => Value::from(text),
                };
                let c = self.chunk(delta, logprobs, None);
                self.ready.push_back(c);
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                stats,
            }) => {
                // Committed before the last chunk is sent.
                self.st.account(
                    &self.acct,
                    finish_str(finish),
                    (prompt_tokens, completion_tokens, cached_tokens),
                    &stats,
                );
                let c = self.chunk(self.empty_delta(), Value::Null, Some(finish_str(finish)));
                self.ready.push_back(c);
                if self.include_usage {
                    let u = json!({
                        "id": self.id,
                        "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": self.created, "model": self.st.id,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
                    });
                    self.ready.push_back(u.to_string());
                }
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
            Some(SeqEvent::Error(m)) => {
                self.st.account(
                    &self.acct,
                    "error",
                    (0, self.generated, 0),
                    &SeqStats::default(),
                );
                self.st
                    .metrics
                    .requests_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.ready
                    .push_back(ApiError::internal(m).body().to_string());
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
            None => {
                self.ready.push_back(
                    ApiError::internal("the scheduler stopped")
                        .body()
                        .to_string(),
                );
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }
}

fn stream_response(
    st: Arc<AppState>,
    kind: Kind,
    rx: UnboundedReceiver<SeqEvent>,
    id: String,
    want_logprobs: bool,
    include_usage: bool,
    acct: Acct,
) -> Response {
    let mut state = StreamState {
        st,
        kind,
        rx,
        id,
        created: unix_now(),
        want_logprobs,
        include_usage,
        ready: Default::default(),
        text_offset: 0,
        done: false,
        acct,
        generated: 0,
    };
    if kind == Kind::Chat {
        let first = state.chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        );
        state.ready.push_back(first);
    }
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.ready.pop_front() {
                return Some((Ok::<Event, Infallible>(Event::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            let ev = s.rx.recv().await;
            s.on_event(ev);
        }
    });
    Sse::new(stream).into_response()
}

/// The id a model is served under and the other names requests may use for it: a known model's
/// canonical name with its aliases and upstream file name; otherwise the file's name and stem.
/// `general_name` (the GGUF's `general.name`) is accepted too, since clients copy it from logs.
pub fn model_names(spec: &str, general_name: Option<&str>) -> (String, Vec<String>) {
    let mut aliases = vec![spec.trim().to_string()];
    let id = if let Some(k) = modu_hub::find_known(spec) {
        aliases.extend(k.aliases.iter().map(|a| a.to_string()));
        aliases.push(k.file_name.to_string());
        aliases.push(k.file_name.trim_end_matches(".gguf").to_string());
        k.name.to_string()
    } else {
        let file = spec.rsplit(['/', '\\']).next().unwrap_or(spec).to_string();
        let stem = file.trim_end_matches(".gguf").to_string();
        aliases.push(file);
        stem
    };
    if let Some(n) = general_name {
        aliases.push(n.to_string());
    }
    aliases.retain(|a| !a.is_empty() && *a != id);
    (id, aliases)
}
