//! Kernel benchmarks at Qwen3-0.6B shapes, on every ISA this CPU has:
//! `cargo bench -p qwick-backend` (filter with e.g. `-- gemv`). Throughput is weight bytes
//! read per second for the matmuls (compare with `qwick bench`'s measured read bandwidth).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qwick_backend::attention::{paged_attention, AttnArgs, PagedKv};
use qwick_backend::{matmul, Ctx, Format, Isa, Level, ThreadPool, WeightView};

fn weights(n: usize, k: usize) -> Vec<u8> {
    (0..n * k)
        .flat_map(|i| qwick_backend::format::f32_to_bf16(((i * 7919 % 1000) as f32 - 500.0) / 1000.0).to_le_bytes())
        .collect()
}

fn bench_matmul(c: &mut Criterion) {
    let pool = ThreadPool::new(ThreadPool::default_threads());
    // (name, rows of x, out features, in features): decode GEMV, batched decode, prefill GEMM.
    let cases = [
        ("gemv_mlp_up", 1, 3072, 1024),
        ("gemv_mlp_down", 1, 1024, 3072),
        ("gemv_lm_head", 1, 151936, 1024),
        ("gemv8_mlp_up", 8, 3072, 1024),
        ("gemv16_mlp_up", 16, 3072, 1024),
        ("gemv32_mlp_up", 32, 3072, 1024),
        ("gemm128_mlp_up", 128, 3072, 1024),
    ];
    let amx = Isa::new(Level::Amx);
    for isa in Isa::all_supported().into_iter().chain(amx).filter(|&i| i != Isa::SCALAR) {
        let ctx = Ctx::new(isa, &pool);
        let mut g = c.benchmark_group(format!("matmul_{isa}"));
        g.sample_size(10);
        for &(name, m, n, k) in &cases {
            let w = weights(n, k);
            let wv = WeightView::new(Format::BF16, &w, n, k);
            let x = vec![0.5f32; m * k];
            let mut y = vec![0f32; m * n];
            g.throughput(Throughput::Bytes((n * k * 2) as u64));
            g.bench_function(name, |b| b.iter(|| matmul(ctx, &x, m, &wv, &mut y)));
            if isa.level() == Level::Amx {
                // As loading converts bf16 weights where products run on AMX.
                let mut tiled = vec![0u8; qwick_backend::quant::packed_bytes(&wv, true).expect("bf16 tiles")];
                qwick_backend::quant::repack_into(&wv, &mut tiled);
                let tv = WeightView::tiles(Format::BF16, &tiled, n, k);
                g.bench_function(format!("{name}_tiles"), |b| b.iter(|| matmul(ctx, &x, m, &tv, &mut y)));
            }
        }
        g.finish();
    }
}

fn bench_attention(c: &mut Criterion) {
    let pool = ThreadPool::new(ThreadPool::default_threads());
    // Qwen3-0.6B's attention shape; decode reads a long context, prefill a 512-token prompt.
    let (nh, kvh, hd, bs) = (16, 8, 128, 16);
    for isa in Isa::all_supported().into_iter().filter(|&i| i != Isa::SCALAR) {
        let ctx = Ctx::new(isa, &pool);
        let mut g = c.benchmark_group(format!("attention_{isa}"));
        g.sample_size(10);
        for (name, ctx_len, t) in [("decode_ctx4096", 4096usize, 1usize), ("prefill_512", 512, 512)] {
            let blocks = ctx_len / bs;
            let vals: Vec<f32> = (0..blocks * bs * kvh * hd).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
            let table: Vec<u32> = (0..blocks as u32).collect();
            let tables = [&table[..]];
            let positions: Vec<u32> = ((ctx_len - t) as u32..ctx_len as u32).collect();
            let seq = vec![0u32; t];
            let q: Vec<f32> = (0..t * nh * hd).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
            let mut out = vec![0f32; t * nh * hd];
            let args = AttnArgs {
                n_heads: nh,
                scale: 1.0 / (hd as f32).sqrt(),
                positions: &positions,
                seq_of_token: &seq,
                block_tables: &tables,
            };
            for format in [Format::F32, Format::BF16, Format::F16] {
                let mut bytes = vec![0u8; vals.len() * format.row_bytes(1)];
                format.encode_floats(&vals, &mut bytes);
                let kv = PagedKv { k: &bytes, v: &bytes, format, block_size: bs, kv_heads: kvh, head_dim: hd };
                // Decode: bytes of K and V read; prefill: tokens.
                g.throughput(if t == 1 {
                    Throughput::Bytes(2 * bytes.len() as u64)
                } else {
                    Throughput::Elements(t as u64)
                });
                g.bench_function(format!("{name}_{format}"), |b| {
                    b.iter(|| paged_attention(ctx, &q, kv, &args, &mut out))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench_matmul, bench_attention);
criterion_main!(benches);
