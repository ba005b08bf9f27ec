//! Products with float weights (f32, bf16, f16), one file per instruction set.

/// Element types by number: 0 = f32, 1 = bf16, 2 = f16.
pub const F32: u8 = 0;
pub const BF16: u8 = 1;

pub mod avx2;
pub mod avx512;
pub mod avx512bf16;
#[cfg(target_arch = "x86_64")]
mod out32;

/// Zeros columns `nr..width` of the first `depth` rows of a packed panel (`width` values a
/// row): the columns a ragged block lacks.
#[cfg(target_arch = "x86_64")]
fn zero_columns<T: Copy + Default>(panel: &mut [T], width: usize, nr: usize, depth: usize) {
    for row in panel[..depth * width].chunks_exact_mut(width) {
        row[nr..].fill(T::default());
    }
}
