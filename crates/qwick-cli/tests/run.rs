//! `qwick run` and `qwick chat` on `tests/greedy/model`, a tiny random Qwen3 with the full Qwen3
//! vocabulary, tokenizer and chat template (made by `python/make_greedy_refs.py`):
//! greedy token ids equal transformers' `generate`, seeds reproduce, the thinking budget cuts
//! reasoning, stop strings, bad input gets one error line, and a piped `chat` session.
//!
//! The model folder is assembled in a temporary folder: the committed files plus tokenizer.json
//! unpacked from tests/chat_refs/tokenizer.json.gz, so it is laid out like a Hugging Face folder.

mod common;

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Output, Stdio};

const BUDGET_TEXT: &str = "Considering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>.\n\n";

fn scratch(name: &str) -> common::Scratch {
    common::scratch("run", name)
}

fn model() -> &'static str {
    common::greedy_model("run")
}

fn refs() -> &'static Value {
    common::greedy_refs()
}

fn case(name: &str) -> &'static Value {
    refs()["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

fn qwick_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwick"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qwick runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `qwick run --model M --threads 1 ARGS` with an empty stdin.
fn run(args: &[&str]) -> Output {
    let mut all = vec!["run", "--model", model(), "--threads", "1"];
    all.extend_from_slice(args);
    qwick_with_stdin(&all, "")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "qwick failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn run_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ok(&run(&all));
    assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
    serde_json::from_str(&out).unwrap()
}

/// The flags of a reference case.
fn case_args(c: &'static Value) -> Vec<&'static str> {
    let mut a = vec!["--prompt", c["prompt"].as_str().unwrap()];
    if let Some(s) = c["system"].as_str() {
        a.extend(["--system", s]);
    }
    if c["enable_thinking"] == false {
        a.push("--no-think");
    }
    a
}

#[test]
fn greedy_tokens_equal_transformers() {
    let n = refs()["max_new_tokens"].as_u64().unwrap().to_string();
    // The default KV cache (bf16) and the others.
    let kv_kinds: [&[&str]; 3] = [&[], &["--kv-dtype", "f32"], &["--kv-dtype", "f16"]];
    for (c, kv) in refs()["cases"].as_array().unwrap().iter().flat_map(|c| kv_kinds.iter().map(move |k| (c, *k))) {
        let dir = scratch(&format!("msgs-{}", c["name"].as_str().unwrap()));
        let file = dir.join("messages.json");
        let mut args = vec!["--temperature", "0", "--max-tokens", &n];
        args.extend(kv);
        let file_arg = file.to_str().unwrap().to_string();
        if c["cli"] == true {
            args.extend(case_args(c));
        } else {
            std::fs::write(&file, c["messages"].to_string()).unwrap();
            args.extend(["--messages", &file_arg]);
        }
        let v = run_json(&args);
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]), "{} {kv:?}", c["name"]);
        assert_eq!(v["finish_reason"], "length");
        assert_eq!(v["timings"]["prompt_tokens"], c["prompt_ids"].as_array().unwrap().len());
        assert_eq!(v["timings"]["generated_tokens"], c["generated_ids"].as_array().unwrap().len());
        assert_eq!(v["text"], c["generated_text"], "{}", c["name"]);
        for k in ["prefill_s", "decode_s", "tok_s"] {
            assert!(v["timings"][k].as_f64().unwrap() > 0.0, "{k}");
        }
        // With thinking on, the model's output (no </think>) is all reasoning; off, all answer.
        if c["enable_thinking"] == true {
            assert_eq!((&v["reasoning"], v["content"].as_str()), (&c["generated_text"], Some("")));
        } else {
            assert_eq!((&v["reasoning"], &v["content"]), (&Value::Null, &c["generated_text"]));
        }
    }
}

#[test]
fn greedy_tokens_on_the_gpu_equal_transformers() {
    if !common::have_gpu("greedy_tokens_on_the_gpu_equal_transformers") {
        return;
    }
    let n = refs()["max_new_tokens"].as_u64().unwrap().to_string();
    // The default KV cache (bf16) and f32.
    for (name, kv) in [("hello_think", "bf16"), ("haiku_nothink", "f32")] {
        let c = case(name);
        let mut args = vec!["--temperature", "0", "--max-tokens", &n, "--device", "gpu", "--kv-dtype", kv];
        args.extend(case_args(c));
        let v = run_json(&args);
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]), "{name} on the GPU, {kv} cache");
        assert_eq!(v["text"], c["generated_text"], "{name} on the GPU, {kv} cache");
    }
    let o = run(&["--prompt", "hi", "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected cpu, gpu or gpu:N"), "{o:?}");
}

#[test]
fn piped_output_is_exactly_the_generated_text() {
    let c = case("hello_think");
    let mut args = vec!["--temperature", "0", "--max-tokens", "20"];
    args.extend(case_args(c));
    let o = run(&args);
    assert_eq!(ok(&o), c["generated_text"].as_str().unwrap());
    assert!(o.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    // The same prompt from stdin (its final newline dropped).
    let all =
        ["run", "--model", model(), "--threads", "1", "--temperature", "0", "--max-tokens", "20", "--prompt", "-"];
    let o = qwick_with_stdin(&all, &format!("{}\n", c["prompt"].as_str().unwrap()));
    assert_eq!(ok(&o), c["generated_text"].as_str().unwrap());
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let c = case("hello_think");
    let text = c["generated_text"].as_str().unwrap();
    let stop = "Fallout";
    let cut = text.find(stop).expect("the reference text has the stop string");
    let mut args = vec!["--temperature", "0", "--max-tokens", "20", "--stop", "never-there", stop];
    args.extend(case_args(c));
    assert_eq!(ok(&run(&args)), &text[..cut]);
    let v = run_json(&args);
    assert_eq!((v["text"].as_str().unwrap(), &v["finish_reason"]), (&text[..cut], &json!("stop")));
    assert!(v["token_ids"].as_array().unwrap().len() < 20);
}

#[test]
fn seeds_reproduce_and_differ() {
    let base = ["--prompt", "Tell me a story.", "--temperature", "1.0", "--top-k", "0", "--max-tokens", "12"];
    let with_seed = |s: &'static str| {
        let mut a = base.to_vec();
        a.extend(["--seed", s]);
        ids(&run_json(&a)["token_ids"])
    };
    let (a, b, c) = (with_seed("7"), with_seed("7"), with_seed("8"));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "different seeds differ");
    // The default presets (from generation_config.json) also reproduce with a seed.
    let mut p = vec!["--prompt", "Tell me a story.", "--max-tokens", "12", "--seed", "3"];
    let x = ok(&run(&p));
    assert_eq!(x, ok(&run(&p)));
    p.push("--no-think");
    assert_eq!(ok(&run(&p)), ok(&run(&p)));
}

#[test]
fn thinking_budget_inserts_the_stop_text() {
    let c = case("hello_think");
    let want = ids(&c["generated_ids"]);
    let mut args = vec!["--temperature", "0", "--max-tokens", "30", "--max-thinking-tokens", "3"];
    args.extend(case_args(c));
    let v = run_json(&args);
    let got = ids(&v["token_ids"]);
    let text = v["text"].as_str().unwrap();
    // Thinking with the prompt rendered for thinking: everything is reasoning until </think>, so
    // the stop text comes after exactly 3 generated tokens.
    assert_eq!(got[..3], want[..3]);
    assert_eq!(v["timings"]["reasoning_tokens"], 3);
    let at = text.find(BUDGET_TEXT.trim_end()).expect("the budget text is in the output");
    let before = &text[..at];
    assert!(before.trim_end_matches('\n').chars().count() > 0);
    assert!(before.ends_with('\n'), "the stop text starts on its own line: {text:?}");
    assert!(got.contains(&151668), "</think> is in the output tokens");
    // The reasoning ends with the budget's sentence; the model answers after it.
    assert!(v["reasoning"].as_str().unwrap().ends_with("thinking directly now."), "{v}");
    assert!(!v["content"].as_str().unwrap().trim_start_matches(".\n\n").is_empty(), "{v}");
    assert_eq!(v["finish_reason"], "length");
    assert!(got.len() > 30, "--max-tokens counts sampled tokens, not the injected ones");
    // Plain output has the same text.
    let mut plain = vec!["--temperature", "0", "--max-tokens", "30", "--max-thinking-tokens", "3"];
    plain.extend(case_args(c));
    assert_eq!(ok(&run(&plain)), text);

    // A budget of 0 is thinking off: the same as --no-think.
    let p = c["prompt"].as_str().unwrap();
    let off = run_json(&["--prompt", p, "--temperature", "0", "--max-tokens", "8", "--max-thinking-tokens", "0"]);
    let no = run_json(&["--prompt", p, "--temperature", "0", "--max-tokens", "8", "--no-think"]);
    assert_eq!(off["token_ids"], no["token_ids"]);
    assert_ne!(ids(&off["token_ids"])[..], want[..8], "thinking off renders another prompt");
}

/// Runs qwick expecting failure: non-zero exit, one `error:` line containing `needle`, no panic.
fn expect_error<S: AsRef<str>>(args: &[S], stdin: &str, needle: &str) {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    let o = qwick_with_stdin(&args, stdin);
    common::assert_one_error(&o, &format!("{args:?}"), needle);
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn bad_input_gets_one_clear_error() {
    let m = model();
    let tmp = scratch("bad");
    let r = |extra: &[&str]| -> Vec<String> {
        ["run", "--model", m, "--prompt", "hi"].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    expect_error(&r(&["--temperature", "-1"]), "", "temperature must be a finite number >= 0");
    expect_error(&r(&["--top-p", "1.5"]), "", "top_p must be in (0, 1]");
    expect_error(&r(&["--top-p", "0"]), "", "top_p must be in (0, 1]");
    expect_error(&r(&["--min-p", "2"]), "", "min_p");
    expect_error(&r(&["--repetition-penalty", "0"]), "", "repetition_penalty");
    expect_error(&r(&["--max-tokens", "0"]), "", "max_tokens must be at least 1");
    expect_error(&r(&["--kv-dtype", "q4"]), "", "--kv-dtype q4: expected f32, bf16 or f16");
    expect_error(&r(&["--stop", ""]), "", "stop strings must not be empty");
    expect_error(&r(&["--think", "--max-thinking-tokens", "0"]), "", "--think contradicts");
    expect_error(&r(&["--no-think", "--max-thinking-tokens", "5"]), "", "--no-think contradicts");
    expect_error(&["chat", "--model", m, "--top-p", "7"], "hello\n", "top_p must be in (0, 1]");

    // A prompt longer than the context (512 tokens).
    let long = "hello ".repeat(600);
    expect_error(&["run", "--model", m, "--prompt", &long], "", "leaves no room in the model's context of 512");
    expect_error(&["run", "--model", m, "--prompt", "-"], &long, "leaves no room");

    // Malformed messages.
    let msgs = |name: &str, text: &str| {
        let p = tmp.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let f = msgs("role.json", r#"[{"role": "robot", "content": "beep"}]"#);
    expect_error(&["run", "--model", m, "--messages", &f], "", "unknown role \"robot\"");
    let f = msgs("nocontent.json", r#"[{"role": "user"}]"#);
    expect_error(&["run", "--model", m, "--messages", &f], "", "user message 0 has no content");
    let f = msgs("broken.json", r#"[{"role": "user", "content": "#);
    expect_error(&["run", "--model", m, "--messages", &f], "", "not a JSON list of chat messages");
    let f = msgs("empty.json", "[]");
    expect_error(&["run", "--model", m, "--messages", &f], "", "no messages");
    expect_error(&["run", "--model", m, "--messages", "-"], "{}", "not a JSON list");

    // Template errors: one that raises, one that does not compile.
    let f = msgs("raise.jinja", "{{ raise_exception('only user messages, please') }}");
    expect_error(&r(&["--chat-template", &f]), "", "only user messages, please");
    let f = msgs("syntax.jinja", "{% if %}\n{{ x }\n");
    expect_error(&r(&["--chat-template", &f]), "", "chat template");
    expect_error(&r(&["--chat-template", "/nonexistent/t.jinja"]), "", "--chat-template /nonexistent/t.jinja");

    // A model folder without a template.
    let bare = tmp.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for e in std::fs::read_dir(m).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, bare.join(p.file_name().unwrap())).unwrap();
    }
    let mut tc: Value =
        serde_json::from_str(&std::fs::read_to_string(bare.join("tokenizer_config.json")).unwrap()).unwrap();
    tc.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(bare.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let b = bare.to_str().unwrap();
    expect_error(&["run", "--model", b, "--prompt", "hi"], "", "no chat template");
    expect_error(&["run", "--model", b, "--prompt", "hi"], "", "--chat-template FILE");
    // ... which works with one given.
    let f = msgs("simple.jinja", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n");
    let o = qwick_with_stdin(
        &["run", "--model", b, "--prompt", "hi", "--max-tokens", "3", "--chat-template", &f, "--json"],
        "",
    );
    let v: Value = serde_json::from_str(&ok(&o)).unwrap();
    // Jinja drops the template's final newline: `<|im_start|>assistant` ends the prompt.
    assert_eq!(v["timings"]["prompt_tokens"], 8);

    // Not a model.
    expect_error(&["run", "--model", "./no/such/model", "--prompt", "hi"], "", "does not exist");
}

#[test]
fn chat_session_through_a_pipe() {
    let m = model();
    let (p1, p2, p3) = ("Hello! Who are you?", "Write a haiku about Rust.", "And times 3?");
    let flags = ["--temperature", "0", "--max-tokens", "8"];
    let mut args = vec!["chat", "--model", m, "--threads", "1"];
    args.extend(flags);
    let input = format!("{p1}\n/no_think\n\n{p2}\n/clear\n{p3}\n/exit\nnever read\n");
    let o = qwick_with_stdin(&args, &input);
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("thinking off") && err.contains("conversation cleared"), "{err}");

    // The same turns through `qwick run`.
    fn one<'a>(flags: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        flags.iter().chain(extra).copied().collect()
    }
    let j1 = run_json(&one(&flags, &["--prompt", p1]));
    let a1 = j1["text"].as_str().unwrap();
    // Turn 2 sees turn 1 with its reasoning apart (and thinking now off).
    let mut reply = json!({"role": "assistant", "content": j1["content"]});
    if j1["reasoning"].as_str().is_some_and(|r| !r.is_empty()) {
        reply["reasoning_content"] = j1["reasoning"].clone();
    }
    let history = json!([{"role": "user", "content": p1}, reply, {"role": "user", "content": p2}]);
    let chat_dir = scratch("chat");
    let file = chat_dir.join("history.json");
    std::fs::write(&file, history.to_string()).unwrap();
    let j2 = run_json(&one(&flags, &["--messages", file.to_str().unwrap(), "--no-think"]));
    let a2 = j2["text"].as_str().unwrap();
    // After /clear only the new question, still without thinking.
    let j3 = run_json(&one(&flags, &["--prompt", p3, "--no-think"]));
    let a3 = j3["text"].as_str().unwrap();
    // Sanity: turn 2 depends on the history.
    let alone = run_json(&one(&flags, &["--prompt", p2, "--no-think"]));
    assert_ne!(alone["token_ids"], j2["token_ids"], "the history changes turn 2");
    assert_eq!(out, format!("{a1}\n{a2}\n{a3}\n"));

    // /think turns thinking back on; end of input ends the session.
    let o = qwick_with_stdin(&args, &format!("/no_think\n/think\n{p1}\n"));
    assert_eq!(ok(&o), format!("{a1}\n"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("thinking on"), "{err}");
}

#[test]
fn chat_reports_turn_errors_and_goes_on() {
    let m = model();
    let long = "hello ".repeat(600);
    let args = ["chat", "--model", m, "--temperature", "0", "--max-tokens", "4", "--threads", "1"];
    let o = qwick_with_stdin(&args, &format!("{long}\n/bogus\nHello! Who are you?\n"));
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error: the conversation has") && err.contains("unknown command /bogus"), "{err}");
    let v = run_json(&["--prompt", "Hello! Who are you?", "--temperature", "0", "--max-tokens", "4"]);
    assert_eq!(out, format!("{}\n", v["text"].as_str().unwrap()), "the failed turn is not in the history");
}

/// Speculative decoding from the command line: drafted by the model itself (every draft kept)
/// or by prompt lookup, the greedy tokens are transformers'; a draft of another vocabulary or
/// tokenizer is refused by name.
#[test]
fn speculative_decoding_keeps_the_greedy_tokens() {
    let n = refs()["max_new_tokens"].as_u64().unwrap().to_string();
    let c = case("hello_think");
    for spec in [&["--draft-model", model(), "--draft-tokens", "4"][..], &["--spec", "ngram:2"][..]] {
        let mut args = vec!["--temperature", "0", "--max-tokens", &n];
        args.extend(case_args(c));
        args.extend(spec);
        let v = run_json(&args);
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]), "{spec:?}");
        let s = &v["speculative"];
        assert!(s["drafted_tokens"].as_u64().unwrap() > 0, "{spec:?}: {s}");
        if spec[0] == "--draft-model" {
            assert_eq!(s["accepted_tokens"], s["drafted_tokens"], "the model agrees with itself: {s}");
        }
    }
    // On the GPU, the draft there too.
    if common::have_gpu("speculative_decoding_keeps_the_greedy_tokens (GPU part)") {
        let mut args = vec!["--temperature", "0", "--max-tokens", &n, "--device", "gpu", "--draft-model", model()];
        args.extend(case_args(c));
        let v = run_json(&args);
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]), "on the GPU");
        assert_eq!(v["speculative"]["accepted_tokens"], v["speculative"]["drafted_tokens"]);
    }
    // Sampling with a draft runs to its token limit.
    let v = run_json(&[
        "--prompt",
        "hi",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--max-tokens",
        "12",
        "--draft-model",
        model(),
    ]);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 12);

    let tmp = scratch("spec");
    // The same model with another tokenizer.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(model()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(other.join("tokenizer.json")).unwrap()).unwrap();
    // Two tokens' ids swapped.
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["hello"].clone(), vocab["world"].clone());
    vocab.insert("hello".into(), b);
    vocab.insert("world".into(), a);
    std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
    let other = other.to_str().unwrap();
    let m = model();
    expect_error(&["run", "--model", m, "--prompt", "hi", "--draft-model", other], "", "tokenizer differs");
    // Another vocabulary size (a fixture of 512 tokens).
    let small = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/dense_f32");
    expect_error(&["run", "--model", m, "--prompt", "hi", "--draft-model", small], "", "vocabulary has");
    expect_error(&["run", "--model", m, "--prompt", "hi", "--spec", "ngrams"], "", "--spec takes ngram");
    expect_error(
        &["run", "--model", m, "--prompt", "hi", "--draft-tokens", "3"],
        "",
        "go with --draft-model or --spec",
    );
}
