//! `modu run --draft MODEL`: speculative decoding with a draft model of the same vocabulary
//! prints exactly the greedy text of a plain run and reports what it drafted; a draft model of
//! another vocabulary, or one together with a grammar, is refused with a message naming it.

use std::process::Command;

fn modu(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(args)
        .output()
        .expect("spawn modu")
}

const PROMPT: &str = "Copy this line exactly: the quick brown fox jumps over the lazy dog.";

#[test]
fn draft_model_output_is_the_plain_output() {
    let base = [
        "run", "-m", "qwen", "-p", PROMPT, "--temp", "0", "-n", "24", "--chat",
    ];
    let plain = modu(&base);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let mut args = base.to_vec();
    args.extend(["--draft", "qwen", "--spec-draft", "4", "-v"]);
    let drafted = modu(&args);
    let err = String::from_utf8_lossy(&drafted.stderr);
    assert!(drafted.status.success(), "{err}");
    assert_eq!(drafted.stdout, plain.stdout, "the same text");
    assert!(err.contains("speculative (draft model):"), "{err}");
}

#[test]
fn draft_models_of_another_vocabulary_or_with_a_grammar_are_refused() {
    let out = modu(&[
        "run", "-m", "qwen", "-p", "hi", "-n", "2", "--draft", "gemma",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--draft gemma") && err.contains("token"),
        "{err}"
    );
    let out = modu(&[
        "run", "-m", "qwen", "-p", "hi", "-n", "2", "--draft", "qwen", "--regex", "[a-z]+",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--draft") && err.contains("--regex"), "{err}");
}
