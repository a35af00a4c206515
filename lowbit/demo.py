"""The README's main job: quantize SmolLM2-135M with each main config and compare.

For every config: size on disk of the saved safetensors checkpoint, perplexity on the
held-out Wikipedia slice (never used for calibration), and forward tokens/s on this
machine. Caveat (../shared/ASSETS.md): SmolLM2 was shipped as GGUF Q4_1 (groups of 32),
so int4 with groups of 32 reproduces it almost exactly; the demo uses groups of 64.
"""

from __future__ import annotations

import copy
import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.integrations import save_quantized
from lowbit.quantize import preset, quantize_

DEMO_CONFIGS = (
    "int8",
    "int8-dynamic",
    "fp8",
    "fp8-dynamic",
    "int4-g64",
    "int4-g64-float-zero",
    "int8-dynamic-int4-g32",
    "int3-g64",
)


@dataclass
class DemoRow:
    name: str
    size_mib: float
    ppl: float
    tokens_per_s: float
    quantized: int
    skipped: int
    path: Path


def _measure(name, model, ids, path, windows, quantized=0, skipped=0) -> DemoRow:
    from lowbit.eval import perplexity

    save_quantized(model, path)
    with torch.no_grad():  # warm-up: first-call allocations are not part of the speed
        model(ids[None, :128])
    start = time.perf_counter()
    result = perplexity(model, ids, max_windows=windows, progress=False)
    elapsed = time.perf_counter() - start
    tps = result.windows * 1024 / elapsed
    size = path.stat().st_size / 2**20
    return DemoRow(name, size, result.ppl, tps, quantized, skipped, path)


def run_demo(
    configs: tuple[str, ...] = DEMO_CONFIGS,
    out_dir: str | Path = "demo-out",
    windows: int = 4,
    record: str | Path | None = None,
) -> list[DemoRow]:
    from lowbit.eval import heldout_ids, load_smollm2

    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print("loading SmolLM2-135M-Instruct (fp32) and the held-out Wikipedia slice ...")
    base, tokenizer = load_smollm2()
    ids = heldout_ids(tokenizer, "wiki")
    rows = [_measure("fp32", base, ids, out / "fp32.safetensors", windows)]
    _print_row(rows[-1], rows[0])
    for name in configs:
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = quantize_(model, preset(name), show_progress=False)
        row = _measure(name, model, ids, out / f"{name}.safetensors", windows,
                       len(summary.quantized), len(summary.skipped))
        rows.append(row)
        _print_row(row, rows[0])
    print(f"\ncheckpoints: {out.resolve()}/<config>.safetensors "
          "(load with lowbit.load_quantized(model, path))")
    if record:
        _record(rows, Path(record), windows)
    return rows


def _record(rows: list[DemoRow], path: Path, windows: int) -> None:
    """Write the table as JSON (benchmarks/report.py turns it into RESULTS.md)."""
    conditions = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "machine": f"CPU, {torch.get_num_threads()} threads, {platform.machine()}",
        "model": "SmolLM2-135M-Instruct fp32",
    }
    note = (f"Held-out Wikipedia slice, {windows} windows of 1024 tokens. tokens/s is the "
            "CPU forward speed of this harness, not a GPU number. Caveat: SmolLM2 shipped as "
            "GGUF Q4_1 (groups of 32), so group-32 int4 weights look near-lossless on it.")
    data = {"conditions": conditions, "note": note, "rows": [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(r).items()} for r in rows
    ]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"recorded {path}")


def _print_row(row: DemoRow, base: DemoRow) -> None:
    if row is base:
        print(f"\n{'config':<24}{'size MiB':>10}{'wiki ppl':>10}{'vs fp32':>9}"
              f"{'tok/s':>8}  layers quantized/skipped")
    delta = 100 * (row.ppl / base.ppl - 1)
    print(f"{row.name:<24}{row.size_mib:>10.1f}{row.ppl:>10.3f}{delta:>+8.2f}%"
          f"{row.tokens_per_s:>8.0f}  {row.quantized}/{row.skipped}")
