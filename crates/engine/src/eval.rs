//! Quality evaluation: perplexity and KL divergence against a reference model.
//!
//! Windows follow `llama-perplexity`: the token stream is cut into non-overlapping windows of
//! `ctx` tokens; each window runs from an empty cache (its first token replaced by BOS when the
//! vocabulary adds one), and only the second half of each window is scored, so every scored
//! token has at least `ctx/2` tokens of context. Logits at position `i` predict token `i+1`.
//!
//! [`module_kl_divergence`] compares a base model with the same model plus LoRA modules
//! (`Model::forward_seqs_with`): how far an adapter moves the base's predictions on a text.
//!
//! Per-byte numbers divide the total negative log-likelihood (in bits) by the UTF-8 bytes of
//! the scored tokens, which makes texts and tokenizers comparable (Korean text costs many more
//! tokens per character with most vocabularies).

use serde::Serialize;

use crate::lora::ModuleRef;
use crate::models::{Logits, Model};
use crate::tokenizer::Tokenizer;
use crate::ModelError;

/// `log_softmax` of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Statistics of one scored position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosStats {
    /// `KL(P_base ‖ P_quant) = Σ p (log p − log q)`, nats.
    pub kld: f64,
    /// `q(t) − p(t)` for the base model's most likely token `t`.
    pub dp: f64,
    /// Whether both models' most likely tokens agree.
    pub same_top: bool,
    /// `−log p(target)` and `−log q(target)`, nats.
    pub nll_base: f64,
    pub nll_quant: f64,
}

/// Compare one position's logits of the base and the quantized model.
pub fn position_stats(base: &[f32], quant: &[f32], target: u32) -> PosStats {
    let lp = log_softmax(base);
    let lq = log_softmax(quant);
    let mut kld = 0.0;
    for (&a, &b) in lp.iter().zip(&lq) {
        let p = a.exp();
        if p > 0.0 {
            kld += p * (a - b);
        }
    }
    let tb = argmax(&lp);
    let tq = argmax(&lq);
    let t = target as usize;
    PosStats {
        kld: kld.max(0.0),
        dp: lq[tb].exp() - lp[tb].exp(),
        same_top: tb == tq,
        nll_base: -lp.get(t).copied().unwrap_or(f64::NEG_INFINITY),
        nll_quant: -lq.get(t).copied().unwrap_or(f64::NEG_INFINITY),
    }
}

/// Linear-interpolated percentile of sorted data (`q` in 0..=1).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let x = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (i, f) = (x.floor() as usize, x - x.floor());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

/// Perplexity result.
#[derive(Debug, Clone, Serialize)]
pub struct PplSummary {
    pub tokens_scored: usize,
    pub bytes_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub ppl: f64,
    /// Mean NLL per token, nats.
    pub nll_per_token: f64,
    /// Total NLL in bits / UTF-8 bytes of the scored tokens.
    pub bits_per_byte: f64,
}

/// KL-divergence result (`llama-perplexity --kl-divergence` style).
#[derive(Debug, Clone, Serialize)]
pub struct KldSummary {
    pub tokens_scored: usize,
    pub bytes_scored: usize,
    pub kld_mean: f64,
    pub kld_median: f64,
    pub kld_p90: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    pub dp_mean: f64,
    pub dp_rms: f64,
    pub same_top_pct: f64,
    pub ppl_base: f64,
    pub ppl_quant: f64,
    pub ppl_ratio: f64,
    pub bpb_base: f64,
    pub bpb_quant: f64,
    /// Mean KLD per byte: total KLD (bits) / bytes.
    pub kld_bits_per_byte: f64,
}

/// Summarize per-position statistics; `bytes` is the UTF-8 size of the scored tokens.
pub fn summarize_kld(stats: &[PosStats], bytes: usize) -> KldSummary {
    let n = stats.len().max(1) as f64;
    let mut k: Vec<f64> = stats.iter().map(|s| s.kld).collect();
    k.sort_by(|a, b| a.total_cmp(b));
    let sum_k: f64 = k.iter().sum();
    let nb: f64 = stats.iter().map(|s| s.nll_base).sum();
    let nq: f64 = stats.iter().map(|s| s.nll_quant).sum();
    let b = bytes.max(1) as f64;
    let ln2 = std::f64::consts::LN_2;
    KldSummary {
        tokens_scored: stats.len(),
        bytes_scored: bytes,
        kld_mean: sum_k / n,
        kld_median: percentile(&k, 0.5),
        kld_p90: percentile(&k, 0.9),
        kld_p99: percentile(&k, 0.99),
        kld_max: k.last().copied().unwrap_or(f64::NAN),
        dp_mean: stats.iter().map(|s| s.dp).sum::<f64>() / n,
        dp_rms: (stats.iter().map(|s| s.dp * s.dp).sum::<f64>() / n).sqrt(),
        same_top_pct: 100.0 * stats.iter().filter(|s| s.same_top).count() as f64 / n,
        ppl_base: (nb / n).exp(),
        ppl_quant: (nq / n).exp(),
        ppl_ratio: ((nq - nb) / n).exp(),
        bpb_base: nb / ln2 / b,
        bpb_quant: nq / ln2 / b,
        kld_bits_per_byte: sum_k / ln2 / b,
    }
}

/// Summarize per-token NLLs (nats).
pub fn summarize_ppl(nll: &[f64], bytes: usize, windows: usize, ctx: usize) -> PplSummary {
    let n = nll.len().max(1) as f64;
    let s: f64 = nll.iter().sum();
    PplSummary {
        tokens_scored: nll.len(),
        bytes_scored: bytes,
        windows,
        ctx,
        ppl: (s / n).exp(),
        nll_per_token: s / n,
        bits_per_byte: s / std::f64::consts::LN_2 / bytes.max(1) as f64,
    }
}

/// Errors of the evaluation drivers.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "the text has {have} tokens; at least {need} are needed for one window of --ctx {ctx}"
    )]
    TooShort {
        have: usize,
        need: usize,
        ctx: usize,
    },
    #[error("--ctx must be at least 4 (got {0})")]
    BadCtx(usize),
    #[error("the models' vocabularies differ ({0} vs {1} entries)")]
    VocabMismatch(usize, usize),
}

/// Token windows of `text` for evaluation (BOS in front of each when the vocabulary adds one).
pub fn windows(
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
) -> Result<Vec<Vec<u32>>, EvalError> {
    if ctx < 4 {
        return Err(EvalError::BadCtx(ctx));
    }
    let ids = tok
        .encode(text, false, false)
        .map_err(|e| EvalError::Tokenizer(e.to_string()))?;
    let n = ids.len() / ctx;
    if n == 0 {
        return Err(EvalError::TooShort {
            have: ids.len(),
            need: ctx,
            ctx,
        });
    }
    let n = max_windows.map_or(n, |m| n.min(m.max(1)));
    let bos = if tok.add_bos() { tok.bos_id() } else { None };
    Ok((0..n)
        .map(|w| {
            let mut v = ids[w * ctx..(w + 1) * ctx].to_vec();
            if let Some(b) = bos {
                v[0] = b;
            }
            v
        })
        .collect())
}

/// Positions scored in a window of `ctx` tokens: logits at `i` for `i in first..ctx-1`.
pub fn scored_range(ctx: usize) -> std::ops::Range<usize> {
    ctx / 2..ctx - 1
}

/// Logits of every position of one window.
pub fn window_logits(model: &dyn Model, toks: &[u32]) -> Result<Vec<f32>, ModelError> {
    let mut cache = model.new_cache(toks.len());
    model.forward(toks, &mut cache, Logits::All)
}

/// Perplexity of `model` over `text`. `progress(done, total)` after each window.
pub fn perplexity(
    model: &dyn Model,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<PplSummary, EvalError> {
    let wins = windows(tok, text, ctx, max_windows)?;
    let nv = model.info().n_vocab;
    let mut nll = Vec::new();
    let mut bytes = 0;
    for (wi, w) in wins.iter().enumerate() {
        let logits = window_logits(model, w)?;
        for i in scored_range(ctx) {
            let lp = log_softmax(&logits[i * nv..(i + 1) * nv]);
            let t = w[i + 1] as usize;
            nll.push(-lp.get(t).copied().unwrap_or(f64::NEG_INFINITY));
            bytes += tok.token_bytes(w[i + 1]).len();
        }
        progress(wi + 1, wins.len());
    }
    Ok(summarize_ppl(&nll, bytes, wins.len(), ctx))
}

/// Logits of every position of one window with `modules` applied (in list order).
pub fn window_logits_with(
    model: &dyn Model,
    toks: &[u32],
    modules: &[ModuleRef],
) -> Result<Vec<f32>, ModelError> {
    let mut cache = model.new_cache(toks.len());
    model.forward_seqs_with(&[toks], &mut [&mut cache], Logits::All, &[modules])
}

/// KL divergence of `quant` from `base` over `text` (tokenized with the base's vocabulary).
pub fn kl_divergence(
    base: &dyn Model,
    quant: &dyn Model,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<KldSummary, EvalError> {
    let nv = base.info().n_vocab;
    if quant.info().n_vocab != nv {
        return Err(EvalError::VocabMismatch(nv, quant.info().n_vocab));
    }
    kld_over_windows(
        nv,
        &|w| window_logits(base, w),
        &|w| window_logits(quant, w),
        tok,
        text,
        ctx,
        max_windows,
        progress,
    )
}

/// KL divergence of `base` + `modules` (each `(adapter, scale)`, summed in order) from `base`
/// alone over `text`. A module list whose scales are all 0 is the base bit for bit (KLD 0).
pub fn module_kl_divergence(
    base: &dyn Model,
    modules: &[ModuleRef],
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<KldSummary, EvalError> {
    kld_over_windows(
        base.info().n_vocab,
        &|w| window_logits(base, w),
        &|w| window_logits_with(base, w, modules),
        tok,
        text,
        ctx,
        max_windows,
        progress,
    )
}

type WindowFn<'a> = dyn Fn(&[u32]) -> Result<Vec<f32>, ModelError> + 'a;

#[allow(clippy::too_many_arguments)]
fn kld_over_windows(
    nv: usize,
    base: &WindowFn,
    other: &WindowFn,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_windows: Option<usize>,
    progress: &dyn Fn(usize, usize),
) -> Result<KldSummary, EvalError> {
    let wins = windows(tok, text, ctx, max_windows)?;
    let mut stats = Vec::new();
    let mut bytes = 0;
    for (wi, w) in wins.iter().enumerate() {
        let lb = base(w)?;
        let lq = other(w)?;
        for i in scored_range(ctx) {
            let r = i * nv..(i + 1) * nv;
            stats.push(position_stats(&lb[r.clone()], &lq[r], w[i + 1]));
            bytes += tok.token_bytes(w[i + 1]).len();
        }
        progress(wi + 1, wins.len());
    }
    Ok(summarize_kld(&stats, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn hand_computed_position() {
        // Base: logits ln(0.5), ln(0.25), ln(0.25) → p = (0.5, 0.25, 0.25).
        // Quant: q = (0.25, 0.5, 0.25).
        let base = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let quant = [0.25f32.ln() + 3.0, 0.5f32.ln() + 3.0, 0.25f32.ln() + 3.0]; // shift-invariant
        let s = position_stats(&base, &quant, 1);
        // KL = 0.5 ln 2 + 0.25 ln 0.5 + 0 = 0.25 ln 2.
        close(s.kld, 0.25 * std::f64::consts::LN_2);
        close(s.dp, 0.25 - 0.5);
        assert!(!s.same_top);
        close(s.nll_base, -(0.25f64.ln()));
        close(s.nll_quant, -(0.5f64.ln()));
        let same = position_stats(&base, &base, 0);
        close(same.kld, 0.0);
        assert!(same.same_top);
    }

    #[test]
    fn summary_of_known_values() {
        let mk = |kld: f64, dp: f64, same: bool, nb: f64, nq: f64| PosStats {
            kld,
            dp,
            same_top: same,
            nll_base: nb,
            nll_quant: nq,
        };
        let st = [
            mk(0.0, 0.0, true, 1.0, 1.0),
            mk(0.1, -0.1, true, 2.0, 2.5),
            mk(0.2, 0.1, false, 3.0, 3.5),
            mk(0.7, -0.2, true, 2.0, 3.0),
        ];
        let s = summarize_kld(&st, 8);
        close(s.kld_mean, 0.25);
        close(s.kld_median, 0.15);
        close(s.kld_max, 0.7);
        close(s.kld_p90, 0.2 + 0.7 * (0.7 - 0.2)); // x = 0.9·3 = 2.7
        close(s.dp_mean, -0.05);
        close(s.dp_rms, ((0.01 + 0.01 + 0.04) / 4.0f64).sqrt());
        close(s.same_top_pct, 75.0);
        close(s.ppl_base, 2.0f64.exp());
        close(s.ppl_quant, 2.5f64.exp());
        close(s.ppl_ratio, 0.5f64.exp());
        close(s.bpb_base, 8.0 / std::f64::consts::LN_2 / 8.0);
        let p = summarize_ppl(&[1.0, 3.0], 4, 1, 8);
        close(p.ppl, 2.0f64.exp());
        close(p.bits_per_byte, 4.0 / std::f64::consts::LN_2 / 4.0);
        assert_eq!(scored_range(8), 4..7);
    }
}
