//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are borrowed from the mapping, never copied.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use qwick_backend::Format;
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

/// A named tensor in some weight format, borrowed from a mapped checkpoint or owned.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub format: Format,
    pub shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor that is `range` of a mapped file (the range's length must match the shape).
    pub fn mapped(
        name: &str,
        format: Format,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        range: std::ops::Range<usize>,
    ) -> Tensor {
        Tensor { name: name.into(), format, shape, storage: Storage::Mapped(map, range) }
    }

    /// Splits a tensor along its first dimension (a stack of experts) into its slices.
    pub fn unstack(&self) -> Vec<Tensor> {
        let n = self.shape[0];
        let per = self.bytes().len() / n.max(1);
        (0..n)
            .map(|i| Tensor {
                name: format!("{}[{i}]", self.name),
                format: self.format,
                shape: self.shape[1..].to_vec(),
                storage: match &self.storage {
                    Storage::Mapped(m, r) => Storage::Mapped(m.clone(), r.start + i * per..r.start + (i + 1) * per),
                    Storage::Owned(v) => Storage::Owned(Arc::new(v[i * per..(i + 1) * per].to_vec())),
                },
            })
            .collect()
    }

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
        self.format.to_f32_vec(self.bytes())
    }

    /// Asks the kernel to drop this tensor's pages from memory (a mapped tensor is read again
    /// from the file if used later; an owned one is kept).
    pub fn release(&self) {
        if let Storage::Mapped(m, r) = &self.storage {
            qwick_backend::alloc::release_mapped(&m[r.clone()]);
        }
    }
}

struct Entry {
    file: usize,
    format: Result<Format, String>,
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
            let format = Format::from_safetensors(dt).ok_or_else(|| dt.to_string());
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
            if let Ok(d) = format {
                let want = shape.iter().product::<usize>() * d.row_bytes(1);
                if e - b != want {
                    return Err(bad(&format!("{} bytes of data for shape {shape:?} of {d} (expected {want})", e - b)));
                }
            }
            self.entries.insert(name.clone(), Entry { file, format, shape, range: data_start + b..data_start + e });
        }
        self.files.push((path.to_path_buf(), map));
        Ok(())
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        let mut ck = Checkpoint { files: vec![], entries: HashMap::new() };
        ck.add_file(path)?;
        Ok(ck)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Takes tensor `name` whatever its shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let shape =
            self.entries.get(name).map(|e| e.shape.clone()).ok_or_else(|| anyhow!("tensor {name} not found"))?;
        self.get(name, &shape)
    }

    /// Takes tensor `name`, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<String> =
                self.files.iter().map(|f| f.0.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
            anyhow!("tensor {name} not found in {}", files.join(", "))
        })?;
        let path = &self.files[e.file].0;
        let format = e
            .format
            .clone()
            .map_err(|d| anyhow!("{}: tensor {name} has dtype {d}; qwick reads BF16, F16 and F32", path.display()))?;
        if e.shape != shape {
            bail!("{}: tensor {name} has shape {:?}, expected {:?}", path.display(), e.shape, shape);
        }
        Ok(Tensor {
            name: name.into(),
            format,
            shape: e.shape.clone(),
            storage: Storage::Mapped(self.files[e.file].1.clone(), e.range.clone()),
        })
    }
}

/// Writes tensors as one safetensors file (used by `make-random` and tests).
pub fn write_safetensors(path: &Path, tensors: &[(String, Format, Vec<usize>, Vec<u8>)]) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dt, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dt.safetensors_name().expect("safetensors stores float formats"), "shape": shape, "data_offsets": [off, off + data.len()]}),
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
