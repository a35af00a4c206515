"""Export a quantized model with torch.export (and optionally AOTInductor), check it matches.

    python examples/export_quantized.py                               # "small" Llama, int8
    python examples/export_quantized.py --config int4-g64 --aoti model.pt2
    python examples/export_quantized.py --preset tiny --config int4-g64

This example is about the export plumbing, so the model is lowbit's reference Llama with
random weights: nothing here measures accuracy (see examples/quantize_and_generate.py).
A quantized linear exports as one opaque `lowbit::*` op; `--portable` additionally writes a
program whose ops are all plain ATen (the reference decode traced in), for runtimes that do
not have lowbit installed.
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.integrations.export import export_quantized, package_aoti
from lowbit.models import ModelArgs, Transformer, init_weights
from lowbit.quantize import preset

# Batch and sequence sizes unlike any model dimension, so export cannot pin a dynamic dim to
# a model size by accident; the program is then run at other sizes to show they stay dynamic.
EXAMPLE_SHAPE = (3, 11)
RUN_SHAPES = ((1, 5), (4, 37))


def lowbit_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The `lowbit::*` ops the exported graph calls (empty for a portable program)."""
    return {str(n.target) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("lowbit.")}


def max_diff(run, model: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest |run(x) - model(x)| over the inputs (model = the eager quantized model)."""
    with torch.no_grad():
        return max((run(x) - model(x)).abs().max().item() for x in inputs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=("tiny", "small"), help="model size")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--config", default="int8", help="lowbit preset, e.g. int8, int4-g64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--portable", action="store_true", help="also export with plain ATen ops")
    p.add_argument("--aoti", metavar="PATH.pt2", help="also compile an AOTInductor package")
    args = p.parse_args(argv)

    # 1. A Llama-style model with reproducible random weights, quantized in place.
    overrides = {} if args.layers is None else {"n_layers": args.layers}
    margs = ModelArgs.from_name(args.preset, **overrides)
    model = Transformer(margs).to(args.device).eval()
    with torch.no_grad():
        init_weights(model, seed=0)
    summary = lowbit.quantize_(model, preset(args.config), show_progress=False)
    print(summary)

    # 2. torch.export with dynamic batch and sequence dims; the result is a plain
    #    ExportedProgram (save it with torch.export.save, serve it, or compile it further).
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, margs.vocab_size, EXAMPLE_SHAPE, generator=gen)
    program = export_quantized(model, (tokens.to(args.device),))
    inputs = [torch.randint(0, margs.vocab_size, s, generator=gen).to(args.device)
              for s in RUN_SHAPES]
    r = {"config": args.config, "quantized": len(summary.quantized),
         "lowbit_ops": sorted(lowbit_ops(program)),
         "diff_export": max_diff(program.module(), model, inputs)}
    print(f"exported program calls {r['lowbit_ops']}; max |exported - eager| over shapes "
          f"{RUN_SHAPES}: {r['diff_export']:.3g}")

    # 3. Portable: every lowbit op replaced by its reference decode in plain ATen ops.
    if args.portable:
        portable = export_quantized(model, (tokens.to(args.device),), portable=True)
        r["portable_lowbit_ops"] = sorted(lowbit_ops(portable))
        r["diff_portable"] = max_diff(portable.module(), model, inputs)
        print(f"portable program: lowbit ops {r['portable_lowbit_ops']}, max |portable - eager| "
              f"{r['diff_portable']:.3g}")

    # 4. AOTInductor: compile the program ahead of time into one .pt2 package. Another process
    #    loads it with `import lowbit; torch._inductor.aoti_load_package(path)`.
    if args.aoti:
        path = package_aoti(program, args.aoti)
        run = torch._inductor.aoti_load_package(str(path))
        r["diff_aoti"] = max_diff(run, model, inputs)
        with torch.no_grad():
            r["max_abs_eager"] = max(model(x).abs().max().item() for x in inputs)
        print(f"AOTInductor package {path}: max |aoti - eager| {r['diff_aoti']:.3g} "
              f"(outputs up to {r['max_abs_eager']:.3g})")
    return r


if __name__ == "__main__":
    main()
