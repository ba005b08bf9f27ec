//! GGUF, the file format of llama.cpp and Ollama: a header, typed key/value metadata, a table of
//! tensors (name, dimensions, GGML type, offset) and the tensor data, aligned.
//!
//! [`GgufFile::open`] maps a file and checks it completely before anything uses it: every
//! count, string and array against the bytes that remain, every tensor's type, shape and data
//! range against the file. A malformed file is an error naming the file and the key or tensor,
//! never a panic. Versions 2 and 3 (little-endian) are read.

use anyhow::{anyhow, bail, Result};
use memmap2::Mmap;
use qwick_backend::Format;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod value;
pub use value::{Value, DEFAULT_ALIGNMENT, MAGIC};

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous one (a row's length).
    pub dims: Vec<u64>,
    /// The GGML type id.
    pub ggml_type: u32,
    /// The weight format, when qwick reads the type.
    pub format: Option<Format>,
    /// Absolute byte range of the data in the file (empty when the format is unknown).
    pub range: std::ops::Range<usize>,
    /// Which file of a split model holds the data (0 for a single file).
    pub split: usize,
}

impl TensorInfo {
    /// Dimensions in row-major order (`[rows, cols]` for a matrix): GGML's reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A mapped, validated GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// The mapping of each file (one, or every split of a split model, in order).
    maps: Vec<Arc<Mmap>>,
    /// Metadata in file order (a split model's metadata is its first file's).
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: usize,
}

/// Bounds-checked little-endian reads over the header.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            bail!(
                "truncated while reading {} (needs {n} bytes at offset {}, file has {})",
                what(),
                self.pos,
                self.b.len()
            );
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.b.len() - self.pos)
            .ok_or_else(|| anyhow!("{}: string length {n} runs past the end of the file (truncated?)", what()))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{}: string is not valid UTF-8", what()))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<Value> {
        let b = |c: &mut Self, n| c.take(n, what);
        Ok(match ty {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => bail!("{}: bool value {v} is neither 0 nor 1", what()),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    bail!("{}: nested arrays are not supported", what());
                }
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte, so a count beyond the remaining bytes is corrupt.
                let n = usize::try_from(n).ok().filter(|&n| n <= self.b.len() - self.pos).ok_or_else(|| {
                    anyhow!("{}: array of {n} elements runs past the end of the file (truncated?)", what())
                })?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1, what)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => bail!("{}: unknown metadata value type {t}", what()),
        })
    }
}

impl GgufFile {
    /// Maps and validates a GGUF file. The first file of a split model
    /// (`NAME-00001-of-0000N.gguf`, with `split.count` metadata) opens the whole model: its
    /// siblings are found next to it and their tensors join its table.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let mut g = Self::open_one(path)?;
        let count = g.get_u64("split.count")?.unwrap_or(1) as usize;
        if count <= 1 {
            return Ok(g);
        }
        let p = path.display();
        let no = g.get_u64("split.no")?.unwrap_or(0);
        if no != 0 {
            bail!(
                "{p} is part {} of a model split in {count}; open the first part (…-00001-of-{count:05}.gguf)",
                no + 1
            );
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let suffix = format!("-00001-of-{count:05}.gguf");
        let Some(stem) = name.strip_suffix(&suffix) else {
            bail!("{p}: a model split in {count} parts must be named NAME{suffix}");
        };
        for i in 1..count {
            let sp = path.with_file_name(format!("{stem}-{:05}-of-{count:05}.gguf", i + 1));
            let part = Self::open_one(&sp).map_err(|e| anyhow!("split {} of {p}: {e:#}", i + 1))?;
            if part.get_u64("split.no")? != Some(i as u64) || part.get_u64("split.count")? != Some(count as u64) {
                bail!("{}: its split.no / split.count do not make it part {} of {count}", sp.display(), i + 1);
            }
            for mut t in part.tensors {
                t.split = i;
                if g.by_name.insert(t.name.clone(), g.tensors.len()).is_some() {
                    bail!("tensor {} appears in two splits of {p}", t.name);
                }
                g.tensors.push(t);
            }
            g.maps.extend(part.maps);
        }
        if let Some(n) = g.get_u64("split.tensors.count")? {
            if n != g.tensors.len() as u64 {
                bail!("{p}: split.tensors.count is {n} but the {count} files hold {} tensors", g.tensors.len());
            }
        }
        Ok(g)
    }

    fn open_one(path: &Path) -> Result<GgufFile> {
        let f = std::fs::File::open(path).map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;
        // Safety: the file is opened read-only; qwick does not modify model files while running.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| anyhow!("cannot map {}: {e}", path.display()))?;
        Self::parse(path, Arc::new(map)).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
        let mut c = Cursor { b: &map[..], pos: 0 };
        let hdr = || "the header".to_string();
        let magic = c.u32(&hdr).map_err(|_| anyhow!("not a GGUF file (shorter than its magic number)"))?;
        if magic != MAGIC {
            bail!("not a GGUF file (bad magic number {magic:#010x})");
        }
        let version = c.u32(&hdr)?;
        match version {
            2 | 3 => {}
            1 => bail!("GGUF version 1 is not supported (re-convert the model with a current llama.cpp)"),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => bail!("big-endian GGUF files are not supported"),
            v => bail!("unknown GGUF version {v} (qwick reads versions 2 and 3)"),
        }
        let n_tensors = c.u64(&hdr)?;
        let n_kv = c.u64(&hdr)?;
        let mut metadata = Vec::new();
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key {i}"))?;
            let what = || format!("metadata key {key}");
            let ty = c.u32(&what)?;
            let v = c.value(ty, 0, &what)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                bail!("metadata key {key} appears twice");
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.get(index.get("general.alignment").copied().unwrap_or(usize::MAX)) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some((_, v)) => bail!("metadata key general.alignment must be a power-of-two uint32, found {v:?}"),
        };
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let what = || format!("tensor {name}");
            let nd = c.u32(&what)?;
            if nd == 0 || nd > 4 {
                bail!("tensor {name}: {nd} dimensions (GGUF tensors have 1 to 4)");
            }
            let dims = (0..nd).map(|_| c.u64(&what)).collect::<Result<Vec<u64>>>()?;
            let ty = c.u32(&what)?;
            let off = c.u64(&what)?;
            raw.push((name, dims, ty, off));
        }
        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        let len = map.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, ty, off) in raw {
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let numel = numel
                .filter(|&n| n <= len.saturating_mul(8))
                .ok_or_else(|| anyhow!("tensor {name}: dimensions {dims:?} are larger than the file could hold"))?;
            let format = Format::from_ggml_type(ty);
            let range = match format {
                Some(f) => {
                    if !dims[0].is_multiple_of(f.block() as u64) {
                        bail!("tensor {name}: rows of {} values are not whole {f} blocks of {}", dims[0], f.block());
                    }
                    let bytes = numel / f.block() as u64 * f.block_bytes() as u64;
                    if off % alignment != 0 {
                        bail!("tensor {name}: data offset {off} is not a multiple of the alignment {alignment}");
                    }
                    let start = data_offset.checked_add(off).filter(|s| s.checked_add(bytes).is_some_and(|e| e <= len));
                    let Some(start) = start else {
                        bail!(
                            "tensor {name}: data ({bytes} bytes at offset {off}) runs past the end of the file \
                             ({len} bytes; truncated?)"
                        );
                    };
                    start as usize..(start + bytes) as usize
                }
                None => 0..0,
            };
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                bail!("tensor {name} appears twice");
            }
            tensors.push(TensorInfo { name, dims, ggml_type: ty, format, range, split: 0 });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            maps: vec![map],
            metadata,
            index,
            tensors,
            by_name,
            alignment,
            data_offset: data_offset as usize,
        })
    }

    /// The mapping a tensor's data borrows from (`t.range` is into it).
    pub fn map_of(&self, t: &TensorInfo) -> &Arc<Mmap> {
        &self.maps[t.split]
    }

    /// A tensor's bytes.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.maps[t.split][t.range.clone()]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn wrong_type(&self, key: &str, want: &str, v: &Value) -> anyhow::Error {
        anyhow!("{}: metadata key {key} should be {want}, found {}", self.path.display(), v.type_name())
    }

    /// The value of `key` as `read` takes it (`want` names what it should be in the error), or
    /// `None` where the key is absent.
    fn get_as<'a, T>(&'a self, key: &str, want: &str, read: impl FnOnce(&'a Value) -> Option<T>) -> Result<Option<T>> {
        self.get(key).map(|v| read(v).ok_or_else(|| self.wrong_type(key, want, v))).transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get_as(key, "a string", Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get_as(key, "a non-negative integer", Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get_as(key, "a number", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get_as(key, "a bool", Value::as_bool)
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get_as(key, "an array of strings", |v| v.as_array()?.iter().map(Value::as_str).collect())
    }

    /// An array of integers.
    pub fn get_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.get_as(key, "an array of integers", |v| v.as_array()?.iter().map(Value::as_i64).collect())
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
}

/// The GGML type name of a type id, also for types qwick does not read.
pub fn type_name(id: u32) -> String {
    match Format::from_ggml_type(id) {
        Some(f) => f.name().to_string(),
        None => match id {
            9 => "Q8_1".into(),
            15 => "Q8_K".into(),
            24 => "I8".into(),
            25 => "I16".into(),
            26 => "I32".into(),
            27 => "I64".into(),
            28 => "F64".into(),
            34 => "TQ1_0".into(),
            35 => "TQ2_0".into(),
            39 => "MXFP4".into(),
            _ => format!("type {id}"),
        },
    }
}

/// The name of a `general.file_type` value (llama.cpp's `llama_ftype`), e.g. `"Q4_K_M"`.
pub fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

mod write;
pub use write::{partial_files, GgufWriter, StreamWriter, TensorDecl};
