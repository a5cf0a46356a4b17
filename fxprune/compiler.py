"""``fxprune.compile``: trace -> dependency -> cost -> score -> select -> rewrite -> verify."""

from __future__ import annotations

import functools
import gc
import logging
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx

from fxprune.calib import Calibration, LossFn, make_calibration
from fxprune.data import META_FLOPS, META_OUTPUT, PrunePlan, output_differences, output_signature
from fxprune.errors import InputError, TargetError, TraceError, VerificationError
from fxprune.passes.canonical import CanonicalizePass
from fxprune.passes.compensate import COMPENSATIONS, Compensation
from fxprune.passes.compensate import compensate as run_compensation
from fxprune.passes.cost import CostModel, CostPass
from fxprune.passes.dependency import DependencyPass, DependencyResult
from fxprune.passes.masking import default_device
from fxprune.passes.plan import build_plan, param_indices
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.rules_swin import EXPANSIONS
from fxprune.passes.score import AUTO, GroupScore, ScoreContext, auto_score, get_score
from fxprune.select import resolve_target, select
from fxprune.trace import (
    as_example_tuple,
    copy_graph_module,
    copy_module,
    detached_caches,
    flop_counter,
    fold_parametrizations,
    mha_slow_path,
    shape_propagate,
    trace,
)
from fxprune.verify import Verification, verify_onnx

__all__ = ["STAGES", "CompileResult", "compile", "count_flops", "count_params", "dependency_graph"]

log = logging.getLogger(__name__)

STAGES = ("trace", "dependency", "cost", "score", "select", "compensate", "rewrite", "verify")


def count_flops(model: torch.nn.Module, example: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    ``nn.MultiheadAttention`` runs its slow path (``fxprune.trace.mha_slow_path``): its fused inference
    op counts as 0 FLOPs, which would hide every attention layer from the count.
    """
    with torch.no_grad(), mha_slow_path(), flop_counter() as counter:
        model(*example)
    return int(counter.get_total_flops())


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class CompileResult:
    """What ``compile`` returns. ``graph_module`` is new; the user's model is untouched."""

    graph_module: fx.GraphModule
    plan: PrunePlan
    dependency: DependencyResult
    cost: CostModel
    scores: dict[int, GroupScore]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    target_flops: float
    verification: Verification | None
    timings: dict[str, float] = field(default_factory=dict)
    score: str = "magnitude"
    compensation: Compensation | None = None
    calibration: Calibration | None = None

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def groups(self) -> tuple[Any, ...]:
        return self.dependency.groups

    @property
    def report(self) -> str:
        return _report(self)

    def __repr__(self) -> str:
        return (
            f"CompileResult(flops {self.flops_before:,} -> {self.flops_after:,} ({self.flops_ratio:.3f}), "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}))"
        )


F = TypeVar("F", bound=Callable[..., Any])


def _gc_paused(fn: F) -> F:
    """Run ``fn`` with Python's cyclic garbage collector paused (re-enabled after, if it was on).

    A compile allocates many small objects (fx nodes, metadata, deep copies of module trees), which
    triggers full collections over everything the process holds (torch alone is about a million objects):
    up to a fifth of the compile time on densenet121. Memory is still freed by reference counting; the
    few cycles left are collected after the compile.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper  # type: ignore[return-value]


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t


def _prepare(
    model: Any, example_input: Any, stacklevel: int = 3
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A private eval-mode copy of the model and of the example (a tuple); checks both.

    Cases: (1) not an ``nn.Module``; (2) the example is not tensors, or is on the ``meta`` device, or holds
    NaN or Inf; (3) model tensors on ``meta`` (no data) or on another device than the example; (4) the
    deprecated hook-based ``torch.nn.utils.weight_norm``, or a model that cannot be deep-copied: all
    ``InputError``, raised before any work. Tensors a forward cached in the model's attributes with
    autograd on (not graph leaves, which ``deepcopy`` refuses) are copied detached
    (``fxprune.trace.detached_caches``). (5) parametrized tensors (``torch.nn.utils.parametrize``,
    ``parametrizations.weight_norm``) are folded into plain parameters in the copy, with a warning; (6) a model in training mode is compiled in
    eval mode, with a warning. The example is cloned, so a model that writes into its input in place never
    touches the caller's tensors. ``stacklevel``: of the warnings, to point at the user's call.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in an nn.Module"
        )
    example = as_example_tuple(example_input)
    _check_devices(model, example)
    _check_finite_example(example)
    _check_no_weight_norm_hooks(model)
    try:
        work = copy_module(model, detached_caches(model))
    except Exception as exc:
        raise InputError(
            f"model cannot be deep-copied ({type(exc).__name__}: {exc}); fxprune compiles a private copy and "
            "never modifies yours. If the model uses the deprecated torch.nn.utils.weight_norm, call "
            "torch.nn.utils.remove_weight_norm(module) first or use torch.nn.utils.parametrizations.weight_norm"
        ) from exc
    folded = fold_parametrizations(work)
    if folded:
        warnings.warn(
            f"parametrized tensors {', '.join(folded)} are folded into plain parameters in the compiled model "
            "(pruning keeps their values, not the parametrization); your model is unchanged",
            stacklevel=stacklevel,
        )
    if model.training:
        warnings.warn(
            "model is in training mode; fxprune compiles an eval-mode copy (your model is unchanged). "
            "Call model.eval() first to silence this.",
            stacklevel=stacklevel,
        )
    work.eval()
    return work, tuple(t.detach().clone() for t in example)


def _check_no_weight_norm_hooks(model: torch.nn.Module) -> None:
    """The deprecated hook-based ``torch.nn.utils.weight_norm`` recomputes ``weight`` from ``weight_g`` and
    ``weight_v`` before every forward, so slicing ``weight`` would be undone: refuse it, naming the fix."""
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            raise InputError(
                f"module '{name}' uses the deprecated torch.nn.utils.weight_norm, whose hook recomputes the "
                "weight on every call (the model cannot be deep-copied and pruned as it is); call "
                f"torch.nn.utils.remove_weight_norm(model.get_submodule('{name}')) first or use "
                "torch.nn.utils.parametrizations.weight_norm"
            )


def _check_finite_example(example: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(example):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise InputError(
                    f"example_input[{i}] ({tuple(t.shape)} {t.dtype}) contains {nan} NaN and {inf} Inf values; "
                    "shapes and FLOPs come from it and the ONNX check compares outputs on it: pass a finite "
                    f"input, e.g. torch.randn{tuple(t.shape)} or torch.nan_to_num(x)"
                )


def _check_devices(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(example):
        if t.device.type == "meta":
            raise InputError(
                f"example_input[{i}] is a meta tensor (a shape without data); pass a real tensor, e.g. "
                f"torch.randn{tuple(t.shape)}"
            )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.device.type == "meta":
            raise InputError(
                f"model tensor '{name}' is on the meta device (no data); materialise the weights first, e.g. "
                "model.to_empty(device='cpu') then model.load_state_dict(...)"
            )
    devices = {t.device for _, t in tensors}
    if len(devices) == 1:
        (dev,) = devices
        for i, t in enumerate(example):
            if t.device != dev:
                name = tensors[0][0]
                raise InputError(
                    f"example_input[{i}] is on {t.device} but the model's tensors are on {dev} (e.g. '{name}'); "
                    f"move one of them, e.g. example_input.to('{dev}') or model.to('{t.device}')"
                )


def _clones(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Fresh copies of the example for one extra run: a model may write into its input in place."""
    return tuple(t.clone() for t in example)


def _check_runs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    try:
        return count_flops(model, example)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in example)
        raise InputError(
            f"example_input ({shapes}) does not run through the model: {type(exc).__name__}: {exc}; "
            "pass an input the model accepts (shape, dtype and device of its first layer)"
        ) from exc


def _analyse(
    work: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    timings: dict[str, float],
    leaf_modules: Sequence[type | str],
    concrete_args: dict[str, Any] | None,
    strict: bool,
) -> tuple[fx.GraphModule, DependencyResult]:
    """Trace, propagate shapes and FLOPs (``graph_flops(gm)`` is then the model's FLOPs), group channels.

    An example the traced graph cannot run is checked against the model itself: if the model fails on
    it too, that is an ``InputError`` about the example (``_check_runs``), not a tracing problem.
    """
    with _timed(timings, "trace"):
        gm = trace(work, leaf_modules, concrete_args, EXPANSIONS)
        try:
            if any(isinstance(m, torch.nn.MultiheadAttention) for m in gm.modules()):
                shape_propagate(gm, example, count_flops=False)  # the decomposition needs the input ranks
                gm = CanonicalizePass()(gm)
            gm.meta[META_OUTPUT] = output_signature(shape_propagate(gm, example))
        except TraceError:
            _check_runs(work, example)
            raise
    with _timed(timings, "dependency"):
        dep = DependencyPass(strict=strict)(gm)
    return gm, dep


def graph_flops(gm: fx.GraphModule) -> int:
    """The FLOPs of ``gm`` as its last ``shape_propagate`` counted them (torch's ``FlopCounterMode``)."""
    return sum(int(n.meta.get(META_FLOPS, 0)) for n in gm.graph.nodes)


def dependency_graph(
    model: torch.nn.Module,
    example_input: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    strict: bool = False,
) -> DependencyResult:
    """Channel groups of ``model`` (``.groups``; ``.to_networkx()`` for a graph of them)."""
    work, example = _prepare(model, example_input)
    return _analyse(work, example, {}, leaf_modules, concrete_args, strict)[1]


@_gc_paused
def compile(  # noqa: A001 - the product's name for it
    model: torch.nn.Module,
    example_input: Any,
    target_flops: float,
    *,
    score: str = AUTO,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    compensate: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    max_batches: int | None = None,
    scores: Mapping[int, GroupScore] | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    cost_exponent: float | None = None,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    strict: bool = False,
    verify: bool = True,
    rtol: float = 1e-4,
    latency_runs: int = 10,
    **score_options: Any,
) -> CompileResult:
    """Prune ``model`` to about ``target_flops`` of its FLOPs; return a new, physically smaller model.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (never modified; compiled in eval mode).
        example_input: a tensor or tuple of tensors the model accepts; shapes come from it.
        target_flops: fraction of the original FLOPs in (0, 1], or an absolute FLOPs count (> 1).
        score: name of the scoring pass (``fxprune.passes.score.SCORES``): ``influence`` (the retrained
            loss change), ``magnitude``, ``taylor``, ``fisher``, ``grad_norm``, ``sosp_h``, ``inf_cp``,
            ``ifso_code``; or ``"auto"`` (default): ``fisher`` with labelled ``data``, else ``magnitude``
            (``passes.score.auto_score``: the winner of ``bench/quality.py``). ``result.score`` names the
            pass that ran. Score-specific options (``probes=``, ``damping=``...) go in ``**score_options``.
        data: calibration batches for data-driven scores and compensation: an iterable of model inputs, or
            of ``(inputs, targets)`` pairs. Without targets (or without data: the example input is then the
            only batch) scores use the label-free output-matching loss (``fxprune.calib``).
        loss_fn: ``loss_fn(output, targets) -> scalar`` for labelled data (default: cross-entropy for integer
            targets, MSE otherwise).
        compensate: ``"lsq"`` (layer-wise least squares), ``"bias"`` (mean-value fold), ``"newton"``
            (influence update) or ``"none"``; default ``"lsq"`` when ``data`` is given, else ``"none"``.
            ``lsq`` re-fits each consumer's kept columns *and* its bias shift, so its layer-wise error is at
            most the mean fold's (one feasible point of the same least-squares problem); on the digits bench
            (``bench/quality.py``) it was the only method that recovered accuracy without fine-tuning.
        device: where scoring runs (default: CUDA if available, else CPU); the result is on the CPU.
        seed: seeds random probes, so the same inputs give the same plan.
        progress: report scoring and compensation over calibration batches on stderr: a tqdm bar on a
            terminal, else a line per step (at most one every 5 s); nothing with ``progress=False``.
        max_batches: use at most this many batches of ``data``.
        scores: reuse ``result.scores`` of an earlier compile of the same model and input (same groups)
            instead of scoring again: score once, then sweep targets or compensation methods.
        min_channels: every group keeps at least this many channels (never removed whole).
        round_to: kept counts are multiples of this (or the original count).
        cost_exponent: priority = score / FLOPs_saved ** cost_exponent (default: the score's own).
        leaf_modules: module types or qualified names to keep opaque (their channels are pinned).
        concrete_args: passed to torch.fx to specialise non-tensor forward arguments.
        strict: raise ``UnsupportedOpError`` for an op without a rule instead of pinning its channels.
        verify: export to ONNX and compare ONNX Runtime with eager (``rtol`` x max |output|).
        latency_runs: ONNX Runtime timing runs for original and pruned (0 to skip timing).

    Raises:
        InputError, TraceError, TargetError, UnsupportedOpError: see ``fxprune.errors``.
        VerificationError: ``verify`` is on and ONNX Runtime disagrees with the compiled model (the error
            carries the result; the message says whether the original model fails the same check).
    """
    timings: dict[str, float] = {}
    work, example = _prepare(model, example_input, stacklevel=4)  # user -> _gc_paused -> compile -> here
    if min_channels < 1 or round_to < 1:
        raise InputError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
    if score != AUTO:
        get_score(score).check_options(score_options)  # argument errors before any heavy work
    method = compensate if compensate is not None else ("lsq" if data is not None else "none")
    if method not in COMPENSATIONS:
        raise InputError(f"compensate={method!r} is not a method; choose one of {', '.join(COMPENSATIONS)}")
    resolve_target(target_flops, None)  # argument errors before any heavy work
    dev = default_device(device)
    calib = None
    wants_data = data is not None if score == AUTO else get_score(score).uses_data
    if wants_data or method != "none":
        _check_runs(work, example)  # an example error before any data error (calibration may run it)
        with _timed(timings, "score"):
            calib = make_calibration(work, example, data, loss_fn, max_batches=max_batches)
    if score == AUTO:
        score = auto_score(calib is not None and data is not None and calib.labelled)
        get_score(score).check_options(score_options)
    score_cls = get_score(score)
    # the traced graph's counted run gives the FLOPs (and checks the example) in the pass that records shapes
    gm, dep = _analyse(work, example, timings, leaf_modules, concrete_args, strict)
    flops_before = graph_flops(gm)
    with _timed(timings, "cost"):
        cost = CostPass({g.id: g.size for g in dep.groups})(gm)
        target = resolve_target(target_flops, flops_before)
    with _timed(timings, "score"), _autograd_errors(gm, f"score={score!r}"):
        if scores is None:
            scored = score_cls(dep.groups, ScoreContext(calib, dev, progress, seed), **score_options)(gm)
        else:
            scored = _check_scores(scores, dep)
    with _timed(timings, "select"), _absolute_target_hint(target_flops, flops_before):
        chosen = select(dep.groups, {g: s.mean for g, s in scored.items()}, cost, target, min_channels=min_channels, round_to=round_to,
                        cost_exponent=score_cls.cost_exponent if cost_exponent is None else cost_exponent)  # fmt: skip
        indices = param_indices(dep.groups, chosen.kept)  # the plan's and the rewrite's, computed once
        plan = build_plan(dep.groups, chosen.kept, indices)
    _warn_few_channels(dep, chosen.kept)
    comp = None
    source = gm
    if method != "none" and chosen.kept:
        assert calib is not None
        with _timed(timings, "compensate"), _autograd_errors(gm, f"compensate={method!r}"):
            source, comp = run_compensation(gm, dep.groups, plan, calib, method, device=dev,
                                            newton_options=score_options, progress=progress)  # fmt: skip
    with _timed(timings, "rewrite"):
        pruned = (
            RewritePass(dep.groups, chosen.kept, indices)(source) if chosen.kept else copy_graph_module(gm)
        )
    verification = None
    # one counted run of the pruned graph gives its FLOPs, the shapes for the ONNX writer, (on the CPU,
    # where verify runs) verify's reference outputs, and the output structure checked against the original's
    eager = shape_propagate(pruned, example)
    flops_after = graph_flops(pruned)
    changed = output_differences(gm.meta[META_OUTPUT], output_signature(eager))
    if verify and not changed:
        with _timed(timings, "verify"), torch.no_grad():  # the user's model itself, not only its trace
            changed = output_differences(output_signature(work(*_clones(example))), output_signature(eager))
    if verify and not changed:
        on_cpu = all(t.device.type == "cpu" for t in example)
        with _timed(timings, "verify"):
            verification = verify_onnx(pruned, example, gm, rtol=rtol, latency_runs=latency_runs,
                                       eager_outputs=eager if on_cpu else None, shapes_propagated=True)  # fmt: skip
    result = CompileResult(
        graph_module=pruned,
        plan=plan,
        dependency=dep,
        cost=cost,
        scores=scored,
        flops_before=flops_before,
        flops_after=flops_after,
        params_before=count_params(work),
        params_after=count_params(pruned),
        target_flops=target,
        verification=verification,
        timings=timings,
        score=score,
        compensation=comp,
        calibration=calib,
    )
    if changed:
        raise VerificationError(
            "the compiled model does not return what the original returns: " + "; ".join(changed[:8])
            + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else "")
            + ". This is a bug in fxprune (the rewrite changed an output); please report it with the model. "
            "err.result holds the result for inspection",
            result=result,
        )  # fmt: skip
    if verification is not None and not verification.passed:
        raise VerificationError(_verification_message(result, gm, example, rtol), result=result)
    return result


#: a group left with fewer channels than this (having had more) gets a warning
FEW_CHANNELS = 4


@contextmanager
def _absolute_target_hint(target_flops: float, total: int) -> Iterator[None]:
    """An unreachable target above 1 was given as an absolute FLOPs count: say so, a fraction was likely
    meant (``target_flops=1.5`` is 1.5 FLOPs, not 150% or 1.5x smaller)."""
    try:
        yield
    except TargetError as exc:
        if float(target_flops) <= 1.0:
            raise
        raise TargetError(
            f"{exc}. Note: target_flops={target_flops!r} is above 1, so it is read as an absolute count of "
            f"FLOPs, not a fraction; this model has {total:,} FLOPs. A fraction in (0, 1] of the original "
            "was probably meant, e.g. target_flops=0.5 for half the FLOPs",
            min_flops=exc.min_flops,
            total_flops=exc.total_flops,
        ) from exc


def _warn_few_channels(dep: DependencyResult, kept: Mapping[int, tuple[int, ...]]) -> None:
    """Warn when the selection leaves a group with fewer than ``FEW_CHANNELS`` channels (from more): such
    layers are near-bottlenecks, usually a sign of a too aggressive target."""
    few = [g for g in dep.groups if g.id in kept and len(kept[g.id]) < min(FEW_CHANNELS, g.size)]
    if not few:
        return

    def name(g: Any) -> str:
        mods = list(dict.fromkeys(s.param.rpartition(".")[0] for s in g.sites if s.role == "out")) or list(
            g.nodes
        )
        where = ", ".join(mods[:2]) + (", ..." if len(mods) > 2 else "")
        return f"group {g.id} ({where}: {g.size} -> {len(kept[g.id])})"

    warnings.warn(
        f"the target leaves {len(few)} channel group(s) with fewer than {FEW_CHANNELS} channels: "
        + "; ".join(name(g) for g in few[:6]) + (f"; and {len(few) - 6} more" if len(few) > 6 else "")
        + ". Such layers lose most of what they carry; raise target_flops or pass "
        f"min_channels={FEW_CHANNELS} to keep at least that many",
        stacklevel=4,  # user -> _gc_paused -> compile -> here
    )  # fmt: skip


def _verification_message(
    r: CompileResult, original: fx.GraphModule, example: tuple[torch.Tensor, ...], rtol: float
) -> str:
    v = r.verification
    assert v is not None
    what = (
        f"the compiled model does not run in ONNX Runtime: {v.error}"
        if v.error
        else f"ONNX Runtime disagrees with the compiled model in eager mode: max abs error "
        f"{v.max_abs_error:.3g} = {v.max_rel_error:.3g} x max |output| > rtol={rtol:g}"
    )
    ref = verify_onnx(original, example, rtol=rtol, latency_runs=0)
    blame = (
        "the original model fails the same check, so the ONNX exporter mis-translates the model itself, not "
        "the pruning"
        if not ref.passed
        else "the original model passes it"
    )
    nodes = inplace_nodes(original)
    cause = (
        f"; in-place ops on tensors that are also read elsewhere are a known cause: {', '.join(nodes[:4])}"
        if nodes
        else ""
    )
    return (
        f"{what}; {blame}{cause}. Fix: make in-place ops out-of-place, raise rtol= if the error is float "
        "noise, or pass verify=False to skip the check (err.result holds the result for inspection)"
    )


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow}


def inplace_nodes(gm: fx.GraphModule) -> list[str]:
    """Nodes that overwrite a tensor: ``inplace=True`` modules/functions, ``Tensor.op_`` methods, ``x += y``."""
    modules = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            hit = bool(getattr(modules.get(str(n.target)), "inplace", False))
        elif n.op == "call_method":
            hit = str(n.target).endswith("_") and not str(n.target).startswith("_")
        elif n.op == "call_function":
            hit = (
                n.target in _INPLACE_OPERATORS
                or n.kwargs.get("inplace") is True
                or (getattr(n.target, "__name__", "").endswith("_") and not n.target.__name__.startswith("_"))
            )
        else:
            hit = False
        if hit:
            out.append(n.format_node())
    return out


@contextmanager
def _autograd_errors(gm: fx.GraphModule, what: str) -> Iterator[None]:
    """Turn autograd's in-place error (the model cannot be differentiated as written) into an InputError."""
    try:
        yield
    except RuntimeError as exc:
        if not any(m in str(exc) for m in ("modified by an inplace operation", "is being modified inplace")):
            raise
        nodes = inplace_nodes(gm)
        where = ("; in-place nodes: " + ", ".join(nodes[:4])) if nodes else ""
        raise InputError(
            f"{what} needs gradients of the model, but an in-place op overwrites a tensor that autograd saved "
            f"for the backward pass{where}. Fix: make that op out-of-place "
            "(nn.ReLU(inplace=False), y = x + z instead of x += z), or use score='magnitude' and "
            f"compensate='none'. ({exc})"
        ) from exc


def _check_scores(scores: Mapping[int, GroupScore], dep: DependencyResult) -> dict[int, GroupScore]:
    expected = {g.id: g.size for g in dep.prunable}
    got = {g: len(s.mean) for g, s in scores.items()}
    if got != expected:
        raise InputError(
            "scores= does not match this model's prunable groups (ids/sizes differ); pass the .scores of a "
            "compile of the same model with the same example input, or drop scores="
        )
    return dict(scores)


def _report(r: CompileResult) -> str:
    lines = [
        "# fxprune report",
        f"FLOPs   {r.flops_before:>16,} -> {r.flops_after:>16,}  ({r.flops_ratio:.4f}; requested {r.target_flops / max(r.flops_before, 1):.4f})",
        f"params  {r.params_before:>16,} -> {r.params_after:>16,}  ({r.params_ratio:.4f})",
    ]
    groups = r.dependency.groups
    pruned = [g for g in groups if g.id in r.plan.kept]
    lines.append(
        f"groups  {len(groups)} total, {len(r.dependency.prunable)} prunable, {len(pruned)} pruned, "
        f"{r.plan.removed_channels} channels removed"
    )
    if r.verification is not None:
        v = r.verification
        lines.append(
            f"verify  ONNX Runtime ({v.exporter}, opset {v.opset}) max abs err {v.max_abs_error:.3g} "
            f"(rel {v.max_rel_error:.3g}, tol {v.rtol:g}) -> {'PASS' if v.passed else 'FAIL'}"
            + (f"; {v.error}" if v.error else "")
        )
        if v.ort_ms_before is not None and v.ort_ms_after is not None:
            lines.append(f"latency ORT {v.ort_ms_before:.2f} ms -> {v.ort_ms_after:.2f} ms")
    lines.append("timings " + ", ".join(f"{k} {v:.2f}s" for k, v in r.timings.items()))
    lines.append("")
    lines.append("## pruned modules (kept / original)")
    for name, e in r.plan.modules.items():
        parts = []
        if "out" in e:
            parts.append(f"out {len(e['out'])}")
        if "in" in e:
            parts.append(f"in {len(e['in'])}")
        lines.append(f"- {name}: {', '.join(parts)}")
    lines.append("")
    lines.append("## pinned groups")
    for g in groups:
        if g.pinned:
            lines.append(
                f"- group {g.id} ({g.size} ch, nodes {', '.join(g.nodes[:3])}{'...' if len(g.nodes) > 3 else ''}): {'; '.join(g.pinned)}"
            )
    return "\n".join(lines)
