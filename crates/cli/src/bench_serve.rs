//! `modu bench serve`: load-test an OpenAI-compatible server with N concurrent streaming
//! clients and report aggregate throughput and latency percentiles.
//!
//! Without `--url` it starts modu's own server in this process (on a free loopback port, with
//! `--parallel` equal to the largest client count); with `--url` it measures any server that
//! speaks `/v1/completions` with SSE, such as llama.cpp's `llama-server`, so the two can be put
//! side by side with the very same client (`bench/compare_serve.sh`).
//!
//! Each level runs `clients` threads; each sends `--rounds` requests back to back (greedy,
//! `max_tokens = -n`, `ignore_eos`, a distinct prompt per request so no two requests share a
//! cached prefix). Per request: time to first token (first SSE chunk with text), inter-token
//! latencies (gaps between text chunks) and completion tokens (from the usage chunk, else the
//! number of text chunks). Aggregate tok/s = all completion tokens / wall time of the level.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::run::{load, ModelArgs};

#[derive(Args)]
pub struct ServeBenchArgs {
    /// Model to serve in-process (ignored with --url).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Base URL of a running OpenAI-compatible server (e.g. http://127.0.0.1:8080) instead of
    /// starting modu's own.
    #[arg(long)]
    pub url: Option<String>,
    /// Concurrent client counts to test, comma-separated.
    #[arg(short = 'c', long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub clients: Vec<usize>,
    /// Completion tokens per request.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Requests each client sends one after another.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// `model` field of the requests (default: the first id the server lists at /v1/models).
    #[arg(long)]
    pub request_model: Option<String>,
    /// API keys to send (`Authorization: Bearer KEY`); client `c` uses key `c mod N`, so one
    /// run can load several services of a server started with --config.
    #[arg(long = "api-key", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// Keep sending until this many seconds have passed (each client repeats its rounds);
    /// for sustained load, e.g. to fill the usage accounting.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Running-batch size of the in-process server (default: the largest client count).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Print JSON (one object per level) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// In-process server: register this many random LoRA modules (all seven projections) and
    /// send client `c`'s requests to module `c mod K`. Compare with 0 to see what mixing
    /// modules in one batch costs.
    #[arg(long, default_value_t = 0)]
    pub modules: usize,
    /// Rank of the random modules.
    #[arg(long, default_value_t = 16)]
    pub module_rank: usize,
    /// Write the random modules (GGUF-LoRA, loadable by llama.cpp's `--lora`) into this
    /// directory and keep them, instead of a temporary one (the contents are deterministic).
    #[arg(long)]
    pub module_dir: Option<std::path::PathBuf>,
    /// With --url: request model names to cycle through per client (modules of that server).
    #[arg(long, value_delimiter = ',')]
    pub module_names: Vec<String>,
    /// With --url against llama.cpp's llama-server started with N `--lora` adapters: client `c`
    /// sends `"lora": [{"id": c mod N, "scale": 1}]` (the others at scale 0).
    #[arg(long)]
    pub llama_lora: Option<usize>,
    /// Constrained decoding: client `c` sends its own JSON schema (`response_format`), one that
    /// no output completes within -n tokens, so lengths match an unconstrained run. The grammar
    /// mask's p50/p99 time (from the server's /metrics) is reported too.
    #[arg(long)]
    pub structured: bool,
}

/// Client `c`'s schema for --structured: its own property names and bounds, and at least 48
/// list items (far more than -n tokens can hold, so the grammar never ends first).
fn bench_schema(c: usize) -> Value {
    json!({
        "type": "object",
        "properties": {
            format!("title_{c}"): {"type": "string", "maxLength": 40},
            "items": {"type": "array", "minItems": 48, "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    format!("qty_{c}"): {"type": "integer", "minimum": 0, "maximum": 99 + c},
                    "tag": {"enum": ["a", "b", format!("c{c}")]}
                },
                "required": ["name", format!("qty_{c}"), "tag"],
                "additionalProperties": false
            }}
        },
        "required": [format!("title_{c}"), "items"],
        "additionalProperties": false
    })
}

/// The grammar-mask time quantiles (p50, p99, in µs) a modu server reports at /metrics.
fn mask_quantiles(agent: &ureq::Agent, base: &str) -> Option<(f64, f64)> {
    let text = agent
        .get(&format!("{base}/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    let q = |label: &str| -> Option<f64> {
        let prefix = format!("modu_grammar_mask_seconds{{quantile=\"{label}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| s * 1e6)
    };
    Some((q("0.5")?, q("0.99")?))
}

/// What a request adds to pick its module.
#[derive(Clone)]
enum ModulePick {
    None,
    /// Request `model` names, by client.
    Names(Vec<String>),
    /// llama-server adapter ids, by client.
    LlamaIds(usize),
}

impl ModulePick {
    fn apply(&self, client: usize, body: &mut Value) {
        match self {
            ModulePick::None => {}
            ModulePick::Names(n) => body["model"] = json!(n[client % n.len()]),
            ModulePick::LlamaIds(k) => {
                let list: Vec<Value> = (0..*k)
                    .map(|i| json!({"id": i, "scale": if i == client % k { 1.0 } else { 0.0 }}))
                    .collect();
                body["lora"] = json!(list);
            }
        }
    }

    fn count(&self, clients: usize) -> usize {
        match self {
            ModulePick::None => 0,
            ModulePick::Names(n) => n.len().min(clients),
            ModulePick::LlamaIds(k) => (*k).min(clients),
        }
    }
}

/// `k` random rank-`rank` adapters over every projection of the base model, written as
/// GGUF-LoRA files into `dir`: (name, path) pairs.
fn random_modules(
    file: &modu_gguf::GgufFile,
    k: usize,
    rank: usize,
    dir: &std::path::Path,
) -> Result<Vec<(String, std::path::PathBuf)>> {
    use modu_engine::lora::LoraTensor;
    let shapes = modu_engine::BaseShapes::from_gguf(file)?;
    let mut out = Vec::new();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 0.02
    };
    for m in 0..k {
        let layers = shapes
            .layers
            .iter()
            .map(|l| {
                std::array::from_fn(|p| {
                    l[p].and_then(|(n_in, n_out)| {
                        let a = (0..rank * n_in)
                            .map(|_| half::f16::from_f32(rnd()))
                            .collect();
                        let b = (0..rank * n_out)
                            .map(|_| half::f16::from_f32(rnd()))
                            .collect();
                        LoraTensor::new(rank, n_in, n_out, rank as f32, rank as f32, a, b)
                    })
                })
            })
            .collect();
        let name = format!("bench-m{m}");
        let ad = modu_engine::LoraAdapter::from_tensors(
            &name,
            Some(shapes.arch.clone()),
            rank as f32,
            layers,
        )?;
        let path = dir.join(format!("{name}.gguf"));
        ad.to_gguf(&shapes.arch)?.write_file(&path)?;
        out.push((name, path));
    }
    Ok(out)
}

/// One finished request.
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

/// One load level.
struct Level {
    clients: usize,
    requests: usize,
    tokens: usize,
    wall: Duration,
    /// Aggregate decode rate: per client, the tokens after each first one over the time from
    /// first to last token (summed over its requests), added up over the clients. Unlike
    /// `tokens / wall` it leaves out the prompts' prefill and the wait for a first token.
    decode_tps: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
    errors: Vec<String>,
}

const TOPICS: [&str; 16] = [
    "a lighthouse keeper",
    "서울의 작은 빵집",
    "a robot learning to paint",
    "the history of printing",
    "제주도의 바다",
    "a city under the sea",
    "an old violin",
    "기차 여행",
    "a chess tournament",
    "the first snow of winter",
    "한글의 역사",
    "a lost map",
    "a garden on Mars",
    "김치 만들기",
    "a detective in Busan",
    "the night market",
];

fn prompt_for(client: usize, round: usize) -> String {
    format!(
        "Request {client}-{round}. Write a long, detailed story about {}. Story:",
        TOPICS[(client * 7 + round * 3) % TOPICS.len()]
    )
}

/// modu's server on a free loopback port in this process.
fn start_in_process(
    spec: &str,
    l: crate::run::Loaded,
    parallel: usize,
    max_queue: usize,
    modules: Vec<(String, std::path::PathBuf)>,
    module_dirs: Vec<std::path::PathBuf>,
) -> Result<modu_server::ServerHandle> {
    let (id, aliases) = modu_server::model_names(spec, l.model.info().name.as_deref());
    let config = modu_server::ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        parallel,
        max_queue,
        ctx: l.ctx,
        modules,
        module_dirs,
        ..Default::default()
    };
    let served = modu_server::ServedModel {
        model: l.model,
        tokenizer: l.tokenizer,
        file: l.file,
        id,
        aliases,
    };
    modu_server::start(served, config, false).context("starting the server")
}

/// Send one streaming completion and time its chunks.
#[allow(clippy::too_many_arguments)]
fn one_request(
    agent: &ureq::Agent,
    base: &str,
    model: &str,
    prompt: &str,
    n: usize,
    pick: (&ModulePick, usize),
    key: Option<&str>,
    structured: bool,
) -> Result<Sample> {
    let mut body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    pick.0.apply(pick.1, &mut body);
    if structured {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": format!("bench_{}", pick.1), "schema": bench_schema(pick.1)}});
    }
    let start = Instant::now();
    let mut req = agent.post(&format!("{base}/v1/completions"));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = req.send_json(body).map_err(|e| match e {
        ureq::Error::Status(code, r) => {
            anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        other => anyhow::anyhow!("{other}"),
    })?;
    let reader = BufReader::new(resp.into_reader());
    let mut first: Option<Duration> = None;
    let mut last = start;
    let mut gaps = Vec::new();
    let mut chunks = 0;
    let mut usage_tokens = None;
    for line in reader.lines() {
        let line = line.context("reading the event stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).context("parsing an SSE chunk")?;
        if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")) {
            usage_tokens = u.as_u64().map(|t| t as usize);
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = Instant::now();
        chunks += 1;
        match first {
            None => first = Some(now - start),
            Some(_) => gaps.push(now - last),
        }
        last = now;
    }
    let Some(ttft) = first else {
        bail!("the stream ended without any text");
    };
    Ok(Sample {
        ttft,
        gaps,
        tokens: usage_tokens.unwrap_or(chunks),
    })
}

fn run_level(
    base: &str,
    model: &str,
    pick: &ModulePick,
    a: &ServeBenchArgs,
    clients: usize,
) -> Level {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(600))
        .build();
    let start = Instant::now();
    let results: Vec<Vec<Result<Sample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let agent = agent.clone();
                s.spawn(move || {
                    let key =
                        (!a.api_keys.is_empty()).then(|| a.api_keys[c % a.api_keys.len()].as_str());
                    let until = a.duration.map(|d| start + Duration::from_secs(d));
                    let mut out = Vec::new();
                    let mut r = 0;
                    // `rounds` requests, or as many as fit in `duration`.
                    while match until {
                        Some(t) => Instant::now() < t,
                        None => r < a.rounds,
                    } {
                        let p = prompt_for(c, r);
                        out.push(one_request(
                            &agent,
                            base,
                            model,
                            &p,
                            a.n_gen,
                            (pick, c),
                            key,
                            a.structured,
                        ));
                        r += 1;
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(anyhow::anyhow!("client thread panicked"))])
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut level = Level {
        clients,
        requests: 0,
        tokens: 0,
        wall,
        decode_tps: 0.0,
        ttft: Vec::new(),
        itl: Vec::new(),
        errors: Vec::new(),
    };
    for client in &results {
        let (mut n, mut t) = (0usize, 0f64);
        for s in client.iter().flatten() {
            n += s.tokens.saturating_sub(1);
            t += s.gaps.iter().map(Duration::as_secs_f64).sum::<f64>();
        }
        if t > 0.0 {
            level.decode_tps += n as f64 / t;
        }
    }
    for r in results.into_iter().flatten() {
        match r {
            Ok(s) => {
                level.requests += 1;
                level.tokens += s.tokens;
                level.ttft.push(s.ttft.as_secs_f64() * 1e3);
                level
                    .itl
                    .extend(s.gaps.iter().map(|g| g.as_secs_f64() * 1e3));
            }
            Err(e) => level.errors.push(format!("{e:#}")),
        }
    }
    level
}

/// The `p`-th percentile (0–100) by nearest rank; NaN when empty.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

pub fn bench_serve(a: ServeBenchArgs) -> Result<()> {
    if a.clients.is_empty() || a.clients.contains(&0) {
        bail!("--clients needs positive counts");
    }
    if a.n_gen == 0 || a.rounds == 0 {
        bail!("-n and --rounds must be at least 1");
    }
    let max_clients = *a.clients.iter().max().expect("not empty");
    let mut own = None;
    let mut pick = if !a.module_names.is_empty() {
        ModulePick::Names(a.module_names.clone())
    } else if let Some(k) = a.llama_lora {
        if k == 0 {
            bail!("--llama-lora needs at least 1 adapter");
        }
        ModulePick::LlamaIds(k)
    } else {
        ModulePick::None
    };
    let tmp = std::env::temp_dir().join(format!("modu-bench-modules-{}", std::process::id()));
    let base = match &a.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let l = load(&a.model)?;
            let mut modules = Vec::new();
            if a.modules > 0 {
                let dir = a.module_dir.clone().unwrap_or_else(|| tmp.clone());
                std::fs::create_dir_all(&dir)?;
                modules = random_modules(&l.file, a.modules, a.module_rank, &dir)
                    .context("writing random modules")?;
                pick = ModulePick::Names(modules.iter().map(|m| m.0.clone()).collect());
            }
            let parallel = a.parallel.unwrap_or(max_clients).max(1);
            let h = start_in_process(
                &a.model.model,
                l,
                parallel,
                max_clients * 2,
                modules,
                Vec::new(),
            )?;
            let base = format!("http://{}", h.addr);
            own = Some(h);
            base
        }
    };
    let target = a.url.clone().unwrap_or_else(|| "modu (in-process)".into());
    let agent = ureq::AgentBuilder::new().build();
    let model = match &a.request_model {
        Some(m) => m.clone(),
        None => {
            let mut req = agent.get(&format!("{base}/v1/models"));
            if let Some(k) = a.api_keys.first() {
                // A keyed server lists models only to a key.
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let v: Value = req
                .call()
                .with_context(|| format!("listing models at {base}/v1/models"))?
                .into_json()?;
            v["data"][0]["id"]
                .as_str()
                .context("the server lists no model")?
                .to_string()
        }
    };
    // Warm up (page in weights) with one short request.
    one_request(
        &agent,
        &base,
        &model,
        "Hello",
        4,
        (&pick, 0),
        a.api_keys.first().map(|k| k.as_str()),
        a.structured,
    )
    .with_context(|| format!("warm-up request to {base}"))?;
    if !a.json {
        println!(
            "target: {target}; {} tokens per request, {} round(s) per client; constrained: {}; modules: {}",
            a.n_gen,
            a.rounds,
            if a.structured { "a JSON schema per client" } else { "no" },
            match &pick {
                ModulePick::None => "none".to_string(),
                ModulePick::Names(n) => format!("{} by name", n.len()),
                ModulePick::LlamaIds(k) => format!("{k} llama-server adapter ids"),
            }
        );
        println!(
            "| clients | requests | tokens | wall s | agg tok/s | decode tok/s | per-stream tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut rows = Vec::new();
    let mut mask_lines: Vec<String> = Vec::new();
    for &c in &a.clients {
        let mut l = run_level(&base, &model, &pick, &a, c);
        let agg = l.tokens as f64 / l.wall.as_secs_f64();
        let itl50 = percentile(&mut l.itl, 50.0);
        let row = json!({
            "target": target,
            "modules": pick.count(c),
            "clients": l.clients,
            "requests": l.requests,
            "errors": l.errors.len(),
            "n_gen": a.n_gen,
            "tokens": l.tokens,
            "wall_s": l.wall.as_secs_f64(),
            "agg_tps": agg,
            "decode_tps": l.decode_tps,
            "per_stream_tps": 1e3 / itl50,
            "ttft_p50_ms": percentile(&mut l.ttft, 50.0),
            "ttft_p99_ms": percentile(&mut l.ttft, 99.0),
            "itl_p50_ms": itl50,
            "itl_p99_ms": percentile(&mut l.itl, 99.0),
            "structured": a.structured,
        });
        let mut row = row;
        if a.structured {
            if let Some((p50, p99)) = mask_quantiles(&agent, &base) {
                row["mask_p50_us"] = json!(p50);
                row["mask_p99_us"] = json!(p99);
                mask_lines.push(format!(
                    "grammar mask ({c} clients, recent masks): p50 {p50:.0} µs, p99 {p99:.0} µs"
                ));
            }
        }
        if a.json {
            rows.push(row);
        } else {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
                l.clients,
                l.requests,
                l.tokens,
                l.wall.as_secs_f64(),
                agg,
                l.decode_tps,
                row["per_stream_tps"].as_f64().unwrap_or(f64::NAN),
                row["ttft_p50_ms"].as_f64().unwrap_or(f64::NAN),
                row["ttft_p99_ms"].as_f64().unwrap_or(f64::NAN),
                itl50,
                row["itl_p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }
        for e in l.errors.iter().take(3) {
            eprintln!("error ({c} clients): {e}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for l in &mask_lines {
            println!("{l}");
        }
    }
    if let Some(h) = own {
        h.stop().context("stopping the server")?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&mut v, 50.0), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert_eq!(percentile(&mut v, 0.0), 1.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }
}

#[derive(Args)]
pub struct ModulesBenchArgs {
    /// Base model (served in-process).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Modules to register.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Rank of the random modules (all seven projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Tokens of the stream that runs while the modules load.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    #[arg(long)]
    pub json: bool,
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `modu bench modules`: register many modules at run time while a stream is running. Reports
/// load latency (p50/max), the resident-memory growth against the modules' file sizes, and the
/// stream's inter-token latency with and without loads going on.
pub fn bench_modules(a: ModulesBenchArgs) -> Result<()> {
    if a.count == 0 || a.rank == 0 {
        bail!("--count and --rank must be at least 1");
    }
    let l = load(&a.model)?;
    let tmp = std::env::temp_dir().join(format!("modu-bench-modules-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mods = random_modules(&l.file, a.count, a.rank, &tmp).context("writing random modules")?;
    let file_bytes: u64 = mods
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let h = start_in_process(&a.model.model, l, 2, 64, Vec::new(), vec![tmp.clone()])?;
    let base = format!("http://{}", h.addr);
    let agent = ureq::AgentBuilder::new().build();
    let none = ModulePick::None;
    // Warm up, then a baseline stream with nothing else going on.
    one_request(&agent, &base, "", "Hello", 4, (&none, 0), None, false)?;
    let quiet = one_request(
        &agent,
        &base,
        "",
        &prompt_for(0, 0),
        a.n_gen,
        (&none, 0),
        None,
        false,
    )?;
    let rss0 = rss_bytes();
    // The same stream while every module is loaded through the HTTP API.
    let (busy, loads) = std::thread::scope(|s| -> Result<(Sample, Vec<f64>)> {
        let stream = s.spawn(|| {
            one_request(
                &agent,
                &base,
                "",
                &prompt_for(1, 0),
                a.n_gen,
                (&none, 0),
                None,
                false,
            )
        });
        // Let the stream start first.
        std::thread::sleep(Duration::from_millis(300));
        let mut loads = Vec::with_capacity(mods.len());
        for (name, path) in &mods {
            let t = Instant::now();
            agent
                .post(&format!("{base}/v1/modules"))
                .send_json(json!({"name": name, "path": path}))
                .with_context(|| format!("loading {name}"))?;
            loads.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let busy = stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        Ok((busy, loads))
    })?;
    let rss1 = rss_bytes();
    h.stop().context("stopping the server")?;
    let _ = std::fs::remove_dir_all(&tmp);
    let mut loads_sorted = loads.clone();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let mut q: Vec<f64> = quiet.gaps.iter().map(ms).collect();
    let mut b: Vec<f64> = busy.gaps.iter().map(ms).collect();
    let growth = rss1.saturating_sub(rss0) as f64;
    let row = json!({
        "modules": a.count,
        "rank": a.rank,
        "file_bytes": file_bytes,
        "rss_growth_bytes": growth,
        "rss_growth_over_files": growth / file_bytes.max(1) as f64,
        "load_ms_p50": percentile(&mut loads_sorted, 50.0),
        "load_ms_max": percentile(&mut loads_sorted, 100.0),
        "stream_itl_p50_ms_quiet": percentile(&mut q, 50.0),
        "stream_itl_max_ms_quiet": percentile(&mut q, 100.0),
        "stream_itl_p50_ms_loading": percentile(&mut b, 50.0),
        "stream_itl_max_ms_loading": percentile(&mut b, 100.0),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&row)?);
    } else {
        println!(
            "{} rank-{} modules, {:.1} MiB of files: resident memory grew {:.1} MiB ({:.2}x the files)",
            a.count,
            a.rank,
            file_bytes as f64 / 1048576.0,
            growth / 1048576.0,
            row["rss_growth_over_files"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "load time per module (HTTP round trip): p50 {:.1} ms, max {:.1} ms",
            row["load_ms_p50"].as_f64().unwrap_or(f64::NAN),
            row["load_ms_max"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "stream inter-token latency: quiet p50 {:.1} / max {:.1} ms; while loading p50 {:.1} / max {:.1} ms",
            row["stream_itl_p50_ms_quiet"].as_f64().unwrap_or(f64::NAN),
            row["stream_itl_max_ms_quiet"].as_f64().unwrap_or(f64::NAN),
            row["stream_itl_p50_ms_loading"].as_f64().unwrap_or(f64::NAN),
            row["stream_itl_max_ms_loading"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
