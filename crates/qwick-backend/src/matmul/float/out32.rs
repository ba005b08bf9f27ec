//! The output blocks of the AVX-512 GEMMs (f32 FMA in `avx512.rs`, `vdpbf16ps` in
//! `avx512bf16.rs`): up to 32 columns of `y` as two halves of 16 lanes, which a micro kernel
//! loads into its accumulators (or starts from zero) and stores back, masked to the block's
//! columns; and the dispatch of a micro kernel over its row count.

use std::arch::x86_64::*;

/// A micro kernel's output block: `M` rows of stride `ldc` from `c`, in the columns of the
/// two masks (columns 0–15, 16–31); `first`: the block's first pass over the inputs, which
/// starts from zero rather than from `c`.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub c: *mut f32,
    pub ldc: usize,
    pub first: bool,
    pub masks: (__mmask16, __mmask16),
}

/// The lanes of the two halves (columns 0–15, 16–31) of a block of `nr` (1 to 32) columns.
pub(super) fn masks(nr: usize) -> (__mmask16, __mmask16) {
    let m0 = if nr >= 16 { 0xffff } else { ((1u32 << nr) - 1) as __mmask16 };
    let m1 = if nr >= 32 {
        0xffff
    } else if nr > 16 {
        ((1u32 << (nr - 16)) - 1) as __mmask16
    } else {
        0
    };
    (m0, m1)
}

impl Out {
    /// The accumulators of `M` rows: zero on the first pass, else the block's values.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; unless on the first pass, the block is valid for reads
    /// of `M` rows in the columns of the masks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn load<const M: usize>(&self) -> [[__m512; 2]; M] {
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        if !self.first {
            let (m0, m1) = self.masks;
            for (i, r) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's block holds row `i`'s masked columns.
                unsafe {
                    r[0] = _mm512_maskz_loadu_ps(m0, self.c.add(i * self.ldc));
                    r[1] = _mm512_maskz_loadu_ps(m1, self.c.add(i * self.ldc + 16));
                }
            }
        }
        acc
    }

    /// Stores the accumulators of `M` rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; the block is valid for writes of `M` rows in the
    /// columns of the masks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store<const M: usize>(&self, acc: &[[__m512; 2]; M]) {
        let (m0, m1) = self.masks;
        for (i, r) in acc.iter().enumerate() {
            // SAFETY: the caller's block holds row `i`'s masked columns.
            unsafe {
                _mm512_mask_storeu_ps(self.c.add(i * self.ldc), m0, r[0]);
                _mm512_mask_storeu_ps(self.c.add(i * self.ldc + 16), m1, r[1]);
            }
        }
    }
}

/// Evaluates `$call` with the constant `$m` equal to `$mr` (1 to 12): a micro kernel
/// monomorphised for its row count.
macro_rules! by_rows {
    ($mr:expr, |$m:ident| $call:expr) => {
        by_rows!(@ $mr, $m, $call, 12 11 10 9 8 7 6 5 4 3 2)
    };
    (@ $mr:expr, $m:ident, $call:expr, $($n:literal)*) => {
        match $mr {
            $($n => {
                const $m: usize = $n;
                $call
            })*
            _ => {
                const $m: usize = 1;
                $call
            }
        }
    };
}
pub(super) use by_rows;
