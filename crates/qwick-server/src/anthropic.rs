//! The Anthropic Messages API: `/v1/messages` (answered whole or as Anthropic's event stream)
//! and `/v1/messages/count_tokens`. Messages with text, `thinking`, `tool_use` and
//! `tool_result` blocks become the chat the template renders; `thinking` sets the thinking
//! budget; tools and `tool_choice` map onto the OpenAI path's tool plan. Errors take
//! Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`), here and from the
//! middleware (see [`reshape_error`]).

use crate::app::{sse_response, AppState};
use crate::error::{parse_json, ApiError};
use crate::gen::{self, ChoiceRun, Job, SamplingFields};
use crate::openai::{chat_pipe, check_model, new_id, prefill_prompt, tools_for};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwick_chat::{ChatMessage, ParsedToolCall, ToolCall};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::Sender;

/// Fields accepted and ignored: nothing here is per user, region, tier or workspace
/// (`metadata`, `user_profile_id`, `workspace_id`, `service_tier`, `inference_geo`, `speed`,
/// `diagnostics`), and prompt caching is automatic (`cache_control`).
const IGNORED: &[&str] = &[
    "metadata",
    "user_profile_id",
    "workspace_id",
    "service_tier",
    "inference_geo",
    "speed",
    "diagnostics",
    "cache_control",
];

/// A Messages request (also `count_tokens`', which has no `max_tokens`).
#[derive(Deserialize, Debug)]
struct MessagesRequest {
    model: Option<String>,
    max_tokens: Option<u64>,
    messages: Vec<InMessage>,
    system: Option<Content>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    thinking: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    /// `effort` (a thinking budget) and `format` (a JSON schema the answer follows).
    output_config: Option<OutputConfig>,
    /// Every other field: accepted only when listed in [`IGNORED`].
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn parse(body: &[u8]) -> Result<MessagesRequest, ApiError> {
    let req: MessagesRequest = parse_json(body)?;
    gen::check_fields(&req.extra, IGNORED, "")?;
    Ok(req)
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct OutputConfig {
    effort: Option<String>,
    format: Option<Value>,
}

#[derive(Deserialize, Debug)]
struct InMessage {
    role: String,
    content: Content,
}

/// A string, or a list of content blocks.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Map<String, Value>>),
}

fn bad(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

fn str_field<'a>(b: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, ApiError> {
    b.get(key).and_then(Value::as_str).ok_or_else(|| bad(format!("{at}.{key} must be a string"), format!("{at}.{key}")))
}

/// The text of a `system` prompt or a `tool_result`'s content: a string or text blocks.
fn plain_text(c: &Content, at: &str) -> Result<String, ApiError> {
    match c {
        Content::Text(s) => Ok(s.clone()),
        Content::Blocks(blocks) => {
            let mut out = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let at = format!("{at}[{j}]");
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(str_field(b, "text", &at)?),
                    other => {
                        return Err(bad(
                            format!("{at}: only text blocks can go here, not {other:?}"),
                            format!("{at}.type"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The conversation as template messages: the system prompt, then each message's blocks
/// (a user message's `tool_result` blocks become tool messages ahead of its text; an
/// assistant's `thinking` its reasoning, its `tool_use` blocks its tool calls).
fn to_chat(system: Option<&Content>, msgs: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    let message = |role: &str, content: Option<String>| ChatMessage {
        role: role.into(),
        content,
        reasoning_content: None,
        tool_calls: None,
        tool_call_id: None,
        name: None,
    };
    let mut out = vec![];
    if let Some(s) = system {
        out.push(message("system", Some(plain_text(s, "system")?)));
    }
    if msgs.is_empty() {
        return Err(bad("messages must not be empty", "messages"));
    }
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}].content");
        let blocks = match &m.content {
            Content::Text(s) => vec![Map::from_iter([("type".into(), json!("text")), ("text".into(), json!(s))])],
            Content::Blocks(b) => b.clone(),
        };
        let (mut text, mut reasoning, mut calls) = (String::new(), String::new(), vec![]);
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{at}[{j}]");
            match (m.role.as_str(), b.get("type").and_then(Value::as_str)) {
                (_, Some("text")) => text.push_str(str_field(b, "text", &at)?),
                ("assistant", Some("thinking")) => reasoning.push_str(str_field(b, "thinking", &at)?),
                // Thinking a server chose to hide: nothing of it to render.
                ("assistant", Some("redacted_thinking")) => {}
                ("assistant", Some("tool_use")) => {
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    let call = json!({"id": b.get("id"), "type": "function",
                                      "function": {"name": str_field(b, "name", &at)?, "arguments": input}});
                    calls.push(
                        serde_json::from_value::<ToolCall>(call).map_err(|e| bad(format!("{at}: {e}"), at.clone()))?,
                    );
                }
                ("user", Some("tool_result")) => {
                    let id = str_field(b, "tool_use_id", &at)?;
                    let content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(c) => plain_text(
                            &serde_json::from_value(c.clone()).map_err(|e| bad(format!("{at}.content: {e}"), &at))?,
                            &format!("{at}.content"),
                        )?,
                    };
                    let failed = b.get("is_error").and_then(Value::as_bool) == Some(true);
                    let mut t = message("tool", Some(if failed { format!("Error: {content}") } else { content }));
                    t.tool_call_id = Some(id.to_string());
                    out.push(t);
                }
                (role, kind) => {
                    return Err(bad(
                        format!("{at}: a {role} message cannot hold a {} block here", kind.unwrap_or("typeless")),
                        format!("{at}.type"),
                    ))
                }
            }
        }
        match m.role.as_str() {
            "user" if !text.is_empty() || !blocks.iter().any(|b| b.get("type") == Some(&json!("tool_result"))) => {
                out.push(message("user", Some(text)))
            }
            "user" => {}
            "assistant" => out.push(ChatMessage {
                reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                tool_calls: (!calls.is_empty()).then_some(calls),
                ..message("assistant", (!text.is_empty()).then_some(text))
            }),
            other => {
                return Err(bad(
                    format!("messages[{i}].role must be \"user\" or \"assistant\", not {other:?}"),
                    format!("messages[{i}].role"),
                ))
            }
        }
    }
    Ok(out)
}

/// Tool definitions and `tool_choice` in the OpenAI form, and whether calls may come several
/// at once.
type OpenAiTools = (Option<Vec<Value>>, Option<Value>, bool);

/// Anthropic tools (`{name, description, input_schema}`) in the OpenAI form the template and
/// the tool plan take, and `tool_choice` likewise; with whether calls may come several at once.
fn tools(tools: Option<&[Value]>, choice: Option<&Value>) -> Result<OpenAiTools, ApiError> {
    let mut out = vec![];
    for (i, t) in tools.unwrap_or_default().iter().enumerate() {
        let name = t.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
        match (t.get("type").and_then(Value::as_str), name) {
            (None | Some("custom"), Some(name)) => out.push(json!({"type": "function", "function": {
                "name": name,
                "description": t.get("description").cloned().unwrap_or(Value::Null),
                "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            }})),
            (Some(kind), _) if kind != "custom" => {
                return Err(bad(
                    format!("tools[{i}]: tools of type {kind:?} are not served here"),
                    format!("tools[{i}].type"),
                ))
            }
            _ => return Err(bad(format!("tools[{i}] needs a name"), format!("tools[{i}].name"))),
        }
    }
    let (openai_choice, parallel) = match choice {
        None | Some(Value::Null) => (None, true),
        Some(c) => {
            let parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool) != Some(true);
            let v = match c.get("type").and_then(Value::as_str) {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => {
                    let name = c
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad("tool_choice.name is required", "tool_choice.name"))?;
                    json!({"type": "function", "function": {"name": name}})
                }
                _ => {
                    return Err(bad(
                        "tool_choice.type must be \"auto\", \"any\", \"tool\" or \"none\"",
                        "tool_choice.type",
                    ))
                }
            };
            (Some(v), parallel)
        }
    };
    Ok(((!out.is_empty()).then_some(out), openai_choice, parallel))
}

/// Whether to think and within how many tokens (`None`: unbounded): `thinking`
/// `{"type": "enabled", "budget_tokens": N}` thinks within N tokens, `adaptive` as the model
/// decides (within `output_config.effort`'s budget: `low` 1,024 tokens, `medium` 4,096, `high`,
/// `xhigh` and `max` unbounded), `disabled` not at all; absent, an effort level turns thinking on
/// at its budget, and without one there is none (Anthropic's default).
fn thinking_plan(t: Option<&Value>, effort: Option<&str>) -> Result<Option<Option<u64>>, ApiError> {
    let effort = match effort {
        None => None,
        Some("high" | "xhigh" | "max") => Some(None),
        Some(level @ ("low" | "medium")) => Some(gen::effort_budget(level, "output_config.effort")?.map(|n| n as u64)),
        Some(other) => {
            return Err(bad(
                format!("output_config.effort must be low, medium, high, xhigh or max, not {other:?}"),
                "output_config.effort",
            ))
        }
    };
    match t.map(|t| (t, t.get("type").and_then(Value::as_str))) {
        None | Some((Value::Null, _)) => Ok(effort),
        Some((_, Some("disabled"))) => Ok(None),
        Some((_, Some("adaptive"))) => Ok(Some(effort.flatten())),
        Some((t, Some("enabled"))) => match t.get("budget_tokens").and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(Some(Some(n))),
            _ => Err(bad("thinking.budget_tokens must be a positive integer", "thinking.budget_tokens")),
        },
        _ => Err(bad("thinking.type must be \"enabled\", \"adaptive\" or \"disabled\"", "thinking.type")),
    }
}

/// `output_config.format`: `{"type": "json_schema", "schema": {...}}`.
fn output_format(f: Option<&Value>) -> Result<Option<qwick_chat::OutputFormat>, ApiError> {
    let param = "output_config.format";
    match f {
        None | Some(Value::Null) => Ok(None),
        Some(f) => match (f.get("type").and_then(Value::as_str), f.get("schema")) {
            (Some("json_schema"), Some(s @ Value::Object(_))) => {
                Ok(Some(qwick_chat::OutputFormat::JsonSchema(s.clone())))
            }
            _ => Err(bad(format!("{param} must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}"), param)),
        },
    }
}

/// What a request renders to.
struct Rendered {
    prompt: qwick_chat::Prompt,
    plan: crate::ToolPlan,
    parallel: bool,
    /// The thinking budget, where thinking is on and bounded.
    budget: Option<u64>,
    format: Option<qwick_chat::OutputFormat>,
}

fn render(state: &AppState, req: &MessagesRequest) -> Result<Rendered, ApiError> {
    let messages = to_chat(req.system.as_ref(), &req.messages)?;
    let (defs, choice, parallel) = tools(req.tools.as_deref(), req.tool_choice.as_ref())?;
    let mut plan = tools_for(defs, choice.as_ref(), parallel)?;
    let config = req.output_config.as_ref();
    let plan_thinking = thinking_plan(req.thinking.as_ref(), config.and_then(|c| c.effort.as_deref()))?;
    // A forced call is the answer: no thinking before it, and no other format.
    let thinking = plan_thinking.is_some() && plan.prefill.is_none();
    let format = match (plan.format.take(), output_format(config.and_then(|c| c.format.as_ref()))?) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "output_config.format cannot be combined with a tool_choice that forces a call",
                "output_config.format",
            ))
        }
        (tool, answer) => tool.or(answer),
    };
    // A last message of the assistant's is continued, not closed (an assistant prefill).
    let end = match messages.last().map(|m| m.role.as_str()) {
        Some("assistant") if plan.prefill.is_some() => {
            return Err(bad(
                "a final assistant message cannot be continued with a tool_choice that forces a call",
                "tool_choice",
            ))
        }
        Some("assistant") => qwick_chat::TurnEnd::Continue,
        _ => qwick_chat::TurnEnd::NewTurn,
    };
    let model = &state.model;
    let mut prompt = model
        .render_as(&messages, plan.tools.clone(), Some(thinking), Map::new(), end)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    prefill_prompt(model, &mut prompt, &plan)?;
    Ok(Rendered { prompt, plan, parallel, budget: plan_thinking.flatten().filter(|_| thinking), format })
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens.
pub async fn count_tokens(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req = parse(&body)?;
    check_model(&state, req.model.as_deref())?;
    let r = render(&state, &req)?;
    Ok(Json(json!({"input_tokens": r.prompt.ids.len()})))
}

/// `POST /v1/messages`.
pub async fn messages(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req = parse(&body)?;
    let adapter = check_model(&state, req.model.as_deref())?;
    let max_tokens = req.max_tokens.ok_or_else(|| bad("max_tokens is required", "max_tokens"))?;
    let Rendered { prompt, plan, parallel, budget, format } = render(&state, &req)?;
    let model = state.model.clone();
    let max_tokens = gen::fit_context(state.max_model_len, prompt.ids.len(), Some(max_tokens), "max_tokens")?;
    let fields = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop_sequences.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut sp = gen::sampling(model.gen_config.sampling_params(prompt.thinking), &fields, model.config.vocab_size)?;
    sp.max_tokens = Some(max_tokens);
    let budget = match budget {
        Some(t) => Some(
            model
                .budget(t as usize, prompt.starts_in_thinking)
                .ok_or_else(|| bad("thinking: the tokenizer has no </think> token", "thinking"))?,
        ),
        None => None,
    };
    let param = if plan.prefill.is_some() { "tools" } else { "output_config.format" };
    let constraint = gen::constraints(&state, format.as_ref(), prompt.thinking, 1, param)?.pop().flatten();
    let stops = sp.stop.clone();
    let job = Job { constraint, ..gen::job(&state, prompt.ids.clone(), adapter, sp, budget) };
    let pipe = chat_pipe(&model, &stops, &prompt, &plan, parallel);
    let run = ChoiceRun::new(state.clone(), gen::submit(&state, job)?, pipe, arrival);
    let out = Out { id: new_id("msg_"), model: model.name.clone(), stops, prompt_tokens: prompt.ids.len() };
    if req.stream == Some(true) {
        return Ok(sse_response(move |tx| stream(out, run, tx)));
    }
    whole(out, run).await
}

/// What the answer names besides its content.
struct Out {
    id: String,
    model: String,
    stops: Vec<String>,
    prompt_tokens: usize,
}

impl Out {
    /// `stop_reason` and `stop_sequence` of a finished run.
    fn stop(&self, run: &ChoiceRun) -> (&'static str, Value) {
        match (run.finish, run.pipe.matched_stop) {
            (Some("tool_calls"), _) => ("tool_use", Value::Null),
            (Some("length"), _) => ("max_tokens", Value::Null),
            (_, Some(i)) => ("stop_sequence", json!(self.stops.get(i))),
            _ => ("end_turn", Value::Null),
        }
    }

    fn usage(&self, run: &ChoiceRun) -> Value {
        let prompt = run.prompt_tokens.max(self.prompt_tokens);
        json!({"input_tokens": prompt - run.cached_tokens.min(prompt), "output_tokens": run.tokens.len(),
               "cache_read_input_tokens": run.cached_tokens, "cache_creation_input_tokens": 0})
    }
}

fn tool_use(c: &ParsedToolCall) -> Value {
    let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": new_id("toolu_"), "name": c.name, "input": input})
}

async fn whole(out: Out, mut run: ChoiceRun) -> Result<Response, ApiError> {
    let piece = run.collect().await;
    if let Some(e) = &run.error {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let d = &piece.delta;
    let mut content = vec![];
    if !d.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": d.reasoning, "signature": ""}));
    }
    if !d.content.is_empty() {
        content.push(json!({"type": "text", "text": d.content}));
    }
    content.extend(d.tool_calls.iter().map(tool_use));
    let (reason, sequence) = out.stop(&run);
    Ok(Json(json!({
        "id": out.id, "type": "message", "role": "assistant", "model": out.model, "content": content,
        "stop_reason": reason, "stop_sequence": sequence, "usage": out.usage(&run),
    }))
    .into_response())
}

async fn event(tx: &Sender<Bytes>, v: Value) -> bool {
    let kind = v["type"].as_str().unwrap_or("message").to_string();
    tx.send(Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))).await.is_ok()
}

/// The content block being streamed: its index and kind.
struct Blocks {
    next: usize,
    open: Option<&'static str>,
}

impl Blocks {
    /// Opens a block of `kind` (closing another kind's) unless one is open; its index.
    async fn ensure(&mut self, tx: &Sender<Bytes>, kind: &'static str) -> Option<usize> {
        if self.open == Some(kind) {
            return Some(self.next - 1);
        }
        self.close(tx).await?;
        let block = match kind {
            "thinking" => json!({"type": "thinking", "thinking": "", "signature": ""}),
            _ => json!({"type": "text", "text": ""}),
        };
        let i = self.next;
        event(tx, json!({"type": "content_block_start", "index": i, "content_block": block})).await.then_some(())?;
        self.next += 1;
        self.open = Some(kind);
        Some(i)
    }

    async fn close(&mut self, tx: &Sender<Bytes>) -> Option<()> {
        if let Some(kind) = self.open.take() {
            let i = self.next - 1;
            if kind == "thinking" {
                let d = json!({"type": "signature_delta", "signature": ""});
                event(tx, json!({"type": "content_block_delta", "index": i, "delta": d})).await.then_some(())?;
            }
            event(tx, json!({"type": "content_block_stop", "index": i})).await.then_some(())?;
        }
        Some(())
    }
}

/// Anthropic's event stream: `message_start`, each content block's `content_block_start`,
/// deltas and `content_block_stop`, then `message_delta` (stop reason, usage) and
/// `message_stop`; a failed generation ends with an `error` event.
async fn stream(out: Out, mut run: ChoiceRun, tx: Sender<Bytes>) {
    let start = json!({"type": "message_start", "message": {
        "id": out.id, "type": "message", "role": "assistant", "model": out.model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": out.prompt_tokens, "output_tokens": 0}}});
    if !event(&tx, start).await {
        return;
    }
    let mut blocks = Blocks { next: 0, open: None };
    while let Some(piece) = run.next_unless_closed(&tx).await {
        if let Some(e) = &run.error {
            let err =
                json!({"type": "error", "error": {"type": "api_error", "message": format!("generation failed: {e}")}});
            let _ = event(&tx, err).await;
            return;
        }
        let d = piece.delta;
        for (kind, text, delta) in [("thinking", d.reasoning, "thinking_delta"), ("text", d.content, "text_delta")] {
            if text.is_empty() {
                continue;
            }
            let Some(i) = blocks.ensure(&tx, kind).await else { return };
            let field = if kind == "thinking" { "thinking" } else { "text" };
            let delta = json!({"type": delta, field: text});
            if !event(&tx, json!({"type": "content_block_delta", "index": i, "delta": delta})).await {
                return;
            }
        }
        for c in &d.tool_calls {
            if blocks.close(&tx).await.is_none() {
                return;
            }
            let mut block = tool_use(c);
            let input = std::mem::replace(&mut block["input"], json!({}));
            let i = blocks.next;
            blocks.next += 1;
            let delta = json!({"type": "input_json_delta", "partial_json": input.to_string()});
            for e in [
                json!({"type": "content_block_start", "index": i, "content_block": block}),
                json!({"type": "content_block_delta", "index": i, "delta": delta}),
                json!({"type": "content_block_stop", "index": i}),
            ] {
                if !event(&tx, e).await {
                    return;
                }
            }
        }
    }
    if tx.is_closed() || blocks.close(&tx).await.is_none() {
        return;
    }
    let (reason, sequence) = out.stop(&run);
    let delta = json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": out.usage(&run)});
    if event(&tx, delta).await {
        let _ = event(&tx, json!({"type": "message_stop"})).await;
    }
}

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error answered on an Anthropic route, in Anthropic's shape: the OpenAI-shaped error
/// bodies of the handlers and the middleware (key, size, routing) are rewritten.
pub async fn reshape_error(resp: Response) -> Response {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let body = json!({"type": "error", "error": {"type": error_type(status), "message": message}});
    let mut resp = (status, Json(body)).into_response();
    for (k, v) in parts.headers.iter().filter(|(k, _)| *k != header::CONTENT_LENGTH && *k != header::CONTENT_TYPE) {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    resp
}
