//! A Qwen3's weights: where its files are, its tensors by role from safetensors or GGUF, LoRA
//! adapters attached to its projections, their conversion into one arena in the layout their
//! kernels read, the embedding table, and what the weights take in memory and per token.

use crate::config::Config;
use crate::kv::KvCache;
use crate::linear::{Linear, LowRank};
use crate::lora::Adapter;
use crate::names::{self, Role};
use crate::qwen3::{Attention, FeedForward, Layer, Mlp, Moe, Qwen3, RmsNorm};
use crate::safetensors::{Checkpoint, Tensor};
use anyhow::{bail, Context, Result};
use qwick_backend::alloc::HugeBuf;
use qwick_backend::{Format, WeightView};
use qwick_gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face folder: `config.json` and safetensors.
    Folder(PathBuf),
    /// One GGUF file (weights, configuration, tokenizer and chat template).
    Gguf(PathBuf),
}

impl ModelFiles {
    /// Finds the model at `path`: a GGUF file, a folder holding a `config.json`, or a folder
    /// holding exactly one `.gguf` file.
    pub fn locate(path: &Path) -> Result<ModelFiles> {
        if path.is_file() {
            let mut magic = [0u8; 4];
            let is_gguf = std::fs::File::open(path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok_and(|_| u32::from_le_bytes(magic) == qwick_gguf::MAGIC);
            if is_gguf || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Ok(ModelFiles::Gguf(path.to_path_buf()));
            }
            bail!("{} is neither a GGUF file nor a model folder", path.display());
        }
        if !path.is_dir() {
            bail!("model {} does not exist (expected a folder, a .gguf file or a Hub id)", path.display());
        }
        if path.join("config.json").is_file() {
            return Ok(ModelFiles::Folder(path.to_path_buf()));
        }
        let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read model folder {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
            .collect();
        ggufs.sort();
        // The parts of one split model count as one file: its first part.
        let first_parts: Vec<&PathBuf> = ggufs
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("-00001-of-")))
            .collect();
        if first_parts.len() == 1 && ggufs.iter().all(|p| p.to_string_lossy().contains("-of-")) {
            return Ok(ModelFiles::Gguf(first_parts[0].clone()));
        }
        match ggufs.len() {
            0 => Ok(ModelFiles::Folder(path.to_path_buf())),
            1 => Ok(ModelFiles::Gguf(ggufs.remove(0))),
            _ => bail!(
                "{} holds several GGUF files ({}); give the one to run",
                path.display(),
                ggufs.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// The folder or file.
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Folder(p) | ModelFiles::Gguf(p) => p,
        }
    }
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Convert quantized weights to the layout their kernels read fastest (an anonymous copy
    /// replacing the mapped pages); off keeps every weight in the file's layout, mapped.
    pub repack: bool,
    /// With `repack`, bf16 weights too are converted, to tiles (AMX's layout): for contexts
    /// whose bf16 products round activations to bf16 (`Bf16Mode::Amx`, `Bf16Mode::Dot`,
    /// `Bf16Mode::Fma`), which then read them with no per-call unpacking from a single activation
    /// row on. Exact products read such weights back to f32.
    pub bf16_tiles: bool,
    /// Bytes the converted weights may take with bf16 ones among them; beyond it bf16 weights
    /// stay in the file's layout (mapped, pages the system can drop and read again).
    pub bf16_tiles_budget: usize,
    /// Threads for the conversion.
    pub threads: usize,
    /// LoRA adapters (PEFT folders), numbered from 1 in this order.
    pub lora: Vec<PathBuf>,
    /// Every sequence runs with the (single) adapter, rather than the ones that ask for it.
    pub lora_for_all: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            repack: true,
            bf16_tiles: false,
            bf16_tiles_budget: usize::MAX,
            threads: 1,
            lora: vec![],
            lora_for_all: false,
        }
    }
}

/// The tensors of a checkpoint, by role.
enum Source<'a> {
    Safetensors(&'a Checkpoint),
    Gguf(&'a GgufFile),
}

/// A tensor's name in a Hugging Face checkpoint: as a causal LM names it, or without the
/// `model.` prefix where the checkpoint holds the bare model (`Qwen3Model`, as the
/// Qwen3-Embedding checkpoints are saved).
fn hf_name(ck: &Checkpoint, role: Role, l: usize, e: usize) -> String {
    let name = names::hf(role, l, e);
    match name.strip_prefix("model.") {
        Some(bare) if !ck.contains(&name) && ck.contains(bare) => bare.to_string(),
        _ => name,
    }
}

impl Source<'_> {
    fn get(&self, role: Role, l: usize, shape: &[usize]) -> Result<Tensor> {
        match self {
            Source::Safetensors(ck) => ck.get(&hf_name(ck, role, l, 0), shape),
            Source::Gguf(g) => crate::gguf::tensor(g, role, l, shape),
        }
    }

    fn contains(&self, role: Role, l: usize) -> bool {
        match self {
            Source::Safetensors(ck) => ck.contains(&hf_name(ck, role, l, 0)),
            Source::Gguf(g) => crate::gguf::contains(g, role, l),
        }
    }

    /// The `n` experts' weights of `role` in layer `l`, each `[rows, cols]`.
    fn experts(&self, role: Role, l: usize, n: usize, rows: usize, cols: usize) -> Result<Vec<Tensor>> {
        match self {
            Source::Safetensors(ck) => (0..n).map(|e| ck.get(&hf_name(ck, role, l, e), &[rows, cols])).collect(),
            Source::Gguf(g) => Ok(crate::gguf::tensor(g, role, l, &[n, rows, cols])?.unstack()),
        }
    }
}

impl Qwen3 {
    /// Loads a model folder (`config.json` + safetensors) or a GGUF file, with default options.
    pub fn load(path: &Path) -> Result<Qwen3> {
        Qwen3::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Qwen3> {
        let mut model = match ModelFiles::locate(path)? {
            ModelFiles::Folder(dir) => {
                let config = Config::from_file(&dir.join("config.json"))?;
                let ck = Checkpoint::open(&dir)?;
                Qwen3::from_source(config, &Source::Safetensors(&ck))?
            }
            ModelFiles::Gguf(file) => {
                let g = GgufFile::open(&file)?;
                let config = crate::gguf::config(&g)?;
                Qwen3::from_source(config, &Source::Gguf(&g))?
            }
        };
        for dir in &opts.lora {
            let a = Adapter::open(dir)?;
            if opts.lora_for_all {
                model.apply_lora(&a)?;
            } else {
                model.add_adapter(&a)?;
            }
        }
        if opts.repack {
            model.pack(opts.threads.max(1), opts.bf16_tiles, opts.bf16_tiles_budget);
        }
        Ok(model)
    }

    /// Attaches a LoRA adapter and makes it the default of every sequence (see
    /// [`Qwen3::add_adapter`]).
    pub fn apply_lora(&mut self, a: &Adapter) -> Result<()> {
        self.default_adapter = self.add_adapter(a)?;
        Ok(())
    }

    /// Attaches a LoRA adapter to the weights it targets and returns its number (from 1), by
    /// which a batch's sequences ask for it. The base weights stay as stored (float or
    /// quantized); each targeted projection adds `s · (x · Aᵀ) · Bᵀ` to its output.
    pub fn add_adapter(&mut self, a: &Adapter) -> Result<u16> {
        a.check(&self.config)?;
        let id = self.adapters + 1;
        let s = a.scaling();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let at = &mut layer.attn;
            let mut lins: Vec<(Role, &mut Linear)> = vec![
                (Role::Q, &mut at.q_proj),
                (Role::K, &mut at.k_proj),
                (Role::V, &mut at.v_proj),
                (Role::O, &mut at.o_proj),
            ];
            if let FeedForward::Dense(m) = &mut layer.mlp {
                lins.extend([
                    (Role::Gate, &mut m.gate_proj),
                    (Role::Up, &mut m.up_proj),
                    (Role::Down, &mut m.down_proj),
                ]);
            }
            for (role, lin) in lins {
                let (out, inp) = (lin.weight.shape[0], lin.weight.shape[1]);
                if let Some((am, bm)) = a.pair(role, l, out, inp)? {
                    lin.lora.push((id, LowRank { a: am, b: bm, r: a.rank, s }));
                }
            }
        }
        self.adapters = id;
        Ok(id)
    }

    /// The number of adapters attached.
    pub fn adapters(&self) -> u16 {
        self.adapters
    }

    fn from_source(config: Config, src: &Source) -> Result<Qwen3> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let norm = |role: Role, l: usize, n: usize| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: src.get(role, l, &[n])?.to_f32(), eps: c.rms_norm_eps })
        };
        let lin = |role: Role, l: usize, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(src.get(role, l, &[out, inp])?))
        };
        let swiglu = |l: usize, inter: usize| -> Result<Mlp> {
            Ok(Mlp {
                gate_proj: lin(Role::Gate, l, inter, h)?,
                up_proj: lin(Role::Up, l, inter, h)?,
                down_proj: lin(Role::Down, l, h, inter)?,
            })
        };
        let embed_tokens = src.get(Role::Embed, 0, &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let attn = Attention {
                q_proj: lin(Role::Q, l, c.q_dim(), h)?,
                k_proj: lin(Role::K, l, c.kv_dim(), h)?,
                v_proj: lin(Role::V, l, c.kv_dim(), h)?,
                o_proj: lin(Role::O, l, h, c.q_dim())?,
                q_norm: norm(Role::QNorm, l, hd)?,
                k_norm: norm(Role::KNorm, l, hd)?,
            };
            let mlp = match &c.moe {
                Some(m) if c.is_sparse(l) => {
                    let (ne, mi) = (m.num_experts, m.moe_intermediate_size);
                    let gate = src.experts(Role::ExpertGate, l, ne, mi, h)?;
                    let up = src.experts(Role::ExpertUp, l, ne, mi, h)?;
                    let down = src.experts(Role::ExpertDown, l, ne, h, mi)?;
                    FeedForward::Moe(Moe {
                        router: lin(Role::Router, l, ne, h)?,
                        experts: gate
                            .into_iter()
                            .zip(up)
                            .zip(down)
                            .map(|((g, u), d)| Mlp {
                                gate_proj: Linear::new(g),
                                up_proj: Linear::new(u),
                                down_proj: Linear::new(d),
                            })
                            .collect(),
                        top_k: m.num_experts_per_tok,
                        norm_topk_prob: m.norm_topk_prob,
                    })
                }
                _ => FeedForward::Dense(Box::new(swiglu(l, c.intermediate_size)?)),
            };
            layers.push(Layer {
                input_layernorm: norm(Role::AttnNorm, l, h)?,
                attn,
                post_attention_layernorm: norm(Role::MlpNorm, l, h)?,
                mlp,
            });
        }
        let tied = c.tie_word_embeddings || !src.contains(Role::Head, 0);
        let lm_head = if tied { Linear::new(embed_tokens.clone()) } else { lin(Role::Head, 0, c.vocab_size, h)? };
        let (inv_freq, rope_scale) = c.rope_inv_freq();
        Ok(Qwen3 {
            norm: norm(Role::FinalNorm, 0, h)?,
            embed_tokens,
            layers,
            lm_head,
            tied,
            inv_freq,
            rope_scale,
            config,
            adapters: 0,
            default_adapter: 0,
        })
    }

    /// Every `Linear` of the model (the head too, tied or not).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = Vec::new();
        for l in &self.layers {
            let a = &l.attn;
            v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            match &l.mlp {
                FeedForward::Dense(s) => v.extend([&s.gate_proj, &s.up_proj, &s.down_proj]),
                FeedForward::Moe(Moe { router, experts, .. }) => {
                    v.push(router);
                    for s in experts {
                        v.extend([&s.gate_proj, &s.up_proj, &s.down_proj]);
                    }
                }
            }
        }
        v.push(&self.lm_head);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.attn;
            v.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            match &mut l.mlp {
                FeedForward::Dense(s) => v.extend([&mut s.gate_proj, &mut s.up_proj, &mut s.down_proj]),
                FeedForward::Moe(Moe { router, experts, .. }) => {
                    v.push(router);
                    for s in experts {
                        v.extend([&mut s.gate_proj, &mut s.up_proj, &mut s.down_proj]);
                    }
                }
            }
        }
        v.push(&mut self.lm_head);
        v
    }

    /// Converts weights to their kernels' layout, on `threads` threads, into one arena laid out
    /// in the order a forward pass reads them (so the weight stream of a decode step is one
    /// sequential read, on huge pages where the system gives them), and lets the file's pages
    /// of converted weights go. bf16 weights are converted only if asked and if the arena then
    /// fits in `budget` bytes (it is memory the system cannot page back to the file).
    fn pack(&mut self, threads: usize, bf16_tiles: bool, budget: usize) {
        let mut linears = self.linears_mut();
        let layout = |bf16: bool| {
            let mut total = 0;
            let at: Vec<_> = linears
                .iter()
                .map(|l| {
                    qwick_backend::quant::packed_bytes(&l.view(), bf16).map(|n| {
                        let r = total..total + n;
                        total = (total + n).next_multiple_of(64);
                        r
                    })
                })
                .collect();
            (at, total)
        };
        let (mut at, mut total) = layout(bf16_tiles);
        if bf16_tiles && total > budget {
            (at, total) = layout(false);
        }
        if total == 0 {
            return;
        }
        let mut arena = HugeBuf::zeroed(total);
        {
            // Disjoint slices of the arena, one per converted weight.
            let mut rest: &mut [u8] = &mut arena;
            let mut done = 0;
            let mut work: Vec<(&Linear, &mut [u8])> = Vec::new();
            for (l, r) in linears.iter().zip(&at) {
                if let Some(r) = r {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - done);
                    let (mine, tail) = tail.split_at_mut(r.len());
                    work.push((&**l, mine));
                    rest = tail;
                    done = r.end;
                }
            }
            let work = std::sync::Mutex::new(work);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let Some((l, out)) = work.lock().unwrap_or_else(|e| e.into_inner()).pop() else { break };
                        qwick_backend::quant::repack_into(&l.view(), out);
                        l.weight.release();
                    });
                }
            });
        }
        let arena = Arc::new(arena);
        for (l, r) in linears.iter_mut().zip(at) {
            if let Some(r) = r {
                l.packed = Some((arena.clone(), r));
            }
        }
    }

    /// Reads every weight once so the first token does not wait on the disk, calling
    /// `progress(done, total)` in bytes.
    pub fn prefetch(&self, progress: &dyn Fn(usize, usize)) {
        let total = self.weight_bytes();
        let skip_table = self.head_holds_table();
        let mut done = if skip_table { self.embed_tokens.bytes().len() } else { 0 };
        let mut touch = |b: &[u8]| {
            let mut s = 0u8;
            for p in (0..b.len()).step_by(4096) {
                s = s.wrapping_add(b[p]);
            }
            std::hint::black_box(s);
            done += b.len();
            progress(done.min(total), total);
        };
        if !skip_table {
            touch(self.embed_tokens.bytes());
        }
        for l in self.linears() {
            if !(self.tied && std::ptr::eq(l, &self.lm_head)) {
                touch(l.view().data);
            }
        }
    }

    /// Bytes of weights one decode step reads per token: everything but the embedding table
    /// (one row of it), counting only `top_k` of each MoE layer's experts.
    pub fn bytes_read_per_token(&self) -> usize {
        let lin = |l: &Linear| l.view().bytes();
        let sw = |s: &Mlp| lin(&s.gate_proj) + lin(&s.up_proj) + lin(&s.down_proj);
        let mut total = lin(&self.lm_head) + self.embed_tokens.bytes().len() / self.config.vocab_size;
        for l in &self.layers {
            let a = &l.attn;
            total += lin(&a.q_proj) + lin(&a.k_proj) + lin(&a.v_proj) + lin(&a.o_proj);
            total += match &l.mlp {
                FeedForward::Dense(s) => sw(s),
                FeedForward::Moe(Moe { router, experts, top_k, .. }) => {
                    lin(router) + top_k * experts.first().map(sw).unwrap_or(0)
                }
            };
        }
        total
    }

    /// Bytes of all weights (the tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let head = if self.tied { 0 } else { self.lm_head.view().bytes() };
        self.embed_tokens.bytes().len() + self.linears().iter().map(|l| l.view().bytes()).sum::<usize>()
            - self.lm_head.view().bytes()
            + head
    }

    /// A KV cache of f32 elements shaped for this model.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> KvCache {
        self.new_kv_cache_as(Format::F32, num_blocks, block_size)
    }

    /// A KV cache of `format` elements (see [`crate::KV_FORMATS`]) shaped for this model.
    pub fn new_kv_cache_as(&self, format: Format, num_blocks: usize, block_size: usize) -> KvCache {
        let c = &self.config;
        KvCache::with_format(format, c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim)
    }

    /// Whether the embedding table is read from the head: a tied head converted at load holds
    /// the same rows, so the file's table is then never paged in (not by `prefetch` either).
    fn head_holds_table(&self) -> bool {
        self.tied && self.lm_head.packed.is_some()
    }

    /// The embedding rows of `tokens`, `[tokens.len(), hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let table = if self.head_holds_table() {
            self.lm_head.view()
        } else {
            WeightView::new(self.embed_tokens.format, self.embed_tokens.bytes(), self.config.vocab_size, h)
        };
        let mut x = vec![0f32; tokens.len() * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            qwick_backend::quant::row_to_f32(&table, t as usize, row);
        }
        x
    }
}
