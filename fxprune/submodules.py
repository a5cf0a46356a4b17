"""``fxprune.compile(model, example, target, submodules=[...])``: prune traceable parts of a larger model.

A detector's pre- and post-processing is data-dependent (image resizing, anchor decoding, NMS) and cannot
be traced, but its backbone can. ``submodules=`` names the parts to compile; the rest runs eagerly as
written. ``SUBMODULES`` (``submodules_pipeline(inner)``) is the configuration it runs, over
``SubmoduleState`` (a ``CompileState`` with the fields below):

==============  ============================================  ============================================
stage           requires                                      provides
==============  ============================================  ============================================
prepare         model, example_input                          work (a private eval copy), example
options         options                                       method, device, reduce, progress
capture         work, example, options                        calls, calibration, signature_before,
                                                              model_flops_before
submodules      work, calls, calibration, options             parts (a ``CompileResult`` per path: the
                                                              inner pipeline, ``COMPILE`` by default, run
                                                              on each submodule alone)
assemble        work, parts                                   assembled (a copy of ``work`` holding the
                                                              pruned GraphModules)
check_model     assembled, example, signature_before          model_flops_after, model_changed
result          every field above                             model_result (a ``SubmodulesResult``)
==============  ============================================  ============================================

How the parts are found: the capture stage runs the private copy once on the example with forward hooks
(``with_kwargs=True``) on each named submodule and records the arguments of each call; each calibration
batch (``data=``, batches of the *whole* model's input) is run the same way and the submodule's arguments
collected as its own calibration batches (held in memory; ``max_batches=`` bounds them). Each submodule is
then traced alone on its recorded call, so its output structure (an ``OrderedDict`` of feature maps for
torchvision's ``BackboneWithFPN``) and the channels of every output are those the graph output pins: the
eager code around it needs no change.

Several submodules are compiled **each in turn at the target** (each keeps about ``target_flops`` of its
own FLOPs, hence of their sum too), not by one global selection: they are separate graphs joined by
untraceable code, each with its own example call, and fxprune's cost model and channel groups are those of
one graph; a global choice would also rank scores of different graphs against each other, which the
label-free output-matching scores of two networks do not support.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

import torch

from fxprune.data import PrunePlan, Signature, output_differences, output_signature
from fxprune.errors import FxpruneError, InputError, TargetError, VerificationError
from fxprune.inputs import check_runs, clones, count_flops, count_params
from fxprune.pipeline import UNSET, Pipeline, Stage
from fxprune.stages import COMPILE, INPUTS, CompileResult, CompileState, Options, Prepare
from fxprune.trace import copy_module
from fxprune.verify import Verification

__all__ = [
    "SUBMODULES",
    "Assemble",
    "Capture",
    "CheckModel",
    "CompileEach",
    "SubmoduleState",
    "SubmodulesResult",
    "check_paths",
    "submodules_pipeline",
]

#: positional tensor arguments of one call of a submodule
Call = tuple[torch.Tensor, ...]


def check_paths(submodules: Any) -> tuple[str, ...]:
    """``submodules=`` as a tuple of qualified names: one name (a ``str``) or a non-empty sequence of them.

    Raises:
        InputError: not a str or a sequence of str, an empty sequence or name, a name given twice, or one
            name inside another (``"backbone"`` and ``"backbone.body"``: the outer one already compiles the
            inner one).
    """
    paths = (submodules,) if isinstance(submodules, str) else submodules
    if not isinstance(paths, Sequence) or not paths or not all(isinstance(p, str) for p in paths):
        raise InputError(
            f"submodules= must be a submodule's qualified name or a non-empty list of them, got {submodules!r}; "
            "pass e.g. submodules='backbone' (names as in model.named_modules())"
        )
    if "" in paths:
        raise InputError(
            "submodules= names the model itself (''); drop submodules= to compile the whole model, or name "
            "its traceable parts, e.g. submodules='backbone'"
        )
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if a == b:
                raise InputError(f"submodules= names '{a}' twice; give each submodule once")
            outer, inner = (a, b) if len(a) < len(b) else (b, a)
            if inner.startswith(outer + "."):
                raise InputError(
                    f"submodules= names '{inner}', which is inside '{outer}' (also named): compiling "
                    f"'{outer}' prunes '{inner}' too; give one of them"
                )
    return tuple(paths)


@dataclass
class SubmodulesResult:
    """What ``compile(..., submodules=...)`` returns.

    ``model`` is a copy of the user's model (eval mode) in which each compiled submodule is replaced by its
    pruned ``GraphModule`` (the same object as ``parts[path].graph_module``): called as the original,
    returning the same structure. The user's model is untouched.
    """

    model: torch.nn.Module
    #: the compile of each submodule, by qualified name, in the order compiled
    parts: dict[str, CompileResult]
    #: FLOPs of one run of the whole model on the example, before and after (torch's ``FlopCounterMode``)
    model_flops_before: int
    model_flops_after: int
    params_before: int
    params_after: int
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)

    @property
    def flops_before(self) -> int:
        """The compiled submodules' FLOPs on their example calls (what ``target_flops`` is a fraction of)."""
        return sum(r.flops_before for r in self.parts.values())

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.parts.values())

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def model_flops_ratio(self) -> float:
        return self.model_flops_after / self.model_flops_before if self.model_flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def verification(self) -> dict[str, Verification | None]:
        """Each submodule's ONNX Runtime check (None where ``verify=False``)."""
        return {p: r.verification for p, r in self.parts.items()}

    @property
    def plan(self) -> PrunePlan:
        """The parts' plans as one plan over the whole model: parameter and module names prefixed with
        their submodule's path (``fxprune.masked_model(model, result.plan)`` is the whole model's oracle);
        group ids are renumbered part after part (each part's ids shifted past the previous parts')."""
        kept: dict[int, tuple[int, ...]] = {}
        sizes: dict[int, int] = {}
        params: dict[str, Mapping[int, tuple[int, ...]]] = {}
        inputs: dict[str, tuple[int, tuple[int, ...]]] = {}
        modules: dict[str, Mapping[str, tuple[int, ...]]] = {}
        stats: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset = 0
        for path, r in self.parts.items():
            p = r.plan
            kept.update({g + offset: k for g, k in p.kept.items()})
            sizes.update({g + offset: n for g, n in p.group_sizes.items()})
            params.update({f"{path}.{k}": v for k, v in p.params.items()})
            inputs.update({f"{path}.{k}": v for k, v in p.inputs.items()})
            modules.update({f"{path}.{k}": v for k, v in p.modules.items()})
            stats.update({f"{path}.{k}": v for k, v in p.stats.items()})
            offset += max(p.group_sizes, default=-1) + 1
        return PrunePlan(kept, sizes, params, inputs, modules, stats)

    @property
    def report(self) -> str:
        lines = [
            "# fxprune report (submodules)",
            f"model FLOPs {self.model_flops_before:>16,} -> {self.model_flops_after:>16,}  "
            f"({self.model_flops_ratio:.4f})",
            f"compiled    {self.flops_before:>16,} -> {self.flops_after:>16,}  ({self.flops_ratio:.4f}) "
            f"in {', '.join(self.parts)}",
            f"params      {self.params_before:>16,} -> {self.params_after:>16,}  ({self.params_ratio:.4f})",
        ]
        for path, r in self.parts.items():
            lines += ["", f"## submodule '{path}'", r.report]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"SubmodulesResult({', '.join(self.parts)}: flops {self.flops_before:,} -> {self.flops_after:,} "
            f"({self.flops_ratio:.3f}); model flops {self.model_flops_before:,} -> {self.model_flops_after:,} "
            f"({self.model_flops_ratio:.3f}))"
        )


@dataclass
class SubmoduleState(CompileState):
    """``CompileState`` with the fields of the submodule stages (``UNSET`` until provided)."""

    calls: dict[str, Call] = UNSET
    calibration: dict[str, list[Call]] | None = UNSET
    signature_before: Signature = UNSET
    model_flops_before: int = UNSET
    parts: dict[str, CompileResult] = UNSET
    assembled: torch.nn.Module = UNSET
    model_flops_after: int = UNSET
    model_changed: list[str] = UNSET
    model_result: SubmodulesResult = UNSET


def _describe(call: Call) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in call)


def _signature(call: Call) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    return tuple((tuple(t.shape), t.dtype) for t in call)


@contextmanager
def _recording(model: torch.nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list[Call]]]:
    """Forward hooks (``with_kwargs=True``) on each submodule recording the arguments of every call, as
    detached copies; refuses keyword and non-tensor arguments, naming the submodule and the fix."""
    calls: dict[str, list[Call]] = {p: [] for p in paths}

    def hook_for(path: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            parent = path.rpartition(".")[0]
            fix = (
                f"name the submodule that calls it (e.g. '{parent}'), or one called with tensors"
                if parent
                else "name a submodule called with tensors"
            )
            if kwargs:
                raise InputError(
                    f"submodule '{path}' ({type(module).__name__}) is called with keyword arguments "
                    f"({', '.join(kwargs)}); fxprune compiles a submodule from positional tensor arguments: {fix}"
                )
            for i, a in enumerate(args):
                if not isinstance(a, torch.Tensor):
                    raise InputError(
                        f"submodule '{path}' ({type(module).__name__}) is called with a {type(a).__name__} as "
                        f"argument {i}; fxprune compiles a submodule from positional tensor arguments: {fix}"
                    )
            calls[path].append(tuple(a.detach().clone() for a in args))

        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p), with_kwargs=True) for p in paths]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _locate(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        head, found = "", model
        for part in path.split("."):
            child = getattr(found, "_modules", {}).get(part)
            if child is None:
                break
            head, found = f"{head}.{part}".lstrip("."), child
        children = ", ".join(n for n, _ in found.named_children()) or "none"
        where = f"'{head}' ({type(found).__name__})" if head else f"the model ({type(found).__name__})"
        raise InputError(
            f"submodules= names '{path}', which is not a submodule of {type(model).__name__}: {where} has no "
            f"child '{path.removeprefix(head).lstrip('.').split('.')[0]}' (its children: {children}); "
            "pass names as in model.named_modules()"
        ) from None


def _batch_inputs(i: int, item: Any, n_inputs: int) -> tuple[torch.Tensor, ...]:
    """One calibration batch of the whole model, as the positional arguments of a call."""
    items = (item,) if isinstance(item, torch.Tensor) else item
    if (
        not isinstance(items, (tuple, list))
        or len(items) != n_inputs
        or not all(isinstance(t, torch.Tensor) for t in items)
    ):
        raise InputError(
            f"data[{i}] is a {type(item).__name__}; with submodules= each batch is an input of the whole model "
            f"like example_input ({n_inputs} tensor(s)); targets are not used: each submodule is scored on its "
            "own outputs (label-free output matching)"
        )
    return tuple(t.detach().clone() for t in items)


class Capture(Stage[SubmoduleState]):
    """Each named submodule's call on the example (its example input) and on every calibration batch (its
    calibration data), recorded by forward hooks while the private copy runs; the whole model's output
    signature and FLOPs on the example.

    Raises ``InputError`` naming the submodule and the fix for: (1) a name that is not a submodule, (2) a
    submodule the model never calls on the example, (3) one called with keyword or non-tensor arguments,
    (4) one called several times with different shapes or dtypes (a compiled graph is specialised to one
    call's shapes; calls with the same shapes share it), (5) a calibration batch whose call differs from the
    example's call other than in the batch size, (6) ``loss_fn=`` (the submodules are scored label-free on
    their own outputs)."""

    name = "capture"
    requires = ("work", "example", "options")
    provides = ("calls", "calibration", "signature_before", "model_flops_before")

    def run(self, state: SubmoduleState) -> None:
        o, work, example = state.options, state.work, state.example
        paths = o.submodules
        if o.loss_fn is not None:
            raise InputError(
                "loss_fn= applies to the whole model's output, but with submodules= each submodule is "
                "scored on its own outputs (label-free output matching); drop loss_fn"
            )
        for p in paths:
            _locate(work, p)
        outputs: list[Any] = []
        root = work.register_forward_hook(_keep_output(outputs))
        try:
            with _recording(work, paths) as recorded:
                try:
                    state.model_flops_before = check_runs(work, example)
                except InputError as exc:
                    if isinstance(exc.__cause__, InputError):  # a submodule's call was refused
                        raise exc.__cause__ from None
                    raise
        finally:
            root.remove()
        state.signature_before = output_signature(outputs[0])
        calls: dict[str, Call] = {}
        for p in paths:
            seen = recorded[p]
            if not seen:
                raise InputError(
                    f"submodule '{p}' ({type(work.get_submodule(p)).__name__}) is never called when the model "
                    "runs on example_input, so it has no example input to compile from; name a submodule "
                    "the model's forward calls"
                )
            shapes = dict.fromkeys(_signature(c) for c in seen)
            if len(shapes) > 1:
                shown = "; ".join(
                    _describe(c) for c in dict(zip(map(_signature, seen), seen, strict=True)).values()
                )
                raise InputError(
                    f"submodule '{p}' is called {len(seen)} times on example_input with different shapes "
                    f"({shown}); a compiled graph is specialised to one call's shapes: name a submodule called "
                    "once, or with one shape (e.g. the parent that makes these calls)"
                )
            calls[p] = seen[0]
        state.calls = calls
        state.calibration = None if o.data is None else self._calibration(work, example, calls, o)

    @staticmethod
    def _calibration(
        work: torch.nn.Module, example: Call, calls: Mapping[str, Call], o: Any
    ) -> dict[str, list[Call]]:
        data = [o.data] if isinstance(o.data, torch.Tensor) else o.data
        if not isinstance(data, Iterable):
            raise InputError(
                f"data must be an iterable of batches (a list or a DataLoader), got {type(data).__name__}"
            )
        out: dict[str, list[Call]] = {p: [] for p in calls}
        with _recording(work, list(calls)) as recorded:
            for i, item in enumerate(islice(data, o.max_batches)):
                inputs = _batch_inputs(i, item, len(example))
                try:
                    with torch.no_grad():
                        work(*inputs)
                except InputError:
                    raise
                except Exception as exc:
                    raise InputError(
                        f"data[{i}] does not run through the model: {type(exc).__name__}: {exc}; every batch "
                        "must be a model input like example_input"
                    ) from exc
                for p, seen in recorded.items():
                    want = calls[p]
                    for c in seen:
                        if len(c) != len(want) or any(
                            t.dtype != e.dtype or t.shape[1:] != e.shape[1:]
                            for t, e in zip(c, want, strict=True)
                        ):
                            raise InputError(
                                f"data[{i}] calls submodule '{p}' with {_describe(c)}, but example_input calls "
                                f"it with {_describe(want)}; its calibration calls must match the example's "
                                "except for the batch size (dim 0): give calibration inputs of the example's "
                                "size (a detector resizes and pads images, so images of another aspect ratio "
                                "reach the backbone at another size)"
                            )
                    out[p] += seen
                    seen.clear()
        if not any(out.values()):
            raise InputError("data is empty; pass at least one batch, or data=None to score on example_input")
        for p, seen in out.items():
            if not seen:
                raise InputError(
                    f"no batch of data calls submodule '{p}'; pass inputs on which the model calls it"
                )
        return out


class CompileEach(Stage[SubmoduleState]):
    """Each submodule compiled alone by ``pipeline`` (default ``fxprune.stages.COMPILE``), in turn, on its
    recorded example call, with its recorded calibration calls as ``data``.

    Each part aims at ``target_flops`` of its own FLOPs when it is a fraction; an absolute FLOPs count
    (> 1) with several submodules is read as that count over their sum (the fraction count / sum for each).
    ``scores=`` with submodules is a mapping from each path to the ``.scores`` of an earlier compile of it
    (``result.parts[path].scores``). An error raised compiling a part keeps its type, with a note naming
    the submodule."""

    name = "submodules"
    requires = ("work", "calls", "calibration", "options")
    provides = ("parts",)

    def __init__(self, pipeline: Pipeline[CompileState] | None = None) -> None:
        self.pipeline = COMPILE if pipeline is None else pipeline

    def run(self, state: SubmoduleState) -> None:
        o, work, calls = state.options, state.work, state.calls
        target = o.target_flops
        if target is not None and float(target) > 1 and len(calls) > 1:
            total = sum(count_flops(work.get_submodule(p), clones(c)) for p, c in calls.items())
            target = float(target) / total
            if target > 1:
                raise TargetError(
                    f"target_flops={o.target_flops!r} is above the compiled submodules' total of {total:,} "
                    "FLOPs; pass a fraction in (0, 1] or a count below that total",
                    total_flops=total,
                )
        if o.scores is not None and not (
            isinstance(o.scores, Mapping)
            and set(o.scores) <= set(calls)
            and all(isinstance(k, str) for k in o.scores)
        ):
            raise InputError(
                "with submodules=, scores= maps each submodule's name to the .scores of an earlier compile of it "
                "(result.parts[name].scores); got keys "
                f"{list(o.scores)[:4] if isinstance(o.scores, Mapping) else type(o.scores).__name__}"
            )
        parts: dict[str, CompileResult] = {}
        for p, call in calls.items():
            scores = None if o.scores is None else cast(Mapping[str, Any], o.scores).get(p)
            data = None if state.calibration is None else state.calibration[p]
            options = dataclasses.replace(o, submodules=(), target_flops=target, data=data, scores=scores)
            try:
                inner = self.pipeline.run(
                    CompileState(model=work.get_submodule(p), example_input=call, options=options)
                )
            except FxpruneError as exc:
                exc.add_note(
                    f"fxprune: raised compiling submodule '{p}' ({type(work.get_submodule(p)).__name__}) on its "
                    f"call with {_describe(call)}"
                )
                raise
            parts[p] = inner.result
        state.parts = parts


class Assemble(Stage[SubmoduleState]):
    """A copy of the private model in which each compiled submodule is its pruned GraphModule (the copy
    shares nothing else with ``work``; the replaced submodules are not copied)."""

    name = "assemble"
    requires = ("work", "parts")
    provides = ("assembled",)

    def run(self, state: SubmoduleState) -> None:
        work = state.work
        memo: dict[int, Any] = {id(work.get_submodule(p)): r.graph_module for p, r in state.parts.items()}
        state.assembled = copy_module(work, memo)


class CheckModel(Stage[SubmoduleState]):
    """One counted run of the assembled model on the example: its FLOPs, and the eager check that it
    returns what the original returns: the same containers, keys, dtypes and tensor ranks (a detector's
    number of detections depends on the values, so sizes are not compared)."""

    name = "check_model"
    requires = ("assembled", "example", "signature_before")
    provides = ("model_flops_after", "model_changed")

    def run(self, state: SubmoduleState) -> None:
        outputs: list[Any] = []
        root = state.assembled.register_forward_hook(_keep_output(outputs))
        try:
            state.model_flops_after = check_runs(state.assembled, state.example)
        finally:
            root.remove()
        state.model_changed = output_differences(
            _ranks(state.signature_before), _ranks(output_signature(outputs[0]))
        )


def _keep_output(outputs: list[Any]) -> Any:
    """A forward hook appending the module's output to ``outputs`` (and returning None: the output stays)."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        outputs.append(output)

    return hook


def _ranks(sig: Signature) -> Signature:
    """``sig`` with each tensor's shape reduced to its rank (sizes that depend on the values are dropped)."""
    if sig[0] == "tensor":
        return ("tensor", (-1,) * len(sig[1]), sig[2])
    if sig[0] in ("dict", "seq", "fields"):
        return (sig[0], sig[1], tuple((k, _ranks(v)) for k, v in sig[2]))
    return sig


class SubmodulesResultStage(Stage[SubmoduleState]):
    """The ``SubmodulesResult``; a whole model that no longer returns what the original returns is a
    ``VerificationError`` carrying it."""

    name = "result"
    requires = ("work", "assembled", "parts", "model_flops_before", "model_flops_after", "model_changed")
    provides = ("model_result",)

    def run(self, state: SubmoduleState) -> None:
        result = SubmodulesResult(
            model=state.assembled,
            parts=state.parts,
            model_flops_before=state.model_flops_before,
            model_flops_after=state.model_flops_after,
            params_before=count_params(state.work),
            params_after=count_params(state.assembled),
            timings=state.timings,
            cpu_timings=state.cpu_timings,
        )
        state.model_result = result
        if state.model_changed:
            raise VerificationError(
                "the model with its compiled submodules does not return what the original returns: "
                + "; ".join(state.model_changed[:8])
                + ". This is a bug in fxprune; please report it with the model. err.result holds the result",
                result=result,
            )


def submodules_pipeline(inner: Pipeline[CompileState] | None = None) -> Pipeline[SubmoduleState]:
    """``compile(..., submodules=...)``'s pipeline; each submodule is compiled by ``inner`` (default
    ``fxprune.stages.COMPILE``; ``compile(..., pipeline=)`` passes its own)."""
    return Pipeline(
        (
            Prepare(),
            Options(),
            Capture(),
            CompileEach(inner),
            Assemble(),
            CheckModel(),
            SubmodulesResultStage(),
        ),
        INPUTS,
    )


#: ``compile(..., submodules=...)``
SUBMODULES: Pipeline[SubmoduleState] = submodules_pipeline()
