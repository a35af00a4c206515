"""Compile the weight-only Triton kernels for Hopper (sm_90) on a machine without a GPU.

Run by test_sm90_compile.py in a subprocess, because the kernel tests import the kernels under
TRITON_INTERPRET=1, which turns them into interpreted functions that cannot be compiled. The
interpreter runs what the compiler would reject (one such bug reached the GPU machine), so
this is the CPU check that every variant builds, with:

* ``sync_loads``: plain (not prefetched) global loads left inside the main K loop, read from
  the TritonGPU IR after pipelining: each one stalls every loop step on memory latency;
* ``local_bytes``: per-thread local memory in the cubin (register spills).

Prints one JSON object per kernel variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels.triton import weight_only as wo

HOPPER = GPUTarget("cuda", 90, 32)
# Launches see these arguments divisible by 16 on Llama-sized layers (Triton specializes them),
# which decides the vector width of every load: compile with the same knowledge.
ALIGNED = {"x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr", "N", "g", "WORDS",
           "stride_xm", "stride_s"}
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "b_ptr": "*bf16", "out_ptr": "*bf16"}
# (scale pointer type, PAIRS): fp32 scales, bf16 read as is, bf16 and fp16 read as int32 pairs
SCALE_KINDS = (("*fp32", 0), ("*bf16", 0), ("*i32", 1), ("*i32", 2))


def _variants():
    """(name, kernel, runtime argument types, constexprs, warps, stages) of each variant."""
    for fmt in (wo.INT4, wo.INT8, wo.FP8):
        wpg = 128 // wo._CODES_PER_WORD[fmt]  # group of 128
        for s_type, pairs in SCALE_KINDS:
            args = {**POINTERS, "s_ptr": s_type, "z_ptr": s_type}
            common = {"FMT": fmt, "HAS_BIAS": True, "PARTIAL": False, "ASM": True, "PAIRS": pairs}
            tag = f"fmt{fmt}-{s_type[1:]}-pairs{pairs}"
            yield (f"gemv-{tag}", wo._gemv_kernel,
                   {**args, "N": "i32", "g": "i32", "WORDS": "i32", "ITERS": "i32",
                    "stride_s": "i32"},
                   {**common, "BN": 8, "NG": 2, "WPG": wpg, "STAGES": 2}, 4, 2)
            yield (f"rows-{tag}", wo._gemv_rows_kernel,
                   {**args, "M": "i32", "N": "i32", "g": "i32", "WORDS": "i32", "ITERS": "i32",
                    "stride_s": "i32", "stride_xm": "i32"},
                   {**common, "BM": 2, "BN": 8, "NG": 1, "WPG": wpg, "STAGES": 3}, 1, 3)
            yield (f"gemm-{tag}", wo._gemm_kernel,
                   {**args, "M": "i32", "N": "i32", "g": "i32", "WORDS": "i32", "ITERS": "i32",
                    "stride_xm": "i32", "stride_s": "i32"},
                   {**common, "BM": 16, "BN": 64, "NG": 1, "WPG": wpg, "GROUP_M": 8,
                    "DOT_F32": False, "SWAP": True}, 4, 3)


def _sync_loads_in_loop(ttgir: str) -> int:
    """Synchronous tt.load ops inside the kernel's (single) scf.for body."""
    start = ttgir.find("scf.for")
    if start < 0:
        return 0
    depth, body = 0, []
    for line in ttgir[start:].splitlines():
        depth += line.count("{") - line.count("}")
        body.append(line)
        if depth <= 0 and len(body) > 1:
            break
    return sum(1 for line in body if re.search(r"= tt\.load ", line))


def _local_bytes(cubin: bytes) -> int:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"LOCAL:(\d+)", usage).group(1))


def check(name, kernel, args, constexprs, warps, stages) -> dict:
    signature = {**args, **{k: "constexpr" for k in constexprs}}
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in signature}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=HOPPER, options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # reported, and failed by the test
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return {"name": name, "ok": False, "error": " | ".join(lines[-4:])[:400]}
    return {"name": name, "ok": True, "pairs": constexprs["PAIRS"],
            "sync_loads": _sync_loads_in_loop(compiled.asm["ttgir"]),
            "local_bytes": _local_bytes(compiled.asm["cubin"])}


if __name__ == "__main__":
    for variant in _variants():
        print(json.dumps(check(*variant)), flush=True)
    sys.exit(0)
