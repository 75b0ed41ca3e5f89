//! The batched (tiled GEMM) path of `matmul` must give, bit for bit, what the single-token
//! dot kernels give for each (row, token) pair, so that prefill and decode agree. Also checks
//! both against the scalar reference: bit for bit for the 32-element block types, within a
//! float tolerance for the K-quants, and Q5_0 in its regrouped layout and Q5_0/Q8_0/Q4_K/Q6_K in
//! their interleaved layout against ggml's.

mod common;

/// At the level this CPU supports best (AVX-512 VNNI where present: the 16-row kernels of
/// several tokens against the AVX2 single-token dots, so this also shows the two levels agree).
#[test]
fn batched_matmul_is_bit_identical_to_single_token_dots() {
    eprintln!("kernel level: {}", modu_kernels::simd_level().name());
    common::equiv::check_batched_matmul_against_single_token_dots();
}
