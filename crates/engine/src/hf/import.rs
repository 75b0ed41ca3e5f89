//! Hugging Face checkpoint → GGUF metadata and tensors (see the module doc of [`super`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use modu_gguf::{GgmlType, Value};
use serde_json::Value as Json;

use super::*;
use crate::quantize::SourceTensor;

pub(crate) enum Data {
    Mapped {
        shard: usize,
        start: usize,
        end: usize,
    },
    Owned(Vec<u8>),
}

pub(crate) struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data,
}

/// A validated Hugging Face checkpoint, ready to be written as GGUF.
pub struct HfCheckpoint {
    pub arch: HfArch,
    /// GGUF metadata (architecture hyper-parameters, tokenizer, chat template).
    pub metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
    maps: Vec<Mmap>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("arch", &self.arch)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl HfCheckpoint {
    /// The tensors under their GGUF names, in GGUF order.
    pub fn sources(&self) -> Vec<SourceTensor<'_>> {
        self.tensors
            .iter()
            .map(|t| SourceTensor {
                name: &t.name,
                dims: &t.dims,
                ty: t.ty,
                data: match &t.data {
                    Data::Mapped { shard, start, end } => &self.maps[*shard][*start..*end],
                    Data::Owned(v) => v,
                },
            })
            .collect()
    }

    /// Read and validate a model directory. Nothing is converted until [`Self::sources`] is
    /// consumed, except the few tensors whose layout changes (1-D tensors, Llama Q/K).
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        if !dir.is_dir() {
            return Err(HfError::NotADir(dir.to_path_buf()));
        }
        let config = need_json(dir, "config.json")?;
        let arch_name = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| HfError::Config("architectures".into()))?;
        let arch =
            HfArch::from_hf(arch_name).ok_or_else(|| HfError::UnknownArch(arch_name.into()))?;
        let n_embd = cfg_req(&config, "hidden_size")?;
        let n_head = cfg_req(&config, "num_attention_heads")?;
        let default_hd = if arch == HfArch::Gemma3 {
            256
        } else {
            n_embd / n_head
        };
        let mut dims = Dims {
            n_vocab: cfg_req(&config, "vocab_size")?,
            n_embd,
            // EXAONE 3.5 calls it `num_layers`.
            n_layer: match cfg_usize(&config, "num_hidden_layers")? {
                Some(n) => n,
                None => cfg_req(&config, "num_layers")?,
            },
            n_ff: cfg_req(&config, "intermediate_size")?,
            n_head,
            n_head_kv: cfg_usize(&config, "num_key_value_heads")?.unwrap_or(n_head),
            head_dim: cfg_usize(&config, "head_dim")?.unwrap_or(default_hd),
        };
        // Absurd sizes would only allocate or overflow before any tensor could disagree.
        for (key, v, max) in [
            ("vocab_size", dims.n_vocab, 1 << 24),
            ("hidden_size", dims.n_embd, 1 << 20),
            ("num_hidden_layers", dims.n_layer, 4096),
            ("intermediate_size", dims.n_ff, 1 << 22),
            ("num_attention_heads", dims.n_head, 4096),
            ("num_key_value_heads", dims.n_head_kv, 4096),
            ("head_dim", dims.head_dim, 4096),
        ] {
            if v > max {
                return Err(HfError::Config(format!("{key} ({v} > {max})")));
            }
        }
        if dims.n_head % dims.n_head_kv != 0 || dims.head_dim % 2 != 0 {
            return Err(HfError::Unsupported(format!(
                "{} heads over {} KV heads of dim {}",
                dims.n_head, dims.n_head_kv, dims.head_dim
            )));
        }

        // Weights: shards from the index, else model.safetensors, else every *.safetensors.
        let files: Vec<String> = if let Some(idx) = read_json(dir, "model.safetensors.index.json")?
        {
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| HfError::Json {
                    file: "model.safetensors.index.json".into(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut f: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            f.sort();
            f.dedup();
            f
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            let mut f: Vec<String> = std::fs::read_dir(dir)
                .map_err(|source| HfError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            f.sort();
            f
        };
        if files.is_empty() {
            return Err(HfError::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors (or model.safetensors.index.json)".into(),
            });
        }
        let mut maps = Vec::new();
        // HF name → (shard, dtype, shape, start, end)
        let mut found: HashMap<String, (usize, GgmlType, Vec<usize>, usize, usize)> =
            HashMap::new();
        for (si, fname) in files.iter().enumerate() {
            let path = dir.join(fname);
            let file = File::open(&path).map_err(|source| HfError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only and only read through this map; like every
            // mmap-based loader we rely on nobody truncating the checkpoint while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| HfError::Io {
                path: path.clone(),
                source,
            })?;
            let st =
                safetensors::SafeTensors::deserialize(&map).map_err(|e| HfError::Safetensors {
                    file: fname.clone(),
                    msg: e.to_string(),
                })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let ty = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(HfError::BadDtype {
                            name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                let end = start + view.data().len();
                if found
                    .insert(name.clone(), (si, ty, view.shape().to_vec(), start, end))
                    .is_some()
                {
                    return Err(HfError::DuplicateTensor(name));
                }
            }
            maps.push(map);
        }

        // The vocabulary size is the embedding's row count; config.json must agree.
        let embed = slots(arch, &dims, false)[0].hf.clone();
        if let Some((_, _, shape, _, _)) = found.get(&embed) {
            if shape.len() == 2 && shape[0] != dims.n_vocab {
                return Err(HfError::BadShape {
                    name: embed,
                    expected: vec![dims.n_vocab, dims.n_embd],
                    got: shape.clone(),
                });
            }
        }
        // Tied embeddings: `tie_word_embeddings: true` (an `lm_head.weight` saved anyway is a
        // copy and is dropped), or no `lm_head.weight` at all (as llama.cpp's converter
        // treats it).
        let tied = config
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let has_output = found.contains_key("lm_head.weight") && !tied;
        let slots = slots(arch, &dims, has_output);
        let known: HashMap<&str, usize> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.hf.as_str(), i))
            .collect();
        for name in found.keys() {
            if !known.contains_key(name.as_str())
                && !name.ends_with("rotary_emb.inv_freq")
                && name != "lm_head.weight"
            {
                return Err(HfError::UnknownTensor(name.clone(), arch.hf_name()));
            }
        }
        let mut tensors = Vec::new();
        let (mut metadata, rope_freqs) = hparams_metadata(arch, &config, &mut dims, dir)?;
        if let Some(f) = rope_freqs {
            tensors.push(Tensor {
                name: "rope_freqs.weight".into(),
                dims: vec![f.len() as u64],
                ty: GgmlType::F32,
                data: Data::Owned(f.iter().flat_map(|x| x.to_le_bytes()).collect()),
            });
        }
        for s in &slots {
            let Some((shard, ty, shape, start, end)) = found.get(&s.hf) else {
                if s.required {
                    return Err(HfError::MissingTensor(s.hf.clone()));
                }
                continue;
            };
            if *shape != s.shape {
                return Err(HfError::BadShape {
                    name: s.hf.clone(),
                    expected: s.shape.clone(),
                    got: shape.clone(),
                });
            }
            let bytes = &maps[*shard][*start..*end];
            let gdims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
            let terr = |msg: String| HfError::Tensor {
                name: s.hf.clone(),
                msg,
            };
            let data = if shape.len() == 1 {
                let mut v = vec![0f32; shape[0]];
                modu_kernels::dequantize_row(*ty, bytes, &mut v)
                    .map_err(|e| terr(e.to_string()))?;
                if is_gemma_norm(arch, &s.gguf) {
                    v.iter_mut().for_each(|x| *x += 1.0);
                }
                let mut b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                if let Some(h) = llama_perm_heads(arch, &s.gguf, &dims) {
                    b = permute_rows(&b, 4, h, false);
                }
                tensors.push(Tensor {
                    name: s.gguf.clone(),
                    dims: gdims,
                    ty: GgmlType::F32,
                    data: Data::Owned(b),
                });
                continue;
            } else if let Some(h) = llama_perm_heads(arch, &s.gguf, &dims) {
                let rb = bytes.len() / shape[0];
                Data::Owned(permute_rows(bytes, rb, h, false))
            } else {
                Data::Mapped {
                    shard: *shard,
                    start: *start,
                    end: *end,
                }
            };
            tensors.push(Tensor {
                name: s.gguf.clone(),
                dims: gdims,
                ty: *ty,
                data,
            });
        }
        tokenizer_metadata(dir, arch, &config, dims.n_vocab, &mut metadata)?;
        Ok(Self {
            arch,
            metadata,
            tensors,
            maps,
        })
    }
}

/// The `{arch}.*` keys, and Llama 3's RoPE frequency divisors when the config asks for them.
#[allow(clippy::type_complexity)]
pub(crate) fn hparams_metadata(
    arch: HfArch,
    c: &Json,
    d: &mut Dims,
    dir: &Path,
) -> Result<(Vec<(String, Value)>, Option<Vec<f32>>), HfError> {
    let a = arch.gguf_name();
    let mut m: Vec<(String, Value)> = Vec::new();
    let k = |s: &str| format!("{a}.{s}");
    m.push(("general.architecture".into(), Value::String(a.into())));
    m.push(("general.type".into(), Value::String("model".into())));
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    m.push(("general.name".into(), Value::String(name)));
    let ctx = cfg_usize(c, "max_position_embeddings")?.unwrap_or(4096);
    m.push((k("context_length"), Value::U32(ctx as u32)));
    m.push((k("embedding_length"), Value::U32(d.n_embd as u32)));
    m.push((k("block_count"), Value::U32(d.n_layer as u32)));
    m.push((k("feed_forward_length"), Value::U32(d.n_ff as u32)));
    m.push((k("attention.head_count"), Value::U32(d.n_head as u32)));
    m.push((k("attention.head_count_kv"), Value::U32(d.n_head_kv as u32)));
    let default_theta = if arch == HfArch::Gemma3 {
        1_000_000.0
    } else {
        10_000.0
    };
    let theta = cfg_f64(c, "rope_theta")?.unwrap_or(default_theta);
    m.push((k("rope.freq_base"), Value::F32(theta as f32)));
    let eps = match cfg_f64(c, "rms_norm_eps")? {
        Some(e) => e,
        None => cfg_f64(c, "layer_norm_epsilon")?.unwrap_or(1e-6),
    };
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(eps as f32),
    ));
    if arch == HfArch::Gemma3 || d.head_dim != d.n_embd / d.n_head {
        m.push((k("attention.key_length"), Value::U32(d.head_dim as u32)));
        m.push((k("attention.value_length"), Value::U32(d.head_dim as u32)));
    }
    if let Some(act) = c
        .get("hidden_act")
        .or_else(|| c.get("hidden_activation"))
        .or_else(|| c.get("activation_function"))
        .and_then(|v| v.as_str())
    {
        let ok = match arch {
            HfArch::Gemma3 => act.starts_with("gelu"),
            _ => act == "silu",
        };
        if !ok {
            return Err(HfError::Unsupported(format!(
                "activation `{act}` for {}",
                arch.hf_name()
            )));
        }
    }
    let mut rope_freqs = None;
    if let Some(rs) = c.get("rope_scaling").filter(|v| !v.is_null()) {
        let ty = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let factor = rs.get("factor").and_then(|v| v.as_f64());
        match (ty, factor) {
            ("default", _) => {}
            ("linear", Some(f)) => {
                m.push((k("rope.scaling.type"), Value::String("linear".into())));
                m.push((k("rope.scaling.factor"), Value::F32(f as f32)));
            }
            ("llama3", Some(f))
                if matches!(arch, HfArch::Llama | HfArch::Exaone | HfArch::Exaone4) =>
            {
                let g = |key: &str, def: f64| rs.get(key).and_then(|v| v.as_f64()).unwrap_or(def);
                let low = g("low_freq_factor", 1.0);
                let high = g("high_freq_factor", 4.0);
                let old = g("original_max_position_embeddings", 8192.0);
                let (low_wl, high_wl) = (old / low, old / high);
                let hd = d.head_dim;
                let mut v = Vec::with_capacity(hd / 2);
                for i in (0..hd).step_by(2) {
                    let freq = 1.0 / theta.powf(i as f64 / hd as f64);
                    let wl = 2.0 * std::f64::consts::PI / freq;
                    v.push(if wl < high_wl {
                        1.0
                    } else if wl > low_wl {
                        f as f32
                    } else {
                        let smooth = (old / wl - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / f + smooth)) as f32
                    });
                }
                rope_freqs = Some(v);
            }
            _ => {
                return Err(HfError::Unsupported(format!(
                    "rope_scaling {rs} (supported: linear; llama3 for Llama and EXAONE)"
                )))
            }
        }
    }
    if arch == HfArch::Gemma3 {
        let sw = cfg_usize(c, "sliding_window")?.unwrap_or(512);
        m.push((k("attention.sliding_window"), Value::U32(sw as u32)));
        let local = cfg_f64(c, "rope_local_base_freq")?.unwrap_or(10_000.0);
        if local != 10_000.0 {
            m.push((k("rope.freq_base_swa"), Value::F32(local as f32)));
        }
        // modu (like llama.cpp) runs five local layers then one global one, and scales the
        // queries by 1/sqrt(head_dim).
        let pattern_ok = match c.get("layer_types").and_then(|v| v.as_array()) {
            Some(lt) => lt.iter().enumerate().all(|(i, t)| {
                let sliding = i % 6 < 5;
                t.as_str()
                    == Some(if sliding {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    })
            }),
            None => cfg_usize(c, "sliding_window_pattern")?.unwrap_or(6) == 6,
        };
        if !pattern_ok {
            return Err(HfError::Unsupported(
                "Gemma 3 layer pattern other than 5 sliding + 1 global".into(),
            ));
        }
        if let Some(q) = cfg_f64(c, "query_pre_attn_scalar")? {
            if q != d.head_dim as f64 {
                return Err(HfError::Unsupported(format!(
                    "query_pre_attn_scalar {q} != head_dim {}",
                    d.head_dim
                )));
            }
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if cfg_f64(c, key)?.is_some() {
                return Err(HfError::Unsupported(format!("{key} is not supported")));
            }
        }
    }
    if arch == HfArch::Exaone4 {
        exaone4_sliding(c, d.n_layer, &k, &mut m)?;
    }
    Ok((m, rope_freqs))
}

/// EXAONE 4.0's sliding window, as llama.cpp's converter writes it: with a `sliding_window`,
/// `exaone4.attention.sliding_window` and one bool per layer from `layer_types`
/// (`sliding_attention`) or `sliding_window_pattern` (a string such as `LLLG`, repeated, or a
/// period `p`: every `p`-th layer global).
fn exaone4_sliding(
    c: &Json,
    n_layer: usize,
    k: &dyn Fn(&str) -> String,
    m: &mut Vec<(String, Value)>,
) -> Result<(), HfError> {
    let Some(window) = cfg_usize(c, "sliding_window")? else {
        return Ok(());
    };
    m.push((k("attention.sliding_window"), Value::U32(window as u32)));
    let pattern: Option<Vec<bool>> = if let Some(lt) = c.get("layer_types").and_then(Json::as_array)
    {
        let v: Option<Vec<bool>> = lt
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Some(true),
                Some("full_attention") => Some(false),
                _ => None,
            })
            .collect();
        Some(v.filter(|v| v.len() == n_layer).ok_or_else(|| {
            HfError::Config(format!(
                "layer_types (want {n_layer} of sliding_attention / full_attention)"
            ))
        })?)
    } else {
        match c.get("sliding_window_pattern") {
            Some(Json::String(p))
                if !p.is_empty() && p.chars().all(|ch| ch == 'L' || ch == 'G') =>
            {
                let p: Vec<char> = p.chars().collect();
                Some((0..n_layer).map(|i| p[i % p.len()] == 'L').collect())
            }
            Some(Json::Number(_)) => {
                let p = cfg_req(c, "sliding_window_pattern")?;
                Some((0..n_layer).map(|i| (i + 1) % p != 0).collect())
            }
            None | Some(Json::Null) => None,
            Some(other) => {
                return Err(HfError::Config(format!("sliding_window_pattern {other}")));
            }
        }
    };
    if let Some(p) = pattern {
        m.push((
            k("attention.sliding_window_pattern"),
            Value::Array(modu_gguf::Array::Bool(p)),
        ));
    }
    Ok(())
}
