#!/usr/bin/env python3
"""Drives a running `qwick serve` with the official `openai` package: chat (plain, streamed,
with tools, with logprobs, n > 1), completions (plain, streamed, logprobs), models, and errors.

Usage: python3 python/test_openai_client.py --base-url http://127.0.0.1:PORT/v1 --model NAME
Exits non-zero on the first failure. Run by crates/qwick-cli/tests/serve.rs when the package is
installed (pip install -r python/requirements-test.txt).
"""

import argparse
import sys

import openai
from openai import OpenAI
from openai.types.chat import ChatCompletionTokenLogprob

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def extra(obj, key):
    """A field the OpenAI schema does not declare (reasoning_content)."""
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return value


@check
def models(c, model):
    ids = [m.id for m in c.models.list().data]
    assert model in ids, ids


@check
def chat_plain(c, model):
    r = c.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length"), ch.finish_reason
    assert isinstance(ch.message.content, str) and ch.message.role == "assistant"
    assert 1 <= r.usage.completion_tokens <= 8, r.usage
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@check
def chat_thinking_goes_to_reasoning_content(c, model):
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello! Who are you?"}], max_tokens=6, temperature=0
    )
    msg = r.choices[0].message
    reasoning = extra(msg, "reasoning_content")
    assert isinstance(reasoning, str) and reasoning, msg
    assert extra(msg, "reasoning") == reasoning


@check
def chat_stream_with_usage(c, model):
    plain = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=10, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    stream = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == plain.choices[0].message.content, (text, plain.choices[0].message.content)
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage


@check
def chat_with_tools(c, model):
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]
    r = c.chat.completions.create(model=model, messages=msgs, tools=tools, tool_choice="auto", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in r.choices[0].message.tool_calls or []:
        assert call.type == "function" and call.function.name


@check
def chat_logprobs(c, model):
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    # The test model thinks: its tokens are the reasoning's, listed beside the answer's.
    reasoning = extra(r.choices[0].logprobs, "reasoning_content") or []
    lp = r.choices[0].logprobs.content + [ChatCompletionTokenLogprob.model_validate(t) for t in reasoning]
    assert reasoning and len(lp) == r.usage.completion_tokens, (len(lp), r.usage)
    for t in lp:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5


@check
def chat_n_greedy_choices_agree(c, model):
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, n=2
    )
    assert len(r.choices) == 2
    a, b = [(extra(ch.message, "reasoning_content") or "") + (ch.message.content or "") for ch in r.choices]
    assert a == b, (a, b)


@check
def completions(c, model):
    r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2)
    ch = r.choices[0]
    assert isinstance(ch.text, str) and ch.finish_reason in ("stop", "length")
    assert len(ch.logprobs.tokens) == r.usage.completion_tokens
    assert "".join(ch.logprobs.tokens) == ch.text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in c.completions.create(
            model=model, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == ch.text, (streamed, ch.text)


@check
def errors(c, model):
    try:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=-1)
        raise AssertionError("negative temperature accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e)
    try:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=100000)
        raise AssertionError("too many tokens accepted")
    except openai.BadRequestError as e:
        assert "maximum context length" in str(e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    c = OpenAI(base_url=a.base_url, api_key=a.api_key, timeout=60, max_retries=0)
    failed = 0
    for fn in CHECKS:
        try:
            fn(c, a.model)
            print(f"ok   {fn.__name__}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
