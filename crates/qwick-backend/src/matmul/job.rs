//! What every kernel shares: the call ([`Job`]), the row counts at which the paths change,
//! and the GEMV kernels' blocking.

use crate::weights::WeightView;

/// Rows of `x` at or above which the tiled GEMM path is used.
pub const GEMM_MIN_ROWS: usize = 48;

/// Rows of `x` at or above which products with quantized weights run on AMX tiles
/// (`Level::Amx`).
pub const AMX_MIN_ROWS: usize = 32;

/// Rows of `x` at or above which products with bf16 weights in tiles ([`Layout::Tiles`]) run on
/// AMX or in bf16 dot products; fewer take a GEMV of the tiles with FMAs (decode is bound by
/// reading the weights).
pub const TILES_MIN_ROWS: usize = 5;

/// Rows of `x` at or above which products with bf16 weights run on AMX tiles or bf16 dot
/// products ([`Bf16Mode`] other than f32); fewer rows take the GEMV, activations rounded to
/// bf16 alike.
pub const BF16_MIN_ROWS: usize = 16;

/// One kernel call: `m` rows of activations `x` (in the form the kernel reads, rows `ldx`
/// values apart where the form has rows) times the weight `w`, written to columns `cols` of
/// `m` rows of `y` (`ldy` floats apart).
#[derive(Clone)]
pub(crate) struct Job<'a, X> {
    pub x: X,
    pub ldx: usize,
    pub m: usize,
    pub w: &'a WeightView<'a>,
    pub y: *mut f32,
    pub ldy: usize,
    pub cols: std::ops::Range<usize>,
}

impl<'a, X> Job<'a, X> {
    /// The same product with the activations in another form (`ldx` apart).
    pub fn with<Z>(&self, x: Z, ldx: usize) -> Job<'a, Z> {
        Job { x, ldx, m: self.m, w: self.w, y: self.y, ldy: self.ldy, cols: self.cols.clone() }
    }
}

/// The GEMV kernels' blocking: up to 4 rows of x meet 4 weight rows at a time (1 at the
/// ragged end); more rows of x go 8 at a time against `wide_rows` weight rows, so each weight
/// vector is loaded once for 8 rows. Calls `f(n, nr, i, mr)` for weight rows `n..n + nr` and
/// rows of x `i..i + mr`.
#[inline(always)]
#[cfg(target_arch = "x86_64")]
pub(crate) fn gemv_blocks(
    m: usize,
    cols: std::ops::Range<usize>,
    wide_rows: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let wide = m > 4;
    let mut n = cols.start;
    while n < cols.end {
        let nr = if wide {
            (cols.end - n).min(wide_rows)
        } else if cols.end - n >= 4 {
            4
        } else {
            1
        };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(if wide { 8 } else { 4 });
            f(n, nr, i, mr);
            i += mr;
        }
        n += nr;
    }
}

/// Calls a GEMV block kernel monomorphised for `nr` weight rows (4, 3, 2 or 1) and `mr`
/// activation rows (1..=8).
#[cfg(target_arch = "x86_64")]
macro_rules! gemv_dispatch {
    ($nr:expr, $mr:expr, |$r:ident, $m:ident| $call:expr) => {
        match ($nr, $mr) {
            (4, 1) => gemv_dispatch!(@ 4, 1, $r, $m, $call),
            (4, 2) => gemv_dispatch!(@ 4, 2, $r, $m, $call),
            (4, 3) => gemv_dispatch!(@ 4, 3, $r, $m, $call),
            (4, _) => gemv_dispatch!(@ 4, 4, $r, $m, $call),
            (3, 1) => gemv_dispatch!(@ 3, 1, $r, $m, $call),
            (3, 2) => gemv_dispatch!(@ 3, 2, $r, $m, $call),
            (3, 3) => gemv_dispatch!(@ 3, 3, $r, $m, $call),
            (3, 4) => gemv_dispatch!(@ 3, 4, $r, $m, $call),
            (3, 5) => gemv_dispatch!(@ 3, 5, $r, $m, $call),
            (3, 6) => gemv_dispatch!(@ 3, 6, $r, $m, $call),
            (3, 7) => gemv_dispatch!(@ 3, 7, $r, $m, $call),
            (3, _) => gemv_dispatch!(@ 3, 8, $r, $m, $call),
            (2, 1) => gemv_dispatch!(@ 2, 1, $r, $m, $call),
            (2, 2) => gemv_dispatch!(@ 2, 2, $r, $m, $call),
            (2, 3) => gemv_dispatch!(@ 2, 3, $r, $m, $call),
            (2, 4) => gemv_dispatch!(@ 2, 4, $r, $m, $call),
            (2, 5) => gemv_dispatch!(@ 2, 5, $r, $m, $call),
            (2, 6) => gemv_dispatch!(@ 2, 6, $r, $m, $call),
            (2, 7) => gemv_dispatch!(@ 2, 7, $r, $m, $call),
            (2, _) => gemv_dispatch!(@ 2, 8, $r, $m, $call),
            (_, 1) => gemv_dispatch!(@ 1, 1, $r, $m, $call),
            (_, 2) => gemv_dispatch!(@ 1, 2, $r, $m, $call),
            (_, 3) => gemv_dispatch!(@ 1, 3, $r, $m, $call),
            (_, 4) => gemv_dispatch!(@ 1, 4, $r, $m, $call),
            (_, 5) => gemv_dispatch!(@ 1, 5, $r, $m, $call),
            (_, 6) => gemv_dispatch!(@ 1, 6, $r, $m, $call),
            (_, 7) => gemv_dispatch!(@ 1, 7, $r, $m, $call),
            (_, _) => gemv_dispatch!(@ 1, 8, $r, $m, $call),
        }
    };
    (@ $nv:literal, $mv:literal, $r:ident, $m:ident, $call:expr) => {{
        const $r: usize = $nv;
        const $m: usize = $mv;
        $call
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use gemv_dispatch;
