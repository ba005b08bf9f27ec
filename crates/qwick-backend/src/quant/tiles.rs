//! The tile layout the integer kernels read: weights of 16 rows interleaved, so that one
//! 64-byte vector holds four consecutive weights of each of the 16 rows and a `vpdpbusd`
//! against four broadcast activation bytes yields one partial dot product per row.
//!
//! Every integer-kernel format is described the same way. Weight `w` of a row is
//! `s · (u − o) + m`, with `u` an unsigned integer (the bits a format stores, after any
//! lookup), `o` a per-format integer offset, and a scale `s` and minimum `m` per group of 16 or
//! 32 weights. A group of 16 rows stores, per super-block of `sb` weights (32 or 256), a header
//! (the rows' scales, lane by lane) and then, per 32 weights, the quant planes: 4-bit nibbles,
//! 2-bit fields or single bits (as 64-bit masks, one bit per row and weight), or whole bytes.
//! The layouts hold the same information as the file's blocks, in the same or a few more bytes.
//!
//! [`repack`] converts rows in a file's layout to tiles; [`unpack`] reads one row's block back
//! (the scalar reference of the kernels, tested to reproduce [`Format::dequantize`] exactly).

use crate::format::Format;
use half::f16;

/// Rows per tile group.
pub const ROWS: usize = 16;

/// How bits `shift..` of the unsigned quants are stored for each 32 weights of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// Four bits each: 4 × 64 bytes; byte `t·64 + r·4 + b` holds weight `4t + b` of row `r` in
    /// its low nibble and weight `16 + 4t + b` in its high nibble.
    Nibbles,
    /// Two bits each: 2 × 64 bytes; bits `2c, 2c+1` of byte `p·64 + r·4 + b` hold weight
    /// `4(4p + c) + b` of row `r`.
    Pairs,
    /// One bit each: 8 little-endian u64 masks; bit `r·4 + b` of mask `t` is weight `4t + b` of
    /// row `r`.
    Bits,
    /// Whole bytes: 8 × 64 bytes; byte `t·64 + r·4 + b` is weight `4t + b` of row `r`.
    Bytes,
}

impl Plane {
    pub const fn bits(self) -> u32 {
        match self {
            Plane::Nibbles => 4,
            Plane::Pairs => 2,
            Plane::Bits => 1,
            Plane::Bytes => 8,
        }
    }

    /// Bytes per 32 weights of a 16-row group.
    pub const fn bytes(self) -> usize {
        (self.bits() as usize) * 64
    }
}

/// The tile description of a format.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub format: Format,
    /// Weights per super-block (a header is stored once per super-block).
    pub sb: usize,
    /// Header bytes per super-block of a group.
    pub header: usize,
    /// Planes, lowest bits first.
    pub planes: &'static [Plane],
    /// Scale groups of 16 weights (else 32).
    pub g16: bool,
    /// The integer offset `o`.
    pub offset: i32,
    /// Whether groups have a minimum `m`.
    pub min: bool,
}

impl Spec {
    /// Bytes of the quant planes of 32 weights of a group.
    pub const fn block_bytes(&self) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.planes.len() {
            n += self.planes[i].bytes();
            i += 1;
        }
        n
    }

    /// Bytes of one super-block of a group.
    pub const fn sb_bytes(&self) -> usize {
        self.header + self.sb / 32 * self.block_bytes()
    }

    /// Bytes of a group of 16 rows of `k` weights.
    pub fn group_bytes(&self, k: usize) -> usize {
        k / self.sb * self.sb_bytes()
    }

    /// Bytes of the tiles of a `rows × k` weight (rows padded to a multiple of 16).
    pub fn bytes(&self, rows: usize, k: usize) -> usize {
        rows.div_ceil(ROWS) * self.group_bytes(k)
    }

    /// Scale groups per 32 weights.
    pub const fn groups(&self) -> usize {
        if self.g16 {
            2
        } else {
            1
        }
    }
}

use Plane::*;

const Q4_0: Spec =
    Spec { format: Format::Q4_0, sb: 32, header: 32, planes: &[Nibbles], g16: false, offset: 8, min: false };
const Q4_1: Spec =
    Spec { format: Format::Q4_1, sb: 32, header: 64, planes: &[Nibbles], g16: false, offset: 0, min: true };
const Q5_0: Spec =
    Spec { format: Format::Q5_0, sb: 32, header: 32, planes: &[Nibbles, Bits], g16: false, offset: 16, min: false };
const Q5_1: Spec =
    Spec { format: Format::Q5_1, sb: 32, header: 64, planes: &[Nibbles, Bits], g16: false, offset: 0, min: true };
const Q8_0: Spec =
    Spec { format: Format::Q8_0, sb: 32, header: 32, planes: &[Bytes], g16: false, offset: 128, min: false };
const IQ4_NL: Spec =
    Spec { format: Format::IQ4_NL, sb: 32, header: 32, planes: &[Nibbles], g16: false, offset: 128, min: false };
const Q2_K: Spec =
    Spec { format: Format::Q2_K, sb: 256, header: 320, planes: &[Pairs], g16: true, offset: 0, min: true };
const Q3_K: Spec =
    Spec { format: Format::Q3_K, sb: 256, header: 288, planes: &[Pairs, Bits], g16: true, offset: 4, min: false };
const Q4_K: Spec =
    Spec { format: Format::Q4_K, sb: 256, header: 320, planes: &[Nibbles], g16: false, offset: 0, min: true };
const Q5_K: Spec =
    Spec { format: Format::Q5_K, sb: 256, header: 320, planes: &[Nibbles, Bits], g16: false, offset: 0, min: true };
const Q6_K: Spec =
    Spec { format: Format::Q6_K, sb: 256, header: 288, planes: &[Nibbles, Pairs], g16: true, offset: 32, min: false };
const IQ4_XS: Spec =
    Spec { format: Format::IQ4_XS, sb: 256, header: 160, planes: &[Nibbles], g16: false, offset: 128, min: false };

/// The tile description of `format`, if it has integer kernels.
pub const fn spec(format: Format) -> Option<&'static Spec> {
    Some(match format {
        Format::Q4_0 => &Q4_0,
        Format::Q4_1 => &Q4_1,
        Format::Q5_0 => &Q5_0,
        Format::Q5_1 => &Q5_1,
        Format::Q8_0 => &Q8_0,
        Format::IQ4_NL => &IQ4_NL,
        Format::Q2_K => &Q2_K,
        Format::Q3_K => &Q3_K,
        Format::Q4_K => &Q4_K,
        Format::Q5_K => &Q5_K,
        Format::Q6_K => &Q6_K,
        Format::IQ4_XS => &IQ4_XS,
        _ => return None,
    })
}

/// The non-linear 4-bit values of IQ4_NL and IQ4_XS, plus 128 (so they are unsigned). Tiles
/// of these formats store the 4-bit indices.
pub const IQ4_U8: [u8; 16] = {
    let v: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (v[i] as i16 + 128) as u8;
        i += 1;
    }
    out
};

fn f16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// One row's super-block, decoded from a file block: the unsigned quants (`sb` of them) and
/// the header bytes of this row (fields in header order, e.g. `d` then `dmin` then scales).
struct Decoded {
    u: [u8; 256],
    /// Header fields of this row: (bytes per lane, values).
    fields: [(usize, [u8; 16]); 4],
    nfields: usize,
}

impl Decoded {
    fn new() -> Self {
        Decoded { u: [0; 256], fields: [(0, [0; 16]); 4], nfields: 0 }
    }

    fn push(&mut self, lane_bytes: usize, bytes: &[u8]) {
        let mut f = [0u8; 16];
        f[..bytes.len()].copy_from_slice(bytes);
        self.fields[self.nfields] = (lane_bytes, f);
        self.nfields += 1;
    }
}

/// The 6-bit scales and mins of Q4_K/Q5_K's 12 scale bytes.
fn k4_scales(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            mn[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
            mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// The 16 signed 6-bit scales of Q3_K's 12 scale bytes, minus 32.
fn k3_scales(s: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = ((low | (high << 4)) as i8 - 32) as u8;
    }
    out
}

/// Decodes one super-block of one row from its file block(s).
fn decode(spec: &Spec, b: &[u8]) -> Decoded {
    let mut d = Decoded::new();
    let u = &mut d.u;
    match spec.format {
        Format::Q4_0 | Format::Q4_1 | Format::IQ4_NL => {
            let qs = if spec.format == Format::Q4_1 { &b[4..20] } else { &b[2..18] };
            for j in 0..16 {
                u[j] = qs[j] & 0xF;
                u[j + 16] = qs[j] >> 4;
            }
            d.push(2, &b[0..2]);
            if spec.format == Format::Q4_1 {
                d.push(2, &b[2..4]);
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            let o = if spec.format == Format::Q5_1 { 4 } else { 2 };
            let qh = u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            let qs = &b[o + 4..o + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            d.push(2, &b[0..2]);
            if spec.format == Format::Q5_1 {
                d.push(2, &b[2..4]);
            }
        }
        Format::Q8_0 => {
            for j in 0..32 {
                u[j] = b[2 + j] ^ 0x80;
            }
            d.push(2, &b[0..2]);
        }
        Format::Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            for (e, v) in u.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                *v = (qs[32 * n + l] >> (2 * j)) & 3;
            }
            d.push(2, &b[80..82]);
            d.push(2, &b[82..84]);
            d.push(1, scales);
        }
        Format::Q3_K => {
            let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
            for (e, v) in u.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (qs[32 * n + l] >> (2 * j)) & 3;
                let h = (hmask[l] >> (4 * n + j)) & 1;
                *v = q | (h << 2);
            }
            d.push(2, &b[108..110]);
            d.push(1, &k3_scales(scales));
        }
        Format::Q4_K | Format::Q5_K => {
            let (sc, mn) = k4_scales(&b[4..16]);
            let (qh, qs) =
                if spec.format == Format::Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for (e, v) in u.iter_mut().enumerate() {
                let (c, hi, l) = (e / 64, (e % 64) / 32, e % 32);
                let byte = qs[32 * c + l];
                *v = if hi == 1 { byte >> 4 } else { byte & 0xF };
                if let Some(qh) = qh {
                    *v |= ((qh[l] >> (e / 32)) & 1) << 4;
                }
            }
            d.push(2, &b[0..2]);
            d.push(2, &b[2..4]);
            d.push(1, &sc);
            d.push(1, &mn);
        }
        Format::Q6_K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            for (e, v) in u.iter_mut().enumerate() {
                let (n, r) = (e / 128, e % 128);
                let (qq, l) = (r / 32, r % 32);
                let lb = ql[64 * n + l + 32 * (qq & 1)];
                let low = if qq >= 2 { lb >> 4 } else { lb & 0xF };
                let high = (qh[32 * n + l] >> (2 * qq)) & 3;
                *v = low | (high << 4);
            }
            d.push(2, &b[208..210]);
            d.push(1, scales);
        }
        Format::IQ4_XS => {
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let (scales_l, qs) = (&b[4..8], &b[8..136]);
            let mut ls = [0u8; 8];
            for (ib, l) in ls.iter_mut().enumerate() {
                let v = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | ((((scales_h >> (2 * ib)) & 3) as u8) << 4);
                *l = (v as i8 - 32) as u8;
            }
            for ib in 0..8 {
                for j in 0..16 {
                    u[32 * ib + j] = qs[16 * ib + j] & 0xF;
                    u[32 * ib + j + 16] = qs[16 * ib + j] >> 4;
                }
            }
            d.push(2, &b[0..2]);
            d.push(1, &ls);
        }
        f => unreachable!("{f} has no tile layout"),
    }
    d
}

/// Writes the quant planes of weights `u[..32]` of row `r` into the 32-weight block `out`.
fn put_planes(spec: &Spec, u: &[u8], r: usize, out: &mut [u8]) {
    let mut shift = 0;
    let mut off = 0;
    for &p in spec.planes {
        let mask = ((1u16 << p.bits()) - 1) as u8;
        let v = |i: usize| (u[i] >> shift) & mask;
        let o = &mut out[off..off + p.bytes()];
        for t in 0..8 {
            for b in 0..4 {
                let val = v(4 * t + b);
                match p {
                    Nibbles => {
                        let at = (t % 4) * 64 + r * 4 + b;
                        o[at] |= if t < 4 { val } else { val << 4 };
                    }
                    Pairs => o[(t / 4) * 64 + r * 4 + b] |= val << (2 * (t % 4)),
                    Bits => o[t * 8 + (r * 4 + b) / 8] |= val << ((r * 4 + b) % 8),
                    Bytes => o[t * 64 + r * 4 + b] = val,
                }
            }
        }
        shift += p.bits();
        off += p.bytes();
    }
}

/// Reads back weights of row `r` from the 32-weight block `blk`.
fn get_planes(spec: &Spec, blk: &[u8], r: usize) -> [u8; 32] {
    let mut u = [0u8; 32];
    let mut shift = 0;
    let mut off = 0;
    for &p in spec.planes {
        let o = &blk[off..off + p.bytes()];
        for t in 0..8 {
            for b in 0..4 {
                let val = match p {
                    Nibbles => {
                        let byte = o[(t % 4) * 64 + r * 4 + b];
                        if t < 4 {
                            byte & 0xF
                        } else {
                            byte >> 4
                        }
                    }
                    Pairs => (o[(t / 4) * 64 + r * 4 + b] >> (2 * (t % 4))) & 3,
                    Bits => (o[t * 8 + (r * 4 + b) / 8] >> ((r * 4 + b) % 8)) & 1,
                    Bytes => o[t * 64 + r * 4 + b],
                };
                u[4 * t + b] |= val << shift;
            }
        }
        shift += p.bits();
        off += p.bytes();
    }
    u
}

/// Converts `rows` rows of `k` weights in the file's layout (`src`, rows contiguous) to tiles.
/// Missing rows of the last group are zero.
#[cfg(test)]
pub fn repack(format: Format, src: &[u8], rows: usize, k: usize) -> Vec<u8> {
    let spec = spec(format).unwrap_or_else(|| panic!("{format} has no tile layout"));
    let mut out = vec![0u8; spec.bytes(rows, k)];
    repack_into(spec, src, rows, k, &mut out);
    out
}

/// [`repack`] into a buffer of `spec.bytes(rows, k)` bytes (zeroed).
pub fn repack_into(spec: &Spec, src: &[u8], rows: usize, k: usize, out: &mut [u8]) {
    let rb = spec.format.row_bytes(k);
    let fb = spec.format.bytes_for(spec.sb).unwrap();
    let gb = spec.group_bytes(k);
    for (g, grp) in out.chunks_exact_mut(gb).enumerate() {
        for r in 0..ROWS.min(rows - g * ROWS) {
            let row = &src[(g * ROWS + r) * rb..(g * ROWS + r + 1) * rb];
            for (s, sbo) in grp.chunks_exact_mut(spec.sb_bytes()).enumerate() {
                let b = &row[s * fb..(s + 1) * fb];
                if repack_fast(spec, b, r, sbo) {
                    continue;
                }
                let dec = decode(spec, b);
                // Header: fields in order, each `n` values of `lane_bytes` for all 16 lanes.
                let mut off = 0;
                for &(lb, ref vals) in &dec.fields[..dec.nfields] {
                    let n = field_len(spec, lb, off);
                    for e in 0..n {
                        for c in 0..lb {
                            sbo[off + (e * ROWS + r) * lb + c] = vals[e * lb + c];
                        }
                    }
                    off += n * ROWS * lb;
                }
                debug_assert_eq!(off, spec.header);
                let (_, blocks) = sbo.split_at_mut(spec.header);
                for (j, blk) in blocks.chunks_exact_mut(spec.block_bytes()).enumerate() {
                    put_planes(spec, &dec.u[32 * j..32 * j + 32], r, blk);
                }
            }
        }
    }
}

/// Row `r` of one super-block for the common formats whose planes are the file's bytes moved
/// around (the same result as the general path, faster); false for the others.
fn repack_fast(spec: &Spec, b: &[u8], r: usize, out: &mut [u8]) -> bool {
    let put16 = |out: &mut [u8], field: usize, bytes: &[u8]| {
        out[field * 32 + 2 * r..field * 32 + 2 * r + 2].copy_from_slice(&bytes[..2]);
    };
    match spec.format {
        Format::Q4_0 | Format::IQ4_NL | Format::Q4_1 => {
            // The nibble plane's byte (t, r, b) is the file's qs[4t + b].
            let hdr = if spec.format == Format::Q4_1 { 4 } else { 2 };
            put16(out, 0, &b[0..2]);
            if hdr == 4 {
                put16(out, 1, &b[2..4]);
            }
            let qs = &b[hdr..hdr + 16];
            for t in 0..4 {
                let at = spec.header + t * 64 + r * 4;
                out[at..at + 4].copy_from_slice(&qs[4 * t..4 * t + 4]);
            }
            true
        }
        Format::Q8_0 => {
            put16(out, 0, &b[0..2]);
            for t in 0..8 {
                let at = spec.header + t * 64 + r * 4;
                for i in 0..4 {
                    out[at + i] = b[2 + 4 * t + i] ^ 0x80;
                }
            }
            true
        }
        Format::Q4_K => {
            put16(out, 0, &b[0..2]);
            put16(out, 1, &b[2..4]);
            let (sc, mn) = k4_scales(&b[4..16]);
            for j in 0..8 {
                out[64 + j * ROWS + r] = sc[j];
                out[192 + j * ROWS + r] = mn[j];
            }
            let qs = &b[16..144];
            for c in 0..4 {
                let (lo_blk, hi_blk) = (spec.header + 2 * c * 256, spec.header + (2 * c + 1) * 256);
                for t in 0..4 {
                    for i in 0..4 {
                        let (x, y) = (qs[32 * c + 4 * t + i], qs[32 * c + 16 + 4 * t + i]);
                        out[lo_blk + t * 64 + r * 4 + i] = (x & 0xF) | (y << 4);
                        out[hi_blk + t * 64 + r * 4 + i] = (x >> 4) | (y & 0xF0);
                    }
                }
            }
            true
        }
        Format::Q6_K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            put16(out, 0, &b[208..210]);
            for (e, &v) in scales.iter().enumerate() {
                out[32 + e * ROWS + r] = v;
            }
            for j in 0..8 {
                let (n, qq) = (j / 4, j % 4);
                let base = 64 * n + 32 * (qq & 1);
                let nib = |v: u8| if qq >= 2 { v >> 4 } else { v & 0xF };
                let blk = spec.header + j * spec.block_bytes();
                for t in 0..4 {
                    for i in 0..4 {
                        let (x, y) = (ql[base + 4 * t + i], ql[base + 16 + 4 * t + i]);
                        out[blk + t * 64 + r * 4 + i] = nib(x) | (nib(y) << 4);
                    }
                }
                for p in 0..2 {
                    for i in 0..4 {
                        let mut v = 0u8;
                        for c in 0..4 {
                            v |= ((qh[32 * n + 16 * p + 4 * c + i] >> (2 * qq)) & 3) << (2 * c);
                        }
                        out[blk + 256 + p * 64 + r * 4 + i] = v;
                    }
                }
            }
            true
        }
        _ => false,
    }
}

/// Values per row of the header field that starts at byte `off` with `lane_bytes` per value.
fn field_len(spec: &Spec, lane_bytes: usize, off: usize) -> usize {
    match (spec.format, lane_bytes, off) {
        (_, 2, _) => 1,
        (Format::Q4_K | Format::Q5_K, 1, _) => 8,
        (Format::IQ4_XS, 1, _) => 8,
        (Format::Q2_K | Format::Q3_K | Format::Q6_K, 1, _) => 16,
        (f, lb, o) => unreachable!("{f}: no header field of {lb} bytes at {o}"),
    }
}

/// One row's 32-weight block `j` of a super-block, read from tiles: the unsigned quants, and
/// the scale and minimum of each of its scale groups (one group when the format's groups are 32
/// weights: then index 1 repeats index 0).
pub struct Unpacked {
    pub u: [u8; 32],
    pub s: [f32; 2],
    pub m: [f32; 2],
}

fn lane_f16(h: &[u8], field: usize, r: usize) -> f32 {
    f16::from_bits(f16_at(h, field * 32 + 2 * r)).to_f32()
}

/// The scales and minimums of block `j` (0..sb/32) of row `r`, from the super-block header `h`,
/// computed exactly as [`Format::dequantize`] computes them.
pub fn scales(spec: &Spec, h: &[u8], j: usize, r: usize) -> ([f32; 2], [f32; 2]) {
    let byte = |off: usize, e: usize| h[off + e * ROWS + r];
    let sbyte = |off: usize, e: usize| h[off + e * ROWS + r] as i8 as f32;
    match spec.format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 | Format::IQ4_NL => {
            let d = lane_f16(h, 0, r);
            ([d; 2], [0.0; 2])
        }
        Format::Q4_1 | Format::Q5_1 => {
            let (d, m) = (lane_f16(h, 0, r), lane_f16(h, 1, r));
            ([d; 2], [m; 2])
        }
        Format::Q4_K | Format::Q5_K => {
            let (d, dmin) = (lane_f16(h, 0, r), lane_f16(h, 1, r));
            let s = d * byte(64, j) as f32;
            let m = -(dmin * byte(64 + 8 * ROWS, j) as f32);
            ([s; 2], [m; 2])
        }
        Format::Q6_K | Format::Q3_K => {
            let d = lane_f16(h, 0, r);
            ([d * sbyte(32, 2 * j), d * sbyte(32, 2 * j + 1)], [0.0; 2])
        }
        Format::Q2_K => {
            let (d, dmin) = (lane_f16(h, 0, r), lane_f16(h, 1, r));
            let (a, b) = (byte(64, 2 * j), byte(64, 2 * j + 1));
            ([d * (a & 0xF) as f32, d * (b & 0xF) as f32], [-(dmin * (a >> 4) as f32), -(dmin * (b >> 4) as f32)])
        }
        Format::IQ4_XS => {
            let d = lane_f16(h, 0, r);
            ([d * sbyte(32, j); 2], [0.0; 2])
        }
        f => unreachable!("{f} has no tile layout"),
    }
}

/// Row `r` of a group's block `j` (counted over the whole row).
pub fn unpack(spec: &Spec, group: &[u8], j: usize, r: usize) -> Unpacked {
    let per_sb = spec.sb / 32;
    let sbo = &group[(j / per_sb) * spec.sb_bytes()..];
    let (h, blocks) = sbo.split_at(spec.header);
    let jj = j % per_sb;
    let mut u = get_planes(spec, &blocks[jj * spec.block_bytes()..], r);
    if matches!(spec.format, Format::IQ4_NL | Format::IQ4_XS) {
        // The planes hold indices into the non-linear values.
        for v in u.iter_mut() {
            *v = IQ4_U8[*v as usize];
        }
    }
    let (s, m) = scales(spec, h, jj, r);
    Unpacked { u, s, m }
}

/// bf16 weights in AMX's B-tile layout: per group of 16 rows, per 32 inputs, one 1 KiB tile
/// whose row `p` holds inputs `2p` and `2p + 1` of each of the 16 weight rows (32-bit pairs,
/// row `r` at bytes `4r..4r + 4`). The kernels take groups in pairs (rows `32q..32q + 32`):
/// a pair's two tiles of the first 32 inputs, then of the next 32, and so on, so the pair is
/// one sequential stream. Rows past the weight's are zero. `k` is a multiple of 32.
pub mod bf16 {
    use super::ROWS;

    /// Bytes of a `rows × k` weight in tiles.
    pub fn bytes(rows: usize, k: usize) -> usize {
        rows.div_ceil(2 * ROWS) * 2 * ROWS * k * 2
    }

    /// Index (in bf16 values) of weight row `r`, input `c` in tiles of rows of `k` inputs.
    pub fn index(k: usize, r: usize, c: usize) -> usize {
        (((r / (2 * ROWS)) * (k / 32) + c / 32) * 2 + r / ROWS % 2) * 512 + (c % 32 / 2) * 32 + (r % ROWS) * 2 + c % 2
    }

    /// The scalar reference conversion of `rows` rows of `k` bf16 (`src`, little-endian, rows
    /// contiguous) to tiles in `out` ([`bytes`] long, zeroed).
    pub fn from_rows(src: &[u8], rows: usize, k: usize, out: &mut [u8]) {
        assert!(k.is_multiple_of(32) && src.len() >= rows * k * 2 && out.len() == bytes(rows, k));
        for r in 0..rows {
            for c in 0..k {
                let (i, o) = (2 * (r * k + c), 2 * index(k, r, c));
                out[o..o + 2].copy_from_slice(&src[i..i + 2]);
            }
        }
    }

    /// Row `r` of a weight in tiles, as f32 (`out` holds `k` values).
    pub fn row_to_f32(tiles: &[u8], k: usize, r: usize, out: &mut [f32]) {
        for (c, v) in out[..k].iter_mut().enumerate() {
            let i = 2 * index(k, r, c);
            *v = crate::format::bf16_to_f32(u16::from_le_bytes([tiles[i], tiles[i + 1]]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows `16·g..16·g+16`, values `32·j0..32·(j0 + steps)` of a bf16 weight in row layout
/// (`k` values per row) as B tiles: for each 32 values, 16 rows of 64 bytes, row `p` holding
/// values `(2p, 2p+1)` of each weight row: a 16 × 16 transpose of 32-bit pairs, done in
/// registers. Rows past `rows` are zero.
///
/// Tile `j` goes `j × stride` bytes after `out`.
///
/// # Safety
/// The CPU must support AVX-512; `data` holds `rows` rows of `k` bf16; `out` is valid for
/// `steps` tiles of 1024 bytes `stride` apart (any alignment).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn unpack_bf16_rows(
    data: &[u8],
    rows: usize,
    g: usize,
    k: usize,
    j0: usize,
    steps: usize,
    out: *mut u8,
    stride: usize,
) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        let n = (rows - g * ROWS).min(ROWS);
        let base = data.as_ptr().add(g * ROWS * 2 * k);
        for j in 0..steps {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, v) in r.iter_mut().enumerate().take(n) {
                *v = _mm512_loadu_si512(base.add(i * 2 * k + 64 * (j0 + j)) as *const _);
            }
            let t = transpose16(r);
            let dst = out.add(j * stride);
            for (p, v) in t.iter().enumerate() {
                _mm512_storeu_si512(dst.add(64 * p) as *mut _, *v);
            }
        }
    }
}

/// [`bf16::from_rows`] with the transposes in registers (AVX-512).
///
/// # Safety
/// The CPU must support AVX-512; `data` holds `rows` rows of `k` bf16 (`k` a multiple of 32);
/// `out` is [`bf16::bytes`] long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn bf16_rows_to_tiles(data: &[u8], rows: usize, k: usize, out: &mut [u8]) {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        assert!(k.is_multiple_of(32) && data.len() >= rows * k * 2 && out.len() == bf16::bytes(rows, k));
        for g in 0..rows.div_ceil(ROWS) {
            // The pair's tiles alternate: group `g`'s at even kilobytes of the pair's run.
            let at = (g / 2 * k / 32 * 2 + g % 2) * 1024;
            unpack_bf16_rows(data, rows, g, k, 0, k / 32, out.as_mut_ptr().add(at), 2048);
        }
    }
}

/// The 16 × 16 transpose of 32-bit lanes: lane `r` of output `p` is lane `p` of input `r`.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Pairs of rows interleaved: t[2i] holds lanes (0, 1) of rows 2i, 2i+1 per 128-bit lane, ...
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4a + c]: lanes c, c+4, c+8, c+12 of rows 4a..4a+4, one per 128-bit lane.
    let mut u = [_mm512_setzero_si512(); 16];
    for a in 0..4 {
        let (t0, t1, t2, t3) = (t[4 * a], t[4 * a + 1], t[4 * a + 2], t[4 * a + 3]);
        u[4 * a] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * a + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * a + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * a + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    // Output 4L + c gathers 128-bit lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let w0 = _mm512_shuffle_i32x4::<0xdd>(u[c], u[4 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xdd>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(v0, v1);
        out[8 + c] = _mm512_shuffle_i32x4::<0xdd>(v0, v1);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(w0, w1);
        out[12 + c] = _mm512_shuffle_i32x4::<0xdd>(w0, w1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::random_blocks;

    /// bf16 tiles: the register transposes equal the scalar conversion (a group count made
    /// even by a zero group, a last group partly empty), and rows read back are the stored ones.
    #[test]
    fn bf16_tiles_hold_the_rows() {
        for &(rows, k) in &[(40, 96), (16, 32), (70, 1024)] {
            let src: Vec<u8> = crate::check::rand_vec(rows * k, rows as u64)
                .iter()
                .flat_map(|&v| crate::format::f32_to_bf16(v).to_le_bytes())
                .collect();
            let mut want = vec![0u8; bf16::bytes(rows, k)];
            bf16::from_rows(&src, rows, k, &mut want);
            assert_eq!(want.len(), rows.div_ceil(32) * 32 * k * 2);
            #[cfg(target_arch = "x86_64")]
            if crate::isa::Level::Avx512.supported() {
                let mut got = vec![0u8; want.len()];
                // SAFETY: AVX-512 was checked; `got` is as long as the tiles.
                unsafe { bf16_rows_to_tiles(&src, rows, k, &mut got) };
                assert!(got == want, "{rows} × {k}: transposed in registers differs");
            }
            let mut row = vec![0f32; k];
            for r in 0..rows {
                bf16::row_to_f32(&want, k, r, &mut row);
                let expect: Vec<f32> = src[r * 2 * k..(r + 1) * 2 * k]
                    .chunks_exact(2)
                    .map(|b| crate::format::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect();
                assert_eq!(row, expect, "row {r}");
            }
        }
    }

    /// Tiles read back give the file's dequantized weights exactly (for every format with a
    /// tile layout, and a row count that leaves the last group partly empty).
    #[test]
    fn tiles_reproduce_dequantize() {
        for &f in Format::ALL {
            let Some(spec) = spec(f) else { continue };
            let (rows, k) = (37, 512);
            let src = random_blocks(f, rows * k / f.block(), 7);
            let tiles = repack(f, &src, rows, k);
            assert_eq!(tiles.len(), spec.bytes(rows, k));
            let rb = f.row_bytes(k);
            let mut want = vec![0f32; k];
            for r in 0..rows {
                f.dequantize(&src[r * rb..(r + 1) * rb], &mut want);
                let group = &tiles[(r / ROWS) * spec.group_bytes(k)..];
                for j in 0..k / 32 {
                    let up = unpack(spec, group, j, r % ROWS);
                    for i in 0..32 {
                        let g = if spec.g16 { i / 16 } else { 0 };
                        let w = up.s[g] * (up.u[i] as i32 - spec.offset) as f32 + up.m[g];
                        let e = want[32 * j + i];
                        assert!(
                            w.to_bits() == e.to_bits() || (w == 0.0 && e == 0.0),
                            "{f} row {r} weight {}: tiles give {w}, dequantize {e}",
                            32 * j + i
                        );
                    }
                }
            }
        }
    }
}
