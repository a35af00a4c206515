"""Take a quantized model out of Python: torch.export, AOTInductor packages, ExecuTorch `.pte`.

A quantized linear exports as one opaque `lowbit::*` op (see `lowbit.kernels.ops`). That is
what AOTInductor wants on a machine with lowbit installed: the package calls lowbit's kernels
(Triton on CUDA), and the loading process only has to `import lowbit` first so the ops exist.

Runtimes without lowbit's ops (ExecuTorch, or an AOTI package meant to load without lowbit)
get a *portable* program instead: each `lowbit::*` op is replaced by its reference
implementation from `lowbit.kernels.reference`, traced into plain ATen ops (unpack the stored
codes, decode them with the `lowbit.formats` codec, fake-quantize activations where the
scheme does, `linear`). The stored int codes and scales are unchanged, and the numerics are
the reference ones that every lowbit kernel is tested against, so nothing is re-derived here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.kernels import ops
from lowbit.kernels import reference as ref

# Every op in `ops.ALL_OPS` has a reference function of the same name. The unpacking `>>`
# traces to `aten.__rshift__`, which no runtime kernel library knows by that name.
REFERENCE_DECOMPOSITIONS = {
    op._opoverload: getattr(ref, op._opoverload.__name__.split(".")[0]) for op in ops.ALL_OPS
} | {torch.ops.aten.__rshift__.Tensor: torch.ops.aten.bitwise_right_shift.Tensor}


def batch_seq_dims(example_inputs: Sequence[Any]) -> tuple:
    """Dims 0 (batch) and 1 (sequence) of every tensor input with >= 2 dims are dynamic.

    `Dim.DYNAMIC` lets export learn bounds the model itself checks (the reference Llama refuses
    more than `max_seq_len` tokens, which becomes the sequence dim's upper bound) and fails
    loudly if the model pins a dim to its example size instead.
    """
    return tuple(
        {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
        for x in example_inputs
    )


def export_quantized(
    model: nn.Module,
    example_inputs: Sequence[Any],
    dynamic_shapes: Any = None,
    *,
    portable: bool = False,
) -> ExportedProgram:
    """torch.export a (quantized) model; by default batch and sequence dims are dynamic.

    dynamic_shapes: as `torch.export.export` takes it; None means `batch_seq_dims`.
    portable: replace the `lowbit::*` ops by plain ATen ops (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_quantized takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of positional inputs, "
                        f"got {type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    if dynamic_shapes is None:
        dynamic_shapes = batch_seq_dims(example_inputs)
    with torch.no_grad():
        program = torch.export.export(model.eval(), example_inputs, dynamic_shapes=dynamic_shapes)
    return decompose_lowbit_ops(program) if portable else program


def decompose_lowbit_ops(program: ExportedProgram) -> ExportedProgram:
    """The same program with every `lowbit::*` linear traced into its ATen reference."""
    with torch.no_grad():  # an inference trace: `>>` on the packed codes stays a core ATen op
        program = program.run_decompositions(REFERENCE_DECOMPOSITIONS)
    left = sorted({str(n.target) for n in program.graph.nodes if _is_lowbit_op(n.target)})
    if left:
        raise ValueError(f"no plain-ATen decomposition for {left}; these weight formats "
                         "can only run where lowbit is imported")
    return program


class CausalLMLogits(nn.Module):
    """A transformers causal LM as `input_ids -> logits`, no KV cache: the one-tensor signature
    that export, AOTInductor and ExecuTorch runtimes call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _is_lowbit_op(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "lowbit"


def _program(
    model_or_program: nn.Module | ExportedProgram,
    example_inputs: Sequence[Any] | None,
    dynamic_shapes: Any,
    portable: bool,
) -> ExportedProgram:
    if isinstance(model_or_program, ExportedProgram):
        if example_inputs is not None or dynamic_shapes is not None:
            raise ValueError("pass example_inputs/dynamic_shapes with a model, not with an "
                             "ExportedProgram (it already fixed them)")
        return decompose_lowbit_ops(model_or_program) if portable else model_or_program
    if example_inputs is None:
        raise ValueError("example_inputs are needed to export a model")
    return export_quantized(model_or_program, example_inputs, dynamic_shapes, portable=portable)


def package_aoti(
    model_or_program: nn.Module | ExportedProgram,
    path: str | Path,
    example_inputs: Sequence[Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    portable: bool = False,
) -> Path:
    """Compile with AOTInductor into one `.pt2` package and return its path.

    Load it with `torch._inductor.aoti_load_package(path)`. Unless `portable`, the package
    calls lowbit's ops, so `import lowbit` in the loading process first; a portable package
    needs only torch (Inductor then generates the dequantize-and-matmul code itself).
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"AOTInductor packages end in .pt2, got {path.name!r}")
    program = _program(model_or_program, example_inputs, dynamic_shapes, portable)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def executorch_seq_dims(example_inputs: Sequence[Any], max_seq: int | None = None) -> tuple:
    """ExecuTorch shapes: the sequence dim is dynamic up to max_seq, batch stays fixed.

    ExecuTorch plans memory at each dynamic dim's upper bound, so the sequence dim needs one:
    max_seq, or (None) the bound the model itself checks. The batch stays at its example size
    because ExecuTorch 1.5's edge verifier calls len() on the first tensor a list-returning op
    (the `chunk` in RoPE) produces, which pins that tensor's dim 0 (the batch) anyway.
    """
    seq = Dim.DYNAMIC if max_seq is None else Dim("seq", max=max_seq)
    return tuple(
        {1: seq} if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
        for x in example_inputs
    )


def to_executorch(
    model_or_program: nn.Module | ExportedProgram,
    path: str | Path,
    example_inputs: Sequence[Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    max_seq: int | None = None,
    partitioners: Sequence[Any] | Mapping[str, Any] | None = None,
) -> Path:
    """Lower to an ExecuTorch `.pte` (portable CPU kernels unless `partitioners` delegate).

    Run it with `executorch.runtime.Runtime.get().load_program(path).load_method("forward")`.
    Dynamic dims are planned at their upper bounds, so every size export allowed runs;
    without dynamic_shapes the sequence dim is dynamic up to max_seq (`executorch_seq_dims`).
    """
    try:
        from executorch.exir import (
            EdgeCompileConfig,
            ExecutorchBackendConfig,
            to_edge_transform_and_lower,
        )
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    except ImportError as e:
        raise ModuleNotFoundError(f"to_executorch needs the executorch package: {e}") from None
    path = Path(path)
    if path.suffix != ".pte":
        raise ValueError(f"ExecuTorch programs end in .pte, got {path.name!r}")
    if example_inputs is not None and dynamic_shapes is None:
        dynamic_shapes = executorch_seq_dims(example_inputs, max_seq)
    # The edge dialect runs SDPA as its math decomposition; tracing with that backend gives
    # the strides it will have there, so views recorded after attention stay valid.
    with sdpa_kernel(SDPBackend.MATH):
        program = _program(model_or_program, example_inputs, dynamic_shapes, portable=True)
    unbounded = [str(s) for s, r in program.range_constraints.items() if math.isinf(r.upper)]
    if unbounded:
        raise ValueError(f"dynamic dims {unbounded} have no upper bound, and ExecuTorch plans "
                         "memory at the bound: pass max_seq or a Dim with max=")
    # Not core ATen, but ExecuTorch's portable kernels implement it (the int4 unpacking).
    shift = torch.ops.aten.bitwise_right_shift.Tensor
    edge_config = EdgeCompileConfig(_core_aten_ops_exception_list=[shift])
    edge = to_edge_transform_and_lower(program, partitioner=partitioners,
                                       compile_config=edge_config)
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(edge.to_executorch(config).buffer)
    return path
