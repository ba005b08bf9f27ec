use crate::error::{read_json, ChatError, Result};
use qwick_sampler::SamplingParams;
use serde::Deserialize;
use std::path::Path;

/// The generation defaults a model ships in `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default top-p.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<i32>,
    /// Default min-p.
    pub min_p: Option<f32>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// `false` asks for greedy decoding.
    pub do_sample: Option<bool>,
    /// Tokens that end generation (`eos_token_id`, a number or a list in the file).
    #[serde(rename = "eos_token_id", deserialize_with = "one_or_many")]
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Padding token, if any.
    pub pad_token_id: Option<u32>,
    /// Default cap on generated tokens.
    pub max_new_tokens: Option<usize>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(id) => vec![id],
        OneOrMany::Many(ids) => ids,
        OneOrMany::Null(()) => Vec::new(),
    })
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a model folder; a folder without one gets the empty
    /// config (no defaults, no EOS ids).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("generation_config.json");
        if path.is_file() {
            Self::from_file(path)
        } else {
            Ok(Self::default())
        }
    }

    /// Reads a `generation_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        serde_json::from_value(read_json(path)?).map_err(|e| ChatError::config(path, e))
    }

    /// The sampling parameters to use when the user sets none.
    ///
    /// `do_sample: false` gives greedy decoding. Otherwise Qwen's recommended preset for the mode
    /// is the base (thinking: temperature 0.6, top-p 0.95, top-k 20; non-thinking: 0.7, 0.8, 20).
    /// With thinking on, the file's temperature/top-p/top-k/min-p replace the preset's (Qwen3's
    /// hybrid checkpoints ship the thinking values there); with thinking off they are not used,
    /// since one file cannot hold both modes' values. The repetition penalty applies to both.
    pub fn sampling_params(&self, thinking: bool) -> SamplingParams {
        let mut p = if self.do_sample == Some(false) {
            SamplingParams::greedy()
        } else if thinking {
            let base = SamplingParams::qwen3_thinking();
            SamplingParams {
                temperature: self.temperature.unwrap_or(base.temperature),
                top_p: self.top_p.unwrap_or(base.top_p),
                top_k: self.top_k.unwrap_or(base.top_k),
                min_p: self.min_p.unwrap_or(base.min_p),
                ..base
            }
        } else {
            SamplingParams::qwen3_non_thinking()
        };
        if let Some(r) = self.repetition_penalty {
            p.repetition_penalty = r;
        }
        p.max_tokens = self.max_new_tokens;
        p
    }
}
