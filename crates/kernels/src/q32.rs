//! Matmul of the 32-element block types (Q4_0, Q5_0, Q8_0) with Q8_0 activations, for every
//! token count: one kernel serves decode (1 token), batched decode and prefill.
//!
//! # Numerics
//! Every output is `Σ_b f32(isum_b) · (dw_b · da_b)`, summed over the blocks `b` from left to
//! right in f32 (one multiply and one add per block), where `isum_b` is the exact integer dot
//! product of block `b` and `dw_b`, `da_b` are the weight and activation scales. That is
//! exactly what the scalar reference ([`crate::scalar::vec_dot_q5_0_q8_0`] etc.) computes, so
//! the SIMD and scalar results are bit-identical, and so are the results for any batch shape
//! (a token's output never depends on the other tokens of the call). (`dw · da` is a product of
//! two f16 values, exact in f32.)
//!
//! # Why this shape
//! llama.cpp's AVX2 dot keeps eight float lanes per block (convert, scale, fused add for each
//! of the eight partial sums), i.e. ~6 vector operations per (row, token, block). Here eight
//! weight rows are processed together: per (row, token, block) the integer work is one
//! `maddubs` and one `madd` (plus a sign for Q8_0); the eight rows' lane vectors are then
//! reduced into one vector holding the eight rows' exact block sums, and the float work (one
//! convert, scale, multiply and add) is done once for eight rows. Each weight block is decoded
//! once per group of up to [`TOKEN_TILE`] tokens.
//!
//! Unsigned-quant types (Q4_0, Q5_0) multiply the raw quants `u` (0..=15 / 0..=31) and
//! subtract `offset · Σ y` after the reduction (`Σ (u - off)·y = Σ u·y - off·Σ y` exactly);
//! `off · Σ y` is computed once per activation block.

// Index loops over the small register arrays read more plainly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::blocks::*;
use crate::x86::{h2f, q5_0_high_bits, unpack_nibbles_pub};

/// Weight rows per kernel call (one f32 lane each).
pub(crate) const ROWS: usize = 8;

/// Tokens per pass over a group of rows: the decoded weight blocks are reused for this many
/// tokens, and the accumulators (one vector per token) stay in L1.
const TOKEN_TILE: usize = 64;

/// From this many tokens in a tile on, [`group_transposed`] (its transposition of the decoded
/// blocks pays off); below, [`group`]. Both give the same bits.
const TRANSPOSED_MIN_TOKENS: usize = 4;

/// A 32-element weight block type.
pub(crate) trait Q32Block: Copy + Sync {
    /// The offset subtracted from the unsigned quants (0: the quants are signed).
    const OFFSET: i32;
    /// How many `maddubs` results (pair sums of `u·y`) can be added in i16 without overflow:
    /// Q4_0 `8·2·15·127 < 2^15`, Q5_0 `4·2·31·127 < 2^15`; Q8_0's pair sums reach `2·128·127`.
    const I16_TERMS: usize;
    fn d(&self) -> [u8; 2];
    /// The block's 32 quants ready for [`Q32Block::lanes`]: `(u, u)` with the unsigned quants
    /// for the offset types, `(|q|, q)` for Q8_0 (the `maddubs` sign trick).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn decode(&self) -> (__m256i, __m256i);
    /// Eight i32 lanes whose sum is `Σ u·y` (or `Σ q·y`).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i) -> __m256i;
}

impl Q32Block for BlockQ8_0 {
    const OFFSET: i32 = 0;
    const I16_TERMS: usize = 1;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        // SAFETY: qs is 32 bytes; loadu has no alignment requirement.
        let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        // |q| as an unsigned byte (also right for -128).
        (_mm256_sign_epi8(q, q), q)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i) -> __m256i {
        // q·y = |q| · (sign(q)·y); |q| <= 128 and |y| <= 127, so a pair sum fits an i16.
        let p = _mm256_maddubs_epi16(dec.0, _mm256_sign_epi8(y, dec.1));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

impl Q32Block for BlockQ4_0 {
    const OFFSET: i32 = 8;
    const I16_TERMS: usize = 8;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        let u = unpack_nibbles_pub(&self.qs);
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes((u, _): (__m256i, __m256i), y: __m256i) -> __m256i {
        // u <= 15, |y| <= 127: a pair sum fits an i16.
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1))
    }
}

impl Q32Block for BlockQ5_0 {
    const OFFSET: i32 = 16;
    const I16_TERMS: usize = 4;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        let u = _mm256_or_si256(unpack_nibbles_pub(&self.qs), q5_0_high_bits(self.qh));
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes((u, _): (__m256i, __m256i), y: __m256i) -> __m256i {
        // u <= 31, |y| <= 127: 2·31·127 fits an i16.
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1))
    }
}

/// Per-call preparation of the activations: per (token, block) the f32 scale and
/// `offset · Σ y` (both `[n_tokens * nb]`).
pub(crate) struct Prepared {
    da: Vec<f32>,
    ysum: Vec<i32>,
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare<W: Q32Block>(act: &[BlockQ8_0]) -> Prepared {
    let da = act.iter().map(|b| h2f(b.d)).collect();
    let ysum = if W::OFFSET != 0 {
        act.iter()
            .map(|b| W::OFFSET * b.qs.iter().map(|&v| v as i32).sum::<i32>())
            .collect()
    } else {
        Vec::new()
    };
    Prepared { da, ysum }
}

/// Lane `i` of the result is the sum of the eight lanes of `p[i]` (exact, i32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce8(p: [__m256i; ROWS]) -> __m256i {
    let h01 = _mm256_hadd_epi32(p[0], p[1]);
    let h23 = _mm256_hadd_epi32(p[2], p[3]);
    let h45 = _mm256_hadd_epi32(p[4], p[5]);
    let h67 = _mm256_hadd_epi32(p[6], p[7]);
    // [r0 r1 r2 r3 (low halves) | r0 r1 r2 r3 (high halves)], and the same for rows 4..8.
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    // [a.hi | b.lo] + [a.lo | b.hi]
    let x = _mm256_permute2x128_si256(a, b, 0x21);
    let z = _mm256_blend_epi32(a, b, 0xF0);
    _mm256_add_epi32(x, z)
}

/// Outputs of weight rows `r0..r1` (`w` is the whole matrix, `nb` blocks per row) for all
/// `n_tokens` activation rows; `y[t * rows + r]` receives token `t`'s result for row `r`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w.len() >= r1 * nb` with `r0 < r1`;
/// `act.len() == n_tokens * nb`; `prep` was prepared from `act` with the same `W`; `y` points to
/// `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread accesses rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<W: Q32Block>(
    w: &[W],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8_0],
    prep: &Prepared,
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    debug_assert!(r0 < r1 && w.len() >= r1 * nb && act.len() == n_tokens * nb);
    // One accumulator per token of the tile (lane = row); only the first `t1 - t0` are used.
    let mut acc = [_mm256_setzero_ps(); TOKEN_TILE];
    let mut t0 = 0;
    while t0 < n_tokens {
        let t1 = (t0 + TOKEN_TILE).min(n_tokens);
        let mut g = r0;
        while g < r1 {
            let n_rows = (r1 - g).min(ROWS);
            // A short last group repeats its last row (computed, not stored).
            let idx: [usize; ROWS] = std::array::from_fn(|i| g + i.min(n_rows - 1));
            for a in &mut acc[..t1 - t0] {
                *a = _mm256_setzero_ps();
            }
            if t1 - t0 >= TRANSPOSED_MIN_TOKENS {
                group_transposed::<W>(w, nb, idx, act, prep, t0, t1, &mut acc);
            } else {
                group::<W>(w, nb, idx, act, prep, t0, t1, &mut acc);
            }
            for t in t0..t1 {
                let mut v = [0f32; ROWS];
                _mm256_storeu_ps(v.as_mut_ptr(), acc[t - t0]);
                for i in 0..n_rows {
                    // SAFETY: t < n_tokens and g + i < r1 <= rows; this task owns the rows.
                    *y.add(t * rows + g + i) = v[i];
                }
            }
            g += n_rows;
        }
        t0 = t1;
    }
}

/// Eight rows (`idx`) × tokens `t0..t1` over all blocks, into `acc[t - t0]` (lane = row).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group<W: Q32Block>(
    w: &[W],
    nb: usize,
    idx: [usize; ROWS],
    act: &[BlockQ8_0],
    prep: &Prepared,
    t0: usize,
    t1: usize,
    acc: &mut [__m256; TOKEN_TILE],
) {
    for b in 0..nb {
        // SAFETY (all get_unchecked below): idx[i] < r1 so idx[i] * nb + b < w.len();
        // t < n_tokens so t * nb + b < act.len() == prep.da.len() (== prep.ysum.len() when
        // W::OFFSET != 0).
        // Plain loops, not `array::from_fn`: a closure does not inherit `target_feature`, so
        // the SIMD helpers called from it would not be inlined.
        let mut dec = [(_mm256_setzero_si256(), _mm256_setzero_si256()); ROWS];
        let mut dh = [0i16; ROWS];
        for i in 0..ROWS {
            let blk = w.get_unchecked(idx[i] * nb + b);
            // Eight interleaved row streams defeat the hardware prefetcher on matrices that
            // come from DRAM (decode): fetch the same block of the next group of eight rows.
            // A prefetch never faults, so an address past the matrix is harmless (and
            // `wrapping_add` keeps the pointer arithmetic defined).
            _mm_prefetch::<_MM_HINT_T0>((blk as *const W).wrapping_add(ROWS * nb) as *const i8);
            dec[i] = blk.decode();
            dh[i] = i16::from_le_bytes(blk.d());
        }
        // Built in registers (vpinsrw): a store of eight i16 followed by one 16-byte load would
        // stall on store forwarding.
        let dw = _mm256_cvtph_ps(_mm_set_epi16(
            dh[7], dh[6], dh[5], dh[4], dh[3], dh[2], dh[1], dh[0],
        ));
        for t in t0..t1 {
            let k = t * nb + b;
            let a = act.get_unchecked(k);
            // SAFETY: qs is 32 bytes; loadu has no alignment requirement.
            let yv = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let mut p = [_mm256_setzero_si256(); ROWS];
            for i in 0..ROWS {
                p[i] = W::lanes(dec[i], yv);
            }
            let mut s = reduce8(p);
            if W::OFFSET != 0 {
                s = _mm256_sub_epi32(s, _mm256_set1_epi32(*prep.ysum.get_unchecked(k)));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*prep.da.get_unchecked(k)));
            let term = _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale);
            let a = acc.get_unchecked_mut(t - t0);
            *a = _mm256_add_ps(*a, term);
        }
    }
}

/// 8×8 transpose of 32-bit elements: `out[j]` lane `i` = `v[i]` lane `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(v: &[__m256i; ROWS]) -> [__m256i; ROWS] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256(u0, u4, 0x20),
        _mm256_permute2x128_si256(u1, u5, 0x20),
        _mm256_permute2x128_si256(u2, u6, 0x20),
        _mm256_permute2x128_si256(u3, u7, 0x20),
        _mm256_permute2x128_si256(u0, u4, 0x31),
        _mm256_permute2x128_si256(u1, u5, 0x31),
        _mm256_permute2x128_si256(u2, u6, 0x31),
        _mm256_permute2x128_si256(u3, u7, 0x31),
    ]
}

/// As [`group`], for tiles of several tokens: the eight decoded blocks are transposed once so
/// that vector `j` holds quants `4j..4j+4` of all eight rows (one 32-bit lane per row). Per token
/// each `maddubs` then multiplies all eight rows by the same four activations (broadcast), and
/// summing the products over `j` leaves each row's block sum in its own lane: no horizontal
/// reduction. The pair sums are added in i16 as far as [`Q32Block::I16_TERMS`] allows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_transposed<W: Q32Block>(
    w: &[W],
    nb: usize,
    idx: [usize; ROWS],
    act: &[BlockQ8_0],
    prep: &Prepared,
    t0: usize,
    t1: usize,
    acc: &mut [__m256; TOKEN_TILE],
) {
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let mut raw = [_mm256_setzero_si256(); ROWS];
        let mut dh = [0i16; ROWS];
        for i in 0..ROWS {
            // SAFETY: idx[i] < r1, so idx[i] * nb + b < w.len().
            let blk = w.get_unchecked(idx[i] * nb + b);
            // u (offset types) or q (Q8_0).
            raw[i] = blk.decode().1;
            dh[i] = i16::from_le_bytes(blk.d());
        }
        let dw = _mm256_cvtph_ps(_mm_set_epi16(
            dh[7], dh[6], dh[5], dh[4], dh[3], dh[2], dh[1], dh[0],
        ));
        let v = transpose8(&raw);
        // Q8_0: |q| for the unsigned operand, the sign goes onto the activations.
        let mut av = v;
        if W::OFFSET == 0 {
            for j in 0..ROWS {
                av[j] = _mm256_sign_epi8(v[j], v[j]);
            }
        }
        for t in t0..t1 {
            let k = t * nb + b;
            // SAFETY: t < n_tokens, so k < act.len() == prep.da.len() (== prep.ysum.len() for
            // the offset types); qs is 32 bytes, read as eight unaligned i32.
            let a = act.get_unchecked(k);
            let yp = a.qs.as_ptr() as *const i32;
            let mut s32 = _mm256_setzero_si256();
            let mut s16 = _mm256_setzero_si256();
            for j in 0..ROWS {
                let yj = _mm256_set1_epi32(std::ptr::read_unaligned(yp.add(j)));
                let m = if W::OFFSET == 0 {
                    _mm256_maddubs_epi16(av[j], _mm256_sign_epi8(yj, v[j]))
                } else {
                    _mm256_maddubs_epi16(v[j], yj)
                };
                if W::I16_TERMS == 1 {
                    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(m, ones));
                } else {
                    s16 = _mm256_add_epi16(s16, m);
                    if (j + 1) % W::I16_TERMS == 0 {
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, ones));
                        s16 = _mm256_setzero_si256();
                    }
                }
            }
            if W::OFFSET != 0 {
                s32 = _mm256_sub_epi32(s32, _mm256_set1_epi32(*prep.ysum.get_unchecked(k)));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*prep.da.get_unchecked(k)));
            let term = _mm256_mul_ps(_mm256_cvtepi32_ps(s32), scale);
            let a = acc.get_unchecked_mut(t - t0);
            *a = _mm256_add_ps(*a, term);
        }
    }
}
