//! Weight quantizers: f32 rows → ggml blocks (the inverse of [`crate::dequantize_row`]).
//!
//! Every format stores integers `q` and a few scales per block; the quantizer chooses the
//! scales so that the *weighted* squared error `Σ w·(x − x̂)²` is small, where the weights are
//! an importance matrix (mean of the squared activations that meet each column, see
//! `modu imatrix`) when one is given, and otherwise a magnitude-based weighting (`w = rms + |x|`
//! per sub-block) that favours the large weights, which matter most for the output.
//!
//! How scales are chosen:
//! * **Symmetric formats** (`Q4_0`, `Q5_0`, `Q8_0`, and the sub-blocks of `Q3_K`, `Q6_K`):
//!   `x ≈ d·q` with `q ∈ [qmin, qmax]`. A grid of candidate inverse scales around
//!   `qmax/amax` (both signs, because the integer range is not symmetric) is tried; for each
//!   candidate the rounded `q` are fixed and the best `d` in closed form
//!   (`d = Σwxq / Σwq²`) gives the error. The best candidate wins.
//! * **Affine formats** (`Q4_1`, `Q5_1`, and the sub-blocks of `Q2_K`, `Q4_K`, `Q5_K`):
//!   `x ≈ d·q + m`. Candidate scales around `(max − min)/qmax` fix `q`; then `(d, m)` solve the
//!   2×2 weighted least-squares problem. The K-quants store `m = −dmin·mq` with unsigned `mq`,
//!   so there `m ≤ 0` is enforced.
//! * **K-quant super-blocks**: the per-sub-block scales (and mins) found above are themselves
//!   quantized to 4/6/8-bit integers against one f16 super-scale; a few candidate super-scales
//!   are tried and, for each, the values are re-rounded against the *final* (quantized) scales
//!   and the total weighted error is measured, so the stored block is the best of those tried.
//!
//! NaN and infinite inputs are rejected with [`KernelError::NonFinite`].

// Index loops mirror the block layouts.
#![allow(clippy::needless_range_loop)]

use crate::blocks::*;
use crate::{row_bytes, KernelError};
use half::{bf16, f16};
use modu_gguf::{GgmlType, QK_K};

/// Types [`quantize_row`] can produce.
pub const QUANTIZE_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Quantize one row (or any whole number of blocks) `src` into `dst`, which must be exactly
/// `row_bytes(ty, src.len())` bytes. `imatrix`, if given, holds one non-negative importance per
/// element of `src` (the importance of the element's input column).
pub fn quantize_row(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
) -> Result<(), KernelError> {
    use GgmlType as T;
    if !QUANTIZE_TYPES.contains(&ty) {
        return Err(KernelError::UnsupportedType(ty));
    }
    let need = row_bytes(ty, src.len())?;
    if dst.len() != need {
        return Err(KernelError::Length {
            what: "quantize destination",
            expected: need,
            got: dst.len(),
            unit: "bytes",
        });
    }
    // f16 values (F16) and f16 block scales/offsets cannot represent weights beyond the f16
    // range; real weights are many orders of magnitude smaller, so this is a corrupt input.
    let f16_limited = ty != T::F32 && ty != T::BF16;
    let limit = if f16_limited { 65504.0 } else { f32::MAX };
    if !all_within(src, limit) {
        if let Some(i) = src.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::NonFinite { index: i });
        }
        if let Some(i) = src.iter().position(|v| v.abs() > 65504.0) {
            return Err(KernelError::TooLarge { index: i, ty });
        }
    }
    if let Some(im) = imatrix {
        if im.len() != src.len() {
            return Err(KernelError::Length {
                what: "importance matrix row",
                expected: src.len(),
                got: im.len(),
                unit: "values",
            });
        }
        if !im.chunks(64).all(|c| {
            c.iter()
                .fold(true, |ok, &v| ok & (0.0..=f32::MAX).contains(&v))
        }) {
            if let Some(i) = im.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return Err(KernelError::NonFinite { index: i });
            }
        }
    }
    match ty {
        T::F32 => {
            for (o, v) in dst.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        T::F16 => {
            for (o, v) in dst.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        T::BF16 => {
            for (o, v) in dst.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        T::Q8_0 => blocks32(src, dst, imatrix, 34, q8_0_block),
        T::Q4_0 => blocks32(src, dst, imatrix, 18, q4_0_block),
        T::Q4_1 => blocks32(src, dst, imatrix, 20, q4_1_block),
        T::Q5_0 => blocks32(src, dst, imatrix, 22, q5_0_block),
        T::Q5_1 => blocks32(src, dst, imatrix, 24, q5_1_block),
        T::Q2_K => blocks256(src, dst, imatrix, 84, q2_k_block),
        T::Q3_K => blocks256(src, dst, imatrix, 110, q3_k_block),
        T::Q4_K => blocks256(src, dst, imatrix, 144, |x, w, o| kq45_block(x, w, o, false)),
        T::Q5_K => blocks256(src, dst, imatrix, 176, |x, w, o| kq45_block(x, w, o, true)),
        T::Q6_K => blocks256(src, dst, imatrix, 210, q6_k_block),
        other => return Err(KernelError::UnsupportedType(other)),
    }
    Ok(())
}

/// Whether every `|v| ≤ limit` (false for NaN): the common case of the input checks, as a
/// branch-free pass per 64 values that vectorizes; the exact error is found only on failure.
/// (The early-exit `position` scans cost ~10 % of a whole quantization.)
fn all_within(src: &[f32], limit: f32) -> bool {
    src.chunks(64)
        .all(|c| c.iter().fold(true, |ok, v| ok & (v.abs() <= limit)))
}

/// Per-element weights of one block: `imatrix · sqrt(σ² + x²)` with an importance matrix
/// (σ² the block's mean square, so small weights in an important column still count), else
/// `rms + |x|` over the block.
fn weights(x: &[f32], im: Option<&[f32]>, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    match im {
        Some(im) => {
            for ((o, &v), &q) in out.iter_mut().zip(x).zip(im) {
                *o = q * (ms + v * v).sqrt();
            }
        }
        None => {
            let rms = ms.sqrt();
            for (o, &v) in out.iter_mut().zip(x) {
                *o = rms + v.abs();
            }
        }
    }
}

fn blocks32(
    src: &[f32],
    dst: &mut [u8],
    im: Option<&[f32]>,
    bytes: usize,
    f: impl Fn(&[f32], &[f32], &mut [u8]),
) {
    let mut w = [0f32; QK];
    for (i, (x, o)) in src
        .chunks_exact(QK)
        .zip(dst.chunks_exact_mut(bytes))
        .enumerate()
    {
        weights(x, im.map(|m| &m[i * QK..(i + 1) * QK]), &mut w);
        f(x, &w, o);
    }
}

fn blocks256(
    src: &[f32],
    dst: &mut [u8],
    im: Option<&[f32]>,
    bytes: usize,
    f: impl Fn(&[f32], &[f32], &mut [u8]),
) {
    let mut w = [0f32; QK_K];
    for (i, (x, o)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(bytes))
        .enumerate()
    {
        weights(x, im.map(|m| &m[i * QK_K..(i + 1) * QK_K]), &mut w);
        f(x, &w, o);
    }
}

/// Round half away from zero and clamp. (`f32::round` is a libm call without SSE4.1; this is
/// a truncating conversion, which the scale searches do millions of times per tensor.)
#[inline(always)]
fn nearest(v: f32, lo: i32, hi: i32) -> i32 {
    round_away(v).clamp(lo, hi)
}

/// [`nearest`] without the clamp (saturating at the `i32` range).
#[inline(always)]
fn round_away(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

// ---------------------------------------------------------------------------------------------
// Scale searches
// ---------------------------------------------------------------------------------------------

/// Most candidates a scale search tries (`2·(2·8 + 1)` for Q3_K's symmetric search), rounded
/// up to whole 8-lane vectors.
const MAX_CAND: usize = 40;

/// The candidate sums of one scale search: for every candidate inverse scale `is[c]`, the
/// values are rounded (`q = clamp(round((x − off)·is[c]))`, `off` = 0 for symmetric fits) and
/// three weighted sums are formed: `Σwq`, `Σwq²`, `Σwxq`.
///
/// This is the hot loop of every scale search (about 70 % of `modu quantize` before it was
/// vectorized). The AVX2 version runs eight candidates in the eight lanes of a vector, each
/// lane doing exactly the scalar's operations in the scalar's order (one multiply, then one
/// add; no FMA), so both give bit-identical sums and the quantized files do not depend on the
/// CPU. `wx[i]` must be `w[i]·x[i]` and `xo[i]` must be `x[i] − off`, both rounded to f32 as
/// the scalar expressions are.
struct CandSums {
    swq: [f32; MAX_CAND],
    swqq: [f32; MAX_CAND],
    swxq: [f32; MAX_CAND],
}

fn cand_sums_scalar(
    xo: &[f32],
    w: &[f32],
    wx: &[f32],
    is: &[f32],
    qmin: i32,
    qmax: i32,
) -> CandSums {
    let mut r = CandSums {
        swq: [0.0; MAX_CAND],
        swqq: [0.0; MAX_CAND],
        swxq: [0.0; MAX_CAND],
    };
    for (c, &iscale) in is.iter().enumerate() {
        let (mut swq, mut swqq, mut swxq) = (0f32, 0f32, 0f32);
        for ((&v, &wi), &wxi) in xo.iter().zip(w).zip(wx) {
            let q = nearest(v * iscale, qmin, qmax) as f32;
            let wq = wi * q;
            swq += wq;
            swqq += wq * q;
            swxq += wxi * q;
        }
        r.swq[c] = swq;
        r.swqq[c] = swqq;
        r.swxq[c] = swxq;
    }
    r
}

#[cfg(test)]
thread_local! {
    /// Tests: run the scale searches' scalar reference on this thread even on an AVX2 CPU.
    static FORCE_SCALAR: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[inline(always)]
fn simd_searches() -> bool {
    #[cfg(test)]
    if FORCE_SCALAR.with(|f| f.get()) {
        return false;
    }
    crate::dispatch::use_avx2()
}

#[inline]
fn cand_sums(xo: &[f32], w: &[f32], wx: &[f32], is: &[f32], qmin: i32, qmax: i32) -> CandSums {
    #[cfg(target_arch = "x86_64")]
    if simd_searches() && is.len() <= MAX_CAND {
        // SAFETY: `use_avx2` is true only after `x86::available()` confirmed AVX2/FMA/F16C;
        // the slice lengths are checked inside.
        return unsafe { avx2::cand_sums(xo, w, wx, is, qmin, qmax) };
    }
    cand_sums_scalar(xo, w, wx, is, qmin, qmax)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{CandSums, GroupScales, MAX_CAND, MAX_SUPER};
    use modu_gguf::QK_K;
    use std::arch::x86_64::*;

    /// [`super::cand_sums_scalar`], eight candidates per vector.
    ///
    /// # Safety
    /// The CPU must support AVX2 (checked by the caller through the dispatch layer).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn cand_sums(
        xo: &[f32],
        w: &[f32],
        wx: &[f32],
        is: &[f32],
        qmin: i32,
        qmax: i32,
    ) -> CandSums {
        let n = xo.len().min(w.len()).min(wx.len());
        let nc = is.len().min(MAX_CAND);
        let mut pad = [0f32; MAX_CAND];
        pad[..nc].copy_from_slice(&is[..nc]);
        let mut r = CandSums {
            swq: [0.0; MAX_CAND],
            swqq: [0.0; MAX_CAND],
            swxq: [0.0; MAX_CAND],
        };
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let lo = _mm256_set1_epi32(qmin);
        let hi = _mm256_set1_epi32(qmax);
        for c0 in (0..nc).step_by(8) {
            // SAFETY: c0 + 8 <= MAX_CAND (a multiple of 8), so the loads and stores stay
            // inside the fixed-size arrays; the element loads index below `n`.
            let iscale = _mm256_loadu_ps(pad.as_ptr().add(c0));
            let (mut swq, mut swqq, mut swxq) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            for i in 0..n {
                let v = _mm256_set1_ps(*xo.get_unchecked(i));
                let wi = _mm256_set1_ps(*w.get_unchecked(i));
                let wxi = _mm256_set1_ps(*wx.get_unchecked(i));
                let t = _mm256_mul_ps(v, iscale);
                // round half away from zero: t + copysign(0.5, t), truncated (as `nearest`)
                let t = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half));
                let qi = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), lo), hi);
                let q = _mm256_cvtepi32_ps(qi);
                let wq = _mm256_mul_ps(wi, q);
                swq = _mm256_add_ps(swq, wq);
                swqq = _mm256_add_ps(swqq, _mm256_mul_ps(wq, q));
                swxq = _mm256_add_ps(swxq, _mm256_mul_ps(wxi, q));
            }
            _mm256_storeu_ps(r.swq.as_mut_ptr().add(c0), swq);
            _mm256_storeu_ps(r.swqq.as_mut_ptr().add(c0), swqq);
            _mm256_storeu_ps(r.swxq.as_mut_ptr().add(c0), swxq);
        }
        r
    }

    /// [`super::group_errs_scalar`] for all [`MAX_SUPER`] lanes at once (unused lanes hold
    /// zero scales and are ignored by the caller).
    ///
    /// # Safety
    /// The CPU must support AVX2; `x` and `w` must hold at least `gs·ng` values and `ng ≤ 16`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group_errs(
        x: &[f32],
        w: &[f32],
        gs: usize,
        ng: usize,
        sc: &GroupScales,
        qmin: i32,
        qmax: i32,
    ) -> [f32; MAX_SUPER] {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let lo = _mm256_set1_epi32(qmin);
        let hi = _mm256_set1_epi32(qmax);
        let mut total = _mm256_setzero_ps();
        for g in 0..ng {
            // SAFETY: g < ng <= 16 rows of MAX_SUPER (= 8) floats each.
            let d = _mm256_loadu_ps(sc.d[g].as_ptr());
            let m = _mm256_loadu_ps(sc.m[g].as_ptr());
            // id = d != 0 ? 1/d : 0, lane by lane
            let nz = _mm256_cmp_ps(d, zero, _CMP_NEQ_OQ);
            let id = _mm256_and_ps(_mm256_div_ps(one, d), nz);
            let mut err = _mm256_setzero_ps();
            for i in g * gs..(g + 1) * gs {
                // SAFETY: i < gs·ng <= x.len(), w.len() (checked by the caller).
                let v = _mm256_set1_ps(*x.get_unchecked(i));
                let wi = _mm256_set1_ps(*w.get_unchecked(i));
                let t = _mm256_mul_ps(_mm256_add_ps(v, m), id);
                let t = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half));
                let qi = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), lo), hi);
                let q = _mm256_cvtepi32_ps(qi);
                let e = _mm256_sub_ps(v, _mm256_sub_ps(_mm256_mul_ps(d, q), m));
                err = _mm256_add_ps(err, _mm256_mul_ps(_mm256_mul_ps(wi, e), e));
            }
            total = _mm256_add_ps(total, err);
        }
        let mut out = [0f32; MAX_SUPER];
        _mm256_storeu_ps(out.as_mut_ptr(), total);
        out
    }

    /// [`super::requant_groups_scalar`], one group per lane (8 groups per pass).
    ///
    /// # Safety
    /// The CPU must support AVX2; `ng` must be 8 or 16, `gs·ng ≤ QK_K`, and `x`, `w` must
    /// hold at least `gs·ng` values.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn requant_groups(
        x: &[f32],
        w: &[f32],
        gs: usize,
        ng: usize,
        dg: &[f32; 16],
        mg: &[f32; 16],
        qmin: i32,
        qmax: i32,
        q: &mut [i32; QK_K],
    ) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let lo = _mm256_set1_epi32(qmin);
        let hi = _mm256_set1_epi32(qmax);
        let gsi = gs as i32;
        let mut errs = [0f32; 16];
        let mut lane_q = [0i32; 8];
        for g0 in (0..ng).step_by(8) {
            // SAFETY: g0 + 8 <= ng <= 16, inside dg, mg and errs.
            let d = _mm256_loadu_ps(dg.as_ptr().add(g0));
            let m = _mm256_loadu_ps(mg.as_ptr().add(g0));
            let nz = _mm256_cmp_ps(d, zero, _CMP_NEQ_OQ);
            let id = _mm256_and_ps(_mm256_div_ps(one, d), nz);
            let base = g0 as i32 * gsi;
            let mut idx = _mm256_setr_epi32(
                base,
                base + gsi,
                base + 2 * gsi,
                base + 3 * gsi,
                base + 4 * gsi,
                base + 5 * gsi,
                base + 6 * gsi,
                base + 7 * gsi,
            );
            let step = _mm256_set1_epi32(1);
            let mut err = _mm256_setzero_ps();
            for i in 0..gs {
                // SAFETY: lane l reads (g0 + l)·gs + i < ng·gs <= x.len(), w.len().
                let v = _mm256_i32gather_ps::<4>(x.as_ptr(), idx);
                let wi = _mm256_i32gather_ps::<4>(w.as_ptr(), idx);
                let t = _mm256_mul_ps(_mm256_add_ps(v, m), id);
                let t = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(t, sign), half));
                let qi = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), lo), hi);
                let qf = _mm256_cvtepi32_ps(qi);
                let e = _mm256_sub_ps(v, _mm256_sub_ps(_mm256_mul_ps(d, qf), m));
                err = _mm256_add_ps(err, _mm256_mul_ps(_mm256_mul_ps(wi, e), e));
                _mm256_storeu_si256(lane_q.as_mut_ptr() as *mut __m256i, qi);
                for (l, &ql) in lane_q.iter().enumerate() {
                    // (g0 + l)·gs + i < ng·gs <= QK_K
                    *q.get_unchecked_mut((g0 + l) * gs + i) = ql;
                }
                idx = _mm256_add_epi32(idx, step);
            }
            _mm256_storeu_ps(errs.as_mut_ptr().add(g0), err);
        }
        let mut total = 0f32;
        for &e in &errs[..ng] {
            total += e;
        }
        total
    }
}

/// Candidate super-scales a K-quant scale search evaluates at once (one 8-lane vector).
const MAX_SUPER: usize = 8;

/// Per-group scales of up to [`MAX_SUPER`] candidates: `d[g][c]`, `m[g][c]` for group `g`
/// (at most 16 groups) and candidate `c`.
#[derive(Clone, Copy)]
struct GroupScales {
    d: [[f32; MAX_SUPER]; 16],
    m: [[f32; MAX_SUPER]; 16],
}

impl GroupScales {
    fn new() -> Self {
        Self {
            d: [[0.0; MAX_SUPER]; 16],
            m: [[0.0; MAX_SUPER]; 16],
        }
    }
}

/// For every candidate `c < nc`: the total weighted error of re-rounding `x` group by group
/// (`gs` values per group, `ng` groups) against that candidate's scales, i.e.
/// `Σ_g requant_affine(x_g, w_g, d[g][c], m[g][c], …)` with values clamped to `[qmin, qmax]`
/// (`m = 0` is [`requant_sym`] exactly: `v + 0` and `d·q − 0` change nothing that rounds).
///
/// This is the inner loop of the super-scale searches; like [`cand_sums`] the AVX2 version
/// runs one candidate per lane with the scalar's operations in the scalar's order (per-group
/// partial sums added to the total group by group), so the errors are bit-identical.
#[allow(clippy::too_many_arguments)]
fn group_errs_scalar(
    x: &[f32],
    w: &[f32],
    gs: usize,
    ng: usize,
    sc: &GroupScales,
    nc: usize,
    qmin: i32,
    qmax: i32,
) -> [f32; MAX_SUPER] {
    let mut out = [0f32; MAX_SUPER];
    for c in 0..nc.min(MAX_SUPER) {
        let mut total = 0f32;
        for g in 0..ng.min(16) {
            let (d, m) = (sc.d[g][c], sc.m[g][c]);
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut err = 0f32;
            for (&v, &wi) in x[g * gs..(g + 1) * gs].iter().zip(&w[g * gs..(g + 1) * gs]) {
                let q = nearest((v + m) * id, qmin, qmax);
                let e = v - (d * q as f32 - m);
                err += wi * e * e;
            }
            total += err;
        }
        out[c] = total;
    }
    out
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn group_errs(
    x: &[f32],
    w: &[f32],
    gs: usize,
    ng: usize,
    sc: &GroupScales,
    nc: usize,
    qmin: i32,
    qmax: i32,
) -> [f32; MAX_SUPER] {
    #[cfg(target_arch = "x86_64")]
    if simd_searches() && x.len() >= gs * ng && w.len() >= gs * ng && ng <= 16 {
        // SAFETY: AVX2 confirmed by the dispatch layer; lengths checked just above.
        return unsafe { avx2::group_errs(x, w, gs, ng, sc, qmin, qmax) };
    }
    group_errs_scalar(x, w, gs, ng, sc, nc, qmin, qmax)
}

/// Best `d` for `x ≈ d·q`, `q ∈ [qmin, qmax]`, minimizing `Σ w(x − dq)²`. Returns `d` (0 for
/// an all-zero block); the caller re-rounds against the stored `d`.
fn fit_symmetric(x: &[f32], w: &[f32], qmin: i32, qmax: i32, nstep: i32) -> f32 {
    let (mut amax, mut maxv) = (0f32, 0f32);
    let (mut xmin, mut xmax) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            maxv = v;
        }
        xmin = xmin.min(v);
        xmax = xmax.max(v);
    }
    if amax == 0.0 {
        return 0.0;
    }
    // Start from the classic choice: the largest-magnitude value maps to the end of the range
    // with the larger magnitude (e.g. -8 for 4 bits), then try smaller and larger scales.
    let lmax = (-qmin).max(qmax) as f32;
    let mut best_d = -maxv / qmin as f32;
    let mut best_err = f32::INFINITY;
    // Candidate inverse scales `sign·t/maxv`, both signs, `t` around `lmax`. The arithmetic
    // is element-wise over fixed-size arrays so that the divisions vectorize (IEEE division is
    // exact per element, so this changes no result).
    let step = (lmax / 8.0).max(0.5);
    let mut num = [0f32; MAX_CAND];
    let mut nc = 0;
    // Range both signs of a candidate can use without clamping.
    let (sym_lo, sym_hi) = (qmin.max(-qmax) as f32, qmax.min(-qmin) as f32);
    let inv_max = |t: f32| t / maxv;
    for sign in [-1f32, 1.0] {
        for k in -nstep..=nstep {
            let t = lmax + 0.1 * k as f32 * step;
            if t <= 0.5 || nc == MAX_CAND {
                continue;
            }
            if sign > 0.0 {
                // The +t candidate rounds every value to exactly minus what the −t candidate
                // (tried earlier) gave, unless one of them clamps: then its Σwxq is negated,
                // Σwq² equal, so its error is identical and, compared with a strict `<`,
                // it can never win. Skip it. Rounding is monotone, so the extremes of x
                // decide whether anything clamps: `trunc(z) ≤ hi ⇔ z < hi + 1` for `hi ≥ 0`,
                // `trunc(z) ≥ lo ⇔ z > lo − 1` for `lo ≤ 0`, with `z = y ± 0.5` as in
                // `nearest`.
                let iscale = inv_max(sign * t);
                let (a, b) = (xmax * iscale, xmin * iscale);
                let (hi, lo) = (a.max(b), a.min(b));
                let (zh, zl) = (hi + 0.5f32.copysign(hi), lo + 0.5f32.copysign(lo));
                if zh < sym_hi + 1.0 && zl > sym_lo - 1.0 {
                    continue;
                }
            }
            num[nc] = sign * t;
            nc += 1;
        }
    }
    let mut is = [0f32; MAX_CAND];
    for c in 0..nc {
        is[c] = num[c] / maxv;
    }
    let n = x.len();
    let mut buf = [0f32; QK];
    let mut heap = Vec::new();
    let wx: &mut [f32] = if n <= QK {
        &mut buf[..n]
    } else {
        heap.resize(n, 0.0);
        &mut heap
    };
    for i in 0..n {
        wx[i] = w[i] * x[i];
    }
    let s = cand_sums(x, &w[..n], wx, &is[..nc], qmin, qmax);
    // Σw(x−dq)² = Σwx² − (Σwxq)²/Σwq² for the optimal d = Σwxq/Σwq²: maximize the second
    // term. Element-wise (vectorized); lanes with Σwq² ≤ 0 are skipped below.
    let (mut d, mut err) = ([0f32; MAX_CAND], [0f32; MAX_CAND]);
    for c in 0..nc {
        d[c] = s.swxq[c] / s.swqq[c];
        err[c] = -s.swxq[c] * d[c];
    }
    for c in 0..nc {
        if s.swqq[c] <= 0.0 {
            continue;
        }
        if err[c] < best_err {
            best_err = err[c];
            best_d = d[c];
        }
    }
    best_d
}

/// Best `(d, m)` for `x ≈ d·q + m`, `q ∈ [0, qmax]`, minimizing `Σ w(x − dq − m)²`; with
/// `nonpos_min` the offset is kept `≤ 0` (K-quants store `−m` unsigned). Returns `(d, m)` with
/// `d ≥ 0`.
fn fit_affine(x: &[f32], w: &[f32], qmax: i32, nonpos_min: bool, nstep: i32) -> (f32, f32) {
    let mut min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if nonpos_min {
        min = min.min(0.0);
    }
    if max <= min {
        return (0.0, min);
    }
    let (sw, swx) = x
        .iter()
        .zip(w)
        .fold((0f32, 0f32), |(a, b), (&v, &wi)| (a + wi, b + wi * v));
    let mut best = ((max - min) / qmax as f32, min);
    let mut best_err = f32::INFINITY;
    let qf = qmax as f32;
    // Candidates and the closed-form solutions are formed element-wise over fixed-size arrays
    // so that the divisions vectorize (exact per element; unused lanes are ignored).
    let mut num = [0f32; MAX_CAND];
    let mut nc = 0;
    for k in -nstep..=nstep {
        let t = qf + 0.1 * k as f32 * (qf / 15.0).max(0.5);
        if t <= 0.5 || nc == MAX_CAND {
            continue;
        }
        num[nc] = t;
        nc += 1;
    }
    let range = max - min;
    let mut is = [0f32; MAX_CAND];
    for c in 0..nc {
        is[c] = num[c] / range;
    }
    let n = x.len();
    let (mut xo_buf, mut wx_buf) = ([0f32; QK], [0f32; QK]);
    let (mut xo_heap, mut wx_heap) = (Vec::new(), Vec::new());
    let (xo, wx): (&mut [f32], &mut [f32]) = if n <= QK {
        (&mut xo_buf[..n], &mut wx_buf[..n])
    } else {
        xo_heap.resize(n, 0.0);
        wx_heap.resize(n, 0.0);
        (&mut xo_heap, &mut wx_heap)
    };
    for i in 0..n {
        xo[i] = x[i] - min;
        wx[i] = w[i] * x[i];
    }
    let s = cand_sums(xo, &w[..n], wx, &is[..nc], 0, qmax);
    let (mut det, mut d2, mut m2, mut d1) = (
        [0f32; MAX_CAND],
        [0f32; MAX_CAND],
        [0f32; MAX_CAND],
        [0f32; MAX_CAND],
    );
    for c in 0..nc {
        let (swq, swqq, swxq) = (s.swq[c], s.swqq[c], s.swxq[c]);
        det[c] = sw * swqq - swq * swq;
        d2[c] = (sw * swxq - swq * swx) / det[c];
        m2[c] = (swqq * swx - swq * swxq) / det[c];
        d1[c] = swxq / swqq;
    }
    for c in 0..nc {
        let (swq, swqq, swxq) = (s.swq[c], s.swqq[c], s.swxq[c]);
        if det[c] <= 0.0 || det[c].is_nan() {
            continue;
        }
        let (mut d, mut m) = (d2[c], m2[c]);
        if nonpos_min && m > 0.0 {
            m = 0.0;
            if swqq <= 0.0 {
                continue;
            }
            d = d1[c];
        }
        if d < 0.0 {
            continue;
        }
        // Σw(x − dq − m)² expanded in the sums above (Σwx² is the same for every candidate).
        let err = d * d * swqq + m * m * sw + 2.0 * d * m * swq - 2.0 * d * swxq - 2.0 * m * swx;
        if err < best_err {
            best_err = err;
            best = (d, m);
        }
    }
    best
}

/// Weighted error of `x ≈ d·clamp(round(x/d))` over `[qmin, qmax]`, and the chosen `q`s.
#[inline(always)]
fn requant_sym(x: &[f32], w: &[f32], d: f32, qmin: i32, qmax: i32, q: &mut [i32]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0f32;
    for ((&v, &wi), o) in x.iter().zip(w).zip(q.iter_mut()) {
        *o = nearest(v * id, qmin, qmax);
        let e = v - d * *o as f32;
        err += wi * e * e;
    }
    err
}

/// Weighted error of `x ≈ d·q − m` with `q = clamp(round((x + m)/d))` over `[0, qmax]`.
#[inline(always)]
fn requant_affine(x: &[f32], w: &[f32], d: f32, m: f32, qmax: i32, q: &mut [i32]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0f32;
    for ((&v, &wi), o) in x.iter().zip(w).zip(q.iter_mut()) {
        *o = nearest((v + m) * id, 0, qmax);
        let e = v - (d * *o as f32 - m);
        err += wi * e * e;
    }
    err
}

#[inline(always)]
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

// ---------------------------------------------------------------------------------------------
// 32-element formats
// ---------------------------------------------------------------------------------------------

fn q8_0_block(x: &[f32], _w: &[f32], o: &mut [u8]) {
    // 8 bits leave almost no rounding error to optimize: amax maps to ±127.
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16_round(amax / 127.0);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    o[0..2].copy_from_slice(&f16_bytes(d));
    for (j, &v) in x.iter().enumerate() {
        o[2 + j] = nearest(v * id, -127, 127) as i8 as u8;
    }
}

/// Shared by Q4_0/Q5_0: symmetric fit over `[-half, half-1]`, stored as `q + half`.
fn sym32(x: &[f32], w: &[f32], bits: u32) -> (f32, [u8; QK]) {
    let half = 1i32 << (bits - 1);
    let d = f16_round(fit_symmetric(x, w, -half, half - 1, 6));
    let mut q = [0i32; QK];
    requant_sym(x, w, d, -half, half - 1, &mut q);
    let mut u = [0u8; QK];
    for j in 0..QK {
        u[j] = (q[j] + half) as u8;
    }
    (d, u)
}

/// Shared by Q4_1/Q5_1: affine fit over `[0, 2^bits − 1]`.
fn affine32(x: &[f32], w: &[f32], bits: u32) -> (f32, f32, [u8; QK]) {
    let qmax = (1i32 << bits) - 1;
    let (d, m) = fit_affine(x, w, qmax, false, 10);
    let (d, m) = (f16_round(d), f16_round(m));
    let mut q = [0i32; QK];
    // requant_affine uses x ≈ d·q − m'; here m' = −m.
    requant_affine(x, w, d, -m, qmax, &mut q);
    let mut u = [0u8; QK];
    for j in 0..QK {
        u[j] = q[j] as u8;
    }
    (d, m, u)
}

fn pack_nibbles(u: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = (u[j] & 0x0F) | ((u[j + QK / 2] & 0x0F) << 4);
    }
}

fn pack_high_bits(u: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in u.iter().enumerate() {
        qh |= (((v >> 4) & 1) as u32) << j;
    }
    qh.to_le_bytes()
}

fn q4_0_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let (d, u) = sym32(x, w, 4);
    o[0..2].copy_from_slice(&f16_bytes(d));
    pack_nibbles(&u, &mut o[2..18]);
}

fn q5_0_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let (d, u) = sym32(x, w, 5);
    o[0..2].copy_from_slice(&f16_bytes(d));
    o[2..6].copy_from_slice(&pack_high_bits(&u));
    pack_nibbles(&u, &mut o[6..22]);
}

fn q4_1_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let (d, m, u) = affine32(x, w, 4);
    o[0..2].copy_from_slice(&f16_bytes(d));
    o[2..4].copy_from_slice(&f16_bytes(m));
    pack_nibbles(&u, &mut o[4..20]);
}

fn q5_1_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let (d, m, u) = affine32(x, w, 5);
    o[0..2].copy_from_slice(&f16_bytes(d));
    o[2..4].copy_from_slice(&f16_bytes(m));
    o[4..8].copy_from_slice(&pack_high_bits(&u));
    pack_nibbles(&u, &mut o[8..24]);
}

// ---------------------------------------------------------------------------------------------
// K-quants (256-element super-blocks)
// ---------------------------------------------------------------------------------------------

/// Quantize non-negative sub-block values `v` to integers in `[0, nmax]` against a shared
/// scale; tries a few scales around `max/nmax` and keeps the one whose re-rounded block has the
/// least weighted error. `fill(s, ints, c, scales)` writes candidate `c`'s per-group `(d, m)`
/// into `scales` (groups of `gs` values, `N` groups, values clamped to `[0, qmax]`).
/// Returns `(scale, ints)`.
#[allow(clippy::too_many_arguments)]
fn quantize_scales<const N: usize>(
    v: &[f32; N],
    nmax: i32,
    x: &[f32],
    w: &[f32],
    gs: usize,
    qmax: i32,
    fill: impl Fn(f32, &[i32; N], usize, &mut GroupScales),
) -> (f32, [i32; N]) {
    let vmax = v.iter().copied().fold(0f32, f32::max);
    let mut best = (0f32, [0i32; N]);
    if vmax <= 0.0 {
        return best;
    }
    let mut cands = [(0f32, [0i32; N]); 6];
    let mut nc = 0;
    let mut scales = GroupScales::new();
    for k in 0..6 {
        // Slightly larger scales clip nothing; slightly smaller ones give the small
        // sub-blocks more resolution at the cost of clamping the largest.
        let t = nmax as f32 - 0.25 * k as f32;
        let s = f16_round(vmax / t);
        if s <= 0.0 {
            continue;
        }
        let mut ints = [0i32; N];
        for (o, &x) in ints.iter_mut().zip(v) {
            *o = nearest(x / s, 0, nmax);
        }
        fill(s, &ints, nc, &mut scales);
        cands[nc] = (s, ints);
        nc += 1;
    }
    let errs = group_errs(x, w, gs, N, &scales, nc, 0, qmax);
    let mut best_err = f32::INFINITY;
    for c in 0..nc {
        if errs[c] < best_err {
            best_err = errs[c];
            best = cands[c];
        }
    }
    best
}

/// Re-round a whole super-block against per-group scales and return the total weighted
/// error: `Σ_g requant_affine(x_g, w_g, dg[g], mg[g], …)` over `ng` groups of `gs` values
/// (`mg = 0` is [`requant_sym`] exactly, as for [`group_errs`]), writing the rounded values to
/// `q`. The refinement loops call this a few times per block. The AVX2 version puts one *group*
/// in each lane (their partial sums are independent), gathers the lane's values, and adds the
/// per-group errors to the total in group order, so it is bit-identical to this one.
#[allow(clippy::too_many_arguments)]
fn requant_groups_scalar(
    x: &[f32],
    w: &[f32],
    gs: usize,
    ng: usize,
    dg: &[f32; 16],
    mg: &[f32; 16],
    qmin: i32,
    qmax: i32,
    q: &mut [i32; QK_K],
) -> f32 {
    let mut total = 0f32;
    for g in 0..ng.min(16) {
        let (d, m) = (dg[g], mg[g]);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut err = 0f32;
        for i in g * gs..(g + 1) * gs {
            let v = x[i];
            q[i] = nearest((v + m) * id, qmin, qmax);
            let e = v - (d * q[i] as f32 - m);
            err += w[i] * e * e;
        }
        total += err;
    }
    total
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn requant_groups(
    x: &[f32],
    w: &[f32],
    gs: usize,
    ng: usize,
    dg: &[f32; 16],
    mg: &[f32; 16],
    qmin: i32,
    qmax: i32,
    q: &mut [i32; QK_K],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_searches()
        && ng % 8 == 0
        && ng <= 16
        && gs * ng <= QK_K
        && x.len() >= gs * ng
        && w.len() >= gs * ng
    {
        // SAFETY: AVX2 confirmed by the dispatch layer; every index below gs·ng is inside x,
        // w and q (checked just above); ng is 8 or 16.
        return unsafe { avx2::requant_groups(x, w, gs, ng, dg, mg, qmin, qmax, q) };
    }
    requant_groups_scalar(x, w, gs, ng, dg, mg, qmin, qmax, q)
}

/// Weighted error of a whole super-block against `x ≈ d·si[g]·q − dmin·mi[g]` per group of `gs`
/// values (up to 16 groups), writing the rounded values to `q` ([`requant_groups`]).
#[allow(clippy::too_many_arguments)]
fn affine_err(
    x: &[f32],
    w: &[f32],
    gs: usize,
    (d, dmin): (f32, f32),
    si: &[i32],
    mi: &[i32],
    qmax: i32,
    q: &mut [i32; QK_K],
) -> f32 {
    let ng = si.len().min(16);
    let (mut dg, mut mg) = ([0f32; 16], [0f32; 16]);
    for g in 0..ng {
        dg[g] = d * si[g] as f32;
        mg[g] = dmin * mi[g] as f32;
    }
    requant_groups(x, w, gs, ng, &dg, &mg, 0, qmax, q)
}

/// Given the integer sub-block scales/mins and values, re-solve the two f16 super-scales by
/// weighted least squares (`x ≈ d·(sc·q) − dmin·m`), re-round the values, and keep the result
/// when the weighted error drops. Two rounds. `gs` is the sub-block size.
#[allow(clippy::too_many_arguments)]
fn refine_affine(
    x: &[f32],
    w: &[f32],
    gs: usize,
    si: &[i32],
    mi: &[i32],
    qmax: i32,
    (mut d, mut dmin): (f32, f32),
    q: &mut [i32; QK_K],
) -> (f32, f32) {
    let err_of = |d: f32, dmin: f32, q: &mut [i32; QK_K]| -> f32 {
        affine_err(x, w, gs, (d, dmin), si, mi, qmax, q)
    };
    let mut best = err_of(d, dmin, q);
    for _ in 0..2 {
        let (mut a2, mut b2, mut ab, mut xa, mut xb) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for g in 0..si.len() {
            for i in g * gs..(g + 1) * gs {
                let (wi, xi) = (w[i] as f64, x[i] as f64);
                let a = (si[g] * q[i]) as f64;
                let b = mi[g] as f64;
                a2 += wi * a * a;
                b2 += wi * b * b;
                ab += wi * a * b;
                xa += wi * xi * a;
                xb += wi * xi * b;
            }
        }
        let det = a2 * b2 - ab * ab;
        let (mut nd, mut nu) = if det > 1e-12 * a2 * b2.max(1e-30) && det > 0.0 {
            ((xa * b2 - ab * xb) / det, (ab * xa - a2 * xb) / det)
        } else if a2 > 0.0 {
            (xa / a2, 0.0)
        } else {
            break;
        };
        if nu < 0.0 {
            nu = 0.0;
            nd = if a2 > 0.0 { xa / a2 } else { 0.0 };
        }
        if nd <= 0.0 {
            break;
        }
        let (nd, nu) = (f16_round(nd as f32), f16_round(nu as f32));
        let mut nq = [0i32; QK_K];
        let e = err_of(nd, nu, &mut nq);
        if e < best {
            best = e;
            d = nd;
            dmin = nu;
            *q = nq;
        } else {
            break;
        }
    }
    // `q` is rounded against the returned scales: it was set with them (first `err_of`, or
    // taken from an accepted round) and a rejected round leaves both unchanged.
    (d, dmin)
}

/// As [`refine_affine`] for the symmetric K-quants (`x ≈ d·sc·q`, 16 groups of 16).
fn refine_symmetric(
    x: &[f32],
    w: &[f32],
    si: &[i32; 16],
    qmin: i32,
    qmax: i32,
    mut d: f32,
    q: &mut [i32; QK_K],
) -> f32 {
    let err_of = |d: f32, q: &mut [i32; QK_K]| -> f32 {
        let mut dg = [0f32; 16];
        for g in 0..16 {
            dg[g] = d * si[g] as f32;
        }
        requant_groups(x, w, 16, 16, &dg, &[0f32; 16], qmin, qmax, q)
    };
    let mut best = err_of(d, q);
    for _ in 0..2 {
        let (mut a2, mut xa) = (0f64, 0f64);
        for g in 0..16 {
            for i in g * 16..g * 16 + 16 {
                let a = (si[g] * q[i]) as f64;
                a2 += w[i] as f64 * a * a;
                xa += w[i] as f64 * x[i] as f64 * a;
            }
        }
        if a2 <= 0.0 {
            break;
        }
        let nd = f16_round((xa / a2) as f32);
        let mut nq = [0i32; QK_K];
        let e = err_of(nd, &mut nq);
        if e < best {
            best = e;
            d = nd;
            *q = nq;
        } else {
            break;
        }
    }
    // `q` already holds the rounding against `d` (see `refine_affine`).
    d
}

/// Recovers the grid of a Q4_K/Q5_K super-block whose values already lie on one, as when the
/// source is a dequantized K-quant model (the only form some models are distributed in): per
/// sub-block of 32 the values are `D_j·q − M_j` with integer `q` in `[0, qmax]`, and, as ggml's
/// quantizer makes them, `D_j = d·sc_j`, `M_j = dmin·m_j` with the largest `sc` and `m` 63.
/// Tolerates the f16 rounding of the source values. `None` when the block is not such a grid
/// (then the searched scales stand; for full-precision sources that is every block).
///
/// Returns `(d, dmin, sc, m)`.
fn affine_lattice(x: &[f32], qmax: i32) -> Option<(f32, f32, [i32; 8], [i32; 8])> {
    // Relative precision of the source values (f16: 2^-11), with margin.
    const REL: f32 = 2e-3;
    let mut step = [0f32; 8];
    let mut lo = [0f32; 8];
    let mut hi = [0f32; 8];
    for j in 0..8 {
        let g = &x[j * 32..j * 32 + 32];
        let mut v = [0f32; 32];
        v.copy_from_slice(g);
        v.sort_by(f32::total_cmp);
        let (a, b) = (v[0], v[31]);
        if !a.is_finite() || !b.is_finite() {
            return None;
        }
        (lo[j], hi[j]) = (a, b);
        let tol = REL * a.abs().max(b.abs());
        if b - a <= tol {
            continue; // all equal: a step of 0 (sc = 0) represents it
        }
        // The smallest gap between distinct values is one step, or a small multiple of it
        // when the group leaves levels unused (fewer values than levels, as with Q5_K).
        let gap = v
            .windows(2)
            .map(|p| p[1] - p[0])
            .filter(|&d| d > tol)
            .fold(f32::INFINITY, f32::min);
        let fit = |st: f32| -> Option<f32> {
            let (mut num, mut den) = (0f64, 0f64);
            for &e in g {
                let r = (e - a) / st;
                let k = r.round();
                if (r - k).abs() > 0.1 || k > qmax as f32 {
                    return None;
                }
                num += (e - a) as f64 * k as f64;
                den += k as f64 * k as f64;
            }
            Some((num / den) as f32)
        };
        // The gap of two rounded values is too coarse to count 31 steps with (a 1 % error is a
        // third of a step at the top): it only estimates how many steps the range spans, and
        // the range over that count is the candidate step.
        step[j] = (1..=4).find_map(|div| {
            let k0 = ((b - a) / (gap / div as f32)).round();
            [k0, k0 - 1.0, k0 + 1.0]
                .into_iter()
                .filter(|&k| k >= 1.0 && k <= qmax as f32)
                .find_map(|k| fit((b - a) / k))
        })?;
    }
    let smax = step.iter().copied().fold(0f32, f32::max);
    if smax <= 0.0 {
        return None;
    }
    let d = f16_round(smax / 63.0);
    if d <= 0.0 {
        return None;
    }
    // How far from an integer a ratio `r` of two estimates may be: each carries the ~2^-11
    // relative rounding of the source values (and of one f16 super-scale).
    let near = |r: f32| 0.05 + 4e-3 * r.abs();
    let mut sc = [0i32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        let r = step[j] / d;
        let k = r.round();
        if (r - k).abs() > near(r) || !(0.0..=63.0).contains(&k) {
            return None;
        }
        sc[j] = k as i32;
        // The smallest non-negative M_j that puts the group's minimum on an integer q.
        let dj = d * sc[j] as f32;
        mins[j] = if dj > 0.0 && lo[j] > 0.0 {
            dj * (lo[j] / dj - 0.1).ceil() - lo[j]
        } else {
            -lo[j].min(0.0)
        };
        mins[j] = mins[j].max(0.0);
    }
    let mmax = mins.iter().copied().fold(0f32, f32::max);
    let dmin = f16_round(mmax / 63.0);
    let mut m = [0i32; 8];
    if dmin > 0.0 {
        for j in 0..8 {
            // The group's minimum need not sit on q = 0: if the smallest M_j is not a multiple
            // of dmin, try the next levels the group's range leaves room for.
            let dj = d * sc[j] as f32;
            let free = if dj > 0.0 {
                (qmax as f32 - ((hi[j] - lo[j]) / dj).round()).max(0.0) as i32
            } else {
                0
            };
            // Of the levels that give an integer m, the one nearest to an integer.
            let mut pick: Option<(f32, i32)> = None;
            for extra in 0..=free {
                let r = (mins[j] + dj * extra as f32) / dmin;
                let k = r.round();
                let off = (r - k).abs();
                if off <= near(r) && (0.0..=63.0).contains(&k) && pick.is_none_or(|p| off < p.0) {
                    pick = Some((off, k as i32));
                }
            }
            m[j] = pick?.1;
        }
    } else if mmax > 0.0 {
        return None;
    }
    Some((d, dmin, sc, m))
}

/// `v` (an f16 value) and the f16 values next to it (only `v` for 0).
fn f16_neighbours(v: f32) -> impl Iterator<Item = f32> {
    let b = f16::from_f32(v).to_bits();
    let n: &[i32] = if v == 0.0 { &[0] } else { &[0, -1, 1] };
    n.iter()
        .map(move |&k| f16::from_bits(b.wrapping_add_signed(k as i16)).to_f32())
        .filter(|c| c.is_finite() && *c >= 0.0)
}

/// Q4_K / Q5_K: 8 sub-blocks of 32, `x = d·sc·q − dmin·m`, 6-bit `sc`/`m`.
fn kq45_block(x: &[f32], w: &[f32], o: &mut [u8], five: bool) {
    let qmax = if five { 31 } else { 15 };
    let mut sc = [0f32; 8];
    let mut mn = [0f32; 8];
    for j in 0..8 {
        let (d, m) = fit_affine(
            &x[j * 32..j * 32 + 32],
            &w[j * 32..j * 32 + 32],
            qmax,
            true,
            10,
        );
        sc[j] = d;
        mn[j] = -m;
    }
    let mut q = [0i32; QK_K];
    // Mins first (with the exact scales), then scales given the quantized mins.
    let (dmin, mi) = quantize_scales(&mn, 63, x, w, 32, qmax, |s, ints, c, gsc| {
        for j in 0..8 {
            gsc.d[j][c] = sc[j];
            gsc.m[j][c] = s * ints[j] as f32;
        }
    });
    let (d, si) = quantize_scales(&sc, 63, x, w, 32, qmax, |s, ints, c, gsc| {
        for j in 0..8 {
            gsc.d[j][c] = s * ints[j] as f32;
            gsc.m[j][c] = dmin * mi[j] as f32;
        }
    });
    let (mut d, mut dmin) = refine_affine(x, w, 32, &si, &mi, qmax, (d, dmin), &mut q);
    let (mut si, mut mi) = (si, mi);
    if let Some((ld, ldmin, lsi, lmi)) = affine_lattice(x, qmax) {
        // The block is (up to the f16 rounding of a dequantized source) a grid of this format:
        // keep whichever has the smaller weighted error (normally the recovered grid).
        let err = |d: f32, dmin: f32, si: &[i32; 8], mi: &[i32; 8], q: &mut [i32; QK_K]| {
            affine_err(x, w, 32, (d, dmin), si, mi, qmax, q)
        };
        // The super-scales are estimated from rounded values: the source's may be the f16
        // next to them, so the neighbours are tried too.
        let mut best = err(d, dmin, &si, &mi, &mut q);
        let mut lq = [0i32; QK_K];
        for cd in f16_neighbours(ld) {
            for cm in f16_neighbours(ldmin) {
                let e = err(cd, cm, &lsi, &lmi, &mut lq);
                if e < best {
                    best = e;
                    (d, dmin, si, mi, q) = (cd, cm, lsi, lmi, lq);
                }
            }
        }
    }
    let mut scales = [0u8; 12];
    for j in 0..8 {
        let (s, m) = (si[j] as u8, mi[j] as u8);
        if j < 4 {
            scales[j] |= s & 63;
            scales[j + 4] |= m & 63;
        } else {
            scales[j + 4] = (s & 0x0F) | ((m & 0x0F) << 4);
            scales[j - 4] |= (s >> 4) << 6;
            scales[j] |= (m >> 4) << 6;
        }
    }
    o[0..2].copy_from_slice(&f16_bytes(d));
    o[2..4].copy_from_slice(&f16_bytes(dmin));
    o[4..16].copy_from_slice(&scales);
    let qs_off = if five { 16 + 32 } else { 16 };
    if five {
        let qh = &mut o[16..48];
        qh.fill(0);
        for (l, &v) in q.iter().enumerate() {
            qh[l % 32] |= (((v >> 4) & 1) as u8) << (l / 32);
        }
    }
    let qs = &mut o[qs_off..qs_off + 128];
    for c in 0..4 {
        for l in 0..32 {
            qs[c * 32 + l] = ((q[c * 64 + l] & 15) | ((q[c * 64 + 32 + l] & 15) << 4)) as u8;
        }
    }
}

/// Q2_K: 16 groups of 16, `x = d·(sc&15)·q − dmin·(sc>>4)`, `q` 2 bits.
fn q2_k_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let mut sc = [0f32; 16];
    let mut mn = [0f32; 16];
    for g in 0..16 {
        let (d, m) = fit_affine(
            &x[g * 16..g * 16 + 16],
            &w[g * 16..g * 16 + 16],
            3,
            true,
            15,
        );
        sc[g] = d;
        mn[g] = -m;
    }
    let mut q = [0i32; QK_K];
    let (dmin, mi) = quantize_scales(&mn, 15, x, w, 16, 3, |s, ints, c, gsc| {
        for g in 0..16 {
            gsc.d[g][c] = sc[g];
            gsc.m[g][c] = s * ints[g] as f32;
        }
    });
    let (d, si) = quantize_scales(&sc, 15, x, w, 16, 3, |s, ints, c, gsc| {
        for g in 0..16 {
            gsc.d[g][c] = s * ints[g] as f32;
            gsc.m[g][c] = dmin * mi[g] as f32;
        }
    });
    let (d, dmin) = refine_affine(x, w, 16, &si, &mi, 3, (d, dmin), &mut q);
    for g in 0..16 {
        o[g] = (si[g] as u8 & 0x0F) | ((mi[g] as u8 & 0x0F) << 4);
    }
    let qs = &mut o[16..80];
    qs.fill(0);
    for half in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                qs[half * 32 + l] |= ((q[half * 128 + j * 32 + l] & 3) as u8) << (2 * j);
            }
        }
    }
    o[80..82].copy_from_slice(&f16_bytes(d));
    o[82..84].copy_from_slice(&f16_bytes(dmin));
}

/// Signed sub-block scales quantized to integers in `[-lim, lim-1]` (Q3_K: 6-bit, Q6_K: 8-bit)
/// against one f16 super-scale; candidates chosen by the total weighted error after
/// re-rounding the values with `qmin..=qmax`.
fn signed_scales(
    x: &[f32],
    w: &[f32],
    sc: &[f32; 16],
    lim: i32,
    qmin: i32,
    qmax: i32,
) -> (f32, [i32; 16]) {
    let mut amax = 0f32;
    let mut maxv = 0f32;
    for &s in sc {
        if s.abs() > amax {
            amax = s.abs();
            maxv = s;
        }
    }
    let mut best = (0f32, [0i32; 16]);
    if amax == 0.0 {
        return best;
    }
    let mut cands = [(0f32, [0i32; 16]); 5];
    let mut nc = 0;
    let mut scales = GroupScales::new();
    // The largest-magnitude scale maps to −lim (the end with more room), or to about +lim.
    for t in [
        -(lim as f32),
        -(lim as f32) + 0.5,
        -(lim as f32) + 1.0,
        (lim - 1) as f32,
        lim as f32 - 1.5,
    ] {
        let s = f16_round(maxv / t);
        if s == 0.0 || !s.is_finite() {
            continue;
        }
        let mut ints = [0i32; 16];
        for g in 0..16 {
            ints[g] = nearest(sc[g] / s, -lim, lim - 1);
            scales.d[g][nc] = s * ints[g] as f32;
        }
        cands[nc] = (s, ints);
        nc += 1;
    }
    let errs = group_errs(x, w, 16, 16, &scales, nc, qmin, qmax);
    let mut best_err = f32::INFINITY;
    for c in 0..nc {
        if errs[c] < best_err {
            best_err = errs[c];
            best = cands[c];
        }
    }
    best
}

/// Q3_K: 16 groups of 16, `x = d·sc·q`, `sc ∈ [-32, 31]`, `q ∈ [-4, 3]`.
fn q3_k_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let mut sc = [0f32; 16];
    for g in 0..16 {
        sc[g] = fit_symmetric(&x[g * 16..g * 16 + 16], &w[g * 16..g * 16 + 16], -4, 3, 8);
    }
    let (d, si) = signed_scales(x, w, &sc, 32, -4, 3);
    let mut q = [0i32; QK_K];
    let d = refine_symmetric(x, w, &si, -4, 3, d, &mut q);
    let mut scales = [0u8; 12];
    for i in 0..16 {
        let s6 = (si[i] + 32) as u8;
        scales[i % 8] |= (s6 & 0x0F) << (4 * (i / 8));
        scales[8 + i % 4] |= (s6 >> 4) << (2 * (i / 4));
    }
    let (hmask, rest) = o.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    hmask.fill(0);
    qs.fill(0);
    for half in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                let u = (q[half * 128 + j * 32 + l] + 4) as u8;
                qs[half * 32 + l] |= (u & 3) << (2 * j);
                if u >= 4 {
                    hmask[l] |= 1 << (half * 4 + j);
                }
            }
        }
    }
    rest[0..12].copy_from_slice(&scales);
    rest[12..14].copy_from_slice(&f16_bytes(d));
}

/// Q6_K: 16 groups of 16, `x = d·sc·q`, `sc` a signed byte, `q ∈ [-32, 31]`.
fn q6_k_block(x: &[f32], w: &[f32], o: &mut [u8]) {
    let mut sc = [0f32; 16];
    for g in 0..16 {
        sc[g] = fit_symmetric(&x[g * 16..g * 16 + 16], &w[g * 16..g * 16 + 16], -32, 31, 4);
    }
    let (d, si) = signed_scales(x, w, &sc, 128, -32, 31);
    let mut q = [0i32; QK_K];
    let d = refine_symmetric(x, w, &si, -32, 31, d, &mut q);
    let (ql, rest) = o.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for half in 0..2 {
        let ql = &mut ql[half * 64..half * 64 + 64];
        let qh = &mut qh[half * 32..half * 32 + 32];
        let u = |i: usize| (q[half * 128 + i] + 32) as u8;
        for l in 0..32 {
            let (a, b, c, e) = (u(l), u(l + 32), u(l + 64), u(l + 96));
            ql[l] = (a & 0x0F) | ((c & 0x0F) << 4);
            ql[l + 32] = (b & 0x0F) | ((e & 0x0F) << 4);
            qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    for g in 0..16 {
        rest[g] = si[g] as i8 as u8;
    }
    rest[16..18].copy_from_slice(&f16_bytes(d));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize_row;
    use crate::testutil::Rng;

    fn roundtrip(ty: GgmlType, x: &[f32], im: Option<&[f32]>) -> Vec<f32> {
        let mut buf = vec![0u8; row_bytes(ty, x.len()).unwrap()];
        quantize_row(ty, x, &mut buf, im).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &buf, &mut y).unwrap();
        y
    }

    fn rel_rms(x: &[f32], y: &[f32]) -> f32 {
        let e: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
        let s: f32 = x.iter().map(|a| a * a).sum();
        (e / s).sqrt()
    }

    fn gaussian(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = rng.unit().max(1e-7);
                let u2 = rng.unit();
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// Relative RMS error bounds on Gaussian data (about the ratio of the quantization step
    /// to the spread for each bit width, with headroom).
    fn bound(ty: GgmlType) -> f32 {
        use GgmlType as T;
        match ty {
            T::F32 => 1e-7,
            T::F16 => 1e-3,
            T::BF16 => 5e-3,
            T::Q8_0 => 0.01,
            T::Q6_K => 0.03,
            T::Q5_0 | T::Q5_1 | T::Q5_K => 0.06,
            T::Q4_0 | T::Q4_1 | T::Q4_K => 0.12,
            T::Q3_K => 0.25,
            T::Q2_K => 0.45,
            _ => unreachable!(),
        }
    }

    #[test]
    fn gaussian_error_within_bounds() {
        let mut rng = Rng::new(7);
        let x = gaussian(&mut rng, 4096);
        for &ty in QUANTIZE_TYPES {
            let y = roundtrip(ty, &x, None);
            let e = rel_rms(&x, &y);
            eprintln!("{ty}: rel rms {e:.4}");
            assert!(e < bound(ty), "{ty}: {e}");
        }
    }

    #[test]
    fn uniform_and_heavy_tailed() {
        let mut rng = Rng::new(11);
        let uni = rng.f32s(2048, 0.05);
        // Student-t-like: Gaussian / sqrt(uniform) gives occasional large outliers.
        let g = gaussian(&mut rng, 2048);
        let heavy: Vec<f32> = g
            .iter()
            .map(|v| v * 0.02 / rng.unit().max(0.05).sqrt())
            .collect();
        for &ty in QUANTIZE_TYPES {
            for (name, x) in [("uniform", &uni), ("heavy", &heavy)] {
                let e = rel_rms(x, &roundtrip(ty, x, None));
                eprintln!("{ty} {name}: {e:.4}");
                assert!(e < bound(ty) * 1.6, "{ty} {name}: {e}");
            }
        }
    }

    /// Our quantizers should beat the naive min/max (round-to-nearest) choice of scales.
    #[test]
    fn better_than_naive_q4_0() {
        let mut rng = Rng::new(3);
        let x = gaussian(&mut rng, 4096);
        let y = roundtrip(GgmlType::Q4_0, &x, None);
        let mut naive = vec![0f32; x.len()];
        for (b, o) in x.chunks(32).zip(naive.chunks_mut(32)) {
            let mut maxv = 0f32;
            for &v in b {
                if v.abs() > maxv.abs() {
                    maxv = v;
                }
            }
            let d = f16_round(maxv / -8.0);
            for (i, &v) in b.iter().enumerate() {
                o[i] = d * nearest(v / d, -8, 7) as f32;
            }
        }
        let (e, en) = (rel_rms(&x, &y), rel_rms(&x, &naive));
        assert!(e < en * 0.97, "ours {e} naive {en}");
    }

    #[test]
    fn requantizing_dequantized_data_is_stable() {
        let mut rng = Rng::new(5);
        let x = gaussian(&mut rng, 1024);
        for &ty in QUANTIZE_TYPES {
            let y1 = roundtrip(ty, &x, None);
            let y2 = roundtrip(ty, &y1, None);
            // Values already on a grid should move much less than the original error.
            let e1 = rel_rms(&x, &y1);
            let e12 = rel_rms(&y1, &y2);
            assert!(e12 <= e1 * 0.6 + 1e-6, "{ty}: first {e1}, second {e12}");
        }
    }

    #[test]
    fn imatrix_reduces_error_where_important() {
        let mut rng = Rng::new(9);
        let x = gaussian(&mut rng, 4096);
        // Every 8th column is 100× as important.
        let im: Vec<f32> = (0..x.len())
            .map(|i| if i % 8 == 0 { 100.0 } else { 1.0 })
            .collect();
        for ty in [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q4_0,
            GgmlType::Q6_K,
        ] {
            let y0 = roundtrip(ty, &x, None);
            let y1 = roundtrip(ty, &x, Some(&im));
            let werr = |y: &[f32]| -> f32 {
                x.iter()
                    .zip(y)
                    .zip(&im)
                    .map(|((a, b), w)| w * (a - b) * (a - b))
                    .sum()
            };
            let (e0, e1) = (werr(&y0), werr(&y1));
            eprintln!("{ty}: weighted err {e0:.3} -> {e1:.3}");
            assert!(e1 < e0 * 0.95, "{ty}: {e0} -> {e1}");
        }
    }

    #[test]
    fn odd_values() {
        for &ty in QUANTIZE_TYPES {
            let n = 512;
            for x in [
                vec![0f32; n],
                vec![0.75f32; n],
                vec![-3.0f32; n],
                (0..n)
                    .map(|i| if i % 2 == 0 { 1e-30 } else { -1e-30 })
                    .collect(),
            ] {
                let y = roundtrip(ty, &x, None);
                assert!(y.iter().all(|v| v.is_finite()), "{ty}");
                let e = rel_rms(&x, &y);
                let s: f32 = x.iter().map(|a| a.abs()).sum();
                assert!(
                    s == 0.0 || e < 0.05 || x[0].abs() < 1e-20,
                    "{ty}: {e} on {}",
                    x[0]
                );
                if s == 0.0 {
                    assert!(y.iter().all(|&v| v == 0.0), "{ty}");
                }
            }
            // Large values up to the f16 limit quantize like any others.
            let big: Vec<f32> = (0..n).map(|i| (i as f32 - 256.0) * 255.0).collect();
            let y = roundtrip(ty, &big, None);
            assert!(y.iter().all(|v| v.is_finite()), "{ty}");
            assert!(
                rel_rms(&big, &y) < bound(ty) * 1.6,
                "{ty}: {}",
                rel_rms(&big, &y)
            );
            // Beyond it: an error for every format with f16 values or scales.
            let mut huge = vec![0.5f32; n];
            huge[3] = -1e30;
            let mut buf = vec![0u8; row_bytes(ty, n).unwrap()];
            let r = quantize_row(ty, &huge, &mut buf, None);
            if ty == GgmlType::F32 || ty == GgmlType::BF16 {
                assert!(r.is_ok(), "{ty}");
            } else {
                assert!(
                    matches!(r, Err(KernelError::TooLarge { index: 3, .. })),
                    "{ty}: {r:?}"
                );
            }
            // NaN and infinity are rejected.
            let mut bad = vec![0.5f32; n];
            bad[17] = f32::NAN;
            let mut buf = vec![0u8; row_bytes(ty, n).unwrap()];
            assert_eq!(
                quantize_row(ty, &bad, &mut buf, None),
                Err(KernelError::NonFinite { index: 17 })
            );
            bad[17] = f32::INFINITY;
            assert!(quantize_row(ty, &bad, &mut buf, None).is_err());
        }
    }

    #[test]
    fn size_and_type_errors() {
        let x = vec![0f32; 100];
        let mut buf = vec![0u8; 1000];
        assert!(matches!(
            quantize_row(GgmlType::Q4_K, &x, &mut buf, None),
            Err(KernelError::NotBlockMultiple { .. })
        ));
        let x = vec![0f32; 256];
        assert!(matches!(
            quantize_row(GgmlType::Q4_K, &x, &mut buf, None),
            Err(KernelError::Length { .. })
        ));
        assert!(matches!(
            quantize_row(GgmlType::Q8_K, &x, &mut buf, None),
            Err(KernelError::UnsupportedType(_))
        ));
        let mut buf = vec![0u8; 144];
        assert!(quantize_row(GgmlType::Q4_K, &x, &mut buf, Some(&[1.0; 10])).is_err());
    }

    #[test]
    fn dequantized_k_quant_grids_are_recovered() {
        // Q4_K/Q5_K blocks made as ggml's quantizer makes them (largest sub-scale and sub-min
        // 63), dequantized and rounded to f16 as a dequantized-to-F16 model stores them, must
        // come back as the same blocks: requantizing an already-quantized model loses nothing.
        let mut rng = Rng::new(21);
        for (ty, bits, bytes) in [(GgmlType::Q4_K, 4u32, 144usize), (GgmlType::Q5_K, 5, 176)] {
            let qmax = (1u64 << bits) - 1;
            let (mut same, mut lossless, n) = (0, 0, 64);
            for _ in 0..n {
                let mut sc = [0u8; 8];
                let mut mn = [0u8; 8];
                for j in 0..8 {
                    sc[j] = 20 + (rng.next_u64() % 44) as u8;
                    mn[j] = (rng.next_u64() % 64) as u8;
                }
                sc[(rng.next_u64() % 8) as usize] = 63;
                let top = (rng.next_u64() % 8) as usize;
                mn[top] = 63;
                let d = f16::from_f32(1e-4 * (1.0 + (rng.next_u64() % 100) as f32 / 50.0));
                let dmin = f16::from_f32(1e-3 * (1.0 + (rng.next_u64() % 100) as f32 / 50.0));
                let mut blk = vec![0u8; bytes];
                blk[0..2].copy_from_slice(&d.to_le_bytes());
                blk[2..4].copy_from_slice(&dmin.to_le_bytes());
                for j in 0..8 {
                    let (s, m) = (sc[j], mn[j]);
                    if j < 4 {
                        blk[4 + j] |= s & 63;
                        blk[8 + j] |= m & 63;
                    } else {
                        blk[8 + j] = (s & 0x0F) | ((m & 0x0F) << 4);
                        blk[j] |= (s >> 4) << 6;
                        blk[4 + j] |= (m >> 4) << 6;
                    }
                }
                // Other groups' smallest values may sit above q = 0; the group with the largest
                // min has one on q = 0 (as ggml's quantizer leaves it: that min is the group's).
                let mut q: Vec<u8> = (0..256)
                    .map(|_| (rng.next_u64() % (qmax + 1)) as u8)
                    .collect();
                q[top * 32 + (rng.next_u64() % 32) as usize] = 0;
                let qs_off = if bits == 5 { 48 } else { 16 };
                if bits == 5 {
                    for (l, &v) in q.iter().enumerate() {
                        blk[16 + l % 32] |= ((v >> 4) & 1) << (l / 32);
                    }
                }
                for c in 0..4 {
                    for l in 0..32 {
                        blk[qs_off + c * 32 + l] =
                            (q[c * 64 + l] & 15) | ((q[c * 64 + 32 + l] & 15) << 4);
                    }
                }
                let mut x = vec![0f32; 256];
                dequantize_row(ty, &blk, &mut x).unwrap();
                for v in &mut x {
                    *v = f16_round(*v);
                }
                let mut out = vec![0u8; bytes];
                quantize_row(ty, &x, &mut out, None).unwrap();
                // The same grid: the same bytes, or (when a group's minimum sits above q = 0)
                // an encoding of the same values, as close to the source as the original.
                let mut y = vec![0f32; 256];
                let mut z = vec![0f32; 256];
                dequantize_row(ty, &out, &mut y).unwrap();
                dequantize_row(ty, &blk, &mut z).unwrap();
                let maxerr =
                    |v: &[f32]| x.iter().zip(v).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                if out == blk {
                    same += 1;
                    lossless += 1;
                } else if maxerr(&y) <= maxerr(&z) + 1e-6 * amax {
                    lossless += 1;
                }
            }
            assert!(same >= n / 3, "{ty}: {same} of {n} blocks byte-identical");
            assert!(
                lossless >= n * 9 / 10,
                "{ty}: {lossless} of {n} blocks recovered"
            );
        }
    }

    /// Values exactly on a format's grid come back exactly (checks the bit packing).
    #[test]
    fn exact_grid_roundtrips() {
        let mut rng = Rng::new(1);
        // Q8_0: integers with amax 127 in each block.
        let mut x: Vec<f32> = (0..256)
            .map(|_| (rng.next_u64() % 255) as f32 - 127.0)
            .collect();
        for b in x.chunks_mut(32) {
            b[0] = 127.0;
        }
        assert_eq!(roundtrip(GgmlType::Q8_0, &x, None), x);
        // Q4_0: integers in -8..=7 with a -8 in each block.
        let mut x: Vec<f32> = (0..256)
            .map(|_| (rng.next_u64() % 16) as f32 - 8.0)
            .collect();
        for b in x.chunks_mut(32) {
            b[3] = -8.0;
        }
        assert_eq!(roundtrip(GgmlType::Q4_0, &x, None), x);
        let mut x: Vec<f32> = (0..256)
            .map(|_| (rng.next_u64() % 32) as f32 - 16.0)
            .collect();
        for b in x.chunks_mut(32) {
            b[5] = -16.0;
        }
        assert_eq!(roundtrip(GgmlType::Q5_0, &x, None), x);
        // Q6_K: integers in -32..=31 with a -32 in each group of 16 (all scales equal).
        let mut x: Vec<f32> = (0..256)
            .map(|_| (rng.next_u64() % 64) as f32 - 32.0)
            .collect();
        for b in x.chunks_mut(16) {
            b[1] = -32.0;
        }
        assert_eq!(roundtrip(GgmlType::Q6_K, &x, None), x);
        // Q3_K: integers in -4..=3 with a -4 in each group.
        let mut x: Vec<f32> = (0..256)
            .map(|_| (rng.next_u64() % 8) as f32 - 4.0)
            .collect();
        for b in x.chunks_mut(16) {
            b[2] = -4.0;
        }
        assert_eq!(roundtrip(GgmlType::Q3_K, &x, None), x);
        // Q4_K / Q5_K / Q2_K: non-negative integers with a 0 and the max in each group.
        for (ty, top, g) in [
            (GgmlType::Q4_K, 15u64, 32),
            (GgmlType::Q5_K, 31, 32),
            (GgmlType::Q2_K, 3, 16),
            (GgmlType::Q4_1, 15, 32),
            (GgmlType::Q5_1, 31, 32),
        ] {
            let mut x: Vec<f32> = (0..256)
                .map(|_| (rng.next_u64() % (top + 1)) as f32)
                .collect();
            for b in x.chunks_mut(g) {
                b[0] = 0.0;
                b[1] = top as f32;
            }
            let y = roundtrip(ty, &x, None);
            // The K-quants' scales are products of two rounded numbers: near-exact only.
            let tol = if ty.block_size() == 256 { 0.02 } else { 0.0 };
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= tol, "{ty}: {err}");
        }
    }
}

#[cfg(test)]
mod simd_agreement {
    use super::*;
    use crate::testutil::Rng;

    /// Whole rows of every quantized type, with and without an importance matrix: the AVX2
    /// scale searches give the same bytes as the scalar reference.
    #[test]
    fn quantize_row_avx2_matches_scalar_bytes() {
        let mut rng = Rng::new(5);
        for trial in 0..6 {
            let n = 1024;
            let x: Vec<f32> = match trial % 3 {
                0 => rng.f32s(n, 1.0),
                1 => rng.f32s(n, 1.0).iter().map(|v| v * v * v * 0.1).collect(),
                _ => (0..n)
                    .map(|i| if i % 5 == 0 { 0.0 } else { rng.sym(0.02) })
                    .collect(),
            };
            let im: Vec<f32> = rng.f32s(n, 1.0).iter().map(|v| v * v).collect();
            for &ty in QUANTIZE_TYPES {
                for imx in [None, Some(im.as_slice())] {
                    let mut a = vec![0u8; row_bytes(ty, n).unwrap()];
                    let mut b = a.clone();
                    quantize_row(ty, &x, &mut a, imx).unwrap();
                    FORCE_SCALAR.with(|f| f.set(true));
                    quantize_row(ty, &x, &mut b, imx).unwrap();
                    FORCE_SCALAR.with(|f| f.set(false));
                    assert!(a == b, "{ty} trial {trial} imatrix {}", imx.is_some());
                }
            }
        }
    }

    /// The symmetric search as it was before the candidate batching and the sign-symmetry
    /// skip (kept here verbatim as the reference the optimized search must reproduce).
    fn fit_symmetric_reference(x: &[f32], w: &[f32], qmin: i32, qmax: i32, nstep: i32) -> f32 {
        let (mut amax, mut maxv) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                maxv = v;
            }
        }
        if amax == 0.0 {
            return 0.0;
        }
        let lmax = (-qmin).max(qmax) as f32;
        let mut best_d = -maxv / qmin as f32;
        let mut best_err = f32::INFINITY;
        for sign in [-1f32, 1.0] {
            for k in -nstep..=nstep {
                let t = lmax + 0.1 * k as f32 * (lmax / 8.0).max(0.5);
                if t <= 0.5 {
                    continue;
                }
                let iscale = sign * t / maxv;
                let (mut sxq, mut sqq) = (0f32, 0f32);
                for (&v, &wi) in x.iter().zip(w) {
                    let q = nearest(v * iscale, qmin, qmax) as f32;
                    sxq += wi * v * q;
                    sqq += wi * q * q;
                }
                if sqq <= 0.0 {
                    continue;
                }
                let d = sxq / sqq;
                let err = -sxq * d;
                if err < best_err {
                    best_err = err;
                    best_d = d;
                }
            }
        }
        best_d
    }

    /// `fit_symmetric` (batched, AVX2 or scalar, with the skip) returns exactly what the
    /// original search returned, for every format's range and step count.
    #[test]
    fn fit_symmetric_matches_the_original_search() {
        let mut rng = Rng::new(21);
        let cases = [(-8, 7, 6), (-16, 15, 6), (-4, 3, 8), (-32, 31, 4)];
        for trial in 0..20000 {
            let n = [16, 32][trial % 2];
            let mut x: Vec<f32> = match trial % 4 {
                0 => rng.f32s(n, 1.0),
                1 => rng.f32s(n, 1.0).iter().map(|v| v * v * v).collect(),
                2 => (0..n)
                    .map(|i| if i % 3 == 0 { rng.sym(1.0) } else { 0.0 })
                    .collect(),
                _ => (0..n).map(|i| (i as f32 - 7.0) * 0.125).collect(),
            };
            if trial % 9 == 0 {
                x[3] = -x.iter().fold(0f32, |m, v| m.max(v.abs()));
            }
            let w: Vec<f32> = rng.f32s(n, 1.0).iter().map(|v| v.abs() + 0.05).collect();
            let (qmin, qmax, nstep) = cases[trial % cases.len()];
            for force in [false, true] {
                FORCE_SCALAR.with(|f| f.set(force));
                let got = fit_symmetric(&x, &w, qmin, qmax, nstep);
                FORCE_SCALAR.with(|f| f.set(false));
                let want = fit_symmetric_reference(&x, &w, qmin, qmax, nstep);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "trial {trial} scalar {force}"
                );
            }
        }
    }

    /// The affine search as it was before the candidate batching (verbatim reference).
    fn fit_affine_reference(
        x: &[f32],
        w: &[f32],
        qmax: i32,
        nonpos_min: bool,
        nstep: i32,
    ) -> (f32, f32) {
        let mut min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if nonpos_min {
            min = min.min(0.0);
        }
        if max <= min {
            return (0.0, min);
        }
        let (sw, swx) = x
            .iter()
            .zip(w)
            .fold((0f32, 0f32), |(a, b), (&v, &wi)| (a + wi, b + wi * v));
        let mut best = ((max - min) / qmax as f32, min);
        let mut best_err = f32::INFINITY;
        let qf = qmax as f32;
        for k in -nstep..=nstep {
            let t = qf + 0.1 * k as f32 * (qf / 15.0).max(0.5);
            if t <= 0.5 {
                continue;
            }
            let iscale = t / (max - min);
            let (mut swq, mut swqq, mut swxq) = (0f32, 0f32, 0f32);
            for (&v, &wi) in x.iter().zip(w) {
                let q = nearest((v - min) * iscale, 0, qmax) as f32;
                swq += wi * q;
                swqq += wi * q * q;
                swxq += wi * v * q;
            }
            let det = sw * swqq - swq * swq;
            let (mut d, mut m) = if det > 0.0 {
                (
                    (sw * swxq - swq * swx) / det,
                    (swqq * swx - swq * swxq) / det,
                )
            } else {
                continue;
            };
            if nonpos_min && m > 0.0 {
                m = 0.0;
                if swqq <= 0.0 {
                    continue;
                }
                d = swxq / swqq;
            }
            if d < 0.0 {
                continue;
            }
            let err =
                d * d * swqq + m * m * sw + 2.0 * d * m * swq - 2.0 * d * swxq - 2.0 * m * swx;
            if err < best_err {
                best_err = err;
                best = (d, m);
            }
        }
        best
    }

    #[test]
    fn fit_affine_matches_the_original_search() {
        let mut rng = Rng::new(23);
        let cases = [
            (15, true, 10),
            (31, true, 10),
            (3, true, 15),
            (15, false, 10),
            (31, false, 10),
        ];
        for trial in 0..20000 {
            let n = [16, 32][trial % 2];
            let x: Vec<f32> = match trial % 4 {
                0 => rng.f32s(n, 1.0),
                1 => rng.f32s(n, 1.0).iter().map(|v| v * v * v + 0.3).collect(),
                2 => (0..n)
                    .map(|i| if i % 3 == 0 { rng.sym(1.0) } else { 0.0 })
                    .collect(),
                _ => (0..n).map(|i| (i as f32) * 0.125 - 0.5).collect(),
            };
            let w: Vec<f32> = rng.f32s(n, 1.0).iter().map(|v| v.abs() + 0.05).collect();
            let (qmax, nonpos, nstep) = cases[trial % cases.len()];
            for force in [false, true] {
                FORCE_SCALAR.with(|f| f.set(force));
                let got = fit_affine(&x, &w, qmax, nonpos, nstep);
                FORCE_SCALAR.with(|f| f.set(false));
                let want = fit_affine_reference(&x, &w, qmax, nonpos, nstep);
                assert_eq!(
                    (got.0.to_bits(), got.1.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "trial {trial} scalar {force}"
                );
            }
        }
    }

    /// The group-per-lane re-rounding gives the scalar's error and values bit for bit, and the
    /// scalar one equals the per-group `requant_affine` / `requant_sym` it replaced.
    #[test]
    fn requant_groups_matches_per_group_requant() {
        let mut rng = Rng::new(31);
        for trial in 0..3000 {
            let (gs, ng) = [(32, 8), (16, 16)][trial % 2];
            let x = rng.f32s(gs * ng, 1.0);
            let w: Vec<f32> = rng.f32s(gs * ng, 1.0).iter().map(|v| v.abs()).collect();
            let sym = trial % 3 == 0;
            let (qmin, qmax) = if sym {
                [(-4, 3), (-32, 31)][trial % 2]
            } else {
                (0, [15, 31, 3][trial % 3])
            };
            let (mut dg, mut mg) = ([0f32; 16], [0f32; 16]);
            for g in 0..ng {
                dg[g] = if (g + trial) % 13 == 0 {
                    0.0
                } else {
                    rng.sym(0.3)
                };
                mg[g] = if sym { 0.0 } else { rng.unit() * 0.4 };
            }
            let mut want_q = [0i32; QK_K];
            let mut want = 0f32;
            for g in 0..ng {
                let r = g * gs..(g + 1) * gs;
                want += if sym {
                    requant_sym(
                        &x[r.clone()],
                        &w[r.clone()],
                        dg[g],
                        qmin,
                        qmax,
                        &mut want_q[r],
                    )
                } else {
                    requant_affine(
                        &x[r.clone()],
                        &w[r.clone()],
                        dg[g],
                        mg[g],
                        qmax,
                        &mut want_q[r],
                    )
                };
            }
            let mut q1 = [0i32; QK_K];
            let e1 = requant_groups_scalar(&x, &w, gs, ng, &dg, &mg, qmin, qmax, &mut q1);
            assert_eq!(e1.to_bits(), want.to_bits(), "scalar, trial {trial}");
            assert_eq!(q1[..gs * ng], want_q[..gs * ng], "scalar q, trial {trial}");
            let mut q2 = [0i32; QK_K];
            let e2 = requant_groups(&x, &w, gs, ng, &dg, &mg, qmin, qmax, &mut q2);
            assert_eq!(e2.to_bits(), want.to_bits(), "dispatched, trial {trial}");
            assert_eq!(
                q2[..gs * ng],
                want_q[..gs * ng],
                "dispatched q, trial {trial}"
            );
        }
    }

    /// The batched re-rounding errors agree with the scalar reference bit for bit.
    #[test]
    fn group_errs_avx2_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::x86::available() {
                return;
            }
            let mut rng = Rng::new(12);
            for trial in 0..2000 {
                let (gs, ng) = [(16, 16), (32, 8)][trial % 2];
                let x = rng.f32s(gs * ng, 1.0);
                let w: Vec<f32> = rng.f32s(gs * ng, 1.0).iter().map(|v| v.abs()).collect();
                let (qmin, qmax) = [(0, 15), (0, 31), (0, 3), (-4, 3), (-32, 31)][trial % 5];
                let mut sc = GroupScales::new();
                let nc = 1 + trial % MAX_SUPER;
                for g in 0..ng {
                    for c in 0..nc {
                        sc.d[g][c] = if (g + c + trial) % 11 == 0 {
                            0.0
                        } else {
                            rng.sym(0.3)
                        };
                        sc.m[g][c] = if qmin < 0 { 0.0 } else { rng.unit() * 0.5 };
                    }
                }
                let a = group_errs_scalar(&x, &w, gs, ng, &sc, nc, qmin, qmax);
                // SAFETY: AVX2 availability checked above; x and w hold gs·ng values.
                let b = unsafe { avx2::group_errs(&x, &w, gs, ng, &sc, qmin, qmax) };
                for c in 0..nc {
                    assert_eq!(a[c].to_bits(), b[c].to_bits(), "trial {trial} cand {c}");
                }
            }
        }
    }

    /// The AVX2 candidate sums equal the scalar reference bit for bit, for every block size,
    /// integer range and candidate count the searches use, on ordinary, heavy-tailed, sparse and
    /// rounding-tie inputs (values that land exactly on .5 after scaling).
    #[test]
    fn cand_sums_avx2_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::x86::available() {
                return;
            }
            let mut rng = Rng::new(11);
            let ranges = [
                (-8, 7),
                (-16, 15),
                (-4, 3),
                (-32, 31),
                (0, 3),
                (0, 15),
                (0, 31),
            ];
            for trial in 0..3000 {
                let n = [16, 32, 256][trial % 3];
                let mut x: Vec<f32> = match trial % 4 {
                    0 => rng.f32s(n, 1.0),
                    1 => rng.f32s(n, 1.0).iter().map(|v| v * v * v * 10.0).collect(),
                    2 => rng
                        .f32s(n, 0.01)
                        .iter()
                        .map(|&v| if v > 0.0 { v } else { 0.0 })
                        .collect(),
                    _ => (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.5).collect(),
                };
                if trial % 7 == 0 {
                    x[0] = -0.0;
                }
                let w: Vec<f32> = rng.f32s(n, 1.0).iter().map(|v| v.abs() + 0.01).collect();
                let wx: Vec<f32> = w.iter().zip(&x).map(|(a, b)| a * b).collect();
                let (qmin, qmax) = ranges[trial % ranges.len()];
                let nc = 1 + trial % MAX_CAND;
                let amax = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                let is: Vec<f32> = (0..nc)
                    .map(|c| {
                        let t = if trial % 4 == 3 {
                            2.0
                        } else {
                            (qmax - qmin) as f32 / 2.0 + rng.sym(2.0)
                        };
                        if c % 2 == 0 {
                            t / amax
                        } else {
                            -t / amax
                        }
                    })
                    .collect();
                let a = cand_sums_scalar(&x, &w, &wx, &is, qmin, qmax);
                // SAFETY: AVX2 availability checked above.
                let b = unsafe { avx2::cand_sums(&x, &w, &wx, &is, qmin, qmax) };
                for c in 0..nc {
                    assert_eq!(
                        a.swq[c].to_bits(),
                        b.swq[c].to_bits(),
                        "trial {trial} cand {c}"
                    );
                    assert_eq!(
                        a.swqq[c].to_bits(),
                        b.swqq[c].to_bits(),
                        "trial {trial} cand {c}"
                    );
                    assert_eq!(
                        a.swxq[c].to_bits(),
                        b.swxq[c].to_bits(),
                        "trial {trial} cand {c}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::testutil::Rng;

    /// `cargo test --release -p modu-kernels --lib quantize::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput() {
        let mut rng = Rng::new(1);
        let x = rng.f32s(1 << 20, 1.0);
        for &ty in QUANTIZE_TYPES {
            let mut buf = vec![0u8; row_bytes(ty, x.len()).unwrap()];
            let t = std::time::Instant::now();
            quantize_row(ty, &x, &mut buf, None).unwrap();
            let s = t.elapsed().as_secs_f64();
            eprintln!("{ty}: {:.1} M elements/s", x.len() as f64 / s / 1e6);
        }
    }
}
