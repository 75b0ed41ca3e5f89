//! Deterministic random data for tests and benchmarks (not part of the stable API).

use half::{bf16, f16};
use modu_gguf::GgmlType;

/// SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-a, a).
    pub fn sym(&mut self, a: f32) -> f32 {
        (self.unit() * 2.0 - 1.0) * a
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    pub fn f32s(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(a)).collect()
    }
}

/// Byte offsets of the f16 fields (scales, mins) inside one block of `ty`.
pub fn f16_field_offsets(ty: GgmlType) -> &'static [usize] {
    use GgmlType as T;
    match ty {
        T::Q4_0 | T::Q5_0 | T::Q8_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q2_K => &[80, 82],
        T::Q3_K => &[108],
        T::Q6_K => &[208],
        _ => &[],
    }
}

/// `n` elements of `ty` with random contents and finite, modest scales.
pub fn random_row(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    use GgmlType as T;
    match ty {
        T::F32 => rng
            .f32s(n, 1.0)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        T::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.sym(1.0)).to_le_bytes())
            .collect(),
        T::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.sym(1.0)).to_le_bytes())
            .collect(),
        _ => {
            let bs = ty.block_size();
            let ts = ty.type_size();
            let nb = n / bs;
            let mut v = rng.bytes(nb * ts);
            for b in 0..nb {
                for &off in f16_field_offsets(ty) {
                    let d = f16::from_f32(rng.sym(0.05)).to_le_bytes();
                    v[b * ts + off..b * ts + off + 2].copy_from_slice(&d);
                }
            }
            v
        }
    }
}
