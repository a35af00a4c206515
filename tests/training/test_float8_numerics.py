"""The emulated fp8 training linear against float64 references, for every recipe.

Two oracles per GEMM:
1. An independent fp8 rounding written here (amax / fp8_max scale, divide, clamp, cast) with
   the scale shared along the GEMM's contraction dim, multiplied in float64. The emulation must
   match it up to float32 accumulation error: this pins down format, axis and scaling of each
   of the three GEMMs.
2. The exact float64 GEMM of the unrounded operands. The difference must stay within the
   worst-case bound that the fp8 format implies (derived in `_rounding_error_bound`).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.training import Float8TrainingRecipe, float8_linear

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]
MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
MIN_NORMAL_EXP = {torch.float8_e4m3fn: -6, torch.float8_e5m2: -14}


def _fp8_round(t: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool):
    """(dequantized float64 values, per-element error bound) of the oracle's fp8 rounding.

    dim: the contraction dim the scale is shared along; None for one scale per tensor.
    """
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (amax.float() / torch.finfo(dtype).max).clamp(min=1e-12)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (t.float() / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    deq = q.double() * scale.double()
    m = MANTISSA_BITS[dtype]
    # Round to nearest: relative error <= 2^-(m+1) for normal values; subnormals have a fixed
    # spacing 2^(emin - m), so absolute error <= half of it, times the scale.
    bound = 2.0 ** -(m + 1) * t.double().abs() + 2.0 ** (MIN_NORMAL_EXP[dtype] - m - 1) * scale
    return deq, bound


def _gemm_bound(a, ea, b, eb, a_hat, b_hat):
    """|A^ B^ - A B| <= |A| eB + eA |B| + eA eB (rounding), plus float32 accumulation of
    K products of decoded operands (each decode a float32 multiply): gamma_(K+2) |A^||B^|."""
    k = a.shape[1]
    gamma = (k + 2) * 2.0**-24 / (1 - (k + 2) * 2.0**-24)
    return (a.abs() @ eb + ea @ b.abs() + ea @ eb) + gamma * (a_hat.abs() @ b_hat.abs())


def _run(recipe_name, x, w, grad_out, power_of_2=None):
    recipe = Float8TrainingRecipe.from_name(recipe_name, power_of_2_scales=power_of_2)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = float8_linear(x, w, None, recipe)
    y.backward(grad_out)
    return recipe, y.detach(), x.grad, w.grad


def _inputs(m=48, k=64, n=32):
    # Rows and columns of very different magnitudes: per-row and per-tensor scales differ,
    # and small values fall into the subnormal range under a per-tensor scale.
    x = torch.randn(m, k) * torch.logspace(-2, 1, m)[:, None]
    w = torch.randn(n, k) * torch.logspace(-1, 0.5, k)[None, :] * 0.1
    g = torch.randn(m, n) * torch.logspace(-3, 0, n)[None, :]
    return x, w, g


def _check(out, a, a_spec, b, b_spec, recipe):
    """out ~= a @ b with a [M, K] contracted on dim 1 and b [K, N] on dim 0."""
    rowwise, pow2 = recipe.rowwise, recipe.power_of_2_scales
    a_hat, ea = _fp8_round(a, a_spec, 1 if rowwise else None, pow2)
    b_hat, eb = _fp8_round(b, b_spec, 0 if rowwise else None, pow2)
    fp8_ref = a_hat @ b_hat
    k = a.shape[1]
    # Oracle 1: same fp8 values; only float32 accumulation differs (gamma_(K+2) bound).
    accum = (k + 2) * 2.0**-24 * (a_hat.abs() @ b_hat.abs())
    assert ((out.double() - fp8_ref).abs() <= accum).all()
    # Oracle 2: exact float64 GEMM of the unrounded operands, within the fp8 bound.
    exact = a.double() @ b.double()
    bound = _gemm_bound(a.double(), ea, b.double(), eb, a_hat, b_hat)
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_forward_and_grads_match_fp8_oracle_and_float64(recipe_name):
    x, w, g = _inputs()
    recipe, y, gx, gw = _run(recipe_name, x, w, g)
    fwd, grad = recipe.forward_dtype, recipe.grad_dtype
    _check(y, x, fwd, w.t(), fwd, recipe)
    _check(gx, g, grad, w, fwd, recipe)
    if recipe.grad_weight_high_precision:
        # float32 GEMM of unrounded operands: error <= gamma_M |g^T| |x| (M = 48 tokens).
        exact = g.double().t() @ x.double()
        gamma = x.shape[0] * 2.0**-24
        bound = gamma * (g.double().abs().t() @ x.double().abs())
        assert ((gw.double() - exact).abs() <= bound).all()
    else:
        _check(gw, g.t(), grad, x, fwd, recipe)


def test_recipe_formats():
    # Tensorwise carries gradients in e5m2 (range), rowwise in e4m3 (precision; per-row scales
    # already cover the range).
    assert Float8TrainingRecipe.from_name("tensorwise").grad_dtype == torch.float8_e5m2
    assert Float8TrainingRecipe.from_name("rowwise").grad_dtype == torch.float8_e4m3fn
    assert Float8TrainingRecipe.from_name("rowwise").power_of_2_scales
    assert Float8TrainingRecipe.from_name("rowwise_with_gw_hp").grad_weight_high_precision


def test_e5m2_grads_are_coarser_than_e4m3():
    # The same tensorwise recipe with e4m3 gradients must give a more accurate grad-input:
    # one fewer mantissa bit doubles the rounding error (about 6 dB of SQNR).
    x, w, g = _inputs()
    exact = g.double() @ w.double()
    errors = {}
    for dtype in (torch.float8_e5m2, torch.float8_e4m3fn):
        recipe = Float8TrainingRecipe("custom", "tensor", grad_dtype=dtype)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        float8_linear(xx, ww, None, recipe).backward(g)
        errors[dtype] = (xx.grad.double() - exact).pow(2).mean().item()
    assert errors[torch.float8_e5m2] > 2 * errors[torch.float8_e4m3fn]


@pytest.mark.parametrize("power_of_2", [False, True])
def test_rowwise_power_of_2_option(power_of_2):
    x, w, g = _inputs()
    recipe, y, gx, gw = _run("rowwise", x, w, g, power_of_2=power_of_2)
    assert recipe.power_of_2_scales is power_of_2
    _check(y, x, recipe.forward_dtype, w.t(), recipe.forward_dtype, recipe)
    _check(gw, g.t(), recipe.grad_dtype, x, recipe.forward_dtype, recipe)


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_bfloat16_3d_input_and_bias(recipe_name):
    x, w, _ = _inputs()
    x3 = x.reshape(2, 24, 64).bfloat16().requires_grad_()
    wb = w.bfloat16().requires_grad_()
    bias = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    y = float8_linear(x3, wb, bias, recipe_name)
    assert y.shape == (2, 24, 32) and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x3.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert torch.equal(bias.grad, (2 * y.float()).sum((0, 1)).bfloat16())
    # fp8 operands (3-4 significant bits) against the bf16 GEMM: 2^-4 relative per operand
    # gives SQNR of roughly 20 log10(2^4) + a few dB from averaging over K; 20 dB is safe.
    ref = torch.nn.functional.linear(x3.float(), wb.float(), bias.float())
    signal = ref.pow(2).mean()
    noise = (y.float() - ref).pow(2).mean()
    assert 10 * torch.log10(signal / noise) > 20


def test_bad_inputs_raise_clear_errors():
    x, w, _ = _inputs()
    with pytest.raises(TypeError, match="dtype"):
        float8_linear(x.bfloat16(), w, None, "tensorwise")
    with pytest.raises(ValueError, match="features"):
        float8_linear(x[:, :32], w, None, "tensorwise")
    with pytest.raises(ValueError, match="recipe"):
        float8_linear(x, w, None, "blockwise")
    with pytest.raises(ValueError, match="granularity"):
        Float8TrainingRecipe("x", "column")
    with pytest.raises(ValueError, match="grad_dtype"):
        Float8TrainingRecipe("x", "tensor", grad_dtype=torch.bfloat16)
