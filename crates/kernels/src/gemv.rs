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

/// How a weight type turns a block into lane sums `Σ q·y` (eight i32 lanes of four values).
pub(crate) trait GemvBlock: Copy + Sync {
    /// `log2` of the offset subtracted from the unsigned quants, if the type uses the
    /// unsigned trick (then [`GemvBlock::lanes`] gets `offset · Σ y` per lane).
    const OFFSET_SHIFT: Option<i32>;
    fn d(&self) -> [u8; 2];
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn lanes(&self, y: __m256i, ysum: __m256i) -> __m256i;
}

impl GemvBlock for BlockQ8_0 {
    const OFFSET_SHIFT: Option<i32> = None;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(&self, y: __m256i, _: __m256i) -> __m256i {
        let q = decode_q8_0(self);
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

impl GemvBlock for BlockQ4_0 {
    const OFFSET_SHIFT: Option<i32> = Some(3);
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(&self, y: __m256i, ysum: __m256i) -> __m256i {
        // u in 0..=15; u·y pairs stay far inside i16.
        let u = unpack_nibbles_pub(&self.qs);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1));
        _mm256_sub_epi32(p, ysum)
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
    unsafe fn lanes(&self, y: __m256i, ysum: __m256i) -> __m256i {
        // u in 0..=31; 2·31·127 fits an i16.
        let u = _mm256_or_si256(unpack_nibbles_pub(&self.qs), q5_0_high_bits(self.qh));
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1));
        _mm256_sub_epi32(p, ysum)
    }
}

/// Rows `r0..r1` of `w` (`nb` blocks per row) times the prepared activation row `act`;
/// `y[r]` receives row `r`'s result.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w.len() >= r1 * nb`, `act.len() == nb`, `p` was
/// prepared from `act` (with `W::OFFSET_SHIFT`), and `y` points to at least `r1`
/// writable f32 of which no other thread touches `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_rows<W: GemvBlock>(
    w: &[W],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8_0],
    p: &Prepared,
    y: *mut f32,
) {
    debug_assert!(w.len() >= r1 * nb && act.len() == nb && p.da.len() == nb);
    let zero = _mm256_setzero_si256();
    // One row at a time: interleaving 2 or 4 rows (to share the activation loads) measured
    // 30-60% slower here (register pressure, and more concurrent memory streams per core).
    for r in r0..r1 {
        let out = rows_kernel::<W, 1>([&w[r * nb..(r + 1) * nb]], nb, act, p, zero);
        // SAFETY: r < r1; the caller owns rows r0..r1 of y.
        *y.add(r) = out[0];
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_kernel<W: GemvBlock, const N: usize>(
    rows: [&[W]; N],
    nb: usize,
    act: &[BlockQ8_0],
    p: &Prepared,
    zero: __m256i,
) -> [f32; N] {
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    macro_rules! step {
        ($b:expr, $acc:ident) => {{
            let b = $b;
            // SAFETY: b < nb == act.len() == p.da.len(); qs is 32 bytes.
            let yv = _mm256_loadu_si256(act.get_unchecked(b).qs.as_ptr() as *const __m256i);
            let da = _mm256_broadcast_ss(p.da.get_unchecked(b));
            let ys = if W::OFFSET_SHIFT.is_some() {
                *p.lane_sums.get_unchecked(b)
            } else {
                zero
            };
            for k in 0..N {
                let blk = rows[k].get_unchecked(b);
                // The weight scale converted in every lane at once (vpbroadcastw +
                // vcvtph2ps), times the activation scale: lane values equal dw·da.
                let dw = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(blk.d())));
                let d = _mm256_mul_ps(dw, da);
                let l = blk.lanes(yv, ys);
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
