//! GGUF metadata for a Qwen3 model: the `qwen3` / `qwen3moe` hyperparameters from its config,
//! and the tokenizer (byte-level BPE `gpt2` with the `qwen2` pre-tokenizer: tokens, types and
//! merges from `tokenizer.json`; special token ids; the chat template), under the keys
//! llama.cpp and Ollama read.

use anyhow::{anyhow, bail, Context, Result};
use qwick_gguf::Value;
use qwick_model::{Architecture, Config};
use serde_json::Value as Json;
use std::path::Path;

/// GGUF token types (llama.cpp's numbering).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The architecture name GGUF uses.
pub fn arch_name(c: &Config) -> &'static str {
    match c.architecture {
        Architecture::Qwen3 => "qwen3",
        Architecture::Qwen3Moe => "qwen3moe",
    }
}

/// The model hyperparameters as GGUF metadata (`general.architecture` first).
pub fn model_keys(c: &Config, name: &str) -> Vec<(String, Value)> {
    let arch = arch_name(c);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_attention_heads)),
        (k("attention.head_count_kv"), u(c.num_key_value_heads)),
        (k("rope.freq_base"), Value::F32(c.rope.theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps)),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
    ];
    if let Some(moe) = &c.moe {
        m.push((k("expert_count"), u(moe.num_experts)));
        m.push((k("expert_used_count"), u(moe.num_experts_per_tok)));
        m.push((k("expert_feed_forward_length"), u(moe.moe_intermediate_size)));
        m.push((k("expert_weights_norm"), Value::Bool(moe.norm_topk_prob)));
    }
    if let Some(y) = &c.rope.yarn {
        m.push((k("rope.scaling.type"), Value::String("yarn".into())));
        m.push((k("rope.scaling.factor"), Value::F32(y.factor as f32)));
        m.push((k("rope.scaling.original_context_length"), u(y.original_max_position_embeddings)));
    }
    m
}

/// The tokenizer of a model folder (`tokenizer.json`, with `tokenizer_config.json` and
/// `config.json` for special tokens and the chat template) as GGUF metadata, padded with unused
/// tokens to `vocab_size` entries as the embedding has rows.
pub fn tokenizer_keys(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let read = |name: &str| -> Result<Option<Json>> {
        let p = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| anyhow!("{}: {e}", p.display()))
    };
    let tj = read("tokenizer.json")?.ok_or_else(|| anyhow!("{}: tokenizer.json not found", dir.display()))?;
    let tc = read("tokenizer_config.json")?.unwrap_or(Json::Null);
    let cfg = read("config.json")?.unwrap_or(Json::Null);
    let p = dir.join("tokenizer.json");
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!("{}: model type {} is not BPE", p.display(), model["type"]);
    }
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!("{}: token {text:?} has id {id}, beyond the model's {vocab_size} embeddings", p.display())
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    let vocab = model["vocab"].as_object().ok_or_else(|| anyhow!("{}: model.vocab is not an object", p.display()))?;
    for (t, id) in vocab {
        put(id.as_u64().ok_or_else(|| anyhow!("{}: vocab entry {t:?} has no id", p.display()))?, t, NORMAL)?;
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            bail!("{}: added token without id or content: {a}", p.display());
        };
        // Added tokens marked special, or spelled like control tokens, are control tokens.
        let looks_special = text.starts_with("<|") && text.ends_with("|>");
        let ty = if a["special"].as_bool() == Some(true) || looks_special { CONTROL } else { USER_DEFINED };
        put(id, text, ty)?;
    }
    let (mut texts, mut types) = (Vec::with_capacity(vocab_size), Vec::with_capacity(vocab_size));
    for (id, t) in tokens.into_iter().enumerate() {
        let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        texts.push(Value::String(text));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(a) if a.len() == 2 && a.iter().all(Json::is_string) => {
                Ok(Value::String(format!("{} {}", a[0].as_str().unwrap_or(""), a[1].as_str().unwrap_or(""))))
            }
            other => Err(anyhow!("{}: merge {other} is neither \"a b\" nor [a, b]", p.display())),
        })
        .collect::<Result<_>>()?;
    let id_of = |text: &str| -> Option<u32> {
        vocab.get(text).and_then(Json::as_u64).map(|v| v as u32).or_else(|| {
            tj["added_tokens"]
                .as_array()?
                .iter()
                .find(|a| a["content"].as_str() == Some(text))
                .and_then(|a| a["id"].as_u64())
                .map(|v| v as u32)
        })
    };
    let special = |key: &str| -> Option<u32> {
        match &tc[key] {
            Json::String(s) => id_of(s),
            Json::Object(o) => o.get("content").and_then(Json::as_str).and_then(id_of),
            _ => None,
        }
    };
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let cfg_id = |key: &str| cfg[key].as_u64().or_else(|| cfg[key].as_array()?.first()?.as_u64()).map(|v| v as u32);
    if let Some(id) = special("eos_token").or_else(|| cfg_id("eos_token_id")) {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = special("pad_token") {
        m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = special("bos_token").or_else(|| cfg_id("bos_token_id")) {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(tc["add_bos_token"].as_bool().unwrap_or(false))));
    if let Some(t) = tc["chat_template"].as_str() {
        m.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(m)
}
