//! Generation of one sequence alone: [`generate`] drives a [`SeqGen`] through the scheduler,
//! streaming each token to a callback that can stop it (stop strings, Ctrl-C).

use crate::scheduler::{Collect, Event, Request, Scheduler};
use crate::sequence::{FinishReason, GenParams, GenToken, SeqGen};
use anyhow::{bail, Result};
use std::ops::ControlFlow;
use std::time::Instant;

/// A token as the [`generate`] callback sees it.
#[derive(Clone, Copy, Debug)]
pub struct TokenEvent {
    pub token: GenToken,
    /// Position in the output (0 for the first generated token).
    pub index: usize,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Output tokens (sampled and injected; a final stop token included), as passed to the callback.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache.
    pub cached_tokens: usize,
    /// Tokens chosen by the sampler (the rest were injected by the thinking budget).
    pub sampled_tokens: usize,
    /// Reasoning tokens counted against the thinking budget (0 without one).
    pub reasoning_tokens: usize,
    /// Seconds to compute the prompt and choose the first token.
    pub prefill_s: f64,
    /// Seconds after that, to the end.
    pub decode_s: f64,
    /// Forward steps after the prefill.
    pub decode_steps: usize,
}

impl Generation {
    /// Decode speed: output tokens after the first, per second of decode time.
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_s > 0.0 && self.tokens.len() > 1 {
            (self.tokens.len() - 1) as f64 / self.decode_s
        } else {
            0.0
        }
    }

    /// Prefill speed: prompt tokens computed (not from the prefix cache) per second.
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_s > 0.0 {
            (self.prompt_tokens - self.cached_tokens) as f64 / self.prefill_s
        } else {
            0.0
        }
    }
}

/// Generates from `prompt` as one request on `sched` — the scheduler, KV manager and prefix
/// cache the server uses, so a prompt that extends an earlier one (the next turn of a chat)
/// reuses its cached blocks — calling `on_token` for every output token as soon as it is chosen;
/// `Break` stops generation (finish `Aborted`, the token that broke included in the output).
pub fn generate(
    sched: &mut Scheduler,
    prompt: &[u32],
    params: GenParams,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    let gen = SeqGen::new(prompt, params)?;
    let sink = Collect::default();
    let start = Instant::now();
    sched.add(Request { gen, logprobs: None, adapter: 0 }, Box::new(sink.clone()));
    let mut out = Generation {
        tokens: vec![],
        finish: FinishReason::Aborted,
        prompt_tokens: prompt.len(),
        cached_tokens: 0,
        sampled_tokens: 0,
        reasoning_tokens: 0,
        prefill_s: 0.0,
        decode_s: 0.0,
        decode_steps: 0,
    };
    let mut prefill_s = None;
    'run: while sched.has_work() {
        sched.step();
        for event in sink.take() {
            match event {
                Event::Started { cached_tokens, .. } => out.cached_tokens = cached_tokens,
                // Neither asked for here.
                Event::PromptLogprobs(_) | Event::Pooled(_) => {}
                Event::Tokens(toks) => {
                    match prefill_s {
                        None => prefill_s = Some(start.elapsed().as_secs_f64()),
                        Some(_) => out.decode_steps += 1,
                    }
                    for t in toks {
                        let index = out.tokens.len();
                        out.tokens.push(t.token.id);
                        out.sampled_tokens += usize::from(!t.token.injected);
                        out.reasoning_tokens += usize::from(t.token.reasoning);
                        if on_token(&TokenEvent { token: t.token, index }).is_break() {
                            out.finish = FinishReason::Aborted;
                            sink.close();
                            // The next step drops the request and frees its blocks.
                            sched.step();
                            break 'run;
                        }
                    }
                }
                Event::Finished(f) => out.finish = f,
                Event::Error(e) => bail!("{e}"),
            }
        }
    }
    out.prefill_s = prefill_s.unwrap_or_else(|| start.elapsed().as_secs_f64());
    out.decode_s = start.elapsed().as_secs_f64() - out.prefill_s;
    Ok(out)
}
