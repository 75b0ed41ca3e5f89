//! GGUF → Hugging Face checkpoint directory (see the module doc of [`super`]).

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use serde_json::{json, Value as Json};

use super::*;

// -------------------------------------------------------------------------------------------
// Export
// -------------------------------------------------------------------------------------------

/// Floating-point type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

impl HfDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(Self::F32),
            "f16" | "float16" => Some(Self::F16),
            "bf16" | "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }
    fn st(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::BF16 => safetensors::Dtype::BF16,
        }
    }
    fn torch(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            Self::BF16 => v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn gguf_usize(f: &modu_gguf::GgufFile, key: &str) -> Result<usize, HfError> {
    f.get_u64(key)
        .map(|v| v as usize)
        .ok_or_else(|| HfError::Config(key.into()))
}

/// Write `file` (a llama / qwen2 / gemma3 GGUF) as a Hugging Face checkpoint in `dir` (created;
/// it must not exist or be empty): `config.json`, `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json` and the weights in `dtype`, in `shards` files with an index when
/// `shards > 1`. Quantized tensors are dequantized; Llama Q/K rows and Gemma norms are turned
/// back into Hugging Face's layout. The files are written into a temporary sibling directory
/// renamed at the end.
pub fn export_hf(
    file: &modu_gguf::GgufFile,
    dir: &Path,
    dtype: HfDtype,
    shards: usize,
) -> Result<(), HfError> {
    let a = file.architecture().unwrap_or("");
    let arch = HfArch::from_gguf(a).ok_or_else(|| HfError::UnknownArch(a.into()))?;
    let key = |s: &str| format!("{a}.{s}");
    let n_embd = gguf_usize(file, &key("embedding_length"))?;
    let n_head = gguf_usize(file, &key("attention.head_count"))?;
    let emb = file
        .tensor_info("token_embd.weight")
        .ok_or_else(|| HfError::MissingTensor("token_embd.weight".into()))?;
    let d = Dims {
        n_vocab: emb.dims.get(1).copied().unwrap_or(0) as usize,
        n_embd,
        n_layer: gguf_usize(file, &key("block_count"))?,
        n_ff: gguf_usize(file, &key("feed_forward_length"))?,
        n_head,
        n_head_kv: file
            .get_u64(&key("attention.head_count_kv"))
            .map_or(n_head, |v| v as usize),
        head_dim: file
            .get_u64(&key("attention.key_length"))
            .map_or(n_embd / n_head, |v| v as usize),
    };
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(HfError::Unsupported(
            "export of rope_freqs.weight (Llama 3 RoPE scaling)".into(),
        ));
    }
    let has_output = file.tensor_info("output.weight").is_some();
    let slots = slots(arch, &d, has_output);
    for t in file.tensors() {
        if !slots.iter().any(|s| s.gguf == t.name) {
            return Err(HfError::UnknownTensor(t.name.clone(), arch.hf_name()));
        }
    }

    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .next()
            .is_some()
    {
        return Err(HfError::Unsupported(format!(
            "{} exists and is not empty",
            dir.display()
        )));
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let r = export_into(file, arch, &d, &slots, &tmp, dtype, shards.max(1));
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))
}

pub(crate) fn export_into(
    file: &modu_gguf::GgufFile,
    arch: HfArch,
    d: &Dims,
    slots: &[Slot],
    dir: &Path,
    dtype: HfDtype,
    shards: usize,
) -> Result<(), HfError> {
    let present: Vec<&Slot> = slots
        .iter()
        .filter(|s| file.tensor_info(&s.gguf).is_some())
        .collect();
    for s in slots {
        if s.required && file.tensor_info(&s.gguf).is_none() {
            return Err(HfError::MissingTensor(s.gguf.clone()));
        }
    }
    // Split into shards of about equal element counts, in file order.
    let total: u64 = present
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let per = total.div_ceil(shards as u64).max(1);
    let mut groups: Vec<Vec<&Slot>> = vec![Vec::new()];
    let mut acc = 0u64;
    for s in &present {
        let n = s.shape.iter().product::<usize>() as u64;
        if acc >= per && groups.len() < shards {
            groups.push(Vec::new());
            acc = 0;
        }
        groups.last_mut().unwrap_or_else(|| unreachable!()).push(s);
        acc += n;
    }
    let n_files = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (gi, group) in groups.iter().enumerate() {
        let fname = if n_files == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", gi + 1, n_files)
        };
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for s in group {
            let t = file
                .tensor_info(&s.gguf)
                .ok_or_else(|| HfError::MissingTensor(s.gguf.clone()))?;
            let got: Vec<usize> = t.dims.iter().rev().map(|&x| x as usize).collect();
            if got != s.shape {
                return Err(HfError::BadShape {
                    name: s.gguf.clone(),
                    expected: s.shape.clone(),
                    got,
                });
            }
            let ne0 = t.dims[0] as usize;
            let mut v = vec![0f32; t.n_elements() as usize];
            let rb = modu_kernels::row_bytes(t.ty, ne0).map_err(|e| HfError::Tensor {
                name: s.gguf.clone(),
                msg: e.to_string(),
            })?;
            for (row, src) in v
                .chunks_mut(ne0.max(1))
                .zip(file.tensor_data(t).chunks(rb.max(1)))
            {
                modu_kernels::dequantize_row(t.ty, src, row).map_err(|e| HfError::Tensor {
                    name: s.gguf.clone(),
                    msg: e.to_string(),
                })?;
            }
            if is_gemma_norm(arch, &s.gguf) {
                v.iter_mut().for_each(|x| *x -= 1.0);
            }
            let mut bytes = dtype.encode(&v);
            if let Some(h) = llama_perm_heads(arch, &s.gguf, d) {
                let rb = bytes.len() / s.shape[0];
                bytes = permute_rows(&bytes, rb, h, true);
            }
            total_size += bytes.len() as u64;
            weight_map.insert(s.hf.clone(), Json::String(fname.clone()));
            bufs.push((s.hf.clone(), s.shape.clone(), bytes));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
            .iter()
            .map(|(n, shape, b)| {
                safetensors::tensor::TensorView::new(dtype.st(), shape.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| HfError::Safetensors {
                        file: fname.clone(),
                        msg: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let meta: Option<HashMap<String, String>> =
            Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(views, &meta, &dir.join(&fname)).map_err(|e| {
            HfError::Safetensors {
                file: fname.clone(),
                msg: e.to_string(),
            }
        })?;
    }
    if n_files > 1 {
        let idx = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(dir, "model.safetensors.index.json", &idx)?;
    }
    export_config(file, arch, d, has_output(slots), dtype, dir)?;
    export_tokenizer(file, dir)
}

pub(crate) fn has_output(slots: &[Slot]) -> bool {
    slots.iter().any(|s| s.gguf == "output.weight")
}

pub(crate) fn write_json(dir: &Path, name: &str, v: &Json) -> Result<(), HfError> {
    let p = dir.join(name);
    let text = serde_json::to_string_pretty(v).map_err(|e| HfError::Json {
        file: name.into(),
        msg: e.to_string(),
    })?;
    std::fs::write(&p, text).map_err(io_err(&p))
}

/// An f32 as the shortest decimal that reads back as it (`1e-6`, not `9.99999997e-7`).
pub(crate) fn f32_json(x: f32) -> Json {
    x.to_string()
        .parse::<f64>()
        .map_or_else(|_| json!(x), |v| json!(v))
}

pub(crate) fn export_config(
    file: &modu_gguf::GgufFile,
    arch: HfArch,
    d: &Dims,
    has_output: bool,
    dtype: HfDtype,
    dir: &Path,
) -> Result<(), HfError> {
    let a = arch.gguf_name();
    let key = |s: &str| format!("{a}.{s}");
    let id = |k: &str| file.get_u64(&format!("tokenizer.ggml.{k}"));
    let mut c = json!({
        "architectures": [arch.hf_name()],
        "model_type": arch.model_type(),
        "vocab_size": d.n_vocab,
        "hidden_size": d.n_embd,
        "intermediate_size": d.n_ff,
        "num_hidden_layers": d.n_layer,
        "num_attention_heads": d.n_head,
        "num_key_value_heads": d.n_head_kv,
        "head_dim": d.head_dim,
        "max_position_embeddings": file.get_u64(&key("context_length")).unwrap_or(4096),
        "rms_norm_eps": f32_json(file.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6)),
        "rope_theta": f32_json(file.get_f32(&key("rope.freq_base")).unwrap_or(10000.0)),
        "tie_word_embeddings": !has_output,
        "torch_dtype": dtype.torch(),
        "bos_token_id": id("bos_token_id"),
        "eos_token_id": id("eos_token_id"),
        "pad_token_id": id("padding_token_id"),
    });
    let obj = c.as_object_mut().unwrap_or_else(|| unreachable!());
    if file.get_str(&key("rope.scaling.type")) == Some("linear") {
        obj.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": file.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0)}),
        );
    }
    match arch {
        HfArch::Gemma3 => {
            obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            obj.insert(
                "sliding_window".into(),
                json!(file
                    .get_u64(&key("attention.sliding_window"))
                    .unwrap_or(512)),
            );
            obj.insert(
                "rope_local_base_freq".into(),
                json!(file.get_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0)),
            );
            obj.insert("sliding_window_pattern".into(), json!(6));
            obj.insert("query_pre_attn_scalar".into(), json!(d.head_dim));
        }
        HfArch::Exaone => {
            // EXAONE 3.5's own key names.
            let n = obj.remove("num_hidden_layers").unwrap_or_default();
            obj.insert("num_layers".into(), n);
            let eps = obj.remove("rms_norm_eps").unwrap_or_default();
            obj.insert("layer_norm_epsilon".into(), eps);
            obj.insert("activation_function".into(), json!("silu"));
        }
        HfArch::Exaone4 => {
            obj.insert("hidden_act".into(), json!("silu"));
            let window = file.get_u64(&key("attention.sliding_window"));
            obj.insert("sliding_window".into(), json!(window));
            if let Some(p) = file
                .get_array(&key("attention.sliding_window_pattern"))
                .and_then(|a| match a {
                    modu_gguf::Array::Bool(v) => Some(v.clone()),
                    _ => None,
                })
            {
                let types: Vec<&str> = p
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                obj.insert("layer_types".into(), json!(types));
            }
        }
        _ => {
            obj.insert("hidden_act".into(), json!("silu"));
        }
    }
    write_json(dir, "config.json", &c)?;
    let mut g = json!({});
    for (k, gk) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ] {
        if let Some(v) = id(gk) {
            g[k] = json!(v);
        }
    }
    write_json(dir, "generation_config.json", &g)
}
