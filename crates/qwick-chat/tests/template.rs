mod common;

use common::{cases, ids, refs_dir, temp_dir, tokenizer};
use qwick_chat::{ChatError, ChatMessage, ChatTemplate, RenderOptions, ToolCall};
use serde_json::{json, Map, Value};

fn options(case: &Value) -> RenderOptions {
    let mut kwargs: Map<String, Value> = case["kwargs"].as_object().cloned().unwrap_or_default();
    let add_generation_prompt = kwargs.remove("add_generation_prompt").and_then(|v| v.as_bool()).unwrap_or(false);
    let enable_thinking = kwargs.remove("enable_thinking").and_then(|v| v.as_bool());
    RenderOptions { tools: case["tools"].as_array().cloned(), add_generation_prompt, enable_thinking, extra: kwargs }
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).expect("messages deserialize")
}

#[test]
fn renders_exactly_like_transformers() {
    let template = ChatTemplate::from_dir(refs_dir()).unwrap();
    let all = cases("templates.json");
    assert!(all.len() >= 12);
    for case in &all {
        let name = case["name"].as_str().unwrap();
        let got = template.render(&messages(case), &options(case)).unwrap();
        let want = case["rendered"].as_str().unwrap();
        assert_eq!(got, want, "case {name}");
    }
}

#[test]
fn rendered_prompts_tokenize_like_python() {
    let tok = tokenizer();
    for case in cases("templates.json") {
        let rendered = case["rendered"].as_str().unwrap();
        assert_eq!(tok.encode(rendered, false).unwrap(), ids(&case["ids"]), "case {}", case["name"]);
    }
}

#[test]
fn jinja_features_match_transformers() {
    for case in cases("jinja.json") {
        let name = case["name"].as_str().unwrap();
        let template = ChatTemplate::new(case["template"].as_str().unwrap()).unwrap();
        let opts = RenderOptions {
            extra: case["kwargs"].as_object().cloned().unwrap_or_default(),
            ..RenderOptions::default()
        };
        let got = template.render(&messages(&case), &opts).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap(), "case {name}");
    }
}

#[test]
fn builder_api_matches_deserialized_messages() {
    let template = ChatTemplate::from_dir(refs_dir()).unwrap();
    let convo = vec![
        ChatMessage::system("You are a weather bot."),
        ChatMessage::user("Weather in Paris?"),
        ChatMessage {
            tool_calls: Some(vec![ToolCall::function("get_weather", json!({"city": "Paris", "unit": "celsius"}))]),
            ..ChatMessage::assistant("")
        },
        ChatMessage::tool("{\"temperature\": 21}"),
    ];
    let got = template
        .render(
            &convo,
            &RenderOptions { add_generation_prompt: true, enable_thinking: Some(false), ..RenderOptions::default() },
        )
        .unwrap();
    let want = "<|im_start|>system\nYou are a weather bot.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n\
<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call><|im_end|>\n\
<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
    assert_eq!(got, want);
    // Tool-call arguments given as a JSON string render verbatim; no content renders as empty
    // (transformers, given content "", renders the same).
    let convo = vec![
        ChatMessage::user("hi"),
        ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(vec![ToolCall::function("f", "{\"a\":1}")]),
            ..ChatMessage::default()
        },
    ];
    let got = template.render(&convo, &RenderOptions::default()).unwrap();
    assert!(got.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call><|im_end|>\n"), "{got}");
}

#[test]
fn invalid_messages_are_clear_errors() {
    let template = ChatTemplate::from_dir(refs_dir()).unwrap();
    let opts = RenderOptions::default();
    let err = |msgs: Vec<ChatMessage>| match template.render(&msgs, &opts) {
        Err(ChatError::Message(m)) => m,
        other => panic!("expected a message error, got {other:?}"),
    };
    assert!(err(vec![]).contains("no messages"));
    let m = err(vec![ChatMessage::new("robot", "x")]);
    assert!(m.contains("unknown role \"robot\""), "{m}");
    let m = err(vec![ChatMessage { role: "user".into(), ..ChatMessage::default() }]);
    assert!(m.contains("user message 0 has no content"), "{m}");
    let m = err(vec![ChatMessage::user("x"), ChatMessage { role: "assistant".into(), ..ChatMessage::default() }]);
    assert!(m.contains("assistant message 1"), "{m}");
    let m =
        err(vec![ChatMessage { tool_calls: Some(vec![ToolCall::function("", "{}")]), ..ChatMessage::assistant("") }]);
    assert!(m.contains("empty function name"), "{m}");
    // Unknown fields in JSON are rejected by nobody, but a wrong type is a serde error, not a panic.
    assert!(serde_json::from_value::<ChatMessage>(json!({"role": 3})).is_err());
}

#[test]
fn template_errors_are_results() {
    let dir = temp_dir("no-template");
    std::fs::write(dir.join("tokenizer_config.json"), "{\"eos_token\": \"</s>\"}").unwrap();
    let e = ChatTemplate::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("has no chat template") && e.contains("from_file"), "{e}");

    // A template from a file works for such a folder, and sees the variables we give it.
    let file = dir.join("chat.jinja");
    std::fs::write(&file, "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}\n").unwrap();
    let t = ChatTemplate::from_file(&file).unwrap().with_var("eos_token", "</s>");
    let out = t.render(&[ChatMessage::user("hi")], &RenderOptions::default()).unwrap();
    assert_eq!(out, "[user]hi</s>");

    // chat_template.jinja next to a config without a template, and list-form templates.
    std::fs::write(dir.join("chat_template.jinja"), "J:{{ messages[0].content }}").unwrap();
    let t = ChatTemplate::from_dir(&dir).unwrap();
    assert_eq!(t.render(&[ChatMessage::user("a")], &RenderOptions::default()).unwrap(), "J:a");
    let list = json!({"chat_template": [
        {"name": "default", "template": "D{{ tools is none }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"}
    ]});
    std::fs::write(dir.join("tokenizer_config.json"), list.to_string()).unwrap();
    let t = ChatTemplate::from_dir(&dir).unwrap();
    let msgs = [ChatMessage::user("a")];
    assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "DTrue");
    let with_tools = RenderOptions { tools: Some(vec![json!({"type": "function"})]), ..RenderOptions::default() };
    assert_eq!(t.render(&msgs, &with_tools).unwrap(), "T1");

    // Syntax errors, raise_exception and unknown filters are errors, not panics.
    assert!(matches!(ChatTemplate::new("{% if %}"), Err(ChatError::Template(_))));
    let t = ChatTemplate::new("{{ raise_exception('Only user and assistant roles!') }}").unwrap();
    let e = t.render(&msgs, &RenderOptions::default()).unwrap_err();
    assert!(e.to_string().contains("Only user and assistant roles!"), "{e}");
    for source in ["{{ x | no_such_filter }}", "{{ undefined_thing.attr.more }}"] {
        let t = ChatTemplate::new(source).unwrap();
        let e = t.render(&msgs, &RenderOptions::default()).unwrap_err();
        assert!(matches!(e, ChatError::Template(_)), "{source}: {e}");
    }
    let e = ChatTemplate::from_file(dir.join("missing.jinja")).unwrap_err();
    assert!(e.to_string().contains("missing.jinja"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn strftime_now_is_available() {
    let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}").unwrap();
    let out = t.render(&[ChatMessage::user("a")], &RenderOptions::default()).unwrap();
    assert_eq!(out, "4");
}
