//! Adapter files as `POST /v1/modules` reads them, validated against the Qwen base: a PEFT
//! directory (adapter_config.json + safetensors, split at the first 0xFF byte) or a GGUF-LoRA
//! file.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use modu_engine::LoraAdapter;

fuzz_target!(|data: &[u8]| {
    let m = modu_fuzz::qwen();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel & 1 == 0 {
        let (cfg, st) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let _ = LoraAdapter::from_peft_bytes(Path::new("fuzz"), cfg, st, Some(&m.shapes));
    } else if let Ok(f) = modu_gguf::GgufFile::from_bytes(rest.to_vec()) {
        let _ = LoraAdapter::from_gguf(&f, Path::new("fuzz.gguf"), Some(&m.shapes));
    }
});
