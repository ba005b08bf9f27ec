//! `qwick list`: the models of the Hugging Face cache and the Ollama store, each with what
//! `--model` takes to load it.

use anyhow::Result;
use qwick_chat::resolve::{self, StoredModel};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print one JSON object (the folders looked in and every model found) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where the models of one store were looked for, and how many were found.
struct Place {
    what: &'static str,
    /// The folder; `None` when the environment names none.
    dir: Option<PathBuf>,
    /// The variables that choose the folder, for the message when none is set.
    vars: &'static str,
    found: usize,
}

impl Place {
    fn line(&self) -> String {
        match &self.dir {
            None => format!("{}: not set ({})", self.what, self.vars),
            Some(d) if !d.is_dir() => format!("{}: {} (not found)", self.what, d.display()),
            Some(d) => {
                format!(
                    "{}: {} ({} model{})",
                    self.what,
                    d.display(),
                    self.found,
                    if self.found == 1 { "" } else { "s" }
                )
            }
        }
    }
}

pub fn list(a: ListArgs) -> Result<()> {
    let hf_dir = resolve::cache_dir().ok();
    let ollama_dir = resolve::ollama_dir().ok();
    let mut models = hf_dir.as_deref().map(resolve::hf_cache_models).unwrap_or_default();
    let hf =
        Place { what: "Hugging Face cache", dir: hf_dir, vars: "HF_HUB_CACHE, HF_HOME or HOME", found: models.len() };
    let ollama_models = ollama_dir.as_deref().map(resolve::ollama_store_models).unwrap_or_default();
    let ollama =
        Place { what: "Ollama store", dir: ollama_dir, vars: "OLLAMA_MODELS or HOME", found: ollama_models.len() };
    models.extend(ollama_models);

    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "huggingface_cache": hf.dir,
            "ollama_store": ollama.dir,
            "models": models,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    if models.is_empty() {
        writeln!(out, "no models found")?;
    } else {
        for line in table(&models) {
            writeln!(out, "{}", line.trim_end())?;
        }
        writeln!(out)?;
    }
    writeln!(out, "{}", hf.line())?;
    writeln!(out, "{}", ollama.line())?;
    Ok(())
}

/// The table's lines: a header, then one line per model, columns aligned (sizes to the right).
fn table(models: &[StoredModel]) -> Vec<String> {
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let note = if models.iter().any(|m| m.problem.is_some()) { "NOTE" } else { "" };
    let mut rows = vec![["MODEL", "FORMAT", "TYPE", "ARCH", "SIZE", note].map(String::from)];
    for m in models {
        rows.push([
            m.spec.clone(),
            m.format.to_string(),
            dash(&m.kind),
            dash(&m.arch),
            human_size(m.bytes),
            m.problem.clone().unwrap_or_default(),
        ]);
    }
    let width = |c: usize| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..5).map(width).collect();
    rows.iter()
        .map(|r| {
            format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
                w4 = widths[4]
            )
        })
        .collect()
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `4.7 GiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
