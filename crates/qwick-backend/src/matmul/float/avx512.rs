//! f32, bf16 and f16 weights with f32 activations on AVX-512: FMA GEMV and GEMM (weights widened in registers).

use super::out32::{by_rows, masks, Out};
use super::*;
use crate::matmul::job::Job;
use crate::matmul::job::{gemv_blocks, gemv_dispatch, GEMM_MIN_ROWS};
use crate::weights::{Layout, WeightView};
use std::arch::x86_64::*;

const NR: usize = 32;
const MR: usize = 12;
const KC: usize = 256;

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `p` is readable for 16 values of format `D`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn load16<const D: u8>(p: *const u8) -> __m512 {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match D {
            F32 => _mm512_loadu_ps(p as *const f32),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                16,
            )),
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `p` is readable for the values of format `D` in
/// the lanes of `mask`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn load16_mask<const D: u8>(p: *const u8, mask: __mmask16) -> __m512 {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match D {
            F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
                16,
            )),
            _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` rows of `w.cols` values at stride
/// `ldx`; `w` holds rows of format `D`; `y` is valid for writes of `m` rows of `ldy` floats
/// at columns `cols` (within `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn matmul<const D: u8>(j: &Job<'_, &[f32]>) {
    let (x, m, w) = (j.x, j.m, j.w);
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        if m >= GEMM_MIN_ROWS || w.layout == Layout::Transposed {
            gemm::<D>(&j.with(x.as_ptr(), j.ldx))
        } else {
            gemv::<D>(&j.with(x.as_ptr(), j.ldx))
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` activation rows of `w.cols` values
/// (at stride `ldx` where given; bf16 pairs for the bf16 kernels); `w` holds rows in the
/// layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at columns
/// `cols` (within `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn gemv<const D: u8>(j: &Job<'_, *const f32>) {
    let Job { x, ldx, m, w, y, ldy, cols } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let rb = k * w.format.row_bytes(1);
        let wp = w.data.as_ptr();
        // Up to 4 rows of x: 4 weight rows at a time; more: 3 weight rows against up to 8.
        gemv_blocks(m, cols, 3, |n, nr, i, mr| {
            let b = Rows { x: x.add(i * ldx), ldx, k, w: wp.add(n * rb), rb, y: y.add(i * ldy + n), ldy };
            gemv_dispatch!(nr, mr, |R, M| gemv_block::<D, R, M>(b));
        });
    }
}

/// GEMV of bf16 weights (row layout, k a multiple of 32) with activations reordered by
/// [`crate::matmul::split_even_odd`]: per 64 bytes of a weight row, one load, a shift
/// (even values) and a mask (odd values) give two f32 vectors for two FMAs.
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL; `xs` holds `m` rows of stride `ldx` ≥ `w.cols`
/// (a multiple of 32); `y` is valid for `m` rows of `ldy` floats at columns `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn gemv_bf16_split(j: &Job<'_, &[f32]>) {
    let Job { x: xs, ldx, m, w, y, ldy, cols } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let rb = 2 * k;
        let (x, wp) = (xs.as_ptr(), w.data.as_ptr());
        // Up to 4 rows of x: 4 weight rows at a time; more: 3 weight rows against up to 8.
        gemv_blocks(m, cols, 3, |n, nr, i, mr| {
            let b = Rows { x: x.add(i * ldx), ldx, k, w: wp.add(n * rb), rb, y: y.add(i * ldy + n), ldy };
            gemv_dispatch!(nr, mr, |R, M| split_block::<R, M>(b));
        });
    }
}

/// GEMV of bf16 weights in AMX's tiles ([`crate::quant::tiles::bf16`], `cols.start` a
/// multiple of 32) with activations `x` (`m` rows of `w.cols`): a tile row holds one
/// pair of inputs for 16 weight rows, so a shift (even inputs) and a mask (odd ones)
/// give two vectors of 16 outputs' weights that meet broadcast activations in FMAs, with
/// no sums across lanes.
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL; `w` is in bf16 tiles; `y` is valid for `m` rows of
/// `ldy` floats at columns `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn gemv_bf16_tiles(j: &Job<'_, &[f32]>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        assert!(cols.start.is_multiple_of(32) && x.len() >= m * w.cols);
        assert!(w.data.len() >= crate::quant::tiles::bf16::bytes(w.rows, w.cols) && cols.end <= w.rows);
        // A column pair's weights (2 KiB per 32 inputs) meet every 4 rows in turn while
        // they are in cache: read from memory once, whatever the rows.
        for n in cols.clone().step_by(32) {
            let mut i = 0;
            while i < m {
                let (xp, yp) = (x.as_ptr().add(i * w.cols), y.add(i * ldy));
                i += match m - i {
                    1 => tiles_block::<1>(xp, w, yp, ldy, n, cols.end),
                    2 => tiles_block::<2>(xp, w, yp, ldy, n, cols.end),
                    3 => tiles_block::<3>(xp, w, yp, ldy, n, cols.end),
                    _ => tiles_block::<4>(xp, w, yp, ldy, n, cols.end),
                };
            }
        }
    }
}

/// Stores a column pair's sums (`acc[i][h]`: activation row `i`, columns `n + 16h` on)
/// into the rows of `y`, columns below `end` only.
///
/// # Safety
/// The CPU must have AVX-512F; `y` is valid for `M` rows of `ldy` floats up to `end`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_pair<const M: usize>(acc: &[[__m512; 2]; M], y: *mut f32, ldy: usize, n: usize, end: usize) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        for (i, a) in acc.iter().enumerate() {
            for (h, s) in a.iter().enumerate() {
                let c = n + 16 * h;
                if c < end {
                    let mask = ((1u32 << (end - c).min(16)) - 1) as __mmask16;
                    _mm512_mask_storeu_ps(y.add(i * ldy + c), mask, *s);
                }
            }
        }
    }
}

/// [`gemv_bf16_tiles`] for `M` activation rows and the column pair from `n` (columns
/// below `end`); returns `M`. Each output sums each 32
/// inputs' products (even inputs and odd ones apart, in order, then the two) and adds
/// these sums in input order, as a tile product does: short chains of roundings.
///
/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `M` activation rows of `w.cols`
/// values; `w` is in bf16 tiles; `y` is valid for writes of `M` rows of `ldy` floats at the
/// columns of the block written (from the given column to the end given, within `w.rows`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn tiles_block<const M: usize>(
    x: *const f32,
    w: &WeightView,
    y: *mut f32,
    ldy: usize,
    n: usize,
    end: usize,
) -> usize {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let (k, ksteps) = (w.cols, w.cols / 32);
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // The pair of 16-row groups holding columns n..n + 32: 2 KiB per 32 inputs.
        let base = w.data.as_ptr().add(n / 32 * ksteps * 2048);
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for j in 0..ksteps {
            let t = base.add(j * 2048);
            let mut part = [[[_mm512_setzero_ps(); 2]; 2]; M];
            for p in 0..16 {
                // The next step's lines, and a stretch further on into the L3 cache
                // (harmless past the end).
                _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(2048 + 128 * p) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(t.wrapping_add(2048 + 128 * p + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T2>(t.wrapping_add(16384 + 128 * p) as *const i8);
                _mm_prefetch::<_MM_HINT_T2>(t.wrapping_add(16384 + 128 * p + 64) as *const i8);
                let v = [
                    _mm512_loadu_si512(t.add(64 * p) as *const _),
                    _mm512_loadu_si512(t.add(1024 + 64 * p) as *const _),
                ];
                let we = v.map(|v| _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
                let wo = v.map(|v| _mm512_castsi512_ps(_mm512_and_si512(v, high)));
                for (i, q) in part.iter_mut().enumerate() {
                    let xe = _mm512_set1_ps(*x.add(i * k + 32 * j + 2 * p));
                    let xo = _mm512_set1_ps(*x.add(i * k + 32 * j + 2 * p + 1));
                    for h in 0..2 {
                        q[h][0] = _mm512_fmadd_ps(xe, we[h], q[h][0]);
                        q[h][1] = _mm512_fmadd_ps(xo, wo[h], q[h][1]);
                    }
                }
            }
            for (a, q) in acc.iter_mut().zip(&part) {
                for h in 0..2 {
                    a[h] = _mm512_add_ps(a[h], _mm512_add_ps(q[h][0], q[h][1]));
                }
            }
        }
        store_pair(&acc, y, ldy, n, end);
        M
    }
}

/// The operands of a GEMV block: `M` activation rows of `k` values at `x` (stride `ldx`)
/// against `R` weight rows at `w` (`rb` bytes each), into `M` rows of `y` (stride `ldy`),
/// `R` columns from its start.
#[derive(Clone, Copy)]
struct Rows {
    x: *const f32,
    ldx: usize,
    k: usize,
    w: *const u8,
    rb: usize,
    y: *mut f32,
    ldy: usize,
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `b` is valid for its `R` weight rows (bf16) and `M`
/// activation rows, as [`Rows`] says.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn split_block<const R: usize, const M: usize>(b: Rows) {
    let Rows { x, ldx, k, w, rb, y, ldy } = b;
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // One sum per output, even then odd products: the same order whatever R and M are,
        // so a row's result does not depend on the rows batched with it.
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut kk = 0;
        while kk < k {
            let mut we = [_mm512_setzero_ps(); R];
            let mut wo = [_mm512_setzero_ps(); R];
            for j in 0..R {
                // The same line of the next block of rows (harmless past the end).
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + R) * rb + 2 * kk) as *const i8);
                let v = _mm512_loadu_si512(w.add(j * rb + 2 * kk) as *const _);
                we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xe = _mm512_loadu_ps(x.add(i * ldx + kk));
                let xo = _mm512_loadu_ps(x.add(i * ldx + kk + 16));
                for j in 0..R {
                    a[j] = _mm512_fmadd_ps(xo, wo[j], _mm512_fmadd_ps(xe, we[j], a[j]));
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
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `b` is valid for its `R` weight rows (format `D`)
/// and `M` activation rows, as [`Rows`] says.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn gemv_block<const D: u8, const R: usize, const M: usize>(b: Rows) {
    let Rows { x, ldx, k, w, rb, y, ldy } = b;
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let es = if D == F32 { 4 } else { 2 };
        let mut acc = [[_mm512_setzero_ps(); R]; M];
        let mut kk = 0;
        while kk + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); R];
            for (j, v) in wv.iter_mut().enumerate() {
                // Prefetch the same line of the next block of rows (harmless past the end).
                if (kk * es) % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((j + 2 * R) * rb + kk * es) as *const i8);
                }
                *v = load16::<D>(w.add(j * rb + kk * es));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i * ldx + kk));
                for j in 0..R {
                    a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                }
            }
            kk += 16;
        }
        if kk < k {
            let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); R];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = load16_mask::<D>(w.add(j * rb + kk * es), mask);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(i * ldx + kk));
                for j in 0..R {
                    a[j] = _mm512_fmadd_ps(xv, wv[j], a[j]);
                }
            }
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
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `x` holds `m` activation rows of `w.cols` values
/// (bf16 pairs for the bf16 kernels); `w` holds rows in the layout this kernel reads; `y`
/// is valid for writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn gemm<const D: u8>(j: &Job<'_, *const f32>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let es = w.format.row_bytes(1);
        let rb = k * es;
        let wp = w.data.as_ptr();
        let mut panel = crate::alloc::Aligned::<f32>::zeroed(KC * NR);
        let mut np = cols.start;
        while np < cols.end {
            let nr = (cols.end - np).min(NR);
            let (m0, m1) = masks(nr);
            let mut kc = 0;
            while kc < k {
                let kb = (k - kc).min(KC);
                // Pack W[np..np+nr, kc..kc+kb] transposed to f32: panel[kk * NR + j].
                if w.layout == Layout::Transposed {
                    // Stored row kc + kk holds W[.., kc + kk]: its values np.. are the row.
                    for kk in 0..kb {
                        let row = wp.add(((kc + kk) * w.rows + np) * es);
                        let dst = panel.as_mut_ptr().add(kk * NR);
                        _mm512_storeu_ps(dst, load16_mask::<D>(row, m0));
                        _mm512_storeu_ps(dst.add(16), load16_mask::<D>(row.wrapping_add(16 * es), m1));
                    }
                } else {
                    for j in 0..nr {
                        let row = wp.add((np + j) * rb + kc * es);
                        for kk in (0..kb).step_by(16) {
                            let n = (kb - kk).min(16);
                            let v = load16_mask::<D>(row.add(kk * es), ((1u32 << n) - 1) as __mmask16);
                            let mut tmp = [0f32; 16];
                            _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                            for (t, &val) in tmp.iter().enumerate().take(n) {
                                *panel.get_unchecked_mut((kk + t) * NR + j) = val;
                            }
                        }
                    }
                    zero_columns(&mut panel, NR, nr, kb);
                }
                let first = kc == 0;
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(MR);
                    let a = x.add(i * k + kc);
                    let out = Out { c: y.add(i * ldy + np), ldc: ldy, first, masks: (m0, m1) };
                    let p = panel.as_ptr();
                    by_rows!(mr, |M| micro::<M>(a, k, p, kb, out));
                    i += mr;
                }
                kc += kb;
            }
            np += nr;
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables
/// (`avx512f,avx512bw,avx512vl,fma,f16c`); `a` holds `M` rows of the panel's depth at
/// stride `lda`; the panel holds its depth of 32 packed columns; `out` is valid for reads
/// and writes of `M` rows in the columns of its masks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn micro<const M: usize>(a: *const f32, lda: usize, panel: *const f32, kb: usize, out: Out) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let mut acc = out.load::<M>();
        for kk in 0..kb {
            let b0 = _mm512_loadu_ps(panel.add(kk * NR));
            let b1 = _mm512_loadu_ps(panel.add(kk * NR + 16));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * lda + kk));
                r[0] = _mm512_fmadd_ps(av, b0, r[0]);
                r[1] = _mm512_fmadd_ps(av, b1, r[1]);
            }
        }
        out.store(&acc);
    }
}
