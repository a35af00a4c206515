"""Triton kernels against plain PyTorch references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set before Triton is imported) on tiny
shapes. With one, the same tiny shapes run compiled, and the ``cuda`` tests add full-size layers.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from lowbit.kernels.triton import (  # noqa: E402
    fp8_weight_only_mm,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    quantize_per_token_int8,
)


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter stores scalars as 1-element arrays and calls int() on them for
    loop bounds, which NumPy >= 2.4 refuses; read the single element instead."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_lowbit_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lowbit_patched = True
    interpreter._patch_lang_tensor = patched


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    _patch_interpreter_scalar_index()
elif not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need CUDA", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
# Largest relative error of one cast to each dtype: half an ulp for round-to-nearest on the GPU,
# a whole ulp under the interpreter, whose fp32 -> bf16/fp16 casts truncate.
UNIT_ROUNDOFF = {
    dtype: 2.0**-bits * (2 if INTERPRETED else 1)
    for dtype, bits in ((torch.bfloat16, 8), (torch.float16, 11), (torch.float32, 24))
}
needs_gpu = pytest.mark.skipif(INTERPRETED, reason="full-size layers need the compiled kernels")



# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def dequant_int4(q, scale, zero):
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1).float()
    g = codes.shape[1] // scale.shape[1]
    return (codes - zero.float().repeat_interleave(g, 1)) * scale.float().repeat_interleave(g, 1)


def dequant_scaled(q, scale):
    g = q.shape[1] // scale.shape[1]
    return q.float() * scale.float().repeat_interleave(g, 1)


def reference_quantize(x):
    amax = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
    # Divide by a tensor: CUDA torch computes `amax / 127` (a Python scalar) as amax * fp32(1/127),
    # 1 ulp off for ~4% of rows, where CPU torch and the kernel divide exactly.
    x_scale = amax / torch.full_like(amax, 127.0)
    xq = torch.round(x.float() / x_scale).clamp(-127, 127).to(torch.int8)
    return xq, x_scale


def assert_matches_linear(y, x, w, bias):
    """y vs x.float() @ w.T (+ bias), within a bound derived for fp32 accumulation.

    Per element, with S = sum_k |x_k w_k|: fp32 accumulation of K products errs by at most
    K * 2**-24 * S; weights rounded to x's dtype before the tensor-core dot add at most u * S
    (u = UNIT_ROUNDOFF[x.dtype]); rounding the output adds u * |y|.
    """
    ref = x.float() @ w.T
    bound = (x.float().abs() @ w.abs().T) * (x.shape[1] * 2.0**-24 + UNIT_ROUNDOFF[x.dtype])
    if bias is not None:
        ref = ref + bias.float()
    bound = bound + ref.abs() * UNIT_ROUNDOFF[x.dtype] + 1e-6
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.float() - ref).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3g}"


def make_x(m, k, dtype, device=DEVICE):
    return torch.randn(m, k, device=device).to(dtype)


def make_int4(n, k, g, dtype, device=DEVICE):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scale = (torch.rand(n, k // g, device=device) * 0.02 + 0.001).to(dtype)
    zero = (torch.rand(n, k // g, device=device) * 15).to(dtype)
    return q, scale, zero


def make_int8(n, k, g, dtype, device=DEVICE):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    scale = (torch.rand(n, k // g, device=device) * 0.01 + 0.001).to(dtype)
    return q, scale


def make_fp8(n, k, device=DEVICE):
    w = torch.randn(n, k, device=device) * 100
    q = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, 1, device=device) * 0.01 + 0.001
    return q, scale


def maybe_bias(n, dtype, with_bias, device=DEVICE):
    return torch.randn(n, device=device).to(dtype) if with_bias else None


# ---------------------------------------------------------------------------------------------
# Tiny shapes, every path (M == 1 is the GEMV, M > 1 the tl.dot GEMM), odd M and N for masks
# ---------------------------------------------------------------------------------------------

SMALL = [  # (M, K, N, g, dtype, bias)
    (1, 64, 16, 32, torch.bfloat16, True),
    (1, 256, 48, 256, torch.float16, False),
    (3, 128, 16, 64, torch.bfloat16, False),
    (17, 256, 48, 32, torch.float32, True),
    (33, 64, 16, 64, torch.bfloat16, True),
    (5, 128, 24, 32, torch.float16, True),  # fp16 scales read as int32 pairs
]


@pytest.mark.parametrize(("m", "k", "n", "g", "dtype", "with_bias"), SMALL)
def test_int4_weight_only_small(m, k, n, g, dtype, with_bias):
    x = make_x(m, k, dtype)
    q, scale, zero = make_int4(n, k, g, dtype)
    bias = maybe_bias(n, dtype, with_bias)
    y = int4_weight_only_mm(x, q, scale, zero, bias)
    assert_matches_linear(y, x, dequant_int4(q, scale, zero), bias)


@pytest.mark.parametrize(("m", "k", "n", "g", "dtype", "with_bias"), SMALL)
def test_int8_weight_only_small(m, k, n, g, dtype, with_bias):
    x = make_x(m, k, dtype)
    q, scale = make_int8(n, k, g, dtype)
    bias = maybe_bias(n, dtype, with_bias)
    y = int8_weight_only_mm(x, q, scale, bias)
    assert_matches_linear(y, x, dequant_scaled(q, scale), bias)


@pytest.mark.parametrize(("m", "k", "n", "dtype", "with_bias"), [
    (1, 128, 16, torch.bfloat16, True),
    (3, 64, 48, torch.float16, False),
    (17, 128, 16, torch.bfloat16, True),
])
def test_fp8_weight_only_small(m, k, n, dtype, with_bias):
    x = make_x(m, k, dtype)
    q, scale = make_fp8(n, k)
    bias = maybe_bias(n, dtype, with_bias)
    y = fp8_weight_only_mm(x, q, scale, bias)
    assert_matches_linear(y, x, dequant_scaled(q, scale), bias)


def _weights(fmt, n, k, g, dtype):
    """(packed words, scale, zero, format code, dequantized fp32 weight) for one format."""
    from lowbit.kernels.triton import weight_only as wo

    if fmt == "int4":
        q, scale, zero = make_int4(n, k, g, dtype)
        return q.view(torch.int32), scale, zero, wo.INT4, dequant_int4(q, scale, zero)
    if fmt == "int8":
        q, scale = make_int8(n, k, g, dtype)
        return q.view(torch.int32), scale, scale, wo.INT8, dequant_scaled(q, scale)
    q, scale = make_fp8(n, k)
    return q.view(torch.int32), scale, scale, wo.FP8, dequant_scaled(q, scale)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_swapped_gemm_tiles(fmt):
    """The swapped GEMM (out^T = w x^T) on a tiny shape, odd M, with bias; the tuner only
    reaches it on the GPU."""
    from lowbit.kernels.triton import weight_only as wo

    m, k, n, g = 5, 256, 80, 128
    x = make_x(m, k, torch.bfloat16)
    words, scale, zero, code, w = _weights(fmt, n, k, g, torch.bfloat16)
    bias = maybe_bias(n, torch.bfloat16, True)
    for cfg in (wo.GemmCfg(16, 64, 128, 4, 2, swap=True),
                wo.GemmCfg(16, 64, 128, 4, 2, split=2, swap=True)):
        out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
        wo._gemm_launch(cfg, False, x, words, scale, zero, bias, out, code, k // scale.shape[1])
        assert_matches_linear(out, x, w, bias)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize(("m", "k", "n", "g", "dtype"), [
    (5, 256, 80, 128, torch.bfloat16),  # two 64-row weight blocks, the second partly masked
    (17, 256, 48, 64, torch.float16),  # M over one 16-row block; fp16 scales read as pairs
    (3, 128, 16, 128, torch.float32),  # fp32 activations: fp32 dots
])
def test_upcast_gemm_tiles(fmt, m, k, n, g, dtype):
    """The upcast GEMM (codes widened in the MMA's registers, scales applied to its output)
    against the float weights: its first candidates and a K split through the workspace."""
    from lowbit.kernels.triton import upcast_gemm

    x = make_x(m, k, dtype)
    words, scale, zero, code, w = _weights(fmt, n, k, g, dtype)
    g = k // scale.shape[1]
    bias = maybe_bias(n, dtype, True)
    tiles = upcast_gemm.upcast_candidates(x, n, k, g, scale.shape[1] == 1, code)
    for cfg in [*tiles[:2], upcast_gemm.UpcastCfg(16, 64, 64, 4, 2, split=2)]:
        out = torch.empty(m, n, device=DEVICE, dtype=dtype)
        upcast_gemm.upcast_launch(cfg, False, x, words, scale, zero, bias, out, code, g)
        assert_matches_linear(out, x, w, bias)


def test_upcast_gemm_candidates():
    """Offered for int8 and fp8 at 1 < M <= 64 only (never int4, where it lost every time),
    with K steps inside a quantization group and rows of x in blocks of the M bucket (16 at
    least, the MMA's narrowest side)."""
    from lowbit.kernels.triton import upcast_gemm
    from lowbit.kernels.triton import weight_only as wo

    def cands(m, k=4096, g=128, one_group=False, fmt=wo.INT8):
        return upcast_gemm.upcast_candidates(torch.empty(m, k), 14336, k, g, one_group, fmt)

    assert cands(1) == [] and cands(65) == [] and cands(8, fmt=wo.INT4) == []
    assert cands(8, fmt=wo.FP8, g=4096, one_group=True)
    with pytest.raises(AssertionError, match="int8 and fp8"):
        upcast_gemm.upcast_launch(upcast_gemm.UpcastCfg(16, 64, 64, 4, 2), True,
                                  torch.empty(2, 128), torch.empty(64, 16, dtype=torch.int32),
                                  torch.ones(64, 1), None, None, torch.empty(2, 64), wo.INT4,
                                  128)
    assert cands(2, g=32) == []  # no 64-wide K step fits a 32-wide group
    assert {c.bm for c in cands(3)} == {16} and {c.bm for c in cands(33)} == {64}
    assert {c.bk for c in cands(8, g=64)} == {64}
    assert {c.bk for c in cands(8, g=4096, one_group=True)} == {64, 128}
    assert any(c.split > 1 for c in cands(8))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_every_multi_row_gemv_tile(fmt, m):
    """Every multi-row GEMV candidate of M's bucket (the tuner weighs them against tl.dot on the
    GPU): N = 40 leaves partial row blocks, M below the bucket masks rows of x, and the K splits
    go through the fp32 workspace."""
    from lowbit.kernels.triton import weight_only as wo

    k, n, g = 256, 40, 64
    x = make_x(m, k, torch.bfloat16)
    words, scale, zero, code, w = _weights(fmt, n, k, g, torch.bfloat16)
    g = k // scale.shape[1]
    bias = maybe_bias(n, torch.bfloat16, True)
    tiles = wo._gemv_candidates(x, n, k, g, code)
    assert tiles and all(t.bm == wo.m_bucket(m) for t in tiles)
    # K is too short for the tuned steps to split: a narrow step splits it in two.
    for cfg in [*tiles, wo.GemvCfg(4, 16, 1, 1, split=2, bm=wo.m_bucket(m))]:
        out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
        wo._gemv_launch(cfg, False, x, words, scale, zero, bias, out, code, g)
        assert_matches_linear(out, x, w, bias)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_int4_has_no_multi_row_gemv(m):
    """int4 at M > 1 goes to the tl.dot tiles only: its multi-row GEMV never won and came out
    wrong compiled at small K on the H200, so it must not be offered or launched."""
    from lowbit.kernels.triton import weight_only as wo

    k, n = 256, 40
    x = make_x(m, k, torch.bfloat16)
    words, scale, zero, code, _ = _weights("int4", n, k, 64, torch.bfloat16)
    assert wo._gemv_candidates(x, n, k, 64, code) == []
    out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        wo._gemv_launch(wo.GemvCfg(4, 128, 1, 1, bm=wo.m_bucket(m)), False, x, words, scale,
                        zero, None, out, code, 64)


def test_fp8_decodes_every_code():
    """All 254 finite e4m3 codes (subnormals, both zeros, +-448) through the bit-trick decode."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    k = 256
    q = finite.repeat(2)[:k].view(torch.float8_e4m3fn).reshape(1, k).repeat(16, 1).to(DEVICE)
    scale = torch.ones(16, 1, device=DEVICE)
    x = torch.zeros(k, k, device=DEVICE)
    x[torch.arange(k), torch.arange(k)] = 1.0  # y[m] = w[:, m] exactly
    for m in (1, k):
        y = fp8_weight_only_mm(x[:m].contiguous(), q, scale)
        assert torch.equal(y, q.float().T[:m])


@pytest.mark.parametrize(("m", "k", "dtype"), [(1, 64, torch.bfloat16), (5, 200, torch.float16),
                                               (3, 96, torch.float32)])
def test_quantize_per_token_bit_exact(m, k, dtype):
    x = make_x(m, k, dtype) * torch.logspace(-3, 3, m, device=DEVICE).unsqueeze(1).to(dtype)
    x[0, :] = 0  # all-zero row: the 1e-12 clamp keeps the scale finite
    xq, x_scale = quantize_per_token_int8(x)
    ref_q, ref_scale = reference_quantize(x)
    assert xq.dtype == torch.int8 and x_scale.dtype == torch.float32
    assert torch.equal(xq, ref_q) and torch.equal(x_scale, ref_scale)


def test_quantize_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], device=DEVICE)
    xq, x_scale = quantize_per_token_int8(x)
    assert x_scale.item() == 1.0
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]


@pytest.mark.parametrize(("m", "k", "n", "dtype", "with_bias"), [
    (1, 128, 16, torch.bfloat16, True),
    (17, 64, 48, torch.float16, False),
    (33, 128, 16, torch.float32, True),
])
def test_int8_dynamic_small(m, k, n, dtype, with_bias):
    x = make_x(m, k, dtype)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    w_scale = torch.rand(n, 1, device=DEVICE) * 0.01 + 0.001
    bias = maybe_bias(n, dtype, with_bias)
    y = int8_dynamic_mm(x, q, w_scale, bias)
    xq, x_scale = reference_quantize(x)
    ref = (xq.double() @ q.double().T).float() * x_scale * w_scale.T
    if bias is not None:
        ref = ref + bias.float()
    # The int32 product is exact; what remains is fp32 scaling and the output rounding.
    torch.testing.assert_close(y.float(), ref, rtol=1e-3 + UNIT_ROUNDOFF[dtype], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# CUDA tests: full-size layer, every dispatch bucket
# ---------------------------------------------------------------------------------------------

K_FULL, N_FULL = 4096, 14336


def sqnr_db(y, ref):
    return (10 * torch.log10(ref.pow(2).sum() / (y.float() - ref).pow(2).sum())).item()


def linear_ref(x, w, bias):
    """fp32 reference from the same dequantized weights."""
    ref = x.float() @ w.T
    return ref + bias.float() if bias is not None else ref


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [1, 8, 16, 64, 256])
def test_int4_full_size(m):
    x = make_x(m, K_FULL, torch.bfloat16)
    q, scale, zero = make_int4(N_FULL, K_FULL, 128, torch.bfloat16)
    bias = maybe_bias(N_FULL, torch.bfloat16, True)
    y = int4_weight_only_mm(x, q, scale, zero, bias)
    assert sqnr_db(y, linear_ref(x, dequant_int4(q, scale, zero), bias)) > 40


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_int8_full_size(m):
    x = make_x(m, K_FULL, torch.bfloat16)
    q, scale = make_int8(N_FULL, K_FULL, 128, torch.bfloat16)
    y = int8_weight_only_mm(x, q, scale)
    assert sqnr_db(y, linear_ref(x, dequant_scaled(q, scale), None)) > 40


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_fp8_full_size(m):
    x = make_x(m, K_FULL, torch.bfloat16)
    q, scale = make_fp8(N_FULL, K_FULL)
    y = fp8_weight_only_mm(x, q, scale)
    assert sqnr_db(y, linear_ref(x, dequant_scaled(q, scale), None)) > 40


def _check_every_tile(m, fmt, tiles_of, launch):
    """Run every tile tiles_of(x, g, format code) gives on a full-size layer with launch (a
    kernel module's launch function), each against the float reference."""
    x = make_x(m, K_FULL, torch.bfloat16)
    words, scale, zero, code, w = _weights(fmt, N_FULL, K_FULL, 128, torch.bfloat16)
    bias = maybe_bias(N_FULL, torch.bfloat16, True)
    ref = linear_ref(x, w, bias)
    g = K_FULL // scale.shape[1]
    tiles = tiles_of(x, g, code)
    assert tiles
    for cfg in tiles:
        out = torch.empty(m, N_FULL, device=DEVICE, dtype=torch.bfloat16)
        launch(cfg, False, x, words, scale, zero, bias, out, code, g)
        assert sqnr_db(out, ref) > 40, cfg  # fp32 sums, bf16 weights and output: ~50 dB


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [8, 33])
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_every_swapped_gemm_tile(m, fmt):
    """Every swapped GEMM candidate of the small-M buckets, not only the tuner's winner."""
    from lowbit.kernels.triton import weight_only as wo

    def swapped(x, g, code):
        return [t for t in wo.gemm_candidates(wo._GEMM_TILES, x, N_FULL, K_FULL, g, 32) if t.swap]

    _check_every_tile(m, fmt, swapped, wo._gemm_launch)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [2, 8, 33, 64])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_every_upcast_gemm_tile(m, fmt):
    """Every upcast GEMM candidate, compiled (codes widened in the wgmma registers), full size."""
    from lowbit.kernels.triton import upcast_gemm

    _check_every_tile(m, fmt, lambda x, g, code: upcast_gemm.upcast_candidates(
        x, N_FULL, K_FULL, g, g == K_FULL, code), upcast_gemm.upcast_launch)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_every_multi_row_gemv_tile_full_size(m, fmt):
    """Every multi-row GEMV candidate of M's bucket, compiled, on a full-size layer."""
    from lowbit.kernels.triton import weight_only as wo

    _check_every_tile(m, fmt, lambda x, g, code: wo._gemv_candidates(x, N_FULL, K_FULL, g, code),
                      wo._gemv_launch)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_int8_dynamic_full_size(m):
    x = make_x(m, K_FULL, torch.bfloat16)
    q = torch.randint(-127, 128, (N_FULL, K_FULL), dtype=torch.int8, device=DEVICE)
    w_scale = torch.rand(N_FULL, 1, device=DEVICE) * 0.01 + 0.001
    bias = maybe_bias(N_FULL, torch.bfloat16, True)
    xq, x_scale = quantize_per_token_int8(x)
    ref_q, ref_scale = reference_quantize(x)
    assert torch.equal(xq, ref_q) and torch.equal(x_scale, ref_scale)
    y = int8_dynamic_mm(x, q, w_scale, bias)
    ref = (ref_q.double() @ q.double().T).float() * ref_scale * w_scale.T + bias.float()
    # Exact int32 product (checked in float64); fp32 scaling, then the bf16 output rounding.
    torch.testing.assert_close(y.float(), ref, rtol=1e-3 + UNIT_ROUNDOFF[x.dtype], atol=1e-2)
    assert sqnr_db(y, ref) > 40


# ---------------------------------------------------------------------------------------------
# Dense decode (the large-M candidate)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_dequantize_words_matches_the_format(fmt):
    """The decode kernel gives the reference dequantization up to fp32 rounding."""
    from lowbit.kernels.triton.dequant import dequantize_words
    from lowbit.kernels.triton.weight_only import FP8, INT4, INT8
    from lowbit.quantize import Float8WeightOnly, Int4WeightOnly, Int8WeightOnly, quantize_weight

    cfg, code, cpw = {
        "int4": (Int4WeightOnly(32), INT4, 8),
        "int8": (Int8WeightOnly(), INT8, 4),
        "fp8": (Float8WeightOnly(), FP8, 4),
    }[fmt]
    q = quantize_weight(cfg, torch.randn(24, 128)).to(DEVICE)
    zero = q.zero if getattr(q, "zero", None) is not None else q.scale
    words = q.qdata.contiguous().view(torch.int32)
    dense = dequantize_words(words, q.scale, zero, code, cpw, 128, torch.float32)
    # int4 decodes as (128 + code) * s - (zero + 128) * s: two fp32 roundings of numbers up to
    # ~144 * s, so the error bound is ~2 ulp of that, not of w itself.
    atol = 2 * 2.0**-24 * 144 * q.scale.abs().max().item() if fmt == "int4" else 0.0
    torch.testing.assert_close(dense, q.dequantize(torch.float32), rtol=1e-6, atol=atol)


@pytest.mark.cuda
@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_row_quantizer_matches_reference(per_row):
    """One fused pass gives the reference's scales (to an ulp: torch on CUDA divides by a
    constant as a multiply by its reciprocal) and, for those scales, exactly its codes."""
    from lowbit.formats import saturating_cast
    from lowbit.kernels.reference import quantize_fp8_activation
    from lowbit.kernels.triton import quantize_fp8_rows

    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 3
    q, s = quantize_fp8_rows(x, per_row)
    _, s_ref = quantize_fp8_activation(x, per_row)
    torch.testing.assert_close(s, s_ref, rtol=2**-22, atol=0)
    expected = saturating_cast(x.float() / s, torch.float8_e4m3fn)
    assert torch.equal(q.float(), expected.float())
    fake, _ = quantize_fp8_rows(x, per_row, fake=True)
    torch.testing.assert_close(fake.float(), (q.float() * s).to(x.dtype).float(), rtol=0, atol=0)


def test_tuner_warns_about_candidates_that_do_not_compile():
    """A tile that needs more shared memory than the GPU has is dropped quietly; one that does
    not compile is a kernel bug and is reported (the tuner once skipped such tiles silently)."""
    import ast

    import triton

    from lowbit.kernels.triton.weight_only import runnable

    launched = []

    def launch(cand, compile_only):
        if cand == "too-big":
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        if cand == "broken":
            raise triton.CompilationError("src", ast.parse("x"), "inconsistent return shapes")
        launched.append(cand)

    with pytest.warns(RuntimeWarning, match="broken.*does not compile"):
        ok = runnable(["a", "too-big", "broken", "b"], launch)
    assert ok == ["a", "b"] and launched == ["a", "b"]


def test_tuner_drops_candidates_with_wrong_results():
    """A candidate whose output fails the reference check is never timed or picked; if every
    candidate that ran is wrong, the call fails instead of returning one of their outputs."""
    from lowbit.kernels.triton.weight_only import runnable

    last = []

    def launch(cand, compile_only):
        last[:] = [cand]

    def check():
        return not last[0].startswith("wrong")

    with pytest.warns(RuntimeWarning, match="wrong-tile.*wrong results"):
        assert runnable(["a", "wrong-tile", "b"], launch, check) == ["a", "b"]
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every Triton candidate"):
        runnable(["wrong-1", "wrong-2"], launch, check)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_tuner_check_tells_right_from_wrong_output(fmt):
    """The check the tuner runs on each candidate: passes the kernel's own output, fails it
    once one tile of output columns is off (as a miscompiled or mis-masked tile would be)."""
    from lowbit.kernels.triton import weight_only as wo

    m, k, n, g = 2, 256, 600, 64  # n > 2 x 256: the check reads the first and last columns
    x = make_x(m, k, torch.bfloat16)
    words, scale, zero, code, w = _weights(fmt, n, k, g, torch.bfloat16)
    qdata = {"int4": words.view(torch.uint8), "int8": words.view(torch.int8),
             "fp8": words.view(torch.float8_e4m3fn)}[fmt]
    zero = zero if fmt == "int4" else None
    bias = maybe_bias(n, torch.bfloat16, True)
    out = linear_ref(x, w, bias).to(torch.bfloat16)

    def matches(y, x=x):
        return wo.matches_reference(y, functools.partial(
            wo._reference_columns, x, qdata, scale, zero, bias, code))

    assert matches(out)
    for cols in (slice(0, 16), slice(n - 8, n)):
        bad = out.clone()
        bad[:, cols] = bad[:, cols] * 2 + 1
        assert not matches(bad), cols
    middle = out.clone()  # columns the check does not read: cheap on huge layers, by design
    middle[:, 300] = 1e4
    assert matches(middle)
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    assert matches(out, nan_x)


# ---------------------------------------------------------------------------------------------
# Decode attention (one new token per sequence over a KV cache)
# ---------------------------------------------------------------------------------------------


def _attention_case(batch, heads, kv_heads, dim, cache_len, dtype, device=DEVICE):
    q = torch.randn(batch, 1, heads, dim, device=device).to(dtype).transpose(1, 2)  # as the model
    k = torch.randn(batch, kv_heads, cache_len, dim, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, cache_len, dim, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4), (16, 2)])
@pytest.mark.parametrize("pos", [0, 63, 64, 150, 199])
def test_decode_attention_matches_reference(heads, kv_heads, pos):
    """4 splits of 64 positions over a 200-long cache (the last one partial): positions beyond
    input_pos and whole splits past it are left out; 1, 4 and 8 query heads per KV head."""
    from lowbit.kernels import reference as ref
    from lowbit.kernels.triton.decode_attention import decode_attention

    q, k, v = _attention_case(2, heads, kv_heads, 32, 200, torch.float32)
    input_pos = torch.tensor([pos], device=DEVICE)
    out = decode_attention(q, k, v, input_pos)
    want = ref.decode_attention(q, k, v, input_pos)
    assert out.shape == want.shape == q.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # fp32 both ways


def _projections(batch, heads, kv_heads, dim, dtype):
    """q, k, v [B, 1, heads, D] as the model has them: views into one fused qkv output."""
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return (q.view(batch, 1, heads, dim), k.view(batch, 1, kv_heads, dim),
            v.view(batch, 1, kv_heads, dim))


@pytest.mark.parametrize(("heads", "kv_heads", "dtype"), [
    (8, 2, torch.float32), (4, 4, torch.float32), (8, 2, torch.bfloat16)])
@pytest.mark.parametrize("pos", [0, 63, 64, 150, 199])
def test_rope_cache_attention_matches_reference(heads, kv_heads, dtype, pos):
    """The fused step (RoPE, cache write, split-cache attention) against rope + index_copy_ +
    SDPA: the output, and both caches (the token's rotated k and its v at `pos`, every other
    position and the cache row beyond the batch untouched). Splits of 64 positions over a
    200-long cache put `pos` first, last, alone or mid-way in its split."""
    from lowbit.kernels import reference as ref
    from lowbit.kernels.triton.decode_attention import rope_cache_attention
    from lowbit.models.llama import rope_tables

    batch, dim, cache_len = 2, 32, 200
    q, k, v = _projections(batch, heads, kv_heads, dim, dtype)
    cos, sin = rope_tables(torch.tensor([pos], device=DEVICE), dim, 10000.0)
    k_cache = torch.randn(batch + 1, kv_heads, cache_len, dim, device=DEVICE).to(dtype)
    v_cache = torch.randn(batch + 1, kv_heads, cache_len, dim, device=DEVICE).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    input_pos = torch.tensor([pos], device=DEVICE)
    want = ref.rope_cache_attention(q, k, v, cos, sin, want_k, want_v, input_pos)
    out = rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos)
    assert out.shape == want.shape == (batch, heads, 1, dim) and out.is_contiguous()
    # fp32: the same sums in another order; bf16: q, k and the probabilities rounded to bf16
    # (one ulp, 2^-8 relative) on both sides, so a rounding apart in a few of them
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    torch.testing.assert_close(k_cache, want_k, rtol=tol, atol=tol)  # the rotation, one FMA apart
    assert torch.equal(v_cache, want_v)


def test_decode_attention_splits():
    """Enough programs for ~2 per SM, every split holding a whole number of 64-position tiles
    and none empty."""
    from lowbit.kernels.triton.decode_attention import splits_for

    assert splits_for(8, 384, 132) == (6, 64)  # batch 1, 8 KV heads: one tile each
    assert splits_for(64, 8192, 132) == (5, 1664)  # batch 8: 5 splits of 26 tiles
    assert splits_for(8, 40, 132) == (1, 64)
    for heads, cache in ((8, 384), (64, 8192), (1, 1000), (300, 64)):
        splits, chunk = splits_for(heads, cache, 132)
        assert chunk % 64 == 0 and (splits - 1) * chunk < cache <= splits * chunk


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_rope_cache_attention_full_size(batch):
    """Llama-3-8B heads (32 query, 8 KV, head 128, bf16) over a 384-long cache at the first,
    a split's last and the last position, through the op the model calls, against the
    reference on the same inputs: output and caches."""
    from lowbit.kernels import ops
    from lowbit.kernels import reference as ref
    from lowbit.models.llama import rope_tables

    for pos in (0, 127, 383):
        q, k, v = _projections(batch, 32, 8, 128, torch.bfloat16)
        cos, sin = rope_tables(torch.tensor([pos], device=DEVICE), 128, 500000.0)
        k_cache = torch.randn(batch, 8, 384, 128, device=DEVICE).to(torch.bfloat16)
        v_cache = torch.randn(batch, 8, 384, 128, device=DEVICE).to(torch.bfloat16)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        input_pos = torch.tensor([pos], device=DEVICE)
        want = ref.rope_cache_attention(q, k, v, cos, sin, want_k, want_v, input_pos)
        out = ops.rope_cache_attention(q, k, v, cos, sin, k_cache, v_cache, input_pos)
        assert sqnr_db(out, want) > 40, pos  # bf16 output and probabilities: ~45-50 dB
        assert sqnr_db(k_cache, want_k) > 45, pos  # bf16 rounding of the rotated k: ~50 dB
        assert torch.equal(v_cache, want_v), pos


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_attention_full_size(batch):
    """Llama-3-8B attention (32 query heads, 8 KV heads, head 128, bf16) over a 384-long cache,
    against SDPA on the same tensors."""
    from lowbit.kernels import ops
    from lowbit.kernels import reference as ref

    q, k, v = _attention_case(batch, 32, 8, 128, 384, torch.bfloat16)
    for pos in (0, 127, 383):
        input_pos = torch.tensor([pos], device=DEVICE)
        out = ops.decode_attention(q, k, v, input_pos)
        want = ref.decode_attention(q.float(), k.float(), v.float(), input_pos)
        assert sqnr_db(out, want) > 40, pos  # bf16 output and probabilities: ~45-50 dB
