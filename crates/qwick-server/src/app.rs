//! What the handlers share: the state, and streamed responses.

use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use qwick_chat::ChatModel;
use qwick_engine::Engine;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::Sender;

/// What handlers share.
pub struct AppState {
    pub engine: Engine,
    pub model: Arc<ChatModel>,
    pub metrics: Metrics,
    pub max_model_len: usize,
    pub api_key: Option<String>,
    pub body_limit: usize,
    pub allowed_origins: Vec<String>,
    pub log_prompts: bool,
    pub started: Instant,
    /// Responses kept for `previous_response_id` (the Responses API).
    pub responses: crate::responses::Store,
    /// What the server computes.
    pub task: crate::pool::Task,
}

fn not_found_route() -> ApiError {
    ApiError::not_found("no such route")
}

/// A streamed response whose body `produce` writes through a channel; when the client goes
/// away, sends fail and `produce` should return.
pub fn streamed<F, Fut>(content_type: &'static str, produce: F) -> Response
where
    F: FnOnce(Sender<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(produce(tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| not_found_route().into_response())
}

pub fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Sender<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    streamed("text/event-stream", produce)
}
