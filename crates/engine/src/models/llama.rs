//! Llama-family decoder: Llama 2/3, the Llama-architecture Korean models (HyperCLOVA X SEED,
//! Kanana), Qwen2/Qwen2.5, which is the same network with biases on the Q/K/V projections
//! and NeoX-style rotary pairs, and EXAONE 3.5 (`exaone`: the Llama network with NeoX pairs).
//!
//! Per layer: `x += Wo·attn(rope(Wq·n), rope(Wk·n), Wv·n)` with `n = rmsnorm(x)`, then
//! `x += Wdown·(silu(Wgate·n) ⊙ Wup·n)` with `n = rmsnorm(x)`. Grouped-query attention shares
//! each K/V head between `n_head / n_head_kv` query heads.

use std::sync::Arc;

use modu_gguf::GgufFile;

use super::{check_tails, embed_tokens, projection_shapes, select_rows, Hparams, Model, ModelInfo};
use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::layers::{
    add_inplace, attend_batch, forward_many_lora, plan_batch, rms_norm, swiglu_inplace, AttnShape,
    Linear, Rope, RopeStyle, TensorLoader, Weight,
};
use crate::lora::{BaseShapes, BatchLora, ModuleRef, Proj};

/// Hyper-parameters, parsed once from `{arch}.*` metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    /// Linear RoPE scaling factor (1 when absent).
    pub rope_scale: f32,
    pub rms_eps: f32,
    pub n_ctx_train: usize,
}

impl LlamaConfig {
    pub fn from_gguf(file: &GgufFile, arch: &str) -> Result<Self, ModelError> {
        let hp = Hparams { file, arch };
        let n_embd = hp.usize("embedding_length")?;
        let n_head = hp.usize("attention.head_count")?;
        let n_head_kv = hp.usize_or("attention.head_count_kv", n_head)?;
        let head_dim = hp.usize_or("attention.key_length", n_embd / n_head)?;
        if n_head % n_head_kv != 0 || head_dim % 2 != 0 || head_dim > crate::layers::MAX_HEAD_DIM {
            return Err(ModelError::BadKey {
                key: format!("{arch}.attention.head_count_kv"),
                reason: format!(
                    "{n_head} heads cannot be grouped over {n_head_kv} KV heads of dim {head_dim}"
                ),
            });
        }
        // llama.cpp rotates whole heads only (EXAONE's converter writes the count explicitly).
        let n_rot = hp.usize_or("rope.dimension_count", head_dim)?;
        if n_rot != head_dim {
            return Err(ModelError::BadKey {
                key: format!("{arch}.rope.dimension_count"),
                reason: format!(
                    "partial rotary embedding ({n_rot} of {head_dim} dims) is not supported"
                ),
            });
        }
        let rope_scale = match hp.str_opt("rope.scaling.type") {
            Some("linear") => hp.f32_or("rope.scaling.factor", 1.0)?,
            _ => 1.0,
        };
        Ok(Self {
            n_layer: hp.usize("block_count")?,
            n_embd,
            n_ff: hp.usize("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            rope_base: hp.f32_or("rope.freq_base", 10_000.0)?,
            rope_style: if arch == "llama" {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Neox
            },
            rope_scale,
            rms_eps: hp.f32_or("attention.layer_norm_rms_epsilon", 1e-5)?,
            n_ctx_train: hp.usize_or("context_length", 4096)?,
        })
    }
}

struct Block {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

pub struct Llama {
    file: Arc<GgufFile>,
    cfg: LlamaConfig,
    info: ModelInfo,
    tok_embd: Weight,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `output.weight`, or the token embedding when the two are tied.
    output: Linear,
    rope: Rope,
    shapes: BaseShapes,
}

impl Llama {
    pub fn load(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let arch = file.architecture().ok_or(ModelError::NoArch)?.to_string();
        let cfg = LlamaConfig::from_gguf(&file, &arch)?;
        let l = TensorLoader::new(file.clone());
        let d = cfg.n_embd;
        let (tok_embd, n_vocab) = l.token_embedding(d)?;
        let q_dim = cfg.n_head * cfg.head_dim;
        let kv_dim = cfg.n_head_kv * cfg.head_dim;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            blocks.push(Block {
                attn_norm: l.vector(&p("attn_norm.weight"), d)?,
                wq: Linear::load(&l, &p("attn_q"), d, q_dim)?,
                wk: Linear::load(&l, &p("attn_k"), d, kv_dim)?,
                wv: Linear::load(&l, &p("attn_v"), d, kv_dim)?,
                wo: Linear::load(&l, &p("attn_output"), q_dim, d)?,
                ffn_norm: l.vector(&p("ffn_norm.weight"), d)?,
                w_gate: Linear::load(&l, &p("ffn_gate"), d, cfg.n_ff)?,
                w_up: Linear::load(&l, &p("ffn_up"), d, cfg.n_ff)?,
                w_down: Linear::load(&l, &p("ffn_down"), cfg.n_ff, d)?,
            });
        }
        let output_norm = l.vector("output_norm.weight", d)?;
        let output = l
            .opt_matrix("output.weight", d, n_vocab)?
            .unwrap_or_else(|| tok_embd.clone());
        let output = Linear {
            weight: output,
            bias: None,
        };
        // Llama 3 ships per-dimension RoPE frequency divisors as a tensor.
        let freq_factors = l.opt_vector("rope_freqs.weight", cfg.head_dim / 2)?;
        let rope = Rope::new(
            cfg.rope_style,
            cfg.head_dim,
            cfg.rope_base,
            freq_factors.as_deref(),
            1.0 / cfg.rope_scale,
        );
        let info = ModelInfo {
            arch: arch.clone(),
            name: file.get_str("general.name").map(str::to_string),
            n_vocab,
            n_layer: cfg.n_layer,
            n_embd: d,
            n_ctx_train: cfg.n_ctx_train,
        };
        let shapes = projection_shapes(
            arch.clone(),
            cfg.n_head,
            cfg.n_head_kv,
            blocks
                .iter()
                .map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]),
        );
        Ok(Self {
            file,
            cfg,
            info,
            tok_embd,
            blocks,
            output_norm,
            output,
            rope,
            shapes,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
}

impl Model for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(
            &vec![(self.cfg.n_head_kv, self.cfg.head_dim); self.cfg.n_layer],
            max_len,
        )
    }

    fn module_shapes(&self) -> &BaseShapes {
        &self.shapes
    }

    fn forward_seqs_tail(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        tails: &[usize],
        modules: &[&[ModuleRef]],
    ) -> Result<Vec<f32>, ModelError> {
        check_tails(tokens, tails)?;
        let segs = plan_batch(tokens, caches)?;
        let mut lora = BatchLora::plan(modules, &segs, &self.shapes)?;
        let f = &*self.file;
        let c = &self.cfg;
        let all: Vec<u32> = tokens.concat();
        let n = all.len();
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };

        let mut x = Vec::new();
        embed_tokens(f, &self.tok_embd, &all, &mut x)?;
        let (mut h, mut q, mut k, mut v, mut att, mut o) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut gate, mut up) = (vec![], vec![]);
        for (il, b) in self.blocks.iter().enumerate() {
            // Attention.
            rms_norm(&x, &b.attn_norm, c.rms_eps, &mut h);
            forward_many_lora(
                f,
                &[&b.wq, &b.wk, &b.wv],
                &h,
                n,
                &mut [&mut q, &mut k, &mut v],
                lora.as_mut()
                    .map(|l| (l, il, &[Proj::Q, Proj::K, Proj::V][..])),
            )?;
            attend_batch(
                &mut q,
                &mut k,
                &v,
                &segs,
                il,
                caches,
                Some(&self.rope),
                shape,
                &mut att,
            );
            b.wo.forward_lora(f, &att, n, &mut o, lora.as_mut().map(|l| (l, il, Proj::O)))?;
            add_inplace(&mut x, &o);

            // Feed-forward (SwiGLU).
            rms_norm(&x, &b.ffn_norm, c.rms_eps, &mut h);
            forward_many_lora(
                f,
                &[&b.w_gate, &b.w_up],
                &h,
                n,
                &mut [&mut gate, &mut up],
                lora.as_mut().map(|l| (l, il, &[Proj::Gate, Proj::Up][..])),
            )?;
            swiglu_inplace(&mut gate, &up);
            b.w_down.forward_lora(
                f,
                &gate,
                n,
                &mut o,
                lora.as_mut().map(|l| (l, il, Proj::Down)),
            )?;
            add_inplace(&mut x, &o);
        }

        let rows = select_rows(&x, c.n_embd, &segs, tails);
        rms_norm(&rows, &self.output_norm, c.rms_eps, &mut h);
        let n_out = rows.len() / c.n_embd;
        let mut logits = Vec::new();
        self.output.forward(f, &h, n_out, &mut logits)?;
        Ok(logits)
    }
}
