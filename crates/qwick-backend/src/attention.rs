//! Causal attention of a flat batch of query tokens over a paged KV cache.
//!
//! The cache of one layer holds K and V as `[num_blocks, block_size, kv_heads, head_dim]`
//! f32; a sequence's block table maps its logical block `j` to a physical block. A query at
//! position `p` attends to its sequence's keys at positions `0..=p`. Scores are computed one
//! query row at a time (never a T×T matrix), softmaxed in f32 and applied to V. Query heads
//! that share a KV head (GQA) are processed together so each key and value is read once.

use crate::ops::{dot, exp_sel, multiversion};
use crate::pool::SendPtr;
use crate::{Ctx, Isa};

/// One layer's paged K/V storage.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Shapes and per-token addressing of an attention call.
pub struct AttnArgs<'a> {
    pub n_heads: usize,
    pub scale: f32,
    /// Position of each query token in its sequence.
    pub positions: &'a [u32],
    /// Index into `block_tables` of each query token's sequence.
    pub seq_of_token: &'a [u32],
    pub block_tables: &'a [&'a [u32]],
}

/// `out[t, h*hd..]` = softmax(q[t,h]·Kᵀ·scale) · V over the token's causal context.
pub fn paged_attention(ctx: Ctx, q: &[f32], kv: PagedKv, a: &AttnArgs, out: &mut [f32]) {
    let n_tok = a.positions.len();
    let hd = kv.head_dim;
    assert!(q.len() >= n_tok * a.n_heads * hd && out.len() >= n_tok * a.n_heads * hd);
    assert!(a.n_heads.is_multiple_of(kv.kv_heads));
    let group = a.n_heads / kv.kv_heads;
    // Work units: runs of up to TILE consecutive tokens of one sequence (a prefill chunk) go
    // to the tiled kernel where there is one; other tokens one at a time.
    // Tokens per tile: their query heads of one KV head fill the 16 lanes.
    let tile = if ctx.isa.is_avx512() && group <= 16 { 16 / group } else { 1 };
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut t = 0;
    while t < n_tok {
        let mut len = 1;
        while len < tile
            && t + len < n_tok
            && a.seq_of_token[t + len] == a.seq_of_token[t]
            && a.positions[t + len] == a.positions[t] + len as u32
        {
            len += 1;
        }
        units.push((t, len));
        t += len;
    }
    // Longest contexts first, so the last units to finish are short.
    units.sort_by_key(|&(t, len)| std::cmp::Reverse(a.positions[t + len - 1]));
    let items = units.len() * kv.kv_heads;
    let threads = ctx.pool.threads();
    let op = SendPtr::new(out);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = |_t: usize| {
        let max_ctx = (0..n_tok).map(|i| a.positions[i] as usize + 1).max().unwrap_or(0);
        let mut scores = vec![0f32; group * max_ctx];
        let mut scratch = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= items {
                break;
            }
            let ((tok, len), kvh) = (units[i / kv.kv_heads], i % kv.kv_heads);
            let table = a.block_tables[a.seq_of_token[tok] as usize];
            if len > 1 {
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let pos0 = a.positions[tok] as usize;
                    let o = op.ptr();
                    x86::attend_rows((q, tok, len, a.n_heads, group, kvh, kv, table, pos0, a.scale, o, &mut scratch));
                }
                continue;
            }
            let ctx_len = a.positions[tok] as usize + 1;
            let qrow = &q[(tok * a.n_heads + kvh * group) * hd..(tok * a.n_heads + (kvh + 1) * group) * hd];
            let orow = unsafe { op.slice((tok * a.n_heads + kvh * group) * hd, group * hd) };
            attend_one(ctx.isa, qrow, kv, table, kvh, ctx_len, a.scale, &mut scores[..group * ctx_len], orow);
        }
    };
    if items < 2 || threads == 1 {
        work(0);
    } else {
        ctx.pool.run(&work);
    }
}

/// Attention of the `group` query heads in `q` (all sharing KV head `kvh`) over `ctx_len` keys.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    isa: Isa,
    q: &[f32],
    kv: PagedKv,
    table: &[u32],
    kvh: usize,
    ctx_len: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx512Bf16 | Isa::Amx => match kv.head_dim.div_ceil(16) {
            1 => unsafe { x86::attend_avx512::<1>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            2 => unsafe { x86::attend_avx512::<2>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            3 => unsafe { x86::attend_avx512::<3>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            4 => unsafe { x86::attend_avx512::<4>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            5 => unsafe { x86::attend_avx512::<5>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            6 => unsafe { x86::attend_avx512::<6>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            7 => unsafe { x86::attend_avx512::<7>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            8 => unsafe { x86::attend_avx512::<8>(q, kv, table, kvh, ctx_len, scale, scores, out) },
            _ => attend_generic(Isa::Avx512, q, kv, table, kvh, ctx_len, scale, scores, out),
        },
        _ => attend_generic(isa, q, kv, table, kvh, ctx_len, scale, scores, out),
    }
}

/// Calls `f(j, row)` for each of the first `ctx_len` keys: `j` its position, `row` the offset
/// of its `head_dim` values (for KV head `kvh`) in the layer's K or V buffer.
#[inline(always)]
fn for_each_key(kv: &PagedKv, table: &[u32], kvh: usize, ctx_len: usize, mut f: impl FnMut(usize, usize)) {
    let (bs, stride) = (kv.block_size, kv.kv_heads * kv.head_dim);
    for (b, &phys) in table.iter().enumerate().take(ctx_len.div_ceil(bs)) {
        let base = phys as usize * bs * stride + kvh * kv.head_dim;
        for off in 0..bs.min(ctx_len - b * bs) {
            f(b * bs + off, base + off * stride);
        }
    }
}

/// Softmax of each of the `group` score rows in place.
#[inline(always)]
fn softmax_rows<const FAST: bool>(scores: &mut [f32], ctx_len: usize) {
    for s in scores.chunks_exact_mut(ctx_len) {
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = exp_sel::<FAST>(*v - m);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
}

/// Plain-Rust attention (the reference; compiled for AVX2 too).
#[allow(clippy::too_many_arguments)]
fn attend_generic(
    isa: Isa,
    q: &[f32],
    kv: PagedKv,
    table: &[u32],
    kvh: usize,
    ctx_len: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    multiversion!(
        isa,
        fn k(
            q: &[f32],
            kv: PagedKv,
            table: &[u32],
            kvh: usize,
            ctx_len: usize,
            scale: f32,
            scores: &mut [f32],
            out: &mut [f32],
        ) {
            let hd = kv.head_dim;
            let group = q.len() / hd;
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                let key = &kv.k[row..row + hd];
                for g in 0..group {
                    scores[g * ctx_len + j] = dot(&q[g * hd..(g + 1) * hd], key) * scale;
                }
            });
            softmax_rows::<FAST>(scores, ctx_len);
            out.fill(0.0);
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                let val = &kv.v[row..row + hd];
                for g in 0..group {
                    let p = scores[g * ctx_len + j];
                    for (o, &v) in out[g * hd..(g + 1) * hd].iter_mut().zip(val) {
                        *o = p.mul_add(v, *o);
                    }
                }
            });
        }
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX-512 attention for head_dim ≤ 16·N: each query head and each output row lives in N
    /// registers; the last chunk is masked when head_dim is not a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend_avx512<const N: usize>(
        q: &[f32],
        kv: PagedKv,
        table: &[u32],
        kvh: usize,
        ctx_len: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = kv.head_dim;
        let group = q.len() / hd;
        let tail = hd - (N - 1) * 16;
        let last: __mmask16 = if tail == 16 { 0xffff } else { ((1u32 << tail) - 1) as __mmask16 };
        let mask = |c: usize| if c == N - 1 { last } else { 0xffff };
        let (kp, vp, sp) = (kv.k.as_ptr(), kv.v.as_ptr(), scores.as_mut_ptr());
        for g in 0..group {
            let mut qv = [_mm512_setzero_ps(); N];
            for (c, r) in qv.iter_mut().enumerate() {
                *r = _mm512_mul_ps(
                    _mm512_maskz_loadu_ps(mask(c), q.as_ptr().add(g * hd + c * 16)),
                    _mm512_set1_ps(scale),
                );
            }
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                let mut acc = _mm512_setzero_ps();
                for (c, r) in qv.iter().enumerate() {
                    acc = _mm512_fmadd_ps(*r, _mm512_maskz_loadu_ps(mask(c), kp.add(row + c * 16)), acc);
                }
                *sp.add(g * ctx_len + j) = _mm512_reduce_add_ps(acc);
            });
        }
        softmax_rows::<true>(scores, ctx_len);
        for g in 0..group {
            let mut acc = [_mm512_setzero_ps(); N];
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                let p = _mm512_set1_ps(*sp.add(g * ctx_len + j));
                for (c, r) in acc.iter_mut().enumerate() {
                    *r = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(mask(c), vp.add(row + c * 16)), *r);
                }
            });
            for (c, r) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(g * hd + c * 16), mask(c), *r);
            }
        }
    }

    /// e^x for 16 lanes (the polynomial of `ops::exp_poly`); -inf gives 0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.5)), _mm512_set1_ps(-87.5));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }

    /// Flash-style attention of `len` consecutive tokens of one sequence (positions
    /// `pos0..pos0+len`) × the `group` query heads of KV head `kvh`, at most 16 rows in all:
    /// one vector lane per row. Keys are taken 16 at a time; the scores of each key are one
    /// vector over the rows, so the online softmax (running max and sum), the causal mask and
    /// the output update run for all rows at once. The output is kept transposed (a vector of
    /// rows per dimension).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    #[allow(clippy::type_complexity)]
    pub unsafe fn attend_rows(
        (q, tok0, len, n_heads, group, kvh, kv, table, pos0, scale, out, scratch): (
            &[f32],
            usize,
            usize,
            usize,
            usize,
            usize,
            PagedKv,
            &[u32],
            usize,
            f32,
            *mut f32,
            &mut Vec<f32>,
        ),
    ) {
        let hd = kv.head_dim;
        let rows = len * group;
        debug_assert!(rows <= 16);
        let (bs, stride) = (kv.block_size, kv.kv_heads * hd);
        scratch.clear();
        scratch.resize(2 * hd * 16, 0.0);
        let (qt, ot) = scratch.split_at_mut(hd * 16);
        for t in 0..len {
            for g in 0..group {
                let r = t * group + g;
                let src = &q[((tok0 + t) * n_heads + kvh * group + g) * hd..][..hd];
                for (d, &v) in src.iter().enumerate() {
                    qt[d * 16 + r] = v * scale;
                }
            }
        }
        // Each lane's position; lanes past the rows see every key (their results are unused).
        let mut pos = [i32::MAX; 16];
        for (r, p) in pos.iter_mut().enumerate().take(rows) {
            *p = (pos0 + r / group) as i32;
        }
        let posv = _mm512_loadu_si512(pos.as_ptr() as *const _);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut l = _mm512_setzero_ps();
        let ctx = pos0 + len;
        let mut offs = [0usize; 16];
        let mut kb = 0;
        while kb < ctx {
            let nk = (ctx - kb).min(16);
            for (jj, off) in offs.iter_mut().enumerate() {
                // Keys past the context repeat the first (masked out below).
                let j = kb + if jj < nk { jj } else { 0 };
                *off = (table[j / bs] as usize * bs + j % bs) * stride + kvh * hd;
            }
            // Scores: s[j] lane r = q_r · k_j.
            let mut s = [_mm512_setzero_ps(); 16];
            let kp = kv.k.as_ptr();
            for d in 0..hd {
                let qd = _mm512_loadu_ps(qt.as_ptr().add(d * 16));
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = _mm512_fmadd_ps(_mm512_set1_ps(*kp.add(offs[j] + d)), qd, *sj);
                }
            }
            // Causal mask, block maximum, rescale of the running sums.
            let mut valid = [0 as __mmask16; 16];
            let mut mb = m;
            for (j, sj) in s.iter_mut().enumerate() {
                valid[j] = if j < nk {
                    _mm512_cmp_epi32_mask::<_MM_CMPINT_NLT>(posv, _mm512_set1_epi32((kb + j) as i32))
                } else {
                    0
                };
                mb = _mm512_mask_max_ps(mb, valid[j], mb, *sj);
            }
            // Lanes that have seen no key yet keep a running max of -inf: no rescale there.
            let seen = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(m, _mm512_set1_ps(f32::NEG_INFINITY));
            let corr = _mm512_mask_blend_ps(seen, _mm512_set1_ps(1.0), exp16(_mm512_sub_ps(m, mb)));
            let mut sum = _mm512_setzero_ps();
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = _mm512_maskz_mov_ps(valid[j], exp16(_mm512_sub_ps(*sj, mb)));
                sum = _mm512_add_ps(sum, *sj);
            }
            l = _mm512_fmadd_ps(l, corr, sum);
            m = mb;
            // Output: o[d] lane r = o[d]·corr + Σ_j p[j]·v_j[d].
            let vp = kv.v.as_ptr();
            for d in 0..hd {
                let mut o = _mm512_mul_ps(_mm512_loadu_ps(ot.as_ptr().add(d * 16)), corr);
                for (j, pj) in s.iter().enumerate() {
                    o = _mm512_fmadd_ps(*pj, _mm512_set1_ps(*vp.add(offs[j] + d)), o);
                }
                _mm512_storeu_ps(ot.as_mut_ptr().add(d * 16), o);
            }
            kb += 16;
        }
        let mut inv = [0f32; 16];
        _mm512_storeu_ps(inv.as_mut_ptr(), _mm512_div_ps(_mm512_set1_ps(1.0), l));
        for t in 0..len {
            for g in 0..group {
                let r = t * group + g;
                let dst = out.add(((tok0 + t) * n_heads + kvh * group + g) * hd);
                for d in 0..hd {
                    *dst.add(d) = ot[d * 16 + r] * inv[r];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::rand_vec;
    use crate::ThreadPool;

    /// Dense causal attention over contiguous K/V, written directly from the definition.
    #[allow(clippy::too_many_arguments)]
    fn dense(q: &[f32], k: &[f32], v: &[f32], t: usize, nh: usize, kvh: usize, hd: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; t * nh * hd];
        for i in 0..t {
            for h in 0..nh {
                let g = h / (nh / kvh);
                let qv = &q[(i * nh + h) * hd..][..hd];
                let s: Vec<f32> = (0..=i)
                    .map(|j| qv.iter().zip(&k[(j * kvh + g) * hd..][..hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for j in 0..=i {
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += e[j] / z * v[(j * kvh + g) * hd + d];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_matches_dense_on_every_isa() {
        let pool = ThreadPool::new(2);
        for &(t, nh, kvh, hd, bs) in &[
            (1, 2, 1, 8, 4),
            (37, 8, 2, 24, 16),
            (20, 4, 4, 16, 3),
            (50, 8, 1, 33, 16),
            (24, 32, 2, 128, 16),
            (19, 4, 2, 128, 4),
        ] {
            let q = rand_vec(t * nh * hd, 1);
            let k = rand_vec(t * kvh * hd, 2);
            let v = rand_vec(t * kvh * hd, 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let want = dense(&q, &k, &v, t, nh, kvh, hd, scale);
            // Scatter K/V into blocks in reverse physical order.
            let nblocks = t.div_ceil(bs);
            let table: Vec<u32> = (0..nblocks as u32).rev().collect();
            let mut kc = vec![0f32; nblocks * bs * kvh * hd];
            let mut vc = kc.clone();
            for j in 0..t {
                let slot = table[j / bs] as usize * bs + j % bs;
                kc[slot * kvh * hd..][..kvh * hd].copy_from_slice(&k[j * kvh * hd..][..kvh * hd]);
                vc[slot * kvh * hd..][..kvh * hd].copy_from_slice(&v[j * kvh * hd..][..kvh * hd]);
            }
            let positions: Vec<u32> = (0..t as u32).collect();
            let seq = vec![0u32; t];
            let tables = [&table[..]];
            let args =
                AttnArgs { n_heads: nh, scale, positions: &positions, seq_of_token: &seq, block_tables: &tables };
            for isa in Isa::all_supported() {
                let mut out = vec![0f32; t * nh * hd];
                let kv = PagedKv { k: &kc, v: &vc, block_size: bs, kv_heads: kvh, head_dim: hd };
                paged_attention(Ctx::new(isa, &pool), &q, kv, &args, &mut out);
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() < 1e-5, "{isa} t{t} nh{nh} kvh{kvh} hd{hd} [{i}]: {g} vs {e}");
                }
                // Decode: one query token at a time (the per-token path), at every position.
                for p in 0..t {
                    let pos = [p as u32];
                    let one =
                        AttnArgs { n_heads: nh, scale, positions: &pos, seq_of_token: &[0], block_tables: &tables };
                    let mut o1 = vec![0f32; nh * hd];
                    let kv = PagedKv { k: &kc, v: &vc, block_size: bs, kv_heads: kvh, head_dim: hd };
                    paged_attention(Ctx::new(isa, &pool), &q[p * nh * hd..(p + 1) * nh * hd], kv, &one, &mut o1);
                    for (i, (g, e)) in o1.iter().zip(&want[p * nh * hd..]).enumerate() {
                        assert!((g - e).abs() < 1e-5, "{isa} decode t{t} p{p} hd{hd} [{i}]: {g} vs {e}");
                    }
                }
            }
        }
    }
}
