//! GGUF v2/v3 container format: reader (mmap, zero-copy tensor views, strict validation) and writer.
mod types;
pub use types::{GgmlType, QK_K};
