//! GGUF writer (always version 3, little-endian).
//!
//! Input is validated with the same rules the reader enforces (unique keys and tensor names,
//! 1–4 nonzero dims, rows that are whole blocks, data length matching dims × type, a power-of-two
//! alignment), so anything it writes can be opened again. Tensor offsets are assigned in the
//! order tensors were added, each rounded up to the alignment; the data section is padded with
//! zeros to the alignment before the first tensor and after every tensor.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{GgufError, Result};
use crate::reader::{
    validate_alignment, validate_tensor_shape, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC,
};
use crate::value::{Array, Value};
use crate::{GgmlType, GgufFile};

/// Version written by [`GgufWriter`].
pub const WRITE_VERSION: u32 = 3;

#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory and writes it out in one go.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    tensor_names: HashSet<String>,
    /// Set by [`GgufWriter::set_alignment`]; overrides any `general.alignment` given to `add`.
    alignment: Option<u64>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer holding a copy of all metadata and tensors of `file` (for rewriting or editing
    /// an existing model).
    pub fn from_gguf(file: &GgufFile) -> Self {
        let mut w = GgufWriter::new();
        w.metadata = file.metadata().to_vec();
        for t in file.tensors() {
            w.tensor_names.insert(t.name.clone());
            w.tensors.push(PendingTensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                data: file.tensor_data(t).to_vec(),
            });
        }
        w
    }

    /// Alignment of the data section and of every tensor offset. Written as a `u32`
    /// `general.alignment` entry; validated (nonzero power of two, fits in 32 bits) when the
    /// file is written.
    pub fn set_alignment(&mut self, alignment: u64) -> &mut Self {
        self.alignment = Some(alignment);
        self
    }

    /// Appends a metadata entry. Duplicate keys are reported by `write_to` / `write_file` as
    /// [`GgufError::DuplicateKey`]. Adding `general.alignment` here also sets the alignment
    /// (unless [`GgufWriter::set_alignment`] was used, which wins).
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Appends a tensor. `dims` are in ggml order (`dims[0]` is the row length) and `bytes` must
    /// be exactly the size implied by `dims` and `ty`.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let name = name.into();
        let expected = validate_tensor_shape(&name, dims, ty)?;
        if bytes.len() as u64 != expected {
            return Err(GgufError::DataSizeMismatch {
                tensor: name,
                expected,
                actual: bytes.len() as u64,
            });
        }
        if self.tensor_names.contains(&name) {
            return Err(GgufError::DuplicateTensor { name });
        }
        self.tensor_names.insert(name.clone());
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data: bytes,
        });
        Ok(())
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Checks the metadata and works out the effective alignment.
    fn prepare(&self) -> Result<u64> {
        let mut seen = HashSet::with_capacity(self.metadata.len());
        for (key, _) in &self.metadata {
            if !seen.insert(key.as_str()) {
                return Err(GgufError::DuplicateKey { key: key.clone() });
            }
        }
        match self.alignment {
            Some(a) => validate_alignment(a),
            None => match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
                Some((_, v)) => crate::reader::alignment_from_value(v),
                None => Ok(DEFAULT_ALIGNMENT),
            },
        }
    }

    /// Writes the complete file to `w`. All validation happens before the first byte is
    /// written, so an invalid writer never produces partial output.
    pub fn write_to<W: Write>(&self, w: &mut W) -> Result<()> {
        let alignment = self.prepare()?;
        let mut out = Counting {
            inner: BufWriter::with_capacity(1 << 20, w),
            pos: 0,
        };
        self.emit(&mut out, alignment).map_err(GgufError::Write)?;
        out.inner.flush().map_err(GgufError::Write)
    }

    fn emit<W: Write>(&self, out: &mut Counting<W>, alignment: u64) -> io::Result<()> {
        // Metadata as written: an explicit `set_alignment` replaces a `general.alignment` entry
        // in place, or is appended if there is none.
        let override_alignment = self.alignment.map(|a| Value::U32(a as u32));
        let has_key = self.metadata.iter().any(|(k, _)| k == ALIGNMENT_KEY);
        let appended = match (&override_alignment, has_key) {
            (Some(v), false) => Some((ALIGNMENT_KEY.to_owned(), v.clone())),
            _ => None,
        };
        let n_kv = self.metadata.len() + usize::from(appended.is_some());

        out.write_all(&GGUF_MAGIC)?;
        out.write_all(&WRITE_VERSION.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(n_kv as u64).to_le_bytes())?;
        for (key, value) in self.metadata.iter().chain(appended.iter()) {
            let value = match &override_alignment {
                Some(v) if key == ALIGNMENT_KEY => v,
                _ => value,
            };
            write_string(out, key)?;
            out.write_all(&value.type_id().to_le_bytes())?;
            write_value(out, value)?;
        }

        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.ty.id().to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset = align_up(offset + t.data.len() as u64, alignment);
        }

        if !self.tensors.is_empty() {
            out.pad_to(alignment)?;
        }
        for t in &self.tensors {
            out.write_all(&t.data)?;
            out.pad_to(alignment)?;
        }
        Ok(())
    }

    /// Writes the file to `path` atomically: the bytes go to a temporary file in the same
    /// directory, which is synced and then renamed over `path`. On any error the temporary file
    /// is removed, so `path` either keeps its old content or gets the complete new one.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        // Validate before touching the file system.
        self.prepare()?;
        let tmp = temp_path(path)?;
        let io_err = |p: &Path| {
            let p = p.to_owned();
            move |source| GgufError::Io { path: p, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let result = (|| {
            self.write_to(&mut file).map_err(|e| match e {
                GgufError::Write(source) => GgufError::Io {
                    path: tmp.clone(),
                    source,
                },
                e => e,
            })?;
            file.sync_all().map_err(io_err(&tmp))?;
            drop(file);
            fs::rename(&tmp, path).map_err(io_err(path))
        })();
        if result.is_err() {
            // Best effort: the original error is the one worth reporting.
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// `.NAME.PID.N.tmp` next to `path`, so the final rename never crosses file systems.
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| GgufError::Io {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(path.with_file_name(tmp_name))
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

/// Tracks the absolute output position so padding can be computed without `Seek`.
struct Counting<W: Write> {
    inner: W,
    pos: u64,
}

impl<W: Write> Counting<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, alignment: u64) -> io::Result<()> {
        const ZEROS: [u8; 256] = [0; 256];
        let mut n = align_up(self.pos, alignment) - self.pos;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

fn write_string<W: Write>(out: &mut Counting<W>, s: &str) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn write_value<W: Write>(out: &mut Counting<W>, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => out.write_all(&x.to_le_bytes()),
        Value::I8(x) => out.write_all(&x.to_le_bytes()),
        Value::U16(x) => out.write_all(&x.to_le_bytes()),
        Value::I16(x) => out.write_all(&x.to_le_bytes()),
        Value::U32(x) => out.write_all(&x.to_le_bytes()),
        Value::I32(x) => out.write_all(&x.to_le_bytes()),
        Value::U64(x) => out.write_all(&x.to_le_bytes()),
        Value::I64(x) => out.write_all(&x.to_le_bytes()),
        Value::F32(x) => out.write_all(&x.to_le_bytes()),
        Value::F64(x) => out.write_all(&x.to_le_bytes()),
        Value::Bool(x) => out.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => write_array(out, a),
    }
}

fn write_array<W: Write>(out: &mut Counting<W>, a: &Array) -> io::Result<()> {
    out.write_all(&a.elem_type_id().to_le_bytes())?;
    out.write_all(&(a.len() as u64).to_le_bytes())?;
    macro_rules! each {
        ($v:expr) => {{
            for x in $v {
                out.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        }};
    }
    match a {
        Array::U8(v) => out.write_all(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => {
            for &b in v {
                out.write_all(&[u8::from(b)])?;
            }
            Ok(())
        }
        Array::String(v) => {
            for s in v {
                write_string(out, s)?;
            }
            Ok(())
        }
    }
}
