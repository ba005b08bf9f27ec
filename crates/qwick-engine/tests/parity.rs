//! The forward pass against transformers: logits of every fixture in `tests/fixtures` (random
//! Qwen3 / Qwen3-MoE checkpoints made by `python/make_fixtures.py`, with transformers' float32
//! logits), on every kernel ISA this CPU supports, whole and in chunks.
//!
//! Tolerance, exact ISAs: |ours − theirs| ≤ 1e-4 · (1 + |theirs|). Both sides compute in f32
//! from the same stored weights (widened exactly), so differences come only from summation
//! order and the exp/cos implementations: observed ≤ 3e-5 on logits up to 60. A real mistake
//! (RoPE layout, norm placement, YaRN factors, routing) moves logits by 0.1 or more.
//!
//! `avx512bf16` rounds activations to bf16 (relative error ≤ 2⁻⁹) before each matmul with
//! bf16 weights, as bf16 inference does; there the bound is 0.05 × the standard deviation of
//! the reference logits (observed ≤ 0.025).

use qwick_backend::{check, Isa, Level};
use qwick_engine::{Runner, RunnerConfig};
use qwick_model::Qwen3;
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("logits.npy").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 11, "expected the committed fixtures, found {}", dirs.len());
    dirs
}

fn tokens(dir: &std::path::Path) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// `rounded`: activations rounded to bf16 before products with bf16 weights.
fn assert_close(got: &[f32], want: &[f32], what: &str, rounded: bool) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if rounded {
        let mean = want.iter().sum::<f32>() / want.len() as f32;
        let std = (want.iter().map(|w| (w - mean).powi(2)).sum::<f32>() / want.len() as f32).sqrt();
        let worst = check::worst_abs(got, want);
        assert!(worst.err <= 0.05 * std, "{what}: max error {worst} with logit std {std}");
        return;
    }
    check::assert_close_rel(what, got, want, 1e-4);
}

#[test]
fn logits_match_transformers_on_every_isa() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let model = Arc::new(Qwen3::load(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}")));
        let toks = tokens(&dir);
        let (shape, want) = qwick_model::npy::read_f32(&dir.join("logits.npy")).unwrap();
        assert_eq!(shape, vec![toks.len(), model.config.vocab_size], "{name}");
        for isa in Isa::all_supported() {
            let mut r = Runner::new(model.clone(), &RunnerConfig::with_tokens(toks.len(), 2, isa)).unwrap();
            let got = r.score(&toks, 4096).unwrap();
            assert_close(&got, &want, &format!("{name} {isa}"), isa.rounds_activations());
            // The same logits when the prompt is fed in chunks through the cache.
            let got = r.score(&toks, 7).unwrap();
            assert_close(&got, &want, &format!("{name} {isa} chunked"), isa.rounds_activations());
            assert_eq!(r.blocks().num_used(), 0, "{name}: blocks freed");
        }
        // bf16 weights converted to AMX's tiles at load (as `run`, `serve` and `bench` do on
        // AMX machines): products on AMX from one row on, the tied table read from the head.
        if Level::Amx.supported() {
            // Not beyond the memory budget: then the file's layout stays.
            let opts = qwick_model::LoadOptions { bf16_tiles: true, bf16_tiles_budget: 0, ..Default::default() };
            let model = Qwen3::load_with(&dir, &opts).unwrap();
            assert!(model.linears().iter().all(|l| l.view().layout == qwick_backend::matmul::Layout::Rows));
            let opts = qwick_model::LoadOptions { bf16_tiles: true, ..Default::default() };
            let model = Arc::new(Qwen3::load_with(&dir, &opts).unwrap());
            assert!(model.linears().iter().map(|l| l.view()).all(|v| v.format != qwick_backend::Format::BF16
                || !v.cols.is_multiple_of(32)
                || v.layout == qwick_backend::matmul::Layout::Tiles));
            let mut r =
                Runner::new(model, &RunnerConfig::with_tokens(toks.len(), 2, Isa::new(Level::Amx).unwrap())).unwrap();
            for chunk in [4096, 7, 1] {
                let got = r.score(&toks, chunk).unwrap();
                assert_close(&got, &want, &format!("{name} amx tiles, chunks of {chunk}"), true);
            }
        }
    }
}

/// The last token's hidden state after the final norm (what embeddings pool), through the
/// head, gives transformers' logits at that position: it is transformers' `Qwen3Model` output
/// there. Whole and in chunks, beside a sequence that wants logits.
#[test]
fn pooled_hidden_states_are_transformers_last_hidden_states() {
    use qwick_backend::{Ctx, ThreadPool};
    use qwick_engine::{Logits, Span};
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let model = Arc::new(Qwen3::load(&dir).unwrap());
        let toks = tokens(&dir);
        let (_, want) = qwick_model::npy::read_f32(&dir.join("logits.npy")).unwrap();
        let (vocab, n) = (model.config.vocab_size, toks.len());
        let last = &want[(n - 1) * vocab..];
        let isa = Isa::best_exact();
        let mut r = Runner::new(model.clone(), &RunnerConfig::with_tokens(4 * n, 2, isa)).unwrap();
        let pool = ThreadPool::new(2);
        let ctx = Ctx { exact: true, ..Ctx::new(isa, &pool) };
        for chunk in [n, 5] {
            let (a, b) = (r.add_sequence(), r.add_sequence());
            let mut hidden = vec![];
            for (k, part) in toks.chunks(chunk).enumerate() {
                let end = (k + 1) * chunk >= n;
                let out = r
                    .step(&[
                        Span { seq: a, tokens: part, logits: if end { Logits::Hidden } else { Logits::None } },
                        Span { seq: b, tokens: part, logits: Logits::Last },
                    ])
                    .unwrap();
                hidden = out[0].clone();
                assert_eq!(out[1].len(), vocab, "{name}: the other sequence's logits");
            }
            assert_eq!(hidden.len(), model.config.hidden_size, "{name}");
            let mut logits = vec![0f32; vocab];
            model.lm_head.forward(ctx, &hidden, 1, &mut logits);
            check::assert_close_rel(
                &format!("{name}: hidden state through the head, chunks of {chunk}"),
                &logits,
                last,
                1e-4,
            );
            r.free_sequence(a);
            r.free_sequence(b);
        }
    }
}
