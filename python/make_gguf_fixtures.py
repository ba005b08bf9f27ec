#!/usr/bin/env python3
"""Build the GGUF test fixtures: tiny random Qwen3 / Qwen3-MoE models written by llama.cpp's own tools in
every weight type qwick reads, with reference logits computed by transformers, plus one full-vocabulary
GGUF with transformers' greedy generations (tests/gguf, checked by crates/qwick-cli/tests/gguf.rs).

    python3 python/make_gguf_fixtures.py --out tests/gguf [--llama-cpp DIR] [--qwen3 DIR] [--all]

--llama-cpp: a llama.cpp source tree with a built build/bin/llama-quantize (default: $LLAMA_CPP_DIR, else
             the tree vendored in /work/tools/src/llama_cpp_python-*/vendor/llama.cpp).
--qwen3:     the folder with the real Qwen3 tokenizer.json / tokenizer_config.json (default: shared/qwen3
             next to the repository, or /work/shared/qwen3).
--all:       also write the MoE model in every type (by default only MOE_TYPES, to stay under the size budget).

How each file is made (the way users' files are made):
  1. the model is built in transformers (Qwen3ForCausalLM / Qwen3MoeForCausalLM, float32, weights drawn from
     seeded torch generators) and saved with save_pretrained into a temporary Hugging Face folder;
  2. llama.cpp's convert_hf_to_gguf.py --outtype f32 converts it, run with the gguf-py of the same llama.cpp
     tree. The only change: the tiny models have a 256-entry vocabulary, which the converter cannot take from
     the 151,936-token Qwen3 tokenizer, so its set_vocab is replaced by one writing a byte-level vocabulary of
     the 256 byte tokens (tokenizer.ggml.model gpt2, pre qwen2, one dummy merge so llama.cpp accepts it).
     Every other key and every tensor name, shape and layout is the converter's own;
  3. llama-quantize --pure (every 2-D / 3-D weight in the type; norms and the MoE router stay F32) makes each
     type; the i-quants get an importance matrix (written here in llama.cpp's GGUF imatrix format from the
     squared inputs of every weight over random token sequences; token_embd, which has no inputs, gets a uniform
     entry, without which ggml cannot make IQ2_XXS / IQ2_XS / IQ1_S / IQ1_M). The two mixtures (Q4_K_M, Q5_K_M, on a
     4-layer model) are made without --pure and without an imatrix, by llama.cpp's recipes.

Reference logits: every tensor of the file is dequantized with the PyPI gguf package
(gguf.quants.dequantize), loaded into the transformers model (float32, eager attention; GGUF dims are the
reverse of PyTorch's; the converter does not permute q/k), and one uncached forward over TOKENS gives
logits [100, vocab] (float32 .npy). Checks (the script aborts if one fails):
  * the F32 file holds exactly the transformers model's tensors, and its logits equal the model's;
  * every file's tensor types are the ones asked for (recorded per tensor in MANIFEST.json);
  * MoE: in every file, for every token, the router's k-th and (k+1)-th logits differ by at least
    ROUTER_GAP_MIN (else the router is redrawn with the next seed), so small numeric differences (qwick's
    --fast 8-bit activations) cannot change which experts run. To make that possible with 100 tokens, each
    token's embedding leans toward the router rows of a pair of experts drawn for it (ROUTER_LEAN).

The full-vocabulary file: tests/greedy/model (hidden 64, vocab 151,936, tied embeddings, bf16) with the real
tokenizer.json and tokenizer_config.json, converted by the unmodified convert_hf_to_gguf.py --outtype q8_0.
That file is 16.4 MB (9.7 MB of q8_0 embeddings, ~6 MB of tokenizer) and 11.8 MB gzipped, over the budget
(GREEDY_MAX_BYTES, gzipped), so the script then makes it the other common way: convert_hf_to_gguf.py
--outtype bf16, then llama-quantize --pure Q4_0 (6.9 MB gzipped). It is stored gzip-compressed
(greedy-<TYPE>.gguf.gz; the test unpacks it). greedy.json holds, for one prompt with thinking on and one with
thinking off (picked from GREEDY_CANDIDATES), the prompt rendered by the tokenizer's chat template
(transformers' apply_chat_template), its ids (HF tokenizer) and transformers' greedy generation of
GREEDY_NEW_TOKENS tokens with the weights dequantized from the GGUF.

Size budget (tests/gguf under 25 MB): the dense models have intermediate size 256 (the smallest that keeps
every K / i-quant super-block whole), and the MoE model is written in MOE_TYPES only (--all: every type,
~15 MB more).

Also recorded per dense file (information only): q8_activations_rms_over_std, the error of the reference
model with every linear layer's input rounded to 8-bit blocks of 32 -- what an integer-dot-product path
should show.

Deterministic given the seeds (torch CPU generators; llama-quantize is deterministic): two runs give
byte-identical files.
"""

import argparse
import glob
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

import gguf
import transformers
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 256
T = 100
TOKEN_SEED = 2024
ROUTER_GAP_MIN = 0.5  # in router logits (whose std is ~5)
ROUTER_LEAN = 8.0
GREEDY_NEW_TOKENS = 12
GREEDY_MIN_GAP = 0.02
GREEDY_MAX_BYTES = 11_000_000
IMATRIX_SEQS, IMATRIX_LEN, IMATRIX_SEED = 8, 64, 77

# (ggml tensor type written, llama-quantize ftype argument, needs an imatrix)
TYPES = [
    ("F16", "F16", False), ("BF16", "BF16", False), ("Q8_0", "Q8_0", False),
    ("Q4_0", "Q4_0", False), ("Q4_1", "Q4_1", False), ("Q5_0", "Q5_0", False), ("Q5_1", "Q5_1", False),
    ("Q2_K", "Q2_K", False), ("Q3_K", "Q3_K_M", False), ("Q4_K", "Q4_K_M", False), ("Q5_K", "Q5_K_M", False),
    ("Q6_K", "Q6_K", False),
    ("IQ4_NL", "IQ4_NL", True), ("IQ4_XS", "IQ4_XS", True), ("IQ3_S", "IQ3_S", True),
    ("IQ3_XXS", "IQ3_XXS", True), ("IQ2_XXS", "IQ2_XXS", True), ("IQ2_XS", "IQ2_XS", True),
    ("IQ2_S", "IQ2_M", True), ("IQ1_S", "IQ1_S", True), ("IQ1_M", "IQ1_M", True),
]
# The MoE model in these types only by default (size budget); --all writes every type.
MOE_TYPES = ["Q8_0", "Q4_K", "IQ4_XS", "IQ2_XXS"]
MIXTURES = ["Q4_K_M", "Q5_K_M"]

MODELS = {
    "dense": dict(arch="qwen3", layers=1, inter=256, seed=1,
                  desc="Qwen3 dense, 1 layer, hidden 256, 4 q heads / 2 kv heads x head_dim 64, "
                       "intermediate 256, vocab 256, untied"),
    "moe": dict(arch="qwen3moe", layers=1, inter=512, experts=4, topk=2, moe_inter=256, seed=2,
                desc="Qwen3-MoE, 1 layer, hidden 256, 4 q / 2 kv heads x 64, 4 experts top-2 "
                     "(expert_feed_forward_length 256), norm_topk_prob true, vocab 256, untied"),
    "dense4": dict(arch="qwen3", layers=4, inter=256, seed=3,
                   desc="Qwen3 dense, 4 layers, otherwise as dense (for llama.cpp's layer-dependent mixtures)"),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------
def find_llama_cpp(arg):
    cands = [arg] if arg else []
    if os.environ.get("LLAMA_CPP_DIR"):
        cands.append(os.environ["LLAMA_CPP_DIR"])
    cands += sorted(glob.glob("/work/tools/src/llama_cpp_python-*/vendor/llama.cpp"))
    for c in cands:
        if c and os.path.exists(os.path.join(c, "convert_hf_to_gguf.py")) and \
                os.path.exists(os.path.join(c, "build", "bin", "llama-quantize")):
            return os.path.abspath(c)
    sys.exit("no llama.cpp tree with convert_hf_to_gguf.py and build/bin/llama-quantize; pass --llama-cpp")


def find_qwen3(arg):
    for c in ([arg] if arg else []) + [os.path.join(ROOT, "shared", "qwen3"),
                                       os.path.join(ROOT, "..", "shared", "qwen3"), "/work/shared/qwen3"]:
        if c and os.path.exists(os.path.join(c, "tokenizer.json")):
            return c
    sys.exit("pass --qwen3 DIR holding the Qwen3 tokenizer.json and tokenizer_config.json")


def llama_commit(ll):
    try:
        return subprocess.run(["git", "-C", ll, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


# Runs convert_hf_to_gguf.py's main() in a child process with the llama.cpp tree's gguf-py first on the
# path; with --byte-vocab, Qwen3's set_vocab is replaced by the 256-byte vocabulary described above.
CONVERT_WRAPPER = r'''
import sys
ll = sys.argv[1]
byte_vocab = sys.argv[2] == "1"
sys.path.insert(0, ll)
sys.path.insert(1, ll + "/gguf-py")
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
import gguf
assert gguf.__file__.startswith(ll), gguf.__file__
import convert_hf_to_gguf as conv
from conversion.qwen import Qwen3Model, Qwen3MoeModel

def set_byte_vocab(self):
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    assert self.hparams["vocab_size"] == 256
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("qwen2")
    self.gguf_writer.add_token_list([b2u[i] for i in range(256)])
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * 256)
    self.gguf_writer.add_token_merges([b2u[32] + " " + b2u[32]])

if byte_vocab:
    Qwen3Model.set_vocab = set_byte_vocab
    Qwen3MoeModel.set_vocab = set_byte_vocab
conv.main()
'''


def convert(ll, hf_dir, out, outtype, byte_vocab, tmp):
    wrapper = os.path.join(tmp, "convert_wrapper.py")
    with open(wrapper, "w") as f:
        f.write(CONVERT_WRAPPER)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, wrapper, ll, "1" if byte_vocab else "0", hf_dir, "--outtype", outtype, "--outfile", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if r.returncode != 0:
        sys.exit(f"convert_hf_to_gguf failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def quantize(ll, src, dst, ftype, pure, imatrix=None):
    cmd = [os.path.join(ll, "build", "bin", "llama-quantize")]
    if pure:
        cmd.append("--pure")
    if imatrix:
        # Run where the imatrix is and name it relatively: llama-quantize records the name in the file
        # (quantize.imatrix.file), and a temporary path would make the output differ between runs.
        cmd += ["--imatrix", os.path.basename(imatrix)]
    cmd += [os.path.abspath(src), os.path.abspath(dst), ftype, "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(imatrix) if imatrix else None)
    if r.returncode != 0:
        sys.exit(f"llama-quantize failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return " ".join(["llama-quantize"] + (["--pure"] if pure else []) + (["--imatrix", "IMATRIX.gguf"] if imatrix else [])
                    + ["IN.gguf", "OUT.gguf", ftype])


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def hf_config(m):
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=m["layers"], num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
                  intermediate_size=m["inter"], hidden_act="silu", attention_bias=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if m["arch"] == "qwen3":
        c = transformers.Qwen3Config(**common)
    else:
        c = transformers.Qwen3MoeConfig(**common, num_experts=m["experts"], num_experts_per_tok=m["topk"],
                                        moe_intermediate_size=m["moe_inter"], norm_topk_prob=True,
                                        decoder_sparse_step=1, mlp_only_layers=[])
    assert c.rope_parameters["rope_theta"] == 1000000.0, c.rope_parameters
    c._attn_implementation = "eager"
    return c


def canonical_weights(m, seed, router_seed=None):
    """Hub-layout tensors (per-expert MoE weights), float32."""
    g = torch.Generator().manual_seed(seed)
    H, hd, nh, nkv, I = 256, 64, 4, 2, m["inter"]

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def norm_w(n):
        return 1.0 + 0.1 * normal((n,), 1.0)

    sd = {"model.embed_tokens.weight": normal((VOCAB, H), 1.0)}
    for i in range(m["layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_w(H)
        sd[p + "self_attn.q_proj.weight"] = normal((nh * hd, H), H ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        sd[p + "self_attn.o_proj.weight"] = normal((H, nh * hd), 2.0 * (nh * hd) ** -0.5)
        sd[p + "self_attn.q_norm.weight"] = norm_w(hd)
        sd[p + "self_attn.k_norm.weight"] = norm_w(hd)
        sd[p + "post_attention_layernorm.weight"] = norm_w(H)
        if m["arch"] == "qwen3":
            sd[p + "mlp.gate_proj.weight"] = normal((I, H), H ** -0.5)
            sd[p + "mlp.up_proj.weight"] = normal((I, H), H ** -0.5)
            sd[p + "mlp.down_proj.weight"] = normal((H, I), 2.0 * I ** -0.5)
        else:
            E, mi = m["experts"], m["moe_inter"]
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                sd[q + "gate_proj.weight"] = normal((mi, H), H ** -0.5)
                sd[q + "up_proj.weight"] = normal((mi, H), H ** -0.5)
                sd[q + "down_proj.weight"] = normal((H, mi), 2.0 * mi ** -0.5)
            rg = torch.Generator().manual_seed(router_seed)
            w = torch.randn((E, H), generator=rg) * (2.0 * H ** -0.5)
            sd[p + "mlp.gate.weight"] = w
            # Each token's embedding leans toward the router rows of a pair of experts drawn for it, so the
            # router's choice is clear-cut: its k-th and (k+1)-th logits differ by far more than what 8-bit
            # activations (qwick --fast) or the rounding of any weight type can move them. Every pair occurs.
            pairs = list(itertools.combinations(range(E), m["topk"]))
            pick = torch.randint(0, len(pairs), (VOCAB,), generator=rg)
            d = w / w.norm(dim=1, keepdim=True)
            for t in range(VOCAB):
                sd["model.embed_tokens.weight"][t] += ROUTER_LEAN * d[list(pairs[pick[t]])].sum(0)
    sd["model.norm.weight"] = norm_w(H)
    sd["lm_head.weight"] = normal((VOCAB, H), 3.0 * H ** -0.5)
    return sd


def build_model(m, canon):
    cls = transformers.Qwen3ForCausalLM if m["arch"] == "qwen3" else transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(hf_config(m)).float().eval()
    load_canonical(model, canon)
    return model


def load_canonical(model, canon):
    """Loads hub-layout tensors into the model, whatever layout its MoE experts use in memory."""
    msd = model.state_dict()
    out = {}
    for k, v in msd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            out[k] = torch.stack([torch.cat([canon[f"{p}{e}.gate_proj.weight"], canon[f"{p}{e}.up_proj.weight"]], 0)
                                  for e in range(v.shape[0])])
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            out[k] = torch.stack([canon[f"{p}{e}.down_proj.weight"] for e in range(v.shape[0])])
        else:
            out[k] = canon[k]
        assert out[k].shape == v.shape, (k, out[k].shape, v.shape)
    used = set(canon) - set(out)
    expected_unused = {k for k in canon if ".mlp.experts." in k}
    assert used <= expected_unused, sorted(used - expected_unused)
    model.load_state_dict(out, strict=True)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()


# --------------------------------------------------------------------------------------------------
# GGUF <-> hub names
# --------------------------------------------------------------------------------------------------
BLK = {
    "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
    "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
    "ffn_gate_inp": "mlp.gate.weight",
}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
       "output_norm.weight": "model.norm.weight"}


def read_gguf(path):
    """{hub name: float32 tensor} dequantized with gguf.quants.dequantize, and {gguf name: type name}."""
    r = GGUFReader(path)
    canon, types = {}, {}
    for t in r.tensors:
        types[t.name] = t.tensor_type.name
        shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        w = torch.from_numpy(a.copy())
        if t.name in TOP:
            canon[TOP[t.name]] = w
            continue
        _, l, base, _ = t.name.split(".")
        p = f"model.layers.{l}."
        if base.endswith("_exps"):
            proj = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[base]
            for e in range(w.shape[0]):
                canon[f"{p}mlp.experts.{e}.{proj}.weight"] = w[e].contiguous()
        else:
            canon[p + BLK[base]] = w
    return canon, types, r


def meta(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


# --------------------------------------------------------------------------------------------------
# Importance matrix (llama.cpp's GGUF imatrix format: <tensor>.in_sum2 [ne0, n_mat], <tensor>.counts [1, n_mat])
# --------------------------------------------------------------------------------------------------
def write_imatrix(model, m, canon, path):
    L = m["layers"]
    acc = {}

    def add(name, x, nmat=1, mat=0):
        x = x.reshape(-1, x.shape[-1]).double()
        s, c = acc.setdefault(name, (torch.zeros(nmat, x.shape[-1], dtype=torch.float64), torch.zeros(nmat)))
        s[mat] += (x * x).sum(0)
        c[mat] += x.shape[0]

    hooks = []
    layers = model.model.layers
    for i in range(L):
        def attn_hook(mod, args, kwargs, i=i):
            h = kwargs.get("hidden_states", args[0] if args else None)
            for n in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{i}.{n}.weight", h)
        hooks.append(layers[i].self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True))
        hooks.append(layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: add(f"blk.{i}.attn_output.weight", args[0])))
        if m["arch"] == "qwen3":
            def mlp_hook(mod, args, i=i):
                add(f"blk.{i}.ffn_gate.weight", args[0])
                add(f"blk.{i}.ffn_up.weight", args[0])
            hooks.append(layers[i].mlp.register_forward_pre_hook(mlp_hook))
            hooks.append(layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, i=i: add(f"blk.{i}.ffn_down.weight", args[0])))
        else:
            def moe_hook(mod, args, i=i):
                x = args[0].reshape(-1, 256)
                p = f"model.layers.{i}.mlp."
                probs = torch.softmax(x @ canon[p + "gate.weight"].T, -1)
                top = probs.topk(m["topk"], -1).indices
                for e in range(m["experts"]):
                    rows = (top == e).any(-1)
                    xe = x[rows]
                    if xe.shape[0] == 0:
                        continue
                    q = f"{p}experts.{e}."
                    h = torch.nn.functional.silu(xe @ canon[q + "gate_proj.weight"].T) * (xe @ canon[q + "up_proj.weight"].T)
                    add(f"blk.{i}.ffn_gate_exps.weight", xe, m["experts"], e)
                    add(f"blk.{i}.ffn_up_exps.weight", xe, m["experts"], e)
                    add(f"blk.{i}.ffn_down_exps.weight", h, m["experts"], e)
            hooks.append(layers[i].mlp.register_forward_pre_hook(moe_hook))
    hooks.append(model.lm_head.register_forward_pre_hook(lambda mod, args: add("output.weight", args[0])))
    g = torch.Generator().manual_seed(IMATRIX_SEED)
    toks = torch.randint(0, VOCAB, (IMATRIX_SEQS, IMATRIX_LEN), generator=g)
    with torch.no_grad():
        for s in range(IMATRIX_SEQS):
            model(input_ids=toks[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    # The embedding table has no input activations; llama.cpp's imatrix never has an entry for it, but the
    # lowest-bit types (IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M) cannot be made without one: a uniform entry.
    acc["token_embd.weight"] = (torch.ones(1, 256, dtype=torch.float64), torch.ones(1))
    w = GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [f"random tokens: {IMATRIX_SEQS} x {IMATRIX_LEN}, seed {IMATRIX_SEED}"])
    w.add_uint32("imatrix.chunk_count", IMATRIX_SEQS)
    w.add_uint32("imatrix.chunk_size", IMATRIX_LEN)
    for name in sorted(acc):
        s, c = acc[name]
        w.add_tensor(name + ".in_sum2", s.float().numpy())
        w.add_tensor(name + ".counts", c.float().numpy().reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(acc)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def router_gap(model, m, canon, tokens):
    """Smallest gap between the k-th and (k+1)-th router logits over tokens and layers, and how many tokens
    each expert gets."""
    gaps, counts = [], []
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, i=i):
            x = args[0].reshape(-1, 256)
            s = (x @ canon[f"model.layers.{i}.mlp.gate.weight"].T).sort(-1, descending=True)
            k = m["topk"]
            gaps.append((s.values[:, k - 1] - s.values[:, k]).min().item())
            counts.append(torch.bincount(s.indices[:, :k].reshape(-1), minlength=m["experts"]).tolist())
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    logits_of(model, tokens)
    for h in hooks:
        h.remove()
    return min(gaps), counts


def q8_activation_logits(model, tokens, block=32):
    """The logits with every linear layer's input rounded as 8-bit blocks (per `block` values: scale =
    max|x| / 127, round to nearest): what integer-dot-product inference of quantized weights computes."""
    def q8(mod, args):
        x = args[0]
        b = x.reshape(-1, block)
        d = b.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(b))
        return ((q * d).reshape(x.shape),)
    hooks = [mod.register_forward_pre_hook(q8) for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    try:
        return logits_of(model, tokens)
    finally:
        for h in hooks:
            h.remove()


def expected_type(name, want):
    if name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    return want


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
def make_model_files(key, m, types, ll, out, tokens, tmp, pure=True):
    """Writes <key>-<TYPE>.gguf and .npy for each type; returns manifest entries."""
    if m["arch"] == "qwen3":
        return _make_model_files(key, m, types, ll, out, tokens, tmp, pure, None)[0]
    for attempt in range(40):
        router_seed = 1000 * m["seed"] + attempt
        canon = canonical_weights(m, m["seed"], router_seed)
        gap, _ = router_gap(build_model(m, canon), m, canon, tokens)
        if gap < 2 * ROUTER_GAP_MIN:
            continue
        entries, ok = _make_model_files(key, m, types, ll, out, tokens, tmp, pure, router_seed)
        if ok:
            return entries
        log(f"{key}: router seed {router_seed}: a file's router gap is small; redrawing")
    sys.exit(f"{key}: no router seed keeps every file's router gap >= {ROUTER_GAP_MIN}")


def _make_model_files(key, m, types, ll, out, tokens, tmp, pure, router_seed):
    canon = canonical_weights(m, m["seed"], router_seed)
    model = build_model(m, canon)
    hf_logits = logits_of(model, tokens)
    hf_dir = os.path.join(tmp, f"qwick-{key}")
    if os.path.exists(hf_dir):
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir)
    f32 = os.path.join(tmp, f"{key}-F32.gguf")
    convert(ll, hf_dir, f32, "f32", True, tmp)

    # The F32 file is the transformers model, tensor for tensor (no permutation of q/k).
    back, f32_types, r = read_gguf(f32)
    assert set(back) == set(canon), sorted(set(back) ^ set(canon))
    for k in canon:
        assert torch.equal(back[k], canon[k]), f"{key}: F32 GGUF tensor for {k} differs from the HF model"
    assert all(t == "F32" for t in f32_types.values()), f32_types
    m2 = build_model(m, back)
    f32_logits = logits_of(m2, tokens)
    f32_diff = float(np.abs(f32_logits - hf_logits).max())
    assert f32_diff <= 1e-6, f"{key}: F32 GGUF logits differ from the HF model by {f32_diff}"
    gap_hf = router_gap(model, m, canon, tokens)[0] if m["arch"] == "qwen3moe" else None
    log(f"{key}: F32 GGUF == HF model (logits max diff {f32_diff:.2e}), logits std {hf_logits.std():.3f}"
        + (f", router gap {gap_hf:.4f}" if gap_hf is not None else ""))

    imatrix = None
    if pure and any(t[2] for t in TYPES if t[0] in types):
        imatrix = os.path.join(tmp, f"imatrix-{key}.gguf")
        write_imatrix(model, m, canon, imatrix)

    entries = []
    for tname in types:
        if tname == "F32":
            src, how, ftype_arg, needs_im = f32, "convert_hf_to_gguf.py --outtype f32", None, False
        else:
            if pure:
                ftype_arg, needs_im = next((t[1], t[2]) for t in TYPES if t[0] == tname)
            else:
                ftype_arg, needs_im = tname, False
            src = os.path.join(tmp, f"{key}-{tname}.gguf")
            how = "convert_hf_to_gguf.py --outtype f32, then " + quantize(
                ll, f32, src, ftype_arg, pure, imatrix if needs_im else None)
        canon_q, qtypes, r = read_gguf(src)
        if pure:
            for n, t in qtypes.items():
                want = expected_type(n, tname)
                assert t == want, f"{key}-{tname}: tensor {n} is {t}, expected {want}"
        mq = build_model(m, canon_q)
        ref = logits_of(mq, tokens)
        assert np.isfinite(ref).all()
        gap, counts = router_gap(mq, m, canon_q, tokens) if m["arch"] == "qwen3moe" else (None, None)
        if gap is not None and gap < ROUTER_GAP_MIN:
            log(f"{key}-{tname}: router gap {gap:.4f}")
            return None, False
        name = f"{key}-{tname}"
        shutil.copyfile(src, os.path.join(out, name + ".gguf"))
        np.save(os.path.join(out, name + ".npy"), ref.astype("<f4"))
        # How far the file's weights are from the float model (information only).
        qerr = float(np.sqrt(sum(((canon_q[k] - canon[k]) ** 2).sum().item() for k in canon) /
                             sum((canon[k] ** 2).sum().item() for k in canon)))
        q8 = q8_activation_logits(mq, tokens) if m["arch"] == "qwen3" else None
        ft = meta(r, "general.file_type")
        e = {
            "name": name,
            "gguf": name + ".gguf",
            "logits": name + ".npy",
            "model": key,
            "arch": meta(r, "general.architecture"),
            "type": tname,
            "made_with": how,
            "pure": pure or tname == "F32",
            "imatrix": bool(needs_im),
            "general.file_type": ft,
            "file_type_name": FTYPE_NAMES.get(ft, str(ft)),
            "tensor_types": qtypes,
            "bytes": os.path.getsize(src),
            "logits_std": round(float(ref.std()), 4),
            "logits_absmax": round(float(np.abs(ref).max()), 4),
            "weights_rel_rms_error_vs_float_model": round(qerr, 5),
        }
        if q8 is not None:
            e["q8_activations_rms_over_std"] = round(float(np.sqrt(((q8 - ref) ** 2).mean()) / ref.std()), 5)
        if tname == "F32":
            e["checks"] = {"tensors_equal_hf_model": True, "logits_max_abs_diff_vs_hf_model": f32_diff}
        if gap is not None:
            e["router"] = {"seed": router_seed, "min_logit_gap_kth_to_next": round(gap, 4),
                           "tokens_per_expert": counts}
        entries.append(e)
        log(f"  {name}: {e['bytes']} bytes, logits std {e['logits_std']}, weight rel err {qerr:.4f}"
            + (f", router gap {gap:.4f}" if gap is not None else ""))
    return entries, True


FTYPE_NAMES = {int(v): k for k, v in gguf.LlamaFileType.__members__.items()}


# --------------------------------------------------------------------------------------------------
# Full-vocabulary greedy file
# --------------------------------------------------------------------------------------------------
# Candidate prompts; for each thinking mode the one whose greedy output has the most distinct tokens (all
# arg-max gaps >= GREEDY_MIN_GAP, no eos) is kept (this tiny random model likes to repeat itself).
GREEDY_CANDIDATES = [
    (None, "Hello! Who are you?"), ("You are a terse assistant.", "Write a haiku about Rust."),
    (None, "What is the capital of France?"), (None, "Tell me a story."), (None, "用一句话解释量子纠缠 🙂"),
    (None, "Explain GGUF in one sentence."), ("You are a helpful assistant.", "List three prime numbers."),
]


def make_greedy(ll, qwen3, out, tmp):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    d = os.path.join(tmp, "qwick-greedy")
    shutil.copytree(os.path.join(ROOT, "tests", "greedy", "model"), d)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(qwen3, n), os.path.join(d, n))
    q8 = os.path.join(tmp, "greedy-Q8_0.gguf")
    convert(ll, d, q8, "q8_0", False, tmp)
    made = "convert_hf_to_gguf.py --outtype q8_0 (tests/greedy/model + Qwen3 tokenizer.json, tokenizer_config.json)"
    path, tname = q8, "Q8_0"
    gz_bytes = len(gzip.compress(open(q8, "rb").read(), 9, mtime=0))
    log(f"greedy: q8_0 file {os.path.getsize(q8)} bytes, {gz_bytes} gzipped")
    if gz_bytes > GREEDY_MAX_BYTES:
        bf16 = os.path.join(tmp, "greedy-BF16.gguf")
        convert(ll, d, bf16, "bf16", False, tmp)
        path, tname = os.path.join(tmp, "greedy-Q4_0.gguf"), "Q4_0"
        made = ("convert_hf_to_gguf.py --outtype bf16 (tests/greedy/model + Qwen3 tokenizer.json, "
                "tokenizer_config.json), then " + quantize(ll, bf16, path, "Q4_0", True))
    raw = open(path, "rb").read()
    name = f"greedy-{tname}"
    with open(os.path.join(out, name + ".gguf.gz"), "wb") as f:
        f.write(gzip.compress(raw, 9, mtime=0))

    canon, types, r = read_gguf(path)
    assert "lm_head.weight" not in canon, "tied embeddings: no output.weight"
    canon["lm_head.weight"] = canon["model.embed_tokens.weight"]
    cfg = AutoConfig.from_pretrained(d)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    load_canonical(model, canon)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(d)
    eos = [151645, 151643]
    cases = []
    for thinking in (True, False):
        best = None
        for system, prompt in GREEDY_CANDIDATES:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            inp = torch.tensor([ids])
            with torch.no_grad():
                o = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, temperature=None,
                                   top_p=None, top_k=None, max_new_tokens=GREEDY_NEW_TOKENS, eos_token_id=eos,
                                   pad_token_id=151643, output_logits=True, return_dict_in_generate=True)
                gen = o.sequences[0, len(ids):].tolist()
                full = model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits[0]
            gaps = [(lambda v: (v[0] - v[1]).item())(st[0].float().topk(2).values) for st in o.logits]
            assert full[len(ids) - 1:len(ids) - 1 + len(gen)].argmax(-1).tolist() == gen, "uncached forward disagrees"
            log(f"greedy thinking={thinking} {prompt!r}: {len(set(gen))} distinct, gap {min(gaps):.3f}: {gen}")
            if len(gen) != GREEDY_NEW_TOKENS or any(t in eos for t in gen) or min(gaps) < GREEDY_MIN_GAP:
                continue
            if best is None or len(set(gen)) > len(set(best["generated_ids"])):
                best = {
                    "name": ("think" if thinking else "nothink") + f"_{GREEDY_CANDIDATES.index((system, prompt))}",
                    "system": system, "prompt": prompt, "messages": msgs, "enable_thinking": thinking,
                    "prompt_text": text, "prompt_ids": ids, "generated_ids": gen,
                    "generated_text": tok.decode(gen, skip_special_tokens=True), "min_argmax_gap": round(min(gaps), 4),
                }
        assert best is not None, f"no candidate prompt passes the checks with thinking={thinking}"
        cases.append(best)
        log(f"greedy: kept {best['name']} {best['prompt']!r}")
    refs = {
        "about": "transformers greedy generate (float32, eager, weights dequantized from the GGUF with "
                 "gguf.quants.dequantize) on " + name + ".gguf.gz; prompts rendered by the Qwen3 chat template "
                 "(apply_chat_template, add_generation_prompt, enable_thinking) and tokenized by the HF tokenizer",
        "gguf": name + ".gguf.gz",
        "max_new_tokens": GREEDY_NEW_TOKENS,
        "eos_token_ids": eos,
        "cases": cases,
    }
    with open(os.path.join(out, "greedy.json"), "w") as f:
        json.dump(refs, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return {
        "name": name, "gguf": name + ".gguf.gz", "gzip": True, "arch": meta(r, "general.architecture"),
        "type": tname, "made_with": made, "general.file_type": meta(r, "general.file_type"),
        "file_type_name": FTYPE_NAMES.get(meta(r, "general.file_type"), "?"),
        "tensor_types": types, "bytes": len(raw), "bytes_gzipped": os.path.getsize(os.path.join(out, name + ".gguf.gz")),
        "q8_0_bytes": os.path.getsize(q8), "q8_0_bytes_gzipped": gz_bytes, "references": "greedy.json",
    }


# --------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "gguf"))
    ap.add_argument("--llama-cpp")
    ap.add_argument("--qwen3")
    ap.add_argument("--all", action="store_true", help="the MoE model in every type")
    ap.add_argument("--only", help="comma-separated model keys (dense,moe,dense4,greedy) for a quick run")
    a = ap.parse_args()
    ll = find_llama_cpp(a.llama_cpp)
    qwen3 = find_qwen3(a.qwen3)
    only = set(a.only.split(",")) if a.only else {"dense", "moe", "dense4", "greedy"}
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(a.out, exist_ok=True)
    if not a.only:
        for f in glob.glob(os.path.join(a.out, "*")):
            os.remove(f)
    tokens = np.random.default_rng(TOKEN_SEED).integers(0, VOCAB, T).tolist()
    with open(os.path.join(a.out, "tokens.json"), "w") as f:
        json.dump({"tokens": tokens}, f)
        f.write("\n")

    files, greedy = [], None
    with tempfile.TemporaryDirectory() as tmp:
        if "dense" in only:
            files += make_model_files("dense", MODELS["dense"], ["F32"] + [t[0] for t in TYPES], ll, a.out, tokens, tmp)
        if "moe" in only:
            files += make_model_files("moe", MODELS["moe"], [t[0] for t in TYPES] if a.all else MOE_TYPES,
                                      ll, a.out, tokens, tmp)
        if "dense4" in only:
            files += make_model_files("dense4", MODELS["dense4"], MIXTURES, ll, a.out, tokens, tmp, pure=False)
        if "greedy" in only:
            greedy = make_greedy(ll, qwen3, a.out, tmp)

    manifest = {
        "generator": "python/make_gguf_fixtures.py",
        "regenerate": "python3 python/make_gguf_fixtures.py --out tests/gguf",
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gguf (PyPI, dequantization reference)": gguf.__version__ if hasattr(gguf, "__version__") else
            __import__("importlib.metadata").metadata.version("gguf"),
            "numpy": np.__version__, "python": sys.version.split()[0],
            "llama.cpp": {"commit": llama_commit(ll), "tree": ll,
                          "tools": "convert_hf_to_gguf.py (with that tree's gguf-py), build/bin/llama-quantize"},
        },
        "tokens": f"tokens.json {{tokens: [...]}}: {T} ids uniform in [0, {VOCAB}), numpy default_rng({TOKEN_SEED})",
        "logits": "<name>.npy '<f4' [100, vocab]: transformers (float32, eager attention, one uncached forward over "
                  "the 100 tokens, positions 0..99) with every tensor dequantized from the file by "
                  "gguf.quants.dequantize; the logits of the first n tokens alone are rows 0..n-1",
        "models": {k: {kk: vv for kk, vv in v.items()} for k, v in MODELS.items()},
        "notes": [
            "vocabulary of the tiny models: 256 byte tokens written in place of the converter's set_vocab "
            "(tokenizer.ggml.model gpt2, pre qwen2, one dummy merge); everything else is convert_hf_to_gguf.py's",
            "--pure: every 2-D / 3-D weight has the file's type; *_norm and ffn_gate_inp (the MoE router) stay F32",
            "i-quants are made with an importance matrix from random token sequences (seed %d); token_embd, "
            "which has no input activations, gets a uniform entry (ggml cannot make IQ2_XXS/IQ2_XS/IQ1_S/IQ1_M "
            "without one)" % IMATRIX_SEED,
            "Q3_K / Q4_K / Q5_K / IQ2_S are made with llama-quantize's Q3_K_M / Q4_K_M / Q5_K_M / IQ2_M ftype "
            "names and --pure, so general.file_type names those",
            "q8_activations_rms_over_std (dense models): rms(logits - reference) / std(reference) when every "
            "linear layer's input is rounded to 8-bit blocks of 32 (scale max|x|/127) in the reference model -- "
            "what the error of an integer-dot-product ('fast') path is expected to be; information only",
            "MoE: each token's embedding leans (%g x unit router rows) toward a pair of experts drawn for it, so "
            "routing is clear-cut; in every MoE file the k-th minus (k+1)-th router logit is >= %g for every token "
            "(router logits have std ~5)" % (ROUTER_LEAN, ROUTER_GAP_MIN),
        ],
        "files": files,
    }
    if greedy:
        manifest["greedy"] = greedy
    if a.only and os.path.exists(os.path.join(a.out, "MANIFEST.json")):
        old = json.load(open(os.path.join(a.out, "MANIFEST.json")))
        keep = [f for f in old.get("files", []) if f["model"] not in only]
        manifest["files"] = keep + files
        if not greedy and "greedy" in old:
            manifest["greedy"] = old["greedy"]
    with open(os.path.join(a.out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(a.out, "*")))
    log(f"wrote {len(manifest['files'])} files (+ greedy) to {a.out}: {total} bytes in all")


if __name__ == "__main__":
    main()
