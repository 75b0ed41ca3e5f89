//! Matmul of the 32-element block types (Q4_0, Q5_0, Q8_0) with Q8_0 activations, for every
//! token count: one kernel serves decode (1 token), batched decode and prefill.
//!
//! # Numerics
//! Every output is `Σ_b f32(isum_b) · (dw_b · da_b)`, summed over the blocks `b` from left to
//! right in f32 (one multiply and one add per block), where `isum_b` is the exact integer dot
//! product of block `b` and `dw_b`, `da_b` are the weight and activation scales. That is
//! exactly what the scalar reference ([`crate::scalar::vec_dot_q5_0_q8_0`] etc.) computes, so
//! the SIMD and scalar results are bit-identical, and so are the results for any batch shape
//! (a token's output never depends on the other tokens of the call). (`dw · da` is a product of
//! two f16 values, exact in f32.)
//!
//! # Why this shape
//! llama.cpp's AVX2 dot keeps eight float lanes per block (convert, scale, fused add for each
//! of the eight partial sums), i.e. ~6 vector operations per (row, token, block), and so did
//! modu's earlier kernels. Reducing the integer lanes first makes the float work one lane per
//! block:
//!
//! * **Tiles of 4+ tokens** (prefill, batched decode; [`group`]): eight weight rows are decoded
//!   into a buffer and transposed per block so that one `maddubs` with four broadcast activation
//!   bytes serves all eight rows; the block sums land one row per lane without any horizontal
//!   reduction, and the float work is done once per eight rows. About 2 integer operations per
//!   (row, token, block) for Q4_0/Q5_0 (i16 accumulation), 4 for Q8_0.
//! * **1–3 tokens** (decode; [`row_terms`], [`sum_terms`]): each row is read in memory order
//!   (the hardware prefetcher needs that to stream from DRAM); the lane vectors of eight
//!   consecutive blocks are reduced into one vector of block sums and scaled at once. The terms
//!   are stored, and the serial in-order addition is done for eight rows at a time (one vector
//!   addition per block after an 8×8 transpose): done per row, that chain of dependent scalar
//!   additions, not the integer work, bounded the loop (Q8_0 +50 %, Q5_0 +40 % when removed).
//!
//! Unsigned-quant types (Q4_0, Q5_0) multiply the raw quants `u` (0..=15 / 0..=31) and
//! subtract `offset · Σ y` after the reduction (`Σ (u - off)·y = Σ u·y - off·Σ y` exactly);
//! `off · Σ y` is computed once per activation block.
//!
//! The kernels read blocks through [`Q32Rows`]: [`Plain`] for ggml's layout, [`GroupedQ5_0`]
//! for Q5_0 rows regrouped at load time ([`crate::layout`]), whose eight scales per run load
//! with one conversion and whose high bits need no byte shuffle. Both give the same bits.

// Index loops over the small register arrays read more plainly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::mem::size_of;

use crate::blocks::*;
use crate::x86::{h2f, mask_from_broadcast, mul_sum_u8_i8, transpose8_ps};

/// Weight rows per kernel call (one f32 lane each).
pub(crate) const ROWS: usize = 8;

/// Tokens per pass over a group of rows: the decoded weight blocks are reused for this many
/// tokens, and the accumulators (one vector per token) stay in L1.
const TOKEN_TILE: usize = 64;

/// From this many tokens in a tile on, [`group`] (its transposition of the decoded blocks pays
/// off); below, [`row_terms`] per row and token. Both give the same bits.
const TRANSPOSED_MIN_TOKENS: usize = 4;

/// How far ahead of the decode path's reads the weight rows are prefetched: streaming weights
/// from DRAM at one token per pass, explicit prefetches ~3 KiB ahead gave +5–10 % over the
/// hardware prefetchers alone (measured: Q8_0 output matrix, 2 threads, huge pages).
pub(crate) const PREFETCH_AHEAD: usize = 3072;

/// A 32-element weight block type.
pub(crate) trait Q32Block: Copy + Sync {
    /// The offset subtracted from the unsigned quants (0: the quants are signed).
    const OFFSET: i32;
    /// How many `maddubs` results (pair sums of `u·y`) can be added in i16 without overflow:
    /// Q4_0 `8·2·15·127 < 2^15`, Q5_0 `4·2·31·127 < 2^15`; Q8_0's pair sums reach `2·128·127`.
    const I16_TERMS: usize;
    fn d(&self) -> [u8; 2];
    /// The block's 32 quants ready for [`Q32Block::lanes`]: `(u, u)` with the unsigned quants
    /// for the offset types, `(|q|, q)` for Q8_0 (the `maddubs` sign trick).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn decode(&self) -> (__m256i, __m256i);
    /// Eight i32 lanes whose sum is `Σ u·y` (or `Σ q·y`).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i) -> __m256i;
}

impl Q32Block for BlockQ8_0 {
    const OFFSET: i32 = 0;
    const I16_TERMS: usize = 1;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        // SAFETY: qs is 32 bytes; loadu has no alignment requirement.
        let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        // |q| as an unsigned byte (also right for -128).
        (_mm256_sign_epi8(q, q), q)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes(dec: (__m256i, __m256i), y: __m256i) -> __m256i {
        // q·y = |q| · (sign(q)·y); |q| <= 128 and |y| <= 127, so a pair sum fits an i16.
        let p = _mm256_maddubs_epi16(dec.0, _mm256_sign_epi8(y, dec.1));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

/// The 32 nibbles of 16 bytes as bytes: low nibbles in bytes 0..16, high nibbles in 16..32.
/// (The 16 bytes are broadcast to both halves straight from memory, a load without shuffle
/// work; one variable shift per half then puts each half's nibbles low.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: qs is 16 readable bytes; loadu has no alignment requirement.
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.as_ptr() as *const __m128i));
    let v = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// `0x10` in byte `j` if bit `j` of the little-endian `qh` is set, else 0: a Q5_0 block's
/// fifth bits. (The four bytes are broadcast straight from memory.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high_bits(qh: &[u8; 4]) -> __m256i {
    // SAFETY: qh is 4 readable bytes; `loadu_si32` has no alignment requirement (the load and
    // the broadcast fuse into one `vpbroadcastd` from memory).
    let v = _mm256_broadcastd_epi32(_mm_loadu_si32(qh.as_ptr()));
    _mm256_and_si256(mask_from_broadcast(v), _mm256_set1_epi8(0x10))
}

impl Q32Block for BlockQ4_0 {
    const OFFSET: i32 = 8;
    const I16_TERMS: usize = 8;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        let u = nibbles(&self.qs);
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes((u, _): (__m256i, __m256i), y: __m256i) -> __m256i {
        // u <= 31 and |y| <= 127: a `maddubs` pair sum is at most 2·31·127, inside an i16.
        mul_sum_u8_i8(u, y)
    }
}

impl Q32Block for BlockQ5_0 {
    const OFFSET: i32 = 16;
    const I16_TERMS: usize = 4;
    #[inline(always)]
    fn d(&self) -> [u8; 2] {
        self.d
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self) -> (__m256i, __m256i) {
        let u = _mm256_or_si256(nibbles(&self.qs), high_bits(&self.qh));
        (u, u)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes((u, _): (__m256i, __m256i), y: __m256i) -> __m256i {
        // u <= 31 and |y| <= 127: a `maddubs` pair sum is at most 2·31·127, inside an i16.
        mul_sum_u8_i8(u, y)
    }
}

/// A matrix of 32-element blocks as the kernels read it. Blocks are addressed by row `r` and
/// position `b0 + k` in a run of `n` blocks starting at `b0` (`b0 % 8 == 0`; `n` is 8 except
/// for a row's last run), so that a layout which stores runs field by field
/// ([`crate::layout`]) finds a block's fields without divisions.
pub(crate) trait Q32Rows: Sync {
    type W: Q32Block;
    /// Blocks per row.
    fn nb(&self) -> usize;
    /// Address of block `b` of row `r` in memory order (rows and runs are contiguous and a
    /// run of `n` blocks takes `n` blocks' bytes in every layout), for prefetching.
    fn addr(&self, r: usize, b: usize) -> *const i8;
    /// [`Q32Block::decode`] of the block.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `r` a row of the matrix, `b0 + k < b0 + n <= nb`, `n` the run's size.
    unsafe fn decode(&self, r: usize, b0: usize, n: usize, k: usize) -> (__m256i, __m256i);
    /// The block's f16 scale bits.
    ///
    /// # Safety
    /// As for [`Q32Rows::decode`].
    unsafe fn d(&self, r: usize, b0: usize, n: usize, k: usize) -> u16;
    /// The f16 scale bits of the eight blocks of a whole run at `b0` (`b0 + 8 <= nb`).
    ///
    /// # Safety
    /// As for [`Q32Rows::decode`].
    unsafe fn scales8(&self, r: usize, b0: usize) -> __m128i;
}

/// ggml's layout: row `r` is blocks `r·nb .. (r+1)·nb` of `w`.
pub(crate) struct Plain<'a, W> {
    pub w: &'a [W],
    pub nb: usize,
}

impl<W: Q32Block> Q32Rows for Plain<'_, W> {
    type W = W;
    #[inline(always)]
    fn nb(&self) -> usize {
        self.nb
    }
    #[inline(always)]
    fn addr(&self, r: usize, b: usize) -> *const i8 {
        self.w.as_ptr().wrapping_add(r * self.nb + b) as *const i8
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self, r: usize, b0: usize, _n: usize, k: usize) -> (__m256i, __m256i) {
        // SAFETY: the block is inside the matrix (caller contract).
        self.w.get_unchecked(r * self.nb + b0 + k).decode()
    }
    #[inline(always)]
    unsafe fn d(&self, r: usize, b0: usize, _n: usize, k: usize) -> u16 {
        // SAFETY: as above.
        u16::from_le_bytes(self.w.get_unchecked(r * self.nb + b0 + k).d())
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales8(&self, r: usize, b0: usize) -> __m128i {
        // Packed in two general registers (cheaper than eight vector inserts).
        let (mut d0, mut d1) = (0u64, 0u64);
        for k in 0..ROWS {
            let d = self.d(r, b0, ROWS, k) as u64;
            if k < 4 {
                d0 |= d << (16 * k);
            } else {
                d1 |= d << (16 * (k - 4));
            }
        }
        _mm_set_epi64x(d1 as i64, d0 as i64)
    }
}

/// Q5_0 rows in [`crate::layout::Layout::Grouped8`]: a run of `n` blocks at byte `22·b0` of
/// its row holds `n` scales, then `n` permuted high-bit words, then `n × 16` nibble bytes.
pub(crate) struct GroupedQ5_0<'a> {
    pub data: &'a [u8],
    pub nb: usize,
}

impl GroupedQ5_0<'_> {
    #[inline(always)]
    fn run(&self, r: usize, b0: usize) -> *const u8 {
        self.data
            .as_ptr()
            .wrapping_add((r * self.nb + b0) * size_of::<BlockQ5_0>())
    }
}

impl Q32Rows for GroupedQ5_0<'_> {
    type W = BlockQ5_0;
    #[inline(always)]
    fn nb(&self) -> usize {
        self.nb
    }
    #[inline(always)]
    fn addr(&self, r: usize, b: usize) -> *const i8 {
        self.run(r, b) as *const i8
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(&self, r: usize, b0: usize, n: usize, k: usize) -> (__m256i, __m256i) {
        let run = self.run(r, b0);
        // SAFETY: the run's n high-bit words and n·16 nibble bytes are inside the matrix
        // (caller contract); both reads are unaligned loads.
        let u = _mm256_or_si256(
            nibbles(&*(run.add(6 * n + 16 * k) as *const [u8; 16])),
            grouped_high_bits(run.add(2 * n + 4 * k)),
        );
        (u, u)
    }
    #[inline(always)]
    unsafe fn d(&self, r: usize, b0: usize, _n: usize, k: usize) -> u16 {
        // SAFETY: scale k of the run is inside the matrix (caller contract).
        let p = self.run(r, b0).add(2 * k);
        u16::from_le_bytes([*p, *p.add(1)])
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales8(&self, r: usize, b0: usize) -> __m128i {
        // SAFETY: a whole run starts with its eight scales (16 bytes); unaligned load.
        _mm_loadu_si128(self.run(r, b0) as *const __m128i)
    }
}

/// `0x10` in byte `j` if element `j`'s bit is set in a grouped high-bit word (bit
/// `8·(j % 4) + j / 4`, see [`crate::layout`]): after a 32-bit broadcast byte `j` holds byte
/// `j % 4` of the word, so one AND with `1 << (j / 4)` per byte and a compare find the bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grouped_high_bits(qh: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes (caller); `loadu_si32` has no alignment requirement.
    let v = _mm256_broadcastd_epi32(_mm_loadu_si32(qh));
    let bit = _mm256_set_epi64x(
        0x8080_8080_4040_4040u64 as i64,
        0x2020_2020_1010_1010,
        0x0808_0808_0404_0404,
        0x0202_0202_0101_0101,
    );
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Per-call preparation of the activations: per (token, block) the f32 scale and
/// `offset · Σ y` (both `[n_tokens * nb]`).
pub(crate) struct Prepared {
    da: Vec<f32>,
    ysum: Vec<i32>,
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare<W: Q32Block>(act: &[BlockQ8_0]) -> Prepared {
    let da = act.iter().map(|b| h2f(b.d)).collect();
    let ysum = if W::OFFSET != 0 {
        act.iter()
            .map(|b| W::OFFSET * b.qs.iter().map(|&v| v as i32).sum::<i32>())
            .collect()
    } else {
        Vec::new()
    };
    Prepared { da, ysum }
}

/// Per 128-bit half: `[a0+a2, b0+b2, a1+a3, b1+b3]` (a step of [`reduce8`]; a plain function,
/// not a closure, so that it is compiled with the same target features).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_pairs(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
}

/// Per 128-bit half, from two [`add_pairs`] results: the half-sums of their four source
/// vectors, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_quads(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
}

/// Lane `i` of the result is the sum of the eight lanes of `p[i]` (exact, i32).
///
/// Built from unpacks and adds rather than `hadd` (two shuffles and an add each on x86): 2–3 %
/// faster for the decode path on Zen 3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce8(p: [__m256i; ROWS]) -> __m256i {
    let r0123 = add_quads(add_pairs(p[0], p[1]), add_pairs(p[2], p[3]));
    let r4567 = add_quads(add_pairs(p[4], p[5]), add_pairs(p[6], p[7]));
    // Add the two 128-bit halves: rows 0..4 from r0123, rows 4..8 from r4567.
    _mm256_add_epi32(
        _mm256_permute2x128_si256(r0123, r4567, 0x20),
        _mm256_permute2x128_si256(r0123, r4567, 0x31),
    )
}

/// Outputs of weight rows `r0..r1` of `m` for all `n_tokens` activation rows;
/// `y[t * rows + r]` receives token `t`'s result for row `r`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `m` has at least `r1` rows, `r0 < r1`;
/// `act.len() == n_tokens * m.nb()`; `prep` was prepared from `act` with `M::W`; `y` points to
/// `n_tokens * rows` writable f32 with `r1 <= rows`, and no other thread accesses rows `r0..r1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<M: Q32Rows>(
    m: &M,
    r0: usize,
    r1: usize,
    act: &[BlockQ8_0],
    prep: &Prepared,
    n_tokens: usize,
    y: *mut f32,
    rows: usize,
) {
    let nb = m.nb();
    debug_assert!(r0 < r1 && act.len() == n_tokens * nb);
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let buf = &mut *buf;
        buf.q.resize(nb * ROWS, _mm256_setzero_si256());
        buf.d.resize(nb * ROWS, 0);
        let mut t0 = 0;
        while t0 < n_tokens {
            let t1 = (t0 + TOKEN_TILE).min(n_tokens);
            if t1 - t0 < TRANSPOSED_MIN_TOKENS {
                let nbp = nb.div_ceil(ROWS) * ROWS;
                buf.t.resize(nbp * ROWS, 0.0);
                let mut g = r0;
                while g < r1 {
                    let n_rows = (r1 - g).min(ROWS);
                    for t in t0..t1 {
                        let k0 = t * nb;
                        for i in 0..n_rows {
                            // SAFETY: row g + i < r1 is in the matrix; its nbp terms fit in
                            // buf.t (resized above).
                            row_terms(
                                m,
                                g + i,
                                &act[k0..k0 + nb],
                                prep,
                                k0,
                                buf.t.as_mut_ptr().add(i * nbp),
                            );
                        }
                        // Rows n_rows..8 of the buffer hold stale terms: their lanes are not stored.
                        let v = sum_terms(&buf.t, nb, nbp);
                        let mut out = [0f32; ROWS];
                        _mm256_storeu_ps(out.as_mut_ptr(), v);
                        for i in 0..n_rows {
                            // SAFETY: t < n_tokens and g + i < r1 <= rows; this task owns the rows.
                            *y.add(t * rows + g + i) = out[i];
                        }
                    }
                    g += n_rows;
                }
                t0 = t1;
                continue;
            }
            // One accumulator per token of the tile (lane = row); only the first `t1 - t0` are
            // used. (Declared here, not per call: the decode path above never needs them.)
            let mut acc = [_mm256_setzero_ps(); TOKEN_TILE];
            let mut g = r0;
            while g < r1 {
                let n_rows = (r1 - g).min(ROWS);
                // A short last group repeats its last row (computed, not stored).
                let idx: [usize; ROWS] = std::array::from_fn(|i| g + i.min(n_rows - 1));
                for a in &mut acc[..t1 - t0] {
                    *a = _mm256_setzero_ps();
                }
                group(m, idx, act, prep, t0, t1, &mut acc, buf);
                for t in t0..t1 {
                    let mut v = [0f32; ROWS];
                    _mm256_storeu_ps(v.as_mut_ptr(), acc[t - t0]);
                    for i in 0..n_rows {
                        // SAFETY: t < n_tokens and g + i < r1 <= rows; this task owns the rows.
                        *y.add(t * rows + g + i) = v[i];
                    }
                }
                g += n_rows;
            }
            t0 = t1;
        }
    });
}

/// 8×8 transpose of 32-bit elements: `out[j]` lane `i` = `v[i]` lane `j` (the f32 transpose of
/// [`crate::x86::transpose8_ps`] on the same bits; the casts are free).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(v: &[__m256i; ROWS]) -> [__m256i; ROWS] {
    let mut f = [_mm256_setzero_ps(); ROWS];
    for i in 0..ROWS {
        f[i] = _mm256_castsi256_ps(v[i]);
    }
    let t = transpose8_ps(f);
    let mut out = [_mm256_setzero_si256(); ROWS];
    for j in 0..ROWS {
        out[j] = _mm256_castps_si256(t[j]);
    }
    out
}

/// Decoded quants and f16 scales of eight whole rows, `[block][row]` (8 × 32 bytes per block:
/// 7 KiB for 896 columns, 38 KiB for 4864).
#[derive(Default)]
struct DecodeBuf {
    q: Vec<__m256i>,
    d: Vec<i16>,
    /// Block terms of eight rows for one token, `[row][block]`, `nb` rounded up to 8 per row
    /// (the few-token path, [`row_terms`]).
    t: Vec<f32>,
}

thread_local! {
    /// Per-thread decode buffer, reused across calls.
    static BUF: std::cell::RefCell<DecodeBuf> = std::cell::RefCell::new(DecodeBuf::default());
}

/// Eight rows (`idx`) × a tile of [`TRANSPOSED_MIN_TOKENS`]+ tokens `t0..t1` over all blocks,
/// into `acc[t - t0]` (lane = row).
///
/// The eight rows are first decoded row by row, each in memory order, into the decode buffer
/// (interleaving the rows block by block defeats the hardware prefetcher on matrices streamed
/// from DRAM). Then per block the eight decoded blocks are transposed once so that vector `j`
/// holds quants `4j..4j+4` of all eight rows (one 32-bit lane per row): per token each `maddubs`
/// multiplies all eight rows by the same four activations (broadcast), and summing over `j`
/// leaves each row's exact block sum in its own lane, with no horizontal reduction. The pair
/// sums are added in i16 as far as [`Q32Block::I16_TERMS`] allows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group<M: Q32Rows>(
    m: &M,
    idx: [usize; ROWS],
    act: &[BlockQ8_0],
    prep: &Prepared,
    t0: usize,
    t1: usize,
    acc: &mut [__m256; TOKEN_TILE],
    buf: &mut DecodeBuf,
) {
    let ones = _mm256_set1_epi16(1);
    let nb = m.nb();
    // One panel: the whole row.
    let (p0, pn) = (0, nb);
    {
        // Plain loops throughout, not `array::from_fn`: a closure does not inherit
        // `target_feature`, so the SIMD helpers called from it would not be inlined.
        for i in 0..ROWS {
            let mut b0 = 0;
            while b0 < nb {
                let n = (nb - b0).min(ROWS);
                for k in 0..n {
                    // SAFETY: row idx[i] < r1 and block b0 + k < nb are in the matrix;
                    // (b0 + k) * ROWS + i < nb * ROWS == buf.q.len() == buf.d.len().
                    let j = (b0 + k) * ROWS + i;
                    *buf.q.get_unchecked_mut(j) = m.decode(idx[i], b0, n, k).1;
                    *buf.d.get_unchecked_mut(j) = m.d(idx[i], b0, n, k) as i16;
                }
                b0 += n;
            }
        }
        // The next eight rows (contiguous) are prefetched into L2 while this group computes,
        // spread over the blocks, so memory stays busy while the decoded panel is used (the
        // hardware prefetcher only runs ahead of demand loads, and there are none in this
        // loop). A prefetch never faults, so addresses past the matrix are harmless, and
        // `wrapping_add` keeps the pointer arithmetic defined.
        let next = m.addr(idx[ROWS - 1] + 1, 0);
        let per_block = ROWS * size_of::<M::W>();
        for k in 0..pn {
            let b = p0 + k;
            let mut off = k * per_block;
            while off < (k + 1) * per_block + 64 {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(off));
                off += 64;
            }
            // SAFETY: k * ROWS + ROWS <= nb * ROWS == buf.d.len(); eight i16 read unaligned.
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                buf.d.as_ptr().add(k * ROWS) as *const __m128i
            ));
            let mut raw = [_mm256_setzero_si256(); ROWS];
            for i in 0..ROWS {
                raw[i] = *buf.q.get_unchecked(k * ROWS + i);
            }
            let v = transpose8(&raw);
            // Q8_0: |q| for the unsigned operand, the sign goes onto the activations.
            let mut av = v;
            if M::W::OFFSET == 0 {
                for j in 0..ROWS {
                    av[j] = _mm256_sign_epi8(v[j], v[j]);
                }
            }
            for t in t0..t1 {
                let kk = t * nb + b;
                // SAFETY: t < n_tokens, so kk < act.len() == prep.da.len() (==
                // prep.ysum.len() for the offset types); qs is 32 bytes, read as eight
                // unaligned i32.
                let yp = act.get_unchecked(kk).qs.as_ptr() as *const i32;
                let mut s32 = _mm256_setzero_si256();
                let mut s16 = _mm256_setzero_si256();
                for j in 0..ROWS {
                    let yj = _mm256_set1_epi32(std::ptr::read_unaligned(yp.add(j)));
                    let p = if M::W::OFFSET == 0 {
                        _mm256_maddubs_epi16(av[j], _mm256_sign_epi8(yj, v[j]))
                    } else {
                        _mm256_maddubs_epi16(v[j], yj)
                    };
                    if M::W::I16_TERMS == 1 {
                        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
                    } else {
                        s16 = _mm256_add_epi16(s16, p);
                        if (j + 1) % M::W::I16_TERMS == 0 {
                            s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, ones));
                            s16 = _mm256_setzero_si256();
                        }
                    }
                }
                finish::<M::W>(s32, dw, prep, kk, acc.get_unchecked_mut(t - t0));
            }
        }
    }
}

/// The float work for one (block, token) of eight rows: subtract the offset term, convert, scale
/// by `dw · da` and add to the accumulator — the scalar reference's `sum += isum as f32 * (dw *
/// da)`, lane by lane.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `k < prep.da.len()` (and `< prep.ysum.len()` for the
/// offset types).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn finish<W: Q32Block>(
    mut s: __m256i,
    dw: __m256,
    prep: &Prepared,
    k: usize,
    acc: &mut __m256,
) {
    if W::OFFSET != 0 {
        s = _mm256_sub_epi32(s, _mm256_set1_epi32(*prep.ysum.get_unchecked(k)));
    }
    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*prep.da.get_unchecked(k)));
    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
}

/// One row × one token (the decode path), reading the row in memory order: the lane vectors of
/// eight consecutive blocks are reduced into one vector of their exact block sums and scaled in
/// one go; the terms `f32(isum_b) · (dw_b · da_b)` are stored to `out[b]` for all blocks (the
/// last, partial group of eight also writes up to seven unused entries after `nb`).
///
/// The terms are not added here: a row's sum is a serial chain of one f32 addition per block,
/// whose latency (not the integer work) would bound the loop. [`sum_terms`] adds eight rows'
/// terms at once instead, one vector addition per block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `r` is a row of `m`, `y.len() == m.nb()`, `prep`
/// holds the token's values at `k0..k0 + m.nb()`, and `out` points to `m.nb()` rounded up to 8
/// writable f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_terms<M: Q32Rows>(
    m: &M,
    r: usize,
    y: &[BlockQ8_0],
    prep: &Prepared,
    k0: usize,
    out: *mut f32,
) {
    let nb = m.nb();
    let mut b = 0;
    while b + ROWS <= nb {
        // The weight stream is prefetched [`PREFETCH_AHEAD`] bytes ahead (past this row's end
        // into the next rows, which are contiguous). A prefetch never faults, so addresses past
        // the matrix are harmless, and `wrapping_add` keeps the pointer arithmetic defined.
        let ahead = m.addr(r, b).wrapping_add(PREFETCH_AHEAD);
        let mut off = 0;
        while off < ROWS * size_of::<M::W>() {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off));
            off += 64;
        }
        let mut p = [_mm256_setzero_si256(); ROWS];
        for k in 0..ROWS {
            // SAFETY: b + k < nb == y.len(), a whole run of the row; qs is 32 bytes, loadu
            // unaligned.
            let yv = _mm256_loadu_si256(y.get_unchecked(b + k).qs.as_ptr() as *const __m256i);
            p[k] = M::W::lanes(m.decode(r, b, ROWS, k), yv);
        }
        let mut s = reduce8(p);
        // SAFETY: k0 + b + 8 <= k0 + nb: inside prep's arrays (ysum only for offset types).
        if M::W::OFFSET != 0 {
            s = _mm256_sub_epi32(
                s,
                _mm256_loadu_si256(prep.ysum.as_ptr().add(k0 + b) as *const __m256i),
            );
        }
        let dw = _mm256_cvtph_ps(m.scales8(r, b));
        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(prep.da.as_ptr().add(k0 + b)));
        _mm256_storeu_ps(out.add(b), _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
        b += ROWS;
    }
    let n = nb - b;
    if n > 0 {
        // The last run of `n < 8` blocks through the same reduction, the unused lanes zero.
        let mut p = [_mm256_setzero_si256(); ROWS];
        let mut dh = [0u16; ROWS];
        let mut da = [0f32; ROWS];
        let mut ys = [0i32; ROWS];
        for k in 0..n {
            // SAFETY: b + k < nb == y.len(), and k0 + b + k inside prep's arrays.
            let yv = _mm256_loadu_si256(y.get_unchecked(b + k).qs.as_ptr() as *const __m256i);
            p[k] = M::W::lanes(m.decode(r, b, n, k), yv);
            dh[k] = m.d(r, b, n, k);
            da[k] = *prep.da.get_unchecked(k0 + b + k);
            if M::W::OFFSET != 0 {
                ys[k] = *prep.ysum.get_unchecked(k0 + b + k);
            }
        }
        let s = _mm256_sub_epi32(
            reduce8(p),
            _mm256_loadu_si256(ys.as_ptr() as *const __m256i),
        );
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(dh.as_ptr() as *const __m128i));
        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(da.as_ptr()));
        _mm256_storeu_ps(out.add(b), _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale));
    }
}

/// Lane `i` = `Σ_b t[i·nbp + b]` over `b < nb`, added from `b = 0` up in f32 starting from
/// 0.0: eight rows' terms from [`row_terms`], transposed eight blocks at a time so that one
/// vector addition per block serves all eight rows (each lane in the scalar reference's order).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `t.len() >= 8 * nbp` and `nb <= nbp`, `nbp % 8 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_terms(t: &[f32], nb: usize, nbp: usize) -> __m256 {
    debug_assert!(t.len() >= ROWS * nbp && nb <= nbp && nbp % ROWS == 0);
    let mut acc = _mm256_setzero_ps();
    let mut b = 0;
    while b < nb {
        let mut v = [_mm256_setzero_ps(); ROWS];
        for i in 0..ROWS {
            // SAFETY: i * nbp + b + 8 <= 8 * nbp <= t.len().
            v[i] = _mm256_loadu_ps(t.as_ptr().add(i * nbp + b));
        }
        let c = transpose8_ps(v);
        for k in 0..(nb - b).min(ROWS) {
            acc = _mm256_add_ps(acc, c[k]);
        }
        b += ROWS;
    }
    acc
}
