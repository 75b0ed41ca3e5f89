//! Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, reproducing llama.cpp's
//! tokenization exactly (same ids for the same text), because the models were trained with those
//! ids and our golden tests compare against llama.cpp.
//!
//! Two vocabulary kinds are supported, selected by `tokenizer.ggml.model`:
//!
//! * `gpt2` — byte-level BPE (Qwen, Llama 3, GPT-2 …). Text is split by the pre-tokenizer regexes
//!   named by `tokenizer.ggml.pre` (see `bpe.rs`), every byte of a piece is mapped to one printable
//!   character (GPT-2's byte↔unicode table), and adjacent symbols are merged by the rank of the pair
//!   in `tokenizer.ggml.merges`.
//! * `llama` — SentencePiece-style BPE (Gemma, Llama 2 …): spaces become `▁`, adjacent symbols are
//!   merged greedily by the *score* of the merged piece, and characters with no piece fall back to
//!   `<0xXX>` byte tokens (see `spm.rs`).
//!
//! Before either algorithm runs, the text is partitioned on special tokens (see
//! [`Tokenizer::encode`]), as llama.cpp does.
//!
//! Token types follow llama.cpp, including its load-time fix-ups: tokens whose text is a known
//! end-of-turn / fill-in-the-middle / end-of-generation marker (`<|im_end|>`, `<end_of_turn>`,
//! `</s>`, `<|file_sep|>` …) become control tokens even when the file says "normal" or
//! "user-defined", and form the end-of-generation set ([`Tokenizer::is_eog`]) together with EOS.
//! Token attributes that llama.cpp sets only for other model families (lstrip/rstrip for Phi-3,
//! Jina, ModernBERT) are not modelled.
//!
//! Data layout: the vocabulary is kept as parallel vectors indexed by token id (`tokens`, `scores`,
//! `types`), plus a `token text → id` hash map and, for detokenization, every token's raw bytes
//! packed into one buffer (`piece_bytes`, sliced by `piece_offsets`), so [`Tokenizer::token_bytes`]
//! is a borrow with no per-call work.

mod bpe;
mod spm;
mod stream;

use std::collections::{HashMap, HashSet};

use modu_gguf::{GgufFile, Value};

pub use bpe::PreTokenizer;
pub use stream::StreamDecoder;

/// Everything that can go wrong while building a tokenizer or encoding text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing (the file has no usable tokenizer)")]
    MissingKey(&'static str),

    #[error("GGUF metadata key `{key}` has the wrong type: expected {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },

    #[error(
        "unsupported tokenizer model `{0}` in `tokenizer.ggml.model` (supported: gpt2, llama)"
    )]
    UnsupportedModel(String),

    #[error(
        "unsupported pre-tokenizer `{0}` in `tokenizer.ggml.pre` (supported: {supported})",
        supported = bpe::SUPPORTED_PRE.join(", ")
    )]
    UnsupportedPreTokenizer(String),

    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),

    #[error("the model adds a {0} token but its id is not set")]
    MissingSpecialToken(&'static str),

    #[error("no token can represent byte 0x{0:02X} (vocabulary lacks <0x{0:02X}>)")]
    NoByteToken(u8),

    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    IdOutOfRange { id: u32, vocab_size: usize },
}

/// Token type as stored in `tokenizer.ggml.token_type` (the values of llama.cpp's
/// `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0 or any value not listed below.
    Undefined,
    /// 1: ordinary text piece.
    Normal,
    /// 2: the unknown token (`<unk>`).
    Unknown,
    /// 3: control token (`<bos>`, `<|im_start|>` …): only produced from text when special tokens
    /// are parsed, rendered only when special tokens are not skipped.
    Control,
    /// 4: user-defined token: always matched literally in the input, before normal tokenization.
    UserDefined,
    /// 5: unused slot (padding of the embedding matrix).
    Unused,
    /// 6: byte-fallback token `<0xXX>` (SentencePiece vocabularies).
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// Control and unknown tokens: matched in text only with `parse_special`, skipped by
    /// `decode(.., skip_special = true)`.
    fn is_control_like(self) -> bool {
        matches!(self, TokenType::Control | TokenType::Unknown)
    }
}

/// Which tokenization algorithm the vocabulary uses (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with merge ranks.
    BytePairBpe,
    /// `llama`: SentencePiece-style BPE with scores and byte fallback.
    SentencePiece,
}

// Token texts llama.cpp recognizes when the file does not name the token by id (converters often
// leave these keys out). A token found this way is forced to be a control token, so that the text
// is only turned into it when special tokens are parsed.

/// End-of-turn marker (EOT).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<end_of_utterance>",
];
/// End of message (tool call pending).
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
/// Fill-in-the-middle markers. PAD, REP and SEP also end generation (a code model emits them at a
/// file boundary).
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Every token with one of these texts ends generation (llama.cpp's end-of-generation list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
];

/// Harmony-format (gpt-oss) markers that must always be rendered: llama.cpp makes them
/// user-defined whatever the file says.
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// A tokenizer for one model. Cheap to share (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    kind: VocabKind,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    token_to_id: HashMap<String, u32>,
    /// Raw bytes of every token, concatenated; token `i` is `piece_bytes[piece_offsets[i]..piece_offsets[i + 1]]`.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<usize>,
    /// Control, user-defined and unknown tokens, longest text first (ties: lower id first): the
    /// order in which the input is partitioned on them.
    special_by_len: Vec<u32>,
    /// Finds, in one pass, which of `special_by_len` (pattern `k` is `special_by_len[k]`) occur
    /// in a text, so partitioning costs O(text) instead of O(text × special tokens).
    special_finder: Option<aho_corasick::AhoCorasick>,
    bpe: Option<bpe::BpeModel>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// `<0xXX>` token for every byte (SentencePiece byte fallback); `None` where absent.
    byte_tokens: Vec<Option<u32>>,
}

impl std::fmt::Debug for Tokenizer {
    /// A summary: the vocabulary itself is far too large to print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.bpe.as_ref().map(|b| b.pre_name()))
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eog", &self.eog_ids())
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

/// One piece of the input after special-token partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// Byte range of the input still to be tokenized normally.
    Text(usize, usize),
    /// A special token matched literally.
    Token(u32),
}

fn get_string_array<'a>(
    f: &'a GgufFile,
    key: &'static str,
) -> Result<Option<&'a [String]>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a.as_strings().map(Some).ok_or(TokenizerError::WrongType {
            key,
            expected: "array of strings",
        }),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "array of strings",
        }),
    }
}

fn get_id(f: &GgufFile, key: &'static str) -> Result<Option<u64>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            // Some converters write -1 (as a signed or wrapped value) for "no such token".
            Some(x) if x >= 0 => Ok(Some(x as u64)),
            Some(_) => Ok(None),
            None if matches!(v, Value::U64(_)) => Ok(None),
            None => Err(TokenizerError::WrongType {
                key,
                expected: "integer",
            }),
        },
    }
}

fn get_flag(f: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or(TokenizerError::WrongType {
            key,
            expected: "bool",
        }),
    }
}

/// Everything [`Tokenizer::from_spec`] needs; the GGUF reader fills it from metadata, tests and
/// tools can fill it by hand.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSpec {
    /// `gpt2` or `llama`.
    pub model: String,
    /// Pre-tokenizer name (`tokenizer.ggml.pre`), BPE only; `None` = llama.cpp's `default`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Per-token scores (SentencePiece); empty = all 0.
    pub scores: Vec<f32>,
    /// Per-token types (`tokenizer.ggml.token_type` values); empty = all normal.
    pub token_types: Vec<i64>,
    /// `"left right"` merge rules, highest priority first (BPE only).
    pub merges: Vec<String>,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
    pub eot: Option<u64>,
    pub eom: Option<u64>,
    pub unk: Option<u64>,
    pub pad: Option<u64>,
    pub fim_pad: Option<u64>,
    pub fim_rep: Option<u64>,
    pub fim_sep: Option<u64>,
    /// `None` = the vocabulary kind's default (as llama.cpp).
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

impl TokenizerSpec {
    /// Reads the `tokenizer.ggml.*` keys.
    pub fn from_gguf(f: &GgufFile) -> Result<TokenizerSpec, TokenizerError> {
        let model = f
            .get("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?
            .as_str()
            .ok_or(TokenizerError::WrongType {
                key: "tokenizer.ggml.model",
                expected: "string",
            })?
            .to_string();
        let pre = match f.get("tokenizer.ggml.pre") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or(TokenizerError::WrongType {
                        key: "tokenizer.ggml.pre",
                        expected: "string",
                    })?
                    .to_string(),
            ),
        };
        let tokens = get_string_array(f, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?
            .to_vec();
        let scores = match f.get_array("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(a) => a.to_f32s().ok_or(TokenizerError::WrongType {
                key: "tokenizer.ggml.scores",
                expected: "array of floats",
            })?,
        };
        let token_types = match f.get_array("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(a) => a.to_i64s().ok_or(TokenizerError::WrongType {
                key: "tokenizer.ggml.token_type",
                expected: "array of integers",
            })?,
        };
        let merges = get_string_array(f, "tokenizer.ggml.merges")?
            .map(|m| m.to_vec())
            .unwrap_or_default();
        Ok(TokenizerSpec {
            model,
            pre,
            tokens,
            scores,
            token_types,
            merges,
            bos: get_id(f, "tokenizer.ggml.bos_token_id")?,
            eos: get_id(f, "tokenizer.ggml.eos_token_id")?,
            eot: get_id(f, "tokenizer.ggml.eot_token_id")?,
            eom: get_id(f, "tokenizer.ggml.eom_token_id")?,
            unk: get_id(f, "tokenizer.ggml.unknown_token_id")?,
            pad: get_id(f, "tokenizer.ggml.padding_token_id")?,
            fim_pad: get_id(f, "tokenizer.ggml.fim_pad_token_id")?,
            fim_rep: get_id(f, "tokenizer.ggml.fim_rep_token_id")?,
            fim_sep: get_id(f, "tokenizer.ggml.fim_sep_token_id")?,
            add_bos: get_flag(f, "tokenizer.ggml.add_bos_token")?,
            add_eos: get_flag(f, "tokenizer.ggml.add_eos_token")?,
            add_space_prefix: get_flag(f, "tokenizer.ggml.add_space_prefix")?,
        })
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a model file's metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Self::from_spec(TokenizerSpec::from_gguf(f)?)
    }

    /// Builds the tokenizer from already-extracted metadata. Defaults follow llama.cpp: for
    /// `llama` vocabularies BOS=1, EOS=2, UNK=0, add BOS, add a space prefix; for `gpt2` BOS=EOS=11,
    /// no BOS (except Llama-3-style pre-tokenizers, which add it), no space prefix.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid(
                "`tokenizer.ggml.tokens` is empty".into(),
            ));
        }
        if n > u32::MAX as usize {
            return Err(TokenizerError::Invalid("vocabulary too large".into()));
        }
        if !spec.scores.is_empty() && spec.scores.len() != n {
            return Err(TokenizerError::Invalid(format!(
                "`tokenizer.ggml.scores` has {} entries for {n} tokens",
                spec.scores.len()
            )));
        }
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(TokenizerError::Invalid(format!(
                "`tokenizer.ggml.token_type` has {} entries for {n} tokens",
                spec.token_types.len()
            )));
        }

        let kind = match spec.model.as_str() {
            "gpt2" => VocabKind::BytePairBpe,
            "llama" => VocabKind::SentencePiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Token texts; llama.cpp renames empty ones so that every text is a distinct map key.
        let tokens: Vec<String> = spec
            .tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t
                }
            })
            .collect();
        let scores = if spec.scores.is_empty() {
            vec![0.0; n]
        } else {
            spec.scores
        };
        let mut types: Vec<TokenType> = if spec.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else {
            spec.token_types
                .iter()
                .map(|&t| TokenType::from_i64(t))
                .collect()
        };
        // Later duplicates win, as in llama.cpp's map insertion.
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32);
        }

        // Pre-tokenizer and the per-kind defaults.
        let (pre, mut add_bos, mut add_space_prefix, def_bos, def_eos, def_unk) = match kind {
            VocabKind::BytePairBpe => {
                let pre = PreTokenizer::from_name(spec.pre.as_deref().unwrap_or("default"))?;
                let add_bos = pre.adds_bos_by_default();
                (Some(pre), add_bos, false, Some(11u64), Some(11u64), None)
            }
            VocabKind::SentencePiece => (None, true, true, Some(1), Some(2), Some(0)),
        };
        let mut add_eos = false;
        if let Some(v) = spec.add_bos {
            add_bos = v;
        }
        if let Some(v) = spec.add_eos {
            add_eos = v;
        }
        if let Some(v) = spec.add_space_prefix {
            add_space_prefix = v;
        }
        // An id outside the vocabulary is ignored (llama.cpp warns and keeps the default).
        let pick = |given: Option<u64>, default: Option<u64>| -> Option<u32> {
            match given {
                Some(x) if (x as usize) < n => Some(x as u32),
                Some(_) => default.filter(|&d| (d as usize) < n).map(|d| d as u32),
                None => default.filter(|&d| (d as usize) < n).map(|d| d as u32),
            }
        };
        let bos = pick(spec.bos, def_bos);
        let eos = pick(spec.eos, def_eos);
        let unk = pick(spec.unk, def_unk);
        let pad = pick(spec.pad, None);
        let given_eot = pick(spec.eot, None);
        let given_eom = pick(spec.eom, None);

        // Special tokens found by text (see EOT_TEXTS …), then the end-of-generation set, in
        // llama.cpp's order, since later steps override the token types set by earlier ones.
        let detect = |given: Option<u32>, texts: &[&str], types: &mut [TokenType]| -> Option<u32> {
            if given.is_some() {
                return given;
            }
            let id = texts.iter().find_map(|t| token_to_id.get(*t).copied())?;
            types[id as usize] = TokenType::Control;
            Some(id)
        };
        let eot = detect(given_eot, EOT_TEXTS, &mut types);
        let eom = detect(given_eom, EOM_TEXTS, &mut types);
        detect(None, FIM_PRE_TEXTS, &mut types);
        detect(None, FIM_SUF_TEXTS, &mut types);
        detect(None, FIM_MID_TEXTS, &mut types);
        let fim_pad = detect(pick(spec.fim_pad, None), FIM_PAD_TEXTS, &mut types);
        let fim_rep = detect(pick(spec.fim_rep, None), FIM_REP_TEXTS, &mut types);
        let fim_sep = detect(pick(spec.fim_sep, None), FIM_SEP_TEXTS, &mut types);

        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for text in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                eog.insert(id);
                types[id as usize] = TokenType::Control;
            }
        }
        for text in ALWAYS_RENDERED_TEXTS {
            if let Some(&id) = token_to_id.get(*text) {
                types[id as usize] = TokenType::UserDefined;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        let has = |eog: &HashSet<u32>, text: &str| {
            token_to_id.get(text).is_some_and(|id| eog.contains(id))
        };
        // Harmony / Solar-Open: `<|end|>` separates messages there and must not stop generation.
        let has_call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
        if has(&eog, "<|end|>") && has_call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>")) {
            let id = token_to_id["<|end|>"];
            eog.remove(&id);
            types[id as usize] = TokenType::UserDefined;
        }
        // Gemma 4 (which has `<|tool_response>`) uses `</s>` as text.
        if has(&eog, "<|tool_response>") && has(&eog, "</s>") {
            let id = token_to_id["</s>"];
            eog.remove(&id);
            types[id as usize] = TokenType::Normal;
        }

        let mut special_by_len: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .collect();
        special_by_len.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });

        let special_finder = aho_corasick::AhoCorasick::new(
            special_by_len.iter().map(|&i| tokens[i as usize].as_str()),
        )
        .ok();

        let byte_tokens: Vec<Option<u32>> = (0..=255u8)
            .map(|b| {
                token_to_id
                    .get(&format!("<0x{b:02X}>"))
                    .or_else(|| {
                        // A vocabulary without <0xXX> pieces may still have the byte itself.
                        std::str::from_utf8(&[b])
                            .ok()
                            .and_then(|s| token_to_id.get(s))
                    })
                    .copied()
            })
            .collect();

        let bpe = match kind {
            VocabKind::BytePairBpe => Some(bpe::BpeModel::new(
                pre.expect("BPE has a pre-tokenizer"),
                &spec.merges,
                &token_to_id,
            )?),
            VocabKind::SentencePiece => None,
        };

        // Raw bytes of every token, for detokenization.
        let mut piece_bytes = Vec::new();
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0);
        for (i, text) in tokens.iter().enumerate() {
            match (types[i], kind) {
                (TokenType::Control | TokenType::Unknown | TokenType::UserDefined, _) => {
                    piece_bytes.extend_from_slice(text.as_bytes())
                }
                (TokenType::Unused, _) => {}
                (TokenType::Byte, VocabKind::SentencePiece) => match parse_byte_token(text) {
                    Some(b) => piece_bytes.push(b),
                    None => piece_bytes.extend_from_slice(text.as_bytes()),
                },
                (TokenType::Byte, VocabKind::BytePairBpe) => {}
                (_, VocabKind::SentencePiece) => {
                    piece_bytes.extend_from_slice(text.replace('\u{2581}', " ").as_bytes())
                }
                (_, VocabKind::BytePairBpe) => bpe::decode_byte_level(text, &mut piece_bytes),
            }
            piece_offsets.push(piece_bytes.len());
        }

        Ok(Tokenizer {
            kind,
            tokens,
            scores,
            types,
            token_to_id,
            piece_bytes,
            piece_offsets,
            special_finder,
            special_by_len,
            bpe,
            bos,
            eos,
            eot,
            unk,
            pad,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            byte_tokens,
        })
    }

    /// Tokenizes `text`.
    ///
    /// * `add_special`: prepend BOS / append EOS where the model asks for them
    ///   (`tokenizer.ggml.add_bos_token` / `add_eos_token`).
    /// * `parse_special`: text that spells a control token (`<|im_start|>`, `<start_of_turn>` …)
    ///   becomes that token; otherwise it is tokenized as ordinary text. User-defined tokens are
    ///   matched literally in both modes (they are part of the vocabulary's normal behaviour, e.g.
    ///   Gemma's runs of spaces and newlines).
    ///
    /// Special tokens are found by partitioning the text as llama.cpp does: for each special
    /// token, longest first, every occurrence in the not-yet-matched text is cut out, and the
    /// pieces in between are tokenized independently.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let fragments = self.partition(text, parse_special);
        self.encode_fragments(text, &fragments, add_special)
    }

    /// Tokenizes `text` with control tokens parsed except inside the `literal` byte ranges,
    /// where text that spells one stays text (a control token overlapping a range is not
    /// matched). This is how a rendered chat prompt is tokenized: the template's own control
    /// tokens count, while message contents (the ranges) can never forge one.
    pub fn encode_with_literal_spans(
        &self,
        text: &str,
        add_special: bool,
        literal: &[(usize, usize)],
    ) -> Result<Vec<u32>, TokenizerError> {
        let ok = |a: usize, b: usize| !literal.iter().any(|&(s, e)| a < e && s < b);
        let fragments = self.partition_where(text, true, &ok);
        self.encode_fragments(text, &fragments, add_special)
    }

    /// The first control token (`<|im_start|>`, `<start_of_turn>` …) whose text occurs in
    /// `text`, if any.
    pub fn find_control_text(&self, text: &str) -> Option<u32> {
        let control = |id: u32| {
            self.types[id as usize].is_control_like() && !self.tokens[id as usize].is_empty()
        };
        match &self.special_finder {
            Some(f) => f
                .find_overlapping_iter(text)
                .map(|m| self.special_by_len[m.pattern().as_usize()])
                .find(|&id| control(id)),
            None => self
                .special_by_len
                .iter()
                .copied()
                .find(|&id| control(id) && text.contains(self.tokens[id as usize].as_str())),
        }
    }

    fn encode_fragments(
        &self,
        text: &str,
        fragments: &[Fragment],
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.bos.ok_or(TokenizerError::MissingSpecialToken("BOS"))?);
        }
        match self.kind {
            VocabKind::BytePairBpe => {
                let bpe = self.bpe.as_ref().expect("BPE model present");
                for frag in fragments {
                    match *frag {
                        Fragment::Text(s, e) => {
                            bpe.encode(&text[s..e], &self.token_to_id, &mut out)
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            VocabKind::SentencePiece => {
                // The first text fragment (and any right after a special token) gets the `▁`
                // prefix when the model asks for one.
                let mut prev_special = true;
                for frag in fragments {
                    match *frag {
                        Fragment::Text(s, e) => {
                            let mut piece = String::with_capacity(e - s + 3);
                            if self.add_space_prefix && prev_special {
                                piece.push(' ');
                            }
                            piece.push_str(&text[s..e]);
                            let escaped = piece.replace(' ', "\u{2581}");
                            spm::encode(self, &escaped, &mut out)?;
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.eos.ok_or(TokenizerError::MissingSpecialToken("EOS"))?);
        }
        Ok(out)
    }

    /// Splits `text` on special tokens (see [`Tokenizer::encode`]).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        self.partition_where(text, parse_special, &|_, _| true)
    }

    /// [`Tokenizer::partition`] where, with `parse_control`, a control-like token spelled at
    /// bytes `[start, end)` is a token only when `control_ok(start, end)`; elsewhere it stays
    /// ordinary text.
    fn partition_where(
        &self,
        text: &str,
        parse_control: bool,
        control_ok: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let present: Option<Vec<bool>> = self.special_finder.as_ref().map(|f| {
            let mut p = vec![false; self.special_by_len.len()];
            for m in f.find_overlapping_iter(text) {
                p[m.pattern().as_usize()] = true;
            }
            p
        });
        for (k, &id) in self.special_by_len.iter().enumerate() {
            let control = self.types[id as usize].is_control_like();
            if control && !parse_control {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let occurs = match &present {
                Some(p) => p[k],
                None => text.contains(needle),
            };
            if needle.is_empty() || !occurs {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(mut s, e) = frag else {
                    next.push(frag);
                    continue;
                };
                // `s`: start of the text not yet emitted; `from`: where the search goes on
                // (past occurrences left as text).
                let mut from = s;
                while let Some(pos) = text[from..e].find(needle) {
                    let m = from + pos;
                    if control && !control_ok(m, m + needle.len()) {
                        from = m + text[m..].chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if m > s {
                        next.push(Fragment::Text(s, m));
                    }
                    next.push(Fragment::Token(id));
                    s = m + needle.len();
                    from = s;
                }
                if s < e {
                    next.push(Fragment::Text(s, e));
                }
            }
            frags = next;
        }
        frags
    }

    /// The `<0xXX>` (or single-byte) token for `b`.
    fn byte_token(&self, b: u8) -> Result<u32, TokenizerError> {
        self.byte_tokens[b as usize]
            .or(self.unk)
            .ok_or(TokenizerError::NoByteToken(b))
    }

    /// The raw bytes token `id` stands for: byte-level decoding for `gpt2` vocabularies, `▁`→space
    /// and `<0xXX>`→byte for SentencePiece; control, unknown and user-defined tokens give their
    /// text; unused slots give nothing. Out-of-range ids give an empty slice.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.piece_offsets.len() {
            return &[];
        }
        &self.piece_bytes[self.piece_offsets[i]..self.piece_offsets[i + 1]]
    }

    /// Whether `decode(.., skip_special = true)` drops this token (control and unknown tokens).
    pub fn is_special(&self, id: u32) -> bool {
        self.types
            .get(id as usize)
            .is_some_and(|t| t.is_control_like())
    }

    /// Joins the tokens' bytes into text (invalid UTF-8 becomes U+FFFD). With `skip_special`,
    /// control and unknown tokens are dropped. For SentencePiece vocabularies with a space
    /// prefix, the one space that encoding added in front is removed again.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if self.strips_leading_space() && s.starts_with(' ') {
            s.remove(0);
        }
        s
    }

    /// SentencePiece vocabularies with `add_space_prefix` drop the first leading space on decode.
    fn strips_leading_space(&self) -> bool {
        self.kind == VocabKind::SentencePiece && self.add_space_prefix
    }

    /// A streaming detokenizer that yields only complete UTF-8 text.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::with_skip_special(self, skip_special)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn kind(&self) -> VocabKind {
        self.kind
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }
    /// End-of-turn token (`<|im_end|>`, `<end_of_turn>` …), from metadata or found by text.
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }
    /// Whether encoding with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }
    /// Whether generating `id` ends generation (EOS, EOT, `<|im_end|>`, `<end_of_turn>`, FIM
    /// separators …, the set llama.cpp builds).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// The end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }
    /// Id of the token whose stored text is exactly `text` (as stored: `Ġ`/`▁` spellings).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
    /// The stored text of token `id`.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }
}

/// `<0xAB>` → `0xAB`.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
