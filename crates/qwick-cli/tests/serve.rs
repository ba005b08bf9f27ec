//! `qwick serve` driven over loopback by real clients: plain HTTP (ureq) and, when the `openai`
//! Python package is installed, the official OpenAI client (python/test_openai_client.py).
//!
//! The model is `tests/greedy/model` (a tiny random Qwen3 with the full vocabulary, tokenizer and
//! chat template) with transformers' greedy generations in `tests/greedy/refs.json`: requests
//! sent together, under a small token budget so prefill chunks and decode tokens mix, produce
//! exactly transformers' tokens (and what each produces alone); afterwards no KV block is in
//! use. Also: streaming, a client that disconnects mid-stream, the prefix cache, bad input,
//! the API key, the queue limit, the Ollama API, and SIGTERM.
//!
//! Every server listens on a free loopback port and is killed when its test ends; every request
//! has a timeout.

mod common;

use common::root;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> &'static str {
    common::greedy_model("serve")
}

fn refs() -> &'static Value {
    common::greedy_refs()
}

/// How far the same logprob may differ when computed in a different batch shape (a prefill
/// chunk or a decode step): bf16 inference rounds activations to bf16, and a different summation
/// order can move a value across a rounding boundary.
const LOGPROB_TOL: f64 = 5e-2;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// A running `qwick serve`, killed on drop.
struct Server {
    child: Child,
    url: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The `--api-key` it was started with (sent to `/metrics`).
    key: Option<String>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_model(model(), extra, env)
    }

    fn start_model(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qwick"));
        cmd.args(["serve", "--model", model, "--port", "0", "--threads", "1"]);
        if !extra.contains(&"--kv-cache-tokens") {
            cmd.args(["--kv-cache-tokens", "8192"]);
        }
        cmd.args(extra).env_remove("QWICK_API_KEY").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("qwick runs");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(rest) = line.split(" on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("qwick serve did not start: {}", log.lock().unwrap());
            }
        };
        let key = extra.iter().position(|&a| a == "--api-key").and_then(|i| extra.get(i + 1)).map(|k| k.to_string());
        Server { child, url: format!("http://{addr}"), stderr: log, key }
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build()
    }

    /// POSTs JSON; returns (status, body).
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = Self::agent().post(&format!("{}{path}", self.url)).set("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.send_string(body) {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut req = Self::agent().get(&format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// A Prometheus metric's value (the first series of that name).
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics", self.key.as_deref());
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Waits until no sequence runs or waits and no KV block is in use.
    fn wait_idle(&self) {
        let t0 = Instant::now();
        loop {
            let busy = self.metric("qwick_kv_blocks_used")
                + self.metric("qwick_num_requests_running")
                + self.metric("qwick_num_requests_waiting");
            if busy == 0.0 {
                assert_eq!(self.metric("qwick_kv_cache_consistent"), 1.0, "KV bookkeeping");
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "the server did not go idle");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Streams a request; returns the parsed `data:` events (without `[DONE]`) and whether
    /// `[DONE]` came.
    fn sse(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let r = Self::agent().post(&format!("{}{path}", self.url)).send_json(body.clone()).expect("stream starts");
        assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
        let mut events = vec![];
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(d) = line.strip_prefix("data: ") {
                if d == "[DONE]" {
                    return (events, true);
                }
                events.push(serde_json::from_str(d).unwrap());
            }
        }
        (events, false)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn completion_text(s: &Server, prompt: &[u32], max_tokens: usize) -> (String, Value) {
    let (code, r) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}));
    assert_eq!(code, 200, "{r}");
    (r["choices"][0]["text"].as_str().unwrap().to_string(), r)
}

/// The greedy completions of the cases' prompts (`lens[i]` tokens each), all sent at once.
fn together(s: &Server, cases: &[Value], lens: &[usize]) -> Vec<String> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = cases
            .iter()
            .zip(lens)
            .map(|(c, &n)| sc.spawn(move || completion_text(s, &ids(&c["prompt_ids"]), n).0))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn detok(s: &Server, ids: &[u32]) -> String {
    let (code, r) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(code, 200);
    r["prompt"].as_str().unwrap().to_string()
}

#[test]
fn concurrent_greedy_requests_match_transformers_and_free_their_blocks() {
    // A budget of 8 tokens per step: prompts are prefilled in chunks beside other requests' decode.
    let s = Server::start(&["--max-num-batched-tokens", "8"]);
    let cases = refs()["cases"].as_array().unwrap();
    let lens = [20usize, 13, 17, 9];
    let expected: Vec<String> =
        cases.iter().zip(lens).map(|(c, n)| detok(&s, &ids(&c["generated_ids"])[..n])).collect();
    // Each alone.
    for ((c, n), want) in cases.iter().zip(lens).zip(&expected) {
        let (text, r) = completion_text(&s, &ids(&c["prompt_ids"]), n);
        assert_eq!(&text, want, "{} alone", c["name"]);
        assert_eq!(r["usage"]["completion_tokens"], n);
    }
    s.wait_idle();
    // All together, three rounds.
    for round in 0..3 {
        assert_eq!(together(&s, cases, &lens), expected, "round {round}");
    }
    s.wait_idle();
    assert_eq!(s.metric("qwick_kv_blocks_used"), 0.0);
    // Step time splits into the forward pass and the engine's own work around it.
    let (step, fwd) = (s.metric("qwick_engine_step_seconds_total"), s.metric("qwick_engine_forward_seconds_total"));
    assert!(fwd > 0.0 && fwd <= step, "forward {fwd} s of {step} s");

    // The chat endpoint renders the same prompts: reasoning for thinking turns, content otherwise.
    for c in cases.iter().filter(|c| c["cli"] == true) {
        let think = c["enable_thinking"].as_bool().unwrap();
        let (code, r) = s.post(
            "/v1/chat/completions",
            &json!({"messages": c["messages"], "max_tokens": 20, "temperature": 0,
                    "chat_template_kwargs": {"enable_thinking": think}}),
        );
        assert_eq!(code, 200, "{r}");
        let msg = &r["choices"][0]["message"];
        let field = if think { "reasoning_content" } else { "content" };
        assert_eq!(msg[field], c["generated_text"], "{}", c["name"]);
        assert_eq!(r["usage"]["prompt_tokens"], c["prompt_ids"].as_array().unwrap().len());
        assert_eq!(r["choices"][0]["finish_reason"], "length");
    }
}

#[test]
fn on_the_gpu_a_mixed_batch_gives_transformers_tokens_alone_and_together() {
    if !common::have_gpu("on_the_gpu_a_mixed_batch_gives_transformers_tokens_alone_and_together") {
        return;
    }
    // Chunked prefills beside other requests' decode steps, on the device.
    let s = Server::start(&["--device", "gpu", "--max-num-batched-tokens", "8"]);
    let cases = refs()["cases"].as_array().unwrap();
    let lens = [20usize, 13, 17, 9];
    let expected: Vec<String> =
        cases.iter().zip(lens).map(|(c, n)| detok(&s, &ids(&c["generated_ids"])[..n])).collect();
    for ((c, n), want) in cases.iter().zip(lens).zip(&expected) {
        assert_eq!(&completion_text(&s, &ids(&c["prompt_ids"]), n).0, want, "{} alone on the GPU", c["name"]);
    }
    s.wait_idle();
    assert_eq!(together(&s, cases, &lens), expected, "together on the GPU");
    s.wait_idle();
    assert_eq!(s.metric("qwick_kv_blocks_used"), 0.0);
}

#[test]
fn streaming_chat_matches_the_whole_answer() {
    let s = Server::start(&[]);
    let c = &refs()["cases"][1]; // haiku_nothink
    let body = json!({"messages": c["messages"], "max_tokens": 20, "temperature": 0,
                      "chat_template_kwargs": {"enable_thinking": false}});
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (events, done) = s.sse("/v1/chat/completions", &streamed);
    assert!(done, "the stream ends with [DONE]");
    let content: String =
        events.iter().filter_map(|e| e["choices"].get(0)?["delta"]["content"].as_str().map(String::from)).collect();
    assert_eq!(content, c["generated_text"].as_str().unwrap());
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    let finish: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec!["length"]);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 20);
    assert_eq!(events.last().unwrap()["choices"], json!([]));

    // Stop strings cut the answer (and are not returned).
    let text = c["generated_text"].as_str().unwrap();
    let word = "cartridge";
    let cut = &text[..text.find(word).unwrap()];
    let mut stopped = body.clone();
    stopped["stop"] = json!([word]);
    let (code, r) = s.post("/v1/chat/completions", &stopped);
    assert_eq!(code, 200);
    assert_eq!(r["choices"][0]["message"]["content"], cut);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    s.wait_idle();
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let s = Server::start(&[]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "ignore_eos": true,
                      "stream": true});
    let r = Server::agent().post(&format!("{}/v1/completions", s.url)).send_json(body).unwrap();
    let mut lines = BufReader::new(r.into_reader()).lines();
    let mut got = 0;
    while got < 3 {
        let line = lines.next().unwrap().unwrap();
        if line.starts_with("data: ") {
            got += 1;
        }
    }
    drop(lines); // closes the connection
    s.wait_idle();
    assert!(s.metric("qwick_generation_tokens_total") < 480.0, "generation stopped early");
    // The server goes on serving.
    let (text, _) = completion_text(&s, &[9707, 0], 3);
    assert!(!text.is_empty());
}

#[test]
fn a_repeated_long_prefix_is_served_from_the_cache() {
    let s = Server::start(&[]);
    let system = "You are a careful assistant. ".repeat(30);
    let ask = |q: &str| {
        let (code, r) = s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                    "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(code, 200, "{r}");
        r
    };
    let a = ask("First question?");
    let p = a["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(p > 150, "{p}");
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let b = ask("Second question?");
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 144 && cached % 16 == 0 && cached < p, "cached {cached} of {p}");
    assert!(s.metric("qwick_prefix_cache_hit_rate") > 0.0);
    // The same request again gives the same answer from the cache.
    let c = ask("First question?");
    assert_eq!(c["choices"][0]["message"], a["choices"][0]["message"]);
    s.wait_idle();
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let s = Server::start(&["--max-body-mb", "0.01"]);
    let ok_chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{\"messages\": [".into(), 400, None),
        ("/v1/chat/completions", "not json".into(), 400, None),
        ("/v1/chat/completions", "{}".into(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, Some("messages")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        ("/v1/chat/completions", json!({"messages": [{"role": "user"}]}).to_string(), 400, None),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 99}).to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "stop": [""]}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).to_string(),
            400,
            Some("tools[0]"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).to_string(),
            404,
            Some("model"),
        ),
        ("/v1/completions", json!({"prompt": [1, 2, 999999999]}).to_string(), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 100000}).to_string(), 400, Some("max_tokens")),
        ("/v1/completions", json!({"prompt": ""}).to_string(), 400, Some("prompt")),
        ("/detokenize", json!({"tokens": [-1]}).to_string(), 400, Some("tokens[0]")),
        ("/v1/nothing", "{}".into(), 404, None),
        (
            "/v1/chat/completions",
            format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "x".repeat(20_000)),
            413,
            None,
        ),
    ];
    for (path, body, status, param) in &cases {
        let (code, r) = s.post_raw(path, body, None);
        assert_eq!(code, *status, "{path} {body:.80}: {r}");
        let e = &r["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{path} {body:.80}: {r}");
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{r}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{path} {body:.80}: {r}");
        }
        // Still serving.
        let (code, _) = s.post("/v1/chat/completions", &ok_chat);
        assert_eq!(code, 200);
    }
    // The context limit names the numbers.
    let (code, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 600}),
    );
    assert_eq!(code, 400);
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("512") && m.contains("600") && m.contains("maximum context length"), "{m}");
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    let (code, _) = s.get("/v1/chat/completions", None);
    assert_eq!(code, 405);
    let (code, body) = s.get("/health", None);
    assert_eq!((code, body.as_str()), (200, ""));
    assert!(s.metric("qwick_requests_total{status=\"400\"}") >= 20.0);
    s.wait_idle();
}

#[test]
fn api_key_guards_every_route_but_health_and_the_page() {
    let s = Server::start_env(&[], &[("QWICK_API_KEY", "sekret")]);
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).to_string();
    let (code, r) = s.post_raw("/v1/chat/completions", &body, None);
    assert_eq!(code, 401, "{r}");
    assert_eq!(r["error"]["code"], "invalid_api_key");
    assert_eq!(s.post_raw("/v1/chat/completions", &body, Some("wrong")).0, 401);
    assert_eq!(s.post_raw("/v1/chat/completions", &body, Some("sekret")).0, 200);
    assert_eq!(s.get("/v1/models", None).0, 401);
    assert_eq!(s.get("/metrics", None).0, 401);
    assert_eq!(s.get("/api/tags", None).0, 401);
    assert_eq!(s.get("/v1/models", Some("sekret")).0, 200);
    assert_eq!(s.get("/health", None).0, 200);
    assert_eq!(s.get("/", None).0, 200);
    drop(s);
    // --api-key on the command line.
    let s = Server::start(&["--api-key", "k2"]);
    assert_eq!(s.get("/v1/models", None).0, 401);
    assert_eq!(s.get("/v1/models", Some("k2")).0, 200);
}

#[test]
fn a_full_queue_answers_429() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-queue", "1"]);
    let long = json!({"prompt": "Once", "max_tokens": 490, "temperature": 0, "ignore_eos": true, "stream": true});
    let post = || Server::agent().post(&format!("{}/v1/completions", s.url)).send_json(long.clone());
    // One running (its first token read), then one waiting (retried while the first is still
    // counted as waiting, before its first step).
    let a = post().unwrap();
    let mut a_lines = BufReader::new(a.into_reader()).lines();
    while !a_lines.next().unwrap().unwrap().starts_with("data: ") {}
    let t0 = Instant::now();
    let b = loop {
        match post() {
            Ok(b) => break b,
            Err(ureq::Error::Status(429, _)) if t0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (code, r) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(code, 429, "{r}");
    assert_eq!(r["error"]["type"], "rate_limit_error");
    drop((a_lines, b));
    s.wait_idle();
    let (code, _) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(code, 200);
}

#[test]
fn ollama_api() {
    let s = Server::start(&["--served-model-name", "qwen3-tiny"]);
    let c = &refs()["cases"][0]; // hello_think
                                 // Streamed chat (the default): NDJSON lines, thinking apart.
    let body = json!({"model": "qwen3-tiny", "messages": c["messages"], "think": true,
                      "options": {"temperature": 0, "num_predict": 20}});
    let r = Server::agent().post(&format!("{}/api/chat", s.url)).send_json(body.clone()).unwrap();
    assert_eq!(r.header("Content-Type"), Some("application/x-ndjson"));
    let lines: Vec<Value> =
        BufReader::new(r.into_reader()).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 20);
    assert_eq!(last["prompt_eval_count"], c["prompt_ids"].as_array().unwrap().len());
    assert!(last["total_duration"].as_u64().unwrap() > 0 && last["eval_duration"].is_u64());
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    let thinking: String = lines.iter().filter_map(|l| l["message"]["thinking"].as_str()).collect();
    assert_eq!(thinking, c["generated_text"].as_str().unwrap());
    // Not streamed.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (code, r) = s.post("/api/chat", &whole);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["message"]["thinking"], c["generated_text"]);
    assert_eq!(r["done"], true);
    // think: false renders the prompt without thinking: the haiku case's answer.
    let h = &refs()["cases"][1];
    let (code, r) = s.post(
        "/api/chat",
        &json!({"model": "qwen3-tiny:latest", "messages": h["messages"], "think": false, "stream": false,
                "options": {"temperature": 0, "num_predict": 20, "seed": 1}}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["message"]["content"], h["generated_text"]);
    assert!(r["message"].get("thinking").is_none());
    // Generate, with a stop string.
    let (code, r) = s.post(
        "/api/generate",
        &json!({"model": "qwen3-tiny", "prompt": h["messages"][1]["content"], "system": h["messages"][0]["content"],
                "think": false, "stream": false, "options": {"temperature": 0, "num_predict": 20, "stop": ["cartridge"]}}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["response"], "library ");
    assert_eq!(r["done_reason"], "stop");
    let (code, tags) = s.get("/api/tags", None);
    assert_eq!(code, 200);
    let tags: Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags["models"][0]["name"], "qwen3-tiny:latest");
    let (code, show) = s.post("/api/show", &json!({"model": "qwen3-tiny"}));
    assert_eq!(code, 200);
    assert_eq!(show["model_info"]["qwen3.context_length"], 512);
    assert!(show["capabilities"].as_array().unwrap().contains(&json!("thinking")));
    assert_eq!(s.get("/api/ps", None).0, 200);
    assert!(s.get("/api/version", None).1.contains("version"));
    let (code, r) = s.post("/api/chat", &json!({"model": "llama3", "messages": [{"role": "user", "content": "x"}]}));
    assert_eq!(code, 404);
    assert!(r["error"].as_str().unwrap().contains("llama3"));
    let (code, r) = s.post("/api/chat", &json!({"model": "qwen3-tiny", "messages": "x"}));
    assert_eq!(code, 400);
    assert!(r["error"].is_string());
    s.wait_idle();
}

#[test]
fn sigterm_stops_the_server() {
    let mut s = Server::start(&[]);
    assert_eq!(s.get("/health", None).0, 200);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the server stops");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(s.stderr.lock().unwrap().contains("stopped"));
}

#[test]
fn bench_serve_reports_latencies() {
    let s = Server::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_qwick"))
        .args(["bench-serve", "--url", &s.url, "--concurrency", "3", "--requests", "6"])
        .args(["--prompt-len", "40", "--gen-len", "8", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["failed"], 0);
    assert_eq!(r["output_tokens"], 48);
    assert_eq!(r["prompt_tokens"], 240);
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0 && r["itl_ms"]["p99"].as_f64().unwrap() > 0.0);
    s.wait_idle();
}

/// Runs a test script of `python/` (which ends `N passed, 0 failed`) against `s` within 300 s,
/// when the packages it imports (`package`, comma-separated) are installed.
fn python_client(package: &str, script: &str, s: &Server, args: &[&str]) {
    let installed =
        Command::new("python3").args(["-c", &format!("import {package}")]).output().is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("skipped: the Python packages {package} are not installed");
        return;
    }
    let out = Command::new("timeout")
        .args(["300", "python3"])
        .arg(root().join("python").join(script))
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains(" passed, 0 failed"), "{text}");
    s.wait_idle();
}

/// The official OpenAI Python client, when installed (`pip install -r python/requirements-test.txt`).
#[test]
fn openai_python_client() {
    let s = Server::start(&["--served-model-name", "tiny"]);
    python_client("openai", "test_openai_client.py", &s, &["--base-url", &format!("{}/v1", s.url), "--model", "tiny"]);
}

/// The official `anthropic` client (python/test_anthropic_client.py) against `/v1/messages`, with
/// the key sent as `x-api-key`.
#[test]
fn anthropic_python_client() {
    let s = Server::start(&["--served-model-name", "tiny", "--api-key", "ant-key"]);
    let args = ["--base-url", &s.url, "--model", "tiny", "--api-key", "ant-key"];
    python_client("anthropic", "test_anthropic_client.py", &s, &args);
}

#[test]
fn the_thinking_budget_ends_reasoning_within_max_tokens() {
    let s = Server::start(&[]);
    let c = &refs()["cases"][0]; // hello_think: the model never closes its thinking by itself
    let (code, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": c["messages"], "max_tokens": 40, "temperature": 0, "max_thinking_tokens": 5}),
    );
    assert_eq!(code, 200, "{r}");
    let reasoning = r["choices"][0]["message"]["reasoning_content"].as_str().unwrap();
    assert!(reasoning.ends_with("give the solution based on the thinking directly now."), "{reasoning}");
    assert!(!r["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(r["usage"]["completion_tokens"], 40, "injected tokens count against max_tokens");
    // max_thinking_tokens 0 turns thinking off: the answer is content.
    let (code, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": c["messages"], "max_tokens": 5, "temperature": 0, "max_thinking_tokens": 0}),
    );
    assert_eq!(code, 200, "{r}");
    assert!(!r["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert!(r["choices"][0]["message"].get("reasoning_content").is_none());
    s.wait_idle();
}

#[test]
fn a_small_kv_cache_preempts_and_recomputes_with_the_same_tokens() {
    // 6 blocks of 16 tokens; four copies of a 32-token prompt growing to 52 tokens need 16.
    let s = Server::start(&["--kv-cache-tokens", "96"]);
    let c = &refs()["cases"][3]; // multi_turn, 32 prompt tokens
    let want = detok(&s, &ids(&c["generated_ids"]));
    let (code, r) =
        s.post("/v1/completions", &json!({"prompt": c["prompt_ids"], "max_tokens": 20, "temperature": 0, "n": 4}));
    assert_eq!(code, 200, "{r}");
    for ch in r["choices"].as_array().unwrap() {
        assert_eq!(ch["text"], want.as_str());
        assert_eq!(ch["finish_reason"], "length");
    }
    assert!(s.metric("qwick_num_preemptions_total") > 0.0);
    s.wait_idle();
    assert_eq!(s.metric("qwick_kv_blocks_total"), 6.0);
    // Over the (capped) context: 400 with the numbers.
    let (code, r) = s.post("/v1/completions", &json!({"prompt": c["prompt_ids"], "max_tokens": 80}));
    assert_eq!(code, 400);
    assert!(r["error"]["message"].as_str().unwrap().contains("96"), "{r}");
}

#[test]
fn completions_echo_the_prompt() {
    let s = Server::start(&[]);
    let text = "The capital of France is";
    let base = json!({"prompt": text, "max_tokens": 6, "temperature": 0});
    let (code, plain) = s.post("/v1/completions", &base);
    assert_eq!(code, 200, "{plain}");
    let completion = plain["choices"][0]["text"].as_str().unwrap();
    let mut echo = base.clone();
    echo["echo"] = json!(true);
    let (code, r) = s.post("/v1/completions", &echo);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), format!("{text}{completion}"));
    assert_eq!(r["usage"], plain["usage"]);
    // Streamed: the prompt comes first, then the completion.
    echo["stream"] = json!(true);
    let (events, done) = s.sse("/v1/completions", &echo);
    assert!(done);
    let streamed: String =
        events.iter().filter_map(|e| e["choices"].get(0)?["text"].as_str().map(String::from)).collect();
    assert_eq!(streamed, format!("{text}{completion}"));
    assert_eq!(events[0]["choices"][0]["text"], text);

    // Token-id prompts echo their detokenized text; with n, every choice of a prompt does.
    let prompts = [refs()["cases"][0]["prompt_ids"].clone(), refs()["cases"][1]["prompt_ids"].clone()];
    let prompts: Vec<Vec<u32>> = prompts.iter().map(ids).collect();
    let (code, r) =
        s.post("/v1/completions", &json!({"prompt": prompts, "max_tokens": 4, "temperature": 0, "n": 2, "echo": true}));
    assert_eq!(code, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        let p = &prompts[i / 2];
        let (alone, _) = completion_text(&s, p, 4);
        assert_eq!(c["text"].as_str().unwrap(), format!("{}{alone}", detok(&s, p)), "choice {i}");
    }

    // Echo with logprobs: the prompt tokens come first, the first with null logprobs; each other
    // prompt token's logprob (and alternatives) is what the prefix before it predicts, as a
    // one-token completion of that prefix reports it.
    let p = &prompts[0];
    let (code, r) = s
        .post("/v1/completions", &json!({"prompt": p, "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 5}));
    assert_eq!(code, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let (tokens, lps, tops, offs) = (
        lp["tokens"].as_array().unwrap(),
        lp["token_logprobs"].as_array().unwrap(),
        lp["top_logprobs"].as_array().unwrap(),
        lp["text_offset"].as_array().unwrap(),
    );
    assert_eq!(tokens.len(), p.len() + 3, "{lp}");
    assert_eq!((lps.len(), tops.len(), offs.len()), (tokens.len(), tokens.len(), tokens.len()));
    assert!(lps[0].is_null() && tops[0].is_null(), "{lp}");
    assert_eq!(offs[0], 0);
    for i in 1..tokens.len() {
        let l = lps[i].as_f64().unwrap();
        assert!(l.is_finite() && l <= 0.0, "token {i}: {l}");
        assert_eq!(tops[i].as_object().unwrap().len(), 5, "token {i}: {}", tops[i]);
    }
    // The generated part is what the same request without echo returns.
    let (_, plain) = s.post("/v1/completions", &json!({"prompt": p, "max_tokens": 3, "temperature": 0, "logprobs": 5}));
    let plp = &plain["choices"][0]["logprobs"];
    assert_eq!(&tokens[p.len()..], plp["tokens"].as_array().unwrap().as_slice());
    for (a, b) in lps[p.len()..].iter().zip(plp["token_logprobs"].as_array().unwrap()) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < LOGPROB_TOL, "{a} vs {b}");
    }
    let mut compared = 0;
    for i in 1..p.len() {
        let (code, q) =
            s.post("/v1/completions", &json!({"prompt": &p[..i], "max_tokens": 1, "temperature": 0, "logprobs": 5}));
        assert_eq!(code, 200, "{q}");
        let top = q["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().clone();
        let mine = tops[i].as_object().unwrap();
        for (k, v) in &top {
            let m = mine.get(k).unwrap_or_else(|| panic!("position {i}: {k:?} missing from {}", tops[i]));
            assert!((m.as_f64().unwrap() - v.as_f64().unwrap()).abs() < LOGPROB_TOL, "position {i} {k:?}: {m} vs {v}");
        }
        if let Some(v) = top.get(tokens[i].as_str().unwrap()) {
            assert!(
                (lps[i].as_f64().unwrap() - v.as_f64().unwrap()).abs() < LOGPROB_TOL,
                "position {i}: {} vs {v}",
                lps[i]
            );
            compared += 1;
        }
    }
    // The random model never ranks these prompt tokens in its top 5: compare the logprobs of
    // tokens it does pick, by echoing the prompt followed by its own greedy output.
    let gen = ids(&refs()["cases"][0]["generated_ids"]);
    let q: Vec<u32> = p.iter().chain(&gen[..3]).copied().collect();
    let (code, r) = s
        .post("/v1/completions", &json!({"prompt": q, "max_tokens": 1, "temperature": 0, "echo": true, "logprobs": 5}));
    assert_eq!(code, 200, "{r}");
    let qlp = &r["choices"][0]["logprobs"];
    assert_eq!(&qlp["tokens"].as_array().unwrap()[p.len()..p.len() + 3], &tokens[p.len()..]);
    for (k, b) in plp["token_logprobs"].as_array().unwrap().iter().enumerate() {
        let a = &qlp["token_logprobs"][p.len() + k];
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < LOGPROB_TOL, "generated token {k}: {a} vs {b}");
        compared += 1;
    }
    assert!(compared >= 3);
    // With n, every choice has the prompt logprobs; streamed, the echo chunk carries them.
    let (code, r) = s.post(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1, "n": 2}),
    );
    assert_eq!(code, 200, "{r}");
    for c in r["choices"].as_array().unwrap() {
        assert!(c["logprobs"]["token_logprobs"][0].is_null(), "{c}");
        assert_eq!(c["logprobs"], r["choices"][0]["logprobs"]);
    }
    let (events, done) = s.sse(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1, "stream": true}),
    );
    assert!(done);
    assert_eq!(events[0]["choices"][0]["text"], text);
    let first = &events[0]["choices"][0]["logprobs"];
    assert!(first["token_logprobs"][0].is_null(), "{first}");
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["logprobs"]["token_logprobs"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().clone());
    s.wait_idle();
}

#[test]
fn tool_choice_required_and_named_start_the_answer_with_a_call() {
    let s = Server::start(&[]);
    let messages = json!([{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]);
    // Arguments with a closed set of values, so that even random weights finish the call.
    let tool = |name: &str| {
        json!({"type": "function", "function": {"name": name, "description": "a tool",
               "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                              "required": ["city"], "additionalProperties": false}}})
    };
    let tools = json!([tool("get_weather"), tool("get_time")]);
    let tokenize = |body: Value| -> Vec<u32> {
        let (code, r) = s.post("/tokenize", &body);
        assert_eq!(code, 200, "{r}");
        ids(&r["tokens"])
    };
    let no_think = json!({"enable_thinking": false});
    let cases = [
        // (tool_choice, the tools rendered, the prefilled start of the answer)
        (json!("required"), tools.clone(), "<tool_call>\n".to_string()),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            json!([tool("get_time")]),
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": ".to_string(),
        ),
    ];
    for (choice, rendered, prefill) in cases {
        // The prompt: the chat rendered without thinking, then the prefill's tokens.
        let mut prompt = tokenize(json!({"messages": messages, "tools": rendered, "chat_template_kwargs": no_think}));
        prompt.extend(tokenize(json!({"prompt": prefill})));
        // Thinking asked for or not, a forced call is prompted without it; the arguments follow
        // the tool's schema, so the call completes and parses.
        let mut answers = vec![];
        for kwargs in [json!({}), json!({"enable_thinking": true})] {
            let body = json!({"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": 250,
                              "temperature": 0, "chat_template_kwargs": kwargs, "parallel_tool_calls": false});
            let (code, r) = s.post("/v1/chat/completions", &body);
            assert_eq!(code, 200, "{r}");
            assert_eq!(r["usage"]["prompt_tokens"], prompt.len(), "{choice}");
            let c = &r["choices"][0];
            assert!(c["message"].get("reasoning_content").is_none(), "{r}");
            assert_eq!(c["finish_reason"], "tool_calls", "{r}");
            let calls = c["message"]["tool_calls"].as_array().expect("tool calls");
            assert_eq!(calls.len(), 1, "{r}");
            for t in calls {
                let name = t["function"]["name"].as_str().unwrap();
                assert!(["get_weather", "get_time"].contains(&name), "{r}");
                if let Some(want) = choice["function"]["name"].as_str() {
                    assert_eq!(name, want, "{r}");
                }
                let args: Value = serde_json::from_str(t["function"]["arguments"].as_str().unwrap()).unwrap();
                let city = args["city"].as_str().unwrap_or_default();
                assert!(["Paris", "Rome"].contains(&city) && args.as_object().unwrap().len() == 1, "{r}");
            }
            answers.push(c["message"]["tool_calls"].clone());
        }
        // Greedy under a constraint is deterministic: the same calls (ids aside) both times.
        let strip = |v: &Value| v.as_array().unwrap().iter().map(|t| t["function"].clone()).collect::<Vec<_>>();
        assert_eq!(strip(&answers[0]), strip(&answers[1]), "{choice}");
    }
    // Parallel calls (the default): every call the model makes follows its schema.
    let body = json!({"messages": messages, "tools": tools, "tool_choice": "required", "max_tokens": 250,
                      "temperature": 0});
    let (code, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(code, 200, "{r}");
    let calls = r["choices"][0]["message"]["tool_calls"].as_array().expect("tool calls");
    for t in calls {
        let args: Value = serde_json::from_str(t["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(["Paris", "Rome"].contains(&args["city"].as_str().unwrap()), "{r}");
    }
    // A forced call and a response format cannot both shape the answer.
    let body = json!({"messages": messages, "tools": tools, "tool_choice": "required", "max_tokens": 2,
                      "response_format": {"type": "json_object"}});
    let (code, r) = s.post("/v1/chat/completions", &body);
    assert_eq!((code, &r["error"]["param"]), (400, &json!("response_format")), "{r}");
    // "none": no tools in the prompt and no parsing; "auto" renders them all with no prefill.
    let plain = tokenize(json!({"messages": messages}));
    let with_tools = tokenize(json!({"messages": messages, "tools": tools}));
    for (choice, prompt) in [("none", plain), ("auto", with_tools)] {
        let body =
            json!({"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": 2, "temperature": 0});
        let (code, r) = s.post("/v1/chat/completions", &body);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["usage"]["prompt_tokens"], prompt.len(), "{choice}");
    }
    // A named function that is not among the tools.
    let body = json!({"messages": messages, "tools": tools, "max_tokens": 2,
                      "tool_choice": {"type": "function", "function": {"name": "nope"}}});
    let (code, r) = s.post("/v1/chat/completions", &body);
    assert_eq!((code, &r["error"]["param"]), (400, &json!("tool_choice")), "{r}");
    s.wait_idle();
}

#[test]
fn prompt_logprobs_do_not_depend_on_chunking_or_the_prefix_cache() {
    // Prompts prefilled 4 tokens a step: prompt logprobs are gathered over the chunks.
    let s = Server::start(&["--max-num-batched-tokens", "4"]);
    let p = ids(&refs()["cases"][1]["prompt_ids"]);
    let body = json!({"prompt": p, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 3});
    // First with the prompt's prefix already cached by another request: it is computed anyway.
    let (code, warm) = s.post("/v1/completions", &json!({"prompt": p, "max_tokens": 1, "temperature": 0}));
    assert_eq!(code, 200, "{warm}");
    let (code, a) = s.post("/v1/completions", &body);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0), 0, "{a}");
    // (Without prompt logprobs, the same prompt does hit the cache.)
    let (_, again) = s.post("/v1/completions", &json!({"prompt": p, "max_tokens": 1, "temperature": 0}));
    assert!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{again}");
    let one = Server::start(&[]);
    let (code, b) = one.post("/v1/completions", &body);
    assert_eq!(code, 200, "{b}");
    let (la, lb) = (&a["choices"][0]["logprobs"], &b["choices"][0]["logprobs"]);
    assert_eq!(la["tokens"], lb["tokens"]);
    assert_eq!(la["token_logprobs"].as_array().unwrap().len(), p.len() + 2);
    for (x, y) in la["token_logprobs"].as_array().unwrap().iter().zip(lb["token_logprobs"].as_array().unwrap()) {
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() < LOGPROB_TOL, "{x} vs {y}"),
            _ => assert!(x.is_null() && y.is_null(), "{x} vs {y}"),
        }
    }
    s.wait_idle();
    one.wait_idle();
}

/// A chat request with a few greedy tokens.
fn short_chat(stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4,
           "temperature": 0, "stream": stream})
}

/// A panic inside a step (in the forward pass, or after it while sampling) fails the requests of
/// that step with a 500 and OpenAI error JSON, frees their KV blocks, and the engine goes on.
#[test]
fn engine_survives_a_panic_in_a_step() {
    for fault in ["step-panic:2", "engine-panic:2"] {
        let s = Server::start_env(&[], &[("QWICK_FAULT", fault)]);
        let (code, body) = s.post("/v1/chat/completions", &short_chat(false));
        assert_eq!(code, 500, "{fault}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("internal error") && msg.contains("injected fault"), "{fault}: {body}");
        assert_eq!(body["error"]["type"], "server_error", "{fault}: {body}");
        s.wait_idle();
        // Later requests are served, streamed or not.
        let (code, body) = s.post("/v1/chat/completions", &short_chat(false));
        assert_eq!(code, 200, "{fault}: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{fault}: {body}");
        let (events, done) = s.sse("/v1/chat/completions", &short_chat(true));
        assert!(done && !events.is_empty(), "{fault}");
        assert_eq!(s.get("/health", None).0, 200, "{fault}");
        s.wait_idle();
    }
}

/// A streamed request whose step fails ends with an error event.
#[test]
fn a_streamed_request_ends_with_an_error_event_when_its_step_fails() {
    let s = Server::start_env(&[], &[("QWICK_FAULT", "step-panic:3")]);
    let (events, _) = s.sse("/v1/chat/completions", &short_chat(true));
    let last = events.last().expect("some events");
    assert!(last["error"]["message"].as_str().unwrap_or_default().contains("internal error"), "{events:?}");
    s.wait_idle();
    assert_eq!(s.get("/health", None).0, 200);
}

/// An engine that cannot go on: /health turns 503 and requests get 503 at once.
#[test]
fn a_failed_engine_answers_503_at_once() {
    let s = Server::start_env(&[], &[("QWICK_FAULT", "engine-exit:1")]);
    let (code, body) = s.post("/v1/chat/completions", &short_chat(false));
    assert!(code == 500 || code == 503, "{code}: {body}");
    let t0 = Instant::now();
    while s.get("/health", None).0 != 503 {
        assert!(t0.elapsed() < Duration::from_secs(10), "/health stays 200 after the engine failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let (code, body) = s.post("/v1/chat/completions", &short_chat(false));
    assert_eq!(code, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("engine failed"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5), "a request to a failed engine waited");
    let (_, models) = s.get("/v1/models", None);
    let models: Value = serde_json::from_str(&models).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap();
    let (code, body) =
        s.post("/api/chat", &json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": false}));
    assert_eq!(code, 503, "{body}");
}

/// No request field is dropped silently: unknown fields are refused, the ones accepted and ignored
/// are listed; logit_bias, num_ctx, reasoning levels take effect; constrained formats are refused
/// with a message.
#[test]
fn every_request_field_is_honoured_or_refused() {
    let s = Server::start(&[]);
    // logit_bias steers greedy decoding.
    let (code, body) = s.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "logit_bias": {"4242": 100}}),
    );
    assert_eq!(code, 200, "{body}");
    let (_, want) = s.post("/detokenize", &json!({"tokens": [4242, 4242, 4242]}));
    assert_eq!(body["choices"][0]["text"], want["prompt"], "{body}");
    let (code, body) = s.post("/v1/completions", &json!({"prompt": [1], "logit_bias": {"999999999": 1}}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("logit_bias")), "{body}");
    let (code, body) = s.post("/v1/completions", &json!({"prompt": [1], "logit_bias": {"5": 101}}));
    assert_eq!(code, 400, "{body}");
    // Unknown fields are refused; the listed ones are accepted.
    let chat = |extra: Value| {
        let mut b = short_chat(false);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/v1/chat/completions", &b)
    };
    let (code, body) = chat(json!({"frobnicate": true}));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("frobnicate"), "{body}");
    assert_eq!(chat(json!({"user": "u1", "store": false, "parallel_tool_calls": true})).0, 200);
    assert_eq!(chat(json!({"parallel_tool_calls": "no"})).0, 400);
    assert_eq!(chat(json!({"response_format": {"type": "text"}})).0, 200);
    let (code, body) = chat(json!({"response_format": {"type": "xml"}}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("response_format")), "{body}");
    let (code, body) = chat(json!({"reasoning_effort": "extreme"}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("reasoning_effort")), "{body}");
    let (code, body) = chat(json!({"reasoning_effort": "none", "max_tokens": 8}));
    assert_eq!(code, 200, "{body}");
    assert!(body["choices"][0]["message"]["reasoning_content"].as_str().unwrap_or("").is_empty(), "{body}");
    let (code, body) = s.post("/v1/completions", &json!({"prompt": [1], "max_tokens": 1, "suffix": "x"}));
    assert_eq!(code, 400, "{body}");
    // Ollama: num_ctx bounds the context; format is refused; keep_alive and hardware options are
    // accepted; other unknown options are refused.
    let (_, models) = s.get("/v1/models", None);
    let models: Value = serde_json::from_str(&models).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let ollama = |extra: Value| {
        let mut b = json!({"model": name, "prompt": "Tell me a long story about the sea.", "stream": false});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/api/generate", &b)
    };
    let (code, body) = ollama(json!({"options": {"num_ctx": 4}}));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("context length"), "{body}");
    let (code, body) = ollama(json!({"options": {"num_ctx": 64, "num_predict": 1000, "temperature": 0}}));
    assert_eq!(code, 200, "{body}");
    let used = body["prompt_eval_count"].as_u64().unwrap() + body["eval_count"].as_u64().unwrap();
    assert!(used <= 64, "num_ctx 64 but {used} tokens: {body}");
    assert_eq!(ollama(json!({"keep_alive": "5m", "options": {"num_thread": 4, "num_predict": 2}})).0, 200);
    let (code, body) = ollama(json!({"options": {"mirostat": 2}}));
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("options.mirostat"), "{body}");
    assert_eq!(ollama(json!({"format": 7})).0, 400);
    assert_eq!(ollama(json!({"think": "low", "options": {"num_predict": 2}})).0, 200);
}

/// Structured output checked by a JSON-schema validator through the official client (when the
/// Python packages are installed): a nested schema with thinking off and after thinking, 50
/// random schemas, a regex, a choice list, Ollama's `format`.
#[test]
fn structured_output_validates_against_its_schema() {
    let s = Server::start(&["--served-model-name", "tiny"]);
    let args = ["--base-url", &s.url, "--model", "tiny"];
    python_client("openai, jsonschema", "test_structured_output.py", &s, &args);
}

/// Output formats the constraint engine cannot honour are a 400 naming what is not supported.
#[test]
fn unsupported_output_formats_are_refused_by_name() {
    let s = Server::start(&[]);
    let chat = |extra: Value| {
        let mut b = short_chat(false);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/v1/chat/completions", &b)
    };
    let schema = json!({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}});
    let (code, body) =
        chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}));
    assert_eq!(code, 400, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("if") && msg.contains("then"), "{body}");
    assert_eq!(body["error"]["param"], "response_format");
    let (code, body) = chat(json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}));
    assert_eq!(code, 400, "{body}");
    let (code, body) = chat(json!({"response_format": {"type": "yaml"}}));
    assert_eq!(code, 400, "{body}");
    let (code, body) = chat(json!({"guided_grammar": "start: ("}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("guided_grammar")), "{body}");
    // A valid format: greedy output parses.
    let (code, body) = chat(json!({"response_format": {"type": "json_object"}, "max_tokens": 200,
                                   "chat_template_kwargs": {"enable_thinking": false},
                                   "guided_json": null}));
    assert_eq!(code, 200, "{body}");
}

/// CORS is off unless `--allowed-origins` names the origin; request logs name method, path and
/// status, and carry prompts only with `--log-prompts`.
#[test]
fn cors_and_request_logs() {
    let acao = |s: &Server, method: &str, origin: &str| -> (u16, Option<String>) {
        let req = Server::agent().request(method, &format!("{}/v1/models", s.url)).set("Origin", origin);
        match req.call() {
            Ok(r) => (r.status(), r.header("Access-Control-Allow-Origin").map(str::to_string)),
            Err(ureq::Error::Status(c, r)) => (c, r.header("Access-Control-Allow-Origin").map(str::to_string)),
            Err(e) => panic!("{e}"),
        }
    };
    let s = Server::start(&[]);
    assert_eq!(acao(&s, "GET", "http://example.com").1, None);
    let (code, h) = acao(&s, "OPTIONS", "http://example.com");
    assert!(code >= 400 && h.is_none(), "{code} {h:?}");
    let secret = "the-secret-prompt-42";
    let body = json!({"messages": [{"role": "user", "content": secret}], "max_tokens": 2, "temperature": 0});
    assert_eq!(s.post("/v1/chat/completions", &body).0, 200);
    let t0 = Instant::now();
    while !s.stderr.lock().unwrap().contains("POST /v1/chat/completions 200") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no request log: {}", s.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!s.stderr.lock().unwrap().contains(secret), "the prompt went into the log");
    drop(s);

    let s = Server::start(&["--allowed-origins", "http://example.com,http://other.org", "--log-prompts"]);
    assert_eq!(acao(&s, "GET", "http://example.com"), (200, Some("http://example.com".into())));
    let (code, h) = acao(&s, "OPTIONS", "http://other.org");
    assert_eq!((code, h.as_deref()), (204, Some("http://other.org")));
    assert_eq!(acao(&s, "GET", "http://evil.net").1, None);
    assert_eq!(s.post("/v1/chat/completions", &body).0, 200);
    let t0 = Instant::now();
    while !s.stderr.lock().unwrap().contains(secret) {
        assert!(t0.elapsed() < Duration::from_secs(10), "--log-prompts logged no prompt");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The chat page at `/`, driven in headless Chromium (python/test_chat_page.py) on a server with
/// an API key: the page itself loads without the key, its API calls carry the one the user enters.
#[test]
fn chat_page_in_headless_chromium() {
    let browser = ["/usr/bin/chromium", "/usr/bin/chromedriver"].iter().all(|p| std::path::Path::new(p).exists());
    let selenium =
        Command::new("python3").args(["-c", "import selenium"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !browser || !selenium {
        eprintln!("skipped: chromium, chromium-driver or selenium is not installed (python/install-test-deps.sh)");
        return;
    }
    let s = Server::start(&["--api-key", "page-key"]);
    let (code, html) = s.get("/", None);
    assert_eq!(code, 200);
    assert!(html.contains("<title>qwick</title>"), "{html}");
    let out = Command::new("timeout")
        .args(["300", "python3"])
        .arg(root().join("python/test_chat_page.py"))
        .args(["--url", &s.url, "--api-key", "page-key"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("chat page: ok"), "{text}");
}

/// The load and abuse test (python/load_test.py) at a reduced size: 200 mixed valid, bad and
/// hung-up requests at 32 concurrency and 1,000 randomized bodies; no crash, every bad request a
/// 4xx with a message, every valid one complete, no 5xx, KV back to 0 and consistent, RSS stable.
#[test]
fn load_and_abuse() {
    let s = Server::start(&[]);
    let out = Command::new("timeout")
        .args(["600", "python3"])
        .arg(root().join("python/load_test.py"))
        .args(["--url", &s.url, "--pid", &s.child.id().to_string(), "--requests", "200", "--fuzz", "1000"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("\n0 failures"), "{text}");
    s.wait_idle();
}

/// Writes a LoRA adapter in PEFT's layout for the greedy model: rank 4 on q_proj and v_proj,
/// seeded values large enough to change its greedy tokens.
fn greedy_adapter(dir: &std::path::Path, seed: u64) {
    use qwick_backend::Format;
    std::fs::create_dir_all(dir).unwrap();
    let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                     "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = |n: usize| -> Vec<u8> {
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1.0
            })
            .collect();
        qwick_backend::format::f32_bytes(&v).to_vec()
    };
    let mut tensors = vec![];
    for l in 0..2 {
        for (m, out) in [("q_proj", 128), ("v_proj", 64)] {
            let base = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            tensors.push((format!("{base}.lora_A.weight"), Format::F32, vec![4, 64], rand(4 * 64)));
            tensors.push((format!("{base}.lora_B.weight"), Format::F32, vec![out, 4], rand(out * 4)));
        }
    }
    qwick_model::safetensors::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
}

#[test]
fn lora_adapters_are_models_that_requests_pick_and_share_a_batch() {
    let d = common::scratch("serve", "lora");
    let (a1, a2) = (d.join("a1"), d.join("a2"));
    greedy_adapter(&a1, 1);
    greedy_adapter(&a2, 2);
    // Long enough for whole KV blocks, so the prefix cache is involved.
    let prompt = &"Hello! Who are you, and what can you do? ".repeat(8);
    // What `run` answers with each adapter (and without).
    let run = |lora: Option<&std::path::Path>| -> String {
        let mut args = vec!["run", "--model", model(), "--threads", "1", "--temperature", "0", "--max-tokens", "8"];
        args.extend(["--json", "--no-think", "--prompt", prompt]);
        if let Some(l) = lora {
            args.extend(["--lora", l.to_str().unwrap()]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_qwick")).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        v["content"].as_str().unwrap().to_string()
    };
    let want = [run(None), run(Some(&a1)), run(Some(&a2))];
    assert!(want[0] != want[1] && want[1] != want[2], "the adapters change the answer: {want:?}");
    let one = format!("one={}", a1.display());
    let two = format!("two={}", a2.display());
    let s = Server::start(&["--lora", &one, "--lora", &two]);
    let (_, models) = s.get("/v1/models", None);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(&ids[1..], ["one", "two"]);
    assert_eq!(models["data"][1]["parent"], ids[0]);
    // Ollama's list: the adapters as models whose parent is the base.
    let (_, tags) = s.get("/api/tags", None);
    let tags: Value = serde_json::from_str(&tags).unwrap();
    let names: Vec<&str> = tags["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(&names[1..], ["one:latest", "two:latest"], "{tags}");
    assert_eq!(tags["models"][2]["details"]["parent_model"], names[0]);
    let base = ids[0].to_string();
    let ask = |m: &str| {
        s.post(
            "/v1/chat/completions",
            &json!({"model": m, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": 8, "chat_template_kwargs": {"enable_thinking": false}}),
        )
    };
    // The base model's prompt blocks go to the prefix cache first: an adapter's request must not
    // reuse them (its K/V differ).
    assert_eq!(ask(&base).1["choices"][0]["message"]["content"].as_str().unwrap(), want[0]);
    assert_eq!(ask("one").1["choices"][0]["message"]["content"].as_str().unwrap(), want[1]);
    // Several at once, so that the engine batches rows of different adapters together.
    let names = [base.as_str(), "one", "two", "one", base.as_str(), "two"];
    let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = names
            .iter()
            .map(|m| {
                let ask = &ask;
                sc.spawn(move || ask(m))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, (code, body)) in names.iter().zip(&answers) {
        assert_eq!(*code, 200, "{m}: {body}");
        let i = if *m == base {
            0
        } else if *m == "one" {
            1
        } else {
            2
        };
        assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), want[i], "model {m}");
    }
    let (code, body) =
        s.post("/v1/chat/completions", &json!({"model": "three", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(code, 404, "{body}");
    let _ = std::fs::remove_dir_all(&d);
}

/// What llama-server's and vLLM's users send: routes without `/v1`, `/tokenize` with `content`,
/// `response_format` `json_object` with a schema, a GBNF `grammar`, `add_generation_prompt` and
/// `continue_final_message`.
#[test]
fn llama_server_and_vllm_habits() {
    let s = Server::start(&[]);
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 40,
                           "temperature": 0, "chat_template_kwargs": {"enable_thinking": false}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/chat/completions", &b)
    };
    // Routes without the version prefix.
    assert_eq!(chat(json!({"max_tokens": 2})).0, 200);
    assert_eq!(s.post("/completions", &json!({"prompt": "Hi", "max_tokens": 2})).0, 200);
    let (code, models) = s.get("/models", None);
    assert_eq!(code, 200);
    let name = serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.get(&format!("/models/{name}"), None).0, 200);

    // /tokenize in llama-server's form, answered in its shape; /detokenize in both.
    let (code, vllm) = s.post("/tokenize", &json!({"prompt": "Hello world, héllo"}));
    assert_eq!(code, 200, "{vllm}");
    let (code, llama) = s.post("/tokenize", &json!({"content": "Hello world, héllo"}));
    assert_eq!(code, 200, "{llama}");
    assert_eq!(llama, json!({"tokens": vllm["tokens"]}));
    let (_, pieces) = s.post("/tokenize", &json!({"content": "Hello world", "with_pieces": true}));
    let joined: String = pieces["tokens"].as_array().unwrap().iter().map(|p| p["piece"].as_str().unwrap()).collect();
    assert_eq!(joined, "Hello world", "{pieces}");
    assert_eq!(pieces["tokens"][0]["id"], vllm["tokens"][0]);
    let (_, text) = s.post("/detokenize", &json!({"tokens": vllm["tokens"]}));
    assert_eq!(
        (text["content"].as_str(), text["prompt"].as_str()),
        (Some("Hello world, héllo"), Some("Hello world, héllo"))
    );
    for bad in
        [json!({"content": "x", "prompt": "y"}), json!({"prompt": "x", "with_pieces": true}), json!({"contents": "x"})]
    {
        let (code, body) = s.post("/tokenize", &bad);
        assert_eq!(code, 400, "{bad}: {body}");
    }

    // json_object with a schema beside it (llama-server's form) is that schema.
    let schema = json!({"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"],
                        "additionalProperties": false});
    let (code, body) = chat(json!({"response_format": {"type": "json_object", "schema": schema}}));
    assert_eq!(code, 200, "{body}");
    let content: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content == json!({"n": 1}) || content == json!({"n": 2}), "{body}");
    let (code, body) = chat(json!({"response_format": {"type": "json_object", "schema": "object"}}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("response_format.schema")), "{body}");

    // A GBNF grammar.
    let (code, body) = chat(json!({"grammar": "root ::= answer \".\"\nanswer ::= \"yes\" | \"no\""}));
    assert_eq!(code, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content == "yes." || content == "no.", "{body}");
    let (code, body) = chat(json!({"grammar": "root ::= missing"}));
    assert_eq!((code, body["error"]["param"].as_str()), (400, Some("grammar")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("`missing` is not defined"), "{body}");

    // continue_final_message: the assistant's text continued, as a completion of the rendered
    // chat cut after it would be.
    let prefill = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]);
    let (code, cont) = chat(json!({"messages": prefill, "continue_final_message": true,
                                   "add_generation_prompt": false, "max_tokens": 6}));
    assert_eq!(code, 200, "{cont}");
    let raw = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nThe answer is";
    let (code, plain) = s.post("/v1/completions", &json!({"prompt": raw, "max_tokens": 6, "temperature": 0}));
    assert_eq!(code, 200, "{plain}");
    assert_eq!(cont["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"], "{cont}");
    assert_eq!(cont["choices"][0]["message"]["content"], plain["choices"][0]["text"], "{cont}\n{plain}");
    // Anthropic's Messages API continues a final assistant message the same way.
    let (code, ant) = s.post(
        "/v1/messages",
        &json!({"messages": prefill, "max_tokens": 6, "temperature": 0, "thinking": {"type": "disabled"}}),
    );
    assert_eq!(code, 200, "{ant}");
    let ant_text = ant["content"].as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect::<String>();
    assert_eq!(ant_text, plain["choices"][0]["text"].as_str().unwrap(), "{ant}");
    let total =
        ant["usage"]["input_tokens"].as_u64().unwrap() + ant["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(json!(total), plain["usage"]["prompt_tokens"], "{ant}");
    // Continuing an answer after its reasoning: the output format applies at once (the prompt
    // holds the reasoning's end).
    let reasoned = json!([{"role": "user", "content": "Hi"},
                          {"role": "assistant", "reasoning_content": "Think.", "content": "The digit is "}]);
    let (code, digit) = chat(json!({"messages": reasoned, "continue_final_message": true,
                                    "add_generation_prompt": false, "max_tokens": 1, "guided_regex": "[0-9]"}));
    assert_eq!(code, 200, "{digit}");
    let d = digit["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(d.len() == 1 && d.chars().all(|c| c.is_ascii_digit()), "{digit}");
    // add_generation_prompt: false ends with the last message closed: fewer prompt tokens.
    let (_, open) = chat(json!({"max_tokens": 1}));
    let (code, closed) = chat(json!({"max_tokens": 1, "add_generation_prompt": false}));
    assert_eq!(code, 200, "{closed}");
    assert!(closed["usage"]["prompt_tokens"].as_u64() < open["usage"]["prompt_tokens"].as_u64(), "{closed}");
    for bad in [
        json!({"messages": prefill, "continue_final_message": true, "add_generation_prompt": true}),
        json!({"continue_final_message": true}),
        json!({"add_generation_prompt": "yes"}),
    ] {
        let (code, body) = chat(bad.clone());
        assert_eq!(code, 400, "{bad}: {body}");
    }
    s.wait_idle();
}

/// With thinking, `logprobs.content` holds the answer's tokens and `logprobs.reasoning_content`
/// the reasoning's, streamed the same way.
#[test]
fn logprobs_of_a_thinking_model_split_reasoning_from_answer() {
    let s = Server::start(&[]);
    let c = &refs()["cases"][0]; // hello_think: thinks, and closes only when the budget says so
    let body = json!({"messages": c["messages"], "max_tokens": 45, "temperature": 0, "max_thinking_tokens": 5,
                      "logprobs": true, "top_logprobs": 2});
    let (code, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(code, 200, "{r}");
    let (msg, lp) = (&r["choices"][0]["message"], &r["choices"][0]["logprobs"]);
    let (answer, reasoning) = (lp["content"].as_array().unwrap(), lp["reasoning_content"].as_array().unwrap());
    assert!(!answer.is_empty() && !reasoning.is_empty(), "{r}");
    // Sampled tokens have logprobs; the budget's injected closing text has none.
    let text = |v: &[Value]| v.iter().map(|t| t["token"].as_str().unwrap()).collect::<String>();
    assert_eq!(reasoning.len(), 5, "the budget's 5 tokens (the prompt opens the thinking): {r}");
    assert!(msg["reasoning_content"].as_str().unwrap().starts_with(&text(reasoning)), "{r}");
    assert!(msg["content"].as_str().unwrap().ends_with(&text(answer)), "{r}");
    assert!(answer.iter().chain(reasoning).all(|t| t["top_logprobs"].as_array().unwrap().len() == 2));
    // Streamed: the same entries, chunk by chunk.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (events, done) = s.sse("/v1/chat/completions", &streamed);
    assert!(done);
    let (mut a, mut t) = (vec![], vec![]);
    for e in &events {
        let lp = &e["choices"][0]["logprobs"];
        a.extend(lp["content"].as_array().cloned().unwrap_or_default());
        t.extend(lp["reasoning_content"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!((&a, &t), (answer, reasoning));
    s.wait_idle();
}

fn unit_norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (unit_norm(a) * unit_norm(b))
}

/// `--task embed`: OpenAI's and Ollama's embedding routes, batched, with `dimensions` and
/// base64; generation routes refused. (The pooled state itself is checked against
/// transformers in qwick-engine's parity test.)
#[test]
fn embeddings_over_the_openai_and_ollama_routes() {
    let s = Server::start(&["--task", "embed", "--served-model-name", "emb", "--max-queue", "8"]);
    let one = |input: Value| {
        let (code, r) = s.post("/v1/embeddings", &json!({"input": input}));
        assert_eq!(code, 200, "{r}");
        r
    };
    let r = one(json!("Hello world"));
    let e = floats(&r["data"][0]["embedding"]);
    assert!(e.len() > 8 && (unit_norm(&e) - 1.0).abs() < 1e-5, "{}", e.len());
    assert_eq!((r["object"].as_str(), r["model"].as_str()), (Some("list"), Some("emb")));
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);
    // The same tokens as ids, and inside a batch (sent together, computed together).
    let (_, ids) = s.post("/tokenize", &json!({"prompt": "Hello world", "add_special_tokens": true}));
    assert!(cosine(&floats(&one(ids["tokens"].clone())["data"][0]["embedding"]), &e) > 0.99999);
    let batch = one(json!(["A first text.", "Hello world", "And a third, longer one, to batch with the others."]));
    assert_eq!(batch["data"].as_array().unwrap().len(), 3);
    assert_eq!(batch["data"][1]["index"], 1);
    assert!(cosine(&floats(&batch["data"][1]["embedding"]), &e) > 0.9999);
    // Matryoshka dimensions: the first values, normalised again; base64 of little-endian f32.
    let (_, short) = s.post("/v1/embeddings", &json!({"input": "Hello world", "dimensions": 8}));
    let short = floats(&short["data"][0]["embedding"]);
    let head: Vec<f64> = e[..8].iter().map(|x| x / unit_norm(&e[..8])).collect();
    assert!(short.len() == 8 && cosine(&short, &head) > 0.99999, "{short:?}");
    let (_, b64) = s.post("/v1/embeddings", &json!({"input": "Hello world", "encoding_format": "base64"}));
    let text = b64["data"][0]["embedding"].as_str().unwrap().to_string();
    let py = format!(
        "import base64, struct; b = base64.b64decode('{text}'); print(len(b) // 4, struct.unpack('<f', b[:4])[0])"
    );
    let out = Command::new("python3").args(["-c", &py]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts = out.split_whitespace();
    assert_eq!(parts.next().unwrap().parse::<usize>().unwrap(), e.len(), "{out}");
    assert!((parts.next().unwrap().parse::<f64>().unwrap() - e[0]).abs() < 1e-5, "{out}");
    // Ollama: /api/embed (normalised, several inputs) and /api/embeddings (the raw state).
    let (code, o) = s.post("/api/embed", &json!({"model": "emb", "input": ["Hello world", "x"]}));
    assert_eq!(code, 200, "{o}");
    assert!(cosine(&floats(&o["embeddings"][0]), &e) > 0.9999 && o["prompt_eval_count"].as_u64().unwrap() >= 3);
    let (code, raw) = s.post("/api/embeddings", &json!({"model": "emb", "prompt": "Hello world"}));
    assert_eq!(code, 200, "{raw}");
    let raw = floats(&raw["embedding"]);
    assert!(cosine(&raw, &e) > 0.9999 && (unit_norm(&raw) - 1.0).abs() > 1e-3, "not normalised");
    // The official client (it asks for base64 and decodes it).
    let has_openai =
        Command::new("python3").args(["-c", "import openai"]).output().map(|o| o.status.success()).unwrap_or(false);
    if has_openai {
        let py = format!(
            "from openai import OpenAI; c = OpenAI(base_url='{}/v1', api_key='x'); \
             r = c.embeddings.create(model='emb', input=['Hello world', 'x'], dimensions=8); \
             print(len(r.data), len(r.data[0].embedding), r.data[0].embedding[0])",
            s.url
        );
        let out = Command::new("python3").args(["-c", &py]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(&v[..2], ["2", "8"], "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!((v[2].parse::<f64>().unwrap() - short[0]).abs() < 1e-4, "{text}");
    }
    // `qwick embed` on the command line: the same vectors.
    let out = Command::new(env!("CARGO_BIN_EXE_qwick"))
        .args(["embed", "--model", model(), "--input", "-", "--threads", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"Hello world\nA first text.\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(
        cosine(&floats(&lines[0]), &e) > 0.9999
            && cosine(&floats(&lines[1]), &floats(&batch["data"][0]["embedding"])) > 0.9999
    );
    // What this server does not do, and bad input.
    for (path, body) in [
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}]})),
        ("/api/generate", json!({"model": "emb", "prompt": "hi"})),
        ("/v1/rerank", json!({"query": "q", "documents": ["d"]})),
        ("/v1/embeddings", json!({"input": "x", "dimensions": 0})),
        ("/v1/embeddings", json!({"input": "x", "encoding_format": "int8"})),
        ("/v1/embeddings", json!({"input": []})),
        ("/v1/embeddings", json!({"input": [[1, 2], [99999999]]})),
        ("/v1/embeddings", json!({"input": "x", "frobnicate": 1})),
        // More inputs than the queue holds (--max-queue 8) could never all start.
        ("/v1/embeddings", json!({"input": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]})),
    ] {
        let (code, r) = s.post(path, &body);
        assert_eq!(code, 400, "{path} {body}: {r}");
    }
    s.wait_idle();
}

/// `--task rerank`: each document's score is the model's probability of "yes" against "no"
/// after Qwen3-Reranker's prompt (checked against the same probabilities read from a
/// generation server's prompt logprobs), ranked, cut to `top_n`.
#[test]
fn reranking_scores_yes_against_no() {
    let s = Server::start(&["--task", "rerank"]);
    let docs = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows through Paris."];
    let (code, r) =
        s.post("/v1/rerank", &json!({"query": "What is the capital of France?", "documents": docs, "top_n": 2}));
    assert_eq!(code, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let score = |x: &Value| x["relevance_score"].as_f64().unwrap();
    assert!(score(&results[0]) >= score(&results[1]) && (0.0..=1.0).contains(&score(&results[0])));
    assert_eq!(results[0]["document"]["text"], docs[results[0]["index"].as_u64().unwrap() as usize]);
    let (_, all) = s.post(
        "/v1/rerank",
        &json!({"query": "What is the capital of France?", "documents": docs.iter().map(|d| json!({"text": d})).collect::<Vec<_>>(),
                "return_documents": false}),
    );
    let all = all["results"].as_array().unwrap().clone();
    assert!(all.len() == 3 && all.iter().all(|x| x.get("document").is_none()));
    for bad in [
        json!({"query": "q", "documents": []}),
        json!({"documents": ["d"]}),
        json!({"query": "q", "documents": ["d"], "n": 1}),
    ] {
        assert_eq!(s.post("/v1/rerank", &bad).0, 400, "{bad}");
    }
    s.wait_idle();
    // The same probabilities from a generation server: the logprobs of "yes" and of "no"
    // appended to the prompt, as prompt tokens.
    let g = Server::start(&[]);
    let ids = |text: &str| {
        let (_, t) = g.post("/tokenize", &json!({"prompt": text}));
        t["tokens"].as_array().unwrap().clone()
    };
    let prefix = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n";
    let suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
    let (yes, no) = (ids("yes"), ids("no"));
    assert_eq!((yes.len(), no.len()), (1, 1));
    for x in &all {
        let doc = docs[x["index"].as_u64().unwrap() as usize];
        let body = format!(
            "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n<Query>: What is the capital of France?\n<Document>: {doc}"
        );
        let lp = |answer: &Value| {
            let prompt: Vec<Value> = [ids(prefix), ids(&body), ids(suffix), vec![answer.clone()]].concat();
            let (code, r) =
                g.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 1, "echo": true, "logprobs": 0}));
            assert_eq!(code, 200, "{r}");
            r["choices"][0]["logprobs"]["token_logprobs"][prompt.len() - 1].as_f64().unwrap()
        };
        let (py, pn) = (lp(&yes[0]).exp(), lp(&no[0]).exp());
        let want = py / (py + pn);
        assert!((score(x) - want).abs() < 0.02, "{doc}: {} against {want}", score(x));
    }
}

/// Without `--task`, a folder with sentence-transformers' last-token pooling (as Qwen3-Embedding
/// ships) is served as an embedding model; another pooling is refused by name.
#[test]
fn a_sentence_transformers_folder_is_served_as_embeddings() {
    let dir = common::process_dir("serve", "st-embedding");
    for e in std::fs::read_dir(model()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#;
    std::fs::write(dir.join("modules.json"), modules).unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let pooling = |last: bool| {
        let cfg = json!({"word_embedding_dimension": 64, "pooling_mode_cls_token": false,
                         "pooling_mode_mean_tokens": !last, "pooling_mode_lasttoken": last});
        std::fs::write(dir.join("1_Pooling/config.json"), cfg.to_string()).unwrap();
    };
    pooling(true);
    let s = Server::start_model(dir.to_str().unwrap(), &[], &[]);
    assert!(s.stderr.lock().unwrap().contains("task: Embed"), "{}", s.stderr.lock().unwrap());
    let (code, r) = s.post("/v1/embeddings", &json!({"input": "Hello"}));
    assert_eq!(code, 200, "{r}");
    drop(s);
    pooling(false);
    let out = Command::new(env!("CARGO_BIN_EXE_qwick"))
        .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("last token"), "{err}");
}

/// A server with a draft model: greedy completions alone and two at once (both speculate, at
/// `--spec-max-seqs 2`) give transformers' tokens; `/metrics` counts drafted and accepted
/// tokens (all kept: the draft is the model itself) and the cache is freed, the draft's too.
#[test]
fn a_draft_model_serves_the_same_tokens_and_is_counted() {
    let s = Server::start(&["--draft-model", model(), "--draft-tokens", "3", "--spec-max-seqs", "2"]);
    let cases = refs()["cases"].as_array().unwrap();
    let lens = [20usize, 13];
    let expected: Vec<String> =
        cases.iter().zip(lens).map(|(c, n)| detok(&s, &ids(&c["generated_ids"])[..n])).collect();
    for ((c, n), want) in cases.iter().zip(lens).zip(&expected) {
        assert_eq!(&completion_text(&s, &ids(&c["prompt_ids"]), n).0, want, "{} alone", c["name"]);
    }
    assert_eq!(together(&s, &cases[..2], &lens), expected);
    // A stop string inside a step's kept drafts ends the text where it starts.
    let text = &expected[0];
    let cut = text.char_indices().map(|(i, _)| i).find(|&i| i >= text.len() / 2).unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let want = &text[..text.find(&stop).unwrap()];
    let prompt = ids(&cases[0]["prompt_ids"]);
    let (code, r) =
        s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": [stop]}));
    assert_eq!(code, 200, "{r}");
    assert_eq!((r["choices"][0]["text"].as_str().unwrap(), &r["choices"][0]["finish_reason"]), (want, &json!("stop")));
    s.wait_idle();
    let drafted = s.metric("qwick_spec_decode_num_draft_tokens_total");
    assert!(drafted > 0.0);
    assert_eq!(s.metric("qwick_spec_decode_num_accepted_tokens_total"), drafted);
    assert_eq!(s.metric("qwick_spec_decode_acceptance_rate"), 1.0);
    assert_eq!(s.metric("qwick_kv_blocks_used"), 0.0);
    assert_eq!(s.metric("qwick_kv_cache_consistent"), 1.0);
}
