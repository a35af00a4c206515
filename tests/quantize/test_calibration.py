"""Calibration algorithms: each beats round-to-nearest on real weights and real text, gives
ordinary lowbit tensors, and fails clearly (or skips by name) on bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lowbit.formats import PerGroup, PerTensor, dequantize
from lowbit.integrations import load_quantized, save_quantized
from lowbit.models import ModelArgs, Transformer
from lowbit.quantize import (
    AWQ,
    GPTQ,
    HQQ,
    ConfigError,
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt8Weight,
    IntxWeightOnly,
    SmoothQuant,
    config_from_dict,
    quantize_,
    quantize_weight,
)
from lowbit.quantize.calibration import int_target, needs_calibration
from lowbit.quantize.calibration.gptq import gptq_quantize
from lowbit.quantize.calibration.smoothquant import find_scale_groups
from lowbit.tensors import Float8Weight, IntWeight

INT3 = IntxWeightOnly(3, PerGroup(64), "asymmetric", "int")


def _quiet_quantize(model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_(model, config, show_progress=False, **kw)


# ---- a real slice: the first two decoder layers of SmolLM2-135M on Wikipedia text -----------


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's embedding + 2 decoder layers + final norm (real weights), 4096 calibration
    tokens from the wiki train split and 1024 held-out tokens with their fp32 outputs."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lowbit.eval import cache_dir, load_smollm2, load_text

    path = cache_dir() / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        try:
            load_smollm2()  # converts the GGUF once and caches it
        except ModuleNotFoundError as e:
            pytest.skip(str(e))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused layers 2..29 in the file are expected
    try:
        model = AutoModel.from_pretrained(path, num_hidden_layers=2, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def ids(split: str, n: int) -> torch.Tensor:
        text = load_text("wiki", split)[: n * 8]
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:n])

    calibration = list(ids("train", 4096).view(16, 1, 256))
    heldout = ids("heldout", 1024).view(4, 256)
    with torch.no_grad():
        reference = model(heldout).last_hidden_state
    return _Slice(model, calibration, heldout, reference)


class _Slice:
    """Quantizes copies of the slice and measures them; each config runs once per module."""

    def __init__(self, model, calibration, heldout, reference):
        self.model, self.calibration = model, calibration
        self.heldout, self.reference = heldout, reference
        self._done: dict = {}

    def error(self, config) -> tuple[float, object]:
        """Relative squared error of the output after quantizing with `config`, and the
        summary (calibration data goes to the configs that take it)."""
        if config not in self._done:
            q = copy.deepcopy(self.model)
            data = self.calibration if needs_calibration([("", q, config)]) else None
            summary = _quiet_quantize(q, config, calibration=data)
            with torch.no_grad():
                out = q(self.heldout).last_hidden_state
            err = (out - self.reference).pow(2).mean() / self.reference.pow(2).mean()
            self._done[config] = (float(err), summary)
        return self._done[config]


@pytest.mark.parametrize(
    ("config", "baseline", "ratio"),
    [
        # Measured error ratios to round-to-nearest on this slice: 0.53, 0.45, 0.58, 0.54.
        # The bounds leave margin but fail if an algorithm degrades toward RTN.
        (GPTQ(Int4WeightOnly(64), act_order=True), Int4WeightOnly(64), 0.7),
        (GPTQ(INT3, act_order=True, clip=True), INT3, 0.6),
        (AWQ(Int4WeightOnly(64)), Int4WeightOnly(64), 0.75),
        (SmoothQuant(Int8DynamicActivationInt8Weight()), Int8DynamicActivationInt8Weight(), 0.7),
    ],
    ids=["gptq-int4", "gptq-int3", "awq-int4", "smoothquant-int8"],
)
def test_calibrated_beats_round_to_nearest(smol, config, baseline, ratio):
    err, summary = smol.error(config)
    rtn, _ = smol.error(baseline)
    assert err < ratio * rtn, (err, rtn)
    assert len(summary.quantized) == 14 and not summary.skipped


def test_hqq_beats_round_to_nearest_without_data(smol):
    err, summary = smol.error(HQQ(Int4WeightOnly(64, zero="float")))
    rtn_int, _ = smol.error(Int4WeightOnly(64))
    rtn_float, _ = smol.error(Int4WeightOnly(64, zero="float"))
    # Measured 0.72 against integer-zero RTN (the baseline of the target); the bound
    # fails if HQQ falls back toward RTN's error.
    assert err < 0.8 * rtn_int, (err, rtn_int)
    # Measured 0.93 against float-zero RTN (0.83 when HQQ started from the min/max grid, which
    # scored worse in whole-model perplexity): it must stay below its own format's RTN.
    assert err < rtn_float, (err, rtn_float)
    assert len(summary.quantized) == 14


def test_smoothquant_fp8_does_not_lose(smol):
    err, _ = smol.error(SmoothQuant(Float8DynamicActivationFloat8Weight()))
    rtn, _ = smol.error(Float8DynamicActivationFloat8Weight())
    assert err < rtn, (err, rtn)  # measured 0.98: fp8 has little to gain from smoothing


def test_folds_found_by_experiment_in_hf_llama(smol):
    """Norm -> q/k/v, norm -> gate/up, up -> down; o_proj reads attention (no fold)."""
    model, batches = smol.model, smol.calibration
    block = model.layers[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    hidden = model.embed_tokens(batches[0])
    pos = torch.arange(hidden.shape[1])[None]
    emb = model.rotary_emb(hidden, position_ids=pos)
    with torch.no_grad():
        groups, _ = find_scale_groups(
            block, lambda: block(hidden, position_embeddings=emb, position_ids=pos),
            linears, frozen=set()
        )
    found = {g.producer_name: g.consumers for g in groups}
    assert found == {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.up_proj": ["mlp.down_proj"],
    }


def test_awq_summary_names_layers_without_a_fold(smol):
    _, summary = smol.error(AWQ(Int4WeightOnly(64)))
    assert "no foldable producer" in summary.quantized["layers.0.self_attn.o_proj"]
    assert "no foldable producer" not in summary.quantized["layers.0.mlp.down_proj"]


# ---- small models for the API, formats and bad input -------------------------------------------


def _tiny_llama(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                     ffn_hidden=128, max_seq_len=64)
    return Transformer(args).eval()


def _tokens(n: int = 4, length: int = 64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, length), generator=gen) for _ in range(n)]


def test_folds_found_in_lowbit_llama_and_hints_are_verified():
    """The same experiment finds the folds of a differently written Llama; the next block
    reuses them when they verify, and searches again when a hint is wrong."""
    from lowbit.models.llama import rope_tables

    model = _tiny_llama()
    x = torch.randn(1, 16, 64)
    cos, sin = rope_tables(torch.arange(16), 16, 10000.0)

    def groups_of(block, hint=None):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            groups, _ = find_scale_groups(block, lambda: block(x, cos, sin, None, None),
                                          linears, frozen=set(), hint=hint)
        return groups

    first = groups_of(model.layers[0])
    expected = {
        "attention_norm": ["attention.wq", "attention.wk", "attention.wv"],
        "ffn_norm": ["feed_forward.w1", "feed_forward.w3"],
        "feed_forward.w3": ["feed_forward.w2"],
    }
    assert {g.producer_name: g.consumers for g in first} == expected
    hinted = groups_of(model.layers[1], [g.pattern for g in first])
    assert {g.producer_name: g.consumers for g in hinted} == expected
    wrong = groups_of(model.layers[1], [("ffn_norm", ("attention.wq",))])
    assert {g.producer_name: g.consumers for g in wrong} == expected


@pytest.mark.parametrize(
    "config",
    [GPTQ(Int4WeightOnly(32)), AWQ(INT3), SmoothQuant(Int8DynamicActivationInt8Weight(), 0.8),
     HQQ(IntxWeightOnly(2, PerGroup(32), "asymmetric", "float"))],
    ids=lambda c: type(c).__name__,
)
def test_results_are_ordinary_tensors_that_checkpoint(config, tmp_path):
    model = _tiny_llama()
    data = None if isinstance(config, HQQ) else _tokens()
    summary = _quiet_quantize(model, config, calibration=data)
    assert len(summary.quantized) == 15 and not summary.skipped
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(type(w) is IntWeight for w in weights)
    tokens = _tokens(1)[0]
    with torch.no_grad():
        expected = model(tokens)
    path = save_quantized(model, tmp_path / "m.safetensors", config)
    fresh = _tiny_llama(seed=5)
    load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_calibration_is_deterministic():
    a, b = _tiny_llama(), _tiny_llama()
    for m in (a, b):
        _quiet_quantize(m, AWQ(Int4WeightOnly(32)), calibration=_tokens())
        _quiet_quantize(m, GPTQ(Int4WeightOnly(32), act_order=True), calibration=_tokens())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.dequantize() if isinstance(pa, IntWeight) else pa,
                           pb.dequantize() if isinstance(pb, IntWeight) else pb), name


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("target_config", [Int4WeightOnly(32), INT3,
                                           Int8DynamicActivationInt8Weight()],
                         ids=["int4", "int3", "int8-dynamic"])
def test_gptq_codes_decode_as_stored(act_order, target_config):
    """GPTQ's codes and groups are the base format's: decoding the packed tensor gives the
    weights GPTQ compensated for, and its output error is below round-to-nearest's."""
    torch.manual_seed(0)
    # Correlated inputs (low rank plus noise), as in real activations: errors can cancel.
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)
    w = torch.randn(48, 128)
    target = int_target(target_config)
    res = gptq_quantize(w, x.T @ x, target, block_size=32, act_order=act_order)
    q = target.pack(w, res.codes, res.scale, res.zero)
    g = target.group_size(128)
    assert torch.equal(q.dequantize(), dequantize(res.codes, res.scale, res.zero, (1, g)))
    assert q.scale.shape == (48, 128 // g)
    rtn = quantize_weight(target_config, w).dequantize()
    assert (x @ (q.dequantize() - w).T).norm() < 0.5 * (x @ (rtn - w).T).norm()


def test_tied_lm_head_follows_and_is_not_rescaled():
    """A tied lm_head is calibrated (clipping only, no fold) and the embedding follows."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(128, 64)
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, 128, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.norm(self.emb(idx)))

    torch.manual_seed(0)
    model = Tied()
    norm_weight = model.norm.weight.detach().clone()
    summary = _quiet_quantize(model, AWQ(Int4WeightOnly(32)), calibration=_tokens())
    assert model.emb.weight is model.head.weight and type(model.head.weight) is IntWeight
    assert summary.quantized["emb"].startswith("tied")
    assert "no foldable producer" in summary.quantized["head"]
    assert torch.equal(model.norm.weight, norm_weight)


# ---- bad input -----------------------------------------------------------------------------


class _Branchy(nn.Module):
    """`rare` is never reached by ordinary batches; `odd` has 72 inputs (not a multiple of
    the group of 32 used below)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.side = nn.Linear(64, 72)
        self.odd = nn.Linear(72, 64)
        self.rare = nn.Linear(64, 64)

    def forward(self, idx, use_rare: bool = False):
        h = self.emb(idx)
        h = h + self.down(torch.relu(self.up(h))) + self.odd(self.side(h))
        return self.rare(h) if use_rare else h


@pytest.mark.filterwarnings("ignore:quantize_ skipped")
def test_layer_never_reached_gets_round_to_nearest_and_is_named():
    torch.manual_seed(0)
    model = _Branchy()
    with pytest.warns(UserWarning, match="never reached.*rare"):
        summary = quantize_(model, GPTQ(Int4WeightOnly(32)), calibration=_tokens(),
                            show_progress=False)
    assert summary.quantized["rare"].startswith("RTN (GPTQ: never reached")
    assert summary.quantized["up"].startswith("GPTQ")
    assert "odd" in summary.skipped and "72" in summary.skipped["odd"]
    assert bool(torch.isfinite(model.rare.weight.scale).all())
    assert bool(torch.isfinite(model.rare.weight.dequantize()).all())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "calibration=batches"),
        ([], "0 tokens"),
        ([torch.zeros(1, 10, dtype=torch.long)], "10 tokens.*at least 128"),
    ],
    ids=["none", "empty", "too-little"],
)
def test_missing_or_too_little_data_is_a_clear_error(data, match):
    model = _tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        quantize_(model, GPTQ(Int4WeightOnly(32)), calibration=data, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_data_for_a_config_that_takes_none_is_an_error():
    with pytest.raises(ValueError, match="no selected config uses it"):
        quantize_(_tiny_llama(), HQQ(Int4WeightOnly(32, zero="float")), calibration=_tokens(),
                  show_progress=False)


def test_failure_leaves_model_unchanged_including_folds():
    model = _tiny_llama()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2"):
        quantize_(model, AWQ(Int4WeightOnly(32)), calibration=_tokens(), show_progress=False)
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor for k in before)
    assert all(torch.equal(before[k], after[k]) or k.endswith("w2.weight") for k in before)
    assert torch.isnan(after["layers.1.feed_forward.w2.weight"][0, 0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GPTQ(Float8WeightOnly()), "not an integer config"),
        (lambda: GPTQ(IntxWeightOnly(4, PerTensor())), "per-group or per-row"),
        (lambda: AWQ(Int8DynamicActivationInt8Weight()), "weight-only"),
        (lambda: SmoothQuant(Int4WeightOnly(64)), "quantize activations"),
        (lambda: SmoothQuant(Int8DynamicActivationInt8Weight(), alpha=1.5), "alpha"),
        (lambda: HQQ(Int4WeightOnly(64)), "float zero"),
        (lambda: GPTQ(GPTQ(Int4WeightOnly(64))), "wraps a plain config"),
    ],
)
def test_configs_the_algorithm_cannot_take_are_refused(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_smoothquant_fp8_result_is_float8():
    model = _tiny_llama()
    _quiet_quantize(model, SmoothQuant(Float8DynamicActivationFloat8Weight()),
                    calibration=_tokens())
    assert type(model.layers[0].attention.wq.weight) is Float8Weight


@pytest.mark.cuda
@pytest.mark.parametrize(
    "config",
    [GPTQ(Int4WeightOnly(32), act_order=True), AWQ(Int4WeightOnly(32)),
     SmoothQuant(Int8DynamicActivationInt8Weight()), HQQ(Int4WeightOnly(32, zero="float"))],
    ids=lambda c: type(c).__name__,
)
def test_gpu_gives_what_cpu_gives(config):
    data = None if isinstance(config, HQQ) else _tokens()
    cpu, gpu = _tiny_llama(), _tiny_llama().cuda()
    _quiet_quantize(cpu, config, calibration=data)
    _quiet_quantize(gpu, config, calibration=None if data is None else [t.cuda() for t in data])
    assert gpu.layers[0].attention.wq.weight.qdata.is_cuda
    tokens = _tokens(1)[0]
    with torch.no_grad():
        expected, got = cpu(tokens), gpu(tokens.cuda()).cpu()
    # Float sums differ between devices, so a few codes may round the other way.
    assert (got - expected).norm() < 0.02 * expected.norm()
