//! Model architectures, one file each. Every architecture parses its hyper-parameters once into a
//! typed config and implements [`Model`]; [`load_model`] picks one from `general.architecture`.

pub mod exaone4;
pub mod gemma3;
pub mod llama;

use std::sync::Arc;

use modu_gguf::GgufFile;

use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::layers::{Linear, Segment, Weight};
use crate::lora::{BaseShapes, ModuleRef};

/// What callers need to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub arch: String,
    pub name: Option<String>,
    pub n_vocab: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, evaluation).
    All,
}

pub trait Model: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// An empty cache sized for this model, holding at most `max_len` positions.
    fn new_cache(&self, max_len: usize) -> KvCache;

    /// The shapes of the adaptable projections (what LoRA modules are validated against).
    fn module_shapes(&self) -> &BaseShapes;

    /// The forward pass over a batch of sequences: sequence `i` runs `tokens[i]` at positions
    /// `caches[i].len()..`, appending to its own cache; every matmul runs once over all the new
    /// tokens, RoPE, cache and attention per sequence. The result holds, sequence after
    /// sequence, the logits of the last `tails[i]` tokens of each (`1 <= tails[i] <=
    /// tokens[i].len()`; one row of `n_vocab` per token): a prompt chunk wants one row, a
    /// speculative verification one per draft token plus one. Nothing is cached on an error
    /// found before the pass (empty input, full context, bad token id, a module that does not
    /// fit, a bad tail).
    ///
    /// `modules` is empty (no sequence uses a module) or holds one list per sequence: sequence
    /// `i` adds `scale·B·A·x` of each `(adapter, scale)` in `modules[i]`, in list order, to every
    /// projection the adapter targets (an empty list is the base model). Each base matmul still
    /// runs once for the whole batch; the low-rank updates run per group of rows that share a
    /// module.
    fn forward_seqs_tail(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        tails: &[usize],
        modules: &[&[ModuleRef]],
    ) -> Result<Vec<f32>, ModelError>;

    /// [`Model::forward_seqs_tail`] with the same choice for every sequence: `Last` gives one
    /// row per sequence, `All` one per token (`[rows, n_vocab]`).
    fn forward_seqs_with(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        which: Logits,
        modules: &[&[ModuleRef]],
    ) -> Result<Vec<f32>, ModelError> {
        let tails: Vec<usize> = match which {
            Logits::Last => vec![1; tokens.len()],
            Logits::All => tokens.iter().map(|t| t.len()).collect(),
        };
        self.forward_seqs_tail(tokens, caches, &tails, modules)
    }

    /// [`Model::forward_seqs_with`] without modules.
    fn forward_seqs(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_seqs_with(tokens, caches, which, &[])
    }

    /// Run `tokens` at positions `cache.len()..` (appending their keys and values) and return
    /// logits `[n, n_vocab]` for the positions `which` asks for.
    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_seqs(&[tokens], &mut [cache], which)
    }

    /// One step for several independent sequences (continuous batching): sequence `i` appends
    /// `seqs[i].tokens` to its own cache; the result holds, per sequence, the logits of its last
    /// token (`n_vocab` floats). One weight pass serves the whole batch, and the results equal
    /// running each sequence alone.
    fn forward_batch(&self, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_batch_with(seqs, &[])
    }

    /// [`Model::forward_batch`] with per-sequence modules (`modules` empty, or one list per
    /// sequence, as in [`Model::forward_seqs_with`]).
    fn forward_batch_with(
        &self,
        seqs: &mut [BatchSeq<'_>],
        modules: &[&[ModuleRef]],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let tokens: Vec<&[u32]> = seqs.iter().map(|s| s.tokens).collect();
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let logits = self.forward_seqs_with(&tokens, &mut caches, Logits::Last, modules)?;
        Ok(logits
            .chunks_exact(self.info().n_vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// One sequence's part of a batched step.
pub struct BatchSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Load the architecture named in the file's metadata.
pub fn load_model(file: Arc<GgufFile>) -> Result<Box<dyn Model>, ModelError> {
    let arch = file.architecture().ok_or(ModelError::NoArch)?.to_string();
    match arch.as_str() {
        "llama" | "qwen2" | "exaone" => Ok(Box::new(llama::Llama::load(file)?)),
        "exaone4" => Ok(Box::new(exaone4::Exaone4::load(file)?)),
        "gemma3" => Ok(Box::new(gemma3::Gemma3::load(file)?)),
        other => Err(ModelError::UnsupportedArch(other.to_string())),
    }
}

/// Typed access to `{arch}.*` hyper-parameters.
pub(crate) struct Hparams<'a> {
    pub file: &'a GgufFile,
    pub arch: &'a str,
}

impl Hparams<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{}", self.arch, k)
    }

    pub fn usize(&self, k: &str) -> Result<usize, ModelError> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Err(ModelError::MissingKey(key)),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n < (1 << 32))
                .map(|n| n as usize)
                .ok_or(ModelError::BadKey {
                    key,
                    reason: "expected a positive integer".into(),
                }),
        }
    }

    pub fn usize_or(&self, k: &str, default: usize) -> Result<usize, ModelError> {
        if self.file.get(&self.key(k)).is_none() {
            Ok(default)
        } else {
            self.usize(k)
        }
    }

    /// A required finite number.
    pub fn f32(&self, k: &str) -> Result<f32, ModelError> {
        if self.file.get(&self.key(k)).is_none() {
            return Err(ModelError::MissingKey(self.key(k)));
        }
        self.f32_or(k, 0.0)
    }

    /// The raw value of `{arch}.k`.
    pub fn value(&self, k: &str) -> Option<&modu_gguf::Value> {
        self.file.get(&self.key(k))
    }

    pub fn f32_or(&self, k: &str, default: f32) -> Result<f32, ModelError> {
        let key = self.key(k);
        match self.file.get(&key) {
            None => Ok(default),
            Some(v) => v
                .as_f32()
                .filter(|x| x.is_finite())
                .ok_or(ModelError::BadKey {
                    key,
                    reason: "expected a finite number".into(),
                }),
        }
    }

    /// `attention.sliding_window_pattern`, as llama.cpp reads it: one bool per layer (true =
    /// sliding window), or a period `p` (the last layer of every `p` is global); `None` when
    /// the key is absent.
    pub fn sliding_pattern(&self, n_layer: usize) -> Result<Option<Vec<bool>>, ModelError> {
        use modu_gguf::{Array, Value};
        let k = "attention.sliding_window_pattern";
        match self.value(k) {
            None => Ok(None),
            Some(Value::Array(Array::Bool(v))) if v.len() == n_layer => Ok(Some(v.clone())),
            Some(Value::Array(a)) => Err(ModelError::BadKey {
                key: self.key(k),
                reason: format!("expected {n_layer} booleans, found an array of {}", a.len()),
            }),
            Some(_) => {
                let p = self.usize(k)?;
                Ok(Some((0..n_layer).map(|i| i % p < p - 1).collect()))
            }
        }
    }

    pub fn str_opt(&self, k: &str) -> Option<&str> {
        self.file.get_str(&self.key(k))
    }
}

/// The shapes LoRA modules are checked against: per layer, the seven adaptable projections in
/// [`crate::lora::Proj`] order (q, k, v, o, gate, up, down) as `(n_in, n_out)`.
pub(crate) fn projection_shapes<'a>(
    arch: String,
    n_head: usize,
    n_head_kv: usize,
    layers: impl Iterator<Item = [&'a Linear; 7]>,
) -> BaseShapes {
    BaseShapes {
        arch,
        n_head,
        n_head_kv,
        layers: layers
            .map(|l| l.map(|l| Some((l.weight.cols, l.weight.rows))))
            .collect(),
    }
}

/// Dequantize embedding rows for `tokens` into `out` (`[n, n_embd]`).
pub(crate) fn embed_tokens(
    file: &GgufFile,
    emb: &Weight,
    tokens: &[u32],
    out: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let d = emb.cols;
    let mat = emb.mat(file);
    out.resize(tokens.len() * d, 0.0);
    for (i, &t) in tokens.iter().enumerate() {
        if t as usize >= emb.rows {
            return Err(ModelError::BadToken {
                id: t,
                vocab: emb.rows,
            });
        }
        // Layout-aware: the embedding may be stored interleaved for the output matmul.
        mat.dequantize_row(t as usize, &mut out[i * d..(i + 1) * d])
            .map_err(|e| ModelError::Kernel(e.to_string()))?;
    }
    Ok(())
}

/// Rows of `x` (`[n, dim]`) whose logits are wanted: the last `tails[i]` rows of each sequence
/// of the batch. Checked before the pass (see [`check_tails`]).
pub(crate) fn select_rows(x: &[f32], dim: usize, segs: &[Segment], tails: &[usize]) -> Vec<f32> {
    segs.iter()
        .zip(tails)
        .flat_map(|(s, &t)| {
            let end = s.start + s.len;
            x[(end - t) * dim..end * dim].iter().copied()
        })
        .collect()
}

/// Each sequence asks for between one row and as many rows as it has tokens.
pub(crate) fn check_tails(tokens: &[&[u32]], tails: &[usize]) -> Result<(), ModelError> {
    if tails.len() != tokens.len() {
        return Err(ModelError::BadTail(format!(
            "{} tails for {} sequences",
            tails.len(),
            tokens.len()
        )));
    }
    for (i, (t, &n)) in tokens.iter().zip(tails).enumerate() {
        // An empty sequence is `plan_batch`'s error (empty input).
        if !t.is_empty() && (n == 0 || n > t.len()) {
            return Err(ModelError::BadTail(format!(
                "sequence {i} asks for {n} rows of logits but has {} tokens",
                t.len()
            )));
        }
    }
    Ok(())
}
