#!/usr/bin/env python3
"""Checks that qwick and llama.cpp compute the same logits (and greedy tokens) for a GGUF file.

    python3 python/check_llama_cpp.py --qwick target/release/qwick --model FILE.gguf \
        [--prompt TEXT | --ids 1,2,3] [--tokens N] [--greedy N] [--fast]

Needs llama.cpp's Python binding (`pip install llama-cpp-python`) and numpy. Where llama.cpp's AMX
kernels stop with SIGILL (a build with -march=native on some virtual machines), build the binding
without AMX (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ... -DGGML_AMX_INT8=OFF") or pass
--llama-no-repack.

1. The prompt is tokenized by llama.cpp (the model's own BOS rule, special tokens parsed), or taken
   from --ids. --tokens N cuts it to N tokens, or repeats it up to N when it is shorter.
2. llama.cpp evaluates the tokens and keeps the logits of every position (logits_all, 2 threads,
   KV cache f32 unless --llama-kv f16).
3. `qwick logits --model FILE --tokens IDS --out X.npy` computes the same [T, vocab] logits.
4. Per position, with llama.cpp as the reference and s = the standard deviation of its logits at that
   position: both engines' argmax, the reference's margin (first minus second logit) / s, and
   max |qwick - llama.cpp| / s and rms(qwick - llama.cpp) / s.

Pass (exit 0) when
  * top-1 agreement >= --min-top1, counted over the positions whose reference margin exceeds
    --margin * s (random-weight models have nearly flat logits, where the first two logits can be a
    rounding error apart and either engine may pick either; if no position qualifies, this test is
    skipped), and
  * the relative rms difference over all positions (the root mean square of the per-position values)
    <= --max-rel-rms.
Exit 1 when a check fails, 2 on a usage or run error. The last line printed is a one-line JSON
summary.

--greedy N: both engines also generate N greedy tokens from the raw prompt (no chat template):
llama.cpp by evaluating and taking the argmax token by token (stopping at an end-of-generation
token), qwick by `qwick run --temperature 0` with a chat template that renders the user message
unchanged (with --exact --kv-dtype f32 unless --fast). Reported: the length of the common prefix and,
where the two part, how far llama.cpp's logit of its own choice exceeds that of qwick's, in stds (a
near tie is rounding; a large gap is a real difference). Information only: it does not decide the
exit status, as one near tie sends the two continuations apart for good. qwick must be able to
build the file's tokenizer; if it cannot, the greedy part is skipped with a note.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_PROMPT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon, and "
    "Neil Armstrong said: \"That's one small step for man, one giant leap for mankind.\" "
    "Water boils at 100 degrees Celsius at sea level; def f(x): return x * 2"
)

# A chat template that renders the last message's content as it is: `qwick run` then generates
# from the raw prompt.
RAW_TEMPLATE = "{{- messages[-1]['content'] -}}"

TOLERANCE_HELP = """\
Tolerances depend on the weight type, on the depth of the model and on how each engine multiplies.
llama.cpp rounds the activations to the weights' own kind of numbers before each product: to f16
for F16 weights, to bf16 for BF16 weights, and to 8-bit blocks (of 32 for Q8_0, Q4_0, ...; of 256
for the K-quants and most i-quants) for quantized weights. qwick's `logits` is exact by default (f32
activations against the dequantized weights); with --fast it quantizes activations to 8 bits as
`qwick run` and `qwick serve` do, in its own blocks, so its rounding differs from llama.cpp's either
way. Relative rms difference (rms(qwick - llama.cpp) / std of llama.cpp's logits) of a correct qwick:
  F32:                          0
  F16 / BF16:                   ~4e-4 / ~3e-3 (llama.cpp's activation rounding)
  quantized, 1 layer:           ~0.012 (Q8_0) to ~0.017 (K- and i-quants)
  quantized, 4 layers (Q4_K_M): ~0.026
  quantized, 28 layers (Qwen3-0.6B shapes, random weights): ~0.021 (Q8_0), ~0.031 (Q4_K_M);
                                with --fast ~0.025 and ~0.037
A wrong kernel, layout or position gives ~1. The default --max-rel-rms 0.1 leaves room for deeper
models and low-bit types; tighten it for float weights (e.g. 0.01).

Top-1 agreement is only meaningful where one token clearly wins: random-weight models have nearly
flat logits (a quarter to a half of the positions of the files above have their first two logits
within 0.1 std), where 8-bit rounding may swap the first two. --margin keeps only the positions
where llama.cpp's first logit beats its second by more than that many stds; --margin 0 counts all."""


def die(msg):
    print(f"check_llama_cpp: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_ids(text):
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        die(f"--ids: not a comma-separated list of integers: {text!r}")


def fit_length(ids, n):
    """`ids` cut to n tokens, or repeated up to n when shorter."""
    if n is None:
        return list(ids)
    if not ids:
        die("the prompt has no tokens")
    reps = -(-n // len(ids))
    return (list(ids) * reps)[:n]


class CommandFailed(Exception):
    pass


def run_cmd(cmd):
    """(stdout, seconds) of a command; CommandFailed with its output when it fails."""
    shown = [c if len(c) <= 200 else c[:60] + "..." for c in cmd]
    print("+ " + " ".join(shown), file=sys.stderr, flush=True)
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise CommandFailed(f"{os.path.basename(cmd[0])} {cmd[1]} exited with status {p.returncode}: "
                            + (p.stderr.strip() or p.stdout.strip())[-2000:])
    return p.stdout, time.time() - t


def compare(ref, got):
    """Per-position statistics of `got` against `ref` ([T, vocab] each)."""
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    std = ref.std(axis=1)
    std = np.where(std > 0, std, 1.0)
    diff = got - ref
    top2 = np.sort(np.partition(ref, -2, axis=1)[:, -2:], axis=1)
    return {
        "top_ref": ref.argmax(axis=1),
        "top_got": got.argmax(axis=1),
        "margin": (top2[:, 1] - top2[:, 0]) / std,
        "rel_max": np.abs(diff).max(axis=1) / std,
        "rel_rms": np.sqrt((diff**2).mean(axis=1)) / std,
        "std": std,
    }


def open_llama(llama_cpp, path, no_repack, **kw):
    """llama_cpp.Llama(path, **kw); `no_repack`: without extra buffer types (llama.cpp's --no-repack:
    weights stay in the file's layout, no CPU repacking and no AMX kernels)."""
    if not no_repack:
        return llama_cpp.Llama(path, **kw)
    lib = llama_cpp.llama_cpp
    default_params = lib.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(path, **kw)
    finally:
        lib.llama_model_default_params = default_params


def llama_greedy(llm, prompt_ids, n, eog):
    """llama.cpp's greedy continuation: up to n tokens, ending at an end-of-generation token."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    while True:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if len(out) == n or eog(tok):
            return out
        llm.eval([tok])


def qwick_greedy(args, prompt_text, n, tmp):
    """qwick's greedy continuation of the raw text: (tokens, prompt length, finish reason, seconds)."""
    tpl = os.path.join(tmp, "raw.jinja")
    with open(tpl, "w") as f:
        f.write(RAW_TEMPLATE)
    msgs = os.path.join(tmp, "messages.json")
    with open(msgs, "w") as f:
        json.dump([{"role": "user", "content": prompt_text}], f)
    cmd = [args.qwick, "run", "--model", args.model, "--messages", msgs, "--chat-template", tpl,
           "--json", "--no-think", "--temperature", "0", "--repetition-penalty", "1",
           "--presence-penalty", "0", "--frequency-penalty", "0", "--max-tokens", str(n)]
    if not args.fast:
        cmd += ["--exact", "--kv-dtype", "f32"]
    if args.qwick_threads:
        cmd += ["--threads", str(args.qwick_threads)]
    out, secs = run_cmd(cmd)
    v = json.loads(out.strip().splitlines()[-1])
    return v["token_ids"], v["timings"]["prompt_tokens"], v.get("finish_reason"), secs


def greedy_check(args, llm, llama_cpp, prompt_ids, prompt_text, tmp):
    """Both engines' greedy continuations of the raw prompt; the summary's "greedy" entry."""
    vocab = llm._model.vocab
    t = time.time()
    lg = llama_greedy(llm, prompt_ids, args.greedy, lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok)))
    lg_s = time.time() - t
    try:
        qg, q_prompt, q_finish, qg_s = qwick_greedy(args, prompt_text, args.greedy, tmp)
    except CommandFailed as e:
        # Information only: a model whose logits qwick computes but which it cannot chat with (no
        # usable tokenizer) still gets its logits checked.
        print(f"note: greedy skipped: {e}", file=sys.stderr)
        return {"n": args.greedy, "llama_tokens": len(lg), "error": "qwick run failed"}
    common = 0
    for a, b in zip(lg, qg):
        if a != b:
            break
        common += 1
    print(f"greedy llama.cpp: {lg}")
    print(f"greedy qwick:     {qg}")
    print(f"greedy: common prefix {common} of {len(lg)} (llama.cpp) / {len(qg)} (qwick) tokens")
    gap = None
    if common < min(len(lg), len(qg)):
        # How far apart llama.cpp puts the two choices where they part: a near tie (a small
        # fraction of the logits' std) is rounding, a large gap a real difference.
        row = np.asarray(llm.scores[len(prompt_ids) + common - 1], dtype=np.float64)
        gap = float((row[lg[common]] - row[qg[common]]) / (row.std() or 1.0))
        print(f"greedy: at token {common} llama.cpp's logit of its choice {lg[common]} exceeds that of "
              f"qwick's {qg[common]} by {gap:.4f} std")
    if q_prompt != len(prompt_ids):
        print(f"note: the prompt is {len(prompt_ids)} tokens for llama.cpp and {q_prompt} for qwick "
              "(different tokenization or BOS)", file=sys.stderr)
    return {
        "n": args.greedy,
        "prompt_tokens_llama": len(prompt_ids),
        "prompt_tokens_qwick": q_prompt,
        "llama_tokens": len(lg),
        "qwick_tokens": len(qg),
        "common_prefix": common,
        "gap_at_divergence": None if gap is None else float(f"{gap:.4g}"),
        "qwick_finish": q_finish,
        "llama_s": round(lg_s, 2),
        "qwick_s": round(qg_s, 2),
    }


def main():
    ap = argparse.ArgumentParser(
        description="Compare qwick's logits (and greedy tokens) with llama.cpp's on a GGUF file.",
        epilog=TOLERANCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--qwick", required=True, help="path of the qwick binary")
    ap.add_argument("--model", required=True, help="GGUF file")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text, tokenized by llama.cpp (default: a built-in sentence mix)")
    src.add_argument("--ids", help="comma-separated token ids instead of --prompt")
    ap.add_argument("--tokens", type=int, metavar="N",
                    help="compare N tokens: the prompt's cut to N, or repeated up to N (default: the prompt's)")
    ap.add_argument("--min-top1", type=float, default=0.9,
                    help="least top-1 agreement over the positions with a clear winner (default 0.9)")
    ap.add_argument("--margin", type=float, default=0.1,
                    help="a position counts for top-1 agreement when llama.cpp's first logit beats its "
                         "second by more than this many standard deviations of its logits (default 0.1; "
                         "0 counts every position)")
    ap.add_argument("--max-rel-rms", type=float, default=0.1,
                    help="largest rms(qwick - llama.cpp) / std(llama.cpp logits), root mean square over "
                         "positions (default 0.1; see the tolerances below)")
    ap.add_argument("--greedy", type=int, default=0, metavar="N",
                    help="also generate N greedy tokens with both engines and report the common prefix")
    ap.add_argument("--fast", action="store_true",
                    help="run qwick as run/serve do (8-bit activations for quantized weights, bf16 KV "
                         "cache for --greedy) instead of exactly (logits' default; --exact --kv-dtype f32 "
                         "for --greedy)")
    ap.add_argument("--qwick-threads", type=int, help="qwick's --threads (default: qwick's)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    ap.add_argument("--llama-kv", choices=["f32", "f16"], default="f32",
                    help="llama.cpp's KV cache type (default f32, like qwick logits; llama.cpp's own default is f16)")
    ap.add_argument("--llama-no-repack", action="store_true",
                    help="llama.cpp without extra buffer types (its --no-repack: no weight repacking, no AMX "
                         "kernels); for a build whose AMX kernels stop with SIGILL (as on some virtual "
                         "machines)")
    ap.add_argument("--quiet", action="store_true", help="no per-position table")
    args = ap.parse_args()

    if not os.path.isfile(args.qwick) or not os.access(args.qwick, os.X_OK):
        die(f"--qwick: not an executable file: {args.qwick}")
    if not os.path.isfile(args.model):
        die(f"--model: no such file: {args.model}")
    if args.tokens is not None and args.tokens < 1:
        die("--tokens must be at least 1")

    try:
        import llama_cpp
    except ImportError:
        die("llama.cpp's Python binding is missing: pip install llama-cpp-python")

    prompt_text = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    # The context: the compared tokens, or the prompt plus the greedy tokens.
    vocab_llm = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    add_bos = vocab_llm._model.add_bos_token()
    if args.ids is not None:
        prompt_ids = parse_ids(args.ids)
    else:
        prompt_ids = vocab_llm.tokenize(prompt_text.encode("utf-8"), add_bos=add_bos, special=True)
    ids = fit_length(prompt_ids, args.tokens)
    if not ids:
        die("no tokens to compare")
    n_ctx = max(len(ids), len(prompt_ids) + args.greedy) + 8
    del vocab_llm

    kv = llama_cpp.GGML_TYPE_F32 if args.llama_kv == "f32" else llama_cpp.GGML_TYPE_F16
    t = time.time()
    llm = open_llama(llama_cpp, args.model, args.llama_no_repack, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                     n_ubatch=min(512, n_ctx), logits_all=True, n_threads=args.threads,
                     n_threads_batch=args.threads, type_k=kv, type_v=kv, verbose=False)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llama_s = time.time() - t

    with tempfile.TemporaryDirectory(prefix="qwick-llama-check-") as tmp:
        out = os.path.join(tmp, "logits.npy")
        cmd = [args.qwick, "logits", "--model", args.model, "--tokens", ",".join(map(str, ids)), "--out", out]
        if args.fast:
            cmd.append("--fast")
        if args.qwick_threads:
            cmd += ["--threads", str(args.qwick_threads)]
        try:
            _, qwick_s = run_cmd(cmd)
        except CommandFailed as e:
            die(str(e))
        got = np.load(out)

        if got.ndim != 2 or got.shape[0] != len(ids):
            die(f"qwick wrote logits of shape {got.shape}, expected [{len(ids)}, vocab]")
        if got.shape[1] != ref.shape[1]:
            v = min(got.shape[1], ref.shape[1])
            print(f"note: vocabularies differ (qwick {got.shape[1]}, llama.cpp {ref.shape[1]}); "
                  f"comparing the first {v} logits", file=sys.stderr)
            got, ref = got[:, :v], ref[:, :v]
        if not np.isfinite(got).all():
            print("note: qwick's logits are not all finite", file=sys.stderr)

        s = compare(ref, got)
        T = len(ids)
        agree = s["top_ref"] == s["top_got"]
        clear = s["margin"] > args.margin
        if not args.quiet:
            print(f"{'pos':>5} {'token':>7} {'llama':>7} {'qwick':>7} {'ok':>2} {'margin/s':>9} "
                  f"{'max|d|/s':>9} {'rms(d)/s':>9}")
            for i in range(T):
                mark = ("=" if agree[i] else "x") if clear[i] else ("~" if agree[i] else "?")
                print(f"{i:>5} {ids[i]:>7} {s['top_ref'][i]:>7} {s['top_got'][i]:>7} {mark:>2} "
                      f"{s['margin'][i]:>9.4f} {s['rel_max'][i]:>9.4f} {s['rel_rms'][i]:>9.5f}")
            print("ok: = agree, x differ (margin above --margin); ~ agree, ? differ (margin below: not counted)")

        n_clear = int(clear.sum())
        top1_all = float(agree.mean())
        top1 = float(agree[clear].mean()) if n_clear else None
        rel_rms = float(np.sqrt((s["rel_rms"] ** 2).mean()))
        summary = {
            "model": os.path.basename(args.model),
            "tokens": T,
            "vocab": int(ref.shape[1]),
            "qwick_mode": "fast" if args.fast else "exact",
            "llama_kv": args.llama_kv,
            "logit_std_mean": round(float(s["std"].mean()), 6),
            "top1_all": round(top1_all, 4),
            "margin": args.margin,
            "positions_over_margin": n_clear,
            "top1": None if top1 is None else round(top1, 4),
            "rel_rms": float(f"{rel_rms:.4g}"),
            "rel_rms_max": float(f"{s['rel_rms'].max():.4g}"),
            "rel_maxabs_max": float(f"{s['rel_max'].max():.4g}"),
            "llama_s": round(llama_s, 2),
            "qwick_s": round(qwick_s, 2),
        }

        if args.greedy > 0 and args.ids is not None:
            print("note: --greedy needs a text prompt (qwick run takes text, not ids); skipped", file=sys.stderr)
        elif args.greedy > 0:
            summary["greedy"] = greedy_check(args, llm, llama_cpp, prompt_ids, prompt_text, tmp)

    failures = []
    if top1 is not None and top1 < args.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {args.min_top1} over {n_clear} positions")
    if not rel_rms <= args.max_rel_rms:
        failures.append(f"relative rms {rel_rms:.4g} > {args.max_rel_rms}")
    summary["pass"] = not failures
    print(f"{T} tokens: top-1 {top1_all:.4f} over all positions, "
          + (f"{top1:.4f} over the {n_clear} with margin > {args.margin} std; " if n_clear
             else f"no position with margin > {args.margin} std (top-1 test skipped); ")
          + f"rel rms {rel_rms:.4g} (max {s['rel_rms'].max():.4g}), rel max|d| {s['rel_max'].max():.4g}")
    for f in failures:
        print(f"FAIL: {f}")
    print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
