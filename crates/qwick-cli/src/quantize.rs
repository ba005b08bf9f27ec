//! `qwick quantize` and `qwick make-random`: writing models as GGUF (or random safetensors).

use crate::common;
use anyhow::{bail, Context, Result};
use clap::Args;
use qwick_backend::{Format, ThreadPool};
use qwick_convert::recipe::FileType;
use qwick_convert::{Options, Progress, Source};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// The model to convert: a Hugging Face folder, a Hub id, or a GGUF file (requantized).
    #[arg(long)]
    model: String,
    /// The file type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S,
    /// Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, BF16, F16 or F32.
    #[arg(long = "type")]
    file_type: String,
    /// The output GGUF file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
pub struct WriteArgs {
    /// Split the output into files of at most this size (e.g. 40G, 500M), named
    /// NAME-00001-of-0000N.gguf.
    #[arg(long)]
    split_max_size: Option<String>,
    /// general.name of the written model.
    #[arg(long)]
    name: Option<String>,
    /// Worker threads (default: QWICK_THREADS or all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct MakeRandomArgs {
    /// A config.json of a Qwen3 model.
    #[arg(long)]
    config: PathBuf,
    /// Output: a folder (safetensors, the Hub layout) or, with --type, a GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// Stored dtype of a safetensors checkpoint: bf16, f16 or f32.
    #[arg(long, default_value = "bf16", conflicts_with = "file_type")]
    dtype: String,
    /// Write a GGUF file of this file type instead (Q4_K_M, Q8_0, BF16, ... as `quantize`
    /// takes; same per-tensor formats).
    #[arg(long = "type")]
    file_type: Option<String>,
    /// Folder with the tokenizer.json (and tokenizer_config.json) to embed in a GGUF file
    /// (default: the config's folder when it has one). llama.cpp needs a tokenizer to load.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest safetensors shard in GB (bigger checkpoints are sharded with an index).
    #[arg(long, default_value_t = 4.0)]
    shard_gb: f64,
    /// A draft of a self-speculative pair: only the first N layers of the model this config and
    /// seed make (with its embeddings, final norm and head, bit for bit). With --type.
    #[arg(long, value_name = "N", requires = "file_type")]
    keep_layers: Option<usize>,
    /// The target of a self-speculative pair: the output projections (attn_output, ffn_down)
    /// of layers N and later scaled by --damp, so that those layers change the residual stream
    /// little and a draft of the first N layers agrees with the model often. With --type.
    #[arg(long, value_name = "N", requires_all = ["file_type", "damp"])]
    damp_from: Option<usize>,
    /// The scale of --damp-from (0 to 1).
    #[arg(long, value_name = "S", requires = "damp_from")]
    damp: Option<f32>,
    #[command(flatten)]
    write: WriteArgs,
}

/// Parses a size such as `40G`, `500M`, `1.5GB` or `123456` (bytes).
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.strip_suffix('B').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('G') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().with_context(|| format!("--split-max-size {s:?}: expected a size such as 40G"))?;
    if !(v > 0.0) {
        bail!("--split-max-size {s:?} must be positive");
    }
    Ok((v * mult) as u64)
}

impl WriteArgs {
    fn options(&self, file_type: FileType) -> Result<Options> {
        Ok(Options {
            file_type,
            threads: self.threads.filter(|&t| t > 0).unwrap_or_else(ThreadPool::default_threads),
            split_bytes: self.split_max_size.as_deref().map(parse_size).transpose()?,
            name: self.name.clone(),
        })
    }
}

/// On Ctrl-C, removes the files being written before exiting.
fn remove_partial_files_on_interrupt() {
    let _ = ctrlc::set_handler(|| {
        for p in qwick_gguf::partial_files() {
            let _ = std::fs::remove_file(&p);
        }
        eprintln!("\ninterrupted; no output written");
        std::process::exit(130);
    });
}

fn write_with_progress(what: &str, f: impl FnOnce(&mut dyn FnMut(Progress)) -> Result<Vec<PathBuf>>) -> Result<()> {
    remove_partial_files_on_interrupt();
    let bar = common::progress_bar(what);
    let t0 = Instant::now();
    let paths = f(&mut |p: Progress| {
        if let Some(b) = &bar {
            b.set_message(format!("{what} {}", p.tensor));
        }
        common::tick(&bar, p.done as usize, p.total as usize)
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let size: u64 = paths.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {} ({:.2} GB) in {:.1} s", names.join(", "), size as f64 / 1e9, t0.elapsed().as_secs_f64());
    Ok(())
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let ft = FileType::parse(&a.file_type)?;
    let opts = a.write.options(ft)?;
    let path = qwick_chat::resolve::resolve_model(&a.model)?;
    let (src, config) = Source::open(&path)?;
    let plan = qwick_convert::plan(&config, &ft);
    let lossy = |f: &Format| !f.is_float();
    let from = src.weight_formats(&plan)?;
    if from.iter().any(lossy) && !ft.base.is_float() {
        let names: Vec<&str> = from.iter().map(|f| f.name()).collect();
        eprintln!(
            "warning: {} holds weights already quantized ({}); quantizing them again to {} adds the errors of both \
             (quantize from the original bf16 model where you can)",
            path.display(),
            names.join(", "),
            ft.name
        );
    }
    if !src.has_tokenizer() {
        eprintln!(
            "note: {} has no tokenizer; the file will have none (llama.cpp and `qwick run` need one)",
            path.display()
        );
    }
    eprintln!("{} → {} {}: {}", path.display(), a.out.display(), ft.name, qwick_convert::describe(&plan));
    write_with_progress("quantizing", |p| qwick_convert::convert(&src, &config, &a.out, &opts, p))
}

pub fn make_random(a: MakeRandomArgs) -> Result<()> {
    let Some(ft) = &a.file_type else {
        let dtype = match a.dtype.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Format::BF16,
            "f16" | "float16" => Format::F16,
            "f32" | "float32" => Format::F32,
            other => bail!("--dtype {other}: expected bf16, f16 or f32"),
        };
        let bar = common::progress_bar("writing");
        qwick_model::random::make_random(&a.config, &a.out, dtype, a.seed, (a.shard_gb * 1e9) as usize, &|d, t| {
            common::tick(&bar, d, t)
        })?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        eprintln!("wrote {}", a.out.display());
        return Ok(());
    };
    let ft = FileType::parse(ft)?;
    let opts = a.write.options(ft)?;
    let config = qwick_model::Config::from_file(&a.config)?;
    if a.damp.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
        bail!("--damp takes a scale from 0 to 1");
    }
    if let Some(n) = a.damp_from.filter(|&n| n >= config.num_hidden_layers) {
        bail!("--damp-from {n}: the model has {} layers, so nothing would be damped", config.num_hidden_layers);
    }
    let derive = qwick_convert::Derive { keep_layers: a.keep_layers, damp: a.damp_from.zip(a.damp) };
    let tokenizer = match &a.tokenizer {
        Some(t) => Some(t.clone()),
        None => a.config.parent().filter(|d| d.join("tokenizer.json").is_file()).map(Path::to_path_buf),
    };
    if tokenizer.is_none() {
        eprintln!(
            "note: no tokenizer.json next to {}; the file has no tokenizer (give --tokenizer DIR)",
            a.config.display()
        );
    }
    let plan = qwick_convert::plan(&config, &ft);
    eprintln!("random {} → {}: {}", ft.name, a.out.display(), qwick_convert::describe(&plan));
    write_with_progress("writing", |p| {
        qwick_convert::make_random(&config, tokenizer.as_deref(), &a.out, &opts, a.seed, derive, p)
    })
}
