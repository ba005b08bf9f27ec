//! Server metrics in the Prometheus text format.

use qwick_engine::SchedulerStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed buckets (upper bounds in seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap();
        for (i, &b) in self.bounds.iter().enumerate() {
            if v <= b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap().2
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", g.0[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", g.2, g.1, g.2);
    }
}

const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0];
const E2E_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0];

pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub finished: Mutex<BTreeMap<&'static str, u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Mutex::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn request(&self, status: u16) {
        *self.requests.lock().unwrap().entry(status).or_default() += 1;
    }

    pub fn finished(&self, reason: &'static str) {
        *self.finished.lock().unwrap().entry(reason).or_default() += 1;
    }

    pub fn render(&self, s: &SchedulerStats, model: &str) -> String {
        let mut o = String::new();
        let m = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let _ = writeln!(o, "# HELP qwick_requests_total HTTP requests answered, by status code.");
        let _ = writeln!(o, "# TYPE qwick_requests_total counter");
        for (status, n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(o, "qwick_requests_total{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP qwick_request_success_total Generations finished, by finish reason.");
        let _ = writeln!(o, "# TYPE qwick_request_success_total counter");
        for (reason, n) in self.finished.lock().unwrap().iter() {
            let _ = writeln!(o, "qwick_request_success_total{{{m},finished_reason=\"{reason}\"}} {n}");
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{m}}} {v}");
        };
        counter(
            "qwick_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter("qwick_generation_tokens_total", "Generated tokens.", self.generation_tokens.load(Ordering::Relaxed));
        counter(
            "qwick_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_query_tokens,
        );
        counter("qwick_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens);
        counter("qwick_num_preemptions_total", "Sequences preempted (freed and recomputed later).", s.preemptions);
        counter("qwick_engine_steps_total", "Forward steps run by the engine.", s.steps);
        counter("qwick_spec_decode_num_draft_tokens_total", "Tokens drafted for speculative decoding.", s.spec_drafted);
        counter("qwick_spec_decode_num_accepted_tokens_total", "Drafted tokens the model accepted.", s.spec_accepted);
        counter(
            "qwick_spec_decode_num_verifications_total",
            "Spans of drafted tokens verified (a sequence's drafts in one step).",
            s.spec_verifications,
        );
        let _ = writeln!(
            o,
            "# HELP qwick_engine_step_seconds_total Time in engine steps.\n# TYPE qwick_engine_step_seconds_total counter\nqwick_engine_step_seconds_total{{{m}}} {}",
            s.step_seconds
        );
        let _ = writeln!(
            o,
            "# HELP qwick_engine_forward_seconds_total Time of engine steps spent in the model's forward pass (the rest is scheduling, sampling and streaming).\n# TYPE qwick_engine_forward_seconds_total counter\nqwick_engine_forward_seconds_total{{{m}}} {}",
            s.forward_seconds
        );
        let hit_rate =
            if s.prefix_query_tokens > 0 { s.prefix_hit_tokens as f64 / s.prefix_query_tokens as f64 } else { 0.0 };
        let mut gauge = |name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{m}}} {v}");
        };
        let acceptance = if s.spec_drafted > 0 { s.spec_accepted as f64 / s.spec_drafted as f64 } else { 0.0 };
        gauge(
            "qwick_spec_decode_acceptance_rate",
            "Drafted tokens accepted, as a share of those drafted (0 before any).",
            acceptance.to_string(),
        );
        gauge("qwick_num_requests_running", "Sequences running.", s.running.to_string());
        gauge("qwick_num_requests_waiting", "Sequences waiting to start (or preempted).", s.waiting.to_string());
        gauge("qwick_kv_blocks_used", "KV cache blocks referenced by sequences.", s.kv_blocks_used.to_string());
        gauge(
            "qwick_kv_cache_consistent",
            "0 if, when last idle, a KV block's references did not match its holders (sequences, prefix cache).",
            (s.kv_inconsistency.is_none() as u8).to_string(),
        );
        gauge("qwick_kv_blocks_cached", "KV cache blocks kept by the prefix cache.", s.kv_blocks_cached.to_string());
        gauge("qwick_kv_blocks_total", "KV cache blocks.", s.kv_blocks_total.to_string());
        gauge("qwick_kv_block_size", "Tokens per KV cache block.", s.block_size.to_string());
        let usage = if s.kv_blocks_total > 0 { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 } else { 0.0 };
        gauge("qwick_kv_cache_usage_perc", "Fraction of KV cache blocks in use.", usage.to_string());
        gauge(
            "qwick_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up.",
            hit_rate.to_string(),
        );
        self.ttft.render(&mut o, "qwick_time_to_first_token_seconds", "Time from request to first token.");
        self.itl.render(&mut o, "qwick_inter_token_latency_seconds", "Time between output tokens of a request.");
        self.e2e.render(&mut o, "qwick_e2e_request_latency_seconds", "Time from request to last token.");
        o
    }
}
