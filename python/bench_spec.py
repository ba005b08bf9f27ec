#!/usr/bin/env python3
"""Single-stream decode speed of an OpenAI-compatible server (qwick serve, llama-server), to
compare speculative decoding side by side on the same files.

    python3 python/bench_spec.py --url http://127.0.0.1:8000 --tokens 64 [--runs 3]

Streams greedy completions of a fixed prompt (ignore_eos, so every run generates --tokens
tokens) and reports decode tokens per second: the tokens after the first, over the time from
the first streamed chunk to the end. The first request warms the server up and is not counted;
each run's prompt differs in its first word, so no run reuses another's cached prompt whole.
"""

import argparse
import json
import time
import urllib.request

PROMPT = (
    "Explain, step by step, how a paged key-value cache lets a language model server run many "
    "requests at once: what a block is, how block tables map positions to memory, what happens "
    "when the cache fills, and how shared prompt prefixes are reused between requests."
)


def run(url: str, prompt: str, tokens: int) -> tuple[float, int]:
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    first = None
    usage = None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices") and first is None:
                first = time.time()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.time()
    n = usage["completion_tokens"] if usage else tokens
    return (n - 1) / (end - first), n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    run(args.url, "Warm up. " + PROMPT, 8)
    rates = []
    for i in range(args.runs):
        rate, n = run(args.url, f"Run {i}. " + PROMPT, args.tokens)
        rates.append(rate)
        print(f"run {i}: {n} tokens, decode {rate:.2f} tok/s")
    rates.sort()
    print(json.dumps({"url": args.url, "tokens": args.tokens, "median_tok_s": rates[len(rates) // 2], "runs": rates}))


if __name__ == "__main__":
    main()
