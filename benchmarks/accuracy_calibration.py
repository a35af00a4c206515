"""Calibration accuracy on the real model: SmolLM2-135M held-out perplexity per method.

Runs on the CPU (the model wheel cannot travel to the GPU machine) and writes
benchmarks/results/calibration.json: fp32, round-to-nearest (RTN), HQQ, AWQ and GPTQ at
int4 and int3 with groups of 64, int8 and fp8 dynamic activations with and without
SmoothQuant, fp8 weight-only. Calibration batches come from the Wikipedia *train* split only;
perplexity is measured on the fixed held-out splits of Wikipedia and news (4 windows of 1024
tokens each).

    python benchmarks/accuracy_calibration.py            # every row, several minutes
    python benchmarks/accuracy_calibration.py --only gptq --out /tmp/x.json
    python benchmarks/accuracy_calibration.py --only hqq --update   # redo HQQ, keep the rest
    python benchmarks/accuracy_calibration.py --only "AWQ int3 g64" --update   # one row
    PYTHONPATH=/tmp/aosite python benchmarks/accuracy_calibration.py --torchao   # + torchao rows

torchao 0.18's rows use its nearest configs (int4 and intx weight-only with affine or HQQ
qparams, int8 and fp8 dynamic, fp8 weight-only) and its prototype AWQ / GPTQ / SmoothQuant
flows on the same calibration batches; a row it cannot run on the CPU is recorded with the
error instead.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.eval import heldout_ids, load_smollm2, load_text, perplexity
from lowbit.formats import PerGroup
from lowbit.quantize import (
    AWQ,
    GPTQ,
    HQQ,
    Float8DynamicActivationFloat8Weight,
    Float8WeightOnly,
    Int4WeightOnly,
    Int8DynamicActivationInt8Weight,
    IntxWeightOnly,
    QuantConfig,
    SmoothQuant,
    quantize_,
)

RESULTS = Path(__file__).parent / "results"
# The output head is tied to the input embedding in SmolLM2; quantizing it quantizes the
# embedding too, which calibration never sees as a linear input. GPTQ/AWQ toolkits (and
# llm-compressor's recipes) leave it in full precision by default; so does this table.
KEEP_FULL_PRECISION = ("lm_head",)


def body_linears(module: torch.nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output head."""
    return isinstance(module, torch.nn.Linear) and fqn not in KEEP_FULL_PRECISION
WINDOWS = 4
CORPORA = ("wiki", "news")


def _int3(zero: str) -> QuantConfig:
    return IntxWeightOnly(3, PerGroup(64), "asymmetric", zero)


# (method, label, config); None is the fp32 model. Int zeros for RTN/AWQ/GPTQ (the formats
# the GPTQ/AWQ ecosystems ship), float zeros for HQQ (the format it optimizes), with the RTN
# float-zero rows as HQQ's own baseline.
ROWS: list[tuple[str, str, QuantConfig | None]] = [
    ("fp32", "fp32", None),
    ("RTN", "int4 g64", Int4WeightOnly(64)),
    ("RTN", "int4 g64 float zero", Int4WeightOnly(64, zero="float")),
    ("HQQ", "int4 g64 float zero", HQQ(Int4WeightOnly(64, zero="float"))),
    ("AWQ", "int4 g64", AWQ(Int4WeightOnly(64))),
    ("GPTQ", "int4 g64", GPTQ(Int4WeightOnly(64), act_order=True, clip=True)),
    ("RTN", "int3 g64", _int3("int")),
    ("RTN", "int3 g64 float zero", _int3("float")),
    ("HQQ", "int3 g64 float zero", HQQ(_int3("float"))),
    ("AWQ", "int3 g64", AWQ(_int3("int"))),
    ("GPTQ", "int3 g64", GPTQ(_int3("int"), act_order=True, clip=True)),
    ("RTN", "int8 dynamic", Int8DynamicActivationInt8Weight()),
    ("SmoothQuant", "int8 dynamic", SmoothQuant(Int8DynamicActivationInt8Weight(), 0.5)),
    ("RTN", "fp8 dynamic (rowwise)", Float8DynamicActivationFloat8Weight()),
    ("SmoothQuant", "fp8 dynamic (rowwise)",
     SmoothQuant(Float8DynamicActivationFloat8Weight(), 0.5)),
    ("RTN", "fp8 weight-only (rowwise)", Float8WeightOnly()),
]


def calibration_batches(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """`count` consecutive, non-overlapping windows of the Wikipedia train split."""
    text = load_text("wiki", "train")[: count * length * 8]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.numel() < count * length:
        raise ValueError(f"train split too short for {count} x {length} tokens")
    return list(ids[: count * length].view(count, 1, length))


def _torchao_rows():
    """(label, make_config, calibrated) for torchao 0.18's nearest configs."""
    from torchao.prototype.awq import AWQConfig
    from torchao.prototype.gptq import GPTQConfig
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerRow,
    )
    from torchao.quantization import PerGroup as AoPerGroup

    def intx(bits: int, algorithm: str = "affine"):
        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=AoPerGroup(64),
            mapping_type=MappingType.ASYMMETRIC if algorithm == "affine"
            else MappingType.SYMMETRIC,
            intx_choose_qparams_algorithm=algorithm,
        )

    return [  # calibration-free rows first: the calibrated flows take minutes each
        ("int4 g64 (intx, affine)", lambda step: intx(4), False),
        ("int4 g64 (intx, hqq_scale_only)", lambda step: intx(4, "hqq_scale_only"), False),
        ("int4 g64 (Int4WeightOnly, plain)", lambda step: Int4WeightOnlyConfig(64), False),
        ("int4 g64 (Int4WeightOnly, hqq)",
         lambda step: Int4WeightOnlyConfig(64, int4_packing_format="tile_packed_to_4d",
                                           int4_choose_qparams_algorithm="hqq"), False),
        ("int3 g64 (intx, affine)", lambda step: intx(3), False),
        ("int3 g64 (intx, hqq_scale_only)", lambda step: intx(3, "hqq_scale_only"), False),
        ("int8 dynamic", lambda step: Int8DynamicActivationInt8WeightConfig(), False),
        ("fp8 weight-only", lambda step: Float8WeightOnlyConfig(), False),
        ("fp8 dynamic (rowwise)",
         lambda step: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), False),
        ("int8 dynamic SmoothQuant",
         lambda step: SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig(), step=step,
                                        alpha=0.5), True),
        ("int4 g64 GPTQ (Int4WeightOnly)",
         lambda step: GPTQConfig("observe" if step == "prepare" else step,
                                 Int4WeightOnlyConfig(64)), True),
        ("int4 g64 AWQ (intx)", lambda step: AWQConfig(intx(4), step=step), True),
        ("int3 g64 AWQ (intx)", lambda step: AWQConfig(intx(3), step=step), True),
    ]


def run_torchao(model, batches, heldout) -> Iterator[dict]:
    """torchao rows, one at a time: quantize a copy with each config (prepare, calibrate,
    convert for the calibrated flows) and measure the same held-out perplexities."""
    import torchao
    from torchao.quantization import quantize_ as ao_quantize_

    for label, make, calibrated in _torchao_rows():
        q = copy.deepcopy(model)
        start = time.perf_counter()
        try:
            if calibrated:
                ao_quantize_(q, make("prepare"), filter_fn=body_linears)
                with torch.no_grad():
                    for batch in batches:
                        q(batch)
                ao_quantize_(q, make("convert"), filter_fn=body_linears)
            else:
                ao_quantize_(q, make(None), filter_fn=body_linears)
            seconds = time.perf_counter() - start
            ppl = {f"{c}_ppl": round(perplexity(q, ids, max_windows=WINDOWS,
                                                progress=False).ppl, 3)
                   for c, ids in heldout.items()}
        except Exception as e:  # a prototype flow that does not run here is a result too
            seconds = time.perf_counter() - start  # up to the failure
            ppl = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        row = {"method": f"torchao {torchao.__version__}", "config": label, **ppl,
               "quantize_seconds": round(seconds, 1)}
        print(row, flush=True)
        del q
        yield row


def _conditions(args) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"CPU, {torch.get_num_threads()} threads, {platform.machine()} (shared with "
                   "other jobs: quantize_seconds are indicative)",
        "model": "SmolLM2-135M-Instruct fp32; every nn.Linear quantized except lm_head (tied to "
                 "the embedding), which stays fp32",
        "windows": f"{WINDOWS} x 1024 tokens per corpus (held-out splits)",
        "calibration": f"{args.calib_seqs} x {args.calib_len} tokens of the wiki train split",
    }


NOTE = (
    "Every method quantizes the 210 decoder linears; lm_head (tied to the embedding) stays "
    "fp32, as GPTQ/AWQ toolkits do by default. Targets: gap closed = (RTN - method) / "
    "(RTN - fp32) on Wikipedia, against "
    "RTN int4 g64 with an integer zero. Caveat: SmolLM2 shipped as GGUF Q4_1 (groups of 32 "
    "with a float zero), so group-32 float-zero int4 would look lossless; groups of 64 are "
    "used here."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*",
                        help="methods or 'method config' rows to run (fp32 always runs)")
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "calibration.json")
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows run now in --out, keep its other rows")
    parser.add_argument("--torchao", action="store_true",
                        help="also run torchao's nearest configs (needs torchao importable)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model, tokenizer = load_smollm2()
    heldout = {c: heldout_ids(tokenizer, c) for c in CORPORA}
    batches = calibration_batches(tokenizer, args.calib_seqs, args.calib_len)
    only = {m.lower() for m in args.only} if args.only else None
    rows = []
    for method, label, config in ROWS:
        chosen = only is None or {method.lower(), f"{method} {label}".lower()} & only
        if method != "fp32" and not chosen:
            continue
        q = model if config is None else copy.deepcopy(model)
        start = time.perf_counter()
        if config is not None:
            data = batches if method in ("GPTQ", "AWQ", "SmoothQuant") else None
            quantize_(q, config, body_linears, calibration=data, show_progress=False)
        seconds = time.perf_counter() - start
        row = {
            "method": method,
            "config": label,
            **{f"{c}_ppl": round(perplexity(q, ids, max_windows=WINDOWS, progress=False).ppl, 3)
               for c, ids in heldout.items()},
            "quantize_seconds": round(seconds, 1),
            "spec": None if config is None else config.to_dict(),
        }
        rows.append(row)
        print(f"{method:<12}{label:<26}{row['wiki_ppl']:>9}{row['news_ppl']:>9}"
              f"{row['quantize_seconds']:>8}s", flush=True)
        del q
        _write(args, rows)  # after every row: a long run that is stopped keeps what it measured
    if args.torchao:
        for row in run_torchao(model, batches, heldout):
            rows.append(row)
            _write(args, rows)
    print(f"wrote {args.out}")


_REDONE = " Rows redone later by --update, same script and settings: "


def _gap_closed(rows: list[dict]) -> None:
    """Fraction of the RTN int4 g64 (integer zero) Wikipedia gap to fp32 each method closes."""
    ppl = {(r["method"], r["config"]): r.get("wiki_ppl") for r in rows}
    fp32, rtn = ppl.get(("fp32", "fp32")), ppl.get(("RTN", "int4 g64"))
    if fp32 is None or rtn is None:
        return
    for r in rows:
        if r["method"] not in ("fp32", "RTN") and "int4" in r["config"] and "wiki_ppl" in r:
            r["gap_closed_vs_rtn_int4"] = round((rtn - r["wiki_ppl"]) / (rtn - fp32), 3)


def _write(args, rows: list[dict]) -> None:
    """Write `rows`; with --update, in place of the same (method, config) rows of --out,
    keeping its conditions and note and saying in both which rows this run redid, when."""
    conditions, note = _conditions(args), NOTE
    if args.update and args.out.exists():
        old = json.loads(args.out.read_text())
        earlier = old["conditions"].get("updated", {}).get("rows", [])
        redone = list(dict.fromkeys(earlier + [f"{r['method']} {r['config']}" for r in rows]))
        conditions = {**old["conditions"], "updated": {"date": conditions["date"],
                                                       "rows": redone}}
        note = (old["note"].split(_REDONE)[0] + _REDONE
                + f"{', '.join(redone)} ({conditions['updated']['date']}).")
        new = {(r["method"], r["config"]): r for r in rows}
        rows = [new.pop((r["method"], r["config"]), r) for r in old["rows"]]
        rows += list(new.values())
    _gap_closed(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"conditions": conditions, "note": note, "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
