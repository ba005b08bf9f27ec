//! OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400: the request is malformed or a value is out of range.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).with_code("not_found")
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist."))
            .with_param("model")
            .with_code("model_not_found")
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Missing or incorrect API key: send the header `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
        )
        .with_code("invalid_api_key")
    }

    pub fn too_many_requests(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code("rate_limit_exceeded")
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

type JsonError = serde_path_to_error::Error<serde_json::Error>;

fn deserialize<T: DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de)
}

/// Parses a JSON body into `T`: malformed JSON and wrong types are 400s naming the field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    deserialize(body).map_err(json_error)
}

/// [`parse_json`] for a `T` with a `#[serde(flatten)]` field of type `F`, answering as if `F`'s
/// fields were `T`'s own. serde reads a flattened struct's fields once the whole object is read,
/// where an error has lost the field's name and place (and a repeated field is not noticed), so
/// `F` is also read from the body on its own: its error is the answer when `T` parsed, or when it
/// comes before where `T` failed (the first error in the body, as for `T`'s own fields), or at the
/// same place naming a field (an error of `F`'s last field is placed at the end of the object, as
/// `T`'s error about the flattened fields is).
pub fn parse_json_flattened<T: DeserializeOwned, F: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let at = |e: &JsonError| (e.inner().line(), e.inner().column());
    match (deserialize::<T>(body), deserialize::<F>(body)) {
        (Ok(v), Ok(_)) => Ok(v),
        (Ok(_), Err(f)) => Err(json_error(f)),
        (Err(t), Err(f)) if at(&f) < at(&t) || (at(&f) == at(&t) && f.path().iter().next().is_some()) => {
            Err(json_error(f))
        }
        (Err(t), _) => Err(json_error(t)),
    }
}

/// A 400 for a body that does not parse, naming the field where it can.
fn json_error(e: JsonError) -> ApiError {
    let mut path = e.path().to_string();
    let inner = e.into_inner();
    // A missing field is named in the message, not in the path.
    let text = inner.to_string();
    if let Some(field) = text.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
        path = if path == "." || path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
    }
    let malformed = inner.is_syntax() || inner.is_eof();
    let what = if malformed { "malformed JSON" } else { "invalid request" };
    // serde_path_to_error writes "?" for a position it cannot name.
    if malformed || path == "?" {
        path.clear();
    }
    let mut err = ApiError::bad_request(if path == "." || path.is_empty() {
        format!("{what}: {inner}")
    } else {
        format!("{what}: {path}: {inner}")
    });
    if path != "." && !path.is_empty() {
        err = err.with_param(path);
    }
    err
}
