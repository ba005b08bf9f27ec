//! Loading Qwen3 from safetensors checkpoints whose header is damaged: byte flips and truncations
//! of the header, and edits of its JSON (dtypes, shapes, offsets, names replaced by random
//! values). Loading fails with an error or succeeds and runs a step, never panicking.

use qwick_backend::{Ctx, Isa, ThreadPool};
use qwick_model::{Batch, Qwen3};
use qwick_sampler::Rng;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dense_tied_gqa4")
}

fn forward(model: &Qwen3) {
    let pool = ThreadPool::new(1);
    let mut kv = model.new_kv_cache(1, 16);
    let mut batch = Batch::default();
    batch.push_span(&[1, 2, 3], 0, &[0], 16, false);
    let _ = model.forward(Ctx::new(Isa::best(), &pool), &batch, &mut kv);
}

/// A random value of the kinds a header holds, often a plausible one.
fn random_value(rng: &mut Rng) -> Value {
    match rng.below(10) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(-(rng.below(1000) as i64)),
        3 => json!(u64::MAX - rng.below(10) as u64),
        4 => json!(rng.below(1 << 20)),
        5 => json!(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "Q4", ""][rng.below(8)]),
        6 => json!([rng.below(600), rng.below(600)]),
        7 => json!([rng.below(70)]),
        8 => json!([1e300, -1, "x"]),
        _ => json!({"dtype": "F32", "shape": [], "data_offsets": [0, 0]}),
    }
}

/// The header with a few fields of its tensors replaced, dropped or added.
fn edit_header(header: &Map<String, Value>, rng: &mut Rng) -> Map<String, Value> {
    let mut h = header.clone();
    let names: Vec<String> = h.keys().cloned().collect();
    for _ in 0..1 + rng.below(3) {
        let name = &names[rng.below(names.len())];
        match rng.below(6) {
            0 => {
                h.remove(name);
            }
            1 => {
                let v = h.remove(name).unwrap_or(Value::Null);
                h.insert(format!("{name}.x"), v);
            }
            2 => {
                h.insert(name.clone(), random_value(rng));
            }
            _ => {
                if let Some(Value::Object(t)) = h.get_mut(name) {
                    let field = ["dtype", "shape", "data_offsets"][rng.below(3)];
                    if rng.below(5) == 0 {
                        t.remove(field);
                    } else {
                        t.insert(field.to_string(), random_value(rng));
                    }
                }
            }
        }
    }
    h
}

#[test]
fn damaged_headers_never_panic() {
    let src = fixture();
    let file = std::fs::read(src.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let data = &file[8 + n..];
    let dir = std::env::temp_dir().join(format!("qwick-safetensors-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut rng = Rng::seed_from_u64(0x2545_F491_4F6C_DD1D);
    let (mut loaded, mut failed) = (0, 0);
    for i in 0..2000 {
        let bytes = match i % 4 {
            // Byte flips in the length and the JSON.
            0 => {
                let mut b = file.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(8 + n);
                    b[at] ^= 1 << rng.below(8);
                }
                b
            }
            // Truncated anywhere.
            1 => file[..rng.below(file.len())].to_vec(),
            // Edited JSON, with a correct length prefix.
            _ => {
                let json = serde_json::to_vec(&edit_header(&header, &mut rng)).unwrap();
                let mut b = (json.len() as u64).to_le_bytes().to_vec();
                b.extend(json);
                b.extend_from_slice(data);
                b
            }
        };
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match Qwen3::load(&dir) {
            Ok(m) => {
                forward(&m);
                true
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("model.safetensors") || msg.contains("config.json"), "{msg}");
                false
            }
        });
        match outcome {
            Ok(true) => loaded += 1,
            Ok(false) => failed += 1,
            Err(_) => panic!("iteration {i}: loading a damaged checkpoint panicked"),
        }
    }
    assert!(failed > 1000 && loaded > 0, "loaded {loaded}, failed {failed}");
    let _ = std::fs::remove_dir_all(&dir);
}
