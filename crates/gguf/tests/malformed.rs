//! Malformed files built byte by byte. Each case asserts the specific error variant, so a
//! regression that rejects a file for the wrong reason (or accepts it) is caught.

// `is_multiple_of` needs Rust 1.87; the workspace MSRV is 1.80.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use modu_gguf::{GgmlType, GgufError, GgufFile};

/// Value type ids of the format.
const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// Minimal little-endian byte builder for GGUF images.
#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        B::default()
            .raw(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, b: &[u8]) -> B {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, v: u8) -> B {
        self.raw(&[v])
    }
    fn u32(self, v: u32) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> B {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn kv_u32(self, key: &str, v: u32) -> B {
        self.str(key).u32(T_U32).u32(v)
    }
    fn kv_str(self, key: &str, v: &str) -> B {
        self.str(key).u32(T_STRING).str(v)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> B {
        let mut b = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            b = b.u64(d);
        }
        b.u32(ty).u64(offset)
    }
    fn pad(mut self, align: usize) -> B {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self
    }
    fn zeros(mut self, n: usize) -> B {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn parse(self) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(self.0)
    }
}

const F32: u32 = 0;
const Q4_0: u32 = 2;

/// A valid file with one kv and two f32 tensors of 4 elements (16 bytes each, offsets 0 and 32).
fn valid() -> B {
    B::header(3, 2, 1)
        .kv_str("general.architecture", "test")
        .tensor("a", &[4], F32, 0)
        .tensor("b", &[2, 2], F32, 32)
        .pad(32)
        .zeros(48)
}

#[test]
fn valid_baseline_parses() {
    let f = valid().parse().unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("test"));
    assert_eq!(f.tensors().len(), 2);
    let b = f.tensor_info("b").unwrap();
    assert_eq!(b.dims, vec![2, 2]);
    assert_eq!(b.ty, GgmlType::F32);
    assert_eq!(f.tensor_data(b).len(), 16);
    assert_eq!(f.data_offset() % 32, 0);
}

#[test]
fn version_2_is_accepted() {
    let f = B::header(2, 0, 1).kv_u32("x", 7).parse().unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.get_u64("x"), Some(7));
}

#[test]
fn file_without_tensors_needs_no_padding() {
    let f = B::header(3, 0, 0).parse().unwrap();
    assert!(f.tensors().is_empty());
    assert!(f.metadata().is_empty());
}

#[test]
fn gaps_between_tensors_are_allowed() {
    let f = B::header(3, 2, 0)
        .tensor("a", &[4], F32, 64)
        .tensor("b", &[4], F32, 0)
        .pad(32)
        .zeros(96)
        .parse()
        .unwrap();
    assert_eq!(f.tensor_info("a").unwrap().offset, 64);
}

#[test]
fn empty_file() {
    assert!(matches!(B::default().parse(), Err(GgufError::Empty)));
}

#[test]
fn truncated_magic() {
    let e = B::default().raw(b"GG").parse().unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { ref context, .. } if context == "magic"),
        "{e}"
    );
}

#[test]
fn truncated_header() {
    let e = B::default().raw(b"GGUF").u32(3).u32(0).parse().unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { ref context, offset: 8, needed: 8, available: 4 } if context == "tensor count"),
        "{e}"
    );
}

#[test]
fn bad_magic() {
    let e = B::default()
        .raw(b"GGML")
        .u32(3)
        .u64(0)
        .u64(0)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::BadMagic { found } if &found == b"GGML"),
        "{e}"
    );
}

#[test]
fn version_1_rejected() {
    let e = B::header(1, 0, 0).parse().unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 1 }),
        "{e}"
    );
    assert!(e.to_string().contains("version 1"));
}

#[test]
fn version_4_rejected() {
    let e = B::header(4, 0, 0).parse().unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 4 }),
        "{e}"
    );
}

#[test]
fn big_endian_rejected() {
    let e = B::default()
        .raw(b"GGUF")
        .raw(&3u32.to_be_bytes())
        .u64(0)
        .u64(0)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::BigEndian { .. }), "{e}");
}

#[test]
fn truncated_in_kv_key() {
    // Key claims 20 bytes, only 9 follow.
    let e = B::header(3, 0, 1)
        .u64(20)
        .raw(b"general.a")
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { ref context, needed: 20, available: 9, .. } if context.contains("metadata entry 0")),
        "{e}"
    );
}

#[test]
fn truncated_in_value() {
    let e = B::header(3, 0, 1)
        .str("some.long.key.name")
        .u32(T_U32)
        .raw(&[1, 2])
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { ref context, needed: 4, available: 2, .. } if context.contains("some.long.key.name")),
        "{e}"
    );
}

#[test]
fn absurd_kv_count() {
    let e = B::header(3, 0, u64::MAX).zeros(64).parse().unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::TooManyMetadata {
                count: u64::MAX,
                remaining: 64
            }
        ),
        "{e}"
    );
}

#[test]
fn absurd_tensor_count() {
    let e = B::header(3, 1 << 40, 0).zeros(64).parse().unwrap_err();
    assert!(
        matches!(e, GgufError::TooManyTensors { count, .. } if count == 1 << 40),
        "{e}"
    );
}

#[test]
fn absurd_string_length_in_key() {
    let e = B::header(3, 0, 1)
        .u64(u64::MAX)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::StringTooLong {
                len: u64::MAX,
                offset: 24,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn absurd_string_length_in_value() {
    let e = B::header(3, 0, 1)
        .str("k")
        .u32(T_STRING)
        .u64(1 << 60)
        .zeros(8)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::StringTooLong { ref context, len, .. } if len == 1 << 60 && context.contains("\"k\"")),
        "{e}"
    );
}

#[test]
fn invalid_utf8_key() {
    let e = B::header(3, 0, 1)
        .u64(3)
        .raw(&[b'a', 0xff, b'b'])
        .u32(T_U8)
        .u8(1)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::InvalidUtf8 { offset: 32, .. }),
        "{e}"
    );
}

#[test]
fn invalid_utf8_string_value() {
    let e = B::header(3, 0, 1)
        .str("k")
        .u32(T_STRING)
        .u64(2)
        .raw(&[0xc3, 0x28])
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::InvalidUtf8 { ref context, .. } if context.contains("\"k\"")),
        "{e}"
    );
}

#[test]
fn invalid_utf8_tensor_name() {
    let e = B::header(3, 1, 0)
        .u64(2)
        .raw(&[0xe2, 0x82])
        .u32(1)
        .u64(4)
        .u32(F32)
        .u64(0)
        .pad(32)
        .zeros(16)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::InvalidUtf8 { ref context, .. } if context.contains("tensor 0")),
        "{e}"
    );
}

#[test]
fn unknown_value_type() {
    let e = B::header(3, 0, 1)
        .str("weird")
        .u32(13)
        .u64(0)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::UnknownValueType { ref key, type_id: 13, .. } if key == "weird"),
        "{e}"
    );
}

#[test]
fn unknown_array_element_type() {
    let e = B::header(3, 0, 1)
        .str("arr")
        .u32(T_ARRAY)
        .u32(99)
        .u64(0)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::UnknownValueType { type_id: 99, .. }),
        "{e}"
    );
}

#[test]
fn nested_array() {
    let e = B::header(3, 0, 1)
        .str("arr")
        .u32(T_ARRAY)
        .u32(T_ARRAY)
        .u64(1)
        .u32(T_U8)
        .u64(1)
        .u8(0)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::NestedArray { ref key, .. } if key == "arr"),
        "{e}"
    );
}

#[test]
fn array_length_absurd() {
    let e = B::header(3, 0, 1)
        .str("arr")
        .u32(T_ARRAY)
        .u32(T_U32)
        .u64(u64::MAX / 2)
        .zeros(16)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::ArrayTooLong { ref key, .. } if key == "arr"),
        "{e}"
    );
}

#[test]
fn string_array_length_absurd() {
    // 3 bytes remain: not even one string length prefix fits.
    let e = B::header(3, 0, 1)
        .str("toks")
        .u32(T_ARRAY)
        .u32(T_STRING)
        .u64(1)
        .zeros(3)
        .parse()
        .unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::ArrayTooLong {
                len: 1,
                remaining: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn invalid_bool() {
    let e = B::header(3, 0, 1)
        .str("flag")
        .u32(T_BOOL)
        .u8(2)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::InvalidBool { value: 2, .. }), "{e}");
}

#[test]
fn duplicate_key() {
    let e = B::header(3, 0, 2)
        .kv_u32("a.b", 1)
        .kv_str("a.b", "x")
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key } if key == "a.b"),
        "{e}"
    );
}

#[test]
fn bad_alignment_zero() {
    let e = B::header(3, 0, 1)
        .kv_u32("general.alignment", 0)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::InvalidAlignment { value: 0 }), "{e}");
}

#[test]
fn bad_alignment_three() {
    let e = B::header(3, 0, 1)
        .kv_u32("general.alignment", 3)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::InvalidAlignment { value: 3 }), "{e}");
}

#[test]
fn alignment_of_wrong_type() {
    let e = B::header(3, 0, 1)
        .kv_str("general.alignment", "32")
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::AlignmentType { found: "string" }),
        "{e}"
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let f = B::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], F32, 64)
        .pad(64)
        .zeros(128)
        .parse()
        .unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    // Offset 32 is aligned for the default but not for 64.
    let e = B::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], F32, 32)
        .pad(64)
        .zeros(128)
        .parse()
        .unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::MisalignedOffset {
                alignment: 64,
                offset: 32,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn truncated_tensor_info() {
    // Name, n_dims = 2, then only one of the two dims.
    let e = B::header(3, 1, 0)
        .str("a_long_tensor_name_xyz")
        .u32(2)
        .u64(4)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { ref context, .. } if context.contains("a_long_tensor_name_xyz")),
        "{e}"
    );
}

#[test]
fn n_dims_five() {
    let e = B::header(3, 1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], F32, 0)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::BadDimCount { ref tensor, n_dims: 5 } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn n_dims_zero() {
    let e = B::header(3, 1, 0)
        .tensor("t", &[], F32, 0)
        .zeros(64)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::BadDimCount { n_dims: 0, .. }), "{e}");
}

#[test]
fn zero_dim() {
    let e = B::header(3, 1, 0)
        .tensor("t", &[4, 0], F32, 0)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::ZeroDim { ref tensor, index: 1 } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn unknown_ggml_type() {
    // Ids 4 and 5 (the removed Q4_2 / Q4_3) are not valid types.
    let e = B::header(3, 1, 0)
        .tensor("t", &[32], 4, 0)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::UnknownTensorType { type_id: 4, .. }),
        "{e}"
    );
}

#[test]
fn misaligned_offset() {
    let e = B::header(3, 1, 0)
        .tensor("t", &[4], F32, 4)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::MisalignedOffset { ref tensor, offset: 4, alignment: 32 } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn tensor_data_out_of_range() {
    // 16 bytes needed at offset 32, data section has 32.
    let e = B::header(3, 1, 0)
        .tensor("t", &[4], F32, 32)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::TensorOutOfRange { ref tensor, offset: 32, size: 16, data_len: 32 } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn tensor_data_missing_entirely() {
    let e = B::header(3, 1, 0)
        .tensor("t", &[4], F32, 0)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::TensorOutOfRange { data_len: 0, .. }),
        "{e}"
    );
}

#[test]
fn tensor_offset_overflow() {
    let offset = u64::MAX - 31; // aligned, but offset + size overflows
    let e = B::header(3, 1, 0)
        .tensor("t", &[16], F32, offset)
        .pad(32)
        .zeros(64)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfRange { .. }), "{e}");
}

#[test]
fn overlapping_tensors() {
    // "a" covers [0, 64), "b" starts at 32.
    let e = B::header(3, 2, 0)
        .tensor("a", &[16], F32, 0)
        .tensor("b", &[4], F32, 32)
        .pad(32)
        .zeros(96)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::OverlappingTensors { ref first, ref second, first_end: 64, second_start: 32, .. } if first == "a" && second == "b"),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_name() {
    let e = B::header(3, 2, 0)
        .tensor("w", &[4], F32, 0)
        .tensor("w", &[4], F32, 32)
        .pad(32)
        .zeros(64)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::DuplicateTensor { ref name } if name == "w"),
        "{e}"
    );
}

#[test]
fn dims_not_multiple_of_block_size() {
    let e = B::header(3, 1, 0)
        .tensor("q", &[33, 2], Q4_0, 0)
        .pad(32)
        .zeros(128)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::NotBlockMultiple { ref tensor, ty: GgmlType::Q4_0, dim0: 33, block_size: 32 } if tensor == "q"),
        "{e}"
    );
}

#[test]
fn element_count_overflow() {
    let e = B::header(3, 1, 0)
        .tensor("big", &[1 << 32, 1 << 32, 2], F32, 0)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(
        matches!(e, GgufError::ElementCountOverflow { ref tensor, .. } if tensor == "big"),
        "{e}"
    );
}

#[test]
fn byte_size_overflow() {
    // 2^62 elements fit in u64, 2^64 bytes of f32 do not.
    let e = B::header(3, 1, 0)
        .tensor("big", &[1 << 62], F32, 0)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    assert!(matches!(e, GgufError::ElementCountOverflow { .. }), "{e}");
}

#[test]
fn messages_name_the_culprit() {
    let e = B::header(3, 1, 0)
        .tensor("blk.0.attn_q.weight", &[4], F32, 4)
        .pad(32)
        .zeros(32)
        .parse()
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains('4'),
        "{msg}"
    );
}

/// Every prefix of a valid file must be rejected cleanly (never a panic), and every prefix
/// that cuts into the header or metadata must be reported as an error.
#[test]
fn every_truncation_is_an_error() {
    let full = valid().0;
    for n in 0..full.len() {
        let r = GgufFile::from_bytes(full[..n].to_vec());
        assert!(r.is_err(), "prefix of {n} bytes accepted");
    }
    assert!(GgufFile::from_bytes(full).is_ok());
}

/// Single-byte corruptions anywhere must never panic or hang.
#[test]
fn byte_flips_never_panic() {
    let full = valid().0;
    for i in 0..full.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = full.clone();
            b[i] ^= x;
            let _ = GgufFile::from_bytes(b);
        }
    }
}
