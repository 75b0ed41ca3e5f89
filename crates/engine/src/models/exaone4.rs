//! EXAONE 4.0 decoder (LG AI Research; `exaone4`).
//!
//! Differences from Llama: no norm before attention or the feed-forward; instead their outputs
//! are RMS-normalised before the residual add (`post_attention_norm`, `post_ffw_norm`), and Q and
//! K are RMS-normalised per head before RoPE. The 32B model mixes sliding-window layers with
//! global ones (three local, one global: `LLLG`); in such a hybrid model only the local layers
//! rotate, the global layers attend without positions. A model without sliding layers (the 1.2B)
//! rotates in every layer. Llama-3-style `rope_freqs` divisors apply wherever RoPE does; all
//! layers use `rope.freq_base` (llama.cpp runs EXAONE 4.0's local layers at the global base too).
//!
//! Which layers slide: `exaone4.attention.sliding_window_pattern` (one bool per layer, or a
//! period `p` meaning "the last of every `p` layers is global"); without it, a 64-layer file is
//! the 32B model's `LLLG` (as llama.cpp assumes for files converted without the key), any other
//! has no sliding layers. The window is `attention.sliding_window` (4096 when a 64-layer file
//! lacks it). llama.cpp only looks at the pattern for 64-layer files; published files agree either
//! way (the 1.2B has no sliding layers).

use std::sync::Arc;

use modu_gguf::GgufFile;

use super::{check_tails, embed_tokens, projection_shapes, select_rows, Hparams, Model, ModelInfo};
use crate::error::ModelError;
use crate::kv_cache::KvCache;
use crate::layers::{
    add_inplace, attend_batch, forward_many_lora, plan_batch, rms_norm, rms_norm_inplace,
    swiglu_inplace, AttnShape, Linear, Rope, RopeStyle, TensorLoader, Weight,
};
use crate::lora::{BaseShapes, BatchLora, ModuleRef, Proj};

/// Hyper-parameters, parsed once from `exaone4.*` metadata.
#[derive(Debug, Clone)]
pub struct Exaone4Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Linear RoPE scaling factor (1 when absent).
    pub rope_scale: f32,
    /// Per layer: `Some(window)` for a sliding-window layer.
    pub windows: Vec<Option<usize>>,
    pub n_ctx_train: usize,
}

const ARCH: &str = "exaone4";

impl Exaone4Config {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let hp = Hparams { file, arch: ARCH };
        let n_layer = hp.usize("block_count")?;
        let n_embd = hp.usize("embedding_length")?;
        let n_head = hp.usize("attention.head_count")?;
        let n_head_kv = hp.usize_or("attention.head_count_kv", n_head)?;
        let head_dim = hp.usize_or("attention.key_length", n_embd / n_head)?;
        let v_dim = hp.usize_or("attention.value_length", head_dim)?;
        let n_rot = hp.usize_or("rope.dimension_count", head_dim)?;
        if v_dim != head_dim
            || n_rot != head_dim
            || n_head % n_head_kv != 0
            || head_dim % 2 != 0
            || head_dim > crate::layers::MAX_HEAD_DIM
            || n_head * head_dim != n_embd
        {
            return Err(ModelError::BadKey {
                key: format!("{ARCH}.attention"),
                reason: format!(
                    "unsupported head layout: {n_head} heads, {n_head_kv} KV heads, K dim \
                     {head_dim}, V dim {v_dim}, {n_rot} rotary dims, embedding {n_embd}"
                ),
            });
        }
        let sliding = match hp.sliding_pattern(n_layer)? {
            Some(p) => p,
            None if n_layer == 64 => (0..n_layer).map(|i| i % 4 < 3).collect(),
            None => vec![false; n_layer],
        };
        let window = if sliding.iter().any(|&s| s) {
            let default = if n_layer == 64 { Some(4096) } else { None };
            match (hp.value("attention.sliding_window"), default) {
                (None, Some(w)) => w,
                (None, None) => {
                    return Err(ModelError::MissingKey(format!(
                        "{ARCH}.attention.sliding_window"
                    )))
                }
                (Some(_), _) => hp.usize("attention.sliding_window")?,
            }
        } else {
            0
        };
        let rope_scale = match hp.str_opt("rope.scaling.type") {
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
            rms_eps: hp.f32("attention.layer_norm_rms_epsilon")?,
            rope_base: hp.f32_or("rope.freq_base", 10_000.0)?,
            rope_scale,
            windows: sliding.iter().map(|&s| s.then_some(window)).collect(),
            n_ctx_train: hp.usize_or("context_length", 32768)?,
        })
    }

    /// A hybrid model (some sliding layers): its global layers attend without RoPE.
    pub fn is_hybrid(&self) -> bool {
        self.windows.iter().any(Option::is_some)
    }
}

struct Block {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: Linear,
    post_attn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    post_ffn_norm: Vec<f32>,
}

pub struct Exaone4 {
    file: Arc<GgufFile>,
    cfg: Exaone4Config,
    info: ModelInfo,
    tok_embd: Weight,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    output: Linear,
    rope: Rope,
    shapes: BaseShapes,
}

impl Exaone4 {
    pub fn load(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let cfg = Exaone4Config::from_gguf(&file)?;
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
                wq: Linear::load(&l, &p("attn_q"), d, q_dim)?,
                wk: Linear::load(&l, &p("attn_k"), d, kv_dim)?,
                wv: Linear::load(&l, &p("attn_v"), d, kv_dim)?,
                q_norm: l.vector(&p("attn_q_norm.weight"), hd)?,
                k_norm: l.vector(&p("attn_k_norm.weight"), hd)?,
                wo: Linear::load(&l, &p("attn_output"), q_dim, d)?,
                post_attn_norm: l.vector(&p("post_attention_norm.weight"), d)?,
                w_gate: Linear::load(&l, &p("ffn_gate"), d, cfg.n_ff)?,
                w_up: Linear::load(&l, &p("ffn_up"), d, cfg.n_ff)?,
                w_down: Linear::load(&l, &p("ffn_down"), cfg.n_ff, d)?,
                post_ffn_norm: l.vector(&p("post_ffw_norm.weight"), d)?,
            });
        }
        let output_norm = l.vector("output_norm.weight", d)?;
        let output = l
            .opt_matrix("output.weight", d, n_vocab)?
            .unwrap_or_else(|| tok_embd.clone());
        let freq_factors = l.opt_vector("rope_freqs.weight", hd / 2)?;
        let rope = Rope::new(
            RopeStyle::Neox,
            hd,
            cfg.rope_base,
            freq_factors.as_deref(),
            1.0 / cfg.rope_scale,
        );
        let info = ModelInfo {
            arch: ARCH.into(),
            name: file.get_str("general.name").map(str::to_string),
            n_vocab,
            n_layer: cfg.n_layer,
            n_embd: d,
            n_ctx_train: cfg.n_ctx_train,
        };
        let shapes = projection_shapes(
            ARCH.to_string(),
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
            rope,
            shapes,
        })
    }

    pub fn config(&self) -> &Exaone4Config {
        &self.cfg
    }
}

impl Model for Exaone4 {
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
        let hybrid = c.is_hybrid();

        let mut x = Vec::new();
        embed_tokens(f, &self.tok_embd, &all, &mut x)?;
        let (mut h, mut q, mut k, mut v, mut att, mut o) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut gate, mut up) = (vec![], vec![]);
        for (il, b) in self.blocks.iter().enumerate() {
            let window = c.windows[il];
            let rope = (window.is_some() || !hybrid).then_some(&self.rope);
            let shape = AttnShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                window,
            };

            // Attention straight from the residual stream; its output normalised.
            forward_many_lora(
                f,
                &[&b.wq, &b.wk, &b.wv],
                &x,
                n,
                &mut [&mut q, &mut k, &mut v],
                lora.as_mut()
                    .map(|l| (l, il, &[Proj::Q, Proj::K, Proj::V][..])),
            )?;
            rms_norm_inplace(&mut q, &b.q_norm, c.rms_eps);
            rms_norm_inplace(&mut k, &b.k_norm, c.rms_eps);
            attend_batch(&mut q, &mut k, &v, &segs, il, caches, rope, shape, &mut att);
            b.wo.forward_lora(f, &att, n, &mut o, lora.as_mut().map(|l| (l, il, Proj::O)))?;
            rms_norm(&o, &b.post_attn_norm, c.rms_eps, &mut h);
            add_inplace(&mut x, &h);

            // Feed-forward (SwiGLU) the same way.
            forward_many_lora(
                f,
                &[&b.w_gate, &b.w_up],
                &x,
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
