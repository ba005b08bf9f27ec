use crate::params::{SamplingError, SamplingParams};
use crate::rng::Rng;
use std::cmp::Ordering;

/// The log-probabilities reported with a sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token the logprob is for.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Samples tokens from logits according to [`SamplingParams`], with its own seeded generator and
/// reusable scratch space (so a step allocates nothing once warm).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: Vec<u32>,
    ids: Vec<u32>,
    weights: Vec<f64>,
    raw: Vec<f32>,
}

/// What is left to draw from once the transforms are applied.
#[derive(Clone, Copy)]
enum Pool {
    /// Greedy: this token.
    One(u32),
    /// Every token, weighted by `weights[id]` (the arg-max is given).
    All(u32),
    /// The first `n` of `ids`, weighted by `weights`.
    Top(usize),
}

/// NaN sorts as -inf so that a broken logit never wins.
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Whether token `a` ranks before token `b`: higher logit first, then lower id.
fn ranks_before(logits: &[f32], a: u32, b: u32) -> bool {
    let (la, lb) = (key(logits[a as usize]), key(logits[b as usize]));
    la > lb || (la == lb && a < b)
}

fn rank_cmp(logits: &[f32], a: u32, b: u32) -> Ordering {
    if a == b {
        Ordering::Equal
    } else if ranks_before(logits, a, b) {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// Fills `out` with the ids of the `n` best-ranked logits, best first, without sorting the whole vocabulary.
fn top_ids_into(logits: &[f32], n: usize, out: &mut Vec<u32>) {
    out.clear();
    let n = n.min(logits.len());
    if n == 0 {
        return;
    }
    if n <= 64 {
        // One pass keeping a small sorted list; insertions are rare once it holds good candidates.
        for i in 0..logits.len() as u32 {
            if out.len() == n {
                if !ranks_before(logits, i, out[n - 1]) {
                    continue;
                }
                out.pop();
            }
            let pos = out.partition_point(|&j| ranks_before(logits, j, i));
            out.insert(pos, i);
        }
    } else {
        out.extend(0..logits.len() as u32);
        out.select_nth_unstable_by(n - 1, |&a, &b| rank_cmp(logits, a, b));
        out.truncate(n);
        out.sort_unstable_by(|&a, &b| rank_cmp(logits, a, b));
    }
}

/// The id of the largest logit (ties: lowest id), or an error when none is finite.
fn argmax(logits: &[f32]) -> Result<u32, SamplingError> {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate().skip(1) {
        if key(x) > key(logits[best]) {
            best = i;
        }
    }
    if key(logits[best]) == f32::NEG_INFINITY {
        return Err(SamplingError::NoFiniteLogits);
    }
    Ok(best as u32)
}

const PROMPT_BIT: u32 = 1 << 31;

/// Applies the penalties, then the logit bias, using `counts`, a scratch vector that is all zeros
/// on entry and on return.
fn penalize(
    logits: &mut [f32],
    prompt_tokens: &[u32],
    output_tokens: &[u32],
    params: &SamplingParams,
    counts: &mut Vec<u32>,
) {
    let rep = params.repetition_penalty;
    let (freq, pres) = (params.frequency_penalty, params.presence_penalty);
    if rep != 1.0 || freq != 0.0 || pres != 0.0 {
        let vocab = logits.len();
        if counts.len() < vocab {
            counts.resize(vocab, 0);
        }
        for &t in output_tokens {
            if let Some(c) = counts[..vocab].get_mut(t as usize) {
                *c = (*c + 1).min(PROMPT_BIT - 1);
            }
        }
        if rep != 1.0 {
            for &t in prompt_tokens {
                if (t as usize) < vocab {
                    counts[t as usize] |= PROMPT_BIT;
                }
            }
        }
        for &t in output_tokens.iter().chain(prompt_tokens) {
            let t = t as usize;
            if t >= vocab || counts[t] == 0 {
                continue;
            }
            let c = std::mem::take(&mut counts[t]);
            let n = c & !PROMPT_BIT;
            let logit = &mut logits[t];
            // vLLM's order: repetition penalty on prompt ∪ output, then frequency and presence on the output.
            if rep != 1.0 {
                *logit = if *logit > 0.0 { *logit / rep } else { *logit * rep };
            }
            if n > 0 {
                *logit -= freq * n as f32 + pres;
            }
        }
    }
    // Then the caller's logit bias.
    for &(t, b) in &params.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

/// Applies the repetition penalty (to tokens in `prompt_tokens` or `output_tokens`) and the frequency
/// and presence penalties (to tokens in `output_tokens`) to `logits` in place, as vLLM does, then
/// adds the logit bias. Token ids outside `logits` are ignored.
pub fn apply_penalties(logits: &mut [f32], prompt_tokens: &[u32], output_tokens: &[u32], params: &SamplingParams) {
    penalize(logits, prompt_tokens, output_tokens, params, &mut Vec::new());
}

/// Log-probability of `token` and of the `top_n` most likely tokens under `softmax(logits)`.
///
/// Pass the raw model output to get vLLM's default (`raw_logprobs`): before penalties and temperature.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> Result<TokenLogprobs, SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let vocab = logits.len();
    let Some(&chosen) = logits.get(token as usize) else {
        return Err(SamplingError::TokenOutOfRange { token, vocab });
    };
    let max = key(logits[argmax(logits)? as usize]) as f64;
    let sum: f64 = logits.iter().map(|&x| (key(x) as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |x: f32| (key(x) as f64 - lse) as f32;
    let mut ids = Vec::with_capacity(top_n.min(vocab));
    top_ids_into(logits, top_n, &mut ids);
    Ok(TokenLogprobs { token, logprob: lp(chosen), top: ids.iter().map(|&i| (i, lp(logits[i as usize]))).collect() })
}

impl Sampler {
    /// A sampler for `params` after validating them; seeded from `params.seed` or the clock.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::seed_from_u64);
        Ok(Self { params, rng, counts: Vec::new(), ids: Vec::new(), weights: Vec::new(), raw: Vec::new() })
    }

    /// The parameters this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token.
    ///
    /// `prompt_tokens` and `output_tokens` (the tokens generated so far) feed the penalties: the
    /// repetition penalty applies to both, frequency and presence penalties to the output only, as in
    /// vLLM. The penalties are applied to `logits` in place; the other transforms are not written back.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt_tokens: &[u32],
        output_tokens: &[u32],
    ) -> Result<u32, SamplingError> {
        match self.pool(logits, prompt_tokens, output_tokens)? {
            Pool::One(best) => Ok(best),
            pool => {
                let u = self.rng.next_f64();
                Ok(self.draw(pool, u, |_, w| w))
            }
        }
    }

    /// Checks a drafted token against the distribution [`Sampler::sample`] would draw from (the
    /// speculative-sampling rule): `draft` was proposed with probability `q(draft)`, where `q`
    /// lists the draft's distribution as (token, probability) pairs (a deterministic draft is
    /// `[(draft, 1.0)]`). The draft is kept with probability `min(1, p(draft) / q(draft))`;
    /// otherwise a token is drawn from the residual `max(0, p − q)`, normalised. Either way the
    /// token returned is distributed as `p`, whatever `q` is. Returns the token and whether it is
    /// the draft. Greedy parameters keep the draft exactly when it is the arg-max.
    pub fn verify(
        &mut self,
        logits: &mut [f32],
        prompt_tokens: &[u32],
        output_tokens: &[u32],
        draft: u32,
        q: &[(u32, f64)],
    ) -> Result<(u32, bool), SamplingError> {
        let pool = self.pool(logits, prompt_tokens, output_tokens)?;
        if let Pool::One(best) = pool {
            return Ok((best, best == draft));
        }
        let q_of = |t: u32| q.iter().filter(|e| e.0 == t).map(|e| e.1).sum::<f64>();
        let (total, p_draft) = self.mass(pool, draft);
        let q_draft = q_of(draft);
        let keep = if q_draft <= 0.0 {
            false
        } else {
            let ratio = p_draft / total / q_draft;
            ratio >= 1.0 || self.rng.next_f64() < ratio
        };
        if keep {
            return Ok((draft, true));
        }
        // The residual max(0, p − q), as weights on the pool's scale.
        let residual = |t: u32, w: f64| (w - q_of(t) * total).max(0.0);
        let (rest, _) = self.mass_by(pool, residual);
        let u = self.rng.next_f64();
        let t = if rest > 0.0 { self.draw(pool, u, residual) } else { self.draw(pool, u, |_, w| w) };
        Ok((t, t == draft))
    }

    /// Applies the penalties and the transforms; leaves the candidates in `ids` / `weights`.
    fn pool(
        &mut self,
        logits: &mut [f32],
        prompt_tokens: &[u32],
        output_tokens: &[u32],
    ) -> Result<Pool, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        penalize(logits, prompt_tokens, output_tokens, &self.params, &mut self.counts);
        let best = argmax(logits)?;
        if self.params.is_greedy() {
            return Ok(Pool::One(best));
        }
        let p = &self.params;
        let vocab = logits.len();
        let max = logits[best as usize] as f64;
        let inv_t = 1.0 / p.temperature as f64;
        // Weights relative to the most likely token, which has weight 1.
        let weight = |x: f32| ((key(x) as f64 - max) * inv_t).exp();
        let top_k = usize::try_from(p.top_k).ok().filter(|&k| k > 0 && k < vocab);
        let min_w = p.min_p as f64;

        if top_k.is_none() && p.top_p >= 1.0 {
            // Every token is a candidate: no sorting needed, min-p is a plain threshold.
            self.weights.clear();
            self.weights.extend(logits.iter().map(|&x| {
                let w = weight(x);
                if w >= min_w {
                    w
                } else {
                    0.0
                }
            }));
            return Ok(Pool::All(best));
        }

        // Sorted candidates: the top-k, or (top-p alone) a growing prefix until it holds top_p of the mass.
        let total_all = if top_k.is_none() { logits.iter().map(|&x| weight(x)).sum::<f64>() } else { 0.0 };
        let mut n = top_k.unwrap_or(64.min(vocab));
        let target = loop {
            top_ids_into(logits, n, &mut self.ids);
            self.weights.clear();
            self.weights.extend(self.ids.iter().map(|&i| weight(logits[i as usize])));
            let mass: f64 = self.weights.iter().sum();
            if top_k.is_some() {
                break mass * p.top_p as f64;
            }
            let target = total_all * p.top_p as f64;
            if mass >= target || n == vocab {
                break target;
            }
            n = (n * 8).min(vocab);
        };
        // Top-p: the smallest prefix reaching the target mass; min-p: weights of at least min_p.
        let mut keep = 0;
        let mut cum = 0.0;
        for &w in &self.weights {
            if w < min_w || w == 0.0 {
                break;
            }
            keep += 1;
            cum += w;
            if p.top_p < 1.0 && cum >= target {
                break;
            }
        }
        Ok(Pool::Top(keep.max(1)))
    }

    /// The pool's candidates with their weights, as `f(token, weight)` reweighs them.
    fn each(&self, pool: Pool) -> impl Iterator<Item = (u32, f64)> + '_ {
        let (ids, weights): (&[u32], &[f64]) = match pool {
            Pool::One(_) => (&[], &[]),
            Pool::All(_) => (&[], &self.weights),
            Pool::Top(keep) => (&self.ids[..keep], &self.weights[..keep]),
        };
        let one = match pool {
            Pool::One(best) => Some((best, 1.0)),
            _ => None,
        };
        let dense = matches!(pool, Pool::All(_));
        one.into_iter().chain(weights.iter().enumerate().map(move |(i, &w)| (if dense { i as u32 } else { ids[i] }, w)))
    }

    /// The pool's total weight under `f`, and `f`'s weight of the last candidate visited.
    fn mass_by(&self, pool: Pool, f: impl Fn(u32, f64) -> f64) -> (f64, f64) {
        self.each(pool).fold((0.0, 0.0), |(t, _), (id, w)| {
            let w = f(id, w);
            (t + w, w)
        })
    }

    /// The pool's total weight and the weight of `token` (0 outside the pool).
    fn mass(&self, pool: Pool, token: u32) -> (f64, f64) {
        self.each(pool).fold((0.0, 0.0), |(t, w_tok), (id, w)| (t + w, if id == token { w } else { w_tok }))
    }

    /// Draws from the pool with weights `f(token, weight)`, for a uniform `u` in [0, 1).
    fn draw(&self, pool: Pool, u: f64, f: impl Fn(u32, f64) -> f64) -> u32 {
        let (total, _) = self.mass_by(pool, &f);
        let mut u = u * total;
        let mut last = None;
        for (id, w) in self.each(pool) {
            let w = f(id, w);
            if w > 0.0 {
                if u < w {
                    return id;
                }
                u -= w;
                last = Some(id);
            }
        }
        // Rounding left `u` past the end: the last candidate with weight.
        last.unwrap_or(match pool {
            Pool::One(best) | Pool::All(best) => best,
            Pool::Top(_) => self.ids[0],
        })
    }

    /// Like [`Sampler::sample`], and also returns the chosen token's logprobs (with the `top_n` most
    /// likely tokens) computed from the logits as passed in, before penalties and temperature.
    pub fn sample_with_logprobs(
        &mut self,
        logits: &mut [f32],
        prompt_tokens: &[u32],
        output_tokens: &[u32],
        top_n: usize,
    ) -> Result<(u32, TokenLogprobs), SamplingError> {
        let mut raw = std::mem::take(&mut self.raw);
        raw.clear();
        raw.extend_from_slice(logits);
        let result = self
            .sample(logits, prompt_tokens, output_tokens)
            .and_then(|token| Ok((token, logprobs(&raw, token, top_n)?)));
        self.raw = raw;
        result
    }
}
