"""Shared test helpers: SQNR, the CUDA skip, format-derived error predictions, and the exit of
spawned torch.distributed workers."""

from __future__ import annotations

import math
import os
import sys
from typing import NoReturn

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run in its interpreter. Triton reads this when a kernel is
    # defined, so it must be set before any test module imports lowbit's kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref = reference.double()
    noise = (ref - actual.double()).pow(2).mean().item()
    signal = ref.pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def db(ratio: float) -> float:
    return 10 * math.log10(ratio)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leave_spawned_worker() -> NoReturn:
    """End a spawned torch.distributed test worker whose checks all passed (its process group
    already destroyed) without the interpreter's teardown: there a thread torch leaves running
    aborts the process now and then ("terminate called without an active exception", torch 2.13
    with gloo, one run in 6-14 here), which fails the test after everything was checked. Forked
    workers need none of this: multiprocessing already ends them with os._exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
