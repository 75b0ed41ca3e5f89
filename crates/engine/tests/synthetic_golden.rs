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
    let report = common::golden::compare(&*model, &tok, &golden, arch.name());
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
