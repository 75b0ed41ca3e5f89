//! Constrained decoding: JSON schemas, Lark grammars and regular expressions enforced at
//! sampling time with a token mask, on top of llguidance (the engine behind llama.cpp's and
//! vLLM's grammars).
//!
//! * [`GrammarEngine`] is built once per tokenizer: llguidance's token trie over the raw bytes of
//!   every token (control tokens are marked with llguidance's 0xFF prefix, so text grammars never
//!   allow them) and its parser factory with bounded compile and per-step work
//!   ([`GrammarLimits`]): a hostile schema fails to compile with an error instead of taking the
//!   sampling thread hostage.
//! * [`Constraint`] is one sequence's matcher. The mask for the next token is computed on a
//!   mask worker thread as soon as the previous token is known ([`Constraint::advance`]), so it overlaps the
//!   forward pass that produces the logits it will mask; [`Constraint::try_mask`] lets a batch
//!   scheduler go on with the other sequences while one mask is still being computed.
//!
//! End of generation: llguidance allows its EOS token once the grammar accepts; the mask then
//! allows every end-of-generation token of the model (ChatML models end a turn with `<|im_end|>`,
//! not `<|endoftext|>`), and once the grammar cannot continue, only those.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A value valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect (which also embeds JSON schemas with `%json`).
    Lark(String),
    /// Text matching this regular expression in full.
    Regex(String),
}

/// Bounds on the work one grammar may cost; see llguidance's `ParserLimits` for the units.
#[derive(Debug, Clone)]
pub struct GrammarLimits {
    /// Largest grammar source accepted, in bytes (schemas, Lark text, regexes).
    pub max_source_bytes: usize,
    /// Lexer fuel for building the grammar (about 50k per millisecond).
    pub compile_fuel: u64,
    /// Lexer fuel for one token mask (about 14k per millisecond).
    pub step_fuel: u64,
    /// Earley items for one token mask (about 20k per millisecond).
    pub step_items: usize,
    /// Lexer states kept per grammar (1–2 kB each).
    pub max_lexer_states: usize,
    /// Symbols in the compiled grammar.
    pub max_grammar_size: usize,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        GrammarLimits {
            max_source_bytes: 256 * 1024,
            compile_fuel: 1_000_000,
            step_fuel: 200_000,
            step_items: 50_000,
            max_lexer_states: 100_000,
            max_grammar_size: 200_000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("{what} is {len} bytes; at most {max} are accepted")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("constrained decoding failed: {0}")]
    Runtime(String),
    #[error("the grammar admits no token here (the model's vocabulary cannot continue it)")]
    Dead,
}

/// llguidance's view of a modu tokenizer: the token trie, and tokenization by the trie's greedy
/// longest match (declared non-canonical, so llguidance never forces tokens on that basis).
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The per-tokenizer half of constrained decoding: build once, share (it is `Send + Sync`).
pub struct GrammarEngine {
    factory: ParserFactory,
    eog: Vec<u32>,
    vocab: usize,
    limits: GrammarLimits,
}

impl std::fmt::Debug for GrammarEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEngine")
            .field("vocab", &self.vocab)
            .field("eog", &self.eog)
            .finish()
    }
}

impl GrammarEngine {
    pub fn new(tok: &Tokenizer) -> Result<GrammarEngine, GrammarError> {
        Self::with_limits(tok, GrammarLimits::default())
    }

    pub fn with_limits(
        tok: &Tokenizer,
        limits: GrammarLimits,
    ) -> Result<GrammarEngine, GrammarError> {
        let vocab = tok.vocab_size();
        let eog = tok.eog_ids();
        let Some(&eos) = eog.first() else {
            return Err(GrammarError::Invalid(
                "the model has no end-of-generation token, so a grammar could never end".into(),
            ));
        };
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let b = tok.token_bytes(id);
                if tok.is_special(id) || eog.contains(&id) {
                    let mut w = Vec::with_capacity(b.len() + 1);
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    w.extend_from_slice(b);
                    w
                } else {
                    b.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        factory.quiet();
        let l = factory.limits_mut();
        l.initial_lexer_fuel = limits.compile_fuel;
        l.step_lexer_fuel = limits.step_fuel;
        l.step_max_items = limits.step_items;
        l.max_lexer_states = limits.max_lexer_states;
        l.max_grammar_size = limits.max_grammar_size;
        l.verbose_errors = false;
        Ok(GrammarEngine {
            factory,
            eog,
            vocab,
            limits,
        })
    }

    pub fn limits(&self) -> &GrammarLimits {
        &self.limits
    }

    /// Compile `grammar` into a fresh matcher; its first mask starts computing at once.
    pub fn compile(self: &Arc<Self>, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let max = self.limits.max_source_bytes;
        let check = |what: &'static str, len: usize| {
            if len > max {
                Err(GrammarError::TooLarge { what, len, max })
            } else {
                Ok(())
            }
        };
        let top = match grammar {
            Grammar::JsonObject => json_schema(serde_json::json!({"type": "object"})),
            Grammar::JsonSchema(schema) => {
                check(
                    "the JSON schema",
                    serde_json::to_string(schema).map_or(0, |s| s.len()),
                )?;
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(GrammarError::Invalid(
                        "a JSON schema must be an object (or true/false)".into(),
                    ));
                }
                json_schema(schema.clone())
            }
            Grammar::Lark(src) => {
                check("the grammar", src.len())?;
                if src.trim().is_empty() {
                    return Err(GrammarError::Invalid("the grammar is empty".into()));
                }
                TopLevelGrammar::from_lark(src.clone())
            }
            Grammar::Regex(rx) => {
                check("the regex", rx.len())?;
                TopLevelGrammar::from_regex(rx)
            }
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| GrammarError::Invalid(clean_error(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(clean_error(&e)));
        }
        let mut c = Constraint {
            engine: self.clone(),
            matcher: Some(matcher),
            pending: None,
            mask_time: Vec::new(),
        };
        c.start(Vec::new());
        Ok(c)
    }
}

/// A JSON-schema grammar on one line with Python's `json.dumps` separators (`, ` and `: `, no
/// free whitespace): the style models saw most in training, and no room for a model to wander
/// off into endless whitespace. A schema's own `x-guidance` options win.
fn json_schema(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// llguidance's messages, minus the internal context lines.
fn clean_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or(e).trim();
    first.to_string()
}

type MaskResult = (Matcher, Result<SimpleVob, GrammarError>, Duration);

/// One sequence's constraint. Between [`Constraint::advance`] and the next mask being taken,
/// the matcher lives on a mask worker thread.
pub struct Constraint {
    engine: Arc<GrammarEngine>,
    matcher: Option<Matcher>,
    pending: Option<mpsc::Receiver<MaskResult>>,
    /// Time spent computing each mask (consuming the token included).
    mask_time: Vec<Duration>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

/// The allowed tokens for one step.
#[derive(Debug, Clone)]
pub struct TokenMask {
    allowed: SimpleVob,
    /// Only end-of-generation tokens remain (the grammar is complete).
    pub finished: bool,
}

impl TokenMask {
    pub fn allows(&self, id: u32) -> bool {
        self.allowed.is_allowed(id)
    }

    /// Set every disallowed logit to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        let n = logits.len().min(self.allowed.len());
        for (i, l) in logits[..n].iter_mut().enumerate() {
            if !self.allowed.get(i) {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in &mut logits[n..] {
            *l = f32::NEG_INFINITY;
        }
    }

    pub fn num_allowed(&self) -> usize {
        self.allowed.num_set()
    }
}

impl Constraint {
    /// Consume `tokens` and compute the next mask, on the mask workers.
    fn start(&mut self, tokens: Vec<u32>) {
        let Some(mut m) = self.matcher.take() else {
            return;
        };
        let (tx, rx) = mpsc::channel();
        self.pending = Some(rx);
        let engine = self.engine.clone();
        mask_workers::spawn(move || {
            let t0 = std::time::Instant::now();
            let res = (|| {
                for t in tokens {
                    m.consume_token(t)
                        .map_err(|e| GrammarError::Runtime(clean_error(&e.to_string())))?;
                }
                engine.mask_for(&mut m)
            })();
            let _ = tx.send((m, res, t0.elapsed()));
        });
    }

    /// Wait for a mask being computed and drop it (its matcher comes back).
    fn settle(&mut self) -> Result<(), GrammarError> {
        if self.pending.is_some() {
            self.mask()?;
        }
        Ok(())
    }

    /// The sampled token: advance the matcher and start computing the next mask.
    /// End-of-generation tokens end the constraint (nothing further is computed).
    pub fn advance(&mut self, token: u32) {
        if self.engine.eog.contains(&token) {
            return;
        }
        if self.matcher.is_none() && self.settle().is_err() {
            return; // the error comes back from the next `mask`
        }
        self.start(vec![token]);
    }

    /// Tokens that were produced without this constraint (the text after a trigger, for a
    /// constraint that starts mid-output): consume them and compute the next mask. A mask
    /// already being computed is waited for and dropped.
    pub fn advance_many(&mut self, tokens: &[u32]) -> Result<(), GrammarError> {
        self.settle()?;
        self.start(tokens.to_vec());
        Ok(())
    }

    fn take(&mut self, res: MaskResult) -> Result<TokenMask, GrammarError> {
        let (m, mask, dt) = res;
        self.matcher = Some(m);
        self.mask_time.push(dt);
        let allowed = mask?;
        let finished = self.matcher.as_ref().is_some_and(|m| m.is_stopped());
        Ok(TokenMask { allowed, finished })
    }

    /// The mask for the next token, waiting for it if it is still being computed.
    pub fn mask(&mut self) -> Result<TokenMask, GrammarError> {
        match self.pending.take() {
            None => Err(GrammarError::Runtime("no mask was started".into())),
            Some(rx) => match rx.recv() {
                Ok(r) => self.take(r),
                Err(_) => Err(GrammarError::Runtime(
                    "the mask computation panicked".into(),
                )),
            },
        }
    }

    /// The mask if it is ready; `None` while it is still being computed.
    pub fn try_mask(&mut self) -> Option<Result<TokenMask, GrammarError>> {
        let rx = self.pending.as_ref()?;
        match rx.try_recv() {
            Ok(r) => {
                self.pending = None;
                Some(self.take(r))
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.pending = None;
                Some(Err(GrammarError::Runtime(
                    "the mask computation panicked".into(),
                )))
            }
        }
    }

    /// Whether a mask is being computed (or computed and not yet taken).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Time each mask took so far, in order.
    pub fn mask_times(&self) -> &[Duration] {
        &self.mask_time
    }
}

impl GrammarEngine {
    fn mask_for(&self, m: &mut Matcher) -> Result<SimpleVob, GrammarError> {
        let eos = self.eog[0];
        let mut mask = if m.is_stopped() {
            if let Some(e) = m.get_error() {
                return Err(GrammarError::Runtime(clean_error(&e)));
            }
            let mut v = SimpleVob::alloc(self.vocab);
            v.allow_token(eos);
            v
        } else {
            m.compute_mask()
                .map_err(|e| GrammarError::Runtime(clean_error(&e.to_string())))?
        };
        if mask.is_allowed(eos) {
            for &t in &self.eog {
                mask.allow_token(t);
            }
        }
        if mask.num_set() == 0 {
            return Err(GrammarError::Dead);
        }
        Ok(mask)
    }
}

/// Threads that compute masks. Not rayon's pool: generation itself may run on a rayon worker
/// and block on a mask, which with one rayon thread would wait for a job queued behind itself;
/// and the forward pass's own workers must not be delayed by mask jobs queued among theirs.
mod mask_workers {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Arc, Mutex, OnceLock};

    type Job = Box<dyn FnOnce() + Send>;

    fn queue() -> &'static Mutex<Sender<Job>> {
        static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
        QUEUE.get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            // A mask takes well under a millisecond; a few threads cover many sequences.
            let n = std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(2, 4);
            for i in 0..n {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                std::thread::Builder::new()
                    .name(format!("modu-mask-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job drops its result sender: the waiter sees the panic.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    })
                    .expect("spawning a mask worker");
            }
            Mutex::new(tx)
        })
    }

    pub(super) fn spawn(job: impl FnOnce() + Send + 'static) {
        let tx = queue().lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = tx.send(Box::new(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_keep_the_first_line() {
        assert_eq!(clean_error("bad thing\n  at line 3\n"), "bad thing");
    }
}
