//! Measures the machine's memory read bandwidth the way decode reads weights: all threads
//! streaming disjoint parts of a buffer much larger than the caches.

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

/// Sums `x` the way the GEMV streams weights: blocks of 4 rows of 4 KiB read side by side,
/// prefetching the next block.
fn sum(isa: Isa, x: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        return unsafe { sum_x86(x) };
    }
    let _ = isa;
    x.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_x86(x: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    const ROW: usize = 512; // u64s: 4 KiB
    let mut acc = [_mm256_setzero_si256(); 4];
    let blocks = x.len() / (4 * ROW);
    let p = x.as_ptr();
    for b in 0..blocks {
        let base = p.add(b * 4 * ROW);
        for c in (0..ROW).step_by(4) {
            for (r, a) in acc.iter_mut().enumerate() {
                if c % 8 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add((r + 4) * ROW + c) as *const i8);
                }
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(base.add(r * ROW + c) as *const __m256i));
            }
        }
    }
    let mut out = [0u64; 16];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_si256(out.as_mut_ptr().add(4 * r) as *mut __m256i, *a);
    }
    x[blocks * 4 * ROW..].iter().fold(out.iter().fold(0u64, |a, &b| a.wrapping_add(b)), |a, &b| a.wrapping_add(b))
}
