//! Options and helpers shared by subcommands.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qwick_backend::matmul::Bf16Timing;
use qwick_backend::{Bf16Mode, DeviceSpec, Format, Isa, ThreadPool};
use qwick_engine::{Runner, RunnerConfig, Scheduler, SchedulerConfig, SpecConfig};
use qwick_model::{LoadOptions, Qwen3};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Worker threads (default: QWICK_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Kernel instruction set: scalar, avx2, avx512, avx512vnni or avx512bf16 (default:
    /// QWICK_ISA, else the fastest available; `logits` defaults to the fastest exact one).
    #[arg(long)]
    pub isa: Option<String>,
    /// Exact products: f32 activations for every weight format (quantized weights
    /// dequantized), instead of activations quantized to 8 bits (quantized weights) or rounded
    /// to bf16 (bf16 weights on AMX).
    #[arg(long)]
    pub exact: bool,
    /// Keep quantized weights in the file's layout (memory-mapped, nothing copied) instead of
    /// converting them at load to the layout the kernels read fastest.
    #[arg(long)]
    pub no_repack: bool,
    /// A LoRA adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors): DIR.
    /// `serve` takes several, as NAME=DIR (or DIR, named after its folder), each served as a
    /// model of its own that requests pick by their `model` field.
    #[arg(long)]
    pub lora: Vec<String>,
    /// Element type of the KV cache: f32, bf16 or f16 (default bf16: half the memory and reads
    /// of f32, greedy output unchanged on the test models; `logits` defaults to f32).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// Where the model runs: cpu, gpu or gpu:N (an adapter as `qwick devices` lists them).
    /// On a GPU the weights stay in their stored formats in device memory, beside the KV cache.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl RunArgs {
    pub fn threads(&self) -> usize {
        self.threads.filter(|&t| t > 0).unwrap_or_else(ThreadPool::default_threads)
    }

    /// The ISA asked for, else the fastest one.
    pub fn isa(&self) -> Result<Isa> {
        self.isa_or(Isa::best())
    }

    /// The ISA asked for (flag, then `QWICK_ISA`), else `default`.
    pub fn isa_or(&self, default: Isa) -> Result<Isa> {
        Isa::check_cap().map_err(anyhow::Error::msg)?;
        match &self.isa {
            Some(s) => Isa::parse(s).map_err(|e| anyhow::anyhow!("--isa {e}")),
            None if std::env::var("QWICK_ISA").is_ok_and(|v| !v.is_empty()) => {
                Isa::from_env().map_err(anyhow::Error::msg)
            }
            None => Ok(default),
        }
    }

    /// How bf16 weights are multiplied on `isa`, and why (see [`RunArgs::bf16_choice`]).
    pub fn bf16_mode(&self, isa: Isa) -> Result<(Option<Bf16Mode>, &'static str)> {
        let c = self.bf16_choice(isa)?;
        Ok((c.mode, c.why))
    }

    /// How bf16 weights are multiplied on `isa`, and why: `QWICK_BF16` (f32, bf16-dot, bf16-fma or amx)
    /// if set; what the ISA implies when one was asked for (`--isa`, `QWICK_ISA`) or with
    /// `--exact`; else the mode [`qwick_backend::matmul::calibrate_bf16`] chooses on this CPU
    /// model, measured once and kept in the user's cache folder with its figures, and measured
    /// again when the kernels' generation or the qwick binary changes.
    pub fn bf16_choice(&self, isa: Isa) -> Result<Bf16Choice> {
        let choice = |mode, why| Ok(Bf16Choice { mode, why, timings: Vec::new() });
        if let Ok(v) = std::env::var("QWICK_BF16") {
            if !v.is_empty() {
                let m = Bf16Mode::parse(&v)
                    .with_context(|| format!("QWICK_BF16={v}: expected f32, bf16-dot, bf16-fma or amx"))?;
                if !m.supported() {
                    anyhow::bail!("QWICK_BF16={v}: this CPU does not support it");
                }
                return choice(Some(m), "QWICK_BF16");
            }
        }
        let forced = self.isa.is_some() || std::env::var("QWICK_ISA").is_ok_and(|v| !v.is_empty());
        if self.exact || forced {
            return choice(None, if self.exact { "--exact" } else { "the ISA asked for" });
        }
        // Keyed by what the kernels can use (QWICK_MAX_ISA may cap it).
        let cpu = format!("{} ({})", cpu_model(), Isa::best());
        let stamp = serde_json::json!({
            "kernels": qwick_backend::matmul::BF16_KERNELS,
            "binary": binary_stamp(),
        });
        let file = cache_dir().map(|d| d.join("bf16-kernels.json"));
        let mut known: serde_json::Map<String, serde_json::Value> = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        // The figures are kept; the mode is chosen from them again. Modes this CPU lacks (a file
        // edited by hand, or carried to another machine) are measured again rather than run.
        if let Some(timings) = known
            .get(&cpu)
            .filter(|e| e.get("stamp") == Some(&stamp))
            .and_then(|e| timings_from_json(e.get("timings")?))
            .filter(|t| !t.is_empty() && t.iter().all(|t| t.mode.supported()))
        {
            let mode = qwick_backend::matmul::choose_bf16(&timings);
            return Ok(Bf16Choice { mode: Some(mode), why: "measured on this CPU model earlier", timings });
        }
        // Measured once per process (loading and the runner both ask).
        static MEASURED: std::sync::OnceLock<Vec<Bf16Timing>> = std::sync::OnceLock::new();
        let timings = MEASURED
            .get_or_init(|| qwick_backend::matmul::calibrate_bf16(isa, &ThreadPool::new(self.threads())))
            .clone();
        let mode = qwick_backend::matmul::choose_bf16(&timings);
        known.insert(cpu, serde_json::json!({ "stamp": stamp, "timings": timings_to_json(&timings) }));
        if let Some(f) = file {
            // Best effort: without a writable cache folder, the next run measures again.
            let _ = write_atomically(&f, serde_json::Value::Object(known).to_string().as_bytes());
        }
        Ok(Bf16Choice { mode: Some(mode), why: "measured now", timings })
    }

    /// Where the model runs (`--device`).
    pub fn device(&self) -> Result<DeviceSpec> {
        DeviceSpec::parse(&self.device).map_err(|e| anyhow::anyhow!("--device: {e}"))
    }

    /// The KV cache's element format asked for, else `default`.
    pub fn kv_format_or(&self, default: Format) -> Result<Format> {
        match &self.kv_dtype {
            None => Ok(default),
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "f32" => Ok(Format::F32),
                "bf16" => Ok(Format::BF16),
                "f16" => Ok(Format::F16),
                _ => anyhow::bail!("--kv-dtype {s}: expected f32, bf16 or f16"),
            },
        }
    }

    /// The KV cache's element format (bf16 unless asked otherwise).
    pub fn kv_format(&self) -> Result<Format> {
        self.kv_format_or(Format::BF16)
    }

    /// A runner on `isa` whose cache holds `tokens` tokens of `kv` elements.
    pub fn runner_as(&self, model: Arc<Qwen3>, tokens: usize, isa: Isa, kv: Format) -> Result<Runner> {
        Runner::new(model, &self.runner_config(tokens, isa, kv)?)
    }

    /// The runner configuration these options ask for.
    pub fn runner_config(&self, tokens: usize, isa: Isa, kv: Format) -> Result<RunnerConfig> {
        let mut cfg = RunnerConfig::with_tokens(tokens, self.threads(), isa);
        cfg.exact = self.exact;
        cfg.kv_format = kv;
        cfg.device = self.device()?;
        // How bf16 weights meet activations is a matter for the CPU's kernels only.
        if cfg.device == DeviceSpec::Cpu {
            cfg.bf16 = self.bf16_mode(isa)?.0;
        }
        Ok(cfg)
    }

    /// The scheduler (with its prefix cache) over a [`RunArgs::runner`], with the speculative
    /// decoding of `spec`: the generation loop of `run` and `chat`, as of the server. `dir`:
    /// the model's folder or file (for the draft's vocabulary check).
    pub fn scheduler(
        &self,
        model: Arc<Qwen3>,
        dir: &Path,
        spec: &SpecArgs,
        tokens: usize,
        isa: Isa,
    ) -> Result<Scheduler> {
        let cfg = SchedulerConfig { spec: spec.config()?, ..SchedulerConfig::default() };
        let draft = spec.draft((&model, dir), self)?;
        let sched = Scheduler::new(self.runner(model, tokens, isa)?, cfg);
        Ok(match draft {
            Some(d) => sched.with_draft_model(self.runner(d, tokens, isa)?),
            None => sched,
        })
    }

    /// A runner on `isa` whose cache holds `tokens` tokens (of [`RunArgs::kv_format`]).
    pub fn runner(&self, model: Arc<Qwen3>, tokens: usize, isa: Isa) -> Result<Runner> {
        self.runner_as(model, tokens, isa, self.kv_format()?)
    }

    /// How to load the model: bf16 weights go to tiles when bf16 products will round their
    /// activations to bf16 (AMX, bf16 dot products or FMAs; not `--exact`, not `--no-repack`).
    pub fn load_options(&self) -> Result<LoadOptions> {
        let dirs = self.adapters().into_iter().map(|(_, d)| d).collect();
        let isa = self.isa()?;
        let on_cpu = self.device()? == DeviceSpec::Cpu;
        let rounded = on_cpu && self.bf16_mode(isa)?.0.unwrap_or(Bf16Mode::for_isa(isa)) != Bf16Mode::F32;
        Ok(LoadOptions {
            // A GPU reads the weights as stored: no CPU layout to convert them to.
            repack: !self.no_repack && on_cpu,
            bf16_tiles: rounded && !self.exact,
            // Room for the KV cache and the rest beside the converted weights.
            bf16_tiles_budget: available_memory().map_or(usize::MAX, |m| m / 10 * 8),
            threads: self.threads(),
            lora: dirs,
            lora_for_all: true,
        })
    }

    /// The `--lora` adapters as (name, folder).
    pub fn adapters(&self) -> Vec<(String, std::path::PathBuf)> {
        self.lora
            .iter()
            .map(|s| match s.split_once('=') {
                Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_string(), d.into()),
                _ => {
                    let p = std::path::PathBuf::from(s);
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| s.clone());
                    (name, p)
                }
            })
            .collect()
    }
}

/// Speculative decoding (`run`, `chat`, `serve`, `bench`).
#[derive(clap::Args, Clone, Default)]
pub struct SpecArgs {
    /// Speculative decoding with a draft model: a smaller model of the same vocabulary and
    /// tokenizer (folder, GGUF file, Hub id or tag, ollama:NAME) drafts tokens that the model
    /// verifies several at a time. Greedy output is the output without it (as exactly as
    /// batching keeps it: token for token on the exact kernels); sampled output keeps the
    /// model's distribution (a seed then gives other draws than without speculation).
    #[arg(long, value_name = "MODEL", conflicts_with = "spec")]
    pub draft_model: Option<String>,
    /// Speculative decoding by prompt lookup, with no draft model: `ngram` or `ngram:N` drafts
    /// what followed the latest earlier occurrence of the last N (default 3, down to 1) tokens
    /// of the prompt and output so far.
    #[arg(long, value_name = "ngram[:N]")]
    pub spec: Option<String>,
    /// Most tokens drafted per step (default 5); the draft length adapts below it, down to
    /// plain decoding while drafts keep being rejected.
    #[arg(long, value_name = "K")]
    pub draft_tokens: Option<usize>,
    /// Speculate only in steps where at most N sequences are decoding (default 2): with more,
    /// verifying drafts costs more than it saves.
    #[arg(long, value_name = "N")]
    pub spec_max_seqs: Option<usize>,
}

impl SpecArgs {
    /// The speculative settings asked for, if any.
    pub fn config(&self) -> Result<Option<SpecConfig>> {
        let k = self.draft_tokens.unwrap_or(qwick_engine::spec::DEFAULT_DRAFT_TOKENS);
        let c = match (&self.draft_model, &self.spec) {
            (Some(_), _) => SpecConfig::model(k),
            (None, Some(s)) => SpecConfig::parse(s, k),
            (None, None) if self.draft_tokens.is_some() || self.spec_max_seqs.is_some() => {
                anyhow::bail!("--draft-tokens and --spec-max-seqs go with --draft-model or --spec")
            }
            (None, None) => return Ok(None),
        };
        let c = c.map_err(anyhow::Error::msg)?;
        Ok(Some(match self.spec_max_seqs {
            Some(0) => anyhow::bail!("--spec-max-seqs must be at least 1"),
            Some(n) => c.with_max_seqs(n),
            None => c,
        }))
    }

    /// Loads the draft model (`--draft-model`) with `run`'s options but no LoRA adapters,
    /// refusing one whose vocabulary differs from the target's (`target`: its model and its
    /// folder or file).
    pub fn draft(&self, target: (&Qwen3, &Path), run: &RunArgs) -> Result<Option<Arc<Qwen3>>> {
        let Some(spec) = &self.draft_model else { return Ok(None) };
        let path = qwick_chat::resolve::resolve_model(spec)?;
        let draft = load_model_with(&path, &LoadOptions { lora: vec![], ..run.load_options()? })?;
        check_draft_vocabulary(target, (&draft, &path)).with_context(|| format!("--draft-model {spec}"))?;
        Ok(Some(draft))
    }
}

/// Refuses a draft whose vocabulary differs from the target's: its size, and where both have
/// a tokenizer, any token's id (named) or the special tokens.
fn check_draft_vocabulary(target: (&Qwen3, &Path), draft: (&Qwen3, &Path)) -> Result<()> {
    let (t, d) = (target.0.config.vocab_size, draft.0.config.vocab_size);
    if t != d {
        anyhow::bail!("the draft's vocabulary has {d} entries, the model's {t}: drafts would not be the same tokens");
    }
    let vocab = |p: &Path| qwick_chat::ChatModel::load(p, None, None).map(|c| c.tokenizer.inner().get_vocab(true));
    match (vocab(target.1), vocab(draft.1)) {
        (Ok(tv), Ok(dv)) => {
            let mut differ: Vec<(&String, Option<u32>, Option<u32>)> = tv
                .iter()
                .filter(|(tok, id)| dv.get(*tok) != Some(id))
                .map(|(tok, &id)| (tok, Some(id), dv.get(tok).copied()))
                .chain(dv.iter().filter(|(tok, _)| !tv.contains_key(*tok)).map(|(tok, &id)| (tok, None, Some(id))))
                .collect();
            differ.sort_by_key(|e| e.1.or(e.2));
            if let Some((tok, ti, di)) = differ.first() {
                let id = |i: &Option<u32>| i.map_or("absent".to_string(), |i| format!("id {i}"));
                anyhow::bail!(
                    "the draft's tokenizer differs from the model's: {} tokens differ, first {tok:?} ({} in the model, {} in the draft)",
                    differ.len(),
                    id(ti),
                    id(di)
                );
            }
            Ok(())
        }
        (Ok(_), Err(e)) => anyhow::bail!("the draft's tokenizer cannot be compared with the model's: {e:#}"),
        // A model without a tokenizer (a random benchmark file): the sizes agree.
        (Err(_), _) => Ok(()),
    }
}

/// The CPU's model name (`/proc/cpuinfo`), or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// How bf16 products run: the mode (`None`: as the ISA implies), why, and the calibration's
/// figures of every mode when it decided.
pub struct Bf16Choice {
    pub mode: Option<Bf16Mode>,
    pub why: &'static str,
    pub timings: Vec<Bf16Timing>,
}

/// Calibration figures as the cache and `qwick bench --json` write them.
pub fn timings_to_json(timings: &[Bf16Timing]) -> serde_json::Value {
    timings
        .iter()
        .map(|t| {
            serde_json::json!({
                "mode": t.mode.name(),
                "decode_gb_s": t.decode_gb_s,
                "batched_gb_s": t.batched_gb_s,
                "prefill_gmacs": t.prefill_gmacs,
            })
        })
        .collect()
}

/// Calibration figures read back from the cache; `None` if any is malformed.
fn timings_from_json(v: &serde_json::Value) -> Option<Vec<Bf16Timing>> {
    v.as_array()?
        .iter()
        .map(|t| {
            let f = |k: &str| t.get(k).and_then(|v| v.as_f64());
            Some(Bf16Timing {
                mode: Bf16Mode::parse(t.get("mode")?.as_str()?)?,
                decode_gb_s: f("decode_gb_s")?,
                batched_gb_s: f("batched_gb_s")?,
                prefill_gmacs: f("prefill_gmacs")?,
            })
        })
        .collect()
}

/// What tells one build of qwick from another: the running binary's size and modification
/// time (a rebuilt or upgraded binary measures its kernels again).
fn binary_stamp() -> String {
    std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
            format!("{}-{}", m.len(), t.as_nanos())
        })
        .unwrap_or_default()
}

/// qwick's folder in the user's cache (`$XDG_CACHE_HOME/qwick` or `~/.cache/qwick`).
fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("qwick"))
}

/// Writes `bytes` to `path` through a temporary file renamed when complete.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A progress bar on stderr, only when stderr is a terminal.
pub fn progress_bar(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    Some(b)
}

pub fn tick(bar: &Option<ProgressBar>, done: usize, total: usize) {
    if let Some(b) = bar {
        b.set_length(total as u64);
        b.set_position(done as u64);
    }
}

/// Loads the model a `--model` names (folder, GGUF file, Hub id or tag, `ollama:NAME`).
pub fn load_model_spec(spec: &str, args: &RunArgs) -> Result<Arc<Qwen3>> {
    load_model(&qwick_chat::resolve::resolve_model(spec)?, args)
}

/// Loads a model (folder or GGUF file) and reads its weights into memory, with a progress bar.
pub fn load_model(path: &Path, args: &RunArgs) -> Result<Arc<Qwen3>> {
    if args.lora.len() > 1 {
        anyhow::bail!("--lora given {} times; one adapter runs here (`serve` takes several)", args.lora.len());
    }
    load_model_with(path, &args.load_options()?)
}

/// Loads a model with explicit options, with a progress bar.
pub fn load_model_with(path: &Path, opts: &LoadOptions) -> Result<Arc<Qwen3>> {
    let model = Qwen3::load_with(path, opts)?;
    let in_rows = |v: qwick_backend::matmul::WeightView| {
        v.format == Format::BF16 && v.layout == qwick_backend::matmul::Layout::Rows && v.cols.is_multiple_of(32)
    };
    if opts.bf16_tiles && model.linears().iter().any(|l| in_rows(l.view())) {
        eprintln!(
            "note: bf16 weights stay in the file's layout (tiles would need more than the {:.1} GB \
             allowed); products rearrange them as they go",
            opts.bf16_tiles_budget as f64 / 1e9
        );
    }
    let bar = progress_bar("loading");
    // Touch the weights once so the first token does not wait on the disk.
    model.prefetch(&|d, t| tick(&bar, d, t));
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(Arc::new(model))
}

/// The memory the system can give this process without swapping (`MemAvailable`), if known.
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
