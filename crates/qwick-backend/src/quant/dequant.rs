//! Scalar dequantization of every weight format: the reference every kernel is tested
//! against.
//!
//! Each function reproduces the `gguf` Python package's `gguf.quants.dequantize` bit for bit
//! (`tests/quant_refs` holds its output; `crates/qwick-backend/tests/dequant.rs` compares).
//! That fixes the order of the f32 operations: f16 scales are widened to f32 first, every
//! product is rounded to f32 on its own (no fused multiply-add), and where gguf writes
//! `d * sc * q - dmin * m` the code here computes `(d * sc) * q - (dmin * m)`.
//!
//! Parsing never panics on any byte content: every table index is masked to the table's size.
//! f16 NaN or infinite scales simply propagate into the output.

use super::by_block_codec;
use crate::format::{bf16_to_f32, Format};
use crate::quant::grids::{
    IQ1S_DELTA, IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS, KVALUES_IQ4NL,
};

/// Dequantizes whole blocks of `format`: `src` holds exactly `dst.len() / format.block()`
/// blocks. Panics when the lengths do not describe whole blocks.
pub fn dequantize(format: Format, src: &[u8], dst: &mut [f32]) {
    let (block, bytes) = (format.block(), format.block_bytes());
    assert!(dst.len().is_multiple_of(block), "{} values are not a whole number of {format} blocks", dst.len());
    assert_eq!(src.len(), dst.len() / block * bytes, "{format}: {} bytes for {} values", src.len(), dst.len());
    by_block_codec!(format, src, dst,
        Format::F32 => blocks(src, dst, f32_block),
        Format::F16 => blocks(src, dst, f16_block),
        Format::BF16 => blocks(src, dst, bf16_block),
        Format::IQ2_XXS => blocks(src, dst, iq2_xxs),
        Format::IQ2_XS => blocks(src, dst, iq2_xs),
        Format::IQ3_XXS => blocks(src, dst, iq3_xxs),
        Format::IQ1_S => blocks(src, dst, iq1_s),
        Format::IQ3_S => blocks(src, dst, iq3_s),
        Format::IQ2_S => blocks(src, dst, iq2_s),
        Format::IQ1_M => blocks(src, dst, iq1_m),
    )
}

/// Applies a per-block function over matching blocks of `src` and `dst`. The block sizes are
/// the function's array lengths; the caller has checked that they match the format table.
fn blocks<const B: usize, const N: usize>(src: &[u8], dst: &mut [f32], f: fn(&[u8; B], &mut [f32; N])) {
    for (s, d) in src.chunks_exact(B).zip(dst.chunks_exact_mut(N)) {
        // chunks_exact yields exactly B and N elements, so these conversions cannot fail.
        f(s.try_into().unwrap(), d.try_into().unwrap());
    }
}

/// The f16 at `b[at..at + 2]` (little endian), widened to f32.
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline(always)]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Byte `j` of a grid row (element `j` of the row), as an unsigned value.
#[inline(always)]
fn grid_u8(row: u64, j: usize) -> f32 {
    (row >> (8 * j)) as u8 as f32
}

/// Byte `j` of an IQ1 grid row, a signed value -1, 0 or 1.
#[inline(always)]
fn grid_i8(row: u64, j: usize) -> f32 {
    (row >> (8 * j)) as u8 as i8 as f32
}

/// -1 where bit `j` of `signs` is set, else 1.
#[inline(always)]
fn sign(signs: u8, j: usize) -> f32 {
    if (signs >> j) & 1 != 0 {
        -1.0
    } else {
        1.0
    }
}

/// F32: one little-endian f32.
fn f32_block(b: &[u8; 4], y: &mut [f32; 1]) {
    y[0] = f32::from_le_bytes(*b);
}

/// F16: one little-endian IEEE half.
fn f16_block(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f16_at(b, 0);
}

/// BF16: one little-endian bfloat16 (the top half of an f32).
fn bf16_block(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = bf16_to_f32(u16::from_le_bytes(*b));
}

/// Q4_0, 32 weights in 18 bytes: `d: f16 | qs: [u8; 16]`. Weight `j < 16` is the low nibble
/// of `qs[j]`, weight `16 + j` its high nibble; `y = d * (q - 8)`.
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1, 32 weights in 20 bytes: `d: f16 | m: f16 | qs: [u8; 16]`, nibbles as Q4_0;
/// `y = d * q + m`.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = d * (q & 0x0F) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Q5_0, 32 weights in 22 bytes: `d: f16 | qh: u32 | qs: [u8; 16]`. The low 4 bits as Q4_0,
/// bit `j` of `qh` is bit 4 of weight `j`; `y = d * (q - 16)`.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32_at(b, 2);
    for j in 0..16 {
        let q = b[6 + j];
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// Q5_1, 32 weights in 24 bytes: `d: f16 | m: f16 | qh: u32 | qs: [u8; 16]`, bits as Q5_0;
/// `y = d * q + m`.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32_at(b, 4);
    for j in 0..16 {
        let q = b[8 + j];
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * lo as f32 + m;
        y[j + 16] = d * hi as f32 + m;
    }
}

/// Q8_0, 32 weights in 34 bytes: `d: f16 | qs: [i8; 32]`; `y = q * d`.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K, 256 weights in 84 bytes: `scales: [u8; 16] | qs: [u8; 64] | d: f16 | dmin: f16`.
/// Sub-block `s` (16 weights) has scale `scales[s] & 15` and min `scales[s] >> 4`. Weight
/// `128 h + 32 k + l` is bits `2k..2k+2` of `qs[32 h + l]`;
/// `y = (d * sc) * q - (dmin * m)`.
fn q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (i, y) in y.iter_mut().enumerate() {
        let (h, k, l) = (i / 128, (i / 32) % 4, i % 32);
        let q = (qs[32 * h + l] >> (2 * k)) & 3;
        let s = scales[i / 16];
        let dl = d * (s & 0x0F) as f32;
        let ml = dmin * (s >> 4) as f32;
        *y = dl * q as f32 - ml;
    }
}

/// Q3_K, 256 weights in 110 bytes: `hmask: [u8; 32] | qs: [u8; 64] | scales: [u8; 12] | d: f16`.
/// Sub-block `s` (16 weights) has the 6-bit scale `lo | hi << 4` minus 32, with `lo` nibble
/// `s / 8` of `scales[s % 8]` and `hi` bits `2 (s / 4)..` of `scales[8 + s % 4]`. Weight
/// `i = 128 h + 32 k + l` has low bits `2k..2k+2` of `qs[32 h + l]`, minus 4 when bit `i / 32`
/// of `hmask[l]` is clear; `y = (d * sc) * q`.
fn q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (s, dl) in dl.iter_mut().enumerate() {
        let lo = (scales[s % 8] >> (4 * (s / 8))) & 0x0F;
        let hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 0x03;
        *dl = d * ((lo | hi << 4) as i32 - 32) as f32;
    }
    for (i, y) in y.iter_mut().enumerate() {
        let (h, k, l) = (i / 128, (i / 32) % 4, i % 32);
        let low = ((qs[32 * h + l] >> (2 * k)) & 3) as i32;
        let high = (hmask[l] >> (i / 32)) & 1;
        let q = if high == 0 { low - 4 } else { low };
        *y = dl[i / 16] * q as f32;
    }
}

/// The 6-bit scales and mins of the 8 sub-blocks of Q4_K and Q5_K, packed in 12 bytes:
/// for `j < 4`, `sc = s[j] & 63`, `m = s[j + 4] & 63`; for `j >= 4`, the low 4 bits come from
/// the nibbles of `s[j + 4]` and the top 2 bits from bits 6..8 of `s[j - 4]` and `s[j]`.
fn k4_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K, 256 weights in 144 bytes: `d: f16 | dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`.
/// Sub-block `j` (32 weights) has scale and min from [`k4_scale_min`]. Weight `64 c + 32 k + l`
/// is nibble `k` of `qs[32 c + l]`; `y = (d * sc) * q - (dmin * m)`.
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = k4_scale_min(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let (c, k) = (j / 2, j % 2);
        for (l, y) in y.iter_mut().enumerate() {
            let q = (qs[32 * c + l] >> (4 * k)) & 0x0F;
            *y = dl * q as f32 - ml;
        }
    }
}

/// Q5_K, 256 weights in 176 bytes:
/// `d: f16 | dmin: f16 | scales: [u8; 12] | qh: [u8; 32] | qs: [u8; 128]`. As Q4_K, plus bit 4
/// of weight `i` from bit `i / 32` of `qh[i % 32]`; `y = (d * sc) * q - (dmin * m)`.
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = k4_scale_min(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let (c, k) = (j / 2, j % 2);
        for (l, y) in y.iter_mut().enumerate() {
            let q = (qs[32 * c + l] >> (4 * k)) & 0x0F | ((qh[l] >> j) & 1) << 4;
            *y = dl * q as f32 - ml;
        }
    }
}

/// Q6_K, 256 weights in 210 bytes: `ql: [u8; 128] | qh: [u8; 64] | scales: [i8; 16] | d: f16`.
/// Weight `128 h + 64 k + l` (`l < 64`) has low nibble `k` of `ql[64 h + l]`; weight
/// `128 h + 32 k + l` (`l < 32`) has high bits `2k..2k+2` of `qh[32 h + l]`. Sub-block `s` (16
/// weights) has scale `scales[s]`; `y = (d * sc) * (q - 32)`.
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (i, y) in y.iter_mut().enumerate() {
        let h = i / 128;
        let lo = (ql[64 * h + i % 64] >> (4 * ((i / 64) % 2))) & 0x0F;
        let hi = (qh[32 * h + i % 32] >> (2 * ((i / 32) % 4))) & 0x03;
        let q = (lo | hi << 4) as i32 - 32;
        let dl = d * (scales[i / 16] as i8) as f32;
        *y = dl * q as f32;
    }
}

/// IQ2_XXS, 256 weights in 66 bytes: `d: f16 | 8 × (grid: [u8; 4] | aux: u32)`. Group `g`
/// (32 weights) has scale `d * (0.5 + (aux >> 28)) * 0.25`; its 8-weight part `l` takes
/// magnitudes from row `grid[l]` of [`IQ2XXS_GRID`] and signs from
/// `KSIGNS_IQ2XS[(aux >> 7 l) & 127]`; `y = db * grid * sign`.
fn iq2_xxs(b: &[u8; 66], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let at = 2 + 8 * g;
        let aux = u32_at(b, at + 4);
        let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let grid = IQ2XXS_GRID[b[at + l] as usize];
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            for (j, y) in y.iter_mut().enumerate() {
                *y = db * grid_u8(grid, j) * sign(signs, j);
            }
        }
    }
}

/// IQ2_XS, 256 weights in 74 bytes: `d: f16 | qs: [u16; 32] | scales: [u8; 8]`. Each `qs[l]`
/// covers 8 weights: row `q & 511` of [`IQ2XS_GRID`], signs `KSIGNS_IQ2XS[q >> 9]`. Each
/// 16 weights `s` have scale nibble `s % 2` of `scales[s / 2]`;
/// `y = d * (0.5 + sc) * 0.25 * grid * sign`, multiplied left to right.
fn iq2_xs(b: &[u8; 74], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let scales = &b[66..74];
    for (l, y) in y.chunks_exact_mut(8).enumerate() {
        let q = u16_at(b, 2 + 2 * l);
        let sc = (scales[l / 4] >> (4 * ((l / 2) % 2))) & 0x0F;
        let db = d * (0.5 + sc as f32) * 0.25;
        let grid = IQ2XS_GRID[(q & 511) as usize];
        let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
        for (j, y) in y.iter_mut().enumerate() {
            *y = db * grid_u8(grid, j) * sign(signs, j);
        }
    }
}

/// IQ2_S, 256 weights in 82 bytes:
/// `d: f16 | qs: [u8; 32] | signs: [u8; 32] | qh: [u8; 8] | scales: [u8; 8]`. Each 8 weights
/// `l` take row `qs[l] | ((qh[l / 4] >> 2 (l % 4)) & 3) << 8` of [`IQ2S_GRID`] and the sign bits
/// of `signs[l]`; scales as IQ2_XS; `y = d * (0.5 + sc) * 0.25 * grid * sign`.
fn iq2_s(b: &[u8; 82], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
    for (l, y) in y.chunks_exact_mut(8).enumerate() {
        let sc = (scales[l / 4] >> (4 * ((l / 2) % 2))) & 0x0F;
        let db = d * (0.5 + sc as f32) * 0.25;
        let idx = qs[l] as usize | (((qh[l / 4] >> (2 * (l % 4))) & 3) as usize) << 8;
        let grid = IQ2S_GRID[idx];
        for (j, y) in y.iter_mut().enumerate() {
            *y = db * grid_u8(grid, j) * sign(signs[l], j);
        }
    }
}

/// IQ3_XXS, 256 weights in 98 bytes: `d: f16 | qs: [u8; 64] | aux: [u32; 8]`. Group `g` (32
/// weights) has scale `d * (0.5 + (aux[g] >> 28)) * 0.5`; its 8-weight part `l` takes two
/// 4-value rows `qs[8 g + 2 l]`, `qs[8 g + 2 l + 1]` of [`IQ3XXS_GRID`] and signs
/// `KSIGNS_IQ2XS[(aux[g] >> 7 l) & 127]`; `y = db * grid * sign`.
fn iq3_xxs(b: &[u8; 98], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let qs = &b[2..66];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let aux = u32_at(b, 66 + 4 * g);
        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            for (j, y) in y.iter_mut().enumerate() {
                let grid = IQ3XXS_GRID[qs[8 * g + 2 * l + j / 4] as usize];
                *y = db * grid_u8(grid as u64, j % 4) * sign(signs, j);
            }
        }
    }
}

/// IQ3_S, 256 weights in 110 bytes:
/// `d: f16 | qs: [u8; 64] | qh: [u8; 8] | signs: [u8; 32] | scales: [u8; 4]`. Each 4 weights
/// `k` take row `qs[k] | ((qh[k / 8] >> k % 8) & 1) << 8` of [`IQ3S_GRID`]; weight `i` has sign
/// bit `i % 8` of `signs[i / 8]`; group `g` (32 weights) has scale nibble `g % 2` of
/// `scales[g / 2]`; `y = d * (1 + 2 sc) * grid * sign`.
fn iq3_s(b: &[u8; 110], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let sc = (scales[g / 2] >> (4 * (g % 2))) & 0x0F;
        let db = d * (1 + 2 * sc as u32) as f32;
        for (j, y) in y.iter_mut().enumerate() {
            let i = 32 * g + j;
            let k = i / 4;
            let idx = qs[k] as usize | (((qh[k / 8] >> (k % 8)) & 1) as usize) << 8;
            let grid = IQ3S_GRID[idx];
            *y = db * grid_u8(grid as u64, i % 4) * sign(signs[i / 8], i % 8);
        }
    }
}

/// IQ1_S, 256 weights in 50 bytes: `d: f16 | qs: [u8; 32] | qh: [u16; 8]`. Group `g` (32
/// weights) has scale `d * (2 ((qh[g] >> 12) & 7) + 1)` and offset `±IQ1S_DELTA` (negative
/// when bit 15 of `qh[g]` is set); its 8-weight part `l` takes row
/// `qs[4 g + l] | ((qh[g] >> 3 l) & 7) << 8` of [`IQ1S_GRID`]; `y = dl * (grid + delta)`.
fn iq1_s(b: &[u8; 50], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let qs = &b[2..34];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let qh = u16_at(b, 34 + 2 * g);
        let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
        let delta = if qh & 0x8000 != 0 { -IQ1S_DELTA } else { IQ1S_DELTA };
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let idx = qs[4 * g + l] as usize | (((qh >> (3 * l)) & 7) as usize) << 8;
            let grid = IQ1S_GRID[idx];
            for (j, y) in y.iter_mut().enumerate() {
                *y = dl * (grid_i8(grid, j) + delta);
            }
        }
    }
}

/// IQ1_M, 256 weights in 56 bytes: `qs: [u8; 32] | qh: [u8; 16] | sc: [u16; 4]`. The f16 `d`
/// is the top nibbles of `sc[0..4]` (`sc[k] >> 12` is bits `4k..4k+4`). Each 16 weights `s`
/// have scale `d * (2 ((sc[s / 4] >> 3 (s % 4)) & 7) + 1)`. Each 8 weights `g` use nibble
/// `g % 2` of `qh[g / 2]`: row `qs[g] | (nibble & 7) << 8` of [`IQ1S_GRID`], offset
/// `±IQ1S_DELTA` (negative when bit 3 of the nibble is set); `y = dl * (grid + delta)`.
fn iq1_m(b: &[u8; 56], y: &mut [f32; 256]) {
    let (qs, qh) = (&b[0..32], &b[32..48]);
    let sc = [u16_at(b, 48), u16_at(b, 50), u16_at(b, 52), u16_at(b, 54)];
    let d_bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000);
    let d = half::f16::from_bits(d_bits).to_f32();
    for (s, y) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * (2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1) as f32;
        for (h, y) in y.chunks_exact_mut(8).enumerate() {
            let g = 2 * s + h;
            let nibble = (qh[g / 2] >> (4 * (g % 2))) & 0x0F;
            let idx = qs[g] as usize | ((nibble & 7) as usize) << 8;
            let delta = if nibble & 8 != 0 { -IQ1S_DELTA } else { IQ1S_DELTA };
            let grid = IQ1S_GRID[idx];
            for (j, y) in y.iter_mut().enumerate() {
                *y = dl * (grid_i8(grid, j) + delta);
            }
        }
    }
}

/// IQ4_NL, 32 weights in 18 bytes: `d: f16 | qs: [u8; 16]`, nibbles as Q4_0, each an index
/// into [`KVALUES_IQ4NL`]; `y = d * kvalue`.
fn iq4_nl(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
    }
}

/// IQ4_XS, 256 weights in 136 bytes: `d: f16 | scales_h: u16 | scales_l: [u8; 4] | qs: [u8; 128]`.
/// Group `g` (32 weights) has the 6-bit scale `lo | hi << 4` minus 32, `lo` nibble `g % 2` of
/// `scales_l[g / 2]`, `hi` bits `2g..2g+2` of `scales_h`; within it, weight `j < 16` is the
/// low nibble of `qs[16 g + j]` and weight `16 + j` the high one, each an index into
/// [`KVALUES_IQ4NL`]; `y = (d * sc) * kvalue`.
fn iq4_xs(b: &[u8; 136], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let scales_h = u16_at(b, 2);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let lo = (scales_l[g / 2] >> (4 * (g % 2))) & 0x0F;
        let hi = ((scales_h >> (2 * g)) & 3) as u8;
        let dl = d * ((lo | hi << 4) as i32 - 32) as f32;
        for j in 0..16 {
            let q = qs[16 * g + j];
            y[j] = dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
            y[j + 16] = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
        }
    }
}

/// Where a block of `format` keeps its f16 scales: `(byte offset, largest integer factor the
/// scale is multiplied by)`. IQ1_M is absent: its f16 is spread over its `sc` words.
fn scale_fields(format: Format) -> &'static [(usize, f32)] {
    match format {
        Format::F32 | Format::F16 | Format::BF16 => &[],
        Format::Q4_0 => &[(0, 8.0)],
        Format::Q4_1 => &[(0, 15.0), (2, 2.0)],
        Format::Q5_0 => &[(0, 16.0)],
        Format::Q5_1 => &[(0, 31.0), (2, 2.0)],
        Format::Q8_0 => &[(0, 128.0)],
        Format::Q2_K => &[(80, 15.0 * 3.0), (82, 2.0 * 15.0)],
        Format::Q3_K => &[(108, 32.0 * 4.0)],
        Format::Q4_K => &[(0, 63.0 * 15.0), (2, 2.0 * 63.0)],
        Format::Q5_K => &[(0, 63.0 * 31.0), (2, 2.0 * 63.0)],
        Format::Q6_K => &[(208, 128.0 * 32.0)],
        Format::IQ2_XXS | Format::IQ2_XS | Format::IQ2_S => &[(0, 15.5 * 0.25 * 43.0)],
        Format::IQ3_XXS => &[(0, 15.5 * 0.5 * 62.0)],
        Format::IQ3_S => &[(0, 31.0 * 15.0)],
        Format::IQ1_S => &[(0, 15.0 * 1.125)],
        Format::IQ4_NL => &[(0, 127.0)],
        Format::IQ4_XS => &[(0, 32.0 * 127.0)],
        Format::IQ1_M => &[],
    }
}

/// SplitMix64: a small deterministic generator for [`random_blocks`].
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A value of magnitude uniform in [0.25, 1] × `max`, with a random sign.
    fn scale(&mut self, max: f32) -> f32 {
        let v = max * (0.25 + 0.75 * self.unit());
        if self.next() & 1 != 0 {
            -v
        } else {
            v
        }
    }
}

/// `blocks` deterministic pseudo-random blocks of `format` (the same for the same `seed`):
/// random quant bytes, f16 scales finite and sized so that dequantized weights stay within
/// about ±0.15 (typically 0.01–0.1 in magnitude; mins add at most 0.05). Float formats get values uniform in ±0.1.
/// For kernel tests and benchmarks.
pub fn random_blocks(format: Format, blocks: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; blocks * format.block_bytes()];
    random_blocks_into(format, &mut out, seed, 0.1);
    out
}

/// Fills `out` (whole blocks of `format`) with pseudo-random blocks as [`random_blocks`] does,
/// dequantized weights within about ±`max_weight` (random checkpoints scale it by
/// 1/√fan-in).
pub fn random_blocks_into(format: Format, out: &mut [u8], seed: u64, max_weight: f32) {
    let mut rng = SplitMix64(seed ^ 0x5157_4943_4B00_0000 ^ ((format as u64) << 8));
    let bytes = format.block_bytes();
    for block in out.chunks_exact_mut(bytes) {
        match format {
            Format::F32 => block.copy_from_slice(&rng.scale(max_weight).to_le_bytes()),
            Format::F16 => block.copy_from_slice(&half::f16::from_f32(rng.scale(max_weight)).to_le_bytes()),
            Format::BF16 => block.copy_from_slice(&half::bf16::from_f32(rng.scale(max_weight)).to_le_bytes()),
            _ => {
                for c in block.chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    c.copy_from_slice(&r[..c.len()]);
                }
                for &(at, factor) in scale_fields(format) {
                    let d = half::f16::from_f32(rng.scale(max_weight / factor));
                    block[at..at + 2].copy_from_slice(&d.to_le_bytes());
                }
                if format == Format::IQ1_M {
                    // The f16 scale is the top nibble of each of the four u16 words at 48..56.
                    let d = half::f16::from_f32(rng.scale(max_weight / (15.0 * 1.125))).to_bits();
                    for k in 0..4 {
                        let at = 48 + 2 * k;
                        let w = u16::from_le_bytes([block[at], block[at + 1]]) & 0x0FFF | ((d >> (4 * k)) & 0xF) << 12;
                        block[at..at + 2].copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
        }
    }
}
