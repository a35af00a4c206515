"""The `lowbit` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from lowbit.demo import DEMO_CONFIGS, run_demo

    configs = tuple(args.configs.split(",")) if args.configs else DEMO_CONFIGS
    run_demo(configs, args.out, args.windows, args.record)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Make PyTorch models smaller and faster."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="quantize SmolLM2-135M with each main config; print size, perplexity, speed",
    )
    demo.add_argument("--configs", help="comma-separated config names (default: the main ones)")
    demo.add_argument("--out", default="demo-out", help="checkpoint folder (default: %(default)s)")
    demo.add_argument("--windows", type=int, default=4, help="1024-token windows to score")
    demo.add_argument("--record", help="also write the table as JSON to this path")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
