//! The Hugging Face cache and Hub: a Hub id (`owner/name`, optionally `owner/name@revision`) is
//! looked up in the standard Hugging Face cache and, unless offline, downloaded into it; so is one
//! GGUF file of a Hub repository picked by its quantization tag (see [`TaggedId`]).
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out as
//! `models--owner--name/refs/<revision>` (holding a commit hash) and
//! `models--owner--name/snapshots/<hash>/<files>`, so models fetched with `huggingface-cli download`
//! or transformers are found, and what qwick downloads is seen by them.

use super::names::{gguf_tags, local_folder, pick_gguf, HubId, TaggedId};
use crate::error::{ChatError, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files a model folder must hold besides its weights.
pub const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files downloaded when the Hub has them.
pub const OPTIONAL_FILES: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];
/// Single-file weights.
pub const WEIGHTS: &str = "model.safetensors";
/// Index of sharded weights.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The files under `dir` (a snapshot), links followed, as relative paths written with `/`,
/// sorted; sub-folders are read up to four levels deep.
pub fn snapshot_files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            let path = entry.path();
            let rel = format!("{prefix}{name}");
            if path.is_dir() {
                if depth < 4 && !name.starts_with('.') {
                    walk(&path, &format!("{rel}/"), depth + 1, out);
                }
            } else if path.is_file() {
                out.push(rel);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, "", 0, &mut files);
    files.sort();
    files
}

/// The Hugging Face hub cache folder chosen by environment variables read through `env`:
/// `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$HOME/.cache/huggingface/hub` (`None` when none of them is set).
pub fn cache_dir_from(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    set("HF_HUB_CACHE")
        .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .or_else(|| set("HF_HOME").map(|h| Path::new(&h).join("hub")))
        .or_else(|| set("HOME").or_else(|| set("USERPROFILE")).map(|h| Path::new(&h).join(".cache/huggingface/hub")))
}

/// The Hugging Face hub cache folder of this process's environment (see [`cache_dir_from`]).
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|k| std::env::var(k).ok()).ok_or_else(|| {
        ChatError::Model("cannot locate the Hugging Face cache: set HF_HUB_CACHE, HF_HOME or HOME".into())
    })
}

/// Whether `HF_HUB_OFFLINE` is set to a true value (`1`, `true`, `yes`, `on`), as read through `env`.
pub fn offline_from(env: impl Fn(&str) -> Option<String>) -> bool {
    env("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// How models are found and fetched: the cache folder, whether to stay offline, and the Hub to
/// download from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hub {
    /// The Hugging Face hub cache folder.
    pub cache_dir: PathBuf,
    /// Never download (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Address of the Hub; `None` for `https://huggingface.co` (`HF_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Access token for gated models; `None` reads the token file next to the cache
    /// (`$HF_HOME/token`, written by `huggingface-cli login`).
    pub token: Option<String>,
    /// Show a progress bar per file while downloading.
    pub progress: bool,
}

impl Hub {
    /// Online access to the Hugging Face Hub with the given cache folder.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: cache_dir.into(), offline: false, endpoint: None, token: None, progress: true }
    }

    /// Settings from the environment: the cache folder (see [`cache_dir_from`]),
    /// `HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_TOKEN`.
    pub fn from_env() -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(Self {
            offline: offline_from(env),
            endpoint: env("HF_ENDPOINT"),
            token: env("HF_TOKEN"),
            ..Self::new(cache_dir()?)
        })
    }

    /// Resolves `spec` to a model folder or GGUF file: a local folder or GGUF file is returned as
    /// is; a Hub id is looked up in the cache, and when it is missing or incomplete it is
    /// downloaded there (unless offline, or built without the `download` feature: then the error
    /// says how to get it); a Hub id with a tag ([`TaggedId`]) gives the first file of the GGUF
    /// model the tag picks, found and downloaded the same way.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf> {
        if let Some(dir) = local_folder(spec)? {
            return Ok(dir);
        }
        if let Some(tagged) = TaggedId::parse(spec) {
            return self.resolve_tagged(&tagged);
        }
        let id = HubId::parse(spec).ok_or_else(|| ChatError::Model(format!("bad model id {spec:?}")))?;
        let snapshot = cached_snapshot(&self.cache_dir, &id);
        let missing = match &snapshot {
            Some(snapshot) => match missing_files(snapshot)? {
                missing if missing.is_empty() => return Ok(snapshot.clone()),
                missing => missing,
            },
            None => vec!["the whole model".to_string()],
        };
        if self.offline || !cfg!(feature = "download") {
            let files = snapshot.as_deref().map(snapshot_files).unwrap_or_default();
            let tags = gguf_tags(&files);
            if !files.iter().any(|f| f == "config.json") && !tags.is_empty() {
                return Err(gguf_repo_error(&id, &tags, "in the Hugging Face cache"));
            }
            return Err(ChatError::Model(format!(
                "model {} is not in the Hugging Face cache at {} (missing: {}) and {}. \
                 Download it first, e.g. `huggingface-cli download {}{}` (or `hf download`), \
                 or copy the model folder (config.json, tokenizer.json, tokenizer_config.json, \
                 generation_config.json, *.safetensors) to this machine and pass its path",
                id.repo,
                self.cache_dir.display(),
                missing.join(", "),
                self.why_not_downloading(),
                id.repo,
                id.revision_flag(),
            )));
        }
        download(self, &id)
    }

    /// Why a missing model is not downloaded (offline, or a build without the feature).
    fn why_not_downloading(&self) -> &'static str {
        if self.offline {
            "HF_HUB_OFFLINE is set"
        } else {
            "this build cannot download (feature \"download\" is off)"
        }
    }

    /// The first file of the GGUF model `t` picks: from the cache when every part is there, else
    /// downloaded (the repository's file list from the Hub API, then the parts).
    fn resolve_tagged(&self, t: &TaggedId) -> Result<PathBuf> {
        let snapshot = cached_snapshot(&self.cache_dir, &t.id);
        let files = snapshot.as_deref().map(snapshot_files).unwrap_or_default();
        let place = format!("the Hugging Face cache at {}", self.cache_dir.display());
        let found = pick_gguf(&files, &t.tag, &place)?;
        if let (Some(snapshot), Some(model)) = (&snapshot, &found) {
            if model.missing.is_empty() {
                return Ok(snapshot.join(model.first()));
            }
        }
        #[cfg(feature = "download")]
        if !self.offline {
            return download_tagged(self, t);
        }
        let cached = match (&snapshot, &found) {
            (_, Some(model)) => format!("the cache has {} but lacks {}", model.first(), model.missing.join(", ")),
            (None, None) => "the repository is not in the cache".to_string(),
            (Some(_), None) => match gguf_tags(&files) {
                tags if tags.is_empty() => "its cached copy holds no GGUF file".to_string(),
                tags => format!("the cache holds it for other tags: {}", tags.join(", ")),
            },
        };
        Err(ChatError::Model(format!(
            "no GGUF file of {} for tag {} in the Hugging Face cache at {} ({cached}) and {}. \
             Download it first, e.g. `{}` (or `hf download`), or pass the path of a GGUF file",
            t.id.spec(),
            t.tag,
            self.cache_dir.display(),
            self.why_not_downloading(),
            t.download_command(),
        )))
    }
}

/// A Hub id without a tag naming a repository of GGUF files: how to pick one.
fn gguf_repo_error(id: &HubId, tags: &[String], place: &str) -> ChatError {
    ChatError::Model(format!(
        "{} {place} holds GGUF files, not a safetensors model: pick one by its quantization tag, \
         e.g. `{}:{}` (tags: {})",
        id.repo,
        id.spec(),
        tags[0],
        tags.join(", ")
    ))
}

/// The snapshot folder of `id` in the cache, if its revision is there: `refs/<revision>` names the
/// commit, or the revision is itself a commit with a snapshot folder.
pub fn cached_snapshot(cache_dir: &Path, id: &HubId) -> Option<PathBuf> {
    let repo = cache_dir.join(id.cache_folder());
    let commit = std::fs::read_to_string(repo.join("refs").join(&id.revision))
        .ok()
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| id.revision.clone());
    let snapshot = repo.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// Files a model folder lacks: required files, and the weights (the single file, or the index and
/// every shard it lists).
pub fn missing_files(dir: &Path) -> Result<Vec<String>> {
    let mut missing: Vec<String> =
        REQUIRED_FILES.iter().filter(|f| !dir.join(f).is_file()).map(|f| f.to_string()).collect();
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        missing.extend(shards(&index)?.into_iter().filter(|s| !dir.join(s).is_file()));
    } else if !dir.join(WEIGHTS).is_file() {
        missing.push(format!("{WEIGHTS} (or {WEIGHTS_INDEX} and its shards)"));
    }
    Ok(missing)
}

/// The shard files named in a `model.safetensors.index.json`.
fn shards(index: &Path) -> Result<BTreeSet<String>> {
    let json = crate::error::read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ChatError::config(index, "no \"weight_map\" object"))?;
    map.values()
        .map(|v| {
            v.as_str()
                .filter(|s| !s.contains("..") && !s.starts_with('/'))
                .map(str::to_string)
                .ok_or_else(|| ChatError::config(index, format!("bad shard name {v}")))
        })
        .collect()
}

/// A client of the Hub with the cache, token, endpoint and progress bars of `hub`.
#[cfg(feature = "download")]
fn hub_api(hub: &Hub) -> std::result::Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let cache = hf_hub::Cache::new(hub.cache_dir.clone());
    let token = hub.token.clone().or_else(|| cache.token());
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(hub.progress).with_token(token);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    builder.build()
}

/// Whether the Hub answered 404.
#[cfg(feature = "download")]
fn not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    matches!(e, hf_hub::api::sync::ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)))
}

#[cfg(feature = "download")]
fn download(hub: &Hub, id: &HubId) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiError;
    use hf_hub::{Repo, RepoType};

    let fail = |file: &str, e: ApiError| {
        ChatError::Model(format!(
            "downloading {file} of {} ({}) into {} failed: {e}. Check the id and the network, or \
             download the model with `huggingface-cli download {}` and set HF_HUB_OFFLINE=1",
            id.repo,
            id.revision,
            hub.cache_dir.display(),
            id.repo
        ))
    };
    let api = hub_api(hub).map_err(|e| fail("(setup)", e))?;
    let repo = api.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone()));
    let config = match repo.get("config.json") {
        Ok(config) => config,
        Err(e) if not_found(&e) => {
            // A repository of GGUF files has no config.json: say how to pick one.
            let files: Vec<String> =
                repo.info().map(|i| i.siblings.into_iter().map(|s| s.rfilename).collect()).unwrap_or_default();
            let tags = gguf_tags(&files);
            return Err(if tags.is_empty() {
                fail("config.json", e)
            } else {
                gguf_repo_error(id, &tags, "on the Hub")
            });
        }
        Err(e) => return Err(fail("config.json", e)),
    };
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ChatError::Model("downloaded file has no folder".into()))?;
    repo.get("tokenizer.json").map_err(|e| fail("tokenizer.json", e))?;
    for file in OPTIONAL_FILES {
        match repo.get(file) {
            Err(e) if not_found(&e) => {}
            other => {
                other.map_err(|e| fail(file, e))?;
            }
        }
    }
    match repo.get(WEIGHTS_INDEX) {
        Ok(index) => {
            for shard in shards(&index)? {
                repo.get(&shard).map_err(|e| fail(&shard, e))?;
            }
        }
        Err(e) if not_found(&e) => {
            repo.get(WEIGHTS).map_err(|e| fail(WEIGHTS, e))?;
        }
        Err(e) => return Err(fail(WEIGHTS_INDEX, e)),
    }
    let missing = missing_files(&snapshot)?;
    if !missing.is_empty() {
        return Err(ChatError::Model(format!(
            "downloaded {} into {} but it still lacks {}",
            id.repo,
            snapshot.display(),
            missing.join(", ")
        )));
    }
    Ok(snapshot)
}

/// Downloads the GGUF model `t` picks: the repository's file list from the Hub API, then every
/// part of the model into the cache (with progress bars); returns the first part.
#[cfg(feature = "download")]
fn download_tagged(hub: &Hub, t: &TaggedId) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiError;
    use hf_hub::{Repo, RepoType};

    let id = &t.id;
    let fail = |what: &str, e: ApiError| {
        ChatError::Model(format!(
            "{what} of {} ({}) for the cache at {} failed: {e}. Check the id and the network, or download \
             it with `{}` and set HF_HUB_OFFLINE=1",
            id.repo,
            id.revision,
            hub.cache_dir.display(),
            t.download_command()
        ))
    };
    let api = hub_api(hub).map_err(|e| fail("setting up the download", e))?;
    let repo = api.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone()));
    let files: Vec<String> = match repo.info() {
        Ok(info) => info.siblings.into_iter().map(|s| s.rfilename).collect(),
        Err(e) if not_found(&e) => {
            return Err(ChatError::Model(format!(
                "the Hugging Face Hub has no model {} (revision {}), or it is private or gated: check the \
                 id, and for a gated model set HF_TOKEN or run `huggingface-cli login`",
                id.repo, id.revision
            )))
        }
        Err(e) => return Err(fail("listing the files", e)),
    };
    let place = format!("{} on the Hub", id.spec());
    let Some(model) = pick_gguf(&files, &t.tag, &place)? else {
        let tags = gguf_tags(&files);
        return Err(ChatError::Model(if tags.is_empty() {
            format!(
                "{place} holds no GGUF file, so the tag {} picks nothing; without a tag ({}) qwick loads \
                 its safetensors weights",
                t.tag,
                id.spec()
            )
        } else {
            format!("no GGUF file of {place} matches the tag {}; its tags: {}", t.tag, tags.join(", "))
        }));
    };
    if !model.missing.is_empty() {
        return Err(ChatError::Model(format!(
            "{place} has {} but not {} of the same split model",
            model.first(),
            model.missing.join(", ")
        )));
    }
    let mut paths = Vec::with_capacity(model.parts.len());
    for part in &model.parts {
        paths.push(repo.get(part).map_err(|e| fail(&format!("downloading {part}"), e))?);
    }
    Ok(paths.swap_remove(0))
}

#[cfg(not(feature = "download"))]
fn download(_hub: &Hub, id: &HubId) -> Result<PathBuf> {
    Err(ChatError::Model(format!("cannot download {}: built without the \"download\" feature", id.repo)))
}
