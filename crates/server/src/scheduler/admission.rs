//! Admission: which waiting requests and preempted sequences join the running batch, with the
//! KV memory for their prompts, and how batch slots are shared between services.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use modu_engine::generate::StopMatcher;
use modu_engine::{KvCache, NgramDrafter, Sampler, StreamDecoder, KV_BLOCK};

use super::{Scheduler, SeqEvent, SeqRequest, SeqStats};
use crate::seq::{Leave, Seq};

impl Scheduler<'_> {
    /// A fresh cache for a sequence, counted in the pool.
    pub(super) fn new_cache(&self) -> KvCache {
        let mut c = self.model.new_cache(self.config.ctx);
        c.set_pool(self.pool.clone());
        c
    }

    /// Allocate the blocks for `n` more positions of `cache` at admission, keeping one more
    /// block free for growth, dropping cached prefixes if needed. False (nothing taken) if the
    /// pool cannot hold them now.
    pub(super) fn claim(&mut self, cache: &mut KvCache, n: usize) -> bool {
        let need = (cache.blocks_needed(n) + 1) * self.block_bytes;
        while self.pool.free() < need {
            if !self.prefix.evict_lru() {
                return false;
            }
        }
        cache.reserve(n).is_ok()
    }

    /// Move preempted sequences, then queued requests, into the running batch while there are
    /// slots and KV memory for their prompts (plus one block to grow into). Queued requests
    /// come in the fair queue's order (services by priority, FIFO within one), except that
    /// services below their share of the batch go first; a request that does not fit yet is not
    /// overtaken.
    pub(super) fn admit(&mut self) {
        loop {
            if self.running.len() >= self.config.parallel.max(1) {
                if self.preempt_for_share() {
                    continue;
                }
                break;
            }
            // A preempted sequence rejoins first, unless the queue's next request is of a
            // service below its share of the batch and the preempted one's is not.
            let owed = self.owed_services();
            let rejoin = match (self.preempted.front(), self.queue.front_preferring(&owed)) {
                (Some(p), Some(q)) => {
                    !self.below_share(&q.service.name) || self.below_share(&p.service.name)
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
            if rejoin {
                let s = self.preempted.front().expect("checked");
                let history = s.history.clone();
                let key = s.cache_key;
                let (mut cache, cached) = self.lookup_prefix(&history, key);
                if !self.claim(&mut cache, history.len() - cached) {
                    break;
                }
                let mut s = self.preempted.pop_front().expect("front exists");
                s.cache = cache;
                s.fed = cached;
                self.running.push(s);
                continue;
            }
            let Some(r) = self.queue.front_preferring(&owed) else {
                break;
            };
            if r.prompt.is_empty() || r.prompt.len() >= self.config.ctx {
                let msg = format!(
                    "the prompt has {} tokens; the context limit is {}",
                    r.prompt.len(),
                    self.config.ctx
                );
                let r = self
                    .queue
                    .pop_front_preferring(&owed)
                    .expect("front exists");
                self.reject(&r, msg);
                continue;
            }
            let prompt_blocks = r.prompt.len().div_ceil(KV_BLOCK) + 1;
            if prompt_blocks * self.block_bytes > self.pool.limit() {
                let msg = format!(
                    "the prompt has {} tokens, which need {} KiB of KV cache; the server's KV memory (--kv-mem) is {} KiB",
                    r.prompt.len(),
                    (prompt_blocks * self.block_bytes).div_ceil(1 << 10),
                    self.pool.limit() >> 10
                );
                let r = self
                    .queue
                    .pop_front_preferring(&owed)
                    .expect("front exists");
                self.reject(&r, msg);
                continue;
            }
            let prompt = r.prompt.clone();
            let key = r.cache_key;
            let (mut cache, cached) = self.lookup_prefix(&prompt, key);
            if !self.claim(&mut cache, prompt.len() - cached) {
                break;
            }
            if cached > 0 {
                let m = &self.metrics;
                m.prefix_hits.fetch_add(1, Ordering::Relaxed);
                m.prefix_reused_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
            }
            let r = *self
                .queue
                .pop_front_preferring(&owed)
                .expect("front exists");
            self.metrics
                .prompt_tokens
                .fetch_add(r.prompt.len() as u64, Ordering::Relaxed);
            self.metrics
                .prefilled_tokens
                .fetch_add((r.prompt.len() - cached) as u64, Ordering::Relaxed);
            self.running.push(Seq {
                sampler: Sampler::new(r.params.sampling.clone()),
                // Drafts are never checked against a grammar.
                drafter: r
                    .params
                    .speculative
                    .filter(|_| r.constraint.is_none())
                    .map(NgramDrafter::new),
                draft: Vec::new(),
                stopper: StopMatcher::new(&r.params.stop),
                decoder: StreamDecoder::new(self.tok),
                cache,
                prompt_len: r.prompt.len(),
                cached,
                history: r.prompt,
                fed: cached,
                events: r.events,
                params: r.params,
                generated: 0,
                stats: SeqStats {
                    queued: r.arrived.elapsed(),
                    ..Default::default()
                },
                arrived: r.arrived,
                last_token: None,
                leave: Leave::Stay,
                modules: r.modules,
                cache_key: r.cache_key,
                cancelled: r.cancelled,
                service: r.service,
                constraint: r.constraint,
                trigger_window: String::new(),
                held: None,
            });
        }
    }

    /// Services with work (running, preempted or queued) and the sum of their priorities.
    fn demand(&self) -> (Vec<(Arc<str>, u32)>, u64) {
        let mut seen: Vec<(Arc<str>, u32)> = Vec::new();
        let mut add = |name: &Arc<str>, prio: u32| {
            if !seen.iter().any(|(n, _)| n == name) {
                seen.push((name.clone(), prio.max(1)));
            }
        };
        for s in self.running.iter().chain(self.preempted.iter()) {
            add(&s.service.name, s.service.priority);
        }
        for (name, prio) in self.queue.waiting() {
            add(name, prio);
        }
        let total = seen.iter().map(|(_, p)| *p as u64).sum();
        (seen, total)
    }

    /// The waiting services that are below their share of the batch: their requests go first.
    fn owed_services(&self) -> Vec<Arc<str>> {
        self.queue
            .waiting()
            .map(|(name, _)| name.clone())
            .filter(|name| self.below_share(name))
            .collect()
    }

    fn running_of(&self, service: &str) -> u64 {
        self.running
            .iter()
            .filter(|s| s.leave == Leave::Stay && &*s.service.name == service)
            .count() as u64
    }

    /// Whether `service` is owed at least one more whole batch slot: its share of the slots is
    /// `parallel × priority / Σ priorities` over the services with work.
    fn below_share(&self, service: &str) -> bool {
        let (seen, total) = self.demand();
        let Some(&(_, prio)) = seen.iter().find(|(n, _)| &**n == service) else {
            return false;
        };
        let parallel = self.config.parallel.max(1) as u64;
        (self.running_of(service) + 1) * total <= parallel * prio as u64
    }

    /// When the batch is full and the queue's next request is of a service below its share,
    /// preempt the youngest sequence of a service above its share: one tenant's many long
    /// requests cannot keep another's out of the batch. The preempted sequence keeps its
    /// keys and values in the prefix cache (when there is room) for its recomputation.
    fn preempt_for_share(&mut self) -> bool {
        let owed = self.owed_services();
        let Some(q) = self.queue.front_preferring(&owed) else {
            return false;
        };
        if !self.below_share(&q.service.name) {
            return false;
        }
        let (seen, total) = self.demand();
        let parallel = self.config.parallel.max(1) as u64;
        let over = |name: &str| {
            let prio = seen
                .iter()
                .find(|(n, _)| &**n == name)
                .map_or(1, |(_, p)| *p) as u64;
            self.running_of(name) * total > parallel * prio
        };
        let Some(v) = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.leave == Leave::Stay && over(&s.service.name))
            .max_by_key(|(_, s)| s.arrived)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let mut s = self.running.remove(v);
        self.prefix
            .insert(&s.history[..s.fed], &s.cache, s.cache_key);
        s.cache = KvCache::new(&[], 0);
        s.fed = 0;
        s.held = None;
        self.preempted.push_back(s);
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .share_preemptions
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A cache for `tokens` starting from the longest cached prefix (never all of them: the
    /// last token must run to give logits), and how many positions it already holds.
    pub(super) fn lookup_prefix(&mut self, tokens: &[u32], cache_key: u64) -> (KvCache, usize) {
        match self.prefix.lookup(tokens, tokens.len() - 1, cache_key) {
            Some(hit) => (hit.cache, hit.tokens),
            None => (self.new_cache(), 0),
        }
    }

    /// Refuse a queued request that can never run.
    fn reject(&self, r: &SeqRequest, msg: String) {
        self.in_system.fetch_sub(1, Ordering::SeqCst);
        let _ = r.events.send(SeqEvent::Error(msg));
    }
}
