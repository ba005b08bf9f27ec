use crate::error::{read_json, ChatError, Result};
use crate::pyjson::{dumps_with, DumpOptions};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// One message of a conversation, in the OpenAI chat format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text. Required except for assistant messages that carry tool calls or reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The assistant's thinking, kept apart from `content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool calls made by the assistant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `tool` messages: the id of the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Optional name of the author (or of the tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: Some(content.into()), ..Self::default() }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// A tool result.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }
}

/// A tool call in the OpenAI form `{"type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, if the API assigned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments: a JSON string (as the OpenAI API sends them) or a JSON object. The Qwen
    /// template writes a string verbatim and an object through `tojson`.
    pub arguments: Json,
}

impl ToolCall {
    /// A function call with arguments given as a JSON string or object.
    pub fn function(name: impl Into<String>, arguments: impl Into<Json>) -> Self {
        Self {
            id: None,
            kind: function_type(),
            function: FunctionCall { name: name.into(), arguments: arguments.into() },
        }
    }
}

/// What to render besides the messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderOptions {
    /// Tool definitions in OpenAI JSON form (`{"type": "function", "function": {...}}`).
    pub tools: Option<Vec<Json>>,
    /// Append the header of a new assistant turn.
    pub add_generation_prompt: bool,
    /// Qwen3's thinking switch; `None` leaves it to the template (thinking on for Qwen3).
    pub enable_thinking: Option<bool>,
    /// Any other template variables, like transformers' `**kwargs` (they override the special
    /// token variables; `enable_thinking` above overrides an entry here).
    pub extra: Map<String, Json>,
}

/// A model's chat template, rendered like transformers' `apply_chat_template(..., tokenize=False)`.
///
/// The Jinja environment matches transformers': `trim_blocks` and `lstrip_blocks`, loop controls,
/// Python string/dict methods (`startswith`, `split`, `strip`, `items`, ...), a `tojson` that
/// writes like `json.dumps(ensure_ascii=False)` (with `indent`, `separators`, `sort_keys`,
/// `ensure_ascii`), `raise_exception`, `strftime_now` (UTC), `namespace`, and Python's spelling
/// of printed values (`True`, `False`, `None`).
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Names of the compiled templates: `default`, and `tool_use` when the model has one.
    has_tool_use: bool,
    vars: Map<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("has_tool_use", &self.has_tool_use).field("vars", &self.vars).finish()
    }
}

const SPECIAL_TOKEN_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

impl ChatTemplate {
    /// Compiles a template from its source.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        Self::build(source.into(), None)
    }

    fn build(default: String, tool_use: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, state, value| {
            // Jinja2 prints Python's str(): True / False / None.
            let py = match value.kind() {
                ValueKind::Bool if value.is_true() => Some("True"),
                ValueKind::Bool => Some("False"),
                ValueKind::None => Some("None"),
                _ => None,
            };
            match py {
                Some(s) => out.write_str(s).map_err(JinjaError::from),
                None => minijinja::escape_formatter(out, state, value),
            }
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        let compile = |env: &mut Environment<'static>, name: &'static str, src: String| {
            env.add_template_owned(name, src)
                .map_err(|e| ChatError::Template(format!("{name} template does not compile: {e:#}")))
        };
        compile(&mut env, "default", default)?;
        let has_tool_use = tool_use.is_some();
        if let Some(src) = tool_use {
            compile(&mut env, "tool_use", src)?;
        }
        Ok(Self { env, has_tool_use, vars: Map::new() })
    }

    /// Loads a template file (a `.jinja` file, or a JSON file with a `chat_template` key).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ChatError::io(path, e))?;
        if path.extension().is_some_and(|e| e == "json") {
            let json: Json = serde_json::from_str(&text).map_err(|e| ChatError::config(path, e))?;
            return Self::from_config_value(json.get("chat_template"))
                .map_err(|e| ChatError::config(path, e))?
                .ok_or_else(|| ChatError::config(path, "no \"chat_template\" key"));
        }
        Self::new(text)
    }

    /// The template of a model folder: `chat_template` in `tokenizer_config.json`, else
    /// `chat_template.jinja` or `chat_template.json`. The special tokens named in
    /// `tokenizer_config.json` (`eos_token`, ...) become template variables, as in transformers.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let from_config = match &config {
            Some(c) => {
                Self::from_config_value(c.get("chat_template")).map_err(|e| ChatError::config(&config_path, e))?
            }
            None => None,
        };
        let template = match from_config {
            Some(t) => t,
            None if dir.join("chat_template.jinja").is_file() => Self::from_file(dir.join("chat_template.jinja"))?,
            None if dir.join("chat_template.json").is_file() => Self::from_file(dir.join("chat_template.json"))?,
            None => {
                return Err(ChatError::Template(format!(
                    "the model folder {} has no chat template (no \"chat_template\" in \
                     tokenizer_config.json, no chat_template.jinja); give one from a file \
                     (ChatTemplate::from_file)",
                    dir.display()
                )))
            }
        };
        Ok(match &config {
            Some(c) => template.with_special_tokens_from(c),
            None => template,
        })
    }

    /// Parses the `chat_template` value of a config: a string, or a list of `{name, template}`.
    fn from_config_value(value: Option<&Json>) -> Result<Option<Self>> {
        match value {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Self::new(s.clone()).map(Some),
            Some(Json::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some(name))
                        .and_then(|t| t.get("template").and_then(Json::as_str))
                        .map(str::to_string)
                };
                let default = named("default")
                    .ok_or_else(|| ChatError::Template("the list of chat templates has no \"default\"".into()))?;
                Self::build(default, named("tool_use")).map(Some)
            }
            Some(other) => {
                Err(ChatError::Template(format!("\"chat_template\" must be a string or a list, not {other}")))
            }
        }
    }

    /// Adds the special tokens of a parsed `tokenizer_config.json` as template variables
    /// (`bos_token`, `eos_token`, `unk_token`, `pad_token`, when set).
    pub fn with_special_tokens_from(mut self, tokenizer_config: &Json) -> Self {
        for key in SPECIAL_TOKEN_KEYS {
            let token = match tokenizer_config.get(key) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(Into::into),
                _ => None,
            };
            if let Some(token) = token {
                self.vars.insert(key.into(), Json::String(token));
            }
        }
        self
    }

    /// Sets a variable every rendering sees (overridden by [`RenderOptions::extra`]).
    pub fn with_var(mut self, name: impl Into<String>, value: impl Into<Json>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// Renders a conversation. Messages are checked first: the role must be `system`, `user`,
    /// `assistant` or `tool`; system, user and tool messages need `content`; an assistant message
    /// needs content, reasoning or tool calls (missing content then renders as empty).
    pub fn render(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String> {
        if messages.is_empty() {
            return Err(ChatError::Message("the conversation has no messages".into()));
        }
        let messages = messages.iter().enumerate().map(|(i, m)| message_json(i, m)).collect::<Result<Vec<_>>>()?;
        let mut ctx = self.vars.clone();
        ctx.extend(opts.extra.clone());
        if let Some(on) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), Json::Bool(on));
        }
        ctx.insert("messages".into(), Json::Array(messages));
        ctx.insert("tools".into(), opts.tools.clone().map_or(Json::Null, Json::Array));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        let name = if self.has_tool_use && opts.tools.is_some() { "tool_use" } else { "default" };
        let template = self.env.get_template(name).map_err(|e| ChatError::Template(e.to_string()))?;
        template.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| ChatError::Template(format!("{e:#}")))
    }
}

/// Validates a message and turns it into the dict the template sees (None fields left out,
/// `reasoning_content` also under `thinking`, as transformers does).
fn message_json(index: usize, m: &ChatMessage) -> Result<Json> {
    let needs_content = match m.role.as_str() {
        "system" | "user" | "tool" => true,
        "assistant" => {
            let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
            if m.content.is_none() && !has_calls && m.reasoning_content.is_none() {
                return Err(ChatError::Message(format!(
                    "assistant message {index} has no content, reasoning_content or tool_calls"
                )));
            }
            false
        }
        other => {
            let expected = "expected system, user, assistant or tool";
            return Err(ChatError::Message(format!("message {index} has unknown role {other:?} ({expected})")));
        }
    };
    if needs_content && m.content.is_none() {
        return Err(ChatError::Message(format!("{} message {index} has no content", m.role)));
    }
    if let Some(calls) = &m.tool_calls {
        if m.role != "assistant" && !calls.is_empty() {
            return Err(ChatError::Message(format!("message {index}: only assistant messages can have tool_calls")));
        }
        if let Some(i) = calls.iter().position(|c| c.function.name.is_empty()) {
            return Err(ChatError::Message(format!("message {index}: tool call {i} has an empty function name")));
        }
    }
    let mut json = serde_json::to_value(m).map_err(|e| ChatError::Message(e.to_string()))?;
    if let Json::Object(map) = &mut json {
        if m.role == "assistant" && m.content.is_none() {
            map.insert("content".into(), Json::String(String::new()));
        }
        if let Some(r) = &m.reasoning_content {
            map.insert("thinking".into(), Json::String(r.clone()));
        }
    }
    Ok(json)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, JinjaError> {
    let bad = |msg: String| JinjaError::new(ErrorKind::InvalidOperation, msg);
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut opts = DumpOptions {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        ..DumpOptions::default()
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::Number => {
            let n = i64::try_from(v.clone()).map_err(|_| bad(format!("tojson: bad indent {v}")))?;
            Some(" ".repeat(n.max(0) as usize))
        }
        Some(v) => Some(
            v.as_str().ok_or_else(|| bad(format!("tojson: indent must be a number or string, not {v}")))?.to_string(),
        ),
    };
    opts = opts.with_indent(indent);
    if let Some(seps) = separators.filter(|v| !v.is_none() && !v.is_undefined()) {
        let parts: Vec<String> = seps
            .try_iter()?
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .filter(|p: &Vec<String>| p.len() == 2)
            .ok_or_else(|| bad("tojson: separators must be two strings".into()))?;
        opts.item_separator = parts[0].clone();
        opts.key_separator = parts[1].clone();
    }
    let json: Json = serde_json::to_value(&value).map_err(|e| bad(format!("tojson: cannot serialise {value}: {e}")))?;
    Ok(dumps_with(&json, &opts))
}

/// `strftime_now(format)`: the current UTC time with the common `strftime` codes.
fn strftime_now(format: String) -> Result<String, JinjaError> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&format, secs)
}

/// `unix` (seconds since 1970, UTC) formatted with the `strftime` codes templates' `strftime_now`
/// knows (`%Y %y %m %d %e %j %B %b %A %a %H %I %M %S %p %%`); an unknown code is an error.
pub fn format_utc(format: &str, unix: i64) -> std::result::Result<String, String> {
    strftime(format, unix).map_err(|e| e.to_string())
}

/// Formats a Unix time (UTC) with `%Y %y %m %d %e %j %B %b %A %a %H %I %M %S %p %%`.
fn strftime(format: &str, unix: i64) -> Result<String, JinjaError> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('Y') => year.to_string(),
            Some('y') => format!("{:02}", year.rem_euclid(100)),
            Some('m') => format!("{month:02}"),
            Some('d') => format!("{day:02}"),
            Some('e') => format!("{day:>2}"),
            Some('j') => format!("{yday:03}"),
            Some('B') => month_name.into(),
            Some('b') => month_name[..3].into(),
            Some('A') => weekday.into(),
            Some('a') => weekday[..3].into(),
            Some('H') => format!("{hour:02}"),
            Some('I') => format!("{:02}", (hour + 11) % 12 + 1),
            Some('M') => format!("{minute:02}"),
            Some('S') => format!("{second:02}"),
            Some('p') => if hour < 12 { "AM" } else { "PM" }.into(),
            Some('%') => "%".into(),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{}", other.unwrap_or(' ')),
                ))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::strftime;

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %j %a %A %b %B %y %I%p %e %%", t).unwrap(),
            "2024-02-29 13:05:09 060 Thu Thursday Feb February 24 01PM 29 %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert!(strftime("%Q", 0).is_err());
    }
}
