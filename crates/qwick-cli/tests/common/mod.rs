//! Shared by the CLI integration tests: the repository root and the greedy test model
//! (`tests/greedy/model` plus tokenizer.json unpacked from tests/chat_refs/tokenizer.json.gz, so
//! the folder looks like a Hugging Face one) with transformers' greedy references.

#![allow(dead_code)]

use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh folder under the temp dir, named for this test binary (`tag`) and process.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwick-{tag}-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The greedy model folder, assembled once per test binary.
pub fn greedy_model(tag: &str) -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch(tag, "greedy-model");
        for e in std::fs::read_dir(root().join("tests/greedy/model")).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        let gz = std::fs::File::open(root().join("tests/chat_refs/tokenizer.json.gz")).unwrap();
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(gz).read_to_end(&mut json).unwrap();
        std::fs::write(d.join("tokenizer.json"), json).unwrap();
        d.to_str().unwrap().to_string()
    })
}

/// transformers' greedy generations for the greedy model (`tests/greedy/refs.json`).
pub fn greedy_refs() -> &'static Value {
    static REFS: OnceLock<Value> = OnceLock::new();
    REFS.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/greedy/refs.json")).unwrap()).unwrap()
    })
}
