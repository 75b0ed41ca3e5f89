//! Scalar reference implementations: dequantization, activation quantization and dot products.
//!
//! These define the numerics; the SIMD kernels are tested against them. Slices of blocks are
//! expected to match in length (callers validate); extra elements are ignored.

// Index loops mirror the format descriptions.
#![allow(clippy::needless_range_loop)]

use crate::blocks::*;
use half::{bf16, f16};
use modu_gguf::QK_K;

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

pub fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(b.d);
        for j in 0..QK / 2 {
            out[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            out[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(b.d), f16_le(b.m));
        for j in 0..QK / 2 {
            out[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            out[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// The 5-bit values of a Q5 block (0..=31), in element order.
#[inline(always)]
fn q5_values(qh: [u8; 4], qs: &[u8; 16]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (h0 << 4);
        q[j + 16] = (qs[j] >> 4) | (h1 << 4);
    }
    q
}

pub fn dequantize_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(b.d);
        let q = q5_values(b.qh, &b.qs);
        for j in 0..QK {
            out[j] = (q[j] as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(b.d), f16_le(b.m));
        let q = q5_values(b.qh, &b.qs);
        for j in 0..QK {
            out[j] = q[j] as f32 * d + m;
        }
    }
}

pub fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(b.d);
        for j in 0..QK {
            out[j] = b.qs[j] as f32 * d;
        }
    }
}

/// Unpacked Q2_K block: 2-bit values in element order.
#[inline(always)]
pub(crate) fn q2k_values(b: &BlockQ2K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for half in 0..2 {
        let qs = &b.qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for l in 0..32 {
                q[half * 128 + j * 32 + l] = (qs[l] >> shift) & 3;
            }
        }
    }
    q
}

pub fn dequantize_q2_k(x: &[BlockQ2K], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_le(b.d), f16_le(b.dmin));
        let q = q2k_values(b);
        for g in 0..16 {
            let sc = b.scales[g];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            for l in 0..16 {
                out[g * 16 + l] = dl * q[g * 16 + l] as f32 - ml;
            }
        }
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (already minus 32).
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Unpacked Q3_K block: signed 3-bit values (-4..=3) in element order.
#[inline(always)]
pub(crate) fn q3k_values(b: &BlockQ3K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let qs = &b.qs[half * 32..half * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            let m = 1u8 << (half * 4 + j);
            for l in 0..32 {
                let low = ((qs[l] >> shift) & 3) as i8;
                let sub = if b.hmask[l] & m != 0 { 0 } else { 4 };
                q[half * 128 + j * 32 + l] = low - sub;
            }
        }
    }
    q
}

pub fn dequantize_q3_k(x: &[BlockQ3K], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_le(b.d);
        let sc = q3k_scales(&b.scales);
        let q = q3k_values(b);
        for g in 0..16 {
            let dl = d * sc[g] as f32;
            for l in 0..16 {
                out[g * 16 + l] = dl * q[g * 16 + l] as f32;
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Unpacked 4-bit values of a Q4_K block, in element order.
#[inline(always)]
pub(crate) fn q4k_values(qs: &[u8; 128]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            q[c * 64 + l] = qs[c * 32 + l] & 0x0F;
            q[c * 64 + 32 + l] = qs[c * 32 + l] >> 4;
        }
    }
    q
}

pub fn dequantize_q4_k(x: &[BlockQ4K], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_le(b.d), f16_le(b.dmin));
        let q = q4k_values(&b.qs);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b.scales);
            let d1 = d * sc as f32;
            let m1 = dmin * m as f32;
            for l in 0..32 {
                out[j * 32 + l] = d1 * q[j * 32 + l] as f32 - m1;
            }
        }
    }
}

/// Unpacked 5-bit values of a Q5_K block, in element order.
#[inline(always)]
pub(crate) fn q5k_values(b: &BlockQ5K) -> [u8; QK_K] {
    let mut q = q4k_values(&b.qs);
    for (j, v) in q.iter_mut().enumerate() {
        let bit = (b.qh[j % 32] >> (j / 32)) & 1;
        *v |= bit << 4;
    }
    q
}

pub fn dequantize_q5_k(x: &[BlockQ5K], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_le(b.d), f16_le(b.dmin));
        let q = q5k_values(b);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b.scales);
            let d1 = d * sc as f32;
            let m1 = dmin * m as f32;
            for l in 0..32 {
                out[j * 32 + l] = d1 * q[j * 32 + l] as f32 - m1;
            }
        }
    }
}

/// Unpacked signed 6-bit values (-32..=31) of a Q6_K block, in element order.
#[inline(always)]
pub(crate) fn q6k_values(b: &BlockQ6K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let ql = &b.ql[half * 64..half * 64 + 64];
        let qh = &b.qh[half * 32..half * 32 + 32];
        let o = &mut q[half * 128..half * 128 + 128];
        for l in 0..32 {
            o[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

pub fn dequantize_q6_k(x: &[BlockQ6K], y: &mut [f32]) {
    for (b, out) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_le(b.d);
        let q = q6k_values(b);
        for g in 0..16 {
            let dl = d * b.scales[g] as f32;
            for l in 0..16 {
                out[g * 16 + l] = dl * q[g * 16 + l] as f32;
            }
        }
    }
}

pub fn dequantize_f32(x: &[u8], y: &mut [f32]) {
    for (c, o) in x.chunks_exact(4).zip(y.iter_mut()) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub fn dequantize_f16(x: &[u8], y: &mut [f32]) {
    for (c, o) in x.chunks_exact(2).zip(y.iter_mut()) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub fn dequantize_bf16(x: &[u8], y: &mut [f32]) {
    for (c, o) in x.chunks_exact(2).zip(y.iter_mut()) {
        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (same rounding as ggml's reference quantizers)
// ---------------------------------------------------------------------------------------------

/// Quantize one block of 32 values to Q8_0: `d = amax / 127`, `q = round(x / d)` (half away
/// from zero). Returns the block and the f32 `d` (before f16 rounding).
#[inline(always)]
fn q8_block(x: &[f32]) -> ([i8; QK], f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; QK];
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * id).round() as i8;
    }
    (q, d)
}

/// `x.len()` must be `32 * y.len()`.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (q, d) = q8_block(xs);
        b.d = f16_bytes(d);
        b.qs = q;
    }
}

/// `x.len()` must be `32 * y.len()`. `s = d * Σ q` with the unrounded `d`.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (q, d) = q8_block(xs);
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        b.d = f16_bytes(d);
        b.s = f16_bytes(sum as f32 * d);
        b.qs = q;
    }
}

/// `x.len()` must be `256 * y.len()`. Scale from the value of largest magnitude (first one
/// wins) so that it maps to -127; rounding half to even; values clamped to 127.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    for (b, xs) in y.iter_mut().zip(x.chunks_exact(QK_K)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0f32 / max;
        for (o, &v) in b.qs.iter_mut().zip(xs) {
            let q = (iscale * v).round_ties_even() as i32;
            *o = q.min(127) as i8;
        }
        for (g, s) in b.bsums.iter_mut().enumerate() {
            *s = b.qs[g * 16..g * 16 + 16].iter().map(|&v| v as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn idot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[inline(always)]
fn udot(a: &[u8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += ((a.qs[j] & 0x0F) as i32 - 8) * b.qs[j] as i32;
            sumi += ((a.qs[j] >> 4) as i32 - 8) * b.qs[j + QK / 2] as i32;
        }
        sum += sumi as f32 * (f16_le(a.d) * f16_le(b.d));
    }
    sum
}

pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (a.qs[j] & 0x0F) as i32 * b.qs[j] as i32;
            sumi += (a.qs[j] >> 4) as i32 * b.qs[j + QK / 2] as i32;
        }
        sum += sumi as f32 * (f16_le(a.d) * f16_le(b.d)) + f16_le(a.m) * f16_le(b.s);
    }
    sum
}

pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q5_values(a.qh, &a.qs);
        let sumi: i32 = q
            .iter()
            .zip(&b.qs)
            .map(|(&u, &v)| (u as i32 - 16) * v as i32)
            .sum();
        sum += sumi as f32 * (f16_le(a.d) * f16_le(b.d));
    }
    sum
}

pub fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q5_values(a.qh, &a.qs);
        let sumi = udot(&q, &b.qs);
        sum += sumi as f32 * (f16_le(a.d) * f16_le(b.d)) + f16_le(a.m) * f16_le(b.s);
    }
    sum
}

pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        sum += idot(&a.qs, &b.qs) as f32 * (f16_le(a.d) * f16_le(b.d));
    }
    sum
}

pub fn vec_dot_q2_k_q8_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q2k_values(a);
        let mut isum = 0i32;
        let mut summs = 0i32;
        for g in 0..16 {
            let sc = a.scales[g];
            summs += (sc >> 4) as i32 * b.bsums[g] as i32;
            isum += (sc & 0x0F) as i32 * udot(&q[g * 16..g * 16 + 16], &b.qs[g * 16..g * 16 + 16]);
        }
        sum += b.d * f16_le(a.d) * isum as f32 - b.d * f16_le(a.dmin) * summs as f32;
    }
    sum
}

pub fn vec_dot_q3_k_q8_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q3k_values(a);
        let sc = q3k_scales(&a.scales);
        let mut isum = 0i32;
        for g in 0..16 {
            isum += sc[g] as i32 * idot(&q[g * 16..g * 16 + 16], &b.qs[g * 16..g * 16 + 16]);
        }
        sum += b.d * f16_le(a.d) * isum as f32;
    }
    sum
}

pub fn vec_dot_q4_k_q8_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q4k_values(&a.qs);
        let (mut isum, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &a.scales);
            isum += sc as i32 * udot(&q[j * 32..j * 32 + 32], &b.qs[j * 32..j * 32 + 32]);
            summ += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
        }
        sum += b.d * f16_le(a.d) * isum as f32 - b.d * f16_le(a.dmin) * summ as f32;
    }
    sum
}

pub fn vec_dot_q5_k_q8_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q5k_values(a);
        let (mut isum, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &a.scales);
            isum += sc as i32 * udot(&q[j * 32..j * 32 + 32], &b.qs[j * 32..j * 32 + 32]);
            summ += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
        }
        sum += b.d * f16_le(a.d) * isum as f32 - b.d * f16_le(a.dmin) * summ as f32;
    }
    sum
}

pub fn vec_dot_q6_k_q8_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let q = q6k_values(a);
        let mut isum = 0i32;
        for g in 0..16 {
            isum += a.scales[g] as i32 * idot(&q[g * 16..g * 16 + 16], &b.qs[g * 16..g * 16 + 16]);
        }
        sum += b.d * f16_le(a.d) * isum as f32;
    }
    sum
}

/// F32 weights given as little-endian bytes.
pub fn vec_dot_f32(x: &[u8], y: &[f32]) -> f32 {
    let mut sum = 0.0f64;
    for (c, &b) in x.chunks_exact(4).zip(y) {
        sum += (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * b) as f64;
    }
    sum as f32
}

/// F16 weights given as little-endian bytes, activations rounded to f16.
pub fn vec_dot_f16(x: &[u8], y: &[f16]) -> f32 {
    let mut sum = 0.0f64;
    for (c, b) in x.chunks_exact(2).zip(y) {
        sum += (f16::from_le_bytes([c[0], c[1]]).to_f32() * b.to_f32()) as f64;
    }
    sum as f32
}

/// BF16 weights given as little-endian bytes, activations rounded to bf16.
pub fn vec_dot_bf16(x: &[u8], y: &[bf16]) -> f32 {
    let mut sum = 0.0f64;
    for (c, b) in x.chunks_exact(2).zip(y) {
        sum += (bf16::from_le_bytes([c[0], c[1]]).to_f32() * b.to_f32()) as f64;
    }
    sum as f32
}

// ---------------------------------------------------------------------------------------------
// f16 vector primitives (attention over an f16 KV cache)
// ---------------------------------------------------------------------------------------------

/// `acc[i] = f16(f32(acc[i]) + f32(v[i]) · w)`: an f16 accumulator, as llama.cpp's CPU flash
/// attention keeps its weighted sum of values (fused multiply-add, as ggml's AVX2 build).
pub fn mad_f16(acc: &mut [f16], v: &[f16], w: f32) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = f16::from_f32(x.to_f32().mul_add(w, a.to_f32()));
    }
}

/// `acc[i] = f16(f32(acc[i]) · s)`.
pub fn scale_f16(acc: &mut [f16], s: f32) {
    for a in acc.iter_mut() {
        *a = f16::from_f32(a.to_f32() * s);
    }
}

/// Dot product of two f16 vectors the way llamafile's tinyBLAS (ggml's CPU `mul_mat` for F16
/// weights on AVX2) computes one output: eight f32 lane accumulators, each a chain of fused
/// multiply-adds over the 8-element chunks in order, then the horizontal sum
/// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. A tail of `n % 8` elements (tinyBLAS never sees one)
/// is added afterwards in order.
pub fn vec_dot_f16_tiny(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for (xc, yc) in x[..full].chunks_exact(8).zip(y[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = xc[l].to_f32().mul_add(yc[l].to_f32(), acc[l]);
        }
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let mut s = (h[0] + h[2]) + (h[1] + h[3]);
    for i in full..n {
        s += x[i].to_f32() * y[i].to_f32();
    }
    s
}

/// Dot product of two f16 vectors exactly as ggml's `ggml_vec_dot_f16` computes it on AVX2
/// (what its CPU `mul_mat` uses for F16 weights when tinyBLAS does not take the job, e.g. for a
/// single token): four 8-lane FMA accumulators over 32-element steps, reduced as
/// `(a0+a2)+(a1+a3)`, then the lanes as `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`; the remaining
/// `n % 32` products (each rounded to f32) are summed in f64, and the result rounded to f32.
pub fn vec_dot_f16_ggml(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len().min(y.len());
    let np = n / 32 * 32;
    let mut acc = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, al) in a.iter_mut().enumerate() {
                let k = i + 8 * j + l;
                *al = x[k].to_f32().mul_add(y[k].to_f32(), *al);
            }
        }
    }
    let v: [f32; 8] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let t0 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let mut sum = ((t0[0] + t0[1]) + (t0[2] + t0[3])) as f64;
    for i in np..n {
        sum += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    sum as f32
}

// ---------------------------------------------------------------------------------------------
// Activation functions
// ---------------------------------------------------------------------------------------------

/// Inputs of [`exp_f32`] are clamped to this range, so that `2^n` stays a normal f32.
pub const EXP_MIN: f32 = -87.0;
pub const EXP_MAX: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody and Waite): `n·LN2_HI` is exact for the `n` that occur.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r ≈ 1 + r + r²·P(r)` on `|r| <= ln2 / 2`: P's coefficients, highest degree first (the
/// minimax polynomial of Cephes' `expf`, whose constant term rounds to 0.5 in f32).
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` in f32, within 2 ulp of the exact value for `x` in [`EXP_MIN`, `EXP_MAX`] (clamped
/// outside). Every step is an IEEE operation with one rounding (`mul_add` is a fused
/// multiply-add), so the AVX2 version, which does the same steps, gives the same bits.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let e = (p * r).mul_add(r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// SwiGLU's product in place: `gate[i] = gate[i] / (1 + e^-gate[i]) · up[i]` (SiLU of the gate
/// times the up projection), over the shorter of the two slices.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_f32(-*g)) * u;
    }
}

#[cfg(test)]
mod activation_tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_clamps() {
        let mut worst = 0f64;
        let mut x = EXP_MIN;
        while x <= EXP_MAX {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            // One ulp of the exact value (an f32 has a 24-bit significand).
            let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_77;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), exp_f32(EXP_MIN));
        assert_eq!(exp_f32(1000.0), exp_f32(EXP_MAX));
        assert!(exp_f32(EXP_MAX).is_finite() && exp_f32(EXP_MIN) > 0.0);
    }

    #[test]
    fn silu_mul_is_silu_times_up() {
        let mut g = [0.0f32, 1.0, -1.0, 4.0, -20.0, 30.0];
        let u = [2.0f32, 0.5, 1.0, -1.0, 1.0, 1.0];
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&x, &y)| x as f64 / (1.0 + (-x as f64).exp()) * y as f64)
            .collect();
        silu_mul(&mut g, &u);
        for (a, b) in g.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-6),
                "{a} vs {b}"
            );
        }
    }
}
