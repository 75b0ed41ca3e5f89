//! Block layouts of the ggml quantization formats.
//!
//! Weight blocks contain only byte arrays, so they have alignment 1 and every bit pattern is a
//! valid value: a byte slice of the right length can be viewed as a slice of blocks wherever it
//! lies in memory (an mmap, a `Vec<u8>`). Half-precision fields are stored as little-endian
//! bytes. The activation-only block `BlockQ8K` uses native
//! types because it only ever lives in buffers this crate allocates.

use half::f16;
use modu_gguf::{GgmlType, QK_K};

/// Elements per block of the simple (non-K) formats.
pub const QK: usize = 32;

#[inline(always)]
pub(crate) fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

#[inline(always)]
pub(crate) fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// 32 weights: `x = d * (q - 8)`, `q` 4 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    /// Element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble.
    pub qs: [u8; QK / 2],
}

/// 32 weights: `x = d * q + m`, `q` 4 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// 32 weights: `x = d * (q - 16)`, `q` 5 bits (fifth bit of element `j` is bit `j` of `qh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 weights: `x = d * q + m`, `q` 5 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 values: `x = d * q`, `q` a signed byte. Weight format and activation format.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; QK],
}

/// 32 activations: `x = d * q`; `s = d * Σ q` (activation format of Q4_1 / Q5_1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; QK],
}

/// 256 weights in 16 groups of 16: `x = d * (sc & 15) * q - dmin * (sc >> 4)`, `q` 2 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: [u8; 2],
    pub dmin: [u8; 2],
}

/// 256 weights in 16 groups of 16: `x = d * (scale - 32) * (q - 4 * !hbit)`, 6-bit scales.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: [u8; 2],
}

/// 256 weights in 8 groups of 32: `x = d * sc * q - dmin * m`, 6-bit `sc`/`m`, `q` 4 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// 256 weights in 8 groups of 32: as Q4_K with a fifth bit per weight in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 256 weights in 16 groups of 16: `x = d * sc * (q - 32)`, `q` 6 bits, `sc` a signed byte.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: [u8; 2],
}

/// 256 activations: `x = d * q`, with the sums of each group of 16 `q` (activation format of
/// the K-quants).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// Byte blocks that may be viewed in place from any byte slice.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, have alignment 1, no padding, and accept every bit
/// pattern (only `u8`/`i8` arrays as fields).
pub unsafe trait ByteBlock: Copy + Sync + 'static {
    /// The on-disk type whose blocks these are.
    const TYPE: GgmlType;
}

macro_rules! byte_block {
    ($t:ty, $ty:expr) => {
        // SAFETY: all fields are u8/i8 arrays under #[repr(C)] (alignment 1, no padding, any
        // bit pattern valid); the size is checked against the format below.
        unsafe impl ByteBlock for $t {
            const TYPE: GgmlType = $ty;
        }
        const _: () = assert!(std::mem::align_of::<$t>() == 1);
    };
}

byte_block!(BlockQ4_0, GgmlType::Q4_0);
byte_block!(BlockQ4_1, GgmlType::Q4_1);
byte_block!(BlockQ5_0, GgmlType::Q5_0);
byte_block!(BlockQ5_1, GgmlType::Q5_1);
byte_block!(BlockQ8_0, GgmlType::Q8_0);
byte_block!(BlockQ8_1, GgmlType::Q8_1);
byte_block!(BlockQ2K, GgmlType::Q2_K);
byte_block!(BlockQ3K, GgmlType::Q3_K);
byte_block!(BlockQ4K, GgmlType::Q4_K);
byte_block!(BlockQ5K, GgmlType::Q5_K);
byte_block!(BlockQ6K, GgmlType::Q6_K);

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<BlockQ4_0>() == 18);
    assert!(size_of::<BlockQ4_1>() == 20);
    assert!(size_of::<BlockQ5_0>() == 22);
    assert!(size_of::<BlockQ5_1>() == 24);
    assert!(size_of::<BlockQ8_0>() == 34);
    assert!(size_of::<BlockQ8_1>() == 36);
    assert!(size_of::<BlockQ2K>() == 84);
    assert!(size_of::<BlockQ3K>() == 110);
    assert!(size_of::<BlockQ4K>() == 144);
    assert!(size_of::<BlockQ5K>() == 176);
    assert!(size_of::<BlockQ6K>() == 210);
    assert!(size_of::<BlockQ8K>() == 292);
};

/// View `bytes` as blocks; `None` unless the length is a whole number of blocks.
pub fn as_blocks<T: ByteBlock>(bytes: &[u8]) -> Option<&[T]> {
    let sz = std::mem::size_of::<T>();
    if bytes.len() % sz != 0 {
        return None;
    }
    // SAFETY: T has alignment 1 and accepts any bit pattern (ByteBlock contract), and the
    // slice covers exactly `len / sz` whole blocks inside `bytes`, borrowed for the same lifetime.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / sz) })
}

/// View blocks as their bytes.
pub fn blocks_as_bytes<T: ByteBlock>(blocks: &[T]) -> &[u8] {
    // SAFETY: T has no padding (ByteBlock contract), so every byte is initialized; u8 has
    // alignment 1 and the length is the exact byte size of the slice.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}
