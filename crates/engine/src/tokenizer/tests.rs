//! Unit tests on tiny hand-made vocabularies (the real-model goldens are in tests/).
use super::*;

fn spm_vocab(pieces: &[(&str, f32, i64)]) -> Tokenizer {
    let mut spec = TokenizerSpec {
        model: "llama".into(),
        add_space_prefix: Some(false),
        add_bos: Some(false),
        ..Default::default()
    };
    for (t, s, ty) in pieces {
        spec.tokens.push(t.to_string());
        spec.scores.push(*s);
        spec.token_types.push(*ty);
    }
    for b in 0..=255u8 {
        spec.tokens.push(format!("<0x{b:02X}>"));
        spec.scores.push(0.0);
        spec.token_types.push(6);
    }
    Tokenizer::from_spec(spec).unwrap()
}

#[test]
fn spm_merges_by_score_not_segmentation() {
    // "abc": pairs "ab" (score -1) and "bc" (-2) → "ab" first, then "abc" is not in vocab → [ab, c].
    let t = spm_vocab(&[
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("a", -5.0, 1),
        ("b", -5.0, 1),
        ("c", -5.0, 1),
        ("ab", -1.0, 1),
        ("bc", -2.0, 1),
    ]);
    assert_eq!(t.encode("abc", false, false).unwrap(), vec![6, 5]);
    // Unknown character → UTF-8 bytes via <0xXX>.
    let ids = t.encode("é", false, false).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(t.decode(&ids, false), "é");
}

#[test]
fn byte_level_table_round_trips() {
    let mut out = Vec::new();
    let table = bpe::byte_to_char_table_for_tests();
    for b in 0..=255u8 {
        out.clear();
        bpe::decode_byte_level(&table[b as usize].to_string(), &mut out);
        assert_eq!(out, vec![b]);
    }
    assert_eq!(table[b' ' as usize], 'Ġ');
    assert_eq!(table[b'\n' as usize], 'Ċ');
}

#[test]
fn unknown_model_and_pre_are_errors() {
    let spec = TokenizerSpec {
        model: "wordpiece".into(),
        tokens: vec!["a".into()],
        ..Default::default()
    };
    assert!(matches!(
        Tokenizer::from_spec(spec),
        Err(TokenizerError::UnsupportedModel(_))
    ));
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        pre: Some("nope".into()),
        tokens: vec!["a".into()],
        ..Default::default()
    };
    let err = Tokenizer::from_spec(spec).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn stream_decoder_holds_partial_characters() {
    // Byte-level vocabulary with one token per byte.
    let table = bpe::byte_to_char_table_for_tests();
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        pre: Some("qwen2".into()),
        tokens: table.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    let t = Tokenizer::from_spec(spec).unwrap();
    let text = "한국어 👍🏽!";
    let ids = t.encode(text, false, false).unwrap();
    assert_eq!(ids.len(), text.len());
    let mut d = t.stream_decoder(false);
    let mut got = String::new();
    for (i, &id) in ids.iter().enumerate() {
        let chunk = d.push(id);
        assert!(!chunk.contains('\u{FFFD}'), "chunk {i}: {chunk:?}");
        got.push_str(&chunk);
    }
    got.push_str(&d.finish());
    assert_eq!(got, text);
    // A truncated character is flushed lossily by finish().
    let mut d = t.stream_decoder(false);
    assert_eq!(d.push(ids[0]), "");
    assert_eq!(d.pending_bytes().len(), 1);
    assert_eq!(d.finish(), "\u{FFFD}");
    // A stray continuation byte is replaced at once, not held.
    let mut d = t.stream_decoder(false);
    assert_eq!(d.push(0x80), "\u{FFFD}");
}

#[test]
fn every_supported_pre_tokenizer_compiles() {
    for name in bpe::SUPPORTED_PRE {
        let pre = PreTokenizer::from_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Pieces always cover the input exactly.
        let text = "Hello  world's 12345 <tag>\t\n  한국어 👍🏽!!";
        assert_eq!(pre.split(text).concat(), text, "{name}");
    }
    let qwen = PreTokenizer::from_name("qwen2").unwrap();
    assert_eq!(
        qwen.split("I'm 123  ok\n\n x"),
        ["I", "'m", " ", "1", "2", "3", " ", " ok", "\n\n", " x"]
    );
    let llama3 = PreTokenizer::from_name("llama-bpe").unwrap();
    assert_eq!(llama3.split("12345 abc"), ["123", "45", " abc"]);
}
