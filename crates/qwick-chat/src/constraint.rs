//! Structured output: JSON schemas, regexes, choice lists and Lark grammars turned into token
//! constraints with the `llguidance` crate, over the model's own tokenizer.

use crate::error::{ChatError, Result};
use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use qwick_sampler::TokenConstraint;
use serde_json::Value;
use std::sync::Arc;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// Text matching this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar.
    Lark(String),
}

impl OutputFormat {
    /// A grammar as clients write it: GBNF (llama.cpp's, rules written `name ::= ...`, see
    /// [`crate::gbnf_to_lark`]) or else Lark.
    pub fn grammar(text: &str) -> std::result::Result<OutputFormat, String> {
        if crate::is_gbnf(text) {
            crate::gbnf_to_lark(text).map(OutputFormat::Lark)
        } else {
            Ok(OutputFormat::Lark(text.to_string()))
        }
    }
}

/// JSON may be laid out freely, but with at most a few whitespace characters between two tokens
/// of it: a model cannot stall in whitespace forever.
fn bounded_whitespace(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": true, "whitespace_pattern": "[ \\t\\n\\r]{0,32}"}),
        );
    }
    schema
}

impl OutputFormat {
    /// The rest of a forced tool call in Qwen3's format (`<tool_call>\n{"name": …, "arguments":
    /// …}\n</tool_call>`), the arguments valid against the tool's `parameters` schema. `name:
    /// None`: the prompt ends in `<tool_call>\n`, and calls to any of `tools` follow;
    /// `Some(name)`: the prompt ends in `<tool_call>\n{"name": NAME, "arguments": `, and that
    /// call is finished. `tools` are OpenAI tool definitions (`{"function": {"name",
    /// "parameters"}}`). `parallel: false`: one call only.
    pub fn tool_call(tools: &[Value], name: Option<&str>, parallel: bool) -> OutputFormat {
        let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let end = lit("}\n</tool_call>");
        let mut g = String::new();
        let mut calls = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let f = &t["function"];
            let Some(n) = f["name"].as_str() else { continue };
            if name.is_some_and(|want| want != n) {
                continue;
            }
            let params = match &f["parameters"] {
                Value::Null => serde_json::json!({"type": "object"}),
                p => p.clone(),
            };
            g.push_str(&format!("args_{i}: %json {}\n", bounded_whitespace(params)));
            let head = format!("{{\"name\": {}, \"arguments\": ", Value::String(n.to_string()));
            calls.push(if name.is_some() {
                format!("args_{i} {end}")
            } else {
                format!("{} args_{i} {end}", lit(&head))
            });
        }
        let start = if name.is_some() || !parallel {
            "start: call\n".to_string()
        } else {
            format!("start: call ({} call)*\n", lit("\n<tool_call>\n"))
        };
        OutputFormat::Lark(format!("{start}call: {}\n{g}", calls.join(" | ")))
    }
}

/// Compiles output formats into constraints for one model's tokenizer (built once per model).
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

/// The byte each character of a byte-level BPE token stands for (GPT-2's mapping: printable
/// bytes are themselves, the others are shifted past U+0100 in order).
fn byte_of_char() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = std::collections::HashMap::new();
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(0xFF + shifted).expect("a valid char")
        };
        map.insert(c, b);
    }
    map
}

/// The tokenizer as llguidance sees it: every token's bytes (special tokens marked), and
/// tokenization of byte strings.
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer.encode(&String::from_utf8_lossy(s), false).unwrap_or_default()
    }
}

impl Grammars {
    /// `vocab`: the model's vocabulary size (logit rows; ids past the tokenizer's are never
    /// allowed); `eos`: the token that ends a constrained answer (`<|im_end|>` for Qwen3).
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: u32) -> Result<Grammars> {
        let chars = byte_of_char();
        let special = tokenizer.special_ids();
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(vocab);
        for id in 0..vocab as u32 {
            let Some(tok) = tokenizer.id_to_token(id) else {
                // A padding row of the embedding: a special token nothing produces.
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend(format!("<|unused_{id}|>").bytes());
                words.push(w);
                continue;
            };
            let bytes: Option<Vec<u8>> = tok.chars().map(|c| chars.get(&c).copied()).collect();
            match bytes {
                Some(b) if !special.contains(&id) => words.push(b),
                _ => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(tok.bytes());
                    words.push(w);
                }
            }
        }
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ChatError::Tokenizer(format!("{e:#}")))?;
        factory.quiet();
        Ok(Grammars { factory: Arc::new(factory) })
    }

    /// A constraint for `format`; an error names what the format uses that is not supported.
    pub fn constraint(&self, format: &OutputFormat) -> std::result::Result<Box<dyn TokenConstraint>, String> {
        let json = |schema: Value| TopLevelGrammar::from_json_schema(bounded_whitespace(schema));
        let grammar = match format {
            OutputFormat::JsonObject => json(serde_json::json!({"type": "object"})),
            OutputFormat::JsonSchema(s) => json(s.clone()),
            OutputFormat::Regex(r) => TopLevelGrammar::from_regex(r),
            OutputFormat::Choice(c) => {
                if c.is_empty() {
                    return Err("the choice list is empty".into());
                }
                let alts: Vec<String> = c.iter().map(|s| serde_json::to_string(s).unwrap_or_default()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            OutputFormat::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| format!("{e:#}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Box::new(LlgConstraint { matcher, mask: Vec::new() }))
    }
}

struct LlgConstraint {
    matcher: Matcher,
    mask: Vec<u32>,
}

impl TokenConstraint for LlgConstraint {
    fn allowed(&mut self) -> std::result::Result<&[u32], String> {
        let m = self.matcher.compute_mask_or_eos().map_err(|e| format!("{e:#}"))?;
        self.mask.clear();
        self.mask.extend_from_slice(m.as_slice());
        Ok(&self.mask)
    }

    fn consume(&mut self, token: u32) -> std::result::Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| format!("{e:#}"))
    }
}
