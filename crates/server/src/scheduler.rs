//! The scheduler: one OS thread owns the model and every running sequence (an actor), and HTTP
//! handlers talk to it through a channel. It batches continuously at token granularity: at each
//! step boundary finished or abandoned sequences leave, queued ones join, and one
//! `Model::forward_batch` call advances every participant: one token for each decoding sequence
//! and a chunk of prompt for sequences still prefilling. Prefill is chunked so that a long prompt
//! delays running decodes by one chunk per step instead of stalling them for the whole prompt.
//!
//! KV memory is paged ([`modu_engine::KvCache`] block tables drawing from one [`KvPool`] with
//! the `kv_mem` budget). A request is admitted only when the pool can hold its prompt; when a
//! step needs a block and the pool is empty, cached prefixes are dropped first (least recently
//! used), then the youngest running sequence is *preempted*: its blocks are freed and it waits,
//! ahead of new requests, to be recomputed (its prompt and the tokens it already generated are
//! prefilled again; nothing already sent to the client changes). Older sequences therefore
//! always make progress.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use modu_engine::generate::{FinishReason, GenerateParams, GeneratedToken};
use modu_engine::{KvCache, KvPool, Model, ModelError, ModuleRef, Tokenizer, KV_BLOCK};
use tokio::sync::mpsc::UnboundedSender;

use crate::fair::FairQueue;
use crate::metrics::Metrics;
use crate::prefix_cache::PrefixCache;
pub use crate::seq::SeqConstraint;
mod admission;

use crate::seq::{finish, sample, verify_draft, Leave, Sampled, Seq};
use crate::usage::StepMeter;

/// What a sequence reports to its HTTP handler.
#[derive(Debug)]
pub enum SeqEvent {
    /// New text (possibly empty while a UTF-8 character or a possible stop string is held
    /// back) and the token that produced it; `token` is `None` for text flushed at the end.
    Text {
        text: String,
        token: Option<GeneratedToken>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
        /// What the sequence cost, for usage accounting.
        stats: SeqStats,
    },
    Error(String),
}

/// Timings and resources of one finished sequence. CPU time, step time and energy of each
/// batched step are split over the step's sequences by the tokens each fed.
#[derive(Debug, Clone, Default)]
pub struct SeqStats {
    /// From arrival to first admission into the batch.
    pub queued: Duration,
    /// From arrival to the first generated token.
    pub ttft: Option<Duration>,
    /// Process CPU-seconds attributed to the sequence.
    pub cpu_s: f64,
    /// Wall-clock seconds of batch steps attributed to the sequence.
    pub wall_s: f64,
    /// Joules measured by RAPL, when the counters are readable.
    pub energy_j: Option<f64>,
    /// Speculative decoding: draft tokens verified, and how many were kept.
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
}

/// What a sequence whose client went away had used when the scheduler dropped it: sent on
/// [`SeqRequest::cancelled`] so that the request is still accounted (status `cancelled`).
#[derive(Debug, Clone, Default)]
pub struct Cancelled {
    pub prompt_tokens: usize,
    /// Tokens generated (and sent towards the client) before the sequence was dropped.
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub stats: SeqStats,
}

/// The service a request is accounted to and scheduled for.
#[derive(Debug, Clone)]
pub struct ServiceTag {
    pub name: Arc<str>,
    /// Admission weight (at least 1).
    pub priority: u32,
}

impl Default for ServiceTag {
    fn default() -> Self {
        ServiceTag {
            name: Arc::from(crate::services::DEFAULT_SERVICE),
            priority: 1,
        }
    }
}

/// One generation request.
pub struct SeqRequest {
    /// Prompt tokens, BOS included if wanted. Never empty.
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Where the sequence's events go; dropping the receiver cancels the sequence.
    pub events: UnboundedSender<SeqEvent>,
    pub arrived: Instant,
    /// Queued in this service's lane; lanes share the batch by priority.
    pub service: ServiceTag,
    /// LoRA modules with their scales (empty: the base model). The `Arc`s pin the module
    /// generations the request started with.
    pub modules: Vec<ModuleRef>,
    /// Identifies `modules` (generations and scales; 0 for the base model): cached prompt
    /// prefixes are only shared between requests with the same key, since the modules change
    /// the keys and values.
    pub cache_key: u64,
    /// Told what the sequence had used if it is dropped because `events` closed.
    pub cancelled: UnboundedSender<Cancelled>,
    /// Structured output: the grammar the tokens must follow.
    pub constraint: Option<SeqConstraint>,
}

/// Most tokens (decoding tokens and drafts) a step may feed before drafts stop being added:
/// drafts pay off while a step is bound by reading the weights, not once it is compute-bound.
pub const SPEC_STEP_TOKENS: usize = 16;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub parallel: usize,
    /// Most requests waiting for a batch slot; beyond that, submissions are refused.
    pub max_queue: usize,
    /// Context length (positions) of each sequence's KV cache.
    pub ctx: usize,
    /// Most prompt tokens prefilled per step, over all sequences.
    pub prefill_chunk: usize,
    /// Bytes of KV cache kept for reusing prompt prefixes of finished sequences; 0 disables.
    pub prefix_cache_mem: usize,
    /// Bytes of KV cache for everything (running sequences and cached prefixes); 0 means
    /// enough for `parallel` sequences of `ctx` positions.
    pub kv_mem: usize,
}

enum Command {
    Submit(Box<SeqRequest>),
    Shutdown,
    /// Make the scheduler thread panic outside the forward pass (tests of what a dead
    /// scheduler does to the server).
    Crash,
}

/// Submission refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    /// The scheduler thread has stopped.
    Stopped,
}

/// The handlers' side of the scheduler. Cloning shares the one scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    /// Requests submitted and not yet finished, queued or running: at most
    /// `parallel + max_queue`, beyond which submissions get 429.
    in_system: Arc<AtomicUsize>,
    max_queue: usize,
    parallel: usize,
    /// Becomes true when the scheduler thread has ended, for whatever reason.
    exited: tokio::sync::watch::Receiver<bool>,
}

/// Marks the scheduler as gone when its thread ends, by return or by panic.
struct ExitGuard {
    exited: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.metrics.scheduler_alive.store(0, Ordering::SeqCst);
        let _ = self.exited.send(true);
    }
}

impl SchedulerHandle {
    /// Whether the scheduler thread still runs.
    pub fn alive(&self) -> bool {
        !*self.exited.borrow()
    }

    /// Resolves once the scheduler thread has ended.
    pub async fn exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|&gone| gone).await;
    }

    #[doc(hidden)]
    /// Test hook: make the scheduler thread panic (outside any forward pass).
    pub fn crash_for_tests(&self) {
        let _ = self.tx.send(Command::Crash);
    }

    /// Queue a request, unless `parallel` are running and `max_queue` are already waiting.
    pub fn submit(&self, req: SeqRequest) -> Result<(), SubmitError> {
        let cap = self.max_queue + self.parallel;
        let mut cur = self.in_system.load(Ordering::SeqCst);
        loop {
            if cur >= cap {
                return Err(SubmitError::QueueFull);
            }
            match self
                .in_system
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.tx.send(Command::Submit(Box::new(req))).map_err(|_| {
            self.in_system.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Ask the thread to cancel everything and exit.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Start the scheduler thread.
pub fn spawn(
    model: Box<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SchedulerHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let in_system = Arc::new(AtomicUsize::new(0));
    let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
    let handle = SchedulerHandle {
        tx,
        in_system: in_system.clone(),
        max_queue: config.max_queue,
        parallel: config.parallel.max(1),
        exited: exited_rx,
    };
    metrics.scheduler_alive.store(1, Ordering::SeqCst);
    let guard = ExitGuard {
        exited: exited_tx,
        metrics: metrics.clone(),
    };
    let join = std::thread::Builder::new()
        .name("modu-scheduler".into())
        .spawn(move || {
            let _guard = guard;
            let probe = model.new_cache(config.ctx);
            let kv_mem = if config.kv_mem == 0 {
                config.parallel.max(1) * config.ctx.div_ceil(KV_BLOCK) * probe.block_bytes()
            } else {
                config.kv_mem
            };
            let pool = KvPool::new(kv_mem);
            metrics
                .kv_pool_limit
                .store(kv_mem as u64, Ordering::Relaxed);
            metrics
                .kv_block_bytes
                .store(probe.block_bytes() as u64, Ordering::Relaxed);
            let mut s = Scheduler {
                model: model.as_ref(),
                tok: &tokenizer,
                metrics,
                in_system,
                queue: FairQueue::default(),
                meter: StepMeter::new(),
                preempted: VecDeque::new(),
                running: Vec::new(),
                prefix: PrefixCache::new(config.prefix_cache_mem),
                block_bytes: probe.block_bytes(),
                pool,
                config,
            };
            // The loop runs on a worker of its own compute pool (as many workers as the global
            // pool, i.e. `--threads`), so every parallel matmul of a step is joined by this
            // thread instead of being injected from outside: an outside caller sleeps on a
            // latch and wakes the workers for each of the ~200 parallel operations of a decode
            // step, and those context switches cost ~20% of single-stream speed on two cores.
            match rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("modu-compute-{i}"))
                .build()
            {
                Ok(compute) => compute.install(|| s.run(rx)),
                Err(e) => {
                    eprintln!("modu: no dedicated compute pool ({e}); using the global one");
                    s.run(rx)
                }
            }
        })?;
    Ok((handle, join))
}

struct Scheduler<'m> {
    model: &'m dyn Model,
    tok: &'m Tokenizer,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    /// Shared with the handles: decremented whenever a request leaves the system.
    in_system: Arc<AtomicUsize>,
    /// Waiting requests, one lane per service (fair admission).
    queue: FairQueue<Box<SeqRequest>>,
    /// CPU time, wall time and energy of each step, for accounting.
    meter: StepMeter,
    /// Sequences whose KV was freed to make room; they rejoin before any queued request.
    preempted: VecDeque<Seq<'m>>,
    running: Vec<Seq<'m>>,
    prefix: PrefixCache,
    pool: Arc<KvPool>,
    block_bytes: usize,
}

impl<'m> Scheduler<'m> {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.queue.is_empty() && self.running.is_empty() && self.preempted.is_empty() {
                match rx.recv() {
                    Ok(Command::Submit(r)) => self.enqueue(r),
                    Ok(Command::Crash) => panic!("scheduler crash requested (test hook)"),
                    Ok(Command::Shutdown) | Err(_) => break,
                }
            }
            let mut stop = false;
            loop {
                match rx.try_recv() {
                    Ok(Command::Submit(r)) => self.enqueue(r),
                    Ok(Command::Crash) => panic!("scheduler crash requested (test hook)"),
                    Ok(Command::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // No new work can arrive: finish what is running, then exit.
                        if self.queue.is_empty()
                            && self.running.is_empty()
                            && self.preempted.is_empty()
                        {
                            stop = true;
                        }
                        break;
                    }
                }
            }
            if stop {
                break;
            }
            self.drop_abandoned();
            self.admit();
            self.publish_gauges();
            if !self.running.is_empty() {
                self.step();
                // Again after the step, so an idle server's gauges read zero.
                self.publish_gauges();
            }
        }
        // Shutdown: dropping the senders ends each stream; report it first.
        for s in self.running.drain(..).chain(self.preempted.drain(..)) {
            let _ = s
                .events
                .send(SeqEvent::Error("the server is shutting down".into()));
        }
        for r in self.queue.drain() {
            let _ = r
                .events
                .send(SeqEvent::Error("the server is shutting down".into()));
        }
        self.in_system.store(0, Ordering::SeqCst);
        self.publish_gauges();
    }

    fn enqueue(&mut self, r: Box<SeqRequest>) {
        let tag = r.service.clone();
        self.queue.push(&tag.name, tag.priority, r);
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.queue_depth.store(
            (self.queue.len() + self.preempted.len()) as u64,
            Ordering::Relaxed,
        );
        m.kv_pool_used
            .store(self.pool.used() as u64, Ordering::Relaxed);
        m.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let kv: usize = self.running.iter().map(|s| s.cache.bytes()).sum();
        m.kv_bytes.store(kv as u64, Ordering::Relaxed);
        m.prefix_cache_bytes
            .store(self.prefix.bytes() as u64, Ordering::Relaxed);
        m.prefix_cache_entries
            .store(self.prefix.len() as u64, Ordering::Relaxed);
        m.prefix_cache_evictions
            .store(self.prefix.evictions(), Ordering::Relaxed);
    }

    /// Keep a departing sequence's cache (the positions that went through the model) for
    /// prompts that share its prefix.
    fn retire(&mut self, s: Seq<'m>) {
        self.prefix
            .insert(&s.history[..s.fed], &s.cache, s.cache_key);
    }

    /// Cancel sequences whose client has gone (the receiver was dropped), freeing their caches.
    fn drop_abandoned(&mut self) {
        let before_q = self.queue.len();
        self.queue.retain(|r| {
            if !r.events.is_closed() {
                return true;
            }
            let _ = r.cancelled.send(Cancelled {
                prompt_tokens: r.prompt.len(),
                stats: SeqStats {
                    queued: r.arrived.elapsed(),
                    ..Default::default()
                },
                ..Default::default()
            });
            false
        });
        let before_p = self.preempted.len();
        self.preempted.retain(|s| {
            let closed = s.events.is_closed();
            if closed {
                s.report_cancelled();
            }
            !closed
        });
        let gone_q = before_q - self.queue.len() + before_p - self.preempted.len();
        let before_r = self.running.len();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let s = self.running.remove(i);
                s.report_cancelled();
                self.retire(s);
            } else {
                i += 1;
            }
        }
        let gone = gone_q + before_r - self.running.len();
        self.in_system.fetch_sub(gone, Ordering::SeqCst);
        self.metrics
            .cancelled
            .fetch_add(gone as u64, Ordering::Relaxed);
    }

    /// Reserve KV blocks for every planned sequence, oldest first. When the pool is short,
    /// cached prefixes go first, then the youngest running sequence is marked for preemption
    /// (its blocks freed now); a sequence that is alone and still cannot grow is finished.
    /// Returns the plan without the sequences that lost their place.
    fn reserve_plan(&mut self, plan: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
        let mut kept = Vec::with_capacity(plan.len());
        for (i, n) in plan {
            if self.running[i].leave != Leave::Stay {
                continue;
            }
            loop {
                match self.running[i].cache.reserve(n) {
                    Ok(()) => {
                        kept.push((i, n));
                        break;
                    }
                    Err(ModelError::KvBudget { .. }) => {
                        if self.prefix.evict_lru() {
                            continue;
                        }
                        let staying = || self.running.iter().filter(|s| s.leave == Leave::Stay);
                        if staying().count() == 1 {
                            // Nothing else holds memory: this sequence has used the whole pool.
                            finish(&mut self.running[i], FinishReason::ContextFull);
                            self.running[i].leave = Leave::Finished;
                            break;
                        }
                        let victim = self
                            .running
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.leave == Leave::Stay)
                            .max_by_key(|(_, s)| s.arrived)
                            .map(|(j, _)| j)
                            .expect("sequence i is running");
                        let v = &mut self.running[victim];
                        v.leave = Leave::Preempt;
                        v.cache = KvCache::new(&[], 0); // frees its blocks now
                        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
                        if victim == i {
                            break;
                        }
                    }
                    Err(e) => {
                        let s = &mut self.running[i];
                        let _ = s.events.send(SeqEvent::Error(format!("{e}")));
                        s.leave = Leave::Failed;
                        break;
                    }
                }
            }
        }
        kept.retain(|&(i, _)| self.running[i].leave == Leave::Stay);
        kept
    }

    /// One batched forward pass and, for sequences whose input is fully fed, one sampled token.
    /// Sequences still waiting for a grammar mask sit the pass out; when nothing else can
    /// run, the oldest of them waits for its mask.
    fn step(&mut self) {
        self.sample_held(false);
        // Decoding sequences always take part; prompt chunks (and the recomputation of
        // preempted sequences) share the per-step budget, oldest first (the running list is in
        // admission order).
        let mut budget = self.config.prefill_chunk.max(1);
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens to feed)
        for (i, s) in self.running.iter().enumerate() {
            let todo = s.history.len() - s.fed;
            if todo == 0 || s.leave != Leave::Stay {
                continue; // holding logits for its mask, or already leaving
            }
            if todo == 1 {
                plan.push((i, 1));
            } else if budget > 0 {
                let n = todo.min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        let plan = self.reserve_plan(plan);
        self.draft(&plan);
        if !plan.is_empty() {
            self.forward_and_sample(&plan);
        } else {
            self.sample_held(true);
        }
        self.remove_leavers();
    }

    /// Prompt-lookup drafts for the planned decoding sequences that speculate, oldest first,
    /// while the step stays within [`SPEC_STEP_TOKENS`]: a draft only takes KV blocks the pool
    /// has free (it never preempts anyone), and leaves room in the context for its own
    /// verification.
    fn draft(&mut self, plan: &[(usize, usize)]) {
        let planned: usize = plan.iter().map(|p| p.1).sum();
        let mut budget = SPEC_STEP_TOKENS.saturating_sub(planned);
        for &(i, n) in plan {
            let s = &mut self.running[i];
            s.draft.clear();
            let Some(d) = s.drafter.as_mut() else {
                continue;
            };
            if n != 1 || s.fed + 1 != s.history.len() || budget == 0 {
                continue;
            }
            let room = s.cache.max_len().saturating_sub(s.cache.len() + 1);
            let left = s.params.max_tokens.saturating_sub(s.generated + 1);
            d.propose(&s.history, budget.min(room / 2).min(left), &mut s.draft);
            if s.draft.is_empty() {
                continue;
            }
            let need = s.cache.blocks_needed(1 + s.draft.len()) * self.block_bytes;
            if need > self.pool.free() || s.cache.reserve(1 + s.draft.len()).is_err() {
                s.draft.clear();
                continue;
            }
            budget -= s.draft.len();
        }
    }

    /// Sample the sequences holding logits whose mask has arrived; with `wait`, the first
    /// holder waits for its mask (nothing else could run).
    fn sample_held(&mut self, wait: bool) {
        let mut waited = false;
        for s in self.running.iter_mut() {
            if s.leave != Leave::Stay {
                continue;
            }
            let Some(logits) = s.held.take() else {
                continue;
            };
            let block = wait && !waited;
            waited |= block;
            match sample(s, logits, block, self.tok, &self.metrics) {
                Sampled::Continue | Sampled::Held => {}
                Sampled::Leave(l) => s.leave = l,
            }
        }
    }

    fn forward_and_sample(&mut self, plan: &[(usize, usize)]) {
        let model = self.model;
        // Each sequence's input: its next history tokens, then its draft (if any); it wants
        // logits for the last token fed, and for every draft token.
        let inputs: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let mut v = s.history[s.fed..s.fed + n].to_vec();
                v.extend_from_slice(&s.draft);
                v
            })
            .collect();
        let tails: Vec<usize> = plan
            .iter()
            .map(|&(i, _)| 1 + self.running[i].draft.len())
            .collect();
        let result = {
            let mut chosen = plan.iter().map(|p| p.0).peekable();
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(plan.len());
            let mut modules: Vec<&[ModuleRef]> = Vec::with_capacity(plan.len());
            for (i, s) in self.running.iter_mut().enumerate() {
                if chosen.peek() == Some(&i) {
                    chosen.next();
                    caches.push(&mut s.cache);
                    modules.push(&s.modules);
                }
            }
            let tokens: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
            // No module anywhere in the batch: the plain base path.
            if modules.iter().all(|m| m.is_empty()) {
                modules.clear();
            }
            self.meter.start();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                model.forward_seqs_tail(&tokens, &mut caches, &tails, &modules)
            }))
        };
        // Attribute the step's CPU time, wall time and energy by tokens fed.
        let (cpu, wall, energy) = self.meter.stop();
        let total: usize = inputs.iter().map(Vec::len).sum();
        for (&(i, _), input) in plan.iter().zip(&inputs) {
            let share = input.len() as f64 / total.max(1) as f64;
            let st = &mut self.running[i].stats;
            st.cpu_s += cpu * share;
            st.wall_s += wall * share;
            if let Some(e) = energy {
                *st.energy_j.get_or_insert(0.0) += e * share;
            }
        }
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        let n_vocab = model.info().n_vocab;
        let rows: usize = tails.iter().sum();
        let logits = match result {
            Ok(Ok(l)) if l.len() == rows * n_vocab => l,
            other => {
                let msg = match other {
                    Ok(Ok(_)) => "the model returned the wrong number of results".to_string(),
                    Ok(Err(e)) => format!("the forward pass failed: {e}"),
                    Err(_) => "the forward pass panicked".to_string(),
                };
                // The caches of the batch are in an unknown state: fail those sequences.
                for &(i, _) in plan {
                    let s = &mut self.running[i];
                    let _ = s.events.send(SeqEvent::Error(msg.clone()));
                    s.leave = Leave::Failed;
                }
                return;
            }
        };
        let mut at = 0;
        for (&(i, n), &t) in plan.iter().zip(&tails) {
            let rows = &logits[at * n_vocab..(at + t) * n_vocab];
            at += t;
            let s = &mut self.running[i];
            let sampled = if s.draft.is_empty() {
                s.fed += n;
                if s.fed < s.history.len() {
                    continue; // more prompt to prefill
                }
                sample(s, rows.to_vec(), false, self.tok, &self.metrics)
            } else {
                verify_draft(s, rows, n_vocab, self.tok, &self.metrics)
            };
            if let Sampled::Leave(l) = sampled {
                s.leave = l;
            }
        }
    }

    /// Take finished, failed and preempted sequences out of the batch.
    fn remove_leavers(&mut self) {
        let mut i = self.running.len();
        while i > 0 {
            i -= 1;
            match self.running[i].leave {
                Leave::Stay => {}
                Leave::Finished => {
                    let s = self.running.remove(i);
                    self.in_system.fetch_sub(1, Ordering::SeqCst);
                    self.retire(s);
                }
                Leave::Failed => {
                    self.running.remove(i);
                    self.in_system.fetch_sub(1, Ordering::SeqCst);
                }
                Leave::Preempt => {
                    let mut s = self.running.remove(i);
                    s.leave = Leave::Stay;
                    s.fed = 0;
                    s.held = None; // recomputed with the prompt
                                   // Youngest first: removed in reverse order, each goes to the front.
                    self.preempted.push_front(s);
                }
            }
        }
    }
}
