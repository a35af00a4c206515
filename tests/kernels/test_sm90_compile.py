"""The quantized-linear kernels compile for Hopper without a GPU, prefetch their loads, and do
not spill (see sm90_compile.py; about two minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Kernels whose K loops read group scales: all of them are prefetched.
PREFETCHED = {"weight_only._gemv_kernel", "weight_only._gemv_rows_kernel",
              "weight_only._gemm_kernel", "sparse24._gemv_kernel", "sparse24._dot_kernel"}


@pytest.fixture(scope="module")
def kernels() -> list[dict]:
    if not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[2], timeout=1200)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    failed = [(r["kernel"], r["case"], r["error"]) for r in rows if not r["ok"]]
    assert not failed
    assert run.returncode == 0, run.stderr[-3000:]
    return rows


def test_every_kernel_compiles_for_sm90(kernels):
    names = {r["kernel"] for r in kernels}
    assert PREFETCHED | {
        "dequant._dequant_kernel", "weight_only._splitk_reduce_kernel", "sparse24._expand_kernel",
        "dynamic._int8_gemm_kernel", "dynamic._quantize_rows_kernel",
        "dynamic._quantize_rows_fp8_kernel", "mx_weight_only._mx_gemv_kernel",
        "mx_weight_only._mx_gemm_kernel", "decode_attention._partial_kernel",
        "decode_attention._merge_kernel", "upcast_gemm._upcast_gemm_kernel"} <= names


def test_quantized_weight_loops_have_no_synchronous_loads(kernels):
    """In the weight-only and 2:4 kernels, words, activations and group scales are all
    prefetched by Triton's pipeliner: 4-byte scales as they are, 2-byte scales read as int32
    pairs, a single scale per row read once before the loop. Only an odd number of 2-byte
    groups per row (tiny K) reads them one by one in the loop. (The MX GEMM still reads its
    1-byte block scales in the loop.)"""
    checked = [r for r in kernels if r["kernel"] in PREFETCHED and "groups=3 " not in r["case"]]
    assert len(checked) >= 40
    assert [(r["kernel"], r["case"]) for r in checked if r["sync_loads"]] == []


def test_no_register_spills(kernels):
    assert [(r["kernel"], r["case"]) for r in kernels if r["local_bytes"]] == []


def test_upcast_gemm_widens_weights_in_mma_registers(kernels):
    """The upcast GEMM exists for this: stored weight bytes go from the pipeline's shared
    buffer straight into the wgmma A-operand registers, widened there (Triton hoists the
    operand layout through the widening). Should a Triton upgrade stop doing that, the kernel
    is back to the decoded tile's shared-memory round trip, and this says so."""
    rows = [r for r in kernels if r["kernel"] == "upcast_gemm._upcast_gemm_kernel"]
    assert len(rows) >= 3  # int8 with group scales, int8 and fp8 with one scale per row
    assert [r["case"] for r in rows if not r["bytes_into_mma_operand"]] == []
    # A single scale per row is read once; per-group scales are read a step ahead by hand
    # (they do not feed the dot, so the pipeliner leaves them), which the IR shows as loads.
    assert [r["case"] for r in rows if "groups=1 " in r["case"] and r["sync_loads"]] == []
    # With one scale per row the MMAs form one accumulator chain and stay in flight across K
    # steps (as in the tl.dot GEMM); group scales make each step wait for its own MMA.
    assert [r["case"] for r in rows if "groups=1 " in r["case"] and not r["wgmma_in_flight"]] == []


def test_loop_instructions_are_counted(kernels):
    """The SASS loop counter behind docs/sparsity-speed.md finds the K loop of the M = 1 GEMVs
    (each a few hundred instructions a step); a parsing change that finds nothing says so."""
    gemvs = [r for r in kernels if r["kernel"].endswith("_gemv_kernel") and r["case"].endswith(
        "M=1") and "K=384" not in r["case"]]
    assert gemvs and all(100 < r["loop_instructions"] < 5000 for r in gemvs), gemvs
