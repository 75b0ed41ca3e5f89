//! `modu synth`: write a tiny random-weight model of one architecture, with a real model's
//! tokenizer, for checking that architecture against llama.cpp (see `tests/golden/synthetic/`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use modu_engine::synth::{synthesize, SynthArch};
use modu_gguf::GgufFile;
use sha2::{Digest, Sha256};

#[derive(Args)]
pub struct SynthArgs {
    /// Architecture: llama, qwen2, gemma3, exaone, exaone4 or exaone4-swa.
    #[arg(long)]
    pub arch: String,
    /// Model whose tokenizer the synthetic model carries (default: qwen, or gemma for gemma3).
    #[arg(long)]
    pub vocab: Option<String>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output GGUF file.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let arch = SynthArch::parse(&a.arch)?;
    let vocab_spec = a.vocab.as_deref().unwrap_or(arch.vocab_model());
    let path = crate::pull::resolve_with_progress(vocab_spec)?;
    let vocab = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let w = synthesize(arch, &vocab, a.seed)?;
    w.write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let bytes = std::fs::read(&a.output)?;
    println!(
        "{}: synthetic {} ({} tensors, {} bytes), sha256 {:x}",
        a.output.display(),
        arch.name(),
        w.tensor_count(),
        bytes.len(),
        Sha256::digest(&bytes)
    );
    Ok(())
}
