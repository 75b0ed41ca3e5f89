//! Paged key/value cache.
//!
//! A sequence's keys and values live in fixed-size blocks of [`KV_BLOCK`] positions; the cache
//! is the sequence's block table (`blocks[i]` holds positions `i*KV_BLOCK..(i+1)*KV_BLOCK`).
//! Entries are f16 (as llama.cpp stores them by default). One block holds every layer, laid out
//!
//! ```text
//! data = [ K of layer 0: [KV_BLOCK][kv_dim_0] | K of layer 1 | … | V of layer 0 | V of layer 1 | … ]
//! ```
//!
//! so one position's keys for all heads of a layer are contiguous, as attention reads them.
//!
//! Blocks are reference counted: [`KvCache::prefix`] shares the blocks of a prompt prefix between
//! sequences (a service's system prompt is stored once) instead of copying them; a write into a
//! shared block first copies it (copy on write). Blocks may be drawn from a [`KvPool`], which
//! bounds the bytes of all blocks alive: [`KvCache::reserve`] fails with
//! [`ModelError::KvBudget`] *before* a forward pass when the pool is exhausted, so the caller (the
//! server's scheduler) can free memory — drop cached prefixes, preempt a sequence — and retry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::ModelError;

/// Positions per block.
pub const KV_BLOCK: usize = 16;

/// Where each layer's rows sit inside a block.
#[derive(Debug)]
struct KvLayout {
    /// `(n_head_kv * head_dim, head_dim)` per layer.
    dims: Vec<(usize, usize)>,
    /// Offset of layer `l`'s keys in a block; its values are at `offsets[l] + half`.
    offsets: Vec<usize>,
    /// f16 elements of the key half (= the value half) of a block.
    half: usize,
}

impl KvLayout {
    fn new(layer_dims: &[(usize, usize)]) -> Self {
        let mut offsets = Vec::with_capacity(layer_dims.len());
        let mut dims = Vec::with_capacity(layer_dims.len());
        let mut off = 0;
        for &(n_head_kv, head_dim) in layer_dims {
            offsets.push(off);
            dims.push((n_head_kv * head_dim, head_dim));
            off += KV_BLOCK * n_head_kv * head_dim;
        }
        Self {
            dims,
            offsets,
            half: off,
        }
    }

    fn block_bytes(&self) -> usize {
        self.half * 2 * std::mem::size_of::<f16>()
    }
}

/// A byte budget shared by the caches that draw blocks from it (normally every sequence of a
/// server). Counts live blocks; a block returns its bytes when its last reference is dropped.
#[derive(Debug)]
pub struct KvPool {
    limit: usize,
    used: AtomicUsize,
}

impl KvPool {
    /// A pool allowing at most `limit_bytes` of blocks alive at once.
    pub fn new(limit_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit_bytes,
            used: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held by live blocks.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.used())
    }

    fn try_take(&self, bytes: usize) -> bool {
        let mut cur = self.used.load(Ordering::SeqCst);
        loop {
            if cur + bytes > self.limit {
                return false;
            }
            match self
                .used
                .compare_exchange(cur, cur + bytes, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Take bytes regardless of the limit (a write the caller did not reserve for).
    fn force_take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::SeqCst);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// One block: `KV_BLOCK` positions of every layer's keys and values.
#[derive(Debug)]
struct KvBlock {
    data: Box<[f16]>,
    /// The pool its bytes are counted in, if any.
    pool: Option<Arc<KvPool>>,
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.give_back(self.data.len() * std::mem::size_of::<f16>());
        }
    }
}

/// The cache of one sequence: its block table and how many positions each layer holds (layers
/// are appended one after another during a forward pass; between passes all are equal).
#[derive(Debug, Clone)]
pub struct KvCache {
    layout: Arc<KvLayout>,
    blocks: Vec<Arc<KvBlock>>,
    lens: Vec<usize>,
    max_len: usize,
    pool: Option<Arc<KvPool>>,
}

/// Read access to one layer of a cache.
#[derive(Clone, Copy)]
pub struct LayerKv<'a> {
    blocks: &'a [Arc<KvBlock>],
    k_off: usize,
    v_off: usize,
    kv_dim: usize,
    head_dim: usize,
    len: usize,
}

impl<'a> LayerKv<'a> {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn row(&self, off: usize, pos: usize, head: usize) -> &'a [f16] {
        let b = &self.blocks[pos / KV_BLOCK].data;
        let o = off + (pos % KV_BLOCK) * self.kv_dim + head * self.head_dim;
        &b[o..o + self.head_dim]
    }

    /// The key of `head` at `pos`.
    #[inline]
    pub fn key_f16(&self, pos: usize, head: usize) -> &'a [f16] {
        self.row(self.k_off, pos, head)
    }

    /// The value of `head` at `pos`.
    #[inline]
    pub fn value_f16(&self, pos: usize, head: usize) -> &'a [f16] {
        self.row(self.v_off, pos, head)
    }
}

/// Append access to one layer of a cache.
pub struct LayerKvMut<'a> {
    cache: &'a mut KvCache,
    layer: usize,
}

impl LayerKvMut<'_> {
    /// Append `n` positions to this layer: `k` and `v` are `[n, kv_dim]`. Blocks are allocated
    /// (or copied, if shared) as needed; [`KvCache::reserve`] beforehand makes that a no-op and
    /// is where the pool's limit is enforced.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let c = &mut *self.cache;
        let (kv_dim, _) = c.layout.dims[self.layer];
        let k_off = c.layout.offsets[self.layer];
        let v_off = k_off + c.layout.half;
        debug_assert_eq!(k.len(), v.len());
        let n = k.len() / kv_dim;
        let pos0 = c.lens[self.layer];
        c.ensure_writable(pos0, n, true)
            .expect("unbudgeted allocation cannot fail");
        for t in 0..n {
            let pos = pos0 + t;
            let block = Arc::get_mut(&mut c.blocks[pos / KV_BLOCK])
                .expect("ensure_writable made every written block unique");
            let o = (pos % KV_BLOCK) * kv_dim;
            block.data[k_off + o..k_off + o + kv_dim]
                .convert_from_f32_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
            block.data[v_off + o..v_off + o + kv_dim]
                .convert_from_f32_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
        }
        c.lens[self.layer] = pos0 + n;
    }
}

impl KvCache {
    /// `layer_dims[i] = (n_head_kv, head_dim)` of layer `i`; `max_len` bounds the context. The
    /// cache allocates without a budget until [`KvCache::set_pool`] gives it one.
    pub fn new(layer_dims: &[(usize, usize)], max_len: usize) -> Self {
        Self {
            layout: Arc::new(KvLayout::new(layer_dims)),
            blocks: Vec::new(),
            lens: vec![0; layer_dims.len()],
            max_len,
            pool: None,
        }
    }

    /// Count this cache's future blocks in `pool` (blocks already held stay uncounted, so set
    /// it on an empty cache).
    pub fn set_pool(&mut self, pool: Arc<KvPool>) {
        self.pool = Some(pool);
    }

    /// Bytes of one block (all layers, keys and values, `KV_BLOCK` positions).
    pub fn block_bytes(&self) -> usize {
        self.layout.block_bytes()
    }

    /// Bytes of cache one position needs (all layers, keys and values).
    pub fn bytes_per_position(&self) -> usize {
        self.block_bytes() / KV_BLOCK
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn n_layers(&self) -> usize {
        self.lens.len()
    }

    /// Blocks in the block table.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Fail before a forward pass that would run past the context limit.
    pub fn check_room(&self, n_new: usize) -> Result<(), ModelError> {
        if self.len() + n_new > self.max_len {
            return Err(ModelError::ContextFull {
                have: self.len(),
                adding: n_new,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// How many new blocks (fresh or copies of shared ones) appending `n_new` positions needs.
    pub fn blocks_needed(&self, n_new: usize) -> usize {
        let start = self.len();
        let end_block = (start + n_new).div_ceil(KV_BLOCK);
        let fresh = end_block.saturating_sub(self.blocks.len());
        let shared = (start / KV_BLOCK..end_block.min(self.blocks.len()))
            .filter(|&b| Arc::strong_count(&self.blocks[b]) > 1)
            .count();
        fresh + shared
    }

    /// Make room for `n_new` more positions: allocate their blocks and unshare any shared block
    /// they write into, within the pool's budget. On [`ModelError::KvBudget`] nothing cached is
    /// changed (blocks already taken stay in the table for a later try).
    pub fn reserve(&mut self, n_new: usize) -> Result<(), ModelError> {
        self.check_room(n_new)?;
        let pos0 = self.len();
        self.ensure_writable(pos0, n_new, false)
    }

    /// Make blocks for positions `pos0..pos0+n` present and uniquely owned.
    fn ensure_writable(&mut self, pos0: usize, n: usize, force: bool) -> Result<(), ModelError> {
        if n == 0 {
            return Ok(());
        }
        let end_block = (pos0 + n).div_ceil(KV_BLOCK);
        for b in pos0 / KV_BLOCK..end_block {
            if b < self.blocks.len() && Arc::strong_count(&self.blocks[b]) == 1 {
                continue;
            }
            let mut fresh = self.alloc_block(force)?;
            if let Some(old) = self.blocks.get(b) {
                let dst = Arc::get_mut(&mut fresh).expect("a new block is unique");
                dst.data.copy_from_slice(&old.data);
                self.blocks[b] = fresh;
            } else {
                self.blocks.push(fresh);
            }
        }
        Ok(())
    }

    fn alloc_block(&self, force: bool) -> Result<Arc<KvBlock>, ModelError> {
        let bytes = self.layout.block_bytes();
        if let Some(p) = &self.pool {
            if force {
                p.force_take(bytes);
            } else if !p.try_take(bytes) {
                return Err(ModelError::KvBudget {
                    needed: bytes,
                    free: p.free(),
                    limit: p.limit(),
                });
            }
        }
        Ok(Arc::new(KvBlock {
            data: vec![f16::ZERO; self.layout.half * 2].into_boxed_slice(),
            pool: self.pool.clone(),
        }))
    }

    /// Forget positions from `n_pos` on (e.g. to reuse a shared prompt prefix); blocks no longer
    /// needed are released.
    pub fn truncate(&mut self, n_pos: usize) {
        for l in &mut self.lens {
            *l = (*l).min(n_pos);
        }
        let keep = self
            .lens
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .div_ceil(KV_BLOCK);
        self.blocks.truncate(keep);
    }

    /// A new cache (same shape, pool and `max_len`) holding the first `n_pos` positions (all of
    /// them if fewer are cached). The blocks are shared, not copied; whichever cache later
    /// writes into a shared block copies it first.
    pub fn prefix(&self, n_pos: usize) -> KvCache {
        let n = n_pos.min(self.len());
        KvCache {
            layout: self.layout.clone(),
            blocks: self.blocks[..n.div_ceil(KV_BLOCK)].to_vec(),
            lens: vec![n; self.lens.len()],
            max_len: self.max_len,
            pool: self.pool.clone(),
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    pub fn layer(&self, i: usize) -> LayerKv<'_> {
        let (kv_dim, head_dim) = self.layout.dims[i];
        let k_off = self.layout.offsets[i];
        LayerKv {
            blocks: &self.blocks,
            k_off,
            v_off: k_off + self.layout.half,
            kv_dim,
            head_dim,
            len: self.lens[i],
        }
    }

    pub fn layer_mut(&mut self, i: usize) -> LayerKvMut<'_> {
        LayerKvMut {
            cache: self,
            layer: i,
        }
    }

    /// Bytes of the blocks in this cache's table (shared blocks included).
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.layout.block_bytes()
    }

    /// Bytes of blocks only this cache refers to (freed if it is dropped).
    pub fn unique_bytes(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| Arc::strong_count(b) == 1)
            .count()
            * self.layout.block_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: [(usize, usize); 3] = [(2, 4), (1, 4), (2, 2)];

    fn row(pos: usize, layer: usize, kv_dim: usize, v: bool) -> Vec<f32> {
        (0..kv_dim)
            // Exactly representable in f16 for pos < 128.
            .map(|j| {
                (pos as f32 + layer as f32 * 0.5 + j as f32 * 0.0625) * if v { -1.0 } else { 1.0 }
            })
            .collect()
    }

    fn fill(c: &mut KvCache, n: usize) {
        let pos0 = c.len();
        for (l, &(h, d)) in DIMS.iter().enumerate() {
            let kv = h * d;
            let k: Vec<f32> = (pos0..pos0 + n)
                .flat_map(|p| row(p, l, kv, false))
                .collect();
            let v: Vec<f32> = (pos0..pos0 + n).flat_map(|p| row(p, l, kv, true)).collect();
            c.layer_mut(l).append(&k, &v);
        }
    }

    fn check(c: &KvCache) {
        for (l, &(h, d)) in DIMS.iter().enumerate() {
            let kv = c.layer(l);
            assert_eq!(kv.len(), c.len());
            for p in 0..c.len() {
                let want_k = row(p, l, h * d, false);
                let want_v = row(p, l, h * d, true);
                for head in 0..h {
                    let k: Vec<f32> = kv.key_f16(p, head).iter().map(|x| x.to_f32()).collect();
                    let v: Vec<f32> = kv.value_f16(p, head).iter().map(|x| x.to_f32()).collect();
                    assert_eq!(k, want_k[head * d..(head + 1) * d], "k l{l} p{p} h{head}");
                    assert_eq!(v, want_v[head * d..(head + 1) * d], "v l{l} p{p} h{head}");
                }
            }
        }
    }

    #[test]
    fn appends_across_block_boundaries_in_uneven_chunks() {
        let mut c = KvCache::new(&DIMS, 200);
        for n in [1, 15, 1, 17, 33, 3] {
            fill(&mut c, n);
            check(&c);
        }
        assert_eq!(c.len(), 70);
        assert_eq!(c.n_blocks(), 70usize.div_ceil(KV_BLOCK));
        c.truncate(20);
        assert_eq!((c.len(), c.n_blocks()), (20, 2));
        fill(&mut c, 5);
        check(&c);
    }

    #[test]
    fn prefix_shares_blocks_and_copies_on_write() {
        let pool = KvPool::new(1 << 20);
        let mut a = KvCache::new(&DIMS, 200);
        a.set_pool(pool.clone());
        fill(&mut a, 40); // 3 blocks
        let bb = a.block_bytes();
        assert_eq!(pool.used(), 3 * bb);
        // A prefix ending mid-block shares all three blocks: no new memory.
        let mut b = a.prefix(37);
        assert_eq!((b.len(), pool.used()), (37, 3 * bb));
        assert_eq!(
            b.blocks_needed(1),
            1,
            "the shared partial block must be copied"
        );
        // b writes position 37, which lives in a shared block: that block is copied first.
        b.reserve(1).unwrap();
        assert_eq!(pool.used(), 4 * bb);
        let k = vec![-1.0; 8];
        b.layer_mut(0).append(&k, &k);
        assert_eq!(b.layer(0).key_f16(37, 0)[0].to_f32(), -1.0);
        // a is untouched.
        check(&a);
        drop(a);
        // Only b's references remain: two shared-then-unshared blocks plus its copy.
        assert_eq!(pool.used(), 3 * bb);
        drop(b);
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn reserve_fails_cleanly_when_the_pool_is_exhausted() {
        let probe = KvCache::new(&DIMS, 100);
        let bb = probe.block_bytes();
        let pool = KvPool::new(2 * bb);
        let mut c = KvCache::new(&DIMS, 100);
        c.set_pool(pool.clone());
        c.reserve(32).unwrap();
        fill(&mut c, 32);
        let err = c.reserve(1).unwrap_err();
        assert!(matches!(err, ModelError::KvBudget { .. }), "{err}");
        assert_eq!(c.len(), 32);
        check(&c);
        assert_eq!(pool.used(), 2 * bb);
        // Freeing memory elsewhere makes the retry succeed.
        c.truncate(16);
        assert_eq!(pool.used(), bb);
        assert!(c.reserve(17).is_err(), "positions 16..33 need two blocks");
        c.reserve(16).unwrap();
        assert_eq!(pool.used(), 2 * bb);
        assert!(c.check_room(85).is_err());
    }

    #[test]
    fn bytes_per_position_matches_the_layout() {
        let c = KvCache::new(&DIMS, 10);
        // (8 + 4 + 4) f16 per position for K and again for V.
        assert_eq!(c.bytes_per_position(), 16 * 2 * 2);
    }
}
