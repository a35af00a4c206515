"""The `lowbit` command: each subcommand on small inputs, and bad inputs -> one line, exit 2."""

import pytest
import torch

pytest.importorskip("transformers")

from integrations.hf_folders import tiny_llama_dir  # noqa: E402

from lowbit.cli import main  # noqa: E402


def _fails_cleanly(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # transformers may draw progress bars on stderr; lowbit's own message is one line.
    ours = [line for line in err.splitlines() if line.startswith("lowbit ")]
    assert len(ours) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in ours[0], err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("cli") / "tiny")


def test_quantize_lowbit_then_refuses_requantizing(tiny, tmp_path, capsys):
    assert main(["quantize", str(tiny), "--config", "int8", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "config.json").exists()
    _fails_cleanly(capsys, ["quantize", str(tmp_path / "q"), "--config", "int8", "--out",
                            str(tmp_path / "x")], "already quantized")


def test_quantize_compressed_tensors(tiny, tmp_path):
    out = tmp_path / "ct"
    argv = ["quantize", str(tiny), "--config", "fp8", "--out", str(out),
            "--format", "compressed-tensors"]
    assert main(argv) == 0
    assert '"compressed-tensors"' in (out / "config.json").read_text()


def test_bad_inputs(tiny, tmp_path, capsys):
    _fails_cleanly(capsys, ["quantize", str(tmp_path / "nope"), "--config", "int8", "--out",
                            str(tmp_path / "x")], "does not exist")
    _fails_cleanly(capsys, ["quantize", str(tiny), "--config", "int4-g12", "--out",
                            str(tmp_path / "x")], "Did you mean 'int4-g128'")
    _fails_cleanly(capsys, ["demo", "--configs", "fp9"], "Did you mean 'fp8'")
    _fails_cleanly(capsys, ["quantize", str(tiny), "--config", "int8", "--out",
                            str(tmp_path / "x"), "--format", "gguf"], "--format")


def test_model_without_linear_layers(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 computes its projections with Conv1D, and lm_head is kept in full precision.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                               n_positions=32)).save_pretrained(tmp_path / "gpt2")
    _fails_cleanly(capsys, ["quantize", str(tmp_path / "gpt2"), "--config", "int8", "--out",
                            str(tmp_path / "x")], "no nn.Linear")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_cuda(capsys):
    _fails_cleanly(capsys, ["bench"], "needs an NVIDIA GPU")


def test_help_lists_commands_and_configs(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "int4-g128" in out and "--calibrate" in out and "compressed-tensors" in out
