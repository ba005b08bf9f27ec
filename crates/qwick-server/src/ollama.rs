//! The Ollama API: `/api/chat`, `/api/generate` (NDJSON streaming by default), `/api/tags`,
//! `/api/show`, `/api/ps`, `/api/version`.

use crate::app::{streamed, AppState};
use crate::error::{parse_json, ApiError};
use crate::gen::{self, ChoiceRun, Job, SamplingFields};
use crate::openai::check_model;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwick_chat::{ChatMessage, Delta, TextPipe, ToolCall};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// Errors in Ollama's shape: `{"error": "..."}`.
pub struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        (self.0.status, Json(json!({"error": self.0.message}))).into_response()
    }
}

type OResult<T> = Result<T, OllamaError>;

/// RFC 3339 UTC time with nanoseconds, as Ollama writes `created_at`.
fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

fn rfc3339(unix: i64, nanos: u32) -> String {
    let date = qwick_chat::format_utc("%Y-%m-%dT%H:%M:%S", unix).expect("codes format_utc knows");
    format!("{date}.{nanos:09}Z")
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    num_predict: Option<i64>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Bounds the context (prompt + output) below the server's limit.
    num_ctx: Option<u64>,
    /// Every other option: accepted only when listed in [`OPTIONS_IGNORED`].
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Ollama options that are about hardware or loading, which qwick decides itself: accepted and
/// ignored.
const OPTIONS_IGNORED: &[&str] = &[
    "num_thread",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "use_mlock",
    "numa",
    "num_batch",
    "low_vram",
    "f16_kv",
    "vocab_only",
];

/// Request fields accepted and ignored: `keep_alive` (the model stays loaded while the server
/// runs).
const REQUEST_IGNORED: &[&str] = &["keep_alive"];

/// Ollama's `format`: `"json"` (any JSON value... an object here, as Ollama's models answer)
/// or a JSON schema.
fn output_format(v: &Option<Value>) -> Result<Option<qwick_chat::OutputFormat>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(qwick_chat::OutputFormat::JsonObject)),
        Some(Value::Object(_)) => Ok(Some(qwick_chat::OutputFormat::JsonSchema(v.clone().unwrap_or_default()))),
        Some(f) => {
            Err(ApiError::bad_request(format!("format must be \"json\" or a JSON schema, not {f}"))
                .with_param("format"))
        }
    }
}

#[derive(Deserialize, Debug)]
struct OllamaToolCall {
    function: OllamaFunction,
}

#[derive(Deserialize, Debug)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize, Debug)]
struct OllamaMessage {
    role: String,
    content: Option<String>,
    thinking: Option<String>,
    tool_calls: Option<Vec<OllamaToolCall>>,
    images: Option<Vec<Value>>,
    tool_name: Option<String>,
}

#[derive(Deserialize, Debug)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    tools: Option<Vec<Value>>,
    stream: Option<bool>,
    think: Option<Value>,
    options: Option<Options>,
    format: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize, Debug)]
struct GenerateRequest {
    model: String,
    prompt: Option<String>,
    system: Option<String>,
    raw: Option<bool>,
    stream: Option<bool>,
    think: Option<Value>,
    options: Option<Options>,
    images: Option<Vec<Value>>,
    format: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn check(state: &AppState, model: &str) -> Result<u16, ApiError> {
    if model.is_empty() {
        return Err(ApiError::bad_request("model is required").with_param("model"));
    }
    check_model(state, Some(model)).map_err(|_| ApiError::not_found(format!("model '{model}' not found")))
}

/// `think`: true, false, or a level ("low", "medium", "high": on, with the thinking budget of
/// [`gen::effort_budget`]). Returns the switch and the budget.
fn think_flag(v: Option<Value>) -> Result<(Option<bool>, Option<usize>), ApiError> {
    match v {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Bool(b)) => Ok((Some(b), None)),
        Some(Value::String(s)) if matches!(s.as_str(), "low" | "medium" | "high") => {
            Ok((Some(true), gen::effort_budget(&s, "think")?))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "think must be true, false, \"low\", \"medium\" or \"high\", not {other}"
        ))),
    }
}

/// Sampling and the output limit from `options`.
fn params(
    state: &AppState,
    thinking: bool,
    opts: Options,
    prompt_len: usize,
) -> Result<(qwick_engine::SamplingParams, usize), ApiError> {
    let fields = SamplingFields {
        temperature: opts.temperature,
        top_p: opts.top_p,
        top_k: opts.top_k,
        min_p: opts.min_p,
        presence_penalty: opts.presence_penalty,
        frequency_penalty: opts.frequency_penalty,
        repetition_penalty: opts.repeat_penalty,
        seed: opts.seed,
        stop: opts.stop.unwrap_or_default(),
        stop_token_ids: vec![],
        logit_bias: None,
    };
    let vocab = state.model.config.vocab_size;
    gen::check_fields(&opts.extra, OPTIONS_IGNORED, "options.")?;
    let ctx = match opts.num_ctx {
        None => state.max_model_len,
        Some(0) => return Err(ApiError::bad_request("options.num_ctx must be positive").with_param("options.num_ctx")),
        Some(n) => state.max_model_len.min(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let mut sp = gen::sampling(state.model.gen_config.sampling_params(thinking), &fields, vocab)?;
    // num_predict: -1 (or absent) until the context is full; -2 fills the context.
    let max = match opts.num_predict {
        None | Some(-1) | Some(-2) => None,
        Some(n) if n <= 0 => {
            return Err(ApiError::bad_request(format!("options.num_predict must be positive, -1 or -2, got {n}")))
        }
        Some(n) => Some((n as u64).min((ctx - prompt_len.min(ctx)) as u64)),
    };
    let limit = gen::fit_context(ctx, prompt_len, max.filter(|&m| m > 0), "options.num_predict")?;
    sp.max_tokens = Some(limit);
    Ok((sp, limit))
}

fn stats(run: &ChoiceRun, arrival: Instant) -> Map<String, Value> {
    let now = Instant::now();
    let first = run.first_token.unwrap_or(now);
    let ns = |d: std::time::Duration| d.as_nanos() as u64;
    let mut m = Map::new();
    m.insert("total_duration".into(), json!(ns(now - arrival)));
    m.insert("load_duration".into(), json!(0));
    m.insert("prompt_eval_count".into(), json!(run.prompt_tokens));
    m.insert("prompt_eval_duration".into(), json!(ns(first.saturating_duration_since(arrival))));
    m.insert("eval_count".into(), json!(run.tokens.len()));
    m.insert("eval_duration".into(), json!(ns(now.saturating_duration_since(first))));
    m
}

fn tool_calls(d: &Delta) -> Vec<Value> {
    d.tool_calls
        .iter()
        .map(|c| {
            let args: Value = serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone()));
            json!({"function": {"name": c.name, "arguments": args}})
        })
        .collect()
}

/// Drives one generation: NDJSON lines while streaming, else one object.
async fn respond(
    state: Arc<AppState>,
    mut run: ChoiceRun,
    stream: bool,
    arrival: Instant,
    thinking_field: bool,
    shape: fn(&str, &Delta, bool, bool) -> Map<String, Value>,
    context: Option<Vec<u32>>,
) -> Response {
    let name = state.model.name.clone();
    let finish_obj = move |run: &ChoiceRun, d: &Delta, ctx: &Option<Vec<u32>>| -> Value {
        let mut m = Map::new();
        m.insert("model".into(), json!(name));
        m.insert("created_at".into(), json!(now_rfc3339()));
        m.extend(shape("", d, thinking_field, true));
        m.insert("done".into(), json!(true));
        m.insert("done_reason".into(), json!(run.finish.map(|f| if f == "tool_calls" { "stop" } else { f })));
        m.extend(stats(run, arrival));
        if let Some(c) = ctx {
            let mut all = c.clone();
            all.extend(&run.tokens);
            m.insert("context".into(), json!(all));
        }
        Value::Object(m)
    };
    if !stream {
        let d = run.collect().await.delta;
        if let Some(e) = &run.error {
            return OllamaError(ApiError::internal(format!("generation failed: {e}"))).into_response();
        }
        return Json(finish_obj(&run, &d, &context)).into_response();
    }
    let name = state.model.name.clone();
    streamed("application/x-ndjson", move |tx| async move {
        loop {
            let piece = tokio::select! {
                p = run.next() => p,
                _ = tx.closed() => return,
            };
            let Some(piece) = piece else { return };
            if piece.done {
                if let Some(e) = &run.error {
                    let _ = tx
                        .send(Bytes::from(format!("{}\n", json!({"error": format!("generation failed: {e}")}))))
                        .await;
                    return;
                }
                let line = finish_obj(&run, &piece.delta, &context);
                let _ = tx.send(Bytes::from(format!("{line}\n"))).await;
                return;
            }
            if piece.delta.is_empty() {
                continue;
            }
            let mut m = Map::new();
            m.insert("model".into(), json!(name));
            m.insert("created_at".into(), json!(now_rfc3339()));
            m.extend(shape("", &piece.delta, thinking_field, false));
            m.insert("done".into(), json!(false));
            if tx.send(Bytes::from(format!("{}\n", Value::Object(m)))).await.is_err() {
                return;
            }
        }
    })
}

fn chat_shape(_: &str, d: &Delta, thinking: bool, _done: bool) -> Map<String, Value> {
    let mut msg = json!({"role": "assistant", "content": d.content});
    if thinking && !d.reasoning.is_empty() {
        msg["thinking"] = json!(d.reasoning);
    }
    if !d.tool_calls.is_empty() {
        msg["tool_calls"] = json!(tool_calls(d));
    }
    let mut m = Map::new();
    m.insert("message".into(), msg);
    m
}

fn generate_shape(_: &str, d: &Delta, thinking: bool, _done: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("response".into(), json!(d.content));
    if thinking && !d.reasoning.is_empty() {
        m.insert("thinking".into(), json!(d.reasoning));
    }
    m
}

fn to_messages(msgs: Vec<OllamaMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = vec![];
    for (i, m) in msgs.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role: unknown role {:?} (expected system, user, assistant or tool)",
                m.role
            )));
        }
        if m.images.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_request(format!("messages[{i}]: images are not supported by this model")));
        }
        let calls = m.tool_calls.map(|c| {
            c.into_iter().map(|t| ToolCall::function(t.function.name, t.function.arguments)).collect::<Vec<_>>()
        });
        let content = match (m.role.as_str(), m.content) {
            ("assistant", c) => Some(c.unwrap_or_default()),
            (_, Some(c)) => Some(c),
            (role, None) => {
                return Err(ApiError::bad_request(format!("messages[{i}]: a {role} message needs content")))
            }
        };
        out.push(ChatMessage {
            role: m.role,
            content,
            reasoning_content: m.thinking,
            tool_calls: calls.filter(|c| !c.is_empty()),
            tool_call_id: None,
            name: m.tool_name,
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn submit_one(
    state: &Arc<AppState>,
    prompt: &qwick_chat::Prompt,
    sp: qwick_engine::SamplingParams,
    parse_tools: bool,
    budget: Option<usize>,
    format: Option<&qwick_chat::OutputFormat>,
    arrival: Instant,
    adapter: u16,
) -> Result<ChoiceRun, ApiError> {
    let constraint = gen::constraints(state, format, prompt.thinking, 1, "format")?.pop().flatten();
    let model = &state.model;
    let stops = sp.stop.clone();
    let thinking = match budget {
        Some(n) if n > 0 && prompt.thinking => {
            Some(model.budget(n, prompt.starts_in_thinking).ok_or_else(|| {
                ApiError::bad_request("think: the tokenizer has no </think> token").with_param("think")
            })?)
        }
        _ => None,
    };
    let rx = gen::submit(state, Job { constraint, ..gen::job(state, prompt.ids.clone(), adapter, sp, thinking) })?;
    let pipe = TextPipe::new(&model.tokenizer, &stops, Some(prompt.starts_in_thinking), parse_tools);
    Ok(ChoiceRun::new(state.clone(), rx, pipe, arrival))
}

pub async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> OResult<Response> {
    let arrival = Instant::now();
    let req: ChatRequest = parse_json(&body)?;
    let adapter = check(&state, &req.model)?;
    gen::check_fields(&req.extra, REQUEST_IGNORED, "")?;
    let format = output_format(&req.format)?;
    let (think, budget) = think_flag(req.think)?;
    if req.messages.is_empty() {
        // Ollama answers an empty chat by loading the model.
        return Ok(Json(json!({
            "model": state.model.name, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": true,
        }))
        .into_response());
    }
    let messages = to_messages(req.messages)?;
    let tools = req.tools.filter(|t| !t.is_empty());
    let parse_tools = tools.is_some();
    let prompt =
        state.model.render(&messages, tools, think, Map::new()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (sp, _) = params(&state, prompt.thinking, req.options.unwrap_or_default(), prompt.ids.len())?;
    let run = submit_one(&state, &prompt, sp, parse_tools, budget, format.as_ref(), arrival, adapter)?;
    Ok(respond(state.clone(), run, req.stream != Some(false), arrival, true, chat_shape, None).await)
}

pub async fn generate(State(state): State<Arc<AppState>>, body: Bytes) -> OResult<Response> {
    let arrival = Instant::now();
    let req: GenerateRequest = parse_json(&body)?;
    let adapter = check(&state, &req.model)?;
    gen::check_fields(&req.extra, REQUEST_IGNORED, "")?;
    let format = output_format(&req.format)?;
    let (think, budget) = think_flag(req.think)?;
    if req.images.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::bad_request("images are not supported by this model").into());
    }
    let text = req.prompt.unwrap_or_default();
    if text.is_empty() {
        return Ok(Json(json!({
            "model": state.model.name, "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load",
        }))
        .into_response());
    }
    let prompt = if req.raw == Some(true) {
        let ids = state.model.tokenizer.encode(&text, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
        qwick_chat::Prompt { text: text.clone(), ids, starts_in_thinking: false, thinking: false }
    } else {
        let mut msgs = vec![];
        if let Some(s) = req.system {
            msgs.push(ChatMessage::system(s));
        }
        msgs.push(ChatMessage::user(text));
        state.model.render(&msgs, None, think, Map::new()).map_err(|e| ApiError::bad_request(e.to_string()))?
    };
    let (sp, _) = params(&state, prompt.thinking, req.options.unwrap_or_default(), prompt.ids.len())?;
    let run = submit_one(&state, &prompt, sp, false, budget, format.as_ref(), arrival, adapter)?;
    let ctx = Some(prompt.ids.clone());
    Ok(respond(state.clone(), run, req.stream != Some(false), arrival, true, generate_shape, ctx).await)
}

fn details(state: &AppState) -> Value {
    let c = &state.model.config;
    let params = c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 }
        + c.num_hidden_layers
            * (c.hidden_size * (c.q_dim() + 2 * c.kv_dim())
                + c.q_dim() * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size);
    let size = if params >= 1_000_000_000 {
        format!("{:.1}B", params as f64 / 1e9)
    } else {
        format!("{:.1}M", params as f64 / 1e6)
    };
    json!({
        "parent_model": "",
        "format": if state.model.is_gguf() { "gguf" } else { "safetensors" },
        "family": "qwen3",
        "families": ["qwen3"],
        "parameter_size": size,
        "quantization_level": c.dtype.clone().unwrap_or_else(|| "unknown".into()).to_uppercase(),
    })
}

fn digest(state: &AppState) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.model.dir.hash(&mut h);
    state.model.weight_bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn tag(state: &AppState) -> String {
    let n = &state.model.name;
    if n.contains(':') {
        n.clone()
    } else {
        format!("{n}:latest")
    }
}

/// The model, then each LoRA adapter served beside it (as a model of its own whose
/// `details.parent_model` is the base, like a model Ollama built with an `ADAPTER` line).
pub async fn tags(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut models = vec![json!({
        "name": tag(&state),
        "model": tag(&state),
        "modified_at": rfc3339(state.model.created as i64, 0),
        "size": state.model.weight_bytes,
        "digest": digest(&state),
        "details": details(&state),
    })];
    for a in &state.model.adapters {
        let name = if a.contains(':') { a.clone() } else { format!("{a}:latest") };
        let mut d = details(&state);
        d["parent_model"] = json!(tag(&state));
        models.push(json!({
            "name": name,
            "model": name,
            "modified_at": rfc3339(state.model.created as i64, 0),
            "size": state.model.weight_bytes,
            "digest": format!("{}-{a}", digest(&state)),
            "details": d,
        }));
    }
    Json(json!({ "models": models }))
}

pub async fn ps(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"models": [{
        "name": tag(&state),
        "model": tag(&state),
        "size": state.model.weight_bytes,
        "digest": digest(&state),
        "details": details(&state),
        "expires_at": "2262-04-11T23:47:16.854775807Z",
        "size_vram": 0,
        "context_length": state.max_model_len,
    }]}))
}

#[derive(Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

pub async fn show(State(state): State<Arc<AppState>>, body: Bytes) -> OResult<Json<Value>> {
    let req: ShowRequest = parse_json(&body)?;
    let model = req.model.or(req.name).unwrap_or_default();
    check(&state, &model)?;
    let c = &state.model.config;
    let mut caps = vec!["completion"];
    if state.model.supports_tools() {
        caps.push("tools");
    }
    if state.model.tokenizer.token_id("</think>").is_some() {
        caps.push("thinking");
    }
    let gc = &state.model.gen_config;
    let mut params = String::new();
    for (k, v) in [
        ("temperature", gc.temperature.map(|x| x.to_string())),
        ("top_p", gc.top_p.map(|x| x.to_string())),
        ("top_k", gc.top_k.map(|x| x.to_string())),
    ] {
        if let Some(v) = v {
            params.push_str(&format!("{k:<15}{v}\n"));
        }
    }
    Ok(Json(json!({
        "modelfile": format!("FROM {}\n", state.model.dir.display()),
        "parameters": params,
        "template": "{{ .Messages }} (rendered with the model's own Jinja chat template)",
        "details": details(&state),
        "model_info": {
            "general.architecture": "qwen3",
            "general.basename": state.model.name,
            "qwen3.context_length": c.max_position_embeddings,
            "qwen3.embedding_length": c.hidden_size,
            "qwen3.block_count": c.num_hidden_layers,
            "qwen3.attention.head_count": c.num_attention_heads,
            "qwen3.attention.head_count_kv": c.num_key_value_heads,
            "qwen3.feed_forward_length": c.intermediate_size,
            "qwen3.vocab_size": c.vocab_size,
        },
        "capabilities": caps,
        "modified_at": rfc3339(state.model.created as i64, 0),
    })))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats() {
        assert_eq!(super::rfc3339(1_709_211_909, 5), "2024-02-29T13:05:09.000000005Z");
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
    }
}
