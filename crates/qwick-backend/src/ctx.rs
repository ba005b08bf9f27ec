//! The context every kernel call takes.

use crate::isa::{Isa, Level};
use crate::pool::{SendPtr, ThreadPool};
use std::ops::Range;

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
    /// [`crate::matmul::calibrate_bf16`]); `None`: as `isa` implies ([`Bf16Mode::for_isa`]).
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

/// How products with bf16 weights run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Mode {
    /// f32 activations (exact): the AVX-512 GEMV of even/odd halves, the f32 GEMM.
    F32,
    /// Activations rounded to bf16: `vdpbf16ps` dot products (AVX512-BF16), a GEMV of them
    /// for few rows (weights in tiles: below 5 rows; in rows: below 16, the even/odd GEMV).
    Dot,
    /// Activations rounded to bf16, weights in tiles multiplied in FMAs at every row count (the
    /// FMA GEMV of the tiles, 4 rows at a time against each column pair while it is in cache);
    /// for CPUs whose dot products run at less than twice their FMAs' rate (one dot product does
    /// the work of two FMAs).
    Fma,
    /// Activations rounded to bf16: AMX tiles from 16 rows, the GEMV below.
    Amx,
}

impl Bf16Mode {
    pub const ALL: [Bf16Mode; 4] = [Bf16Mode::F32, Bf16Mode::Dot, Bf16Mode::Fma, Bf16Mode::Amx];

    /// What an ISA implies: AMX on `Level::Amx`, dot products on `Level::Avx512Bf16`, else f32.
    pub fn for_isa(isa: Isa) -> Bf16Mode {
        match isa.level() {
            Level::Amx => Bf16Mode::Amx,
            Level::Avx512Bf16 => Bf16Mode::Dot,
            _ => Bf16Mode::F32,
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Bf16Mode::F32 => true,
            Bf16Mode::Dot | Bf16Mode::Fma => Level::Avx512Bf16.supported(),
            Bf16Mode::Amx => Level::Amx.supported(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Mode::F32 => "f32",
            Bf16Mode::Dot => "bf16-dot",
            Bf16Mode::Fma => "bf16-fma",
            Bf16Mode::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Bf16Mode> {
        Bf16Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// Calls `f(rows, out_rows)` over row chunks of `out` (`width` floats a row) on the context's
/// pool, in parallel when there are enough rows to be worth it.
pub fn par_rows(ctx: Ctx, n: usize, out: &mut [f32], width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let op = SendPtr::new(out);
    let run = |r: Range<usize>| {
        // SAFETY: each chunk owns its rows of `out` (chunks do not overlap) and r ⊆ 0..n.
        let o = unsafe { op.slice(r.start * width, r.len() * width) };
        f(r, o)
    };
    if n < 8 {
        run(0..n);
    } else {
        ctx.pool.for_chunks(n, 1, &run);
    }
}
