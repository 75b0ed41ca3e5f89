//! Turning the scheduler's events into OpenAI responses: one JSON body, or server-sent events
//! ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use modu_engine::generate::{FinishReason, GeneratedToken};
use modu_engine::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ApiError;
use crate::scheduler::{SeqEvent, SeqStats, ServiceTag};

use crate::accounting::*;
use crate::prepare::*;
use crate::server::*;

/// OpenAI's usage object. A request that speculated also gets OpenAI's prediction counts:
/// drafted tokens that were kept and those that were rejected.
pub(crate) fn usage(prompt: usize, completion: usize, cached: usize, stats: &SeqStats) -> Value {
    let mut u = json!({
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    if stats.draft_tokens > 0 {
        u["completion_tokens_details"] = json!({
            "accepted_prediction_tokens": stats.accepted_tokens,
            "rejected_prediction_tokens": stats.draft_tokens - stats.accepted_tokens,
        });
    }
    u
}

pub(crate) fn finish_str(f: FinishReason) -> &'static str {
    f.as_str()
}

/// Chat logprob entry for one token.
pub(crate) fn chat_logprob(tok: &Tokenizer, t: &GeneratedToken) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({
            "token": String::from_utf8_lossy(bytes),
            "logprob": lp,
            "bytes": bytes,
        })
    };
    let mut v = entry(t.id, t.logprob);
    v["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
    v
}

/// Completion logprobs (the legacy parallel-array shape) for a run of tokens.
pub(crate) fn completion_logprobs(
    tok: &Tokenizer,
    toks: &[GeneratedToken],
    start_offset: usize,
) -> Value {
    let mut offset = start_offset;
    let mut tokens = vec![];
    let mut lps = vec![];
    let mut tops = vec![];
    let mut offsets = vec![];
    for t in toks {
        tokens.push(Value::from(t.piece.clone()));
        lps.push(Value::from(t.logprob));
        let mut m = serde_json::Map::new();
        for &(id, lp) in &t.top {
            m.insert(
                String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
                Value::from(lp),
            );
        }
        tops.push(Value::Object(m));
        offsets.push(Value::from(offset));
        offset += t.piece.len();
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

pub(crate) async fn respond(
    st: Arc<AppState>,
    kind: Kind,
    prepared: Prepared,
    mut acct: Acct,
) -> Response {
    let Prepared {
        prompt,
        params,
        common,
        constraint,
        tools,
    } = prepared;
    let tools = tools.is_some();
    let want_logprobs = params.logprobs.is_some();
    let Some(info) = acct.info.as_ref() else {
        return failed(&st, ApiError::internal("the request was already accounted"));
    };
    let svc = &st.services.list[info.service];
    let tag = ServiceTag {
        name: Arc::from(svc.name.as_str()),
        priority: svc.config.priority.max(1),
    };
    let mods = (acct.run_modules.clone(), acct.cache_key);
    if info.module != st.id {
        acct.waiting = Some(crate::gaie::WaitingModule::new(&st, &info.module));
    }
    let cancelled = acct.cancelled_tx.take().expect("set at admission");
    let rx = match st.submit(
        prompt,
        params,
        info.arrived,
        tag,
        mods,
        cancelled,
        constraint,
    ) {
        Ok(rx) => rx,
        Err(e) => {
            st.metrics
                .service(&svc.name, &info.module)
                .errors
                .fetch_add(1, Ordering::Relaxed);
            acct.dismiss();
            return failed(&st, e);
        }
    };
    let id = info.request_id.clone();
    if common.wants_stream() {
        stream_response(
            st,
            kind,
            rx,
            id,
            want_logprobs,
            common.include_usage(),
            tools,
            acct,
        )
    } else {
        collect_response(st, kind, rx, id, want_logprobs, tools, acct).await
    }
}

pub(crate) async fn collect_response(
    st: Arc<AppState>,
    kind: Kind,
    mut rx: UnboundedReceiver<SeqEvent>,
    id: String,
    want_logprobs: bool,
    tools: bool,
    mut acct: Acct,
) -> Response {
    let mut text = String::new();
    let mut toks: Vec<GeneratedToken> = vec![];
    let (finish, p, c, cached, stats) = loop {
        let ev = rx.recv().await;
        acct.waiting = None; // started (or ended)
        match ev {
            Some(SeqEvent::Text { text: t, token }) => {
                text.push_str(&t);
                if let Some(token) = token {
                    toks.push(token);
                    acct.received += 1;
                }
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                stats,
            }) => {
                acct.record(
                    finish_str(finish),
                    (prompt_tokens, completion_tokens, cached_tokens),
                    &stats,
                );
                break (
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    stats,
                );
            }
            Some(SeqEvent::Error(m)) => {
                acct.record("error", (0, toks.len(), 0), &SeqStats::default());
                return failed(&st, ApiError::internal(m));
            }
            None => {
                acct.record("error", (0, toks.len(), 0), &SeqStats::default());
                return failed(&st, ApiError::internal("the scheduler stopped"));
            }
        }
    };
    let created = unix_now();
    let body = match kind {
        Kind::Chat => {
            let logprobs = if want_logprobs {
                json!({"content": toks.iter().map(|t| chat_logprob(&st.tok, t)).collect::<Vec<_>>()})
            } else {
                Value::Null
            };
            let mut message = json!({"role": "assistant", "content": text});
            let mut finish = finish_str(finish);
            if let Some((content, calls)) = tools
                .then(|| crate::tools::parse_calls(&text, || new_id("call")))
                .flatten()
            {
                message = json!({"role": "assistant", "content": content, "tool_calls": calls});
                if finish == "stop" {
                    finish = "tool_calls";
                }
            }
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": st.id,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }],
                "usage": usage(p, c, cached, &stats),
            })
        }
        Kind::Completion => {
            let logprobs = if want_logprobs {
                completion_logprobs(&st.tok, &toks, 0)
            } else {
                Value::Null
            };
            json!({
                "id": id, "object": "text_completion", "created": created, "model": st.id,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_str(finish)}],
                "usage": usage(p, c, cached, &stats),
            })
        }
    };
    Json(body).into_response()
}

/// State of one SSE stream: chunks ready to send, then the events still to come.
pub(crate) struct StreamState {
    pub(crate) st: Arc<AppState>,
    pub(crate) kind: Kind,
    pub(crate) rx: UnboundedReceiver<SeqEvent>,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) want_logprobs: bool,
    pub(crate) include_usage: bool,
    pub(crate) ready: std::collections::VecDeque<String>,
    pub(crate) text_offset: usize,
    pub(crate) done: bool,
    pub(crate) acct: Acct,
    pub(crate) generated: usize,
    /// Set when the model may call tools: calls are held back and sent as `tool_calls`.
    pub(crate) tools: Option<ToolStream>,
}

/// The streamed output of a request with tools: content goes out as it comes, except text that
/// may be the start of a call; from the first call on, everything is held for `tool_calls`.
#[derive(Default)]
pub(crate) struct ToolStream {
    pending: String,
    calls: Option<String>,
}

impl ToolStream {
    /// The part of `text` that is content and can be sent now.
    fn push(&mut self, text: &str) -> String {
        use crate::tools::OPEN;
        if let Some(calls) = &mut self.calls {
            calls.push_str(text);
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(at) = self.pending.find(OPEN) {
            self.calls = Some(self.pending[at..].to_string());
            let content = self.pending[..at].to_string();
            self.pending.clear();
            return content;
        }
        // Hold back the longest tail that could begin a call.
        let p = &self.pending;
        let keep = (1..OPEN.len().min(p.len() + 1))
            .rev()
            .find(|&k| p.is_char_boundary(p.len() - k) && OPEN.starts_with(&p[p.len() - k..]))
            .unwrap_or(0);
        let out = p[..p.len() - keep].to_string();
        self.pending.drain(..p.len() - keep);
        out
    }
}

impl StreamState {
    pub(crate) fn chunk(
        &self,
        delta_or_text: Value,
        logprobs: Value,
        finish: Option<&str>,
    ) -> String {
        let mut choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": delta_or_text}),
            Kind::Completion => json!({"index": 0, "text": delta_or_text}),
        };
        choice["logprobs"] = logprobs;
        choice["finish_reason"] = finish.map(Value::from).unwrap_or(Value::Null);
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.st.id,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    pub(crate) fn empty_delta(&self) -> Value {
        match self.kind {
            Kind::Chat => json!({}),
            Kind::Completion => Value::from(""),
        }
    }

    /// Turn one scheduler event into chunks.
    pub(crate) fn on_event(&mut self, ev: Option<SeqEvent>) {
        self.acct.waiting = None; // started (or ended)
        match ev {
            Some(SeqEvent::Text { text, token }) => {
                if token.is_some() {
                    self.generated += 1;
                    self.acct.received += 1;
                }
                let logprobs = match (&token, self.want_logprobs) {
                    (Some(t), true) => match self.kind {
                        Kind::Chat => json!({"content": [chat_logprob(&self.st.tok, t)]}),
                        Kind::Completion => {
                            let v = completion_logprobs(
                                &self.st.tok,
                                std::slice::from_ref(t),
                                self.text_offset,
                            );
                            self.text_offset += t.piece.len();
                            v
                        }
                    },
                    _ => Value::Null,
                };
                let text = match &mut self.tools {
                    Some(t) => t.push(&text),
                    None => text,
                };
                if text.is_empty() && logprobs.is_null() {
                    return; // nothing to tell yet (held-back bytes or stop-string prefix)
                }
                let delta = match self.kind {
                    Kind::Chat => json!({"content": text}),
                    Kind::Completion => Value::from(text),
                };
                let c = self.chunk(delta, logprobs, None);
                self.ready.push_back(c);
            }
            Some(SeqEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                stats,
            }) => {
                // Committed before the last chunk is sent.
                self.acct.record(
                    finish_str(finish),
                    (prompt_tokens, completion_tokens, cached_tokens),
                    &stats,
                );
                let mut finish = finish_str(finish);
                if let Some(t) = self.tools.take() {
                    let calls = t
                        .calls
                        .as_deref()
                        .and_then(|c| crate::tools::parse_calls(c, || new_id("call")).map(|p| p.1));
                    match calls {
                        Some(calls) => {
                            for (i, mut call) in calls.into_iter().enumerate() {
                                call["index"] = Value::from(i);
                                let c =
                                    self.chunk(json!({"tool_calls": [call]}), Value::Null, None);
                                self.ready.push_back(c);
                            }
                            if finish == "stop" {
                                finish = "tool_calls";
                            }
                        }
                        None => {
                            // No complete call (cut by max_tokens): the text is content.
                            let rest = t.pending + t.calls.as_deref().unwrap_or("");
                            if !rest.is_empty() {
                                let c = self.chunk(json!({"content": rest}), Value::Null, None);
                                self.ready.push_back(c);
                            }
                        }
                    }
                }
                let c = self.chunk(self.empty_delta(), Value::Null, Some(finish));
                self.ready.push_back(c);
                if self.include_usage {
                    let u = json!({
                        "id": self.id,
                        "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": self.created, "model": self.st.id,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens, cached_tokens, &stats),
                    });
                    self.ready.push_back(u.to_string());
                }
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
            Some(SeqEvent::Error(m)) => {
                self.acct
                    .record("error", (0, self.generated, 0), &SeqStats::default());
                self.st
                    .metrics
                    .requests_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.ready
                    .push_back(ApiError::internal(m).body().to_string());
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
            None => {
                self.acct
                    .record("error", (0, self.generated, 0), &SeqStats::default());
                self.ready.push_back(
                    ApiError::internal("the scheduler stopped")
                        .body()
                        .to_string(),
                );
                self.ready.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn stream_response(
    st: Arc<AppState>,
    kind: Kind,
    rx: UnboundedReceiver<SeqEvent>,
    id: String,
    want_logprobs: bool,
    include_usage: bool,
    tools: bool,
    acct: Acct,
) -> Response {
    let mut state = StreamState {
        tools: tools.then(ToolStream::default),
        st,
        kind,
        rx,
        id,
        created: unix_now(),
        want_logprobs,
        include_usage,
        ready: Default::default(),
        text_offset: 0,
        done: false,
        acct,
        generated: 0,
    };
    if kind == Kind::Chat {
        let first = state.chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        );
        state.ready.push_back(first);
    }
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.ready.pop_front() {
                return Some((Ok::<Event, Infallible>(Event::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            let ev = s.rx.recv().await;
            s.on_event(ev);
        }
    });
    Sse::new(stream).into_response()
}
