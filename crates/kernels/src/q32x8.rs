//! Matmul of Q5_0 and Q8_0 weights in the interleaved layout ([`Layout::Interleaved8`]) with
//! Q8_0 activations, for every token count.
//!
//! Per group of eight rows and block position, the interleaved block is decoded straight into
//! the eight quant vectors that [`crate::q32`]'s tiled path builds with a decode buffer and an
//! 8×8 transpose: vector `j` holds four consecutive quants of all eight rows, one row per 32-bit
//! lane. Each token then needs one `maddubs` per vector against four broadcast activation
//! bytes, and each row's exact block sum lands in its own lane. The float work is
//! [`crate::q32`]'s `finish`, block by block from the left, so the results are bit-identical to
//! the scalar reference and to the other layouts, for any batch shape.
//!
//! One token (decode) reads the matrix as one sequential stream, eight rows at a time, with the
//! accumulator in a register; more tokens reuse each decoded block for a tile of up to
//! [`TOKEN_TILE`] tokens whose accumulators stay in L1.
//!
//! [`Layout::Interleaved8`]: crate::layout::Layout::Interleaved8

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::blocks::{BlockQ5_0, BlockQ8_0};
use crate::layout::INTERLEAVE;
use crate::q32::{finish, Prepared, Q32Block, PREFETCH_AHEAD};

/// Tokens per pass over a group's blocks (as [`crate::q32`]).
const TOKEN_TILE: usize = 64;

/// A block type with an interleaved layout.
pub(crate) trait X8Block: Q32Block {
    /// Bytes of one interleaved block group.
    const BYTES: usize;
    /// The eight quant vectors of the group at `p` (unsigned quants for the offset types,
    /// signed for Q8_0).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `p` points to `BYTES` readable bytes.
    unsafe fn decode8(p: *const u8) -> [__m256i; INTERLEAVE];
    /// The exact block sums of the eight rows (one i32 lane each, before the offset term) for
    /// the activation quants at `y` (32 bytes). `abs` is `|v|` for Q8_0 (unused otherwise).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `y` points to 32 readable bytes.
    unsafe fn dot8(
        v: &[__m256i; INTERLEAVE],
        abs: &[__m256i; INTERLEAVE],
        y: *const i32,
    ) -> __m256i;
    /// `|v|` where the type needs it ([`X8Block::dot8`]'s sign trick), else `v`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn abs8(v: &[__m256i; INTERLEAVE]) -> [__m256i; INTERLEAVE];
}

impl X8Block for BlockQ5_0 {
    const BYTES: usize = INTERLEAVE * 22;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode8(p: *const u8) -> [__m256i; INTERLEAVE] {
        let m5 = _mm256_set1_epi8(0x10);
        // SAFETY (all loads): inside the group's 176 bytes (scales 0..16, nibbles 16..144,
        // fifth bits 144..176); loadu has no alignment requirement.
        let qs = p.add(2 * INTERLEAVE) as *const __m256i;
        let h = _mm256_loadu_si256(p.add(2 * INTERLEAVE + 128) as *const __m256i);
        let n0 = _mm256_loadu_si256(qs);
        let n1 = _mm256_loadu_si256(qs.add(1));
        let n2 = _mm256_loadu_si256(qs.add(2));
        let n3 = _mm256_loadu_si256(qs.add(3));
        // Bit k of each byte of `h` belongs to vector k: moved to bit 4 by a 16-bit shift of
        // at most 4 (the bits that cross into the neighbouring byte are masked off). (Plain
        // functions, not closures, so that they get this function's target features.)
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn lo(n: __m256i) -> __m256i {
            _mm256_and_si256(n, _mm256_set1_epi8(0x0F))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn hi(n: __m256i) -> __m256i {
            _mm256_and_si256(_mm256_srli_epi16::<4>(n), _mm256_set1_epi8(0x0F))
        }
        [
            _mm256_or_si256(lo(n0), _mm256_and_si256(_mm256_slli_epi16::<4>(h), m5)),
            _mm256_or_si256(lo(n1), _mm256_and_si256(_mm256_slli_epi16::<3>(h), m5)),
            _mm256_or_si256(lo(n2), _mm256_and_si256(_mm256_slli_epi16::<2>(h), m5)),
            _mm256_or_si256(lo(n3), _mm256_and_si256(_mm256_slli_epi16::<1>(h), m5)),
            _mm256_or_si256(hi(n0), _mm256_and_si256(h, m5)),
            _mm256_or_si256(hi(n1), _mm256_and_si256(_mm256_srli_epi16::<1>(h), m5)),
            _mm256_or_si256(hi(n2), _mm256_and_si256(_mm256_srli_epi16::<2>(h), m5)),
            _mm256_or_si256(hi(n3), _mm256_and_si256(_mm256_srli_epi16::<3>(h), m5)),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn abs8(v: &[__m256i; INTERLEAVE]) -> [__m256i; INTERLEAVE] {
        *v
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8(
        v: &[__m256i; INTERLEAVE],
        _abs: &[__m256i; INTERLEAVE],
        y: *const i32,
    ) -> __m256i {
        // u <= 31, |y| <= 127: four `maddubs` pair sums (each <= 2·31·127) fit an i16.
        let ones = _mm256_set1_epi16(1);
        let mut s = [_mm256_setzero_si256(); 2];
        for half in 0..2 {
            let mut s16 = _mm256_setzero_si256();
            for j in 4 * half..4 * half + 4 {
                // SAFETY: y points to 8 readable i32 (caller).
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(v[j], broadcast4(y, j)));
            }
            s[half] = _mm256_madd_epi16(s16, ones);
        }
        _mm256_add_epi32(s[0], s[1])
    }
}

impl X8Block for BlockQ8_0 {
    const BYTES: usize = INTERLEAVE * 34;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode8(p: *const u8) -> [__m256i; INTERLEAVE] {
        // SAFETY: the eight vectors are bytes 16..272 of the group; loadu is unaligned.
        let qs = p.add(2 * INTERLEAVE) as *const __m256i;
        let mut v = [_mm256_setzero_si256(); INTERLEAVE];
        for j in 0..INTERLEAVE {
            v[j] = _mm256_loadu_si256(qs.add(j));
        }
        v
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn abs8(v: &[__m256i; INTERLEAVE]) -> [__m256i; INTERLEAVE] {
        let mut a = [_mm256_setzero_si256(); INTERLEAVE];
        for j in 0..INTERLEAVE {
            // |q| as an unsigned byte (also right for -128).
            a[j] = _mm256_sign_epi8(v[j], v[j]);
        }
        a
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8(
        v: &[__m256i; INTERLEAVE],
        abs: &[__m256i; INTERLEAVE],
        y: *const i32,
    ) -> __m256i {
        // q·y = |q|·(sign(q)·y); a pair sum reaches 2·128·127, so each is widened at once.
        let ones = _mm256_set1_epi16(1);
        let mut s = _mm256_setzero_si256();
        for j in 0..INTERLEAVE {
            // SAFETY: y points to 8 readable i32 (caller).
            let p = _mm256_maddubs_epi16(abs[j], _mm256_sign_epi8(broadcast4(y, j), v[j]));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
        }
        s
    }
}

/// The block group at `p` ready to multiply: its eight scales as f32, its quant vectors and
/// their [`X8Block::abs8`]. Also prefetches the stream [`PREFETCH_AHEAD`] bytes past `p` (one
/// group's worth of lines; a prefetch never faults, so addresses past the matrix are harmless,
/// and `wrapping_add` keeps the pointer arithmetic defined).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p` points to `W::BYTES` readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_group<W: X8Block>(
    p: *const u8,
) -> (__m256, [__m256i; INTERLEAVE], [__m256i; INTERLEAVE]) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    let mut off = 0;
    while off < W::BYTES {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
        off += 64;
    }
    // SAFETY: the eight f16 scales are the group's first 16 bytes; loadu is unaligned.
    let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let v = W::decode8(p);
    let a = W::abs8(&v);
    (dw, v, a)
}

/// Activation bytes `4j..4j+4` of a block broadcast to every 32-bit lane.
///
/// # Safety
/// The CPU must support AVX2; `y` points to 8 readable i32 and `j < 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast4(y: *const i32, j: usize) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(y.add(j)))
}

/// Outputs of weight rows `r0..r1` (multiples of 8) of an interleaved matrix for all
/// `n_tokens` activation rows; `y[t * rows + r]` receives token `t`'s result for row `r`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `data` holds whole groups of eight rows of `nb`
/// blocks in [`W`]'s interleaved layout, at least `r1` rows; `r0 < r1`, both multiples of 8;
/// `act.len() == n_tokens * nb`; `prep` was prepared from `act` with `W`; `y` points to
/// `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread accesses rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<W: X8Block>(
    data: &[u8],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8_0],
    prep: &Prepared,
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    debug_assert!(r0 < r1 && r0 % INTERLEAVE == 0 && r1 % INTERLEAVE == 0);
    debug_assert!(data.len() >= r1 / INTERLEAVE * nb * W::BYTES);
    debug_assert!(act.len() == n_tokens * nb);
    let group_bytes = nb * W::BYTES;
    // One accumulator per token of a tile (lane = row), set up once per call: zeroing all of
    // them for every group of rows cost ~3 % of a batched step.
    let mut acc = [_mm256_setzero_ps(); TOKEN_TILE];
    let mut g = r0;
    while g < r1 {
        // SAFETY: group g / 8 lies inside data (r1 <= the matrix's rows).
        let base = data.as_ptr().add(g / INTERLEAVE * group_bytes);
        if n_tokens == 1 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: block group b of this row group lies inside data.
                let (dw, v, a) = load_group::<W>(base.add(b * W::BYTES));
                // SAFETY: b < nb == act.len(); qs is 32 bytes.
                let s = W::dot8(&v, &a, act.get_unchecked(b).qs.as_ptr() as *const i32);
                finish::<W>(s, dw, prep, b, &mut acc);
            }
            // SAFETY: rows g..g + 8 <= r1 <= rows of token 0, owned by this task.
            _mm256_storeu_ps(y.add(g), acc);
        } else {
            let mut t0 = 0;
            while t0 < n_tokens {
                let t1 = (t0 + TOKEN_TILE).min(n_tokens);
                for a in &mut acc[..t1 - t0] {
                    *a = _mm256_setzero_ps();
                }
                for b in 0..nb {
                    // SAFETY: block group b of this row group lies inside data.
                    let (dw, v, a) = load_group::<W>(base.add(b * W::BYTES));
                    for t in t0..t1 {
                        let kk = t * nb + b;
                        // SAFETY: t < n_tokens, so kk < act.len() (and prep's arrays).
                        let s = W::dot8(&v, &a, act.get_unchecked(kk).qs.as_ptr() as *const i32);
                        finish::<W>(s, dw, prep, kk, acc.get_unchecked_mut(t - t0));
                    }
                }
                for t in t0..t1 {
                    // SAFETY: t < n_tokens and rows g..g + 8 <= rows, owned by this task.
                    _mm256_storeu_ps(y.add(t * rows + g), acc[t - t0]);
                }
                t0 = t1;
            }
        }
        g += INTERLEAVE;
    }
}
