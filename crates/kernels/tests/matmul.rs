//! matmul against a naive f32 reference (dequantize, then dot), quantizer round trips, and
//! shape errors.

use modu_kernels::testutil::{random_row, Rng};
use modu_kernels::*;

const WEIGHT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn naive(w: &QMatrix, x: &[f32], n_tokens: usize) -> (Vec<f32>, Vec<f32>) {
    let mut wf = vec![0f32; w.cols];
    let mut y = vec![0f32; n_tokens * w.rows];
    let mut mag = vec![0f32; n_tokens * w.rows];
    for r in 0..w.rows {
        dequantize_row(w.ty, w.row(r).unwrap(), &mut wf).unwrap();
        for t in 0..n_tokens {
            let xr = &x[t * w.cols..(t + 1) * w.cols];
            let s: f64 = wf.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let m: f64 = wf
                .iter()
                .zip(xr)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            y[t * w.rows + r] = s as f32;
            mag[t * w.rows + r] = m as f32;
        }
    }
    (y, mag)
}

#[test]
fn matmul_matches_naive_reference() {
    let mut rng = Rng::new(42);
    for &ty in WEIGHT_TYPES {
        let bs = ty.block_size().max(32);
        for &(rows, blocks) in &[(1usize, 1usize), (5, 3), (67, 7), (130, 2)] {
            let cols = if ty.block_size() == 1 {
                blocks * 32 + 3
            } else {
                blocks * bs
            };
            let data: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(ty, cols, &mut rng))
                .collect();
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            for &n_tokens in &[1usize, 2, 5] {
                let x = rng.f32s(n_tokens * cols, 1.0);
                let mut y = vec![f32::NAN; n_tokens * rows];
                matmul(&w, &x, n_tokens, &mut y).unwrap();
                let (want, mag) = naive(&w, &x, n_tokens);
                // Activation quantization error: ~1/127 of each |w·x| term for the 8-bit types,
                // 2^-8 for bf16, 2^-11 for f16.
                let rel = match ty {
                    GgmlType::F32 => 1e-5,
                    GgmlType::F16 => 2e-3,
                    GgmlType::BF16 => 1e-2,
                    _ => 2e-2,
                };
                for i in 0..y.len() {
                    let tol = rel * mag[i] + 1e-4;
                    assert!(
                        (y[i] - want[i]).abs() <= tol,
                        "{ty} rows={rows} cols={cols} n_tokens={n_tokens} i={i}: {} vs {} (tol {tol})",
                        y[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_quantized_reuses_activations() {
    let mut rng = Rng::new(7);
    let cols = 512;
    let n_tokens = 3;
    let x = rng.f32s(n_tokens * cols, 2.0);
    let a = random_row(GgmlType::Q4_K, 16 * cols, &mut rng);
    let b = random_row(GgmlType::Q6_K, 8 * cols, &mut rng);
    let wa = QMatrix::new(GgmlType::Q4_K, 16, cols, &a).unwrap();
    let wb = QMatrix::new(GgmlType::Q6_K, 8, cols, &b).unwrap();
    let qa = quantize_activations(vec_dot_type(wa.ty).unwrap(), &x, n_tokens, cols).unwrap();
    for w in [wa, wb] {
        let mut y1 = vec![0f32; n_tokens * w.rows];
        let mut y2 = vec![0f32; n_tokens * w.rows];
        matmul_quantized(&w, &qa, &mut y1).unwrap();
        matmul(&w, &x, n_tokens, &mut y2).unwrap();
        assert_eq!(y1, y2);
    }
    // Wrong activation type for the weights.
    let q8 = quantize_activations(GgmlType::Q8_0, &x, n_tokens, cols).unwrap();
    let mut y = vec![0f32; n_tokens * 16];
    assert!(matches!(
        matmul_quantized(&wa, &q8, &mut y),
        Err(KernelError::ActivationType { .. })
    ));
}

#[test]
fn matmul_large_parallel_path() {
    // Big enough to take the rayon path for 1 and several tokens.
    let mut rng = Rng::new(3);
    for &ty in &[GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16] {
        let (rows, cols) = (300, 1024);
        let data = random_row(ty, rows * cols, &mut rng);
        let w = QMatrix::new(ty, rows, cols, &data).unwrap();
        for &n_tokens in &[1usize, 4] {
            let x = rng.f32s(n_tokens * cols, 1.0);
            let mut y = vec![0f32; n_tokens * rows];
            matmul(&w, &x, n_tokens, &mut y).unwrap();
            // Same as token-by-token single-row products.
            let qa = quantize_activations(vec_dot_type(ty).unwrap(), &x, n_tokens, cols).unwrap();
            for t in 0..n_tokens {
                let qt = quantize_activations(
                    vec_dot_type(ty).unwrap(),
                    &x[t * cols..(t + 1) * cols],
                    1,
                    cols,
                )
                .unwrap();
                for r in 0..rows {
                    let wr = QMatrix::new(ty, 1, cols, w.row(r).unwrap()).unwrap();
                    let mut one = [0f32];
                    matmul_quantized(&wr, &qt, &mut one).unwrap();
                    assert_eq!(one[0], y[t * rows + r], "{ty} t={t} r={r}");
                }
            }
            let mut y2 = vec![0f32; n_tokens * rows];
            matmul_quantized(&w, &qa, &mut y2).unwrap();
            assert_eq!(y, y2);
        }
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let data = vec![0u8; 2 * 34];
    let w = QMatrix {
        ty: GgmlType::Q8_0,
        rows: 2,
        cols: 32,
        data: &data,
        layout: Layout::Ggml,
    };
    let x = vec![0f32; 32];
    let mut y = vec![0f32; 2];
    assert!(matmul(&w, &x, 1, &mut y).is_ok());
    // Output too short / too long.
    assert!(matches!(
        matmul(&w, &x, 1, &mut y[..1]),
        Err(KernelError::Length { .. })
    ));
    assert!(matches!(
        matmul(&w, &x, 1, &mut [0f32; 3]),
        Err(KernelError::Length { .. })
    ));
    // Activations for the wrong number of tokens.
    assert!(matches!(
        matmul(&w, &x, 2, &mut [0f32; 4]),
        Err(KernelError::Length { .. })
    ));
    // Weight data of the wrong size.
    let short = QMatrix {
        ty: GgmlType::Q8_0,
        rows: 2,
        cols: 32,
        data: &data[..60],
        layout: Layout::Ggml,
    };
    assert!(matches!(
        matmul(&short, &x, 1, &mut y),
        Err(KernelError::Length { .. })
    ));
    // Columns not a whole number of blocks.
    let odd = QMatrix {
        ty: GgmlType::Q8_0,
        rows: 2,
        cols: 33,
        data: &data,
        layout: Layout::Ggml,
    };
    assert!(matches!(
        matmul(&odd, &[0f32; 33], 1, &mut y),
        Err(KernelError::NotBlockMultiple { .. })
    ));
    // Unsupported weight type.
    let i32m = QMatrix {
        ty: GgmlType::I32,
        rows: 1,
        cols: 2,
        data: &data[..8],
        layout: Layout::Ggml,
    };
    assert!(matches!(
        matmul(&i32m, &[0f32; 2], 1, &mut [0f32]),
        Err(KernelError::UnsupportedType(_))
    ));
    assert!(QMatrix::new(GgmlType::Q8_0, 3, 32, &data).is_err());
    // Overflowing sizes do not panic.
    let huge = QMatrix {
        ty: GgmlType::F32,
        rows: usize::MAX,
        cols: usize::MAX,
        data: &data,
        layout: Layout::Ggml,
    };
    assert!(matmul(&huge, &x, 1, &mut y).is_err());
    assert!(matmul(&w, &x, usize::MAX, &mut y).is_err());
    // Zero tokens is a no-op.
    assert!(matmul(&w, &[], 0, &mut []).is_ok());
}

#[test]
fn dequantize_row_rejects_bad_sizes() {
    let mut out = vec![0f32; 32];
    assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut out).is_ok());
    assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
    assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).is_err());
    assert!(dequantize_row(GgmlType::Q4_K, &[0u8; 144], &mut out).is_err());
    assert!(dequantize_row(GgmlType::I8, &[0u8; 32], &mut out).is_err());
    assert!(dequantize_row(GgmlType::F32, &[0u8; 128], &mut out).is_ok());
}

#[test]
fn q8_0_round_trip_error_bound() {
    let mut rng = Rng::new(11);
    for &nb in &[1usize, 3, 7, 28] {
        let x = rng.f32s(nb * 32, 3.0);
        let mut q = vec![BlockQ8_0::default(); nb];
        quantize_row_q8_0(&x, &mut q);
        let mut back = vec![0f32; nb * 32];
        dequantize_row(GgmlType::Q8_0, blocks_as_bytes(&q), &mut back).unwrap();
        for b in 0..nb {
            let xs = &x[b * 32..b * 32 + 32];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half a step, plus the f16 rounding of d (relative 2^-11 of each value).
            let bound = amax / 127.0 * 0.5 + amax * 1e-3;
            for j in 0..32 {
                assert!(
                    (xs[j] - back[b * 32 + j]).abs() <= bound,
                    "block {b} elem {j}"
                );
            }
        }
        // Scalar reference agrees exactly with the dispatched quantizer.
        let mut r = vec![BlockQ8_0::default(); nb];
        scalar::quantize_row_q8_0(&x, &mut r);
        assert_eq!(blocks_as_bytes(&q), blocks_as_bytes(&r));
    }
    // All zeros.
    let mut q = [BlockQ8_0::default()];
    quantize_row_q8_0(&[0f32; 32], &mut q);
    assert!(q[0].qs.iter().all(|&v| v == 0));
}

#[test]
fn q8_k_round_trip_error_bound() {
    let mut rng = Rng::new(12);
    for &nb in &[1usize, 3, 7] {
        let x = rng.f32s(nb * 256, 5.0);
        let mut q = vec![BlockQ8K::default(); nb];
        quantize_row_q8_k(&x, &mut q);
        for b in 0..nb {
            let xs = &x[b * 256..b * 256 + 256];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = amax / 127.0 * 0.5 * 1.0001;
            for (j, (&v, &qv)) in xs.iter().zip(&q[b].qs).enumerate() {
                let back = qv as f32 * q[b].d;
                assert!((v - back).abs() <= bound, "block {b} elem {j}");
            }
            for g in 0..16 {
                let s: i32 = q[b].qs[g * 16..g * 16 + 16].iter().map(|&v| v as i32).sum();
                assert_eq!(s, q[b].bsums[g] as i32);
            }
        }
    }
}

#[test]
fn qmatrix_dequantize_row() {
    let mut rng = Rng::new(21);
    let data = random_row(GgmlType::Q5_0, 3 * 64, &mut rng);
    let w = QMatrix::new(GgmlType::Q5_0, 3, 64, &data).unwrap();
    let mut a = vec![0f32; 64];
    let mut b = vec![0f32; 64];
    w.dequantize_row(2, &mut a).unwrap();
    dequantize_row(GgmlType::Q5_0, &data[2 * 44..3 * 44], &mut b).unwrap();
    assert_eq!(a, b);
    assert!(w.dequantize_row(3, &mut a).is_err());
    assert!(w.dequantize_row(0, &mut a[..32]).is_err());
}
