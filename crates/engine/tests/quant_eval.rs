//! The lightweighting toolchain end to end: `quantize_file` on a small synthetic GGUF (recipe,
//! metadata, values, errors, atomic output), and perplexity / KL divergence / importance
//! matrix on the real Qwen model with a short text and a small context (fast).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use modu_engine::eval;
use modu_engine::imatrix::ImatrixCollector;
use modu_engine::layers::observe::set_observer;
use modu_engine::quantize::{quantize_file, QuantizeOptions, Recipe};
use modu_engine::{load_model, Tokenizer};
use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use modu_kernels::testutil::Rng;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("modu-qtest-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A file with 8 "layers" worth of named tensors (only shapes and names matter).
fn synthetic(path: &PathBuf) -> HashMap<String, Vec<f32>> {
    let mut rng = Rng::new(42);
    let mut w = GgufWriter::new();
    w.add("general.architecture", Value::String("llama".into()));
    w.add("general.file_type", Value::U32(0));
    let mut vals = HashMap::new();
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64]| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = rng.f32s(n as usize, 0.1);
        w.add_tensor(name, dims, GgmlType::F32, f32_bytes(&v))
            .unwrap();
        vals.insert(name.to_string(), v);
    };
    add(&mut w, "token_embd.weight", &[256, 16]);
    add(&mut w, "output.weight", &[256, 16]);
    add(&mut w, "output_norm.weight", &[256]);
    for i in 0..8 {
        add(&mut w, &format!("blk.{i}.attn_v.weight"), &[256, 32]);
        add(&mut w, &format!("blk.{i}.attn_q.weight"), &[96, 32]); // not a multiple of 256
        add(&mut w, &format!("blk.{i}.ffn_down.weight"), &[512, 8]);
        add(&mut w, &format!("blk.{i}.attn_norm.weight"), &[256]);
    }
    w.write_file(path).unwrap();
    vals
}

fn read_f32(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor_info(name).unwrap();
    let mut out = vec![0f32; t.n_elements() as usize];
    let rb = t.ty.row_bytes(t.dims[0]).unwrap() as usize;
    let d0 = t.dims[0] as usize;
    for (r, o) in out.chunks_mut(d0).enumerate() {
        modu_kernels::dequantize_row(t.ty, &f.tensor_data(t)[r * rb..(r + 1) * rb], o).unwrap();
    }
    out
}

#[test]
fn quantize_file_recipe_metadata_values() {
    let dir = tmpdir("file");
    let src = dir.join("src.gguf");
    let vals = synthetic(&src);
    let out = dir.join("q4km.gguf");
    let rep = quantize_file(
        &src,
        &out,
        Recipe::Q4KM,
        &QuantizeOptions::default(),
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(rep.n_tensors, 3 + 8 * 4);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_u64("general.file_type"), Some(15));
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    let ty = |n: &str| f.tensor_info(n).unwrap().ty;
    assert_eq!(ty("output.weight"), GgmlType::Q6_K);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
    assert_eq!(ty("output_norm.weight"), GgmlType::F32);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q6_K); // first eighth: more bits
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.7.ffn_down.weight"), GgmlType::Q6_K); // last eighth
    assert_eq!(ty("blk.1.attn_q.weight"), GgmlType::Q5_0); // 96 columns: fallback
    for (name, v) in &vals {
        let q = read_f32(&f, name);
        let e: f32 = v
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>();
        let s: f32 = v.iter().map(|a| a * a).sum();
        assert!((e / s).sqrt() < 0.12, "{name}: {}", (e / s).sqrt());
    }

    // --keep overrides, with a glob.
    let opts = QuantizeOptions {
        keep: vec![("blk.*.ffn_down.weight".into(), GgmlType::Q8_0)],
        imatrix: None,
    };
    let out2 = dir.join("keep.gguf");
    quantize_file(
        &src,
        &out2,
        Recipe::Plain(GgmlType::Q4_0),
        &opts,
        &|_, _| {},
    )
    .unwrap();
    let f2 = GgufFile::open(&out2).unwrap();
    assert_eq!(
        f2.tensor_info("blk.3.ffn_down.weight").unwrap().ty,
        GgmlType::Q8_0
    );
    assert_eq!(
        f2.tensor_info("blk.3.attn_v.weight").unwrap().ty,
        GgmlType::Q4_0
    );
    assert_eq!(f2.get_u64("general.file_type"), Some(2));

    // An importance matrix of the wrong width is an error, and leaves no output behind.
    let mut im = HashMap::new();
    im.insert("blk.0.attn_v.weight".to_string(), vec![1.0f32; 7]);
    let bad = QuantizeOptions {
        keep: vec![],
        imatrix: Some(im),
    };
    let out3 = dir.join("bad.gguf");
    assert!(quantize_file(&src, &out3, Recipe::Q4KM, &bad, &|_, _| {}).is_err());
    assert!(!out3.exists());

    // Malformed input: a truncated file is a clear error and no output is written.
    let trunc = dir.join("trunc.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let out4 = dir.join("never.gguf");
    let e = quantize_file(
        &trunc,
        &out4,
        Recipe::Q4KM,
        &QuantizeOptions::default(),
        &|_, _| {},
    );
    assert!(e.is_err());
    assert!(!out4.exists());
    std::fs::remove_dir_all(&dir).ok();
}

fn eval_text() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/sotu_head.txt");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn ppl_kld_imatrix_on_qwen() {
    let path = common::model_path("qwen");
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let model = load_model(file).unwrap();
    let text = eval_text();
    let ctx = 64;
    let p = eval::perplexity(model.as_ref(), &tok, &text, ctx, Some(2), &|_, _| {}).unwrap();
    eprintln!("{p:?}");
    assert_eq!(p.windows, 2);
    assert_eq!(p.tokens_scored, 2 * (ctx / 2 - 1));
    assert!(p.ppl > 1.5 && p.ppl < 60.0, "ppl {}", p.ppl);
    assert!(p.bits_per_byte > 0.1 && p.bits_per_byte < 3.0);

    // A model against itself: no divergence, same top token everywhere.
    let k = eval::kl_divergence(
        model.as_ref(),
        model.as_ref(),
        &tok,
        &text,
        ctx,
        Some(1),
        &|_, _| {},
    )
    .unwrap();
    assert!(k.kld_mean.abs() < 1e-9 && k.kld_max.abs() < 1e-9, "{k:?}");
    assert_eq!(k.same_top_pct, 100.0);
    assert!((k.ppl_ratio - 1.0).abs() < 1e-12);

    // Too little text for one window is an error, not a panic.
    assert!(eval::perplexity(model.as_ref(), &tok, "hi", ctx, None, &|_, _| {}).is_err());

    // Importance matrix: every projection of every layer, one mean square per input column.
    let col = Arc::new(ImatrixCollector::new());
    set_observer(Some(col.clone()));
    let wins = eval::windows(&tok, &text, ctx, Some(1)).unwrap();
    let r = eval::window_logits(model.as_ref(), &wins[0]);
    set_observer(None);
    r.unwrap();
    let m = col.means();
    let q = &m["blk.0.attn_q.weight"];
    assert_eq!(q.len(), 896);
    assert!(q.iter().all(|v| v.is_finite() && *v >= 0.0) && q.iter().any(|v| *v > 0.0));
    assert_eq!(m["blk.23.ffn_down.weight"].len(), 4864);
    assert_eq!(m.len(), 24 * 7 + 1); // q k v o gate up down per layer + output
}

/// Per-tensor relative RMS error of two quantizations of the same source (diagnostics):
/// `MODU_CMP_SRC=src.gguf MODU_CMP_A=a.gguf MODU_CMP_B=b.gguf cargo test --release -p
/// modu-engine --test quant_eval compare_files -- --ignored --nocapture`
#[test]
#[ignore]
fn compare_files() {
    let get = |k: &str| GgufFile::open(std::env::var(k).expect(k)).unwrap();
    let (src, a, b) = (get("MODU_CMP_SRC"), get("MODU_CMP_A"), get("MODU_CMP_B"));
    let mut tot = HashMap::<String, (f64, f64, f64)>::new();
    for t in src.tensors() {
        if t.dims.len() < 2 {
            continue;
        }
        let x = read_f32(&src, &t.name);
        let ya = read_f32(&a, &t.name);
        let yb = read_f32(&b, &t.name);
        let e = |y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
        };
        let s: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
        let (ea, eb) = (e(&ya), e(&yb));
        let ta = a.tensor_info(&t.name).unwrap().ty;
        let tb = b.tensor_info(&t.name).unwrap().ty;
        let kind = format!("{} {ta}/{tb}", t.name.split('.').rev().nth(1).unwrap_or(""));
        let en = tot.entry(kind).or_default();
        en.0 += ea;
        en.1 += eb;
        en.2 += s;
    }
    let mut k: Vec<_> = tot.into_iter().collect();
    k.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, (ea, eb, s)) in k {
        eprintln!(
            "{name:<28} A {:.5}  B {:.5}",
            (ea / s).sqrt(),
            (eb / s).sqrt()
        );
    }
}
