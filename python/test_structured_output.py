#!/usr/bin/env python3
"""Structured output from a running `qwick serve`, checked with a JSON-schema validator.

With the official `openai` client: a schema with nested objects, arrays, enums and required
fields, with thinking off and with thinking on (the model thinks, then answers in the schema);
50 random schemas (seeded); a regex and a choice list; Ollama's `format`. Every answer must
parse and validate (`jsonschema`); greedy constrained answers are the same alone and in a batch.

Usage: python3 python/test_structured_output.py --base-url http://127.0.0.1:PORT --model NAME
Run by crates/qwick-cli/tests/serve.rs when the packages are installed
(pip install -r python/requirements-test.txt).
"""

import argparse
import json
import random
import re
import sys
import urllib.request

import jsonschema
from openai import OpenAI

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {
            "type": "object",
            "properties": {
                "first": {"type": "string", "maxLength": 8},
                "verified": {"type": "boolean"},
            },
            "required": ["first", "verified"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}


def random_schema(rng, depth=0):
    """A small random schema whose instances are bounded (so a random model finishes them)."""
    kinds = ["integer", "number", "boolean", "enum", "string"] + (["object", "array"] if depth < 2 else [])
    k = rng.choice(kinds)
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if k == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if k == "boolean":
        return {"type": "boolean"}
    if k == "enum":
        return {"enum": rng.sample(["a", "b", "c", "d", 1, 2, True, None], rng.randint(1, 4))}
    if k == "string":
        return {"type": "string", "maxLength": rng.randint(0, 8)}
    if k == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    required = [p for p in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def ask(client, model, schema, thinking, max_thinking=None):
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}}
    if max_thinking is not None:
        extra["max_thinking_tokens"] = max_thinking
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        max_tokens=400,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        extra_body=extra,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", (choice.finish_reason, choice.message.content)
    value = json.loads(choice.message.content)
    jsonschema.validate(value, schema)
    return choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url + "/v1", api_key="none", timeout=120)
    failed = 0

    def run(name, fn):
        nonlocal failed
        try:
            fn()
            print(f"ok   {name}")
        except Exception as e:  # report every failing check
            failed += 1
            print(f"FAIL {name}: {e!r}")

    run("nested schema, thinking off", lambda: ask(client, a.model, NESTED, False))

    def thinking_then_json():
        c = ask(client, a.model, NESTED, True, max_thinking=16)
        reasoning = getattr(c.message, "reasoning_content", None) or (c.message.model_extra or {}).get("reasoning_content")
        assert reasoning, "the model thinks first"

    run("nested schema after thinking", thinking_then_json)
    rng = random.Random(7)
    for i in range(50):
        schema = random_schema(rng)
        if schema.get("type") != "object":
            schema = {"type": "object", "properties": {"v": schema}, "required": ["v"], "additionalProperties": False}
        run(f"random schema {i}", lambda s=schema: ask(client, a.model, s, False))

    def regex():
        r = client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": "a date"}], max_tokens=30, temperature=0,
            extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}", "chat_template_kwargs": {"enable_thinking": False}},
        )
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.choices[0].message.content), r.choices[0].message.content

    run("regex", regex)

    def choice():
        r = client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": "yes or no"}], max_tokens=10, temperature=0,
            extra_body={"guided_choice": ["yes", "no"], "chat_template_kwargs": {"enable_thinking": False}},
        )
        assert r.choices[0].message.content in ("yes", "no"), r.choices[0].message.content

    run("choice", choice)

    def ollama_format():
        body = {"model": a.model, "messages": [{"role": "user", "content": "pet"}], "stream": False, "think": False,
                "format": NESTED, "options": {"temperature": 0, "num_predict": 400}}
        req = urllib.request.Request(a.base_url + "/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.load(resp)
        jsonschema.validate(json.loads(out["message"]["content"]), NESTED)

    run("ollama format", ollama_format)

    def batch_independent():
        # Greedy under a constraint: the same answer alone and inside a batch of other requests.
        from concurrent.futures import ThreadPoolExecutor
        alone = ask(client, a.model, NESTED, False).message.content
        other = lambda i: client.completions.create(model=a.model, prompt=f"Count to {i}:", max_tokens=40,
                                                    temperature=0.8, seed=i)
        with ThreadPoolExecutor(12) as pool:
            mixed = [pool.submit(ask, client, a.model, NESTED, False) for _ in range(6)]
            mixed += [pool.submit(other, i) for i in range(6)]
            answers = [f.result() for f in mixed][:6]
        for c in answers:
            assert c.message.content == alone, (c.message.content, alone)

    run("greedy constrained output is batch-independent", batch_independent)
    total = 55 + 1
    print(f"{total - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
