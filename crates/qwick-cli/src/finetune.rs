//! `qwick finetune`: LoRA fine-tuning from a JSONL file to an adapter folder in PEFT's layout.

use crate::common::{cpu_model, load_model_with, RunArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qwick_backend::{Ctx, ThreadPool};
use qwick_chat::ChatModel;
use qwick_model::lora::Adapter;
use qwick_model::LoadOptions;
use qwick_train::data::{self, DataOptions, Renderer};
use qwick_train::lora::{LoraParams, LoraSpec};
use qwick_train::optim::{AdamW, Schedule};
use qwick_train::step::{self, Frozen, Sequence};
use qwick_train::train::{self, Event, Outcome, TrainOptions};
use qwick_train::Rng;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The base model: a Hugging Face folder, a GGUF file (trained through its quantized
    /// weights), a Hub id or tag, or `ollama:NAME`.
    #[arg(long)]
    model: String,
    /// Training data, JSONL: {"messages": [...], "tools": [...]} chats (OpenAI format) or
    /// {"text": "..."} documents. Required unless --bench.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data (JSONL) for the evaluation loss, instead of a split of --data.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Share of --data held out for evaluation (when no --eval-data).
    #[arg(long, default_value_t = 0.05)]
    eval_split: f64,
    /// Output folder: the adapter (adapter_config.json + adapter_model.safetensors), checkpoints
    /// while training. Required unless --bench.
    #[arg(long)]
    out: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha/rank, or alpha/√rank with --rslora).
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Projections to adapt: any of q,k,v,o,gate,up,down, or all (default: all seven; the
    /// attention projections on mixture-of-experts models).
    #[arg(long)]
    targets: Option<String>,
    /// Dropout on the input of the LoRA path.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Rank-stabilised scaling (alpha/√rank).
    #[arg(long)]
    rslora: bool,
    /// Start from an existing adapter (PEFT layout) instead of a fresh one; its rank, alpha and
    /// targets are used.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Tokens per packed sequence (examples are packed up to it; longer ones are cut).
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1.0, conflicts_with = "max_steps")]
    epochs: f64,
    /// Optimizer steps to run (instead of --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Learning-rate schedule after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    scheduler: String,
    /// Warm-up steps (linear from 0).
    #[arg(long, conflicts_with = "warmup_ratio")]
    warmup_steps: Option<u64>,
    /// Warm-up as a share of all steps.
    #[arg(long, default_value_t = 0.0)]
    warmup_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Packed sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Seed of the initialisation, data order, split and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate every N steps (0: at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Save a checkpoint every N steps (0: only on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Keep every activation of the first N layers (or "all") from the forward pass instead of
    /// recomputing them in the backward pass: faster, at about 34 MB per layer per 512 tokens on
    /// a 0.6B model. "auto": as many layers as fit in a quarter of the available memory.
    #[arg(long, default_value = "auto")]
    keep_layers: String,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Loss on the prompt tokens too (default: the assistant turns only).
    #[arg(long)]
    train_on_prompt: bool,
    /// Drop the assistant's reasoning (reasoning_content and <think> blocks) from the data.
    #[arg(long)]
    strip_reasoning: bool,
    /// Skip malformed JSONL lines (reported) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Measure training speed and memory on random data (no data read, nothing written).
    #[arg(long)]
    bench: bool,
    /// Optimizer steps timed by --bench (after one untimed step).
    #[arg(long, default_value_t = 3)]
    bench_steps: u64,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Worker threads (default: QWICK_THREADS or all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Kernel instruction set (default: the fastest available).
    #[arg(long)]
    isa: Option<String>,
    /// Exact products (f32 activations with every weight format).
    #[arg(long)]
    exact: bool,
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    // Every step allocates and frees activation-sized buffers: keep them in the heap.
    qwick_backend::alloc::tune_allocator();
    let run = RunArgs {
        threads: a.threads,
        isa: a.isa.clone(),
        exact: a.exact,
        no_repack: false,
        lora: vec![],
        kv_dtype: None,
        device: "cpu".into(),
    };
    let (schedule, data_path, out) = check_args(&a)?;
    let threads = run.threads();
    let isa = run.isa()?;
    let pool = ThreadPool::new(threads);
    let bf16 = training_bf16(&a, &run, isa)?;
    let ctx = Ctx { exact: a.exact, bf16, ..Ctx::new(isa, &pool) };

    // The text side first: bad data is reported before the weights load.
    let chat = ChatModel::load_spec(&a.model, None, None)?;
    let spec = lora_spec(&a, &chat)?;
    let (train_seqs, eval_seqs) = training_data(&a, &chat, data_path.as_ref())?;

    let path = qwick_chat::resolve::resolve_model(&a.model)?;
    let model = load_model_with(&path, &LoadOptions { threads, lora_for_all: true, ..Default::default() })?;
    let mut lora = match &a.lora {
        Some(d) => LoraParams::from_adapter(&model.config, &Adapter::open(d)?, a.dropout)?,
        None => LoraParams::init(&model.config, spec, a.seed)?,
    };
    let t_prep = std::time::Instant::now();
    let kept = kept_layers(&a, &model.config, lora.spec.rank)?;
    // Transposed copies for the backward pass within a quarter of the memory available too; the
    // projections beyond it read their stored rows back in each step.
    let copy_budget = crate::common::available_memory().unwrap_or(4 << 30) / 4;
    let frozen = Frozen::with_copy_budget(&model, ctx, copy_budget)?.keep_layers(kept);
    let layers = model.config.num_hidden_layers;
    eprintln!(
        "model: {} ({layers} layers); LoRA rank {} on {} ({} trainable values); activations kept for {} of {layers} \
         layers (--keep-layers {}); transposed weight copies for the backward pass: {:.2} GB in {:.1} s{}",
        chat.name,
        lora.spec.rank,
        lora.spec.targets.join(","),
        lora.count(),
        kept.min(layers),
        a.keep_layers,
        frozen.extra_bytes() as f64 / 1e9,
        t_prep.elapsed().as_secs_f64(),
        match frozen.block_read() {
            0 => String::new(),
            b => format!(" ({b} projections beyond the memory budget read their stored rows back each step)"),
        }
    );
    let run = Training { a: &a, schedule, ctx, frozen: &frozen, train: &train_seqs, eval: &eval_seqs };
    match out {
        None => run.bench(&mut lora),
        Some(out) => run.to_adapter(&mut lora, out),
    }
}

/// The checked arguments: the learning-rate schedule, the training data and the output folder
/// (both absent with --bench).
fn check_args(a: &FinetuneArgs) -> Result<(Schedule, Option<PathBuf>, Option<PathBuf>)> {
    if a.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if a.batch == 0 || a.grad_accum == 0 {
        bail!("--batch and --grad-accum must be at least 1");
    }
    if !(0.0..1.0).contains(&a.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    let schedule = Schedule::parse(&a.scheduler)
        .with_context(|| format!("--scheduler {}: expected linear, cosine or constant", a.scheduler))?;
    let (data_path, out) = match (&a.data, &a.out, a.bench) {
        (_, _, true) => (None, None),
        (Some(d), Some(o), false) => (Some(d.clone()), Some(o.clone())),
        _ => bail!("--data FILE.jsonl and --out DIR are required (or --bench)"),
    };
    if let Some(o) = &out {
        if !a.resume && train::latest_checkpoint(o).is_some() {
            bail!(
                "{} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out",
                o.display()
            );
        }
    }
    Ok((schedule, data_path, out))
}

/// How bf16 weights are multiplied in training. Training multiplies many rows at a time:
/// unless a mode is asked for, the bf16 kernel fastest on this machine for large products (the
/// cached choice of the inference commands weighs single-row decode too).
fn training_bf16(a: &FinetuneArgs, run: &RunArgs, isa: qwick_backend::Isa) -> Result<Option<qwick_backend::Bf16Mode>> {
    let asked = a.exact
        || a.isa.is_some()
        || ["QWICK_BF16", "QWICK_ISA"].iter().any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
    let choice = run.bf16_choice(isa)?;
    Ok(if asked {
        choice.mode
    } else {
        choice.timings.iter().max_by(|x, y| x.prefill_gmacs.total_cmp(&y.prefill_gmacs)).map(|t| t.mode).or(choice.mode)
    })
}

/// The adapter's shape: the one of the adapter to continue, else the flags'.
fn lora_spec(a: &FinetuneArgs, chat: &ChatModel) -> Result<LoraSpec> {
    let default_targets = if chat.config.moe.is_some() { "q,k,v,o" } else { "q,k,v,o,gate,up,down" };
    Ok(match &a.lora {
        Some(d) => {
            let ad = Adapter::open(d)?;
            LoraSpec {
                rank: ad.rank,
                alpha: ad.alpha,
                rslora: ad.rslora,
                dropout: a.dropout,
                targets: ad.targets.clone(),
            }
        }
        None => {
            if a.rank == 0 {
                bail!("--rank must be at least 1");
            }
            LoraSpec {
                rank: a.rank,
                alpha: a.alpha,
                rslora: a.rslora,
                dropout: a.dropout,
                targets: LoraSpec::parse_targets(a.targets.as_deref().unwrap_or(default_targets))?,
            }
        }
    })
}

/// Training and held-out sequences: from the data file, or random tokens for --bench.
fn training_data(
    a: &FinetuneArgs,
    chat: &ChatModel,
    data_path: Option<&PathBuf>,
) -> Result<(Vec<Sequence>, Vec<Sequence>)> {
    let eos = chat.tokenizer.token_id("<|endoftext|>").or(chat.eos.first().copied()).unwrap_or(0);
    let renderer = Renderer { template: &chat.template, tokenizer: &chat.tokenizer, eos };
    let dopts =
        DataOptions { train_on_prompt: a.train_on_prompt, strip_reasoning: a.strip_reasoning, skip_bad: a.skip_bad };
    Ok(match data_path {
        None => {
            let mut rng = Rng::new(a.seed);
            let vocab = chat.config.vocab_size;
            let seqs = (0..a.batch * a.grad_accum)
                .map(|_| {
                    let tokens: Vec<u32> = (0..a.seq_len).map(|_| rng.below(vocab) as u32).collect();
                    let labels = (0..a.seq_len).map(|i| tokens.get(i + 1).copied()).collect();
                    Sequence { positions: (0..a.seq_len as u32).collect(), start: vec![0; a.seq_len], tokens, labels }
                })
                .collect();
            (seqs, vec![])
        }
        Some(p) => {
            let (examples, st) = data::read_jsonl(p, &renderer, &dopts)?;
            for s in st.skipped.iter().take(10) {
                eprintln!("skipped {s}");
            }
            let (train_ex, eval_ex) = match &a.eval_data {
                Some(e) => (examples, data::read_jsonl(e, &renderer, &dopts)?.0),
                None => data::split(examples, a.eval_split, a.seed),
            };
            let (train_seqs, cut) = data::pack(&train_ex, a.seq_len);
            let (eval_seqs, cut_eval) = data::pack(&eval_ex, a.seq_len);
            eprintln!(
                "data: {} lines, {} examples ({} train, {} held out){}{}; {} tokens, {} with loss; {} cut to --seq-len {}; \
                 {} training sequences",
                st.lines,
                st.examples,
                train_ex.len(),
                eval_ex.len(),
                if st.skipped.is_empty() { String::new() } else { format!(", {} malformed lines skipped", st.skipped.len()) },
                if st.untrained == 0 { String::new() } else { format!(", {} without tokens to learn skipped", st.untrained) },
                st.tokens,
                st.trained_tokens,
                cut + cut_eval,
                a.seq_len,
                train_seqs.len(),
            );
            if train_seqs.is_empty() {
                bail!("no training sequences (every example lacks tokens to learn)");
            }
            (train_seqs, eval_seqs)
        }
    })
}

/// Layers whose activations the backward pass keeps (--keep-layers: a number, all, or auto:
/// as many as fit a quarter of the memory available).
fn kept_layers(a: &FinetuneArgs, c: &qwick_model::Config, rank: usize) -> Result<usize> {
    Ok(match a.keep_layers.as_str() {
        "all" => usize::MAX,
        "auto" => {
            let budget = crate::common::available_memory().unwrap_or(4 << 30) / 4;
            let per = |l| step::kept_layer_bytes(c, l, a.seq_len, rank, a.dropout > 0.0);
            let mut used = 0;
            (0..c.num_hidden_layers)
                .take_while(|&l| {
                    used += per(l);
                    used <= budget
                })
                .count()
        }
        n => n
            .parse::<usize>()
            .with_context(|| format!("--keep-layers {n}: expected a number of layers, all or auto"))?,
    })
}

/// A training run's settings and inputs.
struct Training<'a> {
    a: &'a FinetuneArgs,
    schedule: Schedule,
    ctx: Ctx<'a>,
    frozen: &'a Frozen<'a>,
    train: &'a [Sequence],
    eval: &'a [Sequence],
}

impl Training<'_> {
    /// The trainer's options, writing to `out`, for `steps` steps (or the epochs').
    fn options(&self, out: PathBuf, steps: Option<u64>) -> TrainOptions {
        let a = self.a;
        let mut o = TrainOptions {
            epochs: a.epochs,
            max_steps: steps,
            lr: a.lr,
            schedule: self.schedule,
            warmup_steps: 0,
            adamw: AdamW { weight_decay: a.weight_decay, ..Default::default() },
            max_grad_norm: a.max_grad_norm,
            batch: a.batch,
            grad_accum: a.grad_accum,
            seed: a.seed,
            eval_every: a.eval_every,
            save_every: a.save_every,
            resume: a.resume,
            out,
            base_model: a.model.clone(),
        };
        let total = train::total_steps(&o, self.train.len());
        o.warmup_steps = a.warmup_steps.unwrap_or((a.warmup_ratio * total as f64).ceil() as u64);
        o
    }

    /// --bench: training speed over a few steps on random tokens (the first step not timed).
    fn bench(&self, lora: &mut LoraParams) -> Result<()> {
        let (a, ctx) = (self.a, self.ctx);
        let dir = std::env::temp_dir().join(format!("qwick-finetune-bench-{}", std::process::id()));
        let o = TrainOptions { save_every: 0, ..self.options(dir.clone(), Some(a.bench_steps + 1)) };
        let stop = AtomicBool::new(false);
        let mut times = Vec::new();
        let mut tokens = 0;
        let r = train::train(ctx, self.frozen, lora, self.train, &[], &o, &stop, &mut |e| {
            if let Event::Step(s) = e {
                eprintln!("step {}: {:.2} s, loss {:.4}", s.step, s.seconds, s.loss);
                if s.step > 1 {
                    times.push(s.seconds);
                    tokens += s.tokens;
                }
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        r?;
        let secs: f64 = times.iter().sum();
        let tok_s = tokens as f64 / secs;
        let rss = crate::common::peak_rss_bytes();
        if a.json {
            println!(
                "{}",
                json!({
                    "train_tok_s": tok_s,
                    "peak_rss_bytes": rss,
                    "step_seconds": times,
                    "seq_len": a.seq_len,
                    "batch": a.batch * a.grad_accum,
                    "rank": lora.spec.rank,
                    "targets": lora.spec.targets,
                    "trainable": lora.count(),
                    "threads": ctx.pool.threads(),
                    "isa": format!("{:?}", ctx.isa),
                    "bf16_mode": ctx.bf16_mode().name(),
                    "cpu": cpu_model(),
                })
            );
        } else {
            println!(
                "train: {tok_s:.1} tok/s ({} tokens per step), peak RSS {:.2} GB",
                tokens / times.len().max(1),
                rss as f64 / 1e9
            );
        }
        Ok(())
    }

    /// The run itself: training to an adapter in `out`, with checkpoints, progress and Ctrl-C.
    fn to_adapter(&self, lora: &mut LoraParams, out: PathBuf) -> Result<()> {
        let (a, ctx) = (self.a, self.ctx);
        let o = self.options(out.clone(), a.max_steps);
        let total = train::total_steps(&o, self.train.len());
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            let r = ctrlc::set_handler(move || {
                if stop.swap(true, Ordering::SeqCst) {
                    eprintln!("\nstopping without saving");
                    std::process::exit(130);
                }
                eprintln!("\nsaving a checkpoint after this step (Ctrl-C again to stop at once)");
            });
            if let Err(e) = r {
                eprintln!("note: Ctrl-C will stop without a checkpoint ({e})");
            }
        }
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} (ETA {eta})").unwrap().progress_chars("=> "),
            );
            b
        });
        let t0 = std::time::Instant::now();
        let (mut tokens, mut last_loss, mut last_eval) = (0usize, f64::NAN, None);
        let mut first = 0;
        let outcome = train::train(ctx, self.frozen, lora, self.train, self.eval, &o, &stop, &mut |e| match e {
            Event::Step(s) => {
                if first == 0 {
                    first = s.step;
                }
                tokens += s.tokens;
                last_loss = s.loss;
                let rate = tokens as f64 / t0.elapsed().as_secs_f64();
                let msg =
                    format!("loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s", s.loss, s.lr, s.grad_norm, rate);
                match &bar {
                    Some(b) => {
                        b.set_position(s.step);
                        b.set_message(msg);
                    }
                    None => {
                        let left = (s.total - s.step) as f64 * t0.elapsed().as_secs_f64() / (s.step - first + 1) as f64;
                        eprintln!("step {}/{}  {msg}  eta {:.0} s", s.step, s.total, left);
                    }
                }
            }
            Event::Eval { step, loss } => {
                last_eval = Some(loss);
                let m = format!("step {step}: eval loss {loss:.4}");
                match &bar {
                    Some(b) => b.println(m),
                    None => eprintln!("{m}"),
                }
            }
            Event::Saved { step, dir } => {
                let m = format!("step {step}: checkpoint {}", dir.display());
                match &bar {
                    Some(b) => b.println(m),
                    None => eprintln!("{m}"),
                }
            }
            Event::Resumed { step, dir } => eprintln!("resuming after step {step} from {}", dir.display()),
        })?;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let secs = t0.elapsed().as_secs_f64();
        match outcome {
            Outcome::Interrupted(step) => {
                eprintln!("interrupted after step {step}; continue with the same command and --resume");
                // The conventional status of a run stopped by Ctrl-C (after the checkpoint).
                std::process::exit(130);
            }
            Outcome::Finished => {
                eprintln!(
                    "adapter written to {} (final training loss {last_loss:.4}{}); {:.0} tok/s",
                    out.display(),
                    last_eval.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
                    tokens as f64 / secs
                );
            }
        }
        if a.json {
            println!(
                "{}",
                json!({
                    "out": out,
                    "finished": outcome == Outcome::Finished,
                    "steps": total,
                    "train_loss": last_loss,
                    "eval_loss": last_eval,
                    "train_tok_s": tokens as f64 / secs,
                    "peak_rss_bytes": crate::common::peak_rss_bytes(),
                })
            );
        }
        Ok(())
    }
}
