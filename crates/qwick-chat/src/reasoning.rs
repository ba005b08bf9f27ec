use qwick_sampler::partial_match_len;

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// Text the Qwen3 technical report (§4.3) inserts when thinking reaches its budget, so that the
/// model closes its reasoning and answers.
pub const THINKING_BUDGET_STOP: &str = "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>.\n\n";

/// A piece of generated text split into reasoning and answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    /// Text inside `<think>...</think>`.
    pub reasoning: String,
    /// Text of the answer.
    pub content: String,
}

impl ReasoningDelta {
    /// Whether both parts are empty.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: `<think>` (after optional whitespace) opens reasoning, anything else is answer.
    Start,
    /// Just inside reasoning: newlines and a repeated `<think>` are dropped.
    ReasoningStart,
    Reasoning,
    /// Just after `</think>`: newlines are dropped.
    AnswerStart,
    Answer,
}

/// Splits streamed Qwen3 output into reasoning and answer at `<think>` / `</think>`, whether the
/// tags arrive as whole tokens or split across deltas at any position.
///
/// What it does with whitespace: newlines right after `<think>` and right before `</think>` are
/// left out of the reasoning, and newlines right after `</think>` are left out of the answer
/// (Qwen3 writes `<think>\n...\n</think>\n\n`; the chat template strips the same newlines when it
/// renders the turn again). vLLM's qwen3 parser keeps them; everything else is passed unchanged.
///
/// - `starts_in_reasoning = false` (Qwen3 with thinking on or off): output that starts with
///   `<think>` is reasoning up to `</think>`; output that does not (thinking off: the prompt ended
///   in `<think>\n\n</think>\n\n`) is all answer.
/// - `starts_in_reasoning = true` (the prompt already ends in `<think>\n`): everything up to
///   `</think>` is reasoning.
///
/// A stream that ends inside reasoning (no `</think>`, e.g. cut by `max_tokens`) is all reasoning.
#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    buf: String,
}

impl ReasoningParser {
    /// A parser for one generation.
    pub fn new(starts_in_reasoning: bool) -> Self {
        Self { state: if starts_in_reasoning { State::ReasoningStart } else { State::Start }, buf: String::new() }
    }

    /// Whether the text so far is reasoning (for counting reasoning tokens against a budget).
    pub fn in_reasoning(&self) -> bool {
        matches!(self.state, State::ReasoningStart | State::Reasoning)
    }

    /// Feeds the next text delta; returns what can be emitted now (text that might be part of a
    /// tag is held back).
    pub fn push(&mut self, delta: &str) -> ReasoningDelta {
        self.buf.push_str(delta);
        let mut out = ReasoningDelta::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_START) {
                        self.buf = rest.to_string();
                        self.state = State::ReasoningStart;
                    } else if THINK_START.starts_with(t) {
                        return out;
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::ReasoningStart => {
                    let t = self.buf.trim_start_matches('\n');
                    if let Some(rest) = t.strip_prefix(THINK_START) {
                        self.buf = rest.to_string();
                    } else {
                        let partial = THINK_START.starts_with(t);
                        self.buf = t.to_string();
                        if partial {
                            return out;
                        }
                        self.state = State::Reasoning;
                    }
                }
                State::Reasoning => {
                    if let Some(i) = self.buf.find(THINK_END) {
                        out.reasoning.push_str(self.buf[..i].trim_end_matches('\n'));
                        self.buf.drain(..i + THINK_END.len());
                        self.state = State::AnswerStart;
                        continue;
                    }
                    // Hold back a possible partial `</think>` and the newlines before it.
                    let partial = partial_match_len(&self.buf, THINK_END);
                    let emit = self.buf[..self.buf.len() - partial].trim_end_matches('\n').len();
                    out.reasoning.push_str(&self.buf[..emit]);
                    self.buf.drain(..emit);
                    return out;
                }
                State::AnswerStart => {
                    let t = self.buf.trim_start_matches('\n');
                    if t.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    self.buf = t.to_string();
                    self.state = State::Answer;
                }
                State::Answer => {
                    out.content.push_str(&self.buf);
                    self.buf.clear();
                    return out;
                }
            }
        }
    }

    /// Ends the stream: returns the held-back text (reasoning if the stream ended inside it).
    pub fn finish(&mut self) -> ReasoningDelta {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Start | State::Answer => ReasoningDelta { content: rest, ..ReasoningDelta::default() },
            State::ReasoningStart | State::Reasoning => ReasoningDelta { reasoning: rest, ..ReasoningDelta::default() },
            State::AnswerStart => ReasoningDelta::default(),
        }
    }
}

/// Splits a whole generated text into reasoning and answer (see [`ReasoningParser`]).
pub fn split_reasoning(text: &str, starts_in_reasoning: bool) -> ReasoningDelta {
    let mut parser = ReasoningParser::new(starts_in_reasoning);
    let mut out = parser.push(text);
    let rest = parser.finish();
    out.reasoning.push_str(&rest.reasoning);
    out.content.push_str(&rest.content);
    out
}

/// A limit on thinking tokens, enforced as in the Qwen3 technical report: once the reasoning
/// reaches the budget, [`THINKING_BUDGET_STOP`] is inserted into the output and the model answers.
///
/// A budget of 0 means thinking off: render the prompt with `enable_thinking = false` (and if a
/// model reasons anyway, [`stop_text`](Self::stop_text) asks to stop at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkingBudget {
    /// Most reasoning tokens allowed.
    pub max_tokens: usize,
}

impl ThinkingBudget {
    /// A budget of `max_tokens` reasoning tokens.
    pub fn new(max_tokens: usize) -> Self {
        Self { max_tokens }
    }

    /// Whether thinking is on at all (the budget is not zero).
    pub fn thinking_enabled(&self) -> bool {
        self.max_tokens > 0
    }

    /// The text to insert now, given the reasoning tokens generated so far and the reasoning text
    /// so far; `None` while under the budget. The text is [`THINKING_BUDGET_STOP`], preceded by a
    /// newline when the reasoning does not already end with one.
    pub fn stop_text(&self, reasoning_tokens: usize, reasoning_so_far: &str) -> Option<String> {
        if reasoning_tokens < self.max_tokens {
            return None;
        }
        let newline = if reasoning_so_far.is_empty() || reasoning_so_far.ends_with('\n') { "" } else { "\n" };
        Some(format!("{newline}{THINKING_BUDGET_STOP}"))
    }
}
