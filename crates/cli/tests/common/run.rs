//! Helpers of the tests that run `modu run`/`modu tokenize`/... to completion and read what
//! they print (`cli.rs`, `modules_quant.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::modu;

pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
pub const GEMMA: &str = "gemma-3-270m";

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run and require success (and no panic); returns stdout.
pub fn ok(args: &[&str]) -> String {
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
pub fn fails(args: &[&str], code: i32, expect: &[&str]) -> String {
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

pub fn golden(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(file);
    let s = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id array: {v}"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).unwrap())
        .collect()
}

pub fn case<'a>(g: &'a Value, id: &str) -> &'a Value {
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no golden case {id}"))
}

/// Path of a known model in the cache (fetched if missing).
pub fn model_path(name: &str) -> PathBuf {
    modu_hub::resolve(name, &modu_hub::NoProgress)
        .unwrap_or_else(|e| panic!("cannot fetch test model {name}: {e}"))
}

/// A scratch file that is removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("modu-cli-test-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(|k| k.as_str())
        .collect()
}

pub fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

/// One generated token as `modu run --json` reports it.
#[derive(Debug)]
pub struct Tok {
    pub id: u32,
    pub text: String,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// Parse `modu run --json` output, checking its exact shape: one JSON object on one line with
/// exactly the keys `prompt_tokens` and `tokens`; each token exactly `id`, `text`, `logprob`,
/// `top`; each `top` entry exactly `id`, `logprob`; `k` entries sorted by log-probability
/// (descending, distinct ids); every log-probability finite and ≤ 0.
pub fn parse_run_json(stdout: &str, k: usize) -> (Vec<u32>, Vec<Tok>) {
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
