//! Shared helpers: the reference data in tests/chat_refs (made by python/make_chat_refs.py).
#![allow(dead_code)]

use qwick_chat::Tokenizer;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn refs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/chat_refs")
}

/// The `cases` of a reference file.
pub fn cases(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(refs_dir().join(file)).expect("reference file");
    let json: Value = serde_json::from_str(&text).expect("reference JSON");
    json["cases"].as_array().expect("cases").clone()
}

/// A fresh, empty folder under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("qwick-chat-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Qwen3 tokenizer.json, unpacked.
pub fn tokenizer_json() -> Vec<u8> {
    let gz = std::fs::File::open(refs_dir().join("tokenizer.json.gz")).unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gz).read_to_end(&mut json).unwrap();
    json
}

/// The Qwen3 tokenizer with its tokenizer_config.json applied, loaded once per test binary.
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let mut tok = Tokenizer::from_bytes(&tokenizer_json()).expect("load tokenizer");
        let config = std::fs::read_to_string(refs_dir().join("tokenizer_config.json")).unwrap();
        tok.apply_config(&serde_json::from_str(&config).unwrap()).expect("apply tokenizer_config.json");
        tok
    })
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}
