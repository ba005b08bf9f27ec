//! Continuous batching: many requests share the runner, one mixed batch per step.
//!
//! Each [`Scheduler::step`] builds one batch under a token budget (`max_num_batched_tokens`):
//! running sequences go first, oldest first (a decode token each, or the next chunk of a prompt
//! being computed), then waiting sequences are admitted (up to `max_num_seqs` running) and
//! prefill as much of their prompt as the budget leaves, so a long prompt is computed in chunks
//! over several steps and never stalls the others. KV blocks are allocated on demand by the
//! runner and freed when a sequence finishes, fails or its receiver goes away. When the cache
//! runs out of blocks, unreferenced prefix-cache blocks are evicted first (least recently used),
//! then the newest running sequences are preempted: their blocks are freed and they go back to
//! the front of the queue, to be recomputed later from their prompt and output so far (their
//! sampler state is kept, so the output is the same as if they had not been preempted).
//!
//! ## Prefix caching
//!
//! Every full block a sequence computes is registered under the hash of its whole token prefix
//! (a chain: the block's tokens and its parent's hash; the tokens are kept and compared, so a hash
//! collision cannot share a wrong block). A new sequence looks up its prompt block by block and
//! starts from the longest cached prefix (always leaving at least one token to compute, so shared
//! blocks are never written). The cache holds one reference on each block it keeps; a block only
//! the cache references is free to evict.
//!
//! ## Prompt logprobs
//!
//! A request submitted with prompt logprobs ([`Engine::submit_with`]) computes its whole prompt
//! (no prefix-cache lookup: it needs the logits of every position), in chunks of at most
//! [`PROMPT_LOGPROBS_CHUNK`] tokens that return all their logits; each position's logits give the
//! logprob of the next prompt token. They go out in one [`Event::PromptLogprobs`] before the first
//! output token, which is sampled from the last position's logits as usual.
//!
//! [`Engine`] runs a scheduler on its own thread: requests come in through [`Engine::submit`],
//! and each request's [`Event`]s go out through its [`EventSink`].

use crate::generate::{FinishReason, GenToken, SeqGen};
use crate::kv_manager::ROOT_HASH;

/// The hash cached prefixes of a request with LoRA adapter `adapter` start from: K/V computed
/// with one adapter is never reused for another.
fn root_hash(adapter: u16) -> u64 {
    ROOT_HASH ^ (adapter as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
use crate::runner::{Logits, Runner, SeqId, Span};
use anyhow::{anyhow, Result};
use qwick_sampler::TokenLogprobs;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Most tokens of a prefill chunk that returns the logits of every position (for prompt
/// logprobs), which bounds the memory of those logits.
pub const PROMPT_LOGPROBS_CHUNK: usize = 256;

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most tokens (prefill and decode) in one step.
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most requests waiting to start; [`Engine::submit`] refuses more.
    pub max_waiting: usize,
    /// Reuse cached KV blocks of identical prompt prefixes.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { max_num_batched_tokens: 2048, max_num_seqs: 256, max_waiting: 1024, prefix_caching: true }
    }
}

/// A generation request: its prompt and parameters live in the [`SeqGen`].
pub struct Request {
    pub gen: SeqGen,
    /// The model's LoRA adapter to run with (0: the model's default). Cached prompt prefixes
    /// are shared only between requests of the same adapter.
    pub adapter: u16,
    /// Return the log-probability of each sampled token (before penalties and temperature) with
    /// this many most likely alternatives; `None` for none.
    pub logprobs: Option<usize>,
}

/// An output token and, if asked for, its logprobs (none for injected tokens).
#[derive(Clone, Debug)]
pub struct OutToken {
    pub token: GenToken,
    pub logprobs: Option<TokenLogprobs>,
}

/// What a request's sink receives, in this order: `Started` once, `PromptLogprobs` once if asked
/// for, `Tokens` any number of times,
/// then `Finished` or `Error` (nothing after them).
#[derive(Clone, Debug)]
pub enum Event {
    /// The request was admitted for the first time.
    Started {
        prompt_tokens: usize,
        /// Prompt tokens found in the prefix cache (not computed).
        cached_tokens: usize,
    },
    /// The prompt's logprobs, once, before the first `Tokens` (only when asked for): entry `i` is
    /// prompt token `i`'s logprob given the tokens before it, with the most likely alternatives
    /// there; the first entry is `None` (nothing predicts it).
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// New output tokens, in order.
    Tokens(Vec<OutToken>),
    /// Generation ended (`Stop` or `Length`).
    Finished(FinishReason),
    /// Generation failed; the message says why.
    Error(String),
}

/// Where a request's events go (a channel to an HTTP handler).
pub trait EventSink: Send {
    /// Delivers an event; `false` when the receiver is gone (the request is then dropped).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (checked before every step).
    fn is_closed(&self) -> bool;
}

/// What the scheduler is doing, for metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    /// Blocks referenced by sequences (not counting blocks only the prefix cache keeps).
    pub kv_blocks_used: usize,
    /// Blocks kept by the prefix cache (in use or not).
    pub kv_blocks_cached: usize,
    pub block_size: usize,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Tokens computed by all steps.
    pub batched_tokens: u64,
    /// Seconds spent in steps, and of those in the model's forward pass; the rest is
    /// scheduling, sampling and handing tokens to requests.
    pub step_seconds: f64,
    pub forward_seconds: f64,
    /// What is wrong with the KV bookkeeping, if anything ([`Scheduler::check_kv`], checked
    /// whenever the scheduler is idle).
    pub kv_inconsistency: Option<String>,
}

/// One span of a step: (index into `running`, the span, tokens cached before it, whether it
/// ends the sequence's pending tokens).
type PlannedSpan = (usize, Span, usize, bool);

/// What a step computes, as it is planned.
struct StepPlan {
    /// Tokens the step may still take.
    budget: usize,
    /// Blocks promised to the spans planned so far.
    reserved: usize,
    spans: Vec<PlannedSpan>,
}

struct Entry {
    gen: SeqGen,
    sink: Box<dyn EventSink>,
    logprobs: Option<usize>,
    /// Compute the prompt's logprobs with this many alternatives.
    prompt_logprobs: Option<usize>,
    /// Prompt logprobs computed so far (while prefilling).
    prompt_lps: Vec<Option<TokenLogprobs>>,
    /// Prompt logprobs were sent.
    prompt_lps_sent: bool,
    /// The runner's sequence while running.
    seq: Option<SeqId>,
    started: bool,
    /// Leading blocks of the sequence already offered to the prefix cache, and the hash of that prefix.
    registered: usize,
    last_hash: u64,
    adapter: u16,
}

impl Entry {
    /// Still needs the logits of every prompt position.
    fn wants_prompt_lps(&self) -> bool {
        self.prompt_logprobs.is_some() && !self.prompt_lps_sent
    }

    fn all_tokens(&self) -> Vec<u32> {
        let mut t = self.gen.prompt().to_vec();
        t.extend_from_slice(self.gen.output());
        t
    }
}

/// The scheduler: waiting and running requests over one runner.
pub struct Scheduler {
    runner: Runner,
    cfg: SchedulerConfig,
    waiting: VecDeque<Entry>,
    /// Oldest first.
    running: Vec<Entry>,
    stats: SchedulerStats,
    fault: Option<Fault>,
}

/// A fault injected on purpose (tests only; set with `QWICK_FAULT`, see [`Fault::from_env`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass of step `n` (counting from 1) panics.
    StepPanic(u64),
    /// Step `n` panics after its forward pass, while handling its results.
    EnginePanic(u64),
    /// The engine thread ends at step `n`, as if it could not go on.
    EngineExit(u64),
}

impl Fault {
    /// `QWICK_FAULT=step-panic:N|engine-panic:N|engine-exit:N`: for tests that prove the
    /// engine survives its own faults. Unset (or anything else) injects nothing.
    pub fn from_env() -> Option<Fault> {
        let v = std::env::var("QWICK_FAULT").ok()?;
        let (kind, n) = v.split_once(':')?;
        let n: u64 = n.parse().ok()?;
        match kind {
            "step-panic" => Some(Fault::StepPanic(n)),
            "engine-panic" => Some(Fault::EnginePanic(n)),
            "engine-exit" => Some(Fault::EngineExit(n)),
            _ => None,
        }
    }
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Scheduler {
    pub fn new(runner: Runner, cfg: SchedulerConfig) -> Scheduler {
        let mut cfg = cfg;
        cfg.max_num_batched_tokens = cfg.max_num_batched_tokens.max(1);
        cfg.max_num_seqs = cfg.max_num_seqs.max(1);
        let stats = SchedulerStats {
            kv_blocks_total: runner.blocks().num_blocks(),
            block_size: runner.block_size(),
            ..SchedulerStats::default()
        };
        Scheduler { runner, cfg, waiting: VecDeque::new(), running: vec![], stats, fault: None }
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// Injects a fault (tests only).
    pub fn inject(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// Ends every running request with an error and frees its blocks (after a fault left their
    /// state unknown); waiting requests stay queued.
    pub fn fail_running(&mut self, message: &str) {
        for mut e in std::mem::take(&mut self.running) {
            self.free(&mut e);
            e.sink.send(Event::Error(message.to_string()));
        }
    }

    /// Whether the injected fault ends the engine at this point.
    pub fn exit_now(&self) -> bool {
        self.fault == Some(Fault::EngineExit(self.stats.steps + 1))
    }

    /// Tokens the KV cache holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.runner.blocks().num_blocks() * self.runner.block_size()
    }

    /// Queues a request.
    pub fn add(&mut self, req: Request, sink: Box<dyn EventSink>) {
        self.add_with(req, None, sink);
    }

    /// Queues a request that also gets its prompt's logprobs with `prompt_logprobs` alternatives
    /// (see [`Event::PromptLogprobs`]); `None` for none, as [`Scheduler::add`].
    pub fn add_with(&mut self, req: Request, prompt_logprobs: Option<usize>, sink: Box<dyn EventSink>) {
        self.waiting.push_back(Entry {
            gen: req.gen,
            sink,
            logprobs: req.logprobs,
            prompt_logprobs,
            prompt_lps: vec![],
            prompt_lps_sent: false,
            seq: None,
            started: false,
            registered: 0,
            last_hash: root_hash(req.adapter),
            adapter: req.adapter,
        });
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        let mut s = self.stats.clone();
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        let b = self.runner.blocks();
        s.kv_blocks_cached = b.cached_blocks();
        s.kv_blocks_used = b.num_used() - b.evictable();
        // Checked when idle (every step would cost a pass over all blocks).
        s.kv_inconsistency = if self.has_work() { None } else { self.check_kv().err() };
        s
    }

    /// Checks the KV bookkeeping: every block's reference count is the number of sequences
    /// holding it plus one if the prefix cache keeps it; the free list holds exactly the blocks
    /// with none; the prefix cache's entries and its LRU order agree, one entry per block.
    pub fn check_kv(&self) -> Result<(), String> {
        self.runner.blocks().check(self.runner.block_references())
    }

    /// Ends every request with an error (at shutdown).
    pub fn abort_all(&mut self, message: &str) {
        for mut e in self.running.drain(..).chain(self.waiting.drain(..)) {
            if let Some(seq) = e.seq.take() {
                self.runner.free_sequence(seq);
            }
            e.sink.send(Event::Error(message.to_string()));
        }
    }

    fn free(&mut self, e: &mut Entry) {
        if let Some(seq) = e.seq.take() {
            self.runner.free_sequence(seq);
        }
    }

    /// Drops requests whose receivers are gone.
    fn reap_closed(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_closed() {
                let mut e = self.running.remove(i);
                self.free(&mut e);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|e| !e.sink.is_closed());
    }

    /// Frees the blocks of running sequence `i` and puts it back at the front of the queue.
    fn preempt(&mut self, i: usize) {
        let mut e = self.running.remove(i);
        self.free(&mut e);
        e.registered = 0;
        e.last_hash = root_hash(e.adapter);
        e.prompt_lps.clear();
        self.stats.preemptions += 1;
        self.waiting.push_front(e);
    }

    /// Makes `need` blocks free beyond `reserved` ones by evicting unreferenced cached blocks.
    fn make_room(&mut self, reserved: usize, need: usize) -> bool {
        while self.runner.blocks().num_free() < reserved + need {
            if !self.runner.kv_manager().evict_one() {
                return false;
            }
        }
        true
    }

    /// Runs one step; returns the number of tokens computed (0 when there was nothing to do).
    pub fn step(&mut self) -> usize {
        let t0 = std::time::Instant::now();
        let n = self.step_inner();
        if n > 0 {
            self.stats.step_seconds += t0.elapsed().as_secs_f64();
        }
        n
    }

    fn step_inner(&mut self) -> usize {
        self.reap_closed();
        let mut plan = StepPlan { budget: self.cfg.max_num_batched_tokens, reserved: 0, spans: vec![] };
        self.schedule_running(&mut plan);
        self.admit_waiting(&mut plan);
        if plan.spans.is_empty() {
            return 0;
        }
        let computed: usize = plan.spans.iter().map(|s| s.1.len).sum();
        let Some(logits) = self.forward(&plan.spans) else { return computed };
        self.stats.batched_tokens += computed as u64;
        self.take_outputs(&plan.spans, logits);
        computed
    }

    /// Gives running sequences, oldest first, their next tokens within the budget, preempting
    /// the newest when blocks run out.
    fn schedule_running(&mut self, plan: &mut StepPlan) {
        let (mut budget, mut reserved) = (plan.budget, plan.reserved);
        let spans = &mut plan.spans;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = self.running[i].seq.expect("running sequences have a runner sequence");
            let pending = self.runner.pending(seq).unwrap_or(0);
            if pending == 0 {
                i += 1;
                continue;
            }
            let all = self.running[i].wants_prompt_lps();
            let len = if all { pending.min(budget).min(PROMPT_LOGPROBS_CHUNK) } else { pending.min(budget) };
            let need = self.runner.blocks_needed(seq, len).unwrap_or(0);
            if !self.make_room(reserved, need) {
                // Out of blocks: preempt the newest sequence (this one, if it is the newest).
                let newest = self.running.len() - 1;
                if newest > i {
                    self.preempt(newest);
                    continue;
                }
                if i > 0 {
                    self.preempt(i);
                    break;
                }
                // Alone and still too big: the cache cannot hold it at all.
                let mut e = self.running.remove(i);
                self.free(&mut e);
                let msg = format!("the KV cache ({} tokens) cannot hold this sequence", self.capacity_tokens());
                e.sink.send(Event::Error(msg));
                continue;
            }
            reserved += need;
            budget -= len;
            let logits = span_logits(all, len == pending);
            let start = self.runner.cached(seq).unwrap_or(0);
            spans.push((i, Span { seq, len, logits }, start, len == pending));
            i += 1;
        }
        plan.budget = budget;
        plan.reserved = reserved;
    }

    /// Starts waiting sequences, first come first served, while the budget, the sequence limit
    /// and the blocks allow, each from the longest cached prefix of its tokens.
    fn admit_waiting(&mut self, plan: &mut StepPlan) {
        let (mut budget, mut reserved) = (plan.budget, plan.reserved);
        let spans = &mut plan.spans;
        let bs = self.runner.block_size();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && !self.waiting.is_empty() {
            let tokens = self.waiting[0].all_tokens();
            // Prompt logprobs need every position's logits: no cached prefix for them.
            let all = self.waiting[0].wants_prompt_lps();
            let lookup = self.cfg.prefix_caching && !all;
            let root = root_hash(self.waiting[0].adapter);
            let (prefix_blocks, prefix_hash) = if lookup {
                self.runner.kv_manager().lookup(&tokens, bs, (tokens.len() - 1) / bs, root)
            } else {
                (vec![], root)
            };
            let added = self.runner.add_sequence_with_prefix(&tokens, &prefix_blocks).and_then(|s| {
                self.runner
                    .set_adapter(s, self.waiting[0].adapter)
                    .map(|_| s)
                    .inspect_err(|_| self.runner.free_sequence(s))
            });
            let seq = match added {
                Ok(s) => s,
                Err(e) => {
                    let mut e2 = self.waiting.pop_front().unwrap();
                    e2.sink.send(Event::Error(format!("{e:#}")));
                    continue;
                }
            };
            let cached = prefix_blocks.len() * bs;
            let pending = tokens.len() - cached;
            let len = if all { pending.min(budget).min(PROMPT_LOGPROBS_CHUNK) } else { pending.min(budget) };
            let need = self.runner.blocks_needed(seq, len).unwrap_or(0);
            if !self.make_room(reserved, need) {
                self.runner.free_sequence(seq);
                if self.running.is_empty() && spans.is_empty() {
                    // Nothing else holds blocks: it can never fit.
                    let mut e = self.waiting.pop_front().unwrap();
                    let msg = format!("the KV cache ({} tokens) cannot hold this sequence", self.capacity_tokens());
                    e.sink.send(Event::Error(msg));
                    continue;
                }
                break;
            }
            let mut e = self.waiting.pop_front().unwrap();
            if !e.started {
                e.started = true;
                if lookup {
                    self.stats.prefix_query_tokens += tokens.len() as u64;
                    self.stats.prefix_hit_tokens += cached as u64;
                }
                if !e.sink.send(Event::Started { prompt_tokens: tokens.len(), cached_tokens: cached }) {
                    self.runner.free_sequence(seq);
                    continue;
                }
            }
            e.seq = Some(seq);
            e.registered = prefix_blocks.len();
            e.last_hash = prefix_hash;
            reserved += need;
            budget -= len;
            let logits = span_logits(all, len == pending);
            self.running.push(e);
            spans.push((self.running.len() - 1, Span { seq, len, logits }, cached, len == pending));
        }
        plan.budget = budget;
        plan.reserved = reserved;
    }

    /// Runs the forward pass over the planned spans (constraint masks computed alongside);
    /// `None` when it failed, having failed the step's requests.
    fn forward(&mut self, spans: &[PlannedSpan]) -> Option<Vec<Vec<f32>>> {
        let batch: Vec<Span> = spans.iter().map(|s| s.1).collect();
        let tf = std::time::Instant::now();
        let step_no = self.stats.steps + 1;
        let inject = self.fault == Some(Fault::StepPanic(step_no));
        let runner = &mut self.runner;
        // Output constraints compute their next masks on another thread while the model runs.
        let mut masks: Vec<&mut SeqGen> = vec![];
        let mut sampling: Vec<bool> = vec![false; self.running.len()];
        for s in spans {
            sampling[s.0] = s.3;
        }
        for (e, _) in self.running.iter_mut().zip(&sampling).filter(|(e, &s)| s && e.gen.needs_mask()) {
            masks.push(&mut e.gen);
        }
        // A panic in the forward pass fails this step's requests, not the engine.
        let result = std::thread::scope(|scope| {
            if !masks.is_empty() {
                scope.spawn(move || {
                    for g in masks {
                        // A panic here leaves the mask to be computed (and fail) in on_logits.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.prepare_mask()));
                    }
                });
            }
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if inject {
                    panic!("injected fault in the forward pass of step {step_no}");
                }
                runner.step(&batch)
            }))
            .unwrap_or_else(|p| Err(anyhow!("internal error: {}", panic_message(&*p))))
        });
        self.stats.forward_seconds += tf.elapsed().as_secs_f64();
        self.stats.steps += 1;
        if self.fault == Some(Fault::EnginePanic(step_no)) {
            panic!("injected fault after the forward pass of step {step_no}");
        }
        match result {
            Ok(l) => Some(l),
            Err(err) => {
                // Fail the sequences of this step, newest first so indices stay valid.
                let msg = format!("{err:#}");
                let mut idx: Vec<usize> = spans.iter().map(|s| s.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let mut e = self.running.remove(i);
                    self.free(&mut e);
                    e.sink.send(Event::Error(msg.clone()));
                }
                None
            }
        }
    }

    /// Hands each span's logits to its sequence: prompt logprobs, sampling, events to the sink,
    /// the chosen tokens appended; finished and abandoned sequences are freed.
    fn take_outputs(&mut self, spans: &[PlannedSpan], logits: Vec<Vec<f32>>) {
        let mut done: Vec<usize> = vec![];
        for ((i, span, start, last), mut l) in spans.iter().zip(logits) {
            if self.cfg.prefix_caching {
                self.register_blocks(*i);
            }
            let e = &mut self.running[*i];
            if span.logits == Logits::All {
                // Row k (position start + k) predicts the token at start + k + 1.
                let n = e.prompt_logprobs.unwrap_or(0);
                let prompt = e.gen.prompt();
                let vocab = l.len() / span.len;
                if *start == 0 {
                    e.prompt_lps.clear();
                    e.prompt_lps.push(None);
                }
                for (k, row) in l.chunks_exact(vocab).enumerate() {
                    if let Some(&next) = prompt.get(start + k + 1) {
                        e.prompt_lps.push(qwick_sampler::logprobs(row, next, n).ok());
                    }
                }
                if !*last {
                    continue;
                }
                e.prompt_lps_sent = true;
                let lps = std::mem::take(&mut e.prompt_lps);
                if !e.sink.send(Event::PromptLogprobs(lps)) {
                    done.push(*i);
                    continue;
                }
                // The last position samples the first output token.
                l.drain(..(span.len - 1) * vocab);
            } else if !*last {
                continue;
            }
            let raw = e.logprobs.map(|_| l.clone());
            let decision = match e.gen.on_logits(&mut l) {
                Ok(d) => d,
                Err(err) => {
                    e.sink.send(Event::Error(format!("{err:#}")));
                    done.push(*i);
                    continue;
                }
            };
            let out: Vec<OutToken> = decision
                .tokens
                .iter()
                .map(|t| OutToken {
                    token: *t,
                    logprobs: match (&raw, e.logprobs) {
                        (Some(raw), Some(n)) if !t.injected => qwick_sampler::logprobs(raw, t.id, n).ok(),
                        _ => None,
                    },
                })
                .collect();
            let mut alive = out.is_empty() || e.sink.send(Event::Tokens(out));
            if let Some(f) = decision.finish {
                if alive {
                    e.sink.send(Event::Finished(f));
                }
                alive = false;
            }
            if !alive {
                done.push(*i);
                continue;
            }
            for t in &decision.tokens {
                if self.runner.append_token(span.seq, t.id).is_err() {
                    done.push(*i);
                    break;
                }
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        done.dedup();
        for i in done {
            let mut e = self.running.remove(i);
            self.free(&mut e);
        }
    }

    /// Offers the newly completed full blocks of running sequence `i` to the prefix cache.
    fn register_blocks(&mut self, i: usize) {
        let bs = self.runner.block_size();
        let e = &mut self.running[i];
        let Some(seq) = e.seq else { return };
        let cached = self.runner.cached(seq).unwrap_or(0);
        let full = cached / bs;
        if full <= e.registered {
            return;
        }
        let tokens = self.runner.tokens(seq).unwrap_or(&[]).to_vec();
        let table = self.runner.block_table(seq).unwrap_or(&[]).to_vec();
        for k in e.registered..full {
            e.last_hash = self.runner.kv_manager().offer(e.last_hash, &tokens[k * bs..(k + 1) * bs], table[k]);
        }
        e.registered = full;
    }
}

/// Which logits a span needs: every position's for prompt logprobs, else the last one's when it
/// ends the pending tokens.
fn span_logits(all: bool, last: bool) -> Logits {
    match (all, last) {
        (true, _) => Logits::All,
        (false, true) => Logits::Last,
        (false, false) => Logits::None,
    }
}

/// Why [`Engine::submit`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Too many requests are waiting.
    QueueFull,
    /// The engine has stopped.
    Stopped,
    /// The engine thread ended on a fault it could not recover from.
    Failed,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull => write!(f, "too many requests are waiting; try again later"),
            SubmitError::Stopped => write!(f, "the engine has stopped"),
            SubmitError::Failed => write!(f, "the engine failed and cannot serve requests"),
        }
    }
}

impl std::error::Error for SubmitError {}

#[derive(Default)]
struct Inbox {
    new: Vec<(Request, Option<usize>, Box<dyn EventSink>)>,
    stop: bool,
    abort: bool,
    stats: SchedulerStats,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    max_waiting: usize,
    /// Cleared when the engine thread ends without being asked to.
    healthy: std::sync::atomic::AtomicBool,
}

/// Marks the engine unhealthy when its thread ends other than by a stop request (a return
/// after a fault, or a panic unwinding through the loop), and fails what it held.
struct ExitGuard<'a>(&'a Shared);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let mut inbox = self.0.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if !inbox.stop {
            self.0.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
            inbox.stop = true;
        }
        for (_, _, mut sink) in inbox.new.drain(..) {
            sink.send(Event::Error("the engine stopped".into()));
        }
    }
}

/// A scheduler on its own thread.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    capacity_tokens: usize,
    block_size: usize,
}

impl Engine {
    /// Starts the engine thread; `make_runner` runs on it (so the model's thread pool belongs to it).
    pub fn start(
        make_runner: impl FnOnce() -> Result<Runner> + Send + 'static,
        cfg: SchedulerConfig,
    ) -> Result<Engine> {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            max_waiting: cfg.max_waiting,
            healthy: std::sync::atomic::AtomicBool::new(true),
        });
        let fault = Fault::from_env();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(usize, usize)>>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new().name("qwick-engine".into()).spawn(move || {
            let runner = match make_runner() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut sched = Scheduler::new(runner, cfg);
            sched.inject(fault);
            let _ = ready_tx.send(Ok((sched.capacity_tokens(), sched.runner().block_size())));
            let _guard = ExitGuard(&sh);
            engine_loop(&sh, &mut sched);
        })?;
        let (capacity_tokens, block_size) =
            ready_rx.recv().map_err(|_| anyhow!("the engine thread ended while starting"))??;
        let engine = Engine { shared, thread: Mutex::new(Some(thread)), capacity_tokens, block_size };
        engine.shared.inbox.lock().unwrap().stats =
            SchedulerStats { kv_blocks_total: capacity_tokens / block_size, block_size, ..SchedulerStats::default() };
        Ok(engine)
    }

    /// Tokens the KV cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Queues a request; its events go to `sink`.
    pub fn submit(&self, req: Request, sink: Box<dyn EventSink>) -> Result<(), SubmitError> {
        self.submit_with(req, None, sink)
    }

    /// Queues a request that also gets its prompt's logprobs with `prompt_logprobs` alternatives
    /// (an [`Event::PromptLogprobs`] before its first tokens; its prompt is then computed in full,
    /// without the prefix cache). `None`: as [`Engine::submit`].
    pub fn submit_with(
        &self,
        req: Request,
        prompt_logprobs: Option<usize>,
        sink: Box<dyn EventSink>,
    ) -> Result<(), SubmitError> {
        if !self.is_healthy() {
            return Err(SubmitError::Failed);
        }
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.stop {
            return Err(if self.is_healthy() { SubmitError::Stopped } else { SubmitError::Failed });
        }
        if inbox.new.len() + inbox.stats.waiting >= self.shared.max_waiting {
            return Err(SubmitError::QueueFull);
        }
        inbox.new.push((req, prompt_logprobs, sink));
        drop(inbox);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Whether the engine thread is serving (false once it ended on a fault).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The scheduler's state after its last step.
    pub fn stats(&self) -> SchedulerStats {
        let inbox = self.shared.inbox.lock().unwrap();
        let mut s = inbox.stats.clone();
        s.waiting += inbox.new.len();
        s
    }

    /// Ends every request in flight with an error, and refuses new ones.
    pub fn abort_all(&self) {
        let mut inbox = self.shared.inbox.lock().unwrap();
        inbox.abort = true;
        inbox.stop = true;
        drop(inbox);
        self.shared.wake.notify_one();
    }

    /// Stops the engine thread (requests in flight end with an error) and waits for it.
    pub fn stop(&self) {
        self.abort_all();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn engine_loop(shared: &Shared, sched: &mut Scheduler) {
    loop {
        let abort = {
            let mut inbox = shared.inbox.lock().unwrap();
            inbox.stats = sched.stats();
            while inbox.new.is_empty() && !inbox.abort && !sched.has_work() {
                inbox = shared.wake.wait(inbox).unwrap();
            }
            if !inbox.abort && !inbox.new.is_empty() {
                for (req, prompt_logprobs, sink) in std::mem::take(&mut inbox.new) {
                    sched.add_with(req, prompt_logprobs, sink);
                }
                // Counted as waiting at once, for the queue limit.
                inbox.stats = sched.stats();
            }
            inbox.abort
        };
        if abort {
            sched.abort_all("the server is shutting down");
            let mut inbox = shared.inbox.lock().unwrap();
            inbox.stats = sched.stats();
            for (_, _, mut sink) in inbox.new.drain(..) {
                sink.send(Event::Error("the server is shutting down".into()));
            }
            return;
        }
        if sched.exit_now() {
            return;
        }
        // A panic outside the forward pass leaves the running requests' state unknown: they
        // fail (their blocks freed) and the engine goes on with the rest.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step())) {
            Ok(n) if n == 0 && sched.has_work() => {
                // Nothing could run (every waiting request blocked); wait a little for a change.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(_) => {}
            Err(p) => sched.fail_running(&format!("internal error: {}", panic_message(&*p))),
        }
    }
}
