//! A model without weights for the engine's tests. Its "K/V cache" keeps the token written to
//! each slot, and the logits at a position are a deterministic function of the sequence's adapter
//! and its whole context up to that position, read back from the cache through the block table:
//! a wrong block table, a block freed while in use or a wrong cached prefix changes them, as it
//! would change a real model's.

use crate::runner::{argmax, Runner, StepModel};
use anyhow::{anyhow, bail, Result};
use qwick_model::Batch;
use std::sync::{Arc, Mutex};

pub const VOCAB: usize = 64;
/// Width of the fake's hidden states: the first values of its logits.
pub const HIDDEN: usize = 8;

/// The fake's final hidden state after `context`.
pub fn hidden(adapter: u16, context: &[u32]) -> Vec<f32> {
    logits(adapter, context)[..HIDDEN].to_vec()
}

/// What the test sees of the fake and how it steers it.
#[derive(Default)]
pub struct FakeState {
    /// Every batch run (failed ones included), in order.
    pub batches: Vec<Batch>,
    /// A forward call whose batch holds this token fails (before writing anything).
    pub poison: Option<u32>,
}

pub struct FakeModel {
    block_size: usize,
    num_blocks: usize,
    /// The token whose K/V each cache slot holds; `None` until written.
    slots: Vec<Option<u32>>,
    state: Arc<Mutex<FakeState>>,
    /// Nonzero: a different model, that agrees with the fake's logits except after one context
    /// in `skew` (as a draft model agrees with its target).
    skew: u64,
}

/// A runner over the fake model, with a cache of `num_blocks` blocks of `block_size` tokens and
/// two LoRA adapters; and the fake's state.
pub fn runner(block_size: usize, num_blocks: usize) -> (Runner, Arc<Mutex<FakeState>>) {
    skewed_runner(block_size, num_blocks, 0)
}

/// [`runner`] over a fake whose logits differ from the fake's after one context in `skew`
/// (none for 0).
pub fn skewed_runner(block_size: usize, num_blocks: usize, skew: u64) -> (Runner, Arc<Mutex<FakeState>>) {
    let state = Arc::new(Mutex::new(FakeState::default()));
    let slots = vec![None; block_size * num_blocks];
    let model = FakeModel { block_size, num_blocks, slots, state: state.clone(), skew };
    (Runner::with_model(Box::new(model), block_size, num_blocks), state)
}

/// The fake's logits after `context` (the last token's row), for a sequence of adapter `adapter`.
pub fn logits(adapter: u16, context: &[u32]) -> Vec<f32> {
    skewed_logits(adapter, context, 0)
}

/// The logits of a fake made by [`skewed_runner`].
fn skewed_logits(adapter: u16, context: &[u32], skew: u64) -> Vec<f32> {
    // FNV-1a over the adapter and the tokens, then a mix per vocabulary entry.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ adapter as u64;
    for &t in context {
        h = (h ^ t as u64).wrapping_mul(0x0100_0000_01b3);
    }
    if skew > 0 && (h >> 7) % skew == 0 {
        h = h.rotate_left(17) ^ 0x5bd1_e995;
    }
    (0..VOCAB as u64)
        .map(|v| {
            let mut x = h ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 29;
            (x % 4096) as f32 / 64.0
        })
        .collect()
}

/// The greedy output of `prompt` with adapter `adapter`: `max_tokens` tokens, or fewer ending at
/// the first of `stop`.
pub fn greedy(adapter: u16, prompt: &[u32], max_tokens: usize, stop: &[u32]) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut out = vec![];
    while out.len() < max_tokens {
        let t = argmax(&logits(adapter, &context));
        context.push(t);
        out.push(t);
        if stop.contains(&t) {
            break;
        }
    }
    out
}

impl StepModel for FakeModel {
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let mut state = self.state.lock().unwrap();
        state.batches.push(batch.clone());
        batch.validate(VOCAB, self.num_blocks, self.block_size)?;
        if let Some(p) = state.poison.filter(|p| batch.tokens.contains(p)) {
            bail!("the fake model refuses token {p}");
        }
        drop(state);
        for (&t, &slot) in batch.tokens.iter().zip(&batch.slot_mapping) {
            self.slots[slot as usize] = Some(t);
        }
        let bs = self.block_size;
        // A row's sequence adapter and context, read back through its block table.
        let context = |row: u32| {
            let seq = batch.seq_of_token[row as usize] as usize;
            let table = &batch.block_tables[seq];
            let ctx = (0..=batch.positions[row as usize] as usize)
                .map(|q| {
                    let slot = table[q / bs] as usize * bs + q % bs;
                    self.slots[slot].ok_or_else(|| anyhow!("position {q} reads slot {slot}, never written"))
                })
                .collect::<Result<Vec<u32>>>()?;
            Ok::<_, anyhow::Error>((batch.seq_adapter.get(seq).copied().unwrap_or(0), ctx))
        };
        let mut out = Vec::with_capacity(batch.logits_rows.len() * VOCAB + batch.hidden_rows.len() * HIDDEN);
        for &row in &batch.logits_rows {
            let (adapter, ctx) = context(row)?;
            out.extend(skewed_logits(adapter, &ctx, self.skew));
        }
        for &row in &batch.hidden_rows {
            let (adapter, ctx) = context(row)?;
            out.extend(hidden(adapter, &ctx));
        }
        Ok(out)
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn hidden_size(&self) -> usize {
        HIDDEN
    }

    fn adapters(&self) -> u16 {
        2
    }

    fn kv_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Option<u32>>()
    }
}
