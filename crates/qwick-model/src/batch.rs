//! The input of one forward call: a flat list of tokens from several sequences.

use anyhow::{bail, Result};

/// Tokens of one step, from any mix of prefill chunks and decode tokens of many sequences.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Token ids, all sequences' spans one after another.
    pub tokens: Vec<u32>,
    /// Each token's position in its sequence.
    pub positions: Vec<u32>,
    /// Each token's sequence, as an index into `block_tables`.
    pub seq_of_token: Vec<u32>,
    /// Per sequence: physical KV block of each logical block, covering its context after this step.
    pub block_tables: Vec<Vec<u32>>,
    /// Per token: the cache slot (block × block_size + offset) its K/V is written to.
    pub slot_mapping: Vec<u32>,
    /// Rows (indices into `tokens`) whose logits are wanted, in output order.
    pub logits_rows: Vec<u32>,
    /// Per logits row (or empty: none), how many of its highest-ranked logits the caller
    /// reads (0: every one), ranked as the sampler ranks them: higher first, ties to the lower
    /// id, NaN as -inf. A model may return only those (and NaN as -inf), the rest of the row
    /// -inf; the CPU returns every logit.
    pub candidates: Vec<u32>,
    /// Rows whose hidden states after the final norm are wanted (pooled embeddings), given
    /// after the logits, in this order.
    pub hidden_rows: Vec<u32>,
    /// The LoRA adapter of each sequence, by the model's adapter number; 0 (or no entry) for
    /// the model's default, which is none unless one was applied to every sequence.
    pub seq_adapter: Vec<u16>,
}

impl Batch {
    /// Appends a span of `tokens` of a sequence whose earlier `start_pos` tokens are already
    /// in the cache under `block_table` (which must cover the whole new context). Returns the
    /// rows of the new tokens. `all_logits` asks for every new token's logits, else the last's.
    pub fn push_span(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        block_table: &[u32],
        block_size: usize,
        all_logits: bool,
    ) -> std::ops::Range<usize> {
        let seq = self.block_tables.len() as u32;
        self.block_tables.push(block_table.to_vec());
        let first = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = start_pos + i;
            self.tokens.push(t);
            self.positions.push(pos as u32);
            self.seq_of_token.push(seq);
            let blk = block_table.get(pos / block_size).copied().unwrap_or(u32::MAX);
            self.slot_mapping.push(blk.saturating_mul(block_size as u32).saturating_add((pos % block_size) as u32));
        }
        let rows = first..self.tokens.len();
        if all_logits {
            self.logits_rows.extend(rows.clone().map(|r| r as u32));
        } else if !rows.is_empty() {
            self.logits_rows.push(rows.end as u32 - 1);
        }
        rows
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks internal consistency against a vocabulary and a cache of `num_blocks` blocks.
    pub fn validate(&self, vocab: usize, num_blocks: usize, block_size: usize) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            bail!("empty batch: no tokens to run");
        }
        if self.positions.len() != n || self.seq_of_token.len() != n || self.slot_mapping.len() != n {
            bail!("batch arrays disagree in length");
        }
        if let Some((i, t)) = self.tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            bail!(
                "token id {t} at index {i} is out of range: the vocabulary has {vocab} tokens (ids 0..{})",
                vocab - 1
            );
        }
        for i in 0..n {
            let s = self.seq_of_token[i] as usize;
            let Some(table) = self.block_tables.get(s) else {
                bail!("token {i} names sequence {s}, which has no block table")
            };
            let pos = self.positions[i] as usize;
            let need = pos / block_size;
            if need >= table.len() {
                bail!("sequence {s}: position {pos} is beyond its block table ({} blocks)", table.len());
            }
            if let Some(b) = table[..=need].iter().find(|&&b| b as usize >= num_blocks) {
                bail!("sequence {s}: block {b} is outside the cache ({num_blocks} blocks)");
            }
            if self.slot_mapping[i] as usize >= num_blocks * block_size {
                bail!("token {i}: cache slot {} is outside the cache", self.slot_mapping[i]);
            }
        }
        if !self.candidates.is_empty() && self.candidates.len() != self.logits_rows.len() {
            bail!("{} candidate counts for {} logits rows", self.candidates.len(), self.logits_rows.len());
        }
        if let Some(r) = self.logits_rows.iter().chain(&self.hidden_rows).find(|&&r| r as usize >= n) {
            bail!("logits row {r} is outside the batch of {n} tokens");
        }
        Ok(())
    }
}
