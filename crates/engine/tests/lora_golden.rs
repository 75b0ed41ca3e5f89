//! LoRA modules against llama.cpp: greedy continuations of Qwen2.5-Coder-0.5B with two random
//! rank-8 adapters at per-request scales (tests/golden/lora/qwen-lora-public.json, made by
//! llama-server; see tests/golden/README.md). Each case runs through both import paths (the
//! llama.cpp GGUF-LoRA files and the PEFT directories holding the same numbers), which must agree
//! with each other bit for bit and with llama.cpp token for token.
//!
//! The adapters themselves (8.8 MB each, twice per format) are not copied into the repository:
//! they are read from `../shared/golden/lora` beside the repository (where CI has them), and the
//! test fails loudly if they are absent.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use modu_engine::{load_model, Logits, LoraAdapter, Model, ModuleRef};
use modu_gguf::GgufFile;
use serde_json::Value;

fn shared_lora(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/golden/lora")
        .join(name);
    assert!(
        p.exists(),
        "LoRA golden data missing: {} (the adapters live in ../shared/golden/lora beside the repository)",
        p.display()
    );
    p
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Greedy run of `n` tokens (stopping after an end-of-generation id from `eog`), returning the ids
/// and the logits before each.
fn greedy(
    model: &dyn Model,
    prompt: &[u32],
    n: usize,
    modules: &[ModuleRef],
    eog: &dyn Fn(u32) -> bool,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mods: Vec<&[ModuleRef]> = vec![modules];
    let mut cache = model.new_cache(512);
    let mut logits = model
        .forward_seqs_with(&[prompt], &mut [&mut cache], Logits::Last, &mods)
        .unwrap();
    let (mut ids, mut all) = (vec![], vec![]);
    for _ in 0..n {
        let id = modu_engine::sampling::argmax(&logits);
        ids.push(id);
        all.push(std::mem::take(&mut logits));
        if eog(id) {
            break;
        }
        logits = model
            .forward_seqs_with(&[&[id]], &mut [&mut cache], Logits::Last, &mods)
            .unwrap();
    }
    (ids, all)
}

#[test]
fn qwen_lora_matches_llama_cpp_gguf_and_peft() {
    let file = Arc::new(GgufFile::open(common::model_path("qwen2.5-coder-0.5b-instruct")).unwrap());
    let tok = modu_engine::Tokenizer::from_gguf(&file).unwrap();
    let model = load_model(file.clone()).unwrap();
    let base = model.module_shapes();
    let gguf = [
        Arc::new(LoraAdapter::open(shared_lora("lora-a.gguf"), Some(base)).unwrap()),
        Arc::new(LoraAdapter::open(shared_lora("lora-b.gguf"), Some(base)).unwrap()),
    ];
    let peft = [
        Arc::new(LoraAdapter::open(shared_lora("peft-lora-a"), Some(base)).unwrap()),
        Arc::new(LoraAdapter::open(shared_lora("peft-lora-b"), Some(base)).unwrap()),
    ];
    for (g, p) in gguf.iter().zip(&peft) {
        assert_eq!(g.rank(), 8);
        assert_eq!(g.alpha(), 16.0);
        assert_eq!(g.n_tensors(), 24 * 7);
        assert_eq!(p.n_tensors(), 24 * 7);
        assert_eq!(g.targets().len(), 7);
        // f16 A and B: resident bytes are the file's tensor bytes.
        assert!(g.resident_bytes() > 8_700_000 && g.resident_bytes() < 8_821_248);
        assert_eq!(g.resident_bytes(), p.resident_bytes());
    }
    let golden: Value =
        serde_json::from_str(&common::read_golden("lora/qwen-lora-public.json")).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    let eog = |id: u32| tok.is_eog(id);
    let (mut n_cmp, mut sum_d, mut worst, mut n_over) = (0usize, 0f64, 0f64, 0usize);
    let mut failures = vec![];
    for case in cases {
        let setting = case["setting"].as_str().unwrap();
        let prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let scales: Vec<f32> = case["adapter_scales"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mk = |ads: &[Arc<LoraAdapter>; 2]| -> Vec<ModuleRef> {
            ads.iter()
                .zip(&scales)
                .filter(|(_, &s)| s != 0.0)
                .map(|(a, &s)| (a.clone(), s))
                .collect()
        };
        let (ids_g, logits_g) = greedy(model.as_ref(), &prompt, want.len(), &mk(&gguf), &eog);
        let (ids_p, logits_p) = greedy(model.as_ref(), &prompt, want.len(), &mk(&peft), &eog);
        assert_eq!(ids_g, ids_p, "{setting}: GGUF and PEFT paths differ");
        assert!(
            logits_g == logits_p,
            "{setting}: GGUF and PEFT logits differ"
        );
        let label = format!(
            "{setting} {:?}",
            &case["prompt_text"].as_str().unwrap()
                [..12.min(case["prompt_text"].as_str().unwrap().len())]
        );
        let div = ids_g.iter().zip(&want).position(|(a, b)| a != b);
        let mut s0 = 0f64;
        if let Some(top) = case["steps"]
            .as_array()
            .and_then(|st| st[0]["top"].as_array())
        {
            let probs = softmax(&logits_g[0]);
            for t in top {
                let id = t["id"].as_u64().unwrap() as usize;
                s0 = s0.max((probs[id] - t["prob"].as_f64().unwrap()).abs());
            }
        }
        eprintln!("CASE {label}: step0 max dp {s0:.4}, diverges at {div:?}");
        if ids_g != want {
            failures.push(format!("{label}: got {ids_g:?}\n  want {want:?}"));
        }
        if let Some(steps) = case["steps"].as_array() {
            for (step, s) in steps.iter().enumerate().take(logits_g.len()) {
                let Some(top) = s["top"].as_array() else {
                    continue;
                };
                let probs = softmax(&logits_g[step]);
                for t in top {
                    let id = t["id"].as_u64().unwrap() as usize;
                    let d = (probs[id] - t["prob"].as_f64().unwrap()).abs();
                    sum_d += d;
                    worst = worst.max(d);
                    n_over += (d > 0.02) as usize;
                    n_cmp += 1;
                    if std::env::var("LORA_DEBUG").is_ok() && step < 8 {
                        eprintln!(
                            "{label} step {step} id {id}: ours {:.4} golden {:.4}",
                            probs[id],
                            t["prob"].as_f64().unwrap()
                        );
                    }
                    if d > 0.1 {
                        failures.push(format!("{label} step {step}: p({id}) off by {d:.4}"));
                    }
                }
            }
        }
    }
    let mean = sum_d / n_cmp.max(1) as f64;
    eprintln!(
        "lora golden: {} cases, {n_cmp} probabilities compared, mean |Δp| {mean:.5}, max {worst:.4}, {n_over} over 0.02",
        cases.len()
    );
    eprintln!("{}", failures.join("\n"));
    assert!(n_cmp > 1000, "too few probabilities compared: {n_cmp}");
    assert!(mean < 0.004, "mean |Δp| {mean}");
    assert!(
        (n_over as f64) < 0.04 * n_cmp as f64,
        "{n_over} of {n_cmp} over 0.02"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn scale_zero_is_the_base_model_bit_for_bit() {
    let file = Arc::new(GgufFile::open(common::model_path("qwen2.5-coder-0.5b-instruct")).unwrap());
    let model = load_model(file).unwrap();
    let a = Arc::new(
        LoraAdapter::open(shared_lora("lora-a.gguf"), Some(model.module_shapes())).unwrap(),
    );
    let prompt = [785u32, 3840, 315, 279, 18484];
    let mut c1 = model.new_cache(64);
    let base = model.forward(&prompt, &mut c1, Logits::All).unwrap();
    let mods: Vec<ModuleRef> = vec![(a.clone(), 0.0)];
    let mut c2 = model.new_cache(64);
    let zero = model
        .forward_seqs_with(&[&prompt], &mut [&mut c2], Logits::All, &[&mods])
        .unwrap();
    assert!(base == zero, "scale 0 must be the base model exactly");
    let mods: Vec<ModuleRef> = vec![(a, 1.0)];
    let mut c3 = model.new_cache(64);
    let one = model
        .forward_seqs_with(&[&prompt], &mut [&mut c3], Logits::All, &[&mods])
        .unwrap();
    assert!(base != one, "scale 1 must change the logits");
}

#[test]
#[ignore]
fn scale_sweep_debug() {
    let file = Arc::new(GgufFile::open(common::model_path("qwen2.5-coder-0.5b-instruct")).unwrap());
    let model = load_model(file.clone()).unwrap();
    let base = model.module_shapes();
    let a = Arc::new(LoraAdapter::open(shared_lora("lora-a.gguf"), Some(base)).unwrap());
    let golden: Value =
        serde_json::from_str(&common::read_golden("lora/qwen-lora-public.json")).unwrap();
    for ci in [0usize, 2, 12, 14] {
        let case = &golden["cases"][ci];
        let prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let top = case["steps"][0]["top"].as_array().unwrap();
        for s in [0.4f32, 0.45, 0.5, 0.55, 0.6, 0.9, 0.95, 1.0, 1.05, 1.1] {
            let mods: Vec<ModuleRef> = vec![(a.clone(), s)];
            let mut c = model.new_cache(64);
            let l = model
                .forward_seqs_with(&[&prompt], &mut [&mut c], Logits::Last, &[&mods])
                .unwrap();
            let p = softmax(&l);
            let d: f64 = top
                .iter()
                .map(|t| {
                    (p[t["id"].as_u64().unwrap() as usize] - t["prob"].as_f64().unwrap()).abs()
                })
                .sum();
            eprintln!("case {ci} {} scale {s}: sum dp {d:.4}", case["setting"]);
        }
    }
}
