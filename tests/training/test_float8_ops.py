"""The fp8 training linear's op: opcheck, what torch.compile sees, what is saved for
backward, no host syncs, autocast, and compiled gradients through the cuBLASLt GEMM wrapper.

Why the op exists: torch 2.11's dynamo traced the earlier autograd.Function's backward through
a fallback (taken when the backward reads a tensor's strides, as the CUDA GEMM wrapper does)
that gave all-zero compiled gradients. Now dynamo sees `lowbit::float8_train_mm_v2`, whose
registered backward (casts and GEMMs, plain tensor code) AOT autograd traces with make_fx.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.training import Float8TrainingLinear, Float8TrainingRecipe, cast_fp8, float8_linear
from lowbit.training.float8_linear import float8_train_mm

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]
TRAIN_MM = float8_train_mm._opoverload
FP8_GEMM = importlib.import_module("lowbit.training.fp8_gemm")
# torch's schema checker multiplies inputs to detect mutation, which it cannot do to float8
# tensors on CPU; the other checks still cover ops with float8 inputs.
NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(x, w, name, out_dtype):
    """float8_train_mm's arguments, casts made as float8_linear makes them."""
    r = Float8TrainingRecipe.from_name(name)
    xq, xs = cast_fp8(x.detach(), r.forward_dtype, r.rowwise, r.power_of_2_scales, axis=1)
    wq, ws = cast_fp8(w.detach(), r.forward_dtype, r.rowwise, r.power_of_2_scales, axis=1)
    return (x, w, xq, xs, wq, ws, r.rowwise, r.grad_dtype, r.power_of_2_scales,
            r.grad_weight_high_precision, out_dtype)


@pytest.mark.parametrize("recipe", RECIPES)
def test_opcheck_train_mm(recipe):
    x = torch.randn(24, 64, requires_grad=True)
    w = (torch.randn(32, 64) * 0.1).requires_grad_()
    args = _op_args(x, w, recipe, torch.float32)
    # test_aot_dispatch_dynamic also runs the registered backward under AOT autograd with
    # symbolic shapes and compares its gradients with eager.
    torch.library.opcheck(TRAIN_MM, args, test_utils=NO_SCHEMA)


@pytest.mark.parametrize("recipe", RECIPES)
def test_saved_for_backward(recipe):
    # Tensorwise keeps the 1-byte casts (one scale serves both GEMM axes); rowwise re-casts
    # along the other axis, so it keeps x and W, and no casts on top (activation memory).
    saved = []
    x = torch.randn(24, 64, requires_grad=True)
    lin = Float8TrainingLinear(64, 32, bias=False, recipe=recipe)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    dtypes = sorted(str(t.dtype) for t in saved)
    if recipe == "tensorwise":
        assert dtypes == ["torch.float32"] * 2 + ["torch.float8_e4m3fn"] * 2  # casts, scales
        assert sum(t.numel() for t in saved) == x.numel() + lin.weight.numel() + 2
    else:
        assert dtypes == ["torch.float32"] * 2
        assert {t.data_ptr() for t in saved} == {x.data_ptr(), lin.weight.data_ptr()}
    y.sum().backward()


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads tensor data back to the host (.item(), bool(t), nonzero)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"host sync inside the fp8 linear: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", RECIPES)
def test_ops_never_sync_with_host(recipe):
    # fullgraph compile cannot see inside an opaque op, so check the eager code, backward
    # included: on CUDA any of these ops would stall the step until the GPU catches up.
    x = torch.randn(24, 64, requires_grad=True)
    lin = Float8TrainingLinear(64, 32, recipe=recipe)
    with _NoHostSync():
        lin(x).square().sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # torch's recording backend
@pytest.mark.parametrize("recipe", RECIPES)
def test_compile_graphs(recipe):
    rec = AotEagerAndRecordGraphs()
    lin = Float8TrainingLinear(32, 16, recipe=recipe)
    x = torch.randn(2, 8, 32, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(lin, backend=rec, fullgraph=True)(x).sum().backward()

    def targets(graph):
        return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]

    # Dynamo's graph: the forward casts (fusible) and one float8_train_mm; no autograd.Function
    # (dynamo's speculation of its backward is what broke on torch 2.11).
    (dynamo_graph,) = rec.graphs
    assert targets(dynamo_graph).count(str(TRAIN_MM)) == 1
    assert not any("autograd_function_apply" in t for t in targets(dynamo_graph))
    # AOT autograd traces the op's body: the compiled forward calls the GEMM itself, with no
    # Python op left for the host to run per call.
    (fw,) = rec.fw_graphs
    assert not any(t.startswith("lowbit.") for t in targets(fw))
    # AOT autograd's backward is the registered formula traced into aten ops: gradient casts
    # to the recipe's fp8 dtype around two GEMMs (emulated on CPU: upcast + mm), no custom op
    # left for the host to run in Python.
    (bw,) = rec.bw_graphs
    assert targets(bw).count(str(torch.ops.aten.mm.default)) == 2
    assert not any(t.startswith("lowbit.") for t in targets(bw))
    grad_dtype = Float8TrainingRecipe.from_name(recipe).grad_dtype
    assert any(getattr(n.meta.get("val"), "dtype", None) == grad_dtype for n in bw.graph.nodes)


def test_compiled_grads_through_cublas_wrapper_equal_eager(monkeypatch):
    # The CUDA GEMM wrapper (padding, layout fix-ups that read strides) on CPU tensors:
    # torch._scaled_mm runs per-tensor scaled fp8 GEMMs on CPU (rowwise scales have no CPU
    # kernel). With the autograd.Function this failed on torch 2.11: compiled weight grad 0.
    def cuda_path(a, a_scale, b, b_scale, out_dtype, use_fast_accum=False):
        return FP8_GEMM._cuda_scaled_mm(a, a_scale, b, b_scale, out_dtype, use_fast_accum)

    monkeypatch.setattr(FP8_GEMM, "scaled_mm", cuda_path)
    lin = Float8TrainingLinear(64, 32, recipe="tensorwise", dtype=torch.bfloat16)
    x = torch.randn(2, 12, 64, dtype=torch.bfloat16, requires_grad=True)  # 24 tokens: padded
    lin(x).float().square().sum().backward()
    eager = (lin.weight.grad.clone(), x.grad.clone())
    assert eager[0].abs().sum() > 0
    lin.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    torch.compile(lin, backend="aot_eager", fullgraph=True)(x).float().square().sum().backward()
    assert torch.equal(lin.weight.grad, eager[0]) and torch.equal(x.grad, eager[1])


@pytest.mark.parametrize("recipe", RECIPES)
def test_autocast_sets_output_dtype_only(recipe):
    # Under autocast the GEMMs write the autocast dtype, as F.linear would, but the fp8 casts
    # and the emulated GEMMs keep their own precision: the result must equal the op called
    # outside autocast with a bfloat16 output, gradients included.
    x = torch.randn(24, 64, requires_grad=True)
    w = (torch.randn(32, 64) * 0.1).requires_grad_()
    g = torch.randn(24, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = float8_linear(x, w, None, recipe)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = TRAIN_MM(*_op_args(x2, w2, recipe, torch.bfloat16))
    ref.backward(g)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w.grad.dtype == torch.float32
    assert torch.equal(y, ref) and torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
