//! AVX-512 integer kernels: activation quantization, the quants and scales of a block of tiles
//! in registers, and the `vpdpbusd` (VNNI) tile dot products.

use std::arch::x86_64::*;

/// AVX-512 twin of `quantize_block`: the same operations, so the same results.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn quantize_block(x: &[f32], q: &mut [i8], d: &mut f32, s: &mut [i16]) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let (x0, x1) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        *d = amax / 127.0;
        let id = if *d != 0.0 { 1.0 / *d } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        // Round to nearest even (the default rounding mode), as `round_ties_even`.
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, idv));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, idv));
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
        s[0] = _mm512_reduce_add_epi32(q0) as i16;
        s[1] = _mm512_reduce_add_epi32(q1) as i16;
    }
}

/// AVX-512 F/BW/VL/DQ pieces every AVX-512 integer kernel shares: the quants of a 32-weight
/// block of tiles as 8 vectors of unsigned bytes, lane per weight row (its scales:
/// [`super::kernel::W512`]).
pub(crate) mod block {
    use super::*;
    use crate::format::Format;
    use crate::quant::tiles::IQ4_U8;

    /// The 8 vectors of unsigned quants of one 32-weight block: vector `t` holds weights
    /// `4t..4t+4` of each row.
    pub(crate) type Quads = [__m512i; 8];

    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is readable for 64 bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub(crate) unsafe fn load(p: *const u8) -> __m512i {
        unsafe { _mm512_loadu_si512(p as *const _) }
    }

    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is readable for the 256 bytes of a
    /// block's nibbles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub(crate) unsafe fn nibbles(p: *const u8) -> Quads {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let m = _mm512_set1_epi8(0x0F);
            let mut q = [_mm512_setzero_si512(); 8];
            for t in 0..4 {
                let v = load(p.add(64 * t));
                q[t] = _mm512_and_si512(v, m);
                q[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m);
            }
            q
        }
    }

    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is readable for the 128 bytes of a
    /// block's 2-bit pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub(crate) unsafe fn pairs(p: *const u8) -> Quads {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let m = _mm512_set1_epi8(3);
            let mut q = [_mm512_setzero_si512(); 8];
            for h in 0..2 {
                let v = load(p.add(64 * h));
                q[4 * h] = _mm512_and_si512(v, m);
                q[4 * h + 1] = _mm512_and_si512(_mm512_srli_epi16::<2>(v), m);
                q[4 * h + 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m);
                q[4 * h + 3] = _mm512_and_si512(_mm512_srli_epi16::<6>(v), m);
            }
            q
        }
    }

    /// Adds `val` to the weights whose bit is set in the 8 masks at `p`.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is readable for the 64 bytes of a
    /// block's bit masks.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub(crate) unsafe fn add_bits(q: &mut Quads, p: *const u8, val: i8) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let v = _mm512_set1_epi8(val);
            for (t, qt) in q.iter_mut().enumerate() {
                let k: __mmask64 = (p.add(8 * t) as *const u64).read_unaligned();
                *qt = _mm512_mask_add_epi8(*qt, k, *qt, v);
            }
        }
    }

    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    unsafe fn lut(q: &mut Quads, table: &[u8; 16]) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let t = _mm512_broadcast_i32x4(_mm_loadu_si128(table.as_ptr() as *const __m128i));
            for qt in q.iter_mut() {
                *qt = _mm512_shuffle_epi8(t, *qt);
            }
        }
    }

    /// The unsigned quants of the 32-weight block at `p`.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is a whole 32-weight block of format
    /// `f` in tiles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub(crate) unsafe fn quads(f: Format, p: *const u8) -> Quads {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            match f {
                Format::Q8_0 => {
                    let mut q = [_mm512_setzero_si512(); 8];
                    for (t, qt) in q.iter_mut().enumerate() {
                        *qt = load(p.add(64 * t));
                    }
                    q
                }
                Format::Q4_0 | Format::Q4_1 | Format::Q4_K => nibbles(p),
                Format::IQ4_NL | Format::IQ4_XS => {
                    let mut q = nibbles(p);
                    lut(&mut q, &IQ4_U8);
                    q
                }
                Format::Q5_0 | Format::Q5_1 | Format::Q5_K => {
                    let mut q = nibbles(p);
                    add_bits(&mut q, p.add(256), 16);
                    q
                }
                Format::Q6_K => {
                    let mut q = nibbles(p);
                    let h = pairs(p.add(256));
                    for (a, b) in q.iter_mut().zip(h) {
                        *a = _mm512_or_si512(*a, _mm512_slli_epi16::<4>(b));
                    }
                    q
                }
                Format::Q3_K => {
                    let mut q = pairs(p);
                    add_bits(&mut q, p.add(128), 4);
                    q
                }
                Format::Q2_K => pairs(p),
                _ => unreachable!(),
            }
        }
    }
}

/// AVX-512 VNNI: `vpdpbusd` of 64 unsigned weight bytes (four of each of 16 rows) with four
/// activation bytes broadcast, lanes = weight rows.
pub mod vnni {
    use super::block::{quads, Quads};
    use super::*;
    use crate::matmul::int8::kernel::{self, format_of, Kernel, W512};
    use crate::matmul::int8::ActQ8;

    /// The VNNI kernel.
    struct Vnni;

    impl Kernel for Vnni {
        type L = W512;
        type Block = Quads;
        const PREFETCH: bool = true;

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
        unsafe fn block<const F: u8>(p: *const u8, _part: usize) -> Quads {
            // SAFETY: what this function's `# Safety` section asks of its caller is what
            // `quads` needs.
            unsafe { quads(format_of(F), p) }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")]
        unsafe fn dot<const F: u8, const T0: usize, const N: usize, const M: usize>(
            q: &Quads,
            xq: *const i32,
        ) -> __m512i {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // operations below need.
            unsafe {
                // With few activation rows, two accumulators halve the dependency chain.
                let mut v = [_mm512_setzero_si512(); 2];
                for (t, qt) in q.iter().enumerate().skip(T0).take(N) {
                    let c = if M < 4 { t % 2 } else { 0 };
                    v[c] = _mm512_dpbusd_epi32(v[c], *qt, _mm512_set1_epi32(xq.add(t).read_unaligned()));
                }
                if M < 4 {
                    _mm512_add_epi32(v[0], v[1])
                } else {
                    v[0]
                }
            }
        }
    }

    /// One group of 16 weight rows of format `F` against every row of `a`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 VNNI; `group` is a whole tile group of `a.k` weights of
    /// format `F`; `y` is valid for `a.m` rows of `ldy` floats from column 0 to `valid`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")]
    pub unsafe fn group<const F: u8>(group: &[u8], a: &ActQ8, y: *mut f32, ldy: usize, valid: usize) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // kernel needs.
        unsafe { kernel::group::<Vnni, F>(group, a, y, ldy, valid) }
    }
}
