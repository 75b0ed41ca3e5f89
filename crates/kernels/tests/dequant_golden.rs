//! Dequantization against golden vectors made by the PyPI `gguf` package's numpy code
//! (scripts/gen_dequant_golden.py): real tensors of both models and random blocks of the
//! types they lack. Reads only the committed files under tests/golden/.

use modu_kernels::{dequantize_row, GgmlType};
use std::path::PathBuf;

fn type_from_name(s: &str) -> GgmlType {
    (0..64)
        .filter_map(GgmlType::from_u32)
        .find(|t| t.name() == s)
        .unwrap_or_else(|| panic!("unknown type {s}"))
}

#[test]
fn dequantize_matches_gguf_py() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let manifest = std::fs::read_to_string(dir.join("manifest.txt")).expect("manifest.txt");
    let mut checked = 0usize;
    let mut types = std::collections::BTreeSet::new();
    for line in manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (stem, ty, rows, n) = (
            f[0],
            type_from_name(f[1]),
            f[2].parse::<usize>().unwrap(),
            f[3].parse::<usize>().unwrap(),
        );
        let raw = std::fs::read(dir.join(format!("{stem}.bin"))).unwrap();
        let exp: Vec<f32> = std::fs::read(dir.join(format!("{stem}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let rb = ty.row_bytes(n as u64).unwrap() as usize;
        assert_eq!(raw.len(), rows * rb, "{stem}: byte size");
        assert_eq!(exp.len(), rows * n, "{stem}: value count");
        let mut out = vec![0f32; n];
        for r in 0..rows {
            dequantize_row(ty, &raw[r * rb..(r + 1) * rb], &mut out).unwrap();
            for (i, (&got, &want)) in out.iter().zip(&exp[r * n..(r + 1) * n]).enumerate() {
                let ok = got == want || (got - want).abs() <= 1e-6 * want.abs();
                assert!(
                    ok,
                    "{stem} ({ty}) row {r} elem {i}: got {got:e}, want {want:e}"
                );
            }
            checked += n;
        }
        types.insert(ty.name());
    }
    let all = [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ];
    for t in all {
        assert!(types.contains(t), "no golden vector for {t}");
    }
    assert!(checked > 10_000);
}

#[test]
fn quantize_q8_0_matches_gguf_py() {
    use modu_kernels::{blocks_as_bytes, quantize_row_q8_0, scalar, BlockQ8_0};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let x: Vec<f32> = std::fs::read(dir.join("quant_q8_0_input.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want = std::fs::read(dir.join("quant_q8_0_expected.bin")).unwrap();
    let nb = x.len() / 32;
    assert_eq!(want.len(), nb * 34);
    let mut q = vec![BlockQ8_0::default(); nb];
    quantize_row_q8_0(&x, &mut q); // dispatched (SIMD where available)
    assert_eq!(blocks_as_bytes(&q), &want[..]);
    scalar::quantize_row_q8_0(&x, &mut q);
    assert_eq!(blocks_as_bytes(&q), &want[..]);
}
