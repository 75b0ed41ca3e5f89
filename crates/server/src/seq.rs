//! One running sequence of the scheduler and how a token is chosen for it: the grammar mask
//! (structured output), sampling, stop strings and the events its client receives.
//!
//! A constrained sequence's next mask is computed on another thread while the batch's forward
//! pass runs (see [`modu_engine::Constraint`]). When a forward pass ends before the mask is
//! ready, the sequence's logits are *held* and the sequence sits out the next step instead of
//! stalling the batch; it samples as soon as its mask arrives.

use std::sync::atomic::Ordering;
use std::time::Instant;

use modu_engine::generate::{FinishReason, GenerateParams, GeneratedToken, StopMatcher};
use modu_engine::sampling::top_logprobs;
use modu_engine::{
    Constraint, KvCache, ModuleRef, NgramDrafter, Sampler, StreamDecoder, Tokenizer,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::scheduler::{Cancelled, SeqEvent, SeqStats, ServiceTag};

/// A request's constraint on its output.
pub struct SeqConstraint {
    pub constraint: Constraint,
    /// Applied only from the point where the output contains this text (tool calls that the
    /// model may or may not make, `tool_choice: auto`); the output after the trigger is fed to
    /// the constraint first. `None`: applied from the first token.
    pub trigger: Option<String>,
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("trigger", &self.trigger)
            .finish()
    }
}

/// A running sequence.
pub(crate) struct Seq<'t> {
    pub(crate) events: UnboundedSender<SeqEvent>,
    pub(crate) params: GenerateParams,
    /// Prompt then generated tokens.
    pub(crate) history: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Prompt tokens taken from the prefix cache.
    pub(crate) cached: usize,
    /// How many of `history` are in the cache.
    pub(crate) fed: usize,
    pub(crate) cache: KvCache,
    pub(crate) sampler: Sampler,
    /// Prompt-lookup drafting, for a request that speculates.
    pub(crate) drafter: Option<NgramDrafter>,
    /// The draft fed after the next token in this step (verified against its rows).
    pub(crate) draft: Vec<u32>,
    pub(crate) decoder: StreamDecoder<'t>,
    pub(crate) stopper: StopMatcher,
    pub(crate) generated: usize,
    pub(crate) arrived: Instant,
    pub(crate) last_token: Option<Instant>,
    pub(crate) stats: SeqStats,
    /// Set during a step for a sequence that leaves the batch at its end.
    pub(crate) leave: Leave,
    pub(crate) modules: Vec<ModuleRef>,
    pub(crate) cache_key: u64,
    pub(crate) cancelled: UnboundedSender<Cancelled>,
    /// The service it runs for: batch slots are shared between services by priority.
    pub(crate) service: ServiceTag,
    pub(crate) constraint: Option<SeqConstraint>,
    /// The output since the last token, bounded, while a trigger is awaited.
    pub(crate) trigger_window: String,
    /// Logits of a sequence waiting for its mask (see the module docs).
    pub(crate) held: Option<Vec<f32>>,
}

impl Seq<'_> {
    /// Report what this sequence used to its request's accounting (its client is gone).
    pub(crate) fn report_cancelled(&self) {
        let _ = self.cancelled.send(Cancelled {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            cached_tokens: self.cached,
            stats: self.stats.clone(),
        });
    }

    /// The constraint that applies to the next token, if any.
    fn active_constraint(&mut self) -> Option<&mut Constraint> {
        match &mut self.constraint {
            Some(c) if c.trigger.is_none() => Some(&mut c.constraint),
            _ => None,
        }
    }
}

/// Why a sequence leaves the running batch at the end of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    Stay,
    /// Done (its `Done` event sent): its cache goes to the prefix cache.
    Finished,
    /// An error was reported to its client.
    Failed,
    /// Its KV was freed; it waits in the preempted list to be recomputed.
    Preempt,
}

/// What became of a sequence given its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sampled {
    /// A token was sampled and the sequence goes on.
    Continue,
    /// Its mask is not ready: the logits are held.
    Held,
    /// It left the batch for this reason.
    Leave(Leave),
}

/// Apply the sequence's mask (waiting for it only if `wait`), then sample and report one token.
pub(crate) fn sample(
    s: &mut Seq<'_>,
    mut logits: Vec<f32>,
    wait: bool,
    tok: &Tokenizer,
    metrics: &Metrics,
) -> Sampled {
    let mut raw = None;
    let mut grammar_done = false;
    let want_raw = s.params.logprobs.is_some();
    if let Some(c) = s.active_constraint() {
        let mask = if wait { Some(c.mask()) } else { c.try_mask() };
        match mask {
            None => {
                metrics.mask_waits.fetch_add(1, Ordering::Relaxed);
                s.held = Some(logits);
                return Sampled::Held;
            }
            Some(Err(e)) => {
                let _ = s.events.send(SeqEvent::Error(format!(
                    "the output constraint failed: {e}"
                )));
                return Sampled::Leave(Leave::Failed);
            }
            Some(Ok(mask)) => {
                if let Some(&dt) = c.mask_times().last() {
                    metrics.mask_times.observe(dt);
                }
                if want_raw {
                    raw = Some(logits.clone());
                }
                mask.apply(&mut logits);
                grammar_done = mask.finished;
            }
        }
    }
    match sample_one(s, &logits, raw.as_deref(), grammar_done, None, tok, metrics) {
        Ok((true, _)) => Sampled::Leave(Leave::Finished),
        Ok((false, _)) => Sampled::Continue,
        Err(()) => Sampled::Leave(Leave::Failed),
    }
}

/// The tokens of a speculating sequence's verification pass: `rows` holds one row of logits
/// for the token it fed and one per draft token. Tokens are taken in order while they are the
/// draft (each reported like any other token); the first that differs, or the one after a
/// fully kept draft, ends the walk and is the next token to feed. The cache drops the rejected
/// part of the draft. Returns how many draft tokens were kept, and whether the sequence ended.
pub(crate) fn verify_draft(
    s: &mut Seq<'_>,
    rows: &[f32],
    n_vocab: usize,
    tok: &Tokenizer,
    metrics: &Metrics,
) -> Sampled {
    let draft = std::mem::take(&mut s.draft);
    let mut kept = 0;
    let mut outcome = Sampled::Continue;
    for (i, logits) in rows.chunks_exact(n_vocab).enumerate() {
        match sample_one(s, logits, None, false, draft.get(i).copied(), tok, metrics) {
            Ok((done, k)) => {
                kept += k as usize;
                if done {
                    outcome = Sampled::Leave(Leave::Finished);
                    break;
                }
                if !k {
                    break;
                }
            }
            Err(()) => {
                outcome = Sampled::Leave(Leave::Failed);
                break;
            }
        }
    }
    // The cache holds the fed token and the whole draft; keep what the history holds.
    let rejected = draft.len() - kept;
    let len = s.cache.len() - rejected;
    s.cache.truncate(len);
    s.fed = len.min(s.fed + 1 + kept);
    s.stats.draft_tokens += draft.len();
    s.stats.accepted_tokens += kept;
    metrics
        .spec_draft_tokens
        .fetch_add(draft.len() as u64, Ordering::Relaxed);
    metrics
        .spec_accepted_tokens
        .fetch_add(kept as u64, Ordering::Relaxed);
    if let Some(d) = s.drafter.as_mut() {
        d.observe(draft.len(), kept);
    }
    outcome
}

/// Sample and report one token, mirroring `modu_engine::generate::generate_constrained` step
/// for step so that greedy output is the same as there. `raw`: the logits before the mask
/// (logprobs report the model's own distribution). `draft`: the drafted token to verify here.
/// Returns whether the sequence is finished and whether the token is the draft.
fn sample_one(
    s: &mut Seq<'_>,
    logits: &[f32],
    raw: Option<&[f32]>,
    grammar_done: bool,
    draft: Option<u32>,
    tok: &Tokenizer,
    metrics: &Metrics,
) -> Result<(bool, bool), ()> {
    let (id, kept) = match draft {
        Some(d) => s.sampler.verify(logits, &s.history, d),
        None => (s.sampler.sample(logits, &s.history), false),
    };
    if let Some(c) = s.active_constraint() {
        c.advance(id);
    }
    let now = Instant::now();
    match s.last_token {
        None => {
            metrics.ttft.observe(now - s.arrived);
            s.stats.ttft = Some(now - s.arrived);
        }
        Some(t) => metrics.inter_token.observe(now - t),
    }
    s.last_token = Some(now);
    let (logprob, top) = match s.params.logprobs {
        Some(k) => top_logprobs(raw.unwrap_or(logits), id, k),
        None => (0.0, Vec::new()),
    };
    let token = GeneratedToken {
        id,
        piece: String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
        logprob,
        top,
    };
    s.history.push(id);
    s.generated += 1;
    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let reason = if (grammar_done || !s.params.ignore_eos) && tok.is_eog(id) {
        Some(FinishReason::Eos)
    } else {
        let text = s.decoder.push(id);
        watch_trigger(s, &text, tok)?;
        let (emit, hit) = s.stopper.push(&text);
        if s.events
            .send(SeqEvent::Text {
                text: emit,
                token: Some(token),
            })
            .is_err()
        {
            // The client is gone: drop the sequence (and its cache) now.
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            s.report_cancelled();
            return Ok((true, kept));
        }
        if hit {
            Some(FinishReason::Stop)
        } else if s.generated >= s.params.max_tokens {
            Some(FinishReason::Length)
        } else if s.cache.check_room(1).is_err() {
            Some(FinishReason::ContextFull)
        } else {
            None
        }
    };
    match reason {
        Some(r) => {
            finish(s, r);
            Ok((true, kept))
        }
        None => Ok((false, kept)),
    }
}

/// Most bytes of output kept while waiting for a trigger (beyond the trigger's own length).
const TRIGGER_SLACK: usize = 64;

/// Start a triggered constraint once its trigger text has appeared in the output; the output
/// after the trigger (tokenized as text) is what the constraint consumes first.
fn watch_trigger(s: &mut Seq<'_>, text: &str, tok: &Tokenizer) -> Result<(), ()> {
    let Some(SeqConstraint {
        constraint,
        trigger: Some(trigger),
    }) = &mut s.constraint
    else {
        return Ok(());
    };
    s.trigger_window.push_str(text);
    let Some(at) = s.trigger_window.find(trigger.as_str()) else {
        let keep = trigger.len() + TRIGGER_SLACK;
        if s.trigger_window.len() > 2 * keep {
            let mut cut = s.trigger_window.len() - keep;
            while !s.trigger_window.is_char_boundary(cut) {
                cut += 1;
            }
            s.trigger_window.drain(..cut);
        }
        return Ok(());
    };
    let tail = s.trigger_window[at + trigger.len()..].to_string();
    s.trigger_window.clear();
    let ids = if tail.is_empty() {
        Vec::new()
    } else {
        tok.encode(&tail, false, false).unwrap_or_default()
    };
    if let Err(e) = constraint.advance_many(&ids) {
        let _ = s.events.send(SeqEvent::Error(format!(
            "the output constraint failed: {e}"
        )));
        return Err(());
    }
    if let Some(c) = &mut s.constraint {
        c.trigger = None;
    }
    Ok(())
}

/// Flush held-back text (unless a stop string ended the sequence) and report the end.
pub(crate) fn finish(s: &mut Seq<'_>, reason: FinishReason) {
    if reason != FinishReason::Stop {
        let rest = s.decoder.finish();
        let (emit, _) = s.stopper.push(&rest);
        let rest = emit + &s.stopper.flush();
        if !rest.is_empty() {
            let _ = s.events.send(SeqEvent::Text {
                text: rest,
                token: None,
            });
        }
    }
    let _ = s.events.send(SeqEvent::Done {
        finish: reason,
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated,
        cached_tokens: s.cached,
        stats: s.stats.clone(),
    });
}
