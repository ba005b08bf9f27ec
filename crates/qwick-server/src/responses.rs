//! OpenAI's Responses API: `POST /v1/responses` (answered whole or as the `response.*` event
//! stream), `GET` and `DELETE /v1/responses/{id}`. Input items (messages, function calls and
//! their outputs, reasoning) become the chat the template renders; `instructions` its system
//! message; `reasoning.effort` a thinking budget; function tools, `tool_choice` and
//! `text.format` map onto the chat path's tool plan and output formats. Stored responses (the
//! default; `store: false` keeps none) continue with `previous_response_id`: the server keeps
//! the last [`STORED`] in memory for its lifetime.

use crate::app::{sse_response, AppState};
use crate::error::{parse_json, ApiError};
use crate::gen::{self, ChoiceRun, Job, SamplingFields};
use crate::openai::{chat_pipe, check_model, new_id, prefill_prompt, tools_for};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qwick_chat::{ChatMessage, OutputFormat, ToolCall};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::Sender;

/// How many responses the server keeps for `previous_response_id` and `GET` (the oldest go).
pub const STORED: usize = 1024;

/// Stored responses: each one's conversation (input and output, without its instructions,
/// which a continuation does not inherit) and its response object.
#[derive(Default)]
pub struct Store(Mutex<VecDeque<(String, Vec<ChatMessage>, Value)>>);

impl Store {
    fn get(&self, id: &str) -> Option<(Vec<ChatMessage>, Value)> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().find(|e| e.0 == id).map(|e| (e.1.clone(), e.2.clone()))
    }

    fn put(&self, id: String, convo: Vec<ChatMessage>, resp: Value) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == STORED {
            s.pop_front();
        }
        s.push_back((id, convo, resp));
    }

    fn remove(&self, id: &str) -> bool {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let before = s.len();
        s.retain(|e| e.0 != id);
        s.len() < before
    }
}

/// Fields accepted and ignored: nothing here is per user or tier, and prompt caching is
/// automatic.
const IGNORED: &[&str] = &["user", "safety_identifier", "prompt_cache_key", "service_tier"];

#[derive(Deserialize, Debug)]
struct ResponsesRequest {
    model: Option<String>,
    input: Input,
    instructions: Option<String>,
    stream: Option<bool>,
    max_output_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    reasoning: Option<ReasoningConfig>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<TextConfig>,
    previous_response_id: Option<String>,
    store: Option<bool>,
    /// Kept with the response and answered back.
    metadata: Option<Map<String, Value>>,
    /// Every other field: accepted only when listed in [`IGNORED`].
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Map<String, Value>>),
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ReasoningConfig {
    effort: Option<String>,
    /// Reasoning summaries: qwick answers the reasoning itself (`reasoning_text`), not a
    /// summary, and takes only `null`.
    summary: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct TextConfig {
    format: Option<Value>,
}

fn bad(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

fn message(role: &str, content: Option<String>) -> ChatMessage {
    ChatMessage { role: role.into(), content, ..Default::default() }
}

/// The text of a message's content: a string, or `input_text` / `output_text` parts.
fn content_text(c: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match c {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(bad(
                            format!(
                                "{at}[{j}]: only text parts are supported, not {}",
                                kind.unwrap_or("a typeless part")
                            ),
                            format!("{at}[{j}]"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(bad(format!("{at} must be a string or a list of text parts"), at)),
    }
}

/// Input items as template messages, appended to `out`: messages; `function_call` items as the
/// assistant's tool calls (joined to the assistant message before them); `function_call_output`
/// as tool messages; `reasoning` items as the next assistant message's reasoning.
fn push_items(out: &mut Vec<ChatMessage>, items: &[Map<String, Value>]) -> Result<(), ApiError> {
    let mut reasoning: Option<String> = None;
    for (i, it) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let str_of = |k: &str| {
            it.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{at}.{k} must be a string"), format!("{at}.{k}")))
        };
        let kind = it.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = match str_of("role")? {
                    "developer" | "system" => "system",
                    r @ ("user" | "assistant") => r,
                    other => {
                        return Err(bad(
                            format!("{at}.role must be user, assistant, system or developer, not {other:?}"),
                            format!("{at}.role"),
                        ))
                    }
                };
                let mut m = message(role, Some(content_text(it.get("content"), &format!("{at}.content"))?));
                if role == "assistant" {
                    m.reasoning_content = reasoning.take();
                }
                out.push(m);
            }
            "function_call" => {
                let call = json!({"id": str_of("call_id")?, "type": "function",
                                  "function": {"name": str_of("name")?, "arguments": str_of("arguments")?}});
                let call: ToolCall = serde_json::from_value(call).map_err(|e| bad(format!("{at}: {e}"), at.clone()))?;
                match out.last_mut() {
                    Some(m) if m.role == "assistant" && reasoning.is_none() => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(ChatMessage {
                        reasoning_content: reasoning.take(),
                        tool_calls: Some(vec![call]),
                        ..message("assistant", None)
                    }),
                }
            }
            "function_call_output" => {
                let output = content_text(it.get("output"), &format!("{at}.output"))?;
                out.push(ChatMessage {
                    tool_call_id: Some(str_of("call_id")?.to_string()),
                    ..message("tool", Some(output))
                });
            }
            "reasoning" => {
                let parts = it.get("content").and_then(Value::as_array).cloned().unwrap_or_default();
                let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
                reasoning.get_or_insert_with(String::new).push_str(&text);
            }
            other => {
                return Err(bad(format!("{at}: input items of type {other:?} are not supported"), format!("{at}.type")))
            }
        }
    }
    Ok(())
}

/// Function tools in the chat path's form (`{type, function: {...}}`), and `tool_choice`.
fn tools(tools: Option<&[Value]>, choice: Option<&Value>) -> Result<(Option<Vec<Value>>, Option<Value>), ApiError> {
    let mut out = vec![];
    for (i, t) in tools.unwrap_or_default().iter().enumerate() {
        match (t.get("type").and_then(Value::as_str), t.get("name").and_then(Value::as_str)) {
            (Some("function"), Some(name)) => out.push(json!({"type": "function", "function": {
                "name": name,
                "description": t.get("description").cloned().unwrap_or(Value::Null),
                "parameters": t.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            }})),
            (Some("function"), None) => {
                return Err(bad(format!("tools[{i}] needs a name"), format!("tools[{i}].name")))
            }
            (kind, _) => {
                return Err(bad(
                    format!(
                        "tools[{i}]: tools of type {} are not served here (function tools are)",
                        kind.unwrap_or("none")
                    ),
                    format!("tools[{i}].type"),
                ))
            }
        }
    }
    let choice =
        match choice {
            None | Some(Value::Null) => None,
            Some(v @ Value::String(_)) => Some(v.clone()),
            Some(v) => match (v.get("type").and_then(Value::as_str), v.get("name").and_then(Value::as_str)) {
                (Some("function"), Some(name)) => Some(json!({"type": "function", "function": {"name": name}})),
                _ => return Err(bad(
                    "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
                    "tool_choice",
                )),
            },
        };
    Ok(((!out.is_empty()).then_some(out), choice))
}

/// `text.format`: text, any JSON object, or JSON following a schema.
fn output_format(f: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    let param = "text.format";
    let Some(f) = f.filter(|f| !f.is_null()) else { return Ok(None) };
    match (f.get("type").and_then(Value::as_str), f.get("schema")) {
        (Some("text"), _) => Ok(None),
        (Some("json_object"), _) => Ok(Some(OutputFormat::JsonObject)),
        (Some("json_schema"), Some(s @ Value::Object(_))) => Ok(Some(OutputFormat::JsonSchema(s.clone()))),
        (Some("json_schema"), _) => Err(bad("text.format.schema must be a JSON schema object", "text.format.schema")),
        _ => Err(bad("text.format.type must be \"text\", \"json_object\" or \"json_schema\"", param)),
    }
}

/// `POST /v1/responses`.
pub async fn create(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req: ResponsesRequest = parse_json(&body)?;
    gen::check_fields(&req.extra, IGNORED, "")?;
    let adapter = check_model(&state, req.model.as_deref())?;
    // The conversation: the previous response's, then this input.
    let mut convo = match &req.previous_response_id {
        None => vec![],
        Some(id) => state.responses.get(id).map(|c| c.0).ok_or_else(|| {
            bad(format!("previous response {id:?} not found (not stored, or no longer)"), "previous_response_id")
        })?,
    };
    match &req.input {
        Input::Text(s) => convo.push(message("user", Some(s.clone()))),
        Input::Items(items) => push_items(&mut convo, items)?,
    }
    let mut messages = vec![];
    if let Some(i) = &req.instructions {
        messages.push(message("system", Some(i.clone())));
    }
    messages.extend(convo.iter().cloned());
    if convo.is_empty() {
        return Err(bad("input must not be empty", "input"));
    }
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let (defs, choice) = tools(req.tools.as_deref(), req.tool_choice.as_ref())?;
    let mut plan = tools_for(defs, choice.as_ref(), parallel)?;
    let text_format = output_format(req.text.as_ref().and_then(|t| t.format.as_ref()))?;
    let format = match (plan.format.take(), text_format) {
        (Some(_), Some(_)) => {
            return Err(bad("text.format cannot be combined with a tool_choice that forces a call", "text.format"))
        }
        (Some(tool), None) => Some(("tools", tool)),
        (None, f) => f.map(|f| ("text.format", f)),
    };
    let reasoning = req.reasoning.unwrap_or_default();
    if reasoning.summary.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(bad("reasoning.summary: qwick answers the reasoning itself, not a summary", "reasoning.summary"));
    }
    let effort = reasoning.effort.as_deref().map(|e| gen::effort_budget(e, "reasoning.effort")).transpose()?;
    // An effort level with no budget thinks unbounded; level none/minimal does not think; a
    // forced call does not think before it.
    let thinking = match (effort, plan.prefill.is_some()) {
        (_, true) | (Some(Some(0)), _) => Some(false),
        (Some(_), false) => Some(true),
        (None, false) => None,
    };
    let model = state.model.clone();
    let mut prompt = model
        .render(&messages, plan.tools.clone(), thinking, Map::new())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    prefill_prompt(&model, &mut prompt, &plan)?;
    let max_tokens =
        gen::fit_context(state.max_model_len, prompt.ids.len(), req.max_output_tokens, "max_output_tokens")?;
    let fields = SamplingFields { temperature: req.temperature, top_p: req.top_p, ..Default::default() };
    let mut sp = gen::sampling(model.gen_config.sampling_params(prompt.thinking), &fields, model.config.vocab_size)?;
    sp.max_tokens = Some(max_tokens);
    let budget = match effort.flatten().filter(|&n| n > 0 && thinking == Some(true)) {
        Some(n) => Some(
            model
                .budget(n, prompt.starts_in_thinking)
                .ok_or_else(|| bad("reasoning.effort: the tokenizer has no </think> token", "reasoning.effort"))?,
        ),
        None => None,
    };
    let (param, format) = match format {
        Some((p, f)) => (p, Some(f)),
        None => ("", None),
    };
    let constraint = gen::constraints(&state, format.as_ref(), prompt.thinking, 1, param)?.pop().flatten();
    let stops = sp.stop.clone();
    let job = Job { constraint, ..gen::job(&state, prompt.ids.clone(), adapter, sp, budget) };
    let pipe = chat_pipe(&model, &stops, &prompt, &plan, parallel);
    let run = ChoiceRun::new(state.clone(), gen::submit(&state, job)?, pipe, arrival);
    let shell = json!({
        "id": new_id("resp_"),
        "object": "response",
        "created_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "status": "in_progress",
        "error": null,
        "incomplete_details": null,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model.name,
        "output": [],
        "parallel_tool_calls": parallel,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": reasoning.effort, "summary": null},
        "store": req.store != Some(false),
        "temperature": req.temperature,
        "text": {"format": req.text.and_then(|t| t.format).unwrap_or_else(|| json!({"type": "text"}))},
        "tool_choice": req.tool_choice.unwrap_or_else(|| json!("auto")),
        "tools": req.tools.unwrap_or_default(),
        "top_p": req.top_p,
        "metadata": req.metadata.unwrap_or_default(),
        "usage": null,
    });
    let done = Done { state: state.clone(), convo, prompt_tokens: prompt.ids.len() };
    if req.stream == Some(true) {
        return Ok(sse_response(move |tx| stream(shell, done, run, tx)));
    }
    let mut run = run;
    let piece = run.collect().await;
    if let Some(e) = &run.error {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    let mut items = Items::default();
    let d = &piece.delta;
    items.append(true, &d.reasoning);
    items.append(false, &d.content);
    for c in &d.tool_calls {
        items.call(&c.name, &c.arguments);
    }
    Ok(Json(done.finish(shell, items.all(), &run, &piece.in_reasoning)).into_response())
}

/// The output items of a response as they are built (streamed or not).
#[derive(Default)]
struct Items {
    done: Vec<Value>,
    /// The item still being written, if any: a reasoning item or a message.
    open: Option<Open>,
}

/// A reasoning item or a message being written.
struct Open {
    reasoning: bool,
    id: String,
    text: String,
}

impl Open {
    /// The item with `status`, and its text so far (or, without it, no content yet).
    fn item(&self, status: &str, with_text: bool) -> Value {
        let content = match (with_text, self.reasoning) {
            (false, _) => json!([]),
            (true, true) => json!([{"type": "reasoning_text", "text": self.text}]),
            (true, false) => json!([{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}]),
        };
        if self.reasoning {
            json!({"type": "reasoning", "id": self.id, "summary": [], "content": content, "status": status})
        } else {
            json!({"type": "message", "id": self.id, "role": "assistant", "status": status, "content": content})
        }
    }
}

impl Items {
    /// Appends `text` to the open item of its kind (reasoning or answer), closing an item of
    /// the other kind and opening one as needed; returns the item it closed and whether it
    /// opened one.
    fn append(&mut self, reasoning: bool, text: &str) -> (Option<Value>, bool) {
        if text.is_empty() {
            return (None, false);
        }
        let (mut closed, mut opened) = (None, false);
        if self.open.as_ref().is_none_or(|o| o.reasoning != reasoning) {
            closed = self.close();
            let id = new_id(if reasoning { "rs_" } else { "msg_" });
            self.open = Some(Open { reasoning, id, text: String::new() });
            opened = true;
        }
        self.open.as_mut().expect("an open item").text.push_str(text);
        (closed, opened)
    }

    /// Closes the open item; it, completed.
    fn close(&mut self) -> Option<Value> {
        let item = self.open.take()?.item("completed", true);
        self.done.push(item.clone());
        Some(item)
    }

    /// A function call item (after the open item, closed).
    fn call(&mut self, name: &str, arguments: &str) -> Value {
        self.close();
        let item = json!({"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_"), "name": name,
                          "arguments": arguments, "status": "completed"});
        self.done.push(item.clone());
        item
    }

    fn all(mut self) -> Vec<Value> {
        self.close();
        self.done
    }
}

/// What finishing a response needs: where to store it, and its conversation so far.
struct Done {
    state: Arc<AppState>,
    convo: Vec<ChatMessage>,
    prompt_tokens: usize,
}

impl Done {
    /// The finished response object (stored unless `store: false`).
    fn finish(mut self, mut resp: Value, output: Vec<Value>, run: &ChoiceRun, in_reasoning: &[bool]) -> Value {
        let incomplete = run.finish == Some("length");
        resp["status"] = json!(if incomplete { "incomplete" } else { "completed" });
        if incomplete {
            resp["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        let prompt = run.prompt_tokens.max(self.prompt_tokens);
        let reasoning_tokens = in_reasoning.iter().filter(|&&r| r).count();
        resp["usage"] = json!({
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": run.cached_tokens},
            "output_tokens": run.tokens.len(), "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + run.tokens.len(),
        });
        // The output as the assistant's turn of the stored conversation.
        let mut turn = message("assistant", None);
        for item in &output {
            match item["type"].as_str() {
                Some("reasoning") => turn.reasoning_content = item["content"][0]["text"].as_str().map(str::to_string),
                Some("message") => turn.content = item["content"][0]["text"].as_str().map(str::to_string),
                _ => {
                    let call = json!({"id": item["call_id"], "type": "function",
                                      "function": {"name": item["name"], "arguments": item["arguments"]}});
                    if let Ok(c) = serde_json::from_value::<ToolCall>(call) {
                        turn.tool_calls.get_or_insert_with(Vec::new).push(c);
                    }
                }
            }
        }
        // A turn that produced nothing (no item) is stored as an empty answer.
        if turn.content.is_none() && turn.reasoning_content.is_none() && turn.tool_calls.is_none() {
            turn.content = Some(String::new());
        }
        resp["output"] = json!(output);
        if resp["store"] == json!(true) {
            self.convo.push(turn);
            let id = resp["id"].as_str().unwrap_or_default().to_string();
            self.state.responses.put(id, self.convo, resp.clone());
        }
        resp
    }
}

/// The `response.*` event stream: `response.created` and `response.in_progress`; each output
/// item's `output_item.added`, its deltas (`reasoning_text`, `content_part` and `output_text`,
/// `function_call_arguments`) and `output_item.done`; then `response.completed` (or
/// `response.incomplete`). A failed generation ends with an `error` event.
async fn stream(shell: Value, done: Done, mut run: ChoiceRun, tx: Sender<Bytes>) {
    let mut seq = 0u64;
    let mut send = async |mut v: Value| {
        v["sequence_number"] = json!(seq);
        seq += 1;
        let kind = v["type"].as_str().unwrap_or("").to_string();
        tx.send(Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))).await.is_ok()
    };
    for kind in ["response.created", "response.in_progress"] {
        if !send(json!({"type": kind, "response": shell})).await {
            return;
        }
    }
    let mut items = Items::default();
    let mut in_reasoning = vec![];
    while let Some(piece) = run.next_unless_closed(&tx).await {
        if let Some(e) = &run.error {
            let _ =
                send(json!({"type": "error", "message": format!("generation failed: {e}"), "code": "server_error"}))
                    .await;
            return;
        }
        in_reasoning.extend(piece.in_reasoning);
        let d = piece.delta;
        for (text, is_reasoning) in [(&d.reasoning, true), (&d.content, false)] {
            if text.is_empty() {
                continue;
            }
            let (closed, opened) = items.append(is_reasoning, text);
            let mut events = closed.map(|c| close_events(&c, items.done.len() - 1)).unwrap_or_default();
            let index = items.done.len();
            let open = items.open.as_ref().expect("an open item");
            let id = json!(open.id);
            if opened {
                let added = open.item("in_progress", false);
                events.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                if !is_reasoning {
                    events.push(json!({"type": "response.content_part.added", "output_index": index, "item_id": id,
                                       "content_index": 0,
                                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                }
            }
            events.push(if is_reasoning {
                json!({"type": "response.reasoning_text.delta", "output_index": index, "item_id": id, "content_index": 0,
                       "delta": text})
            } else {
                json!({"type": "response.output_text.delta", "output_index": index, "item_id": id, "content_index": 0,
                       "delta": text, "logprobs": []})
            });
            for e in events {
                if !send(e).await {
                    return;
                }
            }
        }
        for c in &d.tool_calls {
            if let Some(closed) = items.close() {
                for e in close_events(&closed, items.done.len() - 1) {
                    if !send(e).await {
                        return;
                    }
                }
            }
            let item = items.call(&c.name, &c.arguments);
            let index = items.done.len() - 1;
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            for e in [
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
                json!({"type": "response.function_call_arguments.delta", "output_index": index, "item_id": item["id"],
                       "delta": c.arguments}),
                json!({"type": "response.function_call_arguments.done", "output_index": index, "item_id": item["id"],
                       "arguments": c.arguments}),
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
            ] {
                if !send(e).await {
                    return;
                }
            }
        }
    }
    // A client that went away gets nothing more (and nothing is stored).
    if tx.is_closed() {
        return;
    }
    if let Some(closed) = items.close() {
        for e in close_events(&closed, items.done.len() - 1) {
            if !send(e).await {
                return;
            }
        }
    }
    let resp = done.finish(shell, items.done, &run, &in_reasoning);
    let kind = if resp["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
    let _ = send(json!({"type": kind, "response": resp})).await;
}

/// The events that close a reasoning item or a message at `index`.
fn close_events(item: &Value, index: usize) -> Vec<Value> {
    let (id, text) = (&item["id"], item["content"][0]["text"].clone());
    let mut out = vec![];
    if item["type"] == "reasoning" {
        out.push(json!({"type": "response.reasoning_text.done", "output_index": index, "item_id": id,
                        "content_index": 0, "text": text}));
    } else {
        out.push(json!({"type": "response.output_text.done", "output_index": index, "item_id": id,
                        "content_index": 0, "text": text, "logprobs": []}));
        out.push(json!({"type": "response.content_part.done", "output_index": index, "item_id": id,
                        "content_index": 0, "part": item["content"][0]}));
    }
    out.push(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
    out
}

/// `GET /v1/responses/{id}`: a stored response.
pub async fn get(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    state
        .responses
        .get(&id)
        .map(|(_, r)| Json(r))
        .ok_or_else(|| ApiError::not_found(format!("no stored response {id:?}")))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if !state.responses.remove(&id) {
        return Err(ApiError::not_found(format!("no stored response {id:?}")));
    }
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})))
}
