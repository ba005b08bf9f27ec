//! Measures the machine's memory read bandwidth: all threads streaming disjoint parts of a
//! buffer much larger than the caches, in several read patterns; the best one is the bound (a
//! bound that some engine exceeds is not one).

use crate::alloc::HugeBuf;
use crate::ctx::Ctx;
use crate::isa::Isa;
use crate::pool::chunk;
use std::time::Instant;

/// How a pass reads its part of the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One sequential stream, 64-byte loads into eight independent sums.
    Stream,
    /// One sequential stream with software prefetch 2 KiB ahead.
    StreamPrefetch,
    /// Four 4 KiB rows side by side, prefetching the next four (the way a GEMV reads weights).
    Rows,
    /// One sequential stream, every line prefetched 4 KiB ahead (the way the GEMV of bf16
    /// weights in tiles reads them).
    StreamFar,
    /// Two sequential streams side by side (the halves of the part), every line of each
    /// prefetched 4 KiB ahead.
    TwoStreams,
}

pub const PATTERNS: [Pattern; 5] =
    [Pattern::Stream, Pattern::StreamPrefetch, Pattern::Rows, Pattern::StreamFar, Pattern::TwoStreams];

/// Best read bandwidth in bytes/s over `passes` multi-threaded passes over a `bytes` buffer
/// (on huge pages where the system gives them), for each pattern; and the best of all.
pub fn read_bandwidth(ctx: Ctx, bytes: usize, passes: usize) -> (f64, Vec<(Pattern, f64)>) {
    let n = bytes / 8;
    let mut buf = HugeBuf::zeroed(n * 8);
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(i as u64).to_le_bytes());
    }
    let threads = ctx.pool.threads();
    let mut results = Vec::new();
    for pattern in PATTERNS {
        let mut best = 0f64;
        for _ in 0..passes.max(1) {
            let sums = std::sync::Mutex::new(0u64);
            let t0 = Instant::now();
            ctx.pool.run(&|t| {
                let r = chunk(n, 512, threads, t);
                let s = sum(ctx.isa, pattern, &buf[r.start * 8..r.end * 8]);
                *sums.lock().unwrap() ^= s;
            });
            let dt = t0.elapsed().as_secs_f64();
            std::hint::black_box(sums.into_inner().unwrap());
            best = best.max((n * 8) as f64 / dt);
        }
        results.push((pattern, best));
    }
    let best = results.iter().map(|r| r.1).fold(0.0, f64::max);
    (best, results)
}

/// Sums the bytes of `x` as u64 words, read in `pattern`.
fn sum(isa: Isa, pattern: Pattern, x: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx512() {
        // SAFETY: an AVX-512 `Isa` exists only on a CPU with AVX-512F; `sum` reads within `x`.
        return unsafe { x86::sum(pattern, x) };
    }
    let _ = (isa, pattern);
    x.chunks_exact(8).fold(0u64, |a, b| a.wrapping_add(u64::from_le_bytes(b.try_into().unwrap())))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Pattern;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum(pattern: Pattern, x: &[u8]) -> u64 {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            const ROW: usize = 4096;
            let p = x.as_ptr();
            let mut acc = [_mm512_setzero_si512(); 8];
            let whole = match pattern {
                Pattern::Stream | Pattern::StreamPrefetch => {
                    let lines = x.len() / 512;
                    for b in 0..lines {
                        let base = p.add(b * 512);
                        if pattern == Pattern::StreamPrefetch {
                            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(2048) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(2048 + 256) as *const i8);
                        }
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_add_epi64(*a, _mm512_loadu_si512(base.add(64 * r) as *const _));
                        }
                    }
                    lines * 512
                }
                Pattern::StreamFar => {
                    let lines = x.len() / 512;
                    for b in 0..lines {
                        let base = p.add(b * 512);
                        for (r, a) in acc.iter_mut().enumerate() {
                            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(4096 + 64 * r) as *const i8);
                            *a = _mm512_add_epi64(*a, _mm512_loadu_si512(base.add(64 * r) as *const _));
                        }
                    }
                    lines * 512
                }
                Pattern::TwoStreams => {
                    let half = x.len() / 1024 * 512;
                    for b in 0..half / 512 {
                        for (h, accs) in acc.chunks_exact_mut(4).enumerate() {
                            let base = p.add(h * half + b * 512);
                            for (r, a) in accs.iter_mut().enumerate() {
                                for l in [2 * r, 2 * r + 1] {
                                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(4096 + 64 * l) as *const i8);
                                    *a = _mm512_add_epi64(*a, _mm512_loadu_si512(base.add(64 * l) as *const _));
                                }
                            }
                        }
                    }
                    2 * half
                }
                Pattern::Rows => {
                    let blocks = x.len() / (4 * ROW);
                    for b in 0..blocks {
                        let base = p.add(b * 4 * ROW);
                        for c in (0..ROW).step_by(128) {
                            for r in 0..4 {
                                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add((r + 4) * ROW + c) as *const i8);
                                let row = base.add(r * ROW + c);
                                acc[2 * r] = _mm512_add_epi64(acc[2 * r], _mm512_loadu_si512(row as *const _));
                                acc[2 * r + 1] =
                                    _mm512_add_epi64(acc[2 * r + 1], _mm512_loadu_si512(row.add(64) as *const _));
                            }
                        }
                    }
                    blocks * 4 * ROW
                }
            };
            let mut total = 0u64;
            for a in acc {
                total = total.wrapping_add(_mm512_reduce_add_epi64(a) as u64);
            }
            x[whole..].chunks_exact(8).fold(total, |a, b| a.wrapping_add(u64::from_le_bytes(b.try_into().unwrap())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::ThreadPool;

    #[test]
    fn every_pattern_sums_every_word() {
        let words: Vec<u64> = (0..40_000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let want = words.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        for isa in Isa::all_supported() {
            for p in PATTERNS {
                assert_eq!(sum(isa, p, &bytes), want, "{isa} {p:?}");
            }
        }
        let pool = ThreadPool::new(2);
        let (best, each) = read_bandwidth(Ctx::new(Isa::best(), &pool), 8 << 20, 1);
        assert!(best > 0.0 && each.len() == PATTERNS.len());
    }
}
