use qwick_sampler::{
    apply_penalties, logprobs, partial_match_len, Rng, Sampler, SamplingError, SamplingParams, StopMatcher,
};
use std::collections::{BTreeSet, HashMap};

fn params() -> SamplingParams {
    SamplingParams { seed: Some(7), ..SamplingParams::default() }
}

fn sampler(p: SamplingParams) -> Sampler {
    Sampler::new(p).expect("valid params")
}

/// Pseudo-random logits in [-8, 8), all distinct.
fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::seed_from_u64(seed);
    (0..n).map(|i| (rng.next_f64() * 16.0 - 8.0) as f32 + i as f32 * 1e-7).collect()
}

fn top_set(logits: &[f32], k: usize) -> BTreeSet<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    ids[..k].iter().copied().collect()
}

fn draw_set(p: SamplingParams, logits: &[f32], n: usize) -> HashMap<u32, usize> {
    let mut s = sampler(p);
    let mut seen = HashMap::new();
    for _ in 0..n {
        let mut l = logits.to_vec();
        *seen.entry(s.sample(&mut l, &[], &[]).unwrap()).or_default() += 1;
    }
    seen
}

fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

#[test]
fn validate_rejects_out_of_range_values() {
    let bad = [
        SamplingParams { temperature: -0.1, ..params() },
        SamplingParams { temperature: f32::NAN, ..params() },
        SamplingParams { top_p: 0.0, ..params() },
        SamplingParams { top_p: 1.01, ..params() },
        SamplingParams { min_p: -0.01, ..params() },
        SamplingParams { min_p: 1.5, ..params() },
        SamplingParams { top_k: -2, ..params() },
        SamplingParams { repetition_penalty: 0.0, ..params() },
        SamplingParams { repetition_penalty: -1.0, ..params() },
        SamplingParams { presence_penalty: 2.5, ..params() },
        SamplingParams { max_tokens: Some(0), ..params() },
        SamplingParams { stop: vec![String::new()], ..params() },
    ];
    for p in bad {
        let err = p.validate().expect_err("should be rejected");
        assert!(matches!(err, SamplingError::InvalidParameter(_)));
        assert!(Sampler::new(p).is_err());
    }
    for top_k in [-1, 0, 1, 50] {
        SamplingParams { top_k, ..params() }.validate().unwrap();
    }
    SamplingParams::qwen3_thinking().validate().unwrap();
    SamplingParams::qwen3_non_thinking().validate().unwrap();
    SamplingParams::greedy().validate().unwrap();
    let msg = SamplingParams { top_p: 2.0, ..params() }.validate().unwrap_err().to_string();
    assert!(msg.contains("top_p") && msg.contains("(0, 1]"), "{msg}");
}

#[test]
fn params_deserialize_with_defaults() {
    let p: SamplingParams = serde_json::from_str("{}").unwrap();
    assert_eq!(p, SamplingParams::default());
    let p: SamplingParams =
        serde_json::from_str(r#"{"temperature": 0.5, "top_k": 20, "stop": ["\n\n"], "seed": 3}"#).unwrap();
    assert_eq!(p.temperature, 0.5);
    assert_eq!(p.top_k, 20);
    assert_eq!(p.stop, vec!["\n\n".to_string()]);
    assert_eq!(p.seed, Some(3));
    assert_eq!(p.top_p, 1.0);
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::greedy());
    let mut l = vec![0.5, 3.0, -1.0, 3.0, 2.9];
    assert_eq!(s.sample(&mut l, &[], &[]).unwrap(), 1);
    let mut l = vec![f32::NAN, -1.0, f32::NEG_INFINITY, 0.0];
    assert_eq!(s.sample(&mut l, &[], &[]).unwrap(), 3);
    let logits = random_logits(151_936, 3);
    let best = top_set(&logits, 1).into_iter().next().unwrap();
    assert_eq!(s.sample(&mut logits.clone(), &[], &[]).unwrap(), best);
    assert_eq!(s.sample(&mut [], &[], &[]).unwrap_err(), SamplingError::EmptyLogits);
    assert_eq!(s.sample(&mut [f32::NAN, f32::NEG_INFINITY], &[], &[]).unwrap_err(), SamplingError::NoFiniteLogits);
}

#[test]
fn top_k_never_leaves_the_k_best() {
    for (vocab, k, draws) in [(1000, 5, 3000), (151_936, 20, 400), (300, 100, 3000)] {
        let logits = random_logits(vocab, vocab as u64);
        let best = top_set(&logits, k);
        let p = SamplingParams { temperature: 5.0, top_k: k as i32, ..params() };
        let seen = draw_set(p, &logits, draws);
        assert!(seen.keys().all(|t| best.contains(t)), "left the top {k}");
        // With a high temperature most of the k candidates show up.
        assert!(seen.len() * 2 > k, "only {} of {k} seen", seen.len());
    }
}

#[test]
fn top_p_keeps_the_smallest_set() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    for (top_p, expect) in [(0.4, vec![0]), (0.75, vec![0, 1]), (0.85, vec![0, 1, 2]), (0.99, vec![0, 1, 2, 3])] {
        let p = SamplingParams { top_p, ..params() };
        let seen: BTreeSet<u32> = draw_set(p, &logits, 4000).into_keys().collect();
        assert_eq!(seen, expect.into_iter().collect(), "top_p {top_p}");
    }
    // Top-p after top-k renormalises within the k kept tokens (as vLLM does): 0.5/(0.5+0.3) = 0.625.
    let p = SamplingParams { top_k: 2, top_p: 0.6, ..params() };
    let seen: BTreeSet<u32> = draw_set(p, &logits, 2000).into_keys().collect();
    assert_eq!(seen, [0].into_iter().collect());
    let p = SamplingParams { top_k: 2, top_p: 0.7, ..params() };
    let seen: BTreeSet<u32> = draw_set(p, &logits, 2000).into_keys().collect();
    assert_eq!(seen, [0, 1].into_iter().collect());
}

#[test]
fn top_p_alone_on_a_flat_large_vocabulary() {
    // 10,000 equal logits: top_p 0.5 keeps exactly 5,000 tokens, the lowest ids (ties rank by id).
    let logits = vec![1.0f32; 10_000];
    let p = SamplingParams { top_p: 0.5, ..params() };
    let seen = draw_set(p, &logits, 1500);
    assert!(seen.keys().all(|&t| t < 5000));
    assert!(seen.len() > 1000);
}

#[test]
fn min_p_drops_unlikely_tokens() {
    let logits = logits_of(&[0.6, 0.3, 0.06, 0.04]);
    let p = SamplingParams { min_p: 0.2, ..params() };
    let seen: BTreeSet<u32> = draw_set(p, &logits, 4000).into_keys().collect();
    assert_eq!(seen, [0, 1].into_iter().collect());
    let p = SamplingParams { min_p: 0.2, top_k: 3, top_p: 0.99, ..params() };
    let seen: BTreeSet<u32> = draw_set(p, &logits, 4000).into_keys().collect();
    assert_eq!(seen, [0, 1].into_iter().collect());
}

#[test]
fn sampling_follows_the_distribution_and_temperature() {
    let probs = [0.7, 0.2, 0.1];
    let logits = logits_of(&probs);
    let n = 40_000;
    let seen = draw_set(params(), &logits, n);
    for (i, p) in probs.iter().enumerate() {
        let f = seen[&(i as u32)] as f64 / n as f64;
        assert!((f - p).abs() < 0.015, "token {i}: {f} vs {p}");
    }
    // Temperature 0.5 squares the probabilities before renormalising.
    let sq: f64 = probs.iter().map(|p| p * p).sum();
    let seen = draw_set(SamplingParams { temperature: 0.5, ..params() }, &logits, n);
    let f = seen[&0] as f64 / n as f64;
    assert!((f - 0.49 / sq).abs() < 0.015, "{f}");
}

#[test]
fn penalties_change_exactly_what_they_should() {
    let p = SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..params() };
    let mut l = vec![2.0, -2.0, 1.0, 0.5, 3.0, -1.0];
    // Prompt tokens 0 and 1 (0 twice), output 2, 2, 3; 99 is out of range and ignored.
    apply_penalties(&mut l, &[0, 1, 0, 99], &[2, 2, 3, 99], &p);
    assert_eq!(l, vec![1.0, -4.0, -0.75, -0.5, 3.0, -1.0]);

    // Only presence/frequency: prompt tokens are untouched.
    let p = SamplingParams { frequency_penalty: 1.0, presence_penalty: -0.5, ..params() };
    let mut l = vec![1.0; 4];
    apply_penalties(&mut l, &[0, 1], &[1, 3, 3, 3], &p);
    assert_eq!(l, vec![1.0, 0.5, 1.0, -1.5]);

    // Defaults change nothing.
    let mut l = vec![1.0, -1.0];
    apply_penalties(&mut l, &[0, 1], &[0, 1], &params());
    assert_eq!(l, vec![1.0, -1.0]);
}

#[test]
fn sampler_penalties_reuse_scratch_correctly() {
    let p = SamplingParams { repetition_penalty: 10.0, ..SamplingParams::greedy() };
    let mut s = sampler(p);
    let base = vec![5.0, 4.9, 1.0];
    // Token 0 was generated: it is penalised to 0.5 and token 1 wins; the scratch must be clean after.
    assert_eq!(s.sample(&mut base.clone(), &[], &[0]).unwrap(), 1);
    assert_eq!(s.sample(&mut base.clone(), &[], &[]).unwrap(), 0);
    assert_eq!(s.sample(&mut base.clone(), &[1], &[0]).unwrap(), 2);
    let mut l = base.clone();
    s.sample(&mut l, &[0, 1], &[]).unwrap();
    assert_eq!(l, vec![0.5, 0.49, 1.0]);
}

#[test]
fn same_seed_gives_the_same_sequence() {
    let logits = random_logits(5000, 11);
    let run = |seed: u64| {
        let mut s =
            sampler(SamplingParams { seed: Some(seed), temperature: 1.5, top_p: 0.9, ..SamplingParams::default() });
        (0..200).map(|_| s.sample(&mut logits.clone(), &[], &[]).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    // Unseeded samplers still work and differ from one another.
    let mut a = sampler(SamplingParams::default());
    let mut b = sampler(SamplingParams::default());
    let xs: Vec<u32> = (0..50).map(|_| a.sample(&mut logits.clone(), &[], &[]).unwrap()).collect();
    let ys: Vec<u32> = (0..50).map(|_| b.sample(&mut logits.clone(), &[], &[]).unwrap()).collect();
    assert_ne!(xs, ys);
}

#[test]
fn rng_matches_reference_values() {
    // splitmix64(0) first output is a published test value; xoshiro256** output follows its definition.
    let mut r = Rng::seed_from_u64(0);
    let first = r.next_u64();
    let mut state = [0u64; 4];
    let mut sm = 0u64;
    for s in &mut state {
        sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = sm;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        *s = z ^ (z >> 31);
    }
    assert_eq!(state[0], 0xE220_A839_7B1D_CDAF);
    assert_eq!(first, state[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9));
    let x = r.next_f64();
    assert!((0.0..1.0).contains(&x));
}

#[test]
fn logprobs_are_log_softmax_of_raw_logits() {
    let logits = vec![1.0f32, 3.0, -2.0, 3.0, f32::NEG_INFINITY];
    let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    let lp = logprobs(&logits, 2, 3).unwrap();
    assert!((lp.logprob as f64 - (-2.0 - lse)).abs() < 1e-6);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
    assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    assert_eq!(logprobs(&logits, 4, 0).unwrap().logprob, f32::NEG_INFINITY);
    assert!(matches!(logprobs(&logits, 9, 1), Err(SamplingError::TokenOutOfRange { token: 9, vocab: 5 })));
    // Large vocabulary: probabilities sum to one and the top list is sorted.
    let logits = random_logits(151_936, 5);
    let lp = logprobs(&logits, 0, 100).unwrap();
    assert_eq!(lp.top.len(), 100);
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    assert_eq!(lp.top[0].0, *top_set(&logits, 1).iter().next().unwrap());
    let all = logprobs(&logits, 0, logits.len()).unwrap();
    let total: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-3, "{total}");
}

#[test]
fn sample_with_logprobs_uses_raw_logits() {
    let p = SamplingParams { repetition_penalty: 100.0, ..SamplingParams::greedy() };
    let mut s = sampler(p);
    let mut l = vec![5.0, 4.0, 0.0];
    let (tok, lp) = s.sample_with_logprobs(&mut l, &[0], &[], 2).unwrap();
    assert_eq!(tok, 1);
    let raw = logprobs(&[5.0, 4.0, 0.0], 1, 2).unwrap();
    assert_eq!(lp, raw);
    assert_eq!(lp.top[0].0, 0);
}

#[test]
fn partial_match_len_respects_characters() {
    assert_eq!(partial_match_len("hello </th", "</think>"), 4);
    assert_eq!(partial_match_len("hello", "</think>"), 0);
    assert_eq!(partial_match_len("</think", "</think>"), 7);
    assert_eq!(partial_match_len("</think>", "</think>"), 0);
    assert_eq!(partial_match_len("ab", ""), 0);
    assert_eq!(partial_match_len("x你", "你好"), 3);
    assert_eq!(partial_match_len("aaa", "aab"), 2);
}

/// Feeds `text` split at `cuts` and returns (emitted text, stop index).
fn run_stop(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
    let mut m = StopMatcher::new(stops.iter().copied());
    let mut out = String::new();
    let mut stop = None;
    for p in pieces {
        let r = m.push(p);
        assert!(stop.is_none() || r.text.is_empty(), "text after stop");
        out.push_str(&r.text);
        stop = stop.or(r.stop);
    }
    out.push_str(&m.finish());
    (out, stop)
}

#[test]
fn stop_strings_across_every_boundary() {
    let text = "The answer is 42.\n\nObservation: done. 你好世界 END";
    for (stop, expect) in [
        ("Observation:", "The answer is 42.\n\n"),
        ("\n\n", "The answer is 42."),
        ("世界", "The answer is 42.\n\nObservation: done. 你好"),
        ("END", "The answer is 42.\n\nObservation: done. 你好世界 "),
    ] {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for &(i, _) in &chars {
            for &(j, _) in chars.iter().filter(|c| c.0 >= i) {
                let (out, s) = run_stop(&[stop], &[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(out, expect, "stop {stop:?} cut at {i},{j}");
                assert_eq!(s, Some(0));
            }
        }
        // One character at a time.
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(run_stop(&[stop], &pieces), (expect.to_string(), Some(0)));
    }
}

#[test]
fn stop_holds_back_only_possible_prefixes() {
    let mut m = StopMatcher::new(["</stop>"]);
    assert_eq!(m.push("abc </st").text, "abc ");
    assert_eq!(m.held(), "</st");
    assert_eq!(m.push("ay").text, "</stay");
    assert_eq!(m.push(" <").text, " ");
    assert_eq!(m.finish(), "<");
    // No stop strings: everything passes straight through.
    let mut m = StopMatcher::new(Vec::<String>::new());
    assert_eq!(m.push("x").text, "x");
    // Earliest match wins; ties go to the first listed.
    assert_eq!(run_stop(&["cd", "bc"], &["ab", "cde"]), ("a".into(), Some(1)));
    assert_eq!(run_stop(&["abc", "ab"], &["xabc"]), ("x".into(), Some(0)));
    // A stop string that is complete ends generation at once, even if a longer one might follow.
    assert_eq!(run_stop(&["abc", "ab"], &["xab", "c"]), ("x".into(), Some(1)));
    assert_eq!(run_stop(&["aab"], &["a", "a", "a", "b"]), ("a".into(), Some(0)));
    // After a stop nothing more comes out.
    let mut m = StopMatcher::new(["x"]);
    assert_eq!(m.push("1x2").text, "1");
    assert!(m.is_stopped());
    assert_eq!(m.push("3").text, "");
    assert_eq!(m.finish(), "");
    // No stop found: held text comes out at the end.
    assert_eq!(run_stop(&["xyz"], &["ab", "xy"]), ("abxy".into(), None));
}

#[test]
fn logit_bias_moves_the_greedy_choice_and_is_checked() {
    let logits = vec![1.0f32, 3.0, 2.0, 0.5];
    let mut p = SamplingParams::greedy();
    p.logit_bias = vec![(2, 1.5), (1, -100.0), (99, 5.0)];
    let mut s = Sampler::new(p.clone()).unwrap();
    let mut l = logits.clone();
    assert_eq!(s.sample(&mut l, &[], &[]).unwrap(), 2);
    p.logit_bias = vec![(0, 100.5)];
    assert!(p.validate().unwrap_err().to_string().contains("logit_bias"));
}

/// Pearson's chi-square of `counts` against the probabilities `p` (every `p` > 0).
fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts.iter().zip(p).map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p)).sum()
}

/// Draws `runs` tokens with `rule(sampler, logits, draft, q)`, each from a draft drawn from `q`
/// by a generator of its own, and returns the chi-square of the tokens against `p`.
fn speculative_chi_square(
    p: &[f64],
    q: &[f64],
    runs: usize,
    mut rule: impl FnMut(&mut Sampler, &mut [f32], u32, &[(u32, f64)]) -> u32,
) -> f64 {
    let logits = logits_of(p);
    let q_list: Vec<(u32, f64)> = q.iter().enumerate().map(|(i, &q)| (i as u32, q)).collect();
    let mut s = sampler(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: -1, seed: Some(7), ..params() });
    let mut draft_rng = Rng::seed_from_u64(99);
    let mut counts = vec![0usize; p.len()];
    for _ in 0..runs {
        let mut u = draft_rng.next_f64();
        let draft = q.iter().position(|&w| {
            u -= w;
            u < 0.0
        });
        let draft = draft.unwrap_or(q.len() - 1) as u32;
        let mut l = logits.clone();
        counts[rule(&mut s, &mut l, draft, &q_list) as usize] += 1;
    }
    chi_square(&counts, p)
}

/// The speculative-sampling rule keeps the target's distribution whatever the draft's; the
/// same test fails a rule that redraws from the target instead of from the residual.
#[test]
fn speculative_verification_keeps_the_target_distribution() {
    // 5 degrees of freedom: 20.5 is the 0.1% critical value.
    const CRITICAL: f64 = 20.5;
    let p = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05];
    let drafts: [[f64; 6]; 3] =
        [[0.05, 0.05, 0.10, 0.20, 0.25, 0.35], [0.60, 0.10, 0.10, 0.10, 0.05, 0.05], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]];
    for q in &drafts {
        let right = speculative_chi_square(&p, q, 20_000, |s, l, d, q| s.verify(l, &[], &[], d, q).unwrap().0);
        assert!(right < CRITICAL, "q = {q:?}: chi-square {right}");
        // A wrong rule: keep the draft with probability min(1, p/q), else redraw from p.
        let mut coin = Rng::seed_from_u64(5);
        let wrong = speculative_chi_square(&p, q, 20_000, |s, l, d, q| {
            if coin.next_f64() < (p[d as usize] / q[d as usize].1).min(1.0) {
                d
            } else {
                s.sample(l, &[], &[]).unwrap()
            }
        });
        assert!(wrong > CRITICAL, "q = {q:?}: the wrong rule passed with chi-square {wrong}");
    }
}

/// Greedy verification keeps a draft exactly when it is the arg-max, and otherwise gives the
/// arg-max: the same token as plain greedy decoding.
#[test]
fn greedy_verification_is_the_arg_max() {
    let mut s = sampler(SamplingParams::greedy());
    for seed in 0..20 {
        let logits = random_logits(50, seed);
        let best = s.sample(&mut logits.clone(), &[], &[]).unwrap();
        for draft in [best, (best + 1) % 50, 0] {
            let (t, kept) = s.verify(&mut logits.clone(), &[], &[], draft, &[(draft, 1.0)]).unwrap();
            assert_eq!((t, kept), (best, draft == best));
        }
    }
}

/// `logits` with only its `k` highest-ranked entries kept (higher first, ties to the lower id,
/// NaN as -inf), the rest -inf: what a device that brings back only the candidates gives.
fn only_candidates(logits: &[f32], k: usize) -> Vec<f32> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        key(logits[b as usize]).partial_cmp(&key(logits[a as usize])).expect("no NaN").then(a.cmp(&b))
    });
    let mut out = vec![f32::NEG_INFINITY; logits.len()];
    for &i in &ids[..k] {
        out[i as usize] = key(logits[i as usize]);
    }
    out
}

#[test]
fn the_candidates_alone_sample_as_the_whole_row() {
    let cases = [
        SamplingParams::greedy(),
        SamplingParams::qwen3_thinking(),
        SamplingParams::qwen3_non_thinking(),
        SamplingParams { top_k: 1, temperature: 0.8, ..SamplingParams::default() },
        SamplingParams { top_k: 5, min_p: 0.1, temperature: 1.3, ..SamplingParams::default() },
        SamplingParams { top_k: 50, top_p: 0.5, ..SamplingParams::default() },
    ];
    for p in cases {
        let k = p.candidates().unwrap_or_else(|| panic!("{p:?} reads every logit"));
        let p = SamplingParams { seed: Some(3), ..p };
        let (mut whole, mut part) = (sampler(p.clone()), sampler(p.clone()));
        for step in 0..300u64 {
            // Coarse values (ties), and a NaN and an infinity now and then.
            let mut l: Vec<f32> = random_logits(1000, step).iter().map(|v| (v * 4.0).round() / 4.0).collect();
            l[(step as usize * 7) % 1000] = f32::NAN;
            if step % 3 == 0 {
                l[(step as usize * 13) % 1000] = f32::NEG_INFINITY;
            }
            let mut c = only_candidates(&l, k);
            let a = whole.sample(&mut l.clone(), &[], &[]).unwrap();
            assert_eq!(part.sample(&mut c.clone(), &[], &[]).unwrap(), a, "{p:?}, step {step}");
            // The speculative rule too, with a draft from the candidates or beyond them.
            let draft = (step as u32 * 31) % 1000;
            let v = whole.verify(&mut l, &[], &[], draft, &[(draft, 1.0)]).unwrap();
            assert_eq!(part.verify(&mut c, &[], &[], draft, &[(draft, 1.0)]).unwrap(), v, "{p:?}, step {step}");
        }
    }
    for p in [
        SamplingParams::default(),
        SamplingParams { top_p: 0.9, ..SamplingParams::default() },
        SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() },
        SamplingParams { presence_penalty: 0.5, ..SamplingParams::qwen3_thinking() },
        SamplingParams { frequency_penalty: 0.5, ..SamplingParams::qwen3_thinking() },
        SamplingParams { logit_bias: vec![(3, 5.0)], ..SamplingParams::greedy() },
        SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() },
    ] {
        assert_eq!(p.candidates(), None, "{p:?} reads logits beyond its top-k");
    }
}
