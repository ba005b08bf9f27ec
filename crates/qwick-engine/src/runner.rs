//! The model runner: owns the model, the KV cache and its block allocator, and the thread
//! pool; keeps each sequence's tokens and block table; turns a list of spans into one batch.

use crate::kv_manager::KvManager;
use anyhow::{anyhow, bail, Result};
use qwick_backend::{Bf16Mode, Ctx, Format, Isa, ThreadPool};
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
        }
    }
}

struct Sequence {
    tokens: Vec<u32>,
    /// Tokens whose K/V is in the cache.
    cached: usize,
    blocks: Vec<u32>,
    /// The model's LoRA adapter this sequence runs with (0: the model's default).
    adapter: u16,
}

/// Which logits a span asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Part of one step: the next `len` uncached tokens of sequence `seq`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub seq: SeqId,
    pub len: usize,
    pub logits: Logits,
}

pub struct Runner {
    pub model: Arc<Qwen3>,
    kv: KvCache,
    blocks: KvManager,
    pool: ThreadPool,
    isa: Isa,
    exact: bool,
    bf16: Option<Bf16Mode>,
    seqs: HashMap<SeqId, Sequence>,
    next_id: SeqId,
}

impl Runner {
    pub fn new(model: Arc<Qwen3>, cfg: &RunnerConfig) -> Runner {
        qwick_backend::alloc::tune_allocator();
        let kv = model.new_kv_cache_as(cfg.kv_format, cfg.num_blocks, cfg.block_size);
        Runner {
            model,
            kv,
            blocks: KvManager::new(cfg.num_blocks),
            pool: ThreadPool::new(cfg.threads),
            isa: cfg.isa,
            exact: cfg.exact,
            bf16: cfg.bf16,
            seqs: HashMap::new(),
            next_id: 0,
        }
    }

    pub fn ctx(&self) -> Ctx<'_> {
        Ctx { isa: self.isa, pool: &self.pool, exact: self.exact, bf16: self.bf16 }
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
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
        self.kv.block_size
    }

    /// Registers a sequence with its prompt; nothing is computed yet.
    pub fn add_sequence(&mut self, tokens: &[u32]) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Sequence { tokens: tokens.to_vec(), cached: 0, blocks: vec![], adapter: 0 });
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

    /// Registers a sequence whose first `prefix_blocks.len() * block_size` tokens are already in
    /// the cache, in `prefix_blocks` (full blocks shared through the prefix cache; each gains a
    /// reference). At least one token must be left to compute, so that the shared blocks are
    /// never written.
    pub fn add_sequence_with_prefix(&mut self, tokens: &[u32], prefix_blocks: &[u32]) -> Result<SeqId> {
        let cached = prefix_blocks.len() * self.kv.block_size;
        if cached >= tokens.len() {
            bail!("a prefix of {cached} cached tokens leaves none of the {} tokens to compute", tokens.len());
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
        self.seqs.insert(id, Sequence { tokens: tokens.to_vec(), cached, blocks: prefix_blocks.to_vec(), adapter: 0 });
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
        Ok((s.cached + len).div_ceil(self.kv.block_size).saturating_sub(s.blocks.len()))
    }

    /// Appends a generated token; it is computed by the next step that includes it.
    pub fn append_token(&mut self, seq: SeqId, token: u32) -> Result<()> {
        self.seq_mut(seq)?.tokens.push(token);
        Ok(())
    }

    /// Tokens of the sequence not yet in the cache.
    pub fn pending(&self, seq: SeqId) -> Result<usize> {
        let s = self.seqs.get(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))?;
        Ok(s.tokens.len() - s.cached)
    }

    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Frees the sequence and its blocks.
    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for b in s.blocks {
                self.blocks.release(b);
            }
        }
    }

    fn seq_mut(&mut self, seq: SeqId) -> Result<&mut Sequence> {
        self.seqs.get_mut(&seq).ok_or_else(|| anyhow!("unknown sequence {seq}"))
    }

    /// Runs one forward call over `spans` (one per sequence) and returns each span's logits,
    /// `[rows, vocab]` row-major (1 row for `Last`, `len` rows for `All`, none for `None`).
    /// Fails without side effects if the cache lacks blocks for the new tokens.
    pub fn step(&mut self, spans: &[Span]) -> Result<Vec<Vec<f32>>> {
        let bs = self.kv.block_size;
        // Check sizes and blocks first, then allocate.
        let mut need = 0;
        for (i, sp) in spans.iter().enumerate() {
            if spans[..i].iter().any(|o| o.seq == sp.seq) {
                bail!("sequence {} appears twice in one step", sp.seq);
            }
            let s = self.seqs.get(&sp.seq).ok_or_else(|| anyhow!("unknown sequence {}", sp.seq))?;
            if sp.len == 0 || s.cached + sp.len > s.tokens.len() {
                bail!("sequence {}: span of {} tokens, {} pending", sp.seq, sp.len, s.tokens.len() - s.cached);
            }
            need += (s.cached + sp.len).div_ceil(bs).saturating_sub(s.blocks.len());
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
            while s.blocks.len() * bs < s.cached + sp.len {
                s.blocks.push(self.blocks.allocate().expect("checked above"));
            }
            let toks = &s.tokens[s.cached..s.cached + sp.len];
            let rows = batch.push_span(toks, s.cached, &s.blocks, bs, sp.logits == Logits::All);
            if s.adapter > 0 {
                // Sequences before this one keep the default (0).
                batch.seq_adapter.resize(batch.block_tables.len() - 1, 0);
                batch.seq_adapter.push(s.adapter);
            }
            if sp.logits == Logits::None {
                batch.logits_rows.retain(|&r| r as usize != rows.end - 1);
            }
        }
        let ctx = Ctx { isa: self.isa, pool: &self.pool, exact: self.exact, bf16: self.bf16 };
        let logits = self.model.forward(ctx, &batch, &mut self.kv)?;
        let vocab = self.model.config.vocab_size;
        let mut out = Vec::with_capacity(spans.len());
        let mut row = 0;
        for sp in spans {
            self.seqs.get_mut(&sp.seq).unwrap().cached += sp.len;
            let rows = match sp.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => sp.len,
            };
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
        let id = self.add_sequence(tokens);
        let mut all = Vec::with_capacity(tokens.len() * self.model.config.vocab_size);
        let r = (|| {
            let mut done = 0;
            while done < tokens.len() {
                let len = chunk.max(1).min(tokens.len() - done);
                let mut l = self.step(&[Span { seq: id, len, logits: Logits::All }])?;
                all.append(&mut l[0]);
                done += len;
            }
            Ok(())
        })();
        self.free_sequence(id);
        r.map(|_| all)
    }
}

/// Index of the largest value (the lowest index among ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
