//! A chat model's text side — tokenizer, chat template, generation defaults, stop ids, what the
//! thinking budget injects — shared by the server and the `run`, `chat` and `finetune` commands,
//! so a request renders, thinks and samples the same way through either.

use crate::constraint::Grammars;
use crate::error::{ChatError, Result};
use crate::generation::GenerationConfig;
use crate::model_text::{ModelText, TextSource};
use crate::reasoning::THINKING_BUDGET_STOP;
use crate::resolve;
use crate::template::{ChatMessage, ChatTemplate, RenderOptions};
use crate::tokenizer::Tokenizer;
use qwick_engine::{GenParams, ThinkingBudget};
use qwick_gguf::GgufFile;
use qwick_model::{Config, ModelFiles};
use qwick_sampler::SamplingParams;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Everything needed to turn chat requests into token ids and engine parameters, and back.
pub struct ChatModel {
    /// The name clients use (`model` in requests).
    pub name: String,
    /// The model folder or GGUF file.
    pub dir: PathBuf,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// Generation defaults (generation_config.json, or an Ollama model's params).
    pub gen_config: GenerationConfig,
    /// The model's config.
    pub config: Config,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Bytes of the weights on disk (reported by `/api/tags`).
    pub weight_bytes: u64,
    /// Unix time the server loaded the model.
    pub created: u64,
    /// Names of the LoRA adapters served beside the model; adapter `i + 1` of the weights.
    pub adapters: Vec<String>,
    newline_tokens: OnceLock<Arc<HashSet<u32>>>,
    grammars: OnceLock<Result<Arc<Grammars>, String>>,
}

/// How a rendered chat ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    /// With the header of a new assistant turn (`add_generation_prompt`).
    NewTurn,
    /// With the last message, closed (`add_generation_prompt: false`).
    Closed,
    /// Inside the last message, left open for the model to continue it
    /// (`continue_final_message`, an assistant prefill).
    Continue,
}

/// A rendered chat prompt.
pub struct Prompt {
    /// The prompt's text.
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// The output starts inside reasoning (everything up to `</think>` is reasoning).
    pub starts_in_thinking: bool,
    /// Thinking is on for this turn.
    pub thinking: bool,
}

impl ChatModel {
    /// Loads the text side of a model folder or GGUF file. `name`: the served name (default:
    /// the folder's name, or the file's without `.gguf`).
    pub fn load(path: &Path, chat_template: Option<&Path>, name: Option<String>) -> anyhow::Result<ChatModel> {
        let files = ModelFiles::locate(path)?;
        let (config, text, weight_bytes) = match &files {
            ModelFiles::Folder(dir) => {
                let weight_bytes = std::fs::read_dir(dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                let text = ModelText::load(TextSource::Folder(dir), chat_template)?;
                (Config::from_file(&dir.join("config.json"))?, text, weight_bytes)
            }
            ModelFiles::Gguf(file) => {
                let g = GgufFile::open(file)?;
                let text = ModelText::load(TextSource::Gguf(&g), chat_template)?;
                (qwick_model::gguf::config(&g)?, text, std::fs::metadata(file).map(|m| m.len()).unwrap_or(0))
            }
        };
        let eos = text.eos(&config.eos_token_ids);
        let ModelText { tokenizer, template, gen_config } = text;
        let dir = files.path().to_path_buf();
        let name = name.unwrap_or_else(|| {
            let canon = dir.canonicalize().ok();
            let n = match &files {
                ModelFiles::Folder(_) => canon.as_deref().and_then(Path::file_name),
                ModelFiles::Gguf(_) => canon.as_deref().and_then(Path::file_stem),
            };
            n.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "qwen3".into())
        });
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(ChatModel {
            name,
            dir,
            tokenizer,
            template,
            gen_config,
            config,
            eos,
            weight_bytes,
            created,
            adapters: vec![],
            newline_tokens: OnceLock::new(),
            grammars: OnceLock::new(),
        })
    }

    /// Loads the chat model a `--model` names: a folder, GGUF file, Hub id (with or without a
    /// quantization tag) or `ollama:NAME`. An Ollama model is served under its Ollama name and
    /// its `params` layer sets the sampling defaults (`temperature`, `top_p`, `top_k`, `min_p`,
    /// `repeat_penalty`), as Ollama applies them.
    pub fn load_spec(spec: &str, chat_template: Option<&Path>, name: Option<String>) -> anyhow::Result<ChatModel> {
        let path = resolve::resolve_model(spec)?;
        let Some(ollama) = spec.strip_prefix("ollama:") else {
            return ChatModel::load(&path, chat_template, name);
        };
        let m = resolve::ollama_model(&resolve::ollama_dir()?, ollama)?;
        let mut chat = ChatModel::load(&path, chat_template, Some(name.unwrap_or_else(|| m.name.short())))?;
        if let Some(p) = &m.params {
            chat.apply_ollama_params(p);
        }
        Ok(chat)
    }

    /// Sampling defaults from an Ollama `params` layer.
    pub fn apply_ollama_params(&mut self, p: &Map<String, Value>) {
        let f = |k: &str| p.get(k).and_then(Value::as_f64).map(|v| v as f32);
        let g = &mut self.gen_config;
        g.temperature = f("temperature").or(g.temperature);
        g.top_p = f("top_p").or(g.top_p);
        g.min_p = f("min_p").or(g.min_p);
        g.repetition_penalty = f("repeat_penalty").or(g.repetition_penalty);
        g.top_k = p.get("top_k").and_then(Value::as_i64).map(|v| v as i32).or(g.top_k);
    }

    /// Whether the weights are a GGUF file (an Ollama blob has no `.gguf` extension).
    pub fn is_gguf(&self) -> bool {
        matches!(ModelFiles::locate(&self.dir), Ok(ModelFiles::Gguf(_)))
    }

    /// The adapter a request's `model` names: 0 for the model itself, `i + 1` for adapter `i`
    /// (by its name, with or without `:latest`); `None` for anything else.
    pub fn adapter_for(&self, model: &str) -> Option<u16> {
        if self.matches(model) {
            return Some(0);
        }
        let m = model.trim();
        let m = m.strip_suffix(":latest").unwrap_or(m);
        self.adapters.iter().position(|a| a == m).map(|i| i as u16 + 1)
    }

    /// Whether `model` (from a request) names this model: its served name, with or without an
    /// Ollama-style `:tag`, or the folder it was loaded from.
    pub fn matches(&self, model: &str) -> bool {
        let m = model.trim();
        m == self.name
            || m.strip_suffix(":latest").is_some_and(|b| b == self.name)
            || Path::new(m) == self.dir
            || (!m.is_empty() && Path::new(m).canonicalize().ok() == self.dir.canonicalize().ok())
    }

    /// Renders `messages` for a new assistant turn and tokenizes them. `thinking`: the
    /// `enable_thinking` switch if the client set it; `extra`: other template variables.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<Vec<Value>>,
        thinking: Option<bool>,
        extra: Map<String, Value>,
    ) -> Result<Prompt> {
        self.render_as(messages, tools, thinking, extra, TurnEnd::NewTurn)
    }

    /// [`ChatModel::render`], the chat ending as `end` says.
    pub fn render_as(
        &self,
        messages: &[ChatMessage],
        tools: Option<Vec<Value>>,
        thinking: Option<bool>,
        extra: Map<String, Value>,
        end: TurnEnd,
    ) -> Result<Prompt> {
        let render = |on: Option<bool>| {
            self.template.render(
                messages,
                &RenderOptions {
                    tools: tools.clone(),
                    add_generation_prompt: end == TurnEnd::NewTurn,
                    enable_thinking: on,
                    extra: extra.clone(),
                },
            )
        };
        let mut text = render(thinking)?;
        let (starts_in_thinking, thinking) = match end {
            TurnEnd::NewTurn => {
                let asked = thinking.unwrap_or(true);
                // A template that honours enable_thinking renders the two modes differently.
                let hybrid = render(Some(!asked))? != text;
                let ends_in_think = text.trim_end().ends_with("<think>");
                (if hybrid { asked } else { ends_in_think }, (hybrid && asked) || ends_in_think)
            }
            TurnEnd::Closed => (false, false),
            TurnEnd::Continue => {
                // The rendered chat cut just after the last message's text (its answer, or its
                // reasoning where it has no answer yet), as transformers' continue_final_message.
                let last = messages.last().ok_or_else(|| ChatError::Message("no message to continue".into()))?;
                let content = last.content.as_deref().unwrap_or("").trim();
                let reasoning = last.reasoning_content.as_deref().unwrap_or("").trim();
                let (cut, in_thinking) = match (content.is_empty(), reasoning.is_empty()) {
                    (false, _) => (content, false),
                    (true, false) => (reasoning, true),
                    (true, true) => {
                        return Err(ChatError::Message("the message to continue has no text".into()));
                    }
                };
                let at = text.rfind(cut).ok_or_else(|| {
                    ChatError::Template("the message to continue does not appear in the rendered chat".into())
                })?;
                text.truncate(at + cut.len());
                // Continuing the answer, the prompt holds the reasoning's end already.
                (in_thinking, in_thinking)
            }
        };
        let ids = self.tokenizer.encode(&text, false)?;
        Ok(Prompt { text, ids, starts_in_thinking, thinking })
    }

    /// The engine's thinking budget of `max_tokens` reasoning tokens, or `None` if the tokenizer
    /// has no `</think>`.
    pub fn budget(&self, max_tokens: usize, starts_in_thinking: bool) -> Option<ThinkingBudget> {
        let t = &self.tokenizer;
        let think_end = t.token_id("</think>")?;
        let newline_tokens = self
            .newline_tokens
            .get_or_init(|| {
                Arc::new(
                    (0..t.vocab_size() as u32)
                        .filter(|&id| t.id_to_token(id).is_some_and(|s| s.ends_with('\u{10A}') || s.ends_with('\n')))
                        .collect(),
                )
            })
            .clone();
        Some(ThinkingBudget {
            max_tokens,
            starts_in_thinking,
            think_start: t.token_id("<think>"),
            think_end,
            stop_tokens: t.encode(THINKING_BUDGET_STOP, false).ok()?,
            stop_tokens_after_text: t.encode(&format!("\n{THINKING_BUDGET_STOP}"), false).ok()?,
            newline_tokens,
        })
    }

    /// Structured output over this model's tokenizer (built on first use).
    pub fn grammars(&self) -> Result<Arc<Grammars>, String> {
        self.grammars
            .get_or_init(|| {
                let eos = self.tokenizer.token_id("<|im_end|>").or_else(|| self.eos.first().copied()).unwrap_or(0);
                Grammars::new(&self.tokenizer, self.config.vocab_size, eos).map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
    }

    /// Whether the template knows tools (for Ollama's capabilities).
    pub fn supports_tools(&self) -> bool {
        self.template
            .render(
                &[ChatMessage::user("x")],
                &RenderOptions {
                    tools: Some(vec![serde_json::json!({"type": "function", "function": {"name": "probe_tool"}})]),
                    add_generation_prompt: true,
                    ..RenderOptions::default()
                },
            )
            .is_ok_and(|t| t.contains("probe_tool"))
    }

    /// The model's context length (`max_position_embeddings`).
    pub fn context(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// Engine parameters for one request.
    pub fn params(&self, sampling: SamplingParams, max_context: usize, budget: Option<ThinkingBudget>) -> GenParams {
        GenParams { sampling, eos_token_ids: self.eos.clone(), max_context, thinking: budget }
    }

    /// Text of one token (special tokens included), for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}
