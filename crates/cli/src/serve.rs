//! `modu serve`: the OpenAI-compatible HTTP server.

use anyhow::{Context, Result};
use clap::Args;
use modu_server::services::ServicesConfig;
use modu_server::{check_bind_address, model_names, ServeConfig, ServedModel};

use crate::run::{load, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The default for requests without a `speculative` field.
    #[command(flatten)]
    pub spec: crate::run::SpecArgs,
    /// Address to listen on. Only loopback addresses unless API keys are configured
    /// (--config) or --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences generated at once (the running batch).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Most requests waiting for a batch slot; more get 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Prompt tokens prefilled per batch step (long prompts are split so decodes keep going).
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// MiB of KV cache kept to reuse the prompt prefixes of finished requests (0 disables).
    #[arg(long, default_value_t = 256)]
    pub prefix_cache_mem: usize,
    /// MiB of paged KV cache shared by running sequences and cached prefixes. When it runs
    /// out, cached prefixes are dropped and then the youngest sequence is preempted (and later
    /// recomputed). Default: enough for --parallel sequences of the full context.
    #[arg(long)]
    pub kv_mem: Option<usize>,
    /// Listen on a non-loopback address although no API keys are configured (anyone who can
    /// reach the port can use the server).
    #[arg(long)]
    pub allow_remote: bool,
    /// Services config (TOML): services, API key hashes, modules, limits, priorities, the
    /// usage database and the machine's power and price model. See README "Services".
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Register a LoRA module: NAME=PATH (a GGUF-LoRA file or a PEFT directory); repeatable.
    /// Requests pick it with "model": "NAME". More can be loaded at run time (POST
    /// /v1/modules).
    #[arg(long = "module", value_name = "NAME=PATH")]
    pub modules: Vec<String>,
    /// MiB of module weights kept in memory; idle modules beyond it are evicted (least
    /// recently used) and re-read on demand. Default: no limit.
    #[arg(long)]
    pub module_mem: Option<usize>,
    /// Directory that `POST /v1/modules` may load module files from (symbolic links are
    /// resolved first); repeatable. Without one, modules can only be registered at start.
    #[arg(long = "module-dir", value_name = "DIR")]
    pub module_dirs: Vec<std::path::PathBuf>,
    /// Without API keys: a Host name requests may carry besides loopback names (a guard
    /// against DNS rebinding); repeatable.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Most open client connections; more are closed on accept.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also the longest idle keep-alive).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// On SIGTERM / ctrl-c: seconds in-flight requests may take to finish before they are
    /// cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
}

fn seconds(flag: &str, v: f64) -> Result<std::time::Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        anyhow::bail!("--{flag} must be a number of seconds in (0, 86400], got {v}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let services = match &a.config {
        Some(p) => ServicesConfig::load(p)?,
        None => ServicesConfig::open(),
    };
    // Refuse a bad address before spending time loading the model.
    check_bind_address(&a.host, a.allow_remote || services.auth_enabled())?;
    if a.parallel == 0 {
        anyhow::bail!("--parallel must be at least 1");
    }
    let mut modules = services.modules.clone();
    for m in &a.modules {
        let Some((name, path)) = m.split_once('=') else {
            anyhow::bail!("--module expects NAME=PATH, got {m:?}");
        };
        modules.push((
            name.trim().to_string(),
            std::path::PathBuf::from(path.trim()),
        ));
    }
    let limits = modu_server::HttpLimits {
        max_connections: a.max_connections.max(1),
        header_timeout: seconds("header-timeout", a.header_timeout)?,
        body_timeout: seconds("body-timeout", a.body_timeout)?,
        drain_timeout: seconds("drain-timeout", a.drain_timeout)?,
    };
    for d in &a.module_dirs {
        if !d.is_dir() {
            anyhow::bail!("--module-dir {}: not a directory", d.display());
        }
    }
    let l = load(&a.model)?;
    let (id, aliases) = model_names(&a.model.model, l.model.info().name.as_deref());
    let config = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        parallel: a.parallel,
        max_queue: a.queue,
        ctx: l.ctx,
        allow_remote: a.allow_remote,
        prefill_chunk: a.prefill_chunk.max(1),
        prefix_cache_mem: a.prefix_cache_mem << 20,
        kv_mem: a.kv_mem.map_or(0, |m| m.max(1) << 20),
        services,
        modules,
        module_mem: a.module_mem.unwrap_or(0) << 20,
        module_dirs: a.module_dirs.clone(),
        allowed_hosts: a.allowed_hosts.clone(),
        limits,
        speculative: a.spec.config(),
    };
    let served = ServedModel {
        model: l.model,
        tokenizer: l.tokenizer,
        file: l.file,
        id: id.clone(),
        aliases,
    };
    let ctx = config.ctx;
    let parallel = config.parallel;
    modu_server::serve(served, config, |addr| {
        eprintln!(
            "serving {id} on http://{addr}/v1 (context {ctx}, {parallel} parallel); ctrl-c to stop"
        );
    })
    .context("running the server")?;
    eprintln!("server stopped");
    Ok(())
}
