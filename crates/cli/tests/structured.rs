//! `modu run` with an output constraint (--json-schema, --json-object, --grammar, --regex) on
//! the real Qwen2.5-Coder-0.5B: sampled output follows the constraint; bad constraint files are
//! clear errors.

mod common;

use std::path::PathBuf;

use common::modu;

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("modu-cli-structured-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = modu(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn run_follows_a_json_schema_file_and_a_grammar_file() {
    let schema = temp_file(
        "city.json",
        r#"{"type": "object", "properties": {"city": {"enum": ["Seoul", "Busan", "Incheon"]},
            "population_millions": {"type": "number", "minimum": 0, "maximum": 30}},
            "required": ["city", "population_millions"], "additionalProperties": false}"#,
    );
    let s = schema.to_str().unwrap();
    for seed in ["1", "2"] {
        let (ok, out, err) = run(&[
            "run",
            "-m",
            QWEN,
            "--chat",
            "-p",
            "Name a Korean city with its population.",
            "--json-schema",
            s,
            "--temp",
            "1.0",
            "--seed",
            seed,
            "-n",
            "60",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(
            ["Seoul", "Busan", "Incheon"].contains(&v["city"].as_str().unwrap()),
            "{out}"
        );
        let p = v["population_millions"].as_f64().unwrap();
        assert!((0.0..=30.0).contains(&p), "{out}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{out}");
    }
    let lark = temp_file("yesno.lark", "start: (\"네\" | \"아니요\") \".\"\n");
    let (ok, out, err) = run(&[
        "run",
        "-m",
        QWEN,
        "--chat",
        "-p",
        "부산은 바다에 있나요?",
        "--grammar",
        lark.to_str().unwrap(),
        "--temp",
        "1.0",
        "--seed",
        "3",
        "-n",
        "10",
    ]);
    assert!(ok, "{err}");
    assert!(out.trim() == "네." || out.trim() == "아니요.", "{out:?}");
}

#[test]
fn bad_constraints_are_named() {
    let not_json = temp_file("bad.json", "{ not json");
    let (ok, _, err) = run(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "x",
        "--json-schema",
        not_json.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("bad.json") && err.contains("not JSON"),
        "{err}"
    );
    let bad_grammar = temp_file("bad.lark", "start: (\"a\"\n");
    let (ok, _, err) = run(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "x",
        "--grammar",
        bad_grammar.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.starts_with("error:") && err.contains("grammar"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "x",
        "--json-schema",
        "/nonexistent/s.json",
    ]);
    assert!(!ok && err.contains("/nonexistent/s.json"), "{err}");
}
