//! GBNF, the grammar language llama.cpp's users write (`grammar` in its server's requests), read
//! into the Lark grammar the constraints take: rules `name ::= …` become Lark rules, `root` the
//! start, string literals JSON strings, character classes and `.` regexes, and groups,
//! alternatives and repetitions (`* + ? {m} {m,} {m,n}`) carry over as they are.

use std::collections::{HashMap, HashSet};

/// Whether `grammar` is written in GBNF: some line defines a rule with `::=`.
pub fn is_gbnf(grammar: &str) -> bool {
    grammar.lines().any(|l| {
        let l = l.trim_start();
        let name_len = l.find(|c: char| !is_name_char(c)).unwrap_or(l.len());
        name_len > 0 && l[name_len..].trim_start().starts_with("::=")
    })
}

/// The grammar as Lark, or an error naming the line and column of what is wrong.
pub fn gbnf_to_lark(grammar: &str) -> Result<String, String> {
    let toks = lex(grammar)?;
    let mut rules: Vec<(String, Vec<(Tok, Pos)>)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (Tok::Name(name), Tok::Define) = (&toks[i].0, toks.get(i + 1).map_or(&Tok::Close, |t| &t.0)) else {
            return Err(format!("GBNF {}: expected a rule, `name ::= ...`", toks[i].1));
        };
        let start = i + 2;
        let mut end = start;
        // A rule runs to where the next one starts (a name followed by `::=`).
        while end < toks.len()
            && !(matches!(toks[end].0, Tok::Name(_)) && toks.get(end + 1).is_some_and(|t| t.0 == Tok::Define))
        {
            end += 1;
        }
        if end == start {
            return Err(format!("GBNF {}: rule `{name}` is empty", toks[i].1));
        }
        rules.push((name.clone(), toks[start..end].to_vec()));
        i = end;
    }
    // Lark rule names are lower case, without dashes.
    let mut names: HashMap<&str, String> = HashMap::new();
    let mut taken: HashMap<String, &str> = HashMap::new();
    for (name, _) in &rules {
        let lark = format!("g_{}", name.to_ascii_lowercase().replace('-', "_"));
        if names.contains_key(name.as_str()) {
            return Err(format!("GBNF: rule `{name}` is defined twice"));
        }
        if let Some(other) = taken.insert(lark.clone(), name) {
            return Err(format!("GBNF: rules `{other}` and `{name}` differ only in case or dashes"));
        }
        names.insert(name, lark);
    }
    if !names.contains_key("root") {
        return Err("GBNF: the grammar has no `root` rule".into());
    }
    let mut out = String::from("start: g_root\n");
    let mut used = HashSet::new();
    for (name, body) in &rules {
        out.push_str(&names[name.as_str()]);
        out.push(':');
        let mut depth = 0usize;
        for (t, pos) in body {
            out.push(' ');
            match t {
                Tok::Name(n) => {
                    let lark = names.get(n.as_str()).ok_or_else(|| format!("GBNF {pos}: rule `{n}` is not defined"))?;
                    used.insert(n.as_str());
                    out.push_str(lark);
                }
                Tok::Define => return Err(format!("GBNF {pos}: `::=` inside rule `{name}`")),
                Tok::Literal(s) => {
                    if s.is_empty() {
                        // An empty literal matches nothing: an empty group.
                        out.push_str("\"\"?");
                    } else {
                        out.push_str(&serde_json::to_string(s).map_err(|e| e.to_string())?);
                    }
                }
                Tok::Regex(r) => {
                    out.push('/');
                    out.push_str(r);
                    out.push('/');
                }
                Tok::Open => {
                    depth += 1;
                    out.push('(');
                }
                Tok::Close => {
                    depth = depth.checked_sub(1).ok_or_else(|| format!("GBNF {pos}: `)` without its `(`"))?;
                    out.push(')');
                }
                Tok::Bar => out.push('|'),
                Tok::Op(op) => {
                    out.pop();
                    out.push_str(op);
                }
            }
        }
        if depth > 0 {
            return Err(format!("GBNF: rule `{name}` has a `(` without its `)`"));
        }
        out.push('\n');
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Define,
    /// A string literal's text (escapes read).
    Literal(String),
    /// A regex matching one character (a class or `.`), in the constraints' regex syntax.
    Regex(String),
    Open,
    Close,
    Bar,
    /// `*`, `+`, `?` or `{m}`, `{m,}`, `{m,n}`.
    Op(String),
}

/// A line and column, for messages.
#[derive(Debug, Clone, Copy)]
struct Pos(usize, usize);

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.0, self.1)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// A regex atom for one character: itself where it is a letter or digit, else its code.
fn regex_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:X}}}", c as u32)
    }
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    col: usize,
}

impl Lexer<'_> {
    fn pos(&self) -> Pos {
        Pos(self.line, self.col)
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    /// One character of a literal or class, reading an escape (`\n \r \t \\ \" \[ \] \- \xHH
    /// \uHHHH \UHHHHHHHH`).
    fn char_in(&mut self, what: &str) -> Result<char, String> {
        let pos = self.pos();
        let c = self.next().ok_or_else(|| format!("GBNF {pos}: the {what} is not closed"))?;
        if c != '\\' {
            return Ok(c);
        }
        let e = self.next().ok_or_else(|| format!("GBNF {pos}: the {what} is not closed"))?;
        let hex = |l: &mut Self, n: usize| -> Result<char, String> {
            let mut v = 0u32;
            for _ in 0..n {
                let d =
                    l.next().and_then(|c| c.to_digit(16)).ok_or_else(|| format!("GBNF {pos}: a bad `\\{e}` escape"))?;
                v = v * 16 + d;
            }
            char::from_u32(v).ok_or_else(|| format!("GBNF {pos}: `\\{e}` escapes no character"))
        };
        Ok(match e {
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' => e,
            _ => return Err(format!("GBNF {pos}: unknown escape `\\{e}`")),
        })
    }
}

fn lex(src: &str) -> Result<Vec<(Tok, Pos)>, String> {
    let mut l = Lexer { chars: src.chars().peekable(), line: 1, col: 1 };
    let mut out = Vec::new();
    while let Some(c) = l.peek() {
        let pos = l.pos();
        if c.is_whitespace() {
            l.next();
            continue;
        }
        if c == '#' {
            while l.peek().is_some_and(|c| c != '\n') {
                l.next();
            }
            continue;
        }
        let tok = if is_name_char(c) {
            let mut name = String::new();
            while let Some(c) = l.peek().filter(|&c| is_name_char(c)) {
                name.push(c);
                l.next();
            }
            Tok::Name(name)
        } else {
            l.next();
            match c {
                ':' => {
                    if (l.next(), l.next()) != (Some(':'), Some('=')) {
                        return Err(format!("GBNF {pos}: expected `::=`"));
                    }
                    Tok::Define
                }
                '"' => {
                    let mut s = String::new();
                    loop {
                        if l.peek() == Some('"') {
                            l.next();
                            break;
                        }
                        s.push(l.char_in("string")?);
                    }
                    Tok::Literal(s)
                }
                '[' => {
                    let mut class = String::from("[");
                    if l.peek() == Some('^') {
                        l.next();
                        class.push('^');
                    }
                    loop {
                        match l.peek() {
                            Some(']') => {
                                l.next();
                                break;
                            }
                            None => return Err(format!("GBNF {pos}: the character class is not closed")),
                            _ => {}
                        }
                        let a = l.char_in("character class")?;
                        class.push_str(&regex_char(a));
                        if l.peek() == Some('-') {
                            l.next();
                            if l.peek() == Some(']') {
                                // A `-` before the end is itself.
                                class.push_str(&regex_char('-'));
                                continue;
                            }
                            let b = l.char_in("character class")?;
                            if b < a {
                                return Err(format!("GBNF {pos}: the range {a:?}-{b:?} runs backwards"));
                            }
                            class.push('-');
                            class.push_str(&regex_char(b));
                        }
                    }
                    if class == "[" || class == "[^" {
                        return Err(format!("GBNF {pos}: an empty character class"));
                    }
                    class.push(']');
                    Tok::Regex(class)
                }
                '.' => Tok::Regex("[\\x{0}-\\x{10FFFF}]".into()),
                '(' => Tok::Open,
                ')' => Tok::Close,
                '|' => Tok::Bar,
                '*' | '+' | '?' => Tok::Op(c.to_string()),
                '{' => {
                    let mut body = String::new();
                    while let Some(c) = l.next() {
                        if c == '}' {
                            break;
                        }
                        body.push(c);
                    }
                    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
                    let ok = match body.split_once(',') {
                        None => body.parse::<u32>().is_ok(),
                        Some((m, n)) => m.parse::<u32>().is_ok() && (n.is_empty() || n.parse::<u32>().is_ok()),
                    };
                    if !ok {
                        return Err(format!("GBNF {pos}: a repetition is `{{m}}`, `{{m,}}` or `{{m,n}}`"));
                    }
                    Tok::Op(format!("{{{body}}}"))
                }
                _ => return Err(format!("GBNF {pos}: unexpected {c:?}")),
            }
        };
        out.push((tok, pos));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_literals_classes_and_repetitions_read_as_lark() {
        let g = "# yes or no\nroot ::= answer ws-tail\nanswer ::= (\"yes\" | \"no\\n\")\n  [a-z0-9_\\-]* .{2,3}\nws-tail ::= [^\\x41]?";
        assert!(is_gbnf(g));
        assert!(!is_gbnf("start: \"a\" | \"b\""));
        assert_eq!(
            gbnf_to_lark(g).unwrap(),
            "start: g_root\ng_root: g_answer g_ws_tail\n\
             g_answer: ( \"yes\" | \"no\\n\" ) /[a-z0-9\\x{5F}\\x{2D}]/* /[\\x{0}-\\x{10FFFF}]/{2,3}\n\
             g_ws_tail: /[^A]/?\n"
        );
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        for (g, want) in [
            ("answer ::= \"a\"", "no `root` rule"),
            ("root ::= a", "rule `a` is not defined"),
            ("root ::= \"a", "not closed"),
            ("root ::= [a-", "not closed"),
            ("root ::= [z-a]", "runs backwards"),
            ("root ::= (\"a\"", "without its `)`"),
            ("root ::= \"a\")", "without its `(`"),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
            ("root ::= \"a\" {x}", "repetition"),
            ("root ::= \"a\" ; \"b\"", "line 1, column 14: unexpected ';'"),
            ("root ::=", "empty"),
        ] {
            let e = gbnf_to_lark(g).unwrap_err();
            assert!(e.contains(want), "{g:?}: {e}");
        }
    }
}
