//! Measures the machine's memory read bandwidth the way decode reads weights: all threads
//! streaming disjoint parts of a buffer much larger than the caches.

use crate::ops::multiversion;
use crate::pool::chunk;
use crate::{Ctx, Isa};
use std::time::Instant;

/// Best read bandwidth in bytes/s over `passes` multi-threaded passes over a `bytes` buffer.
pub fn read_bandwidth(ctx: Ctx, bytes: usize, passes: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = ctx.pool.threads();
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let sums = std::sync::Mutex::new(0u64);
        let t0 = Instant::now();
        ctx.pool.run(&|t| {
            let r = chunk(n, 64, threads, t);
            let s = sum(ctx.isa, &buf[r]);
            *sums.lock().unwrap() ^= s;
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(sums.into_inner().unwrap());
        best = best.max((n * 8) as f64 / dt);
    }
    best
}

fn sum(isa: Isa, x: &[u64]) -> u64 {
    multiversion!(
        isa,
        fn k(x: &[u64]) -> u64 {
            let mut acc = [0u64; 16];
            let chunks = x.len() / 16;
            for c in 0..chunks {
                for l in 0..16 {
                    acc[l] = acc[l].wrapping_add(x[c * 16 + l]);
                }
            }
            let _ = FAST;
            acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
        }
    )
}
