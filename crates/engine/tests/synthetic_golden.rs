//! Every architecture against llama.cpp on tiny random-weight models (`modu synth`), whose
//! greedy continuations and top-10 probabilities llama.cpp recorded in
//! `tests/golden/synthetic/` (made by `scripts/golden/synthetic.py`; see its README). The model
//! is regenerated here from the real vocabulary model and must hash to what llama.cpp ran; it
//! is then opened the way `modu run` opens models (weights regrouped for the SIMD kernels) and
//! compared under the same measured rule as the real-model goldens (`common/golden.rs`).
//! Architectures with their own pre-tokenizer (llama-bpe, exaone, exaone4) also match
//! llama-tokenize on the shared tokenization strings, with and without special-token parsing.

mod common;

use std::sync::Arc;

use modu_engine::load_model;
use modu_engine::synth::{synthesize, SynthArch};
use modu_engine::tokenizer::Tokenizer;
use modu_gguf::GgufFile;
use serde_json::Value;
use sha2::{Digest, Sha256};

const SEED: u64 = 1;

fn golden_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/synthetic")
        .join(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Writes the synthetic model of `arch`, checks its hash against the golden's, and opens it.
fn synthetic_model(arch: SynthArch, golden: &Value) -> (Arc<GgufFile>, std::path::PathBuf) {
    let vocab = GgufFile::open(common::model_path(arch.vocab_model())).expect("open vocab model");
    let mut bytes = Vec::new();
    synthesize(arch, &vocab, SEED)
        .expect("synthesize")
        .write_to(&mut bytes)
        .expect("write");
    let digest = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(
        digest,
        golden["meta"]["model_sha256"].as_str().unwrap(),
        "{}: the synthetic model is not the file llama.cpp ran (the generator changed?): \
         remake the goldens with scripts/golden/synthetic.py",
        arch.name()
    );
    let path = std::env::temp_dir().join(format!(
        "modu-synth-{}-{}.gguf",
        arch.name(),
        std::process::id()
    ));
    std::fs::write(&path, &bytes).expect("write synthetic model");
    let file = GgufFile::open_resident_with(&path, modu_engine::layers::regroup_for_inference)
        .expect("open synthetic model");
    (Arc::new(file), path)
}

fn check(arch: SynthArch) {
    let text = std::fs::read_to_string(golden_path(&format!("{}-greedy.json", arch.name())))
        .expect("read golden");
    let golden: Value = serde_json::from_str(&text).unwrap();
    let (file, path) = synthetic_model(arch, &golden);
    let _ = std::fs::remove_file(&path);
    assert_eq!(file.architecture(), Some(arch.gguf_arch()));
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let model = load_model(file.clone()).expect("load synthetic model");
    let report = common::golden::compare(
        &*model,
        &tok,
        &golden,
        arch.name(),
        common::golden::SYNTH_NEAR_TIE,
    );
    report.assert_ok(arch.name(), report.cases * 30);

    // The architectures with a pre-tokenizer of their own have a tokenization golden.
    if matches!(
        arch,
        SynthArch::Llama | SynthArch::Exaone | SynthArch::Exaone4
    ) {
        let tok_golden = golden_path(&format!("{}-tokenize.json", arch.name()));
        let text = std::fs::read_to_string(&tok_golden).expect("read tokenization golden");
        let g: Value = serde_json::from_str(&text).unwrap();
        let mut failures = Vec::new();
        let cases = g["cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            for (parse_special, key) in
                [(true, "ids_parse_special"), (false, "ids_no_parse_special")]
            {
                let got = tok.encode(text, true, parse_special).unwrap();
                if got != ids(&case[key]) {
                    failures.push(format!(
                        "{text:?} parse_special={parse_special}: ours {got:?}, llama.cpp {:?}",
                        ids(&case[key])
                    ));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{}: tokenization differs:\n{}",
            arch.name(),
            failures.join("\n")
        );
    }
}

#[test]
fn synthetic_llama_matches_llama_cpp() {
    check(SynthArch::Llama);
}

#[test]
fn synthetic_qwen2_matches_llama_cpp() {
    check(SynthArch::Qwen2);
}

#[test]
fn synthetic_gemma3_matches_llama_cpp() {
    check(SynthArch::Gemma3);
}

#[test]
fn synthetic_exaone_matches_llama_cpp() {
    check(SynthArch::Exaone);
}

#[test]
fn synthetic_exaone4_matches_llama_cpp() {
    check(SynthArch::Exaone4);
}

#[test]
fn synthetic_exaone4_hybrid_attention_matches_llama_cpp() {
    check(SynthArch::Exaone4Swa);
}

/// `file` rewritten without the metadata key `drop_key` and the tensor `drop_tensor`, and
/// with `set` (key, value) replacing or adding a key.
fn rewrite(
    file: &GgufFile,
    drop_key: Option<&str>,
    set: Option<(&str, modu_gguf::Value)>,
    drop_tensor: Option<&str>,
) -> Arc<GgufFile> {
    let mut w = modu_gguf::GgufWriter::new();
    for (k, v) in file.metadata() {
        if Some(k.as_str()) != drop_key && Some(k.as_str()) != set.as_ref().map(|s| s.0) {
            w.add(k.clone(), v.clone());
        }
    }
    if let Some((k, v)) = set {
        w.add(k, v);
    }
    for t in file.tensors() {
        if Some(t.name.as_str()) != drop_tensor {
            w.add_tensor(t.name.clone(), &t.dims, t.ty, file.tensor_data(t).to_vec())
                .unwrap();
        }
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    Arc::new(GgufFile::from_bytes(bytes).unwrap())
}

fn load_err(file: Arc<GgufFile>) -> modu_engine::ModelError {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_model(file))) {
        Ok(Ok(_)) => panic!("a broken model loaded"),
        Ok(Err(e)) => e,
        Err(_) => panic!("load_model panicked instead of returning an error"),
    }
}

fn synthetic_file(arch: SynthArch) -> GgufFile {
    let vocab = GgufFile::open(common::model_path(arch.vocab_model())).expect("open vocab model");
    let mut bytes = Vec::new();
    synthesize(arch, &vocab, SEED)
        .unwrap()
        .write_to(&mut bytes)
        .unwrap();
    GgufFile::from_bytes(bytes).unwrap()
}

/// Broken EXAONE files are errors that name the key or tensor, never a panic.
#[test]
fn broken_exaone_files_name_the_problem() {
    use modu_engine::ModelError as E;
    use modu_gguf::{Array, Value};
    let ex4 = synthetic_file(SynthArch::Exaone4);
    for name in [
        "blk.2.post_ffw_norm.weight",
        "blk.0.attn_q_norm.weight",
        "blk.3.post_attention_norm.weight",
        "output_norm.weight",
    ] {
        match load_err(rewrite(&ex4, None, None, Some(name))) {
            E::MissingTensor(n) => assert_eq!(n, name),
            e => panic!("without {name}: {e:?}"),
        }
    }
    match load_err(rewrite(
        &ex4,
        Some("exaone4.attention.layer_norm_rms_epsilon"),
        None,
        None,
    )) {
        E::MissingKey(k) => assert_eq!(k, "exaone4.attention.layer_norm_rms_epsilon"),
        e => panic!("{e:?}"),
    }
    match load_err(rewrite(
        &ex4,
        None,
        Some(("exaone4.attention.head_count", Value::U32(2))),
        None,
    )) {
        E::BadKey { key, .. } => assert_eq!(key, "exaone4.attention"),
        e => panic!("{e:?}"),
    }
    // A pattern that does not have one entry per layer.
    let pattern = Value::Array(Array::Bool(vec![true, false]));
    match load_err(rewrite(
        &ex4,
        None,
        Some(("exaone4.attention.sliding_window_pattern", pattern)),
        None,
    )) {
        E::BadKey { key, reason } => {
            assert_eq!(key, "exaone4.attention.sliding_window_pattern");
            assert!(reason.contains("4 booleans"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    // Sliding layers without a window size (only a 64-layer file has llama.cpp's default).
    let pattern = Value::Array(Array::Bool(vec![true, true, true, false]));
    match load_err(rewrite(
        &ex4,
        None,
        Some(("exaone4.attention.sliding_window_pattern", pattern)),
        None,
    )) {
        E::MissingKey(k) => assert_eq!(k, "exaone4.attention.sliding_window"),
        e => panic!("{e:?}"),
    }

    let ex = synthetic_file(SynthArch::Exaone);
    match load_err(rewrite(
        &ex,
        None,
        Some(("exaone.rope.dimension_count", Value::U32(8))),
        None,
    )) {
        E::BadKey { key, .. } => assert_eq!(key, "exaone.rope.dimension_count"),
        e => panic!("{e:?}"),
    }
    match load_err(rewrite(&ex, None, None, Some("blk.1.ffn_gate.weight"))) {
        E::MissingTensor(n) => assert_eq!(n, "blk.1.ffn_gate.weight"),
        e => panic!("{e:?}"),
    }
}

/// `modu quantize` takes the EXAONE architectures like any other: the synthetic models
/// requantized to Q8_0 (norms and `rope_freqs` kept in F32) load and predict what the
/// originals predict, within the change the requantization makes.
#[test]
fn exaone_models_quantize_and_run() {
    use modu_engine::quantize::{quantize_file, QuantizeOptions, Recipe};
    for arch in [SynthArch::Exaone, SynthArch::Exaone4, SynthArch::Exaone4Swa] {
        let dir = std::env::temp_dir();
        let src = dir.join(format!(
            "modu-synthq-{}-{}.gguf",
            arch.name(),
            std::process::id()
        ));
        let dst = dir.join(format!(
            "modu-synthq-{}-{}-q8.gguf",
            arch.name(),
            std::process::id()
        ));
        let vocab = GgufFile::open(common::model_path(arch.vocab_model())).unwrap();
        synthesize(arch, &vocab, SEED)
            .unwrap()
            .write_file(&src)
            .unwrap();
        quantize_file(
            &src,
            &dst,
            Recipe::parse("Q8_0").unwrap(),
            &QuantizeOptions::default(),
            &|_, _| {},
        )
        .expect("quantize");
        let orig = Arc::new(GgufFile::open(&src).unwrap());
        let quant = Arc::new(GgufFile::open(&dst).unwrap());
        let _ = std::fs::remove_file(&src);
        let _ = std::fs::remove_file(&dst);
        assert_eq!(quant.architecture(), Some(arch.gguf_arch()));
        for t in quant.tensors() {
            let want = if t.dims.len() == 1 {
                modu_gguf::GgmlType::F32
            } else {
                modu_gguf::GgmlType::Q8_0
            };
            assert_eq!(t.ty, want, "{}: {}", arch.name(), t.name);
        }
        let (a, b) = (load_model(orig).unwrap(), load_model(quant).unwrap());
        let text =
            std::fs::read_to_string(golden_path(&format!("{}-greedy.json", arch.name()))).unwrap();
        let g: Value = serde_json::from_str(&text).unwrap();
        let prompt = ids(&g["cases"][0]["prompt_ids"]);
        let (mut ca, mut cb) = (a.new_cache(256), b.new_cache(256));
        let la = a
            .forward(&prompt, &mut ca, modu_engine::Logits::Last)
            .unwrap();
        let lb = b
            .forward(&prompt, &mut cb, modu_engine::Logits::Last)
            .unwrap();
        let soft = |l: &[f32]| {
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = l.iter().map(|&v| ((v - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<f64>>()
        };
        let (pa, pb) = (soft(&la), soft(&lb));
        let d = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            d < 0.1,
            "{}: requantized model moved a probability by {d}",
            arch.name()
        );
    }
}
