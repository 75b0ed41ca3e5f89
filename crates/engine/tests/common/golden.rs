//! Comparison of a model with llama.cpp's greedy goldens (`tests/golden/*-greedy*.json`).
//!
//! The model runs teacher-forced on llama.cpp's tokens; at each step its probabilities of
//! llama.cpp's top 10 are compared with llama.cpp's, and its argmax with llama.cpp's token.
//!
//! The rule is the spread llama.cpp shows against itself across instruction sets (its AVX-512
//! build against goldens its AVX2 build made: Gemma 3 270M median per-step |Δp| 0.0085, max 0.07;
//! Qwen 0.0008–0.0074, max 0.04; its own greedy path left at a top-2 margin of 0.013):
//! - every argmax equals llama.cpp's token, except at a step where llama.cpp's own top-2 margin
//!   is below [`NEAR_TIE`] (where summation order alone can flip it);
//! - per step, the largest |Δp| over the top 10 ("the step's |Δp|"): median over all compared
//!   steps ≤ [`MEDIAN_DP`], maximum ≤ [`MAX_DP`].

use modu_engine::tokenizer::Tokenizer;
use modu_engine::{Logits, Model};
use serde_json::Value;

pub const NEAR_TIE: f64 = 0.03;
/// The synthetic goldens' near-tie margin (issue #21's rule for them): their flips are rarer
/// (measured: every argmax parting at a llama.cpp margin below 0.01). Their probabilities keep
/// [`MAX_DP`]: llama.cpp's own AVX2 and AVX-512 builds differ on the synthetic Qwen2 model by
/// up to 0.049, so a tighter maximum would fail llama.cpp against itself.
pub const SYNTH_NEAR_TIE: f64 = 0.01;
/// Steps where modu's argmax is known to leave llama.cpp's at a wider margin than
/// [`NEAR_TIE`]: (golden label, case, step). Each is reported on every run, must still happen
/// at the SIMD kernel levels (a fixed one has to be taken off the list), and keeps issue #21
/// open:
/// - Qwen en-1 step 26: llama.cpp's goldens (AVX2) give tokens 1008 / 31494 0.326 / 0.283,
///   llama.cpp's AVX-512 build 0.336 / 0.271, modu 0.299 / 0.313 on every kernel level
///   at the AVX2 and AVX-512 levels; modu's scalar reference gives 0.331 / 0.284 (the median
///   step elsewhere agrees better than llama.cpp's two builds do: 0.0043 against 0.0054).
pub const KNOWN_FLIPS: &[(&str, &str, usize)] = &[("qwen2.5-coder-0.5b-instruct", "en-1", 26)];
pub const MEDIAN_DP: f64 = 0.015;
pub const MAX_DP: f64 = 0.1;

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// What one model's comparison found.
#[derive(Debug, Default)]
pub struct GoldenReport {
    pub cases: usize,
    pub steps: usize,
    /// Per compared step, the largest |Δp| over llama.cpp's top 10.
    pub step_dp: Vec<f64>,
    /// Steps where our argmax differs at a llama.cpp near-tie.
    pub near_tie_flips: usize,
    /// Wider flips on the [`KNOWN_FLIPS`] list that happened: (case, step).
    pub known_flips: Vec<(String, usize)>,
    pub failures: Vec<String>,
}

impl GoldenReport {
    pub fn median_dp(&self) -> f64 {
        let mut v = self.step_dp.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        v[v.len() / 2]
    }

    pub fn max_dp(&self) -> f64 {
        self.step_dp.iter().copied().fold(0.0, f64::max)
    }

    /// Panics with every failure, including the aggregate rule.
    pub fn assert_ok(&self, label: &str, min_steps: usize) {
        let mut failures = self.failures.clone();
        for &(l, case, step) in KNOWN_FLIPS {
            let seen = self
                .known_flips
                .iter()
                .any(|(c, s)| c == case && *s == step);
            let simd = modu_kernels::simd_level() > modu_kernels::SimdLevel::Scalar;
            if l == label && !seen && simd {
                failures.push(format!(
                    "{case} step {step} is on KNOWN_FLIPS but agrees now: take it off the list"
                ));
            }
        }
        for (case, step) in &self.known_flips {
            eprintln!("{label}: KNOWN (issue #21): {case} step {step} leaves llama.cpp's argmax above the near-tie margin");
        }
        if self.median_dp() > MEDIAN_DP {
            failures.push(format!(
                "median per-step |Δp| {:.4} > {MEDIAN_DP}",
                self.median_dp()
            ));
        }
        if self.steps < min_steps {
            failures.push(format!(
                "only {} steps compared (want ≥ {min_steps})",
                self.steps
            ));
        }
        eprintln!(
            "{label}: {} cases, {} steps, median |Δp| {:.4}, max {:.4}, {} near-tie flips",
            self.cases,
            self.steps,
            self.median_dp(),
            self.max_dp(),
            self.near_tie_flips
        );
        assert!(
            failures.is_empty(),
            "{label}: {} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Runs every case of `golden` (a parsed golden file) through `model`; `label` names the model
/// in messages and in [`KNOWN_FLIPS`]; an argmax may differ where llama.cpp's top-2 margin is
/// below `near_tie` ([`NEAR_TIE`] or [`SYNTH_NEAR_TIE`]).
pub fn compare(
    model: &dyn Model,
    tok: &Tokenizer,
    golden: &Value,
    label: &str,
    near_tie: f64,
) -> GoldenReport {
    let mut r = GoldenReport::default();
    let cases = golden["cases"].as_array().expect("golden has cases");
    r.cases = cases.len();
    let debug = std::env::var("GOLDEN_DEBUG").is_ok();
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let prompt_text = case["prompt_text"].as_str().unwrap();
        let prompt_ids: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ours = tok.encode(prompt_text, true, true).unwrap();
        if ours != prompt_ids {
            r.failures.push(format!(
                "{id}: prompt tokenization differs: ours {ours:?} vs {prompt_ids:?}"
            ));
            continue;
        }
        let steps = case["steps"].as_array().unwrap();
        let mut cache = model.new_cache(4096);
        let mut logits = model
            .forward(&prompt_ids, &mut cache, Logits::Last)
            .unwrap();
        for (step, s) in steps.iter().enumerate() {
            let want = s["id"].as_u64().unwrap() as u32;
            let probs = softmax(&logits);
            let got = modu_engine::sampling::argmax(&logits);
            let reported = s["probs_reported"].as_bool().unwrap_or(true) && s["top"].is_array();
            let top: Vec<(u32, f64)> = if reported {
                s["top"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        (
                            t["id"].as_u64().unwrap() as u32,
                            t["prob"].as_f64().unwrap(),
                        )
                    })
                    .collect()
            } else {
                vec![]
            };
            if got != want {
                // llama.cpp's margin where it reported one; else ours (it reported nothing).
                let margin = if top.len() >= 2 {
                    top[0].1 - top[1].1
                } else {
                    let mut sorted = probs.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    sorted[0] - sorted[1]
                };
                let known = KNOWN_FLIPS.contains(&(label, id, step));
                if margin < near_tie {
                    r.near_tie_flips += 1;
                } else if known {
                    r.known_flips.push((id.to_string(), step));
                } else {
                    r.failures.push(format!(
                        "{id} step {step}: argmax {got} (p={:.4}), llama.cpp {want} (p={:.4}, top-2 margin {margin:.4})",
                        probs[got as usize], probs[want as usize]
                    ));
                }
            }
            if !top.is_empty() {
                let mut worst = 0f64;
                for &(tid, p) in &top {
                    let d = (probs[tid as usize] - p).abs();
                    if debug {
                        eprintln!(
                            "{id} step {step} tok {tid}: ours {:.4} golden {p:.4}",
                            probs[tid as usize]
                        );
                    }
                    if d > MAX_DP {
                        r.failures.push(format!(
                            "{id} step {step}: p(token {tid}) = {:.4}, llama.cpp {p:.4}",
                            probs[tid as usize]
                        ));
                    }
                    worst = worst.max(d);
                }
                r.step_dp.push(worst);
            }
            r.steps += 1;
            if step + 1 == steps.len() {
                break;
            }
            logits = model.forward(&[want], &mut cache, Logits::Last).unwrap();
        }
    }
    r
}
