"""The training examples run end to end on tiny settings and show what they claim.

examples/ is not a package, so each script is imported from its path and its main() is called
in-process with short runs. They read the real Wikipedia corpus (lowbit.eval.corpora).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import leave_spawned_worker

from lowbit.eval import load_text

try:  # the corpus comes from the gensim wheel, parsed with mwparserfromhell (then cached)
    load_text("wiki", "heldout")
except ModuleNotFoundError as e:
    pytest.skip(f"the Wikipedia corpus is not available: {e}", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# A byte-level model that predicts nothing scores ln(256) = 5.55 nats; learning just the byte
# frequencies of English text already takes it below 3.5, so a 1-nat drop is "it trained".
LEARNED = 1.0


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained(losses: list[float]) -> bool:
    return sum(losses[-5:]) / 5 < losses[0] - LEARNED


@pytest.mark.parametrize("recipe,steps", [("tensorwise", 40), ("rowwise", 10)])
def test_train_fp8(recipe, steps):
    r = load_example("train_fp8").main(["--recipe", recipe, "--steps", str(steps),
                                        "--device", "cpu"])
    assert r["fp8_linears"] == 14 and r["converted_back"] == 14  # 7 per block, not the head
    if steps >= 40:
        assert _trained(r["train_losses"]), r["train_losses"]
    # Export keeps the trained parameters bit for bit (same Parameter objects, same keys).
    assert r["state_dict_unchanged"]
    # The plain model drops the fp8 casts, so its logits differ by fp8 rounding only. e4m3
    # rounds each operand with a relative error uniform in +-2^-4 (RMS 2^-4/sqrt(3) = 3.6%),
    # so one GEMM with two rounded operands has a relative RMS error near 5% (26 dB) when
    # the errors add in quadrature. Through 2 blocks' residual adds and the high-precision
    # head the logits keep at least that: 20 dB leaves 6 dB for compounding (an estimate,
    # not a worst-case bound; measured ~48 dB).
    assert r["logits_sqnr_db"] > 20
    assert abs(r["heldout_loss_plain"] - r["heldout_loss_fp8"]) < 0.05


def _fsdp_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r = load_example("train_fp8").main(["--steps", "4", "--device", "cpu"])
    if rank == 0:  # rank 0 gathers the full weights and exports them
        assert r["state_dict_unchanged"] and r["converted_back"] == 14
        assert r["logits_sqnr_db"] > 20  # as in test_train_fp8
    else:
        assert r == {}
    leave_spawned_worker()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_train_fp8_fsdp():
    # The torchrun path: 2 processes, gloo, fp8 all-gather, full state dict gathered for export.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a process with threads (compile, other tests) can deadlock when forked.
    mp.start_processes(_fsdp_worker, args=(port,), nprocs=2, start_method="spawn")


# Bytes of optimizer state per parameter that the formats allow: each quantized moment stores
# 1 byte (8-bit) or 1/2 byte (4-bit) per element plus one float32 scale per block of 256 / 128
# elements, for two moments: 2 + 8/256 = 2.031 and 1 + 8/128 = 1.0625. The example's model
# (344704 parameters) has 640 norm gains with float32 moments (+8 * 640 / 344704 = 0.015)
# and shares one code book per format (< 0.003), so 2.1 and 1.1 hold with margin.
MAX_BYTES = {"8bit": 2.1, "4bit": 1.1}


@pytest.mark.parametrize("optimizer,steps", [("4bit", 12), ("8bit", 6)])
def test_train_low_bit_optimizer(optimizer, steps):
    r = load_example("train_low_bit_optimizer").main(
        ["--optimizer", optimizer, "--steps", str(steps), "--device", "cpu"])
    assert r["fp32_bytes_per_param"] == 8.0  # torch AdamW: two float32 moments
    assert r["lowbit_bytes_per_param"] <= MAX_BYTES[optimizer]
    # Resume replays the same batches from the saved model and optimizer: the same float ops
    # in the same order, so the trajectory is bit-identical (losses and final weights).
    assert r["resume_exact"]
    assert r["resumed_losses"] == r["lowbit_losses"]
    # On CPU the offloaded optimizer runs the same optimizer class on the same device type,
    # so its steps are the on-device run's, bit for bit.
    assert r["offload_max_loss_diff"] == 0.0
    if steps >= 12:
        assert r["lowbit_losses"][-1] < r["lowbit_losses"][0] - LEARNED


def test_train_qat():
    r = load_example("train_qat").main(["--pretrain-steps", "60", "--qat-steps", "20",
                                        "--device", "cpu"])
    # Every prepared linear (7 per block + the head) became a real quantized weight.
    assert r["prepared"] == 15 and r["quantized_linears"] == 15
    # What QAT trained is what convert ships: fake quant and the converted IntWeight decode
    # through the same codec, and both run float32 F.linear on the decoded weight on CPU.
    assert r["fake_quant_loss"] == r["qat_convert"]
    assert all(math.isfinite(v) for v in (r["float"], r["ptq"], r["finetune_ptq"]))
    # Not asserted: qat_convert <= ptq. QAT usually wins at 2 bits, but on a 60-step model
    # and one seed it is an outcome of the run, not a property of the code.
