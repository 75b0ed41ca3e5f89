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
//! * **EXAONE** — EXAONE 3.5 keeps GPT-2-style names (`transformer.h.N.attn.attention.*`,
//!   `mlp.c_fc_0/1`, `mlp.c_proj`, `ln_1/2`) and config keys (`num_layers`,
//!   `layer_norm_epsilon`); EXAONE 4.0 has no pre-norms, Q/K norms and post-norms
//!   (`post_attention_layernorm`, `post_feedforward_layernorm`), and its `sliding_window` with
//!   `layer_types` (or a `sliding_window_pattern` such as `LLLG`) becomes one bool per layer.
//!   Both use rotate-half RoPE (no permutation) and their own pre-tokenizers (`exaone`,
//!   `exaone4`), chosen by the architecture as llama.cpp's converter does by tokenizer hash.
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

mod export;
mod import;
mod tokenizer;

pub(crate) use export::write_json;
pub use export::{export_hf, HfDtype};
pub use import::HfCheckpoint;
pub(crate) use tokenizer::{export_tokenizer, tokenizer_metadata};

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

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
    #[error("unsupported architecture `{0}` (supported: Qwen2ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM, ExaoneForCausalLM, Exaone4ForCausalLM)")]
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
    /// EXAONE 3.5 (`ExaoneForCausalLM`).
    Exaone,
    /// EXAONE 4.0 (`Exaone4ForCausalLM`).
    Exaone4,
}

impl HfArch {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Gemma3ForCausalLM" => Some(Self::Gemma3),
            "ExaoneForCausalLM" => Some(Self::Exaone),
            "Exaone4ForCausalLM" => Some(Self::Exaone4),
            _ => None,
        }
    }
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            "exaone" => Some(Self::Exaone),
            "exaone4" => Some(Self::Exaone4),
            _ => None,
        }
    }
    /// `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
            Self::Exaone => "exaone",
            Self::Exaone4 => "exaone4",
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Exaone => "ExaoneForCausalLM",
            Self::Exaone4 => "Exaone4ForCausalLM",
        }
    }
    fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3_text",
            Self::Exaone => "exaone",
            Self::Exaone4 => "exaone4",
        }
    }
}

/// The shape-relevant hyper-parameters (from `config.json`, or from GGUF metadata on export).
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    n_vocab: usize,
    n_embd: usize,
    n_layer: usize,
    n_ff: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

/// One tensor of the name map: GGUF name, HF name, numpy shape, required.
pub(crate) struct Slot {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    required: bool,
}

/// Every tensor a model of `arch` may have, in GGUF file order. The Hugging Face names are
/// those of `transformers`' modelling code (EXAONE 3.5's are its own GPT-2-style ones:
/// `transformer.h.N.attn.attention.*`, `mlp.c_fc_0/1`, `mlp.c_proj`), as llama.cpp's converter
/// maps them.
pub(crate) fn slots(arch: HfArch, d: &Dims, has_output: bool) -> Vec<Slot> {
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
    let exaone = arch == HfArch::Exaone;
    let (embed, layers, norm) = if exaone {
        (
            "transformer.wte.weight",
            "transformer.h",
            "transformer.ln_f.weight",
        )
    } else {
        (
            "model.embed_tokens.weight",
            "model.layers",
            "model.norm.weight",
        )
    };
    push(
        "token_embd.weight".into(),
        embed.into(),
        vec![d.n_vocab, e],
        true,
    );
    for i in 0..d.n_layer {
        let g = |s: &str| format!("blk.{i}.{s}");
        let h = |s: &str| format!("{layers}.{i}.{s}");
        let norm = |push: &mut dyn FnMut(String, String, Vec<usize>, bool),
                    gn: &str,
                    hn: &str,
                    n: usize| { push(g(gn), h(hn), vec![n], true) };
        match arch {
            HfArch::Exaone4 => {}
            HfArch::Exaone => norm(&mut push, "attn_norm.weight", "ln_1.weight", e),
            _ => norm(&mut push, "attn_norm.weight", "input_layernorm.weight", e),
        }
        let attn = if exaone {
            "attn.attention"
        } else {
            "self_attn"
        };
        let o_proj = if exaone { "out_proj" } else { "o_proj" };
        for (gn, hn, rows, cols) in [
            ("attn_q", "q_proj", q, e),
            ("attn_k", "k_proj", kv, e),
            ("attn_v", "v_proj", kv, e),
            ("attn_output", o_proj, e, q),
        ] {
            push(
                g(&format!("{gn}.weight")),
                h(&format!("{attn}.{hn}.weight")),
                vec![rows, cols],
                true,
            );
            push(
                g(&format!("{gn}.bias")),
                h(&format!("{attn}.{hn}.bias")),
                vec![rows],
                false,
            );
        }
        match arch {
            HfArch::Gemma3 | HfArch::Exaone4 => {
                let hd = d.head_dim;
                norm(
                    &mut push,
                    "attn_q_norm.weight",
                    "self_attn.q_norm.weight",
                    hd,
                );
                norm(
                    &mut push,
                    "attn_k_norm.weight",
                    "self_attn.k_norm.weight",
                    hd,
                );
                norm(
                    &mut push,
                    "post_attention_norm.weight",
                    "post_attention_layernorm.weight",
                    e,
                );
                if arch == HfArch::Gemma3 {
                    norm(
                        &mut push,
                        "ffn_norm.weight",
                        "pre_feedforward_layernorm.weight",
                        e,
                    );
                }
            }
            HfArch::Exaone => norm(&mut push, "ffn_norm.weight", "ln_2.weight", e),
            _ => norm(
                &mut push,
                "ffn_norm.weight",
                "post_attention_layernorm.weight",
                e,
            ),
        }
        let (gate, up, down) = if exaone {
            ("mlp.c_fc_0", "mlp.c_fc_1", "mlp.c_proj")
        } else {
            ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        };
        push(
            g("ffn_gate.weight"),
            h(&format!("{gate}.weight")),
            vec![ff, e],
            true,
        );
        push(
            g("ffn_up.weight"),
            h(&format!("{up}.weight")),
            vec![ff, e],
            true,
        );
        push(
            g("ffn_down.weight"),
            h(&format!("{down}.weight")),
            vec![e, ff],
            true,
        );
        if matches!(arch, HfArch::Gemma3 | HfArch::Exaone4) {
            norm(
                &mut push,
                "post_ffw_norm.weight",
                "post_feedforward_layernorm.weight",
                e,
            );
        }
    }
    push("output_norm.weight".into(), norm.into(), vec![e], true);
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
pub(crate) fn llama_perm_heads(arch: HfArch, gguf_name: &str, d: &Dims) -> Option<usize> {
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
pub(crate) fn is_gemma_norm(arch: HfArch, gguf_name: &str) -> bool {
    arch == HfArch::Gemma3 && gguf_name.ends_with("norm.weight")
}

/// Permute whole rows (`row_bytes` each) of a Q/K weight from HF's rotate-half layout to GGUF
/// `llama`'s interleaved one (`inverse`: back). Row counts are checked by the caller.
pub(crate) fn permute_rows(src: &[u8], row_bytes: usize, n_head: usize, inverse: bool) -> Vec<u8> {
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

pub(crate) fn read_json(dir: &Path, file: &str) -> Result<Option<Json>, HfError> {
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

pub(crate) fn need_json(dir: &Path, file: &str) -> Result<Json, HfError> {
    read_json(dir, file)?.ok_or_else(|| HfError::MissingFile {
        dir: dir.to_path_buf(),
        file: file.into(),
    })
}

pub(crate) fn cfg_usize(c: &Json, key: &str) -> Result<Option<usize>, HfError> {
    match c.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&x| x > 0)
            .map(|x| Some(x as usize))
            .ok_or_else(|| HfError::Config(key.into())),
    }
}

pub(crate) fn cfg_req(c: &Json, key: &str) -> Result<usize, HfError> {
    cfg_usize(c, key)?.ok_or_else(|| HfError::Config(key.into()))
}

pub(crate) fn cfg_f64(c: &Json, key: &str) -> Result<Option<f64>, HfError> {
    match c.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| HfError::Config(key.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::tokenizer::is_byte_token;
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
