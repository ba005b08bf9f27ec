//! The models on this machine: the local Ollama store (`ollama:NAME` model specs) and a listing of
//! what it and the Hugging Face cache hold ([`hf_cache_models`], [`ollama_store_models`]: what
//! `qwick list` shows).
//!
//! The Ollama store is `$OLLAMA_MODELS`, else `~/.ollama/models`: a model `NAME:TAG` has a
//! manifest at `manifests/<host>/<namespace>/<model>/<tag>` (host `registry.ollama.ai` and
//! namespace `library` unless the name gives them: `qwen3:8b`, `user/model:tag`,
//! `hf.co/owner/repo:tag`), a JSON list of layers each naming a blob by its digest; blobs are at
//! `blobs/sha256-<hex>`. The model layer's blob is a GGUF file, used where it is (nothing is
//! copied); the params, template and system layers are read into [`OllamaModel`].

use super::hub::{missing_files, snapshot_files};
use super::names::{gguf_models, gguf_tag, pick_gguf, HubId, TaggedId, OLLAMA_PREFIX};
use crate::error::{ChatError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The registry of names without a host.
pub const OLLAMA_REGISTRY: &str = "registry.ollama.ai";
/// The namespace of names without one.
pub const OLLAMA_LIBRARY: &str = "library";

/// Media types of the manifest layers qwick reads.
const MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const PARAMS_LAYER: &str = "application/vnd.ollama.image.params";
const TEMPLATE_LAYER: &str = "application/vnd.ollama.image.template";
const SYSTEM_LAYER: &str = "application/vnd.ollama.image.system";
const ADAPTER_LAYER: &str = "application/vnd.ollama.image.adapter";

/// The Ollama store chosen by environment variables read through `env`: `OLLAMA_MODELS`, else
/// `$HOME/.ollama/models` (`None` when neither is set).
pub fn ollama_dir_from(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    set("OLLAMA_MODELS")
        .map(PathBuf::from)
        .or_else(|| set("HOME").or_else(|| set("USERPROFILE")).map(|h| Path::new(&h).join(".ollama/models")))
}

/// The Ollama store of this process's environment (see [`ollama_dir_from`]).
pub fn ollama_dir() -> Result<PathBuf> {
    ollama_dir_from(|k| std::env::var(k).ok())
        .ok_or_else(|| ChatError::Model("cannot locate the Ollama store: set OLLAMA_MODELS or HOME".into()))
}

/// A parsed Ollama model name: `[host/][namespace/]model[:tag]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OllamaName {
    /// The registry, `registry.ollama.ai` unless given (`hf.co`, ...).
    pub host: String,
    /// `library` unless given.
    pub namespace: String,
    /// The model.
    pub model: String,
    /// `latest` unless given.
    pub tag: String,
}

impl OllamaName {
    /// Parses a name as Ollama takes it (`qwen3`, `qwen3:8b`, `user/model:tag`,
    /// `hf.co/owner/repo:Q4_K_M`); `None` if it is not of that form.
    pub fn parse(name: &str) -> Option<Self> {
        let (path, tag) = match name.rsplit_once(':') {
            Some((path, tag)) => (path, tag),
            None => (name, "latest"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts[..] {
            [model] => (OLLAMA_REGISTRY, OLLAMA_LIBRARY, model),
            [namespace, model] => (OLLAMA_REGISTRY, namespace, model),
            [host, namespace, model] => (host, namespace, model),
            _ => return None,
        };
        [host, namespace, model, tag].iter().all(|p| name_part_ok(p)).then(|| Self {
            host: host.to_string(),
            namespace: namespace.to_string(),
            model: model.to_string(),
            tag: tag.to_string(),
        })
    }

    /// The name as `ollama list` shows it: host and namespace only where they are not the
    /// defaults (`qwen3:8b`, `user/model:tag`, `hf.co/owner/repo:tag`).
    pub fn short(&self) -> String {
        match (self.host.as_str(), self.namespace.as_str()) {
            (OLLAMA_REGISTRY, OLLAMA_LIBRARY) => format!("{}:{}", self.model, self.tag),
            (OLLAMA_REGISTRY, ns) => format!("{ns}/{}:{}", self.model, self.tag),
            (host, ns) => format!("{host}/{ns}/{}:{}", self.model, self.tag),
        }
    }

    /// What `--model` takes: `ollama:` and the short name.
    pub fn spec(&self) -> String {
        format!("{OLLAMA_PREFIX}{}", self.short())
    }

    /// The manifest's path in `store`, as Ollama writes it.
    pub fn manifest_path(&self, store: &Path) -> PathBuf {
        store.join("manifests").join(&self.host).join(&self.namespace).join(&self.model).join(&self.tag)
    }
}

/// A part of an Ollama name: letters, digits, `-`, `_` and `.`, not starting with `.`.
fn name_part_ok(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A model of the Ollama store.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaModel {
    /// Its name.
    pub name: OllamaName,
    /// Its manifest.
    pub manifest: PathBuf,
    /// The GGUF file of its weights (a blob of the store).
    pub gguf: PathBuf,
    /// The size of that file in bytes.
    pub bytes: u64,
    /// Its default parameters (`temperature`, `top_k`, `top_p`, `repeat_penalty`, `stop`,
    /// `num_ctx`, ...), from the params layer.
    pub params: Option<Map<String, Value>>,
    /// Its prompt template (Go template text), from the template layer.
    pub template: Option<String>,
    /// Its system prompt, from the system layer.
    pub system: Option<String>,
    /// Blobs of LoRA adapters it applies (which qwick does not).
    pub adapters: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layer {
    media_type: String,
    digest: String,
}

/// Reads the model `name` (without the `ollama:` prefix) of the store at `store`.
pub fn ollama_model(store: &Path, name: &str) -> Result<OllamaModel> {
    let parsed = OllamaName::parse(name).ok_or_else(|| {
        ChatError::Model(format!(
            "{name:?} is not an Ollama model name: expected MODEL[:TAG], NAMESPACE/MODEL[:TAG] or \
             HOST/NAMESPACE/MODEL[:TAG] (letters, digits, '-', '_', '.'), e.g. ollama:qwen3:8b"
        ))
    })?;
    let manifest = find_manifest(store, &parsed).ok_or_else(|| missing_model_error(store, &parsed))?;
    let text = std::fs::read_to_string(&manifest).map_err(|e| ChatError::io(&manifest, e))?;
    let layers = serde_json::from_str::<Manifest>(&text)
        .map_err(|e| ChatError::config(&manifest, format!("not an Ollama manifest: {e}")))?
        .layers;
    let spec = parsed.spec();
    let blob = |layer: &Layer| -> Result<PathBuf> {
        let path = blob_path(store, &layer.digest)
            .ok_or_else(|| ChatError::config(&manifest, format!("bad digest {:?}", layer.digest)))?;
        if !path.is_file() {
            return Err(ChatError::Model(format!(
                "{spec}: blob {} ({}) named by {} is missing from the store; pull the model again \
                 (`ollama pull {}`)",
                path.display(),
                layer.media_type,
                manifest.display(),
                parsed.short()
            )));
        }
        Ok(path)
    };
    let layer = |media_type: &str| layers.iter().find(|l| l.media_type == media_type);
    // The blob of a layer and its text, if the manifest has that layer.
    let text_of = |media_type: &str| -> Result<Option<(PathBuf, String)>> {
        let Some(layer) = layer(media_type) else { return Ok(None) };
        let path = blob(layer)?;
        let text = std::fs::read_to_string(&path).map_err(|e| ChatError::io(&path, e))?;
        Ok(Some((path, text)))
    };

    let model = layer(MODEL_LAYER).ok_or_else(|| {
        ChatError::config(&manifest, format!("{spec} has no model layer ({MODEL_LAYER}); qwick needs its GGUF weights"))
    })?;
    let gguf = blob(model)?;
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(&gguf).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF";
    if !is_gguf {
        return Err(ChatError::Model(format!(
            "{spec}: its weights {} are not a GGUF file; qwick reads Ollama models whose weights are GGUF",
            gguf.display()
        )));
    }
    let bytes = std::fs::metadata(&gguf).map_err(|e| ChatError::io(&gguf, e))?.len();
    let params = match text_of(PARAMS_LAYER)? {
        None => None,
        Some((path, text)) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Some(map),
            _ => return Err(ChatError::config(path, format!("the params of {spec} are not a JSON object"))),
        },
    };
    let template = text_of(TEMPLATE_LAYER)?.map(|(_, text)| text);
    let system = text_of(SYSTEM_LAYER)?.map(|(_, text)| text);
    let adapters = layers.iter().filter(|l| l.media_type == ADAPTER_LAYER).map(blob).collect::<Result<_>>()?;
    Ok(OllamaModel { name: parsed, manifest, gguf, bytes, params, template, system, adapters })
}

/// The GGUF file of the Ollama model `name` (without the `ollama:` prefix) in `store`; an error
/// when it is missing, is not GGUF, or applies LoRA adapters.
pub fn resolve_ollama(store: &Path, name: &str) -> Result<PathBuf> {
    let model = ollama_model(store, name)?;
    if !model.adapters.is_empty() {
        return Err(ChatError::Model(format!(
            "{} applies a LoRA adapter ({ADAPTER_LAYER}), which qwick does not; use a model without one",
            model.name.spec()
        )));
    }
    Ok(model.gguf)
}

/// The blob of a digest `sha256:<64 hex digits>`: `blobs/sha256-<hex>` (or `blobs/sha256:<hex>`,
/// as early Ollama versions named them).
fn blob_path(store: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let blobs = store.join("blobs");
    let path = blobs.join(format!("sha256-{hex}"));
    let old = blobs.join(format!("sha256:{hex}"));
    Some(if !path.exists() && old.is_file() { old } else { path })
}

/// The manifest of `name`: its path as written, else a path matching it without regard to case.
fn find_manifest(store: &Path, name: &OllamaName) -> Option<PathBuf> {
    let exact = name.manifest_path(store);
    if exact.is_file() {
        return Some(exact);
    }
    let mut dir = store.join("manifests");
    for part in [&name.host, &name.namespace, &name.model, &name.tag] {
        let entry = std::fs::read_dir(&dir).ok()?.flatten().find(|e| e.file_name().eq_ignore_ascii_case(part))?;
        dir = entry.path();
    }
    dir.is_file().then_some(dir)
}

/// The error for a model missing from the store: where it was looked for, and what is there.
fn missing_model_error(store: &Path, name: &OllamaName) -> ChatError {
    const SHOWN: usize = 10;
    let have = if !store.is_dir() {
        "the store folder does not exist".to_string()
    } else {
        match ollama_names(store) {
            names if names.is_empty() => "the store holds no models".to_string(),
            names => {
                let more = names.len().saturating_sub(SHOWN);
                let list: Vec<String> = names.iter().take(SHOWN).map(OllamaName::short).collect();
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                format!("the store has {}{more}", list.join(", "))
            }
        }
    };
    ChatError::Model(format!(
        "Ollama model {} is not in the store at {} (no manifest {}; {have}). Pull it with `ollama pull {}`, \
         or set OLLAMA_MODELS to the store that holds it",
        name.short(),
        store.display(),
        name.manifest_path(store).display(),
        name.short()
    ))
}

/// Every model of the store at `store` (a manifest at `manifests/<host>/<namespace>/<model>/<tag>`),
/// sorted by name.
pub fn ollama_names(store: &Path) -> Vec<OllamaName> {
    let subdirs = |dir: &Path| -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries.flatten().filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path()))).collect()
    };
    let mut names = Vec::new();
    for (host, h) in subdirs(&store.join("manifests")) {
        for (namespace, n) in subdirs(&h) {
            for (model, m) in subdirs(&n) {
                for (tag, t) in subdirs(&m) {
                    let name = OllamaName {
                        host: host.clone(),
                        namespace: namespace.clone(),
                        model: model.clone(),
                        tag: tag.clone(),
                    };
                    if t.is_file() && [&host, &namespace, &model, &tag].iter().all(|p| name_part_ok(p)) {
                        names.push(name);
                    }
                }
            }
        }
    }
    names.sort_by_key(OllamaName::short);
    names
}

/// A model found in the Hugging Face cache or the Ollama store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredModel {
    /// What `--model` takes to load it: a Hub id (`owner/name`, `owner/name:TAG`), an Ollama spec
    /// (`ollama:qwen3:8b`) or, where no name picks it alone, its path.
    pub spec: String,
    /// Where it was found: `huggingface` or `ollama`.
    pub store: &'static str,
    /// `safetensors` or `gguf`.
    pub format: &'static str,
    /// The weights' type: config.json's dtype, or the GGUF file type (`Q4_K_M`, ...).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The architecture: config.json's `model_type`, or GGUF `general.architecture`.
    pub arch: Option<String>,
    /// Size of the weights in bytes.
    pub bytes: u64,
    /// The model folder, the (first) GGUF file, or for a broken Ollama model its manifest.
    pub path: PathBuf,
    /// Why it cannot be loaded as it is, when it cannot (missing files, a broken blob, ...).
    pub problem: Option<String>,
}

/// The size of a file (links followed), 0 when it cannot be read.
fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `(file type, architecture, problem)` of a GGUF file, read from its header.
fn gguf_header(path: &Path) -> (Option<String>, Option<String>, Option<String>) {
    match qwick_gguf::GgufFile::open(path) {
        Ok(g) => {
            let kind = g
                .get_u64("general.file_type")
                .ok()
                .flatten()
                .and_then(|t| u32::try_from(t).ok())
                .and_then(qwick_gguf::file_type_name)
                .map(str::to_string);
            let arch = g.get_str("general.architecture").ok().flatten().map(str::to_string);
            (kind, arch, None)
        }
        Err(e) => (None, None, Some(format!("unreadable GGUF: {e:#}"))),
    }
}

/// The models of the Hugging Face cache at `cache`: for every `models--owner--name` folder and
/// every revision in its `refs/` (a commit listed once, under `main` when that names it), the
/// safetensors model of the snapshot (where it has a config.json) and each GGUF model in it.
/// Sorted by spec.
pub fn hf_cache_models(cache: &Path) -> Vec<StoredModel> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache) else { return out };
    for entry in entries.flatten() {
        let Some(folder) = entry.file_name().to_str().map(str::to_string) else { continue };
        let Some(repo) = folder.strip_prefix("models--").map(|r| r.replace("--", "/")) else { continue };
        let root = entry.path();
        let mut refs = snapshot_files(&root.join("refs"));
        // `main` first, so that a commit it names is listed under it.
        refs.sort_by_key(|r| (r != "main", r.clone()));
        let mut commits = std::collections::BTreeSet::new();
        for revision in refs {
            let Ok(commit) = std::fs::read_to_string(root.join("refs").join(&revision)) else { continue };
            let snapshot = root.join("snapshots").join(commit.trim());
            if commit.trim().is_empty() || !snapshot.is_dir() || !commits.insert(commit.trim().to_string()) {
                continue;
            }
            let id = HubId { repo: repo.clone(), revision };
            // A repository id qwick cannot take (no owner, say) is listed by its path.
            let named = HubId::parse(&id.spec()).is_some();
            snapshot_models(&id, named, &snapshot, &mut out);
        }
    }
    out.sort_by(|a, b| a.spec.cmp(&b.spec));
    out
}

/// The models of one snapshot of `id` (see [`hf_cache_models`]).
fn snapshot_models(id: &HubId, named: bool, snapshot: &Path, out: &mut Vec<StoredModel>) {
    let files = snapshot_files(snapshot);
    if snapshot.join("config.json").is_file() {
        let config = crate::error::read_json(&snapshot.join("config.json")).ok();
        let field = |k: &str| config.as_ref().and_then(|c| c.get(k)).and_then(Value::as_str).map(str::to_string);
        let problem = match missing_files(snapshot) {
            Ok(missing) if missing.is_empty() => None,
            Ok(missing) => Some(format!("incomplete: lacks {}", missing.join(", "))),
            Err(e) => Some(e.to_string()),
        };
        let bytes = files
            .iter()
            .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
            .map(|f| file_bytes(&snapshot.join(f)))
            .sum();
        out.push(StoredModel {
            spec: if named { id.spec() } else { snapshot.display().to_string() },
            store: "huggingface",
            format: "safetensors",
            kind: field("torch_dtype").or_else(|| field("dtype")),
            arch: field("model_type"),
            bytes,
            path: snapshot.to_path_buf(),
            problem,
        });
    }
    for model in gguf_models(&files) {
        let path = snapshot.join(model.first());
        let tag = gguf_tag(model.first());
        // The tag is the spec when it picks this model alone.
        let tagged = TaggedId { id: id.clone(), tag: tag.clone() };
        let picks = pick_gguf(&files, &tag, "").ok().flatten().is_some_and(|m| m == model);
        let spec = if named && picks { format!("{}:{tag}", id.spec()) } else { path.display().to_string() };
        let bytes = model.parts.iter().map(|p| file_bytes(&snapshot.join(p))).sum();
        let (kind, arch, problem) = if model.missing.is_empty() {
            gguf_header(&path)
        } else {
            (
                None,
                None,
                Some(format!("incomplete: lacks {} (`{}`)", model.missing.join(", "), tagged.download_command())),
            )
        };
        out.push(StoredModel {
            spec,
            store: "huggingface",
            format: "gguf",
            kind: kind.or(Some(tag)),
            arch,
            bytes,
            path,
            problem,
        });
    }
}

/// The models of the Ollama store at `store`, sorted by name; a model that cannot be read is
/// listed with the reason.
pub fn ollama_store_models(store: &Path) -> Vec<StoredModel> {
    ollama_names(store)
        .into_iter()
        .map(|name| match ollama_model(store, &name.short()) {
            Ok(m) => {
                let (kind, arch, mut problem) = gguf_header(&m.gguf);
                if !m.adapters.is_empty() {
                    problem = Some("applies a LoRA adapter, which qwick does not".into());
                }
                StoredModel {
                    spec: name.spec(),
                    store: "ollama",
                    format: "gguf",
                    kind,
                    arch,
                    bytes: m.bytes,
                    path: m.gguf,
                    problem,
                }
            }
            Err(e) => StoredModel {
                spec: name.spec(),
                store: "ollama",
                format: "gguf",
                kind: None,
                arch: None,
                bytes: 0,
                path: name.manifest_path(store),
                problem: Some(e.to_string()),
            },
        })
        .collect()
}
