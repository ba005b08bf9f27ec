//! The training loop: optimizer steps over packed sequences (micro-batches accumulated),
//! evaluation on the held-out sequences, checkpoints (adapter, optimizer moments and loop
//! state) that a later run resumes from, and the finished adapter.

use crate::lora::LoraParams;
use crate::optim::{clip, AdamW, Moments, Schedule};
use crate::step::{loss, Dropout, Frozen, Grads, Sequence};
use crate::Rng;
use anyhow::{anyhow, bail, Context, Result};
use qwick_backend::Ctx;
use qwick_model::lora::Adapter;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// How training runs.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub lr: f32,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub adamw: AdamW,
    pub max_grad_norm: f32,
    /// Sequences per micro-batch and micro-batches per optimizer step.
    pub batch: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// Evaluate every this many steps (0: at the end only).
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (0: only when interrupted).
    pub save_every: u64,
    /// Continue from the newest checkpoint in the output folder.
    pub resume: bool,
    pub out: PathBuf,
    /// `base_model_name_or_path` written into the adapter.
    pub base_model: String,
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub seconds: f64,
}

/// What the loop tells its caller.
pub enum Event<'a> {
    Step(&'a StepReport),
    Eval { step: u64, loss: f64 },
    Saved { step: u64, dir: &'a Path },
    Resumed { step: u64, dir: &'a Path },
}

/// How training ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by the interrupt flag after saving a checkpoint of this step.
    Interrupted(u64),
}

/// Mean loss per labelled token over `seqs` (forward passes only).
pub fn eval_loss(ctx: Ctx, f: &Frozen, lora: &LoraParams, seqs: &[Sequence]) -> f64 {
    let n: usize = seqs.iter().map(Sequence::labelled).sum();
    let total: f64 = seqs.iter().map(|s| loss(ctx, f, lora, s, 1.0, Dropout { p: 0.0, key: 0 }, None)).sum();
    total / n.max(1) as f64
}

/// The order sequences are visited in: each epoch a fresh shuffle (by seed and epoch).
fn order(n: usize, epoch: u64, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ (epoch + 1).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut v);
    v
}

/// Optimizer steps in all.
pub fn total_steps(o: &TrainOptions, sequences: usize) -> u64 {
    let per_step = (o.batch * o.grad_accum).max(1);
    let per_epoch = sequences.div_ceil(per_step) as u64;
    o.max_steps.unwrap_or(((per_epoch as f64) * o.epochs).ceil().max(1.0) as u64)
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// The newest complete checkpoint in `out`.
pub fn latest_checkpoint(out: &Path) -> Option<(u64, PathBuf)> {
    std::fs::read_dir(out)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            e.path().join("trainer_state.json").exists().then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// The training state besides the parameters.
struct State {
    step: u64,
    moments: Vec<(Moments, Moments)>,
    losses: Vec<(u64, f64)>,
}

fn moment_names(p: &crate::lora::Pair) -> [String; 4] {
    let base = format!("layers.{}.{}", p.layer, qwick_model::lora::MODULES[p.module].0);
    [
        format!("{base}.A.exp_avg"),
        format!("{base}.A.exp_avg_sq"),
        format!("{base}.B.exp_avg"),
        format!("{base}.B.exp_avg_sq"),
    ]
}

/// Writes a checkpoint folder next to the others: into `checkpoint-N.partial`, renamed when
/// complete, and only then are older checkpoints removed (a failure, a full disk say, leaves
/// the previous one as it was).
fn save_checkpoint(o: &TrainOptions, lora: &LoraParams, st: &State, total: u64) -> Result<PathBuf> {
    let dir = o.out.join(checkpoint_name(st.step));
    let tmp = o.out.join(format!("{}.partial", checkpoint_name(st.step)));
    let write = || -> Result<()> {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        lora.save(&tmp, Some(o.base_model.clone()))?;
        let mut tensors = Vec::new();
        for (p, (ma, mb)) in lora.pairs.iter().zip(&st.moments) {
            let [am, av, bm, bv] = moment_names(p);
            let b = |x: &[f32]| qwick_backend::format::f32_bytes(x).to_vec();
            let f32 = qwick_backend::Format::F32;
            tensors.push((am, f32, vec![ma.m.len()], b(&ma.m)));
            tensors.push((av, f32, vec![ma.v.len()], b(&ma.v)));
            tensors.push((bm, f32, vec![mb.m.len()], b(&mb.m)));
            tensors.push((bv, f32, vec![mb.v.len()], b(&mb.v)));
        }
        qwick_model::safetensors::write_safetensors(&tmp.join("optimizer.safetensors"), &tensors)?;
        let state = json!({
            "step": st.step,
            "total_steps": total,
            "seed": o.seed,
            "batch": o.batch,
            "grad_accum": o.grad_accum,
            "losses": st.losses,
        });
        std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("cannot write {}", tmp.join("trainer_state.json").display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context("saving a checkpoint failed; the previous checkpoint is kept"));
    }
    for e in std::fs::read_dir(&o.out).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(s) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
            if s < st.step {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(dir)
}

fn load_checkpoint(o: &TrainOptions, dir: &Path, lora: &mut LoraParams, config: &qwick_model::Config) -> Result<State> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))
        .with_context(|| format!("cannot read {}", dir.join("trainer_state.json").display()))?;
    let s: Value =
        serde_json::from_str(&text).with_context(|| format!("{}", dir.join("trainer_state.json").display()))?;
    for (k, v) in [("seed", o.seed), ("batch", o.batch as u64), ("grad_accum", o.grad_accum as u64)] {
        if s[k].as_u64() != Some(v) {
            bail!(
                "{}: the checkpoint was made with {k} {} (this run: {v}); resume with the same settings",
                dir.display(),
                s[k]
            );
        }
    }
    let adapter = Adapter::open(dir)?;
    let c = lora.spec.clone();
    let sorted = |t: &[&'static str]| {
        let mut t = t.to_vec();
        t.sort();
        t
    };
    if adapter.rank != c.rank
        || adapter.alpha != c.alpha
        || adapter.rslora != c.rslora
        || sorted(&adapter.targets) != sorted(&c.targets)
    {
        bail!(
            "{}: the checkpoint's adapter (rank {}, alpha {}, targets {}) differs from this run's (rank {}, alpha {}, \
             targets {})",
            dir.display(),
            adapter.rank,
            adapter.alpha,
            adapter.targets.join(","),
            c.rank,
            c.alpha,
            c.targets.join(",")
        );
    }
    *lora = LoraParams::from_adapter(config, &adapter, c.dropout)?;
    let opt = qwick_model::safetensors::Checkpoint::open_file(&dir.join("optimizer.safetensors"))?;
    let mut moments = Vec::new();
    for p in &lora.pairs {
        let [am, av, bm, bv] = moment_names(p);
        let get = |n: &str, len: usize| -> Result<Vec<f32>> { Ok(opt.get(n, &[len])?.to_f32()) };
        moments.push((
            Moments { m: get(&am, p.a.len())?, v: get(&av, p.a.len())? },
            Moments { m: get(&bm, p.b.len())?, v: get(&bv, p.b.len())? },
        ));
    }
    let losses = s["losses"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| Some((v[0].as_u64()?, v[1].as_f64()?))).collect())
        .unwrap_or_default();
    let step = s["step"].as_u64().ok_or_else(|| anyhow!("{}: no step in trainer_state.json", dir.display()))?;
    Ok(State { step, moments, losses })
}

/// Trains `lora` on `train` (evaluating on `eval`), writing checkpoints and the final adapter
/// under `o.out`. `stop` is checked after every step: when set, a checkpoint is saved and the
/// loop returns [`Outcome::Interrupted`].
#[allow(clippy::too_many_arguments)]
pub fn train(
    ctx: Ctx,
    f: &Frozen,
    lora: &mut LoraParams,
    train: &[Sequence],
    eval: &[Sequence],
    o: &TrainOptions,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    let total = total_steps(o, train.len());
    let mut st = State {
        step: 0,
        moments: lora.pairs.iter().map(|p| (Moments::zeros(p.a.len()), Moments::zeros(p.b.len()))).collect(),
        losses: vec![],
    };
    if o.resume {
        match latest_checkpoint(&o.out) {
            Some((_, dir)) => {
                st = load_checkpoint(o, &dir, lora, &f.model.config)?;
                on(Event::Resumed { step: st.step, dir: &dir });
            }
            None => bail!("--resume: no checkpoint in {}", o.out.display()),
        }
    }
    let per_step = o.batch * o.grad_accum;
    let mut epoch_order: (u64, Vec<usize>) = (u64::MAX, vec![]);
    let mut grads: Grads = lora.zeros_like();
    while st.step < total {
        let t0 = std::time::Instant::now();
        for (ga, gb) in grads.iter_mut() {
            ga.fill(0.0);
            gb.fill(0.0);
        }
        // This step's sequences: positions step·per_step.. of the epochs' concatenated orders.
        let mut seqs: Vec<&Sequence> = Vec::with_capacity(per_step);
        for k in 0..per_step as u64 {
            let at = st.step * per_step as u64 + k;
            let (epoch, i) = (at / train.len() as u64, (at % train.len() as u64) as usize);
            if epoch_order.0 != epoch {
                epoch_order = (epoch, order(train.len(), epoch, o.seed));
            }
            seqs.push(&train[epoch_order.1[i]]);
        }
        let labelled: usize = seqs.iter().map(|s| s.labelled()).sum();
        let scale = 1.0 / labelled.max(1) as f32;
        let mut sum = 0f64;
        for (k, s) in seqs.iter().enumerate() {
            let key = o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (st.step << 20) ^ k as u64;
            sum += loss(ctx, f, lora, s, scale, Dropout { p: lora.spec.dropout, key }, Some(&mut grads));
        }
        let step_loss = sum / labelled.max(1) as f64;
        if !step_loss.is_finite() {
            bail!("the loss is {step_loss} at step {}: lower the learning rate (--lr)", st.step + 1);
        }
        let mut all: Vec<&mut [f32]> =
            grads.iter_mut().flat_map(|(a, b)| [a.as_mut_slice(), b.as_mut_slice()]).collect();
        let grad_norm = if o.max_grad_norm > 0.0 {
            clip(&mut all, o.max_grad_norm)
        } else {
            crate::optim::global_norm(all.iter().map(|g| &**g))
        };
        let lr = o.schedule.lr(o.lr, st.step, o.warmup_steps, total);
        st.step += 1;
        for ((p, (ga, gb)), (ma, mb)) in lora.pairs.iter_mut().zip(&grads).zip(st.moments.iter_mut()) {
            o.adamw.update(&mut p.a, ga, ma, lr, st.step);
            o.adamw.update(&mut p.b, gb, mb, lr, st.step);
        }
        st.losses.push((st.step, step_loss));
        let tokens = seqs.iter().map(|s| s.len()).sum();
        on(Event::Step(&StepReport {
            step: st.step,
            total,
            loss: step_loss,
            lr,
            grad_norm,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        }));
        if !eval.is_empty() && (st.step == total || (o.eval_every > 0 && st.step.is_multiple_of(o.eval_every))) {
            on(Event::Eval { step: st.step, loss: eval_loss(ctx, f, lora, eval) });
        }
        let interrupted = stop.load(Ordering::SeqCst);
        if interrupted || (o.save_every > 0 && st.step.is_multiple_of(o.save_every) && st.step < total) {
            let dir = save_checkpoint(o, lora, &st, total)?;
            on(Event::Saved { step: st.step, dir: &dir });
            if interrupted {
                return Ok(Outcome::Interrupted(st.step));
            }
        }
    }
    lora.save(&o.out, Some(o.base_model.clone()))?;
    std::fs::write(
        o.out.join("training_log.json.partial"),
        serde_json::to_string_pretty(&json!({"step": st.step, "total_steps": total, "losses": st.losses}))?,
    )
    .and_then(|_| std::fs::rename(o.out.join("training_log.json.partial"), o.out.join("training_log.json")))
    .with_context(|| format!("cannot write {}", o.out.join("training_log.json").display()))?;
    Ok(Outcome::Finished)
}
