"""MX / NVFP4 codecs against an independent float64 model of the OCP MX v1.0 spec.

The model below is written from the spec's tables (section 5.3: exponent bias, max normal,
min subnormal, special codes per element type) with plain Python floats: it enumerates every
representable value, rounds by brute-force search of the nearest one (ties to the even
mantissa), and picks block exponents by a loop over powers of two. It shares no code with
`lowbit.formats.mx`.
"""

import math

import pytest
import torch

from lowbit.formats import mx

# name: (exponent bits, mantissa bits, bias, max normal, min subnormal, special codes) — spec 5.3
SPEC = {
    "e4m3": (4, 3, 7, 448.0, 2.0**-9, "S.1111.111 is NaN, no Inf"),
    "e5m2": (5, 2, 15, 57344.0, 2.0**-16, "S.11111.00 Inf, S.11111.{01,10,11} NaN"),
    "e2m3": (2, 3, 1, 7.5, 0.125, "none"),
    "e3m2": (3, 2, 3, 28.0, 0.0625, "none"),
    "e2m1": (2, 1, 1, 6.0, 0.5, "none"),
}
FORMATS = list(SPEC)


def spec_decode(name: str, code: int) -> float:
    """Value of one code, straight from the bit fields."""
    eb, mb, bias, _, _, _ = SPEC[name]
    sign = -1.0 if (code >> (eb + mb)) & 1 else 1.0
    e = (code >> mb) & ((1 << eb) - 1)
    m = code & ((1 << mb) - 1)
    if name == "e4m3" and e == 15 and m == 7:
        return math.nan
    if name == "e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m / 2**mb * 2.0 ** (1 - bias)
    return sign * (1 + m / 2**mb) * 2.0 ** (e - bias)


def spec_values(name: str) -> list[tuple[float, int]]:
    """(value, code) of every finite non-negative value, ascending."""
    eb, mb = SPEC[name][:2]
    vals = [(spec_decode(name, c), c) for c in range(1 << (eb + mb))]
    return sorted((v, c) for v, c in vals if math.isfinite(v))


def spec_round(name: str, x: float) -> float:
    """Nearest representable value, ties to the even code, |x| > max saturates to +/-max."""
    if math.isnan(x):
        return math.nan
    mag = abs(x)
    vals = spec_values(name)
    if mag >= vals[-1][0]:
        r = math.inf if (name == "e5m2" and math.isinf(mag)) else vals[-1][0]
    else:
        best = min(vals, key=lambda vc: (abs(vc[0] - mag), vc[1] & 1))
        r = best[0]
    return math.copysign(r, x)


def spec_scale_exp(amax: float, name: str, mode: str) -> int | None:
    """Block exponent (None: NaN scale). floor: 2^e <= amax < 2^(e+1), minus emax_elem;
    rceil: smallest e with max * 2^e >= amax. Clamped to E8M0's [-127, 127]."""
    if not math.isfinite(amax):
        return None
    if amax == 0:
        return -127
    emax = math.floor(math.log2(SPEC[name][3]))
    if mode == "floor":
        e = 200
        while 2.0**e > amax:
            e -= 1
        e -= emax
    else:
        e = -400
        while SPEC[name][3] * 2.0**e < amax:
            e += 1
    return max(-127, min(127, e))


def spec_mx(block: list[float], name: str, mode: str) -> list[float]:
    """Dequantized MX block per the spec (NaN scale: all NaN)."""
    finite = [abs(v) for v in block]
    amax = math.nan if any(math.isnan(v) for v in block) else max(finite)
    e = spec_scale_exp(amax, name, mode)
    if e is None:
        return [math.nan] * len(block)
    return [spec_round(name, v / 2.0**e) * 2.0**e for v in block]


def _same(a: torch.Tensor, b: list[float]) -> bool:
    bt = torch.tensor(b, dtype=torch.float64)
    a = a.double()
    return bool(((a == bt) | (a.isnan() & bt.isnan())).all()) and bool(
        (torch.signbit(a) == torch.signbit(bt))[~bt.isnan()].all()
    )


# ---- elements ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_format_parameters_match_spec_table(name):
    eb, mb, bias, vmax, vmin, _ = SPEC[name]
    fmt = mx.ELEM_FORMATS[name]
    assert (fmt.ebits, fmt.mbits, fmt.bias, fmt.max) == (eb, mb, bias, vmax)
    assert mx.decode_elements(torch.tensor([1], dtype=torch.uint8), fmt).item() == vmin


@pytest.mark.parametrize("name", FORMATS)
def test_every_code_decodes_to_spec_value(name):
    fmt = mx.ELEM_FORMATS[name]
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    got = mx.decode_elements(codes, fmt)
    assert _same(got, [spec_decode(name, c) for c in range(1 << fmt.bits)])


@pytest.mark.parametrize("name", FORMATS)
def test_every_representable_value_encodes_to_its_code(name):
    fmt = mx.ELEM_FORMATS[name]
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    values = torch.tensor([spec_decode(name, c) for c in range(1 << fmt.bits)])
    finite = values.isfinite()
    assert torch.equal(mx.encode_elements(values, fmt)[finite], codes[finite])
    # Specials: NaN -> the NaN code (E4M3 0x7F, E5M2 0x7F), Inf -> E5M2 Inf, else saturate.
    specials = torch.tensor([math.nan, math.inf, -math.inf])
    got = mx.encode_elements(specials, fmt).tolist()
    top = (1 << (fmt.bits - 1)) - 1
    expect = {"e4m3": [top, top - 1, 2 * top], "e5m2": [top, 0x7C, 0xFC]}.get(
        name, [0, top, 2 * top + 1])
    assert got == expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FORMATS)
def test_rounding_ties_to_even_and_saturation(name, dtype):
    vals = [v for v, _ in spec_values(name)]
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    # Exact midpoints (ties), a hair either side of them, past max, and huge values.
    probes = []
    for m in mids:
        probes += [m, math.nextafter(m, 0), math.nextafter(m, math.inf)]
    vmax = vals[-1]
    probes += [vmax * 1.0001, vmax * 1.5, vmax * 2, 1e30, 3e38, math.inf, 1e-30, 0.0]
    if dtype == torch.float64:  # beyond float32's range and precision
        probes += [1e300, 5e-324, math.nextafter(vals[1] / 2, math.inf)]
    x = torch.tensor(probes + [-p for p in probes], dtype=dtype)
    expect = [spec_round(name, float(v)) for v in x.tolist()]
    got = mx.round_to_elements(x, mx.ELEM_FORMATS[name])
    assert _same(got, expect)
    assert _same(mx.decode_elements(mx.encode_elements(x, mx.ELEM_FORMATS[name]),
                                    mx.ELEM_FORMATS[name]), expect)


def spec_round_many(name: str, x: torch.Tensor) -> torch.Tensor:
    """`spec_round` for a float64 tensor: brute-force nearest value, ties to the even code.

    Distances are exact where it matters: a tie needs |x| on a midpoint, and the values and
    midpoints sit on a grid that float64 differences of float32 inputs resolve."""
    vals = torch.tensor(spec_values(name), dtype=torch.float64)
    values, odd = vals[:, 0], vals[:, 1].long() & 1
    mag = x.abs()
    dist = (mag[:, None] - values[None]).abs()
    nearest = dist == dist.min(1, keepdim=True).values
    pick = torch.where(nearest, odd[None], 2).argmin(1)  # among the nearest, the even code
    r = torch.where(mag >= values[-1], values[-1], values[pick])
    if name == "e5m2":
        r = torch.where(mag.isinf(), mag, r)
    return torch.where(x.isnan(), x, torch.copysign(r, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FORMATS)
def test_dense_sweep_matches_spec_model(name, dtype):
    """Random bit patterns (every exponent from far below the smallest subnormal to far above
    max, random mantissas and signs), plus NaN/Inf: codes and rounded values."""
    g = torch.Generator().manual_seed(4)
    n = 40000
    emax = math.floor(math.log2(SPEC[name][3]))
    exps = torch.randint(-40, emax + 4, (n,), generator=g).double()
    frac = torch.rand(n, generator=g, dtype=torch.float64) + 1
    x = (frac * torch.exp2(exps) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).to(dtype)
    x = torch.cat([x, torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0],
                                   dtype=dtype)])
    fmt = mx.ELEM_FORMATS[name]
    expect = spec_round_many(name, x.double())
    assert _same(mx.round_to_elements(x, fmt), expect.tolist())
    if SPEC[name][5] == "none":  # no NaN code: NaN encodes as 0 (the block scale carries it)
        expect = torch.where(expect.isnan(), 0.0, expect)
    assert _same(mx.decode_elements(mx.encode_elements(x, fmt), fmt), expect.tolist())


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_fp8_matches_torch_cast_in_range(name):
    """torch's float8 casts round to nearest even too: an independent check in range."""
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[name]
    fmt = mx.ELEM_FORMATS[name]
    x = torch.randn(20000) * torch.exp2(torch.randint(-18, 16, (20000,)).float())
    x = x.clamp(-fmt.max, fmt.max)
    assert torch.equal(mx.encode_elements(x, fmt), x.to(dtype).view(torch.uint8))


# ---- scales and blocks ---------------------------------------------------------------------------


def test_e8m0_decode_every_code():
    got = mx.e8m0_to_float(torch.arange(256, dtype=torch.uint8))
    expect = [2.0 ** (c - 127) for c in range(255)] + [math.nan]
    assert _same(got, expect)
    dtype = getattr(torch, "float8_e8m0fnu", None)
    if dtype is not None:  # torch's own E8M0 type agrees
        codes = torch.arange(256, dtype=torch.uint8)
        assert _same(mx.as_e8m0(codes).float(), expect)
        assert _same(mx.e8m0_to_float(mx.as_e8m0(codes)), expect)


@pytest.mark.parametrize("mode", mx.SCALE_MODES)
@pytest.mark.parametrize("name", FORMATS)
def test_scale_choice_edge_blocks(name, mode):
    tiny = 1e-40  # float32 subnormal
    amaxes = [0.0, tiny, 2.0**-149, 2.0**-126, 1.0, 1.5, 2.0 - 2**-23, 6.0, 6.5, 448.0, 449.0,
              57344.0, 3e38, math.inf, math.nan]
    amaxes += [SPEC[name][3] * 2.0**k * f for k in (-3, 0, 5) for f in (1.0, 1 + 2**-20)]
    got = mx.choose_e8m0_scale(torch.tensor(amaxes, dtype=torch.float32), mx.ELEM_FORMATS[name],
                               mode)
    for a, code in zip(torch.tensor(amaxes).tolist(), got.tolist()):
        e = spec_scale_exp(a, name, mode)
        assert code == (255 if e is None else e + 127), (a, code, e)


@pytest.mark.parametrize("mode", mx.SCALE_MODES)
@pytest.mark.parametrize("name", FORMATS)
def test_mx_blocks_match_spec_model(name, mode):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(24, 32, generator=g) * torch.exp2(torch.randint(-20, 20, (24, 1),
                                                                       generator=g).float())
    rows[0] = 0.0  # all-zero block
    rows[1, 5:] = 0.0  # mostly zeros
    rows[2] = torch.randn(32, generator=g) * 1e-40  # subnormal block
    rows[3, 7] = math.inf
    rows[4, 9] = math.nan
    rows[5] = -rows[5].abs()
    # Just below the next power of two: past max after a floor scale, so it saturates.
    rows[6, :] = 2.0 ** (math.floor(math.log2(SPEC[name][3])) + 1) * (1 - 2**-6)
    rows[6, 1] = -rows[6, 1]
    codes, scale = mx.mx_quantize(rows, name, mode)
    got = mx.mx_dequantize(codes, scale, name)
    for r in range(rows.shape[0]):
        assert _same(got[r], spec_mx(rows[r].double().tolist(), name, mode)), r
    assert _same(mx.mx_fake_quantize(rows, name, mode).flatten(), got.flatten().tolist())
    # rceil never saturates: every element of a finite block is within half the top binade's
    # step (2^(emax - mbits) times the scale) of its input; floor breaks that on row 6.
    fmt = mx.ELEM_FORMATS[name]
    half_step = mx.e8m0_to_float(scale) * 2.0 ** (fmt.emax - fmt.mbits - 1)
    ok = rows.isfinite().all(1)
    within = ((got - rows).abs() <= half_step).all(1)
    assert bool(within[ok].all()) if mode == "rceil" else not bool(within[6])


def test_mx_bad_shapes_and_types():
    with pytest.raises(ValueError, match="multiple of the block size"):
        mx.mx_quantize(torch.randn(4, 33), "fp8_e4m3")
    with pytest.raises(ValueError, match="element type"):
        mx.mx_quantize(torch.randn(4, 32), "fp5")
    with pytest.raises(ValueError, match="scale mode"):
        mx.mx_quantize(torch.randn(4, 32), "fp4_e2m1", mode="ceil")
    with pytest.raises(TypeError, match="uint8"):
        mx.decode_elements(torch.zeros(3, dtype=torch.int32), mx.E2M1)


# ---- NVFP4 --------------------------------------------------------------------------------------


def test_nvfp4_matches_spec_model():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g) * torch.exp2(torch.randint(-6, 6, (8, 4, 1), generator=g)
                                                     .float()).repeat_interleave(16, 1)[..., 0]
    x[0, :16] = 0.0  # zero block: scale 0, zeros out
    codes, bs, ts = mx.nvfp4_quantize(x)
    assert ts.item() == pytest.approx(x.abs().max().item() / (448 * 6), rel=2**-23)
    got = mx.nvfp4_dequantize(codes, bs, ts)
    t = ts.item()
    for r in range(8):
        for b in range(4):
            blk = x[r, 16 * b:16 * b + 16]
            # The recipe's arithmetic is float32: raw scale and scaled elements are computed
            # there, then rounded by the spec model.
            raw = (blk.abs().max() / 6 / ts).item()
            s = spec_round("e4m3", raw)
            assert bs[r, b].float().item() == s
            scaled = (blk / (torch.tensor(s, dtype=torch.float32) * ts)).tolist() if s else [0] * 16
            expect = [spec_round("e2m1", v) * s * t for v in scaled]
            assert torch.allclose(got[r, 16 * b:16 * b + 16].double(),
                                  torch.tensor(expect, dtype=torch.float64), rtol=2**-22, atol=0)
    # The largest block hits E4M3's max exactly, and saturates nothing beyond E2M1's max.
    assert bs.float().max().item() == 448.0
    with pytest.raises(ValueError, match="finite"):
        mx.nvfp4_quantize(torch.tensor([[math.inf] + [0.0] * 15]))


# ---- packing -----------------------------------------------------------------------------------


def test_fp4_packs_two_per_byte_low_nibble_first():
    codes = torch.tensor([[0x1, 0xF, 0x7, 0x8]], dtype=torch.uint8)
    packed = mx.pack_elements(codes, mx.E2M1)
    assert packed.tolist() == [[0xF1, 0x87]]
    assert torch.equal(mx.unpack_elements(packed, mx.E2M1), codes)
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert mx.as_float4_x2(packed).dtype == torch.float4_e2m1fn_x2


def test_fp6_packs_four_in_three_bytes():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 64, (5, 32), generator=g, dtype=torch.uint8)
    packed = mx.pack_elements(codes, mx.E2M3)
    assert packed.shape == (5, 24)
    v = codes.view(5, 8, 4).long()
    b0 = v[..., 0] | (v[..., 1] & 0x3) << 6
    b1 = v[..., 1] >> 2 | (v[..., 2] & 0xF) << 4
    b2 = v[..., 2] >> 4 | v[..., 3] << 2
    assert torch.equal(packed.view(5, 8, 3).long(), torch.stack([b0, b1, b2], -1))
    assert torch.equal(mx.unpack_elements(packed, mx.E3M2), codes)
