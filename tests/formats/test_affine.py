import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    AffineSpec,
    PerAxis,
    PerBlock,
    PerGroup,
    PerTensor,
    PerToken,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack_bits,
    quantize,
    unpack_bits,
)
from lowbit.formats.granularity import granularity_from_dict, granularity_to_dict

SPECS = [
    AffineSpec(b, m, z)
    for b in range(1, 9)
    for m, z in [("symmetric", "int"), ("asymmetric", "int"), ("asymmetric", "float")]
    if not (m == "symmetric" and b < 2)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _roundtrip(x, spec, block):
    scale, zero = choose_qparams(x, spec, block)
    q = quantize(x, scale, zero, spec, block)
    return q, scale, zero, dequantize(q, scale, zero, block, x.dtype)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    group=st.sampled_from([8, 16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_quantize_dequantize_quantize_is_exact(spec, dtype, rows, groups, group, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, groups * group, generator=gen) * 3).to(dtype)
    block = PerGroup(group).block_size(tuple(x.shape))
    q, scale, zero, deq = _roundtrip(x, spec, block)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(quantize(deq, scale, zero, spec, block), q)


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), group=st.sampled_from([16, 32, 128]), seed=st.integers(0, 999))
def test_error_is_at_most_half_a_step(spec, group, seed):
    """Values inside the representable range round to the nearest code: |err| <= scale/2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 256, generator=gen)
    block = (1, group)
    q, scale, zero, deq = _roundtrip(x, spec, block)
    step = scale.repeat_interleave(group, dim=1)
    inside = (q > spec.qmin) & (q < spec.qmax)
    err = (x - deq).abs()
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_all_zero_and_constant_groups_have_no_nan(spec):
    x = torch.zeros(3, 64)
    x[1] = 0.75
    x[2, :32] = -2.0
    block = (1, 32)
    q, scale, zero, deq = _roundtrip(x, spec, block)
    assert torch.isfinite(scale).all() and (zero is None or torch.isfinite(zero).all())
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], x[0])
    if spec.mapping == "asymmetric" and spec.zero == "float":
        assert torch.equal(deq, x), "float zero represents constant blocks exactly"


def test_symmetric_scale_maps_amax_to_qmax():
    x = torch.tensor([[0.5, -1.2, 0.25, 2.0]])
    spec = AffineSpec(4)
    scale, zero = choose_qparams(x, spec, (1, 4))
    assert zero is None and scale.item() == pytest.approx(2.0 / 7)
    assert quantize(x, scale, zero, spec, (1, 4)).tolist() == [[2, -4, 1, 7]]


def test_asymmetric_int_zero_represents_zero_exactly():
    x = torch.tensor([[0.1, 0.2, 0.0, 0.9]])
    spec = AffineSpec(4, "asymmetric", "int")
    q, scale, zero, deq = _roundtrip(x, spec, (1, 4))
    assert deq[0, 2].item() == 0.0
    assert float(zero) == round(float(zero))


@pytest.mark.parametrize(
    "gran,shape,expected",
    [
        (PerTensor(), (4, 8), (4, 8)),
        (PerAxis(0), (4, 8), (1, 8)),
        (PerAxis(1), (4, 8), (4, 1)),
        (PerGroup(4), (4, 8), (1, 4)),
        (PerToken(), (2, 3, 8), (1, 1, 8)),
        (PerBlock((2, 4)), (4, 8), (2, 4)),
    ],
)
def test_granularity_block_sizes_and_json(gran, shape, expected):
    assert gran.block_size(shape) == expected
    assert granularity_from_dict(granularity_to_dict(gran)) == gran


def test_per_block_2d_scales():
    x = torch.randn(8, 16)
    spec = AffineSpec(8)
    scale, _ = choose_qparams(x, spec, (4, 8))
    assert scale.shape == (2, 2)
    assert scale[1, 0].item() == pytest.approx(x[4:, :8].abs().max().item() / 127, rel=1e-6)


def test_bad_block_and_spec_errors():
    with pytest.raises(ValueError, match="not divisible"):
        choose_qparams(torch.randn(4, 30), AffineSpec(4), (1, 32))
    with pytest.raises(ValueError, match="bits"):
        AffineSpec(9)
    with pytest.raises(ValueError, match="at least 2 bits"):
        AffineSpec(1)


def test_fake_quantize_equals_quantize_then_dequantize():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    spec = AffineSpec(4, "asymmetric", "float")
    *_, deq = _roundtrip(x, spec, (1, 32))
    assert torch.equal(fake_quantize(x, spec, (1, 32)), deq)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8), rows=st.integers(1, 3), packs=st.integers(1, 6),
    seed=st.integers(0, 999),
)
def test_pack_unpack_roundtrip(bits, rows, packs, seed):
    per = 8 // bits if 8 % bits == 0 else 8
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, packs * per), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape[-1] == codes.shape[-1] * bits // 8
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_int4_packing_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [[1 | 2 << 4, 15]]


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_bit_packing_is_a_little_endian_bit_stream(bits):
    """Value i of a row occupies bits i * bits .. (i + 1) * bits - 1 of the row's byte
    stream, least significant first (the layout checkpoints store)."""
    codes = torch.randint(0, 2**bits, (3, 16), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.uint8)
    stream = [(int(v) >> b) & 1 for row in codes for v in row for b in range(bits)]
    expected = [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]
    assert pack_bits(codes, bits).flatten().tolist() == expected


def test_pack_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(1, 12, dtype=torch.uint8), 3)


def test_expected_noise_matches_uniform_rounding_model():
    """Mean squared rounding error ~ step^2 / 12 (the model the SQNR thresholds use)."""
    x = torch.randn(256, 256)
    spec = AffineSpec(4, "asymmetric", "int")
    q, scale, zero, deq = _roundtrip(x, spec, (1, 64))
    predicted = scale.pow(2).mean().item() / 12
    measured = (x - deq).pow(2).mean().item()
    assert math.isclose(measured, predicted, rel_tol=0.1)
