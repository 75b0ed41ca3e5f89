//! Prompt-prefix reuse against the real gemma-3-270m: the same greedy output with and without
//! reuse, the reuse reported in usage and metrics, and a byte budget that evicts.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use modu_server::{ServeConfig, ServerHandle};
use serde_json::{json, Value};

/// The tests of this binary run one at a time: the timing one should not share the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn server(prefix_cache_mem: usize) -> (ServerHandle, String) {
    let config = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        parallel: 2,
        max_queue: 8,
        ctx: 1024,
        allow_remote: false,
        prefill_chunk: 64,
        prefix_cache_mem,
        kv_mem: 0,
        ..ServeConfig::default()
    };
    let h = modu_server::start(served(), config, false).expect("starting the server");
    let base = format!("http://{}", h.addr);
    (h, base)
}

/// A system prompt of about `rules * 20` tokens.
fn system_prompt(rules: usize) -> String {
    let mut s = String::from("You are a careful assistant. Follow these rules.\n");
    for i in 1..=rules {
        s.push_str(&format!(
            "Rule {i}: when asked about topic number {i}, answer briefly and politely.\n"
        ));
    }
    s
}

fn chat_body(system: &str, user: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    })
}

/// (text, usage) of a non-streaming chat request.
fn chat(base: &str, system: &str, user: &str, max_tokens: usize) -> (String, Value) {
    let (status, text) = post(
        base,
        "/v1/chat/completions",
        &chat_body(system, user, max_tokens).to_string(),
    );
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"].clone(),
    )
}

fn cached(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {usage}"))
}

#[test]
fn greedy_output_is_the_same_with_and_without_reuse() {
    let _g = serial();
    let (_off, off) = server(0);
    let (_on, on) = server(256 << 20);
    let long = system_prompt(30);
    let short = system_prompt(12);
    let user = "What does rule 3 say?";

    let (want, u) = chat(&off, &long, user, 16);
    assert_eq!(cached(&u), 0);
    let (first, u1) = chat(&on, &long, user, 16);
    assert_eq!(cached(&u1), 0);
    let (second, u2) = chat(&on, &long, user, 16);
    assert_eq!(first, want);
    assert_eq!(second, want);
    let p = u2["prompt_tokens"].as_u64().unwrap();
    assert!(p > 500, "{u2}");
    // All but the last prompt token, rounded down to whole blocks.
    assert!(cached(&u2) >= p - 16 && cached(&u2) < p, "{u2}");

    // Only a prefix of the longer system prompt is shared.
    let (want, _) = chat(&off, &short, "Which rule is about topic 7?", 16);
    let (got, u) = chat(&on, &short, "Which rule is about topic 7?", 16);
    assert_eq!(got, want);
    let c = cached(&u);
    assert!(c >= 200 && c < u["prompt_tokens"].as_u64().unwrap(), "{u}");

    assert_eq!(metric(&on, "modu_prefix_cache_hits_total"), 2.0);
    assert!(metric(&on, "modu_prefix_cache_reused_tokens_total") >= (p - 16 + 200) as f64);
    assert!(metric(&on, "modu_prefix_cache_bytes") > 0.0);
    assert_eq!(metric(&off, "modu_prefix_cache_hits_total"), 0.0);
    assert_eq!(metric(&off, "modu_prefix_cache_bytes"), 0.0);
}

/// Stream a chat request; returns (time to the first content chunk, text, usage).
fn stream(base: &str, system: &str, user: &str) -> (Duration, String, Value) {
    let mut body = chat_body(system, user, 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let sent = Instant::now();
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    let mut ttft = None;
    let mut text = String::new();
    let mut usage = Value::Null;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v = json(data);
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            if !c.is_empty() && ttft.is_none() {
                ttft = Some(sent.elapsed());
            }
            text.push_str(c);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (ttft.expect("no content streamed"), text, usage)
}

#[test]
fn a_shared_system_prompt_is_not_prefilled_twice() {
    let _g = serial();
    let (_h, base) = server(256 << 20);
    let system = system_prompt(25);
    let before = metric(&base, "modu_prefill_tokens_total");
    let (t1, _, u1) = stream(&base, &system, "Say hello.");
    let mid = metric(&base, "modu_prefill_tokens_total");
    let (t2, _, u2) = stream(&base, &system, "Say goodbye.");
    let after = metric(&base, "modu_prefill_tokens_total");
    let (p1, p2) = (
        u1["prompt_tokens"].as_u64().unwrap(),
        u2["prompt_tokens"].as_u64().unwrap(),
    );
    println!(
        "prompt tokens {p1} / {p2}, cached {} / {}; TTFT first {:.1} ms, second {:.1} ms ({:.0}%)",
        cached(&u1),
        cached(&u2),
        t1.as_secs_f64() * 1e3,
        t2.as_secs_f64() * 1e3,
        100.0 * t2.as_secs_f64() / t1.as_secs_f64()
    );
    assert!(
        p1 >= 500,
        "the system prompt should be about 500 tokens: {u1}"
    );
    assert_eq!(cached(&u1), 0);
    assert!(cached(&u2) >= 480, "{u2}");
    // Prefill work: the whole first prompt, only the tail of the second.
    assert_eq!((mid - before) as u64, p1);
    assert_eq!((after - mid) as u64, p2 - cached(&u2));
    assert!(after - mid <= 0.1 * (mid - before));
    // Structurally the second prefills ~4% of the first's tokens; loose against a busy machine.
    assert!(t2 <= t1 / 2, "TTFT {t1:?} then {t2:?}");
}

#[test]
fn a_tiny_budget_evicts_and_nothing_breaks() {
    let _g = serial();
    let (_off, off) = server(0);
    // Nothing fits: no entry is kept and requests work as without a cache.
    let (_none, none) = server(1024);
    let sys = system_prompt(10);
    let (want, _) = chat(&off, &sys, "Hi.", 8);
    for _ in 0..2 {
        let (got, u) = chat(&none, &sys, "Hi.", 8);
        assert_eq!(got, want);
        assert_eq!(cached(&u), 0);
    }
    assert_eq!(metric(&none, "modu_prefix_cache_bytes"), 0.0);

    // Room for about two of these prompts (about 120 tokens, 18 KiB of keys and values each).
    let budget = 5 << 20;
    let (_small, small) = server(budget);
    let users: Vec<String> = (0..6)
        .map(|i| format!("Tell me about topic {i}, please."))
        .collect();
    let systems: Vec<String> = (0..6)
        .map(|i| format!("Variant {i}. {}", system_prompt(10)))
        .collect();
    let mut wants = Vec::new();
    for i in 0..6 {
        let (want, _) = chat(&off, &systems[i], &users[i], 8);
        let (got, _) = chat(&small, &systems[i], &users[i], 8);
        assert_eq!(got, want);
        assert!(metric(&small, "modu_prefix_cache_bytes") <= budget as f64);
        wants.push(want);
    }
    assert!(metric(&small, "modu_prefix_cache_evictions_total") >= 1.0);
    assert!(metric(&small, "modu_prefix_cache_entries") >= 1.0);
    // The most recent is still held, the oldest was evicted; both give the same text.
    let (got, u) = chat(&small, &systems[5], &users[5], 8);
    assert_eq!(got, wants[5]);
    assert!(cached(&u) > 0, "{u}");
    let (got, u) = chat(&small, &systems[0], &users[0], 8);
    assert_eq!(got, wants[0]);
    assert_eq!(cached(&u), 0, "{u}");
}
