//! Qwen3 and Qwen3-MoE, as transformers' `modeling_qwen3.py` / `modeling_qwen3_moe.py` define
//! them: pre-norm decoder layers of GQA attention (per-head RMSNorm on q and k before RoPE)
//! and a SwiGLU MLP or a top-k mixture of SwiGLU experts, then a final norm and the head.
//!
//! One forward pass serves inference and training, on any device: the layers are written in
//! the ops of an [`Exec`] (on the CPU, [`Pass`]: whether tokens attend through a paged KV
//! cache or within packed examples, and the projections' LoRA updates), and a [`Trace`] keeps
//! what a backward pass reads. How the weights are stored and loaded is [`crate::weights`]'
//! business, the cache's layout [`crate::kv`]'s.

use crate::batch::Batch;
use crate::config::Config;
use crate::exec::{Attached, Exec, Keys, Pass};
use crate::kv::KvCache;
use crate::linear::Linear;
use crate::names::Role;
use crate::safetensors::Tensor;
use anyhow::{bail, Context, Result};
use qwick_backend::attention::AttnArgs;
use qwick_backend::{ops, par_rows, Ctx};

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
    pub fn forward<E: Exec>(&self, l: usize, x: &E::T, e: &mut E, mut trace: Option<&mut LayerTrace>) -> E::T {
        let (qd, kvd) = (self.q_proj.out_features(), self.k_proj.out_features());
        let [mut q, mut k, v]: [E::T; 3] = e
            .project(l, x, &[(Role::Q, &self.q_proj), (Role::K, &self.k_proj), (Role::V, &self.v_proj)])
            .try_into()
            .ok()
            .expect("three projections");
        let pre = trace.is_some().then(|| (e.keep(&q), e.keep(&k)));
        e.norm_rows(&self.q_norm, &mut q);
        e.norm_rows(&self.k_norm, &mut k);
        e.rotate(&mut q, qd);
        e.rotate(&mut k, kvd);
        let (att, lse) = match trace.as_deref_mut() {
            Some(LayerTrace { att, lse, .. }) if !lse.is_empty() => (e.put(std::mem::take(att)), std::mem::take(lse)),
            _ => e.attend(l, &q, &k, &v),
        };
        let out = e.project(l, &att, &[(Role::O, &self.o_proj)]).pop().expect("one projection");
        if let (Some(t), Some((q_pre, k_pre))) = (trace, pre) {
            let (q, k, v, att) = (e.take(q), e.take(k), e.take(v), e.take(att));
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
    pub fn forward<E: Exec>(&self, l: usize, x: &E::T, e: &mut E, trace: Option<&mut MlpTrace>) -> E::T {
        let inter = self.gate_proj.out_features();
        let [mut g, u]: [E::T; 2] = e
            .project(l, x, &[(Role::Gate, &self.gate_proj), (Role::Up, &self.up_proj)])
            .try_into()
            .ok()
            .expect("two projections");
        let gate = trace.is_some().then(|| e.keep(&g));
        e.silu_mul(&mut g, &u, inter);
        let out = e.project(l, &g, &[(Role::Down, &self.down_proj)]).pop().expect("one projection");
        if let (Some(t), Some(g)) = (trace, gate) {
            *t = MlpTrace::Dense { g, u: e.take(u) };
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
    /// The block over the normed hidden states `x` (one row per token).
    pub fn forward<E: Exec>(&self, x: &E::T, e: &mut E, trace: Option<&mut MlpTrace>) -> E::T {
        if trace.is_none() {
            if let Some(out) = e.moe(self, x) {
                return out;
            }
        }
        let (ne, h, n) = (self.experts.len(), self.router.in_features(), e.tokens());
        let logits = e.products(&[(x, &self.router)]).pop().expect("one product");
        let mut probs = e.take(logits);
        let chosen = route(&mut probs, ne, self.top_k, self.norm_topk_prob);
        // Per expert: (token, weight) of the tokens routed to it.
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, c) in chosen.iter().enumerate() {
            for &(ex, w) in c {
                routed[ex].push((t, w));
            }
        }
        let active: Vec<usize> = (0..ne).filter(|&ex| !routed[ex].is_empty()).collect();
        let inter = self.experts[0].gate_proj.out_features();
        let xs: Vec<E::T> =
            active.iter().map(|&ex| e.gather(x, h, &routed[ex].iter().map(|r| r.0).collect::<Vec<_>>())).collect();
        let products: Vec<(&E::T, &Linear)> = active
            .iter()
            .zip(&xs)
            .flat_map(|(&ex, xe)| [(xe, &self.experts[ex].gate_proj), (xe, &self.experts[ex].up_proj)])
            .collect();
        let mut gu = e.products(&products).into_iter();
        let (mut gs, us): (Vec<E::T>, Vec<E::T>) =
            active.iter().map(|_| (gu.next().expect("a gate"), gu.next().expect("an up"))).unzip();
        let gates: Option<Vec<Vec<f32>>> = trace.is_some().then(|| gs.iter().map(|g| e.keep(g)).collect());
        for (g, u) in gs.iter_mut().zip(&us) {
            e.silu_mul(g, u, inter);
        }
        let downs: Vec<(&E::T, &Linear)> =
            active.iter().zip(&gs).map(|(&ex, g)| (g, &self.experts[ex].down_proj)).collect();
        let ys = e.products(&downs);
        let mut out = e.zeros(n * h);
        for (&ex, y) in active.iter().zip(&ys) {
            e.scatter_add(&mut out, y, h, &routed[ex]);
        }
        if let (Some(t), Some(gs)) = (trace, gates) {
            let runs = active.iter().zip(gs).zip(us).zip(ys);
            let runs: Vec<ExpertRun> = runs
                .map(|(((&ex, g), u), y)| ExpertRun {
                    expert: ex,
                    tokens: routed[ex].iter().map(|r| r.0).collect(),
                    g,
                    u: e.take(u),
                    y: e.take(y),
                })
                .collect();
            *t = MlpTrace::Moe(MoeTrace { probs, chosen, runs });
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
    pub fn forward<E: Exec>(&self, l: usize, x: &mut E::T, e: &mut E, mut trace: Option<&mut LayerTrace>) {
        let h = self.input_layernorm.weight.len();
        let xn = e.norm(&self.input_layernorm, x);
        let y = self.attn.forward(l, &xn, e, trace.as_deref_mut());
        e.add(x, &y, h);
        if let Some(t) = trace.as_deref_mut() {
            t.mid = e.keep(x);
        }
        let hn = e.norm(&self.post_attention_layernorm, x);
        let mlp_trace = trace.map(|t| &mut t.mlp);
        let y = match &self.mlp {
            FeedForward::Dense(m) => m.forward(l, &hn, e, mlp_trace),
            FeedForward::Moe(m) => m.forward(&hn, e, mlp_trace),
        };
        e.add(x, &y, h);
    }
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
    pub fn forward_layers<E: Exec>(&self, x: &mut E::T, e: &mut E, mut trace: Option<&mut Trace>) {
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(t) = trace.as_deref_mut() else {
                layer.forward(l, x, e, None);
                continue;
            };
            let input = e.keep(x);
            let mut kept = LayerTrace::default();
            layer.forward(l, x, e, Some(&mut kept));
            t.layers.push((input, if l < t.full_layers { kept } else { kept.attention_only() }));
        }
    }

    /// Runs one step on the CPU: writes the batch's K/V into `kv` and returns the logits of
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
        Ok(self.run(&mut Pass { ctx, rope: &rope, keys: &mut keys, lora: &mut Attached { rows: &rows } }, batch))
    }

    /// The batch's tokens through the layers on `e` (whose cache the batch addresses), then the
    /// final norm and the head for the rows that want logits (as many rows at a time as the
    /// device holds logits of), then the final norm alone for the rows that want hidden states.
    pub fn run<E: Exec>(&self, e: &mut E, batch: &Batch) -> Vec<f32> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut x = e.put(self.embed(&batch.tokens));
        self.forward_layers(&mut x, e, None);
        let rows: Vec<usize> = batch.logits_rows.iter().map(|&r| r as usize).collect();
        let per = e.rows_at_once(vocab).max(1);
        let mut parts = rows.chunks(per).enumerate().map(|(i, part)| {
            let sel = e.gather(&x, h, part);
            let hn = e.norm(&self.norm, &sel);
            let l = e.products(&[(&hn, &self.lm_head)]).pop().expect("one product");
            e.take_logits(l, vocab, batch.candidates.get(i * per..i * per + part.len()).unwrap_or(&[]))
        });
        // One part (always, on the CPU) is the logits as they are; more are joined.
        let mut logits = parts.next().unwrap_or_default();
        for p in parts {
            logits.extend(p);
        }
        if !batch.hidden_rows.is_empty() {
            let rows: Vec<usize> = batch.hidden_rows.iter().map(|&r| r as usize).collect();
            let sel = e.gather(&x, h, &rows);
            let hn = e.norm(&self.norm, &sel);
            logits.extend(e.take(hn));
        }
        logits
    }

    /// Each token's adapter (empty for a model without adapters: nothing to add).
    pub(crate) fn row_adapters(&self, batch: &Batch) -> Result<Vec<u16>> {
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
