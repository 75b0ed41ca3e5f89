//! End-to-end tests of the `modu` binary: the command line is how correctness is checked from
//! outside, so these run the built binary on the two real models (resolved through the project's
//! own model cache with its default `MODU_HOME` behaviour; a missing model is fetched, never
//! skipped) and compare what it prints with llama.cpp's goldens in tests/golden/.
//!
//! Greedy continuations are held to the rule of crates/engine/tests/common/golden.rs: the
//! generated ids equal llama.cpp's until a step where they differ, and a difference is only
//! accepted where llama.cpp's top-2 probability margin is below 0.03 (llama.cpp's own builds
//! for different instruction sets part at such near-ties); the comparison of that case ends
//! there. Probabilities of llama.cpp's top tokens agree within 0.1.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
const GEMMA: &str = "gemma-3-270m";
/// llama.cpp's top-2 margin below which our argmax may legitimately differ.
const NEAR_TIE: f64 = 0.03;

// ---------------------------------------------------------------------------------------------
// Helpers

fn modu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn modu")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run and require success (and no panic); returns stdout.
fn ok(args: &[&str]) -> String {
    let out = modu(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "modu {args:?} failed ({}):\nstderr: {stderr}\nstdout: {stdout}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "modu {args:?} panicked:\n{stderr}"
    );
    stdout
}

/// Run and require a clean failure: non-zero exit `code`, an `error:` line naming every fragment
/// in `expect` (case-insensitive), no panic and nothing on stdout. Returns stderr.
fn fails(args: &[&str], code: i32, expect: &[&str]) -> String {
    let out = modu(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        !stderr.contains("panicked"),
        "modu {args:?} panicked:\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "modu {args:?}: exit status {}, want {code}\nstderr: {stderr}\nstdout: {stdout}",
        out.status
    );
    assert!(
        stderr.starts_with("error:"),
        "modu {args:?}: stderr should start with `error:`:\n{stderr}"
    );
    let lower = stderr.to_lowercase();
    for e in expect {
        assert!(
            lower.contains(&e.to_lowercase()),
            "modu {args:?}: stderr should mention {e:?}:\n{stderr}"
        );
    }
    assert!(
        stdout.trim().is_empty(),
        "modu {args:?}: nothing should reach stdout on error, got:\n{stdout}"
    );
    stderr
}

fn golden(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(file);
    let s = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id array: {v}"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).unwrap())
        .collect()
}

fn case<'a>(g: &'a Value, id: &str) -> &'a Value {
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no golden case {id}"))
}

/// Path of a known model in the cache (fetched if missing).
fn model_path(name: &str) -> PathBuf {
    modu_hub::resolve(name, &modu_hub::NoProgress)
        .unwrap_or_else(|e| panic!("cannot fetch test model {name}: {e}"))
}

/// A scratch file that is removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("modu-cli-test-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(|k| k.as_str())
        .collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

/// One generated token as `modu run --json` reports it.
#[derive(Debug)]
struct Tok {
    id: u32,
    text: String,
    logprob: f64,
    top: Vec<(u32, f64)>,
}

/// Parse `modu run --json` output, checking its exact shape: one JSON object on one line with
/// exactly the keys `prompt_tokens` and `tokens`; each token exactly `id`, `text`, `logprob`,
/// `top`; each `top` entry exactly `id`, `logprob`; `k` entries sorted by log-probability
/// (descending, distinct ids); every log-probability finite and ≤ 0.
fn parse_run_json(stdout: &str, k: usize) -> (Vec<u32>, Vec<Tok>) {
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints exactly one line, got:\n{stdout}"
    );
    assert!(
        stdout.starts_with(r#"{"prompt_tokens":["#),
        "keys in the documented order: {stdout}"
    );
    let mut values = serde_json::Deserializer::from_str(stdout).into_iter::<Value>();
    let v = values
        .next()
        .expect("a JSON value")
        .unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{stdout}"));
    assert!(values.next().is_none(), "exactly one JSON value: {stdout}");
    assert_eq!(keys(&v), set(&["prompt_tokens", "tokens"]), "{v}");
    let prompt = ids(&v["prompt_tokens"]);
    let mut toks = vec![];
    for t in v["tokens"].as_array().expect("tokens array") {
        assert_eq!(keys(t), set(&["id", "text", "logprob", "top"]), "{t}");
        let lp = t["logprob"].as_f64().expect("logprob is a number");
        assert!(lp.is_finite() && lp <= 0.0, "logprob {lp} in {t}");
        let mut top = vec![];
        for e in t["top"].as_array().expect("top array") {
            assert_eq!(keys(e), set(&["id", "logprob"]), "{e}");
            let elp = e["logprob"].as_f64().expect("number");
            assert!(elp.is_finite() && elp <= 0.0, "top logprob {elp} in {t}");
            top.push((e["id"].as_u64().unwrap() as u32, elp));
        }
        assert_eq!(top.len(), k, "--logprobs {k}: {t}");
        assert!(
            top.windows(2).all(|w| w[0].1 >= w[1].1),
            "top sorted by logprob, descending: {t}"
        );
        let distinct: BTreeSet<u32> = top.iter().map(|e| e.0).collect();
        assert_eq!(distinct.len(), top.len(), "distinct top ids: {t}");
        if let Some(&(_, best)) = top.first() {
            assert!(lp <= best, "no token is more likely than top[0]: {t}");
            // The top entries are a probability distribution's largest terms.
            let mass: f64 = top.iter().map(|e| e.1.exp()).sum();
            assert!(mass <= 1.0 + 1e-4, "top probabilities sum to {mass}: {t}");
        }
        toks.push(Tok {
            id: t["id"].as_u64().unwrap() as u32,
            text: t["text"].as_str().expect("text").to_string(),
            logprob: lp,
            top,
        });
    }
    (prompt, toks)
}

/// Greedy tokens: each is its step's most likely token, with that token's log-probability.
fn check_greedy(toks: &[Tok]) {
    for (i, t) in toks.iter().enumerate() {
        let (id0, lp0) = t.top[0];
        assert_eq!(t.id, id0, "step {i}: greedy picks top[0]");
        assert_eq!(t.logprob, lp0, "step {i}: logprob equals top[0]'s");
    }
}

/// Compare our greedy tokens with a golden case's continuation under the near-tie rule; returns
/// how many steps agreed.
fn compare_with_golden(what: &str, c: &Value, toks: &[Tok]) -> usize {
    let want = ids(&c["generated_ids"]);
    let steps = c["steps"].as_array().unwrap();
    let mut agreed = 0;
    for (i, t) in toks.iter().enumerate().take(want.len()) {
        let golden_top: Vec<(u32, f64)> = steps[i]["top"]
            .as_array()
            .filter(|_| steps[i]["probs_reported"].as_bool().unwrap_or(true))
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["id"].as_u64().unwrap() as u32,
                            e["prob"].as_f64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if t.id != want[i] {
            // Where llama.cpp reported no probabilities, judge the tie by ours.
            let margin = if golden_top.len() >= 2 {
                golden_top[0].1 - golden_top[1].1
            } else {
                t.top[0].1.exp() - t.top[1].1.exp()
            };
            assert!(
                margin < NEAR_TIE,
                "{what} step {i}: generated {} ({:?}), llama.cpp {} with top-2 margin {margin:.3}",
                t.id,
                t.text,
                want[i]
            );
            break;
        }
        // Same token: our probabilities of llama.cpp's top tokens agree with its own.
        for &(id, lp) in &t.top {
            if let Some(&(_, p)) = golden_top.iter().find(|e| e.0 == id) {
                assert!(
                    (lp.exp() - p).abs() <= 0.1,
                    "{what} step {i}: p(token {id}) = {:.4}, llama.cpp {p:.4}",
                    lp.exp()
                );
            }
        }
        agreed += 1;
    }
    // Where every piece is whole UTF-8, the pieces spell llama.cpp's text.
    let spelled: String = toks[..agreed].iter().map(|t| t.text.as_str()).collect();
    if !spelled.contains('\u{FFFD}') {
        let golden_text = c["generated_text"].as_str().unwrap();
        assert!(
            golden_text.starts_with(&spelled),
            "{what}: token texts {spelled:?} are not a prefix of llama.cpp's {golden_text:?}"
        );
    }
    agreed
}

/// `modu run --temp 0 -n 8 --logprobs 5 --json` on every plain-text golden case of a model.
fn greedy_json_matches_golden(model: &str, golden_file: &str, bos: Option<u32>) {
    let g = golden(golden_file);
    let mut agreed = 0;
    let mut n_cases = 0;
    for c in g["cases"].as_array().unwrap() {
        if !c["messages"].is_null() {
            continue; // chat cases: see chat_renders_the_models_template
        }
        let id = c["id"].as_str().unwrap();
        let prompt = c["prompt_text"].as_str().unwrap();
        let out = ok(&[
            "run",
            "-m",
            model,
            "-p",
            prompt,
            "--temp",
            "0",
            "-n",
            "8",
            "--logprobs",
            "5",
            "--json",
        ]);
        let (prompt_ids, toks) = parse_run_json(&out, 5);
        assert_eq!(
            prompt_ids,
            ids(&c["prompt_ids"]),
            "{model} {id}: prompt tokens"
        );
        if let Some(b) = bos {
            assert_eq!(prompt_ids[0], b, "{model} {id}: BOS first");
        }
        assert_eq!(toks.len(), 8, "{model} {id}: -n 8 gives 8 tokens");
        check_greedy(&toks);
        agreed += compare_with_golden(&format!("{model} {id}"), c, &toks);
        n_cases += 1;
    }
    eprintln!("{model}: {agreed} greedy steps agree with llama.cpp over {n_cases} cases");
    assert!(n_cases >= 3, "{golden_file}: only {n_cases} plain cases");
    // Most steps have clear margins: a broken model would not agree this far.
    assert!(
        agreed >= n_cases * 3,
        "{model}: only {agreed} greedy steps agree with llama.cpp over {n_cases} cases"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. `modu run --json`: shape and greedy continuations against llama.cpp

#[test]
fn qwen_greedy_json_matches_golden() {
    greedy_json_matches_golden(QWEN, "qwen-greedy-public.json", None);
}

#[test]
fn gemma_greedy_json_matches_golden() {
    greedy_json_matches_golden(GEMMA, "gemma-greedy-public.json", Some(2));
}

#[test]
fn json_without_logprobs_has_empty_top_and_text_mode_prints_text() {
    let g = golden("qwen-greedy-public.json");
    let c = case(&g, "code-1");
    let prompt = c["prompt_text"].as_str().unwrap();
    let (_, toks) = parse_run_json(
        &ok(&[
            "run", "-m", QWEN, "-p", prompt, "--temp", "0", "-n", "6", "--json",
        ]),
        0,
    );
    assert_eq!(
        toks.iter().map(|t| t.id).collect::<Vec<_>>(),
        ids(&c["generated_ids"])[..6]
    );
    // Text mode streams the same continuation, then a newline.
    let out = ok(&["run", "-m", QWEN, "-p", prompt, "--temp", "0", "-n", "6"]);
    let spelled: String = toks.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(out, format!("{spelled}\n"));
    assert!(c["generated_text"].as_str().unwrap().starts_with(&spelled));
}

#[test]
fn prompt_from_file() {
    let g = golden("qwen-greedy-public.json");
    let c = case(&g, "ko-1");
    let f = TempFile::new("prompt.txt", c["prompt_text"].as_str().unwrap().as_bytes());
    let (prompt, toks) = parse_run_json(
        &ok(&[
            "run",
            "-m",
            QWEN,
            "-f",
            f.path(),
            "--temp",
            "0",
            "-n",
            "1",
            "--json",
        ]),
        0,
    );
    assert_eq!(prompt, ids(&c["prompt_ids"]));
    assert_eq!(toks.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 2. Tokenization: special tokens in prompts, `modu tokenize`

#[test]
fn special_tokens_in_the_prompt_are_parsed() {
    let (prompt, toks) = parse_run_json(
        &ok(&[
            "run",
            "-m",
            QWEN,
            "-p",
            "<|im_start|>user\nhi<|im_end|>",
            "-n",
            "0",
            "--json",
        ]),
        0,
    );
    assert!(toks.is_empty());
    assert_eq!(
        prompt.first(),
        Some(&151644),
        "<|im_start|> is one token: {prompt:?}"
    );
    assert!(
        prompt.contains(&151645),
        "<|im_end|> is one token: {prompt:?}"
    );
    assert_eq!(prompt.len(), 5, "{prompt:?}");
}

fn tokenize_matches_golden(model: &str, golden_file: &str, indices: &[u64]) {
    let g = golden(golden_file);
    for &i in indices {
        let c = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["index"] == i)
            .unwrap_or_else(|| panic!("no tokenize case {i}"));
        let s = c["text"].as_str().unwrap();
        let got: Value = serde_json::from_str(&ok(&["tokenize", "-m", model, "--json", "--", s]))
            .expect("tokenize --json prints JSON");
        assert_eq!(ids(&got), ids(&c["ids_parse_special"]), "{model} {s:?}");
        if c["ids_parse_special"] == c["ids_no_parse_special"] {
            continue; // each `modu tokenize` builds the tokenizer: run only what differs
        }
        let got: Value = serde_json::from_str(&ok(&[
            "tokenize",
            "-m",
            model,
            "--json",
            "--no-parse-special",
            "--",
            s,
        ]))
        .unwrap();
        assert_eq!(
            ids(&got),
            ids(&c["ids_no_parse_special"]),
            "{model} {s:?} (no special)"
        );
    }
}

#[test]
fn qwen_tokenize_matches_golden() {
    // Plain English, Korean, code with tabs/newlines, special-token text, empty.
    tokenize_matches_golden(QWEN, "qwen-tokenize-public.json", &[0, 9, 18, 24, 30]);
}

#[test]
fn gemma_tokenize_matches_golden_with_bos() {
    tokenize_matches_golden(GEMMA, "gemma-tokenize-public.json", &[0, 15, 25, 30]);
    let got: Value =
        serde_json::from_str(&ok(&["tokenize", "-m", GEMMA, "--json", "Hello, world!"])).unwrap();
    assert_eq!(ids(&got)[0], 2, "gemma adds BOS");
    let got: Value = serde_json::from_str(&ok(&[
        "tokenize",
        "-m",
        GEMMA,
        "--json",
        "--no-bos",
        "Hello, world!",
    ]))
    .unwrap();
    assert_eq!(ids(&got), vec![9259, 236764, 1902, 236888]);
    // Without --json: one `id "piece"` line per token.
    let out = ok(&["tokenize", "-m", GEMMA, "Hello"]);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines, vec!["2 \"<bos>\"", "9259 \"Hello\""]);
}

// ---------------------------------------------------------------------------------------------
// 3. --chat and --chat-template

#[test]
fn chat_renders_the_models_template() {
    let g = golden("qwen-greedy-public.json");
    let c = case(&g, "chat-1");
    let msgs = c["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "system");
    assert_eq!(msgs[1]["role"], "user");
    let out = ok(&[
        "run",
        "-m",
        QWEN,
        "--chat",
        "--system",
        msgs[0]["content"].as_str().unwrap(),
        "-p",
        msgs[1]["content"].as_str().unwrap(),
        "--temp",
        "0",
        "-n",
        "8",
        "--logprobs",
        "3",
        "--json",
    ]);
    let (prompt, toks) = parse_run_json(&out, 3);
    assert_eq!(
        prompt,
        ids(&c["prompt_ids"]),
        "chat prompt as llama.cpp renders it"
    );
    check_greedy(&toks);
    assert!(compare_with_golden("qwen chat-1", c, &toks) >= 4);

    // Gemma ships no template: the built-in gemma format, BOS first.
    let (prompt, _) = parse_run_json(
        &ok(&[
            "run", "-m", GEMMA, "--chat", "-p", "Hi", "-n", "0", "--json",
        ]),
        0,
    );
    let want: Value = serde_json::from_str(&ok(&[
        "tokenize",
        "-m",
        GEMMA,
        "--json",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    ]))
    .unwrap();
    assert_eq!(prompt, ids(&want));
    assert_eq!(&prompt[..3], &[2, 105, 2364], "<bos><start_of_turn>user");
}

#[test]
fn chat_template_override() {
    let tpl = TempFile::new(
        "tpl.jinja",
        b"{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
          {% if add_generation_prompt %}[assistant]{% endif %}",
    );
    let (prompt, _) = parse_run_json(
        &ok(&[
            "run",
            "-m",
            QWEN,
            "--chat",
            "--chat-template",
            tpl.path(),
            "--system",
            "Be brief.",
            "-p",
            "hi",
            "-n",
            "0",
            "--json",
        ]),
        0,
    );
    let want: Value = serde_json::from_str(&ok(&[
        "tokenize",
        "-m",
        QWEN,
        "--json",
        "[system] Be brief.\n[user] hi\n[assistant]",
    ]))
    .unwrap();
    assert_eq!(prompt, ids(&want));
}

// ---------------------------------------------------------------------------------------------
// 4. Sampling, --stop, -n edge cases

#[test]
fn seeded_sampling_is_reproducible() {
    let run = |seed: &str| {
        let args = [
            "run",
            "-m",
            QWEN,
            "-p",
            "Once upon a time",
            "--temp",
            "0.8",
            "--seed",
            seed,
            "-n",
            "12",
            "--logprobs",
            "2",
            "--json",
        ];
        let out = ok(&args);
        let (_, toks) = parse_run_json(&out, 2);
        assert_eq!(toks.len(), 12);
        (out, toks.iter().map(|t| t.id).collect::<Vec<_>>())
    };
    let (a, ids_a) = run("42");
    let (b, _) = run("42");
    assert_eq!(a, b, "same seed and settings, same output");
    // A different seed gives a different continuation; three tries make a coincidence negligible.
    let others: Vec<Vec<u32>> = ["1", "2", "3"].iter().map(|s| run(s).1).collect();
    assert!(
        others.iter().any(|o| *o != ids_a),
        "seeds 1, 2, 3 all gave seed 42's tokens {ids_a:?}"
    );
}

#[test]
fn stop_strings_cut_the_text() {
    // llama.cpp: " red, blue, and green." with wide margins on the first steps.
    let p = "The three primary colors are";
    let base = ["run", "-m", QWEN, "-p", p, "--temp", "0", "-n", "8"];
    let with = |extra: &[&str]| ok(&[&base[..], extra].concat());
    // (Without a stop string: see empty_stop_string_is_ignored.)
    assert_eq!(with(&["--stop", ","]), " red\n");
    // A stop string that ends inside a token, and one spanning tokens.
    assert_eq!(with(&["--stop", "lue"]), " red, b\n");
    assert_eq!(with(&["--stop", "d, bl"]), " re\n");
    // The first of several stop strings to appear wins.
    assert_eq!(with(&["--stop", "green", "--stop", "blue"]), " red, \n");
    // With --json, generation ends at the token that completed the stop string.
    let (_, toks) = parse_run_json(&with(&["--stop", ",", "--json"]), 0);
    assert_eq!(
        toks.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        [" red", ","]
    );
}

#[test]
fn n_predict_edge_cases() {
    let p = "The three primary colors are";
    let (prompt, toks) = parse_run_json(
        &ok(&[
            "run",
            "-m",
            QWEN,
            "-p",
            p,
            "-n",
            "0",
            "--json",
            "--logprobs",
            "3",
        ]),
        3,
    );
    assert_eq!(prompt, vec![785, 2326, 6028, 7987, 525]);
    assert!(toks.is_empty(), "-n 0 generates nothing");
    assert_eq!(ok(&["run", "-m", QWEN, "-p", p, "-n", "0"]).trim(), "");
    let (_, toks) = parse_run_json(
        &ok(&[
            "run",
            "-m",
            QWEN,
            "-p",
            p,
            "-n",
            "1",
            "--temp",
            "0",
            "--json",
            "--logprobs",
            "1",
        ]),
        1,
    );
    assert_eq!(toks.len(), 1);
    assert_eq!(toks[0].id, 2518, "\" red\"");
    assert_eq!(
        ok(&["run", "-m", QWEN, "-p", p, "-n", "1", "--temp", "0"]),
        " red\n"
    );
    // A context with room for the prompt and one more token generates exactly one.
    let (_, toks) = parse_run_json(
        &ok(&[
            "run", "-m", QWEN, "-p", p, "--ctx", "6", "-n", "5", "--temp", "0", "--json",
        ]),
        0,
    );
    assert!(!toks.is_empty() && toks.len() <= 2, "{} tokens", toks.len());
}

#[test]
fn negative_numbers_reach_the_options() {
    // `--repeat-last-n -1` (whole history) and negative penalties are legitimate values.
    let out = ok(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "The three primary colors are",
        "--temp",
        "0",
        "-n",
        "2",
        "--repeat-last-n",
        "-1",
        "--presence-penalty",
        "-0.5",
        "--json",
    ]);
    assert_eq!(parse_run_json(&out, 0).1.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 5. Errors: a clear message and a non-zero exit, never a panic

#[test]
fn model_resolution_errors() {
    fails(
        &["run", "-m", "/nonexistent/dir/model.gguf", "-p", "hi"],
        1,
        &["no such file", "/nonexistent/dir/model.gguf"],
    );
    let e = fails(
        &["run", "-m", "no-such-model", "-p", "hi"],
        1,
        &["unknown model"],
    );
    assert!(
        e.contains(QWEN) && e.contains(GEMMA),
        "lists the known models: {e}"
    );
    fails(
        &[
            "run",
            "-m",
            std::env::temp_dir().to_str().unwrap(),
            "-p",
            "hi",
        ],
        1,
        &["directory"],
    );
    fails(
        &["tokenize", "-m", "no-such-model", "hi"],
        1,
        &["unknown model"],
    );
    fails(&["info", "no-such-model"], 1, &["unknown model"]);
}

#[test]
fn broken_model_files() {
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let g = TempFile::new("garbage.gguf", &garbage);
    fails(
        &["run", "-m", g.path(), "-p", "hi"],
        1,
        &["not a GGUF file", g.path()],
    );
    fails(&["info", g.path()], 1, &["not a GGUF file"]);
    fails(&["tokenize", "-m", g.path(), "hi"], 1, &["not a GGUF file"]);
    let empty = TempFile::new("empty.gguf", b"");
    fails(&["run", "-m", empty.path(), "-p", "hi"], 1, &[empty.path()]);

    let mut real = Vec::new();
    std::fs::File::open(model_path(GEMMA))
        .unwrap()
        .take(20_000_000)
        .read_to_end(&mut real)
        .unwrap();
    // Cut inside the header's tensor count / metadata, and inside the tensor data.
    let t = TempFile::new("trunc1000.gguf", &real[..1000]);
    fails(
        &["run", "-m", t.path(), "-p", "hi"],
        1,
        &[t.path(), "tensor"],
    );
    let t = TempFile::new("trunc100k.gguf", &real[..100_000]);
    fails(
        &["run", "-m", t.path(), "-p", "hi"],
        1,
        &[t.path(), "tokenizer.ggml.tokens"],
    );
    let t = TempFile::new("trunc20m.gguf", &real);
    fails(
        &["run", "-m", t.path(), "-p", "hi"],
        1,
        &[t.path(), "outside"],
    );
}

#[test]
fn bad_options() {
    fn run<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["run", "-m", QWEN, "-p", "hi"][..], extra].concat()
    }
    fails(&run(&["--temp", "-1"]), 1, &["temperature", "-1"]);
    fails(&run(&["--temp", "nan"]), 1, &["temperature"]);
    fails(&run(&["--top-p", "0"]), 1, &["top_p"]);
    fails(&run(&["--top-p", "1.5"]), 1, &["top_p"]);
    fails(&run(&["--min-p", "-0.1"]), 1, &["min_p"]);
    fails(&run(&["--repeat-penalty", "0"]), 1, &["repeat_penalty"]);
    fails(&run(&["--threads", "0"]), 1, &["--threads"]);
    fails(&run(&["--ctx", "0"]), 1, &["--ctx"]);
    // Usage errors are clap's: exit 2.
    fails(&run(&["--temp", "warm"]), 2, &["--temp"]);
    fails(&run(&["-n", "-3"]), 2, &[]);
    fails(&run(&["--system", "x"]), 2, &["--chat"]);
    fails(&["run", "--no-such-flag"], 2, &["--no-such-flag"]);
}

#[test]
fn bad_prompts() {
    fails(&["run", "-m", QWEN], 1, &["-p"]);
    fails(&["run", "-m", QWEN, "-p", ""], 1, &["empty"]);
    fails(&["run", "-m", GEMMA, "-p", ""], 1, &["empty"]);
    let empty = TempFile::new("empty-prompt.txt", b"");
    fails(&["run", "-m", QWEN, "-f", empty.path()], 1, &["empty"]);
    fails(
        &["run", "-m", QWEN, "-f", "/nonexistent/prompt.txt"],
        1,
        &["prompt file", "/nonexistent/prompt.txt"],
    );
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
                fifteen sixteen seventeen eighteen";
    fails(
        &["run", "-m", QWEN, "--ctx", "16", "-p", long],
        1,
        &["context", "16", "--ctx"],
    );
}

#[test]
fn bad_chat_templates() {
    let broken = TempFile::new("broken.jinja", b"{% for m in messages %}{{ m.content ");
    fails(
        &[
            "run",
            "-m",
            QWEN,
            "-p",
            "hi",
            "--chat",
            "--chat-template",
            broken.path(),
        ],
        1,
        &["chat template"],
    );
    let raising = TempFile::new(
        "raise.jinja",
        b"{{ raise_exception('only system messages, please') }}",
    );
    fails(
        &[
            "run",
            "-m",
            QWEN,
            "-p",
            "hi",
            "--chat",
            "--chat-template",
            raising.path(),
        ],
        1,
        &["only system messages, please"],
    );
    fails(
        &[
            "run",
            "-m",
            QWEN,
            "-p",
            "hi",
            "--chat",
            "--chat-template",
            "/nonexistent/t.jinja",
        ],
        1,
        &["chat template", "/nonexistent/t.jinja"],
    );
}

// ---------------------------------------------------------------------------------------------
// 6. info, list, help

#[test]
fn info_shows_architecture_and_tensor_types() {
    let out = ok(&["info", "qwen"]);
    assert!(out.starts_with("GGUF version 3;"), "{out}");
    assert!(out.contains("general.architecture = \"qwen2\""), "{out}");
    assert!(out.contains("tokenizer.ggml.tokens = array[string] with 151936 elements"));
    assert!(out.contains("tensor types:"), "{out}");
    let types: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "tensor types:")
        .skip(1)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    for ty in ["F32", "Q4_K", "Q6_K", "Q8_0"] {
        assert!(types.contains(&ty), "{ty} in tensor summary {types:?}");
    }
    let total: usize = out
        .lines()
        .skip_while(|l| *l != "tensor types:")
        .skip(1)
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(total, 291, "tensor counts per type add up to the file's");

    let out = ok(&["info", "gemma", "--tensors"]);
    assert!(out.contains("general.architecture = \"gemma3\""), "{out}");
    assert!(out.contains("token_embd.weight"), "--tensors lists tensors");
}

#[test]
fn list_shows_both_models() {
    let out = ok(&["list"]);
    assert!(out.starts_with("cache: "), "{out}");
    for (name, alias) in [(QWEN, "qwen"), (GEMMA, "gemma")] {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        assert!(line.contains(alias), "{line}");
        assert!(line.contains("cached"), "{line}");
    }
}

#[test]
fn help_and_version() {
    let out = ok(&["--help"]);
    for cmd in ["pull", "list", "run", "chat", "tokenize", "info"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} in --help:\n{out}"
        );
    }
    assert!(ok(&["--version"]).starts_with("modu "));
    let out = modu(&[]);
    assert_eq!(out.status.code(), Some(2), "no subcommand is a usage error");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Usage") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn closed_stdout_does_not_panic() {
    // `modu info qwen | head -1`: the reader goes away before modu has written everything.
    let mut child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(["info", "qwen", "--tensors"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn values_may_start_with_a_hyphen() {
    // Markdown lists, YAML, diffs: prompts and stop strings often start with `-`.
    let (prompt, _) = parse_run_json(
        &ok(&["run", "-m", QWEN, "-p", "- buy milk", "-n", "0", "--json"]),
        0,
    );
    assert_eq!(prompt, vec![12, 3695, 14074], "\"-\", \" buy\", \" milk\"");
    let got: Value =
        serde_json::from_str(&ok(&["tokenize", "-m", QWEN, "- item", "--json"])).unwrap();
    assert_eq!(ids(&got), vec![12, 1509]);
    let out = ok(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "The three primary colors are",
        "--temp",
        "0",
        "-n",
        "5",
        "--stop",
        "-",
        "--stop",
        ", b",
    ]);
    assert_eq!(out, " red\n");
    parse_run_json(
        &ok(&[
            "run", "-m", QWEN, "--chat", "--system", "-x", "-p", "hi", "-n", "0", "--json",
        ]),
        0,
    );
}

#[test]
fn chat_subcommand_reads_turns_from_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(["chat", "-m", QWEN, "--temp", "0", "-n", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Two turns (the second reuses the cached prefix), then an empty line ends the session.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say hi\nAgain\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Each reply is streamed, then ended with a newline.
    assert!(stdout.lines().count() >= 2, "two replies: {stdout:?}");
    assert!(
        stdout.ends_with('\n') && !stdout.trim().is_empty(),
        "{stdout:?}"
    );
    // End of input straight away is a clean exit too.
    let out = modu(&["chat", "-m", QWEN]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    fails(&["chat", "-m", QWEN, "--temp", "-2"], 1, &["temperature"]);
}

#[test]
fn pull_of_a_cached_model_and_unknown_names() {
    let out = ok(&["pull", "gemma"]);
    assert!(
        out.contains("already cached") && out.contains(GEMMA),
        "{out}"
    );
    fails(
        &["pull", "no-such-model"],
        1,
        &["unknown model", QWEN, GEMMA],
    );
}

#[test]
fn verbose_timings_go_to_stderr() {
    let out = modu(&[
        "run", "-m", GEMMA, "-p", "Hello", "-n", "3", "--temp", "0", "--json", "-v",
    ]);
    assert!(out.status.success());
    parse_run_json(&text(&out.stdout), 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("prompt: 2 tokens") && stderr.contains("tok/s"),
        "{stderr}"
    );
}

#[test]
fn empty_stop_string_is_ignored() {
    let out = ok(&[
        "run",
        "-m",
        QWEN,
        "-p",
        "The three primary colors are",
        "--temp",
        "0",
        "-n",
        "4",
        "--stop",
        "",
    ]);
    assert_eq!(out, " red, blue,\n");
}

#[test]
fn bench_json_has_llama_bench_fields() {
    let out = ok(&[
        "bench", "-m", GEMMA, "-p", "8", "-n", "4", "-r", "2", "-t", "2", "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    for (row, (p, n)) in rows.iter().zip([(8, 0), (0, 4)]) {
        assert_eq!(row["n_prompt"], p, "{row}");
        assert_eq!(row["n_gen"], n, "{row}");
        assert_eq!(row["n_threads"], 2, "{row}");
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["stddev_ts"].as_f64().unwrap() >= 0.0, "{row}");
    }
}

#[test]
fn bench_serve_reports_every_level_without_errors() {
    let out = ok(&[
        "bench", "serve", "-m", GEMMA, "-c", "1,3", "-n", "6", "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    for (row, c) in rows.iter().zip([1, 3]) {
        assert_eq!(row["clients"], c, "{row}");
        assert_eq!(row["requests"], c, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        // ignore_eos: every request generates exactly -n tokens.
        assert_eq!(row["tokens"], 6 * c, "{row}");
        assert!(row["agg_tps"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ttft_p99_ms"].as_f64().unwrap() >= row["ttft_p50_ms"].as_f64().unwrap());
    }
    // Mixed modules: random rank-4 modules, one per client (cycled).
    let out = ok(&[
        "bench",
        "serve",
        "-m",
        GEMMA,
        "-c",
        "1,3",
        "-n",
        "4",
        "--modules",
        "2",
        "--module-rank",
        "4",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (row, (c, m)) in rows.as_array().unwrap().iter().zip([(1, 1), (3, 2)]) {
        assert_eq!(row["modules"], m, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["tokens"], 4 * c, "{row}");
    }
    // A server that is not there is a clear error, not a hang.
    let out = modu(&[
        "bench",
        "serve",
        "--url",
        "http://127.0.0.1:9",
        "-c",
        "1",
        "-n",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:9"), "{err}");
}

#[test]
fn bench_modules_registers_modules_while_streaming() {
    let out = ok(&[
        "bench", "modules", "-m", GEMMA, "--count", "3", "--rank", "4", "-n", "8", "--json",
    ]);
    let row: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(row["modules"], 3, "{row}");
    assert!(row["file_bytes"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["load_ms_max"].as_f64().unwrap() > 0.0, "{row}");
    assert!(
        row["stream_itl_p50_ms_loading"].as_f64().unwrap() > 0.0,
        "{row}"
    );
}
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
