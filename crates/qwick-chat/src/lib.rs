#![warn(missing_docs)]
//! Everything between the user and the model's token ids, for the Qwen3 family:
//!
//! - [`Tokenizer`]: the model's `tokenizer.json` (byte-level BPE, special and added tokens as
//!   `tokenizer_config.json` declares them) and an [`IncrementalDecoder`] for streaming.
//! - [`ChatTemplate`]: the model's own Jinja chat template rendered like transformers'
//!   `apply_chat_template`, byte for byte, from [`ChatMessage`]s.
//! - [`ReasoningParser`] / [`split_reasoning`] and [`ThinkingBudget`]: `<think>` handling.
//! - [`parse_tool_calls`] / [`ToolCallStream`]: `<tool_call>` blocks in the output.
//! - [`GenerationConfig`]: `generation_config.json` and Qwen's recommended sampling presets.
//! - [`resolve`]: where a model comes from (a path, or the Hugging Face cache / Hub, a GGUF file
//!   of a Hub repository by its quantization tag, an Ollama model), and a listing of the models
//!   the Hugging Face cache and the Ollama store hold.
//! - [`ModelText`]: the tokenizer, template and generation config of a model folder or GGUF file;
//!   [`ChatModel`]: those with the model's config, stop ids and served name, turning chat
//!   messages into a [`Prompt`] and engine parameters.
//! - [`TextPipe`]: generated tokens streamed as text (stop strings, reasoning, tool calls).
//! - [`Grammars`]: structured output (JSON schemas, regexes, choices, Lark and GBNF grammars) as
//!   token constraints.

mod chat_model;
mod constraint;
mod error;
mod gbnf;
mod generation;
mod model_text;
mod pipe;
pub mod pyjson;
mod reasoning;
pub mod resolve;
mod template;
mod tokenizer;
mod tools;

pub use chat_model::{ChatModel, Prompt, TurnEnd};
pub use constraint::{Grammars, OutputFormat};
pub use error::{ChatError, Result};
pub use gbnf::{gbnf_to_lark, is_gbnf};
pub use generation::GenerationConfig;
pub use model_text::{ModelText, TextSource};
pub use pipe::{Delta, TextPipe};
pub use qwick_sampler::SamplingParams;
pub use reasoning::{split_reasoning, ReasoningDelta, ReasoningParser, ThinkingBudget, THINKING_BUDGET_STOP};
pub use template::{format_utc, ChatMessage, ChatTemplate, FunctionCall, RenderOptions, ToolCall};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use tools::{parse_tool_calls, tool_prefill, ParsedToolCall, ToolCallDelta, ToolCallStream, ToolCalls};
