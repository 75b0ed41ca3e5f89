//! End-to-end tests of the OpenAI-compatible endpoints against the real gemma-3-270m.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use common::*;
use modu_engine::generate::{generate, GenerateParams};
use modu_engine::{load_model, ChatMessage, ChatTemplate, SamplingParams, Tokenizer};

/// Greedy text from `generate` run directly, the reference for the server's output.
fn reference(prompt_text: &str, max_tokens: usize) -> String {
    let file = file();
    let model = load_model(file.clone()).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let ids = tok.encode(prompt_text, true, true).unwrap();
    let mut cache = model.new_cache(CTX);
    let params = GenerateParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    generate(model.as_ref(), &tok, &mut cache, &ids, &params, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap()
    .text
}

fn chat_prompt(user: &str) -> String {
    let file = file();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let text_of = |id: Option<u32>| {
        id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
            .unwrap_or_default()
    };
    ChatTemplate::for_model(&file)
        .unwrap()
        .render(
            &[ChatMessage::new("user", user)],
            true,
            &text_of(tok.bos_id()),
            &text_of(tok.eos_id()),
        )
        .unwrap()
}

fn completion(base: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
    let body = serde_json::json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0
    });
    let (status, text) = post(base, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    json(&text)
}

#[test]
fn chat_non_streaming_matches_generate_and_counts_usage() {
    let base = shared();
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16, "temperature": 0
    });
    let (status, text) = post(&base, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content, reference(&chat_prompt("Name three colours."), 16));
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=16).contains(&c), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    let reason = choice["finish_reason"].as_str().unwrap();
    assert!(
        reason == "stop" || (reason == "length" && c == 16),
        "{reason}"
    );
}

#[test]
fn completion_non_streaming_matches_generate() {
    let base = shared();
    let prompt = "The capital of France is";
    let v = completion(&base, prompt, 12);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        reference(prompt, 12)
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // A prompt several prefill chunks long (the test server prefills 16 tokens per step).
    let long = "In the beginning the universe was created. This has made a lot of people very \
                angry and been widely regarded as a bad move. Many were increasingly of the \
                opinion that they had all made a big mistake in coming down from the trees. \
                And some said that even the trees had been a bad move, and that";
    let v = completion(&base, long, 12);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 48);
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        reference(long, 12)
    );
}

#[test]
fn eight_concurrent_requests_give_the_same_greedy_text_as_alone() {
    // A server of its own with 8 slots, so all eight share every batch step.
    let h = common::start(8, 16);
    let base = format!("http://{}", h.addr);
    let prompts = [
        "Once upon a time",
        "The quick brown fox",
        "def fibonacci(n):",
        "서울은 한국의",
        "안녕하세요, 저는",
        "In 1969 the first",
        "fn main() {",
        "The capital of France is",
    ];
    let alone: Vec<String> = prompts.iter().map(|p| reference(p, 20)).collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let base = base.clone();
            let p = p.to_string();
            std::thread::spawn(move || completion(&base, &p, 20))
        })
        .collect();
    for (h, want) in handles.into_iter().zip(alone) {
        let v = h.join().unwrap();
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want);
    }
}

#[test]
fn streaming_chat_follows_openai_sse_and_matches_non_streaming() {
    let base = shared();
    let msgs =
        serde_json::json!([{"role": "user", "content": "안녕하세요! 자기소개를 해 주세요."}]);
    let body = serde_json::json!({
        "model": MODEL, "messages": msgs, "max_tokens": 20, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}
    });
    let (status, text) = post(&base, "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| json(e)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(ch) = c["choices"].as_array().unwrap().first() {
            if let Some(t) = ch["delta"]["content"].as_str() {
                assert!(!t.contains('\u{FFFD}'), "a chunk split a character: {t:?}");
                streamed.push_str(t);
            }
            if !ch["finish_reason"].is_null() {
                finish = Some(ch["finish_reason"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(finish.is_some());
    let usage_chunk = chunks.last().unwrap();
    assert!(usage_chunk["choices"].as_array().unwrap().is_empty());
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    let body =
        serde_json::json!({"model": MODEL, "messages": msgs, "max_tokens": 20, "temperature": 0});
    let (_, text) = post(&base, "/v1/chat/completions", &body.to_string());
    assert_eq!(
        json(&text)["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        streamed
    );
}

#[test]
fn streaming_completion_with_stop_string_and_logprobs() {
    let base = shared();
    let prompt = "1, 2, 3, 4, 5,";
    let full = reference(prompt, 16);
    let body = serde_json::json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
        "stream": true, "stop": [" 8"], "logprobs": 2
    });
    let (status, text) = post(&base, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let c = json(e);
        assert_eq!(c["object"], "text_completion");
        let ch = &c["choices"][0];
        streamed.push_str(ch["text"].as_str().unwrap());
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = f.to_string();
        }
        if let Some(lp) = ch["logprobs"].as_object() {
            assert_eq!(lp["tokens"].as_array().unwrap().len(), 1);
        }
    }
    match full.find(" 8") {
        Some(at) => {
            assert_eq!(streamed, full[..at]);
            assert_eq!(finish, "stop");
        }
        None => assert_eq!(streamed, full),
    }
}

#[test]
fn models_health_and_metrics() {
    let base = shared();
    let (s, t) = get(&base, "/health");
    assert_eq!(s, 200);
    assert_eq!(json(&t)["status"], "ok");
    let (s, t) = get(&base, "/live");
    assert_eq!(s, 200);
    assert_eq!(json(&t)["status"], "ok");
    let (s, t) = get(&base, "/v1/models");
    assert_eq!(s, 200);
    assert_eq!(json(&t)["data"][0]["id"], MODEL);
    completion(&base, "Hello", 2);
    let (s, t) = get(&base, "/metrics");
    assert_eq!(s, 200);
    for name in [
        "modu_requests_total{endpoint=\"completions\"}",
        "modu_prompt_tokens_total",
        "modu_generation_tokens_total",
        "modu_queue_depth",
        "modu_running_sequences",
        "modu_time_to_first_token_seconds_bucket",
        "modu_inter_token_latency_seconds_count",
    ] {
        assert!(t.contains(name), "missing {name}");
    }
    assert!(metric(&base, "modu_generation_tokens_total") >= 2.0);
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_stays_healthy() {
    let base = shared();
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    let long = "hello ".repeat(CTX + 50);
    let long_prompt = serde_json::json!({"prompt": long}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (chat, "{bad".into(), 400, "JSON"),
        (chat, "[]".into(), 400, "object"),
        (chat, "".into(), 400, "JSON"),
        (chat, r#"{"model":"gemma-3-270m"}"#.into(), 400, "messages"),
        (chat, r#"{"messages":"hi"}"#.into(), 400, "invalid type"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#.into(), 400, "invalid type"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":5}"#.into(), 400, "temperature"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#.into(), 400, "n must be 1"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#.into(), 400, "top_p"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#.into(), 400, "max_tokens"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":-3}"#.into(), 400, "max_completion_tokens"),
        (chat, r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#.into(), 404, "gpt-4o"),
        (chat, r#"{"messages":[{"role":"wizard","content":"x"}]}"#.into(), 400, "role"),
        (chat, r#"{"messages":[]}"#.into(), 400, "messages"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#.into(), 400, "logprobs"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":9}"#.into(), 400, "presence_penalty"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"top_k":-1}"#.into(), 400, "top_k"),
        (chat, r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#.into(), 400, "stop"),
        (chat, r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#.into(), 400, "image_url"),
        (comp, r#"{"prompt":5}"#.into(), 400, "prompt"),
        (comp, r#"{"prompt":["a","b"]}"#.into(), 400, "one prompt"),
        (comp, r#"{"prompt":[99999999]}"#.into(), 400, "out of range"),
        (comp, r#"{"prompt":"x","logprobs":50}"#.into(), 400, "logprobs"),
        (comp, r#"{"prompt":"x","echo":true}"#.into(), 400, "echo"),
        (comp, r#"{"prompt":"x","stream":"yes"}"#.into(), 400, "invalid type"),
        (comp, long_prompt, 400, "512"),
        ("/v1/nope", "{}".into(), 404, "route"),
    ];
    assert!(cases.len() >= 25);
    for (path, body, want, needle) in &cases {
        let (status, text) = post(&base, path, body);
        assert_eq!(status, *want, "{path} {body:.80}: {text}");
        let v = json(&text);
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error body: {text}"));
        assert!(v["error"]["type"].is_string(), "{text}");
        assert!(
            v["error"].get("param").is_some() && v["error"].get("code").is_some(),
            "{text}"
        );
        assert!(msg.contains(needle), "{body:.80}: {msg:?} lacks {needle:?}");
    }
    let (s, t) = get(&base, "/v1/chat/completions");
    assert_eq!(s, 405);
    assert!(json(&t)["error"]["message"].is_string());
    let (s, _) = get(&base, "/health");
    assert_eq!(s, 200);
    assert_eq!(
        completion(&base, "Hello", 2)["usage"]["completion_tokens"],
        2
    );
}

/// Send a streaming request over a raw socket; return the socket once the first content
/// chunk has arrived (so the sequence is running).
fn open_stream(addr: &str, max_tokens: usize) -> TcpStream {
    let body = serde_json::json!({
        "prompt": "Count: one, two, three,", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true
    })
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"text\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn disconnect_cancels_and_a_full_queue_gets_429() {
    // Own server: one slot and no queue, so the second request must be refused.
    let h = start(1, 0);
    let addr = h.addr.to_string();
    let base = format!("http://{addr}");
    let s = open_stream(&addr, 400);
    assert_eq!(metric(&base, "modu_running_sequences"), 1.0);
    let r = ureq::post(&format!("{base}/v1/completions"))
        .set("Content-Type", "application/json")
        .send_string(r#"{"prompt":"hi","max_tokens":2}"#);
    match r {
        Err(ureq::Error::Status(429, resp)) => {
            assert_eq!(resp.header("retry-after"), Some("1"));
            let v = json(&resp.into_string().unwrap());
            assert_eq!(v["error"]["type"], "rate_limit_error");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    drop(s); // the client goes away mid-stream
    wait_until("the cancelled sequence to leave the batch", || {
        metric(&base, "modu_running_sequences") == 0.0
            && metric(&base, "modu_kv_cache_bytes") == 0.0
    });
    assert_eq!(metric(&base, "modu_cancelled_total"), 1.0);
    // Far fewer than 400 tokens were generated: the sequence stopped when the client left.
    assert!(metric(&base, "modu_generation_tokens_total") < 300.0);
    // The slot is free again.
    let (status, text) = post(
        &base,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2}"#,
    );
    assert_eq!(status, 200, "{text}");

    // A non-streaming client that leaves: hyper notices the closed connection only on some
    // schedules (there is nothing to write until the answer is ready), so the sequence is either
    // cancelled or runs to its end; either way the slot must come back.
    let body = r#"{"prompt":"Count:","max_tokens":60,"ignore_eos":true}"#;
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("the request to run", || {
        metric(&base, "modu_running_sequences") == 1.0
    });
    drop(s);
    wait_until("the slot to be released", || {
        metric(&base, "modu_running_sequences") == 0.0
    });
    let (status, text) = post(
        &base,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2}"#,
    );
    assert_eq!(status, 200, "{text}");
    h.stop().unwrap();
}

#[test]
fn non_loopback_addresses_are_refused_without_allow_remote() {
    assert!(modu_server::check_bind_address("0.0.0.0", false).is_err());
    assert!(modu_server::check_bind_address("192.168.1.5", false).is_err());
    assert!(modu_server::check_bind_address("0.0.0.0", true).is_ok());
    assert!(modu_server::check_bind_address("127.0.0.1", false).is_ok());
    assert!(modu_server::check_bind_address("::1", false).is_ok());
    assert!(modu_server::check_bind_address("localhost", false).is_ok());
    let e = modu_server::check_bind_address("0.0.0.0", false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--allow-remote"), "{e}");
}

/// `"speculative": "ngram"` gives the plain greedy text (drafts verified inside the batch),
/// reports OpenAI's prediction counts, counts in `/metrics`; bad values and the combination
/// with a grammar are refused.
#[test]
fn speculative_requests_give_the_plain_text_and_bad_values_are_refused() {
    let base = shared();
    let user = "Repeat exactly, twice: the quick brown fox jumps over the lazy dog.";
    let body = |spec: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "{user}"}}], "max_tokens": 48, "temperature": 0, "speculative": {spec}}}"#
        )
    };
    let (st, plain) = post(&base, "/v1/chat/completions", &body("\"none\""));
    assert_eq!(st, 200, "{plain}");
    let (st, fast) = post(&base, "/v1/chat/completions", &body("\"ngram\""));
    assert_eq!(st, 200, "{fast}");
    let (plain, fast) = (json(&plain), json(&fast));
    assert_eq!(
        plain["choices"][0]["message"]["content"],
        fast["choices"][0]["message"]["content"]
    );
    assert!(plain["usage"].get("completion_tokens_details").is_none());
    let d = &fast["usage"]["completion_tokens_details"];
    let kept = d["accepted_prediction_tokens"].as_u64().unwrap();
    assert!(kept > 0, "{d}");
    assert!(metric(&base, "modu_spec_accepted_tokens_total") >= kept as f64);
    for bad in [
        "\"eagle\"",
        "true",
        r#"{"type": "ngram", "max_draft_tokens": 0}"#,
        r#"{"type": "ngram", "max_draft_tokens": 99}"#,
        r#"{"type": "ngram", "draft_model": "x"}"#,
    ] {
        let (st, e) = post(&base, "/v1/chat/completions", &body(bad));
        assert_eq!(st, 400, "{bad}: {e}");
        assert_eq!(json(&e)["error"]["param"], "speculative", "{e}");
    }
    let (st, e) = post(
        &base,
        "/v1/chat/completions",
        &body(r#""ngram", "response_format": {"type": "json_object"}"#),
    );
    assert_eq!(st, 400, "{e}");
    assert!(e.contains("speculative"), "{e}");
}
