"""End-to-end decode: a Llama-style model at Llama-3-8B dimensions, static KV cache, the decode
step compiled (fullgraph) and captured in a CUDA graph by GraphedDecodeStep (or, with
--graphs trees, by torch.compile mode="reduce-overhead"), random weights. bf16, lowbit configs
and torchao 0.18's same configs, in one process.

Before timing, each quantized model's logits are compared with the bf16 model's on the
same prompt (a sanity check: a broken kernel shows as a collapse of the SQNR).
Writes results/decode.json. `--profile` also records 20 more decode steps under
torch.profiler: a kernel table per config (results/decode_profile_<config>_b<batch>.txt) and
the row's `gpu_kernel_ms_per_step`, and the host time to issue a step (`host_ms_per_step`, with
a cProfile table in results/decode_host_<config>_b<batch>.txt): set against `ms_per_step`, they
say whether a step waits on the GPU or on the host.

    python benchmarks/bench_decode.py --layers 32 --batches 1,8 --new 256
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, conditions, model_bytes, torchao_configs, write_result  # noqa: E402

from lowbit.kernels.triton import pdl  # noqa: E402
from lowbit.models import (  # noqa: E402
    GraphedDecodeStep,
    ModelArgs,
    Transformer,
    decode_one_token,
    fuse_projections_,
    init_weights,
    llama,
)
from lowbit.models.llama import RMSNorm, TransformerBlock  # noqa: E402
from lowbit.quantize import preset, quantize_  # noqa: E402
from lowbit.sparsity import Sparse24, sparsify_  # noqa: E402

CONFIGS = ["int8", "int4-g128", "int4-g64", "fp8", "fp8-dynamic", "int8-dynamic"]
# 2:4 by magnitude (random weights: the speed, not the accuracy, is measured here), kept values
# in bf16 or int4 g128; pass them with --configs.
SPARSE = {"sparse24": Sparse24(), "sparse24-int4": Sparse24(bits=4, group_size=128)}


def build_bf16(layers: int, max_seq: int) -> Transformer:
    args = ModelArgs.from_name("llama3-8b", n_layers=layers, max_seq_len=max_seq)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    init_weights(model, seed=0)
    return model.eval()


def _sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    noise = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(a.double().pow(2).mean().item() / noise)


def _profile_steps(step, model: Transformer, token: torch.Tensor, pos: torch.Tensor, name: str,
                   steps: int = 20) -> float:
    """GPU kernel time per decode step (ms) over `steps` steps; writes the kernel table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step(model, token, pos).clone()
            pos = pos + 1
        torch.cuda.synchronize()
    events = prof.key_averages()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"decode_profile_{name}.txt").write_text(
        events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / steps / 1000


def _host_steps(step, model: Transformer, token: torch.Tensor, pos: torch.Tensor, name: str,
                steps: int = 30) -> float:
    """Host time per decode step (ms): the CPU time to issue `steps` steps, the GPU left to run
    behind. Next to ms_per_step it says whether the host is the bound. Also writes a cProfile
    table of a second such run (results/decode_host_<config>.txt)."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        token = step(model, token, pos).clone()
        pos = pos + 1
    host_ms = (time.perf_counter() - t) * 1000 / steps
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        token = step(model, token, pos).clone()
        pos = pos + 1
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    (RESULTS / f"decode_host_{name}.txt").write_text(text.getvalue())
    return host_ms


@contextlib.contextmanager
def compiled_blocks(model: Transformer):
    """Compile the transformer block, not the whole step: one graph serves all blocks (their
    weights are its inputs), so compiling takes seconds instead of most of a minute. What runs
    around the blocks is compiled too, in three small graphs (embedding, RoPE tables and mask;
    the final norm; sampling), so no eager kernel is left in the step, as in a whole-step
    compile (eagerly, the argmax over the vocabulary alone took 36 us a step on the H200).
    Everything gets its plain code back on exit (the model is deep-copied for the next
    config)."""
    block = torch.compile(TransformerBlock.forward, fullgraph=True)
    for layer in model.layers:
        layer.forward = functools.partial(block, layer)
    model.prepare = functools.partial(torch.compile(Transformer.prepare, fullgraph=True), model)
    model.norm.forward = functools.partial(torch.compile(RMSNorm.forward, fullgraph=True),
                                           model.norm)
    plain_sample = llama.sample
    llama.sample = torch.compile(plain_sample, fullgraph=True)  # decode_one_token calls it
    try:
        yield
    finally:
        llama.sample = plain_sample
        del model.prepare, model.norm.forward
        for layer in model.layers:
            del layer.forward


def decode_step(model: Transformer, batch: int, args: argparse.Namespace):
    """The step to time: compiled whole (or per block) and captured by GraphedDecodeStep, or
    compiled with mode="reduce-overhead" (`--graphs trees`)."""
    if args.graphs == "trees":
        return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    fn = decode_one_token if args.compile == "blocks" else torch.compile(decode_one_token,
                                                                          fullgraph=True)
    return GraphedDecodeStep(model, batch, fn)


@torch.no_grad()
def run_decode(model: Transformer, batch: int, args: argparse.Namespace,
               profile_name: str | None = None, other_bytes: int = 0) -> dict:
    """One timed decode run. `other_bytes`: GPU memory held by other models (the bf16 source
    kept for the next config), left out of the reported peak."""
    prompt_len, new, skip_guards = args.prompt, args.new, args.skip_guards
    torch.manual_seed(1)
    prompt = torch.randint(0, model.args.vocab_size, (batch, prompt_len), device="cuda")
    model.setup_caches(batch, prompt_len + new, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    input_pos = torch.arange(prompt_len, device="cuda")

    def prefill() -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed caches (the same buffers, so a captured graph stays valid), then the prompt:
        the first token and position of a decode run."""
        model.reset_caches()
        return model(prompt, input_pos)[:, -1:].argmax(-1), input_pos[-1:] + 1

    t0 = time.perf_counter()
    step = decode_step(model, batch, args)
    token, pos = prefill()
    for _ in range(3):  # compile + graph capture, outside the timing
        step(model, token, pos).clone()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    token, pos = prefill()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
        start.record()
        for _ in range(new - 1):
            token = step(model, token, pos).clone()
            pos = pos + 1
        end.record()
        end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    row = {
        "batch": batch,
        "tokens_per_s": (new - 1) / seconds,
        "tokens_per_s_total": batch * (new - 1) / seconds,
        "ms_per_step": seconds * 1000 / (new - 1),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() - other_bytes) / 2**30,
        "compile_s": compile_s,
    }
    if profile_name is not None:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
            # Each from a fresh prefill, so the steps stay inside the cache.
            row["gpu_kernel_ms_per_step"] = _profile_steps(step, model, *prefill(), profile_name)
            row["host_ms_per_step"] = _host_steps(step, model, *prefill(), profile_name)
            row["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
    return row


@torch.no_grad()
def logits_check(model: Transformer, base_logits: torch.Tensor, prompt: torch.Tensor) -> float:
    return _sqnr(base_logits, model(prompt).float())


def mark_static_weights(model: torch.nn.Module) -> None:
    """Tell cudagraphs the inner tensors of quantized weights never move (like parameters),
    so a replay does not copy them into its own buffers."""
    for p in model.parameters():
        inner = p.data if isinstance(p, torch.nn.Parameter) else p
        if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
            for field in inner.__tensor_flatten__()[0]:
                torch._dynamo.mark_static_address(getattr(inner, field), guard=False)


def quantized_copy(base: Transformer, name: str, use_torchao: bool):
    static = name.endswith("+static")
    name = name.removesuffix("+static")
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_torchao:
            from torchao.quantization import quantize_ as ao_quantize_

            ao_quantize_(model, torchao_configs()[name])
        else:
            config = SPARSE[name] if name in SPARSE else preset(name)
            apply = sparsify_ if name in SPARSE else quantize_
            summary = apply(model, config, show_progress=False)
            if summary.skipped:
                print(f"  skipped: {summary.skipped}")
    if static:
        mark_static_weights(model)
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="lowbit configs (the bf16 baseline always runs)")
    p.add_argument("--torchao", default=",".join(CONFIGS), help="'' to skip torchao")
    p.add_argument("--out", default="decode")
    p.add_argument("--profile", action="store_true", help="kernel tables and GPU busy time")
    p.add_argument("--skip-guards", action="store_true",
                   help="time under torch.compiler.set_stance(skip_guard_eval_unsafe=True), the "
                        "serving setting that skips dynamo's guard checks once warmed up")
    p.add_argument("--graphs", choices=("trees", "manual"), default="manual",
                   help="trees: torch.compile mode='reduce-overhead'; manual: the compiled step "
                        "captured once by lowbit.models.GraphedDecodeStep (no per-call guards)")
    p.add_argument("--compile", choices=("step", "blocks"), default="step",
                   help="step: the whole decode step is one graph; blocks: one graph for the "
                        "transformer block, reused by every layer (much faster to compile; "
                        "needs --graphs manual)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="fuse wq/wk/wv and w1/w3 (lowbit.models.fuse_projections_) in the bf16 "
                        "model that every row, torchao's included, starts from")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch every kernel without programmatic dependent launch: lowbit's "
                        "Triton kernels (LOWBIT_PDL=0) and inductor's (its default)")
    args = p.parse_args()
    if args.no_pdl:
        os.environ["LOWBIT_PDL"] = "0"
    else:  # every config, bf16 included, gets inductor's PDL kernels
        inductor_config.triton.enable_pdl = True
    if args.compile == "blocks" and args.graphs != "manual":
        p.error("--compile blocks needs --graphs manual")
    if args.profile:
        torch._logging.set_logs(perf_hints=True)  # says why a graph is not CUDA-graphed
    batches = [int(b) for b in args.batches.split(",")]
    base = build_bf16(args.layers, args.prompt + args.new)
    if args.fuse_projections:
        fuse_projections_(base)
    torch.manual_seed(2)
    check_prompt = torch.randint(0, base.args.vocab_size, (1, 64), device="cuda")
    with torch.no_grad():
        base_logits = base(check_prompt).float()
    ao = torchao_configs()
    plan = [("bf16", None, False)]
    plan += [(n, n, False) for n in args.configs.split(",") if n and n != "bf16"]  # bf16: above
    plan += [(f"torchao:{n}", n, True) for n in args.torchao.split(",")
             if n and n.removesuffix("+static") in ao]
    rows = []
    for label, name, use_ao in plan:
        try:
            other_bytes = 0 if name is None else torch.cuda.memory_allocated()
            model = base if name is None else quantized_copy(base, name, use_ao)
            sq = logits_check(model, base_logits, check_prompt)
            weight_gib = model_bytes(model) / 2**30
            for batch in batches:
                profile = f"{label.replace(':', '-')}_b{batch}" if args.profile else None
                blocks = args.compile == "blocks"
                with compiled_blocks(model) if blocks else contextlib.nullcontext():
                    r = run_decode(model, batch, args, profile, other_bytes)
                r.update(config=label, logits_sqnr_vs_bf16_db=sq, weights_gib=weight_gib)
                rows.append(r)
                print(f"{label:<22} B={batch:<3} {r['tokens_per_s']:8.1f} tok/s  "
                      f"{r['ms_per_step']:6.2f} ms/step  peak {r['peak_mem_gib']:5.1f} GiB  "
                      f"logits sqnr {sq:5.1f} dB  compile {r['compile_s']:.0f}s", flush=True)
        except Exception as e:
            rows.append({"config": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{label}: ERROR {rows[-1]['error']}", flush=True)
        finally:
            if name is not None:
                model = None
                gc.collect()
                torch.cuda.empty_cache()
        _save(args, rows)  # after every config, so a run cut short keeps its numbers
    print(f"wrote {_save(args, rows)}")


def _save(args: argparse.Namespace, rows: list[dict]) -> Path:
    for r in rows:
        base_row = next((b for b in rows if b.get("config") == "bf16"
                         and b.get("batch") == r.get("batch")), None)
        if base_row and "tokens_per_s" in r:
            r["speedup_vs_bf16"] = r["tokens_per_s"] / base_row["tokens_per_s"]
    compiled = ("reduce-overhead, fullgraph" if args.graphs == "trees"
                else "fullgraph (the step), captured by GraphedDecodeStep" if args.compile == "step"
                else "fullgraph (blocks; embedding + RoPE tables, final norm and sampling "
                     "compiled apart), captured by GraphedDecodeStep")
    cond = conditions() | {"layers": args.layers, "prompt": args.prompt, "new_tokens": args.new,
                           "model": "llama3-8b dims", "compile": compiled,
                           "skip_guard_eval_unsafe": args.skip_guards,
                           "fused_projections": args.fuse_projections,
                           "programmatic_dependent_launch": {
                               "lowbit_kernels": pdl.requested(),
                               "inductor_kernels": bool(inductor_config.triton.enable_pdl)},
                           "peak_mem": "this model's weights, KV cache and activations; the bf16 "
                                       "source model kept for the next config is subtracted"}
    return write_result(args.out, {"conditions": cond, "rows": rows})


if __name__ == "__main__":
    main()
