//! One training step's arithmetic: the model's own forward pass (`qwick_model::qwen3`) over a
//! packed sequence, traced, with the trainable LoRA pairs' updates on the targeted projections
//! (a [`Lora`]); the loss (cross-entropy over the labelled rows, a few rows of logits at a time
//! so the `[tokens, vocab]` matrix never exists whole); and the backward pass to the LoRA
//! matrices, written against what the traced forward pass kept ([`LayerTrace`]).
//!
//! Only each layer's input and attention output are kept from the forward pass; the backward
//! pass recomputes one layer's other activations at a time from them (activation checkpointing
//! per layer), so memory grows with layers × tokens × (hidden + attention) width, not with
//! everything a layer computes. [`Frozen::keep_layers`] keeps every activation of the first
//! layers instead, trading memory for the recomputation.
//!
//! The frozen weights are read as stored for the forward products (`y = x·Wᵀ`) and, where the
//! kernels can (see `qwick_backend::matmul::reads_transposed`), for the backward ones
//! (`dx = dy·W`) too; elsewhere from a transposed copy, so that both run on the fast kernels,
//! as far as a memory budget allows ([`Frozen::with_copy_budget`]); beyond it, a block of
//! weight rows at a time is read back for each backward product (quantized bases of large
//! models, QLoRA).

use crate::lora::{LoraParams, Pair, DOWN, GATE, K, O, Q, UP, V};
use qwick_backend::grad::{self, transpose, AttnShape};
use qwick_backend::pool::SendPtr;
use qwick_backend::{copied, matmul, ops, par_rows, zeros, Ctx, Format, WeightView};
use qwick_model::exec::{packed_attention, Keys, Lora, Pass};
use qwick_model::linear::Linear;
use qwick_model::lora::MODULES;
use qwick_model::names::Role;
use qwick_model::qwen3::{FeedForward, LayerTrace, MlpTrace, Moe, MoeTrace, RmsNorm, Rope, Trace};
use qwick_model::Qwen3;

/// One packed sequence: several examples one after another.
pub struct Sequence {
    pub tokens: Vec<u32>,
    /// Position of each token within its example.
    pub positions: Vec<u32>,
    /// Per token, the index of its example's first token.
    pub start: Vec<u32>,
    /// Per token, the token to predict there, or `None` (no loss at this token).
    pub labels: Vec<Option<u32>>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }
}

/// A frozen weight transposed (`[in, out]`), for `dx = dy · W`.
struct Transposed {
    format: Format,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Transposed {
    /// The element format a copy of a `format` weight takes.
    fn format_for(format: Format) -> Format {
        match format {
            Format::F32 => Format::F32,
            Format::F16 => Format::F16,
            _ => Format::BF16,
        }
    }

    /// Transposes `l`'s weight, keeping f32 and f16 as they are and storing everything else
    /// (bf16 and the quantized formats, dequantized) as bf16.
    fn of(l: &Linear) -> Transposed {
        let w = &l.weight;
        let (out, inp) = (w.shape[0], w.shape[1]);
        let format = Transposed::format_for(w.format);
        let rb = w.format.row_bytes(inp);
        let es = format.row_bytes(1);
        let mut data = vec![0u8; out * inp * es];
        // Blocks of 64 source rows: dequantize them, then write each input column's run.
        let mut rows = vec![0f32; 64 * inp];
        let mut col = vec![0f32; 64];
        let mut enc = vec![0u8; 64 * es];
        for o0 in (0..out).step_by(64) {
            let n = 64.min(out - o0);
            for r in 0..n {
                let src = &w.bytes()[(o0 + r) * rb..(o0 + r + 1) * rb];
                w.format.dequantize(src, &mut rows[r * inp..(r + 1) * inp]);
            }
            for i in 0..inp {
                for r in 0..n {
                    col[r] = rows[r * inp + i];
                }
                format.encode_floats(&col[..n], &mut enc[..n * es]);
                data[(i * out + o0) * es..(i * out + o0 + n) * es].copy_from_slice(&enc[..n * es]);
            }
        }
        Transposed { format, data, rows: inp, cols: out }
    }

    fn view(&self) -> WeightView<'_> {
        WeightView::new(self.format, &self.data, self.rows, self.cols)
    }

    fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// How the backward pass reads a frozen weight for `dx = dy · W`.
enum Back<'m> {
    /// As stored, transposed by the product itself (AMX tiles, bf16 dot products, the AVX-512
    /// f32 GEMM).
    Stored(&'m qwick_model::safetensors::Tensor),
    /// Through a transposed copy.
    Copy(Transposed),
    /// [`BACK_BLOCK`] stored rows at a time, read back (as [`Transposed::of`] stores them) for
    /// each product, their partial products added in order.
    Blocks(&'m qwick_model::safetensors::Tensor),
}

/// Weight rows per block of [`Back::Blocks`] (a multiple of 32, so products read the block
/// transposed as it is).
const BACK_BLOCK: usize = 256;

impl Back<'_> {
    /// `dx [n, in] = dy [n, out] · W`.
    fn product(&self, ctx: Ctx, dy: &[f32], n: usize, dx: &mut [f32]) {
        let w = match self {
            Back::Stored(w) => {
                let view = WeightView::transposed(w.format, w.bytes(), w.shape[1], w.shape[0]);
                return matmul(ctx, dy, n, &view, dx);
            }
            Back::Copy(t) => return matmul(ctx, dy, n, &t.view(), dx),
            Back::Blocks(w) => w,
        };
        let (out, inp) = (w.shape[0], w.shape[1]);
        let format = Transposed::format_for(w.format);
        let (rb, es) = (w.format.row_bytes(inp), format.row_bytes(1));
        let mut block = vec![0u8; BACK_BLOCK * inp * es];
        let mut dyb = vec![0f32; n * BACK_BLOCK];
        let mut part = vec![0f32; n * inp];
        dx[..n * inp].fill(0.0);
        for r0 in (0..out).step_by(BACK_BLOCK) {
            let nb = BACK_BLOCK.min(out - r0);
            let bp = SendPtr::new(&mut block[..nb * inp * es]);
            ctx.pool.for_chunks(nb, 1, &|rows| {
                let mut f = vec![0f32; inp];
                for r in rows {
                    w.format.dequantize(&w.bytes()[(r0 + r) * rb..(r0 + r + 1) * rb], &mut f);
                    // SAFETY: each chunk of rows owns those rows of the block.
                    format.encode_floats(&f, unsafe { bp.slice(r * inp * es, inp * es) });
                }
            });
            for (d, s) in dyb.chunks_exact_mut(nb).zip(dy.chunks_exact(out)) {
                d.copy_from_slice(&s[r0..r0 + nb]);
            }
            // Rows `r0..r0 + nb` of W are the transposed layout of the product's weight.
            let view = WeightView::transposed(format, &block[..nb * inp * es], inp, nb);
            matmul(ctx, &dyb[..n * nb], n, &view, &mut part);
            for (d, p) in dx.iter_mut().zip(&part) {
                *d += p;
            }
        }
    }

    /// The weight's input features (`dx`'s width).
    fn inputs(&self) -> usize {
        match self {
            Back::Stored(w) | Back::Blocks(w) => w.shape[1],
            Back::Copy(t) => t.rows,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Back::Stored(_) | Back::Blocks(_) => 0,
            Back::Copy(t) => t.bytes(),
        }
    }
}

/// The frozen model with what its backward pass reads.
pub struct Frozen<'m> {
    pub model: &'m Qwen3,
    /// Per layer: q, k, v, o, gate, up, down (the last three `None` in MoE layers).
    layers: Vec<[Option<Back<'m>>; 7]>,
    head: Back<'m>,
    /// The first this many layers keep all their activations from the forward pass instead of
    /// recomputing them in the backward pass (faster, more memory).
    kept_layers: usize,
}

fn dense(m: &FeedForward) -> Option<(&Linear, &Linear, &Linear)> {
    match m {
        FeedForward::Dense(s) => Some((&s.gate_proj, &s.up_proj, &s.down_proj)),
        FeedForward::Moe(_) => None,
    }
}

impl<'m> Frozen<'m> {
    /// Prepares `model` for training in `ctx`: projections whose stored weights `ctx`'s products
    /// cannot read transposed get a transposed copy (made on all of the pool's threads).
    pub fn new(model: &'m Qwen3, ctx: Ctx) -> anyhow::Result<Frozen<'m>> {
        Frozen::with_copy_budget(model, ctx, usize::MAX)
    }

    /// [`Frozen::new`] with transposed copies taking at most `budget` bytes (in layer order,
    /// the head last); the projections left out read a block of stored rows at a time in each
    /// backward product instead (slower: the rows are read back every step).
    pub fn with_copy_budget(model: &'m Qwen3, ctx: Ctx, budget: usize) -> anyhow::Result<Frozen<'m>> {
        let mut jobs: Vec<(usize, usize, &Linear)> = Vec::new();
        for (l, layer) in model.layers.iter().enumerate() {
            let a = &layer.attn;
            let mut lins = vec![&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj];
            // MoE layers' experts are read as stored (only the experts a step routes to).
            if let Some((g, u, d)) = dense(&layer.mlp) {
                lins.extend([g, u, d]);
            }
            for (m, lin) in lins.into_iter().enumerate() {
                jobs.push((l, m, lin));
            }
        }
        jobs.push((usize::MAX, 0, &model.lm_head));
        // How each projection is read: as stored where the products can, else by a copy while
        // the copies fit in the budget (in order), else by blocks; the copies are made after.
        let mut used = 0usize;
        let mut backs: Vec<Option<Back<'m>>> = jobs
            .iter()
            .map(|&(_, _, lin)| {
                let w = &lin.weight;
                if qwick_backend::matmul::reads_transposed(ctx, w.format, w.shape[0]) {
                    return Some(Back::Stored(w));
                }
                used += w.shape[0] * w.shape[1] * Transposed::format_for(w.format).row_bytes(1);
                (used > budget).then_some(Back::Blocks(w))
            })
            .collect();
        let todo: Vec<usize> = (0..jobs.len()).filter(|&i| backs[i].is_none()).collect();
        let copies: std::sync::Mutex<Vec<(usize, Transposed)>> = std::sync::Mutex::new(Vec::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..ctx.pool.threads().max(1) {
                s.spawn(|| loop {
                    let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = todo.get(t) else { break };
                    let copy = Transposed::of(jobs[i].2);
                    copies.lock().unwrap_or_else(|e| e.into_inner()).push((i, copy));
                });
            }
        });
        for (i, t) in copies.into_inner().unwrap_or_else(|e| e.into_inner()) {
            backs[i] = Some(Back::Copy(t));
        }
        let mut layers: Vec<[Option<Back>; 7]> = (0..model.layers.len()).map(|_| Default::default()).collect();
        let mut head = None;
        for (&(l, m, _), back) in jobs.iter().zip(backs) {
            if l == usize::MAX {
                head = back;
            } else {
                layers[l][m] = back;
            }
        }
        Ok(Frozen { model, layers, head: head.expect("the head is prepared"), kept_layers: 0 })
    }

    /// Keeps all activations of the first `n` layers (all layers if `n` is larger) from the
    /// forward pass to the backward pass, instead of recomputing them.
    pub fn keep_layers(mut self, n: usize) -> Self {
        self.kept_layers = n;
        self
    }

    /// Bytes of the transposed copies.
    pub fn extra_bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(Back::bytes).sum::<usize>() + self.head.bytes()
    }

    /// Projections whose backward products read blocks of stored rows (no copy within the
    /// budget).
    pub fn block_read(&self) -> usize {
        let blocks = |b: &Back| matches!(b, Back::Blocks(_));
        self.layers.iter().flatten().flatten().filter(|b| blocks(b)).count() + usize::from(blocks(&self.head))
    }

    fn back(&self, l: usize, m: usize) -> &Back<'m> {
        self.layers[l][m].as_ref().expect("a prepared projection")
    }
}

/// Gradients of the LoRA pairs, `(dA, dB)` per pair.
pub type Grads = Vec<(Vec<f32>, Vec<f32>)>;

/// How one step treats LoRA dropout: the probability and a key that, with the layer and
/// module, seeds the masks (so the recomputation in the backward pass draws the same ones).
#[derive(Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub key: u64,
}

/// What a projection's LoRA path keeps for the backward pass: its dropped-out input (when
/// dropout is on) and `x·Aᵀ`; `None` for a projection without an adapter.
type LoraSaved = Option<(Option<Vec<f32>>, Vec<f32>)>;

/// What the backward pass of a layer reads: the model's trace of its forward pass, and per
/// module the LoRA path's saved values.
struct Kept {
    trace: LayerTrace,
    lora: [LoraSaved; 7],
}

/// Bytes the activations of layer `l` take when kept for the backward pass over `tokens`
/// token rows ([`Frozen::keep_layers`]), with LoRA of `rank` on every projection (and each
/// LoRA input kept too under dropout).
pub fn kept_layer_bytes(c: &qwick_model::Config, l: usize, tokens: usize, rank: usize, dropout: bool) -> usize {
    let (h, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
    let attention = h + 3 * qd + 3 * kvd + c.num_attention_heads;
    let mlp = match &c.moe {
        Some(m) if c.is_sparse(l) => m.num_experts + m.num_experts_per_tok * (h + 3 * m.moe_intermediate_size),
        _ => 2 * c.intermediate_size,
    };
    // Under dropout each module keeps its own dropped input: q, k, v, gate, up read the hidden
    // size, o the attention output, down the intermediate activations.
    let lora = 7 * rank + if dropout { 5 * h + qd + c.intermediate_size } else { 0 };
    4 * tokens * (attention + mlp + lora)
}

/// `dy · W` for a weight as stored (`[out, in]`), through a transposed f32 copy made for the
/// call: for weights without a prepared transpose (MoE experts, the router).
fn times_weight(ctx: Ctx, dy: &[f32], m: usize, w: &qwick_model::safetensors::Tensor) -> Vec<f32> {
    let (out, inp) = (w.shape[0], w.shape[1]);
    let wt = transpose(&w.to_f32(), out, inp);
    let mut dx = vec![0f32; m * inp];
    matmul(ctx, dy, m, &WeightView::from_f32(&wt, inp, out), &mut dx);
    dx
}

/// A keyed hash to a uniform float in [0, 1) (splitmix64), for dropout masks.
fn hash_uniform(key: u64, i: u64) -> f32 {
    let mut z = key ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

struct Runner<'a, 'm> {
    ctx: Ctx<'a>,
    f: &'a Frozen<'m>,
    lora: &'a LoraParams,
    s: f32,
    dropout: Dropout,
    /// The sequence's rotary angles and its packed examples' attention.
    rope: &'a Rope,
    shape: AttnShape<'a>,
}

impl Runner<'_, '_> {
    /// `x` with LoRA dropout applied (`None` when off): kept values scaled by `1/(1-p)`.
    fn dropped(&self, l: usize, m: usize, x: &[f32]) -> Option<Vec<f32>> {
        let d = self.dropout;
        if d.p <= 0.0 {
            return None;
        }
        let key = d.key ^ ((l as u64) << 40) ^ ((m as u64) << 56);
        let keep = 1.0 / (1.0 - d.p);
        Some(
            x.iter()
                .enumerate()
                .map(|(i, &v)| if hash_uniform(key, i as u64) < d.p { 0.0 } else { v * keep })
                .collect(),
        )
    }

    /// The normed input of layer `l`'s `modules`, recomputed for their LoRA gradients (empty
    /// when none of them has a pair: nothing reads it).
    fn norm_for(&self, l: usize, modules: &[usize], x: &[f32], norm: &RmsNorm) -> Vec<f32> {
        if modules.iter().any(|&m| self.lora.get(l, m).is_some()) {
            norm.forward(self.ctx, x)
        } else {
            Vec::new()
        }
    }

    /// `silu(g) · u` for rows of `inter`.
    fn swiglu(&self, g: &[f32], u: &[f32], inter: usize) -> Vec<f32> {
        let ctx = self.ctx;
        let mut a = copied(ctx.pool, g);
        par_rows(ctx, g.len() / inter, &mut a, inter, |r, ar| {
            ops::silu_mul(ctx.isa, ar, &u[r.start * inter..r.end * inter])
        });
        a
    }

    /// `y += s · (x·Aᵀ)·Bᵀ` for the pair of `(l, m)` if any; returns what the backward pass
    /// needs (the dropped-out input and `x·Aᵀ`) when `keep`.
    fn lora_forward(&self, l: usize, m: usize, x: &[f32], n: usize, y: &mut [f32], keep: bool) -> LoraSaved {
        let p = self.lora.get(l, m)?;
        let r = self.lora.spec.rank;
        let xd = self.dropped(l, m, x);
        let xin = xd.as_deref().unwrap_or(x);
        let (ctx, s) = (self.ctx, self.s);
        // y += (s·t)·Bᵀ as a sum of r outer products, straight into y.
        let tt = skinny_t(ctx, &p.a, r, xin, n);
        let st: Vec<f32> = tt.iter().map(|v| s * v).collect();
        let bt = transpose(&p.b, p.out, r);
        par_rows(ctx, n, y, p.out, |rows, yr| grad::matmul_tn(ctx.isa, &st, n, &bt, p.out, rows, yr));
        keep.then(|| (xd, transpose(&tt, r, n)))
    }

    /// Backward of one projection `y = x·Wᵀ (+ LoRA)`: returns `dx` and adds the pair's
    /// gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: usize,
        m: usize,
        x: &[f32],
        saved: &LoraSaved,
        dy: &[f32],
        n: usize,
        grads: &mut Grads,
    ) -> Vec<f32> {
        let back = self.f.back(l, m);
        let mut dx = zeros(self.ctx.pool, n * back.inputs());
        back.product(self.ctx, dy, n, &mut dx);
        if let (Some(p), Some((xd, t))) = (self.lora.get(l, m), saved) {
            let slot = self.lora.slot(l, m).expect("pair present");
            let xin = xd.as_deref().unwrap_or(x);
            self.lora_backward(p, xin, t, dy, n, &mut grads[slot], &mut dx, xd.is_some().then_some((l, m)));
        }
        dx
    }

    /// The LoRA part of a projection's backward pass: `dB += s·dyᵀ·t`, `dA += s·(dy·B)ᵀ·x`,
    /// `dx += s·(dy·B)·A` (through the dropout mask when `dropped` names the module).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        p: &Pair,
        xin: &[f32],
        t: &[f32],
        dy: &[f32],
        n: usize,
        g: &mut (Vec<f32>, Vec<f32>),
        dx: &mut [f32],
        dropped: Option<(usize, usize)>,
    ) {
        let (ctx, r, s) = (self.ctx, self.lora.spec.rank, self.s);
        let isa = ctx.isa;
        // e = dy · B  ([n, r]).
        let et = skinny_t(ctx, &transpose(&p.b, p.out, r), r, dy, n);
        let e = transpose(&et, r, n);
        // dB += s · dyᵀ · t, computed transposed (tᵀ · dy: r long rows) over rows of dBᵀ.
        let mut dbt = vec![0f32; r * p.out];
        par_rows(ctx, r, &mut dbt, p.out, |rows, c| grad::matmul_tn(isa, t, r, dy, p.out, rows, c));
        for (o, row) in g.1.chunks_exact_mut(r).enumerate() {
            for (j, gv) in row.iter_mut().enumerate() {
                *gv += s * dbt[j * p.out + o];
            }
        }
        let mut da = vec![0f32; r * p.inp];
        par_rows(ctx, r, &mut da, p.inp, |rows, c| grad::matmul_tn(isa, &e, r, xin, p.inp, rows, c));
        for (gv, v) in g.0.iter_mut().zip(&da) {
            *gv += s * v;
        }
        // dx += (s·e)·A as a sum of r outer products (A is [r, in]).
        let set: Vec<f32> = et.iter().map(|v| s * v).collect();
        let lora_dx = |out: &mut [f32]| {
            par_rows(ctx, n, out, p.inp, |rows, c| grad::matmul_tn(isa, &set, n, &p.a, p.inp, rows, c))
        };
        if let Some((l, m)) = dropped {
            // The mask of the forward pass: dropped inputs pass no gradient, kept ones 1/(1-p).
            let mut dxl = vec![0f32; n * p.inp];
            lora_dx(&mut dxl);
            let ones = vec![1f32; n * p.inp];
            let mask = self.dropped(l, m, &ones).expect("dropout on");
            for ((d, v), mk) in dx.iter_mut().zip(&dxl).zip(&mask) {
                *d += v * mk;
            }
        } else {
            lora_dx(dx);
        }
    }

    /// Layer `l`'s backward pass, from its input `x` and what its forward pass kept: from `dx`
    /// (the gradient of the layer's output) to the gradient of its input, in place; LoRA
    /// gradients added to `grads`.
    fn layer_backward(&self, l: usize, x: &[f32], kept: &Kept, dx: &mut [f32], grads: &mut Grads) {
        let (ctx, layer) = (self.ctx, &self.f.model.layers[l]);
        let h = layer.input_layernorm.weight.len();
        // The MLP block: out = mid + mlp(norm(mid)).
        let dhn2 = self.mlp_backward(l, kept, dx, grads);
        let mut dnorm = zeros(ctx.pool, dx.len());
        norm_backward(ctx, &layer.post_attention_layernorm, &kept.trace.mid, &dhn2, &mut dnorm);
        add(ctx, dx, &dnorm, h);
        // The attention block: mid = x + o(attn(rope(norm(q(hn1))), rope(norm(k(hn1))), v(hn1))).
        let dhn1 = self.attention_backward(l, x, kept, dx, grads);
        norm_backward(ctx, &layer.input_layernorm, x, &dhn1, &mut dnorm);
        add(ctx, dx, &dnorm, h);
    }

    /// Backward of layer `l`'s MLP: the gradient of its (normed) input from that of its output
    /// `dy`.
    fn mlp_backward(&self, l: usize, kept: &Kept, dy: &[f32], grads: &mut Grads) -> Vec<f32> {
        let (ctx, layer) = (self.ctx, &self.f.model.layers[l]);
        let n = dy.len() / layer.input_layernorm.weight.len();
        let (g, u) = match (&kept.trace.mlp, &layer.mlp) {
            (MlpTrace::Dense { g, u }, FeedForward::Dense(_)) => (g, u),
            (MlpTrace::Moe(m), FeedForward::Moe(moe)) => return moe_backward(ctx, moe, m, dy, n),
            _ => unreachable!("a layer's trace comes from that layer's forward pass"),
        };
        let (isa, inter) = (ctx.isa, g.len() / n);
        let a = if self.lora.get(l, DOWN).is_some() { self.swiglu(g, u, inter) } else { Vec::new() };
        let da = self.linear_backward(l, DOWN, &a, &kept.lora[DOWN], dy, n, grads);
        let (mut dg, mut du) = (zeros(ctx.pool, n * inter), zeros(ctx.pool, n * inter));
        {
            let dup = SendPtr::new(&mut du);
            par_rows(ctx, n, &mut dg, inter, |r, dgr| {
                let w = r.start * inter..r.end * inter;
                // SAFETY: the same rows of du as of dg, which this chunk owns.
                let dur = unsafe { dup.slice(w.start, w.len()) };
                grad::silu_mul_backward(isa, &g[w.clone()], &u[w.clone()], &da[w], dgr, dur);
            });
        }
        let hn2 = self.norm_for(l, &[GATE, UP], &kept.trace.mid, &layer.post_attention_layernorm);
        let mut dhn2 = self.linear_backward(l, GATE, &hn2, &kept.lora[GATE], &dg, n, grads);
        let dhu = self.linear_backward(l, UP, &hn2, &kept.lora[UP], &du, n, grads);
        add(ctx, &mut dhn2, &dhu, dhu.len() / n);
        dhn2
    }

    /// Backward of layer `l`'s attention over the normed `x` (the layer's input): the gradient
    /// of its normed input from that of its output `dy`.
    fn attention_backward(&self, l: usize, x: &[f32], kept: &Kept, dy: &[f32], grads: &mut Grads) -> Vec<f32> {
        let (ctx, layer, t, rope, shape) = (self.ctx, &self.f.model.layers[l], &kept.trace, self.rope, &self.shape);
        let (a, n) = (&layer.attn, rope.len());
        let (h, qd, kvd) = (a.o_proj.out_features(), a.q_proj.out_features(), a.k_proj.out_features());
        let datt = self.linear_backward(l, O, &t.att, &kept.lora[O], dy, n, grads);
        let (mut dq, mut dk, mut dv) = (zeros(ctx.pool, n * qd), zeros(ctx.pool, n * kvd), zeros(ctx.pool, n * kvd));
        grad::attention_backward(ctx, shape, &t.q, &t.k, &t.v, &t.att, &t.lse, &datt, &mut dq, &mut dk, &mut dv);
        let dq = head_backward(ctx, &dq, &t.q_pre, &a.q_norm, rope, qd);
        let dk = head_backward(ctx, &dk, &t.k_pre, &a.k_norm, rope, kvd);
        let hn1 = self.norm_for(l, &[Q, K, V], x, &layer.input_layernorm);
        let mut dhn1 = self.linear_backward(l, Q, &hn1, &kept.lora[Q], &dq, n, grads);
        add(ctx, &mut dhn1, &self.linear_backward(l, K, &hn1, &kept.lora[K], &dk, n, grads), h);
        add(ctx, &mut dhn1, &self.linear_backward(l, V, &hn1, &kept.lora[V], &dv, n, grads), h);
        dhn1
    }
}

/// The trainable pairs' updates in the model's forward pass, keeping what their backward pass
/// reads for the layers below `keep_below`.
struct Updates<'r, 'a, 'm> {
    r: &'r Runner<'a, 'm>,
    keep_below: usize,
    /// Per layer, per module.
    saved: Vec<[LoraSaved; 7]>,
}

impl Lora for Updates<'_, '_, '_> {
    fn add(&mut self, _: Ctx, l: usize, p: Role, w: &Linear, x: &[f32], y: &mut [f32]) {
        let m = MODULES.iter().position(|m| m.1 == p).expect("an adaptable projection");
        let keep = l < self.keep_below;
        let kept = self.r.lora_forward(l, m, x, y.len() / w.out_features(), y, keep);
        if keep {
            self.saved[l][m] = kept;
        }
    }
}

/// Backward of a per-head RMSNorm (`norm`) then the rotation over rows of `width`: the
/// gradient of the projection's output `pre` from that of the rotated rows `d`. The rotation's
/// transpose rotates back.
fn head_backward(ctx: Ctx, d: &[f32], pre: &[f32], norm: &RmsNorm, rope: &Rope, width: usize) -> Vec<f32> {
    let n = rope.len();
    let mut out = zeros(ctx.pool, n * width);
    par_rows(ctx, n, &mut out, width, |r, o| {
        let mut row = vec![0f32; width];
        let mut neg = Vec::new();
        for (i, orow) in r.zip(o.chunks_exact_mut(width)) {
            row.copy_from_slice(&d[i * width..(i + 1) * width]);
            let (cos, sin) = rope.at(i);
            neg.clear();
            neg.extend(sin.iter().map(|s| -s));
            ops::rope_inplace(ctx.isa, &mut row, cos, &neg);
            grad::rms_norm_backward(ctx.isa, &pre[i * width..(i + 1) * width], &norm.weight, norm.eps, &row, orow);
        }
    });
    out
}

/// Backward of RMSNorm `norm` over the rows `x`: writes `dx` from `dy`.
fn norm_backward(ctx: Ctx, norm: &RmsNorm, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = norm.weight.len();
    par_rows(ctx, x.len() / h, dx, h, |r, o| {
        let w = r.start * h..r.end * h;
        grad::rms_norm_backward(ctx.isa, &x[w.clone()], &norm.weight, norm.eps, &dy[w], o)
    });
}

/// Backward of the mixture of experts `moe` (its forward pass kept `m`): the gradient of the
/// block's input from that of its output `dout`, through the experts that ran and through the
/// routing weights to the router.
fn moe_backward(ctx: Ctx, moe: &Moe, m: &MoeTrace, dout: &[f32], n: usize) -> Vec<f32> {
    let (router, experts, norm) = (&moe.router, &moe.experts, moe.norm_topk_prob);
    let ne = experts.len();
    let h = router.in_features();
    let mut dx = vec![0f32; n * h];
    // d(loss)/d(routing weight) per (token, expert).
    let mut dw = vec![0f32; n * ne];
    for run in &m.runs {
        let sw = &experts[run.expert];
        let (rows, inter) = (run.tokens.len(), sw.gate_proj.weight.shape[0]);
        let mut dy = vec![0f32; rows * h];
        for (r, &t) in run.tokens.iter().enumerate() {
            let w = m.chosen[t].iter().find(|c| c.0 == run.expert).map_or(0.0, |c| c.1);
            let (d, y) = (&dout[t * h..(t + 1) * h], &run.y[r * h..(r + 1) * h]);
            dw[t * ne + run.expert] = d.iter().zip(y).map(|(a, b)| a * b).sum();
            for (o, &v) in dy[r * h..(r + 1) * h].iter_mut().zip(d) {
                *o = w * v;
            }
        }
        let da = times_weight(ctx, &dy, rows, &sw.down_proj.weight);
        let (mut dg, mut du) = (vec![0f32; rows * inter], vec![0f32; rows * inter]);
        grad::silu_mul_backward(ctx.isa, &run.g, &run.u, &da, &mut dg, &mut du);
        let mut dxe = times_weight(ctx, &dg, rows, &sw.gate_proj.weight);
        for (a, b) in dxe.iter_mut().zip(times_weight(ctx, &du, rows, &sw.up_proj.weight)) {
            *a += b;
        }
        for (r, &t) in run.tokens.iter().enumerate() {
            for (o, &v) in dx[t * h..(t + 1) * h].iter_mut().zip(&dxe[r * h..(r + 1) * h]) {
                *o += v;
            }
        }
    }
    // Through the weights to the probabilities (renormalised over the chosen ones or not),
    // then through the softmax to the router's logits.
    let mut dlogits = vec![0f32; n * ne];
    for t in 0..n {
        let p = &m.probs[t * ne..(t + 1) * ne];
        let mut dp = vec![0f32; ne];
        let c = &m.chosen[t];
        if norm {
            let s: f32 = c.iter().map(|&(e, _)| p[e]).sum();
            let mean: f32 = c.iter().map(|&(e, w)| dw[t * ne + e] * w).sum();
            for &(e, _) in c {
                dp[e] = (dw[t * ne + e] - mean) / s;
            }
        } else {
            for &(e, _) in c {
                dp[e] = dw[t * ne + e];
            }
        }
        let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
        for j in 0..ne {
            dlogits[t * ne + j] = p[j] * (dp[j] - dot);
        }
    }
    for (a, b) in dx.iter_mut().zip(times_weight(ctx, &dlogits, n, &router.weight)) {
        *a += b;
    }
    dx
}

/// `(x · wᵀ)ᵀ` (`[r, n]`) for a few-row `w` (`[r, k]`, a LoRA matrix) and many-row `x`
/// (`[n, k]`): computed as `w · xᵀ`, `x` as the weight, streamed once for all `r` rows.
fn skinny_t(ctx: Ctx, w: &[f32], r: usize, x: &[f32], n: usize) -> Vec<f32> {
    let k = w.len() / r;
    let mut tt = vec![0f32; r * n];
    matmul(ctx, w, r, &WeightView::from_f32(&x[..n * k], n, k), &mut tt);
    tt
}

/// `x += y`, in parallel over rows of `width`.
fn add(ctx: Ctx, x: &mut [f32], y: &[f32], width: usize) {
    let n = x.len() / width;
    par_rows(ctx, n, x, width, |r, xr| ops::add_inplace(ctx.isa, xr, &y[r.start * width..r.end * width]));
}

/// Rows of logits computed at once by the loss.
const LOSS_ROWS: usize = 256;

/// The loss of `seq`: `scale ·` the sum of cross-entropies over its labelled tokens. With
/// `grads`, also adds the gradients of that (scaled) loss with respect to the LoRA pairs.
/// Returns the unscaled sum of token losses.
pub fn loss(
    ctx: Ctx,
    f: &Frozen,
    lora: &LoraParams,
    seq: &Sequence,
    scale: f32,
    dropout: Dropout,
    grads: Option<&mut Grads>,
) -> f64 {
    let model = f.model;
    let c = &model.config;
    let (n, h, vocab, layers) = (seq.len(), c.hidden_size, c.vocab_size, model.layers.len());
    let rope = model.rope(&seq.positions);
    let shape = packed_attention(c, &seq.start);
    let r = Runner {
        ctx,
        f,
        lora,
        s: lora.spec.scaling(),
        dropout: if grads.is_some() { dropout } else { Dropout { p: 0.0, key: 0 } },
        rope: &rope,
        shape,
    };
    let mut keys = Keys::Packed(shape);
    let keep = grads.is_some();
    // The model's forward pass, traced for the backward pass: each layer's input, all
    // activations of the first `kept_layers` and the attention of the others (whose other
    // activations are recomputed from their input, without attending again).
    let mut trace = keep.then(|| Trace { full_layers: f.kept_layers, layers: Vec::with_capacity(layers) });
    let mut updates = Updates {
        r: &r,
        keep_below: if keep { f.kept_layers } else { 0 },
        saved: (0..layers).map(|_| Default::default()).collect(),
    };
    let mut x = model.embed(&seq.tokens);
    model.forward_layers(&mut x, &mut Pass { ctx, rope: &rope, keys: &mut keys, lora: &mut updates }, trace.as_mut());
    let hn = model.norm.forward(ctx, &x);
    // The loss, a few labelled rows at a time.
    let rows: Vec<(usize, u32)> = seq.labels.iter().enumerate().filter_map(|(i, l)| l.map(|y| (i, y))).collect();
    let mut dhn = vec![0f32; if keep { n * h } else { 0 }];
    let mut total = 0f64;
    let mut sel = vec![0f32; LOSS_ROWS * h];
    let mut logits = zeros(ctx.pool, LOSS_ROWS * vocab);
    let mut dsel = vec![0f32; LOSS_ROWS * h];
    for chunk in rows.chunks(LOSS_ROWS) {
        let m = chunk.len();
        for (o, &(i, _)) in chunk.iter().enumerate() {
            sel[o * h..(o + 1) * h].copy_from_slice(&hn[i * h..(i + 1) * h]);
        }
        model.lm_head.forward(ctx, &sel[..m * h], m, &mut logits[..m * vocab]);
        let labels: Vec<u32> = chunk.iter().map(|&(_, y)| y).collect();
        let lp = SendPtr::new(&mut logits[..m * vocab]);
        let sums = std::sync::Mutex::new(0f64);
        ctx.pool.for_chunks(m, 1, &|rr| {
            // SAFETY: each chunk of rows owns its rows of the logits.
            let part = unsafe { lp.slice(rr.start * vocab, rr.len() * vocab) };
            let s = grad::cross_entropy(ctx.isa, part, vocab, &labels[rr], scale);
            *sums.lock().unwrap_or_else(|e| e.into_inner()) += s;
        });
        total += sums.into_inner().unwrap_or_else(|e| e.into_inner());
        if keep {
            f.head.product(ctx, &logits[..m * vocab], m, &mut dsel[..m * h]);
            for (o, &(i, _)) in chunk.iter().enumerate() {
                dhn[i * h..(i + 1) * h].copy_from_slice(&dsel[o * h..(o + 1) * h]);
            }
        }
    }
    let (Some(grads), Some(mut trace)) = (grads, trace) else { return total };
    let mut dx = zeros(ctx.pool, n * h);
    norm_backward(ctx, &model.norm, &x, &dhn, &mut dx);
    drop(hn);
    updates.keep_below = layers;
    for l in (0..layers).rev() {
        let (input, mut kept) = trace.layers.pop().expect("a trace per layer");
        if l >= f.kept_layers {
            // The layer's activations again from its input, reusing its attention.
            let mut pass = Pass { ctx, rope: &rope, keys: &mut keys, lora: &mut updates };
            model.layers[l].forward(l, &mut copied(ctx.pool, &input), &mut pass, Some(&mut kept));
        }
        let kept = Kept { trace: kept, lora: std::mem::take(&mut updates.saved[l]) };
        r.layer_backward(l, &input, &kept, &mut dx, grads);
    }
    total
}
