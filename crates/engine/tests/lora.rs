//! LoRA modules on tiny synthetic models (written with the project's GGUF writer) and on the real
//! Qwen model:
//! * an adapter's logits equal those of a dense model whose weights are `W + s·(alpha/r)·B·A`
//!   (qwen2 and gemma3, every projection adapted);
//! * scale 0 is the base model bit for bit;
//! * a request gives the same logits (bit for bit) and greedy tokens alone and inside a batch of
//!   8 sequences that use 8 different random rank-16 modules (real Qwen model);
//! * malformed adapters (GGUF and PEFT) each give their specific error, never a panic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use modu_engine::{
    load_model, BaseShapes, KvCache, Logits, LoraAdapter, LoraError, Model, ModelError, ModuleRef,
    Proj,
};
use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};

// ---------------------------------------------------------------------------------------------
// Tiny models and adapters
// ---------------------------------------------------------------------------------------------

const D: usize = 64;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const HD: usize = 16;
const FF: usize = 128;
const VOCAB: usize = 61;
const N_LAYER: usize = 2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a)
            .collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

/// F32 weights by name: (ggml dims, values).
struct Tiny {
    arch: &'static str,
    tensors: BTreeMap<String, (Vec<u64>, Vec<f32>)>,
}

/// `(n_in, n_out)` of a projection in the tiny models.
fn proj_shape(p: Proj) -> (usize, usize) {
    match p {
        Proj::Q => (D, N_HEAD * HD),
        Proj::K | Proj::V => (D, N_HEAD_KV * HD),
        Proj::O => (N_HEAD * HD, D),
        Proj::Gate | Proj::Up => (D, FF),
        Proj::Down => (FF, D),
    }
}

impl Tiny {
    fn new(arch: &'static str, seed: u64) -> Tiny {
        let mut rng = Rng(seed);
        let mut t = BTreeMap::new();
        let mut put = |name: String, dims: Vec<u64>, v: Vec<f32>| {
            t.insert(name, (dims, v));
        };
        put(
            "token_embd.weight".into(),
            vec![D as u64, VOCAB as u64],
            rng.vec(D * VOCAB, if arch == "gemma3" { 0.25 } else { 1.0 }),
        );
        put(
            "output_norm.weight".into(),
            vec![D as u64],
            rng.vec(D, 0.3).iter().map(|v| 1.0 + v).collect(),
        );
        for il in 0..N_LAYER {
            let p = |s: &str| format!("blk.{il}.{s}");
            for n in ["attn_norm", "ffn_norm"] {
                put(
                    p(&format!("{n}.weight")),
                    vec![D as u64],
                    rng.vec(D, 0.3).iter().map(|v| 1.0 + v).collect(),
                );
            }
            for pr in Proj::ALL {
                let (ni, no) = proj_shape(pr);
                let a = (3.0 / ni as f32).sqrt();
                put(
                    p(&format!("{}.weight", pr.gguf_name())),
                    vec![ni as u64, no as u64],
                    rng.vec(ni * no, a),
                );
            }
            if arch == "qwen2" {
                for (s, n) in [
                    ("attn_q", N_HEAD * HD),
                    ("attn_k", N_HEAD_KV * HD),
                    ("attn_v", N_HEAD_KV * HD),
                ] {
                    put(p(&format!("{s}.bias")), vec![n as u64], rng.vec(n, 0.5));
                }
            }
            if arch == "gemma3" {
                for s in ["attn_q_norm", "attn_k_norm"] {
                    put(
                        p(&format!("{s}.weight")),
                        vec![HD as u64],
                        rng.vec(HD, 0.3).iter().map(|v| 1.0 + v).collect(),
                    );
                }
                for s in ["post_attention_norm", "post_ffw_norm"] {
                    put(
                        p(&format!("{s}.weight")),
                        vec![D as u64],
                        rng.vec(D, 0.3).iter().map(|v| 1.0 + v).collect(),
                    );
                }
            }
        }
        put(
            "output.weight".into(),
            vec![D as u64, VOCAB as u64],
            rng.vec(D * VOCAB, 0.5),
        );
        Tiny { arch, tensors: t }
    }

    fn bytes(&self) -> Vec<u8> {
        let a = self.arch;
        let mut w = GgufWriter::new();
        w.add("general.architecture", Value::String(a.into()));
        w.add(format!("{a}.block_count"), Value::U32(N_LAYER as u32));
        w.add(format!("{a}.context_length"), Value::U32(64));
        w.add(format!("{a}.embedding_length"), Value::U32(D as u32));
        w.add(format!("{a}.feed_forward_length"), Value::U32(FF as u32));
        w.add(
            format!("{a}.attention.head_count"),
            Value::U32(N_HEAD as u32),
        );
        w.add(
            format!("{a}.attention.head_count_kv"),
            Value::U32(N_HEAD_KV as u32),
        );
        w.add(
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        );
        if a == "gemma3" {
            w.add("gemma3.attention.key_length", Value::U32(HD as u32));
            w.add("gemma3.attention.value_length", Value::U32(HD as u32));
            w.add("gemma3.attention.sliding_window", Value::U32(4));
        }
        for (name, (dims, v)) in &self.tensors {
            w.add_tensor(name.clone(), dims, GgmlType::F32, f32_bytes(v))
                .unwrap();
        }
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    fn file(&self) -> Arc<GgufFile> {
        Arc::new(GgufFile::from_bytes(self.bytes()).unwrap())
    }

    fn model(&self) -> Box<dyn Model> {
        load_model(self.file()).unwrap()
    }
}

/// A random adapter's A `(rank, n_in)` and B `(n_out, rank)` per (layer, projection), values
/// already rounded to f16.
/// Per (layer, projection): A, B, n_in, n_out.
type Pairs = BTreeMap<(usize, Proj), (Vec<f32>, Vec<f32>, usize, usize)>;

struct RandAdapter {
    rank: usize,
    alpha: f32,
    layers: usize,
    pairs: Pairs,
}

fn round16(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect()
}

impl RandAdapter {
    fn new(
        shapes: &dyn Fn(usize, Proj) -> (usize, usize),
        layers: usize,
        rank: usize,
        alpha: f32,
        seed: u64,
        amp_a: f32,
        amp_b: f32,
    ) -> Self {
        let mut rng = Rng(seed);
        let mut pairs = BTreeMap::new();
        for il in 0..layers {
            for p in Proj::ALL {
                let (ni, no) = shapes(il, p);
                let a = round16(rng.vec(rank * ni, amp_a));
                let b = round16(rng.vec(no * rank, amp_b));
                pairs.insert((il, p), (a, b, ni, no));
            }
        }
        RandAdapter {
            rank,
            alpha,
            layers,
            pairs,
        }
    }

    fn writer(&self, arch: &str) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add("general.architecture", Value::String(arch.into()));
        w.add("general.type", Value::String("adapter".into()));
        w.add("adapter.type", Value::String("lora".into()));
        w.add("adapter.lora.alpha", Value::F32(self.alpha));
        for ((il, p), (a, b, ni, no)) in &self.pairs {
            let stem = format!("blk.{il}.{}.weight", p.gguf_name());
            w.add_tensor(
                format!("{stem}.lora_a"),
                &[*ni as u64, self.rank as u64],
                GgmlType::F16,
                f16_bytes(a),
            )
            .unwrap();
            w.add_tensor(
                format!("{stem}.lora_b"),
                &[self.rank as u64, *no as u64],
                GgmlType::F16,
                f16_bytes(b),
            )
            .unwrap();
        }
        w
    }

    fn gguf_bytes(&self, arch: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.writer(arch).write_to(&mut out).unwrap();
        out
    }

    fn load(&self, arch: &str, base: &BaseShapes) -> Arc<LoraAdapter> {
        let f = GgufFile::from_bytes(self.gguf_bytes(arch)).unwrap();
        Arc::new(LoraAdapter::from_gguf(&f, Path::new("rand.gguf"), Some(base)).unwrap())
    }

    /// `W + scale·(alpha/rank)·B·A` folded into a copy of the tiny model.
    fn merged_into(&self, m: &Tiny, scale: f32) -> Tiny {
        let mut t = Tiny {
            arch: m.arch,
            tensors: m.tensors.clone(),
        };
        let s = scale * self.alpha / self.rank as f32;
        for ((il, p), (a, b, ni, no)) in &self.pairs {
            let w = &mut t
                .tensors
                .get_mut(&format!("blk.{il}.{}.weight", p.gguf_name()))
                .unwrap()
                .1;
            for o in 0..*no {
                for i in 0..*ni {
                    let mut d = 0f64;
                    for j in 0..self.rank {
                        d += b[o * self.rank + j] as f64 * a[j * ni + i] as f64;
                    }
                    w[o * ni + i] += s * d as f32;
                }
            }
        }
        let _ = self.layers;
        t
    }
}

fn tiny_adapter(rank: usize, seed: u64) -> RandAdapter {
    RandAdapter::new(
        &|_, p| proj_shape(p),
        N_LAYER,
        rank,
        2.0 * rank as f32,
        seed,
        0.3,
        0.3,
    )
}

fn run(model: &dyn Model, tokens: &[u32], mods: &[ModuleRef]) -> Vec<f32> {
    let mut cache = model.new_cache(64);
    let lists: Vec<&[ModuleRef]> = vec![mods];
    model
        .forward_seqs_with(&[tokens], &mut [&mut cache], Logits::All, &lists)
        .unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

const TOKENS: [u32; 10] = [3, 17, 42, 8, 8, 55, 1, 30, 29, 60];

// ---------------------------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------------------------

/// The adapter's logits equal a dense model with `W + s·(alpha/r)·B·A` (F32 weights, so the only
/// differences are the low-rank path's f16 rounding of x and of the rank vector), prefill and
/// token-by-token, and the adapter moves the logits far more than that tolerance.
#[test]
fn adapter_equals_dense_merged_weights() {
    for arch in ["qwen2", "gemma3"] {
        let tiny = Tiny::new(arch, 7);
        let model = tiny.model();
        let ad = tiny_adapter(4, 99);
        let lora = ad.load(arch, model.module_shapes());
        assert_eq!(lora.n_tensors(), N_LAYER * 7);
        let scale = 0.7;
        let merged = ad.merged_into(&tiny, scale).model();
        let want = run(merged.as_ref(), &TOKENS, &[]);
        let got = run(model.as_ref(), &TOKENS, &[(lora.clone(), scale)]);
        let base = run(model.as_ref(), &TOKENS, &[]);
        let scale_l = max_abs(&want);
        let err = max_diff(&got, &want) / scale_l;
        let moved = max_diff(&base, &want) / scale_l;
        eprintln!("{arch}: adapter vs dense merge: rel err {err:.2e}; the adapter moves logits by {moved:.2e}");
        assert!(err < 1e-2, "{arch}: rel err {err}");
        assert!(
            moved > 10.0 * 1e-2,
            "{arch}: adapter too weak to test ({moved})"
        );
        // Token by token through the cache (single-token path) agrees too.
        let mut cache = model.new_cache(64);
        let mods: Vec<ModuleRef> = vec![(lora.clone(), scale)];
        let mut rows = Vec::new();
        for t in TOKENS {
            rows.extend(
                model
                    .forward_seqs_with(&[&[t]], &mut [&mut cache], Logits::All, &[&mods])
                    .unwrap(),
            );
        }
        let err1 = max_diff(&rows, &want) / scale_l;
        assert!(err1 < 1e-2, "{arch}: token-by-token rel err {err1}");
    }
}

/// Two modules at once add both updates; duplicates of one adapter add their scales.
#[test]
fn several_modules_sum() {
    let tiny = Tiny::new("qwen2", 3);
    let model = tiny.model();
    let (a, b) = (tiny_adapter(4, 1), tiny_adapter(8, 2));
    let (la, lb) = (
        a.load("qwen2", model.module_shapes()),
        b.load("qwen2", model.module_shapes()),
    );
    let merged = b.merged_into(&a.merged_into(&tiny, 0.5), -0.8).model();
    let want = run(merged.as_ref(), &TOKENS, &[]);
    let got = run(
        model.as_ref(),
        &TOKENS,
        &[(la.clone(), 0.5), (lb.clone(), -0.8)],
    );
    assert!(max_diff(&got, &want) / max_abs(&want) < 1e-2);
    let twice = run(
        model.as_ref(),
        &TOKENS,
        &[(la.clone(), 0.25), (la.clone(), 0.25)],
    );
    let once = run(model.as_ref(), &TOKENS, &[(la, 0.5)]);
    assert_eq!(twice, once);
}

#[test]
fn scale_zero_is_the_base_bit_for_bit_synthetic() {
    for arch in ["qwen2", "gemma3"] {
        let tiny = Tiny::new(arch, 11);
        let model = tiny.model();
        let lora = tiny_adapter(4, 5).load(arch, model.module_shapes());
        let base = run(model.as_ref(), &TOKENS, &[]);
        assert_eq!(run(model.as_ref(), &TOKENS, &[(lora.clone(), 0.0)]), base);
        assert_ne!(run(model.as_ref(), &TOKENS, &[(lora, 1.0)]), base);
    }
}

/// Eight sequences (different lengths) with eight different random rank-16 modules on every
/// projection of the real Qwen model: prefill and greedy decoding together give exactly the
/// logits and tokens each sequence gets alone, and the modules really differ in their output.
#[test]
fn batch_of_eight_modules_equals_alone_real_model() {
    let file = Arc::new(GgufFile::open(common::model_path("qwen2.5-coder-0.5b-instruct")).unwrap());
    let model = load_model(file).unwrap();
    let base = model.module_shapes().clone();
    let mods: Vec<Arc<LoraAdapter>> = (0..8)
        .map(|i| {
            let ad = RandAdapter::new(
                &|il, p| base.layers[il][p.index()].unwrap(),
                base.n_layer(),
                16,
                16.0,
                1000 + i,
                0.08,
                0.02,
            );
            ad.load("qwen2", &base)
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            (0..(3 + i * 2))
                .map(|k| 100 + (k * 37 + i * 101) as u32 % 5000)
                .collect()
        })
        .collect();
    let lists: Vec<Vec<ModuleRef>> = (0..8)
        .map(|i| {
            if i == 7 {
                // the last one uses two modules at once
                vec![(mods[7].clone(), 1.0), (mods[0].clone(), 0.5)]
            } else {
                vec![(mods[i].clone(), 0.5 + 0.25 * i as f32)]
            }
        })
        .collect();
    let steps = 6;
    let greedy_alone = |i: usize| -> (Vec<u32>, Vec<Vec<f32>>) {
        let mut cache = model.new_cache(128);
        let l: Vec<&[ModuleRef]> = vec![&lists[i]];
        let mut logits = model
            .forward_seqs_with(&[&prompts[i]], &mut [&mut cache], Logits::Last, &l)
            .unwrap();
        let (mut ids, mut all) = (vec![], vec![]);
        for _ in 0..steps {
            let id = modu_engine::sampling::argmax(&logits);
            ids.push(id);
            all.push(logits);
            logits = model
                .forward_seqs_with(&[&[id]], &mut [&mut cache], Logits::Last, &l)
                .unwrap();
        }
        (ids, all)
    };
    let alone: Vec<_> = (0..8).map(greedy_alone).collect();
    // Together.
    let mut caches: Vec<KvCache> = (0..8).map(|_| model.new_cache(128)).collect();
    let l: Vec<&[ModuleRef]> = lists.iter().map(|v| v.as_slice()).collect();
    let toks: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let mut cr: Vec<&mut KvCache> = caches.iter_mut().collect();
    let mut logits = model
        .forward_seqs_with(&toks, &mut cr, Logits::Last, &l)
        .unwrap();
    let nv = model.info().n_vocab;
    let mut ids: Vec<Vec<u32>> = vec![vec![]; 8];
    for step in 0..steps {
        let mut next = vec![];
        for i in 0..8 {
            let row = &logits[i * nv..(i + 1) * nv];
            assert!(
                row == alone[i].1[step].as_slice(),
                "sequence {i} step {step}: batched logits differ from alone"
            );
            let id = modu_engine::sampling::argmax(row);
            ids[i].push(id);
            next.push([id]);
        }
        let toks: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let mut cr: Vec<&mut KvCache> = caches.iter_mut().collect();
        logits = model
            .forward_seqs_with(&toks, &mut cr, Logits::Last, &l)
            .unwrap();
    }
    for i in 0..8 {
        assert_eq!(ids[i], alone[i].0, "sequence {i}");
    }
    // The modules matter: the same prompt under module 0 and module 1 gives different logits.
    let p = &prompts[0];
    let l0 = run(model.as_ref(), p, &[(mods[0].clone(), 1.0)]);
    let l1 = run(model.as_ref(), p, &[(mods[1].clone(), 1.0)]);
    let lb = run(model.as_ref(), p, &[]);
    assert!(max_diff(&l0, &l1) > 0.05 && max_diff(&l0, &lb) > 0.05);
    // Through the BatchSeq entry point too.
    let mut c1 = model.new_cache(128);
    let mut c2 = model.new_cache(128);
    let mut seqs = vec![
        modu_engine::BatchSeq {
            tokens: &prompts[1],
            cache: &mut c1,
        },
        modu_engine::BatchSeq {
            tokens: &prompts[2],
            cache: &mut c2,
        },
    ];
    let out = model
        .forward_batch_with(&mut seqs, &[&lists[1], &[]])
        .unwrap();
    assert!(out[0] == alone[1].1[0]);
    let mut c3 = model.new_cache(128);
    assert!(out[1] == model.forward(&prompts[2], &mut c3, Logits::Last).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Malformed adapters
// ---------------------------------------------------------------------------------------------

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("modu-lora-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn base_tiny() -> (Tiny, BaseShapes) {
    let t = Tiny::new("qwen2", 21);
    let shapes = BaseShapes::from_gguf(&t.file()).unwrap();
    (t, shapes)
}

/// Load an adapter built by `edit` from a valid one, via a file (as `modu run --module` does).
fn gguf_case(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>, &mut Vec<(String, Value)>),
) -> LoraError {
    let (_, base) = base_tiny();
    let ad = tiny_adapter(4, 8);
    let mut tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = vec![];
    for ((il, p), (a, b, ni, no)) in &ad.pairs {
        let stem = format!("blk.{il}.{}.weight", p.gguf_name());
        tensors.push((
            format!("{stem}.lora_a"),
            vec![*ni as u64, 4],
            GgmlType::F16,
            f16_bytes(a),
        ));
        tensors.push((
            format!("{stem}.lora_b"),
            vec![4, *no as u64],
            GgmlType::F16,
            f16_bytes(b),
        ));
    }
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("qwen2".into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(8.0)),
    ];
    edit(&mut tensors, &mut md);
    let mut w = GgufWriter::new();
    for (k, v) in md {
        w.add(k, v);
    }
    for (n, d, t, b) in tensors {
        w.add_tensor(n, &d, t, b).unwrap();
    }
    let path = tmpdir(name).join("adapter.gguf");
    w.write_file(&path).unwrap();
    LoraAdapter::open(&path, Some(&base)).expect_err(name)
}

#[test]
fn valid_gguf_adapter_loads() {
    let (_, base) = base_tiny();
    let ad = tiny_adapter(4, 8);
    let path = tmpdir("valid").join("adapter.gguf");
    ad.writer("qwen2").write_file(&path).unwrap();
    let l = LoraAdapter::open(&path, Some(&base)).unwrap();
    assert_eq!((l.rank(), l.alpha(), l.n_tensors()), (4, 8.0, 14));
    assert_eq!(l.targets(), Proj::ALL.to_vec());
    let want: usize = Proj::ALL
        .iter()
        .map(|&p| {
            let (i, o) = proj_shape(p);
            (i + o) * 4 * 2
        })
        .sum::<usize>()
        * N_LAYER;
    assert_eq!(l.resident_bytes(), want);
}

#[test]
fn missing_b_is_named() {
    let e = gguf_case("missing-b", |t, _| {
        t.retain(|x| x.0 != "blk.1.attn_v.weight.lora_b")
    });
    assert!(
        matches!(&e, LoraError::MissingPair { name, missing } if name == "blk.1.attn_v.weight.lora_a" && missing == "blk.1.attn_v.weight.lora_b"),
        "{e}"
    );
}

#[test]
fn rank_mismatch_is_named() {
    let e = gguf_case("rank", |t, _| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blk.0.ffn_up.weight.lora_b")
            .unwrap();
        x.1 = vec![5, FF as u64];
        x.3 = vec![0u8; 5 * FF * 2];
    });
    assert!(
        matches!(&e, LoraError::RankMismatch { name, expected: 4, got: 5, .. } if name == "blk.0.ffn_up.weight.lora_b"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_against_the_base_is_named() {
    let e = gguf_case("shape", |t, _| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blk.0.attn_q.weight.lora_a")
            .unwrap();
        x.1 = vec![32, 4];
        x.3 = vec![0u8; 32 * 4 * 2];
    });
    assert!(
        matches!(&e, LoraError::ShapeMismatch { name, .. } if name == "blk.0.attn_q.weight.lora_a"),
        "{e}"
    );
    assert!(e.to_string().contains("wrong base model?"), "{e}");
}

#[test]
fn wrong_architecture() {
    let e = gguf_case("arch", |_, md| md[0].1 = Value::String("llama".into()));
    assert!(
        matches!(&e, LoraError::ArchMismatch { adapter, base } if adapter == "llama" && base == "qwen2"),
        "{e}"
    );
    assert!(e.to_string().contains("wrong base model?"));
}

#[test]
fn layer_out_of_range() {
    let e = gguf_case("layer", |t, _| {
        for x in t.iter_mut().filter(|x| x.0.starts_with("blk.1.ffn_down")) {
            x.0 = x.0.replace("blk.1.", "blk.7.");
        }
    });
    assert!(
        matches!(
            &e,
            LoraError::LayerOutOfRange {
                layer: 7,
                n_layer: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_dtype() {
    let e = gguf_case("dtype", |t, _| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blk.0.attn_k.weight.lora_a")
            .unwrap();
        x.2 = GgmlType::I32;
        x.3 = vec![0u8; D * 4 * 4];
    });
    assert!(
        matches!(&e, LoraError::BadDtype { name, .. } if name == "blk.0.attn_k.weight.lora_a"),
        "{e}"
    );
}

#[test]
fn unknown_tensor_name() {
    let e = gguf_case("unknown", |t, _| {
        t.push((
            "token_embd.weight.lora_a".into(),
            vec![D as u64, 4],
            GgmlType::F16,
            vec![0u8; D * 8],
        ))
    });
    assert!(
        matches!(&e, LoraError::UnknownTensor { name } if name == "token_embd.weight.lora_a"),
        "{e}"
    );
}

#[test]
fn not_lora_and_no_tensors_and_nan() {
    let e = gguf_case("notlora", |_, md| {
        md[2].1 = Value::String("control_vector".into())
    });
    assert!(matches!(e, LoraError::NotLora { .. }), "{e}");
    let e = gguf_case("empty", |t, _| t.clear());
    assert!(matches!(e, LoraError::Empty), "{e}");
    let e = gguf_case("nan", |t, _| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blk.1.ffn_gate.weight.lora_b")
            .unwrap();
        x.3[0..2].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
    });
    assert!(
        matches!(&e, LoraError::NonFinite { name } if name == "blk.1.ffn_gate.weight.lora_b"),
        "{e}"
    );
    let e = gguf_case("alpha", |_, md| md[3].1 = Value::String("sixteen".into()));
    assert!(matches!(e, LoraError::BadMetadata { .. }), "{e}");
}

#[test]
fn truncated_file() {
    let (_, base) = base_tiny();
    let bytes = tiny_adapter(4, 8).gguf_bytes("qwen2");
    let path = tmpdir("trunc").join("adapter.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = LoraAdapter::open(&path, Some(&base)).unwrap_err();
    assert!(matches!(e, LoraError::Gguf { .. }), "{e}");
}

#[test]
fn a_base_model_is_not_an_adapter() {
    let (tiny, base) = base_tiny();
    let path = tmpdir("base").join("model.gguf");
    std::fs::write(&path, tiny.bytes()).unwrap();
    let e = LoraAdapter::open(&path, Some(&base)).unwrap_err();
    assert!(matches!(e, LoraError::NotAdapter { got: None, .. }), "{e}");
    let e = LoraAdapter::open(path.with_file_name("nope.gguf"), Some(&base)).unwrap_err();
    assert!(matches!(e, LoraError::Io { .. }), "{e}");
    let txt = path.with_file_name("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert!(matches!(
        LoraAdapter::open(&txt, Some(&base)).unwrap_err(),
        LoraError::UnknownFormat { .. }
    ));
}

/// An adapter loaded without a base (e.g. for `modu module info`) is still checked against the
/// model before a forward pass.
#[test]
fn forward_checks_an_unvalidated_adapter() {
    let tiny = Tiny::new("qwen2", 2);
    let model = tiny.model();
    let other = RandAdapter::new(
        &|_, p| {
            let (i, o) = proj_shape(p);
            (i * 2, o)
        },
        1,
        4,
        4.0,
        3,
        0.1,
        0.1,
    );
    let f = GgufFile::from_bytes(other.gguf_bytes("qwen2")).unwrap();
    let l = Arc::new(LoraAdapter::from_gguf(&f, Path::new("x.gguf"), None).unwrap());
    let mut cache = model.new_cache(16);
    let mods: Vec<ModuleRef> = vec![(l, 1.0)];
    let e = model
        .forward_seqs_with(&[&[1, 2]], &mut [&mut cache], Logits::Last, &[&mods])
        .unwrap_err();
    assert!(
        matches!(e, ModelError::Module(LoraError::ShapeMismatch { .. })),
        "{e}"
    );
    assert_eq!(cache.len(), 0, "nothing cached on a rejected module");
    // A module list per sequence, or none.
    let e = model
        .forward_seqs_with(&[&[1, 2]], &mut [&mut cache], Logits::Last, &[&[], &[]])
        .unwrap_err();
    assert!(matches!(e, ModelError::Module(_)), "{e}");
}

// PEFT --------------------------------------------------------------------------------------

/// Write a safetensors file by hand: `(name, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (n, dt, shape, b) in tensors {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + b.len()]}),
        );
        off += b.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() & 7 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, b) in tensors {
        out.extend(b);
    }
    std::fs::write(path, out).unwrap();
}

fn peft_dir(
    name: &str,
    config: &str,
    edit: impl FnOnce(&mut Vec<(String, &'static str, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let ad = tiny_adapter(4, 8);
    let mut t: Vec<(String, &'static str, Vec<usize>, Vec<u8>)> = vec![];
    for ((il, p), (a, b, ni, no)) in &ad.pairs {
        let m = if matches!(p, Proj::Gate | Proj::Up | Proj::Down) {
            "mlp"
        } else {
            "self_attn"
        };
        let stem = format!("base_model.model.model.layers.{il}.{m}.{}", p.hf_name());
        t.push((
            format!("{stem}.lora_A.weight"),
            "F32",
            vec![4, *ni],
            f32_bytes(a),
        ));
        t.push((
            format!("{stem}.lora_B.weight"),
            "BF16",
            vec![*no, 4],
            b.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        ));
    }
    edit(&mut t);
    let d = tmpdir(name);
    std::fs::write(d.join("adapter_config.json"), config).unwrap();
    if !t.is_empty() {
        write_safetensors(&d.join("adapter_model.safetensors"), &t);
    }
    d
}

const CONFIG: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
  "target_modules": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}"#;

#[test]
fn peft_import_matches_gguf_import() {
    let (tiny, base) = base_tiny();
    let model = tiny.model();
    let dir = peft_dir("peft-ok", CONFIG, |_| {});
    let p = Arc::new(LoraAdapter::open(&dir, Some(&base)).unwrap());
    let g = tiny_adapter(4, 8).load("qwen2", &base);
    assert_eq!(p.n_tensors(), g.n_tensors());
    // A is f32 in the file, B bf16: B values differ by bf16 rounding, so compare loosely.
    let lp = run(model.as_ref(), &TOKENS, &[(p.clone(), 1.0)]);
    let lg = run(model.as_ref(), &TOKENS, &[(g, 1.0)]);
    assert!(max_diff(&lp, &lg) / max_abs(&lg) < 2e-2);
    // rsLoRA scales by alpha/sqrt(r) = 4: at scale 1 it equals plain LoRA (alpha/r = 2) at scale 2.
    let rs = peft_dir(
        "peft-rs",
        &CONFIG.replace("\"use_rslora\": false", "\"use_rslora\": true"),
        |_| {},
    );
    let prs = Arc::new(LoraAdapter::open(&rs, Some(&base)).unwrap());
    let a = run(model.as_ref(), &TOKENS, &[(prs, 1.0)]);
    let b = run(model.as_ref(), &TOKENS, &[(p, 2.0)]);
    assert!(max_diff(&a, &b) / max_abs(&b) < 1e-5);
    // The safetensors file may be named directly.
    assert!(LoraAdapter::open(dir.join("adapter_model.safetensors"), Some(&base)).is_ok());
}

#[test]
fn peft_malformed() {
    let (_, base) = base_tiny();
    let open = |d: &Path| LoraAdapter::open(d, Some(&base)).unwrap_err();
    let e = open(&peft_dir("p-json", "{ not json", |_| {}));
    assert!(
        matches!(&e, LoraError::BadConfig { reason, .. } if reason.contains("not JSON")),
        "{e}"
    );
    let e = open(&peft_dir("p-r", r#"{"r": 0, "lora_alpha": 8}"#, |_| {}));
    assert!(
        matches!(&e, LoraError::BadConfig { reason, .. } if reason.contains("'r'")),
        "{e}"
    );
    let e = open(&peft_dir(
        "p-type",
        r#"{"peft_type": "IA3", "r": 4}"#,
        |_| {},
    ));
    assert!(matches!(e, LoraError::BadConfig { .. }), "{e}");
    let e = open(&peft_dir("p-missing", CONFIG, |t| t.clear()));
    assert!(
        matches!(&e, LoraError::Io { path, .. } if path.ends_with("adapter_model.safetensors")),
        "{e}"
    );
    let e = open(&peft_dir(
        "p-rank",
        &CONFIG.replace("\"r\": 4", "\"r\": 8"),
        |_| {},
    ));
    assert!(
        matches!(
            e,
            LoraError::RankMismatch {
                expected: 8,
                got: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = open(&peft_dir("p-dtype", CONFIG, |t| {
        t[0].1 = "I32";
    }));
    assert!(matches!(e, LoraError::BadDtype { .. }), "{e}");
    let e = open(&peft_dir("p-pair", CONFIG, |t| {
        t.retain(|x| !x.0.contains("layers.1.mlp.down_proj.lora_A"))
    }));
    assert!(
        matches!(&e, LoraError::MissingPair { name, .. } if name.contains("layers.1.mlp.down_proj.lora_B")),
        "{e}"
    );
    let e = open(&peft_dir(
        "p-target",
        &CONFIG.replace("\"down_proj\"", "\"lm_head\""),
        |_| {},
    ));
    assert!(matches!(e, LoraError::Unsupported(_)), "{e}");
    let e = open(&peft_dir("p-layer", CONFIG, |t| {
        for x in t.iter_mut().filter(|x| x.0.contains("layers.1.")) {
            x.0 = x.0.replace("layers.1.", "layers.9.");
        }
    }));
    assert!(
        matches!(e, LoraError::LayerOutOfRange { layer: 9, .. }),
        "{e}"
    );
    let d = peft_dir("p-garbage", CONFIG, |_| {});
    std::fs::write(
        d.join("adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage",
    )
    .unwrap();
    assert!(matches!(open(&d), LoraError::Safetensors { .. }));
    let e = open(&peft_dir(
        "p-dora",
        &CONFIG.replace("\"use_rslora\": false", "\"use_dora\": true"),
        |_| {},
    ));
    assert!(matches!(e, LoraError::BadConfig { .. }), "{e}");
}

// Merging and export ---------------------------------------------------------------------------

/// `linear` merges exactly (up to f16 rounding of the folded scales), survives a GGUF round trip,
/// and TIES/DARE at density 1 of a single adapter re-factor it to the same update.
#[test]
fn merges_and_export() {
    use modu_engine::lora::merge;
    let tiny = Tiny::new("qwen2", 5);
    let model = tiny.model();
    let base = model.module_shapes();
    let (la, lb) = (
        tiny_adapter(4, 1).load("qwen2", base),
        tiny_adapter(8, 2).load("qwen2", base),
    );
    let both = run(
        model.as_ref(),
        &TOKENS,
        &[(la.clone(), 1.0), (lb.clone(), 0.5)],
    );
    let lin = merge::linear(&[&la, &lb], &[1.0, 0.5], "lin").unwrap();
    assert_eq!(lin.rank(), 12);
    let path = tmpdir("merge").join("lin.gguf");
    lin.to_gguf("qwen2").unwrap().write_file(&path).unwrap();
    let reread = Arc::new(LoraAdapter::open(&path, Some(base)).unwrap());
    let lin = Arc::new(lin);
    let got = run(model.as_ref(), &TOKENS, &[(lin.clone(), 1.0)]);
    let err = max_diff(&got, &both) / max_abs(&both);
    assert!(err < 5e-3, "linear merge rel err {err}");
    assert_eq!(
        run(model.as_ref(), &TOKENS, &[(reread, 1.0)]),
        got,
        "GGUF round trip"
    );

    let one = run(model.as_ref(), &TOKENS, &[(la.clone(), 1.0)]);
    for how in [
        merge::Dense::Ties { density: 1.0 },
        merge::Dense::Dare {
            density: 1.0,
            seed: 3,
        },
    ] {
        let m = Arc::new(merge::dense(&[&la], &[1.0], how, 4, "d").unwrap());
        let got = run(model.as_ref(), &TOKENS, &[(m, 1.0)]);
        let err = max_diff(&got, &one) / max_abs(&one);
        assert!(err < 1e-2, "{how:?}: rel err {err}");
    }
    // TIES/DARE at lower density still give a valid adapter of the asked rank.
    let t = merge::dense(
        &[&la, &lb],
        &[0.5, 0.5],
        merge::Dense::Ties { density: 0.3 },
        6,
        "t",
    )
    .unwrap();
    assert_eq!(t.rank(), 6);
    assert!(merge::dense(
        &[&la],
        &[1.0],
        merge::Dense::Dare {
            density: 0.0,
            seed: 1
        },
        4,
        "x"
    )
    .is_err());
    assert!(merge::linear(&[&la, &lb], &[1.0], "x").is_err());

    // Folding into the base: F32 weights stay F32 and the model equals base + module.
    let file = tiny.file();
    let ex = merge::merge_into_base(&file, &la, 0.8).unwrap();
    assert!(ex
        .conversions
        .iter()
        .all(|c| c.0 == GgmlType::F32 && c.1 == GgmlType::F32));
    let mut bytes = Vec::new();
    ex.writer.write_to(&mut bytes).unwrap();
    let merged = load_model(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap();
    let want = run(model.as_ref(), &TOKENS, &[(la, 0.8)]);
    let got = run(merged.as_ref(), &TOKENS, &[]);
    let err = max_diff(&got, &want) / max_abs(&want);
    assert!(err < 1e-2, "export rel err {err}");
}

/// PEFT Q/K updates for a `llama` base are in Hugging Face row order; GGUF permutes Q/K rows for
/// its interleaved RoPE, and the loader must apply the same permutation to `B`. A PEFT adapter
/// written in HF order equals the GGUF adapter written in GGUF order, bit for bit.
#[test]
fn peft_llama_qk_rows_are_permuted() {
    let tiny = Tiny::new("llama", 13);
    let model = tiny.model();
    let base = model.module_shapes().clone();
    let ad = tiny_adapter(4, 31);
    let g = ad.load("llama", &base);
    let mut t: Vec<(String, &'static str, Vec<usize>, Vec<u8>)> = vec![];
    for ((il, p), (a, b, ni, no)) in &ad.pairs {
        // Undo GGUF's permutation: GGUF row h·hd + 2i + s holds HF row h·hd + s·hd/2 + i.
        let heads = match p {
            Proj::Q => Some(N_HEAD),
            Proj::K => Some(N_HEAD_KV),
            _ => None,
        };
        let mut hf = b.clone();
        if let Some(nh) = heads {
            let hd = no / nh;
            for h in 0..nh {
                for i in 0..hd / 2 {
                    for s in 0..2 {
                        let (g_row, hf_row) = (h * hd + 2 * i + s, h * hd + s * hd / 2 + i);
                        hf[hf_row * 4..(hf_row + 1) * 4]
                            .copy_from_slice(&b[g_row * 4..(g_row + 1) * 4]);
                    }
                }
            }
        }
        let m = if matches!(p, Proj::Gate | Proj::Up | Proj::Down) {
            "mlp"
        } else {
            "self_attn"
        };
        let stem = format!("base_model.model.model.layers.{il}.{m}.{}", p.hf_name());
        t.push((
            format!("{stem}.lora_A.weight"),
            "F32",
            vec![4, *ni],
            f32_bytes(a),
        ));
        t.push((
            format!("{stem}.lora_B.weight"),
            "F32",
            vec![*no, 4],
            f32_bytes(&hf),
        ));
    }
    let d = tmpdir("peft-llama");
    std::fs::write(d.join("adapter_config.json"), CONFIG).unwrap();
    write_safetensors(&d.join("adapter_model.safetensors"), &t);
    let p = Arc::new(LoraAdapter::open(&d, Some(&base)).unwrap());
    assert_eq!(
        run(model.as_ref(), &TOKENS, &[(p, 1.0)]),
        run(model.as_ref(), &TOKENS, &[(g, 1.0)])
    );
    // Opened without its base, the adapter cannot know it needs the permutation: refused.
    let unbased = Arc::new(LoraAdapter::open(&d, None).unwrap());
    let mut cache = model.new_cache(16);
    let mods: Vec<ModuleRef> = vec![(unbased, 1.0)];
    let e = model
        .forward_seqs_with(&[&[1, 2]], &mut [&mut cache], Logits::Last, &[&mods])
        .unwrap_err();
    assert!(
        matches!(e, ModelError::Module(LoraError::Unsupported(_))),
        "{e}"
    );
}
