"""The `lowbit` command: quantize, eval, bench, demo.

Every user error (missing or already-quantized folder, a model with no linear layers, a
config name with a typo) ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.quantize.configs import ConfigError


class UsageError(ValueError):
    """Bad input from the command line: printed as one line, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    from lowbit.demo import DEMO_CONFIGS, run_demo

    configs = tuple(args.configs.split(",")) if args.configs else DEMO_CONFIGS
    for name in configs:
        _config(name)  # a typo fails before the model loads
    run_demo(configs, args.out, args.windows, args.record)
    return 0


def _config(name: str):
    from lowbit.quantize import preset

    try:
        return preset(name)
    except ConfigError as e:
        raise UsageError(str(e).split(" Valid:")[0] + " (see `lowbit quantize --help`)") from None


def _calibration_batches(spec: str, tokenizer) -> list:
    """``wiki[:N]`` -> N 512-token batches from the corpus's training split (never the held-out
    text that `lowbit eval` scores)."""
    import torch

    from lowbit.eval import CORPORA, load_text

    corpus, _, count = spec.partition("[:")
    if corpus not in CORPORA or (count and not count.rstrip("]").isdigit()):
        raise UsageError(f"--calibrate takes CORPUS or CORPUS[:N] with CORPUS in {CORPORA}, "
                         f"got {spec!r}")
    n = int(count.rstrip("]")) if count else 32
    ids = tokenizer(load_text(corpus, "train")[: n * 4096], add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: n * 512])
    return [b[None] for b in ids.split(512) if b.numel() == 512]


def _quantize(args: argparse.Namespace) -> int:
    from lowbit.integrations.model_dir import load_model_dir, save_model_dir

    config = _config(args.config)
    if args.format not in ("lowbit", "compressed-tensors"):
        raise UsageError(f"--format must be lowbit or compressed-tensors, got {args.format!r}")
    model, tokenizer = load_model_dir(args.model_dir)
    calibration = _calibration_batches(args.calibrate, tokenizer) if args.calibrate else None
    if calibration is not None:
        config = _calibrated(config, args.method)
    summary = _apply(model, config, calibration)
    print(summary)
    out = save_model_dir(model, config, args.out, args.format, args.model_dir)
    print(f"saved {args.format} checkpoint to {out}")
    return 0


def _calibrated(config, method: str):
    try:
        from lowbit.quantize import calibration
    except ImportError as e:
        raise UsageError(f"calibration is not available in this install: {e}") from None
    wrappers = {"gptq": "GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant"}
    if method not in wrappers:
        raise UsageError(f"--method must be one of {', '.join(wrappers)}, got {method!r}")
    try:
        return getattr(calibration, wrappers[method])(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise UsageError(f"{method} cannot wrap this config: {e}") from None


def _apply(model, config, calibration):
    import warnings

    import torch

    from lowbit.quantize import quantize_

    def chosen(module, fqn: str) -> bool:
        # The output embedding stays in full precision (the transformers convention), so
        # the folder loads everywhere, tied embeddings included.
        return isinstance(module, torch.nn.Linear) and fqn != "lm_head"

    if not any(chosen(m, n) for n, m in model.named_modules()):
        raise UsageError("the model has no nn.Linear layers to quantize")
    from lowbit.quantize import ModuleConfigs

    rules = ModuleConfigs(default=config, default_filter=chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_(model, rules, calibration=calibration)


def _eval(args: argparse.Namespace) -> int:
    from lowbit.eval import CORPORA, heldout_perplexity
    from lowbit.integrations.model_dir import load_model_dir

    if args.data not in CORPORA:
        raise UsageError(f"--data must be one of {', '.join(CORPORA)}, got {args.data!r}")
    model, tokenizer = load_model_dir(args.model_dir, allow_quantized=True)
    result = heldout_perplexity(model, tokenizer, args.data, max_windows=args.windows,
                                seq_len=args.seq_len)
    print(f"{args.data} held-out perplexity {result.ppl:.3f} "
          f"({result.tokens_scored} tokens, {result.windows} windows)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("`lowbit bench` times CUDA-graph decode and needs an NVIDIA GPU; "
                         "none is visible (torch.cuda.is_available() is False)")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    if not script.exists():
        raise UsageError(f"{script} not found: `lowbit bench` runs from a source checkout")
    import runpy

    argv = ["bench_decode.py", "--layers", str(args.layers), "--batches", args.batches,
            "--new", str(args.new), "--configs", args.configs, "--torchao", ""]
    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from lowbit.integrations.export import CausalLMLogits, package_aoti, to_executorch
    from lowbit.integrations.model_dir import load_model_dir

    out = Path(args.out)
    if out.suffix not in (".pt2", ".pte"):
        raise UsageError(f"--out must end in .pt2 (AOTInductor) or .pte (ExecuTorch), "
                         f"got {out.name!r}")
    model, _ = load_model_dir(args.model_dir, allow_quantized=True)
    model = CausalLMLogits(model)
    vocab = model.model.config.vocab_size
    if out.suffix == ".pt2":  # example batch 2: export would pin a batch of 1
        path = package_aoti(model, out, (torch.randint(0, vocab, (2, 16)),),
                            portable=args.portable)
    else:
        path = to_executorch(model, out, (torch.randint(0, vocab, (args.batch, 16)),),
                             max_seq=args.max_seq)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lowbit.quantize.presets import PRESETS

    names = ", ".join(PRESETS)
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Make PyTorch models smaller and faster.",
        epilog="Run `lowbit COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quantize", help="quantize a transformers model folder and save it",
        description="Quantize every nn.Linear of a transformers model folder (the output "
        "embedding stays in full precision) and save a folder that "
        "AutoModelForCausalLM.from_pretrained reloads.",
        epilog=f"configs: {names}",
    )
    q.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json + safetensors")
    q.add_argument("--config", required=True, help="config name, e.g. int4-g128, int8, fp8")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--format", default="lowbit", metavar="{lowbit,compressed-tensors}",
                   help="lowbit (reload with `import lowbit.integrations.hf`) or "
                   "compressed-tensors (vLLM, stock transformers); default: %(default)s")
    q.add_argument("--calibrate", metavar="CORPUS[:N]",
                   help="calibrate on N 512-token batches of a training split, e.g. wiki[:32]")
    q.add_argument("--method", default="gptq", help="calibration method: gptq, awq, smoothquant "
                   "(default: %(default)s)")
    q.set_defaults(run=_quantize)

    e = sub.add_parser("eval", help="perplexity of a model folder on a held-out corpus",
                       description="Perplexity on the fixed held-out split of a real corpus.")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="plain, lowbit or compressed-tensors")
    e.add_argument("--data", default="wiki", help="wiki, news or shakespeare (default: wiki)")
    e.add_argument("--windows", type=int, default=4, help="windows to score (default: 4)")
    e.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default: 1024)")
    e.set_defaults(run=_eval)

    b = sub.add_parser("bench", help="decode benchmark (NVIDIA GPU)",
                       description="CUDA-graph decode tokens/s at Llama-3-8B shapes, random "
                       "weights; writes benchmarks/results/decode.json.")
    b.add_argument("--layers", type=int, default=32)
    b.add_argument("--batches", default="1,8")
    b.add_argument("--new", type=int, default=256)
    b.add_argument("--configs", default="int8,int4-g128,fp8,fp8-dynamic,int8-dynamic")
    b.set_defaults(run=_bench)

    demo = sub.add_parser(
        "demo",
        help="quantize SmolLM2-135M with each main config; print size, perplexity, speed",
    )
    demo.add_argument("--configs", help="comma-separated config names (default: the main ones)")
    demo.add_argument("--out", default="demo-out", help="checkpoint folder (default: %(default)s)")
    demo.add_argument("--windows", type=int, default=4, help="1024-token windows to score")
    demo.add_argument("--record", help="also write the table as JSON to this path")
    demo.set_defaults(run=_demo)

    x = sub.add_parser(
        "export", help="compile a model folder into an AOTInductor .pt2 or ExecuTorch .pte",
        description="Export MODEL_DIR (input_ids -> logits, no KV cache) with dynamic "
        "sequence length. A .pt2 package (dynamic batch too) loads with "
        "torch._inductor.aoti_load_package after `import lowbit`, or without lowbit if "
        "--portable; a .pte runs with executorch.runtime (needs the executorch package).",
    )
    x.add_argument("model_dir", metavar="MODEL_DIR", help="plain or lowbit-quantized folder")
    x.add_argument("--out", required=True, help="output file: NAME.pt2 or NAME.pte")
    x.add_argument("--portable", action="store_true",
                   help=".pt2 only: plain ATen ops, loadable without lowbit")
    x.add_argument("--batch", type=int, default=1,
                   help=".pte only: the batch size the program runs at (default: %(default)s)")
    x.add_argument("--max-seq", type=int, default=256,
                   help=".pte only: longest input; memory is planned for it (default: %(default)s)")
    x.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
