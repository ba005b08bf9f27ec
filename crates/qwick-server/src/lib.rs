//! qwick's HTTP server: the OpenAI API (chat completions with reasoning and tool calls,
//! completions, models, tokenize), the Responses API, the Anthropic Messages API, the Ollama API, health and Prometheus metrics, over the
//! engine's continuous-batching scheduler running on its own thread.
//!
//! Handlers turn requests into token ids and sampling parameters, submit them to the
//! [`qwick_engine::Engine`] and read each sequence's events from a tokio channel; a client that
//! goes away closes its channel and the engine frees the sequence at its next step.

mod anthropic;
mod app;
pub mod bench;
mod error;
mod gen;
mod metrics;
mod ollama;
mod openai;
mod pool;
mod responses;

pub use app::AppState;
pub use error::ApiError;
pub use metrics::Metrics;
pub use openai::{tools_for, ToolPlan};
pub use pool::Task;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use qwick_chat::ChatModel;
use qwick_engine::{Engine, Runners, SchedulerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on every route but `/health`.
    pub api_key: Option<String>,
    /// Most tokens (prompt + output) of a sequence; capped by the model and the KV cache.
    pub max_model_len: Option<usize>,
    pub scheduler: SchedulerConfig,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Origins whose pages may call the API (CORS); `*` for any; empty: no CORS headers.
    pub allowed_origins: Vec<String>,
    /// Request bodies (prompts) go into the request log too.
    pub log_prompts: bool,
    /// Stop on SIGINT / SIGTERM.
    pub handle_signals: bool,
    /// After a shutdown signal, how long requests in flight may go on before they are ended.
    pub shutdown_grace: Duration,
    /// What the server computes: text, embeddings or relevance scores.
    pub task: Task,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_model_len: None,
            scheduler: SchedulerConfig::default(),
            body_limit: 8 << 20,
            allowed_origins: Vec::new(),
            log_prompts: false,
            handle_signals: false,
            shutdown_grace: Duration::from_secs(10),
            task: Task::Generate,
        }
    }
}

async fn fallback(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

/// 200 while the engine serves; 503 once it has failed (requests would not be answered).
async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.engine.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics_route(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.engine.stats(), &state.model.name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The largest oversized body read before answering 413 (larger ones are refused unread).
const DRAIN_LIMIT: u64 = 64 << 20;

/// Checks the API key, limits the body, answers CORS, counts responses by status, and logs
/// each request (method, path, status, time; the body only with `log_prompts`).
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_string);
    let allowed = origin
        .as_deref()
        .filter(|o| state.allowed_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o.trim_end_matches('/'))));
    let mut resp = match (&method, allowed) {
        // A preflight from an allowed origin: no key needed, nothing run.
        (&axum::http::Method::OPTIONS, Some(_)) => StatusCode::NO_CONTENT.into_response(),
        _ => guarded(&state, req, next).await,
    };
    if path.starts_with("/v1/messages") && resp.status().as_u16() >= 400 {
        resp = anthropic::reshape_error(resp).await;
    }
    if let Some(o) = allowed.and_then(|o| HeaderValue::from_str(o).ok()) {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, x-api-key, anthropic-version"),
        );
    }
    state.metrics.request(resp.status().as_u16());
    if path != "/health" && path != "/metrics" {
        eprintln!("qwick: {method} {path} {} {:.0} ms", resp.status().as_u16(), t0.elapsed().as_secs_f64() * 1e3);
    }
    resp
}

/// Whether the request carries the key: `Authorization: Bearer KEY`, or `x-api-key: KEY` as
/// Anthropic's clients send it.
fn key_ok(expected: &str, headers: &axum::http::HeaderMap) -> bool {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
    let Some(got) = bearer.or_else(|| headers.get("x-api-key").and_then(|h| h.to_str().ok())) else {
        return false;
    };
    // Compare in time independent of where the strings differ.
    let (a, b) = (expected.as_bytes(), got.trim().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn guarded(state: &AppState, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let open = matches!(req.uri().path(), "/health" | "/");
        if !open && !key_ok(key, req.headers()) {
            return ApiError::unauthorized().into_response();
        }
    }
    // A server that embeds or reranks generates no text.
    const GENERATION: &[&str] = &[
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/v1/responses",
        "/v1/messages",
        "/api/chat",
        "/api/generate",
    ];
    let path = req.uri().path();
    if req.method() == axum::http::Method::POST && GENERATION.contains(&path) {
        if let Err(e) = pool::require_generation(state, path) {
            return e.into_response();
        }
    }
    // Read the whole body here, under the limit, so handlers see plain bytes.
    let (parts, body) = req.into_parts();
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {} bytes", state.body_limit),
        )
        .with_code("request_too_large")
    };
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if len > state.body_limit as u64 {
            // Read (and drop) what the client sends, within reason, so that it gets to read the
            // answer instead of a broken connection.
            if len <= DRAIN_LIMIT {
                use futures_util::StreamExt;
                let mut stream = body.into_data_stream();
                while let Some(Ok(_)) = stream.next().await {}
            }
            return too_big().into_response();
        }
    }
    let bytes = match axum::body::to_bytes(body, state.body_limit).await {
        Ok(b) => b,
        Err(_) => return too_big().into_response(),
    };
    if state.log_prompts && !bytes.is_empty() {
        eprintln!("qwick: {} {} body: {}", parts.method, parts.uri.path(), String::from_utf8_lossy(&bytes));
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// The chat page, embedded in the binary. It holds no data; its API calls carry the key the
/// user enters (the same `Authorization` as any client).
async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("page.html")).into_response()
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*model}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        // The same without the version prefix, as llama-server also answers them.
        .route("/models", get(openai::models))
        .route("/models/{*model}", get(openai::model))
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get).delete(responses::delete))
        .route("/v1/embeddings", post(pool::embeddings))
        .route("/embeddings", post(pool::embeddings))
        .route("/api/embed", post(pool::ollama_embed))
        .route("/api/embeddings", post(pool::ollama_embeddings))
        .route("/v1/rerank", post(pool::rerank))
        .route("/rerank", post(pool::rerank))
        .route("/v2/rerank", post(pool::rerank))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .fallback(fallback)
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed on this route")
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// A server running on its own thread.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Most tokens (prompt + output) per request, after the caps.
    pub max_model_len: usize,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Stops the server (as a signal would) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    /// Waits until the server stops (after a signal, with `handle_signals`).
    pub fn join(mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn shutdown_signal(stop_rx: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    let stop = async {
        let _ = stop_rx.await;
    };
    if !signals {
        return stop.await;
    }
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return stop.await,
        };
        tokio::select! {
            _ = stop => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = stop => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Starts the engine (with a runner made by `make_runner` on the engine thread) and the HTTP
/// server; returns once it listens.
pub fn start(
    opts: ServeOptions,
    info: ChatModel,
    make_runner: impl FnOnce() -> Result<Runners> + Send + 'static,
) -> Result<RunningServer> {
    let engine = Engine::start(make_runner, opts.scheduler.clone())?;
    let model_ctx = info.config.max_position_embeddings;
    let mut max_model_len = opts.max_model_len.unwrap_or(model_ctx).min(model_ctx).min(engine.capacity_tokens());
    if max_model_len < 2 {
        max_model_len = 2;
    }
    let state = Arc::new(AppState {
        engine,
        model: Arc::new(info),
        metrics: Metrics::default(),
        max_model_len,
        api_key: opts.api_key.clone().filter(|k| !k.is_empty()),
        body_limit: opts.body_limit,
        allowed_origins: opts.allowed_origins.clone(),
        log_prompts: opts.log_prompts,
        started: Instant::now(),
        responses: Default::default(),
        task: opts.task,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("qwick-http")
        .build()
        .context("starting the async runtime")?;
    let addr_s = format!("{}:{}", opts.host, opts.port);
    let listener =
        rt.block_on(tokio::net::TcpListener::bind(&addr_s)).with_context(|| format!("cannot listen on {addr_s}"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let signals = opts.handle_signals;
    let grace = opts.shutdown_grace;
    let thread = std::thread::Builder::new().name("qwick-server".into()).spawn(move || -> Result<()> {
        rt.block_on(async move {
            let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
            let st = state.clone();
            // After the signal: stop accepting; requests in flight get `grace` to finish, then end.
            tokio::spawn(async move {
                shutdown_signal(stop_rx, signals).await;
                let _ = sig_tx.send(true);
                tokio::time::sleep(grace).await;
                st.engine.abort_all();
            });
            let mut sig = sig_rx.clone();
            let app = router(state.clone());
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = sig.wait_for(|&s| s).await;
                })
                .await;
            state.engine.stop();
            served.context("serving")
        })?;
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(())
    })?;
    Ok(RunningServer { addr, max_model_len, stop_tx: Some(stop_tx), thread: Some(thread) })
}
