//! Prompt-prefix reuse. When a sequence leaves the batch (finished or cancelled) its KV blocks
//! and the tokens that went through the model are kept here, within a byte budget (least
//! recently used entries go first; the scheduler also evicts entries when the KV pool runs
//! short). A new request starts from the longest block-aligned prefix of its prompt found here,
//! sharing those KV blocks (no copy: the paged cache copies a block only if it is written), and
//! prefills only the rest.
//!
//! Lookup is by hashes of the token prefix up to each block boundary (a chained hash, so the
//! hash at block `k` identifies the whole prefix `0..k * BLOCK`); a hit is verified token by
//! token before use. Entries are never handed out: reuse copies the positions it needs.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use modu_engine::KvCache;

/// Tokens per block: prefixes are matched and reused in whole KV blocks, so a reused prefix
/// never ends inside a shared block.
pub const BLOCK: usize = modu_engine::KV_BLOCK;

struct Entry {
    /// The tokens whose keys and values `cache` holds (a whole number of blocks).
    tokens: Vec<u32>,
    /// The module key the positions were computed with.
    salt: u64,
    cache: KvCache,
    bytes: usize,
    /// Logical time of the last insertion or reuse (LRU order).
    used: u64,
}

/// What [`PrefixCache::lookup`] found.
pub struct Hit {
    /// A cache holding the first `tokens` positions (blocks shared with the entry).
    pub cache: KvCache,
    pub tokens: usize,
}

/// The prefix cache; owned by the scheduler thread.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    clock: u64,
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// Prefix hash at each block boundary → the entries holding that prefix.
    index: HashMap<u64, Vec<u64>>,
    evictions: u64,
}

/// Chained hashes of `tokens` at each full block boundary: `out[k]` covers `0..(k + 1) * BLOCK`.
/// The chain starts from `salt` (the request's module key), so prefixes computed with different
/// modules never match.
fn block_hashes(tokens: &[u32], max_blocks: usize, salt: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut prev = salt;
    for block in tokens.chunks_exact(BLOCK).take(max_blocks) {
        let mut h = DefaultHasher::new();
        prev.hash(&mut h);
        block.hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values; 0 disables it.
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            bytes: 0,
            clock: 0,
            next_id: 0,
            entries: HashMap::new(),
            index: HashMap::new(),
            evictions: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries evicted so far to stay within the budget.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The longest block-aligned prefix of `prompt`, at most `max_tokens` long, held by an
    /// entry: a cache sharing its blocks.
    /// Only entries computed with the same module key (`salt`) qualify.
    pub fn lookup(&mut self, prompt: &[u32], max_tokens: usize, salt: u64) -> Option<Hit> {
        if !self.enabled() || self.entries.is_empty() {
            return None;
        }
        let hashes = block_hashes(prompt, max_tokens.min(prompt.len()) / BLOCK, salt);
        // The deepest level any entry shares (hashes can only match along a chain).
        let deepest = hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count();
        for level in (1..=deepest).rev() {
            let n = level * BLOCK;
            let Some(ids) = self.index.get(&hashes[level - 1]) else {
                continue;
            };
            // Prefer the most recently used candidate; verify against hash collisions.
            let best = ids
                .iter()
                .filter_map(|id| self.entries.get(id).map(|e| (*id, e)))
                .filter(|(_, e)| {
                    e.salt == salt && e.tokens.len() >= n && e.tokens[..n] == prompt[..n]
                })
                .max_by_key(|(_, e)| e.used)
                .map(|(id, _)| id);
            if let Some(id) = best {
                self.clock += 1;
                let e = self.entries.get_mut(&id).expect("indexed entry exists");
                e.used = self.clock;
                return Some(Hit {
                    cache: e.cache.prefix(n),
                    tokens: n,
                });
            }
        }
        None
    }

    /// Keep the first `tokens.len()` positions of `cache` (rounded down to whole blocks), unless
    /// an entry already holds them; entries holding only a prefix of them are replaced.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache, salt: u64) {
        if !self.enabled() {
            return;
        }
        let n = tokens.len().min(cache.len()) / BLOCK * BLOCK;
        if n == 0 {
            return;
        }
        let tokens = &tokens[..n];
        self.clock += 1;
        let mut superseded = Vec::new();
        for (id, e) in self.entries.iter_mut() {
            if e.salt != salt {
                continue;
            }
            let m = e.tokens.len();
            if m >= n && e.tokens[..n] == *tokens {
                e.used = self.clock; // already held
                return;
            }
            if m < n && e.tokens[..] == tokens[..m] {
                superseded.push(*id);
            }
        }
        // Every position takes the same bytes: check the budget before taking anything.
        if cache.bytes() / cache.len() * n > self.budget {
            return;
        }
        let cache = cache.prefix(n);
        let bytes = cache.bytes();
        for id in superseded {
            self.remove(id);
        }
        while self.bytes + bytes > self.budget && self.evict_lru() {}
        let id = self.next_id;
        self.next_id += 1;
        for h in block_hashes(tokens, n / BLOCK, salt) {
            self.index.entry(h).or_default().push(id);
        }
        self.bytes += bytes;
        self.entries.insert(
            id,
            Entry {
                tokens: tokens.to_vec(),
                salt,
                cache,
                bytes,
                used: self.clock,
            },
        );
    }

    /// Drop the least recently used entry (to give the KV pool memory back); false if empty.
    pub fn evict_lru(&mut self) -> bool {
        let Some(lru) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        self.remove(lru);
        self.evictions += 1;
        true
    }

    fn remove(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        self.bytes -= e.bytes;
        for h in block_hashes(&e.tokens, e.tokens.len() / BLOCK, e.salt) {
            if let Some(ids) = self.index.get_mut(&h) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.index.remove(&h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(n: usize) -> KvCache {
        let mut c = KvCache::new(&[(1, 2)], 1024);
        let k: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
        c.layer_mut(0).append(&k, &k);
        c
    }

    #[test]
    fn longest_block_aligned_prefix_is_shared() {
        let mut pc = PrefixCache::new(1 << 20);
        let a: Vec<u32> = (0..50).collect();
        pc.insert(&a, &cache_with(50), 0);
        assert_eq!(pc.len(), 1);
        // Shares 40 tokens: 2 whole blocks.
        let mut b: Vec<u32> = (0..40).collect();
        b.extend([999, 998, 997]);
        let hit = pc.lookup(&b, b.len() - 1, 0).unwrap();
        assert_eq!(hit.tokens, 32);
        assert_eq!(hit.cache.len(), 32);
        assert_eq!(hit.cache.layer(0).key_f16(31, 0)[0].to_f32(), 62.0);
        // Capped by max_tokens.
        assert_eq!(pc.lookup(&a, 20, 0).unwrap().tokens, 16);
        assert!(pc.lookup(&[7; 40], 39, 0).is_none());
        // A longer sequence with the same prefix replaces the entry.
        let c: Vec<u32> = (0..70).collect();
        pc.insert(&c, &cache_with(70), 0);
        assert_eq!(pc.len(), 1);
        assert_eq!(pc.lookup(&c, 69, 0).unwrap().tokens, 64);
        // The same tokens under another module key are a different prefix.
        assert!(pc.lookup(&c, 69, 7).is_none());
        // Its prefix is already held.
        pc.insert(&a, &cache_with(50), 0);
        assert_eq!(pc.len(), 1);
    }

    #[test]
    fn entries_share_blocks_with_the_pool_instead_of_copying() {
        let pool = modu_engine::KvPool::new(1 << 20);
        let mut c = KvCache::new(&[(1, 2)], 1024);
        c.set_pool(pool.clone());
        let k: Vec<f32> = (0..40 * 2).map(|i| i as f32).collect();
        c.layer_mut(0).append(&k, &k);
        let used = pool.used();
        let mut pc = PrefixCache::new(1 << 20);
        let toks: Vec<u32> = (0..40).collect();
        pc.insert(&toks, &c, 0);
        let hit = pc.lookup(&toks, 39, 0).unwrap();
        assert_eq!(hit.tokens, 32);
        assert_eq!(pool.used(), used, "insert and lookup share blocks");
        drop(c);
        // The entry and the hit keep the first two blocks alive; the third is freed.
        assert_eq!(pool.used(), used / 3 * 2);
        drop(hit);
        assert!(pc.evict_lru());
        assert_eq!(pool.used(), 0);
        assert!(!pc.evict_lru());
    }

    #[test]
    fn budget_evicts_least_recently_used() {
        let one = cache_with(32).prefix(32).bytes();
        let mut pc = PrefixCache::new(one * 2);
        let seq = |s: u32| -> Vec<u32> { (s..s + 32).collect() };
        pc.insert(&seq(0), &cache_with(32), 0);
        pc.insert(&seq(100), &cache_with(32), 0);
        assert!(pc.lookup(&seq(0), 31, 0).is_some()); // 0 is now the most recent
        pc.insert(&seq(200), &cache_with(32), 0);
        assert_eq!(pc.len(), 2);
        assert!(pc.bytes() <= one * 2);
        assert_eq!(pc.evictions(), 1);
        assert!(pc.lookup(&seq(100), 31, 0).is_none());
        assert!(pc.lookup(&seq(0), 31, 0).is_some());
        // Too big for the budget: not kept, nothing evicted.
        pc.insert(&(0..96).collect::<Vec<_>>()[..], &cache_with(96), 0);
        assert_eq!(pc.evictions(), 1);
        assert!(PrefixCache::new(0).lookup(&seq(0), 31, 0).is_none());
    }
}
