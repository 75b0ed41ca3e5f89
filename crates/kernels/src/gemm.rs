//! Tiled AVX2 GEMM for many tokens × K-quant weights (Q4_K, Q6_K; prefill and batched decode).
//! The 32-element block types have their own kernel for every token count, [`crate::q32`].
//!
//! A task owns a chunk of weight rows. It decodes those rows once into a small buffer of
//! ready-to-multiply int8 blocks (plus f32 scales), then walks the tokens in tiles; inside a
//! tile a register-blocked micro-kernel computes 2 weight rows × 2 tokens at a time, so every
//! decoded weight block and every activation block loaded into a register is used twice.
//!
//! Results are bit-identical to the per-(row, token) dot kernels in [`crate::x86`]: every
//! output gets the same per-block integer sums (computed lane by lane in the same way, or
//! reduced exactly) and the same float operations in the same order (for Q6_K: one fused
//! multiply-add per block).

// Index loops over the small register arrays read more plainly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use crate::blocks::*;
use crate::x86::{h2f, hsum_epi32, hsum_ps, k4_scales_mins, Q6K_SCALE_PICK};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Tokens per tile: the activation tile of a chunk is reused for all of its rows.
const TOKEN_TILE: usize = 32;

/// One decoded K-quant block (Q4_K, Q6_K): the 8 groups of 32 unsigned values in the order the
/// activations are laid out, the scale vector of each group (one scale per 128-bit lane for
/// Q6_K), and 16 i16 factors for the `bsums` correction (Q6_K: the 16 scales; Q4_K: the mins,
/// each repeated twice).
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub(crate) struct DecK {
    q: [[u8; 32]; 8],
    sv: [[i16; 16]; 8],
    aux: [i16; 16],
}

impl DecK {
    const ZERO: DecK = DecK {
        q: [[0; 32]; 8],
        sv: [[0; 16]; 8],
        aux: [0; 16],
    };
}

thread_local! {
    /// Per-thread decode buffers, reused across calls (large allocations would otherwise be
    /// fresh pages every time).
    static BUFK: RefCell<(Vec<DecK>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `R` Q6_K weight rows × `T` tokens over all `nb` blocks.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `wd` holds `R` rows of `nb` decoded Q6_K blocks
/// with stride `nb`; `act` holds `T` tokens of `nb` Q8_K blocks with stride `nb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_q6k<const R: usize, const T: usize>(
    wd: &[DecK],
    dw: &[f32],
    act: &[BlockQ8K],
    nb: usize,
) -> [[f32; T]; R] {
    debug_assert!(wd.len() >= R * nb && dw.len() >= R * nb && act.len() >= T * nb);
    let mut acc = [[0f32; T]; R];
    for i in 0..nb {
        let mut sumi = [[_mm256_setzero_si256(); T]; R];
        for g in 0..8 {
            let mut y = [_mm256_setzero_si256(); T];
            for t in 0..T {
                // SAFETY: t * nb + i < act.len(); group g covers bytes g*32..g*32+32 of qs.
                let b = act.get_unchecked(t * nb + i);
                y[t] = _mm256_loadu_si256(b.qs.as_ptr().add(g * 32) as *const __m256i);
            }
            for r in 0..R {
                // SAFETY: r * nb + i < wd.len(); the arrays are 32-byte aligned inside an
                // aligned struct.
                let w = wd.get_unchecked(r * nb + i);
                let q = _mm256_load_si256(w.q[g].as_ptr() as *const __m256i);
                let sv = _mm256_load_si256(w.sv[g].as_ptr() as *const __m256i);
                for t in 0..T {
                    let p = _mm256_maddubs_epi16(q, y[t]);
                    sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(p, sv));
                }
            }
        }
        for r in 0..R {
            // SAFETY: as above.
            let w = wd.get_unchecked(r * nb + i);
            let sc16 = _mm256_load_si256(w.aux.as_ptr() as *const __m256i);
            let dwr = *dw.get_unchecked(r * nb + i);
            for t in 0..T {
                // SAFETY: as above; bsums is 32 bytes.
                let b = act.get_unchecked(t * nb + i);
                let bs = _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i);
                // Σ q·y - 32·Σ sc·bsum, exactly the dot kernel's integer.
                let offs = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                let isum = hsum_epi32(_mm256_sub_epi32(sumi[r][t], offs));
                acc[r][t] = (b.d * dwr).mul_add(isum as f32, acc[r][t]);
            }
        }
    }
    acc
}

/// All outputs of Q6_K weight rows `r0..r1` (`w` is the whole matrix, `nb` blocks per row) for
/// `n_tokens` Q8_K activation rows; `y[t * rows + r]` receives the result.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w.len() >= r1 * nb`, `act.len() == n_tokens *
/// nb`, `y` points to `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread
/// accesses elements of rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_q6k(
    w: &[BlockQ6K],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8K],
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    let nr = r1 - r0;
    BUFK.with(|buf| {
        let mut buf = buf.borrow_mut();
        let (wd, dw, _) = &mut *buf;
        // Every element is overwritten below; the buffers only grow (zeroed once).
        wd.resize(wd.len().max(nr * nb), DecK::ZERO);
        dw.resize(dw.len().max(nr * nb), 0.0);
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        // SAFETY: each mask is 32 bytes; loadu has no alignment requirement.
        let picks: [__m256i; 4] = std::array::from_fn(|g| {
            _mm256_loadu_si256(Q6K_SCALE_PICK[g].as_ptr() as *const __m256i)
        });
        for (j, a) in w[r0 * nb..r1 * nb].iter().enumerate() {
            let e = &mut wd[j];
            // SAFETY: scales is 16 bytes; the load covers exactly those.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(a.scales.as_ptr() as *const __m128i));
            // Scales 0..8 (first half's groups) and 8..16 (second half's) in both lanes; a
            // group's vector (scale 2g in the low lane, 2g + 1 in the high one) is one shuffle.
            let halves = [
                _mm256_permute2x128_si256(sc16, sc16, 0x00),
                _mm256_permute2x128_si256(sc16, sc16, 0x11),
            ];
            for (h, &half) in halves.iter().enumerate() {
                // SAFETY: ql is 128 bytes, qh 64: every load stays inside its array.
                let ql0 = _mm256_loadu_si256(a.ql.as_ptr().add(h * 64) as *const __m256i);
                let ql1 = _mm256_loadu_si256(a.ql.as_ptr().add(h * 64 + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(a.qh.as_ptr().add(h * 32) as *const __m256i);
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
                for (g, q) in [g0, g1, g2, g3].into_iter().enumerate() {
                    // SAFETY: q[..] and sv[..] are 32-byte aligned arrays of the aligned struct.
                    _mm256_store_si256(e.q[h * 4 + g].as_mut_ptr() as *mut __m256i, q);
                    _mm256_store_si256(
                        e.sv[h * 4 + g].as_mut_ptr() as *mut __m256i,
                        _mm256_shuffle_epi8(half, picks[g]),
                    );
                }
            }
            // SAFETY: aux is 32 bytes at a 32-byte aligned offset of the aligned struct.
            _mm256_store_si256(e.aux.as_mut_ptr() as *mut __m256i, sc16);
            dw[j] = h2f(a.d);
        }
        let mut t0 = 0;
        while t0 < n_tokens {
            let t1 = (t0 + TOKEN_TILE).min(n_tokens);
            let mut r = 0;
            while r < nr {
                let rr = if r + 2 <= nr { 2 } else { 1 };
                let wdr = &wd[r * nb..];
                let dwr = &dw[r * nb..];
                let mut t = t0;
                while t < t1 {
                    let tt = if t + 2 <= t1 { 2 } else { 1 };
                    let a = &act[t * nb..];
                    macro_rules! put {
                        ($R:literal, $T:literal) => {{
                            let o = micro_q6k::<$R, $T>(wdr, dwr, a, nb);
                            for (k, orow) in o.iter().enumerate() {
                                for (j, &v) in orow.iter().enumerate() {
                                    // SAFETY: t + j < n_tokens and r0 + r + k < r1 <= rows, so
                                    // the index is inside y; this task owns rows r0..r1.
                                    *y.add((t + j) * rows + r0 + r + k) = v;
                                }
                            }
                        }};
                    }
                    match (rr, tt) {
                        (2, 2) => put!(2, 2),
                        (2, _) => put!(2, 1),
                        (_, 2) => put!(1, 2),
                        _ => put!(1, 1),
                    }
                    t += tt;
                }
                r += rr;
            }
            t0 = t1;
        }
    });
}

/// `R` Q4_K weight rows × `T` tokens over all `nb` blocks.
///
/// # Safety
/// As [`micro_q6k`], with Q4_K decoded blocks (`dw`, `dmw`: scales and min scales).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_q4k<const R: usize, const T: usize>(
    wd: &[DecK],
    dw: &[f32],
    dmw: &[f32],
    act: &[BlockQ8K],
    nb: usize,
) -> [[f32; T]; R] {
    debug_assert!(wd.len() >= R * nb && dw.len() >= R * nb && dmw.len() >= R * nb);
    debug_assert!(act.len() >= T * nb);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut mins = [[0f32; T]; R];
    for i in 0..nb {
        let mut sumi = [[_mm256_setzero_si256(); T]; R];
        for g in 0..8 {
            let mut y = [_mm256_setzero_si256(); T];
            for t in 0..T {
                // SAFETY: t * nb + i < act.len(); group g covers bytes g*32..g*32+32 of qs.
                let b = act.get_unchecked(t * nb + i);
                y[t] = _mm256_loadu_si256(b.qs.as_ptr().add(g * 32) as *const __m256i);
            }
            for r in 0..R {
                // SAFETY: r * nb + i < wd.len(); the arrays are 32-byte aligned inside an
                // aligned struct.
                let w = wd.get_unchecked(r * nb + i);
                let q = _mm256_load_si256(w.q[g].as_ptr() as *const __m256i);
                let sv = _mm256_load_si256(w.sv[g].as_ptr() as *const __m256i);
                for t in 0..T {
                    let p = _mm256_maddubs_epi16(q, y[t]);
                    sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(p, sv));
                }
            }
        }
        for r in 0..R {
            // SAFETY: as above.
            let w = wd.get_unchecked(r * nb + i);
            let mexp = _mm256_load_si256(w.aux.as_ptr() as *const __m256i);
            let dwr = *dw.get_unchecked(r * nb + i);
            let dminw = *dmw.get_unchecked(r * nb + i);
            for t in 0..T {
                // SAFETY: as above; bsums is 32 bytes.
                let b = act.get_unchecked(t * nb + i);
                let bs = _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i);
                // Σ_j m_j·(bsums[2j] + bsums[2j+1]): the dot kernel's integer.
                let ms = hsum_epi32(_mm256_madd_epi16(bs, mexp));
                mins[r][t] += (b.d * dminw) * ms as f32;
                acc[r][t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(b.d * dwr),
                    _mm256_cvtepi32_ps(sumi[r][t]),
                    acc[r][t],
                );
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_ps(acc[r][t]) - mins[r][t];
        }
    }
    out
}

/// As [`gemm_rows_q6k`] for Q4_K weights.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `w.len() >= r1 * nb`, `act.len() == n_tokens *
/// nb`, `y` points to `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread
/// accesses elements of rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_q4k(
    w: &[BlockQ4K],
    nb: usize,
    r0: usize,
    r1: usize,
    act: &[BlockQ8K],
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    let nr = r1 - r0;
    BUFK.with(|buf| {
        let mut buf = buf.borrow_mut();
        let (wd, dw, dmw) = &mut *buf;
        // Every element is overwritten below; the buffers only grow (zeroed once).
        wd.resize(wd.len().max(nr * nb), DecK::ZERO);
        dw.resize(dw.len().max(nr * nb), 0.0);
        dmw.resize(dmw.len().max(nr * nb), 0.0);
        let m4 = _mm256_set1_epi8(0x0F);
        for (j, a) in w[r0 * nb..r1 * nb].iter().enumerate() {
            let e = &mut wd[j];
            let (sc, m) = k4_scales_mins(&a.scales);
            for c in 0..4 {
                // SAFETY: qs is 128 bytes; the load covers bytes c*32..c*32+32.
                let q4 = _mm256_loadu_si256(a.qs.as_ptr().add(c * 32) as *const __m256i);
                let lo = _mm256_and_si256(q4, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                // SAFETY: q[..] and sv[..] are 32-byte aligned arrays of the aligned struct.
                _mm256_store_si256(e.q[2 * c].as_mut_ptr() as *mut __m256i, lo);
                _mm256_store_si256(e.q[2 * c + 1].as_mut_ptr() as *mut __m256i, hi);
                _mm256_store_si256(
                    e.sv[2 * c].as_mut_ptr() as *mut __m256i,
                    _mm256_set1_epi16(sc[2 * c] as i16),
                );
                _mm256_store_si256(
                    e.sv[2 * c + 1].as_mut_ptr() as *mut __m256i,
                    _mm256_set1_epi16(sc[2 * c + 1] as i16),
                );
            }
            // Each min twice (it applies to two groups of 16 bsums).
            // SAFETY: m is 8 bytes; aux is 32 bytes, 32-byte aligned.
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
            let lo = _mm_unpacklo_epi16(mins, mins);
            let hi = _mm_unpackhi_epi16(mins, mins);
            _mm256_store_si256(e.aux.as_mut_ptr() as *mut __m256i, _mm256_set_m128i(hi, lo));
            dw[j] = h2f(a.d);
            dmw[j] = h2f(a.dmin);
        }
        let mut t0 = 0;
        while t0 < n_tokens {
            let t1 = (t0 + TOKEN_TILE).min(n_tokens);
            let mut r = 0;
            while r < nr {
                let rr = if r + 2 <= nr { 2 } else { 1 };
                let wdr = &wd[r * nb..];
                let dwr = &dw[r * nb..];
                let dmr = &dmw[r * nb..];
                let mut t = t0;
                while t < t1 {
                    let tt = if t + 2 <= t1 { 2 } else { 1 };
                    let a = &act[t * nb..];
                    macro_rules! put {
                        ($R:literal, $T:literal) => {{
                            let o = micro_q4k::<$R, $T>(wdr, dwr, dmr, a, nb);
                            for (k, orow) in o.iter().enumerate() {
                                for (j, &v) in orow.iter().enumerate() {
                                    // SAFETY: t + j < n_tokens and r0 + r + k < r1 <= rows, so
                                    // the index is inside y; this task owns rows r0..r1.
                                    *y.add((t + j) * rows + r0 + r + k) = v;
                                }
                            }
                        }};
                    }
                    match (rr, tt) {
                        (2, 2) => put!(2, 2),
                        (2, _) => put!(2, 1),
                        (_, 2) => put!(1, 2),
                        _ => put!(1, 1),
                    }
                    t += tt;
                }
                r += rr;
            }
            t0 = t1;
        }
    });
}
