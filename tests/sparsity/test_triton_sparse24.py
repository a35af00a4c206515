"""Triton 2:4 kernels against the reference (expand + F.linear).

Without a GPU they run under TRITON_INTERPRET=1 (set before Triton is imported) on tiny
shapes, one launch configuration of each kernel at a time; the ``cuda`` tests run the full
dispatch (tuner included) on Llama-3-8B layer shapes.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from lowbit.kernels import sparse_ops  # noqa: E402
from lowbit.kernels.triton import sparse24 as tk  # noqa: E402
from lowbit.sparsity import Sparse24Weight, magnitude_mask  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    from triton.runtime import interpreter

    # Triton 3.6's interpreter hands loop bounds to int() as 1-element arrays, which NumPy >= 2.4
    # refuses (tests/kernels/test_triton_kernels.py patches the same way).
    _orig = interpreter._patch_lang_tensor
    if not getattr(_orig, "_lowbit_patched", False):
        def _patched(tensor, scope):
            _orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _patched._lowbit_patched = True
        interpreter._patch_lang_tensor = _patched
elif not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need CUDA", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
# One rounding of the output to x's dtype (a whole ulp under the interpreter, which truncates),
# plus, for the tensor-core path, the weight rounded to x's dtype before the dot.
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def make(n, k, bits, g, dtype, zero="int"):
    w = torch.randn(n, k, device=DEVICE) * 0.05
    return Sparse24Weight.from_dense(w.to(dtype), magnitude_mask(w), bits, g, zero=zero)


def check(y, x, sw, bias):
    """|y - x @ W^T| <= (K 2^-24 + 2u) sum|x w| + u |y_ref|: fp32 accumulation of K products,
    the weight rounded to x's dtype (tensor-core path) and the output rounding (u one ulp,
    doubled under the interpreter)."""
    u = UNIT[x.dtype] * (2 if INTERPRETED else 1)
    w = sw.dequantize(torch.float32)
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    bound = (x.float().abs() @ w.abs().T) * (x.shape[1] * 2.0**-24 + 2 * u) + ref.abs() * u
    err = (y.float() - ref).abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert bool((err <= bound + 1e-6).all()), f"max excess {(err - bound).max().item():.3g}"


def run_cfg(cfg, x, sw, bias):
    w = tk.pack_weights(sw.values, sw.meta, sw.scale, sw.zero, sw.bits, x.shape[1])
    out = torch.empty(x.shape[0], sw.shape[0], device=x.device, dtype=x.dtype)
    tk.launch(cfg, False, x, w, bias, out)
    return out


CASES = [  # (bits, g, zero, dtype)
    (0, 128, "int", torch.bfloat16),
    (4, 64, "int", torch.bfloat16),
    (4, 128, "float", torch.float16),
    (8, 32, "int", torch.float32),
]


@pytest.mark.parametrize(("bits", "g", "zero", "dtype"), CASES)
@pytest.mark.parametrize("cfg", [
    tk.SparseCfg("gemv", 1, 8, 128, 1, 1),
    tk.SparseCfg("gemv", 4, 4, 64, 1, 1, split=2),
    tk.SparseCfg("dot", 16, 16, 64, 1, 1),
    tk.SparseCfg("dot", 16, 16, 64, 1, 1, split=2, swap=True),
])
def test_kernels_small(bits, g, zero, dtype, cfg):
    n, k = 24, 128
    m = 1 if cfg.bm == 1 else 3
    sw = make(n, k, bits, g, dtype, zero)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    check(run_cfg(cfg, x, sw, bias), x, sw, bias)


@pytest.mark.parametrize("m", [1, 20])
def test_dispatch_entry_point(m):
    """sparse24_mm end to end: layout checks, candidate list, and the first candidate (what the
    tuner runs untimed off the GPU): the GEMV at M = 1, a tensor-core tile at M = 20."""
    sw = make(24, 128, 4, 64, torch.bfloat16)
    x = torch.randn(m, 128, device=DEVICE).to(torch.bfloat16)
    cands = tk.candidates(x, 24, 128, 64, tk.INT4)
    assert cands[0].kind == ("gemv" if m == 1 else "dot")
    assert (tk.EXPAND_THEN_DENSE in cands) == (m > 16)
    check(tk.sparse24_mm(x, sw.values, sw.meta, sw.scale, sw.zero, None, 4), x, sw, None)


@pytest.mark.parametrize(("bits", "g", "zero", "dtype"), CASES)
def test_expand_matches_reference(bits, g, zero, dtype):
    """The dense weight the large-M path multiplies with is the reference's weight, bit for bit
    (both decode in fp32 and round once to the output dtype; the interpreter truncates that
    rounding, so there the fp32 values are compared)."""
    sw = make(16, 128, bits, g, dtype, zero)
    out_dtype = torch.float32 if INTERPRETED else dtype
    w = tk.pack_weights(sw.values, sw.meta, sw.scale, sw.zero, sw.bits, 128)
    dense = tk.expand_weight(w, 128, out_dtype)
    ref = sparse_ops.expand(sw.kept(torch.float32), sw.meta, 128).to(out_dtype)
    assert torch.equal(dense, ref)


# ---------------------------------------------------------------------------------------------
# Full size on the GPU: the whole dispatch (GEMV, dot, expand + cuBLAS, cuSPARSELt)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="full-size layers need the compiled kernels")
@pytest.mark.parametrize("m", [1, 4, 16, 64, 1024])
@pytest.mark.parametrize("bits", [0, 4, 8])
def test_full_size(m, bits):
    k, n = 4096, 14336
    sw = make(n, k, bits, 128, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.nn.functional.linear(x, sw)
    ref = x.float() @ sw.dequantize(torch.float32).T
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (y.float() - ref).pow(2).sum())
    # bf16 output rounding alone gives ~50 dB; 40 leaves room for bf16 weights in the dot.
    assert sqnr.item() > 40


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="programmatic dependent launch needs the GPU")
@pytest.mark.parametrize("m", [1, 8])
def test_chained_sparse_linears_wait_for_their_inputs(monkeypatch, m):
    """With programmatic dependent launch the second linear is scheduled while the first still
    runs and must wait before reading its output: replayed from a CUDA graph, the chain gives
    exactly what it gives with PDL off (the same kernels, so the same bits)."""
    k = n = 4096
    first, second = make(n, k, 4, 128, torch.bfloat16), make(n, k, 0, 128, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def chain():
        return torch.nn.functional.linear(torch.nn.functional.linear(x, first), second)

    chain()  # tunes once, so both runs below launch the same kernels
    monkeypatch.setenv("LOWBIT_PDL", "0")
    expected = chain()
    monkeypatch.setenv("LOWBIT_PDL", "1")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("r", "c", "width"), [(70, 33, 40), (64, 64, 64), (5, 130, 136)])
def test_transpose_into(r, c, width):
    """Exact: a copy, for odd sizes and a source wider than the columns taken."""
    src = torch.randn(r, width, device=DEVICE).to(torch.bfloat16)
    out = torch.empty(c, r, device=DEVICE, dtype=torch.bfloat16)
    tk.transpose_into(src, out)
    assert torch.equal(out, src[:, :c].t())


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="full-size layers need the compiled kernels")
@pytest.mark.parametrize("m", [8, 33])
@pytest.mark.parametrize("bits", [0, 4])
def test_every_swapped_dot_tile(m, bits):
    """Each swapped tensor-core tile at full size, not only the tuner's winner."""
    k, n = 4096, 14336
    sw = make(n, k, bits, 128, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    w = tk.pack_weights(sw.values, sw.meta, sw.scale, sw.zero, sw.bits, k)
    tiles = [c for c in tk.candidates(x, n, k, w.g, w.fmt)
             if isinstance(c, tk.SparseCfg) and c.swap]
    assert tiles
    for cfg in tiles:
        check(run_cfg(cfg, x, sw, bias), x, sw, bias)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="cuSPARSELt needs the GPU")
@pytest.mark.parametrize("m", [64, 100, 1024])
def test_cusparselt_candidate(m):
    """The cuSPARSELt candidate (compressed weight, [N, M] result, transpose) against fp32."""
    if not tk.cusparselt_runs(0, torch.bfloat16):
        pytest.skip("cuSPARSELt does not run here")
    k, n = 4096, 1024
    sw = make(n, k, 0, 128, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = run_cfg(tk.CUSPARSELT, x, sw, bias)
    check(out, x, sw, bias)


@pytest.mark.parametrize(("env", "offered"), [(None, True), ("1", True), ("0", False)])
def test_cusparselt_copies_can_be_refused(monkeypatch, env, offered):
    """LOWBIT_CUSPARSELT=0 keeps float 2:4 layers to their compact weight at large M: no
    cuSPARSELt candidate, so no second copy of the weight; expand-then-dense remains."""
    from types import SimpleNamespace

    if env is None:
        monkeypatch.delenv("LOWBIT_CUSPARSELT", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_CUSPARSELT", env)
    monkeypatch.setattr(tk, "cusparselt_runs", lambda index, dtype: True)
    x = SimpleNamespace(shape=(100, 4096), dtype=torch.bfloat16, is_cuda=True,
                        device=torch.device("cuda", 0))
    cands = tk.candidates(x, 1024, 4096, 4096, tk.FLOAT)
    assert (tk.CUSPARSELT in cands) == offered and tk.EXPAND_THEN_DENSE in cands


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_tuner_check_tells_right_from_wrong_output(bits):
    """The reference check the tuner runs on each 2:4 candidate: the right output passes, one
    with a wrong first or last tile of columns fails."""
    from lowbit.kernels.triton.weight_only import matches_reference

    n, k = 600, 128
    sw = make(n, k, bits, 64, torch.bfloat16)
    x = torch.randn(3, k, device=DEVICE).to(torch.bfloat16)
    bias = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    reference = functools.partial(tk._reference_columns, x, sw.values, sw.meta, sw.scale,
                                  sw.zero, bias, bits)
    out = (x.float() @ sw.dequantize(torch.float32).T + bias.float()).to(torch.bfloat16)
    assert matches_reference(out, reference)
    for cols in (slice(0, 16), slice(n - 8, n)):
        bad = out.clone()
        bad[:, cols] = -bad[:, cols]
        assert not matches_reference(bad, reference), cols
