//! The ops training needs besides the forward ones: backward passes of RMSNorm, SwiGLU and
//! attention, causal attention over packed sequences that keeps its log-sum-exp, cross-entropy
//! with its gradient, and `Aᵀ·B` over token rows (the gradients of LoRA matrices).
//!
//! As in [`crate::ops`], each op is plain Rust over slices compiled as a scalar reference and
//! as AVX2 / AVX-512 variants; tests compare the variants with the scalar one and the
//! backward passes with finite differences of the forward ones.

use crate::ops::{exp_sel, multiversion};
use crate::Isa;

/// `Σ a[i]·b[i]` in 16 independent lanes so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::ops::dot(a, b)
}

/// `y += s · x`.
#[inline(always)]
fn axpy(s: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += s * xv;
    }
}

/// Backward of `y = w · x / rms(x)` for each `w.len()`-wide row of `x`: writes `dx` from `dy`
/// (the weight `w` is frozen, so it has no gradient here).
pub fn rms_norm_backward(isa: Isa, x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    multiversion!(
        isa,
        fn k(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
            let d = w.len();
            for ((xr, gr), or) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
                let inv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
                // dx = inv · (g∘w − x̂ · mean(g∘w∘x̂)), x̂ = x · inv.
                let mut acc = [0f32; 16];
                let chunks = d / 16;
                for c in 0..chunks {
                    for l in 0..16 {
                        let i = c * 16 + l;
                        acc[l] += gr[i] * w[i] * xr[i];
                    }
                }
                let mut s: f32 = acc.iter().sum();
                for i in chunks * 16..d {
                    s += gr[i] * w[i] * xr[i];
                }
                let c = s * inv * inv / d as f32;
                for i in 0..d {
                    or[i] = inv * (gr[i] * w[i] - xr[i] * c);
                }
                let _ = FAST;
            }
        }
    )
}

/// Backward of `a = silu(g) · u`: writes `dg` and `du` from `da`.
pub fn silu_mul_backward(isa: Isa, g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
    multiversion!(
        isa,
        fn k(g: &[f32], u: &[f32], da: &[f32], dg: &mut [f32], du: &mut [f32]) {
            for i in 0..g.len().min(u.len()).min(da.len()).min(dg.len()).min(du.len()) {
                let s = 1.0 / (1.0 + exp_sel::<FAST>(-g[i]));
                du[i] = da[i] * g[i] * s;
                dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        }
    )
}

/// The shape of one attention call over a packed batch of `n` token rows: query `i` attends to
/// the keys `start[i]..=i` (its own example, causally).
#[derive(Clone, Copy)]
pub struct AttnShape<'a> {
    pub n_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Per row, the first row of its example.
    pub start: &'a [u32],
}

/// Causal attention for the query heads of KV head `kvh`, rows `rows` of the packed batch:
/// `q` [n, n_heads·hd], `k`, `v` [n, kv_heads·hd]; writes those heads' outputs into `out`
/// ([n, n_heads·hd], only the columns of these heads and these rows) and each (row, head)'s
/// log-sum-exp of the scaled scores into `lse` ([n, n_heads]).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    isa: Isa,
    s: &AttnShape,
    kvh: usize,
    rows: std::ops::Range<usize>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    multiversion!(
        isa,
        fn kern(
            s: &AttnShape,
            kvh: usize,
            rows: std::ops::Range<usize>,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            out: &mut [f32],
            lse: &mut [f32],
        ) {
            let (hd, qw, kw) = (s.head_dim, s.n_heads * s.head_dim, s.kv_heads * s.head_dim);
            let group = s.n_heads / s.kv_heads;
            let mut p: Vec<f32> = Vec::new();
            for i in rows {
                let j0 = s.start[i] as usize;
                for h in kvh * group..(kvh + 1) * group {
                    let qi = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
                    p.clear();
                    let mut m = f32::NEG_INFINITY;
                    for j in j0..=i {
                        let x = s.scale * dot(qi, &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd]);
                        m = m.max(x);
                        p.push(x);
                    }
                    let mut l = 0f32;
                    for x in p.iter_mut() {
                        *x = exp_sel::<FAST>(*x - m);
                        l += *x;
                    }
                    let o = &mut out[i * qw + h * hd..i * qw + (h + 1) * hd];
                    o.fill(0.0);
                    for (j, &pj) in (j0..=i).zip(&p) {
                        axpy(pj / l, &v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd], o);
                    }
                    lse[i * s.n_heads + h] = m + l.ln();
                }
            }
        }
    )
}

/// Backward of [`attention_forward`] for KV head `kvh` over all `n` rows: from `dout` (and the
/// forward's `out` and `lse`) accumulates into `dq` (this KV head's query heads), `dk` and `dv`
/// (this KV head's columns). A KV head's keys are shared by its query heads and every later
/// row, so one call owns all of them.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    isa: Isa,
    s: &AttnShape,
    kvh: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    multiversion!(
        isa,
        fn kern(
            s: &AttnShape,
            kvh: usize,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            out: &[f32],
            lse: &[f32],
            dout: &[f32],
            dq: &mut [f32],
            dk: &mut [f32],
            dv: &mut [f32],
        ) {
            let (hd, qw, kw) = (s.head_dim, s.n_heads * s.head_dim, s.kv_heads * s.head_dim);
            let group = s.n_heads / s.kv_heads;
            let n = s.start.len();
            let kc = kvh * hd..(kvh + 1) * hd;
            for i in 0..n {
                let j0 = s.start[i] as usize;
                for h in kvh * group..(kvh + 1) * group {
                    let qc = i * qw + h * hd..i * qw + (h + 1) * hd;
                    let (qi, doi) = (&q[qc.clone()], &dout[qc.clone()]);
                    let di = dot(doi, &out[qc.clone()]);
                    let li = lse[i * s.n_heads + h];
                    let dqi = &mut dq[qc.clone()];
                    for j in j0..=i {
                        let (kj, vj) = (&k[j * kw + kc.start..j * kw + kc.end], &v[j * kw + kc.start..j * kw + kc.end]);
                        let p = exp_sel::<FAST>(s.scale * dot(qi, kj) - li);
                        let ds = p * (dot(doi, vj) - di) * s.scale;
                        axpy(ds, kj, dqi);
                        axpy(ds, qi, &mut dk[j * kw + kc.start..j * kw + kc.end]);
                        axpy(p, doi, &mut dv[j * kw + kc.start..j * kw + kc.end]);
                    }
                }
            }
        }
    )
}

/// Cross-entropy of each row of `logits` ([rows, vocab]) against `labels` (one per row), in
/// place: returns the sum of the rows' losses and leaves `scale · (softmax − onehot)` (the
/// gradient of `scale ·` that sum) in `logits`.
pub fn cross_entropy(isa: Isa, logits: &mut [f32], vocab: usize, labels: &[u32], scale: f32) -> f64 {
    multiversion!(
        isa,
        fn k(logits: &mut [f32], vocab: usize, labels: &[u32], scale: f32) -> f64 {
            let mut total = 0f64;
            for (row, &y) in logits.chunks_exact_mut(vocab).zip(labels) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut acc = [0f32; 16];
                let chunks = vocab / 16;
                for c in 0..chunks {
                    for l in 0..16 {
                        acc[l] += exp_sel::<FAST>(row[c * 16 + l] - m);
                    }
                }
                let mut sum: f32 = acc.iter().sum();
                for x in &row[chunks * 16..] {
                    sum += exp_sel::<FAST>(*x - m);
                }
                let lse = m + sum.ln();
                total += (lse - row[y as usize]) as f64;
                for x in row.iter_mut() {
                    *x = exp_sel::<FAST>(*x - lse) * scale;
                }
                row[y as usize] -= scale;
            }
            total
        }
    )
}

/// `c[ni, nj] += Σ_t a[t, i] · b[t, j]` over `t` rows of `a` ([t, ni]) and `b` ([t, nj]), for the
/// output rows `rows` of `c` (`c` holds just those rows).
pub fn matmul_tn(isa: Isa, a: &[f32], ni: usize, b: &[f32], nj: usize, rows: std::ops::Range<usize>, c: &mut [f32]) {
    multiversion!(
        isa,
        fn k(a: &[f32], ni: usize, b: &[f32], nj: usize, rows: std::ops::Range<usize>, c: &mut [f32]) {
            let t = a.len() / ni;
            for r in 0..t {
                let (ar, br) = (&a[r * ni..(r + 1) * ni], &b[r * nj..(r + 1) * nj]);
                for (o, i) in rows.clone().enumerate() {
                    let s = ar[i];
                    if s != 0.0 {
                        axpy(s, br, &mut c[o * nj..(o + 1) * nj]);
                    }
                }
            }
            let _ = FAST;
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::rand_vec;
    use crate::ops;

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Central differences of `f` at `x` in the direction of each coordinate.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f32> {
        let mut g = vec![0f32; x.len()];
        let mut xp = x.to_vec();
        for i in 0..x.len() {
            let h = 1e-2f32.max(x[i].abs() * 1e-2);
            xp[i] = x[i] + h;
            let a = f(&xp);
            xp[i] = x[i] - h;
            let b = f(&xp);
            xp[i] = x[i];
            g[i] = ((a - b) / (2.0 * h as f64)) as f32;
        }
        g
    }

    /// `Σ r·y`: a scalar whose gradient with respect to `y` is `r`.
    fn project(y: &[f32], r: &[f32]) -> f64 {
        y.iter().zip(r).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    }

    #[test]
    fn rms_norm_backward_is_the_gradient() {
        for d in [7usize, 24, 33, 128] {
            let x = rand_vec(2 * d, d as u64);
            let w = rand_vec(d, 3);
            let r = rand_vec(2 * d, 4);
            let f = |x: &[f32]| {
                let mut y = vec![0f32; x.len()];
                ops::rms_norm(Isa::Scalar, x, &w, 1e-6, &mut y);
                project(&y, &r)
            };
            let want = numeric_grad(&x, f);
            let mut got = vec![0f32; 2 * d];
            rms_norm_backward(Isa::Scalar, &x, &w, 1e-6, &r, &mut got);
            close(&got, &want, 2e-3, "rms_norm_backward");
            for isa in Isa::all_supported() {
                let mut v = vec![0f32; 2 * d];
                rms_norm_backward(isa, &x, &w, 1e-6, &r, &mut v);
                close(&v, &got, 1e-5, "rms_norm_backward variant");
            }
        }
    }

    #[test]
    fn silu_mul_backward_is_the_gradient() {
        let n = 37;
        let g: Vec<f32> = rand_vec(n, 1).iter().map(|v| v * 4.0).collect();
        let u = rand_vec(n, 2);
        let da = rand_vec(n, 3);
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        silu_mul_backward(Isa::Scalar, &g, &u, &da, &mut dg, &mut du);
        let fg = |x: &[f32]| {
            let mut a = x.to_vec();
            ops::silu_mul(Isa::Scalar, &mut a, &u);
            project(&a, &da)
        };
        close(&dg, &numeric_grad(&g, fg), 2e-3, "dg");
        let fu = |x: &[f32]| {
            let mut a = g.clone();
            ops::silu_mul(Isa::Scalar, &mut a, x);
            project(&a, &da)
        };
        close(&du, &numeric_grad(&u, fu), 2e-3, "du");
        for isa in Isa::all_supported() {
            let (mut g2, mut u2) = (vec![0f32; n], vec![0f32; n]);
            silu_mul_backward(isa, &g, &u, &da, &mut g2, &mut u2);
            close(&g2, &dg, 1e-5, "dg variant");
            close(&u2, &du, 1e-5, "du variant");
        }
    }

    /// Two examples packed in one batch (lengths 5 and 4), 4 query heads over 2 KV heads.
    struct Case {
        start: Vec<u32>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        hd: usize,
    }

    fn case(hd: usize) -> Case {
        let start: Vec<u32> = vec![0, 0, 0, 0, 0, 5, 5, 5, 5];
        let n = start.len();
        Case { start, q: rand_vec(n * 4 * hd, 11), k: rand_vec(n * 2 * hd, 12), v: rand_vec(n * 2 * hd, 13), hd }
    }

    fn forward(isa: Isa, c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let s = AttnShape { n_heads: 4, kv_heads: 2, head_dim: c.hd, scale: 0.7, start: &c.start };
        let n = c.start.len();
        let mut out = vec![0f32; n * 4 * c.hd];
        let mut lse = vec![0f32; n * 4];
        for kvh in 0..2 {
            attention_forward(isa, &s, kvh, 0..n, q, k, v, &mut out, &mut lse);
        }
        (out, lse)
    }

    #[test]
    fn attention_matches_a_direct_softmax_and_its_gradient() {
        for hd in [6usize, 24, 32] {
            let c = case(hd);
            let n = c.start.len();
            let (out, lse) = forward(Isa::Scalar, &c, &c.q, &c.k, &c.v);
            // Direct: per row and head, softmax over the row's example up to itself.
            for i in 0..n {
                for h in 0..4 {
                    let kvh = h / 2;
                    let qi = &c.q[i * 4 * hd + h * hd..][..hd];
                    let js: Vec<usize> = (c.start[i] as usize..=i).collect();
                    let sc: Vec<f32> =
                        js.iter().map(|&j| 0.7 * ops::dot(qi, &c.k[j * 2 * hd + kvh * hd..][..hd])).collect();
                    let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = sc.iter().map(|x| (x - m).exp()).sum();
                    assert!((lse[i * 4 + h] - (m + z.ln())).abs() < 1e-5);
                    for d in 0..hd {
                        let o: f32 = js
                            .iter()
                            .zip(&sc)
                            .map(|(&j, x)| (x - m).exp() / z * c.v[j * 2 * hd + kvh * hd + d])
                            .sum();
                        assert!((out[i * 4 * hd + h * hd + d] - o).abs() < 1e-5);
                    }
                }
            }
            let r = rand_vec(out.len(), 14);
            let mut dq = vec![0f32; c.q.len()];
            let mut dk = vec![0f32; c.k.len()];
            let mut dv = vec![0f32; c.v.len()];
            let s = AttnShape { n_heads: 4, kv_heads: 2, head_dim: hd, scale: 0.7, start: &c.start };
            for kvh in 0..2 {
                attention_backward(Isa::Scalar, &s, kvh, &c.q, &c.k, &c.v, &out, &lse, &r, &mut dq, &mut dk, &mut dv);
            }
            let fq = |x: &[f32]| project(&forward(Isa::Scalar, &c, x, &c.k, &c.v).0, &r);
            let fk = |x: &[f32]| project(&forward(Isa::Scalar, &c, &c.q, x, &c.v).0, &r);
            let fv = |x: &[f32]| project(&forward(Isa::Scalar, &c, &c.q, &c.k, x).0, &r);
            close(&dq, &numeric_grad(&c.q, fq), 3e-3, "dq");
            close(&dk, &numeric_grad(&c.k, fk), 3e-3, "dk");
            close(&dv, &numeric_grad(&c.v, fv), 3e-3, "dv");
            for isa in Isa::all_supported() {
                let (o2, l2) = forward(isa, &c, &c.q, &c.k, &c.v);
                close(&o2, &out, 1e-5, "attention variant");
                close(&l2, &lse, 1e-5, "lse variant");
                let (mut q2, mut k2, mut v2) = (vec![0f32; dq.len()], vec![0f32; dk.len()], vec![0f32; dv.len()]);
                for kvh in 0..2 {
                    attention_backward(isa, &s, kvh, &c.q, &c.k, &c.v, &out, &lse, &r, &mut q2, &mut k2, &mut v2);
                }
                close(&q2, &dq, 1e-4, "dq variant");
                close(&k2, &dk, 1e-4, "dk variant");
                close(&v2, &dv, 1e-4, "dv variant");
            }
        }
    }

    #[test]
    fn cross_entropy_and_its_gradient() {
        let vocab = 37;
        let x: Vec<f32> = rand_vec(3 * vocab, 21).iter().map(|v| v * 5.0).collect();
        let labels = [3u32, 0, 36];
        let loss = |x: &[f32]| {
            let mut t = 0f64;
            for (row, &y) in x.chunks(vocab).zip(&labels) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                t += m + z.ln() - row[y as usize] as f64;
            }
            t * 0.5
        };
        let mut g = x.clone();
        let got = cross_entropy(Isa::Scalar, &mut g, vocab, &labels, 0.5);
        assert!((got * 0.5 - loss(&x)).abs() < 1e-4, "{got} vs {}", loss(&x));
        close(&g, &numeric_grad(&x, loss), 2e-3, "cross-entropy gradient");
        for isa in Isa::all_supported() {
            let mut g2 = x.clone();
            let l2 = cross_entropy(isa, &mut g2, vocab, &labels, 0.5);
            assert!((l2 - got).abs() < 1e-4);
            close(&g2, &g, 1e-5, "cross-entropy variant");
        }
    }

    #[test]
    fn matmul_tn_sums_outer_products() {
        let (t, ni, nj) = (9, 5, 19);
        let a = rand_vec(t * ni, 31);
        let b = rand_vec(t * nj, 32);
        let mut want = vec![0f32; ni * nj];
        for i in 0..ni {
            for j in 0..nj {
                want[i * nj + j] = (0..t).map(|r| a[r * ni + i] * b[r * nj + j]).sum();
            }
        }
        for isa in Isa::all_supported() {
            let mut c = vec![0f32; ni * nj];
            matmul_tn(isa, &a, ni, &b, nj, 0..ni, &mut c);
            close(&c, &want, 1e-5, "matmul_tn");
            let mut part = vec![0f32; 2 * nj];
            matmul_tn(isa, &a, ni, &b, nj, 2..4, &mut part);
            close(&part, &want[2 * nj..4 * nj], 1e-5, "matmul_tn rows");
        }
    }
}
