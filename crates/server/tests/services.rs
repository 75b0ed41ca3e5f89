//! Services end to end on the real gemma-3-270m: API keys (401), modules a service may not use
//! (403), per-service limits (429 with Retry-After), usage isolation between services, the
//! usage records and the labelled metrics.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use modu_server::services::{hash_key, ServicesConfig};
use modu_server::{ServeConfig, ServerHandle};
use serde_json::{json, Value};

const ADMIN: &str = "modu-admin-test-key";
const SEARCH: &str = "modu-search-test-key"; // 검색
const TRANSLATE: &str = "modu-translate-test-key"; // 번역
const RPM: &str = "modu-rpm-test-key";
const TPM: &str = "modu-tpm-test-key";
const CONC: &str = "modu-conc-test-key";

fn config() -> ServicesConfig {
    let text = format!(
        r#"
# 테스트 설정
[machine]
watts_idle = 10
watts_busy = 50
price_per_hour = 3.6
cores = 2

[admin]
key_hashes = ["{admin}"]

[services."검색"]
key_hashes = ["{search}"]
allowed_modules = ["gemma-3-270m"]
max_tokens_per_request = 3
priority = 2

[services."번역"]
key_hashes = ["{translate}"]
allowed_modules = ["번역-lora"]
default_module = "번역-lora"

[services.rpm]
key_hashes = ["{rpm}"]
requests_per_minute = 2

[services.tpm]
key_hashes = ["{tpm}"]
tokens_per_minute = 30

[services.conc]
key_hashes = ["{conc}"]
max_concurrent = 1
"#,
        admin = hash_key(ADMIN),
        search = hash_key(SEARCH),
        translate = hash_key(TRANSLATE),
        rpm = hash_key(RPM),
        tpm = hash_key(TPM),
        conc = hash_key(CONC),
    );
    ServicesConfig::parse(&text, Path::new("test.toml")).unwrap()
}

fn server() -> String {
    static SERVER: OnceLock<ServerHandle> = OnceLock::new();
    let h = SERVER.get_or_init(|| {
        let config = ServeConfig {
            host: "127.0.0.1".into(),
            port: 0,
            parallel: 4,
            max_queue: 16,
            ctx: CTX,
            prefill_chunk: 16,
            services: config(),
            ..ServeConfig::default()
        };
        modu_server::start(served(), config, false).expect("starting the server")
    });
    format!("http://{}", h.addr)
}

/// (status, Retry-After, body)
fn call(
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, String) {
    let mut req = ureq::request(method, &format!("{}{path}", server()));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let r = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    (status, retry, resp.into_string().unwrap())
}

fn chat_body(model: Option<&str>, max_tokens: usize) -> Value {
    let mut b = json!({
        "messages": [{"role": "user", "content": "안녕"}],
        "max_tokens": max_tokens, "temperature": 0
    });
    if let Some(m) = model {
        b["model"] = json!(m);
    }
    b
}

fn chat(
    key: Option<&str>,
    model: Option<&str>,
    max_tokens: usize,
) -> (u16, Option<String>, String) {
    call(
        "POST",
        "/v1/chat/completions",
        key,
        Some(chat_body(model, max_tokens)),
    )
}

fn error_code(body: &str) -> String {
    json(body)["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn missing_or_invalid_key_is_401() {
    let (s, _, b) = chat(None, None, 2);
    assert_eq!(s, 401, "{b}");
    assert_eq!(error_code(&b), "invalid_api_key");
    let (s, _, b) = chat(Some("modu-not-a-key"), None, 2);
    assert_eq!(s, 401, "{b}");
    let (s, _, _) = call("GET", "/v1/usage", None, None);
    assert_eq!(s, 401);
    let (s, _, _) = call("GET", "/v1/usage", Some("nope"), None);
    assert_eq!(s, 401);
    // The admin key reads usage but does not generate.
    let (s, _, b) = chat(Some(ADMIN), None, 2);
    assert_eq!(s, 403, "{b}");
}

#[test]
fn a_module_the_service_may_not_use_is_403() {
    // 검색 may use only the base model; 번역's module is not its own.
    let (s, _, b) = chat(Some(SEARCH), Some("번역-lora"), 2);
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("번역-lora"), "{b}");
    // 번역 may use only its module, not the base model.
    let (s, _, b) = chat(Some(TRANSLATE), Some("gemma-3-270m"), 2);
    assert_eq!(s, 403, "{b}");
    // Its own module is allowed but not loaded yet (LoRA modules come later): 404, not 403.
    let (s, _, b) = chat(Some(TRANSLATE), None, 2);
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("not loaded"), "{b}");
    // A name that is no module at all.
    let (s, _, b) = chat(Some(SEARCH), Some("gpt-4"), 2);
    assert_eq!(s, 404, "{b}");
    assert_eq!(error_code(&b), "model_not_found");
}

#[test]
fn requests_per_minute_limit_is_429_with_retry_after() {
    for _ in 0..2 {
        let (s, _, b) = chat(Some(RPM), None, 1);
        assert_eq!(s, 200, "{b}");
    }
    let (s, retry, b) = chat(Some(RPM), None, 1);
    assert_eq!(s, 429, "{b}");
    assert_eq!(error_code(&b), "rate_limit_exceeded");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After {retry}");
    // Other services are unaffected.
    assert_eq!(chat(Some(SEARCH), None, 1).0, 200);
}

#[test]
fn tokens_per_minute_limit_is_429_with_retry_after() {
    // The chat prompt is 10 tokens; 20 generated fill the 30-token minute.
    let (s, _, b) = call(
        "POST",
        "/v1/chat/completions",
        Some(TPM),
        Some(
            json!({"messages": [{"role": "user", "content": "안녕"}], "max_tokens": 20,
                    "temperature": 0, "ignore_eos": true}),
        ),
    );
    assert_eq!(s, 200, "{b}");
    let used = json(&b)["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used >= 21, "{b}");
    let (s, retry, b) = chat(Some(TPM), None, 1);
    assert_eq!(s, 429, "{b}");
    assert!(b.contains("tokens per minute"), "{b}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
}

#[test]
fn max_concurrent_limit_is_429_and_frees_when_the_request_ends() {
    let base = server();
    // A long streaming request holds the one slot.
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {CONC}"))
        .send_json(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                          "stream": true, "ignore_eos": true}),
        )
        .unwrap();
    let mut reader = resp.into_reader();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut reader, &mut first).unwrap();
    let (s, retry, b) = chat(Some(CONC), None, 1);
    assert_eq!(s, 429, "{b}");
    assert_eq!(retry.as_deref(), Some("1"));
    drop(reader);
    // The slot comes back once the server notices the disconnect.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _, b) = chat(Some(CONC), None, 1);
        if s == 200 {
            break;
        }
        assert_eq!(s, 429, "{b}");
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn max_tokens_per_request_caps_generation() {
    let (s, _, b) = call(
        "POST",
        "/v1/chat/completions",
        Some(SEARCH),
        Some(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                    "ignore_eos": true}),
        ),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["usage"]["completion_tokens"], 3);
}

fn usage_rows(key: &str, query: &str) -> (u16, Vec<Value>) {
    let (s, _, b) = call("GET", &format!("/v1/usage{query}"), Some(key), None);
    if s != 200 {
        return (s, vec![]);
    }
    (s, json(&b)["data"].as_array().unwrap().clone())
}

#[test]
fn usage_is_recorded_and_isolated_between_services() {
    // One request each from two services (streaming for one: recorded before [DONE]).
    assert_eq!(chat(Some(SEARCH), None, 2).0, 200);
    let (s, _, b) = call(
        "POST",
        "/v1/chat/completions",
        Some(SEARCH),
        Some(
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}),
        ),
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("[DONE]"));
    let (s, _, b) = call(
        "POST",
        "/v1/completions",
        Some(TPM),
        Some(json!({"prompt": "hi", "max_tokens": 1})),
    );
    // tpm's minute may be used up by its own test.
    assert!(s == 200 || s == 429, "{b}");

    // A service's key sees only its own usage, whatever it asks for.
    let (s, rows) = usage_rows(SEARCH, "?group_by=service");
    assert_eq!(s, 200);
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r["service"] == "검색"), "{rows:?}");
    let r = &rows[0];
    assert!(r["requests"].as_u64().unwrap() >= 1);
    assert!(r["completion_tokens"].as_u64().unwrap() >= 1);
    assert!(r["cpu_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["energy_j"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["cost"].as_f64().unwrap() > 0.0, "{r}");
    let (s, _) = usage_rows(SEARCH, "?service=rpm");
    assert_eq!(s, 403, "a service must not read another's usage");
    let (s, _, b) = call(
        "GET",
        "/v1/usage?service=%EB%B2%88%EC%97%AD",
        Some(SEARCH),
        None,
    );
    assert_eq!(s, 403, "{b}");
    // Its own service's filter is fine.
    let (s, rows) = usage_rows(SEARCH, "?service=%EA%B2%80%EC%83%89&group_by=module,hour");
    assert_eq!(s, 200);
    assert!(rows
        .iter()
        .all(|r| r["module"] == "gemma-3-270m" && r["period"].is_string()));

    // The admin key sees every service.
    let (s, rows) = usage_rows(ADMIN, "?group_by=service");
    assert_eq!(s, 200);
    assert!(rows.iter().any(|r| r["service"] == "검색"), "{rows:?}");
    let (s, rows) = usage_rows(ADMIN, "?from=2000-01-01&to=2000-01-02");
    assert_eq!(s, 200);
    assert!(rows.is_empty());
    let (s, _) = usage_rows(ADMIN, "?group_by=week");
    assert_eq!(s, 400);

    // /v1/services shows a service only itself.
    let (s, _, b) = call("GET", "/v1/services", Some(SEARCH), None);
    assert_eq!(s, 200);
    let names: Vec<String> = json(&b)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["검색"]);
    let (_, _, b) = call("GET", "/v1/services", Some(ADMIN), None);
    assert_eq!(json(&b)["data"].as_array().unwrap().len(), 5);
}

#[test]
fn metrics_are_labelled_by_service_and_module() {
    assert_eq!(chat(Some(SEARCH), None, 1).0, 200);
    let (_, _, text) = call("GET", "/metrics", Some(ADMIN), None);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("modu_service_requests_total{service=\"검색\",module=\"gemma-3-270m\"}")
        })
        .unwrap_or_else(|| panic!("no labelled series:\n{text}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0);
    assert!(text.contains("modu_service_completion_tokens_total{service=\"검색\""));
    assert!(text.contains("modu_service_request_duration_seconds_bucket{service=\"검색\",module=\"gemma-3-270m\",le=\"+Inf\"}"));
    // 번역's refused request is an error of the module it asked for.
    let _ = chat(Some(TRANSLATE), Some("gemma-3-270m"), 1);
    let (_, _, text) = call("GET", "/metrics", Some(ADMIN), None);
    assert!(text.contains("modu_service_errors_total{service=\"번역\",module=\"gemma-3-270m\"} "));
}

#[test]
fn non_loopback_bind_needs_keys() {
    use modu_server::check_bind_address;
    let e = check_bind_address("0.0.0.0", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no API keys"), "{e}");
    assert!(config().auth_enabled());
    assert!(!ServicesConfig::open().auth_enabled());
    assert!(check_bind_address("0.0.0.0", config().auth_enabled()).is_ok());
}

#[test]
fn bad_config_names_the_line() {
    let e = ServicesConfig::parse("[services.a]\nkey_hashes = [\"x\"\n", Path::new("bad.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.toml") && e.contains("line 2"), "{e}");
    let e = ServicesConfig::parse(
        "[services.a]\nkey_hashes = [\"plain-key\"]\n",
        Path::new("m.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a key hash"), "{e}");
}

#[test]
fn without_a_config_one_open_default_service_is_accounted() {
    let base = shared(); // ServeConfig::default() services: open, loopback
    let (s, b) = post(
        &base,
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": 2, "temperature": 0}"#,
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = get(&base, "/v1/usage?group_by=service,module");
    assert_eq!(s, 200, "{b}");
    let rows = json(&b)["data"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 1, "{b}");
    assert_eq!(rows[0]["service"], "default");
    assert_eq!(rows[0]["module"], "gemma-3-270m");
    let (s, b) = get(&base, "/v1/services");
    assert_eq!(s, 200);
    assert_eq!(json(&b)["auth"], false);
    let (s, html) = get(&base, "/");
    assert_eq!(s, 200);
    assert!(html.contains("<title>modu dashboard</title>"));
}
