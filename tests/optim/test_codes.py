"""State codecs and QuantizedState: code books, quantize/dequantize, plumbing."""

import copy
import io

import pytest
import torch

from lowbit.optim import CODECS, QuantizedState, get_codec
from lowbit.optim.codes import (
    E4M3_MIN_SUBNORMAL,
    _cells,
    decade_magnitudes,
    nearest_code,
    table_tensor,
)

CODEBOOK_CODECS = [n for n, c in CODECS.items() if c.kind == "codebook"]


@pytest.mark.parametrize("name", CODEBOOK_CODECS)
def test_code_books_fit_their_bits_and_are_sorted(name):
    c = get_codec(name)
    book = torch.tensor(c.book)
    assert len(c.book) <= 2**c.bits
    assert torch.all(book[1:] > book[:-1])  # strictly increasing: bucketize = nearest
    assert book.max() == 1.0  # the block's absmax is represented exactly
    if c.positive:
        # Second moments never decode to 0 (m / (sqrt(v) + eps) would explode).
        assert book.min() > 0
    else:
        assert 0.0 in c.book and book.min() == -1.0


@pytest.mark.parametrize("name", CODEBOOK_CODECS)
def test_table_encoder_equals_bucketize_at_every_edge(name):
    """The cell-table encoder must agree with a binary search over the midpoints everywhere,
    in particular on the midpoints themselves, the cell edges and their float neighbours."""
    c = get_codec(name)
    book = torch.tensor(c.book)
    mids = (book[1:] + book[:-1]) * 0.5
    edges = _cells(c.lut_bits)
    edges = edges[edges <= 1]
    pts = torch.cat([mids, edges, torch.rand(10000) * 2 - 1, book])
    pts = torch.cat([pts, -pts])
    pts = torch.cat([pts, torch.nextafter(pts, pts + 1), torch.nextafter(pts, pts - 1)])
    pts = pts.clamp(-1, 1)
    got = nearest_code(pts, c, table_tensor(c, "cpu"))
    assert torch.equal(got.long(), torch.bucketize(pts, mids))


def test_decade_magnitudes_spread():
    mags = decade_magnitudes(127)
    assert len(mags) == 127
    # Half the levels sit in the top decade, where the largest moments live.
    assert sum(m > 0.1 for m in mags) == 64
    assert min(mags) == pytest.approx(1e-6)


@pytest.mark.parametrize("name", CODEBOOK_CODECS)
@pytest.mark.parametrize("numel", [1000, 4096])  # 1000: padded last block
def test_codebook_roundtrip_is_nearest_code(name, numel):
    c = get_codec(name)
    x = torch.randn(numel) * torch.logspace(-4, 0, numel)
    if c.positive:
        x = x.square()
    q = QuantizedState.from_float(x, name)
    assert q.shape == x.shape and q.dtype == torch.float32
    out = q.dequantize()
    # Exact oracle: each value decodes to the code value nearest x / scale, times the scale
    # of its block (absmax; the last block is zero-padded, which does not change its max).
    book = torch.tensor(c.book)
    pad = (-numel) % c.block
    blocks = torch.cat([x, x.new_zeros(pad)]).view(-1, c.block)
    scale = blocks.abs().amax(1, keepdim=True)
    nearest = book[(blocks / scale).unsqueeze(-1).sub(book).abs().argmin(-1)] * scale
    torch.testing.assert_close(out, nearest.view(-1)[:numel], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["fp8", "fp8_unsigned"])
def test_fp8_roundtrip(name):
    c = get_codec(name)
    x = torch.randn(3000)
    if c.positive:
        x = x.square()
        x[::7] = 0.0
    q = QuantizedState.from_float(x, name)
    assert q.codes.dtype == torch.float8_e4m3fn
    out = q.dequantize()
    blocks = torch.cat([x, x.new_zeros((-3000) % 256)]).view(-1, 256)
    scale = (blocks.abs().amax(1, keepdim=True) / 448).expand_as(blocks).reshape(-1)[:3000]
    normal = x.abs() >= scale * 2**-6  # e4m3's smallest normal, in units of the scale
    # e4m3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative for normals.
    rel = ((out - x).abs() / x.abs())[normal]
    assert rel.max() <= 2**-4
    if c.positive:
        # Zeros decode to the smallest subnormal times the scale, never to 0.
        assert torch.all(out > 0)
        assert torch.allclose(out[::7], scale[::7] * E4M3_MIN_SUBNORMAL)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_zero_state_decodes_to_zero_and_counts_bytes(name):
    c = get_codec(name)
    q = QuantizedState.zeros((33, 70), name, "cpu")
    assert torch.equal(q.dequantize(), torch.zeros(33, 70))
    blocks = -(-33 * 70 // c.block)
    assert q.codes.numel() * q.codes.element_size() == blocks * c.block * c.bits // 8


def test_state_survives_save_load_deepcopy_and_dtype_casts():
    x = torch.randn(700)
    q = QuantizedState.from_float(x, "quantile4")
    buf = io.BytesIO()
    torch.save({"m": q}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["m"]
    assert isinstance(loaded, QuantizedState)
    assert torch.equal(loaded.dequantize(), q.dequantize())
    assert torch.equal(copy.deepcopy(q).dequantize(), q.dequantize())
    # Optimizer.load_state_dict casts states to the param dtype; a quantized moment stays fp32.
    cast = q.to(dtype=torch.bfloat16)
    assert cast.dtype == torch.float32 and torch.equal(cast.dequantize(), q.dequantize())


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown state codec"):
        QuantizedState.zeros((4,), "int3", "cpu")
