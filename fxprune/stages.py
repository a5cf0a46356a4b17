"""The compiler's stages over one typed state, and the pipelines the API runs (``fxprune.pipeline``).

``CompileState`` holds everything a compile makes, one field per artefact; each stage below declares the
fields it reads (``requires``) and writes (``provides``):

==========  ==================================================  =========================================
stage       requires                                            provides
==========  ==================================================  =========================================
prepare     model, example_input                                work, example
options     options                                             method, device, reduce, progress
calibrate   work, example, options, method                      calib, score_pass
trace       work, example, options                              gm
dependency  gm, options                                         dep
cost        gm, dep, options                                    flops_before, cost, target
latency     gm, dep, cost, target, example, reduce, ...         budget, target, round_to, latency_model
score       gm, dep, calib, score_pass, device, reduce, ...     scores
select      dep, scores, budget, target, round_to, ...          kept, indices, plan
refit       gm, dep, kept, latency_model, example, ...          kept, indices, plan, budget, latency_model
compensate  gm, dep, plan, kept, calib, method, device, ...     source, compensation
rewrite     gm, source, dep, kept, indices                      pruned
measure     gm, pruned, example                                 eager, flops_after, changed
verify      gm, pruned, work, example, eager, changed, options  changed, verification
result      (every field above)                                 result
==========  ==================================================  =========================================

``COMPILE`` is ``fxprune.compile``; ``ANALYSE`` (prepare, trace, dependency) is ``dependency_graph`` and
``inspect``; ``fxprune.deploy.apply_plan`` runs ``ANALYSE`` then its own plan stage and the rewrite.
``compile_pipeline(table)`` builds ``COMPILE`` with another op table (``fxprune.passes.family.OpTable``)
in every stage that reads op rules. A
different capture front end is a stage that provides ``gm`` (a GraphModule with shapes propagated and
``gm.meta[META_OUTPUT]``, and ``gm.meta[META_CAPTURE]`` naming it) in place of ``trace`` (which has two:
torch.fx, and torch.export when tracing fails); a different selection (a latency cost, a saved plan) is
a stage that provides ``kept``, ``indices`` and ``plan``; ``compile(..., pipeline=COMPILE.replace(...))``
runs it.
"""

from __future__ import annotations

import dataclasses
import operator
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxprune.calib import Calibration, LossFn, batch_sizes, make_calibration
from fxprune.capture import CAPTURES, EXPORT, SYMBOLIC, export_capture
from fxprune.data import (
    META_CAPTURE,
    META_FLOPS,
    META_OUTPUT,
    PrunePlan,
    drop_metadata,
    output_differences,
    output_signature,
)
from fxprune.errors import FxpruneError, InputError, TargetError, TraceError, VerificationError, warn
from fxprune.inputs import check_runs, clones, count_params, prepare
from fxprune.passes import op_table
from fxprune.passes.canonical import CanonicalizePass
from fxprune.passes.compensate import COMPENSATIONS, Compensation, compensate
from fxprune.passes.cost import Cost as CostProtocol
from fxprune.passes.cost import CostModel, CostPass
from fxprune.passes.dependency import DependencyPass, DependencyResult
from fxprune.passes.family import OpTable
from fxprune.passes.latency import (
    Alignment,
    LatencyModel,
    Runtime,
    TableCache,
    build_latency_model,
    group_alignment,
    probe,
    resolve_latency_target,
    time_ms,
)
from fxprune.passes.masking import default_device, progress
from fxprune.passes.plan import Indices, build_plan, param_indices
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.score import AUTO, GroupScore, ScoreContext, ScorePass, auto_score
from fxprune.passes.scores import get_score
from fxprune.passes.stats import Reduce, process_group_sum, process_rank
from fxprune.pipeline import UNSET, Pipeline, PipelineState, Stage
from fxprune.select import resolve_target, select
from fxprune.trace import copy_graph_module, shape_propagate, trace, traceable_children, untraceable_modules
from fxprune.verify import (
    Verification,
    default_threads,
    export_onnx,
    ort_provider,
    time_interleaved,
    verify_onnx,
)

__all__ = [
    "ANALYSE",
    "COMPILE",
    "FEW_CHANNELS",
    "INPUTS",
    "CompileOptions",
    "CompileResult",
    "CompileState",
    "Calibrate",
    "Compensate",
    "Cost",
    "Dependency",
    "Latency",
    "Measure",
    "Options",
    "Prepare",
    "Refit",
    "Result",
    "Rewrite",
    "Score",
    "Select",
    "Trace",
    "Units",
    "Verify",
    "compile_pipeline",
    "graph_flops",
    "inplace_nodes",
]


@dataclass(frozen=True)
class CompileOptions:
    """``fxprune.compile``'s keyword arguments (documented there), as one frozen value."""

    target_flops: float | None = None
    target_latency: float | str | None = None
    score: str | type[ScorePass] = AUTO
    data: Any = None
    loss_fn: LossFn | None = None
    compensate: str | None = None
    device: str | torch.device | None = None
    seed: int = 0
    progress: bool = True
    max_batches: int | None = None
    scores: Mapping[int, GroupScore] | None = None
    min_channels: int = 1
    round_to: int | None = None
    cost_exponent: float | None = None
    leaf_modules: Sequence[type | str] = ()
    concrete_args: dict[str, Any] | None = None
    capture: str = "auto"
    strict: bool = False
    verify: bool = True
    rtol: float = 1e-4
    latency_runs: int = 15
    latency_threads: int | None = None
    latency_provider: str | None = None
    score_options: Mapping[str, Any] = field(default_factory=dict)
    #: qualified names of the submodules to compile inside the model (``fxprune.submodules``); () for
    #: the whole model
    submodules: tuple[str, ...] = ()


@dataclass
class CompileState(PipelineState):
    """Everything a compile makes; a field is ``UNSET`` until the stage that provides it has run."""

    # inputs
    model: Any = UNSET
    example_input: Any = UNSET
    options: CompileOptions = UNSET
    # prepare, options, calibrate
    work: torch.nn.Module = UNSET
    example: tuple[torch.Tensor, ...] = UNSET
    method: str = UNSET
    device: torch.device = UNSET
    reduce: Reduce | None = UNSET
    progress: bool = UNSET
    calib: Calibration | None = UNSET
    score_pass: type[ScorePass] = UNSET
    # trace, dependency, cost
    gm: fx.GraphModule = UNSET
    dep: DependencyResult = UNSET
    flops_before: int = UNSET
    cost: CostModel = UNSET
    target: float = UNSET
    # latency
    budget: CostProtocol = UNSET
    round_to: dict[int, int] = UNSET
    latency_model: LatencyModel | None = UNSET
    # score, select
    scores: dict[int, GroupScore] = UNSET
    kept: dict[int, tuple[int, ...]] = UNSET
    indices: Indices = UNSET
    plan: PrunePlan = UNSET
    # compensate, rewrite
    source: fx.GraphModule = UNSET
    compensation: Compensation | None = UNSET
    pruned: fx.GraphModule = UNSET
    # measure, verify
    eager: Any = UNSET
    flops_after: int = UNSET
    changed: list[str] = UNSET
    verification: Verification | None = UNSET
    result: CompileResult = UNSET


#: the fields a compile pipeline starts from
INPUTS = ("model", "example_input", "options")


def graph_flops(gm: fx.GraphModule) -> int:
    """The FLOPs of ``gm`` as its last ``shape_propagate`` counted them (torch's ``FlopCounterMode``)."""
    return sum(int(n.meta.get(META_FLOPS, 0)) for n in gm.graph.nodes)


class _TableStage(Stage[CompileState]):
    """A stage that reads the op table (``fxprune.passes.op_table``): the one it was built with, or the
    default table at run time."""

    def __init__(self, table: OpTable | None = None) -> None:
        self.table = table

    @property
    def ops(self) -> OpTable:
        return self.table if self.table is not None else op_table.DEFAULT_TABLE


class Prepare(Stage[CompileState]):
    """Check the model and example and take private copies (``fxprune.inputs.prepare``)."""

    name = "prepare"
    requires = ("model", "example_input")
    provides = ("work", "example")

    def run(self, state: CompileState) -> None:
        state.work, state.example = prepare(state.model, state.example_input)


class Options(Stage[CompileState]):
    """Argument errors before any heavy work: counts, the score's own options, the compensation method,
    the target's form, the device. Provides the compensation method (default ``lsq`` with data), the
    device scoring runs on, and, under an initialised ``torch.distributed`` process group of several
    processes, the all-reduce that sums every score and compensation statistic over the processes
    (``reduce``; each process holds its own shard of the calibration data) with progress shown by rank 0
    only."""

    name = "options"
    requires = ("options",)
    provides = ("method", "device", "reduce", "progress")

    def run(self, state: CompileState) -> None:
        o = state.options
        if o.min_channels < 1 or (o.round_to is not None and o.round_to < 1):
            raise InputError(f"min_channels and round_to must be >= 1, got {o.min_channels} and {o.round_to}")
        if o.latency_threads is not None and (isinstance(o.latency_threads, bool) or o.latency_threads < 1):
            raise InputError(
                f"latency_threads={o.latency_threads!r}: pass a thread count >= 1, or None for all CPUs"
            )
        if (o.target_flops is None) == (o.target_latency is None):
            raise TargetError(
                "pass exactly one of target_flops (a fraction of the FLOPs, e.g. 0.5) and target_latency (a "
                f"fraction of the measured latency, or e.g. '3.5ms'); got target_flops={o.target_flops!r}, "
                f"target_latency={o.target_latency!r}"
            )
        if o.target_latency is not None:
            resolve_latency_target(o.target_latency, None)
            if process_group_sum() is not None:
                raise InputError(
                    "target_latency measures latency tables on each machine, which could give the processes "
                    "of a torch.distributed group different plans; compile with target_flops under torchrun, "
                    "or with target_latency in one process"
                )
        if o.score != AUTO:
            get_score(o.score).check_options(dict(o.score_options))
        method = o.compensate if o.compensate is not None else ("lsq" if o.data is not None else "none")
        if method not in COMPENSATIONS:
            raise InputError(
                f"compensate={method!r} is not a method; choose one of {', '.join(COMPENSATIONS)}"
            )
        if o.target_flops is not None:
            resolve_target(o.target_flops, None)
        state.method, state.device = method, default_device(o.device)
        state.reduce = process_group_sum()
        state.progress = o.progress and process_rank() == 0


class Calibrate(Stage[CompileState]):
    """Validate the calibration data (when the score or the compensation reads it) and resolve
    ``score="auto"``."""

    name = "calibrate"
    requires = ("work", "example", "options", "method")
    provides = ("calib", "score_pass")

    def run(self, state: CompileState) -> None:
        o = state.options
        wants_data = o.data is not None if o.score == AUTO else get_score(o.score).uses_data
        calib = None
        if wants_data or state.method != "none":
            check_runs(state.work, state.example)  # an example error before any data error
            calib = make_calibration(state.work, state.example, o.data, o.loss_fn, max_batches=o.max_batches)
        if o.score == AUTO:  # the options stage checked an explicit score's options
            score = get_score(auto_score(calib is not None and o.data is not None and calib.labelled))
            score.check_options(dict(o.score_options))
        else:
            score = get_score(o.score)
        state.calib, state.score_pass = calib, score


def _check_export_batches(calib: Calibration, example: tuple[torch.Tensor, ...]) -> None:
    """torch.export specialises the graph to the example's shapes, its batch size included: every
    calibration batch must have it (the calibration stage checked the other dims)."""
    n = int(example[0].shape[0]) if example and example[0].dim() else 1
    for i, size in enumerate(batch_sizes(calib.batches)):
        if size != n:
            raise InputError(
                f"data[{i}] has batch size {size}, but the model was captured by torch.export for "
                f"example_input's batch size {n} (its graph is specialised to the example's shapes): give "
                f"batches of exactly {n} (e.g. DataLoader(..., batch_size={n}, drop_last=True)), or an example "
                "of the batches' size; for transformers models fxprune.hf.compile pads and regroups token batches"
            )


def _canonical(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, Any]:
    """``gm`` with attention canonicalised (``CanonicalizePass``), after one counted run that records
    shapes and FLOPs; and that run's output."""
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in gm.modules()):
        shape_propagate(gm, example, count_flops=False)  # the decomposition needs the input ranks
        gm = CanonicalizePass()(gm)
    return gm, shape_propagate(gm, example)


class Trace(_TableStage):
    """Capture, attention canonicalisation, and one counted run that records shapes, FLOPs and the output
    structure. A graph that fails on an example the model itself rejects is an ``InputError`` about the
    example, not a ``TraceError``.

    Capture (``options.capture``): ``"auto"`` (the default) traces with torch.fx (``fxprune.trace.trace``)
    and, when that fails, captures with ``torch.export`` (``fxprune.capture.export_capture``); ``"fx"`` and
    ``"export"`` use one of them only. ``gm.meta[META_CAPTURE]`` says which one was used. When neither works, the
    ``TraceError`` lists every module symbolic tracing rejects (``untraceable_modules``) and the FLOPs floor
    the model would have with them kept opaque (``leaf_modules=``), or why that is not possible either.
    """

    name = "trace"
    requires = ("work", "example", "options")
    provides = ("gm",)

    def run(self, state: CompileState) -> None:
        o, example = state.options, state.example
        if o.capture not in CAPTURES:
            raise InputError(f"capture={o.capture!r} is not one of {', '.join(map(repr, CAPTURES))}")
        try:
            gm, capture = self._capture(state.work, example, o)
            gm, out = _canonical(gm, example)
            gm.meta[META_OUTPUT] = output_signature(out)
            gm.meta[META_CAPTURE] = capture
        except TraceError:
            check_runs(state.work, example)
            raise
        state.gm = gm

    def _capture(
        self, work: torch.nn.Module, example: tuple[torch.Tensor, ...], o: CompileOptions
    ) -> tuple[fx.GraphModule, str]:
        if o.capture == "export":
            return export_capture(work, example, o.leaf_modules), EXPORT
        try:
            return trace(work, o.leaf_modules, o.concrete_args, self.ops.expansions), SYMBOLIC
        except TraceError as fx_error:
            if o.capture == "fx":
                raise
            check_runs(work, example)  # an example the model rejects is about the example
            try:
                return export_capture(work, example, o.leaf_modules), EXPORT
            except TraceError as export_error:
                raise TraceError(self._neither(work, example, o, fx_error, export_error)) from export_error

    def _neither(
        self,
        work: torch.nn.Module,
        example: tuple[torch.Tensor, ...],
        o: CompileOptions,
        fx_error: TraceError,
        export_error: TraceError,
    ) -> str:
        """The message when no capture works: every untraceable module, and the floor with them opaque."""
        bad, top = untraceable_modules(work, o.leaf_modules, o.concrete_args)
        lines = [f"neither capture works on {type(work).__name__}:", f"  torch.export: {export_error}"]
        if not bad:
            lines.append(f"  torch.fx: {fx_error}")
        else:
            lines.append(
                f"  torch.fx rejects {len(bad)} module(s); symbolic tracing stops inside each of them:"
            )
            lines += [f"    module '{name}' ({kind}): {why}" for name, kind, why in bad]
            names = [name for name, _, _ in bad]
            if top is None:
                try:
                    share = self._floor(work, example, [*o.leaf_modules, *names], o)
                    floor = f"the smallest model fxprune can make then has {share:.3f} of the FLOPs"
                except FxpruneError as exc:
                    floor = f"the model does not compile with them opaque either ({exc})"
                lines.append(
                    f"  fix: pass leaf_modules={names!r} to keep them opaque (their channels are pinned); {floor}"
                )
                return "\n".join(lines)
            lines.append(f"  and, with them opaque, the top-level forward: {top}")
            lines.append(
                "  fix: make that control flow independent of tensor values, or bind it with concrete_args="
            )
        parts = traceable_children(work)
        if parts:
            listed = ", ".join(f"'{n}' ({kind}, {share:.0%} of the parameters)" for n, kind, share in parts)
            lines.append(
                f"  or compile the parts that trace inside the model, e.g. submodules={[parts[0][0]]!r} "
                f"(children torch.fx traces alone: {listed})"
            )
        return "\n".join(lines)

    def _floor(
        self, work: torch.nn.Module, example: tuple[torch.Tensor, ...], leaves: list[Any], o: CompileOptions
    ) -> float:
        """The FLOPs of the smallest model with ``leaves`` opaque, as a fraction of the model's."""
        gm, _ = _canonical(trace(work, leaves, o.concrete_args, self.ops.expansions), example)
        dep = DependencyPass(strict=False, table=self.ops)(gm)
        cost = CostPass({g.id: g.size for g in dep.groups})(gm)
        sizes = {g.id: (min(o.min_channels, g.size) if g.prunable else g.size) for g in dep.groups}
        return float(cost.at(sizes) / cost.total) if cost.total else 1.0


class Dependency(_TableStage):
    """Channel groups (``fxprune.passes.dependency``)."""

    name = "dependency"
    requires = ("gm", "options")
    provides = ("dep",)

    def run(self, state: CompileState) -> None:
        state.dep = DependencyPass(strict=state.options.strict, table=self.ops)(state.gm)


class Cost(Stage[CompileState]):
    """The FLOPs cost model (the traced graph's counted run gives the model's FLOPs) and the target."""

    name = "cost"
    requires = ("gm", "dep", "options")
    provides = ("flops_before", "cost", "target")

    def run(self, state: CompileState) -> None:
        state.flops_before = graph_flops(state.gm)
        state.cost = CostPass({g.id: g.size for g in state.dep.groups})(state.gm)
        t = state.options.target_flops
        state.target = resolve_target(1.0 if t is None else t, state.flops_before)


class Latency(_TableStage):
    """Hardware-friendly kept counts and the latency budget (``fxprune.passes.latency``).

    ``round_to``: per group, ``options.round_to`` when given, else the steps that keep every tensor dim a
    group cuts at a multiple of the runtime's measured block (a FLOPs target; the alignment with a latency
    target, whose tables see the blocks) (``latency.group_alignment``, ``latency.probe``: cached per
    machine).
    With ``options.target_latency``: the per-op latency tables of the model (cached per op signature) and
    the measured latency of the whole original, as the ``budget`` selection runs under (in ms) and the
    ``target``; otherwise ``budget`` is the FLOPs cost model."""

    name = "latency"
    requires = ("gm", "dep", "cost", "target", "example", "reduce", "progress", "options")
    provides = ("budget", "target", "round_to", "latency_model")

    def run(self, state: CompileState) -> None:
        o, groups = state.options, state.dep.groups
        state.budget, state.latency_model = state.cost, None
        if o.round_to is not None and o.target_latency is None:
            state.round_to = {g.id: o.round_to for g in groups}
            return
        runtime = Runtime(ort_provider(o.latency_provider), o.latency_threads or default_threads())
        cache = TableCache(runtime)
        alignment = _same_on_every_rank(probe(runtime, cache), state.reduce)
        state.round_to = (
            group_alignment(groups, alignment, blocks=o.target_latency is None)
            if o.round_to is None
            else {g.id: o.round_to for g in groups}
        )
        if o.target_latency is None:
            return
        example, table = state.example, self.ops

        def measure_model() -> float:
            blob, _ = export_onnx(state.gm, example, table=table)
            return time_ms(runtime.session(blob), example)

        model = build_latency_model(state.gm, groups, state.cost, example, runtime, measure_model=measure_model,
                                    cache=cache, steps=lambda ops: progress(ops, state.progress, "latency tables"))  # fmt: skip
        state.latency_model = model
        state.budget = model.cost()
        state.target = resolve_latency_target(o.target_latency, model.full_ms)


class Score(Stage[CompileState]):
    """Per-channel scores of every prunable group, or ``options.scores`` checked against the groups."""

    name = "score"
    requires = ("gm", "dep", "calib", "score_pass", "device", "reduce", "progress", "options", "example")
    provides = ("scores",)

    def run(self, state: CompileState) -> None:
        o = state.options
        if state.gm.meta.get(META_CAPTURE) == EXPORT and state.calib is not None:
            _check_export_batches(state.calib, state.example)  # before scores or compensation read them
        if o.scores is not None:
            state.scores = _check_scores(o.scores, state.dep)
            return
        context = ScoreContext(state.calib, state.device, state.progress, o.seed, state.reduce)
        with _autograd_errors(state.gm, f"score={state.score_pass.name!r}"):
            score = state.score_pass(state.dep.groups, context, **o.score_options)
            state.scores = score(state.gm)


@dataclass(frozen=True)
class Units:
    """Which prunable groups selection may cut and which keep one count together (``Select(units=)``).

    Attributes:
        allowed: the group ids selection may cut (None: every prunable group).
        bundles: sets of groups that keep the same count (``fxprune.select.select(bundles=)``).
    """

    allowed: frozenset[int] | None = None
    bundles: tuple[tuple[int, ...], ...] = ()


class Select(Stage[CompileState]):
    """Global selection under the target (``fxprune.select``), the parameter indices and the plan; warns
    when a group is left with fewer than ``FEW_CHANNELS`` channels.

    ``units``: a function of the state (its ``dep`` and ``gm``) giving the ``Units`` to select among, e.g.
    ``fxprune.hf``'s attention heads and MLP channels with one count per layer; default: every prunable
    group, each on its own."""

    name = "select"
    requires = ("dep", "scores", "budget", "target", "round_to", "flops_before", "score_pass", "options",
                "latency_model", "gm")  # fmt: skip
    provides = ("kept", "indices", "plan")

    def __init__(self, units: Callable[[CompileState], Units] | None = None) -> None:
        self.units = units

    def run(self, state: CompileState) -> None:
        _choose(state, self.units(state) if self.units is not None else Units())
        if state.latency_model is None:  # else the refit stage chooses again, and warns
            _warn_few_channels(state.dep, state.kept)


def _choose(state: CompileState, units: Units = Units()) -> None:  # noqa: B008 - frozen, never mutated
    """``select`` under ``state.budget`` and ``state.target`` among ``units``; with aligned counts
    (``round_to=None``) that cannot reach the target, any count, with a warning. Writes ``kept``,
    ``indices`` and ``plan``."""
    o, groups = state.options, state.dep.groups
    exponent = state.score_pass.cost_exponent if o.cost_exponent is None else o.cost_exponent
    scores = {g: s.mean for g, s in state.scores.items() if units.allowed is None or g in units.allowed}
    with _absolute_target_hint(o.target_flops, state.flops_before):
        try:
            chosen = select(groups, scores, state.budget, state.target, min_channels=o.min_channels,
                            round_to=state.round_to, cost_exponent=exponent, bundles=units.bundles)  # fmt: skip
        except TargetError:
            if o.round_to is not None or all(r == 1 for r in state.round_to.values()):
                raise
            # aligned counts cannot reach the target: any count may (the target keeps its meaning)
            chosen = select(groups, scores, state.budget, state.target, min_channels=o.min_channels,
                            round_to=1, cost_exponent=exponent, bundles=units.bundles)  # fmt: skip
            warn(
                "the target cannot be reached with hardware-aligned channel counts (multiples of "
                f"{max(state.round_to.values())}); kept counts are not aligned, which the runtime may run "
                "slower. Pass round_to=1 to choose so from the start, or a higher target"
            )
    state.kept = chosen.kept
    state.indices = param_indices(groups, chosen.kept)  # the plan's and the rewrite's, computed once
    state.plan = build_plan(groups, chosen.kept, state.indices)


class Refit(_TableStage):
    """With ``target_latency``: the selected plan's structure (no compensation: latency does not depend on
    the weights) is rewritten, exported and timed interleaved with the original in the latency runtime;
    the latency model is refit through that measured point (``LatencyModel.refit``) and the selection
    made again under it, up to ``REFIT_ROUNDS`` times (each through the newest measured plan), until the
    model predicts the measured plan within ``REFIT_TOLERANCE``. Isolated ops' tables rank the channels but
    miss the whole model's scale (layout conversions, fused and memory-bound ops); a measured pruned model
    near the target fixes it there. Without a latency model it does nothing."""

    name = "refit"
    requires = ("gm", "dep", "scores", "budget", "target", "round_to", "kept", "indices", "plan", "example",
                "latency_model", "flops_before", "score_pass", "options")  # fmt: skip
    provides = ("kept", "indices", "plan", "budget", "latency_model")

    def run(self, state: CompileState) -> None:
        model, example = state.latency_model, state.example
        if model is None or not state.kept:
            return
        original = model.runtime.session(export_onnx(state.gm, example, table=self.ops)[0])
        for _ in range(REFIT_ROUNDS):
            pruned = RewritePass(state.dep.groups, state.kept, state.indices, table=self.ops)(state.gm)
            shape_propagate(pruned, example, count_flops=False)
            session = model.runtime.session(export_onnx(pruned, example, table=self.ops)[0])
            times = time_interleaved([original, session], example, min_runs=30, max_seconds=3.0)
            ratio = statistics.median(a / b for b, a in zip(times[0], times[1], strict=True))
            sizes = {g.id: g.size for g in state.dep.groups} | {g: len(k) for g, k in state.kept.items()}
            if abs(model.predict_ms(sizes) / model.full_ms - ratio) <= REFIT_TOLERANCE * ratio:
                break  # the model already predicts this plan
            refit = model.refit(sizes, ratio)
            if refit is model:
                break
            first = (state.kept, state.indices, state.plan, state.budget, state.latency_model)
            state.latency_model, state.budget = refit, refit.cost()
            try:
                _choose(state)
            except TargetError as exc:  # the measured model is the best estimate there is: keep its plan
                state.kept, state.indices, state.plan, state.budget, state.latency_model = first
                warn(
                    f"the latency target looks out of reach after timing the selected model ({ratio:.3f} of "
                    f"the original): {exc}. The model returned is the one timed"
                )
                break
            model = refit
        _warn_few_channels(state.dep, state.kept)


#: how many selected plans the refit stage times at most, and how close (relative) a prediction must be to
#: the measured ratio for the stage to stop early
REFIT_ROUNDS, REFIT_TOLERANCE = 3, 0.02


class Compensate(_TableStage):
    """Fold what the removed channels carried into the kept weights (``fxprune.passes.compensate``);
    ``source`` is the graph the rewrite slices (``gm`` itself when nothing is compensated)."""

    name = "compensate"
    requires = ("gm", "dep", "plan", "kept", "calib", "method", "device", "reduce", "progress", "options")
    provides = ("source", "compensation")

    def run(self, state: CompileState) -> None:
        state.source, state.compensation = state.gm, None
        if state.method == "none" or not state.kept:
            return
        assert state.calib is not None
        o = state.options
        with _autograd_errors(state.gm, f"compensate={state.method!r}"):
            state.source, state.compensation = compensate(
                state.gm, state.dep.groups, state.plan, state.calib, state.method, device=state.device,
                newton_options=dict(o.score_options), progress=state.progress, reduce=state.reduce,
                table=self.ops,
            )  # fmt: skip


class Rewrite(_TableStage):
    """The new, smaller GraphModule (``fxprune.passes.rewrite``); a copy when nothing is pruned."""

    name = "rewrite"
    requires = ("gm", "source", "dep", "kept", "indices")
    provides = ("pruned",)

    def run(self, state: CompileState) -> None:
        if not state.kept:
            state.pruned = copy_graph_module(state.gm)
            drop_metadata(state.pruned)  # as the rewrite does: measure writes fresh shapes and FLOPs
            return
        state.pruned = RewritePass(state.dep.groups, state.kept, state.indices, table=self.ops)(state.source)


class Measure(Stage[CompileState]):
    """One counted run of the pruned graph: its FLOPs, the shapes for the ONNX writer, the eager outputs
    verify compares with, and the output structure checked against the original's (``changed``)."""

    name = "measure"
    requires = ("gm", "pruned", "example")
    provides = ("eager", "flops_after", "changed")

    def run(self, state: CompileState) -> None:
        state.eager = shape_propagate(state.pruned, state.example)
        state.flops_after = graph_flops(state.pruned)
        state.changed = output_differences(state.gm.meta[META_OUTPUT], output_signature(state.eager))


class Verify(_TableStage):
    """With ``options.verify``: the output structure against the user's model itself (not only its trace),
    then ONNX Runtime against eager (``fxprune.verify.verify_onnx``)."""

    name = "verify"
    requires = (
        "gm",
        "pruned",
        "work",
        "example",
        "eager",
        "changed",
        "options",
        "latency_model",
        "dep",
        "kept",
    )
    provides = ("changed", "verification")

    def run(self, state: CompileState) -> None:
        o, example, changed = state.options, state.example, state.changed
        state.verification = None
        if o.verify and not changed:
            with torch.no_grad():
                changed = output_differences(
                    output_signature(state.work(*clones(example))), output_signature(state.eager)
                )
            state.changed = changed
        if o.verify and not changed:
            on_cpu = all(t.device.type == "cpu" for t in example)
            state.verification = verify_onnx(
                state.pruned, example, state.gm, rtol=o.rtol, latency_runs=o.latency_runs,
                latency_threads=o.latency_threads, provider=o.latency_provider,
                eager_outputs=state.eager if on_cpu else None, shapes_propagated=True, table=self.ops,
            )  # fmt: skip
            v, model = state.verification, state.latency_model
            if model is not None and v.latency is not None:  # the tables' prediction beside the measurement
                sizes = {g.id: g.size for g in state.dep.groups} | {g: len(k) for g, k in state.kept.items()}
                latency = dataclasses.replace(v.latency, predicted_ms=model.predict_ms(sizes))
                state.verification = dataclasses.replace(v, latency=latency)


class Result(Stage[CompileState]):
    """The ``CompileResult``; a changed output structure or a failed ONNX check is a ``VerificationError``
    carrying it."""

    name = "result"
    requires = (
        "work", "example", "gm", "pruned", "plan", "dep", "cost", "scores", "flops_before", "flops_after",
        "target", "verification", "changed", "score_pass", "compensation", "calib", "options", "latency_model",
    )  # fmt: skip
    provides = ("result",)

    def run(self, state: CompileState) -> None:
        result = CompileResult(
            graph_module=state.pruned,
            plan=state.plan,
            dependency=state.dep,
            cost=state.cost,
            scores=state.scores,
            flops_before=state.flops_before,
            flops_after=state.flops_after,
            params_before=count_params(state.work),
            params_after=count_params(state.pruned),
            target_flops=None if state.options.target_latency is not None else state.target,
            latency_model=state.latency_model,
            target_latency_ms=state.target if state.options.target_latency is not None else None,
            verification=state.verification,
            timings=state.timings,
            cpu_timings=state.cpu_timings,
            score=state.score_pass.name,
            compensation=state.compensation,
            calibration=state.calib,
            capture=state.gm.meta.get(META_CAPTURE),
        )
        state.result = result
        changed = state.changed
        if changed:
            raise VerificationError(
                "the compiled model does not return what the original returns: " + "; ".join(changed[:8])
                + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else "")
                + ". This is a bug in fxprune (the rewrite changed an output); please report it with the "
                "model. err.result holds the result for inspection",
                result=result,
            )  # fmt: skip
        v = state.verification
        if v is not None and not v.passed:
            message = _verification_message(result, state.gm, state.example, state.options.rtol)
            raise VerificationError(message, result=result)


def compile_pipeline(table: OpTable | None = None) -> Pipeline[CompileState]:
    """``fxprune.compile``'s pipeline; its stages that read op rules (trace expansions, dependency,
    compensation roles, rewrite attribute fixes, ONNX translations) use ``table`` (default: the default
    op table, ``fxprune.passes.op_table.DEFAULT_TABLE``)."""
    return Pipeline(
        (Prepare(), Options(), Calibrate(), Trace(table), Dependency(table), Cost(), Latency(table), Score(), Select(), Refit(table),
         Compensate(table), Rewrite(table), Measure(), Verify(table), Result()),
        INPUTS,
    )  # fmt: skip


#: ``fxprune.compile``
COMPILE: Pipeline[CompileState] = compile_pipeline()

#: ``dependency_graph`` and ``inspect``: the channel groups of a model, nothing pruned
ANALYSE: Pipeline[CompileState] = Pipeline((Prepare(), Trace(), Dependency()), INPUTS)


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
    #: the FLOPs selection aimed at (None when it aimed at ``target_latency_ms``)
    target_flops: float | None
    verification: Verification | None
    timings: dict[str, float] = field(default_factory=dict)
    score: str = "magnitude"
    compensation: Compensation | None = None
    calibration: Calibration | None = None
    #: CPU seconds of the process per stage (``timings`` is wall time)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    #: the measured latency tables selection ran under (``target_latency``), else None
    latency_model: LatencyModel | None = None
    #: the latency selection aimed at, in ms (``target_latency``), else None
    target_latency_ms: float | None = None
    #: how the model was captured: ``"symbolic_trace"`` (torch.fx) or ``"torch.export"``
    #: (``fxprune.capture.export_capture``, when symbolic tracing fails or ``capture="export"``); None from
    #: a capture stage of your own that does not say (``gm.meta[META_CAPTURE]``)
    capture: str | None = SYMBOLIC

    @property
    def predicted_latency_ms(self) -> float | None:
        """The latency model's prediction for the pruned model (ms), when selection ran under one."""
        if self.latency_model is None:
            return None
        sizes = {g.id: g.size for g in self.dependency.groups}
        sizes.update({g: len(k) for g, k in self.plan.kept.items()})
        return self.latency_model.predict_ms(sizes)

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


#: a group left with fewer than this many channels (having had more) gets a warning
FEW_CHANNELS = 4


def _same_on_every_rank(alignment: Alignment, reduce: Reduce | None) -> Alignment:
    """Rank 0's alignment on every process of a distributed compile (each measured its own; the plans must
    agree): a summing all-reduce of rank 0's numbers and zeros elsewhere."""
    if reduce is None:
        return alignment
    mine = process_rank() == 0
    t = torch.tensor([alignment.align, alignment.block] if mine else [0, 0], dtype=torch.float64)
    reduce(t)
    return Alignment(int(t[0]), int(t[1]), alignment.penalty)


@contextmanager
def _absolute_target_hint(target_flops: float | None, total: int) -> Iterator[None]:
    """An unreachable target above 1 was given as an absolute FLOPs count: say so, a fraction was likely
    meant (``target_flops=1.5`` is 1.5 FLOPs, not 150% or 1.5x smaller)."""
    try:
        yield
    except TargetError as exc:
        if target_flops is None or float(target_flops) <= 1.0:
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
    layers are near-bottlenecks, usually a sign of a too aggressive target. A group whose channels are
    units of several features (attention heads) counts its features."""

    def unit(g: Any) -> int:
        return min((s.repeat for s in g.sites if s.role == "out"), default=1)

    few = [
        g
        for g in dep.groups
        if g.id in kept and len(kept[g.id]) * unit(g) < min(FEW_CHANNELS, g.size * unit(g))
    ]
    if not few:
        return

    def name(g: Any) -> str:
        mods = list(dict.fromkeys(s.param.rpartition(".")[0] for s in g.sites if s.role == "out")) or list(
            g.nodes
        )
        where = ", ".join(mods[:2]) + (", ..." if len(mods) > 2 else "")
        return f"group {g.id} ({where}: {g.size} -> {len(kept[g.id])})"

    warn(
        f"the target leaves {len(few)} channel group(s) with fewer than {FEW_CHANNELS} channels: "
        + "; ".join(name(g) for g in few[:6]) + (f"; and {len(few) - 6} more" if len(few) > 6 else "")
        + ". Such layers lose most of what they carry; raise target_flops or pass "
        f"min_channels={FEW_CHANNELS} to keep at least that many"
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
        f"FLOPs   {r.flops_before:>16,} -> {r.flops_after:>16,}  ({r.flops_ratio:.4f}"
        + (
            f"; requested {r.target_flops / max(r.flops_before, 1):.4f})"
            if r.target_flops is not None
            else ")"
        ),
        f"params  {r.params_before:>16,} -> {r.params_after:>16,}  ({r.params_ratio:.4f})",
    ]
    if r.capture not in (SYMBOLIC, None):
        lines.append(f"capture {r.capture} (torch.fx symbolic tracing could not capture the model)")
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
        if v.latency is not None:
            lines.append(f"latency {v.latency.summary()}")
    if r.latency_model is not None:
        m = r.latency_model
        lines.append(
            f"latency target {r.target_latency_ms:.3f} ms, predicted {r.predicted_latency_ms:.3f} ms "
            f"({r.predicted_latency_ms / m.full_ms:.3f} of the original); {m.summary()}"
        )
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
