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
pub mod ctx;
pub mod device;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod grad;
pub mod isa;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod weights;

pub use ctx::{par_rows, Ctx};
pub use device::DeviceSpec;
pub use format::Format;
pub use isa::{Isa, Level};
pub use matmul::{matmul, matmul_batch, Bf16Mode, MatmulJob, WeightView};
pub use pool::{copied, zeros, ThreadPool};
