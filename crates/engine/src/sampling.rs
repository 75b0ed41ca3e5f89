//! Token sampling. The chain runs in llama.cpp's default order: repetition / presence /
//! frequency penalties on the raw logits, then top-k, top-p, min-p, temperature, and a draw
//! from the remaining distribution. Temperature ≤ 0 means greedy (argmax of the penalised
//! logits). A seeded [`Sampler`] is deterministic: same seed and settings, same tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// Multiplicative penalty on logits of recently seen tokens (1.0 disables).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0 = none, -1 = the whole context).
    pub repeat_last_n: i32,
    /// Subtracted once from the logit of every recently seen token.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of each recently seen token.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// A description of the first invalid field, if any.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err("presence/frequency penalties must be finite".into());
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (logit, id) candidates.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            cand: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits`, given the tokens seen so far (`history`: prompt and
    /// generated) for the penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits_owned;
        let mut logits = logits;
        let window = match p.repeat_last_n {
            n if n < 0 => history.len(),
            n => (n as usize).min(history.len()),
        };
        let penalise = window > 0
            && (p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0);
        if penalise {
            logits_owned = logits.to_vec();
            let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
            for &t in &history[history.len() - window..] {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &cnt) in &counts {
                let Some(l) = logits_owned.get_mut(t as usize) else {
                    continue;
                };
                if *l > 0.0 {
                    *l /= p.repeat_penalty;
                } else {
                    *l *= p.repeat_penalty;
                }
                *l -= cnt as f32 * p.frequency_penalty + p.presence_penalty;
            }
            logits = &logits_owned;
        }

        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        // Candidates sorted by logit, descending; top-k first so the sort stays small.
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let k = if p.top_k == 0 {
            self.cand.len()
        } else {
            p.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand
                .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            self.cand.truncate(k);
        }
        self.cand
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));

        // Probabilities at temperature 1 for the top-p / min-p filters (as llama.cpp).
        let max = self.cand[0].0;
        let mut probs: Vec<f32> = self.cand.iter().map(|c| (c.0 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let thresh = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= thresh).count().max(1));
        }
        self.cand.truncate(keep);

        // Temperature, then draw.
        let weights: Vec<f32> = self
            .cand
            .iter()
            .map(|c| ((c.0 - max) / p.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (w, c) in weights.iter().zip(&self.cand) {
            if r < *w {
                return c.1;
            }
            r -= w;
        }
        self.cand[self.cand.len() - 1].1
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)[i]` for every `i` in the `k` most likely tokens, most likely first, plus
/// the log-probability of `chosen`.
pub fn top_logprobs(logits: &[f32], chosen: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let top = idx
        .into_iter()
        .map(|i| (i, logits[i as usize] - lse))
        .collect();
    (logits[chosen as usize] - lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits(), &[]), 1);
    }

    #[test]
    fn repeat_penalty_changes_greedy_choice() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits(), &[1]), 5);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.2,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits(), &[1]), 5);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        // Token 1 seen twice: 3.0 - 0.6 = 2.4 < 2.5 (token 2) and token 5 seen twice too.
        assert_eq!(s.sample(&logits(), &[1, 1, 5, 5]), 2);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..SamplingParams::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits(), &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_restrict_support() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&logits(), &[]);
            assert!(
                t == 1 || t == 5,
                "top_p 0.5 keeps only the two best, got {t}"
            );
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&logits(), &[]);
            assert!(
                [1, 2, 5].contains(&t),
                "min_p 0.5 drops tokens under half the best, got {t}"
            );
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..Default::default()
            });
            (0..32)
                .map(|_| s.sample(&logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn logprobs_are_normalised() {
        let (lp, top) = top_logprobs(&logits(), 1, 3);
        assert_eq!(top[0].0, 1);
        assert!((lp - top[0].1).abs() < 1e-6);
        let total: f32 = logits().iter().map(|&l| (l - logits()[1] + lp).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 5, 2]);
    }

    #[test]
    fn validation_rejects_bad_params() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            min_p: 2.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
