"""The weight-only kernels compile for Hopper without a GPU, prefetch their loads, and do not
spill (see sm90_compile.py; ~30 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.fixture(scope="module")
def variants() -> list[dict]:
    if not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[2], timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 36, run.stdout[-2000:]  # 3 kernels x 3 formats x 4 scale kinds
    return rows


def test_every_variant_compiles_for_sm90(variants):
    failed = [(v["name"], v["error"]) for v in variants if not v["ok"]]
    assert not failed


def test_group_scales_are_prefetched(variants):
    """Scales of 4 bytes, or 2-byte scales read as int32 pairs, leave no synchronous load in the
    K loop: Triton's pipeliner prefetches them with the weight words and activations. (2-byte
    scales read as such do stall; they are only used when a row holds an odd number of
    groups.)"""
    prefetched = [v for v in variants if v["ok"] and ("fp32" in v["name"] or v["pairs"])]
    assert len(prefetched) == 27
    assert [v["name"] for v in prefetched if v["sync_loads"]] == []


def test_no_register_spills(variants):
    assert [v["name"] for v in variants if v.get("local_bytes")] == []
