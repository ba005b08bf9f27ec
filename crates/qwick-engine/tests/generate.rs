//! Greedy generation against transformers: `tests/greedy/model` is a tiny random Qwen3 with the
//! full 151,936-token vocabulary, and `tests/greedy/refs.json` holds chat prompts rendered with
//! the real Qwen3 template and the tokens transformers' greedy `generate` produced
//! (`python/make_greedy_refs.py`; every arg-max there wins by at least 0.02).
//!
//! Checked alone through `generate` on every exact ISA, and with all prompts driven together
//! through `SeqGen` in shared steps.

use qwick_backend::Isa;
use qwick_engine::{
    generate, FinishReason, GenParams, Logits, Runner, RunnerConfig, Scheduler, SchedulerConfig, SeqGen, Span,
};
use qwick_model::Qwen3;
use serde_json::Value;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

fn greedy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/greedy")
}

struct Case {
    name: String,
    prompt: Vec<u32>,
    want: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn cases() -> (Vec<Case>, Vec<u32>, usize) {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(greedy_dir().join("refs.json")).unwrap()).unwrap();
    let cases: Vec<Case> = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            prompt: ids(&c["prompt_ids"]),
            want: ids(&c["generated_ids"]),
        })
        .collect();
    assert!(cases.len() >= 3);
    (cases, ids(&refs["eos_token_ids"]), refs["max_new_tokens"].as_u64().unwrap() as usize)
}

fn model() -> Arc<Qwen3> {
    Arc::new(Qwen3::load(&greedy_dir().join("model")).unwrap())
}

fn params(eos: &[u32], max_tokens: usize, max_context: usize) -> GenParams {
    GenParams { eos_token_ids: eos.to_vec(), ..GenParams::greedy(Some(max_tokens), max_context) }
}

#[test]
fn greedy_generate_matches_transformers() {
    let model = model();
    let (cases, eos, n) = cases();
    for isa in Isa::all_supported().into_iter().filter(|i| !i.rounds_activations()) {
        let runner = Runner::new(model.clone(), &RunnerConfig::with_tokens(256, 2, isa)).unwrap();
        let mut sched = Scheduler::new(runner, SchedulerConfig::default());
        for c in &cases {
            let mut streamed = vec![];
            let g = generate(&mut sched, &c.prompt, params(&eos, n, 512), |e| {
                assert_eq!(e.index, streamed.len());
                streamed.push(e.token.id);
                ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(g.tokens, c.want, "{} on {isa}", c.name);
            assert_eq!(streamed, c.want);
            assert_eq!(g.finish, FinishReason::Length);
            assert_eq!((g.prompt_tokens, g.sampled_tokens, g.decode_steps), (c.prompt.len(), n, n - 1));
        }
        assert_eq!(sched.stats().kv_blocks_used, 0, "sequences are freed");
        assert_eq!(sched.check_kv(), Ok(()));
        // The same prompt again: its whole blocks come from the prefix cache, same tokens.
        let c = cases.iter().max_by_key(|c| c.prompt.len()).unwrap();
        let g = generate(&mut sched, &c.prompt, params(&eos, n, 512), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(g.tokens, c.want, "{} from the cache on {isa}", c.name);
        assert_eq!(g.cached_tokens, (c.prompt.len() - 1) / 16 * 16, "{}", c.name);
        // The next turn of a conversation (prompt, answer, more): the first two come from the cache.
        let next: Vec<u32> = c.prompt.iter().chain(&g.tokens).chain(&c.prompt[..5]).copied().collect();
        let g2 = generate(&mut sched, &next, params(&eos, 2, 512), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(g2.cached_tokens, (c.prompt.len() + g.tokens.len() - 1) / 16 * 16, "{}", c.name);
    }
}

#[test]
fn generate_stops_on_stop_tokens_callback_and_context() {
    let model = model();
    let (cases, eos, n) = cases();
    let c = &cases[0];
    let runner = Runner::new(model, &RunnerConfig::with_tokens(256, 2, Isa::best_exact())).unwrap();
    let mut runner = Scheduler::new(runner, SchedulerConfig::default());
    // A stop token id: the fifth greedy token ends generation, included.
    let mut p = params(&eos, n, 512);
    p.sampling.stop_token_ids = vec![c.want[4]];
    let g = generate(&mut runner, &c.prompt, p, |_| ControlFlow::Continue(())).unwrap();
    let first = c.want.iter().position(|&t| t == c.want[4]).unwrap();
    assert_eq!((g.tokens.as_slice(), g.finish), (&c.want[..=first], FinishReason::Stop));
    // The callback breaking.
    let g = generate(&mut runner, &c.prompt, params(&eos, n, 512), |e| {
        if e.index == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((g.tokens.as_slice(), g.finish), (&c.want[..3], FinishReason::Aborted));
    // The context: prompt + 5 tokens.
    let ctx = c.prompt.len() + 5;
    let g = generate(&mut runner, &c.prompt, params(&eos, n, ctx), |_| ControlFlow::Continue(())).unwrap();
    assert_eq!((g.tokens.as_slice(), g.finish), (&c.want[..5], FinishReason::Length));
    // A prompt that fills the context is an error, not a panic.
    let e = generate(&mut runner, &c.prompt, params(&eos, n, c.prompt.len()), |_| ControlFlow::Continue(()));
    assert!(e.unwrap_err().to_string().contains("no room"));
    assert_eq!(runner.stats().kv_blocks_used, 0);
    assert_eq!(runner.check_kv(), Ok(()));
}

/// The per-sequence state driven by a hand-written loop that batches every sequence in one step,
/// as a server would: same tokens as each alone.
#[test]
fn seqgen_batched_matches_transformers() {
    let model = model();
    let (cases, eos, n) = cases();
    let mut runner = Runner::new(model, &RunnerConfig::with_tokens(1024, 2, Isa::best_exact())).unwrap();
    let mut seqs: Vec<_> = cases
        .iter()
        .map(|c| (runner.add_sequence(), SeqGen::new(&c.prompt, params(&eos, n, 512)).unwrap(), false))
        .collect();
    while seqs.iter().any(|s| !s.2) {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].2).collect();
        // Each sequence's tokens (its generation state's) not yet in the cache.
        let spans: Vec<Span> = active
            .iter()
            .map(|&i| {
                let (seq, gen, _) = &seqs[i];
                Span { seq: *seq, tokens: &gen.tokens()[runner.cached(*seq).unwrap()..], logits: Logits::Last }
            })
            .collect();
        let logits = runner.step(&spans).unwrap();
        for (&i, mut l) in active.iter().zip(logits) {
            let (seq, gen, done) = &mut seqs[i];
            let d = gen.on_logits(&mut l).unwrap();
            if d.finish.is_some() {
                *done = true;
                runner.free_sequence(*seq);
            }
        }
    }
    for (c, (_, gen, _)) in cases.iter().zip(&seqs) {
        assert_eq!(gen.output(), c.want.as_slice(), "{}", c.name);
    }
    assert_eq!(runner.blocks().num_used(), 0);
}

/// Speculative decoding on the real model: drafted by the model itself (every draft kept) and
/// by prompt lookup (drafts kept and rejected, their K/V rolled back): the same tokens as
/// transformers' greedy output, alone and all prompts together.
#[test]
fn speculative_decoding_matches_transformers() {
    use qwick_engine::{Collect, Request, SpecConfig};
    let model = model();
    let (cases, eos, n) = cases();
    for isa in Isa::all_supported().into_iter().filter(|i| !i.rounds_activations()) {
        for spec in [SpecConfig::model(4).unwrap(), SpecConfig::parse("ngram:2", 3).unwrap()] {
            let cfg = RunnerConfig::with_tokens(1024, 2, isa);
            let runner = Runner::new(model.clone(), &cfg).unwrap();
            let by_model = spec == SpecConfig::model(4).unwrap();
            let mut sched = Scheduler::new(runner, SchedulerConfig { spec: Some(spec), ..SchedulerConfig::default() });
            if by_model {
                sched = sched.with_draft_model(Runner::new(model.clone(), &cfg).unwrap());
            }
            // Each alone, then all together.
            for together in [false, true] {
                let sinks: Vec<Collect> = cases
                    .iter()
                    .map(|c| {
                        let sink = Collect::default();
                        let gen = SeqGen::new(&c.prompt, params(&eos, n, 512)).unwrap();
                        sched.add(Request { gen, logprobs: None, adapter: 0 }, Box::new(sink.clone()));
                        if !together {
                            while sched.has_work() {
                                sched.step();
                            }
                        }
                        sink
                    })
                    .collect();
                while sched.has_work() {
                    sched.step();
                }
                for (c, sink) in cases.iter().zip(&sinks) {
                    assert_eq!(sink.tokens(), c.want, "{} on {isa}, together: {together}", c.name);
                }
            }
            let st = sched.stats();
            assert!(st.spec_accepted > 0, "{isa}: {st:?}");
            if by_model {
                assert_eq!(st.spec_accepted, st.spec_drafted, "{isa}: the model agrees with itself");
            }
            assert_eq!((st.kv_blocks_used, st.kv_inconsistency), (0, None));
        }
    }
}
