//! x86 integer kernels without VNNI: `vpmaddubsw` (u8 × s8 → saturating i16 pair sums) and
//! `vpmaddwd` with ones (i16 pairs → i32) in place of `vpdpbusd`, on AVX-512BW and on AVX2.
//!
//! The integer sums are exact, so the results equal the scalar reference bit for bit (the float
//! operations are those of the reference, lane by lane, in the same order):
//!
//! - Formats whose quants `u` have at most 6 bits never saturate `vpmaddubsw`; its i16 results
//!   are even summed over several quads before widening, as far as the bound allows
//!   ([`chunk`]: `chunk · 2 · u_max · 128 ≤ 32767`). `v = Σ u·q − o·Σ q` as in the reference.
//! - The 8-bit formats (offset 128: Q8_0, IQ4_NL, IQ4_XS) use the signed weights
//!   `w = u − 128` ∈ [−128, 127]: `vpmaddubsw(|w|, sign(q, w))`, whose pair sums are at most
//!   `2 · 128 · 127 = 32512` in magnitude since activations are in [−127, 127] (as
//!   [`ActQ8::quantize`] makes them), so no saturation; that yields `Σ w·q = Σ u·q − 128·Σ q`,
//!   the reference's `v`, directly.

use std::arch::x86_64::*;

use crate::format::Format;
use crate::matmul::int8::kernel::{self, format_of, Kernel, Lanes, W256, W512};
use crate::matmul::int8::ActQ8;
use crate::quant::tiles::{Spec, IQ4_U8};

/// Whether the kernels work on the signed weights `w = u − 128` (the offset-128 formats).
const fn signed(f: Format) -> bool {
    matches!(f, Format::Q8_0 | Format::IQ4_NL | Format::IQ4_XS)
}

/// Quads whose `vpmaddubsw` results may be summed in i16: the exact sum stays within i16 when
/// `chunk · 2 · u_max · 128 ≤ 32767` (even for an activation of −128).
const fn chunk(f: Format) -> usize {
    match f {
        // u ≤ 15 (or 7, 3): 8 · 2 · 15 · 128 = 30720.
        Format::Q4_0 | Format::Q4_1 | Format::Q4_K | Format::Q3_K | Format::Q2_K => 8,
        // u ≤ 31: 4 · 2 · 31 · 128 = 31744.
        Format::Q5_0 | Format::Q5_1 | Format::Q5_K => 4,
        // u ≤ 63: 2 · 2 · 63 · 128 = 32256.
        Format::Q6_K => 2,
        // Signed 8-bit weights: one quad (|pair| ≤ 32512).
        _ => 1,
    }
}

/// The IQ4 values as signed bytes (`IQ4_U8 − 128`).
const IQ4_I8: [u8; 16] = {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = IQ4_U8[i] ^ 0x80;
        i += 1;
    }
    out
};

/// The `vpmaddubsw` kernel `$name` at the width `$lanes`, and `group`, its entry: blocks are
/// read by `$block` (its quads, and for the signed formats their signs), `$sign` applies a weight's
/// sign to the activation bytes `x` of quad `u`, the rest is the width's intrinsics.
macro_rules! kernel {
    ($name:ident: $lanes:ident, $block:ty, $feat:literal,
     block($p:ident, $part:ident) { $read:expr },
     [$zero:ident, $set1:ident, $set1_16:ident, $maddubs:ident, $add16:ident, $madd:ident, $add32:ident],
     sign($x:ident, $b:pat, $u:ident) { $sign:expr }) => {
        struct $name;

        impl Kernel for $name {
            type L = $lanes;
            type Block = $block;

            fn offset(spec: &Spec) -> i32 {
                debug_assert!(!signed(spec.format) || spec.offset == 128);
                if signed(spec.format) {
                    0
                } else {
                    spec.offset
                }
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn block<const F: u8>($p: *const u8, $part: usize) -> $block {
                // SAFETY: what this function's `# Safety` section asks of its caller is what
                // reading the block needs.
                unsafe { $read }
            }

            /// Signed formats: `Σ w·q`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn dot<const F: u8, const T0: usize, const N: usize, const M: usize>(
                b: &$block,
                xq: *const i32,
            ) -> <$lanes as Lanes>::I {
                // SAFETY: what this function's `# Safety` section asks of its caller is what the
                // operations below need.
                unsafe {
                    let f = format_of(F);
                    let c = if chunk(f) < N { chunk(f) } else { N };
                    let ones = $set1_16(1);
                    let mut v = $zero();
                    let mut t = T0;
                    while t < T0 + N {
                        let mut s16 = $zero();
                        for u in t..t + c {
                            let mut x = $set1(xq.add(u).read_unaligned());
                            if signed(f) {
                                let ($x, $b, $u) = (x, b, u);
                                x = $sign;
                            }
                            let p = $maddubs(b.0[u], x);
                            s16 = if u == t { p } else { $add16(s16, p) };
                        }
                        v = $add32(v, $madd(s16, ones));
                        t += c;
                    }
                    v
                }
            }
        }

        /// One group of 16 weight rows of format `F` against every row of `a`.
        ///
        /// # Safety
        /// The CPU must support the features this function enables; `group` is a whole tile group
        /// of `a.k` weights of format `F`; `y` is valid for `a.m` rows of `ldy` floats from column
        /// 0 to `valid`; activations are in [−127, 127].
        #[target_feature(enable = $feat)]
        pub unsafe fn group<const F: u8>(group: &[u8], a: &ActQ8, y: *mut f32, ldy: usize, valid: usize) {
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // kernel needs.
            unsafe { kernel::group::<$name, F>(group, a, y, ldy, valid) }
        }
    };
}

/// AVX-512BW: 64-byte quads (four weights of each of the 16 rows), lanes = weight rows.
pub mod avx512 {
    use super::*;
    use crate::matmul::int8::avx512::block as shared;

    /// The 8 quads of a 32-weight block: the unsigned quants, or for signed formats `|w|`.
    type Quads = [__m512i; 8];
    /// For signed formats, the lanes where `w < 0`, per quad.
    type Negs = [__mmask64; 8];

    /// Replaces signed weights by their magnitudes, returning where they were negative.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    fn split_signs(q: &mut Quads) -> Negs {
        let mut neg = [0; 8];
        for (qt, n) in q.iter_mut().zip(neg.iter_mut()) {
            *n = _mm512_movepi8_mask(*qt);
            // |−128| is 0x80, read as the unsigned 128.
            *qt = _mm512_abs_epi8(*qt);
        }
        neg
    }

    /// The quads of the 32-weight block at `p` (see [`Quads`], [`Negs`]): the unsigned quants,
    /// or for the offset-128 formats the signed weights `u ^ 0x80 = u − 128` split into
    /// magnitudes and signs.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,f16c,fma`); `p` is a whole 32-weight block of format
    /// `F` in tiles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    unsafe fn quads<const F: u8>(p: *const u8) -> (Quads, Negs) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let f = format_of(F);
            let mut q = shared::quads(f, p);
            let neg = if signed(f) {
                let flip = _mm512_set1_epi8(-128);
                for qt in q.iter_mut() {
                    *qt = _mm512_xor_si512(*qt, flip);
                }
                split_signs(&mut q)
            } else {
                [0; 8]
            };
            (q, neg)
        }
    }

    kernel!(Maddubs512: W512, (Quads, Negs), "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma",
        block(p, _part) { quads::<F>(p) },
        [_mm512_setzero_si512, _mm512_set1_epi32, _mm512_set1_epi16, _mm512_maddubs_epi16, _mm512_add_epi16,
         _mm512_madd_epi16, _mm512_add_epi32],
        // Activations negated where the weight is negative.
        sign(x, (_q, neg), u) { _mm512_mask_sub_epi8(x, neg[u], _mm512_setzero_si512(), x) });
}

/// AVX2: the 16 rows of a group as two halves of 8 (the low and high 32 bytes of each 64-byte
/// quad, and of each 16-lane header field), each a pass of its own over the group.
pub mod avx2 {
    use super::*;

    /// The 8 quads of a half block: the unsigned quants, or for signed formats `|w|`.
    type Quads = [__m256i; 8];

    /// # Safety
    /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is readable
    /// for 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const u8) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    /// # Safety
    /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is a block's
    /// nibbles, readable for half `half` of them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8, half: usize) -> Quads {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let m = _mm256_set1_epi8(0x0F);
            let mut q = [_mm256_setzero_si256(); 8];
            for t in 0..4 {
                let v = load(p.add(64 * t + 32 * half));
                q[t] = _mm256_and_si256(v, m);
                q[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
            }
            q
        }
    }

    /// # Safety
    /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is a block's
    /// 2-bit pairs, readable for half `half` of them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pairs(p: *const u8, half: usize) -> Quads {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let m = _mm256_set1_epi8(3);
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let v = load(p.add(64 * h + 32 * half));
                q[4 * h] = _mm256_and_si256(v, m);
                q[4 * h + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(v), m);
                q[4 * h + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
                q[4 * h + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(v), m);
            }
            q
        }
    }

    /// Adds `val` to the weights whose bit is set in the 8 masks at `p` (this half's 32 bits
    /// of each: bit `i` is byte `i` of the half quad).
    ///
    /// # Safety
    /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is a block's
    /// bit masks, readable for half `half` of them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add_bits(q: &mut Quads, p: *const u8, half: usize, val: i8) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let v = _mm256_set1_epi8(val);
            // Byte i takes mask byte i / 8 (within each 128-bit lane, the broadcast u32 holds all
            // four), then tests bit i % 8.
            #[rustfmt::skip]
        let idx = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
            let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            for (t, qt) in q.iter_mut().enumerate() {
                let k = (p.add(8 * t + 4 * half) as *const u32).read_unaligned();
                let b = _mm256_shuffle_epi8(_mm256_set1_epi32(k as i32), idx);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(b, bits), bits);
                *qt = _mm256_add_epi8(*qt, _mm256_and_si256(set, v));
            }
        }
    }

    /// The quads of half `half` of the 32-weight block at `p`, and for signed formats the
    /// signed weights `w` (for `vpsignb`).
    ///
    /// # Safety
    /// The CPU must support the features this function enables (`avx2,fma,f16c`); `p` is a whole
    /// 32-weight block of format `F` in tiles.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quads<const F: u8>(p: *const u8, half: usize) -> (Quads, Quads) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let f = format_of(F);
            let q = match f {
                Format::Q8_0 => {
                    let mut q = [_mm256_setzero_si256(); 8];
                    let flip = _mm256_set1_epi8(-128);
                    for (t, qt) in q.iter_mut().enumerate() {
                        *qt = _mm256_xor_si256(load(p.add(64 * t + 32 * half)), flip);
                    }
                    q
                }
                Format::Q4_0 | Format::Q4_1 | Format::Q4_K => nibbles(p, half),
                Format::IQ4_NL | Format::IQ4_XS => {
                    let mut q = nibbles(p, half);
                    let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_I8.as_ptr() as *const __m128i));
                    for qt in q.iter_mut() {
                        *qt = _mm256_shuffle_epi8(t, *qt);
                    }
                    q
                }
                Format::Q5_0 | Format::Q5_1 | Format::Q5_K => {
                    let mut q = nibbles(p, half);
                    add_bits(&mut q, p.add(256), half, 16);
                    q
                }
                Format::Q6_K => {
                    let mut q = nibbles(p, half);
                    let h = pairs(p.add(256), half);
                    for (a, b) in q.iter_mut().zip(h) {
                        *a = _mm256_or_si256(*a, _mm256_slli_epi16::<4>(b));
                    }
                    q
                }
                Format::Q3_K => {
                    let mut q = pairs(p, half);
                    add_bits(&mut q, p.add(128), half, 4);
                    q
                }
                Format::Q2_K => pairs(p, half),
                _ => unreachable!(),
            };
            if signed(f) {
                let mut abs = q;
                for a in abs.iter_mut() {
                    // |−128| is 0x80, read as the unsigned 128.
                    *a = _mm256_abs_epi8(*a);
                }
                (abs, q)
            } else {
                (q, q)
            }
        }
    }

    kernel!(Maddubs256: W256, (Quads, Quads), "avx2,fma,f16c",
        block(p, half) { quads::<F>(p, half) },
        [_mm256_setzero_si256, _mm256_set1_epi32, _mm256_set1_epi16, _mm256_maddubs_epi16, _mm256_add_epi16,
         _mm256_madd_epi16, _mm256_add_epi32],
        sign(x, (_q, w), u) { _mm256_sign_epi8(x, w[u]) });
}
