//! modu-gguf
