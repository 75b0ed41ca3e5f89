//! Decode GEMV for the 32-element block types (Q4_0, Q5_0, Q8_0) × one Q8_0 activation row.
//!
//! Decode reads every weight once per token, so it lives or dies by the work per weight block.
//! Compared with calling the per-row dot kernel for every row, this kernel:
//!
//! * converts the activation scales to f32 once per call, and each weight scale straight into
//!   a broadcast vector (`vpbroadcastw` + `vcvtph2ps`, no scalar round trip);
//! * for the unsigned-nibble types (Q4_0, Q5_0) multiplies the raw unsigned quants `u` with the
//!   activations and subtracts the offset (8 or 16) times the activations' per-lane sums,
//!   precomputed once per call, instead of applying `vpsignb` twice per block.
//!
//! Results are bit-identical to the dot kernels in [`crate::x86`] (and so to the prefill GEMM):
//! each 32-element block gives the same eight i32 lane sums (`Σ (u - off)·y = Σ u·y - off·Σ y`
//! exactly, per lane of four), multiplied by the same f32 scale product `dw·da` and added with
//! one fused multiply-add into the same accumulator (even blocks and odd blocks apart), with
//! the same final reduction.

use std::arch::x86_64::*;

use crate::blocks::*;
use crate::x86::{decode_q8_0, h2f, hsum_ps, q5_0_high_bits, unpack_nibbles_pub};

/// Per-call preparation of the activation row.
pub(crate) struct Prepared {
    /// f32 scale of each activation block.
    da: Vec<f32>,
    /// Per activation block, `off · Σ y` over each group of four values (eight i32 lanes),
    /// `off` being the weight type's offset (`GemvBlock::OFFSET_SHIFT`).
    lane_sums: Vec<__m256i>,
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare(act: &[BlockQ8_0], offset_shift: Option<i32>) -> Prepared {
    let da = act.iter().map(|b| h2f(b.d)).collect();
    let lane_sums = if let Some(shift) = offset_shift {
        let shift = _mm_cvtsi32_si128(shift);
        let ones8 = _mm256_set1_epi8(1);
        let ones16 = _mm256_set1_epi16(1);
        act.iter()
            .map(|b| {
                // SAFETY: qs is 32 bytes; loadu has no alignment requirement.
                let y = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, y), ones16);
                _mm256_sll_epi32(sums, shift)
            })
            .collect()
    } else {
        Vec::new()
    };
    Prepared { da, lane_sums }
}

/// How a weight type turns a block into lane sums `Σ q·y` (eight i32 lanes of four values):
/// decoded once per block, then combined with each token's activations.
pub(crate) trait GemvBlock: Copy + Sync {
    /// `log2` of the offset subtracted from the unsigned quants, if the type uses the
    /// unsigned trick (then [`GemvBlock::lanes`] gets `offset · Σ y` per lane).
    const OFFSET_SHIFT: Option<i32>;
    fn d(&self) -> [u8; 2];
    /// The block's quants, ready for [`GemvBlock::lanes`]: `(|q|, q)` for signed types (the
    /// `vpsignb` trick), `(u, u)` for the unsigned ones.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn decode(&self) -> (__m256i, __m256i);
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i, ysum: __m256i) -> __m256i;
}

impl GemvBlock for BlockQ8_0 {
    const OFFSET_SHIFT: Option<i32> = None;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        let q = decode_q8_0(self);
        (_mm256_sign_epi8(q, q), q)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i, _: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(dec.0, _mm256_sign_epi8(y, dec.1));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

/// `Σ u·y - offset·Σ y` per lane, for the unsigned-quant types (Q4_0, Q5_0).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unsigned_lanes(u: __m256i, y: __m256i, ysum: __m256i) -> __m256i {
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1));
    _mm256_sub_epi32(p, ysum)
}

impl GemvBlock for BlockQ4_0 {
    const OFFSET_SHIFT: Option<i32> = Some(3);
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        // u in 0..=15; u·y pairs stay far inside i16.
        let u = unpack_nibbles_pub(&self.qs);
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i, ysum: __m256i) -> __m256i {
        unsigned_lanes(dec.0, y, ysum)
    }
}

impl GemvBlock for BlockQ5_0 {
    const OFFSET_SHIFT: Option<i32> = Some(4);
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        // u in 0..=31; 2·31·127 fits an i16.
        let u = _mm256_or_si256(unpack_nibbles_pub(&self.qs), q5_0_high_bits(self.qh));
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i, ysum: __m256i) -> __m256i {
        unsigned_lanes(dec.0, y, ysum)
    }
}

/// Tokens per pass over a weight row (two accumulators per token stay in registers).
const T: usize = 4;

/// Rows `r0..r1` of `w` (`nb` blocks per row) times `acts.len()` prepared activation rows;
/// `y[t * rows + r]` receives token `t`'s result for row `r`. Each row is walked once per group
/// of up to four tokens, right after the previous group, so it is read from memory once.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w.len() >= r1 * nb`; every `acts[t]` has `nb`
/// blocks and `preps[t]` was prepared from it with `W::OFFSET_SHIFT`; `y` points to at least
/// `acts.len() * rows` writable f32 of which no other thread touches rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_rows<W: GemvBlock>(
    w: &[W],
    nb: usize,
    r0: usize,
    r1: usize,
    acts: &[&[BlockQ8_0]],
    preps: &[Prepared],
    y: *mut f32,
    rows: usize,
) {
    debug_assert!(w.len() >= r1 * nb && acts.len() == preps.len());
    for r in r0..r1 {
        let row = &w[r * nb..(r + 1) * nb];
        let mut t0 = 0;
        while t0 < acts.len() {
            let n = (acts.len() - t0).min(T);
            macro_rules! go {
                ($n:literal) => {{
                    let a: [&[BlockQ8_0]; $n] = std::array::from_fn(|k| acts[t0 + k]);
                    let p: [&Prepared; $n] = std::array::from_fn(|k| &preps[t0 + k]);
                    let out = row_tokens::<W, $n>(row, nb, a, p);
                    for (k, v) in out.into_iter().enumerate() {
                        // SAFETY: t0 + k < acts.len() and r < r1 <= rows; the caller owns
                        // rows r0..r1 of every token.
                        *y.add((t0 + k) * rows + r) = v;
                    }
                }};
            }
            match n {
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
            t0 += n;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_tokens<W: GemvBlock, const N: usize>(
    row: &[W],
    nb: usize,
    acts: [&[BlockQ8_0]; N],
    preps: [&Prepared; N],
) -> [f32; N] {
    let zero = _mm256_setzero_si256();
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    macro_rules! step {
        ($b:expr, $acc:ident) => {{
            let b = $b;
            // SAFETY: b < nb == row.len() == acts[k].len() == preps[k].da.len().
            let blk = row.get_unchecked(b);
            let dec = blk.decode();
            // The weight scale converted in every lane at once (vpbroadcastw + vcvtph2ps).
            let dw = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(blk.d())));
            for k in 0..N {
                let a = acts[k].get_unchecked(b);
                // SAFETY: qs is 32 bytes; loadu has no alignment requirement.
                let yv = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                let ys = if W::OFFSET_SHIFT.is_some() {
                    *preps[k].lane_sums.get_unchecked(b)
                } else {
                    zero
                };
                // Lane values equal the dot kernel's scalar product dw·da.
                let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(preps[k].da.get_unchecked(b)));
                let l = W::lanes(dec, yv, ys);
                $acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(l), $acc[k]);
            }
        }};
    }
    // Even blocks into acc0, odd ones into acc1, as in the dot kernel.
    let mut b = 0;
    while b + 2 <= nb {
        step!(b, acc0);
        step!(b + 1, acc1);
        b += 2;
    }
    if b < nb {
        step!(b, acc0);
    }
    std::array::from_fn(|k| hsum_ps(_mm256_add_ps(acc0[k], acc1[k])))
}
