//! AVX2 + FMA + F16C kernels for x86_64.
//!
//! Every kernel here is an `unsafe fn` compiled with `#[target_feature(enable = "avx2,fma,f16c")]`:
//! the caller must make sure the CPU supports those features ([`available`]). The crate's
//! dispatch layer only hands these out after that check; the `*_safe` wrappers used by the
//! dispatch tables are private to the crate for that reason.
//!
//! The integer parts of the dot products are exact, so they agree with the scalar reference up
//! to the order of the final float additions. The activation quantizers reproduce the scalar
//! rounding bit for bit.
//!
//! Activation operands (`BlockQ8_0`, `BlockQ8_1`, `BlockQ8K`) must hold values in -127..=127,
//! as produced by the quantizers of this crate (the sign trick of `mul_sum_i8` needs it).

use crate::blocks::*;
use half::{bf16, f16};
use modu_gguf::QK_K;
use std::arch::x86_64::*;

/// Whether this CPU runs the kernels of this module.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU runs the AVX-512 kernels ([`crate::dispatch::SimdLevel::Avx512`]): AVX-512
/// F, BW, VL and VNNI (`vpdpbusd`, `vpdpwssd`).
pub fn available_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_ps(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f16 (little-endian bytes) to f32 with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn h2f(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

/// 32 bytes from a slice that has at least 32 bytes from `off`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32<T: Copy>(s: &[T], off: usize) -> __m256i {
    debug_assert!(std::mem::size_of::<T>() == 1 && off + 32 <= s.len());
    // SAFETY: callers pass byte-sized elements with off + 32 <= len (checked in debug builds);
    // loadu has no alignment requirement.
    _mm256_loadu_si256(s.as_ptr().add(off) as *const __m256i)
}

/// 16 bytes from a slice that has at least 16 bytes from `off`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16<T: Copy>(s: &[T], off: usize) -> __m128i {
    debug_assert!(std::mem::size_of::<T>() == 1 && off + 16 <= s.len());
    // SAFETY: as in `load32`, for 16 bytes.
    _mm_loadu_si128(s.as_ptr().add(off) as *const __m128i)
}

/// Σ over groups of 4 of unsigned `x[i]` (0..=127) times signed `y[i]`, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn mul_sum_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// 32 bytes, byte `j` = 0xFF if bit `j` of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_to_mask(bits: u32) -> __m256i {
    mask_from_broadcast(_mm256_set1_epi32(bits as i32))
}

/// As [`bits_to_mask`] with the 32 bits already broadcast to every 32-bit lane of `v` (e.g. by
/// a `vpbroadcastd` straight from memory).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn mask_from_broadcast(v: __m256i) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(v, shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
}

/// The 32 nibbles of 16 bytes: low nibbles in bytes 0..16, high nibbles in 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_nibbles(qs: __m128i) -> __m256i {
    let hi = _mm_srli_epi16(qs, 4);
    _mm256_and_si256(_mm256_set_m128i(hi, qs), _mm256_set1_epi8(0x0F))
}

/// Scales and mins of the 8 sub-blocks of a Q4_K/Q5_K block.
#[inline(always)]
pub(crate) fn k4_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = u0 & 0x3F3F_3F3F;
    let m_lo = u1 & 0x3F3F_3F3F;
    let sc_hi = (u2 & 0x0F0F_0F0F) | (((u0 >> 6) & 0x0303_0303) << 4);
    let m_hi = ((u2 >> 4) & 0x0F0F_0F0F) | (((u1 >> 6) & 0x0303_0303) << 4);
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    sc[..4].copy_from_slice(&sc_lo.to_le_bytes());
    sc[4..].copy_from_slice(&sc_hi.to_le_bytes());
    m[..4].copy_from_slice(&m_lo.to_le_bytes());
    m[4..].copy_from_slice(&m_hi.to_le_bytes());
    (sc, m)
}

/// Σ_j mins[j] * (bsums[2j] + bsums[2j+1]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_min_sum(mins: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    // SAFETY: bsums is 32 bytes; two unaligned 16-byte loads stay inside it.
    let lo = _mm_loadu_si128(bsums.as_ptr() as *const __m128i);
    let hi = _mm_loadu_si128(bsums.as_ptr().add(8) as *const __m128i);
    let pairs = _mm_hadd_epi16(lo, hi); // 8 × i16, |v| <= 2 * 16 * 128
    let m = _mm_cvtepu8_epi16(_mm_loadl_epi64(mins.as_ptr() as *const __m128i));
    let p = _mm_madd_epi16(pairs, m);
    let p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
    let p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0b01));
    _mm_cvtsi128_si32(p)
}

// ---------------------------------------------------------------------------------------------
// Dot products, 32-element blocks
// ---------------------------------------------------------------------------------------------

/// Signed quants of a Q8_0 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_q8_0(a: &BlockQ8_0) -> __m256i {
    load32(&a.qs, 0)
}

/// Signed quants (-8..=7) of a Q4_0 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_q4_0(a: &BlockQ4_0) -> __m256i {
    _mm256_sub_epi8(unpack_nibbles(load16(&a.qs, 0)), _mm256_set1_epi8(8))
}

/// Signed quants (-16..=15) of a Q5_0 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode_q5_0(a: &BlockQ5_0) -> __m256i {
    // (nib | bit << 4) - 16 is nib when the bit is set, and nib - 16 == nib | 0xF0 (as a signed
    // byte) when it is clear.
    let lo = unpack_nibbles(load16(&a.qs, 0));
    let neg = _mm256_andnot_si256(
        bits_to_mask(u32::from_le_bytes(a.qh)),
        _mm256_set1_epi8(0xF0u8 as i8),
    );
    _mm256_or_si256(lo, neg)
}

/// Dot products of one row of 32-element signed blocks with `N` Q8_0 activation rows, with the
/// block-exact numerics of [`crate::q32`] (and of the scalar reference): per block the exact
/// integer dot product, then `sum += isum as f32 * (dw * da)` from the first block to the last.
/// The weight block is decoded once for all `N` rows. (The matmul uses [`crate::q32`], which
/// computes the same values eight rows at a time.)
macro_rules! dot_n_signed32 {
    ($name:ident, $blk:ty, $decode:ident) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const N: usize>(x: &[$blk], y: [&[BlockQ8_0]; N]) -> [f32; N] {
            let n = y.iter().fold(x.len(), |m, r| m.min(r.len()));
            let ones = _mm256_set1_epi16(1);
            let mut acc = [0f32; N];
            for i in 0..n {
                let a = &x[i];
                let q = $decode(a);
                let aq = _mm256_sign_epi8(q, q);
                let dw = h2f(a.d);
                for t in 0..N {
                    // SAFETY: i < n <= y[t].len().
                    let b = y[t].get_unchecked(i);
                    let sy = _mm256_sign_epi8(load32(&b.qs, 0), q);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sy), ones);
                    acc[t] += hsum_epi32(p) as f32 * (dw * h2f(b.d));
                }
            }
            acc
        }
    };
}

dot_n_signed32!(dot_n_q8_0, BlockQ8_0, decode_q8_0);
dot_n_signed32!(dot_n_q4_0, BlockQ4_0, decode_q4_0);
dot_n_signed32!(dot_n_q5_0, BlockQ5_0, decode_q5_0);

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    dot_n_q8_0::<1>(x, [y])[0]
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    dot_n_q4_0::<1>(x, [y])[0]
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    dot_n_q5_0::<1>(x, [y])[0]
}

/// Four activation rows at once (bit-identical to four single calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot4_q8_0_q8_0(x: &[BlockQ8_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4] {
    dot_n_q8_0::<4>(x, y)
}

/// Four activation rows at once (bit-identical to four single calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot4_q4_0_q8_0(x: &[BlockQ4_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4] {
    dot_n_q4_0::<4>(x, y)
}

/// Four activation rows at once (bit-identical to four single calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot4_q5_0_q8_0(x: &[BlockQ5_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4] {
    dot_n_q5_0::<4>(x, y)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = unpack_nibbles(load16(&a.qs, 0));
        let p = mul_sum_u8_i8(q, load32(&b.qs, 0));
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(h2f(a.d) * h2f(b.d)),
            _mm256_cvtepi32_ps(p),
            acc,
        );
        summs += h2f(a.m) * h2f(b.s);
    }
    hsum_ps(acc) + summs
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    let sixteen = _mm256_set1_epi8(16);
    for (a, b) in x.iter().zip(y) {
        let lo = unpack_nibbles(load16(&a.qs, 0));
        let hi = _mm256_and_si256(bits_to_mask(u32::from_le_bytes(a.qh)), sixteen);
        let p = mul_sum_u8_i8(_mm256_or_si256(lo, hi), load32(&b.qs, 0));
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(h2f(a.d) * h2f(b.d)),
            _mm256_cvtepi32_ps(p),
            acc,
        );
        summs += h2f(a.m) * h2f(b.s);
    }
    hsum_ps(acc) + summs
}

// ---------------------------------------------------------------------------------------------
// Dot products, K-quants
// ---------------------------------------------------------------------------------------------

/// Scale vector for a group of 32 values spanning two groups of 16: `s0` in the low 128-bit
/// lane, `s1` in the high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane_scales(s0: i16, s1: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0))
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q2_k_q8_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    let m3 = _mm256_set1_epi8(3);
    for (a, b) in x.iter().zip(y) {
        let d = b.d * h2f(a.d);
        let dmin = b.d * h2f(a.dmin);
        // Σ_g (sc_g >> 4) * bsum_g.
        let sc = load16(&a.scales, 0);
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(0x0F)));
        // SAFETY: bsums is 32 bytes; the load covers exactly those.
        let bs = _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i);
        let summs = hsum_epi32(_mm256_madd_epi16(mins, bs));
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let q2 = load32(&a.qs, h * 32);
            for j in 0..4 {
                let q = _mm256_and_si256(_mm256_srl_epi16(q2, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let p = _mm256_maddubs_epi16(q, load32(&b.qs, h * 128 + j * 32));
                let g = h * 8 + 2 * j;
                let sv = lane_scales((a.scales[g] & 0x0F) as i16, (a.scales[g + 1] & 0x0F) as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sv));
            }
        }
        sum += d * hsum_epi32(sumi) as f32 - dmin * summs as f32;
    }
    sum
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q3_k_q8_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for (a, b) in x.iter().zip(y) {
        let d = b.d * h2f(a.d);
        let sc = crate::scalar::q3k_scales(&a.scales);
        let hm = load32(&a.hmask, 0);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let q3 = load32(&a.qs, h * 32);
            for j in 0..4 {
                let low =
                    _mm256_and_si256(_mm256_srl_epi16(q3, _mm_cvtsi32_si128(2 * j as i32)), m3);
                let bit = _mm256_set1_epi8((1u8 << (h * 4 + j)) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                // 4 where the high bit is clear: value = low - 4.
                let sub = _mm256_andnot_si256(set, four);
                let yv = load32(&b.qs, h * 128 + j * 32);
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(low, yv), _mm256_maddubs_epi16(sub, yv));
                let g = h * 8 + 2 * j;
                let sv = lane_scales(sc[g] as i16, sc[g + 1] as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sv));
            }
        }
        sum += d * hsum_epi32(sumi) as f32;
    }
    sum
}

/// Q4_K row against `N` Q8_K rows, weights decoded once (per-row results independent of `N`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_n_q4_k<const N: usize>(x: &[BlockQ4K], y: [&[BlockQ8K]; N]) -> [f32; N] {
    let n = y.iter().fold(x.len(), |m, r| m.min(r.len()));
    let mut acc = [_mm256_setzero_ps(); N];
    let mut mins = [0f32; N];
    let m4 = _mm256_set1_epi8(0x0F);
    for (i, a) in x[..n].iter().enumerate() {
        let dw = h2f(a.d);
        let dminw = h2f(a.dmin);
        let (sc, m) = k4_scales_mins(&a.scales);
        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let q4 = load32(&a.qs, c * 32);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let s0 = _mm256_set1_epi16(sc[2 * c] as i16);
            let s1 = _mm256_set1_epi16(sc[2 * c + 1] as i16);
            for t in 0..N {
                // SAFETY: i < n <= y[t].len().
                let b = y[t].get_unchecked(i);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(&b.qs, c * 64)), s0);
                let p1 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(&b.qs, c * 64 + 32)), s1);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p0, p1));
            }
        }
        for t in 0..N {
            // SAFETY: i < n <= y[t].len().
            let b = y[t].get_unchecked(i);
            mins[t] += (b.d * dminw) * k4_min_sum(&m, &b.bsums) as f32;
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(b.d * dw),
                _mm256_cvtepi32_ps(sumi[t]),
                acc[t],
            );
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum_ps(acc[t]) - mins[t];
    }
    out
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q4_k_q8_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    dot_n_q4_k::<1>(x, [y])[0]
}

/// Four activation rows at once (bit-identical to four single calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot4_q4_k_q8_k(x: &[BlockQ4K], y: [&[BlockQ8K]; 4]) -> [f32; 4] {
    dot_n_q4_k::<4>(x, y)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q5_k_q8_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    for (a, b) in x.iter().zip(y) {
        let d = b.d * h2f(a.d);
        let dmin = b.d * h2f(a.dmin);
        let (sc, m) = k4_scales_mins(&a.scales);
        mins += dmin * k4_min_sum(&m, &b.bsums) as f32;
        let hbits = load32(&a.qh, 0);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = load32(&a.qs, c * 32);
            let bl = _mm256_set1_epi8(1 << (2 * c));
            let bh = _mm256_set1_epi8(1 << (2 * c + 1));
            let hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bl), bl), sixteen);
            let hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, bh), bh), sixteen);
            let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), hl);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), hh);
            let p0 = _mm256_maddubs_epi16(lo, load32(&b.qs, c * 64));
            let p1 = _mm256_maddubs_epi16(hi, load32(&b.qs, c * 64 + 32));
            let p0 = _mm256_madd_epi16(p0, _mm256_set1_epi16(sc[2 * c] as i16));
            let p1 = _mm256_madd_epi16(p1, _mm256_set1_epi16(sc[2 * c + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - mins
}

/// `vpshufb` masks for [`dot_n_q6_k`]: for group `g` of a half, i16 scale `2g` of a lane of
/// eight in every i16 of the low 128-bit lane (bytes `4g, 4g+1`), scale `2g + 1` in the high
/// lane (bytes `4g+2, 4g+3`).
pub(crate) const Q6K_SCALE_PICK: [[u8; 32]; 4] = {
    let mut m = [[0u8; 32]; 4];
    let mut g = 0;
    while g < 4 {
        let mut j = 0;
        while j < 16 {
            m[g][j] = (4 * g + j % 2) as u8;
            m[g][16 + j] = (4 * g + 2 + j % 2) as u8;
            j += 1;
        }
        g += 1;
    }
    m
};

/// Q6_K row against `N` Q8_K rows, weights decoded once (per-row results independent of `N`).
///
/// A block's integer sum is exact whatever the lane arrangement, so the scales are applied in
/// i16 `madd`s against per-group scale vectors, each made by one in-lane byte shuffle of the
/// block's sign-extended scales (not by scalar loads and broadcasts: that was half the
/// instructions of the loop), and the `+32` offset term joins the sum before its single
/// horizontal addition.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_n_q6_k<const N: usize>(x: &[BlockQ6K], y: [&[BlockQ8K]; N]) -> [f32; N] {
    let n = y.iter().fold(x.len(), |m, r| m.min(r.len()));
    let mut acc = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    // SAFETY: each mask is 32 bytes; loadu has no alignment requirement.
    let picks: [__m256i; 4] =
        std::array::from_fn(|g| _mm256_loadu_si256(Q6K_SCALE_PICK[g].as_ptr() as *const __m256i));
    for (i, a) in x[..n].iter().enumerate() {
        let dw = h2f(a.d);
        // SAFETY: scales is 16 bytes; the load covers exactly those.
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(a.scales.as_ptr() as *const __m128i));
        // Scales 0..8 (first half's groups) and 8..16 (second half's) in both lanes.
        let halves = [
            _mm256_permute2x128_si256(sc16, sc16, 0x00),
            _mm256_permute2x128_si256(sc16, sc16, 0x11),
        ];
        let mut sumi = [_mm256_setzero_si256(); N];
        for (h, &half) in halves.iter().enumerate() {
            let ql0 = load32(&a.ql, h * 64);
            let ql1 = load32(&a.ql, h * 64 + 32);
            let qh = load32(&a.qh, h * 32);
            // The four groups of 32 values of this half, unsigned 0..=63.
            let g0 = _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
            );
            let g1 = _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
            );
            let g2 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
            );
            let g3 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)), 2),
            );
            let qs = [g0, g1, g2, g3];
            for g in 0..4 {
                let sv = _mm256_shuffle_epi8(half, picks[g]);
                for t in 0..N {
                    // SAFETY: i < n <= y[t].len().
                    let b = y[t].get_unchecked(i);
                    let p = _mm256_maddubs_epi16(qs[g], load32(&b.qs, h * 128 + g * 32));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sv));
                }
            }
        }
        for t in 0..N {
            // SAFETY: i < n <= y[t].len().
            let b = y[t].get_unchecked(i);
            // Remove the +32 offset of the stored values: Σ sc_g * 32 * bsum_g.
            // SAFETY: bsums is 32 bytes; the load covers exactly those.
            let bs = _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i);
            let offs = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
            let isum = hsum_epi32(_mm256_sub_epi32(sumi[t], offs));
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(b.d * dw),
                _mm256_set1_ps(isum as f32),
                acc[t],
            );
        }
    }
    // All lanes of each accumulator hold the same sum.
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = _mm_cvtss_f32(_mm256_castps256_ps128(acc[t]));
    }
    out
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q6_k_q8_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    dot_n_q6_k::<1>(x, [y])[0]
}

/// Four activation rows at once (bit-identical to four single calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot4_q6_k_q8_k(x: &[BlockQ6K], y: [&[BlockQ8K]; 4]) -> [f32; 4] {
    dot_n_q6_k::<4>(x, y)
}

// ---------------------------------------------------------------------------------------------
// Float dot products
// ---------------------------------------------------------------------------------------------

/// F32 weights as little-endian bytes (any alignment) against f32 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_f32(x: &[u8], y: &[f32]) -> f32 {
    let n = (x.len() / 4).min(y.len());
    let xp = x.as_ptr() as *const f32;
    let yp = y.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): i + width <= n, and n f32 fit in both x and y; loadu accepts
    // any alignment.
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(
                _mm256_loadu_ps(xp.add(i + 8 * k)),
                _mm256_loadu_ps(yp.add(i + 8 * k)),
                *a,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(xp.add(i)),
            _mm256_loadu_ps(yp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let mut s = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += (xp.add(i)).read_unaligned() * *yp.add(i);
        i += 1;
    }
    s
}

/// F16 weights as little-endian bytes (any alignment) against f16 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_f16(x: &[u8], y: &[f16]) -> f32 {
    let n = (x.len() / 2).min(y.len());
    let xp = x.as_ptr() as *const u16;
    let yp = y.as_ptr() as *const u16;
    let ld = |p: *const u16, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): i + width <= n, and n halfs fit in both x and y; unaligned
    // loads.
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(ld(xp, i + 8 * k), ld(yp, i + 8 * k), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(ld(xp, i), ld(yp, i), acc[0]);
        i += 8;
    }
    let mut s = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        let a = f16::from_bits(xp.add(i).read_unaligned()).to_f32();
        s += a * y[i].to_f32();
        i += 1;
    }
    s
}

/// BF16 weights as little-endian bytes (any alignment) against bf16 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_bf16(x: &[u8], y: &[bf16]) -> f32 {
    let n = (x.len() / 2).min(y.len());
    let xp = x.as_ptr() as *const u16;
    let yp = y.as_ptr() as *const u16;
    let ld = |p: *const u16, i: usize| {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(i) as *const __m128i)),
            16,
        ))
    };
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + width <= n, and n halfs fit in both x and y.
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(ld(xp, i), ld(yp, i), acc0);
        acc1 = _mm256_fmadd_ps(ld(xp, i + 8), ld(yp, i + 8), acc1);
        i += 16;
    }
    while i + 8 <= n {
        acc0 = _mm256_fmadd_ps(ld(xp, i), ld(yp, i), acc0);
        i += 8;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += bf16::from_bits(xp.add(i).read_unaligned()).to_f32() * y[i].to_f32();
        i += 1;
    }
    s
}

/// F16 bytes to f32.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize_f16(x: &[u8], y: &mut [f32]) {
    let n = (x.len() / 2).min(y.len());
    let xp = x.as_ptr() as *const u16;
    let mut i = 0;
    // SAFETY: i + 8 <= n elements are in bounds of both slices; unaligned load/store.
    while i + 8 <= n {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(i) as *const __m128i));
        _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
        i += 8;
    }
    while i < n {
        y[i] = f16::from_bits(xp.add(i).read_unaligned()).to_f32();
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers (bit-exact with the scalar reference)
// ---------------------------------------------------------------------------------------------

/// Round half away from zero, like `f32::round`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_away(v: __m256) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t)); // exact for |v| < 2^23
    let ge = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5), _CMP_GE_OQ);
    let one = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0));
    _mm256_add_ps(t, _mm256_and_ps(ge, one))
}

/// Four vectors of 8 i32 (values in i8 range) to 32 bytes in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_i32x32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
    let ab = _mm256_packs_epi32(a, b);
    let cd = _mm256_packs_epi32(c, d);
    let v = _mm256_packs_epi16(ab, cd);
    _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// One Q8_0/Q8_1 block: the packed quants, the sum of the quants and `d` (f32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_block(x: &[f32]) -> (__m256i, i32, f32) {
    debug_assert!(x.len() >= 32);
    let p = x.as_ptr();
    // SAFETY: x has at least 32 values (callers pass exact 32-value chunks).
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let amax = hmax_ps(m);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let idv = _mm256_set1_ps(id);
    let q: [__m256i; 4] =
        [0, 1, 2, 3].map(|k| _mm256_cvtps_epi32(round_away(_mm256_mul_ps(v[k], idv))));
    let sum = hsum_epi32(_mm256_add_epi32(
        _mm256_add_epi32(q[0], q[1]),
        _mm256_add_epi32(q[2], q[3]),
    ));
    (pack_i32x32(q[0], q[1], q[2], q[3]), sum, d)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (q, _, d) = q8_block(xs);
        b.d = f16_bytes_f16c(d);
        // SAFETY: qs is 32 bytes; unaligned store.
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, q);
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (q, sum, d) = q8_block(xs);
        b.d = f16_bytes_f16c(d);
        b.s = f16_bytes_f16c(sum as f32 * d);
        // SAFETY: qs is 32 bytes; unaligned store.
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, q);
    }
}

/// f32 to f16 bytes, round to nearest even (as `half::f16::from_f32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_bytes_f16c(v: f32) -> [u8; 2] {
    let h = _mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT);
    (_mm_cvtsi128_si32(h) as u16).to_le_bytes()
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    let sign = _mm256_set1_ps(-0.0);
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let p = xs.as_ptr();
        let mut m = _mm256_setzero_ps();
        for k in 0..QK_K / 8 {
            // SAFETY: xs has exactly 256 values; k * 8 + 8 <= 256.
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(k * 8))));
        }
        let amax = hmax_ps(m);
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        // The first value of largest magnitude gives the sign (as the scalar reference).
        let max = xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0f32 / max;
        let iv = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        for c in 0..QK_K / 32 {
            let q: [__m256i; 4] = [0, 1, 2, 3].map(|k| {
                // SAFETY: c * 32 + k * 8 + 8 <= 256.
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(c * 32 + k * 8)), iv);
                let r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_min_epi32(_mm256_cvtps_epi32(r), cap)
            });
            b.bsums[2 * c] = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
            b.bsums[2 * c + 1] = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
            // SAFETY: c * 32 + 32 <= 256 = qs.len(); unaligned store.
            _mm256_storeu_si256(
                b.qs.as_mut_ptr().add(c * 32) as *mut __m256i,
                pack_i32x32(q[0], q[1], q[2], q[3]),
            );
        }
        b.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Safe entry points for the dispatch tables (crate-private: only handed out after `available`)
// ---------------------------------------------------------------------------------------------

macro_rules! safe_wrappers {
    ($($name:ident => $f:ident ( $($arg:ident : $t:ty),* ) $(-> $r:ty)?;)*) => {
        $(
            pub(crate) fn $name($($arg: $t),*) $(-> $r)? {
                debug_assert!(available());
                // SAFETY: these wrappers are only returned by `crate::dispatch` when
                // `simd_level() >= Avx2`, i.e. after `available()` confirmed the features.
                unsafe { $f($($arg),*) }
            }
        )*
    };
}

safe_wrappers! {
    dot_q4_0 => vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32;
    dot_q4_1 => vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32;
    dot_q5_0 => vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32;
    dot_q5_1 => vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32;
    dot_q8_0 => vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32;
    dot_q2_k => vec_dot_q2_k_q8_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32;
    dot_q3_k => vec_dot_q3_k_q8_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32;
    dot_q4_k => vec_dot_q4_k_q8_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32;
    dot_q5_k => vec_dot_q5_k_q8_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32;
    dot_q6_k => vec_dot_q6_k_q8_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32;
    dot4_q4_0 => vec_dot4_q4_0_q8_0(x: &[BlockQ4_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4];
    dot4_q5_0 => vec_dot4_q5_0_q8_0(x: &[BlockQ5_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4];
    dot4_q8_0 => vec_dot4_q8_0_q8_0(x: &[BlockQ8_0], y: [&[BlockQ8_0]; 4]) -> [f32; 4];
    dot4_q4_k => vec_dot4_q4_k_q8_k(x: &[BlockQ4K], y: [&[BlockQ8K]; 4]) -> [f32; 4];
    dot4_q6_k => vec_dot4_q6_k_q8_k(x: &[BlockQ6K], y: [&[BlockQ8K]; 4]) -> [f32; 4];
    dot_f32 => vec_dot_f32(x: &[u8], y: &[f32]) -> f32;
    dot_f16 => vec_dot_f16(x: &[u8], y: &[f16]) -> f32;
    dot_bf16 => vec_dot_bf16(x: &[u8], y: &[bf16]) -> f32;
    quant_q8_0 => quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]);
    quant_q8_1 => quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]);
    quant_q8_k => quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]);
    deq_f16 => dequantize_f16(x: &[u8], y: &mut [f32]);
}

#[cfg(test)]
mod tests {
    //! Every SIMD kernel against its scalar reference on random data.
    use super::*;
    use crate::scalar;
    use crate::testutil::{random_row, Rng};
    use modu_gguf::GgmlType;

    const BLOCK_COUNTS: &[usize] = &[1, 2, 3, 7, 28];
    const FLOAT_LENS: &[usize] = &[0, 1, 7, 8, 33, 64, 895, 1024];

    fn close(a: f32, b: f32, scale: f32, what: &str) {
        let tol = 1e-5 * scale.max(1e-3);
        assert!(
            (a - b).abs() <= tol,
            "{what}: simd {a} vs scalar {b} (tol {tol})"
        );
    }

    fn acts_q8_0(rng: &mut Rng, nb: usize) -> Vec<BlockQ8_0> {
        let x = rng.f32s(nb * 32, 2.0);
        let mut q = vec![BlockQ8_0::default(); nb];
        scalar::quantize_row_q8_0(&x, &mut q);
        q
    }
    fn acts_q8_1(rng: &mut Rng, nb: usize) -> Vec<BlockQ8_1> {
        let x = rng.f32s(nb * 32, 2.0);
        let mut q = vec![BlockQ8_1::default(); nb];
        scalar::quantize_row_q8_1(&x, &mut q);
        q
    }
    fn acts_q8_k(rng: &mut Rng, nb: usize) -> Vec<BlockQ8K> {
        let x = rng.f32s(nb * 256, 2.0);
        let mut q = vec![BlockQ8K::default(); nb];
        scalar::quantize_row_q8_k(&x, &mut q);
        q
    }

    /// Scale for the tolerance: the sum of |terms| bound, approximated by the dot of the
    /// absolute dequantized weights with the activations' magnitude.
    fn mag(ty: GgmlType, w: &[u8], n: usize) -> f32 {
        let mut f = vec![0f32; n];
        crate::dequantize_row(ty, w, &mut f).unwrap();
        f.iter().map(|v| v.abs()).sum::<f32>() * 2.0
    }

    macro_rules! check_dot {
        ($test:ident, $ty:expr, $blk:ty, $acts:ident, $simd:ident, $scalar:path) => {
            #[test]
            fn $test() {
                if !available() {
                    eprintln!("AVX2/FMA/F16C not available: skipped");
                    return;
                }
                let mut rng = Rng::new(0x5eed ^ $ty.id() as u64);
                for &nb in BLOCK_COUNTS {
                    for _ in 0..4 {
                        let n = nb * $ty.block_size();
                        let w = random_row($ty, n, &mut rng);
                        let x: &[$blk] = as_blocks(&w).unwrap();
                        let y = $acts(&mut rng, nb);
                        // SAFETY: features checked above.
                        let s = unsafe { $simd(x, &y) };
                        let r = $scalar(x, &y);
                        close(s, r, mag($ty, &w, n), &format!("{} x{nb}", $ty));
                    }
                }
            }
        };
    }

    check_dot!(
        dot_q4_0_matches_scalar,
        GgmlType::Q4_0,
        BlockQ4_0,
        acts_q8_0,
        vec_dot_q4_0_q8_0,
        scalar::vec_dot_q4_0_q8_0
    );
    check_dot!(
        dot_q4_1_matches_scalar,
        GgmlType::Q4_1,
        BlockQ4_1,
        acts_q8_1,
        vec_dot_q4_1_q8_1,
        scalar::vec_dot_q4_1_q8_1
    );
    check_dot!(
        dot_q5_0_matches_scalar,
        GgmlType::Q5_0,
        BlockQ5_0,
        acts_q8_0,
        vec_dot_q5_0_q8_0,
        scalar::vec_dot_q5_0_q8_0
    );
    check_dot!(
        dot_q5_1_matches_scalar,
        GgmlType::Q5_1,
        BlockQ5_1,
        acts_q8_1,
        vec_dot_q5_1_q8_1,
        scalar::vec_dot_q5_1_q8_1
    );
    check_dot!(
        dot_q8_0_matches_scalar,
        GgmlType::Q8_0,
        BlockQ8_0,
        acts_q8_0,
        vec_dot_q8_0_q8_0,
        scalar::vec_dot_q8_0_q8_0
    );
    check_dot!(
        dot_q2_k_matches_scalar,
        GgmlType::Q2_K,
        BlockQ2K,
        acts_q8_k,
        vec_dot_q2_k_q8_k,
        scalar::vec_dot_q2_k_q8_k
    );
    check_dot!(
        dot_q3_k_matches_scalar,
        GgmlType::Q3_K,
        BlockQ3K,
        acts_q8_k,
        vec_dot_q3_k_q8_k,
        scalar::vec_dot_q3_k_q8_k
    );
    check_dot!(
        dot_q4_k_matches_scalar,
        GgmlType::Q4_K,
        BlockQ4K,
        acts_q8_k,
        vec_dot_q4_k_q8_k,
        scalar::vec_dot_q4_k_q8_k
    );
    check_dot!(
        dot_q5_k_matches_scalar,
        GgmlType::Q5_K,
        BlockQ5K,
        acts_q8_k,
        vec_dot_q5_k_q8_k,
        scalar::vec_dot_q5_k_q8_k
    );
    check_dot!(
        dot_q6_k_matches_scalar,
        GgmlType::Q6_K,
        BlockQ6K,
        acts_q8_k,
        vec_dot_q6_k_q8_k,
        scalar::vec_dot_q6_k_q8_k
    );

    #[test]
    fn dot_floats_match_scalar() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(99);
        for &n in FLOAT_LENS {
            let y = rng.f32s(n, 1.0);
            let scale = n as f32;
            // f32, with the weights at an odd byte offset (unaligned).
            let mut wb = vec![0u8; 1];
            wb.extend(random_row(GgmlType::F32, n, &mut rng));
            let w = &wb[1..];
            // SAFETY: features checked above.
            close(
                unsafe { vec_dot_f32(w, &y) },
                scalar::vec_dot_f32(w, &y),
                scale,
                &format!("f32 n={n}"),
            );
            let w = random_row(GgmlType::F16, n, &mut rng);
            let yh: Vec<f16> = y.iter().map(|&v| f16::from_f32(v)).collect();
            // SAFETY: features checked above.
            close(
                unsafe { vec_dot_f16(&w, &yh) },
                scalar::vec_dot_f16(&w, &yh),
                scale,
                &format!("f16 n={n}"),
            );
            let w = random_row(GgmlType::BF16, n, &mut rng);
            let yb: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
            // SAFETY: features checked above.
            close(
                unsafe { vec_dot_bf16(&w, &yb) },
                scalar::vec_dot_bf16(&w, &yb),
                scale,
                &format!("bf16 n={n}"),
            );
            let w = random_row(GgmlType::F16, n, &mut rng);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            // SAFETY: features checked above.
            unsafe { dequantize_f16(&w, &mut a) };
            scalar::dequantize_f16(&w, &mut b);
            assert_eq!(a, b, "dequantize f16 n={n}");
        }
    }

    /// Inputs with exact .5 ties after scaling, zeros, and a block of all zeros.
    fn tricky(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut x = rng.f32s(n, 4.0);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 11 {
                0 => *v = 0.0,
                3 => *v = (*v * 2.0).round() / 2.0,
                5 => *v = -(*v).abs(),
                _ => {}
            }
        }
        if n >= 64 {
            x[32..64].iter_mut().for_each(|v| *v = 0.0);
        }
        x
    }

    #[test]
    fn quantizers_match_scalar_exactly() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(5);
        for &nb in BLOCK_COUNTS {
            let x = tricky(&mut rng, nb * 32);
            let (mut a, mut b) = (
                vec![BlockQ8_0::default(); nb],
                vec![BlockQ8_0::default(); nb],
            );
            // SAFETY: features checked above.
            unsafe { quantize_row_q8_0(&x, &mut a) };
            scalar::quantize_row_q8_0(&x, &mut b);
            assert_eq!(blocks_as_bytes(&a), blocks_as_bytes(&b), "q8_0 x{nb}");

            let (mut a, mut b) = (
                vec![BlockQ8_1::default(); nb],
                vec![BlockQ8_1::default(); nb],
            );
            // SAFETY: features checked above.
            unsafe { quantize_row_q8_1(&x, &mut a) };
            scalar::quantize_row_q8_1(&x, &mut b);
            assert_eq!(blocks_as_bytes(&a), blocks_as_bytes(&b), "q8_1 x{nb}");

            let mut x = tricky(&mut rng, nb * 256);
            if nb == 3 {
                // Largest magnitude present with both signs: the first one decides.
                x[10] = -7.5;
                x[200] = 7.5;
                x[256..512].iter_mut().for_each(|v| *v = 0.0);
            }
            let (mut a, mut b) = (vec![BlockQ8K::default(); nb], vec![BlockQ8K::default(); nb]);
            // SAFETY: features checked above.
            unsafe { quantize_row_q8_k(&x, &mut a) };
            scalar::quantize_row_q8_k(&x, &mut b);
            for i in 0..nb {
                assert_eq!(a[i].d.to_bits(), b[i].d.to_bits(), "q8_k d x{nb} block {i}");
                assert_eq!(a[i].qs, b[i].qs, "q8_k qs x{nb} block {i}");
                assert_eq!(a[i].bsums, b[i].bsums, "q8_k bsums x{nb} block {i}");
            }
        }
    }
}

#[cfg(test)]
mod tests4 {
    //! The four-row kernels give exactly the single-row results.
    use super::*;
    use crate::testutil::{random_row, Rng};
    use modu_gguf::GgmlType;

    fn acts<B: Clone + Default>(
        rng: &mut Rng,
        n: usize,
        f: unsafe fn(&[f32], &mut [B]),
        bs: usize,
    ) -> Vec<B> {
        let x = rng.f32s(n, 2.0);
        let mut q = vec![B::default(); n / bs];
        // SAFETY: callers check `available()` first.
        unsafe { f(&x, &mut q) };
        q
    }

    macro_rules! check4 {
        ($test:ident, $ty:expr, $blk:ty, $ablk:ty, $quant:ident, $one:ident, $four:ident) => {
            #[test]
            fn $test() {
                if !available() {
                    return;
                }
                let mut rng = Rng::new(77);
                for &nb in &[1usize, 3, 7, 28] {
                    let n = nb * $ty.block_size();
                    let w = random_row($ty, n, &mut rng);
                    let x: &[$blk] = as_blocks(&w).unwrap();
                    let bs = if $ty.block_size() == 32 { 32 } else { 256 };
                    let a: Vec<Vec<$ablk>> =
                        (0..4).map(|_| acts(&mut rng, n, $quant, bs)).collect();
                    // SAFETY: features checked above.
                    let got = unsafe { $four(x, [&a[0], &a[1], &a[2], &a[3]]) };
                    for t in 0..4 {
                        // SAFETY: features checked above.
                        let one = unsafe { $one(x, &a[t]) };
                        assert_eq!(got[t].to_bits(), one.to_bits(), "{} x{nb} row {t}", $ty);
                    }
                }
            }
        };
    }

    check4!(
        dot4_q4_0_is_exact,
        GgmlType::Q4_0,
        BlockQ4_0,
        BlockQ8_0,
        quantize_row_q8_0,
        vec_dot_q4_0_q8_0,
        vec_dot4_q4_0_q8_0
    );
    check4!(
        dot4_q5_0_is_exact,
        GgmlType::Q5_0,
        BlockQ5_0,
        BlockQ8_0,
        quantize_row_q8_0,
        vec_dot_q5_0_q8_0,
        vec_dot4_q5_0_q8_0
    );
    check4!(
        dot4_q8_0_is_exact,
        GgmlType::Q8_0,
        BlockQ8_0,
        BlockQ8_0,
        quantize_row_q8_0,
        vec_dot_q8_0_q8_0,
        vec_dot4_q8_0_q8_0
    );
    check4!(
        dot4_q4_k_is_exact,
        GgmlType::Q4_K,
        BlockQ4K,
        BlockQ8K,
        quantize_row_q8_k,
        vec_dot_q4_k_q8_k,
        vec_dot4_q4_k_q8_k
    );
    check4!(
        dot4_q6_k_is_exact,
        GgmlType::Q6_K,
        BlockQ6K,
        BlockQ8K,
        quantize_row_q8_k,
        vec_dot_q6_k_q8_k,
        vec_dot4_q6_k_q8_k
    );
}

/// AVX2/F16C version of [`crate::scalar::mad_f16`] (same rounding: a fused multiply-add, then
/// one f16 rounding per element).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn mad_f16(acc: &mut [f16], v: &[f16], w: f32) {
    let n = acc.len().min(v.len());
    let ap = acc.as_mut_ptr() as *mut u16;
    let vp = v.as_ptr() as *const u16;
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements exist in both slices; unaligned 16-byte loads/stores.
        let a = _mm256_cvtph_ps(_mm_loadu_si128(ap.add(i) as *const __m128i));
        let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(i) as *const __m128i));
        let r = _mm256_fmadd_ps(x, wv, a);
        _mm_storeu_si128(ap.add(i) as *mut __m128i, _mm256_cvtps_ph::<0>(r));
        i += 8;
    }
    crate::scalar::mad_f16(&mut acc[i..n], &v[i..n], w);
}

/// Eight f16 at `p` (unaligned) widened to f32.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; 16 bytes at `p` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16x8(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// [`vec_dot_f16`] of `k` against each of the `out.len()` rows of `q` (`k.len()` values each),
/// where `q` holds f16 values widened to f32: the same operations in the same order per row, so
/// the same bits, with `k` converted once per pair of rows instead of once per row and `q` not
/// at all (attention of the query heads that share a KV head).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `q.len() >= out.len() * k.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_f16_rows(k: &[f16], q: &[f32], out: &mut [f32]) {
    let d = k.len();
    let rows = out.len();
    debug_assert!(q.len() >= rows * d);
    let kp = k.as_ptr() as *const u16;
    let mut h = 0;
    while h < rows {
        // Rows h and h + 1 (a lone last row is computed twice, stored once).
        let qa = q.as_ptr().add(h * d);
        let qb = if h + 1 < rows { qa.add(d) } else { qa };
        let mut a = [_mm256_setzero_ps(); 4];
        let mut b = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (all loads below): i + width <= d values exist in k and in both q rows;
        // unaligned loads.
        while i + 32 <= d {
            for j in 0..4 {
                let kv = load_f16x8(kp.add(i + 8 * j));
                a[j] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qa.add(i + 8 * j)), a[j]);
                b[j] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qb.add(i + 8 * j)), b[j]);
            }
            i += 32;
        }
        while i + 8 <= d {
            let kv = load_f16x8(kp.add(i));
            a[0] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qa.add(i)), a[0]);
            b[0] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qb.add(i)), b[0]);
            i += 8;
        }
        let mut sa = hsum_ps(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ));
        let mut sb = hsum_ps(_mm256_add_ps(
            _mm256_add_ps(b[0], b[1]),
            _mm256_add_ps(b[2], b[3]),
        ));
        while i < d {
            let kf = k[i].to_f32();
            sa += kf * *qa.add(i);
            sb += kf * *qb.add(i);
            i += 1;
        }
        out[h] = sa;
        if h + 1 < rows {
            out[h + 1] = sb;
        }
        h += 2;
    }
}

/// [`mad_f16`] for each of the `w.len()` rows of `acc` (`v.len()` values each) with its own
/// weight: the same bits, with `v` converted once for all rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `acc.len() >= w.len() * v.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn mad_f16_rows(acc: &mut [f16], v: &[f16], w: &[f32]) {
    let d = v.len();
    debug_assert!(acc.len() >= w.len() * d);
    let ap = acc.as_mut_ptr() as *mut u16;
    let vp = v.as_ptr() as *const u16;
    let mut i = 0;
    // 32 values of v per pass over the rows (four vectors kept converted), then 8.
    while i + 32 <= d {
        // SAFETY: i + 32 <= d values exist in v and in every row of acc; unaligned 16-byte
        // loads/stores.
        let x = [
            load_f16x8(vp.add(i)),
            load_f16x8(vp.add(i + 8)),
            load_f16x8(vp.add(i + 16)),
            load_f16x8(vp.add(i + 24)),
        ];
        for (h, &wh) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(wh);
            let p = ap.add(h * d + i);
            for (j, &xj) in x.iter().enumerate() {
                let a = load_f16x8(p.add(8 * j));
                let r = _mm256_fmadd_ps(xj, wv, a);
                _mm_storeu_si128(p.add(8 * j) as *mut __m128i, _mm256_cvtps_ph::<0>(r));
            }
        }
        i += 32;
    }
    while i + 8 <= d {
        // SAFETY: as above, for 8 values.
        let x = load_f16x8(vp.add(i));
        for (h, &wh) in w.iter().enumerate() {
            let p = ap.add(h * d + i);
            let r = _mm256_fmadd_ps(x, _mm256_set1_ps(wh), load_f16x8(p));
            _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<0>(r));
        }
        i += 8;
    }
    if i < d {
        for (h, &wh) in w.iter().enumerate() {
            crate::scalar::mad_f16(&mut acc[h * d + i..(h + 1) * d], &v[i..], wh);
        }
    }
}

/// AVX2/F16C version of [`crate::scalar::scale_f16`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scale_f16(acc: &mut [f16], s: f32) {
    let n = acc.len();
    let ap = acc.as_mut_ptr() as *mut u16;
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements exist; unaligned 16-byte loads/stores.
        let a = _mm256_cvtph_ps(_mm_loadu_si128(ap.add(i) as *const __m128i));
        _mm_storeu_si128(
            ap.add(i) as *mut __m128i,
            _mm256_cvtps_ph::<0>(_mm256_mul_ps(a, sv)),
        );
        i += 8;
    }
    crate::scalar::scale_f16(&mut acc[i..], s);
}

#[cfg(test)]
mod tests_f16ops {
    use super::*;

    /// A reproducible stream of values in [-2, 2) (a 64-bit LCG).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        }
    }

    #[test]
    fn mad_and_scale_f16_match_scalar() {
        if !available() {
            return;
        }
        let mut rnd = uniform(12345);
        for n in [0usize, 1, 7, 8, 9, 64, 255, 256] {
            let v: Vec<f16> = (0..n).map(|_| f16::from_f32(rnd())).collect();
            let a0: Vec<f16> = (0..n).map(|_| f16::from_f32(rnd())).collect();
            let w = rnd();
            let (mut a1, mut a2) = (a0.clone(), a0.clone());
            crate::scalar::mad_f16(&mut a1, &v, w);
            // SAFETY: available() checked above.
            unsafe { mad_f16(&mut a2, &v, w) };
            assert_eq!(a1, a2, "mad_f16 n={n}");
            crate::scalar::scale_f16(&mut a1, 0.37);
            // SAFETY: as above.
            unsafe { scale_f16(&mut a2, 0.37) };
            assert_eq!(a1, a2, "scale_f16 n={n}");
        }
    }

    #[test]
    fn row_batched_f16_ops_give_the_bits_of_the_single_row_ones() {
        if !available() {
            return;
        }
        let mut rnd = uniform(777);
        for d in [1usize, 7, 8, 31, 32, 40, 64, 100, 256] {
            for rows in 1..=5 {
                let k: Vec<f16> = (0..d).map(|_| f16::from_f32(rnd())).collect();
                let q16: Vec<f16> = (0..rows * d).map(|_| f16::from_f32(rnd())).collect();
                let q: Vec<f32> = q16.iter().map(|v| v.to_f32()).collect();
                let mut got = vec![f32::NAN; rows];
                // SAFETY: available() checked above; q holds rows × d values.
                unsafe { vec_dot_f16_rows(&k, &q, &mut got) };
                for h in 0..rows {
                    let kb: Vec<u8> = k.iter().flat_map(|v| v.to_le_bytes()).collect();
                    // SAFETY: as above.
                    let want = unsafe { vec_dot_f16(&kb, &q16[h * d..(h + 1) * d]) };
                    assert_eq!(
                        got[h].to_bits(),
                        want.to_bits(),
                        "dot d={d} rows={rows} h={h}"
                    );
                }
                let w: Vec<f32> = (0..rows).map(|_| rnd()).collect();
                let a0: Vec<f16> = (0..rows * d).map(|_| f16::from_f32(rnd())).collect();
                let mut a1 = a0.clone();
                // SAFETY: as above; acc holds rows × d values.
                unsafe { mad_f16_rows(&mut a1, &k, &w) };
                for h in 0..rows {
                    let mut a2 = a0[h * d..(h + 1) * d].to_vec();
                    // SAFETY: as above.
                    unsafe { mad_f16(&mut a2, &k, w[h]) };
                    assert_eq!(
                        a1[h * d..(h + 1) * d],
                        a2[..],
                        "mad d={d} rows={rows} h={h}"
                    );
                }
            }
        }
    }
}

/// `out[r] = vec_dot_f16_tiny(w[r*k..(r+1)*k], x)` for every row, `k = x.len()` (see
/// [`crate::scalar::vec_dot_f16_tiny`]: one 8-lane FMA accumulator per output, then `hsum_ps`,
/// whose order is tinyBLAS's).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w.len() >= out.len() * x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matvec_f16_tiny(w: &[f16], x: &[f16], out: &mut [f32]) {
    let k = x.len();
    let full = k / 8 * 8;
    let xp = x.as_ptr() as *const u16;
    let ld = |p: *const u16, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i));
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w[r * k..(r + 1) * k];
        let wp = row.as_ptr() as *const u16;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 8 <= full <= k, the length of both `row` and `x`; unaligned loads.
        while i < full {
            acc = _mm256_fmadd_ps(ld(wp, i), ld(xp, i), acc);
            i += 8;
        }
        let mut s = hsum_ps(acc);
        for j in full..k {
            s += row[j].to_f32() * x[j].to_f32();
        }
        *o = s;
    }
}

/// 8×8 transpose of f32: `out[j]` lane `i` = `v[i]` lane `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn transpose8_ps(v: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
    let u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
    let u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
    let u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
    let u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    [
        _mm256_permute2f128_ps(u0, u4, 0x20),
        _mm256_permute2f128_ps(u1, u5, 0x20),
        _mm256_permute2f128_ps(u2, u6, 0x20),
        _mm256_permute2f128_ps(u3, u7, 0x20),
        _mm256_permute2f128_ps(u0, u4, 0x31),
        _mm256_permute2f128_ps(u1, u5, 0x31),
        _mm256_permute2f128_ps(u2, u6, 0x31),
        _mm256_permute2f128_ps(u3, u7, 0x31),
    ]
}

/// How far ahead [`matvec_f16_ggml`] prefetches its matrix, in bytes.
const LORA_PREFETCH: usize = 2048;

/// `out[r] = vec_dot_f16_ggml(w[r*k..(r+1)*k], x)` for every row, `k = x.len()` (see
/// [`crate::scalar::vec_dot_f16_ggml`]; bit-identical to it).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w.len() >= out.len() * x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matvec_f16_ggml(w: &[f16], x: &[f16], out: &mut [f32]) {
    debug_assert!(w.len() >= out.len() * x.len());
    let k = x.len();
    let np = k / 32 * 32;
    let tail = k - np;
    let xp = x.as_ptr() as *const u16;
    let ld = |p: *const u16, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i));
    // The < 32 tail elements as f32 (conversion is exact), x's once, each row's per row: the
    // tail products are then summed in f64 in order, as ggml does, without a software f16
    // conversion per element (short rows such as LoRA's rank-8 B are all tail).
    let to_f32 = |p: *const u16, src: &[f16], dst: &mut [f32; 32]| {
        let mut j = 0;
        while j + 8 <= tail {
            // SAFETY: np + j + 8 <= k, the length of the source row; unaligned load.
            _mm256_storeu_ps(dst.as_mut_ptr().add(j), ld(p, np + j));
            j += 8;
        }
        while j < tail {
            dst[j] = src[np + j].to_f32();
            j += 1;
        }
    };
    let mut xt = [0f32; 32];
    to_f32(xp, x, &mut xt);
    let mut wt = [0f32; 32];
    // Short rows (k < 32, e.g. LoRA's B at rank 8–16): eight rows at a time, transposed in
    // registers so that each f64 lane sums one row's products in order; the same operations as
    // the per-row loop below (exact f32 product, widened, added in column order), without its
    // one-row-at-a-time chain of dependent f64 additions.
    let mut r0 = 0;
    // The matrix (LoRA's A or B of one module: tens of KiB, read once per step and usually
    // not cached) is streamed with software prefetches: the hardware prefetchers barely ramp
    // up over such short streams (measured: ~6 GB/s over both cores without).
    let wb = w.as_ptr() as *const u8;
    // The lines `off..off + len` bytes into w (a prefetch never faults; `wrapping_add` keeps the
    // address arithmetic defined past the end).
    let prefetch = |off: usize, len: usize| {
        let mut o = 0;
        while o < len {
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(off + o) as *const i8);
            o += 64;
        }
    };
    prefetch(0, (2 * out.len() * k).min(LORA_PREFETCH));
    if np == 0 && k > 0 && k % 8 == 0 {
        // Short rows of a multiple of 8 (LoRA's B at ranks 8, 16, 24): sixteen rows at a
        // time, each row's products added in f64 in column order in its own lane, as below.
        // A product of two f16 is exact in f32 and in f64, so `fma(w, t, sum)` rounds exactly
        // as ggml's `sum += (double)(w·t)`. Per eight rows and eight columns the f16 rows are
        // converted and transposed in registers; two groups of eight rows keep four
        // independent chains of f64 additions in flight (one group's two were latency-bound).
        let mut xd = [0f64; 32];
        for j in 0..k {
            xd[j] = xt[j] as f64;
        }
        let wp = w.as_ptr() as *const u16;
        // Rows r..r+8, columns c0..c0+8 into the two f64 accumulators of those rows.
        let step = |r: usize, c0: usize, lo: &mut __m256d, hi: &mut __m256d| {
            let mut rows8 = [_mm256_setzero_ps(); 8];
            for (i, v) in rows8.iter_mut().enumerate() {
                // SAFETY: row r + i < out.len() and c0 + 8 <= k: inside w (w.len() >=
                // out.len()·k); unaligned load.
                *v = ld(wp, (r + i) * k + c0);
            }
            let cols = transpose8_ps(rows8);
            for (c, col) in cols.iter().enumerate() {
                let t = _mm256_set1_pd(*xd.get_unchecked(c0 + c));
                *lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(*col)), t, *lo);
                *hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(*col, 1)), t, *hi);
            }
        };
        let store = |r: usize, lo: __m256d, hi: __m256d, out: &mut [f32]| {
            // SAFETY: r + 8 <= out.len().
            let v = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
            _mm256_storeu_ps(out.as_mut_ptr().add(r), v);
        };
        while r0 + 8 <= out.len() {
            // The rows LORA_PREFETCH bytes ahead.
            prefetch(2 * r0 * k + LORA_PREFETCH, 32 * k);
            let two = r0 + 16 <= out.len();
            let mut acc = [_mm256_setzero_pd(); 4];
            let mut c0 = 0;
            while c0 < k {
                let [a0, a1, a2, a3] = &mut acc;
                step(r0, c0, a0, a1);
                if two {
                    step(r0 + 8, c0, a2, a3);
                }
                c0 += 8;
            }
            store(r0, acc[0], acc[1], out);
            if two {
                store(r0 + 8, acc[2], acc[3], out);
                r0 += 16;
            } else {
                r0 += 8;
            }
        }
    } else if np == 0 && k > 0 {
        let mut buf = [[0f32; 32]; 8];
        while r0 + 8 <= out.len() {
            // The rows LORA_PREFETCH bytes ahead.
            prefetch(2 * r0 * k + LORA_PREFETCH, 16 * k);
            for (i, b) in buf.iter_mut().enumerate() {
                let row = &w[(r0 + i) * k..(r0 + i + 1) * k];
                to_f32(row.as_ptr() as *const u16, row, b);
            }
            let mut lo = _mm256_setzero_pd();
            let mut hi = _mm256_setzero_pd();
            // One column (eight rows' products) into the two f64 accumulators, in order.
            macro_rules! column {
                ($col:expr, $xv:expr) => {{
                    let p = _mm256_mul_ps($col, _mm256_set1_ps($xv));
                    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
                    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
                }};
            }
            let mut c0 = 0;
            // SAFETY (loads and the store below): c0 + 8 <= 32 as c0 < k < 32 steps by 8, and
            // r0 + 8 <= out.len(); xt holds 32 values.
            while c0 < k {
                let rows8: [__m256; 8] = [
                    _mm256_loadu_ps(buf[0].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[1].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[2].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[3].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[4].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[5].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[6].as_ptr().add(c0)),
                    _mm256_loadu_ps(buf[7].as_ptr().add(c0)),
                ];
                let cols = transpose8_ps(rows8);
                if k - c0 >= 8 {
                    // A whole step of eight columns, unrolled (the transposed columns stay in
                    // registers; a variable trip count sent them and the sums to the stack).
                    column!(cols[0], *xt.get_unchecked(c0));
                    column!(cols[1], *xt.get_unchecked(c0 + 1));
                    column!(cols[2], *xt.get_unchecked(c0 + 2));
                    column!(cols[3], *xt.get_unchecked(c0 + 3));
                    column!(cols[4], *xt.get_unchecked(c0 + 4));
                    column!(cols[5], *xt.get_unchecked(c0 + 5));
                    column!(cols[6], *xt.get_unchecked(c0 + 6));
                    column!(cols[7], *xt.get_unchecked(c0 + 7));
                } else {
                    for (j, col) in cols.iter().enumerate().take(k - c0) {
                        column!(*col, *xt.get_unchecked(c0 + j));
                    }
                }
                c0 += 8;
            }
            let sums = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
            _mm256_storeu_ps(out.as_mut_ptr().add(r0), sums);
            r0 += 8;
        }
    }
    let rows_total = out.len();
    // x's 32-element steps widened once for all rows (exact, so the same products).
    let mut xf = Vec::new();
    if np > 0 && out.len() > r0 {
        xf.resize(np, 0f32);
        let mut i = 0;
        while i < np {
            // SAFETY: i + 8 <= np <= k = x.len(); xf holds np values; unaligned load/store.
            _mm256_storeu_ps(xf.as_mut_ptr().add(i), ld(xp, i));
            i += 8;
        }
    }
    // ggml's reduction of the four 8-lane accumulators of one row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn reduce(acc: [__m256; 4]) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        let t0 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
    }
    // The 32-element steps of rows r and r + 1 side by side: each row's four chains of
    // dependent FMAs are the same as alone, but two rows keep twice as many in flight (one
    // row's chains were latency-bound). Stored for the per-row loop below.
    let mut steps = [0f32; 2];
    let mut paired = usize::MAX;
    for (r, o) in out.iter_mut().enumerate().skip(r0) {
        let row = &w[r * k..(r + 1) * k];
        let wp = row.as_ptr() as *const u16;
        // With no 32-element step the reduction is +0.0 (skipped: the same value).
        let mut sum = 0f64;
        if np > 0 {
            if paired != r {
                // Row r + 1 (at most one past the rows read when r is the last: not read then).
                let wq = wp.wrapping_add(k);
                let two = r + 1 < rows_total;
                let mut a0 = [_mm256_setzero_ps(); 4];
                let mut a1 = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                // SAFETY: i + 32 <= np <= k, the length of row r (and of row r + 1 when `two`:
                // r + 1 < out.len() and w holds out.len() rows); np = xf.len(); unaligned
                // loads.
                while i < np {
                    // Both rows' next bytes, LORA_PREFETCH ahead in the stream.
                    prefetch(2 * (r * k + i) + LORA_PREFETCH, 1);
                    prefetch(2 * ((r + 1) * k + i) + LORA_PREFETCH, 1);
                    for j in 0..4 {
                        let xv = _mm256_loadu_ps(xf.as_ptr().add(i + 8 * j));
                        a0[j] = _mm256_fmadd_ps(ld(wp, i + 8 * j), xv, a0[j]);
                        if two {
                            a1[j] = _mm256_fmadd_ps(ld(wq, i + 8 * j), xv, a1[j]);
                        }
                    }
                    i += 32;
                }
                steps = [reduce(a0), reduce(a1)];
                paired = r + 1;
                sum = steps[0] as f64;
            } else {
                sum = steps[1] as f64;
            }
        }
        to_f32(wp, row, &mut wt);
        for j in 0..tail {
            sum += (wt[j] * xt[j]) as f64;
        }
        *o = sum as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation functions
// ---------------------------------------------------------------------------------------------

/// [`crate::scalar::exp_f32`] on eight lanes, step for step (so bit for bit).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    use crate::scalar::{EXP_MAX, EXP_MIN, EXP_P, LN2_HI, LN2_LO};
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)),
        _mm256_set1_ps(EXP_MAX),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_P[0]);
    for &ci in &EXP_P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ci));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
        _mm256_set1_ps(1.0),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
}

/// [`crate::scalar::silu_mul`] eight lanes at a time (the tail by the scalar function: the same bits).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements of both slices; unaligned loads and stores.
        let x = _mm256_loadu_ps(g.add(i));
        let neg = _mm256_xor_ps(x, _mm256_set1_ps(-0.0));
        let s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(neg)));
        _mm256_storeu_ps(g.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(i))));
        i += 8;
    }
    crate::scalar::silu_mul(&mut gate[i..n], &up[i..n]);
}

#[cfg(test)]
mod activation_tests {
    use super::*;

    #[test]
    fn silu_mul_matches_scalar_bit_for_bit() {
        if !available() {
            return;
        }
        let mut rng = crate::testutil::Rng::new(31);
        // Ordinary magnitudes, large ones past the clamp, signed zeros, and lengths with tails.
        let mut g: Vec<f32> = rng.f32s(1003, 12.0);
        g.extend([
            0.0, -0.0, 87.5, -87.5, 95.0, -95.0, 1e-30, -1e-30, 300.0, -300.0,
        ]);
        let u: Vec<f32> = rng.f32s(g.len(), 3.0);
        for len in [0, 1, 7, 8, 9, g.len()] {
            let mut a = g[..len].to_vec();
            let mut b = a.clone();
            crate::scalar::silu_mul(&mut a, &u);
            // SAFETY: available() checked the CPU features.
            unsafe { silu_mul(&mut b, &u) };
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "len {len} i {i}: {x} vs {y} (g = {})",
                    g[i]
                );
            }
        }
    }
}
