//! Writing GGUF (version 3): the header with every tensor declared up front, then the data
//! streamed tensor by tensor, aligned; optionally split into several files
//! (`NAME-00001-of-00003.gguf`, with `split.no`, `split.count` and `split.tensors.count`, the
//! layout llama.cpp's `gguf-split` writes: all metadata in the first file).
//!
//! Files are written under a temporary name (`….gguf.partial`) and renamed only when every
//! tensor is complete and synced; a writer dropped before [`StreamWriter::finish`] removes its
//! partial files, and [`partial_files`] lists those still open so a Ctrl-C handler can remove
//! them too.

use crate::value::{Value, DEFAULT_ALIGNMENT, MAGIC};
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A tensor to be written: name, dimensions in GGML order (`dims[0]` the row length), GGML type
/// and the exact number of data bytes.
#[derive(Clone, Debug)]
pub struct TensorDecl {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub bytes: u64,
}

/// Partial files of writers not yet finished.
static PARTIAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The temporary files of every unfinished writer (for a signal handler to remove).
pub fn partial_files() -> Vec<PathBuf> {
    PARTIAL.lock().map(|v| v.clone()).unwrap_or_default()
}

fn forget_partial(paths: &[PathBuf]) {
    if let Ok(mut v) = PARTIAL.lock() {
        v.retain(|p| !paths.contains(p));
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => string(out, s),
        Value::Array(a) => {
            out.extend_from_slice(&a.first().map_or(0, type_id).to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for e in a {
                value(out, e);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn alignment_of(metadata: &[(String, Value)]) -> u64 {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
        _ => DEFAULT_ALIGNMENT,
    }
}

/// The header of one file: magic, version 3, counts, metadata, tensor table, padding to the
/// data section.
fn header(metadata: &[(String, Value)], tensors: &[TensorDecl], alignment: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend_from_slice(&type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut off = 0u64;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        off = (off + t.bytes).next_multiple_of(alignment);
    }
    out.resize((out.len() as u64).next_multiple_of(alignment) as usize, 0);
    out
}

/// The file names of a model split in `n` parts: `NAME.gguf` → `NAME-0000i-of-0000n.gguf`.
pub fn split_paths(path: &Path, n: usize) -> Vec<PathBuf> {
    if n <= 1 {
        return vec![path.to_path_buf()];
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (1..=n).map(|i| path.with_file_name(format!("{stem}-{i:05}-of-{n:05}.gguf"))).collect()
}

/// One output file: its final path, temporary path, writer and tensors.
struct Part {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    tensors: Vec<TensorDecl>,
    header: Vec<u8>,
}

/// Streams a GGUF file (or its splits): declare everything, then [`StreamWriter::write`] the
/// tensors' bytes in declaration order, then [`StreamWriter::finish`].
pub struct StreamWriter {
    parts: Vec<Part>,
    alignment: u64,
    /// Current part, tensor within it, and bytes of that tensor written so far.
    part: usize,
    tensor: usize,
    done: u64,
    finished: bool,
}

impl StreamWriter {
    /// Creates the output (one file, or parts of at most `split_bytes` of tensor data each, a
    /// tensor never spanning two) and writes the headers.
    pub fn create(
        path: &Path,
        metadata: Vec<(String, Value)>,
        tensors: Vec<TensorDecl>,
        split_bytes: Option<u64>,
    ) -> Result<StreamWriter> {
        let alignment = alignment_of(&metadata);
        let mut groups: Vec<Vec<TensorDecl>> = vec![vec![]];
        let mut size = 0u64;
        for t in tensors {
            let b = t.bytes.next_multiple_of(alignment);
            if split_bytes.is_some_and(|m| size > 0 && size + b > m) {
                groups.push(vec![]);
                size = 0;
            }
            size += b;
            groups.last_mut().expect("one group at least").push(t);
        }
        let n = groups.len();
        let total: usize = groups.iter().map(Vec::len).sum();
        let mut parts = Vec::with_capacity(n);
        for (i, (tensors, path)) in groups.into_iter().zip(split_paths(path, n)).enumerate() {
            let mut meta = if i == 0 { metadata.clone() } else { vec![] };
            if n > 1 {
                meta.push(("split.no".into(), Value::U16(i as u16)));
                meta.push(("split.count".into(), Value::U16(n as u16)));
                meta.push(("split.tensors.count".into(), Value::I32(total as i32)));
            }
            let header = header(&meta, &tensors, alignment);
            let mut tmp = path.clone().into_os_string();
            tmp.push(".partial");
            parts.push(Part { path, tmp: tmp.into(), file: None, tensors, header });
        }
        if n > u16::MAX as usize {
            bail!("{n} split files are more than GGUF can number");
        }
        let mut w = StreamWriter { parts, alignment, part: 0, tensor: 0, done: 0, finished: false };
        for p in &mut w.parts {
            if let Some(dir) = p.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let f = std::fs::File::create(&p.tmp).with_context(|| format!("cannot create {}", p.tmp.display()))?;
            PARTIAL.lock().map_err(|_| anyhow!("writer registry poisoned"))?.push(p.tmp.clone());
            let mut f = std::io::BufWriter::with_capacity(1 << 22, f);
            f.write_all(&p.header).with_context(|| format!("cannot write {}", p.tmp.display()))?;
            p.file = Some(f);
        }
        w.skip_empty();
        Ok(w)
    }

    /// The final paths of the output files.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.parts.iter().map(|p| p.path.clone()).collect()
    }

    /// Moves past tensors with no bytes left to write.
    fn skip_empty(&mut self) {
        while self.part < self.parts.len() {
            let p = &self.parts[self.part];
            if self.tensor < p.tensors.len() && self.done < p.tensors[self.tensor].bytes {
                return;
            }
            if self.tensor < p.tensors.len() {
                self.tensor += 1;
                self.done = 0;
            } else {
                self.part += 1;
                self.tensor = 0;
            }
        }
    }

    /// The name of the tensor whose bytes come next.
    pub fn next_tensor(&self) -> Option<&str> {
        self.parts.get(self.part).and_then(|p| p.tensors.get(self.tensor)).map(|t| t.name.as_str())
    }

    /// Appends bytes of the current tensor (a tensor may come in several pieces; a piece never
    /// runs past its tensor's end).
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let Some(p) = self.parts.get_mut(self.part) else {
                bail!("{} bytes written after the last tensor", data.len());
            };
            let t = &p.tensors[self.tensor];
            let n = (t.bytes - self.done).min(data.len() as u64) as usize;
            if n < data.len() {
                bail!("tensor {}: {} bytes more than its declared {}", t.name, data.len() - n, t.bytes);
            }
            let f = p.file.as_mut().expect("open until finished");
            f.write_all(&data[..n]).with_context(|| format!("cannot write {}", p.tmp.display()))?;
            self.done += n as u64;
            data = &data[n..];
            if self.done == t.bytes {
                let pad = t.bytes.next_multiple_of(self.alignment) - t.bytes;
                if self.tensor + 1 < p.tensors.len() {
                    f.write_all(&vec![0u8; pad as usize])
                        .with_context(|| format!("cannot write {}", p.tmp.display()))?;
                }
                self.skip_empty();
            }
        }
        Ok(())
    }

    /// Checks that every tensor is complete, syncs the files and renames them into place.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if let Some(name) = self.next_tensor() {
            bail!("tensor {name} is incomplete ({} bytes written)", self.done);
        }
        for p in &mut self.parts {
            let f = p.file.take().expect("open until finished");
            let f = f.into_inner().map_err(|e| anyhow!("cannot write {}: {}", p.tmp.display(), e.error()))?;
            f.sync_all().with_context(|| format!("cannot write {}", p.tmp.display()))?;
        }
        for p in &self.parts {
            std::fs::rename(&p.tmp, &p.path)
                .with_context(|| format!("cannot rename {} to {}", p.tmp.display(), p.path.display()))?;
        }
        self.finished = true;
        forget_partial(&self.parts.iter().map(|p| p.tmp.clone()).collect::<Vec<_>>());
        Ok(self.paths())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.finished {
            for p in &mut self.parts {
                drop(p.file.take());
                let _ = std::fs::remove_file(&p.tmp);
            }
            forget_partial(&self.parts.iter().map(|p| p.tmp.clone()).collect::<Vec<_>>());
        }
    }
}

/// Builds a small GGUF file in memory (version 3): metadata in the order added, then tensors,
/// aligned. For tests and small files; models are written with [`StreamWriter`].
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(TensorDecl, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor: `dims` in GGML order (`dims[0]` the row length), `data` its bytes.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> &mut Self {
        let decl = TensorDecl { name: name.into(), dims: dims.to_vec(), ggml_type, bytes: data.len() as u64 };
        self.tensors.push((decl, data));
        self
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = alignment_of(&self.metadata);
        let decls: Vec<TensorDecl> = self.tensors.iter().map(|t| t.0.clone()).collect();
        let mut out = header(&self.metadata, &decls, alignment);
        for (_, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize((out.len() as u64).next_multiple_of(alignment) as usize, 0);
        }
        out
    }

    /// Writes the file through a temporary file renamed into place when complete.
    pub fn write(&self, path: &Path) -> Result<()> {
        let decls = self.tensors.iter().map(|t| t.0.clone()).collect();
        let mut w = StreamWriter::create(path, self.metadata.clone(), decls, None)?;
        for (_, data) in &self.tensors {
            w.write(data)?;
        }
        w.finish().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, bytes: u64) -> TensorDecl {
        TensorDecl { name: name.into(), dims: vec![bytes], ggml_type: 0, bytes }
    }

    #[test]
    fn an_unfinished_writer_leaves_no_file() {
        let d = std::env::temp_dir().join(format!("qwick-gguf-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let path = d.join("m.gguf");
        let mut w = StreamWriter::create(&path, vec![], vec![decl("a", 8), decl("b", 8)], Some(8)).unwrap();
        assert_eq!(w.paths().len(), 2);
        assert!(!partial_files().is_empty());
        w.write(&[1; 8]).unwrap();
        assert!(w.write(&[1; 9]).is_err(), "more bytes than declared");
        drop(w);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let mut w = StreamWriter::create(&path, vec![], vec![decl("a", 8), decl("b", 8)], None).unwrap();
        w.write(&[1; 8]).unwrap();
        assert!(w.finish().is_err(), "tensor b is incomplete");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let mut w = StreamWriter::create(&path, vec![], vec![decl("a", 8), decl("b", 8)], None).unwrap();
        w.write(&[1; 8]).unwrap();
        w.write(&[2; 8]).unwrap();
        assert_eq!(w.finish().unwrap(), vec![path.clone()]);
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m.gguf")]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
