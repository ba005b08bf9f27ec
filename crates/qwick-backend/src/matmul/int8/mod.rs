//! Products with quantized weights as integer dot products.
//!
//! For a weight in a quantized format, activations are quantized per 32 values to int8 with
//! an f32 scale ([`ActQ8`]); a weight group of 16 or 32 values is `s · (u − o) + m` (see
//! [`crate::quant::tiles`]), so each dot product is an exact integer sum per group, scaled once:
//!
//! `acc += (Σ u·q − o·Σ q) · (s · dx)  [+ Σ q · (m · dx)]`
//!
//! in that order, group after group. The scalar kernel (`group_scalar`) computes exactly this
//! with `mul_add`; the SIMD kernels compute the same operations lane by lane, so they equal it
//! bit for bit: `vpdpbusd` on AVX-512 VNNI (`avx512.rs`), `vpmaddubsw` on AVX-512BW and AVX2
//! (`maddubs.rs`), each in the one row loop of `kernel.rs`.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod kernel;
#[cfg(target_arch = "x86_64")]
mod maddubs;

use crate::isa::Isa;
use crate::isa::Level;
use crate::matmul::job::Job;
use crate::quant::tiles::{self, Spec, ROWS};
use crate::weights::Layout;

/// Activations quantized per 32 values: `x ≈ d · q`, `d = max|x| / 127`, `q` rounded to
/// nearest (ties to even). Rows of `k` (a multiple of 32) values.
pub struct ActQ8 {
    pub m: usize,
    pub k: usize,
    /// `m × k` quantized values.
    pub q: Vec<i8>,
    /// `m × k/32` scales.
    pub d: Vec<f32>,
    /// `m × k/16` sums of each 16 values of `q`.
    pub s16: Vec<i16>,
}

impl ActQ8 {
    /// Quantizes `x` [m, k].
    pub fn quantize(isa: Isa, x: &[f32], m: usize, k: usize) -> ActQ8 {
        assert!(k.is_multiple_of(32), "activation rows of {k} values are not whole 32-value blocks");
        let mut a = ActQ8 { m, k, q: vec![0; m * k], d: vec![0.0; m * k / 32], s16: vec![0; m * k / 16] };
        let blocks = x[..m * k].chunks_exact(32).zip(a.q.chunks_exact_mut(32)).zip(a.d.iter_mut());
        for (((xb, qb), d), s) in blocks.zip(a.s16.chunks_exact_mut(2)) {
            #[cfg(target_arch = "x86_64")]
            if isa.is_avx512() {
                // Safety: the ISA was checked to be supported when it was chosen.
                unsafe { avx512::quantize_block(xb, qb, d, s) };
                continue;
            }
            let _ = isa;
            quantize_block(xb, qb, d, s);
        }
        a
    }

    fn blocks(&self) -> usize {
        self.k / 32
    }
}

/// The scalar quantization of one block of 32 activations.
fn quantize_block(x: &[f32], q: &mut [i8], d: &mut f32, s: &mut [i16]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    *d = amax / 127.0;
    let id = if *d != 0.0 { 1.0 / *d } else { 0.0 };
    for (qv, &xv) in q.iter_mut().zip(x) {
        *qv = (xv * id).round_ties_even() as i8;
    }
    s[0] = q[..16].iter().map(|&v| v as i16).sum();
    s[1] = q[16..].iter().map(|&v| v as i16).sum();
}

/// `y[:, cols] = x · wᵀ` for quantized activations `a` and a weight with integer kernels.
/// `cols.start` is a multiple of 16.
///
/// # Safety
/// `y` must be valid for `a.m` rows of `ldy` floats, and no other thread may write these
/// columns; `isa` must be supported by the CPU.
pub(crate) unsafe fn matmul_q8(isa: Isa, j: &Job<'_, &ActQ8>) {
    let Job { x: a, w, y, ldy, cols, .. } = j.clone();
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let spec = tiles::spec(w.format).expect("matmul_q8 on a format without integer kernels");
        assert!(cols.start.is_multiple_of(ROWS) && a.k == w.cols);
        let k = w.cols;
        let gb = spec.group_bytes(k);
        let mut scratch = Vec::new();
        let mut n = cols.start;
        while n < cols.end {
            let valid = (cols.end - n).min(ROWS);
            let g = n / ROWS;
            let group: &[u8] = match w.layout {
                Layout::Tiles => &w.data[g * gb..(g + 1) * gb],
                Layout::Rows => {
                    // The file's layout: convert this group now.
                    let rows = (w.rows - n).min(ROWS);
                    let rb = w.format.row_bytes(k);
                    scratch.clear();
                    scratch.resize(gb, 0);
                    tiles::repack_into(spec, &w.data[n * rb..(n + rows) * rb], rows, k, &mut scratch);
                    &scratch
                }
                Layout::Transposed => unreachable!("integer formats are not read transposed"),
            };
            group_kernel(isa, spec, group, a, y.add(n), ldy, valid);
            n += valid;
        }
    }
}

/// One group of 16 weight rows against every row of `a`: `y[i·ldy + r]` for `r < valid`.
///
/// # Safety
/// `isa` is supported; `group` is a whole tile group of `a.k` weights; `y` is valid for writes of
/// `a.m` rows of `ldy` floats from column 0 to `valid`.
unsafe fn group_kernel(isa: Isa, spec: &Spec, group: &[u8], a: &ActQ8, y: *mut f32, ldy: usize, valid: usize) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::format::Format;
            use avx512::vnni::group as vnni;
            use kernel::by_format;
            use maddubs::{avx2::group as maddubs256, avx512::group as maddubs512};
            if isa.level() >= Level::Avx512Vnni {
                return by_format!(spec.format, vnni(group, a, y, ldy, valid));
            }
            if isa.level() == Level::Avx512 {
                return by_format!(spec.format, maddubs512(group, a, y, ldy, valid));
            }
            if isa.level() == Level::Avx2 {
                return by_format!(spec.format, maddubs256(group, a, y, ldy, valid));
            }
        }
        let _ = isa;
        group_scalar(spec, group, a, y, ldy, valid)
    }
}

/// The reference: the integer dot product of each scale group, scaled and accumulated in order.
///
/// # Safety
/// `group` is a whole tile group of `a.k` weights; `y` is valid for writes of `a.m` rows of `ldy`
/// floats from column 0 to `valid`.
unsafe fn group_scalar(spec: &Spec, group: &[u8], a: &ActQ8, y: *mut f32, ldy: usize, valid: usize) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let (k, nb) = (a.k, a.blocks());
        for r in 0..valid {
            for i in 0..a.m {
                let mut acc = 0f32;
                for j in 0..nb {
                    let up = tiles::unpack(spec, group, j, r);
                    let dx = a.d[i * nb + j];
                    let q = &a.q[i * k + 32 * j..i * k + 32 * j + 32];
                    let (s0, s1) = (a.s16[i * 2 * nb + 2 * j] as i32, a.s16[i * 2 * nb + 2 * j + 1] as i32);
                    let dot = |t: std::ops::Range<usize>| t.map(|t| up.u[t] as i32 * q[t] as i32).sum::<i32>();
                    let groups: &[(std::ops::Range<usize>, i32)] =
                        if spec.g16 { &[(0..16, s0), (16..32, s1)] } else { &[(0..32, s0 + s1)] };
                    for (g, (range, qs)) in groups.iter().enumerate() {
                        let v = dot(range.clone()) - spec.offset * qs;
                        acc = (v as f32).mul_add(up.s[g] * dx, acc);
                        if spec.min {
                            acc = (*qs as f32).mul_add(up.m[g] * dx, acc);
                        }
                    }
                }
                *y.add(i * ldy + r) = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rand_vec;
    use crate::format::Format;
    use crate::quant::dequant::random_blocks;
    use crate::quant::{has_q8_kernel, packed_bytes, repack_into};
    use crate::weights::WeightView;

    #[test]
    fn activation_quantization_is_the_same_on_every_isa() {
        let (m, k) = (3, 320);
        let mut x = rand_vec(m * k, 5);
        x[40..72].fill(0.0);
        x[100] = 7.5;
        let want = ActQ8::quantize(Isa::SCALAR, &x, m, k);
        for isa in Isa::all_supported() {
            let got = ActQ8::quantize(isa, &x, m, k);
            assert_eq!(got.q, want.q, "{isa}");
            assert_eq!(got.d, want.d, "{isa}");
            assert_eq!(got.s16, want.s16, "{isa}");
        }
        // Dequantized values are within half a step of the input.
        for (i, &v) in x.iter().enumerate() {
            let d = want.d[i / 32];
            assert!((want.q[i] as f32 * d - v).abs() <= d * 0.5 + 1e-7);
        }
    }

    /// Every SIMD kernel equals the scalar reference bit for bit, on tiles and on the file's
    /// layout, over shapes that span several super-blocks, leave groups partly empty, and have
    /// activation row counts on both sides of the kernels' row blocking.
    #[test]
    fn integer_kernels_equal_the_reference() {
        for &f in Format::ALL.iter().filter(|f| has_q8_kernel(**f)) {
            for &(m, n, k) in &[(1, 16, 256), (3, 37, 512), (9, 50, 768), (17, 20, 1024)] {
                let src = random_blocks(f, n * k / f.block(), (m * n + k) as u64);
                let x = rand_vec(m * k, 3 + m as u64);
                let a = ActQ8::quantize(Isa::SCALAR, &x, m, k);
                let rows = WeightView::new(f, &src, n, k);
                let mut tiled = vec![0u8; packed_bytes(&rows, false).unwrap()];
                repack_into(&rows, &mut tiled);
                let tiles = WeightView::tiles(f, &tiled, n, k);
                let mut want = vec![0f32; m * n];
                // SAFETY: `want` holds m rows of n floats, all columns written by this one call.
                unsafe {
                    matmul_q8(
                        Isa::SCALAR,
                        &Job { x: &a, ldx: k, m, w: &tiles, y: want.as_mut_ptr(), ldy: n, cols: 0..n },
                    )
                };
                assert!(want.iter().all(|v| v.is_finite()));
                for isa in Isa::all_supported() {
                    for w in [&rows, &tiles] {
                        let mut got = vec![f32::NAN; m * n];
                        // SAFETY: a supported ISA; `got` holds m rows of n floats.
                        unsafe {
                            matmul_q8(isa, &Job { x: &a, ldx: k, m, w, y: got.as_mut_ptr(), ldy: n, cols: 0..n })
                        };
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                g.to_bits() == e.to_bits(),
                                "{f} {isa} {:?} m{m} n{n} k{k} at {i}: {g} vs {e}",
                                w.layout
                            );
                        }
                    }
                }
                // The integer product approximates the product with the dequantized weights.
                let wf = f.to_f32_vec(&src);
                for i in 0..m {
                    for c in 0..n {
                        let exact: f32 = (0..k).map(|t| x[i * k + t] * wf[c * k + t]).sum();
                        let norm: f32 = (0..k).map(|t| (x[i * k + t] * wf[c * k + t]).abs()).sum();
                        let got = want[i * n + c];
                        assert!(
                            (got - exact).abs() <= 0.02 * norm + 1e-6,
                            "{f} ({i}, {c}): {got} vs {exact} (|·| {norm})"
                        );
                    }
                }
            }
        }
    }
}
