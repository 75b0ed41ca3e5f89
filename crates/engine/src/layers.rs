//! Building blocks shared by the architectures: weights backed by the mmap'd GGUF, RMS norm,
//! rotary embeddings and causal attention over the KV cache. Activations are row-major
//! `[n_tokens, dim]` f32 buffers.

use std::sync::Arc;

use modu_gguf::{GgmlType, GgufFile, TensorInfo};
use modu_kernels::{Layout, QMatrix};

use crate::error::ModelError;
use crate::kv_cache::{KvCache, LayerKv};
use crate::lora::{BatchLora, Proj};

/// A 2-D weight matrix stored in the GGUF file (`rows` outputs × `cols` inputs, ggml dims
/// `[cols, rows]`), read in place from the memory map (or the private copy).
#[derive(Debug, Clone)]
pub struct Weight {
    pub info: TensorInfo,
    pub rows: usize,
    pub cols: usize,
    /// Not ggml's when [`regroup_for_inference`] rewrote it at load time.
    pub layout: Layout,
}

impl Weight {
    pub fn ty(&self) -> GgmlType {
        self.info.ty
    }

    pub fn mat<'a>(&self, file: &'a GgufFile) -> QMatrix<'a> {
        QMatrix {
            ty: self.info.ty,
            rows: self.rows,
            cols: self.cols,
            data: file.tensor_data(&self.info),
            layout: self.layout,
        }
    }
}

/// The layout [`regroup_for_inference`] gives a tensor: the kernels' preferred
/// [`modu_kernels::layout::inference_layout`] for the 2-D weights a forward pass multiplies by
/// (`blk.*.weight`, `output.weight`, and `token_embd.weight`, which is the output matrix when
/// the model ties them; its row lookups read every layout), ggml's for everything else.
pub fn inference_layout(info: &TensorInfo) -> Layout {
    let matmul_weight = info.dims.len() == 2
        && ((info.name.starts_with("blk.") && info.name.ends_with(".weight"))
            || info.name == "output.weight"
            || info.name == "token_embd.weight");
    if !matmul_weight {
        return Layout::Ggml;
    }
    let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
    modu_kernels::layout::inference_layout(info.ty, rows, cols)
}

/// A `prepare` hook for [`GgufFile::open_resident_with`]: rewrites the weights into the layout
/// the kernels in use read faster ([`inference_layout`]: Q5_0 and Q8_0 interleaved eight rows
/// at a time, or regrouped, on AVX2; see [`modu_kernels::layout`]). [`TensorLoader`] then gives
/// those [`Weight`]s that layout. Only for files opened to run the model: anything that reads
/// the tensors' bytes as GGUF data (quantizing, exporting, merging) must open the file without
/// it.
pub fn regroup_for_inference(info: &TensorInfo, bytes: &mut [u8]) -> bool {
    let layout = inference_layout(info);
    layout != Layout::Ggml
        && modu_kernels::layout::to_layout(info.ty, info.dims[0] as usize, bytes, layout).is_ok()
}

/// Looks tensors up by name and checks their shapes once, at load time.
pub struct TensorLoader {
    pub file: Arc<GgufFile>,
}

impl TensorLoader {
    pub fn new(file: Arc<GgufFile>) -> Self {
        Self { file }
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor_info(name).is_some()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.file
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// A matrix with ggml dims `[cols, rows]`.
    pub fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Weight, ModelError> {
        let info = self.info(name)?;
        let dims: Vec<u64> = info.dims.clone();
        if dims.len() != 2 || dims[0] as usize != cols || dims[1] as usize != rows {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![cols as u64, rows as u64],
                got: dims,
            });
        }
        let layout = if self.file.is_prepared(info) {
            inference_layout(info)
        } else {
            Layout::Ggml
        };
        Ok(Weight {
            info: info.clone(),
            rows,
            cols,
            layout,
        })
    }

    pub fn opt_matrix(
        &self,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Option<Weight>, ModelError> {
        if self.has(name) {
            self.matrix(name, cols, rows).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `token_embd.weight` (`[n_embd, n_vocab]`) and the vocabulary size it implies.
    pub fn token_embedding(&self, n_embd: usize) -> Result<(Weight, usize), ModelError> {
        let n_vocab = self
            .info("token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        Ok((self.matrix("token_embd.weight", n_embd, n_vocab)?, n_vocab))
    }

    /// A 1-D tensor (norm weights, biases) dequantized to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        if info.n_elements() != len as u64 || info.dims.len() != 1 {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![len as u64],
                got: info.dims.clone(),
            });
        }
        let mut out = vec![0f32; len];
        modu_kernels::dequantize_row(info.ty, self.file.tensor_data(info), &mut out)
            .map_err(|e| ModelError::Kernel(format!("{name}: {e}")))?;
        Ok(out)
    }

    pub fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// A projection `y = W·x (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn load(
        l: &TensorLoader,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Self, ModelError> {
        let weight = l.matrix(&format!("{name}.weight"), cols, rows)?;
        let bias = l.opt_vector(&format!("{name}.bias"), rows)?;
        Ok(Self { weight, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.rows
    }

    /// `x` is `[n_tokens, cols]`, `y` becomes `[n_tokens, rows]`.
    pub fn forward(
        &self,
        file: &GgufFile,
        x: &[f32],
        n_tokens: usize,
        y: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_lora(file, x, n_tokens, y, None)
    }

    /// [`Linear::forward`] plus the batch's LoRA updates for `(layer, proj)`, added after the
    /// matmul and before the bias (llama.cpp's order).
    pub fn forward_lora(
        &self,
        file: &GgufFile,
        x: &[f32],
        n_tokens: usize,
        y: &mut Vec<f32>,
        lora: Option<(&mut BatchLora<'_>, usize, Proj)>,
    ) -> Result<(), ModelError> {
        observe::notify(&self.weight, x, n_tokens);
        y.resize(n_tokens * self.weight.rows, 0.0);
        modu_kernels::matmul(&self.weight.mat(file), x, n_tokens, y)
            .map_err(|e| ModelError::Kernel(e.to_string()))?;
        if let Some((l, layer, proj)) = lora {
            l.apply(layer, &[proj], x, &mut [y]);
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (v, bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
        Ok(())
    }
}

/// An optional process-wide observer of every matmul input (eval-mode hook, used by
/// `modu imatrix`). When none is installed the forward pass pays one relaxed atomic load per
/// projection.
pub mod observe {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, RwLock};

    use super::Weight;

    /// Sees the input `x` (`[n_tokens, weight.cols]`) of each projection before it runs.
    pub trait MatmulObserver: Send + Sync {
        fn observe(&self, weight: &str, x: &[f32], n_tokens: usize, cols: usize);
    }

    static ACTIVE: AtomicBool = AtomicBool::new(false);
    static OBSERVER: RwLock<Option<Arc<dyn MatmulObserver>>> = RwLock::new(None);

    /// Install (or with `None` remove) the observer; returns the previous one.
    pub fn set_observer(obs: Option<Arc<dyn MatmulObserver>>) -> Option<Arc<dyn MatmulObserver>> {
        let mut g = OBSERVER.write().unwrap_or_else(|e| e.into_inner());
        ACTIVE.store(obs.is_some(), Ordering::Release);
        std::mem::replace(&mut *g, obs)
    }

    #[inline(always)]
    pub(crate) fn notify(w: &Weight, x: &[f32], n_tokens: usize) {
        if ACTIVE.load(Ordering::Relaxed) {
            notify_slow(w, x, n_tokens);
        }
    }

    #[cold]
    fn notify_slow(w: &Weight, x: &[f32], n_tokens: usize) {
        let g = OBSERVER.read().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = g.as_ref() {
            o.observe(&w.info.name, x, n_tokens, w.cols);
        }
    }
}

/// `1/sqrt(mean(x²) + eps)`, the sum of squares accumulated in f64 as ggml does.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt()
}

/// Several projections of the same input (Q/K/V, gate/up): the activations are quantized once
/// per dot type and the matrices run in one parallel section. `outs[i]` becomes
/// `[n_tokens, layers[i].out_dim()]`.
pub fn forward_many(
    file: &GgufFile,
    layers: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    outs: &mut [&mut Vec<f32>],
) -> Result<(), ModelError> {
    forward_many_lora(file, layers, x, n_tokens, outs, None)
}

/// [`forward_many`] plus the batch's LoRA updates of `layer` for `projs` (one per entry of
/// `layers`), added after the matmuls and before the biases.
pub fn forward_many_lora(
    file: &GgufFile,
    layers: &[&Linear],
    x: &[f32],
    n_tokens: usize,
    outs: &mut [&mut Vec<f32>],
    lora: Option<(&mut BatchLora<'_>, usize, &[Proj])>,
) -> Result<(), ModelError> {
    let kerr = |e: modu_kernels::KernelError| ModelError::Kernel(e.to_string());
    for l in layers {
        observe::notify(&l.weight, x, n_tokens);
    }
    let dot_types: Vec<GgmlType> = layers
        .iter()
        .map(|l| modu_kernels::vec_dot_type(l.weight.ty()))
        .collect::<Result<_, _>>()
        .map_err(kerr)?;
    let mut done = vec![false; layers.len()];
    for i in 0..layers.len() {
        if done[i] {
            continue;
        }
        let dt = dot_types[i];
        let cols = layers[i].weight.cols;
        let qa = modu_kernels::quantize_activations(dt, x, n_tokens, cols).map_err(kerr)?;
        let group: Vec<usize> = (i..layers.len())
            .filter(|&j| !done[j] && dot_types[j] == dt)
            .collect();
        let mats: Vec<QMatrix> = group.iter().map(|&j| layers[j].weight.mat(file)).collect();
        let mut jobs: Vec<(&QMatrix, &mut [f32])> = Vec::with_capacity(group.len());
        let mut mi = 0;
        for (j, o) in outs.iter_mut().enumerate() {
            if group.contains(&j) {
                o.resize(n_tokens * layers[j].weight.rows, 0.0);
                jobs.push((&mats[mi], o.as_mut_slice()));
                mi += 1;
                done[j] = true;
            }
        }
        modu_kernels::matmul_quantized_many(&mut jobs, &qa).map_err(kerr)?;
    }
    if let Some((l, layer, projs)) = lora {
        l.apply(layer, projs, x, outs);
    }
    for (l, o) in layers.iter().zip(outs.iter_mut()) {
        if let Some(b) = &l.bias {
            for row in o.chunks_exact_mut(b.len()) {
                add_inplace(row, b);
            }
        }
    }
    Ok(())
}

/// RMS norm of each `dim`-sized row of `x` into `out`, scaled by `w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = w.len();
    out.resize(x.len(), 0.0);
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let scale = rms_scale(xr, eps);
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * scale * wv;
        }
    }
}

/// In-place RMS norm of each `w.len()`-sized chunk (per-head QK norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for xr in x.chunks_exact_mut(dim) {
        let scale = rms_scale(xr, eps);
        for (xv, wv) in xr.iter_mut().zip(w) {
            *xv = *xv * scale * wv;
        }
    }
}

/// Largest supported head dimension (RoPE keeps its per-pair angles on the stack).
pub const MAX_HEAD_DIM: usize = 1024;

/// How rotary pairs are formed within a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)` (llama; GGUF conversion permutes Q/K rows for this).
    Interleaved,
    /// Pairs `(i, i + d/2)` (NeoX: qwen2, gemma).
    Neox,
}

/// Rotary position embedding parameters for one layer: `head_dim/2` numbers, never a table over
/// the whole context.
///
/// The angle of pair `i` at position `p` is `p·base^(-2i/d)`; like ggml we form it by repeated
/// f32 multiplication (`θ_i = θ_{i-1}·base^(-2/d)`, `θ_0 = p`) rather than `powf` per pair, so
/// that angles at large positions round the way llama.cpp's do.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    /// `base^(-2/d)`.
    pub theta_scale: f32,
    /// Per-pair frequency divisors (Llama 3 `rope_freqs`), if any.
    pub freq_factors: Option<Vec<f32>>,
    /// Linear RoPE scaling: angles are multiplied by `1/factor`.
    pub freq_scale: f32,
}

impl Rope {
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        base: f32,
        freq_factors: Option<&[f32]>,
        freq_scale: f32,
    ) -> Self {
        Self {
            style,
            theta_scale: base.powf(-2.0 / head_dim as f32),
            freq_factors: freq_factors.map(<[f32]>::to_vec),
            freq_scale,
        }
    }

    /// Rotate every head of `x` (`n_heads * head_dim` floats) for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = head_dim / 2;
        let mut sin_cos = [(0f32, 0f32); MAX_HEAD_DIM / 2];
        let mut theta = pos as f32;
        for (i, sc) in sin_cos.iter_mut().take(half).enumerate() {
            let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
            *sc = (self.freq_scale * (theta / ff)).sin_cos();
            theta *= self.theta_scale;
        }
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(s, c)) in sin_cos.iter().take(half).enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let x0 = head[a];
                let x1 = head[b];
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Attention geometry of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplier applied to `q·k`.
    pub scale: f32,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
}

/// Causal attention for `n_tokens` new queries at positions `pos0..pos0+n_tokens`, whose keys and
/// values have already been appended to `kv`. `q` is `[n_tokens, n_head*head_dim]`, `out` the same.
///
/// Computed the way llama.cpp's CPU flash attention does, so that results agree closely: the
/// query is rounded to f16 (the cache's type), scores are f16·f16 dot products accumulated in
/// f32, and the softmax is taken online (running maximum and sum) with the weighted sum of values
/// kept in f16. Each (token, head) pair is independent, so they are spread over the threads when
/// there is enough work.
pub fn attention(
    q: &[f32],
    kv: &LayerKv<'_>,
    pos0: usize,
    n_tokens: usize,
    s: AttnShape,
    out: &mut [f32],
) {
    let seg = Segment {
        start: 0,
        len: n_tokens,
        pos0,
    };
    attention_segments(q, std::slice::from_ref(kv), &[seg], s, out);
}

/// [`attention`] for several sequences at once, in one parallel section: `segs[i]` places
/// sequence `i`'s rows in `q` and `out` (`[n_total, n_head*head_dim]`, segments in order and
/// contiguous) and `kvs[i]` holds its keys and values.
fn attention_segments(
    q: &[f32],
    kvs: &[LayerKv<'_>],
    segs: &[Segment],
    s: AttnShape,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let q_dim = s.n_head * hd;
    let n_total = out.len() / q_dim.max(1);
    debug_assert_eq!(q.len(), out.len());
    // A task is one position and a group of query heads that share a KV head (their keys and
    // values are converted once for the group), or a single head when there are too few
    // groups to keep every thread busy (decoding a few sequences). Same bits either way.
    let n_rep = (s.n_head / s.n_head_kv.max(1)).max(1);
    let threads = rayon::current_num_threads();
    let heads = if n_total * s.n_head_kv >= 2 * threads {
        n_rep
    } else {
        1
    };
    let per_row = s.n_head / heads;
    // The segment of each row.
    let mut seg_of = Vec::with_capacity(n_total);
    for (i, sg) in segs.iter().enumerate() {
        seg_of.resize(sg.start + sg.len, i);
    }
    let job = |i: usize, oh: &mut [f32]| {
        let (row, h) = (i / per_row, (i % per_row) * heads);
        let sg = &segs[seg_of[row]];
        let q0 = row * q_dim + h * hd;
        let pos = sg.pos0 + (row - sg.start);
        attend_heads(
            &q[q0..q0 + heads * hd],
            &kvs[seg_of[row]],
            pos,
            h / n_rep,
            s,
            oh,
        );
    };
    let work: usize = segs
        .iter()
        .map(|sg| sg.len * s.n_head * (sg.pos0 + sg.len) * hd)
        .sum();
    if work < 1 << 16 || threads == 1 {
        out.chunks_exact_mut(heads * hd)
            .enumerate()
            .for_each(|(i, oh)| job(i, oh));
    } else {
        modu_kernels::pool::for_each_chunk_mut(out, heads * hd, job);
    }
}

/// Where each sequence of a batched step sits in the concatenated activations.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// First row in the batch.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (the cache length before the step).
    pub pos0: usize,
}

/// Rotary embedding, cache append and attention of one layer for every sequence of a batch.
/// `q`, `k`, `v` hold all sequences' rows (`[n_total, dim]`); `caches[i]` is sequence `i`'s.
/// `rope` is `None` for a layer without positional rotation (EXAONE 4.0's global layers).
#[allow(clippy::too_many_arguments)]
pub fn attend_batch(
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    segs: &[Segment],
    layer: usize,
    caches: &mut [&mut KvCache],
    rope: Option<&Rope>,
    s: AttnShape,
    att: &mut Vec<f32>,
) {
    let hd = s.head_dim;
    let (q_dim, kv_dim) = (s.n_head * hd, s.n_head_kv * hd);
    let n_total = q.len() / q_dim;
    att.resize(n_total * q_dim, 0.0);
    for (seg, cache) in segs.iter().zip(caches.iter_mut()) {
        if let Some(rope) = rope {
            for t in 0..seg.len {
                let row = seg.start + t;
                rope.apply(&mut q[row * q_dim..(row + 1) * q_dim], hd, seg.pos0 + t);
                rope.apply(&mut k[row * kv_dim..(row + 1) * kv_dim], hd, seg.pos0 + t);
            }
        }
        let rows = seg.start..seg.start + seg.len;
        let mut kv = cache.layer_mut(layer);
        kv.append(
            &k[rows.start * kv_dim..rows.end * kv_dim],
            &v[rows.start * kv_dim..rows.end * kv_dim],
        );
    }
    // Every sequence's attention in one parallel section (one per sequence would cost a
    // section's start and its idle tail per sequence and layer when decoding many).
    let layers: Vec<LayerKv<'_>> = caches.iter().map(|c| c.layer(layer)).collect();
    let end = segs.last().map_or(0, |sg| sg.start + sg.len);
    attention_segments(&q[..end * q_dim], &layers, segs, s, &mut att[..end * q_dim]);
}

/// Check a batch before anything is computed or cached, and lay out its segments.
/// Every cache reserves its new positions here, so a full context or an exhausted KV pool is
/// reported before anything runs.
pub fn plan_batch(
    tokens: &[&[u32]],
    caches: &mut [&mut KvCache],
) -> Result<Vec<Segment>, ModelError> {
    let mut segs = Vec::with_capacity(tokens.len());
    let mut start = 0;
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(ModelError::EmptyInput);
    }
    for (t, c) in tokens.iter().zip(caches.iter_mut()) {
        c.reserve(t.len())?;
        segs.push(Segment {
            start,
            len: t.len(),
            pos0: c.len(),
        });
        start += t.len();
    }
    if segs.is_empty() {
        return Err(ModelError::EmptyInput);
    }
    Ok(segs)
}

/// Query heads `qs` (consecutive rows of `head_dim`, all of KV head `kvh`) at position `pos`,
/// into `out` (the same shape). Per head, llama.cpp's CPU flash attention: online softmax over
/// the keys in order, the weighted sum of values kept in f16.
fn attend_heads(
    qs: &[f32],
    kv: &LayerKv<'_>,
    pos: usize,
    kvh: usize,
    s: AttnShape,
    out: &mut [f32],
) {
    use half::f16;
    let hd = s.head_dim;
    let n = qs.len() / hd;
    let start = match s.window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    };
    // One f32 allocation per task: the queries rounded to f16 (the cache's type) and held
    // widened to f32, then per head the running maximum, the running sum, the key's score and
    // its weight.
    let mut scratch = vec![0f32; n * hd + 4 * n];
    let (q, rest) = scratch.split_at_mut(n * hd);
    for (d, &v) in q.iter_mut().zip(qs) {
        *d = f16::from_f32(v).to_f32();
    }
    let (max, rest) = rest.split_at_mut(n);
    let (sum, rest) = rest.split_at_mut(n);
    let (scores, weights) = rest.split_at_mut(n);
    max.fill(f32::NEG_INFINITY);
    let mut acc = vec![f16::ZERO; n * hd];
    for kp in start..=pos {
        modu_kernels::vec_dot_f16_rows(kv.key_f16(kp, kvh), q, scores);
        for h in 0..n {
            let score = scores[h] * s.scale;
            let (ms, vs) = if score > max[h] {
                let ms = (max[h] - score).exp();
                max[h] = score;
                modu_kernels::scale_f16(&mut acc[h * hd..(h + 1) * hd], ms);
                (ms, 1.0)
            } else {
                (1.0, (score - max[h]).exp())
            };
            weights[h] = vs;
            sum[h] = sum[h] * ms + vs;
        }
        modu_kernels::mad_f16_rows(&mut acc, kv.value_f16(kp, kvh), weights);
    }
    for h in 0..n {
        let inv = if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] };
        for (o, a) in out[h * hd..(h + 1) * hd]
            .iter_mut()
            .zip(&acc[h * hd..(h + 1) * hd])
        {
            *o = a.to_f32() * inv;
        }
    }
}

/// `gate[i] = act(gate[i]) · up[i]`, the gated feed-forward's product, in parallel pieces: per
/// element an `exp` or a table lookup, which on one thread was ~4 % of a batched decode step
/// while the other threads waited for the next matmul. The result is per element, so it does
/// not depend on how the work is split.
pub fn gated_inplace<F: Fn(f32) -> f32 + Sync>(gate: &mut [f32], up: &[f32], act: F) {
    gated_pieces(gate, up, |g, u| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = act(*g) * u;
        }
    });
}

/// SwiGLU's product `gate[i] = silu(gate[i]) · up[i]` ([`modu_kernels::silu_mul`], vectorised),
/// in parallel pieces as [`gated_inplace`].
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    gated_pieces(gate, up, modu_kernels::silu_mul);
}

/// Runs `f(gate piece, up piece)` over matching pieces of the two slices, in parallel.
fn gated_pieces<F: Fn(&mut [f32], &[f32]) + Sync>(gate: &mut [f32], up: &[f32], f: F) {
    debug_assert_eq!(gate.len(), up.len());
    /// Fewer elements than this are not worth a parallel section (a few µs).
    const PIECE: usize = 2048;
    let threads = rayon::current_num_threads().max(1);
    let piece = gate.len().div_ceil(threads).max(PIECE);
    modu_kernels::pool::for_each_chunk_mut(gate, piece, |i, g| {
        let start = i * piece;
        f(g, &up[start..start + g.len()]);
    });
}

/// GELU, tanh approximation (what Gemma uses).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// GELU as llama.cpp's CPU backend evaluates it: clamped outside ±10, otherwise the tanh form
/// at the f16-rounded input, rounded to f16 (ggml reads it from a 64K-entry f16 table). Matching
/// this rounding keeps Gemma's logits within llama.cpp's. Like ggml we read a 64K-entry table
/// indexed by the f16 bits (built once, 128 KiB), which is also much faster than `tanh`.
pub fn gelu_ggml(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let table = GELU_F16.get_or_init(|| {
            (0..=u16::MAX)
                .map(|bits| half::f16::from_f32(gelu_tanh(half::f16::from_bits(bits).to_f32())))
                .collect()
        });
        table[half::f16::from_f32(x).to_bits() as usize].to_f32()
    }
}

static GELU_F16: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_table_equals_direct_evaluation() {
        for i in -2200..=2200 {
            let x = i as f32 * 0.005 + 0.0001;
            let direct = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                half::f16::from_f32(gelu_tanh(half::f16::from_f32(x).to_f32())).to_f32()
            };
            assert_eq!(gelu_ggml(x), direct, "x = {x}");
        }
        assert_eq!(gelu_ggml(-11.0), 0.0);
        assert_eq!(gelu_ggml(12.5), 12.5);
    }
}
