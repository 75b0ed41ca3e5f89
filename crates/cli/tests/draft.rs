//! `modu run --draft MODEL`: speculative decoding with a draft model of the same vocabulary
//! prints exactly the greedy text of a plain run and reports what it drafted; a draft model of
//! another vocabulary, or one together with a grammar, is refused with a message naming it.
//! `modu bench spec --draft MODEL` measures it (and checks the outputs identical itself).

mod common;

use common::modu;

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

#[test]
fn bench_spec_measures_a_draft_model() {
    let dir = std::env::temp_dir().join(format!("modu-draft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"copy\", \"workload\": \"copy\", \"lang\": \"en\", \"prompt\": \"Repeat: one two three four five six.\"}\n",
    )
    .unwrap();
    let out = modu(&[
        "bench",
        "spec",
        "-m",
        "qwen",
        "--draft",
        "qwen",
        "-n",
        "8",
        "-r",
        "1",
        "--json",
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["drafter"], "qwen");
    let p = &v["prompts"][0];
    assert!(p["drafted"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(
        p["drafted"], p["accepted"],
        "a model drafting for itself is always right: {p}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
