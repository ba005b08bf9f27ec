#!/usr/bin/env python3
"""Embedding throughput of a running server's `/v1/embeddings` (qwick `serve --task embed`, or
llama-server `--embedding`): `--docs` documents of about `--tokens` tokens each (random words,
the same for every server with the same --seed), `--batch` inputs a request, `--concurrency`
requests at once. Prints the tokens embedded per second (as the server counts them in `usage`).

Usage: python3 python/bench_embeddings.py --url http://127.0.0.1:PORT [--docs 256] [--tokens 256]
"""

import argparse
import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge every "
         "boxing match near ancient rivers under bright autumn stars and cold mountain winds").split()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--model", help="the model name to send (default: none, the server's own)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    # About one token a word (with its leading space) for these common words.
    docs = [" ".join(rng.choice(WORDS) for _ in range(a.tokens)) for _ in range(a.docs)]
    url = a.url.rstrip("/") + "/v1/embeddings"
    body = lambda inputs: {"input": inputs, **({"model": a.model} if a.model else {})}
    post(url, body(docs[:2]))  # warm-up
    batches = [docs[i:i + a.batch] for i in range(0, len(docs), a.batch)]
    t0 = time.time()
    with ThreadPoolExecutor(a.concurrency) as pool:
        results = list(pool.map(lambda b: post(url, body(b)), batches))
    dt = time.time() - t0
    tokens = sum(r["usage"]["prompt_tokens"] for r in results)
    dims = len(results[0]["data"][0]["embedding"])
    print(json.dumps({"docs": a.docs, "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
                      "dims": dims}))


if __name__ == "__main__":
    main()
