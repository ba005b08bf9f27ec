//! Writing Qwen3 models as GGUF files that llama.cpp, Ollama and qwick load: `qwick quantize`
//! (a Hugging Face folder or a GGUF file to any file type, streamed tensor by tensor) and
//! `qwick make-random --type` (random weights straight into a quantized file).
//!
//! Both start from a [`plan`]: every tensor of the model with its GGUF name, dimensions and
//! format (by [`recipe::choose`]), in the order a forward pass reads them. The header is
//! written from the plan, then the data tensor by tensor, so memory holds a few tensors at a
//! time whatever the model's size.

pub mod metadata;
pub mod recipe;

use anyhow::{anyhow, Result};
use qwick_backend::quant::quantize::quantize_rows;
use qwick_backend::Format;
use qwick_gguf::{GgufFile, StreamWriter, TensorDecl, Value};
use qwick_model::names::{self, Role};
use qwick_model::safetensors::{Checkpoint, Tensor};
use qwick_model::{Config, ModelFiles};
use recipe::{FileType, Kind, Shape};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `general.quantization_version` of the block layouts written (GGML's current one).
pub const QUANTIZATION_VERSION: u32 = 2;

/// One tensor of the output file.
#[derive(Debug, Clone)]
pub struct Planned {
    pub role: Role,
    pub layer: usize,
    /// Experts stacked in this tensor (GGUF keeps a layer's experts in one 3-D tensor), or 0.
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    pub format: Format,
}

impl Planned {
    pub fn name(&self) -> String {
        names::gguf(self.role, self.layer)
    }

    /// GGML dimensions (row length first).
    pub fn dims(&self) -> Vec<u64> {
        match (self.experts, self.rows) {
            (0, 1) => vec![self.cols as u64],
            (0, r) => vec![self.cols as u64, r as u64],
            (e, r) => vec![self.cols as u64, r as u64, e as u64],
        }
    }

    /// Rows of `cols` values in the whole tensor.
    pub fn total_rows(&self) -> usize {
        self.rows * self.experts.max(1)
    }

    pub fn bytes(&self) -> u64 {
        (self.total_rows() * self.format.row_bytes(self.cols)) as u64
    }

    pub fn decl(&self) -> TensorDecl {
        TensorDecl {
            name: self.name(),
            dims: self.dims(),
            ggml_type: self.format.info().ggml_type,
            bytes: self.bytes(),
        }
    }
}

fn kind(role: Role, tied: bool) -> Kind {
    match role {
        Role::Embed if tied => Kind::Output,
        Role::Embed => Kind::Embed,
        Role::Head => Kind::Output,
        Role::Q => Kind::AttnQ,
        Role::K => Kind::AttnK,
        Role::V => Kind::AttnV,
        Role::O => Kind::AttnOutput,
        Role::Gate | Role::ExpertGate => Kind::FfnGate,
        Role::Up | Role::ExpertUp => Kind::FfnUp,
        Role::Down | Role::ExpertDown => Kind::FfnDown,
        Role::FinalNorm | Role::AttnNorm | Role::QNorm | Role::KNorm | Role::MlpNorm | Role::Router => Kind::Float,
    }
}

/// Every tensor of a model with config `c` in file type `ft`, in forward-pass order.
pub fn plan(c: &Config, ft: &FileType) -> Vec<Planned> {
    let (h, tied) = (c.hidden_size, c.tie_word_embeddings);
    let shape = Shape {
        layers: c.num_hidden_layers,
        gqa: c.num_attention_heads / c.num_key_value_heads.max(1),
        experts: c.moe.as_ref().map_or(0, |m| m.num_experts),
    };
    let mut out = Vec::new();
    let mut add = |role: Role, layer: usize, experts: usize, rows: usize, cols: usize| {
        let format = recipe::choose(ft, kind(role, tied), layer, cols, &shape);
        out.push(Planned { role, layer, experts, rows, cols, format });
    };
    add(Role::Embed, 0, 0, c.vocab_size, h);
    for l in 0..c.num_hidden_layers {
        add(Role::AttnNorm, l, 0, 1, h);
        add(Role::Q, l, 0, c.q_dim(), h);
        add(Role::K, l, 0, c.kv_dim(), h);
        add(Role::V, l, 0, c.kv_dim(), h);
        add(Role::QNorm, l, 0, 1, c.head_dim);
        add(Role::KNorm, l, 0, 1, c.head_dim);
        add(Role::O, l, 0, h, c.q_dim());
        add(Role::MlpNorm, l, 0, 1, h);
        match &c.moe {
            Some(m) if c.is_sparse(l) => {
                let (ne, mi) = (m.num_experts, m.moe_intermediate_size);
                add(Role::Router, l, 0, ne, h);
                add(Role::ExpertGate, l, ne, mi, h);
                add(Role::ExpertUp, l, ne, mi, h);
                add(Role::ExpertDown, l, ne, h, mi);
            }
            _ => {
                add(Role::Gate, l, 0, c.intermediate_size, h);
                add(Role::Up, l, 0, c.intermediate_size, h);
                add(Role::Down, l, 0, h, c.intermediate_size);
            }
        }
    }
    add(Role::FinalNorm, 0, 0, 1, h);
    if !tied {
        add(Role::Head, 0, 0, c.vocab_size, h);
    }
    out
}

/// Counts of each format in a plan, by bytes: `(format, tensors, bytes)`.
pub fn summary(plan: &[Planned]) -> Vec<(Format, usize, u64)> {
    let mut m: BTreeMap<Format, (usize, u64)> = BTreeMap::new();
    for p in plan {
        let e = m.entry(p.format).or_default();
        e.0 += 1;
        e.1 += p.bytes();
    }
    m.into_iter().map(|(f, (n, b))| (f, n, b)).collect()
}

/// A model to convert: a Hugging Face folder or a GGUF file.
pub enum Source {
    Folder { dir: PathBuf, ck: Checkpoint },
    Gguf(GgufFile),
}

impl Source {
    /// Opens the model at `path` and reads its configuration.
    pub fn open(path: &Path) -> Result<(Source, Config)> {
        Ok(match ModelFiles::locate(path)? {
            ModelFiles::Folder(dir) => {
                let config = Config::from_file(&dir.join("config.json"))?;
                let ck = Checkpoint::open(&dir)?;
                (Source::Folder { dir, ck }, config)
            }
            ModelFiles::Gguf(file) => {
                let g = GgufFile::open(&file)?;
                let config = qwick_model::gguf::config(&g)?;
                (Source::Gguf(g), config)
            }
        })
    }

    /// The tensor (or each expert's) a planned tensor is made from, checked against its shape.
    fn tensors(&self, p: &Planned) -> Result<Vec<Tensor>> {
        let shape: Vec<usize> = if p.rows == 1 && p.experts == 0 { vec![p.cols] } else { vec![p.rows, p.cols] };
        match self {
            Source::Folder { ck, .. } if p.experts > 0 => {
                (0..p.experts).map(|e| ck.get(&names::hf(p.role, p.layer, e), &shape)).collect()
            }
            Source::Folder { ck, .. } => Ok(vec![ck.get(&names::hf(p.role, p.layer, 0), &shape)?]),
            Source::Gguf(g) if p.experts > 0 => {
                Ok(qwick_model::gguf::tensor(g, p.role, p.layer, &[p.experts, p.rows, p.cols])?.unstack())
            }
            Source::Gguf(g) => Ok(vec![qwick_model::gguf::tensor(g, p.role, p.layer, &shape)?]),
        }
    }

    /// Whether the output will carry a tokenizer (a folder without `tokenizer.json` gives a
    /// file that qwick can score with `logits` but that llama.cpp will not load).
    pub fn has_tokenizer(&self) -> bool {
        match self {
            Source::Folder { dir, .. } => dir.join("tokenizer.json").is_file(),
            Source::Gguf(g) => g.get("tokenizer.ggml.model").is_some(),
        }
    }

    /// The formats the source's weights are stored in (2-D and 3-D tensors).
    pub fn weight_formats(&self, plan: &[Planned]) -> Result<Vec<Format>> {
        let mut f: Vec<Format> = Vec::new();
        for p in plan.iter().filter(|p| p.rows > 1) {
            for t in self.tensors(p)? {
                if !f.contains(&t.format) {
                    f.push(t.format);
                }
            }
        }
        Ok(f)
    }

    /// The metadata of the output file before `general.file_type`: the source GGUF's own
    /// (less the keys a writer sets), or built from a folder's config and tokenizer.
    fn metadata(&self, c: &Config, name: Option<&str>) -> Result<Vec<(String, Value)>> {
        match self {
            Source::Folder { dir, .. } => {
                let default = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let mut m = metadata::model_keys(c, name.unwrap_or(&default));
                if dir.join("tokenizer.json").is_file() {
                    m.extend(metadata::tokenizer_keys(dir, c.vocab_size)?);
                }
                Ok(m)
            }
            Source::Gguf(g) => {
                let drop = |k: &str| {
                    k.starts_with("split.")
                        || k == "general.file_type"
                        || k == "general.quantization_version"
                        || k == "general.alignment"
                        || k.starts_with("quantize.")
                };
                let mut m: Vec<(String, Value)> = g.metadata.iter().filter(|(k, _)| !drop(k)).cloned().collect();
                if let Some(n) = name {
                    m.retain(|(k, _)| k != "general.name");
                    m.push(("general.name".into(), Value::String(n.into())));
                }
                Ok(m)
            }
        }
    }
}

/// Settings of a conversion.
pub struct Options {
    pub file_type: FileType,
    pub threads: usize,
    /// Split the output into files of at most this many bytes of tensor data.
    pub split_bytes: Option<u64>,
    /// `general.name` (default: the source's).
    pub name: Option<String>,
}

/// Progress of a conversion: bytes of output written of the total, and the tensor at hand.
pub struct Progress<'a> {
    pub done: u64,
    pub total: u64,
    pub tensor: &'a str,
}

/// Values converted per piece (the working memory of a conversion is a few times this).
const PIECE_VALUES: usize = 1 << 22;

/// Writes the planned tensors to a GGUF file at `out`: `meta` plus the file-type keys, then
/// each tensor piece by piece (a few million values at a time, never across two stacked
/// experts). `fill(i, e, rows, bytes)` puts rows `rows` of expert `e` (0 unless stacked) of
/// `plan[i]`, in its format, into `bytes`.
fn write_plan(
    plan: &[Planned],
    mut meta: Vec<(String, Value)>,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
    mut fill: impl FnMut(usize, usize, std::ops::Range<usize>, &mut [u8]) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    meta.push(("general.file_type".into(), Value::U32(opts.file_type.id)));
    meta.push(("general.quantization_version".into(), Value::U32(QUANTIZATION_VERSION)));
    let total: u64 = plan.iter().map(Planned::bytes).sum();
    let mut w = StreamWriter::create(out, meta, plan.iter().map(Planned::decl).collect(), opts.split_bytes)?;
    let mut done = 0u64;
    let mut bytes = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        let name = p.name();
        let rows_per_piece = (PIECE_VALUES / p.cols).max(1);
        for e in 0..p.experts.max(1) {
            for r0 in (0..p.rows).step_by(rows_per_piece) {
                let rows = r0..(r0 + rows_per_piece).min(p.rows);
                bytes.resize(rows.len() * p.format.row_bytes(p.cols), 0);
                fill(i, e, rows, &mut bytes)?;
                w.write(&bytes)?;
                done += bytes.len() as u64;
                progress(Progress { done, total, tensor: &name });
            }
        }
    }
    w.finish()
}

/// Converts `src` (config `c`) to a GGUF file at `out` as planned; returns the files written.
/// Every tensor is checked (present, right shape, a format qwick reads) before anything is
/// written.
pub fn convert(
    src: &Source,
    c: &Config,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<PathBuf>> {
    let plan = plan(c, &opts.file_type);
    let sources: Vec<Vec<Tensor>> = plan
        .iter()
        .map(|p| src.tensors(p).map_err(|e| anyhow!("{}: {e:#}", source_path(src))))
        .collect::<Result<_>>()?;
    let meta = src.metadata(c, opts.name.as_deref())?;
    let mut values = Vec::new();
    write_plan(&plan, meta, out, opts, progress, |i, e, rows, bytes| {
        let (p, t) = (&plan[i], &sources[i][e]);
        let in_row = t.format.row_bytes(p.cols);
        values.resize(rows.len() * p.cols, 0.0);
        t.format.dequantize(&t.bytes()[rows.start * in_row..rows.end * in_row], &mut values);
        quantize_rows(p.format, &values, rows.len(), bytes, opts.threads);
        if rows.end == p.rows {
            t.release();
        }
        Ok(())
    })
}

fn source_path(src: &Source) -> String {
    match src {
        Source::Folder { dir, .. } => dir.display().to_string(),
        Source::Gguf(g) => g.path.display().to_string(),
    }
}

/// A file of a self-speculative pair, derived from the random model a config and seed make:
/// the draft keeps its first layers (and its embeddings, final norm and head), the target damps
/// its later layers so that they change the residual stream little. Both keep every tensor
/// they share with the whole model bit for bit (same formats, same random blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Derive {
    /// Keep only the first N layers (the draft).
    pub keep_layers: Option<usize>,
    /// Scale the output projections (`attn_output`, `ffn_down`, the experts' down projections)
    /// of layers from the first number on by the second (the target).
    pub damp: Option<(usize, f32)>,
}

/// Writes a random-weight GGUF for config `c` in `opts.file_type` at `out`, with the tokenizer
/// of the folder `tokenizer` when given (llama.cpp needs one to load a file). Quantized weights
/// are random blocks (random codes, scales sized so weights stay within ±√(3/fan-in)); float
/// weights uniform in that range; norm weights one. Deterministic for a seed; `derive` writes
/// a file of a self-speculative pair instead of the whole model.
pub fn make_random(
    c: &Config,
    tokenizer: Option<&Path>,
    out: &Path,
    opts: &Options,
    seed: u64,
    derive: Derive,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<PathBuf>> {
    use qwick_backend::quant::dequant::random_blocks_into;
    // Each tensor's place in the whole model's plan seeds its blocks.
    let kept = |p: &Planned| {
        let global = matches!(p.role, Role::Embed | Role::Head | Role::FinalNorm);
        global || derive.keep_layers.is_none_or(|n| p.layer < n)
    };
    let (index, plan): (Vec<usize>, Vec<Planned>) =
        plan(c, &opts.file_type).into_iter().enumerate().filter(|(_, p)| kept(p)).unzip();
    let mut written = c.clone();
    if let Some(n) = derive.keep_layers {
        anyhow::ensure!(n > 0 && n <= c.num_hidden_layers, "cannot keep {n} of {} layers", c.num_hidden_layers);
        written.num_hidden_layers = n;
    }
    let mut meta = metadata::model_keys(&written, opts.name.as_deref().unwrap_or("random"));
    if let Some(dir) = tokenizer {
        meta.extend(metadata::tokenizer_keys(dir, c.vocab_size)?);
    }
    write_plan(&plan, meta, out, opts, progress, |i, e, rows, bytes| {
        let p = &plan[i];
        if p.rows == 1 {
            // A norm weight: ones.
            p.format.encode_floats(&vec![1.0; p.cols], bytes);
        } else {
            let piece = ((index[i] as u64) << 40) ^ ((e as u64) << 24) ^ rows.start as u64;
            let s = seed ^ piece.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let damped = matches!(p.role, Role::O | Role::Down | Role::ExpertDown);
            let scale = match derive.damp {
                Some((from, scale)) if damped && p.layer >= from => scale,
                _ => 1.0,
            };
            random_blocks_into(p.format, bytes, s, scale * (3.0 / p.cols as f32).sqrt());
        }
        Ok(())
    })
}

/// The format summary of a plan as text, e.g. `Q4_K ×217 (3.1 GB), Q6_K ×37 (1.0 GB), F32 ×113`.
pub fn describe(plan: &[Planned]) -> String {
    summary(plan).iter().map(|(f, n, b)| format!("{f} ×{n} ({:.2} GB)", *b as f64 / 1e9)).collect::<Vec<_>>().join(", ")
}
