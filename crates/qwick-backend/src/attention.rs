//! Causal attention of a flat batch of query tokens over a paged KV cache.
//!
//! The cache of one layer holds K and V as `[num_blocks, kv_heads, block_size, head_dim]` in a
//! float format (f32, bf16 or f16; read as f32); a sequence's block table maps its logical block `j` to a physical block. A query at
//! position `p` attends to its sequence's keys at positions `0..=p`. Scores are computed one
//! query row at a time (never a T×T matrix), softmaxed in f32 and applied to V. Query heads
//! that share a KV head (GQA) are processed together so each key and value is read once.

use crate::ctx::Ctx;
use crate::format::Format;
use crate::isa::Isa;
use crate::ops::{dot, exp_sel, multiversion};
use crate::pool::SendPtr;

/// One layer's paged K/V storage.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    /// K and V elements, in `format`.
    pub k: &'a [u8],
    pub v: &'a [u8],
    /// F32, BF16 or F16.
    pub format: Format,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> PagedKv<'a> {
    /// Storage of f32 K and V.
    pub fn f32(k: &'a [f32], v: &'a [f32], block_size: usize, kv_heads: usize, head_dim: usize) -> Self {
        let (k, v) = (crate::format::f32_bytes(k), crate::format::f32_bytes(v));
        PagedKv { k, v, format: Format::F32, block_size, kv_heads, head_dim }
    }

    pub fn layout(&self) -> KvLayout {
        KvLayout { block_size: self.block_size, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }

    #[inline(always)]
    pub fn row(&self, block: usize, kvh: usize, off: usize) -> usize {
        self.layout().row(block, kvh, off)
    }

    /// The element format's number for the kernels (0 f32, 1 bf16, 2 f16).
    fn code(&self) -> u8 {
        match self.format {
            Format::F32 => 0,
            Format::BF16 => 1,
            Format::F16 => 2,
            f => panic!("KV cache elements cannot be {f}"),
        }
    }
}

/// Where values live in a layer's K or V buffer: `[blocks, kv_heads, block_size, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Element offset of the `head_dim` values of KV head `kvh` of the token in slot `off` of
    /// physical block `block`: one KV head's tokens of a block are contiguous.
    #[inline(always)]
    pub fn row(&self, block: usize, kvh: usize, off: usize) -> usize {
        ((block * self.kv_heads + kvh) * self.block_size + off) * self.head_dim
    }
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
    let units = work_units(a, tile);
    let threads = ctx.pool.threads();
    // Fewer (token, KV head) items than threads (one sequence decoding on many cores): each
    // single-token item's keys are split into `parts` runs of whole blocks, attended on their
    // own and merged by their log-sum-exps, so every thread has keys to read.
    let max_ctx = (0..n_tok).map(|i| a.positions[i] as usize + 1).max().unwrap_or(0);
    let parts = if units.len() * kv.kv_heads < threads && units.iter().all(|&(_, len)| len == 1) {
        threads.div_ceil(units.len() * kv.kv_heads).min(max_ctx / MIN_PART_KEYS).max(1)
    } else {
        1
    };
    let items = units.len() * kv.kv_heads * parts;
    let part_len = |ctx_len: usize| ctx_len.div_ceil(kv.block_size).div_ceil(parts) * kv.block_size;
    // Each split item's output and log-sum-exps, merged below.
    let (mut part_out, mut part_lse) = if parts > 1 {
        (vec![0f32; items * group * hd], vec![f32::NEG_INFINITY; items * group])
    } else {
        (Vec::new(), Vec::new())
    };
    let (pop, plp) = (SendPtr::new(&mut part_out), SendPtr::new(&mut part_lse));
    let op = SendPtr::new(out);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = |_t: usize| {
        let span = if parts > 1 { part_len(max_ctx) } else { max_ctx };
        let mut scores = vec![0f32; group * span];
        let mut lse = vec![0f32; group];
        let mut scratch = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= items {
                break;
            }
            let (unit, part) = (i / parts, i % parts);
            let ((tok, len), kvh) = (units[unit / kv.kv_heads], unit % kv.kv_heads);
            let table = a.block_tables[a.seq_of_token[tok] as usize];
            if len > 1 {
                // SAFETY: tiles of len > 1 exist only on AVX-512 CPUs (see `tile`); the kernel
                // writes only the output rows of these tokens' heads of KV head kvh, which no
                // other work item owns, and reads K/V rows through the sequence's block table.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let pos0 = a.positions[tok] as usize;
                    let o = op.ptr();
                    let args = (q, tok, len, a.n_heads, group, kvh, kv, table, pos0, a.scale, o, &mut scratch);
                    match kv.code() {
                        0 => x86::attend_rows::<0>(args),
                        1 => x86::attend_rows::<1>(args),
                        _ => x86::attend_rows::<2>(args),
                    }
                }
                continue;
            }
            let ctx_len = a.positions[tok] as usize + 1;
            let qrow = &q[(tok * a.n_heads + kvh * group) * hd..(tok * a.n_heads + (kvh + 1) * group) * hd];
            if parts == 1 {
                // SAFETY: this token's heads of KV head kvh: owned by this work item alone, in bounds.
                let orow = unsafe { op.slice((tok * a.n_heads + kvh * group) * hd, group * hd) };
                let sc = &mut scores[..group * ctx_len];
                let h = Heads { q: qrow, kv, table, kvh, ctx_len, scale: a.scale };
                attend_one(ctx.isa, &h, Sink { scores: sc, lse: &mut lse, out: orow });
                continue;
            }
            // Keys `from..to` of this part (none when the context is shorter: its log-sum-exps
            // stay -inf and it weighs nothing in the merge).
            let per = part_len(ctx_len);
            let (from, to) = ((part * per).min(ctx_len), ((part + 1) * per).min(ctx_len));
            if from == to {
                continue;
            }
            // SAFETY: item i's slots of the partial buffers belong to this work item alone.
            let (orow, lrow) = unsafe { (pop.slice(i * group * hd, group * hd), plp.slice(i * group, group)) };
            let sub = &table[from / kv.block_size..];
            let sc = &mut scores[..group * (to - from)];
            let h = Heads { q: qrow, kv, table: sub, kvh, ctx_len: to - from, scale: a.scale };
            attend_one(ctx.isa, &h, Sink { scores: sc, lse: lrow, out: orow });
        }
    };
    if items < 2 || threads == 1 {
        work(0);
    } else {
        ctx.pool.run(&work);
    }
    if parts > 1 {
        merge_parts(&units, parts, group, hd, a.n_heads, kv.kv_heads, &part_out, &part_lse, out);
    }
}

/// Runs of up to `tile` consecutive tokens of one sequence (`(first token, length)`), longest
/// contexts first, so the last units to finish are short.
fn work_units(a: &AttnArgs, tile: usize) -> Vec<(usize, usize)> {
    let n_tok = a.positions.len();
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
    units.sort_by_key(|&(t, len)| std::cmp::Reverse(a.positions[t + len - 1]));
    units
}

/// The outputs of single-token units attended in `parts` runs of keys, merged by their
/// log-sum-exps into `out`.
#[allow(clippy::too_many_arguments)]
fn merge_parts(
    units: &[(usize, usize)],
    parts: usize,
    group: usize,
    hd: usize,
    n_heads: usize,
    kv_heads: usize,
    part_out: &[f32],
    part_lse: &[f32],
    out: &mut [f32],
) {
    // out = Σ_p exp(lse_p − LSE) · out_p, LSE the log-sum-exp of the parts' log-sum-exps.
    for unit in 0..units.len() * kv_heads {
        let ((tok, _), kvh) = (units[unit / kv_heads], unit % kv_heads);
        let o = &mut out[(tok * n_heads + kvh * group) * hd..][..group * hd];
        for g in 0..group {
            let l = |p: usize| part_lse[(unit * parts + p) * group + g];
            let m = (0..parts).map(l).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..parts).map(|p| (l(p) - m).exp()).sum();
            let og = &mut o[g * hd..(g + 1) * hd];
            og.fill(0.0);
            for p in 0..parts {
                let wp = (l(p) - m).exp() / total;
                let src = &part_out[((unit * parts + p) * group + g) * hd..][..hd];
                for (d, &v) in og.iter_mut().zip(src) {
                    *d += wp * v;
                }
            }
        }
    }
}

/// Fewest keys per part when one token's attention is split over threads (see
/// [`paged_attention`]): below this the merge and the extra pass cost more than they save.
const MIN_PART_KEYS: usize = 256;

/// The query heads of one token that share KV head `kvh` (`q`: `group` heads of `head_dim`
/// values), and the `ctx_len` keys they attend to through `table` (the sequence's block table
/// from the block of the first key).
#[derive(Clone, Copy)]
struct Heads<'a> {
    q: &'a [f32],
    kv: PagedKv<'a>,
    table: &'a [u32],
    kvh: usize,
    ctx_len: usize,
    scale: f32,
}

/// What attention of [`Heads`] writes: the scores (scratch of `group · ctx_len`), each head's
/// log-sum-exp and each head's output.
struct Sink<'b> {
    scores: &'b mut [f32],
    lse: &'b mut [f32],
    out: &'b mut [f32],
}

/// Attention of `h`'s query heads over its keys.
fn attend_one(isa: Isa, h: &Heads, s: Sink) {
    let kv = h.kv;
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx512() && (kv.head_dim <= 128 || (kv.format == Format::BF16 && kv.head_dim == 256)) {
        macro_rules! per_dim {
            ($d:literal) => {
                match kv.head_dim.div_ceil(16) {
                    1 => x86::attend_avx512::<$d, 1>(h, s),
                    2 => x86::attend_avx512::<$d, 2>(h, s),
                    3 => x86::attend_avx512::<$d, 3>(h, s),
                    4 => x86::attend_avx512::<$d, 4>(h, s),
                    5 => x86::attend_avx512::<$d, 5>(h, s),
                    6 => x86::attend_avx512::<$d, 6>(h, s),
                    7 => x86::attend_avx512::<$d, 7>(h, s),
                    _ => x86::attend_avx512::<$d, 8>(h, s),
                }
            };
        }
        // SAFETY: an AVX-512 `Isa` exists only on a CPU with the features the kernels enable;
        // head_dim fits the kernel's N (or NP) registers by the match; the kernels read K/V rows
        // through the block table (within the cache) and write `out` (group × head_dim).
        return unsafe {
            match (kv.code(), kv.head_dim) {
                (1, 64) => x86::attend_bf16::<2>(h, s),
                (1, 128) => x86::attend_bf16::<4>(h, s),
                (1, 256) => x86::attend_bf16::<8>(h, s),
                (0, _) => per_dim!(0),
                (1, _) => per_dim!(1),
                _ => per_dim!(2),
            }
        };
    }
    let isa = isa.at_most(crate::isa::Level::Avx512);
    attend_generic(isa, h, s)
}

/// Calls `f(j, row)` for each of the first `ctx_len` keys: `j` its position, `row` the offset
/// of its `head_dim` values (for KV head `kvh`) in the layer's K or V buffer.
#[inline(always)]
fn for_each_key(kv: &PagedKv, table: &[u32], kvh: usize, ctx_len: usize, mut f: impl FnMut(usize, usize)) {
    let bs = kv.block_size;
    for (b, &phys) in table.iter().enumerate().take(ctx_len.div_ceil(bs)) {
        let base = kv.row(phys as usize, kvh, 0);
        for off in 0..bs.min(ctx_len - b * bs) {
            f(b * bs + off, base + off * kv.head_dim);
        }
    }
}

/// Softmax of each of the `group` score rows in place; `lse[g]` gets row `g`'s log-sum-exp.
#[inline(always)]
fn softmax_rows<const FAST: bool>(scores: &mut [f32], ctx_len: usize, lse: &mut [f32]) {
    for (s, l) in scores.chunks_exact_mut(ctx_len).zip(lse.iter_mut()) {
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
        *l = m + sum.ln();
    }
}

/// Plain-Rust attention (the reference; compiled for AVX2 too).
fn attend_generic(isa: Isa, h: &Heads, s: Sink) {
    multiversion!(
        isa,
        fn k(h: &Heads, s: Sink) {
            let Heads { q, kv, table, kvh, ctx_len, scale } = *h;
            let Sink { scores, lse, out } = s;
            let hd = kv.head_dim;
            let group = q.len() / hd;
            let es = kv.format.row_bytes(1);
            let mut row_f32 = vec![0f32; hd];
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                kv.format.dequantize(&kv.k[row * es..(row + hd) * es], &mut row_f32);
                for g in 0..group {
                    scores[g * ctx_len + j] = dot(&q[g * hd..(g + 1) * hd], &row_f32) * scale;
                }
            });
            softmax_rows::<FAST>(scores, ctx_len, lse);
            out.fill(0.0);
            for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                kv.format.dequantize(&kv.v[row * es..(row + hd) * es], &mut row_f32);
                for g in 0..group {
                    let p = scores[g * ctx_len + j];
                    for (o, &v) in out[g * hd..(g + 1) * hd].iter_mut().zip(&row_f32) {
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

    /// 16 K/V elements from element `i` of `p` (format number `D`: 0 f32, 1 bf16, 2 f16) as
    /// f32, lanes outside `mask` zero.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,fma,f16c`); `p` holds K/V elements of format `D`
    /// readable from element `i` through the lanes of `mask`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn load16<const D: u8>(p: *const u8, i: usize, mask: __mmask16) -> __m512 {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            match D {
                0 => _mm512_maskz_loadu_ps(mask, (p as *const f32).add(i)),
                1 => _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (p as *const i16).add(i))),
                    16,
                )),
                _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (p as *const i16).add(i))),
            }
        }
    }

    /// Element `i` of `p` as f32 (see [`load16`]).
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,fma,f16c`); element `i` of `p` (format `D`) is
    /// readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn load1<const D: u8>(p: *const u8, i: usize) -> f32 {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            match D {
                0 => *(p as *const f32).add(i),
                1 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
                _ => _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*(p as *const u16).add(i) as i32))),
            }
        }
    }

    /// AVX-512 attention for head_dim ≤ 16·N over K/V of format number `D`: each query head
    /// and each output row lives in N registers; the last chunk is masked when head_dim is not
    /// a multiple of 16.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,fma,f16c`); `head_dim` ≤ 16·N; the K/V blocks `kv`
    /// names hold format `D` and every position the call reads; the operands have the sizes
    /// [`super::attend_one`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    pub unsafe fn attend_avx512<const D: u8, const N: usize>(h: &Heads, s: Sink) {
        let Heads { q, kv, table, kvh, ctx_len, scale } = *h;
        let Sink { scores, lse, out } = s;
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let hd = kv.head_dim;
            let group = q.len() / hd;
            let tail = hd - (N - 1) * 16;
            let last: __mmask16 = if tail == 16 { 0xffff } else { ((1u32 << tail) - 1) as __mmask16 };
            let mask = |c: usize| if c == N - 1 { last } else { 0xffff };
            let (kp, vp, sp) = (kv.k.as_ptr(), kv.v.as_ptr(), scores.as_mut_ptr());
            // Every key's offset, padded to a multiple of 4 with the first (their scores unused).
            let mut offs = Vec::with_capacity(ctx_len + 3);
            for_each_key(&kv, table, kvh, ctx_len, |_, row| offs.push(row));
            offs.resize(ctx_len.next_multiple_of(4), offs[0]);
            // The query heads, scaled, in whole vectors.
            let mut qs = vec![0f32; group * N * 16];
            for g in 0..group {
                for d in 0..hd {
                    qs[g * N * 16 + d] = q[g * hd + d] * scale;
                }
            }
            // Scores four keys at a time: four independent FMA chains, each key's K read from L1
            // by every query head after the first.
            for j0 in (0..ctx_len).step_by(4) {
                let o = [offs[j0], offs[j0 + 1], offs[j0 + 2], offs[j0 + 3]];
                for g in 0..group {
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for c in 0..N {
                        let qv = _mm512_loadu_ps(qs.as_ptr().add(g * N * 16 + c * 16));
                        for (a, &row) in acc.iter_mut().zip(&o) {
                            *a = _mm512_fmadd_ps(qv, load16::<D>(kp, row + c * 16, mask(c)), *a);
                        }
                    }
                    for (u, a) in acc.iter().enumerate().take(ctx_len - j0) {
                        *sp.add(g * ctx_len + j0 + u) = _mm512_reduce_add_ps(*a);
                    }
                }
            }
            softmax16(scores, ctx_len, lse);
            for g in 0..group {
                let mut acc = [_mm512_setzero_ps(); N];
                for_each_key(&kv, table, kvh, ctx_len, |j, row| {
                    let p = _mm512_set1_ps(*sp.add(g * ctx_len + j));
                    for (c, r) in acc.iter_mut().enumerate() {
                        *r = _mm512_fmadd_ps(p, load16::<D>(vp, row + c * 16, mask(c)), *r);
                    }
                });
                for (c, r) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(g * hd + c * 16), mask(c), *r);
                }
            }
        }
    }

    /// Attention over bf16 K/V with head_dim = 32·NP. Query heads are reordered per 32 values
    /// as 16 even then 16 odd ones, so a 64-byte load of 32 bf16 keys or values splits into two
    /// f32 vectors with a shift (even) and a mask (odd), no cross-lane widening; the outputs
    /// are summed in the same split order and interleaved back at the end.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW/VL/DQ; `kv` holds bf16 elements and `table` maps the first
    /// `ctx_len` keys to blocks inside it; `q` and `out` hold `group` heads; `scores` ≥
    /// `group · ctx_len`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    pub unsafe fn attend_bf16<const NP: usize>(h: &Heads, s: Sink) {
        let Heads { q, kv, table, kvh, ctx_len, scale } = *h;
        let Sink { scores, lse, out } = s;
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let hd = kv.head_dim;
            debug_assert_eq!(hd, 32 * NP);
            let group = q.len() / hd;
            let (kp, vp, sp) = (kv.k.as_ptr() as *const u16, kv.v.as_ptr() as *const u16, scores.as_mut_ptr());
            let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
            let split = |v: __m512i| {
                (_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_castsi512_ps(_mm512_and_si512(v, high)))
            };
            let mut offs = Vec::with_capacity(ctx_len + 3);
            for_each_key(&kv, table, kvh, ctx_len, |_, row| offs.push(row));
            offs.resize(ctx_len.next_multiple_of(4), offs[0]);
            let mut qs = vec![0f32; group * hd];
            for g in 0..group {
                for c in 0..NP {
                    for i in 0..16 {
                        qs[g * hd + 32 * c + i] = q[g * hd + 32 * c + 2 * i] * scale;
                        qs[g * hd + 32 * c + 16 + i] = q[g * hd + 32 * c + 2 * i + 1] * scale;
                    }
                }
            }
            // Rows of keys and values are scattered (one KV head of each token): fetch ahead.
            let ahead = |p: *const u16, row: usize| {
                for c in 0..NP {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(row + 32 * c) as *const i8);
                }
            };
            // Scores, four keys at a time (four independent FMA chains).
            for j0 in (0..ctx_len).step_by(4) {
                let o = [offs[j0], offs[j0 + 1], offs[j0 + 2], offs[j0 + 3]];
                for &row in offs.iter().skip(j0 + 8).take(4) {
                    ahead(kp, row);
                }
                for g in 0..group {
                    let mut acc = [_mm512_setzero_ps(); 4];
                    for c in 0..NP {
                        let qe = _mm512_loadu_ps(qs.as_ptr().add(g * hd + 32 * c));
                        let qo = _mm512_loadu_ps(qs.as_ptr().add(g * hd + 32 * c + 16));
                        for (a, &row) in acc.iter_mut().zip(&o) {
                            let (ke, ko) = split(_mm512_loadu_si512(kp.add(row + 32 * c) as *const _));
                            *a = _mm512_fmadd_ps(qo, ko, _mm512_fmadd_ps(qe, ke, *a));
                        }
                    }
                    for (u, a) in acc.iter().enumerate().take(ctx_len - j0) {
                        *sp.add(g * ctx_len + j0 + u) = _mm512_reduce_add_ps(*a);
                    }
                }
            }
            softmax16(scores, ctx_len, lse);
            // Output rows in split order: 2·NP accumulators per query head.
            for g in 0..group {
                let mut even = [_mm512_setzero_ps(); NP];
                let mut odd = [_mm512_setzero_ps(); NP];
                for (j, &row) in offs.iter().enumerate().take(ctx_len) {
                    if let Some(&next) = offs.get(j + 6) {
                        ahead(vp, next);
                    }
                    let p = _mm512_set1_ps(*sp.add(g * ctx_len + j));
                    for c in 0..NP {
                        let (ve, vo) = split(_mm512_loadu_si512(vp.add(row + 32 * c) as *const _));
                        even[c] = _mm512_fmadd_ps(p, ve, even[c]);
                        odd[c] = _mm512_fmadd_ps(p, vo, odd[c]);
                    }
                }
                for c in 0..NP {
                    let (mut e, mut o) = ([0f32; 16], [0f32; 16]);
                    _mm512_storeu_ps(e.as_mut_ptr(), even[c]);
                    _mm512_storeu_ps(o.as_mut_ptr(), odd[c]);
                    for i in 0..16 {
                        out[g * hd + 32 * c + 2 * i] = e[i];
                        out[g * hd + 32 * c + 2 * i + 1] = o[i];
                    }
                }
            }
        }
    }

    /// Softmax of each `ctx_len` row of `scores` in place, 16 lanes at a time.
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,fma`); `scores` holds whole rows of `ctx_len` values
    /// and `lse` one value per row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn softmax16(scores: &mut [f32], ctx_len: usize, lse: &mut [f32]) {
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let lanes = |i: usize| -> __mmask16 {
                let n = (ctx_len - i).min(16);
                if n == 16 {
                    0xffff
                } else {
                    ((1u32 << n) - 1) as __mmask16
                }
            };
            for (row, l) in scores.chunks_exact_mut(ctx_len).zip(lse.iter_mut()) {
                let p = row.as_mut_ptr();
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                for i in (0..ctx_len).step_by(16) {
                    m = _mm512_mask_max_ps(m, lanes(i), m, _mm512_maskz_loadu_ps(lanes(i), p.add(i)));
                }
                let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                let mut sum = _mm512_setzero_ps();
                for i in (0..ctx_len).step_by(16) {
                    let x = _mm512_maskz_loadu_ps(lanes(i), p.add(i));
                    let e = _mm512_maskz_mov_ps(lanes(i), exp16(_mm512_sub_ps(x, m)));
                    _mm512_mask_storeu_ps(p.add(i), lanes(i), e);
                    sum = _mm512_add_ps(sum, e);
                }
                let total = _mm512_reduce_add_ps(sum);
                *l = _mm512_reduce_max_ps(m) + total.ln();
                let inv = _mm512_set1_ps(1.0 / total);
                for i in (0..ctx_len).step_by(16) {
                    let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(i), p.add(i)), inv);
                    _mm512_mask_storeu_ps(p.add(i), lanes(i), v);
                }
            }
        }
    }

    /// e^x for 16 lanes (the polynomial of `ops::exp_poly`); -inf gives 0.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    fn exp16(x: __m512) -> __m512 {
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
    ///
    /// # Safety
    /// The CPU must support the features this function enables
    /// (`avx512f,avx512bw,avx512vl,avx512dq,fma,f16c`); the K/V blocks `kv` names hold format `D`
    /// and every position the rows read; the operands have the sizes [`super::attend_rows`]'s
    /// caller checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    #[allow(clippy::type_complexity)]
    pub unsafe fn attend_rows<const D: u8>(
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
        // SAFETY: what this function's `# Safety` section asks of its caller is what the
        // operations below need.
        unsafe {
            let hd = kv.head_dim;
            let rows = len * group;
            debug_assert!(rows <= 16);
            let bs = kv.block_size;
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
                    *off = kv.row(table[j / bs] as usize, kvh, j % bs);
                }
                // Scores: s[j] lane r = q_r · k_j.
                let mut s = [_mm512_setzero_ps(); 16];
                let kp = kv.k.as_ptr();
                for d in 0..hd {
                    let qd = _mm512_loadu_ps(qt.as_ptr().add(d * 16));
                    for (j, sj) in s.iter_mut().enumerate() {
                        *sj = _mm512_fmadd_ps(_mm512_set1_ps(load1::<D>(kp, offs[j] + d)), qd, *sj);
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
                        o = _mm512_fmadd_ps(*pj, _mm512_set1_ps(load1::<D>(vp, offs[j] + d)), o);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::rand_vec;
    use crate::pool::ThreadPool;

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

    /// K/V of `t` tokens scattered into blocks of `bs` in reverse physical order: the cache
    /// buffers and the block table.
    fn scatter(k: &[f32], v: &[f32], t: usize, kvh: usize, hd: usize, bs: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let nblocks = t.div_ceil(bs);
        let table: Vec<u32> = (0..nblocks as u32).rev().collect();
        let mut kc = vec![0f32; nblocks * bs * kvh * hd];
        let mut vc = kc.clone();
        let layout = KvLayout { block_size: bs, kv_heads: kvh, head_dim: hd };
        for j in 0..t {
            for h in 0..kvh {
                let row = layout.row(table[j / bs] as usize, h, j % bs);
                kc[row..row + hd].copy_from_slice(&k[(j * kvh + h) * hd..][..hd]);
                vc[row..row + hd].copy_from_slice(&v[(j * kvh + h) * hd..][..hd]);
            }
        }
        (kc, vc, table)
    }

    /// One query token with fewer KV heads than threads: its keys are split over the threads
    /// (parts of whole blocks merged by log-sum-exp) and the result equals attention over all of
    /// them, for every ISA and K/V format, at contexts giving two to four parts (the last
    /// ragged) and one too short to split.
    #[test]
    fn one_token_split_over_threads_matches_dense() {
        let pool = ThreadPool::new(4);
        for &(nh, kvh, hd, bs) in &[(4, 1, 128, 16), (8, 2, 64, 16), (2, 1, 24, 5)] {
            let t = 1100;
            let q = rand_vec(t * nh * hd, 4);
            let (k, v) = (rand_vec(t * kvh * hd, 5), rand_vec(t * kvh * hd, 6));
            let scale = 1.0 / (hd as f32).sqrt();
            let (kc, vc, table) = scatter(&k, &v, t, kvh, hd, bs);
            let tables = [&table[..]];
            for fmt in [Format::F32, Format::BF16, Format::F16] {
                let enc = |x: &[f32]| {
                    let mut b = vec![0u8; x.len() * fmt.row_bytes(1)];
                    fmt.encode_floats(x, &mut b);
                    b
                };
                let (kb, vb) = (enc(&kc), enc(&vc));
                let (kr, vr) = (fmt.to_f32_vec(&enc(&k)), fmt.to_f32_vec(&enc(&v)));
                let kv = PagedKv { k: &kb, v: &vb, format: fmt, block_size: bs, kv_heads: kvh, head_dim: hd };
                // Row p of causal attention over all t tokens: token p over keys 0..=p.
                let want = dense(&q, &kr, &vr, t, nh, kvh, hd, scale);
                for p in [300, 599, 1023, 1099] {
                    let n = p + 1;
                    let pos = [p as u32];
                    let one =
                        AttnArgs { n_heads: nh, scale, positions: &pos, seq_of_token: &[0], block_tables: &tables };
                    for isa in Isa::all_supported() {
                        let mut o1 = vec![f32::NAN; nh * hd];
                        paged_attention(Ctx::new(isa, &pool), &q[p * nh * hd..n * nh * hd], kv, &one, &mut o1);
                        for (i, (g, e)) in o1.iter().zip(&want[p * nh * hd..]).enumerate() {
                            assert!((g - e).abs() < 1e-5, "{isa} {fmt} nh{nh} kvh{kvh} hd{hd} p{p} [{i}]: {g} vs {e}");
                        }
                    }
                }
            }
        }
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
            (9, 4, 2, 64, 16),
            (6, 2, 1, 256, 4),
        ] {
            let q = rand_vec(t * nh * hd, 1);
            let k = rand_vec(t * kvh * hd, 2);
            let v = rand_vec(t * kvh * hd, 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let want = dense(&q, &k, &v, t, nh, kvh, hd, scale);
            let (kc, vc, table) = scatter(&k, &v, t, kvh, hd, bs);
            let positions: Vec<u32> = (0..t as u32).collect();
            let seq = vec![0u32; t];
            let tables = [&table[..]];
            let args =
                AttnArgs { n_heads: nh, scale, positions: &positions, seq_of_token: &seq, block_tables: &tables };
            for isa in Isa::all_supported() {
                let mut out = vec![0f32; t * nh * hd];
                let kv = PagedKv::f32(&kc, &vc, bs, kvh, hd);
                paged_attention(Ctx::new(isa, &pool), &q, kv, &args, &mut out);
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() < 1e-5, "{isa} t{t} nh{nh} kvh{kvh} hd{hd} [{i}]: {g} vs {e}");
                }
                // K/V stored as bf16 and f16: the result on the values those formats hold.
                for fmt in [Format::BF16, Format::F16] {
                    let round = |x: &[f32]| {
                        let mut b = vec![0u8; x.len() * 2];
                        fmt.encode_floats(x, &mut b);
                        b
                    };
                    let (kb, vb) = (round(&kc), round(&vc));
                    let (kr, vr) = (fmt.to_f32_vec(&round(&k)), fmt.to_f32_vec(&round(&v)));
                    let want_r = dense(&q, &kr, &vr, t, nh, kvh, hd, scale);
                    let kv = PagedKv { k: &kb, v: &vb, format: fmt, block_size: bs, kv_heads: kvh, head_dim: hd };
                    let mut out = vec![f32::NAN; t * nh * hd];
                    paged_attention(Ctx::new(isa, &pool), &q, kv, &args, &mut out);
                    for (i, (g, e)) in out.iter().zip(&want_r).enumerate() {
                        assert!((g - e).abs() < 1e-5, "{isa} {fmt} t{t} hd{hd} [{i}]: {g} vs {e}");
                    }
                    let pos = [t as u32 - 1];
                    let one =
                        AttnArgs { n_heads: nh, scale, positions: &pos, seq_of_token: &[0], block_tables: &tables };
                    let mut o1 = vec![f32::NAN; nh * hd];
                    paged_attention(Ctx::new(isa, &pool), &q[(t - 1) * nh * hd..], kv, &one, &mut o1);
                    for (i, (g, e)) in o1.iter().zip(&want_r[(t - 1) * nh * hd..]).enumerate() {
                        assert!((g - e).abs() < 1e-5, "{isa} {fmt} decode t{t} hd{hd} [{i}]: {g} vs {e}");
                    }
                }
                // Decode: one query token at a time (the per-token path), at every position.
                for p in 0..t {
                    let pos = [p as u32];
                    let one =
                        AttnArgs { n_heads: nh, scale, positions: &pos, seq_of_token: &[0], block_tables: &tables };
                    let mut o1 = vec![0f32; nh * hd];
                    let kv = PagedKv::f32(&kc, &vc, bs, kvh, hd);
                    paged_attention(Ctx::new(isa, &pool), &q[p * nh * hd..(p + 1) * nh * hd], kv, &one, &mut o1);
                    for (i, (g, e)) in o1.iter().zip(&want[p * nh * hd..]).enumerate() {
                        assert!((g - e).abs() < 1e-5, "{isa} decode t{t} p{p} hd{hd} [{i}]: {g} vs {e}");
                    }
                }
            }
        }
    }
}
