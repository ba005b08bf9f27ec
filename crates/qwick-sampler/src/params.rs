use serde::{Deserialize, Serialize};
use std::fmt;

/// An error from invalid sampling parameters or unusable logits.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplingError {
    /// A parameter is out of its allowed range; the message names it and the range.
    InvalidParameter(String),
    /// The logits slice was empty.
    EmptyLogits,
    /// No logit was finite (all NaN or -inf), so nothing can be sampled.
    NoFiniteLogits,
    /// A token id is outside the logits slice.
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// The length of the logits slice.
        vocab: usize,
    },
}

impl fmt::Display for SamplingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidParameter(msg) => write!(f, "invalid sampling parameter: {msg}"),
            Self::EmptyLogits => write!(f, "cannot sample from an empty logits vector"),
            Self::NoFiniteLogits => write!(f, "cannot sample: every logit is NaN or -inf"),
            Self::TokenOutOfRange { token, vocab } => {
                write!(f, "token id {token} is outside the vocabulary of {vocab} logits")
            }
        }
    }
}

impl std::error::Error for SamplingError {}

/// How to pick the next token, in the terms of the OpenAI/vLLM APIs.
///
/// Missing fields take the [`Default`] values when deserialised, which disable every transform
/// (temperature 1, no top-k/top-p/min-p, no penalties).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy decoding. Must be finite and `>= 0`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` or `-1` disables it (as in vLLM).
    pub top_k: i32,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`; in `(0, 1]`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely token's; in `[0, 1]`.
    pub min_p: f32,
    /// Subtracted from the logit of every token that appears in the generated text; in `[-2, 2]`.
    pub presence_penalty: f32,
    /// Subtracted, times its count, from the logit of every token generated so far; in `[-2, 2]`.
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the prompt or output; `> 0`, `1` disables.
    pub repetition_penalty: f32,
    /// Seed of the sampler's random number generator; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` leaves the limit to the context length.
    pub max_tokens: Option<usize>,
    /// Strings that end generation when they appear in the output; they are not returned.
    pub stop: Vec<String>,
    /// Token ids that end generation, in addition to the model's end-of-sequence ids.
    pub stop_token_ids: Vec<u32>,
    /// Number of most likely tokens whose logprobs to return with each sampled token; `None` for no logprobs.
    pub logprobs: Option<usize>,
    /// Added to the logits of these tokens before sampling (after the penalties), each in
    /// `[-100, 100]` as OpenAI's `logit_bias`.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Qwen3's recommended settings with thinking on: temperature 0.6, top-p 0.95, top-k 20.
    pub fn qwen3_thinking() -> Self {
        Self { temperature: 0.6, top_p: 0.95, top_k: 20, ..Self::default() }
    }

    /// Qwen3's recommended settings with thinking off: temperature 0.7, top-p 0.8, top-k 20.
    pub fn qwen3_non_thinking() -> Self {
        Self { temperature: 0.7, top_p: 0.8, top_k: 20, ..Self::default() }
    }

    /// How many of the highest-ranked logits (higher first, ties to the lower id, NaN as
    /// -inf) sampling with these parameters reads: 1 when greedy, `top_k` with a top-k; `None`
    /// where it reads every logit (no top-k, penalties or a logit bias, which may lift a token
    /// from below, or logprobs, taken over the whole vocabulary). A row holding those logits
    /// and -inf elsewhere samples as the whole row does, draw for draw.
    pub fn candidates(&self) -> Option<usize> {
        let reshaped = self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || !self.logit_bias.is_empty();
        if reshaped || self.logprobs.is_some() {
            return None;
        }
        if self.is_greedy() {
            return Some(1);
        }
        usize::try_from(self.top_k).ok().filter(|&k| k > 0)
    }

    /// Whether these parameters select greedy decoding (temperature below `1e-5`).
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    /// Checks every parameter's range and returns the first problem found.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |msg: String| Err(SamplingError::InvalidParameter(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if self.top_k < -1 {
            return bad(format!("top_k must be >= 1, or 0 or -1 to disable it, got {}", self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&value) {
                return bad(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0 (1 disables it), got {}",
                self.repetition_penalty
            ));
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(format!("logit_bias values must be in [-100, 100], got {b} for token {t}"));
        }
        Ok(())
    }
}
