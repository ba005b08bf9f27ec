//! The per-tensor formats of every file type equal llama.cpp's choices
//! (`tests/quantize/mixes.json`, written by `python/make_quantize_refs.py` from llama-quantize's
//! output on models of real layer counts: tied and untied dense, grouped-query attention 2 and
//! 4, a 48-layer MoE, and widths that are not whole 256-value blocks).

use qwick_convert::recipe::FileType;
use qwick_model::Config;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn mixes() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/quantize/mixes.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn every_file_type_picks_llama_cpp_formats() {
    let m = mixes();
    let mut checked = 0;
    for (model, entry) in m["models"].as_object().unwrap() {
        let mut cfg = entry["config"].clone();
        if cfg.get("architectures").is_none() {
            let moe = cfg["model_type"] == "qwen3_moe" || cfg["model_type"] == "qwen3moe";
            let arch = if moe { "Qwen3MoeForCausalLM" } else { "Qwen3ForCausalLM" };
            cfg["architectures"] = serde_json::json!([arch]);
        }
        let config = Config::from_json(&cfg).unwrap_or_else(|e| panic!("{model}: {e:#}"));
        let shapes = entry["tensor_shapes_gguf_order"].as_object().unwrap();
        for (ft_name, want) in entry["ftypes"].as_object().unwrap() {
            let ft = FileType::parse(ft_name).unwrap();
            assert_eq!(Some(ft.id as u64), want["file_type"].as_u64(), "{model} {ft_name}: general.file_type");
            let plan = qwick_convert::plan(&config, &ft);
            let got: BTreeMap<String, String> = plan.iter().map(|p| (p.name(), p.format.name().to_string())).collect();
            let want: BTreeMap<String, String> = want["tensors"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let only_got: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            let only_want: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            assert!(
                only_got.is_empty() && only_want.is_empty(),
                "{model} {ft_name}: tensors only qwick writes: {only_got:?}; only llama.cpp writes: {only_want:?}"
            );
            let diff: Vec<String> = got
                .iter()
                .filter(|(k, v)| want[*k] != **v)
                .map(|(k, v)| format!("{k}: qwick {v}, llama.cpp {}", want[k]))
                .collect();
            assert!(diff.is_empty(), "{model} {ft_name}:\n{}", diff.join("\n"));
            for p in &plan {
                let dims: Vec<u64> =
                    shapes[&p.name()].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                assert_eq!(p.dims(), dims, "{model}: dimensions of {}", p.name());
            }
            checked += 1;
        }
    }
    assert!(checked >= 5 * 18, "only {checked} model/file-type pairs checked");
}
