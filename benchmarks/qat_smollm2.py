"""QAT on the real model: SmolLM2-135M, int8 dynamic activations x int4 weights (group 64).

Compares held-out perplexity (Wikipedia and news, 4 windows of 1024 tokens each, the fixed
held-out splits of lowbit.eval.corpora) for:

- fp32: the pretrained model;
- PTQ (RTN): `quantize_` on the pretrained weights;
- fine-tune -> PTQ: the same training run without fake-quant, then `quantize_` (so any gain of
  QAT over PTQ is not just the fine-tune on Wikipedia text);
- QAT -> convert: the same training run with `lowbit.qat.prepare`, then `convert`.

Both runs see the same batches (random windows of the Wikipedia *train* split, fixed seed),
the same optimizer and schedule. The decoder layers' linears are quantized (and trained);
the tied embedding / lm_head stays in fp32 and frozen (quantizing a tied 49152 x 576 table
to 4 bits is a separate question, and freezing it skips its large weight gradient). Runs on
the CPU because the model wheel cannot travel to the GPU machine:

    nice -n 10 python benchmarks/qat_smollm2.py                # all rows, one process
    python benchmarks/qat_smollm2.py --steps 5 --out /tmp/x.json   # smoke test

The recorded run (a CPU shared with other jobs) ran the parts as parallel processes and
merged them:

    python benchmarks/qat_smollm2.py --rows base --out /tmp/base.json
    python benchmarks/qat_smollm2.py --steps 60 --seq-len 128 --batch 1 --lr 1e-4 \
        --threads 1 --rows qat --out /tmp/qat.json        # and --rows finetune
    python benchmarks/qat_smollm2.py --merge /tmp/base.json /tmp/qat.json /tmp/finetune.json
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit import qat
from lowbit.eval import load_smollm2, load_text, perplexity
from lowbit.quantize import Int8DynamicActivationInt4Weight, quantize_

RESULTS = Path(__file__).parent / "results"
CORPORA = ("wiki", "news")
CONFIG = Int8DynamicActivationInt4Weight(group_size=64)


def decoder_linear(module: nn.Module, fqn: str) -> bool:
    """Linears of the transformer blocks; not lm_head (tied to the embedding)."""
    return isinstance(module, nn.Linear) and fqn.startswith("model.layers.")


def evaluate(model, tokenizer) -> dict[str, float]:
    return {
        c: perplexity(model, tokenizer, load_text(c, "heldout"), progress=False).ppl
        for c in CORPORA
    }


def train(model, ids: torch.Tensor, args, label: str) -> dict:
    """AdamW, linear warmup then cosine decay, grad-norm clip 1; returns loss curve stats."""
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with lm_head
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"[{label}] step {step} loss {loss.item():.3f} ({rate:.2f} steps/s)", flush=True)
    model.eval()
    k = max(1, args.steps // 10)
    return {
        "first_loss_mean": sum(losses[:k]) / k,
        "last_loss_mean": sum(losses[-k:]) / k,
        "train_seconds": round(time.perf_counter() - start, 1),
    }


def add_train_args(ap: argparse.ArgumentParser, steps: int, seq_len: int, batch: int,
                   lr: float, out: Path) -> None:
    """The options `train` reads (with these defaults), plus --seed and --threads, and the
    results file --out with --merge (combine rows run in separate processes into it)."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="only merge the rows of these result files (same settings) into --out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_train_args(ap, steps=300, seq_len=256, batch=4, lr=2e-5,
                   out=RESULTS / "qat_smollm2.json")
    ap.add_argument("--rows", default="base,qat,finetune",
                    help="which parts to run: base (fp32, PTQ), qat, finetune")
    args = ap.parse_args()
    if args.merge:
        _merge(args.out, args.merge)
        return
    rows = set(args.rows.split(","))
    torch.manual_seed(args.seed)
    if args.threads:
        # One thread per process wastes less in OpenMP barriers on a CPU shared with others.
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="quantize_ skipped")

    import json

    import lowbit

    base, tokenizer = load_smollm2()
    ids = torch.tensor(tokenizer(load_text("wiki", "train"), add_special_tokens=False)["input_ids"])
    result: dict = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "config": CONFIG.to_dict(),
        "quantized_layers": "all linears of model.layers.* (210); embedding/lm_head fp32",
        "eval": "held-out splits, 4 windows x 1024 tokens (4092 scored tokens) per corpus",
        "training": {
            "data": f"random {args.seq_len}-token windows of the wiki train split "
            f"({ids.numel()} tokens)",
            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "optimizer": "AdamW wd 0, warmup 5% then cosine to 10%, clip 1.0",
            "trained": "all decoder-layer parameters + final norm; embedding frozen",
            "seed": args.seed,
        },
        "conditions": {"torch": torch.__version__, "device": "cpu",
                       "threads": torch.get_num_threads(), "lowbit": lowbit.__version__},
        "rows": {},
    }

    def record(name: str, model, extra: dict | None = None) -> None:
        t = time.perf_counter()
        row = evaluate(model, tokenizer) | (extra or {})
        row["eval_seconds"] = round(time.perf_counter() - t, 1)
        result["rows"][name] = row
        print(name, row, flush=True)
        _summarize(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    if "base" in rows:
        record("fp32", base)
        ptq = copy.deepcopy(base)
        quantize_(ptq, CONFIG, decoder_linear, show_progress=False)
        record("ptq_rtn", ptq)
        del ptq
    if "qat" in rows:
        model = copy.deepcopy(base)
        prep = qat.prepare(model, CONFIG, decoder_linear)
        stats = train(model, ids, args, "qat")
        qat.convert(model)
        record("qat_convert", model, {"prepared_layers": len(prep.prepared), **stats})
        del model
    if "finetune" in rows:
        model = copy.deepcopy(base)
        stats = train(model, ids, args, "finetune")
        record("finetune_fp32", model, stats)
        quantize_(model, CONFIG, decoder_linear, show_progress=False)
        record("finetune_ptq", model)


def _merge(out: Path, parts: list[Path]) -> None:
    """Combine runs of different rows (e.g. run in parallel processes) with equal settings."""
    import json

    loaded = [json.loads(p.read_text()) for p in parts]
    # fp32 / PTQ rows involve no training, so only trained parts must agree on its settings.
    trained = [d for d in loaded if set(d["rows"]) - {"fp32", "ptq_rtn"}] or loaded
    merged = dict(trained[0], rows={})
    for part, other in zip(parts, loaded):
        mismatch = other["config"] != merged["config"] or (
            other in trained and other["training"] != merged["training"]
        )
        if mismatch:
            raise ValueError(f"{part} was run with different settings; not merging")
        merged["rows"].update(other["rows"])
    _summarize(merged)
    out.write_text(json.dumps(merged, indent=1))


def _summarize(result: dict) -> None:
    """Recovery = share of the PTQ perplexity increase over fp32 that a method removes."""
    rows = result["rows"]
    if "fp32" not in rows or "ptq_rtn" not in rows:
        return
    rec = {}
    for name in ("qat_convert", "finetune_ptq"):
        if name in rows:
            rec[name] = {
                c: round((rows["ptq_rtn"][c] - rows[name][c])
                         / (rows["ptq_rtn"][c] - rows["fp32"][c]), 3)
                for c in CORPORA
            }
    result["recovery_of_ptq_degradation"] = rec


if __name__ == "__main__":
    main()
