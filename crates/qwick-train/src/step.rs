//! One training step's arithmetic: the Qwen3 forward pass over a packed sequence with LoRA
//! updates on the targeted projections, the loss (cross-entropy over the labelled rows, a few
//! rows of logits at a time so the `[tokens, vocab]` matrix never exists whole), and the
//! backward pass to the LoRA matrices.
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
use qwick_backend::{copied, matmul, matmul_batch, ops, par_rows, zeros, Ctx, Format, MatmulJob, WeightView};
use qwick_model::linear::Linear;
use qwick_model::qwen3::{FeedForward, Mlp, Moe};
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

/// The activations of one layer that its backward pass reads.
struct Acts {
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    x2: Vec<f32>,
    mlp: MlpActs,
    /// Per module: the dropped-out input of the LoRA path (when dropout is on) and `x·Aᵀ`.
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

/// What an MLP block's backward pass reads.
enum MlpActs {
    /// Gate and up projections (`silu(gate)·up` is recomputed).
    Dense {
        g: Vec<f32>,
        u: Vec<f32>,
    },
    Moe(MoeActs),
}

/// A mixture-of-experts block's forward state.
struct MoeActs {
    /// Router probabilities, `[n, experts]`.
    probs: Vec<f32>,
    /// Per token, its chosen experts and their weights.
    chosen: Vec<Vec<(usize, f32)>>,
    /// The experts that ran.
    runs: Vec<ExpertRun>,
}

struct ExpertRun {
    expert: usize,
    tokens: Vec<usize>,
    g: Vec<f32>,
    u: Vec<f32>,
    y: Vec<f32>,
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

    /// RMSNorm of the rows of `x` with weight `w`.
    fn norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (ctx, h, eps) = (self.ctx, w.len(), self.f.model.config.rms_norm_eps);
        let mut out = zeros(ctx.pool, x.len());
        par_rows(ctx, x.len() / h, &mut out, h, |r, o| ops::rms_norm(ctx.isa, &x[r.start * h..r.end * h], w, eps, o));
        out
    }

    /// The normed input of layer `l`'s `modules`, recomputed for their LoRA gradients (empty
    /// when none of them has a pair: nothing reads it).
    fn norm_for(&self, l: usize, modules: &[usize], x: &[f32], w: &[f32]) -> Vec<f32> {
        if modules.iter().any(|&m| self.lora.get(l, m).is_some()) {
            self.norm(x, w)
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
    /// needs (the dropped-out input and `x·Aᵀ`).
    fn lora_forward(&self, l: usize, m: usize, x: &[f32], n: usize, y: &mut [f32]) -> LoraSaved {
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
        Some((xd, transpose(&tt, r, n)))
    }

    /// The layer's forward pass from its input `x`, keeping its activations; returns them and
    /// leaves the layer's output in `x`.
    /// `attn`: the attention output and log-sum-exps of an earlier pass over the same input
    /// (the recomputation in the backward pass reuses them instead of attending again).
    fn layer_forward(
        &self,
        l: usize,
        x: &mut [f32],
        seq: &Sequence,
        cos: &[f32],
        sin: &[f32],
        attn: Option<(Vec<f32>, Vec<f32>)>,
    ) -> Acts {
        let (ctx, model) = (self.ctx, self.f.model);
        let c = &model.config;
        let n = seq.len();
        let (h, qd, kvd, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let (isa, eps) = (ctx.isa, c.rms_norm_eps);
        let layer = &model.layers[l];
        let a = &layer.attn;
        let hn1 = self.norm(x, &layer.input_layernorm.weight);
        let (mut q_pre, mut k_pre, mut v) =
            (zeros(ctx.pool, n * qd), zeros(ctx.pool, n * kvd), zeros(ctx.pool, n * kvd));
        matmul_batch(
            ctx,
            &[
                MatmulJob::new(&hn1, n, a.q_proj.view(), &mut q_pre),
                MatmulJob::new(&hn1, n, a.k_proj.view(), &mut k_pre),
                MatmulJob::new(&hn1, n, a.v_proj.view(), &mut v),
            ],
        );
        let mut lora: [LoraSaved; 7] = Default::default();
        lora[Q] = self.lora_forward(l, Q, &hn1, n, &mut q_pre);
        lora[K] = self.lora_forward(l, K, &hn1, n, &mut k_pre);
        lora[V] = self.lora_forward(l, V, &hn1, n, &mut v);
        let (mut q, mut k) = (copied(ctx.pool, &q_pre), copied(ctx.pool, &k_pre));
        let half = hd / 2;
        par_rows(ctx, n, &mut q, qd, |r, qr| {
            for (i, row) in r.clone().zip(qr.chunks_exact_mut(qd)) {
                ops::rms_norm_inplace(isa, row, &a.q_norm.weight, eps);
                ops::rope_inplace(isa, row, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            }
        });
        par_rows(ctx, n, &mut k, kvd, |r, kr| {
            for (i, row) in r.clone().zip(kr.chunks_exact_mut(kvd)) {
                ops::rms_norm_inplace(isa, row, &a.k_norm.weight, eps);
                ops::rope_inplace(isa, row, &cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            }
        });
        let shape = attn_shape(c, seq);
        let (att, lse) = attn.unwrap_or_else(|| {
            let mut att = zeros(ctx.pool, n * qd);
            let mut lse = vec![0f32; n * c.num_attention_heads];
            grad::attention_forward(ctx, &shape, &q, &k, &v, &mut att, &mut lse);
            (att, lse)
        });
        let mut tmp = zeros(ctx.pool, n * h);
        matmul(ctx, &att, n, &a.o_proj.view(), &mut tmp);
        lora[O] = self.lora_forward(l, O, &att, n, &mut tmp);
        par_rows(ctx, n, x, h, |r, xo| ops::add_inplace(isa, xo, &tmp[r.start * h..r.end * h]));
        let x2 = copied(ctx.pool, x);
        let hn2 = self.norm(&x2, &layer.post_attention_layernorm.weight);
        let mlp = match &layer.mlp {
            FeedForward::Dense(sw) => {
                let (gp, up, dp) = (&sw.gate_proj, &sw.up_proj, &sw.down_proj);
                let inter = gp.weight.shape[0];
                let (mut g, mut u) = (zeros(ctx.pool, n * inter), zeros(ctx.pool, n * inter));
                matmul_batch(
                    ctx,
                    &[MatmulJob::new(&hn2, n, gp.view(), &mut g), MatmulJob::new(&hn2, n, up.view(), &mut u)],
                );
                lora[GATE] = self.lora_forward(l, GATE, &hn2, n, &mut g);
                lora[UP] = self.lora_forward(l, UP, &hn2, n, &mut u);
                let act = self.swiglu(&g, &u, inter);
                matmul(ctx, &act, n, &dp.view(), &mut tmp);
                lora[DOWN] = self.lora_forward(l, DOWN, &act, n, &mut tmp);
                MlpActs::Dense { g, u }
            }
            FeedForward::Moe(Moe { router, experts, top_k, norm_topk_prob }) => {
                let m = moe_forward(ctx, router, experts, *top_k, *norm_topk_prob, &hn2, n, &mut tmp);
                MlpActs::Moe(m)
            }
        };
        par_rows(ctx, n, x, h, |r, xo| ops::add_inplace(isa, xo, &tmp[r.start * h..r.end * h]));
        Acts { q_pre, k_pre, q, k, v, att, lse, x2, mlp, lora }
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

    /// The layer's backward pass: from `dx` (gradient of the layer's output) to the gradient
    /// of its input, in place; LoRA gradients added to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x: &[f32],
        acts: &Acts,
        seq: &Sequence,
        cos: &[f32],
        sin: &[f32],
        dx: &mut [f32],
        grads: &mut Grads,
    ) {
        let (ctx, model) = (self.ctx, self.f.model);
        let c = &model.config;
        let n = seq.len();
        let (h, qd, kvd, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let (isa, eps) = (ctx.isa, c.rms_norm_eps);
        let layer = &model.layers[l];
        let dhn2 = match &acts.mlp {
            MlpActs::Dense { g, u } => {
                let inter = g.len() / n;
                let a = if self.lora.get(l, DOWN).is_some() { self.swiglu(g, u, inter) } else { Vec::new() };
                let da = self.linear_backward(l, DOWN, &a, &acts.lora[DOWN], dx, n, grads);
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
                let hn2 = self.norm_for(l, &[GATE, UP], &acts.x2, &layer.post_attention_layernorm.weight);
                let mut dhn2 = self.linear_backward(l, GATE, &hn2, &acts.lora[GATE], &dg, n, grads);
                let dhu = self.linear_backward(l, UP, &hn2, &acts.lora[UP], &du, n, grads);
                add(ctx, &mut dhn2, &dhu, h);
                dhn2
            }
            MlpActs::Moe(m) => match &layer.mlp {
                FeedForward::Moe(Moe { router, experts, norm_topk_prob, .. }) => {
                    moe_backward(ctx, router, experts, *norm_topk_prob, m, dx, n)
                }
                FeedForward::Dense(_) => unreachable!("MoE activations come from a MoE layer"),
            },
        };
        let mut dnorm = zeros(ctx.pool, n * h);
        par_rows(ctx, n, &mut dnorm, h, |r, o| {
            let w = r.start * h..r.end * h;
            grad::rms_norm_backward(isa, &acts.x2[w.clone()], &layer.post_attention_layernorm.weight, eps, &dhn2[w], o)
        });
        add(ctx, dx, &dnorm, h);

        // Attention: x2 = x + o(attn(rope(norm(q(hn1))), rope(norm(k(hn1))), v(hn1))).
        let datt = self.linear_backward(l, O, &acts.att, &acts.lora[O], dx, n, grads);
        let shape = attn_shape(c, seq);
        let (mut dq, mut dk, mut dv) = (zeros(ctx.pool, n * qd), zeros(ctx.pool, n * kvd), zeros(ctx.pool, n * kvd));
        grad::attention_backward(
            ctx, &shape, &acts.q, &acts.k, &acts.v, &acts.att, &acts.lse, &datt, &mut dq, &mut dk, &mut dv,
        );
        // Through RoPE (its transpose: rotate back) and the per-head norms.
        let half = hd / 2;
        let a = &layer.attn;
        let head_back = |d: &mut [f32], pre: &[f32], w: &[f32], width: usize| {
            let mut out = zeros(ctx.pool, n * width);
            par_rows(ctx, n, &mut out, width, |r, o| {
                let mut row = vec![0f32; width];
                let mut neg = vec![0f32; half];
                for (i, orow) in r.clone().zip(o.chunks_exact_mut(width)) {
                    row.copy_from_slice(&d[i * width..(i + 1) * width]);
                    for (nv, sv) in neg.iter_mut().zip(&sin[i * half..(i + 1) * half]) {
                        *nv = -sv;
                    }
                    ops::rope_inplace(isa, &mut row, &cos[i * half..(i + 1) * half], &neg);
                    grad::rms_norm_backward(isa, &pre[i * width..(i + 1) * width], w, eps, &row, orow);
                }
            });
            d.copy_from_slice(&out);
        };
        head_back(&mut dq, &acts.q_pre, &a.q_norm.weight, qd);
        head_back(&mut dk, &acts.k_pre, &a.k_norm.weight, kvd);
        let hn1 = self.norm_for(l, &[Q, K, V], x, &layer.input_layernorm.weight);
        let mut dhn1 = self.linear_backward(l, Q, &hn1, &acts.lora[Q], &dq, n, grads);
        add(ctx, &mut dhn1, &self.linear_backward(l, K, &hn1, &acts.lora[K], &dk, n, grads), h);
        add(ctx, &mut dhn1, &self.linear_backward(l, V, &hn1, &acts.lora[V], &dv, n, grads), h);
        par_rows(ctx, n, &mut dnorm, h, |r, o| {
            let w = r.start * h..r.end * h;
            grad::rms_norm_backward(isa, &x[w.clone()], &layer.input_layernorm.weight, eps, &dhn1[w], o)
        });
        add(ctx, dx, &dnorm, h);
    }
}

/// The sparse MoE block's forward pass as the model's (softmax router, top-k by probability
/// with ties to the lower index, renormalised when `norm`), keeping what the backward pass
/// reads; writes the block's output into `out`.
#[allow(clippy::too_many_arguments)]
fn moe_forward(
    ctx: Ctx,
    router: &Linear,
    experts: &[Mlp],
    top_k: usize,
    norm: bool,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> MoeActs {
    let ne = experts.len();
    let h = router.weight.shape[1];
    let mut probs = vec![0f32; n * ne];
    matmul(ctx, x, n, &router.view(), &mut probs);
    let chosen = qwick_model::qwen3::route(&mut probs, ne, top_k, norm);
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
    for (t, c) in chosen.iter().enumerate() {
        for &(e, w) in c {
            routed[e].push((t, w));
        }
    }
    out[..n * h].fill(0.0);
    let mut runs = Vec::new();
    for (e, rows) in routed.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
        let sw = &experts[e];
        let (m, inter) = (rows.len(), sw.gate_proj.weight.shape[0]);
        let xs: Vec<f32> = rows.iter().flat_map(|&(t, _)| x[t * h..(t + 1) * h].iter().copied()).collect();
        let (mut g, mut u) = (vec![0f32; m * inter], vec![0f32; m * inter]);
        matmul_batch(
            ctx,
            &[MatmulJob::new(&xs, m, sw.gate_proj.view(), &mut g), MatmulJob::new(&xs, m, sw.up_proj.view(), &mut u)],
        );
        let mut a = g.clone();
        ops::silu_mul(ctx.isa, &mut a, &u);
        let mut y = vec![0f32; m * h];
        matmul(ctx, &a, m, &sw.down_proj.view(), &mut y);
        for (r, &(t, w)) in rows.iter().enumerate() {
            for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[r * h..(r + 1) * h]) {
                *o += w * v;
            }
        }
        runs.push(ExpertRun { expert: e, tokens: rows.iter().map(|&(t, _)| t).collect(), g, u, y });
    }
    MoeActs { probs, chosen, runs }
}

/// Backward of [`moe_forward`]: the gradient of the block's input from that of its output
/// `dout`, through the experts that ran and through the routing weights to the router.
fn moe_backward(
    ctx: Ctx,
    router: &Linear,
    experts: &[Mlp],
    norm: bool,
    m: &MoeActs,
    dout: &[f32],
    n: usize,
) -> Vec<f32> {
    let ne = experts.len();
    let h = router.weight.shape[1];
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

/// The attention of a packed sequence: each token sees its example up to itself.
fn attn_shape<'a>(c: &qwick_model::Config, seq: &'a Sequence) -> AttnShape<'a> {
    AttnShape {
        n_heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        start: &seq.start,
    }
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

/// What the forward pass leaves a layer's backward pass.
enum Saved {
    /// Every activation (a kept layer).
    All(Box<Acts>),
    /// The attention output and log-sum-exps; the rest is recomputed from the layer's input.
    Attention(Vec<f32>, Vec<f32>),
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
    let r = Runner {
        ctx,
        f,
        lora,
        s: lora.spec.scaling(),
        dropout: if grads.is_some() { dropout } else { Dropout { p: 0.0, key: 0 } },
    };
    let model = f.model;
    let c = &model.config;
    let (n, h, vocab) = (seq.len(), c.hidden_size, c.vocab_size);
    let rope = model.rope(&seq.positions);
    let cos: Vec<f32> = (0..rope.len()).flat_map(|i| rope.at(i).0).copied().collect();
    let sin: Vec<f32> = (0..rope.len()).flat_map(|i| rope.at(i).1).copied().collect();
    let mut x = model.embed(&seq.tokens);
    let keep = grads.is_some();
    // Kept for the backward pass: each layer's input, and its attention output (the
    // recomputation repeats the projections but not the attention).
    let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(if keep { model.layers.len() } else { 0 });
    let mut saved: Vec<Option<Saved>> = Vec::new();
    for l in 0..model.layers.len() {
        if keep {
            inputs.push(copied(ctx.pool, &x));
        }
        let acts = r.layer_forward(l, &mut x, seq, &cos, &sin, None);
        if keep {
            saved.push(Some(if l < f.kept_layers {
                Saved::All(Box::new(acts))
            } else {
                Saved::Attention(acts.att, acts.lse)
            }));
        }
    }
    let mut hn = zeros(ctx.pool, n * h);
    par_rows(ctx, n, &mut hn, h, |rr, o| {
        ops::rms_norm(ctx.isa, &x[rr.start * h..rr.end * h], &model.norm.weight, c.rms_norm_eps, o)
    });
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
        matmul(ctx, &sel[..m * h], m, &model.lm_head.view(), &mut logits[..m * vocab]);
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
    let Some(grads) = grads else { return total };
    let mut dx = zeros(ctx.pool, n * h);
    par_rows(ctx, n, &mut dx, h, |rr, o| {
        let w = rr.start * h..rr.end * h;
        grad::rms_norm_backward(ctx.isa, &x[w.clone()], &model.norm.weight, c.rms_norm_eps, &dhn[w], o)
    });
    drop(hn);
    for l in (0..model.layers.len()).rev() {
        let acts = match saved[l].take().expect("saved once, used once") {
            Saved::All(acts) => *acts,
            Saved::Attention(att, lse) => {
                r.layer_forward(l, &mut copied(ctx.pool, &inputs[l]), seq, &cos, &sin, Some((att, lse)))
            }
        };
        r.layer_backward(l, &inputs[l], &acts, seq, &cos, &sin, &mut dx, grads);
        inputs[l] = Vec::new();
    }
    total
}
