use crate::error::{read_json, ChatError, Result};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use tokenizers::AddedToken;

/// A model's tokenizer: `tokenizer.json` plus the added tokens `tokenizer_config.json` declares.
///
/// Cloning is cheap (the vocabulary is shared). No BOS token is added: Qwen3 uses none, and
/// `tokenizer.json` decides what `add_special` adds for other models.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ChatError {
    ChatError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model folder, and `tokenizer_config.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ChatError::Tokenizer(format!("no tokenizer.json in {}", dir.display())));
        }
        let mut tok = Self::from_file(&path)?;
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let config = read_json(&config_path)?;
            tok.apply_config(&config).map_err(|e| ChatError::config(&config_path, e))?;
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ChatError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| ChatError::config(path, e))
    }

    /// Loads a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(tok_err)?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Applies a parsed `tokenizer_config.json`: every token in its `added_tokens_decoder` must
    /// exist with the declared id; tokens missing from `tokenizer.json` are added (special or not,
    /// as declared) when their id is the next free one.
    pub fn apply_config(&mut self, config: &Value) -> Result<()> {
        let Some(decl) = config.get("added_tokens_decoder").and_then(Value::as_object) else {
            return Ok(());
        };
        let mut declared: Vec<(u32, &str, bool)> = Vec::with_capacity(decl.len());
        for (id, tok) in decl {
            let id: u32 =
                id.parse().map_err(|_| ChatError::Tokenizer(format!("added token id {id:?} is not a number")))?;
            let content = tok
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| ChatError::Tokenizer(format!("added token {id} has no \"content\"")))?;
            let special = tok.get("special").and_then(Value::as_bool).unwrap_or(false);
            declared.push((id, content, special));
        }
        declared.sort_unstable_by_key(|d| d.0);
        let inner = Arc::make_mut(&mut self.inner);
        for (id, content, special) in declared {
            match inner.token_to_id(content) {
                Some(existing) if existing == id => {}
                Some(existing) => {
                    return Err(ChatError::Tokenizer(format!(
                        "added token {content:?} is declared with id {id} but tokenizer.json has it as {existing}"
                    )))
                }
                None => {
                    let token = AddedToken::from(content.to_string(), special);
                    if special {
                        inner.add_special_tokens(&[token]);
                    } else {
                        inner.add_tokens(&[token]);
                    }
                    if inner.token_to_id(content) != Some(id) {
                        return Err(ChatError::Tokenizer(format!(
                            "added token {content:?} is declared with id {id}, which does not follow the vocabulary"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Token ids of `text`. Special and added tokens written in the text (`<|im_start|>`,
    /// `<think>`) become their single ids, as when transformers encodes a rendered chat prompt.
    /// `add_special` adds what the tokenizer's post-processor adds (nothing for Qwen3).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` leaves out special tokens (`<|im_end|>`, not `<think>`).
    /// Ids outside the vocabulary (the model's padding rows) are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Ids of the special tokens (`<|im_end|>`, ...; not `<think>`, an added token).
    pub fn special_ids(&self) -> std::collections::HashSet<u32> {
        self.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect()
    }

    /// Id of a token given by its exact text (e.g. `"<|im_end|>"`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Text of a token as stored in the vocabulary (byte-level form for BPE tokens).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    /// Number of tokens including added tokens (151,669 for Qwen3; the model's embedding is larger).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A streaming decoder over this tokenizer.
    pub fn incremental_decoder(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), skip_special)
    }
}

/// Turns a stream of token ids into text deltas without ever emitting a broken character.
///
/// A character whose bytes span several tokens (CJK, emoji, ZWJ sequences) comes out once its
/// last byte arrives; [`finish`](IncrementalDecoder::finish) flushes whatever is left (invalid
/// bytes as U+FFFD, like a full decode). The concatenated deltas always equal
/// `decode(all_ids, skip_special)`.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window decoded for context (its text was already emitted).
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
}

/// Length of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

impl IncrementalDecoder {
    /// A decoder that starts with no tokens.
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds one token; returns the text it completes (often empty while a character is partial).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.starts_with(&before) {
            return Ok(String::new());
        }
        // Keep the last emitted window as context for the next one, drop the rest.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(now[before.len()..].to_string())
    }

    /// Adds several tokens; returns the concatenated deltas.
    pub fn extend(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            out.push_str(&self.push(id)?);
        }
        Ok(out)
    }

    /// Flushes text held back at the end of the stream and resets the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(now[common_prefix(&now, &before)..].to_string())
    }
}
