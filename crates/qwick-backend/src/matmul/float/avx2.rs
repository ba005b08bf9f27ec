//! f32, bf16 and f16 weights with f32 activations on AVX2: FMA GEMV and GEMM.

use super::*;
use crate::matmul::job::Job;
use crate::matmul::job::GEMM_MIN_ROWS;
use std::arch::x86_64::*;

const NR: usize = 16;
const MR: usize = 6;
const KC: usize = 256;

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is
/// readable for 8 values of format `D`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const D: u8>(p: *const u8) -> __m256 {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match D {
            F32 => _mm256_loadu_ps(p as *const f32),
            BF16 => {
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }
}

/// # Safety
/// The CPU must support what the caller checked; value `i` of `p` (format `D`) is readable.
#[inline]
unsafe fn get<const D: u8>(p: *const u8, i: usize) -> f32 {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        match D {
            F32 => *(p as *const f32).add(i),
            BF16 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
            _ => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
/// rows of `w.cols` values at stride `ldx`; `w` holds rows of format `D`; `y` is valid for
/// writes of `m` rows of `ldy` floats at columns `cols` (within `w.rows`).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul<const D: u8>(j: &Job<'_, &[f32]>) {
    let (x, m) = (j.x, j.m);
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        if m >= GEMM_MIN_ROWS {
            gemm::<D>(&j.with(x.as_ptr(), j.ldx))
        } else {
            gemv::<D>(&j.with(x.as_ptr(), j.ldx))
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
/// activation rows of `w.cols` values (at stride `ldx` where given; bf16 pairs for the bf16
/// kernels); `w` holds rows in the layout this kernel reads; `y` is valid for writes of `m`
/// rows of `ldy` floats at columns `cols` (within `w.rows`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv<const D: u8>(j: &Job<'_, *const f32>) {
    let Job { x, m, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let k = w.cols;
        let rb = k * w.format.row_bytes(1);
        let wp = w.data.as_ptr();
        let mut n = cols.start;
        while n < cols.end {
            let nr = if cols.end - n >= 4 { 4 } else { 1 };
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(2);
                let (xp, yp, wpn) = (x.add(i * k), y.add(i * ldy + n), wp.add(n * rb));
                match (nr, mr) {
                    (4, 1) => gemv_block::<D, 4, 1>(xp, k, wpn, rb, yp, ldy),
                    (4, _) => gemv_block::<D, 4, 2>(xp, k, wpn, rb, yp, ldy),
                    (_, 1) => gemv_block::<D, 1, 1>(xp, k, wpn, rb, yp, ldy),
                    (_, _) => gemv_block::<D, 1, 2>(xp, k, wpn, rb, yp, ldy),
                }
                i += mr;
            }
            n += nr;
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `M`
/// rows of `k` values at stride `ldx`; `w` points at `R` weight rows of format `D`, `rb`
/// bytes each; `y` is valid for writes of `M` rows of `ldy` floats, `R` columns from its
/// start.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_block<const D: u8, const R: usize, const M: usize>(
    x: *const f32,
    k: usize,
    w: *const u8,
    rb: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let es = if D == F32 { 4 } else { 2 };
        let mut acc = [[_mm256_setzero_ps(); R]; M];
        let mut kk = 0;
        while kk + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); R];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = load8::<D>(w.add(j * rb + kk * es));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * k + kk));
                for j in 0..R {
                    a[j] = _mm256_fmadd_ps(xv, wv[j], a[j]);
                }
            }
            kk += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                let mut s = hsum(*v);
                for t in kk..k {
                    s += *x.add(i * k + t) * get::<D>(w.add(j * rb), t);
                }
                *y.add(i * ldy + j) = s;
            }
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma,f16c`); `x` holds `m`
/// activation rows of `w.cols` values (bf16 pairs for the bf16 kernels); `w` holds rows in
/// the layout this kernel reads; `y` is valid for writes of `m` rows of `ldy` floats at
/// columns `cols` (within `w.rows`).
#[target_feature(enable = "avx2,fma,f16c")]
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
        let mut tile = [0f32; MR * NR];
        let mut np = cols.start;
        while np < cols.end {
            let nr = (cols.end - np).min(NR);
            let mut kc = 0;
            while kc < k {
                let kb = (k - kc).min(KC);
                for j in 0..nr {
                    let row = wp.add((np + j) * rb + kc * es);
                    for kk in 0..kb {
                        *panel.get_unchecked_mut(kk * NR + j) = get::<D>(row, kk);
                    }
                }
                zero_columns(&mut panel, NR, nr, kb);
                let first = kc == 0;
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(MR);
                    let a = x.add(i * k + kc);
                    // Full-width tiles write straight into y; a ragged right edge goes through `tile`.
                    let (c, ldc) = if nr == NR { (y.add(i * ldy + np), ldy) } else { (tile.as_mut_ptr(), NR) };
                    if nr != NR && !first {
                        for r in 0..mr {
                            for j in 0..nr {
                                tile[r * NR + j] = *y.add((i + r) * ldy + np + j);
                            }
                        }
                    }
                    let p = panel.as_ptr();
                    match mr {
                        6 => micro::<6>(a, k, p, kb, c, ldc, first),
                        5 => micro::<5>(a, k, p, kb, c, ldc, first),
                        4 => micro::<4>(a, k, p, kb, c, ldc, first),
                        3 => micro::<3>(a, k, p, kb, c, ldc, first),
                        2 => micro::<2>(a, k, p, kb, c, ldc, first),
                        _ => micro::<1>(a, k, p, kb, c, ldc, first),
                    }
                    if nr != NR {
                        for r in 0..mr {
                            for j in 0..nr {
                                *y.add((i + r) * ldy + np + j) = tile[r * NR + j];
                            }
                        }
                    }
                    i += mr;
                }
                kc += kb;
            }
            np += nr;
        }
    }
}

/// # Safety
/// The CPU must support the features this function enables (`avx2,fma`); `a` holds `M` rows
/// of the panel's depth at stride `lda`; the panel holds its depth of 32 packed columns;
/// `c` is valid for reads and writes of `M` rows of `ldc` floats in the columns the masks
/// select.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro<const M: usize>(
    a: *const f32,
    lda: usize,
    panel: *const f32,
    kb: usize,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        if !first {
            for (i, r) in acc.iter_mut().enumerate() {
                r[0] = _mm256_loadu_ps(c.add(i * ldc));
                r[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
            }
        }
        for kk in 0..kb {
            let b0 = _mm256_loadu_ps(panel.add(kk * NR));
            let b1 = _mm256_loadu_ps(panel.add(kk * NR + 8));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                r[0] = _mm256_fmadd_ps(av, b0, r[0]);
                r[1] = _mm256_fmadd_ps(av, b1, r[1]);
            }
        }
        for (i, r) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(i * ldc), r[0]);
            _mm256_storeu_ps(c.add(i * ldc + 8), r[1]);
        }
    }
}
