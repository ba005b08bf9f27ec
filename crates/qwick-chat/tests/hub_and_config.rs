mod common;

use common::{refs_dir, stand_in_hub, temp_dir};
use qwick_chat::resolve::{cache_dir_from, cached_snapshot, missing_files, offline_from, Hub, HubId};
use qwick_chat::{GenerationConfig, SamplingParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Cache access that never downloads.
fn offline(cache: &Path) -> Hub {
    Hub { offline: true, ..Hub::new(cache) }
}

fn touch(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Lays out `models--owner--name` with `refs/<rev>` → `hash` and the given snapshot files.
fn lay_out(cache: &Path, repo: &str, rev: &str, hash: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    touch(&root.join("refs").join(rev), &format!("{hash}\n"));
    let snap = root.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    for (f, text) in files {
        touch(&snap.join(f), text);
    }
    snap
}

const COMPLETE: [(&str, &str); 3] = [("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", "")];

#[test]
fn resolves_hub_ids_through_the_cache() {
    let cache = temp_dir("hf-cache");
    let snap = lay_out(&cache, "Qwen/Qwen3-0.6B", "main", "abc123", &COMPLETE);
    assert_eq!(offline(&cache).resolve("Qwen/Qwen3-0.6B").unwrap(), snap);
    // A named revision, and a commit hash given directly.
    let snap2 = lay_out(&cache, "Qwen/Qwen3-0.6B", "v2", "def456", &COMPLETE);
    assert_eq!(offline(&cache).resolve("Qwen/Qwen3-0.6B@v2").unwrap(), snap2);
    assert_eq!(offline(&cache).resolve("Qwen/Qwen3-0.6B@def456").unwrap(), snap2);
    // Sharded weights: complete only when every shard listed in the index is there.
    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    let snap3 = lay_out(
        &cache,
        "Qwen/Qwen3-8B",
        "main",
        "fff",
        &[
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", ""),
        ],
    );
    let e = offline(&cache).resolve("Qwen/Qwen3-8B").unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("HF_HUB_OFFLINE"), "{e}");
    touch(&snap3.join("model-00002-of-00002.safetensors"), "");
    assert_eq!(offline(&cache).resolve("Qwen/Qwen3-8B").unwrap(), snap3);
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn offline_without_a_copy_says_what_to_do() {
    let cache = temp_dir("hf-empty");
    let e = offline(&cache).resolve("Qwen/Qwen3-0.6B").unwrap_err().to_string();
    for part in [
        "Qwen/Qwen3-0.6B",
        "not in the Hugging Face cache",
        "huggingface-cli download Qwen/Qwen3-0.6B",
        "copy",
        &cache.display().to_string(),
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = offline(&cache).resolve("Qwen/Qwen3-0.6B@v9").unwrap_err().to_string();
    assert!(e.contains("--revision v9"), "{e}");
    // An incomplete snapshot names the missing files.
    lay_out(&cache, "a/b", "main", "h", &[("config.json", "{}")]);
    let e = offline(&cache).resolve("a/b").unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn local_folders_and_bad_specs() {
    let cache = temp_dir("hf-local");
    let model = temp_dir("local-model");
    assert_eq!(offline(&cache).resolve(model.to_str().unwrap()).unwrap(), model);
    let file = model.join("config.json");
    touch(&file, "{}");
    let e = offline(&cache).resolve(file.to_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("is a file"), "{e}");
    let gguf = model.join("model.gguf");
    touch(&gguf, "GGUF");
    assert_eq!(offline(&cache).resolve(gguf.to_str().unwrap()).unwrap(), gguf);
    for bad in ["./no/such/dir", "/no/such", "a/b/c", "/b", "no/such.gguf"] {
        let e = offline(&cache).resolve(bad).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{bad}: {e}");
    }
    for bad in ["justname", "a/", "a/b@", ""] {
        let e = offline(&cache).resolve(bad).unwrap_err().to_string();
        assert!(e.contains("neither a model folder nor"), "{bad}: {e}");
    }
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn hub_ids_and_environment() {
    let id = HubId::parse("Qwen/Qwen3-0.6B").unwrap();
    assert_eq!(id.revision, "main");
    assert_eq!(id.cache_folder(), "models--Qwen--Qwen3-0.6B");
    assert_eq!(HubId::parse("o/n@refs/pr/1").unwrap().revision, "refs/pr/1");
    assert!(HubId::parse("o/n@../x").is_none());
    assert!(HubId::parse("../n").is_none());

    let env = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    };
    let all = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/home/u")];
    assert_eq!(cache_dir_from(env(&all)), Some(PathBuf::from("/c")));
    assert_eq!(cache_dir_from(env(&all[1..])), Some(PathBuf::from("/h/hub")));
    assert_eq!(cache_dir_from(env(&all[2..])), Some(PathBuf::from("/home/u/.cache/huggingface/hub")));
    assert_eq!(cache_dir_from(env(&[])), None);
    for (v, want) in [("1", true), ("TRUE", true), ("on", true), ("0", false), ("", false)] {
        assert_eq!(offline_from(env(&[("HF_HUB_OFFLINE", v)])), want, "{v}");
    }
    assert!(!offline_from(env(&[])));

    let cache = temp_dir("hf-snap");
    assert_eq!(cached_snapshot(&cache, &id), None);
    let snap = lay_out(&cache, "Qwen/Qwen3-0.6B", "main", "h1", &COMPLETE);
    assert_eq!(cached_snapshot(&cache, &id), Some(snap.clone()));
    assert!(missing_files(&snap).unwrap().is_empty());
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn generation_config_and_presets() {
    let g = GenerationConfig::from_dir(refs_dir()).unwrap();
    assert_eq!(g.eos_token_ids, vec![151_645, 151_643]);
    assert_eq!(g.temperature, Some(0.6));
    assert_eq!(g.top_p, Some(0.95));
    assert_eq!(g.top_k, Some(20));
    assert_eq!(g.bos_token_id, Some(151_643));
    let on = g.sampling_params(true);
    assert_eq!((on.temperature, on.top_p, on.top_k), (0.6, 0.95, 20));
    let off = g.sampling_params(false);
    assert_eq!((off.temperature, off.top_p, off.top_k), (0.7, 0.8, 20));
    on.validate().unwrap();

    let dir = temp_dir("gen-config");
    assert_eq!(GenerationConfig::from_dir(&dir).unwrap(), GenerationConfig::default());
    assert_eq!(GenerationConfig::default().sampling_params(true), SamplingParams::qwen3_thinking());
    touch(
        &dir.join("generation_config.json"),
        r#"{"eos_token_id": 7, "do_sample": false, "repetition_penalty": 1.1, "temperature": 0.3}"#,
    );
    let g = GenerationConfig::from_dir(&dir).unwrap();
    assert_eq!(g.eos_token_ids, vec![7]);
    let p = g.sampling_params(true);
    assert!(p.is_greedy());
    assert_eq!(p.repetition_penalty, 1.1);
    touch(&dir.join("generation_config.json"), r#"{"eos_token_id": "x"}"#);
    let e = GenerationConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("generation_config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn downloads_missing_models_into_the_cache() {
    let mut files: HashMap<String, Vec<u8>> = [
        ("config.json", "{\"model_type\": \"qwen3\"}"),
        ("tokenizer.json", "{\"version\": \"1.0\"}"),
        ("tokenizer_config.json", "{}"),
        ("model.safetensors", "weights"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    let online =
        |cache: &Path, endpoint: &str| Hub { endpoint: Some(endpoint.to_string()), progress: false, ..Hub::new(cache) };

    // Single-file weights; generation_config.json and the index are absent (404) and skipped.
    let cache = temp_dir("hf-download");
    let endpoint = stand_in_hub(files.clone());
    let snap = online(&cache, &endpoint).resolve("Qwen/Tiny").unwrap();
    assert!(snap.ends_with("models--Qwen--Tiny/snapshots/c0ffee"), "{}", snap.display());
    assert_eq!(std::fs::read_to_string(snap.join("model.safetensors")).unwrap(), "weights");
    assert!(snap.join("tokenizer_config.json").is_file());
    assert!(!snap.join("generation_config.json").exists());
    // Now it is cached: found offline, the way huggingface_hub lays it out.
    assert_eq!(offline(&cache).resolve("Qwen/Tiny").unwrap(), snap);

    // Sharded weights: the index and every shard it lists.
    files.remove("model.safetensors");
    files.insert(
        "model.safetensors.index.json".into(),
        br#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "model-1.safetensors"}}"#
            .to_vec(),
    );
    files.insert("model-1.safetensors".into(), b"one".to_vec());
    files.insert("model-2.safetensors".into(), b"two".to_vec());
    let endpoint = stand_in_hub(files.clone());
    let snap = online(&cache, &endpoint).resolve("Qwen/Sharded").unwrap();
    assert_eq!(std::fs::read_to_string(snap.join("model-2.safetensors")).unwrap(), "two");
    assert!(missing_files(&snap).unwrap().is_empty());

    // A model the Hub does not have: a clear error naming the file and the way out.
    let endpoint = stand_in_hub(HashMap::new());
    let e = online(&cache, &endpoint).resolve("nobody/nothing").unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("huggingface-cli download nobody/nothing"), "{e}");
    std::fs::remove_dir_all(&cache).ok();
}
