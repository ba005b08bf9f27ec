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

use crate::kv_manager::ROOT_HASH;
use crate::sequence::{Decision, FinishReason, GenToken, SeqGen};
use crate::spec::{Ask, DraftLen, Drafter, ModelDrafter, SpecConfig, SpecMethod};

/// The hash cached prefixes of a request with LoRA adapter `adapter` start from: K/V computed
/// with one adapter is never reused for another.
fn root_hash(adapter: u16) -> u64 {
    ROOT_HASH ^ (adapter as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
use crate::runner::{Logits, Runner, SeqId, Span};
use anyhow::{anyhow, Result};
use qwick_sampler::TokenLogprobs;
use std::collections::{HashMap, VecDeque};
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
    /// Speculative decoding, if any.
    pub spec: Option<SpecConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_waiting: 1024,
            prefix_caching: true,
            spec: None,
        }
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

/// What a prefill-only request gets instead of generated tokens: one vector, in an
/// [`Event::Pooled`], after its prompt is computed.
#[derive(Clone, Debug, PartialEq)]
pub enum Pooling {
    /// The last token's hidden state after the final norm (an embedding, not yet normalised).
    LastHidden,
    /// The last position's logits of these tokens (a reranker's "yes" and "no").
    Logits(Vec<u32>),
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
    /// A prefill-only request's vector (see [`Pooling`]), followed by `Finished`.
    Pooled(Vec<f32>),
}

/// Where a request's events go (a channel to an HTTP handler).
pub trait EventSink: Send {
    /// Delivers an event; `false` when the receiver is gone (the request is then dropped).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (checked before every step).
    fn is_closed(&self) -> bool;
}

/// An [`EventSink`] that keeps a request's events until they are read or taken: for callers
/// that poll ([`crate::generate`]) and for tests. Clones share the events; [`Collect::close`]
/// cancels the request.
#[derive(Clone, Default)]
pub struct Collect {
    events: Arc<Mutex<Vec<Event>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl EventSink for Collect {
    fn send(&mut self, event: Event) -> bool {
        if self.is_closed() {
            return false;
        }
        self.events.lock().unwrap().push(event);
        true
    }
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Collect {
    /// The events received since the last take.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// The events received so far (they stay).
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Cancels the request: the scheduler drops it before its next step.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The output token ids received so far.
    pub fn tokens(&self) -> Vec<u32> {
        let ev = self.events.lock().unwrap();
        ev.iter()
            .filter_map(|e| if let Event::Tokens(t) = e { Some(t) } else { None })
            .flatten()
            .map(|t| t.token.id)
            .collect()
    }

    /// How generation ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.events.lock().unwrap().iter().find_map(|e| if let Event::Finished(f) = e { Some(*f) } else { None })
    }

    /// The error the request failed with, if it did.
    pub fn error(&self) -> Option<String> {
        self.events.lock().unwrap().iter().find_map(|e| if let Event::Error(m) = e { Some(m.clone()) } else { None })
    }

    /// `(prompt tokens, cached tokens)` of each start (more than one after a preemption).
    pub fn started(&self) -> Vec<(usize, usize)> {
        let ev = self.events.lock().unwrap();
        ev.iter()
            .filter_map(|e| match e {
                Event::Started { prompt_tokens, cached_tokens } => Some((*prompt_tokens, *cached_tokens)),
                _ => None,
            })
            .collect()
    }

    /// Whether the request has ended (finished or failed).
    pub fn done(&self) -> bool {
        self.events.lock().unwrap().iter().any(|e| matches!(e, Event::Finished(_) | Event::Error(_)))
    }
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
    /// Speculative decoding: tokens drafted and verified, how many were accepted, and the
    /// verifications (a sequence's span of drafts in a step).
    pub spec_drafted: u64,
    pub spec_accepted: u64,
    pub spec_verifications: u64,
    /// What is wrong with the KV bookkeeping, if anything ([`Scheduler::check_kv`], checked
    /// whenever the scheduler is idle).
    pub kv_inconsistency: Option<String>,
}

/// One span of a step.
struct PlannedSpan {
    /// Index of the sequence in `running`.
    entry: usize,
    seq: SeqId,
    /// Tokens of the sequence cached before the span (its first position).
    start: usize,
    len: usize,
    logits: Logits,
    /// Whether the span ends the sequence's pending tokens.
    last: bool,
    /// Drafted tokens after the span's one pending token, verified by its logits.
    draft: Vec<u32>,
}

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
    /// A prefill-only request: what it gets instead of tokens.
    pooling: Option<Pooling>,
    /// How many tokens to draft (with speculative decoding).
    draft_len: DraftLen,
}

impl Entry {
    /// Still needs the logits of every prompt position.
    fn wants_prompt_lps(&self) -> bool {
        self.prompt_logprobs.is_some() && !self.prompt_lps_sent
    }

    /// How many of each row's highest-ranked logits this request reads (see
    /// [`SeqGen::candidates`]); `None` with logprobs, which read them all.
    fn candidates(&self) -> Option<usize> {
        if self.logprobs.is_some() || self.prompt_logprobs.is_some() {
            return None;
        }
        self.gen.candidates()
    }

    /// What a span of this sequence needs: every position's logits for prompt logprobs, else,
    /// where it ends the pending tokens, the last one's (or, pooling the last hidden state,
    /// that).
    fn span_output(&self, last: bool) -> Logits {
        match (self.wants_prompt_lps(), last, &self.pooling) {
            (true, _, _) => Logits::All,
            (false, true, Some(Pooling::LastHidden)) => Logits::Hidden,
            (false, true, _) => Logits::Last,
            (false, false, _) => Logits::None,
        }
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
    /// Where drafts come from, with speculative decoding.
    drafter: Option<Drafter>,
    /// Measured seconds (decaying averages) of a forward call of decode spans alone, and of
    /// drafting one token for every asking sequence.
    decode_step_s: f64,
    draft_token_s: f64,
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
        let drafter = match cfg.spec.as_ref().map(|c| &c.method) {
            Some(&SpecMethod::Ngram { max_n }) => Some(Drafter::Ngram { max_n }),
            _ => None,
        };
        Scheduler {
            runner,
            cfg,
            waiting: VecDeque::new(),
            running: vec![],
            stats,
            fault: None,
            drafter,
            decode_step_s: 0.0,
            draft_token_s: 0.0,
        }
    }

    /// Drafts with `draft`, a runner over the draft model (with [`SpecMethod::Model`]).
    pub fn with_draft_model(mut self, draft: Runner) -> Scheduler {
        self.drafter = Some(Drafter::Model(Box::new(ModelDrafter::new(draft))));
        self
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
        self.enqueue(req, prompt_logprobs, None, sink);
    }

    /// Queues a prefill-only request: its prompt is computed (batched with the others, from the
    /// prefix cache where it can be), then it gets its [`Pooling`] vector and finishes.
    pub fn add_pooled(&mut self, req: Request, pooling: Pooling, sink: Box<dyn EventSink>) {
        self.enqueue(req, None, Some(pooling), sink);
    }

    fn enqueue(
        &mut self,
        req: Request,
        prompt_logprobs: Option<usize>,
        pooling: Option<Pooling>,
        sink: Box<dyn EventSink>,
    ) {
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
            pooling,
            draft_len: DraftLen::default(),
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
        self.runner.blocks().check(self.runner.block_references())?;
        self.drafter.as_ref().map_or(Ok(()), |d| d.check(self.running.is_empty()))
    }

    /// Ends every request with an error (at shutdown).
    pub fn abort_all(&mut self, message: &str) {
        let all: Vec<Entry> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        for mut e in all {
            self.free(&mut e);
            e.sink.send(Event::Error(message.to_string()));
        }
    }

    fn free(&mut self, e: &mut Entry) {
        if let Some(seq) = e.seq.take() {
            self.runner.free_sequence(seq);
            if let Some(d) = &mut self.drafter {
                d.forget(seq);
            }
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

    /// This step's drafts, by runner sequence: for each decoding sequence whose draft length
    /// allows, when no more sequences are decoding than speculation is for.
    fn drafts(&mut self, budget: usize) -> HashMap<SeqId, Vec<u32>> {
        let Some(c) = &self.cfg.spec else { return HashMap::new() };
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].seq.is_some_and(|s| self.decoding(&self.running[i], s)))
            .collect();
        if decoding.len() > c.max_seqs || self.drafter.is_none() {
            return HashMap::new();
        }
        let mut asks = vec![];
        let cost = self.draft_cost();
        let most = c.max_draft;
        for &i in &decoding {
            let e = &mut self.running[i];
            let max = e.draft_len.next(most, cost).min(e.gen.draft_room()).min(budget.saturating_sub(1));
            if max > 0 {
                asks.push((i, max));
            }
        }
        let asks: Vec<Ask> = asks
            .into_iter()
            .map(|(i, max)| {
                let e = &self.running[i];
                Ask { seq: e.seq.expect("decoding"), tokens: e.gen.tokens(), max }
            })
            .collect();
        let (drafted, step_s) = self.drafter.as_mut().expect("checked").draft(&asks);
        if let Some(t) = step_s {
            self.draft_token_s = average(self.draft_token_s, t);
        }
        asks.iter().zip(drafted).filter(|(_, d)| !d.is_empty()).map(|(a, d)| (a.seq, d)).collect()
    }

    /// What drafting a token costs, in decode steps, as measured (0 until both are).
    fn draft_cost(&self) -> f64 {
        // The unit tests' fake model has timings of noise: drafts cost nothing there, so the
        // draft lengths they see depend on acceptance alone.
        if cfg!(test) || self.decode_step_s == 0.0 {
            return 0.0;
        }
        self.draft_token_s / self.decode_step_s
    }

    /// Whether running entry `e` (runner sequence `seq`) is decoding: one token to compute, from
    /// which a token is sampled.
    fn decoding(&self, e: &Entry, seq: SeqId) -> bool {
        e.pooling.is_none()
            && !e.wants_prompt_lps()
            && self.runner.cached(seq).is_some_and(|c| c + 1 == e.gen.tokens().len())
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
        let computed: usize = plan.spans.iter().map(|s| s.len).sum();
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
        let mut drafts = self.drafts(budget);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = self.running[i].seq.expect("running sequences have a runner sequence");
            let start = self.runner.cached(seq).unwrap_or(0);
            let pending = self.running[i].gen.tokens().len() - start;
            if pending == 0 {
                i += 1;
                continue;
            }
            let all = self.running[i].wants_prompt_lps();
            let mut len = if all { pending.min(budget).min(PROMPT_LOGPROBS_CHUNK) } else { pending.min(budget) };
            let mut draft = drafts.remove(&seq).unwrap_or_default();
            draft.truncate(budget - 1);
            len += draft.len();
            let mut need = self.runner.blocks_needed(seq, len).unwrap_or(0);
            // Drafts take only free blocks, leaving one for each later sequence's next token:
            // they never evict the prefix cache nor cost another sequence its place.
            let later = self.running.len() - i - 1;
            if !draft.is_empty() && self.runner.blocks().num_free() < reserved + need + later {
                (len, need) = (1, self.runner.blocks_needed(seq, 1).unwrap_or(0));
                draft.clear();
            }
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
            let last = len >= pending;
            let logits = if draft.is_empty() { self.running[i].span_output(last) } else { Logits::All };
            spans.push(PlannedSpan { entry: i, seq, start, len, logits, last, draft });
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
            let tokens = self.waiting[0].gen.tokens();
            let n = tokens.len();
            // Prompt logprobs need every position's logits: no cached prefix for them.
            let all = self.waiting[0].wants_prompt_lps();
            let lookup = self.cfg.prefix_caching && !all;
            let root = root_hash(self.waiting[0].adapter);
            let (prefix_blocks, prefix_hash) =
                if lookup { self.runner.kv_manager().lookup(tokens, bs, (n - 1) / bs, root) } else { (vec![], root) };
            let (adapter, candidates) = (self.waiting[0].adapter, self.waiting[0].candidates());
            let added = self.runner.add_sequence_with_prefix(n, &prefix_blocks).and_then(|s| {
                self.runner
                    .set_adapter(s, adapter)
                    .and_then(|_| self.runner.set_candidates(s, candidates))
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
            let pending = n - cached;
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
                    self.stats.prefix_query_tokens += n as u64;
                    self.stats.prefix_hit_tokens += cached as u64;
                }
                if !e.sink.send(Event::Started { prompt_tokens: n, cached_tokens: cached }) {
                    self.runner.free_sequence(seq);
                    continue;
                }
            }
            e.seq = Some(seq);
            e.registered = prefix_blocks.len();
            e.last_hash = prefix_hash;
            reserved += need;
            budget -= len;
            let last = len == pending;
            let logits = e.span_output(last);
            self.running.push(e);
            let entry = self.running.len() - 1;
            spans.push(PlannedSpan { entry, seq, start: cached, len, logits, last, draft: vec![] });
        }
        plan.budget = budget;
        plan.reserved = reserved;
    }

    /// Runs the forward pass over the planned spans (constraint masks computed alongside);
    /// `None` when it failed, having failed the step's requests.
    fn forward(&mut self, spans: &[PlannedSpan]) -> Option<Vec<Vec<f32>>> {
        // The spans' tokens, copied: the sequences' generation states are borrowed mutably below.
        let tokens: Vec<Vec<u32>> = spans
            .iter()
            .map(|s| {
                let own = s.len - s.draft.len();
                let mut t = self.running[s.entry].gen.tokens()[s.start..s.start + own].to_vec();
                t.extend(&s.draft);
                t
            })
            .collect();
        let batch: Vec<Span> =
            spans.iter().zip(&tokens).map(|(s, t)| Span { seq: s.seq, tokens: t, logits: s.logits }).collect();
        let tf = std::time::Instant::now();
        let step_no = self.stats.steps + 1;
        let inject = self.fault == Some(Fault::StepPanic(step_no));
        let runner = &mut self.runner;
        // Output constraints compute their next masks on another thread while the model runs.
        let mut masks: Vec<&mut SeqGen> = vec![];
        let mut sampling: Vec<bool> = vec![false; self.running.len()];
        for s in spans {
            sampling[s.entry] = s.last;
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
        let secs = tf.elapsed().as_secs_f64();
        self.stats.forward_seconds += secs;
        if spans.iter().all(|s| s.len == 1 + s.draft.len() && s.last) {
            self.decode_step_s = average(self.decode_step_s, secs);
        }
        self.stats.steps += 1;
        if self.fault == Some(Fault::EnginePanic(step_no)) {
            panic!("injected fault after the forward pass of step {step_no}");
        }
        match result {
            Ok(l) => Some(l),
            Err(err) => {
                // Fail the sequences of this step, newest first so indices stay valid.
                let msg = format!("{err:#}");
                let mut idx: Vec<usize> = spans.iter().map(|s| s.entry).collect();
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
        for (span, mut l) in spans.iter().zip(logits) {
            let i = span.entry;
            let e = &mut self.running[i];
            if span.logits == Logits::All && span.draft.is_empty() {
                // Row k (position start + k) predicts the token at start + k + 1.
                let n = e.prompt_logprobs.unwrap_or(0);
                let prompt = e.gen.prompt();
                let vocab = l.len() / span.len;
                if span.start == 0 {
                    e.prompt_lps.clear();
                    e.prompt_lps.push(None);
                }
                for (k, row) in l.chunks_exact(vocab).enumerate() {
                    if let Some(&next) = prompt.get(span.start + k + 1) {
                        e.prompt_lps.push(qwick_sampler::logprobs(row, next, n).ok());
                    }
                }
                if !span.last {
                    continue;
                }
                e.prompt_lps_sent = true;
                let lps = std::mem::take(&mut e.prompt_lps);
                if !e.sink.send(Event::PromptLogprobs(lps)) {
                    done.push(i);
                    continue;
                }
                // The last position samples the first output token.
                l.drain(..(span.len - 1) * vocab);
            } else if !span.last {
                continue;
            }
            if let Some(p) = &e.pooling {
                // A prefill-only request: its vector, and it is done.
                let v = match p {
                    Pooling::LastHidden => l,
                    Pooling::Logits(ids) => {
                        ids.iter().map(|&t| l.get(t as usize).copied().unwrap_or(f32::NAN)).collect()
                    }
                };
                if e.sink.send(Event::Pooled(v)) {
                    e.sink.send(Event::Finished(FinishReason::Stop));
                }
                done.push(i);
                continue;
            }
            let verified = verify(e, span, &mut l);
            if !span.draft.is_empty() {
                // Keep the K/V of the drafts the sequence kept (also when deciding failed
                // part-way); forget the rest.
                let tokens = &e.gen.tokens()[span.start + 1..];
                let kept = span.draft.iter().zip(tokens).take_while(|(d, t)| d == t).count();
                let seq = span.seq;
                self.runner.rollback(seq, span.start + 1 + kept).expect("rolled back within the span");
                e.draft_len.update(span.draft.len(), kept);
                self.stats.spec_drafted += span.draft.len() as u64;
                self.stats.spec_accepted += kept as u64;
                self.stats.spec_verifications += 1;
            }
            let (decision, out) = match verified {
                Ok(d) => d,
                Err(err) => {
                    e.sink.send(Event::Error(format!("{err:#}")));
                    done.push(i);
                    continue;
                }
            };
            let mut alive = out.is_empty() || e.sink.send(Event::Tokens(out));
            if let Some(f) = decision.finish {
                if alive {
                    e.sink.send(Event::Finished(f));
                }
                alive = false;
            }
            if !alive {
                done.push(i);
            }
        }
        if self.cfg.prefix_caching {
            // After any rollback, so only computed tokens the sequence keeps are offered.
            for span in spans {
                self.register_blocks(span.entry);
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
        let tokens = e.gen.tokens();
        // Only blocks of tokens the sequence holds (a cache past them would be a bug: offering
        // their K/V under other tokens would poison the prefix cache).
        let cached = self.runner.cached(seq).unwrap_or(0).min(tokens.len());
        let full = cached / bs;
        if full <= e.registered {
            return;
        }
        let table = self.runner.block_table(seq).unwrap_or(&[]).to_vec();
        for k in e.registered..full {
            e.last_hash = self.runner.kv_manager().offer(e.last_hash, &tokens[k * bs..(k + 1) * bs], table[k]);
        }
        e.registered = full;
    }
}

/// A decaying average of measured seconds (the first measurement taken as it is).
fn average(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        0.8 * old + 0.2 * new
    }
}

/// Decides a sequence's next tokens from its span's logits `l`: the last row's alone, or with
/// drafts, row after row while the sampler keeps the drafted token (each row's logits follow
/// the drafts before it, which the sequence has then kept). Logprobs come from each row as the
/// model gave it.
fn verify(e: &mut Entry, span: &PlannedSpan, l: &mut [f32]) -> Result<(Decision, Vec<OutToken>)> {
    let rows = span.draft.len() + 1;
    let vocab = l.len() / rows;
    let mut decision = Decision::default();
    let mut out = vec![];
    for (j, row) in l.chunks_exact_mut(vocab).enumerate() {
        let raw = e.logprobs.map(|_| row.to_vec());
        let draft = span.draft.get(j).copied();
        let d = e.gen.on_logits_draft(row, draft)?;
        let kept = matches!((draft, d.tokens.as_slice()), (Some(t), [g]) if g.id == t && !g.injected);
        out.extend(d.tokens.iter().map(|t| OutToken {
            token: *t,
            logprobs: match (&raw, e.logprobs) {
                (Some(raw), Some(n)) if !t.injected => qwick_sampler::logprobs(raw, t.id, n).ok(),
                _ => None,
            },
        }));
        decision.tokens.extend(d.tokens);
        decision.finish = d.finish;
        if !kept || d.finish.is_some() {
            break;
        }
    }
    Ok((decision, out))
}

/// What an engine runs: the model's runner, and a draft model's for speculative decoding
/// ([`SpecMethod::Model`]).
pub struct Runners {
    pub target: Runner,
    pub draft: Option<Runner>,
}

impl From<Runner> for Runners {
    fn from(target: Runner) -> Runners {
        Runners { target, draft: None }
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

/// A request submitted to the engine thread: with its prompt logprobs and pooling, if asked
/// for, and where its events go.
type Submitted = (Request, Option<usize>, Option<Pooling>, Box<dyn EventSink>);

#[derive(Default)]
struct Inbox {
    new: Vec<Submitted>,
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
        for (_, _, _, mut sink) in inbox.new.drain(..) {
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
        make_runner: impl FnOnce() -> Result<Runners> + Send + 'static,
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
            let runners = match make_runner() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut sched = Scheduler::new(runners.target, cfg);
            if let Some(d) = runners.draft {
                sched = sched.with_draft_model(d);
            }
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

    /// Most requests that may wait to start (more are refused: [`SubmitError::QueueFull`]).
    pub fn max_waiting(&self) -> usize {
        self.shared.max_waiting
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
        self.enqueue(req, prompt_logprobs, None, sink)
    }

    /// Queues a prefill-only request (see [`Scheduler::add_pooled`]): an [`Event::Pooled`], then
    /// `Finished`.
    pub fn submit_pooled(&self, req: Request, pooling: Pooling, sink: Box<dyn EventSink>) -> Result<(), SubmitError> {
        self.enqueue(req, None, Some(pooling), sink)
    }

    fn enqueue(
        &self,
        req: Request,
        prompt_logprobs: Option<usize>,
        pooling: Option<Pooling>,
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
        inbox.new.push((req, prompt_logprobs, pooling, sink));
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
                for (req, prompt_logprobs, pooling, sink) in std::mem::take(&mut inbox.new) {
                    sched.enqueue(req, prompt_logprobs, pooling, sink);
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
            for (_, _, _, mut sink) in inbox.new.drain(..) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{self, FakeState, VOCAB};
    use crate::sequence::GenParams;

    const BS: usize = 4;

    fn prompt(i: usize, len: usize) -> Vec<u32> {
        (0..len).map(|j| ((i * 29 + j * 13 + 3) % VOCAB) as u32).collect()
    }

    fn params(max_tokens: usize) -> GenParams {
        GenParams::greedy(Some(max_tokens), 1000)
    }

    fn request(p: &[u32], max_tokens: usize) -> Request {
        Request { gen: SeqGen::new(p, params(max_tokens)).unwrap(), logprobs: None, adapter: 0 }
    }

    /// A scheduler over the fake model with `num_blocks` blocks of `BS` tokens.
    fn scheduler(num_blocks: usize, cfg: SchedulerConfig) -> (Scheduler, Arc<Mutex<FakeState>>) {
        let (runner, state) = fake::runner(BS, num_blocks);
        (Scheduler::new(runner, cfg), state)
    }

    fn config(max_num_batched_tokens: usize, max_num_seqs: usize, prefix_caching: bool) -> SchedulerConfig {
        SchedulerConfig { max_num_batched_tokens, max_num_seqs, max_waiting: 100, prefix_caching, spec: None }
    }

    type Sink = Collect;

    fn add(s: &mut Scheduler, p: &[u32], max_tokens: usize) -> Sink {
        let sink = Sink::default();
        s.add(request(p, max_tokens), Box::new(sink.clone()));
        sink
    }

    /// Steps until there is nothing left to do; returns the number of steps.
    fn run(s: &mut Scheduler) -> usize {
        let mut steps = 0;
        while s.has_work() {
            let requests = s.num_running() + s.num_waiting();
            // Each step computes tokens or ends requests.
            assert!(s.step() > 0 || s.num_running() + s.num_waiting() < requests, "the scheduler makes progress");
            steps += 1;
            assert!(steps < 1000);
        }
        steps
    }

    /// Each batch the model ran, as (first position, tokens) of each of its spans, in order.
    fn spans(state: &Mutex<FakeState>) -> Vec<Vec<(u32, Vec<u32>)>> {
        let state = state.lock().unwrap();
        state
            .batches
            .iter()
            .map(|b| {
                let mut out: Vec<(u32, Vec<u32>)> = vec![];
                for (i, &t) in b.tokens.iter().enumerate() {
                    if i == 0 || b.seq_of_token[i] != b.seq_of_token[i - 1] {
                        out.push((b.positions[i], vec![]));
                    }
                    out.last_mut().unwrap().1.push(t);
                }
                out
            })
            .collect()
    }

    /// The (first position, length) of each span of each batch.
    fn span_lens(state: &Mutex<FakeState>) -> Vec<Vec<(u32, usize)>> {
        spans(state).into_iter().map(|b| b.into_iter().map(|(p, t)| (p, t.len())).collect()).collect()
    }

    fn assert_idle_and_consistent(s: &Scheduler) {
        let st = s.stats();
        assert_eq!((st.running, st.waiting, st.kv_blocks_used), (0, 0, 0), "{st:?}");
        assert_eq!(st.kv_inconsistency, None);
        assert_eq!(s.check_kv(), Ok(()));
    }

    #[test]
    fn pooled_requests_prefill_beside_generation_and_get_their_vectors() {
        // Chunked (a budget of 6 tokens a step), with a generating sequence beside them, and a
        // second hidden-state request sharing the first's prefix from the cache.
        let (mut s, _) = scheduler(64, config(6, 8, true));
        let (p0, p1) = (prompt(0, 9), prompt(1, 5));
        let gen = add(&mut s, &prompt(2, 3), 4);
        let pooled = |s: &mut Scheduler, p: &[u32], pooling: Pooling| {
            let sink = Sink::default();
            s.add_pooled(request(p, 1), pooling, Box::new(sink.clone()));
            sink
        };
        let hidden = pooled(&mut s, &p0, Pooling::LastHidden);
        let scored = pooled(&mut s, &p1, Pooling::Logits(vec![5, 60, 7]));
        run(&mut s);
        let again = pooled(&mut s, &p0, Pooling::LastHidden);
        run(&mut s);
        let vector = |sink: &Sink| {
            let ev = sink.events();
            assert!(matches!(ev.last(), Some(Event::Finished(FinishReason::Stop))), "{ev:?}");
            assert!(sink.tokens().is_empty(), "no tokens generated");
            ev.iter().find_map(|e| if let Event::Pooled(v) = e { Some(v.clone()) } else { None }).expect("a vector")
        };
        assert_eq!(vector(&hidden), fake::hidden(0, &p0));
        assert_eq!(vector(&again), fake::hidden(0, &p0));
        assert_eq!(again.started(), vec![(9, 8)], "the cached prefix served the second");
        let l = fake::logits(0, &p1);
        assert_eq!(vector(&scored), vec![l[5], l[60], l[7]]);
        assert_eq!(gen.tokens().len(), 4, "the generating sequence went on beside them");
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn admits_while_the_sequence_limit_and_the_token_budget_allow() {
        let (mut s, state) = scheduler(64, config(10, 2, false));
        let (p0, p1, p2) = (prompt(0, 3), prompt(1, 4), prompt(2, 5));
        let sinks = [add(&mut s, &p0, 3), add(&mut s, &p1, 3), add(&mut s, &p2, 3)];
        assert_eq!(s.step(), 7);
        // Two running (the limit), the third waits though the budget had room for 3 more.
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
        assert!(sinks[2].started().is_empty());
        assert_eq!(run(&mut s), 5);
        // Decodes of the two, then the third once they finished.
        assert_eq!(
            span_lens(&state),
            [
                vec![(0, 3), (0, 4)],
                vec![(3, 1), (4, 1)],
                vec![(4, 1), (5, 1)],
                vec![(0, 5)],
                vec![(5, 1)],
                vec![(6, 1)],
            ]
        );
        for (sink, p) in sinks.iter().zip([&p0, &p1, &p2]) {
            assert_eq!(sink.tokens(), fake::greedy(0, p, 3, &[]));
            assert_eq!(sink.finish(), Some(FinishReason::Length));
            assert_eq!(sink.started(), [(p.len(), 0)]);
        }
        assert_idle_and_consistent(&s);
        assert_eq!(s.stats().steps, 6);
        assert_eq!(s.stats().batched_tokens, 7 + 2 + 2 + 5 + 1 + 1);
    }

    #[test]
    fn waits_for_blocks_and_evicts_the_cache_to_admit() {
        // 4 blocks of 4 tokens.
        let (mut s, state) = scheduler(4, config(64, 8, true));
        let (p0, p1) = (prompt(0, 10), prompt(1, 12));
        let a = add(&mut s, &p0, 2);
        let b = add(&mut s, &p1, 1);
        // p0 takes 3 blocks; p1 needs 3 and waits.
        assert_eq!(s.step(), 10);
        assert_eq!((s.num_running(), s.num_waiting(), s.runner().blocks().num_free()), (1, 1, 1));
        // p0's next token fits its third block; it finishes and frees it, keeping 2 cached.
        assert_eq!(s.step(), 1);
        assert_eq!(a.finish(), Some(FinishReason::Length));
        let st = s.stats();
        assert_eq!((st.running, st.waiting, st.kv_blocks_used, st.kv_blocks_cached), (0, 1, 0, 2));
        // p1 evicts one of them (2 free + 1 evicted = 3).
        assert_eq!(s.step(), 12);
        assert_eq!(b.tokens(), fake::greedy(0, &p1, 1, &[]));
        assert_eq!(span_lens(&state), [vec![(0, 10)], vec![(10, 1)], vec![(0, 12)]]);
        // p1 offered its 3 full blocks: the cache now holds p0's second block and those.
        let st = s.stats();
        assert_eq!((st.kv_blocks_used, st.kv_blocks_cached), (0, 4));
        assert_eq!(s.runner().blocks().num_free(), 0);
        let mut longer = p1.clone();
        longer.push(0);
        assert_eq!(s.runner.kv_manager().lookup(&longer, BS, 3, root_hash(0)).0.len(), 3);
        // p0's first block went (the older), so its prefix is no longer found.
        assert!(s.runner.kv_manager().lookup(&p0, BS, 2, root_hash(0)).0.is_empty());
        assert_eq!(a.tokens(), fake::greedy(0, &p0, 2, &[]));
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn a_long_prompt_is_computed_in_chunks_within_the_budget() {
        let (mut s, state) = scheduler(64, config(8, 8, false));
        let (long, short) = (prompt(0, 21), prompt(1, 5));
        let a = add(&mut s, &long, 3);
        let b = add(&mut s, &short, 3);
        assert_eq!(run(&mut s), 6);
        assert_eq!(
            span_lens(&state),
            [
                vec![(0, 8)],
                vec![(8, 8)],
                // The long prompt's last 5 tokens, and the first 3 of the short one's.
                vec![(16, 5), (0, 3)],
                vec![(21, 1), (3, 2)],
                vec![(22, 1), (5, 1)],
                vec![(6, 1)],
            ]
        );
        // Only the spans that end a prompt (or decode) ask for logits.
        let rows: Vec<usize> = state.lock().unwrap().batches.iter().map(|b| b.logits_rows.len()).collect();
        assert_eq!(rows, [0, 0, 1, 2, 2, 1]);
        assert_eq!(a.tokens(), fake::greedy(0, &long, 3, &[]));
        assert_eq!(b.tokens(), fake::greedy(0, &short, 3, &[]));
        assert_idle_and_consistent(&s);
    }

    /// Runs two requests of 6 prompt tokens and 8 output tokens each in a cache of 4 blocks of 4
    /// tokens (after 3 output tokens each, both need a third block); returns their prompts.
    fn preemption(prefix_caching: bool) -> (Scheduler, Arc<Mutex<FakeState>>, [Vec<u32>; 2]) {
        let (mut s, state) = scheduler(4, config(64, 8, prefix_caching));
        let p = [prompt(0, 6), prompt(1, 6)];
        let sinks = [add(&mut s, &p[0], 8), add(&mut s, &p[1], 8)];
        assert_eq!(run(&mut s), 13);
        for (sink, p) in sinks.iter().zip(&p) {
            assert_eq!(sink.tokens(), fake::greedy(0, p, 8, &[]));
            assert_eq!(sink.finish(), Some(FinishReason::Length));
            assert_eq!(sink.started(), [(6, 0)], "started once");
        }
        assert_eq!(s.stats().preemptions, 1);
        assert_idle_and_consistent(&s);
        (s, state, p)
    }

    #[test]
    fn preempted_sequences_come_back_and_finish_with_the_same_output() {
        let (_, state, p) = preemption(false);
        let b = spans(&state);
        // Steps 1-3: both; step 4: the second is preempted for the first's new block, which runs
        // alone to its end (step 8).
        assert_eq!(b[..3].iter().map(|x| x.len()).collect::<Vec<_>>(), [2, 2, 2]);
        for (k, step) in b[3..8].iter().enumerate() {
            assert_eq!(step.len(), 1);
            assert_eq!(step[0].0, 8 + k as u32);
        }
        // Step 9: the second is recomputed from its prompt and its 3 output tokens so far.
        let mut again = p[1].clone();
        again.extend(&fake::greedy(0, &p[1], 3, &[]));
        assert_eq!(b[8], [(0, again)]);
        assert_eq!(b[9..].iter().map(|x| x[0].0).collect::<Vec<_>>(), [9, 10, 11, 12]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_first() {
        // Three requests of 6 + 6 tokens in 6 blocks of 4: each needs a third block at its 9th token.
        let (mut s, state) = scheduler(6, config(64, 8, false));
        let p: Vec<Vec<u32>> = (0..3).map(|i| prompt(i, 6)).collect();
        let sinks: Vec<Sink> = p.iter().map(|p| add(&mut s, p, 6)).collect();
        assert_eq!(run(&mut s), 9);
        let b = span_lens(&state);
        assert_eq!(b[..3], [vec![(0, 6), (0, 6), (0, 6)], vec![(6, 1), (6, 1), (6, 1)], vec![(7, 1), (7, 1), (7, 1)]]);
        // The third makes room for the first two, which finish; then it is recomputed.
        assert_eq!(b[3..6], [vec![(8, 1), (8, 1)], vec![(9, 1), (9, 1)], vec![(10, 1), (10, 1)]]);
        assert_eq!(b[6..], [vec![(0, 9)], vec![(9, 1)], vec![(10, 1)]]);
        let mut third = p[2].clone();
        third.extend(&fake::greedy(0, &p[2], 3, &[]));
        assert_eq!(spans(&state)[6], [(0, third)]);
        for (sink, p) in sinks.iter().zip(&p) {
            assert_eq!(sink.tokens(), fake::greedy(0, p, 6, &[]));
        }
        assert_eq!(s.stats().preemptions, 1);
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn preemption_with_the_prefix_cache_evicts_the_preempted_blocks() {
        let (mut s, _, p) = preemption(true);
        // The first sequence needed the preempted one's two cached blocks, then the second needed
        // the first one's three: the cache keeps the second's last run, 12 tokens in 3 blocks.
        assert_eq!(s.stats().kv_blocks_cached, 3);
        let full = |i: usize| {
            let mut t = p[i].clone();
            t.extend(fake::greedy(0, &p[i], 8, &[]));
            t
        };
        assert_eq!(s.runner.kv_manager().lookup(&full(1), BS, 4, root_hash(0)).0.len(), 3);
        assert!(s.runner.kv_manager().lookup(&full(0), BS, 4, root_hash(0)).0.is_empty());
    }

    #[test]
    fn a_request_cancelled_while_running_or_waiting_frees_its_blocks() {
        let (mut s, state) = scheduler(16, config(64, 1, false));
        let (p0, p1, p2) = (prompt(0, 9), prompt(1, 4), prompt(2, 5));
        let a = add(&mut s, &p0, 20);
        let b = add(&mut s, &p1, 20);
        let c = add(&mut s, &p2, 2);
        s.step();
        s.step();
        assert_eq!((s.num_running(), s.num_waiting(), s.runner().blocks().num_used()), (1, 2, 3));
        a.close();
        b.close();
        // The next step drops both; the third runs.
        assert_eq!(s.step(), 5);
        assert_eq!((s.num_running(), s.num_waiting(), s.runner().blocks().num_used()), (1, 0, 2));
        run(&mut s);
        assert_eq!(a.tokens(), fake::greedy(0, &p0, 2, &[]), "two tokens before it went");
        assert!(a.finish().is_none() && a.error().is_none());
        assert!(b.started().is_empty() && b.tokens().is_empty());
        assert_eq!(c.tokens(), fake::greedy(0, &p2, 2, &[]));
        assert_eq!(span_lens(&state), [vec![(0, 9)], vec![(9, 1)], vec![(0, 5)], vec![(5, 1)]]);
        assert_eq!(s.runner().blocks().num_free(), 16);
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn a_cancelled_request_keeps_its_full_blocks_in_the_prefix_cache() {
        let (mut s, _) = scheduler(16, config(64, 4, true));
        let p = prompt(0, 9);
        let a = add(&mut s, &p, 20);
        for _ in 0..4 {
            s.step();
        }
        // 9 + 3 tokens computed: three full blocks.
        a.close();
        s.step();
        let st = s.stats();
        assert_eq!((st.kv_blocks_used, st.kv_blocks_cached, st.running), (0, 3, 0));
        // Another request of the same prompt and output so far finds them.
        let mut next = p.clone();
        next.extend(&a.tokens()[..3]);
        next.push(1);
        let b = add(&mut s, &next, 1);
        run(&mut s);
        assert_eq!(b.started(), [(13, 12)]);
        assert_eq!(b.tokens(), fake::greedy(0, &next, 1, &[]));
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn a_sequence_the_cache_cannot_hold_fails_alone() {
        // 4 blocks of 4: 16 tokens.
        let (mut s, _) = scheduler(4, config(64, 8, true));
        let (p0, p1, p2) = (prompt(0, 17), prompt(1, 10), prompt(2, 3));
        let too_long = add(&mut s, &p0, 1);
        let grows = add(&mut s, &p1, 20);
        let after = add(&mut s, &p2, 2);
        let msg = "the KV cache (16 tokens) cannot hold this sequence";
        // The first can never start; the second starts, with the third, and fails when its 17th
        // token needs a fifth block (the third has finished: it is alone), in a step that
        // computes nothing.
        assert_eq!(run(&mut s), 8);
        assert_eq!(s.stats().steps, 7);
        assert_eq!((too_long.error().as_deref(), too_long.started()), (Some(msg), vec![]));
        assert_eq!(grows.error().as_deref(), Some(msg));
        assert_eq!(grows.tokens(), fake::greedy(0, &p1, 7, &[]));
        assert_eq!(grows.finish(), None);
        assert_eq!((after.tokens(), after.finish()), (fake::greedy(0, &p2, 2, &[]), Some(FinishReason::Length)));
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn a_failing_step_fails_only_its_requests() {
        let (mut s, state) = scheduler(16, config(64, 2, false));
        let mut poisoned = prompt(0, 6);
        poisoned[4] = 63;
        state.lock().unwrap().poison = Some(63);
        let (p1, p2) = (prompt(1, 5), prompt(2, 7));
        let a = add(&mut s, &poisoned, 4);
        let b = add(&mut s, &p1, 4);
        let c = add(&mut s, &p2, 4);
        // The first step holds the first two; the third waits (two at most).
        assert_eq!(s.step(), 11);
        for sink in [&a, &b] {
            assert_eq!(sink.error().as_deref(), Some("the fake model refuses token 63"));
            assert!(sink.tokens().is_empty());
        }
        assert_eq!(s.runner().blocks().num_used(), 0);
        assert_eq!(run(&mut s), 4);
        assert_eq!(c.tokens(), fake::greedy(0, &p2, 4, &[]));
        assert_eq!(c.error(), None);
        assert_eq!(span_lens(&state)[1], [(0, 7)]);
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn stop_tokens_and_limits_end_a_request() {
        stops_and_limits_end_requests(scheduler(64, config(16, 8, true)).0);
    }

    /// Stop tokens (end-of-sequence and requested ids), max_tokens and the context end
    /// requests where they should, through `s`.
    fn stops_and_limits_end_requests(mut s: Scheduler) {
        let p = prompt(3, 6);
        let free_run = fake::greedy(0, &p, 12, &[]);
        // An eos id: the output ends at its first occurrence, with it.
        let eos = free_run[5];
        let want = fake::greedy(0, &p, 12, &[eos]);
        assert!(want.len() <= 6 && want.last() == Some(&eos));
        let mut gp = params(12);
        gp.eos_token_ids = vec![eos];
        let stop = Sink::default();
        s.add(Request { gen: SeqGen::new(&p, gp).unwrap(), logprobs: None, adapter: 0 }, Box::new(stop.clone()));
        // A stop token id from the sampling parameters works the same.
        let mut gp = params(12);
        gp.sampling.stop_token_ids = vec![eos];
        let stop_id = Sink::default();
        s.add(Request { gen: SeqGen::new(&p, gp).unwrap(), logprobs: None, adapter: 0 }, Box::new(stop_id.clone()));
        // max_tokens.
        let limit = add(&mut s, &p, 3);
        // The context: 6 prompt tokens in a context of 10 leave 4.
        let mut gp = params(12);
        gp.max_context = 10;
        let context = Sink::default();
        s.add(Request { gen: SeqGen::new(&p, gp).unwrap(), logprobs: None, adapter: 0 }, Box::new(context.clone()));
        run(&mut s);
        for sink in [&stop, &stop_id] {
            assert_eq!((sink.tokens(), sink.finish()), (want.clone(), Some(FinishReason::Stop)));
        }
        assert_eq!((limit.tokens(), limit.finish()), (free_run[..3].to_vec(), Some(FinishReason::Length)));
        assert_eq!((context.tokens(), context.finish()), (free_run[..4].to_vec(), Some(FinishReason::Length)));
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn requests_ask_for_the_logits_their_sampling_reads() {
        let (mut s, state) = scheduler(64, config(100, 8, false));
        let p = prompt(1, 5);
        add(&mut s, &p, 2);
        let top_k = GenParams {
            sampling: qwick_sampler::SamplingParams { top_k: 7, seed: Some(1), ..Default::default() },
            ..params(2)
        };
        s.add(Request { gen: SeqGen::new(&p, top_k).unwrap(), logprobs: None, adapter: 0 }, Box::new(Sink::default()));
        s.add(
            Request { gen: SeqGen::new(&p, params(2)).unwrap(), logprobs: Some(2), adapter: 0 },
            Box::new(Sink::default()),
        );
        s.add_with(request(&p, 2), Some(1), Box::new(Sink::default()));
        run(&mut s);
        let st = state.lock().unwrap();
        // The first step: the prompts' last rows (every row of the one with prompt logprobs).
        assert_eq!(st.batches[0].candidates, [1, 7, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn prompt_logprobs_come_from_every_position_computed_in_chunks() {
        let (mut s, state) = scheduler(64, config(4, 8, true));
        let p = prompt(5, 10);
        // The same prompt, cached first: prompt logprobs need every position computed anyway.
        let first = add(&mut s, &p, 1);
        run(&mut s);
        assert_eq!(first.started(), [(10, 0)]);
        let sink = Sink::default();
        let req = Request { gen: SeqGen::new(&p, params(2)).unwrap(), logprobs: Some(2), adapter: 0 };
        s.add_with(req, Some(3), Box::new(sink.clone()));
        let before = state.lock().unwrap().batches.len();
        run(&mut s);
        assert_eq!(span_lens(&state)[before..], [vec![(0, 4)], vec![(4, 4)], vec![(8, 2)], vec![(10, 1)]]);
        let rows: Vec<usize> = state.lock().unwrap().batches[before..].iter().map(|b| b.logits_rows.len()).collect();
        assert_eq!(rows, [4, 4, 2, 1]);
        let out = fake::greedy(0, &p, 2, &[]);
        let events = sink.events();
        let [Event::Started { cached_tokens: 0, .. }, Event::PromptLogprobs(lps), Event::Tokens(t0), Event::Tokens(t1), Event::Finished(FinishReason::Length)] =
            &events[..]
        else {
            panic!("{events:?}");
        };
        let mut want = vec![None];
        want.extend((1..10).map(|k| qwick_sampler::logprobs(&fake::logits(0, &p[..k]), p[k], 3).ok()));
        assert_eq!(lps, &want);
        let mut context = p.clone();
        for (t, &id) in [t0, t1].into_iter().zip(&out) {
            assert_eq!(t.len(), 1);
            assert_eq!(t[0].token.id, id);
            assert_eq!(t[0].logprobs, qwick_sampler::logprobs(&fake::logits(0, &context), id, 2).ok());
            context.push(id);
        }
        assert_idle_and_consistent(&s);
    }

    /// A deterministic pseudo-random sequence (xorshift).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn mixed_workloads_give_every_request_its_greedy_output() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let caching = seed % 2 == 0;
            let blocks = 6 + rng.below(10);
            let cfg = config(1 + rng.below(12), 1 + rng.below(4), caching);
            let (mut s, _) = scheduler(blocks, cfg.clone());
            // Prompts from a few shared stems, so that prefixes repeat.
            let stems: Vec<Vec<u32>> = (0..3).map(|i| prompt(i, 4 + rng.below(9))).collect();
            let mut reqs = vec![];
            for i in 0..8 {
                let mut p = stems[rng.below(3)].clone();
                p.truncate(1 + rng.below(p.len()));
                p.extend(prompt(10 + i, rng.below(5)));
                // Each fits the cache alone.
                let max = (1 + rng.below(10)).min(blocks * BS - p.len());
                let cancel_at = (rng.below(4) == 0).then(|| rng.below(12));
                // Some with another adapter, some with prompt logprobs.
                let (adapter, prompt_lps) = (rng.below(3).saturating_sub(1) as u16, (rng.below(4) == 0).then_some(1));
                reqs.push((p, max, rng.below(10), cancel_at, Sink::default(), adapter, prompt_lps));
            }
            let mut step = 0;
            while step <= 10 || s.has_work() {
                for (p, max, at, cancel_at, sink, adapter, prompt_lps) in &reqs {
                    if *at == step {
                        let req =
                            Request { gen: SeqGen::new(p, params(*max)).unwrap(), logprobs: None, adapter: *adapter };
                        s.add_with(req, *prompt_lps, Box::new(sink.clone()));
                    }
                    if *cancel_at == Some(step) {
                        sink.close();
                    }
                }
                s.step();
                step += 1;
                assert!(step < 2000, "seed {seed}: no progress");
            }
            for (k, (p, max, _, cancel_at, sink, adapter, prompt_lps)) in reqs.iter().enumerate() {
                let what = format!("seed {seed} request {k} ({cfg:?}, {blocks} blocks)");
                assert_eq!(sink.error(), None, "{what}");
                let want = fake::greedy(*adapter, p, *max, &[]);
                if cancel_at.is_none() {
                    assert_eq!((sink.tokens(), sink.finish()), (want, Some(FinishReason::Length)), "{what}");
                    let lps = sink.events().iter().find_map(|e| match e {
                        Event::PromptLogprobs(l) => Some(l.clone()),
                        _ => None,
                    });
                    let want_lps = prompt_lps.map(|n| {
                        let mut l = vec![None];
                        l.extend(
                            (1..p.len())
                                .map(|k| qwick_sampler::logprobs(&fake::logits(*adapter, &p[..k]), p[k], n).ok()),
                        );
                        l
                    });
                    assert_eq!(lps, want_lps, "{what}");
                } else {
                    assert!(want.starts_with(&sink.tokens()), "{what}");
                }
            }
            assert_idle_and_consistent(&s);
            if !caching {
                assert_eq!(s.runner().blocks().num_free(), blocks, "seed {seed}");
            }
        }
    }

    #[test]
    fn identical_prefixes_come_from_the_prefix_cache_per_adapter() {
        let (mut s, state) = scheduler(64, config(64, 8, true));
        let p = prompt(4, 10);
        let a = add(&mut s, &p, 6);
        run(&mut s);
        let out = fake::greedy(0, &p, 6, &[]);
        assert_eq!(a.tokens(), out);
        assert_eq!(a.started(), [(10, 0)]);
        // 10 + 5 tokens computed: 3 full blocks cached.
        assert_eq!(s.stats().kv_blocks_cached, 3);

        // The same prompt: its 2 full blocks are found, the last 2 tokens computed.
        let b = add(&mut s, &p, 6);
        run(&mut s);
        assert_eq!((b.started(), b.tokens()), (vec![(10, 8)], out.clone()));
        assert_eq!(spans(&state).iter().find(|x| x[0].0 == 8).unwrap(), &[(8, p[8..].to_vec())]);
        // The next turn: prompt and output, then more.
        let mut next = p.clone();
        next.extend(&out[..5]);
        next.extend([7, 8]);
        let c = add(&mut s, &next, 2);
        // Another adapter shares nothing.
        let d = Sink::default();
        s.add(Request { gen: SeqGen::new(&p, params(6)).unwrap(), logprobs: None, adapter: 1 }, Box::new(d.clone()));
        run(&mut s);
        assert_eq!((c.started(), c.tokens()), (vec![(17, 12)], fake::greedy(0, &next, 2, &[])));
        assert_eq!((d.started(), d.tokens()), (vec![(10, 0)], fake::greedy(1, &p, 6, &[])));
        let st = s.stats();
        assert_eq!((st.prefix_query_tokens, st.prefix_hit_tokens), (10 + 10 + 17 + 10, 8 + 12));
        assert_idle_and_consistent(&s);
    }

    fn spec(method: SpecMethod, max_draft: usize, max_seqs: usize) -> SchedulerConfig {
        SchedulerConfig { spec: Some(SpecConfig { method, max_draft, max_seqs }), ..config(64, 8, true) }
    }

    /// A scheduler that drafts with a fake draft model agreeing with the fake after all but one
    /// context in `skew` (always, for 0).
    fn drafting(skew: u64, max_draft: usize, max_seqs: usize) -> (Scheduler, Arc<Mutex<FakeState>>) {
        let (s, state, _) = drafting_in(96, skew, max_draft, max_seqs);
        (s, state)
    }

    /// [`drafting`] with a cache of `num_blocks` blocks (the draft's of 96), and the draft's
    /// state too.
    fn drafting_in(
        num_blocks: usize,
        skew: u64,
        max_draft: usize,
        max_seqs: usize,
    ) -> (Scheduler, Arc<Mutex<FakeState>>, Arc<Mutex<FakeState>>) {
        let (s, state) = scheduler(num_blocks, spec(SpecMethod::Model, max_draft, max_seqs));
        let (draft, draft_state) = fake::skewed_runner(BS, 96, skew);
        (s.with_draft_model(draft), state, draft_state)
    }

    /// Requests of several lengths, one of them arriving mid-way (a prefill beside verifying
    /// spans): every output is the plain greedy output.
    fn greedy_outputs_hold(s: &mut Scheduler) {
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 3 + 5 * i)).collect();
        let lens = [20, 7, 13, 1];
        let sinks: Vec<Sink> = prompts.iter().zip(lens).map(|(p, n)| add(s, p, n)).collect();
        for _ in 0..3 {
            s.step();
        }
        let late = prompt(9, 11);
        let late_sink = add(s, &late, 15);
        run(s);
        for ((p, n), sink) in prompts.iter().zip(lens).zip(&sinks) {
            assert_eq!(sink.tokens(), fake::greedy(0, p, n, &[]), "prompt {p:?}");
            assert_eq!(sink.finish(), Some(FinishReason::Length));
        }
        assert_eq!(late_sink.tokens(), fake::greedy(0, &late, 15, &[]));
        assert_idle_and_consistent(s);
    }

    #[test]
    fn speculative_decoding_keeps_the_greedy_output() {
        // A draft that always agrees, one that mostly does, one that never does.
        for (skew, all, some) in [(0, true, true), (3, false, true), (1, false, false)] {
            let (mut s, state) = drafting(skew, 4, 8);
            greedy_outputs_hold(&mut s);
            let st = s.stats();
            assert!(st.spec_verifications > 0 && st.spec_drafted > 0, "{st:?}");
            assert_eq!(st.spec_accepted == st.spec_drafted, all, "skew {skew}: {st:?}");
            assert!(!some || st.spec_accepted > st.spec_drafted / 3, "skew {skew}: {st:?}");
            // At most 4 drafts a verification; the fake saw every verifying span.
            assert!(st.spec_drafted <= 4 * st.spec_verifications, "{st:?}");
            let spans = span_lens(&state).iter().flatten().filter(|s| (2..=5).contains(&s.1)).count();
            assert!(spans as u64 >= st.spec_verifications.min(1), "{st:?}");
        }
        // Prompt lookup on the fake drafts little that holds, and changes nothing.
        let (mut s, _) = scheduler(96, spec(SpecMethod::Ngram { max_n: 3 }, 4, 8));
        greedy_outputs_hold(&mut s);
        assert!(s.stats().spec_drafted > 0);
    }

    #[test]
    fn drafted_tokens_stop_at_stop_tokens_and_limits() {
        stops_and_limits_end_requests(drafting(0, 8, 8).0);
    }

    #[test]
    fn drafted_tokens_get_the_logprobs_of_plain_decoding() {
        let p = prompt(4, 7);
        let run_with = |mut s: Scheduler| {
            let sink = Sink::default();
            s.add(
                Request { gen: SeqGen::new(&p, params(10)).unwrap(), logprobs: Some(3), adapter: 0 },
                Box::new(sink.clone()),
            );
            run(&mut s);
            sink.events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Tokens(t) => Some(t),
                    _ => None,
                })
                .flatten()
                .map(|t| (t.token.id, t.logprobs))
                .collect::<Vec<_>>()
        };
        let plain = run_with(scheduler(64, config(64, 8, true)).0);
        let spec = run_with(drafting(3, 4, 8).0);
        assert_eq!(plain.len(), 10);
        assert_eq!(spec, plain);
    }

    #[test]
    fn a_full_batch_does_not_speculate() {
        // Two decoding sequences at most speculate; with four, every decode span is one token.
        let (mut s, state) = drafting(0, 4, 2);
        let sinks: Vec<Sink> = (0..4).map(|i| add(&mut s, &prompt(i, 5), 6)).collect();
        run(&mut s);
        for (i, sink) in sinks.iter().enumerate() {
            assert_eq!(sink.tokens(), fake::greedy(0, &prompt(i, 5), 6, &[]));
        }
        assert_eq!(s.stats().spec_drafted, 0);
        assert!(span_lens(&state).iter().flatten().filter(|s| s.0 >= 5).all(|s| s.1 == 1));
        assert_idle_and_consistent(&s);
    }

    #[test]
    fn preempted_and_cancelled_sequences_free_their_draft_cache() {
        // A cache of 48 tokens for three sequences of 23: preemption drops their draft
        // sequences, and they come back.
        let (mut s, _, _) = drafting_in(12, 3, 4, 8);
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(i, 9)).collect();
        let sinks: Vec<Sink> = prompts.iter().map(|p| add(&mut s, p, 14)).collect();
        let cancelled = add(&mut s, &prompt(7, 5), 30);
        for _ in 0..4 {
            s.step();
        }
        cancelled.close();
        run(&mut s);
        for (p, sink) in prompts.iter().zip(&sinks) {
            assert_eq!(sink.tokens(), fake::greedy(0, p, 14, &[]));
        }
        assert!(s.stats().preemptions > 0);
        assert_idle_and_consistent(&s);
    }

    /// Output tokens may only be even.
    struct Even(Vec<u32>);

    impl qwick_sampler::TokenConstraint for Even {
        fn allowed(&mut self) -> std::result::Result<&[u32], String> {
            Ok(&self.0)
        }

        fn consume(&mut self, token: u32) -> std::result::Result<(), String> {
            if token % 2 == 1 {
                return Err(format!("{token} is odd"));
            }
            Ok(())
        }
    }

    /// A thinking budget, a constraint and penalties see every kept draft as a token of its own:
    /// each request's output with a draft (that knows none of them) is its output without.
    #[test]
    fn drafted_tokens_meet_budgets_constraints_and_penalties() {
        let requests = || {
            let p = prompt(6, 7);
            let mut reqs = vec![];
            // A thinking budget of 5 tokens, from the start.
            let mut gp = params(16);
            gp.thinking = Some(crate::ThinkingBudget {
                max_tokens: 5,
                starts_in_thinking: true,
                think_start: Some(14),
                think_end: 15,
                stop_tokens: vec![12, 15],
                stop_tokens_after_text: vec![11, 12, 15],
                newline_tokens: Arc::new([11].into_iter().collect()),
            });
            reqs.push(SeqGen::new(&p, gp).unwrap());
            // Even tokens only.
            let mut g = SeqGen::new(&p, params(12)).unwrap();
            g.constrain(Box::new(Even((0..VOCAB as u32).step_by(2).collect())), None);
            reqs.push(g);
            // Penalties and a logit bias.
            let mut gp = params(14);
            gp.sampling.repetition_penalty = 1.3;
            gp.sampling.presence_penalty = 0.5;
            gp.sampling.frequency_penalty = 0.4;
            gp.sampling.logit_bias = vec![(7, 3.0)];
            reqs.push(SeqGen::new(&p, gp).unwrap());
            reqs
        };
        let outputs = |mut s: Scheduler| {
            let sinks: Vec<Sink> = requests()
                .into_iter()
                .map(|gen| {
                    let sink = Sink::default();
                    s.add(Request { gen, logprobs: None, adapter: 0 }, Box::new(sink.clone()));
                    // One at a time, so that each speculates (at most 2 decoding would too).
                    run(&mut s);
                    sink
                })
                .collect();
            assert_idle_and_consistent(&s);
            (sinks.iter().map(|k| (k.tokens(), k.finish())).collect::<Vec<_>>(), s.stats())
        };
        let (plain, _) = outputs(scheduler(64, config(64, 8, true)).0);
        let (spec, st) = outputs(drafting(0, 4, 8).0);
        assert_eq!(spec, plain);
        assert!(plain[0].0.contains(&15), "the budget injected its stop tokens: {:?}", plain[0]);
        assert!(plain[1].0.iter().all(|t| t % 2 == 0));
        // The draft knows neither the constraint nor the penalties: some drafts were rejected.
        assert!(st.spec_accepted > 0 && st.spec_accepted < st.spec_drafted, "{st:?}");
    }

    /// A constraint that allows every token until its `n`-th mask, which fails.
    struct FailAt {
        n: usize,
        all: Vec<u32>,
    }

    impl qwick_sampler::TokenConstraint for FailAt {
        fn allowed(&mut self) -> std::result::Result<&[u32], String> {
            self.n -= 1;
            if self.n == 0 {
                return Err("the grammar broke".into());
            }
            Ok(&self.all)
        }

        fn consume(&mut self, _: u32) -> std::result::Result<(), String> {
            Ok(())
        }
    }

    /// A constraint failing on any row of a span of drafts fails its request alone: its drafts
    /// are rolled back, no other request is touched, and the books stay right.
    #[test]
    fn a_constraint_failing_among_drafts_fails_its_request_alone() {
        for n in 1..12 {
            let (mut s, _) = drafting(0, 4, 8);
            let p = prompt(2, 13);
            let mut g = SeqGen::new(&p, params(16)).unwrap();
            g.constrain(Box::new(FailAt { n, all: (0..VOCAB as u32).collect() }), None);
            let failing = Sink::default();
            s.add(Request { gen: g, logprobs: None, adapter: 0 }, Box::new(failing.clone()));
            let other = add(&mut s, &prompt(5, 9), 16);
            run(&mut s);
            assert!(failing.error().is_some_and(|e| e.contains("the grammar broke")), "n = {n}");
            assert_eq!(other.tokens(), fake::greedy(0, &prompt(5, 9), 16, &[]), "n = {n}");
            assert_idle_and_consistent(&s);
        }
    }

    /// The draft model keeps the full blocks of a sequence's own tokens in its prefix cache: a
    /// second request with the same prompt has the draft compute at most the last block of it.
    #[test]
    fn the_draft_model_computes_a_shared_prompt_once() {
        let (mut s, _, draft_state) = drafting_in(96, 3, 4, 8);
        let computed = || draft_state.lock().unwrap().batches.iter().map(|b| b.tokens.len()).sum::<usize>();
        let p = prompt(3, 30);
        let want = fake::greedy(0, &p, 6, &[]);
        let first = add(&mut s, &p, 6);
        run(&mut s);
        let by_first = computed();
        let second = add(&mut s, &p, 6);
        run(&mut s);
        let by_second = computed() - by_first;
        assert_eq!((first.tokens(), second.tokens()), (want.clone(), want));
        // The prompt's first 28 tokens (7 blocks) came from the draft's cache.
        assert!(by_first >= 29 && by_second + 28 <= by_first, "first {by_first}, second {by_second}");
        assert_idle_and_consistent(&s);
    }
}
