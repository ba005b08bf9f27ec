#!/usr/bin/env python3
"""Load and abuse test for a running `qwick serve` (standard library only).

Sends REQUESTS requests at CONCURRENCY in a seeded random mix: valid ones (chat and completions,
streamed and not, n > 1, tools with tool_choice auto / required / named, structured output,
thinking budgets and levels, logprobs, the Ollama API) and bad ones (malformed JSON, wrong types,
bodies over the server's limit, prompts over the context, out-of-range parameters, unknown models
and fields, clients that disconnect mid-stream or mid-body, slow readers). Then FUZZ randomized
request bodies: valid requests with fields deleted, retyped or replaced by random JSON, on every
route, chat-template inputs (messages, tool calls, tools) included.

Checks: the server never crashes; every bad request is a 4xx with an OpenAI-style error message
(Ollama routes: {"error": ...}); every valid request completes (a finish reason; streams end
with [DONE] or done: true); no fuzzed request gets a 5xx; afterwards the server goes idle with
no KV blocks in use and consistent KV bookkeeping (qwick_kv_cache_consistent), and its resident
memory after the run is at most 5% above what it was after a warm-up.

Usage: python3 python/load_test.py --url http://127.0.0.1:PORT --pid PID
       [--requests 1000] [--concurrency 32] [--fuzz 3000] [--seed 1] [--context 512]
Run at a reduced size by crates/qwick-cli/tests/serve.rs; the full size is in the README.
"""

import argparse
import http.client
import json
import random
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

WORDS = "the sky is blue because of light scattering 天空 небо bleu 🌤 café naïve".split()


class Client:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port

    def conn(self, timeout=120):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(self, path, body, timeout=120):
        """Sends raw bytes (or a JSON-able value); returns (status, parsed JSON or raw text)."""
        data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
        c = self.conn(timeout)
        try:
            c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw)
            except ValueError:
                return r.status, raw.decode("utf-8", "replace")
        finally:
            c.close()

    def get(self, path):
        c = self.conn(30)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            c.close()

    def stream(self, path, body, slow=0.0):
        """A streamed request read to the end (slowly when `slow` > 0, in small pieces); returns
        (status, list of events): SSE `data:` payloads, or Ollama's JSON lines."""
        c = self.conn()
        try:
            c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                raw = r.read()
                try:
                    return r.status, [json.loads(raw)]
                except ValueError:
                    return r.status, [raw.decode("utf-8", "replace")]
            buf = b""
            while True:
                piece = r.read(64) if slow else r.read1(65536)
                if not piece:
                    break
                buf += piece
                if slow:
                    time.sleep(slow)
            events = []
            for line in buf.decode("utf-8").splitlines():
                line = line.strip()
                if line.startswith("data: "):
                    events.append(line[6:])
                elif line.startswith("{"):
                    events.append(line)
            return r.status, events
        finally:
            c.close()

    def metric(self, name):
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def messages(rng):
    m = []
    if rng.random() < 0.3:
        m.append({"role": "system", "content": text(rng, 5)})
    for _ in range(rng.randint(0, 2)):
        m.append({"role": "user", "content": text(rng, rng.randint(1, 12))})
        m.append({"role": "assistant", "content": text(rng, rng.randint(1, 12))})
    m.append({"role": "user", "content": text(rng, rng.randint(1, 20))})
    return m


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                                     "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "the time",
                                      "parameters": {"type": "object",
                                                     "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                             "maximum": 12}},
                                                     "required": ["zone"], "additionalProperties": False}}},
]

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


# ---- valid requests: each returns None when fine, else what went wrong ----

def finished_chat(status, r):
    if status != 200:
        return f"status {status}: {r}"
    if not isinstance(r, dict) or not r.get("choices"):
        return f"no choices: {r}"
    for c in r["choices"]:
        if c.get("finish_reason") not in ("stop", "length", "tool_calls"):
            return f"finish_reason {c.get('finish_reason')}"
    return None


def finished_stream(status, events):
    if status != 200:
        return f"status {status}: {events}"
    if not events or events[-1] != "[DONE]":
        return f"no [DONE] ({len(events)} events)"
    finishes = [c.get("finish_reason") for e in events[:-1] for c in json.loads(e).get("choices", [])
                if c.get("finish_reason")]
    errors = [e for e in events[:-1] if "error" in json.loads(e)]
    if errors:
        return f"error event {errors[0]}"
    return None if finishes else "no finish_reason"


def v_chat(cl, rng):
    body = {"messages": messages(rng), "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.7, 1.2]),
            "chat_template_kwargs": {"enable_thinking": rng.random() < 0.5}, "seed": rng.randint(0, 99)}
    return finished_chat(*cl.post("/v1/chat/completions", body))


def v_chat_stream(cl, rng):
    body = {"messages": messages(rng), "max_tokens": rng.randint(1, 24), "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8}
    return finished_stream(*cl.stream("/v1/chat/completions", body))


def v_completion(cl, rng):
    body = {"prompt": text(rng, rng.randint(1, 40)), "max_tokens": rng.randint(1, 16), "n": rng.randint(1, 3),
            "temperature": 0.9, "logprobs": rng.choice([None, 2])}
    status, r = cl.post("/v1/completions", body)
    err = finished_chat(status, r)
    if err is None and len(r["choices"]) != body["n"]:
        return f"{len(r['choices'])} choices for n={body['n']}"
    return err


def v_completion_stream(cl, rng):
    body = {"prompt": text(rng, rng.randint(1, 40)), "max_tokens": rng.randint(1, 16), "stream": True,
            "n": rng.randint(1, 2)}
    return finished_stream(*cl.stream("/v1/completions", body))


def v_tools(cl, rng):
    choice = rng.choice(["auto", "required", {"type": "function", "function": {"name": "get_time"}}])
    body = {"messages": messages(rng), "tools": TOOLS, "tool_choice": choice, "max_tokens": 60,
            "temperature": 0, "parallel_tool_calls": rng.random() < 0.5}
    status, r = cl.post("/v1/chat/completions", body)
    err = finished_chat(status, r)
    if err is None and choice != "auto" and r["choices"][0]["finish_reason"] == "tool_calls":
        for t in r["choices"][0]["message"]["tool_calls"]:
            json.loads(t["function"]["arguments"])
    return err


def v_structured(cl, rng):
    fmt = rng.choice([{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}])
    body = {"messages": messages(rng), "response_format": fmt, "max_tokens": 80, "temperature": 0.5,
            "chat_template_kwargs": {"enable_thinking": False}}
    status, r = cl.post("/v1/chat/completions", body)
    err = finished_chat(status, r)
    if err is None and fmt["type"] == "json_schema" and r["choices"][0]["finish_reason"] == "stop":
        v = json.loads(r["choices"][0]["message"]["content"])
        if set(v) != {"ok", "n"}:
            return f"not the schema: {v}"
    return err


def v_thinking(cl, rng):
    body = {"messages": messages(rng), "max_tokens": rng.randint(4, 30)}
    if rng.random() < 0.5:
        body["max_thinking_tokens"] = rng.randint(0, 8)
    else:
        body["reasoning_effort"] = rng.choice(["none", "low", "medium", "high"])
    return finished_chat(*cl.post("/v1/chat/completions", body))


def v_ollama(cl, rng):
    body = {"model": MODEL[0], "messages": messages(rng), "stream": rng.random() < 0.5, "think": rng.choice([True, False, "low"]),
            "options": {"num_predict": rng.randint(1, 16), "temperature": 0.7}}
    if body["stream"]:
        status, events = cl.stream("/api/chat", body)
        if status != 200 or not events or not json.loads(events[-1]).get("done"):
            return f"status {status}, last {events[-1:] }"
        return None
    status, r = cl.post("/api/chat", body)
    if status != 200 or not r.get("done"):
        return f"status {status}: {r}"
    return None


def v_anthropic(cl, rng):
    """Anthropic's Messages API, whole or streamed, with thinking on or off."""
    msgs = [m for m in messages(rng) if m["role"] in ("user", "assistant")] or [{"role": "user", "content": "hi"}]
    body = {"model": MODEL[0], "messages": msgs, "max_tokens": rng.randint(1, 24), "temperature": 0.7,
            "system": "Be brief.", "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        body["thinking"] = {"type": "enabled", "budget_tokens": rng.randint(1, 8)}
    if body["stream"]:
        status, events = cl.stream("/v1/messages", body)
        kinds = [json.loads(e).get("type") for e in events]
        if status != 200 or kinds[:1] != ["message_start"] or kinds[-1:] != ["message_stop"]:
            return f"status {status}, events {kinds[:3]}…{kinds[-2:]}"
        return None
    status, r = cl.post("/v1/messages", body)
    if status != 200 or r.get("stop_reason") not in ("end_turn", "max_tokens", "stop_sequence", "tool_use"):
        return f"status {status}: {str(r)[:200]}"
    return None


def v_responses(cl, rng):
    """The Responses API, whole or streamed, sometimes continuing a stored response."""
    body = {"model": MODEL[0], "input": text(rng, rng.randint(1, 12)), "max_output_tokens": rng.randint(1, 24),
            "temperature": 0.7, "instructions": "Be brief.", "stream": rng.random() < 0.5,
            "reasoning": {"effort": rng.choice(["none", "low"])}}
    if body["stream"]:
        status, events = cl.stream("/v1/responses", body)
        kinds = [json.loads(e).get("type") for e in events]
        if status != 200 or kinds[:1] != ["response.created"] or kinds[-1:] not in (["response.completed"],
                                                                                   ["response.incomplete"]):
            return f"status {status}, events {kinds[:3]}…{kinds[-2:]}"
        return None
    status, r = cl.post("/v1/responses", body)
    if status != 200 or r.get("status") not in ("completed", "incomplete"):
        return f"status {status}: {str(r)[:200]}"
    status, r2 = cl.post("/v1/responses", {**body, "previous_response_id": r["id"], "input": "And?"})
    return None if status == 200 else f"continuing: status {status}: {str(r2)[:200]}"


def v_unversioned(cl, rng):
    """llama-server's habits: routes without /v1, /tokenize with content."""
    body = {"messages": messages(rng), "max_tokens": rng.randint(1, 8), "temperature": 0}
    err = finished_chat(*cl.post("/chat/completions", body))
    if err:
        return err
    status, r = cl.post("/tokenize", {"content": text(rng, 5), "with_pieces": rng.random() < 0.5})
    return None if status == 200 and isinstance(r.get("tokens"), list) else f"tokenize {status}: {r}"


def v_slow_reader(cl, rng):
    body = {"messages": messages(rng), "max_tokens": 20, "stream": True}
    return finished_stream(*cl.stream("/v1/chat/completions", body, slow=0.01))


def v_disconnect(cl, rng):
    """Starts a long stream, reads its first event, and hangs up (not checked: its blocks must
    come back, which the idle check at the end sees)."""
    body = {"messages": messages(rng), "max_tokens": 400, "stream": True, "temperature": 1.0}
    c = cl.conn()
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 200:
            r.read1(64)
    finally:
        c.sock and c.sock.close()
        c.close()
    return None


def v_half_body(cl, rng):
    """Announces a body and hangs up halfway through it."""
    s = socket.create_connection((cl.host, cl.port), timeout=30)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": [")
    finally:
        s.close()
    return None


MODEL = [""]  # the served model's name (Ollama requests need it), set by main
VALID = [v_chat, v_chat, v_chat_stream, v_completion, v_completion_stream, v_tools, v_structured, v_thinking,
         v_ollama, v_slow_reader, v_anthropic, v_unversioned, v_responses]
HANGUPS = [v_disconnect, v_half_body]


# ---- bad requests: each must be a 4xx with a message ----

def openai_error(status, r):
    if not 400 <= status < 500:
        return f"status {status}: {str(r)[:200]}"
    msg = r.get("error", {}).get("message") if isinstance(r, dict) and isinstance(r.get("error"), dict) else None
    if not msg and not (isinstance(r, dict) and isinstance(r.get("error"), str) and r["error"]):
        return f"no error message: {str(r)[:200]}"
    return None


def bad_bodies(rng, context):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    pick = rng.randrange(20)
    if pick == 0:
        return "/v1/chat/completions", json.dumps(chat).encode()[: rng.randint(1, 20)]
    if pick == 1:
        return "/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if pick == 2:
        return "/v1/chat/completions", {**chat, "messages": "hi"}
    if pick == 3:
        return "/v1/chat/completions", {**chat, "max_tokens": "four"}
    if pick == 4:
        return "/v1/completions", {"prompt": "x", "temperature": []}
    if pick == 5:
        return "/v1/chat/completions", {**chat, "pad": "x" * (9 << 20)}  # over the 8 MiB body limit
    if pick == 6:
        return "/v1/completions", {"prompt": "hello " * (context * 2), "max_tokens": 4}
    if pick == 7:
        return "/v1/chat/completions", {**chat, "temperature": -1}
    if pick == 8:
        return "/v1/chat/completions", {**chat, "top_p": 1.5}
    if pick == 9:
        return "/v1/completions", {"prompt": "x", "n": 0}
    if pick == 10:
        return "/v1/chat/completions", {**chat, "max_tokens": context * 4}
    if pick == 11:
        return "/v1/chat/completions", {**chat, "model": "no-such-model"}
    if pick == 12:
        return "/v1/chat/completions", {**chat, "frobnicate": True}
    if pick == 13:
        return "/api/chat", {"model": MODEL[0], "messages": [{"role": "user", "content": "hi"}],
                             "options": {"num_predict": "x"}}
    anthropic = {"model": MODEL[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return rng.choice([
        ("/v1/messages", {**anthropic, "max_tokens": None}),
        ("/v1/messages", {**anthropic, "messages": [{"role": "system", "content": "x"}]}),
        ("/v1/messages", {**anthropic, "thinking": {"type": "enabled"}}),
        ("/v1/messages", {**anthropic, "tools": [{"type": "web_search_20250305", "name": "w"}]}),
        ("/v1/messages/count_tokens", {"messages": []}),
        ("/chat/completions", {**chat, "continue_final_message": True}),
        ("/tokenize", {"content": 5}),
        ("/v1/responses", {"input": [{"type": "item_reference", "id": "x"}], "max_output_tokens": 4}),
        ("/v1/responses", {"input": "hi", "previous_response_id": "resp_missing"}),
        ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema"}}}),
    ])


# ---- fuzzing ----

def random_json(rng, depth=0):
    k = rng.randrange(9 if depth < 3 else 6)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), 10**30, rng.randint(-5, 100)])
    if k == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.14])
    if k == 4:
        return rng.choice(["", "user", "assistant", "tool", "system", "function", "<|im_end|>", "<think>",
                           "</tool_call>", "\ud83d", "{{ raise_exception('x') }}", "\u0000", "x" * 300])
    if k == 5:
        return text(rng, rng.randint(0, 6))
    if k in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["role", "content", "name", "type", "function", "arguments", "tool_calls", "text",
                        "parameters", "properties", "x"]): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate(rng, v, depth=0):
    """v with random edits: fields dropped, added, or replaced by random JSON, recursively."""
    if isinstance(v, dict):
        v = dict(v)
        for key in list(v):
            r = rng.random()
            if r < 0.08:
                del v[key]
            elif r < 0.16:
                v[key] = random_json(rng)
            elif r < 0.5:
                v[key] = mutate(rng, v[key], depth + 1)
        if rng.random() < 0.1:
            v[rng.choice(["tools", "tool_calls", "content", "name", "stop", "logit_bias", "format"])] = random_json(rng)
        return v
    if isinstance(v, list):
        v = [mutate(rng, x, depth + 1) if rng.random() < 0.5 else x for x in v if rng.random() > 0.08]
        if rng.random() < 0.1:
            v.append(random_json(rng))
        return v
    return random_json(rng) if rng.random() < 0.15 else v


def fuzz_body(rng):
    msgs = messages(rng)
    if rng.random() < 0.4:
        msgs.insert(len(msgs) - 1, {"role": "assistant", "content": "",
                                    "tool_calls": [{"type": "function", "id": "c1",
                                                    "function": {"name": "get_time", "arguments": "{\"zone\": 1}"}}]})
        msgs.insert(len(msgs) - 1, {"role": "tool", "tool_call_id": "c1", "content": "12:00"})
    route, body = rng.choice([
        ("/v1/chat/completions", {"messages": msgs, "tools": TOOLS, "max_tokens": 4,
                                  "chat_template_kwargs": {"enable_thinking": True}, "response_format": {"type": "text"},
                                  "stop": ["x"], "logit_bias": {"5": 1}, "seed": 3, "temperature": 0.5}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "echo": False, "logprobs": 1, "stop": "x"}),
        ("/tokenize", {"messages": msgs, "tools": TOOLS, "add_generation_prompt": True}),
        ("/tokenize", {"prompt": "hello"}),
        ("/detokenize", {"tokens": [1, 2, 3]}),
        ("/tokenize", {"content": "hello", "with_pieces": True, "add_special": False}),
        ("/chat/completions", {"messages": msgs, "max_tokens": 4, "grammar": "root ::= \"a\" [b-c]*",
                               "continue_final_message": False, "add_generation_prompt": True}),
        ("/v1/messages", {"model": MODEL[0], "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "max_tokens": 4, "system": [{"type": "text", "text": "Be brief."}],
                          "thinking": {"type": "enabled", "budget_tokens": 2}, "stop_sequences": ["x"],
                          "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
                          "tool_choice": {"type": "auto"}}),
        ("/v1/messages/count_tokens", {"model": MODEL[0], "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/embeddings", {"input": ["hello", "world"], "dimensions": 8, "encoding_format": "float"}),
        ("/api/embed", {"model": MODEL[0], "input": "hello", "truncate": True}),
        ("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1}),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                                     {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
                                     {"type": "function_call_output", "call_id": "c1", "output": "12:00"}],
                           "tools": [{"type": "function", "name": "get_time", "parameters": {"type": "object"}}],
                           "instructions": "x", "reasoning": {"effort": "low"}, "max_output_tokens": 4,
                           "text": {"format": {"type": "text"}}, "store": False}),
        ("/api/chat", {"model": MODEL[0], "messages": msgs, "tools": TOOLS, "stream": False, "options": {"num_predict": 4}}),
        ("/api/generate", {"model": MODEL[0], "prompt": "hi", "stream": False, "options": {"num_predict": 4}}),
    ])
    body = mutate(rng, body)
    # Keep generation short: a fuzzed request may still generate, but not for long.
    if isinstance(body, dict):
        generates = route.startswith("/v1/") or route == "/chat/completions"
        if generates and not isinstance(body.get("max_tokens"), (int, type(None))):
            pass
        elif generates:
            body["max_tokens"] = 4
        elif route.startswith("/api/"):
            opts = body.get("options")
            if isinstance(opts, dict):
                opts["num_predict"] = 4
            elif opts is None:
                body["options"] = {"num_predict": 4}
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        body["stream"] = False
    return route, body


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_idle(cl, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        busy = sum(cl.metric(m) for m in ("qwick_kv_blocks_used", "qwick_num_requests_running",
                                          "qwick_num_requests_waiting"))
        if busy == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not go idle")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--fuzz", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--context", type=int, default=512, help="the server's context length")
    a = ap.parse_args()
    cl = Client(a.url)
    MODEL[0] = json.loads(cl.get("/v1/models")[1])["data"][0]["id"]
    rng = random.Random(a.seed)
    failures = []
    lock = threading.Lock()

    def fail(what):
        with lock:
            failures.append(what)

    plan = []
    for i in range(a.requests):
        r = rng.random()
        kind = "valid" if r < 0.6 else ("bad" if r < 0.9 else "hangup")
        plan.append((kind, random.Random(a.seed * 1_000_003 + i)))
    counts = Counter()
    latencies = []

    def one(kind, r):
        t0 = time.time()
        try:
            if kind == "valid":
                fn = r.choice(VALID)
                err = fn(cl, r)
                name = fn.__name__
            elif kind == "hangup":
                fn = r.choice(HANGUPS)
                err = fn(cl, r)
                name = fn.__name__
            else:
                route, body = bad_bodies(r, a.context)
                status, resp = cl.post(route, body)
                err = openai_error(status, resp)
                name = "bad"
        except Exception as e:  # a broken connection or a bad answer is a failure
            err, name = repr(e), kind
        with lock:
            counts[name] += 1
            latencies.append(time.time() - t0)
        if err:
            fail(f"{name}: {err}")

    # Warm-up: a mix like the run's (100 requests, and every kind of valid one at full
    # concurrency), so that allocator arenas and thread stacks exist before memory is measured.
    def kind_of(r):
        x = r.random()
        return "valid" if x < 0.6 else ("bad" if x < 0.9 else "hangup")

    warm = [(k, random.Random(i)) for i, k in enumerate(VALID * 4)]
    with ThreadPoolExecutor(a.concurrency) as pool:
        for f in [pool.submit(k, cl, r) for k, r in warm]:
            f.result()
        warm_plan = [(kind_of(random.Random(-i)), random.Random(-i - 1)) for i in range(1, 101)]
        for f in [pool.submit(one, k, r) for k, r in warm_plan]:
            f.result()
    wait_idle(cl)
    rss_before = rss_kib(a.pid)
    counts.clear()
    latencies.clear()
    t0 = time.time()
    with ThreadPoolExecutor(a.concurrency) as pool:
        for f in [pool.submit(one, k, r) for k, r in plan]:
            f.result()
    load_s = time.time() - t0

    # Randomized bodies: never a 5xx, never a crash.
    statuses = Counter()

    def fz(i):
        r = random.Random(a.seed * 7_919 + i)
        route, body = fuzz_body(r)
        try:
            status, resp = cl.post(route, body)
        except Exception as e:
            fail(f"fuzz {route}: {e!r} for {json.dumps(body)[:300]}")
            return
        with lock:
            statuses[status] += 1
        if status >= 500:
            fail(f"fuzz {route}: {status} {str(resp)[:200]} for {json.dumps(body)[:300]}")
        elif status >= 400 and openai_error(status, resp):
            fail(f"fuzz {route}: {openai_error(status, resp)}")

    t1 = time.time()
    with ThreadPoolExecutor(a.concurrency) as pool:
        for f in [pool.submit(fz, i) for i in range(a.fuzz)]:
            f.result()
    fuzz_s = time.time() - t1

    health = cl.get("/health")[0]
    if health != 200:
        fail(f"/health {health}")
    wait_idle(cl)
    if cl.metric("qwick_kv_cache_consistent") != 1:
        fail("KV bookkeeping inconsistent")
    rss_after = rss_kib(a.pid)
    if rss_after > rss_before * 1.05:
        fail(f"RSS grew from {rss_before} KiB to {rss_after} KiB")
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"load: {a.requests} requests at concurrency {a.concurrency} in {load_s:.1f} s "
          f"({a.requests / load_s:.1f} req/s; latency p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s)")
    print("  by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"fuzz: {a.fuzz} randomized requests in {fuzz_s:.1f} s; statuses: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    print(f"memory: RSS {rss_before / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB after "
          f"({(rss_after / rss_before - 1) * 100:+.1f}%)")
    for f in failures[:20]:
        print("FAIL " + f)
    print(f"{len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
