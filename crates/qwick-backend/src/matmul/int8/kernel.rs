//! The loop every SIMD integer kernel runs, written once.
//!
//! A group of 16 weight rows is taken in parts of as many rows as a vector has lanes (the whole
//! group on AVX-512, two halves of 8 on AVX2); activation rows go in passes of up to [`MR`], one
//! f32 accumulator vector each, and over the group's blocks each row adds the reference's terms
//! lane by lane, in its order: `acc += (v − o·Σq) · (s · dx)  [+ Σq · (m · dx)]` per scale group.
//! A [`Kernel`] says how a block's quants come into registers and how its exact integer sums
//! `v` are made; its [`Lanes`] are its width's float operations and reads of a block's scales.

use std::arch::x86_64::*;

use crate::format::Format;
use crate::matmul::int8::ActQ8;
use crate::quant::tiles::{self, Spec, ROWS};

/// Activation rows per pass over a weight group (each has one accumulator vector).
const MR: usize = 8;

/// Bytes ahead of the block being read that kernels with [`Kernel::PREFETCH`] prefetch.
const PREFETCH: usize = 4096;

/// The format numbered `f` (the kernels take formats as const parameters).
pub(super) const fn format_of(f: u8) -> Format {
    Format::ALL[f as usize]
}

/// Calls `$kernel::<F> $args` for the format `F` equal to `$format`.
macro_rules! by_format {
    ($format:expr, $kernel:ident $args:tt) => {
        by_format!($format, $kernel $args, Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS)
    };
    ($format:expr, $kernel:ident $args:tt, $($f:ident)*) => {
        match $format {
            $(Format::$f => $kernel::<{ Format::$f as u8 }> $args,)*
            f => unreachable!("{f} has no integer kernel"),
        }
    };
}
pub(super) use by_format;

/// The float side of the row loop at one vector width, lane per weight row.
pub(crate) trait Lanes {
    /// f32 lanes.
    type F: Copy;
    /// i32 lanes.
    type I: Copy;
    /// Which lanes a store writes.
    type Mask: Copy;
    /// Lanes per vector: the weight rows of one part of a group.
    const N: usize;

    /// `v` in every lane.
    ///
    /// # Safety
    /// The CPU must support the width's instructions.
    unsafe fn splat(v: f32) -> Self::F;
    /// `v − o` in every lane.
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn sub(v: Self::I, o: i32) -> Self::I;
    /// `a · (b · c) + acc`, the product `b · c` rounded first.
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn fma_scaled(a: Self::F, b: Self::F, c: Self::F, acc: Self::F) -> Self::F;
    /// `v` as f32.
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn to_f32(v: Self::I) -> Self::F;
    /// Scales and minimums of block `j` of the super-block with header `h`, for part `part`'s
    /// rows: as `tiles::scales` computes them.
    ///
    /// # Safety
    /// As [`Lanes::splat`]; `h` is a whole super-block header of format `f` in tiles, with
    /// block `j`'s scales.
    unsafe fn scales(f: Format, h: *const u8, part: usize, j: usize) -> ([Self::F; 2], [Self::F; 2]);
    /// The first `valid` lanes (at least 1).
    ///
    /// # Safety
    /// As [`Lanes::splat`].
    unsafe fn mask(valid: usize) -> Self::Mask;
    /// Stores the lanes of `mask` at `p`.
    ///
    /// # Safety
    /// As [`Lanes::splat`]; `p` is valid for writes of the lanes of `mask`.
    unsafe fn store(p: *mut f32, mask: Self::Mask, v: Self::F);
}

/// Implements [`Lanes`] for `$w` from its width's intrinsics: `f16s` widens the f16 values
/// of `N` lanes at a pointer, `bytes` loads `N` bytes.
macro_rules! lanes {
    ($w:ident: $n:literal lanes, $f:ty, $i:ty, $feat:literal,
     [$zero:ident, $set1:ident, $set1i:ident, $sub:ident, $cvt:ident, $mul:ident, $fmadd:ident, $xor:ident,
      $cvtu8:ident, $cvti8:ident, $store:ident],
     f16s($fp:ident) { $f16s:expr }, bytes($bp:ident) { $bytes:expr },
     mask($valid:ident) -> $mask:ty { $mask_of:expr }) => {
        impl Lanes for $w {
            type F = $f;
            type I = $i;
            type Mask = $mask;
            const N: usize = $n;

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn splat(v: f32) -> $f {
                $set1(v)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn sub(v: $i, o: i32) -> $i {
                $sub(v, $set1i(o))
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn fma_scaled(a: $f, b: $f, c: $f, acc: $f) -> $f {
                $fmadd(a, $mul(b, c), acc)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn to_f32(v: $i) -> $f {
                $cvt(v)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn scales(f: Format, h: *const u8, part: usize, j: usize) -> ([$f; 2], [$f; 2]) {
                // SAFETY: what the caller promises for `h` is what the loads below need.
                unsafe {
                    // The part's lanes start `N·part` into byte fields, `2N·part` into f16 ones.
                    let (hf, hb) = (h.add(2 * $n * part), h.add($n * part));
                    let f16s = |$fp: *const u8| $f16s;
                    let bytes = |$bp: *const u8| $bytes;
                    let u8s = |p: *const u8| $cvt($cvtu8(bytes(p)));
                    let i8s = |p: *const u8| $cvt($cvti8(bytes(p)));
                    let neg = |v: $f| $xor(v, $set1(-0.0));
                    let z = $zero();
                    match f {
                        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 | Format::IQ4_NL => {
                            let d = f16s(hf);
                            ([d, d], [z, z])
                        }
                        Format::Q4_1 | Format::Q5_1 => {
                            let (d, m) = (f16s(hf), f16s(hf.add(32)));
                            ([d, d], [m, m])
                        }
                        Format::Q4_K | Format::Q5_K => {
                            let (d, dmin) = (f16s(hf), f16s(hf.add(32)));
                            let s = $mul(d, u8s(hb.add(64 + 16 * j)));
                            let m = neg($mul(dmin, u8s(hb.add(64 + 128 + 16 * j))));
                            ([s, s], [m, m])
                        }
                        Format::Q6_K | Format::Q3_K => {
                            let d = f16s(hf);
                            ([$mul(d, i8s(hb.add(32 + 32 * j))), $mul(d, i8s(hb.add(32 + 32 * j + 16)))], [z, z])
                        }
                        Format::Q2_K => {
                            let (d, dmin) = (f16s(hf), f16s(hf.add(32)));
                            let lo = _mm_set1_epi8(0x0F);
                            // Scale group `o`: its scale and minimum, the low and high nibbles.
                            let sc = |o: usize| {
                                let b = bytes(hb.add(64 + 16 * o));
                                let s = $cvt($cvtu8(_mm_and_si128(b, lo)));
                                let m = $cvt($cvtu8(_mm_and_si128(_mm_srli_epi16::<4>(b), lo)));
                                ($mul(d, s), neg($mul(dmin, m)))
                            };
                            let ((s0, m0), (s1, m1)) = (sc(2 * j), sc(2 * j + 1));
                            ([s0, s1], [m0, m1])
                        }
                        Format::IQ4_XS => {
                            let s = $mul(f16s(hf), i8s(hb.add(32 + 16 * j)));
                            ([s, s], [z, z])
                        }
                        _ => unreachable!(),
                    }
                }
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn mask($valid: usize) -> $mask {
                $mask_of
            }

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn store(p: *mut f32, mask: $mask, v: $f) {
                // SAFETY: the caller's `p` is valid for the lanes of `mask`, all a masked store writes.
                unsafe { $store(p, mask, v) }
            }
        }
    };
}

/// 16 lanes: AVX-512.
pub(crate) struct W512;

/// 8 lanes: AVX2, FMA and F16C.
pub(super) struct W256;

#[rustfmt::skip]
lanes! { W512: 16 lanes, __m512, __m512i, "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma",
    [_mm512_setzero_ps, _mm512_set1_ps, _mm512_set1_epi32, _mm512_sub_epi32, _mm512_cvtepi32_ps, _mm512_mul_ps,
     _mm512_fmadd_ps, _mm512_xor_ps, _mm512_cvtepu8_epi32, _mm512_cvtepi8_epi32, _mm512_mask_storeu_ps],
    f16s(p) { _mm512_cvtph_ps(_mm256_loadu_si256(p as _)) }, bytes(p) { _mm_loadu_si128(p as _) },
    mask(valid) -> __mmask16 { if valid >= 16 { 0xFFFF } else { ((1u32 << valid) - 1) as __mmask16 } } }

#[rustfmt::skip]
lanes! { W256: 8 lanes, __m256, __m256i, "avx2,fma,f16c",
    [_mm256_setzero_ps, _mm256_set1_ps, _mm256_set1_epi32, _mm256_sub_epi32, _mm256_cvtepi32_ps, _mm256_mul_ps,
     _mm256_fmadd_ps, _mm256_xor_ps, _mm256_cvtepu8_epi32, _mm256_cvtepi8_epi32, _mm256_maskstore_ps],
    f16s(p) { _mm256_cvtph_ps(_mm_loadu_si128(p as _)) }, bytes(p) { _mm_loadl_epi64(p as _) },
    mask(valid) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    } }

/// How one SIMD integer kernel reads blocks and makes their integer sums.
pub(super) trait Kernel {
    /// The kernel's vector width.
    type L: Lanes;
    /// A 32-weight block's weights in registers, as [`Kernel::dot`] takes them.
    type Block;
    /// Whether the weight stream is prefetched [`PREFETCH`] bytes ahead.
    const PREFETCH: bool = false;

    /// The offset `o` still in this kernel's sums of the format of `spec` (0 where they are
    /// already of the signed weights `u − o`).
    fn offset(spec: &Spec) -> i32 {
        spec.offset
    }

    /// Part `part` of the 32-weight block at `p`.
    ///
    /// # Safety
    /// The CPU must support the kernel's instructions; `p` is a whole 32-weight block of format
    /// `F` in tiles.
    unsafe fn block<const F: u8>(p: *const u8, part: usize) -> Self::Block;

    /// The exact `Σ u·q` over quads `T0..T0+N` of `b` against the activation words at `xq`,
    /// lane per row, in a pass of `M` activation rows.
    ///
    /// # Safety
    /// The CPU must support the kernel's instructions; `xq` is readable for the activation
    /// words `T0..T0 + N` of a block.
    unsafe fn dot<const F: u8, const T0: usize, const N: usize, const M: usize>(
        b: &Self::Block,
        xq: *const i32,
    ) -> <Self::L as Lanes>::I;
}

/// One group of 16 weight rows of format `F` against every row of `a`: `y[i·ldy + r]` for
/// `r < valid`.
///
/// # Safety
/// The CPU must support the kernel's instructions (this is inlined into a function enabling
/// them); `group` is a whole tile group of `a.k` weights of format `F`; `y` is valid for writes
/// of `a.m` rows of `ldy` floats from column 0 to `valid`; activations are in [−127, 127].
#[inline(always)]
pub(super) unsafe fn group<K: Kernel, const F: u8>(group: &[u8], a: &ActQ8, y: *mut f32, ldy: usize, valid: usize) {
    let n = K::L::N;
    for part in 0..ROWS / n {
        let nv = valid.saturating_sub(n * part).min(n);
        if nv == 0 {
            break;
        }
        // SAFETY: part `part`'s columns start `n · part` into the caller's columns.
        let y = unsafe { y.add(n * part) };
        let mut i = 0;
        while i < a.m {
            let mr = (a.m - i).min(MR);
            let p = Part { group, a, part, y, ldy, valid: nv };
            // SAFETY: what this function's `# Safety` section asks of its caller is what the
            // passes need, for activation rows `i..i + mr` of `a`.
            unsafe {
                match mr {
                    8 => rows::<K, F, 8>(&p, i),
                    7 => rows::<K, F, 7>(&p, i),
                    6 => rows::<K, F, 6>(&p, i),
                    5 => rows::<K, F, 5>(&p, i),
                    4 => rows::<K, F, 4>(&p, i),
                    3 => rows::<K, F, 3>(&p, i),
                    2 => rows::<K, F, 2>(&p, i),
                    _ => rows::<K, F, 1>(&p, i),
                }
            }
            i += mr;
        }
    }
}

/// One part of a group: its rows' outputs start at `y`, `valid` of them written.
struct Part<'a> {
    group: &'a [u8],
    a: &'a ActQ8,
    part: usize,
    y: *mut f32,
    ldy: usize,
    valid: usize,
}

/// Activation rows `i0..i0+M` against a part of the group.
///
/// # Safety
/// As [`group`], with activation rows `i0..i0 + M` in `a` and `p.y` valid for their `p.valid`
/// outputs.
#[inline(always)]
unsafe fn rows<K: Kernel, const F: u8, const M: usize>(p: &Part<'_>, i0: usize) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let f = format_of(F);
        // The format's description as constants, so its branches fold away.
        let spec: &Spec = const {
            match tiles::spec(format_of(F)) {
                Some(s) => s,
                None => panic!("no tile layout"),
            }
        };
        let a = p.a;
        let (k, nb) = (a.k, a.k / 32);
        let per_sb = spec.sb / 32;
        let (bb, sbb, hdr) = (spec.block_bytes(), spec.sb_bytes(), spec.header);
        let (g16, min, off) = (spec.g16, spec.min, K::offset(spec));
        let mut acc = [K::L::splat(0.0); M];
        let gp = p.group.as_ptr();
        for sb in 0..k / spec.sb {
            let h = gp.add(sb * sbb);
            for jj in 0..per_sb {
                let blk = h.add(hdr + jj * bb);
                if K::PREFETCH {
                    // Weights stream from memory once per product: prefetch ahead of the stream
                    // (past the group's end is the next group; past the weight, a harmless hint).
                    let mut line = 0;
                    while line < bb {
                        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + line) as *const i8);
                        line += 64;
                    }
                }
                let b = K::block::<F>(blk, p.part);
                let (s, m) = K::L::scales(f, h, p.part, jj);
                let j = sb * per_sb + jj;
                // Scale group `g`'s terms for one row: its sum `v` and activation sum `qs`.
                macro_rules! step {
                    ($acc:ident, $dx:ident, $v:expr, $qs:expr, $g:expr) => {
                        let (mut v, qs) = ($v, $qs);
                        if off != 0 {
                            v = K::L::sub(v, off * qs);
                        }
                        *$acc = K::L::fma_scaled(K::L::to_f32(v), s[$g], $dx, *$acc);
                        if min {
                            *$acc = K::L::fma_scaled(K::L::splat(qs as f32), m[$g], $dx, *$acc);
                        }
                    };
                }
                // Unrolled over the activation rows, so every accumulator stays in a register.
                macro_rules! row {
                    ($($r:literal)*) => {$(
                        if $r < M {
                            let r = $r;
                            let acc = &mut acc[r];
                            let i = i0 + r;
                            let xq = a.q.as_ptr().add(i * k + 32 * j) as *const i32;
                            let dx = K::L::splat(*a.d.get_unchecked(i * nb + j));
                            let qs0 = *a.s16.get_unchecked(i * 2 * nb + 2 * j) as i32;
                            let qs1 = *a.s16.get_unchecked(i * 2 * nb + 2 * j + 1) as i32;
                            if g16 {
                                step!(acc, dx, K::dot::<F, 0, 4, M>(&b, xq), qs0, 0);
                                step!(acc, dx, K::dot::<F, 4, 4, M>(&b, xq), qs1, 1);
                            } else {
                                step!(acc, dx, K::dot::<F, 0, 8, M>(&b, xq), qs0 + qs1, 0);
                            }
                        }
                    )*};
                }
                row!(0 1 2 3 4 5 6 7);
            }
        }
        let mask = K::L::mask(p.valid);
        for (r, acc) in acc.iter().enumerate() {
            K::L::store(p.y.add((i0 + r) * p.ldy), mask, *acc);
        }
    }
}
