"""Convergence of the low-bit AdamW optimizers on real text, against fp32 torch.optim.AdamW.

A Llama-style model (lowbit.models.llama) learns byte-level language modelling (vocab 256,
one token per UTF-8 byte: no tokenizer to install) on the Wikipedia training split of
lowbit.eval.corpora and is scored on fixed windows of the held-out split. Every optimizer
starts from the same weights and sees the same batches in the same order (one seed); the
only difference is the optimizer. Writes results/converge_optim.json and a PNG of the loss
curves (matplotlib when installed, else a plain raster written here).

CPU (~0.9M params): nice -n 10 python benchmarks/converge_optim.py --batch 8 --steps 200 \
                        --eval-every 50 --eval-windows 32   (or one process per --optimizers
                        entry, then --optimizers "" --merge a.json,b.json,... to combine)
GPU (~100M params):        python benchmarks/converge_optim.py --device cuda --preset small \
                               --ffn 3072 --steps 1000 --batch 16 --seq 512 --lr 6e-4
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, conditions, write_result  # noqa: E402

from lowbit.eval.corpora import byte_tokens, load_text, random_windows  # noqa: E402
from lowbit.models.llama import ModelArgs, Transformer, init_weights  # noqa: E402
from lowbit.optim import AdamW4bit, AdamW8bit, AdamWFp8, state_storage_bytes  # noqa: E402

OPTIMIZERS = {
    "adamw-fp32": lambda params, **kw: torch.optim.AdamW(params, **kw),
    "adamw8bit": AdamW8bit,
    "adamw4bit": AdamW4bit,
    "adamwfp8": AdamWFp8,
}
# Issue 8's bar: final held-out loss within 1% (8-bit, fp8) and 2% (4-bit) of fp32 AdamW.
TOLERANCE = {"adamw8bit": 0.01, "adamwfp8": 0.01, "adamw4bit": 0.02}
COLORS = {
    "adamw-fp32": (0, 0, 0), "adamw8bit": (31, 119, 180), "adamw4bit": (214, 39, 40),
    "adamwfp8": (44, 160, 44),
}


def make_model(args: argparse.Namespace) -> Transformer:
    overrides = dict(vocab_size=256, max_seq_len=args.seq)
    for key, name in (("dim", "dim"), ("layers", "n_layers"), ("heads", "n_heads"),
                      ("kv_heads", "n_kv_heads"), ("ffn", "ffn_hidden")):
        if getattr(args, key) is not None:
            overrides[name] = getattr(args, key)
    model = Transformer(ModelArgs.from_name(args.preset, **overrides))
    init_weights(model, seed=args.seed)
    return model.to(args.device)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, args.steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * frac))


def loss_of(model, tokens: torch.Tensor, device: str) -> torch.Tensor:
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    total = sum(
        loss_of(model, windows[i : i + args.batch].to(args.device), args.device).item()
        * len(windows[i : i + args.batch])
        for i in range(0, len(windows), args.batch)
    )
    model.train()
    return total / len(windows)


def run(name: str, train: torch.Tensor, windows: torch.Tensor, args) -> dict:
    model = make_model(args)
    opt = OPTIMIZERS[name](model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args))
    gen = torch.Generator().manual_seed(args.seed)  # same batches for every optimizer
    curve, evals = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = random_windows(train, args.batch, args.seq, gen).to(args.device)
        loss = loss_of(model, batch, args.device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        curve.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evals.append((step + 1, heldout_loss(model, windows, args)))
            print(f"{name:11s} step {step + 1:5d} train {curve[-1]:.4f} "
                  f"held-out {evals[-1][1]:.4f}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "final_heldout_loss": evals[-1][1],
        "heldout": evals,
        "train_curve": curve,
        "seconds": time.perf_counter() - start,
        "state_bytes_per_param": state_storage_bytes(opt) / n_params,
        "n_params": n_params,
    }


def smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot(results: dict, path: Path, width: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_raster_png(results, path, width)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        color = [c / 255 for c in COLORS[name]]
        train = smooth(r["train_curve"], width)
        ax.plot(range(1, len(train) + 1), train, label=f"{name} train", lw=1, color=color)
        steps, vals = zip(*r["heldout"])
        ax.plot(steps, vals, "o--", color=color, ms=3, label=f"{name} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.legend()
    fig.savefig(path, dpi=120)


def write_raster_png(results: dict, path: Path, width: int, w: int = 800, h: int = 500) -> None:
    """Smoothed train curves as coloured lines on white, inside a grey frame with 4 grid lines;
    no text (the colours are listed in the JSON and on stdout). Written with zlib only."""
    img = [[(255, 255, 255)] * w for _ in range(h)]
    curves = {n: smooth(r["train_curve"], width) for n, r in results.items()}
    skip = max(1, len(next(iter(curves.values()))) // 20)  # the first 5% is off the scale
    lo = min(min(c[skip:]) for c in curves.values())
    hi = max(max(c[skip:]) for c in curves.values())
    pad = 20

    def xy(i: int, n: int, v: float) -> tuple[int, int]:
        x = pad + (w - 2 * pad - 1) * i / max(1, n - 1)
        y = pad + (h - 2 * pad - 1) * (hi - min(max(v, lo), hi)) / max(hi - lo, 1e-9)
        return int(x), int(y)

    for k in range(5):
        y = pad + (h - 2 * pad - 1) * k // 4
        for x in range(pad, w - pad):
            img[y][x] = (200, 200, 200)
    for y in range(pad, h - pad):
        img[y][pad] = img[y][w - pad - 1] = (200, 200, 200)
    for name, c in curves.items():
        pts = [xy(i, len(c), v) for i, v in enumerate(c)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for s in range(steps + 1):
                img[y0 + (y1 - y0) * s // steps][x0 + (x1 - x0) * s // steps] = COLORS[name]
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=100)
    ap.add_argument("--eval-windows", dest="eval_windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--name", default="converge_optim")
    ap.add_argument("--merge", default="", help="result JSONs of runs to include (same args)")
    # One thread: on a shared 2-core machine a second thread costs more than it brings.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset == "tiny" and args.dim is None:  # the CPU default: ~1M parameters
        args.dim, args.layers, args.ffn = 128, 4, 384
    train = byte_tokens(load_text("wiki", "train"))
    held = byte_tokens(load_text("wiki", "heldout"))
    # Fixed, evenly spaced held-out windows (no randomness).
    stride = (len(held) - args.seq - 1) // args.eval_windows
    windows = torch.stack(
        [held[i * stride : i * stride + args.seq + 1] for i in range(args.eval_windows)]
    )
    results = {}
    for path in filter(None, args.merge.split(",")):  # runs made by parallel processes
        results.update(json.loads(Path(path).read_text())["runs"])
    for name in filter(None, args.optimizers.split(",")):
        results[name] = run(name, train, windows, args)
    base = results.get("adamw-fp32")
    summary = {}
    for name, r in results.items():
        row = {"final_heldout_loss": r["final_heldout_loss"],
               "state_bytes_per_param": r["state_bytes_per_param"], "seconds": r["seconds"]}
        if base is not None and name in TOLERANCE:
            rel = r["final_heldout_loss"] / base["final_heldout_loss"] - 1
            row.update(rel_to_fp32=rel, tolerance=TOLERANCE[name], within=rel <= TOLERANCE[name])
        summary[name] = row
        print(name, row)
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png, width=max(1, args.steps // 50))
    write_result(args.name, {
        "conditions": conditions(), "args": vars(args), "corpus": "wiki (byte-level)",
        "summary": summary, "colors": COLORS, "runs": results, "plot": png.name,
    })
    print("wrote", RESULTS / f"{args.name}.json", png)


if __name__ == "__main__":
    main()
