"""The quantized-linear kernels compile for Hopper without a GPU, prefetch their loads, and do
not spill (see sm90_compile.py; about a minute)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
WEIGHT_ONLY = {"_gemv_kernel", "_gemv_rows_kernel", "_gemm_kernel"}


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
    assert WEIGHT_ONLY | {"_dequant_kernel", "_splitk_reduce_kernel", "_int8_gemm_kernel",
                          "_quantize_rows_kernel", "_quantize_rows_fp8_kernel"} <= names


def test_weight_only_loops_have_no_synchronous_loads(kernels):
    """Words, activations and group scales are all prefetched by Triton's pipeliner: 4-byte
    scales as they are, 2-byte scales read as int32 pairs, a single scale per row read once
    before the loop. Only an odd number of 2-byte groups per row (tiny K) reads them one by one
    in the loop."""
    checked = [r for r in kernels if r["kernel"] in WEIGHT_ONLY and "groups=3 " not in r["case"]]
    assert len(checked) >= 30
    assert [(r["kernel"], r["case"]) for r in checked if r["sync_loads"]] == []


def test_no_register_spills(kernels):
    assert [(r["kernel"], r["case"]) for r in kernels if r["local_bytes"]] == []
