use qwick_backend::bandwidth::read_bandwidth;
use qwick_backend::{matmul, Ctx, DType, Isa, ThreadPool, WeightView};
use std::time::Instant;
fn main() {
    {
        let p = ThreadPool::new(2);
        read_bandwidth(Ctx { isa: Isa::Avx512, pool: &p }, 64 << 20, 2);
    }
    let pool = ThreadPool::new(2);
    let ctx = Ctx { isa: Isa::Avx512, pool: &pool };
    let (n, k) = (3072, 1024);
    let ws: Vec<Vec<u8>> = (0..40)
        .map(|_| {
            (0..n * k)
                .flat_map(|i| {
                    qwick_backend::dtype::f32_to_bf16(((i * 7919 % 1000) as f32 - 500.0) / 1000.0).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let x = vec![0.5f32; k];
    let mut y = vec![0f32; n];
    for rep in 0..3 {
        let t = Instant::now();
        for w in &ws {
            matmul(ctx, &x, 1, &WeightView::new(DType::BF16, w, n, k), &mut y);
        }
        let dt = t.elapsed().as_secs_f64();
        println!("rep {rep}: {:.2} ms per matmul, {:.1} GB/s", dt * 1e3 / 40.0, (40 * n * k * 2) as f64 / dt / 1e9);
    }
}
