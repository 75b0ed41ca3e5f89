//! Criterion microbenchmarks of the kernels that dominate inference time: weight matrix ×
//! activations for the weight types the Q4_K_M models actually contain, at their real shapes.
//!
//! * `matvec` (1 token) is decode: one pass over the weights per token, so its bytes/s is
//!   directly comparable with the machine's memory bandwidth (`modu bench --membw`).
//! * `batch8` (8 tokens) is a batched decode step of the server (eight streams).
//! * `matmul64` (64 tokens) is a prefill tile: the same weight bytes serve 64 activation rows,
//!   so bytes/s above the memory bandwidth means the kernel reuses what it loads.
//!
//! Throughput is weight bytes per second for both, so the two can be read side by side. The
//! smaller matrices (the Gemma ones, ~1–3 MB) stay in the last-level cache between iterations,
//! so their matvec numbers are cache-bound, not DRAM-bound: compare kernels with them, and
//! memory-bound behaviour with the large ones.
//! Shapes are `rows × cols` of the row-major weight (GGUF lists them as `[cols, rows]`). K-quants
//! need `cols % 256 == 0`, which is why the 896- and 640-column matrices of the real models are
//! Q5_0/Q8_0 and only the down projections are Q4_K/Q6_K; shapes a type cannot hold are skipped.
//!
//! Run: `cargo bench -p modu-kernels --bench kernels [-- FILTER]`; threads come from rayon's
//! global pool (`RAYON_NUM_THREADS=1` for a single core).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use modu_kernels::testutil::{random_row, Rng};
use modu_kernels::{matmul, GgmlType, QMatrix};

struct Shape {
    name: &'static str,
    rows: usize,
    cols: usize,
}

const SHAPES: &[Shape] = &[
    // Qwen2.5-0.5B: ffn_gate / ffn_up (GGUF [896, 4864]).
    Shape {
        name: "qwen_ffn_up_4864x896",
        rows: 4864,
        cols: 896,
    },
    // Qwen2.5-0.5B: ffn_down (GGUF [4864, 896]).
    Shape {
        name: "qwen_ffn_down_896x4864",
        rows: 896,
        cols: 4864,
    },
    // Qwen2.5-0.5B: output (GGUF [896, 151936]), the first 16384 rows: the same inner loop,
    // a tenth of the setup time.
    Shape {
        name: "qwen_output_16384x896",
        rows: 16384,
        cols: 896,
    },
    // Gemma-3-270M: ffn_gate / ffn_up (GGUF [640, 2048]).
    Shape {
        name: "gemma_ffn_up_2048x640",
        rows: 2048,
        cols: 640,
    },
    // Gemma-3-270M: ffn_down (GGUF [2048, 640]), the Q6_K one.
    Shape {
        name: "gemma_ffn_down_640x2048",
        rows: 640,
        cols: 2048,
    },
];

const TYPES: &[GgmlType] = &[
    GgmlType::Q4_K,
    GgmlType::Q5_0,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::F16,
];

fn bench_matmul(c: &mut Criterion) {
    let mut rng = Rng::new(0x5EED);
    for &ty in TYPES {
        let mut group = c.benchmark_group(format!("{ty}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for s in SHAPES {
            if s.cols % ty.block_size() != 0 {
                continue;
            }
            // random_row makes whole blocks with finite, modest f16 scales; rows are contiguous
            // runs of blocks, so one long "row" is the whole matrix.
            let data = random_row(ty, s.rows * s.cols, &mut rng);
            let w = QMatrix::new(ty, s.rows, s.cols, &data).expect("valid matrix");
            group.throughput(Throughput::Bytes(data.len() as u64));
            for (label, n_tokens) in [("matvec", 1usize), ("batch8", 8), ("matmul64", 64)] {
                let x = rng.f32s(n_tokens * s.cols, 1.0);
                let mut y = vec![0f32; n_tokens * s.rows];
                group.bench_with_input(BenchmarkId::new(label, s.name), &n_tokens, |b, &n| {
                    b.iter(|| {
                        matmul(&w, black_box(&x), n, &mut y).expect("matmul");
                        black_box(&y);
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
