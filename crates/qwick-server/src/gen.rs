//! From a request to text: sampling parameters and limits, submission to the engine, and the
//! per-choice text pipeline (tokens → text → stop strings → reasoning/answer → tool calls).

use crate::app::AppState;
use crate::error::ApiError;
use qwick_chat::{Delta, TextPipe};
use qwick_engine::{
    Event, EventSink, FinishReason, GenParams, OutToken, Pooling, Request, SamplingParams, SeqGen, SubmitError,
};
use qwick_sampler::TokenLogprobs;
use serde::{Deserialize, Deserializer};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Most choices one request may ask for.
pub const MAX_N: u64 = 64;
/// Most logprobs alternatives per token.
pub const MAX_LOGPROBS: u64 = 20;

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Reads `stop` (one string, a list, or null) as a list.
fn stop_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Option::<Stop>::deserialize(d)? {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    })
}

/// Reads a value that may be null (as absent).
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Sampling fields as clients send them (OpenAI and vLLM names): part of each OpenAI request
/// (`#[serde(flatten)]`, read with [`crate::error::parse_json_flattened`]); Ollama's options are
/// turned into it.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    #[serde(deserialize_with = "stop_list")]
    pub stop: Vec<String>,
    #[serde(deserialize_with = "or_default")]
    pub stop_token_ids: Vec<u32>,
    /// OpenAI's `logit_bias`: token ids (as strings) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
}

/// Request fields over the generation defaults; checked (400 naming the parameter). `vocab`:
/// the model's vocabulary size (token ids must be below it).
pub fn sampling(base: SamplingParams, f: &SamplingFields, vocab: usize) -> Result<SamplingParams, ApiError> {
    let mut p = base;
    let set = |dst: &mut f32, v: Option<f32>| {
        if let Some(v) = v {
            *dst = v
        }
    };
    set(&mut p.temperature, f.temperature);
    set(&mut p.top_p, f.top_p);
    set(&mut p.min_p, f.min_p);
    set(&mut p.presence_penalty, f.presence_penalty);
    set(&mut p.frequency_penalty, f.frequency_penalty);
    set(&mut p.repetition_penalty, f.repetition_penalty);
    if let Some(k) = f.top_k {
        p.top_k = k;
    }
    p.seed = f.seed.map(|s| s as u64);
    p.stop = f.stop.clone();
    p.stop_token_ids = f.stop_token_ids.clone();
    p.max_tokens = None;
    p.logit_bias = Vec::new();
    for (k, &b) in f.logit_bias.iter().flatten() {
        let t = k.trim().parse::<u32>().ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
            ApiError::bad_request(format!("logit_bias: {k:?} is not a token id below {vocab}")).with_param("logit_bias")
        })?;
        p.logit_bias.push((t, b));
    }
    p.logit_bias.sort_unstable_by_key(|e| e.0);
    p.validate().map_err(|e| {
        let msg = e.to_string();
        let msg = msg.strip_prefix("invalid sampling parameter: ").unwrap_or(&msg).to_string();
        let param = msg.split_whitespace().next().unwrap_or("").to_string();
        let param = if param == "stop" { "stop".to_string() } else { param };
        ApiError::bad_request(msg).with_param(param)
    })?;
    Ok(p)
}

/// The thinking budget of an effort level (OpenAI's `reasoning_effort`, Ollama's `think`):
/// `Some(0)` turns thinking off, `Some(n)` caps it at `n` tokens, `None` leaves it unbounded.
/// An unknown level is an error naming `param`.
pub fn effort_budget(level: &str, param: &str) -> Result<Option<usize>, ApiError> {
    match level {
        "none" | "minimal" => Ok(Some(0)),
        "low" => Ok(Some(1024)),
        "medium" => Ok(Some(4096)),
        "high" => Ok(None),
        other => Err(ApiError::bad_request(format!(
            "{param} must be \"none\", \"minimal\", \"low\", \"medium\" or \"high\", not {other:?}"
        ))
        .with_param(param)),
    }
}

/// Rejects request fields qwick does not know, but for those it accepts and ignores (`ignored`,
/// listed in the README): a field is never dropped silently. `prefix` names the object
/// (`"options."` for Ollama's options).
pub fn check_fields(
    extra: &serde_json::Map<String, serde_json::Value>,
    ignored: &[&str],
    prefix: &str,
) -> Result<(), ApiError> {
    match extra.keys().find(|k| !ignored.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => {
            Err(ApiError::bad_request(format!("unsupported field {prefix}{k}")).with_param(format!("{prefix}{k}")))
        }
    }
}

/// Checks that the prompt and `max_tokens` fit the context; returns the output limit.
pub fn fit_context(
    max_model_len: usize,
    prompt_len: usize,
    max_tokens: Option<u64>,
    param: &str,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::bad_request("the prompt is empty").with_param("prompt"));
    }
    if prompt_len >= max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, your request has \
             {prompt_len} input tokens, which leaves no room for output. Please reduce the length of the input."
        ))
        .with_param("messages")
        .with_code("context_length_exceeded"));
    }
    match max_tokens {
        Some(0) => Err(ApiError::bad_request(format!("{param} must be at least 1, got 0")).with_param(param)),
        Some(m) if prompt_len as u64 + m > max_model_len as u64 => Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens \
             ({prompt_len} in the input, {m} in the completion). Please reduce the length of the input or of the \
             completion ({param}).",
            prompt_len as u64 + m
        ))
        .with_param(param)
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m as usize),
        None => Ok(max_model_len - prompt_len),
    }
}

/// Sends engine events to a tokio channel.
pub struct ChanSink(pub UnboundedSender<Event>);

impl EventSink for ChanSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    /// The LoRA adapter the request's `model` names (0: the base model).
    pub adapter: u16,
    pub params: GenParams,
    pub logprobs: Option<usize>,
    /// Also compute the prompt's logprobs, with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// A constraint on the output, applied after the given token (the end of the reasoning) or
    /// from the start.
    pub constraint: Option<OutputConstraint>,
}

/// A sequence to generate from `prompt` with the model's stop tokens and context, without
/// logprobs or a constraint.
pub fn job(
    state: &AppState,
    prompt: Vec<u32>,
    adapter: u16,
    sampling: SamplingParams,
    thinking: Option<qwick_engine::ThinkingBudget>,
) -> Job {
    Job {
        prompt,
        adapter,
        params: GenParams {
            sampling,
            eos_token_ids: state.model.eos.clone(),
            max_context: state.max_model_len,
            thinking,
        },
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
    }
}

/// A constraint and the token after which it applies (`None`: from the start).
pub type OutputConstraint = (Box<dyn qwick_sampler::TokenConstraint>, Option<u32>);

/// The output constraint of a request with `format`: over the whole output, or after
/// `</think>` when the answer starts with reasoning (the model thinks freely, then answers in
/// the format). `n` constraints, one per choice.
pub fn constraints(
    state: &AppState,
    format: Option<&qwick_chat::OutputFormat>,
    thinking: bool,
    n: usize,
    param: &str,
) -> Result<Vec<Option<OutputConstraint>>, ApiError> {
    let Some(format) = format else { return Ok((0..n).map(|_| None).collect()) };
    let grammars = state.model.grammars().map_err(|e| ApiError::internal(format!("structured output: {e}")))?;
    let after = if thinking { state.model.tokenizer.token_id("</think>") } else { None };
    (0..n)
        .map(|_| {
            grammars
                .constraint(format)
                .map(|c| Some((c, after)))
                .map_err(|e| ApiError::bad_request(format!("{param}: {e}")).with_param(param.to_string()))
        })
        .collect()
}

/// `max_tokens` bounds every output token, the thinking budget's injected ones too (the engine
/// counts sampled tokens only): the sequence's context ends there.
fn bound_context(job: &mut Job) {
    if let Some(m) = job.params.sampling.max_tokens {
        job.params.max_context = job.params.max_context.min(job.prompt.len().saturating_add(m));
    }
}

/// Why the engine refused a request, as the client is answered.
fn refused(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull => ApiError::too_many_requests(e.to_string()),
        SubmitError::Stopped => ApiError::unavailable("the server is shutting down"),
        SubmitError::Failed => ApiError::unavailable(e.to_string()),
    }
}

/// Submits a prefill-only job (its sampling, logprobs and constraint unused): an
/// [`Event::Pooled`] arrives on the returned channel, then `Finished`.
pub fn submit_pooled(state: &AppState, job: Job, pooling: Pooling) -> Result<UnboundedReceiver<Event>, ApiError> {
    let gen = SeqGen::new(&job.prompt, job.params).map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let (tx, rx) = unbounded_channel();
    let req = Request { gen, logprobs: None, adapter: job.adapter };
    state.engine.submit_pooled(req, pooling, Box::new(ChanSink(tx))).map_err(refused)?;
    Ok(rx)
}

/// Submits a job; its events arrive on the returned channel.
pub fn submit(state: &AppState, mut job: Job) -> Result<UnboundedReceiver<Event>, ApiError> {
    bound_context(&mut job);
    let mut gen = SeqGen::new(&job.prompt, job.params).map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    if let Some((c, after)) = job.constraint {
        gen.constrain(c, after);
    }
    let (tx, rx) = unbounded_channel();
    let req = Request { gen, logprobs: job.logprobs, adapter: job.adapter };
    state.engine.submit_with(req, job.prompt_logprobs, Box::new(ChanSink(tx))).map_err(refused)?;
    Ok(rx)
}

/// Submits several jobs, all or none.
pub fn submit_all(state: &AppState, jobs: Vec<Job>) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    // Check every job first so that a bad one submits nothing.
    let mut gens = vec![];
    for mut job in jobs {
        bound_context(&mut job);
        let mut gen = SeqGen::new(&job.prompt, job.params).map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
        if let Some((c, after)) = job.constraint {
            gen.constrain(c, after);
        }
        gens.push((gen, job.logprobs, job.prompt_logprobs, job.adapter));
    }
    let mut out = vec![];
    for (gen, logprobs, prompt_logprobs, adapter) in gens {
        let (tx, rx) = unbounded_channel();
        let req = Request { gen, logprobs, adapter };
        state.engine.submit_with(req, prompt_logprobs, Box::new(ChanSink(tx))).map_err(refused)?;
        out.push(rx);
    }
    Ok(out)
}

/// What one step of a choice produced.
#[derive(Default, Debug)]
pub struct Piece {
    pub delta: Delta,
    /// The output tokens behind it (with logprobs when asked for).
    pub tokens: Vec<OutToken>,
    /// For each of `tokens`, whether it is reasoning (inside `<think>…</think>`, the tags
    /// included) rather than answer.
    pub in_reasoning: Vec<bool>,
    /// The prompt's logprobs, when asked for (a piece of its own, before any output).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// The choice is finished (see [`ChoiceRun::finish`] / [`ChoiceRun::error`]).
    pub done: bool,
}

/// One choice being generated: reads the engine's events and runs them through a [`TextPipe`].
pub struct ChoiceRun {
    rx: UnboundedReceiver<Event>,
    pub pipe: TextPipe,
    state: Arc<AppState>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// The prompt's logprobs, once received (when asked for).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// Output tokens taken (up to a stop string).
    pub tokens: Vec<u32>,
    pub finish: Option<&'static str>,
    pub error: Option<String>,
    arrival: Instant,
    pub first_token: Option<Instant>,
    last_token: Option<Instant>,
    done: bool,
}

impl ChoiceRun {
    pub fn new(state: Arc<AppState>, rx: UnboundedReceiver<Event>, pipe: TextPipe, arrival: Instant) -> ChoiceRun {
        ChoiceRun {
            rx,
            pipe,
            state,
            prompt_tokens: 0,
            cached_tokens: 0,
            prompt_logprobs: None,
            tokens: vec![],
            finish: None,
            error: None,
            arrival,
            first_token: None,
            last_token: None,
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    fn end(&mut self, finish: Option<&'static str>, error: Option<String>, piece: &mut Piece) {
        piece.delta.append(self.pipe.finish());
        let finish = match finish {
            Some("stop") if self.pipe.had_tool_calls => Some("tool_calls"),
            f => f,
        };
        self.finish = finish;
        self.error = error;
        self.done = true;
        piece.done = true;
        // Closing the channel tells the engine to drop the sequence (after a stop string).
        self.rx.close();
        let m = &self.state.metrics;
        m.finished(finish.unwrap_or("error"));
        m.e2e.observe(self.arrival.elapsed().as_secs_f64());
    }

    /// The next piece of output; `None` once finished.
    pub async fn next(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        let mut piece = Piece::default();
        loop {
            let Some(event) = self.rx.recv().await else {
                self.end(None, Some("the engine stopped".into()), &mut piece);
                return Some(piece);
            };
            match event {
                Event::Started { prompt_tokens, cached_tokens } => {
                    self.prompt_tokens = prompt_tokens;
                    self.cached_tokens = cached_tokens;
                    let m = &self.state.metrics;
                    m.prompt_tokens.fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);
                }
                // Only prefill-only requests get one, and they are not read as text.
                Event::Pooled(_) => {}
                Event::PromptLogprobs(lps) => {
                    self.prompt_logprobs = Some(lps.clone());
                    piece.prompt_logprobs = Some(lps);
                    return Some(piece);
                }
                Event::Tokens(toks) => {
                    let now = Instant::now();
                    match self.last_token {
                        None => {
                            self.first_token = Some(now);
                            self.state.metrics.ttft.observe((now - self.arrival).as_secs_f64());
                        }
                        Some(t) => self.state.metrics.itl.observe((now - t).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    let m = &self.state.metrics;
                    m.generation_tokens.fetch_add(toks.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    for t in toks {
                        self.tokens.push(t.token.id);
                        let before = self.pipe.in_reasoning();
                        let d = self.pipe.push(t.token.id);
                        piece.in_reasoning.push(before || self.pipe.in_reasoning());
                        piece.delta.append(d);
                        piece.tokens.push(t);
                        if self.pipe.stopped {
                            self.end(Some("stop"), None, &mut piece);
                            return Some(piece);
                        }
                    }
                    return Some(piece);
                }
                Event::Finished(f) => {
                    let reason = match f {
                        FinishReason::Stop | FinishReason::Aborted => "stop",
                        FinishReason::Length => "length",
                    };
                    self.end(Some(reason), None, &mut piece);
                    return Some(piece);
                }
                Event::Error(e) => {
                    self.end(None, Some(e), &mut piece);
                    return Some(piece);
                }
            }
        }
    }

    /// The next piece of output; `None` once finished or once the client reading `tx` has
    /// gone away (see `Sender::is_closed`).
    pub async fn next_unless_closed(&mut self, tx: &tokio::sync::mpsc::Sender<axum::body::Bytes>) -> Option<Piece> {
        tokio::select! {
            p = self.next() => p,
            _ = tx.closed() => None,
        }
    }

    /// Runs to the end, collecting everything into one piece.
    pub async fn collect(&mut self) -> Piece {
        let mut all = Piece::default();
        while let Some(p) = self.next().await {
            all.delta.append(p.delta);
            all.tokens.extend(p.tokens);
            all.in_reasoning.extend(p.in_reasoning);
        }
        all
    }
}
