//! Run-time choice of the instruction set kernels use.

use std::fmt;

/// Instruction-set levels, ordered from least to most capable: each level's kernels need
/// what the ones before need (and detection reports a level only with all those before it).
/// A level is only a name: kernels run on an [`Isa`], which proves this CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
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
    /// `Avx512Bf16` plus Intel AMX: products with many activation rows (prefill) run on AMX
    /// tiles in bf16 (weights and activations rounded to bf16, f32 sums).
    Amx,
}

impl Level {
    /// Every level, least capable first.
    pub const ALL: [Level; 6] =
        [Level::Scalar, Level::Avx2, Level::Avx512, Level::Avx512Vnni, Level::Avx512Bf16, Level::Amx];

    /// The level of a name (`scalar`, `avx2`, `avx512`, `avx512vnni`, `avx512bf16`, `amx`).
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name().eq_ignore_ascii_case(s))
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
            Level::Avx512Bf16 => "avx512bf16",
            Level::Amx => "amx",
        }
    }

    /// Whether this CPU can run kernels of this level (and [`Isa::cap`] allows it).
    pub fn supported(self) -> bool {
        self <= Isa::cap() && self.detected()
    }

    /// Whether this CPU has what kernels of this level need.
    fn detected(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => Level::Avx512.supported() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Bf16 => Level::Avx512Vnni.supported() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Level::Amx => Level::Avx512Bf16.supported() && amx_usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A [`Level`] this CPU supports: the only way to ask kernels for a level, so safe code cannot
/// run instructions the CPU lacks. Made by detection ([`Isa::new`], [`Isa::best`],
/// [`Isa::parse`], ...); [`Isa::SCALAR`] runs everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa(Level);

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

impl Isa {
    /// The scalar reference: every CPU has it.
    pub const SCALAR: Isa = Isa(Level::Scalar);

    /// `level` where this CPU supports it.
    pub fn new(level: Level) -> Option<Isa> {
        level.supported().then_some(Isa(level))
    }

    /// The level this CPU was found to have.
    pub fn level(self) -> Level {
        self.0
    }

    /// The level named `s`, which this CPU must support: an error names what is wrong.
    pub fn parse(s: &str) -> Result<Isa, String> {
        let level = Level::parse(s)
            .ok_or_else(|| format!("{s}: expected scalar, avx2, avx512, avx512vnni, avx512bf16 or amx"))?;
        Isa::new(level).ok_or_else(|| format!("{s}: this CPU does not support {level}"))
    }

    /// This ISA, or `level` where that is less: levels are nested, so every level below a
    /// supported one is supported.
    pub fn at_most(self, level: Level) -> Isa {
        Isa(self.0.min(level))
    }

    /// The most capable level detection may report: `QWICK_MAX_ISA` (one of [`Level::parse`]'s
    /// names), so that a CPU can run the paths of a lesser one (an Intel CPU with AMX those of
    /// an AMD Zen 4, `avx512bf16`) everywhere, whatever a command or test asks for. Unset: no
    /// cap; an unknown name caps at `scalar` (and [`Isa::check_cap`] reports it).
    pub fn cap() -> Level {
        static CAP: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| match std::env::var("QWICK_MAX_ISA") {
            Ok(v) if !v.is_empty() => Level::parse(&v).unwrap_or(Level::Scalar),
            _ => Level::Amx,
        })
    }

    /// An error naming `QWICK_MAX_ISA` when it is set to no level's name.
    pub fn check_cap() -> Result<(), String> {
        match std::env::var("QWICK_MAX_ISA") {
            Ok(v) if !v.is_empty() && Level::parse(&v).is_none() => {
                Err(format!("QWICK_MAX_ISA={v}: expected scalar, avx2, avx512, avx512vnni, avx512bf16 or amx"))
            }
            _ => Ok(()),
        }
    }

    /// The fastest ISA this CPU supports.
    pub fn best() -> Isa {
        [Level::Amx, Level::Avx512Vnni, Level::Avx512, Level::Avx2]
            .into_iter()
            .find_map(Isa::new)
            .unwrap_or(Isa::SCALAR)
    }

    /// The fastest ISA whose results match the f32 reference (no bf16 rounding of activations).
    pub fn best_exact() -> Isa {
        Isa::best().at_most(Level::Avx512Vnni)
    }

    /// Whether this is one of the AVX-512 levels.
    pub fn is_avx512(self) -> bool {
        self.0 >= Level::Avx512
    }

    /// Whether matmuls with bf16 weights round activations to bf16.
    pub fn rounds_activations(self) -> bool {
        self.0 == Level::Avx512Bf16
    }

    /// Every ISA whose kernels tests compare with the scalar reference, scalar first (AMX, a
    /// bf16 product mode of its own, is tested where it is asked for by name). The first call
    /// says on stderr, outside any test's captured output, which levels this CPU cannot run
    /// (and so which kernels go untested here).
    pub fn all_supported() -> Vec<Isa> {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            let missing: Vec<&str> = Level::ALL.into_iter().filter(|l| !l.supported()).map(Level::name).collect();
            if !missing.is_empty() {
                let why = match std::env::var("QWICK_MAX_ISA") {
                    Ok(v) if !v.is_empty() => format!("this CPU (capped by QWICK_MAX_ISA={v})"),
                    _ => "this CPU".to_string(),
                };
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "qwick: {why} cannot run the {} kernels: they are not tested here",
                    missing.join(", ")
                );
            }
        });
        Level::ALL.into_iter().filter(|&l| l != Level::Amx).filter_map(Isa::new).collect()
    }

    /// The ISA to use: `QWICK_ISA` if set (an error if unknown or unsupported), else the best.
    pub fn from_env() -> Result<Isa, String> {
        Isa::check_cap()?;
        match std::env::var("QWICK_ISA") {
            Ok(v) if !v.is_empty() => Isa::parse(&v).map_err(|e| format!("QWICK_ISA={e}")),
            _ => Ok(Isa::best()),
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Whether the CPU has AMX-BF16 and the operating system lets this process use it.
fn amx_usable() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !Level::Avx512Bf16.supported() {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
            return false;
        }
        request_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // Safety: a plain system call that only changes this process's permitted state components.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}
