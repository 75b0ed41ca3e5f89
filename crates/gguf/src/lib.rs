//! GGUF v2/v3 container format: reader (mmap, zero-copy tensor views, strict validation) and
//! writer.
//!
//! See [`reader`] for the byte layout. The reader validates the whole file up front (header,
//! metadata, tensor infos, tensor ranges) so that every accessor afterwards is infallible; the
//! writer applies the same rules to its input so it can only produce files the reader accepts.
// `is_multiple_of` needs Rust 1.87; the workspace MSRV is 1.80.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

mod error;
pub mod reader;
mod types;
mod value;
mod writer;

pub use error::{GgufError, Result};
pub use reader::{GgufFile, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use types::{GgmlType, QK_K};
pub use value::{Array, Value};
pub use writer::{GgufWriter, WRITE_VERSION};
