//! `qwick run`: one chat turn. Also the pieces `qwick chat` shares: loading a model folder with
//! its tokenizer, template and generation config, turning flags into sampling parameters, and
//! streaming generated tokens as text (stop strings, reasoning shown dimmed).

use crate::common::{self, RunArgs, SpecArgs};
use anyhow::{anyhow, bail, Context, Result};
use qwick_chat::{ChatMessage, ChatModel, Delta, GenerationConfig, Prompt, TextPipe, Tokenizer};
use qwick_engine::{generate, FinishReason, GenParams, Generation, Scheduler, ThinkingBudget};
use qwick_model::Qwen3;
use qwick_sampler::SamplingParams;
use serde_json::json;
use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most tokens generated when neither `--max-tokens` nor generation_config.json says.
pub const DEFAULT_MAX_TOKENS: usize = 2048;

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Flags `run` and `chat` share: the model, the conversation setup and sampling.
#[derive(clap::Args, Clone)]
pub struct GenArgs {
    /// Model: a local folder, or a Hugging Face Hub id (owner/name[@revision]) found in the
    /// Hugging Face cache or downloaded into it.
    #[arg(long)]
    pub model: String,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Thinking on (the default for Qwen3).
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Thinking off (renders the prompt with enable_thinking=false).
    #[arg(long)]
    pub no_think: bool,
    /// Let the model think for at most N tokens, then insert Qwen's stop-thinking text and let it
    /// answer; 0 turns thinking off.
    #[arg(long, value_name = "N")]
    pub max_thinking_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy (default: generation_config.json, else Qwen's preset:
    /// 0.6 thinking, 0.7 not).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Top-p, in (0, 1] (default: 0.95 thinking, 0.8 not).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Top-k; 0 or -1 disables it (default: 20).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i32>,
    /// Min-p, in [0, 1] (default: 0).
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Presence penalty, in [-2, 2] (default: 0).
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, in [-2, 2] (default: 0).
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty, > 0; 1 disables it (default: generation_config.json, else 1).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Most tokens to generate (default: generation_config.json's max_new_tokens, else 2048);
    /// generation also ends at the model's context length.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Seed of the sampler (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// A string that ends generation (not printed); repeat or list several (`--stop=-x` for one
    /// that starts with a dash).
    #[arg(long, value_name = "STR", num_args = 1.., action = clap::ArgAction::Append)]
    pub stop: Vec<String>,
    /// Chat template file (.jinja, or a JSON file with a "chat_template" key), for a model folder
    /// that has none or to replace its own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
}

impl GenArgs {
    /// Whether thinking is asked for (on unless `--no-think` or `--max-thinking-tokens 0`), and
    /// whether the choice was explicit.
    pub fn thinking(&self) -> Result<(bool, bool)> {
        match self.max_thinking_tokens {
            Some(0) if self.think => bail!("--think contradicts --max-thinking-tokens 0 (which turns thinking off)"),
            Some(n) if n > 0 && self.no_think => bail!("--no-think contradicts --max-thinking-tokens {n}"),
            Some(0) => Ok((false, true)),
            _ if self.no_think => Ok((false, true)),
            _ => Ok((true, self.think || self.max_thinking_tokens.is_some())),
        }
    }

    /// Sampling parameters for a thinking mode: generation_config.json's defaults and Qwen's
    /// presets, replaced by what the user set; checked.
    pub fn sampling(&self, gc: &GenerationConfig, thinking: bool) -> Result<SamplingParams> {
        let mut p = gc.sampling_params(thinking);
        let set = |dst: &mut f32, v: Option<f32>| {
            if let Some(v) = v {
                *dst = v
            }
        };
        set(&mut p.temperature, self.temperature);
        set(&mut p.top_p, self.top_p);
        set(&mut p.min_p, self.min_p);
        set(&mut p.presence_penalty, self.presence_penalty);
        set(&mut p.frequency_penalty, self.frequency_penalty);
        set(&mut p.repetition_penalty, self.repetition_penalty);
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        p.max_tokens = Some(self.max_tokens.or(p.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS));
        p.seed = self.seed;
        p.stop = self.stop.clone();
        p.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(p)
    }
}

#[derive(clap::Args)]
pub struct RunCmdArgs {
    /// The user message; `-` reads it from standard input.
    #[arg(long, allow_hyphen_values = true, required_unless_present = "messages")]
    prompt: Option<String>,
    /// A JSON file with the whole conversation (a list of {"role", "content", ...} messages in
    /// the OpenAI format, ending with a user message) instead of --prompt; `-` reads stdin.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "system"])]
    messages: Option<String>,
    /// Print one JSON object: reasoning, content, token ids, finish reason and timings.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gen: GenArgs,
}

/// A model (folder or GGUF file) ready to chat: tokenizer, template, generation config and the model's limits.
/// The weights are loaded separately ([`Chat::load_weights`]) so that bad input fails first.
/// Opens the chat model a `--model` names (a folder, GGUF file or Hub id).
pub fn open_chat(spec: &str, chat_template: Option<&Path>) -> Result<ChatModel> {
    ChatModel::load_spec(spec, chat_template, None)
}

/// Renders `messages` for a new assistant turn. `thinking`: asked for; `explicit`: whether to
/// pass `enable_thinking` to the template at all.
pub fn render(chat: &ChatModel, messages: &[ChatMessage], thinking: bool, explicit: bool) -> Result<Prompt> {
    Ok(chat.render(messages, None, explicit.then_some(thinking), serde_json::Map::new())?)
}

pub fn check_fits(chat: &ChatModel, prompt: &Prompt) -> Result<()> {
    if prompt.ids.len() >= chat.context() {
        bail!(
            "the prompt has {} tokens, which leaves no room in the model's context of {} tokens",
            prompt.ids.len(),
            chat.context()
        );
    }
    Ok(())
}

pub fn load_weights(chat: &ChatModel, args: &RunArgs) -> Result<Arc<Qwen3>> {
    common::load_model(&chat.dir, args)
}

/// The engine's thinking budget of `max_tokens` reasoning tokens for a prompt.
pub fn budget(chat: &ChatModel, max_tokens: usize, prompt: &Prompt) -> Result<ThinkingBudget> {
    chat.budget(max_tokens, prompt.starts_in_thinking)
        .ok_or_else(|| anyhow!("--max-thinking-tokens: the tokenizer has no </think> token"))
}

/// How generated text is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Nothing printed (collected for JSON).
    Quiet,
    /// Exactly the generated text on stdout.
    Raw,
    /// For a terminal: reasoning dimmed, then the answer.
    Pretty,
}

/// Generated tokens through the [`TextPipe`] (no tool calls), printed as they come; collects the
/// text, reasoning and answer.
pub struct TextStream {
    pipe: TextPipe,
    display: Display,
    /// The generated text, cut at a stop string.
    pub text: String,
    pub reasoning: String,
    pub content: String,
    shown_reasoning: bool,
    shown_content: bool,
}

impl TextStream {
    pub fn new(tokenizer: &Tokenizer, stops: &[String], starts_in_thinking: bool, display: Display) -> TextStream {
        TextStream {
            pipe: TextPipe::new(tokenizer, stops, Some(starts_in_thinking), false),
            display,
            text: String::new(),
            reasoning: String::new(),
            content: String::new(),
            shown_reasoning: false,
            shown_content: false,
        }
    }

    /// A stop string was found.
    pub fn stopped(&self) -> bool {
        self.pipe.stopped
    }

    /// Adds a token; returns `Break` once a stop string has been found.
    pub fn push(&mut self, id: u32) -> Result<ControlFlow<()>> {
        let d = self.pipe.push(id);
        if let Some(e) = self.pipe.take_error() {
            return Err(e.into());
        }
        self.show(d)?;
        Ok(if self.pipe.stopped { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
    }

    fn show(&mut self, d: Delta) -> Result<()> {
        if d.text.is_empty() && d.is_empty() {
            return Ok(());
        }
        self.text.push_str(&d.text);
        self.reasoning.push_str(&d.reasoning);
        self.content.push_str(&d.content);
        let mut out = std::io::stdout().lock();
        match self.display {
            Display::Quiet => {}
            Display::Raw => out.write_all(d.text.as_bytes())?,
            Display::Pretty => {
                if !d.reasoning.is_empty() {
                    write!(out, "{DIM}{}{RESET}", d.reasoning)?;
                    self.shown_reasoning = true;
                }
                if !d.content.is_empty() {
                    if self.shown_reasoning && !self.shown_content {
                        out.write_all(b"\n\n")?;
                    }
                    out.write_all(d.content.as_bytes())?;
                    self.shown_content = true;
                }
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Ends the stream: flushes held-back text.
    pub fn finish(&mut self) -> Result<()> {
        let d = self.pipe.finish();
        if let Some(e) = self.pipe.take_error() {
            return Err(e.into());
        }
        self.show(d)
    }
}

/// The finish reason users see: a stop string is a stop.
/// Generates from `ids`, feeding every token to `text` (which prints and watches stop strings)
/// until the engine finishes, `text` asks to stop, or `interrupted()` says so; then flushes `text`.
pub fn generate_text(
    sched: &mut Scheduler,
    ids: &[u32],
    params: GenParams,
    text: &mut TextStream,
    interrupted: impl Fn() -> bool,
) -> Result<Generation> {
    let mut failed = None;
    let g = generate(sched, ids, params, |e| {
        if interrupted() {
            return ControlFlow::Break(());
        }
        match text.push(e.token.id) {
            Ok(flow) => flow,
            Err(err) => {
                failed = Some(err);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    text.finish()?;
    Ok(g)
}

pub fn finish_reason(g: &Generation, text: &TextStream) -> &'static str {
    match g.finish {
        FinishReason::Aborted if text.stopped() => "stop",
        f => f.as_str(),
    }
}

/// One line of statistics for stderr.
pub fn stats_line(g: &Generation, finish: &str) -> String {
    let mut s = format!(
        "{} tokens, {:.1} tok/s (prompt: {} tokens, {:.1} tok/s",
        g.tokens.len(),
        g.decode_tok_s(),
        g.prompt_tokens,
        g.prefill_tok_s()
    );
    if g.cached_tokens > 0 {
        s.push_str(&format!("; {} from the cache", g.cached_tokens));
    }
    s.push(')');
    if finish == "length" {
        s.push_str("; stopped at the token limit");
    }
    s
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
    Ok(s)
}

fn messages_from(a: &RunCmdArgs) -> Result<Vec<ChatMessage>> {
    if let Some(file) = &a.messages {
        let text = if file == "-" {
            read_stdin()?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("--messages {file}"))?
        };
        let msgs: Vec<ChatMessage> = serde_json::from_str(&text)
            .with_context(|| format!("--messages {file}: not a JSON list of chat messages"))?;
        if msgs.is_empty() {
            bail!("--messages {file}: the conversation has no messages");
        }
        return Ok(msgs);
    }
    let prompt = match a.prompt.as_deref() {
        Some("-") => {
            let mut s = read_stdin()?;
            // `echo text |` adds a newline that is not part of the message.
            if s.ends_with('\n') {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            s
        }
        Some(p) => p.to_string(),
        None => bail!("give --prompt TEXT (or --prompt - to read it from stdin)"),
    };
    let mut msgs = vec![];
    if let Some(sys) = &a.gen.system {
        msgs.push(ChatMessage::system(sys.clone()));
    }
    msgs.push(ChatMessage::user(prompt));
    Ok(msgs)
}

pub fn run(a: RunCmdArgs) -> Result<()> {
    let (thinking, explicit) = a.gen.thinking()?;
    let chat = open_chat(&a.gen.model, a.gen.chat_template.as_deref())?;
    let messages = messages_from(&a)?;
    let prompt = render(&chat, &messages, thinking, explicit)?;
    let sampling = a.gen.sampling(&chat.gen_config, prompt.thinking)?;
    check_fits(&chat, &prompt)?;
    let budget = match a.gen.max_thinking_tokens {
        Some(n) if n > 0 => Some(budget(&chat, n, &prompt)?),
        _ => None,
    };
    let isa = a.gen.run.isa()?;
    let model = load_weights(&chat, &a.gen.run)?;

    let max_tokens = sampling.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let inject = budget.as_ref().map_or(0, |b| b.stop_tokens_after_text.len());
    // Room for a step's drafts past the last token, too.
    let drafts = a.gen.spec.config()?.map_or(0, |c| c.max_draft);
    let kv_tokens = chat.context().min(prompt.ids.len() + max_tokens + inject + 1 + drafts);
    let mut sched = a.gen.run.scheduler(model, &chat.dir, &a.gen.spec, kv_tokens, isa)?;
    let stops = sampling.stop.clone();

    let terminal = std::io::stdout().is_terminal();
    let display = if a.json {
        Display::Quiet
    } else if terminal {
        Display::Pretty
    } else {
        Display::Raw
    };
    let mut text = TextStream::new(&chat.tokenizer, &stops, prompt.starts_in_thinking, display);
    let params = chat.params(sampling, kv_tokens, budget);
    let g = generate_text(&mut sched, &prompt.ids, params, &mut text, || false)?;
    let finish = finish_reason(&g, &text);
    if a.json {
        let mut v = json!({
            "reasoning": if text.reasoning.is_empty() && !prompt.starts_in_thinking { None } else { Some(&text.reasoning) },
            "content": text.content,
            "text": text.text,
            "token_ids": g.tokens,
            "finish_reason": finish,
            "timings": {
                "prompt_tokens": g.prompt_tokens,
                "generated_tokens": g.tokens.len(),
                "prefill_s": g.prefill_s,
                "decode_s": g.decode_s,
                "prefill_tok_s": g.prefill_tok_s(),
                "tok_s": g.decode_tok_s(),
            },
        });
        if a.gen.max_thinking_tokens.is_some_and(|n| n > 0) {
            v["timings"]["reasoning_tokens"] = json!(g.reasoning_tokens);
        }
        if a.gen.spec.config()?.is_some() {
            let st = sched.stats();
            v["speculative"] = json!({
                "drafted_tokens": st.spec_drafted,
                "accepted_tokens": st.spec_accepted,
                "verifications": st.spec_verifications,
            });
        }
        println!("{v}");
    } else if terminal {
        println!();
    }
    if !a.json && std::io::stderr().is_terminal() {
        eprintln!("{DIM}{}{RESET}", stats_line(&g, finish));
    }
    Ok(())
}
