//! Structured output constraints over the real Qwen3 tokenizer: texts the format admits pass
//! token by token (ending where EOS is allowed), texts it does not are cut off.

mod common;

use qwick_chat::{Grammars, OutputFormat};
use serde_json::{json, Value};

const VOCAB: usize = 151_936;
const IM_END: u32 = 151_645;

fn grammars() -> &'static Grammars {
    static G: std::sync::OnceLock<Grammars> = std::sync::OnceLock::new();
    G.get_or_init(|| Grammars::new(common::tokenizer(), VOCAB, IM_END).unwrap())
}

fn allows(mask: &[u32], t: u32) -> bool {
    mask.get(t as usize / 32).is_some_and(|w| w >> (t % 32) & 1 == 1)
}

/// Whether `text`, tokenized, is taken token by token, with EOS allowed at its end.
fn admits(format: &OutputFormat, text: &str) -> bool {
    let mut c = grammars().constraint(format).unwrap();
    for t in common::tokenizer().encode(text, false).unwrap() {
        if !allows(c.allowed().unwrap(), t) {
            return false;
        }
        c.consume(t).unwrap();
    }
    allows(c.allowed().unwrap(), IM_END)
}

fn tool(name: &str, params: Value) -> Value {
    json!({"type": "function", "function": {"name": name, "parameters": params}})
}

#[test]
fn forced_tool_calls_follow_the_argument_schemas() {
    let weather = json!({"type": "object", "properties": {"city": {"type": "string"},
        "unit": {"enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false});
    let time = json!({"type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]});
    let tools = [tool("get_weather", weather), tool("get_time", time), tool("ping", Value::Null)];

    // A named function: the prompt holds `{"name": "get_time", "arguments": `.
    let named = OutputFormat::tool_call(&tools, Some("get_time"), true);
    assert!(admits(&named, "{\"zone\": 3}}\n</tool_call>"));
    assert!(admits(&named, "{\"zone\":-2}}\n</tool_call>"));
    assert!(!admits(&named, "{\"zone\": \"3\"}}\n</tool_call>"), "a string where the schema says integer");
    assert!(!admits(&named, "{}}\n</tool_call>"), "a required property missing");
    assert!(!admits(&named, "{\"zone\": 3}}"), "the call not closed");
    assert!(!admits(&named, "{\"zone\": 3}}\n</tool_call>\n<tool_call>"), "one call only");

    // "required": the prompt holds `<tool_call>\n`; any tool, one call or more.
    let any = OutputFormat::tool_call(&tools, None, true);
    let call = |n: &str, a: &str| format!("{{\"name\": \"{n}\", \"arguments\": {a}}}\n</tool_call>");
    assert!(admits(&any, &call("get_weather", r#"{"city": "Paris", "unit": "c"}"#)));
    assert!(admits(&any, &call("ping", r#"{"anything": [1, 2]}"#)));
    assert!(admits(&any, &format!("{}\n<tool_call>\n{}", call("get_time", r#"{"zone": 1}"#), call("ping", "{}"))));
    assert!(!admits(&any, &call("get_weather", r#"{"city": "Paris", "unit": "k"}"#)), "not in the enum");
    assert!(!admits(&any, &call("get_weather", r#"{"city": "Paris", "extra": 1}"#)), "no other properties");
    assert!(!admits(&any, &call("nope", "{}")), "not a tool");
    assert!(!admits(&any, "Sure! Let me call a tool."), "text instead of a call");
    // parallel_tool_calls: false.
    let one = OutputFormat::tool_call(&tools, None, false);
    assert!(admits(&one, &call("get_time", r#"{"zone": 1}"#)));
    assert!(!admits(&one, &format!("{}\n<tool_call>\n{}", call("get_time", r#"{"zone": 1}"#), call("ping", "{}"))));
}

#[test]
fn tool_schemas_with_unsupported_features_are_refused() {
    let bad = tool("f", json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}));
    let e = grammars().constraint(&OutputFormat::tool_call(&[bad], None, true)).err().expect("an error");
    assert!(e.contains("if"), "{e}");
}

#[test]
fn gbnf_grammars_constrain_as_llama_cpp_reads_them() {
    // A GBNF grammar in llama.cpp's style: dashed names, a class, repetition, a group over lines.
    let g = r#"
root ::= greeting " " name ("!" | "?")
greeting ::= "hello" | "hi"
# names: a capital, then 1 to 8 small letters
name ::= [A-Z] [a-z]{1,8}
"#;
    let f = OutputFormat::grammar(g).unwrap();
    assert!(matches!(f, OutputFormat::Lark(_)));
    assert!(admits(&f, "hello World!"));
    assert!(admits(&f, "hi Bo?"));
    assert!(!admits(&f, "hello world!"), "a small first letter");
    assert!(!admits(&f, "hey World!"), "not a greeting");
    assert!(!admits(&f, "hi Abcdefghij!"), "a name too long");
    // llama.cpp's JSON-like grammar shapes: nesting, negated classes, escapes, an empty literal.
    let g = r#"root ::= "[" ws ( item ( "," ws item )* )? "]"
item ::= "\"" ( [^"\\] | "\\" ["\\n] )* "\""
ws ::= [ \t\n]* | ""
"#;
    let f = OutputFormat::grammar(g).unwrap();
    assert!(admits(&f, r#"["a", "b\"c"]"#));
    assert!(admits(&f, "[ ]"));
    assert!(!admits(&f, r#"["a" "b"]"#));
    // Lark stays Lark.
    assert_eq!(OutputFormat::grammar("start: \"x\"").unwrap(), OutputFormat::Lark("start: \"x\"".into()));
    assert!(OutputFormat::grammar("root ::= missing").unwrap_err().contains("`missing` is not defined"));
}
