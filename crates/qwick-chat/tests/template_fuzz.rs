//! Thousands of generated chat-template inputs (message lists with random roles, contents,
//! reasoning, tool calls and tool answers; random tool definitions and template variables)
//! rendered with Qwen3's own template: each renders or is an error, none panics.

mod common;

use qwick_chat::{ChatMessage, ChatTemplate, RenderOptions};
use qwick_sampler::Rng;
use serde_json::{json, Map, Value};

fn pick<'a>(rng: &mut Rng, v: &'a [&'a str]) -> &'a str {
    v[rng.below(v.len())]
}

const TEXTS: &[&str] = &[
    "",
    "hi",
    "<think>\nplan\n</think>\n\nanswer",
    "</think>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<tool_response>x</tool_response>",
    "<|im_start|>user\nx<|im_end|>",
    "{{ raise_exception('x') }}",
    "{% for x in y %}",
    "天空 🌤 naïve",
    "\u{0}\u{7f}\u{feff}",
    "/no_think",
    "/think",
];

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth < 3 { 9 } else { 6 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.below(1000) as i64 - 500),
        3 => json!(1e300),
        4 | 5 => json!(pick(rng, TEXTS)),
        6 | 7 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => {
            let keys = ["type", "function", "name", "parameters", "properties", "description", "arguments", "x"];
            Value::Object(
                (0..rng.below(4)).map(|_| (pick(rng, &keys).to_string(), random_value(rng, depth + 1))).collect(),
            )
        }
    }
}

fn random_message(rng: &mut Rng) -> Value {
    let role = pick(rng, &["system", "user", "assistant", "tool", "developer", "", "function"]);
    let mut m = Map::new();
    m.insert("role".into(), json!(role));
    if rng.below(6) != 0 {
        m.insert("content".into(), json!(pick(rng, TEXTS)));
    }
    if rng.below(4) == 0 {
        m.insert("reasoning_content".into(), json!(pick(rng, TEXTS)));
    }
    if rng.below(4) == 0 {
        let calls: Vec<Value> = (0..rng.below(3))
            .map(|_| {
                let args = if rng.below(2) == 0 { json!(pick(rng, TEXTS)) } else { random_value(rng, 1) };
                json!({"id": "c1", "type": "function", "function": {"name": pick(rng, TEXTS), "arguments": args}})
            })
            .collect();
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    if rng.below(5) == 0 {
        m.insert("tool_call_id".into(), json!(pick(rng, TEXTS)));
    }
    if rng.below(10) == 0 {
        m.insert(pick(rng, &["name", "x", "content"]).into(), random_value(rng, 1));
    }
    Value::Object(m)
}

#[test]
fn generated_inputs_render_or_fail_cleanly() {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(common::refs_dir().join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = ChatTemplate::new(config["chat_template"].as_str().unwrap()).unwrap();
    let mut rng = Rng::seed_from_u64(0x853C_49E6_748F_EA9B);
    let (mut rendered, mut refused, mut unparsed) = (0, 0, 0);
    for i in 0..4000 {
        let msgs: Vec<Value> = (0..rng.below(6)).map(|_| random_message(&mut rng)).collect();
        let Ok(messages) = serde_json::from_value::<Vec<ChatMessage>>(Value::Array(msgs)) else {
            unparsed += 1;
            continue;
        };
        let tools = match rng.below(3) {
            0 => None,
            1 => Some((0..rng.below(3)).map(|_| random_value(&mut rng, 0)).collect()),
            _ => Some(vec![json!({"type": "function", "function": {"name": pick(&mut rng, TEXTS),
                "parameters": random_value(&mut rng, 1)}})]),
        };
        let mut extra = Map::new();
        if rng.below(4) == 0 {
            extra.insert(
                pick(&mut rng, &["bos_token", "eos_token", "tools", "messages", "x"]).into(),
                random_value(&mut rng, 0),
            );
        }
        let opts = RenderOptions {
            tools,
            add_generation_prompt: rng.below(2) == 0,
            enable_thinking: [None, Some(true), Some(false)][rng.below(3)],
            extra,
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render(&messages, &opts))) {
            Ok(Ok(_)) => rendered += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("iteration {i}: rendering panicked on {messages:?} with {opts:?}"),
        }
    }
    assert!(rendered > 200 && refused > 100, "rendered {rendered}, refused {refused}, unparsed {unparsed}");
}
