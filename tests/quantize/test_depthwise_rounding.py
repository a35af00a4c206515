"""Sum-preserving depthwise rounding: row sums within half a step, each weight within one."""

from __future__ import annotations

import copy

import torch
from torch import nn

import lowbit
from lowbit.quantize.api import is_conv2d
from lowbit.quantize.depthwise_rounding import (
    round_depthwise_sum_preserving_,
    sum_preserving_codes,
)


def test_row_sums_survive_rounding():
    w = torch.randn(300, 25)
    codes, scale = sum_preserving_codes(w)
    steps = (codes.float() * scale - w) / scale
    # The remainders' sum is rounded away, so the row sum is off by at most half a step;
    # each code moved at most once from nearest, so at most one step per weight.
    assert steps.sum(1).abs().max() <= 0.5 + 1e-4
    assert steps.abs().max() <= 1 + 1e-4
    rtn_sums = (w / scale).round().sub(w / scale).sum(1).abs()
    assert rtn_sums.max() > 0.5  # RTN alone does not keep the sums (25 remainders add up)


def test_only_depthwise_int8_rows_are_rerounded():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 5, groups=8, padding=2))
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.Int8WeightOnly(), is_conv2d, show_progress=False)
    dense_codes = q[0].weight.qdata.clone()
    assert round_depthwise_sum_preserving_(q, model) == ["1"]
    assert torch.equal(q[0].weight.qdata, dense_codes)
    x = torch.randn(2, 4, 6, 6)
    assert (q(x) - model(x)).norm() / model(x).norm() < 0.02  # int8: ~1% per layer at most
