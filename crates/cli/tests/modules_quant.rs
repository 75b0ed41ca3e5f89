//! End-to-end tests of `modu run --module`, `modu module info|merge`, `modu quantize`,
//! `modu eval` and `modu imatrix` on the real models (split from `cli.rs`; the same helpers).

mod common;

use common::run::*;
use serde_json::Value;

#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;

// ---------------------------------------------------------------------------------------------
// LoRA modules: `modu run --module`, `modu module info|merge`

/// The LoRA test adapters (tests/golden/lora; PEFT twins per tests/lora_fixture.rs).
fn shared_lora(name: &str) -> String {
    lora_fixture::lora(name).to_str().unwrap().to_string()
}

fn run_ids(extra: &[&str], prompt: &str, n: &str) -> (Vec<u32>, Vec<u32>) {
    let mut args = vec![
        "run", "-m", QWEN, "-p", prompt, "--temp", "0", "-n", n, "--json",
    ];
    args.extend_from_slice(extra);
    let (p, toks) = parse_run_json(&ok(&args), 0);
    (p, toks.iter().map(|t| t.id).collect())
}

#[test]
fn run_with_modules_matches_llama_cpp() {
    let g = golden("lora/qwen-lora-public.json");
    let cases = g["cases"].as_array().unwrap();
    // "def fibonacci(n):\n" with lora-a at 1.0 (GGUF) and lora-b at 1.0 (PEFT directory).
    for (setting, module) in [
        ("a0", format!("{}=1", shared_lora("lora-a.gguf"))),
        ("a1", shared_lora("peft-lora-b")),
        ("a0_half", format!("{}=0.5", shared_lora("lora-a.gguf"))),
    ] {
        let c = cases
            .iter()
            .find(|c| c["setting"] == setting && c["prompt_text"] == "def fibonacci(n):\n")
            .unwrap();
        let want = ids(&c["generated_ids"]);
        let (prompt, got) = run_ids(&["--module", &module], "def fibonacci(n):\n", "16");
        assert_eq!(prompt, ids(&c["prompt_ids"]));
        assert_eq!(got, want[..16], "{setting}");
    }
    // Scale 0 is the base model; the adapter changes the output.
    let p = "The history of the printing press begins";
    let (_, base) = run_ids(&[], p, "8");
    let zero = format!("{}=0", shared_lora("lora-a.gguf"));
    assert_eq!(run_ids(&["--module", &zero], p, "8").1, base);
    let one = shared_lora("lora-a.gguf");
    assert_ne!(run_ids(&["--module", &one], p, "8").1, base);
}

#[test]
fn module_info_describes_adapters() {
    let out = ok(&["module", "info", &shared_lora("lora-a.gguf")]);
    for want in [
        "gguf-lora",
        "qwen2",
        "rank:        8",
        "alpha:       16",
        "168 A/B pairs",
        "attn_q",
        "ffn_down",
        "8798208",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = ok(&["module", "info", "--json", &shared_lora("peft-lora-a")]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "peft");
    assert_eq!(v["rank"], 8);
    assert_eq!(v["alpha"], 16.0);
    assert_eq!(v["tensors"], 168);
    assert_eq!(v["targets"].as_array().unwrap().len(), 7);
    assert_eq!(v["base_model"], "Qwen/Qwen2.5-Coder-0.5B-Instruct");
    let out = ok(&["module", "info", "--tensors", &shared_lora("lora-b.gguf")]);
    assert!(out.contains("blk.23.ffn_down"), "{out}");
}

#[test]
fn module_errors_are_clean() {
    let model = model_path(QWEN);
    fails(
        &["module", "info", model.to_str().unwrap()],
        1,
        &["not an adapter"],
    );
    fails(
        &["module", "info", "/no/such/adapter.gguf"],
        1,
        &["no such file"],
    );
    let junk = TempFile::new("junk-adapter.gguf", b"GGUF\x03\x00\x00\x00");
    fails(&["module", "info", junk.path()], 1, &["truncated"]);
    // A Qwen adapter on the Gemma model.
    fails(
        &[
            "run",
            "-m",
            GEMMA,
            "-p",
            "hi",
            "-n",
            "1",
            "--module",
            &shared_lora("lora-a.gguf"),
        ],
        1,
        &["loading module", "wrong base model"],
    );
    fails(
        &[
            "run",
            "-m",
            QWEN,
            "-p",
            "hi",
            "-n",
            "1",
            "--module",
            "/no/such/dir",
        ],
        1,
        &["loading module"],
    );
    fails(
        &[
            "module",
            "merge",
            "--weights",
            "1",
            &shared_lora("lora-a.gguf"),
            &shared_lora("lora-b.gguf"),
            "-o",
            "/tmp/x.gguf",
        ],
        1,
        &["--weights has 1 values for 2 adapters"],
    );
}

/// A linear merge is exact: running the merged adapter gives what running both gives.
#[test]
fn module_merge_linear_equals_both_modules() {
    let out =
        std::env::temp_dir().join(format!("modu-cli-test-{}-merged.gguf", std::process::id()));
    let out_s = out.to_str().unwrap();
    let (a, b) = (shared_lora("lora-a.gguf"), shared_lora("lora-b.gguf"));
    ok(&[
        "module",
        "merge",
        "--method",
        "linear",
        "--weights",
        "1,0.5",
        &a,
        &b,
        "-o",
        out_s,
    ]);
    let info = ok(&["module", "info", out_s]);
    assert!(info.contains("rank:        16"), "{info}");
    let p = "def fibonacci(n):\n";
    let merged = run_ids(&["--module", out_s], p, "12").1;
    let bhalf = format!("{b}=0.5");
    let both = run_ids(&["--module", &a, "--module", &bhalf], p, "12").1;
    let _ = std::fs::remove_file(&out);
    assert_eq!(merged, both);
}

#[test]
fn quantize_eval_imatrix_errors_are_clear() {
    let garbage = TempFile::new("q-garbage.gguf", b"definitely not a gguf file at all");
    let out = std::env::temp_dir().join(format!("modu-cli-test-{}-q-out.gguf", std::process::id()));
    let o = out.to_str().unwrap();
    fails(
        &["quantize", garbage.path(), o, "--type", "Q4_K_M"],
        1,
        &["not a GGUF file"],
    );
    assert!(!out.exists(), "no output may be left behind");
    let q = model_path(GEMMA);
    let q = q.to_str().unwrap();
    fails(
        &["quantize", q, o, "--type", "Q9_K"],
        1,
        &["unknown quantization type", "Q4_K_M"],
    );
    fails(
        &[
            "quantize",
            q,
            o,
            "--type",
            "Q4_0",
            "--keep",
            "output.weight",
        ],
        1,
        &["TENSOR=TYPE"],
    );
    fails(
        &[
            "quantize",
            q,
            o,
            "--type",
            "Q4_0",
            "--imatrix",
            garbage.path(),
        ],
        1,
        &[garbage.path()],
    );
    assert!(!out.exists());
    let short = TempFile::new("q-short.txt", b"hello");
    fails(
        &["eval", "ppl", "-m", QWEN, "-f", short.path(), "--ctx", "64"],
        1,
        &["tokens", "--ctx 64"],
    );
    fails(
        &[
            "eval",
            "kld",
            "--base",
            QWEN,
            "-m",
            GEMMA,
            "-f",
            short.path(),
        ],
        1,
        &["vocabularies differ"],
    );
    fails(
        &["eval", "ppl", "-m", QWEN, "-f", "/nonexistent/text.txt"],
        1,
        &["/nonexistent/text.txt"],
    );
}

#[test]
fn eval_ppl_json_on_a_short_text() {
    let text: String = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let t = TempFile::new("ppl.txt", text.as_bytes());
    let out = ok(&[
        "eval",
        "ppl",
        "-m",
        QWEN,
        "-f",
        t.path(),
        "--ctx",
        "32",
        "--chunks",
        "2",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["windows"], 2);
    assert_eq!(v["tokens_scored"], 2 * 15);
    let ppl = v["ppl"].as_f64().unwrap();
    // A repeated sentence becomes very predictable.
    assert!(ppl > 1.0 && ppl < 5.0, "ppl {ppl}");
}

#[test]
fn eval_module_kld_json() {
    let text: String = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let t = TempFile::new("module-kld.txt", text.as_bytes());
    let lora = shared_lora("lora-a.gguf");
    let run = |scale: &str| -> Value {
        let out = ok(&[
            "eval",
            "module",
            "-m",
            QWEN,
            "--module",
            &lora,
            "--scale",
            scale,
            "-f",
            t.path(),
            "--ctx",
            "32",
            "--chunks",
            "1",
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let zero = run("0");
    assert_eq!(zero["kld_mean"].as_f64(), Some(0.0));
    assert_eq!(zero["tokens_scored"], 15);
    let one = run("1");
    assert!(one["kld_mean"].as_f64().unwrap() > 1e-4, "{one}");
}

#[test]
fn quantize_bad_hf_directory_leaves_no_output() {
    let dir = std::env::temp_dir().join(format!("modu-cli-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["MistralForCausalLM"]}"#,
    )
    .unwrap();
    let out = dir.join("out.gguf");
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    fails(
        &["quantize", d, o, "--type", "Q8_0"],
        1,
        &["MistralForCausalLM", "Qwen2ForCausalLM"],
    );
    assert!(!out.exists());
    std::fs::remove_file(dir.join("config.json")).unwrap();
    fails(&["quantize", d, o, "--type", "Q8_0"], 1, &["config.json"]);
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
