//! qwick's compute backend: the op set the Qwen3 forward pass is written in.
//!
//! Every kernel has a scalar reference (`Isa::Scalar`) beside its AVX2 and AVX-512
//! variants; the variant is chosen once at run time from the CPU's features and can be
//! forced with `QWICK_ISA=scalar|avx2|avx512|avx512vnni|avx512bf16`. Tests compare every variant the machine
//! supports with the scalar one.

pub mod alloc;
pub mod attention;
pub mod bandwidth;
pub mod format;
pub mod isa;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;

pub use format::Format;
pub use isa::Isa;
pub use matmul::{matmul, matmul_batch, MatmulJob, WeightView};
pub use pool::ThreadPool;

/// What a kernel call needs besides its operands: the instruction set to use, the thread pool
/// to split work over, and whether products with quantized weights must be exact.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub isa: Isa,
    pub pool: &'a ThreadPool,
    /// Quantized weights are dequantized and multiplied with f32 activations (as the
    /// reference computes), instead of integer dot products with activations quantized to
    /// 8 bits.
    pub exact: bool,
}

impl<'a> Ctx<'a> {
    /// The fast path: integer dot products for quantized weights.
    pub fn new(isa: Isa, pool: &'a ThreadPool) -> Self {
        Ctx { isa, pool, exact: false }
    }
}
