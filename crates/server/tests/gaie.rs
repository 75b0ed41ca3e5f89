//! The Gateway API Inference Extension's model-server metrics (issue 20), parsed by the reference
//! Prometheus text parser (`prometheus_client`) under load on the real Qwen2.5-Coder-0.5B with two
//! modules: names, types, labels and values while one sequence runs and two wait, and again when
//! the server is idle. The whole `/metrics` page must parse.

mod common;
#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;
mod pyvenv;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::get;
use modu_server::ServeConfig;
use serde_json::{json, Value};

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";

/// `/metrics` as parsed families, by name.
fn scrape(base: &str) -> Vec<Value> {
    let (status, text) = get(base, "/metrics");
    assert_eq!(status, 200);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prom_parse.py");
    let mut child = Command::new(pyvenv::venv().join("bin/python"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The one sample of gauge family `name`: its labels and value.
fn gauge(fams: &[Value], name: &str) -> (Value, f64) {
    let f = fams
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"));
    assert_eq!(f["type"], "gauge", "{name}");
    let s = f["samples"].as_array().unwrap();
    assert_eq!(s.len(), 1, "{name}: {f}");
    (s[0]["labels"].clone(), s[0]["value"].as_f64().unwrap())
}

fn list(v: &Value) -> Vec<String> {
    let s = v.as_str().unwrap();
    let mut l: Vec<String> = s
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect();
    l.sort();
    l
}

#[test]
fn gaie_metrics_parse_and_mean_what_the_protocol_says() {
    let served = common::served_named(QWEN);
    let config = ServeConfig {
        port: 0,
        parallel: 1,
        ctx: 512,
        modules: vec![
            ("m0".into(), lora_fixture::lora("lora-a.gguf")),
            ("m1".into(), lora_fixture::lora("peft-lora-b")),
        ],
        ..ServeConfig::default()
    };
    let h = modu_server::start(served, config, false).expect("starting the server");
    let base = format!("http://{}", h.addr);

    let idle = scrape(&base);
    assert_eq!(gauge(&idle, "vllm:num_requests_waiting").1, 0.0);
    assert_eq!(gauge(&idle, "vllm:num_requests_running").1, 0.0);
    let (cache, one) = gauge(&idle, "vllm:cache_config_info");
    assert_eq!(one, 1.0);
    assert_eq!(cache["block_size"], modu_engine::KV_BLOCK.to_string());
    let blocks: u64 = cache["num_gpu_blocks"].as_str().unwrap().parse().unwrap();
    assert!(blocks >= (512 / modu_engine::KV_BLOCK) as u64, "{cache}");
    let (lora, t) = gauge(&idle, "vllm:lora_requests_info");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - t).abs() < 60.0,
        "the value is the reading's time: {t} vs {now}"
    );
    assert_eq!(
        list(&lora["running_lora_adapters"]),
        ["m0", "m1"],
        "both modules are in memory"
    );
    assert_eq!(list(&lora["waiting_lora_adapters"]), Vec::<String>::new());
    assert_eq!(lora["max_lora"], "2");

    // One running sequence on m0, two waiting behind it (one slot).
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || {
                common::post(
                    &base,
                    "/v1/completions",
                    &json!({"model": "m0", "prompt": format!("Story {i}:"), "max_tokens": 120,
                            "ignore_eos": true, "temperature": 0.0})
                    .to_string(),
                )
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        let f = scrape(&base);
        if gauge(&f, "vllm:num_requests_running").1 == 1.0
            && gauge(&f, "vllm:num_requests_waiting").1 == 2.0
        {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "never saw 1 running and 2 waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let kv = gauge(&busy, "vllm:kv_cache_usage_perc").1;
    assert!(kv > 0.0 && kv <= 1.0, "a fraction: {kv}");
    let (lora, _) = gauge(&busy, "vllm:lora_requests_info");
    assert_eq!(list(&lora["waiting_lora_adapters"]), ["m0"], "{lora}");
    assert_eq!(list(&lora["running_lora_adapters"]), ["m0", "m1"]);
    for c in clients {
        assert_eq!(c.join().unwrap().0, 200);
    }
    let after = scrape(&base);
    assert_eq!(gauge(&after, "vllm:num_requests_waiting").1, 0.0);
    assert_eq!(gauge(&after, "vllm:num_requests_running").1, 0.0);
    assert_eq!(
        list(&gauge(&after, "vllm:lora_requests_info").0["waiting_lora_adapters"]),
        Vec::<String>::new()
    );
    h.stop().unwrap();
}

/// With a module budget of one module, alternating two modules evicts and reloads them, and
/// `/metrics` counts both (`modu_module_evictions_total`, `modu_module_reloads_total`: what
/// module-affine routing saves); `max_lora` is the budget over the module size.
#[test]
fn module_budget_evictions_and_reloads_are_counted() {
    let a = lora_fixture::lora("lora-a.gguf");
    let size = std::fs::metadata(&a).unwrap().len() as usize;
    let config = ServeConfig {
        port: 0,
        parallel: 1,
        ctx: 256,
        modules: vec![
            ("m0".into(), a.clone()),
            ("m1".into(), lora_fixture::lora("lora-b.gguf")),
        ],
        module_mem: size + size / 2,
        ..ServeConfig::default()
    };
    let h = modu_server::start(common::served_named(QWEN), config, false).expect("server");
    let base = format!("http://{}", h.addr);
    let counter = |name: &str| -> f64 {
        let (_, t) = get(&base, "/metrics");
        t.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = (
        counter("modu_module_evictions_total"),
        counter("modu_module_reloads_total"),
    );
    for m in ["m0", "m1", "m0", "m1"] {
        let (st, _) = common::post(
            &base,
            "/v1/completions",
            &json!({"model": m, "prompt": "Hi", "max_tokens": 1}).to_string(),
        );
        assert_eq!(st, 200);
    }
    let evictions = counter("modu_module_evictions_total") - before.0;
    let reloads = counter("modu_module_reloads_total") - before.1;
    assert!(evictions >= 3.0, "{evictions} evictions");
    assert!(reloads >= 3.0, "{reloads} reloads");
    let (lora, _) = gauge(&scrape(&base), "vllm:lora_requests_info");
    assert_eq!(lora["max_lora"], "1");
    h.stop().unwrap();
}

/// With keys configured `/v1/models` needs one, and a service lists only the modules it may
/// use: another service's module names are not its business.
#[test]
fn model_listing_is_per_service_when_keys_are_configured() {
    use modu_server::services::{hash_key, ServicesConfig};
    let text = format!(
        "[admin]\nkey_hashes = [\"{}\"]\n\n[metrics]\nkey_hashes = [\"{}\"]\n\n\
         [services.a]\nkey_hashes = [\"{}\"]\nallowed_modules = [\"m0\"]\n\n\
         [services.b]\nkey_hashes = [\"{}\"]\n",
        hash_key("list-admin"),
        hash_key("list-metrics"),
        hash_key("list-a"),
        hash_key("list-b")
    );
    let config = ServeConfig {
        port: 0,
        parallel: 1,
        ctx: 256,
        modules: vec![
            ("m0".into(), lora_fixture::lora("lora-a.gguf")),
            ("m1".into(), lora_fixture::lora("lora-b.gguf")),
        ],
        services: ServicesConfig::parse(&text, std::path::Path::new("list.toml")).unwrap(),
        ..ServeConfig::default()
    };
    let h = modu_server::start(common::served_named(QWEN), config, false).expect("server");
    let base = format!("http://{}", h.addr);
    let list = |key: Option<&str>| -> (u16, Vec<String>) {
        let mut r = ureq::get(&format!("{base}/v1/models"));
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.call() {
            Ok(resp) => {
                let v: Value = resp.into_json().unwrap();
                let ids = v["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["id"].as_str().unwrap().to_string())
                    .collect();
                (200, ids)
            }
            Err(ureq::Error::Status(c, _)) => (c, vec![]),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(list(None).0, 401);
    assert_eq!(list(Some("list-metrics")).0, 403);
    let (st, a) = list(Some("list-a"));
    assert_eq!(st, 200);
    assert_eq!(a[1..], ["m0"], "service a may use m0 only: {a:?}");
    let (_, b) = list(Some("list-b"));
    assert_eq!(b[1..], ["m0", "m1"]);
    let (_, admin) = list(Some("list-admin"));
    assert_eq!(admin[1..], ["m0", "m1"]);
    h.stop().unwrap();
}
