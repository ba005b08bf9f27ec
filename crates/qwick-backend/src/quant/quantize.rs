//! Quantization: f32 weights into the blocks of a GGML format, the inverse of
//! [`super::dequant`].
//!
//! Every block is fitted on its own. The 32-value formats take their scale from the block's
//! extreme value, as GGML's reference quantizers do (so files match other tools' bit for bit
//! on most blocks). The K and IQ4 formats search their sub-block scales: a grid of trial
//! scales, each followed by the weighted least-squares scale (and offset) for the codes it
//! gives, keeping the fit with the smallest weighted squared error; the sub-block scales are
//! then quantized against the super-block's f16 scale and every code is recomputed with the
//! scale the file will hold. Weights are `x²` for the symmetric formats (large values matter
//! most) and `rms + |x|` or `|x|` for the ones with an offset.
//!
//! Nothing here panics on any input value: NaN and infinities give some finite or NaN block,
//! never an out-of-range code.

use super::by_block_codec;
use crate::format::Format;
use crate::quant::grids::KVALUES_IQ4NL;

/// Whether qwick can write weights in `format`.
pub fn can_quantize(format: Format) -> bool {
    use Format::*;
    matches!(
        format,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_NL | IQ4_XS
    )
}

/// Quantizes `src` (whole blocks of `format`) into `dst` (exactly their bytes). Panics for a
/// format [`can_quantize`] refuses or on lengths that are not whole blocks.
pub fn quantize(format: Format, src: &[f32], dst: &mut [u8]) {
    let (block, bytes) = (format.block(), format.block_bytes());
    assert!(src.len().is_multiple_of(block), "{} values are not a whole number of {format} blocks", src.len());
    assert_eq!(dst.len(), src.len() / block * bytes, "{format}: {} bytes for {} values", dst.len(), src.len());
    assert!(can_quantize(format), "qwick does not write {format} weights");
    #[cfg(target_arch = "x86_64")]
    if crate::isa::Level::Avx2.supported() {
        // SAFETY: the CPU has AVX2, the only feature the function is compiled for. The code is
        // the same as the portable path's; Rust never fuses a multiply and an add on its own,
        // so the wider vectors give the same bytes.
        return unsafe { quantize_avx2(format, src, dst) };
    }
    quantize_blocks(format, src, dst)
}

/// [`quantize_blocks`] compiled for AVX2 (eight-lane vectors for the search loops).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(format: Format, src: &[f32], dst: &mut [u8]) {
    quantize_blocks(format, src, dst)
}

#[inline(always)]
fn quantize_blocks(format: Format, src: &[f32], dst: &mut [u8]) {
    by_block_codec!(format, src, dst,
        Format::F32 | Format::F16 | Format::BF16 => format.encode_floats(src, dst),
        _ => unreachable!("checked by can_quantize"),
    )
}

/// Quantizes `rows` rows of `src` on `threads` threads (rows split evenly; each row is
/// independent, so the bytes do not depend on the thread count).
pub fn quantize_rows(format: Format, src: &[f32], rows: usize, dst: &mut [u8], threads: usize) {
    if rows == 0 {
        return;
    }
    let (cols, row_bytes) = (src.len() / rows, dst.len() / rows);
    let threads = threads.clamp(1, rows);
    if threads == 1 {
        return quantize(format, src, dst);
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (x, y) in src.chunks(per * cols).zip(dst.chunks_mut(per * row_bytes)) {
            s.spawn(move || quantize(format, x, y));
        }
    });
}

#[inline(always)]
fn blocks<const N: usize, const B: usize>(src: &[f32], dst: &mut [u8], f: impl Fn(&[f32; N], &mut [u8; B])) {
    for (x, b) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B)) {
        // chunks_exact yields exactly N and B elements.
        f(x.try_into().unwrap(), b.try_into().unwrap());
    }
}

/// Stores `x` as a little-endian f16 at `b[at..]` and returns the value stored, widened.
#[inline(always)]
fn put_f16(b: &mut [u8], at: usize, x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    b[at..at + 2].copy_from_slice(&h.to_bits().to_le_bytes());
    h.to_f32()
}

/// The value of largest magnitude (the first such, with its sign).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

#[inline(always)]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// `v` truncated to an integer in `0..=max` (the 32-value formats' rounding: `v` already
/// carries its +0.5).
#[inline(always)]
fn trunc_code(v: f32, max: i32) -> u8 {
    (v as i32).clamp(0, max) as u8
}

/// Packs 32 four-bit codes: code `j < 16` in the low nibble of byte `j`, code `16 + j` in its
/// high nibble.
#[inline(always)]
fn pack_nibbles_32(q: &[u8; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (q[j] & 15) | (q[j + 16] & 15) << 4;
    }
}

/// Bit 4 of 32 five-bit codes, bit `j` of the result for code `j`.
#[inline(always)]
fn high_bits_32(q: &[u8; 32]) -> u32 {
    q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (((v >> 4) & 1) as u32) << j)
}

#[inline(always)]
fn q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(b, 0, d);
    for j in 0..32 {
        // Ties away from zero, as GGML's reference rounds here.
        b[2 + j] = ((x[j] * id).round() as i32).clamp(-127, 127) as i8 as u8;
    }
}

/// Q4_0 / Q5_0: `d = max / -half` with `max` the value of largest magnitude, so it maps to the
/// code 0 end of the range.
#[inline(always)]
fn symmetric_32(x: &[f32; 32], half: f32, b: &mut [u8], q: &mut [u8; 32]) {
    let d = signed_absmax(x) / -half;
    let id = inv(d);
    put_f16(b, 0, d);
    let max = 2 * half as i32 - 1;
    for j in 0..32 {
        q[j] = trunc_code(x[j] * id + half + 0.5, max);
    }
}

/// Q4_1 / Q5_1: `d = (max − min) / levels`, offset `min`.
#[inline(always)]
fn affine_32(x: &[f32; 32], levels: f32, b: &mut [u8], q: &mut [u8; 32]) {
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let lo = if lo.is_finite() { lo } else { 0.0 };
    let d = (hi - lo) / levels;
    let id = inv(d);
    put_f16(b, 0, d);
    put_f16(b, 2, lo);
    for j in 0..32 {
        q[j] = trunc_code((x[j] - lo) * id + 0.5, levels as i32);
    }
}

#[inline(always)]
fn q4_0(x: &[f32; 32], b: &mut [u8; 18]) {
    let mut q = [0u8; 32];
    symmetric_32(x, 8.0, b, &mut q);
    pack_nibbles_32(&q, &mut b[2..]);
}

#[inline(always)]
fn q4_1(x: &[f32; 32], b: &mut [u8; 20]) {
    let mut q = [0u8; 32];
    affine_32(x, 15.0, b, &mut q);
    pack_nibbles_32(&q, &mut b[4..]);
}

#[inline(always)]
fn q5_0(x: &[f32; 32], b: &mut [u8; 22]) {
    let mut q = [0u8; 32];
    symmetric_32(x, 16.0, b, &mut q);
    b[2..6].copy_from_slice(&high_bits_32(&q).to_le_bytes());
    pack_nibbles_32(&q, &mut b[6..]);
}

#[inline(always)]
fn q5_1(x: &[f32; 32], b: &mut [u8; 24]) {
    let mut q = [0u8; 32];
    affine_32(x, 31.0, b, &mut q);
    b[4..8].copy_from_slice(&high_bits_32(&q).to_le_bytes());
    pack_nibbles_32(&q, &mut b[8..]);
}

/// The trial scales of an affine search: `(nmax + first + step·i) / range` for `i` in
/// `0..=steps`.
struct Grid {
    first: f32,
    step: f32,
    steps: usize,
}

/// `v` rounded to the nearest integer (ties to even) in `lo..=hi` (integers), as an f32; NaN
/// gives `lo`. Adding and subtracting 1.5·2²³ rounds in the FPU's default mode without a
/// library call, exact for the small clamped range; the search loops stay in floats so they
/// vectorize.
#[inline(always)]
fn round_clamp(v: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    // Plain comparisons (not f32::max/min) compile to one SIMD instruction each; NaN gives `lo`.
    let v = if v > lo { v } else { lo };
    let v = if v < hi { v } else { hi };
    (v + MAGIC) - MAGIC
}

/// Sums of `f(j)` over `j < n` (a multiple of 8) in eight lanes, so the loop vectorizes; the
/// lanes are added in a fixed order.
#[inline(always)]
fn lanes<const K: usize>(n: usize, f: impl Fn(usize) -> [f32; K]) -> [f32; K] {
    let mut acc = [[0f32; 8]; K];
    for c in 0..n / 8 {
        for l in 0..8 {
            let v = f(8 * c + l);
            for k in 0..K {
                acc[k][l] += v[k];
            }
        }
    }
    std::array::from_fn(|k| acc[k].iter().sum())
}

/// Fits `x ≈ scale · q − min` with integer codes `q` in `0..=nmax` and `min ≥ 0` (the range
/// always holds zero), minimizing `Σ w (scale·q − min − x)²` (or `Σ w |scale·q − min − x|`
/// with `mad`) over the trial scales of `grid`,
/// each refined by the weighted least-squares scale and offset for its codes. Returns
/// `(scale, min)`; `q` gets the codes of the best fit. `x.len()` is 16 or 32.
#[inline(always)]
fn fit_affine(x: &[f32], w: &[f32], nmax: i32, grid: &Grid, mad: bool, q: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (w, q) = (&w[..n], &mut q[..n]);
    let (mut lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    lo = lo.min(0.0);
    if !(hi > lo) {
        q.fill(0);
        return (0.0, if lo.is_finite() { -lo } else { 0.0 });
    }
    let [sw, swx] = lanes(n, |j| [w[j], w[j] * x[j]]);
    let nf = nmax as f32;
    // Σ w·d² (or Σ w·|d| when `mad`) of the residuals d of the codes at inverse scale `is`
    // around `lo` under the fit (s, o).
    let err = |is: f32, lo: f32, s: f32, o: f32| {
        lanes(n, |j| {
            let c = round_clamp(is * (x[j] - lo), 0.0, nf);
            let d = s * c + o - x[j];
            [w[j] * if mad { d.abs() } else { d * d }]
        })[0]
    };
    let sums = |is: f32, lo: f32| {
        lanes(n, |j| {
            let c = round_clamp(is * (x[j] - lo), 0.0, nf);
            [w[j] * c, w[j] * c * c, w[j] * c * x[j]]
        })
    };
    // The first trial: the plain min/max scale, kept as is. After each improvement the trial
    // codes are taken relative to the new offset (as GGML's reference search does, so the
    // files agree with its output).
    let is0 = nf / (hi - lo);
    let (mut scale, mut off) = (1.0 / is0, lo);
    let (mut best_is, mut best_lo) = (is0, lo);
    let mut best = err(is0, lo, scale, off);
    for i in 0..=grid.steps {
        let is = (nf + grid.first + grid.step * i as f32) / (hi - off);
        let [sl, sl2, sxl] = sums(is, off);
        let det = sw * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let (mut s, mut o) = ((sw * sxl - swx * sl) / det, (sl2 * swx - sl * sxl) / det);
        if o > 0.0 {
            o = 0.0;
            s = sxl / sl2;
        }
        let e = err(is, off, s, o);
        if e < best {
            (best_is, best_lo) = (is, off);
            (best, scale, off) = (e, s, o);
        }
    }
    for (c, &v) in q.iter_mut().zip(x) {
        *c = round_clamp(best_is * (v - best_lo), 0.0, nf) as u8;
    }
    (scale, -off)
}

/// Fits `x ≈ scale · q` with integer codes `q` in `-nmax..nmax`, weights `x²`: trial scales
/// that map the largest-magnitude value to `−(nmax + 0.1 i)`, `i` in `-9..=9` (0 first), each refined by
/// its least-squares scale, keeping the one that explains most of `Σ w x²`. `x.len()` is 16.
#[inline(always)]
fn fit_symmetric(x: &[f32], nmax: i32, q: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    let q = &mut q[..x.len()];
    if !(max.abs() > 1e-30) {
        q.fill(0);
        return 0.0;
    }
    let (lo, hi) = (-nmax as f32, (nmax - 1) as f32);
    let (mut best, mut scale, mut best_is) = (0f32, 0f32, 0f32);
    // The plain scale first, so that it wins ties.
    for i in std::iter::once(0).chain((-9..=9).filter(|&i| i != 0)) {
        let is = -(nmax as f32 + 0.1 * i as f32) / max;
        // Summed in order: the trial scales often tie exactly (constant blocks), and the order
        // of the additions then decides, as in GGML's search.
        let (mut sxl, mut sl2) = (0f32, 0f32);
        for &v in x {
            let c = round_clamp(is * v, lo, hi);
            let w = v * v;
            sxl += w * v * c;
            sl2 += w * c * c;
        }
        if sl2 > 0.0 && sxl * sxl > best * sl2 {
            scale = sxl / sl2;
            (best, best_is) = (scale * sxl, is);
        }
    }
    for (c, &v) in q.iter_mut().zip(x) {
        *c = round_clamp(best_is * v, lo, hi) as i8;
    }
    scale
}

/// Fits 16 values `x ≈ scale · q`, `q` in `-4..4`, weights `x²`: codes from the plain scale
/// (the largest-magnitude value at −4), then passes that move single codes to the value best
/// for the current least-squares scale while that explains more of `Σ w x²` (at most five
/// passes, until none moves). Returns the least-squares scale of the final codes.
#[inline(always)]
fn fit_q3(x: &[f32]) -> f32 {
    let max = signed_absmax(x);
    if !(max.abs() > 1e-30) {
        return 0.0;
    }
    let is = -4.0 / max;
    let mut l = [0f32; 16];
    let (mut sxl, mut sl2) = (0f32, 0f32);
    for (c, &v) in l.iter_mut().zip(x) {
        *c = round_clamp(is * v, -4.0, 3.0);
        let w = v * v;
        sxl += w * v * *c;
        sl2 += w * *c * *c;
    }
    for _ in 0..5 {
        let mut moved = false;
        for (c, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let rest_xl = sxl - w * v * *c;
            if rest_xl <= 0.0 {
                continue;
            }
            let rest_l2 = sl2 - w * *c * *c;
            let new = round_clamp(v * rest_l2 / rest_xl, -4.0, 3.0);
            if new == *c {
                continue;
            }
            let (nxl, nl2) = (rest_xl + w * v * new, rest_l2 + w * new * new);
            if nl2 > 0.0 && nxl * nxl * sl2 > sxl * sxl * nl2 {
                (*c, sxl, sl2) = (new, nxl, nl2);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    if sl2 > 0.0 {
        sxl / sl2
    } else {
        0.0
    }
}

/// Quantizes positive sub-block values (scales or mins) to integers in `0..=levels` against
/// their largest: returns the f16-rounded step and the integers.
#[inline(always)]
fn quantize_positive<const N: usize>(v: &[f32; N], levels: f32, b: &mut [u8], at: usize) -> (f32, [u8; N]) {
    let max = v.iter().fold(0f32, |a, &s| a.max(s));
    let is = if max > 0.0 { levels / max } else { 0.0 };
    let mut l = [0u8; N];
    for (l, &s) in l.iter_mut().zip(v) {
        *l = round_clamp(is * s, 0.0, levels) as u8;
    }
    (put_f16(b, at, if max > 0.0 { max / levels } else { 0.0 }), l)
}

#[inline(always)]
fn q2_k(x: &[f32; 256], b: &mut [u8; 84]) {
    let grid = Grid { first: -0.5, step: 0.1, steps: 15 };
    let (mut sc, mut mn) = ([0f32; 16], [0f32; 16]);
    let mut q = [0u8; 256];
    for s in 0..16 {
        let xs = &x[16 * s..16 * s + 16];
        let w: [f32; 16] = std::array::from_fn(|i| xs[i].abs());
        (sc[s], mn[s]) = fit_affine(xs, &w, 3, &grid, true, &mut q[16 * s..]);
    }
    let (d, ls) = quantize_positive(&sc, 15.0, b, 80);
    let (dmin, lm) = quantize_positive(&mn, 15.0, b, 82);
    for s in 0..16 {
        b[s] = ls[s] | lm[s] << 4;
        let (dl, ml) = (d * ls[s] as f32, dmin * lm[s] as f32);
        if dl == 0.0 {
            q[16 * s..16 * s + 16].fill(0);
            continue;
        }
        for i in 16 * s..16 * s + 16 {
            q[i] = round_clamp((x[i] + ml) / dl, 0.0, 3.0) as u8;
        }
    }
    let qs = &mut b[16..80];
    qs.fill(0);
    for (i, &c) in q.iter().enumerate() {
        let (h, k, l) = (i / 128, (i / 32) % 4, i % 32);
        qs[32 * h + l] |= c << (2 * k);
    }
}

/// Quantizes signed sub-block scales to integers in `lo..=hi` against the one of largest
/// magnitude (which maps to `lo`): returns the f16-rounded step and the integers.
#[inline(always)]
fn quantize_signed<const N: usize>(v: &[f32; N], lo: i32, hi: i32, b: &mut [u8], at: usize) -> (f32, [i32; N]) {
    let max = signed_absmax(v);
    let is = if max != 0.0 { lo as f32 / max } else { 0.0 };
    let l = std::array::from_fn(|i| round_clamp(is * v[i], lo as f32, hi as f32) as i32);
    (put_f16(b, at, inv(is)), l)
}

#[inline(always)]
fn q3_k(x: &[f32; 256], b: &mut [u8; 110]) {
    let mut sc = [0f32; 16];
    let mut q = [0i8; 256];
    for s in 0..16 {
        sc[s] = fit_q3(&x[16 * s..16 * s + 16]);
    }
    let (d, ls) = quantize_signed(&sc, -32, 31, b, 108);
    let scales = &mut b[96..108];
    scales.fill(0);
    for (s, &l) in ls.iter().enumerate() {
        let u = (l + 32) as u8;
        scales[s % 8] |= (u & 15) << (4 * (s / 8));
        scales[8 + s % 4] |= (u >> 4) << (2 * (s / 4));
    }
    for s in 0..16 {
        let dl = d * ls[s] as f32;
        let id = inv(dl);
        for i in 16 * s..16 * s + 16 {
            q[i] = round_clamp(x[i] * id, -4.0, 3.0) as i8;
        }
    }
    b[..96].fill(0);
    for (i, &c) in q.iter().enumerate() {
        let u = (c + 4) as u8;
        let (h, k, l) = (i / 128, (i / 32) % 4, i % 32);
        b[32 + 32 * h + l] |= (u & 3) << (2 * k);
        b[l] |= (u >> 2) << (i / 32);
    }
}

/// Q4_K / Q5_K: eight sub-blocks of 32 with 6-bit scales and mins; returns the codes.
#[inline(always)]
fn k_affine(x: &[f32; 256], nmax: i32, grid: &Grid, b: &mut [u8]) -> [u8; 256] {
    let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
    let mut q = [0u8; 256];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| rms + xs[i].abs());
        (sc[j], mn[j]) = fit_affine(xs, &w, nmax, grid, false, &mut q[32 * j..]);
    }
    let (d, ls) = quantize_positive(&sc, 63.0, b, 0);
    let (dmin, lm) = quantize_positive(&mn, 63.0, b, 2);
    let s = &mut b[4..16];
    s.fill(0);
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 15) | (lm[j] & 15) << 4;
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    for j in 0..8 {
        let (dl, ml) = (d * ls[j] as f32, dmin * lm[j] as f32);
        let id = inv(dl);
        for i in 32 * j..32 * j + 32 {
            q[i] = if dl == 0.0 { 0 } else { round_clamp((x[i] + ml) * id, 0.0, nmax as f32) as u8 };
        }
    }
    q
}

/// Stores the low nibbles of Q4_K / Q5_K codes: weight `64 c + 32 k + l` in nibble `k` of
/// `qs[32 c + l]`.
#[inline(always)]
fn pack_k_nibbles(q: &[u8; 256], qs: &mut [u8]) {
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = (q[64 * c + l] & 15) | (q[64 * c + 32 + l] & 15) << 4;
        }
    }
}

#[inline(always)]
fn q4_k(x: &[f32; 256], b: &mut [u8; 144]) {
    let q = k_affine(x, 15, &Grid { first: -1.0, step: 0.1, steps: 20 }, b);
    pack_k_nibbles(&q, &mut b[16..]);
}

#[inline(always)]
fn q5_k(x: &[f32; 256], b: &mut [u8; 176]) {
    let q = k_affine(x, 31, &Grid { first: -0.5, step: 0.1, steps: 15 }, b);
    let qh = &mut b[16..48];
    qh.fill(0);
    for (i, &c) in q.iter().enumerate() {
        qh[i % 32] |= ((c >> 4) & 1) << (i / 32);
    }
    pack_k_nibbles(&q, &mut b[48..]);
}

#[inline(always)]
fn q6_k(x: &[f32; 256], b: &mut [u8; 210]) {
    let mut sc = [0f32; 16];
    let mut q = [0i8; 256];
    for s in 0..16 {
        sc[s] = fit_symmetric(&x[16 * s..16 * s + 16], 32, &mut q[16 * s..]);
    }
    let (d, ls) = quantize_signed(&sc, -128, 127, b, 208);
    for s in 0..16 {
        b[192 + s] = ls[s] as i8 as u8;
        let id = inv(d * ls[s] as f32);
        for i in 16 * s..16 * s + 16 {
            q[i] = round_clamp(x[i] * id, -32.0, 31.0) as i8;
        }
    }
    b[..192].fill(0);
    for (i, &c) in q.iter().enumerate() {
        let u = (c + 32) as u8;
        let h = i / 128;
        b[64 * h + i % 64] |= (u & 15) << (4 * ((i / 64) % 2));
        b[128 + 32 * h + i % 32] |= (u >> 4) << (2 * ((i / 32) % 4));
    }
}

/// Midpoints between consecutive IQ4 grid values: the index of the value nearest `v` is the
/// number of midpoints below it.
const IQ4_MIDS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (KVALUES_IQ4NL[i] as f32 + KVALUES_IQ4NL[i + 1] as f32) * 0.5;
        i += 1;
    }
    m
};

/// The index of the IQ4 grid value nearest each integer in `-128..128`.
const IQ4_NEAREST: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let v = i as f32 - 128.0;
        let mut k = 0;
        while k < 15 && v > IQ4_MIDS[k] {
            k += 1;
        }
        t[i] = k as u8;
        i += 1;
    }
    t
};

/// The index of the IQ4 grid value nearest `v` (ties to the lower value): the nearest to the
/// integer nearest `v` from a table, then one step either way if `v` is past a midpoint (grid
/// values are at least 10 apart, so one step is enough).
#[inline(always)]
fn iq4_index(v: f32) -> u8 {
    let i = round_clamp(v, -128.0, 127.0) as i32;
    let k = IQ4_NEAREST[(i + 128) as usize] as usize;
    if k < 15 && v > IQ4_MIDS[k] {
        k as u8 + 1
    } else if k > 0 && !(v > IQ4_MIDS[k - 1]) {
        k as u8 - 1
    } else {
        k as u8
    }
}

/// The grid index whose value is nearest zero (for blocks of zeros).
const IQ4_ZERO: u8 = 8;

/// Fits `x ≈ scale · grid[q]` over the non-linear IQ4 grid, weights `x²`: trial inverse scales
/// mapping the largest-magnitude value near the grid's end, each refined by the least-squares
/// scale for its codes.
#[inline(always)]
fn fit_iq4(x: &[f32; 32]) -> f32 {
    let max = signed_absmax(x);
    if !(max.abs() > 1e-30) {
        return 0.0;
    }
    let k0 = KVALUES_IQ4NL[0] as f32;
    let (mut best, mut scale) = (0f32, 0f32);
    // First the scale mapping the largest value to the grid's far end with its own sign, then
    // inverse scales mapping it near the grid's first value.
    for id in std::iter::once(-k0 / max).chain((-7..=7).map(|i| (k0 + i as f32) / max)) {
        let [sqx, sq2] = lanes(32, |j| {
            let g = KVALUES_IQ4NL[iq4_index(id * x[j]) as usize] as f32;
            let w = x[j] * x[j];
            [w * g * x[j], w * g * g]
        });
        if sq2 > 0.0 && sqx * sqx > best * sq2 {
            scale = sqx / sq2;
            best = scale * sqx;
        }
    }
    scale
}

/// Codes of `x` for the (final) scale `d`.
#[inline(always)]
fn iq4_codes(x: &[f32], d: f32, q: &mut [u8; 32]) {
    let id = inv(d);
    for (c, &v) in q.iter_mut().zip(x) {
        *c = if d == 0.0 { IQ4_ZERO } else { iq4_index(v * id) };
    }
}

#[inline(always)]
fn iq4_nl(x: &[f32; 32], b: &mut [u8; 18]) {
    let mut q = [0u8; 32];
    let d = put_f16(b, 0, fit_iq4(x));
    iq4_codes(x, d, &mut q);
    pack_nibbles_32(&q, &mut b[2..]);
}

#[inline(always)]
fn iq4_xs(x: &[f32; 256], b: &mut [u8; 136]) {
    let mut sc = [0f32; 8];
    let mut q = [0u8; 32];
    for (g, s) in sc.iter_mut().enumerate() {
        // 32-value slices of a 256-value block.
        *s = fit_iq4(x[32 * g..32 * g + 32].try_into().unwrap());
    }
    let (d, ls) = quantize_signed(&sc, -32, 31, b, 0);
    let mut scales_h = 0u16;
    b[4..8].fill(0);
    for g in 0..8 {
        let u = (ls[g] + 32) as u8;
        b[4 + g / 2] |= (u & 15) << (4 * (g % 2));
        scales_h |= ((u >> 4) as u16) << (2 * g);
        iq4_codes(&x[32 * g..32 * g + 32], d * ls[g] as f32, &mut q);
        pack_nibbles_32(&q, &mut b[8 + 16 * g..]);
    }
    b[2..4].copy_from_slice(&scales_h.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Quantizing and dequantizing keeps values close, for every writable format, and blocks
    /// of zeros, constants and extreme values give finite, in-range results.
    #[test]
    fn round_trips_every_format() {
        let mut seed = 7u64;
        let n = 4096;
        let mut x: Vec<f32> = (0..n).map(|_| rng(&mut seed) * 0.05).collect();
        x[256..288].fill(0.0);
        x[512..544].fill(0.01);
        x[1000] = 3.0;
        for &f in Format::ALL.iter().filter(|&&f| can_quantize(f)) {
            let mut b = vec![0u8; f.bytes_for(n).unwrap()];
            quantize(f, &x, &mut b);
            let y = f.to_f32_vec(&b);
            let rms = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / n as f32).sqrt();
            assert!(rms < 0.02, "{f}: rms error {rms}");
            assert!(y[256..288].iter().all(|&v| v == 0.0), "{f}: zeros");
            assert!(y.iter().all(|v| v.is_finite()), "{f}: non-finite values");
        }
    }

    #[test]
    fn iq4_index_is_nearest() {
        for v in -200..200 {
            let v = v as f32 * 0.7;
            let i = iq4_index(v) as usize;
            let d = (KVALUES_IQ4NL[i] as f32 - v).abs();
            assert!(KVALUES_IQ4NL.iter().all(|&g| (g as f32 - v).abs() >= d), "{v}");
        }
    }

    #[test]
    fn threads_do_not_change_bytes() {
        let mut seed = 3u64;
        let x: Vec<f32> = (0..8 * 512).map(|_| rng(&mut seed)).collect();
        let f = Format::Q4_K;
        let mut a = vec![0u8; f.bytes_for(x.len()).unwrap()];
        let mut b = a.clone();
        quantize_rows(f, &x, 8, &mut a, 1);
        quantize_rows(f, &x, 8, &mut b, 3);
        assert_eq!(a, b);
    }
}
