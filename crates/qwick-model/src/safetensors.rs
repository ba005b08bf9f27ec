//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are borrowed from the mapping, never copied.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use qwick_backend::DType;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A tensor's bytes: a range of a mapped file, or an owned buffer (for converted tensors).
#[derive(Clone)]
pub enum Storage {
    Mapped(Arc<Mmap>, std::ops::Range<usize>),
    Owned(Arc<Vec<u8>>),
}

#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped(m, r) => &m[r.clone()],
            Storage::Owned(v) => v,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor as f32 values (for small tensors such as norm weights).
    pub fn to_f32(&self) -> Vec<f32> {
        self.dtype.to_f32_vec(self.bytes())
    }

    pub fn from_f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Tensor {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor { name: name.into(), dtype: DType::F32, shape, storage: Storage::Owned(Arc::new(bytes)) }
    }
}

struct Entry {
    file: usize,
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// The tensors of a checkpoint folder, by name.
pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens the safetensors files of a model folder.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                bail!("{}: \"weight_map\" lists no files", index.display());
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read model folder {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{}: no model.safetensors, model.safetensors.index.json or *.safetensors file", dir.display());
            }
            found
        };
        let mut ck = Checkpoint { files: vec![], entries: HashMap::new() };
        for path in files {
            ck.add_file(&path)?;
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len() as usize;
        if len < 8 {
            bail!("{}: truncated safetensors file ({len} bytes, no header)", path.display());
        }
        // Safety: the file is opened read-only; qwick does not modify checkpoints while running.
        let map = Arc::new(unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?);
        let hlen = u64::from_le_bytes(map[..8].try_into().unwrap()) as usize;
        if hlen > len - 8 {
            bail!("{}: truncated safetensors file (header of {hlen} bytes, file of {len})", path.display());
        }
        let header: Value = serde_json::from_slice(&map[8..8 + hlen])
            .with_context(|| format!("{}: safetensors header is not valid JSON", path.display()))?;
        let obj =
            header.as_object().ok_or_else(|| anyhow!("{}: safetensors header is not an object", path.display()))?;
        let data_start = 8 + hlen;
        let file = self.files.len();
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| anyhow!("{}: tensor {name}: {what}", path.display());
            let dt = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
            let dtype = DType::from_safetensors(dt).ok_or_else(|| dt.to_string());
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().map(|x| x as usize).ok_or_else(|| bad("shape is not a list of integers")))
                .collect::<Result<_>>()?;
            let offs = info.get("data_offsets").and_then(|s| s.as_array()).ok_or_else(|| bad("no data_offsets"))?;
            let (b, e) = match (offs.first().and_then(|x| x.as_u64()), offs.get(1).and_then(|x| x.as_u64())) {
                (Some(b), Some(e)) if b <= e => (b as usize, e as usize),
                _ => return Err(bad("invalid data_offsets")),
            };
            if data_start + e > len {
                bail!(
                    "{}: truncated: tensor {name} needs bytes up to {} but the file has {len}",
                    path.display(),
                    data_start + e
                );
            }
            if let Ok(d) = dtype {
                let want = shape.iter().product::<usize>() * d.size();
                if e - b != want {
                    return Err(bad(&format!("{} bytes of data for shape {shape:?} of {d} (expected {want})", e - b)));
                }
            }
            self.entries.insert(name.clone(), Entry { file, dtype, shape, range: data_start + b..data_start + e });
        }
        self.files.push((path.to_path_buf(), map));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The file a tensor lives in (or the first file), for messages.
    pub fn file_of(&self, name: &str) -> &Path {
        let i = self.entries.get(name).map(|e| e.file).unwrap_or(0);
        &self.files[i].0
    }

    /// Takes tensor `name`, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> =
                self.files.iter().map(|f| f.0.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
            anyhow!("tensor {name} not found in {}", files.join(", "))
        })?;
        let path = &self.files[e.file].0;
        let dtype = e
            .dtype
            .clone()
            .map_err(|d| anyhow!("{}: tensor {name} has dtype {d}; qwick reads BF16, F16 and F32", path.display()))?;
        if e.shape != shape {
            bail!("{}: tensor {name} has shape {:?}, expected {:?}", path.display(), e.shape, shape);
        }
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape: e.shape.clone(),
            storage: Storage::Mapped(self.files[e.file].1.clone(), e.range.clone()),
        })
    }

    /// Total bytes of all tensor data.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.range.len()).sum()
    }

    /// Reads every mapped page once so later use does not wait on the disk, calling
    /// `progress(done, total)` in bytes as it goes.
    pub fn prefetch(&self, progress: &dyn Fn(usize, usize)) {
        let total: usize = self.files.iter().map(|f| f.1.len()).sum();
        let mut done = 0;
        for (_, m) in &self.files {
            let _ = m.advise(memmap2::Advice::WillNeed);
            let mut sum = 0u8;
            for (i, chunk) in m.chunks(1 << 24).enumerate() {
                for p in (0..chunk.len()).step_by(4096) {
                    sum = sum.wrapping_add(chunk[p]);
                }
                done += chunk.len();
                if i % 4 == 0 || done == total {
                    progress(done, total);
                }
            }
            std::hint::black_box(sum);
        }
        progress(total, total);
    }
}

/// Writes tensors as one safetensors file (used by `make-random` and tests).
pub fn write_safetensors(path: &Path, tensors: &[(String, DType, Vec<usize>, Vec<u8>)]) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dt, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dt.safetensors_name(), "shape": shape, "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let mut h = serde_json::to_vec(&Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (_, _, _, data) in tensors {
        f.write_all(data)?;
    }
    f.flush()?;
    Ok(())
}
