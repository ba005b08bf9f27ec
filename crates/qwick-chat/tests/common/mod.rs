//! Shared helpers: the reference data in tests/chat_refs (made by python/make_chat_refs.py).
#![allow(dead_code)]

use qwick_chat::Tokenizer;
use serde_json::Value;
use std::collections::HashMap;
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

/// A stand-in for the Hugging Face Hub on localhost: the API's file list of any repository
/// (`/api/models/<repo>/revision/main`) and its files (`/<repo>/resolve/main/<file>`, with the
/// headers hf-hub reads: ETag, X-Repo-Commit, Content-Range), 404 for anything else. Returns
/// its address.
pub fn stand_in_hub(files: HashMap<String, Vec<u8>>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (mut start, mut last) = (0usize, usize::MAX);
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                if let Some(r) = header.trim().to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.split_once('-').unwrap();
                    (start, last) = (a.parse().unwrap(), b.parse().unwrap_or(usize::MAX));
                }
            }
            let ok = |status: &str, headers: String, body: &[u8]| {
                let mut r = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(body);
                r
            };
            let response = if path.starts_with("/api/models/") && path.ends_with("/revision/main") {
                let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({"rfilename": f})).collect();
                let body = serde_json::json!({"siblings": siblings, "sha": "c0ffee"}).to_string();
                ok("200 OK", "Content-Type: application/json\r\n".into(), body.as_bytes())
            } else {
                let file = path.split_once("/resolve/main/").map(|(_, f)| f.to_string());
                match file.and_then(|f| files.get(&f).map(|b| (f, b))) {
                    None => ok("404 Not Found", String::new(), b""),
                    Some((name, body)) => {
                        let end = last.min(body.len() - 1);
                        let etag: String = name.bytes().map(|b| format!("{b:02x}")).collect();
                        let headers = format!(
                            "Content-Range: bytes {start}-{end}/{}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: c0ffee\r\n",
                            body.len()
                        );
                        ok("206 Partial Content", headers, &body[start..=end])
                    }
                }
            };
            stream.write_all(&response).ok();
        }
    });
    format!("http://{addr}")
}
