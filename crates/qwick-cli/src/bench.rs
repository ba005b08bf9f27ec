//! `qwick bench`: prefill and decode speed on a model, beside the decode bound set by memory
//! bandwidth (weight bytes read per decode step ÷ the read bandwidth measured here).

use crate::common::{self, RunArgs, SpecArgs};
use anyhow::{bail, Result};
use qwick_backend::bandwidth::read_bandwidth;
use qwick_backend::{Ctx, DeviceSpec, ThreadPool};
use qwick_engine::{
    argmax, Collect, GenParams, Logits, Request, Runner, Scheduler, SchedulerConfig, SeqGen, Span, SpecConfig,
};
use qwick_model::Qwen3;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model folder, GGUF file, Hub id (`owner/name`, `owner/name:TAG`) or `ollama:NAME`.
    #[arg(long)]
    model: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Sequences decoded together (decode tok/s is then the aggregate).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
    /// With `--draft-model` or `--spec`, decoding is also timed through the scheduler without
    /// and with speculation, side by side.
    #[command(flatten)]
    spec: SpecArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen_len == 0 || a.batch == 0 {
        bail!("--prompt-len, --gen-len and --batch must be positive");
    }
    let threads = a.run.threads();
    let isa = a.run.isa()?;
    let device = a.run.device()?;
    // Bandwidth first, before the weights occupy memory: on the CPU the best of several read
    // patterns, on a GPU a kernel reading a large buffer.
    let (bw, patterns) = match device {
        DeviceSpec::Cpu => {
            let pool = ThreadPool::new(threads);
            read_bandwidth(Ctx::new(isa, &pool), 1 << 30, 4)
        }
        DeviceSpec::Gpu(i) => (gpu_bandwidth(i)?, Vec::new()),
    };
    let device_name = match device {
        DeviceSpec::Cpu => format!("cpu ({threads} threads, {isa})"),
        DeviceSpec::Gpu(i) => format!("gpu:{i} ({})", gpu_name(i)),
    };
    // The probe's buffer is gone: the peak RSS reported is the model's (Linux resets the
    // high-water mark when "5" is written to clear_refs; elsewhere it includes the probe).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    // bf16 products are a CPU matter: no calibration for a GPU.
    let choice = match device {
        DeviceSpec::Cpu => a.run.bf16_choice(isa)?,
        DeviceSpec::Gpu(_) => common::Bf16Choice {
            mode: None,
            why: "on the GPU: bf16 weights widened to f32 in the kernel",
            timings: Vec::new(),
        },
    };
    let (bf16, bf16_why) = (choice.mode, choice.why);
    let bf16 =
        if a.run.exact { qwick_backend::Bf16Mode::F32 } else { bf16.unwrap_or(qwick_backend::Bf16Mode::for_isa(isa)) };
    let spec = a.spec.config()?;
    let t_load = Instant::now();
    let path = qwick_chat::resolve::resolve_model(&a.model)?;
    let model = common::load_model(&path, &a.run)?;
    let draft = a.spec.draft((&model, &path), &a.run)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let cfg = model.config.clone();
    let ctx_len = a.prompt_len + a.gen_len;
    if ctx_len > cfg.max_position_embeddings {
        eprintln!("note: {ctx_len} tokens exceed max_position_embeddings ({})", cfg.max_position_embeddings);
    }
    // Bytes a decode step reads: the weights once, and each sequence's K/V at the mean context
    // of the timed steps.
    let kv_format = a.run.kv_format()?;
    let kv_per_token =
        qwick_model::KvCache::bytes_per_token(kv_format, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim);
    let mean_ctx = a.prompt_len + a.gen_len / 2;
    let kv_per_step = a.batch * mean_ctx * kv_per_token;
    let bytes_per_step = model.bytes_read_per_token() + kv_per_step;
    let (kernels, slow) = weight_kernels(&model, device);
    let weight_bytes = model.weight_bytes();
    let mut runner = a.run.runner(model.clone(), a.batch * (ctx_len + 16), isa)?;
    let (prefill_s, decode_s) = time_generation(&mut runner, cfg.vocab_size, &a)?;
    let speculative = match spec {
        Some(spec) => Some(time_speculation(&a, &model, draft, spec, isa)?),
        None => None,
    };
    let steps = (a.gen_len - 1).max(1) as f64;
    let decode_tok_s = if a.gen_len > 1 { a.batch as f64 * steps / decode_s } else { 0.0 };
    let prefill_tok_s = (a.batch * a.prompt_len) as f64 / prefill_s;
    let bound_tok_s = a.batch as f64 * bw / bytes_per_step as f64;
    let rss = common::peak_rss_bytes();
    let gb = |b: usize| b as f64 / 1e9;
    let report = serde_json::json!({
        "model": a.model,
        "device": device_name,
        // The CPU's kernel choices: none for a GPU run.
        "threads": (device == DeviceSpec::Cpu).then_some(threads),
        "isa": (device == DeviceSpec::Cpu).then(|| isa.to_string()),
        "bf16_mode": (device == DeviceSpec::Cpu).then(|| bf16.name()),
        "bf16_why": bf16_why,
        "bf16_calibration": common::timings_to_json(&choice.timings),
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "load_s": load_s,
        "prefill_tok_s": prefill_tok_s,
        "ttft_s": prefill_s,
        "decode_tok_s": decode_tok_s,
        "bandwidth_gb_s": bw / 1e9,
        "bandwidth_by_pattern_gb_s": patterns.iter().map(|(p, b)| (format!("{p:?}"), b / 1e9)).collect::<std::collections::BTreeMap<_, _>>(),
        "bytes_per_step": bytes_per_step,
        "kv_bytes_per_step": kv_per_step,
        "kv_dtype": kv_format.to_string(),
        "bound_tok_s": bound_tok_s,
        "decode_pct_of_bound": 100.0 * decode_tok_s / bound_tok_s,
        "effective_gb_s": decode_tok_s / a.batch as f64 * bytes_per_step as f64 / 1e9,
        "weights_bytes": weight_bytes,
        "kv_cache_bytes": runner.kv_bytes(),
        "peak_rss_bytes": rss,
        "exact": a.run.exact,
        "weights": kernels.iter().map(|((f, p), (n, b))| serde_json::json!({"format": f, "kernels": p, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
        "slow_tensors": slow,
        "speculative": speculative.as_ref().map(|s| s.json()),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("model            {}", a.model);
        // A GPU's products are always exact (f32 activations).
        println!(
            "device           {device_name}{}",
            if a.run.exact && device == DeviceSpec::Cpu { " (exact)" } else { "" }
        );
        if device == DeviceSpec::Cpu {
            println!("bf16 products    {} ({bf16_why})", bf16.name());
        }
        for t in &choice.timings {
            println!(
                "  {:<14} decode 1 row {:.1} GB/s, 8 rows {:.1} GB/s; prefill 128 rows {:.1} G mul-adds/s",
                t.mode.name(),
                t.decode_gb_s,
                t.batched_gb_s,
                t.prefill_gmacs
            );
        }
        for ((f, p), (n, b)) in &kernels {
            println!("weights          {f}: {n} tensors, {:.2} GB, {p}", gb(*b));
        }
        if !slow.is_empty() {
            let shown: Vec<&str> = slow.iter().take(4).map(String::as_str).collect();
            let more = if slow.len() > 4 { format!(" and {} more", slow.len() - 4) } else { String::new() };
            println!("slow path        {} tensors have no integer kernel: {}{more}", slow.len(), shown.join(", "));
        }
        println!("batch            {}  (prompt {} + gen {} tokens each)", a.batch, a.prompt_len, a.gen_len);
        println!("prefill          {prefill_tok_s:.1} tok/s   (time to first token {:.3} s)", prefill_s);
        println!("decode           {decode_tok_s:.2} tok/s{}", if a.batch > 1 { "  (aggregate)" } else { "" });
        println!(
            "bandwidth bound  {bound_tok_s:.2} tok/s   ({:.2} GB read per step, {:.2} GB of it K/V, at {:.1} GB/s measured); decode at {:.0}% of it",
            gb(bytes_per_step),
            gb(kv_per_step),
            bw / 1e9,
            100.0 * decode_tok_s / bound_tok_s
        );
        if device == DeviceSpec::Cpu {
            let each: Vec<String> = patterns.iter().map(|(p, b)| format!("{p:?} {:.1}", b / 1e9)).collect();
            println!("read bandwidth   best of {} GB/s", each.join(", "));
        } else {
            println!("read bandwidth   {:.1} GB/s (a kernel reading 1 GiB of device memory)", bw / 1e9);
        }
        println!(
            "memory           peak RSS {:.2} GB  (weights {:.2} GB, KV cache {:.2} GB of {kv_format})",
            gb(rss),
            gb(weight_bytes),
            gb(runner.kv_bytes())
        );
        if let Some(s) = &speculative {
            s.print();
        }
    }
    Ok(())
}

/// The read bandwidth of GPU adapter `index` (bytes/s), from a kernel reading 1 GiB (or the
/// largest buffer the adapter allows).
#[cfg(feature = "gpu")]
fn gpu_bandwidth(index: usize) -> Result<f64> {
    let gpu = qwick_backend::gpu::Gpu::open(index).map_err(anyhow::Error::msg)?;
    gpu.read_bandwidth(1 << 30, 4).map_err(anyhow::Error::msg)
}

#[cfg(feature = "gpu")]
fn gpu_name(index: usize) -> String {
    qwick_backend::gpu::adapters()
        .into_iter()
        .nth(index)
        .map_or_else(|| "?".into(), |a| format!("{}, {}", a.name, a.backend))
        + if std::env::var("QWICK_GPU_F16").is_ok_and(|v| v == "1") { "; f16 tiles" } else { "" }
}

#[cfg(not(feature = "gpu"))]
fn gpu_name(_: usize) -> String {
    "?".into()
}

#[cfg(not(feature = "gpu"))]
fn gpu_bandwidth(_: usize) -> Result<f64> {
    bail!("this qwick was built without GPU support (cargo feature `gpu`)")
}

/// Which kernels the weights take, (format, path) -> (tensors, bytes), and the tensors on the
/// slow path.
type Kernels = std::collections::BTreeMap<(String, &'static str), (usize, usize)>;
fn weight_kernels(model: &qwick_model::Qwen3, device: DeviceSpec) -> (Kernels, Vec<String>) {
    let mut kernels = Kernels::new();
    let mut slow: Vec<String> = Vec::new();
    for l in model.linears() {
        let v = l.view();
        let path = match device {
            DeviceSpec::Cpu => qwick_backend::matmul::kernel_path(&v),
            DeviceSpec::Gpu(_) => "GPU product, dequantized in the kernel",
        };
        let e = kernels.entry((v.format.to_string(), path)).or_default();
        e.0 += 1;
        e.1 += v.bytes();
        if path.starts_with("slow") {
            slow.push(l.weight.name.clone());
        }
    }
    (kernels, slow)
}

/// Seconds of the prefill of `a.batch` deterministic pseudo-random prompts in one step, and of
/// the decode steps after it (one token per sequence per step, greedy).
fn time_generation(runner: &mut Runner, vocab: usize, a: &BenchArgs) -> Result<(f64, f64)> {
    let prompts = bench_prompts(vocab, a);
    let seqs: Vec<_> = prompts.iter().map(|_| runner.add_sequence()).collect();
    for &s in &seqs {
        // Greedy decoding reads the best logit alone (a device brings back just that).
        runner.set_candidates(s, Some(1))?;
    }
    let t0 = Instant::now();
    let spans: Vec<Span> =
        seqs.iter().zip(&prompts).map(|(&seq, p)| Span { seq, tokens: p, logits: Logits::Last }).collect();
    let logits = runner.step(&spans)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    // Each sequence's last token, computed by the next step.
    let mut last: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
    let t1 = Instant::now();
    for _ in 1..a.gen_len {
        let spans: Vec<Span> = seqs
            .iter()
            .zip(&last)
            .map(|(&seq, t)| Span { seq, tokens: std::slice::from_ref(t), logits: Logits::Last })
            .collect();
        let logits = runner.step(&spans)?;
        last = logits.iter().map(|l| argmax(l)).collect();
    }
    Ok((prefill_s, t1.elapsed().as_secs_f64()))
}

/// Decoding through the scheduler without and with speculation.
struct SpecTiming {
    what: String,
    /// Whether the batch speculates at all (not above `--spec-max-seqs`).
    speculating: bool,
    max_draft: usize,
    plain_tok_s: f64,
    spec_tok_s: f64,
    drafted: u64,
    accepted: u64,
    /// Tokens a sequence gained per target step, on average.
    tokens_per_step: f64,
}

impl SpecTiming {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "drafts": self.what,
            "speculating": self.speculating,
            "max_draft_tokens": self.max_draft,
            "plain_decode_tok_s": self.plain_tok_s,
            "decode_tok_s": self.spec_tok_s,
            "speedup": self.spec_tok_s / self.plain_tok_s,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted as f64 / self.drafted.max(1) as f64,
            "tokens_per_step": self.tokens_per_step,
        })
    }

    fn print(&self) {
        if !self.speculating {
            println!("speculative      none: --batch is above --spec-max-seqs, so no step speculates");
        }
        println!(
            "speculative      {} (up to {} tokens): decode {:.2} tok/s against {:.2} plain through the scheduler ({:.2}x)",
            self.what,
            self.max_draft,
            self.spec_tok_s,
            self.plain_tok_s,
            self.spec_tok_s / self.plain_tok_s
        );
        println!(
            "                 {} of {} drafted tokens accepted ({:.0}%), {:.2} tokens per target step",
            self.accepted,
            self.drafted,
            100.0 * self.accepted as f64 / self.drafted.max(1) as f64,
            self.tokens_per_step
        );
    }
}

/// Times greedy decoding of the benchmark's prompts through the scheduler, plainly and with
/// `spec` (drafting with `draft` when given), back to back.
fn time_speculation(
    a: &BenchArgs,
    model: &Arc<Qwen3>,
    draft: Option<Arc<Qwen3>>,
    spec: SpecConfig,
    isa: qwick_backend::Isa,
) -> Result<SpecTiming> {
    let what = match &draft {
        Some(_) => format!("draft model {}", a.spec.draft_model.as_deref().unwrap_or("?")),
        None => format!("prompt lookup ({})", a.spec.spec.as_deref().unwrap_or("ngram")),
    };
    let (max_draft, speculating) = (spec.max_draft, a.batch <= spec.max_seqs);
    let tokens = a.batch * (a.prompt_len + a.gen_len + max_draft + 16);
    let prompts = bench_prompts(model.config.vocab_size, a);
    let plain = Scheduler::new(a.run.runner(model.clone(), tokens, isa)?, SchedulerConfig::default());
    let (plain_tok_s, _) = time_decoding(plain, &prompts, a)?;
    let mut sched = Scheduler::new(
        a.run.runner(model.clone(), tokens, isa)?,
        SchedulerConfig { spec: Some(spec), ..SchedulerConfig::default() },
    );
    if let Some(d) = draft {
        sched = sched.with_draft_model(a.run.runner(d, tokens, isa)?);
    }
    let (spec_tok_s, st) = time_decoding(sched, &prompts, a)?;
    Ok(SpecTiming {
        what,
        speculating,
        max_draft,
        plain_tok_s,
        spec_tok_s,
        drafted: st.0,
        accepted: st.1,
        tokens_per_step: st.2,
    })
}

/// Decode tok/s (aggregate) of greedy generation of `prompts` through `sched`, timed from the
/// step after every prompt has its first token; and the drafted and accepted tokens and the
/// tokens per sequence per step of that phase.
fn time_decoding(mut sched: Scheduler, prompts: &[Vec<u32>], a: &BenchArgs) -> Result<(f64, (u64, u64, f64))> {
    let ctx = a.prompt_len + a.gen_len + 1;
    let sinks: Vec<Collect> = prompts
        .iter()
        .map(|p| {
            let sink = Collect::default();
            let gen = SeqGen::new(p, GenParams::greedy(Some(a.gen_len), ctx))?;
            sched.add(Request { gen, logprobs: None, adapter: 0 }, Box::new(sink.clone()));
            Ok(sink)
        })
        .collect::<Result<_>>()?;
    while sinks.iter().any(|s| s.tokens().is_empty()) {
        if sched.step() == 0 {
            bail!("the benchmark's requests failed: {:?}", sinks.iter().find_map(|s| s.error()));
        }
    }
    let (s0, t0) = (sched.stats(), Instant::now());
    let first: usize = sinks.iter().map(|s| s.tokens().len()).sum();
    while sched.has_work() {
        sched.step();
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = sinks.iter().find_map(|s| s.error()) {
        bail!("a benchmark request failed: {e}");
    }
    let s1 = sched.stats();
    let decoded = sinks.iter().map(|s| s.tokens().len()).sum::<usize>() - first;
    let steps = (s1.steps - s0.steps).max(1) as f64;
    let per_step = decoded as f64 / a.batch as f64 / steps;
    Ok((decoded as f64 / secs, (s1.spec_drafted - s0.spec_drafted, s1.spec_accepted - s0.spec_accepted, per_step)))
}

/// The benchmark's deterministic pseudo-random prompts.
fn bench_prompts(vocab: usize, a: &BenchArgs) -> Vec<Vec<u32>> {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % vocab as u64) as u32
    };
    (0..a.batch).map(|_| (0..a.prompt_len).map(|_| next()).collect()).collect()
}
