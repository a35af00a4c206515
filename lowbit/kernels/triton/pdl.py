"""Programmatic dependent launch (PDL) for the small kernels of a decode step.

A batch-1 decode step is a chain of a few hundred short kernels; each waits for the previous
one to finish, flush its writes and retire before it is even scheduled, about a microsecond of
idle GPU per boundary. On Hopper a kernel launched with the PDL attribute is scheduled while
its predecessor still runs and waits on the device (`griddepcontrol.wait`) before it reads
anything the predecessor may have written; CUDA graphs keep the attribute. Kernels that take
the `PDL` constexpr call `wait_for_inputs` before their first read of an activation (weights
may be read before it: nothing writes them) and must be launched with `options(...)`; the
others launch as usual. LOWBIT_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or more (ROCm also reports "cuda" devices)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def requested() -> bool:
    """Whether PDL is wanted at all (LOWBIT_PDL=0 says no)."""
    return os.environ.get("LOWBIT_PDL", "1") != "0"


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL."""
    return t.device.type == "cuda" and requested() and _hopper_or_newer(t.device.index or 0)


def options(t: torch.Tensor) -> dict:
    """Launch keyword arguments for a kernel with a `PDL` constexpr, for tensors on t's device."""
    return dict(PDL=True, launch_pdl=True) if enabled(t) else dict(PDL=False)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Wait until the kernels this one depends on have finished and their writes are visible,
    then let the next kernel be scheduled (it waits in turn before reading our output)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
