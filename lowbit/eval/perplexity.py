"""Perplexity over non-overlapping token windows: the accuracy metric for quantized causal LMs.

The harness is kept deliberately simple and fixed (first ``max_chars`` characters, up to
``max_windows`` windows of ``seq_len`` tokens, no stride) so that numbers from different
quantization schemes, and the fp32 references in ASSETS.md, are directly comparable.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval.corpora import load_text
from lowbit.progress import progress as progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with the amount of evidence behind it."""

    ppl: float
    tokens_scored: int
    windows: int


def _token_ids(tokenizer_or_ids: Any, text_or_ids: Any, max_chars: int) -> torch.Tensor:
    if text_or_ids is None:
        ids = tokenizer_or_ids
    elif isinstance(text_or_ids, str):
        if tokenizer_or_ids is None:
            raise ValueError("a tokenizer is needed to score text")
        # No BOS/EOS: every window is plain running text, scored the same way.
        ids = tokenizer_or_ids(text_or_ids[:max_chars], add_special_tokens=False)["input_ids"]
    else:
        ids = text_or_ids
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to score next-token predictions")
    return ids


def _windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    count = ids.numel() // seq_len
    if count == 0:
        # Shorter than one window: score what there is rather than nothing.
        return ids[None]
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def _logits(model: nn.Module, batch: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = model(batch, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    # HF models would otherwise build a KV cache that scoring never reads.
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def perplexity(
    model: nn.Module,
    tokenizer_or_ids: Any,
    text_or_ids: str | Sequence[int] | torch.Tensor | None = None,
    seq_len: int = 1024,
    max_windows: int | None = 4,
    max_chars: int = 400_000,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Next-token perplexity of ``model`` on a text or a token sequence.

    Call as ``perplexity(model, tokenizer, text)`` or ``perplexity(model, ids)``. Text is
    capped to its first ``max_chars`` characters and cut into at most ``max_windows``
    non-overlapping windows of ``seq_len`` tokens (``None``: all full windows); each window
    scores its ``seq_len - 1`` next-token predictions. ``model(ids)`` may return logits or an
    object with ``.logits`` (Hugging Face causal LMs).
    """
    ids = _token_ids(tokenizer_or_ids, text_or_ids, max_chars)
    windows = _windows(ids, seq_len, max_windows)
    device = next(model.parameters(), torch.empty(0)).device
    kwargs = _forward_kwargs(model)
    total_nll = 0.0
    scored = 0
    was_training = model.training
    model.eval()
    try:
        # no_grad rather than inference_mode: quantized tensor subclasses need not support it.
        with torch.no_grad():
            batches = windows.split(batch_size)
            for batch in progress_bar(batches, "perplexity", len(batches), progress):
                batch = batch.to(device)
                logits = _logits(model, batch, kwargs)[:, :-1].float()
                targets = batch[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
                scored += targets.numel()
    finally:
        model.train(was_training)
    return PerplexityResult(math.exp(total_nll / scored), scored, windows.shape[0])


def heldout_ids(tokenizer: Any, corpus: str = "wiki", chars: int = 400_000) -> torch.Tensor:
    """Token ids of the first `chars` characters of a corpus's held-out split (the slice the
    accuracy tables score), tokenized once so several models can share it."""
    text = load_text(corpus, "heldout")[:chars]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def heldout_perplexity(
    model: nn.Module, tokenizer: Any, corpus: str = "wiki", **kw: Any
) -> PerplexityResult:
    """Perplexity on a corpus's fixed held-out split, the only text accuracy claims may use."""
    return perplexity(model, tokenizer, load_text(corpus, "heldout"), **kw)
