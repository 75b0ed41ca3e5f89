//! AVX-512 versions of the f16 attention kernels of [`crate::x86`]
//! ([`crate::dispatch::SimdLevel::Avx512`]), with the same bits as the AVX2 ones.
//!
//! * `vec_dot_f16_rows`: the AVX2 kernel keeps four 8-lane accumulators per row, `a[j]` taking
//!   elements `32m + 8j .. 32m + 8j + 8`. Here one 16-lane register holds `a[0] | a[1]` and
//!   another `a[2] | a[3]`: every lane sees the same products in the same order, and the halves
//!   are split back before the AVX2 kernel's tail and final sum. Four query rows share each
//!   key conversion (the AVX2 kernel: two).
//! * `mad_f16_rows`: per element one fused multiply-add and one rounding to f16, as on AVX2;
//!   sixteen elements per instruction.

use half::f16;
use std::arch::x86_64::*;

use crate::x86::{hsum_ps, load_f16x8};

/// `lo` in the low 256 bits and `hi` in the high 256 bits (two 8-row groups in one register, for
/// [`crate::q32x16`] and [`crate::qk16`]).
///
/// # Safety
/// The CPU must support AVX-512F.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// 16 f16 values at `p` widened to f32.
///
/// # Safety
/// The CPU must support AVX-512F; `p` points to 16 readable values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load_f16x16(p: *const u16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// Query rows per pass over a key.
const ROWS: usize = 4;

/// `out[h] = k · q_h` for the rows `q_h = q[h·d..(h+1)·d]` (f16 values widened to f32),
/// `d = k.len()`: the bits of [`crate::x86::vec_dot_f16_rows`].
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; `q.len() >= out.len() * k.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn vec_dot_f16_rows(k: &[f16], q: &[f32], out: &mut [f32]) {
    let d = k.len();
    let rows = out.len();
    debug_assert!(q.len() >= rows * d);
    let kp = k.as_ptr() as *const u16;
    let mut h = 0;
    while h < rows {
        // Rows h..h + 4; past the last row, the last row again (computed, not stored).
        let qr: [*const f32; ROWS] =
            std::array::from_fn(|r| q.as_ptr().add((h + r).min(rows - 1) * d));
        let mut lo = [_mm512_setzero_ps(); ROWS]; // a[0] | a[1]
        let mut hi = [_mm512_setzero_ps(); ROWS]; // a[2] | a[3]
        let mut i = 0;
        // SAFETY (all loads below): i + width <= d values exist in k and in every q row;
        // unaligned loads.
        while i + 32 <= d {
            let k0 = load_f16x16(kp.add(i));
            let k1 = load_f16x16(kp.add(i + 16));
            for r in 0..ROWS {
                lo[r] = _mm512_fmadd_ps(k0, _mm512_loadu_ps(qr[r].add(i)), lo[r]);
                hi[r] = _mm512_fmadd_ps(k1, _mm512_loadu_ps(qr[r].add(i + 16)), hi[r]);
            }
            i += 32;
        }
        let tail = i;
        for r in 0..ROWS.min(rows - h) {
            let mut a = [
                _mm512_castps512_ps256(lo[r]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lo[r]))),
                _mm512_castps512_ps256(hi[r]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(hi[r]))),
            ];
            let mut i = tail;
            while i + 8 <= d {
                a[0] = _mm256_fmadd_ps(load_f16x8(kp.add(i)), _mm256_loadu_ps(qr[r].add(i)), a[0]);
                i += 8;
            }
            let mut s = hsum_ps(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while i < d {
                s += k[i].to_f32() * *qr[r].add(i);
                i += 1;
            }
            out[h + r] = s;
        }
        h += ROWS;
    }
}

/// `acc_h[i] = f16(acc_h[i] + v[i]·w[h])` for each row `acc_h = acc[h·d..(h+1)·d]`,
/// `d = v.len()`: the bits of [`crate::x86::mad_f16_rows`].
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C; `acc.len() >= w.len() * v.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn mad_f16_rows(acc: &mut [f16], v: &[f16], w: &[f32]) {
    let d = v.len();
    debug_assert!(acc.len() >= w.len() * d);
    let ap = acc.as_mut_ptr() as *mut u16;
    let vp = v.as_ptr() as *const u16;
    let mut i = 0;
    while i + 32 <= d {
        // SAFETY: i + 32 <= d values exist in v and in every row of acc; unaligned loads and
        // stores.
        let x = [load_f16x16(vp.add(i)), load_f16x16(vp.add(i + 16))];
        for (h, &wh) in w.iter().enumerate() {
            let wv = _mm512_set1_ps(wh);
            let p = ap.add(h * d + i);
            for (j, &xj) in x.iter().enumerate() {
                let r = _mm512_fmadd_ps(xj, wv, load_f16x16(p.add(16 * j)));
                _mm256_storeu_si256(
                    p.add(16 * j) as *mut __m256i,
                    _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r),
                );
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
            _mm_storeu_si128(
                p as *mut __m128i,
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r),
            );
        }
        i += 8;
    }
    if i < d {
        for (h, &wh) in w.iter().enumerate() {
            crate::scalar::mad_f16(&mut acc[h * d + i..(h + 1) * d], &v[i..], wh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// Both kernels against the AVX2 ones, bit for bit, over lengths that exercise every tail
    /// (32-, 8- and 1-element steps) and row counts around the 4-row pass. Needs an AVX-512
    /// VNNI CPU: elsewhere it says so and checks nothing (the path cannot run there).
    #[test]
    fn avx512_f16_rows_give_the_bits_of_the_avx2_ones() {
        if !crate::x86::available_avx512() {
            eprintln!("this CPU has no AVX-512 VNNI: the AVX-512 f16 kernels cannot run here");
            return;
        }
        let mut rng = Rng::new(4242);
        for d in [1usize, 7, 8, 16, 31, 32, 40, 48, 64, 100, 256] {
            for rows in 1..=9 {
                let k: Vec<f16> = (0..d).map(|_| f16::from_f32(rng.f32s(1, 1.0)[0])).collect();
                let q: Vec<f32> = rng
                    .f32s(rows * d, 1.0)
                    .iter()
                    .map(|&v| f16::from_f32(v).to_f32())
                    .collect();
                let (mut got, mut want) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                // SAFETY: AVX-512 VNNI (and so AVX2/FMA/F16C here) checked above; q holds
                // rows × d values.
                unsafe {
                    vec_dot_f16_rows(&k, &q, &mut got);
                    crate::x86::vec_dot_f16_rows(&k, &q, &mut want);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "dot d={d} rows={rows}");
                let w = rng.f32s(rows, 2.0);
                let a0: Vec<f16> = rng
                    .f32s(rows * d, 4.0)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let (mut a1, mut a2) = (a0.clone(), a0);
                // SAFETY: as above; acc holds rows × d values.
                unsafe {
                    mad_f16_rows(&mut a1, &k, &w);
                    crate::x86::mad_f16_rows(&mut a2, &k, &w);
                }
                assert_eq!(a1, a2, "mad d={d} rows={rows}");
            }
        }
    }
}
