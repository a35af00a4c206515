"""GraphedDecodeStep: the captured step decodes the same tokens as the plain one."""

import pytest
import torch

from lowbit.models import (
    GraphedDecodeStep,
    ModelArgs,
    Transformer,
    decode_one_token,
    generate,
    init_weights,
)
from lowbit.quantize import preset, quantize_

TINY = ModelArgs.from_name("tiny")


def _model(device: str, dtype: torch.dtype = torch.float32) -> Transformer:
    model = Transformer(TINY).to(device=device, dtype=dtype).eval()
    init_weights(model, seed=0)
    return model


def test_needs_cuda_and_caches():
    model = _model("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecodeStep(model, batch=1)


@pytest.mark.cuda
def test_needs_caches_first():
    with pytest.raises(RuntimeError, match="setup_caches"):
        GraphedDecodeStep(_model("cuda"), batch=1)


@pytest.mark.cuda
@pytest.mark.parametrize("config", [None, "int4-g64"])  # g64 divides the tiny model's K
def test_graphed_generate_matches_plain(config):
    model = _model("cuda", torch.bfloat16)
    if config:
        summary = quantize_(model, preset(config), show_progress=False)
        assert summary.quantized and not summary.skipped
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    compiled = torch.compile(decode_one_token, fullgraph=True)
    plain = generate(model, prompt, 12, decode_fn=compiled)
    step = GraphedDecodeStep(model, batch=2, step_fn=compiled)
    graphed = generate(model, prompt, 12, decode_fn=step)
    assert torch.equal(graphed, plain)  # greedy, same compiled kernels: same tokens
    with pytest.raises(ValueError, match="temperature"):
        step(model, prompt[:, :1], torch.tensor([5], device="cuda"), temperature=0.5)
    with pytest.raises(ValueError, match="captured for token"):
        step(model, prompt[:1, :1], torch.tensor([5], device="cuda"))


@pytest.mark.cuda
def test_reallocated_caches_are_refused():
    model = _model("cuda", torch.bfloat16)
    model.setup_caches(1, 16, dtype=torch.bfloat16, device="cuda")
    step = GraphedDecodeStep(model, batch=1)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([0], device="cuda")
    step(model, token, pos)
    model.setup_caches(1, 32, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="capture the step again"):
        step(model, token, pos)
