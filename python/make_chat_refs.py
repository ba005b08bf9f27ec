#!/usr/bin/env python3
"""Make the reference data that qwick-chat's tests compare against (tests/chat_refs/).

Needs `transformers`, `tokenizers` and `jinja2`; CI does not run this script, it only reads what it wrote:

  tokenizer.json.gz, tokenizer_config.json, generation_config.json  copies of the Qwen3 files
  templates.json  conversations rendered by transformers' apply_chat_template with the official template
  jinja.json      small templates exercising tojson and Python string methods, rendered by transformers
  tokenize.json   token ids and decodings from the Python `tokenizers` library and transformers

Usage: python python/make_chat_refs.py [QWEN3_DIR] (default: shared/qwen3 next to the repository, or
/work/shared/qwen3).
"""

import gzip
import json
import os
import shutil
import sys

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "chat_refs")


def find_model_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    for cand in (os.path.join(ROOT, "shared", "qwen3"), os.path.join(ROOT, "..", "shared", "qwen3"), "/work/shared/qwen3"):
        if os.path.exists(os.path.join(cand, "tokenizer.json")):
            return cand
    sys.exit("pass the folder holding the Qwen3 tokenizer.json and tokenizer_config.json")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city. Use \"celsius\" unless asked otherwise; <b>never</b> guess & don't invent.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京 or Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web.\nReturns the top results as a list.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_n": {"type": "number", "minimum": 0.5, "maximum": 1e20, "multipleOf": 1e-07},
                "safe": {"type": "boolean", "default": True},
                "lang": {"type": ["string", "null"], "default": None},
            },
            "required": ["query"],
        },
    },
}


def call(name, arguments, id_=None):
    tc = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if id_ is not None:
        tc["id"] = id_
    return tc


CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "Hello!"}], None, {"add_generation_prompt": True}),
    (
        "system_thinking_off",
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
        None,
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        "system_thinking_on",
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
        None,
        {"add_generation_prompt": True, "enable_thinking": True},
    ),
    (
        "multi_turn_inline_think_stripped",
        [
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "<think>\nSmall primes: 2, 3, 5.\n</think>\n\n2 is prime."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "<think>\nPick 3.\n</think>\n\n3."},
            {"role": "user", "content": "Thanks. /no_think"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "multi_turn_reasoning_content_last",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "\nShort wavelengths scatter more.\n"},
        ],
        None,
        {"add_generation_prompt": False},
    ),
    (
        "multi_turn_thinking_off_history",
        [
            {"role": "user", "content": "Hi /no_think"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\nHello! How can I help?"},
            {"role": "user", "content": "Tell me a joke. /think"},
        ],
        None,
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        "tools_with_system",
        [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Paris?"}],
        [WEATHER_TOOL, SEARCH_TOOL],
        {"add_generation_prompt": True},
    ),
    (
        "tools_without_system",
        [{"role": "user", "content": "Search for rust minijinja"}],
        [SEARCH_TOOL],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        "tool_call_string_arguments",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("get_weather", '{"city": "Paris", "unit": "celsius"}', "call_1")],
            },
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        ],
        [WEATHER_TOOL],
        {"add_generation_prompt": False},
    ),
    (
        "tool_calls_dict_arguments_consecutive_tools",
        [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "Compare the weather in 東京 and Zürich, and search news."},
            {
                "role": "assistant",
                "content": "Let me check both cities.",
                "reasoning_content": "I need three calls.",
                "tool_calls": [
                    call("get_weather", {"city": "東京", "unit": "celsius", "days": 3}),
                    call("get_weather", {"unit": "fahrenheit", "city": "Zürich", "extra": {"b": 1, "a": [1.5, True, None, 1e-07, 1e20, "q\"uote"]}}),
                    call("web_search", {"query": "weather <news> & \"alerts\"\n", "top_n": 5}),
                ],
            },
            {"role": "tool", "content": "東京: 18°C", "name": "get_weather"},
            {"role": "tool", "content": "Zürich: 55°F"},
            {"role": "tool", "content": "[{\"title\": \"Storm warning\"}]"},
        ],
        [WEATHER_TOOL, SEARCH_TOOL],
        {"add_generation_prompt": True},
    ),
    (
        "tool_call_no_content_after_query",
        [
            {"role": "user", "content": "Search twice."},
            {"role": "assistant", "content": "", "tool_calls": [call("web_search", {"query": "a"}), call("web_search", '{"query": "b"}')]},
            {"role": "tool", "content": "A"},
            {"role": "tool", "content": "B"},
            {"role": "assistant", "content": "<think>\nBoth done.\n</think>\n\nDone: A and B."},
        ],
        [SEARCH_TOOL],
        {"add_generation_prompt": False},
    ),
    (
        "multi_step_tool_response_in_user",
        [
            {"role": "user", "content": "Find it."},
            {"role": "assistant", "content": "<think>\nUse search.\n</think>\n\n", "tool_calls": [call("web_search", {"query": "it"})]},
            {"role": "user", "content": "<tool_response>\nfound it\n</tool_response>"},
            {"role": "assistant", "content": "<think>\nGot it.\n</think>\n\nHere it is."},
        ],
        [SEARCH_TOOL],
        {"add_generation_prompt": True},
    ),
    (
        "non_ascii",
        [
            {"role": "system", "content": "Réponds en français. Отвечай кратко. 简明扼要。"},
            {"role": "user", "content": "你好！👩‍👩‍👧‍👦 مرحبا بالعالم 🇯🇵 ¿Qué tal? こんにちは 안녕하세요"},
            {"role": "assistant", "content": "<think>\n用户在打招呼。\n</think>\n\n你好！😊 أهلاً"},
            {"role": "user", "content": "继续 🙏🏽"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "no_generation_prompt_user_last",
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "only a user turn"}],
        None,
        {"add_generation_prompt": False},
    ),
    (
        "think_switches_in_user_text",
        [
            {"role": "user", "content": "/think Solve x+1=3."},
            {"role": "assistant", "content": "<think>\nx=2\n</think>\n\nx = 2"},
            {"role": "user", "content": "Now y+1=5 /no_think"},
        ],
        None,
        {"add_generation_prompt": True},
    ),
    (
        "system_in_middle_and_extra_kwargs",
        [
            {"role": "system", "content": "first"},
            {"role": "user", "content": "u1"},
            {"role": "system", "content": "second system"},
            {"role": "user", "content": "u2\n\n  spaced  \n"},
        ],
        None,
        {"add_generation_prompt": True, "enable_thinking": True, "custom_flag": {"x": 1}},
    ),
    (
        "assistant_reasoning_not_last_after_query",
        [
            {"role": "user", "content": "Plan a trip."},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.", "tool_calls": [call("get_weather", {"city": "Rome"})]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Rome is sunny.", "reasoning_content": ""},
            {"role": "tool", "content": "late result"},
        ],
        [WEATHER_TOOL],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
]

# Small templates for the Jinja features chat templates use: tojson options and Python string methods.
JINJA_CASES = [
    (
        "tojson_options",
        "{{ x | tojson }}\n{{ x | tojson(indent=2) }}\n{{ x | tojson(ensure_ascii=True) }}\n"
        "{{ x | tojson(sort_keys=True, separators=(',', ':')) }}\n{{ x | tojson(indent=0) }}\n{{ y | tojson }}",
        {
            "x": {
                "z": "Zürich \"q\" \\ <tag> & 'a'\n\t\u0001\u007f é 東京 😀",
                "a": [1, -2, 1.5, 0.1, 1e-07, 1e16, 123456789.125, 1e22, -0.0, True, False, None],
                "m": {},
                "l": [],
                "n": {"b": [{"c": []}], "a": 2},
            },
            "y": ["plain", 3],
        },
    ),
    (
        "string_methods",
        "{% set s = '  <a>Hello, World</a>\\n\\n' %}"
        "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip('\\n') }}|{{ s.strip(' \\n<>a/') }}|"
        "{{ s.split('World')[0] }}|{{ s.split('</a>')[-1] | length }}|{{ 'a,b,,c'.split(',') | join('+') }}|"
        "{{ 'x y  z'.split() | join('+') }}|{{ s.strip().startswith('<a>') }}|{{ s.endswith('x') }}|"
        "{{ 'abc'[::-1] }}|{{ [1, 2, 3][::-1] | join(',') }}|{{ [1, 2, 3][-1] }}|{{ 'Hello'.upper() }}{{ 'Hello'.lower() }}|"
        "{{ 'a-b-c'.replace('-', '+') }}|{{ 'hello world'.title() }}|{{ ('<think>' in s) }}",
        {},
    ),
    (
        "namespace_loop",
        "{%- set ns = namespace(found=false, idx=-1) %}"
        "{%- for m in messages[::-1] %}{%- set i = (messages | length - 1) - loop.index0 %}"
        "{%- if not ns.found and m.role == 'user' %}{%- set ns.found = true %}{%- set ns.idx = i %}{%- endif %}"
        "{%- endfor %}last user at {{ ns.idx }};"
        "{%- for m in messages %}{{ loop.index0 }}:{{ m.role }}{% if loop.first %}(first){% endif %}"
        "{% if loop.last %}(last){% endif %}{% if not loop.last %},{% endif %}{%- endfor %}"
        "{% if custom is defined %} custom={{ custom }}{% endif %}{% if missing is not defined %} no-missing{% endif %}"
        "{% if flag is false %} flag-false{% endif %}{% if none_value is none %} none{% endif %}",
        {"custom": "yes", "flag": False},
    ),
    (
        "trim_and_lstrip_blocks",
        "<s>\n  {% if true %}\n    kept\n  {% endif %}\n  {% for i in [1, 2] %}\n{{ i }}\n  {% endfor %}\nend\n",
        {},
    ),
]

JINJA_MESSAGES = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]

TEXTS = [
    ("latin", "The quick brown fox jumps over the lazy dog. Façade, naïve, Œuvre, straße, ÆØÅ."),
    ("cyrillic", "Съешь же ещё этих мягких французских булок, да выпей чаю."),
    ("greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε!"),
    ("arabic", "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣٤٥"),
    ("hebrew", "שלום עולם, מה שלומך? עִבְרִית"),
    ("devanagari", "नमस्ते दुनिया, आप कैसे हैं? क्षत्रिय"),
    ("bengali", "আমি বাংলায় গান গাই। ১২৩"),
    ("thai", "สวัสดีครับ ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ"),
    ("chinese", "你好，世界！我们今天讨论大型语言模型的推理。繁體中文：臺灣"),
    ("japanese", "こんにちは世界。カタカナとひらがなと漢字を混ぜる。ｶﾀｶﾅ"),
    ("korean", "안녕하세요 세계! 한국어 토크나이저 테스트입니다."),
    ("georgian", "გამარჯობა მსოფლიო, როგორ ხარ?"),
    ("armenian", "Բարեւ աշխարհ, ինչպես ես?"),
    ("tamil", "வணக்கம் உலகம், நீங்கள் எப்படி இருக்கிறீர்கள்?"),
    ("ethiopic", "ሰላም ለዓለም፣ እንዴት ነህ?"),
    ("sinhala_khmer_tibetan", "ආයුබෝවන් ලෝකය សួស្តី​ពិភពលោក བཀྲ་ཤིས་བདེ་ལེགས།"),
    ("math_symbols", "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x|; ∑ᵢ aᵢ ≈ ∫ f(t) dt ± ε"),
    (
        "code_python",
        'def fib(n: int) -> int:\n    """Return n-th Fibonacci."""\n    if n < 2:\n        return n\n'
        "    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])  # 0 1 1 2 3\n",
    ),
    (
        "code_rust",
        "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{:?}\", v);\n}\r\n",
    ),
    ("whitespace_runs", "a  b   c    d\t\te\n\n\nf \n \n g       \r\n\r\n   h\u3000i\u00a0j   "),
    ("numbers", "3.14159 1,234,567 0xFF 1e-10 2024-06-01 12:30:45 +1-555-0100 ١٢٣ 一二三"),
    ("emoji", "😀😃😄 👍🏽 🇺🇸🇯🇵 ❤️ 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏿‍🤝‍🧑🏻 ✔︎ ©®™"),
    ("mixed_scripts", "Hello 世界 Привет مرحبا שלום नमस्ते 🌍 — «quotes» „Anführung“ ‘single’"),
    ("special_tokens_in_text", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>"),
    (
        "tool_tokens_in_text",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><tool_response>\nr\n</tool_response><|fim_prefix|>x<|fim_suffix|>',
    ),
    ("contractions_case", "I'm sure you've SEEN it; they'LL say it's fine, we'd DONE that."),
    ("control_and_rare", "tab\there\u200bzero-width\u200d\ufeffbom\u2028line\u0085nel\u00ad soft"),
    ("empty", ""),
    ("single_space", " "),
]


def main():
    model_dir = find_model_dir()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(model_dir, "tokenizer.json"), "rb") as f, gzip.GzipFile(
        os.path.join(OUT, "tokenizer.json.gz"), "wb", mtime=0
    ) as g:
        g.write(f.read())
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(model_dir, name), os.path.join(OUT, name))

    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))

    templates = []
    for name, messages, tools, kwargs in CONVERSATIONS:
        rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
        ids = raw.encode(rendered, add_special_tokens=False).ids
        case = {"name": name, "messages": messages, "tools": tools, "kwargs": kwargs, "rendered": rendered, "ids": ids}
        templates.append(case)

    jinja = []
    for name, template, kwargs in JINJA_CASES:
        rendered = tok.apply_chat_template(JINJA_MESSAGES, chat_template=template, tokenize=False, **kwargs)
        jinja.append({"name": name, "template": template, "messages": JINJA_MESSAGES, "kwargs": kwargs, "rendered": rendered})

    tokenize = []
    for name, text in TEXTS:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode(text, add_special_tokens=False), name
        tokenize.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "decoded": raw.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )

    meta = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    for fname, data in (("templates.json", templates), ("jinja.json", jinja), ("tokenize.json", tokenize)):
        with open(os.path.join(OUT, fname), "w", encoding="utf-8") as f:
            json.dump({"generated_by": meta, "cases": data}, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print(f"wrote {len(templates)} template, {len(jinja)} jinja and {len(tokenize)} tokenizer cases to {OUT}")


if __name__ == "__main__":
    main()
