"""Compile the quantized-linear Triton kernels for Hopper (sm_90) on a machine without a GPU.

Covers weight-only int4/int8/fp8, 2:4 sparse (bf16, int8, int4 values), MX/NVFP4 weight-only,
int8 dynamic, the fp8 row quantizer and the decode attention.

Run by test_sm90_compile.py in a subprocess, because the kernel tests import the kernels under
TRITON_INTERPRET=1, which turns them into interpreted functions. The interpreter runs code the
compiler rejects (one such bug reached the GPU machine), so this runs the public ops on CPU
tensors with a stand-in driver that reports an sm_90 GPU, and every launch only compiles, with
the arguments (and so the specializations) a real call would have. The native variants
(inline-PTX decoders, bf16 tensor-core dots; see lowbit/kernels/triton/target.py) are the ones
compiled, as on a GPU. Each launch of each tuner
candidate kind is covered: the first GEMV, multi-row GEMV, GEMM (swapped or not, split or not)
and decode-then-dense candidate of every M bucket. Per compiled kernel it prints a JSON line:

* ``sync_loads``: plain (not prefetched) global loads left inside the kernel's K loop, read
  from the TritonGPU IR after pipelining: each one stalls every loop step on memory latency;
* ``local_bytes``: per-thread local memory in the cubin (register spills);
* ``bytes_into_mma_operand``: whether stored 8-bit weights are read from shared memory straight
  into the register layout of an MMA's A operand (widened there, never written back);
* ``wgmma_in_flight``: the most Hopper MMA groups the kernel lets run while it goes on (the
  largest ``pendings`` of its waits; 0: every MMA is waited for at once);
* ``loop_instructions``: SASS instructions in the body of the kernel's main loop (the longest
  backward branch; 0 when the loop is fully unrolled or absent): per-step cost of a GEMV or
  GEMM that is bound by instructions rather than bytes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lowbit.formats import mx  # noqa: E402
from lowbit.kernels.triton import (  # noqa: E402
    decode_attention,
    dynamic,
    mx_weight_only,
    pdl,
    sparse24,
    target,
)
from lowbit.kernels.triton import weight_only as wo  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class HopperStandIn:
    """The part of Triton's CUDA driver that compiling needs: an sm_90 target, device 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _sync_loads_in_loop(ttgir: str) -> int:
    """Synchronous tt.load ops inside the kernel's first scf.for body."""
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


def _bytes_into_mma_operand(ttgir: str) -> bool:
    """A shared-memory load of an 8-bit tensor into a dot-operand A layout."""
    return re.search(r"ttg\.local_load .* -> tensor<\S+x(i8|f8E4M3FN), #ttg\.dot_op<\{opIdx = 0",
                     ttgir) is not None


def _wgmma_in_flight(ttgir: str) -> int:
    return max((int(p) for p in re.findall(r"pendings = (\d+)", ttgir)), default=0)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def _local_bytes(cubin: bytes) -> int:
    return int(re.search(r"LOCAL:(\d+)", _cuobjdump(cubin, "-res-usage")).group(1))


def _loop_instructions(cubin: bytes) -> int:
    """Instructions between the target and the source of the longest backward conditional branch
    in the SASS."""
    offsets, longest = [], 0
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        at = int(m.group(1), 16)
        offsets.append(at)
        branch = re.search(r"@!?P\d\s+BRA\s+(?:`?\(?)0x([0-9a-f]+)", m.group(2))
        if branch and int(branch.group(1), 16) < at:
            start = int(branch.group(1), 16)
            longest = max(longest, sum(1 for o in offsets if o >= start))
    return longest


class Recorder:
    """Makes every kernel launch compile only, and reports each new compiled kernel once."""

    def __init__(self) -> None:
        self.case = ""
        self.seen: set[tuple[str, str]] = set()

    def run(self, original, fn, *args, grid, warmup, **kwargs):
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        try:
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            self._emit({"kernel": name, "case": self.case, "ok": False,
                        "error": " | ".join(lines[-4:])[:400]})
            raise
        key = (name, kernel.hash)
        if key not in self.seen:
            self.seen.add(key)
            self._emit({"kernel": name, "case": self.case, "ok": True,
                        "sync_loads": _sync_loads_in_loop(kernel.asm["ttgir"]),
                        "local_bytes": _local_bytes(kernel.asm["cubin"]),
                        "bytes_into_mma_operand": _bytes_into_mma_operand(kernel.asm["ttgir"]),
                        "wgmma_in_flight": _wgmma_in_flight(kernel.asm["ttgir"]),
                        "loop_instructions": _loop_instructions(kernel.asm["cubin"])})
        return kernel

    @staticmethod
    def _emit(row: dict) -> None:
        print(json.dumps(row), flush=True)


WITH_SPLITS = [True]  # K-split variants differ only in their store: compiled for one case


def _first_of_each_kind(candidates) -> list:
    """One candidate per kernel variant the tuner could pick."""
    kinds = {}
    for c in candidates:
        if isinstance(c, str):  # a whole-op candidate (decode then dense, cuSPARSELt)
            kinds.setdefault(c, c)
            continue
        if not WITH_SPLITS[0] and c.split > 1:
            continue
        kind = (type(c).__name__, getattr(c, "kind", None), getattr(c, "swap", None),
                c.split > 1, isinstance(c, wo.GemvCfg) and c.bm > 1)
        kinds.setdefault(kind, c)
    return list(kinds.values())


def _launch_every_kind(self, key, candidates, launch, device, check=None) -> None:
    for cand in _first_of_each_kind(candidates):
        launch(cand, False)


def _weights(fmt: str, n: int, k: int, groups: int, sdtype: torch.dtype):
    scale = torch.rand(n, groups).to(sdtype)
    if fmt == "int4":
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        return q, scale, torch.rand(n, groups).to(sdtype)
    if fmt == "int8":
        return torch.randint(-128, 128, (n, k), dtype=torch.int8), scale, None
    return torch.randn(n, k).to(torch.float8_e4m3fn), scale, None


# (format, K, scale groups per row, scale dtype): bf16 and fp16 scales read in pairs, fp32
# scales, and an odd number of 2-byte groups per row (read one by one).
WEIGHT_ONLY_CASES = [
    ("int4", 4096, 32, torch.bfloat16), ("int4", 4096, 32, torch.float16),
    ("int4", 4096, 32, torch.float32), ("int4", 384, 3, torch.bfloat16),
    ("int8", 4096, 32, torch.bfloat16), ("int8", 4096, 1, torch.bfloat16),
    ("fp8", 4096, 1, torch.float32),
]
# M buckets 1, 2 (multi-row GEMV, small-M GEMM tiles), 4, 64 and 128 (decode-then-dense).
# Every case runs 1, 2 and 64 (M = 33); the first case all of them, with K splits.
MS, MS_FIRST = (1, 2, 33), (1, 2, 3, 33, 100)


def main() -> None:
    driver.set_active(HopperStandIn())
    recorder = Recorder()
    original = JITFunction.run
    JITFunction.run = lambda fn, *a, grid, warmup, **kw: recorder.run(
        original, fn, *a, grid=grid, warmup=warmup, **kw)
    wo.Tuner.run = _launch_every_kind
    pdl.enabled = lambda t: True  # compile the programmatic-dependent-launch variants
    target.native = lambda t: True  # and the inline-PTX decoders and tensor-core dots
    ops = {"int4": wo.int4_weight_only_mm, "int8": wo.int8_weight_only_mm,
           "fp8": wo.fp8_weight_only_mm}
    n = 256
    for i, (fmt, k, groups, sdtype) in enumerate(WEIGHT_ONLY_CASES):
        q, scale, zero = _weights(fmt, n, k, groups, sdtype)
        WITH_SPLITS[0] = i == 0
        for m in MS_FIRST if i == 0 else MS:
            recorder.case = f"{fmt} K={k} groups={groups} {str(sdtype)[6:]} M={m}"
            x = torch.randn(m, k, dtype=torch.bfloat16)
            args = (x, q, scale) if zero is None else (x, q, scale, zero)
            ops[fmt](*args, bias=torch.randn(n, dtype=torch.bfloat16))
    WITH_SPLITS[0] = False
    k = 4096
    meta = torch.randint(0, 256, (n, k // 8), dtype=torch.uint8)
    sparse = {0: (torch.randn(n, k // 2, dtype=torch.bfloat16), None, None),
              8: (torch.randint(-128, 128, (n, k // 2), dtype=torch.int8),
                  torch.rand(n, 32, dtype=torch.bfloat16), None),
              4: (torch.randint(0, 256, (n, k // 4), dtype=torch.uint8),
                  torch.rand(n, 32, dtype=torch.bfloat16), torch.rand(n, 32, dtype=torch.bfloat16))}
    for bits, (values, scale, zero) in sparse.items():
        for m in (1, 2, 33):
            recorder.case = f"2:4 bits={bits} M={m}"
            x = torch.randn(m, k, dtype=torch.bfloat16)
            sparse24.sparse24_mm(x, values, meta, scale, zero, None, bits)
    for name, block, nv in (("e2m1", mx.MX_BLOCK, False), ("e2m1", mx.NVFP4_BLOCK, True),
                            ("e4m3", mx.MX_BLOCK, False), ("e2m3", mx.MX_BLOCK, False)):
        fmt = mx.ELEM_FORMATS[name]
        qdata = torch.randint(0, 256, (n, k * fmt.bits // 8), dtype=torch.uint8)
        scale = torch.randint(100, 140, (n, k // block), dtype=torch.uint8)
        for m in (1, 2):
            recorder.case = f"mx {name} block={block} M={m}"
            x = torch.randn(m, k, dtype=torch.bfloat16)
            mx_weight_only._run(x, qdata, scale, torch.ones(()) if nv else None, None, fmt, block)
    for m in (1, 16, 100):
        recorder.case = f"int8 dynamic M={m}"
        x = torch.randn(m, 4096, dtype=torch.bfloat16)
        q = torch.randint(-127, 128, (n, 4096), dtype=torch.int8)
        dynamic.int8_dynamic_mm(x, q, torch.rand(n, 1), None)
        recorder.case = f"fp8 row quantize M={m}"
        dynamic.quantize_fp8_rows(x, per_row=True)
    decode_attention.exact_dot = lambda q: False  # the bf16 tensor-core dots a GPU call runs
    for batch in (1, 8):
        recorder.case = f"decode attention B={batch}"
        q = torch.randn(batch, 32, 1, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, 384, 128, dtype=torch.bfloat16) for _ in range(2))
        decode_attention.decode_attention(q, k, v, torch.tensor([200]))
        recorder.case = f"rope + cache write + decode attention B={batch}"
        qkv = torch.randn(batch, 1, 48 * 128, dtype=torch.bfloat16)
        qn, kn, vn = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
        cos, sin = torch.rand(1, 64), torch.rand(1, 64)
        decode_attention.rope_cache_attention(
            qn.view(batch, 1, 32, 128), kn.view(batch, 1, 8, 128), vn.view(batch, 1, 8, 128),
            cos, sin, k, v, torch.tensor([200]))


if __name__ == "__main__":
    main()
