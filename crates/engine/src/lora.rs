//! LoRA modules: low-rank adapters applied on top of one shared base model, per request.
//!
//! An adapter changes a projection `y = W·x` into `y = W·x + s·B·(A·x)` with `A` of shape
//! `(rank, n_in)`, `B` of shape `(n_out, rank)` and `s = request_scale × alpha / rank` (PEFT with
//! `use_rslora`: `alpha / sqrt(rank)`; llama.cpp's rule that `alpha = 0` means a factor of 1 is
//! kept). The base weights are never touched, so any number of adapters can share one model and a
//! batch can mix sequences that use different adapters (see [`BatchLora`]).
//!
//! Two on-disk formats are read:
//! * llama.cpp GGUF-LoRA (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
//!   tensors `blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a|b`
//!   with ggml dims `[n_in, rank]` and `[rank, n_out]`);
//! * PEFT directories (`adapter_config.json` + `adapter_model.safetensors`, tensors
//!   `…layers.N.self_attn.q_proj.lora_A.weight` of shape `(rank, n_in)` and `…lora_B.weight` of
//!   shape `(n_out, rank)`, f32/f16/bf16).
//!
//! Everything is validated before any weight is converted or allocated: pairs, ranks, dtypes,
//! layer indices and (given the base model's [`BaseShapes`]) every shape against the projection
//! it adapts. Weights are held as f16 (`resident_bytes` ≈ the f16 file size), both row-major as
//! in the files: `A` `(rank, n_in)`, so `A·x` is `rank` contiguous f16 dot products of length
//! `n_in`, and `B` `(n_out, rank)`, so `B·t` is `n_out` contiguous dot products of length `rank`.
//!
//! Numerics follow llama.cpp's CPU graph (`mul_mat(b, mul_mat(a, x))`, scale, add): `x` is rounded
//! to f16 for `A·x` (f32 accumulation), the rank vector `t` is rounded to f16 for `B·t`
//! (f32 accumulation), then scaled and added to the base projection's output before its bias.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};

use crate::layers::Segment;

pub mod merge;
mod peft_write;

/// Largest supported rank of one adapted projection (the batched path keeps a rank vector on
/// the stack).
pub const MAX_RANK: usize = 1024;

/// The seven projections of a decoder layer that an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The GGUF tensor stem (`blk.N.<stem>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// The Hugging Face module name (`q_proj`, …).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    pub fn from_gguf_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.gguf_name() == s)
    }

    pub fn from_hf_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == s)
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// Errors of loading or using an adapter. Each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Gguf {
        path: PathBuf,
        #[source]
        source: modu_gguf::GgufError,
    },
    #[error("{}: not an adapter (general.type is {got:?}; a base model cannot be used as a module)", path.display())]
    NotAdapter { path: PathBuf, got: Option<String> },
    #[error("{}: adapter type {got:?} is not supported (only 'lora')", path.display())]
    NotLora { path: PathBuf, got: Option<String> },
    #[error("{}: the adapter has no general.architecture", path.display())]
    NoArch { path: PathBuf },
    #[error("adapter is for architecture '{adapter}' but the base model is '{base}' (wrong base model?)")]
    ArchMismatch { adapter: String, base: String },
    #[error("bad adapter metadata '{key}': {reason}")]
    BadMetadata { key: String, reason: String },
    #[error(
        "tensor '{name}' is not a LoRA tensor of a supported projection (q/k/v/o/gate/up/down)"
    )]
    UnknownTensor { name: String },
    #[error("tensor '{name}' has no partner '{missing}' (every lora_a needs its lora_b)")]
    MissingPair { name: String, missing: String },
    #[error("duplicate tensor for layer {layer} {proj} ({name})")]
    Duplicate {
        name: String,
        layer: usize,
        proj: Proj,
    },
    #[error("tensor '{name}': rank {got} does not match {what} {expected}")]
    RankMismatch {
        name: String,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("tensor '{name}': rank {rank} out of range (1..={MAX_RANK})")]
    BadRank { name: String, rank: usize },
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}{hint}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
        hint: &'static str,
    },
    #[error("tensor '{name}' is for layer {layer}, but the base model has {n_layer} layers (wrong base model?)")]
    LayerOutOfRange {
        name: String,
        layer: usize,
        n_layer: usize,
    },
    #[error("tensor '{name}' targets {proj}, which the base model does not have at layer {layer} (wrong base model?)")]
    NoSuchProjection {
        name: String,
        layer: usize,
        proj: Proj,
    },
    #[error("tensor '{name}' has unsupported type {dtype} (supported: F32, F16, BF16, Q8_0)")]
    BadDtype { name: String, dtype: String },
    #[error("tensor '{name}' holds a non-finite value")]
    NonFinite { name: String },
    #[error("the adapter has no LoRA tensors")]
    Empty,
    #[error("{}: bad adapter_config.json: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    #[error("{}: bad safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: not an adapter: expected a .gguf LoRA file or a PEFT directory (adapter_config.json + adapter_model.safetensors)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("the base model: {0}")]
    Base(String),
    #[error("{0}")]
    Unsupported(String),
}

/// The shapes of the base model's adaptable projections (what an adapter is validated against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseShapes {
    pub arch: String,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per layer, per [`Proj`] index: `(n_in, n_out)`, `None` where the layer lacks it.
    pub layers: Vec<[Option<(usize, usize)>; 7]>,
}

impl BaseShapes {
    /// Read the shapes from a base model file (`blk.N.<proj>.weight`, ggml dims `[n_in, n_out]`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LoraError> {
        let arch = file
            .architecture()
            .ok_or_else(|| LoraError::Base("no general.architecture".into()))?
            .to_string();
        if file.get_str("general.type") == Some("adapter") {
            return Err(LoraError::Base(
                "the base model file is itself an adapter".into(),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = file
            .get_u64(&key("block_count"))
            .filter(|&n| n > 0 && n < 1 << 16)
            .ok_or_else(|| LoraError::Base(format!("missing or bad {}", key("block_count"))))?
            as usize;
        let n_head = file.get_u64(&key("attention.head_count")).unwrap_or(0) as usize;
        let n_head_kv = file
            .get_u64(&key("attention.head_count_kv"))
            .map(|n| n as usize)
            .unwrap_or(n_head);
        let layers = (0..n_layer)
            .map(|il| {
                let mut row = [None; 7];
                for p in Proj::ALL {
                    if let Some(t) = file.tensor_info(&format!("blk.{il}.{}.weight", p.gguf_name()))
                    {
                        if t.dims.len() == 2 {
                            row[p.index()] = Some((t.dims[0] as usize, t.dims[1] as usize));
                        }
                    }
                }
                row
            })
            .collect();
        Ok(Self {
            arch,
            n_head,
            n_head_kv,
            layers,
        })
    }

    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    fn get(&self, layer: usize, p: Proj) -> Option<(usize, usize)> {
        self.layers.get(layer).and_then(|l| l[p.index()])
    }
}

/// Where an adapter was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// llama.cpp GGUF-LoRA.
    Gguf,
    /// PEFT (`adapter_config.json` + `adapter_model.safetensors`).
    Peft,
    /// Built in memory (merge).
    Memory,
}

impl fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterFormat::Gguf => "gguf-lora",
            AdapterFormat::Peft => "peft",
            AdapterFormat::Memory => "memory",
        })
    }
}

/// One adapted projection: `ΔW = s·B·A` with `s = request_scale·alpha/denom`.
#[derive(Clone)]
pub struct LoraTensor {
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    /// The adapter's alpha; 0 means "no scaling" (llama.cpp).
    pub alpha: f32,
    /// `rank`, or `sqrt(rank)` for rsLoRA.
    pub denom: f32,
    /// `A`, row-major `(rank, n_in)`.
    a: Vec<f16>,
    /// `B`, row-major `(n_out, rank)`.
    b: Vec<f16>,
}

impl LoraTensor {
    /// Build from `A` `(rank, n_in)` and `B` `(n_out, rank)`, both row-major.
    pub fn new(
        rank: usize,
        n_in: usize,
        n_out: usize,
        alpha: f32,
        denom: f32,
        a: Vec<f16>,
        b: Vec<f16>,
    ) -> Option<Self> {
        if a.len() != rank * n_in || b.len() != rank * n_out || rank == 0 || rank > MAX_RANK {
            return None;
        }
        Some(Self {
            rank,
            n_in,
            n_out,
            alpha,
            denom,
            a,
            b,
        })
    }

    /// The multiplier of `B·A` at a request scale, computed as llama.cpp does
    /// (`scale·alpha/rank`, or just `scale` when alpha is 0).
    pub fn effective_scale(&self, scale: f32) -> f32 {
        if self.alpha == 0.0 {
            scale
        } else {
            scale * self.alpha / self.denom
        }
    }

    /// `A` row-major `(rank, n_in)`.
    pub fn a(&self) -> &[f16] {
        &self.a
    }

    /// `B` row-major `(n_out, rank)`.
    pub fn b(&self) -> &[f16] {
        &self.b
    }

    /// The dense update `s·B·A` at request scale 1 as f32, row-major `(n_out, n_in)` (reference,
    /// merges, export).
    pub fn delta(&self) -> Vec<f32> {
        let (r, ni, no) = (self.rank, self.n_in, self.n_out);
        let s = self.effective_scale(1.0);
        let a: Vec<f32> = self.a.iter().map(|v| v.to_f32()).collect();
        let mut d = vec![0f32; no * ni];
        for o in 0..no {
            let drow = &mut d[o * ni..(o + 1) * ni];
            for j in 0..r {
                let bv = self.b[o * r + j].to_f32() * s;
                if bv != 0.0 {
                    for (dv, av) in drow.iter_mut().zip(&a[j * ni..(j + 1) * ni]) {
                        *dv += bv * av;
                    }
                }
            }
        }
        d
    }

    fn bytes(&self) -> usize {
        (self.a.len() + self.b.len()) * 2
    }
}

/// A loaded LoRA adapter.
pub struct LoraAdapter {
    name: String,
    format: AdapterFormat,
    source: Option<PathBuf>,
    /// Architecture named by the file (GGUF), or of the base it was validated against.
    arch: Option<String>,
    /// Base model named by a PEFT config (informational).
    base_model: Option<String>,
    alpha: f32,
    use_rslora: bool,
    /// Per layer, per [`Proj`] index.
    layers: Vec<[Option<LoraTensor>; 7]>,
    /// True for PEFT Q/K updates of a `llama` base whose rows still need GGUF's Q/K permutation
    /// (loaded without a base model).
    unpermuted_llama_qk: bool,
}

impl fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("arch", &self.arch)
            .field("rank", &self.rank())
            .field("alpha", &self.alpha)
            .field("tensors", &self.n_tensors())
            .finish()
    }
}

/// A safetensors tensor with its name.
type NamedView<'a> = (String, safetensors::tensor::TensorView<'a>);

/// A validated, not yet converted tensor pair: where its data is, its dtype and shape.
struct PendingPair<'a> {
    layer: usize,
    proj: Proj,
    name_a: String,
    name_b: String,
    rank: usize,
    n_in: usize,
    n_out: usize,
    a: RawTensor<'a>,
    b: RawTensor<'a>,
}

#[derive(Clone, Copy)]
enum RawDtype {
    Ggml(GgmlType),
    F32,
    F16,
    BF16,
}

#[derive(Clone, Copy)]
struct RawTensor<'a> {
    dtype: RawDtype,
    data: &'a [u8],
}

impl RawTensor<'_> {
    /// Convert `n` elements (row-major as stored) to f16.
    fn to_f16(self, name: &str, n: usize) -> Result<Vec<f16>, LoraError> {
        let mut f = vec![0f32; n];
        let kerr = |e: modu_kernels::KernelError| LoraError::BadDtype {
            name: name.to_string(),
            dtype: e.to_string(),
        };
        match self.dtype {
            RawDtype::Ggml(ty) => {
                modu_kernels::dequantize_row(ty, self.data, &mut f).map_err(kerr)?
            }
            RawDtype::F32 => {
                modu_kernels::dequantize_row(GgmlType::F32, self.data, &mut f).map_err(kerr)?
            }
            RawDtype::F16 => {
                modu_kernels::dequantize_row(GgmlType::F16, self.data, &mut f).map_err(kerr)?
            }
            RawDtype::BF16 => {
                modu_kernels::dequantize_row(GgmlType::BF16, self.data, &mut f).map_err(kerr)?
            }
        }
        if f.iter().any(|v| !v.is_finite()) {
            return Err(LoraError::NonFinite {
                name: name.to_string(),
            });
        }
        let mut out = vec![f16::ZERO; n];
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut out[..], &f);
        Ok(out)
    }
}

fn shape_err(name: &str, expected: Vec<usize>, got: Vec<usize>, hint: &'static str) -> LoraError {
    LoraError::ShapeMismatch {
        name: name.to_string(),
        expected,
        got,
        hint,
    }
}

const WRONG_BASE: &str = " (wrong base model?)";

impl LoraAdapter {
    /// Open an adapter: a `.gguf` file (GGUF-LoRA) or a PEFT directory (or its
    /// `adapter_model.safetensors` / `adapter_config.json`). With `base`, every tensor is checked
    /// against the base model's shapes (and the architecture, for GGUF).
    pub fn open(path: impl AsRef<Path>, base: Option<&BaseShapes>) -> Result<Self, LoraError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| LoraError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return Self::from_peft_dir(path, base);
        }
        let fname = path.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if fname == "adapter_model.safetensors" || fname == "adapter_config.json" {
            return Self::from_peft_dir(path.parent().unwrap_or(Path::new(".")), base);
        }
        let bytes = read_regular(path)?;
        let is_gguf = bytes.starts_with(b"GGUF");
        if is_gguf || path.extension().is_some_and(|e| e == "gguf") {
            // From memory (not mapped), for the same reason as PEFT files.
            let file = GgufFile::from_bytes(bytes).map_err(|source| LoraError::Gguf {
                path: path.to_path_buf(),
                source,
            })?;
            let mut ad = Self::from_gguf(&file, path, base)?;
            ad.source = Some(path.to_path_buf());
            return Ok(ad);
        }
        Err(LoraError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }

    /// Read a llama.cpp GGUF-LoRA adapter (`path` is for messages and the default name).
    pub fn from_gguf(
        file: &GgufFile,
        path: &Path,
        base: Option<&BaseShapes>,
    ) -> Result<Self, LoraError> {
        let gtype = file.get_str("general.type");
        if gtype != Some("adapter") {
            return Err(LoraError::NotAdapter {
                path: path.to_path_buf(),
                got: gtype.map(str::to_string),
            });
        }
        let atype = file.get_str("adapter.type");
        if atype != Some("lora") {
            return Err(LoraError::NotLora {
                path: path.to_path_buf(),
                got: atype.map(str::to_string),
            });
        }
        let arch = file
            .architecture()
            .ok_or_else(|| LoraError::NoArch {
                path: path.to_path_buf(),
            })?
            .to_string();
        if let Some(b) = base {
            if b.arch != arch {
                return Err(LoraError::ArchMismatch {
                    adapter: arch,
                    base: b.arch.clone(),
                });
            }
        }
        let alpha = match file.get("adapter.lora.alpha") {
            None => 0.0,
            Some(v) => v
                .as_f32()
                .filter(|a| a.is_finite() && *a >= 0.0)
                .ok_or_else(|| LoraError::BadMetadata {
                    key: "adapter.lora.alpha".into(),
                    reason: "expected a finite number ≥ 0".into(),
                })?,
        };
        // Group tensors into pairs, checking names, dtypes and shapes; convert nothing yet.
        let mut halves: HashMap<(usize, Proj), [Option<&modu_gguf::TensorInfo>; 2]> =
            HashMap::new();
        for t in file.tensors() {
            let (layer, proj, which) =
                parse_gguf_name(&t.name).ok_or_else(|| LoraError::UnknownTensor {
                    name: t.name.clone(),
                })?;
            let slot = &mut halves.entry((layer, proj)).or_insert([None, None])[which];
            if slot.is_some() {
                return Err(LoraError::Duplicate {
                    name: t.name.clone(),
                    layer,
                    proj,
                });
            }
            *slot = Some(t);
        }
        let mut pending = Vec::with_capacity(halves.len());
        for ((layer, proj), pair) in halves {
            let (ta, tb) = match pair {
                [Some(a), Some(b)] => (a, b),
                [Some(a), None] => {
                    return Err(LoraError::MissingPair {
                        name: a.name.clone(),
                        missing: a.name.replace(".lora_a", ".lora_b"),
                    })
                }
                [None, Some(b)] => {
                    return Err(LoraError::MissingPair {
                        name: b.name.clone(),
                        missing: b.name.replace(".lora_b", ".lora_a"),
                    })
                }
                [None, None] => continue,
            };
            for t in [ta, tb] {
                let ok = matches!(
                    t.ty,
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
                );
                if !ok || t.dims.len() != 2 || t.dims[0] % t.ty.block_size() as u64 != 0 {
                    if !ok {
                        return Err(LoraError::BadDtype {
                            name: t.name.clone(),
                            dtype: format!("{:?}", t.ty),
                        });
                    }
                    if t.dims.len() != 2 {
                        return Err(shape_err(
                            &t.name,
                            vec![],
                            t.dims.iter().map(|&d| d as usize).collect(),
                            " (a 2-D matrix)",
                        ));
                    }
                    return Err(LoraError::BadDtype {
                        name: t.name.clone(),
                        dtype: format!("{:?} with rows of {} elements", t.ty, t.dims[0]),
                    });
                }
            }
            // ggml dims: lora_a [n_in, rank], lora_b [rank, n_out].
            let (n_in, rank) = (ta.dims[0] as usize, ta.dims[1] as usize);
            let (rank_b, n_out) = (tb.dims[0] as usize, tb.dims[1] as usize);
            if rank_b != rank {
                return Err(LoraError::RankMismatch {
                    name: tb.name.clone(),
                    what: "the rank of its lora_a",
                    expected: rank,
                    got: rank_b,
                });
            }
            pending.push(PendingPair {
                layer,
                proj,
                name_a: ta.name.clone(),
                name_b: tb.name.clone(),
                rank,
                n_in,
                n_out,
                a: RawTensor {
                    dtype: RawDtype::Ggml(ta.ty),
                    data: file.tensor_data(ta),
                },
                b: RawTensor {
                    dtype: RawDtype::Ggml(tb.ty),
                    data: file.tensor_data(tb),
                },
            });
        }
        let name = file
            .get_str("general.name")
            .map(str::to_string)
            .unwrap_or_else(|| file_stem(path));
        let unpermuted = false;
        Self::build(
            name,
            AdapterFormat::Gguf,
            Some(arch),
            None,
            alpha,
            false,
            pending,
            base,
            unpermuted,
        )
    }

    /// Read a PEFT adapter directory.
    pub fn from_peft_dir(dir: &Path, base: Option<&BaseShapes>) -> Result<Self, LoraError> {
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        let cfg_bytes = read_regular(&cfg_path)?;
        // Read into memory, not mapped: a file truncated or rewritten while the server reads
        // it then gives a validation error instead of a SIGBUS.
        let map = read_regular(&st_path)?;
        let mut ad = Self::from_peft_bytes(dir, &cfg_bytes, &map, base)?;
        ad.source = Some(dir.to_path_buf());
        Ok(ad)
    }

    /// A PEFT adapter from the contents of its two files (`dir` names it in messages and
    /// gives its default name).
    pub fn from_peft_bytes(
        dir: &Path,
        cfg_bytes: &[u8],
        map: &[u8],
        base: Option<&BaseShapes>,
    ) -> Result<Self, LoraError> {
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        let cfg_text = std::str::from_utf8(cfg_bytes).map_err(|_| LoraError::BadConfig {
            path: cfg_path.clone(),
            reason: "not UTF-8".into(),
        })?;
        let bad = |reason: String| LoraError::BadConfig {
            path: cfg_path.clone(),
            reason,
        };
        let cfg: serde_json::Value =
            serde_json::from_str(cfg_text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = cfg
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        if let Some(pt) = obj.get("peft_type") {
            if pt.as_str() != Some("LORA") {
                return Err(bad(format!(
                    "peft_type is {pt}, only \"LORA\" is supported"
                )));
            }
        }
        let r = obj
            .get("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0 && r as usize <= MAX_RANK)
            .ok_or_else(|| bad(format!("'r' must be an integer in 1..={MAX_RANK}")))?
            as usize;
        let alpha = match obj.get("lora_alpha") {
            None => r as f32,
            Some(v) => v
                .as_f64()
                .map(|a| a as f32)
                .filter(|a| a.is_finite() && *a >= 0.0)
                .ok_or_else(|| bad("'lora_alpha' must be a finite number ≥ 0".into()))?,
        };
        let use_rslora = match obj.get("use_rslora") {
            None | Some(serde_json::Value::Null) => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad("'use_rslora' must be a boolean".into()))?,
        };
        for key in ["fan_in_fan_out", "use_dora"] {
            if obj.get(key).and_then(|v| v.as_bool()) == Some(true) {
                return Err(bad(format!("'{key}: true' is not supported")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if obj
                .get(key)
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(format!("a non-empty '{key}' is not supported")));
            }
        }
        let targets: Option<Vec<String>> = match obj.get("target_modules") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(_)) => None, // a regex: checked per tensor below
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("'target_modules' must be strings".into()))?,
            ),
            Some(_) => return Err(bad("'target_modules' must be a list or a string".into())),
        };
        if let Some(t) = &targets {
            if let Some(u) = t.iter().find(|m| Proj::from_hf_name(m).is_none()) {
                return Err(LoraError::Unsupported(format!(
                    "{}: target module '{u}' is not supported (q/k/v/o/gate/up/down_proj)",
                    cfg_path.display()
                )));
            }
        }
        let base_model = obj
            .get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .map(str::to_string);

        let st_err = |reason: String| LoraError::Safetensors {
            path: st_path.clone(),
            reason,
        };
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| st_err(e.to_string()))?;
        let mut halves: HashMap<(usize, Proj), [Option<NamedView>; 2]> = HashMap::new();
        for (name, view) in st.tensors() {
            let (layer, proj, which) = parse_hf_name(&name)
                .ok_or_else(|| LoraError::UnknownTensor { name: name.clone() })?;
            if let Some(t) = &targets {
                if !t.iter().any(|m| m == proj.hf_name()) {
                    return Err(bad(format!(
                        "tensor '{name}' adapts {}, which is not in target_modules",
                        proj.hf_name()
                    )));
                }
            }
            let slot = &mut halves.entry((layer, proj)).or_insert([None, None])[which];
            if slot.is_some() {
                return Err(LoraError::Duplicate { name, layer, proj });
            }
            *slot = Some((name, view));
        }
        let mut pending = Vec::with_capacity(halves.len());
        for ((layer, proj), pair) in halves {
            let [a, b] = pair;
            let ((name_a, va), (name_b, vb)) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some((n, _)), None) => {
                    let missing = n.replace("lora_A", "lora_B");
                    return Err(LoraError::MissingPair { name: n, missing });
                }
                (None, Some((n, _))) => {
                    let missing = n.replace("lora_B", "lora_A");
                    return Err(LoraError::MissingPair { name: n, missing });
                }
                (None, None) => continue,
            };
            let dt = |name: &str, v: &safetensors::tensor::TensorView| match v.dtype() {
                safetensors::Dtype::F32 => Ok(RawDtype::F32),
                safetensors::Dtype::F16 => Ok(RawDtype::F16),
                safetensors::Dtype::BF16 => Ok(RawDtype::BF16),
                other => Err(LoraError::BadDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                }),
            };
            let (da, db) = (dt(&name_a, &va)?, dt(&name_b, &vb)?);
            if va.shape().len() != 2 {
                return Err(shape_err(
                    &name_a,
                    vec![r, 0],
                    va.shape().to_vec(),
                    " (a 2-D matrix)",
                ));
            }
            if vb.shape().len() != 2 {
                return Err(shape_err(
                    &name_b,
                    vec![0, r],
                    vb.shape().to_vec(),
                    " (a 2-D matrix)",
                ));
            }
            // numpy order: lora_A (rank, n_in), lora_B (n_out, rank).
            let (rank, n_in) = (va.shape()[0], va.shape()[1]);
            let (n_out, rank_b) = (vb.shape()[0], vb.shape()[1]);
            if rank != r {
                return Err(LoraError::RankMismatch {
                    name: name_a,
                    what: "adapter_config.json 'r'",
                    expected: r,
                    got: rank,
                });
            }
            if rank_b != r {
                return Err(LoraError::RankMismatch {
                    name: name_b,
                    what: "adapter_config.json 'r'",
                    expected: r,
                    got: rank_b,
                });
            }
            pending.push(PendingPair {
                layer,
                proj,
                name_a,
                name_b,
                rank,
                n_in,
                n_out,
                a: RawTensor {
                    dtype: da,
                    data: va.data(),
                },
                b: RawTensor {
                    dtype: db,
                    data: vb.data(),
                },
            });
        }
        let name = file_stem(dir);
        let arch = base.map(|b| b.arch.clone());
        let unpermuted = base.is_none();
        let mut ad = Self::build(
            name,
            AdapterFormat::Peft,
            arch,
            base_model,
            alpha,
            use_rslora,
            pending,
            base,
            unpermuted,
        )?;
        ad.source = Some(dir.to_path_buf());
        Ok(ad)
    }

    /// Validate every pending pair (before converting anything), then convert.
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: String,
        format: AdapterFormat,
        arch: Option<String>,
        base_model: Option<String>,
        alpha: f32,
        use_rslora: bool,
        mut pending: Vec<PendingPair<'_>>,
        base: Option<&BaseShapes>,
        unpermuted_llama_qk: bool,
    ) -> Result<Self, LoraError> {
        if pending.is_empty() {
            return Err(LoraError::Empty);
        }
        pending.sort_by_key(|p| (p.layer, p.proj));
        for p in &pending {
            if p.rank == 0 || p.rank > MAX_RANK {
                return Err(LoraError::BadRank {
                    name: p.name_a.clone(),
                    rank: p.rank,
                });
            }
            if p.n_in == 0 || p.n_out == 0 {
                return Err(shape_err(&p.name_a, vec![], vec![p.rank, p.n_in], ""));
            }
            if let Some(b) = base {
                if p.layer >= b.n_layer() {
                    return Err(LoraError::LayerOutOfRange {
                        name: p.name_a.clone(),
                        layer: p.layer,
                        n_layer: b.n_layer(),
                    });
                }
                let (bi, bo) =
                    b.get(p.layer, p.proj)
                        .ok_or_else(|| LoraError::NoSuchProjection {
                            name: p.name_a.clone(),
                            layer: p.layer,
                            proj: p.proj,
                        })?;
                if p.n_in != bi {
                    return Err(shape_err(
                        &p.name_a,
                        vec![p.rank, bi],
                        vec![p.rank, p.n_in],
                        WRONG_BASE,
                    ));
                }
                if p.n_out != bo {
                    return Err(shape_err(
                        &p.name_b,
                        vec![bo, p.rank],
                        vec![p.n_out, p.rank],
                        WRONG_BASE,
                    ));
                }
            } else if p.layer >= 1 << 16 {
                return Err(LoraError::LayerOutOfRange {
                    name: p.name_a.clone(),
                    layer: p.layer,
                    n_layer: 1 << 16,
                });
            }
            let el = |d: RawDtype| -> usize {
                match d {
                    RawDtype::Ggml(t) => t.type_size() / t.block_size().max(1),
                    RawDtype::F32 => 4,
                    RawDtype::F16 | RawDtype::BF16 => 2,
                }
            };
            // Safetensors and GGUF readers check data extents; re-check the element counts.
            let need = |d: RawDtype, n: usize| match d {
                RawDtype::Ggml(t) => t.row_bytes(n as u64).map(|b| b as usize),
                _ => Some(n * el(d)),
            };
            if need(p.a.dtype, p.rank * p.n_in) != Some(p.a.data.len()) {
                return Err(shape_err(
                    &p.name_a,
                    vec![p.rank, p.n_in],
                    vec![p.a.data.len()],
                    " (data size)",
                ));
            }
            if need(p.b.dtype, p.rank * p.n_out) != Some(p.b.data.len()) {
                return Err(shape_err(
                    &p.name_b,
                    vec![p.n_out, p.rank],
                    vec![p.b.data.len()],
                    " (data size)",
                ));
            }
        }
        let n_layer = match base {
            Some(b) => b.n_layer(),
            None => pending.iter().map(|p| p.layer + 1).max().unwrap_or(0),
        };
        let permute = format == AdapterFormat::Peft
            && base.is_some_and(|b| b.arch == "llama" && b.n_head > 0 && b.n_head_kv > 0);
        let mut layers: Vec<[Option<LoraTensor>; 7]> =
            (0..n_layer).map(|_| Default::default()).collect();
        for p in pending {
            let denom = if use_rslora {
                (p.rank as f32).sqrt()
            } else {
                p.rank as f32
            };
            let a = p.a.to_f16(&p.name_a, p.rank * p.n_in)?;
            let mut b = p.b.to_f16(&p.name_b, p.n_out * p.rank)?;
            if permute {
                let heads = match p.proj {
                    Proj::Q => base.map(|b| b.n_head),
                    Proj::K => base.map(|b| b.n_head_kv),
                    _ => None,
                };
                if let Some(h) = heads {
                    b = permute_rows_llama(&b, p.n_out, p.rank, h).ok_or_else(|| {
                        shape_err(
                            &p.name_b,
                            vec![p.n_out, p.rank],
                            vec![p.n_out, p.rank],
                            " (rows not divisible into heads)",
                        )
                    })?;
                }
            }
            let t = LoraTensor::new(p.rank, p.n_in, p.n_out, alpha, denom, a, b)
                .ok_or_else(|| shape_err(&p.name_a, vec![p.rank, p.n_in], vec![], ""))?;
            layers[p.layer][p.proj.index()] = Some(t);
        }
        Ok(Self {
            name,
            format,
            source: None,
            arch,
            base_model,
            alpha,
            use_rslora,
            layers,
            unpermuted_llama_qk,
        })
    }

    /// Build an adapter from tensors already in memory (merges). `layers[l][proj]`.
    pub fn from_tensors(
        name: impl Into<String>,
        arch: Option<String>,
        alpha: f32,
        layers: Vec<[Option<LoraTensor>; 7]>,
    ) -> Result<Self, LoraError> {
        if layers.iter().all(|l| l.iter().all(Option::is_none)) {
            return Err(LoraError::Empty);
        }
        Ok(Self {
            name: name.into(),
            format: AdapterFormat::Memory,
            source: None,
            arch,
            base_model: None,
            alpha,
            use_rslora: false,
            layers,
            unpermuted_llama_qk: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn format(&self) -> AdapterFormat {
        self.format
    }
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
    /// Architecture from the GGUF file (or the base this adapter was validated against).
    pub fn arch(&self) -> Option<&str> {
        self.arch.as_deref()
    }
    /// The base model named in a PEFT config.
    pub fn base_model(&self) -> Option<&str> {
        self.base_model.as_deref()
    }
    pub fn alpha(&self) -> f32 {
        self.alpha
    }
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }
    /// The rank (the largest, if projections differ).
    pub fn rank(&self) -> usize {
        self.iter().map(|(_, _, t)| t.rank).max().unwrap_or(0)
    }
    /// Layers covered (the base's layer count when validated against one).
    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }
    pub fn tensor(&self, layer: usize, p: Proj) -> Option<&LoraTensor> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }
    /// Every adapted projection: `(layer, proj, tensor)`.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Proj, &LoraTensor)> {
        self.layers.iter().enumerate().flat_map(|(il, l)| {
            Proj::ALL
                .into_iter()
                .filter_map(move |p| l[p.index()].as_ref().map(|t| (il, p, t)))
        })
    }
    /// Number of adapted projections (each is an A/B pair).
    pub fn n_tensors(&self) -> usize {
        self.iter().count()
    }
    /// The projections this adapter targets in any layer.
    pub fn targets(&self) -> Vec<Proj> {
        let mut v: Vec<Proj> = self.iter().map(|(_, p, _)| p).collect();
        v.sort();
        v.dedup();
        v
    }
    /// Bytes held by the weights (f16 `A` and `B`).
    pub fn resident_bytes(&self) -> usize {
        self.iter().map(|(_, _, t)| t.bytes()).sum()
    }

    /// Check that this adapter fits a model (used before a forward pass).
    pub fn check_base(&self, base: &BaseShapes) -> Result<(), LoraError> {
        if let Some(a) = &self.arch {
            if *a != base.arch {
                return Err(LoraError::ArchMismatch {
                    adapter: a.clone(),
                    base: base.arch.clone(),
                });
            }
        }
        if self.unpermuted_llama_qk && base.arch == "llama" {
            return Err(LoraError::Unsupported(format!(
                "PEFT adapter '{}' was loaded without its base model; a llama base needs its Q/K rows permuted at load (pass the base model when opening it)",
                self.name
            )));
        }
        for (il, p, t) in self.iter() {
            let name = format!("blk.{il}.{}", p.gguf_name());
            if il >= base.n_layer() {
                return Err(LoraError::LayerOutOfRange {
                    name,
                    layer: il,
                    n_layer: base.n_layer(),
                });
            }
            match base.get(il, p) {
                None => {
                    return Err(LoraError::NoSuchProjection {
                        name,
                        layer: il,
                        proj: p,
                    })
                }
                Some((ni, no)) if ni != t.n_in || no != t.n_out => {
                    return Err(shape_err(
                        &name,
                        vec![ni, no],
                        vec![t.n_in, t.n_out],
                        WRONG_BASE,
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Serialize as a llama.cpp GGUF-LoRA adapter (F16). A tensor whose own scaling differs
    /// from the file's `alpha / rank` rule (rsLoRA, or a merge that mixed alphas) gets the
    /// difference folded into `B`, so the file computes what this adapter computes.
    pub fn to_gguf(&self, arch: &str) -> Result<GgufWriter, modu_gguf::GgufError> {
        let mut w = GgufWriter::new();
        w.add("general.architecture", Value::String(arch.to_string()));
        w.add("general.type", Value::String("adapter".into()));
        w.add("adapter.type", Value::String("lora".into()));
        w.add("adapter.lora.alpha", Value::F32(self.alpha));
        w.add("general.name", Value::String(self.name.clone()));
        for (il, p, t) in self.iter() {
            let file_s = if self.alpha == 0.0 {
                1.0
            } else {
                self.alpha / t.rank as f32
            };
            let fix = t.effective_scale(1.0) / file_s;
            let stem = format!("blk.{il}.{}.weight", p.gguf_name());
            w.add_tensor(
                format!("{stem}.lora_a"),
                &[t.n_in as u64, t.rank as u64],
                GgmlType::F16,
                f16_bytes(&t.a),
            )?;
            let b: Vec<f16> = if fix == 1.0 {
                t.b.clone()
            } else {
                t.b.iter()
                    .map(|v| f16::from_f32(v.to_f32() * fix))
                    .collect()
            };
            w.add_tensor(
                format!("{stem}.lora_b"),
                &[t.rank as u64, t.n_out as u64],
                GgmlType::F16,
                f16_bytes(&b),
            )?;
        }
        Ok(w)
    }
}

/// Largest adapter file read (a rank-1024 adapter of every projection of a 7B model is
/// ~2.5 GiB in f16).
const MAX_ADAPTER_FILE: u64 = 8 << 30;

/// Read a whole adapter file, refusing anything but a regular file (a FIFO or device would
/// block or never end) and files beyond [`MAX_ADAPTER_FILE`]. The check is made on the opened
/// file itself (opened non-blocking, so opening a FIFO cannot hang), so the path cannot be
/// swapped for something else between the check and the read.
fn read_regular(path: &Path) -> Result<Vec<u8>, LoraError> {
    let io = |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.custom_flags(libc::O_NONBLOCK);
    }
    let mut f = open.open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(LoraError::Unsupported(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_ADAPTER_FILE {
        return Err(LoraError::Unsupported(format!(
            "{}: {} bytes is larger than any adapter modu reads ({MAX_ADAPTER_FILE})",
            path.display(),
            meta.len()
        )));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut f, MAX_ADAPTER_FILE + 1),
        &mut buf,
    )
    .map_err(io)?;
    if buf.len() as u64 > MAX_ADAPTER_FILE {
        return Err(LoraError::Unsupported(format!(
            "{}: grew while being read",
            path.display()
        )));
    }
    Ok(buf)
}

pub(crate) fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("adapter")
        .to_string()
}

/// `blk.N.<proj>.weight.lora_a|lora_b` → (N, proj, 0 for a / 1 for b).
fn parse_gguf_name(name: &str) -> Option<(usize, Proj, usize)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer: usize = n.parse().ok()?;
    let (stem, which) = if let Some(s) = rest.strip_suffix(".weight.lora_a") {
        (s, 0)
    } else {
        (rest.strip_suffix(".weight.lora_b")?, 1)
    };
    Some((layer, Proj::from_gguf_name(stem)?, which))
}

/// `…layers.N.(self_attn|mlp).<x>_proj.lora_(A|B)[.default].weight` → (N, proj, 0/1).
fn parse_hf_name(name: &str) -> Option<(usize, Proj, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    let li = parts.iter().position(|&p| p == "layers")?;
    let layer: usize = parts.get(li + 1)?.parse().ok()?;
    let rest = &parts[li + 2..];
    // [self_attn|mlp, x_proj, lora_A|lora_B, (default,) weight]
    let (module, ab) = match rest {
        [_, m, ab, "weight"] => (*m, *ab),
        [_, m, ab, _, "weight"] => (*m, *ab),
        _ => return None,
    };
    let which = match ab {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return None,
    };
    Some((layer, Proj::from_hf_name(module)?, which))
}

/// GGUF's llama Q/K row permutation (HF pairs `(i, i + d/2)` → interleaved `(2i, 2i+1)`) applied
/// to the rows of `B` `(n_out, rank)`.
fn permute_rows_llama(b: &[f16], n_out: usize, rank: usize, n_head: usize) -> Option<Vec<f16>> {
    if n_out % n_head != 0 || (n_out / n_head) % 2 != 0 {
        return None;
    }
    let hd = n_out / n_head;
    let half = hd / 2;
    let mut out = vec![f16::ZERO; b.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                // new row h*hd + 2*i + s comes from old row h*hd + s*half + i
                let dst = h * hd + 2 * i + s;
                let src = h * hd + s * half + i;
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    Some(out)
}

// -------------------------------------------------------------------------------------------
// The batched low-rank path
// -------------------------------------------------------------------------------------------

/// An active module of one sequence: the adapter and its request scale.
pub type ModuleRef = (Arc<LoraAdapter>, f32);

/// One adapter's rows within one pass.
struct Group<'a> {
    adapter: &'a LoraAdapter,
}

/// One "pass": the k-th module of every sequence that has at least k+1 modules. Rows of a pass
/// are distinct, so a pass's groups touch disjoint rows and run together; passes run in order,
/// so each sequence gets its modules added in its own list order whatever the batch (the
/// results of a sequence do not depend on what it is batched with).
struct Pass<'a> {
    groups: Vec<Group<'a>>,
    /// Per batch row: `(group index, request scale, whether its sequence runs several tokens)`,
    /// or `None`.
    rows: Vec<Option<(u32, f32, bool)>>,
    n_rows: usize,
}

/// The modules of one batched forward pass, planned once and applied after every adapted
/// projection: for each pass, each row that has a module gets `y_row += s·B·(A·x_row)`, rows in
/// parallel. The base matmul has already run once over the whole batch.
pub struct BatchLora<'a> {
    passes: Vec<Pass<'a>>,
    /// Rows that any pass touches (their inputs are rounded to f16 once per projection input).
    touched: Vec<bool>,
    x16: Vec<f16>,
}

impl<'a> BatchLora<'a> {
    /// `modules` is empty (no modules anywhere) or has one entry per sequence. Zero scales are
    /// dropped, so a module at scale 0 gives exactly the base model. `None` when nothing applies.
    pub fn plan(
        modules: &'a [&'a [ModuleRef]],
        segs: &[Segment],
        base: &BaseShapes,
    ) -> Result<Option<Self>, LoraError> {
        if modules.is_empty() {
            return Ok(None);
        }
        if modules.len() != segs.len() {
            return Err(LoraError::Unsupported(format!(
                "{} module lists for {} sequences",
                modules.len(),
                segs.len()
            )));
        }
        let n: usize = segs.iter().map(|s| s.len).sum();
        // Per sequence, its modules with duplicates merged (scales summed) and zeros dropped.
        let per_seq: Vec<Vec<(&LoraAdapter, f32)>> = modules
            .iter()
            .map(|list| {
                let mut v: Vec<(&LoraAdapter, f32)> = Vec::new();
                for (a, s) in list.iter() {
                    if let Some(e) = v.iter_mut().find(|(b, _)| std::ptr::eq(*b, &**a)) {
                        e.1 += *s;
                    } else {
                        v.push((&**a, *s));
                    }
                }
                v.retain(|(_, s)| *s != 0.0);
                v
            })
            .collect();
        let mut checked: Vec<*const LoraAdapter> = Vec::new();
        for (a, s) in per_seq.iter().flatten() {
            if !s.is_finite() {
                return Err(LoraError::Unsupported(format!(
                    "module '{}' has a non-finite scale {s}",
                    a.name
                )));
            }
            if !checked.contains(&(*a as *const _)) {
                a.check_base(base)?;
                checked.push(*a as *const _);
            }
        }
        let n_pass = per_seq.iter().map(Vec::len).max().unwrap_or(0);
        if n_pass == 0 {
            return Ok(None);
        }
        let mut touched = vec![false; n];
        let mut passes = Vec::with_capacity(n_pass);
        for k in 0..n_pass {
            let mut pass = Pass {
                groups: vec![],
                rows: vec![None; n],
                n_rows: 0,
            };
            for (seg, mods) in segs.iter().zip(&per_seq) {
                let Some(&(ad, scale)) = mods.get(k) else {
                    continue;
                };
                let gi = match pass.groups.iter().position(|g| std::ptr::eq(g.adapter, ad)) {
                    Some(i) => i,
                    None => {
                        pass.groups.push(Group { adapter: ad });
                        pass.groups.len() - 1
                    }
                };
                let rows = seg.start..seg.start + seg.len;
                pass.rows[rows.clone()].fill(Some((gi as u32, scale, seg.len > 1)));
                touched[rows].fill(true);
                pass.n_rows += seg.len;
            }
            passes.push(pass);
        }
        Ok(Some(Self {
            passes,
            touched,
            x16: Vec::new(),
        }))
    }

    /// Add the modules' updates of `layer` to the outputs of projections that share the input
    /// `x` (`[n, n_in]`): `outs[i]` is `[n, n_out_i]` for projection `projs[i]`.
    pub fn apply(&mut self, layer: usize, projs: &[Proj], x: &[f32], outs: &mut [&mut Vec<f32>]) {
        let any = self.passes.iter().any(|p| {
            p.groups.iter().any(|g| {
                projs
                    .iter()
                    .any(|&pr| g.adapter.tensor(layer, pr).is_some())
            })
        });
        if !any {
            return;
        }
        let n = self.touched.len();
        let n_in = x.len() / n;
        self.x16.resize(x.len(), f16::ZERO);
        for (r, t) in self.touched.iter().enumerate() {
            if *t {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(
                    &mut self.x16[r * n_in..(r + 1) * n_in],
                    &x[r * n_in..(r + 1) * n_in],
                );
            }
        }
        for pass in &self.passes {
            for (&proj, out) in projs.iter().zip(outs.iter_mut()) {
                if !pass
                    .groups
                    .iter()
                    .any(|g| g.adapter.tensor(layer, proj).is_some())
                {
                    continue;
                }
                let n_out = out.len() / n;
                let x16 = &self.x16;
                let job = |r: usize, y: &mut [f32]| {
                    if let Some((gi, scale, multi)) = pass.rows[r] {
                        if let Some(t) = pass.groups[gi as usize].adapter.tensor(layer, proj) {
                            low_rank_row(t, scale, multi, &x16[r * n_in..(r + 1) * n_in], y);
                        }
                    }
                };
                let work = pass.n_rows * 2 * n_out.max(n_in) * 16;
                if pass.n_rows > 1 && work > 1 << 16 && rayon::current_num_threads() > 1 {
                    modu_kernels::pool::for_each_chunk_mut(out, n_out, job);
                } else {
                    out.chunks_exact_mut(n_out)
                        .enumerate()
                        .for_each(|(r, y)| job(r, y));
                }
            }
        }
    }
}

/// `y += s·(B·f16(A·x16))` for one row, `s` = the tensor's effective scale at `scale`.
///
/// Both products are summed in the order ggml's CPU `mul_mat` sums F16 weights, because random
/// adapters make the network sensitive enough that summation order shows in greedy outputs:
/// for a prompt (`multi`: the sequence runs two or more tokens in this step) llama.cpp hands
/// the job to tinyBLAS when the inner dimension is a multiple of 8 and the rows a multiple of 4
/// (`modu_kernels::matvec_f16_tiny`), otherwise and for a single token it uses
/// `ggml_vec_dot_f16` (`modu_kernels::matvec_f16_ggml`). The product is then scaled and added.
pub fn low_rank_row(t: &LoraTensor, scale: f32, multi: bool, x16: &[f16], y: &mut [f32]) {
    let r = t.rank;
    let s = t.effective_scale(scale);
    let tiny = |k: usize, m: usize| multi && k % 8 == 0 && m % 4 == 0;
    let mut tv = [0f32; MAX_RANK];
    let mut t16 = [f16::ZERO; MAX_RANK];
    if tiny(t.n_in, r) {
        modu_kernels::matvec_f16_tiny(&t.a, &x16[..t.n_in], &mut tv[..r]);
    } else {
        modu_kernels::matvec_f16_ggml(&t.a, &x16[..t.n_in], &mut tv[..r]);
    }
    // The rank vector is rounded to f16 for B·t, as ggml converts it to B's dot type.
    half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut t16[..r], &tv[..r]);
    let b_tiny = tiny(r, t.n_out);
    let mut acc = [0f32; COL_BLOCK];
    let mut c0 = 0;
    while c0 < t.n_out {
        let w = COL_BLOCK.min(t.n_out - c0);
        let bw = &t.b[c0 * r..(c0 + w) * r];
        if b_tiny {
            modu_kernels::matvec_f16_tiny(bw, &t16[..r], &mut acc[..w]);
        } else {
            modu_kernels::matvec_f16_ggml(bw, &t16[..r], &mut acc[..w]);
        }
        for (yv, a) in y[c0..c0 + w].iter_mut().zip(&acc[..w]) {
            *yv += a * s;
        }
        c0 += w;
    }
}

/// Output columns handled per block of the `B·t` step (an f32 stack buffer of this size).
const COL_BLOCK: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_gguf_name("blk.3.ffn_down.weight.lora_b"),
            Some((3, Proj::Down, 1))
        );
        assert_eq!(parse_gguf_name("blk.3.ffn_down.weight"), None);
        assert_eq!(parse_gguf_name("token_embd.weight.lora_a"), None);
        assert_eq!(
            parse_hf_name("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some((12, Proj::Q, 0))
        );
        assert_eq!(
            parse_hf_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"),
            Some((0, Proj::Up, 1))
        );
        assert_eq!(
            parse_hf_name("base_model.model.model.layers.0.mlp.up_proj.weight"),
            None
        );
        assert_eq!(
            parse_hf_name("base_model.model.lm_head.lora_A.weight"),
            None
        );
    }

    #[test]
    fn low_rank_row_matches_dense() {
        let (r, ni, no) = (3, 40, 300);
        let a: Vec<f16> = (0..r * ni)
            .map(|i| f16::from_f32(((i * 7 % 13) as f32 - 6.0) / 8.0))
            .collect();
        let b: Vec<f16> = (0..no * r)
            .map(|i| f16::from_f32(((i * 5 % 11) as f32 - 5.0) / 4.0))
            .collect();
        let t = LoraTensor::new(r, ni, no, 1.0, 2.0, a, b.clone()).unwrap();
        let x: Vec<f16> = (0..ni)
            .map(|i| f16::from_f32((i % 5) as f32 / 4.0))
            .collect();
        let mut y = vec![1f32; no];
        low_rank_row(&t, 2.0, true, &x, &mut y);
        let d = t.delta();
        for o in 0..no {
            let want: f32 = 1.0 + 2.0 * (0..ni).map(|i| d[o * ni + i] * x[i].to_f32()).sum::<f32>();
            assert!((y[o] - want).abs() < 1e-3 * want.abs().max(1.0), "{o}");
        }
        assert_eq!(t.b(), &b[..]);
    }

    #[test]
    fn llama_permutation_interleaves_halves() {
        // one head of dim 4, rank 1: rows [0,1,2,3] → [0,2,1,3]
        let b: Vec<f16> = (0..4).map(|i| f16::from_f32(i as f32)).collect();
        let p = permute_rows_llama(&b, 4, 1, 1).unwrap();
        let got: Vec<f32> = p.iter().map(|v| v.to_f32()).collect();
        assert_eq!(got, vec![0.0, 2.0, 1.0, 3.0]);
    }
}
