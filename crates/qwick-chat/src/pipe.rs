//! Generated tokens as text, as the server and the `run` and `chat` commands stream it: tokens →
//! text (special tokens skipped) → stop strings → reasoning and answer → tool calls.

use crate::error::ChatError;
use crate::reasoning::ReasoningParser;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::tools::{ParsedToolCall, ToolCallStream};
use qwick_sampler::StopMatcher;

/// A piece of output text.
#[derive(Default, Debug, Clone)]
pub struct Delta {
    /// The generated text behind this piece, cut at a stop string, before reasoning is split
    /// off and tool calls are taken out.
    pub text: String,
    /// Reasoning (inside `<think>...</think>`).
    pub reasoning: String,
    /// Answer text (tool calls taken out when they are parsed).
    pub content: String,
    /// Tool calls completed in this piece.
    pub tool_calls: Vec<ParsedToolCall>,
}

impl Delta {
    /// Whether it holds no reasoning, answer or tool call.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    /// Appends `o` (the piece after this one).
    pub fn append(&mut self, o: Delta) {
        self.text.push_str(&o.text);
        self.reasoning.push_str(&o.reasoning);
        self.content.push_str(&o.content);
        self.tool_calls.extend(o.tool_calls);
    }
}

/// Tokens → text (special tokens skipped) → stop strings → reasoning and answer → tool calls.
///
/// A token that cannot be decoded adds no text; the first such error is kept (see
/// [`TextPipe::take_error`]).
pub struct TextPipe {
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallStream>,
    /// A stop string was found (or the answer ended at its tool call).
    pub stopped: bool,
    /// Which of the stop strings ended the text, if one did.
    pub matched_stop: Option<usize>,
    /// Tool calls were found.
    pub had_tool_calls: bool,
    /// The answer ends with its first tool call (`parallel_tool_calls: false`).
    one_call: bool,
    /// Output of [`TextPipe::prefill`], given out with the next delta.
    pending: Delta,
    /// The first decoding error.
    error: Option<ChatError>,
}

impl TextPipe {
    /// `reasoning`: split reasoning off (`Some(starts_in_thinking)`); `tools`: parse tool calls.
    pub fn new(tokenizer: &Tokenizer, stops: &[String], reasoning: Option<bool>, tools: bool) -> TextPipe {
        TextPipe {
            decoder: tokenizer.incremental_decoder(true),
            stops: StopMatcher::new(stops.iter().cloned()),
            reasoning: reasoning.map(ReasoningParser::new),
            tools: tools.then(ToolCallStream::new),
            stopped: false,
            matched_stop: None,
            had_tool_calls: false,
            one_call: false,
            pending: Delta::default(),
            error: None,
        }
    }

    /// Ends the answer at its first complete tool call, as a stop string would.
    pub fn one_tool_call(&mut self) {
        self.one_call = true;
    }

    /// Feeds answer text that the prompt already holds (a forced `<tool_call>` start) to the
    /// tool-call parser, as if the model had written it: a call it opens is parsed with it.
    /// It bypasses the stop strings and the reasoning split (the answer starts after thinking).
    pub fn prefill(&mut self, text: &str) {
        let d = self.answer(String::new(), text);
        self.pending.append(d);
    }

    /// Whether the text so far ends inside reasoning (`<think>` opened, not closed).
    pub fn in_reasoning(&self) -> bool {
        self.reasoning.as_ref().is_some_and(ReasoningParser::in_reasoning)
    }

    /// The first error decoding a token, if there was one (taken: asked again, `None`).
    pub fn take_error(&mut self) -> Option<ChatError> {
        self.error.take()
    }

    fn decoded(&mut self, r: crate::error::Result<String>) -> String {
        r.unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            String::new()
        })
    }

    fn text(&mut self, text: &str) -> Delta {
        if text.is_empty() {
            return Delta::default();
        }
        let (reasoning, content) = match &mut self.reasoning {
            Some(p) => {
                let d = p.push(text);
                (d.reasoning, d.content)
            }
            None => (String::new(), text.to_string()),
        };
        Delta { text: text.to_string(), ..self.answer(reasoning, &content) }
    }

    fn answer(&mut self, reasoning: String, content: &str) -> Delta {
        match &mut self.tools {
            Some(t) if !content.is_empty() => {
                let mut d = t.push(content);
                self.had_tool_calls |= !d.tool_calls.is_empty();
                if self.one_call && self.had_tool_calls {
                    d.tool_calls.truncate(1);
                    self.stopped = true;
                }
                Delta { text: String::new(), reasoning, content: d.content, tool_calls: d.tool_calls }
            }
            _ => Delta { text: String::new(), reasoning, content: content.to_string(), tool_calls: vec![] },
        }
    }

    fn raw(&mut self, delta: &str) -> Delta {
        if self.stopped || delta.is_empty() {
            return Delta::default();
        }
        let m = self.stops.push(delta);
        self.stopped = m.stop.is_some();
        self.matched_stop = m.stop;
        self.text(&m.text)
    }

    /// Adds a token.
    pub fn push(&mut self, id: u32) -> Delta {
        let r = self.decoder.push(id);
        let delta = self.decoded(r);
        let mut out = std::mem::take(&mut self.pending);
        out.append(self.raw(&delta));
        out
    }

    /// Ends the stream: flushes held-back text.
    pub fn finish(&mut self) -> Delta {
        let r = self.decoder.finish();
        let rest = self.decoded(r);
        let mut out = std::mem::take(&mut self.pending);
        out.append(self.raw(&rest));
        let held = self.stops.finish();
        out.append(self.text(&held));
        if let Some(p) = &mut self.reasoning {
            let d = p.finish();
            out.reasoning.push_str(&d.reasoning);
            let a = self.answer(String::new(), &d.content);
            out.append(a);
        }
        if let Some(t) = &mut self.tools {
            let d = t.finish();
            self.had_tool_calls |= !d.tool_calls.is_empty();
            out.content.push_str(&d.content);
            out.tool_calls.extend(d.tool_calls);
        }
        out
    }
}
