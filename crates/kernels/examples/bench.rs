//! Quick matmul throughput check:
//!   cargo run --release -p modu-kernels --example bench [rows cols]
//! Set MODU_KERNELS=scalar to measure the scalar reference, RAYON_NUM_THREADS=1 for one core.
//! Reports the best time of repeated runs.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(clippy::manual_is_multiple_of)]

use modu_kernels::testutil::{random_row, Rng};
use modu_kernels::*;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = *args.first().unwrap_or(&4864);
    let cols = *args.get(1).unwrap_or(&1024);
    println!(
        "kernels: {:?}, threads: {}, W: {rows}x{cols}",
        simd_level(),
        rayon::current_num_threads()
    );
    let mut rng = Rng::new(1);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::F32,
    ] {
        if cols % ty.block_size() != 0 {
            continue;
        }
        let data = random_row(ty, rows * cols, &mut rng);
        let w = QMatrix::new(ty, rows, cols, &data).unwrap();
        let tok_list: Vec<usize> = std::env::var("BENCH_TOKENS")
            .ok()
            .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 16, 512]);
        for &n_tokens in &tok_list {
            let x = rng.f32s(n_tokens * cols, 1.0);
            let mut y = vec![0f32; n_tokens * rows];
            matmul(&w, &x, n_tokens, &mut y).unwrap();
            // Best of several runs: robust against other load on the machine.
            let mut s = f64::INFINITY;
            let t0 = Instant::now();
            let c0 = cpu_ns();
            let mut runs = 0u32;
            while t0.elapsed().as_secs_f64() < 0.5 || runs < 3 {
                let t = Instant::now();
                matmul(&w, &x, n_tokens, &mut y).unwrap();
                s = s.min(t.elapsed().as_secs_f64());
                runs += 1;
            }
            // CPU time of all threads per run: less sensitive to other load on the machine.
            let cpu_s = (cpu_ns() - c0) as f64 / 1e9 / runs as f64;
            let gflop = 2.0 * rows as f64 * cols as f64 * n_tokens as f64 / s / 1e9;
            let gbs = data.len() as f64 / s / 1e9;
            let gflop_cpu = 2.0 * rows as f64 * cols as f64 * n_tokens as f64 / cpu_s / 1e9;
            println!(
                "{:>5} n_tokens={n_tokens:>3}: {:>8.3} ms  {gflop:>6.1} GFLOP/s  weights {gbs:>6.2} GB/s  ({gflop_cpu:>6.1} GFLOP per CPU-second)",
                ty.name(),
                s * 1e3
            );
        }
    }
}

/// Nanoseconds of CPU time used by all threads of this process so far (Linux; 0 elsewhere).
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
