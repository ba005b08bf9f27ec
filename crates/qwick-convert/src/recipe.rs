//! File types (`Q4_K_M`, `Q8_0`, ...) and the weight format each tensor gets in them.
//!
//! A file type is a base format plus the choices llama.cpp's quantizer makes, so that files
//! match what users get from it: the output head (or the tied embedding) at Q6_K, `attn_v` and
//! `ffn_down` one or two steps up in some layers (the first and last eighth, and every third
//! layer between, for the `_M` types), `attn_output` up in the 2- and 3-bit types. Norms and
//! the MoE router stay f32. A tensor whose rows are not whole blocks of its format falls back
//! to a 32-value format of about the same size, else to F16. `tests/quantize/mixes.json` holds
//! llama.cpp's choices for several model shapes and every file type; a test compares.

use anyhow::{bail, Result};
use qwick_backend::Format;

/// A file type: its name, its `general.file_type` id (llama.cpp's numbering) and base format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileType {
    pub name: &'static str,
    pub id: u32,
    pub base: Format,
}

macro_rules! file_types {
    ($($name:ident $id:literal $base:ident;)*) => {
        /// Every file type qwick writes.
        pub const FILE_TYPES: &[FileType] = &[$(FileType { name: stringify!($name), id: $id, base: Format::$base },)*];
    };
}

file_types! {
    F32 0 F32;
    F16 1 F16;
    BF16 32 BF16;
    Q8_0 7 Q8_0;
    Q4_0 2 Q4_0;
    Q4_1 3 Q4_1;
    Q5_0 8 Q5_0;
    Q5_1 9 Q5_1;
    Q2_K 10 Q2_K;
    Q3_K_S 11 Q3_K;
    Q3_K_M 12 Q3_K;
    Q3_K_L 13 Q3_K;
    Q4_K_S 14 Q4_K;
    Q4_K_M 15 Q4_K;
    Q5_K_S 16 Q5_K;
    Q5_K_M 17 Q5_K;
    Q6_K 18 Q6_K;
    IQ4_NL 25 IQ4_NL;
    IQ4_XS 30 IQ4_XS;
}

impl FileType {
    /// The file type named `name` (any case); unknown names list the valid ones.
    pub fn parse(name: &str) -> Result<FileType> {
        if let Some(t) = FILE_TYPES.iter().find(|t| t.name.eq_ignore_ascii_case(name)) {
            return Ok(*t);
        }
        let valid: Vec<&str> = FILE_TYPES.iter().map(|t| t.name).collect();
        bail!("unknown quantization type {name:?}; valid types: {}", valid.join(", "))
    }

    fn is(&self, names: &[&str]) -> bool {
        names.contains(&self.name)
    }
}

/// What a weight is, as far as the recipes care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The token embedding (when the model has a separate output head).
    Embed,
    /// The output head, or the embedding when it is tied to the head.
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    /// `ffn_down`, or a layer's stacked expert `ffn_down`.
    FfnDown,
    /// Norm weights and the MoE router: never quantized.
    Float,
}

/// The model facts the recipes depend on.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub layers: usize,
    /// Query heads per key/value head.
    pub gqa: usize,
    /// Experts (0 for dense models).
    pub experts: usize,
}

/// llama.cpp's "more bits" layers: the first and last eighth, and every third layer between.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The format of a weight of `kind` in layer `layer` with rows of `cols` values.
pub fn choose(ft: &FileType, kind: Kind, layer: usize, cols: usize, s: &Shape) -> Format {
    use Format::*;
    if kind == Kind::Float {
        return F32;
    }
    let base = ft.base;
    if base.is_float() {
        return base;
    }
    let n = s.layers;
    let eight_experts = s.experts == 8;
    let f = match kind {
        Kind::Output => {
            if !cols.is_multiple_of(256) || base == Q8_0 {
                Q8_0
            } else {
                Q6_K
            }
        }
        Kind::AttnV => {
            if eight_experts {
                Q8_0
            } else if ft.is(&["Q2_K"]) {
                if s.gqa >= 4 {
                    Q4_K
                } else {
                    Q3_K
                }
            } else if ft.is(&["Q3_K_M"]) {
                if layer < 2 {
                    Q5_K
                } else {
                    Q4_K
                }
            } else if ft.is(&["Q3_K_L"]) || (ft.is(&["IQ4_NL", "IQ4_XS"]) && s.gqa >= 4) {
                Q5_K
            } else if ft.is(&["Q4_K_M", "Q5_K_M"]) && more_bits(layer, n) {
                Q6_K
            } else if ft.is(&["Q4_K_S"]) && layer < 4 {
                Q5_K
            } else {
                base
            }
        }
        Kind::AttnK if eight_experts => Q8_0,
        Kind::FfnDown => {
            if ft.is(&["Q2_K"]) {
                Q3_K
            } else if ft.is(&["Q3_K_M"]) {
                if layer < n / 16 {
                    Q5_K
                } else {
                    Q4_K
                }
            } else if ft.is(&["Q3_K_L"]) {
                Q5_K
            } else if ft.is(&["Q4_K_M", "Q5_K_M"]) && more_bits(layer, n) {
                Q6_K
            } else if ft.is(&["Q4_K_S", "IQ4_NL", "IQ4_XS"]) && layer < n / 8 {
                Q5_K
            } else {
                base
            }
        }
        Kind::AttnOutput => {
            if eight_experts {
                if ft.is(&["Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"]) {
                    Q5_K
                } else {
                    base
                }
            } else if ft.is(&["Q2_K"]) {
                Q3_K
            } else if ft.is(&["Q3_K_M"]) {
                Q4_K
            } else if ft.is(&["Q3_K_L"]) {
                Q5_K
            } else {
                base
            }
        }
        _ => base,
    };
    fallback(f, cols)
}

/// `f`, or the format that replaces it when rows of `cols` values are not whole blocks.
pub fn fallback(f: Format, cols: usize) -> Format {
    use Format::*;
    if cols.is_multiple_of(f.block()) {
        return f;
    }
    let g = match f {
        Q2_K | Q3_K => Q4_0,
        IQ4_XS => IQ4_NL,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        other => other,
    };
    if cols.is_multiple_of(g.block()) {
        g
    } else {
        F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_valid() {
        assert_eq!(FileType::parse("q4_k_m").unwrap().id, 15);
        let e = FileType::parse("Q4_K_X").unwrap_err().to_string();
        assert!(e.contains("Q4_K_M") && e.contains("IQ4_XS") && e.contains("Q4_K_X"), "{e}");
        for t in FILE_TYPES {
            assert!(qwick_backend::quant::quantize::can_quantize(t.base));
            assert_eq!(qwick_gguf::file_type_name(t.id), Some(t.name));
        }
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback(Format::Q4_K, 512), Format::Q4_K);
        assert_eq!(fallback(Format::Q4_K, 416), Format::Q5_0);
        assert_eq!(fallback(Format::Q6_K, 416), Format::Q8_0);
        assert_eq!(fallback(Format::Q3_K, 416), Format::Q4_0);
        assert_eq!(fallback(Format::IQ4_XS, 416), Format::IQ4_NL);
        assert_eq!(fallback(Format::Q4_K, 100), Format::F16);
    }
}
