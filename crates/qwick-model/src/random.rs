//! Random-weight checkpoints at any Qwen3 config, for benchmarks at real shapes: the tensor
//! names and shapes of a Hub checkpoint, bf16 (or f16/f32), uniform values scaled by
//! 1/sqrt(fan_in) so activations stay finite, norm weights 1. Files over `shard_bytes` are
//! split into shards with a `model.safetensors.index.json`, as the Hub does.

use crate::config::Config;
use crate::names::{hf, Role};
use anyhow::{Context, Result};
use qwick_backend::Format;
use std::io::Write;
use std::path::Path;

/// (name, shape, std of the values or None for a norm weight of ones)
fn tensor_specs(c: &Config) -> Vec<(String, Vec<usize>, Option<f32>)> {
    let h = c.hidden_size;
    let inv = |n: usize| Some(1.0 / (n as f32).sqrt());
    let mut t = vec![(hf(Role::Embed, 0, 0), vec![c.vocab_size, h], inv(h))];
    for l in 0..c.num_hidden_layers {
        let name = |r: Role| hf(r, l, 0);
        t.push((name(Role::AttnNorm), vec![h], None));
        t.push((name(Role::Q), vec![c.q_dim(), h], inv(h)));
        t.push((name(Role::K), vec![c.kv_dim(), h], inv(h)));
        t.push((name(Role::V), vec![c.kv_dim(), h], inv(h)));
        t.push((name(Role::O), vec![h, c.q_dim()], inv(c.q_dim())));
        t.push((name(Role::QNorm), vec![c.head_dim], None));
        t.push((name(Role::KNorm), vec![c.head_dim], None));
        t.push((name(Role::MlpNorm), vec![h], None));
        match &c.moe {
            Some(m) if c.is_sparse(l) => {
                let mi = m.moe_intermediate_size;
                for e in 0..m.num_experts {
                    t.push((hf(Role::ExpertGate, l, e), vec![mi, h], inv(h)));
                    t.push((hf(Role::ExpertUp, l, e), vec![mi, h], inv(h)));
                    t.push((hf(Role::ExpertDown, l, e), vec![h, mi], inv(mi)));
                }
                t.push((name(Role::Router), vec![m.num_experts, h], inv(h)));
            }
            _ => {
                let i = c.intermediate_size;
                t.push((name(Role::Gate), vec![i, h], inv(h)));
                t.push((name(Role::Up), vec![i, h], inv(h)));
                t.push((name(Role::Down), vec![h, i], inv(i)));
            }
        }
    }
    t.push((hf(Role::FinalNorm, 0, 0), vec![h], None));
    if !c.tie_word_embeddings {
        t.push((hf(Role::Head, 0, 0), vec![c.vocab_size, h], inv(h)));
    }
    t
}

/// Writes `config.json` (a copy of `config_path`) and random weights into `out`.
/// `progress(done, total)` is called in bytes.
pub fn make_random(
    config_path: &Path,
    out: &Path,
    dtype: Format,
    seed: u64,
    shard_bytes: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    let config = Config::from_file(config_path)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config_path)?)?;
    if let Some(o) = cfg_json.as_object_mut() {
        let key = if o.contains_key("dtype") { "dtype" } else { "torch_dtype" };
        let name = match dtype {
            Format::BF16 => "bfloat16",
            Format::F16 => "float16",
            Format::F32 => "float32",
            f => anyhow::bail!("random checkpoints are stored as bf16, f16 or f32, not {f}"),
        };
        o.insert(key.into(), name.into());
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg_json)?)?;

    let specs = tensor_specs(&config);
    // Group tensors into shards.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, (_, shape, _)) in specs.iter().enumerate() {
        let b = shape.iter().product::<usize>() * dtype.row_bytes(1);
        if size > 0 && size + b > shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += b;
    }
    let total: usize = specs.iter().map(|s| s.1.iter().product::<usize>() * dtype.row_bytes(1)).sum();
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        let mut header = serde_json::Map::new();
        let mut off = 0;
        for &i in shard {
            let (name, shape, _) = &specs[i];
            let b = shape.iter().product::<usize>() * dtype.row_bytes(1);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [off, off + b]}),
            );
            weight_map.insert(name.clone(), fname.clone().into());
            off += b;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = out.join(&fname);
        let mut f = std::io::BufWriter::with_capacity(
            1 << 22,
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        f.write_all(&(h.len() as u64).to_le_bytes())?;
        f.write_all(&h)?;
        for &i in shard {
            let (_, shape, std) = &specs[i];
            let n: usize = shape.iter().product();
            let mut rng = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut buf = vec![0u8; (1 << 20) * dtype.row_bytes(1)];
            let mut left = n;
            while left > 0 {
                let m = left.min(1 << 20);
                fill(&mut buf[..m * dtype.row_bytes(1)], dtype, *std, &mut rng);
                f.write_all(&buf[..m * dtype.row_bytes(1)])?;
                left -= m;
                done += m * dtype.row_bytes(1);
                progress(done, total);
            }
        }
        f.flush().with_context(|| format!("cannot write {}", path.display()))?;
    }
    if n_shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    Ok(())
}

/// Fills `buf` with values uniform in ±std·√3 (or ones when `std` is None).
fn fill(buf: &mut [u8], dtype: Format, std: Option<f32>, rng: &mut u64) {
    let es = dtype.row_bytes(1);
    let a = std.map(|s| s * 3f32.sqrt());
    for chunk in buf.chunks_exact_mut(es) {
        let v = match a {
            None => 1.0,
            Some(a) => {
                // xorshift64*
                *rng ^= *rng >> 12;
                *rng ^= *rng << 25;
                *rng ^= *rng >> 27;
                let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
                ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
            }
        };
        match dtype {
            Format::F32 => chunk.copy_from_slice(&v.to_le_bytes()),
            Format::BF16 => chunk.copy_from_slice(&qwick_backend::format::f32_to_bf16(v).to_le_bytes()),
            _ => chunk.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        }
    }
}
