"""A decode step captured once in a CUDA graph and replayed with no Python in between.

torch.compile(mode="reduce-overhead") replays CUDA graphs too, but each call still runs
dynamo's guards and AOTAutograd's unwrapping of every tensor-subclass weight before the replay:
~3 ms of host time a step for 225 quantized weights on the H200 host, longer than the int4
step's GPU time (benchmarks/results/decode_32layers.json). Serving stacks capture the step
themselves and replay it from fixed input buffers; `GraphedDecodeStep` does the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.models.llama import Transformer, decode_one_token


class GraphedDecodeStep:
    """`step(model, token, input_pos)` for one model, batch size and sampling setting, replayed
    from a CUDA graph. Use it as `generate(..., decode_fn=GraphedDecodeStep(...))`.

    `step_fn` is the decode function to capture, typically
    `torch.compile(decode_one_token, fullgraph=True)` (not mode="reduce-overhead": that one
    manages CUDA graphs itself). Capturing runs the step a few times, which writes the KV cache
    at position 0, so the caches are zeroed afterwards: capture before the prefill. On Hopper,
    compile with `torch._inductor.config.triton.enable_pdl = True`: lowbit's kernels already
    launch with programmatic dependent launch, and with inductor's doing the same the kernel
    boundaries of the captured step overlap (docs/decode-speed.md).
    """

    def __init__(
        self,
        model: Transformer,
        batch: int,
        step_fn: Callable[..., Tensor] = decode_one_token,
        temperature: float = 0.0,
        top_k: int | None = None,
        warmup: int = 3,
    ) -> None:
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
        if model.cache_len == 0 or batch > model.max_batch_size:
            raise RuntimeError(f"call model.setup_caches() for batch {batch} before capturing")
        self.model, self.temperature, self.top_k = model, temperature, top_k
        self._cache_generation = model.cache_generation
        self._token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compile, autotune and allocate outside the capture
                for _ in range(warmup):
                    step_fn(model, self._token, self._pos, temperature, top_k)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._out = step_fn(model, self._token, self._pos, temperature, top_k)
        model.reset_caches()

    def __call__(
        self,
        model: Transformer,
        cur_token: Tensor,
        input_pos: Tensor,
        temperature: float = 0.0,
        top_k: int | None = None,
    ) -> Tensor:
        """Next token [B, 1]; the returned tensor is overwritten by the next call (clone it)."""
        if model is not self.model:
            raise ValueError("this step was captured for another model")
        if model.cache_generation != self._cache_generation:
            raise RuntimeError(
                "the KV caches were reallocated after capture (setup_caches with another shape, "
                "dtype or device); the graph still reads the old ones: capture the step again"
            )
        if (temperature, top_k) != (self.temperature, self.top_k):
            raise ValueError(
                f"captured with temperature={self.temperature}, top_k={self.top_k}; "
                f"called with temperature={temperature}, top_k={top_k}"
            )
        if cur_token.shape != self._token.shape or input_pos.shape != self._pos.shape:
            raise ValueError(
                f"captured for token {tuple(self._token.shape)} and input_pos (1,), got "
                f"{tuple(cur_token.shape)} and {tuple(input_pos.shape)}"
            )
        self._token.copy_(cur_token)
        self._pos.copy_(input_pos)
        self.graph.replay()
        return self._out
