mod common;

use common::{cases, ids, refs_dir, temp_dir, tokenizer, tokenizer_json};
use qwick_chat::Tokenizer;
use serde_json::json;

#[test]
fn ids_match_python_tokenizers_on_multilingual_text() {
    let tok = tokenizer();
    let all = cases("tokenize.json");
    assert!(all.len() >= 25);
    for case in &all {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "encode {name}");
        // Qwen3 adds no BOS/EOS.
        assert_eq!(tok.encode(text, true).unwrap(), want, "add_special {name}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "decode {name}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode skip_special {name}"
        );
    }
}

/// Feeds ids one at a time and checks every prefix of the output against the full decode.
fn check_incremental(tok: &Tokenizer, ids: &[u32], skip_special: bool, name: &str) {
    let full = tok.decode(ids, skip_special).unwrap();
    let mut dec = tok.incremental_decoder(skip_special);
    let mut out = String::new();
    for &id in ids {
        let delta = dec.push(id).unwrap();
        out.push_str(&delta);
        assert!(full.starts_with(&out), "{name}: streamed {out:?} is not a prefix of {full:?}");
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, full, "{name}");
}

#[test]
fn incremental_decoding_equals_full_decode() {
    let tok = tokenizer();
    let mut everything = Vec::new();
    for case in cases("tokenize.json") {
        let ids = ids(&case["ids"]);
        let name = case["name"].as_str().unwrap();
        check_incremental(tok, &ids, false, name);
        check_incremental(tok, &ids, true, name);
        everything.extend(ids);
    }
    check_incremental(tok, &everything, false, "all");
    for case in cases("templates.json") {
        let ids = ids(&case["ids"]);
        check_incremental(tok, &ids, true, case["name"].as_str().unwrap());
    }
}

/// The vocabulary entry of a single byte in GPT-2's byte-level alphabet.
fn byte_token(b: u8) -> String {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b).to_string()
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap().to_string()
    }
}

#[test]
fn characters_split_across_tokens_are_never_broken() {
    let tok = tokenizer();
    let byte_ids =
        |s: &[u8]| -> Vec<u32> { s.iter().map(|&b| tok.token_id(&byte_token(b)).expect("byte token")).collect() };
    // A ZWJ family emoji, one byte per token: nothing comes out until each character completes.
    let family = "👨‍👩‍👧";
    let ids = byte_ids(family.as_bytes());
    let mut dec = tok.incremental_decoder(false);
    let deltas: Vec<String> = ids.iter().map(|&i| dec.push(i).unwrap()).collect();
    assert_eq!(deltas.concat(), family);
    assert!(deltas.iter().all(|d| d.is_empty() || d.chars().count() == 1));
    assert_eq!(deltas.iter().filter(|d| !d.is_empty()).count(), 5);
    assert_eq!(dec.finish().unwrap(), "");

    // A stream cut inside a character: finish() flushes it as U+FFFD, like a full decode.
    let cut = &"你好".as_bytes()[..4];
    let ids = byte_ids(cut);
    let mut dec = tok.incremental_decoder(false);
    assert_eq!(dec.extend(&ids).unwrap(), "你");
    assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "你\u{FFFD}");

    // Invalid bytes followed by valid text come out as soon as they are known to be invalid.
    let ids = byte_ids(&[0xF0, b'A', 0xE4, 0xBD, 0xA0]);
    check_incremental(tok, &ids, false, "invalid");
    let mut dec = tok.incremental_decoder(false);
    assert_eq!(dec.extend(&ids[..2]).unwrap(), "\u{FFFD}A");

    // Special tokens: kept or skipped.
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let mut ids = tok.encode("héllo 世界", false).unwrap();
    ids.push(im_end);
    check_incremental(tok, &ids, true, "skip");
    check_incremental(tok, &ids, false, "keep");
    let mut dec = tok.incremental_decoder(true);
    assert_eq!(dec.extend(&ids).unwrap() + &dec.finish().unwrap(), "héllo 世界");
}

#[test]
fn special_and_added_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 151_669);
    for (text, id, special) in [
        ("<|endoftext|>", 151_643, true),
        ("<|im_start|>", 151_644, true),
        ("<|im_end|>", 151_645, true),
        ("<tool_call>", 151_657, false),
        ("</tool_call>", 151_658, false),
        ("<think>", 151_667, false),
        ("</think>", 151_668, false),
    ] {
        assert_eq!(tok.token_id(text), Some(id), "{text}");
        assert_eq!(tok.is_special(id), special, "{text}");
        assert_eq!(tok.encode(text, false).unwrap(), vec![id]);
        assert_eq!(tok.id_to_token(id).as_deref(), Some(text));
    }
    assert_eq!(tok.token_id("<not a token>"), None);
    // Ids beyond the tokenizer (the model's padding rows) are skipped, not a panic.
    assert_eq!(tok.decode(&[151_900], false).unwrap(), "");
}

#[test]
fn loads_a_model_folder() {
    let dir = temp_dir("model");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    std::fs::copy(refs_dir().join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let text = "<|im_start|>user\nПривет, 世界! 👋<|im_end|>";
    assert_eq!(tok.encode(text, false).unwrap(), tokenizer().encode(text, false).unwrap());
    assert_eq!(tok.vocab_size(), 151_669);
    let from_file = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(from_file.token_id("<think>"), Some(151_667));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn config_added_tokens_are_checked_and_added() {
    let mut tok = tokenizer().clone();
    // A declared token missing from tokenizer.json is added with the declared id.
    tok.apply_config(&json!({"added_tokens_decoder": {
        "151669": {"content": "<|new_token|>", "special": true}
    }}))
    .unwrap();
    assert_eq!(tok.token_id("<|new_token|>"), Some(151_669));
    assert!(tok.is_special(151_669));
    assert_eq!(tok.encode("a<|new_token|>b", false).unwrap().len(), 3);
    // The clone it came from is untouched (copy on write).
    assert_eq!(tokenizer().token_id("<|new_token|>"), None);
    // Conflicting ids are errors.
    let e = tok.apply_config(&json!({"added_tokens_decoder": {"5": {"content": "<|im_end|>"}}})).unwrap_err();
    assert!(e.to_string().contains("declared with id 5"), "{e}");
    let e = tok.apply_config(&json!({"added_tokens_decoder": {"999999": {"content": "<|far|>"}}})).unwrap_err();
    assert!(e.to_string().contains("does not follow"), "{e}");
}

#[test]
fn loading_errors_are_clear() {
    let dir = temp_dir("tok-errors");
    let e = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("no tokenizer.json"), "{e}");
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let e = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    assert!(Tokenizer::from_file(dir.join("nope.json")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
