//! Run-time choice of the instruction set kernels use.

use std::fmt;

/// Ordered from least to most capable: each variant's kernels need what the ones before need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops: the reference every other variant is tested against.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ, exact: bf16 weights are widened to f32 in registers.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`) for the integer dot products of quantized weights.
    /// Everything else as `Avx512`.
    Avx512Vnni,
    /// AVX-512 with AVX512-BF16 dot products: for bf16 weights, activations are rounded to
    /// bf16 before each matmul (as bf16 inference does) and multiplied with `vdpbf16ps`,
    /// twice the multiply-adds per instruction. Everything else as `Avx512`.
    Avx512Bf16,
    /// `Avx512Vnni` plus Intel AMX: products of quantized weights with many activation rows
    /// (prefill) run on AMX tiles in bf16 (weights and activations rounded to bf16, f32 sums).
    Amx,
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        })
    }
}

impl Isa {
    pub fn parse(s: &str) -> Option<Isa> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512vnni" => Some(Isa::Avx512Vnni),
            "avx512bf16" => Some(Isa::Avx512Bf16),
            "amx" => Some(Isa::Amx),
            _ => None,
        }
    }

    /// The most capable ISA detection may report: `QWICK_MAX_ISA` (one of [`Isa::parse`]'s
    /// names), so that a CPU can run the paths of a lesser one (an Intel CPU with AMX those of
    /// an AMD Zen 4, `avx512bf16`) everywhere, whatever a command or test asks for. Unset: no
    /// cap; an unknown name caps at `scalar` (and [`Isa::check_cap`] reports it).
    pub fn cap() -> Isa {
        static CAP: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| match std::env::var("QWICK_MAX_ISA") {
            Ok(v) if !v.is_empty() => Isa::parse(&v).unwrap_or(Isa::Scalar),
            _ => Isa::Amx,
        })
    }

    /// An error naming `QWICK_MAX_ISA` when it is set to no ISA's name.
    pub fn check_cap() -> Result<(), String> {
        match std::env::var("QWICK_MAX_ISA") {
            Ok(v) if !v.is_empty() && Isa::parse(&v).is_none() => {
                Err(format!("QWICK_MAX_ISA={v}: expected scalar, avx2, avx512, avx512vnni, avx512bf16 or amx"))
            }
            _ => Ok(()),
        }
    }

    /// Whether this CPU can run kernels of this ISA (and [`Isa::cap`] allows it).
    pub fn supported(self) -> bool {
        self <= Isa::cap() && self.detected()
    }

    /// Whether this CPU has what kernels of this ISA need.
    fn detected(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.supported() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512Vnni.supported() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => crate::quant::amx::usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest ISA this CPU supports.
    pub fn best() -> Isa {
        [Isa::Amx, Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported()).unwrap_or(Isa::Scalar)
    }

    /// The fastest ISA whose results match the f32 reference (no bf16 rounding of activations).
    pub fn best_exact() -> Isa {
        match Isa::best() {
            Isa::Avx512Bf16 | Isa::Amx => Isa::Avx512Vnni,
            i => i,
        }
    }

    /// Whether this is one of the AVX-512 variants.
    pub fn is_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 | Isa::Amx)
    }

    /// Whether matmuls with bf16 weights round activations to bf16.
    pub fn rounds_activations(self) -> bool {
        self == Isa::Avx512Bf16
    }

    /// All ISAs this CPU supports, scalar first.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Avx512Bf16]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// The ISA to use: `QWICK_ISA` if set (an error if unknown or unsupported), else the best.
    pub fn from_env() -> Result<Isa, String> {
        Isa::check_cap()?;
        match std::env::var("QWICK_ISA") {
            Ok(v) if !v.is_empty() => {
                let isa = Isa::parse(&v).ok_or_else(|| {
                    format!("QWICK_ISA={v}: expected scalar, avx2, avx512, avx512vnni, avx512bf16 or amx")
                })?;
                if !isa.supported() {
                    return Err(format!("QWICK_ISA={v}: this CPU does not support {isa}"));
                }
                Ok(isa)
            }
            _ => Ok(Isa::best()),
        }
    }
}
