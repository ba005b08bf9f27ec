//! `qwick bench-serve`: drives a running server with concurrent streamed completions of a fixed
//! prompt and output length, and reports throughput, time to first token and inter-token latency.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// Model names to send, request `i` the `i mod n`-th (default: the server's first model).
    pub model: Option<String>,
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub api_key: Option<String>,
}

/// One request's timings.
#[derive(Clone, Debug, Default)]
struct Sample {
    ttft: f64,
    /// Gaps between streamed chunks, per token.
    itl: Vec<f64>,
    e2e: f64,
    prompt_tokens: usize,
    output_tokens: usize,
}

/// The results.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub requests: usize,
    pub failed: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
}

/// Mean and percentiles, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| v[((p / 100.0) * (v.len() - 1) as f64).round() as usize] * 1e3;
    Stats { mean: v.iter().sum::<f64>() / v.len() as f64 * 1e3, p50: pct(50.0), p90: pct(90.0), p99: pct(99.0) }
}

impl BenchReport {
    pub fn output_tok_s(&self) -> f64 {
        self.output_tokens as f64 / self.duration_s.max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        let s = |x: &Stats| json!({"mean": x.mean, "p50": x.p50, "p90": x.p90, "p99": x.p99});
        json!({
            "requests": self.requests,
            "failed": self.failed,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "request_throughput": (self.requests - self.failed) as f64 / self.duration_s.max(1e-9),
            "output_tok_s": self.output_tok_s(),
            "total_tok_s": (self.prompt_tokens + self.output_tokens) as f64 / self.duration_s.max(1e-9),
            "ttft_ms": s(&self.ttft_ms),
            "itl_ms": s(&self.itl_ms),
            "e2e_ms": s(&self.e2e_ms),
        })
    }

    pub fn to_text(&self) -> String {
        let line = |name: &str, x: &Stats| {
            format!("{name:<24} mean {:>9.2}  p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}\n", x.mean, x.p50, x.p90, x.p99)
        };
        let mut s = String::new();
        s += &format!(
            "requests                 {} ({} failed), concurrency {}\n",
            self.requests, self.failed, self.concurrency
        );
        s += &format!("duration                 {:.2} s\n", self.duration_s);
        s += &format!(
            "throughput               {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s\n",
            (self.requests - self.failed) as f64 / self.duration_s.max(1e-9),
            self.output_tok_s(),
            (self.prompt_tokens + self.output_tokens) as f64 / self.duration_s.max(1e-9)
        );
        s += &format!("tokens                   {} prompt, {} output\n", self.prompt_tokens, self.output_tokens);
        s += &line("time to first token ms", &self.ttft_ms);
        s += &line("inter-token latency ms", &self.itl_ms);
        s += &line("request latency ms", &self.e2e_ms);
        s
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout_read(Duration::from_secs(600)).build()
}

fn post(agent: &ureq::Agent, cfg: &BenchConfig, path: &str, body: &Value) -> Result<ureq::Response> {
    let mut req = agent.post(&format!("{}{path}", cfg.url));
    if let Some(k) = &cfg.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.send_json(body.clone()) {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => bail!("{path}: HTTP {code}: {}", r.into_string().unwrap_or_default()),
        Err(e) => Err(anyhow!("{path}: {e}")),
    }
}

/// A prompt of exactly `len` tokens, different for each request (so the prefix cache does not
/// make later requests cheaper).
fn prompt_ids(agent: &ureq::Agent, cfg: &BenchConfig, model: &str, i: usize) -> Result<Vec<u32>> {
    let words = ["alpha", "river", "stone", "cloud", "north", "quiet", "amber", "lemon", "tiger", "pixel"];
    let mut text = format!("Request {i}:");
    let mut k = i.wrapping_mul(2_654_435_761);
    while text.len() < cfg.prompt_len * 8 + 64 {
        k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        text.push(' ');
        text.push_str(words[(k >> 33) % words.len()]);
    }
    // qwick and vLLM take "prompt"; llama.cpp's llama-server takes "content".
    let as_prompt = post(agent, cfg, "/tokenize", &json!({"model": model, "prompt": text}))
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .filter(|r| r["tokens"].as_array().is_some_and(|t| !t.is_empty()));
    let r = match as_prompt {
        Some(r) => r,
        None => post(agent, cfg, "/tokenize", &json!({"content": text}))?.into_json()?,
    };
    let ids: Vec<u32> = r["tokens"]
        .as_array()
        .ok_or_else(|| anyhow!("/tokenize: no tokens in {r}"))?
        .iter()
        .filter_map(|t| t.as_u64().map(|t| t as u32))
        .collect();
    if ids.len() < cfg.prompt_len {
        bail!("/tokenize gave {} tokens, fewer than --prompt-len {}", ids.len(), cfg.prompt_len);
    }
    Ok(ids[..cfg.prompt_len].to_vec())
}

fn one(agent: &ureq::Agent, cfg: &BenchConfig, model: &str, prompt: Vec<u32>) -> Result<Sample> {
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": cfg.gen_len,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let resp = post(agent, cfg, "/v1/completions", &body)?;
    let mut sample = Sample::default();
    let mut last: Option<Instant> = None;
    let mut chunk_tokens = 0usize;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("bad event {data}"))?;
        if let Some(e) = v.get("error") {
            bail!("server error: {e}");
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            sample.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            sample.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let text = v["choices"].get(0).and_then(|c| c["text"].as_str()).unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => sample.ttft = (now - start).as_secs_f64(),
            Some(t) => sample.itl.push((now - t).as_secs_f64()),
        }
        chunk_tokens += 1;
        last = Some(now);
    }
    sample.e2e = start.elapsed().as_secs_f64();
    if chunk_tokens == 0 {
        bail!("the stream had no text");
    }
    // Chunks can carry several tokens (text held back until a character is whole): spread the
    // decode time over the tokens.
    if sample.output_tokens > chunk_tokens && sample.output_tokens > 1 {
        let decode = sample.e2e - sample.ttft;
        sample.itl = vec![decode / (sample.output_tokens - 1) as f64; sample.output_tokens - 1];
    }
    Ok(sample)
}

/// Runs the benchmark.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    let agent = agent();
    let models: Vec<String> = match &cfg.model {
        Some(m) => m.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect(),
        None => {
            let mut req = agent.get(&format!("{}/v1/models", cfg.url));
            if let Some(k) = &cfg.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let v: Value = req.call().map_err(|e| anyhow!("/v1/models: {e}"))?.into_json()?;
            vec![v["data"][0]["id"].as_str().ok_or_else(|| anyhow!("/v1/models lists no model"))?.to_string()]
        }
    };
    if models.is_empty() {
        bail!("--model names no model");
    }
    let model = |i: usize| models[i % models.len()].as_str();
    let prompts: Vec<Vec<u32>> =
        (0..cfg.requests).map(|i| prompt_ids(&agent, cfg, model(i), i)).collect::<Result<_>>()?;
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(vec![]);
    let failures = Mutex::new(vec![]);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cfg.concurrency.min(cfg.requests) {
            s.spawn(|| {
                let agent = self::agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cfg.requests {
                        return;
                    }
                    match one(&agent, cfg, model(i), prompts[i].clone()) {
                        Ok(x) => samples.lock().unwrap().push(x),
                        Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                    }
                }
            });
        }
    });
    let duration_s = start.elapsed().as_secs_f64();
    let samples = samples.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    if samples.is_empty() {
        bail!("every request failed; the first: {}", failures.first().cloned().unwrap_or_default());
    }
    Ok(BenchReport {
        requests: cfg.requests,
        failed: failures.len(),
        concurrency: cfg.concurrency,
        duration_s,
        prompt_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
        output_tokens: samples.iter().map(|s| s.output_tokens).sum(),
        ttft_ms: stats(samples.iter().map(|s| s.ttft).collect()),
        itl_ms: stats(samples.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e_ms: stats(samples.iter().map(|s| s.e2e).collect()),
    })
}
