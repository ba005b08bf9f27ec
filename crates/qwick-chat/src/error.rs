use std::path::PathBuf;

/// Result type of this crate.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;

/// Errors from loading model files, tokenizing, rendering chat templates and resolving models.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or has an unexpected shape.
    #[error("invalid {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is missing, does not compile, or failed while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// A chat message is not valid (unknown role, missing content, ...).
    #[error("invalid chat message: {0}")]
    Message(String),
    /// A model could not be found or downloaded.
    #[error("{0}")]
    Model(String),
}

impl ChatError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Config { path: path.into(), message: message.to_string() }
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ChatError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ChatError::config(path, e))
}
