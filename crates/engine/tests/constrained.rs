//! Constrained decoding on the real models: whatever the sampler draws, the output parses and
//! validates against the schema (checked by an independent validator, the `jsonschema` crate),
//! matches the regex, or derives from the grammar; bad grammars are refused with a message.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;

use modu_engine::generate::{generate_constrained, GenerateParams};
use modu_engine::{
    load_model, ChatMessage, ChatTemplate, Grammar, GrammarEngine, GrammarError, Model,
    SamplingParams, Tokenizer,
};
use modu_gguf::GgufFile;
use serde_json::json;

struct Loaded {
    model: Box<dyn Model>,
    tok: Tokenizer,
    template: ChatTemplate,
    engine: Arc<GrammarEngine>,
}

fn load(name: &str) -> Loaded {
    let file = Arc::new(GgufFile::open(common::model_path(name)).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let template = ChatTemplate::for_model(&file).unwrap();
    let model = load_model(file).unwrap();
    let engine = Arc::new(GrammarEngine::new(&tok).unwrap());
    Loaded {
        model,
        tok,
        template,
        engine,
    }
}

impl Loaded {
    fn prompt(&self, user: &str) -> Vec<u32> {
        let text = self
            .template
            .render(&[ChatMessage::new("user", user)], true, "", "")
            .unwrap();
        self.tok.encode(&text, true, true).unwrap()
    }

    fn run(
        &self,
        user: &str,
        grammar: &Grammar,
        temperature: f32,
        seed: u64,
        max: usize,
    ) -> (String, String) {
        let prompt = self.prompt(user);
        let mut cache = self.model.new_cache(prompt.len() + max + 8);
        let params = GenerateParams {
            max_tokens: max,
            sampling: SamplingParams {
                temperature,
                seed,
                ..SamplingParams::default()
            },
            ..GenerateParams::default()
        };
        let c = self.engine.compile(grammar).unwrap();
        let g = generate_constrained(
            self.model.as_ref(),
            &self.tok,
            &mut cache,
            &prompt,
            &params,
            &[],
            Some(c),
            |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
        (g.text, g.finish.as_str().to_string())
    }
}

fn person_schema() -> serde_json::Value {
    json!({
        "type": "object",
        "$defs": {
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["customer", "agent", "manager"]},
            "kind": {"const": "person"},
            "address": {"$ref": "#/$defs/address"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "contact": {"anyOf": [
                {"type": "string", "format": "email", "maxLength": 40},
                {"type": "null"}
            ]}
        },
        "required": ["name", "age", "role", "kind", "address", "tags", "contact"],
        "additionalProperties": false
    })
}

fn check_schema_output(l: &Loaded, user: &str) {
    let schema = person_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for (temperature, seed) in [(0.0, 1), (1.0, 7), (1.3, 99)] {
        let (text, finish) = l.run(
            user,
            &Grammar::JsonSchema(schema.clone()),
            temperature,
            seed,
            200,
        );
        assert_eq!(
            finish, "stop",
            "t={temperature}: the grammar should complete: {text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("t={temperature} seed={seed}: not JSON ({e}): {text}"));
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "t={temperature}: {text}: {errors:?}");
    }
}

#[test]
fn json_schema_output_validates_on_qwen() {
    let l = load("qwen");
    check_schema_output(&l, "김민수 고객(42세)은 서울 06236에 삽니다. 이메일은 minsu@example.com. JSON으로 정리해 주세요.");
    check_schema_output(
        &l,
        "Extract: Jane Roe, 35, an agent from Boston 02108, no email.",
    );
}

#[test]
fn json_schema_output_validates_on_gemma() {
    let l = load("gemma");
    check_schema_output(
        &l,
        "Extract: Jane Roe, 35, an agent from Boston 02108, no email.",
    );
}

#[test]
fn json_object_mode_gives_an_object() {
    let l = load("qwen");
    for seed in [3, 4] {
        let (text, _) = l.run(
            "List three fruits as JSON.",
            &Grammar::JsonObject,
            1.0,
            seed,
            120,
        );
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{text}");
    }
}

#[test]
fn regex_and_lark_outputs_match() {
    let l = load("qwen");
    let (text, finish) = l.run(
        "Give me a phone number.",
        &Grammar::Regex(r"0[0-9]{2}-[0-9]{4}-[0-9]{4}".into()),
        1.0,
        5,
        40,
    );
    assert_eq!(finish, "stop");
    let re = regex_lite_full(&text);
    assert!(re, "{text:?}");

    let lark = r#"start: "답: " ANSWER
ANSWER: "예" | "아니오"
"#;
    let (text, finish) = l.run(
        "서울은 한국의 수도입니까?",
        &Grammar::Lark(lark.into()),
        1.0,
        11,
        20,
    );
    assert_eq!(finish, "stop");
    assert!(text == "답: 예" || text == "답: 아니오", "{text:?}");
}

/// `0NN-NNNN-NNNN`, checked by hand (no regex engine among the test's dependencies).
fn regex_lite_full(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 13
        && b[0] == b'0'
        && b[3] == b'-'
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 3 || i == 8 || c.is_ascii_digit())
}

#[test]
fn masks_never_allow_control_tokens_inside_json() {
    let l = load("qwen");
    let mut c = l.engine.compile(&Grammar::JsonObject).unwrap();
    let m = c.mask().unwrap();
    let im_start = l.tok.token_to_id("<|im_start|>").unwrap();
    let im_end = l.tok.token_to_id("<|im_end|>").unwrap();
    assert!(
        !m.allows(im_start) && !m.allows(im_end),
        "no end before the object"
    );
    assert!(m.num_allowed() > 0 && !m.finished);
    // `{}` completes the object: now the end of turn is allowed, and nothing else.
    let mut last = m;
    for t in l.tok.encode("{}", false, false).unwrap() {
        c.advance(t);
        last = c.mask().unwrap();
    }
    assert!(last.allows(im_end), "the object is complete");
    assert!(!last.allows(im_start));
    assert!(last.finished, "nothing may follow a complete object");
    assert_eq!(last.num_allowed(), l.tok.eog_ids().len());
}

#[test]
fn bad_grammars_are_refused_with_a_message() {
    let l = load("qwen");
    let bad = [
        Grammar::JsonSchema(json!({"type": "strin"})),
        Grammar::JsonSchema(json!(["not", "an", "object"])),
        Grammar::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        Grammar::Lark("start: (".into()),
        Grammar::Lark("   ".into()),
        Grammar::Regex("(unclosed".into()),
        Grammar::JsonSchema(json!({"type": "string", "pattern": "x".repeat(300 * 1024)})),
    ];
    for g in &bad {
        match l.engine.compile(g) {
            Err(e @ (GrammarError::Invalid(_) | GrammarError::TooLarge { .. })) => {
                let msg = e.to_string();
                assert!(!msg.is_empty() && msg.len() < 2000, "{g:?}: {msg}");
            }
            Err(e) => panic!("{g:?}: unexpected error kind {e:?}"),
            Ok(_) => panic!("{g:?} compiled"),
        }
    }
}
