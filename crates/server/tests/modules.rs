//! LoRA modules through the HTTP API on the real Qwen2.5-Coder-0.5B model: the llama.cpp
//! golden adapter cases run *concurrently* (one mixed batch: base, lora-a, lora-b, both) and
//! each matches llama.cpp token for token; modules load and unload at run time without
//! disturbing a request in flight; cached prompt prefixes are never shared across modules;
//! bad module requests are clear 4xx errors.

mod common;
#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use common::{get, json, post};
use modu_engine::{load_model, Tokenizer};
use modu_gguf::GgufFile;
use modu_server::{ServeConfig, ServedModel, ServerHandle};
use serde_json::{json, Value};

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
/// Tokens compared per golden case (the goldens have 32; fewer keeps the test quick).
const N: usize = 16;

/// Where run-time loads may read: the fixtures, the model cache (for the "not an adapter"
/// case) and a scratch directory holding a FIFO.
fn module_dirs() -> Vec<PathBuf> {
    let model = modu_hub::resolve(QWEN, &modu_hub::NoProgress).unwrap();
    vec![
        lora_fixture::lora("lora-a.gguf")
            .parent()
            .unwrap()
            .to_path_buf(),
        model.parent().unwrap().to_path_buf(),
        scratch(),
    ]
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("modu-module-dir-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let fifo = d.join("fifo.gguf");
    if !fifo.exists() {
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfifo failed");
    }
    d
}

fn qwen() -> (Arc<GgufFile>, ServedModel) {
    let path = modu_hub::resolve(QWEN, &modu_hub::NoProgress).expect("fetching qwen");
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let (id, aliases) = modu_server::model_names(QWEN, None);
    let served = ServedModel {
        model: load_model(file.clone()).unwrap(),
        tokenizer: Tokenizer::from_gguf(&file).unwrap(),
        file: file.clone(),
        id,
        aliases,
    };
    (file, served)
}

struct Server {
    _h: ServerHandle,
    base: String,
    tok: Tokenizer,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let (file, served) = qwen();
        let config = ServeConfig {
            port: 0,
            parallel: 4,
            ctx: 256,
            modules: vec![
                ("a".into(), lora_fixture::lora("lora-a.gguf")),
                ("b".into(), lora_fixture::lora("peft-lora-b")),
            ],
            module_dirs: module_dirs(),
            ..ServeConfig::default()
        };
        let h = modu_server::start(served, config, false).expect("starting the server");
        Server {
            base: format!("http://{}", h.addr),
            _h: h,
            tok: Tokenizer::from_gguf(&file).unwrap(),
        }
    })
}

/// Greedy completion text of `prompt` (token ids) with `extra` request fields.
fn complete(s: &Server, prompt: &[u32], extra: Value) -> Result<String, (u16, String)> {
    let mut body = json!({"prompt": prompt, "max_tokens": N, "temperature": 0.0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, text) = post(&s.base, "/v1/completions", &body.to_string());
    if status != 200 {
        return Err((status, text));
    }
    Ok(json(&text)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string())
}

/// The `lora` request list for golden adapter scales `[s0, s1]` (adapter 0 = "a", 1 = "b").
fn lora_list(scales: &[f64]) -> Value {
    let list: Vec<Value> = scales
        .iter()
        .zip(["a", "b"])
        .filter(|(s, _)| **s != 0.0)
        .map(|(s, n)| json!({"name": n, "scale": s}))
        .collect();
    json!({ "lora": list })
}

/// Greedy text of `prompt` with `modules` run alone through the engine (no server).
fn solo(prompt: &[u32], modules: &[modu_engine::ModuleRef]) -> String {
    let (file, served) = qwen();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let mut cache = served.model.new_cache(256);
    let params = modu_engine::generate::GenerateParams {
        max_tokens: N,
        sampling: modu_engine::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    modu_engine::generate::generate_with(
        served.model.as_ref(),
        &tok,
        &mut cache,
        prompt,
        &params,
        modules,
        |_, _| std::ops::ControlFlow::Continue(()),
    )
    .unwrap()
    .text
}

#[test]
fn golden_adapter_settings_in_one_mixed_batch_equal_solo_runs() {
    let s = server();
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/golden/lora/qwen-lora-public.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let cases = data["cases"].as_array().unwrap();
    // One case of each setting (a0, a1, a0_half, a0_a1: lora-a, lora-b, lora-a at 0.5, both),
    // sent at once so they share batch steps, plus the base model.
    let mut picked: Vec<&Value> = Vec::new();
    for c in cases {
        if !picked.iter().any(|p| p["setting"] == c["setting"]) {
            picked.push(c);
        }
    }
    assert_eq!(picked.len(), 4, "settings: a0, a1, a0_half, a0_a1");
    let (_, served) = qwen();
    let shapes = served.model.module_shapes();
    let adapters = [
        Arc::new(
            modu_engine::LoraAdapter::open(lora_fixture::lora("lora-a.gguf"), Some(shapes))
                .unwrap(),
        ),
        Arc::new(
            modu_engine::LoraAdapter::open(lora_fixture::lora("peft-lora-b"), Some(shapes))
                .unwrap(),
        ),
    ];
    let jobs: Vec<(Vec<u32>, Vec<f64>)> = picked
        .iter()
        .map(|c| {
            let ids = |v: &Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            let scales = c["adapter_scales"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            (ids(&c["prompt_ids"]), scales)
        })
        .chain(std::iter::once((vec![785, 3840, 315], vec![0.0, 0.0])))
        .collect();
    let got: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(prompt, scales)| {
                sc.spawn(move || complete(s, prompt, lora_list(scales)).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((prompt, scales), got) in jobs.iter().zip(&got) {
        let mods: Vec<modu_engine::ModuleRef> = adapters
            .iter()
            .zip(scales)
            .filter(|(_, s)| **s != 0.0)
            .map(|(a, s)| (a.clone(), *s as f32))
            .collect();
        assert_eq!(got, &solo(prompt, &mods), "scales {scales:?}");
    }
}

#[test]
fn model_name_selects_a_module_and_prefixes_are_not_shared_across_modules() {
    let s = server();
    // A prompt longer than two 16-token prefix blocks.
    let text =
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively \
                so that large n do not overflow the stack. The first two numbers are 0 and 1, and \
                every later number is the sum of the two before it.\"\"\"\n";
    let prompt = s.tok.encode(text, false, true).unwrap();
    assert!(prompt.len() > 32);
    // The module alone first (no cache), then the base model on the same prompt (which caches
    // its prefix), then the module again: it must not reuse the base model's keys and values.
    let alone = complete(s, &prompt, json!({"model": "a"})).unwrap();
    let base = complete(s, &prompt, json!({})).unwrap();
    let again = complete(s, &prompt, json!({"model": "a"})).unwrap();
    assert_ne!(alone, base, "the adapter changes the output");
    assert_eq!(again, alone);
    // base:NAME and an explicit lora list give the same as model NAME.
    assert_eq!(
        complete(s, &prompt, json!({"model": "base:a"})).unwrap(),
        alone
    );
    assert_eq!(
        complete(s, &prompt, json!({"lora": [{"name": "a", "scale": 1.0}]})).unwrap(),
        alone
    );
    // Scale 0 is the base model.
    assert_eq!(
        complete(s, &prompt, json!({"model": "a", "lora_scale": 0.0})).unwrap(),
        base
    );
    // /v1/models lists the modules.
    let (_, models) = get(&s.base, "/v1/models");
    let ids: Vec<String> = json(&models)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&"a".to_string()) && ids.contains(&"b".to_string()),
        "{ids:?}"
    );
}

#[test]
fn modules_load_and_unload_at_run_time_without_disturbing_requests_in_flight() {
    let s = server();
    let prompt = s
        .tok
        .encode("Write a haiku about the sea.", false, true)
        .unwrap();
    let (st, body) = post(
        &s.base,
        "/v1/modules",
        &json!({"name": "c", "path": lora_fixture::lora("lora-a.gguf")}).to_string(),
    );
    assert_eq!(st, 200, "{body}");
    let loaded = json(&body);
    assert_eq!(loaded["rank"], 8);
    assert!(loaded["load_ms"].as_f64().unwrap() < 5000.0);
    let via_c = complete(s, &prompt, json!({"model": "c"})).unwrap();
    assert_eq!(via_c, complete(s, &prompt, json!({"model": "a"})).unwrap());
    // A long request on c is running while c is unloaded: it finishes on the weights it
    // started with.
    let long = std::thread::spawn({
        let base = s.base.clone();
        let prompt = prompt.clone();
        move || {
            let body = json!({"prompt": prompt, "max_tokens": 48, "temperature": 0.0, "model": "c", "ignore_eos": true});
            post(&base, "/v1/completions", &body.to_string())
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (st, body) = common::delete(&s.base, "/v1/modules/c");
    assert_eq!(st, 200, "{body}");
    let (st, body) = long.join().unwrap();
    assert_eq!(st, 200, "{body}");
    let text = json(&body)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.starts_with(&via_c), "{text:?} vs {via_c:?}");
    assert_eq!(json(&body)["usage"]["completion_tokens"], 48);
    // Gone for new requests.
    let (st, _) = complete(s, &prompt, json!({"model": "c"})).unwrap_err();
    assert_eq!(st, 404);
    let (_, list) = get(&s.base, "/v1/modules");
    let names: Vec<String> = json(&list)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn bad_module_requests_are_clear_errors() {
    let s = server();
    let model_path = modu_hub::resolve(QWEN, &modu_hub::NoProgress).unwrap();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/modules",
            json!({"name": "x", "path": "/nonexistent/adapter.gguf"}).to_string(),
            403,
            "nonexistent",
        ),
        (
            "/v1/modules",
            json!({"name": "x", "path": "/etc/hostname"}).to_string(),
            403,
            "outside the module directories",
        ),
        (
            "/v1/modules",
            json!({"name": "x", "path": scratch().join("fifo.gguf")}).to_string(),
            400,
            "not a regular file",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "a", "lora_scale": 10,
                   "lora": [{"name": "a", "scale": 10}]})
            .to_string(),
            400,
            "add up to 20",
        ),
        (
            "/v1/modules",
            json!({"name": "bad name!", "path": lora_fixture::lora("lora-a.gguf")}).to_string(),
            400,
            "invalid module name",
        ),
        (
            "/v1/modules",
            json!({"name": QWEN, "path": lora_fixture::lora("lora-a.gguf")}).to_string(),
            400,
            "base model",
        ),
        (
            "/v1/modules",
            json!({"name": "m", "path": model_path}).to_string(),
            400,
            "not an adapter",
        ),
        ("/v1/modules", json!({"name": "m"}).to_string(), 400, "path"),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "nope"}).to_string(),
            404,
            "nope",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "lora": [{"name": "nope"}]}).to_string(),
            404,
            "nope",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "lora_scale": 0.5}).to_string(),
            400,
            "lora_scale",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "a", "lora_scale": 1e9}).to_string(),
            400,
            "lora_scale",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "lora": [{"name": "a", "weight": 1}]}).to_string(),
            400,
            "weight",
        ),
    ];
    for (path, body, want, needle) in &cases {
        let (st, text) = post(&s.base, path, body);
        assert_eq!(st, *want, "{path} {body}: {text}");
        let msg = json(&text)["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    let (st, _) = common::delete(&s.base, "/v1/modules/never-loaded");
    assert_eq!(st, 404);
    let (st, _) = get(&s.base, "/health");
    assert_eq!(st, 200);
}
