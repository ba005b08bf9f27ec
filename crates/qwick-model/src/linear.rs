//! A `Linear` weight (`[out, in]`) as its kernels read it, stored or converted into the model's
//! arena, with the low-rank updates of the LoRA adapters attached to it.

use crate::safetensors::Tensor;
use qwick_backend::alloc::HugeBuf;
use qwick_backend::{matmul_batch, Ctx, MatmulJob, WeightView};
use std::borrow::Cow;
use std::sync::Arc;

/// A `Linear` weight ([out, in]), as stored, or converted to the layout its kernels read.
pub struct Linear {
    pub weight: Tensor,
    /// The converted weight: a range of the model's arena.
    pub(crate) packed: Option<(Arc<HugeBuf>, std::ops::Range<usize>)>,
    /// LoRA adapters' updates of this weight, by adapter number.
    pub(crate) lora: Vec<(u16, LowRank)>,
}

/// A LoRA adapter's update of a `Linear`, kept apart from the base weight (which stays as
/// stored, quantized or not): `y += s · (x · Aᵀ) · Bᵀ`, as PEFT adds it.
pub struct LowRank {
    /// `[r, in]`.
    pub(crate) a: Vec<f32>,
    /// `[out, r]`.
    pub(crate) b: Vec<f32>,
    pub(crate) r: usize,
    pub(crate) s: f32,
}

/// An adapter update present in a batch: the update, its rows, their inputs gathered.
type Present<'a> = (&'a LowRank, Vec<usize>, Cow<'a, [f32]>);

/// One product of [`forward_all`]: `y = x · Wᵀ` for `n` rows `x` of a weight.
pub type Product<'a> = (&'a [f32], usize, &'a Linear, &'a mut [f32]);

/// Runs the products `y = x · Wᵀ` as one batch (one parallel dispatch for all of them).
pub fn forward_all(ctx: Ctx, products: Vec<Product>) {
    let jobs: Vec<MatmulJob> = products.into_iter().map(|(x, n, w, y)| MatmulJob::new(x, n, w.view(), y)).collect();
    matmul_batch(ctx, &jobs);
}

impl Linear {
    pub fn new(weight: Tensor) -> Linear {
        Linear { weight, packed: None, lora: vec![] }
    }

    /// Output features (the weight's rows).
    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    /// Input features (the weight's columns).
    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    /// `y = x · Wᵀ` for `n` rows of `x` (the base weight only, see [`Linear::add_lora`]).
    pub fn forward(&self, ctx: Ctx, x: &[f32], n: usize, y: &mut [f32]) {
        forward_all(ctx, vec![(x, n, self, y)]);
    }

    /// Adds each row's adapter update for inputs `x` (`n` rows) to `y` (`n` rows of outputs);
    /// `rows[i]` is row `i`'s adapter (0: none). Rows of one adapter are gathered, and the
    /// adapters present run as one batch of products (`x·Aᵀ` for all of them, then `·Bᵀ`), so a
    /// step mixing adapters costs two parallel dispatches per projection, not two per adapter.
    pub(crate) fn add_lora(&self, ctx: Ctx, x: &[f32], n: usize, y: &mut [f32], rows: &[u16]) {
        let (out, inp) = (self.out_features(), self.in_features());
        let present: Vec<Present> = self
            .lora
            .iter()
            .filter_map(|(id, l)| {
                let mine: Vec<usize> = (0..n).filter(|&i| rows[i] == *id).collect();
                let xs = match mine.len() {
                    0 => return None,
                    m if m == n => Cow::Borrowed(&x[..n * inp]),
                    _ => Cow::Owned(mine.iter().flat_map(|&i| x[i * inp..(i + 1) * inp].iter().copied()).collect()),
                };
                Some((l, mine, xs))
            })
            .collect();
        if present.is_empty() {
            return;
        }
        let mut t: Vec<Vec<f32>> = present.iter().map(|(l, mine, _)| vec![0f32; mine.len() * l.r]).collect();
        let jobs: Vec<MatmulJob> = present
            .iter()
            .zip(t.iter_mut())
            .map(|((l, mine, xs), t)| MatmulJob::new(xs, mine.len(), WeightView::from_f32(&l.a, l.r, inp), t))
            .collect();
        matmul_batch(ctx, &jobs);
        let mut u: Vec<Vec<f32>> = present.iter().map(|(_, mine, _)| vec![0f32; mine.len() * out]).collect();
        let jobs: Vec<MatmulJob> = present
            .iter()
            .zip(&t)
            .zip(u.iter_mut())
            .map(|(((l, mine, _), t), u)| MatmulJob::new(t, mine.len(), WeightView::from_f32(&l.b, out, l.r), u))
            .collect();
        matmul_batch(ctx, &jobs);
        for ((l, mine, _), u) in present.iter().zip(&u) {
            for (k, &i) in mine.iter().enumerate() {
                for (yv, uv) in y[i * out..(i + 1) * out].iter_mut().zip(&u[k * out..(k + 1) * out]) {
                    *yv += l.s * uv;
                }
            }
        }
    }

    /// The weight as the kernels read it.
    pub fn view(&self) -> WeightView<'_> {
        let (w, rows, cols) = (&self.weight, self.out_features(), self.in_features());
        match &self.packed {
            Some((arena, r)) => WeightView::tiles(w.format, &arena[r.clone()], rows, cols),
            None => WeightView::new(w.format, w.bytes(), rows, cols),
        }
    }
}
