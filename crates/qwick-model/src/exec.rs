//! The ops the Qwen3 forward ([`crate::qwen3`]) is written in, and how they run on the CPU.
//!
//! [`Exec`] is the seam between what the model computes and where: the layers call its ops on
//! activations of its own type ([`Exec::T`]), so one forward serves the CPU ([`Pass`]: rows of
//! f32 in host memory, the backend's kernels, a paged KV cache or packed training examples,
//! LoRA updates) and a GPU ([`crate::gpu`]: device buffers, WGSL kernels, one submission per
//! call).

use crate::kv::KvCache;
use crate::linear::{forward_all, Linear};
use crate::names::Role;
use crate::qwen3::{Moe, RmsNorm, Rope};
use qwick_backend::attention::{paged_attention, AttnArgs};
use qwick_backend::grad::{attention_forward, AttnShape};
use qwick_backend::{copied, ops, par_rows, Ctx};

/// The ops of a forward pass over `tokens()` tokens, on some device.
pub trait Exec {
    /// Rows of activations (row-major f32) where the ops run.
    type T;
    /// Tokens in this pass.
    fn tokens(&self) -> usize;
    /// How many rows of `width` values one activation may hold (a device's largest buffer).
    fn rows_at_once(&self, width: usize) -> usize;
    /// Host rows moved to the device.
    fn put(&mut self, x: Vec<f32>) -> Self::T;
    /// A copy of `x` on the host.
    fn keep(&mut self, x: &Self::T) -> Vec<f32>;
    /// `x` on the host.
    fn take(&mut self, x: Self::T) -> Vec<f32>;
    /// The logits `l` (rows of `vocab`) on the host, where row `i` is read only for its `top[i]`
    /// highest-ranked logits (0, or no entry: all of them; see [`crate::Batch::candidates`]): a
    /// device may bring back just those, the rest of the row -inf.
    fn take_logits(&mut self, l: Self::T, vocab: usize, top: &[u32]) -> Vec<f32> {
        let _ = (vocab, top);
        self.take(l)
    }
    /// `len` zeros.
    fn zeros(&mut self, len: usize) -> Self::T;
    /// Each row of `x`, normalised by `n`.
    fn norm(&mut self, n: &RmsNorm, x: &Self::T) -> Self::T;
    /// Each `n.weight.len()`-wide row of `x` normalised in place (per-head q and k norms).
    fn norm_rows(&mut self, n: &RmsNorm, x: &mut Self::T);
    /// Every head of the tokens' `width`-wide rows of `x`, rotated by the tokens' angles.
    fn rotate(&mut self, x: &mut Self::T, width: usize);
    /// Layer `l`'s projections `ws` of the rows `x` (one per token), with their LoRA updates.
    fn project(&mut self, l: usize, x: &Self::T, ws: &[(Role, &Linear)]) -> Vec<Self::T>;
    /// Plain products `x · Wᵀ` (the router, the experts, the head), as one batch; each `x`
    /// holds whole rows of the weight's input width.
    fn products(&mut self, ps: &[(&Self::T, &Linear)]) -> Vec<Self::T>;
    /// Layer `l`'s attention of `q` to `k` and `v` (stored in the cache first): the output,
    /// and for packed examples each (token, head)'s log-sum-exp (else empty).
    fn attend(&mut self, l: usize, q: &Self::T, k: &Self::T, v: &Self::T) -> (Self::T, Vec<f32>);
    /// `g = silu(g) · u`, over rows of `width` values.
    fn silu_mul(&mut self, g: &mut Self::T, u: &Self::T, width: usize);
    /// `x += y`, over rows of `width` values.
    fn add(&mut self, x: &mut Self::T, y: &Self::T, width: usize);
    /// The `width`-wide rows `rows` of `x`, in that order.
    fn gather(&mut self, x: &Self::T, width: usize, rows: &[usize]) -> Self::T;
    /// `out[t] += w · y[i]` for each `(t, w)` at index `i` of `rows` (`width`-wide rows; each
    /// `t` at most once).
    fn scatter_add(&mut self, out: &mut Self::T, y: &Self::T, width: usize, rows: &[(usize, f32)]);
    /// The whole block `moe` over the rows `x` where the device routes the tokens and runs the
    /// chosen experts itself, as [`Moe::forward`] defines the block; `None` where it does not
    /// (the block then runs through the ops above).
    fn moe(&mut self, moe: &Moe, x: &Self::T) -> Option<Self::T> {
        let _ = (moe, x);
        None
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

/// The attention of packed examples for a model of `c`: `start[i]` is the first token of token
/// `i`'s example.
pub fn packed_attention<'a>(c: &crate::Config, start: &'a [u32]) -> AttnShape<'a> {
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

/// The adapters attached to the model's weights ([`crate::Qwen3::add_adapter`]): `rows[i]` is
/// token `i`'s (0: none; empty when the model has none).
pub struct Attached<'a> {
    pub rows: &'a [u16],
}

impl Lora for Attached<'_> {
    fn add(&mut self, ctx: Ctx, _: usize, _: Role, w: &Linear, x: &[f32], y: &mut [f32]) {
        w.add_lora(ctx, x, y.len() / w.out_features(), y, self.rows);
    }
}

/// A forward pass on the CPU: the kernels' context, the tokens' rotary angles, the keys they
/// attend to, and the projections' LoRA updates.
pub struct Pass<'p, 'k> {
    pub ctx: Ctx<'p>,
    pub rope: &'p Rope,
    pub keys: &'p mut Keys<'k>,
    pub lora: &'p mut dyn Lora,
}

impl Exec for Pass<'_, '_> {
    type T = Vec<f32>;

    fn tokens(&self) -> usize {
        self.rope.len()
    }

    fn rows_at_once(&self, _: usize) -> usize {
        usize::MAX
    }

    fn put(&mut self, x: Vec<f32>) -> Vec<f32> {
        x
    }

    fn keep(&mut self, x: &Vec<f32>) -> Vec<f32> {
        copied(self.ctx.pool, x)
    }

    fn take(&mut self, x: Vec<f32>) -> Vec<f32> {
        x
    }

    fn zeros(&mut self, len: usize) -> Vec<f32> {
        vec![0f32; len]
    }

    fn norm(&mut self, n: &RmsNorm, x: &Vec<f32>) -> Vec<f32> {
        n.forward(self.ctx, x)
    }

    fn norm_rows(&mut self, n: &RmsNorm, x: &mut Vec<f32>) {
        let (ctx, w) = (self.ctx, n.weight.len());
        par_rows(ctx, x.len() / w, x, w, |_, rows| ops::rms_norm_inplace(ctx.isa, rows, &n.weight, n.eps));
    }

    fn rotate(&mut self, x: &mut Vec<f32>, width: usize) {
        self.rope.rotate(self.ctx, x, width);
    }

    fn project(&mut self, l: usize, x: &Vec<f32>, ws: &[(Role, &Linear)]) -> Vec<Vec<f32>> {
        let mut ys = self.products(&ws.iter().map(|&(_, w)| (x, w)).collect::<Vec<_>>());
        for ((p, w), y) in ws.iter().zip(ys.iter_mut()) {
            self.lora.add(self.ctx, l, *p, w, x, y);
        }
        ys
    }

    fn products(&mut self, ps: &[(&Vec<f32>, &Linear)]) -> Vec<Vec<f32>> {
        let rows = |x: &Vec<f32>, w: &Linear| x.len() / w.in_features();
        let mut ys: Vec<Vec<f32>> = ps.iter().map(|(x, w)| vec![0f32; rows(x, w) * w.out_features()]).collect();
        forward_all(
            self.ctx,
            ps.iter().zip(ys.iter_mut()).map(|((x, w), y)| (&x[..], rows(x, w), *w, &mut y[..])).collect(),
        );
        ys
    }

    fn attend(&mut self, l: usize, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        let ctx = self.ctx;
        let mut out = vec![0f32; q.len()];
        match self.keys {
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

    fn silu_mul(&mut self, g: &mut Vec<f32>, u: &Vec<f32>, width: usize) {
        let ctx = self.ctx;
        par_rows(ctx, g.len() / width, g, width, |r, gr| {
            ops::silu_mul(ctx.isa, gr, &u[r.start * width..r.end * width])
        });
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, width: usize) {
        let ctx = self.ctx;
        par_rows(ctx, x.len() / width, x, width, |r, xr| {
            ops::add_inplace(ctx.isa, xr, &y[r.start * width..r.end * width])
        });
    }

    fn gather(&mut self, x: &Vec<f32>, width: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&r| &x[r * width..(r + 1) * width]).copied().collect()
    }

    fn scatter_add(&mut self, out: &mut Vec<f32>, y: &Vec<f32>, width: usize, rows: &[(usize, f32)]) {
        for (i, &(t, w)) in rows.iter().enumerate() {
            for (o, &v) in out[t * width..(t + 1) * width].iter_mut().zip(&y[i * width..(i + 1) * width]) {
                *o += w * v;
            }
        }
    }
}
