//! `modu bench spec`: single-stream decode speed with and without speculative decoding (prompt
//! lookup) on a prompt set whose answers either copy from their prompt (code edits, extraction:
//! where drafts are accepted) or do not (free chat: where drafting must back off and cost
//! nothing). Each prompt runs greedy, plain and speculative alternating, `-r` times after a
//! warm-up pair; the outputs must be identical (the run fails otherwise). Reported per prompt
//! and per workload: decode tok/s (tokens after the first, over the time after the first), the
//! ratio, and the share of drafted tokens kept. `--draft MODEL` drafts with a model of the same
//! vocabulary instead of prompt lookup.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use modu_engine::chat::ChatMessage;
use modu_engine::generate::{generate, generate_drafted, GenerateParams};
use modu_engine::{SamplingParams, SpecConfig};
use serde_json::{json, Value};

use crate::run::{load, load_draft, on_pool, render_chat, template, ModelArgs};

/// The committed prompt set (`bench/spec/prompts.jsonl`): English and Korean, copy and chat.
const DEFAULT_PROMPTS: &str = include_str!("../../../bench/spec/prompts.jsonl");

#[derive(Args)]
pub struct SpecBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL prompt set: one {"id", "workload", "lang", "prompt"} per line (default: the
    /// repository's bench/spec/prompts.jsonl, built in).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Tokens generated per run (greedy; a run also ends at end-of-generation).
    #[arg(short = 'n', long = "n-gen", default_value_t = 192)]
    pub n_gen: usize,
    /// Timed pairs (plain, speculative) per prompt, after one warm-up pair.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// Most draft tokens checked per forward pass.
    #[arg(long = "spec-draft", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub spec_draft: u16,
    /// Draft with this model (same vocabulary) instead of prompt lookup.
    #[arg(long, value_name = "MODEL")]
    pub draft: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Prompt {
    id: String,
    workload: String,
    lang: String,
    text: String,
}

fn parse_prompts(src: &str, from: &str) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{from} line {}: not JSON", i + 1))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{from} line {}: no string field \"{k}\"", i + 1))
        };
        out.push(Prompt {
            id: field("id")?,
            workload: field("workload")?,
            lang: field("lang")?,
            text: field("prompt")?,
        });
    }
    if out.is_empty() {
        bail!("{from}: no prompts");
    }
    Ok(out)
}

/// One run: decode tok/s and what speculation did.
struct Run {
    ids: Vec<u32>,
    tok_s: f64,
    drafted: usize,
    accepted: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn bench_spec(a: SpecBenchArgs) -> Result<()> {
    let (src, from) = match &a.prompts {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_PROMPTS.to_string(),
            "bench/spec/prompts.jsonl".into(),
        ),
    };
    let prompts = parse_prompts(&src, &from)?;
    if a.repetitions == 0 || a.n_gen < 2 {
        bail!("-r must be at least 1 and -n at least 2");
    }
    let l = load(&a.model)?;
    let draft = a
        .draft
        .as_deref()
        .map(|spec| load_draft(&a.model, spec, &l))
        .transpose()?;
    let tpl = template(&l.file, &None)?;
    let spec = SpecConfig {
        max_draft: a.spec_draft as usize,
        ..SpecConfig::default()
    };
    let mut rows = Vec::new();
    for p in &prompts {
        let text = render_chat(&l, &tpl, &[ChatMessage::new("user", &p.text)])?;
        let ids = l.tokenizer.encode(&text, true, true)?;
        let run = |s: Option<SpecConfig>| -> Result<Run> {
            let mut cache = l.model.new_cache(ids.len() + a.n_gen + 1);
            let params = GenerateParams {
                max_tokens: a.n_gen,
                sampling: SamplingParams::greedy(),
                speculative: s,
                ..GenerateParams::default()
            };
            let t0 = Instant::now();
            let mut first = None;
            let on_token = |_: &str, _: &modu_engine::generate::GeneratedToken| {
                first.get_or_insert_with(Instant::now);
                ControlFlow::Continue(())
            };
            let g = on_pool(|| match (&draft, s) {
                (Some(d), Some(_)) => generate_drafted(
                    &*l.model,
                    &*d.model,
                    &l.tokenizer,
                    &mut cache,
                    &ids,
                    &params,
                    &[],
                    on_token,
                ),
                _ => generate(&*l.model, &l.tokenizer, &mut cache, &ids, &params, on_token),
            })?;
            let end = Instant::now();
            let decode = (end - first.unwrap_or(t0)).as_secs_f64();
            let n = g.tokens.len();
            Ok(Run {
                ids: g.tokens.iter().map(|t| t.id).collect(),
                tok_s: if decode > 0.0 {
                    (n - 1) as f64 / decode
                } else {
                    0.0
                },
                drafted: g.spec.drafted,
                accepted: g.spec.accepted,
            })
        };
        let (mut plain, mut fast) = (Vec::new(), Vec::new());
        let (mut drafted, mut accepted, mut n_tokens) = (0, 0, 0);
        for rep in 0..=a.repetitions {
            let x = run(None)?;
            let y = run(Some(spec))?;
            if x.ids != y.ids {
                bail!(
                    "prompt {}: speculative output differs from plain decoding",
                    p.id
                );
            }
            if rep > 0 {
                plain.push(x.tok_s);
                fast.push(y.tok_s);
                drafted = y.drafted;
                accepted = y.accepted;
                n_tokens = y.ids.len();
            }
        }
        let (mp, mf) = (median(&mut plain), median(&mut fast));
        rows.push(json!({
            "id": p.id, "workload": p.workload, "lang": p.lang, "n_tokens": n_tokens,
            "plain_tok_s": mp, "spec_tok_s": mf, "ratio": mf / mp,
            "drafted": drafted, "accepted": accepted,
            "acceptance": if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 },
        }));
        if !a.json {
            eprintln!(
                "{:<18} {:<5} {:<3} {:>4} tok  plain {:>6.1} tok/s  spec {:>6.1} tok/s  {:>5.2}x  kept {}/{}",
                p.id, p.workload, p.lang, n_tokens, mp, mf, mf / mp, accepted, drafted
            );
        }
    }
    // Per workload: the median of the per-prompt ratios, and the pooled acceptance.
    let mut workloads: Vec<String> = rows
        .iter()
        .map(|r| r["workload"].as_str().unwrap_or("").to_string())
        .collect();
    workloads.sort();
    workloads.dedup();
    let mut summary = Vec::new();
    for w in &workloads {
        let of: Vec<&Value> = rows.iter().filter(|r| r["workload"] == *w).collect();
        let mut ratios: Vec<f64> = of.iter().filter_map(|r| r["ratio"].as_f64()).collect();
        let drafted: u64 = of.iter().filter_map(|r| r["drafted"].as_u64()).sum();
        let accepted: u64 = of.iter().filter_map(|r| r["accepted"].as_u64()).sum();
        let ratio = median(&mut ratios);
        let acc = if drafted > 0 {
            accepted as f64 / drafted as f64
        } else {
            0.0
        };
        summary.push(
            json!({"workload": w, "prompts": of.len(), "median_ratio": ratio, "acceptance": acc}),
        );
        if !a.json {
            println!(
                "{w:<6} {} prompts: speculative / plain decode tok/s median {ratio:.2}x, {:.0} % of drafted tokens kept",
                of.len(),
                100.0 * acc
            );
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": a.model.model, "kernels": modu_kernels::simd_level().name(),
                "n_gen": a.n_gen, "repetitions": a.repetitions, "spec_draft": a.spec_draft,
                "drafter": a.draft.as_deref().unwrap_or("ngram"),
                "prompts": rows, "workloads": summary,
            }))?
        );
    }
    Ok(())
}
