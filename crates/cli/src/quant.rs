//! `modu quantize`, `modu eval ppl|kld`, `modu imatrix`: the lightweighting toolchain.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use modu_engine::eval::{self, KldSummary, PplSummary};
use modu_engine::hf::{export_hf, HfDtype};
use modu_engine::imatrix::{read_imatrix, write_imatrix, ImatrixCollector};
use modu_engine::layers::observe::set_observer;
use modu_engine::quantize::{parse_keep, quantize_file, quantize_hf_dir, QuantizeOptions, Recipe};
use modu_engine::{load_model, Model, Tokenizer};
use modu_gguf::GgufFile;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Input: a GGUF (any supported type, a path, known name or hf: source) or a Hugging Face
    /// model directory (config.json, tokenizer.json, *.safetensors in f32/f16/bf16).
    pub input: String,
    /// Output GGUF (written through a temporary file, renamed when complete).
    pub output: PathBuf,
    /// Target: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, or a mixture Q3_K_M,
    /// Q4_K_S, Q4_K_M, Q5_K_M.
    #[arg(long = "type", short = 'q')]
    pub ty: String,
    /// Importance matrix from `modu imatrix`.
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Override a tensor's type: NAME=TYPE (NAME may use `*`), repeatable.
    #[arg(long)]
    pub keep: Vec<String>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

fn set_threads(t: Option<usize>) -> Result<()> {
    if let Some(t) = t {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    Ok(())
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    set_threads(a.threads)?;
    let recipe = Recipe::parse(&a.ty)?;
    let as_path = PathBuf::from(&a.input);
    let input = if as_path.is_dir() {
        as_path
    } else {
        crate::pull::resolve_with_progress(&a.input)?
    };
    let mut opts = QuantizeOptions::default();
    for k in &a.keep {
        opts.keep.push(parse_keep(k)?);
    }
    if let Some(p) = &a.imatrix {
        opts.imatrix = Some(read_imatrix(p).map_err(anyhow::Error::msg)?);
    }
    let pb = bar(
        0,
        "{spinner} [{elapsed_precise}] [{bar:40}] {percent:>3}% ({eta} left)",
    );
    let t0 = std::time::Instant::now();
    let progress = |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    };
    let rep = if input.is_dir() {
        quantize_hf_dir(&input, &a.output, recipe, &opts, &progress)
    } else {
        quantize_file(&input, &a.output, recipe, &opts, &progress)
    }
    .with_context(|| format!("quantizing {} to {}", input.display(), a.output.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "{} tensors, {:.1} MB -> {:.1} MB in {:.1}s{}",
        rep.n_tensors,
        rep.in_bytes as f64 / 1e6,
        rep.out_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        if opts.imatrix.is_some() {
            format!(", {} tensors used the importance matrix", rep.with_imatrix)
        } else {
            String::new()
        }
    );
    for (t, n) in rep.by_type {
        eprintln!("  {t:>6}: {n} tensors");
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Perplexity over non-overlapping windows (second half of each window scored).
    Ppl(PplArgs),
    /// KL divergence of a model from a base model (llama-perplexity --kl-divergence style).
    Kld(KldArgs),
    /// KL divergence of a base model with LoRA modules applied from the base alone.
    Module(ModuleEvalArgs),
}

#[derive(Args)]
pub struct EvalCommon {
    /// Text file to evaluate on.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

#[derive(Args)]
pub struct PplArgs {
    /// Model: a GGUF path, a known name or hf: source.
    #[arg(short = 'm', long)]
    pub model: String,
    #[command(flatten)]
    pub common: EvalCommon,
}

#[derive(Args)]
pub struct KldArgs {
    /// Reference model (e.g. F16).
    #[arg(long)]
    pub base: String,
    /// Model to compare (e.g. a quantization of the base).
    #[arg(short = 'm', long)]
    pub model: String,
    #[command(flatten)]
    pub common: EvalCommon,
}

#[derive(Args)]
pub struct ModuleEvalArgs {
    /// Base model: a GGUF path, a known name or hf: source.
    #[arg(short = 'm', long)]
    pub model: String,
    /// LoRA module (a .gguf adapter or a PEFT directory), optionally PATH=SCALE; repeatable,
    /// applied in order.
    #[arg(long = "module", value_name = "PATH[=SCALE]", required = true)]
    pub modules: Vec<String>,
    /// Multiplies every module's scale.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f32,
    #[command(flatten)]
    pub common: EvalCommon,
}

fn load(spec: &str) -> Result<(Box<dyn Model>, Tokenizer, Arc<GgufFile>)> {
    let file = crate::run::open_model(spec)?;
    let tok = Tokenizer::from_gguf(&file).context("building the tokenizer")?;
    let model = load_model(file.clone()).context("loading the model")?;
    Ok((model, tok, file))
}

fn read_text(p: &PathBuf) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {} (UTF-8 text)", p.display()))
}

fn window_bar() -> ProgressBar {
    bar(
        0,
        "{spinner} [{elapsed_precise}] window {pos}/{len} ({eta} left)",
    )
}

/// Run an evaluation with a window progress bar fed by its `progress(done, total)` callback.
fn with_window_bar<T>(
    f: impl FnOnce(&dyn Fn(usize, usize)) -> Result<T, eval::EvalError>,
) -> Result<T> {
    let pb = window_bar();
    let r = f(&|d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
    });
    pb.finish_and_clear();
    Ok(r?)
}

pub fn eval(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Ppl(a) => {
            set_threads(a.common.threads)?;
            let (model, tok, _) = load(&a.model)?;
            let text = read_text(&a.common.file)?;
            let s = with_window_bar(|progress| {
                eval::perplexity(
                    model.as_ref(),
                    &tok,
                    &text,
                    a.common.ctx,
                    a.common.chunks,
                    progress,
                )
            })?;
            print_ppl(&s, a.common.json)
        }
        EvalCmd::Kld(a) => {
            set_threads(a.common.threads)?;
            let (base, tok, _) = load(&a.base)?;
            let (quant, qtok, _) = load(&a.model)?;
            if qtok.vocab_size() != tok.vocab_size() {
                bail!(
                    "the models' vocabularies differ ({} vs {} tokens)",
                    tok.vocab_size(),
                    qtok.vocab_size()
                );
            }
            let text = read_text(&a.common.file)?;
            let s = with_window_bar(|progress| {
                eval::kl_divergence(
                    base.as_ref(),
                    quant.as_ref(),
                    &tok,
                    &text,
                    a.common.ctx,
                    a.common.chunks,
                    progress,
                )
            })?;
            print_kld(&s, a.common.json)
        }
        EvalCmd::Module(a) => {
            set_threads(a.common.threads)?;
            if !a.scale.is_finite() {
                bail!("--scale must be a finite number");
            }
            let (base, tok, _) = load(&a.model)?;
            let mut modules = crate::module::load_modules(&a.modules, base.as_ref())?;
            for m in &mut modules {
                m.1 *= a.scale;
            }
            let text = read_text(&a.common.file)?;
            let s = with_window_bar(|progress| {
                eval::module_kl_divergence(
                    base.as_ref(),
                    &modules,
                    &tok,
                    &text,
                    a.common.ctx,
                    a.common.chunks,
                    progress,
                )
            })?;
            print_kld(&s, a.common.json)
        }
    }
}

fn print_ppl(s: &PplSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!("windows          {} x {} tokens", s.windows, s.ctx);
    println!("tokens scored    {}", s.tokens_scored);
    println!("bytes scored     {}", s.bytes_scored);
    println!("PPL              {:.4}", s.ppl);
    println!("NLL / token      {:.5} nats", s.nll_per_token);
    println!("bits / byte      {:.5}", s.bits_per_byte);
    Ok(())
}

fn print_kld(s: &KldSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!(
        "tokens scored    {}  ({} bytes)",
        s.tokens_scored, s.bytes_scored
    );
    println!(
        "PPL base         {:.4}   ({:.5} bits/byte)",
        s.ppl_base, s.bpb_base
    );
    println!(
        "PPL model        {:.4}   ({:.5} bits/byte)",
        s.ppl_quant, s.bpb_quant
    );
    println!("PPL ratio        {:.5}", s.ppl_ratio);
    println!("KLD mean         {:.6}", s.kld_mean);
    println!("KLD median       {:.6}", s.kld_median);
    println!("KLD p90          {:.6}", s.kld_p90);
    println!("KLD p99          {:.6}", s.kld_p99);
    println!("KLD max          {:.6}", s.kld_max);
    println!("KLD bits / byte  {:.6}", s.kld_bits_per_byte);
    println!("Δp mean          {:+.4} %", 100.0 * s.dp_mean);
    println!("Δp RMS           {:.4} %", 100.0 * s.dp_rms);
    println!("same top token   {:.3} %", s.same_top_pct);
    Ok(())
}

#[derive(Args)]
pub struct ImatrixArgs {
    /// Model: a GGUF path, a known name or hf: source.
    #[arg(short = 'm', long)]
    pub model: String,
    /// Calibration text.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Output file (GGUF: one F32 tensor of per-column mean x² per weight).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Window size in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Use at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn imatrix(a: ImatrixArgs) -> Result<()> {
    set_threads(a.threads)?;
    let (model, tok, _) = load(&a.model)?;
    let text = read_text(&a.file)?;
    let wins = eval::windows(&tok, &text, a.ctx, a.chunks)?;
    let col = Arc::new(ImatrixCollector::new());
    set_observer(Some(col.clone()));
    let pb = window_bar();
    pb.set_length(wins.len() as u64);
    let mut tokens = 0u64;
    for (i, w) in wins.iter().enumerate() {
        let r = eval::window_logits(model.as_ref(), w);
        if let Err(e) = r {
            set_observer(None);
            return Err(e.into());
        }
        tokens += w.len() as u64;
        pb.set_position(i as u64 + 1);
    }
    set_observer(None);
    pb.finish_and_clear();
    let means = col.means();
    let name = a
        .file
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_imatrix(&a.output, &means, wins.len() as u64, tokens, &name)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "{} weights, {} windows, {} tokens -> {}",
        means.len(),
        wins.len(),
        tokens,
        a.output.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ExportHfArgs {
    /// Model: a GGUF path, a known name or hf: source (llama, qwen2 or gemma3).
    pub model: String,
    /// Output directory (must not exist or be empty).
    pub output: PathBuf,
    /// Weight type: f16, bf16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Number of safetensors shards (more than 1 writes model.safetensors.index.json).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
}

pub fn export_hf_cmd(a: ExportHfArgs) -> Result<()> {
    let dtype = HfDtype::parse(&a.dtype)
        .with_context(|| format!("unknown --dtype `{}` (f16, bf16, f32)", a.dtype))?;
    let file = crate::run::open_gguf(&a.model)?;
    let t0 = std::time::Instant::now();
    export_hf(&file, &a.output, dtype, a.shards)
        .with_context(|| format!("exporting to {}", a.output.display()))?;
    eprintln!(
        "wrote {} in {:.1}s",
        a.output.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
