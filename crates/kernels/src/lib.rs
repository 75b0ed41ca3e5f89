//! modu-kernels: ggml tensor formats, dequantization, activation quantization, dot products and
//! matrix multiplication for CPU inference.
//!
//! * [`blocks`]: `#[repr(C)]` block layouts of every format.
//! * [`scalar`]: scalar reference implementations (define the numerics).
//! * AVX2+FMA kernels (x86_64) are picked at run time when the CPU supports them, and on
//!   AVX-512 VNNI CPUs 16-row kernels for matmuls of several tokens; `MODU_KERNELS=scalar`,
//!   `avx2` or `avx512` in the environment forces a lower level ([`simd_level`]).
//! * [`matmul`] / [`matmul_quantized`]: weights × activations, parallel over weight rows.
//!
//! ```
//! use modu_kernels::{matmul, matmul_quantized, quantize_activations, vec_dot_type, GgmlType, QMatrix};
//! // W = [[1, 2, 3], [4, 5, 6]] in F32, two tokens x0 = [1, 1, 1], x1 = [1, 0, -1].
//! let bytes: Vec<u8> = [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let w = QMatrix::new(GgmlType::F32, 2, 3, &bytes)?;
//! let x = [1f32, 1., 1., 1., 0., -1.];
//! let mut y = [0f32; 4]; // y[t * rows + r]
//! matmul(&w, &x, 2, &mut y)?;
//! assert_eq!(y, [6., 15., -2., -2.]);
//!
//! // Quantize activations once and reuse them for every matrix with the same dot type
//! // (e.g. the Q, K and V projections).
//! let qa = quantize_activations(vec_dot_type(w.ty)?, &x, 2, 3)?;
//! matmul_quantized(&w, &qa, &mut y)?;
//! assert_eq!(y, [6., 15., -2., -2.]);
//! # Ok::<(), modu_kernels::KernelError>(())
//! ```

// `is_multiple_of` needs Rust 1.87; kept as `%` for readability next to the SIMD code.
#![allow(clippy::manual_is_multiple_of)]

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod blocks;
mod dispatch;
#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod layout;
mod matmul;
pub mod pool;
mod q32;
#[cfg(target_arch = "x86_64")]
mod q32x16;
#[cfg(target_arch = "x86_64")]
mod q32x8;
#[cfg(target_arch = "x86_64")]
mod qk16;
#[cfg(target_arch = "x86_64")]
mod qk8;
pub mod quantize;
pub mod scalar;
#[doc(hidden)]
pub mod testutil;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use blocks::*;
pub use dispatch::*;
pub use layout::Layout;
pub use matmul::{
    matmul, matmul_quantized, matmul_quantized_many, quantize_activations, vec_dot_type,
    ActivationData, QuantizedActivations,
};
pub use modu_gguf::GgmlType;
pub use quantize::{quantize_row, QUANTIZE_TYPES};

/// Errors from the kernel entry points: all are caller mistakes in sizes or types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("tensor type {0} is not supported by this operation")]
    UnsupportedType(GgmlType),
    #[error("{n} elements is not a whole number of {ty} blocks ({block} elements each)")]
    NotBlockMultiple {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("{what}: expected {expected} {unit}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
        unit: &'static str,
    },
    #[error("activations are {got}, but {weight} weights need {expected}")]
    ActivationType {
        weight: GgmlType,
        expected: GgmlType,
        got: GgmlType,
    },
    #[error("activations have {got} columns, weights have {expected}")]
    Columns { expected: usize, got: usize },
    #[error("size overflow")]
    Overflow,
    #[error("value {index} is not finite (NaN or infinite); refusing to quantize")]
    NonFinite { index: usize },
    #[error("value {index} is beyond ±65504, the f16 range of {ty}'s values/scales")]
    TooLarge { index: usize, ty: GgmlType },
}

/// A row-major weight matrix in a ggml format: `rows` rows of `cols` elements, each row
/// `ty.row_bytes(cols)` bytes.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    /// How the rows are arranged in `data` ([`Layout::Ggml`] for bytes straight from a file).
    pub layout: Layout,
}

impl<'a> QMatrix<'a> {
    /// Build and validate a matrix view.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        Self::with_layout(ty, rows, cols, data, Layout::Ggml)
    }

    /// As [`QMatrix::new`] for rows in `layout` (see [`layout::group_rows`]).
    pub fn with_layout(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
        layout: Layout,
    ) -> Result<Self, KernelError> {
        let m = QMatrix {
            ty,
            rows,
            cols,
            data,
            layout,
        };
        m.validate()?;
        Ok(m)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> Result<usize, KernelError> {
        row_bytes(self.ty, self.cols)
    }

    /// Check that `data` holds exactly `rows` rows of a supported type.
    pub fn validate(&self) -> Result<(), KernelError> {
        vec_dot_type(self.ty)?;
        match self.layout {
            Layout::Ggml => {}
            Layout::Grouped8 if self.ty == GgmlType::Q5_0 => {}
            Layout::Interleaved8
                if layout::interleaved_block_bytes(self.ty).is_some()
                    && self.rows % layout::INTERLEAVE == 0 => {}
            _ => return Err(KernelError::UnsupportedType(self.ty)),
        }
        let rb = self.row_bytes()?;
        let total = rb.checked_mul(self.rows).ok_or(KernelError::Overflow)?;
        if self.data.len() != total {
            return Err(KernelError::Length {
                what: "weight data",
                expected: total,
                got: self.data.len(),
                unit: "bytes",
            });
        }
        Ok(())
    }

    /// The bytes of row `r`, in the matrix's layout (`None` if out of range or the matrix is
    /// malformed).
    pub fn row(&self, r: usize) -> Option<&'a [u8]> {
        let rb = self.row_bytes().ok()?;
        self.data
            .get(r.checked_mul(rb)?..r.checked_add(1)?.checked_mul(rb)?)
    }

    /// Dequantize row `r` into `dst` (`dst.len() == cols`), e.g. an embedding lookup.
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows {
            return Err(KernelError::Length {
                what: "row index",
                expected: self.rows,
                got: r,
                unit: "rows",
            });
        }
        if dst.len() != self.cols {
            return Err(KernelError::Columns {
                expected: self.cols,
                got: dst.len(),
            });
        }
        let src = self.row(r).ok_or(KernelError::Length {
            what: "weight data",
            expected: self.rows.saturating_mul(self.row_bytes()?),
            got: self.data.len(),
            unit: "bytes",
        })?;
        match self.layout {
            Layout::Ggml => dequantize_row(self.ty, src, dst),
            Layout::Grouped8 => {
                let mut plain = vec![0u8; src.len()];
                layout::ungroup_rows(self.ty, self.cols, src, &mut plain)?;
                dequantize_row(self.ty, &plain, dst)
            }
            Layout::Interleaved8 => {
                let mut plain = vec![0u8; src.len()];
                layout::interleaved_row(self.ty, self.cols, self.data, r, &mut plain)?;
                dequantize_row(self.ty, &plain, dst)
            }
        }
    }

    /// The same matrix in ggml's layout: borrowed as is, or ungrouped into `buf`.
    pub(crate) fn as_ggml<'b>(&'b self, buf: &'b mut Vec<u8>) -> Result<QMatrix<'b>, KernelError> {
        match self.layout {
            Layout::Ggml => Ok(*self),
            other => {
                buf.resize(self.data.len(), 0);
                layout::from_layout(self.ty, self.cols, self.data, buf, other)?;
                QMatrix::new(self.ty, self.rows, self.cols, buf)
            }
        }
    }
}

/// Bytes of `n` elements of `ty`, checking the block multiple.
pub fn row_bytes(ty: GgmlType, n: usize) -> Result<usize, KernelError> {
    let bs = ty.block_size();
    if n % bs != 0 {
        return Err(KernelError::NotBlockMultiple { ty, n, block: bs });
    }
    (n / bs)
        .checked_mul(ty.type_size())
        .ok_or(KernelError::Overflow)
}

/// Dequantize one row (or any whole number of blocks): `dst.len()` elements from `src`, which
/// must be exactly `ty.row_bytes(dst.len())` bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    use GgmlType as T;
    let need = row_bytes(ty, dst.len())?;
    if src.len() != need {
        return Err(KernelError::Length {
            what: "dequantize source",
            expected: need,
            got: src.len(),
            unit: "bytes",
        });
    }
    macro_rules! q {
        ($f:path) => {
            $f(blocks::as_blocks(src).ok_or(KernelError::Overflow)?, dst)
        };
    }
    match ty {
        T::F32 => scalar::dequantize_f32(src, dst),
        T::F16 => dispatch::dequantize_f16(src, dst),
        T::BF16 => scalar::dequantize_bf16(src, dst),
        T::Q4_0 => q!(scalar::dequantize_q4_0),
        T::Q4_1 => q!(scalar::dequantize_q4_1),
        T::Q5_0 => q!(scalar::dequantize_q5_0),
        T::Q5_1 => q!(scalar::dequantize_q5_1),
        T::Q8_0 => q!(scalar::dequantize_q8_0),
        T::Q2_K => q!(scalar::dequantize_q2_k),
        T::Q3_K => q!(scalar::dequantize_q3_k),
        T::Q4_K => q!(scalar::dequantize_q4_k),
        T::Q5_K => q!(scalar::dequantize_q5_k),
        T::Q6_K => q!(scalar::dequantize_q6_k),
        other => return Err(KernelError::UnsupportedType(other)),
    }
    Ok(())
}
