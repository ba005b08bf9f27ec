//! The loss, every LoRA gradient and one clipped AdamW step on the tiny fixture equal
//! PyTorch + PEFT's (`tests/finetune`, made by `python/make_finetune_fixtures.py`), for every
//! instruction set the machine has.

use qwick_backend::{Ctx, Isa, ThreadPool};
use qwick_model::lora::{Adapter, MODULES};
use qwick_model::safetensors::Checkpoint;
use qwick_model::Qwen3;
use qwick_train::lora::LoraParams;
use qwick_train::optim::{clip, AdamW, Moments};
use qwick_train::step::{loss, Dropout, Frozen, Sequence};
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sequence() -> Sequence {
    sequence_at(&root().join("tests/finetune/batch.json"))
}

/// max |a − b| / max |b|, failing on NaN.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let d = qwick_backend::check::worst_abs(a, b);
    assert!(d.err.is_finite(), "NaN or infinity in a comparison: {d}");
    let scale = qwick_backend::check::max_abs(b);
    d.err / scale
}

fn name(p: &qwick_train::lora::Pair, ab: &str) -> String {
    let hf = qwick_model::names::hf(MODULES[p.module].1, p.layer, 0);
    format!("base_model.model.{}.lora_{ab}.weight", hf.strip_suffix(".weight").unwrap())
}

/// The dense fixture model, its rank-8 adapter as trainable pairs, and PEFT's reference loss
/// and gradients for it.
fn dense_fixture() -> (Qwen3, LoraParams, Value, Checkpoint) {
    let model = Qwen3::load(&root().join("tests/fixtures/dense_untied_gqa2")).unwrap();
    let adapter = Adapter::open(&root().join("tests/lora/adapter_r8")).unwrap();
    let params = LoraParams::from_adapter(&model.config, &adapter, 0.0).unwrap();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/finetune/reference.json")).unwrap()).unwrap();
    let grads_ref = Checkpoint::open_file(&root().join("tests/finetune/grads.safetensors")).unwrap();
    (model, params, reference, grads_ref)
}

#[test]
fn loss_gradients_and_a_step_equal_peft() {
    let (model, params, reference, grads_ref) = dense_fixture();
    let after_ref = Checkpoint::open_file(&root().join("tests/finetune/after_step.safetensors")).unwrap();
    let seq = sequence();
    let n_lab = seq.labelled();
    assert_eq!(n_lab as u64, reference["labelled_tokens"].as_u64().unwrap());
    // Recomputing every layer, keeping one layer's activations, keeping all.
    for (threads, kept) in [(1, 0), (2, 0), (2, 1), (2, 99)] {
        let pool = ThreadPool::new(threads);
        let frozen =
            Frozen::new(&model, Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) }).unwrap().keep_layers(kept);
        for isa in Isa::all_supported() {
            let ctx = Ctx { exact: true, ..Ctx::new(isa, &pool) };
            let mut grads = params.zeros_like();
            let scale = 1.0 / n_lab as f32;
            let total = loss(ctx, &frozen, &params, &seq, scale, Dropout { p: 0.0, key: 0 }, Some(&mut grads));
            let l = total / n_lab as f64;
            let want = reference["loss"].as_f64().unwrap();
            assert!(((l - want) / want).abs() < 1e-4, "{isa:?}: loss {l} vs PEFT {want}");
            // Forward only gives the same loss.
            let fwd = loss(ctx, &frozen, &params, &seq, scale, Dropout { p: 0.0, key: 0 }, None);
            assert!((fwd - total).abs() < 1e-6 * total.abs().max(1.0), "{fwd} vs {total}");
            for (p, (ga, gb)) in params.pairs.iter().zip(&grads) {
                for (ab, g) in [("A", ga), ("B", gb)] {
                    let n = name(p, ab);
                    let r = grads_ref.tensor(&n).unwrap().to_f32();
                    let e = rel(g, &r);
                    assert!(e <= 1e-3, "{isa:?} {threads} threads: gradient of {n} off by {e}");
                }
            }
            // One step: clip to the reference's norm, AdamW.
            let mut p2 = params.clone();
            let max_norm = reference["max_norm"].as_f64().unwrap() as f32;
            let mut all: Vec<&mut [f32]> =
                grads.iter_mut().flat_map(|(a, b)| [a.as_mut_slice(), b.as_mut_slice()]).collect();
            let norm = clip(&mut all, max_norm);
            let want_norm = reference["grad_norm"].as_f64().unwrap() as f32;
            assert!(((norm - want_norm) / want_norm).abs() < 1e-3, "grad norm {norm} vs {want_norm}");
            let betas = reference["betas"].as_array().unwrap();
            let opt = AdamW {
                beta1: betas[0].as_f64().unwrap() as f32,
                beta2: betas[1].as_f64().unwrap() as f32,
                eps: reference["eps"].as_f64().unwrap() as f32,
                weight_decay: reference["weight_decay"].as_f64().unwrap() as f32,
            };
            let lr = reference["lr"].as_f64().unwrap() as f32;
            for (p, (ga, gb)) in p2.pairs.iter_mut().zip(&grads) {
                let mut ma = Moments::zeros(p.a.len());
                let mut mb = Moments::zeros(p.b.len());
                opt.update(&mut p.a, ga, &mut ma, lr, 1);
                opt.update(&mut p.b, gb, &mut mb, lr, 1);
            }
            for (p, p0) in p2.pairs.iter().zip(&params.pairs) {
                for (ab, v, v0) in [("A", &p.a, &p0.a), ("B", &p.b, &p0.b)] {
                    let n = name(p, ab);
                    let want = after_ref.tensor(&n).unwrap().to_f32();
                    let g = grads_ref.tensor(&n).unwrap().to_f32();
                    // Elements whose gradient is at float noise level may step either way
                    // (the first AdamW step is lr · sign(g)); compare the rest.
                    let gmax = qwick_backend::check::max_abs(&g);
                    let keep: Vec<usize> = (0..g.len()).filter(|&i| g[i].abs() >= 1e-4 * gmax).collect();
                    let a: Vec<f32> = keep.iter().map(|&i| v[i] - v0[i]).collect();
                    let b: Vec<f32> = keep.iter().map(|&i| want[i] - v0[i]).collect();
                    let e = rel(&a, &b);
                    assert!(e <= 1e-3, "{isa:?}: step of {n} off by {e}");
                }
            }
        }
    }
}

/// With no memory for transposed copies, every backward product reads blocks of the stored
/// weight rows: the same loss and gradients (a mutation of the blocks' offsets fails this).
#[test]
fn gradients_without_transposed_copies_equal_peft() {
    let (model, params, reference, grads_ref) = dense_fixture();
    let seq = sequence();
    let n_lab = seq.labelled();
    let pool = ThreadPool::new(2);
    let scalar = Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) };
    // The bf16 modes read the k and v weights (48 outputs) by blocks, the rest as stored.
    let bf16 = [qwick_backend::Bf16Mode::Amx, qwick_backend::Bf16Mode::Dot, qwick_backend::Bf16Mode::Fma]
        .into_iter()
        .filter(|m| m.supported())
        .map(|mode| Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) });
    for ctx in [scalar].into_iter().chain(bf16) {
        let frozen = Frozen::with_copy_budget(&model, ctx, 0).unwrap();
        assert_eq!(frozen.extra_bytes(), 0);
        assert!(frozen.block_read() > 0);
        let mut grads = params.zeros_like();
        let total = loss(ctx, &frozen, &params, &seq, 1.0 / n_lab as f32, Dropout { p: 0.0, key: 0 }, Some(&mut grads));
        let (l, want) = (total / n_lab as f64, reference["loss"].as_f64().unwrap());
        let (ltol, tol) = if ctx.exact { (1e-4, 1e-3) } else { (1e-2, 5e-2) };
        assert!(((l - want) / want).abs() < ltol, "{:?}: loss {l} vs PEFT {want}", ctx.bf16_mode());
        for (p, (ga, gb)) in params.pairs.iter().zip(&grads) {
            for (ab, g) in [("A", ga), ("B", gb)] {
                let n = name(p, ab);
                let e = rel(g, &grads_ref.tensor(&n).unwrap().to_f32());
                assert!(e <= tol, "{:?}: gradient of {n} off by {e}", ctx.bf16_mode());
            }
        }
    }
}

/// In the bf16 modes (AMX tiles, bf16 dot products: both operands of the large products rounded
/// to bf16, the backward products reading the stored weights transposed instead of copies),
/// loss and gradients stay near PyTorch + PEFT's f32 ones.
#[test]
fn bf16_products_stay_near_peft() {
    let pool = ThreadPool::new(2);
    let (model, params, reference, grads_ref) = dense_fixture();
    let seq = sequence();
    let n_lab = seq.labelled();
    let modes = [qwick_backend::Bf16Mode::Amx, qwick_backend::Bf16Mode::Dot, qwick_backend::Bf16Mode::Fma];
    for mode in modes.into_iter().filter(|m| m.supported()) {
        let ctx = Ctx { bf16: Some(mode), ..Ctx::new(Isa::best(), &pool) };
        for kept in [0, 99] {
            // k and v (48 outputs) keep a transposed copy: transposed reads take multiples of 32.
            let frozen = Frozen::new(&model, ctx).unwrap().keep_layers(kept);
            // Against the scalar reference, which takes a transposed copy of every weight.
            let copies = Frozen::new(&model, Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) }).unwrap();
            assert!(frozen.extra_bytes() < copies.extra_bytes() / 2, "bf16 weights are mostly read as stored");
            let mut grads = params.zeros_like();
            let total =
                loss(ctx, &frozen, &params, &seq, 1.0 / n_lab as f32, Dropout { p: 0.0, key: 0 }, Some(&mut grads));
            let (l, want) = (total / n_lab as f64, reference["loss"].as_f64().unwrap());
            assert!(((l - want) / want).abs() < 1e-2, "{mode:?}: loss {l} vs PEFT {want}");
            let mut worst = 0f32;
            for (p, (ga, gb)) in params.pairs.iter().zip(&grads) {
                for (ab, g) in [("A", ga), ("B", gb)] {
                    let n = name(p, ab);
                    let e = rel(g, &grads_ref.tensor(&n).unwrap().to_f32());
                    assert!(e <= 5e-2, "{mode:?}, kept {kept}: gradient of {n} off by {e}");
                    worst = worst.max(e);
                }
            }
            eprintln!("{mode:?}, kept {kept}: loss {l} vs {want}, worst gradient error {worst}");
        }
    }
}

/// Sequences in the fixture format.
fn sequence_at(path: &std::path::Path) -> Sequence {
    let b: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ints = |k: &str| -> Vec<i64> { b[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
    let mut start = vec![0u32; ints("tokens").len()];
    for s in b["segments"].as_array().unwrap() {
        let (s0, len) = (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize);
        start[s0..s0 + len].fill(s0 as u32);
    }
    Sequence {
        tokens: ints("tokens").iter().map(|&t| t as u32).collect(),
        positions: ints("positions").iter().map(|&t| t as u32).collect(),
        start,
        labels: ints("labels").iter().map(|&l| (l >= 0).then_some(l as u32)).collect(),
    }
}

#[test]
fn moe_models_train_their_attention_as_peft_does() {
    for name in ["moe_norm_topk", "moe_nonorm_mlponly"] {
        let dir = root().join("tests/finetune/moe").join(name);
        let model = Qwen3::load(&root().join("tests/fixtures").join(name)).unwrap();
        let adapter = Adapter::open(&dir.join("adapter")).unwrap();
        let params = LoraParams::from_adapter(&model.config, &adapter, 0.0).unwrap();
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let grads_ref = Checkpoint::open_file(&dir.join("grads.safetensors")).unwrap();
        let seq = sequence_at(&dir.join("batch.json"));
        let n_lab = seq.labelled();
        let pool = ThreadPool::new(2);
        let frozen = Frozen::new(&model, Ctx { exact: true, ..Ctx::new(Isa::SCALAR, &pool) }).unwrap();
        for isa in Isa::all_supported() {
            let ctx = Ctx { exact: true, ..Ctx::new(isa, &pool) };
            let mut grads = params.zeros_like();
            let total =
                loss(ctx, &frozen, &params, &seq, 1.0 / n_lab as f32, Dropout { p: 0.0, key: 0 }, Some(&mut grads));
            let l = total / n_lab as f64;
            let want = reference["loss"].as_f64().unwrap();
            assert!(((l - want) / want).abs() < 1e-4, "{name} {isa:?}: loss {l} vs PEFT {want}");
            for (p, (ga, gb)) in params.pairs.iter().zip(&grads) {
                for (ab, g) in [("A", ga), ("B", gb)] {
                    let n = self::name(p, ab);
                    let e = rel(g, &grads_ref.tensor(&n).unwrap().to_f32());
                    assert!(e <= 1e-3, "{name} {isa:?}: gradient of {n} off by {e}");
                }
            }
        }
        // MLP targets on MoE layers are refused by name.
        let spec = qwick_train::lora::LoraSpec {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            dropout: 0.0,
            targets: vec!["q_proj", "gate_proj"],
        };
        let e = LoraParams::init(&model.config, spec, 1).err().unwrap().to_string();
        assert!(e.contains("mixture of experts") && e.contains("gate_proj"), "{e}");
    }
}
