//! JSON text exactly as Python's `json.dumps` writes it, which is what chat templates rendered by
//! transformers produce through their `tojson` filter (`ensure_ascii=False`, key order kept) and
//! what vLLM's tool parsers return as arguments.

use serde_json::Value;
use std::fmt::Write;

/// Options of Python's `json.dumps` that templates use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOptions {
    /// Escape every non-ASCII character as `\uXXXX` (Python's `ensure_ascii`).
    pub ensure_ascii: bool,
    /// Pretty-print with this indent string per level (Python's `indent`; a number `n` is `n` spaces).
    pub indent: Option<String>,
    /// Separator between items; Python's default is `", "`, or `","` when indenting.
    pub item_separator: String,
    /// Separator between a key and its value; Python's default is `": "`.
    pub key_separator: String,
    /// Sort object keys (Python's `sort_keys`).
    pub sort_keys: bool,
}

impl Default for DumpOptions {
    /// Python's defaults for `json.dumps(x, ensure_ascii=False)`.
    fn default() -> Self {
        Self {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

impl DumpOptions {
    /// Options with `indent`, adjusting the default item separator like Python does.
    pub fn with_indent(mut self, indent: Option<String>) -> Self {
        if indent.is_some() && self.item_separator == ", " {
            self.item_separator = ",".into();
        }
        self.indent = indent;
        self
    }
}

/// `json.dumps(value, ensure_ascii=False)`: compact one-line JSON with `", "` and `": "`.
pub fn dumps(value: &Value) -> String {
    dumps_with(value, &DumpOptions::default())
}

/// `json.dumps` with the given options.
pub fn dumps_with(value: &Value, opts: &DumpOptions) -> String {
    let mut out = String::new();
    write_value(&mut out, value, opts, 0);
    out
}

fn newline(out: &mut String, opts: &DumpOptions, level: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_value(out: &mut String, value: &Value, opts: &DumpOptions, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                write!(out, "{i}").ok();
            } else if let Some(u) = n.as_u64() {
                write!(out, "{u}").ok();
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_str(out, s, opts.ensure_ascii),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                newline(out, opts, level + 1);
                write_value(out, item, opts, level + 1);
            }
            newline(out, opts, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                newline(out, opts, level + 1);
                write_str(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_separator);
                write_value(out, v, opts, level + 1);
            }
            newline(out, opts, level);
            out.push('}');
        }
    }
}

fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    write!(out, "\\u{unit:04x}").ok();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, in scientific notation when the
/// exponent is below -4 or at least 16 (`1e-07`, `1e+16`), else positional with at least one
/// decimal (`1.0`, `0.0001`).
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()).ok();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_like_python_repr() {
        for (x, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-7, "1e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (-2.5e-300, "-2.5e-300"),
            (1.5e300, "1.5e+300"),
            (12.0, "12.0"),
        ] {
            assert_eq!(float_repr(x), s, "{x}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let v = json!({"b": [1, 2.0, null], "a": {"x": "é\u{1}\"\n"}, "e": [], "o": {}});
        assert_eq!(dumps(&v), r#"{"b": [1, 2.0, null], "a": {"x": "é\u0001\"\n"}, "e": [], "o": {}}"#);
        let opts = DumpOptions { ensure_ascii: true, sort_keys: true, ..DumpOptions::default() }
            .with_indent(Some("  ".into()));
        assert_eq!(
            dumps_with(&json!({"b": "😀", "a": [1]}), &opts),
            "{\n  \"a\": [\n    1\n  ],\n  \"b\": \"\\ud83d\\ude00\"\n}"
        );
    }
}
