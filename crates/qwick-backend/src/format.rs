//! Weight formats: how a stored weight tensor encodes its values.
//!
//! Every format is a run of blocks along a row: `block` consecutive weights stored in
//! `block_bytes` bytes. Plain floats are blocks of one (f32, f16, bf16); the GGML quantized
//! types are blocks of 32 (Q4_0 …) or super-blocks of 256 (the K and IQ types). One table,
//! [`Format::info`], describes each: geometry, GGUF type id, the scalar dequantization that is
//! the reference for every kernel, and the activation format its dot products pair with.

use std::fmt;

/// A weight format. The names follow GGML's type names.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    IQ1_M,
}

/// What activations are converted to before a dot product with a weight of some format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// f32 activations, weights widened to f32 in registers.
    F32,
    /// Blocks of 32 int8 values with an f32 scale and the sums of each half block
    /// ([`crate::matmul::int8::ActQ8`]): the integer dot products of every quantized format.
    Q8,
}

/// One row of the format table.
#[derive(Debug)]
pub struct FormatInfo {
    pub format: Format,
    /// GGML's name, e.g. `"Q4_K"`.
    pub name: &'static str,
    /// The `ggml_type` id GGUF files store.
    pub ggml_type: u32,
    /// Weights per block.
    pub block: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// The activation format dot products with this weight format use.
    pub act: ActFormat,
}

macro_rules! formats {
    ($($f:ident $name:literal $id:literal $block:literal $bytes:literal $act:ident;)*) => {
        const TABLE: &[FormatInfo] = &[
            $(FormatInfo { format: Format::$f, name: $name, ggml_type: $id, block: $block, block_bytes: $bytes, act: ActFormat::$act },)*
        ];
        impl Format {
            /// Every format, in table order.
            pub const ALL: &'static [Format] = &[$(Format::$f),*];
        }
    };
}

formats! {
    F32     "F32"      0   1   4  F32;
    F16     "F16"      1   1   2  F32;
    BF16    "BF16"    30   1   2  F32;
    Q4_0    "Q4_0"     2  32  18  Q8;
    Q4_1    "Q4_1"     3  32  20  Q8;
    Q5_0    "Q5_0"     6  32  22  Q8;
    Q5_1    "Q5_1"     7  32  24  Q8;
    Q8_0    "Q8_0"     8  32  34  Q8;
    Q2_K    "Q2_K"    10 256  84  Q8;
    Q3_K    "Q3_K"    11 256 110  Q8;
    Q4_K    "Q4_K"    12 256 144  Q8;
    Q5_K    "Q5_K"    13 256 176  Q8;
    Q6_K    "Q6_K"    14 256 210  Q8;
    IQ2_XXS "IQ2_XXS" 16 256  66  Q8;
    IQ2_XS  "IQ2_XS"  17 256  74  Q8;
    IQ3_XXS "IQ3_XXS" 18 256  98  Q8;
    IQ1_S   "IQ1_S"   19 256  50  Q8;
    IQ4_NL  "IQ4_NL"  20  32  18  Q8;
    IQ3_S   "IQ3_S"   21 256 110  Q8;
    IQ2_S   "IQ2_S"   22 256  82  Q8;
    IQ4_XS  "IQ4_XS"  23 256 136  Q8;
    IQ1_M   "IQ1_M"   29 256  56  Q8;
}

impl Format {
    /// The format's row of the table.
    pub fn info(self) -> &'static FormatInfo {
        // The table lists formats in declaration order.
        &TABLE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn block(self) -> usize {
        self.info().block
    }

    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Whether values are plain floats (blocks of one).
    pub fn is_float(self) -> bool {
        self.info().block == 1
    }

    /// Bytes of `n` consecutive weights, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let i = self.info();
        n.is_multiple_of(i.block).then(|| n / i.block * i.block_bytes)
    }

    /// Bytes of one row of `cols` weights. Panics when `cols` is not a whole number of blocks
    /// (loaders check shapes with [`Format::bytes_for`] first).
    pub fn row_bytes(self, cols: usize) -> usize {
        self.bytes_for(cols).unwrap_or_else(|| panic!("{cols} weights are not a whole number of {self} blocks"))
    }

    /// The format GGUF type id `id` stores, if qwick reads it.
    pub fn from_ggml_type(id: u32) -> Option<Format> {
        TABLE.iter().find(|i| i.ggml_type == id).map(|i| i.format)
    }

    /// The format named `name` (GGML's spelling, any case), if any.
    pub fn from_name(name: &str) -> Option<Format> {
        TABLE.iter().find(|i| i.name.eq_ignore_ascii_case(name)).map(|i| i.format)
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors(name: &str) -> Option<Format> {
        match name {
            "F32" => Some(Format::F32),
            "BF16" => Some(Format::BF16),
            "F16" => Some(Format::F16),
            _ => None,
        }
    }

    /// The safetensors dtype name of a float format.
    pub fn safetensors_name(self) -> Option<&'static str> {
        self.is_float().then(|| self.name())
    }

    /// Element `i` of a row of this format as f32 (dequantizes its whole block).
    pub fn get(self, row: &[u8], i: usize) -> f32 {
        let info = self.info();
        match self {
            Format::F32 => f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().unwrap()),
            Format::BF16 => bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
            Format::F16 => half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32(),
            _ => {
                let b = i / info.block;
                let mut out = vec![0f32; info.block];
                self.dequantize(&row[b * info.block_bytes..(b + 1) * info.block_bytes], &mut out);
                out[i % info.block]
            }
        }
    }

    /// Writes f32 values in a float format (F32, BF16 or F16; round to nearest even) into
    /// `dst` (`src.len()` elements). Panics for block formats.
    pub fn encode_floats(self, src: &[f32], dst: &mut [u8]) {
        match self {
            Format::F32 => {
                for (d, &x) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&x.to_le_bytes());
                }
            }
            Format::BF16 => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
                }
            }
            Format::F16 => {
                for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
                }
            }
            _ => panic!("{self} is not a float format"),
        }
    }

    /// A whole buffer of this format as f32 values.
    pub fn to_f32_vec(self, bytes: &[u8]) -> Vec<f32> {
        let info = self.info();
        let mut out = vec![0f32; bytes.len() / info.block_bytes * info.block];
        self.dequantize(&bytes[..out.len() / info.block * info.block_bytes], &mut out);
        out
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bytes of an f32 slice.
pub fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; the length is the slice's size and
    // the lifetime is the input's.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// The bytes of a u16 slice (bf16 values).
pub fn u16_bytes(x: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding and any byte is a valid u8; the length is the slice's size and
    // the lifetime is the input's.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even f32 → bf16 (NaN stays NaN).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_declaration_order_and_ids_are_unique() {
        for (i, f) in Format::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
            assert_eq!(f.info().format, *f);
            assert_eq!(Format::from_ggml_type(f.info().ggml_type), Some(*f));
            assert_eq!(Format::from_name(f.name()), Some(*f));
        }
        assert_eq!(Format::Q4_K.bytes_for(512), Some(288));
        assert_eq!(Format::Q4_K.bytes_for(100), None);
    }
}
