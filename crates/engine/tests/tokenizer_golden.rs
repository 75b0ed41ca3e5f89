//! Tokenization of both real models against llama.cpp's `llama-tokenize` (tests/golden/
//! `*-tokenize-public.json`, copied from the shared golden data; see tests/golden/README.md):
//! every case must give exactly llama.cpp's ids, with and without special-token parsing, BOS as
//! the model's default. Plus round trips and streaming decode on strings of the same kinds.

mod common;

use modu_engine::tokenizer::{Tokenizer, VocabKind};
use modu_gguf::GgufFile;
use serde_json::Value;

fn load(model: &str) -> Tokenizer {
    let path = common::model_path(model);
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Tokenizer::from_gguf(&file).expect("tokenizer from GGUF")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks every golden case in both modes; returns the number of cases.
fn check_golden(tok: &Tokenizer, golden_file: &str) -> usize {
    let golden: Value = serde_json::from_str(&common::read_golden(golden_file)).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let hex = case["utf8_hex"].as_str().unwrap();
        assert_eq!(hex.len(), text.len() * 2, "utf8_hex mismatch for {text:?}");
        for (parse_special, key) in [(true, "ids_parse_special"), (false, "ids_no_parse_special")] {
            let want = ids(&case[key]);
            let got = tok.encode(text, true, parse_special).unwrap();
            if got != want {
                failures.push(format!(
                    "case {} {text:?} parse_special={parse_special}:\n  ours  {got:?}\n  llama {want:?}",
                    case["index"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks differ:\n{}",
        failures.len(),
        cases.len() * 2,
        failures.join("\n")
    );
    cases.len()
}

/// Strings of the kinds the goldens cover, beyond the golden ones.
const EXTRA: &[&str] = &[
    "",
    " ",
    "  leading and trailing  ",
    "\t\ttabs\tand\r\nCRLF\r\n\r\n",
    "\n\n\n",
    "안녕하세요! 반갑습니다. 오늘 날씨가 좋네요 :)",
    "ㄱㄴㄷㄹ ㅏㅑㅓㅕ 똠방각하 쀍",
    "\u{1112}\u{1161}\u{11ab}\u{1100}\u{1173}\u{11af} NFD",
    "👩🏽‍💻 🏳️‍🌈 🇯🇵🇰🇷 ✌🏿 ❤️",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "12345678901234567890 3.14e-10 0xDEADBEEF 1,000,000",
    "I'm you're they've we'd she'll IT'S DON'T",
    "Ünïcödé façade — “quotes” … ½ ⅔ ①",
    "mixed<|im_start|>special<|im_end|>and<start_of_turn>markers<end_of_turn><bos>",
    "<|im_start|><|im_start|>user\n<tool_call>{}</tool_call>",
    "a\u{00A0}b\u{3000}c\u{2003}d",
];

/// decode(encode(s)) == s for every string (no special tokens in the way), and the streaming
/// decoder gives the same text chunk by chunk with no replacement characters.
fn check_round_trip(tok: &Tokenizer) {
    for text in EXTRA {
        for parse_special in [false, true] {
            let ids = tok.encode(text, false, parse_special).unwrap();
            assert_eq!(
                tok.decode(&ids, false),
                *text,
                "round trip of {text:?} (parse_special={parse_special}): {ids:?}"
            );
            let mut dec = tok.stream_decoder(false);
            let mut streamed = String::new();
            for &id in &ids {
                let chunk = dec.push(id);
                assert!(
                    !chunk.contains('\u{FFFD}'),
                    "replacement char streaming {text:?}: {chunk:?}"
                );
                streamed.push_str(&chunk);
            }
            streamed.push_str(&dec.finish());
            assert_eq!(streamed, *text);
        }
    }
}

#[test]
fn qwen_matches_llama_cpp() {
    let tok = load("qwen");
    assert_eq!(tok.kind(), VocabKind::BytePairBpe);
    let n = check_golden(&tok, "qwen-tokenize-public.json");
    eprintln!("qwen: {n} golden strings match in both modes");
}

#[test]
fn gemma_matches_llama_cpp() {
    let tok = load("gemma");
    assert_eq!(tok.kind(), VocabKind::SentencePiece);
    let n = check_golden(&tok, "gemma-tokenize-public.json");
    eprintln!("gemma: {n} golden strings match in both modes");
}

#[test]
fn qwen_special_ids_and_eog() {
    let tok = load("qwen");
    assert_eq!(tok.vocab_size(), 151936);
    assert!(!tok.add_bos());
    assert_eq!(tok.bos_id(), Some(151643));
    assert_eq!(tok.eos_id(), Some(151645));
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert!(tok.is_eog(im_end) && tok.is_eog(eot));
    // Qwen2.5-Coder's FIM separators end generation too (llama.cpp's rule).
    for t in ["<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"] {
        assert!(tok.is_eog(tok.token_to_id(t).unwrap()), "{t}");
    }
    assert!(!tok.is_eog(tok.token_to_id("<|im_start|>").unwrap()));
    // llama.cpp's end-of-generation set for this vocabulary, including `</s>` (a normal token in
    // Qwen's vocabulary that llama.cpp turns into a control token because of its text).
    assert_eq!(
        tok.eog_ids(),
        [128247, 151643, 151645, 151662, 151663, 151664]
    );
    assert_eq!(tok.encode("a</s>b", false, true).unwrap(), [64, 128247, 65]);
    assert_eq!(
        tok.encode("a</s>b", false, false).unwrap(),
        [64, 522, 82, 51407]
    );
    assert!(!tok.is_eog(tok.token_to_id("Hello").unwrap()));
    assert_eq!(tok.id_to_token(9707), Some("Hello"));
    assert_eq!(tok.token_bytes(220), b" ");
    assert_eq!(tok.token_bytes(im_end), b"<|im_end|>");
    // No BOS for Qwen even with add_special.
    assert_eq!(
        tok.encode("Hi", true, true).unwrap(),
        tok.encode("Hi", false, true).unwrap()
    );
    // User-defined tokens are matched even without special parsing; control tokens are not.
    let tc = tok.token_to_id("<tool_call>").unwrap();
    assert_eq!(tok.encode("<tool_call>", false, false).unwrap(), vec![tc]);
    assert_ne!(tok.encode("<|im_start|>", false, false).unwrap().len(), 1);
    // skip_special drops control tokens only.
    let ids = tok
        .encode("<|im_start|>user\nhi<|im_end|>", false, true)
        .unwrap();
    assert_eq!(tok.decode(&ids, true), "user\nhi");
    assert_eq!(tok.decode(&ids, false), "<|im_start|>user\nhi<|im_end|>");
}

#[test]
fn gemma_special_ids_and_eog() {
    let tok = load("gemma");
    assert_eq!(tok.vocab_size(), 262144);
    assert!(tok.add_bos());
    assert!(!tok.add_space_prefix());
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), Some(1));
    let eot = tok.token_to_id("<end_of_turn>").unwrap();
    assert_eq!(eot, 106);
    assert!(tok.is_eog(1) && tok.is_eog(eot));
    assert!(!tok.is_eog(tok.token_to_id("<start_of_turn>").unwrap()));
    assert_eq!(tok.eog_ids(), [1, 106, 212]);
    // `</s>` is user-defined in Gemma's vocabulary; llama.cpp makes it a control (EOG) token, so
    // it is matched only when special tokens are parsed (ids from llama.cpp).
    assert_eq!(
        tok.encode("a</s>b", false, true).unwrap(),
        [236746, 212, 236763]
    );
    assert_eq!(
        tok.encode("a</s>b", false, false).unwrap(),
        [236746, 954, 236751, 236813, 236763]
    );
    assert_eq!(tok.encode("", true, true).unwrap(), vec![2]);
    assert_eq!(tok.encode("", false, true).unwrap(), Vec::<u32>::new());
    // SentencePiece pieces: ▁ is a space, <0xXX> is a byte.
    assert_eq!(tok.token_bytes(tok.token_to_id("<0x0A>").unwrap()), b"\n");
    assert_eq!(tok.token_bytes(tok.token_to_id("▁the").unwrap()), b" the");
    assert_eq!(tok.decode(&[2, 9259], true), tok.decode(&[9259], false));
}

#[test]
fn qwen_round_trips() {
    check_round_trip(&load("qwen"));
}

#[test]
fn gemma_round_trips() {
    check_round_trip(&load("gemma"));
}

/// Korean split into byte-level pieces: each syllable is three bytes and Qwen's vocabulary has
/// many syllables only as partial byte tokens, so the stream decoder must hold bytes back.
#[test]
fn qwen_stream_decoder_korean() {
    let tok = load("qwen");
    let text = "대한민국의 수도는 서울입니다. 쀍똠 ㅋㅋ";
    let ids = tok.encode(text, false, false).unwrap();
    let partial = ids
        .iter()
        .filter(|&&id| std::str::from_utf8(tok.token_bytes(id)).is_err())
        .count();
    assert!(
        partial > 0,
        "expected some tokens that are partial UTF-8: {ids:?}"
    );
    let mut dec = tok.stream_decoder(true);
    let mut out = String::new();
    let mut held_back = false;
    for &id in &ids {
        let chunk = dec.push(id);
        held_back |= !dec.pending_bytes().is_empty();
        assert!(!chunk.contains('\u{FFFD}'));
        assert!(std::str::from_utf8(chunk.as_bytes()).is_ok());
        out.push_str(&chunk);
    }
    assert!(held_back);
    out.push_str(&dec.finish());
    assert_eq!(out, text);
}
