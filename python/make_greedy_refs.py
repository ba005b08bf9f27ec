#!/usr/bin/env python3
"""Make the greedy-generation references that `qwick run` and qwick-engine's generate are checked
against (tests/greedy/).

    python3 python/make_greedy_refs.py [QWEN3_DIR]

QWEN3_DIR holds the Qwen3 tokenizer.json / tokenizer_config.json / generation_config.json (default:
shared/qwen3 next to the repository, or /work/shared/qwen3).

Writes:
  tests/greedy/model/config.json              a tiny Qwen3 with the full 151,936-token vocabulary
                                              (hidden 64, 2 layers, 4 q / 2 kv heads, head_dim 32,
                                              intermediate 128, tied embeddings, max_position 512)
  tests/greedy/model/model.safetensors        its random weights, stored in bf16
  tests/greedy/model/generation_config.json   the real Qwen3 generation_config.json
  tests/greedy/model/tokenizer_config.json    the real Qwen3 tokenizer_config.json (with the chat template)
  tests/greedy/refs.json                      per conversation: the rendered prompt, its token ids, and the
                                              token ids transformers' greedy `generate` produced

tokenizer.json (11 MB) is not copied: it is the same file as tests/chat_refs/tokenizer.json.gz (checked
here), and the tests unpack it into a temporary copy of the model folder, which then looks exactly like a
Hugging Face model folder.

The reference: AutoModelForCausalLM.from_pretrained(folder, dtype=float32, attn_implementation="eager")
(the bf16 weights widened to f32, as qwick computes), `generate(do_sample=False, max_new_tokens=N,
eos_token_id=generation_config's)` on the prompt rendered by the tokenizer's own chat template.

Checks (the script redraws the weights with the next seed until all hold):
  * no conversation stops early: each generates the full N tokens and none of them is an eos id;
  * the output is not degenerate: at least 4 distinct tokens per conversation;
  * every greedy choice is clear: the gap between the best and second-best logit is at least MIN_GAP
    (qwick's logits agree with transformers' to ~1e-5 relative, so the arg-max cannot flip);
  * transformers' cached `generate` agrees with a single uncached forward over prompt + output.
"""

import json
import os
import shutil
import sys
import tempfile
import gzip

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "greedy")
MAX_NEW_TOKENS = 20
MIN_GAP = 0.02
FIRST_SEED = 1

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "max_window_layers": 2,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Conversations. `cli` ones can be given to `qwick run` as --system / --prompt / --think|--no-think;
# the last one (several turns, earlier reasoning) is checked through the engine API only.
CASES = [
    {"name": "hello_think", "cli": True, "system": None, "prompt": "Hello! Who are you?", "thinking": True},
    {"name": "haiku_nothink", "cli": True, "system": "You are a terse assistant.",
     "prompt": "Write a haiku about Rust.", "thinking": False},
    {"name": "unicode_think", "cli": True, "system": None, "prompt": "用一句话解释量子纠缠 🙂", "thinking": True},
    {"name": "multi_turn", "cli": False, "thinking": True, "messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Simple arithmetic: 2+2 is 4."},
        {"role": "user", "content": "And times 3?"},
    ]},
]


def find_qwen3_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    for cand in (os.path.join(ROOT, "shared", "qwen3"), os.path.join(ROOT, "..", "shared", "qwen3"),
                 "/work/shared/qwen3"):
        if os.path.exists(os.path.join(cand, "tokenizer.json")):
            return cand
    sys.exit("pass the folder holding the Qwen3 tokenizer.json, tokenizer_config.json and generation_config.json")


def messages_of(case):
    if "messages" in case:
        return case["messages"]
    msgs = []
    if case["system"] is not None:
        msgs.append({"role": "system", "content": case["system"]})
    msgs.append({"role": "user", "content": case["prompt"]})
    return msgs


def state_dict(seed):
    c = CONFIG
    g = torch.Generator().manual_seed(seed)
    H, hd, nh, nkv, I, V = (c["hidden_size"], c["head_dim"], c["num_attention_heads"],
                            c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"])

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def norm_w(n):
        return 1.0 + 0.1 * normal((n,), 1.0)

    sd = {"model.embed_tokens.weight": normal((V, H), 1.0)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_w(H)
        sd[p + "self_attn.q_proj.weight"] = normal((nh * hd, H), H ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = normal((nkv * hd, H), H ** -0.5)
        # Strong layers, so that the output depends on the context and not only on the last token
        # (with tied embeddings, a weak residual makes the model repeat its input).
        sd[p + "self_attn.o_proj.weight"] = normal((H, nh * hd), 4.0 * (nh * hd) ** -0.5)
        sd[p + "self_attn.q_norm.weight"] = norm_w(hd)
        sd[p + "self_attn.k_norm.weight"] = norm_w(hd)
        sd[p + "post_attention_layernorm.weight"] = norm_w(H)
        sd[p + "mlp.gate_proj.weight"] = normal((I, H), H ** -0.5)
        sd[p + "mlp.up_proj.weight"] = normal((I, H), H ** -0.5)
        sd[p + "mlp.down_proj.weight"] = normal((H, I), 4.0 * I ** -0.5)
    sd["model.norm.weight"] = norm_w(H)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_model(d, qwen3, sd):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for name in ("generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(qwen3, name), os.path.join(d, name))


def try_seed(seed, qwen3, tmp):
    d = os.path.join(tmp, f"seed{seed}")
    sd = state_dict(seed)
    write_model(d, qwen3, sd)
    shutil.copyfile(os.path.join(qwen3, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(d)
    model, info = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"from_pretrained {key}: {info.get(key)}"
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "lm_head not tied"
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    assert sorted(eos) == [151643, 151645], eos

    results, problems = [], []
    for case in CASES:
        msgs = messages_of(case)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=case["thinking"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        inp = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=151643,
                                 output_logits=True, return_dict_in_generate=True)
        gen = out.sequences[0, len(ids):].tolist()
        gaps = []
        for step in out.logits:
            top = step[0].float().topk(2).values
            gaps.append((top[0] - top[1]).item())
        # An uncached forward over the whole text picks the same tokens.
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + gen]), use_cache=False).logits[0]
        again = full[len(ids) - 1:len(ids) - 1 + len(gen)].argmax(-1).tolist()
        if again != gen:
            problems.append(f"{case['name']}: uncached forward disagrees")
        if len(gen) != MAX_NEW_TOKENS or any(t in eos for t in gen):
            problems.append(f"{case['name']}: stopped after {len(gen)} tokens")
        if len(set(gen)) < 4:
            problems.append(f"{case['name']}: only {len(set(gen))} distinct tokens")
        if min(gaps) < MIN_GAP:
            problems.append(f"{case['name']}: arg-max gap {min(gaps):.2e}")
        r = {
            "name": case["name"],
            "cli": case["cli"],
            "messages": msgs,
            "enable_thinking": case["thinking"],
            "prompt_text": text,
            "prompt_ids": ids,
            "generated_ids": gen,
            "generated_text": tok.decode(gen, skip_special_tokens=True),
            "min_argmax_gap": round(min(gaps), 4),
        }
        if case["cli"]:
            r["system"] = case["system"]
            r["prompt"] = case["prompt"]
        results.append(r)
    return sd, results, problems


def main():
    qwen3 = find_qwen3_dir()
    with gzip.open(os.path.join(ROOT, "tests", "chat_refs", "tokenizer.json.gz")) as f:
        packed = f.read()
    with open(os.path.join(qwen3, "tokenizer.json"), "rb") as f:
        assert f.read() == packed, "tests/chat_refs/tokenizer.json.gz is not this tokenizer.json"

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(FIRST_SEED, FIRST_SEED + 50):
            sd, results, problems = try_seed(seed, qwen3, tmp)
            if not problems:
                break
            print(f"seed {seed}: {'; '.join(problems)}", file=sys.stderr)
        else:
            sys.exit("no seed satisfied the checks")

    model_dir = os.path.join(OUT, "model")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    write_model(model_dir, qwen3, sd)
    refs = {
        "about": "greedy generation by transformers on tests/greedy/model (see python/make_greedy_refs.py); "
                 "tokenizer.json is tests/chat_refs/tokenizer.json.gz",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": [151645, 151643],
        "cases": results,
    }
    with open(os.path.join(OUT, "refs.json"), "w") as f:
        json.dump(refs, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for r in results:
        print(f"{r['name']}: {len(r['prompt_ids'])} prompt tokens -> {r['generated_ids']} "
              f"(gap {r['min_argmax_gap']}) {r['generated_text']!r}")
    print(f"seed {seed}; wrote {OUT}")


if __name__ == "__main__":
    main()
