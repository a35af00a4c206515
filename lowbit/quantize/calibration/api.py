"""One calibration API: wrapper configs, and the driver that runs them block by block.

    quantize_(model, GPTQ(Int4WeightOnly(group_size=64)), calibration=batches)
    quantize_(model, AWQ(Int4WeightOnly(64)), calibration=batches)
    quantize_(model, SmoothQuant(Int8DynamicActivationInt8Weight(), alpha=0.5), calibration=b)
    quantize_(model, HQQ(Int4WeightOnly(64, zero="float")))        # no data needed

A wrapper names an algorithm and the format it writes (`base`); the result is exactly the
base config's lowbit tensor, so kernels and checkpoints are unchanged.

The driver keeps memory bounded by the size of one block's activations: it records the
inputs of the first repeated block (the largest `nn.ModuleList` of quantized linears, such as
a decoder's layers) for every calibration batch, then for each block in turn collects the
statistics of its linears' inputs, chooses scales/folds/weights, quantizes the block and runs
it again to produce the next block's inputs (so later blocks see the errors of earlier ones).
Linears outside the blocks (an lm_head) are handled last in one pass of the whole model, in
which the blocks replay their recorded outputs. A model without such blocks is one stage.

AWQ and SmoothQuant fold their scales into the op that produces a linear's input, found by
experiment (`smoothquant.find_scale_groups`); a linear without one (o_proj behind attention,
a weight tied to an embedding) is left unscaled and its summary line says so. A linear the
data never reaches gets round-to-nearest, named in the summary and in a warning. All or
nothing, as `quantize_`: if anything fails, every replaced parameter is put back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.formats import AffineSpec, Granularity, PerAxis, PerGroup, pack_bits
from lowbit.progress import progress
from lowbit.quantize.api import QuantizeSummary, _follow_ties, _why_not
from lowbit.quantize.calibration import awq, gptq, smoothquant
from lowbit.quantize.configs import (
    ConfigError,
    Int4WeightOnly,
    Int8DynamicActivationInt4Weight,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    IntxWeightOnly,
    QuantConfig,
)
from lowbit.quantize.handlers import quantize_weight
from lowbit.tensors import IntWeight, LowbitTensor, UnsupportedWeight, check_weight

# Fewer tokens than this cannot estimate even the per-channel statistics.
MIN_CALIBRATION_TOKENS = 128


# ---- the integer format a base config writes ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class IntTarget:
    """A base config's integer weight format as numbers (spec, scale granularity along K,
    activation mode), so an algorithm can choose codes and still produce the `IntWeight`
    the base config's handler would: same layout, kernels and checkpoints."""

    spec: AffineSpec
    granularity: Granularity
    act_quant: str = "none"

    @property
    def signed_int8(self) -> bool:
        return self.spec.bits == 8 and self.spec.symmetric

    def group_size(self, k: int) -> int:
        """Columns that share one scale: g for PerGroup(g), all of K per channel."""
        return self.granularity.group_size if isinstance(self.granularity, PerGroup) else k

    def check(self, w: torch.Tensor) -> None:
        """Refuse what `IntWeight.from_float` refuses (UnsupportedWeight: the layer is
        skipped; ValueError for NaN/Inf)."""
        block = self.granularity.block_size(tuple(w.shape)) if w.dim() == 2 else None
        check_weight(w, block)
        if not self.signed_int8 and (w.shape[1] * self.spec.bits) % 8:
            raise UnsupportedWeight(f"in_features {w.shape[1]} cannot be packed at "
                                    f"{self.spec.bits} bits")

    def pack(self, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor | None) -> IntWeight:
        """The IntWeight of `w` [N, K] with codes [N, K] and params [N, K / g] chosen by an
        algorithm; packed exactly as `IntWeight.from_float` packs."""
        if self.signed_int8:
            qdata = codes.to(torch.int8)
        else:
            qdata = pack_bits((codes - self.spec.qmin).to(torch.uint8), self.spec.bits)
        return IntWeight(
            shape=w.shape, dtype=w.dtype, qdata=qdata, scale=scale.to(w.dtype),
            zero=None if zero is None else zero.to(w.dtype), bits=self.spec.bits,
            act_quant=self.act_quant, transposed=False,
        )


def int_target(config: QuantConfig) -> IntTarget | None:
    """The integer format `config` writes, or None for other formats (fp8, ...)."""
    if isinstance(config, Int4WeightOnly):
        return IntTarget(AffineSpec(4, "asymmetric", config.zero), PerGroup(config.group_size))
    if isinstance(config, IntxWeightOnly):
        return IntTarget(AffineSpec(config.bits, config.mapping, config.zero), config.granularity)
    if isinstance(config, Int8WeightOnly):
        return IntTarget(AffineSpec(8), config.granularity)
    if isinstance(config, Int8DynamicActivationInt8Weight):
        return IntTarget(AffineSpec(8), PerAxis(0), "int8_per_token")
    if isinstance(config, Int8DynamicActivationInt4Weight):
        return IntTarget(AffineSpec(4), PerGroup(config.group_size), "int8_per_token_asym")
    return None


def _row_group_target(name: str, base: QuantConfig) -> IntTarget:
    target = int_target(base)
    if target is None:
        raise ConfigError(f"{name} writes integer weights; {base!r} is not an integer config")
    if not (isinstance(target.granularity, PerGroup) or target.granularity == PerAxis(0)):
        raise ConfigError(f"{name} needs per-group or per-row scales, not {target.granularity}")
    return target


# ---- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibratedConfig(QuantConfig):
    """An algorithm that chooses `base`'s weights from calibration data."""

    # Whether the algorithm needs H = X^T X of each linear's inputs (else only channel stats).
    needs_hessian: ClassVar[bool] = True
    base: QuantConfig

    def __post_init__(self) -> None:
        if type(self) is CalibratedConfig:
            raise ConfigError("CalibratedConfig is a base class; use GPTQ, AWQ or SmoothQuant")
        if not isinstance(self.base, QuantConfig) or isinstance(self.base, (CalibratedConfig,
                                                                            HQQ)):
            raise ConfigError(
                f"{type(self).__name__} wraps a plain config such as Int4WeightOnly(64), "
                f"got {self.base!r}"
            )

    @property
    def dynamic_activations(self) -> bool:  # type: ignore[override]
        return self.base.dynamic_activations


@dataclasses.dataclass(frozen=True)
class GPTQ(CalibratedConfig):
    """GPTQ: error-compensating column-by-column rounding (`damp`: fraction of the mean
    Hessian diagonal added for stability; `act_order`: most active inputs first; `clip`:
    output-aware range shrinking of each group, which helps most at 3 bits)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _row_group_target("GPTQ", self.base)
        if not self.damp > 0 or self.block_size <= 0:
            raise ConfigError(f"GPTQ needs damp > 0 and block_size > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class AWQ(CalibratedConfig):
    """AWQ: activation-aware channel scales (alpha from a `grid`) folded into the previous op,
    then per-group range clipping (`clip`), for integer weight-only configs."""

    grid: int = 20
    clip: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        target = _row_group_target("AWQ", self.base)
        if target.act_quant != "none":
            raise ConfigError(f"AWQ is for weight-only configs; {self.base!r} also quantizes "
                              "activations (use SmoothQuant or GPTQ)")
        if self.grid < 1:
            raise ConfigError(f"AWQ grid must be at least 1, got {self.grid}")


@dataclasses.dataclass(frozen=True)
class SmoothQuant(CalibratedConfig):
    """SmoothQuant: move activation outliers into the weights with per-channel scales
    max|x|^alpha / max|w|^(1 - alpha), for configs that quantize activations."""

    needs_hessian: ClassVar[bool] = False
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base.dynamic_activations:
            raise ConfigError(f"SmoothQuant is for configs that quantize activations; "
                              f"{self.base!r} is weight-only (use AWQ or GPTQ)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class HQQ(QuantConfig):
    """HQQ: calibration-free fit of float zero points to an l_p error (`lp_norm`), solved by
    half-quadratic splitting from the integer-zero grid; `beta` (in quantization steps) grows
    by `kappa` per step."""

    base: QuantConfig
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 1.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        target = _row_group_target("HQQ", self.base)
        if target.spec.symmetric or target.spec.zero != "float":
            raise ConfigError("HQQ optimizes a float zero point: use an asymmetric base config "
                              "with zero='float' (an integer zero cannot move by less than "
                              "a step)")
        if self.iters < 1 or not 0 < self.lp_norm <= 1 or self.beta <= 0 or self.kappa < 1:
            raise ConfigError(f"HQQ needs iters >= 1, 0 < lp_norm <= 1, beta > 0, kappa >= 1: "
                              f"{self}")


# ---- input statistics ------------------------------------------------------------------------


class InputStats:
    """What the algorithms need to know about one linear's calibration inputs."""

    def __init__(self, k: int, device: torch.device, hessian: bool) -> None:
        self.tokens = 0
        self.abs_sum = torch.zeros(k, device=device)
        self.abs_max = torch.zeros(k, device=device)
        self.hessian = torch.zeros(k, k, device=device) if hessian else None

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class _Collector:
    """Forward pre-hooks that accumulate InputStats; linears reading the same tensor share
    the work of computing X^T X."""

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool, stop_when_seen: bool):
        self.stats = {
            f: InputStats(m.in_features, m.weight.device, hessian) for f, m in linears.items()
        }
        self._hessian = hessian
        self._stop_when_seen = stop_when_seen
        self._seen: set[str] = set()
        self._cache: dict[int, tuple] = {}
        self._handles = [
            m.register_forward_pre_hook(self._hook(f), with_kwargs=True)
            for f, m in linears.items()
        ]

    def new_batch(self) -> None:
        self._seen.clear()
        self._cache.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, fqn: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            if id(x) not in self._cache:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                mag = x2.abs()
                xtx = x2.T @ x2 if self._hessian else None
                self._cache[id(x)] = (x, x2.shape[0], mag.sum(0), mag.amax(0), xtx)
            _, rows, abs_sum, abs_max, xtx = self._cache[id(x)]
            st = self.stats[fqn]
            st.tokens += rows
            st.abs_sum += abs_sum
            torch.maximum(st.abs_max, abs_max, out=st.abs_max)
            if xtx is not None:
                st.hessian += xtx
            self._seen.add(fqn)
            if self._stop_when_seen and len(self._seen) == len(self.stats):
                raise _Stop

        return hook


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


# ---- stages: what runs over the calibration batches ------------------------------------------


def _first(out: Any) -> torch.Tensor:
    """The main tensor of a module's output (tensor, tuple, or a dict-like model output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if isinstance(out, dict):
        return _first(next(v for v in out.values() if v is not None))
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


@dataclasses.dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]

    def run(self, fn: Callable) -> Any:
        return fn(*self.args, **self.kwargs)

    def with_hidden(self, hidden: torch.Tensor) -> _Call:
        """The same call with its first positional argument (or hidden_states) replaced."""
        if self.args:
            return _Call((hidden, *self.args[1:]), self.kwargs)
        return _Call((), {**self.kwargs, "hidden_states": hidden})

    @property
    def hidden(self) -> torch.Tensor | None:
        return self.args[0] if self.args else self.kwargs.get("hidden_states")


@dataclasses.dataclass
class _Stage:
    """One block over its recorded inputs, or the whole model over the batches (`cursor`
    tells the replayed blocks which batch runs)."""

    root: nn.Module
    calls: list[_Call]
    cursor: list[int] | None = None

    def run(self, i: int) -> Any:
        if self.cursor is not None:
            self.cursor[0] = i
        try:
            return self.calls[i].run(self.root)
        except _Stop:
            return None


class _Replay(nn.Module):
    """Stands in for a block in the final pass: returns the recorded last-block output
    and answers attribute lookups (a layer type, an index) as the block would."""

    def __init__(self, block: nn.Module, outputs: list[Any], cursor: list[int]) -> None:
        super().__init__()
        # Kept in plain containers so they do not register as submodules.
        self._refs = (block, outputs, cursor)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _, outputs, cursor = self._refs
        return outputs[cursor[0]]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_refs":
                raise
            return getattr(self._refs[0], name)


def _model_calls(model: nn.Module, batches: list[Any]) -> list[_Call]:
    device = next(model.parameters()).device
    try:
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts_cache = False

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    calls = []
    for b in batches:
        if isinstance(b, dict):
            call = _Call((), {k: move(v) for k, v in b.items()})
        elif isinstance(b, (tuple, list)):
            call = _Call(tuple(move(v) for v in b), {})
        else:
            call = _Call((move(b),), {})
        if accepts_cache:
            call.kwargs.setdefault("use_cache", False)
        calls.append(call)
    return calls


def _find_blocks(model: nn.Module, linear_ids: set[int]) -> nn.ModuleList | None:
    """The ModuleList holding the most linears to quantize (the shallowest on ties)."""
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            count = sum(id(m) in linear_ids for m in module.modules())
            if count > best_count:
                best, best_count = module, count
    return best


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _blocks_chain(model, blocks, call: _Call) -> bool:
    """Whether, on one batch, block i + 1 reads block i's output and every block gets the
    same other arguments: then each block can be run alone on recorded inputs."""
    calls: list[_Call] = []
    outputs: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        calls.append(_Call(args, kwargs))

    def post(module, args, kwargs, out):
        outputs.append(_first(out))
        if len(outputs) == len(blocks):
            raise _Stop

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                           b.register_forward_hook(post, with_kwargs=True))]
    try:
        call.run(model)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(blocks) or calls[0].hidden is None:
        return False
    for prev_out, c in zip(outputs, calls[1:]):
        rest, first_rest = c.with_hidden(prev_out), calls[0].with_hidden(prev_out)
        if c.hidden is not prev_out or not _same(rest.args, first_rest.args) or not _same(
            rest.kwargs, first_rest.kwargs
        ):
            return False
    return True


def _first_block_calls(model, blocks, calls: list[_Call]) -> list[_Call]:
    """The call that block 0 receives for every batch (the model stops right there)."""
    got: list[_Call] = []

    def grab(module, args, kwargs):
        got.append(_Call(args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for c in calls:
            try:
                c.run(model)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(got) != len(calls):
        raise ValueError(f"only {len(got)} of {len(calls)} calibration batches reached the "
                         "first block")
    return got


# ---- the driver ----------------------------------------------------------------------------


def needs_calibration(plan: list[tuple[str, nn.Module, QuantConfig]]) -> bool:
    return any(isinstance(cfg, CalibratedConfig) for _, _, cfg in plan)


@dataclasses.dataclass
class _Run:
    """Bookkeeping of one calibration run: what changed (to undo) and what was done."""

    summary: QuantizeSummary
    frozen: set[int]
    originals: smoothquant.Originals = dataclasses.field(default_factory=list)
    new_weights: dict[int, nn.Parameter] = dataclasses.field(default_factory=dict)
    assigned: list[tuple[nn.Module, torch.Tensor]] = dataclasses.field(default_factory=list)
    unreached: list[str] = dataclasses.field(default_factory=list)
    # The previous block's fold groups, to verify before searching the next block.
    fold_hint: list[tuple[str, tuple[str, ...]]] | None = None


def calibrate(
    model: nn.Module,
    plan: list[tuple[str, nn.Module, QuantConfig]],
    calibration: Iterable | None,
    show_progress: bool = True,
) -> QuantizeSummary:
    """Run a `quantize_` plan that contains calibrated configs; see the module docstring.

    All or nothing: if anything fails, every weight and folded parameter is put back."""
    if not needs_calibration(plan):
        raise ValueError(
            "calibration data was given, but no selected config uses it (HQQ and plain "
            "configs need none); drop calibration= or wrap the config in GPTQ/AWQ/SmoothQuant"
        )
    names = sorted({type(c).__name__ for _, _, c in plan if isinstance(c, CalibratedConfig)})
    if calibration is None:
        raise ValueError(f"{'/'.join(names)} chooses weights from calibration data: call "
                         "quantize_(model, config, calibration=batches) with token batches "
                         "from a training split")
    calls = _model_calls(model, list(calibration))
    tokens = sum(_tokens(c) for c in calls)
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ValueError(f"the calibration data has {tokens} tokens; {'/'.join(names)} needs "
                         f"at least {MIN_CALIBRATION_TOKENS} (thousands recommended)")
    run = _Run(QuantizeSummary(), _shared_params(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _calibrate_stages(model, plan, calls, run, show_progress)
            ties: list[tuple[nn.Module, torch.Tensor]] = list(run.assigned)
            _follow_ties(model, run.new_weights, ties, run.summary)
            for module, weight in ties[len(run.assigned):]:
                _assign(module, "weight", run.new_weights[id(weight)], run)
    except BaseException:
        smoothquant.restore(run.originals)
        raise
    finally:
        model.train(was_training)
    _warn(run)
    return run.summary


def _tokens(call: _Call) -> int:
    """Tokens in one batch: its first tensor is token ids [B, T] or embeddings [B, T, D]."""
    values = [*call.args, *call.kwargs.values()]
    t = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if t is None:
        return 0
    return t.numel() if not t.is_floating_point() else t.shape[:-1].numel()


def _shared_params(model: nn.Module) -> set[int]:
    """Ids of parameters used by more than one module (tied weights): never rescaled."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {i for i, n in owners.items() if n > 1}


def _assign(module: nn.Module, name: str, value: nn.Parameter, run: _Run) -> None:
    run.originals.append((module, name, getattr(module, name)))
    setattr(module, name, value)


def _calibrate_stages(model, plan, calls, run: _Run, show_progress: bool) -> None:
    blocks = _find_blocks(model, {id(m) for _, m, _ in plan if isinstance(m, nn.Linear)})
    if blocks is None or not _blocks_chain(model, blocks, calls[0]):
        # No chain of blocks to walk: the whole model is one stage.
        _calibrate_stage(_Stage(model, calls), plan, run, stop_early=False)
        return
    first = _first_block_calls(model, blocks, calls)
    hidden = [c.hidden for c in first]
    outputs: list[Any] = []
    for block in progress(blocks, "calibrate", len(blocks), show_progress):
        stage = _Stage(block, [c.with_hidden(h) for c, h in zip(first, hidden)])
        inside = {id(m) for m in block.modules()}
        _calibrate_stage(stage, [p for p in plan if id(p[1]) in inside], run, stop_early=False)
        with _decoded_weights(block):
            outputs = [stage.run(i) for i in range(len(calls))]
        hidden = [_first(o) for o in outputs]
    inside = {id(m) for m in blocks.modules()}
    tail = [p for p in plan if id(p[1]) not in inside]
    if tail:
        _calibrate_tail(model, blocks, outputs, calls, tail, run)


@contextlib.contextmanager
def _decoded_weights(root: nn.Module) -> Iterator[None]:
    """Weight-only lowbit weights swapped for their decoded values while `root` runs: the
    same numbers (the reference kernels decode and call F.linear), decoded once instead of
    once per batch. Weights that also quantize activations stay as they are."""
    swapped = []
    for module in root.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, LowbitTensor) and getattr(w, "act_quant", None) == "none":
            swapped.append((module, w))
            module.weight = nn.Parameter(w.dequantize(), requires_grad=False)
    try:
        yield
    finally:
        for module, w in swapped:
            module.weight = w


def _calibrate_tail(model, blocks, last_outputs, calls, members, run: _Run) -> None:
    """Modules outside the blocks (an lm_head), in one pass of the model in which every
    block replays the last block's recorded output; the pass stops once each linear to
    calibrate has seen its input."""
    cursor = [0]
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, last_outputs, cursor)
    try:
        _calibrate_stage(_Stage(model, calls, cursor), members, run, stop_early=True)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _calibrate_stage(stage: _Stage, members, run: _Run, stop_early: bool) -> None:
    """Collect input statistics for the stage's linears, fold scales, quantize."""
    todo = []
    for fqn, module, cfg in members:
        reason = _why_not(module, cfg)
        if reason is None and isinstance(cfg, CalibratedConfig) and not isinstance(
            module, nn.Linear
        ):
            reason = f"{type(cfg).__name__} calibrates nn.Linear layers only"
        if reason is not None:
            run.summary.skipped[fqn] = reason
        elif id(module.weight) not in run.new_weights:
            todo.append((fqn, module, cfg))
    calibrated = {f: m for f, m, c in todo if isinstance(c, CalibratedConfig)}
    stats: dict[str, InputStats] = {}
    if calibrated:
        hessian = any(c.needs_hessian for _, _, c in todo if isinstance(c, CalibratedConfig))
        collector = _Collector(calibrated, hessian, stop_early)
        try:
            for i in range(len(stage.calls)):
                collector.new_batch()
                stage.run(i)
        finally:
            collector.remove()
        stats = collector.stats
    configs = {f: c for f, _, c in todo}
    scales = _fold_scales(stage, calibrated, configs, stats, run)
    for fqn, module, cfg in todo:
        weight = module.weight
        try:
            q, how = _quantize_one(module, cfg, stats.get(fqn), scales.get(fqn))
        except UnsupportedWeight as e:
            run.summary.skipped[fqn] = str(e)
            continue
        except ValueError as e:
            raise ValueError(f"cannot quantize {fqn or '<root>'}: {e}") from None
        st = stats.get(fqn)
        if isinstance(cfg, CalibratedConfig) and (st is None or st.tokens == 0):
            run.unreached.append(fqn)
        param = nn.Parameter(q, requires_grad=False)
        original = _original_weight(module, run)
        run.new_weights[id(original)] = param
        run.summary.bytes_before += weight.numel() * weight.element_size()
        run.summary.bytes_after += q.nbytes_stored()
        _assign(module, "weight", param, run)
        run.assigned.append((module, original))
        run.summary.quantized[fqn] = f"{how}: {q!r}" if how else repr(q)


def _original_weight(module: nn.Module, run: _Run) -> torch.Tensor:
    """The weight the module had before this run (a fold may have replaced it since)."""
    for m, name, param in run.originals:
        if m is module and name == "weight":
            return param
    return module.weight


def _fold_scales(stage, calibrated, configs, stats, run: _Run) -> dict[str, torch.Tensor]:
    """AWQ / SmoothQuant: find producer -> consumer groups, choose and fold their scales.

    Returns the scale folded into each consumer (AWQ's clipping needs it); consumers with no
    foldable producer get none, and their summary line says so."""
    scaling = {
        f: m for f, m in calibrated.items()
        if isinstance(configs[f], (AWQ, SmoothQuant)) and stats[f].tokens > 0
        and id(m.weight) not in run.frozen
    }
    if not scaling:
        return {}

    def run0() -> torch.Tensor:
        return _first(stage.run(0))

    groups, order = smoothquant.find_scale_groups(stage.root, run0, scaling, run.frozen,
                                                  run.fold_hint)
    run.fold_hint = [grp.pattern for grp in groups] or None
    # Later consumers first: a producer that is itself a consumer (up_proj feeding down_proj)
    # has its rows rescaled before its own scale search looks at it.
    groups.sort(key=lambda grp: order.index(grp.consumers[0]), reverse=True)
    scales: dict[str, torch.Tensor] = {}
    for grp in groups:
        cfgs = {configs[f] for f in grp.consumers}
        if len(cfgs) != 1:
            continue
        cfg = cfgs.pop()
        modules = [scaling[f] for f in grp.consumers]
        st = stats[grp.consumers[0]]
        if isinstance(cfg, AWQ):
            s = awq.search_scale([m.weight for m in modules], st.hessian, st.abs_mean,
                                 int_target(cfg.base), cfg.grid)
        else:
            s = smoothquant.smooth_scale(st.abs_max, [m.weight for m in modules], cfg.alpha)
        run.originals.extend(smoothquant.fold(grp.producer, modules, s))
        for f in grp.consumers:
            scales[f] = s
    return scales


def _quantize_one(module, cfg, stats: InputStats | None, scale: torch.Tensor | None
                  ) -> tuple[LowbitTensor, str]:
    """The new weight of one module and a note on how it was made."""
    weight = module.weight
    if not isinstance(cfg, CalibratedConfig):
        return quantize_weight(cfg, weight), ""
    algo = type(cfg).__name__
    if stats is None or stats.tokens == 0:
        return quantize_weight(cfg.base, weight), f"RTN ({algo}: never reached by the data)"
    if isinstance(cfg, GPTQ):
        target = int_target(cfg.base)
        target.check(weight)
        res = gptq.gptq_quantize(weight, stats.hessian, target, cfg.damp, cfg.block_size,
                                 cfg.act_order, cfg.clip)
        note = f"GPTQ (damping raised to {res.damp:g})" if res.damp > cfg.damp else "GPTQ"
        return target.pack(weight, res.codes, res.scale, res.zero), note
    if isinstance(cfg, AWQ):
        if scale is not None:
            note = "AWQ"
        elif cfg.clip:
            note = "AWQ (clip only: no foldable producer)"
        else:
            note = "RTN (AWQ: no foldable producer, clip off)"
        if cfg.clip:
            h = stats.hessian
            if scale is not None:
                inv = 1 / scale.to(h)
                h = h * inv[:, None] * inv[None, :]
            weight = awq.clip_weight(weight, h, int_target(cfg.base))
        return quantize_weight(cfg.base, weight), note
    if isinstance(cfg, SmoothQuant):
        note = "SmoothQuant" if scale is not None else "RTN (SmoothQuant: no foldable producer)"
        return quantize_weight(cfg.base, weight), note
    raise TypeError(f"no calibration algorithm for {type(cfg).__name__}")


def _warn(run: _Run) -> None:
    summary = run.summary
    if run.unreached:
        warnings.warn(
            f"calibration data never reached {len(run.unreached)} layers; they were quantized "
            f"with round-to-nearest: {', '.join(run.unreached)}", stacklevel=4,
        )
    if summary.skipped:
        names = ", ".join(f"{n} ({r})" for n, r in summary.skipped.items())
        warnings.warn(f"quantize_ skipped {len(summary.skipped)} modules: {names}", stacklevel=4)
