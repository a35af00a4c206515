"""When lowbit's kernels launch with programmatic dependent launch (lowbit/kernels/triton/pdl.py).

A kernel launched with the PDL attribute must wait for its inputs on the device; the launch
options and the kernel's `PDL` constexpr come from one place so the two cannot disagree.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.triton import pdl  # noqa: E402


def _on(device: str) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device))


def test_off_the_gpu_kernels_launch_plainly():
    assert pdl.options(torch.zeros(1)) == {"PDL": False}


@pytest.mark.parametrize(("env", "hopper", "expected"), [
    (None, True, True), ("1", True, True), ("0", True, False), (None, False, False),
])
def test_on_cuda_it_follows_the_gpu_and_lowbit_pdl(monkeypatch, env, hopper, expected):
    if env is None:
        monkeypatch.delenv("LOWBIT_PDL", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_PDL", env)
    monkeypatch.setattr(pdl, "_hopper_or_newer", lambda index: hopper)
    assert pdl.enabled(_on("cuda:0")) is expected
    options = pdl.options(_on("cuda:0"))
    assert options == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})
