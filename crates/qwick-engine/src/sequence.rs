//! A sequence's generation state: sampling, stop token ids, token and context limits, and a
//! thinking budget counted in tokens.
//!
//! [`SeqGen`] is given each step's logits and says which tokens to append and whether the
//! sequence is finished. It knows nothing of the runner, so a scheduler can drive many of them in
//! one batched step (and [`crate::generate::generate`] one alone).
//!
//! Text-level matters (detokenizing, stop strings, splitting reasoning from the answer) belong to
//! the caller.
//!
//! ## Thinking budget
//!
//! With a [`ThinkingBudget`], the tokens generated while the model thinks are counted, and when
//! the count reaches the budget the budget's stop tokens (the tokens of Qwen's "Considering the
//! limited time by the user, … </think>.\n\n") are appended to the sequence: they become part of
//! the context and of the output, and the model goes on with its answer.
//!
//! What counts as thinking: if the budget says the output starts in thinking
//! ([`ThinkingBudget::starts_in_thinking`], for a prompt rendered with thinking on), every
//! generated token is reasoning until the `</think>` token; otherwise reasoning starts after a
//! generated `<think>` token. A `<think>` token itself is not counted, nor is `</think>`. Once
//! `</think>` is generated or injected, nothing more is counted. A budget of 0 injects the stop
//! tokens before the first sampled token.

use anyhow::{anyhow, bail, Result};
use qwick_sampler::{mask_logits, Sampler, SamplingParams, TokenConstraint};
use std::collections::HashSet;
use std::sync::Arc;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (an end-of-sequence id or one of the stop token ids) was generated; it is the
    /// last output token.
    Stop,
    /// The token limit or the end of the context was reached.
    Length,
    /// The caller stopped it (the callback returned `Break`, e.g. a stop string or Ctrl-C).
    Aborted,
}

impl FinishReason {
    /// `"stop"`, `"length"` or `"aborted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "aborted",
        }
    }
}

/// A limit on reasoning tokens (see the module docs for what is counted).
#[derive(Clone, Debug)]
pub struct ThinkingBudget {
    /// Most reasoning tokens before the stop tokens are injected.
    pub max_tokens: usize,
    /// Whether the output starts inside reasoning (the prompt was rendered with thinking on);
    /// otherwise reasoning starts at a generated `think_start` token.
    pub starts_in_thinking: bool,
    /// The `<think>` token id (151667 for Qwen3), if the vocabulary has one.
    pub think_start: Option<u32>,
    /// The `</think>` token id (151668 for Qwen3): reasoning ends when it is generated.
    pub think_end: u32,
    /// Tokens injected when the reasoning so far is empty or its last token ends a line.
    pub stop_tokens: Vec<u32>,
    /// Tokens injected otherwise (the same text after a newline).
    pub stop_tokens_after_text: Vec<u32>,
    /// Token ids whose text ends with a newline.
    pub newline_tokens: Arc<HashSet<u32>>,
}

/// What to generate, besides the prompt.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Sampling; `max_tokens` caps the sampled tokens (`None`: until the context is full) and
    /// `stop_token_ids` end generation like `eos_token_ids`. `stop` strings are the caller's
    /// business (text level).
    pub sampling: SamplingParams,
    /// End-of-sequence ids (from generation_config.json and config.json).
    pub eos_token_ids: Vec<u32>,
    /// Most tokens (prompt + output) the sequence may hold: the model's context length, or less.
    pub max_context: usize,
    /// An optional limit on reasoning tokens.
    pub thinking: Option<ThinkingBudget>,
}

impl GenParams {
    /// Greedy decoding of at most `max_tokens` in a context of `max_context`, with no
    /// end-of-sequence ids and no thinking budget.
    pub fn greedy(max_tokens: Option<usize>, max_context: usize) -> GenParams {
        GenParams {
            sampling: SamplingParams { max_tokens, ..SamplingParams::greedy() },
            eos_token_ids: vec![],
            max_context,
            thinking: None,
        }
    }
}

/// One output token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenToken {
    pub id: u32,
    /// Appended by the thinking budget rather than sampled.
    pub injected: bool,
    /// Counted as reasoning (see the module docs).
    pub reasoning: bool,
}

/// What [`SeqGen::on_logits`] decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// New output tokens, in order. Unless finished, they must be appended to the sequence and
    /// computed by the next step (whose last logits go to the next `on_logits`).
    pub tokens: Vec<GenToken>,
    /// Set when the sequence is finished (the tokens above are its last).
    pub finish: Option<FinishReason>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Thinking {
    /// Waiting for a `<think>` token.
    Before,
    /// Reasoning, with this many tokens counted.
    In(usize),
    /// Reasoning ended (or never budgeted).
    Done,
}

/// The generation state of one sequence: its sampler, output, limits and thinking budget.
pub struct SeqGen {
    sampler: Sampler,
    /// A constraint on the output, and the token after which it applies (`None`: from the start).
    constraint: Option<(Box<dyn TokenConstraint>, Option<u32>)>,
    constraint_active: bool,
    /// The constraint's mask for the next token, computed ahead ([`SeqGen::prepare_mask`]).
    ready_mask: Option<std::result::Result<Vec<u32>, String>>,
    /// The sequence's tokens: the prompt, then the output.
    tokens: Vec<u32>,
    prompt_len: usize,
    stop_ids: Vec<u32>,
    max_sampled: usize,
    max_context: usize,
    sampled: usize,
    budget: Option<ThinkingBudget>,
    thinking: Thinking,
    last_reasoning: Option<u32>,
    reasoning_tokens: usize,
    finish: Option<FinishReason>,
}

impl SeqGen {
    /// Checks the parameters and that the prompt leaves room in the context.
    pub fn new(prompt: &[u32], params: GenParams) -> Result<SeqGen> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if params.max_context == 0 {
            bail!("the context length is 0");
        }
        if prompt.len() >= params.max_context {
            bail!(
                "the prompt has {} tokens, which leaves no room in the context of {} tokens",
                prompt.len(),
                params.max_context
            );
        }
        let max_sampled = params.sampling.max_tokens.unwrap_or(usize::MAX);
        let mut stop_ids = params.eos_token_ids.clone();
        stop_ids.extend(&params.sampling.stop_token_ids);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let sampler = Sampler::new(params.sampling).map_err(|e| anyhow!("{e}"))?;
        let thinking = match &params.thinking {
            None => Thinking::Done,
            Some(b) if b.starts_in_thinking => Thinking::In(0),
            Some(_) => Thinking::Before,
        };
        Ok(SeqGen {
            sampler,
            constraint: None,
            constraint_active: false,
            ready_mask: None,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            stop_ids,
            max_sampled,
            max_context: params.max_context,
            sampled: 0,
            budget: params.thinking,
            thinking,
            last_reasoning: None,
            reasoning_tokens: 0,
            finish: None,
        })
    }

    /// Constrains the output by `c` from the start, or once token `after` has come (the end of
    /// the reasoning: the model thinks freely, then answers under the constraint).
    pub fn constrain(&mut self, c: Box<dyn TokenConstraint>, after: Option<u32>) {
        self.constraint_active = after.is_none();
        self.constraint = Some((c, after));
        // A thinking budget's injected text ends at `</think>`: what follows is the answer's.
        if let Some(b) = &mut self.budget {
            for stop in [&mut b.stop_tokens, &mut b.stop_tokens_after_text] {
                if let Some(end) = stop.iter().position(|&t| t == b.think_end) {
                    stop.truncate(end + 1);
                }
            }
        }
    }

    /// How many of each step's highest-ranked logits deciding reads ([`SamplingParams::candidates`]);
    /// `None` (every logit) under a constraint, whose mask may exclude them all.
    pub fn candidates(&self) -> Option<usize> {
        if self.constraint.is_some() {
            return None;
        }
        self.sampler.params().candidates()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// Every output token so far (sampled and injected).
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The sequence's tokens: the prompt, then every output token so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens chosen by the sampler so far.
    pub fn sampled(&self) -> usize {
        self.sampled
    }

    /// Reasoning tokens counted so far against the budget.
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Whether reasoning is going on (counted against a budget).
    pub fn in_thinking(&self) -> bool {
        matches!(self.thinking, Thinking::In(_))
    }

    /// Tokens that may be drafted after the sequence's last token: each must fit in the context
    /// and leave one sampled token within the limit.
    pub fn draft_room(&self) -> usize {
        if self.finish.is_some() {
            return 0;
        }
        self.room().min(self.max_sampled.saturating_sub(self.sampled + 1))
    }

    fn room(&self) -> usize {
        self.max_context - self.tokens.len()
    }

    /// The budget's stop tokens, if reasoning has reached the budget now.
    fn budget_injection(&self) -> Option<Vec<u32>> {
        let b = self.budget.as_ref()?;
        match self.thinking {
            Thinking::In(n) if n >= b.max_tokens => {
                let after_line = self.last_reasoning.is_none_or(|t| b.newline_tokens.contains(&t));
                Some(if after_line { b.stop_tokens.clone() } else { b.stop_tokens_after_text.clone() })
            }
            _ => None,
        }
    }

    /// Appends injected tokens (as many as the context allows); returns whether they all fit.
    fn inject(&mut self, tokens: &[u32], out: &mut Vec<GenToken>) -> Result<bool> {
        let fit = tokens.len().min(self.room());
        for &t in &tokens[..fit] {
            self.tokens.push(t);
            out.push(GenToken { id: t, injected: true, reasoning: false });
            self.constraint_step(t)?;
        }
        self.thinking = Thinking::Done;
        Ok(fit == tokens.len())
    }

    /// Whether the next [`SeqGen::on_logits`] masks the logits by the constraint.
    pub fn needs_mask(&self) -> bool {
        self.constraint_active && self.ready_mask.is_none() && self.finish.is_none()
    }

    /// Computes the constraint's mask for the next token ahead of [`SeqGen::on_logits`], so that
    /// it can run while the model computes the logits (the engine calls it on another thread
    /// during the forward pass).
    pub fn prepare_mask(&mut self) {
        if !self.needs_mask() {
            return;
        }
        if let Some((c, _)) = &mut self.constraint {
            self.ready_mask = Some(c.allowed().map(|m| m.to_vec()));
        }
    }

    /// Feeds an output token to the constraint (once it applies), or starts the constraint after
    /// the token it waits for.
    fn constraint_step(&mut self, id: u32) -> Result<()> {
        self.ready_mask = None;
        let Some((c, after)) = &mut self.constraint else { return Ok(()) };
        if self.constraint_active {
            if self.stop_ids.binary_search(&id).is_err() {
                c.consume(id).map_err(|e| anyhow!("output constraint: {e}"))?;
            }
        } else if *after == Some(id) {
            self.constraint_active = true;
        }
        Ok(())
    }

    fn done(&mut self, tokens: Vec<GenToken>, finish: FinishReason) -> Decision {
        self.finish = Some(finish);
        Decision { tokens, finish: Some(finish) }
    }

    /// Takes the logits of the sequence's last token (`[vocab]`; penalties are applied to them in
    /// place) and decides the next tokens.
    pub fn on_logits(&mut self, logits: &mut [f32]) -> Result<Decision> {
        self.on_logits_draft(logits, None)
    }

    /// [`SeqGen::on_logits`] where a drafted token was proposed for the next position: it is
    /// checked by the speculative-sampling rule ([`Sampler::verify`], the draft taken as
    /// certain), so the token chosen has the distribution plain sampling would give it (greedy:
    /// the same token). The draft was kept when the decision's first token is the draft, not
    /// injected.
    pub fn on_logits_draft(&mut self, logits: &mut [f32], draft: Option<u32>) -> Result<Decision> {
        if let Some(f) = self.finish {
            return Ok(Decision { tokens: vec![], finish: Some(f) });
        }
        let mut tokens = Vec::new();
        // A budget of 0: stop thinking before sampling anything.
        if let Some(inject) = self.budget_injection() {
            if !self.inject(&inject, &mut tokens)? || self.room() == 0 {
                return Ok(self.done(tokens, FinishReason::Length));
            }
            return Ok(Decision { tokens, finish: None });
        }
        if self.constraint_active {
            if let Some((c, _)) = &mut self.constraint {
                match self.ready_mask.take() {
                    Some(ready) => mask_logits(logits, &ready.map_err(|e| anyhow!("output constraint: {e}"))?),
                    None => mask_logits(logits, c.allowed().map_err(|e| anyhow!("output constraint: {e}"))?),
                }
            }
        }
        let (prompt, output) = self.tokens.split_at(self.prompt_len);
        let id = match draft {
            Some(d) => self.sampler.verify(logits, prompt, output, d, &[(d, 1.0)]).map(|v| v.0),
            None => self.sampler.sample(logits, prompt, output),
        }
        .map_err(|e| anyhow!("{e}"))?;
        self.sampled += 1;
        self.tokens.push(id);
        self.constraint_step(id)?;
        let mut reasoning = false;
        if let Some(b) = &self.budget {
            match self.thinking {
                Thinking::Before if Some(id) == b.think_start => self.thinking = Thinking::In(0),
                Thinking::In(_) if id == b.think_end => self.thinking = Thinking::Done,
                Thinking::In(_) if Some(id) == b.think_start => {}
                Thinking::In(n) => {
                    self.thinking = Thinking::In(n + 1);
                    self.reasoning_tokens += 1;
                    self.last_reasoning = Some(id);
                    reasoning = true;
                }
                _ => {}
            }
        }
        tokens.push(GenToken { id, injected: false, reasoning });
        if self.stop_ids.binary_search(&id).is_ok() {
            return Ok(self.done(tokens, FinishReason::Stop));
        }
        if self.sampled >= self.max_sampled || self.room() == 0 {
            return Ok(self.done(tokens, FinishReason::Length));
        }
        if let Some(inject) = self.budget_injection() {
            if !self.inject(&inject, &mut tokens)? || self.room() == 0 {
                return Ok(self.done(tokens, FinishReason::Length));
            }
        }
        Ok(Decision { tokens, finish: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_tokens: Option<usize>, max_context: usize) -> GenParams {
        GenParams { eos_token_ids: vec![9], ..GenParams::greedy(max_tokens, max_context) }
    }

    /// Logits that make `id` the greedy choice.
    fn pick(id: u32) -> Vec<f32> {
        let mut l = vec![0.0; 16];
        l[id as usize] = 1.0;
        l
    }

    fn ids(d: &Decision) -> Vec<u32> {
        d.tokens.iter().map(|t| t.id).collect()
    }

    #[test]
    fn stops_on_eos_max_tokens_and_context() {
        let mut g = SeqGen::new(&[1, 2], params(None, 100)).unwrap();
        assert_eq!(g.on_logits(&mut pick(3)).unwrap().finish, None);
        let d = g.on_logits(&mut pick(9)).unwrap();
        assert_eq!((ids(&d), d.finish), (vec![9], Some(FinishReason::Stop)));
        assert_eq!(g.output(), &[3, 9]);

        let mut g = SeqGen::new(&[1, 2], params(Some(2), 100)).unwrap();
        assert_eq!(g.on_logits(&mut pick(3)).unwrap().finish, None);
        assert_eq!(g.on_logits(&mut pick(4)).unwrap().finish, Some(FinishReason::Length));

        let mut g = SeqGen::new(&[1, 2], params(None, 4)).unwrap();
        assert_eq!(g.on_logits(&mut pick(3)).unwrap().finish, None);
        assert_eq!(g.on_logits(&mut pick(4)).unwrap().finish, Some(FinishReason::Length));

        // An eos at the limit is a stop.
        let mut g = SeqGen::new(&[1, 2], params(Some(1), 100)).unwrap();
        assert_eq!(g.on_logits(&mut pick(9)).unwrap().finish, Some(FinishReason::Stop));
        // The prompt must leave room.
        assert!(SeqGen::new(&[1, 2, 3, 4], params(None, 4)).is_err());
        assert!(SeqGen::new(&[], params(None, 4)).is_err());
    }

    fn budget(max_tokens: usize, starts_in_thinking: bool) -> ThinkingBudget {
        ThinkingBudget {
            max_tokens,
            starts_in_thinking,
            think_start: Some(14),
            think_end: 15,
            stop_tokens: vec![12, 15],
            stop_tokens_after_text: vec![11, 12, 15],
            newline_tokens: Arc::new([11].into_iter().collect()),
        }
    }

    #[test]
    fn thinking_budget_injects_stop_tokens() {
        let mut p = params(None, 100);
        p.thinking = Some(budget(2, true));
        let mut g = SeqGen::new(&[1], p.clone()).unwrap();
        let d = g.on_logits(&mut pick(3)).unwrap();
        assert_eq!(ids(&d), vec![3]);
        assert!(d.tokens[0].reasoning && g.in_thinking());
        let d = g.on_logits(&mut pick(4)).unwrap();
        assert_eq!(ids(&d), vec![4, 11, 12, 15]);
        assert!(d.tokens[1..].iter().all(|t| t.injected && !t.reasoning));
        assert!(!g.in_thinking());
        assert_eq!(ids(&g.on_logits(&mut pick(5)).unwrap()), vec![5]);
        assert_eq!(g.reasoning_tokens(), 2);

        // After a newline token, no newline is added; a `<think>` token is not counted.
        let mut g = SeqGen::new(&[1], p.clone()).unwrap();
        g.on_logits(&mut pick(14)).unwrap();
        g.on_logits(&mut pick(3)).unwrap();
        assert_eq!(ids(&g.on_logits(&mut pick(11)).unwrap()), vec![11, 12, 15]);

        // The model closing its thinking in time: nothing injected.
        let mut g = SeqGen::new(&[1], p.clone()).unwrap();
        g.on_logits(&mut pick(3)).unwrap();
        assert_eq!(ids(&g.on_logits(&mut pick(15)).unwrap()), vec![15]);
        assert_eq!(ids(&g.on_logits(&mut pick(4)).unwrap()), vec![4]);

        // Not starting in thinking: counting begins at `<think>`.
        p.thinking = Some(budget(1, false));
        let mut g = SeqGen::new(&[1], p.clone()).unwrap();
        assert_eq!(ids(&g.on_logits(&mut pick(3)).unwrap()), vec![3]);
        assert_eq!(ids(&g.on_logits(&mut pick(14)).unwrap()), vec![14]);
        assert_eq!(ids(&g.on_logits(&mut pick(3)).unwrap()), vec![3, 11, 12, 15]);

        // A budget of 0 injects before sampling.
        p.thinking = Some(budget(0, true));
        let mut g = SeqGen::new(&[1], p.clone()).unwrap();
        let d = g.on_logits(&mut pick(3)).unwrap();
        assert_eq!((ids(&d), d.finish), (vec![12, 15], None));
        assert_eq!(g.sampled(), 0);
        assert_eq!(ids(&g.on_logits(&mut pick(3)).unwrap()), vec![3]);

        // Injection cut by the context.
        p.thinking = Some(budget(1, true));
        p.max_context = 4;
        let mut g = SeqGen::new(&[1], p).unwrap();
        let d = g.on_logits(&mut pick(3)).unwrap();
        assert_eq!((ids(&d), d.finish), (vec![3, 11, 12], Some(FinishReason::Length)));
    }

    #[test]
    fn invalid_sampling_is_an_error() {
        let mut p = params(None, 100);
        p.sampling.top_p = 1.5;
        let e = SeqGen::new(&[1], p).err().unwrap().to_string();
        assert!(e.contains("top_p"), "{e}");
    }

    /// Allows only tokens above the last one taken (and eos 9), counting mask computations.
    struct Rising {
        last: u32,
        masks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        mask: Vec<u32>,
    }

    impl TokenConstraint for Rising {
        fn allowed(&mut self) -> std::result::Result<&[u32], String> {
            self.masks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.mask = vec![0];
            for t in (self.last + 1..16).chain([9]) {
                self.mask[0] |= 1 << t;
            }
            Ok(&self.mask)
        }
        fn consume(&mut self, token: u32) -> std::result::Result<(), String> {
            self.last = token;
            Ok(())
        }
    }

    #[test]
    fn a_mask_prepared_ahead_is_the_one_used() {
        let run = |prepare: bool| {
            let masks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut g = SeqGen::new(&[1], params(Some(4), 100)).unwrap();
            g.constrain(Box::new(Rising { last: 4, masks: masks.clone(), mask: vec![] }), None);
            let mut out = vec![];
            // (the model's first choice, its second): 3 and 6 are not allowed when they come.
            for (want, second) in [(3, 10), (12, 11), (6, 13), (14, 2)] {
                assert!(g.needs_mask());
                if prepare {
                    g.prepare_mask();
                    assert!(!g.needs_mask());
                }
                let mut l = pick(want);
                l[second] = 0.5;
                out.extend(ids(&g.on_logits(&mut l).unwrap()));
            }
            (out, masks.load(std::sync::atomic::Ordering::Relaxed))
        };
        assert_eq!(run(false), (vec![10, 12, 13, 14], 4));
        assert_eq!(run(true), run(false));
    }
}
