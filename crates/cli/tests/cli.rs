//! End-to-end tests of the `modu` binary: the command line is how correctness is checked from
//! outside, so these run the built binary on the two real models (resolved through the project's
//! own model cache with its default `MODU_HOME` behaviour; a missing model is fetched, never
//! skipped): options, sampling, errors, `info`/`list`, benches. The golden comparisons are in
//! `golden_cli.rs`, modules/quantize/eval in `modules_quant.rs`.

use std::io::Read;
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;

use common::modu;
use common::run::*;

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
