#!/usr/bin/env python3
"""Writes crates/qwick-backend/src/quant/grids/*.hex: the IQ lookup grids, taken from the
`gguf` Python package (pip install gguf numpy). `grids.rs` parses them at compile time.

    python3 python/make_quant_tables.py [--out crates/qwick-backend/src/quant/grids]

gguf stores each grid as packed indices into a small value map; `init_grid` expands it to
float32. This script packs the expanded values back into GGML's own table layout: one
byte per value, element 0 in the least significant byte (rows of 8 values as 16 hex
digits, rows of 4 as 8). IQ1_S/IQ1_M values are -1/0/1 stored as `i8` bytes (0xff, 0x00,
0x01). It also checks the constants `grids.rs` writes out (sign patterns, IQ4_NL levels,
the IQ1 delta) against the package's.
"""

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import quants

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "crates/qwick-backend/src/quant/grids"


def grid_rows(cls) -> list[int]:
    """Rows of a gguf grid packed into integers, element j in byte j."""
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape)
    assert np.all(grid == np.round(grid)), cls.__name__
    rows = []
    for row in grid.astype(np.int64):
        v = 0
        for j, x in enumerate(row):
            v |= (int(x) & 0xFF) << (8 * j)
        rows.append(v)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def grid(file, cls, width):
        rows = grid_rows(cls)
        assert len(rows) == cls.grid_shape[0] and cls.grid_shape[1] == width
        digits, per_line = (16, 4) if width == 8 else (8, 8)
        lines = [" ".join(f"{v:0{digits}x}" for v in rows[i : i + per_line]) for i in range(0, len(rows), per_line)]
        (args.out / file).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / file} (gguf {gguf_version()})")

    grid("iq2xxs.hex", quants.IQ2_XXS, 8)
    grid("iq2xs.hex", quants.IQ2_XS, 8)
    grid("iq2s.hex", quants.IQ2_S, 8)
    grid("iq3xxs.hex", quants.IQ3_XXS, 4)
    grid("iq3s.hex", quants.IQ3_S, 4)
    grid("iq1s.hex", quants.IQ1_S, 8)
    assert quants.IQ1_M.grid_hex == quants.IQ1_S.grid_hex

    # grids.rs computes the sign patterns (bit 7: parity of the low seven) and writes the
    # IQ4_NL levels and the IQ1 delta out; check them against the package.
    ksigns = [int(x) for x in np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8)]
    assert ksigns == [i | ((bin(i).count("1") & 1) << 7) for i in range(128)]
    assert [int(x) for x in quants.IQ4_NL.kvalues] == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    assert float(quants.IQ1_S.delta) == float(quants.IQ1_M.delta) == 0.125


def gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return getattr(gguf, "__version__", "(unknown version)")


if __name__ == "__main__":
    main()
