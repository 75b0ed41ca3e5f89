//! SentencePiece-style BPE (`tokenizer.ggml.model = llama`), as llama.cpp runs it.
//!
//! The input (spaces already replaced by `▁`) starts as one symbol per UTF-8 character. Every
//! adjacent pair whose concatenation is a vocabulary entry is a candidate, scored by that entry's
//! score; the best candidate (highest score, leftmost on ties) is merged and the pairs around the
//! new symbol become candidates, until none is left. Each final symbol is its token, or, when the
//! text is not in the vocabulary (a character the model never saw), one `<0xXX>` byte token per
//! UTF-8 byte. This is *not* Unigram/Viterbi segmentation: greedy merging gives different ids for
//! some strings, and llama.cpp (whose ids the models were converted against) merges greedily.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Tokenizer, TokenizerError};

/// A live or merged-away symbol: a byte range of the input and its neighbours.
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` and its right neighbour `right`.
struct Cand {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when queued; a mismatch later means the entry is stale
    /// (symbols only grow, so equal length means neither side changed).
    len: usize,
}

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl Ord for Cand {
    /// Max-heap order: higher score first, then smaller `left`.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Tokenizes `text` (whitespace already escaped to `▁`), appending ids to `out`.
pub(super) fn encode(
    tok: &Tokenizer,
    text: &str,
    out: &mut Vec<u32>,
) -> Result<(), TokenizerError> {
    let mut syms: Vec<Sym> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Sym {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: (start + c.len_utf8() < text.len()).then_some(i + 1),
        })
        .collect();
    let n = syms.len();
    if n == 0 {
        return Ok(());
    }

    let mut heap = BinaryHeap::new();
    let try_push = |heap: &mut BinaryHeap<Cand>, syms: &[Sym], l: usize, r: usize| {
        let s = syms[l].start;
        let len = syms[l].len + syms[r].len;
        if let Some(id) = tok.token_to_id(&text[s..s + len]) {
            heap.push(Cand {
                score: tok.scores[id as usize],
                left: l,
                right: r,
                len,
            });
        }
    };
    for i in 1..n {
        try_push(&mut heap, &syms, i - 1, i);
    }
    while let Some(c) = heap.pop() {
        let (l, r) = (c.left, c.right);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != c.len {
            continue;
        }
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        let rn = syms[r].next;
        syms[l].next = rn;
        if let Some(rn) = rn {
            syms[rn].prev = Some(l);
        }
        if let Some(p) = syms[l].prev {
            try_push(&mut heap, &syms, p, l);
        }
        if let Some(rn) = rn {
            try_push(&mut heap, &syms, l, rn);
        }
    }

    let mut i = Some(0);
    while let Some(k) = i {
        let s = &syms[k];
        let piece = &text[s.start..s.start + s.len];
        match tok.token_to_id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    out.push(tok.byte_token(b)?);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}
