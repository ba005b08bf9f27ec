//! Speculative decoding: tokens drafted cheaply for a sequence are verified by the model in
//! one forward call (a span of the last token and the drafts, logits at every position), and
//! the sequence keeps the drafts the sampler accepts ([`crate::SeqGen::on_logits_draft`]) plus
//! one token of its own. Rejected drafts' K/V is rolled back ([`crate::Runner::rollback`]).
//!
//! Drafts come from the sequence itself ([`SpecMethod::Ngram`], prompt lookup: the tokens that
//! followed an earlier occurrence of its last few tokens), or from a smaller model of
//! the same vocabulary ([`SpecMethod::Model`]) run greedily through a runner of its own, with
//! its own KV cache: each sequence's draft cache follows the sequence's tokens, rolled back
//! where its drafts were rejected, and is freed with the sequence.
//!
//! Drafts are deterministic (the draft's arg-max), so the sampler's rule is the one for a draft
//! taken as certain, which keeps the target's distribution exactly.
//!
//! How many tokens a sequence drafts is chosen every step ([`DraftLen`]) from its measured
//! acceptance and the measured cost of drafting; steps with more than
//! [`SpecConfig::max_seqs`] sequences decoding do not speculate at all.

use crate::kv_manager::ROOT_HASH;
use crate::runner::{argmax, Logits, Runner, SeqId, Span};
use std::collections::HashMap;

/// Where drafts come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup: the longest match of the last `max_n` (down to 1) tokens earlier in the
    /// sequence, and what followed it.
    Ngram { max_n: usize },
    /// A draft model: the runner the engine is given beside the target's.
    Model,
}

/// Speculative decoding's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecConfig {
    pub method: SpecMethod,
    /// Most tokens drafted for a sequence in one step: the ceiling of its adaptive draft length.
    pub max_draft: usize,
    /// Steps with more decoding sequences than this do not speculate: a full batch already
    /// reads each weight for many tokens, and verification rows would only add work.
    pub max_seqs: usize,
}

impl SpecConfig {
    /// These settings, speculating only while at most `max_seqs` sequences decode.
    pub fn with_max_seqs(self, max_seqs: usize) -> SpecConfig {
        SpecConfig { max_seqs, ..self }
    }

    /// Speculation from a draft model, with `max_draft` drafted tokens at most.
    pub fn model(max_draft: usize) -> Result<SpecConfig, String> {
        check_draft_tokens(max_draft)?;
        Ok(SpecConfig { method: SpecMethod::Model, max_draft, max_seqs: DEFAULT_MAX_SEQS })
    }

    /// Parses `ngram` or `ngram:N` (`--spec`), with `max_draft` drafted tokens at most.
    pub fn parse(spec: &str, max_draft: usize) -> Result<SpecConfig, String> {
        let (kind, n) = spec.split_once(':').map_or((spec, None), |(k, n)| (k, Some(n)));
        let method = match kind {
            "ngram" => {
                let max_n = match n {
                    None => DEFAULT_NGRAM,
                    Some(n) => n
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_NGRAM).contains(n))
                        .ok_or_else(|| format!("--spec ngram:N takes N from 1 to {MAX_NGRAM}, not {n:?}"))?,
                };
                SpecMethod::Ngram { max_n }
            }
            _ => return Err(format!("--spec takes ngram or ngram:N, not {spec:?}")),
        };
        check_draft_tokens(max_draft)?;
        Ok(SpecConfig { method, max_draft, max_seqs: DEFAULT_MAX_SEQS })
    }
}

fn check_draft_tokens(max_draft: usize) -> Result<(), String> {
    if max_draft == 0 || max_draft > MAX_DRAFT {
        return Err(format!("--draft-tokens takes 1 to {MAX_DRAFT}, not {max_draft}"));
    }
    Ok(())
}

/// A sequence's request for drafts in a step: its tokens, and how many drafts it may take.
pub(crate) struct Ask<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub max: usize,
}

/// Where a scheduler's drafts come from.
pub(crate) enum Drafter {
    Ngram { max_n: usize },
    Model(Box<ModelDrafter>),
}

impl Drafter {
    /// Drafts for each ask (at most its `max` tokens; possibly none), and the seconds one
    /// drafted token took for all of them (a draft model's step, not counting its catching up
    /// on new tokens; `None` where nothing was timed).
    pub fn draft(&mut self, asks: &[Ask]) -> (Vec<Vec<u32>>, Option<f64>) {
        match self {
            Drafter::Ngram { max_n } => (asks.iter().map(|a| ngram_draft(a.tokens, *max_n, a.max)).collect(), None),
            Drafter::Model(m) => m.draft(asks),
        }
    }

    /// Checks the draft cache's bookkeeping (see [`crate::Scheduler::check_kv`]); `idle`: no
    /// sequence is running, so the draft cache must hold none.
    pub fn check(&self, idle: bool) -> Result<(), String> {
        let Drafter::Model(m) = self else { return Ok(()) };
        let r = &m.runner;
        r.blocks().check(r.block_references()).map_err(|e| format!("draft cache: {e}"))?;
        if idle && (!m.seqs.is_empty() || r.blocks().num_used() > r.blocks().evictable()) {
            return Err(format!("draft cache: {} sequences kept while idle", m.seqs.len()));
        }
        Ok(())
    }

    /// The sequence ended or left the runner: drops what was kept for it.
    pub fn forget(&mut self, seq: SeqId) {
        if let Drafter::Model(m) = self {
            m.forget(seq);
        }
    }
}

/// Drafts from a draft model, greedily, over a runner of its own, whose prefix cache keeps the
/// full blocks of the sequences' own tokens (a prompt shared by requests, or a chat's earlier
/// turns, is computed by the draft once).
pub(crate) struct ModelDrafter {
    runner: Runner,
    /// Per target sequence: its draft sequence.
    seqs: HashMap<SeqId, DraftSeq>,
}

struct DraftSeq {
    /// The draft runner's sequence.
    seq: SeqId,
    /// The tokens whose K/V the draft cache holds (the sequence's, then drafts).
    known: Vec<u32>,
    /// Leading blocks offered to the prefix cache, and the hash of that prefix.
    registered: usize,
    hash: u64,
}

/// Tokens of one sequence the draft model catches up on per forward call, at most.
const CATCH_UP_CHUNK: usize = 512;

impl ModelDrafter {
    pub fn new(runner: Runner) -> ModelDrafter {
        ModelDrafter { runner, seqs: HashMap::new() }
    }

    pub fn forget(&mut self, seq: SeqId) {
        if let Some(d) = self.seqs.remove(&seq) {
            self.runner.free_sequence(d.seq);
        }
    }

    /// A draft sequence for `tokens`, from the longest cached prefix of all but the last.
    fn start(&mut self, tokens: &[u32]) -> anyhow::Result<DraftSeq> {
        let bs = self.runner.block_size();
        let (blocks, hash) = self.runner.kv_manager().lookup(tokens, bs, (tokens.len() - 1) / bs, ROOT_HASH);
        let seq = self.runner.add_sequence_with_prefix(tokens.len(), &blocks)?;
        // Drafts are the arg-max: the best logit is all a draft step reads.
        self.runner.set_candidates(seq, Some(1))?;
        let known = tokens[..blocks.len() * bs].to_vec();
        Ok(DraftSeq { seq, known, registered: blocks.len(), hash })
    }

    /// Offers the full blocks of `d`'s known tokens, all the sequence's own, to the prefix cache.
    fn register(&mut self, d: &mut DraftSeq) {
        let bs = self.runner.block_size();
        let table = self.runner.block_table(d.seq).unwrap_or(&[]).to_vec();
        let full = (d.known.len() / bs).min(table.len());
        for (k, &block) in table.iter().enumerate().take(full).skip(d.registered) {
            d.hash = self.runner.kv_manager().offer(d.hash, &d.known[k * bs..(k + 1) * bs], block);
        }
        d.registered = d.registered.max(full);
    }

    /// Runs one step of the draft runner, evicting cached prefixes nobody uses to make room.
    fn step(&mut self, spans: &[Span]) -> anyhow::Result<Vec<Vec<f32>>> {
        let need: usize = spans.iter().map(|s| self.runner.blocks_needed(s.seq, s.tokens.len()).unwrap_or(0)).sum();
        while self.runner.blocks().num_free() < need && self.runner.kv_manager().evict_one() {}
        self.runner.step(spans)
    }

    /// Brings each ask's draft sequence to all but the last of its tokens (rolling back drafts
    /// that were not kept, computing what is new in chunks), then runs the draft model step by
    /// step from the last token; returns the drafts and the seconds of one such step. A
    /// failing step (the draft's cache full) drops the drafts of that call and every draft
    /// sequence (those of sequences not asking now too, which may be what fills the cache):
    /// they start over when next asked.
    fn draft(&mut self, asks: &[Ask]) -> (Vec<Vec<u32>>, Option<f64>) {
        let mut out = vec![vec![]; asks.len()];
        match self.try_draft(asks, &mut out) {
            Ok(step_s) => (out, step_s),
            Err(e) => {
                log_draft_failure(&e);
                let all: Vec<SeqId> = self.seqs.keys().copied().collect();
                for s in all {
                    self.forget(s);
                }
                (vec![vec![]; asks.len()], None)
            }
        }
    }

    fn try_draft(&mut self, asks: &[Ask], out: &mut [Vec<u32>]) -> anyhow::Result<Option<f64>> {
        let live: Vec<usize> = (0..asks.len()).filter(|&i| asks[i].max > 0 && !asks[i].tokens.is_empty()).collect();
        for &i in &live {
            let a = &asks[i];
            let mut d = match self.seqs.remove(&a.seq) {
                Some(d) => d,
                None => self.start(a.tokens)?,
            };
            // Keep the longest prefix of what the draft cache holds that the sequence still has,
            // leaving at least the last token to compute (never into shared blocks: those hold
            // the sequence's own tokens, which it keeps).
            let same = d.known.iter().zip(a.tokens).take_while(|(k, t)| k == t).count();
            let keep = same.min(a.tokens.len() - 1);
            let rolled = self.runner.rollback(d.seq, keep);
            d.known.truncate(keep);
            self.register(&mut d);
            // Kept before any error, so that a failure frees it with the others.
            self.seqs.insert(a.seq, d);
            rolled?;
        }
        // Catch up in chunks until only the last token's span remains for every ask.
        loop {
            let mut spans = vec![];
            for &i in &live {
                let d = &self.seqs[&asks[i].seq];
                let rest = &asks[i].tokens[d.known.len()..];
                if rest.len() > 1 {
                    let n = (rest.len() - 1).min(CATCH_UP_CHUNK);
                    spans.push((i, d.seq, &rest[..n]));
                }
            }
            if spans.is_empty() {
                break;
            }
            let batch: Vec<Span> =
                spans.iter().map(|&(_, seq, t)| Span { seq, tokens: t, logits: Logits::None }).collect();
            self.step(&batch)?;
            let done: Vec<(usize, Vec<u32>)> = spans.iter().map(|&(i, _, t)| (i, t.to_vec())).collect();
            for (i, t) in done {
                let mut d = self.seqs.remove(&asks[i].seq).expect("asked");
                d.known.extend(t);
                self.register(&mut d);
                self.seqs.insert(asks[i].seq, d);
            }
        }
        // Then one token at a time: the last token, then each draft, while asks want more.
        let mut next: Vec<(usize, u32)> =
            live.iter().map(|&i| (i, *asks[i].tokens.last().expect("not empty"))).collect();
        let (t0, mut steps) = (std::time::Instant::now(), 0);
        while !next.is_empty() {
            steps += 1;
            let toks: Vec<[u32; 1]> = next.iter().map(|&(_, t)| [t]).collect();
            let batch: Vec<Span> = next
                .iter()
                .zip(&toks)
                .map(|(&(i, _), t)| Span { seq: self.seqs[&asks[i].seq].seq, tokens: t, logits: Logits::Last })
                .collect();
            let logits = self.step(&batch)?;
            let mut more = vec![];
            for ((i, t), l) in next.into_iter().zip(logits) {
                self.seqs.get_mut(&asks[i].seq).expect("asked").known.push(t);
                let d = argmax(&l);
                out[i].push(d);
                if out[i].len() < asks[i].max {
                    more.push((i, d));
                }
            }
            next = more;
        }
        Ok((steps > 0).then(|| t0.elapsed().as_secs_f64() / steps as f64))
    }
}

/// Says once per process that drafting failed (speculation goes on without those drafts).
fn log_draft_failure(e: &anyhow::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("qwick: the draft model could not draft ({e:#}); those steps decode plainly"));
}

/// The longest n-gram `--spec ngram` looks up by default.
pub const DEFAULT_NGRAM: usize = 3;
const MAX_NGRAM: usize = 16;
/// Drafted tokens per step at most, by default.
pub const DEFAULT_DRAFT_TOKENS: usize = 5;
const MAX_DRAFT: usize = 32;
/// Decoding sequences up to which a step speculates, by default. Measured with an 8B-shaped
/// Q4_K_M model and a 4-layer draft at 0.7 acceptance on 2 cores: 1.8x plain decoding for one
/// sequence, 1.05x for two, 0.8x for four (each verified row costs more than the weight read
/// it shares once several sequences verify).
pub const DEFAULT_MAX_SEQS: usize = 2;

/// Up to `k` tokens that followed an earlier occurrence of the last `n` tokens of `tokens`, for
/// the largest `n` from `max_n` down to 1 that occurs (empty if none does): the latest
/// occurrence followed by `k` tokens, else the earliest.
pub fn ngram_draft(tokens: &[u32], max_n: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return vec![];
    }
    for n in (1..=max_n.min(len.saturating_sub(1))).rev() {
        let pattern = &tokens[len - n..];
        // The latest occurrence (ending before the last token, so something follows it) that
        // is followed by k tokens, else the earliest, which is followed by the most (in a
        // repeating run the latest is followed by one token only).
        let mut found = None;
        for i in (0..len - n).rev().filter(|&i| &tokens[i..i + n] == pattern) {
            found = Some(i + n);
            if len - (i + n) >= k {
                break;
            }
        }
        if let Some(from) = found {
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    vec![]
}

/// A sequence's adaptive draft length, chosen each step to make the most tokens per unit of
/// time from what has been measured: the sequence's acceptance rate `a` (per drafted token, a
/// decaying average) and the cost of a drafted token relative to a target step `c` (the
/// scheduler's measurement), plus `VERIFY_ROW_COST` per verified row. `K` drafts yield
/// `(1 − a^(K+1)) / (1 − a)` tokens in a step costing `1 + K (c + VERIFY_ROW_COST)`; when no
/// `K` beats plain decoding (`K = 0`), the sequence decodes plainly for a pause, then tries
/// one drafted token to measure again; the pause doubles (from `PAUSE` to `MAX_PAUSE` steps)
/// while nothing is accepted.
#[derive(Clone, Debug)]
pub struct DraftLen {
    /// Decayed counts of drafted tokens accepted and of drafted tokens judged.
    accepted: f64,
    judged: f64,
    paused: usize,
    /// The next pause's length.
    pause: usize,
}

/// What verifying one more row adds to a decode step, relative to the step (a CPU reads the
/// weights once for a few rows; measured on the 2-core Xeon of the README's figures, 8 rows
/// cost about 1.5 rows).
pub const VERIFY_ROW_COST: f64 = 0.06;
const PAUSE: usize = 16;
const MAX_PAUSE: usize = 256;
/// Weight of the past in the acceptance average, per verification.
const DECAY: f64 = 0.8;

/// A new sequence's: acceptance assumed 0.6 (the weight of about two verifications) until
/// measured.
impl Default for DraftLen {
    fn default() -> DraftLen {
        DraftLen { accepted: 1.2, judged: 2.0, paused: 0, pause: PAUSE }
    }
}

impl DraftLen {
    /// The acceptance rate measured so far.
    pub fn acceptance(&self) -> f64 {
        self.accepted / self.judged
    }

    /// Tokens to draft this step, at most `max`, when a drafted token costs `cost` target
    /// steps (0: decode plainly).
    pub fn next(&mut self, max: usize, cost: f64) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return usize::from(self.paused == 0).min(max);
        }
        let a = self.acceptance().clamp(0.0, 0.999);
        let gain = |k: usize| (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) / (1.0 + k as f64 * (cost + VERIFY_ROW_COST));
        let best = (0..=max).max_by(|&x, &y| gain(x).total_cmp(&gain(y))).unwrap_or(0);
        if best == 0 && max > 0 {
            self.paused = self.pause;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
        best
    }

    /// Records a verification of `drafted` tokens of which the first `accepted` were kept
    /// (a rejection judged the token after them).
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        let judged = accepted + usize::from(accepted < drafted);
        if accepted > 0 {
            self.pause = PAUSE;
        }
        self.accepted = self.accepted * DECAY + accepted as f64;
        self.judged = self.judged * DECAY + judged as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_drafts_follow_the_longest_match() {
        // The last three (9 2 3) never occurred before; "2 3" did, twice: the latest is
        // followed by 7 8.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 2, 3];
        assert_eq!(ngram_draft(&t, 3, 2), vec![7, 8]);
        // Ten tokens follow only the earlier one.
        assert_eq!(ngram_draft(&t, 3, 10), vec![4, 5, 1, 2, 3, 7, 8, 9, 2, 3]);
        // With n = 1, the latest earlier "3" is followed by 7.
        assert_eq!(ngram_draft(&t, 1, 1), vec![7]);
        assert_eq!(ngram_draft(&[5, 6, 7], 3, 4), Vec::<u32>::new());
        assert_eq!(ngram_draft(&[5], 3, 4), Vec::<u32>::new());
        assert_eq!(ngram_draft(&[5, 5], 3, 4), vec![5]);
        // In a run, the earliest occurrence is followed by the most.
        assert_eq!(ngram_draft(&[1, 5, 5, 5, 5, 5], 2, 3), vec![5, 5, 5]);
        assert_eq!(ngram_draft(&[1, 5, 5, 5, 5, 5], 2, 9), vec![5, 5, 5]);
        assert_eq!(ngram_draft(&t, 3, 0), Vec::<u32>::new());
    }

    #[test]
    fn draft_length_follows_acceptance_and_cost() {
        let mut d = DraftLen::default();
        // Cheap drafts (prompt lookup) at the assumed 0.6: about 4 (the verified rows cost).
        assert_eq!(d.next(8, 0.0), 4);
        // Drafts costing 0.4 of a step at 0.6 acceptance: one.
        assert_eq!(d.next(8, 0.4), 1);
        // Everything accepted for a while: the most a moderate cost allows.
        for _ in 0..10 {
            d.update(5, 5);
        }
        assert!(d.acceptance() > 0.9);
        assert!(d.next(8, 0.2) >= 6);
        // Nothing accepted: plain decoding for a pause, then one token to measure again.
        for _ in 0..20 {
            d.update(3, 0);
        }
        assert!(d.acceptance() < 0.2);
        assert_eq!(d.next(8, 0.2), 0);
        for _ in 0..PAUSE - 1 {
            assert_eq!(d.next(8, 0.2), 0);
        }
        assert_eq!(d.next(8, 0.2), 1);
        // A rejected first draft judged one token; the average moves toward 0.
        let before = d.acceptance();
        d.update(1, 0);
        assert!(d.acceptance() < before);
        // The probe failed: twice the pause.
        let paused = (0..4 * PAUSE).take_while(|_| d.next(8, 0.2) == 0).count();
        assert_eq!(paused, 2 * PAUSE);
        // An accepted probe ends the backing off.
        d.update(1, 1);
        assert_eq!(d.pause, PAUSE);
    }

    #[test]
    fn spec_settings_parse_and_refuse() {
        let c = SpecConfig::parse("ngram", 5).unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { max_n: DEFAULT_NGRAM });
        assert_eq!(SpecConfig::parse("ngram:5", 2).unwrap().method, SpecMethod::Ngram { max_n: 5 });
        assert!(SpecConfig::parse("ngram:0", 5).unwrap_err().contains("ngram:N"));
        assert!(SpecConfig::parse("eagle", 5).unwrap_err().contains("ngram"));
        assert!(SpecConfig::parse("ngram", 0).unwrap_err().contains("--draft-tokens"));
    }
}
