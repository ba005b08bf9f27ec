//! Loading Qwen3 from GGUF files: a valid file loads and runs; every kind of broken file is an
//! error naming the file and the key or tensor; thousands of truncated and bit-flipped files
//! never panic.

use qwick_backend::quant::dequant::random_blocks;
use qwick_backend::{Ctx, Format, Isa, ThreadPool};
use qwick_gguf::{GgufWriter, Value};
use qwick_model::{Batch, Qwen3};
use std::path::PathBuf;

const H: u64 = 64;
const HD: u64 = 16;
const VOCAB: u64 = 96;

/// A one-layer Qwen3 (4 heads of 16, 2 KV heads, MLP 128) with Q8_0 matrices and F32 norms;
/// `edit` may change metadata and tensors before writing.
fn tiny(edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, Vec<u64>, Format)>)) -> GgufWriter {
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("qwen3".into())),
        ("qwen3.block_count".into(), Value::U32(1)),
        ("qwen3.context_length".into(), Value::U32(256)),
        ("qwen3.embedding_length".into(), Value::U32(H as u32)),
        ("qwen3.feed_forward_length".into(), Value::U32(128)),
        ("qwen3.attention.head_count".into(), Value::U32(4)),
        ("qwen3.attention.head_count_kv".into(), Value::U32(2)),
        ("qwen3.attention.key_length".into(), Value::U32(HD as u32)),
        ("qwen3.attention.value_length".into(), Value::U32(HD as u32)),
        ("qwen3.rope.freq_base".into(), Value::F32(1e6)),
        ("qwen3.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-6)),
    ];
    let mut tensors: Vec<(String, Vec<u64>, Format)> = vec![
        ("token_embd.weight".into(), vec![H, VOCAB], Format::Q8_0),
        ("output_norm.weight".into(), vec![H], Format::F32),
        ("blk.0.attn_norm.weight".into(), vec![H], Format::F32),
        ("blk.0.attn_q.weight".into(), vec![H, 4 * HD], Format::Q8_0),
        ("blk.0.attn_k.weight".into(), vec![H, 2 * HD], Format::Q8_0),
        ("blk.0.attn_v.weight".into(), vec![H, 2 * HD], Format::Q8_0),
        ("blk.0.attn_output.weight".into(), vec![4 * HD, H], Format::Q8_0),
        ("blk.0.attn_q_norm.weight".into(), vec![HD], Format::F32),
        ("blk.0.attn_k_norm.weight".into(), vec![HD], Format::F32),
        ("blk.0.ffn_norm.weight".into(), vec![H], Format::F32),
        ("blk.0.ffn_gate.weight".into(), vec![H, 128], Format::Q8_0),
        ("blk.0.ffn_up.weight".into(), vec![H, 128], Format::Q8_0),
        ("blk.0.ffn_down.weight".into(), vec![128, H], Format::Q8_0),
    ];
    edit(&mut meta, &mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add(&k, v);
    }
    for (i, (name, dims, f)) in tensors.iter().enumerate() {
        let n: u64 = dims.iter().product();
        let data = match f {
            Format::F32 => (0..n).flat_map(|j| (1.0f32 + 0.01 * (j % 7) as f32).to_le_bytes()).collect(),
            _ => random_blocks(*f, n as usize / f.block(), i as u64),
        };
        w.add_tensor(name, dims, f.info().ggml_type, data);
    }
    w
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwick-gguf-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn forward(model: &Qwen3) -> Vec<f32> {
    let pool = ThreadPool::new(1);
    let mut kv = model.new_kv_cache(1, 16);
    let mut batch = Batch::default();
    batch.push_span(&[1, 2, 3], 0, &[0], 16, false);
    model.forward(Ctx::new(Isa::best(), &pool), &batch, &mut kv).unwrap()
}

#[test]
fn a_valid_file_loads_and_runs() {
    let path = temp("valid.gguf");
    tiny(|_, _| {}).write(&path).unwrap();
    let model = Qwen3::load(&path).unwrap();
    assert_eq!(model.config.vocab_size, VOCAB as usize);
    assert!(model.tied, "no output.weight: the head is the embedding");
    let logits = forward(&model);
    assert_eq!(logits.len(), VOCAB as usize);
    assert!(logits.iter().all(|v| v.is_finite()));
    // Version 2 has the same layout: the same model.
    let mut v2 = std::fs::read(&path).unwrap();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path2 = temp("valid_v2.gguf");
    std::fs::write(&path2, v2).unwrap();
    assert_eq!(forward(&Qwen3::load(&path2).unwrap()), logits);
}

#[test]
fn broken_files_name_the_file_and_the_key_or_tensor() {
    let valid = tiny(|_, _| {}).to_bytes();
    let check = |name: &str, bytes: Vec<u8>, want: &[&str]| {
        let path = temp(name);
        std::fs::write(&path, bytes).unwrap();
        let err = match Qwen3::load(&path) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(name), "{name}: error does not name the file: {err}");
        for w in want {
            assert!(err.contains(w), "{name}: error does not mention {w:?}: {err}");
        }
    };
    let mut bad_magic = valid.clone();
    bad_magic[0] = b'X';
    check("bad_magic.gguf", bad_magic, &["not a GGUF file"]);
    let mut version = valid.clone();
    version[4] = 9;
    check("version.gguf", version, &["version 9"]);
    check("truncated.gguf", valid[..valid.len() - 100].to_vec(), &["runs past the end", "blk.0.ffn_down.weight"]);
    check("header_cut.gguf", valid[..200].to_vec(), &["truncated"]);
    let unknown_type = tiny(|_, t| t[3].2 = Format::F32).to_bytes();
    // Patch the type id of blk.0.attn_q.weight (written as F32 = 0) to an id no format has.
    let pos = find(&unknown_type, b"blk.0.attn_q.weight") + "blk.0.attn_q.weight".len() + 4 + 16;
    let mut unknown = unknown_type.clone();
    unknown[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
    check("unknown_type.gguf", unknown, &["blk.0.attn_q.weight", "type 99"]);
    let wrong_kind = tiny(|m, _| m[1].1 = Value::String("one".into())).to_bytes();
    check("key_type.gguf", wrong_kind, &["qwen3.block_count"]);
    let missing = tiny(|_, t| t.retain(|x| x.0 != "blk.0.attn_k.weight")).to_bytes();
    check("missing.gguf", missing, &["blk.0.attn_k.weight", "not found"]);
    let shape = tiny(|_, t| t[4].1 = vec![H, 3 * HD]).to_bytes();
    check("shape.gguf", shape, &["blk.0.attn_k.weight", "shape"]);
    let arch = tiny(|m, _| m[0].1 = Value::String("llama".into())).to_bytes();
    check("arch.gguf", arch, &["general.architecture", "llama"]);
    let no_key = tiny(|m, _| m.retain(|x| x.0 != "qwen3.embedding_length")).to_bytes();
    check("no_key.gguf", no_key, &["qwen3.embedding_length"]);
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

/// Truncations and byte flips anywhere in a valid file: loading fails cleanly or succeeds, and a
/// model that loads runs a step, never panicking.
#[test]
fn corrupted_files_never_panic() {
    let valid = tiny(|_, _| {}).to_bytes();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let path = temp("fuzz.gguf");
    let (mut loaded, mut failed) = (0, 0);
    for i in 0..3000 {
        let mut bytes = valid.clone();
        if i % 3 == 0 {
            bytes.truncate(next() as usize % valid.len());
        } else {
            // Flips concentrated in the header, where the structure is.
            let span = if i % 3 == 1 { 1200.min(bytes.len()) } else { bytes.len() };
            for _ in 0..1 + next() % 6 {
                let at = next() as usize % span;
                bytes[at] ^= 1 << (next() % 8);
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match Qwen3::load(&path) {
            Ok(m) => {
                let _ = forward(&m);
                true
            }
            Err(_) => false,
        });
        match outcome {
            Ok(true) => loaded += 1,
            Ok(false) => failed += 1,
            Err(_) => panic!("iteration {i}: loading a corrupted file panicked"),
        }
    }
    assert!(failed > 500 && loaded > 100, "loaded {loaded}, failed {failed}");
}
