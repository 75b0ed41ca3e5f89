//! With the scalar kernels forced (`MODU_KERNELS=scalar`, read once per process, so this file
//! holds a single test), a matrix in the regrouped Q5_0 layout still multiplies and
//! dequantizes exactly as in ggml's layout: only the AVX2 kernel reads it natively, every other
//! path converts it back.

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
    // A grouped layout is only defined for Q5_0.
    let q8 = vec![0u8; 34];
    assert!(QMatrix::with_layout(GgmlType::Q8_0, 1, 32, &q8, Layout::Grouped8).is_err());
}
