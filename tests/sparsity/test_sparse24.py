"""2:4 masks, the Sparse24Weight tensor, its ops, sparsify_ and checkpoints (CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import PerGroup
from lowbit.integrations import load_quantized, save_quantized
from lowbit.kernels import sparse_ops
from lowbit.quantize import config_from_dict, quantize_
from lowbit.sparsity import (
    Sparse24,
    Sparse24Weight,
    is_24,
    magnitude_mask,
    mask_24,
    sparsify_,
    wanda_mask,
)
from lowbit.tensors import IntWeight, UnsupportedWeight

# ---- masks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 12), (1, 4)])
def test_masks_are_exactly_24_and_keep_the_largest(shape):
    scores = torch.randn(shape)
    mask = mask_24(scores)
    assert is_24(mask)
    groups = scores.reshape(-1, 4)
    kept = groups[mask.reshape(-1, 4)].reshape(-1, 2)
    dropped = groups[~mask.reshape(-1, 4)].reshape(-1, 2)
    assert bool((kept.min(1).values >= dropped.max(1).values).all())


def test_mask_ties_keep_earlier_columns():
    mask = mask_24(torch.ones(2, 8))
    assert mask[0].tolist() == [True, True, False, False] * 2


def test_wanda_weighs_by_input_norm():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert magnitude_mask(w).tolist() == [[False, False, True, True]]
    norm = torch.tensor([10.0, 10.0, 1.0, 1.0])  # |w| * norm = 10, 20, 3, 4
    assert wanda_mask(w, norm).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="input_norm must have shape"):
        wanda_mask(w, torch.ones(3))


def test_mask_bad_input():
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_24(torch.randn(4, 6))
    with pytest.raises(ValueError, match="NaN"):
        mask_24(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))


# ---- the tensor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_exact(dtype):
    w = torch.randn(32, 64).to(dtype)
    mask = magnitude_mask(w)
    sw = Sparse24Weight.from_dense(w, mask)
    assert torch.equal(sw.dequantize(), w * mask)
    assert torch.equal(sw.mask(), mask)
    # already-2:4 weights need no mask, and come back unchanged
    again = Sparse24Weight.from_dense(sw.dequantize())
    assert torch.equal(again.values, sw.values) and torch.equal(again.meta, sw.meta)
    # 16 bits per weight dense; 8 (half the values) + 1 (a nibble per 4) for 2:4 bf16
    bits = sw.nbytes_stored() * 8 / w.numel()
    assert bits == {torch.float32: 17, torch.bfloat16: 9, torch.float16: 9}[dtype]


def test_weights_with_fewer_nonzeros_are_accepted():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 0.0]])
    sw = Sparse24Weight.from_dense(w)
    assert torch.equal(sw.dequantize(), w)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        Sparse24Weight.from_dense(torch.randn(8, 10))
    dense = torch.randn(8, 16)
    with pytest.raises(ValueError, match="not 2:4 sparse.*row 0, columns 0..3 hold 4"):
        Sparse24Weight.from_dense(dense)
    bad_mask = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask is not 2:4"):
        Sparse24Weight.from_dense(dense, bad_mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        Sparse24Weight.from_dense(dense, bad_mask.float())
    with pytest.raises(ValueError, match="bits must be one of"):
        Sparse24Weight.from_dense(dense, magnitude_mask(dense), bits=3)
    with pytest.raises(UnsupportedWeight, match="group_size"):
        Sparse24Weight.from_dense(dense, magnitude_mask(dense), bits=4, group_size=6)


@pytest.mark.parametrize(("bits", "g", "zero"), [(4, 64, "int"), (4, 32, "float"), (8, 64, "int")])
def test_quantized_kept_values_use_intweight_numerics(bits, g, zero):
    """The kept values decode exactly as IntWeight decodes the same [N, K/2] matrix with groups
    of g/2 (a logical group of g columns keeps g/2 values)."""
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    mask = magnitude_mask(w)
    sw = Sparse24Weight.from_dense(w, mask, bits, g, zero=zero)
    values, _ = sparse_ops.compress(w, mask)
    mapping = "symmetric" if bits == 8 else "asymmetric"
    iw = IntWeight.from_float(values, bits, PerGroup(g // 2), mapping, zero)
    assert torch.equal(sw.kept(), iw.dequantize())
    assert torch.equal(sw.dequantize(), sparse_ops.expand(iw.dequantize(), sw.meta, 128))
    assert sw.values.shape == (16, 128 // 2 * bits // 8)


@pytest.mark.parametrize("bits", [0, 4, 8])
def test_linear_matches_dense_masked(bits):
    w = torch.randn(24, 64)
    b = torch.randn(24)
    x = torch.randn(2, 3, 64)
    sw = Sparse24Weight.from_dense(w, magnitude_mask(w), bits, 32)
    ref = F.linear(x, sw.dequantize(), b)  # the dense-masked (and dequantized) weight
    assert torch.equal(F.linear(x, sw, b), ref)
    assert torch.equal(x @ sw.t() + b, ref)
    # the same call on the dense weight: a [3, 64] GEMM may round differently from the [6, 64]
    # one behind ref, so ref[0] is not the bit-exact reference here
    assert torch.equal(torch.addmm(b, x[0], sw.t()), torch.addmm(b, x[0], sw.dequantize().t()))
    if bits == 0:
        assert torch.equal(sw.dequantize(), w * magnitude_mask(w))


def test_slicing_dtype_and_embedding():
    w = torch.randn(16, 32)
    sw = Sparse24Weight.from_dense(w, magnitude_mask(w))
    assert torch.equal(sw[4:8].dequantize(), sw.dequantize()[4:8])
    half = sw.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    q = Sparse24Weight.from_dense(w, magnitude_mask(w), 4, 32).to(torch.bfloat16)
    assert q.values.dtype == torch.uint8 and q.scale.dtype == torch.bfloat16
    idx = torch.tensor([[3, 0]])
    assert torch.equal(F.embedding(idx, sw), sw.dequantize()[idx])


@pytest.mark.parametrize("bits", [0, 4])
def test_ops_pass_opcheck(bits):
    w = torch.randn(16, 64)
    sw = Sparse24Weight.from_dense(w, magnitude_mask(w), bits, 32)
    x = torch.randn(3, 64)
    if bits == 0:
        torch.library.opcheck(sparse_ops.sparse24_linear, (x, sw.values, sw.meta, None))
    else:
        torch.library.opcheck(sparse_ops.sparse24_intx_linear,
                              (x, sw.values, sw.meta, sw.scale, sw.zero, None, 4))


# ---- sparsify_ and checkpoints ------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.odd = nn.Linear(32, 6)  # out 6 is fine; in 32 ok
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: left dense by the default filter

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(F.relu(self.up(h)))
        return self.head(h) + self.odd(h).sum(-1, keepdim=True)


def test_sparsify_magnitude_and_checkpoint_round_trip(tmp_path):
    model = Tiny()
    ids = torch.randint(0, 50, (2, 8))
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    summary = sparsify_(model, Sparse24(bits=4, group_size=32))
    assert set(summary.quantized) == {"up", "down", "odd"}
    assert type(model.head.weight) is nn.Parameter and model.head.weight is model.emb.weight
    assert torch.equal(model.up.weight.mask(), magnitude_mask(dense["up"]))
    y = model(ids)
    path = save_quantized(model, tmp_path / "m.safetensors", Sparse24(bits=4, group_size=32))
    with torch.device("meta"):
        fresh = Tiny()
    load_quantized(fresh, path)
    for name in ("up", "down", "odd"):
        a, b = getattr(model, name).weight, getattr(fresh, name).weight
        assert isinstance(b, Sparse24Weight)
        assert all(torch.equal(a.inner_tensors()[f], b.inner_tensors()[f])
                   for f in a.inner_tensors())
    assert torch.equal(fresh(ids), y)


def test_sparsify_wanda_uses_calibration_and_skips_bad_layers():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6), nn.Linear(6, 4))
    batches = [torch.randn(8, 16) * torch.linspace(0.1, 10, 16) for _ in range(2)]
    w0 = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="skipped 1"):
        summary = sparsify_(model, Sparse24("wanda"), calibration=batches)
    assert "3" in summary.skipped and "divisible by 4" in summary.skipped["3"]
    norm = torch.cat(batches).double().pow(2).sum(0).sqrt().float()
    assert torch.equal(model[0].weight.mask(), wanda_mask(w0, norm))
    with pytest.raises(ValueError, match="needs calibration"):
        sparsify_(nn.Sequential(nn.Linear(8, 8)), Sparse24("wanda"))


def test_config_json_and_quantize_entry_point():
    cfg = Sparse24("wanda", 4, 64, "float")
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="method"):
        Sparse24("random")
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, Sparse24())  # magnitude needs no data: the plain quantize_ path works
    assert isinstance(model[0].weight, Sparse24Weight)


@pytest.mark.skipif(not sparse_ops.HAS_TRITON, reason="needs triton")
def test_kernel_layout_rules():
    """Layouts the Triton kernels cannot tile go to the reference instead of a wrong answer."""
    u8, i8 = torch.zeros(1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int8)
    assert sparse_ops.kernel_available(4096, 0, torch.zeros(1))
    assert not sparse_ops.kernel_available(4100, 0, torch.zeros(1))  # K not a multiple of 64
    assert sparse_ops.kernel_available(192, 4, u8, torch.zeros(2, 3))  # g = 64
    assert not sparse_ops.kernel_available(192, 4, u8, torch.zeros(2, 2))  # g = 96
    assert not sparse_ops.kernel_available(128, 8, u8, torch.zeros(2, 1))  # asymmetric int8
    assert sparse_ops.kernel_available(128, 8, i8, torch.zeros(2, 4))
