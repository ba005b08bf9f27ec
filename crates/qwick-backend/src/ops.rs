//! Element-wise and row-wise ops: RMSNorm, RoPE, SwiGLU, softmax, residual add.
//!
//! Each op is written once as plain Rust over slices and compiled three times: as the scalar
//! reference (with `f32::exp`), and inside `#[target_feature]` wrappers for AVX2 and AVX-512
//! where LLVM vectorises the loops and the polynomial `exp` below. Tests compare the variants.

use crate::isa::Isa;

/// Instantiates `$body` as a scalar reference and AVX2 / AVX-512 variants and dispatches on
/// `isa`. The body sees `const FAST: bool` (true in the SIMD variants) to pick `exp_poly`.
macro_rules! multiversion {
    ($isa:expr, fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {{
        #[inline(always)]
        fn $name<const FAST: bool>($($arg: $ty),*) $(-> $ret)? $body
        /// # Safety
        /// The CPU must support AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")]
        unsafe fn v512($($arg: $ty),*) $(-> $ret)? { $name::<true>($($arg),*) }
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn v256($($arg: $ty),*) $(-> $ret)? { $name::<true>($($arg),*) }
        // SAFETY: an `Isa` other than Scalar is only constructed for a CPU that supports it
        // (`Isa::new`), so the target features v512 / v256 enable are present; the
        // functions themselves are safe Rust compiled for those features.
        match $isa.level() {
            #[cfg(target_arch = "x86_64")]
            $crate::isa::Level::Avx512 | $crate::isa::Level::Avx512Vnni | $crate::isa::Level::Avx512Bf16 | $crate::isa::Level::Amx => unsafe { v512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            $crate::isa::Level::Avx2 => unsafe { v256($($arg),*) },
            _ => $name::<false>($($arg),*),
        }
    }};
}
pub(crate) use multiversion;

/// e^x by range reduction and a degree-6 polynomial (Cephes' expf coefficients); within about
/// 2 ulp of `f32::exp` over [-87, 88], 0 below, +inf above. Branch-free so loops vectorise.
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    // The nearest integer n of x·log2(e) by adding 1.5·2²³, which leaves n in the low mantissa
    // bits, so that this vectorises (`round` and float-to-int casts do not). NaN stays NaN.
    let x = x.clamp(-87.5, 88.5);
    const SHIFT: f32 = 12_582_912.0;
    let nb = x * std::f32::consts::LOG2_E + SHIFT;
    let n = nb - SHIFT;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    p = p * r * r + r + 1.0;
    // 2ⁿ: n + 127 (n in [-126, 128]) shifted into the exponent; the shift drops SHIFT's bits.
    p * f32::from_bits(nb.to_bits().wrapping_add(127) << 23)
}

#[inline(always)]
pub(crate) fn exp_sel<const FAST: bool>(x: f32) -> f32 {
    if FAST {
        exp_poly(x)
    } else {
        x.exp()
    }
}

/// Sum of products with 16 independent lanes so LLVM vectorises it (used by attention).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let chunks = n / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += a[c * 16 + l] * b[c * 16 + l];
        }
    }
    let mut s = 0f32;
    for i in chunks * 16..n {
        s += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + s
}

/// `1 / sqrt(mean(x²) + eps)`, the sum of squares in 16 independent lanes.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let d = x.len();
    let mut acc = [0f32; 16];
    let chunks = d / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += x[c * 16 + l] * x[c * 16 + l];
        }
    }
    let mut ss: f32 = acc.iter().sum();
    for v in &x[chunks * 16..] {
        ss += v * v;
    }
    1.0 / (ss / d as f32 + eps).sqrt()
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) * w`,
/// statistics in f32 as transformers computes them.
pub fn rms_norm(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    multiversion!(
        isa,
        fn k(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
            let d = w.len();
            for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                let inv = inv_rms(xr, eps);
                for i in 0..d {
                    or[i] = w[i] * (xr[i] * inv);
                }
                let _ = FAST;
            }
        }
    )
}

/// In-place RMSNorm of each `w.len()`-wide row (per-head q_norm / k_norm).
pub fn rms_norm_inplace(isa: Isa, x: &mut [f32], w: &[f32], eps: f32) {
    multiversion!(
        isa,
        fn k(x: &mut [f32], w: &[f32], eps: f32) {
            let d = w.len();
            for xr in x.chunks_exact_mut(d) {
                let inv = inv_rms(xr, eps);
                for i in 0..d {
                    xr[i] = w[i] * (xr[i] * inv);
                }
                let _ = FAST;
            }
        }
    )
}

/// Rotary embedding in place on each `2 * cos.len()`-wide head of `x`, rotate-half layout:
/// `(x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)` with `x1`, `x2` the two halves of a head.
pub fn rope_inplace(isa: Isa, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    multiversion!(
        isa,
        fn k(x: &mut [f32], cos: &[f32], sin: &[f32]) {
            let h = cos.len();
            for head in x.chunks_exact_mut(2 * h) {
                let (a, b) = head.split_at_mut(h);
                for i in 0..h {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
                let _ = FAST;
            }
        }
    )
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) · up[i]` with `silu(g) = g · sigmoid(g)`.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    multiversion!(
        isa,
        fn k(gate: &mut [f32], up: &[f32]) {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + exp_sel::<FAST>(-*g)) * u;
            }
        }
    )
}

/// `x += y`.
pub fn add_inplace(isa: Isa, x: &mut [f32], y: &[f32]) {
    multiversion!(
        isa,
        fn k(x: &mut [f32], y: &[f32]) {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
            let _ = FAST;
        }
    )
}

/// Softmax of `x` in place (max-subtracted, f32).
pub fn softmax_inplace(isa: Isa, x: &mut [f32]) {
    multiversion!(
        isa,
        fn k(x: &mut [f32]) {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0f32;
            for v in x.iter_mut() {
                *v = exp_sel::<FAST>(*v - m);
                s += *v;
            }
            let inv = 1.0 / s;
            for v in x.iter_mut() {
                *v *= inv;
            }
        }
    )
}

/// `src` rounded to bf16 (nearest, ties to even; NaN stays a quiet NaN): bit for bit
/// [`crate::format::f32_to_bf16`], written branch-free so it vectorises.
pub fn to_bf16(isa: Isa, src: &[f32], dst: &mut [u16]) {
    multiversion!(
        isa,
        fn to_bf16_body(src: &[f32], dst: &mut [u16]) {
            let _ = FAST;
            for (d, &x) in dst.iter_mut().zip(src) {
                let b = x.to_bits();
                let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
                let nan = (b >> 16) | 0x40;
                *d = if b & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded } as u16;
            }
        }
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::check::rand_vec;

    /// Element-wise `|a − b| ≤ tol · (1 + |b|)`, naming the first element that is not.
    pub(crate) fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn exp_poly_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_poly(x), x.exp());
            assert!(((a - b) / b).abs() < 3e-7, "exp({x}) = {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(exp_poly(-200.0), 0.0f32.max(exp_poly(-200.0)));
        assert!(exp_poly(-200.0) < 1e-37);
        assert!(exp_poly(f32::NAN).is_nan());
    }

    #[test]
    fn to_bf16_is_f32_to_bf16_bit_for_bit() {
        let mut x = rand_vec(4099, 3);
        let specials = [0.0, -0.0, 1e-40, -1e-42, f32::MIN_POSITIVE, f32::MAX, f32::INFINITY, f32::NEG_INFINITY];
        x.extend(specials);
        x.extend([f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffc1_2345), f32::from_bits(0x3f80_8000)]);
        x.extend((0..4096u32).map(|i| f32::from_bits(0x3f80_0000 + i * 0x1_0001)));
        let want: Vec<u16> = x.iter().map(|&v| crate::format::f32_to_bf16(v)).collect();
        for isa in [Isa::SCALAR].into_iter().chain(Isa::all_supported()) {
            let mut got = vec![0u16; x.len()];
            to_bf16(isa, &x, &mut got);
            assert_eq!(got, want, "{isa}");
        }
    }

    #[test]
    fn variants_match_scalar() {
        for d in [1usize, 7, 16, 24, 33, 128] {
            let rows = 3;
            let x = rand_vec(rows * d, d as u64);
            let w = rand_vec(d, 99 + d as u64);
            let mut want = vec![0f32; rows * d];
            rms_norm(Isa::SCALAR, &x, &w, 1e-6, &mut want);
            for isa in Isa::all_supported() {
                let mut got = vec![0f32; rows * d];
                rms_norm(isa, &x, &w, 1e-6, &mut got);
                close(&got, &want, 1e-5, "rms_norm");
                let mut ip = x.clone();
                rms_norm_inplace(isa, &mut ip, &w, 1e-6);
                close(&ip, &want, 1e-5, "rms_norm_inplace");

                let mut g0 = x.clone();
                let mut g1 = x.clone();
                silu_mul(Isa::SCALAR, &mut g0, &w.repeat(rows));
                silu_mul(isa, &mut g1, &w.repeat(rows));
                close(&g1, &g0, 1e-6, "silu_mul");

                let mut s0: Vec<f32> = x.iter().map(|v| v * 30.0).collect();
                let mut s1 = s0.clone();
                softmax_inplace(Isa::SCALAR, &mut s0);
                softmax_inplace(isa, &mut s1);
                close(&s1, &s0, 1e-6, "softmax");
            }
            if d % 2 == 0 {
                let h = d / 2;
                let cos = rand_vec(h, 5);
                let sin = rand_vec(h, 6);
                let mut r0 = x.clone();
                rope_inplace(Isa::SCALAR, &mut r0, &cos, &sin);
                // Direct formula for one element of each half.
                let (x1, x2) = (x[0], x[h]);
                assert!((r0[0] - (x1 * cos[0] - x2 * sin[0])).abs() < 1e-6);
                assert!((r0[h] - (x2 * cos[0] + x1 * sin[0])).abs() < 1e-6);
                for isa in Isa::all_supported() {
                    let mut r1 = x.clone();
                    rope_inplace(isa, &mut r1, &cos, &sin);
                    close(&r1, &r0, 1e-6, "rope");
                }
            }
        }
    }
}
