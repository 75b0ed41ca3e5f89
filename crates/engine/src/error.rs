//! Errors of model loading and the forward pass.

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("GGUF: {0}")]
    Gguf(#[from] modu_gguf::GgufError),
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, gemma3, exaone, exaone4)")]
    UnsupportedArch(String),
    #[error("model has no general.architecture key")]
    NoArch,
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("bad metadata value for '{key}': {reason}")]
    BadKey { key: String, reason: String },
    #[error("missing tensor '{0}' (is this file complete and of the architecture it claims?)")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("grammar: {0}")]
    Grammar(#[from] crate::constrain::GrammarError),
    #[error("kernel: {0}")]
    Kernel(String),
    #[error("context full: {have} cached + {adding} new tokens exceeds the context size {max}")]
    ContextFull {
        have: usize,
        adding: usize,
        max: usize,
    },
    /// The KV-cache memory pool has no room for another block; free some (drop cached
    /// prefixes, preempt a sequence) and retry.
    #[error("KV cache memory exhausted: a block needs {needed} bytes, {free} of {limit} are free")]
    KvBudget {
        needed: usize,
        free: usize,
        limit: usize,
    },
    #[error("token id {id} out of range (vocabulary size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("bad request for logits: {0}")]
    BadTail(String),
    #[error("draft model: {0}")]
    DraftMismatch(String),
    #[error("empty input")]
    EmptyInput,
    #[error("module: {0}")]
    Module(#[from] crate::lora::LoraError),
}
