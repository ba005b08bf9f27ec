//! Shared by the CLI integration tests: the repository root and the greedy test model
//! (`tests/greedy/model` plus tokenizer.json unpacked from tests/chat_refs/tokenizer.json.gz, so
//! the folder looks like a Hugging Face one) with transformers' greedy references.

#![allow(dead_code)]

use serde_json::Value;
use std::io::Read;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Runs the `qwick` binary under test.
pub fn qwick(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qwick")).args(args).output().expect("qwick runs")
}

/// Whether `qwick devices` finds a GPU adapter (lavapipe in CI); says loudly, naming `test`,
/// when not.
pub fn have_gpu(test: &str) -> bool {
    let o = qwick(&["devices", "--json"]);
    let list: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let found = list.as_array().is_some_and(|a| !a.is_empty());
    if !found {
        eprintln!("SKIPPED {test}: no GPU adapter ({})", String::from_utf8_lossy(&o.stderr).trim());
    }
    found
}

/// Runs `qwick`, expecting success; its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = qwick(args);
    assert!(o.status.success(), "qwick {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Checks that a `qwick` run (`what`) failed with one `error:` line containing `needle` and no
/// panic.
pub fn assert_one_error(o: &std::process::Output, what: &str, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {what}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one error line for {what}, got: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{needle:?} not in: {err}");
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh folder under the temp dir for one test, named for the test binary (`tag`) and
/// process, removed when dropped so that test runs leave nothing behind.
pub struct Scratch(PathBuf);

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(tag: &str, name: &str) -> Scratch {
    Scratch(process_dir(tag, name))
}

/// `qwick-{tag}-test-{pid}-{name}` under the temp dir, empty, for files shared by the tests of
/// one process (kept until a later test process sweeps it). The first call in a process removes
/// the folders of earlier test processes that are gone, whether shared or left by a crash.
pub fn process_dir(tag: &str, name: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_dead);
    let d = std::env::temp_dir().join(format!("qwick-{tag}-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sweep_dead() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("qwick-") else { continue };
        let Some((_, after)) = rest.split_once("-test-") else { continue };
        let Some(pid) = after.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The greedy model folder, assembled once per test binary.
pub fn greedy_model(tag: &str) -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = process_dir(tag, "greedy-model");
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
