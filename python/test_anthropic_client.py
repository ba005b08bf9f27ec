#!/usr/bin/env python3
"""Drives a running `qwick serve` with the official `anthropic` package: Messages (plain,
streamed, with thinking, with tools and tool results, stop sequences), token counting, the
x-api-key header, and errors in Anthropic's shape.

Usage: python3 python/test_anthropic_client.py --base-url http://127.0.0.1:PORT --model NAME
       --api-key KEY
Reports every check; exits non-zero if one failed. Run by crates/qwick-cli/tests/serve.rs when
the package is installed (pip install -r python/requirements-test.txt).
"""


import json
import urllib.error
import urllib.request

import anthropic
import client_checks

check = client_checks.check


# The current client no longer names the sampling fields; the API still takes them.
GREEDY = {"temperature": 0}
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                     "additionalProperties": False},
}


def text_of(msg):
    return "".join(b.text for b in msg.content if b.type == "text")


@check
def plain(c, model):
    m = c.messages.create(model=model, max_tokens=12, messages=HELLO, system="Be brief.", extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
    assert [b.type for b in m.content] == ["text"], m.content
    assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
    assert 1 <= m.usage.output_tokens <= 12 and m.usage.input_tokens > 0, m.usage


@check
def streamed_equals_whole(c, model):
    kw = dict(model=model, max_tokens=16, messages=HELLO, extra_body=GREEDY)
    whole = c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == text_of(whole) == text_of(final), (pieces, whole, final)
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    # The raw events, in Anthropic's order.
    kinds = [e.type for e in c.messages.create(stream=True, **kw)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1, kinds


@check
def thinking_blocks(c, model):
    kw = dict(model=model, max_tokens=40, messages=HELLO, extra_body=GREEDY,
              thinking={"type": "enabled", "budget_tokens": 5})
    m = c.messages.create(**kw)
    kinds = [b.type for b in m.content]
    assert kinds[0] == "thinking" and m.content[0].thinking, m.content
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == kinds, final.content
    assert final.content[0].thinking == m.content[0].thinking
    # Without thinking: no thinking block.
    m = c.messages.create(model=model, max_tokens=8, messages=HELLO, extra_body=GREEDY, thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in m.content), m.content


@check
def tools_and_results(c, model):
    for choice in [{"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}]:
        m = c.messages.create(model=model, max_tokens=60, messages=[{"role": "user", "content": "Weather in Paris?"}],
                              tools=[WEATHER], tool_choice=choice, extra_body=GREEDY)
        assert m.stop_reason == "tool_use", m
        calls = [b for b in m.content if b.type == "tool_use"]
        assert calls and calls[0].name == "get_weather" and isinstance(calls[0].input.get("city"), str), m.content
        assert calls[0].id.startswith("toolu_")
    # Streamed, the call's input arrives as JSON deltas the client assembles.
    with c.messages.stream(model=model, max_tokens=60, messages=[{"role": "user", "content": "Weather?"}],
                           tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as s:
        final = s.get_final_message()
    call = [b for b in final.content if b.type == "tool_use"][0]
    assert isinstance(call.input.get("city"), str), final.content
    # The call and its result go back in the conversation.
    convo = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "get_weather",
                                           "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"},
                                     {"type": "text", "text": "Thanks. Summarise."}]},
    ]
    m = c.messages.create(model=model, max_tokens=8, messages=convo, tools=[WEATHER], extra_body=GREEDY)
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use"), m
    with_result = c.messages.count_tokens(model=model, messages=convo, tools=[WEATHER]).input_tokens
    without = c.messages.count_tokens(model=model, messages=convo[:1], tools=[WEATHER]).input_tokens
    assert with_result > without, (with_result, without)


@check
def stop_sequences(c, model):
    kw = dict(model=model, max_tokens=24, messages=HELLO, extra_body=GREEDY)
    text = text_of(c.messages.create(**kw))
    assert len(text) > 12, text
    stop = text[6:10]
    m = c.messages.create(stop_sequences=[stop], **kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop, m
    assert text_of(m) == text[:text.index(stop)], (text_of(m), text, stop)


@check
def output_format_and_effort(c, model):
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    m = c.messages.create(model=model, max_tokens=40, messages=HELLO, extra_body=GREEDY,
                          output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(text_of(m)) in ({"n": 1}, {"n": 2}), m.content
    # An effort level turns thinking on (low: within 1,024 tokens); adaptive thinking too.
    for kw in [dict(output_config={"effort": "low"}), dict(thinking={"type": "adaptive"})]:
        m = c.messages.create(model=model, max_tokens=8, messages=HELLO, extra_body=GREEDY, **kw)
        assert m.content[0].type == "thinking", (kw, m.content)


@check
def count_tokens(c, model):
    n = c.messages.count_tokens(model=model, messages=HELLO, system="Be brief.").input_tokens
    m = c.messages.create(model=model, max_tokens=2, messages=HELLO, system="Be brief.")
    assert n == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0), (n, m.usage)


@check
def errors(c, model):
    def status_error(fn, cls, status, kind):
        try:
            fn()
        except cls as e:
            assert e.status_code == status, e
            assert e.body["type"] == "error" and e.body["error"]["type"] == kind, e.body
            return e.body["error"]["message"]
        raise AssertionError(f"no {cls.__name__}")

    msg = status_error(lambda: c.messages.create(model=model, max_tokens=4, messages=[{"role": "robot", "content": "x"}]),
                       anthropic.BadRequestError, 400, "invalid_request_error")
    assert "role" in msg, msg
    status_error(lambda: c.messages.create(model="no-such-model", max_tokens=4, messages=HELLO),
                 anthropic.NotFoundError, 404, "not_found_error")
    status_error(lambda: c.messages.create(model=model, max_tokens=4, messages=HELLO, extra_body={"frobnicate": 1}),
                 anthropic.BadRequestError, 400, "invalid_request_error")
    status_error(lambda: c.messages.create(model=model, max_tokens=4, messages=HELLO,
                                           thinking={"type": "enabled", "budget_tokens": 0}),
                 anthropic.BadRequestError, 400, "invalid_request_error")
    wrong = anthropic.Anthropic(base_url=str(c.base_url), api_key="wrong", max_retries=0)
    status_error(lambda: wrong.messages.create(model=model, max_tokens=4, messages=HELLO),
                 anthropic.AuthenticationError, 401, "authentication_error")
    # Without a max_tokens (the client insists on one; a raw request shows the server does too).
    req = urllib.request.Request(f"{str(c.base_url).rstrip('/')}/v1/messages",
                                 data=json.dumps({"model": model, "messages": HELLO}).encode(),
                                 headers={"x-api-key": c.api_key, "content-type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("a request without max_tokens was answered")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert e.code == 400 and body["error"]["type"] == "invalid_request_error", body
        assert "max_tokens" in body["error"]["message"], body


if __name__ == "__main__":
    client_checks.main(lambda url, key: anthropic.Anthropic(base_url=url, api_key=key, timeout=60, max_retries=0),
                       api_key_required=True)
