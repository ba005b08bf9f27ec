//! Models picked by a quantization tag in the Hugging Face cache (and downloaded from a stand-in
//! Hub on localhost), models of the Ollama store, and the listing of both, on fake stores in
//! temporary folders.

mod common;

use common::{stand_in_hub, temp_dir};
use qwick_chat::resolve::{
    gguf_models, gguf_name_has_tag, gguf_tag, hf_cache_models, ollama_dir_from, ollama_model, ollama_names,
    ollama_store_models, pick_gguf, resolve_ollama, Hub, OllamaName, TaggedId,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const GGUF: &str = "GGUF fake weights";

fn touch(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Lays out `models--owner--name` with `refs/<rev>` → `hash` and the given snapshot files.
fn lay_out(cache: &Path, repo: &str, rev: &str, hash: &str, files: &[&str]) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    touch(&root.join("refs").join(rev), &format!("{hash}\n"));
    let snap = root.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        touch(&snap.join(f), GGUF);
    }
    snap
}

/// Cache access that never downloads.
fn offline(cache: &Path) -> Hub {
    Hub { offline: true, progress: false, ..Hub::new(cache) }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn gguf_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/gguf").join(name)
}

#[test]
fn tags_are_separate_parts_of_file_names() {
    for (file, tag, want) in [
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M", true),
        ("Qwen3-8B-Q4_K_M.gguf", "q4_k_m", true),
        ("qwen3-8b-q4_k_m.GGUF", "Q4_K_M", true),
        ("Q4_K_M.gguf", "Q4_K_M", true),
        ("Qwen3-8B.Q4_K_M.gguf", "Q4_K_M", true),
        ("Qwen3_8B_Q8_0.gguf", "Q8_0", true),
        ("sub/dir/Qwen3-8B-Q4_K_M-00001-of-00003.gguf", "Q4_K_M", true),
        ("Qwen3-8B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL", true),
        ("Qwen3-8B-IQ4_K_M.gguf", "Q4_K_M", false),
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K", false),
        ("Qwen3-8B-Q4_K_M_L.gguf", "Q4_K_M", false),
        ("Qwen3-8B-BF16.gguf", "F16", false),
        ("Q4_K_M/Qwen3-8B.gguf", "Q4_K_M", false),
        ("Qwen3-8B-Q4_K_M.gguf", "", false),
    ] {
        assert_eq!(gguf_name_has_tag(file, tag), want, "{file} / {tag}");
    }
    for (file, want) in [
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
        ("Qwen3-0.6B.Q8_0.gguf", "Q8_0"),
        ("a/Qwen3-235B-A22B-UD-Q4_K_XL-00001-of-00003.gguf", "UD-Q4_K_XL"),
        ("Qwen3-8B-BF16-00002-of-00002.gguf", "BF16"),
        ("model.gguf", "model"),
    ] {
        assert_eq!(gguf_tag(file), want, "{file}");
        assert!(gguf_name_has_tag(file, &gguf_tag(file)), "{file}: its own tag picks it");
    }
}

#[test]
fn tagged_ids_parse() {
    let t = TaggedId::parse("Qwen/Qwen3-8B-GGUF:Q4_K_M").unwrap();
    assert_eq!((t.id.repo.as_str(), t.id.revision.as_str(), t.tag.as_str()), ("Qwen/Qwen3-8B-GGUF", "main", "Q4_K_M"));
    let t = TaggedId::parse("o/n@v1.0:q8_0").unwrap();
    assert_eq!((t.id.revision.as_str(), t.tag.as_str()), ("v1.0", "q8_0"));
    assert_eq!(t.download_command(), "huggingface-cli download o/n --revision v1.0 --include \"*Q8_0*\"");
    for bad in ["o/n", "o/n:", "o/n:a/b", "o/n:.x", "n:Q4_K_M", "a/b/c:Q4", "o/n:Q4 K", "ollama:qwen3:8b"] {
        assert!(TaggedId::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn split_files_are_one_model() {
    let files = strings(&[
        "README.md",
        "Qwen3-8B-Q8_0.gguf",
        "BF16/Qwen3-8B-BF16-00002-of-00002.gguf",
        "BF16/Qwen3-8B-BF16-00001-of-00002.gguf",
        "Qwen3-8B-Q6_K-00002-of-00003.gguf",
        "mmproj-F16.gguf",
    ]);
    let models = gguf_models(&files);
    assert_eq!(models.len(), 3, "{models:?}");
    assert_eq!(
        models[0].parts,
        strings(&["BF16/Qwen3-8B-BF16-00001-of-00002.gguf", "BF16/Qwen3-8B-BF16-00002-of-00002.gguf"])
    );
    assert!(models[0].missing.is_empty());
    assert_eq!(models[1].first(), "Qwen3-8B-Q6_K-00001-of-00003.gguf");
    assert_eq!(models[1].missing, strings(&["Qwen3-8B-Q6_K-00001-of-00003.gguf", "Qwen3-8B-Q6_K-00003-of-00003.gguf"]));
    assert_eq!(models[2].parts, strings(&["Qwen3-8B-Q8_0.gguf"]));
    // A vision projector is never a model, even when its tag is asked for.
    assert_eq!(pick_gguf(&files, "F16", "here").unwrap(), None);
    assert_eq!(pick_gguf(&files, "bf16", "here").unwrap().unwrap().first(), "BF16/Qwen3-8B-BF16-00001-of-00002.gguf");
}

#[test]
fn tags_resolve_through_the_cache() {
    let cache = temp_dir("tag-cache");
    let repo = "Qwen/Qwen3-8B-GGUF";
    let snap = lay_out(
        &cache,
        repo,
        "main",
        "c1",
        &[
            "Qwen3-8B-Q4_K_M.gguf",
            "Qwen3-8B-IQ4_XS.gguf",
            "Qwen3-8B-Q8_0.gguf",
            "Q6_K/Qwen3-8B-Q6_K-00001-of-00002.gguf",
            "Q6_K/Qwen3-8B-Q6_K-00002-of-00002.gguf",
            "Qwen3-8B-Q5_K_M-00001-of-00002.gguf",
            "mmproj-Qwen3-F16.gguf",
        ],
    );
    let hub = offline(&cache);
    let resolve = |spec: &str| hub.resolve(spec);
    // Exact, any case, with a revision.
    assert_eq!(resolve("Qwen/Qwen3-8B-GGUF:Q4_K_M").unwrap(), snap.join("Qwen3-8B-Q4_K_M.gguf"));
    assert_eq!(resolve("Qwen/Qwen3-8B-GGUF:q4_k_m").unwrap(), snap.join("Qwen3-8B-Q4_K_M.gguf"));
    assert_eq!(resolve("Qwen/Qwen3-8B-GGUF@main:Q8_0").unwrap(), snap.join("Qwen3-8B-Q8_0.gguf"));
    assert_eq!(resolve("Qwen/Qwen3-8B-GGUF@c1:iq4_xs").unwrap(), snap.join("Qwen3-8B-IQ4_XS.gguf"));
    // A split model: its first part, found in a sub-folder.
    assert_eq!(resolve("Qwen/Qwen3-8B-GGUF:Q6_K").unwrap(), snap.join("Q6_K/Qwen3-8B-Q6_K-00001-of-00002.gguf"));

    // Boundaries: Q4_K is not Q4_K_M, F16 is not BF16 nor the projector; the offline message names
    // the repository, the tag, the cached tags and the command that downloads the files.
    for tag in ["Q4_K", "F16"] {
        let e = resolve(&format!("{repo}:{tag}")).unwrap_err().to_string();
        for part in [
            repo,
            tag,
            "HF_HUB_OFFLINE",
            "other tags: IQ4_XS, Q4_K_M, Q5_K_M, Q6_K, Q8_0",
            &format!("huggingface-cli download {repo} --include \"*{tag}*\""),
            &cache.display().to_string(),
        ] {
            assert!(e.contains(part), "missing {part:?} in: {e}");
        }
    }
    // A split model with a part missing is not resolved; the message names the part.
    let e = resolve("Qwen/Qwen3-8B-GGUF:Q5_K_M").unwrap_err().to_string();
    assert!(e.contains("lacks Qwen3-8B-Q5_K_M-00002-of-00002.gguf") && e.contains("--include \"*Q5_K_M*\""), "{e}");

    // Several models for one tag: an error listing them.
    let snap2 = lay_out(&cache, "o/many", "main", "c2", &["Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-128K-Q4_K_M.gguf"]);
    let e = offline(&cache).resolve("o/many:Q4_K_M").unwrap_err().to_string();
    assert!(
        e.contains("several") && e.contains("Qwen3-8B-Q4_K_M.gguf") && e.contains("Qwen3-8B-128K-Q4_K_M.gguf"),
        "{e}"
    );
    assert_eq!(offline(&cache).resolve("o/many:128K-Q4_K_M").unwrap(), snap2.join("Qwen3-8B-128K-Q4_K_M.gguf"));

    // Not in the cache at all; a cached repository without GGUF files.
    let e = offline(&cache).resolve("o/absent:Q4_K_M").unwrap_err().to_string();
    assert!(e.contains("not in the cache") && e.contains("huggingface-cli download o/absent --include"), "{e}");
    lay_out(&cache, "o/dense", "main", "c3", &["config.json", "model.safetensors"]);
    let e = offline(&cache).resolve("o/dense:Q4_K_M").unwrap_err().to_string();
    assert!(e.contains("holds no GGUF file"), "{e}");

    // Without a tag, a repository of GGUF files says how to pick one.
    let e = offline(&cache).resolve(repo).unwrap_err().to_string();
    assert!(e.contains("holds GGUF files") && e.contains("Qwen/Qwen3-8B-GGUF:IQ4_XS") && e.contains("Q8_0"), "{e}");
    std::fs::remove_dir_all(&cache).ok();
}

#[test]
fn tagged_models_download_into_the_cache() {
    let files: HashMap<String, Vec<u8>> = [
        ("README.md", "readme"),
        ("Qwen3-Tiny-Q8_0.gguf", "GGUF q8"),
        ("Q4_K_M/Qwen3-Tiny-Q4_K_M-00001-of-00002.gguf", "GGUF part one"),
        ("Q4_K_M/Qwen3-Tiny-Q4_K_M-00002-of-00002.gguf", "GGUF part two"),
        ("Qwen3-Tiny-BF16-00001-of-00002.gguf", "GGUF lonely part"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    let endpoint = stand_in_hub(files);
    let cache = temp_dir("tag-download");
    let online = Hub { endpoint: Some(endpoint.clone()), progress: false, ..Hub::new(&cache) };

    // Every part of a split model lands in one snapshot; the first is returned.
    let first = online.resolve("o/tiny-GGUF:q4_k_m").unwrap();
    assert!(first.ends_with("models--o--tiny-GGUF/snapshots/c0ffee/Q4_K_M/Qwen3-Tiny-Q4_K_M-00001-of-00002.gguf"));
    assert_eq!(std::fs::read_to_string(&first).unwrap(), "GGUF part one");
    let second = first.with_file_name("Qwen3-Tiny-Q4_K_M-00002-of-00002.gguf");
    assert_eq!(std::fs::read_to_string(second).unwrap(), "GGUF part two");
    // Now cached: found offline.
    assert_eq!(offline(&cache).resolve("o/tiny-GGUF:Q4_K_M").unwrap(), first);
    let q8 = online.resolve("o/tiny-GGUF:Q8_0").unwrap();
    assert_eq!(std::fs::read_to_string(q8).unwrap(), "GGUF q8");

    // A tag no file has: the tags the repository has.
    let e = online.resolve("o/tiny-GGUF:Q2_K").unwrap_err().to_string();
    assert!(e.contains("matches the tag Q2_K") && e.contains("tags: BF16, Q4_K_M, Q8_0"), "{e}");
    // A split model the Hub lacks a part of.
    let e = online.resolve("o/tiny-GGUF:BF16").unwrap_err().to_string();
    assert!(e.contains("Qwen3-Tiny-BF16-00002-of-00002.gguf"), "{e}");
    // An id without a tag on a repository of GGUF files (no config.json): how to pick one.
    let e = online.resolve("o/tiny-GGUF").unwrap_err().to_string();
    assert!(e.contains("holds GGUF files") && e.contains("o/tiny-GGUF:BF16"), "{e}");
    // A repository without GGUF files.
    let endpoint = stand_in_hub([("model.safetensors".to_string(), b"w".to_vec())].into_iter().collect());
    let online = Hub { endpoint: Some(endpoint), progress: false, ..Hub::new(&cache) };
    let e = online.resolve("o/dense:Q4_K_M").unwrap_err().to_string();
    assert!(e.contains("holds no GGUF file") && e.contains("without a tag"), "{e}");
    std::fs::remove_dir_all(&cache).ok();
}

/// Writes a blob into `store` and returns its digest.
fn blob(store: &Path, bytes: &[u8]) -> String {
    // Any 64 hex digits name a blob; derive them from the content so different blobs differ.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let hex = format!("{h:016x}").repeat(4);
    let path = store.join("blobs").join(format!("sha256-{hex}"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    format!("sha256:{hex}")
}

/// Writes a manifest for `path` (`host/namespace/model/tag`) with layers of the given media types
/// (the `…image.` suffix) and digests.
fn manifest(store: &Path, path: &str, layers: &[(&str, &str)]) {
    let layers: Vec<_> = layers
        .iter()
        .map(|(kind, digest)| {
            serde_json::json!({"mediaType": format!("application/vnd.ollama.image.{kind}"), "digest": digest, "size": 1})
        })
        .collect();
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:00", "size": 1},
        "layers": layers});
    touch(&store.join("manifests").join(path), &m.to_string());
}

#[test]
fn ollama_names_parse() {
    let n = OllamaName::parse("qwen3").unwrap();
    assert_eq!(
        (n.host.as_str(), n.namespace.as_str(), n.model.as_str(), n.tag.as_str()),
        ("registry.ollama.ai", "library", "qwen3", "latest")
    );
    assert_eq!(n.short(), "qwen3:latest");
    assert_eq!(n.manifest_path(Path::new("/s")), Path::new("/s/manifests/registry.ollama.ai/library/qwen3/latest"));
    let n = OllamaName::parse("user/model:q4").unwrap();
    assert_eq!(n.manifest_path(Path::new("/s")), Path::new("/s/manifests/registry.ollama.ai/user/model/q4"));
    assert_eq!(n.spec(), "ollama:user/model:q4");
    let n = OllamaName::parse("hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M").unwrap();
    assert_eq!(n.manifest_path(Path::new("/s")), Path::new("/s/manifests/hf.co/unsloth/Qwen3-8B-GGUF/Q4_K_M"));
    assert_eq!(n.spec(), "ollama:hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M");
    for bad in ["", "a:", ":b", "a/b/c/d", "../x", "a/../b", "a b", "a//b", "x:../y", ".hidden"] {
        assert!(OllamaName::parse(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn ollama_models_resolve_to_their_blobs() {
    let store = temp_dir("ollama");
    let weights = blob(&store, b"GGUF the weights");
    let params = blob(&store, br#"{"temperature": 0.6, "top_k": 20, "stop": ["<|im_end|>"], "num_ctx": 8192}"#);
    let template = blob(&store, b"{{ .System }}{{ .Prompt }}");
    let system = blob(&store, b"You are helpful.");
    let library = [("model", weights.as_str()), ("params", &params), ("template", &template), ("system", &system)];
    manifest(&store, "registry.ollama.ai/library/qwen3/8b", &library);
    manifest(&store, "registry.ollama.ai/library/qwen3/latest", &[("model", &weights)]);
    manifest(&store, "registry.ollama.ai/someone/qwen3-tuned/q8", &[("model", &weights)]);
    manifest(&store, "hf.co/unsloth/Qwen3-8B-GGUF/Q4_K_M", &[("model", &weights)]);
    let blob_path = store.join("blobs").join(weights.replace(':', "-"));

    let m = ollama_model(&store, "qwen3:8b").unwrap();
    assert_eq!(m.gguf, blob_path);
    assert_eq!(m.bytes, 16);
    let p = m.params.unwrap();
    assert_eq!(
        (p["temperature"].as_f64(), p["top_k"].as_u64(), p["num_ctx"].as_u64()),
        (Some(0.6), Some(20), Some(8192))
    );
    assert_eq!(p["stop"][0], "<|im_end|>");
    assert_eq!(m.template.as_deref(), Some("{{ .System }}{{ .Prompt }}"));
    assert_eq!(m.system.as_deref(), Some("You are helpful."));
    assert!(m.adapters.is_empty());
    assert_eq!(m.manifest, store.join("manifests/registry.ollama.ai/library/qwen3/8b"));

    for name in ["qwen3", "qwen3:latest", "someone/qwen3-tuned:q8", "hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M", "QWEN3:8B"] {
        assert_eq!(resolve_ollama(&store, name).unwrap(), blob_path, "{name}");
    }
    let m = ollama_model(&store, "qwen3").unwrap();
    assert_eq!((m.params, m.template, m.system), (None, None, None));
    let names: Vec<String> = ollama_names(&store).iter().map(OllamaName::short).collect();
    assert_eq!(names, ["hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M", "qwen3:8b", "qwen3:latest", "someone/qwen3-tuned:q8"]);

    // A missing model: the store, the manifest looked for, what the store has.
    let e = resolve_ollama(&store, "qwen3:32b").unwrap_err().to_string();
    for part in [
        &store.display().to_string(),
        &store.join("manifests/registry.ollama.ai/library/qwen3/32b").display().to_string(),
        "qwen3:8b, qwen3:latest",
        "ollama pull qwen3:32b",
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // A missing blob, a blob that is not GGUF, an adapter, no model layer, a bad name.
    manifest(&store, "registry.ollama.ai/library/gone/1", &[("model", &format!("sha256:{}", "ab".repeat(32)))]);
    let e = resolve_ollama(&store, "gone:1").unwrap_err().to_string();
    assert!(e.contains("missing") && e.contains(&"ab".repeat(32)) && e.contains("ollama pull gone:1"), "{e}");
    let safetensors = blob(&store, b"{\"__metadata__\": {}}");
    manifest(&store, "registry.ollama.ai/library/st/1", &[("model", &safetensors)]);
    let e = resolve_ollama(&store, "st:1").unwrap_err().to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let adapter = blob(&store, b"GGUF lora");
    manifest(&store, "registry.ollama.ai/library/lora/1", &[("model", &weights), ("adapter", &adapter)]);
    let e = resolve_ollama(&store, "lora:1").unwrap_err().to_string();
    assert!(e.contains("LoRA adapter"), "{e}");
    manifest(&store, "registry.ollama.ai/library/nomodel/1", &[("template", &template)]);
    let e = resolve_ollama(&store, "nomodel:1").unwrap_err().to_string();
    assert!(e.contains("no model layer"), "{e}");
    manifest(&store, "registry.ollama.ai/library/badparams/1", &[("model", &weights), ("params", &template)]);
    let e = resolve_ollama(&store, "badparams:1").unwrap_err().to_string();
    assert!(e.contains("params") && e.contains("not a JSON object"), "{e}");
    let e = resolve_ollama(&store, "a/b/c/d").unwrap_err().to_string();
    assert!(e.contains("not an Ollama model name"), "{e}");

    // A store folder that does not exist, and an empty one.
    let e = resolve_ollama(&store.join("nothing"), "qwen3").unwrap_err().to_string();
    assert!(e.contains("does not exist") && e.contains("OLLAMA_MODELS"), "{e}");
    let empty = temp_dir("ollama-empty");
    let e = resolve_ollama(&empty, "qwen3").unwrap_err().to_string();
    assert!(e.contains("holds no models"), "{e}");
    std::fs::remove_dir_all(&store).ok();
    std::fs::remove_dir_all(&empty).ok();
}

#[test]
fn store_folders_follow_the_environment() {
    let env = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    };
    assert_eq!(ollama_dir_from(env(&[("OLLAMA_MODELS", "/m"), ("HOME", "/h")])), Some(PathBuf::from("/m")));
    assert_eq!(
        ollama_dir_from(env(&[("OLLAMA_MODELS", ""), ("HOME", "/h")])),
        Some(PathBuf::from("/h/.ollama/models"))
    );
    assert_eq!(ollama_dir_from(env(&[])), None);
}

#[test]
fn lists_the_models_of_both_stores() {
    let cache = temp_dir("list-cache");
    // A safetensors model, complete, under main and a second ref naming the same commit.
    let dense = lay_out(&cache, "Qwen/Qwen3-0.6B", "main", "d1", &[]);
    touch(&cache.join("models--Qwen--Qwen3-0.6B/refs/v1"), "d1");
    touch(&dense.join("config.json"), r#"{"model_type": "qwen3", "torch_dtype": "bfloat16"}"#);
    touch(&dense.join("tokenizer.json"), "{}");
    touch(&dense.join("model.safetensors"), "12345678");
    // An incomplete one at another revision.
    let partial = lay_out(&cache, "Qwen/Qwen3-1.7B", "v2", "p1", &[]);
    touch(&partial.join("config.json"), r#"{"model_type": "qwen3", "dtype": "float16"}"#);
    // A GGUF repository: real files (the type comes from their header), one ambiguous pair.
    let gguf = lay_out(&cache, "Qwen/Qwen3-8B-GGUF", "main", "g1", &["x-Q8_0.gguf", "x-long-Q8_0.gguf"]);
    std::fs::copy(gguf_fixture("dense-Q4_K.gguf"), gguf.join("Qwen3-8B-Q4_K_M.gguf")).unwrap();

    let models = hf_cache_models(&cache);
    let specs: Vec<&str> = models.iter().map(|m| m.spec.as_str()).collect();
    let q8 = gguf.join("x-Q8_0.gguf").display().to_string();
    let long = gguf.join("x-long-Q8_0.gguf").display().to_string();
    assert_eq!(specs, [&q8, &long, "Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B@v2", "Qwen/Qwen3-8B-GGUF:Q4_K_M"]);
    let by = |spec: &str| models.iter().find(|m| m.spec == spec).unwrap();
    let m = by("Qwen/Qwen3-0.6B");
    assert_eq!(
        (m.format, m.kind.as_deref(), m.arch.as_deref(), m.bytes, m.problem.as_deref()),
        ("safetensors", Some("bfloat16"), Some("qwen3"), 8, None)
    );
    let m = by("Qwen/Qwen3-1.7B@v2");
    assert_eq!(m.kind.as_deref(), Some("float16"));
    assert!(m.problem.as_deref().is_some_and(|p| p.contains("tokenizer.json")), "{m:?}");
    let m = by("Qwen/Qwen3-8B-GGUF:Q4_K_M");
    assert_eq!(
        (m.format, m.kind.as_deref(), m.arch.as_deref(), m.problem.as_deref()),
        ("gguf", Some("Q4_K_M"), Some("qwen3"), None)
    );
    assert_eq!(m.bytes, std::fs::metadata(gguf_fixture("dense-Q4_K.gguf")).unwrap().len());
    // Fake GGUF files: listed by their path (the tag picks two), with the header's complaint.
    let m = by(&q8);
    assert!(m.problem.as_deref().is_some_and(|p| p.contains("unreadable GGUF")), "{m:?}");

    let store = temp_dir("list-ollama");
    let weights = std::fs::read(gguf_fixture("dense-F32.gguf")).unwrap();
    let digest = blob(&store, &weights);
    manifest(&store, "registry.ollama.ai/library/qwen3/tiny", &[("model", &digest)]);
    manifest(&store, "registry.ollama.ai/library/broken/1", &[("model", &format!("sha256:{}", "cd".repeat(32)))]);
    let models = ollama_store_models(&store);
    assert_eq!(models.len(), 2);
    assert_eq!(models[0].spec, "ollama:broken:1");
    assert!(models[0].problem.as_deref().is_some_and(|p| p.contains("missing")), "{:?}", models[0]);
    let m = &models[1];
    assert_eq!(
        (m.spec.as_str(), m.store, m.kind.as_deref(), m.arch.as_deref(), m.bytes),
        ("ollama:qwen3:tiny", "ollama", Some("F32"), Some("qwen3"), weights.len() as u64)
    );
    assert_eq!(m.path, store.join("blobs").join(digest.replace(':', "-")));

    assert!(hf_cache_models(&cache.join("none")).is_empty());
    assert!(ollama_store_models(&cache).is_empty());
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&store).ok();
}
