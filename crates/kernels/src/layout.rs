//! Weight layouts: ggml's, as stored in GGUF files, and a regrouped one that the AVX2 decode
//! kernels read faster, made once at load time in a private copy of the weights.
//!
//! # The grouped Q5_0 layout ([`Layout::Grouped8`])
//! A ggml Q5_0 row is a sequence of 22-byte blocks `[d: f16][qh: u32][qs: 16 bytes]`. The
//! grouped row has the same bytes per row and the same blocks in the same order, but each run of
//! eight consecutive blocks (at a row's end, the remaining `n < 8`) is stored field by field:
//!
//! ```text
//! [d_0 .. d_{n-1}: n × 2 bytes][qh'_0 .. qh'_{n-1}: n × 4 bytes][qs_0 .. qs_{n-1}: n × 16 bytes]
//! ```
//!
//! and within each `qh'` the fifth bit of element `j` sits at bit `8·(j % 4) + j / 4` instead
//! of bit `j`.
//!
//! Why: decoding one token streams every weight once, and for Q5_0 (most of the bytes of the
//! 0.5B-class models, whose 896/640-wide rows cannot take K-quants) the kernel, not memory,
//! was the limit. With the eight scales side by side one F16C conversion from memory replaces
//! eight scalar loads, shifts and inserts; with the permuted bits a 32-bit broadcast already
//! puts each element's bit into its own byte (byte `j` of the broadcast holds byte `j % 4` of
//! `qh'`, whose bit `j / 4` is element `j`'s), so the byte shuffle of ggml's layout goes.
//! Measured: the decode kernel +25–35 % (one core, in cache, and two cores from DRAM).
//!
//! # The interleaved layout ([`Layout::Interleaved8`], Q5_0, Q8_0, Q4_K and Q6_K)
//! Rows are taken eight at a time (the row count must be a multiple of 8); the group's blocks
//! at the same position `b` are stored together, for `b = 0, 1, …`, then the next group:
//!
//! ```text
//! Q5_0, 176 bytes: [d of rows 0..8: 8 × f16][qs: 4 × 32 bytes][qh: 32 bytes]
//! Q8_0, 272 bytes: [d of rows 0..8: 8 × f16][qs: 8 × 32 bytes]
//! Q4_K, 1152 bytes: [d: 8 × f16][dmin: 8 × f16][scales: 3 × 32 bytes][qs: 32 × 32 bytes]
//! Q6_K, 1680 bytes: [d: 8 × f16][scales: 16 × 8 bytes][ql: 32 × 32 bytes][qh: 16 × 32 bytes]
//! ```
//!
//! For the K-quants, quant vector `k` (0..64) holds elements `4k..4k+4` of each row, row `i`
//! in bytes `4i..4i+4`, split into nibbles (and Q6_K's high two bits) across the chunks as
//! `interleave_block_q4k` and `interleave_block_q6k` describe.
//!
//! Quant vector `j` (32 bytes) holds the 4-byte chunk `j` of each of the eight rows' `qs`, row
//! `i` in bytes `4i..4i+4`. For Q8_0 those are elements `4j..4j+4`; for Q5_0 (two nibbles per
//! byte) the low nibbles are elements `4j..4j+4` and the high nibbles `16+4j..16+4j+4`, i.e.
//! quant vectors `j` and `j + 4` of the decoded block. Bit `k` of byte `p` of the Q5_0 `qh`
//! vector is the fifth bit of the element that decoded vector `k` holds in byte `p`.
//!
//! Why: with `n` tokens in flight (batched decode, prefill), the kernel wants, per block, one
//! vector per 4 columns with all eight rows side by side, so that one `maddubs` against four
//! broadcast activations serves eight rows and each row's block sum lands in its own lane. In
//! ggml's layout that costs a decode into a buffer and an 8×8 transpose per block (as much as
//! the multiplies at 8 tokens); here it is four or eight plain loads (plus shifts and masks for
//! Q5_0's nibbles and fifth bits). One token reads the same bytes in one sequential stream.

use crate::blocks::{as_blocks, BlockQ5_0};
use crate::{row_bytes, GgmlType, KernelError};
use rayon::prelude::*;

/// How a weight matrix's rows are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// ggml's: each row is its blocks one after another, as in a GGUF file.
    #[default]
    Ggml,
    /// Q5_0 rows regrouped by [`group_rows`] (see the [module docs](self)).
    Grouped8,
    /// Q5_0, Q8_0, Q4_K or Q6_K rows interleaved eight at a time by [`interleave_rows`] (see the
    /// [module docs](self)).
    Interleaved8,
}

/// Rows per group of the interleaved layout.
pub(crate) const INTERLEAVE: usize = 8;

/// Bytes of one interleaved block group (eight rows' blocks at one position).
pub(crate) fn interleaved_block_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K => {
            Some(INTERLEAVE * ty.type_size())
        }
        _ => None,
    }
}

/// The layout the kernels in use read a `rows × cols` matrix of `ty` fastest in, for weights
/// rewritten once at load time: [`Layout::Interleaved8`] for Q5_0, Q8_0, Q4_K and Q6_K with a
/// multiple of 8 rows, [`Layout::Grouped8`] for other Q5_0 matrices, both only with the AVX2
/// kernels (not forced to scalar); otherwise ggml's. Every kernel entry point accepts every
/// layout.
pub fn inference_layout(ty: GgmlType, rows: usize, cols: usize) -> Layout {
    if !crate::dispatch::use_avx2() || cols == 0 || cols % ty.block_size() != 0 {
        return Layout::Ggml;
    }
    match ty {
        GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K
            if rows % INTERLEAVE == 0 && rows > 0 =>
        {
            Layout::Interleaved8
        }
        GgmlType::Q5_0 => Layout::Grouped8,
        _ => Layout::Ggml,
    }
}

/// Rewrites `data` (whole rows of `cols` elements of `ty`, ggml layout) into `layout`, in place.
pub fn to_layout(
    ty: GgmlType,
    cols: usize,
    data: &mut [u8],
    layout: Layout,
) -> Result<(), KernelError> {
    match layout {
        Layout::Ggml => Ok(()),
        Layout::Grouped8 => group_rows(ty, cols, data),
        Layout::Interleaved8 => interleave_rows(ty, cols, data),
    }
}

/// The inverse of [`to_layout`]: `src` (rows in `layout`) back to ggml's layout in `dst` (same
/// length).
pub fn from_layout(
    ty: GgmlType,
    cols: usize,
    src: &[u8],
    dst: &mut [u8],
    layout: Layout,
) -> Result<(), KernelError> {
    match layout {
        Layout::Ggml => {
            if dst.len() != src.len() {
                return Err(KernelError::Length {
                    what: "ggml-layout output",
                    expected: src.len(),
                    got: dst.len(),
                    unit: "bytes",
                });
            }
            dst.copy_from_slice(src);
            Ok(())
        }
        Layout::Grouped8 => ungroup_rows(ty, cols, src, dst),
        Layout::Interleaved8 => deinterleave_rows(ty, cols, src, dst),
    }
}

/// Per block type of the interleaved layout: where a ggml block's bytes go.
struct InterleavedType {
    /// Bytes of one ggml block, and of its `qs` (which starts at `block - qs`).
    block: usize,
    qs: usize,
    /// Q5_0: the offset of `qh` in a ggml block.
    qh: Option<usize>,
}

fn interleaved_type(ty: GgmlType) -> Option<InterleavedType> {
    Some(match ty {
        GgmlType::Q5_0 => InterleavedType {
            block: 22,
            qs: 16,
            qh: Some(2),
        },
        GgmlType::Q8_0 => InterleavedType {
            block: 34,
            qs: 32,
            qh: None,
        },
        _ => return None,
    })
}

/// Interleaves the blocks at one position of eight rows: `src[i]` is row `i`'s ggml block,
/// `dst` the group's interleaved block ([`interleaved_block_bytes`]).
fn interleave_block_q32(t: &InterleavedType, src: [&[u8]; INTERLEAVE], dst: &mut [u8]) {
    let qs0 = t.block - t.qs;
    for (i, b) in src.iter().enumerate() {
        dst[2 * i..2 * i + 2].copy_from_slice(&b[0..2]);
    }
    let q = &mut dst[2 * INTERLEAVE..];
    for j in 0..t.qs / 4 {
        for (i, b) in src.iter().enumerate() {
            q[32 * j + 4 * i..32 * j + 4 * i + 4].copy_from_slice(&b[qs0 + 4 * j..qs0 + 4 * j + 4]);
        }
    }
    if let Some(qh) = t.qh {
        let h = &mut q[8 * t.qs..8 * t.qs + 32];
        for (i, b) in src.iter().enumerate() {
            let bits = u32::from_le_bytes(b[qh..qh + 4].try_into().unwrap());
            for e in 0..4 {
                // Decoded vector k holds element 4k + e of row i in byte 4i + e.
                let mut byte = 0u8;
                for k in 0..8 {
                    byte |= (((bits >> (4 * k + e)) & 1) as u8) << k;
                }
                h[4 * i + e] = byte;
            }
        }
    }
}

/// The inverse of [`interleave_block_q32`] for one row: row `i`'s ggml block from the group's
/// interleaved block `src` into `dst` (one ggml block).
fn deinterleave_block_row_q32(t: &InterleavedType, src: &[u8], i: usize, dst: &mut [u8]) {
    let qs0 = t.block - t.qs;
    let q = &src[2 * INTERLEAVE..];
    dst[0..2].copy_from_slice(&src[2 * i..2 * i + 2]);
    for j in 0..t.qs / 4 {
        dst[qs0 + 4 * j..qs0 + 4 * j + 4].copy_from_slice(&q[32 * j + 4 * i..32 * j + 4 * i + 4]);
    }
    if let Some(qh) = t.qh {
        let h = &q[8 * t.qs..8 * t.qs + 32];
        let mut bits = 0u32;
        for e in 0..4 {
            for k in 0..8 {
                bits |= (((h[4 * i + e] >> k) & 1) as u32) << (4 * k + e);
            }
        }
        dst[qh..qh + 4].copy_from_slice(&bits.to_le_bytes());
    }
}

/// A block type of the interleaved layout and how its blocks are rearranged.
enum Kind {
    /// Q5_0 and Q8_0.
    Q32(InterleavedType),
    Q4K,
    Q6K,
}

impl Kind {
    fn of(ty: GgmlType) -> Result<Kind, KernelError> {
        match ty {
            GgmlType::Q4_K => Ok(Kind::Q4K),
            GgmlType::Q6_K => Ok(Kind::Q6K),
            other => interleaved_type(other)
                .map(Kind::Q32)
                .ok_or(KernelError::UnsupportedType(other)),
        }
    }

    /// Interleaves the blocks at one position of eight rows: `src[i]` is row `i`'s ggml block,
    /// `dst` the group's interleaved block ([`interleaved_block_bytes`]).
    fn interleave(&self, src: [&[u8]; INTERLEAVE], dst: &mut [u8]) {
        match self {
            Kind::Q32(t) => interleave_block_q32(t, src, dst),
            Kind::Q4K => interleave_block_q4k(src, dst),
            Kind::Q6K => interleave_block_q6k(src, dst),
        }
    }

    /// The inverse of [`Kind::interleave`] for one row: row `i`'s ggml block from the group's
    /// interleaved block `src` into `dst` (one ggml block).
    fn row(&self, src: &[u8], i: usize, dst: &mut [u8]) {
        match self {
            Kind::Q32(t) => deinterleave_block_row_q32(t, src, i, dst),
            Kind::Q4K => deinterleave_block_row_q4k(src, i, dst),
            Kind::Q6K => deinterleave_block_row_q6k(src, i, dst),
        }
    }
}

/// Where the 4-bit quants of elements `4k..4k+4` (`k` < 64) sit in a ggml Q4_K block: four
/// consecutive bytes of `qs` (offset 16), from this one, and the nibble's shift. Elements
/// `64c..64c+32` are the low nibbles of `qs[32c..32c+32]`, the next 32 the high nibbles.
fn q4k_ggml_word(k: usize) -> (usize, u32) {
    let e = 4 * k;
    (16 + 32 * (e / 64) + e % 32, 4 * ((e % 64) / 32) as u32)
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn or_word(b: &mut [u8], at: usize, v: u32) {
    let w = word(b, at) | v;
    b[at..at + 4].copy_from_slice(&w.to_le_bytes());
}

const NIBBLES: u32 = 0x0F0F_0F0F;
const CRUMBS: u32 = 0x0303_0303;

/// Q4_K, 1152 bytes per group: `[d: 8 × f16][dmin: 8 × f16][scales: 3 × 32 bytes][qs: 32 ×
/// 32 bytes]`. The scales are each row's 12 packed bytes as three little-endian words, word
/// `w` of row `i` at `32 + 32w + 4i` (so that one vector holds one word of all eight rows and
/// the unpacking is lane-wise). Quant vector `k` (elements `4k..4k+4` of every row, row `i` in
/// bytes `4i..4i+4`) is the low (`k < 32`) or high nibble of chunk `k % 32`.
fn interleave_block_q4k(src: [&[u8]; INTERLEAVE], dst: &mut [u8]) {
    dst.fill(0);
    for (i, b) in src.iter().enumerate() {
        dst[2 * i..2 * i + 2].copy_from_slice(&b[0..2]);
        dst[16 + 2 * i..16 + 2 * i + 2].copy_from_slice(&b[2..4]);
        for w in 0..3 {
            dst[32 + 32 * w + 4 * i..32 + 32 * w + 4 * i + 4]
                .copy_from_slice(&b[4 + 4 * w..8 + 4 * w]);
        }
        for k in 0..64 {
            let (at, shift) = q4k_ggml_word(k);
            let q = (word(b, at) >> shift) & NIBBLES;
            or_word(dst, 128 + 32 * (k % 32) + 4 * i, q << (4 * (k / 32)));
        }
    }
}

fn deinterleave_block_row_q4k(src: &[u8], i: usize, dst: &mut [u8]) {
    dst.fill(0);
    dst[0..2].copy_from_slice(&src[2 * i..2 * i + 2]);
    dst[2..4].copy_from_slice(&src[16 + 2 * i..16 + 2 * i + 2]);
    for w in 0..3 {
        dst[4 + 4 * w..8 + 4 * w].copy_from_slice(&src[32 + 32 * w + 4 * i..36 + 32 * w + 4 * i]);
    }
    for k in 0..64 {
        let q = (word(src, 128 + 32 * (k % 32) + 4 * i) >> (4 * (k / 32))) & NIBBLES;
        let (at, shift) = q4k_ggml_word(k);
        or_word(dst, at, q << shift);
    }
}

/// Where the low four and the high two bits of elements `4k..4k+4` (`k` < 64) sit in a ggml
/// Q6_K block: `(ql byte, shift, qh byte, shift)`, four consecutive bytes from each. Per half
/// of 128 elements, element `32m + l` of the half has its low bits in `ql[64h + l + 32(m % 2)]`
/// (nibble `m / 2`) and its high bits at bits `2m..2m+2` of `qh[32h + l]`.
fn q6k_ggml_words(k: usize) -> (usize, u32, usize, u32) {
    let e = 4 * k;
    let (h, m, l) = (e / 128, (e % 128) / 32, e % 32);
    (
        64 * h + l + 32 * (m % 2),
        4 * (m / 2) as u32,
        128 + 32 * h + l,
        2 * m as u32,
    )
}

/// Q6_K, 1680 bytes per group: `[d: 8 × f16][scales: 16 × 8 bytes][ql: 32 × 32 bytes][qh: 16 ×
/// 32 bytes]`, the scale of sub-block `j` of row `i` at `16 + 8j + i`. Quant vector `k` (row
/// `i` in bytes `4i..4i+4`) has its low four bits in nibble `k / 32` of `ql` chunk `k % 32` and
/// its high two bits at bits `2(k / 16)` of `qh` chunk `k % 16`: a sub-block (16 elements) is
/// vectors `4j..4j+4`.
fn interleave_block_q6k(src: [&[u8]; INTERLEAVE], dst: &mut [u8]) {
    dst.fill(0);
    for (i, b) in src.iter().enumerate() {
        dst[2 * i..2 * i + 2].copy_from_slice(&b[208..210]);
        for j in 0..16 {
            dst[16 + 8 * j + i] = b[192 + j];
        }
        for k in 0..64 {
            let (lb, ls, hb, hs) = q6k_ggml_words(k);
            let lo = (word(b, lb) >> ls) & NIBBLES;
            let hi = (word(b, hb) >> hs) & CRUMBS;
            or_word(dst, 144 + 32 * (k % 32) + 4 * i, lo << (4 * (k / 32)));
            or_word(dst, 1168 + 32 * (k % 16) + 4 * i, hi << (2 * (k / 16)));
        }
    }
}

fn deinterleave_block_row_q6k(src: &[u8], i: usize, dst: &mut [u8]) {
    dst.fill(0);
    dst[208..210].copy_from_slice(&src[2 * i..2 * i + 2]);
    for j in 0..16 {
        dst[192 + j] = src[16 + 8 * j + i];
    }
    for k in 0..64 {
        let lo = (word(src, 144 + 32 * (k % 32) + 4 * i) >> (4 * (k / 32))) & NIBBLES;
        let hi = (word(src, 1168 + 32 * (k % 16) + 4 * i) >> (2 * (k / 16))) & CRUMBS;
        let (lb, ls, hb, hs) = q6k_ggml_words(k);
        or_word(dst, lb, lo << ls);
        or_word(dst, hb, hi << hs);
    }
}

/// Rewrites `data` (whole rows of `cols` elements, ggml layout, a multiple of 8 rows) into
/// [`Layout::Interleaved8`], in place, one group of eight rows at a time.
pub fn interleave_rows(ty: GgmlType, cols: usize, data: &mut [u8]) -> Result<(), KernelError> {
    let kind = Kind::of(ty)?;
    let rb = checked_rows(ty, cols, data.len())?;
    check_groups(rb, data.len())?;
    let (nb, block) = (cols / ty.block_size(), ty.type_size());
    // Groups in parallel: a load rewrites hundreds of MB this way.
    data.par_chunks_exact_mut(INTERLEAVE * rb).for_each_init(
        || vec![0u8; INTERLEAVE * rb],
        |group, dst| {
            group.copy_from_slice(dst);
            for b in 0..nb {
                let src: [&[u8]; INTERLEAVE] =
                    std::array::from_fn(|i| &group[i * rb + b * block..i * rb + (b + 1) * block]);
                let n = INTERLEAVE * block;
                kind.interleave(src, &mut dst[b * n..(b + 1) * n]);
            }
        },
    );
    Ok(())
}

/// The inverse of [`interleave_rows`]: `src` back to ggml's layout in `dst` (same length).
pub fn deinterleave_rows(
    ty: GgmlType,
    cols: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), KernelError> {
    let kind = Kind::of(ty)?;
    let rb = checked_rows(ty, cols, src.len())?;
    check_groups(rb, src.len())?;
    if dst.len() != src.len() {
        return Err(KernelError::Length {
            what: "deinterleaved output",
            expected: src.len(),
            got: dst.len(),
            unit: "bytes",
        });
    }
    let (nb, block) = (cols / ty.block_size(), ty.type_size());
    let n = INTERLEAVE * block;
    for (s, d) in src
        .chunks_exact(INTERLEAVE * rb)
        .zip(dst.chunks_exact_mut(INTERLEAVE * rb))
    {
        for (i, row) in d.chunks_exact_mut(rb).enumerate() {
            for b in 0..nb {
                kind.row(
                    &s[b * n..(b + 1) * n],
                    i,
                    &mut row[b * block..(b + 1) * block],
                );
            }
        }
    }
    Ok(())
}

/// Row `r`'s ggml bytes from interleaved data (`dst.len()` is one row's bytes): for an
/// embedding-style lookup without converting the whole matrix.
pub fn interleaved_row(
    ty: GgmlType,
    cols: usize,
    src: &[u8],
    r: usize,
    dst: &mut [u8],
) -> Result<(), KernelError> {
    let kind = Kind::of(ty)?;
    let rb = checked_rows(ty, cols, src.len())?;
    check_groups(rb, src.len())?;
    if dst.len() != rb {
        return Err(KernelError::Length {
            what: "interleaved row",
            expected: rb,
            got: dst.len(),
            unit: "bytes",
        });
    }
    if r >= src.len() / rb {
        return Err(KernelError::Length {
            what: "row index",
            expected: src.len() / rb,
            got: r,
            unit: "rows",
        });
    }
    let g = r / INTERLEAVE;
    let group = &src[g * INTERLEAVE * rb..(g + 1) * INTERLEAVE * rb];
    let (nb, block) = (cols / ty.block_size(), ty.type_size());
    let n = INTERLEAVE * block;
    for b in 0..nb {
        let blk = &mut dst[b * block..(b + 1) * block];
        kind.row(&group[b * n..(b + 1) * n], r % INTERLEAVE, blk);
    }
    Ok(())
}

/// Checks that `len` bytes of `rb`-byte rows are whole groups of eight rows.
fn check_groups(rb: usize, len: usize) -> Result<(), KernelError> {
    let g = INTERLEAVE * rb;
    if len % g != 0 {
        return Err(KernelError::Length {
            what: "interleaved rows (a multiple of 8 rows)",
            expected: len.div_ceil(g) * g,
            got: len,
            unit: "bytes",
        });
    }
    Ok(())
}

/// Blocks per run of the grouped layout.
pub(crate) const RUN: usize = 8;

/// Whether [`group_rows`] supports `ty` and the kernels in use read the grouped layout faster
/// (AVX2 kernels, not forced to scalar). Loaders regroup only then; every kernel entry point
/// accepts both layouts regardless.
pub fn prefers_grouped(ty: GgmlType) -> bool {
    ty == GgmlType::Q5_0 && crate::dispatch::use_avx2()
}

/// Position of element `j`'s fifth bit in a grouped `qh'` word.
#[inline]
fn grouped_bit(j: usize) -> usize {
    8 * (j % 4) + j / 4
}

/// Rewrites `data` (whole rows of `cols` elements of `ty`, ggml layout) into
/// [`Layout::Grouped8`], in place. Only Q5_0 has a grouped layout.
pub fn group_rows(ty: GgmlType, cols: usize, data: &mut [u8]) -> Result<(), KernelError> {
    if ty != GgmlType::Q5_0 {
        return Err(KernelError::UnsupportedType(ty));
    }
    let rb = checked_rows(ty, cols, data.len())?;
    let mut row = vec![BlockQ5_0::default(); cols / 32];
    for dst in data.chunks_exact_mut(rb) {
        let src = as_blocks::<BlockQ5_0>(dst).ok_or(KernelError::Overflow)?;
        row.copy_from_slice(src);
        let mut o = 0;
        for run in row.chunks(RUN) {
            for b in run {
                dst[o..o + 2].copy_from_slice(&b.d);
                o += 2;
            }
            for b in run {
                let qh = u32::from_le_bytes(b.qh);
                let mut g = 0u32;
                for j in 0..32 {
                    g |= ((qh >> j) & 1) << grouped_bit(j);
                }
                dst[o..o + 4].copy_from_slice(&g.to_le_bytes());
                o += 4;
            }
            for b in run {
                dst[o..o + 16].copy_from_slice(&b.qs);
                o += 16;
            }
        }
    }
    Ok(())
}

/// The inverse of [`group_rows`]: `src` (grouped rows) back to ggml's layout in `dst` (same
/// length).
pub fn ungroup_rows(
    ty: GgmlType,
    cols: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), KernelError> {
    if ty != GgmlType::Q5_0 {
        return Err(KernelError::UnsupportedType(ty));
    }
    let rb = checked_rows(ty, cols, src.len())?;
    if dst.len() != src.len() {
        return Err(KernelError::Length {
            what: "ungrouped output",
            expected: src.len(),
            got: dst.len(),
            unit: "bytes",
        });
    }
    let nb = cols / 32;
    for (s, d) in src.chunks_exact(rb).zip(dst.chunks_exact_mut(rb)) {
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(RUN);
            let run = &s[b0 * 22..(b0 + n) * 22];
            for k in 0..n {
                let out = &mut d[(b0 + k) * 22..(b0 + k + 1) * 22];
                out[0..2].copy_from_slice(&run[2 * k..2 * k + 2]);
                let g =
                    u32::from_le_bytes(run[2 * n + 4 * k..2 * n + 4 * k + 4].try_into().unwrap());
                let mut qh = 0u32;
                for j in 0..32 {
                    qh |= ((g >> grouped_bit(j)) & 1) << j;
                }
                out[2..6].copy_from_slice(&qh.to_le_bytes());
                out[6..22].copy_from_slice(&run[6 * n + 16 * k..6 * n + 16 * k + 16]);
            }
            b0 += n;
        }
    }
    Ok(())
}

/// Bytes per row, after checking that `len` is whole rows of `cols` elements.
fn checked_rows(ty: GgmlType, cols: usize, len: usize) -> Result<usize, KernelError> {
    let rb = row_bytes(ty, cols)?;
    if rb == 0 || len % rb != 0 {
        return Err(KernelError::Length {
            what: "weight data",
            expected: len.div_ceil(rb.max(1)) * rb,
            got: len,
            unit: "bytes",
        });
    }
    Ok(rb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_row, Rng};

    #[test]
    fn group_then_ungroup_is_the_identity_and_keeps_scales_and_nibbles() {
        let mut rng = Rng::new(11);
        // Row lengths with full runs only, a short tail run, and a single block.
        for cols in [32, 7 * 32, 8 * 32, 28 * 32, 20 * 32, 152 * 32] {
            let src = random_row(GgmlType::Q5_0, 3 * cols, &mut rng);
            let mut g = src.clone();
            group_rows(GgmlType::Q5_0, cols, &mut g).unwrap();
            assert_eq!(g.len(), src.len());
            if cols > 32 {
                assert_ne!(g, src, "grouping must move bytes");
            }
            // The second block's scale is the run's second f16.
            if cols >= 64 {
                assert_eq!(g[2..4], src[22..24]);
            }
            let mut back = vec![0u8; g.len()];
            ungroup_rows(GgmlType::Q5_0, cols, &g, &mut back).unwrap();
            assert_eq!(back, src, "cols {cols}");
        }
    }

    #[test]
    fn grouped_bits_sit_where_a_broadcast_byte_finds_them() {
        // Element j's bit must be in byte j % 4 of qh', at bit j / 4.
        for j in 0..32 {
            let p = grouped_bit(j);
            assert_eq!((p / 8, p % 8), (j % 4, j / 4));
        }
    }

    #[test]
    fn interleave_then_deinterleave_is_the_identity_and_rows_come_back() {
        let mut rng = Rng::new(12);
        for ty in [
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let bs = ty.block_size();
            for (rows, cols) in [(8, bs), (16, 7 * bs), (24, 28 * 32usize.max(bs))] {
                let src = random_row(ty, rows * cols, &mut rng);
                let mut il = src.clone();
                interleave_rows(ty, cols, &mut il).unwrap();
                assert_eq!(il.len(), src.len());
                assert_ne!(il, src, "interleaving must move bytes");
                // The group's first eight byte pairs are the eight rows' first scales `d`.
                let rb = row_bytes(ty, cols).unwrap();
                let d = if ty == GgmlType::Q6_K { 208 } else { 0 };
                for i in 0..8 {
                    assert_eq!(il[2 * i..2 * i + 2], src[i * rb + d..i * rb + d + 2]);
                }
                let mut back = vec![0u8; il.len()];
                deinterleave_rows(ty, cols, &il, &mut back).unwrap();
                assert_eq!(back, src, "{} {rows}x{cols}", ty.name());
                for r in [0, 3, 9, rows - 1].into_iter().filter(|&r| r < rows) {
                    let mut row = vec![0u8; rb];
                    interleaved_row(ty, cols, &il, r, &mut row).unwrap();
                    assert_eq!(row, src[r * rb..(r + 1) * rb], "row {r}");
                }
            }
        }
    }

    #[test]
    fn interleaved_q5_0_fifth_bits_sit_in_their_vectors_byte() {
        // One row with only element e's fifth bit set: in the qh vector it must be bit e / 4
        // (the decoded vector k = e / 4 for e < 16, 4 + (e - 16) / 4 above) of byte e % 4.
        for e in 0..32usize {
            let mut rows = vec![0u8; 8 * 22];
            rows[2..6].copy_from_slice(&(1u32 << e).to_le_bytes());
            interleave_rows(GgmlType::Q5_0, 32, &mut rows).unwrap();
            let h = &rows[16 + 128..];
            let (k, byte) = if e < 16 {
                (e / 4, e % 4)
            } else {
                (4 + (e - 16) / 4, e % 4)
            };
            for (p, &v) in h.iter().enumerate() {
                let want = if p == byte { 1u8 << k } else { 0 };
                assert_eq!(v, want, "element {e}, byte {p}");
            }
        }
    }

    #[test]
    fn other_types_and_ragged_data_are_rejected() {
        assert!(interleave_rows(GgmlType::Q5_K, 256, &mut vec![0u8; 8 * 176]).is_err());
        assert!(interleave_rows(GgmlType::Q4_K, 256, &mut vec![0u8; 7 * 144]).is_err());
        // Seven rows are not a whole group.
        assert!(interleave_rows(GgmlType::Q8_0, 32, &mut vec![0u8; 7 * 34]).is_err());
        assert!(interleaved_row(GgmlType::Q8_0, 32, &[0u8; 8 * 34], 8, &mut [0u8; 34]).is_err());
        let mut v = vec![0u8; 34];
        assert!(matches!(
            group_rows(GgmlType::Q8_0, 32, &mut v),
            Err(KernelError::UnsupportedType(GgmlType::Q8_0))
        ));
        let mut v = vec![0u8; 23];
        assert!(group_rows(GgmlType::Q5_0, 32, &mut v).is_err());
        assert!(group_rows(GgmlType::Q5_0, 48, &mut [0u8; 22]).is_err());
        assert!(ungroup_rows(GgmlType::Q5_0, 32, &[0u8; 22], &mut [0u8; 21]).is_err());
    }
}
