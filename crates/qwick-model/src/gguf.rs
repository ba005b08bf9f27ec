//! Qwen3 in a GGUF file: the `qwen3` / `qwen3moe` metadata mapped onto [`Config`], and tensors
//! by llama.cpp's names.

use crate::config::{Architecture, Config, MoeConfig, Rope, Yarn};
use crate::names::{self, Role};
use crate::safetensors::Tensor;
use anyhow::{anyhow, bail, Result};
use qwick_gguf::{GgufFile, TensorInfo};

/// Reads the model configuration from a GGUF file's metadata.
pub fn config(g: &GgufFile) -> Result<Config> {
    let p = g.path.display();
    let arch =
        g.get_str("general.architecture")?.ok_or_else(|| anyhow!("{p}: missing metadata key general.architecture"))?;
    let architecture = match arch {
        "qwen3" => Architecture::Qwen3,
        "qwen3moe" => Architecture::Qwen3Moe,
        other => bail!("{p}: general.architecture is {other:?}; qwick runs qwen3 and qwen3moe"),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> {
        g.get_u64(&key(k))?.map(|v| v as usize).ok_or_else(|| anyhow!("{p}: missing metadata key {}", key(k)))
    };
    let opt = |k: &str| -> Result<Option<usize>> { Ok(g.get_u64(&key(k))?.map(|v| v as usize)) };
    let hidden_size = req("embedding_length")?;
    let num_hidden_layers = req("block_count")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = opt("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    let head_dim = opt("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads.max(1));
    if let Some(v) = opt("attention.value_length")? {
        if v != head_dim {
            bail!(
                "{p}: {} ({v}) differs from the key length ({head_dim}); Qwen3 has equal lengths",
                key("attention.value_length")
            );
        }
    }
    let embd =
        g.tensor(&names::gguf(Role::Embed, 0)).ok_or_else(|| anyhow!("{p}: tensor token_embd.weight not found"))?;
    if embd.dims.len() != 2 || embd.dims[0] as usize != hidden_size {
        bail!("{p}: tensor token_embd.weight has dimensions {:?}, expected [{hidden_size}, vocab]", embd.dims);
    }
    let vocab_size = embd.dims[1] as usize;
    let max_position_embeddings = opt("context_length")?.unwrap_or(32768);
    let theta = g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let yarn = match g.get_str(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("yarn") => {
            let f = |k: &str| g.get_f64(&key(k));
            Some(Yarn {
                factor: f("rope.scaling.factor")?
                    .ok_or_else(|| anyhow!("{p}: YaRN scaling without {}", key("rope.scaling.factor")))?,
                original_max_position_embeddings: opt("rope.scaling.original_context_length")?
                    .unwrap_or(max_position_embeddings),
                // The factor is given, as llama.cpp reads it.
                explicit_original: false,
                attention_factor: None,
                mscale: None,
                mscale_all_dim: None,
                beta_fast: f("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: f("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                truncate: true,
            })
        }
        Some(other) => bail!("{p}: unsupported rope scaling type {other:?} in {}", key("rope.scaling.type")),
    };
    let moe = if architecture == Architecture::Qwen3Moe {
        let num_experts = req("expert_count")?;
        // Layers without a router are dense.
        let mlp_only_layers =
            (0..num_hidden_layers).filter(|&l| g.tensor(&names::gguf(Role::Router, l)).is_none()).collect();
        Some(MoeConfig {
            num_experts,
            num_experts_per_tok: req("expert_used_count")?,
            moe_intermediate_size: req("expert_feed_forward_length")?,
            norm_topk_prob: g.get_bool(&key("expert_weights_norm"))?.unwrap_or(true),
            decoder_sparse_step: 1,
            mlp_only_layers,
        })
    } else {
        None
    };
    let intermediate_size = match &moe {
        Some(_) => opt("feed_forward_length")?.unwrap_or(0),
        None => req("feed_forward_length")?,
    };
    let eos_token_ids = g.get_u64("tokenizer.ggml.eos_token_id")?.map(|v| vec![v as u32]).unwrap_or_default();
    let cfg = Config {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6) as f32,
        max_position_embeddings,
        tie_word_embeddings: g.tensor(&names::gguf(Role::Head, 0)).is_none(),
        rope: Rope { theta, yarn },
        moe,
        dtype: g.get_u64("general.file_type")?.and_then(|t| qwick_gguf::file_type_name(t as u32)).map(str::to_string),
        eos_token_ids,
    };
    cfg.validate().map_err(|e| anyhow!("{p}: {e:#}"))?;
    Ok(cfg)
}

/// Tensor `role` of layer `l`, checked against `shape` (row-major).
pub fn tensor(g: &GgufFile, role: Role, l: usize, shape: &[usize]) -> Result<Tensor> {
    let name = names::gguf(role, l);
    let t = g.tensor(&name).ok_or_else(|| anyhow!("{}: tensor {name} not found", g.path.display()))?;
    check(g, t, shape)?;
    let format = t.format.expect("checked");
    Ok(Tensor::mapped(&name, format, t.shape(), g.map_of(t).clone(), t.range.clone()))
}

pub fn contains(g: &GgufFile, role: Role, l: usize) -> bool {
    g.tensor(&names::gguf(role, l)).is_some()
}

fn check(g: &GgufFile, t: &TensorInfo, shape: &[usize]) -> Result<()> {
    let p = g.path.display();
    if t.shape() != shape {
        bail!("{p}: tensor {} has shape {:?}, expected {shape:?}", t.name, t.shape());
    }
    if t.format.is_none() {
        bail!("{p}: tensor {} has type {}, which qwick does not read", t.name, qwick_gguf::type_name(t.ggml_type));
    }
    Ok(())
}
