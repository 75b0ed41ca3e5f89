//! Per-sequence key/value cache. Entries are stored as f16 (as llama.cpp does by default), laid
//! out `[position][kv_head][head_dim]` so one position's keys for all heads are contiguous.

use half::f16;

use crate::error::ModelError;

/// Keys and values of one layer.
#[derive(Debug, Clone)]
pub struct LayerKv {
    kv_dim: usize,
    head_dim: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl LayerKv {
    fn new(n_head_kv: usize, head_dim: usize) -> Self {
        Self {
            kv_dim: n_head_kv * head_dim,
            head_dim,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.k.len() / self.kv_dim
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Append `n` positions: `k` and `v` are `[n, kv_dim]`.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        let (nk, nv) = (self.k.len(), self.v.len());
        self.k.resize(nk + k.len(), f16::ZERO);
        self.v.resize(nv + v.len(), f16::ZERO);
        self.k[nk..].convert_from_f32_slice(k);
        self.v[nv..].convert_from_f32_slice(v);
    }

    /// A copy of the first `n_pos` positions, sized exactly.
    pub fn prefix(&self, n_pos: usize) -> Self {
        let n = (n_pos * self.kv_dim).min(self.k.len());
        Self {
            kv_dim: self.kv_dim,
            head_dim: self.head_dim,
            k: self.k[..n].to_vec(),
            v: self.v[..n].to_vec(),
        }
    }

    pub fn truncate(&mut self, n_pos: usize) {
        self.k.truncate(n_pos * self.kv_dim);
        self.v.truncate(n_pos * self.kv_dim);
    }

    /// The key of `head` at `pos`.
    pub fn key_f16(&self, pos: usize, head: usize) -> &[f16] {
        let o = pos * self.kv_dim + head * self.head_dim;
        &self.k[o..o + self.head_dim]
    }

    /// The value of `head` at `pos`.
    pub fn value_f16(&self, pos: usize, head: usize) -> &[f16] {
        let o = pos * self.kv_dim + head * self.head_dim;
        &self.v[o..o + self.head_dim]
    }
}

/// The cache of one sequence: one [`LayerKv`] per layer, all the same length.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    max_len: usize,
}

impl KvCache {
    /// `layer_dims[i] = (n_head_kv, head_dim)` of layer `i`; `max_len` bounds the context.
    pub fn new(layer_dims: &[(usize, usize)], max_len: usize) -> Self {
        Self {
            layers: layer_dims
                .iter()
                .map(|&(h, d)| LayerKv::new(h, d))
                .collect(),
            max_len,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
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

    /// Forget positions from `n_pos` on (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, n_pos: usize) {
        for l in &mut self.layers {
            l.truncate(n_pos);
        }
    }

    /// A new cache (same shape and `max_len`) holding a copy of the first `n_pos` positions
    /// (all of them if fewer are cached): for reusing a shared prompt prefix without sharing
    /// the storage.
    pub fn prefix(&self, n_pos: usize) -> KvCache {
        KvCache {
            layers: self.layers.iter().map(|l| l.prefix(n_pos)).collect(),
            max_len: self.max_len,
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    pub fn layer(&self, i: usize) -> &LayerKv {
        &self.layers[i]
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 2)
            .sum()
    }
}
