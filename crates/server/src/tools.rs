//! Tool calling: a request's `tools`, `tool_choice` and `parallel_tool_calls`, the grammar
//! that makes every call's JSON valid for its function, and reading calls back out of the
//! output.
//!
//! Calls are written the way Qwen2.5 (and Hermes-style models) were trained to write them,
//! one per block: `<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>`.
//! Templates with a `tools` section render the definitions themselves; for others a system
//! message describes them in that format ([`fallback_system_text`]).
//!
//! - `tool_choice: "required"` (or a named function): the whole output is the call grammar.
//! - `"auto"` (the default): the model writes freely; once it writes `<tool_call>`, the rest of
//!   the output must be calls (a constraint triggered by that text).
//! - `"none"`: the tools are not shown and nothing is constrained.

use serde_json::{json, Map, Value};

use crate::error::ApiError;

pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";

/// Most tools per request (OpenAI's limit).
const MAX_TOOLS: usize = 128;
/// Longest function name (OpenAI's limit).
const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    None,
    Auto,
    Required,
    Named(usize),
}

/// A request's tools, checked.
#[derive(Debug)]
pub(crate) struct ToolPlan {
    /// The definitions as the template receives them (OpenAI's shape).
    pub tools: Value,
    names: Vec<String>,
    params: Vec<Value>,
    pub choice: Choice,
    pub parallel: bool,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg.into())
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_NAME).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolPlan {
    /// `None` when the request has no tools (a `tool_choice` without tools is refused).
    pub(crate) fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<ToolPlan>, ApiError> {
        let tools = tools.filter(|v| !v.is_null());
        let choice = choice.filter(|v| !v.is_null());
        let Some(tools) = tools else {
            return match choice {
                None => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(bad("tool_choice", "tool_choice needs a `tools` list")),
            };
        };
        let Some(list) = tools.as_array() else {
            return Err(bad("tools", "tools must be a list"));
        };
        if list.is_empty() || list.len() > MAX_TOOLS {
            return Err(bad(
                "tools",
                format!(
                    "tools must list 1 to {MAX_TOOLS} functions, got {}",
                    list.len()
                ),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut params = Vec::new();
        let mut defs = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let p = |f: &str| format!("tools[{i}].{f}");
            let Some(obj) = t.as_object() else {
                return Err(bad(&format!("tools[{i}]"), "each tool must be an object"));
            };
            if obj.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    &p("type"),
                    "only tools of type `function` are supported",
                ));
            }
            if let Some(k) = obj.keys().find(|k| *k != "type" && *k != "function") {
                return Err(bad(&p(k), format!("unknown tool field `{}`", clip(k))));
            }
            let Some(f) = obj.get("function").and_then(Value::as_object) else {
                return Err(bad(
                    &p("function"),
                    "a function tool needs a `function` object",
                ));
            };
            for k in f.keys() {
                if !["name", "description", "parameters", "strict"].contains(&k.as_str()) {
                    return Err(bad(
                        &p("function"),
                        format!("unknown function field `{}`", clip(k)),
                    ));
                }
            }
            let name = match f.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => n.to_string(),
                _ => {
                    return Err(bad(
                        &p("function.name"),
                        format!("function names are 1 to {MAX_NAME} letters, digits, `_` or `-`"),
                    ))
                }
            };
            if names.contains(&name) {
                return Err(bad(
                    &p("function.name"),
                    format!("the function `{name}` is defined twice"),
                ));
            }
            if f.get("description")
                .is_some_and(|d| !d.is_string() && !d.is_null())
            {
                return Err(bad(
                    &p("function.description"),
                    "description must be a string",
                ));
            }
            let schema = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(bad(
                        &p("function.parameters"),
                        "parameters must be a JSON schema object",
                    ))
                }
            };
            let mut def = json!({"name": name, "parameters": schema});
            if let Some(d) = f.get("description").filter(|d| d.is_string()) {
                def["description"] = d.clone();
            }
            defs.push(json!({"type": "function", "function": def}));
            names.push(name);
            params.push(schema);
        }
        let choice = match choice {
            None => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!(
                            "tool_choice must be none, auto, required or a function, got {:?}",
                            clip(other)
                        ),
                    ))
                }
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                match (o.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(n)) => match names.iter().position(|x| x == n) {
                        Some(k) => Choice::Named(k),
                        None => {
                            return Err(bad(
                                "tool_choice.function.name",
                                format!("no tool named `{}` is defined in tools", clip(n)),
                            ))
                        }
                    },
                    _ => {
                        return Err(bad(
                            "tool_choice",
                            "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        ))
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice must be a string or an object",
                ))
            }
        };
        Ok(Some(ToolPlan {
            tools: Value::Array(defs),
            names,
            params,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The Lark grammar the calls follow, and the text that triggers it (`None`: from the
    /// first token). `None` under `tool_choice: none`.
    pub(crate) fn grammar(&self) -> Option<(String, Option<&'static str>)> {
        let (which, trigger): (Vec<usize>, Option<&'static str>) = match self.choice {
            Choice::None => return None,
            Choice::Auto => ((0..self.names.len()).collect(), Some(OPEN)),
            Choice::Required => ((0..self.names.len()).collect(), None),
            Choice::Named(k) => (vec![k], None),
        };
        let body = self.call_schema(&which);
        let more = self.parallel && !matches!(self.choice, Choice::Named(_));
        let lit = |s: &str| serde_json::to_string(s).expect("strings serialize");
        let mut g = String::new();
        let first = if trigger.is_some() {
            format!("{} body {}", lit("\n"), lit(&format!("\n{CLOSE}")))
        } else {
            "call".to_string()
        };
        g.push_str(&format!(
            "start: {first}{}\n",
            if more { " (\"\\n\" call)*" } else { "" }
        ));
        g.push_str(&format!(
            "call: {} body {}\n",
            lit(&format!("{OPEN}\n")),
            lit(&format!("\n{CLOSE}"))
        ));
        g.push_str(&format!("body: %json {body}\n"));
        Some((g, trigger))
    }

    /// `{"name": NAME, "arguments": PARAMETERS}` for the chosen functions. Each function's own
    /// `$defs` move to the root (renamed per function) with its `$ref`s rewritten, so that
    /// references keep resolving inside the combined schema.
    fn call_schema(&self, which: &[usize]) -> String {
        let mut defs = Map::new();
        let mut alts = Vec::new();
        for &k in which {
            let prefix = format!("f{k}");
            let mut params = self.params[k].clone();
            if let Some(obj) = params.as_object_mut() {
                for key in ["$defs", "definitions"] {
                    if let Some(Value::Object(d)) = obj.remove(key) {
                        for (name, mut schema) in d {
                            rewrite_refs(&mut schema, &prefix);
                            defs.insert(format!("{prefix}_{name}"), schema);
                        }
                    }
                }
            }
            rewrite_refs(&mut params, &prefix);
            defs.insert(prefix.clone(), params);
            alts.push(json!({
                "type": "object",
                "properties": {
                    "name": {"const": self.names[k]},
                    "arguments": {"$ref": format!("#/$defs/{prefix}")},
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }));
        }
        let mut root = if alts.len() == 1 {
            alts.pop().expect("one")
        } else {
            json!({"anyOf": alts})
        };
        root["$defs"] = Value::Object(defs);
        root["x-guidance"] = json!({
            "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
        });
        root.to_string()
    }
}

/// Point a function's `$ref`s at its definitions' new names under the root `$defs`.
fn rewrite_refs(v: &mut Value, prefix: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "$ref" {
                    if let Value::String(r) = x {
                        let new = if r == "#" {
                            Some(format!("#/$defs/{prefix}"))
                        } else {
                            r.strip_prefix("#/$defs/")
                                .or_else(|| r.strip_prefix("#/definitions/"))
                                .map(|rest| format!("#/$defs/{prefix}_{rest}"))
                        };
                        if let Some(n) = new {
                            *r = n;
                        }
                    }
                } else {
                    rewrite_refs(x, prefix);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_refs(x, prefix)),
        _ => {}
    }
}

/// An assistant message's `tool_calls` as templates expect them: `arguments` parsed from
/// OpenAI's JSON string into an object.
pub(crate) fn template_calls(calls: &Value, index: usize) -> Result<Value, ApiError> {
    let p = |j: usize, f: &str| format!("messages[{index}].tool_calls[{j}]{f}");
    let Some(list) = calls.as_array() else {
        return Err(bad(
            &format!("messages[{index}].tool_calls"),
            "tool_calls must be a list",
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name.filter(|n| valid_name(n)) else {
            return Err(bad(
                &p(j, ".function.name"),
                "each call needs a valid function name",
            ));
        };
        let args = match f.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                bad(
                    &p(j, ".function.arguments"),
                    format!("arguments must be a JSON object: {e}"),
                )
            })?,
            Some(o @ Value::Object(_)) => o.clone(),
            Some(_) => {
                return Err(bad(
                    &p(j, ".function.arguments"),
                    "arguments must be a JSON string",
                ))
            }
        };
        let mut call = json!({"type": "function", "function": {"name": name, "arguments": args}});
        if let Some(id) = c.get("id").filter(|v| v.is_string()) {
            call["id"] = id.clone();
        }
        out.push(call);
    }
    Ok(Value::Array(out))
}

/// The system text that describes the tools to a model whose template has no tools section.
pub(crate) fn fallback_system_text(tools: &Value) -> String {
    let mut s = String::from(
        "You can call functions to answer the user. The functions are listed below, one JSON \
         definition per line, between <tools> and </tools>.\n<tools>\n",
    );
    for t in tools.as_array().into_iter().flatten() {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(&format!(
        "</tools>\nTo call a function, reply with a block like this for each call, and nothing else:\n\
         {OPEN}\n{{\"name\": \"FUNCTION_NAME\", \"arguments\": {{...}}}}\n{CLOSE}"
    ));
    s
}

/// An assistant message's calls written out as the model writes them (for templates without
/// a tools section).
pub(crate) fn calls_as_text(calls: &Value) -> String {
    let mut s = String::new();
    for c in calls.as_array().into_iter().flatten() {
        let f = &c["function"];
        let body = json!({"name": f["name"], "arguments": f["arguments"]});
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&format!("{OPEN}\n{body}\n{CLOSE}"));
    }
    s
}

/// The calls in an output: the text before the first call (`None` if blank) and each call as
/// OpenAI returns it (`{id, type, function: {name, arguments}}`, `arguments` a JSON string).
/// `None` when the output holds no complete, well-formed call.
pub(crate) fn parse_calls(
    text: &str,
    mut new_id: impl FnMut() -> String,
) -> Option<(Option<String>, Vec<Value>)> {
    let start = text.find(OPEN)?;
    let content = text[..start].trim();
    let mut rest = &text[start..];
    let mut calls = Vec::new();
    while let Some(a) = rest.find(OPEN) {
        let after = &rest[a + OPEN.len()..];
        let b = after.find(CLOSE)?;
        let v: Value = serde_json::from_str(after[..b].trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let args = v.get("arguments").cloned().unwrap_or(json!({}));
        calls.push(json!({
            "id": new_id(),
            "type": "function",
            "function": {"name": name, "arguments": args.to_string()},
        }));
        rest = &after[b + CLOSE.len()..];
    }
    if calls.is_empty() {
        return None;
    }
    Some(((!content.is_empty()).then(|| content.to_string()), calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_back_with_their_text() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
        let mut n = 0;
        let (content, calls) = parse_calls(out, || {
            n += 1;
            format!("call_{n}")
        })
        .unwrap();
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(calls[1]["id"], "call_2");
        assert!(parse_calls("no calls", String::new).is_none());
        assert!(parse_calls("<tool_call>\n{\"name\": \"f\"", String::new).is_none());
    }

    #[test]
    fn refs_move_with_their_definitions() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}, "me": {"$ref": "#"}},
            "$defs": {"A": {"type": "object", "properties": {"b": {"$ref": "#/$defs/A"}}}}
        }}}]);
        let plan = ToolPlan::parse(Some(&tools), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        let s: Value = serde_json::from_str(&plan.call_schema(&[0])).unwrap();
        assert_eq!(s["$defs"]["f0"]["properties"]["a"]["$ref"], "#/$defs/f0_A");
        assert_eq!(s["$defs"]["f0"]["properties"]["me"]["$ref"], "#/$defs/f0");
        assert_eq!(
            s["$defs"]["f0_A"]["properties"]["b"]["$ref"],
            "#/$defs/f0_A"
        );
    }

    #[test]
    fn bad_tools_and_choices_are_named() {
        let t = json!([{"type": "function", "function": {"name": "f"}}]);
        let e = ToolPlan::parse(
            Some(&t),
            Some(&json!({"type": "function", "function": {"name": "g"}})),
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("`g`"), "{}", e.message);
        let e = ToolPlan::parse(None, Some(&json!("required")), None).unwrap_err();
        assert!(e.message.contains("tools"), "{}", e.message);
        let dup = json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]);
        assert!(ToolPlan::parse(Some(&dup), None, None).is_err());
        let bad_name = json!([{"type": "function", "function": {"name": "a b"}}]);
        assert!(ToolPlan::parse(Some(&bad_name), None, None).is_err());
    }
}
