//! `config.json` of a Qwen3 checkpoint, in both layouts found in the wild: the Hub's
//! (`rope_theta`, `rope_scaling`, `num_experts`, `torch_dtype`) and the one transformers 5
//! writes (`rope_parameters`, `num_local_experts`, `dtype`).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope: Rope,
    pub moe: Option<MoeConfig>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub dtype: Option<String>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Qwen3,
    Qwen3Moe,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// YaRN context extension, as transformers' `_compute_yarn_parameters` reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// Explicit `attention_factor`, else derived from `factor` (and `mscale`, `mscale_all_dim`).
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub truncate: bool,
    /// Whether the config named `original_max_position_embeddings` (then transformers takes
    /// the factor as `max_position_embeddings / original_max_position_embeddings`).
    pub explicit_original: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

impl Config {
    /// Reads and validates `config.json` (or any file in that format).
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Config::from_json(&v).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Config> {
        let o = v.as_object().ok_or_else(|| anyhow!("config is not a JSON object"))?;
        let arch_names: Vec<&str> = match o.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        let model_type = o.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let architecture = match (arch_names.first().copied(), model_type) {
            (Some("Qwen3ForCausalLM"), _) | (None, "qwen3") => Architecture::Qwen3,
            (Some("Qwen3MoeForCausalLM"), _) | (None, "qwen3_moe") => Architecture::Qwen3Moe,
            (Some(other), _) => {
                bail!("unsupported architecture {other:?}: qwick runs Qwen3ForCausalLM and Qwen3MoeForCausalLM")
            }
            (None, "") => bail!("config names no architecture (\"architectures\" or \"model_type\")"),
            (None, other) => bail!("unsupported model_type {other:?}: qwick runs qwen3 and qwen3_moe"),
        };
        let hidden_size = req_usize(o, "hidden_size")?;
        let num_attention_heads = req_usize(o, "num_attention_heads")?;
        let num_hidden_layers = req_usize(o, "num_hidden_layers")?;
        let vocab_size = req_usize(o, "vocab_size")?;
        let num_key_value_heads = opt_usize(o, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = opt_usize(o, "head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        let max_position_embeddings = opt_usize(o, "max_position_embeddings")?.unwrap_or(32768);
        let moe = if architecture == Architecture::Qwen3Moe {
            let num_experts = match opt_usize(o, "num_experts")? {
                Some(n) => n,
                None => opt_usize(o, "num_local_experts")?
                    .ok_or_else(|| anyhow!("missing required key \"num_experts\" (or \"num_local_experts\")"))?,
            };
            let mlp_only_layers = match o.get("mlp_only_layers") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| anyhow!("\"mlp_only_layers\" must be a list of layer indices"))
                    })
                    .collect::<Result<_>>()?,
                Some(_) => bail!("\"mlp_only_layers\" must be a list of layer indices"),
            };
            Some(MoeConfig {
                num_experts,
                num_experts_per_tok: req_usize(o, "num_experts_per_tok")?,
                moe_intermediate_size: req_usize(o, "moe_intermediate_size")?,
                norm_topk_prob: opt_bool(o, "norm_topk_prob")?.unwrap_or(false),
                decoder_sparse_step: opt_usize(o, "decoder_sparse_step")?.unwrap_or(1),
                mlp_only_layers,
            })
        } else {
            None
        };
        let intermediate_size = match &moe {
            // MoE checkpoints use it only for `mlp_only_layers`.
            Some(_) => opt_usize(o, "intermediate_size")?.unwrap_or(0),
            None => req_usize(o, "intermediate_size")?,
        };
        let rope = parse_rope(o, max_position_embeddings)?;
        let eos_token_ids = match o.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            _ => vec![],
        };
        let cfg = Config {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(o, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position_embeddings,
            tie_word_embeddings: opt_bool(o, "tie_word_embeddings")?.unwrap_or(false),
            rope,
            moe,
            dtype: o.get("torch_dtype").or_else(|| o.get("dtype")).and_then(|x| x.as_str()).map(str::to_string),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                bail!("\"{k}\" must be positive");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        if let Some(m) = &self.moe {
            if m.num_experts == 0 || m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                bail!(
                    "num_experts_per_tok ({}) must be between 1 and num_experts ({})",
                    m.num_experts_per_tok,
                    m.num_experts
                );
            }
            if m.decoder_sparse_step == 0 && (0..self.num_hidden_layers).any(|l| !m.mlp_only_layers.contains(&l)) {
                bail!("decoder_sparse_step must be positive");
            }
            if (0..self.num_hidden_layers).any(|l| !self.is_sparse(l)) && self.intermediate_size == 0 {
                bail!("missing required key \"intermediate_size\" (needed by dense layers in mlp_only_layers)");
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Whether layer `l` uses the sparse MoE block (transformers' rule in `Qwen3MoeDecoderLayer`).
    pub fn is_sparse(&self, l: usize) -> bool {
        match &self.moe {
            Some(m) => {
                !m.mlp_only_layers.contains(&l)
                    && m.num_experts > 0
                    && m.decoder_sparse_step > 0
                    && (l + 1).is_multiple_of(m.decoder_sparse_step)
            }
            None => false,
        }
    }

    /// The rotary inverse frequencies (f32, as transformers computes them) and the factor
    /// applied to cos/sin.
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f32) {
        let dim = self.head_dim;
        let base = self.rope.theta as f32;
        let half = dim / 2;
        // base ** (arange(0, dim, 2) / dim), in f32.
        let pos_freqs: Vec<f32> = (0..half).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
        let Some(y) = &self.rope.yarn else {
            return (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0);
        };
        let factor = if y.explicit_original {
            self.max_position_embeddings as f64 / y.original_max_position_embeddings as f64
        } else {
            y.factor
        };
        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => get_mscale(factor, m) / get_mscale(factor, ma),
            _ => get_mscale(factor, 1.0),
        };
        let corr_dim = |rot: f64| {
            (dim as f64 * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * (self.rope.theta).ln())
        };
        let (mut low, mut high) = (corr_dim(y.beta_fast), corr_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0) as f32;
        let mut high = high.min(dim as f64 - 1.0) as f32;
        if low == high {
            high += 0.001;
        }
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrap_factor = 1.0 - ramp;
                let extrap = 1.0 / pos_freqs[i];
                let interp = 1.0 / (factor as f32 * pos_freqs[i]);
                interp * (1.0 - extrap_factor) + extrap * extrap_factor
            })
            .collect();
        (inv, attention_factor as f32)
    }
}

fn parse_rope(o: &Map<String, Value>, max_pos: usize) -> Result<Rope> {
    // transformers 5: everything under "rope_parameters"; Hub: "rope_theta" + "rope_scaling".
    let params = match o.get("rope_parameters") {
        Some(Value::Object(p)) => Some(p),
        _ => None,
    };
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => v.as_f64().ok_or_else(|| anyhow!("\"rope_parameters.rope_theta\" must be a number"))?,
        None => opt_f64(o, "rope_theta")?.unwrap_or(10000.0),
    };
    let scaling = match o.get("rope_scaling") {
        Some(Value::Object(s)) => Some(s),
        _ => params,
    };
    let Some(s) = scaling else {
        return Ok(Rope { theta, yarn: None });
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok(Rope { theta, yarn: None }),
        "yarn" => {
            let f = |k: &str| -> Result<Option<f64>> {
                match s.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| anyhow!("rope scaling \"{k}\" must be a number")),
                }
            };
            let factor = f("factor")?.ok_or_else(|| anyhow!("YaRN rope scaling needs \"factor\""))?;
            let orig = f("original_max_position_embeddings")?;
            Ok(Rope {
                theta,
                yarn: Some(Yarn {
                    factor,
                    original_max_position_embeddings: orig.map(|x| x as usize).unwrap_or(max_pos),
                    explicit_original: orig.is_some(),
                    attention_factor: f("attention_factor")?,
                    mscale: f("mscale")?,
                    mscale_all_dim: f("mscale_all_dim")?,
                    beta_fast: f("beta_fast")?.unwrap_or(32.0),
                    beta_slow: f("beta_slow")?.unwrap_or(1.0),
                    truncate: s.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
                }),
            })
        }
        other => bail!("unsupported rope scaling type {other:?}: qwick supports default and yarn"),
    }
}

fn req_usize(o: &Map<String, Value>, k: &str) -> Result<usize> {
    opt_usize(o, k)?.ok_or_else(|| anyhow!("missing required key \"{k}\""))
}

fn opt_usize(o: &Map<String, Value>, k: &str) -> Result<Option<usize>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| anyhow!("\"{k}\" must be a non-negative integer, found {v}")),
    }
}

fn opt_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| anyhow!("\"{k}\" must be a number, found {v}")),
    }
}

fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| anyhow!("\"{k}\" must be true or false, found {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/configs").join(name)
    }

    #[test]
    fn reads_all_eight_hub_configs() {
        for (name, heads, kv, moe) in [
            ("Qwen3-0.6B.json", 16, 8, false),
            ("Qwen3-1.7B.json", 16, 8, false),
            ("Qwen3-4B.json", 32, 8, false),
            ("Qwen3-8B.json", 32, 8, false),
            ("Qwen3-14B.json", 40, 8, false),
            ("Qwen3-32B.json", 64, 8, false),
            ("Qwen3-30B-A3B.json", 32, 4, true),
            ("Qwen3-235B-A22B.json", 64, 4, true),
        ] {
            let c = Config::from_file(&shared(name)).unwrap();
            assert_eq!(
                (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.moe.is_some()),
                (heads, kv, 128, moe),
                "{name}"
            );
            assert_eq!(c.rope.theta, 1_000_000.0);
            if let Some(m) = &c.moe {
                assert_eq!((m.num_experts, m.num_experts_per_tok, m.norm_topk_prob), (128, 8, true));
                assert!((0..c.num_hidden_layers).all(|l| c.is_sparse(l)));
            }
        }
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let err = |v: Value| format!("{:#}", Config::from_json(&v).unwrap_err());
        assert!(err(serde_json::json!({"architectures": ["LlamaForCausalLM"]})).contains("LlamaForCausalLM"));
        let e = err(serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64}));
        assert!(e.contains("missing required key"), "{e}");
        let e = err(serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": "x"}));
        assert!(e.contains("hidden_size"), "{e}");
        let base = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}});
        assert!(err(base).contains("longrope"));
    }

    #[test]
    fn yarn_in_both_layouts() {
        let hub = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
            "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8, "rope_theta": 10000.0, "max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}});
        let v5 = serde_json::json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
            "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8, "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}});
        let (a, b) = (Config::from_json(&hub).unwrap(), Config::from_json(&v5).unwrap());
        assert_eq!(a.rope, b.rope);
        let (inv, att) = a.rope_inv_freq();
        assert!((att - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert_eq!(inv.len(), 8);
        assert!((inv[0] - 1.0).abs() < 1e-6, "highest frequency is extrapolated");
        assert!((inv[7] - 1.0 / (4.0 * 10000f32.powf(14.0 / 16.0))).abs() < 1e-9, "lowest is interpolated");
    }
}
