"""Shared benchmark plumbing: conditions, CUDA-graph timing, JSON results, torchao loading."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

# LOWBIT_RESULTS_DIR lets a GPU run write straight to the folder that is copied back.
RESULTS = Path(os.environ.get("LOWBIT_RESULTS_DIR", Path(__file__).parent / "results"))
# Compute ceilings measured on the H100 of ../shared/GPU.md (the H200 has the same SMs); the
# bandwidth ceiling differs per card, so `copy_tbps()` measures it in every run.
BF16_TFLOPS = 766.0
FP8_TFLOPS = 1386.0
INT8_TOPS = 1386.0  # dense int8 tensor-core peak is the same as fp8 on H100 (not measured)


def conditions() -> dict[str, Any]:
    """What every result records: when, where, with which versions."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    if copy_tbps.cache_info().currsize:  # measured in this run: the frac_copy_bw ceiling
        info["copy_tbps"] = copy_tbps()
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    return info


@functools.cache
def copy_tbps() -> float:
    """This GPU's device-to-device copy bandwidth, read plus written bytes per second in TB/s
    (the H100 of GPU.md: 2.97), measured once per process on 1 GiB: the ceiling that
    `frac_copy_bw` fields are relative to."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    us = time_cuda_graph(lambda: dst.copy_(src), [()], calls_per_graph=5)
    return 2 * src.numel() * src.element_size() / us / 1e6


def time_op(fn, inputs: list[tuple]) -> tuple[float, str]:
    """(microseconds, how): inside a CUDA graph when the op can be captured, else eager with
    CUDA events (launch overhead included, and said so in the results)."""
    try:
        return time_cuda_graph(fn, inputs), "cuda-graph"
    except RuntimeError:
        torch.cuda.synchronize()
    for args in inputs:
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = 20 * len(inputs)
    start.record()
    for i in range(calls):
        fn(*inputs[i % len(inputs)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls, "eager"


def time_cuda_graph(fn, inputs: list[tuple], calls_per_graph: int = 20, reps: int = 10) -> float:
    """Median microseconds per call of fn(*inputs[i]), captured in one CUDA graph.

    The graph cycles through the input sets so consecutive calls read different weights
    (the L2 does not flatter small shapes), and launch overhead is excluded as in a
    CUDA-graph decode loop.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in inputs:  # warm-up: autotuning and lazy init happen outside the graph
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_graph):
            fn(*inputs[i % len(inputs)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls_per_graph)
    times.sort()
    return times[len(times) // 2]


def _kernel_class(cand) -> str:
    if isinstance(cand, str):
        return cand
    parts = [getattr(cand, "kind", None) or type(cand).__name__]
    if getattr(cand, "bm", 1) > 1 and type(cand).__name__ == "GemvCfg":
        parts.append("rows")
    if getattr(cand, "swap", False):
        parts.append("swap")
    return "/".join(parts)


def tuner_classes(timings: list[tuple[float, object]]) -> dict[str, list]:
    """The fastest candidate of each kernel class the tuner timed for one key, as
    {class: [microseconds, candidate]}, fastest class first: shows how close the losers came."""
    best: dict[str, list] = {}
    for ms, cand in sorted(timings, key=lambda t: t[0]):
        best.setdefault(_kernel_class(cand), [round(ms * 1000, 2), str(cand)])
    return best


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def torchao_configs() -> dict[str, Any]:
    """torchao 0.18's nearest equivalents of lowbit's presets (empty if not installed)."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError:
        return {}
    return {
        "int8": Int8WeightOnlyConfig(),
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig(),
        # Its default int4 packing needs a kernel package that is not installed; tinygemm is
        # what its docs recommend (../shared/GPU.md).
        "int4-g128": Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        "int4-g64": Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"),
        "fp8": Float8WeightOnlyConfig(),
        "fp8-dynamic": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: inner tensors of subclasses (lowbit's or torchao's)."""
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(stored_bytes(getattr(inner, n)) for n in names)
    return inner.numel() * inner.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    return sum(stored_bytes(p) for p in model.parameters())
