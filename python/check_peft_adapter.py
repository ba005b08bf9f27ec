#!/usr/bin/env python3
"""Check that an adapter folder written by `qwick finetune` loads in Hugging Face PEFT and gives
the logits qwick gives with it.

    python3 python/check_peft_adapter.py --model MODEL_DIR --adapter ADAPTER_DIR \
        [--qwick target/release/qwick] [--tokens 1,2,3,...] [--save-logits FILE.npy]

Loads MODEL_DIR with transformers (float32, eager attention), wraps it with
`PeftModel.from_pretrained(model, ADAPTER_DIR)`, computes the logits of the token sequence, runs
`qwick logits --model MODEL_DIR --lora ADAPTER_DIR --tokens ...` on the same sequence, and prints
the largest absolute difference, the base-vs-adapter difference (to show the adapter matters) and
the top-1 agreement. Exits non-zero if the adapter does not load or the logits differ by more than
--tol (default 1e-3 relative to the largest logit).
"""

import argparse
import subprocess
import sys
import tempfile

import numpy as np
import torch
from peft import PeftModel
from transformers import Qwen3ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--qwick", default="target/release/qwick")
    ap.add_argument("--tokens", default="151644,872,198,15191,525,498,30,151645,198,151644,77091,198")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--save-logits", help="write PEFT's logits of the last position here (.npy, float32 [1, vocab])")
    a = ap.parse_args()
    ids = [int(t) for t in a.tokens.split(",")]
    kw = {"attn_implementation": "eager"}
    try:
        base = Qwen3ForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    except TypeError:
        base = Qwen3ForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, **kw)
    base.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        plain = base(input_ids=x, use_cache=False).logits[0].numpy()
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    with torch.no_grad():
        peft_logits = model(input_ids=x, use_cache=False).logits[0].numpy()
    if a.save_logits:
        np.save(a.save_logits, peft_logits[-1:].astype("<f4"))
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/l.npy"
        subprocess.run(
            [a.qwick, "logits", "--model", a.model, "--lora", a.adapter, "--tokens", a.tokens, "--out", out],
            check=True,
        )
        ours = np.load(out)
    scale = float(np.abs(peft_logits).max())
    diff = float(np.abs(ours - peft_logits).max())
    effect = float(np.abs(peft_logits - plain).max())
    top1 = float((ours.argmax(-1) == peft_logits.argmax(-1)).mean())
    print(f"max |qwick - PEFT| = {diff:.3e} (largest logit {scale:.3f}); adapter effect {effect:.3f}; top-1 agreement {top1:.0%}")
    if diff > a.tol * max(scale, 1.0) or effect < 10 * diff:
        print("FAIL")
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
