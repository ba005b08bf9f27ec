//! Quick timing of the matmul kernels at Qwen3-0.6B shapes: `cargo run --release --example kernels`.
use qwick_backend::bandwidth::read_bandwidth;
use qwick_backend::{matmul, Ctx, DType, Isa, ThreadPool, WeightView};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads);
    for isa in Isa::all_supported() {
        let ctx = Ctx { isa, pool: &pool };
        let bw = read_bandwidth(ctx, 512 << 20, 5);
        println!("{isa}: read bandwidth {:.1} GB/s", bw / 1e9);
        for &(n, k) in &[(3072usize, 1024usize), (1024, 3072), (151936, 1024)] {
            let w: Vec<u8> = (0..n * k)
                .flat_map(|i| {
                    qwick_backend::dtype::f32_to_bf16(((i * 7919 % 1000) as f32 - 500.0) / 1000.0).to_le_bytes()
                })
                .collect();
            let wv = WeightView::new(DType::BF16, &w, n, k);
            for m in [1usize, 8, 15, 16, 512] {
                if isa == Isa::Scalar && m > 1 {
                    continue;
                }
                let x = vec![0.5f32; m * k];
                let mut y = vec![0f32; m * n];
                matmul(ctx, &x, m, &wv, &mut y);
                let reps = if m == 512 { 2 } else { 10 };
                let t = Instant::now();
                for _ in 0..reps {
                    matmul(ctx, &x, m, &wv, &mut y);
                }
                let dt = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "  {isa} m={m:4} n={n:6} k={k:5}: {:8.3} ms  {:6.1} GB/s weights  {:7.1} GFLOP/s",
                    dt * 1e3,
                    (n * k * 2) as f64 / dt / 1e9,
                    (2 * m * n * k) as f64 / dt / 1e9
                );
            }
        }
    }
}
