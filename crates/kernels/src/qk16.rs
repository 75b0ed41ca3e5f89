//! AVX-512 matmul of interleaved Q4_K and Q6_K weights ([`Layout::Interleaved8`]) with Q8_K
//! activations, for two or more tokens (prefill, batched decode); one token stays on
//! [`crate::qk8`]'s AVX2 kernel, which is bound by memory.
//!
//! Two neighbouring groups of eight rows are decoded by [`crate::qk8`]'s decoders and joined,
//! rows `g..g+8` in the low and `g+8..g+16` in the high 256 bits of every vector, so each
//! instruction serves sixteen rows. Per 32-bit lane the work is [`crate::qk8`]'s, with the
//! `madd` by the sub-block scale and the following 32-bit add fused into one `vpdpwssd`
//! (AVX-512 VNNI). The integer sums are the same exact integers (wrapping 32-bit additions
//! in another order give the same result), and the float work is the same operations in the
//! same order lane by lane, so every output has the bits of the AVX2 dot kernels in
//! [`crate::x86`], for any batch shape.
//!
//! [`Layout::Interleaved8`]: crate::layout::Layout::Interleaved8

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::avx512::join;
use crate::blocks::BlockQ8K;
use crate::layout::INTERLEAVE;
use crate::qk8::{DecQ4K, DecQ6K, KGroup};

/// Tokens per pass over a row pair's super-blocks: their accumulators stay in L1.
const TOKEN_TILE: usize = 16;

/// [`join`] for float vectors.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn join_ps(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castsi512_ps(join(_mm256_castps_si256(lo), _mm256_castps_si256(hi)))
}

/// Activation bytes `4k..4k+4` of a Q8_K block broadcast to every 32-bit lane.
///
/// # Safety
/// The CPU must support AVX-512F; `k < 64`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn broadcast4(b: &BlockQ8K, k: usize) -> __m512i {
    // SAFETY: 4k + 4 <= 256 bytes of qs; read_unaligned has no alignment requirement.
    _mm512_set1_epi32(std::ptr::read_unaligned(
        b.qs.as_ptr().add(4 * k) as *const i32
    ))
}

/// A K-quant type with a sixteen-row AVX-512 path: its joined decoded group and what one token
/// accumulates over a row pair's super-blocks.
pub(crate) trait KGroup16 {
    /// The AVX2 decoded group of eight rows.
    type Half: KGroup;
    type Acc: Copy;
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C (also for the methods).
    unsafe fn new() -> Self;
    unsafe fn zero() -> Self::Acc;
    /// Rows of `lo` below, rows of `hi` above.
    unsafe fn join(&mut self, lo: &Self::Half, hi: &Self::Half);
    /// Adds the joined super-block times `y` (the token's block at the same position).
    unsafe fn accumulate(&self, y: &BlockQ8K, acc: &mut Self::Acc);
    /// The sixteen rows' outputs.
    unsafe fn result(acc: &Self::Acc) -> __m512;
}

/// [`DecQ6K`] for sixteen rows.
pub(crate) struct Dec16Q6K {
    q: [__m512i; 64],
    sv: [__m512i; 16],
    sp: [__m512i; 8],
    dw: __m512,
}

impl KGroup16 for Dec16Q6K {
    type Half = DecQ6K;
    type Acc = __m512;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Dec16Q6K {
            q: [_mm512_setzero_si512(); 64],
            sv: [_mm512_setzero_si512(); 16],
            sp: [_mm512_setzero_si512(); 8],
            dw: _mm512_setzero_ps(),
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn join(&mut self, lo: &DecQ6K, hi: &DecQ6K) {
        for k in 0..64 {
            self.q[k] = join(lo.q[k], hi.q[k]);
        }
        for j in 0..16 {
            self.sv[j] = join(lo.sv[j], hi.sv[j]);
        }
        for m in 0..8 {
            self.sp[m] = join(lo.sp[m], hi.sp[m]);
        }
        self.dw = join_ps(lo.dw, hi.dw);
    }
    /// The exact super-block sum (products scaled per sub-block, less `32·Σ sc·bsum`), then
    /// `acc = (d_y·d_w)·isum + acc`, one FMA.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn accumulate(&self, y: &BlockQ8K, acc: &mut __m512) {
        let mut s = [_mm512_setzero_si512(); 2];
        for j in 0..16 {
            let k = 4 * j;
            // Pair sums of at most 2·63·128 each: two of them fit an i16.
            let p0 = _mm512_add_epi16(
                _mm512_maddubs_epi16(self.q[k], broadcast4(y, k)),
                _mm512_maddubs_epi16(self.q[k + 1], broadcast4(y, k + 1)),
            );
            let p1 = _mm512_add_epi16(
                _mm512_maddubs_epi16(self.q[k + 2], broadcast4(y, k + 2)),
                _mm512_maddubs_epi16(self.q[k + 3], broadcast4(y, k + 3)),
            );
            s[j % 2] = _mm512_dpwssd_epi32(s[j % 2], p0, self.sv[j]);
            s[j % 2] = _mm512_dpwssd_epi32(s[j % 2], p1, self.sv[j]);
        }
        // The stored quants are q + 32: take 32·Σ_j sc_j·bsum_j off.
        let bs = y.bsums.as_ptr() as *const i32;
        let mut o = _mm512_setzero_si512();
        for m in 0..8 {
            // SAFETY: bsums is 16 i16, i.e. 8 i32 words (read unaligned).
            let pair = _mm512_set1_epi32(std::ptr::read_unaligned(bs.add(m)));
            o = _mm512_dpwssd_epi32(o, self.sp[m], pair);
        }
        let isum = _mm512_sub_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_slli_epi32::<5>(o));
        let d = _mm512_mul_ps(_mm512_set1_ps(y.d), self.dw);
        *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), *acc);
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn result(acc: &__m512) -> __m512 {
        *acc
    }
}

/// [`DecQ4K`] for sixteen rows.
pub(crate) struct Dec16Q4K {
    q: [__m512i; 64],
    sv: [__m512i; 8],
    mp: [__m512i; 4],
    dw: __m512,
    dmin: __m512,
}

impl KGroup16 for Dec16Q4K {
    type Half = DecQ4K;
    /// The eight float partials and the mins sum.
    type Acc = ([__m512; 8], __m512);
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn new() -> Self {
        Dec16Q4K {
            q: [_mm512_setzero_si512(); 64],
            sv: [_mm512_setzero_si512(); 8],
            mp: [_mm512_setzero_si512(); 4],
            dw: _mm512_setzero_ps(),
            dmin: _mm512_setzero_ps(),
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn zero() -> Self::Acc {
        ([_mm512_setzero_ps(); 8], _mm512_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn join(&mut self, lo: &DecQ4K, hi: &DecQ4K) {
        for k in 0..64 {
            self.q[k] = join(lo.q[k], hi.q[k]);
        }
        for g in 0..8 {
            self.sv[g] = join(lo.sv[g], hi.sv[g]);
        }
        for i in 0..4 {
            self.mp[i] = join(lo.mp[i], hi.mp[i]);
        }
        self.dw = join_ps(lo.dw, hi.dw);
        self.dmin = join_ps(lo.dmin, hi.dmin);
    }
    /// The eight partial sums `Σ_g sc_g·(elements 32g+4l..32g+4l+4)`, then per partial
    /// `acc = (d_y·d_w)·part + acc`; `mins += (d_y·dmin_w)·msum`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn accumulate(&self, y: &BlockQ8K, (acc, mins): &mut Self::Acc) {
        let mut part = [_mm512_setzero_si512(); 8];
        for g in 0..8 {
            for l in 0..8 {
                let k = 8 * g + l;
                let p = _mm512_maddubs_epi16(self.q[k], broadcast4(y, k));
                part[l] = _mm512_dpwssd_epi32(part[l], p, self.sv[g]);
            }
        }
        // SAFETY: bsums is 16 i16 = 32 bytes; two unaligned 16-byte loads stay inside it.
        let lo = _mm_loadu_si128(y.bsums.as_ptr() as *const __m128i);
        let hi = _mm_loadu_si128(y.bsums.as_ptr().add(8) as *const __m128i);
        // The eight sub-block sums (|v| <= 2·16·128), pairs of them per 32-bit word.
        let sums = _mm512_broadcast_i32x4(_mm_hadd_epi16(lo, hi));
        let mut msum = _mm512_madd_epi16(self.mp[0], _mm512_shuffle_epi32::<0x00>(sums));
        msum = _mm512_dpwssd_epi32(msum, self.mp[1], _mm512_shuffle_epi32::<0x55>(sums));
        msum = _mm512_dpwssd_epi32(msum, self.mp[2], _mm512_shuffle_epi32::<0xAA>(sums));
        msum = _mm512_dpwssd_epi32(msum, self.mp[3], _mm512_shuffle_epi32::<0xFF>(sums));
        let dy = _mm512_set1_ps(y.d);
        let d = _mm512_mul_ps(dy, self.dw);
        for l in 0..8 {
            acc[l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(part[l]), acc[l]);
        }
        let dm = _mm512_mul_ps(dy, self.dmin);
        *mins = _mm512_add_ps(*mins, _mm512_mul_ps(dm, _mm512_cvtepi32_ps(msum)));
    }
    /// `hsum_ps`'s order, ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)), less the mins.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn result((a, mins): &Self::Acc) -> __m512 {
        let s = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
            _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
        );
        _mm512_sub_ps(s, *mins)
    }
}

/// Outputs of weight rows `r0..r1` (multiples of 8) of an interleaved Q4_K (`K = Dec16Q4K`) or
/// Q6_K (`K = Dec16Q6K`) matrix for all `n_tokens` activation rows; `y[t * rows + r]` receives
/// token `t`'s result for row `r`. Rows go sixteen at a time; an odd last group of eight is
/// decoded into both halves and only the low half is stored.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C. `data` holds whole groups of
/// eight rows of `nb` super-blocks in the interleaved layout, at least `r1` rows; `r0 < r1`,
/// both multiples of 8; `act.len() == n_tokens * nb`; `y` points to `n_tokens * rows` writable
/// f32 with `r1 <= rows`, and no other thread accesses rows `r0..r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<K: KGroup16>(
    data: &[u8],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8K],
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    let bytes = <K::Half as KGroup>::BYTES;
    debug_assert!(r0 < r1 && r0 % INTERLEAVE == 0 && r1 % INTERLEAVE == 0);
    debug_assert!(data.len() >= r1 / INTERLEAVE * nb * bytes);
    debug_assert!(act.len() == n_tokens * nb);
    let group_bytes = nb * bytes;
    let (mut lo, mut hi) = (K::Half::new(), K::Half::new());
    let mut dec = K::new();
    let mut acc = [K::zero(); TOKEN_TILE];
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
                *a = K::zero();
            }
            for b in 0..nb {
                // SAFETY: block group b of both row groups lies inside data.
                lo.decode(base0.add(b * bytes));
                hi.decode(base1.add(b * bytes));
                dec.join(&lo, &hi);
                for t in t0..t1 {
                    // SAFETY: t < n_tokens, so t * nb + b < act.len(); t - t0 < TOKEN_TILE.
                    let blk = act.get_unchecked(t * nb + b);
                    dec.accumulate(blk, acc.get_unchecked_mut(t - t0));
                }
            }
            for t in t0..t1 {
                // SAFETY: t < n_tokens and rows g..g + 16 (g..g + 8 when not a pair) are below
                // r1 <= rows, owned by this task.
                let out = y.add(t * rows + g);
                let r = K::result(&acc[t - t0]);
                if pair {
                    _mm512_storeu_ps(out, r);
                } else {
                    _mm256_storeu_ps(out, _mm512_castps512_ps256(r));
                }
            }
            t0 = t1;
        }
        g += if pair { 2 * INTERLEAVE } else { INTERLEAVE };
    }
}
