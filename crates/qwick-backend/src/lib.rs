//! qwick's compute backend: the op set the Qwen3 forward pass is written in.
//!
//! Every kernel has a scalar reference (`Isa::SCALAR`) beside its AVX2 and AVX-512
//! variants; the variant is chosen once at run time from the CPU's features and can be
//! forced with `QWICK_ISA=scalar|avx2|avx512|avx512vnni|avx512bf16`. Tests compare every variant the machine
//! supports with the scalar one.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod attention;
pub mod bandwidth;
pub mod check;
pub mod format;
pub mod grad;
pub mod isa;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod weights;

pub use format::Format;
pub use isa::{Isa, Level};
pub use matmul::{matmul, matmul_batch, Bf16Mode, MatmulJob, WeightView};
pub use pool::{copied, par_rows, zeros, ThreadPool};

/// What a kernel call needs besides its operands: the instruction set to use, the thread pool
/// to split work over, whether products must be exact, and how bf16 weights are multiplied.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub isa: Isa,
    pub pool: &'a ThreadPool,
    /// Every product uses f32 activations (as the reference computes): quantized weights are
    /// dequantized instead of meeting activations quantized to 8 bits, and bf16 weights meet
    /// f32 activations whatever [`Ctx::bf16`] says.
    pub exact: bool,
    /// How products with bf16 weights run (chosen for the machine, see
    /// [`matmul::calibrate_bf16`]); `None`: as `isa` implies ([`Bf16Mode::for_isa`]).
    pub bf16: Option<Bf16Mode>,
}

impl<'a> Ctx<'a> {
    /// The fast path: integer dot products for quantized weights.
    pub fn new(isa: Isa, pool: &'a ThreadPool) -> Self {
        Ctx { isa, pool, exact: false, bf16: None }
    }

    /// How products with bf16 weights run in this context. Panics when [`Ctx::bf16`] names a
    /// mode this CPU cannot run (rather than computing something else than asked): callers
    /// check [`Bf16Mode::supported`] first.
    pub fn bf16_mode(&self) -> Bf16Mode {
        if self.exact {
            return Bf16Mode::F32;
        }
        match self.bf16 {
            Some(m) => {
                assert!(m.supported(), "bf16 products in mode {} asked for on a CPU without it", m.name());
                m
            }
            None => Bf16Mode::for_isa(self.isa),
        }
    }
}
