//! The server: configuration, start-up and shutdown, and the route table. Requests flow
//! `routes` → `auth` → `prepare` (validation, admission) → the scheduler → `respond` (JSON or
//! SSE), with `accounting` recording each request once.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use modu_engine::{ChatTemplate, Model, Tokenizer};
use modu_gguf::GgufFile;

use crate::error::{ApiError, ServerError};
use crate::metrics::Metrics;
use crate::modules::ModuleRegistry;
use crate::scheduler::{self, SchedulerConfig, SchedulerHandle};
use crate::services::{Services, ServicesConfig};
use crate::usage::UsageDb;

use crate::auth::request_guard;
use crate::routes::*;

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
    /// Directories module files may be loaded from (at start and by `POST /v1/modules`);
    /// empty: only the modules given at start, none at run time.
    pub module_dirs: Vec<std::path::PathBuf>,
    /// Without API keys, the `Host` names requests may carry besides loopback ones
    /// (`localhost`, `127.0.0.1`, `[::1]`): a guard against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Connection limits and timeouts.
    pub limits: HttpLimits,
    /// Speculative decoding for requests that do not choose (`--spec ngram`); `None`: off.
    pub speculative: Option<modu_engine::SpecConfig>,
}

/// Bounds on what one client connection may hold: a slow or stalled client (slowloris) cannot
/// keep sockets, workers or a shutdown waiting.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Open connections; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time to receive a request's headers, and the longest a kept-alive connection may sit
    /// idle before its next request.
    pub header_timeout: std::time::Duration,
    /// Time to receive a request's body once its headers are in.
    pub body_timeout: std::time::Duration,
    /// On SIGTERM (or [`ServerHandle::stop`]): how long in-flight requests may take to finish
    /// before they are cancelled and the server exits.
    pub drain_timeout: std::time::Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 512,
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            drain_timeout: std::time::Duration::from_secs(30),
        }
    }
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
            module_dirs: Vec::new(),
            allowed_hosts: Vec::new(),
            limits: HttpLimits::default(),
            speculative: None,
        }
    }
}

pub(crate) struct AppState {
    pub(crate) sched: SchedulerHandle,
    pub(crate) tok: Arc<Tokenizer>,
    pub(crate) template: ChatTemplate,
    pub(crate) bos: String,
    pub(crate) eos: String,
    pub(crate) id: String,
    pub(crate) names: Vec<String>,
    pub(crate) ctx: usize,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: u64,
    pub(crate) services: Services,
    pub(crate) usage: UsageDb,
    pub(crate) modules: Arc<ModuleRegistry>,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) limits: HttpLimits,
    /// Set on shutdown: new generation requests get 503 while in-flight ones finish.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Requests whose prompt (template, tokenizer) is being built at once.
    pub(crate) prepare_slots: tokio::sync::Semaphore,
    /// Structured output's token trie for this model, built on first use.
    pub(crate) grammar: std::sync::OnceLock<Result<Arc<modu_engine::GrammarEngine>, String>>,
    /// Requests waiting (not yet started) per module name, for `vllm:lora_requests_info`.
    pub(crate) waiting_modules: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    /// The default for requests that do not choose.
    pub(crate) speculative: Option<modu_engine::SpecConfig>,
}

pub(crate) type St = State<Arc<AppState>>;

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
    sched: SchedulerHandle,
}

impl ServerHandle {
    #[doc(hidden)]
    /// Test hook: make the scheduler thread panic, as a bug outside the forward pass would.
    pub fn crash_scheduler_for_tests(&self) {
        self.sched.crash_for_tests();
    }

    /// Stop accepting, let in-flight requests finish (up to the drain timeout, then cancel
    /// them), and wait for the threads to end.
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

    pub(crate) fn stop_inner(&mut self) -> Result<(), ServerError> {
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
    let mut registry = ModuleRegistry::new(
        served.model.module_shapes().clone(),
        names.clone(),
        config.module_mem,
    );
    registry.set_dirs(&config.module_dirs).map_err(|e| {
        ServerError::Config(format!("a --module-dir is not a readable directory: {e}"))
    })?;
    let modules = Arc::new(registry);
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
        allowed_hosts: config.allowed_hosts.clone(),
        limits: config.limits.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
        grammar: std::sync::OnceLock::new(),
        waiting_modules: Default::default(),
        speculative: config.speculative,
        prepare_slots: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
    });
    let app = router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("modu-http")
        .build()
        .map_err(ServerError::Runtime)?;
    let hook = sched.clone();
    let thread = std::thread::Builder::new()
        .name("modu-server".into())
        .spawn(move || {
            let result = runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(ServerError::Io)?;
                let dead = state.sched.clone();
                let stop = async move {
                    tokio::select! {
                        _ = rx => Stop::Asked,
                        _ = signal(), if on_signal => Stop::Asked,
                        _ = dead.exited() => Stop::SchedulerDied,
                    }
                };
                crate::http::serve_connections(listener, app, state, stop).await
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
        sched: hook,
    })
}

/// Why the server stops.
pub(crate) enum Stop {
    /// SIGTERM, ctrl-c or [`ServerHandle::stop`]: drain, then exit cleanly.
    Asked,
    /// The scheduler thread ended on its own: exit with an error (a supervisor restarts it).
    SchedulerDied,
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

pub(crate) async fn signal() {
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

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/live", get(live))
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_guard,
        ))
        .with_state(state)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
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
