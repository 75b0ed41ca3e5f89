//! GGUF reader.
//!
//! # Layout (all integers little-endian)
//!
//! ```text
//! header      magic "GGUF" | version: u32 (2 or 3) | n_tensors: u64 | n_kv: u64
//! metadata    n_kv × { key: string | value_type: u32 | value }
//!             string = len: u64 | len bytes of UTF-8 (no terminator)
//!             array  = elem_type: u32 | len: u64 | len × element
//! tensor info n_tensors × { name: string | n_dims: u32 | dims: n_dims × u64 | type: u32 | offset: u64 }
//! padding     zero bytes up to the next multiple of `general.alignment` (default 32)
//! data        tensor bytes; each tensor's `offset` is relative to the start of this section
//!             and is itself a multiple of the alignment
//! ```
//!
//! Version 1 used 32-bit counts and lengths and is not accepted. Versions 2 and 3 share the
//! layout above; version 3 only announced that big-endian files may exist, which we reject.
//!
//! Everything is validated in [`GgufFile::open`] / [`GgufFile::from_bytes`], so that afterwards
//! every accessor is infallible and every tensor view is in bounds. Lengths and counts read from
//! the file are checked against the bytes that are actually left before anything is allocated
//! for them, so a corrupt or hostile file cannot make the reader allocate more than a small
//! multiple of its own size.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use crate::error::{GgufError, Result};
use crate::value::{type_id, Array, Value};
use crate::GgmlType;

/// The four magic bytes at offset 0.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// Smallest possible encoding of one metadata entry: empty key (8-byte length), type id (4), one
/// byte of value (u8/i8/bool).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible encoding of one tensor info: empty name (8), n_dims (4), one dim (8),
/// type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Upper bound for capacities reserved up front from file-provided counts. Counts are already
/// bounded by the file size; this additionally keeps the reservation small when a huge file
/// carries a bogus count, so memory only grows with entries that actually parse.
const MAX_PREALLOC: usize = 1 << 20;

/// Where a tensor lives inside the data section, and how to interpret its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension, i.e. the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Total number of elements (saturating for hand-built infos that would overflow; infos
    /// returned by [`GgufFile`] are validated and never saturate).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Size of the tensor data in bytes, or `None` if the row length is not a whole number of
    /// blocks or the size overflows.
    pub fn checked_n_bytes(&self) -> Option<u64> {
        tensor_n_bytes(&self.dims, self.ty)
    }

    /// Size of the tensor data in bytes (`u64::MAX` for an invalid hand-built info; infos
    /// returned by [`GgufFile`] are validated).
    pub fn n_bytes(&self) -> u64 {
        self.checked_n_bytes().unwrap_or(u64::MAX)
    }

    /// Length of one row (`dims[0]`), 0 for an info without dims.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Number of rows: the product of all dims but the first.
    pub fn n_rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// Bytes taken by a tensor: quantized blocks run along `dims[0]` only, so a row must be a whole
/// number of blocks and the size is `row_bytes(dims[0]) × Π dims[1..]`.
pub(crate) fn tensor_n_bytes(dims: &[u64], ty: GgmlType) -> Option<u64> {
    let (&d0, rest) = dims.split_first()?;
    let row = ty.row_bytes(d0)?;
    rest.iter().try_fold(row, |acc, &d| acc.checked_mul(d))
}

/// Checks dims and type of one tensor (shared by reader and writer) and returns its byte size.
pub(crate) fn validate_tensor_shape(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    if dims.is_empty() || dims.len() > 4 {
        return Err(GgufError::BadDimCount {
            tensor: name.to_owned(),
            n_dims: dims.len() as u64,
        });
    }
    if let Some(index) = dims.iter().position(|&d| d == 0) {
        return Err(GgufError::ZeroDim {
            tensor: name.to_owned(),
            index,
        });
    }
    let overflow = || GgufError::ElementCountOverflow {
        tensor: name.to_owned(),
        dims: dims.to_vec(),
    };
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let block_size = ty.block_size() as u64;
    if dims[0] % block_size != 0 {
        return Err(GgufError::NotBlockMultiple {
            tensor: name.to_owned(),
            ty,
            dim0: dims[0],
            block_size,
        });
    }
    tensor_n_bytes(dims, ty).ok_or_else(overflow)
}

pub(crate) fn validate_alignment(value: u64) -> Result<u64> {
    if value == 0 || !value.is_power_of_two() || value > u64::from(u32::MAX) {
        return Err(GgufError::InvalidAlignment { value });
    }
    Ok(value)
}

/// Backing bytes: a read-only memory map of the file, a private read-only copy of it
/// ([`GgufFile::open_resident`]: `len` bytes from `off` in an anonymous mapping), or an owned
/// buffer for in-memory data.
enum Storage {
    Mmap(memmap2::Mmap),
    Resident {
        map: memmap2::Mmap,
        off: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Resident { map, off, len } => &map[*off..*off + *len],
            Storage::Owned(v) => v,
        }
    }
}

/// Transparent huge page size on x86-64 and aarch64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A parsed, fully validated GGUF file. Tensor data is not copied: [`GgufFile::tensor_data`]
/// returns slices of the memory map (or of the buffer given to [`GgufFile::from_bytes`]).
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    /// Absolute file offset of the data section.
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Names of the tensors rewritten by [`GgufFile::open_resident_with`]'s hook.
    prepared: HashSet<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.storage.bytes().len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    ///
    /// The file must not be modified or truncated by anyone while the returned value is alive:
    /// like every mmap-based loader, the tensor views would then change underneath (or, for a
    /// truncation, fault). Model files are written once and then only read, which is what this
    /// relies on.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            return Err(GgufError::Empty);
        }
        // SAFETY: the file is opened read-only and mapped read-only and private, so this process
        // never writes through the mapping. The `Mmap` is owned by the returned `GgufFile`, and
        // every slice handed out borrows from it, so no view outlives the mapping. The remaining
        // hazard, another process modifying or truncating the file while it is mapped, cannot be
        // excluded by any API; it is a documented precondition of `open` (see above).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        Self::parse(Storage::Mmap(map))
    }

    /// Reads the whole file into private memory (made read-only once filled) and validates it.
    ///
    /// Why not [`GgufFile::open`]: a memory map of the file is made of 4 KiB pages, and the
    /// hardware prefetchers stop at every page boundary while decoding streams all weights once
    /// per token; the private copy is 2 MiB-aligned and advised for transparent huge pages
    /// (`MADV_HUGEPAGE`, effective where the kernel enables them in `madvise` or `always`
    /// mode), which made the weight pass of a decode step ~15 % faster on a 2-core EPYC. The
    /// costs: the pages are not shared with other processes mapping the same file, loading
    /// reads the whole file up front, and resident memory is the file size (decoding touches
    /// every weight page anyway). The file is read with `read`, not through a mapping, so its
    /// page-cache pages are never counted in this process's resident memory. Later changes to
    /// the file do not affect the copy.
    pub fn open_resident(path: impl AsRef<Path>) -> Result<GgufFile> {
        Self::open_resident_with(path, |_, _| false)
    }

    /// [`GgufFile::open_resident`], letting `prepare` rewrite tensors' bytes in the private
    /// copy before it is made read-only (e.g. into a layout that a kernel reads faster). For
    /// each tensor it gets the info and the bytes, and returns whether it rewrote them;
    /// [`GgufFile::is_prepared`] reports that later, so that readers know the bytes are no
    /// longer in the file's format.
    pub fn open_resident_with(
        path: impl AsRef<Path>,
        prepare: impl Fn(&TensorInfo, &mut [u8]) -> bool,
    ) -> Result<GgufFile> {
        use std::io::Read;
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            return Err(GgufError::Empty);
        }
        let (len, total) = usize::try_from(len)
            .ok()
            .and_then(|l| Some((l, l.checked_add(HUGE_PAGE)?)))
            .ok_or_else(|| {
                io_err(std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    "file larger than the address space",
                ))
            })?;
        let mut map = memmap2::MmapMut::map_anon(total).map_err(io_err)?;
        let off = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        {
            // Best effort: without huge pages the copy still works, with base pages.
            let _ = map.advise_range(memmap2::Advice::HugePage, off, len);
        }
        file.read_exact(&mut map[off..off + len]).map_err(io_err)?;
        let parsed = Parser::new(&map[off..off + len]).parse()?;
        let mut prepared = HashSet::new();
        for t in &parsed.tensors {
            // Validated by the parse: every tensor lies inside the file.
            let range = tensor_range(parsed.data_offset, t);
            if let Some(bytes) = range.and_then(|r| map.get_mut(off + r.start..off + r.end)) {
                if prepare(t, bytes) {
                    prepared.insert(t.name.clone());
                }
            }
        }
        let map = map.make_read_only().map_err(io_err)?;
        let mut file = Self::from_parsed(Storage::Resident { map, off, len }, parsed);
        file.prepared = prepared;
        Ok(file)
    }

    /// Validates an in-memory GGUF image, taking ownership of the bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile> {
        let parsed = Parser::new(storage.bytes()).parse()?;
        Ok(Self::from_parsed(storage, parsed))
    }

    fn from_parsed(storage: Storage, parsed: Parsed) -> GgufFile {
        GgufFile {
            storage,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
            prepared: HashSet::new(),
        }
    }

    /// Whether the `prepare` hook of [`GgufFile::open_resident_with`] rewrote this tensor's
    /// bytes (always false for the other constructors).
    pub fn is_prepared(&self, info: &TensorInfo) -> bool {
        !self.prepared.is_empty() && self.prepared.contains(&info.name)
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of tensor offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// Any integer type with a non-negative value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Any integer type whose value fits in `i64`.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// `f32` or `f64`.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// `f64` or `f32`.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }

    /// `general.architecture` (e.g. `"llama"`, `"qwen2"`, `"gemma3"`), the prefix of most
    /// model-specific keys.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, borrowed from the mapping. For infos obtained from this file the
    /// range is always in bounds (checked when the file was opened); an info that does not
    /// describe a range of this file's data section yields an empty slice.
    ///
    /// The slice starts at a multiple of [`GgufFile::alignment`] from the start of the file. For
    /// [`GgufFile::open`] the mapping itself is page-aligned (for [`GgufFile::open_resident`]
    /// the copy is 2 MiB-aligned), so the slice's address is aligned too; for
    /// [`GgufFile::from_bytes`] only the allocator's alignment of the `Vec` applies.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        tensor_range(self.data_offset, info)
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }

    /// Info and bytes of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensor_info(name)?;
        Some((info, self.tensor_data(info)))
    }
}

/// Byte range of a tensor's data in the file (`None` on overflow).
fn tensor_range(data_offset: u64, info: &TensorInfo) -> Option<std::ops::Range<usize>> {
    let start = data_offset.checked_add(info.offset)?;
    let end = start.checked_add(info.checked_n_bytes()?)?;
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

/// Result of a successful parse, before it is joined with its storage.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// Low-level read failure, turned into a [`GgufError`] once the caller adds what it was reading.
enum Raw {
    Short {
        offset: u64,
        needed: u64,
        available: u64,
    },
    TooLong {
        offset: u64,
        len: u64,
        remaining: u64,
    },
    Utf8 {
        offset: u64,
    },
}

impl Raw {
    fn at(self, context: String) -> GgufError {
        match self {
            Raw::Short {
                offset,
                needed,
                available,
            } => GgufError::Truncated {
                context,
                offset,
                needed,
                available,
            },
            Raw::TooLong {
                offset,
                len,
                remaining,
            } => GgufError::StringTooLong {
                context,
                offset,
                len,
                remaining,
            },
            Raw::Utf8 { offset } => GgufError::InvalidUtf8 { context, offset },
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Raw> {
        let available = self.remaining();
        if n > available {
            return Err(Raw::Short {
                offset: self.offset(),
                needed: n,
                available,
            });
        }
        // `n <= available`, which is a `usize` length, so the cast is lossless.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Raw> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Raw> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Raw> {
        self.array().map(u64::from_le_bytes)
    }

    /// Length-prefixed UTF-8 string. The length is checked against the remaining bytes before
    /// anything is allocated. A length that runs past the end but not past the file size reads
    /// as a truncated file; one larger than the whole file can only be a corrupt length.
    fn string(&mut self) -> Result<String, Raw> {
        let len = self.u64()?;
        let offset = self.offset();
        let remaining = self.remaining();
        if len > remaining && len <= self.buf.len() as u64 {
            return Err(Raw::Short {
                offset,
                needed: len,
                available: remaining,
            });
        }
        if len > remaining {
            return Err(Raw::TooLong {
                offset: offset - 8,
                len,
                remaining,
            });
        }
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(Raw::Utf8 { offset }),
        }
    }
}

/// Decodes `len` little-endian scalars of `$size` bytes each.
macro_rules! scalar_vec {
    ($bytes:expr, $t:ty, $size:expr) => {
        $bytes
            .chunks_exact($size)
            .map(|c| {
                let mut a = [0u8; $size];
                a.copy_from_slice(c);
                <$t>::from_le_bytes(a)
            })
            .collect::<Vec<$t>>()
    };
}

struct Parser<'a> {
    c: Cursor<'a>,
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Parser {
            c: Cursor { buf, pos: 0 },
        }
    }

    fn parse(mut self) -> Result<Parsed> {
        if self.c.buf.is_empty() {
            return Err(GgufError::Empty);
        }
        let magic: [u8; 4] = self.c.array().map_err(|r| r.at("magic".into()))?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.c.u32().map_err(|r| r.at("version".into()))?;
        match version {
            2 | 3 => {}
            v if matches!(v.swap_bytes(), 2 | 3) => return Err(GgufError::BigEndian { version }),
            _ => return Err(GgufError::UnsupportedVersion { version }),
        }
        let n_tensors = self.c.u64().map_err(|r| r.at("tensor count".into()))?;
        let n_kv = self.c.u64().map_err(|r| r.at("metadata count".into()))?;

        let remaining = self.c.remaining();
        if n_kv > remaining / MIN_KV_BYTES {
            return Err(GgufError::TooManyMetadata {
                count: n_kv,
                remaining,
            });
        }
        // Both products are at most `remaining`, so neither they nor their sum overflow.
        if n_tensors > remaining / MIN_TENSOR_INFO_BYTES
            || n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > remaining
        {
            return Err(GgufError::TooManyTensors {
                count: n_tensors,
                remaining,
            });
        }

        let (metadata, key_index) = self.metadata(n_kv)?;
        let alignment = match key_index.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => alignment_from_value(&metadata[i].1)?,
        };
        let (tensors, tensor_index) = self.tensor_infos(n_tensors, alignment)?;

        // The data section starts at the first aligned position after the tensor infos. A file
        // without tensors may end before that position.
        let data_offset = self
            .c
            .offset()
            .checked_next_multiple_of(alignment)
            .unwrap_or(u64::MAX);
        let data_len = (self.c.buf.len() as u64).saturating_sub(data_offset);
        check_tensor_ranges(&tensors, data_len)?;

        Ok(Parsed {
            version,
            alignment,
            data_offset,
            metadata,
            key_index,
            tensors,
            tensor_index,
        })
    }

    #[allow(clippy::type_complexity)]
    fn metadata(&mut self, n_kv: u64) -> Result<(Vec<(String, Value)>, HashMap<String, usize>)> {
        // `n_kv` is bounded by the file size (checked by the caller), and capped here.
        let cap = (n_kv as usize).min(MAX_PREALLOC);
        let mut metadata = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for i in 0..n_kv {
            let key = self
                .c
                .string()
                .map_err(|r| r.at(format!("key of metadata entry {i}")))?;
            let type_offset = self.c.offset();
            let ty = self
                .c
                .u32()
                .map_err(|r| r.at(format!("value type of metadata key {key:?}")))?;
            let value = self.value(&key, ty, type_offset)?;
            if index.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key });
            }
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }
        Ok((metadata, index))
    }

    fn value(&mut self, key: &str, ty: u32, type_offset: u64) -> Result<Value> {
        use type_id as t;
        let ctx = |r: Raw| r.at(format!("value of metadata key {key:?}"));
        let c = &mut self.c;
        Ok(match ty {
            t::U8 => Value::U8(c.array().map(u8::from_le_bytes).map_err(ctx)?),
            t::I8 => Value::I8(c.array().map(i8::from_le_bytes).map_err(ctx)?),
            t::U16 => Value::U16(c.array().map(u16::from_le_bytes).map_err(ctx)?),
            t::I16 => Value::I16(c.array().map(i16::from_le_bytes).map_err(ctx)?),
            t::U32 => Value::U32(c.array().map(u32::from_le_bytes).map_err(ctx)?),
            t::I32 => Value::I32(c.array().map(i32::from_le_bytes).map_err(ctx)?),
            t::U64 => Value::U64(c.array().map(u64::from_le_bytes).map_err(ctx)?),
            t::I64 => Value::I64(c.array().map(i64::from_le_bytes).map_err(ctx)?),
            t::F32 => Value::F32(c.array().map(f32::from_le_bytes).map_err(ctx)?),
            t::F64 => Value::F64(c.array().map(f64::from_le_bytes).map_err(ctx)?),
            t::BOOL => {
                let offset = c.offset();
                let [b] = c.array().map_err(ctx)?;
                Value::Bool(bool_byte(key, offset, b)?)
            }
            t::STRING => Value::String(c.string().map_err(ctx)?),
            t::ARRAY => Value::Array(self.array(key)?),
            type_id => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id,
                    offset: type_offset,
                })
            }
        })
    }

    fn array(&mut self, key: &str) -> Result<Array> {
        use type_id as t;
        let c = &mut self.c;
        let elem_offset = c.offset();
        let elem = c
            .u32()
            .map_err(|r| r.at(format!("element type of array {key:?}")))?;
        let elem_size: u64 = match elem {
            t::U8 | t::I8 | t::BOOL => 1,
            t::U16 | t::I16 => 2,
            t::U32 | t::I32 | t::F32 => 4,
            t::U64 | t::I64 | t::F64 => 8,
            // Smallest string: its 8-byte length prefix.
            t::STRING => 8,
            t::ARRAY => {
                return Err(GgufError::NestedArray {
                    key: key.to_owned(),
                    offset: elem_offset,
                })
            }
            type_id => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id,
                    offset: elem_offset,
                })
            }
        };
        let len_offset = c.offset();
        let len = c
            .u64()
            .map_err(|r| r.at(format!("length of array {key:?}")))?;
        let remaining = c.remaining();
        if len > remaining / elem_size {
            return Err(GgufError::ArrayTooLong {
                key: key.to_owned(),
                offset: len_offset,
                len,
                remaining,
            });
        }

        if elem == t::STRING {
            let mut v = Vec::with_capacity((len as usize).min(MAX_PREALLOC));
            for i in 0..len {
                let s = c
                    .string()
                    .map_err(|r| r.at(format!("element {i} of array {key:?}")))?;
                v.push(s);
            }
            return Ok(Array::String(v));
        }

        // Fixed-size elements: `len * elem_size <= remaining`, checked above.
        let data_offset = c.offset();
        let bytes = c
            .take(len * elem_size)
            .map_err(|r| r.at(format!("elements of array {key:?}")))?;
        Ok(match elem {
            t::U8 => Array::U8(bytes.to_vec()),
            t::I8 => Array::I8(bytes.iter().map(|&b| b as i8).collect()),
            t::BOOL => {
                let mut v = Vec::with_capacity(bytes.len());
                for (i, &b) in bytes.iter().enumerate() {
                    v.push(bool_byte(key, data_offset + i as u64, b)?);
                }
                Array::Bool(v)
            }
            t::U16 => Array::U16(scalar_vec!(bytes, u16, 2)),
            t::I16 => Array::I16(scalar_vec!(bytes, i16, 2)),
            t::U32 => Array::U32(scalar_vec!(bytes, u32, 4)),
            t::I32 => Array::I32(scalar_vec!(bytes, i32, 4)),
            t::F32 => Array::F32(scalar_vec!(bytes, f32, 4)),
            t::U64 => Array::U64(scalar_vec!(bytes, u64, 8)),
            t::I64 => Array::I64(scalar_vec!(bytes, i64, 8)),
            t::F64 => Array::F64(scalar_vec!(bytes, f64, 8)),
            // Every other id returned early above; kept as an error rather than a panic.
            type_id => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id,
                    offset: elem_offset,
                })
            }
        })
    }

    fn tensor_infos(
        &mut self,
        n_tensors: u64,
        alignment: u64,
    ) -> Result<(Vec<TensorInfo>, HashMap<String, usize>)> {
        let cap = (n_tensors as usize).min(MAX_PREALLOC);
        let mut tensors = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for i in 0..n_tensors {
            let c = &mut self.c;
            let name = c
                .string()
                .map_err(|r| r.at(format!("name of tensor {i}")))?;
            let n_dims = c
                .u32()
                .map_err(|r| r.at(format!("dimension count of tensor {name:?}")))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::BadDimCount {
                    tensor: name,
                    n_dims: n_dims.into(),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(
                    c.u64()
                        .map_err(|r| r.at(format!("dimensions of tensor {name:?}")))?,
                );
            }
            let type_offset = c.offset();
            let type_id = c
                .u32()
                .map_err(|r| r.at(format!("type of tensor {name:?}")))?;
            let offset = c
                .u64()
                .map_err(|r| r.at(format!("data offset of tensor {name:?}")))?;

            let Some(ty) = GgmlType::from_u32(type_id) else {
                return Err(GgufError::UnknownTensorType {
                    tensor: name,
                    type_id,
                    offset: type_offset,
                });
            };
            validate_tensor_shape(&name, &dims, ty)?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedOffset {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            if index.contains_key(&name) {
                return Err(GgufError::DuplicateTensor { name });
            }
            index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        Ok((tensors, index))
    }
}

fn bool_byte(key: &str, offset: u64, b: u8) -> Result<bool> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(GgufError::InvalidBool {
            key: key.to_owned(),
            offset,
            value,
        }),
    }
}

pub(crate) fn alignment_from_value(v: &Value) -> Result<u64> {
    match v {
        Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => {
            validate_alignment(v.as_u64().unwrap_or(0))
        }
        // A signed type is tolerated if the value is positive.
        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => match v.as_u64() {
            Some(a) => validate_alignment(a),
            None => Err(GgufError::AlignmentType {
                found: v.type_name(),
            }),
        },
        _ => Err(GgufError::AlignmentType {
            found: v.type_name(),
        }),
    }
}

/// Every tensor must lie inside the data section and no two may share bytes.
fn check_tensor_ranges(tensors: &[TensorInfo], data_len: u64) -> Result<()> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        // Shapes were validated, so the size is known to fit.
        let size = t.n_bytes();
        match t.offset.checked_add(size) {
            Some(end) if end <= data_len => ranges.push((t.offset, end, i)),
            _ => {
                return Err(GgufError::TensorOutOfRange {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    size,
                    data_len,
                })
            }
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let (a_start, a_end, a) = w[0];
        let (b_start, _, b) = w[1];
        if b_start < a_end {
            return Err(GgufError::OverlappingTensors {
                first: tensors[a].name.clone(),
                first_start: a_start,
                first_end: a_end,
                second: tensors[b].name.clone(),
                second_start: b_start,
            });
        }
    }
    Ok(())
}
