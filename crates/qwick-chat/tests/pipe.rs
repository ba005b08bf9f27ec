//! The text pipeline the server and the CLI stream output through, on Qwen3's real tokenizer, fed
//! one token at a time as the engine does: reasoning split from the answer, `<tool_call>` blocks
//! turned into calls (malformed ones left in the content), stop strings cut across tokens. The
//! random test model cannot be made to write these, so they are checked here on known text.

use qwick_chat::{tool_prefill, Delta, TextPipe, Tokenizer};
use std::io::Read;
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/chat_refs/tokenizer.json.gz");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut json).unwrap();
    Tokenizer::from_bytes(&json).unwrap()
}

/// Runs `text` through a pipe token by token; returns the concatenated output and the pipe.
fn run(tok: &Tokenizer, text: &str, stops: &[&str], reasoning: Option<bool>, tools: bool) -> (Delta, TextPipe) {
    run_after(tok, None, text, stops, reasoning, tools)
}

/// [`run`] with `prefill` (text the prompt already holds) fed to the pipe first.
fn run_after(
    tok: &Tokenizer,
    prefill: Option<&str>,
    text: &str,
    stops: &[&str],
    reasoning: Option<bool>,
    tools: bool,
) -> (Delta, TextPipe) {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut pipe = TextPipe::new(tok, &stops, reasoning, tools);
    if let Some(p) = prefill {
        pipe.prefill(p);
    }
    let mut all = Delta::default();
    for id in tok.encode(text, false).unwrap() {
        all.append(pipe.push(id));
        if pipe.stopped {
            break;
        }
    }
    all.append(pipe.finish());
    assert!(pipe.take_error().is_none());
    (all, pipe)
}

#[test]
fn reasoning_and_answer() {
    let tok = tokenizer();
    let (d, _) = run(&tok, "<think>\nLet me see.\n</think>\n\nThe answer is 4.", &[], Some(false), false);
    assert_eq!(d.reasoning, "Let me see.");
    assert_eq!(d.content, "The answer is 4.");
    // The prompt ended in <think>: everything before </think> is reasoning.
    let (d, _) = run(&tok, "Hmm, 2+2.\n</think>\n\n4", &[], Some(true), false);
    assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("Hmm, 2+2.", "4"));
    // Cut inside reasoning: all reasoning.
    let (d, _) = run(&tok, "still thinking", &[], Some(true), false);
    assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("still thinking", ""));
}

#[test]
fn tool_calls_are_parsed_and_malformed_ones_stay_content() {
    let tok = tokenizer();
    let text = "<think>\nNeed weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"°C\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let (d, pipe) = run(&tok, text, &[], Some(false), true);
    assert_eq!(d.reasoning, "Need weather.");
    assert_eq!(d.content, "");
    assert!(pipe.had_tool_calls);
    let calls: Vec<(&str, &str)> = d.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, vec![("get_weather", "{\"city\": \"Paris\", \"unit\": \"°C\"}"), ("get_time", "{}")]);

    let bad = "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>";
    let (d, pipe) = run(&tok, bad, &[], Some(false), true);
    assert!(d.tool_calls.is_empty() && !pipe.had_tool_calls);
    assert_eq!(d.content, bad);

    // Without tools, a tool call is just text.
    let (d, _) = run(&tok, "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", &[], Some(false), false);
    assert!(d.tool_calls.is_empty() && d.content.starts_with("<tool_call>"));
}

#[test]
fn stop_strings_cut_across_tokens() {
    let tok = tokenizer();
    // (text, stop strings, reasoning, stopped, content)
    let cases: [(&str, &[&str], Option<bool>, bool, &str); 3] = [
        ("One, two, three, four.", &["three"], Some(false), true, "One, two, "),
        ("Hello world", &["wor", "zzz"], None, true, "Hello "),
        ("Hello world", &["worlds"], None, false, "Hello world"),
    ];
    for (text, stops, reasoning, stopped, content) in cases {
        let (d, pipe) = run(&tok, text, stops, reasoning, false);
        assert_eq!(pipe.stopped, stopped, "{text:?} stopped by {stops:?}");
        assert_eq!(d.content, content);
    }
}

#[test]
fn text_is_the_output_cut_at_a_stop_string_before_the_split() {
    let tok = tokenizer();
    let (d, pipe) = run(&tok, "<think>\nHm.\n</think>\n\nFour. Five.", &[" Five"], Some(false), false);
    assert!(pipe.stopped);
    assert_eq!(d.text, "<think>\nHm.\n</think>\n\nFour.");
    assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("Hm.", "Four."));
    // Held back at the end (a possible stop string, a possible `</think>`): flushed by finish.
    let (d, _) = run(&tok, "Still </th", &["</thx"], Some(true), false);
    assert_eq!((d.text.as_str(), d.reasoning.as_str()), ("Still </th", "Still </th"));
    // Prefilled text is not generated text.
    let out = "{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
    let (d, _) = run_after(&tok, Some(&tool_prefill(None)), out, &[], Some(false), true);
    assert_eq!((d.text.as_str(), d.tool_calls.len()), (out, 1));
}

#[test]
fn a_forced_tool_call_is_parsed_with_its_prefilled_start() {
    let tok = tokenizer();
    // tool_choice "required": the prompt ends in "<tool_call>\n"; the model writes the rest.
    let pre = tool_prefill(None);
    assert_eq!(pre, "<tool_call>\n");
    let out = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let (d, pipe) = run_after(&tok, Some(&pre), out, &[], Some(false), true);
    assert!(pipe.had_tool_calls);
    assert_eq!(d.content, "");
    let calls: Vec<(&str, &str)> = d.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, vec![("get_weather", "{\"city\": \"Paris\"}")]);

    // A named function: the prompt holds its name too; the model writes the arguments.
    let pre = tool_prefill(Some("get_weather"));
    assert_eq!(pre, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ");
    let (d, pipe) = run_after(&tok, Some(&pre), "{\"city\": \"Oslo\"}}\n</tool_call>", &[], Some(false), true);
    assert!(pipe.had_tool_calls);
    let calls: Vec<(&str, &str)> = d.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, vec![("get_weather", "{\"city\": \"Oslo\"}")]);

    // Output that does not complete a call: no calls; the content is the whole answer, prefix included.
    let (d, pipe) = run_after(&tok, Some(&pre), "nonsense", &[], Some(false), true);
    assert!(!pipe.had_tool_calls && d.tool_calls.is_empty());
    assert_eq!(d.content, format!("{pre}nonsense"));
    // A stop string applies to the model's output only, not to the prefilled start.
    let (d, pipe) = run_after(&tok, Some(&pre), "{} more", &["name", " more"], Some(false), true);
    assert!(pipe.stopped && d.tool_calls.is_empty());
    assert_eq!(d.content, format!("{pre}{{}}"));
}

#[test]
fn one_tool_call_ends_the_answer_at_its_first_call() {
    let tok = tokenizer();
    let two = "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n\
               <tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
    let (d, pipe) = run_after(&tok, None, two, &[], Some(false), true);
    assert_eq!(d.tool_calls.len(), 2);
    assert!(!pipe.stopped);
    // parallel_tool_calls: false.
    let stops: Vec<String> = vec![];
    let mut pipe = TextPipe::new(&tok, &stops, Some(false), true);
    pipe.one_tool_call();
    let mut calls = vec![];
    let mut content = String::new();
    for id in tok.encode(two, false).unwrap() {
        let d = pipe.push(id);
        calls.extend(d.tool_calls);
        content.push_str(&d.content);
        if pipe.stopped {
            break;
        }
    }
    assert!(pipe.stopped);
    assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(content, "Let me check.");
}
