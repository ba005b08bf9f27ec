//! LoRA adapters in PEFT's layout (`--lora DIR`): logits with an adapter equal PEFT's
//! (`tests/lora`, written by `python/make_lora_fixtures.py` with PEFT), for a rank-8 adapter on
//! all seven projections and a rank-4 rsLoRA adapter on q and v, on the float model and (within
//! quantization error) on the same model quantized to Q8_0; adapters that do not fit the model
//! are refused with a message naming the problem.

mod common;

use common::{qwick, root, scratch};
use std::path::{Path, PathBuf};
use std::process::Output;

fn lora(name: &str) -> PathBuf {
    root().join("tests/lora").join(name)
}

fn base() -> String {
    root().join("tests/fixtures/dense_untied_gqa2").to_str().unwrap().to_string()
}

fn tokens() -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lora("tokens.json")).unwrap()).unwrap();
    v["ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn logits(model: &str, adapter: Option<&Path>, out: &Path) -> Result<Vec<f32>, String> {
    let toks = tokens();
    let mut args =
        vec!["logits", "--model", model, "--tokens", &toks, "--out", out.to_str().unwrap(), "--threads", "1"];
    if let Some(a) = adapter {
        args.extend(["--lora", a.to_str().unwrap()]);
    }
    let o = qwick(&args);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(qwick_model::npy::read_f32(out).unwrap().1)
}

/// Largest absolute difference (NaN or infinity on either side counts as infinite).
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    qwick_backend::check::worst_abs(a, b).err
}

#[test]
fn logits_with_an_adapter_equal_peft() {
    let d = scratch("lora", "peft");
    let want_base = qwick_model::npy::read_f32(&lora("base.npy")).unwrap().1;
    let got = logits(&base(), None, &d.join("b.npy")).unwrap();
    assert!(max_diff(&got, &want_base) < 1e-4, "base: {}", max_diff(&got, &want_base));
    for name in ["adapter_r8", "adapter_rslora_qv"] {
        let want = qwick_model::npy::read_f32(&lora(&format!("{name}.npy"))).unwrap().1;
        let got = logits(&base(), Some(&lora(name)), &d.join(format!("{name}.npy"))).unwrap();
        let (err, effect) = (max_diff(&got, &want), max_diff(&want, &want_base));
        assert!(effect > 100.0 * err.max(1e-6), "{name}: the adapter moves logits by {effect}, too little to test");
        assert!(err < 1e-4, "{name}: max |qwick - PEFT| = {err} (the adapter moves logits by {effect})");
    }
}

#[test]
fn quantized_bases_take_adapters_and_misfits_are_refused() {
    let d = scratch("lora", "bad");
    let out = d.join("x.npy");
    // Another model's shapes.
    let other = root().join("tests/fixtures/dense_tied_gqa4");
    let e = logits(other.to_str().unwrap(), Some(&lora("adapter_r8")), &out).unwrap_err();
    assert!(e.contains("has shape") || e.contains("do not fit"), "{e}");
    // Quantized base weights: the same model as Q8_0.
    let q = d.join("base-Q8_0.gguf");
    let o = qwick(&["quantize", "--model", &base(), "--type", "Q8_0", "--out", q.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = qwick_model::npy::read_f32(&lora("adapter_r8.npy")).unwrap().1;
    let got = logits(q.to_str().unwrap(), Some(&lora("adapter_r8")), &out).unwrap();
    let plain = logits(q.to_str().unwrap(), None, &d.join("plain.npy")).unwrap();
    let (err, effect) = (max_diff(&got, &want), max_diff(&got, &plain));
    assert!(err < 0.1 && effect > 1.0, "Q8_0 base: |qwick - PEFT| {err}, adapter effect {effect}");
    std::fs::remove_file(&out).unwrap();
    // Not an adapter folder; an adapter with settings qwick does not apply.
    let e = logits(&base(), Some(&d), &out).unwrap_err();
    assert!(e.contains("adapter_config.json"), "{e}");
    let dora = d.join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora("adapter_r8/adapter_config.json")).unwrap()).unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = logits(&base(), Some(&dora), &out).unwrap_err();
    assert!(e.contains("DoRA"), "{e}");
    assert!(!out.exists());
}

/// `qwick merge` of the base model and the rank-8 adapter into `out`.
fn merge(out: &Path, extra: &[&str]) -> Output {
    let (model, adapter) = (base(), lora("adapter_r8"));
    let mut args = vec!["merge", "--model", &model, "--lora", adapter.to_str().unwrap(), "--out"];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    qwick(&args)
}

#[test]
fn merged_folders_give_the_adapter_s_logits() {
    let d = scratch("lora", "merge");
    let want = qwick_model::npy::read_f32(&lora("adapter_r8.npy")).unwrap().1;
    let merged = d.join("merged");
    let o = merge(&merged, &["--dtype", "f32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = logits(merged.to_str().unwrap(), None, &d.join("m.npy")).unwrap();
    assert!(max_diff(&got, &want) < 1e-4, "merged f32: {}", max_diff(&got, &want));
    // In the model's own dtype (bf16): the merged weights are rounded.
    let bf16 = d.join("merged-bf16");
    let o = merge(&bf16, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = logits(bf16.to_str().unwrap(), None, &d.join("b.npy")).unwrap();
    assert!(max_diff(&got, &want) < 0.1, "merged bf16: {}", max_diff(&got, &want));
    // The output folder is not overwritten.
    let o = merge(&merged, &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not empty"));
    assert!(!d.join("merged.partial").exists());
}
