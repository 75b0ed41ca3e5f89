//! modu's kernel levels (`MODU_KERNELS=scalar|avx2|avx512`, each one the CPU supports) give the
//! same model outputs: every synthetic architecture (`modu synth`, the models of
//! `synthetic_golden.rs`) and the real Qwen model run teacher-forced over their first golden case,
//! once per level in a child process (the level is fixed per process), and every level's
//! probabilities must match the scalar reference's.
//!
//! The rule is the golden tests' (`common/golden.rs`), with the scalar run in llama.cpp's place:
//! per step the largest |Δp| over the whole vocabulary, median ≤ 0.015 and max ≤ 0.1 per model,
//! and the same argmax except where the scalar run's top-2 margin is below 0.03. The levels
//! compute the same integer dot products but add floats in other orders (and fuse some
//! multiply-adds); where such a last-bit difference meets a rounding boundary (an activation's
//! 8-bit quantization, an f16 value of the KV cache or of the attention accumulator), it becomes
//! a step of that format's precision, so the levels part the way llama.cpp's AVX2 and AVX-512
//! builds do (measured on a 2-core AMD EPYC with AVX-512: max per-step |Δp| 0.028 on the
//! synthetic Llama, 0.031 on Qwen; medians 0–0.005 on the synthetic models, 0.010 on Qwen). The one
//! wider argmax parting is Qwen's en-1 step 26, on the golden tests' `KNOWN_FLIPS` list: the
//! scalar run agrees with llama.cpp there, the SIMD levels do not.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use modu_engine::synth::{synthesize, SynthArch};
use modu_engine::{load_model, Logits};
use modu_gguf::GgufFile;
use serde_json::Value;

use common::golden::{KNOWN_FLIPS, MAX_DP, MEDIAN_DP, NEAR_TIE};
const STEPS: usize = 32;

fn golden(file: &str) -> Value {
    serde_json::from_str(&common::read_golden(file)).unwrap()
}

/// Teacher-forced probabilities of the first case of `golden` (prompt, then `STEPS` steps).
fn probs(file: Arc<GgufFile>, golden: &Value) -> Vec<Vec<f32>> {
    let model = load_model(file).expect("load");
    let case = &golden["cases"][0];
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = ids(&case["prompt_ids"]);
    let steps: Vec<u32> = case["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap() as u32)
        .collect();
    let mut cache = model.new_cache(4096);
    let mut out = Vec::new();
    let mut logits = model.forward(&prompt, &mut cache, Logits::Last).unwrap();
    for &t in steps.iter().take(STEPS) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        out.push(e.iter().map(|v| (v / sum) as f32).collect());
        logits = model.forward(&[t], &mut cache, Logits::Last).unwrap();
    }
    out
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// The models compared: every synthetic architecture and the real Qwen model.
fn models() -> Vec<(String, Arc<GgufFile>, Value)> {
    let mut v = Vec::new();
    for arch in SynthArch::ALL {
        let vocab = GgufFile::open(common::model_path(arch.vocab_model())).expect("vocab");
        let mut bytes = Vec::new();
        synthesize(arch, &vocab, 1)
            .unwrap()
            .write_to(&mut bytes)
            .unwrap();
        let path = std::env::temp_dir().join(format!(
            "modu-isa-{}-{}.gguf",
            arch.name(),
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = GgufFile::open_resident_with(&path, modu_engine::layers::regroup_for_inference)
            .expect("open");
        let _ = std::fs::remove_file(&path);
        let g = golden(&format!("synthetic/{}-greedy.json", arch.name()));
        v.push((arch.name().to_string(), Arc::new(file), g));
    }
    let path = common::model_path("qwen");
    let file = GgufFile::open_resident_with(&path, modu_engine::layers::regroup_for_inference)
        .expect("open qwen");
    v.push((
        "qwen2.5-coder-0.5b-instruct".into(),
        Arc::new(file),
        golden("qwen-greedy-public.json"),
    ));
    v
}

/// Run in a child process by `kernel_levels_agree` with `MODU_KERNELS` set: writes every
/// model's probabilities to `MODU_ISA_DUMP`.
#[test]
#[ignore = "helper: run by kernel_levels_agree in a child process, once per kernel level"]
fn dump_probabilities() {
    let out = PathBuf::from(std::env::var("MODU_ISA_DUMP").expect("MODU_ISA_DUMP"));
    let mut bytes = Vec::new();
    for (_, file, g) in models() {
        for row in probs(file, &g) {
            bytes.extend(row.iter().flat_map(|p| p.to_le_bytes()));
        }
    }
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn kernel_levels_agree() {
    let detected = modu_kernels::detected_level();
    let levels: Vec<modu_kernels::SimdLevel> = [
        modu_kernels::SimdLevel::Scalar,
        modu_kernels::SimdLevel::Avx2,
        modu_kernels::SimdLevel::Avx512,
    ]
    .into_iter()
    .filter(|&l| l <= detected)
    .collect();
    assert!(levels.len() >= 2 || cfg!(not(target_arch = "x86_64")));
    let exe = std::env::current_exe().unwrap();
    let mut runs = Vec::new();
    for &level in &levels {
        let dump = std::env::temp_dir().join(format!(
            "modu-isa-{}-{}.bin",
            level.name(),
            std::process::id()
        ));
        let st = Command::new(&exe)
            .args([
                "--exact",
                "dump_probabilities",
                "--ignored",
                "--test-threads=1",
            ])
            .env("MODU_KERNELS", level.name())
            .env("MODU_ISA_DUMP", &dump)
            .status()
            .expect("run the helper");
        assert!(st.success(), "helper at {} failed", level.name());
        let bytes = std::fs::read(&dump).unwrap();
        let _ = std::fs::remove_file(&dump);
        let p: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        runs.push((level, p));
    }
    let (_, reference) = &runs[0];
    let mut failures = Vec::new();
    for (level, p) in &runs[1..] {
        assert_eq!(p.len(), reference.len());
        // Split back into the models' steps: each model has its own vocabulary size.
        let mut off = 0;
        for (name, file, g) in models() {
            let n_vocab = load_model(file).unwrap().info().n_vocab;
            let case = g["cases"][0]["id"].as_str().unwrap().to_string();
            let mut dps = Vec::new();
            for step in 0..STEPS {
                let a = &reference[off..off + n_vocab];
                let b = &p[off..off + n_vocab];
                off += n_vocab;
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() as f64)
                    .fold(0.0, f64::max);
                dps.push(d);
                let (ia, ib) = (argmax(a), argmax(b));
                if ia != ib {
                    let mut sorted = a.to_vec();
                    sorted.sort_by(|x, y| y.total_cmp(x));
                    let margin = (sorted[0] - sorted[1]) as f64;
                    let known = KNOWN_FLIPS.contains(&(name.as_str(), case.as_str(), step));
                    if known {
                        eprintln!("{name} step {step}: KNOWN (issue #21): {} argmax {ib}, scalar {ia} (margin {margin:.4})", level.name());
                    } else if margin >= NEAR_TIE {
                        failures.push(format!(
                            "{name} step {step}: {} argmax {ib}, scalar {ia} (margin {margin:.4})",
                            level.name()
                        ));
                    }
                }
            }
            let max = dps.iter().copied().fold(0.0, f64::max);
            dps.sort_by(f64::total_cmp);
            let median = dps[dps.len() / 2];
            eprintln!(
                "{name}: {} vs scalar: per-step |Δp| median {median:.5}, max {max:.5}",
                level.name()
            );
            if median > MEDIAN_DP || max > MAX_DP {
                failures.push(format!(
                    "{name}: {} vs scalar: median {median:.4}, max {max:.4}",
                    level.name()
                ));
            }
        }
        assert_eq!(off, p.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
