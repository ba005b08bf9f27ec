//! LoRA adapters in PEFT's layout: `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! `use_rslora`, ...) and `adapter_model.safetensors`, whose tensors are named after the module
//! they adapt: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `….lora_B.weight` (`[out, r]`). An adapter changes a weight `W` to `W + s · B · A`, with
//! `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA), which is what PEFT adds to the
//! module's output.

use crate::config::Config;
use crate::names::{self, Role};
use crate::safetensors::Checkpoint;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The projections an adapter may target, by PEFT's module names.
pub const MODULES: [(&str, Role); 7] = [
    ("q_proj", Role::Q),
    ("k_proj", Role::K),
    ("v_proj", Role::V),
    ("o_proj", Role::O),
    ("gate_proj", Role::Gate),
    ("up_proj", Role::Up),
    ("down_proj", Role::Down),
];

/// A LoRA adapter.
pub struct Adapter {
    pub dir: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// Targeted modules, by PEFT name (`q_proj`, ...).
    pub targets: Vec<&'static str>,
    /// `base_model_name_or_path` of the config, if any.
    pub base_model: Option<String>,
    weights: Checkpoint,
}

/// A's and B's names for the weight named `hf` (`model.layers.0.self_attn.q_proj.weight`).
fn lora_names(hf: &str) -> (String, String) {
    let m = hf.strip_suffix(".weight").unwrap_or(hf);
    (format!("base_model.model.{m}.lora_A.weight"), format!("base_model.model.{m}.lora_B.weight"))
}

impl Adapter {
    /// Reads an adapter folder, refusing settings qwick does not apply.
    pub fn open(dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read {} (a PEFT LoRA adapter folder has one)", cfg_path.display()))?;
        let c: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
        let p = cfg_path.display();
        if let Some(t) = c["peft_type"].as_str() {
            if t != "LORA" {
                bail!("{p}: peft_type is {t:?}; qwick applies LORA adapters");
            }
        }
        let rank = c["r"].as_u64().filter(|&r| r > 0).ok_or_else(|| anyhow!("{p}: \"r\" must be a positive integer"))?
            as usize;
        let alpha = c["lora_alpha"].as_f64().ok_or_else(|| anyhow!("{p}: \"lora_alpha\" must be a number"))?;
        let rslora = c["use_rslora"].as_bool().unwrap_or(false);
        if !matches!(c["bias"].as_str(), None | Some("none")) {
            bail!("{p}: bias {} is not supported (qwick applies adapters with bias \"none\")", c["bias"]);
        }
        for key in ["modules_to_save", "layers_to_transform", "trainable_token_indices"] {
            if !(c[key].is_null() || c[key].as_array().is_some_and(Vec::is_empty)) {
                bail!("{p}: {key} is set ({}); qwick applies adapters without it", c[key]);
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if c[key].as_object().is_some_and(|o| !o.is_empty()) {
                bail!("{p}: {key} is set; qwick applies one rank and alpha to every module");
            }
        }
        if c["lora_bias"].as_bool() == Some(true) {
            bail!("{p}: adapters with lora_bias are not supported");
        }
        if c["use_dora"].as_bool() == Some(true) {
            bail!("{p}: DoRA adapters (use_dora) are not supported");
        }
        if c["fan_in_fan_out"].as_bool() == Some(true) {
            bail!("{p}: fan_in_fan_out adapters are not supported");
        }
        let names: Vec<String> = match &c["target_modules"] {
            Value::String(s) if s == "all-linear" => MODULES.iter().map(|m| m.0.to_string()).collect(),
            Value::String(s) => bail!("{p}: target_modules {s:?} is a pattern; qwick takes a list of module names"),
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("{p}: target_modules must be a list of module names"))?,
            other => bail!("{p}: target_modules must be a list of module names, found {other}"),
        };
        let mut targets = Vec::new();
        for n in &names {
            let short = n.rsplit('.').next().unwrap_or(n);
            match MODULES.iter().find(|m| m.0 == short) {
                Some(m) => targets.push(m.0),
                None => bail!(
                    "{p}: target module {n:?} is not one qwick adapts (q_proj, k_proj, v_proj, o_proj, gate_proj, \
                     up_proj, down_proj)"
                ),
            }
        }
        targets.sort();
        targets.dedup();
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            bail!("{}: adapter_model.safetensors not found (qwick reads safetensors adapters)", dir.display());
        }
        let weights = Checkpoint::open_file(&file)?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            rank,
            alpha,
            rslora,
            targets,
            base_model: c["base_model_name_or_path"].as_str().map(str::to_string),
            weights,
        })
    }

    /// The factor of `B · A`.
    pub fn scaling(&self) -> f32 {
        let r = self.rank as f64;
        (if self.rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    fn targets(&self, role: Role) -> bool {
        MODULES.iter().any(|m| m.1 == role && self.targets.contains(&m.0))
    }

    /// `(A [r, in], B [out, r])` as f32 for weight `role` of layer `l` (`[out, in]`), if the
    /// adapter targets it; a targeted weight without both tensors, or with other shapes, is an
    /// error naming the tensor.
    pub fn pair(&self, role: Role, l: usize, out: usize, inp: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.targets(role) {
            return Ok(None);
        }
        let (a, b) = lora_names(&names::hf(role, l, 0));
        let ctx = |e: anyhow::Error| anyhow!("adapter {}: {e:#} (does it belong to this model?)", self.dir.display());
        let a = self.weights.get(&a, &[self.rank, inp]).map_err(ctx)?.to_f32();
        let b = self.weights.get(&b, &[out, self.rank]).map_err(ctx)?.to_f32();
        Ok(Some((a, b)))
    }

    /// Checks that every tensor of the adapter is one qwick applies to a model of config `c`
    /// (no tensors for layers or modules the model lacks, none for MoE experts).
    pub fn check(&self, c: &Config) -> Result<()> {
        let mut known = BTreeSet::new();
        for l in 0..c.num_hidden_layers {
            for (_, role) in MODULES {
                let sparse_mlp = c.is_sparse(l) && matches!(role, Role::Gate | Role::Up | Role::Down);
                if self.targets(role) && !sparse_mlp {
                    let (a, b) = lora_names(&names::hf(role, l, 0));
                    known.insert(a);
                    known.insert(b);
                }
            }
        }
        let mut unknown: Vec<&str> = self.weights.names().filter(|n| !known.contains(*n)).collect();
        unknown.sort();
        if let Some(first) = unknown.first() {
            bail!(
                "adapter {}: {} tensor(s) that do not fit this model ({} layers{}), e.g. {first}",
                self.dir.display(),
                unknown.len(),
                c.num_hidden_layers,
                if c.moe.is_some() { "; on MoE models qwick adapts the attention projections" } else { "" },
            );
        }
        Ok(())
    }
}

/// What `adapter_config.json` says of an adapter qwick writes.
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub dropout: f64,
    /// PEFT module names (`q_proj`, ...).
    pub targets: Vec<&'static str>,
    pub base_model: Option<String>,
}

/// One adapted weight: `role` of layer `layer`, `a` `[r, in]`, `b` `[out, r]`.
pub struct AdapterPair<'a> {
    pub role: Role,
    pub layer: usize,
    pub inp: usize,
    pub out: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
}

/// Writes an adapter folder in PEFT's layout (what [`Adapter::open`] and PEFT's
/// `PeftModel.from_pretrained` read): `adapter_config.json` and `adapter_model.safetensors`
/// (f32), each written to a temporary name and renamed when complete.
pub fn write_adapter(dir: &Path, c: &AdapterConfig, pairs: &[AdapterPair]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        let (a, b) = lora_names(&names::hf(p.role, p.layer, 0));
        let bytes = |x: &[f32]| qwick_backend::format::f32_bytes(x).to_vec();
        tensors.push((a, qwick_backend::Format::F32, vec![c.rank, p.inp], bytes(p.a)));
        tensors.push((b, qwick_backend::Format::F32, vec![p.out, c.rank], bytes(p.b)));
    }
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    let mut targets = c.targets.clone();
    targets.sort();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": c.base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": c.rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
        "revision": null,
    });
    let file = dir.join("adapter_model.safetensors");
    let tmp = dir.join("adapter_model.safetensors.partial");
    crate::safetensors::write_safetensors(&tmp, &tensors)?;
    std::fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))?;
    let cfg = dir.join("adapter_config.json");
    let tmp = dir.join("adapter_config.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &cfg).with_context(|| format!("cannot write {}", cfg.display()))?;
    Ok(())
}

/// `w += s · B · A` for `w` `[out, in]` as f32, `a` `[r, in]`, `b` `[out, r]`.
pub fn merge_into(w: &mut [f32], a: &[f32], b: &[f32], s: f32, r: usize) {
    let inp = a.len() / r.max(1);
    for (row, bo) in w.chunks_exact_mut(inp).zip(b.chunks_exact(r)) {
        for (k, &bk) in bo.iter().enumerate() {
            let f = s * bk;
            for (x, &ak) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                *x += f * ak;
            }
        }
    }
}

/// Writes the model folder `src` with adapter `a` merged into its weights as a new Hugging
/// Face folder `out` (one `model.safetensors`, the other files copied): weights in `dtype`, or
/// each in its stored format when `None`. Written tensor by tensor into `out.partial`, renamed
/// when complete.
pub fn merge_folder(src: &Path, a: &Adapter, out: &Path, dtype: Option<qwick_backend::Format>) -> Result<()> {
    use qwick_backend::Format;
    use std::io::Write;
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty", out.display());
    }
    if let Some(f) = dtype.filter(|f| !f.is_float()) {
        bail!("merged weights are written as f32, bf16 or f16, not {f}");
    }
    let config = Config::from_file(&src.join("config.json"))?;
    a.check(&config)?;
    let ck = Checkpoint::open(src)?;
    let mut targets = std::collections::HashMap::new();
    for l in 0..config.num_hidden_layers {
        for (_, role) in MODULES {
            targets.insert(names::hf(role, l, 0), (role, l));
        }
    }
    let mut tensors: Vec<crate::safetensors::Tensor> = ck.names().map(|n| ck.tensor(n)).collect::<Result<Vec<_>>>()?;
    tensors.sort_by(|x, y| x.name.cmp(&y.name));
    let tmp = PathBuf::from(format!("{}.partial", out.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        for e in std::fs::read_dir(src)? {
            let p = e?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if p.is_file() && !name.ends_with(".safetensors") && name != "model.safetensors.index.json" {
                std::fs::copy(&p, tmp.join(&name)).with_context(|| format!("cannot copy {}", p.display()))?;
            }
        }
        if let Some(f) = dtype {
            let cfg_path = tmp.join("config.json");
            let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
            let name = match f {
                Format::F32 => "float32",
                Format::F16 => "float16",
                _ => "bfloat16",
            };
            if let Some(o) = c.as_object_mut() {
                let key = if o.contains_key("dtype") { "dtype" } else { "torch_dtype" };
                o.insert(key.into(), name.into());
            }
            std::fs::write(&cfg_path, serde_json::to_string_pretty(&c)?)?;
        }
        let out_format = |t: &crate::safetensors::Tensor| dtype.unwrap_or(t.format);
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for t in &tensors {
            let f = out_format(t);
            let n = t.numel() * f.row_bytes(1);
            let name = f.safetensors_name().expect("float formats have safetensors names");
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": name, "shape": t.shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut h = serde_json::to_vec(&Value::Object(header))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = tmp.join("model.safetensors");
        let mut w = std::io::BufWriter::with_capacity(
            1 << 22,
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let s = a.scaling();
        for t in &tensors {
            let mut v = t.to_f32();
            if let Some(&(role, l)) = targets.get(&t.name) {
                if let Some((am, bm)) = a.pair(role, l, t.shape[0], t.shape[1])? {
                    merge_into(&mut v, &am, &bm, s, a.rank);
                }
            }
            let f = out_format(t);
            let mut bytes = vec![0u8; v.len() * f.row_bytes(1)];
            f.encode_floats(&v, &mut bytes);
            w.write_all(&bytes).with_context(|| format!("cannot write {}", path.display()))?;
            t.release();
        }
        w.into_inner().map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        std::fs::remove_dir(out).with_context(|| format!("cannot replace {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
}
