//! The ops training needs besides the forward ones: backward passes of RMSNorm, SwiGLU and
//! attention, causal attention over packed sequences that keeps its log-sum-exp, cross-entropy
//! with its gradient, and `Aᵀ·B` over token rows (the gradients of LoRA matrices).
//!
//! As in [`crate::ops`], each op is plain Rust over slices compiled as a scalar reference and
//! as AVX2 / AVX-512 variants; tests compare the variants with the scalar one and the
//! backward passes with finite differences of the forward ones.

use crate::ctx::Ctx;
use crate::isa::Isa;
use crate::matmul::matmul;
use crate::ops::{exp_sel, multiversion};
use crate::pool::SendPtr;
use crate::weights::WeightView;

/// `Σ a[i]·b[i]` in 16 independent lanes so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::ops::dot(a, b)
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
                    let r = c * 16..(c + 1) * 16;
                    for (a, ((g, wv), xv)) in acc.iter_mut().zip(gr[r.clone()].iter().zip(&w[r.clone()]).zip(&xr[r])) {
                        *a += g * wv * xv;
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

/// Rows of queries one attention product covers.
const ATTN_ROWS: usize = 128;

/// The keys row block `r0..r1` needs: from the first row's example start to `r1`.
fn key_range(s: &AttnShape, r0: usize, r1: usize) -> std::ops::Range<usize> {
    s.start[r0] as usize..r1
}

/// Copies columns `c..c + w` of rows `rows` of `x` (row width `width`) into a dense matrix.
fn gather(x: &[f32], width: usize, rows: std::ops::Range<usize>, c: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * w);
    for r in rows {
        out.extend_from_slice(&x[r * width + c..r * width + c + w]);
    }
    out
}

/// `x` ([rows, cols]) transposed, in 16 × 16 tiles so reads and writes stay in cache lines.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    transpose_padded(x, rows, cols, rows)
}

/// `x` ([rows, cols]) transposed into rows of `stride ≥ rows` (zeros after the first `rows`).
fn transpose_padded(x: &[f32], rows: usize, cols: usize, stride: usize) -> Vec<f32> {
    let mut t = vec![0f32; stride * cols];
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..cols).step_by(16) {
            for r in r0..(r0 + 16).min(rows) {
                for c in c0..(c0 + 16).min(cols) {
                    t[c * stride + r] = x[r * cols + c];
                }
            }
        }
    }
    t
}

/// Rows `rows`, columns `c..c + w` of `x` (row width `width`), then zero rows up to `padded`
/// rows, as a product weight: in bf16 when `ctx`'s products round activations to bf16 (AMX
/// tiles, bf16 dot products: as bf16 training computes attention), else in f32.
struct Operand {
    data: OperandData,
    rows: usize,
    cols: usize,
}

enum OperandData {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

impl Operand {
    fn new(
        ctx: Ctx,
        x: &[f32],
        width: usize,
        rows: std::ops::Range<usize>,
        c: usize,
        w: usize,
        padded: usize,
    ) -> Operand {
        let src = rows.map(|r| &x[r * width + c..r * width + c + w]);
        let data = if ctx.bf16_mode() == crate::matmul::Bf16Mode::F32 {
            let mut d = vec![0f32; padded * w];
            for (dst, row) in d.chunks_exact_mut(w).zip(src) {
                dst.copy_from_slice(row);
            }
            OperandData::F32(d)
        } else {
            let mut d = vec![0u16; padded * w];
            for (dst, row) in d.chunks_exact_mut(w).zip(src) {
                crate::ops::to_bf16(ctx.isa, row, dst);
            }
            OperandData::Bf16(d)
        };
        Operand { data, rows: padded, cols: w }
    }

    fn bytes(&self) -> (crate::format::Format, &[u8]) {
        match &self.data {
            OperandData::Bf16(d) => (crate::format::Format::BF16, crate::format::u16_bytes(d)),
            OperandData::F32(d) => (crate::format::Format::F32, crate::format::f32_bytes(d)),
        }
    }

    /// As the weight of `y = x · selfᵀ`.
    fn rows(&self) -> WeightView<'_> {
        let (f, b) = self.bytes();
        WeightView::new(f, b, self.rows, self.cols)
    }

    /// As the weight of `y = x · self`.
    fn cols(&self) -> WeightView<'_> {
        let (f, b) = self.bytes();
        WeightView::transposed(f, b, self.cols, self.rows)
    }
}

/// `y[m, w.rows] = x[m, w.cols] · wᵀ`.
fn mm(ctx: Ctx, x: &[f32], m: usize, w: &WeightView) -> Vec<f32> {
    let mut y = vec![0f32; m * w.rows];
    matmul(ctx, x, m, w, &mut y);
    y
}

/// Scores of row block `r0..r1` of head `h` against keys `keys`, turned into probabilities in
/// place: `p[i, j] = exp(scale · q_i·k_j − lse_i)` inside the row's causal range of its
/// example, 0 outside. The log-sum-exp comes from `lse` (backward: the stored one) or is
/// computed into `lse_out` (forward, one value per row of the block).
#[allow(clippy::too_many_arguments)]
fn probabilities(
    isa: Isa,
    s: &AttnShape,
    scores: &mut [f32],
    width: usize,
    r0: usize,
    keys: &std::ops::Range<usize>,
    h: usize,
    lse: Option<&[f32]>,
    mut lse_out: Option<&mut [f32]>,
) {
    for (i, row) in scores.chunks_exact_mut(width).enumerate() {
        let valid = s.start[r0 + i] as usize - keys.start..r0 + i + 1 - keys.start;
        let l = match lse {
            Some(lse) => lse[(r0 + i) * s.n_heads + h],
            None => log_sum_exp(isa, &row[valid.clone()], s.scale),
        };
        if let Some(o) = lse_out.as_deref_mut() {
            o[i] = l;
        }
        scale_exp(isa, row, valid, s.scale, l);
    }
}

/// `ln Σ exp(scale · x[j])`, max-subtracted.
fn log_sum_exp(isa: Isa, x: &[f32], scale: f32) -> f32 {
    multiversion!(
        isa,
        fn k(x: &[f32], scale: f32) -> f32 {
            let chunks = x.chunks_exact(16);
            let rest = chunks.remainder();
            let mut mx = [f32::NEG_INFINITY; 16];
            for ch in chunks.clone() {
                for (m, v) in mx.iter_mut().zip(ch) {
                    *m = m.max(v * scale);
                }
            }
            let m = rest.iter().fold(mx.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, v| m.max(v * scale));
            let mut acc = [0f32; 16];
            for ch in chunks {
                for (a, v) in acc.iter_mut().zip(ch) {
                    *a += exp_sel::<FAST>(v * scale - m);
                }
            }
            let z = acc.iter().sum::<f32>() + rest.iter().map(|v| exp_sel::<FAST>(v * scale - m)).sum::<f32>();
            m + z.ln()
        }
    )
}

/// `row[j] = exp(scale · row[j] − l)` for `j` in `valid`, 0 elsewhere.
fn scale_exp(isa: Isa, row: &mut [f32], valid: std::ops::Range<usize>, scale: f32, l: f32) {
    multiversion!(
        isa,
        fn k(row: &mut [f32], valid: std::ops::Range<usize>, scale: f32, l: f32) {
            row[..valid.start].fill(0.0);
            for v in &mut row[valid.clone()] {
                *v = exp_sel::<FAST>(*v * scale - l);
            }
            row[valid.end..].fill(0.0);
        }
    )
}

/// Runs `f(ctx, item)` for items `0..n` spread over the pool's threads, each item on one
/// thread with a single-thread context (products inside an item run on that thread).
fn per_item(ctx: Ctx, n: usize, f: &(dyn Fn(Ctx, usize) + Sync)) {
    ctx.pool.for_chunks(n, 1, &|r| {
        let one = crate::pool::ThreadPool::inline();
        let c = Ctx { pool: &one, ..ctx };
        for i in r {
            f(c, i);
        }
    });
}

/// Causal attention over a packed batch (`q` [n, n_heads·hd], `k`, `v` [n, kv_heads·hd]), each
/// row attending to the rows `start[i]..=i`: writes `out` ([n, n_heads·hd]) and each (row,
/// head)'s log-sum-exp of the scaled scores into `lse` ([n, n_heads]). Blocks of query rows
/// run as matrix products (`Q·Kᵀ`, then `P·V`) over the keys the block can see; (KV head,
/// block) pairs are spread over the threads.
pub fn attention_forward(ctx: Ctx, s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]) {
    let (hd, n) = (s.head_dim, s.start.len());
    let (qw, kw, group) = (s.n_heads * hd, s.kv_heads * hd, s.n_heads / s.kv_heads);
    let blocks = n.div_ceil(ATTN_ROWS);
    let (op, lp) = (SendPtr::new(out), SendPtr::new(lse));
    per_item(ctx, s.kv_heads * blocks, &|ctx, item| {
        let (g, b) = (item / blocks, item % blocks);
        let (r0, r1) = (b * ATTN_ROWS, ((b + 1) * ATTN_ROWS).min(n));
        let keys = key_range(s, r0, r1);
        let (m, nkp) = (r1 - r0, keys.len().next_multiple_of(32));
        let kb = Operand::new(ctx, k, kw, keys.clone(), g * hd, hd, nkp);
        let vb = Operand::new(ctx, v, kw, keys.clone(), g * hd, hd, nkp);
        for h in g * group..(g + 1) * group {
            let qb = gather(q, qw, r0..r1, h * hd, hd);
            let mut p = mm(ctx, &qb, m, &kb.rows());
            let mut l = vec![0f32; m];
            probabilities(ctx.isa, s, &mut p, nkp, r0, &keys, h, None, Some(&mut l));
            let o = mm(ctx, &p, m, &vb.cols());
            for i in 0..m {
                // SAFETY: item (g, b) writes only rows r0..r1 of the columns of g's query heads
                // (and their log-sum-exps); no two items share a (KV head, block) pair.
                unsafe {
                    op.slice((r0 + i) * qw + h * hd, hd).copy_from_slice(&o[i * hd..(i + 1) * hd]);
                    *lp.ptr().add((r0 + i) * s.n_heads + h) = l[i];
                }
            }
        }
    });
}

/// Backward of [`attention_forward`]: from `dout` (and the forward's `out` and `lse`) adds the
/// gradients to `dq`, `dk` and `dv`. Per block: `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dO∘O))`,
/// `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`, all as matrix products. KV heads are
/// spread over the threads (a KV head's keys collect gradients from all its rows).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    ctx: Ctx,
    s: &AttnShape,
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
    let (hd, n) = (s.head_dim, s.start.len());
    let (qw, kw, group) = (s.n_heads * hd, s.kv_heads * hd, s.n_heads / s.kv_heads);
    let (qp, kp, vp) = (SendPtr::new(dq), SendPtr::new(dk), SendPtr::new(dv));
    per_item(ctx, s.kv_heads, &|ctx, g| {
        for r0 in (0..n).step_by(ATTN_ROWS) {
            let r1 = (r0 + ATTN_ROWS).min(n);
            let keys = key_range(s, r0, r1);
            let (m, nk) = (r1 - r0, keys.len());
            let (nkp, mp) = (nk.next_multiple_of(32), m.next_multiple_of(32));
            let kb = Operand::new(ctx, k, kw, keys.clone(), g * hd, hd, nkp);
            let vb = Operand::new(ctx, v, kw, keys.clone(), g * hd, hd, nkp);
            let mut dkb = vec![0f32; nkp * hd];
            let mut dvb = vec![0f32; nkp * hd];
            for h in g * group..(g + 1) * group {
                let qb = gather(q, qw, r0..r1, h * hd, hd);
                let dob = gather(dout, qw, r0..r1, h * hd, hd);
                let mut p = mm(ctx, &qb, m, &kb.rows());
                probabilities(ctx.isa, s, &mut p, nkp, r0, &keys, h, Some(lse), None);
                let mut ds = mm(ctx, &dob, m, &vb.rows());
                let outs = (0..m).map(|i| &out[(r0 + i) * qw + h * hd..][..hd]);
                score_grads(ctx.isa, &mut ds, &p, nkp, &dob, outs, s.scale);
                let dqb = mm(ctx, &ds, m, &kb.cols());
                for i in 0..m {
                    // SAFETY: KV head g's item is the only one touching the columns of g's
                    // query heads in dq and of g in dk and dv.
                    let row = unsafe { qp.slice((r0 + i) * qw + h * hd, hd) };
                    crate::ops::add_inplace(ctx.isa, row, &dqb[i * hd..(i + 1) * hd]);
                }
                // dK = dSᵀ·Q and dV = Pᵀ·dO: the block's rows (zero-padded) are the inner dimension.
                let qo = Operand::new(ctx, q, qw, r0..r1, h * hd, hd, mp);
                let doo = Operand::new(ctx, dout, qw, r0..r1, h * hd, hd, mp);
                for (acc, x, w) in [(&mut dkb, &ds, &qo), (&mut dvb, &p, &doo)] {
                    let part = mm(ctx, &transpose_padded(x, m, nkp, mp), nkp, &w.cols());
                    crate::ops::add_inplace(ctx.isa, acc, &part);
                }
            }
            for (j, r) in keys.clone().enumerate() {
                // SAFETY: as above.
                let (kr, vr) = unsafe { (kp.slice(r * kw + g * hd, hd), vp.slice(r * kw + g * hd, hd)) };
                crate::ops::add_inplace(ctx.isa, kr, &dkb[j * hd..(j + 1) * hd]);
                crate::ops::add_inplace(ctx.isa, vr, &dvb[j * hd..(j + 1) * hd]);
            }
        }
    });
}

/// The scores' gradient in place: `ds = scale · P ∘ (dP − rowsum(dO ∘ O))` for rows of `width`,
/// from `dP` (in `ds`), `P`, the block's output gradient rows `dout` and output rows `outs`.
fn score_grads<'a>(
    isa: Isa,
    ds: &mut [f32],
    p: &[f32],
    width: usize,
    dout: &[f32],
    outs: impl Iterator<Item = &'a [f32]>,
    scale: f32,
) {
    let hd = dout.len() / (ds.len() / width);
    for (i, o) in outs.enumerate() {
        let w = i * width..(i + 1) * width;
        let (ds, p, d) = (&mut ds[w.clone()], &p[w], &dout[i * hd..(i + 1) * hd]);
        multiversion!(
            isa,
            fn row(ds: &mut [f32], p: &[f32], d: &[f32], o: &[f32], scale: f32) {
                let _ = FAST;
                let di = crate::ops::dot(d, o);
                for (dv, &pv) in ds.iter_mut().zip(p) {
                    *dv = pv * (*dv - di) * scale;
                }
            }
        );
    }
}

/// Cross-entropy of each row of `logits` ([rows, vocab]) against `labels` (one per row), in
/// place: returns the sum of the rows' losses and leaves `scale · (softmax − onehot)` (the
/// gradient of `scale ·` that sum) in `logits`.
pub fn cross_entropy(isa: Isa, logits: &mut [f32], vocab: usize, labels: &[u32], scale: f32) -> f64 {
    let mut total = 0f64;
    for (row, &y) in logits.chunks_exact_mut(vocab).zip(labels) {
        let lse = log_sum_exp(isa, row, 1.0);
        total += (lse - row[y as usize]) as f64;
        multiversion!(
            isa,
            fn softmax_scaled(row: &mut [f32], lse: f32, scale: f32) {
                for v in row.iter_mut() {
                    *v = exp_sel::<FAST>(*v - lse) * scale;
                }
            }
        );
        row[y as usize] -= scale;
    }
    total
}

/// `c[ni, nj] += Σ_t a[t, i] · b[t, j]` over `t` rows of `a` ([t, ni]) and `b` ([t, nj]), for the
/// output rows `rows` of `c` (`c` holds just those rows). On AVX-512, up to eight output rows
/// by sixteen columns accumulate in registers over 64 rows of `a` and `b` at a time; elsewhere
/// the plain loop (the reference).
pub fn matmul_tn(isa: Isa, a: &[f32], ni: usize, b: &[f32], nj: usize, rows: std::ops::Range<usize>, c: &mut [f32]) {
    let t = a.len() / ni;
    assert!(b.len() >= t * nj && c.len() >= rows.len() * nj && rows.end <= ni, "matmul_tn operand sizes");
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx512() {
        let mut i0 = rows.start;
        while i0 < rows.end {
            let out = c[(i0 - rows.start) * nj..].as_mut_ptr();
            // SAFETY: `isa` is only AVX-512 on CPUs that have it; the assertion above bounds every
            // index the block reads (`a` rows `< t`, columns `< ni`; `b` rows `< t`) and writes
            // (rows `i0 - rows.start..` of `c`, within `rows`).
            i0 += unsafe {
                match rows.end - i0 {
                    8.. => tn_avx512::<8>(a.as_ptr(), ni, i0, b.as_ptr(), nj, t, out),
                    4.. => tn_avx512::<4>(a.as_ptr(), ni, i0, b.as_ptr(), nj, t, out),
                    2.. => tn_avx512::<2>(a.as_ptr(), ni, i0, b.as_ptr(), nj, t, out),
                    _ => tn_avx512::<1>(a.as_ptr(), ni, i0, b.as_ptr(), nj, t, out),
                }
            };
        }
        return;
    }
    for r in 0..t {
        let (ar, br) = (&a[r * ni..(r + 1) * ni], &b[r * nj..(r + 1) * nj]);
        for (o, i) in rows.clone().enumerate() {
            let s = ar[i];
            for (cv, &bv) in c[o * nj..(o + 1) * nj].iter_mut().zip(br) {
                *cv += s * bv;
            }
        }
    }
}

/// Output rows `i0..i0 + R` of [`matmul_tn`] into `c` (rows of `nj`); returns `R`.
///
/// # Safety
/// AVX-512F; `a` holds `t` rows of `ni` with `i0 + R <= ni`, `b` `t` rows of `nj`, `c` `R` rows
/// of `nj`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tn_avx512<const R: usize>(
    a: *const f32,
    ni: usize,
    i0: usize,
    b: *const f32,
    nj: usize,
    t: usize,
    c: *mut f32,
) -> usize {
    // SAFETY: what this function's `# Safety` section asks of its caller is what the
    // operations below need.
    unsafe {
        use std::arch::x86_64::*;
        for t0 in (0..t).step_by(64) {
            let t1 = (t0 + 64).min(t);
            for j0 in (0..nj).step_by(16) {
                let mask: __mmask16 = if nj - j0 >= 16 { 0xffff } else { ((1u32 << (nj - j0)) - 1) as __mmask16 };
                let mut acc = [_mm512_setzero_ps(); R];
                for (q, v) in acc.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, c.add(q * nj + j0));
                }
                for r in t0..t1 {
                    let bv = _mm512_maskz_loadu_ps(mask, b.add(r * nj + j0));
                    for (q, v) in acc.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * ni + i0 + q)), bv, *v);
                    }
                }
                for (q, v) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.add(q * nj + j0), mask, *v);
                }
            }
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rand_vec;
    use crate::ops;
    use crate::ops::tests::close;

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
                ops::rms_norm(Isa::SCALAR, x, &w, 1e-6, &mut y);
                project(&y, &r)
            };
            let want = numeric_grad(&x, f);
            let mut got = vec![0f32; 2 * d];
            rms_norm_backward(Isa::SCALAR, &x, &w, 1e-6, &r, &mut got);
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
        silu_mul_backward(Isa::SCALAR, &g, &u, &da, &mut dg, &mut du);
        let fg = |x: &[f32]| {
            let mut a = x.to_vec();
            ops::silu_mul(Isa::SCALAR, &mut a, &u);
            project(&a, &da)
        };
        close(&dg, &numeric_grad(&g, fg), 2e-3, "dg");
        let fu = |x: &[f32]| {
            let mut a = g.clone();
            ops::silu_mul(Isa::SCALAR, &mut a, x);
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

    /// Examples packed in one batch (`lens`), 4 query heads over 2 KV heads.
    struct Case {
        start: Vec<u32>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        hd: usize,
    }

    fn case(lens: &[usize], hd: usize) -> Case {
        let mut start = Vec::new();
        for &l in lens {
            let s0 = start.len() as u32;
            start.extend(std::iter::repeat_n(s0, l));
        }
        let n = start.len();
        Case { start, q: rand_vec(n * 4 * hd, 11), k: rand_vec(n * 2 * hd, 12), v: rand_vec(n * 2 * hd, 13), hd }
    }

    /// The reference: each row's softmax over its example's keys up to itself, in f64.
    fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (n, hd) = (c.start.len(), c.hd);
        let mut out = vec![0f32; n * 4 * hd];
        let mut lse = vec![0f32; n * 4];
        for i in 0..n {
            for h in 0..4 {
                let kvh = h / 2;
                let qi = &q[i * 4 * hd + h * hd..][..hd];
                let js: Vec<usize> = (c.start[i] as usize..=i).collect();
                let sc: Vec<f64> = js
                    .iter()
                    .map(|&j| 0.7 * (0..hd).map(|d| qi[d] as f64 * k[j * 2 * hd + kvh * hd + d] as f64).sum::<f64>())
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[i * 4 + h] = (m + z.ln()) as f32;
                for d in 0..hd {
                    let o: f64 =
                        js.iter().zip(&sc).map(|(&j, x)| (x - m).exp() / z * v[j * 2 * hd + kvh * hd + d] as f64).sum();
                    out[i * 4 * hd + h * hd + d] = o as f32;
                }
            }
        }
        (out, lse)
    }

    fn shape(c: &Case) -> AttnShape<'_> {
        AttnShape { n_heads: 4, kv_heads: 2, head_dim: c.hd, scale: 0.7, start: &c.start }
    }

    fn forward(ctx: Ctx, c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let n = c.start.len();
        let mut out = vec![0f32; n * 4 * c.hd];
        let mut lse = vec![0f32; n * 4];
        attention_forward(ctx, &shape(c), q, k, v, &mut out, &mut lse);
        (out, lse)
    }

    fn backward(ctx: Ctx, c: &Case, out: &[f32], lse: &[f32], r: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut dq, mut dk, mut dv) = (vec![0f32; c.q.len()], vec![0f32; c.k.len()], vec![0f32; c.v.len()]);
        attention_backward(ctx, &shape(c), &c.q, &c.k, &c.v, out, lse, r, &mut dq, &mut dk, &mut dv);
        (dq, dk, dv)
    }

    #[test]
    fn attention_matches_the_reference_and_its_gradient() {
        let pool = crate::pool::ThreadPool::new(2);
        // Small: every partial derivative by finite differences.
        for hd in [6usize, 24, 32] {
            let c = case(&[5, 4], hd);
            for isa in Isa::all_supported() {
                let ctx = Ctx { exact: true, ..Ctx::new(isa, &pool) };
                let (out, lse) = forward(ctx, &c, &c.q, &c.k, &c.v);
                let (ro, rl) = reference(&c, &c.q, &c.k, &c.v);
                close(&out, &ro, 1e-5, "attention");
                close(&lse, &rl, 1e-5, "lse");
                let r = rand_vec(out.len(), 14);
                let (dq, dk, dv) = backward(ctx, &c, &out, &lse, &r);
                let fq = |x: &[f32]| project(&reference(&c, x, &c.k, &c.v).0, &r);
                let fk = |x: &[f32]| project(&reference(&c, &c.q, x, &c.v).0, &r);
                let fv = |x: &[f32]| project(&reference(&c, &c.q, &c.k, x).0, &r);
                close(&dq, &numeric_grad(&c.q, fq), 3e-3, "dq");
                close(&dk, &numeric_grad(&c.k, fk), 3e-3, "dk");
                close(&dv, &numeric_grad(&c.v, fv), 3e-3, "dv");
            }
        }
        // Several row blocks, examples crossing them: the output against the reference, the
        // gradient along a random direction against a central difference.
        let c = case(&[130, 130, 41], 32);
        for isa in Isa::all_supported() {
            let ctx = Ctx { exact: true, ..Ctx::new(isa, &pool) };
            let (out, lse) = forward(ctx, &c, &c.q, &c.k, &c.v);
            let (ro, rl) = reference(&c, &c.q, &c.k, &c.v);
            close(&out, &ro, 1e-5, "attention, blocks");
            close(&lse, &rl, 1e-5, "lse, blocks");
            let r = rand_vec(out.len(), 15);
            let (dq, dk, dv) = backward(ctx, &c, &out, &lse, &r);
            let (eq, ek, ev) = (rand_vec(dq.len(), 16), rand_vec(dk.len(), 17), rand_vec(dv.len(), 18));
            let along = |t: f32| {
                let m = |x: &[f32], e: &[f32]| -> Vec<f32> { x.iter().zip(e).map(|(a, b)| a + t * b).collect() };
                project(&reference(&c, &m(&c.q, &eq), &m(&c.k, &ek), &m(&c.v, &ev)).0, &r)
            };
            let h = 1e-2;
            let want = (along(h) - along(-h)) / (2.0 * h as f64);
            let got = project(&dq, &eq) + project(&dk, &ek) + project(&dv, &ev);
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "{isa:?}: directional derivative {got} vs {want}");
        }
        // Outside exact contexts the products may run in bf16 (AMX tiles, bf16 dot products):
        // within bf16 rounding of the reference.
        for mode in
            crate::matmul::Bf16Mode::ALL.into_iter().filter(|m| m.supported() && *m != crate::matmul::Bf16Mode::F32)
        {
            let ctx = Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) };
            let (out, lse) = forward(ctx, &c, &c.q, &c.k, &c.v);
            let (ro, rl) = reference(&c, &c.q, &c.k, &c.v);
            close(&out, &ro, 2e-2, "attention in bf16");
            close(&lse, &rl, 2e-2, "lse in bf16");
            let r = rand_vec(out.len(), 15);
            let (dq, dk, dv) = backward(ctx, &c, &out, &lse, &r);
            let exact = Ctx { exact: true, ..ctx };
            let (eq, ek, ev) = backward(exact, &c, &ro, &rl, &r);
            let rel = |a: &[f32], b: &[f32]| crate::check::worst_abs(a, b).err / crate::check::max_abs(b);
            assert!(
                rel(&dq, &eq) < 3e-2 && rel(&dk, &ek) < 3e-2 && rel(&dv, &ev) < 3e-2,
                "{mode:?}: bf16 gradients off"
            );
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
        let got = cross_entropy(Isa::SCALAR, &mut g, vocab, &labels, 0.5);
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
        for (t, ni, nj) in [(9, 5, 19), (70, 19, 100), (300, 16, 48), (5, 6, 12), (64, 8, 1024)] {
            let a = rand_vec(t * ni, 31);
            let b = rand_vec(t * nj, 32);
            let mut want = vec![0f32; ni * nj];
            for i in 0..ni {
                for j in 0..nj {
                    want[i * nj + j] = (0..t).map(|r| a[r * ni + i] as f64 * b[r * nj + j] as f64).sum::<f64>() as f32;
                }
            }
            for isa in [Isa::SCALAR].into_iter().chain(Isa::all_supported()) {
                let mut c = vec![1f32; ni * nj];
                matmul_tn(isa, &a, ni, &b, nj, 0..ni, &mut c);
                let want1: Vec<f32> = want.iter().map(|w| w + 1.0).collect();
                close(&c, &want1, 1e-5 * t as f32, "matmul_tn adds");
                let mut part = vec![0f32; 3 * nj];
                matmul_tn(isa, &a, ni, &b, nj, 2..5, &mut part);
                close(&part, &want[2 * nj..5 * nj], 1e-5 * t as f32, "matmul_tn rows");
            }
        }
    }
}
