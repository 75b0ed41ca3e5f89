//! Writing an adapter as a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`),
//! the format Hugging Face tooling trains and shares. Tensors are F16 and keep the in-memory
//! layouts, which are PEFT's own: `lora_A` `(rank, n_in)`, `lora_B` `(n_out, rank)`.

use std::path::Path;

use half::f16;

use super::{f16_bytes, LoraAdapter, LoraError, Proj};

impl LoraAdapter {
    /// Write this adapter as a PEFT directory (created if missing; both files are replaced).
    ///
    /// PEFT has one `r` and one `lora_alpha` per adapter, so every tensor must share one rank; a
    /// tensor whose own scaling differs from `alpha / r` (a merge that mixed alphas) gets the
    /// difference folded into `B`. A `llama` adapter with Q/K updates is refused: its rows are in
    /// GGUF's permuted order and would have to be un-permuted to mean the same thing in PEFT.
    pub fn write_peft_dir(&self, dir: &Path, base_model: &str) -> Result<(), LoraError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoraError::Io { path, source }
        };
        let rank = self.rank();
        if let Some((_, _, t)) = self.iter().find(|(_, _, t)| t.rank != rank) {
            return Err(LoraError::Unsupported(format!(
                "PEFT needs one rank for all tensors; this adapter mixes {rank} and {}",
                t.rank
            )));
        }
        let permuted_qk = self.arch() == Some("llama")
            && self.iter().any(|(_, p, _)| matches!(p, Proj::Q | Proj::K));
        if permuted_qk {
            return Err(LoraError::Unsupported(
                "a llama adapter's Q/K rows are in GGUF order; writing them as PEFT is not supported"
                    .into(),
            ));
        }
        let file_s = if self.alpha() == 0.0 {
            1.0
        } else {
            self.alpha() / rank as f32
        };
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (il, p, t) in self.iter() {
            let block = match p {
                Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
                Proj::Gate | Proj::Up | Proj::Down => "mlp",
            };
            let stem = format!("base_model.model.model.layers.{il}.{block}.{}", p.hf_name());
            let fix = t.effective_scale(1.0) / file_s;
            let b: Vec<f16> = if fix == 1.0 {
                t.b().to_vec()
            } else {
                t.b()
                    .iter()
                    .map(|v| f16::from_f32(v.to_f32() * fix))
                    .collect()
            };
            blobs.push((
                format!("{stem}.lora_A.weight"),
                vec![t.rank, t.n_in],
                f16_bytes(t.a()),
            ));
            blobs.push((
                format!("{stem}.lora_B.weight"),
                vec![t.n_out, t.rank],
                f16_bytes(&b),
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = blobs
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| LoraError::Unsupported(format!("safetensors: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut targets: Vec<&str> = self.targets().iter().map(|p| p.hf_name()).collect();
        targets.sort_unstable();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": self.alpha(),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": false,
            "fan_in_fan_out": false,
            "target_modules": targets,
        });
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let st_path = dir.join("adapter_model.safetensors");
        safetensors::tensor::serialize_to_file(views, &None, &st_path).map_err(|e| {
            LoraError::Safetensors {
                path: st_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let cfg_path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
        Ok(())
    }
}
