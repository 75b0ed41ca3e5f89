//! Combining adapters and folding them into a base model.
//!
//! * [`linear`]: `ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`, exact: the ranks are concatenated (`A' = [A₁; A₂]`,
//!   `B' = [w₁s₁B₁  w₂s₂B₂]`), so the result has rank `Σ rᵢ` and needs no approximation.
//! * [`dense`] (TIES, DARE): these act element-wise on each dense `ΔWᵢ = sᵢ·Bᵢ·Aᵢ`, which destroys
//!   the low-rank structure, so the merged `ΔW` is re-factored to a chosen rank by a truncated
//!   SVD (randomized range finder with power iterations, then an exact small SVD). The result
//!   is therefore an approximation of the merged update, best in the least-squares sense at that
//!   rank up to the range finder's accuracy.
//! * [`merge_into_base`]: `W' = W + scale·ΔW` written as a standalone model. Each adapted
//!   weight is dequantized, updated, and stored again in its own type where this project has an
//!   encoder for it (F32, F16, BF16, Q8_0); other types (the K-quants, Q4_0/Q4_1/Q5_0/Q5_1) are
//!   stored as F16, since the kernels crate has no weight quantizer for them.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use half::{bf16, f16};
use modu_gguf::{GgmlType, GgufFile, GgufWriter};

use super::{LoraAdapter, LoraError, LoraTensor, Proj, MAX_RANK};

fn check_arch(ads: &[&LoraAdapter]) -> Result<Option<String>, LoraError> {
    let mut arch: Option<&str> = None;
    for a in ads {
        if let Some(x) = a.arch() {
            match arch {
                Some(y) if y != x => {
                    return Err(LoraError::ArchMismatch {
                        adapter: x.to_string(),
                        base: y.to_string(),
                    })
                }
                _ => arch = Some(x),
            }
        }
    }
    Ok(arch.map(str::to_string))
}

/// The tensors of `(layer, proj)` across adapters, with consistent shapes.
fn parts<'a>(
    ads: &[&'a LoraAdapter],
    il: usize,
    p: Proj,
) -> Result<Vec<(usize, &'a LoraTensor)>, LoraError> {
    let v: Vec<(usize, &LoraTensor)> = ads
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.tensor(il, p).map(|t| (i, t)))
        .collect();
    if let Some((_, t0)) = v.first() {
        for (i, t) in &v {
            if t.n_in != t0.n_in || t.n_out != t0.n_out {
                return Err(LoraError::ShapeMismatch {
                    name: format!("blk.{il}.{} of adapter {}", p.gguf_name(), ads[*i].name()),
                    expected: vec![t0.n_in, t0.n_out],
                    got: vec![t.n_in, t.n_out],
                    hint: " (adapters for different base models?)",
                });
            }
        }
    }
    Ok(v)
}

fn n_layer(ads: &[&LoraAdapter]) -> usize {
    ads.iter().map(|a| a.n_layer()).max().unwrap_or(0)
}

/// Exact weighted sum by rank concatenation.
pub fn linear(ads: &[&LoraAdapter], weights: &[f32], name: &str) -> Result<LoraAdapter, LoraError> {
    if ads.len() != weights.len() {
        return Err(LoraError::Unsupported(format!(
            "{} weights for {} adapters",
            weights.len(),
            ads.len()
        )));
    }
    let arch = check_arch(ads)?;
    let mut layers: Vec<[Option<LoraTensor>; 7]> = Vec::new();
    for il in 0..n_layer(ads) {
        let mut row: [Option<LoraTensor>; 7] = Default::default();
        for p in Proj::ALL {
            let v = parts(ads, il, p)?;
            let Some((_, t0)) = v.first() else { continue };
            let (ni, no) = (t0.n_in, t0.n_out);
            let r: usize = v.iter().map(|(_, t)| t.rank).sum();
            if r > MAX_RANK {
                return Err(LoraError::BadRank {
                    name: format!("blk.{il}.{} (merged)", p.gguf_name()),
                    rank: r,
                });
            }
            let mut a = Vec::with_capacity(r * ni);
            let mut b = vec![f16::ZERO; no * r];
            let mut off = 0;
            for (i, t) in &v {
                a.extend_from_slice(t.a());
                let s = weights[*i] * t.effective_scale(1.0);
                for o in 0..no {
                    for j in 0..t.rank {
                        b[o * r + off + j] = f16::from_f32(t.b()[o * t.rank + j].to_f32() * s);
                    }
                }
                off += t.rank;
            }
            row[p.index()] = LoraTensor::new(r, ni, no, 0.0, 1.0, a, b);
        }
        layers.push(row);
    }
    LoraAdapter::from_tensors(name, arch, 0.0, layers)
}

/// Element-wise merges of the dense updates.
#[derive(Debug, Clone, Copy)]
pub enum Dense {
    /// Keep the `density` largest-magnitude entries of each update, elect each entry's sign by
    /// the weighted sum, average the weighted entries that agree with it.
    Ties { density: f32 },
    /// Drop each entry with probability `1 - density`, rescale the rest by `1 / density`,
    /// weighted sum.
    Dare { density: f32, seed: u64 },
}

/// TIES or DARE on the dense updates, re-factored to `rank` by truncated SVD.
pub fn dense(
    ads: &[&LoraAdapter],
    weights: &[f32],
    how: Dense,
    rank: usize,
    name: &str,
) -> Result<LoraAdapter, LoraError> {
    let density = match how {
        Dense::Ties { density } | Dense::Dare { density, .. } => density,
    };
    if !(density > 0.0 && density <= 1.0) {
        return Err(LoraError::Unsupported(format!(
            "density {density} must be in (0, 1]"
        )));
    }
    if ads.len() != weights.len() {
        return Err(LoraError::Unsupported(format!(
            "{} weights for {} adapters",
            weights.len(),
            ads.len()
        )));
    }
    if rank == 0 || rank > MAX_RANK {
        return Err(LoraError::BadRank {
            name: "merge --rank".into(),
            rank,
        });
    }
    let arch = check_arch(ads)?;
    let mut layers: Vec<[Option<LoraTensor>; 7]> = Vec::new();
    for il in 0..n_layer(ads) {
        let mut row: [Option<LoraTensor>; 7] = Default::default();
        for p in Proj::ALL {
            let v = parts(ads, il, p)?;
            let Some((_, t0)) = v.first() else { continue };
            let (ni, no) = (t0.n_in, t0.n_out);
            let deltas: Vec<(f32, Vec<f32>)> =
                v.iter().map(|(i, t)| (weights[*i], t.delta())).collect();
            let m = match how {
                Dense::Dare { seed, .. } => {
                    let mut m = vec![0f32; no * ni];
                    for (k, (w, d)) in deltas.iter().enumerate() {
                        let mut rng = SplitMix(
                            seed ^ ((il as u64) << 32) ^ ((p.index() as u64) << 24) ^ k as u64,
                        );
                        for (mv, dv) in m.iter_mut().zip(d) {
                            if rng.unit() < density {
                                *mv += w * dv / density;
                            }
                        }
                    }
                    m
                }
                Dense::Ties { .. } => ties(&deltas, density),
            };
            let r = rank.min(ni).min(no);
            let (a, b) = refactor(&m, no, ni, r, 0x5eed ^ il as u64 ^ (p.index() as u64) << 8);
            row[p.index()] = LoraTensor::new(r, ni, no, 0.0, 1.0, a, b);
        }
        layers.push(row);
    }
    LoraAdapter::from_tensors(name, arch, 0.0, layers)
}

fn ties(deltas: &[(f32, Vec<f32>)], density: f32) -> Vec<f32> {
    let n = deltas[0].1.len();
    let weighted: Vec<Vec<f32>> = deltas
        .iter()
        .map(|(w, d)| {
            let k = ((density as f64 * n as f64).round() as usize).clamp(1, n);
            let mut mags: Vec<f32> = d.iter().map(|x| x.abs()).collect();
            let (_, th, _) = mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
            let th = *th;
            d.iter()
                .map(|&x| if x.abs() >= th { w * x } else { 0.0 })
                .collect()
        })
        .collect();
    (0..n)
        .map(|e| {
            let total: f32 = weighted.iter().map(|t| t[e]).sum();
            let (mut sum, mut cnt) = (0f32, 0usize);
            for t in &weighted {
                if t[e] != 0.0 && (t[e] > 0.0) == (total > 0.0) {
                    sum += t[e];
                    cnt += 1;
                }
            }
            if cnt == 0 {
                0.0
            } else {
                sum / cnt as f32
            }
        })
        .collect()
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Orthonormalize the `k` columns of `y` (`rows × k`, row-major) in place (modified
/// Gram-Schmidt, twice); a column that vanishes becomes zero.
fn orthonormalize(y: &mut [f64], rows: usize, k: usize) {
    for _ in 0..2 {
        for c in 0..k {
            for prev in 0..c {
                let dot: f64 = (0..rows).map(|r| y[r * k + c] * y[r * k + prev]).sum();
                for r in 0..rows {
                    y[r * k + c] -= dot * y[r * k + prev];
                }
            }
            let norm = (0..rows).map(|r| y[r * k + c].powi(2)).sum::<f64>().sqrt();
            let inv = if norm > 1e-300 { 1.0 / norm } else { 0.0 };
            for r in 0..rows {
                y[r * k + c] *= inv;
            }
        }
    }
}

/// Eigen-decomposition of a symmetric `k × k` matrix by cyclic Jacobi: (values, vectors as
/// columns of a row-major matrix).
fn jacobi_eigen(mut g: Vec<f64>, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| g[i * k + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = g[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q * k + q] - g[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (grp, grq) = (g[r * k + p], g[r * k + q]);
                    g[r * k + p] = c * grp - s * grq;
                    g[r * k + q] = s * grp + c * grq;
                }
                for r in 0..k {
                    let (gpr, gqr) = (g[p * k + r], g[q * k + r]);
                    g[p * k + r] = c * gpr - s * gqr;
                    g[q * k + r] = s * gpr + c * gqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (v[r * k + p], v[r * k + q]);
                    v[r * k + p] = c * vrp - s * vrq;
                    v[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    ((0..k).map(|i| g[i * k + i]).collect(), v)
}

/// Rank-`r` factorization `M ≈ B·A` of `m` (`no × ni`, row-major): `A` `(r, ni)`, `B` `(no, r)`,
/// singular values split evenly between the two, as f16.
fn refactor(m: &[f32], no: usize, ni: usize, r: usize, seed: u64) -> (Vec<f16>, Vec<f16>) {
    use rayon::prelude::*;
    let k = (r + 8).min(no).min(ni);
    let mut rng = SplitMix(seed);
    let md: Vec<f64> = m.iter().map(|&x| x as f64).collect();
    // M·X for X (ni × k) → (no × k); Mᵀ·Y for Y (no × k) → (ni × k).
    let mul = |x: &[f64]| -> Vec<f64> {
        let mut y = vec![0f64; no * k];
        y.par_chunks_mut(k).enumerate().for_each(|(o, yr)| {
            let mr = &md[o * ni..(o + 1) * ni];
            for (i, &mv) in mr.iter().enumerate() {
                if mv != 0.0 {
                    for c in 0..k {
                        yr[c] += mv * x[i * k + c];
                    }
                }
            }
        });
        y
    };
    let mul_t = |y: &[f64]| -> Vec<f64> {
        let mut z = vec![0f64; ni * k];
        z.par_chunks_mut(k).enumerate().for_each(|(i, zr)| {
            for o in 0..no {
                let mv = md[o * ni + i];
                if mv != 0.0 {
                    for c in 0..k {
                        zr[c] += mv * y[o * k + c];
                    }
                }
            }
        });
        z
    };
    let omega: Vec<f64> = (0..ni * k).map(|_| rng.unit() as f64 * 2.0 - 1.0).collect();
    let mut y = mul(&omega);
    orthonormalize(&mut y, no, k);
    for _ in 0..3 {
        let mut z = mul_t(&y);
        orthonormalize(&mut z, ni, k);
        y = mul(&z);
        orthonormalize(&mut y, no, k);
    }
    // C = Yᵀ·M (k × ni), as (Mᵀ·Y)ᵀ.
    let ct = mul_t(&y); // ni × k
    let mut g = vec![0f64; k * k];
    for a in 0..k {
        for b in 0..k {
            g[a * k + b] = (0..ni).map(|i| ct[i * k + a] * ct[i * k + b]).sum();
        }
    }
    let (vals, vecs) = jacobi_eigen(g, k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let mut a16 = vec![f16::ZERO; r * ni];
    let mut b16 = vec![f16::ZERO; no * r];
    for (j, &e) in order.iter().take(r).enumerate() {
        let sigma = vals[e].max(0.0).sqrt();
        if sigma <= 0.0 {
            continue;
        }
        let root = sigma.sqrt();
        // Left vector: Y·u; right vector: Cᵀ·u / σ.
        for o in 0..no {
            let l: f64 = (0..k).map(|c| y[o * k + c] * vecs[c * k + e]).sum();
            b16[o * r + j] = f16::from_f64(l * root);
        }
        for i in 0..ni {
            let rv: f64 = (0..k).map(|c| ct[i * k + c] * vecs[c * k + e]).sum::<f64>() / sigma;
            a16[j * ni + i] = f16::from_f64(rv * root);
        }
    }
    (a16, b16)
}

/// A model with an adapter folded in, ready to write.
pub struct Exported {
    pub writer: GgufWriter,
    /// `(from type, to type, count)` of the adapted weights.
    pub conversions: Vec<(GgmlType, GgmlType, usize)>,
}

/// `W' = W + scale·ΔW` for every weight the adapter targets (see the module docs for the
/// storage types); everything else is copied unchanged.
pub fn merge_into_base(
    file: &GgufFile,
    ad: &LoraAdapter,
    scale: f32,
) -> Result<Exported, LoraError> {
    let base = super::BaseShapes::from_gguf(file)?;
    ad.check_base(&base)?;
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        w.add(k.clone(), v.clone());
    }
    let mut conv: Vec<(GgmlType, GgmlType, usize)> = Vec::new();
    let gerr = |e: modu_gguf::GgufError| LoraError::Base(e.to_string());
    for t in file.tensors() {
        let target = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, rest)| {
                let il: usize = n.parse().ok()?;
                let p = Proj::from_gguf_name(rest.strip_suffix(".weight")?)?;
                ad.tensor(il, p)
            });
        let Some(lt) = target else {
            w.add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t).to_vec())
                .map_err(gerr)?;
            continue;
        };
        let (ni, no) = (lt.n_in, lt.n_out);
        let mut x = vec![0f32; ni * no];
        let src = file.tensor_data(t);
        let rb = src.len() / no;
        for o in 0..no {
            modu_kernels::dequantize_row(
                t.ty,
                &src[o * rb..(o + 1) * rb],
                &mut x[o * ni..(o + 1) * ni],
            )
            .map_err(|e| LoraError::BadDtype {
                name: t.name.clone(),
                dtype: e.to_string(),
            })?;
        }
        let d = lt.delta();
        for (xv, dv) in x.iter_mut().zip(&d) {
            *xv += scale * dv;
        }
        let (ty, bytes) = encode(t.ty, &x, ni);
        match conv.iter_mut().find(|c| c.0 == t.ty && c.1 == ty) {
            Some(c) => c.2 += 1,
            None => conv.push((t.ty, ty, 1)),
        }
        w.add_tensor(t.name.clone(), &t.dims, ty, bytes)
            .map_err(gerr)?;
    }
    Ok(Exported {
        writer: w,
        conversions: conv,
    })
}

/// Store `x` (rows of `cols`) as `ty` where there is an encoder for it, else as F16.
fn encode(ty: GgmlType, x: &[f32], cols: usize) -> (GgmlType, Vec<u8>) {
    match ty {
        GgmlType::F32 => (ty, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::BF16 => (
            ty,
            x.iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        ),
        GgmlType::Q8_0 if cols % 32 == 0 => {
            let mut blocks = vec![
                modu_kernels::BlockQ8_0 {
                    d: [0; 2],
                    qs: [0; 32]
                };
                x.len() / 32
            ];
            modu_kernels::scalar::quantize_row_q8_0(x, &mut blocks);
            (ty, modu_kernels::blocks_as_bytes(&blocks).to_vec())
        }
        _ => (
            GgmlType::F16,
            x.iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refactor_recovers_a_low_rank_matrix() {
        let (no, ni, r) = (40, 30, 3);
        let mut rng = SplitMix(1);
        let b: Vec<f32> = (0..no * r).map(|_| rng.unit() - 0.5).collect();
        let a: Vec<f32> = (0..r * ni).map(|_| rng.unit() - 0.5).collect();
        let mut m = vec![0f32; no * ni];
        for o in 0..no {
            for i in 0..ni {
                m[o * ni + i] = (0..r).map(|j| b[o * r + j] * a[j * ni + i]).sum();
            }
        }
        let (a2, b2) = refactor(&m, no, ni, r, 7);
        let scale = m.iter().fold(0f32, |s, v| s.max(v.abs()));
        for o in 0..no {
            for i in 0..ni {
                let v: f32 = (0..r)
                    .map(|j| b2[o * r + j].to_f32() * a2[j * ni + i].to_f32())
                    .sum();
                assert!((v - m[o * ni + i]).abs() < 2e-3 * scale, "{o},{i}");
            }
        }
    }

    #[test]
    fn ties_elects_signs() {
        let d = vec![(1.0, vec![1.0, -2.0, 0.1]), (1.0, vec![3.0, 1.0, -0.1])];
        let m = ties(&d, 1.0);
        assert_eq!(m[0], 2.0); // both positive: mean
        assert_eq!(m[1], -2.0); // total negative: only the negative one
    }
}
