//! Tiny random models of every supported architecture (llama, qwen2, gemma3), written with the
//! project's own GGUF writer, checked against an independent naive reference forward pass that
//! lives in this file.
//!
//! The reference is written straight from each architecture's math: full-sequence attention with
//! an explicit causal (and, for Gemma 3's local layers, sliding-window) mask, no KV cache, no
//! kernels, none of the engine's layers. It works on exactly the weight values stored in the file
//! (quantized variants are dequantized here by this file's own code), so its only differences
//! from the engine are the engine's deliberate approximations:
//!
//! * the KV cache is f16: every key and value is rounded to 11 significant bits (relative error
//!   ≤ 2^-11 ≈ 4.9e-4); attention also runs the way llama.cpp's CPU flash attention does (query
//!   rounded to f16, f16 accumulator for the weighted values), and Gemma's GELU is evaluated at
//!   the f16-rounded input and rounded to f16 (ggml's table). Each of these moves a hidden state
//!   by a few 1e-4 of its scale, and seven layers compound them;
//! * for Q8_0 weights, `matmul` quantizes each activation row to Q8_0 (per 32-block, error up to
//!   amax/254 per element, i.e. ~0.4 % of the block's largest value) before every projection,
//!   as llama.cpp does; for F16 weights it rounds activations to f16.
//!
//! Tolerances are relative to the logit scale (the largest |logit| the reference produced for
//! that model) and leave a safety factor over what was observed (see `Variant::tol`):
//! F32 weights 1e-2 (observed ≤ 1.0e-3), F16 weights 1e-2 (observed ≤ 1.6e-3), Q8_0 weights
//! 5e-2 (8-bit activations at every one of the 20–50 matmuls; observed ≤ 1.6e-2). A separate test
//! checks that the features under test (sliding window, local RoPE base, linear RoPE scaling,
//! `rope_freqs`, pair layout) each move the reference logits by at least 3× the F32 tolerance,
//! so an engine that got one of them wrong could not pass.
//!
//! Each model is run over a 12-token sequence (a) in one forward call, (b) token by token
//! through the KV cache and (c) as chunks (5 + 7 and 3 + 4 + 5), all with `Logits::All`, and
//! every position's logits are compared with the reference's. The greedy argmax of every
//! position, and an 8-token greedy continuation, must match the reference's too (unless the
//! reference's own top two are within the tolerance; with tied embeddings random models tend to
//! predict their input token, so the untied variants carry the interesting greedy paths). The
//! engine modes must also agree with each other (they run the same per-token arithmetic), with
//! `Logits::Last`, and with a rerun after truncating the cache to a 5-token prefix.
//!
//! Error cases (missing tensor, wrong shape, unknown architecture, out-of-range token, context
//! overflow, ...) must come back as the right `ModelError`, never as a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use half::f16;
use modu_engine::{load_model, Logits, Model, ModelError};
use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};

const N_EMBD: usize = 64;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = 16;
const Q_DIM: usize = N_HEAD * HEAD_DIM;
const KV_DIM: usize = N_HEAD_KV * HEAD_DIM;
const N_FF: usize = 128;
const N_VOCAB: usize = 97;
const N_CTX_TRAIN: usize = 64;
/// Gemma 3 sliding window: small enough that a 12-token sequence runs past it.
const WINDOW: usize = 4;
const SEQ_LEN: usize = 12;
const N_GREEDY: usize = 8;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Building the models
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Variant {
    arch: Arch,
    n_layer: usize,
    /// Storage type of every 2-D matrix (norm weights, biases and RoPE factors stay F32, as in
    /// real files).
    mat_ty: GgmlType,
    /// No `output.weight`: the output projection reuses `token_embd.weight`.
    tied: bool,
    /// A `rope_freqs.weight` tensor (Llama 3 per-dimension frequency divisors).
    rope_freqs: bool,
    /// `rope.scaling.type = linear` with this factor (Gemma 3: global layers only).
    linear_rope_scale: Option<f32>,
    /// Gemma 3 `attention.sliding_window`.
    window: usize,
    /// RoPE base of Gemma 3's local layers (10 000 in the real models and in the engine: not
    /// written to the file; only the sensitivity test changes it, in the reference).
    local_rope_base: f32,
    seed: u64,
}

impl Variant {
    /// Allowed max |engine − reference| as a fraction of the largest |reference logit|.
    fn tol(&self) -> f32 {
        match self.mat_ty {
            GgmlType::F32 => 1e-2,
            GgmlType::F16 => 1e-2,
            GgmlType::Q8_0 => 5e-2,
            other => panic!("no tolerance for {other:?}"),
        }
    }

    fn label(&self) -> String {
        let mut s = format!(
            "{} {} {}L",
            self.arch.name(),
            self.mat_ty.name(),
            self.n_layer
        );
        s += if self.tied { " tied" } else { " untied" };
        if self.rope_freqs {
            s += " rope_freqs";
        }
        if let Some(f) = self.linear_rope_scale {
            s += &format!(" rope-linear-x{f}");
        }
        s
    }

    fn eps(&self) -> f32 {
        match self.arch {
            Arch::Llama => 1e-5,
            Arch::Qwen2 | Arch::Gemma3 => 1e-6,
        }
    }

    /// `rope.freq_base` (Gemma 3: of the global layers).
    fn rope_base(&self) -> f32 {
        match self.arch {
            Arch::Llama => 500_000.0,
            Arch::Qwen2 => 1_000_000.0,
            Arch::Gemma3 => 1_000_000.0,
        }
    }
}

/// One tensor as stored in the file: `values` are exactly what dequantizing it gives.
#[derive(Clone)]
struct Tensor {
    name: String,
    /// ggml order: `dims[0]` is the row length.
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

/// Encode `x` as `ty`, returning the bytes and the values they decode to.
fn encode(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    match ty {
        GgmlType::F32 => (x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.to_vec()),
        GgmlType::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        }
        GgmlType::Q8_0 => {
            // ggml layout: per 32 values, an f16 scale d = max|x| / 127, then 32 × i8 round(x / d).
            assert_eq!(x.len() % 32, 0);
            let mut bytes = Vec::with_capacity(x.len() / 32 * 34);
            let mut values = Vec::with_capacity(x.len());
            for block in x.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let d16 = f16::from_f32(d);
                bytes.extend_from_slice(&d16.to_le_bytes());
                for v in block {
                    let q = (v * id).round() as i8;
                    bytes.push(q as u8);
                    values.push(d16.to_f32() * q as f32);
                }
            }
            (bytes, values)
        }
        other => panic!("encode: unsupported {other:?}"),
    }
}

fn tensor(name: &str, dims: &[u64], ty: GgmlType, x: &[f32]) -> Tensor {
    assert_eq!(dims.iter().product::<u64>() as usize, x.len(), "{name}");
    let (bytes, values) = encode(ty, x);
    Tensor {
        name: name.to_string(),
        dims: dims.to_vec(),
        ty,
        bytes,
        values,
    }
}

/// A synthetic model: its metadata and tensors (file order), before being written.
#[derive(Clone)]
struct Synthetic {
    v: Variant,
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl Synthetic {
    fn new(v: Variant) -> Self {
        let arch = v.arch.name();
        let mut rng = Rng(v.seed);
        let mut md: Vec<(String, Value)> = Vec::new();
        let mut kv = |k: &str, val: Value| md.push((k.to_string(), val));
        kv("general.architecture", Value::String(arch.into()));
        kv(
            "general.name",
            Value::String(format!("synthetic {}", v.label())),
        );
        kv(&format!("{arch}.block_count"), Value::U32(v.n_layer as u32));
        kv(
            &format!("{arch}.context_length"),
            Value::U32(N_CTX_TRAIN as u32),
        );
        kv(
            &format!("{arch}.embedding_length"),
            Value::U32(N_EMBD as u32),
        );
        kv(
            &format!("{arch}.feed_forward_length"),
            Value::U32(N_FF as u32),
        );
        kv(
            &format!("{arch}.attention.head_count"),
            Value::U32(N_HEAD as u32),
        );
        kv(
            &format!("{arch}.attention.head_count_kv"),
            Value::U32(N_HEAD_KV as u32),
        );
        kv(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(v.eps()),
        );
        kv(&format!("{arch}.rope.freq_base"), Value::F32(v.rope_base()));
        if v.arch == Arch::Gemma3 {
            kv("gemma3.attention.key_length", Value::U32(HEAD_DIM as u32));
            kv("gemma3.attention.value_length", Value::U32(HEAD_DIM as u32));
            kv(
                "gemma3.attention.sliding_window",
                Value::U32(v.window as u32),
            );
        } else {
            kv(
                &format!("{arch}.rope.dimension_count"),
                Value::U32(HEAD_DIM as u32),
            );
        }
        if let Some(f) = v.linear_rope_scale {
            kv(
                &format!("{arch}.rope.scaling.type"),
                Value::String("linear".into()),
            );
            kv(&format!("{arch}.rope.scaling.factor"), Value::F32(f));
        }

        let mt = v.mat_ty;
        let f32t = GgmlType::F32;
        // Matrices: entries uniform in ±sqrt(3/cols), so a unit-RMS input gives unit-RMS outputs.
        let mat = |rng: &mut Rng, name: &str, cols: usize, rows: usize| {
            let a = (3.0 / cols as f32).sqrt();
            tensor(
                name,
                &[cols as u64, rows as u64],
                mt,
                &rng.vec(rows * cols, -a, a),
            )
        };
        let norm = |rng: &mut Rng, name: &str, n: usize| {
            tensor(name, &[n as u64], f32t, &rng.vec(n, 0.7, 1.3))
        };
        let mut t = Vec::new();
        // Gemma multiplies the embedding by sqrt(n_embd) = 8: keep its rows small (as in the real
        // models) so the residual stream is not dominated by it.
        let e = if v.arch == Arch::Gemma3 { 0.25 } else { 1.0 };
        t.push(tensor(
            "token_embd.weight",
            &[N_EMBD as u64, N_VOCAB as u64],
            mt,
            &rng.vec(N_VOCAB * N_EMBD, -e, e),
        ));
        if v.rope_freqs {
            // Llama 3 style: 1 for the fast dimensions, growing towards the slow ones.
            let ff: Vec<f32> = (0..HEAD_DIM / 2)
                .map(|i| 1.0 + i as f32 * rng.uniform(0.2, 0.6))
                .collect();
            t.push(tensor(
                "rope_freqs.weight",
                &[(HEAD_DIM / 2) as u64],
                f32t,
                &ff,
            ));
        }
        for il in 0..v.n_layer {
            let p = |s: &str| format!("blk.{il}.{s}");
            t.push(norm(&mut rng, &p("attn_norm.weight"), N_EMBD));
            t.push(mat(&mut rng, &p("attn_q.weight"), N_EMBD, Q_DIM));
            t.push(mat(&mut rng, &p("attn_k.weight"), N_EMBD, KV_DIM));
            t.push(mat(&mut rng, &p("attn_v.weight"), N_EMBD, KV_DIM));
            if v.arch == Arch::Qwen2 {
                for (s, n) in [
                    ("attn_q.bias", Q_DIM),
                    ("attn_k.bias", KV_DIM),
                    ("attn_v.bias", KV_DIM),
                ] {
                    t.push(tensor(&p(s), &[n as u64], f32t, &rng.vec(n, -0.5, 0.5)));
                }
            }
            if v.arch == Arch::Gemma3 {
                t.push(norm(&mut rng, &p("attn_q_norm.weight"), HEAD_DIM));
                t.push(norm(&mut rng, &p("attn_k_norm.weight"), HEAD_DIM));
            }
            t.push(mat(&mut rng, &p("attn_output.weight"), Q_DIM, N_EMBD));
            if v.arch == Arch::Gemma3 {
                t.push(norm(&mut rng, &p("post_attention_norm.weight"), N_EMBD));
            }
            t.push(norm(&mut rng, &p("ffn_norm.weight"), N_EMBD));
            t.push(mat(&mut rng, &p("ffn_gate.weight"), N_EMBD, N_FF));
            t.push(mat(&mut rng, &p("ffn_up.weight"), N_EMBD, N_FF));
            t.push(mat(&mut rng, &p("ffn_down.weight"), N_FF, N_EMBD));
            if v.arch == Arch::Gemma3 {
                t.push(norm(&mut rng, &p("post_ffw_norm.weight"), N_EMBD));
            }
        }
        t.push(norm(&mut rng, "output_norm.weight", N_EMBD));
        if !v.tied {
            t.push(tensor(
                "output.weight",
                &[N_EMBD as u64, N_VOCAB as u64],
                mt,
                &rng.vec(N_VOCAB * N_EMBD, -0.5, 0.5),
            ));
        }
        Synthetic {
            v,
            metadata: md,
            tensors: t,
        }
    }

    fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.values.as_slice())
    }

    fn w(&self, name: &str) -> &[f32] {
        self.get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"))
    }

    fn remove_tensor(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(self.tensors.len() + 1, before, "no tensor {name}");
    }

    fn replace_tensor(&mut self, name: &str, dims: &[u64]) {
        let n = dims.iter().product::<u64>() as usize;
        let new = tensor(name, dims, GgmlType::F32, &vec![0.5; n]);
        let slot = self
            .tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        *slot = new;
    }

    fn set_meta(&mut self, key: &str, val: Option<Value>) {
        self.metadata.retain(|(k, _)| k != key);
        if let Some(val) = val {
            self.metadata.push((key.to_string(), val));
        }
    }

    /// Write with `GgufWriter` into memory and read back.
    fn file(&self) -> Arc<GgufFile> {
        let mut w = GgufWriter::new();
        for (k, val) in &self.metadata {
            w.add(k.clone(), val.clone());
        }
        for t in &self.tensors {
            w.add_tensor(t.name.clone(), &t.dims, t.ty, t.bytes.clone())
                .expect("add_tensor");
        }
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).expect("write gguf");
        Arc::new(GgufFile::from_bytes(bytes).expect("read back gguf"))
    }

    /// `load_model`, turning a panic into a test failure with a clear message.
    fn try_load(&self) -> Result<Box<dyn Model>, ModelError> {
        let file = self.file();
        catch_unwind(AssertUnwindSafe(|| load_model(file))).unwrap_or_else(|_| {
            panic!(
                "{}: load_model panicked instead of returning an error",
                self.v.label()
            )
        })
    }

    fn load(&self) -> Box<dyn Model> {
        match self.try_load() {
            Ok(m) => m,
            Err(e) => panic!("{}: load failed: {e}", self.v.label()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Naive reference forward (independent of the engine's layers)
// ---------------------------------------------------------------------------------------------

/// `W·x` for a row-major `[rows, cols]` matrix.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    assert_eq!(w.len() % cols, 0);
    w.chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        x.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
}

/// Rotate every head of `x` for position `pos`. Pair `i` (of `HEAD_DIM/2`) turns by
/// `pos · scale · base^(-2i/HEAD_DIM) / factor[i]`; NeoX pairs are `(i, i + HEAD_DIM/2)`, the
/// original Llama layout pairs neighbours `(2i, 2i + 1)`.
fn rope_ref(
    x: &mut [f32],
    pos: usize,
    base: f32,
    neox: bool,
    factors: Option<&[f32]>,
    pos_scale: f32,
) {
    let half = HEAD_DIM / 2;
    for head in x.chunks_exact_mut(HEAD_DIM) {
        for i in 0..half {
            let freq = (base as f64).powf(-2.0 * i as f64 / HEAD_DIM as f64)
                / factors.map_or(1.0, |f| f[i] as f64);
            let theta = pos as f64 * pos_scale as f64 * freq;
            let (s, c) = (theta.sin() as f32, theta.cos() as f32);
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

fn gelu_tanh_ref(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()))
        as f32
}

fn silu_ref(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Logits `[n][N_VOCAB]` for every position of `tokens`, recomputing the whole sequence.
fn reference_forward(m: &Synthetic, tokens: &[u32]) -> Vec<Vec<f32>> {
    let v = &m.v;
    let gemma = v.arch == Arch::Gemma3;
    let n = tokens.len();
    let eps = v.eps();
    let emb = m.w("token_embd.weight");
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            let row = &emb[t as usize * N_EMBD..(t as usize + 1) * N_EMBD];
            let s = if gemma { (N_EMBD as f32).sqrt() } else { 1.0 };
            row.iter().map(|e| e * s).collect()
        })
        .collect();
    let factors = m.get("rope_freqs.weight");

    for il in 0..v.n_layer {
        let p = |s: &str| format!("blk.{il}.{s}");
        // Gemma 3: in each group of six layers the last is global, the other five local.
        let global = !gemma || il % 6 == 5;
        let (rope_base, pos_scale) = if global {
            (v.rope_base(), 1.0 / v.linear_rope_scale.unwrap_or(1.0))
        } else {
            (v.local_rope_base, 1.0)
        };
        // mask[t][s]: may the query at t see the key at s?
        let mask: Vec<Vec<bool>> = (0..n)
            .map(|t| {
                (0..n)
                    .map(|s| s <= t && (global || t - s < v.window))
                    .collect()
            })
            .collect();

        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (t, xt) in x.iter().enumerate() {
            let h = rms_norm_ref(xt, m.w(&p("attn_norm.weight")), eps);
            let mut q = matvec(m.w(&p("attn_q.weight")), &h);
            let mut k = matvec(m.w(&p("attn_k.weight")), &h);
            let mut val = matvec(m.w(&p("attn_v.weight")), &h);
            add_bias(&mut q, m.get(&p("attn_q.bias")));
            add_bias(&mut k, m.get(&p("attn_k.bias")));
            add_bias(&mut val, m.get(&p("attn_v.bias")));
            if gemma {
                let qn = m.w(&p("attn_q_norm.weight"));
                let kn = m.w(&p("attn_k_norm.weight"));
                q = q
                    .chunks_exact(HEAD_DIM)
                    .flat_map(|hh| rms_norm_ref(hh, qn, eps))
                    .collect();
                k = k
                    .chunks_exact(HEAD_DIM)
                    .flat_map(|hh| rms_norm_ref(hh, kn, eps))
                    .collect();
            }
            let neox = v.arch != Arch::Llama;
            rope_ref(&mut q, t, rope_base, neox, factors, pos_scale);
            rope_ref(&mut k, t, rope_base, neox, factors, pos_scale);
            qs.push(q);
            ks.push(k);
            vs.push(val);
        }

        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let group = N_HEAD / N_HEAD_KV;
        for t in 0..n {
            let mut att = vec![0f32; Q_DIM];
            for h in 0..N_HEAD {
                let kvh = h / group;
                let qh = &qs[t][h * HEAD_DIM..(h + 1) * HEAD_DIM];
                let scores: Vec<f32> = (0..n)
                    .map(|s| {
                        if mask[t][s] {
                            let kh = &ks[s][kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM];
                            qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for s in 0..n {
                    let w = e[s] / sum;
                    let vh = &vs[s][kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM];
                    for d in 0..HEAD_DIM {
                        att[h * HEAD_DIM + d] += w * vh[d];
                    }
                }
            }
            let mut o = matvec(m.w(&p("attn_output.weight")), &att);
            if gemma {
                o = rms_norm_ref(&o, m.w(&p("post_attention_norm.weight")), eps);
            }
            x[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }

        for xt in x.iter_mut() {
            let h = rms_norm_ref(xt, m.w(&p("ffn_norm.weight")), eps);
            let g = matvec(m.w(&p("ffn_gate.weight")), &h);
            let u = matvec(m.w(&p("ffn_up.weight")), &h);
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| {
                    if gemma {
                        gelu_tanh_ref(g) * u
                    } else {
                        silu_ref(g) * u
                    }
                })
                .collect();
            let mut o = matvec(m.w(&p("ffn_down.weight")), &act);
            if gemma {
                o = rms_norm_ref(&o, m.w(&p("post_ffw_norm.weight")), eps);
            }
            xt.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
    }

    let out_w = m
        .get("output.weight")
        .unwrap_or_else(|| m.w("token_embd.weight"));
    x.iter()
        .map(|xt| matvec(out_w, &rms_norm_ref(xt, m.w("output_norm.weight"), eps)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Comparison helpers
// ---------------------------------------------------------------------------------------------

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tokens_for(seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed ^ 0x5eed);
    (0..SEQ_LEN)
        .map(|_| (rng.next_u64() % N_VOCAB as u64) as u32)
        .collect()
}

/// Run `tokens` through the engine in chunks of the given sizes (one fresh cache), `Logits::All`.
fn engine_chunks(model: &dyn Model, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    assert_eq!(chunks.iter().sum::<usize>(), tokens.len());
    let mut cache = model.new_cache(N_CTX_TRAIN);
    let mut out = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let l = model
            .forward(&tokens[at..at + c], &mut cache, Logits::All)
            .expect("forward");
        assert_eq!(l.len(), c * N_VOCAB);
        out.extend(l);
        at += c;
        assert_eq!(cache.len(), at);
    }
    out
}

/// One variant end to end; returns (max |diff| / logit scale over all modes, report line).
fn check_variant(v: Variant) -> (f32, String) {
    let syn = Synthetic::new(v);
    let model = syn.load();
    let info = model.info();
    assert_eq!(info.arch, v.arch.name());
    assert_eq!(
        (info.n_vocab, info.n_layer, info.n_embd, info.n_ctx_train),
        (N_VOCAB, v.n_layer, N_EMBD, N_CTX_TRAIN)
    );

    let tokens = tokens_for(v.seed);
    let reference: Vec<f32> = reference_forward(&syn, &tokens).concat();
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        scale.is_finite() && scale > 1.0,
        "{}: degenerate reference logits (scale {scale})",
        v.label()
    );
    let tol = v.tol() * scale;

    let modes: Vec<(&str, Vec<f32>)> = vec![
        ("one call", engine_chunks(&*model, &tokens, &[SEQ_LEN])),
        (
            "token by token",
            engine_chunks(&*model, &tokens, &[1; SEQ_LEN]),
        ),
        ("5 + 7", engine_chunks(&*model, &tokens, &[5, 7])),
        ("3 + 4 + 5", engine_chunks(&*model, &tokens, &[3, 4, 5])),
    ];
    let mut worst = 0f32;
    let mut line = format!(
        "{:<42} scale {:>6.2} tol {:.0e}:",
        v.label(),
        scale,
        v.tol()
    );
    for (mode, logits) in &modes {
        let d = max_abs_diff(logits, &reference);
        worst = worst.max(d / scale);
        line += &format!(" {mode} {:.2e}", d / scale);
        assert!(
            d <= tol,
            "{}: {mode}: max |engine - reference| = {d} > {tol} ({} of logit scale {scale})",
            v.label(),
            v.tol()
        );
        // Greedy pick of every position (teacher-forced).
        for t in 0..SEQ_LEN {
            let (e, r) = (
                &logits[t * N_VOCAB..(t + 1) * N_VOCAB],
                &reference[t * N_VOCAB..(t + 1) * N_VOCAB],
            );
            assert_argmax_agrees(e, r, tol, &format!("{} {mode} position {t}", v.label()));
        }
    }
    // The modes run the same per-token arithmetic over the same f16 cache contents.
    let one = &modes[0].1;
    for (mode, logits) in &modes[1..] {
        let d = max_abs_diff(logits, one);
        assert!(
            d <= 1e-4 * scale,
            "{}: {mode} differs from one call by {d}",
            v.label()
        );
    }
    // `Logits::Last` is the last row of `Logits::All`.
    let mut cache = model.new_cache(N_CTX_TRAIN);
    let last = model
        .forward(&tokens, &mut cache, Logits::Last)
        .expect("forward");
    assert_eq!(last.len(), N_VOCAB);
    assert!(max_abs_diff(&last, &one[(SEQ_LEN - 1) * N_VOCAB..]) <= 1e-5 * scale);

    // Reusing a prefix: truncate the cache to 5 positions and run the rest again.
    let mut reuse = cache.clone();
    reuse.truncate(5);
    assert_eq!(reuse.len(), 5);
    let rest = model
        .forward(&tokens[5..], &mut reuse, Logits::All)
        .expect("forward");
    assert!(
        max_abs_diff(&rest, &one[5 * N_VOCAB..]) <= 1e-4 * scale,
        "{}: rerun after truncate differs",
        v.label()
    );

    // Greedy continuation: engine through its cache vs the reference recomputing everything.
    let mut seq = tokens.clone();
    let mut logits = last;
    for step in 0..N_GREEDY {
        let r = reference_forward(&syn, &seq).pop().unwrap();
        let d = max_abs_diff(&logits, &r);
        worst = worst.max(d / scale);
        assert!(
            d <= tol,
            "{}: greedy step {step}: max diff {d} > {tol}",
            v.label()
        );
        if !assert_argmax_agrees(
            &logits,
            &r,
            tol,
            &format!("{} greedy step {step}", v.label()),
        ) {
            break; // a near-tie went the other way; the sequences would diverge from here
        }
        let next = argmax(&logits) as u32;
        seq.push(next);
        logits = model
            .forward(&[next], &mut cache, Logits::Last)
            .expect("forward");
    }
    line += &format!(
        " | greedy {}",
        seq[SEQ_LEN..]
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    (worst, line)
}

/// The engine's argmax must be the reference's, unless the reference itself has a near-tie (its
/// top two within the tolerance). Returns whether they agreed.
fn assert_argmax_agrees(engine: &[f32], reference: &[f32], tol: f32, what: &str) -> bool {
    let (e, r) = (argmax(engine), argmax(reference));
    if e == r {
        return true;
    }
    assert!(
        reference[r] - reference[e] <= tol,
        "{what}: engine picks {e} (ref logit {}), reference picks {r} (ref logit {})",
        reference[e],
        reference[r]
    );
    eprintln!("{what}: near-tie, engine {e} vs reference {r}");
    false
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

fn variant(arch: Arch, mat_ty: GgmlType, seed: u64) -> Variant {
    Variant {
        arch,
        n_layer: if arch == Arch::Gemma3 { 7 } else { 3 },
        mat_ty,
        tied: arch != Arch::Llama,
        rope_freqs: false,
        linear_rope_scale: None,
        window: WINDOW,
        local_rope_base: 10_000.0,
        seed,
    }
}

fn run_variants(variants: &[Variant]) {
    let mut report = Vec::new();
    for &v in variants {
        let (worst, line) = check_variant(v);
        report.push(line);
        assert!(worst.is_finite());
    }
    for l in &report {
        eprintln!("{l}");
    }
}

#[test]
fn llama_matches_reference() {
    use GgmlType::*;
    run_variants(&[
        Variant {
            rope_freqs: true,
            ..variant(Arch::Llama, F32, 11)
        },
        Variant {
            tied: true,
            ..variant(Arch::Llama, F32, 12)
        },
        Variant {
            tied: true,
            rope_freqs: true,
            ..variant(Arch::Llama, Q8_0, 13)
        },
        Variant {
            n_layer: 2,
            ..variant(Arch::Llama, F16, 14)
        },
    ]);
}

#[test]
fn qwen2_matches_reference() {
    use GgmlType::*;
    run_variants(&[
        variant(Arch::Qwen2, F32, 21),
        Variant {
            tied: false,
            ..variant(Arch::Qwen2, F32, 22)
        },
        variant(Arch::Qwen2, Q8_0, 23),
        variant(Arch::Qwen2, F16, 24),
    ]);
}

#[test]
fn gemma3_matches_reference() {
    use GgmlType::*;
    run_variants(&[
        variant(Arch::Gemma3, F32, 31),
        Variant {
            linear_rope_scale: Some(8.0),
            ..variant(Arch::Gemma3, F32, 32)
        },
        variant(Arch::Gemma3, Q8_0, 33),
        Variant {
            tied: false,
            ..variant(Arch::Gemma3, F16, 34)
        },
    ]);
}

/// The checks above only mean something if the features they cover change the logits by much
/// more than the tolerance: a sliding window of 4 instead of none, the local RoPE base, linear
/// RoPE scaling of the global layers, `rope_freqs`, interleaved vs NeoX pairs.
#[test]
fn reference_is_sensitive_to_the_features_under_test() {
    let tokens = tokens_for(31);
    let rel = |a: &Synthetic, b: &Synthetic| {
        let (la, lb) = (
            reference_forward(a, &tokens).concat(),
            reference_forward(b, &tokens).concat(),
        );
        let scale = la.iter().fold(0f32, |m, x| m.max(x.abs()));
        max_abs_diff(&la, &lb) / scale
    };
    let g = Synthetic::new(variant(Arch::Gemma3, GgmlType::F32, 31));
    let mut no_window = g.clone();
    no_window.v.window = SEQ_LEN;
    let mut local_base = g.clone();
    local_base.v.local_rope_base = 1_000_000.0;
    let mut scaled = g.clone();
    scaled.v.linear_rope_scale = Some(8.0);
    let l = Synthetic::new(Variant {
        rope_freqs: true,
        ..variant(Arch::Llama, GgmlType::F32, 11)
    });
    let mut no_freqs = l.clone();
    no_freqs.remove_tensor("rope_freqs.weight");
    let mut neox = l.clone();
    neox.v.arch = Arch::Qwen2;
    let mut report = Vec::new();
    for (what, a, b) in [
        ("gemma3 window 4 vs none", &g, &no_window),
        ("gemma3 local RoPE base 1e4 vs 1e6", &g, &local_base),
        ("gemma3 linear RoPE x8 on global layers", &g, &scaled),
        ("llama rope_freqs vs none", &l, &no_freqs),
        ("llama interleaved vs NeoX RoPE", &l, &neox),
    ] {
        report.push((what, rel(a, b)));
    }
    for (what, d) in &report {
        eprintln!("sensitivity: {what}: {d:.3e} of logit scale");
    }
    let f32_tol = variant(Arch::Llama, GgmlType::F32, 0).tol();
    for (what, d) in report {
        assert!(
            d > 3.0 * f32_tol,
            "{what}: only {d} of the logit scale: the test could not see this feature"
        );
    }
}

fn expect_err(syn: &Synthetic) -> ModelError {
    match syn.try_load() {
        Ok(_) => panic!("{}: loaded a broken model", syn.v.label()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensors_are_named() {
    let cases = [
        (Arch::Llama, "blk.1.ffn_up.weight"),
        (Arch::Llama, "token_embd.weight"),
        (Arch::Llama, "output_norm.weight"),
        (Arch::Qwen2, "blk.2.attn_v.weight"),
        (Arch::Gemma3, "blk.0.attn_q_norm.weight"),
        (Arch::Gemma3, "blk.6.post_ffw_norm.weight"),
        (Arch::Gemma3, "blk.3.post_attention_norm.weight"),
    ];
    for (arch, name) in cases {
        let mut syn = Synthetic::new(variant(arch, GgmlType::F32, 1));
        syn.remove_tensor(name);
        match expect_err(&syn) {
            ModelError::MissingTensor(n) => assert_eq!(n, name),
            e => panic!("{arch:?} without {name}: expected MissingTensor, got {e:?}"),
        }
    }
}

#[test]
fn wrong_shapes_are_reported() {
    let cases: [(Arch, &str, &[u64], &[u64]); 6] = [
        // (arch, tensor, dims written, dims the loader expects)
        (Arch::Llama, "blk.0.attn_k.weight", &[64, 64], &[64, 32]),
        (Arch::Llama, "blk.2.ffn_down.weight", &[64, 128], &[128, 64]),
        (Arch::Llama, "blk.1.attn_norm.weight", &[32], &[64]),
        (Arch::Qwen2, "blk.0.attn_q.bias", &[32], &[64]),
        (Arch::Gemma3, "blk.4.attn_k_norm.weight", &[32], &[16]),
        (Arch::Gemma3, "token_embd.weight", &[32, 97], &[64, 97]),
    ];
    for (arch, name, dims, expected_dims) in cases {
        let mut syn = Synthetic::new(variant(arch, GgmlType::F32, 2));
        syn.replace_tensor(name, dims);
        match expect_err(&syn) {
            ModelError::BadShape {
                name: n,
                expected,
                got,
            } => {
                assert_eq!(n, name);
                assert_eq!(got, dims);
                assert_eq!(expected, expected_dims, "{name}");
            }
            e => panic!("{arch:?} {name} {dims:?}: expected BadShape, got {e:?}"),
        }
    }
    // A 3-D tensor where a matrix belongs.
    let mut syn = Synthetic::new(variant(Arch::Qwen2, GgmlType::F32, 2));
    syn.replace_tensor("blk.1.ffn_gate.weight", &[64, 64, 2]);
    assert!(
        matches!(expect_err(&syn), ModelError::BadShape { name, .. } if name == "blk.1.ffn_gate.weight")
    );
}

#[test]
fn bad_metadata_is_reported() {
    let mut syn = Synthetic::new(variant(Arch::Llama, GgmlType::F32, 3));
    syn.set_meta("general.architecture", Some(Value::String("mamba".into())));
    match expect_err(&syn) {
        ModelError::UnsupportedArch(a) => assert_eq!(a, "mamba"),
        e => panic!("expected UnsupportedArch, got {e:?}"),
    }
    syn.set_meta("general.architecture", None);
    assert!(matches!(expect_err(&syn), ModelError::NoArch));

    let mut syn = Synthetic::new(variant(Arch::Gemma3, GgmlType::F32, 3));
    syn.set_meta("gemma3.block_count", None);
    assert!(matches!(expect_err(&syn), ModelError::MissingKey(k) if k == "gemma3.block_count"));

    let mut syn = Synthetic::new(variant(Arch::Qwen2, GgmlType::F32, 3));
    syn.set_meta("qwen2.attention.head_count_kv", Some(Value::U32(3)));
    assert!(matches!(expect_err(&syn), ModelError::BadKey { .. }));
    syn.set_meta("qwen2.attention.head_count_kv", Some(Value::U32(0)));
    assert!(matches!(expect_err(&syn), ModelError::BadKey { .. }));
}

#[test]
fn bad_tokens_empty_input_and_context_overflow() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let syn = Synthetic::new(variant(arch, GgmlType::F32, 4));
        let model = syn.load();
        let tokens = tokens_for(4);

        // Out-of-range token: an error, and the cache is left untouched and usable.
        let mut cache = model.new_cache(8);
        for bad in [N_VOCAB as u32, u32::MAX] {
            match model.forward(&[1, bad, 2], &mut cache, Logits::All) {
                Err(ModelError::BadToken { id, vocab }) => assert_eq!((id, vocab), (bad, N_VOCAB)),
                Err(e) => panic!("{arch:?}: expected BadToken, got {e:?}"),
                Ok(_) => panic!("{arch:?}: token {bad} accepted"),
            }
            assert_eq!(cache.len(), 0);
        }
        assert!(matches!(
            model.forward(&[], &mut cache, Logits::Last),
            Err(ModelError::EmptyInput)
        ));
        assert_eq!(cache.len(), 0);

        // Context overflow.
        let first = model
            .forward(&tokens[..6], &mut cache, Logits::All)
            .unwrap();
        match model.forward(&tokens[6..9], &mut cache, Logits::All) {
            Err(ModelError::ContextFull { have, adding, max }) => {
                assert_eq!((have, adding, max), (6, 3, 8))
            }
            Err(e) => panic!("{arch:?}: expected ContextFull, got {e:?}"),
            Ok(_) => panic!("{arch:?}: ran past the context"),
        }
        assert_eq!(
            cache.len(),
            6,
            "{arch:?}: a refused forward must not touch the cache"
        );
        let second = model
            .forward(&tokens[6..8], &mut cache, Logits::All)
            .unwrap();
        assert_eq!(cache.len(), 8);
        assert!(matches!(
            model.forward(&tokens[8..9], &mut cache, Logits::Last),
            Err(ModelError::ContextFull {
                have: 8,
                adding: 1,
                max: 8
            })
        ));
        let mut fresh = model.new_cache(8);
        assert!(matches!(
            model.forward(&tokens[..9], &mut fresh, Logits::Last),
            Err(ModelError::ContextFull {
                have: 0,
                adding: 9,
                max: 8
            })
        ));

        // What did run after the errors is still right.
        let reference = reference_forward(&syn, &tokens[..8]).concat();
        let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
        let got: Vec<f32> = first.into_iter().chain(second).collect();
        assert!(max_abs_diff(&got, &reference) <= 1e-2 * scale, "{arch:?}");
    }
}
