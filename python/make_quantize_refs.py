#!/usr/bin/env python3
"""Build tests/quantize: the references `qwick quantize` is checked against -- how far ggml's own quantizers
land from a few test matrices (errors.json) and which type llama.cpp's llama-quantize gives every tensor of a
Qwen3 / Qwen3-MoE model for each file type (mixes.json).

    python3 python/make_quantize_refs.py [--out tests/quantize] [--llama-cpp DIR] [--only errors,mixes]

--llama-cpp: a llama.cpp source tree with a built build/bin/llama-quantize and build/ggml/src/libggml-base.a
             (default: $LLAMA_CPP_DIR, else the tree vendored in /work/tools/src/llama_cpp_python-*/vendor/llama.cpp).

Part 1, errors.json (+ gauss.npy, heavy.npy, ramp.npy, float32 matrices [rows, n_per_row] drawn from seeded numpy
generators; see make_matrices):
  a small C program (its source is QUANT_C below; written to a temporary folder, compiled with gcc and linked
  with the tree's static libggml-base.a) reads a matrix and calls ggml_quantize_init(type) and
  ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL) -- exactly what llama-quantize does for a
  tensor when it has no importance matrix -- and writes the quantized rows (and ggml's own dequantization of
  them, used only as a cross-check). The rows are dequantized with the PyPI gguf package
  (gguf.quants.dequantize) and, per (type, matrix), errors.json records rms = sqrt(mean((deq - x)^2)) and
  max = max |deq - x| (float64 arithmetic), plus rel_rms = rms / sqrt(mean(x^2)), the size of the quantized data
  and its sha256 (information); for ramp (one special case per row) also row_rms and row_max. Check: gguf's
  dequantization equals ggml's to within 1e-6 of the matrix's largest value (it is exact).

Part 2, mixes.json:
  tiny random models with real layer counts (MODELS) are built in transformers (float32), saved with
  save_pretrained, converted by llama.cpp's convert_hf_to_gguf.py --outtype f32 (with the 256-byte vocabulary of
  python/make_gguf_fixtures.py in place of the converter's set_vocab; every tensor name and shape is the
  converter's own), then llama-quantize (no --pure, no importance matrix) writes each file type in FTYPES. Each
  output is read with gguf.GGUFReader: {tensor name: ggml type name} and general.file_type are recorded, with
  the lines of llama-quantize's log about fallbacks (tensors whose rows do not fit the chosen type's blocks).
  A file type llama-quantize refuses is recorded with "refused": true and the end of its log. The temporary
  GGUFs are deleted. The type choice depends only on tensor names, shapes and model hyper-parameters, never on
  the weight values, so the weights are simply transformers' seeded default initialisation.

Deterministic: the matrices come from seeded generators, ggml's quantizers and llama-quantize are deterministic
(two runs give identical files).
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

import transformers
from gguf import GGUFReader, GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_gguf_fixtures import FTYPE_NAMES, convert, find_llama_cpp, llama_commit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# Part 1: quantization error references
# --------------------------------------------------------------------------------------------------
QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]

# Reads NROWS x N_PER_ROW float32 values, quantizes them with ggml (no importance matrix), writes the quantized
# rows to OUT.q and ggml's dequantization of them (float32) to OUT.deq.
QUANT_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "ggml.h"

static void die(const char * msg) { fprintf(stderr, "quant: %s\n", msg); exit(1); }

int main(int argc, char ** argv) {
    if (argc != 7) die("usage: quant TYPE IN.f32 NROWS N_PER_ROW OUT.q OUT.deq");
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * name = ggml_type_name((enum ggml_type) t);
        if (name && strcasecmp(name, argv[1]) == 0) { type = t; break; }
    }
    if (type < 0) die("unknown type");
    const int64_t nrows = atoll(argv[3]), n_per_row = atoll(argv[4]);
    const int64_t n = nrows * n_per_row;
    float * src = malloc(n * sizeof(float));
    FILE * f = fopen(argv[2], "rb");
    if (!f || fread(src, sizeof(float), n, f) != (size_t) n) die("cannot read input");
    fclose(f);
    const size_t row_size = ggml_row_size((enum ggml_type) type, n_per_row);
    void * dst = calloc(nrows, row_size);
    ggml_quantize_init((enum ggml_type) type);
    const size_t got = ggml_quantize_chunk((enum ggml_type) type, src, dst, 0, nrows, n_per_row, NULL);
    if (got != nrows * row_size) die("unexpected quantized size");
    if (!ggml_validate_row_data((enum ggml_type) type, dst, got)) die("ggml_validate_row_data failed");
    float * deq = malloc(n * sizeof(float));
    ggml_get_type_traits((enum ggml_type) type)->to_float(dst, deq, n);
    f = fopen(argv[5], "wb");
    if (!f || fwrite(dst, 1, got, f) != got) die("cannot write OUT.q");
    fclose(f);
    f = fopen(argv[6], "wb");
    if (!f || fwrite(deq, sizeof(float), n, f) != (size_t) n) die("cannot write OUT.deq");
    fclose(f);
    ggml_quantize_free();
    return 0;
}
"""

MATRIX_SEEDS = {"gauss": 101, "heavy": 102, "ramp": 103}


def make_matrices():
    """The test matrices, float32 [rows, n_per_row]."""
    m = {}
    g = np.random.default_rng(MATRIX_SEEDS["gauss"])
    m["gauss"] = (g.standard_normal((64, 1024)) * 0.02).astype(np.float32)

    g = np.random.default_rng(MATRIX_SEEDS["heavy"])
    m["heavy"] = (g.standard_t(3, (48, 768)) * 0.02).astype(np.float32)

    # 16 rows of 512 (16 blocks of 32, 2 super-blocks of 256 per row), one special case per row.
    g = np.random.default_rng(MATRIX_SEEDS["ramp"])
    r = g.standard_normal((16, 512)) * 0.02
    for b in (0, 5, 15):                                   # row 0: some all-zero blocks of 32
        r[0, 32 * b:32 * b + 32] = 0.0
    r[1, 64:96] = 0.05                                     # row 1: constant blocks (positive, negative, tiny)
    r[1, 224:256] = -0.03
    r[1, 288:320] = 1e-3
    r[2, 77] = 4.0                                         # row 2: one huge value
    r[3, 300] = -6.0                                       # row 3: one huge negative value
    r[4] = 0.0                                             # row 4: all zero
    r[5] = np.linspace(-0.1, 0.1, 512)                     # row 5: a linear ramp over the row
    r[6] = np.concatenate([np.linspace(0.0, 0.005 * (b + 1), 32) for b in range(16)])  # row 6: a ramp per block
    r[7, :256] = 0.0                                       # row 7: a zero super-block holding one value
    r[7, 100] = 0.5
    r[8] = 0.02                                            # row 8: the whole row constant
    r[9] *= 1e-4                                           # row 9: tiny values (scales near f16's subnormals)
    r[10] *= 50.0                                          # row 10: large values (std 1)
    r[11] = np.abs(r[11])                                  # row 11: all positive
    r[12] = -np.abs(r[12])                                 # row 12: all negative
    r[13] = 0.01 * np.where(np.arange(512) % 2 == 0, 1.0, -1.0)  # row 13: alternating +-0.01
    r[14, 10] = 2.0                                        # row 14: one large value per super-block
    r[14, 266] = -2.0
    r[15] *= g.random(512) < 0.1                           # row 15: sparse (about 90 % zeros)
    m["ramp"] = r.astype(np.float32)
    return m


RAMP_ROWS = [
    "0: gaussian (std 0.02) with all-zero blocks 0, 5, 15", "1: gaussian with constant blocks 2 (0.05), 7 (-0.03), "
    "9 (0.001)", "2: gaussian with 4.0 at column 77", "3: gaussian with -6.0 at column 300", "4: all zero",
    "5: linspace(-0.1, 0.1, 512)", "6: block b is linspace(0, 0.005 (b + 1), 32)",
    "7: columns 0..255 zero but 0.5 at column 100, then gaussian", "8: constant 0.02", "9: gaussian, std 2e-6",
    "10: gaussian, std 1", "11: |gaussian|", "12: -|gaussian|", "13: +0.01, -0.01 alternating",
    "14: gaussian with 2.0 at column 10 and -2.0 at column 266", "15: gaussian with about 90 % of values zeroed",
]


def build_quant_tool(ll, tmp):
    src = os.path.join(tmp, "quant.c")
    exe = os.path.join(tmp, "quant")
    with open(src, "w") as f:
        f.write(QUANT_C)
    lib = os.path.join(ll, "build", "ggml", "src", "libggml-base.a")
    if not os.path.exists(lib):
        sys.exit(f"no {lib}: build llama.cpp (static ggml) first")
    # libggml-base holds C++ objects (gguf.cpp, ggml-backend.cpp) and OpenMP loops (the i-quant tables).
    cmd = ["gcc", "-O2", "-c", src, "-o", src + ".o", "-I", os.path.join(ll, "ggml", "include")]
    subprocess.run(cmd, check=True)
    cmd = ["g++", src + ".o", lib, "-o", exe, "-fopenmp", "-lm", "-lpthread"]
    subprocess.run(cmd, check=True)
    return exe


def ggml_quantize(exe, tname, x, tmp):
    inp, q, deq = (os.path.join(tmp, n) for n in ("in.f32", "out.q", "out.deq"))
    np.ascontiguousarray(x, dtype="<f4").tofile(inp)
    subprocess.run([exe, tname, inp, str(x.shape[0]), str(x.shape[1]), q, deq], check=True)
    qb = np.fromfile(q, dtype=np.uint8)
    d = np.fromfile(deq, dtype="<f4").reshape(x.shape)
    return qb, d


def make_errors(ll, out, tmp):
    mats = make_matrices()
    for name, x in mats.items():
        np.save(os.path.join(out, name + ".npy"), x.astype("<f4"))
    exe = build_quant_tool(ll, tmp)
    errors = {}
    gg_diff_max = 0.0
    for tname in QUANT_TYPES:
        qt = GGMLQuantizationType[tname]
        bs, bb = GGML_QUANT_SIZES[qt]
        errors[tname] = {}
        for name, x in mats.items():
            rows, n = x.shape
            qb, ggml_deq = ggml_quantize(exe, tname, x, tmp)
            assert qb.size == rows * n // bs * bb, (tname, name, qb.size)
            deq = np.asarray(dequantize(qb.reshape(rows, n // bs * bb), qt), dtype=np.float32).reshape(rows, n)
            agree = float(np.max(np.abs(deq - ggml_deq)))
            assert agree <= 1e-6 * float(np.abs(x).max()), \
                f"{tname}/{name}: gguf and ggml dequantizations differ ({agree})"
            gg_diff_max = max(gg_diff_max, agree)
            d = deq.astype(np.float64) - x.astype(np.float64)
            rms = float(np.sqrt(np.mean(d * d)))
            xrms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
            errors[tname][name] = {
                "rms": rms, "max": float(np.max(np.abs(d))), "rel_rms": rms / xrms,
                "bytes": int(qb.size), "sha256": hashlib.sha256(qb.tobytes()).hexdigest(),
            }
            if name == "ramp":
                # one special case per row: per-row errors, so that no row hides behind row 10's large values
                errors[tname][name]["row_rms"] = [float(v) for v in np.sqrt(np.mean(d * d, axis=1))]
                errors[tname][name]["row_max"] = [float(v) for v in np.max(np.abs(d), axis=1)]
            log(f"  {tname:7s} {name:6s} rms {rms:.4e} rel {rms / xrms:.4f} max {errors[tname][name]['max']:.4e}")
    res = {
        "about": "errors of ggml's own quantizers (ggml_quantize_chunk, no importance matrix, as llama-quantize "
                 "without --imatrix) on the matrices <name>.npy, dequantized with gguf.quants.dequantize: "
                 "rms = sqrt(mean((deq - x)^2)), max = max |deq - x|, rel_rms = rms / sqrt(mean(x^2)) (float64); "
                 "ramp also has row_rms / row_max, the same per row; "
                 "bytes / sha256: the quantized rows as ggml wrote them (information)",
        "generator": generator_info(ll),
        "matrices": {k: {"file": k + ".npy", "shape": list(v.shape), "dtype": "<f4",
                         "seed": MATRIX_SEEDS[k]} for k, v in mats.items()},
        "errors": errors,
        "check": {"max_abs_diff_gguf_vs_ggml_dequantization": gg_diff_max},
    }
    res["matrices"]["gauss"]["desc"] = "numpy default_rng(seed).standard_normal((64, 1024)) * 0.02"
    res["matrices"]["heavy"]["desc"] = "numpy default_rng(seed).standard_t(3, (48, 768)) * 0.02"
    res["matrices"]["ramp"]["desc"] = "gaussian (std 0.02) with one special case per row"
    res["matrices"]["ramp"]["rows"] = RAMP_ROWS
    with open(os.path.join(out, "errors.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    return res


# --------------------------------------------------------------------------------------------------
# Part 2: llama-quantize's per-tensor type choice
# --------------------------------------------------------------------------------------------------
FTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
          "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "BF16", "F16"]

VOCAB = 256
MODELS = {
    "dense28_tied": dict(arch="qwen3", desc="28 layers, tied embeddings (as Qwen3-0.6B / 1.7B / 4B); "
                                            "4 q heads / 2 kv heads (n_gqa 2, as Qwen3-0.6B / 1.7B)",
                         num_hidden_layers=28, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, tie_word_embeddings=True),
    "dense36": dict(arch="qwen3", desc="36 layers, untied (as Qwen3-8B), 4 q heads / 2 kv heads (n_gqa 2)",
                    num_hidden_layers=36, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512, tie_word_embeddings=False),
    "dense36_gqa4": dict(arch="qwen3", desc="as dense36 with 8 q heads / 2 kv heads: n_gqa 4 as in Qwen3-4B / "
                                            "8B (llama.cpp's choice for attn_v depends on n_gqa >= 4)",
                         num_hidden_layers=36, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=512, tie_word_embeddings=False),
    "moe48": dict(arch="qwen3moe", desc="48 layers, 16 experts top 4 (expert width 256), untied, 8 q heads / "
                                        "1 kv head (n_gqa 8 as Qwen3-30B-A3B)",
                  num_hidden_layers=48, hidden_size=256, num_attention_heads=8, num_key_value_heads=1,
                  intermediate_size=512, tie_word_embeddings=False, num_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "dense4_odd": dict(arch="qwen3", desc="4 layers, hidden 320 and intermediate 416 (multiples of 32, not of "
                                          "256): llama.cpp's fallback types; 5 q heads / 1 kv head",
                       num_hidden_layers=4, hidden_size=320, num_attention_heads=5, num_key_value_heads=1,
                       intermediate_size=416, tie_word_embeddings=False),
}
MODEL_SEED = 7


def hf_config(m):
    fields = {k: v for k, v in m.items() if k not in ("arch", "desc")}
    common = dict(vocab_size=VOCAB, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
                  attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kw = dict(common, **fields)
    cls = transformers.Qwen3Config if m["arch"] == "qwen3" else transformers.Qwen3MoeConfig
    return cls(**kw), dict(model_type=m["arch"], **{k: v for k, v in kw.items() if not k.endswith("_token_id")})


def run_quantize(ll, src, dst, ftype):
    threads = str(max(1, min(2, os.cpu_count() or 1)))
    cmd = [os.path.join(ll, "build", "bin", "llama-quantize"), src, dst, ftype, threads]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def fallback_lines(logtext):
    keep = []
    for line in logtext.splitlines():
        if "fallback" in line or "falling back" in line or "not divisible" in line:
            # the tensor lines start with "[  i/  n] name - [dims], type = f32, " then the warning
            i = line.find("warning:")
            keep.append((line[i:] if i >= 0 else line).strip())
    return keep


def make_mixes(ll, out, tmp):
    res = {
        "about": "llama-quantize's type for every tensor (no --pure, no --imatrix), read back with gguf.GGUFReader; "
                 "models[m].ftypes[FTYPE] = {file_type: general.file_type, file_type_name, tensors: {name: ggml type}, "
                 "fallback_log: llama-quantize's log lines about fallbacks}, or {refused: true, log_tail}",
        "generator": generator_info(ll),
        "command": "llama-quantize IN-F32.gguf OUT.gguf FTYPE 2 (IN-F32.gguf from convert_hf_to_gguf.py --outtype f32)",
        "models": {},
    }
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for key, m in MODELS.items():
        cfg, fields = hf_config(m)
        log(f"{key}: building ({m['desc']})")
        torch.manual_seed(MODEL_SEED)
        cls = transformers.Qwen3ForCausalLM if m["arch"] == "qwen3" else transformers.Qwen3MoeForCausalLM
        model = cls(cfg).float().eval()
        hf_dir = os.path.join(tmp, f"hf-{key}")
        model.save_pretrained(hf_dir)
        del model
        f32 = os.path.join(tmp, f"{key}-F32.gguf")
        convert(ll, hf_dir, f32, "f32", True, tmp)
        shutil.rmtree(hf_dir)
        rf = GGUFReader(f32)
        f32_shapes = {t.name: [int(s) for s in t.shape] for t in rf.tensors}
        assert all(t.tensor_type.name == "F32" for t in rf.tensors)
        del rf
        entry = {"desc": m["desc"], "config": fields, "tensor_shapes_gguf_order": f32_shapes, "ftypes": {}}
        for ft in FTYPES:
            dst = os.path.join(tmp, f"{key}-{ft}.gguf")
            rc, text = run_quantize(ll, f32, dst, ft)
            if rc != 0:
                entry["ftypes"][ft] = {"refused": True, "log_tail": text.strip().splitlines()[-12:]}
                log(f"  {ft}: llama-quantize refused (rc {rc})")
                continue
            r = GGUFReader(dst)
            fto = r.fields["general.file_type"].contents()
            tensors = {t.name: t.tensor_type.name for t in r.tensors}
            assert set(tensors) == set(f32_shapes), f"{key}-{ft}: tensor set differs from the F32 file"
            del r
            os.remove(dst)
            e = {"file_type": int(fto), "file_type_name": FTYPE_NAMES.get(int(fto), str(fto)), "tensors": tensors}
            fb = fallback_lines(text)
            if fb:
                e["fallback_log"] = fb
            entry["ftypes"][ft] = e
            counts = {}
            for t in tensors.values():
                counts[t] = counts.get(t, 0) + 1
            log(f"  {ft}: file_type {fto}, {counts}" + (f", {len(fb)} fallback lines" if fb else ""))
        os.remove(f32)
        res["models"][key] = entry
    with open(os.path.join(out, "mixes.json"), "w") as f:
        json.dump(res, f, separators=(",", ":"))
        f.write("\n")
    return res


# --------------------------------------------------------------------------------------------------
def log(*a):
    print(*a, file=sys.stderr, flush=True)


def generator_info(ll):
    return {
        "script": "python/make_quantize_refs.py",
        "llama.cpp commit": llama_commit(ll),
        "gguf (PyPI)": importlib.metadata.version("gguf"),
        "numpy": np.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "quantize"))
    ap.add_argument("--llama-cpp")
    ap.add_argument("--only", help="comma-separated: errors, mixes")
    a = ap.parse_args()
    ll = find_llama_cpp(a.llama_cpp)
    only = set(a.only.split(",")) if a.only else {"errors", "mixes"}
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "errors" in only:
            make_errors(ll, a.out, tmp)
        if "mixes" in only:
            make_mixes(ll, a.out, tmp)


if __name__ == "__main__":
    main()
