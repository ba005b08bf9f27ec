//! Where models come from: a local folder or GGUF file, a Hugging Face Hub id (`owner/name`,
//! optionally `owner/name@revision`) looked up in the Hugging Face cache and, unless offline,
//! downloaded into it, one GGUF file of a Hub repository picked by its quantization tag as
//! llama.cpp's `-hf` takes it (`owner/name:Q4_K_M`, see [`TaggedId`]), or a model of the local
//! Ollama store (`ollama:qwen3:8b`); and a listing of the models the cache and the store hold
//! (what `qwick list` shows).
//!
//! [`resolve_model`] takes any of these. The pieces: how models are named (Hub ids, tags and the
//! GGUF files they pick, local paths), the Hugging Face cache and Hub ([`Hub`]), and the Ollama
//! store with the listing ([`ollama_model`], [`hf_cache_models`], [`ollama_store_models`]).

mod hub;
mod names;
mod store;

pub use hub::{
    cache_dir, cache_dir_from, cached_snapshot, missing_files, offline_from, snapshot_files, Hub, OPTIONAL_FILES,
    REQUIRED_FILES, WEIGHTS, WEIGHTS_INDEX,
};
pub use names::{
    gguf_models, gguf_name_has_tag, gguf_tag, gguf_tags, pick_gguf, GgufParts, HubId, TaggedId, OLLAMA_PREFIX,
};
pub use store::{
    hf_cache_models, ollama_dir, ollama_dir_from, ollama_model, ollama_names, ollama_store_models, resolve_ollama,
    OllamaModel, OllamaName, StoredModel, OLLAMA_LIBRARY, OLLAMA_REGISTRY,
};

use crate::error::Result;
use names::local_folder;
use std::path::PathBuf;

/// Resolves a model given on the command line or in an API request to a local folder or GGUF
/// file: a folder or GGUF file is itself; `ollama:NAME` is a model of the local Ollama store (its
/// GGUF blob, see [`resolve_ollama`]); a Hub id, with or without a tag, goes through
/// [`Hub::from_env`] and [`Hub::resolve`].
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if let Some(dir) = local_folder(spec)? {
        return Ok(dir);
    }
    if let Some(name) = spec.strip_prefix(OLLAMA_PREFIX) {
        return resolve_ollama(&ollama_dir()?, name);
    }
    Hub::from_env()?.resolve(spec)
}
