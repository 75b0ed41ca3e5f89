//! Chat templates: turn a conversation into the prompt text a chat model was trained on.
//!
//! Models ship a Jinja template in `tokenizer.chat_template` (the Hugging Face
//! `apply_chat_template` convention). It is rendered with minijinja set up the way Hugging Face
//! and llama.cpp render it, so the prompt text is byte-identical to theirs:
//!
//! * `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the template dropped;
//! * Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()` …) through
//!   minijinja-contrib's pycompat callback, since templates are written against Jinja2 in Python;
//! * `raise_exception(msg)` (templates use it to reject unsupported conversations),
//!   `strftime_now(fmt)` (UTC), and a `tojson` that formats like Python's `json.dumps`
//!   (`", "`/`": "` separators, non-ASCII kept, no HTML escaping), as Hugging Face defines it;
//! * variables `messages` (list of `{role, content}`), `add_generation_prompt`, `bos_token`,
//!   `eos_token`, and `tools` (none, or the request's function definitions).
//!
//! Models without a template (e.g. the Gemma 3 270M base model) get a built-in one chosen by
//! architecture, matching llama.cpp's built-in formats: Gemma's turn markers for `gemma*`
//! architectures, ChatML (`<|im_start|>role\n…<|im_end|>\n`) for everything else. See
//! [`ChatTemplate::builtin_for_arch`].

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use modu_gguf::GgufFile;
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever roles the template knows).
    pub role: String,
    pub content: String,
    /// An assistant message's calls, OpenAI-shaped (`[{id, type, function: {name, arguments}}]`
    /// with `arguments` a JSON object, as Hugging Face templates expect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
        }
    }
}

/// A JSON value as a template value (objects keep their key order).
fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(0.0)),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_value).collect::<Vec<Value>>()),
        J::Object(m) => Value::from_pairs(m.iter().map(|(k, x)| (k.as_str(), json_value(x)))),
    }
}

/// Why a template could not be loaded or rendered. Messages name the problem and, where
/// minijinja knows it, the template line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatTemplateError {
    #[error("chat template does not parse{}: {message}", at_line(*line))]
    Parse {
        line: Option<usize>,
        message: String,
    },

    #[error("chat template failed to render{}: {message}", at_line(*line))]
    Render {
        line: Option<usize>,
        message: String,
    },

    /// The template itself called `raise_exception(msg)`.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),

    #[error("GGUF metadata key `tokenizer.chat_template` is not a string")]
    NotAString,
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// Marker put into the detail of errors raised by `raise_exception`, so that they can be told
/// apart from other render errors after minijinja wraps them.
const RAISED_MARKER: &str = "raise_exception: ";

/// ChatML, the fallback for models without a template (llama.cpp's default format).
const CHATML: &str = "{%- for message in messages -%}\n\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n\
{%- endfor -%}\n\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n";

/// Gemma's turn format as llama.cpp's built-in `gemma` template writes it: no system role (a
/// system message is prepended, trimmed, to the next user turn followed by a blank line),
/// `assistant` is called `model`, contents are trimmed, and BOS is left to the tokenizer.
const GEMMA: &str = "{%- set ns = namespace(system='') -%}\n\
{%- for message in messages -%}\n\
{%- if message.role == 'system' -%}\n\
{%- set ns.system = ns.system + (message.content | trim) -%}\n\
{%- else -%}\n\
{%- set role = 'model' if message.role == 'assistant' else message.role -%}\n\
{{- '<start_of_turn>' + role + '\\n' -}}\n\
{%- if ns.system and role != 'model' -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = '' -%}{%- endif -%}\n\
{{- (message.content | trim) + '<end_of_turn>\\n' -}}\n\
{%- endif -%}\n\
{%- endfor -%}\n\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}\n";

const TEMPLATE_NAME: &str = "chat_template";

/// Byte ranges of the message contents in a rendered prompt ([`ChatTemplate::render_with_spans`]).
pub type ContentSpans = Vec<(usize, usize)>;

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// `Some(name)` for a built-in fallback (`"chatml"`, `"gemma"`), `None` for the model's own
    /// or a user-supplied template.
    builtin: Option<&'static str>,
}

impl ChatTemplate {
    /// Compiles a template from source (e.g. a `--chat-template FILE` override). A template that
    /// does not parse is an error naming the problem and the line.
    pub fn new(source: impl Into<String>) -> Result<ChatTemplate, ChatTemplateError> {
        Self::build(source.into(), None)
    }

    /// The model's own template (`tokenizer.chat_template`), or `None` if the file has none.
    pub fn from_gguf(f: &GgufFile) -> Result<Option<ChatTemplate>, ChatTemplateError> {
        match f.get("tokenizer.chat_template") {
            None => Ok(None),
            Some(v) => {
                let src = v.as_str().ok_or(ChatTemplateError::NotAString)?;
                Self::new(src).map(Some)
            }
        }
    }

    /// The model's own template if it has one, else the built-in one for its architecture
    /// ([`ChatTemplate::builtin_for_arch`]).
    pub fn for_model(f: &GgufFile) -> Result<ChatTemplate, ChatTemplateError> {
        match Self::from_gguf(f)? {
            Some(t) => Ok(t),
            None => Ok(Self::builtin_for_arch(f.architecture().unwrap_or(""))),
        }
    }

    /// Built-in template for models that ship none: Gemma's
    /// `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n` for `gemma*` architectures,
    /// ChatML otherwise. Both reproduce llama.cpp's built-in formats of the same name.
    pub fn builtin_for_arch(arch: &str) -> ChatTemplate {
        let name = if arch.starts_with("gemma") {
            "gemma"
        } else {
            "chatml"
        };
        Self::builtin(name).expect("known built-in")
    }

    /// A built-in template by name (`"chatml"` or `"gemma"`).
    pub fn builtin(name: &str) -> Option<ChatTemplate> {
        let (name, src): (&'static str, &str) = match name {
            "chatml" => ("chatml", CHATML),
            "gemma" => ("gemma", GEMMA),
            _ => return None,
        };
        Some(Self::build(src.to_string(), Some(name)).expect("built-in templates parse"))
    }

    fn build(
        source: String,
        builtin: Option<&'static str>,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .expect("default delimiters are valid");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Parse {
                line: e.line(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            builtin,
        })
    }

    /// Renders a conversation. `bos_token`/`eos_token` are the texts of the model's BOS/EOS
    /// tokens (templates that write `{{ bos_token }}` expect the tokenizer *not* to add BOS again;
    /// callers that tokenize with `add_special` should pass what llama.cpp passes, the token text).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatTemplateError> {
        self.render_tools(messages, None, add_generation_prompt, bos_token, eos_token)
    }

    /// Whether the template renders a `tools` list itself (else callers describe the tools in
    /// a system message of their own).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// [`ChatTemplate::render`] with the function definitions of an OpenAI `tools` list
    /// (`[{type: "function", function: {name, description, parameters}}]`) as `tools`.
    pub fn render_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added in build");
        let ctx = minijinja::context! {
            messages => messages
                .iter()
                .map(|m| {
                    let mut pairs = vec![
                        ("role", Value::from(m.role.as_str())),
                        ("content", Value::from(m.content.as_str())),
                    ];
                    if let Some(calls) = &m.tool_calls {
                        pairs.push(("tool_calls", json_value(calls)));
                    }
                    Value::from_pairs(pairs)
                })
                .collect::<Vec<Value>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            tools => tools.map(json_value).unwrap_or(Value::from(())),
        };
        tmpl.render(ctx).map_err(|e| {
            if let Some(msg) = raised_message(&e) {
                return ChatTemplateError::Raised(msg);
            }
            ChatTemplateError::Render {
                line: e.line(),
                message: describe(&e),
            }
        })
    }

    /// [`ChatTemplate::render`], plus the byte range of each message's content in the result
    /// when the template wrote every content verbatim (or trimmed, as Gemma's does), so that a
    /// tokenizer can treat exactly those ranges as text (see
    /// `Tokenizer::encode_with_literal_spans`). `None` when the contents cannot be located
    /// exactly (a template that transforms them otherwise).
    ///
    /// The ranges come from a second render in which each content is a unique marker: the
    /// markers' positions are where the template put the contents, and substituting the
    /// contents back must reproduce the real render byte for byte, or no ranges are claimed.
    pub fn render_with_spans(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<(String, Option<ContentSpans>), ChatTemplateError> {
        let text =
            self.render_tools(messages, tools, add_generation_prompt, bos_token, eos_token)?;
        const OPEN: char = '\u{E000}';
        const CLOSE: char = '\u{E001}';
        let clash = |t: &str| t.contains(OPEN) || t.contains(CLOSE);
        if messages.iter().any(|m| clash(&m.content)) || clash(bos_token) || clash(eos_token) {
            return Ok((text, None));
        }
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            // Empty contents stay empty: templates test them (`if message.content`).
            .map(|(i, m)| ChatMessage {
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{OPEN}{i}{CLOSE}")
                },
                ..m.clone()
            })
            .collect();
        let Ok(skeleton) =
            self.render_tools(&marked, tools, add_generation_prompt, bos_token, eos_token)
        else {
            return Ok((text, None));
        };
        for trimmed in [false, true] {
            let mut out = String::with_capacity(text.len());
            let mut spans = Vec::with_capacity(messages.len());
            let mut rest = skeleton.as_str();
            let mut ok = true;
            while let Some(a) = rest.find(OPEN) {
                let Some(len) = rest[a..].find(CLOSE) else {
                    ok = false;
                    break;
                };
                let Some(m) = rest[a + OPEN.len_utf8()..a + len]
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| messages.get(i))
                else {
                    ok = false;
                    break;
                };
                out.push_str(&rest[..a]);
                let content = if trimmed {
                    m.content.trim()
                } else {
                    m.content.as_str()
                };
                spans.push((out.len(), out.len() + content.len()));
                out.push_str(content);
                rest = &rest[a + len + CLOSE.len_utf8()..];
            }
            out.push_str(rest);
            if ok && out == text {
                spans.retain(|(a, b)| a < b);
                return Ok((text, Some(spans)));
            }
        }
        Ok((text, None))
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Name of the built-in template in use, `None` for the model's own or a user's template.
    pub fn builtin_name(&self) -> Option<&'static str> {
        self.builtin
    }
}

/// The error's own message followed by its causes (minijinja wraps errors from called
/// functions and filters).
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The message of a `raise_exception` call anywhere in the error chain.
fn raised_message(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(me) = err.downcast_ref::<Error>() {
            if let Some(msg) = me.detail().and_then(|d| d.strip_prefix(RAISED_MARKER)) {
                return Some(msg.to_string());
            }
        }
        cur = err.source();
    }
    None
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED_MARKER}{msg}"),
    ))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: what Hugging Face's
/// `tojson` produces (minijinja's built-in escapes `<`, `>`, `&`, `'` for HTML instead).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.is_finite() {
                    let s = format!("{f:?}");
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String | ValueKind::Bytes => write_json_str(&v.to_string(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(&k.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => write_json_str(&v.to_string(), out),
    }
    Ok(())
}

fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime`
/// directives (`%Y %m %d %e %H %I %M %S %p %y %b %B %a %A %j %Z %%`); Llama 3 templates use it
/// for the "Today Date" line.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_utc(secs, &format)))
}

/// Formats a Unix time (UTC) with a subset of `strftime`.
fn format_utc(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (tod / 3600, (tod % 3600) / 60, tod % 60);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + if leap && month > 2 { 1 } else { 0 };
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!(
                "{:02}",
                if hour % 12 == 0 { 12 } else { hour % 12 }
            )),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('Z') => out.push_str("UTC"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        // 2026-11-23T14:05:09Z is a Monday, day 327 of the year.
        let t = 1_795_442_709;
        assert_eq!(
            format_utc(t, "%Y-%m-%dT%H:%M:%S%Z"),
            "2026-11-23T14:05:09UTC"
        );
        assert_eq!(
            format_utc(t, "%d %b %Y, %A %j %I%p %%"),
            "23 Nov 2026, Monday 327 02PM %"
        );
        assert_eq!(format_utc(951_782_400, "%Y-%m-%d %a"), "2000-02-29 Tue");
    }

    #[test]
    fn python_style_tojson() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let env = &t.env;
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(minijinja::context! { x => Value::from_pairs([
                ("a", Value::from(())),
                ("b", Value::from(vec![Value::from(1), Value::from(2.5), Value::from("<é>")])),
                ("c", Value::from(true)),
            ]) })
            .unwrap();
        assert_eq!(
            out,
            "{\"a\": null, \"b\": [1, 2.5, \"<é>\"], \"c\": true}|{\n  \"a\": null,\n  \"b\": [\n    1,\n    2.5,\n    \"<é>\"\n  ],\n  \"c\": true\n}"
        );
    }
}
