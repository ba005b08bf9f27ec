//! Times the GPU products at decode (one activation row) on the first adapter: milliseconds
//! and GB/s of weights read, per format and shape (Qwen3-0.6B's MLP and head shapes).
//!
//! `cargo run --release -p qwick-backend --example gpu_gemv`

use qwick_backend::gpu::{Gpu, Matmul, Recorder};
use qwick_backend::Format;
use std::time::Instant;

fn main() {
    let g = match Gpu::open(0) {
        Ok(g) => g,
        Err(e) => return eprintln!("{e}"),
    };
    println!("{} (subgroups: {})", g.summary, g.subgroups());
    let shapes = [
        (Format::Q4_K, 3072, 1024),
        (Format::Q4_K, 1024, 3072),
        (Format::Q8_0, 3072, 1024),
        (Format::BF16, 3072, 1024),
        (Format::F32, 3072, 1024),
        (Format::Q6_K, 32768, 1024),
    ];
    for (f, n, k) in shapes {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut bytes = vec![0u8; f.bytes_for(n * k).expect("whole blocks")];
        if f.is_float() {
            f.encode_floats(&w, &mut bytes)
        } else {
            f.quantize(&w, &mut bytes)
        }
        let (wb, x, y) =
            (g.upload(&bytes).unwrap(), g.upload_f32(&vec![0.5f32; k]).unwrap(), g.zeros(4 * n as u64).unwrap());
        let mut best = f64::MAX;
        for _ in 0..4 {
            let t = Instant::now();
            let mut r = Recorder::new(&g);
            for _ in 0..4 {
                r.matmul(&Matmul {
                    x: &x,
                    x_off: 0,
                    ldx: k,
                    m: 1,
                    w: &wb,
                    w_off: 0,
                    format: f,
                    n,
                    k,
                    y: &y,
                    y_off: 0,
                    ldy: n,
                });
            }
            r.submit();
            let _ = g.read_f32(&y, 1);
            best = best.min(t.elapsed().as_secs_f64() / 4.0);
        }
        println!("{f:<5} {n:>6}×{k:<5} {:>9.3} ms {:>8.2} GB/s", best * 1e3, bytes.len() as f64 / best / 1e9);
    }
}
