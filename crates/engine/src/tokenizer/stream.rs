//! Streaming detokenization.
//!
//! A token is a byte string that need not end on a UTF-8 character boundary: byte-level BPE
//! splits a Hangul syllable (3 bytes) or an emoji (4 bytes) across tokens, and SentencePiece byte
//! fallback emits one `<0xXX>` token per byte. [`StreamDecoder`] buffers the bytes of an
//! unfinished character and releases text only when it is complete, so a client printing each
//! chunk never shows a replacement character for a character that is still arriving.

use super::Tokenizer;

/// Incremental detokenizer; create with [`Tokenizer::stream_decoder`].
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    /// Bytes received but not yet returned: at most the start of one incomplete character.
    pending: Vec<u8>,
    /// Whether any text has been returned yet (for the SentencePiece leading-space strip).
    started: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that renders control tokens as nothing (what a chat client wants: the
    /// generation loop stops at end-of-generation tokens, and other control tokens are markup).
    pub fn new(tok: &'a Tokenizer) -> StreamDecoder<'a> {
        Self::with_skip_special(tok, true)
    }

    /// `skip_special = false` renders control tokens as their text (`<|im_end|>` …).
    pub fn with_skip_special(tok: &'a Tokenizer, skip_special: bool) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            skip_special,
            pending: Vec::new(),
            started: false,
        }
    }

    /// Adds one token and returns the text completed by it (possibly empty). Bytes that cannot
    /// start or continue any character are emitted as U+FFFD at once; only a valid but
    /// unfinished character at the end is held back.
    pub fn push(&mut self, id: u32) -> String {
        if self.skip_special && self.tok.is_special(id) {
            return String::new();
        }
        self.pending.extend_from_slice(self.tok.token_bytes(id));
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: from_utf8 just validated this prefix.
                    out.push_str(
                        std::str::from_utf8(&self.pending[consumed..consumed + valid]).unwrap(),
                    );
                    consumed += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            consumed += bad;
                        }
                        None => break, // incomplete character at the end: keep it
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        self.emit(out)
    }

    /// Flushes what is left; an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.emit(rest)
    }

    /// Bytes currently held back.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    fn emit(&mut self, mut s: String) -> String {
        if !self.started && !s.is_empty() {
            self.started = true;
            if self.tok.strips_leading_space() && s.starts_with(' ') {
                s.remove(0);
            }
        }
        s
    }
}
