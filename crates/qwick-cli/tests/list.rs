//! `qwick list` on fake Hugging Face caches and Ollama stores, and `qwick run` on models named by
//! an Ollama spec and by a Hub quantization tag.

mod common;

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `qwick ARGS` with the Hugging Face cache and the Ollama store set to the given folders.
fn qwick(args: &[&str], hf: &Path, ollama: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwick"))
        .args(args)
        .env("HF_HUB_CACHE", hf)
        .env("OLLAMA_MODELS", ollama)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("qwick runs")
}

fn fixture(name: &str) -> PathBuf {
    common::root().join("tests/gguf").join(name)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A snapshot folder of `repo` in the cache at `hf`, named by `refs/main`.
fn snapshot(hf: &Path, repo: &str) -> PathBuf {
    let root = hf.join(format!("models--{}", repo.replace('/', "--")));
    write(&root.join("refs/main"), b"0123abcd");
    let snap = root.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    snap
}

/// Puts `weights` into the Ollama store at `store` as the model layer of `host/namespace/model/tag`;
/// returns the blob.
fn ollama_model(store: &Path, path: &str, weights: &[u8]) -> PathBuf {
    let hex = format!("{:016x}", weights.len() as u64 * 2_654_435_761).repeat(4);
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    write(&blob, weights);
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": weights.len()}
    ]});
    write(&store.join("manifests").join(path), manifest.to_string().as_bytes());
    blob
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "qwick failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn list_shows_the_models_of_both_stores() {
    let dir = common::scratch("list", "stores");
    let (hf, ollama) = (dir.join("hf"), dir.join("ollama"));
    let dense = snapshot(&hf, "Qwen/Qwen3-Tiny");
    write(&dense.join("config.json"), br#"{"model_type": "qwen3", "torch_dtype": "bfloat16"}"#);
    write(&dense.join("tokenizer.json"), b"{}");
    write(&dense.join("model.safetensors"), b"12345678");
    let gguf = snapshot(&hf, "o/tiny-GGUF");
    std::fs::copy(fixture("dense-Q4_K.gguf"), gguf.join("Qwen3-Tiny-Q4_K_M.gguf")).unwrap();
    let blob = ollama_model(
        &ollama,
        "registry.ollama.ai/library/qwen3/tiny",
        &std::fs::read(fixture("dense-F32.gguf")).unwrap(),
    );

    let out = stdout(&qwick(&["list"], &hf, &ollama));
    let lines: Vec<&str> = out.lines().collect();
    let row = |spec: &str| {
        *lines.iter().find(|l| l.starts_with(&format!("{spec} "))).unwrap_or_else(|| panic!("no {spec} in:\n{out}"))
    };
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(words(lines[0]), ["MODEL", "FORMAT", "TYPE", "ARCH", "SIZE"], "{out}");
    assert_eq!(words(row("Qwen/Qwen3-Tiny")), ["Qwen/Qwen3-Tiny", "safetensors", "bfloat16", "qwen3", "8", "B"]);
    assert_eq!(words(row("o/tiny-GGUF:Q4_K_M")), ["o/tiny-GGUF:Q4_K_M", "gguf", "Q4_K_M", "qwen3", "296.6", "KiB"]);
    assert_eq!(words(row("ollama:qwen3:tiny")), ["ollama:qwen3:tiny", "gguf", "F32", "qwen3", "2.0", "MiB"]);
    // Columns are aligned: each starts at the same place on every line of the table.
    let table = &lines[..4];
    for column in ["FORMAT", "TYPE", "ARCH"] {
        let at = lines[0].find(column).unwrap();
        assert!(table.iter().all(|l| l[at - 2..at] == *"  " && &l[at..at + 1] != " "), "{column}:\n{out}");
    }
    let ends: Vec<usize> = table.iter().map(|l| l.len()).collect();
    assert!(ends.iter().all(|&e| e == ends[0]), "sizes are right-aligned:\n{out}");
    assert!(out.contains(&format!("Hugging Face cache: {} (2 models)", hf.display())), "{out}");
    assert!(out.contains(&format!("Ollama store: {} (1 model)", ollama.display())), "{out}");

    let v: Value = serde_json::from_str(&stdout(&qwick(&["list", "--json"], &hf, &ollama))).unwrap();
    assert_eq!(v["huggingface_cache"], hf.to_str().unwrap());
    assert_eq!(v["ollama_store"], ollama.to_str().unwrap());
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 3, "{v}");
    let m = models.iter().find(|m| m["spec"] == "ollama:qwen3:tiny").unwrap();
    assert_eq!(m["path"], blob.to_str().unwrap());
    assert_eq!(
        (m["store"].as_str(), m["format"].as_str(), m["type"].as_str()),
        (Some("ollama"), Some("gguf"), Some("F32"))
    );
    assert_eq!(m["bytes"], std::fs::metadata(fixture("dense-F32.gguf")).unwrap().len());
    let m = models.iter().find(|m| m["spec"] == "o/tiny-GGUF:Q4_K_M").unwrap();
    assert_eq!(
        (m["store"].as_str(), m["arch"].as_str(), &m["problem"]),
        (Some("huggingface"), Some("qwen3"), &Value::Null)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn list_with_empty_stores_says_where_it_looked() {
    let dir = common::scratch("list", "empty");
    let out = stdout(&qwick(&["list"], &dir, &dir.join("absent")));
    assert!(out.starts_with("no models found"), "{out}");
    assert!(out.contains(&format!("Hugging Face cache: {} (0 models)", dir.display())), "{out}");
    assert!(out.contains(&format!("Ollama store: {} (not found)", dir.join("absent").display())), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `qwick run --json` greedy on `model`: the generated token ids.
fn greedy_ids(model: &str, hf: &Path, ollama: &Path) -> Value {
    let args = ["run", "--model", model, "--prompt", "Hello", "--no-think", "--temperature", "0", "--max-tokens", "4"];
    let out = stdout(&qwick(&[&args[..], &["--threads", "1", "--json"]].concat(), hf, ollama));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["token_ids"].clone()
}

#[test]
fn run_loads_ollama_models_and_hub_tags() {
    let dir = common::scratch("list", "run");
    let (hf, ollama) = (dir.join("hf"), dir.join("ollama"));
    // The full-vocabulary test model (tests/gguf/greedy-Q4_0.gguf.gz), as an Ollama blob and as a
    // file of a GGUF repository in the cache.
    let mut weights = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture("greedy-Q4_0.gguf.gz")).unwrap())
        .read_to_end(&mut weights)
        .unwrap();
    let file = snapshot(&hf, "o/greedy-GGUF").join("greedy-Q4_0.gguf");
    write(&file, &weights);
    ollama_model(&ollama, "registry.ollama.ai/library/greedy/q4", &weights);
    ollama_model(&ollama, "hf.co/o/greedy-GGUF/Q4_0", &weights);

    let want = greedy_ids(file.to_str().unwrap(), &hf, &ollama);
    assert_eq!(want.as_array().map(Vec::len), Some(4), "{want}");
    for spec in ["ollama:greedy:q4", "ollama:hf.co/o/greedy-GGUF:Q4_0", "o/greedy-GGUF:q4_0"] {
        assert_eq!(greedy_ids(spec, &hf, &ollama), want, "{spec}");
    }

    // Models the stores lack: one line naming where qwick looked.
    let o = qwick(&["run", "--model", "ollama:greedy:q8", "--prompt", "Hello"], &hf, &ollama);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains(ollama.to_str().unwrap()) && e.contains("greedy:q4"), "{e}");
    let o = qwick(&["run", "--model", "o/greedy-GGUF:Q8_0", "--prompt", "Hello"], &hf, &ollama);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("other tags: Q4_0") && e.contains("--include \"*Q8_0*\""), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
