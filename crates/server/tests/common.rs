//! Shared setup: the real gemma-3-270m model (the smallest known one) served on an ephemeral
//! loopback port, and a tiny blocking HTTP client.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use modu_engine::{load_model, Tokenizer};
use modu_gguf::GgufFile;
use modu_server::{ServeConfig, ServedModel, ServerHandle};

pub const MODEL: &str = "gemma-3-270m";
/// Small context: keeps KV caches small and makes the over-long-prompt case cheap.
pub const CTX: usize = 512;

pub fn file() -> Arc<GgufFile> {
    static FILE: OnceLock<Arc<GgufFile>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = modu_hub::resolve(MODEL, &modu_hub::NoProgress).expect("fetching gemma-3-270m");
        Arc::new(GgufFile::open(&path).expect("opening the model"))
    })
    .clone()
}

/// A known model (fetched if needed) ready to serve under its own name.
pub fn served_named(name: &str) -> ServedModel {
    let path = modu_hub::resolve(name, &modu_hub::NoProgress)
        .unwrap_or_else(|e| panic!("fetching {name}: {e}"));
    let file = Arc::new(GgufFile::open(&path).expect("opening the model"));
    let (id, aliases) = modu_server::model_names(name, None);
    ServedModel {
        model: load_model(file.clone()).unwrap(),
        tokenizer: Tokenizer::from_gguf(&file).unwrap(),
        file,
        id,
        aliases,
    }
}

pub fn served() -> ServedModel {
    let file = file();
    let (id, aliases) = modu_server::model_names(MODEL, None);
    ServedModel {
        model: load_model(file.clone()).unwrap(),
        tokenizer: Tokenizer::from_gguf(&file).unwrap(),
        file,
        id,
        aliases,
    }
}

pub fn start(parallel: usize, max_queue: usize) -> ServerHandle {
    let config = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        parallel,
        max_queue,
        ctx: CTX,
        allow_remote: false,
        prefill_chunk: 16,
        kv_mem: 0,
        ..ServeConfig::default()
    };
    modu_server::start(served(), config, false).expect("starting the server")
}

/// One server shared by the tests of a binary (they run concurrently, which also exercises
/// batching).
pub fn shared() -> String {
    static SERVER: OnceLock<ServerHandle> = OnceLock::new();
    let h = SERVER.get_or_init(|| start(4, 16));
    format!("http://{}", h.addr)
}

/// POST a JSON text; returns (status, body) for success and error statuses alike.
pub fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let r = ureq::post(&format!("{base}{path}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("{base}{path}")).call() {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn delete(base: &str, path: &str) -> (u16, String) {
    match ureq::delete(&format!("{base}{path}")).call() {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// A value of a metric line without labels.
pub fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}
