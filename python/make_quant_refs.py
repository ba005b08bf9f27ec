#!/usr/bin/env python3
"""Writes tests/quant_refs: random blocks of every quantized weight format and their
dequantization by the `gguf` Python package (pip install gguf numpy), the independent
reference crates/qwick-backend/tests/dequant.rs compares qwick's scalar dequantization with.

    python3 python/make_quant_refs.py [--out tests/quant_refs]

Each `<TYPE>.bin` is the raw block bytes (n_blocks × block_bytes) followed by the expected
values as little-endian float32 (n_blocks × block_size); see tests/quant_refs/README.md.
"""

import argparse
from pathlib import Path

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent

# Byte offsets of each format's f16 scale fields (d, and dmin or m where there is one).
# IQ1_M has none: its f16 is spread over the top nibbles of its four u16 scale words.
SCALES = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ2_XXS": [0],
    "IQ2_XS": [0],
    "IQ3_XXS": [0],
    "IQ1_S": [0],
    "IQ4_NL": [0],
    "IQ3_S": [0],
    "IQ2_S": [0],
    "IQ4_XS": [0],
    "IQ1_M": [],
}
IQ1_M_SCALE_WORDS = 48  # offset of IQ1_M's four u16 scale words


def random_f16(rng: np.random.Generator, tiny: bool) -> int:
    """Bits of a finite f16: magnitude uniform in [0.001, 0.1], or (tiny) in [1e-7, 1e-4],
    which includes f16 subnormals; random sign."""
    lo, hi = (1e-7, 1e-4) if tiny else (0.001, 0.1)
    v = rng.uniform(lo, hi) * rng.choice([-1.0, 1.0])
    bits = int(np.array([v], dtype=np.float16).view(np.uint16)[0])
    assert np.isfinite(np.array([bits], dtype=np.uint16).view(np.float16)[0])
    return bits


def make_blocks(name: str, n_random: int, rng: np.random.Generator) -> np.ndarray:
    """n_random random blocks, then two with every quant byte 0x00 and two with 0xFF (scales
    random in all of them). One random block in eight gets tiny scales."""
    block, size = GGML_QUANT_SIZES[T[name]]
    n = n_random + 4
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    blocks[n_random : n_random + 2] = 0x00
    blocks[n_random + 2 :] = 0xFF
    for b in range(n):
        tiny = b < n_random and b % 8 == 7
        for at in SCALES[name]:
            bits = random_f16(rng, tiny)
            blocks[b, at : at + 2] = [bits & 0xFF, bits >> 8]
        if name == "IQ1_M":
            bits = random_f16(rng, tiny)
            words = blocks[b, IQ1_M_SCALE_WORDS : IQ1_M_SCALE_WORDS + 8].copy().view("<u2")
            for k in range(4):
                words[k] = (int(words[k]) & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
            blocks[b, IQ1_M_SCALE_WORDS : IQ1_M_SCALE_WORDS + 8] = words.view(np.uint8)
    return blocks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests/quant_refs")
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    total = 0
    for name in SCALES:
        qtype = T[name]
        block, size = GGML_QUANT_SIZES[qtype]
        # A distinct, reproducible stream per type, so adding a type changes no other fixture.
        rng = np.random.default_rng([args.seed, qtype.value])
        n_random = 60 if block == 256 else 508
        blocks = make_blocks(name, n_random, rng)
        want = quants.dequantize(blocks.reshape(-1), qtype)
        assert want.dtype == np.float32 and want.shape == (blocks.shape[0] * block,), (name, want.dtype, want.shape)
        assert np.all(np.isfinite(want)), name
        data = blocks.tobytes() + want.astype("<f4").tobytes()
        (args.out / f"{name}.bin").write_bytes(data)
        total += len(data)
        print(f"{name:8} {blocks.shape[0]:4} blocks  {len(data):7} bytes  max |y| {np.abs(want).max():.3g}")
    print(f"total {total} bytes in {args.out}")


if __name__ == "__main__":
    main()
