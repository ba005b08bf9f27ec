//! Qwen3 and Qwen3-MoE, as transformers' `modeling_qwen3.py` / `modeling_qwen3_moe.py` define
//! them: pre-norm decoder layers of GQA attention (per-head RMSNorm on q and k before RoPE)
//! and a SwiGLU MLP or a top-k mixture of SwiGLU experts, then a final norm and the head.

use crate::batch::Batch;
use crate::config::Config;
use crate::kv::KvCache;
use crate::safetensors::{Checkpoint, Tensor};
use anyhow::{Context, Result};
use qwick_backend::attention::{paged_attention, AttnArgs};
use qwick_backend::pool::SendPtr;
use qwick_backend::{matmul, matmul_batch, ops, Ctx, MatmulJob, WeightView};
use std::path::Path;

/// A `Linear` weight ([out, in]).
pub struct Linear(pub Tensor);

impl Linear {
    pub fn view(&self) -> WeightView<'_> {
        WeightView::new(self.0.dtype, self.0.bytes(), self.0.shape[0], self.0.shape[1])
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
}

pub struct SwiGlu {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub enum Mlp {
    Dense(SwiGlu),
    /// Router (`mlp.gate`) over `experts`; no shared expert in Qwen3.
    Moe {
        router: Linear,
        experts: Vec<SwiGlu>,
        top_k: usize,
        norm_topk_prob: bool,
    },
}

pub struct Layer {
    pub input_layernorm: Vec<f32>,
    pub attn: Attention,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
}

pub struct Qwen3 {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// The output head; the embedding itself when tied.
    pub lm_head: Linear,
    pub tied: bool,
    inv_freq: Vec<f32>,
    rope_scale: f32,
}

impl Qwen3 {
    /// Loads `config.json` and the safetensors weights of a model folder.
    pub fn load(dir: &Path) -> Result<Qwen3> {
        if !dir.is_dir() {
            anyhow::bail!("model folder {} does not exist", dir.display());
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Qwen3::from_checkpoint(config, &ck)
    }

    pub fn from_checkpoint(config: Config, ck: &Checkpoint) -> Result<Qwen3> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let norm = |name: &str, n: usize| -> Result<Vec<f32>> { Ok(ck.get(name, &[n])?.to_f32()) };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> { Ok(Linear(ck.get(name, &[out, inp])?)) };
        let swiglu = |p: &str, inter: usize| -> Result<SwiGlu> {
            Ok(SwiGlu {
                gate_proj: lin(&format!("{p}.gate_proj.weight"), inter, h)?,
                up_proj: lin(&format!("{p}.up_proj.weight"), inter, h)?,
                down_proj: lin(&format!("{p}.down_proj.weight"), h, inter)?,
            })
        };
        let embed_tokens = ck.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = Attention {
                q_proj: lin(&format!("{p}.self_attn.q_proj.weight"), c.q_dim(), h)?,
                k_proj: lin(&format!("{p}.self_attn.k_proj.weight"), c.kv_dim(), h)?,
                v_proj: lin(&format!("{p}.self_attn.v_proj.weight"), c.kv_dim(), h)?,
                o_proj: lin(&format!("{p}.self_attn.o_proj.weight"), h, c.q_dim())?,
                q_norm: norm(&format!("{p}.self_attn.q_norm.weight"), hd)?,
                k_norm: norm(&format!("{p}.self_attn.k_norm.weight"), hd)?,
            };
            let mlp = match &c.moe {
                Some(m) if c.is_sparse(l) => Mlp::Moe {
                    router: lin(&format!("{p}.mlp.gate.weight"), m.num_experts, h)?,
                    experts: (0..m.num_experts)
                        .map(|e| swiglu(&format!("{p}.mlp.experts.{e}"), m.moe_intermediate_size))
                        .collect::<Result<_>>()?,
                    top_k: m.num_experts_per_tok,
                    norm_topk_prob: m.norm_topk_prob,
                },
                _ => Mlp::Dense(swiglu(&format!("{p}.mlp"), c.intermediate_size)?),
            };
            layers.push(Layer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp,
            });
        }
        let tied = c.tie_word_embeddings || !ck.contains("lm_head.weight");
        let lm_head = if tied { Linear(embed_tokens.clone()) } else { lin("lm_head.weight", c.vocab_size, h)? };
        let (inv_freq, rope_scale) = c.rope_inv_freq();
        Ok(Qwen3 {
            norm: norm("model.norm.weight", h)?,
            embed_tokens,
            layers,
            lm_head,
            tied,
            inv_freq,
            rope_scale,
            config,
        })
    }

    /// Bytes of weights one decode step reads per token: everything but the embedding table
    /// (one row of it), counting only `top_k` of each MoE layer's experts.
    pub fn bytes_read_per_token(&self) -> usize {
        let lin = |l: &Linear| l.0.bytes().len();
        let sw = |s: &SwiGlu| lin(&s.gate_proj) + lin(&s.up_proj) + lin(&s.down_proj);
        let mut total = lin(&self.lm_head) + self.embed_tokens.bytes().len() / self.config.vocab_size;
        for l in &self.layers {
            let a = &l.attn;
            total += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj) + lin(&a.o_proj);
            total += match &l.mlp {
                Mlp::Dense(s) => sw(s),
                Mlp::Moe { router, experts, top_k, .. } => lin(router) + top_k * experts.first().map(sw).unwrap_or(0),
            };
        }
        total
    }

    /// Bytes of all weights (the tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.0.bytes().len();
        let sw = |s: &SwiGlu| lin(&s.gate_proj) + lin(&s.up_proj) + lin(&s.down_proj);
        let mut total = self.embed_tokens.bytes().len() + if self.tied { 0 } else { lin(&self.lm_head) };
        for l in &self.layers {
            let a = &l.attn;
            total += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj) + lin(&a.o_proj);
            total += match &l.mlp {
                Mlp::Dense(s) => sw(s),
                Mlp::Moe { router, experts, .. } => lin(router) + experts.iter().map(sw).sum::<usize>(),
            };
        }
        total
    }

    /// A KV cache shaped for this model.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim)
    }

    /// Runs one step: writes the batch's K/V into `kv` and returns the logits of
    /// `batch.logits_rows`, row-major `[logits_rows.len(), vocab]`.
    pub fn forward(&self, ctx: Ctx, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        batch.validate(c.vocab_size, kv.num_blocks, kv.block_size).context("invalid batch")?;
        let n = batch.len();
        let (h, qd, kvd, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let isa = ctx.isa;

        // Embedding lookup.
        let mut x = vec![0f32; n * h];
        let emb = &self.embed_tokens;
        let row_bytes = h * emb.dtype.size();
        for (i, &t) in batch.tokens.iter().enumerate() {
            let src = &emb.bytes()[t as usize * row_bytes..(t as usize + 1) * row_bytes];
            for (j, v) in x[i * h..(i + 1) * h].iter_mut().enumerate() {
                *v = emb.dtype.get(src, j);
            }
        }

        // cos/sin of each token's position, f32 as transformers computes them.
        let half = hd / 2;
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (i, &p) in batch.positions.iter().enumerate() {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let a = p as f32 * f;
                cos[i * half + j] = a.cos() * self.rope_scale;
                sin[i * half + j] = a.sin() * self.rope_scale;
            }
        }

        let mut hn = vec![0f32; n * h];
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut tmp = vec![0f32; n * h];
        let tables: Vec<&[u32]> = batch.block_tables.iter().map(|t| t.as_slice()).collect();
        let args = AttnArgs {
            n_heads: c.num_attention_heads,
            scale: 1.0 / (hd as f32).sqrt(),
            positions: &batch.positions,
            seq_of_token: &batch.seq_of_token,
            block_tables: &tables,
        };
        let eps = c.rms_norm_eps;

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            par_rows(ctx, n, &mut hn, h, |r, out| {
                ops::rms_norm(isa, &x[r.start * h..r.end * h], &layer.input_layernorm, eps, out)
            });
            let a = &layer.attn;
            matmul_batch(
                ctx,
                &mut [
                    MatmulJob::new(&hn, n, a.q_proj.view(), &mut q),
                    MatmulJob::new(&hn, n, a.k_proj.view(), &mut k),
                    MatmulJob::new(&hn, n, a.v_proj.view(), &mut v),
                ],
            );
            {
                let (kc, vc) = kv.layer_mut(l);
                let (kp, vp, qp, kkp) =
                    (SendPtr::new(kc), SendPtr::new(vc), SendPtr::new(&mut q), SendPtr::new(&mut k));
                let (v, slots) = (&v, &batch.slot_mapping);
                let (cos, sin) = (&cos, &sin);
                ctx.pool.for_chunks(n, if n >= 8 { 1 } else { n }, &|r| {
                    for i in r {
                        let qi = unsafe { qp.slice(i * qd, qd) };
                        let ki = unsafe { kkp.slice(i * kvd, kvd) };
                        ops::rms_norm_inplace(isa, qi, &a.q_norm, eps);
                        ops::rms_norm_inplace(isa, ki, &a.k_norm, eps);
                        let (cs, sn) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
                        ops::rope_inplace(isa, qi, cs, sn);
                        ops::rope_inplace(isa, ki, cs, sn);
                        let slot = slots[i] as usize;
                        unsafe {
                            kp.slice(slot * kvd, kvd).copy_from_slice(ki);
                            vp.slice(slot * kvd, kvd).copy_from_slice(&v[i * kvd..(i + 1) * kvd]);
                        }
                    }
                });
            }
            paged_attention(ctx, &q, kv.layer(l), &args, &mut att);
            matmul(ctx, &att, n, &a.o_proj.view(), &mut tmp);
            par_rows(ctx, n, &mut x, h, |r, xo| ops::add_inplace(isa, xo, &tmp[r.start * h..r.end * h]));

            // MLP block.
            par_rows(ctx, n, &mut hn, h, |r, out| {
                ops::rms_norm(isa, &x[r.start * h..r.end * h], &layer.post_attention_layernorm, eps, out)
            });
            match &layer.mlp {
                Mlp::Dense(s) => swiglu(ctx, s, &hn, n, &mut tmp),
                Mlp::Moe { router, experts, top_k, norm_topk_prob } => {
                    moe(ctx, router, experts, *top_k, *norm_topk_prob, &hn, n, &mut tmp)
                }
            }
            par_rows(ctx, n, &mut x, h, |r, xo| ops::add_inplace(isa, xo, &tmp[r.start * h..r.end * h]));
        }

        // Final norm and head, only for the rows that want logits.
        let rows = &batch.logits_rows;
        let mut sel = vec![0f32; rows.len() * h];
        for (o, &r) in rows.iter().enumerate() {
            ops::rms_norm(isa, &x[r as usize * h..(r as usize + 1) * h], &self.norm, eps, &mut sel[o * h..(o + 1) * h]);
        }
        let mut logits = vec![0f32; rows.len() * c.vocab_size];
        matmul(ctx, &sel, rows.len(), &self.lm_head.view(), &mut logits);
        Ok(logits)
    }
}

/// Calls `f(rows, out_rows)` over row chunks of `out` (`width` floats a row), in parallel when
/// there are enough rows to be worth it.
fn par_rows(ctx: Ctx, n: usize, out: &mut [f32], width: usize, f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    // Each chunk owns its rows of `out`.
    let op = SendPtr::new(out);
    let run = |r: std::ops::Range<usize>| {
        let o = unsafe { op.slice(r.start * width, r.len() * width) };
        f(r, o)
    };
    if n < 8 {
        run(0..n);
    } else {
        ctx.pool.for_chunks(n, 1, &run);
    }
}

/// `out = down(silu(gate(x)) · up(x))`.
fn swiglu(ctx: Ctx, s: &SwiGlu, x: &[f32], n: usize, out: &mut [f32]) {
    let inter = s.gate_proj.0.shape[0];
    let mut g = vec![0f32; n * inter];
    let mut u = vec![0f32; n * inter];
    matmul_batch(
        ctx,
        &mut [MatmulJob::new(x, n, s.gate_proj.view(), &mut g), MatmulJob::new(x, n, s.up_proj.view(), &mut u)],
    );
    par_rows(ctx, n, &mut g, inter, |r, gr| ops::silu_mul(ctx.isa, gr, &u[r.start * inter..r.end * inter]));
    matmul(ctx, &g, n, &s.down_proj.view(), out);
}

/// The sparse MoE block: softmax router over all experts, top-k (renormalised when
/// `norm_topk_prob`), each chosen expert run once over the rows routed to it, results added
/// with their routing weights. Experts nobody chose are never read.
#[allow(clippy::too_many_arguments)]
fn moe(
    ctx: Ctx,
    router: &Linear,
    experts: &[SwiGlu],
    top_k: usize,
    norm_topk_prob: bool,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let ne = experts.len();
    let h = router.0.shape[1];
    let mut probs = vec![0f32; n * ne];
    matmul(ctx, x, n, &router.view(), &mut probs);
    // Per expert: (row, weight) of the tokens routed to it.
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
    let mut idx: Vec<usize> = Vec::with_capacity(ne);
    for t in 0..n {
        let p = &mut probs[t * ne..(t + 1) * ne];
        ops::softmax_inplace(qwick_backend::Isa::Scalar, p);
        idx.clear();
        idx.extend(0..ne);
        // Descending probability; ties to the lower index, as torch.topk does in practice.
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let sum: f32 = idx[..top_k].iter().map(|&e| p[e]).sum();
        for &e in &idx[..top_k] {
            let w = if norm_topk_prob { p[e] / sum } else { p[e] };
            routed[e].push((t, w));
        }
    }
    let active: Vec<usize> = (0..ne).filter(|&e| !routed[e].is_empty()).collect();
    let inter = experts[0].gate_proj.0.shape[0];
    // Gather each active expert's rows.
    let xs: Vec<Vec<f32>> = active
        .iter()
        .map(|&e| routed[e].iter().flat_map(|&(t, _)| x[t * h..(t + 1) * h].iter().copied()).collect())
        .collect();
    let mut gs: Vec<Vec<f32>> = active.iter().map(|&e| vec![0f32; routed[e].len() * inter]).collect();
    let mut us: Vec<Vec<f32>> = gs.clone();
    {
        let mut jobs = Vec::with_capacity(2 * active.len());
        for (((&e, xe), g), u) in active.iter().zip(&xs).zip(gs.iter_mut()).zip(us.iter_mut()) {
            let m = routed[e].len();
            jobs.push(MatmulJob::new(xe, m, experts[e].gate_proj.view(), g));
            jobs.push(MatmulJob::new(xe, m, experts[e].up_proj.view(), u));
        }
        matmul_batch(ctx, &mut jobs);
    }
    for (g, u) in gs.iter_mut().zip(&us) {
        ops::silu_mul(ctx.isa, g, u);
    }
    let mut ys: Vec<Vec<f32>> = active.iter().map(|&e| vec![0f32; routed[e].len() * h]).collect();
    {
        let mut jobs = Vec::with_capacity(active.len());
        for ((&e, g), y) in active.iter().zip(&gs).zip(ys.iter_mut()) {
            jobs.push(MatmulJob::new(g, routed[e].len(), experts[e].down_proj.view(), y));
        }
        matmul_batch(ctx, &mut jobs);
    }
    out[..n * h].fill(0.0);
    for (&e, y) in active.iter().zip(&ys) {
        for (r, &(t, w)) in routed[e].iter().enumerate() {
            for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[r * h..(r + 1) * h]) {
                *o += w * v;
            }
        }
    }
}
