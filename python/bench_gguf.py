#!/usr/bin/env python3
"""Times qwick and llama.cpp's llama-bench on the same GGUF files, back to back, like for like.

For each file, with the same thread count:
  - prefill of 512 tokens            (llama-bench pp512;         qwick bench --prompt-len 512)
  - decode from an empty context     (llama-bench tg128;         qwick bench --prompt-len 1 --gen-len 128)
  - decode after 512 tokens          (llama-bench tg128 -d 512;  qwick bench --prompt-len 512 --gen-len 128)
and prints a Markdown table with qwick / llama.cpp ratios. Machines are noisy: compare within a
run. A second engine (for example ik_llama.cpp's llama-bench, with --peer-args "-rtr 1") can be
added with --peer.

  python3 python/bench_gguf.py --llama-bench /path/to/llama-bench model-Q4_0.gguf model-Q8_0.gguf
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def llama_bench(exe, model, threads, reps, extra):
    """(pp512, tg128, tg128 at depth 512) in tok/s from llama-bench's JSON output."""
    base = [exe, "-m", model, "-t", str(threads), "-r", str(reps), "-o", "json"] + extra
    first = json.loads(run(base + ["-p", "512", "-n", "128"]))
    pp = next(r["avg_ts"] for r in first if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in first if r["n_gen"] == 128 and r["n_prompt"] == 0)
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    if "n-depth" in help_text:
        deep = json.loads(run(base + ["-p", "0", "-n", "128", "-d", "512"]))
        tgd = next(r["avg_ts"] for r in deep if r["n_gen"] == 128)
    else:
        # Builds without -d (ik_llama.cpp) time generation after a prompt with -gp.
        deep = json.loads(run(base + ["-p", "0", "-n", "0", "-gp", "512,128"]))
        tgd = next(r["avg_ts"] for r in deep if r["n_gen"] == 128)
    return pp, tg, tgd


def qwick_bench(exe, model, threads, reps, extra):
    """(pp512, decode from empty, decode after 512) in tok/s, means over `reps` runs, and the
    last report."""
    pps, tgs, tgds = [], [], []
    report = None
    for _ in range(reps):
        deep = json.loads(run([exe, "bench", "--model", model, "--threads", str(threads), "--prompt-len", "512",
                               "--gen-len", "128", "--json"] + extra))
        empty = json.loads(run([exe, "bench", "--model", model, "--threads", str(threads), "--prompt-len", "1",
                                "--gen-len", "128", "--json"] + extra))
        pps.append(deep["prefill_tok_s"])
        tgds.append(deep["decode_tok_s"])
        tgs.append(empty["decode_tok_s"])
        report = deep
    return statistics.mean(pps), statistics.mean(tgs), statistics.mean(tgds), report


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="GGUF files")
    ap.add_argument("--qwick", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "qwick"))
    ap.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench")
    ap.add_argument("--peer", help="a second llama-bench (e.g. ik_llama.cpp's)")
    ap.add_argument("--peer-args", default="", help="extra arguments for the second one, e.g. '-rtr 1'")
    ap.add_argument("--qwick-args", default="", help="extra arguments for qwick bench, e.g. '--isa avx512vnni'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="also write all numbers to this file")
    a = ap.parse_args()

    rows = []
    for model in a.models:
        q = qwick_bench(a.qwick, model, a.threads, a.reps, a.qwick_args.split())
        l = llama_bench(a.llama_bench, model, a.threads, a.reps, [])
        p = llama_bench(a.peer, model, a.threads, a.reps, a.peer_args.split()) if a.peer else None
        rows.append({"model": os.path.basename(model), "qwick": q[:3], "llama.cpp": l, "peer": p,
                     "isa": q[3]["isa"], "peak_rss_gb": q[3]["peak_rss_bytes"] / 1e9,
                     "file_gb": os.path.getsize(model) / 1e9})

    print(f"\n{cpu_model()}, {a.threads} threads\n")
    peer = " | peer" if a.peer else ""
    print(f"| file | test | qwick | llama.cpp{peer} | qwick / llama.cpp |")
    print(f"|---|---|---:|---:{'|---:' if a.peer else ''}|---:|")
    for r in rows:
        for i, test in enumerate(["pp512", "tg128", "tg128 @ d512"]):
            qv, lv = r["qwick"][i], r["llama.cpp"][i]
            pv = f" | {r['peer'][i]:.1f}" if r["peer"] else ""
            print(f"| {r['model']} | {test} | {qv:.1f} | {lv:.1f}{pv} | {qv / lv:.2f}x |")
    for r in rows:
        print(f"{r['model']}: qwick isa {r['isa']}, peak RSS {r['peak_rss_gb']:.2f} GB (file {r['file_gb']:.2f} GB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
