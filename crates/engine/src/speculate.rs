//! Speculative decoding by prompt lookup: when the last few tokens of a sequence also occur
//! earlier in it (the prompt or the output so far), the tokens that followed that earlier
//! occurrence are proposed as a draft, and one forward pass over the next token plus the draft
//! checks them all (see [`crate::Sampler::verify`]). Answers that copy from their prompt — code
//! edits, extraction, quoting, reformatting — then get several tokens per weight read, which is
//! what bounds decoding on a CPU. The output is exactly what plain decoding gives: greedy tokens
//! are the same tokens, sampled ones have the same distribution.
//!
//! A draft costs compute even when it is rejected, so the drafter backs off: its draft length
//! follows what was accepted lately, and after drafts that were rejected at their first token it
//! pauses drafting for a while (longer after each miss, reset by a hit).

/// How a sequence drafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Most draft tokens per verification pass.
    pub max_draft: usize,
    /// The longest suffix looked up first; shorter ones down to `ngram_min` are tried next.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            max_draft: 8,
            ngram_max: 4,
            ngram_min: 2,
        }
    }
}

/// Most positions of history searched backwards for a match, so that a draft costs a bounded
/// amount of work however long the context is.
const MAX_LOOKBACK: usize = 16384;
/// Longest pause (in tokens) after repeated misses.
const MAX_COOLDOWN: usize = 64;

/// What speculation did for one sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Verification passes that carried a draft.
    pub rounds: usize,
    /// Tokens drafted (and verified).
    pub drafted: usize,
    /// Drafted tokens that were accepted.
    pub accepted: usize,
}

impl SpecStats {
    /// Accepted drafted tokens per drafted token (0 when nothing was drafted).
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// The prompt-lookup drafter of one sequence.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    cfg: SpecConfig,
    /// Draft length for the next proposal (adapts between 1 and `max_draft`).
    len: usize,
    /// Consecutive drafts rejected at their first token.
    misses: u32,
    /// Proposals to skip before drafting again.
    cooldown: usize,
    pub stats: SpecStats,
}

impl NgramDrafter {
    pub fn new(cfg: SpecConfig) -> Self {
        let cfg = SpecConfig {
            max_draft: cfg.max_draft.max(1),
            ngram_max: cfg.ngram_max.max(1),
            ngram_min: cfg.ngram_min.clamp(1, cfg.ngram_max.max(1)),
        };
        NgramDrafter {
            cfg,
            len: cfg.max_draft.min(4),
            misses: 0,
            cooldown: 0,
            stats: SpecStats::default(),
        }
    }

    /// Draft at most `limit` tokens to follow `history` into `out` (cleared first); empty when
    /// no suffix of `history` recurs, or while backing off.
    pub fn propose(&mut self, history: &[u32], limit: usize, out: &mut Vec<u32>) {
        out.clear();
        let want = self.len.min(limit);
        if want == 0 {
            return;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return;
        }
        if let Some(at) = lookup(history, self.cfg.ngram_max, self.cfg.ngram_min) {
            let end = (at + want).min(history.len());
            out.extend_from_slice(&history[at..end]);
        }
    }

    /// Learn from a verification: `accepted` of `drafted` tokens were kept.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.stats.rounds += 1;
        self.stats.drafted += drafted;
        self.stats.accepted += accepted;
        if accepted == drafted {
            self.len = (self.len * 2).min(self.cfg.max_draft);
            self.misses = 0;
        } else {
            // Ask next time for one more than was accepted: long enough to confirm a run, short
            // enough that a rejection wastes little.
            self.len = (accepted + 1).clamp(1, self.cfg.max_draft);
            if accepted == 0 {
                self.misses += 1;
                self.cooldown = (1usize << self.misses.min(6)).min(MAX_COOLDOWN);
            } else {
                self.misses = 0;
            }
        }
    }
}

/// A smaller model of the same vocabulary as the drafter: it proposes its own greedy
/// continuation, keeping its own KV cache in step with the sequence (after a verification it
/// drops what was rejected and feeds what it missed). The draft length adapts as the n-gram
/// drafter's does (doubles after a full hit, else one more than was kept, up to `max_draft`),
/// so a draft model that disagrees costs one draft token per pass.
/// Greedy drafts are a function of the history alone, so verification keeps the output
/// exactly that of plain decoding (see [`crate::Sampler::verify`]).
pub struct ModelDrafter<'a> {
    model: &'a dyn crate::Model,
    cache: crate::KvCache,
    /// The tokens the draft cache holds, in order.
    fed: Vec<u32>,
    max_draft: usize,
    /// Draft length of the next proposal.
    len: usize,
    pub stats: SpecStats,
}

impl<'a> ModelDrafter<'a> {
    /// A drafter with a cache of `max_len` positions (the main sequence's context).
    pub fn new(model: &'a dyn crate::Model, max_len: usize, max_draft: usize) -> Self {
        ModelDrafter {
            model,
            cache: model.new_cache(max_len),
            fed: Vec::new(),
            max_draft: max_draft.max(1),
            len: max_draft.clamp(1, 4),
            stats: SpecStats::default(),
        }
    }

    /// Draft at most `limit` tokens to follow `history` into `out` (cleared first).
    pub fn propose(
        &mut self,
        history: &[u32],
        limit: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), crate::ModelError> {
        out.clear();
        let want = self.len.min(limit);
        if want == 0 || history.is_empty() {
            return Ok(());
        }
        // Keep the longest cached prefix of the history, recomputing at least its last token
        // (whose logits start the draft).
        let common = self
            .fed
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
            .min(history.len() - 1);
        self.cache.truncate(common);
        self.fed.truncate(common);
        // A draft needs room for its own tokens too (all but the last are fed).
        if self.cache.max_len() < history.len() + want {
            return Ok(());
        }
        let mut logits =
            self.model
                .forward(&history[common..], &mut self.cache, crate::Logits::Last)?;
        self.fed.extend_from_slice(&history[common..]);
        loop {
            let t = crate::sampling::argmax(&logits);
            out.push(t);
            if out.len() == want {
                return Ok(());
            }
            logits = self
                .model
                .forward(&[t], &mut self.cache, crate::Logits::Last)?;
            self.fed.push(t);
        }
    }

    /// Count a verification: `accepted` of `drafted` tokens were kept.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if drafted > 0 {
            self.stats.rounds += 1;
            self.stats.drafted += drafted;
            self.stats.accepted += accepted;
            self.len = if accepted == drafted {
                (self.len * 2).min(self.max_draft)
            } else {
                (accepted + 1).clamp(1, self.max_draft)
            };
        }
    }
}

/// Whether two models share a vocabulary (the same `tokenizer.ggml.tokens`, in order), which a
/// draft model must: its token ids are verified as the main model's.
pub fn same_vocabulary(
    main: &modu_gguf::GgufFile,
    draft: &modu_gguf::GgufFile,
) -> Result<(), String> {
    let tokens = |f: &modu_gguf::GgufFile| {
        f.get_array("tokenizer.ggml.tokens")
            .and_then(|a| a.as_strings())
            .map(|t| t.to_vec())
    };
    match (tokens(main), tokens(draft)) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (Some(a), Some(b)) => {
            let at = a.iter().zip(&b).position(|(x, y)| x != y);
            Err(match at {
                Some(i) => format!(
                    "the draft model's token {i} is {:?}, the model's {:?}",
                    b[i], a[i]
                ),
                None => format!(
                    "the draft model has {} tokens, the model {}",
                    b.len(),
                    a.len()
                ),
            })
        }
        _ => Err("a model has no tokenizer.ggml.tokens".into()),
    }
}

/// Where the continuation of the most recent earlier occurrence of `history`'s last `n` tokens
/// starts, for the longest `n` in `n_max..=n_min` that has one.
fn lookup(history: &[u32], n_max: usize, n_min: usize) -> Option<usize> {
    let len = history.len();
    for n in (n_min..=n_max).rev() {
        if len <= n {
            continue;
        }
        let suffix = &history[len - n..];
        // Candidate starts `j` of an earlier copy, latest first; its continuation `j + n` must
        // lie inside the history (j + n < len), and the copy must not be the suffix itself.
        let lowest = (len - n).saturating_sub(MAX_LOOKBACK);
        let mut j = len - n;
        while j > lowest {
            j -= 1;
            if history[j..j + n] == *suffix {
                return Some(j + n);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_continue_the_latest_earlier_occurrence() {
        let mut d = NgramDrafter::new(SpecConfig::default());
        let mut out = Vec::new();
        // "1 2 3 9 ... 1 2 3 7 8 ... 1 2 3" -> the latest copy continues with 7 8.
        let h = [1, 2, 3, 9, 5, 1, 2, 3, 7, 8, 6, 1, 2, 3];
        d.propose(&h, 8, &mut out);
        assert_eq!(out, vec![7, 8, 6, 1]);
        // The limit caps the draft; nothing recurs: no draft.
        d.propose(&h, 2, &mut out);
        assert_eq!(out, vec![7, 8]);
        d.propose(&[1, 2, 3, 4, 5], 8, &mut out);
        assert!(out.is_empty());
        // A bigram is enough; a single token is not (ngram_min 2).
        d.propose(&[4, 5, 6, 4, 5], 8, &mut out);
        assert_eq!(out, vec![6, 4, 5]);
        d.propose(&[4, 5, 6, 7, 4], 8, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn longer_suffixes_win() {
        // The 3-gram "2 3 4" occurs once (followed by 5); the 2-gram "3 4" later (followed by 9).
        let h = [2, 3, 4, 5, 3, 4, 9, 2, 3, 4];
        let mut d = NgramDrafter::new(SpecConfig {
            ngram_max: 3,
            ..SpecConfig::default()
        });
        let mut out = Vec::new();
        d.propose(&h, 1, &mut out);
        assert_eq!(out, vec![5]);
    }

    #[test]
    fn draft_length_adapts_and_misses_back_off() {
        let cfg = SpecConfig::default();
        let mut d = NgramDrafter::new(cfg);
        let h = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2];
        let mut out = Vec::new();
        d.propose(&h, 100, &mut out);
        assert_eq!(out.len(), 4);
        d.observe(4, 4);
        d.propose(&h, 100, &mut out);
        assert_eq!(out.len(), 8, "full acceptance doubles the length");
        d.observe(8, 2);
        d.propose(&h, 100, &mut out);
        assert_eq!(out.len(), 3, "partial acceptance: one more than accepted");
        d.observe(3, 0);
        // A miss pauses drafting for 2 proposals, a second one for 4.
        for _ in 0..2 {
            d.propose(&h, 100, &mut out);
            assert!(out.is_empty());
        }
        d.propose(&h, 100, &mut out);
        assert_eq!(out.len(), 1);
        d.observe(1, 0);
        for _ in 0..4 {
            d.propose(&h, 100, &mut out);
            assert!(out.is_empty());
        }
        d.propose(&h, 100, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            d.stats,
            SpecStats {
                rounds: 4,
                drafted: 16,
                accepted: 6
            }
        );
    }
}
