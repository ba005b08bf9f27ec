//! `qwick quantize` and `qwick make-random --type`, end to end: files that qwick and the GGUF
//! readers load, bytes equal to llama-quantize's where GGML's reference quantizers are
//! deterministic, split output loading as one model, and bad input refused before anything is
//! written.

mod common;

use common::{greedy_model, ok, qwick, root, scratch};
use std::path::{Path, PathBuf};

fn fails(args: &[&str], needle: &str) {
    let o = qwick(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "qwick {} succeeded", args.join(" "));
    assert!(err.contains(needle), "qwick {}: expected {needle:?} in {err}", args.join(" "));
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "{err}");
}

fn fixture(name: &str) -> String {
    root().join("tests/gguf").join(name).to_str().unwrap().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Greedy generation as `run --json` reports it.
fn generate(model: &str) -> (String, serde_json::Value) {
    let out = ok(&[
        "run",
        "--model",
        model,
        "--threads",
        "1",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "--prompt",
        "Hello! Who are you?",
        "--no-think",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (v["text"].as_str().unwrap().to_string(), v["token_ids"].clone())
}

#[test]
fn a_hugging_face_folder_becomes_a_gguf_that_generates_the_same() {
    let d = scratch("quantize", "hf");
    let model = greedy_model("quantize");
    // BF16 holds the same values as the folder: same tokenizer, template and weights, so the
    // same greedy tokens.
    let bf16 = d.join("greedy-BF16.gguf");
    ok(&["quantize", "--model", model, "--type", "BF16", "--out", s(&bf16)]);
    assert_eq!(generate(s(&bf16)), generate(model));
    // Quantized: loads, and its metadata say what it is.
    let q8 = d.join("greedy-Q8_0.gguf");
    ok(&["quantize", "--model", model, "--type", "q8_0", "--out", s(&q8), "--name", "greedy"]);
    let g = qwick_gguf::GgufFile::open(&q8).unwrap();
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(7));
    assert_eq!(g.get_u64("general.quantization_version").unwrap(), Some(2));
    assert_eq!(g.get_str("general.name").unwrap(), Some("greedy"));
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("qwen2"));
    assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id").unwrap(), Some(151645));
    assert!(g.get_str("tokenizer.chat_template").unwrap().is_some_and(|t| t.contains("enable_thinking")));
    assert_eq!(g.get_strings("tokenizer.ggml.tokens").unwrap().unwrap().len(), 151936);
    let (text, _) = generate(s(&q8));
    assert!(!text.is_empty());
    assert!(!std::fs::read_dir(&d).unwrap().any(|e| e.unwrap().path().to_string_lossy().ends_with(".partial")));
}

/// Tensors of two GGUF files by name: (type, bytes).
fn tensors(path: &str) -> Vec<(String, u32, Vec<u8>)> {
    let g = qwick_gguf::GgufFile::open(Path::new(path)).unwrap();
    g.tensors.iter().map(|t| (t.name.clone(), t.ggml_type, g.data(t).to_vec())).collect()
}

#[test]
fn requantized_bytes_equal_llama_quantize_and_errors_match() {
    let d = scratch("quantize", "bytes");
    let src = fixture("dense-F32.gguf");
    let f32s = tensors(&src);
    // (file type, the llama-quantize --pure fixture in its base format)
    for (ft, base) in [
        ("Q8_0", "Q8_0"),
        ("Q4_0", "Q4_0"),
        ("Q4_1", "Q4_1"),
        ("Q5_0", "Q5_0"),
        ("Q5_1", "Q5_1"),
        ("Q4_K_S", "Q4_K"),
        ("Q5_K_S", "Q5_K"),
        ("Q6_K", "Q6_K"),
        ("Q2_K", "Q2_K"),
        ("Q3_K_S", "Q3_K"),
    ] {
        let out = d.join(format!("dense-{ft}.gguf"));
        ok(&["quantize", "--model", &src, "--type", ft, "--out", s(&out)]);
        let theirs = tensors(&fixture(&format!("dense-{base}.gguf")));
        let mut compared = 0;
        for (name, ty, bytes) in tensors(s(&out)) {
            let (_, their_ty, their_bytes) = theirs.iter().find(|t| t.0 == name).unwrap();
            if ty != *their_ty || ty == 0 {
                continue;
            }
            let f = qwick_backend::Format::from_ggml_type(ty).unwrap();
            let x = &f32s.iter().find(|t| t.0 == name).unwrap().2;
            let x: Vec<f32> = x.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let rms = |b: &[u8]| {
                let y = f.to_f32_vec(b);
                (x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
            };
            let (mine, theirs) = (rms(&bytes), rms(their_bytes));
            assert!(mine <= theirs * 1.01, "{ft} {name}: rms {mine:e} vs llama-quantize {theirs:e}");
            if f.block() == 32 {
                let same =
                    bytes.chunks(f.block_bytes()).zip(their_bytes.chunks(f.block_bytes())).filter(|(a, b)| a == b);
                let share = same.count() as f64 / (bytes.len() / f.block_bytes()) as f64;
                assert!(share > 0.999, "{ft} {name}: {share:.4} of blocks equal llama-quantize's");
            }
            compared += 1;
        }
        assert!(compared >= 4, "{ft}: only {compared} tensors compared");
    }
}

fn logits(model: &str, out: &Path) -> Vec<u8> {
    ok(&["logits", "--model", model, "--tokens", "1,2,3,4,5,6,7,8", "--out", s(out), "--threads", "1"]);
    std::fs::read(out).unwrap()
}

#[test]
fn split_output_loads_as_one_model() {
    let d = scratch("quantize", "split");
    let src = fixture("dense-F32.gguf");
    let whole = d.join("whole.gguf");
    ok(&["quantize", "--model", &src, "--type", "Q8_0", "--out", s(&whole)]);
    let split = d.join("model.gguf");
    ok(&["quantize", "--model", &src, "--type", "Q8_0", "--out", s(&split), "--split-max-size", "100K"]);
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("model-"))
        .collect();
    parts.sort();
    assert!(parts.len() >= 3, "{parts:?}");
    let n = parts.len();
    assert!(parts[0].ends_with(format!("model-00001-of-{n:05}.gguf")), "{parts:?}");
    assert_eq!(logits(s(&parts[0]), &d.join("a.npy")), logits(s(&whole), &d.join("b.npy")));
    // A folder holding only the parts is that model.
    let folder = d.join("parts");
    std::fs::create_dir_all(&folder).unwrap();
    for p in &parts {
        std::fs::copy(p, folder.join(p.file_name().unwrap())).unwrap();
    }
    assert_eq!(logits(s(&folder), &d.join("f.npy")), logits(s(&whole), &d.join("b.npy")));
    // As a requantization source too.
    let again = d.join("again.gguf");
    ok(&["quantize", "--model", s(&parts[0]), "--type", "Q8_0", "--out", s(&again)]);
    assert_eq!(tensors(s(&again)).len(), tensors(s(&whole)).len());
    fails(&["logits", "--model", s(&parts[1]), "--tokens", "1", "--out", s(&d.join("c.npy"))], "open the first part");
    std::fs::remove_file(&parts[n - 1]).unwrap();
    fails(&["logits", "--model", s(&parts[0]), "--tokens", "1", "--out", s(&d.join("c.npy"))], "cannot open");
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let d = scratch("quantize", "bad");
    let out = d.join("out.gguf");
    let src = fixture("dense-F32.gguf");
    fails(&["quantize", "--model", &src, "--type", "Q4_K_X", "--out", s(&out)], "valid types: F32, F16, BF16, Q8_0");
    // A source missing a tensor.
    let broken = d.join("model");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(greedy_model("quantize")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, broken.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = broken.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["num_hidden_layers"] = serde_json::json!(c["num_hidden_layers"].as_u64().unwrap() + 1);
    std::fs::write(&cfg, c.to_string()).unwrap();
    fails(&["quantize", "--model", s(&broken), "--type", "Q8_0", "--out", s(&out)], "not found");
    fails(&["quantize", "--model", s(&d.join("nothing")), "--type", "Q8_0", "--out", s(&out)], "nothing");
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model")], "files left behind: {left:?}");
}

#[test]
fn random_quantized_checkpoints_load_and_run() {
    let d = scratch("quantize", "random");
    let cfg = root().join("tests/configs/bench-Qwen3-30B-A3B-6layers.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    // Small widths (a few MB on disk), the real layer structure (MoE, 8 of 128 experts); widths
    // of one K-quant super-block so that Q4_K and Q6_K are chosen.
    c["num_hidden_layers"] = 2.into();
    c["vocab_size"] = 512.into();
    c["hidden_size"] = 256.into();
    c["moe_intermediate_size"] = 256.into();
    c["intermediate_size"] = 512.into();
    c["num_attention_heads"] = 4.into();
    c["num_key_value_heads"] = 2.into();
    c["head_dim"] = 64.into();
    let small = d.join("config.json");
    std::fs::write(&small, c.to_string()).unwrap();
    let out = d.join("moe-Q4_K_M.gguf");
    ok(&["make-random", "--config", s(&small), "--type", "Q4_K_M", "--out", s(&out)]);
    let g = qwick_gguf::GgufFile::open(&out).unwrap();
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(15));
    let types: Vec<String> = g.tensors.iter().map(|t| qwick_gguf::type_name(t.ggml_type)).collect();
    assert!(types.contains(&"Q6_K".to_string()) && types.contains(&"Q4_K".to_string()), "{types:?}");
    let npy = d.join("l.npy");
    logits(s(&out), &npy);
    let (_, v) = qwick_model::npy::read_f32(&npy).unwrap();
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0));
}
