import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.models import (
    ModelArgs,
    Transformer,
    decode_one_token,
    fuse_projections_,
    generate,
    init_weights,
)

TINY = ModelArgs.from_name("tiny")


def make_model(args: ModelArgs = TINY, seed: int = 0) -> Transformer:
    model = Transformer(args).eval()
    init_weights(model, seed)
    return model


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, seq), generator=gen)


def test_presets_and_overrides():
    big = ModelArgs.from_name("llama3-8b")
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads) == (4096, 32, 32, 8)
    assert (big.ffn_hidden, big.vocab_size, big.rope_theta) == (14336, 128256, 500000.0)
    assert ModelArgs.from_name("llama3-8b", n_layers=2).n_layers == 2
    with torch.device("meta"):
        small = Transformer(ModelArgs.from_name("small"))
        llama3 = Transformer(big)
    assert 80e6 < sum(p.numel() for p in small.parameters()) < 150e6
    assert round(sum(p.numel() for p in llama3.parameters()) / 1e9, 2) == 8.03
    with pytest.raises(ValueError, match="unknown model"):
        ModelArgs.from_name("gpt-5")
    with pytest.raises(ValueError, match="n_kv_heads"):
        dataclasses.replace(TINY, n_kv_heads=3)


def test_forward_shapes():
    logits = make_model()(tokens(2, 10))
    assert logits.shape == (2, 10, TINY.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_projections_are_plain_linears_called_as_modules():
    """A quantization pass relies on every projection going through F.linear."""
    model = make_model()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * TINY.n_layers + 1
    assert all(m.bias is None for m in linears)

    class CountLinear(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountLinear.calls += func is F.linear
            return func(*args, **(kwargs or {}))

    with CountLinear():
        model(tokens(1, 4))
    assert CountLinear.calls == len(linears)


def test_kv_cache_decode_matches_full_forward():
    model = make_model()
    seq = tokens(2, 12)
    full = model(seq)
    model.setup_caches(max_batch_size=2, max_seq_len=16)
    chunks = [model(seq[:, :5], torch.arange(5)), model(seq[:, 5:8], torch.arange(5, 8))]
    chunks += [model(seq[:, i : i + 1], torch.tensor([i])) for i in range(8, 12)]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h must read K/V head h // (n_heads // n_kv_heads)."""
    gqa = make_model()
    mha = Transformer(dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)).eval()
    groups = TINY.n_heads // TINY.n_kv_heads
    state = gqa.state_dict()
    for name, weight in state.items():
        if name.endswith(("wk.weight", "wv.weight")):
            per_head = weight.view(TINY.n_kv_heads, TINY.head_dim, TINY.dim)
            state[name] = per_head.repeat_interleave(groups, dim=0).reshape(-1, TINY.dim)
    mha.load_state_dict(state)
    seq = tokens(2, 9)
    assert gqa.layers[0].attention.wk.weight.shape == (TINY.n_kv_heads * TINY.head_dim, TINY.dim)
    torch.testing.assert_close(gqa(seq), mha(seq))
    # the KV-cache path folds the query heads of a K/V head instead of repeating K/V
    for model in (gqa, mha):
        model.setup_caches(max_batch_size=2, max_seq_len=16)
    prefill, step = seq[:, :6], seq[:, 6:7]
    torch.testing.assert_close(gqa(prefill, torch.arange(6)), mha(prefill, torch.arange(6)))
    torch.testing.assert_close(gqa(step, torch.tensor([6])), mha(step, torch.tensor([6])))


def test_greedy_generate_is_deterministic_and_matches_full_forward_argmax():
    model = make_model()
    prompt = tokens(2, 5)
    out = generate(model, prompt, max_new_tokens=8)
    assert out.shape == (2, 13)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(generate(model, prompt, max_new_tokens=8), out)
    with torch.no_grad():
        expected = model(out[:, :-1]).argmax(dim=-1)[:, 4:]
    assert torch.equal(out[:, 5:], expected)


def test_sampling_respects_top_k():
    model = make_model()
    prompt = tokens(1, 4)
    torch.manual_seed(0)
    out = generate(model, prompt, max_new_tokens=1, temperature=1.0, top_k=1)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=1))


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_decode_step_matches_eager(fused):
    """Dynamo captures the step whole (no graph breaks); aot_eager keeps the test fast on CPU."""
    model = make_model()
    if fused:
        fuse_projections_(model)
    prompt = tokens(2, 6)
    eager = generate(model, prompt, max_new_tokens=5)
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, prompt, max_new_tokens=5, decode_fn=step)
    assert torch.equal(compiled, eager)


def test_meta_device_construction_then_init():
    with torch.device("meta"):
        model = Transformer(TINY)
    assert model.output.weight.is_meta
    model.to_empty(device="cpu")
    init_weights(model, seed=3)
    reference = make_model(seed=3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert model.layers[0].attention.wq.weight.abs().sum() > 0
    assert not torch.equal(model.output.weight, make_model(seed=4).output.weight)
    model.eval()
    assert torch.isfinite(model(tokens(1, 4))).all()


def test_bad_inputs_give_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([[1, TINY.vocab_size]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([[-1, 2]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, tokens(1, 4), max_new_tokens=TINY.max_seq_len)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, TINY.max_seq_len + 1))
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(tokens(1, 2), torch.arange(2))
    model.setup_caches(max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="batch"):
        model(tokens(2, 2), torch.arange(2))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_caches(max_batch_size=1, max_seq_len=TINY.max_seq_len + 1)


def test_setup_caches_reuses_buffers_of_the_same_shape():
    """A CUDA-graphed decode step keeps reading the same cache buffers across generations."""
    model = Transformer(TINY)
    model.setup_caches(max_batch_size=1, max_seq_len=8)
    cache = model.layers[0].attention.kv_cache
    cache.k.fill_(1.0)
    generation = model.cache_generation
    model.setup_caches(max_batch_size=1, max_seq_len=8)
    assert model.layers[0].attention.kv_cache.k is cache.k
    assert cache.k.abs().sum() == 0
    assert model.cache_generation == generation
    model.setup_caches(max_batch_size=2, max_seq_len=8)
    assert model.layers[0].attention.kv_cache.k.shape[0] == 2
    assert model.cache_generation == generation + 1


def _tiny_pair():
    plain = Transformer(ModelArgs.from_name("tiny"))
    init_weights(plain, seed=0)
    fused = Transformer(ModelArgs.from_name("tiny"))
    fused.load_state_dict(plain.state_dict())
    return plain, fuse_projections_(fused)


def test_fused_projections_give_the_same_outputs():
    plain, fused = _tiny_pair()
    keys = set(fused.state_dict())
    assert "layers.0.attention.wqkv.weight" in keys and "layers.0.feed_forward.w13.weight" in keys
    assert not any(k.endswith((".wq.weight", ".wk.weight", ".w1.weight", ".w3.weight"))
                   for k in keys)
    tokens = torch.randint(0, 256, (2, 24))
    # Same products, only the GEMM's blocking may differ: float32 rounding-level differences.
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :8]
    assert torch.equal(generate(fused, prompt, 6), generate(plain, prompt, 6))


@pytest.mark.parametrize("config", ["int4-g64", "int8", "fp8"])
def test_quantizing_fused_weights_gives_the_parts_codes(config):
    """Scales are per output row (and per group along K), so the fused weight quantizes to the
    concatenation of the parts' quantized weights, exactly."""
    from lowbit.quantize import preset, quantize_

    plain, fused = _tiny_pair()
    quantize_(plain, preset(config), show_progress=False)
    quantize_(fused, preset(config), show_progress=False)
    for p_block, f_block in zip(plain.layers, fused.layers):
        att, ffn = p_block.attention, p_block.feed_forward
        parts = [att.wq.weight, att.wk.weight, att.wv.weight]
        expected = torch.cat([w.dequantize() for w in parts])
        assert torch.equal(f_block.attention.wqkv.weight.dequantize(), expected)
        expected = torch.cat([ffn.w1.weight.dequantize(), ffn.w3.weight.dequantize()])
        assert torch.equal(f_block.feed_forward.w13.weight.dequantize(), expected)


def test_fusing_quantized_weights_is_refused_and_changes_nothing():
    from lowbit.quantize import preset, quantize_

    model = Transformer(ModelArgs.from_name("tiny"))
    init_weights(model, seed=0)
    # Quantize only the last block's MLP: the first block would fuse, the check must come first.
    quantize_(model, preset("int8"), lambda m, fqn: fqn.startswith("layers.1.feed_forward."),
              show_progress=False)
    before = dict(model.state_dict())
    with pytest.raises(TypeError, match="fuse before quantizing"):
        fuse_projections_(model)
    assert model.state_dict().keys() == before.keys()
    assert not any(m.fused for m in model.modules() if hasattr(m, "fused"))


def test_fusing_twice_is_a_no_op():
    _, fused = _tiny_pair()
    weights = [p.data_ptr() for p in fused.parameters()]
    fuse_projections_(fused)
    assert [p.data_ptr() for p in fused.parameters()] == weights
