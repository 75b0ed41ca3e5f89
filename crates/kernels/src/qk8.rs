//! Matmul of Q4_K and Q6_K weights in the interleaved layout ([`Layout::Interleaved8`]) with
//! Q8_K activations, for every token count.
//!
//! Per group of eight rows and super-block, the interleaved block is decoded once into 64
//! quant vectors (vector `k`: elements `4k..4k+4` of all eight rows, one row per 32-bit lane)
//! and per-row scale vectors; each token then needs one `maddubs` per vector against four
//! broadcast activation bytes, and each row's sums land in its own lane. In ggml's layout the
//! tiled GEMM of [`crate::gemm`] spent, per 32 products of one row and one token, a `maddubs`,
//! a `madd` with the scale, an add and loads, plus a horizontal sum per row, token and
//! super-block.
//!
//! The results are bit-identical to the dot kernels of [`crate::x86`] (and so to every other
//! path, for any batch shape):
//! * Q6_K: the exact integer sum of a super-block (products scaled per sub-block, less
//!   `32·Σ sc·bsum`), then one fused multiply-add `acc = (d_y·d_w)·isum + acc` per super-block.
//!   Here two `maddubs` results of a sub-block are added in i16 first (a pair sum is at most
//!   2·63·128, two of them fit).
//! * Q4_K: ggml's AVX2 arrangement, eight partial sums per row: partial `l` takes elements
//!   `32g + 4l..32g + 4l + 4` of every sub-block `g` (which here is quant vector `8g + l`), is
//!   scaled into a float partial by a fused multiply-add per super-block, and the eight float
//!   partials are added at the end in `hsum_ps`'s order; the mins term is its own exact
//!   integer per super-block, accumulated as `mins += (d_y·dmin_w)·msum`.
//!
//! [`Layout::Interleaved8`]: crate::layout::Layout::Interleaved8

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::blocks::BlockQ8K;
use crate::layout::INTERLEAVE;
use crate::q32::PREFETCH_AHEAD;

/// Bytes of one interleaved Q4_K block group (eight rows, one super-block).
pub(crate) const Q4K_GROUP: usize = INTERLEAVE * 144;
/// Bytes of one interleaved Q6_K block group.
pub(crate) const Q6K_GROUP: usize = INTERLEAVE * 210;

/// Tokens per pass over a group's super-blocks: their accumulators stay in L1.
const TOKEN_TILE: usize = 16;

/// Activation bytes `4k..4k+4` of a Q8_K block broadcast to every 32-bit lane.
///
/// # Safety
/// The CPU must support AVX2; `k < 64`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast4(b: &BlockQ8K, k: usize) -> __m256i {
    // SAFETY: 4k + 4 <= 256 bytes of qs; read_unaligned has no alignment requirement.
    _mm256_set1_epi32(std::ptr::read_unaligned(
        b.qs.as_ptr().add(4 * k) as *const i32
    ))
}

/// Prefetches the weight stream [`PREFETCH_AHEAD`] bytes past `p`, `bytes` worth of lines (a
/// prefetch never faults, and `wrapping_add` keeps the address arithmetic defined).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    let mut off = 0;
    while off < bytes {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
        off += 64;
    }
}

/// A Q6_K block group ready to multiply.
pub(crate) struct DecQ6K {
    /// Unsigned quants (0..=63), vector `k` = elements `4k..4k+4` of the eight rows.
    pub(crate) q: [__m256i; 64],
    /// Sub-block `j`'s scale of each row, as an i16 pair per lane (for `madd`).
    pub(crate) sv: [__m256i; 16],
    /// Scales of sub-blocks `2m` and `2m + 1` of each row, an i16 pair per lane (for the
    /// `bsums` term).
    pub(crate) sp: [__m256i; 8],
    /// `d` of each row.
    pub(crate) dw: __m256,
}

/// Decodes the interleaved Q6_K block group at `p` (layout: [`crate::layout`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p` points to [`Q6K_GROUP`] readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_q6k(p: *const u8, dec: &mut DecQ6K) {
    // SAFETY (all loads): inside the group's 1680 bytes: d 0..16, scales 16..144, ql
    // 144..1168, qh 1168..1680; the unaligned load intrinsics accept any address.
    dec.dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let sc = p.add(16);
    for j in 0..16 {
        let s = _mm_cvtepi8_epi16(_mm_loadl_epi64(sc.add(8 * j) as *const __m128i));
        dec.sv[j] = _mm256_set_m128i(_mm_unpackhi_epi16(s, s), _mm_unpacklo_epi16(s, s));
    }
    for m in 0..8 {
        let a = _mm_loadl_epi64(sc.add(16 * m) as *const __m128i);
        let b = _mm_loadl_epi64(sc.add(16 * m + 8) as *const __m128i);
        dec.sp[m] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
    }
    let (ql, qh) = (p.add(144) as *const __m256i, p.add(1168) as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    for c in 0..16 {
        // Vector c + 16m has its high bits at bits 2m..2m+2 of qh chunk c (moved to bits 4..6;
        // what a 16-bit shift carries over from the neighbouring byte is masked off), and its
        // low bits in the low (m < 2) or high nibble of ql chunk (c + 16m) % 32.
        let h = _mm256_loadu_si256(qh.add(c));
        let l0 = _mm256_loadu_si256(ql.add(c));
        let l1 = _mm256_loadu_si256(ql.add(c + 16));
        let hi = [
            _mm256_and_si256(_mm256_slli_epi16::<4>(h), m30),
            _mm256_and_si256(_mm256_slli_epi16::<2>(h), m30),
            _mm256_and_si256(h, m30),
            _mm256_and_si256(_mm256_srli_epi16::<2>(h), m30),
        ];
        dec.q[c] = _mm256_or_si256(_mm256_and_si256(l0, m4), hi[0]);
        dec.q[c + 16] = _mm256_or_si256(_mm256_and_si256(l1, m4), hi[1]);
        dec.q[c + 32] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), hi[2]);
        dec.q[c + 48] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), hi[3]);
    }
}

/// The exact integer sums of a decoded Q6_K group against one token's block (one per row).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(dec: &DecQ6K, y: &BlockQ8K) -> __m256i {
    let mut s = [_mm256_setzero_si256(); 2];
    for j in 0..16 {
        let k = 4 * j;
        let p0 = _mm256_add_epi16(
            _mm256_maddubs_epi16(dec.q[k], broadcast4(y, k)),
            _mm256_maddubs_epi16(dec.q[k + 1], broadcast4(y, k + 1)),
        );
        let p1 = _mm256_add_epi16(
            _mm256_maddubs_epi16(dec.q[k + 2], broadcast4(y, k + 2)),
            _mm256_maddubs_epi16(dec.q[k + 3], broadcast4(y, k + 3)),
        );
        let p = _mm256_add_epi32(
            _mm256_madd_epi16(p0, dec.sv[j]),
            _mm256_madd_epi16(p1, dec.sv[j]),
        );
        s[j % 2] = _mm256_add_epi32(s[j % 2], p);
    }
    // The stored quants are q + 32: take 32·Σ_j sc_j·bsum_j off.
    let bs = y.bsums.as_ptr() as *const i32;
    let mut o = _mm256_setzero_si256();
    for m in 0..8 {
        // SAFETY: bsums is 16 i16, i.e. 8 i32 words (read unaligned).
        let pair = _mm256_set1_epi32(std::ptr::read_unaligned(bs.add(m)));
        o = _mm256_add_epi32(o, _mm256_madd_epi16(dec.sp[m], pair));
    }
    _mm256_sub_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_slli_epi32::<5>(o))
}

/// A Q4_K block group ready to multiply.
pub(crate) struct DecQ4K {
    /// Unsigned quants (0..=15), vector `k` = elements `4k..4k+4` of the eight rows.
    pub(crate) q: [__m256i; 64],
    /// Sub-block `g`'s scale of each row, as an i16 pair per lane.
    pub(crate) sv: [__m256i; 8],
    /// Mins of sub-blocks `2i` and `2i + 1` of each row, an i16 pair per lane.
    pub(crate) mp: [__m256i; 4],
    pub(crate) dw: __m256,
    pub(crate) dmin: __m256,
    /// [`q4k_picks`], made once.
    picks: [__m256i; 6],
}

/// `vpshufb` mask putting byte `b` of every 32-bit lane into both i16 halves of the lane
/// (zero-extended), or bytes `b` and `b + 1` when `pair`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane_pick(b: i8, pair: bool) -> __m256i {
    let b2 = if pair { b + 1 } else { b };
    let z = -128i8; // a set top bit makes vpshufb write zero
    let w = |o: i8| [b + o, z, b2 + o, z];
    let m: [i8; 16] = {
        let mut m = [0i8; 16];
        for l in 0..4 {
            m[4 * l..4 * l + 4].copy_from_slice(&w(4 * l as i8));
        }
        m
    };
    // SAFETY: m is 16 bytes.
    _mm256_broadcastsi128_si256(_mm_loadu_si128(m.as_ptr() as *const __m128i))
}

/// Decodes the interleaved Q4_K block group at `p` (layout: [`crate::layout`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p` points to [`Q4K_GROUP`] readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_q4k(p: *const u8, dec: &mut DecQ4K) {
    let picks = dec.picks;
    // SAFETY (all loads): inside the group's 1152 bytes: d 0..16, dmin 16..32, scale words
    // 32..128, quants 128..1152; the unaligned load intrinsics accept any address.
    dec.dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    dec.dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
    // The 12 packed scale bytes of each row as three words, one lane per row: the same
    // unpacking as `x86::k4_scales_mins`, eight rows at once.
    let u0 = _mm256_loadu_si256(p.add(32) as *const __m256i);
    let u1 = _mm256_loadu_si256(p.add(64) as *const __m256i);
    let u2 = _mm256_loadu_si256(p.add(96) as *const __m256i);
    let m6 = _mm256_set1_epi32(0x3F3F_3F3F);
    let m4w = _mm256_set1_epi32(0x0F0F_0F0F);
    let m2w = _mm256_set1_epi32(0x0303_0303);
    let sc_lo = _mm256_and_si256(u0, m6);
    let m_lo = _mm256_and_si256(u1, m6);
    let sc_hi = _mm256_or_si256(
        _mm256_and_si256(u2, m4w),
        _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(u0), m2w)),
    );
    let m_hi = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32::<4>(u2), m4w),
        _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(u1), m2w)),
    );
    for g in 0..4 {
        dec.sv[g] = _mm256_shuffle_epi8(sc_lo, picks[g]);
        dec.sv[g + 4] = _mm256_shuffle_epi8(sc_hi, picks[g]);
    }
    dec.mp[0] = _mm256_shuffle_epi8(m_lo, picks[4]);
    dec.mp[1] = _mm256_shuffle_epi8(m_lo, picks[5]);
    dec.mp[2] = _mm256_shuffle_epi8(m_hi, picks[4]);
    dec.mp[3] = _mm256_shuffle_epi8(m_hi, picks[5]);
    let qs = p.add(128) as *const __m256i;
    let m4 = _mm256_set1_epi8(0x0F);
    for c in 0..32 {
        let v = _mm256_loadu_si256(qs.add(c));
        dec.q[c] = _mm256_and_si256(v, m4);
        dec.q[c + 32] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    }
}

/// The `vpshufb` masks of [`decode_q4k`]: scale byte `g` (0..4) as an i16 pair, and the min
/// byte pairs (0, 1) and (2, 3).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_picks() -> [__m256i; 6] {
    [
        lane_pick(0, false),
        lane_pick(1, false),
        lane_pick(2, false),
        lane_pick(3, false),
        lane_pick(0, true),
        lane_pick(2, true),
    ]
}

/// A decoded Q4_K group against one token's block: the eight partial integer sums of each row
/// (see the module docs) and the exact `Σ_g m_g·(bsums[2g] + bsums[2g + 1])` of each row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k(dec: &DecQ4K, y: &BlockQ8K) -> ([__m256i; 8], __m256i) {
    let mut part = [_mm256_setzero_si256(); 8];
    for g in 0..8 {
        for l in 0..8 {
            let k = 8 * g + l;
            let p = _mm256_maddubs_epi16(dec.q[k], broadcast4(y, k));
            part[l] = _mm256_add_epi32(part[l], _mm256_madd_epi16(p, dec.sv[g]));
        }
    }
    // SAFETY: bsums is 16 i16 = 32 bytes; two unaligned 16-byte loads stay inside it.
    let lo = _mm_loadu_si128(y.bsums.as_ptr() as *const __m128i);
    let hi = _mm_loadu_si128(y.bsums.as_ptr().add(8) as *const __m128i);
    // The eight sub-block sums (|v| <= 2·16·128), pairs of them per 32-bit word.
    let sums = _mm256_broadcastsi128_si256(_mm_hadd_epi16(lo, hi));
    let m = _mm256_add_epi32(
        _mm256_add_epi32(
            _mm256_madd_epi16(dec.mp[0], _mm256_shuffle_epi32::<0x00>(sums)),
            _mm256_madd_epi16(dec.mp[1], _mm256_shuffle_epi32::<0x55>(sums)),
        ),
        _mm256_add_epi32(
            _mm256_madd_epi16(dec.mp[2], _mm256_shuffle_epi32::<0xAA>(sums)),
            _mm256_madd_epi16(dec.mp[3], _mm256_shuffle_epi32::<0xFF>(sums)),
        ),
    );
    (part, m)
}

/// A K-quant type of this module: its decoded block group (also the decode scratch) and what
/// one token accumulates over a row group's super-blocks.
pub(crate) trait KGroup {
    /// Bytes of one interleaved block group (eight rows, one super-block).
    const BYTES: usize;
    /// One token's accumulator for a group of eight rows.
    type Acc: Copy;
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn new() -> Self;
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn zero() -> Self::Acc;
    /// Decodes the block group at `p`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `p` points to `BYTES` readable bytes.
    unsafe fn decode(&mut self, p: *const u8);
    /// Adds the decoded super-block times `y` (the token's block at the same position).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn accumulate(&self, y: &BlockQ8K, acc: &mut Self::Acc);
    /// The eight rows' outputs.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn result(acc: &Self::Acc) -> __m256;
}

impl KGroup for DecQ6K {
    const BYTES: usize = Q6K_GROUP;
    type Acc = __m256;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn new() -> Self {
        DecQ6K {
            q: [_mm256_setzero_si256(); 64],
            sv: [_mm256_setzero_si256(); 16],
            sp: [_mm256_setzero_si256(); 8],
            dw: _mm256_setzero_ps(),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&mut self, p: *const u8) {
        decode_q6k(p, self)
    }
    /// `acc = (d_y·d_w)·isum + acc`, one FMA per super-block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate(&self, y: &BlockQ8K, acc: &mut __m256) {
        let isum = dot_q6k(self, y);
        let d = _mm256_mul_ps(_mm256_set1_ps(y.d), self.dw);
        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), *acc);
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn result(acc: &__m256) -> __m256 {
        *acc
    }
}

impl KGroup for DecQ4K {
    const BYTES: usize = Q4K_GROUP;
    /// The eight float partials and the mins sum.
    type Acc = ([__m256; 8], __m256);
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn new() -> Self {
        DecQ4K {
            q: [_mm256_setzero_si256(); 64],
            sv: [_mm256_setzero_si256(); 8],
            mp: [_mm256_setzero_si256(); 4],
            dw: _mm256_setzero_ps(),
            dmin: _mm256_setzero_ps(),
            picks: q4k_picks(),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero() -> Self::Acc {
        ([_mm256_setzero_ps(); 8], _mm256_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&mut self, p: *const u8) {
        decode_q4k(p, self)
    }
    /// Per partial `acc = (d_y·d_w)·part + acc`; `mins += (d_y·dmin_w)·msum`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn accumulate(&self, y: &BlockQ8K, (acc, mins): &mut Self::Acc) {
        let (part, msum) = dot_q4k(self, y);
        let dy = _mm256_set1_ps(y.d);
        let d = _mm256_mul_ps(dy, self.dw);
        for l in 0..8 {
            acc[l] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(part[l]), acc[l]);
        }
        let dm = _mm256_mul_ps(dy, self.dmin);
        *mins = _mm256_add_ps(*mins, _mm256_mul_ps(dm, _mm256_cvtepi32_ps(msum)));
    }
    /// `hsum_ps`'s order, ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)), less the mins.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn result((a, mins): &Self::Acc) -> __m256 {
        let s = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
            _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])),
        );
        _mm256_sub_ps(s, *mins)
    }
}

/// Outputs of weight rows `r0..r1` (multiples of 8) of an interleaved Q4_K (`K = DecQ4K`) or
/// Q6_K (`K = DecQ6K`) matrix for all `n_tokens` activation rows; `y[t * rows + r]` receives
/// token `t`'s result for row `r`. Each group of eight rows is decoded super-block by
/// super-block, once per tile of [`TOKEN_TILE`] tokens.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `data` holds whole groups of eight rows of `nb`
/// super-blocks in `K`'s interleaved layout, at least `r1` rows; `r0 < r1`, both multiples of
/// 8; `act.len() == n_tokens * nb`; `y` points to `n_tokens * rows` writable f32 with
/// `r1 <= rows`, and no other thread accesses rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<K: KGroup>(
    data: &[u8],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8K],
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    debug_assert!(r0 < r1 && r0 % INTERLEAVE == 0 && r1 % INTERLEAVE == 0);
    debug_assert!(data.len() >= r1 / INTERLEAVE * nb * K::BYTES);
    debug_assert!(act.len() == n_tokens * nb);
    let group_bytes = nb * K::BYTES;
    let mut dec = K::new();
    let mut acc = [K::zero(); TOKEN_TILE];
    for g in (r0..r1).step_by(INTERLEAVE) {
        // SAFETY: group g / 8 lies inside data (r1 <= the matrix's rows).
        let base = data.as_ptr().add(g / INTERLEAVE * group_bytes);
        let mut t0 = 0;
        while t0 < n_tokens {
            let t1 = (t0 + TOKEN_TILE).min(n_tokens);
            for a in &mut acc[..t1 - t0] {
                *a = K::zero();
            }
            for b in 0..nb {
                let p = base.add(b * K::BYTES);
                prefetch(p, K::BYTES);
                // SAFETY: block group b of this row group lies inside data.
                dec.decode(p);
                for t in t0..t1 {
                    // SAFETY: t < n_tokens, so t * nb + b < act.len(); t - t0 < TOKEN_TILE.
                    let blk = act.get_unchecked(t * nb + b);
                    dec.accumulate(blk, acc.get_unchecked_mut(t - t0));
                }
            }
            for t in t0..t1 {
                // SAFETY: t < n_tokens and rows g..g + 8 <= rows, owned by this task.
                _mm256_storeu_ps(y.add(t * rows + g), K::result(&acc[t - t0]));
            }
            t0 = t1;
        }
    }
}
