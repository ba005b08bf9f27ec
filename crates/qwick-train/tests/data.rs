//! Chat data with the real Qwen3 tokenizer and chat template: the loss falls on exactly the
//! assistant turns (content through `<|im_end|>`), reasoning is kept or stripped as asked, tool
//! definitions reach the template, and plain text trains on every token.

use qwick_chat::{ModelText, TextSource};
use qwick_train::data::{pack, read_jsonl, DataOptions, Renderer};
use std::io::Read;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Qwen3 tokenizer and template, as a model folder holds them.
fn text() -> ModelText {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("qwick-train-data-test-{}-{k}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["tokenizer_config.json", "generation_config.json", "config.json"] {
        std::fs::copy(root().join("tests/greedy/model").join(f), d.join(f)).unwrap();
    }
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(root().join("tests/chat_refs/tokenizer.json.gz")).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(d.join("tokenizer.json"), json).unwrap();
    let t = ModelText::load(TextSource::Folder(&d), None).unwrap();
    let _ = std::fs::remove_dir_all(&d);
    t
}

fn trained_text(t: &ModelText, jsonl: &str, opts: &DataOptions) -> Vec<String> {
    let f = std::env::temp_dir().join(format!("qwick-train-data-{}-{}.jsonl", std::process::id(), jsonl.len()));
    std::fs::write(&f, jsonl).unwrap();
    let eos = t.tokenizer.token_id("<|endoftext|>").unwrap();
    let r = Renderer { template: &t.template, tokenizer: &t.tokenizer, eos };
    let (ex, _) = read_jsonl(&f, &r, opts).unwrap();
    let _ = std::fs::remove_file(&f);
    ex.iter()
        .map(|e| {
            let ids: Vec<u32> = e.ids.iter().zip(&e.train).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
            t.tokenizer.decode(&ids, false).unwrap()
        })
        .collect()
}

#[test]
fn loss_falls_on_the_assistant_turns() {
    let t = text();
    let chat = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]}"#;
    let got = trained_text(&t, &format!("{chat}\n"), &DataOptions::default());
    // The earlier turn's reasoning is dropped by the template; the last keeps it.
    assert_eq!(got, vec!["Hello!<|im_end|>4<|im_end|>".replace("4<", "<think>\nAdd them.\n</think>\n\n4<")]);
    let stripped = trained_text(&t, &format!("{chat}\n"), &DataOptions { strip_reasoning: true, ..Default::default() });
    assert_eq!(stripped, vec!["Hello!<|im_end|><think>\n\n</think>\n\n4<|im_end|>"]);
    let all = trained_text(&t, &format!("{chat}\n"), &DataOptions { train_on_prompt: true, ..Default::default() });
    assert!(all[0].contains("Be brief.") && all[0].contains("2+2?"), "{}", all[0]);
    // Plain text: every token after the first, then end-of-text.
    let plain = trained_text(&t, "{\"text\": \"One two three.\"}\n", &DataOptions::default());
    assert_eq!(plain, vec![" two three.<|endoftext|>"]);
}

#[test]
fn tools_reach_the_template_and_tool_calls_are_trained() {
    let t = text();
    let line = r#"{"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}], "messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}"#;
    let f = std::env::temp_dir().join(format!("qwick-train-tools-{}.jsonl", std::process::id()));
    std::fs::write(&f, format!("{line}\n")).unwrap();
    let eos = t.tokenizer.token_id("<|endoftext|>").unwrap();
    let r = Renderer { template: &t.template, tokenizer: &t.tokenizer, eos };
    let (ex, _) = read_jsonl(&f, &r, &DataOptions { train_on_prompt: true, ..Default::default() }).unwrap();
    let _ = std::fs::remove_file(&f);
    let all = t.tokenizer.decode(&ex[0].ids, false).unwrap();
    assert!(all.contains("<tools>") && all.contains("get_weather"), "{all}");
    let got = trained_text(&t, &format!("{line}\n"), &DataOptions::default());
    assert!(
        got[0].contains("<tool_call>")
            && got[0].contains("\"city\": \"Paris\"")
            && got[0].ends_with("Sunny.<|im_end|>"),
        "{}",
        got[0]
    );
    assert!(!got[0].contains("sunny"), "the tool's answer is not trained: {}", got[0]);
    // Packed, the labels are the next tokens inside each example.
    let (seqs, cut) = pack(&ex, 4096);
    assert_eq!((seqs.len(), cut), (1, 0));
    assert_eq!(seqs[0].labels.iter().flatten().count(), ex[0].train[1..].iter().filter(|&&b| b).count());
}
