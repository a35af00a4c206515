"""Byte-level corpus helpers shared by the training examples and benchmarks."""

import torch


def test_byte_tokens_and_random_windows():
    from lowbit.eval import byte_tokens, random_windows

    tokens = byte_tokens("héllo, world")
    assert tokens.dtype == torch.int64 and tokens.tolist()[:2] == [104, 195]
    windows = random_windows(tokens, 3, 4, torch.Generator().manual_seed(0))
    assert windows.shape == (3, 5)
    runs = tokens.unfold(0, 5, 1)  # every run of 5 consecutive tokens
    for w in windows:
        assert (runs == w).all(dim=1).any()
