//! The forward on a GPU against the CPU's, on every checkpoint fixture (dense, GQA, YaRN, tied
//! and untied heads, f32/f16/bf16 storage, MoE with and without top-k renormalisation, sparse
//! MoE layers): logits of a mixed batch (two prompts, then their next tokens beside a third
//! prompt) within 1e-3 of the largest logit. Runs on the first adapter wgpu finds (lavapipe
//! in CI); without one it says loudly that it was skipped.
#![cfg(feature = "gpu")]

use qwick_backend::check::{assert_close, max_abs};
use qwick_backend::gpu::Gpu;
use qwick_backend::{Ctx, Format, Isa, ThreadPool};
use qwick_model::gpu::GpuModel;
use qwick_model::lora::Adapter;
use qwick_model::{Batch, LoadOptions, Qwen3};
use std::path::Path;
use std::sync::Arc;

const FIXTURES: [&str; 11] = [
    "dense_f16",
    "dense_f32",
    "dense_gqa8_yarn",
    "dense_hf5_layout",
    "dense_sharded",
    "dense_tied_gqa4",
    "dense_untied_gqa2",
    "moe_hf5_layout",
    "moe_nonorm_mlponly",
    "moe_norm_topk",
    "moe_sparse_step2",
];

const BLOCK: usize = 16;

/// Three steps: the first 20 tokens of a 37-token prompt alone (a chunk without logits: the
/// prompt goes on), its other 17 beside a 5-token prompt, then one token of each beside a
/// 40-token prompt (every prompt row's logits; 42 rows, so the tiled products; and two rows'
/// final hidden states); each sequence on blocks of its own, out of order.
fn steps(vocab: u32) -> Vec<Batch> {
    let tok = |i: u32| (i * 7919 + 13) % vocab;
    let tables = [vec![3, 0, 6], vec![1], vec![5, 2, 4]];
    let mut first = Batch::default();
    first.push_span(&(0..20).map(tok).collect::<Vec<_>>(), 0, &tables[0], BLOCK, false);
    first.logits_rows.clear();
    let mut rest = Batch::default();
    rest.push_span(&(20..37).map(tok).collect::<Vec<_>>(), 20, &tables[0], BLOCK, true);
    rest.push_span(&(40..45).map(tok).collect::<Vec<_>>(), 0, &tables[1], BLOCK, true);
    let mut next = Batch::default();
    next.push_span(&[tok(100)], 37, &tables[0], BLOCK, false);
    next.push_span(&[tok(101)], 5, &tables[1], BLOCK, false);
    next.push_span(&(60..100).map(tok).collect::<Vec<_>>(), 0, &tables[2], BLOCK, true);
    // Two rows' hidden states too (as embeddings pool them).
    next.hidden_rows = vec![41, 0];
    vec![first, rest, next]
}

#[test]
fn gpu_logits_match_the_cpu_on_every_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in FIXTURES {
        let model = Arc::new(Qwen3::load(&root.join(name)).unwrap());
        let gpu = match GpuModel::new(model.clone(), 0, 8, BLOCK) {
            Ok(g) => g,
            Err(e) if e.to_string().contains("no GPU adapter") => {
                eprintln!("SKIPPED gpu_logits_match_the_cpu_on_every_fixture: {e}");
                return;
            }
            Err(e) => panic!("{name}: {e:#}"),
        };
        same_steps(name, &model, gpu, Format::F32);
        // KV caches of 16-bit elements, against the CPU's of the same.
        for f in [Format::F16, Format::BF16] {
            same_steps(
                &format!("{name}, {f} cache"),
                &model,
                GpuModel::on(Gpu::open(0).unwrap(), model.clone(), (8, BLOCK, f)).unwrap(),
                f,
            );
        }
    }
}

/// The logits of [`steps`] on `gpu` against the CPU's, exact, within 1e-3 of the largest; both
/// caches of `kv` elements.
fn same_steps(name: &str, model: &Qwen3, gpu: GpuModel, kv: Format) {
    close_steps(name, model, gpu, kv, 1e-3);
}

/// With f16 tiles (`Gpu::set_f16`), the prefill's products round their factors to f16: logits
/// within 5e-3 of the largest (about 1.3e-3 seen).
#[test]
fn f16_tiles_stay_close_to_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in ["dense_f32", "moe_norm_topk"] {
        let Ok(mut g) = Gpu::open(0) else {
            eprintln!("SKIPPED f16_tiles_stay_close_to_the_cpu: no GPU adapter");
            return;
        };
        if !g.set_f16(true) {
            eprintln!("NOT RUN f16_tiles_stay_close_to_the_cpu: {} has no f16 arithmetic", g.summary.name);
            return;
        }
        let model = Arc::new(Qwen3::load(&root.join(name)).unwrap());
        let gpu = GpuModel::on(g, model.clone(), (8, BLOCK, Format::F32)).unwrap();
        close_steps(&format!("{name}, f16 tiles"), &model, gpu, Format::F32, 5e-3);
    }
}

/// [`same_steps`] within `tol` of the largest logit.
fn close_steps(name: &str, model: &Qwen3, mut gpu: GpuModel, kv: Format, tol: f32) {
    let pool = ThreadPool::new(2);
    let ctx = Ctx { exact: true, ..Ctx::new(Isa::best_exact(), &pool) };
    let mut kv = model.new_kv_cache_as(kv, 8, BLOCK);
    for (s, batch) in steps(model.config.vocab_size as u32).iter().enumerate() {
        let want = model.forward(ctx, batch, &mut kv).unwrap();
        let got = gpu.forward(batch).unwrap();
        assert_close(&format!("{name}, step {s}"), &got, &want, tol * max_abs(&want));
    }
}

#[test]
fn weights_and_logits_larger_than_a_binding_are_split() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    // 32 KiB a binding: the 512-row head (64 KiB of bf16) in two runs of rows, the 42 rows of
    // logits of the last step 16 at a time; a MoE block's stacked experts (48 KiB a
    // projection) do not fit, so its experts run one by one, routed on the host.
    let limited = || {
        Gpu::open(0).map(|mut g| {
            g.limit_bindings(32 << 10);
            g
        })
    };
    if let Err(e) = limited() {
        eprintln!("SKIPPED weights_and_logits_larger_than_a_binding_are_split: {e}");
        return;
    }
    for name in ["dense_untied_gqa2", "moe_norm_topk"] {
        let model = Arc::new(Qwen3::load(&root.join(name)).unwrap());
        let gpu = GpuModel::on(limited().unwrap(), model.clone(), (8, BLOCK, Format::F32)).unwrap();
        same_steps(&format!("{name} split"), &model, gpu, Format::F32);
    }
}

/// Rows that read only their highest-ranked logits ([`Batch::candidates`]: 1, 20, 5 or 256 of
/// them) get those and -inf elsewhere; rows that read them all (0, or more than the device
/// ranks) and the hidden states come back whole, logits taken 16 rows at a time as well.
#[test]
fn rows_that_read_their_candidates_get_those_alone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = Arc::new(Qwen3::load(&root.join("dense_untied_gqa2")).unwrap());
    let vocab = model.config.vocab_size;
    for limit in [None, Some(32 << 10)] {
        let gpu = Gpu::open(0).map(|mut g| {
            if let Some(l) = limit {
                g.limit_bindings(l);
            }
            g
        });
        let Ok(gpu) = gpu else {
            eprintln!("SKIPPED rows_that_read_their_candidates_get_those_alone: no GPU adapter");
            return;
        };
        let mut gpu = GpuModel::on(gpu, model.clone(), (8, BLOCK, Format::F32)).unwrap();
        let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        // Counts up to 100: pairs come back; with 256 (half of this vocabulary), whole rows.
        let sets: [&[u32]; 2] = [&[1, 20, 0, 300, 5, 100], &[1, 256]];
        let runs = steps(vocab as u32).into_iter().enumerate().flat_map(|(s, b)| sets.map(|c| (s, b.clone(), c)));
        for (s, batch, counts) in runs {
            let mut top = batch.clone();
            top.candidates = (0..batch.logits_rows.len()).map(|i| counts[i % counts.len()]).collect();
            let got = gpu.forward(&top).unwrap();
            // The same step again, every logit read back (it writes the same K/V again).
            let full = gpu.forward(&batch).unwrap();
            assert_eq!(got.len(), full.len());
            let rows = batch.logits_rows.len();
            assert_eq!(got[rows * vocab..], full[rows * vocab..], "step {s}: the hidden states");
            for (r, &c) in top.candidates.iter().enumerate() {
                let (g, f) = (&got[r * vocab..(r + 1) * vocab], &full[r * vocab..(r + 1) * vocab]);
                let what = format!("step {s}, limit {limit:?}, row {r} of {rows}, {c} candidates");
                if c == 0 || c > 256 || counts.contains(&256) {
                    assert_eq!(g, f, "{what}: the whole row");
                    continue;
                }
                // The entries kept are the row's best-ranked, at least c, with their values.
                let mut ids: Vec<usize> = (0..vocab).collect();
                ids.sort_by(|&a, &b| key(f[b]).partial_cmp(&key(f[a])).expect("no NaN").then(a.cmp(&b)));
                let kept = g.iter().filter(|v| **v != f32::NEG_INFINITY).count();
                assert!(kept >= c as usize && kept <= 100, "{what}: {kept} kept");
                for (place, &i) in ids.iter().enumerate() {
                    let want = if place < kept { key(f[i]) } else { f32::NEG_INFINITY };
                    assert_eq!(g[i], want, "{what}: logit {i}, ranked {place}");
                }
            }
        }
    }
}

/// Sequences of different LoRA adapters in one batch on the GPU: each gets PEFT's logits for
/// its adapter (`tests/lora`), and the base model's for a sequence without one.
#[test]
fn lora_adapters_on_the_gpu_give_peft_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let opts = LoadOptions { repack: false, ..LoadOptions::default() };
    let mut model = Qwen3::load_with(&root.join("tests/fixtures/dense_untied_gqa2"), &opts).unwrap();
    let r8 = model.add_adapter(&Adapter::open(&root.join("tests/lora/adapter_r8")).unwrap()).unwrap();
    let qv = model.add_adapter(&Adapter::open(&root.join("tests/lora/adapter_rslora_qv")).unwrap()).unwrap();
    let model = Arc::new(model);
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/lora/tokens.json")).unwrap()).unwrap();
    let ids: Vec<u32> = ids["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let (t, per_seq) = (ids.len(), ids.len().div_ceil(BLOCK));
    let mut gpu = match GpuModel::new(model.clone(), 0, 3 * per_seq, BLOCK) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED lora_adapters_on_the_gpu_give_peft_logits: {e}");
            return;
        }
    };
    let mut batch = Batch::default();
    for (s, adapter) in [r8, 0, qv].into_iter().enumerate() {
        let blocks: Vec<u32> = (0..per_seq as u32).map(|b| s as u32 * per_seq as u32 + b).collect();
        batch.push_span(&ids, 0, &blocks, BLOCK, true);
        batch.seq_adapter.push(adapter);
    }
    let logits = gpu.forward(&batch).unwrap();
    let vocab = model.config.vocab_size;
    let npy = |name: &str| qwick_model::npy::read_f32(&root.join("tests/lora").join(name)).unwrap().1;
    for (s, want) in [npy("adapter_r8.npy"), npy("base.npy"), npy("adapter_rslora_qv.npy")].iter().enumerate() {
        assert_close(&format!("sequence {s} against PEFT"), &logits[s * t * vocab..(s + 1) * t * vocab], want, 1e-4);
    }
}

#[test]
fn gpu_refuses_what_it_cannot_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = Arc::new(Qwen3::load(&root.join("dense_tied_gqa4")).unwrap());
    let mut gpu = match GpuModel::new(model.clone(), 0, 2, BLOCK) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED gpu_refuses_what_it_cannot_run: {e}");
            return;
        }
    };
    // A slot past the cache, an adapter the model lacks: errors, and the device goes on.
    let mut bad = Batch::default();
    bad.push_span(&[1, 2, 3], 0, &[7], BLOCK, false);
    assert!(gpu.forward(&bad).unwrap_err().to_string().contains("invalid batch"));
    let mut adapter = Batch::default();
    adapter.push_span(&[1, 2, 3], 0, &[0], BLOCK, false);
    adapter.seq_adapter = vec![1];
    assert!(gpu.forward(&adapter).is_err());
    adapter.seq_adapter.clear();
    assert_eq!(gpu.forward(&adapter).unwrap().len(), model.config.vocab_size);
    // A prefill chunk that wants no logits (the prompt goes on in the next step).
    let mut chunk = Batch::default();
    chunk.push_span(&[4, 5, 6], 3, &[0], BLOCK, false);
    chunk.logits_rows.clear();
    assert!(gpu.forward(&chunk).unwrap().is_empty());
    // A step whose activations would not fit one binding is an error that names the way out.
    let mut small = Gpu::open(0).unwrap();
    small.limit_bindings(4 << 10);
    let mut tight = GpuModel::on(small, model.clone(), (1, BLOCK, Format::F32)).unwrap();
    let mut long = Batch::default();
    long.push_span(&[1; 16], 0, &[0], BLOCK, false);
    let err = tight.forward(&long).unwrap_err().to_string();
    assert!(err.contains("--max-num-batched-tokens"), "{err}");
    let mut short = Batch::default();
    short.push_span(&[1, 2], 0, &[0], BLOCK, false);
    assert_eq!(tight.forward(&short).unwrap().len(), model.config.vocab_size);
    let err = GpuModel::new(model, 99, 2, BLOCK).err().expect("no adapter 99");
    assert!(err.to_string().contains("gpu:99 does not exist"), "{err}");
}
