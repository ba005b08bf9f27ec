#!/usr/bin/env python3
"""Drives a running `qwick serve` with the official `openai` package: chat (plain, streamed,
with tools, with logprobs, n > 1), completions (plain, streamed, logprobs), models, and errors.

Usage: python3 python/test_openai_client.py --base-url http://127.0.0.1:PORT/v1 --model NAME
Exits non-zero on the first failure. Run by crates/qwick-cli/tests/serve.rs when the package is
installed (pip install -r python/requirements-test.txt).
"""

import json

import client_checks
import openai
from openai import OpenAI
from openai.types.chat import ChatCompletionTokenLogprob

check = client_checks.check


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


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                          "additionalProperties": False}}


@check
def responses_plain_and_streamed(c, model):
    kw = dict(model=model, input="Hello! Who are you?", instructions="Be brief.", max_output_tokens=12,
              temperature=0, reasoning={"effort": "none"})
    r = c.responses.create(**kw)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text, r
    assert [o.type for o in r.output] == ["message"], r.output
    assert r.status in ("completed", "incomplete") and 1 <= r.usage.output_tokens <= 12, r
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens", r
    # Streamed: the response.* events, and the same text.
    events = list(c.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text, (text, r.output_text)
    for k in ["response.output_item.added", "response.content_part.added", "response.output_text.done",
              "response.content_part.done", "response.output_item.done"]:
        assert kinds.count(k) == 1, (k, kinds)
    # The instructions are part of the prompt.
    plain = c.responses.create(model=model, input="Hello! Who are you?", max_output_tokens=1, reasoning={"effort": "none"})
    assert plain.usage.input_tokens < r.usage.input_tokens


@check
def responses_reasoning_items(c, model):
    r = c.responses.create(model=model, input="Hello! Who are you?", max_output_tokens=40, temperature=0,
                           reasoning={"effort": "low"})
    kinds = [o.type for o in r.output]
    assert kinds[0] == "reasoning" and r.output[0].content[0].text, r.output
    assert r.usage.output_tokens_details.reasoning_tokens > 0, r.usage
    events = list(c.responses.create(model=model, input="Hello! Who are you?", max_output_tokens=40, temperature=0,
                                     reasoning={"effort": "low"}, stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == r.output[0].content[0].text, (thought, r.output[0])


@check
def responses_tools_and_previous_response(c, model):
    r = c.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER], temperature=0,
                           tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome"), calls[0].arguments
    # The call's output continues the stored conversation.
    r2 = c.responses.create(model=model, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=4,
                            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}])
    assert r2.previous_response_id == r.id and r2.usage.input_tokens > r.usage.input_tokens, r2.usage
    assert c.responses.retrieve(r.id).id == r.id
    # Streamed calls arrive whole in their argument events.
    events = list(c.responses.create(model=model, input="Weather?", tools=[WEATHER], temperature=0, stream=True,
                                     tool_choice="required", parallel_tool_calls=False, max_output_tokens=60))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments)["city"] in ("Paris", "Rome"), [e.type for e in events]


@check
def responses_text_format_and_store(c, model):
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    r = c.responses.create(model=model, input="A number?", temperature=0, max_output_tokens=40,
                           reasoning={"effort": "none"},
                           text={"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}})
    assert json.loads(r.output_text) in ({"n": 1}, {"n": 2}), r.output_text
    gone = c.responses.create(model=model, input="Hi", store=False, max_output_tokens=2)
    try:
        c.responses.create(model=model, input="Again", previous_response_id=gone.id, max_output_tokens=2)
        raise AssertionError("continued a response that was not stored")
    except openai.BadRequestError as e:
        assert "previous response" in str(e), e
    c.responses.delete(r.id)
    try:
        c.responses.retrieve(r.id)
        raise AssertionError("a deleted response was found")
    except openai.NotFoundError:
        pass
    for bad in [dict(tools=[{"type": "web_search"}]), dict(reasoning={"effort": "extreme"}), dict(frobnicate=1)]:
        try:
            c.responses.create(model=model, input="Hi", max_output_tokens=2, extra_body=bad)
            raise AssertionError(f"{bad} was accepted")
        except openai.BadRequestError:
            pass


if __name__ == "__main__":
    client_checks.main(lambda url, key: OpenAI(base_url=url, api_key=key, timeout=60, max_retries=0))
