//! The model runner: owns the model (with its KV cache and thread pool) and the block allocator;
//! keeps each sequence's block table and how many of its tokens are cached; turns a list of spans
//! (each with its tokens: the sequence's tokens are its caller's) into one batch.
//!
//! The runner steps through a [`StepModel`]: [`Qwen3Forward`] is the real model on the CPU,
//! [`GpuForward`] the same model on a GPU; the engine's tests drive the runner and the
//! scheduler through a fake.

use crate::kv_manager::KvManager;
use anyhow::{anyhow, bail, Result};
use qwick_backend::{Bf16Mode, Ctx, DeviceSpec, Format, Isa, ThreadPool};
use qwick_model::{Batch, KvCache, Qwen3};
use std::collections::HashMap;
use std::sync::Arc;

pub type SeqId = u64;

#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the cache.
    pub num_blocks: usize,
    pub threads: usize,
    pub isa: Isa,
    /// Products with quantized weights use f32 activations (see [`Ctx::exact`]).
    pub exact: bool,
    /// The KV cache's element format (f32 unless set).
    pub kv_format: Format,
    /// How bf16 weights are multiplied (`None`: as the ISA implies; see [`Ctx::bf16`]).
    pub bf16: Option<Bf16Mode>,
    /// Where the model runs.
    pub device: DeviceSpec,
}

impl RunnerConfig {
    /// A cache holding exactly `tokens` tokens of f32 K/V.
    pub fn with_tokens(tokens: usize, threads: usize, isa: Isa) -> RunnerConfig {
        let block_size = 16;
        RunnerConfig {
            block_size,
            num_blocks: tokens.div_ceil(block_size).max(1),
            threads,
            isa,
            exact: false,
            kv_format: Format::F32,
            bf16: None,
            device: DeviceSpec::Cpu,
        }
    }
}

struct Sequence {
    /// Tokens whose K/V is in the cache.
    cached: usize,
    blocks: Vec<u32>,
    /// The model's LoRA adapter this sequence runs with (0: the model's default).
    adapter: u16,
    /// How many of its logits' highest-ranked entries are read (0: all).
    candidates: u32,
}

/// Which logits a span asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
    /// Instead of logits, the last token's hidden state after the final norm.
    Hidden,
}

/// Part of one step: `tokens`, the next tokens of sequence `seq` after those in the cache.
#[derive(Clone, Copy, Debug)]
pub struct Span<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// What the runner steps through: a model with its paged KV cache.
pub trait StepModel {
    /// Runs one forward call over `batch`, writing the K/V of its tokens into the cache slots of
    /// its slot mapping, and returns the logits of its `logits_rows`, `[rows, vocab]` row-major.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>>;
    fn vocab_size(&self) -> usize;
    /// Width of the hidden states ([`Logits::Hidden`]).
    fn hidden_size(&self) -> usize;
    /// LoRA adapters the model has (numbered from 1; 0 is the model's default).
    fn adapters(&self) -> u16;
    /// Bytes of the KV cache.
    fn kv_bytes(&self) -> usize;
}

/// The Qwen3 model with its KV cache and thread pool.
pub struct Qwen3Forward {
    model: Arc<Qwen3>,
    kv: KvCache,
    pool: ThreadPool,
    isa: Isa,
    exact: bool,
    bf16: Option<Bf16Mode>,
}

impl Qwen3Forward {
    pub fn new(model: Arc<Qwen3>, cfg: &RunnerConfig) -> Qwen3Forward {
        qwick_backend::alloc::tune_allocator();
        let kv = model.new_kv_cache_as(cfg.kv_format, cfg.num_blocks, cfg.block_size);
        Qwen3Forward { model, kv, pool: ThreadPool::new(cfg.threads), isa: cfg.isa, exact: cfg.exact, bf16: cfg.bf16 }
    }
}

impl StepModel for Qwen3Forward {
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let ctx = Ctx { isa: self.isa, pool: &self.pool, exact: self.exact, bf16: self.bf16 };
        self.model.forward(ctx, batch, &mut self.kv)
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.model.config.hidden_size
    }

    fn adapters(&self) -> u16 {
        self.model.adapters()
    }

    fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// The Qwen3 model on a GPU, with its KV cache in device memory.
#[cfg(feature = "gpu")]
pub struct GpuForward(qwick_model::gpu::GpuModel);

#[cfg(feature = "gpu")]
impl GpuForward {
    /// The model uploaded to GPU adapter `index`, with the cache of `cfg`.
    pub fn new(model: Arc<Qwen3>, index: usize, cfg: &RunnerConfig) -> Result<GpuForward> {
        let gpu = qwick_backend::gpu::Gpu::open(index).map_err(anyhow::Error::msg)?;
        let cache = (cfg.num_blocks, cfg.block_size, cfg.kv_format);
        Ok(GpuForward(qwick_model::gpu::GpuModel::on(gpu, model, cache)?))
    }
}

#[cfg(feature = "gpu")]
impl StepModel for GpuForward {
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        self.0.forward(batch)
    }

    fn vocab_size(&self) -> usize {
        self.0.model().config.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.0.model().config.hidden_size
    }

    fn adapters(&self) -> u16 {
        self.0.model().adapters()
    }

    fn kv_bytes(&self) -> usize {
        self.0.kv_bytes()
    }
}

pub struct Runner {
    model: Box<dyn StepModel>,
    block_size: usize,
    blocks: KvManager,
    seqs: HashMap<SeqId, Sequence>,
    next_id: SeqId,
}

impl Runner {
    /// A runner over the Qwen3 model `model` on the device of `cfg`, with its cache (and on
    /// the CPU its threads).
    pub fn new(model: Arc<Qwen3>, cfg: &RunnerConfig) -> Result<Runner> {
        let step: Box<dyn StepModel> = match cfg.device {
            DeviceSpec::Cpu => Box::new(Qwen3Forward::new(model, cfg)),
            #[cfg(feature = "gpu")]
            DeviceSpec::Gpu(i) => Box::new(GpuForward::new(model, i, cfg)?),
            #[cfg(not(feature = "gpu"))]
            DeviceSpec::Gpu(_) => bail!("this qwick was built without GPU support (cargo feature `gpu`)"),
        };
        Ok(Runner::with_model(step, cfg.block_size, cfg.num_blocks))
    }

    /// A runner over `model`, whose KV cache has `num_blocks` blocks of `block_size` tokens.
    pub fn with_model(model: Box<dyn StepModel>, block_size: usize, num_blocks: usize) -> Runner {
        Runner { model, block_size, blocks: KvManager::new(num_blocks), seqs: HashMap::new(), next_id: 0 }
    }

    pub fn kv_bytes(&self) -> usize {
        self.model.kv_bytes()
    }

    /// The KV manager: block allocator and prefix cache.
    pub fn blocks(&self) -> &KvManager {
        &self.blocks
    }

    pub fn kv_manager(&mut self) -> &mut KvManager {
        &mut self.blocks
    }

    /// How many references the runner's sequences hold on each block (by block id).
    pub fn block_references(&self) -> Vec<u32> {
        let mut refs = vec![0u32; self.blocks.num_blocks()];
        for s in self.seqs.values() {
            for &b in &s.blocks {
                refs[b as usize] += 1;
            }
        }
        refs
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Registers a sequence, with nothing in the cache yet.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Sequence { cached: 0, blocks: vec![], adapter: 0, candidates: 0 });
        id
    }

    /// Runs sequence `seq` with the model's LoRA adapter `adapter` (see `Qwen3::add_adapter`).
    pub fn set_adapter(&mut self, seq: SeqId, adapter: u16) -> Result<()> {
        if adapter > self.model.adapters() {
            bail!("adapter {adapter} asked for, but the model has {}", self.model.adapters());
        }
        self.seqs.get_mut(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))?.adapter = adapter;
        Ok(())
    }

    /// Says that only the `n` highest-ranked logits of each of the sequence's rows are read
    /// (what [`qwick_sampler::SamplingParams::candidates`] gives), so that a device may bring
    /// back just those ([`Batch::candidates`]); `None`: every logit, as by default.
    pub fn set_candidates(&mut self, seq: SeqId, n: Option<usize>) -> Result<()> {
        let s = self.seqs.get_mut(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))?;
        s.candidates = n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX).max(1));
        Ok(())
    }

    /// Registers a sequence of `tokens` tokens whose first `prefix_blocks.len() * block_size` are
    /// already in the cache, in `prefix_blocks` (full blocks shared through the prefix cache; each
    /// gains a reference). At least one token must be left to compute, so that the shared blocks
    /// are never written.
    pub fn add_sequence_with_prefix(&mut self, tokens: usize, prefix_blocks: &[u32]) -> Result<SeqId> {
        let cached = prefix_blocks.len() * self.block_size;
        if cached >= tokens {
            bail!("a prefix of {cached} cached tokens leaves none of the {tokens} tokens to compute");
        }
        if let Some(&b) =
            prefix_blocks.iter().find(|&&b| b as usize >= self.blocks.num_blocks() || self.blocks.ref_count(b) == 0)
        {
            bail!("prefix block {b} is not in use");
        }
        for &b in prefix_blocks {
            self.blocks.retain(b);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Sequence { cached, blocks: prefix_blocks.to_vec(), adapter: 0, candidates: 0 });
        Ok(id)
    }

    /// Tokens of the sequence whose K/V is in the cache.
    pub fn cached(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.cached)
    }

    /// The sequence's block table (physical block of each logical block).
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.blocks.as_slice())
    }

    /// New blocks a span of the next `len` tokens of `seq` would allocate.
    pub fn blocks_needed(&self, seq: SeqId, len: usize) -> Result<usize> {
        let s = self.seqs.get(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))?;
        Ok((s.cached + len).div_ceil(self.block_size).saturating_sub(s.blocks.len()))
    }

    /// Forgets the K/V of the sequence's tokens from `cached` on (drafted tokens that were not
    /// accepted), releasing the blocks past the last one still used. Those positions are written
    /// again by the next step; full blocks the prefix cache shares are never rolled back into.
    pub fn rollback(&mut self, seq: SeqId, cached: usize) -> Result<()> {
        let bs = self.block_size;
        let s = self.seqs.get_mut(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))?;
        if cached > s.cached {
            bail!("sequence {seq}: cannot roll forward from {} to {cached} tokens", s.cached);
        }
        s.cached = cached;
        for b in s.blocks.split_off(cached.div_ceil(bs)) {
            self.blocks.release(b);
        }
        Ok(())
    }

    /// Frees the sequence and its blocks.
    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for b in s.blocks {
                self.blocks.release(b);
            }
        }
    }

    /// Runs one forward call over `spans` (one per sequence) and returns each span's logits,
    /// `[rows, vocab]` row-major (1 row for `Last`, a row per token for `All`, none for `None`),
    /// or for `Hidden` its last token's hidden state.
    /// Fails without side effects if the cache lacks blocks for the new tokens.
    pub fn step(&mut self, spans: &[Span]) -> Result<Vec<Vec<f32>>> {
        let bs = self.block_size;
        // Check sizes and blocks first, then allocate.
        let mut need = 0;
        for (i, sp) in spans.iter().enumerate() {
            if spans[..i].iter().any(|o| o.seq == sp.seq) {
                bail!("sequence {} appears twice in one step", sp.seq);
            }
            let s = self.seqs.get(&sp.seq).ok_or_else(|| anyhow!("unknown sequence {}", sp.seq))?;
            if sp.tokens.is_empty() {
                bail!("sequence {}: empty span", sp.seq);
            }
            need += (s.cached + sp.tokens.len()).div_ceil(bs).saturating_sub(s.blocks.len());
        }
        if need > self.blocks.num_free() {
            bail!(
                "KV cache full: step needs {need} blocks, {} free of {}",
                self.blocks.num_free(),
                self.blocks.num_blocks()
            );
        }
        let mut batch = Batch::default();
        for sp in spans {
            let s = self.seqs.get_mut(&sp.seq).unwrap();
            while s.blocks.len() * bs < s.cached + sp.tokens.len() {
                s.blocks.push(self.blocks.allocate().expect("checked above"));
            }
            let rows = batch.push_span(sp.tokens, s.cached, &s.blocks, bs, sp.logits == Logits::All);
            if s.adapter > 0 {
                // Sequences before this one keep the default (0).
                batch.seq_adapter.resize(batch.block_tables.len() - 1, 0);
                batch.seq_adapter.push(s.adapter);
            }
            if matches!(sp.logits, Logits::None | Logits::Hidden) {
                batch.logits_rows.retain(|&r| r as usize != rows.end - 1);
            }
            if sp.logits == Logits::Hidden {
                batch.hidden_rows.push(rows.end as u32 - 1);
            }
            batch.candidates.resize(batch.logits_rows.len(), s.candidates);
        }
        let logits = self.model.forward(&batch)?;
        let (vocab, hidden) = (self.model.vocab_size(), self.model.hidden_size());
        // The logits rows, then the hidden rows.
        let mut hidden_at = batch.logits_rows.len() * vocab;
        let mut out = Vec::with_capacity(spans.len());
        let mut row = 0;
        for sp in spans {
            self.seqs.get_mut(&sp.seq).unwrap().cached += sp.tokens.len();
            let rows = match sp.logits {
                Logits::None | Logits::Hidden => 0,
                Logits::Last => 1,
                Logits::All => sp.tokens.len(),
            };
            if sp.logits == Logits::Hidden {
                out.push(logits[hidden_at..hidden_at + hidden].to_vec());
                hidden_at += hidden;
                continue;
            }
            out.push(logits[row * vocab..(row + rows) * vocab].to_vec());
            row += rows;
        }
        Ok(out)
    }

    /// Logits of every position of `tokens`, run as one sequence in chunks of at most
    /// `chunk` tokens; the sequence is freed afterwards.
    pub fn score(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("no tokens given");
        }
        let id = self.add_sequence();
        let mut all = Vec::with_capacity(tokens.len() * self.model.vocab_size());
        let r = (|| {
            for part in tokens.chunks(chunk.max(1)) {
                let mut l = self.step(&[Span { seq: id, tokens: part, logits: Logits::All }])?;
                all.append(&mut l[0]);
            }
            Ok(())
        })();
        self.free_sequence(id);
        r.map(|_| all)
    }
}

/// Index of the largest value (the lowest index among ties; NaN ranks as -inf, as the
/// sampler ranks it, so a row of only its best candidate gives the same index).
pub fn argmax(x: &[f32]) -> u32 {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if key(v) > key(x[best]) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{self, VOCAB};

    fn prompt(i: usize, len: usize) -> Vec<u32> {
        (0..len).map(|j| ((i * 31 + j * 17 + 5) % VOCAB) as u32).collect()
    }

    fn span(seq: SeqId, tokens: &[u32], logits: Logits) -> Span<'_> {
        Span { seq, tokens, logits }
    }

    /// Greedy tokens of each prompt, `n` each, all run together: a prompt is computed in chunks
    /// of at most `chunk` tokens, then one token per step. The sequences are freed at the end.
    fn decode(r: &mut Runner, prompts: &[Vec<u32>], n: usize, chunk: usize) -> Vec<Vec<u32>> {
        let ids: Vec<SeqId> = prompts.iter().map(|_| r.add_sequence()).collect();
        let mut tokens = prompts.to_vec();
        let mut out = vec![0; prompts.len()];
        while out.iter().any(|&o| o < n) {
            let mut spans = vec![];
            for (k, &seq) in ids.iter().enumerate().filter(|&(k, _)| out[k] < n) {
                let cached = r.cached(seq).unwrap();
                let len = (tokens[k].len() - cached).min(chunk);
                let last = cached + len == tokens[k].len();
                spans.push((
                    k,
                    span(seq, &tokens[k][cached..cached + len], if last { Logits::Last } else { Logits::None }),
                ));
            }
            let batch: Vec<Span> = spans.iter().map(|s| s.1).collect();
            let logits = r.step(&batch).unwrap();
            let spans: Vec<(usize, Logits)> = spans.iter().map(|(k, sp)| (*k, sp.logits)).collect();
            for ((k, logits), l) in spans.into_iter().zip(logits) {
                if logits == Logits::None {
                    assert!(l.is_empty());
                    continue;
                }
                assert_eq!(l.len(), VOCAB);
                tokens[k].push(argmax(&l));
                out[k] += 1;
            }
        }
        for id in ids {
            r.free_sequence(id);
        }
        tokens.iter().zip(prompts).map(|(t, p)| t[p.len()..].to_vec()).collect()
    }

    #[test]
    fn sequences_batched_together_give_what_they_give_alone() {
        let prompts: Vec<Vec<u32>> = [1, 5, 16, 23, 40].iter().enumerate().map(|(i, &n)| prompt(i, n)).collect();
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| fake::greedy(0, p, 12, &[])).collect();
        let (mut r, _) = fake::runner(4, 64);
        for (p, w) in prompts.iter().zip(&want) {
            assert_eq!(&decode(&mut r, std::slice::from_ref(p), 12, usize::MAX)[0], w);
        }
        for chunk in [1, 3, 7, usize::MAX] {
            assert_eq!(decode(&mut r, &prompts, 12, chunk), want, "prefill chunks of {chunk}");
            assert_eq!(r.blocks().num_used(), 0);
            assert_eq!(r.blocks().check(r.block_references()), Ok(()));
        }
    }

    #[test]
    fn argmax_takes_the_lowest_of_ties_and_ranks_nan_last() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, -1.0]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn each_logits_row_carries_its_sequences_candidates() {
        let (mut r, state) = fake::runner(4, 8);
        let p = prompt(1, 9);
        let (a, b, c) = (r.add_sequence(), r.add_sequence(), r.add_sequence());
        r.set_candidates(a, Some(20)).unwrap();
        r.set_candidates(b, Some(1)).unwrap();
        assert!(r.set_candidates(99, Some(1)).is_err());
        let spans = [span(a, &p[..3], Logits::All), span(b, &p[..2], Logits::Last), span(c, &p[..2], Logits::Last)];
        r.step(&spans).unwrap();
        r.set_candidates(a, None).unwrap();
        r.step(&[span(b, &p[2..4], Logits::None), span(a, &p[3..4], Logits::Last)]).unwrap();
        let st = state.lock().unwrap();
        assert_eq!(st.batches[0].candidates, [20, 20, 20, 1, 0]);
        assert_eq!(st.batches[1].candidates, [0]);
    }

    #[test]
    fn logits_of_every_position_the_last_or_none() {
        let (mut r, state) = fake::runner(4, 8);
        let p = prompt(3, 11);
        let s = r.add_sequence();
        let all = r.step(&[span(s, &p[..6], Logits::All)]).unwrap().remove(0);
        let want: Vec<f32> = (1..=6).flat_map(|k| fake::logits(0, &p[..k])).collect();
        assert_eq!(all, want);
        assert!(r.step(&[span(s, &p[6..8], Logits::None)]).unwrap()[0].is_empty());
        let last = r.step(&[span(s, &p[8..], Logits::Last)]).unwrap().remove(0);
        assert_eq!(last, fake::logits(0, &p));
        assert_eq!(r.cached(s), Some(11));
        assert_eq!(r.block_table(s).unwrap(), &[0, 1, 2]);
        let rows: Vec<usize> = state.lock().unwrap().batches.iter().map(|b| b.logits_rows.len()).collect();
        assert_eq!(rows, [6, 0, 1]);

        // Scoring: every position, whatever the chunks, and the sequence is freed.
        for chunk in [1, 4, 100] {
            let l = r.score(&p, chunk).unwrap();
            assert_eq!(l, (1..=11).flat_map(|k| fake::logits(0, &p[..k])).collect::<Vec<f32>>(), "chunk {chunk}");
        }
        assert_eq!(r.blocks().num_used(), 3, "only the first sequence's blocks");
        assert!(r.score(&[], 4).is_err());
    }

    #[test]
    fn a_step_that_cannot_run_changes_nothing() {
        let (mut r, state) = fake::runner(4, 4);
        let (pa, pb) = (prompt(0, 10), prompt(1, 8));
        let a = r.add_sequence();
        r.step(&[span(a, &pa, Logits::Last)]).unwrap();
        assert_eq!((r.blocks().num_free(), r.block_table(a).unwrap().len()), (1, 3));
        let b = r.add_sequence();
        let e = r.step(&[span(b, &pb, Logits::Last)]).unwrap_err();
        assert_eq!(e.to_string(), "KV cache full: step needs 2 blocks, 1 free of 4");
        let bad = [
            vec![span(b, &[], Logits::Last)],
            vec![span(b, &pb[..1], Logits::Last), span(b, &pb[1..2], Logits::Last)],
            vec![span(99, &pb[..1], Logits::Last)],
        ];
        for spans in &bad {
            assert!(r.step(spans).is_err(), "{spans:?}");
        }
        // None of them reached the model or took a block.
        assert_eq!(state.lock().unwrap().batches.len(), 1);
        assert_eq!((r.blocks().num_free(), r.cached(b), r.block_table(b).unwrap().len()), (1, Some(0), 0));
        // What fits still runs.
        let l = r.step(&[span(b, &pb[..4], Logits::Last)]).unwrap().remove(0);
        assert_eq!(l, fake::logits(0, &pb[..4]));
        assert_eq!(r.blocks().num_free(), 0);
        r.free_sequence(a);
        r.free_sequence(b);
        assert_eq!(r.blocks().num_free(), 4);
    }

    #[test]
    fn a_failing_forward_fails_only_that_step() {
        let (mut r, state) = fake::runner(4, 16);
        let (pa, mut pb) = (prompt(0, 6), prompt(1, 5));
        pb[3] = 63;
        state.lock().unwrap().poison = Some(63);
        let (a, b) = (r.add_sequence(), r.add_sequence());
        let both = [span(a, &pa, Logits::Last), span(b, &pb, Logits::Last)];
        let e = r.step(&both).unwrap_err();
        assert_eq!(e.to_string(), "the fake model refuses token 63");
        // Nothing was computed: the sequences can run again, without the failing one.
        assert_eq!((r.cached(a), r.cached(b)), (Some(0), Some(0)));
        let l = r.step(&both[..1]).unwrap().remove(0);
        assert_eq!(l, fake::logits(0, &pa));
        r.free_sequence(b);
        r.free_sequence(a);
        assert_eq!(r.blocks().num_free(), 16);
        assert_eq!(r.blocks().check(r.block_references()), Ok(()));
    }

    #[test]
    fn a_cached_prefix_is_shared_not_recomputed() {
        let (mut r, state) = fake::runner(4, 8);
        let pa = prompt(0, 10);
        let a = r.add_sequence();
        r.step(&[span(a, &pa, Logits::Last)]).unwrap();
        let table = r.block_table(a).unwrap().to_vec();
        assert_eq!(table, [0, 1, 2]);
        let mut h = crate::kv_manager::ROOT_HASH;
        for k in 0..2 {
            h = r.kv_manager().offer(h, &pa[k * 4..(k + 1) * 4], table[k]);
        }
        // b shares a's first 8 tokens.
        let mut pb = pa[..8].to_vec();
        pb.extend([40, 41, 42]);
        let (prefix, _) = r.kv_manager().lookup(&pb, 4, 2, crate::kv_manager::ROOT_HASH);
        assert_eq!(prefix, [0, 1]);
        let b = r.add_sequence_with_prefix(pb.len(), &prefix).unwrap();
        assert_eq!(r.cached(b), Some(8));
        assert_eq!((r.blocks().ref_count(0), r.blocks().ref_count(1), r.blocks().ref_count(2)), (3, 3, 1));
        // Its logits read a's K/V in the shared blocks; only its own 3 tokens are computed.
        let l = r.step(&[span(b, &pb[8..], Logits::Last)]).unwrap().remove(0);
        assert_eq!(l, fake::logits(0, &pb));
        assert_eq!(state.lock().unwrap().batches[1].tokens, [40, 41, 42]);
        assert_eq!(r.block_table(b).unwrap(), &[0, 1, 3]);
        // Freeing both leaves the two blocks the prefix cache holds.
        r.free_sequence(a);
        r.free_sequence(b);
        assert_eq!((r.blocks().num_used(), r.blocks().evictable()), (2, 2));
        assert_eq!(r.blocks().check(r.block_references()), Ok(()));

        // At least one token must be left to compute; prefix blocks must be in use.
        let e = r.add_sequence_with_prefix(8, &prefix).unwrap_err();
        assert_eq!(e.to_string(), "a prefix of 8 cached tokens leaves none of the 8 tokens to compute");
        assert_eq!(r.add_sequence_with_prefix(10, &[0, 5]).unwrap_err().to_string(), "prefix block 5 is not in use");
        assert_eq!(r.add_sequence_with_prefix(10, &[9]).unwrap_err().to_string(), "prefix block 9 is not in use");
        assert_eq!((r.blocks().ref_count(0), r.blocks().num_used()), (1, 2), "a refused prefix takes no reference");
    }

    #[test]
    fn each_sequence_runs_with_its_adapter() {
        let (mut r, _) = fake::runner(4, 8);
        let p = prompt(2, 4);
        let (x, y) = (r.add_sequence(), r.add_sequence());
        r.set_adapter(x, 2).unwrap();
        assert_eq!(r.set_adapter(y, 3).unwrap_err().to_string(), "adapter 3 asked for, but the model has 2");
        assert!(r.set_adapter(99, 1).is_err());
        // Either order: the default sequence after or before the adapted one.
        for (first, second, part) in [(x, y, &p[..2]), (y, x, &p[2..])] {
            let l = r.step(&[span(first, part, Logits::Last), span(second, part, Logits::Last)]).unwrap();
            let upto = r.cached(first).unwrap();
            let want = |seq| fake::logits(if seq == x { 2 } else { 0 }, &p[..upto]);
            assert_eq!((&l[0], &l[1]), (&want(first), &want(second)));
        }
        assert_ne!(fake::logits(2, &p), fake::logits(0, &p));
    }
}
