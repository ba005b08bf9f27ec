//! qwick's compute backend: the op set the Qwen3 forward pass is written in.
//!
//! Every kernel has a scalar reference (`Isa::Scalar`) beside its AVX2 and AVX-512
//! variants; the variant is chosen once at run time from the CPU's features and can be
//! forced with `QWICK_ISA=scalar|avx2|avx512`. Tests compare every variant the machine
//! supports with the scalar one.

pub mod alloc;
pub mod attention;
pub mod bandwidth;
pub mod dtype;
pub mod isa;
pub mod matmul;
pub mod ops;
pub mod pool;

pub use dtype::DType;
pub use isa::Isa;
pub use matmul::{matmul, matmul_batch, MatmulJob, WeightView};
pub use pool::ThreadPool;

/// What a kernel call needs besides its operands: the instruction set to use and the
/// thread pool to split work over.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub isa: Isa,
    pub pool: &'a ThreadPool,
}
