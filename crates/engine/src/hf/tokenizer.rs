//! `tokenizer.json` ⇄ `tokenizer.ggml.*` (see the module doc of [`super`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use modu_gguf::{Array, Value};
use serde_json::{json, Value as Json};

use super::*;

/// `<0xNN>` byte tokens of SentencePiece vocabularies.
pub(crate) fn is_byte_token(s: &str) -> bool {
    s.len() == 6
        && s.starts_with("<0x")
        && s.ends_with('>')
        && s[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The regexes of the byte-level pre-tokenizers modu knows, as `tokenizer.json` writes them,
/// with their GGUF `tokenizer.ggml.pre` names.
pub(crate) const HF_PRE: &[(&str, &str)] = &[
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "gpt2",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    ),
];

/// All `Split` regexes in a pre-tokenizer tree, and whether a `ByteLevel` step uses its own
/// (GPT-2) regex.
pub(crate) fn collect_pre(
    v: &Json,
    regexes: &mut Vec<String>,
    byte_level_regex: &mut bool,
    byte_level: &mut bool,
) {
    match v.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in v
                .get("pretokenizers")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                collect_pre(p, regexes, byte_level_regex, byte_level);
            }
        }
        Some("Split") => {
            if let Some(r) = v
                .get("pattern")
                .and_then(|p| p.get("Regex").or_else(|| p.get("String")))
                .and_then(|r| r.as_str())
            {
                regexes.push(r.to_string());
            }
        }
        Some("ByteLevel") => {
            *byte_level = true;
            if v.get("use_regex").and_then(|u| u.as_bool()).unwrap_or(true) {
                *byte_level_regex = true;
            }
        }
        _ => {}
    }
}

/// Content of a special-token entry of tokenizer_config.json (`"<s>"` or `{"content": "<s>"}`).
pub(crate) fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

pub(crate) fn tokenizer_metadata(
    dir: &Path,
    arch: HfArch,
    config: &Json,
    n_vocab: usize,
    m: &mut Vec<(String, Value)>,
) -> Result<(), HfError> {
    let tj = need_json(dir, "tokenizer.json")?;
    let tc = read_json(dir, "tokenizer_config.json")?.unwrap_or(Json::Null);
    let gen = read_json(dir, "generation_config.json")?.unwrap_or(Json::Null);
    let terr = |s: String| HfError::Tokenizer(s);
    let model = tj
        .get("model")
        .ok_or_else(|| terr("tokenizer.json has no `model`".into()))?;
    let mtype = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);

    // id → (token, score)
    let mut vocab: BTreeMap<usize, (String, Option<f32>)> = BTreeMap::new();
    let mut unk_id = None;
    match mtype {
        "BPE" => {
            let v = model
                .get("vocab")
                .and_then(|v| v.as_object())
                .ok_or_else(|| terr("BPE model without a `vocab` object".into()))?;
            for (tok, id) in v {
                let id = id
                    .as_u64()
                    .ok_or_else(|| terr(format!("bad id for token {tok:?}")))?;
                vocab.insert(id as usize, (tok.clone(), None));
            }
        }
        "Unigram" => {
            let v = model
                .get("vocab")
                .and_then(|v| v.as_array())
                .ok_or_else(|| terr("Unigram model without a `vocab` array".into()))?;
            for (id, e) in v.iter().enumerate() {
                let tok = e.get(0).and_then(|t| t.as_str());
                let score = e.get(1).and_then(|s| s.as_f64());
                let (Some(tok), Some(score)) = (tok, score) else {
                    return Err(terr(format!("bad Unigram vocab entry {id}")));
                };
                vocab.insert(id, (tok.to_string(), Some(score as f32)));
            }
            unk_id = model
                .get("unk_id")
                .and_then(|u| u.as_u64())
                .map(|u| u as usize);
        }
        other => {
            return Err(terr(format!(
                "tokenizer model `{other}` (supported: BPE, Unigram)"
            )))
        }
    }
    // Added tokens: id → special
    let mut added: HashMap<usize, bool> = HashMap::new();
    for a in tj
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(|i| i.as_u64()),
            a.get("content").and_then(|c| c.as_str()),
        ) else {
            return Err(terr("bad added_tokens entry".into()));
        };
        let id = id as usize;
        let special = a.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        let score = vocab.get(&id).and_then(|(_, s)| *s);
        vocab.insert(id, (content.to_string(), score));
        added.insert(id, special);
    }
    let max_id = vocab.keys().next_back().copied().unwrap_or(0);
    if max_id >= n_vocab {
        return Err(terr(format!(
            "token id {max_id} is outside the embedding's {n_vocab} rows"
        )));
    }
    let spm = byte_fallback || mtype == "Unigram";
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    let mut normal_rank = 0f32;
    for id in 0..n_vocab {
        let Some((tok, score)) = vocab.get(&id) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(5i32);
            scores.push(-1000.0f32);
            continue;
        };
        let ty = match added.get(&id) {
            Some(true) => 3,
            Some(false) => 4,
            None if spm && is_byte_token(tok) => 6,
            None if Some(id) == unk_id => 2,
            None => 1,
        };
        let sc = match (score, ty) {
            (Some(s), _) => *s,
            (None, 1) => {
                // SentencePiece BPE: higher score = earlier merge = smaller id among normal
                // pieces, so the negated rank reproduces the merge order.
                let s = -normal_rank;
                normal_rank += 1.0;
                s
            }
            (None, 6) => 0.0,
            (None, _) => -1000.0,
        };
        tokens.push(tok.clone());
        types.push(ty);
        scores.push(sc);
    }
    let lookup: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();

    if spm {
        m.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        m.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens.clone())),
        ));
        m.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(Array::F32(scores)),
        ));
        m.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ));
        // SentencePiece's dummy prefix shows up as a `Prepend("▁")` normalizer (or a
        // Metaspace pre-tokenizer with prepend_scheme) in tokenizer.json.
        let text = serde_json::to_string(&tj.get("normalizer")).unwrap_or_default()
            + &serde_json::to_string(&tj.get("pre_tokenizer")).unwrap_or_default();
        let space_prefix = text.contains("\"Prepend\"")
            || (text.contains("Metaspace") && !text.contains("\"never\""));
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(space_prefix),
        ));
    } else {
        let (mut regexes, mut blr, mut bl) = (Vec::new(), false, false);
        if let Some(p) = tj.get("pre_tokenizer") {
            collect_pre(p, &mut regexes, &mut blr, &mut bl);
        }
        if !bl {
            return Err(terr(
                "BPE without byte fallback needs a ByteLevel pre-tokenizer".into(),
            ));
        }
        // EXAONE's byte-level vocabularies have their own pre-tokenizers, which llama.cpp's
        // converter recognises by the tokenizer (its hash), not by the regex: the
        // architecture decides here.
        let pre = match (arch, regexes.as_slice()) {
            (HfArch::Exaone, _) => "exaone",
            (HfArch::Exaone4, _) => "exaone4",
            (_, []) if blr => "gpt2",
            (_, [r]) => HF_PRE
                .iter()
                .find(|(_, re)| re == r)
                .map(|(n, _)| *n)
                .ok_or_else(|| terr(format!("unknown pre-tokenizer regex {r:?}")))?,
            _ => return Err(terr(format!("unknown pre-tokenizer {regexes:?}"))),
        };
        let merges: Vec<String> = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| terr("BPE model without `merges`".into()))?
            .iter()
            .map(|e| match e {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) if p.len() == 2 => {
                    Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                }
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| terr("bad merges entry".into()))?;
        m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        m.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens.clone())),
        ));
        m.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ));
        m.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ));
    }
    // Special ids: tokenizer_config.json's token strings first, then config.json /
    // generation_config.json ids (as llama.cpp's SpecialVocab does).
    let id_of = |key: &str| -> Result<Option<u32>, HfError> {
        if let Some(c) = token_content(tc.get(key)) {
            return lookup
                .get(c.as_str())
                .map(|&i| Some(i as u32))
                .ok_or_else(|| terr(format!("{key} {c:?} is not in the vocabulary")));
        }
        let id_key = format!("{}_id", key);
        for src in [config, &gen] {
            match src.get(&id_key) {
                Some(Json::Number(n)) => return Ok(n.as_u64().map(|x| x as u32)),
                Some(Json::Array(a)) => {
                    return Ok(a.first().and_then(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        Ok(None)
    };
    for (key, gk) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = id_of(key)? {
            if id as usize >= n_vocab {
                return Err(terr(format!("{key} id {id} out of range")));
            }
            m.push((format!("tokenizer.ggml.{gk}"), Value::U32(id)));
        }
    }
    let add_bos = tc
        .get("add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(spm);
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(e) = tc.get("add_eos_token").and_then(|v| v.as_bool()) {
        m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(e)));
    }
    let template = match tc.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        _ => None,
    };
    let template = match template {
        Some(t) => Some(t),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(())
}

pub(crate) fn export_tokenizer(file: &modu_gguf::GgufFile, dir: &Path) -> Result<(), HfError> {
    let terr = |s: &str| HfError::Tokenizer(s.into());
    let model = file
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| terr("no tokenizer.ggml.model"))?;
    let tokens = file
        .get_array("tokenizer.ggml.tokens")
        .and_then(|a| a.as_strings())
        .ok_or_else(|| terr("no tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = file
        .get_array("tokenizer.ggml.token_type")
        .and_then(|a| a.as_i32s())
        .map(|t| t.to_vec())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    let tj = match model {
        "gpt2" => {
            let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
            // EXAONE 4.0's pre-tokenizer is GPT-2's; EXAONE 3.5's splits every digit first.
            let pre = match pre {
                "gpt-2" | "exaone4" => "gpt2",
                p => p,
            };
            let re = if pre == "exaone" {
                r"\p{N}"
            } else {
                HF_PRE
                    .iter()
                    .find(|(n, _)| *n == pre)
                    .map(|(_, r)| *r)
                    .ok_or_else(|| {
                        HfError::Tokenizer(format!(
                            "export of pre-tokenizer `{pre}` is not supported"
                        ))
                    })?
            };
            let mut vocab = serde_json::Map::new();
            for (i, t) in tokens.iter().enumerate() {
                let ty = types.get(i).copied().unwrap_or(1);
                if ty == 1 {
                    vocab.insert(t.clone(), json!(i));
                }
            }
            let merges = file
                .get_array("tokenizer.ggml.merges")
                .and_then(|a| a.as_strings())
                .ok_or_else(|| terr("no tokenizer.ggml.merges"))?;
            let pre_tok = if pre == "gpt2" {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            } else if pre == "exaone" {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
                ]})
            } else {
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
                ]})
            };
            json!({
                    "version": "1.0",
                    "truncation": null,
                    "padding": null,
                    "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": pre_tok,
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                        "vocab": vocab, "merges": merges},
            })
        }
        "llama" => {
            let scores = file
                .get_array("tokenizer.ggml.scores")
                .and_then(|a| a.as_f32s())
                .ok_or_else(|| terr("no tokenizer.ggml.scores"))?;
            let vocab: Vec<Json> = tokens
                .iter()
                .zip(scores)
                .map(|(t, s)| json!([t, s]))
                .collect();
            let unk = types.iter().position(|&t| t == 2);
            let sp = file
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let normalizer = if sp {
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
            } else {
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
            };
            json!({
                    "version": "1.0",
                    "truncation": null,
                    "padding": null,
                    "added_tokens": added,
                    "normalizer": normalizer,
                    "pre_tokenizer": null,
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"}]},
                    "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true},
            })
        }
        other => {
            return Err(HfError::Tokenizer(format!(
                "export of tokenizer model `{other}` is not supported"
            )))
        }
    };
    write_json(dir, "tokenizer.json", &tj)?;
    let tok = |k: &str| {
        file.get_u64(&format!("tokenizer.ggml.{k}"))
            .and_then(|i| tokens.get(i as usize))
            .map(|s| json!(s))
            .unwrap_or(Json::Null)
    };
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id"),
        "unk_token": tok("unknown_token_id"),
        "add_bos_token": file.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama"),
    });
    if let Some(e) = file.get_bool("tokenizer.ggml.add_eos_token") {
        tc["add_eos_token"] = json!(e);
    }
    if let Some(t) = file.get_str("tokenizer.chat_template") {
        tc["chat_template"] = json!(t);
    }
    write_json(dir, "tokenizer_config.json", &tc)
}
