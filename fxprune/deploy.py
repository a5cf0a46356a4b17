"""Deployable artefacts: ``save`` a compile result, ``load`` it back, ``apply_plan`` to a fresh model.

A saved directory holds::

    plan.json          the PrunePlan (kept channel indices per group, parameter and module) + example shapes
    state_dict.pt      the pruned weights (a plain state_dict: loads with torch.load(weights_only=True))
    code.py            the pruned GraphModule's generated forward(), for people and diffs
    graph_module.pt    the whole pruned GraphModule, pickled (load only files you trust)
    summary.json       FLOPs, params, verification and timings of the compile
    model.onnx         the pruned model exported to ONNX (opset 18), when ``onnx=True``

``load(dir, model=fresh)`` is the safe path: it re-traces ``fresh`` (same architecture as the model that was
compiled), re-applies the plan, and loads ``state_dict.pt`` with ``weights_only=True``. ``load(dir)`` without
a model unpickles ``graph_module.pt``. ``apply_plan`` is also how fine-tuned weights of a pruned model are
loaded into a new process: ``apply_plan(Arch(), plan).load_state_dict(torch.load(...))``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxprune.data import META_VALUE, PrunePlan
from fxprune.errors import InputError, VerificationError
from fxprune.passes.plan import build_plan, param_indices
from fxprune.pipeline import Pipeline, Stage
from fxprune.stages import ANALYSE, CompileOptions, CompileResult, CompileState, Measure, Rewrite

__all__ = [
    "APPLY_PLAN",
    "PLAN_FORMAT",
    "CheckOutputs",
    "UsePlan",
    "apply_plan",
    "load",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "save",
]

PLAN_FORMAT = "fxprune.plan/1"

_PathLike = str | os.PathLike[str]


def _ints(xs: Sequence[int]) -> list[int]:
    return [int(x) for x in xs]


def plan_to_dict(plan: PrunePlan, example_inputs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """JSON-ready form of a plan (group ids and dims become string keys, as JSON requires)."""
    return {
        "format": PLAN_FORMAT,
        "example_inputs": [dict(e) for e in example_inputs],
        "group_sizes": {str(g): int(n) for g, n in plan.group_sizes.items()},
        "kept": {str(g): _ints(k) for g, k in plan.kept.items()},
        "params": {p: {str(d): _ints(k) for d, k in dims.items()} for p, dims in plan.params.items()},
        "inputs": {p: [int(d), _ints(k)] for p, (d, k) in plan.inputs.items()},
        "modules": {m: {r: _ints(k) for r, k in e.items()} for m, e in plan.modules.items()},
        "stats": {p: [int(d), _ints(k)] for p, (d, k) in plan.stats.items()},
    }


def plan_from_dict(d: Mapping[str, Any]) -> PrunePlan:
    """Inverse of ``plan_to_dict``; raises ``InputError`` for anything that is not a saved plan."""
    if d.get("format") != PLAN_FORMAT:
        raise InputError(f"not an fxprune plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
    try:
        return PrunePlan(
            kept={int(g): tuple(k) for g, k in d["kept"].items()},
            group_sizes={int(g): int(n) for g, n in d["group_sizes"].items()},
            params={p: {int(dim): tuple(k) for dim, k in dims.items()} for p, dims in d["params"].items()},
            inputs={p: (int(v[0]), tuple(v[1])) for p, v in d["inputs"].items()},
            modules={m: {r: tuple(k) for r, k in e.items()} for m, e in d["modules"].items()},
            stats={p: (int(v[0]), tuple(v[1])) for p, v in d.get("stats", {}).items()},
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"malformed fxprune plan: {type(exc).__name__}: {exc}") from exc


def _plan_file(path: _PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "plan.json"
    if not p.is_file():
        raise InputError(f"no saved plan at '{p}'; pass a directory written by fxprune.save or its plan.json")
    return p


def load_plan(path: _PathLike) -> tuple[PrunePlan, list[dict[str, Any]]]:
    """The plan and the example input specs (shape, dtype) saved in a directory or a plan.json."""
    p = _plan_file(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"'{p}' is not valid JSON: {exc}") from exc
    return plan_from_dict(d), list(d.get("example_inputs", []))


def _example_specs(gm: fx.GraphModule) -> list[dict[str, Any]]:
    specs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get(META_VALUE)
            if v is not None and hasattr(v, "shape"):
                specs.append({"name": n.name, "shape": list(v.shape), "dtype": v.dtype})
    return specs


def _example_from_specs(specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        dtype = getattr(torch, str(s["dtype"]))
        if dtype.is_floating_point:
            out.append(torch.randn(list(s["shape"]), generator=g).to(dtype))
        else:
            out.append(torch.zeros(list(s["shape"]), dtype=dtype))
    return tuple(out)


def save(result: Any, directory: _PathLike, *, onnx: bool = True, opset: int = 18) -> Path:
    """Write a ``CompileResult`` to ``directory`` (created if needed); returns its path. See module doc."""
    from fxprune.verify import export_onnx

    if not isinstance(result, CompileResult):
        raise InputError(f"save expects the CompileResult of fxprune.compile, got {type(result).__name__}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    gm = result.graph_module
    specs = _example_specs(gm)
    (out / "plan.json").write_text(json.dumps(plan_to_dict(result.plan, specs)), encoding="utf-8")
    torch.save(gm.state_dict(), out / "state_dict.pt")
    (out / "code.py").write_text(gm.code, encoding="utf-8")
    torch.save(gm, out / "graph_module.pt")
    v = result.verification
    summary = {
        "flops_before": result.flops_before,
        "flops_after": result.flops_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "target_flops": result.target_flops,
        "removed_channels": result.plan.removed_channels,
        "verification": None if v is None else {k: getattr(v, k) for k in v.__dataclass_fields__},
        "timings": result.timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    if onnx:
        # the exporter whose model verification checked (fxprune's writer unless it fell back)
        exporter = (
            v.exporter if v is not None and v.exporter in ("fxprune", "torchscript", "dynamo") else "auto"
        )
        blob, _ = export_onnx(gm.cpu(), _example_from_specs(specs), opset, exporter=exporter)
        (out / "model.onnx").write_bytes(blob)
    return out


def apply_plan(
    model: torch.nn.Module,
    plan: PrunePlan | _PathLike,
    example_input: Any = None,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Re-apply a plan to a fresh instance of the compiled architecture: same structure, its own weights.

    ``plan`` is a ``PrunePlan`` or a directory / plan.json written by ``save`` (which also supplies the
    example input shapes). The model is traced and analysed again; the groups must match the plan's
    exactly (ids, sizes and every parameter slice), otherwise ``InputError`` says where they differ.
    The weights of ``model`` are sliced (not re-selected), so ``load_state_dict`` of a pruned model's
    state_dict (e.g. after fine-tuning) then restores it. ``model`` itself is not changed.
    """
    specs: list[dict[str, Any]] = []
    if not isinstance(plan, PrunePlan):
        plan, specs = load_plan(plan)
    if example_input is None:
        if not specs:
            raise InputError(
                "apply_plan needs example_input (a tensor the model accepts) when the plan has no saved shapes"
            )
        example_input = _example_from_specs(specs)
    options = CompileOptions(leaf_modules=leaf_modules, concrete_args=concrete_args)
    state = CompileState(model=model, example_input=example_input, options=options)
    with warnings.catch_warnings():  # a fresh instance is usually in training mode; that is expected here
        warnings.filterwarnings("ignore", message="model is in training mode")
        return APPLY_PLAN.replace("plan", UsePlan(plan)).run(state).pruned


class UsePlan(Stage[CompileState]):
    """The selection stage of ``apply_plan``: a given plan instead of scores and a budget, checked against
    this model's groups (ids, sizes, pinned groups and every parameter slice; ``InputError`` says where
    they differ)."""

    name = "plan"
    requires = ("gm", "dep")
    provides = ("kept", "indices", "plan", "source")

    def __init__(self, plan: PrunePlan | None = None) -> None:
        self.given = plan

    def run(self, state: CompileState) -> None:
        plan, dep = self.given, state.dep
        if plan is None:
            raise InputError("UsePlan needs a plan: UsePlan(plan)")
        here = {g.id: g.size for g in dep.groups}
        if dict(plan.group_sizes) != here:
            diff = [
                f"group {g}: {here.get(g)} channels here, {plan.group_sizes.get(g)} in the plan"
                for g in sorted(set(here) | set(plan.group_sizes))
                if here.get(g) != plan.group_sizes.get(g)
            ]
            raise InputError(
                f"plan does not match this model's channel groups ({len(here)} here, {len(plan.group_sizes)} "
                f"in the plan): {'; '.join(diff[:3])}; pass a fresh instance of the architecture that was compiled"
            )
        pinned = {g.id: g.pinned for g in dep.groups if not g.prunable}
        for gid, channels in plan.kept.items():
            if any(not 0 <= i < here[gid] for i in channels) or list(channels) != sorted(set(channels)):
                raise InputError(f"plan keeps invalid channel indices for group {gid} (size {here[gid]})")
            if gid in pinned and len(channels) < here[gid]:
                raise InputError(
                    f"plan prunes group {gid}, which is pinned in this model ({'; '.join(pinned[gid][:2])}); "
                    "pass the plan of a compile of this architecture, unedited"
                )
        kept = dict(plan.kept)
        indices = param_indices(dep.groups, kept)
        rebuilt = build_plan(dep.groups, kept, indices)
        if {p: dict(d) for p, d in rebuilt.params.items()} != {p: dict(d) for p, d in plan.params.items()}:
            bad = sorted(set(rebuilt.params) ^ set(plan.params)) or sorted(
                p for p in rebuilt.params if dict(rebuilt.params[p]) != dict(plan.params[p])
            )
            raise InputError(
                f"plan slices parameters differently from this model (first: {bad[:3]}); "
                "pass a fresh instance of the architecture that was compiled"
            )
        state.kept, state.indices, state.plan, state.source = kept, indices, plan, state.gm


class CheckOutputs(Stage[CompileState]):
    """The planned model must return what the original returns (structure, shapes, dtypes)."""

    name = "check_outputs"
    requires = ("changed",)
    provides = ()

    def run(self, state: CompileState) -> None:
        if state.changed:
            raise VerificationError(
                "the planned model does not return what the original returns: " + "; ".join(state.changed[:8])
            )


#: ``apply_plan``: analyse the fresh model, take the plan (its ``UsePlan`` stage holds the plan), rewrite,
#: check the outputs
APPLY_PLAN: Pipeline[CompileState] = Pipeline(
    (*ANALYSE.stages, UsePlan(), Rewrite(), Measure(), CheckOutputs()), ANALYSE.inputs
)


def _add_missing_biases(gm: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give conv/linear modules the bias a saved state has and they lack (bias folding adds biases)."""
    have = set(gm.state_dict())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if key in have or leaf != "bias":
            continue
        try:
            m = gm.get_submodule(owner)
        except AttributeError:
            continue
        if getattr(m, "bias", 0) is None:
            m.bias = torch.nn.Parameter(torch.zeros_like(value))


def load(
    directory: _PathLike,
    model: torch.nn.Module | None = None,
    example_input: Any = None,
    **trace_options: Any,
) -> fx.GraphModule:
    """Load a directory written by ``save``.

    With ``model`` (a fresh instance of the compiled architecture): ``apply_plan`` + the saved weights
    (``torch.load(weights_only=True)``: no code from the directory runs). Without: unpickle the saved
    GraphModule (only for directories you trust). Either way the result is in eval mode.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"'{d}' is not a directory written by fxprune.save")
    if model is None:
        p = d / "graph_module.pt"
        if not p.is_file():
            raise InputError(f"'{p}' is missing; pass model= (a fresh instance) to rebuild from plan.json")
        gm = torch.load(p, weights_only=False)
        if not isinstance(gm, torch.nn.Module):
            raise InputError(f"'{p}' does not hold a module")
        return gm.eval()  # type: ignore[return-value]
    gm = apply_plan(model, d, example_input, **trace_options)
    p = d / "state_dict.pt"
    if not p.is_file():
        raise InputError(f"'{p}' is missing; the directory was not written by fxprune.save")
    state = torch.load(p, weights_only=True, map_location="cpu")
    _add_missing_biases(gm, state)
    try:
        gm.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"saved weights do not fit the re-applied plan: {str(exc).splitlines()[0]}") from exc
    return gm.eval()
