//! Training data: JSONL files of chat conversations (`{"messages": [...], "tools": [...]}` in
//! the OpenAI format, assistant `reasoning_content` kept or stripped) or plain text
//! (`{"text": "..."}`), rendered with the model's own chat template and tokenized; the loss
//! falls on the assistant turns only (their content through `<|im_end|>`) unless the prompt is
//! trained too. Examples are packed into sequences of a fixed length, each keeping its own
//! positions and attending only within itself.

use crate::step::Sequence;
use crate::Rng;
use anyhow::{anyhow, bail, Context, Result};
use qwick_chat::{ChatMessage, ChatTemplate, RenderOptions, Tokenizer};
use serde_json::Value;
use std::path::Path;

/// How examples are read.
#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    /// Loss on every token, not just the assistant's.
    pub train_on_prompt: bool,
    /// Drop assistant reasoning (`reasoning_content`, and `<think>` blocks in `content`).
    pub strip_reasoning: bool,
    /// Skip malformed lines (reported) instead of refusing the file.
    pub skip_bad: bool,
}

/// One tokenized example; `train[t]`: the loss includes predicting token `t`.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

/// What reading a file found.
#[derive(Clone, Debug, Default)]
pub struct ReadStats {
    pub lines: usize,
    pub examples: usize,
    /// Malformed lines skipped (`--skip-bad`), with their messages.
    pub skipped: Vec<String>,
    /// Examples without a single trained token (e.g. no assistant turn).
    pub untrained: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
}

/// The template, tokenizer and special tokens examples are made with.
pub struct Renderer<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// Appended to plain-text examples.
    pub eos: u32,
}

impl Renderer<'_> {
    /// Tokens and loss mask of one JSONL record.
    pub fn example(&self, rec: &Value, opts: &DataOptions) -> Result<Example> {
        let obj = rec.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
        if let Some(text) = obj.get("text") {
            let text = text.as_str().ok_or_else(|| anyhow!("\"text\" must be a string"))?;
            let mut ids = self.tokenizer.encode(text, false).map_err(|e| anyhow!("{e}"))?;
            ids.push(self.eos);
            let train = (0..ids.len()).map(|i| i > 0).collect();
            return Ok(Example { ids, train });
        }
        let msgs = obj.get("messages").ok_or_else(|| anyhow!("needs \"messages\" (a chat) or \"text\""))?;
        let mut messages: Vec<ChatMessage> =
            serde_json::from_value(msgs.clone()).map_err(|e| anyhow!("\"messages\": {e}"))?;
        if messages.is_empty() {
            bail!("\"messages\" is empty");
        }
        for m in &messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                bail!("unknown role {:?}", m.role);
            }
        }
        if !messages.iter().any(|m| m.role == "assistant") && !opts.train_on_prompt {
            bail!("no assistant message to learn from");
        }
        if opts.strip_reasoning {
            for m in messages.iter_mut().filter(|m| m.role == "assistant") {
                m.reasoning_content = None;
                if let Some(c) = &m.content {
                    if let Some(end) = c.find("</think>") {
                        m.content = Some(c[end + "</think>".len()..].trim_start().to_string());
                    }
                }
            }
        }
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => bail!("\"tools\" must be a list"),
        };
        let ro = RenderOptions { tools, add_generation_prompt: false, ..Default::default() };
        let text = self.template.render(&messages, &ro).map_err(|e| anyhow!("chat template: {e}"))?;
        let ids = self.tokenizer.encode(&text, false).map_err(|e| anyhow!("{e}"))?;
        let train =
            if opts.train_on_prompt { (0..ids.len()).map(|i| i > 0).collect() } else { self.assistant_mask(&ids)? };
        Ok(Example { ids, train })
    }

    /// True for the tokens of assistant turns: after `<|im_start|>assistant\n`, through the
    /// turn's `<|im_end|>`.
    fn assistant_mask(&self, ids: &[u32]) -> Result<Vec<bool>> {
        let tok = |s: &str| self.tokenizer.token_id(s).ok_or_else(|| anyhow!("the tokenizer has no {s} token"));
        let (start, end) = (tok("<|im_start|>")?, tok("<|im_end|>")?);
        let header = self.tokenizer.encode("assistant\n", false).map_err(|e| anyhow!("{e}"))?;
        let mut mask = vec![false; ids.len()];
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == start && ids[i + 1..].starts_with(&header) {
                let mut j = i + 1 + header.len();
                while j < ids.len() {
                    mask[j] = true;
                    if ids[j] == end {
                        break;
                    }
                    j += 1;
                }
                i = j;
            }
            i += 1;
        }
        Ok(mask)
    }
}

/// Reads a JSONL file: one example per non-empty line. Malformed lines are an error naming
/// them (all of them, up to ten) unless `opts.skip_bad`, when they are skipped and reported.
pub fn read_jsonl(path: &Path, r: &Renderer, opts: &DataOptions) -> Result<(Vec<Example>, ReadStats)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut stats = ReadStats::default();
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let ex = serde_json::from_str::<Value>(line)
            .map_err(|e| anyhow!("invalid JSON: {e}"))
            .and_then(|v| r.example(&v, opts));
        match ex {
            Ok(ex) => {
                let t = ex.train.iter().filter(|&&b| b).count();
                if t == 0 {
                    stats.untrained += 1;
                    continue;
                }
                stats.tokens += ex.ids.len();
                stats.trained_tokens += t;
                out.push(ex);
            }
            Err(e) => bad.push(format!("{}:{}: {e:#}", path.display(), n + 1)),
        }
    }
    if !bad.is_empty() && !opts.skip_bad {
        let shown: Vec<&str> = bad.iter().take(10).map(String::as_str).collect();
        bail!(
            "{} malformed line(s) in {} (fix them, or pass --skip-bad to skip them):\n  {}{}",
            bad.len(),
            path.display(),
            shown.join("\n  "),
            if bad.len() > 10 { format!("\n  … and {} more", bad.len() - 10) } else { String::new() }
        );
    }
    stats.skipped = bad;
    stats.examples = out.len();
    if out.is_empty() {
        bail!("{}: no examples to train on", path.display());
    }
    Ok((out, stats))
}

/// Splits off `fraction` of the examples (at least one when there are two or more and the
/// fraction is positive) as the held-out set, chosen by `seed`: `(train, eval)`.
pub fn split(mut ex: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if fraction <= 0.0 || ex.len() < 2 {
        return (ex, vec![]);
    }
    Rng::new(seed ^ 0x5EED).shuffle(&mut ex);
    let k = ((ex.len() as f64 * fraction).round() as usize).clamp(1, ex.len() - 1);
    let eval = ex.split_off(ex.len() - k);
    (ex, eval)
}

/// Packs examples, in order, into sequences of at most `seq_len` tokens (an example longer
/// than that is cut to it). Returns the sequences and how many examples were cut.
pub fn pack(examples: &[Example], seq_len: usize) -> (Vec<Sequence>, usize) {
    let mut out = Vec::new();
    let mut cut = 0;
    let mut cur = Sequence { tokens: vec![], positions: vec![], start: vec![], labels: vec![] };
    for ex in examples {
        let mut len = ex.ids.len();
        if len > seq_len {
            len = seq_len;
            cut += 1;
        }
        if !ex.train[1..len].iter().any(|&b| b) {
            continue;
        }
        if cur.len() + len > seq_len {
            out.push(std::mem::replace(
                &mut cur,
                Sequence { tokens: vec![], positions: vec![], start: vec![], labels: vec![] },
            ));
        }
        let s0 = cur.len() as u32;
        for t in 0..len {
            cur.tokens.push(ex.ids[t]);
            cur.positions.push(t as u32);
            cur.start.push(s0);
            cur.labels.push((t + 1 < len && ex.train[t + 1]).then(|| ex.ids[t + 1]));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    (out, cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, first_trained: usize) -> Example {
        Example { ids: (0..n as u32).map(|i| i + 100).collect(), train: (0..n).map(|i| i >= first_trained).collect() }
    }

    #[test]
    fn packing_keeps_examples_apart() {
        let (seqs, cut) = pack(&[ex(5, 2), ex(4, 1), ex(12, 3), ex(3, 3)], 10);
        assert_eq!(cut, 1);
        // [5 + 4], [10 of 12]; the last example has no trained token after its first.
        assert_eq!(seqs.len(), 2);
        let s = &seqs[0];
        assert_eq!(s.positions, vec![0, 1, 2, 3, 4, 0, 1, 2, 3]);
        assert_eq!(s.start, vec![0, 0, 0, 0, 0, 5, 5, 5, 5]);
        assert_eq!(s.labels, vec![None, Some(102), Some(103), Some(104), None, Some(101), Some(102), Some(103), None]);
        assert_eq!(seqs[1].len(), 10);
        assert_eq!(seqs[1].labels[9], None);
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let all: Vec<Example> = (0..20).map(|i| ex(3 + i, 1)).collect();
        let (a, b) = split(all.clone(), 0.1, 3);
        assert_eq!((a.len(), b.len()), (18, 2));
        assert_eq!(split(all.clone(), 0.1, 3).1, b);
        assert!(b.iter().all(|e| !a.contains(e)));
        assert_eq!(split(all, 0.0, 3).1.len(), 0);
    }
}
