//! The body of the batched-matmul equivalence check, shared by the test binaries that run it
//! at the detected kernel level and at forced lower ones.

use modu_kernels::testutil::{random_row, Rng};
use modu_kernels::*;

/// One dot product per (row, token) through the public per-row kernels (the decode path).
fn per_pair(w: &QMatrix, qa: &QuantizedActivations) -> Vec<f32> {
    let n = qa.n_tokens();
    let mut y = vec![0f32; n * w.rows];
    for t in 0..n {
        for r in 0..w.rows {
            let row = w.row(r).unwrap();
            let v = match (qa.data(), w.ty) {
                (ActivationData::Q8_0(a), GgmlType::Q4_0) => {
                    let nb = w.cols / 32;
                    vec_dot_q4_0_q8_0(as_blocks(row).unwrap(), &a[t * nb..(t + 1) * nb])
                }
                (ActivationData::Q8_0(a), GgmlType::Q5_0) => {
                    let nb = w.cols / 32;
                    vec_dot_q5_0_q8_0(as_blocks(row).unwrap(), &a[t * nb..(t + 1) * nb])
                }
                (ActivationData::Q8_0(a), GgmlType::Q8_0) => {
                    let nb = w.cols / 32;
                    vec_dot_q8_0_q8_0(as_blocks(row).unwrap(), &a[t * nb..(t + 1) * nb])
                }
                (ActivationData::Q8K(a), GgmlType::Q4_K) => {
                    let nb = w.cols / 256;
                    vec_dot_q4_k_q8_k(as_blocks(row).unwrap(), &a[t * nb..(t + 1) * nb])
                }
                (ActivationData::Q8K(a), GgmlType::Q6_K) => {
                    let nb = w.cols / 256;
                    vec_dot_q6_k_q8_k(as_blocks(row).unwrap(), &a[t * nb..(t + 1) * nb])
                }
                _ => unreachable!(),
            };
            y[t * w.rows + r] = v;
        }
    }
    y
}

/// Every type, shape and token count: batched == per-pair dots, bit for bit, in every layout.
pub fn check_batched_matmul_against_single_token_dots() {
    let mut rng = Rng::new(7);
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    for ty in types {
        let bs = ty.block_size();
        // Odd and even block counts (the two float accumulators), rows not a multiple of the
        // 2-row tile, and a wide matrix crossing cache-chunk sizes.
        for &(rows, nblk) in &[
            (1usize, 1usize),
            (3, 2),
            (7, 3),
            (34, 5),
            (67, 19),
            (130, 28),
            (9, 152),
            (16, 1),
            (24, 7),
            (40, 28),
            (96, 4),
            (648, 20),
        ] {
            let cols = nblk * bs;
            let data = random_row(ty, rows * cols, &mut rng);
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            for n_tokens in [1usize, 2, 3, 4, 5, 17, 33, 64, 70] {
                let x = rng.f32s(n_tokens * cols, 1.0);
                let qa =
                    quantize_activations(vec_dot_type(ty).unwrap(), &x, n_tokens, cols).unwrap();
                let want = per_pair(&w, &qa);
                let mut got = vec![f32::NAN; n_tokens * rows];
                matmul_quantized(&w, &qa, &mut got).unwrap();
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{} {rows}x{cols} n_tokens={n_tokens} idx {i}: {g} vs {e}",
                        ty.name()
                    );
                }
                if ty == GgmlType::Q5_0 {
                    // The regrouped layout (load-time, for the AVX2 kernel) gives the same bits.
                    let mut grouped = data.clone();
                    layout::group_rows(ty, cols, &mut grouped).unwrap();
                    let wg =
                        QMatrix::with_layout(ty, rows, cols, &grouped, Layout::Grouped8).unwrap();
                    let mut g = vec![f32::NAN; n_tokens * rows];
                    matmul_quantized(&wg, &qa, &mut g).unwrap();
                    for (i, (g, e)) in g.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "grouped {rows}x{cols} n_tokens={n_tokens} idx {i}: {g} vs {e}"
                        );
                    }
                }
                if ty != GgmlType::Q4_0 && rows % 8 == 0 {
                    // Eight rows interleaved (load-time, for the AVX2 kernel): the same bits,
                    // and the same rows back from the layout.
                    let mut il = data.clone();
                    layout::interleave_rows(ty, cols, &mut il).unwrap();
                    assert_ne!(il, data, "interleaving must move bytes");
                    let wi =
                        QMatrix::with_layout(ty, rows, cols, &il, Layout::Interleaved8).unwrap();
                    let mut g = vec![f32::NAN; n_tokens * rows];
                    matmul_quantized(&wi, &qa, &mut g).unwrap();
                    for (i, (g, e)) in g.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "interleaved {} {rows}x{cols} n_tokens={n_tokens} idx {i}: {g} vs {e}",
                            ty.name()
                        );
                    }
                }
                let mut via_matmul = vec![f32::NAN; n_tokens * rows];
                matmul(&w, &x, n_tokens, &mut via_matmul).unwrap();
                assert!(via_matmul
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                // Against the scalar reference kernels (float order differs: tolerance).
                let nbt = cols / bs;
                for t in 0..n_tokens {
                    for r in 0..rows {
                        let row = w.row(r).unwrap();
                        let s = match (qa.data(), ty) {
                            (ActivationData::Q8_0(a), GgmlType::Q4_0) => scalar::vec_dot_q4_0_q8_0(
                                as_blocks(row).unwrap(),
                                &a[t * nbt..(t + 1) * nbt],
                            ),
                            (ActivationData::Q8_0(a), GgmlType::Q5_0) => scalar::vec_dot_q5_0_q8_0(
                                as_blocks(row).unwrap(),
                                &a[t * nbt..(t + 1) * nbt],
                            ),
                            (ActivationData::Q8_0(a), GgmlType::Q8_0) => scalar::vec_dot_q8_0_q8_0(
                                as_blocks(row).unwrap(),
                                &a[t * nbt..(t + 1) * nbt],
                            ),
                            (ActivationData::Q8K(a), GgmlType::Q4_K) => scalar::vec_dot_q4_k_q8_k(
                                as_blocks(row).unwrap(),
                                &a[t * nbt..(t + 1) * nbt],
                            ),
                            (ActivationData::Q8K(a), GgmlType::Q6_K) => scalar::vec_dot_q6_k_q8_k(
                                as_blocks(row).unwrap(),
                                &a[t * nbt..(t + 1) * nbt],
                            ),
                            _ => unreachable!(),
                        };
                        let g = got[t * rows + r];
                        if ty.block_size() == 32 {
                            // The 32-element types compute exactly what the scalar reference
                            // does (block-exact integer sums, one f32 multiply-add per block).
                            assert_eq!(
                                g.to_bits(),
                                s.to_bits(),
                                "{} {rows}x{cols} n_tokens={n_tokens}: scalar {s} vs {g}",
                                ty.name()
                            );
                        }
                        assert!(
                            (g - s).abs() <= 1e-3 * (1.0 + s.abs()),
                            "{} scalar {s} vs {g}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}
