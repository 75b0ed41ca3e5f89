//! With the scalar kernels forced (`MODU_KERNELS=scalar`, read once per process, so this file
//! holds a single test), a matrix in the regrouped Q5_0 or interleaved Q5_0/Q8_0/Q4_K/Q6_K
//! layout still multiplies and dequantizes exactly as in ggml's layout: only the AVX2 kernels
//! read it natively, every other path converts it back.

use modu_kernels::testutil::{random_row, Rng};
use modu_kernels::*;

#[test]
fn grouped_q5_0_on_the_scalar_path_matches_ggml_layout() {
    std::env::set_var("MODU_KERNELS", "scalar");
    assert!(
        !layout::prefers_grouped(GgmlType::Q5_0),
        "loaders must not regroup for scalar"
    );
    let mut rng = Rng::new(3);
    for (rows, nblk) in [(5usize, 3usize), (9, 28), (3, 20)] {
        let cols = nblk * 32;
        let data = random_row(GgmlType::Q5_0, rows * cols, &mut rng);
        let mut grouped = data.clone();
        layout::group_rows(GgmlType::Q5_0, cols, &mut grouped).unwrap();
        let w = QMatrix::new(GgmlType::Q5_0, rows, cols, &data).unwrap();
        let wg =
            QMatrix::with_layout(GgmlType::Q5_0, rows, cols, &grouped, Layout::Grouped8).unwrap();
        for n_tokens in [1usize, 4, 9] {
            let x = rng.f32s(n_tokens * cols, 1.0);
            let (mut a, mut b) = (vec![0f32; n_tokens * rows], vec![1f32; n_tokens * rows]);
            matmul(&w, &x, n_tokens, &mut a).unwrap();
            matmul(&wg, &x, n_tokens, &mut b).unwrap();
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
        let (mut a, mut b) = (vec![0f32; cols], vec![1f32; cols]);
        w.dequantize_row(rows - 1, &mut a).unwrap();
        wg.dequantize_row(rows - 1, &mut b).unwrap();
        assert_eq!(a, b);
    }
    // Interleaved Q5_0, Q8_0, Q4_K and Q6_K (a multiple of 8 rows) likewise.
    assert_eq!(
        layout::inference_layout(GgmlType::Q8_0, 16, 64),
        Layout::Ggml,
        "loaders must not interleave for scalar"
    );
    for ty in [
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        for (rows, nblk) in [(8usize, 3usize), (16, 28)] {
            let cols = nblk * ty.block_size();
            let data = random_row(ty, rows * cols, &mut rng);
            let mut il = data.clone();
            layout::interleave_rows(ty, cols, &mut il).unwrap();
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let wi = QMatrix::with_layout(ty, rows, cols, &il, Layout::Interleaved8).unwrap();
            for n_tokens in [1usize, 4, 9] {
                let x = rng.f32s(n_tokens * cols, 1.0);
                let (mut a, mut b) = (vec![0f32; n_tokens * rows], vec![1f32; n_tokens * rows]);
                matmul(&w, &x, n_tokens, &mut a).unwrap();
                matmul(&wi, &x, n_tokens, &mut b).unwrap();
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
            for r in [0, 5, rows - 1] {
                let (mut a, mut b) = (vec![0f32; cols], vec![1f32; cols]);
                w.dequantize_row(r, &mut a).unwrap();
                wi.dequantize_row(r, &mut b).unwrap();
                assert_eq!(a, b, "{} row {r}", ty.name());
            }
        }
    }
    // A grouped layout is only defined for Q5_0.
    let q8 = vec![0u8; 34];
    assert!(QMatrix::with_layout(GgmlType::Q8_0, 1, 32, &q8, Layout::Grouped8).is_err());
    // An interleaved layout needs whole groups of eight rows, of Q5_0, Q8_0, Q4_K or Q6_K.
    assert!(QMatrix::with_layout(GgmlType::Q8_0, 1, 32, &q8, Layout::Interleaved8).is_err());
    let q4 = vec![0u8; 8 * 18];
    assert!(QMatrix::with_layout(GgmlType::Q4_0, 8, 32, &q4, Layout::Interleaved8).is_err());
    let q5k = vec![0u8; 8 * 176];
    assert!(QMatrix::with_layout(GgmlType::Q5_K, 8, 256, &q5k, Layout::Interleaved8).is_err());
}
