//! Weight layouts: ggml's, as stored in GGUF files, and a regrouped one that the AVX2 decode
//! kernels read faster, made once at load time in a private copy of the weights.
//!
//! # The grouped Q5_0 layout ([`Layout::Grouped8`])
//! A ggml Q5_0 row is a sequence of 22-byte blocks `[d: f16][qh: u32][qs: 16 bytes]`. The
//! grouped row has the same bytes per row and the same blocks in the same order, but each run of
//! eight consecutive blocks (at a row's end, the remaining `n < 8`) is stored field by field:
//!
//! ```text
//! [d_0 .. d_{n-1}: n × 2 bytes][qh'_0 .. qh'_{n-1}: n × 4 bytes][qs_0 .. qs_{n-1}: n × 16 bytes]
//! ```
//!
//! and within each `qh'` the fifth bit of element `j` sits at bit `8·(j % 4) + j / 4` instead
//! of bit `j`.
//!
//! Why: decoding one token streams every weight once, and for Q5_0 (most of the bytes of the
//! 0.5B-class models, whose 896/640-wide rows cannot take K-quants) the kernel, not memory,
//! was the limit. With the eight scales side by side one F16C conversion from memory replaces
//! eight scalar loads, shifts and inserts; with the permuted bits a 32-bit broadcast already
//! puts each element's bit into its own byte (byte `j` of the broadcast holds byte `j % 4` of
//! `qh'`, whose bit `j / 4` is element `j`'s), so the byte shuffle of ggml's layout goes.
//! Measured: the decode kernel +25–35 % (one core, in cache, and two cores from DRAM).

use crate::blocks::{as_blocks, BlockQ5_0};
use crate::{row_bytes, GgmlType, KernelError};

/// How a weight matrix's rows are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// ggml's: each row is its blocks one after another, as in a GGUF file.
    #[default]
    Ggml,
    /// Q5_0 rows regrouped by [`group_rows`] (see the [module docs](self)).
    Grouped8,
}

/// Blocks per run of the grouped layout.
pub(crate) const RUN: usize = 8;

/// Whether [`group_rows`] supports `ty` and the kernels in use read the grouped layout faster
/// (AVX2 kernels, not forced to scalar). Loaders regroup only then; every kernel entry point
/// accepts both layouts regardless.
pub fn prefers_grouped(ty: GgmlType) -> bool {
    ty == GgmlType::Q5_0 && crate::dispatch::use_avx2()
}

/// Position of element `j`'s fifth bit in a grouped `qh'` word.
#[inline]
fn grouped_bit(j: usize) -> usize {
    8 * (j % 4) + j / 4
}

/// Rewrites `data` (whole rows of `cols` elements of `ty`, ggml layout) into
/// [`Layout::Grouped8`], in place. Only Q5_0 has a grouped layout.
pub fn group_rows(ty: GgmlType, cols: usize, data: &mut [u8]) -> Result<(), KernelError> {
    if ty != GgmlType::Q5_0 {
        return Err(KernelError::UnsupportedType(ty));
    }
    let rb = checked_rows(ty, cols, data.len())?;
    let mut row = vec![BlockQ5_0::default(); cols / 32];
    for dst in data.chunks_exact_mut(rb) {
        let src = as_blocks::<BlockQ5_0>(dst).ok_or(KernelError::Overflow)?;
        row.copy_from_slice(src);
        let mut o = 0;
        for run in row.chunks(RUN) {
            for b in run {
                dst[o..o + 2].copy_from_slice(&b.d);
                o += 2;
            }
            for b in run {
                let qh = u32::from_le_bytes(b.qh);
                let mut g = 0u32;
                for j in 0..32 {
                    g |= ((qh >> j) & 1) << grouped_bit(j);
                }
                dst[o..o + 4].copy_from_slice(&g.to_le_bytes());
                o += 4;
            }
            for b in run {
                dst[o..o + 16].copy_from_slice(&b.qs);
                o += 16;
            }
        }
    }
    Ok(())
}

/// The inverse of [`group_rows`]: `src` (grouped rows) back to ggml's layout in `dst` (same
/// length).
pub fn ungroup_rows(
    ty: GgmlType,
    cols: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), KernelError> {
    if ty != GgmlType::Q5_0 {
        return Err(KernelError::UnsupportedType(ty));
    }
    let rb = checked_rows(ty, cols, src.len())?;
    if dst.len() != src.len() {
        return Err(KernelError::Length {
            what: "ungrouped output",
            expected: src.len(),
            got: dst.len(),
            unit: "bytes",
        });
    }
    let nb = cols / 32;
    for (s, d) in src.chunks_exact(rb).zip(dst.chunks_exact_mut(rb)) {
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(RUN);
            let run = &s[b0 * 22..(b0 + n) * 22];
            for k in 0..n {
                let out = &mut d[(b0 + k) * 22..(b0 + k + 1) * 22];
                out[0..2].copy_from_slice(&run[2 * k..2 * k + 2]);
                let g =
                    u32::from_le_bytes(run[2 * n + 4 * k..2 * n + 4 * k + 4].try_into().unwrap());
                let mut qh = 0u32;
                for j in 0..32 {
                    qh |= ((g >> grouped_bit(j)) & 1) << j;
                }
                out[2..6].copy_from_slice(&qh.to_le_bytes());
                out[6..22].copy_from_slice(&run[6 * n + 16 * k..6 * n + 16 * k + 16]);
            }
            b0 += n;
        }
    }
    Ok(())
}

/// Bytes per row, after checking that `len` is whole rows of `cols` elements.
fn checked_rows(ty: GgmlType, cols: usize, len: usize) -> Result<usize, KernelError> {
    let rb = row_bytes(ty, cols)?;
    if rb == 0 || len % rb != 0 {
        return Err(KernelError::Length {
            what: "weight data",
            expected: len.div_ceil(rb.max(1)) * rb,
            got: len,
            unit: "bytes",
        });
    }
    Ok(rb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_row, Rng};

    #[test]
    fn group_then_ungroup_is_the_identity_and_keeps_scales_and_nibbles() {
        let mut rng = Rng::new(11);
        // Row lengths with full runs only, a short tail run, and a single block.
        for cols in [32, 7 * 32, 8 * 32, 28 * 32, 20 * 32, 152 * 32] {
            let src = random_row(GgmlType::Q5_0, 3 * cols, &mut rng);
            let mut g = src.clone();
            group_rows(GgmlType::Q5_0, cols, &mut g).unwrap();
            assert_eq!(g.len(), src.len());
            if cols > 32 {
                assert_ne!(g, src, "grouping must move bytes");
            }
            // The second block's scale is the run's second f16.
            if cols >= 64 {
                assert_eq!(g[2..4], src[22..24]);
            }
            let mut back = vec![0u8; g.len()];
            ungroup_rows(GgmlType::Q5_0, cols, &g, &mut back).unwrap();
            assert_eq!(back, src, "cols {cols}");
        }
    }

    #[test]
    fn grouped_bits_sit_where_a_broadcast_byte_finds_them() {
        // Element j's bit must be in byte j % 4 of qh', at bit j / 4.
        for j in 0..32 {
            let p = grouped_bit(j);
            assert_eq!((p / 8, p % 8), (j % 4, j / 4));
        }
    }

    #[test]
    fn other_types_and_ragged_data_are_rejected() {
        let mut v = vec![0u8; 34];
        assert!(matches!(
            group_rows(GgmlType::Q8_0, 32, &mut v),
            Err(KernelError::UnsupportedType(GgmlType::Q8_0))
        ));
        let mut v = vec![0u8; 23];
        assert!(group_rows(GgmlType::Q5_0, 32, &mut v).is_err());
        assert!(group_rows(GgmlType::Q5_0, 48, &mut [0u8; 22]).is_err());
        assert!(ungroup_rows(GgmlType::Q5_0, 32, &[0u8; 22], &mut [0u8; 21]).is_err());
    }
}
