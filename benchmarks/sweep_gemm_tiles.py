"""Time a wide grid of tl.dot tiles for the weight-only GEMM and compare with the shipped table.

The shipped `_GEMM_TILES` holds a few tiles per M bucket; this sweeps block sizes, warps,
pipeline stages and the swapped layout (each with its K splits), using the tuner's own
machinery: every candidate is compiled, checked against the reference and timed as the tuner
times it (CUDA graphs, cold L2, and since session 12 also right after a launch of itself;
results/gemm_sweep.json predates that and is cold-L2 only). Per (format, shape, M) it records
the grid's fastest tiles and the fastest of the shipped ones, so a table change is backed by
numbers. GPU only.

    python benchmarks/sweep_gemm_tiles.py --formats int4-g128 --ms 16,64 --out gemm_sweep
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from common import conditions, write_result  # noqa: E402

from lowbit.kernels.triton import weight_only as wo  # noqa: E402
from lowbit.quantize import preset, quantize_weight  # noqa: E402

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))


def tile_grid(bm: int) -> tuple[wo.GemmCfg, ...]:
    """Every (BN, BK, warps, stages, swap) of the sweep for row blocks of bm."""
    return tuple(wo.GemmCfg(bm, bn, bk, warps, stages, swap=swap)
                 for bn, bk, warps, stages, swap in itertools.product(
                     (64, 128, 256), (64, 128, 256), (4, 8), (2, 3, 4), (False, True)))


def shipped(m: int) -> tuple[wo.GemmCfg, ...]:
    return wo._GEMM_TILES[next(b for b in sorted(wo._GEMM_TILES) if m <= b)]


def sweep(fmt: str, k: int, n: int, m: int) -> dict:
    """Time the grid (plus the shipped tiles) for one op and shape; the fastest tiles first."""
    table = shipped(m)
    bm = min(table[0].bm, 64)
    tiles = tuple(dict.fromkeys(table + tile_grid(bm)))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quantize_weight(preset(fmt), w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    stock_tiles, wo._GEMM_TILES = wo._GEMM_TILES, {1 << 62: tiles}
    wo.TUNER = wo.Tuner()
    try:
        F.linear(x, q)
    finally:
        wo._GEMM_TILES = stock_tiles
    (timings,) = wo.TUNER.timings.values()
    ranked = sorted(timings, key=lambda t: t[0])
    g = k // q.scale.shape[-1]
    stock = set(wo.gemm_candidates({1 << 62: table}, x, n, k, g, 32))
    in_table = [t for t in ranked if t[1] in stock]
    shipped_us = round(in_table[0][0] * 1000, 2) if in_table else None
    return {"format": fmt, "K": k, "N": n, "M": m, "timed": len(ranked),
            "best_us": round(ranked[0][0] * 1000, 2), "best_tile": str(ranked[0][1]),
            "shipped_us": shipped_us, "shipped_tile": str(in_table[0][1]) if in_table else None,
            "shipped_over_best": round(shipped_us / (ranked[0][0] * 1000), 3)
            if shipped_us else None,
            "runners_up": [[round(ms * 1000, 2), str(c)] for ms, c in ranked[1:8]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="int4-g128")
    ap.add_argument("--ms", default="16,64")
    ap.add_argument("--out", default="gemm_sweep")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new sweeps after this many seconds")
    args = ap.parse_args()
    start, rows = time.time(), []
    for fmt in args.formats.split(","):
        for m in (int(s) for s in args.ms.split(",")):
            for k, n in SHAPES:
                if time.time() - start > args.budget_s:
                    print("time budget spent: stopping", flush=True)
                    break
                row = sweep(fmt, k, n, m)
                rows.append(row)
                print(f"{fmt} K={k} N={n} M={m}: {row['timed']} timed; best {row['best_us']} us "
                      f"{row['best_tile']}; shipped {row['shipped_us']} us {row['shipped_tile']} "
                      f"({time.time() - start:.0f} s)", flush=True)
                write_result(args.out, {"conditions": conditions(), "rows": rows})


if __name__ == "__main__":
    main()
