//! qwick on GGUF files written by llama.cpp's own tools (`tests/gguf`, made by
//! `python/make_gguf_fixtures.py`): tiny random Qwen3 / Qwen3-MoE models in every weight type
//! (convert_hf_to_gguf.py, then llama-quantize), with the logits transformers computes from the
//! tensors as the PyPI `gguf` package dequantizes them, and one full-vocabulary file with
//! transformers' greedy generations.
//!
//! * `qwick logits` (exact: f32 activations, weights dequantized by qwick) matches the reference to
//!   `EXACT_TOL` relative to the logits' scale, on the 100-token prompt (GEMM path) and on its first
//!   8 tokens (GEMV path);
//! * `qwick logits --fast` (8-bit activations, integer dot products) is within `FAST_TOL` × std;
//! * every ISA this CPU has gives the same for a few types;
//! * `qwick run --temperature 0` on the full-vocabulary GGUF (tokenizer and chat template from the
//!   file) generates transformers' greedy tokens from the same prompt token count.
//!
//! The observed errors are printed per file (`cargo test --release --test gguf -- --nocapture`).

mod common;

use common::qwick;

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Exact path: max |qwick - ref| / (std(ref) + |ref|) over all logits.
const EXACT_TOL: f64 = 1e-4;
/// Fast path: rms(qwick - ref) / std(ref).
const FAST_TOL: f64 = 0.02;
/// The prompt lengths checked: the whole prompt (GEMM) and a short prefix (GEMV).
const LENGTHS: [usize; 2] = [100, 8];
/// Types checked on every ISA, and the ISAs tried.
const ISA_TYPES: [&str; 6] = ["dense-Q4_0", "dense-Q4_K", "dense-Q6_K", "dense-Q8_0", "dense-IQ4_XS", "moe-Q4_K"];
/// (An ISA the CPU lacks is skipped: qwick says it "does not support" it.)
const ISAS: [&str; 6] = ["scalar", "avx2", "avx512", "avx512vnni", "avx512bf16", "amx"];

fn dir() -> PathBuf {
    common::root().join("tests/gguf")
}

fn manifest() -> &'static Value {
    static M: OnceLock<Value> = OnceLock::new();
    M.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(dir().join("MANIFEST.json")).unwrap()).unwrap())
}

/// The tiny-model fixtures (name, file), in manifest order.
fn fixtures() -> Vec<(&'static str, PathBuf)> {
    manifest()["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap(), dir().join(f["gguf"].as_str().unwrap())))
        .collect()
}

fn prompt() -> &'static [u32] {
    static T: OnceLock<Vec<u32>> = OnceLock::new();
    T.get_or_init(|| {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("tokens.json")).unwrap()).unwrap();
        v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    })
}

/// A little-endian float32 C-order .npy file: (shape, values).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&b[start..start + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{}: {header}", path.display());
    assert!(header.contains("'fortran_order': False"), "{}: {header}", path.display());
    let s = &header[header.find("'shape': (").unwrap() + 10..];
    let shape: Vec<usize> = s[..s.find(')').unwrap()]
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().unwrap())
        .collect();
    let data: Vec<f32> =
        b[start + len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}", path.display());
    (shape, data)
}

/// The reference logits of a fixture: [100, vocab].
fn reference(name: &str) -> (usize, Vec<f32>) {
    let (shape, data) = read_npy(&dir().join(format!("{name}.npy")));
    assert_eq!(shape.len(), 2);
    assert_eq!(shape[0], prompt().len());
    (shape[1], data)
}

fn scratch(name: &str) -> common::Scratch {
    common::scratch("gguf", name)
}

/// `qwick logits ARGS` on the first `n` prompt tokens: the logits, or qwick's stderr when it
/// fails.
fn logits(model: &Path, n: usize, fast: bool, extra: &[&str]) -> Result<Vec<f32>, String> {
    let stem = model.file_stem().unwrap().to_str().unwrap();
    let tag = format!("{stem}-{n}-{}-{}", if fast { "fast" } else { "exact" }, extra.join("-").replace(':', "_"));
    let d = scratch(&tag);
    let out = d.join("logits.npy");
    let toks: Vec<String> = prompt()[..n].iter().map(u32::to_string).collect();
    let toks = toks.join(",");
    // Two threads for the long prompt (work split across threads), one for the short one.
    let threads = if n > 8 { "2" } else { "1" };
    let mut args =
        vec!["logits", "--model", model.to_str().unwrap(), "--tokens", &toks, "--out", out.to_str().unwrap()];
    args.extend(["--threads", threads]);
    if fast {
        args.push("--fast");
    }
    args.extend(extra);
    let o = qwick(&args);
    let r = if o.status.success() {
        let (shape, data) = read_npy(&out);
        assert_eq!(shape[0], n, "{tag}");
        Ok(data)
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    };
    let _ = std::fs::remove_dir_all(&d);
    r
}

/// Errors of `got` against the first rows of `want` (same row length): (max |d| / (std + |want|),
/// rms(d) / std), with std the reference's over those rows. Infinite when anything is not finite,
/// so a NaN never passes.
fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    let want = &want[..got.len()];
    let n = want.len() as f64;
    let mean = want.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (want.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let (mut max_rel, mut sq) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        if !d.is_finite() || !std.is_finite() || std <= 0.0 {
            return (f64::INFINITY, f64::INFINITY);
        }
        max_rel = max_rel.max(d.abs() / (std + (w as f64).abs()));
        sq += d * d;
    }
    (max_rel, (sq / n).sqrt() / std)
}

/// `err <= tol`, false for NaN.
fn within(err: f64, tol: f64) -> bool {
    err.partial_cmp(&tol).is_some_and(|o| o.is_le())
}

/// Checks `qwick logits` on every fixture in one mode; prints a table and fails listing every miss.
fn check_all(fast: bool) {
    let mut fails = Vec::new();
    let mut worst = (0.0f64, "");
    println!("{} path (tolerance {}):", if fast { "fast" } else { "exact" }, if fast { FAST_TOL } else { EXACT_TOL });
    // For the fast path, the error 8-bit activation blocks of 32 give in a float simulation of the
    // reference (from the manifest, dense models).
    let model_col = if fast { "q8-model@100" } else { "" };
    println!(
        "{:<18} {:>12} {:>12} {:>12} {:>12} {model_col:>12}",
        "file", "maxrel@100", "rms/std@100", "maxrel@8", "rms/std@8"
    );
    for (name, path) in fixtures() {
        let (vocab, want) = reference(name);
        let mut cells = Vec::new();
        for n in LENGTHS {
            match logits(&path, n, fast, &[]) {
                Ok(got) => {
                    assert_eq!(got.len(), n * vocab, "{name}: logits shape");
                    let (max_rel, rms) = errors(&got, &want);
                    let (err, tol) = if fast { (rms, FAST_TOL) } else { (max_rel, EXACT_TOL) };
                    if !within(err, tol) {
                        fails.push(format!("{name} ({n} tokens): error {err:.3e} > {tol:e}"));
                    }
                    if err > worst.0 || err.is_nan() {
                        worst = (err, name);
                    }
                    cells.push(format!("{max_rel:>12.3e} {rms:>12.3e}"));
                }
                Err(e) => {
                    fails.push(format!("{name} ({n} tokens): qwick failed: {e}"));
                    cells.push(format!("{:>25}", "FAILED"));
                }
            }
        }
        let entry = manifest()["files"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap();
        let model = match entry["q8_activations_rms_over_std"].as_f64() {
            Some(x) if fast => format!("{x:.3e}"),
            _ if fast => "-".to_string(),
            _ => String::new(),
        };
        println!("{name:<18} {} {model:>12}", cells.join(" "));
    }
    println!("worst: {:.3e} ({})", worst.0, worst.1);
    assert!(fails.is_empty(), "{} failures:\n{}", fails.len(), fails.join("\n"));
}

#[test]
fn fixtures_are_as_the_manifest_says() {
    let files = fixtures();
    assert!(files.len() >= 20, "{} fixtures", files.len());
    for f in manifest()["files"].as_array().unwrap() {
        let p = dir().join(f["gguf"].as_str().unwrap());
        let len = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).len();
        assert_eq!(len, f["bytes"].as_u64().unwrap(), "{}", p.display());
        let (vocab, want) = reference(f["name"].as_str().unwrap());
        assert_eq!(vocab, 256);
        assert!(want.iter().all(|x| x.is_finite()));
    }
    assert_eq!(prompt().len(), 100);
    assert!(prompt().iter().all(|&t| t < 256));
}

#[test]
fn exact_logits_equal_transformers_for_every_type() {
    check_all(false);
}

#[test]
fn fast_logits_are_close_to_transformers_for_every_type() {
    check_all(true);
}

#[test]
fn every_isa_gives_the_reference_logits() {
    let probe = dir().join("dense-Q8_0.gguf");
    let mut fails = Vec::new();
    for isa in ISAS {
        match logits(&probe, 8, false, &["--isa", isa]) {
            Ok(_) => {}
            Err(e) if e.contains("does not support") => {
                println!("{isa}: not supported by this CPU, skipped");
                continue;
            }
            Err(e) => panic!("--isa {isa}: {e}"),
        }
        let mut cells = Vec::new();
        for name in ISA_TYPES {
            let (_, want) = reference(name);
            let path = dir().join(format!("{name}.gguf"));
            for fast in [false, true] {
                for n in LENGTHS {
                    let (err, tol) = match logits(&path, n, fast, &["--isa", isa]) {
                        Ok(got) => {
                            let (max_rel, rms) = errors(&got, &want);
                            if fast {
                                (rms, FAST_TOL)
                            } else {
                                (max_rel, EXACT_TOL)
                            }
                        }
                        Err(e) => {
                            fails.push(format!("--isa {isa} {name} ({n} tokens, fast {fast}): qwick failed: {e}"));
                            continue;
                        }
                    };
                    if !within(err, tol) {
                        fails.push(format!("--isa {isa} {name} ({n} tokens, fast {fast}): error {err:.3e} > {tol:e}"));
                    }
                    cells.push(format!("{name}/{}/{n}: {err:.2e}", if fast { "fast" } else { "exact" }));
                }
            }
        }
        println!("{isa}: {}", cells.join(", "));
    }
    assert!(fails.is_empty(), "{} failures:\n{}", fails.len(), fails.join("\n"));
}

/// The formats the GPU kernels read; the other fixtures are refused by name on the GPU.
const GPU_TYPES: [&str; 13] =
    ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"];

#[test]
fn gpu_logits_equal_transformers_for_every_type_it_reads() {
    if !common::have_gpu("gpu_logits_equal_transformers_for_every_type_it_reads") {
        return;
    }
    let (mut fails, mut ran) = (Vec::new(), 0);
    for (name, path) in fixtures() {
        let (vocab, want) = reference(name);
        // Files of the other types hold some tensors in formats the GPU does not read.
        let lacks = name.rsplit('-').next().is_some_and(|t| !GPU_TYPES.contains(&t) && !t.ends_with("_K_M"));
        for n in LENGTHS {
            match logits(&path, n, false, &["--device", "gpu"]) {
                Ok(got) => {
                    assert_eq!(got.len(), n * vocab, "{name}: logits shape");
                    let (max_rel, _) = errors(&got, &want);
                    println!("{name} on the GPU ({n} tokens): {max_rel:.3e}");
                    if !within(max_rel, EXACT_TOL) {
                        fails.push(format!("{name} ({n} tokens) on the GPU: error {max_rel:.3e} > {EXACT_TOL:e}"));
                    }
                    ran += 1;
                }
                Err(e) if lacks && e.contains("cannot run on the GPU") => {}
                Err(e) => fails.push(format!("{name} ({n} tokens) on the GPU: qwick failed: {e}")),
            }
        }
    }
    assert!(ran >= 20, "{ran} runs on the GPU");
    assert!(fails.is_empty(), "{} failures:\n{}", fails.len(), fails.join("\n"));
}

/// The full-vocabulary GGUF, unpacked once.
fn greedy_model() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let refs = greedy_refs();
        let gz = dir().join(refs["gguf"].as_str().unwrap());
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap()).read_to_end(&mut raw).unwrap();
        assert_eq!(raw.len() as u64, manifest()["greedy"]["bytes"].as_u64().unwrap());
        let p = common::process_dir("gguf", "greedy").join(gz.file_stem().unwrap());
        std::fs::write(&p, raw).unwrap();
        p
    })
}

fn greedy_refs() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| serde_json::from_str(&std::fs::read_to_string(dir().join("greedy.json")).unwrap()).unwrap())
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

/// `qwick run --json` greedy on a reference case.
fn run_case(c: &Value, extra: &[&str]) -> Value {
    let n = greedy_refs()["max_new_tokens"].as_u64().unwrap().to_string();
    let model = greedy_model().to_str().unwrap();
    let mut args = vec!["run", "--model", model, "--threads", "1", "--temperature", "0", "--max-tokens", &n, "--json"];
    args.extend(["--prompt", c["prompt"].as_str().unwrap()]);
    if let Some(s) = c["system"].as_str() {
        args.extend(["--system", s]);
    }
    args.push(if c["enable_thinking"] == true { "--think" } else { "--no-think" });
    args.extend_from_slice(extra);
    let o = qwick(&args);
    assert!(o.status.success(), "qwick {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn greedy_generation_from_a_full_vocabulary_gguf_equals_transformers() {
    for c in greedy_refs()["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        // Exact multiplication: the greedy choice cannot flip (the reference's smallest arg-max gap
        // is recorded in greedy.json; exact logits agree to ~1e-5 relative).
        let v = run_case(c, &["--exact"]);
        println!("{name} (--exact): {}", v["token_ids"]);
        // The tokenizer and chat template read from the GGUF give the same prompt (its length; the
        // ids themselves are checked through the generation they lead to).
        assert_eq!(v["timings"]["prompt_tokens"], c["prompt_ids"].as_array().unwrap().len(), "{name}: prompt tokens");
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]), "{name}: generated ids");
        assert_eq!(v["text"], c["generated_text"], "{name}: generated text");
        assert_eq!(v["finish_reason"], "length", "{name}");
        // The default (fast) path: same prompt; its greedy choices may differ where the reference's
        // arg-max gap is smaller than 8-bit activations move the logits, so only reported.
        let f = run_case(c, &[]);
        assert_eq!(f["timings"]["prompt_tokens"], c["prompt_ids"].as_array().unwrap().len(), "{name}: prompt tokens");
        let (got, want) = (ids(&f["token_ids"]), ids(&c["generated_ids"]));
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        println!("{name} (fast): {same} of {} tokens as the reference: {}", want.len(), f["token_ids"]);
    }
}

#[test]
fn comparisons_fail_on_nan() {
    assert!(!within(f64::NAN, 1.0));
    let want = [1.0f32, -2.0, 3.0, 0.5];
    assert_eq!(errors(&want, &want), (0.0, 0.0));
    for bad in [f32::NAN, f32::INFINITY] {
        let got = [1.0f32, bad, 3.0, 0.5];
        let (max_rel, rms) = errors(&got, &want);
        assert!(!within(max_rel, EXACT_TOL) && !within(rms, FAST_TOL));
    }
}

/// A GGUF file's `pooling_type` (as llama.cpp's converter writes it for Qwen3-Embedding and
/// Qwen3-Reranker) picks what `qwick serve` serves when `--task` is not given.
#[test]
fn gguf_pooling_metadata_picks_the_served_task() {
    use std::io::BufRead;
    let g = qwick_gguf::GgufFile::open(greedy_model()).unwrap();
    let arch = g.get_str("general.architecture").unwrap().unwrap().to_string();
    for (pooling, task) in [(3u32, "Embed"), (4, "Rerank"), (0, "Generate")] {
        let mut w = qwick_gguf::GgufWriter::new();
        for (k, v) in &g.metadata {
            w.add(k, v.clone());
        }
        w.add(&format!("{arch}.pooling_type"), qwick_gguf::Value::U32(pooling));
        for t in &g.tensors {
            w.add_tensor(&t.name, &t.dims, t.ggml_type, g.data(t).to_vec());
        }
        let path = common::process_dir("gguf", "pooling").join(format!("pooling-{pooling}.gguf"));
        w.write(&path).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qwick"))
            .args([
                "serve",
                "--model",
                path.to_str().unwrap(),
                "--port",
                "0",
                "--threads",
                "1",
                "--kv-cache-tokens",
                "256",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut seen = String::new();
        for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
            let line = line.unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(" on http://") {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen.contains(&format!("task: {task}")), "pooling_type {pooling}: {seen}");
    }
}
