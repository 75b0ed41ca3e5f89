//! Tiny random-weight models of every supported architecture, for checking an architecture
//! against llama.cpp when its real weights cannot be had (`modu synth`, the synthetic goldens in
//! `tests/golden/synthetic/`).
//!
//! A synthetic model carries a real model's tokenizer metadata (every `tokenizer.*` key, so
//! prompts tokenize as they would for that family; the pre-tokenizer may be overridden to the
//! architecture's own) and random weights in the tensor types real files use: F16 Q/K
//! projections, Q5_0 V/output projections, Q8_0 gate/up, Q4_K down (so `n_ff` = 256), an F16
//! token embedding and, where the output is untied, a Q8_0 output matrix (the 64-layer EXAONE
//! 4.0 layout keeps its layers in F32, see [`synthesize`]). Norm weights are near 1,
//! matrices keep activations at unit scale (uniform, variance 1/n_in) and the output scale makes
//! logits spread by ~5, so greedy paths are mostly decided by clear margins.
//!
//! Everything is a pure function of the architecture, the vocabulary file and the seed: values
//! come from SplitMix64 streams keyed by tensor name and are uniform (no transcendental
//! functions, so no libm differences between machines), and the file is written in a fixed
//! order. The goldens record the sha256 of the file llama.cpp ran, and the tests regenerate and
//! compare it.

use half::f16;
use modu_gguf::{Array, GgmlType, GgufFile, GgufWriter, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SynthError {
    #[error("unknown synthetic architecture `{0}` (known: {known})", known = SynthArch::NAMES.join(", "))]
    UnknownArch(String),
    #[error("the vocabulary model has no `{0}` (a real model's tokenizer is needed)")]
    NoTokenizer(&'static str),
    #[error("{0}")]
    Write(String),
}

/// The synthetic models there are goldens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthArch {
    /// Llama 3 layout: interleaved RoPE pairs, `rope_freqs` divisors, `llama-bpe` pre-tokenizer.
    Llama,
    /// Qwen 2: Q/K/V biases, NeoX pairs.
    Qwen2,
    /// Gemma 3: six layers (five sliding-window, one global with linear RoPE scaling), tied output.
    Gemma3,
    /// EXAONE 3.5: the Llama network with NeoX pairs and the `exaone` pre-tokenizer.
    Exaone,
    /// EXAONE 4.0 as the 1.2B model: no pre-norms, Q/K norms, post-attention and post-FFN norms,
    /// RoPE with `rope_freqs` on every layer, tied output, `exaone4` pre-tokenizer.
    Exaone4,
    /// EXAONE 4.0 as the 32B model (64 layers, which is what makes llama.cpp use its
    /// sliding-window pattern): three sliding-window layers with RoPE, then one global layer
    /// without, repeated.
    Exaone4Swa,
}

impl SynthArch {
    pub const ALL: [SynthArch; 6] = [
        SynthArch::Llama,
        SynthArch::Qwen2,
        SynthArch::Gemma3,
        SynthArch::Exaone,
        SynthArch::Exaone4,
        SynthArch::Exaone4Swa,
    ];
    pub const NAMES: [&'static str; 6] = [
        "llama",
        "qwen2",
        "gemma3",
        "exaone",
        "exaone4",
        "exaone4-swa",
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|&a| a == self).unwrap()]
    }

    pub fn parse(s: &str) -> Result<Self, SynthError> {
        Self::NAMES
            .iter()
            .position(|&n| n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| SynthError::UnknownArch(s.to_string()))
    }

    /// `general.architecture` of the file.
    pub fn gguf_arch(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::Gemma3 => "gemma3",
            SynthArch::Exaone => "exaone",
            SynthArch::Exaone4 | SynthArch::Exaone4Swa => "exaone4",
        }
    }

    /// Which real model's tokenizer the synthetic model carries (`qwen` or `gemma`).
    pub fn vocab_model(self) -> &'static str {
        match self {
            SynthArch::Gemma3 => "gemma",
            _ => "qwen",
        }
    }

    /// The pre-tokenizer written over the vocabulary model's, if any.
    fn pre_tokenizer(self) -> Option<&'static str> {
        match self {
            SynthArch::Llama => Some("llama-bpe"),
            SynthArch::Exaone => Some("exaone"),
            SynthArch::Exaone4 | SynthArch::Exaone4Swa => Some("exaone4"),
            _ => None,
        }
    }

    fn n_layer(self) -> usize {
        match self {
            SynthArch::Gemma3 => 6,
            SynthArch::Exaone4 => 4,
            SynthArch::Exaone4Swa => 64,
            _ => 3,
        }
    }

    fn tied(self) -> bool {
        matches!(self, SynthArch::Gemma3 | SynthArch::Exaone4)
    }
}

pub const N_EMBD: usize = 64;
pub const N_HEAD: usize = 4;
pub const N_HEAD_KV: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const N_FF: usize = 256;
/// Sliding window of the synthetic Gemma 3 and EXAONE 4.0 (32B layout): short, so that every
/// golden prompt and continuation runs past it.
pub const WINDOW: usize = 8;

/// SplitMix64, one stream per tensor.
struct Stream(u64);

impl Stream {
    fn new(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Stream(h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi), exactly representable steps of 2^-24.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

struct Builder {
    w: GgufWriter,
    seed: u64,
}

impl Builder {
    fn values(&self, name: &str, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = Stream::new(self.seed, name);
        (0..n).map(|_| s.uniform(lo, hi)).collect()
    }

    fn tensor(
        &mut self,
        name: &str,
        dims: &[usize],
        ty: GgmlType,
        data: &[f32],
    ) -> Result<(), SynthError> {
        let bytes = match ty {
            GgmlType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => {
                let ne0 = dims[0];
                let rb = modu_kernels::row_bytes(ty, ne0)
                    .map_err(|e| SynthError::Write(e.to_string()))?;
                let mut out = vec![0u8; rb * (data.len() / ne0)];
                for (src, dst) in data.chunks_exact(ne0).zip(out.chunks_exact_mut(rb)) {
                    modu_kernels::quantize::quantize_row(ty, src, dst, None)
                        .map_err(|e| SynthError::Write(format!("{name}: {e}")))?;
                }
                out
            }
        };
        let dims: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        self.w
            .add_tensor(name, &dims, ty, bytes)
            .map_err(|e| SynthError::Write(e.to_string()))
    }

    /// A vector of weights near `center`.
    fn vector(&mut self, name: &str, n: usize, center: f32, spread: f32) -> Result<(), SynthError> {
        let v = self.values(name, n, center - spread, center + spread);
        self.tensor(name, &[n], GgmlType::F32, &v)
    }

    /// An `[n_out, n_in]` matrix (ggml dims `[n_in, n_out]`) with variance `gain² / n_in`.
    fn matrix(
        &mut self,
        name: &str,
        n_in: usize,
        n_out: usize,
        gain: f32,
        ty: GgmlType,
    ) -> Result<(), SynthError> {
        let a = gain * (3.0 / n_in as f32).sqrt();
        let v = self.values(name, n_in * n_out, -a, a);
        self.tensor(name, &[n_in, n_out], ty, &v)
    }
}

/// Tensor types of a layer's matrices.
struct LayerTypes {
    q: GgmlType,
    v: GgmlType,
    gate_up: GgmlType,
    down: GgmlType,
}

/// Builds the synthetic model of `arch` with the tokenizer of `vocab` (a real model of the
/// family [`SynthArch::vocab_model`] names).
pub fn synthesize(arch: SynthArch, vocab: &GgufFile, seed: u64) -> Result<GgufWriter, SynthError> {
    use GgmlType as T;
    let tokens = vocab
        .get_array("tokenizer.ggml.tokens")
        .ok_or(SynthError::NoTokenizer("tokenizer.ggml.tokens"))?;
    let n_vocab = tokens.len();
    let a = arch.gguf_arch();
    let n_layer = arch.n_layer();
    let mut b = Builder {
        w: GgufWriter::new(),
        seed,
    };
    b.w.add("general.architecture", a);
    b.w.add(
        "general.name",
        format!("modu synthetic {} (seed {seed})", arch.name()),
    );
    b.w.add("general.file_type", 1u32);
    let key = |k: &str| format!("{a}.{k}");
    b.w.add(key("context_length"), 4096u32);
    b.w.add(key("embedding_length"), N_EMBD as u32);
    b.w.add(key("block_count"), n_layer as u32);
    b.w.add(key("feed_forward_length"), N_FF as u32);
    b.w.add(key("attention.head_count"), N_HEAD as u32);
    b.w.add(key("attention.head_count_kv"), N_HEAD_KV as u32);
    b.w.add(key("attention.key_length"), HEAD_DIM as u32);
    b.w.add(key("attention.value_length"), HEAD_DIM as u32);
    b.w.add(key("rope.dimension_count"), HEAD_DIM as u32);
    b.w.add(key("attention.layer_norm_rms_epsilon"), 1e-6f32);
    b.w.add(key("vocab_size"), n_vocab as u32);
    match arch {
        SynthArch::Llama => {
            b.w.add(key("rope.freq_base"), 500_000f32);
        }
        SynthArch::Qwen2 | SynthArch::Exaone => {
            b.w.add(key("rope.freq_base"), 1_000_000f32);
        }
        SynthArch::Gemma3 => {
            b.w.add(key("rope.freq_base"), 1_000_000f32);
            b.w.add(key("rope.freq_base_swa"), 10_000f32);
            b.w.add(key("rope.scaling.type"), "linear");
            b.w.add(key("rope.scaling.factor"), 8f32);
            b.w.add(key("attention.sliding_window"), WINDOW as u32);
        }
        SynthArch::Exaone4 => {
            b.w.add(key("rope.freq_base"), 1_000_000f32);
        }
        SynthArch::Exaone4Swa => {
            b.w.add(key("rope.freq_base"), 1_000_000f32);
            b.w.add(key("attention.sliding_window"), WINDOW as u32);
            let pattern: Vec<bool> = (0..n_layer).map(|i| i % 4 != 3).collect();
            b.w.add(
                key("attention.sliding_window_pattern"),
                Value::Array(Array::Bool(pattern)),
            );
        }
    }
    for (k, v) in vocab.metadata() {
        if k.starts_with("tokenizer.") {
            let v = match (k.as_str(), arch.pre_tokenizer()) {
                ("tokenizer.ggml.pre", Some(pre)) => Value::from(pre),
                _ => v.clone(),
            };
            b.w.add(k.clone(), v);
        }
    }
    if let Some(pre) = arch.pre_tokenizer() {
        if vocab.get("tokenizer.ggml.pre").is_none() {
            b.w.add("tokenizer.ggml.pre", pre);
        }
    }

    let d = N_EMBD;
    let q_dim = N_HEAD * HEAD_DIM;
    let kv_dim = N_HEAD_KV * HEAD_DIM;
    let tied = arch.tied();
    // Logits spread by ~5 (std of an output row · a unit-rms hidden state).
    let out_gain = 5.0;
    // A tied embedding is also the output matrix; Gemma scales its input by sqrt(n_embd).
    let emb_gain = if tied { out_gain } else { (d as f32).sqrt() };
    b.matrix("token_embd.weight", d, n_vocab, emb_gain, T::F16)?;
    if matches!(
        arch,
        SynthArch::Llama | SynthArch::Exaone4 | SynthArch::Exaone4Swa
    ) {
        // Llama 3 / EXAONE 4 style per-pair frequency divisors (1 for the fast pairs, up to 16).
        let f: Vec<f32> = (0..HEAD_DIM / 2)
            .map(|i| {
                if i < 3 {
                    1.0
                } else {
                    1.0 + (i - 2) as f32 * 3.0
                }
            })
            .collect();
        b.tensor("rope_freqs.weight", &[HEAD_DIM / 2], T::F32, &f)?;
    }
    let pre_norms = !matches!(arch, SynthArch::Exaone4 | SynthArch::Exaone4Swa);
    let ty = if arch == SynthArch::Exaone4Swa {
        // 64 layers of 8-bit activations compound rounding differences between any two
        // implementations (llama.cpp's AVX2 and AVX-512 builds differ by a median per-step
        // |Δp| of 0.012 on the quantized variant); this model is about the attention pattern,
        // so its layers are F32 and the quantized kernels are left to the shallow models.
        LayerTypes {
            q: T::F32,
            v: T::F32,
            gate_up: T::F32,
            down: T::F32,
        }
    } else {
        LayerTypes {
            q: T::F16,
            v: T::Q5_0,
            gate_up: T::Q8_0,
            down: T::Q4_K,
        }
    };
    // With a tied output the embedding of the input token dominates the last hidden state
    // unless the layers' (post-normalised) outputs outweigh it: then the model would only
    // ever repeat its input.
    // Sixty-four layers that each move the residual stream by a unit-rms step make a chaotic
    // map, in which the last-bit rounding differences between any two implementations grow
    // to percent-level probability differences; smaller steps keep the deep model as well
    // conditioned as the shallow ones (a window off by one still moves its probabilities by
    // ~0.2).
    let post_norm = match arch {
        _ if tied => 2.5,
        SynthArch::Exaone4Swa => 0.25,
        _ => 1.0,
    };
    for i in 0..n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        if pre_norms {
            b.vector(&p("attn_norm.weight"), d, 1.0, 0.2)?;
        }
        b.matrix(&p("attn_q.weight"), d, q_dim, 1.0, ty.q)?;
        b.matrix(&p("attn_k.weight"), d, kv_dim, 1.0, ty.q)?;
        b.matrix(&p("attn_v.weight"), d, kv_dim, 1.0, ty.v)?;
        if arch == SynthArch::Qwen2 {
            b.vector(&p("attn_q.bias"), q_dim, 0.0, 0.3)?;
            b.vector(&p("attn_k.bias"), kv_dim, 0.0, 0.6)?;
            b.vector(&p("attn_v.bias"), kv_dim, 0.0, 0.3)?;
        }
        if matches!(
            arch,
            SynthArch::Gemma3 | SynthArch::Exaone4 | SynthArch::Exaone4Swa
        ) {
            b.vector(&p("attn_q_norm.weight"), HEAD_DIM, 1.0, 0.3)?;
            b.vector(&p("attn_k_norm.weight"), HEAD_DIM, 1.0, 0.3)?;
        }
        b.matrix(&p("attn_output.weight"), q_dim, d, 1.0, ty.v)?;
        if !pre_norms || arch == SynthArch::Gemma3 {
            b.vector(&p("post_attention_norm.weight"), d, post_norm, 0.2)?;
        }
        if pre_norms {
            b.vector(&p("ffn_norm.weight"), d, 1.0, 0.2)?;
        }
        b.matrix(&p("ffn_gate.weight"), d, N_FF, 1.0, ty.gate_up)?;
        b.matrix(&p("ffn_up.weight"), d, N_FF, 1.0, ty.gate_up)?;
        b.matrix(&p("ffn_down.weight"), N_FF, d, 1.0, ty.down)?;
        if !pre_norms || arch == SynthArch::Gemma3 {
            b.vector(&p("post_ffw_norm.weight"), d, post_norm, 0.2)?;
        }
    }
    b.vector("output_norm.weight", d, 1.0, 0.2)?;
    if !tied {
        b.matrix("output.weight", d, n_vocab, out_gain, T::Q8_0)?;
    }
    Ok(b.w)
}
