//! The scheduler: requests of different lengths batched together under a small token budget
//! give exactly the greedy tokens each gives alone; a cache too small for all of them preempts
//! and recomputes instead of failing; identical prefixes are served from the prefix cache; a
//! request whose receiver goes away is dropped and its blocks freed; the engine thread works the
//! same way.

use qwick_backend::Isa;
use qwick_engine::{
    generate, Collect, Engine, FinishReason, GenParams, Request, Runner, RunnerConfig, Scheduler, SchedulerConfig,
    SeqGen,
};
use qwick_model::Qwen3;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn model() -> Arc<Qwen3> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dense_f32");
    Arc::new(Qwen3::load(&dir).unwrap())
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len).map(|j| ((i * 7919 + j * 104_729 + 13) % 512) as u32).collect()
}

fn params(max_tokens: usize) -> GenParams {
    GenParams::greedy(Some(max_tokens), 4096)
}

fn runner(m: &Arc<Qwen3>, tokens: usize) -> Runner {
    Runner::new(m.clone(), &RunnerConfig::with_tokens(tokens, 1, Isa::best_exact())).unwrap()
}

fn alone(m: &Arc<Qwen3>, p: &[u32], max_tokens: usize) -> Vec<u32> {
    let cfg = SchedulerConfig { prefix_caching: false, ..SchedulerConfig::default() };
    let mut s = Scheduler::new(runner(m, p.len() + max_tokens + 16), cfg);
    generate(&mut s, p, params(max_tokens), |_| ControlFlow::Continue(())).unwrap().tokens
}

type Sink = Collect;

/// The prefix-cache hit of a request's first start.
fn cached(s: &Sink) -> Option<usize> {
    s.started().first().map(|&(_, c)| c)
}

fn request(p: &[u32], max_tokens: usize) -> Request {
    Request { gen: SeqGen::new(p, params(max_tokens)).unwrap(), logprobs: None, adapter: 0 }
}

/// Runs requests (prompt length, max tokens, step at which it arrives) to the end.
fn run_all(sched: &mut Scheduler, reqs: &[(usize, usize, usize)]) -> Vec<Sink> {
    let sinks: Vec<Sink> = reqs.iter().map(|_| Sink::default()).collect();
    let mut step = 0;
    loop {
        for (i, &(len, max, at)) in reqs.iter().enumerate() {
            if at == step {
                sched.add(request(&prompt(i, len), max), Box::new(sinks[i].clone()));
            }
        }
        let n = sched.step();
        step += 1;
        if n == 0 && !sched.has_work() && step > reqs.iter().map(|r| r.2).max().unwrap() {
            break;
        }
        assert!(step < 10_000, "the scheduler makes progress");
    }
    sinks
}

/// Adds one request and steps until the scheduler has no work; the request's sink.
fn run_one(sched: &mut Scheduler, p: &[u32], max_tokens: usize) -> Sink {
    let s = Sink::default();
    sched.add(request(p, max_tokens), Box::new(s.clone()));
    while sched.has_work() {
        sched.step();
    }
    s
}

#[test]
fn batched_equals_alone_under_a_small_budget() {
    let m = model();
    let reqs = [(5, 12, 0), (40, 7, 0), (17, 20, 2), (3, 9, 5), (64, 4, 5), (33, 15, 9)];
    let mut sched = Scheduler::new(
        runner(&m, 4096),
        SchedulerConfig { max_num_batched_tokens: 16, max_num_seqs: 4, ..SchedulerConfig::default() },
    );
    let sinks = run_all(&mut sched, &reqs);
    for (i, (&(len, max, _), s)) in reqs.iter().zip(&sinks).enumerate() {
        assert_eq!(s.tokens(), alone(&m, &prompt(i, len), max), "request {i}");
        assert_eq!(s.finish(), Some(FinishReason::Length));
    }
    let st = sched.stats();
    assert_eq!(st.kv_blocks_used, 0, "{st:?}");
    assert_eq!((st.running, st.waiting), (0, 0));
    assert!(st.steps > 0 && st.batched_tokens > 0);
    assert_eq!(sched.check_kv(), Ok(()));
}

#[test]
fn preempts_and_recomputes_when_blocks_run_out() {
    let m = model();
    // 8 blocks of 16 tokens: three sequences growing to ~60 tokens each cannot all fit.
    let reqs = [(30, 30, 0), (25, 35, 0), (20, 40, 0)];
    let mut sched = Scheduler::new(
        runner(&m, 128),
        SchedulerConfig { max_num_batched_tokens: 64, prefix_caching: false, ..SchedulerConfig::default() },
    );
    let sinks = run_all(&mut sched, &reqs);
    for (i, (&(len, max, _), s)) in reqs.iter().zip(&sinks).enumerate() {
        assert_eq!(s.tokens(), alone(&m, &prompt(i, len), max), "request {i}");
        assert_eq!(s.finish(), Some(FinishReason::Length));
    }
    let st = sched.stats();
    assert!(st.preemptions > 0, "{st:?}");
    assert_eq!(st.kv_blocks_used, 0);
    assert_eq!(sched.runner().blocks().num_used(), 0);
    assert_eq!(sched.check_kv(), Ok(()));
}

#[test]
fn prefix_cache_reuses_blocks_and_evicts_lru() {
    let m = model();
    let mut sched = Scheduler::new(runner(&m, 160), SchedulerConfig::default());
    let p = prompt(7, 50);
    let want = alone(&m, &p, 6);
    let a = run_one(&mut sched, &p, 6);
    assert_eq!(a.tokens(), want);
    assert_eq!(cached(&a), Some(0));
    let st = sched.stats();
    assert_eq!(st.kv_blocks_used, 0);
    assert_eq!(st.kv_blocks_cached, 3, "50 prompt + 5 computed output tokens: 3 full blocks");

    // Same prompt: 48 tokens come from the cache, same output.
    let b = run_one(&mut sched, &p, 6);
    assert_eq!(b.tokens(), want);
    assert_eq!(cached(&b), Some(48));
    // A prompt of exactly 48 tokens: the last block is recomputed (its token needs logits).
    let c = run_one(&mut sched, &p[..48], 3);
    assert_eq!(cached(&c), Some(32));
    assert_eq!(c.tokens(), alone(&m, &p[..48], 3));
    let st = sched.stats();
    assert_eq!(st.prefix_hit_tokens, 80);
    assert_eq!(sched.check_kv(), Ok(()));

    // Unrelated prompts filling the cache evict the cached blocks instead of failing.
    let sinks = run_all(&mut sched, &[(100, 40, 0), (100, 30, 0)]);
    for (i, s) in sinks.iter().enumerate() {
        assert_eq!(s.tokens(), alone(&m, &prompt(i, 100), [40, 30][i]), "request {i}");
    }
    assert_eq!(sched.stats().kv_blocks_used, 0);
    assert_eq!(sched.check_kv(), Ok(()));
}

#[test]
fn closed_receivers_free_their_blocks() {
    let m = model();
    let mut sched = Scheduler::new(runner(&m, 1024), SchedulerConfig::default());
    let a = Sink::default();
    let b = Sink::default();
    sched.add(request(&prompt(1, 40), 100), Box::new(a.clone()));
    sched.add(request(&prompt(2, 40), 5), Box::new(b.clone()));
    for _ in 0..3 {
        sched.step();
    }
    assert!(sched.stats().kv_blocks_used > 0);
    assert_eq!(sched.check_kv(), Ok(()), "mid-run");
    a.close();
    while sched.has_work() {
        sched.step();
    }
    assert_eq!(b.tokens(), alone(&m, &prompt(2, 40), 5));
    assert!(!a.done());
    let st = sched.stats();
    assert_eq!((st.kv_blocks_used, st.running), (0, 0), "{st:?}");
    assert_eq!(sched.check_kv(), Ok(()));
}

#[test]
fn engine_thread_serves_requests() {
    let m = model();
    let m2 = m.clone();
    let engine = Engine::start(
        move || Ok(runner(&m2, 2048).into()),
        SchedulerConfig { max_num_batched_tokens: 32, max_waiting: 8, ..SchedulerConfig::default() },
    )
    .unwrap();
    assert_eq!(engine.capacity_tokens(), 2048);
    let sinks: Vec<Sink> = (0..4).map(|_| Sink::default()).collect();
    for (i, s) in sinks.iter().enumerate() {
        engine.submit(request(&prompt(i, 10 + 20 * i), 8 + i), Box::new(s.clone())).unwrap();
    }
    let t0 = Instant::now();
    while !sinks.iter().all(Sink::done) {
        assert!(t0.elapsed() < Duration::from_secs(60), "requests finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, s) in sinks.iter().enumerate() {
        assert_eq!(s.tokens(), alone(&m, &prompt(i, 10 + 20 * i), 8 + i), "request {i}");
    }
    // The queue limit.
    let blocked: Vec<Sink> = (0..20).map(|_| Sink::default()).collect();
    let results: Vec<_> =
        blocked.iter().map(|s| engine.submit(request(&prompt(9, 300), 200), Box::new(s.clone()))).collect();
    assert!(results.iter().any(|r| r.is_err()), "some requests are refused");
    engine.stop();
    for (s, r) in blocked.iter().zip(&results) {
        assert_eq!(s.done(), r.is_ok(), "stopping ends every accepted request");
    }
    assert!(engine.submit(request(&prompt(1, 3), 1), Box::new(Sink::default())).is_err());
}
