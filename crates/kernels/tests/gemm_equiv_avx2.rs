//! The batched-matmul equivalence check with the AVX2 kernels forced (`MODU_KERNELS=avx2`, read
//! once per process, so this file holds a single test): on an AVX-512 machine the default run
//! of `gemm_equiv` covers the AVX-512 kernels, and this one the AVX2 kernels they replace.
//! Both compare with the same single-token dots, so the two levels give the same bits.

mod common;

use modu_kernels::*;

#[test]
fn batched_matmul_is_bit_identical_on_forced_avx2() {
    std::env::set_var("MODU_KERNELS", "avx2");
    let want = detected_level().min(SimdLevel::Avx2);
    assert_eq!(
        simd_level(),
        want,
        "MODU_KERNELS=avx2 must select AVX2 where the CPU has it"
    );
    common::equiv::check_batched_matmul_against_single_token_dots();
}
