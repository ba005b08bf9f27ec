//! Qwen3 and Qwen3-MoE, as transformers' `modeling_qwen3.py` / `modeling_qwen3_moe.py` define
//! them: pre-norm decoder layers of GQA attention (per-head RMSNorm on q and k before RoPE)
//! and a SwiGLU MLP or a top-k mixture of SwiGLU experts, then a final norm and the head.
//!
//! One forward pass serves inference and training: [`Keys`] says whether tokens attend through
//! a paged KV cache or within packed examples, a [`Lora`] adds the low-rank updates of the
//! projections, and a [`Trace`] keeps what a backward pass reads. How the weights are stored
//! and loaded is [`crate::weights`]' business, the cache's layout [`crate::kv`]'s.

use crate::batch::Batch;
use crate::config::Config;
use crate::kv::KvCache;
use crate::linear::{forward_all, Linear};
use crate::names::Role;
use crate::safetensors::Tensor;
use anyhow::{bail, Context, Result};
use qwick_backend::attention::{paged_attention, AttnArgs};
use qwick_backend::grad::{attention_forward, AttnShape};
use qwick_backend::{copied, ops, par_rows, Ctx};

/// RMSNorm over rows of `weight.len()` values.
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    /// Each row of `x`, normalised and scaled by the weight.
    pub fn forward(&self, ctx: Ctx, x: &[f32]) -> Vec<f32> {
        let w = self.weight.len();
        let mut out = vec![0f32; x.len()];
        par_rows(ctx, x.len() / w, &mut out, w, |r, o| {
            ops::rms_norm(ctx.isa, &x[r.start * w..r.end * w], &self.weight, self.eps, o)
        });
        out
    }

    /// Each row of `x`, in place (the rows of `width` values are split among the threads).
    fn forward_inplace(&self, ctx: Ctx, x: &mut [f32], width: usize) {
        par_rows(ctx, x.len() / width, x, width, |_, rows| {
            ops::rms_norm_inplace(ctx.isa, rows, &self.weight, self.eps)
        });
    }
}

/// cos and sin of each token's rotary angles (`[tokens, head_dim / 2]` each), f32 as
/// transformers computes them.
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    /// cos and sin of token `i`'s angles.
    pub fn at(&self, i: usize) -> (&[f32], &[f32]) {
        let r = i * self.half..(i + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }

    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.cos.len() / self.half
    }

    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    /// Rotates every head of each `width`-wide row of `x` (token `i` at row `i`) by its angles.
    pub fn rotate(&self, ctx: Ctx, x: &mut [f32], width: usize) {
        par_rows(ctx, self.len(), x, width, |r, rows| {
            for (i, row) in r.zip(rows.chunks_exact_mut(width)) {
                let (cos, sin) = self.at(i);
                ops::rope_inplace(ctx.isa, row, cos, sin);
            }
        });
    }
}

/// Which keys and values the tokens attend to, and where theirs go.
pub enum Keys<'a> {
    /// A paged KV cache: the tokens' K and V are written to their `slots`, and each token
    /// attends to its sequence's cached ones up to its position.
    Cache { kv: &'a mut KvCache, slots: &'a [u32], args: AttnArgs<'a> },
    /// Packed examples and no cache (training): each token attends to its example's tokens up
    /// to itself, and the log-sum-exps of its scores are kept.
    Packed(AttnShape<'a>),
}

impl Keys<'_> {
    /// Layer `l`'s attention of the queries `q` to the keys `k` and values `v` (after storing
    /// them in the cache): the output, and with packed examples the log-sum-exps (else empty).
    fn attend(&mut self, ctx: Ctx, l: usize, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; q.len()];
        match self {
            Keys::Cache { kv, slots, args } => {
                kv.write(ctx, l, k, v, slots);
                paged_attention(ctx, q, kv.layer(l), args, &mut out);
                (out, Vec::new())
            }
            Keys::Packed(shape) => {
                let mut lse = vec![0f32; shape.start.len() * shape.n_heads];
                attention_forward(ctx, shape, q, k, v, &mut out, &mut lse);
                (out, lse)
            }
        }
    }
}

/// The attention of packed examples for a model of `c`: `start[i]` is the first token of token
/// `i`'s example.
pub fn packed_attention<'a>(c: &Config, start: &'a [u32]) -> AttnShape<'a> {
    AttnShape {
        n_heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        start,
    }
}

/// Low-rank updates of the projections' outputs.
pub trait Lora {
    /// Adds layer `l`'s update of its projection `p` (weight `w`) for the input rows `x` to `y`.
    fn add(&mut self, ctx: Ctx, l: usize, p: Role, w: &Linear, x: &[f32], y: &mut [f32]);
}

/// The adapters attached to the model's weights ([`Qwen3::add_adapter`]): `rows[i]` is token
/// `i`'s (0: none; empty when the model has none).
pub struct Attached<'a> {
    pub rows: &'a [u16],
}

impl Lora for Attached<'_> {
    fn add(&mut self, ctx: Ctx, _: usize, _: Role, w: &Linear, x: &[f32], y: &mut [f32]) {
        w.add_lora(ctx, x, y.len() / w.out_features(), y, self.rows);
    }
}

/// What a forward pass runs in: the kernels' context, the tokens' rotary angles, the keys they
/// attend to, and the projections' LoRA updates.
pub struct Pass<'p, 'k> {
    pub ctx: Ctx<'p>,
    pub rope: &'p Rope,
    pub keys: &'p mut Keys<'k>,
    pub lora: &'p mut dyn Lora,
}

impl Pass<'_, '_> {
    /// `y = x · Wᵀ` for each projection of layer `l` reading the rows `x` (one batch of
    /// products), then each one's LoRA update.
    fn project(&mut self, l: usize, x: &[f32], outs: &mut [(Role, &Linear, &mut [f32])]) {
        let n = self.rope.len();
        forward_all(self.ctx, outs.iter_mut().map(|(_, w, y)| (x, n, *w, &mut **y)).collect());
        for (p, w, y) in outs.iter_mut() {
            self.lora.add(self.ctx, l, *p, w, x, y);
        }
    }
}

/// What a layer's forward pass keeps for its backward pass.
#[derive(Default)]
pub struct LayerTrace {
    /// q and k as projected, before their norms and the rotation.
    pub q_pre: Vec<f32>,
    pub k_pre: Vec<f32>,
    /// q, k and v as attended.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The attention's output (o_proj's input) and each (token, head)'s log-sum-exp.
    pub att: Vec<f32>,
    pub lse: Vec<f32>,
    /// The residual stream between the attention and the MLP.
    pub mid: Vec<f32>,
    pub mlp: MlpTrace,
}

impl LayerTrace {
    /// The attention's output and log-sum-exps only: a forward pass given such a trace reuses
    /// them instead of attending again, and fills in the rest (recomputing a layer).
    pub fn attention_only(self) -> LayerTrace {
        LayerTrace { att: self.att, lse: self.lse, ..LayerTrace::default() }
    }
}

/// What an MLP's forward pass keeps.
#[derive(Default)]
pub enum MlpTrace {
    #[default]
    None,
    /// The gate and up projections (`silu(g) · u` is recomputed).
    Dense {
        g: Vec<f32>,
        u: Vec<f32>,
    },
    Moe(MoeTrace),
}

/// What a mixture of experts' forward pass keeps.
pub struct MoeTrace {
    /// Router probabilities, `[tokens, experts]`.
    pub probs: Vec<f32>,
    /// Per token, its chosen experts and their weights.
    pub chosen: Vec<Vec<(usize, f32)>>,
    /// The experts that ran.
    pub runs: Vec<ExpertRun>,
}

/// One expert's run over the tokens routed to it: its gate and up projections and its output.
pub struct ExpertRun {
    pub expert: usize,
    pub tokens: Vec<usize>,
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    pub y: Vec<f32>,
}

/// What a traced forward pass keeps, layer by layer, for the backward pass.
#[derive(Default)]
pub struct Trace {
    /// Layers below this keep every activation; the others their attention's output and
    /// log-sum-exps only ([`LayerTrace::attention_only`]).
    pub full_layers: usize,
    /// Per layer, in order: its input and what it kept.
    pub layers: Vec<(Vec<f32>, LayerTrace)>,
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
}

impl Attention {
    /// Layer `l`'s self-attention over the normed hidden states `x`: o_proj's output.
    pub fn forward(&self, l: usize, x: &[f32], pass: &mut Pass, mut trace: Option<&mut LayerTrace>) -> Vec<f32> {
        let (ctx, n) = (pass.ctx, pass.rope.len());
        let (qd, kvd) = (self.q_proj.out_features(), self.k_proj.out_features());
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        pass.project(
            l,
            x,
            &mut [(Role::Q, &self.q_proj, &mut q), (Role::K, &self.k_proj, &mut k), (Role::V, &self.v_proj, &mut v)],
        );
        let pre = trace.is_some().then(|| (copied(ctx.pool, &q), copied(ctx.pool, &k)));
        self.q_norm.forward_inplace(ctx, &mut q, qd);
        self.k_norm.forward_inplace(ctx, &mut k, kvd);
        pass.rope.rotate(ctx, &mut q, qd);
        pass.rope.rotate(ctx, &mut k, kvd);
        let (att, lse) = match trace.as_deref_mut() {
            Some(LayerTrace { att, lse, .. }) if !lse.is_empty() => (std::mem::take(att), std::mem::take(lse)),
            _ => pass.keys.attend(ctx, l, &q, &k, &v),
        };
        let mut out = vec![0f32; n * self.o_proj.out_features()];
        pass.project(l, &att, &mut [(Role::O, &self.o_proj, &mut out)]);
        if let (Some(t), Some((q_pre, k_pre))) = (trace, pre) {
            *t = LayerTrace { q_pre, k_pre, q, k, v, att, lse, ..LayerTrace::default() };
        }
        out
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// Layer `l`'s MLP over the normed hidden states `x`.
    pub fn forward(&self, l: usize, x: &[f32], pass: &mut Pass, trace: Option<&mut MlpTrace>) -> Vec<f32> {
        let (ctx, n, inter) = (pass.ctx, pass.rope.len(), self.gate_proj.out_features());
        let (mut g, mut u) = (vec![0f32; n * inter], vec![0f32; n * inter]);
        pass.project(l, x, &mut [(Role::Gate, &self.gate_proj, &mut g), (Role::Up, &self.up_proj, &mut u)]);
        let gate = trace.is_some().then(|| copied(ctx.pool, &g));
        par_rows(ctx, n, &mut g, inter, |r, gr| ops::silu_mul(ctx.isa, gr, &u[r.start * inter..r.end * inter]));
        let mut out = vec![0f32; n * self.down_proj.out_features()];
        pass.project(l, &g, &mut [(Role::Down, &self.down_proj, &mut out)]);
        if let (Some(t), Some(g)) = (trace, gate) {
            *t = MlpTrace::Dense { g, u };
        }
        out
    }
}

/// The sparse MoE block: a softmax router over all experts, the top k (renormalised when
/// `norm_topk_prob`), each chosen expert run once over the tokens routed to it, the results
/// added with their routing weights. Experts nobody chose are never read. No shared expert in
/// Qwen3, and no LoRA on the experts.
pub struct Moe {
    /// `mlp.gate`.
    pub router: Linear,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl Moe {
    /// The block over the `n` normed hidden states `x`.
    pub fn forward(&self, ctx: Ctx, x: &[f32], n: usize, trace: Option<&mut MlpTrace>) -> Vec<f32> {
        let (ne, h) = (self.experts.len(), self.router.in_features());
        let mut probs = vec![0f32; n * ne];
        self.router.forward(ctx, x, n, &mut probs);
        let chosen = route(&mut probs, ne, self.top_k, self.norm_topk_prob);
        // Per expert: (token, weight) of the tokens routed to it.
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, c) in chosen.iter().enumerate() {
            for &(e, w) in c {
                routed[e].push((t, w));
            }
        }
        let active: Vec<usize> = (0..ne).filter(|&e| !routed[e].is_empty()).collect();
        let inter = self.experts[0].gate_proj.out_features();
        let xs: Vec<Vec<f32>> = active
            .iter()
            .map(|&e| routed[e].iter().flat_map(|&(t, _)| x[t * h..(t + 1) * h].iter().copied()).collect())
            .collect();
        let mut gs: Vec<Vec<f32>> = active.iter().map(|&e| vec![0f32; routed[e].len() * inter]).collect();
        let mut us: Vec<Vec<f32>> = gs.clone();
        let mut products = Vec::with_capacity(2 * active.len());
        for (((&e, xe), g), u) in active.iter().zip(&xs).zip(gs.iter_mut()).zip(us.iter_mut()) {
            let (m, ex) = (routed[e].len(), &self.experts[e]);
            products.extend([(&xe[..], m, &ex.gate_proj, &mut g[..]), (&xe[..], m, &ex.up_proj, &mut u[..])]);
        }
        forward_all(ctx, products);
        let gates = trace.is_some().then(|| gs.clone());
        for (g, u) in gs.iter_mut().zip(&us) {
            ops::silu_mul(ctx.isa, g, u);
        }
        let mut ys: Vec<Vec<f32>> = active.iter().map(|&e| vec![0f32; routed[e].len() * h]).collect();
        let products = active.iter().zip(&gs).zip(ys.iter_mut());
        forward_all(
            ctx,
            products.map(|((&e, g), y)| (&g[..], routed[e].len(), &self.experts[e].down_proj, &mut y[..])).collect(),
        );
        let mut out = vec![0f32; n * h];
        for (&e, y) in active.iter().zip(&ys) {
            for (r, &(t, w)) in routed[e].iter().enumerate() {
                for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[r * h..(r + 1) * h]) {
                    *o += w * v;
                }
            }
        }
        if let (Some(t), Some(gs)) = (trace, gates) {
            let runs = active.iter().zip(gs).zip(us).zip(ys);
            let runs = runs.map(|(((&e, g), u), y)| ExpertRun {
                expert: e,
                tokens: routed[e].iter().map(|r| r.0).collect(),
                g,
                u,
                y,
            });
            *t = MlpTrace::Moe(MoeTrace { probs, chosen, runs: runs.collect() });
        }
        out
    }
}

/// Routes each row of router logits (`[n, experts]`, turned into probabilities in place): its
/// `top_k` experts by descending probability (ties to the lower index, as torch.topk does in
/// practice) with their weights, renormalised over the chosen ones when `norm`.
pub fn route(logits: &mut [f32], experts: usize, top_k: usize, norm: bool) -> Vec<Vec<(usize, f32)>> {
    let mut idx: Vec<usize> = Vec::with_capacity(experts);
    logits
        .chunks_exact_mut(experts)
        .map(|p| {
            ops::softmax_inplace(qwick_backend::Isa::SCALAR, p);
            idx.clear();
            idx.extend(0..experts);
            idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let sum: f32 = idx[..top_k].iter().map(|&e| p[e]).sum();
            idx[..top_k].iter().map(|&e| (e, if norm { p[e] / sum } else { p[e] })).collect()
        })
        .collect()
}

pub enum FeedForward {
    Dense(Box<Mlp>),
    Moe(Moe),
}

pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

impl Layer {
    /// Layer `l` over the hidden states `x`, in place; keeps its activations in `trace` if
    /// given (reusing the attention a trace arrives with, see [`LayerTrace::attention_only`]).
    pub fn forward(&self, l: usize, x: &mut [f32], pass: &mut Pass, mut trace: Option<&mut LayerTrace>) {
        let (ctx, h) = (pass.ctx, self.input_layernorm.weight.len());
        let y = self.attn.forward(l, &self.input_layernorm.forward(ctx, x), pass, trace.as_deref_mut());
        add(ctx, x, &y, h);
        if let Some(t) = trace.as_deref_mut() {
            t.mid = copied(ctx.pool, x);
        }
        let hn = self.post_attention_layernorm.forward(ctx, x);
        let mlp_trace = trace.map(|t| &mut t.mlp);
        let y = match &self.mlp {
            FeedForward::Dense(m) => m.forward(l, &hn, pass, mlp_trace),
            FeedForward::Moe(m) => m.forward(ctx, &hn, pass.rope.len(), mlp_trace),
        };
        add(ctx, x, &y, h);
    }
}

/// `x += y`, in parallel over rows of `width`.
fn add(ctx: Ctx, x: &mut [f32], y: &[f32], width: usize) {
    par_rows(ctx, x.len() / width, x, width, |r, xr| ops::add_inplace(ctx.isa, xr, &y[r.start * width..r.end * width]));
}

pub struct Qwen3 {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// The output head; the embedding itself when tied.
    pub lm_head: Linear,
    pub tied: bool,
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) rope_scale: f32,
    /// LoRA adapters attached ([`Qwen3::add_adapter`]), and the one sequences use by default.
    pub(crate) adapters: u16,
    pub(crate) default_adapter: u16,
}

impl Qwen3 {
    /// The rotary angles of tokens at `positions`.
    pub fn rope(&self, positions: &[u32]) -> Rope {
        let half = self.inv_freq.len();
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        for (i, &p) in positions.iter().enumerate() {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let a = p as f32 * f;
                cos[i * half + j] = a.cos() * self.rope_scale;
                sin[i * half + j] = a.sin() * self.rope_scale;
            }
        }
        Rope { cos, sin, half }
    }

    /// The decoder layers over the hidden states `x` (the embedded tokens), in place; with a
    /// `trace`, each layer's input and activations are kept in it.
    pub fn forward_layers(&self, x: &mut [f32], pass: &mut Pass, mut trace: Option<&mut Trace>) {
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(t) = trace.as_deref_mut() else {
                layer.forward(l, x, pass, None);
                continue;
            };
            let input = copied(pass.ctx.pool, x);
            let mut kept = LayerTrace::default();
            layer.forward(l, x, pass, Some(&mut kept));
            t.layers.push((input, if l < t.full_layers { kept } else { kept.attention_only() }));
        }
    }

    /// Runs one step: writes the batch's K/V into `kv` and returns the logits of
    /// `batch.logits_rows`, row-major `[logits_rows.len(), vocab]`.
    pub fn forward(&self, ctx: Ctx, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        batch.validate(c.vocab_size, kv.num_blocks, kv.block_size).context("invalid batch")?;
        let rows = self.row_adapters(batch)?;
        let tables: Vec<&[u32]> = batch.block_tables.iter().map(|t| t.as_slice()).collect();
        let args = AttnArgs {
            n_heads: c.num_attention_heads,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            positions: &batch.positions,
            seq_of_token: &batch.seq_of_token,
            block_tables: &tables,
        };
        let rope = self.rope(&batch.positions);
        let mut keys = Keys::Cache { kv, slots: &batch.slot_mapping, args };
        let mut x = self.embed(&batch.tokens);
        self.forward_layers(
            &mut x,
            &mut Pass { ctx, rope: &rope, keys: &mut keys, lora: &mut Attached { rows: &rows } },
            None,
        );
        // The final norm and the head, only for the rows that want logits.
        let (h, m) = (c.hidden_size, batch.logits_rows.len());
        let sel: Vec<f32> =
            batch.logits_rows.iter().flat_map(|&r| &x[r as usize * h..(r as usize + 1) * h]).copied().collect();
        let mut logits = vec![0f32; m * c.vocab_size];
        self.lm_head.forward(ctx, &self.norm.forward(ctx, &sel), m, &mut logits);
        Ok(logits)
    }

    /// Each token's adapter (empty for a model without adapters: nothing to add).
    fn row_adapters(&self, batch: &Batch) -> Result<Vec<u16>> {
        if let Some(&bad) = batch.seq_adapter.iter().find(|&&a| a > self.adapters) {
            bail!("adapter {bad} asked for, but the model has {}", self.adapters);
        }
        if self.adapters == 0 {
            return Ok(Vec::new());
        }
        let seq = |s: u32| batch.seq_adapter.get(s as usize).copied().filter(|&a| a > 0);
        Ok(batch.seq_of_token.iter().map(|&s| seq(s).unwrap_or(self.default_adapter)).collect())
    }
}
