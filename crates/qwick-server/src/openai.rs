//! The OpenAI API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, and vLLM's
//! `/tokenize` and `/detokenize`.

use crate::app::{sse_response, AppState};
use crate::error::{parse_json, parse_json_flattened, ApiError};
use crate::gen::{self, ChoiceRun, Job, SamplingFields, MAX_LOGPROBS, MAX_N};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use qwick_chat::{tool_prefill, ChatMessage, ChatModel, Delta, Prompt, TextPipe, ToolCall};
use qwick_engine::OutToken;
use qwick_sampler::TokenLogprobs;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::Sender;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random-looking id (`prefix` + 24 hex digits).
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut r = qwick_sampler::Rng::seed_from_u64((t as u64) ^ n.rotate_left(40));
    format!("{prefix}{:016x}{:08x}", r.next_u64(), r.next_u64() as u32)
}

/// `content`: a string or a list of parts (`{"type": "text", "text": ...}`).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl Content {
    pub fn into_text(self, index: usize) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s),
            Content::Parts(parts) => {
                let mut s = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{index}].content[{j}]: only text parts are supported, not {kind:?}"
                            ))
                            .with_param(format!("messages[{index}].content")))
                        }
                    }
                }
                Ok(s)
            }
        }
    }
}

#[derive(Deserialize, Debug)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Content>,
    pub reasoning_content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// Checks roles and turns API messages into template messages.
pub fn to_chat_messages(msgs: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut out = vec![];
    for (i, m) in msgs.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" | "tool" => m.role.clone(),
            "developer" => "system".into(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role: unknown role {other:?} (expected system, developer, user, assistant or tool)"
                ))
                .with_param(format!("messages[{i}].role")))
            }
        };
        let content = m.content.map(|c| c.into_text(i)).transpose()?;
        let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        let reasoning = m.reasoning_content.or(m.reasoning);
        if role != "assistant" && content.is_none() {
            return Err(ApiError::bad_request(format!("messages[{i}]: a {role} message needs content"))
                .with_param(format!("messages[{i}].content")));
        }
        if role == "assistant" && content.is_none() && !has_calls && reasoning.is_none() {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: an assistant message needs content, reasoning_content or tool_calls"
            ))
            .with_param(format!("messages[{i}].content")));
        }
        if has_calls && role != "assistant" {
            return Err(ApiError::bad_request(format!("messages[{i}]: only assistant messages can have tool_calls"))
                .with_param(format!("messages[{i}].tool_calls")));
        }
        out.push(ChatMessage {
            role,
            content,
            reasoning_content: reasoning,
            tool_calls: m.tool_calls.filter(|c| !c.is_empty()),
            tool_call_id: m.tool_call_id,
            name: m.name,
        });
    }
    Ok(out)
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub max_thinking_tokens: Option<u64>,
    /// Effort levels as thinking budgets (see [`gen::effort_budget`]).
    pub reasoning_effort: Option<String>,
    /// vLLM's: end the prompt with a new assistant turn's header (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's assistant prefill: the last (assistant) message is continued, not closed.
    pub continue_final_message: Option<bool>,
    /// Sampling (OpenAI and vLLM names).
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The output format, in any of the spellings clients use.
    #[serde(flatten)]
    pub format: FormatFields,
    /// Every other field: accepted only when listed in [`CHAT_IGNORED`].
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Chat request fields accepted and ignored (they change nothing here).
pub const CHAT_IGNORED: &[&str] = &["user", "store", "metadata", "service_tier"];

/// Completion request fields accepted and ignored.
pub const COMPLETION_IGNORED: &[&str] = &["user"];

/// Request fields that ask for an output format: OpenAI's `response_format`, and the
/// structured-output spellings of vLLM and llama.cpp.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
pub struct FormatFields {
    pub response_format: Option<Value>,
    /// Structured output in the spellings of other servers (vLLM, llama.cpp): see
    /// [`output_format`].
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<Map<String, Value>>,
    pub json_schema: Option<Value>,
    pub grammar: Option<String>,
}

/// The output format a request asks for, in any of the spellings clients use (with the field
/// that asked): OpenAI's
/// `response_format` (`json_object`, `json_schema`), vLLM's `guided_json|regex|choice|grammar`
/// and `structured_outputs`, llama.cpp's `json_schema` and `grammar` (grammars in GBNF or Lark,
/// [`qwick_chat::OutputFormat::grammar`]). At most one.
pub fn output_format(r: &FormatFields) -> Result<Option<(&'static str, qwick_chat::OutputFormat)>, ApiError> {
    let mut found: Vec<(&'static str, qwick_chat::OutputFormat)> = vec![];
    match &r.response_format {
        None | Some(Value::Null) => {}
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => {}
            // llama-server's form carries a schema beside the type: honoured as one.
            Some("json_object") => match f.get("schema") {
                None | Some(Value::Null) => found.push(("response_format", qwick_chat::OutputFormat::JsonObject)),
                Some(s @ Value::Object(_)) => {
                    found.push(("response_format", qwick_chat::OutputFormat::JsonSchema(s.clone())))
                }
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "response_format.schema must be a JSON schema object, not {other}"
                    ))
                    .with_param("response_format.schema"))
                }
            },
            Some("json_schema") => {
                let schema = f.get("json_schema").and_then(|j| j.get("schema")).cloned().ok_or_else(|| {
                    ApiError::bad_request("response_format.json_schema.schema is required")
                        .with_param("response_format")
                })?;
                found.push(("response_format", qwick_chat::OutputFormat::JsonSchema(schema)));
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "response_format.type must be \"text\", \"json_object\" or \"json_schema\", not {}",
                    f.get("type").unwrap_or(&Value::Null)
                ))
                .with_param("response_format"))
            }
        },
    }
    let schema = |v: &Value, param: &'static str| -> Result<qwick_chat::OutputFormat, ApiError> {
        match v {
            Value::String(s) => serde_json::from_str(s)
                .map(qwick_chat::OutputFormat::JsonSchema)
                .map_err(|e| ApiError::bad_request(format!("{param}: not a JSON schema: {e}")).with_param(param)),
            Value::Object(_) => Ok(qwick_chat::OutputFormat::JsonSchema(v.clone())),
            _ => Err(ApiError::bad_request(format!("{param} must be a JSON schema")).with_param(param)),
        }
    };
    if let Some(v) = &r.guided_json {
        found.push(("guided_json", schema(v, "guided_json")?));
    }
    if let Some(v) = &r.json_schema {
        found.push(("json_schema", schema(v, "json_schema")?));
    }
    if let Some(v) = &r.guided_regex {
        found.push(("guided_regex", qwick_chat::OutputFormat::Regex(v.clone())));
    }
    if let Some(v) = &r.guided_choice {
        found.push(("guided_choice", qwick_chat::OutputFormat::Choice(v.clone())));
    }
    let grammar = |g: &str, param: &'static str| {
        qwick_chat::OutputFormat::grammar(g)
            .map_err(|e| ApiError::bad_request(format!("{param}: {e}")).with_param(param))
    };
    for (param, g) in [("guided_grammar", &r.guided_grammar), ("grammar", &r.grammar)] {
        if let Some(g) = g {
            found.push((param, grammar(g, param)?));
        }
    }
    if let Some(so) = &r.structured_outputs {
        for (k, v) in so {
            let f = match (k.as_str(), v) {
                ("json", v) => schema(v, "structured_outputs.json")?,
                ("regex", Value::String(s)) => qwick_chat::OutputFormat::Regex(s.clone()),
                ("grammar", Value::String(s)) => grammar(s, "structured_outputs.grammar")?,
                ("choice", Value::Array(a)) => qwick_chat::OutputFormat::Choice(
                    a.iter().map(|c| c.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                        ApiError::bad_request("structured_outputs.choice must be a list of strings")
                            .with_param("structured_outputs.choice")
                    })?,
                ),
                _ => {
                    return Err(ApiError::bad_request(format!("unsupported field structured_outputs.{k}"))
                        .with_param(format!("structured_outputs.{k}")))
                }
            };
            found.push(("structured_outputs", f));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "give one output format, not {}",
            found.iter().map(|f| f.0).collect::<Vec<_>>().join(" and ")
        )));
    }
    Ok(found.pop())
}

/// Checks `model` against the served model and its LoRA adapters (absent means the served
/// model); returns the adapter it names (0: the base model).
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<u16, ApiError> {
    match model {
        Some(m) if !m.is_empty() => state.model.adapter_for(m).ok_or_else(|| ApiError::model_not_found(m)),
        _ => Ok(0),
    }
}

/// What `tools` and `tool_choice` make of a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    /// The tools to render (None: no tools).
    pub tools: Option<Vec<Value>>,
    /// Parse tool calls out of the answer.
    pub parse: bool,
    /// Text that starts the assistant's answer (appended to the prompt, after the generation
    /// prompt, and fed to the tool-call parser before the output): `"required"` and a named
    /// function force a call this way.
    pub prefill: Option<String>,
    /// With a prefill: the rest of the call, its arguments valid against the tool's schema.
    pub format: Option<qwick_chat::OutputFormat>,
}

/// Appends the start of a forced call (the plan's prefill) to the prompt: the answer begins
/// there, not in thinking.
pub fn prefill_prompt(model: &ChatModel, prompt: &mut Prompt, plan: &ToolPlan) -> Result<(), ApiError> {
    if let Some(pre) = &plan.prefill {
        prompt.text.push_str(pre);
        prompt.ids.extend(model.tokenizer.encode(pre, false).map_err(|e| ApiError::internal(e.to_string()))?);
        prompt.starts_in_thinking = false;
    }
    Ok(())
}

/// The text pipe of one answer to `prompt` under `plan`: reasoning split off, tool calls parsed
/// where the plan asks (a forced call's prefill fed in first), the answer ending at its first
/// call unless calls may come several at once.
pub fn chat_pipe(model: &ChatModel, stops: &[String], prompt: &Prompt, plan: &ToolPlan, parallel: bool) -> TextPipe {
    let mut pipe = TextPipe::new(&model.tokenizer, stops, Some(prompt.starts_in_thinking), plan.parse);
    if let Some(pre) = &plan.prefill {
        pipe.prefill(pre);
    }
    if !parallel {
        pipe.one_tool_call();
    }
    pipe
}

const TOOL_CHOICE_FORMS: &str =
    "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}";

/// Checks tool definitions and applies `tool_choice`: `"none"` renders no tools and parses no
/// calls; `"auto"` (the default) renders them and parses calls; `"required"` and a named function
/// (only that one rendered) also start the answer with a tool call (see [`ToolPlan::prefill`]).
pub fn tools_for(tools: Option<Vec<Value>>, choice: Option<&Value>, parallel: bool) -> Result<ToolPlan, ApiError> {
    let none = ToolPlan { tools: None, parse: false, prefill: None, format: None };
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        return match choice {
            Some(Value::String(s)) if s == "none" || s == "auto" => Ok(none),
            None | Some(Value::Null) => Ok(none),
            Some(_) => Err(ApiError::bad_request("tool_choice needs tools").with_param("tool_choice")),
        };
    };
    for (i, t) in tools.iter().enumerate() {
        let ok = t.get("type").and_then(Value::as_str).is_none_or(|k| k == "function")
            && t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).is_some_and(|n| !n.is_empty());
        if !ok {
            return Err(ApiError::bad_request(format!(
                "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}"
            ))
            .with_param(format!("tools[{i}]")));
        }
    }
    let name_of = |t: &Value| t["function"]["name"].as_str().unwrap_or("").to_string();
    match choice {
        None | Some(Value::Null) => Ok(ToolPlan { tools: Some(tools), parse: true, prefill: None, format: None }),
        Some(Value::String(s)) if s == "auto" => {
            Ok(ToolPlan { tools: Some(tools), parse: true, prefill: None, format: None })
        }
        Some(Value::String(s)) if s == "required" => {
            let format = Some(qwick_chat::OutputFormat::tool_call(&tools, None, parallel));
            Ok(ToolPlan { tools: Some(tools), parse: true, prefill: Some(tool_prefill(None)), format })
        }
        Some(Value::String(s)) if s == "none" => Ok(none),
        Some(v @ Value::Object(_)) => {
            let kind_ok = v.get("type").and_then(Value::as_str).is_none_or(|k| k == "function");
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| kind_ok)
                .ok_or_else(|| ApiError::bad_request(TOOL_CHOICE_FORMS).with_param("tool_choice"))?;
            let chosen: Vec<Value> = tools.into_iter().filter(|t| name_of(t) == name).collect();
            if chosen.is_empty() {
                return Err(ApiError::bad_request(format!("tool_choice names {name:?}, which is not among the tools"))
                    .with_param("tool_choice"));
            }
            let format = Some(qwick_chat::OutputFormat::tool_call(&chosen, Some(name), false));
            Ok(ToolPlan { tools: Some(chosen), parse: true, prefill: Some(tool_prefill(Some(name))), format })
        }
        Some(_) => Err(ApiError::bad_request(TOOL_CHOICE_FORMS).with_param("tool_choice")),
    }
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// OpenAI chat logprobs of a piece of output: the answer's tokens in `content` and, where
/// there are any, the reasoning's in `reasoning_content` beside it (the same shape); `None`
/// where no token has logprobs.
fn chat_logprobs(state: &AppState, piece: &gen::Piece) -> Option<Value> {
    if piece.tokens.iter().all(|t| t.logprobs.is_none()) {
        return None;
    }
    // The tokens of one part (reasoning or answer).
    let part = |reasoning: bool| {
        let toks = piece.tokens.iter().zip(&piece.in_reasoning).filter(move |(_, &r)| r == reasoning);
        logprob_entries(state, toks.map(|(t, _)| t))
    };
    let mut v = json!({"content": part(false)});
    let reasoning = part(true);
    if !reasoning.is_empty() {
        v["reasoning_content"] = json!(reasoning);
    }
    Some(v)
}

/// OpenAI chat logprobs entries for tokens.
fn logprob_entries<'a>(state: &AppState, toks: impl Iterator<Item = &'a OutToken>) -> Vec<Value> {
    toks.filter_map(|t| {
        let lp = t.logprobs.as_ref()?;
        let text = state.model.token_text(t.token.id);
        let top: Vec<Value> = lp
            .top
            .iter()
            .map(|&(id, l)| {
                let s = state.model.token_text(id);
                json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
            })
            .collect();
        Some(json!({"token": text, "logprob": lp.logprob, "bytes": text.as_bytes(), "top_logprobs": top}))
    })
    .collect()
}

fn tool_calls_json(calls: &[qwick_chat::ParsedToolCall], first_index: usize, stream: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut v = json!({
                "id": new_id("call_"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if stream {
                v["index"] = json!(first_index + k);
            }
            v
        })
        .collect()
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let mut req: ChatRequest = parse_json_flattened::<_, SamplingFields>(&body)?;
    gen::check_fields(&req.extra, CHAT_IGNORED, "")?;
    let format = output_format(&req.format)?;
    apply_reasoning_effort(&mut req)?;
    let adapter = check_model(&state, req.model.as_deref())?;
    let n = choice_count(req.n)?;
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > MAX_LOGPROBS {
        return Err(ApiError::bad_request(format!("top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}"))
            .with_param("top_logprobs"));
    }
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::bad_request("top_logprobs needs logprobs: true").with_param("top_logprobs"));
    }
    let logprobs = (req.logprobs == Some(true)).then_some(top_logprobs as usize);
    let messages = to_chat_messages(req.messages)?;
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let mut plan = tools_for(req.tools, req.tool_choice.as_ref(), parallel)?;
    // A forced call is the answer: its arguments follow the tool's schema, and an output format
    // for a text answer cannot apply as well.
    let format = match (plan.format.take(), format) {
        (Some(_), Some((param, _))) => {
            return Err(ApiError::bad_request(format!(
                "{param} cannot be combined with a tool_choice that forces a call (the answer is the call)"
            ))
            .with_param(param))
        }
        (Some(tool), None) => Some(("tools", tool)),
        (None, f) => f,
    };
    let mut kwargs = req.chat_template_kwargs.unwrap_or_default();
    let thinking = thinking_switch(&mut kwargs, req.max_thinking_tokens, plan.prefill.is_some())?;
    let end = turn_end(req.add_generation_prompt, req.continue_final_message, &messages, plan.prefill.is_some())?;
    let model = state.model.clone();
    let mut prompt = model
        .render_as(&messages, plan.tools.clone(), thinking, kwargs, end)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    prefill_prompt(&model, &mut prompt, &plan)?;
    let max_param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = fit_limit(&state, prompt.ids.len(), req.max_completion_tokens.or(req.max_tokens), max_param)?;
    let mut sp =
        gen::sampling(model.gen_config.sampling_params(prompt.thinking), &req.sampling, model.config.vocab_size)?;
    sp.max_tokens = Some(max_tokens);
    let budget = match req.max_thinking_tokens {
        Some(t) if t > 0 && plan.prefill.is_none() => {
            Some(model.budget(t as usize, prompt.starts_in_thinking).ok_or_else(|| {
                ApiError::bad_request("max_thinking_tokens: the tokenizer has no </think> token")
                    .with_param("max_thinking_tokens")
            })?)
        }
        _ => None,
    };
    let stops = sp.stop.clone();
    let mut constraints = gen::constraints(
        &state,
        format.as_ref().map(|f| &f.1),
        prompt.thinking,
        n as usize,
        format.as_ref().map_or("", |f| f.0),
    )?
    .into_iter();
    let jobs: Vec<Job> = (0..n)
        .map(|i| Job {
            logprobs,
            constraint: constraints.next().flatten(),
            ..gen::job(&state, prompt.ids.clone(), adapter, seeded(&sp, i), budget.clone())
        })
        .collect();
    let rxs = gen::submit_all(&state, jobs)?;
    let runs: Vec<ChoiceRun> = rxs
        .into_iter()
        .map(|rx| ChoiceRun::new(state.clone(), rx, chat_pipe(&model, &stops, &prompt, &plan, parallel), arrival))
        .collect();
    let id = new_id("chatcmpl-");
    let created = unix_now();
    if req.stream == Some(true) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let st = state.clone();
        return Ok(sse_response(move |tx| chat_stream(st, runs, id, created, include_usage, logprobs.is_some(), tx)));
    }
    let results = run_to_end(runs).await?;
    let mut choices = vec![];
    let (mut completion, mut prompt_tokens, mut cached) = (0, prompt.ids.len(), 0);
    for (i, (r, piece)) in results.iter().enumerate() {
        completion += r.tokens.len();
        if i == 0 {
            prompt_tokens = r.prompt_tokens.max(prompt.ids.len());
            cached = r.cached_tokens;
        }
        let msg = assistant_message(&piece.delta, prompt.thinking);
        let lp = match logprobs {
            Some(_) => chat_logprobs(&state, piece).unwrap_or_else(|| json!({"content": []})),
            None => Value::Null,
        };
        choices.push(json!({"index": i, "message": msg, "logprobs": lp, "finish_reason": r.finish}));
    }
    Ok(completion_response(&state, "chat.completion", id, created, choices, usage(prompt_tokens, completion, cached)))
}

/// The answer to a request that is not streamed.
fn completion_response(
    state: &AppState,
    object: &str,
    id: String,
    created: u64,
    choices: Vec<Value>,
    usage: Value,
) -> Response {
    Json(json!({
        "id": id,
        "object": object,
        "created": created,
        "model": state.model.name,
        "choices": choices,
        "usage": usage,
    }))
    .into_response()
}

/// A reasoning effort level as a thinking budget (an explicit `max_thinking_tokens` wins over
/// it), or as thinking switched on where the level sets no budget.
fn apply_reasoning_effort(req: &mut ChatRequest) -> Result<(), ApiError> {
    if let Some(level) = req.reasoning_effort.take() {
        match (gen::effort_budget(&level, "reasoning_effort")?, req.max_thinking_tokens) {
            (_, Some(_)) => {}
            (Some(n), None) => req.max_thinking_tokens = Some(n as u64),
            (None, None) => {
                let kw = req.chat_template_kwargs.get_or_insert_with(Map::new);
                kw.entry("enable_thinking").or_insert(Value::Bool(true));
            }
        }
    }
    Ok(())
}

/// How the prompt ends: vLLM's `add_generation_prompt` (default true) and
/// `continue_final_message` (the last message, an assistant's, continued), not both, and not
/// with a forced tool call (which starts a new answer).
fn turn_end(
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    messages: &[ChatMessage],
    forced_call: bool,
) -> Result<qwick_chat::TurnEnd, ApiError> {
    use qwick_chat::TurnEnd;
    let param = "continue_final_message";
    match (add_generation_prompt, continue_final_message == Some(true)) {
        (Some(true), true) => Err(ApiError::bad_request(
            "continue_final_message continues the last message; it cannot be combined with add_generation_prompt: true",
        )
        .with_param(param)),
        (_, true) if forced_call => Err(ApiError::bad_request(
            "continue_final_message cannot be combined with a tool_choice that forces a call",
        )
        .with_param(param)),
        (_, true) if messages.last().is_none_or(|m| m.role != "assistant") => Err(ApiError::bad_request(
            "continue_final_message needs the last message to be the assistant's (the text to continue)",
        )
        .with_param(param)),
        (_, true) => Ok(TurnEnd::Continue),
        (Some(false), false) => Ok(TurnEnd::Closed),
        (_, false) => Ok(TurnEnd::NewTurn),
    }
}

/// The number of choices a request asks for (`n`, default 1).
fn choice_count(n: Option<u64>) -> Result<u64, ApiError> {
    let n = n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad_request(format!("n must be in [1, {MAX_N}], got {n}")).with_param("n"));
    }
    Ok(n)
}

/// Thinking on, off or as the template decides (`None`), from `enable_thinking` in the
/// template arguments (removed from them), a zero thinking budget, and a forced tool call
/// (which starts the answer: no thinking before it).
fn thinking_switch(
    kwargs: &mut Map<String, Value>,
    max_thinking_tokens: Option<u64>,
    forced_call: bool,
) -> Result<Option<bool>, ApiError> {
    let thinking = match kwargs.remove("enable_thinking") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => {
            return Err(ApiError::bad_request("chat_template_kwargs.enable_thinking must be true or false")
                .with_param("chat_template_kwargs.enable_thinking"))
        }
    };
    Ok(if max_thinking_tokens == Some(0) || forced_call { Some(false) } else { thinking })
}

/// The sampling of choice `i`: its own seed (the request's plus `i`) where one is given.
fn seeded(sp: &qwick_engine::SamplingParams, i: u64) -> qwick_engine::SamplingParams {
    let mut s = sp.clone();
    s.seed = sp.seed.map(|x| x.wrapping_add(i));
    s
}

/// Every choice run to its end (a request that is not streamed): its text and tokens, or the
/// first choice's generation error.
async fn run_to_end(runs: Vec<ChoiceRun>) -> Result<Vec<(ChoiceRun, gen::Piece)>, ApiError> {
    let results = futures_util::future::join_all(runs.into_iter().map(|mut r| async move {
        let piece = r.collect().await;
        (r, piece)
    }))
    .await;
    if let Some(e) = results.iter().find_map(|(r, _)| r.error.as_ref()) {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    Ok(results)
}

/// The assistant message of a finished chat choice: its content, tool calls and reasoning.
fn assistant_message(d: &Delta, thinking: bool) -> Value {
    let mut msg = json!({"role": "assistant", "content": d.content});
    if !d.tool_calls.is_empty() {
        msg["tool_calls"] = json!(tool_calls_json(&d.tool_calls, 0, false));
        if d.content.is_empty() {
            msg["content"] = Value::Null;
        }
    }
    if thinking || !d.reasoning.is_empty() {
        msg["reasoning_content"] = json!(d.reasoning);
        msg["reasoning"] = json!(d.reasoning);
    }
    msg
}

fn fit_limit(state: &AppState, prompt_len: usize, max_tokens: Option<u64>, param: &str) -> Result<usize, ApiError> {
    gen::fit_context(state.max_model_len, prompt_len, max_tokens, param)
}

async fn send_sse(tx: &Sender<Bytes>, v: &Value) -> bool {
    tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_ok()
}

/// The end of an event stream: `[DONE]`.
async fn send_done(tx: &Sender<Bytes>) {
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

/// Ends an event stream after a choice's generation failed: the error, then `[DONE]`.
async fn fail_stream(tx: &Sender<Bytes>, e: &str) {
    let err = ApiError::internal(format!("generation failed: {e}")).body();
    let _ = send_sse(tx, &err).await;
    send_done(tx).await;
}

/// Ends an event stream whose choices all finished: the usage chunk (`chunk` with `usage`
/// added), where one was asked for, then `[DONE]`.
async fn end_stream(tx: &Sender<Bytes>, chunk: Option<Value>, usage: Value) {
    if let Some(mut c) = chunk {
        c["usage"] = usage;
        if !send_sse(tx, &c).await {
            return;
        }
    }
    send_done(tx).await;
}

/// A piece of choice `.0`'s output, with the choice's summary once it is done.
type ChoicePiece = (usize, gen::Piece, Option<Summary>);

/// The pieces of every choice as they come, interleaved.
fn interleaved(runs: Vec<ChoiceRun>) -> impl stream::Stream<Item = ChoicePiece> + Unpin {
    stream::select_all(runs.into_iter().enumerate().map(|(i, run)| {
        Box::pin(stream::unfold(Some(run), move |run| async move {
            let mut run = run?;
            let piece = run.next().await;
            piece.map(|p| ((i, p, run.is_done().then(|| summary(&run))), Some(run)))
        }))
    }))
}

/// The next piece of `all`; `None` when all choices are done or the client has gone away.
async fn next_or_closed(
    all: &mut (impl stream::Stream<Item = ChoicePiece> + Unpin),
    tx: &Sender<Bytes>,
) -> Option<ChoicePiece> {
    tokio::select! {
        item = all.next() => item,
        _ = tx.closed() => None,
    }
}

/// Streams choices as they come, interleaved.
async fn chat_stream(
    state: Arc<AppState>,
    runs: Vec<ChoiceRun>,
    id: String,
    created: u64,
    include_usage: bool,
    want_logprobs: bool,
    tx: Sender<Bytes>,
) {
    let model = state.model.name.clone();
    let chunk = |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
    let n = runs.len();
    for i in 0..n {
        let c = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        if !send_sse(&tx, &chunk(c)).await {
            return;
        }
    }
    let mut tool_index = vec![0usize; n];
    let mut totals = (0usize, 0usize, 0usize); // prompt, completion, cached
    let mut all = interleaved(runs);
    while let Some((i, piece, finished)) = next_or_closed(&mut all, &tx).await {
        let mut delta = Map::new();
        add_delta(&mut delta, &piece.delta, &mut tool_index[i]);
        let lp = if want_logprobs { chat_logprobs(&state, &piece) } else { None }.unwrap_or(Value::Null);
        if let Some(e) = finished.as_ref().and_then(|s| s.error.as_ref()) {
            return fail_stream(&tx, e).await;
        }
        if !delta.is_empty() || !lp.is_null() {
            let c = json!([{"index": i, "delta": Value::Object(delta), "logprobs": lp, "finish_reason": null}]);
            if !send_sse(&tx, &chunk(c)).await {
                return;
            }
        }
        if let Some(s) = finished {
            totals.0 = totals.0.max(s.prompt_tokens);
            totals.1 += s.completion_tokens;
            totals.2 = totals.2.max(s.cached_tokens);
            let c = json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": s.finish}]);
            if !send_sse(&tx, &chunk(c)).await {
                return;
            }
        }
    }
    end_stream(&tx, include_usage.then(|| chunk(json!([]))), usage(totals.0, totals.1, totals.2)).await;
}

pub struct Summary {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub finish: Option<&'static str>,
    pub error: Option<String>,
}

pub fn summary(r: &ChoiceRun) -> Summary {
    Summary {
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.tokens.len(),
        cached_tokens: r.cached_tokens,
        finish: r.finish,
        error: r.error.clone(),
    }
}

fn add_delta(delta: &mut Map<String, Value>, d: &Delta, tool_index: &mut usize) {
    if !d.reasoning.is_empty() {
        delta.insert("reasoning_content".into(), json!(d.reasoning));
        delta.insert("reasoning".into(), json!(d.reasoning));
    }
    if !d.content.is_empty() {
        delta.insert("content".into(), json!(d.content));
    }
    if !d.tool_calls.is_empty() {
        delta.insert("tool_calls".into(), json!(tool_calls_json(&d.tool_calls, *tool_index, true)));
        *tool_index += d.tool_calls.len();
    }
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub n: Option<u64>,
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    /// Generate past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: Option<bool>,
    /// Sampling (OpenAI and vLLM names).
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The output format, in any of the spellings clients use.
    #[serde(flatten)]
    pub format: FormatFields,
    /// Every other field: accepted only when listed in [`COMPLETION_IGNORED`].
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Default `max_tokens` of `/v1/completions`, as in OpenAI's API.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

/// Logprob arrays of `/v1/completions` (`tokens`, `token_logprobs`, `top_logprobs`,
/// `text_offset`), filled token by token.
struct LogprobArrays<'a> {
    state: &'a AppState,
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top: Vec<Value>,
    offsets: Vec<usize>,
    /// The text offset of the next token.
    off: usize,
}

impl<'a> LogprobArrays<'a> {
    fn new(state: &'a AppState, off: usize) -> Self {
        LogprobArrays { state, tokens: vec![], token_logprobs: vec![], top: vec![], offsets: vec![], off }
    }

    /// Token `id`, with its logprob and alternatives (null where it has none).
    fn push(&mut self, id: u32, lp: Option<&TokenLogprobs>) {
        let s = self.state.model.token_text(id);
        self.offsets.push(self.off);
        self.off += s.len();
        self.tokens.push(json!(s));
        match lp {
            Some(lp) => {
                self.token_logprobs.push(json!(lp.logprob));
                let mut m = Map::new();
                for &(id, l) in &lp.top {
                    m.insert(self.state.model.token_text(id), json!(l));
                }
                self.top.push(Value::Object(m));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top.push(Value::Null);
            }
        }
    }

    fn into_json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top, "text_offset": self.offsets})
    }
}

/// Logprobs of an echoed prompt, in the arrays of [`completion_logprobs`] (offsets from 0): the
/// first token's logprob and alternatives are null.
fn prompt_logprobs(state: &AppState, prompt: &[u32], lps: &[Option<TokenLogprobs>]) -> Value {
    let mut a = LogprobArrays::new(state, 0);
    for (i, &id) in prompt.iter().enumerate() {
        a.push(id, lps.get(i).and_then(Option::as_ref));
    }
    a.into_json()
}

/// `a`'s logprob arrays followed by `b`'s.
fn concat_logprobs(mut a: Value, b: Value) -> Value {
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(x), Some(y)) = (a[k].as_array_mut(), b[k].as_array()) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

fn completion_logprobs(state: &AppState, toks: &[OutToken], offset0: usize) -> Value {
    let mut a = LogprobArrays::new(state, offset0);
    for t in toks {
        if let Some(lp) = &t.logprobs {
            a.push(t.token.id, Some(lp));
        }
    }
    a.into_json()
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let req: CompletionRequest = parse_json_flattened::<_, SamplingFields>(&body)?;
    gen::check_fields(&req.extra, COMPLETION_IGNORED, "")?;
    let format = output_format(&req.format)?;
    let adapter = check_model(&state, req.model.as_deref())?;
    let echo = req.echo == Some(true);
    let n = choice_count(req.n)?;
    if let Some(l) = req.logprobs.filter(|&l| l > MAX_LOGPROBS) {
        return Err(
            ApiError::bad_request(format!("logprobs must be in [0, {MAX_LOGPROBS}], got {l}")).with_param("logprobs")
        );
    }
    let logprobs = req.logprobs.map(|l| l as usize);
    // With echo, logprobs cover the prompt too (the first token's are null), as in OpenAI's API.
    let prompt_lps = if echo { logprobs } else { None };
    let model = state.model.clone();
    let (texts, prompts) = completion_prompts(&model, req.prompt)?;
    // With echo, each choice's text starts with its prompt's (token ids are detokenized).
    let echoes: Vec<String> = match (echo, texts) {
        (false, _) => vec![],
        (true, Some(t)) => t,
        (true, None) => prompts
            .iter()
            .map(|p| model.tokenizer.decode(p, false).map_err(|e| ApiError::bad_request(e.to_string())))
            .collect::<Result<_, _>>()?,
    };
    let base = gen::sampling(model.gen_config.sampling_params(false), &req.sampling, model.config.vocab_size)?;
    let max_tokens = req.max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS);
    let mut jobs = vec![];
    let mut constraints = gen::constraints(
        &state,
        format.as_ref().map(|f| &f.1),
        false,
        prompts.len() * n as usize,
        format.as_ref().map_or("", |f| f.0),
    )?
    .into_iter();
    for p in &prompts {
        let limit = fit_limit(&state, p.len(), Some(max_tokens), "max_tokens")?;
        for i in 0..n {
            let mut s = seeded(&base, i);
            s.max_tokens = Some(limit);
            jobs.push(Job {
                logprobs,
                prompt_logprobs: prompt_lps,
                constraint: constraints.next().flatten(),
                ..gen::job(&state, p.clone(), adapter, s, None)
            });
        }
    }
    if req.ignore_eos == Some(true) {
        for j in &mut jobs {
            j.params.eos_token_ids.clear();
        }
    }
    let stops = base.stop.clone();
    let rxs = gen::submit_all(&state, jobs)?;
    let runs: Vec<ChoiceRun> = rxs
        .into_iter()
        .map(|rx| ChoiceRun::new(state.clone(), rx, TextPipe::new(&model.tokenizer, &stops, None, false), arrival))
        .collect();
    let id = new_id("cmpl-");
    let created = unix_now();
    let prompt_total: usize = prompts.iter().map(|p| p.len()).sum::<usize>() * n as usize;
    if req.stream == Some(true) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let st = state.clone();
        let echoes: Vec<(String, Vec<u32>)> = (0..runs.len())
            .filter_map(|i| Some((echoes.get(i / n as usize)?.clone(), prompts[i / n as usize].clone())))
            .collect();
        return Ok(sse_response(move |tx| {
            completion_stream(st, runs, id, created, include_usage, logprobs.is_some(), prompt_total, echoes, tx)
        }));
    }
    let results = run_to_end(runs).await?;
    let mut choices = vec![];
    let (mut completion, mut cached) = (0, 0);
    for (i, (r, piece)) in results.iter().enumerate() {
        let (d, toks) = (&piece.delta, &piece.tokens);
        completion += r.tokens.len();
        cached += r.cached_tokens;
        let echoed = echoes.get(i / n as usize);
        let lp = match (logprobs, echoed, &r.prompt_logprobs) {
            (None, _, _) => Value::Null,
            (Some(_), Some(e), Some(plps)) => concat_logprobs(
                prompt_logprobs(&state, &prompts[i / n as usize], plps),
                completion_logprobs(&state, toks, e.len()),
            ),
            (Some(_), Some(e), None) => completion_logprobs(&state, toks, e.len()),
            (Some(_), None, _) => completion_logprobs(&state, toks, 0),
        };
        let text = match echoed {
            Some(e) => format!("{e}{}", d.content),
            None => d.content.clone(),
        };
        choices.push(json!({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish}));
    }
    Ok(completion_response(&state, "text_completion", id, created, choices, usage(prompt_total, completion, cached)))
}

/// A completion request's prompts: as texts where they were given as text, and as token ids.
type Prompts = (Option<Vec<String>>, Vec<Vec<u32>>);

/// A completion request's prompts as token ids, and as texts where they were given as text.
fn completion_prompts(model: &qwick_chat::ChatModel, prompt: PromptInput) -> Result<Prompts, ApiError> {
    let vocab = model.config.vocab_size as u32;
    let texts: Option<Vec<String>> = match &prompt {
        PromptInput::Text(s) => Some(vec![s.clone()]),
        PromptInput::Texts(v) => Some(v.clone()),
        _ => None,
    };
    let prompts: Vec<Vec<u32>> = match prompt {
        PromptInput::Text(_) | PromptInput::Texts(_) => texts
            .iter()
            .flatten()
            .map(|s| model.tokenizer.encode(s, false).map_err(|e| ApiError::bad_request(e.to_string())))
            .collect::<Result<_, _>>()?,
        PromptInput::Ids(ids) => vec![ids],
        PromptInput::IdLists(l) => l,
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty").with_param("prompt"));
    }
    for p in &prompts {
        if let Some(&bad) = p.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::bad_request(format!("prompt: token id {bad} is outside the vocabulary of {vocab}"))
                .with_param("prompt"));
        }
    }
    Ok((texts, prompts))
}

#[allow(clippy::too_many_arguments)]
async fn completion_stream(
    state: Arc<AppState>,
    runs: Vec<ChoiceRun>,
    id: String,
    created: u64,
    include_usage: bool,
    want_logprobs: bool,
    prompt_total: usize,
    echoes: Vec<(String, Vec<u32>)>,
    tx: Sender<Bytes>,
) {
    let model = state.model.name.clone();
    let chunk = |choices: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
    let n = runs.len();
    let mut offsets = vec![0usize; n];
    // With echo, each choice's prompt text comes first; with logprobs too, once its prompt
    // logprobs arrive (before its first output).
    for (i, (e, _)) in echoes.iter().enumerate() {
        offsets[i] = e.len();
        if want_logprobs {
            continue;
        }
        let c = json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}]);
        if !send_sse(&tx, &chunk(c)).await {
            return;
        }
    }
    let mut totals = (0usize, 0usize);
    let mut all = interleaved(runs);
    while let Some((i, piece, finished)) = next_or_closed(&mut all, &tx).await {
        if let (Some(plps), Some((e, prompt))) = (&piece.prompt_logprobs, echoes.get(i)) {
            let lp = prompt_logprobs(&state, prompt, plps);
            let c = json!([{"index": i, "text": e, "logprobs": lp, "finish_reason": null}]);
            if !send_sse(&tx, &chunk(c)).await {
                return;
            }
        }
        if let Some(e) = finished.as_ref().and_then(|s| s.error.as_ref()) {
            return fail_stream(&tx, e).await;
        }
        let lp = if want_logprobs { completion_logprobs(&state, &piece.tokens, offsets[i]) } else { Value::Null };
        offsets[i] += piece.delta.content.len();
        let finish = finished.as_ref().and_then(|s| s.finish);
        if !piece.delta.content.is_empty() || finish.is_some() {
            let c = json!([{"index": i, "text": piece.delta.content, "logprobs": lp, "finish_reason": finish}]);
            if !send_sse(&tx, &chunk(c)).await {
                return;
            }
        }
        if let Some(s) = finished {
            totals.0 += s.completion_tokens;
            totals.1 += s.cached_tokens;
        }
    }
    end_stream(&tx, include_usage.then(|| chunk(json!([]))), usage(prompt_total, totals.0, totals.1)).await;
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.model.name,
        "object": "model",
        "created": state.model.created,
        "owned_by": "qwick",
        "root": state.model.name,
        "max_model_len": state.max_model_len,
    })
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut data = vec![model_card(&state)];
    data.extend(state.model.adapters.iter().map(|a| adapter_card(&state, a)));
    Json(json!({"object": "list", "data": data}))
}

/// The card of a LoRA adapter served beside the model (`parent`: the base model, as vLLM lists
/// them).
fn adapter_card(state: &AppState, name: &str) -> Value {
    let mut card = model_card(state);
    card["id"] = json!(name);
    card["root"] = json!(name);
    card["parent"] = json!(state.model.name);
    card
}

pub async fn model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    match state.model.adapter_for(&name) {
        None => Err(ApiError::model_not_found(&name)),
        Some(0) => Ok(Json(model_card(&state))),
        Some(i) => Ok(Json(adapter_card(&state, &state.model.adapters[i as usize - 1]))),
    }
}

/// `/tokenize` in vLLM's form (`prompt`, or `messages` with `add_generation_prompt` /
/// `continue_final_message`; `add_special_tokens`) or llama-server's
/// (`content`, `add_special`, `with_pieces`).
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<InMessage>>,
    add_special_tokens: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    tools: Option<Vec<Value>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    content: Option<String>,
    add_special: Option<bool>,
    with_pieces: Option<bool>,
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_json(&body)?;
    check_model(&state, req.model.as_deref())?;
    let encode = |text: &str, special: Option<bool>| {
        state.model.tokenizer.encode(text, special.unwrap_or(false)).map_err(|e| ApiError::bad_request(e.to_string()))
    };
    if let Some(content) = &req.content {
        // llama-server's form, answered in its shape: ids, or ids with their text.
        if req.prompt.is_some() || req.messages.is_some() {
            return Err(ApiError::bad_request("give one of content, prompt or messages").with_param("content"));
        }
        let ids = encode(content, req.add_special)?;
        if req.with_pieces == Some(true) {
            let tok = &state.model.tokenizer;
            let pieces: Vec<Value> = ids
                .iter()
                .map(|&id| {
                    let piece = tok.decode(&[id], false).map_err(|e| ApiError::internal(e.to_string()))?;
                    Ok(json!({"id": id, "piece": piece}))
                })
                .collect::<Result<_, ApiError>>()?;
            return Ok(Json(json!({"tokens": pieces})));
        }
        return Ok(Json(json!({"tokens": ids})));
    }
    for (field, given) in [("add_special", req.add_special.is_some()), ("with_pieces", req.with_pieces.is_some())] {
        if given {
            return Err(
                ApiError::bad_request(format!("{field} goes with content (llama-server's form)")).with_param(field)
            );
        }
    }
    let ids = match (req.prompt, req.messages) {
        (Some(p), None) => encode(&p, req.add_special_tokens)?,
        (None, Some(m)) => {
            let msgs = to_chat_messages(m)?;
            let plan = tools_for(req.tools, None, true)?;
            let mut kw = req.chat_template_kwargs.unwrap_or_default();
            let thinking = kw.remove("enable_thinking").and_then(|v| v.as_bool());
            let end = turn_end(req.add_generation_prompt, req.continue_final_message, &msgs, false)?;
            state
                .model
                .render_as(&msgs, plan.tools, thinking, kw, end)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
                .ids
        }
        _ => return Err(ApiError::bad_request("give one of prompt, messages or content").with_param("prompt")),
    };
    Ok(Json(json!({"count": ids.len(), "max_model_len": state.max_model_len, "tokens": ids})))
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_json(&body)?;
    check_model(&state, req.model.as_deref())?;
    let vocab = state.model.config.vocab_size as u32;
    if let Some(&bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(
            ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {vocab}")).with_param("tokens")
        );
    }
    let text = state.model.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // vLLM's clients read `prompt`, llama-server's `content`: both asked the same way.
    Ok(Json(json!({"prompt": text, "content": text})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
    }

    #[test]
    fn tool_choice_plans() {
        let tools = || Some(vec![tool("a"), tool("b")]);
        let all = Some(vec![tool("a"), tool("b")]);
        // auto (also the default): tools rendered, calls parsed, nothing prefilled.
        for c in [None, Some(json!("auto")), Some(Value::Null)] {
            assert_eq!(
                tools_for(tools(), c.as_ref(), true).unwrap(),
                ToolPlan { tools: all.clone(), parse: true, prefill: None, format: None }
            );
        }
        // none: no tools, no parsing.
        assert_eq!(
            tools_for(tools(), Some(&json!("none")), true).unwrap(),
            ToolPlan { tools: None, parse: false, prefill: None, format: None }
        );
        // required: every tool, and the answer starts a call.
        assert_eq!(
            tools_for(tools(), Some(&json!("required")), true).unwrap(),
            ToolPlan {
                tools: all.clone(),
                parse: true,
                prefill: Some("<tool_call>\n".into()),
                format: Some(qwick_chat::OutputFormat::tool_call(all.as_ref().unwrap(), None, true))
            }
        );
        // named: only that tool, and the call's name is given.
        let named = json!({"type": "function", "function": {"name": "b"}});
        assert_eq!(
            tools_for(tools(), Some(&named), true).unwrap(),
            ToolPlan {
                tools: Some(vec![tool("b")]),
                parse: true,
                prefill: Some("<tool_call>\n{\"name\": \"b\", \"arguments\": ".into()),
                format: Some(qwick_chat::OutputFormat::tool_call(&[tool("b")], Some("b"), false))
            }
        );
        // Names are written as JSON strings.
        assert_eq!(tool_prefill(Some("q\"x")), "<tool_call>\n{\"name\": \"q\\\"x\", \"arguments\": ");
        // Errors.
        for bad in [
            json!({"type": "function", "function": {"name": "zzz"}}),
            json!({"type": "other", "function": {"name": "a"}}),
            json!({"type": "function"}),
            json!("sometimes"),
            json!(3),
        ] {
            let e = tools_for(tools(), Some(&bad), true).unwrap_err();
            assert_eq!(e.body()["error"]["param"], "tool_choice", "{bad}");
        }
        assert!(tools_for(None, Some(&json!("required")), true).is_err());
        assert_eq!(
            tools_for(None, Some(&json!("none")), true).unwrap(),
            ToolPlan { tools: None, parse: false, prefill: None, format: None }
        );
    }

    /// `stop` as requests spelled it.
    #[derive(Deserialize, Debug)]
    #[serde(untagged)]
    #[allow(dead_code)]
    enum Stop {
        One(String),
        Many(Vec<String>),
    }

    /// A chat request as it was before the sampling fields moved into [`SamplingFields`]: the
    /// same fields, the request's own.
    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct OwnFields {
        messages: Vec<InMessage>,
        n: Option<u64>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i32>,
        min_p: Option<f32>,
        presence_penalty: Option<f32>,
        frequency_penalty: Option<f32>,
        repetition_penalty: Option<f32>,
        seed: Option<i64>,
        stop: Option<Stop>,
        stop_token_ids: Option<Vec<u32>>,
        logit_bias: Option<std::collections::HashMap<String, f32>>,
        #[serde(flatten)]
        format: FormatFields,
        #[serde(flatten)]
        extra: Map<String, Value>,
    }

    #[test]
    fn flattened_sampling_fields_read_as_the_request_own() {
        let parse = |b: &str| parse_json_flattened::<ChatRequest, SamplingFields>(b.as_bytes());
        let r =
            parse(r#"{"messages": [], "temperature": 0, "stop": "x", "stop_token_ids": null, "user": "u"}"#).unwrap();
        let f = &r.sampling;
        assert_eq!(
            (f.temperature, f.stop.as_slice(), f.stop_token_ids.as_slice()),
            (Some(0.0), &["x".into()][..], &[][..])
        );
        assert_eq!(r.extra.keys().collect::<Vec<_>>(), ["user"]);
        let r =
            parse(r#"{"messages": [], "stop": ["a", "b"], "stop_token_ids": [7], "logit_bias": {"3": -1}}"#).unwrap();
        assert_eq!((r.sampling.stop.len(), r.sampling.stop_token_ids.as_slice()), (2, &[7][..]));
        assert_eq!(r.sampling.logit_bias.unwrap()["3"], -1.0);
        // Errors: the same message and param as when the fields were the request's own.
        for body in [
            r#"{"messages": [], "temperature": "hot"}"#,
            r#"{"messages": [], "top_k": 99999999999}"#,
            r#"{"messages": [], "stop": 5}"#,
            r#"{"messages": [], "stop_token_ids": [-1]}"#,
            r#"{"messages": [], "logit_bias": {"1": "x"}}"#,
            r#"{"n": "x", "top_k": "y", "messages": []}"#,
            r#"{"top_k": "y", "n": "x", "messages": []}"#,
            r#"{"seed": "s", "messages": "hi"}"#,
            r#"{"messages": "hi", "seed": "s"}"#,
            r#"{"messages": [], "seed": 1, "seed": 2}"#,
            r#"{"temperature": "hot"}"#,
            r#"{"guided_regex": 1, "temperature": "hot", "messages": []}"#,
            r#"{"stop": 5, "messages": 1}"#,
            r#"{"messages": 1, "stop": 5}"#,
            r#"{"messages": [{"role": "user", "content": 5}], "stop": 5}"#,
            r#"{"stop": 5, "messages": [{"role": "user", "content": 5}]}"#,
            r#"{"messages": [], "stop": 5"#,
            r#"{"messages": [], "stop": "#,
            r#"{"messages": [], "min_p": "x", "#,
            r#"{"messages": [], "min_p": 0.5, "#,
            "[]",
            "",
        ] {
            let own = parse_json::<OwnFields>(body.as_bytes()).unwrap_err();
            let e = parse(body).unwrap_err();
            let own_message = own.message.replace("struct OwnFields", "struct ChatRequest");
            assert_eq!((e.message, e.param), (own_message, own.param), "{body}");
        }
    }
}
