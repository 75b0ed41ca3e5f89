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
    /// Scratch: (logit, id) candidates, and their weights after temperature.
    cand: Vec<(f32, u32)>,
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            cand: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits`, given the tokens seen so far (`history`: prompt and
    /// generated) for the penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if let Some(t) = self.distribution(logits, history) {
            return t;
        }
        let total: f32 = self.weights.iter().sum();
        let r = self.rng.gen::<f32>() * total;
        self.draw(r, None)
    }

    /// Speculative verification of a drafted token: the token this position gets, and whether
    /// it is the draft. Greedy accepts the draft exactly when it is the argmax. Sampling
    /// accepts it with the probability `p(draft)` that [`Sampler::sample`] would give it and
    /// otherwise draws from `p` without the draft, renormalised: for a draft that is one fixed
    /// token (prompt lookup) this is speculative sampling's rule `min(1, p/q)` with residual
    /// `(p - q)+`, so the token has exactly the distribution `p` whatever the draft was.
    pub fn verify(&mut self, logits: &[f32], history: &[u32], draft: u32) -> (u32, bool) {
        if let Some(t) = self.distribution(logits, history) {
            return (t, t == draft);
        }
        let total: f32 = self.weights.iter().sum();
        let w_draft: f32 = self
            .cand
            .iter()
            .zip(&self.weights)
            .filter(|(c, _)| c.1 == draft)
            .map(|(_, &w)| w)
            .sum();
        let u = self.rng.gen::<f32>() * total;
        if u < w_draft {
            return (draft, true);
        }
        let rest = total - w_draft;
        if rest <= 0.0 {
            return (draft, true);
        }
        let r = self.rng.gen::<f32>() * rest;
        let t = self.draw(r, Some(draft));
        (t, t == draft)
    }

    /// The candidates `self.cand` and their unnormalised weights `self.weights` after
    /// penalties, filters and temperature; `Some(token)` instead under greedy.
    fn distribution(&mut self, logits: &[f32], history: &[u32]) -> Option<u32> {
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
            return Some(argmax(logits));
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

        // Temperature.
        let t = p.temperature;
        self.weights.clear();
        self.weights
            .extend(self.cand.iter().map(|c| ((c.0 - max) / t).exp()));
        None
    }

    /// The candidate where the running sum of the weights passes `r` (`skip`'s weight left out).
    fn draw(&self, mut r: f32, skip: Option<u32>) -> u32 {
        let mut last = self.cand[self.cand.len() - 1].1;
        for (w, c) in self.weights.iter().zip(&self.cand) {
            if Some(c.1) == skip {
                continue;
            }
            last = c.1;
            if r < *w {
                return c.1;
            }
            r -= w;
        }
        last
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

    /// Speculative verification draws from the sampler's own distribution whatever the draft:
    /// for every draft token (inside or outside the filtered support), the empirical
    /// frequencies over many draws match the exact probabilities within 5 standard errors.
    #[test]
    fn verification_keeps_the_distribution() {
        let logits = logits();
        for params in [
            SamplingParams {
                temperature: 0.7,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.3,
                top_k: 4,
                top_p: 0.9,
                min_p: 0.0,
                ..Default::default()
            },
        ] {
            // The exact distribution from the sampler's own weights.
            let mut s = Sampler::new(params.clone());
            assert!(s.distribution(&logits, &[]).is_none());
            let total: f32 = s.weights.iter().sum();
            let mut p = vec![0f64; logits.len()];
            for (c, w) in s.cand.iter().zip(&s.weights) {
                p[c.1 as usize] = (*w / total) as f64;
            }
            assert!(p.iter().filter(|&&x| x == 0.0).count() >= 1 || params.top_k == 0);
            let n = 200_000;
            for draft in 0..logits.len() as u32 {
                let mut s = Sampler::new(SamplingParams {
                    seed: 11 + draft as u64,
                    ..params.clone()
                });
                let mut count = vec![0usize; logits.len()];
                let mut kept = 0;
                for _ in 0..n {
                    let (t, ok) = s.verify(&logits, &[], draft);
                    assert_eq!(ok, t == draft);
                    kept += ok as usize;
                    count[t as usize] += 1;
                }
                for (tok, (&c, &pt)) in count.iter().zip(&p).enumerate() {
                    let f = c as f64 / n as f64;
                    let se = (pt * (1.0 - pt) / n as f64).sqrt().max(1e-9);
                    assert!(
                        (f - pt).abs() <= 5.0 * se,
                        "draft {draft}: token {tok} drawn {f:.4}, p = {pt:.4}"
                    );
                }
                // The draft is kept with its own probability.
                let fk = kept as f64 / n as f64;
                let pd = p[draft as usize];
                assert!((fk - pd).abs() <= 5.0 * (pd * (1.0 - pd) / n as f64).sqrt().max(1e-9));
            }
        }
        // Greedy keeps a draft exactly when it is the argmax.
        let mut g = Sampler::new(SamplingParams::greedy());
        assert_eq!(g.verify(&logits, &[], 1), (1, true));
        assert_eq!(g.verify(&logits, &[], 5), (1, false));
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
