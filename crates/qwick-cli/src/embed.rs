//! `qwick embed`: embeddings on the command line, computed as `serve --task embed` computes
//! them (the last token's hidden state after the final norm, L2-normalised).

use crate::common::{self, RunArgs};
use anyhow::{bail, Result};
use clap::Args;
use qwick_chat::ChatModel;
use qwick_engine::{Logits, Span};
use std::io::BufRead;

#[derive(Args)]
pub struct EmbedArgs {
    /// Model folder, GGUF file, Hub id (`owner/name`, `owner/name:TAG`) or `ollama:NAME`.
    #[arg(long)]
    model: String,
    /// The text to embed, or `-`: each line of standard input.
    #[arg(long)]
    input: String,
    /// Keep the first N values (normalised again), Matryoshka-style.
    #[arg(long)]
    dimensions: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// Prints one JSON array of floats a line, for each input.
pub fn run(a: EmbedArgs) -> Result<()> {
    let info = ChatModel::load_spec(&a.model, None, None)?;
    let texts: Vec<String> =
        if a.input == "-" { std::io::stdin().lock().lines().collect::<Result<_, _>>()? } else { vec![a.input.clone()] };
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| info.tokenizer.encode(t, true)).collect::<Result<_, _>>()?;
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    if ids.iter().any(Vec::is_empty) {
        bail!("an input without tokens");
    }
    let h = info.config.hidden_size;
    if a.dimensions.is_some_and(|d| d == 0 || d > h) {
        bail!("--dimensions must be in [1, {h}]");
    }
    let model = common::load_model(&info.dir, &a.run)?;
    let isa = a.run.isa()?;
    let mut runner = a.run.runner_as(model, longest.max(16), isa, a.run.kv_format()?)?;
    for tokens in &ids {
        let seq = runner.add_sequence();
        let out = runner.step(&[Span { seq, tokens, logits: Logits::Hidden }]);
        runner.free_sequence(seq);
        let mut v = out?.swap_remove(0);
        v.truncate(a.dimensions.unwrap_or(h));
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        let v: Vec<f32> = v.iter().map(|x| (*x as f64 / norm) as f32).collect();
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}
