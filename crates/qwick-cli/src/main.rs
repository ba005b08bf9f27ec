//! `qwick`: run, score, benchmark and serve Qwen3 models.

mod bench;
mod chat;
mod common;
mod embed;
mod finetune;
mod list;
mod quantize;
mod run;
mod serve;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "qwick", version, about = "A fast, exact runtime for the Qwen3 model family")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One chat turn: render the prompt with the model's chat template and generate the answer
    /// (streamed on a terminal; exactly the generated text when piped; --json for details).
    Run(run::RunCmdArgs),
    /// An interactive conversation (/think, /no_think, /clear, /exit; Ctrl-C stops an answer).
    Chat(chat::ChatArgs),
    /// Write the float32 logits of every position of a token sequence as a NumPy .npy file [T, vocab].
    Logits {
        /// Model folder (config.json + safetensors), GGUF file, Hub id (`owner/name`,
        /// `owner/name:TAG`) or `ollama:NAME`.
        #[arg(long)]
        model: String,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long)]
        tokens: String,
        /// Output .npy file.
        #[arg(long)]
        out: PathBuf,
        /// Multiply quantized weights as run and serve do (integer dot products with activations
        /// quantized to 8 bits) instead of exactly.
        #[arg(long, conflicts_with = "exact")]
        fast: bool,
        #[command(flatten)]
        run: common::RunArgs,
    },
    /// Print the embedding of a text (or of each line of standard input) as a JSON array: the
    /// last token's hidden state after the final norm, L2-normalised, as `serve --task embed`
    /// answers it.
    Embed(embed::EmbedArgs),
    /// Serve the model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions, ...),
    /// the Ollama API (/api/chat, /api/generate, ...), /health and /metrics.
    Serve(serve::ServeArgs),
    /// Load a running server with concurrent streamed requests: throughput, time to first token,
    /// inter-token latency.
    BenchServe(serve::BenchServeArgs),
    /// Measure prefill and decode speed, memory, and decode against the memory-bandwidth bound.
    Bench(bench::BenchArgs),
    /// Write a GGUF file in a quantized (or float) file type from a Hugging Face folder, a Hub id
    /// or another GGUF file, streamed tensor by tensor.
    Quantize(quantize::QuantizeArgs),
    /// List the models of the Hugging Face cache and the Ollama store, with what --model takes
    /// to load each (--json for machine output).
    List(list::ListArgs),
    /// List the GPU adapters `--device gpu:N` can name: name, backend (Vulkan, Metal, DX12),
    /// kind, driver, largest buffer and the optional shader features the kernels use.
    Devices {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Merge a LoRA adapter (PEFT layout) into a Hugging Face model folder, written as a new
    /// folder (one model.safetensors; tokenizer and config files copied).
    Merge {
        /// The base model: a Hugging Face folder or Hub id (safetensors).
        #[arg(long)]
        model: String,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        lora: PathBuf,
        /// Output folder (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Stored dtype of the merged weights: f32, bf16 or f16 (default: each tensor's own).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Fine-tune a LoRA adapter on chat or text JSONL (written in PEFT's layout, for --lora,
    /// `serve --lora`, `merge`, PEFT and vLLM).
    Finetune(finetune::FinetuneArgs),
    /// Write a random-weight checkpoint for a config (for benchmarks at real shapes): safetensors
    /// in a folder, or with --type a GGUF file of that file type.
    MakeRandom(quantize::MakeRandomArgs),
}

fn main() -> ExitCode {
    // Mesa's Vulkan device-selection layer asks a Wayland display which GPU to put first, and
    // without a session (a server, a container) it prints an error on every start; qwick lists
    // and picks adapters itself (`qwick devices`, `--device gpu:N`), so the layer is turned off
    // there. Set here, before any thread exists, so no other thread reads the environment
    // while it changes.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, even when a cause (a template error, say) spans several.
            let msg = format!("{e:#}");
            let msg: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("error: {}", msg.join(" "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Logits { model, tokens, out, fast, mut run } => {
            let tokens = parse_tokens(&tokens)?;
            run.exact = !fast;
            let model = common::load_model_spec(&model, &run)?;
            let vocab = model.config.vocab_size;
            // Scoring is exact by default: no bf16 rounding of activations.
            let isa = run.isa_or(qwick_backend::Isa::best_exact())?;
            let kv = run.kv_format_or(qwick_backend::Format::F32)?;
            let mut runner = run.runner_as(model, tokens.len(), isa, kv)?;
            let logits = runner.score(&tokens, 2048)?;
            qwick_model::npy::write_f32(&out, &[tokens.len(), vocab], &logits)
        }
        Command::Bench(args) => bench::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::BenchServe(args) => serve::bench_serve(args),
        Command::Quantize(args) => quantize::quantize(args),
        Command::Merge { model, lora, out, dtype } => {
            let dtype = match dtype.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None => None,
                Some("f32" | "float32") => Some(qwick_backend::Format::F32),
                Some("bf16" | "bfloat16") => Some(qwick_backend::Format::BF16),
                Some("f16" | "float16") => Some(qwick_backend::Format::F16),
                Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
            };
            let path = qwick_chat::resolve::resolve_model(&model)?;
            let qwick_model::ModelFiles::Folder(dir) = qwick_model::ModelFiles::locate(&path)? else {
                bail!("{}: merge writes Hugging Face folders; give the safetensors model (quantize the merged folder afterwards)", path.display());
            };
            let adapter = qwick_model::lora::Adapter::open(&lora)?;
            qwick_model::lora::merge_folder(&dir, &adapter, &out, dtype)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Devices { json } => devices(json),
        Command::MakeRandom(args) => quantize::make_random(args),
        Command::Finetune(args) => finetune::finetune(args),
        Command::List(args) => list::list(args),
    }
}

#[cfg(feature = "gpu")]
fn devices(json: bool) -> Result<()> {
    let all = qwick_backend::gpu::adapters();
    if json {
        let list: Vec<serde_json::Value> = all
            .iter()
            .map(|a| {
                serde_json::json!({
                    "device": format!("gpu:{}", a.index), "name": a.name, "backend": a.backend, "kind": a.kind,
                    "driver": a.driver, "max_buffer_bytes": a.max_buffer, "features": a.features,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else if all.is_empty() {
        println!("no GPU adapter found (no Vulkan, Metal or DX12 device; on Linux, a Vulkan driver such as Mesa's mesa-vulkan-drivers gives one)");
    } else {
        for a in &all {
            println!("{a}");
        }
    }
    Ok(())
}

#[cfg(not(feature = "gpu"))]
fn devices(_: bool) -> Result<()> {
    bail!("this qwick was built without GPU support (cargo feature `gpu`)")
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let toks: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--tokens: {t:?} is not a token id")))
        .collect::<Result<_>>()?;
    if toks.is_empty() {
        bail!("--tokens is empty: give at least one token id, e.g. --tokens 1,2,3");
    }
    Ok(toks)
}
