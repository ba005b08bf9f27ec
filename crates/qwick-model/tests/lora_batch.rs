//! Sequences of different LoRA adapters in one batch: each gets exactly the logits PEFT gives
//! for its adapter (`tests/lora`: a rank-8 adapter on all projections, a rank-4 rsLoRA adapter
//! on q and v), and the base model's for a sequence without one.

use qwick_backend::{Ctx, Isa, ThreadPool};
use qwick_model::lora::Adapter;
use qwick_model::{Batch, LoadOptions, Qwen3};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn npy(name: &str) -> Vec<f32> {
    qwick_model::npy::read_f32(&root().join("tests/lora").join(name)).unwrap().1
}

#[test]
fn a_batch_mixing_adapters_gives_each_sequence_its_adapter_s_logits() {
    let opts = LoadOptions { repack: false, ..LoadOptions::default() };
    let mut model = Qwen3::load_with(&root().join("tests/fixtures/dense_untied_gqa2"), &opts).unwrap();
    let r8 = model.add_adapter(&Adapter::open(&root().join("tests/lora/adapter_r8")).unwrap()).unwrap();
    let qv = model.add_adapter(&Adapter::open(&root().join("tests/lora/adapter_rslora_qv")).unwrap()).unwrap();
    assert_eq!((r8, qv, model.adapters()), (1, 2, 2));
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/lora/tokens.json")).unwrap()).unwrap();
    let ids: Vec<u32> = ids["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let (t, bs) = (ids.len(), 16);
    let per_seq = t.div_ceil(bs);
    let mut kv = model.new_kv_cache(3 * per_seq, bs);
    let mut batch = Batch::default();
    // Sequence order: r8, base, qv — the base one in the middle, between adapters.
    for (s, adapter) in [r8, 0, qv].into_iter().enumerate() {
        let blocks: Vec<u32> = (0..per_seq as u32).map(|b| s as u32 * per_seq as u32 + b).collect();
        batch.push_span(&ids, 0, &blocks, bs, true);
        batch.seq_adapter.push(adapter);
    }
    let pool = ThreadPool::new(2);
    let mut ctx = Ctx::new(Isa::best(), &pool);
    ctx.exact = true;
    let logits = model.forward(ctx, &batch, &mut kv).unwrap();
    let vocab = model.config.vocab_size;
    for (s, want) in [npy("adapter_r8.npy"), npy("base.npy"), npy("adapter_rslora_qv.npy")].iter().enumerate() {
        let got = &logits[s * t * vocab..(s + 1) * t * vocab];
        let err = qwick_backend::check::worst_abs(got, want);
        assert!(err.err < 1e-4, "sequence {s}: max |qwick - PEFT| = {err}");
    }
    // An adapter the model does not have is an error, not a panic.
    batch.seq_adapter[0] = 3;
    assert!(model.forward(ctx, &batch, &mut kv).is_err());
}
