//! Every way a GGUF file (or a writer's input) can be rejected. Each problem has its own variant so
//! that callers and tests can tell them apart, and every message names the offending key, tensor
//! or byte offset so a user can locate the damage in the file.

use std::path::PathBuf;

use crate::GgmlType;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// Opening, mapping, creating or renaming a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing to a caller-supplied sink failed.
    #[error("I/O error while writing GGUF data: {0}")]
    Write(#[source] std::io::Error),

    #[error("file is empty (0 bytes), not a GGUF file")]
    Empty,

    #[error("file truncated: {context} needs {needed} bytes at offset {offset}, but only {available} remain")]
    Truncated {
        context: String,
        offset: u64,
        needed: u64,
        available: u64,
    },

    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\" ([47, 47, 55, 46])")]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {version} (only versions 2 and 3 are supported{})",
        if *version == 1 { "; version 1 is the obsolete pre-release format with 32-bit counts" } else { "" })]
    UnsupportedVersion { version: u32 },

    #[error("file appears to be big-endian (version field reads {version:#010x}); only little-endian GGUF is supported")]
    BigEndian { version: u32 },

    #[error("tensor count {count} is impossible: the {remaining} bytes after the header cannot hold that many tensor infos")]
    TooManyTensors { count: u64, remaining: u64 },

    #[error("metadata count {count} is impossible: the {remaining} bytes after the header cannot hold that many key/value pairs")]
    TooManyMetadata { count: u64, remaining: u64 },

    #[error("{context}: string length {len} at offset {offset} exceeds the {remaining} bytes left in the file")]
    StringTooLong {
        context: String,
        offset: u64,
        len: u64,
        remaining: u64,
    },

    #[error("{context}: invalid UTF-8 in string at offset {offset}")]
    InvalidUtf8 { context: String, offset: u64 },

    #[error("metadata key {key:?}: unknown value type id {type_id} at offset {offset}")]
    UnknownValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },

    #[error("metadata key {key:?}: arrays of arrays are not supported (offset {offset})")]
    NestedArray { key: String, offset: u64 },

    #[error("metadata key {key:?}: array length {len} at offset {offset} exceeds what the {remaining} bytes left in the file could hold")]
    ArrayTooLong {
        key: String,
        offset: u64,
        len: u64,
        remaining: u64,
    },

    #[error("metadata key {key:?}: boolean byte {value} at offset {offset} is neither 0 nor 1")]
    InvalidBool { key: String, offset: u64, value: u8 },

    #[error("duplicate metadata key {key:?}")]
    DuplicateKey { key: String },

    #[error("general.alignment = {value} is invalid: it must be a nonzero power of two that fits in 32 bits")]
    InvalidAlignment { value: u64 },

    #[error("general.alignment must be an unsigned integer, found a value of type {found}")]
    AlignmentType { found: &'static str },

    #[error("tensor {tensor:?}: {n_dims} dimensions (must be 1 to 4)")]
    BadDimCount { tensor: String, n_dims: u64 },

    #[error("tensor {tensor:?}: dimension {index} is zero")]
    ZeroDim { tensor: String, index: usize },

    #[error("tensor {tensor:?}: element count or byte size overflows 64 bits (dims {dims:?})")]
    ElementCountOverflow { tensor: String, dims: Vec<u64> },

    #[error("tensor {tensor:?}: unknown ggml type id {type_id} at offset {offset}")]
    UnknownTensorType {
        tensor: String,
        type_id: u32,
        offset: u64,
    },

    #[error("tensor {tensor:?}: row length {dim0} is not a multiple of the {ty} block size {block_size}")]
    NotBlockMultiple {
        tensor: String,
        ty: GgmlType,
        dim0: u64,
        block_size: u64,
    },

    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("tensor {tensor:?}: data [{offset}, {offset} + {size}) lies outside the {data_len}-byte data section")]
    TensorOutOfRange {
        tensor: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },

    #[error("tensors {first:?} (data [{first_start}, {first_end})) and {second:?} (starting at {second_start}) overlap")]
    OverlappingTensors {
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
    },

    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },

    #[error(
        "tensor {tensor:?}: {actual} data bytes given, but its dims and type require {expected}"
    )]
    DataSizeMismatch {
        tensor: String,
        expected: u64,
        actual: u64,
    },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
