//! bf16 weights with activations rounded to bf16 on AVX512-BF16: `vdpbf16ps` GEMV and GEMM, rows or tiles.
//!
//! AVX512-BF16: bf16 activations × bf16 weights with `vdpbf16ps` (pairs of products
//! accumulated into f32 lanes). Same two paths as the exact kernels.

use super::out32::{by_rows, masks, Out};
use super::zero_columns;
use crate::matmul::job::Job;
use crate::matmul::job::{gemv_blocks, gemv_dispatch, GEMM_MIN_ROWS, TILES_MIN_ROWS};
use crate::weights::{Layout, WeightView};
use std::arch::x86_64::*;

const NR: usize = 32;
const MR: usize = 12;
/// k-pairs per packed panel.
const KC2: usize = 256;

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `p` is readable for the bf16 values in the
/// lanes of `mask`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn load32(p: *const u16, mask: __mmask32) -> __m512bh {
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16)) }
}

/// # Safety
/// The CPU must support AVX512-BF16; `j.x` holds `j.m` rows of `j.w.cols` bf16 values rounded
/// up to even (see `prepare`); `j.y` is valid for writes of `j.m` rows of `j.ldy` floats at
/// columns `j.cols` (within `j.w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
pub unsafe fn matmul(j: &Job<'_, &[u16]>) {
    let (xb, m, w) = (j.x, j.m, j.w);
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        if w.layout == Layout::Tiles && m < TILES_MIN_ROWS {
            gemv_tiles(&j.with(xb.as_ptr(), j.ldx))
        } else if w.layout == Layout::Tiles {
            gemm_tiles(&j.with(xb.as_ptr(), j.ldx))
        } else if m >= GEMM_MIN_ROWS || w.layout == Layout::Transposed {
            gemm(&j.with(xb.as_ptr(), j.ldx))
        } else {
            gemv(&j.with(xb.as_ptr(), j.ldx))
        }
    }
}

/// GEMV of bf16 weights in tiles (`quant::tiles::bf16`, `cols.start` a multiple of 32)
/// with `m` (< [`TILES_MIN_ROWS`]) rows of activations rounded to bf16 (stride `w.cols`):
/// a 64-byte line of a tile holds one pair of inputs for 16 columns, which one
/// `vdpbf16ps` multiplies by the broadcast activation pair, with no sums across lanes.
///
/// Per 64 bytes of weights and activation row: one load, one prefetch and one
/// `vdpbf16ps` (the broadcast pair shared by both halves of a column pair), summed in one
/// chain per output as the GEMM of the tiles sums (so a row's result does not depend on
/// the rows batched with it). `llvm-mca` (LLVM 19) of the one-row loop over a 2 KiB step
/// (32 loads, 32 prefetches, 16 broadcasts, 32 `vdpbf16ps` in two chains): 64 cycles on
/// `znver4`, half resources, half the chains' latency (its model gives a zmm
/// `vdpbf16ps` a reciprocal throughput of 3 on the FP2/FP3 pipes); 160 on
/// `sapphirerapids`, the chains' latency. Four chains per output (sums per 32 inputs)
/// would take 100 and 64 cycles; the FMA GEMV of the same tiles
/// ([`super::avx512::gemv_bf16_tiles`]: a shift, a mask and two FMAs per line) 96 on
/// either. At 3.5 GHz these read 45–110 GB/s per core where a core's share of DRAM is
/// 15–20 GB/s: one row waits on memory. With more rows the dot product does the work of
/// two FMAs: [`crate::matmul::Bf16Mode`]'s calibration picks per CPU.
///
/// # Safety
/// The CPU must have AVX512-BF16; `w` is in bf16 tiles; `x` holds `m` rows of `w.cols`
/// bf16 values; `y` is valid for `m` rows of `ldy` floats at columns `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn gemv_tiles(j: &Job<'_, *const u16>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        assert!(cols.start.is_multiple_of(32) && w.cols.is_multiple_of(32));
        assert!(w.data.len() >= crate::quant::tiles::bf16::bytes(w.rows, w.cols) && cols.end <= w.rows);
        assert!(m <= 4, "the GEMV of bf16 tiles takes at most 4 rows");
        match m {
            1 => tiles_block::<1>(x, w, y, ldy, cols),
            2 => tiles_block::<2>(x, w, y, ldy, cols),
            3 => tiles_block::<3>(x, w, y, ldy, cols),
            _ => tiles_block::<4>(x, w, y, ldy, cols),
        };
    }
}

/// [`gemv_tiles`] for `M` activation rows; returns `M`.
///
/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `M` activation rows of `w.cols`
/// values; `w` is in bf16 tiles; `y` is valid for writes of `M` rows of `ldy` floats at the
/// columns of the block written (from the given column to the end given, within `w.rows`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn tiles_block<const M: usize>(
    x: *const u16,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    cols: std::ops::Range<usize>,
) -> usize {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let (k, ksteps) = (w.cols, w.cols / 32);
        let mut n = cols.start;
        while n < cols.end {
            // The pair of 16-column groups holding columns n..n + 32: 2 KiB per 32 inputs.
            let base = w.data.as_ptr().add(n / 32 * ksteps * 2048);
            // One chain of dot products per output, input pairs in order: as the GEMM of
            // the tiles sums, so a row's result does not depend on the rows batched with
            // it.
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for j in 0..ksteps {
                let t = base.add(j * 2048);
                for p in 0..16 {
                    // The lines a stretch further on in the stream (harmless past the end).
                    _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(PREFETCH + 64 * p) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(PREFETCH + 1024 + 64 * p) as *const i8);
                    let v = [
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(t.add(64 * p) as *const _)),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(t.add(1024 + 64 * p) as *const _)),
                    ];
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xa = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                            (x.add(i * k + 32 * j + 2 * p) as *const i32).read_unaligned(),
                        ));
                        for h in 0..2 {
                            a[h] = _mm512_dpbf16_ps(a[h], xa, v[h]);
                        }
                    }
                }
            }
            super::avx512::store_pair(&acc, y, ldy, n, cols.end);
            n += 32;
        }
        M
    }
}

/// How far ahead [`tiles_block`] prefetches its stream, in bytes.
const PREFETCH: usize = 4096;

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` activation rows of `w.cols`
/// values (at stride `ldx` where given; bf16 pairs for the bf16 kernels); `w` holds rows in
/// the layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at
/// columns `cols` (within `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn gemv(j: &Job<'_, *const u16>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let kp = k.next_multiple_of(2);
        let wp = w.data.as_ptr() as *const u16;
        // Up to 4 rows of x: 4 weight rows at a time; more: 2 weight rows against up to 8.
        gemv_blocks(m, cols, 2, |n, nr, i, mr| {
            let (xp, yp, wpn) = (x.add(i * kp), y.add(i * ldy + n), wp.add(n * k));
            gemv_dispatch!(nr, mr, |R, M| block::<R, M>(xp, kp, k, wpn, yp, ldy));
        });
    }
}

/// `R` weight rows (stride `k`) against `M` activation rows (stride `kp`).
///
/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `M` rows of `kp` bf16 values
/// (`k` used); `w` points at `R` rows of `k` bf16 weights; `y` is valid for writes of `M`
/// rows of `ldy` floats, `R` columns from its start.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn block<const R: usize, const M: usize>(
    x: *const u16,
    kp: usize,
    k: usize,
    w: *const u16,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut kk = 0;
        while kk < k {
            let mask: __mmask32 = if k - kk >= 32 { u32::MAX } else { (1u32 << (k - kk)) - 1 };
            let mut wv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); R];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = load32(w.add(j * k + kk), mask);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = load32(x.add(i * kp + kk), mask);
                for j in 0..R {
                    a[j] = _mm512_dpbf16_ps(a[j], xv, wv[j]);
                }
            }
            kk += 32;
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                *y.add(i * ldy + j) = _mm512_reduce_add_ps(*v);
            }
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` activation rows of `w.cols`
/// values (bf16 pairs for the bf16 kernels); `w` holds rows in the layout this kernel
/// reads; `y` is valid for writes of `m` rows of `ldy` floats at columns `cols` (within
/// `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn gemm(j: &Job<'_, *const u16>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let kp = k.next_multiple_of(2);
        let wp = w.data.as_ptr() as *const u16;
        // panel[p * NR + j] = weights (2p, 2p+1) of column j, as one u32.
        let mut panel = crate::alloc::Aligned::<u32>::zeroed(KC2 * NR);
        let mut np = cols.start;
        while np < cols.end {
            let nr = (cols.end - np).min(NR);
            let masks = masks(nr);
            let mut kc = 0;
            while kc < k {
                let kb = (k - kc).min(2 * KC2);
                let kb2 = kb.div_ceil(2);
                if w.layout == Layout::Transposed {
                    // Stored rows kc + 2p and kc + 2p + 1 (w.rows values each), interleaved.
                    let n = w.rows;
                    for p in 0..kb2 {
                        let r0 = wp.add((kc + 2 * p) * n + np);
                        let r1 = wp.add((kc + 2 * p + 1) * n + np);
                        let odd = 2 * p + 1 == kb;
                        for j in 0..NR {
                            *panel.get_unchecked_mut(p * NR + j) = if j >= nr {
                                0
                            } else if odd {
                                *r0.add(j) as u32
                            } else {
                                *r0.add(j) as u32 | (*r1.add(j) as u32) << 16
                            };
                        }
                    }
                } else {
                    for j in 0..nr {
                        let row = wp.add((np + j) * k + kc);
                        for p in 0..kb / 2 {
                            *panel.get_unchecked_mut(p * NR + j) = (row.add(2 * p) as *const u32).read_unaligned();
                        }
                        if kb % 2 == 1 {
                            *panel.get_unchecked_mut((kb2 - 1) * NR + j) = *row.add(kb - 1) as u32;
                        }
                    }
                    zero_columns(&mut panel, NR, nr, kb2);
                }
                let first = kc == 0;
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(MR);
                    let a = x.add(i * kp + kc) as *const u32;
                    let out = Out { c: y.add(i * ldy + np), ldc: ldy, first, masks };
                    by_rows!(mr, |M| micro::<M, false>(a, kp / 2, panel.as_ptr(), kb2, out));
                    i += mr;
                }
                kc += kb;
            }
            np += nr;
        }
    }
}

/// Input steps of 32 (2 KiB of weights for 32 columns in tiles) per pass of
/// [`gemm_tiles`] over the rows: 16 KiB of weights, kept in L1 while every 12 rows of
/// activations meet them.
const TILE_STEPS: usize = 8;

/// [`gemm`] for bf16 weights in tiles (`quant::tiles::bf16`): for 32 columns and 32
/// inputs, the 16 pairs of inputs of columns 0–15 (64 bytes each: one bf16 pair per
/// column) then those of columns 16–31, which is the micro kernel's panel as stored, so
/// the weights are read in place. `cols.start` is a multiple of 32.
///
/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `x` holds `m` rows of `w.cols` bf16
/// values; `w` is in bf16 tiles; `y` is valid for writes of `m` rows of `ldy` floats at
/// columns `cols` (`cols.start` a multiple of 32, within `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn gemm_tiles(j: &Job<'_, *const u16>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        debug_assert!(cols.start.is_multiple_of(NR) && w.cols.is_multiple_of(32));
        let ksteps = w.cols / 32;
        let lda = w.cols / 2;
        let wp = w.data.as_ptr() as *const u32;
        for np in (cols.start..cols.end).step_by(NR) {
            let nr = (cols.end - np).min(NR);
            let masks = masks(nr);
            // 512 u32 (2 KiB) per input step of these 32 columns.
            let block = wp.add(np / NR * ksteps * 512);
            for s0 in (0..ksteps).step_by(TILE_STEPS) {
                let steps = (ksteps - s0).min(TILE_STEPS);
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(MR);
                    let a = x.add(i * 2 * lda + s0 * 32) as *const u32;
                    let out = Out { c: y.add(i * ldy + np), ldc: ldy, first: s0 == 0, masks };
                    by_rows!(mr, |M| micro::<M, true>(a, lda, block.add(s0 * 512), steps * 16, out));
                    i += mr;
                }
            }
        }
    }
}

/// `a`: activation pairs (u32 = two bf16), row stride `lda` pairs. `panel`: for pair
/// `p`, the pairs of columns 0–15 then 16–31, either packed ([`NR`] u32 per pair) or in
/// tiles (`TILES`: 16 u32 per pair, columns 16–31 a tile of 256 u32 further, 16 pairs
/// per input step of 512 u32; `kb2` a multiple of 16).
///
/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,avx512bf16,fma`); `a` holds `M` rows of the panel's depth at
/// stride `lda`; the panel holds its depth of 32 packed columns; `out` is valid for reads
/// and writes of `M` rows in the columns of its masks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn micro<const M: usize, const TILES: bool>(a: *const u32, lda: usize, panel: *const u32, kb2: usize, out: Out) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let mut acc = out.load::<M>();
        for p in 0..kb2 {
            let (b0, b1) = if TILES {
                let b = panel.add(p / 16 * 512 + p % 16 * 16);
                (b, b.add(256))
            } else {
                (panel.add(p * NR), panel.add(p * NR + 16))
            };
            let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b0 as *const _));
            let b1 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b1 as *const _));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    a.add(i * lda + p).read_unaligned() as i32,
                ));
                r[0] = _mm512_dpbf16_ps(r[0], av, b0);
                r[1] = _mm512_dpbf16_ps(r[1], av, b1);
            }
        }
        out.store(&acc);
    }
}
