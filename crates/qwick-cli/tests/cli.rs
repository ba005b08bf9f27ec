//! The `qwick` command as users and external checks run it: `logits` output, `make-random`,
//! `bench --json`, and one clear error line (never a panic, never a partial file) for bad input.

mod common;

use common::{assert_one_error, qwick};

use qwick_model::npy::read_f32;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn scratch(name: &str) -> common::Scratch {
    common::scratch("cli", name)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

fn tokens_of(dir: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    v["tokens"].as_array().unwrap().iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

/// Runs `logits` expecting failure: non-zero exit, one `error:` line containing `needle`,
/// no panic, and no output file.
fn expect_error(model: &Path, tokens: &str, needle: &str) {
    // A folder of its own: tests run in parallel.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out_dir = scratch(&format!("err-out-{}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let out = out_dir.join("x.npy");
    let o = qwick(&["logits", "--model", model.to_str().unwrap(), "--tokens", tokens, "--out", out.to_str().unwrap()]);
    assert_one_error(&o, needle, needle);
    assert!(!out.exists(), "no partial output file");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0, "no temp files left");
}

#[test]
fn logits_writes_transformers_logits_as_npy() {
    let dir = fixture("moe_nonorm_mlponly");
    let out_dir = scratch("logits");
    let out = out_dir.join("l.npy");
    let o = qwick(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens_of(&dir),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, got) = read_f32(&out).unwrap();
    let (wshape, want) = read_f32(&dir.join("logits.npy")).unwrap();
    assert_eq!(shape, wshape);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

#[test]
fn bad_input_gets_one_clear_error() {
    let good = fixture("dense_tied_gqa4");
    let toks = tokens_of(&good);
    let tmp = scratch("bad");

    expect_error(&tmp.join("nope"), "1,2", "does not exist");
    expect_error(&good, "", "--tokens is empty");
    expect_error(&good, "1,x,3", "\"x\" is not a token id");
    expect_error(&good, "1,512,3", "token id 512 at index 1 is out of range");

    let no_config = tmp.join("no_config");
    copy_dir(&good, &no_config);
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    expect_error(&no_config, &toks, "config.json");

    let edit_config = |name: &str, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let d = tmp.join(name);
        copy_dir(&good, &d);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(d.join("config.json"), v.to_string()).unwrap();
        d
    };
    expect_error(
        &edit_config("missing_key", &|o| drop(o.remove("hidden_size"))),
        &toks,
        "missing required key \"hidden_size\"",
    );
    expect_error(
        &edit_config("arch", &|o| drop(o.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"])))),
        &toks,
        "unsupported architecture \"LlamaForCausalLM\"",
    );
    expect_error(
        &edit_config("shape", &|o| drop(o.insert("intermediate_size".into(), 100.into()))),
        &toks,
        "model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64], expected [100, 64]",
    );

    let truncated = tmp.join("truncated");
    copy_dir(&good, &truncated);
    let st = truncated.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len - 1000).unwrap();
    expect_error(&truncated, &toks, "truncated: tensor");

    // A tensor stored as I32 where a float is needed.
    let wrong_dtype = tmp.join("dtype");
    copy_dir(&good, &wrong_dtype);
    let st = wrong_dtype.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + hlen]).unwrap();
    let mut h: serde_json::Value = serde_json::from_str(header).unwrap();
    h["model.norm.weight"]["dtype"] = "I32".into();
    h["model.norm.weight"]["shape"] = serde_json::json!([32]);
    let mut hs = serde_json::to_vec(&h).unwrap();
    while hs.len() < hlen {
        hs.push(b' ');
    }
    assert_eq!(hs.len(), hlen, "header must keep its length");
    let mut patched = (hlen as u64).to_le_bytes().to_vec();
    patched.extend_from_slice(&hs);
    patched.extend_from_slice(&bytes[8 + hlen..]);
    std::fs::write(&st, patched).unwrap();
    expect_error(&wrong_dtype, &toks, "tensor model.norm.weight has dtype I32");
}

#[test]
fn make_random_sharded_checkpoint_loads_and_benches() {
    let tmp = scratch("random");
    let cfg = tmp.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "mlp_only_layers": [1],
            "rope_theta": 1000000, "max_position_embeddings": 512, "tie_word_embeddings": false, "rms_norm_eps": 1e-6})
        .to_string(),
    )
    .unwrap();
    let model = tmp.join("model");
    let o = qwick(&[
        "make-random",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--shard-gb",
        "0.0001",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(model.join("model.safetensors.index.json").exists(), "sharded");
    let out = tmp.join("l.npy");
    let o =
        qwick(&["logits", "--model", model.to_str().unwrap(), "--tokens", "1,2,3,299", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, l) = read_f32(&out).unwrap();
    assert_eq!(shape, vec![4, 300]);
    assert!(l.iter().all(|x| x.is_finite()) && l.iter().any(|&x| x != 0.0));

    let o = qwick(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--batch",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for k in ["prefill_tok_s", "decode_tok_s", "bound_tok_s", "peak_rss_bytes", "ttft_s", "bandwidth_gb_s"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert!(["f32", "bf16-dot", "bf16-fma", "amx"].contains(&v["bf16_mode"].as_str().unwrap()), "{v}");
    assert_eq!(v["kv_dtype"], "BF16", "{v}");
    // The calibration's figures of every mode (measured now or read from the cache), the
    // chosen mode among them; none where the environment forces a mode.
    let cal = v["bf16_calibration"].as_array().expect("calibration figures");
    let forced = ["QWICK_BF16", "the ISA asked for"].contains(&v["bf16_why"].as_str().unwrap());
    assert!(forced || cal.iter().any(|t| t["mode"] == v["bf16_mode"]), "{v}");
    for t in cal {
        for k in ["decode_gb_s", "batched_gb_s", "prefill_gmacs"] {
            assert!(t[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {t}");
        }
    }
    // The bf16 mode forced by the environment, and a wrong one refused.
    let model = model.to_str().unwrap();
    let bench = |mode: &str| {
        Command::new(env!("CARGO_BIN_EXE_qwick"))
            .args(["bench", "--model", model, "--prompt-len", "4", "--gen-len", "2", "--json"])
            .env("QWICK_BF16", mode)
            .output()
            .unwrap()
    };
    let o = bench("f32");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bf16_mode"], "f32");
    let o = bench("fp8");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("QWICK_BF16=fp8: expected f32, bf16-dot, bf16-fma or amx"));
    // The CPU's features capped: AVX2 at most, so bf16 products in f32; an unknown cap refused.
    let capped = |cap: &str| {
        Command::new(env!("CARGO_BIN_EXE_qwick"))
            .args(["bench", "--model", model, "--prompt-len", "4", "--gen-len", "2", "--json"])
            .env("QWICK_MAX_ISA", cap)
            .env_remove("QWICK_BF16")
            .env_remove("QWICK_ISA")
            .output()
            .unwrap()
    };
    let o = capped("avx2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(["scalar", "avx2"].contains(&v["isa"].as_str().unwrap()), "{v}");
    assert_eq!(v["bf16_mode"], "f32", "{v}");
    let o = capped("avx1024");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("QWICK_MAX_ISA=avx1024: expected scalar"), "{o:?}");

    // The calibration's cache: kept while the kernels' generation and the binary are the same,
    // measured again when either differs (a stale choice is never kept).
    let cache = scratch("bf16-cache");
    let cached = || {
        let o = Command::new(env!("CARGO_BIN_EXE_qwick"))
            .args(["bench", "--model", model, "--prompt-len", "4", "--gen-len", "2", "--json"])
            .env("XDG_CACHE_HOME", &*cache)
            .env_remove("QWICK_BF16")
            .env_remove("QWICK_ISA")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["bf16_why"].as_str().unwrap().to_string()
    };
    assert_eq!(cached(), "measured now");
    assert_eq!(cached(), "measured on this CPU model earlier");
    let file = cache.join("qwick/bf16-kernels.json");
    let mut known: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for entry in known.as_object_mut().unwrap().values_mut() {
        entry["stamp"]["kernels"] = serde_json::json!(1);
    }
    std::fs::write(&file, known.to_string()).unwrap();
    assert_eq!(cached(), "measured now");
    assert_eq!(cached(), "measured on this CPU model earlier");
}

/// Broken GGUF files: one error line naming the file and what is wrong, no panic, no output.
#[test]
fn broken_gguf_files_get_one_clear_error() {
    let good =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/gguf/dense-Q4_0.gguf")).unwrap();
    let dir = scratch("bad-gguf");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut magic = good.clone();
    magic[..4].copy_from_slice(b"GGUX");
    expect_error(&write("magic.gguf", &magic), "1,2", "magic.gguf: not a GGUF file");
    let mut version = good.clone();
    version[4..8].copy_from_slice(&77u32.to_le_bytes());
    expect_error(&write("version.gguf", &version), "1,2", "unknown GGUF version 77");
    expect_error(&write("cut.gguf", &good[..good.len() / 2]), "1,2", "runs past the end of the file");
    expect_error(&write("tiny.gguf", &good[..40]), "1,2", "truncated");
    // A token id beyond the vocabulary of a valid file.
    expect_error(&write("ok.gguf", &good), "1,99999", "99999");
}
