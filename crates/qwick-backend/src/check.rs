//! Comparisons of computed values with reference values, for tests: every one fails on NaN
//! or infinity (a fold with `f32::max` drops NaN, so all-NaN output would pass) and names the
//! worst element.

use std::fmt;

/// The worst element of a comparison.
#[derive(Clone, Copy, Debug)]
pub struct Worst {
    /// Its error (infinite where either value is not finite).
    pub err: f32,
    pub index: usize,
    pub got: f32,
    pub want: f32,
}

impl fmt::Display for Worst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {} ({} vs {})", self.err, self.index, self.got, self.want)
    }
}

/// The element of `got` furthest from `want` by `err(got, want)`; a value that is not finite
/// on either side counts as an infinite error. Panics when the lengths differ.
pub fn worst_by(got: &[f32], want: &[f32], err: impl Fn(f32, f32) -> f32) -> Worst {
    assert_eq!(got.len(), want.len(), "compared slices differ in length");
    let mut worst = Worst {
        err: 0.0,
        index: 0,
        got: got.first().copied().unwrap_or(0.0),
        want: want.first().copied().unwrap_or(0.0),
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if g.is_finite() && w.is_finite() { err(g, w) } else { f32::INFINITY };
        // An `err` that returns NaN counts as infinite too.
        if e.is_nan() || e > worst.err {
            worst = Worst { err: if e.is_nan() { f32::INFINITY } else { e }, index: i, got: g, want: w };
        }
    }
    worst
}

/// The largest `|v|`: infinite where a value is not finite.
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { f32::INFINITY })
}

/// The largest `|got − want|`.
pub fn worst_abs(got: &[f32], want: &[f32]) -> Worst {
    worst_by(got, want, |g, w| (g - w).abs())
}

/// The largest `|got − want| / (1 + |want|)`: absolute near zero, relative for large values.
pub fn worst_rel(got: &[f32], want: &[f32]) -> Worst {
    worst_by(got, want, |g, w| (g - w).abs() / (1.0 + w.abs()))
}

/// Asserts `|got − want| ≤ tol` everywhere (and that both are finite), naming the worst element.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let w = worst_abs(got, want);
    assert!(w.err <= tol, "{what}: error {w} above {tol}");
}

/// Asserts `|got − want| ≤ tol · (1 + |want|)` everywhere (and that both are finite), naming
/// the worst element.
#[track_caller]
pub fn assert_close_rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let w = worst_rel(got, want);
    assert!(w.err <= tol, "{what}: relative error {w} above {tol}");
}

/// `n` values in [-1, 1) from a xorshift generator seeded by `seed`: test inputs that are the
/// same on every machine.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_the_worst() {
        let want = [1.0, 2.0, 3.0];
        assert_eq!(worst_abs(&[1.0, 2.5, 3.0], &want).index, 1);
        assert_eq!(max_abs(&[1.0, -4.0, 3.0]), 4.0);
        assert_eq!(max_abs(&[1.0, f32::NAN, 3.0]), f32::INFINITY);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let w = worst_abs(&[1.0, 2.5, bad], &want);
            assert_eq!((w.index, w.err), (2, f32::INFINITY), "{bad}");
            let w = worst_rel(&want, &[bad, 2.0, 3.0]);
            assert_eq!((w.index, w.err), (0, f32::INFINITY), "{bad}");
        }
        assert!(std::panic::catch_unwind(|| assert_close("nan", &[f32::NAN; 3], &want, 1e9)).is_err());
        assert!(std::panic::catch_unwind(|| assert_close_rel("nan", &[f32::NAN; 3], &want, 1e9)).is_err());
        assert_close("close", &[1.0, 2.0, 3.5], &want, 0.5);
        assert_close_rel("close", &[1.0, 2.0, 3.5], &want, 0.125);
    }
}
