#!/usr/bin/env python3
"""Build tiny random-weight Qwen3 / Qwen3-MoE checkpoints plus transformers' reference logits.

    python3 python/make_fixtures.py --out tests/fixtures

Each fixture directory gets:
    config.json                      hand-written HF config (Hub/transformers-4 layout, or transformers-5 layout)
    model.safetensors                weights with the Hub tensor names (per-expert MoE tensors), or
    model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json   for the sharded fixture
    tokens.json                      {"tokens": [...]}
    logits.npy                       float32 [T, vocab] logits from transformers (fp32 model, eager attention,
                                     one forward over the whole sequence, position ids 0..T-1, no cache)
and the output directory gets MANIFEST.json (fixture list, versions, notes on the reference semantics).

Checks done for every fixture (the script aborts if one fails):
  * reference logits come from AutoModelForCausalLM.from_pretrained(<fixture dir>) -- so the files on disk,
    their tensor names and the config layout are what is exercised; loading must report no missing /
    unexpected / mismatched keys, and every loaded parameter must equal the stored value (upcast to f32);
  * an in-memory model built from the config object with the state dict loaded by hand gives identical logits;
  * an independent float64 numpy implementation of Qwen3 (written from the notes in MANIFEST.json) agrees;
  * MoE: for every token and sparse layer the gap between the k-th and (k+1)-th router probability is > 1e-3
    (otherwise the router weights are redrawn with the next seed).

Deterministic: all random draws use per-fixture torch.Generator seeds on the CPU.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

import safetensors
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

TF_VERSION = transformers.__version__
TF_MAJOR = int(TF_VERSION.split(".")[0])
HUB_LAYOUT_VERSION = "4.51.0"  # the configs on the Hub (and /work/shared/qwen3/configs) were written by 4.51.0
HF5_LAYOUT_VERSION = TF_VERSION if TF_MAJOR >= 5 else "5.0.0"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROUTER_GAP_MIN = 1e-3

# --------------------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------------------
BASE = dict(
    vocab=512, hidden=64, inter=96, eps=1e-6, max_pos=4096, theta=10000, T=40,
    layers=2, heads=4, kv=2, head_dim=32, tied=False, dtype="bfloat16", rope=None,
    layout="hub", shards=1, moe=False,
)


def spec(**kw):
    s = dict(BASE)
    s.update(kw)
    return s


FIXTURES = [
    spec(name="dense_tied_gqa4", seed=101, layers=3, heads=8, kv=2, head_dim=32, tied=True,
         desc="Qwen3 dense, 3 layers, 8 q heads / 2 kv heads (GQA 4x), head_dim 32 != hidden/heads, tied "
              "embeddings (no lm_head.weight), bf16, hub config layout"),
    spec(name="dense_untied_gqa2", seed=102, layers=2, heads=4, kv=2, head_dim=24, theta=1000000, T=70,
         desc="Qwen3 dense, 2 layers, 4 q / 2 kv heads, head_dim 24, untied lm_head, rope_theta 1e6, T=70, bf16"),
    spec(name="dense_gqa8_yarn", seed=103, layers=2, heads=8, kv=1, head_dim=16, max_pos=128, T=100,
         rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
         desc="Qwen3 dense, 8 q / 1 kv head (GQA 8x), head_dim 16, YaRN via hub-style rope_scaling "
              "(factor 4, original_max_position_embeddings 32, max_position_embeddings 128), T=100 so positions "
              "pass the original length, untied, bf16"),
    spec(name="moe_norm_topk", seed=104, moe=True, layers=2, heads=4, kv=2, head_dim=32,
         experts=8, topk=2, norm_topk=True, moe_inter=48, sparse_step=1, mlp_only=[],
         desc="Qwen3-MoE, 2 layers both sparse, 8 experts top-2, norm_topk_prob true, moe_intermediate 48, "
              "untied, bf16, per-expert tensors"),
    spec(name="moe_nonorm_mlponly", seed=105, moe=True, layers=3, heads=4, kv=2, head_dim=32, tied=True,
         experts=8, topk=3, norm_topk=False, moe_inter=48, sparse_step=1, mlp_only=[1],
         desc="Qwen3-MoE, 3 layers, 8 experts top-3, norm_topk_prob false (raw softmax probs as weights), "
              "mlp_only_layers [1] (layer 1 dense MLP, intermediate 96), tied, bf16"),
    spec(name="moe_sparse_step2", seed=106, moe=True, layers=3, heads=4, kv=2, head_dim=16,
         experts=6, topk=2, norm_topk=True, moe_inter=48, sparse_step=2, mlp_only=[],
         desc="Qwen3-MoE, 3 layers, decoder_sparse_step 2 (only layer 1 is sparse; layers 0 and 2 dense MLP), "
              "6 experts top-2, norm true, untied, bf16"),
    spec(name="dense_f16", seed=107, layers=2, heads=8, kv=2, head_dim=32, tied=True, dtype="float16",
         desc="like dense_tied_gqa4 (2 layers) but weights stored as float16"),
    spec(name="dense_f32", seed=108, layers=2, heads=4, kv=2, head_dim=24, theta=1000000, T=70, dtype="float32",
         desc="like dense_untied_gqa2 but weights stored as float32"),
    spec(name="dense_sharded", seed=109, layers=2, heads=4, kv=2, head_dim=24, theta=1000000, T=70, shards=2,
         desc="like dense_untied_gqa2, bf16, split in 2 safetensors shards with model.safetensors.index.json"),
    spec(name="dense_hf5_layout", seed=110, layout="hf5", layers=2, heads=4, kv=1, head_dim=32, max_pos=128,
         T=100, rope={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
         desc="Qwen3 dense with a transformers-5 layout config (rope_parameters with YaRN factor 2 / original 64, "
              "max_position_embeddings 128, dtype, layer_types), 4 q / 1 kv heads, head_dim 32, T=100, untied, bf16"),
    spec(name="moe_hf5_layout", seed=111, layout="hf5", moe=True, layers=2, heads=4, kv=2, head_dim=16,
         theta=1000000, experts=8, topk=2, norm_topk=True, moe_inter=48, sparse_step=1, mlp_only=[],
         desc="Qwen3-MoE with a transformers-5 layout config (rope_parameters default/theta 1e6, "
              "num_local_experts, dtype), 8 experts top-2, norm true, untied, bf16, per-expert tensors"),
]


def is_sparse(s, i):
    """Transformers' rule (Qwen3MoeDecoderLayer.__init__)."""
    return (s["moe"] and i not in s["mlp_only"] and s["experts"] > 0
            and (i + 1) % s["sparse_step"] == 0)


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------
def make_config(s):
    moe = s["moe"]
    c = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["inter"],
        "max_position_embeddings": s["max_pos"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv"],
        "rms_norm_eps": s["eps"],
        "sliding_window": None,
        "tie_word_embeddings": s["tied"],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s["vocab"],
    }
    if moe:
        c.update({
            "decoder_sparse_step": s["sparse_step"],
            "mlp_only_layers": list(s["mlp_only"]),
            "moe_intermediate_size": s["moe_inter"],
            "norm_topk_prob": s["norm_topk"],
            "num_experts_per_tok": s["topk"],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        })
    if s["layout"] == "hub":
        # transformers 4.5x layout, as in the Hub's Qwen3 config.json files
        c["max_window_layers"] = s["layers"]
        c["rope_scaling"] = dict(s["rope"]) if s["rope"] else None
        c["rope_theta"] = s["theta"]
        c["torch_dtype"] = s["dtype"]
        c["transformers_version"] = HUB_LAYOUT_VERSION
        if moe:
            c["num_experts"] = s["experts"]
    elif s["layout"] == "hf5":
        # transformers 5 layout (what Qwen3Config / Qwen3MoeConfig.to_dict() write in 5.x)
        rp = {"rope_theta": float(s["theta"]), "rope_type": "default"}
        if s["rope"]:
            rp = dict(s["rope"])
            rp["rope_theta"] = float(s["theta"])
        c["rope_parameters"] = dict(sorted(rp.items()))
        c["dtype"] = s["dtype"]
        c["pad_token_id"] = None
        c["transformers_version"] = HF5_LAYOUT_VERSION
        if moe:
            c["num_local_experts"] = s["experts"]
        else:
            c["layer_types"] = ["full_attention"] * s["layers"]
            c["max_window_layers"] = s["layers"]
    else:
        raise ValueError(s["layout"])
    return dict(sorted(c.items()))


# --------------------------------------------------------------------------------------------------
# weights (Hub tensor names, per-expert MoE layout)
# --------------------------------------------------------------------------------------------------
def router_weight(s, layer, attempt):
    """MoE router weight of one layer; redrawn (attempt + 1) when top-k choices are not well separated."""
    g = torch.Generator().manual_seed(s["seed"] * 100000 + layer * 1000 + attempt)
    w = torch.randn((s["experts"], s["hidden"]), generator=g, dtype=torch.float32) * (3.0 * s["hidden"] ** -0.5)
    return w.to(DTYPES[s["dtype"]]).contiguous()


def build_state_dict(s, router_attempts):
    g = torch.Generator().manual_seed(s["seed"])
    H, hd, nh, nkv, I, V = s["hidden"], s["head_dim"], s["heads"], s["kv"], s["inter"], s["vocab"]

    def normal(shape, std, gen=g):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def norm_w(n):
        return 1.0 + 0.1 * normal((n,), 1.0)

    sd = {"model.embed_tokens.weight": normal((V, H), 1.0)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_w(H)
        sd[p + "self_attn.q_proj.weight"] = normal((nh * hd, H), H ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        sd[p + "self_attn.o_proj.weight"] = normal((H, nh * hd), (nh * hd) ** -0.5)
        sd[p + "self_attn.q_norm.weight"] = norm_w(hd)
        sd[p + "self_attn.k_norm.weight"] = norm_w(hd)
        sd[p + "post_attention_layernorm.weight"] = norm_w(H)
        if is_sparse(s, i):
            E, MI = s["experts"], s["moe_inter"]
            sd[p + "mlp.gate.weight"] = router_weight(s, i, router_attempts[i])
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                sd[q + "gate_proj.weight"] = normal((MI, H), H ** -0.5)
                sd[q + "up_proj.weight"] = normal((MI, H), H ** -0.5)
                sd[q + "down_proj.weight"] = normal((H, MI), MI ** -0.5)
        else:
            sd[p + "mlp.gate_proj.weight"] = normal((I, H), H ** -0.5)
            sd[p + "mlp.up_proj.weight"] = normal((I, H), H ** -0.5)
            sd[p + "mlp.down_proj.weight"] = normal((H, I), I ** -0.5)
    sd["model.norm.weight"] = norm_w(H)
    if not s["tied"]:
        sd["lm_head.weight"] = normal((V, H), H ** -0.5)
    dt = DTYPES[s["dtype"]]
    return {k: v.to(dt).contiguous() for k, v in sd.items()}


def make_tokens(s):
    g = torch.Generator().manual_seed(s["seed"] * 7919 + 17)
    return torch.randint(0, s["vocab"], (s["T"],), generator=g).tolist()


def write_weights(out_dir, s, sd):
    meta = {"format": "pt"}
    if s["shards"] == 1:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    n = s["shards"]
    names = list(sd.keys())
    # shard 1: embeddings + first half of the layers; shard 2: the rest (like HF's size-based sharding)
    L = s["layers"]
    first = [k for k in names if k.startswith("model.embed_tokens")
             or any(k.startswith(f"model.layers.{i}.") for i in range((L + 1) // 2))]
    groups = [first, [k for k in names if k not in first]]
    assert n == 2
    files, weight_map, total = [], {}, 0
    for j, grp in enumerate(groups):
        fn = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in grp}, os.path.join(out_dir, fn), metadata=meta)
        files.append(fn)
        for k in grp:
            weight_map[k] = fn
            total += sd[k].numel() * sd[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return files + ["model.safetensors.index.json"]


def read_weights(out_dir):
    idx = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        sd = {}
        for fn in sorted(set(wm.values())):
            sd.update(load_file(os.path.join(out_dir, fn)))
        assert set(sd) == set(wm), "index weight_map does not match shard contents"
        return sd
    return load_file(os.path.join(out_dir, "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------
def _model_kwargs():
    kw = {"attn_implementation": "eager"}
    kw["dtype" if TF_MAJOR >= 5 else "torch_dtype"] = torch.float32
    if TF_MAJOR >= 5:
        kw["experts_implementation"] = "eager"
    return kw


def to_model_state_dict(model, sd):
    """Map Hub tensor names onto this transformers version's module parameters (fusing experts if needed)."""
    msd_keys = set(model.state_dict().keys())
    out = {}
    fused = {}
    for k, v in sd.items():
        v = v.to(torch.float32)
        if ".mlp.experts." in k and k not in msd_keys:
            # Hub: model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
            pre, rest = k.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            fused.setdefault(pre, {}).setdefault(proj, {})[int(e)] = v
        else:
            out[k] = v
    for pre, projs in fused.items():
        E = len(projs["gate_proj"])
        gate = torch.stack([projs["gate_proj"][e] for e in range(E)])
        up = torch.stack([projs["up_proj"][e] for e in range(E)])
        down = torch.stack([projs["down_proj"][e] for e in range(E)])
        # transformers 5 Qwen3MoeExperts: gate, up = linear(x, gate_up_proj[e]).chunk(2) -> gate rows first
        out[pre + ".mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[pre + ".mlp.experts.down_proj"] = down
    return out


def build_in_memory(fixture_dir, sd, tied):
    cfg = AutoConfig.from_pretrained(fixture_dir)
    model = AutoModelForCausalLM.from_config(cfg, **_model_kwargs()).eval()
    msd = to_model_state_dict(model, sd)
    missing, unexpected = model.load_state_dict(msd, strict=False)
    allowed_missing = {"lm_head.weight"} if tied else set()
    assert set(missing) <= allowed_missing, f"in-memory load: missing {missing}"
    assert not unexpected, f"in-memory load: unexpected {unexpected}"
    if tied:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "lm_head not tied"
    return model, msd


def forward(model, tokens, gate_hook=False):
    routers = []
    hooks = []
    if gate_hook:
        for name, mod in model.named_modules():
            if name.endswith(".mlp.gate"):
                def hook(_m, _inp, out, name=name):
                    logits = out[0] if isinstance(out, tuple) else out
                    routers.append((name, logits.detach().float().reshape(-1, logits.shape[-1])))
                hooks.append(mod.register_forward_hook(hook))
    ids = torch.tensor([tokens], dtype=torch.long)
    pos = torch.arange(len(tokens), dtype=torch.long)[None]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=False)
    for h in hooks:
        h.remove()
    return out.logits[0].float().numpy().astype("<f4"), routers


def router_gaps(routers, k):
    """-> (min over tokens/layers of p_k - p_{k+1}, min of the matching router-logit gap)."""
    pg, lg = [], []
    for _name, logits in routers:
        p = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
        l = logits.sort(dim=-1, descending=True).values
        pg.append((p[:, k - 1] - p[:, k]).min().item())
        lg.append((l[:, k - 1] - l[:, k]).min().item())
    return min(pg), min(lg)


# --------------------------------------------------------------------------------------------------
# independent float64 reference (mirrors the notes in MANIFEST.json)
# --------------------------------------------------------------------------------------------------
def rope_params(cfg):
    """-> (theta, rope dict or None) from either config layout."""
    rp = cfg.get("rope_parameters")
    if rp:
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        return float(theta), (None if rtype == "default" else dict(rp, rope_type=rtype))
    rs = cfg.get("rope_scaling")
    theta = float(cfg.get("rope_theta", 10000.0))
    if rs:
        rtype = rs.get("rope_type", rs.get("type", "default"))
        return theta, (None if rtype == "default" else dict(rs, rope_type=rtype))
    return theta, None


def np_inv_freq(cfg, dim):
    theta, rs = rope_params(cfg)
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    assert rs["rope_type"] == "yarn", rs
    orig = rs.get("original_max_position_embeddings", cfg["max_position_embeddings"])
    factor = rs.get("factor")
    if factor is None:
        factor = cfg["max_position_embeddings"] / orig
    af = rs.get("attention_factor")
    if af is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        gm = lambda sc, m=1.0: 1.0 if sc <= 1 else 0.1 * m * math.log(sc) + 1.0
        af = gm(factor, mscale) / gm(factor, mscale_all) if (mscale and mscale_all) else gm(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    corr = lambda rot: dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    return inv_inter * ramp + inv_extra * (1.0 - ramp), af


def np_reference(cfg, sd, tokens):
    w = lambda k: sd[k].to(torch.float64).numpy()
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    T = len(tokens)
    moe = cfg["model_type"] == "qwen3_moe"
    E = cfg.get("num_experts", cfg.get("num_local_experts", 0)) if moe else 0

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    silu = lambda x: x / (1.0 + np.exp(-x))
    inv_freq, af = np_inv_freq(cfg, hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb) * af, np.sin(emb) * af  # [T, hd]

    def rope(x):  # x: [heads, T, hd]; rotate_half (NeoX / non-interleaved)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w("model.embed_tokens.weight")[tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w(p + "input_layernorm.weight"))
        q = (h @ w(p + "self_attn.q_proj.weight").T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ w(p + "self_attn.k_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ w(p + "self_attn.v_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q = rope(rms(q, w(p + "self_attn.q_norm.weight")))
        k = rope(rms(k, w(p + "self_attn.k_norm.weight")))
        rep = nh // nkv
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)  # q head j uses kv head j // rep
        sc = q @ k.transpose(0, 2, 1) * hd ** -0.5 + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        a = (sc @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + a @ w(p + "self_attn.o_proj.weight").T
        h = rms(x, w(p + "post_attention_layernorm.weight"))
        sparse = (moe and i not in cfg.get("mlp_only_layers", []) and E > 0
                  and (i + 1) % cfg["decoder_sparse_step"] == 0)
        if sparse:
            logits = h @ w(p + "mlp.gate.weight").T
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            kk = cfg["num_experts_per_tok"]
            top = np.argsort(-pr, -1, kind="stable")[:, :kk]
            tw = np.take_along_axis(pr, top, -1)
            if cfg["norm_topk_prob"]:
                tw = tw / tw.sum(-1, keepdims=True)
            out = np.zeros_like(h)
            for t in range(T):
                for j in range(kk):
                    e = top[t, j]
                    q_ = f"{p}mlp.experts.{e}."
                    y = silu(h[t] @ w(q_ + "gate_proj.weight").T) * (h[t] @ w(q_ + "up_proj.weight").T)
                    out[t] += tw[t, j] * (y @ w(q_ + "down_proj.weight").T)
        else:
            y = silu(h @ w(p + "mlp.gate_proj.weight").T) * (h @ w(p + "mlp.up_proj.weight").T)
            out = y @ w(p + "mlp.down_proj.weight").T
        x = x + out
    x = rms(x, w("model.norm.weight"))
    head = w("lm_head.weight") if "lm_head.weight" in sd else w("model.embed_tokens.weight")
    return x @ head.T


# --------------------------------------------------------------------------------------------------
def make_fixture(root, s):
    d = os.path.join(root, s["name"])
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg = make_config(s)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    tokens = make_tokens(s)

    # draw weights; for MoE redraw each sparse layer's router (in layer order; a router only affects later
    # layers) until the k-th and (k+1)-th router probabilities are > ROUTER_GAP_MIN apart for every token
    sparse = [i for i in range(s["layers"]) if is_sparse(s, i)]
    attempts = {i: 0 for i in sparse}
    sd = build_state_dict(s, attempts)
    model, msd = build_in_memory(d, sd, s["tied"])
    for i in sparse:
        key = f"model.layers.{i}.mlp.gate.weight"
        while True:
            _, routers = forward(model, tokens, gate_hook=True)
            assert len(routers) == len(sparse), f"expected {len(sparse)} router calls, got {len(routers)}"
            name, rl = routers[sparse.index(i)]
            assert name == f"model.layers.{i}.mlp.gate", name
            if router_gaps([(name, rl)], s["topk"])[0] > ROUTER_GAP_MIN:
                break
            attempts[i] += 1
            assert attempts[i] < 2000, f"{s['name']}: could not draw a well separated router for layer {i}"
            sd[key] = router_weight(s, i, attempts[i])
            msd[key] = sd[key].to(torch.float32)
            with torch.no_grad():
                model.get_parameter(key).copy_(msd[key])
    logits_mem, routers = forward(model, tokens, gate_hook=s["moe"])
    gap = logit_gap = None
    if s["moe"]:
        gap, logit_gap = router_gaps(routers, s["topk"])
        assert gap > ROUTER_GAP_MIN
    # the redraw loop must be reproducible from the recorded attempts alone
    assert all(torch.equal(sd[k], v) for k, v in build_state_dict(s, attempts).items())

    files = write_weights(d, s, sd)
    with open(os.path.join(d, "tokens.json"), "w") as f:
        json.dump({"tokens": tokens}, f)
        f.write("\n")

    # reload everything from disk through transformers' own loader
    sd_disk = read_weights(d)
    assert set(sd_disk) == set(sd)
    for k in sd:
        assert sd_disk[k].dtype == DTYPES[s["dtype"]] and torch.equal(sd_disk[k], sd[k]), k
    loaded, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, **_model_kwargs())
    loaded.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{s['name']}: from_pretrained {key}: {info.get(key)}"
    lsd = loaded.state_dict()
    for k, v in msd.items():
        assert k in lsd, f"{s['name']}: {k} not in loaded model"
        assert lsd[k].dtype == torch.float32 and torch.equal(lsd[k], v), f"{s['name']}: {k} differs after load"
    if s["tied"]:
        assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    logits, _ = forward(loaded, tokens)
    assert logits.shape == (s["T"], s["vocab"])
    diff_mem = float(np.abs(logits - logits_mem).max())
    assert diff_mem <= 1e-5, f"{s['name']}: from_pretrained vs in-memory logits differ by {diff_mem}"
    np.save(os.path.join(d, "logits.npy"), logits)

    ref = np_reference(cfg, sd_disk, tokens)
    diff_np = float(np.abs(ref - logits).max())
    scale = float(np.abs(ref).max())
    assert diff_np <= 1e-4 * max(1.0, scale), f"{s['name']}: numpy reference differs by {diff_np} (scale {scale})"

    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    stats = {
        "logits_std": round(float(logits.std()), 4),
        "logits_absmax": round(float(np.abs(logits).max()), 4),
        "max_abs_diff_vs_float64_numpy_reference": float(f"{diff_np:.3g}"),
        "max_abs_diff_in_memory_vs_from_pretrained": float(f"{diff_mem:.3g}"),
    }
    if gap is not None:
        stats["min_router_prob_gap_k_vs_k+1"] = round(gap, 5)
        stats["min_router_logit_gap_k_vs_k+1"] = round(logit_gap, 5)
        stats["router_redraws_per_sparse_layer"] = {str(i): a for i, a in attempts.items()}
    print(f"{s['name']:22s} {size / 1024:7.1f} KiB  T={s['T']:3d}  logits std {stats['logits_std']:.3f}  "
          f"np-diff {diff_np:.2e}  mem-diff {diff_mem:.1e}" + (f"  router gap {gap:.4f}" if gap is not None else ""))

    entry = {
        "name": s["name"],
        "description": s["desc"],
        "architecture": cfg["architectures"][0],
        "config_layout": "transformers5" if s["layout"] == "hf5" else "hub (transformers 4.5x)",
        "weights_dtype": s["dtype"],
        "files": ["config.json"] + files + ["tokens.json", "logits.npy"],
        "seq_len": s["T"],
        "vocab_size": s["vocab"],
        "num_hidden_layers": s["layers"],
        "tie_word_embeddings": s["tied"],
        "seed": s["seed"],
        "bytes": size,
        "checks": stats,
    }
    if s["moe"]:
        entry["sparse_layers"] = [i for i in range(s["layers"]) if is_sparse(s, i)]
    return entry


NOTES = {
    "generation": (
        "Weights drawn in float32 from per-fixture torch.Generator seeds (embeddings N(0,1); projections "
        "N(0, 1/sqrt(fan_in)); norm weights 1+0.1*N(0,1); untied lm_head N(0,1/sqrt(hidden)); MoE router "
        "N(0, 3/sqrt(hidden)), a sparse layer's router redrawn with seed+1 until every token has p_k - p_{k+1} > 1e-3), then cast to the stored dtype. Configs are hand-written JSON in the stated layout "
        "(not save_pretrained output); hub-layout configs carry transformers_version 4.51.0 like the Hub files. "
        "logits.npy = transformers float32 logits of the stored (rounded) weights loaded into a float32 model "
        "with AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation='eager'"
        + (", experts_implementation='eager'" if TF_MAJOR >= 5 else "")
        + "), one forward over all T tokens, position_ids 0..T-1, use_cache=False. Both config layouts were "
        "loaded directly by from_pretrained (no in-memory fallback was needed). Each fixture was also checked "
        "against a float64 numpy re-implementation of these notes (max abs diffs under checks). "
        "Cross-version check (python3 python/make_fixtures.py --check tests/fixtures, run with transformers "
        "4.51.3 + the same torch): every hub-layout fixture loads with no missing/unexpected keys and reproduces "
        "logits.npy (dense: bit-exact; MoE: max abs diff 1.3e-5, summation order). transformers 4.51.3 can NOT "
        "read the two transformers-5 layout fixtures: it ignores rope_parameters (silently uses default RoPE with "
        "theta 10000) and num_local_experts (falls back to num_experts=128 -> size mismatch)."
    ),
    "rmsnorm": (
        "y = w * (x / sqrt(mean(x^2 over last dim) + eps)), computed in float32 (x cast to f32, normalized, "
        "cast back to the input dtype, then multiplied by w; no '1 + w' offset). Used for input_layernorm, "
        "post_attention_layernorm, model.norm (over hidden_size) and q_norm / k_norm (per head, over head_dim)."
    ),
    "attention": (
        "q = q_proj(x) viewed [T, n_heads, head_dim]; q_norm (RMSNorm over head_dim) is applied BEFORE RoPE; same "
        "for k with k_norm; v has no norm. head_dim comes from config.head_dim (may differ from hidden/heads). "
        "RoPE is rotate_half / NeoX style (non-interleaved): q*cos + rotate_half(q)*sin with rotate_half(x) = "
        "cat(-x[d/2:], x[:d/2]), cos/sin = cos/sin(pos * inv_freq) duplicated to [cos, cos] over head_dim, and "
        "multiplied by attention_scaling (1.0 unless YaRN). scores = q.k * head_dim^-0.5 + causal mask, softmax "
        "in float32. GQA: query head h uses kv head h // (n_heads / n_kv_heads). No biases "
        "(attention_bias false). MLP: down(silu(gate(x)) * up(x)). Pre-norm residual blocks; final model.norm then "
        "lm_head (= embed_tokens when tie_word_embeddings)."
    ),
    "rope_default": "inv_freq[i] = 1 / theta^(2i/head_dim), i = 0..head_dim/2-1 (computed in float32 by transformers).",
    "yarn": (
        "transformers " + TF_VERSION + " _compute_yarn_parameters: dim = head_dim (partial_rotary_factor 1); "
        "factor = rope['factor'] (only if factor is absent: max_position_embeddings / original_max_position_embeddings); "
        "orig = rope['original_max_position_embeddings'] (defaults to max_position_embeddings); "
        "attention_factor = rope.get('attention_factor') or, if mscale and mscale_all_dim given, "
        "get_mscale(factor, mscale)/get_mscale(factor, mscale_all_dim), else get_mscale(factor) = 0.1*ln(factor)+1 "
        "(1.0 if factor <= 1); beta_fast = rope.get('beta_fast') or 32; beta_slow = rope.get('beta_slow') or 1; "
        "pos_freqs = theta^(arange(0,dim,2)/dim); inv_extra = 1/pos_freqs; inv_inter = 1/(factor*pos_freqs); "
        "corr(r) = dim*ln(orig/(r*2*pi)) / (2*ln(theta)); low = corr(beta_fast), high = corr(beta_slow); "
        "if truncate (rope.get('truncate', True) -> default TRUE): low = floor(low), high = ceil(high); "
        "low = max(low, 0), high = min(high, dim-1); if low == high: high += 0.001; "
        "ramp[i] = clamp((i - low)/(high - low), 0, 1) for i in 0..dim/2-1; extrapolation_factor = 1 - ramp; "
        "inv_freq = inv_inter*(1 - extrapolation_factor) + inv_extra*extrapolation_factor "
        "(= inv_inter*ramp + inv_extra*(1-ramp): low i (high frequency) keep the original frequency). "
        "cos and sin are both multiplied by attention_factor (so q.k scores get attention_factor^2). "
        "inv_freq is static (no dependence on sequence length; positions beyond orig use the same frequencies). "
        "dense_gqa8_yarn: dim 16, theta 1e4, orig 32, factor 4 -> low 0, high 2, attention_factor 1.138629. "
        "dense_hf5_layout: dim 32, theta 1e4, orig 64, factor 2 -> low 0, high 5, attention_factor 1.069315. "
        "transformers 4.x difference: 4.x ALWAYS overrides factor = max_position_embeddings / "
        "original_max_position_embeddings when original_max_position_embeddings is present in rope_scaling "
        "(also for attention_factor); 4.x (<=4.54) has no 'truncate' key (always floor/ceil). The fixtures set "
        "factor == max_position_embeddings / original_max_position_embeddings so both rules give the same result "
        "(note: a Qwen3 config with factor 4, original 32768, max_position_embeddings 40960 gives factor 4 in 5.x "
        "but 1.25 in 4.x). The fixtures leave beta_fast/beta_slow/attention_factor/mscale/truncate unset (defaults)."
    ),
    "moe": (
        "Sparse-layer rule (Qwen3MoeDecoderLayer): layer i uses the sparse MoE block iff "
        "i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0; otherwise a dense "
        "MLP with intermediate_size (tensor names mlp.gate_proj/up_proj/down_proj). Routing: router_logits = "
        "x @ mlp.gate.weight.T ([num_experts, hidden], no bias); probs = softmax(router_logits) in float32 over "
        "ALL experts; top-k (k = num_experts_per_tok) by probability; if norm_topk_prob: weights = topk_probs / "
        "sum(topk_probs), else the raw softmax probabilities; out = sum_j w_j * down_j(silu(gate_j(x)) * up_j(x)). "
        "No shared expert. Checkpoint tensor names (Hub, per expert): model.layers.{i}.mlp.gate.weight [E, hidden], "
        "model.layers.{i}.mlp.experts.{e}.gate_proj.weight [moe_intermediate, hidden], "
        "model.layers.{i}.mlp.experts.{e}.up_proj.weight [moe_intermediate, hidden], "
        "model.layers.{i}.mlp.experts.{e}.down_proj.weight [hidden, moe_intermediate]. "
        "(transformers 5 keeps experts fused in memory as mlp.experts.gate_up_proj [E, 2*moe_inter, hidden] "
        "(gate rows first, then up) and mlp.experts.down_proj [E, hidden, moe_inter]; it converts the per-expert "
        "checkpoint layout on load. The fixtures use the per-expert layout.)"
    ),
    "config_layouts": (
        "Hub / transformers 4.5x layout: rope_theta (top level, int in Hub files), rope_scaling (null or "
        "{rope_type|type, factor, original_max_position_embeddings, ...}), torch_dtype, num_experts (MoE), "
        "max_window_layers, sliding_window null, use_sliding_window false. transformers 5 layout: rope_parameters "
        "{rope_type: 'default'|'yarn', rope_theta (float), plus yarn keys factor/original_max_position_embeddings/...} "
        "replaces rope_theta+rope_scaling; dtype replaces torch_dtype; Qwen3MoeConfig has attribute_map "
        "num_experts -> num_local_experts so MoE configs are written with num_local_experts; dense Qwen3 configs "
        "gain layer_types ['full_attention', ...]; pad_token_id null is written; Qwen3MoeConfig 5.x has no "
        "max_window_layers and no declared head_dim field (head_dim is kept as an extra attribute; the model uses "
        "getattr(config, 'head_dim', hidden/heads)). transformers 5 reads both layouts (it maps rope_scaling/"
        "rope_theta into rope_parameters, torch_dtype into dtype, num_experts into num_local_experts). A reader "
        "should accept: rope_parameters.rope_theta or rope_theta; rope_parameters or rope_scaling (rope_type or "
        "legacy 'type'); num_experts or num_local_experts; dtype or torch_dtype; rope_theta as int or float."
    ),
    "safetensors": (
        "Files written with safetensors.torch.save_file(metadata={'format': 'pt'}). Sharded: "
        "model-00001-of-00002.safetensors (embed_tokens + layer 0), model-00002-of-00002.safetensors (rest), "
        "model.safetensors.index.json = {metadata: {total_size: sum of tensor bytes}, weight_map: {name: file}}. "
        "Tied fixtures have no lm_head.weight."
    ),
}


def check(root):
    """Reload committed fixtures with the installed transformers and compare against logits.npy."""
    with open(os.path.join(root, "MANIFEST.json")) as f:
        manifest = json.load(f)
    worst = 0.0
    for e in manifest["fixtures"]:
        d = os.path.join(root, e["name"])
        if e["config_layout"] == "transformers5" and TF_MAJOR < 5:
            print(f"{e['name']:22s} skipped (transformers {TF_VERSION} cannot read the transformers-5 config layout)")
            continue
        with open(os.path.join(d, "tokens.json")) as f:
            tokens = json.load(f)["tokens"]
        ref = np.load(os.path.join(d, "logits.npy"))
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, **_model_kwargs())
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"{e['name']}: {bad}"
        logits, _ = forward(model.eval(), tokens)
        diff = float(np.abs(logits - ref).max())
        worst = max(worst, diff)
        print(f"{e['name']:22s} max |logits - logits.npy| = {diff:.2e}")
        assert diff < 1e-3, e["name"]
    print(f"ok (transformers {TF_VERSION}, torch {torch.__version__}); worst {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--only", nargs="*", help="only (re)generate these fixtures (other MANIFEST entries are kept)")
    ap.add_argument("--check", metavar="DIR", help="don't generate: reload the fixtures in DIR with the installed "
                    "transformers (4.x works for the hub-layout ones) and compare with logits.npy")
    args = ap.parse_args()
    if args.check:
        check(args.check)
        return

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    specs = [s for s in FIXTURES if not args.only or s["name"] in args.only]
    entries = {s["name"]: make_fixture(args.out, s) for s in specs}
    mpath = os.path.join(args.out, "MANIFEST.json")
    if args.only and os.path.exists(mpath):
        with open(mpath) as f:
            for e in json.load(f).get("fixtures", []):
                entries.setdefault(e["name"], e)
    entries = [entries[s["name"]] for s in FIXTURES if s["name"] in entries]
    manifest = {
        "generator": "python/make_fixtures.py",
        "regenerate": "python3 python/make_fixtures.py --out tests/fixtures",
        "versions": {
            "transformers": TF_VERSION,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "python": sys.version.split()[0],
        },
        "tokens_and_logits": "tokens.json {tokens: [ids]} (ids uniform in [0, vocab)); logits.npy '<f4' [T, vocab]",
        "fixtures": entries,
        "notes": NOTES,
    }
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    total = sum(e["bytes"] for e in entries)
    print(f"total {total / 1024:.1f} KiB in {len(entries)} fixtures -> {args.out}")


if __name__ == "__main__":
    main()
