//! Gemma 3 decoder.
//!
//! Differences from Llama: the token embedding is scaled by `sqrt(n_embd)`; Q and K are
//! RMS-normalised per head before RoPE; attention and feed-forward outputs are RMS-normalised
//! again before the residual add ("sandwich" norms); the feed-forward uses GELU (tanh); five of
//! every six layers attend over a sliding window with their own RoPE base (10 000), while every
//! sixth layer is global and uses `rope.freq_base` (and any linear RoPE scaling). The GGUF
//! conversion already folds Gemma's `1 + w` norm weights into `w`, so norms here are plain RMS
//! norms. The output projection is tied to the token embedding unless `output.weight` exists.

use std::sync::Arc;

use modu_gguf::GgufFile;

use super::{check_tails, embed_tokens, projection_shapes, select_rows, Hparams, Model, ModelInfo};
use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::layers::{
    add_inplace, attend_batch, forward_many_lora, gated_inplace, gelu_ggml, plan_batch, rms_norm,
    rms_norm_inplace, AttnShape, Linear, Rope, RopeStyle, TensorLoader, Weight,
};
use crate::lora::{BaseShapes, BatchLora, ModuleRef, Proj};

/// Hyper-parameters, parsed once from `gemma3.*` metadata.
#[derive(Debug, Clone)]
pub struct Gemma3Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_base_global: f32,
    pub rope_base_local: f32,
    /// Linear RoPE scaling of the global layers (1 when absent).
    pub rope_scale_global: f32,
    pub sliding_window: usize,
    /// Per layer: whether it attends over the sliding window (without an
    /// `attention.sliding_window_pattern`, the last of every six layers is global). A file
    /// without `attention.sliding_window` (or with 0) has no sliding layers, as in llama.cpp.
    pub sliding: Vec<bool>,
    pub n_ctx_train: usize,
}

impl Gemma3Config {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let hp = Hparams {
            file,
            arch: "gemma3",
        };
        let n_embd = hp.usize("embedding_length")?;
        let n_head = hp.usize("attention.head_count")?;
        let n_head_kv = hp.usize_or("attention.head_count_kv", n_head)?;
        let head_dim = hp.usize_or("attention.key_length", 256)?;
        let v_dim = hp.usize_or("attention.value_length", head_dim)?;
        if v_dim != head_dim
            || n_head % n_head_kv != 0
            || head_dim % 2 != 0
            || head_dim > crate::layers::MAX_HEAD_DIM
        {
            return Err(ModelError::BadKey {
                key: "gemma3.attention".into(),
                reason: format!("unsupported head layout: {n_head} heads, {n_head_kv} KV heads, K dim {head_dim}, V dim {v_dim}"),
            });
        }
        let n_layer = hp.usize("block_count")?;
        let sliding_window = match hp.value("attention.sliding_window") {
            None => 0,
            Some(v) if v.as_u64() == Some(0) => 0,
            Some(_) => hp.usize("attention.sliding_window")?,
        };
        let sliding = if sliding_window == 0 {
            vec![false; n_layer]
        } else {
            hp.sliding_pattern(n_layer)?
                .unwrap_or_else(|| (0..n_layer).map(|i| i % 6 < 5).collect())
        };
        let rope_scale_global = match hp.str_opt("rope.scaling.type") {
            Some("linear") => hp.f32_or("rope.scaling.factor", 1.0)?,
            _ => 1.0,
        };
        Ok(Self {
            n_layer,
            n_embd,
            n_ff: hp.usize("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            rms_eps: hp.f32_or("attention.layer_norm_rms_epsilon", 1e-6)?,
            rope_base_global: hp.f32_or("rope.freq_base", 1_000_000.0)?,
            rope_base_local: hp.f32_or("rope.freq_base_swa", 10_000.0)?,
            rope_scale_global,
            sliding_window,
            sliding,
            n_ctx_train: hp.usize_or("context_length", 32768)?,
        })
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding[layer]
    }
}

struct Block {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: Linear,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    post_ffn_norm: Vec<f32>,
    sliding: bool,
}

pub struct Gemma3 {
    file: Arc<GgufFile>,
    cfg: Gemma3Config,
    info: ModelInfo,
    tok_embd: Weight,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    output: Linear,
    rope_local: Rope,
    rope_global: Rope,
    shapes: BaseShapes,
}

impl Gemma3 {
    pub fn load(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let cfg = Gemma3Config::from_gguf(&file)?;
        let l = TensorLoader::new(file.clone());
        let d = cfg.n_embd;
        let hd = cfg.head_dim;
        let (tok_embd, n_vocab) = l.token_embedding(d)?;
        let q_dim = cfg.n_head * hd;
        let kv_dim = cfg.n_head_kv * hd;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            blocks.push(Block {
                attn_norm: l.vector(&p("attn_norm.weight"), d)?,
                wq: Linear::load(&l, &p("attn_q"), d, q_dim)?,
                wk: Linear::load(&l, &p("attn_k"), d, kv_dim)?,
                wv: Linear::load(&l, &p("attn_v"), d, kv_dim)?,
                q_norm: l.vector(&p("attn_q_norm.weight"), hd)?,
                k_norm: l.vector(&p("attn_k_norm.weight"), hd)?,
                wo: Linear::load(&l, &p("attn_output"), q_dim, d)?,
                post_attn_norm: l.vector(&p("post_attention_norm.weight"), d)?,
                ffn_norm: l.vector(&p("ffn_norm.weight"), d)?,
                w_gate: Linear::load(&l, &p("ffn_gate"), d, cfg.n_ff)?,
                w_up: Linear::load(&l, &p("ffn_up"), d, cfg.n_ff)?,
                w_down: Linear::load(&l, &p("ffn_down"), cfg.n_ff, d)?,
                post_ffn_norm: l.vector(&p("post_ffw_norm.weight"), d)?,
                sliding: cfg.is_sliding(i),
            });
        }
        let output_norm = l.vector("output_norm.weight", d)?;
        let output = l
            .opt_matrix("output.weight", d, n_vocab)?
            .unwrap_or_else(|| tok_embd.clone());
        let rope_local = Rope::new(RopeStyle::Neox, hd, cfg.rope_base_local, None, 1.0);
        let rope_global = Rope::new(
            RopeStyle::Neox,
            hd,
            cfg.rope_base_global,
            None,
            1.0 / cfg.rope_scale_global,
        );
        let info = ModelInfo {
            arch: "gemma3".into(),
            name: file.get_str("general.name").map(str::to_string),
            n_vocab,
            n_layer: cfg.n_layer,
            n_embd: d,
            n_ctx_train: cfg.n_ctx_train,
        };
        let shapes = projection_shapes(
            "gemma3".to_string(),
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
            output: Linear {
                weight: output,
                bias: None,
            },
            rope_local,
            rope_global,
            shapes,
        })
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }
}

impl Model for Gemma3 {
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
        let hd = c.head_dim;

        let mut x = Vec::new();
        embed_tokens(f, &self.tok_embd, &all, &mut x)?;
        let emb_scale = (c.n_embd as f32).sqrt();
        x.iter_mut().for_each(|v| *v *= emb_scale);

        let (mut h, mut q, mut k, mut v, mut att, mut o) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut gate, mut up) = (vec![], vec![]);
        for (il, b) in self.blocks.iter().enumerate() {
            let (rope, window) = if b.sliding {
                (&self.rope_local, Some(c.sliding_window))
            } else {
                (&self.rope_global, None)
            };
            let shape = AttnShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
            };

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
            rms_norm_inplace(&mut q, &b.q_norm, c.rms_eps);
            rms_norm_inplace(&mut k, &b.k_norm, c.rms_eps);
            attend_batch(
                &mut q,
                &mut k,
                &v,
                &segs,
                il,
                caches,
                Some(rope),
                shape,
                &mut att,
            );
            b.wo.forward_lora(f, &att, n, &mut o, lora.as_mut().map(|l| (l, il, Proj::O)))?;
            rms_norm(&o, &b.post_attn_norm, c.rms_eps, &mut h);
            add_inplace(&mut x, &h);

            rms_norm(&x, &b.ffn_norm, c.rms_eps, &mut h);
            forward_many_lora(
                f,
                &[&b.w_gate, &b.w_up],
                &h,
                n,
                &mut [&mut gate, &mut up],
                lora.as_mut().map(|l| (l, il, &[Proj::Gate, Proj::Up][..])),
            )?;
            gated_inplace(&mut gate, &up, gelu_ggml);
            b.w_down.forward_lora(
                f,
                &gate,
                n,
                &mut o,
                lora.as_mut().map(|l| (l, il, Proj::Down)),
            )?;
            rms_norm(&o, &b.post_ffn_norm, c.rms_eps, &mut h);
            add_inplace(&mut x, &h);
        }

        let rows = select_rows(&x, c.n_embd, &segs, tails);
        rms_norm(&rows, &self.output_norm, c.rms_eps, &mut h);
        let mut logits = Vec::new();
        self.output
            .forward(f, &h, rows.len() / c.n_embd, &mut logits)?;
        Ok(logits)
    }
}
