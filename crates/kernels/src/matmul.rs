//! Weights × activations.
//!
//! `matmul` quantizes every activation row once into the weight type's dot type, then computes
//! one dot product per (weight row, token), parallel over chunks of weight rows. Inside a chunk
//! all tokens are processed, so each weight chunk is read from memory once per call.
//!
//! On AVX2 the 32-element block types (Q4_0, Q5_0, Q8_0) use [`crate::q32`] (or, interleaved,
//! [`crate::q32x8`]) for every token count; Q4_K/Q6_K use [`crate::qk8`] for every token count
//! when interleaved, else the tiled GEMM of [`crate::gemm`] from [`GEMM_MIN_TOKENS`] tokens on.
//! Every path gives each (row, token) output the same bits as the per-row dot kernel, so a
//! token's result never depends on the batch it is in.
//!
//! To share one quantization of the activations between several matrices (the Q, K and V
//! projections), use [`quantize_activations`] then [`matmul_quantized`] for each matrix.

use crate::blocks::*;
use crate::dispatch::{self, Dot4Fn, DotFn};
use crate::{row_bytes, KernelError, Layout, QMatrix};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use modu_gguf::GgmlType;

/// The activation type a weight type is multiplied with (as in llama.cpp): Q8_0 for
/// Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, and the weight's own type for
/// F32/F16/BF16.
pub fn vec_dot_type(ty: GgmlType) -> Result<GgmlType, KernelError> {
    use GgmlType as T;
    Ok(match ty {
        T::F32 => T::F32,
        T::F16 => T::F16,
        T::BF16 => T::BF16,
        T::Q4_0 | T::Q5_0 | T::Q8_0 => T::Q8_0,
        T::Q4_1 | T::Q5_1 => T::Q8_1,
        T::Q2_K | T::Q3_K | T::Q4_K | T::Q5_K | T::Q6_K => T::Q8_K,
        other => return Err(KernelError::UnsupportedType(other)),
    })
}

/// Activation rows in a dot type, `n_tokens` rows of `cols` elements each.
#[derive(Debug, Clone)]
pub enum ActivationData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8_0(Vec<BlockQ8_0>),
    Q8_1(Vec<BlockQ8_1>),
    Q8K(Vec<BlockQ8K>),
}

/// Activations quantized once, reusable against every weight matrix with the same dot type.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    ty: GgmlType,
    cols: usize,
    n_tokens: usize,
    data: ActivationData,
}

impl QuantizedActivations {
    /// An empty buffer for dot type `ty` (one of F32, F16, BF16, Q8_0, Q8_1, Q8_K); fill it
    /// with [`QuantizedActivations::quantize`] (which reuses the allocation).
    pub fn new(ty: GgmlType) -> Result<Self, KernelError> {
        use GgmlType as T;
        let data = match ty {
            T::F32 => ActivationData::F32(Vec::new()),
            T::F16 => ActivationData::F16(Vec::new()),
            T::BF16 => ActivationData::BF16(Vec::new()),
            T::Q8_0 => ActivationData::Q8_0(Vec::new()),
            T::Q8_1 => ActivationData::Q8_1(Vec::new()),
            T::Q8_K => ActivationData::Q8K(Vec::new()),
            other => return Err(KernelError::UnsupportedType(other)),
        };
        Ok(QuantizedActivations {
            ty,
            cols: 0,
            n_tokens: 0,
            data,
        })
    }

    /// Quantize `n_tokens` rows of `cols` values (`x.len() == n_tokens * cols`).
    pub fn quantize(&mut self, x: &[f32], n_tokens: usize, cols: usize) -> Result<(), KernelError> {
        let total = n_tokens.checked_mul(cols).ok_or(KernelError::Overflow)?;
        if x.len() != total {
            return Err(KernelError::Length {
                what: "activations",
                expected: total,
                got: x.len(),
                unit: "values",
            });
        }
        let bs = self.ty.block_size();
        if cols % bs != 0 {
            return Err(KernelError::NotBlockMultiple {
                ty: self.ty,
                n: cols,
                block: bs,
            });
        }
        let nb = cols / bs; // blocks (or elements) per row
        fn fill<B: Clone + Default + Send>(
            v: &mut Vec<B>,
            x: &[f32],
            n_tokens: usize,
            cols: usize,
            nb: usize,
            f: fn(&[f32], &mut [B]),
        ) {
            v.clear();
            v.resize(n_tokens * nb, B::default());
            if nb == 0 {
                return;
            }
            if n_tokens > 1 && cols >= 1024 {
                // On the matmul's own pool: waking rayon's sleeping threads here cost more
                // than the quantization, once per layer.
                crate::pool::for_each_chunk_mut(v, nb, |t, o| f(&x[t * cols..(t + 1) * cols], o));
            } else {
                v.chunks_mut(nb)
                    .zip(x.chunks(cols))
                    .for_each(|(o, xr)| f(xr, o));
            }
        }
        match &mut self.data {
            ActivationData::F32(v) => {
                v.clear();
                v.extend_from_slice(x);
            }
            ActivationData::F16(v) => {
                v.clear();
                v.resize(x.len(), f16::ZERO);
                v.convert_from_f32_slice(x);
            }
            ActivationData::BF16(v) => {
                v.clear();
                v.resize(x.len(), bf16::ZERO);
                v.convert_from_f32_slice(x);
            }
            ActivationData::Q8_0(v) => fill(v, x, n_tokens, cols, nb, dispatch::sel_quant_q8_0()),
            ActivationData::Q8_1(v) => fill(v, x, n_tokens, cols, nb, dispatch::sel_quant_q8_1()),
            ActivationData::Q8K(v) => fill(v, x, n_tokens, cols, nb, dispatch::sel_quant_q8_k()),
        }
        self.cols = cols;
        self.n_tokens = n_tokens;
        Ok(())
    }

    /// The dot type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    pub fn data(&self) -> &ActivationData {
        &self.data
    }
}

/// Quantize `n_tokens` activation rows of `cols` values into `dot_ty` (see [`vec_dot_type`]).
pub fn quantize_activations(
    dot_ty: GgmlType,
    x: &[f32],
    n_tokens: usize,
    cols: usize,
) -> Result<QuantizedActivations, KernelError> {
    let mut q = QuantizedActivations::new(dot_ty)?;
    q.quantize(x, n_tokens, cols)?;
    Ok(q)
}

/// `y[t*rows + r] = Σ_c W[r,c]·x[t*cols + c]` for `t < n_tokens`, with the activations
/// quantized to `vec_dot_type(w.ty)` first.
pub fn matmul(w: &QMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<(), KernelError> {
    w.validate()?;
    let dot_ty = vec_dot_type(w.ty)?;
    check_lengths(w, x.len(), n_tokens, y.len(), "activations", "values")?;
    if dot_ty == GgmlType::F32 {
        // No conversion needed: use the activations in place.
        return run(
            w,
            x,
            w.cols,
            n_tokens,
            y,
            dispatch::sel_f32(),
            dispatch::sel4_f32(),
        );
    }
    let qa = quantize_activations(dot_ty, x, n_tokens, w.cols)?;
    matmul_quantized(w, &qa, y)
}

/// As [`matmul`] with activations already quantized to the weight type's dot type;
/// `y.len()` must be `a.n_tokens() * w.rows`.
pub fn matmul_quantized(
    w: &QMatrix,
    a: &QuantizedActivations,
    y: &mut [f32],
) -> Result<(), KernelError> {
    w.validate()?;
    let dot_ty = vec_dot_type(w.ty)?;
    if a.ty != dot_ty {
        return Err(KernelError::ActivationType {
            weight: w.ty,
            expected: dot_ty,
            got: a.ty,
        });
    }
    if a.cols != w.cols && a.n_tokens > 0 {
        return Err(KernelError::Columns {
            expected: w.cols,
            got: a.cols,
        });
    }
    let n_tokens = a.n_tokens;
    let per_tok = w.cols / dot_ty.block_size();
    use GgmlType as T;
    macro_rules! go {
        ($v:expr, $sel:path, $sel4:path) => {{
            check_lengths(
                w,
                $v.len() * dot_ty.block_size(),
                n_tokens,
                y.len(),
                "activation rows",
                "values",
            )?;
            run(w, $v, per_tok, n_tokens, y, $sel(), $sel4())
        }};
    }
    #[cfg(target_arch = "x86_64")]
    if dispatch::use_avx2() {
        if let Some(r) = q32_x86(w, a, y) {
            return r;
        }
        if let Some(r) = qk8_x86(w, a, y) {
            return r;
        }
    }
    if w.layout != Layout::Ggml {
        // Only the AVX2 kernel reads regrouped rows (loaders regroup only for it); any other
        // path gets the matrix back in ggml's layout, a copy per call.
        let mut buf = Vec::new();
        return matmul_quantized(&w.as_ggml(&mut buf)?, a, y);
    }
    #[cfg(target_arch = "x86_64")]
    if n_tokens >= GEMM_MIN_TOKENS && dispatch::use_avx2() {
        if let Some(r) = gemm_x86(w, a, y) {
            return r;
        }
    }
    match (&a.data, w.ty) {
        (ActivationData::F32(v), T::F32) => go!(v, dispatch::sel_f32, dispatch::sel4_f32),
        (ActivationData::F16(v), T::F16) => go!(v, dispatch::sel_f16, dispatch::sel4_f16),
        (ActivationData::BF16(v), T::BF16) => go!(v, dispatch::sel_bf16, dispatch::sel4_bf16),
        (ActivationData::Q8_0(v), T::Q4_0) => go!(v, dispatch::sel_q4_0, dispatch::sel4_q4_0),
        (ActivationData::Q8_0(v), T::Q5_0) => go!(v, dispatch::sel_q5_0, dispatch::sel4_q5_0),
        (ActivationData::Q8_0(v), T::Q8_0) => go!(v, dispatch::sel_q8_0, dispatch::sel4_q8_0),
        (ActivationData::Q8_1(v), T::Q4_1) => go!(v, dispatch::sel_q4_1, dispatch::sel4_q4_1),
        (ActivationData::Q8_1(v), T::Q5_1) => go!(v, dispatch::sel_q5_1, dispatch::sel4_q5_1),
        (ActivationData::Q8K(v), T::Q2_K) => go!(v, dispatch::sel_q2_k, dispatch::sel4_q2_k),
        (ActivationData::Q8K(v), T::Q3_K) => go!(v, dispatch::sel_q3_k, dispatch::sel4_q3_k),
        (ActivationData::Q8K(v), T::Q4_K) => go!(v, dispatch::sel_q4_k, dispatch::sel4_q4_k),
        (ActivationData::Q8K(v), T::Q5_K) => go!(v, dispatch::sel_q5_k, dispatch::sel4_q5_k),
        (ActivationData::Q8K(v), T::Q6_K) => go!(v, dispatch::sel_q6_k, dispatch::sel4_q6_k),
        _ => Err(KernelError::UnsupportedType(w.ty)),
    }
}

fn check_lengths(
    w: &QMatrix,
    x_len: usize,
    n_tokens: usize,
    y_len: usize,
    what: &'static str,
    unit: &'static str,
) -> Result<(), KernelError> {
    let nx = n_tokens.checked_mul(w.cols).ok_or(KernelError::Overflow)?;
    if x_len != nx {
        return Err(KernelError::Length {
            what,
            expected: nx,
            got: x_len,
            unit,
        });
    }
    let ny = n_tokens.checked_mul(w.rows).ok_or(KernelError::Overflow)?;
    if y_len != ny {
        return Err(KernelError::Length {
            what: "output",
            expected: ny,
            got: y_len,
            unit: "values",
        });
    }
    Ok(())
}

/// Output pointer shared by the row-chunk tasks.
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint elements (each (token, row) pair belongs to exactly one row
// chunk), and the pointer outlives the parallel section (it borrows `y` mutably throughout).
unsafe impl Send for OutPtr {}
// SAFETY: see `Send`; no element is read or written by two tasks.
unsafe impl Sync for OutPtr {}

/// Core loop. `act` holds `n_tokens` rows of `per_tok` elements; lengths were validated.
fn run<W: RowView, A: Sync>(
    w: &QMatrix,
    act: &[A],
    per_tok: usize,
    n_tokens: usize,
    y: &mut [f32],
    dot: DotFn<W, A>,
    dot4: Option<Dot4Fn<W, A>>,
) -> Result<(), KernelError> {
    let rows = w.rows;
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    let wv = W::view_all(w.data).ok_or(KernelError::Overflow)?;
    let per_row = wv.len() / rows;
    debug_assert_eq!(wv.len(), per_row * rows);
    debug_assert_eq!(act.len(), per_tok * n_tokens);
    let row_bytes = row_bytes(w.ty, w.cols)?;

    let out = OutPtr(y.as_mut_ptr());
    let out = &out;
    // All (token, row) outputs for rows r0..r1.
    let do_rows = |r0: usize, r1: usize| {
        let tok = |t: usize| &act[t * per_tok..(t + 1) * per_tok];
        let mut t = 0;
        if let Some(dot4) = dot4 {
            // Four tokens per weight-row pass: each weight block is decoded once for all four.
            while t + 4 <= n_tokens {
                let a = [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)];
                for r in r0..r1 {
                    let v = dot4(&wv[r * per_row..(r + 1) * per_row], a);
                    for (k, &vk) in v.iter().enumerate() {
                        // SAFETY: t + k < n_tokens and r < rows, and y.len() == n_tokens * rows
                        // (validated), so the index is in bounds; row ranges of concurrent
                        // calls are disjoint, so no other task touches this element.
                        unsafe { *out.0.add((t + k) * rows + r) = vk };
                    }
                }
                t += 4;
            }
        }
        for t in t..n_tokens {
            let a = tok(t);
            for r in r0..r1 {
                let v = dot(&wv[r * per_row..(r + 1) * per_row], a);
                // SAFETY: as above: in bounds, and no other task writes this element.
                unsafe { *out.0.add(t * rows + r) = v };
            }
        }
    };

    // Rows per task: small enough that a chunk of weight rows stays in cache while every token
    // passes over it, and enough chunks to balance the threads.
    // With one token there is no reuse to keep in cache: larger chunks (up to 1024 rows) keep
    // the task count, and so rayon's overhead, small for big matrices (the 151936-row output).
    let threads = rayon::current_num_threads().max(1);
    let (max_chunk, per_thread) = if n_tokens == 1 {
        (1024, 8)
    } else {
        ((256 * 1024 / row_bytes.max(1)).clamp(1, 64), 4)
    };
    let chunk = rows.div_ceil(threads * per_thread).clamp(1, max_chunk);
    let n_chunks = rows.div_ceil(chunk);
    let work = row_bytes.saturating_mul(rows).saturating_mul(n_tokens);
    if threads == 1 || n_chunks == 1 || work < 64 * 1024 {
        // Small problems: not worth waking the pool.
        for ci in 0..n_chunks {
            let r0 = ci * chunk;
            do_rows(r0, (r0 + chunk).min(rows));
        }
        return Ok(());
    }
    crate::pool::for_each(n_chunks, |ci| {
        let r0 = ci * chunk;
        do_rows(r0, (r0 + chunk).min(rows));
    });
    Ok(())
}

/// From this many tokens on, Q4_K and Q6_K in ggml's layout use the tiled GEMM of
/// [`crate::gemm`] (bit-identical to the dot kernels, so the threshold only affects speed).
#[cfg(target_arch = "x86_64")]
const GEMM_MIN_TOKENS: usize = 4;

/// The tiled GEMM for the types that have one (AVX2 only); `None` for the others. Lengths of
/// `a` are checked here; `w` was validated and `a` matched to it by the caller.
#[cfg(target_arch = "x86_64")]
fn gemm_x86(
    w: &QMatrix,
    a: &QuantizedActivations,
    y: &mut [f32],
) -> Option<Result<(), KernelError>> {
    use crate::gemm;
    use GgmlType as T;
    let n_tokens = a.n_tokens;
    let nb = w.cols / w.ty.block_size();
    let rows = w.rows;
    // K-quants: `$scale_bytes` of per-row decoded scales per block beside the decoded quants.
    macro_rules! go_k {
        ($blk:ty, $v:expr, $scale_bytes:expr, $kernel:path) => {{
            let v: &[BlockQ8K] = $v;
            if let Err(e) = check_lengths(
                w,
                v.len() * 256,
                n_tokens,
                y.len(),
                "activation rows",
                "values",
            ) {
                return Some(Err(e));
            }
            let Some(wv) = as_blocks::<$blk>(w.data) else {
                return Some(Err(KernelError::Overflow));
            };
            let out = OutPtr(y.as_mut_ptr());
            let out = &out;
            let dec_row = nb * (std::mem::size_of::<gemm::DecK>() + $scale_bytes);
            par_row_chunks(rows, n_tokens, dec_row, 192 * 1024, |r0, r1| {
                // SAFETY: as for the 32-element types.
                unsafe { $kernel(wv, nb, r0, r1, v, n_tokens, out.0, rows) }
            });
            Some(Ok(()))
        }};
    }
    match (&a.data, w.ty) {
        (ActivationData::Q8K(v), T::Q6_K) => go_k!(BlockQ6K, v, 4, gemm::gemm_rows_q6k),
        (ActivationData::Q8K(v), T::Q4_K) => go_k!(BlockQ4K, v, 8, gemm::gemm_rows_q4k),
        _ => None,
    }
}

/// The kernel of [`crate::q32`] for Q4_0/Q5_0/Q8_0 weights, every token count (AVX2 only);
/// `None` for other types.
#[cfg(target_arch = "x86_64")]
fn q32_x86(
    w: &QMatrix,
    a: &QuantizedActivations,
    y: &mut [f32],
) -> Option<Result<(), KernelError>> {
    use crate::q32::{self, GroupedQ5_0, Plain, Q32Rows};
    use GgmlType as T;
    let ActivationData::Q8_0(v) = &a.data else {
        return None;
    };
    /// Prepares the activations and runs `kernel(r0, r1, prep, out)` through [`par_groups`]
    /// (which checks the shapes).
    fn drive<W: q32::Q32Block>(
        w: &QMatrix,
        v: &[BlockQ8_0],
        n_tokens: usize,
        y: &mut [f32],
        kernel: impl Fn(usize, usize, &q32::Prepared, *mut f32) + Sync,
    ) -> Result<(), KernelError> {
        // SAFETY: the caller checked AVX2/FMA/F16C.
        let prep = unsafe { q32::prepare::<W>(v) };
        let prep = &prep;
        par_groups(w, v.len() * 32, n_tokens, y, |r0, r1, out| {
            kernel(r0, r1, prep, out)
        })
    }
    fn go<M: Q32Rows>(
        w: &QMatrix,
        m: M,
        v: &[BlockQ8_0],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let rows = w.rows;
        drive::<M::W>(w, v, n_tokens, y, |r0, r1, prep, out| {
            // SAFETY: AVX2 checked; m holds rows × nb blocks (validated by the caller), v
            // n_tokens * nb (checked by `drive`) and prep was made from v; out points to
            // n_tokens * rows outputs and chunks are disjoint.
            unsafe { q32::rows(&m, r0, r1, v, prep, n_tokens, out, rows) }
        })
    }
    fn plain<W: q32::Q32Block + ByteBlock>(
        w: &QMatrix,
        v: &[BlockQ8_0],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let wv = as_blocks::<W>(w.data).ok_or(KernelError::Overflow)?;
        let nb = w.cols / 32;
        go(w, Plain { w: wv, nb }, v, n_tokens, y)
    }
    fn interleaved<W: crate::q32x16::X16Block>(
        w: &QMatrix,
        v: &[BlockQ8_0],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        let (rows, nb) = (w.rows, w.cols / 32);
        // `validate` checked whole groups of eight rows.
        debug_assert!(
            rows % crate::layout::INTERLEAVE == 0
                && w.data.len() == rows / crate::layout::INTERLEAVE * nb * W::BYTES
        );
        if n_tokens >= 2 && dispatch::use_avx512() {
            let prep = crate::q32x16::prepare16::<W>(v);
            let prep = &prep;
            return par_groups(w, v.len() * 32, n_tokens, y, |r0, r1, out| {
                // SAFETY: use_avx512() confirmed AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; the
                // shapes are as for the AVX2 kernel below (checked by par_groups) and prep
                // was made from v for W.
                unsafe {
                    crate::q32x16::rows::<W>(w.data, nb, r0, r1, v, prep, n_tokens, out, rows)
                }
            });
        }
        drive::<W>(w, v, n_tokens, y, |r0, r1, prep, out| {
            // SAFETY: AVX2 checked; w.data holds rows/8 groups of nb interleaved blocks
            // (validated), r0 and r1 are multiples of 8 (chunks are whole groups, rows is a
            // multiple of 8), v holds n_tokens * nb blocks (checked by `drive`) and prep was
            // made from v; out points to n_tokens * rows outputs and chunks are disjoint.
            unsafe { crate::q32x8::rows::<W>(w.data, nb, r0, r1, v, prep, n_tokens, out, rows) }
        })
    }
    let n = a.n_tokens;
    Some(match (w.ty, w.layout) {
        (T::Q4_0, Layout::Ggml) => plain::<BlockQ4_0>(w, v, n, y),
        (T::Q5_0, Layout::Ggml) => plain::<BlockQ5_0>(w, v, n, y),
        (T::Q8_0, Layout::Ggml) => plain::<BlockQ8_0>(w, v, n, y),
        (T::Q5_0, Layout::Interleaved8) => interleaved::<BlockQ5_0>(w, v, n, y),
        (T::Q8_0, Layout::Interleaved8) => interleaved::<BlockQ8_0>(w, v, n, y),
        (T::Q5_0, Layout::Grouped8) => {
            let m = GroupedQ5_0 {
                data: w.data,
                nb: w.cols / 32,
            };
            go(w, m, v, n, y)
        }
        _ => return None,
    })
}

/// Checks the lengths (`act_values` activation values for `y`), then runs `f(r0, r1, out)` over
/// chunks of whole 8-row groups covering `0..w.rows` ([`row_chunk`]), in parallel when worth it;
/// `out` is `y`'s pointer, and every chunk writes only its rows of it.
#[cfg(target_arch = "x86_64")]
fn par_groups(
    w: &QMatrix,
    act_values: usize,
    n_tokens: usize,
    y: &mut [f32],
    f: impl Fn(usize, usize, *mut f32) + Sync,
) -> Result<(), KernelError> {
    check_lengths(
        w,
        act_values,
        n_tokens,
        y.len(),
        "activation rows",
        "values",
    )?;
    let rows = w.rows;
    if rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    let row_bytes = row_bytes(w.ty, w.cols)?;
    let threads = rayon::current_num_threads().max(1);
    let chunk = row_chunk(rows, n_tokens, row_bytes);
    let n_chunks = rows.div_ceil(chunk);
    let parallel = threads > 1 && n_chunks > 1 && row_bytes * rows * n_tokens >= 64 * 1024;
    let out = OutPtr(y.as_mut_ptr());
    let out = &out;
    let job = |ci: usize| {
        let r0 = ci * chunk;
        f(r0, (r0 + chunk).min(rows), out.0)
    };
    if parallel {
        crate::pool::for_each(n_chunks, job);
    } else {
        (0..n_chunks).for_each(job);
    }
    Ok(())
}

/// The kernels of [`crate::qk8`] for interleaved Q4_K and Q6_K weights, every token count
/// (AVX2 only); `None` for other types and layouts.
#[cfg(target_arch = "x86_64")]
fn qk8_x86(
    w: &QMatrix,
    a: &QuantizedActivations,
    y: &mut [f32],
) -> Option<Result<(), KernelError>> {
    use crate::qk8;
    type Kernel = unsafe fn(&[u8], usize, usize, usize, &[BlockQ8K], usize, *mut f32, usize);
    let kernel: Kernel = match (w.ty, w.layout) {
        (GgmlType::Q4_K, Layout::Interleaved8) => qk8::rows::<qk8::DecQ4K>,
        (GgmlType::Q6_K, Layout::Interleaved8) => qk8::rows::<qk8::DecQ6K>,
        _ => return None,
    };
    let ActivationData::Q8K(v) = &a.data else {
        return None;
    };
    let (n_tokens, rows, nb) = (a.n_tokens, w.rows, w.cols / 256);
    let kernel: Kernel = match (n_tokens >= 2 && dispatch::use_avx512(), w.ty) {
        // SAFETY (of calling these below): use_avx512() confirmed AVX-512 F/BW/VL/VNNI and
        // AVX2/FMA/F16C; their contract is the AVX2 kernels'.
        (true, GgmlType::Q4_K) => crate::qk16::rows::<crate::qk16::Dec16Q4K>,
        (true, GgmlType::Q6_K) => crate::qk16::rows::<crate::qk16::Dec16Q6K>,
        _ => kernel,
    };
    Some(par_groups(w, v.len() * 256, n_tokens, y, |r0, r1, out| {
        // SAFETY: AVX2 checked by the caller; w.data holds rows / 8 groups of nb interleaved
        // super-blocks (validated: rows is a multiple of 8, the length is rows × row bytes),
        // r0 and r1 are multiples of 8 (whole groups), v holds n_tokens * nb blocks (checked
        // by par_groups); out points to n_tokens * rows outputs and chunks are disjoint.
        unsafe { kernel(w.data, nb, r0, r1, v, n_tokens, out, rows) }
    }))
}

/// Rows per parallel task of the 32-element block kernels: whole 8-row groups (16 on the
/// AVX-512 path of several tokens), about 8 tasks
/// per thread for one token (up to 1024 rows); with more tokens also small enough (~128 KiB of
/// weights) to stay in L2 while every token tile passes over them.
#[cfg(target_arch = "x86_64")]
fn row_chunk(rows: usize, n_tokens: usize, row_bytes: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // The AVX-512 kernels of several tokens take rows sixteen at a time.
    let g = if n_tokens > 1 && dispatch::use_avx512() {
        2 * crate::q32::ROWS
    } else {
        crate::q32::ROWS
    };
    let mut chunk = rows.div_ceil(threads * 8).clamp(g, 1024);
    if n_tokens > 1 {
        chunk = chunk.min((128 * 1024 / row_bytes.max(1)).max(g));
    }
    chunk.div_ceil(g) * g
}

/// Runs `f(r0, r1)` over chunks of rows covering `0..rows`, in parallel when worth it. A chunk
/// has an even number of rows (but the last) and at most `max_bytes / dec_row` rows.
#[cfg(target_arch = "x86_64")]
fn par_row_chunks<F: Fn(usize, usize) + Sync>(
    rows: usize,
    n_tokens: usize,
    dec_row: usize,
    max_bytes: usize,
    f: F,
) {
    let threads = rayon::current_num_threads().max(1);
    let max_chunk = (max_bytes / dec_row.max(1)).max(2) & !1;
    let chunk = (rows.div_ceil(threads * 4).max(2).div_ceil(2) * 2).min(max_chunk);
    let n_chunks = rows.div_ceil(chunk);
    let work = dec_row.saturating_mul(rows).saturating_mul(n_tokens);
    if threads == 1 || n_chunks == 1 || work < 64 * 1024 {
        for ci in 0..n_chunks {
            let r0 = ci * chunk;
            f(r0, (r0 + chunk).min(rows));
        }
        return;
    }
    crate::pool::for_each(n_chunks, |ci| {
        let r0 = ci * chunk;
        f(r0, (r0 + chunk).min(rows));
    });
}

/// How `run` views a weight matrix's bytes as row elements.
trait RowView: Sync + Sized + 'static {
    fn view_all(bytes: &[u8]) -> Option<&[Self]>;
}
impl<T: ByteBlock> RowView for T {
    fn view_all(bytes: &[u8]) -> Option<&[T]> {
        as_blocks(bytes)
    }
}
impl RowView for u8 {
    fn view_all(bytes: &[u8]) -> Option<&[u8]> {
        Some(bytes)
    }
}

/// Several matrices against the same quantized activations (the Q, K and V projections, or the
/// gate and up projections). `jobs[i].1` receives `a.n_tokens() * jobs[i].0.rows` values.
/// (One after the other, each parallel inside: with [`crate::pool`] a parallel section costs
/// about a microsecond, and nesting them would fall back to rayon.)
pub fn matmul_quantized_many(
    jobs: &mut [(&QMatrix, &mut [f32])],
    a: &QuantizedActivations,
) -> Result<(), KernelError> {
    jobs.iter_mut()
        .try_for_each(|(w, y)| matmul_quantized(w, a, y))
}
