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
    /// Running-batch size of the in-process server (default: the largest client count).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Print JSON (one object per level) instead of a table.
    #[arg(long)]
    pub json: bool,
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

/// Send one streaming completion and time its chunks.
fn one_request(
    agent: &ureq::Agent,
    base: &str,
    model: &str,
    prompt: &str,
    n: usize,
) -> Result<Sample> {
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let resp = agent
        .post(&format!("{base}/v1/completions"))
        .send_json(body)
        .map_err(|e| match e {
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

fn run_level(base: &str, model: &str, a: &ServeBenchArgs, clients: usize) -> Level {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(600))
        .build();
    let start = Instant::now();
    let results: Vec<Vec<Result<Sample>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let agent = agent.clone();
                s.spawn(move || {
                    (0..a.rounds)
                        .map(|r| one_request(&agent, base, model, &prompt_for(c, r), a.n_gen))
                        .collect()
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
        ttft: Vec::new(),
        itl: Vec::new(),
        errors: Vec::new(),
    };
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
    let base = match &a.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let l = load(&a.model)?;
            let (id, aliases) =
                modu_server::model_names(&a.model.model, l.model.info().name.as_deref());
            let config = modu_server::ServeConfig {
                host: "127.0.0.1".into(),
                port: 0,
                parallel: a.parallel.unwrap_or(max_clients).max(1),
                max_queue: max_clients * 2,
                ctx: l.ctx,
                ..Default::default()
            };
            let served = modu_server::ServedModel {
                model: l.model,
                tokenizer: l.tokenizer,
                file: l.file,
                id,
                aliases,
            };
            let h = modu_server::start(served, config, false).context("starting the server")?;
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
            let v: Value = agent
                .get(&format!("{base}/v1/models"))
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
    one_request(&agent, &base, &model, "Hello", 4)
        .with_context(|| format!("warm-up request to {base}"))?;
    if !a.json {
        println!(
            "target: {target}; {} tokens per request, {} round(s) per client",
            a.n_gen, a.rounds
        );
        println!(
            "| clients | requests | tokens | wall s | agg tok/s | per-stream tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let mut rows = Vec::new();
    for &c in &a.clients {
        let mut l = run_level(&base, &model, &a, c);
        let agg = l.tokens as f64 / l.wall.as_secs_f64();
        let itl50 = percentile(&mut l.itl, 50.0);
        let row = json!({
            "target": target,
            "clients": l.clients,
            "requests": l.requests,
            "errors": l.errors.len(),
            "n_gen": a.n_gen,
            "tokens": l.tokens,
            "wall_s": l.wall.as_secs_f64(),
            "agg_tps": agg,
            "per_stream_tps": 1e3 / itl50,
            "ttft_p50_ms": percentile(&mut l.ttft, 50.0),
            "ttft_p99_ms": percentile(&mut l.ttft, 99.0),
            "itl_p50_ms": itl50,
            "itl_p99_ms": percentile(&mut l.itl, 99.0),
        });
        if a.json {
            rows.push(row);
        } else {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
                l.clients,
                l.requests,
                l.tokens,
                l.wall.as_secs_f64(),
                agg,
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
    }
    if let Some(h) = own {
        h.stop().context("stopping the server")?;
    }
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
