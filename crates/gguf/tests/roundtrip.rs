//! Writer → reader round trips, and the writer's own input validation.

use std::path::PathBuf;

use modu_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};

fn write(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("v.u8", Value::U8(200)),
        ("v.i8", Value::I8(-100)),
        ("v.u16", Value::U16(60000)),
        ("v.i16", Value::I16(-30000)),
        ("v.u32", Value::U32(4_000_000_000)),
        ("v.i32", Value::I32(-2_000_000_000)),
        ("v.u64", Value::U64(u64::MAX)),
        ("v.i64", Value::I64(i64::MIN)),
        ("v.f32", Value::F32(1e-6)),
        ("v.f64", Value::F64(std::f64::consts::PI)),
        ("v.bool.t", Value::Bool(true)),
        ("v.bool.f", Value::Bool(false)),
        ("v.str", Value::String("héllo ▁wörld 🦀".into())),
        ("v.str.empty", Value::String(String::new())),
        ("a.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("a.i8", Value::Array(Array::I8(vec![-128, 0, 127]))),
        ("a.u16", Value::Array(Array::U16(vec![0, 65535]))),
        ("a.i16", Value::Array(Array::I16(vec![-32768, 32767]))),
        ("a.u32", Value::Array(Array::U32(vec![1, 2, u32::MAX]))),
        ("a.i32", Value::Array(Array::I32(vec![-1, 0, 1, i32::MAX]))),
        ("a.u64", Value::Array(Array::U64(vec![u64::MAX, 0]))),
        ("a.i64", Value::Array(Array::I64(vec![i64::MIN, i64::MAX]))),
        ("a.f32", Value::Array(Array::F32(vec![-0.5, 0.0, 3.25]))),
        ("a.f64", Value::Array(Array::F64(vec![1e300, -1e-300]))),
        ("a.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        (
            "a.str",
            Value::Array(Array::String(vec![
                "<s>".into(),
                String::new(),
                "▁the".into(),
            ])),
        ),
        ("a.empty", Value::Array(Array::F32(vec![]))),
    ]
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("f32.vec", vec![7], GgmlType::F32),
        ("f32.mat", vec![3, 5], GgmlType::F32),
        ("f16", vec![8, 2, 3], GgmlType::F16),
        ("bf16", vec![4, 1, 1, 2], GgmlType::BF16),
        ("q4_0", vec![64, 3], GgmlType::Q4_0),
        ("q8_0", vec![32, 5], GgmlType::Q8_0),
        ("q4_k", vec![256, 2], GgmlType::Q4_K),
        ("q6_k", vec![512, 1], GgmlType::Q6_K),
        ("i32", vec![3], GgmlType::I32),
    ]
}

fn full_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama");
    for (k, v) in every_value() {
        w.add(k, v);
    }
    for (i, (name, dims, ty)) in tensors().into_iter().enumerate() {
        let n = ty.row_bytes(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
        w.add_tensor(name, &dims, ty, bytes(n as usize, i as u64))
            .unwrap();
    }
    w
}

#[test]
fn every_value_type_round_trips() {
    let f = GgufFile::from_bytes(write(&full_writer())).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    let expected = every_value();
    assert_eq!(f.metadata().len(), expected.len() + 1);
    for ((k, v), (ek, ev)) in f.metadata()[1..].iter().zip(&expected) {
        assert_eq!(k, ek);
        assert_eq!(v, ev, "{k}");
    }
}

#[test]
fn tensors_round_trip() {
    let f = GgufFile::from_bytes(write(&full_writer())).unwrap();
    assert_eq!(f.tensors().len(), tensors().len());
    for (i, ((name, dims, ty), info)) in tensors().into_iter().zip(f.tensors()).enumerate() {
        assert_eq!(info.name, name);
        assert_eq!(info.dims, dims);
        assert_eq!(info.ty, ty);
        assert_eq!(info.offset % 32, 0);
        let data = f.tensor_data(info);
        assert_eq!(data.len() as u64, info.n_bytes());
        assert_eq!(data, &bytes(data.len(), i as u64)[..], "{name}");
        assert_eq!(info.n_elements(), dims.iter().product::<u64>());
    }
    assert_eq!(f.data_offset() % 32, 0);
}

#[test]
fn typed_accessors() {
    let f = GgufFile::from_bytes(write(&full_writer())).unwrap();
    assert_eq!(f.get_u64("v.u8"), Some(200));
    assert_eq!(f.get_u64("v.u64"), Some(u64::MAX));
    assert_eq!(f.get_u64("v.i32"), None, "negative integers are not u64");
    assert_eq!(f.get_i64("v.i64"), Some(i64::MIN));
    assert_eq!(f.get_f32("v.f32"), Some(1e-6));
    assert_eq!(f.get_f32("v.f64"), Some(std::f32::consts::PI));
    assert_eq!(f.get_f32("v.u32"), None);
    assert_eq!(f.get_bool("v.bool.t"), Some(true));
    assert_eq!(f.get_str("v.str"), Some("héllo ▁wörld 🦀"));
    assert_eq!(f.get_str("v.u8"), None);
    assert_eq!(f.get_str("missing"), None);
    let toks = f.get_array("a.str").unwrap();
    assert_eq!(toks.len(), 3);
    assert_eq!(toks.as_strings().unwrap()[2], "▁the");
    assert_eq!(
        f.get_array("a.f32").unwrap().as_f32s(),
        Some(&[-0.5, 0.0, 3.25][..])
    );
    assert_eq!(f.get_array("a.i32").unwrap().as_i32s().unwrap()[0], -1);
    assert_eq!(f.get_array("a.i32").unwrap().as_f32s(), None);
    assert!(f.get_array("a.empty").unwrap().is_empty());
}

#[test]
fn rewrite_is_byte_identical() {
    let first = write(&full_writer());
    let f = GgufFile::from_bytes(first.clone()).unwrap();
    let second = write(&GgufWriter::from_gguf(&f));
    assert_eq!(first, second);
}

#[test]
fn large_vocabulary() {
    let vocab: Vec<String> = (0..262_144).map(|i| format!("tok{i}")).collect();
    let mut w = GgufWriter::new();
    w.add("tokenizer.ggml.tokens", vocab.clone());
    let f = GgufFile::from_bytes(write(&w)).unwrap();
    assert_eq!(
        f.get_array("tokenizer.ggml.tokens").unwrap().as_strings(),
        Some(&vocab[..])
    );
}

#[test]
fn custom_alignment() {
    let mut w = full_writer();
    w.set_alignment(128);
    let f = GgufFile::from_bytes(write(&w)).unwrap();
    assert_eq!(f.alignment(), 128);
    assert_eq!(f.get_u64("general.alignment"), Some(128));
    assert_eq!(f.data_offset() % 128, 0);
    assert!(f.tensors().iter().all(|t| t.offset % 128 == 0));

    // Given as metadata instead, it is honoured too.
    let mut w = GgufWriter::new();
    w.add("general.alignment", 64u32);
    w.add_tensor("t", &[3], GgmlType::F32, vec![0; 12]).unwrap();
    w.add_tensor("u", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    let f = GgufFile::from_bytes(write(&w)).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.tensor_info("u").unwrap().offset, 64);
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]).unwrap();
    assert!(matches!(
        w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]),
        Err(GgufError::DuplicateTensor { ref name }) if name == "t"
    ));
    assert!(matches!(
        w.add_tensor("u", &[4], GgmlType::F32, vec![0; 15]),
        Err(GgufError::DataSizeMismatch {
            expected: 16,
            actual: 15,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("q", &[16], GgmlType::Q8_0, vec![0; 17]),
        Err(GgufError::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        w.add_tensor("z", &[4, 0], GgmlType::F32, vec![]),
        Err(GgufError::ZeroDim { index: 1, .. })
    ));
    assert!(matches!(
        w.add_tensor("d", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]),
        Err(GgufError::BadDimCount { n_dims: 5, .. })
    ));
    assert!(matches!(
        w.add_tensor("o", &[u64::MAX, 2], GgmlType::F32, vec![]),
        Err(GgufError::ElementCountOverflow { .. })
    ));
    assert_eq!(w.tensor_count(), 1);

    w.add("k", 1u32).add("k", 2u32);
    let mut sink = Vec::new();
    assert!(
        matches!(w.write_to(&mut sink), Err(GgufError::DuplicateKey { ref key }) if key == "k")
    );
    assert!(sink.is_empty(), "nothing is written for invalid input");

    let mut w = GgufWriter::new();
    w.set_alignment(48);
    assert!(matches!(
        w.write_to(&mut Vec::new()),
        Err(GgufError::InvalidAlignment { value: 48 })
    ));
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("modu-gguf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn write_file_then_open_mmap() {
    let dir = TempDir::new("file");
    let path = dir.0.join("model.gguf");
    full_writer().write_file(&path).unwrap();
    assert_eq!(
        dir.entries(),
        vec!["model.gguf"],
        "no temp file left behind"
    );
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.as_bytes(), &write(&full_writer())[..]);
    let (info, data) = f.tensor("q4_k").unwrap();
    assert_eq!(data.len() as u64, info.n_bytes());

    // The resident copy holds the same bytes, 2 MiB-aligned, and does not change with the file.
    let r = GgufFile::open_resident(&path).unwrap();
    assert_eq!(r.as_bytes(), f.as_bytes());
    assert_eq!(r.as_bytes().as_ptr() as usize % (2 << 20), 0);
    assert_eq!(r.tensor("q4_k").unwrap().1, data);
    assert!(!r.is_prepared(info));

    // A prepare hook rewrites the tensors it accepts in the copy (not in the file), and the
    // file reports which ones.
    let p = GgufFile::open_resident_with(&path, |t, bytes| {
        if t.name == "q4_k" {
            bytes.fill(0xAB);
            true
        } else {
            false
        }
    })
    .unwrap();
    let (pi, pd) = p.tensor("q4_k").unwrap();
    assert!(p.is_prepared(pi) && pd.len() == data.len() && pd.iter().all(|&b| b == 0xAB));
    for t in f.tensors().iter().filter(|t| t.name != "q4_k") {
        assert!(!p.is_prepared(t));
        assert_eq!(p.tensor_data(t), f.tensor_data(t));
    }
    assert_eq!(f.tensor("q4_k").unwrap().1, data);

    // Overwriting replaces the file completely.
    let mut small = GgufWriter::new();
    small.add("x", 1u8);
    small.write_file(&path).unwrap();
    drop(f);
    assert_eq!(GgufFile::open(&path).unwrap().metadata().len(), 1);
    assert_eq!(r.as_bytes(), &write(&full_writer())[..]);
    assert_eq!(GgufFile::open_resident(&path).unwrap().metadata().len(), 1);
}

#[test]
fn failed_write_file_leaves_nothing() {
    let dir = TempDir::new("fail");
    let path = dir.0.join("model.gguf");
    std::fs::write(&path, b"old").unwrap();
    let mut w = GgufWriter::new();
    w.add("k", 1u32).add("k", 1u32);
    assert!(matches!(
        w.write_file(&path),
        Err(GgufError::DuplicateKey { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"old");

    // Renaming onto a directory fails after the temp file was written: it must be removed.
    let target = dir.0.join("sub");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"").unwrap();
    assert!(matches!(
        full_writer().write_file(&target),
        Err(GgufError::Io { .. })
    ));
    assert_eq!(dir.entries(), vec!["model.gguf", "sub"]);
}

#[test]
fn write_to_failing_sink() {
    struct Fail;
    impl std::io::Write for Fail {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(
        full_writer().write_to(&mut Fail),
        Err(GgufError::Write(_))
    ));
}

#[test]
fn open_errors() {
    let dir = TempDir::new("open");
    assert!(matches!(
        GgufFile::open(dir.0.join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
    let empty = dir.0.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(GgufFile::open(&empty), Err(GgufError::Empty)));
    assert!(matches!(
        GgufFile::open_resident(dir.0.join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
    assert!(matches!(
        GgufFile::open_resident(&empty),
        Err(GgufError::Empty)
    ));
    // A truncated file is a validation error on the copy, as on the map.
    let cut = dir.0.join("cut.gguf");
    let bytes = write(&full_writer());
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(GgufFile::open_resident(&cut).is_err());
    assert!(GgufFile::open(&cut).is_err());
}
