//! Both vocabulary kinds (Qwen's BPE, Gemma's SentencePiece): encode arbitrary text with and
//! without special-token parsing and with literal spans, decode arbitrary ids, stream-decode;
//! whatever is encoded without special parsing must decode back to the same text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let m = if sel & 1 == 0 { modu_fuzz::qwen() } else { modu_fuzz::gemma() };
    let tok = &m.tokenizer;
    let text = String::from_utf8_lossy(rest);
    let plain = tok.encode(&text, false, false).expect("encoding text never fails");
    let _ = tok.encode(&text, true, true);
    // Random literal spans over char boundaries.
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).step_by(3).collect();
    let spans: Vec<(usize, usize)> = bounds.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0], c[1])).collect();
    let _ = tok.encode_with_literal_spans(&text, true, &spans);
    let _ = tok.find_control_text(&text);
    if sel & 2 == 0 && !text.contains('\u{FFFD}') {
        let back = tok.decode(&plain, false);
        // SentencePiece may add the leading space it was asked to add; BPE round-trips exactly.
        if sel & 1 == 0 {
            assert_eq!(back, text, "BPE round trip");
        }
    }
    let ids: Vec<u32> = rest
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b) % (tok.vocab_size() as u32 + 8)
        })
        .collect();
    let _ = tok.decode(&ids, sel & 4 == 0);
    let mut stream = tok.stream_decoder(sel & 8 == 0);
    for &id in &ids {
        std::hint::black_box(stream.push(id));
    }
});
