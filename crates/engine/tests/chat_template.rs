//! Chat templates against llama.cpp: the chat cases of tests/golden/*-greedy-public.json carry the
//! `messages` and the `prompt_text` llama-server's `/apply-template` produced from the model's
//! embedded template; ours must be byte-identical, and tokenize to the same `prompt_ids`.

mod common;

use modu_engine::chat::{ChatMessage, ChatTemplate, ChatTemplateError};
use modu_engine::tokenizer::Tokenizer;
use modu_gguf::GgufFile;
use serde_json::Value;

fn open(model: &str) -> GgufFile {
    let path = common::model_path(model);
    GgufFile::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn token_text(tok: &Tokenizer, id: Option<u32>) -> String {
    id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
        .unwrap_or_default()
}

/// Renders every chat case of a greedy golden file; returns how many there were.
fn check_chat_cases(model: &str, golden_file: &str) -> usize {
    let file = open(model);
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let tpl = ChatTemplate::for_model(&file).unwrap();
    let (bos, eos) = (
        token_text(&tok, tok.bos_id()),
        token_text(&tok, tok.eos_id()),
    );
    let golden: Value = serde_json::from_str(&common::read_golden(golden_file)).unwrap();
    let mut n = 0;
    for case in golden["cases"].as_array().unwrap() {
        let Some(msgs) = case["messages"].as_array() else {
            continue;
        };
        let messages: Vec<ChatMessage> = msgs
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let want = case["prompt_text"].as_str().unwrap();
        let got = tpl.render(&messages, true, &bos, &eos).unwrap();
        assert_eq!(got, want, "case {}", case["id"]);
        let want_ids: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(&got, true, true).unwrap(),
            want_ids,
            "case {} ids",
            case["id"]
        );
        n += 1;
    }
    n
}

#[test]
fn qwen_chat_cases_match_llama_cpp() {
    let n = check_chat_cases("qwen", "qwen-greedy-public.json");
    assert!(n > 0, "the qwen golden file has chat cases");
    eprintln!("qwen: {n} chat prompts identical to llama.cpp's");
}

#[test]
fn gemma_chat_cases_match_llama_cpp() {
    // The Gemma 3 270M base model has no template (the file's chat cases, if any, were rendered
    // by llama.cpp's built-in gemma format).
    let n = check_chat_cases("gemma", "gemma-greedy-public.json");
    eprintln!("gemma: {n} chat prompts identical to llama.cpp's");
}

/// Every prompt of the greedy goldens (plain and chat) tokenizes to llama.cpp's `prompt_ids`.
#[test]
fn greedy_prompts_tokenize_like_llama_cpp() {
    for (model, file) in [
        ("qwen", "qwen-greedy-public.json"),
        ("gemma", "gemma-greedy-public.json"),
    ] {
        let tok = Tokenizer::from_gguf(&open(model)).unwrap();
        let golden: Value = serde_json::from_str(&common::read_golden(file)).unwrap();
        for case in golden["cases"].as_array().unwrap() {
            let want: Vec<u32> = case["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok
                .encode(case["prompt_text"].as_str().unwrap(), true, true)
                .unwrap();
            assert_eq!(got, want, "{model} {}", case["id"]);
        }
    }
}

#[test]
fn qwen_template_details() {
    let file = open("qwen");
    let tpl = ChatTemplate::from_gguf(&file)
        .unwrap()
        .expect("qwen ships a template");
    assert_eq!(tpl.builtin_name(), None);
    // No system message: the template's own default system prompt.
    let out = tpl
        .render(
            &[ChatMessage::new(
                "user",
                "안녕하세요? 한국어로 대답해 주세요.",
            )],
            true,
            "",
            "<|im_end|>",
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\n안녕하세요? 한국어로 대답해 주세요.<|im_end|>\n<|im_start|>assistant\n"
    );
    // Multi-turn without generation prompt.
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "hello 👋"),
        ChatMessage::new("user", "bye"),
    ];
    let out = tpl.render(&msgs, false, "", "").unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\nhello 👋<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
    );
}

#[test]
fn gemma_falls_back_to_builtin() {
    let file = open("gemma");
    assert!(
        ChatTemplate::from_gguf(&file).unwrap().is_none(),
        "gemma-3-270m ships no template"
    );
    let tpl = ChatTemplate::for_model(&file).unwrap();
    assert_eq!(tpl.builtin_name(), Some("gemma"));
    let msgs = [
        ChatMessage::new("system", " Answer in Korean. "),
        ChatMessage::new("user", "What is the capital of Korea?\n"),
        ChatMessage::new("assistant", "서울입니다."),
        ChatMessage::new("user", "고마워요"),
    ];
    let out = tpl.render(&msgs, true, "<bos>", "<eos>").unwrap();
    assert_eq!(
        out,
        "<start_of_turn>user\nAnswer in Korean.\n\nWhat is the capital of Korea?<end_of_turn>\n\
         <start_of_turn>model\n서울입니다.<end_of_turn>\n<start_of_turn>user\n고마워요<end_of_turn>\n\
         <start_of_turn>model\n"
    );
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let ids = tok.encode(&out, true, true).unwrap();
    assert_eq!(
        ids[..3],
        [
            2,
            tok.token_to_id("<start_of_turn>").unwrap(),
            tok.token_to_id("user").unwrap()
        ]
    );
}

#[test]
fn chatml_builtin_for_other_architectures() {
    let tpl = ChatTemplate::builtin_for_arch("llama");
    assert_eq!(tpl.builtin_name(), Some("chatml"));
    let out = tpl
        .render(
            &[
                ChatMessage::new("system", "s"),
                ChatMessage::new("user", "u"),
            ],
            true,
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn broken_templates_are_errors() {
    let err = ChatTemplate::new("{% for m in messages %}\n{{ m.content }\n").unwrap_err();
    assert!(matches!(err, ChatTemplateError::Parse { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("line 2"), "{msg}");

    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(err, ChatTemplateError::Parse { .. }), "{err}");

    // raise_exception, as HF templates use it.
    let tpl = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
    )
    .unwrap();
    let err = tpl
        .render(&[ChatMessage::new("assistant", "x")], true, "", "")
        .unwrap_err();
    assert!(
        matches!(&err, ChatTemplateError::Raised(m) if m == "Conversation must start with user"),
        "{err}"
    );
    assert_eq!(
        tpl.render(&[ChatMessage::new("user", "x")], true, "", "")
            .unwrap(),
        "ok"
    );

    // A render-time failure (calling an undefined function) names the line.
    let tpl = ChatTemplate::new("line one\n{{ no_such_function() }}").unwrap();
    let err = tpl.render(&[], true, "", "").unwrap_err();
    assert!(
        matches!(err, ChatTemplateError::Render { line: Some(2), .. }),
        "{err}"
    );
}

#[test]
fn python_methods_and_helpers() {
    let tpl = ChatTemplate::new(
        "{%- for m in messages -%}\
         {{ m.content.strip() }}|{{ m.content.startswith(' he') }}|{{ m.role.upper() }}|{{ m | tojson }}\
         {%- endfor -%}|{{ strftime_now('%Y') | length }}|{{ tools is none }}",
    )
    .unwrap();
    let out = tpl
        .render(
            &[ChatMessage::new("user", " hello <b>\"q\"</b> ")],
            true,
            "",
            "",
        )
        .unwrap();
    assert_eq!(
        out,
        "hello <b>\"q\"</b>|True|USER|{\"role\": \"user\", \"content\": \" hello <b>\\\"q\\\"</b> \"}|4|True"
    );
}
