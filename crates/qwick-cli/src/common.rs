//! Options and helpers shared by subcommands.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qwick_backend::{Isa, ThreadPool};
use qwick_engine::{Runner, RunnerConfig};
use qwick_model::Qwen3;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Worker threads (default: QWICK_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Kernel instruction set: scalar, avx2, avx512 or avx512bf16 (default: QWICK_ISA, else the
    /// fastest available; `logits` defaults to the fastest exact one).
    #[arg(long)]
    pub isa: Option<String>,
}

impl RunArgs {
    pub fn threads(&self) -> usize {
        self.threads.filter(|&t| t > 0).unwrap_or_else(ThreadPool::default_threads)
    }

    /// The ISA asked for, else the fastest one.
    pub fn isa(&self) -> Result<Isa> {
        self.isa_or(Isa::best())
    }

    /// The ISA asked for (flag, then `QWICK_ISA`), else `default`.
    pub fn isa_or(&self, default: Isa) -> Result<Isa> {
        match &self.isa {
            Some(s) => {
                let isa =
                    Isa::parse(s).with_context(|| format!("--isa {s}: expected scalar, avx2, avx512 or avx512bf16"))?;
                if !isa.supported() {
                    anyhow::bail!("--isa {s}: this CPU does not support it");
                }
                Ok(isa)
            }
            None if std::env::var("QWICK_ISA").is_ok_and(|v| !v.is_empty()) => {
                Isa::from_env().map_err(anyhow::Error::msg)
            }
            None => Ok(default),
        }
    }

    /// A runner on `isa` whose cache holds `tokens` tokens.
    pub fn runner(&self, model: Arc<Qwen3>, tokens: usize, isa: Isa) -> Result<Runner> {
        Ok(Runner::new(model, &RunnerConfig::with_tokens(tokens, self.threads(), isa)))
    }
}

/// A progress bar on stderr, only when stderr is a terminal.
pub fn progress_bar(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    Some(b)
}

pub fn tick(bar: &Option<ProgressBar>, done: usize, total: usize) {
    if let Some(b) = bar {
        b.set_length(total as u64);
        b.set_position(done as u64);
    }
}

/// Loads a model folder and reads its weights into the page cache, with a progress bar.
pub fn load_model(dir: &Path) -> Result<Arc<Qwen3>> {
    let model = Qwen3::load(dir)?;
    let bar = progress_bar("loading");
    let ck_bytes = model.weight_bytes();
    // Touch the mapped weights once so the first token does not wait on the disk.
    prefetch(&model, &|d, _| tick(&bar, d, ck_bytes));
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(Arc::new(model))
}

fn prefetch(model: &Qwen3, progress: &dyn Fn(usize, usize)) {
    let mut done = 0;
    let mut touch = |b: &[u8]| {
        let mut s = 0u8;
        for p in (0..b.len()).step_by(4096) {
            s = s.wrapping_add(b[p]);
        }
        std::hint::black_box(s);
        done += b.len();
        progress(done, 0);
    };
    touch(model.embed_tokens.bytes());
    for l in &model.layers {
        let a = &l.attn;
        for w in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
            touch(w.0.bytes());
        }
        match &l.mlp {
            qwick_model::qwen3::Mlp::Dense(s) => {
                for w in [&s.gate_proj, &s.up_proj, &s.down_proj] {
                    touch(w.0.bytes());
                }
            }
            qwick_model::qwen3::Mlp::Moe { router, experts, .. } => {
                touch(router.0.bytes());
                for s in experts {
                    for w in [&s.gate_proj, &s.up_proj, &s.down_proj] {
                        touch(w.0.bytes());
                    }
                }
            }
        }
    }
    if !model.tied {
        touch(model.lm_head.0.bytes());
    }
}
