//! Hugging Face checkpoint → GGUF (`modu quantize DIR OUT`), checked three ways:
//!
//! * **Real model** — the cached Qwen2.5-0.5B GGUF is exported as an f16 HF directory (two
//!   shards + index, config.json, tokenizer.json, tokenizer_config.json with the chat template)
//!   and converted back to an F16 GGUF: same tensors and shapes, every value equal to the f16
//!   rounding of the original, identical tokenizer metadata and token ids on Korean + English
//!   text, the same chat template, and logits close to the original model's.
//! * **Llama's rotary permutation** — a tiny random `LlamaForCausalLM` is converted (Q/K rows
//!   permuted, GGUF `llama` = interleaved RoPE) and its logits are compared with the very same
//!   HF weights written directly as a GGUF `qwen2` model (NeoX / rotate-half RoPE, no
//!   permutation): the two layouts are the same network only if the permutation is right. The
//!   converted model is also exported back and must give the original safetensors bit for bit.
//! * **Bad directories** — missing config, unknown architecture, missing tensor, wrong shape,
//!   bad dtype: a typed error and no output file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use modu_engine::hf::{export_hf, HfDtype, HfError};
use modu_engine::quantize::{quantize_hf_dir, QuantizeError, QuantizeOptions, Recipe};
use modu_engine::{load_model, ChatTemplate, Logits, Model, Tokenizer};
use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use modu_kernels::testutil::Rng;
use serde_json::json;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("modu-hftest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn dequant(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor_info(name).unwrap_or_else(|| panic!("no {name}"));
    let d0 = t.dims[0] as usize;
    let rb = t.ty.row_bytes(t.dims[0]).unwrap() as usize;
    let mut out = vec![0f32; t.n_elements() as usize];
    for (r, o) in out.chunks_mut(d0).enumerate() {
        modu_kernels::dequantize_row(t.ty, &f.tensor_data(t)[r * rb..(r + 1) * rb], o).unwrap();
    }
    out
}

fn logits_all(m: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    let mut c = m.new_cache(tokens.len() + 1);
    m.forward(tokens, &mut c, Logits::All).unwrap()
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let mx = x.iter().cloned().fold(f32::MIN, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - mx).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

#[test]
fn qwen_gguf_to_hf_and_back() {
    let src_path = common::model_path("qwen");
    let src = GgufFile::open(&src_path).unwrap();
    let dir = tmpdir("qwen");
    let hf = dir.join("hf");
    export_hf(&src, &hf, HfDtype::F16, 2).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(hf.join(f).exists(), "{f} missing");
    }
    let out = dir.join("f16.gguf");
    quantize_hf_dir(
        &hf,
        &out,
        Recipe::Plain(GgmlType::F16),
        &QuantizeOptions::default(),
        &|_, _| {},
    )
    .unwrap();
    let g = GgufFile::open(&out).unwrap();

    // Tensors: the same names and shapes; values = the original rounded to f16.
    assert_eq!(g.tensors().len(), src.tensors().len());
    for t in src.tensors() {
        let u = g
            .tensor_info(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(u.dims, t.dims, "{}", t.name);
        let want: Vec<f32> = dequant(&src, &t.name)
            .iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect();
        let got = dequant(&g, &t.name);
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: values differ",
            t.name
        );
    }
    // Metadata: architecture keys and the whole tokenizer.
    for (k, v) in src.metadata() {
        if k.starts_with("qwen2.") || k.starts_with("tokenizer.") {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(g.architecture(), Some("qwen2"));
    let ct = |f: &GgufFile| {
        ChatTemplate::from_gguf(f)
            .unwrap()
            .map(|_| f.get_str("tokenizer.chat_template").unwrap().to_string())
    };
    assert!(ct(&src).is_some());
    assert_eq!(ct(&g), ct(&src));

    // Tokenizer: identical ids on Korean and English text.
    let t0 = Tokenizer::from_gguf(&src).unwrap();
    let t1 = Tokenizer::from_gguf(&g).unwrap();
    let ko =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/constitution_ko_head.txt");
    let mut text =
        std::fs::read_to_string(&ko).unwrap_or_else(|e| panic!("reading {}: {e}", ko.display()));
    text.push_str("\nThe quick brown fox, 1234 <|im_start|>user\n  tabs\tand  spaces 🙂\n");
    let ids0 = t0.encode(&text, true, true).unwrap();
    assert_eq!(t1.encode(&text, true, true).unwrap(), ids0);

    // Logits: the same network, up to f16 weight rounding and the activation types of the
    // matmuls (f16 for F16 weights vs Q8_0/Q8_K for the original's quantized weights).
    let m0 = load_model(Arc::new(src)).unwrap();
    let m1 = load_model(Arc::new(g)).unwrap();
    let toks = &ids0[..48];
    let (l0, l1) = (logits_all(m0.as_ref(), toks), logits_all(m1.as_ref(), toks));
    let nv = m0.info().n_vocab;
    let (mut same, mut clear, mut dp_max) = (0, 0, 0f32);
    for (a, b) in l0.chunks(nv).zip(l1.chunks(nv)) {
        let (pa, pb) = (softmax(a), softmax(b));
        let top = argmax(a);
        dp_max = dp_max.max((pa[top] - pb[top]).abs());
        let mut s = pa.clone();
        s.sort_by(|x, y| y.total_cmp(x));
        if s[0] - s[1] > 0.1 {
            clear += 1;
            same += usize::from(argmax(b) == top);
        }
    }
    eprintln!("top-1 agreement {same}/{clear} clear positions, max |Δp| {dp_max}");
    assert_eq!(same, clear, "argmax differs at a clear position");
    assert!(dp_max < 0.1, "max |Δp| {dp_max}");
    let _ = std::fs::remove_dir_all(&dir);
}

// --- tiny synthetic checkpoints ---------------------------------------------------------------

const D: usize = 64;
const NH: usize = 4;
const NKV: usize = 2;
const HD: usize = 16;
const FF: usize = 128;
const NV: usize = 96;
const NL: usize = 2;

type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Random HF-layout weights of a tiny model.
fn hf_weights(gemma: bool, seed: u64) -> Named {
    let mut rng = Rng::new(seed);
    let mut v: Named = Vec::new();
    let mut add = |n: String, shape: Vec<usize>, scale: f32| {
        let len = shape.iter().product();
        v.push((n, shape, rng.f32s(len, scale)));
    };
    add("model.embed_tokens.weight".into(), vec![NV, D], 1.0);
    for i in 0..NL {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        add(p("input_layernorm.weight"), vec![D], 0.2);
        add(p("self_attn.q_proj.weight"), vec![NH * HD, D], 0.3);
        add(p("self_attn.k_proj.weight"), vec![NKV * HD, D], 0.3);
        add(p("self_attn.v_proj.weight"), vec![NKV * HD, D], 0.3);
        add(p("self_attn.o_proj.weight"), vec![D, NH * HD], 0.3);
        add(p("post_attention_layernorm.weight"), vec![D], 0.2);
        if gemma {
            add(p("self_attn.q_norm.weight"), vec![HD], 0.2);
            add(p("self_attn.k_norm.weight"), vec![HD], 0.2);
            add(p("pre_feedforward_layernorm.weight"), vec![D], 0.2);
            add(p("post_feedforward_layernorm.weight"), vec![D], 0.2);
        }
        add(p("mlp.gate_proj.weight"), vec![FF, D], 0.3);
        add(p("mlp.up_proj.weight"), vec![FF, D], 0.3);
        add(p("mlp.down_proj.weight"), vec![D, FF], 0.3);
    }
    add("model.norm.weight".into(), vec![D], 0.2);
    add("lm_head.weight".into(), vec![NV, D], 0.3);
    if !gemma {
        // Llama norms are used as they are: keep them near 1.
        for (n, _, x) in v.iter_mut() {
            if n.ends_with("norm.weight") {
                x.iter_mut().for_each(|x| *x += 1.0);
            }
        }
    }
    v
}

fn write_safetensors(path: &Path, tensors: &Named, dtype: safetensors::Dtype) {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, x)| {
            let b = match dtype {
                safetensors::Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => x.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
            };
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

fn write_hf_dir(dir: &Path, arch: &str, tensors: &Named) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "architectures": [arch], "hidden_size": D, "intermediate_size": FF,
        "num_hidden_layers": NL, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "head_dim": HD, "vocab_size": NV, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "sliding_window": 4, "query_pre_attn_scalar": HD,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..NV - 1).map(|i| (format!("t{i}"), json!(i))).collect();
    let tok = json!({
        "added_tokens": [{"id": NV - 1, "content": "<|end|>", "special": true}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|end|>", "chat_template": "{{ messages }}"}).to_string(),
    )
    .unwrap();
    write_safetensors(
        &dir.join("model.safetensors"),
        tensors,
        safetensors::Dtype::F32,
    );
}

/// The HF weights written directly as a GGUF `qwen2` model (no permutation: NeoX RoPE).
fn direct_qwen2(path: &Path, tensors: &Named) {
    let mut w = GgufWriter::new();
    w.add("general.architecture", Value::String("qwen2".into()));
    w.add("qwen2.context_length", Value::U32(64));
    w.add("qwen2.embedding_length", Value::U32(D as u32));
    w.add("qwen2.block_count", Value::U32(NL as u32));
    w.add("qwen2.feed_forward_length", Value::U32(FF as u32));
    w.add("qwen2.attention.head_count", Value::U32(NH as u32));
    w.add("qwen2.attention.head_count_kv", Value::U32(NKV as u32));
    w.add("qwen2.rope.freq_base", Value::F32(10000.0));
    w.add("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
    let name = |hf: &str| -> String {
        let m: HashMap<&str, &str> = [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ]
        .into();
        match hf {
            "model.embed_tokens.weight" => "token_embd.weight".into(),
            "model.norm.weight" => "output_norm.weight".into(),
            "lm_head.weight" => "output.weight".into(),
            _ => {
                let rest = hf.strip_prefix("model.layers.").unwrap();
                let (i, r) = rest.split_once('.').unwrap();
                format!("blk.{i}.{}", m[r])
            }
        }
    };
    for (n, s, x) in tensors {
        let dims: Vec<u64> = s.iter().rev().map(|&d| d as u64).collect();
        w.add_tensor(
            name(n),
            &dims,
            GgmlType::F32,
            x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
    }
    w.write_file(path).unwrap();
}

fn convert(dir: &Path, out: &Path) -> Result<(), QuantizeError> {
    quantize_hf_dir(
        dir,
        out,
        Recipe::Plain(GgmlType::F32),
        &QuantizeOptions::default(),
        &|_, _| {},
    )
    .map(|_| ())
}

#[test]
fn llama_permutation_matches_rotate_half() {
    let dir = tmpdir("llama");
    let w = hf_weights(false, 7);
    let hf = dir.join("hf");
    write_hf_dir(&hf, "LlamaForCausalLM", &w);
    let conv = dir.join("llama.gguf");
    convert(&hf, &conv).unwrap();
    let direct = dir.join("qwen2.gguf");
    direct_qwen2(&direct, &w);

    let g = GgufFile::open(&conv).unwrap();
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(
        g.get_u64("tokenizer.ggml.eos_token_id"),
        Some(NV as u64 - 1)
    );
    assert_eq!(g.get_str("tokenizer.chat_template"), Some("{{ messages }}"));
    // Q rows really were permuted (otherwise the comparison below would prove nothing).
    assert_ne!(
        dequant(&g, "blk.0.attn_q.weight"),
        w.iter()
            .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .2
    );
    let m_llama = load_model(Arc::new(g)).unwrap();
    let m_qwen = load_model(Arc::new(GgufFile::open(&direct).unwrap())).unwrap();
    let toks: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % NV as u32).collect();
    let (a, b) = (
        logits_all(m_llama.as_ref(), &toks),
        logits_all(m_qwen.as_ref(), &toks),
    );
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("llama (permuted) vs qwen2 (rotate-half): max |Δlogit| {diff} of {scale}");
    assert!(diff < 1e-3 * scale, "max |Δlogit| {diff} (scale {scale})");

    // Export back: the original HF tensors, bit for bit.
    let back = dir.join("back");
    export_hf(&GgufFile::open(&conv).unwrap(), &back, HfDtype::F32, 1).unwrap();
    let bytes = std::fs::read(back.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (n, s, x) in &w {
        let v = st.tensor(n).unwrap();
        assert_eq!(v.shape(), s.as_slice(), "{n}");
        let got: Vec<f32> = v
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&got, x, "{n}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3_norms_get_one_added() {
    let dir = tmpdir("gemma");
    let w = hf_weights(true, 9);
    let hf = dir.join("hf");
    write_hf_dir(&hf, "Gemma3ForCausalLM", &w);
    let out = dir.join("g.gguf");
    convert(&hf, &out).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_u64("gemma3.attention.key_length"), Some(HD as u64));
    assert_eq!(g.get_u64("gemma3.attention.sliding_window"), Some(4));
    for (hf_name, gguf) in [
        (
            "model.layers.1.self_attn.q_norm.weight",
            "blk.1.attn_q_norm.weight",
        ),
        (
            "model.layers.0.pre_feedforward_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.post_attention_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        let x = &w.iter().find(|t| t.0 == hf_name).unwrap().2;
        let want: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        assert_eq!(dequant(&g, gguf), want, "{gguf}");
    }
    // Matrices are copied as they are (Gemma GGUFs use rotate-half RoPE).
    let q = &w
        .iter()
        .find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .2;
    assert_eq!(&dequant(&g, "blk.0.attn_q.weight"), q);
    assert!(g.tensor_info("output.weight").is_some());
    let m = load_model(Arc::new(g)).unwrap();
    assert_eq!(m.info().n_vocab, NV);

    // Without lm_head the embedding is tied: no output.weight, and the model still loads.
    let tied = dir.join("tied");
    let w2: Named = w
        .iter()
        .filter(|t| t.0 != "lm_head.weight")
        .cloned()
        .collect();
    write_hf_dir(&tied, "Gemma3ForCausalLM", &w2);
    let out2 = dir.join("tied.gguf");
    convert(&tied, &out2).unwrap();
    let g2 = GgufFile::open(&out2).unwrap();
    assert!(g2.tensor_info("output.weight").is_none());
    load_model(Arc::new(g2)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_directories_give_typed_errors_and_no_output() {
    let dir = tmpdir("bad");
    let out = dir.join("out.gguf");
    let check = |hf: &Path, what: &str, ok: &dyn Fn(&HfError) -> bool| {
        match convert(hf, &out) {
            Err(QuantizeError::Hf(e)) => {
                assert!(ok(&e), "{what}: unexpected error {e}");
                eprintln!("{what}: {e}");
            }
            other => panic!("{what}: expected an HF error, got {other:?}"),
        }
        assert!(!out.exists(), "{what}: output written");
    };
    let w = hf_weights(false, 3);

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    check(
        &empty,
        "missing config",
        &|e| matches!(e, HfError::MissingFile { file, .. } if file == "config.json"),
    );

    let unknown = dir.join("unknown");
    write_hf_dir(&unknown, "MistralForCausalLM", &w);
    check(
        &unknown,
        "unknown arch",
        &|e| matches!(e, HfError::UnknownArch(a) if a == "MistralForCausalLM"),
    );

    let missing = dir.join("missing");
    let w2: Named = w
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    write_hf_dir(&missing, "LlamaForCausalLM", &w2);
    check(
        &missing,
        "missing tensor",
        &|e| matches!(e, HfError::MissingTensor(n) if n == "model.layers.1.mlp.up_proj.weight"),
    );

    let shape = dir.join("shape");
    let mut w3 = w.clone();
    for t in w3.iter_mut() {
        if t.0 == "model.layers.0.self_attn.k_proj.weight" {
            t.1 = vec![NH * HD, D];
            t.2 = vec![0.0; NH * HD * D];
        }
    }
    write_hf_dir(&shape, "LlamaForCausalLM", &w3);
    check(
        &shape,
        "wrong shape",
        &|e| matches!(e, HfError::BadShape { name, .. } if name == "model.layers.0.self_attn.k_proj.weight"),
    );

    let dtype = dir.join("dtype");
    write_hf_dir(&dtype, "LlamaForCausalLM", &w);
    write_safetensors(
        &dtype.join("model.safetensors"),
        &w,
        safetensors::Dtype::I32,
    );
    check(&dtype, "bad dtype", &|e| {
        matches!(e, HfError::BadDtype { .. })
    });

    let not_dir = dir.join("nope");
    check(&not_dir, "not a directory", &|e| {
        matches!(e, HfError::NotADir(_))
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// EXAONE 3.5 and 4.0 (both layouts) through a Hugging Face directory and back: the synthetic
/// models (`modu synth`, without the Llama-3 `rope_freqs`, which has no unique `rope_scaling`
/// to export) written as f32 checkpoints under EXAONE's names and config keys, converted back
/// to F32 GGUF: every tensor equal to the original's values, the hyper-parameters (sliding
/// window and per-layer pattern included) and the tokenizer the same, and the same logits.
#[test]
fn exaone_checkpoints_round_trip() {
    use modu_engine::synth::{synthesize, SynthArch};
    for arch in [SynthArch::Exaone, SynthArch::Exaone4, SynthArch::Exaone4Swa] {
        let vocab = GgufFile::open(common::model_path(arch.vocab_model())).unwrap();
        let w = synthesize(arch, &vocab, 1).unwrap();
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let full = GgufFile::from_bytes(bytes).unwrap();
        // The same model as F32 tensors without rope_freqs.
        let mut w = GgufWriter::new();
        for (k, v) in full.metadata() {
            w.add(k.clone(), v.clone());
        }
        for t in full.tensors() {
            if t.name != "rope_freqs.weight" {
                let v = dequant(&full, &t.name);
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.add_tensor(t.name.clone(), &t.dims, GgmlType::F32, b)
                    .unwrap();
            }
        }
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let src = GgufFile::from_bytes(bytes).unwrap();

        let dir = tmpdir(arch.name());
        let hf = dir.join("hf");
        export_hf(&src, &hf, HfDtype::F32, 1).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap())
                .unwrap();
        let a = arch.gguf_arch();
        assert_eq!(config["model_type"], a);
        match arch {
            SynthArch::Exaone => {
                assert_eq!(config["architectures"][0], "ExaoneForCausalLM");
                assert_eq!(config["num_layers"], 3);
                assert!(config["layer_norm_epsilon"].is_number());
                let names = safetensors_names(&hf);
                assert!(names.contains("transformer.h.1.attn.attention.out_proj.weight"));
                assert!(names.contains("transformer.h.2.mlp.c_fc_0.weight"));
                assert!(names.contains("transformer.ln_f.weight"));
            }
            SynthArch::Exaone4Swa => {
                assert_eq!(config["architectures"][0], "Exaone4ForCausalLM");
                assert_eq!(config["sliding_window"], 8);
                let lt = config["layer_types"].as_array().unwrap();
                assert_eq!(lt.len(), 64);
                assert_eq!(lt[3], "full_attention");
                assert_eq!(lt[4], "sliding_attention");
            }
            _ => {
                let names = safetensors_names(&hf);
                assert!(names.contains("model.layers.0.post_feedforward_layernorm.weight"));
                assert!(!names.contains("model.layers.0.input_layernorm.weight"));
            }
        }
        let out = dir.join("back.gguf");
        convert(&hf, &out).unwrap();
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.architecture(), Some(a));
        assert_eq!(g.tensors().len(), src.tensors().len(), "{}", arch.name());
        for t in src.tensors() {
            assert_eq!(dequant(&g, &t.name), dequant(&src, &t.name), "{}", t.name);
        }
        for key in [
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "attention.sliding_window",
            "attention.sliding_window_pattern",
        ] {
            let k = format!("{a}.{key}");
            let (x, y) = (src.get(&k), g.get(&k));
            let same = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
                (Some(p), Some(q)) => (p - q).abs() <= 1e-6 * p.abs().max(1.0),
                _ => x == y,
            };
            assert!(same, "{}: {k}: {x:?} → {y:?}", arch.name());
        }
        assert_eq!(
            g.get_str("tokenizer.ggml.pre"),
            src.get_str("tokenizer.ggml.pre")
        );
        let (ta, tb) = (
            Tokenizer::from_gguf(&src).unwrap(),
            Tokenizer::from_gguf(&g).unwrap(),
        );
        let text = "EXAONE 4.0은 LG AI연구원이 2025년에 공개한 모델입니다. 12345 tokens!";
        let ids = ta.encode(text, true, true).unwrap();
        assert_eq!(tb.encode(text, true, true).unwrap(), ids);
        let (ma, mb) = (
            load_model(Arc::new(src)).unwrap(),
            load_model(Arc::new(g)).unwrap(),
        );
        assert_eq!(
            logits_all(&*ma, &ids),
            logits_all(&*mb, &ids),
            "{}",
            arch.name()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn safetensors_names(dir: &Path) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            names.extend(st.names().into_iter().map(|s| s.to_string()));
        }
    }
    names
}
