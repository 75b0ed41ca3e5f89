//! `modu module …` (LoRA adapters: info, merge, export into a base model) and the `--module`
//! option of `modu run` / `modu chat`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use modu_engine::lora::{merge, LoraAdapter};
use modu_engine::{BaseShapes, Model, ModuleRef};

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Describe an adapter: format, base architecture, rank, alpha, targets, tensors, bytes.
    Info(InfoArgs),
    /// Merge adapters into one GGUF-LoRA adapter.
    Merge(MergeArgs),
    /// Fold an adapter into a base model, writing a standalone GGUF model.
    Export(ExportArgs),
    /// The modules a running `modu serve` has registered (GET /v1/modules): resident or
    /// evicted, bytes, rank, targets, requests served.
    List(ListArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key to send (`Authorization: Bearer KEY`), if the server has keys.
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// Print the server's JSON as is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// A .gguf LoRA adapter or a PEFT directory.
    pub path: PathBuf,
    /// Also list every adapted tensor.
    #[arg(long)]
    pub tensors: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Method {
    /// Weighted sum; exact (ranks are concatenated).
    Linear,
    /// TIES: trim to the largest `density` of each update, elect signs, average the agreeing
    /// entries; re-factored to `--rank` by truncated SVD.
    Ties,
    /// DARE: drop entries with probability `1 - density`, rescale, weighted sum; re-factored to
    /// `--rank` by truncated SVD.
    Dare,
}

#[derive(Args)]
pub struct MergeArgs {
    #[arg(long, value_enum, default_value = "linear")]
    pub method: Method,
    /// One weight per adapter, comma-separated (default: all 1).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Vec<f32>,
    /// Rank of the result for ties/dare (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Fraction of entries kept by ties/dare.
    #[arg(long, default_value_t = 0.5)]
    pub density: f32,
    /// Random seed (dare).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output .gguf adapter.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Adapters (.gguf or PEFT directories).
    #[arg(required = true, num_args = 2..)]
    pub adapters: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Base model (path, known name or hf: source).
    #[arg(long = "merge-into-base", value_name = "BASE")]
    pub base: String,
    /// Adapter (.gguf or PEFT directory), optionally `=SCALE`.
    pub adapter: String,
    /// Output .gguf model.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(cmd: ModuleCommand) -> Result<()> {
    match cmd {
        ModuleCommand::Info(a) => info(a),
        ModuleCommand::Merge(a) => merge_cmd(a),
        ModuleCommand::Export(a) => export(a),
        ModuleCommand::List(a) => list(a),
    }
}

fn list(a: ListArgs) -> Result<()> {
    let url = format!("{}/v1/modules", a.url.trim_end_matches('/'));
    let mut req = ureq::get(&url).timeout(std::time::Duration::from_secs(30));
    if let Some(k) = &a.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let body: serde_json::Value = match req.call() {
        Ok(r) => r
            .into_json()
            .with_context(|| format!("reading the answer of {url}"))?,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            bail!("{url} answered {code}: {}", text.trim())
        }
        Err(e) => bail!("cannot reach the server: {e} (is `modu serve` running there?)"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let data = body["data"].as_array().cloned().unwrap_or_default();
    println!(
        "base model: {}; {} module(s), {:.1} MiB resident, {} eviction(s)",
        body["base"].as_str().unwrap_or("?"),
        data.len(),
        body["resident_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        body["evictions"].as_u64().unwrap_or(0)
    );
    if data.is_empty() {
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:>9} {:>5} {:>9} {:>4} {:<28} path",
        "name", "resident", "MiB", "rank", "requests", "gen", "targets"
    );
    for m in &data {
        let targets: Vec<&str> = m["targets"]
            .as_array()
            .map(|t| t.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:>8} {:>9.2} {:>5} {:>9} {:>4} {:<28} {}",
            m["name"].as_str().unwrap_or("?"),
            if m["resident"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "evicted"
            },
            m["resident_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            m["rank"].as_u64().unwrap_or(0),
            m["requests"].as_u64().unwrap_or(0),
            m["generation"].as_u64().unwrap_or(0),
            targets.join(","),
            m["path"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `PATH[=SCALE]`: the scale is whatever follows the last `=` if it parses as a number.
pub fn parse_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((p, s)) = spec.rsplit_once('=') {
        if let Ok(v) = s.trim().parse::<f32>() {
            if !v.is_finite() {
                bail!("module scale in '{spec}' must be a finite number");
            }
            if p.is_empty() {
                bail!("--module '{spec}': no path before '='");
            }
            return Ok((PathBuf::from(p), v));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Load `--module PATH[=SCALE]` options against a model (validated against its shapes).
pub fn load_modules(specs: &[String], model: &dyn Model) -> Result<Vec<ModuleRef>> {
    specs
        .iter()
        .map(|s| {
            let (path, scale) = parse_spec(s)?;
            let ad = LoraAdapter::open(&path, Some(model.module_shapes()))
                .with_context(|| format!("loading module {}", path.display()))?;
            Ok((Arc::new(ad), scale))
        })
        .collect()
}

fn info(a: InfoArgs) -> Result<()> {
    let ad = LoraAdapter::open(&a.path, None)
        .with_context(|| format!("reading adapter {}", a.path.display()))?;
    let targets: Vec<&str> = ad.targets().iter().map(|p| p.gguf_name()).collect();
    let layers: Vec<usize> = {
        let mut v: Vec<usize> = ad.iter().map(|(l, _, _)| l).collect();
        v.dedup();
        v
    };
    if a.json {
        let tensors: Vec<serde_json::Value> = ad
            .iter()
            .map(|(l, p, t)| {
                serde_json::json!({"layer": l, "proj": p.gguf_name(), "rank": t.rank,
                    "n_in": t.n_in, "n_out": t.n_out})
            })
            .collect();
        let v = serde_json::json!({
            "name": ad.name(),
            "format": ad.format().to_string(),
            "arch": ad.arch(),
            "base_model": ad.base_model(),
            "rank": ad.rank(),
            "alpha": ad.alpha(),
            "use_rslora": ad.use_rslora(),
            "targets": targets,
            "layers": layers.len(),
            "tensors": ad.n_tensors(),
            "resident_bytes": ad.resident_bytes(),
            "tensor_list": if a.tensors { serde_json::Value::Array(tensors) } else { serde_json::Value::Null },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("name:        {}", ad.name());
    println!("format:      {}", ad.format());
    println!(
        "base arch:   {}",
        ad.arch()
            .unwrap_or("(not recorded; PEFT adapters are checked against the base's shapes)")
    );
    if let Some(b) = ad.base_model() {
        println!("base model:  {b}");
    }
    let s = ad.iter().next().map(|(_, _, t)| t.effective_scale(1.0));
    println!(
        "rank:        {}\nalpha:       {}{}",
        ad.rank(),
        ad.alpha(),
        s.map(|s| format!(" (update scale at --module PATH=1: {s})"))
            .unwrap_or_default()
    );
    if ad.use_rslora() {
        println!("rslora:      yes (alpha / sqrt(rank))");
    }
    println!("targets:     {}", targets.join(" "));
    println!(
        "layers:      {} ({}..={})",
        layers.len(),
        layers.first().copied().unwrap_or(0),
        layers.last().copied().unwrap_or(0)
    );
    println!("tensors:     {} A/B pairs", ad.n_tensors());
    println!(
        "bytes:       {} ({:.1} MB resident, f16)",
        ad.resident_bytes(),
        ad.resident_bytes() as f64 / 1e6
    );
    if a.tensors {
        for (l, p, t) in ad.iter() {
            println!(
                "  blk.{l}.{:<12} rank {:>3}  A {}x{}  B {}x{}",
                p.gguf_name(),
                t.rank,
                t.rank,
                t.n_in,
                t.n_out,
                t.rank
            );
        }
    }
    Ok(())
}

fn open_all(paths: &[PathBuf]) -> Result<Vec<LoraAdapter>> {
    paths
        .iter()
        .map(|p| {
            LoraAdapter::open(p, None).with_context(|| format!("reading adapter {}", p.display()))
        })
        .collect()
}

fn merge_cmd(a: MergeArgs) -> Result<()> {
    let ads = open_all(&a.adapters)?;
    let weights = if a.weights.is_empty() {
        vec![1.0; ads.len()]
    } else {
        a.weights.clone()
    };
    if weights.len() != ads.len() {
        bail!(
            "--weights has {} values for {} adapters",
            weights.len(),
            ads.len()
        );
    }
    let arch = ads
        .iter()
        .find_map(|x| x.arch().map(str::to_string))
        .unwrap_or_else(|| "llama".into());
    let refs: Vec<&LoraAdapter> = ads.iter().collect();
    let name = a
        .output
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("merged")
        .to_string();
    let merged = match a.method {
        Method::Linear => merge::linear(&refs, &weights, &name)?,
        Method::Ties | Method::Dare => {
            let rank = a
                .rank
                .unwrap_or_else(|| refs.iter().map(|x| x.rank()).max().unwrap_or(8));
            let how = match a.method {
                Method::Ties => merge::Dense::Ties { density: a.density },
                _ => merge::Dense::Dare {
                    density: a.density,
                    seed: a.seed,
                },
            };
            merge::dense(&refs, &weights, how, rank, &name)?
        }
    };
    merged
        .to_gguf(&arch)?
        .write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {}: rank {}, {} tensors, {:.1} MB",
        a.output.display(),
        merged.rank(),
        merged.n_tensors(),
        merged.resident_bytes() as f64 / 1e6
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let file = crate::run::open_gguf(&a.base)?;
    let base = BaseShapes::from_gguf(&file)?;
    let (path, scale) = parse_spec(&a.adapter)?;
    let ad = LoraAdapter::open(&path, Some(&base))
        .with_context(|| format!("reading adapter {}", path.display()))?;
    let report = merge::merge_into_base(&file, &ad, scale)?;
    report
        .writer
        .write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    for (ty_from, ty_to, n) in &report.conversions {
        eprintln!("  {n:>4} weights {ty_from} -> {ty_to}");
    }
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
