//! Structured output: a request's `response_format` (JSON object or JSON schema), `grammar`
//! (Lark) or `regex`, checked and compiled into a per-sequence [`Constraint`] that masks the
//! sampler. Compiling runs on the blocking pool with llguidance's fuel limits, so a hostile
//! schema costs bounded CPU and never the HTTP workers.

use std::sync::Arc;

use modu_engine::{Constraint, Grammar, GrammarEngine, GrammarError};
use serde_json::Value;

use crate::api::Common;
use crate::error::ApiError;
use crate::server::AppState;

/// Longest `json_schema.name` (OpenAI's limit).
const MAX_SCHEMA_NAME: usize = 64;

/// The grammar a request's output must follow, and the request field it came from.
pub(crate) fn output_grammar(common: &Common) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    if let Some(rf) = common.response_format.as_ref().filter(|v| !v.is_null()) {
        if let Some(g) = response_format(rf)? {
            found.push((g, "response_format"));
        }
    }
    for (field, value) in [("grammar", &common.grammar), ("regex", &common.regex)] {
        let Some(v) = value.as_ref().filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(text) = v.as_str() else {
            return Err(ApiError::invalid(
                field,
                format!("{field} must be a string"),
            ));
        };
        found.push((
            if field == "grammar" {
                Grammar::Lark(text.to_string())
            } else {
                Grammar::Regex(text.to_string())
            },
            field,
        ));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|f| f.1).collect();
        return Err(ApiError::invalid(
            names[1],
            format!(
                "only one of response_format (json), grammar and regex may be given, got {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(found.pop())
}

fn response_format(rf: &Value) -> Result<Option<Grammar>, ApiError> {
    let bad = |param: &str, msg: String| Err(ApiError::invalid(param, msg));
    let Some(obj) = rf.as_object() else {
        return bad(
            "response_format",
            "response_format must be an object".into(),
        );
    };
    for key in obj.keys() {
        if key != "type" && key != "json_schema" {
            return bad(
                "response_format",
                format!("unknown response_format field `{}`", clip(key)),
            );
        }
    }
    let kind = obj.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema").and_then(Value::as_object) else {
                return bad(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object".into(),
                );
            };
            for key in js.keys() {
                if !["name", "schema", "strict", "description"].contains(&key.as_str()) {
                    return bad(
                        "response_format.json_schema",
                        format!("unknown json_schema field `{}`", clip(key)),
                    );
                }
            }
            match js.get("name").and_then(Value::as_str) {
                Some(n)
                    if !n.is_empty()
                        && n.len() <= MAX_SCHEMA_NAME
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {}
                _ => {
                    return bad(
                        "response_format.json_schema.name",
                        format!(
                            "json_schema.name is required: 1 to {MAX_SCHEMA_NAME} letters, digits, `_` or `-`"
                        ),
                    )
                }
            }
            if js
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return bad(
                    "response_format.json_schema.strict",
                    "json_schema.strict must be a boolean".into(),
                );
            }
            match js.get("schema") {
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(s) if s.is_object() || s.is_boolean() => {
                    Ok(Some(Grammar::JsonSchema(s.clone())))
                }
                Some(_) => bad(
                    "response_format.json_schema.schema",
                    "json_schema.schema must be a JSON schema object".into(),
                ),
            }
        }
        Some(other) => bad(
            "response_format.type",
            format!(
                "response_format.type must be text, json_object or json_schema, got {:?}",
                clip(other)
            ),
        ),
        None => bad(
            "response_format.type",
            "response_format.type must be a string".into(),
        ),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

impl AppState {
    /// The model's grammar engine (its token trie), built on first use.
    pub(crate) fn grammar_engine(&self) -> Result<Arc<GrammarEngine>, ApiError> {
        self.grammar
            .get_or_init(|| {
                GrammarEngine::new(&self.tok)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| {
                ApiError::invalid(
                    "response_format",
                    format!("structured output is unavailable for this model: {e}"),
                )
            })
    }

    /// Compile `grammar`; errors are 400s naming `param`.
    pub(crate) fn compile(&self, grammar: &Grammar, param: &str) -> Result<Constraint, ApiError> {
        let engine = self.grammar_engine()?;
        engine.compile(grammar).map_err(|e| {
            let what = match grammar {
                Grammar::JsonObject | Grammar::JsonSchema(_) => "the JSON schema",
                Grammar::Lark(_) => "the grammar",
                Grammar::Regex(_) => "the regex",
            };
            let msg = match &e {
                GrammarError::TooLarge { .. } => e.to_string(),
                _ => format!("{what} cannot be used: {e}"),
            };
            ApiError::invalid(param, msg)
        })
    }
}
