#![allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.80
//! Model quantization: rewrite a GGUF with its weight matrices in another format.
//!
//! Which tensor gets which type ([`Recipe::tensor_type`]) follows the published facts of
//! llama.cpp's `llama-quantize` recipes:
//! * 1-D tensors (norms, biases) stay F32.
//! * The output projection (`output.weight`, or `token_embd.weight` when the embedding is tied)
//!   gets Q6_K for every quantized type below Q8_0.
//! * `*_M` / `*_S` recipes give some layers' `attn_v` and `ffn_down` more bits: Q4_K_M / Q5_K_M
//!   use Q6_K for the first and last eighth of the layers and every third one between
//!   (`use_more_bits`); Q3_K_M uses Q5_K for `attn_v` of layers 0–1 and Q4_K elsewhere, Q5_K
//!   for `ffn_down` of the first sixteenth, Q4_K for the rest, and Q4_K for `attn_output`;
//!   Q4_K_S uses Q5_K for `attn_v` of layers 0–3 and `ffn_down` of the first eighth.
//! * K-quants need rows that are a multiple of 256; other rows fall back to a 32-block type of
//!   similar size: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0 (llama.cpp now uses IQ4_NL,
//!   which modu does not implement; Q4_0 has the same size).
//!
//! Plain types (`Q4_K`, `Q4_0`, …) apply only the output rule and the fallback. A tensor already
//! in its target type is copied unchanged. Everything else is dequantized to f32 row by row and
//! quantized again (rows in parallel with rayon). The output is written through a temporary file
//! renamed at the end, so a failure never leaves a partial file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use modu_gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value};
use rayon::prelude::*;

/// Errors from [`quantize_file`].
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("unknown quantization type `{0}` (try one of: {list})", list = Recipe::NAMES.join(", "))]
    UnknownType(String),
    #[error(transparent)]
    Gguf(#[from] modu_gguf::GgufError),
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("bad --keep `{0}`: expected TENSOR=TYPE")]
    BadKeep(String),
    #[error("importance matrix for `{name}` has {got} values, the tensor has {expected} columns")]
    ImatrixShape {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("{0}")]
    Imatrix(String),
    #[error("Hugging Face checkpoint: {0}")]
    Hf(#[from] crate::hf::HfError),
}

/// A target: one type everywhere (with the output rule) or a llama.cpp-style mixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    Plain(GgmlType),
    Q3KM,
    Q4KS,
    Q4KM,
    Q5KM,
}

impl Recipe {
    pub const NAMES: &'static [&'static str] = &[
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M",
    ];

    pub fn parse(s: &str) -> Result<Self, QuantizeError> {
        use GgmlType as T;
        let u = s.to_ascii_uppercase();
        Ok(match u.as_str() {
            "Q3_K_M" => Recipe::Q3KM,
            "Q4_K_S" => Recipe::Q4KS,
            "Q4_K_M" => Recipe::Q4KM,
            "Q5_K_M" => Recipe::Q5KM,
            _ => {
                let t = parse_type(&u).ok_or_else(|| QuantizeError::UnknownType(s.into()))?;
                if !matches!(
                    t,
                    T::F32
                        | T::F16
                        | T::BF16
                        | T::Q8_0
                        | T::Q4_0
                        | T::Q4_1
                        | T::Q5_0
                        | T::Q5_1
                        | T::Q2_K
                        | T::Q3_K
                        | T::Q4_K
                        | T::Q5_K
                        | T::Q6_K
                ) {
                    return Err(QuantizeError::UnknownType(s.into()));
                }
                Recipe::Plain(t)
            }
        })
    }

    /// The type most tensors get.
    pub fn base(self) -> GgmlType {
        match self {
            Recipe::Plain(t) => t,
            Recipe::Q3KM => GgmlType::Q3_K,
            Recipe::Q4KS | Recipe::Q4KM => GgmlType::Q4_K,
            Recipe::Q5KM => GgmlType::Q5_K,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) for this recipe.
    pub fn file_type(self) -> u32 {
        use GgmlType as T;
        match self {
            Recipe::Q3KM => 12,
            Recipe::Q4KS => 14,
            Recipe::Q4KM => 15,
            Recipe::Q5KM => 17,
            Recipe::Plain(t) => match t {
                T::F32 => 0,
                T::F16 => 1,
                T::Q4_0 => 2,
                T::Q4_1 => 3,
                T::Q8_0 => 7,
                T::Q5_0 => 8,
                T::Q5_1 => 9,
                T::Q2_K => 10,
                T::Q3_K => 11, // Q3_K_S
                T::Q4_K => 14, // Q4_K_S
                T::Q5_K => 16, // Q5_K_S
                T::Q6_K => 18,
                T::BF16 => 32,
                _ => 0,
            },
        }
    }

    /// The type of tensor `name` with ggml dims `dims`, before `--keep` overrides.
    /// `n_layer` is the number of blocks; `has_output` whether the file has `output.weight`.
    pub fn tensor_type(
        self,
        name: &str,
        dims: &[u64],
        n_layer: usize,
        has_output: bool,
    ) -> GgmlType {
        use GgmlType as T;
        if dims.len() < 2 || name.ends_with("_norm.weight") {
            return T::F32;
        }
        let base = self.base();
        if matches!(base, T::F32 | T::F16 | T::BF16) {
            return base;
        }
        let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
        let layer = block_index(name);
        let more_bits =
            |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i + 3 * n - n / 8) % 3 == 2;
        let mut t = base;
        if is_output {
            if base != T::Q8_0 {
                t = T::Q6_K;
            }
        } else if let Some(i) = layer {
            let n = n_layer.max(1);
            if name.ends_with("attn_v.weight") {
                t = match self {
                    Recipe::Q4KM | Recipe::Q5KM if more_bits(i, n) => T::Q6_K,
                    Recipe::Q3KM => {
                        if i < 2 {
                            T::Q5_K
                        } else {
                            T::Q4_K
                        }
                    }
                    Recipe::Q4KS if i < 4 => T::Q5_K,
                    _ => base,
                };
            } else if name.ends_with("ffn_down.weight") {
                t = match self {
                    Recipe::Q4KM | Recipe::Q5KM if more_bits(i, n) => T::Q6_K,
                    Recipe::Q3KM => {
                        if i < n / 16 {
                            T::Q5_K
                        } else {
                            T::Q4_K
                        }
                    }
                    Recipe::Q4KS if i < n / 8 => T::Q5_K,
                    _ => base,
                };
            } else if name.ends_with("attn_output.weight") && self == Recipe::Q3KM {
                t = T::Q4_K;
            }
        }
        fallback(t, dims[0])
    }
}

/// K-quants need rows of whole 256-element super-blocks; otherwise a 32-block type of about
/// the same size.
pub fn fallback(t: GgmlType, ne0: u64) -> GgmlType {
    use GgmlType as T;
    if ne0 % t.block_size() as u64 == 0 {
        return t;
    }
    match t {
        T::Q2_K | T::Q3_K => T::Q4_0,
        T::Q4_K => T::Q5_0,
        T::Q5_K => T::Q5_1,
        T::Q6_K => T::Q8_0,
        // Rows that are not even whole 32-blocks: keep 16-bit floats.
        _ if ne0 % 32 != 0 => T::F16,
        other => other,
    }
}

/// `blk.N.` → `N`.
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Parse a ggml type name (`Q4_K`, `f16`, …).
pub fn parse_type(s: &str) -> Option<GgmlType> {
    let u = s.to_ascii_uppercase();
    (0..64u32)
        .filter_map(GgmlType::from_u32)
        .find(|t| t.name().eq_ignore_ascii_case(&u))
}

/// Options for [`quantize_file`].
#[derive(Default)]
pub struct QuantizeOptions {
    /// Per-tensor type overrides: `(pattern, type)`; a pattern matches a tensor name exactly
    /// or, with `*` wildcards, as a glob.
    pub keep: Vec<(String, GgmlType)>,
    /// Per-weight importance (one value per input column), e.g. from `modu imatrix`.
    pub imatrix: Option<HashMap<String, Vec<f32>>>,
}

/// What [`quantize_file`] did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub n_tensors: usize,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Tensors per output type.
    pub by_type: Vec<(GgmlType, usize)>,
    /// Quantized tensors that had importance data.
    pub with_imatrix: usize,
}

/// Simple `*` glob.
pub fn glob_match(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, tail)) => {
            if !s.starts_with(head) {
                return false;
            }
            let rest = &s[head.len()..];
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// Parse `TENSOR=TYPE`.
pub fn parse_keep(s: &str) -> Result<(String, GgmlType), QuantizeError> {
    let (n, t) = s
        .split_once('=')
        .ok_or_else(|| QuantizeError::BadKeep(s.into()))?;
    let ty = parse_type(t.trim()).ok_or_else(|| QuantizeError::BadKeep(s.into()))?;
    Ok((n.trim().to_string(), ty))
}

/// One input tensor of a quantization: a GGUF tensor (zero-copy view) or a tensor converted
/// from a Hugging Face checkpoint. `dims` are in ggml order (`dims[0]` is the contiguous one),
/// `data` holds whole rows of `ty`.
#[derive(Debug, Clone, Copy)]
pub struct SourceTensor<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub ty: GgmlType,
    pub data: &'a [u8],
}

impl SourceTensor<'_> {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Plan the output type of every tensor of a GGUF file.
pub fn plan(file: &GgufFile, recipe: Recipe, opts: &QuantizeOptions) -> Vec<GgmlType> {
    let src: Vec<SourceTensor> = file.tensors().iter().map(|t| source_of(file, t)).collect();
    plan_tensors(&src, recipe, opts)
}

fn source_of<'a>(file: &'a GgufFile, t: &'a TensorInfo) -> SourceTensor<'a> {
    SourceTensor {
        name: &t.name,
        dims: &t.dims,
        ty: t.ty,
        data: file.tensor_data(t),
    }
}

/// Plan the output type of every tensor.
pub fn plan_tensors(
    tensors: &[SourceTensor],
    recipe: Recipe,
    opts: &QuantizeOptions,
) -> Vec<GgmlType> {
    let has_output = tensors.iter().any(|t| t.name == "output.weight");
    let n_layer = tensors
        .iter()
        .filter_map(|t| block_index(t.name))
        .max()
        .map_or(0, |m| m + 1);
    tensors
        .iter()
        .map(|t| {
            let planned = recipe.tensor_type(t.name, t.dims, n_layer, has_output);
            let t2 = opts
                .keep
                .iter()
                .rev()
                .find(|(p, _)| glob_match(p, t.name))
                .map(|(_, ty)| *ty)
                .unwrap_or(planned);
            // 1-D tensors and unknown source types are copied as they are.
            if !modu_kernels::QUANTIZE_TYPES.contains(&t.ty) && !t.ty.is_quantized() {
                t.ty
            } else if t.dims.len() < 2 && opts.keep.iter().all(|(p, _)| !glob_match(p, t.name)) {
                if matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                    t.ty
                } else {
                    GgmlType::F32
                }
            } else {
                t2
            }
        })
        .collect()
}

/// Quantize `input` into `output` with `recipe`. `progress(done, total)` is called with
/// element counts as tensors finish.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    recipe: Recipe,
    opts: &QuantizeOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<QuantizeReport, QuantizeError> {
    let file = GgufFile::open(input)?;
    let src: Vec<SourceTensor> = file.tensors().iter().map(|t| source_of(&file, t)).collect();
    quantize_tensors(file.metadata(), &src, output, recipe, opts, progress)
}

/// Convert a Hugging Face model directory (see [`crate::hf`]) into a GGUF at `output`. The
/// checkpoint is validated completely before anything is written.
pub fn quantize_hf_dir(
    dir: &Path,
    output: &Path,
    recipe: Recipe,
    opts: &QuantizeOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<QuantizeReport, QuantizeError> {
    let ck = crate::hf::HfCheckpoint::open(dir)?;
    quantize_tensors(&ck.metadata, &ck.sources(), output, recipe, opts, progress)
}

/// Write `metadata` and `tensors`, converted by `recipe`, as a GGUF file at `output` (through a
/// temporary file and a rename). `general.file_type` and `general.quantization_version` are
/// replaced.
pub fn quantize_tensors(
    metadata: &[(String, Value)],
    tensors: &[SourceTensor],
    output: &Path,
    recipe: Recipe,
    opts: &QuantizeOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<QuantizeReport, QuantizeError> {
    let types = plan_tensors(tensors, recipe, opts);
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        if k == "general.file_type" || k == "general.quantization_version" {
            continue;
        }
        w.add(k.clone(), v.clone());
    }
    w.add("general.quantization_version", Value::U32(2));
    w.add("general.file_type", Value::U32(recipe.file_type()));
    let total: u64 = tensors.iter().map(|t| t.n_elements()).sum();
    let done = AtomicU64::new(0);
    let mut by_type: HashMap<GgmlType, usize> = HashMap::new();
    let mut with_imatrix = 0;
    let mut out_bytes = 0u64;
    let mut in_bytes = 0u64;
    for (t, &ty) in tensors.iter().zip(&types) {
        let im = opts.imatrix.as_ref().and_then(|m| m.get(t.name));
        if let Some(im) = im {
            if im.len() as u64 != t.dims[0] {
                return Err(QuantizeError::ImatrixShape {
                    name: t.name.to_string(),
                    expected: t.dims[0] as usize,
                    got: im.len(),
                });
            }
            if ty.is_quantized() && ty != t.ty {
                with_imatrix += 1;
            }
        }
        let bytes = convert_source(t, ty, im.map(|v| v.as_slice()))?;
        in_bytes += t.data.len() as u64;
        out_bytes += bytes.len() as u64;
        w.add_tensor(t.name.to_string(), t.dims, ty, bytes)?;
        *by_type.entry(ty).or_default() += 1;
        let d = done.fetch_add(t.n_elements(), Ordering::Relaxed) + t.n_elements();
        progress(d, total);
    }
    w.write_file(output)?;
    let mut by_type: Vec<_> = by_type.into_iter().collect();
    by_type.sort_by_key(|(t, _)| t.id());
    Ok(QuantizeReport {
        n_tensors: tensors.len(),
        in_bytes,
        out_bytes,
        by_type,
        with_imatrix,
    })
}

/// One tensor's bytes in type `ty` (copied when unchanged).
pub fn convert_tensor(
    file: &GgufFile,
    t: &TensorInfo,
    ty: GgmlType,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    convert_source(&source_of(file, t), ty, imatrix)
}

/// [`convert_tensor`] for any [`SourceTensor`].
pub fn convert_source(
    t: &SourceTensor,
    ty: GgmlType,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    let err = |msg: String| QuantizeError::Tensor {
        name: t.name.to_string(),
        msg,
    };
    let src = t.data;
    if ty == t.ty {
        return Ok(src.to_vec());
    }
    let ne0 = t.dims.first().copied().unwrap_or(1) as usize;
    let rows = (t.n_elements() / (ne0 as u64).max(1)) as usize;
    let in_rb = modu_kernels::row_bytes(t.ty, ne0).map_err(|e| err(e.to_string()))?;
    let out_rb = modu_kernels::row_bytes(ty, ne0).map_err(|e| err(e.to_string()))?;
    if src.len() != in_rb * rows {
        return Err(err(format!(
            "{} bytes of data, {rows} rows of {in_rb} bytes expected",
            src.len()
        )));
    }
    let mut out = vec![0u8; out_rb * rows];
    out.par_chunks_mut(out_rb.max(1))
        .zip(src.par_chunks(in_rb.max(1)))
        .try_for_each_init(
            || vec![0f32; ne0],
            |buf, (o, s)| -> Result<(), String> {
                modu_kernels::dequantize_row(t.ty, s, buf).map_err(|e| e.to_string())?;
                modu_kernels::quantize_row(ty, buf, o, imatrix).map_err(|e| e.to_string())
            },
        )
        .map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp_counts() {
        // Qwen2.5-0.5B (24 layers) Q4_K_M from llama-quantize: 12 ffn_down in Q6_K.
        let r = Recipe::Q4KM;
        let n = (0..24)
            .filter(|&i| {
                r.tensor_type(&format!("blk.{i}.ffn_down.weight"), &[4864, 896], 24, true)
                    == GgmlType::Q6_K
            })
            .count();
        assert_eq!(n, 12);
        // Gemma-3-270m (18 layers): 9.
        let n = (0..18)
            .filter(|&i| {
                r.tensor_type(&format!("blk.{i}.ffn_down.weight"), &[2048, 640], 18, true)
                    == GgmlType::Q6_K
            })
            .count();
        assert_eq!(n, 9);
        // Rows of 896 fall back: attn_v Q6_K → Q8_0, attn_q Q4_K → Q5_0.
        assert_eq!(
            r.tensor_type("blk.0.attn_v.weight", &[896, 128], 24, true),
            GgmlType::Q8_0
        );
        assert_eq!(
            r.tensor_type("blk.3.attn_v.weight", &[896, 128], 24, true),
            GgmlType::Q5_0
        );
        assert_eq!(
            r.tensor_type("blk.3.attn_q.weight", &[1024, 128], 24, true),
            GgmlType::Q4_K
        );
        assert_eq!(
            r.tensor_type("output.weight", &[896, 1000], 24, true),
            GgmlType::Q8_0
        );
        assert_eq!(
            r.tensor_type("token_embd.weight", &[896, 1000], 24, true),
            GgmlType::Q5_0
        );
        assert_eq!(
            r.tensor_type("token_embd.weight", &[1024, 1000], 24, false),
            GgmlType::Q6_K
        );
        assert_eq!(
            r.tensor_type("blk.0.attn_norm.weight", &[896], 24, true),
            GgmlType::F32
        );
        assert_eq!(
            Recipe::Q3KM.tensor_type("blk.9.attn_output.weight", &[1024, 1024], 24, true),
            GgmlType::Q4_K
        );
    }

    #[test]
    fn parse_and_glob() {
        assert_eq!(Recipe::parse("q4_k_m").unwrap(), Recipe::Q4KM);
        assert_eq!(
            Recipe::parse("Q8_0").unwrap(),
            Recipe::Plain(GgmlType::Q8_0)
        );
        assert!(Recipe::parse("Q8_K").is_err());
        assert!(Recipe::parse("nope").is_err());
        assert!(glob_match("blk.*.ffn_down.weight", "blk.3.ffn_down.weight"));
        assert!(!glob_match("blk.*.ffn_down.weight", "blk.3.ffn_up.weight"));
        assert!(glob_match("*", "x"));
        assert_eq!(parse_keep("output.weight=q8_0").unwrap().1, GgmlType::Q8_0);
        assert!(parse_keep("output.weight").is_err());
        assert!(parse_keep("a=Q9").is_err());
    }
}
