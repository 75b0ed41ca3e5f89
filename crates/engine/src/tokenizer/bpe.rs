//! Byte-level BPE (`tokenizer.ggml.model = gpt2`).
//!
//! Pipeline for one text fragment (special tokens already cut out):
//! 1. Pre-tokenize: the fragment is split by a list of regexes applied one after another; each
//!    regex splits every piece produced by the previous one into its matches *and* the gaps
//!    between them (nothing is dropped). Each piece is matched as a separate string, so a
//!    lookahead such as `\s+(?!\S)` sees the end of the piece as the end of the input.
//! 2. Byte-level encoding: every byte of a piece becomes one printable character (GPT-2's table:
//!    printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100…U+0143 in order), so
//!    the vocabulary can spell any byte sequence (`Ġ` = space, `Ċ` = newline).
//! 3. Merge: starting from single characters, repeatedly merge the adjacent pair whose merge rule
//!    has the lowest rank (leftmost first among equal ranks) until no rule applies; each final
//!    symbol is one token.
//!
//! The regexes are llama.cpp's for each `tokenizer.ggml.pre` name (the same facts as the models'
//! `tokenizer.json`). They are evaluated with `fancy-regex` (Unicode classes, lookahead), which
//! matches Perl/ECMAScript leftmost-first semantics, as llama.cpp's std::regex does.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use super::TokenizerError;

/// GPT-2's split: contractions, letters, numbers, other symbols, whitespace.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3: case-insensitive contractions, numbers in groups of up to three digits, newlines
/// kept apart from other whitespace.
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2: as Llama 3 but every digit is its own piece.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names accepted in `tokenizer.ggml.pre`.
pub(super) const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "jina-es",
    "jina-de",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "gigachat",
    "a.x-4.0",
    "mellum",
    "exaone4",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
    "chatglm-bpe",
    "glm4",
    "qwen2",
    "deepseek-r1-qwen",
    "megrez",
    "stablelm2",
    "hunyuan",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "falcon",
];

/// The regex list for one `tokenizer.ggml.pre` value, plus the flags llama.cpp ties to it.
#[derive(Debug)]
pub struct PreTokenizer {
    name: String,
    regexes: Vec<Regex>,
    /// Llama-3-style vocabularies emit a whole piece as one token when the vocabulary has it,
    /// without running the merges.
    ignore_merges: bool,
    adds_bos: bool,
}

impl PreTokenizer {
    /// Looks up a pre-tokenizer by its GGUF name; unknown names are an error (as in llama.cpp),
    /// since guessing would silently produce wrong ids.
    pub fn from_name(name: &str) -> Result<PreTokenizer, TokenizerError> {
        let (exprs, ignore_merges, adds_bos): (&[&str], bool, bool) = match name {
            "default" => (
                &[
                    r"[\p{P}\$\+<=>\^~\|]+",
                    RE_GPT2,
                    r"\p{N}+",
                    "[0-9][0-9][0-9]",
                ],
                false,
                false,
            ),
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "jina-es"
            | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de" | "jina-v2-code"
            | "gigachat" | "a.x-4.0" | "mellum" | "exaone4" => (&[RE_GPT2], false, false),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => (&[RE_LLAMA3], true, true),
            "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => (&[RE_LLAMA3], false, false),
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" | "hunyuan" => {
                (&[RE_QWEN2], false, false)
            }
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => (&[r"\p{N}", RE_GPT2], false, false),
            "falcon" => (
                &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
                false,
                false,
            ),
            other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
        };
        let regexes = exprs
            .iter()
            .map(|e| {
                Regex::new(e).map_err(|err| {
                    TokenizerError::Invalid(format!("pre-tokenizer regex {e:?}: {err}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreTokenizer {
            name: name.to_string(),
            regexes,
            ignore_merges,
            adds_bos,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn adds_bos_by_default(&self) -> bool {
        self.adds_bos
    }

    /// Splits `text` into pieces (byte ranges, in order, covering all of `text`).
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // fancy-regex only fails on backtrack-limit exhaustion, which these simple
                    // expressions cannot reach; keep the rest of the piece whole if it ever does.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}

/// GPT-2's byte → character table (see the module docs).
#[cfg(test)]
pub(super) fn byte_to_char_table_for_tests() -> [char; 256] {
    byte_to_char_table()
}

fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).expect("valid char");
            extra += 1;
            c
        };
    }
    table
}

/// Appends the bytes a byte-level token text stands for. A character outside the table (not
/// produced by byte-level encoding) is kept as its own UTF-8.
pub(super) fn decode_byte_level(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        let u = c as u32;
        let b = match u {
            0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(u as u8),
            0x100..=0x143 => {
                // Inverse of the table's "extra" numbering: the n-th non-printable byte.
                let n = u - 0x100;
                (0..=255u8)
                    .filter(|b| !matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
                    .nth(n as usize)
            }
            _ => None,
        };
        match b {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// The merge rules and byte table of a byte-level BPE vocabulary.
pub(super) struct BpeModel {
    pre: PreTokenizer,
    /// (left token id, right token id) → (rank, merged token id if the vocabulary has it).
    merges: HashMap<(u32, u32), (u32, Option<u32>)>,
    /// Byte-level character (as a string) for each byte.
    byte_chars: Vec<String>,
}

impl BpeModel {
    /// Parses the `"left right"` merge rules. Rules whose halves are not tokens can never fire
    /// (every symbol during merging is a token), so they are dropped; for duplicate rules the
    /// first (highest-priority) one counts.
    pub(super) fn new(
        pre: PreTokenizer,
        merge_rules: &[String],
        token_to_id: &HashMap<String, u32>,
    ) -> Result<BpeModel, TokenizerError> {
        let mut merges = HashMap::with_capacity(merge_rules.len());
        for (rank, rule) in merge_rules.iter().enumerate() {
            // Split at the first space after the first character (a half may itself start with
            // a space-like character only at position 0).
            let split = rule
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    TokenizerError::Invalid(format!("merge rule {rank} {rule:?} has no space"))
                })?;
            let (left, right) = (&rule[..split], &rule[split + 1..]);
            let (Some(&l), Some(&r)) = (token_to_id.get(left), token_to_id.get(right)) else {
                continue;
            };
            let mut joined = String::with_capacity(left.len() + right.len());
            joined.push_str(left);
            joined.push_str(right);
            let merged = token_to_id.get(&joined).copied();
            merges.entry((l, r)).or_insert((rank as u32, merged));
        }
        let byte_chars = byte_to_char_table().iter().map(|c| c.to_string()).collect();
        Ok(BpeModel {
            pre,
            merges,
            byte_chars,
        })
    }

    pub(super) fn pre_name(&self) -> &str {
        self.pre.name()
    }

    /// Tokenizes one text fragment (no special tokens inside), appending ids to `out`.
    pub(super) fn encode(
        &self,
        text: &str,
        token_to_id: &HashMap<String, u32>,
        out: &mut Vec<u32>,
    ) {
        let mut word = String::new();
        for piece in self.pre.split(text) {
            word.clear();
            for &b in piece.as_bytes() {
                word.push_str(&self.byte_chars[b as usize]);
            }
            if self.pre.ignore_merges {
                if let Some(&id) = token_to_id.get(word.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word(&word, token_to_id, out);
        }
    }

    /// Runs the merges on one byte-level-encoded piece.
    fn merge_word(&self, word: &str, token_to_id: &HashMap<String, u32>, out: &mut Vec<u32>) {
        /// A symbol of the piece: a byte range of `word`, its token id (if it is a token) and
        /// its neighbours in the linked list of live symbols.
        struct Sym {
            start: usize,
            len: usize,
            id: Option<u32>,
            prev: Option<usize>,
            next: Option<usize>,
        }
        /// A candidate merge; the heap pops the lowest rank, then the leftmost.
        #[derive(PartialEq, Eq)]
        struct Cand {
            rank: u32,
            left: usize,
            right: usize,
            /// Combined byte length when queued, to detect stale entries.
            len: usize,
        }
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> Ordering {
                o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }

        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Sym {
                start,
                len,
                id: token_to_id.get(&word[start..start + len]).copied(),
                prev: i.checked_sub(1),
                next: (start + len < word.len()).then_some(i + 1),
            });
        }
        let n = syms.len();

        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Cand>, syms: &[Sym], l: usize, r: usize| {
            let (Some(a), Some(b)) = (syms[l].id, syms[r].id) else {
                return;
            };
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                heap.push(Cand {
                    rank,
                    left: l,
                    right: r,
                    len: syms[l].len + syms[r].len,
                });
            }
        };
        for i in 1..n {
            push(&mut heap, &syms, i - 1, i);
        }
        while let Some(c) = heap.pop() {
            let (l, r) = (c.left, c.right);
            // Stale: one side was merged away or grew since this candidate was queued.
            if syms[l].len == 0
                || syms[r].len == 0
                || syms[l].next != Some(r)
                || syms[l].len + syms[r].len != c.len
            {
                continue;
            }
            let merged = self.merges[&(syms[l].id.unwrap(), syms[r].id.unwrap())].1;
            syms[l].len += syms[r].len;
            syms[l].id = merged.or_else(|| {
                token_to_id
                    .get(&word[syms[l].start..syms[l].start + syms[l].len])
                    .copied()
            });
            syms[r].len = 0;
            let rn = syms[r].next;
            syms[l].next = rn;
            if let Some(rn) = rn {
                syms[rn].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                push(&mut heap, &syms, p, l);
            }
            if let Some(rn) = rn {
                push(&mut heap, &syms, l, rn);
            }
        }

        let mut i = if n == 0 { None } else { Some(0) };
        while let Some(k) = i {
            let s = &syms[k];
            match s.id {
                Some(id) => out.push(id),
                None => {
                    // Not a token: emit whatever single bytes of its text are tokens (only
                    // reachable with a vocabulary missing some byte characters).
                    for &b in &word.as_bytes()[s.start..s.start + s.len] {
                        if let Some(&id) = std::str::from_utf8(&[b])
                            .ok()
                            .and_then(|t| token_to_id.get(t))
                        {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}
