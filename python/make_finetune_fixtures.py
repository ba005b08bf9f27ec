#!/usr/bin/env python3
"""Build reference loss, LoRA gradients and one AdamW step (PyTorch + PEFT) for a LoRA fine-tuning test.

    python3 python/make_finetune_fixtures.py        # writes tests/finetune/

Inputs: base model tests/fixtures/dense_untied_gqa2, starting adapter tests/lora/adapter_r8 (r=8, lora_alpha=16,
all 7 projections, lora_dropout 0, non-zero A and B).

Output (tests/finetune/):
    batch.json               {"tokens": [T], "positions": [T], "labels": [T], "segments": [[start, len], ...]}:
                             one packed sequence of two examples (lengths 23 and 17, T = 40); tokens from
                             numpy RandomState(7).randint(0, 512, size=40); positions restart at 0 in each example;
                             labels[t] = tokens[t + 1] if t + 1 is in the same example and is a trained position,
                             else -100 (trained: index >= 9 within example A, index >= 5 within example B)
    grads.safetensors        float32 gradient of `loss` for every LoRA tensor, under the names of
                             tests/lora/adapter_r8/adapter_model.safetensors (28 tensors)
    after_step.safetensors   float32 LoRA tensors after clip_grad_norm_(max_norm) + one AdamW step (same names)
    reference.json           loss, grad_norm (total L2 norm before clipping), optimizer settings,
                             labelled_tokens, package versions
    README.md                written by hand (file list, label rule, tolerances)

Loss: each example run SEPARATELY through PeftModel.from_pretrained(base, adapter, is_trainable=True) (base loaded
with dtype=float32, attn_implementation="eager"; train mode, every dropout is 0), input_ids of that example,
position ids 0..len-1, use_cache=False; float32 cross-entropy of logits[t] against labels[t] summed over the
labelled positions of both examples, divided by the number of labelled tokens. One backward on that loss.

Optimizer step: torch.nn.utils.clip_grad_norm_(lora_params, MAX_NORM) (clipping is active: grad_norm > MAX_NORM),
then torch.optim.AdamW(lora_params, lr, betas, eps, weight_decay).step() once (decoupled weight decay, bias
correction at step 1).

Checks (the script aborts if one fails):
  * the trainable parameters are exactly the LoRA tensors of the adapter file (names one for one, equal values);
  * every gradient is finite and no gradient tensor is all zero;
  * clipping is active (grad_norm > MAX_NORM) and every tensor changes in the step;
  * the clip + AdamW step redone independently in float64 from the saved gradients reproduces after_step
    (within 1e-6), and the same step without clipping is off by more than TEST_RTOL even when the elements with a
    tiny gradient (|g| < TINY_GRAD * max |g| of the tensor) are left out;
  * the whole packed 40-token sequence in ONE forward, with a custom 4-D additive float mask (block-diagonal causal:
    0 where allowed, float32 min elsewhere) and restarting position ids, gives the same loss (within 1e-5) and
    gradients (within 1e-4 relative) as the separate forwards, while a plain causal 4-D mask over the packed
    sequence gives a clearly different loss (so the custom mask really is applied); the step computed from the
    packed gradients is within TEST_RTOL of after_step outside the tiny-gradient elements (there Adam's first step
    g / (|g| + eps) is decided by float32 noise, see README.md).

Deterministic: CPU, one thread, no random numbers besides the token draw.

Mixture-of-experts case (tests/finetune/moe/<model>/, for moe_norm_topk and moe_nonorm_mlponly in tests/fixtures/):
    adapter/                 fresh PEFT LoRA on q_proj/k_proj/v_proj/o_proj only (r=4, lora_alpha=8, lora_dropout 0),
                             saved with save_pretrained (README.md model card dropped, adapter_config.json re-serialized
                             with target_modules sorted; base_model_name_or_path = the fixture path); lora_A ~
                             N(0, 1) / sqrt(in_features), lora_B ~ N(0, 1) * 0.05 from torch.Generator(seed 301 / 302),
                             in sorted parameter-name order
    batch.json               the same batch as tests/finetune/batch.json
    grads.safetensors        float32 gradient of `loss` for every LoRA tensor (names of adapter/adapter_model.safetensors)
    reference.json           loss, labelled_tokens, package versions
Base: Qwen3MoeForCausalLM (float32, attn_implementation="eager", experts_implementation="eager"), reloaded adapter via
PeftModel.from_pretrained(is_trainable=True), train mode. Loss exactly as above (separate forwards, plain CE from the
logits); output_router_logits=False, so the router load-balancing (aux) loss is NOT part of it.
Checks: config as expected (experts, top-k, norm_topk_prob, mlp_only_layers, tying) and base logits equal the
fixture's logits.npy; gradients finite and non-zero; no top-k routing choice is a near tie (probability gap between
the k-th and (k+1)-th expert > MIN_ROUTING_GAP); detaching the input of every sparse MoE block (residual path kept)
leaves the loss unchanged but changes every layer-0 attention LoRA gradient by > 1% relative; the packed forward with
the block-diagonal mask reproduces loss and gradients. Also reported (not saved): the effect of detaching only the
router input, and of adding router_aux_loss_coef * aux_loss.
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
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter

BASE_DIR = "tests/fixtures/dense_untied_gqa2"  # relative to the repository root
ADAPTER_DIR = "tests/lora/adapter_r8"
OUT_DIR = "tests/finetune"
TF_MAJOR = int(transformers.__version__.split(".")[0])

VOCAB = 512
TOKEN_SEED = 7
EXAMPLES = [dict(length=23, first_trained=9), dict(length=17, first_trained=5)]  # A, B
IGNORE = -100

MAX_NORM = 0.05
LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.1

PACKED_LOSS_TOL = 1e-5
PACKED_GRAD_RTOL = 1e-4
MIN_MASK_EFFECT = 1e-3
TEST_RTOL = 1e-3  # the tolerance README.md tells tests to use: max |a - b| <= TEST_RTOL * max |ref|, per tensor
TINY_GRAD = 1e-4  # after_step elements whose |ref grad| < TINY_GRAD * max |ref grad| of the tensor are exempt


def load_base():
    kw = {"attn_implementation": "eager"}
    kw["dtype" if TF_MAJOR >= 5 else "torch_dtype"] = torch.float32
    model, info = Qwen3ForCausalLM.from_pretrained(BASE_DIR, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"base load: {bad}"
    return model


def file_name(param_name):
    """In-memory PEFT parameter name -> name in adapter_model.safetensors (adapter name `default` removed)."""
    for ab in ("lora_A", "lora_B"):
        param_name = param_name.replace(f".{ab}.default.", f".{ab}.")
    return param_name


def load_trainable(adapter_tensors):
    """-> (PeftModel in train mode, {file name: parameter}) with the LoRA tensors as the only trainable params."""
    with open(os.path.join(ADAPTER_DIR, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["lora_dropout"] == 0.0, f"lora_dropout is {cfg['lora_dropout']}"
    model = PeftModel.from_pretrained(load_base(), ADAPTER_DIR, is_trainable=True)
    assert model.peft_config["default"].lora_dropout == 0.0
    assert model.base_model.model.config.attention_dropout == 0.0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.0, f"{name}: dropout p={m.p}"
    model.train()  # deterministic: every dropout probability is 0

    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ".lora_A.default." in name or ".lora_B.default." in name, f"unexpected trainable {name}"
            params[file_name(name)] = p
    assert sorted(params) == sorted(adapter_tensors), (
        f"trainable parameter names differ from {ADAPTER_DIR}: "
        f"{sorted(set(params) ^ set(adapter_tensors))}")
    for k, p in params.items():
        assert p.dtype == torch.float32, (k, p.dtype)
        assert torch.equal(p.detach(), adapter_tensors[k]), f"{k}: loaded value differs from the adapter file"
    return model, params


def make_batch():
    T = sum(e["length"] for e in EXAMPLES)
    tokens = np.random.RandomState(TOKEN_SEED).randint(0, VOCAB, size=T).tolist()
    positions, labels, segments = [], [], []
    start = 0
    for e in EXAMPLES:
        n = e["length"]
        segments.append([start, n])
        for i in range(n):
            positions.append(i)
            nxt = i + 1
            labels.append(tokens[start + nxt] if nxt < n and nxt >= e["first_trained"] else IGNORE)
        start += n
    return dict(tokens=[int(t) for t in tokens], positions=positions, labels=labels, segments=segments)


def ce_sum(logits, labels):
    """Summed float32 cross-entropy of logits [T, V] against labels [T] (IGNORE skipped)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def separate_loss(model, batch):
    total = 0.0
    for start, n in batch["segments"]:
        ids = torch.tensor([batch["tokens"][start:start + n]], dtype=torch.long)
        pos = torch.arange(n, dtype=torch.long)[None]
        lab = torch.tensor(batch["labels"][start:start + n], dtype=torch.long)
        out = model(input_ids=ids, position_ids=pos, use_cache=False)
        total = total + ce_sum(out.logits[0], lab)
    return total


def packed_mask(segments, T, block_diagonal):
    """[1, 1, T, T] additive float32 mask: 0 where query t may attend key s, float32 min elsewhere."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for start, n in segments:
        for t in range(start, start + n):
            lo = start if block_diagonal else 0
            allowed[t, lo:t + 1] = True
    mask = torch.full((T, T), torch.finfo(torch.float32).min, dtype=torch.float32)
    mask[allowed] = 0.0
    return mask[None, None]


def packed_loss(model, batch, block_diagonal):
    T = len(batch["tokens"])
    ids = torch.tensor([batch["tokens"]], dtype=torch.long)
    pos = torch.tensor([batch["positions"]], dtype=torch.long)
    lab = torch.tensor(batch["labels"], dtype=torch.long)
    mask = packed_mask(batch["segments"], T, block_diagonal)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    return ce_sum(out.logits[0], lab)


def adamw_step(before, grads):
    """Independent float64 clip + first AdamW step: {name: f64 array} -> ({name: f64 array}, pre-clip norm)."""
    norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
    c = min(1.0, MAX_NORM / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient
    b1, b2 = BETAS
    out = {}
    for k, p in before.items():
        g = grads[k] * c
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        out[k] = p * (1 - LR * WEIGHT_DECAY) - LR * m_hat / (np.sqrt(v_hat) + EPS)
    return out, norm


def rel_err(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.write("\n")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)
    adapter_tensors = load_file(os.path.join(ADAPTER_DIR, "adapter_model.safetensors"))

    batch = make_batch()
    n_lab = sum(1 for x in batch["labels"] if x != IGNORE)
    assert n_lab == sum(e["length"] - e["first_trained"] for e in EXAMPLES), n_lab
    for start, n in batch["segments"]:
        assert batch["labels"][start + n - 1] == IGNORE

    # reference: separate forwards, one backward
    model, params = load_trainable(adapter_tensors)
    names = sorted(params)
    loss = separate_loss(model, batch) / n_lab
    loss.backward()
    grads = {}
    for k in names:
        g = params[k].grad
        assert g is not None, f"{k}: no gradient"
        assert bool(torch.isfinite(g).all()), f"{k}: non-finite gradient"
        assert float(g.abs().max()) > 0.0, f"{k}: all-zero gradient"
        grads[k] = g.detach().clone().contiguous()

    # one optimizer step
    plist = [params[k] for k in names]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(plist, max_norm=MAX_NORM))
    assert grad_norm > MAX_NORM, f"clipping inactive: grad_norm {grad_norm} <= {MAX_NORM}"
    opt = torch.optim.AdamW(plist, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    opt.step()
    after = {k: params[k].detach().clone().contiguous() for k in names}
    for k in names:
        assert not torch.equal(after[k], adapter_tensors[k]), f"{k}: unchanged by the step"
    step_delta = max(float((after[k] - adapter_tensors[k]).abs().max()) for k in names)

    # packed single forward with a custom 4-D block-diagonal mask must give the same loss and gradients
    pmodel, pparams = load_trainable(adapter_tensors)
    ploss = packed_loss(pmodel, batch, block_diagonal=True) / n_lab
    ploss.backward()
    diff_loss = abs(ploss.item() - loss.item())
    assert diff_loss <= PACKED_LOSS_TOL, f"packed loss {ploss.item()} vs separate {loss.item()}: {diff_loss}"
    worst_grad = 0.0
    for k in names:
        g = pparams[k].grad
        rel = float((g - grads[k]).abs().max()) / float(grads[k].abs().max())
        worst_grad = max(worst_grad, rel)
    assert worst_grad <= PACKED_GRAD_RTOL, f"packed gradients differ (max relative {worst_grad})"
    with torch.no_grad():
        closs = float(packed_loss(pmodel, batch, block_diagonal=False) / n_lab)
    assert abs(closs - loss.item()) > MIN_MASK_EFFECT, f"plain causal mask gives the same loss ({closs})"

    # the optimizer step, redone in float64 from the reference gradients, reproduces after_step.safetensors
    def f64(d):
        return {k: d[k].detach().double().numpy() for k in names}

    before64, grads64, after64 = f64(adapter_tensors), f64(grads), f64(after)
    manual, manual_norm = adamw_step(before64, grads64)
    diff_manual = max(float(np.abs(manual[k] - after64[k]).max()) for k in names)
    assert diff_manual <= 1e-6, f"float64 AdamW from the reference gradients differs by {diff_manual}"
    assert abs(manual_norm - grad_norm) <= 1e-5 * grad_norm, (manual_norm, grad_norm)
    # ... and from the packed-forward gradients (a second, equally valid float32 computation) it passes the README
    # rule: per-tensor relative error <= TEST_RTOL outside the elements with a tiny reference gradient, where Adam's
    # first step g / (|g| + eps) depends on float32 noise
    from_packed, _ = adamw_step(before64, f64({k: pparams[k].grad for k in names}))
    worst_packed_step, n_tiny = 0.0, 0
    for k in names:
        keep = np.abs(grads64[k]) >= TINY_GRAD * np.abs(grads64[k]).max()
        n_tiny += int((~keep).sum())
        err = float(np.abs(from_packed[k] - after64[k])[keep].max() / np.abs(after64[k]).max())
        worst_packed_step = max(worst_packed_step, err)
    assert worst_packed_step <= TEST_RTOL, f"step from packed gradients is off by {worst_packed_step}"
    n_elems = sum(v.numel() for v in grads.values())
    # for the README: how much clipping changes the step (Adam's first step is nearly scale-invariant)
    unclipped = {k: before64[k] * (1 - LR * WEIGHT_DECAY) - LR * grads64[k] / (np.abs(grads64[k]) + EPS)
                 for k in names}
    clip_effect = max(rel_err(unclipped[k], after64[k]) for k in names)
    clip_effect_kept = max(
        float(np.abs(unclipped[k] - after64[k])[np.abs(grads64[k]) >= TINY_GRAD * np.abs(grads64[k]).max()].max()
              / np.abs(after64[k]).max()) for k in names)
    assert clip_effect_kept > TEST_RTOL, f"a step without clipping is within tolerance ({clip_effect_kept})"

    # write
    write_json(os.path.join(OUT_DIR, "batch.json"), batch)
    save_file(grads, os.path.join(OUT_DIR, "grads.safetensors"), metadata={"format": "pt"})
    save_file(after, os.path.join(OUT_DIR, "after_step.safetensors"), metadata={"format": "pt"})
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    ref = {
        "loss": loss.item(), "grad_norm": grad_norm, "max_norm": MAX_NORM, "lr": LR, "betas": list(BETAS),
        "eps": EPS, "weight_decay": WEIGHT_DECAY, "labelled_tokens": n_lab, "versions": versions,
    }
    with open(os.path.join(OUT_DIR, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
        f.write("\n")

    print(f"batch: T={len(batch['tokens'])} segments={batch['segments']} labelled={n_lab}")
    print(f"loss = {loss.item():.9g}   grad_norm (pre-clip) = {grad_norm:.9g}   max_norm = {MAX_NORM}")
    print(f"packed 4-D mask: loss {ploss.item():.9g} (|diff| {diff_loss:.1e}), grads max rel diff {worst_grad:.1e};"
          f" plain causal mask loss {closs:.9g}")
    print(f"AdamW step: max |after - before| = {step_delta:.3e}; float64 re-derivation max diff {diff_manual:.1e};"
          f" from packed gradients max rel err {worst_packed_step:.1e} excluding {n_tiny}/{n_elems} tiny-gradient"
          f" elements; a step without clipping is off by {clip_effect:.1e} ({clip_effect_kept:.1e} without those)")
    print(f"{len(names)} tensors:")
    for k in names:
        print(f"  {k:70s} {list(grads[k].shape)}  |g|max {float(grads[k].abs().max()):.3e}")
    print("\nversions:", json.dumps({**versions, "numpy": np.__version__, "safetensors": safetensors.__version__,
                                     "python": sys.version.split()[0]}))
    total = 0
    for fn in sorted(os.listdir(OUT_DIR)):
        p = os.path.join(OUT_DIR, fn)
        if not os.path.isfile(p):
            continue
        total += os.path.getsize(p)
        print(f"  {os.path.getsize(p):8d}  {p}")
    print(f"total {total / 1024:.1f} KiB")




# ---------------------------------------------------------------------------------------------------------------------
# Mixture-of-experts case: a fresh attention-only LoRA on two tiny Qwen3-MoE fixtures -> tests/finetune/moe/<model>/
# ---------------------------------------------------------------------------------------------------------------------

MOE_OUT_DIR = "tests/finetune/moe"
MOE_TARGETS = ["k_proj", "o_proj", "q_proj", "v_proj"]  # attention projections only; the experts stay frozen
MOE_R = 4
MOE_ALPHA = 8
MOE_CASES = [
    # expect: the config values the fixture must have (the case exists to cover exactly these)
    dict(name="moe_norm_topk", base="tests/fixtures/moe_norm_topk", seed=301,
         expect=dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                     mlp_only_layers=[], tie_word_embeddings=False),
         sparse_layers=[0, 1]),
    dict(name="moe_nonorm_mlponly", base="tests/fixtures/moe_nonorm_mlponly", seed=302,
         expect=dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, num_hidden_layers=3,
                     mlp_only_layers=[1], tie_word_embeddings=True),
         sparse_layers=[0, 2]),
]
MOE_MIN_DETACH_EFFECT = 1e-2  # layer-0 gradients without the MoE blocks' backward must be off by more than this
BASE_LOGITS_TOL = 1e-5
MIN_ROUTING_GAP = 1e-5  # smallest allowed gap between the k-th and (k+1)-th routing probability of a token
#                         (float32 noise in those probabilities is ~1e-7)


def load_moe_base(base_dir):
    kw = {"attn_implementation": "eager", "experts_implementation": "eager"}
    kw["dtype" if TF_MAJOR >= 5 else "torch_dtype"] = torch.float32
    model, info = Qwen3MoeForCausalLM.from_pretrained(base_dir, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{base_dir}: base load: {bad}"
    return model


def write_moe_adapter(case, adapter_dir):
    """Fresh PEFT LoRA (attention only, non-zero A and B) saved with save_pretrained -> {file name: tensor}."""
    cfg = LoraConfig(r=MOE_R, lora_alpha=MOE_ALPHA, target_modules=list(MOE_TARGETS), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_moe_base(case["base"]), cfg)
    g = torch.Generator().manual_seed(case["seed"])
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
    n_layers = case["expect"]["num_hidden_layers"]
    assert n_set == 2 * n_layers * len(MOE_TARGETS), n_set
    for name, p in params.items():
        if p.requires_grad:
            assert ".self_attn." in name and (".lora_A." in name or ".lora_B." in name), f"unexpected trainable {name}"
    model.peft_config["default"].base_model_name_or_path = case["base"]

    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)
    card = os.path.join(adapter_dir, "README.md")  # PEFT's template model card: no data a loader needs
    if os.path.exists(card):
        os.remove(card)
    cpath = os.path.join(adapter_dir, "adapter_config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["target_modules"] = sorted(c["target_modules"])  # PEFT writes a set in hash order
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    files = sorted(os.listdir(adapter_dir))
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    assert c["base_model_name_or_path"] == case["base"] and c["target_modules"] == MOE_TARGETS, c
    assert c["r"] == MOE_R and c["lora_alpha"] == MOE_ALPHA and c["lora_dropout"] == 0.0, c

    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert len(saved) == n_set, (len(saved), n_set)
    for k, v in saved.items():
        assert torch.equal(params[k.replace(".lora_A.weight", ".lora_A.default.weight")
                                  .replace(".lora_B.weight", ".lora_B.default.weight")].detach(), v), k
    return saved


def load_moe_trainable(case, adapter_dir, adapter_tensors):
    """-> (PeftModel in train mode, {file name: parameter}) reloaded from the saved adapter, LoRA the only trainables."""
    model = PeftModel.from_pretrained(load_moe_base(case["base"]), adapter_dir, is_trainable=True)
    cfg = model.base_model.model.config
    assert model.peft_config["default"].lora_dropout == 0.0
    assert cfg.attention_dropout == 0.0
    assert cfg.output_router_logits is False, "config would add the router aux loss"
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.0, f"{name}: dropout p={m.p}"
    model.train()
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ".lora_A.default." in name or ".lora_B.default." in name, f"unexpected trainable {name}"
            params[file_name(name)] = p
    assert sorted(params) == sorted(adapter_tensors), sorted(set(params) ^ set(adapter_tensors))
    for k, p in params.items():
        assert p.dtype == torch.float32, (k, p.dtype)
        assert torch.equal(p.detach(), adapter_tensors[k]), f"{k}: loaded value differs from the adapter file"
    return model, params


def moe_separate_loss(model, batch, with_aux=False):
    """Summed CE over both examples (separate forwards); router logits never requested, so no aux loss inside.
    with_aux: also return the sum over the examples of router_aux_loss_coef * aux_loss (for the report only)."""
    total, aux_total = 0.0, 0.0
    for start, n in batch["segments"]:
        ids = torch.tensor([batch["tokens"][start:start + n]], dtype=torch.long)
        pos = torch.arange(n, dtype=torch.long)[None]
        lab = torch.tensor(batch["labels"][start:start + n], dtype=torch.long)
        out = model(input_ids=ids, position_ids=pos, use_cache=False, output_router_logits=with_aux)
        if with_aux:
            assert out.aux_loss is not None
            aux_total = aux_total + model.base_model.model.router_aux_loss_coef * out.aux_loss
        else:
            assert out.aux_loss is None, "router aux loss computed although output_router_logits=False"
            assert out.loss is None
        total = total + ce_sum(out.logits[0], lab)
    return (total, aux_total) if with_aux else total


def moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab, detach_input_of=None, packed=False, with_aux=False,
              gaps=None):
    """-> (loss float, {file name: grad}, aux term or None); detach_input_of: module class whose input is detached in
    forward (cuts the backward through those modules; the residual path is untouched). gaps: a list that receives,
    per router call, the smallest gap between the k-th and (k+1)-th largest routing probability over its tokens."""
    model, params = load_moe_trainable(case, adapter_dir, adapter_tensors)
    if gaps is not None:
        def record_gap(mod, args, out):
            probs = torch.softmax(out[0].detach().double(), dim=-1).sort(dim=-1, descending=True).values
            gaps.append(float((probs[:, mod.top_k - 1] - probs[:, mod.top_k]).min()))
        for m in model.modules():
            if isinstance(m, Qwen3MoeTopKRouter):
                m.register_forward_hook(record_gap)
    n_hooked = 0
    if detach_input_of is not None:
        for m in model.modules():
            if isinstance(m, detach_input_of):
                m.register_forward_pre_hook(lambda mod, args: (args[0].detach(),) + tuple(args[1:]))
                n_hooked += 1
        assert n_hooked == len(case["sparse_layers"]), n_hooked
    if packed:
        loss = packed_loss(model, batch, block_diagonal=True) / n_lab
        aux = None
    elif with_aux:
        ce, aux = moe_separate_loss(model, batch, with_aux=True)
        loss = ce / n_lab + aux / len(batch["segments"])
    else:
        loss = moe_separate_loss(model, batch) / n_lab
        aux = None
    loss.backward()
    grads = {}
    for k in sorted(params):
        g = params[k].grad
        assert g is not None, f"{k}: no gradient"
        grads[k] = g.detach().clone().contiguous()
    return loss.item(), grads, (float(aux.detach()) if aux is not None else None)


def grad_rel(a, ref):
    return float((a - ref).abs().max()) / float(ref.abs().max())


def moe_case(case, batch, n_lab, versions):
    out_dir = os.path.join(MOE_OUT_DIR, case["name"])
    adapter_dir = os.path.join(out_dir, "adapter")
    os.makedirs(out_dir, exist_ok=True)

    # the base fixture is what it should be, and loads exactly (logits.npy of the fixture)
    base = load_moe_base(case["base"])
    cfg = base.config
    for k, v in case["expect"].items():
        assert getattr(cfg, k) == v, f"{case['name']}: config {k} = {getattr(cfg, k)}, expected {v}"
    assert cfg.output_router_logits is False
    kinds = [type(layer.mlp) for layer in base.model.layers]
    assert [i for i, t in enumerate(kinds) if t is Qwen3MoeSparseMoeBlock] == case["sparse_layers"], kinds
    with open(os.path.join(case["base"], "tokens.json")) as f:
        ids = json.load(f)["tokens"]
    with torch.no_grad():
        lg = base(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None], use_cache=False).logits
    diff_base = float(np.abs(lg[0].numpy() - np.load(os.path.join(case["base"], "logits.npy"))).max())
    assert diff_base <= BASE_LOGITS_TOL, f"{case['name']}: base logits differ from the fixture by {diff_base}"
    del base

    adapter_tensors = write_moe_adapter(case, adapter_dir)
    names = sorted(adapter_tensors)

    # reference: separate forwards, plain CE from the logits (no router aux loss), one backward
    gaps = []
    loss, grads, _ = moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab, gaps=gaps)
    assert len(gaps) == len(case["sparse_layers"]) * len(batch["segments"]), gaps
    # top-k selection is not near a tie anywhere, so float32 rounding in another implementation picks the same experts
    assert min(gaps) > MIN_ROUTING_GAP, f"near-tie in expert selection: probability gap {min(gaps)}"
    for k in names:
        g = grads[k]
        assert bool(torch.isfinite(g).all()), f"{k}: non-finite gradient"
        assert float(g.abs().max()) > 0.0, f"{k}: all-zero gradient"

    layer0 = [k for k in names if ".layers.0.self_attn." in k]
    assert len(layer0) == 2 * len(MOE_TARGETS), layer0

    # the gradient really goes through the MoE blocks' backward: detach each sparse block's input (the residual
    # path stays) -> same loss, clearly different layer-0 gradients (every layer-0 tensor)
    loss_d, grads_d, _ = moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab,
                                   detach_input_of=Qwen3MoeSparseMoeBlock)
    assert loss_d == loss, f"detaching changed the forward ({loss_d} vs {loss})"
    detach_eff = {k: grad_rel(grads_d[k], grads[k]) for k in layer0}
    assert min(detach_eff.values()) > MOE_MIN_DETACH_EFFECT, f"MoE backward barely matters: {detach_eff}"
    # ... and, for the report, the part that goes back through the routing weights only (router input detached)
    loss_r, grads_r, _ = moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab, detach_input_of=Qwen3MoeTopKRouter)
    assert loss_r == loss, f"detaching the router input changed the forward ({loss_r} vs {loss})"
    router_eff = {k: grad_rel(grads_r[k], grads[k]) for k in layer0}
    router_eff_all = max(grad_rel(grads_r[k], grads[k]) for k in names)

    # packed single forward with the block-diagonal mask gives the same loss and gradients (as in the dense case)
    loss_p, grads_p, _ = moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab, packed=True)
    diff_packed_loss = abs(loss_p - loss)
    worst_packed = max(grad_rel(grads_p[k], grads[k]) for k in names)
    assert diff_packed_loss <= PACKED_LOSS_TOL, f"packed loss {loss_p} vs {loss}"
    assert worst_packed <= PACKED_GRAD_RTOL, f"packed gradients differ by {worst_packed}"

    # for the report: what adding router_aux_loss_coef * aux_loss (mean over the two examples) would change
    loss_aux, grads_aux, aux = moe_grads(case, adapter_dir, adapter_tensors, batch, n_lab, with_aux=True)
    aux_grad_eff = max(grad_rel(grads_aux[k], grads[k]) for k in names)

    # write
    write_json(os.path.join(out_dir, "batch.json"), batch)
    save_file(grads, os.path.join(out_dir, "grads.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump({"loss": loss, "labelled_tokens": n_lab, "versions": versions}, f, indent=2)
        f.write("\n")

    print(f"\n{case['name']}: experts={cfg.num_experts} top_k={cfg.num_experts_per_tok} "
          f"norm_topk_prob={cfg.norm_topk_prob} layers={cfg.num_hidden_layers} sparse={case['sparse_layers']} "
          f"tied={cfg.tie_word_embeddings}  base logits vs fixture max diff {diff_base:.1e}")
    print(f"  loss = {loss:.9g}  labelled = {n_lab}  ({len(names)} tensors, "
          f"{sum(v.numel() for v in grads.values())} elements)  smallest top-k routing probability gap {min(gaps):.2e}")
    print(f"  MoE blocks' input detached: loss {loss_d:.9g} (same), layer-0 grads rel diff "
          + ", ".join(f"{k.split('layers.0.self_attn.')[1].replace('.weight', '')} {v:.3f}"
                      for k, v in detach_eff.items()))
    print(f"  router input detached: layer-0 rel diff min {min(router_eff.values()):.2e} "
          f"max {max(router_eff.values()):.2e}; all tensors max {router_eff_all:.2e}")
    print(f"  packed 4-D mask: loss |diff| {diff_packed_loss:.1e}, grads max rel diff {worst_packed:.1e}")
    print(f"  with router aux loss (coef {cfg.router_aux_loss_coef} x aux, mean over examples = {aux:.6g}): "
          f"loss {loss_aux:.9g}, grads max rel diff {aux_grad_eff:.2e}  (NOT in the reference)")
    for k in names:
        print(f"    {k:70s} {list(grads[k].shape)}  |g|max {float(grads[k].abs().max()):.3e}")
    for root, _, fns in sorted(os.walk(out_dir)):
        for fn in sorted(fns):
            p = os.path.join(root, fn)
            print(f"  {os.path.getsize(p):8d}  {p}")


def moe_main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch = make_batch()
    n_lab = sum(1 for x in batch["labels"] if x != IGNORE)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for case in MOE_CASES:
        moe_case(case, batch, n_lab, versions)


if __name__ == "__main__":
    main()
    moe_main()
