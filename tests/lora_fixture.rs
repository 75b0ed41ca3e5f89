//! The LoRA test adapters, shared by the test suites of several crates (each includes this file
//! with `#[path]`). The two llama.cpp GGUF-LoRA adapters the LoRA goldens were made with live in
//! the repository (`tests/golden/lora/lora-a.gguf`, `lora-b.gguf`). Their PEFT twins (the same
//! numbers as `adapter_config.json` + `adapter_model.safetensors`) are read from
//! `../shared/golden/lora` beside the repository when it is there, and otherwise written from the
//! GGUF files by modu's own PEFT writer into the target directory, once per test process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;

fn repo() -> PathBuf {
    // Every including crate sits at crates/<name>.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of a LoRA fixture: `lora-a.gguf`, `lora-b.gguf`, `peft-lora-a` or `peft-lora-b`.
pub fn lora(name: &str) -> PathBuf {
    if let Some(stem) = name.strip_prefix("peft-") {
        let shared = repo().join("../shared/golden/lora").join(name);
        if shared.join("adapter_model.safetensors").is_file() {
            return shared;
        }
        return generated_peft(stem);
    }
    let p = repo().join("tests/golden/lora").join(name);
    assert!(
        p.is_file(),
        "LoRA fixture missing from the repository: {}",
        p.display()
    );
    p
}

fn generated_peft(stem: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir()
        .join(format!("modu-peft-fixtures-{}", std::process::id()))
        .join(format!("peft-{stem}"));
    if !dir.join("adapter_config.json").is_file() {
        let gguf = lora(&format!("{stem}.gguf"));
        let ad = modu_engine::LoraAdapter::open(&gguf, None)
            .unwrap_or_else(|e| panic!("reading {}: {e}", gguf.display()));
        ad.write_peft_dir(&dir, "Qwen/Qwen2.5-Coder-0.5B-Instruct")
            .unwrap_or_else(|e| panic!("writing {}: {e}", dir.display()));
    }
    dir
}
