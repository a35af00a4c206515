"""A small Llama-style decoder-only transformer with a static KV cache and generate().

It is the model that benchmarks, tests and the demo quantize. Every projection is a plain
`nn.Linear` called as a module, so a quantization pass only has to swap `.weight` for a tensor
subclass that implements `F.linear`. The decode step has fixed shapes, no host syncs and no
branches on tensor values, so `torch.compile` can capture it whole (CUDA graphs included).

RoPE rotates the two halves of each head (the Hugging Face layout), so Hugging Face Llama
checkpoints load without permuting `wq`/`wk`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels import ops
from lowbit.kernels import reference as ref

_PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden=14336,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "small": dict(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, ffn_hidden=2048,
    ),
    "tiny": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=128,
        max_seq_len=128,
    ),
}


@dataclass(frozen=True)
class ModelArgs:
    """Shape of the model; frozen so a config can be shared without being changed under you."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        """A preset ("llama3-8b", "small", "tiny"); overrides such as n_layers=2 shrink it."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(_PRESETS)}")
        return replace(cls(**_PRESETS[name]), **overrides)


class RMSNorm(nn.Module):
    """RMS normalization computed in fp32, so bf16/fp16 activations keep their precision."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [T, head_dim // 2] for the given positions.

    Computed on the fly instead of stored in a buffer: it costs almost nothing, and a model
    built on the meta device then has no buffer that must be recomputed after `to_empty`.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)
    angles = positions.float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


apply_rope = ref.rope  # x [B, T, H, D] rotated by position in fp32, pairs (i, i + D/2)


class KVCache(nn.Module):
    """Fixed-size K/V buffers [max_batch, n_kv_heads, max_seq, head_dim] of one layer.

    Static shapes let the decode step be compiled once and replayed as a CUDA graph. The
    buffers are not persistent: they never end up in a state_dict or checkpoint.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H_kv, T, D] at input_pos; return the whole cache of those B rows."""
        batch = k.shape[0]
        k_all, v_all = self.k[:batch], self.v[:batch]
        k_all.index_copy_(2, input_pos, k)
        v_all.index_copy_(2, input_pos, v)
        return k_all, v_all


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped-query K/V heads."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.fused = False  # wq, wk, wv concatenated into one `wqkv` (see fuse_projections_)

    def fuse(self) -> None:
        """Replace wq, wk, wv by one `wqkv` whose output rows are theirs, in that order."""
        self.wqkv = _concat_linears(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv
        self.fused = True

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        batch, seq, _ = x.shape
        if self.fused:
            kv_dim = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if input_pos is not None and seq == 1 and q.is_cuda:
            # One new token: RoPE, the cache write and a split-cache attention in one kernel
            # (a batch-1 step would otherwise keep only n_kv_heads SMs busy in attention, and
            # spend three more launches on rotating and writing).
            cache = self.kv_cache
            y = ops.rope_cache_attention(q, k, v, cos, sin, cache.k, cache.v, input_pos)
            return self.wo(y.transpose(1, 2).reshape(batch, seq, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = self._attend(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """SDPA where query head h reads K/V head h // groups.

        With a mask (the KV-cache path) the `groups` query heads of one K/V head are folded into
        its query rows ([B, H_kv, groups * T, D]), so K/V are read as they are; repeating them
        per query head would copy the whole cache on every decode step. Without a mask, causal
        attention needs each row at its own position, so K/V are repeated instead.
        """
        groups = self.n_heads // self.n_kv_heads
        if groups == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        if mask is None:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        batch, _, seq, dim = q.shape
        folded = q.reshape(batch, self.n_kv_heads, groups * seq, dim)
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(groups, 1))
        return y.view(batch, self.n_heads, seq, dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)
        self.fused = False  # w1, w3 concatenated into one `w13` (see fuse_projections_)

    def fuse(self) -> None:
        """Replace w1, w3 by one `w13` whose output rows are w1's, then w3's."""
        self.w13 = _concat_linears(self.w1, self.w3)
        del self.w1, self.w3
        self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


def _check_plain(linears: list[nn.Linear]) -> None:
    weights = [lin.weight for lin in linears]
    plain = all(type(lin) is nn.Linear and type(w) is nn.Parameter
                and type(w.data) is torch.Tensor for lin, w in zip(linears, weights))
    if not plain or any(lin.bias is not None for lin in linears):
        raise TypeError(
            "fuse_projections_ concatenates plain bias-free nn.Linear weights: fuse before "
            "quantizing, sparsifying or converting the linears (found "
            f"{[(type(lin).__name__, type(w.data).__name__) for lin, w in zip(linears, weights)]})")


def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free nn.Linear computing the given ones' outputs side by side."""
    _check_plain(list(linears))
    weights = [lin.weight for lin in linears]
    with torch.device("meta"):
        fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                          bias=False)
    fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]),
                                requires_grad=weights[0].requires_grad)
    return fused


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only Llama: embedding, n_layers blocks, final norm, output projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0  # capacity of the KV caches; 0 while none are set up
        self.cache_len = 0
        # Bumped whenever cache buffers are replaced: a captured CUDA graph reads the old ones.
        self.cache_generation = 0

    def setup_caches(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Zeroed per-layer K/V caches; dtype and device default to the embedding's.

        Caches of the same shape, dtype and device are zeroed in place rather than replaced: a
        compiled decode step captured in a CUDA graph keeps reading the same buffers, where new
        ones would force the graph to be recorded again on the next call.
        """
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(
                f"cache length {max_seq_len} exceeds max_seq_len {self.args.max_seq_len}"
            )
        weight = self.tok_embeddings.weight
        dtype = dtype or weight.dtype
        device = torch.empty(0, device=device or weight.device).device  # "cuda" -> "cuda:0"
        shape = (max_batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        replaced = False
        for layer in self.layers:
            cache = layer.attention.kv_cache
            if (cache is None or cache.k.shape != shape or cache.k.dtype != dtype
                    or cache.k.device != device):
                layer.attention.kv_cache = KVCache(
                    max_batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim, dtype,
                    device,
                )
                replaced = True
        if replaced:
            self.cache_generation += 1
        self.max_batch_size, self.cache_len = max_batch_size, max_seq_len
        self.reset_caches()

    def reset_caches(self) -> None:
        """Zero the K/V caches in place (a new generation over the same buffers)."""
        for layer in self.layers:
            if layer.attention.kv_cache is not None:
                layer.attention.kv_cache.k.zero_()
                layer.attention.kv_cache.v.zero_()

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for tokens [B, T].

        With input_pos [T] the layers write K/V into the caches at those positions and attend
        to every cached position up to each query's own. Without it the caches are not used:
        plain causal attention over tokens, for training and perplexity.
        """
        h, cos, sin, mask = self.prepare(tokens, input_pos)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask)
        return self.output(self.norm(h))

    def prepare(self, tokens: Tensor,
                input_pos: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """What `forward` computes before the blocks: embeddings, RoPE tables (cos, sin) and,
        with a cache, the mask of the positions each query sees (a method of its own so that
        a block-wise compile can compile it too)."""
        batch, seq = tokens.shape
        if input_pos is None:
            if seq > self.args.max_seq_len:
                raise ValueError(f"{seq} tokens exceed max_seq_len {self.args.max_seq_len}")
            positions, mask = torch.arange(seq, device=tokens.device), None
        else:
            self._check_cache_fits(batch, seq, input_pos)
            positions = input_pos
            cached = torch.arange(self.cache_len, device=tokens.device)
            mask = cached[None, :] <= input_pos[:, None]
        cos, sin = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        return self.tok_embeddings(tokens), cos, sin, mask

    def _check_cache_fits(self, batch: int, seq: int, input_pos: Tensor) -> None:
        """Shape-only checks: they cost no host sync and add no graph break."""
        if self.cache_len == 0:
            raise RuntimeError("input_pos given but no KV cache: call setup_caches() first")
        if input_pos.shape != (seq,):
            raise ValueError(f"input_pos has shape {tuple(input_pos.shape)}, expected ({seq},)")
        if batch > self.max_batch_size:
            raise ValueError(f"batch {batch} exceeds the cache batch size {self.max_batch_size}")
        if seq > self.cache_len:
            raise ValueError(f"{seq} tokens exceed the cache length {self.cache_len}")


def fuse_projections_(model: nn.Module) -> nn.Module:
    """Concatenate each attention's wq, wk, wv into one `wqkv` linear and each MLP's w1, w3 into
    one `w13`, in place; the outputs are unchanged. A decode step then runs 4 weight GEMVs per
    layer instead of 7: fewer kernel launches, and no small K/V GEMVs, which read their few
    bytes far below the bandwidth of the large ones. Call it on plain weights, before
    quantizing: per-row and per-group scales are per output row, so quantizing the fused weight
    gives the very codes of quantizing the parts. State-dict keys change to `wqkv`/`w13` (load
    checkpoints first, then fuse). Returns the model."""
    blocks = [m for m in model.modules() if isinstance(m, (Attention, FeedForward))]
    pending = [m for m in blocks if not m.fused]
    for module in pending:  # check every weight first: a refused call changes nothing
        _check_plain([module.wq, module.wk, module.wv] if isinstance(module, Attention)
                     else [module.w1, module.w3])
    for module in pending:
        module.fuse()
    return model


@torch.no_grad()
def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> None:
    """Fill the model with reproducible random weights and zero its caches.

    Benchmarks time random weights (never zeros), and a model built on the meta device needs
    real values after `to_empty`. Linear and embedding weights get normal(0, std), norm gains 1.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if weight.device not in generators:
                generators[weight.device] = torch.Generator(weight.device).manual_seed(seed)
            weight.normal_(0.0, std, generator=generators[weight.device])
    for buffer in model.buffers():
        buffer.zero_()


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None) -> Tensor:
    """Next token [B, 1] from logits [B, vocab]; greedy when temperature is 0.

    Sampling takes argmax(p / e) with e ~ Exp(1), which draws from p like torch.multinomial
    but without its host sync, so the decode step stays capturable in a CUDA graph.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)


def decode_one_token(
    model: Transformer,
    cur_token: Tensor,
    input_pos: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> Tensor:
    """One decode step: cur_token [B, 1] at input_pos [1] -> next token [B, 1].

    This is the function to wrap in torch.compile (fullgraph, "reduce-overhead" or
    "max-autotune"); it has no graph breaks and no host syncs.
    """
    logits = model(cur_token, input_pos)
    return sample(logits[:, -1], temperature, top_k)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    decode_fn: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Prompt [B, T0] -> tokens [B, T0 + max_new_tokens]: a prefill, then one token per step.

    decode_fn replaces decode_one_token (same signature), typically a compiled version of it.
    Existing caches are reused when they are big enough, so a compiled step keeps its graph.
    Inputs are validated here, once, so the step itself never syncs.
    """
    _check_generate_inputs(model, prompt, max_new_tokens, temperature)
    if max_new_tokens == 0:
        return prompt.clone()
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if model.max_batch_size < batch or model.cache_len < total:
        model.setup_caches(batch, total, device=prompt.device)
    step = decode_fn or decode_one_token

    input_pos = torch.arange(prompt_len, device=prompt.device)
    token = sample(model(prompt, input_pos)[:, -1], temperature, top_k)
    tokens = [prompt, token]
    input_pos = input_pos[-1:] + 1
    for _ in range(max_new_tokens - 1):
        # clone: a CUDA-graph step reuses its output buffer on the next replay
        token = step(model, token, input_pos, temperature=temperature, top_k=top_k).clone()
        tokens.append(token)
        input_pos = input_pos + 1
    return torch.cat(tokens, dim=1)


def _check_generate_inputs(
    model: Transformer, prompt: Tensor, max_new_tokens: int, temperature: float
) -> None:
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, seq] with seq >= 1, got {tuple(prompt.shape)}")
    if prompt.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prompt must hold integer token ids, got {prompt.dtype}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total, limit = prompt.shape[1] + max_new_tokens, model.args.max_seq_len
    if total > limit:
        raise ValueError(f"prompt + new tokens = {total} exceeds max_seq_len {limit}")
    low, high = (int(v) for v in torch.aminmax(prompt))  # one host sync, before decoding
    if low < 0 or high >= model.args.vocab_size:
        raise ValueError(f"token ids must be in [0, {model.args.vocab_size}), got [{low}, {high}]")
