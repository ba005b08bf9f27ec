#!/usr/bin/env python3
"""Measures PyTorch + PEFT LoRA training speed on CPU, the reference point for `qwick finetune --bench`.

Loads a Hugging Face Qwen3 checkpoint on the CPU, wraps it with a PEFT LoRA adapter on every
attention and MLP projection (q/k/v/o, gate/up/down), and times full training steps (forward
with labels, backward, AdamW step, zero_grad) on one random sequence of --seq-len tokens
(batch 1). One untimed warm-up step runs first. Reports train tokens/s
(seq_len * steps / seconds) and the process's peak RSS. Compare with qwick on the same model,
sequence length, rank and thread count:

  python3 python/bench_peft_finetune.py --model /path/to/hf_dir --seq-len 512 --rank 16 --threads 2 --json
  qwick finetune --model M --bench --seq-len 512 --json
"""

import argparse
import json
import platform
import resource
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Qwen3ForCausalLM

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_bytes():
    # On Linux ru_maxrss is in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (config.json, *.safetensors)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if args.steps < 1 or args.seq_len < 2:
        ap.error("--steps must be >= 1 and --seq-len >= 2")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    model = Qwen3ForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.to("cpu")
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    load_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (1, args.seq_len), generator=gen, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def step():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    t0 = time.perf_counter()
    warm_loss = step()
    warm_s = time.perf_counter() - t0

    losses = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    elapsed = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    tok_s = args.seq_len * args.steps / elapsed
    # Process CPU time over (wall time x threads): well below 100% means the timed steps shared
    # the cores with other work (or torch used fewer threads), so the number is pessimistic.
    cpu_util = cpu_s / (elapsed * args.threads)

    result = {
        "train_tok_s": round(tok_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "threads": args.threads,
        "cpu": cpu_model(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    if args.json:
        print(f"timed steps: {elapsed:.1f} s wall, {cpu_s:.1f} s CPU ({cpu_util:.0%} of {args.threads} threads)",
              file=sys.stderr)
        print(json.dumps(result), flush=True)
    else:
        print(f"model         {args.model}")
        print(f"cpu           {result['cpu']} ({args.threads} threads)")
        print(f"versions      torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
        print(f"dtype         {args.dtype}, seq_len {args.seq_len}, rank {args.rank}, alpha {args.alpha:g}")
        print(f"trainable     {n_trainable:,} params")
        print(f"load          {load_s:.1f} s")
        print(f"warm-up step  {warm_s:.1f} s (loss {warm_loss:.4f})")
        print(f"timed steps   {args.steps} in {elapsed:.1f} s ({elapsed / args.steps:.1f} s/step), losses "
              + ", ".join(f"{x:.4f}" for x in losses))
        print(f"CPU use       {cpu_s:.1f} s CPU in timed steps ({cpu_util:.0%} of {args.threads} threads)")
        print(f"train         {tok_s:.2f} tok/s")
        print(f"peak RSS      {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
