//! How models are named: Hub ids (`owner/name[@revision]`), quantization tags and the GGUF files
//! they pick (`owner/name:Q4_K_M`), `ollama:` names, and local paths.

use crate::error::{ChatError, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The prefix of an Ollama model spec: `ollama:qwen3:8b`.
pub const OLLAMA_PREFIX: &str = "ollama:";

/// A parsed Hub model id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit; `main` unless given after `@`.
    pub revision: String,
}

impl HubId {
    /// Parses `owner/name` or `owner/name@revision`; `None` if `spec` is not of that form.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (spec, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let rev_ok = !revision.is_empty()
            && !revision.contains("..")
            && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        (ok(owner) && ok(name) && rev_ok).then(|| Self { repo: repo.to_string(), revision: revision.to_string() })
    }

    /// The repository's folder in the cache: `models--owner--name`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// How the id is written: `owner/name`, with `@revision` unless the revision is `main`.
    pub fn spec(&self) -> String {
        if self.revision == "main" {
            self.repo.clone()
        } else {
            format!("{}@{}", self.repo, self.revision)
        }
    }

    /// ` --revision REV` for a `huggingface-cli download` command, empty for `main`.
    pub(super) fn revision_flag(&self) -> String {
        if self.revision == "main" {
            String::new()
        } else {
            format!(" --revision {}", self.revision)
        }
    }
}

/// A GGUF model of a Hub repository picked by its quantization tag, as llama.cpp's `-hf` takes
/// it: `owner/name:TAG` or `owner/name@revision:TAG`, e.g. `Qwen/Qwen3-8B-GGUF:Q4_K_M`.
///
/// The tag picks the `.gguf` files whose name holds it as a separate part (see
/// [`gguf_name_has_tag`]); the parts of a split model (`NAME-00001-of-00003.gguf`, ...) are one
/// model, and `mmproj*` files (vision projectors) are never picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedId {
    /// The repository and revision.
    pub id: HubId,
    /// The quantization tag as given (matched without regard to case).
    pub tag: String,
}

impl TaggedId {
    /// Parses `owner/name[@revision]:TAG`; `None` if `spec` is not of that form.
    pub fn parse(spec: &str) -> Option<Self> {
        let (id, tag) = spec.rsplit_once(':')?;
        let tag_ok = !tag.is_empty()
            && !tag.starts_with('.')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !tag_ok {
            return None;
        }
        Some(Self { id: HubId::parse(id)?, tag: tag.to_string() })
    }

    /// The command that downloads this tag's files into the cache.
    pub fn download_command(&self) -> String {
        format!(
            "huggingface-cli download {}{} --include \"*{}*\"",
            self.id.repo,
            self.id.revision_flag(),
            self.tag.to_ascii_uppercase()
        )
    }
}

/// Whether the name of a GGUF file (the last part of `file`) holds `tag` as a separate part,
/// without regard to case: preceded by `-`, `.`, `_` or the start of the name and followed by
/// `-` or `.` (so `Q4_K_M` is in `Qwen3-8B-Q4_K_M.gguf` and `x-Q4_K_M-00001-of-00002.gguf`, but
/// neither in `x-IQ4_K_M.gguf` nor in `x-Q4_K_M_L.gguf`).
pub fn gguf_name_has_tag(file: &str, tag: &str) -> bool {
    let name = file_name(file).to_ascii_lowercase().into_bytes();
    let tag = tag.to_ascii_lowercase().into_bytes();
    !tag.is_empty()
        && (0..name.len()).any(|i| {
            name[i..].starts_with(&tag)
                && (i == 0 || matches!(name[i - 1], b'-' | b'.' | b'_'))
                && matches!(name.get(i + tag.len()), Some(b'-' | b'.'))
        })
}

/// The tag a GGUF file is known by: the last `-` or `.` separated part of its name before
/// `.gguf` and any split suffix, with a `UD-` before it kept (`Qwen3-8B-Q4_K_M.gguf` → `Q4_K_M`,
/// `Qwen3-8B-UD-Q4_K_XL-00001-of-00002.gguf` → `UD-Q4_K_XL`).
pub fn gguf_tag(file: &str) -> String {
    let name = file_name(file);
    let stem = match split_part(name) {
        Some((stem, _, _)) => stem,
        None if is_gguf_name(name) => &name[..name.len() - GGUF_EXT.len()],
        None => name,
    };
    match stem.rfind(['-', '.']) {
        Some(i) if i + 1 < stem.len() => {
            let head = &stem[..i];
            let ud = stem.as_bytes()[i] == b'-'
                && head.len() >= 2
                && head.as_bytes()[head.len() - 2..].eq_ignore_ascii_case(b"UD")
                && (head.len() == 2 || matches!(head.as_bytes()[head.len() - 3], b'-' | b'.' | b'_'));
            if ud {
                stem[i - 2..].to_string()
            } else {
                stem[i + 1..].to_string()
            }
        }
        _ => stem.to_string(),
    }
}

const GGUF_EXT: &str = ".gguf";

/// The last `/`-separated part of a path written with `/`.
fn file_name(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// Whether a file name ends in `.gguf` (any case).
fn is_gguf_name(file: &str) -> bool {
    file.len() > GGUF_EXT.len() && file.is_char_boundary(file.len() - GGUF_EXT.len()) && {
        let ext = &file[file.len() - GGUF_EXT.len()..];
        ext.eq_ignore_ascii_case(GGUF_EXT)
    }
}

/// Whether a GGUF file is a vision projector (`mmproj*.gguf`), not a model.
fn is_projector(file: &str) -> bool {
    file_name(file).to_ascii_lowercase().starts_with("mmproj")
}

/// `(path before the suffix, part, parts)` for `PATH-0000i-of-0000n.gguf`.
fn split_part(file: &str) -> Option<(&str, u32, u32)> {
    if !is_gguf_name(file) {
        return None;
    }
    let base = &file[..file.len() - GGUF_EXT.len()];
    let b = base.as_bytes();
    if b.len() < 15 || !base.is_char_boundary(b.len() - 15) {
        return None;
    }
    let (stem, suffix) = base.split_at(b.len() - 15);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|c| c.is_ascii_digit());
    let (i, n) = suffix.strip_prefix('-')?.split_once("-of-")?;
    if !digits(i) || !digits(n) {
        return None;
    }
    let (i, n): (u32, u32) = (i.parse().ok()?, n.parse().ok()?);
    (1..=n).contains(&i).then_some((stem, i, n))
}

/// One GGUF model among a repository's files: a single file, or every part of a split one, as
/// paths relative to the snapshot (written with `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufParts {
    /// Every part in order (the first opens the model); one for a file that is not split.
    pub parts: Vec<String>,
    /// The parts that are not among the files looked at.
    pub missing: Vec<String>,
}

impl GgufParts {
    /// The file that opens the model.
    pub fn first(&self) -> &str {
        &self.parts[0]
    }
}

/// The GGUF models among `files` (paths relative to a snapshot, written with `/`), vision
/// projectors left out: each file ending in `.gguf`, the parts of a split model together. Sorted
/// by their first part.
pub fn gguf_models(files: &[String]) -> Vec<GgufParts> {
    let present: BTreeSet<&str> =
        files.iter().map(String::as_str).filter(|f| is_gguf_name(f) && !is_projector(f)).collect();
    let mut models: Vec<GgufParts> = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &present {
        let parts = match split_part(file) {
            Some((stem, _, n)) => {
                let ext = &file[file.len() - GGUF_EXT.len()..];
                (1..=n).map(|i| format!("{stem}-{i:05}-of-{n:05}{ext}")).collect()
            }
            None => vec![file.to_string()],
        };
        if seen.insert(parts[0].clone()) {
            let missing = parts.iter().filter(|p| !present.contains(p.as_str())).cloned().collect();
            models.push(GgufParts { parts, missing });
        }
    }
    models.sort_by(|a, b| a.parts[0].cmp(&b.parts[0]));
    models
}

/// The tags of the GGUF models among `files`, sorted, each once.
pub fn gguf_tags(files: &[String]) -> Vec<String> {
    let tags: BTreeSet<String> = gguf_models(files).iter().map(|m| gguf_tag(m.first())).collect();
    tags.into_iter().collect()
}

/// The GGUF model of `files` that `tag` picks: `None` when no file matches it; an error listing
/// them when it matches several models (`place` says where the files are, for the message).
pub fn pick_gguf(files: &[String], tag: &str, place: &str) -> Result<Option<GgufParts>> {
    let mut matches: Vec<GgufParts> =
        gguf_models(files).into_iter().filter(|m| gguf_name_has_tag(m.first(), tag)).collect();
    match matches.len() {
        0 => Ok(None),
        1 => Ok(matches.pop()),
        _ => Err(ChatError::Model(format!(
            "tag {tag} matches several GGUF models in {place}: {}; give a tag that matches one \
             (e.g. a longer part of its file name) or the file's path",
            matches.iter().map(|m| m.first()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Returns `Some(path)` when `spec` names an existing local folder or GGUF file, an error when it
/// looks like a path but is neither, and `None` when it should be a Hub id (with or without a
/// tag) or an Ollama model.
pub(super) fn local_folder(spec: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Some(path.to_path_buf()));
    }
    if path.exists() {
        let mut magic = [0u8; 4];
        let gguf = std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
            && &magic == b"GGUF";
        if gguf || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Ok(Some(path.to_path_buf()));
        }
        return Err(ChatError::Model(format!(
            "{spec} is a file, not a model folder (a folder with config.json, tokenizer.json and *.safetensors) \
             or a GGUF file"
        )));
    }
    let named = HubId::parse(spec).is_some() || TaggedId::parse(spec).is_some() || spec.starts_with(OLLAMA_PREFIX);
    let looks_like_path = spec.starts_with(['/', '.', '~'])
        || spec.matches('/').count() > 1
        || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if looks_like_path && !spec.starts_with(OLLAMA_PREFIX) {
        return Err(ChatError::Model(format!(
            "model {spec} does not exist (expected a folder, a .gguf file, a Hub id or ollama:NAME)"
        )));
    }
    if !named {
        return Err(ChatError::Model(format!(
            "{spec:?} is neither a model folder nor a GGUF file nor a model name: a Hugging Face model id \
             like Qwen/Qwen3-0.6B, a GGUF repository with a quantization tag like Qwen/Qwen3-8B-GGUF:Q4_K_M, \
             or an Ollama model like ollama:qwen3:8b"
        )));
    }
    Ok(None)
}
