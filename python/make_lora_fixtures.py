#!/usr/bin/env python3
"""Build PEFT LoRA adapters for the tiny dense_untied_gqa2 fixture plus PEFT's reference logits.

    python3 python/make_lora_fixtures.py            # writes tests/lora/

Output (tests/lora/):
    adapter_r8/            PEFT adapter (adapter_config.json + adapter_model.safetensors): r=8, lora_alpha=16,
                           all 7 linear projections (q/k/v/o/gate/up/down), scaling alpha/r = 2
    adapter_rslora_qv/     PEFT adapter: r=4, lora_alpha=8, use_rslora=True, q_proj + v_proj only,
                           scaling alpha/sqrt(r) = 4
    tokens.json            {"ids": [...]}  (the token ids of tests/fixtures/dense_untied_gqa2/tokens.json)
    base.npy               '<f4' [T, vocab] logits of the base model
    adapter_r8.npy         '<f4' [T, vocab] logits of base + adapter_r8 (PEFT, unmerged)
    adapter_rslora_qv.npy  '<f4' [T, vocab] logits of base + adapter_rslora_qv (PEFT, unmerged)
    README.md              written by hand (file list, versions, scaling rule)

Logits: transformers Qwen3ForCausalLM.from_pretrained(base, dtype=float32, attn_implementation="eager"), eval mode,
torch.no_grad, one forward over the whole sequence, position ids 0..T-1, use_cache=False.

Checks (the script aborts if one fails):
  * base.npy equals tests/fixtures/dense_untied_gqa2/logits.npy (within 1e-5);
  * the adapter reloaded from disk with PeftModel.from_pretrained gives the same logits as the in-memory one, and
    every saved tensor equals the in-memory parameter;
  * merge_and_unload() gives the unmerged logits within 1e-4;
  * an independent merge (W + scaling * B @ A written into a fresh base model, scaling = alpha/r or
    alpha/sqrt(r) with rsLoRA) gives the PEFT logits within 1e-4;
  * every adapter changes the logits by a clearly visible amount (max abs diff vs base > 0.5).

PEFT's save_pretrained output is kept as written, except that its template model card (README.md) is dropped and
adapter_config.json is re-serialized with target_modules sorted (PEFT writes that set in hash order).

Deterministic: lora_A ~ N(0, 1) / sqrt(in_features), lora_B ~ N(0, 1) * 0.05, drawn from one torch.Generator per
adapter (seed below), in sorted parameter-name order.
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

BASE_DIR = "tests/fixtures/dense_untied_gqa2"  # relative to the repository root; also the base_model_name_or_path
OUT_DIR = "tests/lora"
TF_MAJOR = int(transformers.__version__.split(".")[0])

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [
    dict(name="adapter_r8", seed=201, r=8, lora_alpha=16, use_rslora=False, target_modules=ALL_LINEAR),
    dict(name="adapter_rslora_qv", seed=202, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
]
MIN_VISIBLE_DIFF = 0.5


def load_base():
    kw = {"attn_implementation": "eager"}
    kw["dtype" if TF_MAJOR >= 5 else "torch_dtype"] = torch.float32
    model, info = Qwen3ForCausalLM.from_pretrained(BASE_DIR, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"base load: {bad}"
    return model.eval()


def forward(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    pos = torch.arange(len(ids), dtype=torch.long)[None]
    with torch.no_grad():
        out = model(input_ids=x, position_ids=pos, use_cache=False)
    return out.logits[0].float().numpy().astype("<f4")


def scaling_of(a):
    return a["lora_alpha"] / (math.sqrt(a["r"]) if a["use_rslora"] else a["r"])


def make_adapter(a, ids):
    """-> (unmerged logits, report dict). Writes OUT_DIR/<name>/."""
    cfg = LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], target_modules=list(a["target_modules"]),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=a["use_rslora"])
    model = get_peft_model(load_base(), cfg)
    g = torch.Generator().manual_seed(a["seed"])
    params = dict(model.named_parameters())
    n_set = 0
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) / math.sqrt(p.shape[1]))
                n_set += 1
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05)
                n_set += 1
    n_layers = model.base_model.model.config.num_hidden_layers
    assert n_set == 2 * n_layers * len(a["target_modules"]), n_set
    model.peft_config["default"].base_model_name_or_path = BASE_DIR
    model.eval()
    logits = forward(model, ids)

    d = os.path.join(OUT_DIR, a["name"])
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    # PEFT also writes a template model card (README.md); it carries no data a loader needs.
    card = os.path.join(d, "README.md")
    if os.path.exists(card):
        os.remove(card)
    # PEFT keeps target_modules as a set and writes it in hash order; sort it so reruns give identical files
    cpath = os.path.join(d, "adapter_config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["target_modules"] = sorted(c["target_modules"])
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    files = sorted(os.listdir(d))
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files

    # the files on disk: tensors equal the in-memory parameters, and reloading reproduces the logits
    saved = load_file(os.path.join(d, "adapter_model.safetensors"))
    for k, v in saved.items():
        mem = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[mem].detach(), v), k
    assert len(saved) == n_set, (len(saved), n_set)
    with open(os.path.join(d, "adapter_config.json")) as f:
        saved_cfg = json.load(f)
    assert saved_cfg["base_model_name_or_path"] == BASE_DIR, saved_cfg["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(load_base(), d).eval()
    diff_reload = float(np.abs(forward(reloaded, ids) - logits).max())
    assert diff_reload <= 1e-6, f"{a['name']}: reloaded adapter logits differ by {diff_reload}"

    # PEFT's own merge
    merged = model.merge_and_unload()
    diff_merge = float(np.abs(forward(merged.eval(), ids) - logits).max())
    assert diff_merge <= 1e-4, f"{a['name']}: merge_and_unload logits differ by {diff_merge}"

    # independent merge from the saved tensors: W += scaling * B @ A
    s = scaling_of(a)
    manual = load_base()
    msd = manual.state_dict()
    with torch.no_grad():
        for k in saved:
            if not k.endswith(".lora_A.weight"):
                continue
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            A, B = saved[k].double(), saved[k.replace(".lora_A.", ".lora_B.")].double()
            W = msd[mod + ".weight"]
            W.copy_((W.double() + s * (B @ A)).float())
    diff_manual = float(np.abs(forward(manual, ids) - logits).max())
    assert diff_manual <= 1e-4, f"{a['name']}: manual merge (scaling {s}) differs by {diff_manual}"

    return logits, {
        "files": files, "saved_cfg": saved_cfg, "saved": saved, "scaling": s,
        "diff_reload": diff_reload, "diff_merge": diff_merge, "diff_manual": diff_manual,
    }


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with open(os.path.join(BASE_DIR, "tokens.json")) as f:
        ids = json.load(f)["tokens"]
    os.makedirs(OUT_DIR, exist_ok=True)

    base = forward(load_base(), ids)
    ref = np.load(os.path.join(BASE_DIR, "logits.npy"))
    diff_fixture = float(np.abs(base - ref).max())
    assert diff_fixture <= 1e-5, f"base logits differ from {BASE_DIR}/logits.npy by {diff_fixture}"
    np.save(os.path.join(OUT_DIR, "base.npy"), base)
    with open(os.path.join(OUT_DIR, "tokens.json"), "w") as f:
        json.dump({"ids": ids}, f)
        f.write("\n")
    print(f"base: T={len(ids)} vocab={base.shape[1]}  max |base - {BASE_DIR}/logits.npy| = {diff_fixture:.2e}")

    for a in ADAPTERS:
        logits, rep = make_adapter(a, ids)
        delta = float(np.abs(logits - base).max())
        assert delta > MIN_VISIBLE_DIFF, f"{a['name']}: adapter barely changes the logits ({delta})"
        np.save(os.path.join(OUT_DIR, a["name"] + ".npy"), logits)
        argmax_changed = int((logits.argmax(-1) != base.argmax(-1)).sum())
        print(f"\n{a['name']}: r={a['r']} alpha={a['lora_alpha']} rslora={a['use_rslora']} scaling={rep['scaling']:g}"
              f"  max |adapter - base| = {delta:.4f}  argmax changed at {argmax_changed}/{len(ids)} positions"
              f"  reload diff {rep['diff_reload']:.1e}  merge_and_unload diff {rep['diff_merge']:.1e}"
              f"  manual-merge diff {rep['diff_manual']:.1e}")
        for k, v in rep["saved"].items():
            print(f"  {k:70s} {str(v.dtype):14s} {list(v.shape)}")
        c = rep["saved_cfg"]
        print("  adapter_config.json:", json.dumps({k: c.get(k) for k in (
            "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "lora_dropout", "bias",
            "base_model_name_or_path", "fan_in_fan_out", "modules_to_save", "peft_version")}))

    print("\nversions:", json.dumps({
        "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "safetensors": safetensors.__version__, "python": sys.version.split()[0]}))
    total = 0
    for root, _dirs, files in os.walk(OUT_DIR):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            print(f"  {os.path.getsize(p):8d}  {p}")
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
