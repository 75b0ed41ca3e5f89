//! AVX-512 VNNI matmul of interleaved Q5_0 and Q8_0 weights ([`Layout::Interleaved8`]) with
//! Q8_0 activations, for two or more tokens (prefill, batched decode). One token stays on the
//! AVX2 streaming kernel of [`crate::q32x8`]: it is bound by memory, not by arithmetic.
//!
//! Two neighbouring groups of eight rows are taken at once: their decoded quant vectors (those
//! of [`crate::q32x8`], four consecutive quants of each row per 32-bit lane) fill the two halves
//! of a 512-bit register, rows `g..g+8` below and `g+8..g+16` above. Per token and block, each
//! of the eight vectors needs one `vpdpbusd` against four broadcast activation bytes, which
//! adds the four products of each lane into its row's 32-bit sum: where AVX2 needs a
//! `maddubs`, an i16 add and (per half) a `madd` for eight rows, this is one instruction for
//! sixteen.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Q5_0's quants are unsigned already (`u`,
//! 0..=31, value `u - 16`). Q8_0's signed quants `q` are biased to `q + 128` (a XOR with 0x80)
//! and, like Q5_0's offset, the bias is accounted for by starting each block's sum at `−128·Σ y`:
//! `Σ q·y = Σ (q+128)·y − 128·Σ y`.
//! The block sums are the same integers as on the AVX2 and scalar paths (all sums are exact;
//! at most 32·255·127 in magnitude), and the float work per block is [`crate::q32`]'s `finish`
//! (`acc + f32(isum) · (dw · da)`, in that order), so every output has the same bits as the
//! scalar reference, for any batch shape and either path.
//!
//! [`Layout::Interleaved8`]: crate::layout::Layout::Interleaved8

use std::arch::x86_64::*;

use crate::avx512::join;
use crate::blocks::{BlockQ5_0, BlockQ8_0};
use crate::layout::INTERLEAVE;
use crate::q32x8::X8Block;

/// Tokens per pass over a row pair's blocks: one 64-byte accumulator each, 4 KiB in L1.
const TOKEN_TILE: usize = 64;

/// A 32-element block type with an AVX-512 path.
pub(crate) trait X16Block: X8Block {
    /// The offset of the unsigned quants (Q5_0's own, Q8_0's bias): each block's unsigned sum
    /// starts from `−offset · Σ y`.
    const UNSIGNED_OFFSET: i32;
    /// The eight quant vectors of the groups at `p0` (low half) and `p1` (high half), as
    /// unsigned bytes.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; `p0` and `p1` point to
    /// `BYTES` readable bytes each.
    unsafe fn decode16(p0: *const u8, p1: *const u8) -> [__m512i; INTERLEAVE];
}

impl X16Block for BlockQ5_0 {
    const UNSIGNED_OFFSET: i32 = 16;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn decode16(p0: *const u8, p1: *const u8) -> [__m512i; INTERLEAVE] {
        // SAFETY: the caller passes two whole block groups.
        let (a, b) = (Self::decode8(p0), Self::decode8(p1));
        std::array::from_fn(|j| join(a[j], b[j]))
    }
}

impl X16Block for BlockQ8_0 {
    const UNSIGNED_OFFSET: i32 = 128;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn decode16(p0: *const u8, p1: *const u8) -> [__m512i; INTERLEAVE] {
        // SAFETY: the caller passes two whole block groups.
        let (a, b) = (Self::decode8(p0), Self::decode8(p1));
        let bias = _mm512_set1_epi8(0x80u8 as i8);
        std::array::from_fn(|j| _mm512_xor_si512(join(a[j], b[j]), bias))
    }
}

/// Per (token, block) of the activations: the f32 scale and `−UNSIGNED_OFFSET · Σ y`, the
/// start of the block's integer sum (so that no subtraction is needed after it).
pub(crate) struct Prepared16 {
    da: Vec<f32>,
    neg_ysum: Vec<i32>,
}

/// The activations' scales and offset sums for `W`.
pub(crate) fn prepare16<W: X16Block>(act: &[BlockQ8_0]) -> Prepared16 {
    Prepared16 {
        da: act
            .iter()
            .map(|b| half::f16::from_bits(u16::from_le_bytes(b.d)).to_f32())
            .collect(),
        neg_ysum: act
            .iter()
            .map(|b| -W::UNSIGNED_OFFSET * b.qs.iter().map(|&v| v as i32).sum::<i32>())
            .collect(),
    }
}

/// `start` plus the sixteen rows' unsigned block sums against the activation quants at `y`
/// (32 bytes): with `start = −offset·Σ y`, the exact signed block sums.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `y` points to 8 readable i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot16(v: &[__m512i; INTERLEAVE], y: *const i32, start: i32) -> __m512i {
    // Two chains, so that consecutive `vpdpbusd` do not wait for each other's result.
    let mut s = [_mm512_set1_epi32(start), _mm512_setzero_si512()];
    for j in 0..INTERLEAVE {
        // SAFETY: j < 8 and y points to 8 readable i32 (caller).
        let yb = _mm512_set1_epi32(std::ptr::read_unaligned(y.add(j)));
        s[j % 2] = _mm512_dpbusd_epi32(s[j % 2], v[j], yb);
    }
    _mm512_add_epi32(s[0], s[1])
}

/// Outputs of weight rows `r0..r1` (multiples of 8) of an interleaved matrix for all
/// `n_tokens` activation rows; `y[t * rows + r]` receives token `t`'s result for row `r`.
/// Rows go sixteen at a time; an odd last group of eight is decoded into both halves and only
/// the low half is stored.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C. `data` holds whole groups of
/// eight rows of `nb` blocks in `W`'s interleaved layout, at least `r1` rows; `r0 < r1`, both
/// multiples of 8; `act.len() == n_tokens * nb`; `prep` was prepared from `act` with `W`; `y`
/// points to `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread accesses
/// rows `r0..r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<W: X16Block>(
    data: &[u8],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8_0],
    prep: &Prepared16,
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    debug_assert!(r0 < r1 && r0 % INTERLEAVE == 0 && r1 % INTERLEAVE == 0);
    debug_assert!(data.len() >= r1 / INTERLEAVE * nb * W::BYTES);
    debug_assert!(act.len() == n_tokens * nb && prep.da.len() == act.len());
    let group_bytes = nb * W::BYTES;
    let mut acc = [_mm512_setzero_ps(); TOKEN_TILE];
    let mut g = r0;
    while g < r1 {
        let pair = g + 2 * INTERLEAVE <= r1;
        // SAFETY: group g / 8 (and, for a pair, g / 8 + 1) lies inside data.
        let base0 = data.as_ptr().add(g / INTERLEAVE * group_bytes);
        let base1 = if pair { base0.add(group_bytes) } else { base0 };
        let mut t0 = 0;
        while t0 < n_tokens {
            let t1 = (t0 + TOKEN_TILE).min(n_tokens);
            for a in &mut acc[..t1 - t0] {
                *a = _mm512_setzero_ps();
            }
            for b in 0..nb {
                // SAFETY: block group b of both row groups lies inside data; the eight f16
                // scales are each group's first 16 bytes (loadu is unaligned).
                let (p0, p1) = (base0.add(b * W::BYTES), base1.add(b * W::BYTES));
                let dw = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(p0 as *const __m128i)),
                    _mm_loadu_si128(p1 as *const __m128i),
                ));
                let v = W::decode16(p0, p1);
                for t in t0..t1 {
                    let k = t * nb + b;
                    // SAFETY: t < n_tokens, so k < act.len() == prep's lengths; qs is 32 bytes.
                    let y = act.get_unchecked(k).qs.as_ptr() as *const i32;
                    let s = dot16(&v, y, *prep.neg_ysum.get_unchecked(k));
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*prep.da.get_unchecked(k)));
                    let a = acc.get_unchecked_mut(t - t0);
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(_mm512_cvtepi32_ps(s), scale));
                }
            }
            for t in t0..t1 {
                // SAFETY: t < n_tokens and rows g..g + 16 (or g..g + 8 when not a pair) are
                // below r1 <= rows, owned by this task.
                let out = y.add(t * rows + g);
                if pair {
                    _mm512_storeu_ps(out, acc[t - t0]);
                } else {
                    _mm256_storeu_ps(out, _mm512_castps512_ps256(acc[t - t0]));
                }
            }
            t0 = t1;
        }
        g += if pair { 2 * INTERLEAVE } else { INTERLEAVE };
    }
}
