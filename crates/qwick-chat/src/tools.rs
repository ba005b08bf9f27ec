use crate::pyjson;
use qwick_sampler::partial_match_len;
use serde::Serialize;
use serde_json::Value;

const CALL_START: &str = "<tool_call>";
const CALL_END: &str = "</tool_call>";

/// A tool call found in model output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParsedToolCall {
    /// The function's name.
    pub name: String,
    /// The arguments as a JSON string, written like Python's `json.dumps(..., ensure_ascii=False)`
    /// (as vLLM's hermes parser returns them); a string given by the model is kept as is.
    pub arguments: String,
}

/// Model output with its tool calls taken out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ToolCalls {
    /// The text outside the tool calls (trimmed when there were calls), with any malformed
    /// `<tool_call>` block left in place.
    pub content: String,
    /// The calls, in order.
    pub tool_calls: Vec<ParsedToolCall>,
}

/// Parses the body of a `<tool_call>` block: `{"name": ..., "arguments": {...}}`.
fn parse_call(body: &str) -> Option<ParsedToolCall> {
    let json: Value = serde_json::from_str(body.trim()).ok()?;
    let name = json.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let arguments = match json.get("arguments").or_else(|| json.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => pyjson::dumps(v),
    };
    Some(ParsedToolCall { name, arguments })
}

/// Extracts Qwen3 (hermes-style) tool calls from a complete answer:
/// `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, possibly several.
///
/// A block whose JSON does not parse (or has no `name`), or that is never closed, stays in the
/// content. Run this on the answer after the reasoning has been split off.
pub fn parse_tool_calls(text: &str) -> ToolCalls {
    let mut out = ToolCalls::default();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_START) {
        let after = &rest[start + CALL_START.len()..];
        let Some(end) = after.find(CALL_END) else {
            break;
        };
        out.content.push_str(&rest[..start]);
        match parse_call(&after[..end]) {
            Some(call) => out.tool_calls.push(call),
            None => out.content.push_str(&rest[start..start + CALL_START.len() + end + CALL_END.len()]),
        }
        rest = &after[end + CALL_END.len()..];
    }
    out.content.push_str(rest);
    if !out.tool_calls.is_empty() {
        out.content = out.content.trim().to_string();
    }
    out
}

/// The start of a forced tool call: `<tool_call>\n`, and for a named function also its name, so
/// that the model goes on with the arguments.
pub fn tool_prefill(name: Option<&str>) -> String {
    match name {
        None => format!("{CALL_START}\n"),
        Some(n) => format!("{CALL_START}\n{{\"name\": {}, \"arguments\": ", Value::String(n.to_string())),
    }
}

/// What [`ToolCallStream::push`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Answer text that can be emitted now.
    pub content: String,
    /// Tool calls completed by this delta.
    pub tool_calls: Vec<ParsedToolCall>,
}

/// Streaming form of [`parse_tool_calls`]: content streams out as it comes, a `<tool_call>`
/// block is held until its `</tool_call>` and then returned as a call.
///
/// Whitespace around the calls is held back and dropped, so the content streamed equals
/// [`parse_tool_calls`]'s, except that whitespace at the very start of the output is emitted
/// before it is known whether a call will follow.
#[derive(Debug, Clone, Default)]
pub struct ToolCallStream {
    buf: String,
    in_call: bool,
    /// Trailing whitespace of the content, emitted only if more content follows.
    pending_ws: String,
    emitted_content: bool,
    had_calls: bool,
}

impl ToolCallStream {
    /// A parser for one answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any tool call has been completed.
    pub fn has_calls(&self) -> bool {
        self.had_calls
    }

    fn emit(&mut self, text: &str, out: &mut ToolCallDelta) {
        let body = text.trim_end();
        if body.is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let ws = std::mem::take(&mut self.pending_ws);
        if self.emitted_content || !self.had_calls {
            out.content.push_str(&ws);
            out.content.push_str(body);
        } else {
            // Content after tool calls: its leading whitespace is dropped, as trim() does.
            let ws_and_body = format!("{ws}{body}");
            out.content.push_str(ws_and_body.trim_start());
        }
        self.emitted_content = true;
        self.pending_ws = text[body.len()..].to_string();
    }

    /// Feeds the next piece of the answer.
    pub fn push(&mut self, delta: &str) -> ToolCallDelta {
        self.buf.push_str(delta);
        let mut out = ToolCallDelta::default();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CALL_END) else {
                    return out;
                };
                let block_len = end + CALL_END.len();
                match parse_call(&self.buf[..end]) {
                    Some(call) => {
                        out.tool_calls.push(call);
                        self.had_calls = true;
                    }
                    None => {
                        let raw = format!("{CALL_START}{}", &self.buf[..block_len]);
                        self.emit(&raw, &mut out);
                    }
                }
                self.buf.drain(..block_len);
                self.in_call = false;
            } else if let Some(start) = self.buf.find(CALL_START) {
                let text: String = self.buf.drain(..start).collect();
                self.emit(&text, &mut out);
                self.buf.drain(..CALL_START.len());
                self.in_call = true;
            } else {
                let keep = partial_match_len(&self.buf, CALL_START);
                let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.emit(&text, &mut out);
                return out;
            }
        }
    }

    /// Ends the answer: flushes held text (an unclosed `<tool_call>` block stays content).
    pub fn finish(&mut self) -> ToolCallDelta {
        let mut out = ToolCallDelta::default();
        let mut rest = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.in_call) {
            rest.insert_str(0, CALL_START);
        }
        self.emit(&rest, &mut out);
        if !self.had_calls {
            out.content.push_str(&std::mem::take(&mut self.pending_ws));
        }
        self.pending_ws.clear();
        out
    }
}
