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
//! - [`hub`]: where a model comes from (a path, or the Hugging Face cache / Hub, a GGUF file of a
//!   Hub repository by its quantization tag, an Ollama model).
//! - [`store`]: the local Ollama store, and a listing of the models it and the Hugging Face cache
//!   hold.
//! - [`ModelText`]: all of the above for a model folder or a GGUF file.
//! - [`Grammars`]: structured output (JSON schemas, regexes, choices, Lark grammars) as token
//!   constraints.

mod constraint;
mod error;
mod generation;
pub mod hub;
mod model_text;
pub mod pyjson;
mod reasoning;
pub mod store;
mod template;
mod tokenizer;
mod tools;

pub use constraint::{Grammars, OutputFormat};
pub use error::{ChatError, Result};
pub use generation::GenerationConfig;
pub use model_text::{ModelText, TextSource};
pub use qwick_sampler::SamplingParams;
pub use reasoning::{split_reasoning, ReasoningDelta, ReasoningParser, ThinkingBudget, THINKING_BUDGET_STOP};
pub use template::{ChatMessage, ChatTemplate, FunctionCall, RenderOptions, ToolCall};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use tools::{parse_tool_calls, ParsedToolCall, ToolCallDelta, ToolCallStream, ToolCalls};
