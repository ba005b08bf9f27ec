//! Embeddings and reranking, for a server started with `--task embed` or `--task rerank`:
//! OpenAI's `/v1/embeddings`, Ollama's `/api/embed` and `/api/embeddings`, and `/v1/rerank`
//! in the shape vLLM and llama-server answer (Jina's and Cohere's). Every input is a
//! prefill-only request through the engine's scheduler (batched with the others, the prefix
//! cache shared): an embedding is the last token's hidden state after the final norm,
//! L2-normalised (Qwen3-Embedding's last-token pooling); a relevance score is the reranker's
//! probability of "yes" against "no" after Qwen3-Reranker's prompt.

use crate::app::AppState;
use crate::error::{parse_json, ApiError};
use crate::gen;
use crate::openai::{check_model, new_id};
use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use qwick_engine::{Event, Pooling};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// What a server computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Task {
    /// Text generation (chat, completions, …).
    #[default]
    Generate,
    /// Embeddings: the last token's normalised hidden state.
    Embed,
    /// Relevance scores of documents for a query (a Qwen3-Reranker).
    Rerank,
}

impl Task {
    pub fn parse(s: &str) -> Option<Task> {
        match s {
            "generate" => Some(Task::Generate),
            "embed" => Some(Task::Embed),
            "rerank" => Some(Task::Rerank),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Task::Generate => "generate",
            Task::Embed => "embed",
            Task::Rerank => "rerank",
        }
    }
}

/// A 400 unless the server runs `task`.
fn require(state: &AppState, task: Task, route: &str) -> Result<(), ApiError> {
    if state.task == task {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "{route} needs a server started with --task {} (this one runs --task {})",
        task.name(),
        state.task.name()
    )))
}

/// A 400 for a generation route on a server that embeds or reranks.
pub fn require_generation(state: &AppState, route: &str) -> Result<(), ApiError> {
    require(state, Task::Generate, route)
}

/// Runs each prompt as a prefill-only request (all submitted first, so they batch) and returns
/// their vectors with the tokens computed.
async fn pooled(
    state: &Arc<AppState>,
    prompts: Vec<Vec<u32>>,
    adapter: u16,
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>, ApiError> {
    // Each input waits as a request of its own: more than the queue holds could never all start.
    let most = state.engine.max_waiting();
    if prompts.len() > most {
        return Err(ApiError::bad_request(format!(
            "{} inputs in one request; this server takes at most {most} (--max-queue)",
            prompts.len()
        ))
        .with_param("input"));
    }
    let mut rxs = vec![];
    for (i, p) in prompts.into_iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::bad_request(format!("input {i} is empty")).with_param("input"));
        }
        if p.len() >= state.max_model_len {
            return Err(ApiError::bad_request(format!(
                "input {i} has {} tokens; this server takes at most {}",
                p.len(),
                state.max_model_len - 1
            ))
            .with_param("input")
            .with_code("context_length_exceeded"));
        }
        let job = gen::job(state, p, adapter, state.model.gen_config.sampling_params(false), None);
        let rx = gen::submit_pooled(state, job, pooling.clone())?;
        rxs.push(rx);
    }
    let mut out = Vec::with_capacity(rxs.len());
    for mut rx in rxs {
        let mut v = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Pooled(x) => v = Some(x),
                Event::Error(e) => return Err(ApiError::internal(format!("computing the input failed: {e}"))),
                Event::Finished(_) => break,
                _ => {}
            }
        }
        out.push(v.ok_or_else(|| ApiError::internal("the engine stopped before answering"))?);
    }
    Ok(out)
}

/// `v`'s first `dims` values (all by default), scaled to unit length.
fn normalised(mut v: Vec<f32>, dims: Option<usize>) -> Vec<f32> {
    if let Some(d) = dims {
        v.truncate(d);
    }
    let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    v
}

/// `input` of an embeddings request: a text, texts, token ids, or lists of token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum EmbedInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The inputs as token ids: texts through the tokenizer with its special tokens (an embedding
/// model's tokenizer appends the end-of-text token that last-token pooling reads).
fn input_ids(state: &AppState, input: EmbedInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = state.model.config.vocab_size as u32;
    let ids = match input {
        EmbedInput::Text(t) => vec![t],
        EmbedInput::Texts(t) => t,
        EmbedInput::Ids(ids) => return check_ids(vec![ids], vocab),
        EmbedInput::IdLists(l) => return check_ids(l, vocab),
    };
    if ids.is_empty() {
        return Err(ApiError::bad_request("input must not be empty").with_param("input"));
    }
    ids.iter()
        .map(|t| state.model.tokenizer.encode(t, true).map_err(|e| ApiError::bad_request(e.to_string())))
        .collect()
}

fn check_ids(lists: Vec<Vec<u32>>, vocab: u32) -> Result<Vec<Vec<u32>>, ApiError> {
    if lists.is_empty() {
        return Err(ApiError::bad_request("input must not be empty").with_param("input"));
    }
    if let Some(&bad) = lists.iter().flatten().find(|&&t| t >= vocab) {
        return Err(ApiError::bad_request(format!("input: token id {bad} is outside the vocabulary of {vocab}"))
            .with_param("input"));
    }
    Ok(lists)
}

/// `dimensions`: at most the model's hidden size, at least 1.
fn dimensions(state: &AppState, d: Option<u64>, param: &str) -> Result<Option<usize>, ApiError> {
    let h = state.model.config.hidden_size;
    match d {
        None => Ok(None),
        Some(d) if d >= 1 && d as usize <= h => Ok(Some(d as usize)),
        Some(d) => Err(ApiError::bad_request(format!("{param} must be in [1, {h}], got {d}")).with_param(param)),
    }
}

#[derive(Deserialize, Debug)]
struct EmbeddingsRequest {
    model: Option<String>,
    input: EmbedInput,
    dimensions: Option<u64>,
    encoding_format: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    require(&state, Task::Embed, "/v1/embeddings")?;
    let req: EmbeddingsRequest = parse_json(&body)?;
    gen::check_fields(&req.extra, &["user"], "")?;
    let adapter = check_model(&state, req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format must be \"float\" or \"base64\", not {other:?}"
            ))
            .with_param("encoding_format"))
        }
    };
    let dims = dimensions(&state, req.dimensions, "dimensions")?;
    let prompts = input_ids(&state, req.input)?;
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let vectors = pooled(&state, prompts, adapter, Pooling::LastHidden).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = normalised(v, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": state.model.name,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})))
}

#[derive(Deserialize, Debug)]
struct OllamaEmbedRequest {
    model: String,
    input: EmbedInput,
    /// Cut inputs longer than the context (default) instead of refusing them.
    truncate: Option<bool>,
    dimensions: Option<u64>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Ollama's fields accepted and ignored: the model stays loaded while the server runs.
const OLLAMA_IGNORED: &[&str] = &["keep_alive", "options"];

/// `POST /api/embed` (Ollama): normalised embeddings of one input or several.
pub async fn ollama_embed(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    require(&state, Task::Embed, "/api/embed")?;
    let t0 = Instant::now();
    let req: OllamaEmbedRequest = parse_json(&body)?;
    gen::check_fields(&req.extra, OLLAMA_IGNORED, "")?;
    let adapter = check_model(&state, Some(&req.model))?;
    let dims = dimensions(&state, req.dimensions, "dimensions")?;
    let mut prompts = input_ids(&state, req.input)?;
    if req.truncate != Some(false) {
        let keep = state.max_model_len - 1;
        prompts.iter_mut().for_each(|p| p.truncate(keep));
    }
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let vectors = pooled(&state, prompts, adapter, Pooling::LastHidden).await?;
    let embeddings: Vec<Vec<f32>> = vectors.into_iter().map(|v| normalised(v, dims)).collect();
    Ok(Json(json!({"model": req.model, "embeddings": embeddings, "total_duration": t0.elapsed().as_nanos() as u64,
                   "load_duration": 0, "prompt_eval_count": tokens})))
}

#[derive(Deserialize, Debug)]
struct OllamaEmbeddingsRequest {
    model: String,
    prompt: String,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `POST /api/embeddings` (Ollama's older route): one embedding, not normalised (as Ollama
/// answers it).
pub async fn ollama_embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    require(&state, Task::Embed, "/api/embeddings")?;
    let req: OllamaEmbeddingsRequest = parse_json(&body)?;
    gen::check_fields(&req.extra, OLLAMA_IGNORED, "")?;
    let adapter = check_model(&state, Some(&req.model))?;
    let ids = input_ids(&state, EmbedInput::Text(req.prompt))?;
    let v = pooled(&state, ids, adapter, Pooling::LastHidden).await?.pop().unwrap_or_default();
    Ok(Json(json!({"embedding": v})))
}

/// A document: its text, or `{"text": ...}`.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

#[derive(Deserialize, Debug)]
struct RerankRequest {
    model: Option<String>,
    query: String,
    documents: Vec<Document>,
    top_n: Option<usize>,
    return_documents: Option<bool>,
    /// What relevance means (Qwen3-Reranker's instruction; default: web search).
    instruction: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Qwen3-Reranker's prompt around its judgement of one document.
const RERANK_PREFIX: &str = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n";
const RERANK_SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
const RERANK_INSTRUCTION: &str = "Given a web search query, retrieve relevant passages that answer the query";

/// `POST /v1/rerank`: the documents by relevance to the query, most relevant first.
pub async fn rerank(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    require(&state, Task::Rerank, "/v1/rerank")?;
    let req: RerankRequest = parse_json(&body)?;
    gen::check_fields(&req.extra, &[], "")?;
    let adapter = check_model(&state, req.model.as_deref())?;
    if req.documents.is_empty() {
        return Err(ApiError::bad_request("documents must not be empty").with_param("documents"));
    }
    let tok = &state.model.tokenizer;
    let id = |t: &str| {
        tok.token_id(t).ok_or_else(|| ApiError::internal(format!("the tokenizer has no {t:?} token to score with")))
    };
    let (no, yes) = (id("no")?, id("yes")?);
    let enc = |t: &str| tok.encode(t, false).map_err(|e| ApiError::bad_request(e.to_string()));
    let (prefix, suffix) = (enc(RERANK_PREFIX)?, enc(RERANK_SUFFIX)?);
    let instruction = req.instruction.as_deref().unwrap_or(RERANK_INSTRUCTION);
    let texts: Vec<String> = req
        .documents
        .into_iter()
        .map(|d| match d {
            Document::Text(t) | Document::Object { text: t } => t,
        })
        .collect();
    let prompts = texts
        .iter()
        .map(|doc| {
            let body = enc(&format!("<Instruct>: {instruction}\n<Query>: {}\n<Document>: {doc}", req.query))?;
            Ok([prefix.as_slice(), &body, &suffix].concat())
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let logits = pooled(&state, prompts, adapter, Pooling::Logits(vec![no, yes])).await?;
    let mut results: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (n, y) = (l[0] as f64, l[1] as f64);
            let m = n.max(y);
            (i, (y - m).exp() / ((n - m).exp() + (y - m).exp()))
        })
        .collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    results.truncate(req.top_n.unwrap_or(results.len()));
    let with_docs = req.return_documents.unwrap_or(true);
    let results: Vec<Value> = results
        .into_iter()
        .map(|(i, s)| {
            let mut r = json!({"index": i, "relevance_score": s});
            if with_docs {
                r["document"] = json!({"text": texts[i]});
            }
            r
        })
        .collect();
    Ok(Json(json!({"id": new_id("rerank-"), "model": state.model.name, "results": results,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})))
}
