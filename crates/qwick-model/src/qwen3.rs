//! Qwen3 and Qwen3-MoE, as transformers' `modeling_qwen3.py` / `modeling_qwen3_moe.py` define
//! them: pre-norm decoder layers of GQA attention (per-head RMSNorm on q and k before RoPE)
//! and a SwiGLU MLP or a top-k mixture of SwiGLU experts, then a final norm and the head.

use crate::batch::Batch;
use crate::config::Config;
use crate::kv::KvCache;
use crate::lora::Adapter;
use crate::names::{self, Role};
use crate::safetensors::{Checkpoint, Tensor};
use anyhow::{bail, Context, Result};
use qwick_backend::alloc::HugeBuf;
use qwick_backend::attention::{paged_attention, AttnArgs};
use qwick_backend::pool::SendPtr;
use qwick_backend::{matmul, matmul_batch, ops, par_rows, Ctx, Format, MatmulJob, WeightView};
use qwick_gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A `Linear` weight ([out, in]), as stored, or converted to the layout its kernels read.
pub struct Linear {
    pub weight: Tensor,
    /// The converted weight: a range of the model's arena.
    packed: Option<(Arc<HugeBuf>, std::ops::Range<usize>)>,
    /// LoRA adapters' updates of this weight, by adapter number.
    lora: Vec<(u16, LowRank)>,
}

/// A LoRA adapter's update of a `Linear`, kept apart from the base weight (which stays as
/// stored, quantized or not): `y += s · (x · Aᵀ) · Bᵀ`, as PEFT adds it.
pub struct LowRank {
    /// `[r, in]`.
    a: Vec<f32>,
    /// `[out, r]`.
    b: Vec<f32>,
    r: usize,
    s: f32,
}

impl Linear {
    pub fn new(weight: Tensor) -> Linear {
        Linear { weight, packed: None, lora: vec![] }
    }

    /// Adds each row's adapter update for inputs `x` (`n` rows) to `y` (`n` rows of outputs);
    /// `rows[i]` is row `i`'s adapter (0: none). Rows of one adapter are gathered, and the
    /// adapters present run as one batch of products (`x·Aᵀ` for all of them, then `·Bᵀ`), so a
    /// step mixing adapters costs two parallel dispatches per projection, not two per adapter.
    fn add_lora(&self, ctx: Ctx, x: &[f32], n: usize, y: &mut [f32], rows: &[u16]) {
        let (out, inp) = (self.weight.shape[0], self.weight.shape[1]);
        // (adapter update, its rows, their inputs gathered)
        let present: Vec<(&LowRank, Vec<usize>, std::borrow::Cow<[f32]>)> = self
            .lora
            .iter()
            .filter_map(|(id, l)| {
                let mine: Vec<usize> = (0..n).filter(|&i| rows[i] == *id).collect();
                let xs = match mine.len() {
                    0 => return None,
                    m if m == n => std::borrow::Cow::Borrowed(&x[..n * inp]),
                    _ => std::borrow::Cow::Owned(
                        mine.iter().flat_map(|&i| x[i * inp..(i + 1) * inp].iter().copied()).collect(),
                    ),
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

    pub fn view(&self) -> WeightView<'_> {
        let (w, rows, cols) = (&self.weight, self.weight.shape[0], self.weight.shape[1]);
        match &self.packed {
            Some((arena, r)) => WeightView::tiles(w.format, &arena[r.clone()], rows, cols),
            None => WeightView::new(w.format, w.bytes(), rows, cols),
        }
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
    /// LoRA adapters attached ([`Qwen3::add_adapter`]), and the one sequences use by default.
    adapters: u16,
    default_adapter: u16,
}

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

impl Source<'_> {
    fn get(&self, role: Role, l: usize, shape: &[usize]) -> Result<Tensor> {
        match self {
            Source::Safetensors(ck) => ck.get(&names::hf(role, l, 0), shape),
            Source::Gguf(g) => crate::gguf::tensor(g, role, l, shape),
        }
    }

    fn contains(&self, role: Role, l: usize) -> bool {
        match self {
            Source::Safetensors(ck) => ck.contains(&names::hf(role, l, 0)),
            Source::Gguf(g) => crate::gguf::contains(g, role, l),
        }
    }

    /// The `n` experts' weights of `role` in layer `l`, each `[rows, cols]`.
    fn experts(&self, role: Role, l: usize, n: usize, rows: usize, cols: usize) -> Result<Vec<Tensor>> {
        match self {
            Source::Safetensors(ck) => (0..n).map(|e| ck.get(&names::hf(role, l, e), &[rows, cols])).collect(),
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
            if let Mlp::Dense(m) = &mut layer.mlp {
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
        let norm = |role: Role, l: usize, n: usize| -> Result<Vec<f32>> { Ok(src.get(role, l, &[n])?.to_f32()) };
        let lin = |role: Role, l: usize, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(src.get(role, l, &[out, inp])?))
        };
        let swiglu = |l: usize, inter: usize| -> Result<SwiGlu> {
            Ok(SwiGlu {
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
                    Mlp::Moe {
                        router: lin(Role::Router, l, ne, h)?,
                        experts: gate
                            .into_iter()
                            .zip(up)
                            .zip(down)
                            .map(|((g, u), d)| SwiGlu {
                                gate_proj: Linear::new(g),
                                up_proj: Linear::new(u),
                                down_proj: Linear::new(d),
                            })
                            .collect(),
                        top_k: m.num_experts_per_tok,
                        norm_topk_prob: m.norm_topk_prob,
                    }
                }
                _ => Mlp::Dense(swiglu(l, c.intermediate_size)?),
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
                Mlp::Dense(s) => v.extend([&s.gate_proj, &s.up_proj, &s.down_proj]),
                Mlp::Moe { router, experts, .. } => {
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
                Mlp::Dense(s) => v.extend([&mut s.gate_proj, &mut s.up_proj, &mut s.down_proj]),
                Mlp::Moe { router, experts, .. } => {
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

    /// cos and sin of each position's rotary angles (`[positions.len(), head_dim / 2]` each),
    /// f32 as transformers computes them.
    pub fn rope_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
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
        (cos, sin)
    }

    /// Runs one step: writes the batch's K/V into `kv` and returns the logits of
    /// `batch.logits_rows`, row-major `[logits_rows.len(), vocab]`.
    pub fn forward(&self, ctx: Ctx, batch: &Batch, kv: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        batch.validate(c.vocab_size, kv.num_blocks, kv.block_size).context("invalid batch")?;
        let n = batch.len();
        let (h, qd, kvd, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim);
        let isa = ctx.isa;

        let mut x = self.embed(&batch.tokens);
        let half = hd / 2;
        let (cos, sin) = self.rope_tables(&batch.positions);

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

        // Each row's adapter (nothing to compute for a model without adapters).
        let rows_adapter: Vec<u16> = match self.adapters {
            0 => vec![],
            _ => batch
                .seq_of_token
                .iter()
                .map(|&q| batch.seq_adapter.get(q as usize).copied().filter(|&a| a > 0).unwrap_or(self.default_adapter))
                .collect(),
        };
        if let Some(&bad) = batch.seq_adapter.iter().find(|&&a| a > self.adapters) {
            bail!("adapter {bad} asked for, but the model has {}", self.adapters);
        }
        let ra = &rows_adapter;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            par_rows(ctx, n, &mut hn, h, |r, out| {
                ops::rms_norm(isa, &x[r.start * h..r.end * h], &layer.input_layernorm, eps, out)
            });
            let a = &layer.attn;
            matmul_batch(
                ctx,
                &[
                    MatmulJob::new(&hn, n, a.q_proj.view(), &mut q),
                    MatmulJob::new(&hn, n, a.k_proj.view(), &mut k),
                    MatmulJob::new(&hn, n, a.v_proj.view(), &mut v),
                ],
            );
            a.q_proj.add_lora(ctx, &hn, n, &mut q, ra);
            a.k_proj.add_lora(ctx, &hn, n, &mut k, ra);
            a.v_proj.add_lora(ctx, &hn, n, &mut v, ra);
            {
                let (fmt, layout) = (kv.format, kv.layout());
                let (es, bs) = (fmt.row_bytes(1), layout.block_size);
                let (kc, vc) = kv.layer_mut(l);
                let (kp, vp, qp, kkp) =
                    (SendPtr::new(kc), SendPtr::new(vc), SendPtr::new(&mut q), SendPtr::new(&mut k));
                let (v, slots) = (&v, &batch.slot_mapping);
                let (cos, sin) = (&cos, &sin);
                ctx.pool.for_chunks(n, if n >= 8 { 1 } else { n }, &|r| {
                    for i in r {
                        // SAFETY: row i of q and k (within their n rows), and row i only: each
                        // chunk of rows goes to one thread.
                        let qi = unsafe { qp.slice(i * qd, qd) };
                        let ki = unsafe { kkp.slice(i * kvd, kvd) };
                        ops::rms_norm_inplace(isa, qi, &a.q_norm, eps);
                        ops::rms_norm_inplace(isa, ki, &a.k_norm, eps);
                        let (cs, sn) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
                        ops::rope_inplace(isa, qi, cs, sn);
                        ops::rope_inplace(isa, ki, cs, sn);
                        let slot = slots[i] as usize;
                        // SAFETY: the batch was validated (slots inside the cache), so each row is
                        // inside this layer's buffers; distinct tokens have distinct slots, so no
                        // two threads write the same bytes.
                        unsafe {
                            // Each KV head's values go to that head's rows of the block.
                            for h in 0..layout.kv_heads {
                                let (d, at) = (layout.head_dim, layout.row(slot / bs, h, slot % bs) * es);
                                fmt.encode_floats(&ki[h * d..(h + 1) * d], kp.slice(at, d * es));
                                fmt.encode_floats(&v[i * kvd + h * d..i * kvd + (h + 1) * d], vp.slice(at, d * es));
                            }
                        }
                    }
                });
            }
            paged_attention(ctx, &q, kv.layer(l), &args, &mut att);
            matmul(ctx, &att, n, &a.o_proj.view(), &mut tmp);
            a.o_proj.add_lora(ctx, &att, n, &mut tmp, ra);
            par_rows(ctx, n, &mut x, h, |r, xo| ops::add_inplace(isa, xo, &tmp[r.start * h..r.end * h]));

            // MLP block.
            par_rows(ctx, n, &mut hn, h, |r, out| {
                ops::rms_norm(isa, &x[r.start * h..r.end * h], &layer.post_attention_layernorm, eps, out)
            });
            match &layer.mlp {
                Mlp::Dense(s) => swiglu(ctx, s, &hn, n, &mut tmp, ra),
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

/// `out = down(silu(gate(x)) · up(x))`.
fn swiglu(ctx: Ctx, s: &SwiGlu, x: &[f32], n: usize, out: &mut [f32], rows_adapter: &[u16]) {
    let inter = s.gate_proj.weight.shape[0];
    let mut g = vec![0f32; n * inter];
    let mut u = vec![0f32; n * inter];
    matmul_batch(
        ctx,
        &[MatmulJob::new(x, n, s.gate_proj.view(), &mut g), MatmulJob::new(x, n, s.up_proj.view(), &mut u)],
    );
    s.gate_proj.add_lora(ctx, x, n, &mut g, rows_adapter);
    s.up_proj.add_lora(ctx, x, n, &mut u, rows_adapter);
    par_rows(ctx, n, &mut g, inter, |r, gr| ops::silu_mul(ctx.isa, gr, &u[r.start * inter..r.end * inter]));
    matmul(ctx, &g, n, &s.down_proj.view(), out);
    s.down_proj.add_lora(ctx, &g, n, out, rows_adapter);
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
    let h = router.weight.shape[1];
    let mut probs = vec![0f32; n * ne];
    matmul(ctx, x, n, &router.view(), &mut probs);
    // Per expert: (row, weight) of the tokens routed to it.
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
    for (t, chosen) in route(&mut probs, ne, top_k, norm_topk_prob).into_iter().enumerate() {
        for (e, w) in chosen {
            routed[e].push((t, w));
        }
    }
    let active: Vec<usize> = (0..ne).filter(|&e| !routed[e].is_empty()).collect();
    let inter = experts[0].gate_proj.weight.shape[0];
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
        matmul_batch(ctx, &jobs);
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
        matmul_batch(ctx, &jobs);
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
