//! Speculative decoding is exact: on the real models, greedy generation with prompt-lookup
//! drafts gives the same tokens as plain decoding (while drafts are actually accepted), and the
//! rows of a verification pass are, bit for bit, the logits of feeding its tokens one at a time.

mod common;

use std::sync::Arc;

use modu_engine::generate::{generate, GenerateParams};
use modu_engine::{
    load_model, ChatMessage, ChatTemplate, Logits, Model, SamplingParams, SpecConfig, Tokenizer,
};
use modu_gguf::GgufFile;

struct Loaded {
    model: Box<dyn Model>,
    tok: Tokenizer,
    template: ChatTemplate,
}

fn load(name: &str) -> Loaded {
    let file = Arc::new(GgufFile::open(common::model_path(name)).unwrap());
    Loaded {
        tok: Tokenizer::from_gguf(&file).unwrap(),
        template: ChatTemplate::for_model(&file).unwrap(),
        model: load_model(file).unwrap(),
    }
}

/// Prompts whose answers copy from them (where drafts are accepted) and one that does not.
const PROMPTS: [&str; 3] = [
    "Rename the variable `total` to `sum` in this function and print the whole function:\n\n\
     ```python\ndef add_all(values):\n    total = 0\n    for v in values:\n        total = total + v\n    \
     return total\n```",
    "다음 문장을 그대로 따라 쓰고 끝에 '감사합니다.'를 붙이세요: 오늘 회의는 오후 세 시에 \
     본관 2층 회의실에서 열립니다. 참석자는 자료를 미리 읽어 오시기 바랍니다.",
    "Write a short poem about the sea.",
];

fn check(name: &str) {
    let m = load(name);
    let mut accepted = 0;
    for (i, text) in PROMPTS.iter().enumerate() {
        let rendered = m
            .template
            .render(&[ChatMessage::new("user", *text)], true, "", "")
            .unwrap();
        let prompt = m.tok.encode(&rendered, true, true).unwrap();
        let run = |spec: Option<SpecConfig>| {
            let mut cache = m.model.new_cache(prompt.len() + 80);
            let params = GenerateParams {
                max_tokens: 64,
                sampling: SamplingParams::greedy(),
                speculative: spec,
                ..GenerateParams::default()
            };
            generate(&*m.model, &m.tok, &mut cache, &prompt, &params, |_, _| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap()
        };
        let plain = run(None);
        let spec = run(Some(SpecConfig::default()));
        let ids = |g: &modu_engine::generate::Generation| {
            g.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(&plain), ids(&spec), "{name} prompt {i}: tokens differ");
        assert_eq!(plain.text, spec.text);
        assert_eq!(plain.finish, spec.finish);
        for (a, b) in plain.tokens.iter().zip(&spec.tokens) {
            assert_eq!(
                a.logprob.to_bits(),
                b.logprob.to_bits(),
                "{name} prompt {i}"
            );
        }
        assert_eq!(plain.spec.drafted, 0);
        eprintln!(
            "{name} prompt {i}: {} tokens, {} drafted, {} accepted in {} rounds",
            spec.tokens.len(),
            spec.spec.drafted,
            spec.spec.accepted,
            spec.spec.rounds
        );
        accepted += spec.spec.accepted;
    }
    assert!(
        accepted >= 20,
        "{name}: only {accepted} draft tokens accepted on prompts that copy"
    );
}

#[test]
fn qwen_greedy_is_unchanged_by_speculation() {
    check("qwen");
}

#[test]
fn gemma_greedy_is_unchanged_by_speculation() {
    check("gemma");
}

/// A verification pass (one token plus a draft, several rows of logits) computes what feeding
/// the same tokens one by one computes, to the bit: that is what makes greedy output identical.
#[test]
fn verification_rows_are_the_single_token_logits() {
    for name in ["qwen", "gemma"] {
        let m = load(name);
        let nv = m.model.info().n_vocab;
        let prompt = m.tok.encode("fn main() { let x = 1;", true, false).unwrap();
        let tail = m.tok.encode(" let y = x + 2; }", false, false).unwrap();
        let mut one = m.model.new_cache(64);
        m.model.forward(&prompt, &mut one, Logits::Last).unwrap();
        let mut single = Vec::new();
        for &t in &tail {
            single.extend(m.model.forward(&[t], &mut one, Logits::Last).unwrap());
        }
        let mut many = m.model.new_cache(64);
        m.model.forward(&prompt, &mut many, Logits::Last).unwrap();
        let rows = m
            .model
            .forward_seqs_tail(&[&tail], &mut [&mut many], &[tail.len()], &[])
            .unwrap();
        assert_eq!(rows.len(), tail.len() * nv);
        let same = rows
            .iter()
            .zip(&single)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: verification rows differ from single steps");
        // Only the last two rows asked for: the tail of the same rows.
        let mut part = m.model.new_cache(64);
        m.model.forward(&prompt, &mut part, Logits::Last).unwrap();
        let last2 = m
            .model
            .forward_seqs_tail(&[&tail], &mut [&mut part], &[2], &[])
            .unwrap();
        assert_eq!(last2, rows[(tail.len() - 2) * nv..]);
        // A bad tail is an error, and nothing is cached.
        let before = part.len();
        assert!(m
            .model
            .forward_seqs_tail(&[&tail], &mut [&mut part], &[tail.len() + 1], &[])
            .is_err());
        assert_eq!(part.len(), before);
    }
}

/// A draft model of the same vocabulary: Qwen drafting for itself (its drafts are its own greedy
/// tokens, so nearly all are kept) and the synthetic Qwen2 model (`modu synth`, random weights
/// with Qwen's tokenizer, so nearly all are rejected) both leave greedy output exactly that of
/// plain decoding, logprobs to the bit. A model of another vocabulary is refused.
#[test]
fn a_draft_model_keeps_greedy_output_exact() {
    use modu_engine::generate::generate_drafted;
    use modu_engine::speculate::same_vocabulary;
    use modu_engine::synth::{synthesize, SynthArch};
    let file = Arc::new(GgufFile::open(common::model_path("qwen")).unwrap());
    let m = load("qwen");
    let mut bytes = Vec::new();
    synthesize(SynthArch::Qwen2, &file, 1)
        .unwrap()
        .write_to(&mut bytes)
        .unwrap();
    let synth_file = Arc::new(GgufFile::from_bytes(bytes).unwrap());
    same_vocabulary(&file, &synth_file).expect("the synthetic model has Qwen's vocabulary");
    let gemma = GgufFile::open(common::model_path("gemma")).unwrap();
    assert!(same_vocabulary(&file, &gemma).is_err());
    let random = load_model(synth_file).unwrap();
    let rendered = m
        .template
        .render(&[ChatMessage::new("user", PROMPTS[0])], true, "", "")
        .unwrap();
    let prompt = m.tok.encode(&rendered, true, true).unwrap();
    let params = GenerateParams {
        max_tokens: 48,
        sampling: SamplingParams::greedy(),
        speculative: Some(SpecConfig {
            max_draft: 4,
            ..SpecConfig::default()
        }),
        ..GenerateParams::default()
    };
    let cont =
        |_: &str, _: &modu_engine::generate::GeneratedToken| std::ops::ControlFlow::Continue(());
    let mut cache = m.model.new_cache(prompt.len() + 64);
    let plain = generate(
        &*m.model,
        &m.tok,
        &mut cache,
        &prompt,
        &GenerateParams {
            speculative: None,
            ..params.clone()
        },
        cont,
    )
    .unwrap();
    for (label, draft, min_kept) in [("itself", &*m.model, 0.9), ("random", &*random, 0.0)] {
        let mut cache = m.model.new_cache(prompt.len() + 64);
        let g = generate_drafted(
            &*m.model,
            draft,
            &m.tok,
            &mut cache,
            &prompt,
            &params,
            &[],
            cont,
        )
        .unwrap();
        let ids = |g: &modu_engine::generate::Generation| {
            g.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(&g), ids(&plain), "draft {label}: tokens differ");
        assert_eq!(g.text, plain.text);
        for (a, b) in plain.tokens.iter().zip(&g.tokens) {
            assert_eq!(a.logprob.to_bits(), b.logprob.to_bits(), "draft {label}");
        }
        assert!(g.spec.drafted > 0, "draft {label}: nothing drafted");
        assert!(
            g.spec.acceptance() >= min_kept,
            "draft {label}: {} of {} kept",
            g.spec.accepted,
            g.spec.drafted
        );
        eprintln!(
            "draft {label}: {} drafted, {} kept in {} passes",
            g.spec.drafted, g.spec.accepted, g.spec.rounds
        );
    }
}
