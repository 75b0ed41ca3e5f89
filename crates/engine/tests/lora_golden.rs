//! LoRA modules against llama.cpp: greedy continuations of Qwen2.5-Coder-0.5B with two random
//! rank-8 adapters at per-request scales (tests/golden/lora/qwen-lora-public.json, made by
//! llama-server; see tests/golden/README.md). Each case runs through both import paths (the
//! llama.cpp GGUF-LoRA files and the PEFT directories holding the same numbers), which must agree
//! with each other bit for bit, and with llama.cpp as the golden README suggests: the same
//! argmax wherever the top two are not near a tie (teacher-forced), free-running continuations
//! parting only at a near tie, and top-10 probabilities close.
//!
//! The GGUF adapters are in the repository (tests/golden/lora); the PEFT twins come from
//! `../shared/golden/lora` when it is beside the repository, else modu writes them from the GGUF
//! files (tests/lora_fixture.rs).

mod common;
#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;

use std::path::PathBuf;
use std::sync::Arc;

use modu_engine::{load_model, Logits, LoraAdapter, Model, ModuleRef};
use modu_gguf::GgufFile;
use serde_json::Value;

fn shared_lora(name: &str) -> PathBuf {
    lora_fixture::lora(name)
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Greedy run of up to `n` tokens (stopping after an end-of-generation id), returning the ids.
fn greedy(
    model: &dyn Model,
    prompt: &[u32],
    n: usize,
    modules: &[ModuleRef],
    eog: &dyn Fn(u32) -> bool,
) -> Vec<u32> {
    let mods: Vec<&[ModuleRef]> = vec![modules];
    let mut cache = model.new_cache(512);
    let mut logits = model
        .forward_seqs_with(&[prompt], &mut [&mut cache], Logits::Last, &mods)
        .unwrap();
    let mut ids = vec![];
    for _ in 0..n {
        let id = modu_engine::sampling::argmax(&logits);
        ids.push(id);
        if eog(id) {
            break;
        }
        logits = model
            .forward_seqs_with(&[&[id]], &mut [&mut cache], Logits::Last, &mods)
            .unwrap();
    }
    ids
}

/// Logits before each of `forced` tokens, feeding llama.cpp's tokens (teacher forcing).
fn forced_logits(
    model: &dyn Model,
    prompt: &[u32],
    forced: &[u32],
    modules: &[ModuleRef],
) -> Vec<Vec<f32>> {
    let mods: Vec<&[ModuleRef]> = vec![modules];
    let mut cache = model.new_cache(512);
    let mut out = vec![model
        .forward_seqs_with(&[prompt], &mut [&mut cache], Logits::Last, &mods)
        .unwrap()];
    for &id in &forced[..forced.len() - 1] {
        out.push(
            model
                .forward_seqs_with(&[&[id]], &mut [&mut cache], Logits::Last, &mods)
                .unwrap(),
        );
    }
    out
}

/// Top-1 minus top-2 log-probability (= logit) margin.
fn logprob_margin(logits: &[f32]) -> f64 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    (a - b) as f64
}

/// Top-2 probability margin.
fn margin(probs: &[f64]) -> f64 {
    let (mut a, mut b) = (0f64, 0f64);
    for &p in probs {
        if p > a {
            b = a;
            a = p;
        } else if p > b {
            b = p;
        }
    }
    a - b
}

/// llama.cpp's argmax may flip where its top two are this close: the near-tie margin of the
/// golden rule (`common/golden.rs`), measured from llama.cpp against itself.
const NEAR_TIE: f64 = 0.03;

/// The golden README's "clear margin" for exact matching: top-1 minus top-2 log-probability.
const LOGPROB_TIE: f64 = 0.1;

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
    let (mut exact, mut steps_ok) = (0usize, 0usize);
    let mut failures = vec![];
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    for case in cases {
        let setting = case["setting"].as_str().unwrap();
        let text = case["prompt_text"].as_str().unwrap();
        let label = format!("{setting} {:?}", text.chars().take(12).collect::<String>());
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["generated_ids"]);
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
        // Free-running greedy: both import paths give the same tokens.
        let ids_g = greedy(model.as_ref(), &prompt, want.len(), &mk(&gguf), &eog);
        let ids_p = greedy(model.as_ref(), &prompt, want.len(), &mk(&peft), &eog);
        assert_eq!(ids_g, ids_p, "{label}: GGUF and PEFT paths differ");
        // Teacher-forced on llama.cpp's tokens: our logits at every step of its continuation.
        let logits = forced_logits(model.as_ref(), &prompt, &want, &mk(&gguf));
        exact += (ids_g == want) as usize;
        if let Some(pos) = ids_g.iter().zip(&want).position(|(a, b)| a != b) {
            // The golden README's criterion: the ids match up to the first near tie, a top-1 /
            // top-2 log-probability margin within 0.1 (kernels differ in rounding, and past a
            // near tie the continuations are free to part). Up to `pos` the prefixes agree, so
            // our distribution there is the teacher-forced one; a near tie in either model's
            // distribution at `pos` explains the parting.
            let steps = case["steps"].as_array();
            let theirs = steps
                .and_then(|s| s[pos]["top"].as_array())
                .filter(|t| t.len() >= 2)
                .map(|t| t[0]["logprob"].as_f64().unwrap() - t[1]["logprob"].as_f64().unwrap());
            let ours = logprob_margin(&logits[pos]);
            eprintln!(
                "{label}: free-running greedy leaves llama.cpp's at step {pos} (log-prob margins there: llama.cpp {theirs:?}, ours {ours:.3})"
            );
            // Where llama.cpp reported no probabilities (a token ending inside a UTF-8
            // character) its margin is unknown: such a parting is reported above, not failed.
            if theirs.is_some_and(|m| m > LOGPROB_TIE) && ours > LOGPROB_TIE {
                failures.push(format!(
                    "{label}: free-running greedy differs at step {pos} without a near tie (llama.cpp margin {theirs:?}, ours {ours:.3})"
                ));
            }
        }
        // Teacher-forced on llama.cpp's tokens: the argmax agrees at every step unless llama.cpp's
        // (or, where it reported nothing, our) top two are within NEAR_TIE.
        let steps = case["steps"].as_array();
        for (step, l) in logits.iter().enumerate() {
            let probs = softmax(l);
            let got = modu_engine::sampling::argmax(l);
            let top = steps.and_then(|s| s[step]["top"].as_array());
            let m = match top {
                Some(t) if t.len() >= 2 => {
                    t[0]["prob"].as_f64().unwrap() - t[1]["prob"].as_f64().unwrap()
                }
                _ => margin(&probs),
            };
            if got != want[step] && m > NEAR_TIE {
                failures.push(format!(
                    "{label} step {step}: argmax {got} (p={:.4}), llama.cpp {} (p={:.4}), margin {m:.3}",
                    probs[got as usize], want[step], probs[want[step] as usize]
                ));
            } else {
                steps_ok += 1;
            }
            for t in top.into_iter().flatten() {
                let id = t["id"].as_u64().unwrap() as usize;
                let d = (probs[id] - t["prob"].as_f64().unwrap()).abs();
                sum_d += d;
                worst = worst.max(d);
                n_over += (d > 0.02) as usize;
                n_cmp += 1;
            }
        }
    }
    let mean = sum_d / n_cmp.max(1) as f64;
    eprintln!(
        "lora golden: {exact}/{} cases token-exact free-running; {steps_ok} teacher-forced steps agree; {n_cmp} probabilities: mean |Δp| {mean:.5}, max {worst:.4}, {n_over} over 0.02",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(n_cmp > 3000, "too few probabilities compared: {n_cmp}");
    assert!(mean < 0.006, "mean |Δp| {mean}");
    assert!(worst < 0.15, "max |Δp| {worst}");
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

/// `modu eval module`: KLD of base + module from the base. Scale 0 is the base bit for bit
/// (KLD exactly 0, every top token the same); scale 1 moves the distribution, and scale 2 more.
#[test]
fn module_kld_is_zero_at_scale_zero_and_grows_with_scale() {
    use modu_engine::{eval, Tokenizer};
    let file = Arc::new(GgufFile::open(common::model_path("qwen2.5-coder-0.5b-instruct")).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let model = load_model(file).unwrap();
    let a = Arc::new(
        LoraAdapter::open(shared_lora("lora-a.gguf"), Some(model.module_shapes())).unwrap(),
    );
    let text = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 \
                국민으로부터 나온다. The quick brown fox jumps over the lazy dog, and the \
                committee adjourned until the following Tuesday at noon.";
    let kld = |scale: f32| {
        let mods: Vec<ModuleRef> = vec![(a.clone(), scale)];
        eval::module_kl_divergence(model.as_ref(), &mods, &tok, text, 32, Some(1), &|_, _| {})
            .unwrap()
    };
    let zero = kld(0.0);
    assert!(zero.tokens_scored > 0);
    assert_eq!(zero.kld_mean, 0.0);
    assert_eq!(zero.kld_max, 0.0);
    assert_eq!(zero.same_top_pct, 100.0);
    let one = kld(1.0);
    let two = kld(2.0);
    eprintln!(
        "module KLD: scale 1 {:.5}, scale 2 {:.5}",
        one.kld_mean, two.kld_mean
    );
    assert!(one.kld_mean > 1e-4, "scale 1 KLD {}", one.kld_mean);
    assert!(two.kld_mean > one.kld_mean);
}

/// modu's PEFT writer gives back exactly the adapter it was handed (the fixture PEFT twins are
/// written by it when `../shared` is absent, so it must be exact).
#[test]
fn peft_writer_round_trips_the_gguf_adapter() {
    let gguf = LoraAdapter::open(shared_lora("lora-b.gguf"), None).unwrap();
    let dir = std::env::temp_dir().join(format!("modu-peft-roundtrip-{}", std::process::id()));
    gguf.write_peft_dir(&dir, "test-base").unwrap();
    let peft = LoraAdapter::open(&dir, None).unwrap();
    assert_eq!(peft.n_tensors(), gguf.n_tensors());
    assert_eq!((peft.rank(), peft.alpha()), (gguf.rank(), gguf.alpha()));
    for (il, p, t) in gguf.iter() {
        let u = peft.tensor(il, p).expect("every tensor written");
        assert_eq!((u.n_in, u.n_out), (t.n_in, t.n_out));
        assert!(u.a() == t.a() && u.b() == t.b(), "layer {il} {p} differs");
        assert_eq!(u.effective_scale(0.5), t.effective_scale(0.5));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
