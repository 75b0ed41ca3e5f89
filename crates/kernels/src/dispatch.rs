//! Run-time selection between the scalar reference kernels and the SIMD ones.
//!
//! The public functions here take the same arguments as their [`crate::scalar`] counterparts
//! and use the fastest implementation the CPU supports. Dot products run over the shorter of
//! the two slices; quantizers over `min(x.len() / block, y.len())` blocks.

use crate::blocks::*;
use crate::scalar;
use half::{bf16, f16};
use std::sync::OnceLock;

/// Which kernel family is in use. The levels are ordered: a level uses its own kernels where
/// it has them and the next lower level's everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2's features plus AVX-512 F/BW/VL/VNNI (Ice Lake and later Xeons, Zen 4 and later):
    /// 16-row `vpdpbusd`/`vpdpwssd` kernels for matrices times several tokens (prefill,
    /// batched decode); one token still uses the AVX2 streaming kernels, which are bound by
    /// memory, not by the arithmetic.
    Avx512,
}

impl SimdLevel {
    /// The name `MODU_KERNELS` accepts for this level.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// The best level this CPU supports.
pub fn detected_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::x86::available() {
            if crate::x86::available_avx512() {
                return SimdLevel::Avx512;
            }
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Scalar
}

/// The level `MODU_KERNELS` asks for: `None` when unset, empty or `auto`; an error message for
/// a name that is not a level.
fn requested_level(v: Option<&str>) -> Result<Option<SimdLevel>, String> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .find(|l| l.name().eq_ignore_ascii_case(v))
        .map(Some)
        .or_else(|| v.eq_ignore_ascii_case("auto").then_some(None))
        .ok_or_else(|| format!("MODU_KERNELS={v:?} is not one of auto, scalar, avx2, avx512"))
}

/// The kernel family chosen for this process, detected once. `MODU_KERNELS=scalar|avx2|avx512`
/// forces a level (so every path can be tested on one machine); a level above what the CPU
/// supports is lowered to the detected one (running its instructions would fault), with a
/// warning, and so is a name that is not a level.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected_level();
        match requested_level(std::env::var("MODU_KERNELS").ok().as_deref()) {
            Ok(None) => detected,
            Ok(Some(want)) if want <= detected => want,
            Ok(Some(want)) => {
                eprintln!(
                    "warning: MODU_KERNELS={} is not supported by this CPU; using {}",
                    want.name(),
                    detected.name()
                );
                detected
            }
            Err(e) => {
                eprintln!("warning: {e}; using {}", detected.name());
                detected
            }
        }
    })
}

/// The AVX2 kernels may run (AVX2, FMA and F16C confirmed; also true at [`SimdLevel::Avx512`]).
#[inline(always)]
#[allow(dead_code)]
pub(crate) fn use_avx2() -> bool {
    simd_level() >= SimdLevel::Avx2
}

/// The AVX-512 kernels may run (AVX-512 F/BW/VL/VNNI and AVX2's features confirmed).
#[inline(always)]
#[allow(dead_code)]
pub(crate) fn use_avx512() -> bool {
    simd_level() >= SimdLevel::Avx512
}

/// Signature of a dot product of a weight row against an activation row.
pub type DotFn<W, A> = fn(&[W], &[A]) -> f32;

macro_rules! dot {
    ($(#[$m:meta])* $name:ident, $sel:ident, $w:ty, $a:ty, $scalar:path $(, $simd:path)?) => {
        #[inline]
        pub(crate) fn $sel() -> DotFn<$w, $a> {
            $(
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    return $simd;
                }
            )?
            $scalar
        }
        $(#[$m])*
        pub fn $name(x: &[$w], y: &[$a]) -> f32 {
            $sel()(x, y)
        }
    };
}

dot!(
    vec_dot_q4_0_q8_0,
    sel_q4_0,
    BlockQ4_0,
    BlockQ8_0,
    scalar::vec_dot_q4_0_q8_0,
    crate::x86::dot_q4_0
);
dot!(
    vec_dot_q4_1_q8_1,
    sel_q4_1,
    BlockQ4_1,
    BlockQ8_1,
    scalar::vec_dot_q4_1_q8_1,
    crate::x86::dot_q4_1
);
dot!(
    vec_dot_q5_0_q8_0,
    sel_q5_0,
    BlockQ5_0,
    BlockQ8_0,
    scalar::vec_dot_q5_0_q8_0,
    crate::x86::dot_q5_0
);
dot!(
    vec_dot_q5_1_q8_1,
    sel_q5_1,
    BlockQ5_1,
    BlockQ8_1,
    scalar::vec_dot_q5_1_q8_1,
    crate::x86::dot_q5_1
);
dot!(
    vec_dot_q8_0_q8_0,
    sel_q8_0,
    BlockQ8_0,
    BlockQ8_0,
    scalar::vec_dot_q8_0_q8_0,
    crate::x86::dot_q8_0
);
dot!(
    vec_dot_q2_k_q8_k,
    sel_q2_k,
    BlockQ2K,
    BlockQ8K,
    scalar::vec_dot_q2_k_q8_k,
    crate::x86::dot_q2_k
);
dot!(
    vec_dot_q3_k_q8_k,
    sel_q3_k,
    BlockQ3K,
    BlockQ8K,
    scalar::vec_dot_q3_k_q8_k,
    crate::x86::dot_q3_k
);
dot!(
    vec_dot_q4_k_q8_k,
    sel_q4_k,
    BlockQ4K,
    BlockQ8K,
    scalar::vec_dot_q4_k_q8_k,
    crate::x86::dot_q4_k
);
dot!(
    vec_dot_q5_k_q8_k,
    sel_q5_k,
    BlockQ5K,
    BlockQ8K,
    scalar::vec_dot_q5_k_q8_k,
    crate::x86::dot_q5_k
);
dot!(
    vec_dot_q6_k_q8_k,
    sel_q6_k,
    BlockQ6K,
    BlockQ8K,
    scalar::vec_dot_q6_k_q8_k,
    crate::x86::dot_q6_k
);
dot!(
    /// F32 weights as little-endian bytes against f32 activations.
    vec_dot_f32_bytes, sel_f32, u8, f32, scalar::vec_dot_f32, crate::x86::dot_f32
);
dot!(
    /// F16 weights as little-endian bytes against f16 activations.
    vec_dot_f16_bytes, sel_f16, u8, f16, scalar::vec_dot_f16, crate::x86::dot_f16
);
dot!(
    /// BF16 weights as little-endian bytes against bf16 activations.
    vec_dot_bf16_bytes, sel_bf16, u8, bf16, scalar::vec_dot_bf16, crate::x86::dot_bf16
);

/// Dot product of two f32 vectors (over the shorter length).
pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    // SAFETY: any f32 is 4 initialized bytes; u8 has alignment 1; the byte length is the exact
    // size of `x`, borrowed for the same lifetime.
    let bytes =
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) };
    sel_f32()(bytes, y)
}

/// Dot product of two f16 vectors (over the shorter length).
pub fn vec_dot_f16(x: &[f16], y: &[f16]) -> f32 {
    // SAFETY: f16 is a transparent u16 (2 initialized bytes); u8 has alignment 1; the byte
    // length is the exact size of `x`.
    let bytes =
        unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) };
    sel_f16()(bytes, y)
}

macro_rules! quant {
    ($(#[$m:meta])* $name:ident, $sel:ident, $b:ty, $scalar:path $(, $simd:path)?) => {
        #[inline]
        pub(crate) fn $sel() -> fn(&[f32], &mut [$b]) {
            $(
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    return $simd;
                }
            )?
            $scalar
        }
        $(#[$m])*
        pub fn $name(x: &[f32], y: &mut [$b]) {
            $sel()(x, y)
        }
    };
}

quant!(
    /// Quantize activations to Q8_0 (`x.len() == 32 * y.len()`).
    quantize_row_q8_0, sel_quant_q8_0, BlockQ8_0, scalar::quantize_row_q8_0, crate::x86::quant_q8_0
);
quant!(
    /// Quantize activations to Q8_1 (`x.len() == 32 * y.len()`).
    quantize_row_q8_1, sel_quant_q8_1, BlockQ8_1, scalar::quantize_row_q8_1, crate::x86::quant_q8_1
);
quant!(
    /// Quantize activations to Q8_K (`x.len() == 256 * y.len()`).
    quantize_row_q8_k, sel_quant_q8_k, BlockQ8K, scalar::quantize_row_q8_k, crate::x86::quant_q8_k
);

/// F16 bytes to f32.
pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        return crate::x86::deq_f16(src, dst);
    }
    scalar::dequantize_f16(src, dst)
}

/// Signature of a dot product of one weight row against four activation rows.
pub type Dot4Fn<W, A> = fn(&[W], [&[A]; 4]) -> [f32; 4];

macro_rules! dot4 {
    ($sel4:ident, $w:ty, $a:ty $(, $simd:path)?) => {
        /// The four-row kernel, if this CPU has one (results bit-identical to the single one).
        #[inline]
        pub(crate) fn $sel4() -> Option<Dot4Fn<$w, $a>> {
            $(
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    return Some($simd);
                }
            )?
            None
        }
    };
}

dot4!(sel4_q4_0, BlockQ4_0, BlockQ8_0, crate::x86::dot4_q4_0);
dot4!(sel4_q5_0, BlockQ5_0, BlockQ8_0, crate::x86::dot4_q5_0);
dot4!(sel4_q8_0, BlockQ8_0, BlockQ8_0, crate::x86::dot4_q8_0);
dot4!(sel4_q4_k, BlockQ4K, BlockQ8K, crate::x86::dot4_q4_k);
dot4!(sel4_q6_k, BlockQ6K, BlockQ8K, crate::x86::dot4_q6_k);
dot4!(sel4_q4_1, BlockQ4_1, BlockQ8_1);
dot4!(sel4_q5_1, BlockQ5_1, BlockQ8_1);
dot4!(sel4_q2_k, BlockQ2K, BlockQ8K);
dot4!(sel4_q3_k, BlockQ3K, BlockQ8K);
dot4!(sel4_q5_k, BlockQ5K, BlockQ8K);
dot4!(sel4_f32, u8, f32);
dot4!(sel4_f16, u8, f16);
dot4!(sel4_bf16, u8, bf16);

/// `acc[i] = f16(acc[i] + v[i]·w)` (see [`scalar::mad_f16`]).
pub fn mad_f16(acc: &mut [f16], v: &[f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C.
        return unsafe { crate::x86::mad_f16(acc, v, w) };
    }
    scalar::mad_f16(acc, v, w)
}

/// `out[h] = vec_dot_f16(k, q_h)` for the rows `q_h = q[h·d..(h+1)·d]`, `d = k.len()`, of
/// f16 values given widened to f32 (exactly representable, so the result is that of the f16
/// rows), one row per element of `out`: the query heads that share a KV head against one key.
pub fn vec_dot_f16_rows(k: &[f16], q: &[f32], out: &mut [f32]) {
    let d = k.len();
    assert!(
        q.len() >= out.len() * d,
        "q holds fewer than out.len() rows"
    );
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: use_avx512() means the CPU has AVX-512 F/BW/VL/VNNI and AVX2, FMA and F16C;
        // the length is checked.
        return unsafe { crate::avx512::vec_dot_f16_rows(k, q, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C; the length is checked.
        return unsafe { crate::x86::vec_dot_f16_rows(k, q, out) };
    }
    let mut q16 = vec![f16::ZERO; d];
    for (h, o) in out.iter_mut().enumerate() {
        for (a, &b) in q16.iter_mut().zip(&q[h * d..(h + 1) * d]) {
            *a = f16::from_f32(b);
        }
        *o = vec_dot_f16(k, &q16);
    }
}

/// [`mad_f16`] of `v` into each row `acc[h·d..(h+1)·d]` (`d = v.len()`) with weight `w[h]`.
pub fn mad_f16_rows(acc: &mut [f16], v: &[f16], w: &[f32]) {
    let d = v.len();
    assert!(
        acc.len() >= w.len() * d,
        "acc holds fewer than w.len() rows"
    );
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: use_avx512() means the CPU has AVX-512 F/BW/VL/VNNI and AVX2, FMA and F16C;
        // the length is checked.
        return unsafe { crate::avx512::mad_f16_rows(acc, v, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C; the length is checked.
        return unsafe { crate::x86::mad_f16_rows(acc, v, w) };
    }
    for (h, &wh) in w.iter().enumerate() {
        scalar::mad_f16(&mut acc[h * d..(h + 1) * d], v, wh);
    }
}

/// `acc[i] = f16(acc[i]·s)` (see [`scalar::scale_f16`]).
pub fn scale_f16(acc: &mut [f16], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C.
        return unsafe { crate::x86::scale_f16(acc, s) };
    }
    scalar::scale_f16(acc, s)
}

/// `out[r] = Σ_c w[r·k + c]·x[c]` with `k = x.len()` and `out.len()` rows of f16 weights against
/// f16 activations, each output summed the way llamafile's tinyBLAS does (see
/// [`scalar::vec_dot_f16_tiny`]), which is what ggml's CPU `mul_mat` uses for F16 weights when
/// `k` is a multiple of 8 (LoRA adapters). Rows beyond `w.len() / k` are left untouched.
pub fn matvec_f16_tiny(w: &[f16], x: &[f16], out: &mut [f32]) {
    let k = x.len();
    let rows = w.len().checked_div(k).map_or(0, |r| out.len().min(r));
    let out = &mut out[..rows];
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C; rows·k <= w.len().
        return unsafe { crate::x86::matvec_f16_tiny(w, x, out) };
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = scalar::vec_dot_f16_tiny(&w[r * k..(r + 1) * k], x);
    }
}

/// `out[r] = Σ_c w[r·k + c]·x[c]` with `k = x.len()`, each output summed exactly as ggml's
/// `ggml_vec_dot_f16` does (see [`scalar::vec_dot_f16_ggml`]): what ggml's CPU `mul_mat` uses
/// for F16 weights when tinyBLAS does not (a single token). Rows beyond `w.len() / k` are left
/// untouched.
pub fn matvec_f16_ggml(w: &[f16], x: &[f16], out: &mut [f32]) {
    let k = x.len();
    let rows = w.len().checked_div(k).map_or(0, |r| out.len().min(r));
    let out = &mut out[..rows];
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C; rows·k <= w.len().
        return unsafe { crate::x86::matvec_f16_ggml(w, x, out) };
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = scalar::vec_dot_f16_ggml(&w[r * k..(r + 1) * k], x);
    }
}

/// SwiGLU's product in place (see [`scalar::silu_mul`]; the same bits on every path).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: use_avx2() means the CPU has AVX2, FMA and F16C.
        return unsafe { crate::x86::silu_mul(gate, up) };
    }
    scalar::silu_mul(gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_f16_tiny_matches_the_scalar_reference_bitwise() {
        for k in [8usize, 16, 24, 64, 96, 896, 13, 45, 1, 31, 33, 4864] {
            let rows = 37;
            // Magnitudes over ~2^-8..2^8, so that the f64 sums of the short rows round.
            let w: Vec<f16> = (0..rows * k)
                .map(|i| {
                    let m = (((i * 7919) % 201) as f32 - 100.0) / 37.0;
                    f16::from_f32(m * (2f32).powi((i % 17) as i32 - 8))
                })
                .collect();
            let x: Vec<f16> = (0..k)
                .map(|i| f16::from_f32((((i * 104729) % 97) as f32 - 48.0) / 11.0))
                .collect();
            let mut out = vec![0f32; rows];
            matvec_f16_tiny(&w, &x, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = scalar::vec_dot_f16_tiny(&w[r * k..(r + 1) * k], &x);
                assert_eq!(o.to_bits(), want.to_bits(), "tiny k {k} row {r}");
            }
            matvec_f16_ggml(&w, &x, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = scalar::vec_dot_f16_ggml(&w[r * k..(r + 1) * k], &x);
                assert_eq!(o.to_bits(), want.to_bits(), "ggml k {k} row {r}");
            }
        }
    }
}

#[cfg(test)]
mod level_tests {
    use super::*;

    #[test]
    fn modu_kernels_names_parse_and_order() {
        assert_eq!(requested_level(None), Ok(None));
        assert_eq!(requested_level(Some(" ")), Ok(None));
        assert_eq!(requested_level(Some("AUTO")), Ok(None));
        assert_eq!(requested_level(Some("scalar")), Ok(Some(SimdLevel::Scalar)));
        assert_eq!(requested_level(Some("AVX2")), Ok(Some(SimdLevel::Avx2)));
        assert_eq!(requested_level(Some("avx512")), Ok(Some(SimdLevel::Avx512)));
        let e = requested_level(Some("avx10")).unwrap_err();
        assert!(e.contains("avx10") && e.contains("avx512"), "{e}");
        assert!(SimdLevel::Scalar < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        // Never above what the CPU runs.
        assert!(simd_level() <= detected_level());
    }
}
