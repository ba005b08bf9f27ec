//! The GPU column of the format table: for each weight format the kernels read, WGSL that
//! dequantizes 32 consecutive weights from the stored bytes (the same values as
//! [`crate::Format::dequantize`], the scalar reference). Blocks are read in place, byte by byte
//! where a format's blocks are not 4-byte aligned: weights are never expanded in memory.

use crate::format::Format;

/// Reading bytes, halves and f16 values out of the weight words `w`.
const ACCESS: &str = r#"
fn wbyte(o: u32) -> u32 { return (w[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu; }
fn wi8(o: u32) -> i32 { return (i32(wbyte(o)) << 24u) >> 24u; }
fn wu16(o: u32) -> u32 { return wbyte(o) | (wbyte(o + 1u) << 8u); }
fn wf16(o: u32) -> f32 { return unpack2x16float(wu16(o)).x; }
fn wu32(o: u32) -> u32 { return wu16(o) | (wu16(o + 2u) << 16u); }
const IQ4NL = array<f32, 16>(-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
                             1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0);
fn k_scale_min(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(wbyte(s + j) & 63u), f32(wbyte(s + j + 4u) & 63u));
    }
    let sc = (wbyte(s + j + 4u) & 0xfu) | ((wbyte(s + j - 4u) >> 6u) << 4u);
    let m = (wbyte(s + j + 4u) >> 4u) | ((wbyte(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
"#;

/// The body of `fn deq32(o: u32, sub: u32, out: ptr<function, array<f32, 32>>)`: the 32
/// weights of chunk `sub` of the block at byte `o` (for the float formats, the 32 values at
/// `o`).
fn body(f: Format) -> Option<&'static str> {
    Some(match f {
        Format::F32 => "for (var j = 0u; j < 32u; j++) { (*out)[j] = bitcast<f32>(w[(o >> 2u) + j]); }",
        Format::F16 => {
            "for (var j = 0u; j < 16u; j++) { let v = unpack2x16float(w[(o >> 2u) + j]); (*out)[2u * j] = v.x; (*out)[2u * j + 1u] = v.y; }"
        }
        Format::BF16 => {
            "for (var j = 0u; j < 16u; j++) { let v = w[(o >> 2u) + j]; (*out)[2u * j] = bitcast<f32>(v << 16u); (*out)[2u * j + 1u] = bitcast<f32>(v & 0xffff0000u); }"
        }
        Format::Q8_0 => "let d = wf16(o); for (var j = 0u; j < 32u; j++) { (*out)[j] = d * f32(wi8(o + 2u + j)); }",
        Format::Q4_0 => {
            "let d = wf16(o); for (var j = 0u; j < 16u; j++) { let q = wbyte(o + 2u + j);
             (*out)[j] = d * (f32(q & 0xfu) - 8.0); (*out)[j + 16u] = d * (f32(q >> 4u) - 8.0); }"
        }
        Format::Q4_1 => {
            "let d = wf16(o); let m = wf16(o + 2u); for (var j = 0u; j < 16u; j++) { let q = wbyte(o + 4u + j);
             (*out)[j] = d * f32(q & 0xfu) + m; (*out)[j + 16u] = d * f32(q >> 4u) + m; }"
        }
        Format::Q5_0 => {
            "let d = wf16(o); let h = wu32(o + 2u); for (var j = 0u; j < 16u; j++) { let q = wbyte(o + 6u + j);
             let h0 = ((h >> j) << 4u) & 0x10u; let h1 = (h >> (j + 12u)) & 0x10u;
             (*out)[j] = d * (f32((q & 0xfu) | h0) - 16.0); (*out)[j + 16u] = d * (f32((q >> 4u) | h1) - 16.0); }"
        }
        Format::Q5_1 => {
            "let d = wf16(o); let m = wf16(o + 2u); let h = wu32(o + 4u); for (var j = 0u; j < 16u; j++) { let q = wbyte(o + 8u + j);
             let h0 = ((h >> j) << 4u) & 0x10u; let h1 = (h >> (j + 12u)) & 0x10u;
             (*out)[j] = d * f32((q & 0xfu) | h0) + m; (*out)[j + 16u] = d * f32((q >> 4u) | h1) + m; }"
        }
        Format::IQ4_NL => {
            "let d = wf16(o); for (var j = 0u; j < 16u; j++) { let q = wbyte(o + 2u + j);
             (*out)[j] = d * IQ4NL[q & 0xfu]; (*out)[j + 16u] = d * IQ4NL[q >> 4u]; }"
        }
        // d, dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles: chunk pairs
        // (2i, 2i+1) share 32 bytes, low nibbles then high.
        Format::Q4_K => {
            "let d = wf16(o); let dmin = wf16(o + 2u); let sm = k_scale_min(o + 4u, sub);
             let sc = d * sm.x; let mn = dmin * sm.y; let q = o + 16u + 32u * (sub / 2u); let shift = 4u * (sub % 2u);
             for (var j = 0u; j < 32u; j++) { (*out)[j] = sc * f32((wbyte(q + j) >> shift) & 0xfu) - mn; }"
        }
        // As Q4_K, with each weight's fifth bit in 32 bytes of high bits (bit `sub` of byte j).
        Format::Q5_K => {
            "let d = wf16(o); let dmin = wf16(o + 2u); let sm = k_scale_min(o + 4u, sub);
             let sc = d * sm.x; let mn = dmin * sm.y; let q = o + 48u + 32u * (sub / 2u); let shift = 4u * (sub % 2u);
             for (var j = 0u; j < 32u; j++) {
                 let hi = ((wbyte(o + 16u + j) >> sub) & 1u) << 4u;
                 (*out)[j] = sc * f32(((wbyte(q + j) >> shift) & 0xfu) | hi) - mn; }"
        }
        // 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d: chunk `sub` is
        // quarter `sub % 4` of half `sub / 4`.
        Format::Q6_K => {
            "let d = wf16(o + 208u); let n = sub / 4u; let t = sub % 4u;
             let ql = o + 64u * n + 32u * (t % 2u); let qh = o + 128u + 32u * n; let lshift = 4u * (t / 2u);
             for (var j = 0u; j < 32u; j++) {
                 let q = ((wbyte(ql + j) >> lshift) & 0xfu) | (((wbyte(qh + j) >> (2u * t)) & 3u) << 4u);
                 let s = f32(wi8(o + 192u + 8u * n + j / 16u + 2u * t));
                 (*out)[j] = d * s * (f32(q) - 32.0); }"
        }
        // d, 16 bits of scale highs, 4 bytes of scale lows, 128 bytes of nibbles (16 a chunk).
        Format::IQ4_XS => {
            "let d = wf16(o); let sh = wu16(o + 2u);
             let ls = ((wbyte(o + 4u + sub / 2u) >> (4u * (sub % 2u))) & 0xfu) | (((sh >> (2u * sub)) & 3u) << 4u);
             let dl = d * (f32(ls) - 32.0); let q = o + 8u + 16u * sub;
             for (var j = 0u; j < 16u; j++) { let b = wbyte(q + j);
                 (*out)[j] = dl * IQ4NL[b & 0xfu]; (*out)[j + 16u] = dl * IQ4NL[b >> 4u]; }"
        }
        _ => return None,
    })
}

/// Whether the GPU kernels read weights of format `f`.
pub fn supports(f: Format) -> bool {
    body(f).is_some()
}

/// Whether the GPU kernels read rows of `k` weights of format `f`: a supported format and
/// whole blocks; float rows (read a word at a time) must also start at multiples of 4 bytes,
/// and may end in a partial chunk of 32. Quantized blocks are read byte by byte, at any
/// alignment.
pub fn reads(f: Format, k: usize) -> bool {
    supports(f) && k.is_multiple_of(f.block()) && (!f.is_float() || f.row_bytes(k).is_multiple_of(4))
}

/// WGSL defining `deq32` for format `f` over the storage array `w` (declared by the caller).
pub(crate) fn wgsl(f: Format) -> String {
    let body = body(f).unwrap_or_else(|| panic!("no GPU kernel reads {f} weights"));
    format!("{ACCESS}\nfn deq32(o: u32, sub: u32, out: ptr<function, array<f32, 32>>) {{\n{body}\n}}\n")
}

/// Byte offset of the block holding 32-weight chunk `c` of a row, and the chunk's index in it,
/// as the kernels compute it: `(c · 32 / block) · block_bytes` and `c mod (block / 32)`.
pub(crate) fn chunk_geometry(f: Format) -> (u32, u32) {
    if f.block() == 1 {
        // Floats: 32 values a chunk, each `block_bytes` wide.
        (32 * f.block_bytes() as u32, 1)
    } else {
        (f.block_bytes() as u32, (f.block() / 32) as u32)
    }
}
