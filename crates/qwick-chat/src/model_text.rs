//! The text side of a model, from a Hugging Face folder or from a GGUF file's metadata:
//! tokenizer, chat template and generation defaults. Shared by the CLI and the server.

use crate::error::{read_json, ChatError, Result};
use crate::generation::GenerationConfig;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use qwick_gguf::GgufFile;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Where the text side is read from.
#[derive(Clone, Copy)]
pub enum TextSource<'a> {
    /// `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` of a model folder.
    Folder(&'a Path),
    /// The `tokenizer.*` metadata of a GGUF file.
    Gguf(&'a GgufFile),
}

/// A model's tokenizer, chat template and generation defaults.
pub struct ModelText {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (the model's own, or the one given).
    pub template: ChatTemplate,
    /// Generation defaults (`generation_config.json`; none for a GGUF file).
    pub gen_config: GenerationConfig,
}

fn has_template(dir: &Path) -> bool {
    let in_config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|c| c.get("chat_template").is_some_and(|t| !t.is_null()));
    in_config || dir.join("chat_template.jinja").is_file() || dir.join("chat_template.json").is_file()
}

impl ModelText {
    /// Loads the text side. `chat_template`: a template file that replaces the model's own.
    pub fn load(src: TextSource, chat_template: Option<&Path>) -> Result<ModelText> {
        let given = match chat_template {
            Some(file) => Some(
                ChatTemplate::from_file(file)
                    .map_err(|e| ChatError::Template(format!("--chat-template {}: {e}", file.display())))?,
            ),
            None => None,
        };
        match src {
            TextSource::Folder(dir) => {
                let tokenizer = Tokenizer::from_dir(dir)?;
                let template = match given {
                    Some(t) => match read_json(&dir.join("tokenizer_config.json")) {
                        Ok(c) => t.with_special_tokens_from(&c),
                        Err(_) => t,
                    },
                    None if !has_template(dir) => {
                        return Err(ChatError::Template(format!(
                            "the model folder {} has no chat template (no \"chat_template\" in \
                             tokenizer_config.json, no chat_template.jinja); give one with --chat-template FILE",
                            dir.display()
                        )))
                    }
                    None => ChatTemplate::from_dir(dir)?,
                };
                Ok(ModelText { tokenizer, template, gen_config: GenerationConfig::from_dir(dir)? })
            }
            TextSource::Gguf(g) => {
                let tokenizer = Tokenizer::from_gguf(g)?;
                let specials = gguf_special_tokens(g, &tokenizer)?;
                let template = match given {
                    Some(t) => t,
                    None => match get_str(g, "tokenizer.chat_template")? {
                        Some(src) => ChatTemplate::new(src)?,
                        None => {
                            return Err(ChatError::Template(format!(
                                "{} has no chat template (no tokenizer.chat_template); give one with \
                                 --chat-template FILE",
                                g.path.display()
                            )))
                        }
                    },
                };
                Ok(ModelText {
                    tokenizer,
                    template: template.with_special_tokens_from(&specials),
                    gen_config: GenerationConfig::default(),
                })
            }
        }
    }

    /// The ids that end generation: the generation config's, the model config's (`config_eos`),
    /// else the end of an assistant turn.
    pub fn eos(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut eos = self.gen_config.eos_token_ids.clone();
        eos.extend(config_eos);
        if eos.is_empty() {
            eos.extend(["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| self.tokenizer.token_id(t)));
        }
        eos.sort_unstable();
        eos.dedup();
        eos
    }
}

fn gguf_err(g: &GgufFile, e: impl std::fmt::Display) -> ChatError {
    ChatError::Tokenizer(format!("{}: {e:#}", g.path.display()))
}

fn get_str<'a>(g: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    g.get_str(key).map_err(|e| ChatError::Template(format!("{e:#}")))
}

/// The special tokens GGUF names by id, as a `tokenizer_config.json` would (`bos_token`, ...).
fn gguf_special_tokens(g: &GgufFile, tok: &Tokenizer) -> Result<Value> {
    let mut o = Map::new();
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(id) = g.get_u64(key).map_err(|e| gguf_err(g, e))? {
            if let Some(t) = u32::try_from(id).ok().and_then(|id| tok.id_to_token(id)) {
                o.insert(name.into(), Value::String(t));
            }
        }
    }
    Ok(Value::Object(o))
}

/// The pre-tokenizer split of the `qwen2` family (Qwen2, Qwen2.5, Qwen3).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_UNUSED: i64 = 5;

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` `gpt2` with the `qwen2`
    /// pre-tokenizer: byte-level BPE from the file's tokens and merges; control tokens special,
    /// user-defined tokens added), giving the ids `tokenizer.json` gives.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let e = |x: anyhow::Error| gguf_err(g, x);
        match g.get_str("tokenizer.ggml.model").map_err(e)? {
            Some("gpt2") => {}
            Some(other) => {
                return Err(gguf_err(
                    g,
                    format!("tokenizer.ggml.model is {other:?}; qwick reads gpt2 (byte-level BPE)"),
                ))
            }
            None => return Err(gguf_err(g, "missing metadata key tokenizer.ggml.model")),
        }
        match g.get_str("tokenizer.ggml.pre").map_err(e)? {
            None | Some("qwen2") => {}
            Some(other) => {
                return Err(gguf_err(
                    g,
                    format!("tokenizer.ggml.pre is {other:?}; qwick reads the qwen2 pre-tokenizer"),
                ))
            }
        }
        let tokens = g
            .get_strings("tokenizer.ggml.tokens")
            .map_err(e)?
            .ok_or_else(|| gguf_err(g, "missing metadata key tokenizer.ggml.tokens"))?;
        let types = g.get_ints("tokenizer.ggml.token_type").map_err(e)?.unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(gguf_err(
                g,
                format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let merges = g.get_strings("tokenizer.ggml.merges").map_err(e)?.unwrap_or_default();
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, &t) in tokens.iter().enumerate() {
            match types.get(id).copied().unwrap_or(1) {
                TOKEN_UNUSED => {}
                ty @ (TOKEN_CONTROL | TOKEN_USER_DEFINED) => added.push(json!({
                    "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == TOKEN_CONTROL,
                })),
                _ => {
                    vocab.insert(t.to_string(), json!(id));
                }
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| gguf_err(g, format!("tokenizer.ggml.merges entry {m:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let bytes = serde_json::to_vec(&spec).map_err(|x| gguf_err(g, x))?;
        Tokenizer::from_bytes(&bytes).map_err(|x| gguf_err(g, format!("building the tokenizer: {x}")))
    }
}
