//! `modu bench`: llama-bench-style throughput measurements, so modu's numbers can be put next to
//! llama.cpp's row for row (`bench/compare.sh` does exactly that).
//!
//! Tests, each run once to warm up (page in the mmapped weights, grow allocations) and then
//! `-r` times:
//!
//! * `ppN` (prefill): one `forward` of N random token ids into a fresh KV cache, logits for the
//!   last position only — the prompt-processing path, dominated by matrix × matrix work.
//! * `tgN` (decode): a 1-token prompt (untimed), then N single-token forwards, each fed the
//!   greedy (argmax) pick of the previous one — the generation path, bound by reading every
//!   weight once per token. Rows also show the achieved weight-read bandwidth, and its share of
//!   the machine's read bandwidth when that is known (`--membw` or `--membw-gbs`): that share
//!   says how far decode is from its hardware limit, which tok/s alone cannot.
//! * `ttftN` (`--ttft`): a fresh cache, an N-token prompt and the greedy first token, in ms —
//!   what an interactive user waits for.
//!
//! Random token ids are used (as llama-bench does) because speed does not depend on what the
//! text says, and random ids need no tokenizer round trip that would differ between engines.

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use modu_engine::{load_model, BatchSeq, KvCache, Logits, Model};
use modu_gguf::GgufFile;
use serde_json::{json, Value};

#[derive(clap::Subcommand)]
pub enum BenchTarget {
    /// Load-test an OpenAI-compatible server (modu's own in-process, or --url) with concurrent
    /// streaming clients: aggregate tok/s, TTFT and inter-token latency percentiles.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Register many random LoRA modules at run time while a stream runs: load latency,
    /// resident memory against file sizes, and the stream's inter-token latency.
    Modules(crate::bench_serve::ModulesBenchArgs),
    /// Single-stream decode with and without speculative decoding (`--spec ngram`) on a prompt
    /// set of answers that copy from their prompt and of free chat, English and Korean:
    /// tok/s, ratio and draft acceptance per workload (outputs checked identical).
    Spec(crate::bench_spec::SpecBenchArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
    /// Model: a GGUF path, a known name or hf: source (default: qwen2.5-coder-0.5b-instruct;
    /// with --membw and no -m only the bandwidth is measured).
    #[arg(short, long)]
    pub model: Option<String>,
    /// Prompt lengths of the prefill (ppN) tests, comma-separated; 0 = none.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generated tokens of the decode (tgN) tests, comma-separated; 0 = none.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Decode tests run this many sequences in lockstep (one weight pass per step for all of
    /// them, as continuous batching does; llama-batched-bench's `-npl`); tok/s counts every
    /// sequence's tokens.
    #[arg(short = 'b', long = "batch", default_value_t = 1)]
    pub batch: usize,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Timed repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Also time the first token after a prompt of this many tokens (default 16), in ms.
    #[arg(long, num_args = 0..=1, default_missing_value = "16", value_name = "N")]
    pub ttft: Option<usize>,
    /// Measure the machine's memory read bandwidth (with the same thread count).
    #[arg(long)]
    pub membw: bool,
    /// Memory read bandwidth in GB/s to relate decode rows to (instead of measuring it).
    #[arg(long, value_name = "GBS", conflicts_with = "membw")]
    pub membw_gbs: Option<f64>,
    /// Skip the warm-up run of each test.
    #[arg(long)]
    pub no_warmup: bool,
    /// Seed of the random prompt token ids.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print a JSON array (one object per test, llama-bench's field names) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What the table and the JSON say about the model.
struct ModelDesc {
    filename: String,
    /// `"{arch} {size label} {file type}"`, the shape of llama-bench's model column.
    model_type: String,
    /// Bytes of all tensors.
    size: u64,
    n_params: u64,
    /// Weight bytes one decoded token reads (see [`weight_bytes_per_token`]).
    bytes_per_token: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Prefill,
    Decode,
    Ttft,
}

struct TestResult {
    kind: Kind,
    n: usize,
    /// Sequences decoded together (1 outside batched decode tests).
    batch: usize,
    samples_ns: Vec<u64>,
}

impl TestResult {
    fn name(&self) -> String {
        match self.kind {
            Kind::Prefill => format!("pp{}", self.n),
            Kind::Decode if self.batch > 1 => format!("tg{}x{}", self.n, self.batch),
            Kind::Decode => format!("tg{}", self.n),
            Kind::Ttft => format!("ttft{}", self.n),
        }
    }
    /// Tokens timed per sample (TTFT: the prompt tokens).
    fn samples_ts(&self) -> Vec<f64> {
        self.samples_ns
            .iter()
            .map(|&ns| (self.n * self.batch) as f64 * 1e9 / ns.max(1) as f64)
            .collect()
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let threads = match a.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // A pool of our own (not the global one) so -t means exactly this many workers for every
    // test and for the bandwidth probe; the kernels' rayon calls run on it under `install`.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the thread pool")?;
    let rss_baseline = proc_status_kib("VmRSS").map(|k| k * 1024);

    let membw = if a.membw {
        let m = measure_membw(&pool, threads);
        if !a.json {
            println!(
                "memory read bandwidth: {:.2} GB/s (best of {} passes over {} GiB, {} threads)",
                m.best_gbs(),
                m.samples_gbs.len(),
                MEMBW_BYTES >> 30,
                threads
            );
        }
        Some(m)
    } else {
        None
    };
    let membw_gbs = membw.as_ref().map(|m| m.best_gbs()).or(a.membw_gbs);
    if membw.is_some() {
        // The probe's 1 GiB buffer is gone, but VmHWM remembers it; reset the peak so the model
        // tests' peak RSS is their own (Linux: writing 5 to clear_refs resets VmHWM).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    let mut out: Vec<Value> = Vec::new();
    if let Some(m) = &membw {
        out.push(json!({
            "test": "membw",
            "n_threads": threads,
            "buffer_bytes": MEMBW_BYTES,
            "best_gbs": m.best_gbs(),
            "avg_gbs": mean_sd(&m.samples_gbs).0,
            "samples_gbs": m.samples_gbs,
        }));
    }

    let model_spec = match (&a.model, a.membw) {
        (Some(m), _) => Some(m.clone()),
        (None, false) => Some("qwen2.5-coder-0.5b-instruct".to_string()),
        (None, true) => None,
    };
    if let Some(spec) = model_spec {
        let path = crate::pull::resolve_with_progress(&spec)?;
        let file = crate::run::open_model(&path.to_string_lossy())?;
        let desc = describe(&file, &path);
        let model = load_model(file.clone()).context("loading the model")?;
        let mut tests: Vec<(Kind, usize)> = Vec::new();
        tests.extend(
            a.n_prompt
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| (Kind::Prefill, n)),
        );
        tests.extend(
            a.n_gen
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| (Kind::Decode, n)),
        );
        if let Some(n) = a.ttft {
            if n == 0 {
                bail!("--ttft needs a prompt of at least 1 token");
            }
            tests.push((Kind::Ttft, n));
        }
        let show_bw = membw_gbs.is_some();
        if !a.json {
            print_header(show_bw);
        }
        let mut rng = SplitMix(a.seed);
        for (kind, n) in tests {
            let samples_ns = pool.install(|| {
                run_test(
                    model.as_ref(),
                    kind,
                    n,
                    a.batch,
                    a.repetitions,
                    !a.no_warmup,
                    &mut rng,
                )
            })?;
            let r = TestResult {
                kind,
                n,
                batch: if kind == Kind::Decode { a.batch } else { 1 },
                samples_ns,
            };
            if a.json {
                out.push(test_json(&r, &desc, threads, membw_gbs, rss_baseline));
            } else {
                print_row(&r, &desc, threads, membw_gbs, show_bw);
            }
        }
    }

    let peak = proc_status_kib("VmHWM");
    if a.json {
        println!("{}", serde_json::to_string_pretty(&Value::Array(out))?);
    } else {
        println!();
    }
    match peak {
        // In JSON mode stdout is the array alone; the note goes to stderr.
        Some(k) if a.json => eprintln!("peak RSS: {:.1} MiB (VmHWM)", k as f64 / 1024.0),
        Some(k) => println!("peak RSS: {:.1} MiB (VmHWM)", k as f64 / 1024.0),
        None => eprintln!("peak RSS: unknown (no /proc/self/status)"),
    }
    let kernels = format!(
        "kernels: {} on {} (MODU_KERNELS forces a lower level)",
        modu_kernels::simd_level().name(),
        cpu_info()
    );
    if a.json {
        eprintln!("{kernels}");
    } else {
        println!("{kernels}");
    }
    Ok(())
}

/// Run one test: a warm-up (unless disabled) and `reps` timed runs; returns the timed ns.
fn run_test(
    model: &dyn Model,
    kind: Kind,
    n: usize,
    batch: usize,
    reps: usize,
    warmup: bool,
    rng: &mut SplitMix,
) -> Result<Vec<u64>> {
    let n_vocab = model.info().n_vocab;
    let once = |rng: &mut SplitMix| -> Result<u64> {
        match kind {
            Kind::Prefill | Kind::Ttft => {
                let tokens: Vec<u32> = (0..n).map(|_| rng.below(n_vocab)).collect();
                let mut cache = model.new_cache(n);
                let t = Instant::now();
                let logits = model.forward(&tokens, &mut cache, Logits::Last)?;
                if kind == Kind::Ttft {
                    std::hint::black_box(argmax(&logits, n_vocab));
                }
                Ok(t.elapsed().as_nanos() as u64)
            }
            Kind::Decode if batch > 1 => {
                let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_cache(n + 1)).collect();
                let mut toks: Vec<u32> = (0..batch).map(|_| rng.below(n_vocab)).collect();
                let step = |toks: &mut Vec<u32>, caches: &mut Vec<KvCache>| -> Result<()> {
                    let inputs: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
                    let mut seqs: Vec<BatchSeq<'_>> = inputs
                        .iter()
                        .zip(caches.iter_mut())
                        .map(|(t, cache)| BatchSeq { tokens: t, cache })
                        .collect();
                    let logits = model.forward_batch(&mut seqs)?;
                    for (t, l) in toks.iter_mut().zip(&logits) {
                        *t = argmax(l, n_vocab);
                    }
                    Ok(())
                };
                step(&mut toks, &mut caches)?;
                let t = Instant::now();
                for _ in 0..n {
                    step(&mut toks, &mut caches)?;
                }
                Ok(t.elapsed().as_nanos() as u64)
            }
            Kind::Decode => {
                let mut cache = model.new_cache(n + 1);
                let logits = model.forward(&[rng.below(n_vocab)], &mut cache, Logits::Last)?;
                let mut tok = argmax(&logits, n_vocab);
                let t = Instant::now();
                for _ in 0..n {
                    let logits = model.forward(&[tok], &mut cache, Logits::Last)?;
                    tok = argmax(&logits, n_vocab);
                }
                Ok(t.elapsed().as_nanos() as u64)
            }
        }
    };
    if warmup {
        once(rng)?;
    }
    (0..reps).map(|_| once(rng)).collect()
}

/// Greedy pick from the last row of `logits`.
fn argmax(logits: &[f32], n_vocab: usize) -> u32 {
    let last = &logits[logits.len().saturating_sub(n_vocab)..];
    let mut best = 0;
    for (i, &v) in last.iter().enumerate() {
        if v > last[best] {
            best = i;
        }
    }
    best as u32
}

/// SplitMix64: a tiny seeded generator for prompt token ids (no dependency for 10 lines).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> u32 {
        (self.next() % n.max(1) as u64) as u32
    }
}

fn describe(file: &GgufFile, path: &Path) -> ModelDesc {
    let size: u64 = file.tensors().iter().map(|t| t.n_bytes()).sum();
    let n_params: u64 = file.tensors().iter().map(|t| t.n_elements()).sum();
    let arch = file.architecture().unwrap_or("?");
    let label = file
        .get_str("general.size_label")
        .map(str::to_string)
        .unwrap_or_else(|| params_label(n_params));
    let ftype = file
        .get_u64("general.file_type")
        .and_then(file_type_name)
        .map(str::to_string)
        .unwrap_or_else(|| "?".to_string());
    ModelDesc {
        filename: path.display().to_string(),
        model_type: format!("{arch} {label} {ftype}"),
        size,
        n_params,
        bytes_per_token: weight_bytes_per_token(file),
    }
}

/// Bytes of weights one decoded token reads: every 2-D tensor is a matmul weight read in full,
/// except the token embedding, of which one row is read — unless there is no `output.weight`,
/// in which case the embedding doubles as the (fully read) output matrix. Norms and biases
/// (1-D) are too small to matter. This is the numerator of decode's bandwidth bound.
fn weight_bytes_per_token(file: &GgufFile) -> u64 {
    let tied = file.tensor_info("output.weight").is_none();
    file.tensors()
        .iter()
        .filter(|t| t.dims.len() == 2)
        .map(|t| {
            if t.name == "token_embd.weight" {
                let row = t.n_bytes() / t.dims[1].max(1);
                if tied {
                    t.n_bytes() + row
                } else {
                    row
                }
            } else {
                t.n_bytes()
            }
        })
        .sum()
}

/// Names of `general.file_type` values (the GGUF convention for "mostly this quant type").
fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

fn params_label(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.1}B", n as f64 / 1e9)
    } else {
        format!("{}M", n / 1_000_000)
    }
}

fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

/// Mean and sample standard deviation (0 for a single sample).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

const COLS: [(&str, usize, bool); 7] = [
    ("model", 30, false),
    ("size", 10, true),
    ("params", 10, true),
    ("backend", 7, false),
    ("threads", 7, true),
    ("test", 8, true),
    ("t/s", 20, true),
];

fn print_header(show_bw: bool) {
    let mut h = String::from("|");
    let mut s = String::from("|");
    for (name, w, right) in COLS {
        if right {
            h += &format!(" {name:>w$} |");
            s += &format!(" {}: |", "-".repeat(w - 1));
        } else {
            h += &format!(" {name:<w$} |");
            s += &format!(" {} |", "-".repeat(w));
        }
    }
    h += &format!(" {:>6} |", "GB/s");
    s += &format!(" {}: |", "-".repeat(5));
    if show_bw {
        h += &format!(" {:>5} |", "% bw");
        s += &format!(" {}: |", "-".repeat(4));
    }
    println!("{h}\n{s}");
}

fn print_row(r: &TestResult, d: &ModelDesc, threads: usize, membw: Option<f64>, show_bw: bool) {
    let speed = if r.kind == Kind::Ttft {
        let ms: Vec<f64> = r.samples_ns.iter().map(|&ns| ns as f64 / 1e6).collect();
        let (m, sd) = mean_sd(&ms);
        format!("{m:.2} ± {sd:.2} ms")
    } else {
        let (m, sd) = mean_sd(&r.samples_ts());
        format!("{m:.2} ± {sd:.2}")
    };
    let mut model = d.model_type.clone();
    if model.chars().count() > 30 {
        model = model.chars().take(30).collect();
    }
    let mut line = format!(
        "| {model:<30} | {:>10} | {:>10} | {:<7} | {threads:>7} | {:>8} | {speed:>20} |",
        human_size(d.size),
        human_params(d.n_params),
        "CPU",
        r.name(),
    );
    let (gbs, share) = decode_bandwidth(r, d, membw);
    line += &format!(" {:>6} |", gbs.map_or(String::new(), |g| format!("{g:.2}")));
    if show_bw {
        line += &format!(
            " {:>5} |",
            share.map_or(String::new(), |s| format!("{:.0}%", s * 100.0))
        );
    }
    println!("{line}");
}

/// Decode rows: achieved weight-read GB/s and its share of the machine's bandwidth (a batched
/// step reads the weights once for all its sequences).
fn decode_bandwidth(
    r: &TestResult,
    d: &ModelDesc,
    membw: Option<f64>,
) -> (Option<f64>, Option<f64>) {
    if r.kind != Kind::Decode {
        return (None, None);
    }
    let (ts, _) = mean_sd(&r.samples_ts());
    let gbs = d.bytes_per_token as f64 * ts / r.batch as f64 / 1e9;
    (Some(gbs), membw.filter(|&m| m > 0.0).map(|m| gbs / m))
}

fn test_json(
    r: &TestResult,
    d: &ModelDesc,
    threads: usize,
    membw: Option<f64>,
    rss_baseline: Option<u64>,
) -> Value {
    let ns: Vec<f64> = r.samples_ns.iter().map(|&v| v as f64).collect();
    let (avg_ns, sd_ns) = mean_sd(&ns);
    let ts = r.samples_ts();
    let (avg_ts, sd_ts) = mean_sd(&ts);
    let (n_prompt, n_gen) = match r.kind {
        Kind::Prefill => (r.n, 0),
        Kind::Decode => (0, r.n),
        Kind::Ttft => (r.n, 1),
    };
    let mut o = json!({
        "build": format!("modu {}", env!("CARGO_PKG_VERSION")),
        "backends": "CPU",
        "cpu_info": cpu_info(),
        "kernels": modu_kernels::simd_level().name(),
        "model_filename": d.filename,
        "model_type": d.model_type,
        "model_size": d.size,
        "model_n_params": d.n_params,
        "n_batch": n_prompt.max(1),
        "n_threads": threads,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_parallel": r.batch,
        "test": r.name(),
        "test_time": iso8601_now(),
        "avg_ns": avg_ns.round() as u64,
        "stddev_ns": sd_ns.round() as u64,
        "avg_ts": avg_ts,
        "stddev_ts": sd_ts,
        "samples_ns": r.samples_ns,
        "samples_ts": ts,
        "peak_rss_bytes": proc_status_kib("VmHWM").map(|k| k * 1024),
        "rss_baseline_bytes": rss_baseline,
    });
    let m = o.as_object_mut().expect("object");
    if r.kind == Kind::Ttft {
        m.insert("avg_ms".into(), json!(avg_ns / 1e6));
        m.insert("stddev_ms".into(), json!(sd_ns / 1e6));
    }
    if r.kind == Kind::Decode {
        let (gbs, share) = decode_bandwidth(r, d, membw);
        m.insert("weight_bytes_per_token".into(), json!(d.bytes_per_token));
        m.insert("achieved_gbs".into(), json!(gbs));
        m.insert("membw_gbs".into(), json!(membw));
        m.insert("membw_share".into(), json!(share));
    }
    o
}

/// A `kB` field of /proc/self/status (VmHWM = peak resident set, VmRSS = current).
fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn cpu_info() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                Some(
                    l.strip_prefix("model name")?
                        .split_once(':')?
                        .1
                        .trim()
                        .to_string(),
                )
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days; no date crate for one timestamp).
fn iso8601_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Size of the bandwidth probe's buffer: far larger than any cache, so every pass streams
/// from DRAM.
const MEMBW_BYTES: usize = 1 << 30;
const MEMBW_PASSES: usize = 10;

struct Membw {
    samples_gbs: Vec<f64>,
}

impl Membw {
    fn best_gbs(&self) -> f64 {
        self.samples_gbs.iter().copied().fold(0.0, f64::max)
    }
}

/// Read bandwidth with `threads` workers: each sums its own contiguous slice of a 1 GiB buffer;
/// the best of several passes is the number (the machine is shared, so the best pass is the
/// closest to what the hardware can do). Decode reads weights the same way — streaming,
/// every byte once — so this is the ceiling decode's GB/s is measured against.
fn measure_membw(pool: &rayon::ThreadPool, threads: usize) -> Membw {
    let n = MEMBW_BYTES / 8;
    let part = n.div_ceil(threads);
    let mut buf: Vec<u64> = vec![0; n];
    // Write every page from the thread that will read it: zero pages from calloc would all
    // map to one shared page and read from cache, not DRAM.
    pool.install(|| {
        use rayon::prelude::*;
        buf.par_chunks_mut(part).enumerate().for_each(|(i, c)| {
            for (j, x) in c.iter_mut().enumerate() {
                *x = (i as u64) << 32 | j as u64;
            }
        })
    });
    let parts: Vec<&[u64]> = buf.chunks(part).collect();
    let pass = || {
        let t = Instant::now();
        // broadcast: exactly one slice per worker, all running at once.
        let sums = pool.broadcast(|ctx| parts.get(ctx.index()).map_or(0, |p| sum_u64(p)));
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        (n * 8) as f64 / dt / 1e9
    };
    pass(); // warm-up: TLB, page tables, frequency ramp
    Membw {
        samples_gbs: (0..MEMBW_PASSES).map(|_| pass()).collect(),
    }
}

/// Wrapping sum with eight independent lanes: integer adds reassociate freely, so the compiler
/// vectorizes this into wide loads and adds; the loop then runs at memory speed.
#[inline(always)]
fn sum_lanes(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, &b| a.wrapping_add(b))
}

fn sum_u64(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { sum_u64_avx2(v) };
        }
    }
    sum_lanes(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_u64_avx2(v: &[u64]) -> u64 {
    sum_lanes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((sd - 1.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[5.0]), (5.0, 0.0));
    }

    #[test]
    fn lane_sum_matches_plain_sum() {
        let v: Vec<u64> = (0..1003).map(|i| i * 7 + 1).collect();
        assert_eq!(sum_u64(&v), v.iter().sum::<u64>());
    }

    #[test]
    fn argmax_takes_last_row() {
        assert_eq!(argmax(&[9.0, 0.0, 0.0, 1.0, 3.0, 2.0], 3), 1);
    }

    #[test]
    fn timestamp_shape() {
        let t = iso8601_now();
        assert_eq!(t.len(), 20);
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
