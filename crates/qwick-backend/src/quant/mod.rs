//! Quantized weight formats: the scalar dequantization, quantization of weights, and the tile
//! layout the integer kernels ([`crate::matmul::int8`]) and AMX read.

pub mod dequant;
pub mod grids;
pub mod quantize;
pub mod tiles;

use crate::format::Format;
use crate::isa::Level;
use crate::weights::{Layout, WeightView};
use tiles::ROWS;

/// `match $format`: for the formats both quantization and dequantization have a block codec
/// for, `blocks($src, $dst, codec)` with the calling module's `blocks` and its codec of the
/// format's name (`q4_0`, …, `iq4_xs`); the arms `$rest` for the other formats.
macro_rules! by_block_codec {
    ($format:expr, $src:expr, $dst:expr, $($rest:tt)*) => {
        by_block_codec!(@ $format, $src, $dst, { $($rest)* },
            Q4_0 q4_0, Q4_1 q4_1, Q5_0 q5_0, Q5_1 q5_1, Q8_0 q8_0, IQ4_NL iq4_nl,
            Q2_K q2_k, Q3_K q3_k, Q4_K q4_k, Q5_K q5_k, Q6_K q6_k, IQ4_XS iq4_xs)
    };
    (@ $format:expr, $src:expr, $dst:expr, { $($rest:tt)* }, $($f:ident $codec:ident),*) => {
        match $format {
            $(Format::$f => blocks($src, $dst, $codec),)*
            $($rest)*
        }
    };
}
use by_block_codec;

// The format table's conversions, defined beside the codecs so that `format` needs nothing
// of `quant`.
impl Format {
    /// Dequantizes whole blocks: `src` holds `dst.len() / block` blocks. The scalar reference
    /// every kernel is tested against; equal bit for bit to the `gguf` Python package's
    /// `gguf.quants.dequantize`.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) {
        dequant::dequantize(self, src, dst)
    }

    /// Quantizes whole blocks of f32 values into `dst` (see [`quantize`]). Panics for formats
    /// [`quantize::can_quantize`] refuses.
    pub fn quantize(self, src: &[f32], dst: &mut [u8]) {
        quantize::quantize(self, src, dst)
    }
}

/// Whether products with weights of `format` run as integer dot products.
pub fn has_q8_kernel(format: Format) -> bool {
    tiles::spec(format).is_some()
}

/// Bytes `w` takes as tiles, if it is in the file's layout and either its format has integer
/// kernels and its rows are whole super-blocks, or it is bf16 with inputs a multiple of 32 and
/// `bf16` asks for bf16 weights in tiles too (products on AMX, [`tiles::bf16`]).
pub fn packed_bytes(w: &WeightView, bf16: bool) -> Option<usize> {
    if w.layout != Layout::Rows {
        return None;
    }
    if w.format == Format::BF16 {
        return (bf16 && w.cols.is_multiple_of(32)).then(|| tiles::bf16::bytes(w.rows, w.cols));
    }
    let spec = tiles::spec(w.format)?;
    w.cols.is_multiple_of(spec.sb).then(|| spec.bytes(w.rows, w.cols))
}

/// Converts a weight in the file's layout to tiles into `out` (zeroed, as long as
/// [`packed_bytes`] says).
pub fn repack_into(w: &WeightView, out: &mut [u8]) {
    if w.format == Format::BF16 {
        assert_eq!(out.len(), tiles::bf16::bytes(w.rows, w.cols), "tile buffer size");
        #[cfg(target_arch = "x86_64")]
        if Level::Avx512.supported() {
            // SAFETY: AVX-512 was checked; `out` has the size of the weight's tiles (above).
            return unsafe { tiles::bf16_rows_to_tiles(w.data, w.rows, w.cols, out) };
        }
        return tiles::bf16::from_rows(w.data, w.rows, w.cols, out);
    }
    let spec = tiles::spec(w.format).expect("repacking a format without tiles");
    assert_eq!(Some(out.len()), packed_bytes(w, false), "tile buffer size");
    tiles::repack_into(spec, w.data, w.rows, w.cols, out);
}

/// Row `r` of `w` as f32 (`out` holds `w.cols` values), whatever its layout: what
/// [`Format::dequantize`] gives for the row in the file's layout, bit for bit.
pub fn row_to_f32(w: &WeightView, r: usize, out: &mut [f32]) {
    let k = w.cols;
    match w.layout {
        Layout::Rows => {
            let rb = w.row_bytes();
            w.format.dequantize(&w.data[r * rb..(r + 1) * rb], &mut out[..k]);
        }
        Layout::Tiles if w.format == Format::BF16 => tiles::bf16::row_to_f32(w.data, k, r, out),
        Layout::Tiles => {
            let spec = tiles::spec(w.format).expect("tiles of a format without a tile layout");
            let gb = spec.group_bytes(k);
            let group = &w.data[(r / ROWS) * gb..(r / ROWS + 1) * gb];
            for (j, blk) in out[..k].chunks_exact_mut(32).enumerate() {
                let up = tiles::unpack(spec, group, j, r % ROWS);
                for (i, v) in blk.iter_mut().enumerate() {
                    let g = if spec.g16 { i / 16 } else { 0 };
                    *v = up.s[g] * (up.u[i] as i32 - spec.offset) as f32 + up.m[g];
                }
            }
        }
        Layout::Transposed => {
            let es = w.format.row_bytes(1);
            for (c, v) in out[..k].iter_mut().enumerate() {
                let at = (c * w.rows + r) * es;
                w.format.dequantize(&w.data[at..at + es], std::slice::from_mut(v));
            }
        }
    }
}
