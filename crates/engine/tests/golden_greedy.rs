//! Greedy continuations of both real models against llama.cpp's (tests/golden/*-greedy-public.json,
//! from ../shared/golden), under the measured rule of `common/golden.rs`: argmax equal except at
//! llama.cpp near-ties (top-2 margin < 0.03), median per-step |Δp| ≤ 0.015, max ≤ 0.1.

mod common;

use std::sync::Arc;

use modu_engine::load_model;
use modu_engine::tokenizer::Tokenizer;
use modu_gguf::GgufFile;
use serde_json::Value;

fn check_model(model_name: &str, golden_file: &str) {
    let path = common::model_path(model_name);
    // Opened as `modu run`/`serve` open it: a private copy with the Q5_0/Q8_0/Q4_K/Q6_K matmul
    // weights interleaved or regrouped for the SIMD kernels (when they are in use), so the
    // goldens check that path: the Q8_0 output matrix (or tied embedding), the Q5_0
    // projections and the K-quant feed-forward weights interleaved.
    let file = Arc::new(
        GgufFile::open_resident_with(&path, modu_engine::layers::regroup_for_inference)
            .expect("open model"),
    );
    if modu_kernels::layout::prefers_grouped(modu_gguf::GgmlType::Q5_0) {
        let interleaved = |ty| {
            file.tensors().iter().any(|t| {
                t.ty == ty
                    && file.is_prepared(t)
                    && modu_engine::layers::inference_layout(t)
                        == modu_kernels::Layout::Interleaved8
            })
        };
        use modu_gguf::GgmlType as T;
        for ty in [T::Q5_0, T::Q8_0, T::Q4_K, T::Q6_K] {
            assert!(
                interleaved(ty),
                "{model_name}: no {} weight was interleaved",
                ty.name()
            );
        }
    }
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let model = load_model(file.clone()).expect("load model");
    let golden: Value = serde_json::from_str(&common::read_golden(golden_file)).unwrap();
    let report =
        common::golden::compare(&*model, &tok, &golden, model_name, common::golden::NEAR_TIE);
    report.assert_ok(model_name, report.cases * 40);
}

#[test]
fn qwen_greedy_matches_llama_cpp() {
    check_model("qwen2.5-coder-0.5b-instruct", "qwen-greedy-public.json");
}

#[test]
fn gemma_greedy_matches_llama_cpp() {
    check_model("gemma-3-270m", "gemma-greedy-public.json");
}
