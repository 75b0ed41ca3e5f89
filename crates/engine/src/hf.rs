#![allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.80
//! Hugging Face checkpoints (a `transformers` model directory) ⇄ GGUF.
//!
//! **Import** ([`HfCheckpoint::open`]) reads `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens, `add_bos_token`), the optional
//! `generation_config.json` and the weights (`model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`; f32, f16 or bf16), validates everything against the config,
//! and yields GGUF metadata plus GGUF-named tensors ([`HfCheckpoint::sources`]) that
//! `quantize::quantize_tensors` turns into a GGUF file. Weight matrices stay zero-copy views
//! into the memory-mapped shards (safetensors' row-major `[out, in]` is GGUF's `[in, out]` in
//! ggml order, the same bytes), except where the GGUF layout differs from Hugging Face's:
//!
//! * **Llama Q/K** — HF Llama rotates pairs `(i, i + d/2)` of each head (`rotate_half`); GGUF
//!   `llama` rotates adjacent pairs `(2i, 2i + 1)`, so llama.cpp's converter permutes the rows of
//!   `q_proj`/`k_proj`: `reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`, i.e. new row
//!   `h·hd + 2i + s` is old row `h·hd + s·hd/2 + i`. Qwen2 and Gemma 3 GGUFs use the NeoX
//!   (rotate-half) layout, so their weights are copied as they are.
//! * **Gemma norms** — Gemma's RMSNorm multiplies by `1 + w`; GGUF stores `1 + w` (modu's Gemma
//!   loader, like llama.cpp, uses plain RMS norms), so every `*norm.weight` gets 1 added.
//! * **1-D tensors** (norms, biases) are stored as F32, as llama.cpp's converter does.
//! * **Tied embeddings** — without `lm_head.weight` (or with `tie_word_embeddings: true`) there
//!   is no `output.weight`; the loaders then use `token_embd.weight`.
//! * **Llama 3 RoPE scaling** (`rope_type: llama3`) becomes the `rope_freqs.weight` tensor of
//!   per-frequency divisors; `linear` becomes `rope.scaling.type/factor`.
//!
//! The tokenizer becomes `tokenizer.ggml.*`: byte-level BPE (`ByteLevel` pre-tokenizer, no byte
//! fallback: Qwen, Llama 3) as model `gpt2` with `tokens`, `token_type`, `merges` and `pre`
//! recognised from the split regex; SentencePiece-style vocabularies (BPE with byte fallback,
//! e.g. Gemma, or Unigram) as model `llama` with `scores` (Unigram scores as they are; for BPE
//! the negated merge order, which is what SentencePiece BPE scores are) and byte tokens
//! `<0xNN>`. Token types follow llama.cpp: special added tokens are control (3), other added
//! tokens user-defined (4), byte tokens 6, ids without a token (the embedding is often padded)
//! get `[PADn]` and type unused (5).
//!
//! **Export** ([`export_hf`]) is the inverse, used to build test checkpoints from GGUF models and
//! useful on its own (`modu export-hf`): every tensor is dequantized and stored as f16/bf16/f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use modu_gguf::{Array, GgmlType, Value};
use serde_json::{json, Value as Json};

use crate::quantize::SourceTensor;

/// Errors from reading or writing a Hugging Face checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{0}: not a directory")]
    NotADir(PathBuf),
    #[error("{}: missing {file}", dir.display())]
    MissingFile { dir: PathBuf, file: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: invalid JSON: {msg}")]
    Json { file: String, msg: String },
    #[error("config.json: missing or invalid `{0}`")]
    Config(String),
    #[error("unsupported architecture `{0}` (supported: Qwen2ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM)")]
    UnknownArch(String),
    #[error("unsupported model configuration: {0}")]
    Unsupported(String),
    #[error("{file}: bad safetensors file: {msg}")]
    Safetensors { file: String, msg: String },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{0}` is not part of a {1} model")]
    UnknownTensor(String, &'static str),
    #[error("tensor `{0}` appears twice")]
    DuplicateTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?} (from config.json)")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}`: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    BadDtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error(transparent)]
    Gguf(#[from] modu_gguf::GgufError),
}

/// The architectures modu converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    Llama,
    Qwen2,
    Gemma3,
}

impl HfArch {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Gemma3ForCausalLM" => Some(Self::Gemma3),
            _ => None,
        }
    }
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }
    /// `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
        }
    }
    fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3_text",
        }
    }
}

/// The shape-relevant hyper-parameters (from `config.json`, or from GGUF metadata on export).
#[derive(Debug, Clone)]
struct Dims {
    n_vocab: usize,
    n_embd: usize,
    n_layer: usize,
    n_ff: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

/// One tensor of the name map: GGUF name, HF name, numpy shape, required.
struct Slot {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    required: bool,
}

/// Every tensor a model of `arch` may have, in GGUF file order.
fn slots(arch: HfArch, d: &Dims, has_output: bool) -> Vec<Slot> {
    let mut v = Vec::new();
    let mut push = |gguf: String, hf: String, shape: Vec<usize>, required: bool| {
        v.push(Slot {
            gguf,
            hf,
            shape,
            required,
        })
    };
    let (e, q, kv, ff) = (
        d.n_embd,
        d.n_head * d.head_dim,
        d.n_head_kv * d.head_dim,
        d.n_ff,
    );
    push(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![d.n_vocab, e],
        true,
    );
    for i in 0..d.n_layer {
        let g = |s: &str| format!("blk.{i}.{s}");
        let h = |s: &str| format!("model.layers.{i}.{s}");
        push(
            g("attn_norm.weight"),
            h("input_layernorm.weight"),
            vec![e],
            true,
        );
        for (gn, hn, rows, cols) in [
            ("attn_q", "self_attn.q_proj", q, e),
            ("attn_k", "self_attn.k_proj", kv, e),
            ("attn_v", "self_attn.v_proj", kv, e),
            ("attn_output", "self_attn.o_proj", e, q),
        ] {
            push(
                g(&format!("{gn}.weight")),
                h(&format!("{hn}.weight")),
                vec![rows, cols],
                true,
            );
            push(
                g(&format!("{gn}.bias")),
                h(&format!("{hn}.bias")),
                vec![rows],
                false,
            );
        }
        if arch == HfArch::Gemma3 {
            push(
                g("attn_q_norm.weight"),
                h("self_attn.q_norm.weight"),
                vec![d.head_dim],
                true,
            );
            push(
                g("attn_k_norm.weight"),
                h("self_attn.k_norm.weight"),
                vec![d.head_dim],
                true,
            );
            push(
                g("post_attention_norm.weight"),
                h("post_attention_layernorm.weight"),
                vec![e],
                true,
            );
            push(
                g("ffn_norm.weight"),
                h("pre_feedforward_layernorm.weight"),
                vec![e],
                true,
            );
            push(
                g("post_ffw_norm.weight"),
                h("post_feedforward_layernorm.weight"),
                vec![e],
                true,
            );
        } else {
            push(
                g("ffn_norm.weight"),
                h("post_attention_layernorm.weight"),
                vec![e],
                true,
            );
        }
        push(
            g("ffn_gate.weight"),
            h("mlp.gate_proj.weight"),
            vec![ff, e],
            true,
        );
        push(
            g("ffn_up.weight"),
            h("mlp.up_proj.weight"),
            vec![ff, e],
            true,
        );
        push(
            g("ffn_down.weight"),
            h("mlp.down_proj.weight"),
            vec![e, ff],
            true,
        );
    }
    push(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![e],
        true,
    );
    if has_output {
        push(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![d.n_vocab, e],
            true,
        );
    }
    v
}

/// Whether the GGUF tensor has Llama's rotary row permutation, and over how many heads.
fn llama_perm_heads(arch: HfArch, gguf_name: &str, d: &Dims) -> Option<usize> {
    if arch != HfArch::Llama {
        return None;
    }
    if gguf_name.ends_with(".attn_q.weight") || gguf_name.ends_with(".attn_q.bias") {
        Some(d.n_head)
    } else if gguf_name.ends_with(".attn_k.weight") || gguf_name.ends_with(".attn_k.bias") {
        Some(d.n_head_kv)
    } else {
        None
    }
}

/// Gemma's `(1 + w)` norms.
fn is_gemma_norm(arch: HfArch, gguf_name: &str) -> bool {
    arch == HfArch::Gemma3 && gguf_name.ends_with("norm.weight")
}

/// Permute whole rows (`row_bytes` each) of a Q/K weight from HF's rotate-half layout to GGUF
/// `llama`'s interleaved one (`inverse`: back). Row counts are checked by the caller.
fn permute_rows(src: &[u8], row_bytes: usize, n_head: usize, inverse: bool) -> Vec<u8> {
    let rows = src.len() / row_bytes;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0u8; src.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let gguf_row = h * hd + 2 * i + s;
                let hf_row = h * hd + s * half + i;
                let (dst, from) = if inverse {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

fn read_json(dir: &Path, file: &str) -> Result<Option<Json>, HfError> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| HfError::Json {
            file: file.into(),
            msg: e.to_string(),
        })
}

fn need_json(dir: &Path, file: &str) -> Result<Json, HfError> {
    read_json(dir, file)?.ok_or_else(|| HfError::MissingFile {
        dir: dir.to_path_buf(),
        file: file.into(),
    })
}

fn cfg_usize(c: &Json, key: &str) -> Result<Option<usize>, HfError> {
    match c.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&x| x > 0)
            .map(|x| Some(x as usize))
            .ok_or_else(|| HfError::Config(key.into())),
    }
}

fn cfg_req(c: &Json, key: &str) -> Result<usize, HfError> {
    cfg_usize(c, key)?.ok_or_else(|| HfError::Config(key.into()))
}

fn cfg_f64(c: &Json, key: &str) -> Result<Option<f64>, HfError> {
    match c.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| HfError::Config(key.into())),
    }
}

enum Data {
    Mapped {
        shard: usize,
        start: usize,
        end: usize,
    },
    Owned(Vec<u8>),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data,
}

/// A validated Hugging Face checkpoint, ready to be written as GGUF.
pub struct HfCheckpoint {
    pub arch: HfArch,
    /// GGUF metadata (architecture hyper-parameters, tokenizer, chat template).
    pub metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
    maps: Vec<Mmap>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("arch", &self.arch)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl HfCheckpoint {
    /// The tensors under their GGUF names, in GGUF order.
    pub fn sources(&self) -> Vec<SourceTensor<'_>> {
        self.tensors
            .iter()
            .map(|t| SourceTensor {
                name: &t.name,
                dims: &t.dims,
                ty: t.ty,
                data: match &t.data {
                    Data::Mapped { shard, start, end } => &self.maps[*shard][*start..*end],
                    Data::Owned(v) => v,
                },
            })
            .collect()
    }

    /// Read and validate a model directory. Nothing is converted until [`Self::sources`] is
    /// consumed, except the few tensors whose layout changes (1-D tensors, Llama Q/K).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        if !dir.is_dir() {
            return Err(HfError::NotADir(dir.to_path_buf()));
        }
        let config = need_json(dir, "config.json")?;
        let arch_name = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| HfError::Config("architectures".into()))?;
        let arch =
            HfArch::from_hf(arch_name).ok_or_else(|| HfError::UnknownArch(arch_name.into()))?;
        let n_embd = cfg_req(&config, "hidden_size")?;
        let n_head = cfg_req(&config, "num_attention_heads")?;
        let default_hd = if arch == HfArch::Gemma3 {
            256
        } else {
            n_embd / n_head
        };
        let mut dims = Dims {
            n_vocab: cfg_req(&config, "vocab_size")?,
            n_embd,
            n_layer: cfg_req(&config, "num_hidden_layers")?,
            n_ff: cfg_req(&config, "intermediate_size")?,
            n_head,
            n_head_kv: cfg_usize(&config, "num_key_value_heads")?.unwrap_or(n_head),
            head_dim: cfg_usize(&config, "head_dim")?.unwrap_or(default_hd),
        };
        // Absurd sizes would only allocate or overflow before any tensor could disagree.
        for (key, v, max) in [
            ("vocab_size", dims.n_vocab, 1 << 24),
            ("hidden_size", dims.n_embd, 1 << 20),
            ("num_hidden_layers", dims.n_layer, 4096),
            ("intermediate_size", dims.n_ff, 1 << 22),
            ("num_attention_heads", dims.n_head, 4096),
            ("num_key_value_heads", dims.n_head_kv, 4096),
            ("head_dim", dims.head_dim, 4096),
        ] {
            if v > max {
                return Err(HfError::Config(format!("{key} ({v} > {max})")));
            }
        }
        if dims.n_head % dims.n_head_kv != 0 || dims.head_dim % 2 != 0 {
            return Err(HfError::Unsupported(format!(
                "{} heads over {} KV heads of dim {}",
                dims.n_head, dims.n_head_kv, dims.head_dim
            )));
        }

        // Weights: shards from the index, else model.safetensors, else every *.safetensors.
        let files: Vec<String> = if let Some(idx) = read_json(dir, "model.safetensors.index.json")?
        {
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| HfError::Json {
                    file: "model.safetensors.index.json".into(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut f: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            f.sort();
            f.dedup();
            f
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            let mut f: Vec<String> = std::fs::read_dir(dir)
                .map_err(|source| HfError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            f.sort();
            f
        };
        if files.is_empty() {
            return Err(HfError::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors (or model.safetensors.index.json)".into(),
            });
        }
        let mut maps = Vec::new();
        // HF name → (shard, dtype, shape, start, end)
        let mut found: HashMap<String, (usize, GgmlType, Vec<usize>, usize, usize)> =
            HashMap::new();
        for (si, fname) in files.iter().enumerate() {
            let path = dir.join(fname);
            let file = File::open(&path).map_err(|source| HfError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only and only read through this map; like every
            // mmap-based loader we rely on nobody truncating the checkpoint while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| HfError::Io {
                path: path.clone(),
                source,
            })?;
            let st =
                safetensors::SafeTensors::deserialize(&map).map_err(|e| HfError::Safetensors {
                    file: fname.clone(),
                    msg: e.to_string(),
                })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let ty = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(HfError::BadDtype {
                            name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                let end = start + view.data().len();
                if found
                    .insert(name.clone(), (si, ty, view.shape().to_vec(), start, end))
                    .is_some()
                {
                    return Err(HfError::DuplicateTensor(name));
                }
            }
            maps.push(map);
        }

        // The vocabulary size is the embedding's row count; config.json must agree.
        if let Some((_, _, shape, _, _)) = found.get("model.embed_tokens.weight") {
            if shape.len() == 2 && shape[0] != dims.n_vocab {
                return Err(HfError::BadShape {
                    name: "model.embed_tokens.weight".into(),
                    expected: vec![dims.n_vocab, dims.n_embd],
                    got: shape.clone(),
                });
            }
        }
        // Tied embeddings: `tie_word_embeddings: true` (an `lm_head.weight` saved anyway is a
        // copy and is dropped), or no `lm_head.weight` at all (as llama.cpp's converter
        // treats it).
        let tied = config
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let has_output = found.contains_key("lm_head.weight") && !tied;
        let slots = slots(arch, &dims, has_output);
        let known: HashMap<&str, usize> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.hf.as_str(), i))
            .collect();
        for name in found.keys() {
            if !known.contains_key(name.as_str())
                && !name.ends_with("rotary_emb.inv_freq")
                && name != "lm_head.weight"
            {
                return Err(HfError::UnknownTensor(name.clone(), arch.hf_name()));
            }
        }
        let mut tensors = Vec::new();
        let (mut metadata, rope_freqs) = hparams_metadata(arch, &config, &mut dims, dir)?;
        if let Some(f) = rope_freqs {
            tensors.push(Tensor {
                name: "rope_freqs.weight".into(),
                dims: vec![f.len() as u64],
                ty: GgmlType::F32,
                data: Data::Owned(f.iter().flat_map(|x| x.to_le_bytes()).collect()),
            });
        }
        for s in &slots {
            let Some((shard, ty, shape, start, end)) = found.get(&s.hf) else {
                if s.required {
                    return Err(HfError::MissingTensor(s.hf.clone()));
                }
                continue;
            };
            if *shape != s.shape {
                return Err(HfError::BadShape {
                    name: s.hf.clone(),
                    expected: s.shape.clone(),
                    got: shape.clone(),
                });
            }
            let bytes = &maps[*shard][*start..*end];
            let gdims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
            let terr = |msg: String| HfError::Tensor {
                name: s.hf.clone(),
                msg,
            };
            let data = if shape.len() == 1 {
                let mut v = vec![0f32; shape[0]];
                modu_kernels::dequantize_row(*ty, bytes, &mut v)
                    .map_err(|e| terr(e.to_string()))?;
                if is_gemma_norm(arch, &s.gguf) {
                    v.iter_mut().for_each(|x| *x += 1.0);
                }
                let mut b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                if let Some(h) = llama_perm_heads(arch, &s.gguf, &dims) {
                    b = permute_rows(&b, 4, h, false);
                }
                tensors.push(Tensor {
                    name: s.gguf.clone(),
                    dims: gdims,
                    ty: GgmlType::F32,
                    data: Data::Owned(b),
                });
                continue;
            } else if let Some(h) = llama_perm_heads(arch, &s.gguf, &dims) {
                let rb = bytes.len() / shape[0];
                Data::Owned(permute_rows(bytes, rb, h, false))
            } else {
                Data::Mapped {
                    shard: *shard,
                    start: *start,
                    end: *end,
                }
            };
            tensors.push(Tensor {
                name: s.gguf.clone(),
                dims: gdims,
                ty: *ty,
                data,
            });
        }
        tokenizer_metadata(dir, &config, dims.n_vocab, &mut metadata)?;
        Ok(Self {
            arch,
            metadata,
            tensors,
            maps,
        })
    }
}

/// The `{arch}.*` keys, and Llama 3's RoPE frequency divisors when the config asks for them.
#[allow(clippy::type_complexity)]
fn hparams_metadata(
    arch: HfArch,
    c: &Json,
    d: &mut Dims,
    dir: &Path,
) -> Result<(Vec<(String, Value)>, Option<Vec<f32>>), HfError> {
    let a = arch.gguf_name();
    let mut m: Vec<(String, Value)> = Vec::new();
    let k = |s: &str| format!("{a}.{s}");
    m.push(("general.architecture".into(), Value::String(a.into())));
    m.push(("general.type".into(), Value::String("model".into())));
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    m.push(("general.name".into(), Value::String(name)));
    let ctx = cfg_usize(c, "max_position_embeddings")?.unwrap_or(4096);
    m.push((k("context_length"), Value::U32(ctx as u32)));
    m.push((k("embedding_length"), Value::U32(d.n_embd as u32)));
    m.push((k("block_count"), Value::U32(d.n_layer as u32)));
    m.push((k("feed_forward_length"), Value::U32(d.n_ff as u32)));
    m.push((k("attention.head_count"), Value::U32(d.n_head as u32)));
    m.push((k("attention.head_count_kv"), Value::U32(d.n_head_kv as u32)));
    let default_theta = if arch == HfArch::Gemma3 {
        1_000_000.0
    } else {
        10_000.0
    };
    let theta = cfg_f64(c, "rope_theta")?.unwrap_or(default_theta);
    m.push((k("rope.freq_base"), Value::F32(theta as f32)));
    let eps = cfg_f64(c, "rms_norm_eps")?.unwrap_or(1e-6);
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(eps as f32),
    ));
    if arch == HfArch::Gemma3 || d.head_dim != d.n_embd / d.n_head {
        m.push((k("attention.key_length"), Value::U32(d.head_dim as u32)));
        m.push((k("attention.value_length"), Value::U32(d.head_dim as u32)));
    }
    if let Some(act) = c
        .get("hidden_act")
        .or_else(|| c.get("hidden_activation"))
        .and_then(|v| v.as_str())
    {
        let ok = match arch {
            HfArch::Gemma3 => act.starts_with("gelu"),
            _ => act == "silu",
        };
        if !ok {
            return Err(HfError::Unsupported(format!(
                "activation `{act}` for {}",
                arch.hf_name()
            )));
        }
    }
    let mut rope_freqs = None;
    if let Some(rs) = c.get("rope_scaling").filter(|v| !v.is_null()) {
        let ty = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let factor = rs.get("factor").and_then(|v| v.as_f64());
        match (ty, factor) {
            ("default", _) => {}
            ("linear", Some(f)) => {
                m.push((k("rope.scaling.type"), Value::String("linear".into())));
                m.push((k("rope.scaling.factor"), Value::F32(f as f32)));
            }
            ("llama3", Some(f)) if arch == HfArch::Llama => {
                let g = |key: &str, def: f64| rs.get(key).and_then(|v| v.as_f64()).unwrap_or(def);
                let low = g("low_freq_factor", 1.0);
                let high = g("high_freq_factor", 4.0);
                let old = g("original_max_position_embeddings", 8192.0);
                let (low_wl, high_wl) = (old / low, old / high);
                let hd = d.head_dim;
                let mut v = Vec::with_capacity(hd / 2);
                for i in (0..hd).step_by(2) {
                    let freq = 1.0 / theta.powf(i as f64 / hd as f64);
                    let wl = 2.0 * std::f64::consts::PI / freq;
                    v.push(if wl < high_wl {
                        1.0
                    } else if wl > low_wl {
                        f as f32
                    } else {
                        let smooth = (old / wl - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / f + smooth)) as f32
                    });
                }
                rope_freqs = Some(v);
            }
            _ => {
                return Err(HfError::Unsupported(format!(
                    "rope_scaling {rs} (supported: linear, llama3 for Llama)"
                )))
            }
        }
    }
    if arch == HfArch::Gemma3 {
        let sw = cfg_usize(c, "sliding_window")?.unwrap_or(512);
        m.push((k("attention.sliding_window"), Value::U32(sw as u32)));
        let local = cfg_f64(c, "rope_local_base_freq")?.unwrap_or(10_000.0);
        if local != 10_000.0 {
            m.push((k("rope.freq_base_swa"), Value::F32(local as f32)));
        }
        // modu (like llama.cpp) runs five local layers then one global one, and scales the
        // queries by 1/sqrt(head_dim).
        let pattern_ok = match c.get("layer_types").and_then(|v| v.as_array()) {
            Some(lt) => lt.iter().enumerate().all(|(i, t)| {
                let sliding = i % 6 < 5;
                t.as_str()
                    == Some(if sliding {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    })
            }),
            None => cfg_usize(c, "sliding_window_pattern")?.unwrap_or(6) == 6,
        };
        if !pattern_ok {
            return Err(HfError::Unsupported(
                "Gemma 3 layer pattern other than 5 sliding + 1 global".into(),
            ));
        }
        if let Some(q) = cfg_f64(c, "query_pre_attn_scalar")? {
            if q != d.head_dim as f64 {
                return Err(HfError::Unsupported(format!(
                    "query_pre_attn_scalar {q} != head_dim {}",
                    d.head_dim
                )));
            }
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if cfg_f64(c, key)?.is_some() {
                return Err(HfError::Unsupported(format!("{key} is not supported")));
            }
        }
    }
    Ok((m, rope_freqs))
}

/// `<0xNN>` byte tokens of SentencePiece vocabularies.
fn is_byte_token(s: &str) -> bool {
    s.len() == 6
        && s.starts_with("<0x")
        && s.ends_with('>')
        && s[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The regexes of the byte-level pre-tokenizers modu knows, as `tokenizer.json` writes them,
/// with their GGUF `tokenizer.ggml.pre` names.
const HF_PRE: &[(&str, &str)] = &[
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "gpt2",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    ),
];

/// All `Split` regexes in a pre-tokenizer tree, and whether a `ByteLevel` step uses its own
/// (GPT-2) regex.
fn collect_pre(
    v: &Json,
    regexes: &mut Vec<String>,
    byte_level_regex: &mut bool,
    byte_level: &mut bool,
) {
    match v.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in v
                .get("pretokenizers")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                collect_pre(p, regexes, byte_level_regex, byte_level);
            }
        }
        Some("Split") => {
            if let Some(r) = v
                .get("pattern")
                .and_then(|p| p.get("Regex").or_else(|| p.get("String")))
                .and_then(|r| r.as_str())
            {
                regexes.push(r.to_string());
            }
        }
        Some("ByteLevel") => {
            *byte_level = true;
            if v.get("use_regex").and_then(|u| u.as_bool()).unwrap_or(true) {
                *byte_level_regex = true;
            }
        }
        _ => {}
    }
}

/// Content of a special-token entry of tokenizer_config.json (`"<s>"` or `{"content": "<s>"}`).
fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn tokenizer_metadata(
    dir: &Path,
    config: &Json,
    n_vocab: usize,
    m: &mut Vec<(String, Value)>,
) -> Result<(), HfError> {
    let tj = need_json(dir, "tokenizer.json")?;
    let tc = read_json(dir, "tokenizer_config.json")?.unwrap_or(Json::Null);
    let gen = read_json(dir, "generation_config.json")?.unwrap_or(Json::Null);
    let terr = |s: String| HfError::Tokenizer(s);
    let model = tj
        .get("model")
        .ok_or_else(|| terr("tokenizer.json has no `model`".into()))?;
    let mtype = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);

    // id → (token, score)
    let mut vocab: BTreeMap<usize, (String, Option<f32>)> = BTreeMap::new();
    let mut unk_id = None;
    match mtype {
        "BPE" => {
            let v = model
                .get("vocab")
                .and_then(|v| v.as_object())
                .ok_or_else(|| terr("BPE model without a `vocab` object".into()))?;
            for (tok, id) in v {
                let id = id
                    .as_u64()
                    .ok_or_else(|| terr(format!("bad id for token {tok:?}")))?;
                vocab.insert(id as usize, (tok.clone(), None));
            }
        }
        "Unigram" => {
            let v = model
                .get("vocab")
                .and_then(|v| v.as_array())
                .ok_or_else(|| terr("Unigram model without a `vocab` array".into()))?;
            for (id, e) in v.iter().enumerate() {
                let tok = e.get(0).and_then(|t| t.as_str());
                let score = e.get(1).and_then(|s| s.as_f64());
                let (Some(tok), Some(score)) = (tok, score) else {
                    return Err(terr(format!("bad Unigram vocab entry {id}")));
                };
                vocab.insert(id, (tok.to_string(), Some(score as f32)));
            }
            unk_id = model
                .get("unk_id")
                .and_then(|u| u.as_u64())
                .map(|u| u as usize);
        }
        other => {
            return Err(terr(format!(
                "tokenizer model `{other}` (supported: BPE, Unigram)"
            )))
        }
    }
    // Added tokens: id → special
    let mut added: HashMap<usize, bool> = HashMap::new();
    for a in tj
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(|i| i.as_u64()),
            a.get("content").and_then(|c| c.as_str()),
        ) else {
            return Err(terr("bad added_tokens entry".into()));
        };
        let id = id as usize;
        let special = a.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        let score = vocab.get(&id).and_then(|(_, s)| *s);
        vocab.insert(id, (content.to_string(), score));
        added.insert(id, special);
    }
    let max_id = vocab.keys().next_back().copied().unwrap_or(0);
    if max_id >= n_vocab {
        return Err(terr(format!(
            "token id {max_id} is outside the embedding's {n_vocab} rows"
        )));
    }
    let spm = byte_fallback || mtype == "Unigram";
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    let mut normal_rank = 0f32;
    for id in 0..n_vocab {
        let Some((tok, score)) = vocab.get(&id) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(5i32);
            scores.push(-1000.0f32);
            continue;
        };
        let ty = match added.get(&id) {
            Some(true) => 3,
            Some(false) => 4,
            None if spm && is_byte_token(tok) => 6,
            None if Some(id) == unk_id => 2,
            None => 1,
        };
        let sc = match (score, ty) {
            (Some(s), _) => *s,
            (None, 1) => {
                // SentencePiece BPE: higher score = earlier merge = smaller id among normal
                // pieces, so the negated rank reproduces the merge order.
                let s = -normal_rank;
                normal_rank += 1.0;
                s
            }
            (None, 6) => 0.0,
            (None, _) => -1000.0,
        };
        tokens.push(tok.clone());
        types.push(ty);
        scores.push(sc);
    }
    let lookup: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();

    if spm {
        m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        m.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens.clone())),
        ));
        m.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(Array::F32(scores)),
        ));
        m.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ));
        // SentencePiece's dummy prefix shows up as a `Prepend("▁")` normalizer (or a
        // Metaspace pre-tokenizer with prepend_scheme) in tokenizer.json.
        let text = serde_json::to_string(&tj.get("normalizer")).unwrap_or_default()
            + &serde_json::to_string(&tj.get("pre_tokenizer")).unwrap_or_default();
        let space_prefix = text.contains("\"Prepend\"")
            || (text.contains("Metaspace") && !text.contains("\"never\""));
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(space_prefix),
        ));
    } else {
        let (mut regexes, mut blr, mut bl) = (Vec::new(), false, false);
        if let Some(p) = tj.get("pre_tokenizer") {
            collect_pre(p, &mut regexes, &mut blr, &mut bl);
        }
        if !bl {
            return Err(terr(
                "BPE without byte fallback needs a ByteLevel pre-tokenizer".into(),
            ));
        }
        let pre = match regexes.as_slice() {
            [] if blr => "gpt2",
            [r] => HF_PRE
                .iter()
                .find(|(_, re)| re == r)
                .map(|(n, _)| *n)
                .ok_or_else(|| terr(format!("unknown pre-tokenizer regex {r:?}")))?,
            _ => return Err(terr(format!("unknown pre-tokenizer {regexes:?}"))),
        };
        let merges: Vec<String> = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| terr("BPE model without `merges`".into()))?
            .iter()
            .map(|e| match e {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) if p.len() == 2 => {
                    Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                }
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| terr("bad merges entry".into()))?;
        m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        m.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens.clone())),
        ));
        m.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ));
        m.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ));
    }
    // Special ids: tokenizer_config.json's token strings first, then config.json /
    // generation_config.json ids (as llama.cpp's SpecialVocab does).
    let id_of = |key: &str| -> Result<Option<u32>, HfError> {
        if let Some(c) = token_content(tc.get(key)) {
            return lookup
                .get(c.as_str())
                .map(|&i| Some(i as u32))
                .ok_or_else(|| terr(format!("{key} {c:?} is not in the vocabulary")));
        }
        let id_key = format!("{}_id", key);
        for src in [config, &gen] {
            match src.get(&id_key) {
                Some(Json::Number(n)) => return Ok(n.as_u64().map(|x| x as u32)),
                Some(Json::Array(a)) => {
                    return Ok(a.first().and_then(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        Ok(None)
    };
    for (key, gk) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = id_of(key)? {
            if id as usize >= n_vocab {
                return Err(terr(format!("{key} id {id} out of range")));
            }
            m.push((format!("tokenizer.ggml.{gk}"), Value::U32(id)));
        }
    }
    let add_bos = tc
        .get("add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(spm);
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(e) = tc.get("add_eos_token").and_then(|v| v.as_bool()) {
        m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(e)));
    }
    let template = match tc.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        _ => None,
    };
    let template = match template {
        Some(t) => Some(t),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Export
// -------------------------------------------------------------------------------------------

/// Floating-point type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

impl HfDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }
    fn st(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::BF16 => safetensors::Dtype::BF16,
        }
    }
    fn torch(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            Self::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gguf_usize(f: &modu_gguf::GgufFile, key: &str) -> Result<usize, HfError> {
    f.get_u64(key)
        .map(|v| v as usize)
        .ok_or_else(|| HfError::Config(key.into()))
}

/// Write `file` (a llama / qwen2 / gemma3 GGUF) as a Hugging Face checkpoint in `dir` (created;
/// it must not exist or be empty): `config.json`, `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json` and the weights in `dtype`, in `shards` files with an index when
/// `shards > 1`. Quantized tensors are dequantized; Llama Q/K rows and Gemma norms are turned
/// back into Hugging Face's layout. The files are written into a temporary sibling directory
/// renamed at the end.
pub fn export_hf(
    file: &modu_gguf::GgufFile,
    dir: &Path,
    dtype: HfDtype,
    shards: usize,
) -> Result<(), HfError> {
    let a = file.architecture().unwrap_or("");
    let arch = HfArch::from_gguf(a).ok_or_else(|| HfError::UnknownArch(a.into()))?;
    let key = |s: &str| format!("{a}.{s}");
    let n_embd = gguf_usize(file, &key("embedding_length"))?;
    let n_head = gguf_usize(file, &key("attention.head_count"))?;
    let emb = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| HfError::MissingTensor("token_embd.weight".into()))?;
    let d = Dims {
        n_vocab: emb.dims.get(1).copied().unwrap_or(0) as usize,
        n_embd,
        n_layer: gguf_usize(file, &key("block_count"))?,
        n_ff: gguf_usize(file, &key("feed_forward_length"))?,
        n_head,
        n_head_kv: file
            .get_u64(&key("attention.head_count_kv"))
            .map_or(n_head, |v| v as usize),
        head_dim: file
            .get_u64(&key("attention.key_length"))
            .map_or(n_embd / n_head, |v| v as usize),
    };
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(HfError::Unsupported(
            "export of rope_freqs.weight (Llama 3 RoPE scaling)".into(),
        ));
    }
    let has_output = file.tensor_info("output.weight").is_some();
    let slots = slots(arch, &d, has_output);
    for t in file.tensors() {
        if !slots.iter().any(|s| s.gguf == t.name) {
            return Err(HfError::UnknownTensor(t.name.clone(), arch.hf_name()));
        }
    }

    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .next()
            .is_some()
    {
        return Err(HfError::Unsupported(format!(
            "{} exists and is not empty",
            dir.display()
        )));
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let r = export_into(file, arch, &d, &slots, &tmp, dtype, shards.max(1));
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))
}

fn export_into(
    file: &modu_gguf::GgufFile,
    arch: HfArch,
    d: &Dims,
    slots: &[Slot],
    dir: &Path,
    dtype: HfDtype,
    shards: usize,
) -> Result<(), HfError> {
    let present: Vec<&Slot> = slots
        .iter()
        .filter(|s| file.tensor_info(&s.gguf).is_some())
        .collect();
    for s in slots {
        if s.required && file.tensor_info(&s.gguf).is_none() {
            return Err(HfError::MissingTensor(s.gguf.clone()));
        }
    }
    // Split into shards of about equal element counts, in file order.
    let total: u64 = present
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let per = total.div_ceil(shards as u64).max(1);
    let mut groups: Vec<Vec<&Slot>> = vec![Vec::new()];
    let mut acc = 0u64;
    for s in &present {
        let n = s.shape.iter().product::<usize>() as u64;
        if acc >= per && groups.len() < shards {
            groups.push(Vec::new());
            acc = 0;
        }
        groups.last_mut().unwrap_or_else(|| unreachable!()).push(s);
        acc += n;
    }
    let n_files = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (gi, group) in groups.iter().enumerate() {
        let fname = if n_files == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", gi + 1, n_files)
        };
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for s in group {
            let t = file
                .tensor_info(&s.gguf)
                .ok_or_else(|| HfError::MissingTensor(s.gguf.clone()))?;
            let got: Vec<usize> = t.dims.iter().rev().map(|&x| x as usize).collect();
            if got != s.shape {
                return Err(HfError::BadShape {
                    name: s.gguf.clone(),
                    expected: s.shape.clone(),
                    got,
                });
            }
            let ne0 = t.dims[0] as usize;
            let mut v = vec![0f32; t.n_elements() as usize];
            let rb = modu_kernels::row_bytes(t.ty, ne0).map_err(|e| HfError::Tensor {
                name: s.gguf.clone(),
                msg: e.to_string(),
            })?;
            for (row, src) in v
                .chunks_mut(ne0.max(1))
                .zip(file.tensor_data(t).chunks(rb.max(1)))
            {
                modu_kernels::dequantize_row(t.ty, src, row).map_err(|e| HfError::Tensor {
                    name: s.gguf.clone(),
                    msg: e.to_string(),
                })?;
            }
            if is_gemma_norm(arch, &s.gguf) {
                v.iter_mut().for_each(|x| *x -= 1.0);
            }
            let mut bytes = dtype.encode(&v);
            if let Some(h) = llama_perm_heads(arch, &s.gguf, d) {
                let rb = bytes.len() / s.shape[0];
                bytes = permute_rows(&bytes, rb, h, true);
            }
            total_size += bytes.len() as u64;
            weight_map.insert(s.hf.clone(), Json::String(fname.clone()));
            bufs.push((s.hf.clone(), s.shape.clone(), bytes));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, shape, b)| {
                safetensors::tensor::TensorView::new(dtype.st(), shape.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| HfError::Safetensors {
                        file: fname.clone(),
                        msg: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let meta: Option<HashMap<String, String>> =
            Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(views, &meta, &dir.join(&fname)).map_err(|e| {
            HfError::Safetensors {
                file: fname.clone(),
                msg: e.to_string(),
            }
        })?;
    }
    if n_files > 1 {
        let idx = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(dir, "model.safetensors.index.json", &idx)?;
    }
    export_config(file, arch, d, has_output(slots), dtype, dir)?;
    export_tokenizer(file, dir)
}

fn has_output(slots: &[Slot]) -> bool {
    slots.iter().any(|s| s.gguf == "output.weight")
}

fn write_json(dir: &Path, name: &str, v: &Json) -> Result<(), HfError> {
    let p = dir.join(name);
    let text = serde_json::to_string_pretty(v).map_err(|e| HfError::Json {
        file: name.into(),
        msg: e.to_string(),
    })?;
    std::fs::write(&p, text).map_err(io_err(&p))
}

/// An f32 as the shortest decimal that reads back as it (`1e-6`, not `9.99999997e-7`).
fn f32_json(x: f32) -> Json {
    x.to_string()
        .parse::<f64>()
        .map_or_else(|_| json!(x), |v| json!(v))
}

fn export_config(
    file: &modu_gguf::GgufFile,
    arch: HfArch,
    d: &Dims,
    has_output: bool,
    dtype: HfDtype,
    dir: &Path,
) -> Result<(), HfError> {
    let a = arch.gguf_name();
    let key = |s: &str| format!("{a}.{s}");
    let id = |k: &str| file.get_u64(&format!("tokenizer.ggml.{k}"));
    let mut c = json!({
        "architectures": [arch.hf_name()],
        "model_type": arch.model_type(),
        "vocab_size": d.n_vocab,
        "hidden_size": d.n_embd,
        "intermediate_size": d.n_ff,
        "num_hidden_layers": d.n_layer,
        "num_attention_heads": d.n_head,
        "num_key_value_heads": d.n_head_kv,
        "head_dim": d.head_dim,
        "max_position_embeddings": file.get_u64(&key("context_length")).unwrap_or(4096),
        "rms_norm_eps": f32_json(file.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6)),
        "rope_theta": f32_json(file.get_f32(&key("rope.freq_base")).unwrap_or(10000.0)),
        "tie_word_embeddings": !has_output,
        "torch_dtype": dtype.torch(),
        "bos_token_id": id("bos_token_id"),
        "eos_token_id": id("eos_token_id"),
        "pad_token_id": id("padding_token_id"),
    });
    let obj = c.as_object_mut().unwrap_or_else(|| unreachable!());
    if file.get_str(&key("rope.scaling.type")) == Some("linear") {
        obj.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": file.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0)}),
        );
    }
    match arch {
        HfArch::Gemma3 => {
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert(
                "sliding_window".into(),
                json!(file
                    .get_u64(&key("attention.sliding_window"))
                    .unwrap_or(512)),
            );
            obj.insert(
                "rope_local_base_freq".into(),
                json!(file.get_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0)),
            );
            obj.insert("sliding_window_pattern".into(), json!(6));
            obj.insert("query_pre_attn_scalar".into(), json!(d.head_dim));
        }
        _ => {
            obj.insert("hidden_act".into(), json!("silu"));
        }
    }
    write_json(dir, "config.json", &c)?;
    let mut g = json!({});
    for (k, gk) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ] {
        if let Some(v) = id(gk) {
            g[k] = json!(v);
        }
    }
    write_json(dir, "generation_config.json", &g)
}

fn export_tokenizer(file: &modu_gguf::GgufFile, dir: &Path) -> Result<(), HfError> {
    let terr = |s: &str| HfError::Tokenizer(s.into());
    let model = file
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| terr("no tokenizer.ggml.model"))?;
    let tokens = file
        .get_array("tokenizer.ggml.tokens")
        .and_then(|a| a.as_strings())
        .ok_or_else(|| terr("no tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = file
        .get_array("tokenizer.ggml.token_type")
        .and_then(|a| a.as_i32s())
        .map(|t| t.to_vec())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    let tj = match model {
        "gpt2" => {
            let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
            let pre = if pre == "gpt-2" { "gpt2" } else { pre };
            let re = HF_PRE
                .iter()
                .find(|(n, _)| *n == pre)
                .map(|(_, r)| *r)
                .ok_or_else(|| {
                    HfError::Tokenizer(format!("export of pre-tokenizer `{pre}` is not supported"))
                })?;
            let mut vocab = serde_json::Map::new();
            for (i, t) in tokens.iter().enumerate() {
                let ty = types.get(i).copied().unwrap_or(1);
                if ty == 1 {
                    vocab.insert(t.clone(), json!(i));
                }
            }
            let merges = file
                .get_array("tokenizer.ggml.merges")
                .and_then(|a| a.as_strings())
                .ok_or_else(|| terr("no tokenizer.ggml.merges"))?;
            let pre_tok = if pre == "gpt2" {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            } else {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
                ]})
            };
            json!({
                    "version": "1.0",
                    "truncation": null,
                    "padding": null,
                    "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": pre_tok,
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                        "vocab": vocab, "merges": merges},
            })
        }
        "llama" => {
            let scores = file
                .get_array("tokenizer.ggml.scores")
                .and_then(|a| a.as_f32s())
                .ok_or_else(|| terr("no tokenizer.ggml.scores"))?;
            let vocab: Vec<Json> = tokens
                .iter()
                .zip(scores)
                .map(|(t, s)| json!([t, s]))
                .collect();
            let unk = types.iter().position(|&t| t == 2);
            let sp = file
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let normalizer = if sp {
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
            } else {
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
            };
            json!({
                    "version": "1.0",
                    "truncation": null,
                    "padding": null,
                    "added_tokens": added,
                    "normalizer": normalizer,
                    "pre_tokenizer": null,
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"}]},
                    "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true},
            })
        }
        other => {
            return Err(HfError::Tokenizer(format!(
                "export of tokenizer model `{other}` is not supported"
            )))
        }
    };
    write_json(dir, "tokenizer.json", &tj)?;
    let tok = |k: &str| {
        file.get_u64(&format!("tokenizer.ggml.{k}"))
            .and_then(|i| tokens.get(i as usize))
            .map(|s| json!(s))
            .unwrap_or(Json::Null)
    };
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id"),
        "unk_token": tok("unknown_token_id"),
        "add_bos_token": file.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama"),
    });
    if let Some(e) = file.get_bool("tokenizer.ggml.add_eos_token") {
        tc["add_eos_token"] = json!(e);
    }
    if let Some(t) = file.get_str("tokenizer.chat_template") {
        tc["chat_template"] = json!(t);
    }
    write_json(dir, "tokenizer_config.json", &tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let rows = 2 * 8; // two heads of dim 8
        let src: Vec<u8> = (0..rows as u8).collect();
        let p = permute_rows(&src, 1, 2, false);
        // head 0: rows 0..4 are the first halves, 4..8 the second; interleaved in GGUF.
        assert_eq!(&p[..8], &[0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(permute_rows(&p, 1, 2, true), src);
    }

    #[test]
    fn byte_tokens() {
        assert!(is_byte_token("<0x0A>"));
        assert!(!is_byte_token("<0xZZ>"));
        assert!(!is_byte_token("<s>"));
    }
}
