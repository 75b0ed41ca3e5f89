//! The OpenAI request bodies and their checks. `null` means absent, as with OpenAI; a field that
//! modu does not implement is refused with a 400 naming it, except the few in
//! [`IGNORED_FIELDS`] that cannot change the output. Bad values that would silently change the
//! output (sampling, unsupported options) are refused too.

use modu_engine::generate::GenerateParams;
use modu_engine::{SamplingParams, SpecConfig};
use serde::Deserialize;

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and length fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default, alias = "repeat_penalty")]
    pub repetition_penalty: Option<f32>,
    /// A string or a list of strings; parsed by [`Common::params`] for a precise error.
    #[serde(default)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Scale of the module `model` names (default 1).
    #[serde(default)]
    pub lora_scale: Option<f32>,
    /// Further modules applied together with the one `model` names, each with its scale.
    #[serde(default)]
    pub lora: Option<Vec<LoraSpec>>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`; parsed by
    /// `structured::output_grammar` for precise errors.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// Extension (as in vLLM and llama.cpp): a Lark grammar the output must follow.
    #[serde(default)]
    pub grammar: Option<serde_json::Value>,
    /// Extension: a regular expression the whole output must match.
    #[serde(default)]
    pub regex: Option<serde_json::Value>,
    /// Extension: speculative decoding for this request, overriding the server's `--spec`:
    /// `"ngram"` (prompt lookup), `"none"`, or `{"type": "ngram", "max_draft_tokens": N}`.
    /// Parsed by [`Common::speculative`].
    #[serde(default)]
    pub speculative: Option<serde_json::Value>,
}

/// One entry of a request's `lora` list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub name: String,
    #[serde(default)]
    pub scale: Option<f32>,
}

/// Message content: a string, or a list of parts of which only text parts are supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// A string or a list of parts; parsed by [`Message::content`] for a precise error.
    #[serde(default)]
    pub content: Option<serde_json::Value>,
    /// An assistant message's calls (`[{id, type, function: {name, arguments}}]`).
    #[serde(default)]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool message's answer to call `tool_call_id` (templates do not show it).
    #[serde(default)]
    pub tool_call_id: Option<serde_json::Value>,
    /// A participant's name (shown by no template here; accepted as OpenAI does).
    #[serde(default)]
    pub name: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Function definitions the model may call; parsed by `tools::ToolPlan::parse`.
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub common: Common,
    /// Every other field: refused unless listed in [`IGNORED_FIELDS`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `prompt`: a string, a list holding one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list of one string, or token ids; parsed by [`CompletionRequest::prompt`].
    pub prompt: serde_json::Value,
    /// For completions `logprobs` is the number of alternatives (0..=20).
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
    /// Every other field: refused unless listed in [`IGNORED_FIELDS`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// OpenAI request fields that are accepted and ignored because they cannot change the output:
/// end-user and bookkeeping tags, OpenAI-side storage and routing hints.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// The checks of a chat request's fields that need no model: unknown fields, the output
/// format, tools and tool choice (and the call grammar they make), messages' tool calls.
pub fn check_chat_fields(r: &ChatRequest) -> Result<(), ApiError> {
    check_other_fields(&r.other)?;
    crate::structured::output_grammar(&r.common)?;
    if let Some(plan) = crate::tools::ToolPlan::parse(
        r.tools.as_ref(),
        r.tool_choice.as_ref(),
        r.parallel_tool_calls,
    )? {
        std::hint::black_box(plan.grammar());
    }
    for (i, m) in r.messages.iter().enumerate() {
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
            crate::tools::template_calls(calls, i)?;
        }
    }
    Ok(())
}

/// Refuse the fields modu does not implement (a `null` value counts as absent).
pub fn check_other_fields(
    other: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    for (name, value) in other {
        if value.is_null() || IGNORED_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let shown: String = name.chars().take(64).collect();
        let hint = match name.as_str() {
            "functions" | "function_call" => " (use `tools` and `tool_choice`)",
            "logit_bias" if value.as_object().is_some_and(|m| m.is_empty()) => continue,
            _ => "",
        };
        return Err(ApiError::invalid(
            &shown,
            format!("the parameter `{shown}` is not supported by this server{hint}"),
        ));
    }
    Ok(())
}

/// Most alternatives per token OpenAI allows.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop strings OpenAI allows.
pub const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes (matching is linear in it, but the held-back text is not).
pub const MAX_STOP_BYTES: usize = 512;
/// Most draft tokens a request may ask to verify per step.
pub const MAX_DRAFT_TOKENS: i64 = 16;
/// Longest `model` (and `lora[].name`) accepted.
pub const MAX_MODEL_NAME: usize = 256;
/// Most entries of a request's `lora` list.
pub const MAX_LORA_ENTRIES: usize = 16;

impl Common {
    /// The request's choice of speculative decoding: `None` when it makes none (the server's
    /// default applies), `Some(None)` for off, `Some(Some(config))` for prompt lookup.
    pub fn speculative(&self) -> Result<Option<Option<SpecConfig>>, ApiError> {
        let bad = || {
            ApiError::invalid(
                "speculative",
                format!(
                    "speculative must be \"ngram\", \"none\" or {{\"type\": \"ngram\", \"max_draft_tokens\": 1..{MAX_DRAFT_TOKENS}}}"
                ),
            )
        };
        let v = match &self.speculative {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(v) => v,
        };
        match v {
            serde_json::Value::String(s) if s == "none" => Ok(Some(None)),
            serde_json::Value::String(s) if s == "ngram" => Ok(Some(Some(SpecConfig::default()))),
            serde_json::Value::Object(o) => {
                if o.keys().any(|k| k != "type" && k != "max_draft_tokens") {
                    return Err(bad());
                }
                match o.get("type").and_then(|t| t.as_str()) {
                    Some("none") if o.len() == 1 => return Ok(Some(None)),
                    Some("ngram") => {}
                    _ => return Err(bad()),
                }
                let mut cfg = SpecConfig::default();
                if let Some(n) = o.get("max_draft_tokens") {
                    match n.as_i64() {
                        Some(n) if (1..=MAX_DRAFT_TOKENS).contains(&n) => {
                            cfg.max_draft = n as usize
                        }
                        _ => return Err(bad()),
                    }
                }
                Ok(Some(Some(cfg)))
            }
            _ => Err(bad()),
        }
    }

    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// Generation settings, checked. `logprobs`: alternatives per token, if asked for.
    /// Unset sampling fields take OpenAI's defaults (temperature 1, top_p 1) with the extra
    /// llama.cpp-style filters off, so a client that sets nothing gets plain sampling.
    pub fn params(&self, logprobs: Option<usize>) -> Result<GenerateParams, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be 1 (got {n}): this server returns one choice per request"),
                ));
            }
        }
        let max = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max {
            Some((name, m)) if m < 1 => {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} must be at least 1, got {m}"),
                ))
            }
            Some((_, m)) => m as usize,
            None => usize::MAX,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be >= 0, got {k}"),
                ))
            }
            Some(k) => k as usize,
        };
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} must be between -2 and 2, got {v}"),
                    ));
                }
            }
        }
        let sampling = SamplingParams {
            temperature,
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repeat_penalty: self.repetition_penalty.unwrap_or(1.0),
            repeat_last_n: 64,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64).unwrap_or_else(fresh_seed),
        };
        if let Err(msg) = sampling.validate() {
            let param = msg.split_whitespace().next().unwrap_or("").to_string();
            return Err(ApiError::invalid(&param, msg));
        }
        let stop = match self.stop.clone().map(serde_json::from_value::<StopField>) {
            None => vec![],
            Some(Ok(StopField::One(s))) => vec![s],
            Some(Ok(StopField::Many(v))) => v,
            Some(Err(_)) => {
                return Err(ApiError::invalid(
                    "stop",
                    "stop must be a string or a list of strings",
                ))
            }
        };
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOPS} stop sequences are allowed, got {}",
                    stop.len()
                ),
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop sequences may be at most {MAX_STOP_BYTES} bytes, got one of {}",
                    long.len()
                ),
            ));
        }
        Ok(GenerateParams {
            max_tokens,
            sampling,
            stop,
            logprobs,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            speculative: self.speculative()?.flatten(),
        })
    }
}

/// A seed for requests that give none, so that two identical unseeded requests differ.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Check a `top_logprobs`-style count.
pub fn check_logprobs(param: &str, k: i64) -> Result<usize, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
        ));
    }
    Ok(k as usize)
}

impl Message {
    /// The content as a string or text parts; `index` names the message in errors.
    pub fn content(&self, index: usize) -> Result<Option<Content>, ApiError> {
        match &self.content {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
                ApiError::invalid(
                    &format!("messages[{index}].content"),
                    format!(
                        "messages[{index}].content must be a string or a list of content parts"
                    ),
                )
            }),
        }
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<PromptField, ApiError> {
        serde_json::from_value(self.prompt.clone()).map_err(|_| {
            ApiError::invalid(
                "prompt",
                "prompt must be a string, a list of one string, or a list of token ids",
            )
        })
    }
}
