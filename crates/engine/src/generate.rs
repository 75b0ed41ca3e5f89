//! The generation loop shared by `modu run`, `modu chat` and the server: prefill the prompt, then
//! sample one token at a time until end-of-generation, a stop string, the token limit or the end
//! of the context. Text is streamed in whole UTF-8 characters, and text that might be the start
//! of a stop string is held back until it is known not to be one.

use std::ops::ControlFlow;

use crate::constrain::Constraint;
use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::lora::ModuleRef;
use crate::models::{Logits, Model};
use crate::sampling::{top_logprobs, Sampler, SamplingParams};
use crate::speculate::{ModelDrafter, NgramDrafter, SpecConfig, SpecStats};
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; the stop string is not returned.
    /// Empty strings are ignored.
    pub stop: Vec<String>,
    /// Report this many most likely alternatives (with log-probabilities) per token.
    pub logprobs: Option<usize>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Speculative decoding by prompt lookup (`None`: one token per forward pass). Not used
    /// under a grammar.
    pub speculative: Option<SpecConfig>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: vec![],
            logprobs: None,
            ignore_eos: false,
            speculative: None,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct GeneratedToken {
    pub id: u32,
    /// The token's own text (lossy where it is part of a multi-byte character).
    pub piece: String,
    /// Log-probability under the model's raw distribution (before penalties and filters).
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared.
    Stop,
    /// The KV cache is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<GeneratedToken>,
    pub text: String,
    pub finish: FinishReason,
    /// What speculative decoding drafted and kept (all zero without it).
    pub spec: SpecStats,
}

/// Holds back text that could still turn into a stop string. Public so that other generation
/// loops (the server's scheduler) stop exactly where [`generate`] does.
///
/// Each stop string runs as a Knuth–Morris–Pratt automaton over the bytes of the output, so a
/// push costs O(stops × new bytes) whatever the stop strings are: the state of each automaton
/// is the length of the longest prefix of its stop string that ends the text so far, and the
/// text held back is the longest such prefix. When several stop strings complete in one push,
/// the one that starts first wins.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<StopAutomaton>,
    pending: String,
}

#[derive(Debug, Clone)]
struct StopAutomaton {
    pattern: Vec<u8>,
    /// `fail[i]`: length of the longest proper border of `pattern[..=i]`.
    fail: Vec<usize>,
    /// Bytes of `pattern` matched by the end of the text so far (< `pattern.len()`).
    state: usize,
}

impl StopAutomaton {
    fn new(p: &str) -> StopAutomaton {
        let pattern = p.as_bytes().to_vec();
        let mut fail = vec![0usize; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k;
        }
        StopAutomaton {
            pattern,
            fail,
            state: 0,
        }
    }

    /// Feed bytes; the index (into `bytes`) just past the first complete match, if any.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut q = self.state;
        for (j, &b) in bytes.iter().enumerate() {
            while q > 0 && self.pattern[q] != b {
                q = self.fail[q - 1];
            }
            if self.pattern[q] == b {
                q += 1;
            }
            if q == self.pattern.len() {
                self.state = self.fail[q - 1];
                return Some(j + 1);
            }
        }
        self.state = q;
        None
    }
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopAutomaton::new(s))
                .collect(),
            pending: String::new(),
        }
    }

    /// Feed new text; returns (text safe to emit, whether a stop string was hit).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        let base = self.pending.len();
        self.pending.push_str(text);
        let mut first: Option<usize> = None;
        for a in &mut self.stops {
            if let Some(end) = a.feed(text.as_bytes()) {
                let start = base + end - a.pattern.len();
                first = Some(first.map_or(start, |f| f.min(start)));
            }
        }
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            for a in &mut self.stops {
                a.state = 0;
            }
            return (out, true);
        }
        // Hold back the longest tail that is still the start of some stop string (it begins
        // at a character boundary: it equals the start of a UTF-8 string).
        let keep = self.stops.iter().map(|a| a.state).max().unwrap_or(0);
        let cut = self.pending.len() - keep.min(self.pending.len());
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Everything still held back (at the end of generation it can no longer become a stop).
    pub fn flush(&mut self) -> String {
        for a in &mut self.stops {
            a.state = 0;
        }
        std::mem::take(&mut self.pending)
    }
}

/// Generate from `prompt` (already tokenized, BOS included if wanted), continuing `cache`
/// (which may already hold a prefix of the prompt: only the uncached tail is prefilled).
/// `on_text` receives each piece of finished text and the token that completed it; returning
/// `ControlFlow::Break` cancels.
pub fn generate(
    model: &dyn Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: impl FnMut(&str, &GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    generate_with(model, tokenizer, cache, prompt, params, &[], on_text)
}

/// [`generate`] with LoRA modules applied to every forward pass (`(adapter, scale)` pairs, summed
/// in order; empty = the base model).
pub fn generate_with(
    model: &dyn Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    modules: &[ModuleRef],
    on_text: impl FnMut(&str, &GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    generate_constrained(
        model, tokenizer, cache, prompt, params, modules, None, on_text,
    )
}

/// [`generate_with`] under a grammar: each token is sampled from the logits with the
/// constraint's mask applied (log-probabilities stay those of the unmasked distribution), and
/// generation ends once the grammar is complete.
#[allow(clippy::too_many_arguments)]
pub fn generate_constrained(
    model: &dyn Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    modules: &[ModuleRef],
    constraint: Option<Constraint>,
    on_text: impl FnMut(&str, &GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    generate_inner(
        model, None, tokenizer, cache, prompt, params, modules, constraint, on_text,
    )
}

/// [`generate_with`] with speculative decoding by a draft model of the same vocabulary
/// (check with [`crate::speculate::same_vocabulary`]): each pass verifies up to
/// `params.speculative`'s `max_draft` (default 8) of the draft model's greedy tokens. The
/// output is exactly that of plain decoding; `Generation::spec` counts drafted and kept tokens.
#[allow(clippy::too_many_arguments)]
pub fn generate_drafted(
    model: &dyn Model,
    draft: &dyn Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    modules: &[ModuleRef],
    on_text: impl FnMut(&str, &GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    if draft.info().n_vocab != model.info().n_vocab {
        return Err(ModelError::DraftMismatch(format!(
            "it has {} logits per token, the model {}",
            draft.info().n_vocab,
            model.info().n_vocab
        )));
    }
    generate_inner(
        model,
        Some(draft),
        tokenizer,
        cache,
        prompt,
        params,
        modules,
        None,
        on_text,
    )
}

/// What proposes drafts for one generation.
enum Drafter<'a> {
    Ngram(NgramDrafter),
    Model(ModelDrafter<'a>),
}

impl Drafter<'_> {
    fn propose(
        &mut self,
        history: &[u32],
        limit: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        match self {
            Drafter::Ngram(d) => {
                d.propose(history, limit, out);
                Ok(())
            }
            Drafter::Model(d) => d.propose(history, limit, out),
        }
    }

    fn observe(&mut self, drafted: usize, accepted: usize) {
        match self {
            Drafter::Ngram(d) => d.observe(drafted, accepted),
            Drafter::Model(d) => d.observe(drafted, accepted),
        }
    }

    fn stats(&self) -> SpecStats {
        match self {
            Drafter::Ngram(d) => d.stats,
            Drafter::Model(d) => d.stats,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn generate_inner(
    model: &dyn Model,
    draft_model: Option<&dyn Model>,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    params: &GenerateParams,
    modules: &[ModuleRef],
    mut constraint: Option<Constraint>,
    mut on_text: impl FnMut(&str, &GeneratedToken) -> ControlFlow<()>,
) -> Result<Generation, ModelError> {
    let mods: &[&[ModuleRef]] = if modules.is_empty() { &[] } else { &[modules] };
    if prompt.is_empty() {
        return Err(ModelError::EmptyInput);
    }
    // Reuse a cached prefix; always recompute at least the last prompt token to get its logits.
    let cached = cache.len().min(prompt.len() - 1);
    cache.truncate(cached);
    cache.check_room(prompt.len() - cached)?;
    // `rows` holds one row of logits per token of the last pass's tail: the row for the last
    // token fed, then one per draft token (`draft[i]` is checked against `rows[i]`).
    let mut rows =
        model.forward_seqs_with(&[&prompt[cached..]], &mut [&mut *cache], Logits::Last, mods)?;
    let n_vocab = model.info().n_vocab;
    let mut draft: Vec<u32> = Vec::new();
    let mut drafter = match (draft_model, &params.speculative, &constraint) {
        (_, _, Some(_)) => None,
        (Some(m), cfg, None) => Some(Drafter::Model(ModelDrafter::new(
            m,
            cache.max_len(),
            cfg.map_or(SpecConfig::default().max_draft, |c| c.max_draft),
        ))),
        (None, Some(cfg), None) => Some(Drafter::Ngram(NgramDrafter::new(*cfg))),
        (None, None, None) => None,
    };

    let mut sampler = Sampler::new(params.sampling.clone());
    let mut history = prompt.to_vec();
    let mut decoder = StreamDecoder::new(tokenizer);
    let mut stopper = StopMatcher::new(&params.stop);
    let mut out = Generation {
        prompt_tokens: prompt.len(),
        tokens: vec![],
        text: String::new(),
        finish: FinishReason::Length,
        spec: SpecStats::default(),
    };
    let mut finish = FinishReason::Length;
    'gen: while out.tokens.len() < params.max_tokens {
        // The cache holds the last pass's input: the token before it and the draft.
        let base = cache.len() - draft.len() - 1;
        let mut accepted = 0;
        let mut next = None;
        for (i, logits) in rows.chunks_exact_mut(n_vocab).enumerate() {
            let raw = constraint.as_ref().map(|_| logits.to_vec());
            let mut grammar_done = false;
            if let Some(c) = constraint.as_mut() {
                let mask = c.mask().map_err(ModelError::Grammar)?;
                mask.apply(logits);
                grammar_done = mask.finished;
            }
            let (id, kept) = match draft.get(i) {
                Some(&d) => sampler.verify(logits, &history, d),
                None => (sampler.sample(logits, &history), false),
            };
            if let Some(c) = constraint.as_mut() {
                c.advance(id);
            }
            let (logprob, top) = top_logprobs(
                raw.as_deref().unwrap_or(logits),
                id,
                params.logprobs.unwrap_or(0),
            );
            let tok = GeneratedToken {
                id,
                piece: String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned(),
                logprob,
                top,
            };
            history.push(id);
            accepted += kept as usize;
            let mut ended = None;
            if (grammar_done || !params.ignore_eos) && tokenizer.is_eog(id) {
                out.tokens.push(tok);
                ended = Some(FinishReason::Eos);
            } else {
                let text = decoder.push(id);
                let (emit, hit) = stopper.push(&text);
                out.text.push_str(&emit);
                let flow = on_text(&emit, &tok);
                out.tokens.push(tok);
                if hit {
                    ended = Some(FinishReason::Stop);
                } else if flow.is_break() {
                    ended = Some(FinishReason::Cancelled);
                } else if out.tokens.len() >= params.max_tokens {
                    ended = Some(FinishReason::Length);
                }
            }
            if let Some(f) = ended {
                // Keep the cache to what the history holds: the fed token and the kept draft.
                cache.truncate(base + 1 + accepted);
                if let Some(d) = drafter.as_mut() {
                    d.observe(draft.len(), accepted);
                }
                finish = f;
                break 'gen;
            }
            if !kept {
                next = Some(id);
                break;
            }
        }
        let next = next.expect("the last row has no draft, so it ends the loop");
        cache.truncate(base + 1 + accepted);
        if let Some(d) = drafter.as_mut() {
            d.observe(draft.len(), accepted);
        }
        let room = cache.max_len().saturating_sub(cache.len());
        if room == 0 {
            finish = FinishReason::ContextFull;
            break;
        }
        // Draft what may follow `next`: at most what the context and the token limit leave
        // (the pass after a fully accepted draft yields one token more).
        draft.clear();
        if let Some(d) = drafter.as_mut() {
            let left = params.max_tokens - out.tokens.len();
            d.propose(&history, (room - 1).min(left.saturating_sub(1)), &mut draft)?;
        }
        let mut input = Vec::with_capacity(1 + draft.len());
        input.push(next);
        input.extend_from_slice(&draft);
        rows = model.forward_seqs_tail(&[&input], &mut [&mut *cache], &[input.len()], mods)?;
    }
    if let Some(d) = &drafter {
        out.spec = d.stats();
    }
    if finish != FinishReason::Stop {
        let mut rest = decoder.finish();
        rest = {
            let (emit, _) = stopper.push(&rest);
            emit + &stopper.flush()
        };
        if !rest.is_empty() {
            out.text.push_str(&rest);
            if let Some(last) = out.tokens.last() {
                let last = last.clone();
                let _ = on_text(&rest, &last);
            }
        }
    }
    out.finish = finish;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let stops = vec!["</end>".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hello </"), ("hello ".to_string(), false));
        assert_eq!(m.push("en"), (String::new(), false));
        assert_eq!(m.push("d> more"), (String::new(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("a </b"), ("a </b".to_string(), false));
        assert_eq!(m.push("안녕"), ("안녕".to_string(), false));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let stops = vec![String::new(), "!".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hi"), ("hi".to_string(), false));
        assert_eq!(m.push(" there!"), (" there".to_string(), true));
    }

    /// The quadratic matcher this one replaced, as the reference.
    fn reference(stops: &[String], pending: &mut String, text: &str) -> (String, bool) {
        pending.push_str(text);
        if let Some(at) = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| pending.find(s.as_str()))
            .min()
        {
            let out = pending[..at].to_string();
            pending.clear();
            return (out, true);
        }
        let mut keep = 0;
        for s in stops {
            for (i, _) in pending.char_indices() {
                let suffix = &pending[i..];
                if suffix.len() > keep && s.starts_with(suffix) {
                    keep = suffix.len();
                }
            }
        }
        let cut = pending.len() - keep;
        let out = pending[..cut].to_string();
        pending.drain(..cut);
        (out, false)
    }

    #[test]
    fn automaton_agrees_with_the_reference_on_random_text() {
        let alphabet = ["a", "b", "ab", "가", "나", " ", "aab"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _case in 0..3000 {
            let stops: Vec<String> = (0..1 + next(3))
                .map(|_| {
                    (0..next(5))
                        .map(|_| alphabet[next(alphabet.len())])
                        .collect()
                })
                .collect();
            let mut m = StopMatcher::new(&stops);
            let mut pending = String::new();
            for _ in 0..12 {
                let piece: String = (0..next(4))
                    .map(|_| alphabet[next(alphabet.len())])
                    .collect();
                let want = reference(&stops, &mut pending, &piece);
                assert_eq!(m.push(&piece), want, "stops {stops:?}, piece {piece:?}");
                if want.1 {
                    break;
                }
            }
        }
    }
}
