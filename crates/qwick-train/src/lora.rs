//! The trainable part: a LoRA pair `(A [r, in], B [out, r])` per targeted projection per
//! layer, initialised as PEFT does (A Kaiming-uniform, B zero) or read from an adapter, and
//! written back in PEFT's layout.

use anyhow::{bail, Result};
use qwick_model::lora::{Adapter, AdapterConfig, AdapterPair, MODULES};
use qwick_model::Config;
use std::path::Path;

/// How the adapter is shaped.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dropout: f32,
    /// PEFT module names, in [`MODULES`] order.
    pub targets: Vec<&'static str>,
}

impl LoraSpec {
    /// The factor of `B · A`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        let r = self.rank as f64;
        (if self.rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    /// Targets from a comma-separated list of short (`q,k,v,o,gate,up,down`) or PEFT
    /// (`q_proj`, ...) names, or `all`.
    pub fn parse_targets(s: &str) -> Result<Vec<&'static str>> {
        if s == "all" || s == "all-linear" {
            return Ok(MODULES.iter().map(|m| m.0).collect());
        }
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let full = if t.ends_with("_proj") { t.to_string() } else { format!("{t}_proj") };
            match MODULES.iter().find(|m| m.0 == full) {
                Some(m) => out.push(m.0),
                None => bail!("unknown LoRA target {t:?} (valid: q, k, v, o, gate, up, down, or all)"),
            }
        }
        if out.is_empty() {
            bail!("no LoRA targets given");
        }
        Ok(MODULES.iter().map(|m| m.0).filter(|m| out.contains(m)).collect())
    }
}

/// The index of a projection in [`MODULES`] (`q, k, v, o, gate, up, down`).
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

/// One adapted projection.
#[derive(Clone)]
pub struct Pair {
    pub layer: usize,
    pub module: usize,
    pub inp: usize,
    pub out: usize,
    /// `[r, in]`.
    pub a: Vec<f32>,
    /// `[out, r]`.
    pub b: Vec<f32>,
}

/// All pairs of an adapter; `index[layer][module]` finds a pair.
#[derive(Clone)]
pub struct LoraParams {
    pub spec: LoraSpec,
    pub pairs: Vec<Pair>,
    index: Vec<[Option<usize>; 7]>,
}

/// `[out, in]` of projection `module` in layer `l`.
fn shape(c: &Config, module: usize) -> (usize, usize) {
    let h = c.hidden_size;
    match module {
        Q => (c.q_dim(), h),
        K | V => (c.kv_dim(), h),
        O => (h, c.q_dim()),
        GATE | UP => (c.intermediate_size, h),
        _ => (h, c.intermediate_size),
    }
}

impl LoraParams {
    fn layout(c: &Config, spec: &LoraSpec) -> Result<Vec<(usize, usize, usize, usize)>> {
        let mut v = Vec::new();
        for l in 0..c.num_hidden_layers {
            for (m, (name, _)) in MODULES.iter().enumerate() {
                if !spec.targets.contains(name) {
                    continue;
                }
                if m >= GATE && c.is_sparse(l) {
                    bail!(
                        "layer {l} is a mixture of experts: LoRA on {name} of MoE layers is not supported (target the \
                         attention projections: --targets q,k,v,o)"
                    );
                }
                let (out, inp) = shape(c, m);
                v.push((l, m, out, inp));
            }
        }
        Ok(v)
    }

    fn with_pairs(c: &Config, spec: LoraSpec, pairs: Vec<Pair>) -> LoraParams {
        let mut index = vec![[None; 7]; c.num_hidden_layers];
        for (i, p) in pairs.iter().enumerate() {
            index[p.layer][p.module] = Some(i);
        }
        LoraParams { spec, pairs, index }
    }

    /// A fresh adapter as PEFT initialises one: `A` uniform in `±1/√in` (Kaiming-uniform with
    /// `a = √5`), `B` zero, so training starts from the base model.
    pub fn init(c: &Config, spec: LoraSpec, seed: u64) -> Result<LoraParams> {
        let mut rng = crate::Rng::new(seed);
        let r = spec.rank;
        let pairs = Self::layout(c, &spec)?
            .into_iter()
            .map(|(layer, module, out, inp)| {
                let bound = 1.0 / (inp as f32).sqrt();
                let a = (0..r * inp).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
                Pair { layer, module, inp, out, a, b: vec![0f32; out * r] }
            })
            .collect();
        Ok(Self::with_pairs(c, spec, pairs))
    }

    /// The pairs of an adapter folder (to continue training one, or to check gradients).
    pub fn from_adapter(c: &Config, a: &Adapter, dropout: f32) -> Result<LoraParams> {
        a.check(c)?;
        let spec = LoraSpec { rank: a.rank, alpha: a.alpha, rslora: a.rslora, dropout, targets: a.targets.clone() };
        let spec =
            LoraSpec { targets: MODULES.iter().map(|m| m.0).filter(|m| spec.targets.contains(m)).collect(), ..spec };
        let mut pairs = Vec::new();
        for (layer, module, out, inp) in Self::layout(c, &spec)? {
            let Some((pa, pb)) = a.pair(MODULES[module].1, layer, out, inp)? else { bail!("adapter misses a pair") };
            pairs.push(Pair { layer, module, inp, out, a: pa, b: pb });
        }
        Ok(Self::with_pairs(c, spec, pairs))
    }

    pub fn get(&self, layer: usize, module: usize) -> Option<&Pair> {
        self.index[layer][module].map(|i| &self.pairs[i])
    }

    pub fn slot(&self, layer: usize, module: usize) -> Option<usize> {
        self.index[layer][module]
    }

    /// Trainable values in all.
    pub fn count(&self) -> usize {
        self.pairs.iter().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// Gradients shaped like these parameters, zero.
    pub fn zeros_like(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        self.pairs.iter().map(|p| (vec![0f32; p.a.len()], vec![0f32; p.b.len()])).collect()
    }

    /// Writes the adapter in PEFT's layout.
    pub fn save(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        let cfg = AdapterConfig {
            rank: self.spec.rank,
            alpha: self.spec.alpha,
            rslora: self.spec.rslora,
            dropout: self.spec.dropout as f64,
            targets: self.spec.targets.clone(),
            base_model,
        };
        let pairs: Vec<AdapterPair> = self
            .pairs
            .iter()
            .map(|p| AdapterPair {
                role: MODULES[p.module].1,
                layer: p.layer,
                inp: p.inp,
                out: p.out,
                a: &p.a,
                b: &p.b,
            })
            .collect();
        qwick_model::lora::write_adapter(dir, &cfg, &pairs)
    }
}
