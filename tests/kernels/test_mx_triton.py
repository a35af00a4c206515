"""The MX / NVFP4 Triton decode kernels (GEMV at M = 1, tl.dot GEMM at M = 2..16) against the
reference dequantization in lowbit.formats.mx.

Without a GPU they run under TRITON_INTERPRET=1 on small shapes (the setup, and the interpreter
patch, come from test_triton_kernels); with one, compiled, plus full-size `cuda` tests.
"""

import pytest
import torch
from test_triton_kernels import DEVICE, INTERPRETED, UNIT_ROUNDOFF, needs_gpu

from lowbit.formats import mx
from lowbit.kernels import mx_ops
from lowbit.kernels.triton.mx_weight_only import (
    GemmCfg,
    GemvCfg,
    _run,
    mx_weight_only_mm,
    nvfp4_weight_only_mm,
)
from lowbit.tensors.mx_weight import MXWeight, NVFP4Weight


@pytest.fixture(autouse=True)
def _untuned_small_shapes(request, monkeypatch):
    """Small shapes take the first launch candidate: compiling and timing every candidate for
    each of them would only slow a GPU run down (test_launch_configs covers the others; the
    full-size tests keep the tuner on)."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("LOWBIT_TRITON_AUTOTUNE", "0")


def _check(y, x, w_deq, bias):
    """y (in its own dtype) against the float64 product of the same decoded weights.

    Decoding is exact, so the error has two sources. (1) fp32 accumulation: products of a
    bf16/fp16/fp32 activation and a decoded weight round at most once, and any summation order
    of K terms (GEMV, split K, tensor-core dot, which may truncate rather than round) errs by
    at most K * 2^-23 of the sum of |products| (a worst-case bound; typical errors are ~sqrt(K)
    smaller). (2) One rounding of that fp32 result to y's dtype: UNIT_ROUNDOFF[y.dtype] of |y|
    (2^-8 for bf16: at |y| ~ 300, which 65536 outputs of std 64 reach, that is a whole unit,
    1.0, far above the fp32 term). The old check used x.float()'s fp32 roundoff for a bf16 y,
    which is why full-size layers "failed" at M = 4 and 16 with errors of 0.6-0.93."""
    ref = x.double() @ w_deq.double().t() + (0 if bias is None else bias.double())
    mag = x.double().abs() @ w_deq.double().abs().t()
    acc_err = mag * x.shape[1] * 2**-23
    tol = acc_err + (ref.abs() + acc_err) * UNIT_ROUNDOFF[y.dtype] + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, worst error/tol " \
                               f"{(err / tol).max().item():.3g}"


def _mx_layer(n, k, elem, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-8, 8, (n, 1), generator=g))
    return MXWeight.from_float(w, elem).to(DEVICE)


# Every element type through the GEMV (M = 1) and the GEMM (M = 2..16); bf16, fp16 and fp32
# activations; bias or not.
@pytest.mark.parametrize("elem,m,dtype", [
    ("fp4_e2m1", 1, torch.bfloat16), ("fp8_e4m3", 1, torch.float32),
    ("fp8_e5m2", 1, torch.float16), ("fp6_e2m3", 1, torch.bfloat16),
    ("fp6_e3m2", 1, torch.float32), ("fp4_e2m1", 3, torch.float32),
    ("fp6_e3m2", 2, torch.bfloat16), ("fp8_e5m2", 16, torch.float32),
    ("fp8_e4m3", 5, torch.float16), ("fp6_e2m3", 7, torch.float32),
])
def test_mx_kernel_matches_reference(elem, m, dtype):
    n, k = 24, 128
    q = _mx_layer(n, k, elem)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if m % 2 else None
    y = mx_weight_only_mm(x, q.qdata, q.scale, bias, elem)
    assert y.dtype == dtype and y.shape == (m, n)
    _check(y.cpu(), x.cpu(), q.dequantize(torch.float32).cpu(), None if bias is None else
           bias.cpu())


@pytest.mark.parametrize("m", [1, 5])
def test_nvfp4_kernel_matches_reference(m):
    n, k = 20, 96  # three 32-wide steps: K need not be a power of two
    q = NVFP4Weight.from_float(torch.randn(n, k)).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    y = nvfp4_weight_only_mm(x, q.qdata, q.block_scale, q.tensor_scale, None)
    assert y.dtype == torch.bfloat16
    _check(y.cpu(), x.cpu(), q.dequantize(torch.float32).cpu(), None)


# Launch configurations the tuner may pick: several K steps per program, K splits (fp32
# partial sums + the ordered reduction), several warps, rows not a multiple of the tile.
@pytest.mark.parametrize("elem,cfg", [
    ("fp4_e2m1", GemvCfg(8, 128, 1, 3, split=2)),
    ("fp4_e2m1", GemvCfg(4, 256, 2, 3)),
    ("fp6_e2m3", GemvCfg(16, 128, 1, 2, split=2)),
    ("fp8_e4m3", GemvCfg(8, 128, 4, 2, split=4)),
    ("fp4_e2m1", GemmCfg(16, 32, 64, 4, 2, split=4)),
    ("fp6_e3m2", GemmCfg(16, 64, 128, 4, 2, split=2)),
    ("nvfp4", GemvCfg(8, 128, 1, 3, split=2)),
    ("nvfp4", GemmCfg(16, 32, 64, 4, 2, split=2)),
])
def test_launch_configs(elem, cfg):
    gemv = isinstance(cfg, GemvCfg)
    n, k, m = (40, 2048, 1) if gemv else (40, 256, 4)
    if elem == "nvfp4":
        q = NVFP4Weight.from_float(torch.randn(n, k)).to(DEVICE)
        scale, ts, fmt, block = q.block_scale, q.tensor_scale, mx.E2M1, mx.NVFP4_BLOCK
    else:
        q = _mx_layer(n, k, elem, seed=1)
        scale, ts, fmt, block = q.scale, None, mx.elem_format(elem), mx.MX_BLOCK
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    y = _run(x, q.qdata, scale, ts, bias, fmt, block, config=cfg)
    _check(y.cpu(), x.cpu(), q.dequantize(torch.float32).cpu(), bias.cpu())


def _one_hot_rows(w_codes, scale, elem=None, block_scale=None, tensor_scale=None):
    """W [N, K] as the kernel decodes it, read through one-hot rows of x (exact products)."""
    n, k = w_codes.shape
    fmt = mx.E2M1 if elem is None else mx.elem_format(elem)
    qdata = mx.pack_elements(w_codes, fmt).to(DEVICE)
    cols = []
    for k0 in range(0, k, 16):
        x = torch.zeros(16, k, device=DEVICE)
        x[torch.arange(16), k0 + torch.arange(16)] = 1.0
        if elem is None:
            y = nvfp4_weight_only_mm(x, qdata, block_scale.to(DEVICE), tensor_scale.to(DEVICE),
                                     None)
        else:
            y = mx_weight_only_mm(x, qdata, scale.to(DEVICE), None, elem)
        cols.append(y.t().cpu())
    return qdata.cpu(), torch.cat(cols, dim=1)


@pytest.mark.parametrize("elem", list(mx.MX_ELEMENTS))
def test_every_code_and_scale_decodes_exactly(elem):
    """Each element code in blocks with E8M0 scales from 2^-127 to 2^111 (and the NaN scale)
    comes out as the reference dequantization gives it, bit for bit."""
    fmt = mx.elem_format(elem)
    n, k = 16, 32
    codes = torch.arange(n * k) % (1 << fmt.bits)
    codes = codes[torch.randperm(n * k, generator=torch.Generator().manual_seed(0))]
    # No Inf / NaN element codes: 0 * Inf in the other one-hot rows would be NaN (and the
    # interpreter's E4M3 decode, unlike the hardware one, does not make NaN codes NaN).
    mag = codes & ((1 << (fmt.bits - 1)) - 1)
    codes = torch.where(mag > fmt.max_code, codes - mag + fmt.max_code, codes)
    codes = codes.reshape(n, k).to(torch.uint8)
    scale = torch.tensor([0, 1, 2, 60, 100, 120, 126, 127, 128, 129, 140, 170, 200, 230, 238,
                          255], dtype=torch.uint8).reshape(n, 1)
    qdata, got = _one_hot_rows(codes, scale, elem)
    want = mx_ops.mx_weight(qdata, scale, elem, torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[-1].isnan().all() and not got[:-1].isnan().any()


def test_every_nvfp4_block_scale_decodes_exactly():
    """All 127 finite non-negative E4M3 block scales (subnormals included) and all E2M1 codes;
    a power-of-two tensor scale keeps the reference's own products exact."""
    n, k = 64, 32
    codes = (torch.arange(n * k) % 16).reshape(n, k).to(torch.uint8)
    bs_codes = torch.arange(n * 2).clamp(max=126).to(torch.uint8)
    block_scale = bs_codes.view(torch.float8_e4m3fn).reshape(n, 2)
    ts = torch.tensor([2.0**-5])
    qdata, got = _one_hot_rows(codes, None, block_scale=block_scale, tensor_scale=ts)
    want = mx_ops.nvfp4_weight(qdata, block_scale, ts, torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernel_rejects_bad_inputs():
    q = _mx_layer(8, 64, "fp4_e2m1")
    with pytest.raises(ValueError, match="rows"):
        mx_weight_only_mm(torch.randn(17, 64, device=DEVICE), q.qdata, q.scale, None, "fp4_e2m1")
    with pytest.raises(ValueError, match="do not match"):
        mx_weight_only_mm(torch.randn(1, 64, device=DEVICE), q.qdata, q.scale, None, "fp6_e2m3")
    with pytest.raises(TypeError, match="activations"):
        mx_weight_only_mm(torch.randn(1, 64, device=DEVICE).to(torch.float64), q.qdata, q.scale,
                          None, "fp4_e2m1")
    nv = NVFP4Weight.from_float(torch.randn(8, 48)).to(DEVICE)
    with pytest.raises(ValueError, match="K steps"):
        _run(torch.randn(1, 64, device=DEVICE), q.qdata, q.scale, None, None, mx.E2M1,
             mx.MX_BLOCK, config=GemvCfg(8, 128, 1, 1, split=4))
    with pytest.raises(ValueError, match="multiple of 32"):
        nvfp4_weight_only_mm(torch.randn(1, 48, device=DEVICE), nv.qdata, nv.block_scale,
                             nv.tensor_scale, None)


def test_ops_use_the_kernel_only_where_it_applies():
    """K not a multiple of 32 (possible for NVFP4) and M > 16 go to the reference instead."""
    x = torch.randn(2, 48)
    assert not mx_ops.uses_triton(x)  # CPU
    if torch.cuda.is_available():
        assert mx_ops.uses_triton(torch.randn(16, 64, device="cuda"))
        assert not mx_ops.uses_triton(torch.randn(1, 48, device="cuda"))
        assert not mx_ops.uses_triton(torch.randn(17, 64, device="cuda"))


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("elem", ["fp4_e2m1", "fp6_e2m3", "fp8_e4m3", "nvfp4"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_full_size_layers_on_gpu(elem, m):
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q = NVFP4Weight.from_float(w) if elem == "nvfp4" else MXWeight.from_float(w, elem)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert mx_ops.uses_triton(x)
    y = torch.nn.functional.linear(x, q)
    assert y.dtype == torch.bfloat16
    _check(y.cpu(), x.cpu(), q.dequantize(torch.float32).cpu(), None)
    assert not INTERPRETED
