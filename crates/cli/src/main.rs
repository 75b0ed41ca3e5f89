//! `modu`: run quantized GGUF language models on the CPU.

mod bench;
mod bench_serve;
mod bench_spec;
mod key;
mod module;
mod pull;
mod quant;
mod run;
mod serve;
mod synth;
mod usage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "modu",
    version,
    about = "Lightweight, modular LLM inference on CPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a known model (or hf:OWNER/REPO/FILE.gguf) into the cache.
    Pull {
        /// Model name, alias or hf: source.
        name: String,
    },
    /// List known and cached models.
    List,
    /// Generate text from a prompt.
    Run(run::RunArgs),
    /// Interactive chat using the model's chat template.
    Chat(run::ChatArgs),
    /// Print the token ids of a text.
    Tokenize(run::TokenizeArgs),
    /// Show a model's metadata and a tensor summary.
    Info(run::InfoArgs),
    /// Measure prefill/decode speed (llama-bench style) and memory bandwidth.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Manage API keys of services (`modu key new SERVICE`).
    Key(key::KeyArgs),
    /// Show recorded usage (tokens, CPU, energy, cost) by service, module and time.
    Usage(usage::UsageArgs),
    /// LoRA modules (adapters): inspect, merge, fold into a base model.
    #[command(subcommand)]
    Module(module::ModuleCommand),
    /// Rewrite a GGUF model (or convert a Hugging Face safetensors directory) with its weights
    /// in another (quantized) format.
    Quantize(quant::QuantizeArgs),
    /// Write a GGUF model as a Hugging Face checkpoint directory (safetensors, config.json,
    /// tokenizer.json).
    ExportHf(quant::ExportHfArgs),
    /// Measure model quality: perplexity, or KL divergence from a base model (or of a LoRA
    /// module from its base).
    #[command(subcommand)]
    Eval(quant::EvalCmd),
    /// Compute an importance matrix (per-column mean x² of each matmul input) from a text.
    Imatrix(quant::ImatrixArgs),
    /// Write a tiny random-weight model of an architecture with a real model's tokenizer (for
    /// checking the architecture against llama.cpp without its real weights).
    Synth(synth::SynthArgs),
}

fn main() {
    quiet_broken_pipe();
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pull { name } => pull::run_pull(&name),
        Command::List => pull::run_list(),
        Command::Run(a) => run::run(a),
        Command::Chat(a) => run::chat(a),
        Command::Tokenize(a) => run::tokenize(a),
        Command::Info(a) => run::info(a),
        Command::Bench(mut a) => match a.target.take() {
            Some(bench::BenchTarget::Serve(s)) => bench_serve::bench_serve(s),
            Some(bench::BenchTarget::Modules(m)) => bench_serve::bench_modules(m),
            Some(bench::BenchTarget::Spec(s)) => bench_spec::bench_spec(s),
            None => bench::bench(a),
        },
        Command::Serve(a) => serve::serve(a),
        Command::Key(a) => key::key(a),
        Command::Usage(a) => usage::usage(a),
        Command::Module(c) => module::run(c),
        Command::Quantize(a) => quant::quantize(a),
        Command::ExportHf(a) => quant::export_hf_cmd(a),
        Command::Eval(c) => quant::eval(c),
        Command::Imatrix(a) => quant::imatrix(a),
        Command::Synth(a) => synth::synth(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `modu info qwen | head` should end quietly as Unix tools do, not panic in `println!` on the
/// closed pipe: restore the default SIGPIPE action (Rust's runtime ignores the signal).
#[cfg(unix)]
fn quiet_broken_pipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13; // the same on Linux, macOS and the BSDs
    const SIG_DFL: usize = 0;
    // SAFETY: called first thing in main, before any thread starts; SIG_DFL is always valid.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn quiet_broken_pipe() {}

/// Fixed glibc malloc thresholds, so that memory freed between decode steps is reused rather
/// than handed back to the kernel.
///
/// By default glibc serves blocks above a moving threshold with their own mappings and trims
/// the top of the heap once a little is free. A batched decode step allocates and frees a few
/// MB (the logits alone are 8 × 151,936 f32 for eight sequences), so every step gave those
/// pages back and faulted them in again, zeroed: ~2,400 page faults per step of eight
/// sequences, which cost a quarter of its time (`modu bench -b 8 -n 128`, 2 threads:
/// 103–117 → 125–153 tok/s, peak RSS unchanged). Below 32 MiB (glibc's largest mmap
/// threshold) blocks now come from the heap, and up to 128 MiB free at its top stays mapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: called first thing in main, before any thread starts or allocates much;
    // mallopt only changes allocator parameters (it returns 0 for a refused value, which
    // leaves glibc's default, so the result needs no check).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
