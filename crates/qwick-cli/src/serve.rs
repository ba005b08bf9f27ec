//! `qwick serve`: the OpenAI- and Ollama-compatible HTTP server; `qwick bench-serve`: load
//! against a running server.

use crate::common::{self, RunArgs, SpecArgs};
use anyhow::{bail, Context, Result};
use qwick_chat::ChatModel;
use qwick_engine::{Runner, Runners, SchedulerConfig};
use qwick_model::LoadOptions;
use qwick_server::{ServeOptions, Task};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model: a local folder, or a Hugging Face Hub id (owner/name[@revision]) found in the
    /// Hugging Face cache or downloaded into it.
    #[arg(long)]
    model: String,
    /// The name clients use for the model (default: the folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on (default: loopback only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (default: QWICK_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Most tokens (prefill and decode) in one engine step (default: 2048; 512 with --task
    /// embed or rerank, where steps are all prefill and 512-token steps measured faster).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens (prompt + output) per request (default and cap: the model's context length
    /// and the KV cache's size).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most requests waiting to start; more get 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// KV cache size in GB (default: a quarter of the available memory, at most 4 GB, and no
    /// more than max-num-seqs full contexts).
    #[arg(long)]
    kv_cache_gb: Option<f64>,
    /// KV cache size in tokens (instead of --kv-cache-gb).
    #[arg(long, conflicts_with = "kv_cache_gb")]
    kv_cache_tokens: Option<usize>,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Browser origins allowed to call the API from their pages (CORS), comma-separated, or `*`;
    /// none by default.
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Include request bodies (prompts) in the request log on stderr.
    #[arg(long)]
    log_prompts: bool,
    /// Largest request body, in MB.
    #[arg(long, default_value_t = 8.0)]
    max_body_mb: f64,
    /// Chat template file (.jinja, or a JSON file with a "chat_template" key).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// What to serve: `generate` (text: chat, completions, …), `embed` (/v1/embeddings and
    /// Ollama's embed routes, for a Qwen3-Embedding checkpoint or any Qwen3) or `rerank`
    /// (/v1/rerank, for a Qwen3-Reranker). Default: what the checkpoint says (a
    /// sentence-transformers last-token pooling config, or GGUF pooling metadata), else generate.
    #[arg(long)]
    task: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    spec: SpecArgs,
}

/// The task a checkpoint declares: sentence-transformers' last-token pooling (a
/// Qwen3-Embedding folder), or a GGUF file's `pooling_type` (3, last token: embed; 4, rank:
/// rerank).
fn declared_task(path: &std::path::Path) -> Result<Option<Task>> {
    if path.is_dir() {
        let Ok(modules) = std::fs::read_to_string(path.join("modules.json")) else { return Ok(None) };
        let modules: serde_json::Value = serde_json::from_str(&modules)
            .with_context(|| format!("{}: not JSON", path.join("modules.json").display()))?;
        for m in modules.as_array().into_iter().flatten() {
            if m["type"].as_str().is_some_and(|t| t.ends_with("Pooling")) {
                let cfg = path.join(m["path"].as_str().unwrap_or("")).join("config.json");
                let cfg: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap_or_default()).unwrap_or_default();
                if cfg["pooling_mode_lasttoken"] == serde_json::json!(true) {
                    return Ok(Some(Task::Embed));
                }
                bail!("{}: a pooling other than the last token's; qwick pools the last token", path.display());
            }
        }
        return Ok(None);
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        let g = qwick_gguf::GgufFile::open(path)?;
        let arch = g.get_str("general.architecture")?.unwrap_or("qwen3").to_string();
        return Ok(match g.get_u64(&format!("{arch}.pooling_type"))? {
            Some(3) => Some(Task::Embed),
            Some(4) => Some(Task::Rerank),
            _ => None,
        });
    }
    Ok(None)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let mut info = ChatModel::load_spec(&a.model, a.chat_template.as_deref(), a.served_model_name.clone())?;
    let dir = info.dir.clone();
    let adapters = a.run.adapters();
    for (i, (name, _)) in adapters.iter().enumerate() {
        if info.matches(name) || adapters[..i].iter().any(|(n, _)| n == name) {
            bail!("--lora {name}: the name is taken (give NAME=DIR)");
        }
    }
    info.adapters = adapters.iter().map(|(n, _)| n.clone()).collect();
    let task = match a.task.as_deref() {
        Some(t) => {
            Task::parse(t).ok_or_else(|| anyhow::anyhow!("--task must be generate, embed or rerank, not {t:?}"))?
        }
        None => declared_task(&dir)?.unwrap_or_default(),
    };
    let max_num_batched_tokens = a.max_num_batched_tokens.unwrap_or(if task == Task::Generate { 2048 } else { 512 });
    if max_num_batched_tokens == 0 || a.max_num_seqs == 0 || a.max_queue == 0 {
        bail!("--max-num-batched-tokens, --max-num-seqs and --max-queue must be at least 1");
    }
    if a.max_model_len.is_some_and(|l| l < 2) {
        bail!("--max-model-len must be at least 2");
    }
    if !(a.max_body_mb > 0.0) {
        bail!("--max-body-mb must be positive");
    }
    let isa = a.run.isa()?;
    let kv_format = a.run.kv_format()?;
    // Adapters apply to the requests that name them.
    let model = common::load_model_with(&dir, &LoadOptions { lora_for_all: false, ..a.run.load_options()? })?;
    let context =
        a.max_model_len.unwrap_or(info.config.max_position_embeddings).min(info.config.max_position_embeddings);
    let kv_tokens = match (a.kv_cache_tokens, a.kv_cache_gb) {
        (Some(t), _) => t,
        (None, Some(gb)) => {
            if !(gb > 0.0) {
                bail!("--kv-cache-gb must be positive");
            }
            kv_tokens_for_bytes(&model, kv_format, (gb * 1e9) as usize)
        }
        (None, None) => {
            let budget = common::available_memory().map_or(4e9, |m| (m as f64 / 4.0).min(4e9));
            kv_tokens_for_bytes(&model, kv_format, budget as usize).min(a.max_num_seqs.saturating_mul(context))
        }
    };
    if kv_tokens < 16 {
        bail!("the KV cache must hold at least 16 tokens");
    }
    let api_key = a.api_key.clone().or_else(|| std::env::var("QWICK_API_KEY").ok()).filter(|k| !k.is_empty());
    let opts = ServeOptions {
        host: a.host.clone(),
        port: a.port,
        api_key,
        max_model_len: a.max_model_len,
        scheduler: SchedulerConfig {
            max_num_batched_tokens,
            max_num_seqs: a.max_num_seqs,
            max_waiting: a.max_queue,
            prefix_caching: !a.no_prefix_caching,
            spec: a.spec.config()?,
        },
        body_limit: (a.max_body_mb * 1e6) as usize,
        allowed_origins: a.allowed_origins.iter().map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect(),
        log_prompts: a.log_prompts,
        handle_signals: true,
        shutdown_grace: Duration::from_secs(10),
        task,
    };
    let name = info.name.clone();
    let runner_config = a.run.runner_config(kv_tokens, isa, kv_format)?;
    if task != Task::Generate && opts.scheduler.spec.is_some() {
        bail!("--draft-model and --spec speed up generation; an embedding or reranking server does not generate");
    }
    let draft = a.spec.draft((&model, &dir), &a.run)?;
    let server = qwick_server::start(opts, info, move || {
        Ok(Runners {
            target: Runner::new(model, &runner_config)?,
            draft: draft.map(|d| Runner::new(d, &runner_config)).transpose()?,
        })
    })?;
    eprintln!(
        "qwick: serving {name} on http://{} (task: {task:?}; KV cache: {kv_tokens} tokens of {kv_format}; max model len: {})",
        server.addr, server.max_model_len
    );
    server.join()?;
    eprintln!("qwick: stopped");
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name to send, or several separated by commas, spread over the requests in turn
    /// (e.g. LoRA adapters; default: the server's first model).
    #[arg(long)]
    model: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per request (end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// API key (default: QWICK_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn bench_serve(a: BenchServeArgs) -> Result<()> {
    if a.concurrency == 0 || a.requests == 0 || a.prompt_len == 0 || a.gen_len == 0 {
        bail!("--concurrency, --requests, --prompt-len and --gen-len must be at least 1");
    }
    let cfg = qwick_server::bench::BenchConfig {
        url: a.url.trim_end_matches('/').to_string(),
        model: a.model.clone(),
        concurrency: a.concurrency,
        requests: a.requests,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        api_key: a.api_key.clone().or_else(|| std::env::var("QWICK_API_KEY").ok()).filter(|k| !k.is_empty()),
    };
    let report = qwick_server::bench::run(&cfg).context("bench-serve")?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// The KV cache size in tokens for a budget of `kv_bytes` of `format` elements.
fn kv_tokens_for_bytes(model: &qwick_model::Qwen3, format: qwick_backend::Format, kv_bytes: usize) -> usize {
    let c = &model.config;
    let per_token =
        qwick_model::KvCache::bytes_per_token(format, c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
    (kv_bytes / per_token.max(1)).max(16)
}
