"""Stage 6: verification. ONNX export + ONNX Runtime vs eager, latency, and the masked-equivalence oracle."""

from __future__ import annotations

import copy
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxprune.data import PrunePlan, flatten_structure
from fxprune.errors import ExportError, InputError
from fxprune.onnx_writer import Unsupported, write_onnx
from fxprune.passes.family import OpTable
from fxprune.trace import detached_caches, fold_parametrizations, is_container_call, mha_slow_path

__all__ = ["Verification", "export_onnx", "flatten_outputs", "masked_model", "ort_session", "verify_onnx"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """ONNX Runtime against eager on the example input.

    ``max_abs_error`` is the largest |ORT - eager| over all outputs; ``max_rel_error`` divides it by
    max |eager output|. ``passed`` is ``max_abs_error <= rtol * max|output|`` (``rtol`` recorded).
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    exporter: str
    opset: int
    ort_ms_before: float | None
    ort_ms_after: float | None
    error: str | None = None


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in ``fxprune.data.flatten_structure`` order."""
    return flatten_structure(out, torch.Tensor)


def export_onnx(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    opset: int = 18,
    exporter: str = "auto",
    *,
    table: OpTable | None = None,
) -> tuple[bytes, str]:
    """``model`` as a self-contained ONNX model, and the name of the exporter that wrote it.

    ``exporter="auto"``: a GraphModule whose every node ``fxprune.onnx_writer`` translates is written by it
    (``"fxprune"``, opset 18 only); anything else goes to torch's TorchScript exporter (``"torchscript"``),
    falling back to the dynamo exporter (``"dynamo"``). ``exporter="torchscript"`` or ``"dynamo"`` skips
    fxprune's writer (``fxprune.save`` passes the exporter that verification reported).
    ``nn.MultiheadAttention``'s inference fast path (``aten::_native_multi_head_attention``, taken under
    ``no_grad``) has no ONNX symbolic; it is switched off during the export, so the exported graph holds
    the same computation as plain ops.
    """
    if exporter not in ("auto", "fxprune", "torchscript", "dynamo"):
        raise InputError(f"exporter={exporter!r}: choose auto, fxprune, torchscript or dynamo")
    if exporter in ("auto", "fxprune") and isinstance(model, torch.fx.GraphModule) and opset == 18:
        try:
            return write_onnx(model, example, table=table)[0], "fxprune"
        except Unsupported as exc:
            log.debug("fxprune's ONNX writer falls back to torch's exporter: %s", exc)
    flat = _FlatOutputs(model) if _containers_in_output(model) else model
    modes = [(m, m.training) for m in model.modules()]
    try:
        with mha_slow_path():
            return _export_onnx(flat, example, opset, dynamo_only=exporter == "dynamo")
    finally:  # the exporters switch modes and restore them wholesale; the model must come back as it was
        for m, training in modes:
            m.training = training


def _containers_in_output(model: torch.nn.Module) -> bool:
    """Whether a GraphModule returns what torch's exporters reject: a container built by a call (a
    dataclass, an OrderedDict) or a leaf that is no tensor (a number, None)."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    out = next(n for n in reversed(model.graph.nodes) if n.op == "output").args[0]
    leaves: list[Any] = []
    torch.fx.node.map_aggregate(out, leaves.append)
    return any(not isinstance(a, torch.fx.Node) or is_container_call(a) for a in leaves)


class _FlatOutputs(torch.nn.Module):
    """``model`` returning the tuple of its output tensors (``flatten_outputs`` order) for torch's
    exporters, which reject dataclass outputs and non-tensor leaves (an int in a dict): an ONNX model's
    outputs are a flat list of tensors whatever the container, in the order the check compares. Only
    used where needed: its parameters' names in the ONNX model gain a ``model.`` prefix."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # the exporters restore the mode they found, recursively: a new module is in training mode, which
        # would leave the wrapped model's BatchNorm and dropout in training mode after the export
        self.training = model.training

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.model(*args)))


def _export_onnx(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], opset: int, dynamo_only: bool = False
) -> tuple[bytes, str]:
    errors = []
    for dynamo in (True,) if dynamo_only else (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    prog = torch.onnx.export(model, example, dynamo=True, opset_version=opset, verbose=False)
                    assert prog is not None
                    return prog.model_proto.SerializeToString(), "dynamo"
                buf = io.BytesIO()
                torch.onnx.export(model, example, buf, dynamo=False, opset_version=opset)  # type: ignore[arg-type]
                return buf.getvalue(), "torchscript"
        except Exception as exc:  # noqa: PERF203 - try the next exporter, report both if neither works
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {exc}")
    raise ExportError("ONNX export failed: " + " | ".join(errors))


#: ``ort_session(optimization=...)`` -> ONNX Runtime's graph optimisation level
_ORT_LEVELS = {
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def ort_session(
    onnx_bytes: bytes,
    optimization: str = "all",
    externals: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> Any:
    """A CPU ONNX Runtime session. ``optimization`` is the graph optimisation level: ``"all"`` (ORT's
    default, as deployed: with layout transformations), ``"extended"``, ``"basic"`` (constant folding,
    redundant-node elimination and semantics-preserving fusions only) or ``"none"``. ``externals``: the
    initializers ``fxprune.onnx_writer.write_onnx(..., external=True)`` left out of the model.
    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization])
    if externals:
        opts.add_external_initializers(
            list(externals), [ort.OrtValue.ortvalue_from_numpy(a) for a in externals.values()]
        )
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _ort_run(sess: Any, example: Sequence[torch.Tensor]) -> list[np.ndarray]:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), example, strict=False)}
    return sess.run(None, feeds)


def _latency_ms(sess: Any, example: Sequence[torch.Tensor], runs: int) -> float:
    _ort_run(sess, example)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        _ort_run(sess, example)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _compare(got: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float, str | None]:
    """(max abs error, max |ref|, why they cannot be compared or None)."""
    if len(got) != len(ref):
        return float("inf"), 0.0, f"ONNX model has {len(got)} outputs, eager has {len(ref)}"
    if any(g.shape != r.shape for g, r in zip(got, ref, strict=True)):
        return (
            float("inf"),
            0.0,
            "ONNX output shapes differ from eager: "
            + ", ".join(f"{g.shape} vs {r.shape}" for g, r in zip(got, ref, strict=True)),
        )
    abs_err = max(
        (float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0)
        for g, r in zip(got, ref, strict=True)
    )
    return abs_err, max((float(np.max(np.abs(r))) if r.size else 0.0) for r in ref), None


@torch.no_grad()
def verify_onnx(
    pruned: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    original: torch.nn.Module | None = None,
    *,
    rtol: float = 1e-4,
    opset: int = 18,
    latency_runs: int = 10,
    eager_outputs: Any = None,
    shapes_propagated: bool = False,
    table: OpTable | None = None,
) -> Verification:
    """Export ``pruned`` to ONNX, run it in ONNX Runtime, compare with eager; time original and pruned.

    The export is ``fxprune.onnx_writer``'s when it translates every node (its weights handed to ONNX
    Runtime without a serialized copy), else torch's (``export_onnx``). Should the writer's model fail
    the check, torch's exporter is tried as well and its outcome reported, so a gap in the writer can cost
    time but never fail a model that torch's exporter gets right; ``exporter`` names the one reported.
    The comparison runs ONNX Runtime at the ``"basic"`` optimisation level (``ort_session``: constant
    folding, redundant-node elimination and semantics-preserving fusions such as Conv+BatchNorm, no layout
    transformations); its session builds about a third faster than at the default level, and runs with
    torch's thread count (``torch.get_num_threads()``: ONNX Runtime's own pool, one thread per core and
    spinning, made a one-off check several times slower on a busy machine). Latencies are
    timed in sessions at the default level (``"all"``), as deployed, built only when ``latency_runs`` > 0.
    ``eager_outputs``: ``pruned(*example)`` on the CPU if the caller already has it (saves one forward);
    ``shapes_propagated``: the caller has just run ``fxprune.trace.shape_propagate(pruned, example)``.
    """
    example = tuple(t.detach().cpu() for t in example)
    pruned = pruned.cpu()
    eager = pruned(*example) if eager_outputs is None else eager_outputs
    ref = [t.detach().float().numpy() for t in flatten_outputs(eager)]
    outcome = None
    if isinstance(pruned, torch.fx.GraphModule) and opset == 18:
        try:
            blob, externals = write_onnx(
                pruned, None if shapes_propagated else example, external=True, table=table
            )
            sess = ort_session(blob, "basic", externals, threads=torch.get_num_threads())
            abs_err, scale, why = _compare(_ort_run(sess, example), ref)
            if why is None and abs_err <= rtol * max(scale, 1e-12):
                outcome = (blob, externals, "fxprune", abs_err, scale)
            else:
                log.warning("fxprune's ONNX model does not match eager (%s); trying torch's exporter",
                            why or f"max abs error {abs_err:.3g}")  # fmt: skip
        except Unsupported as exc:
            log.debug("fxprune's ONNX writer falls back to torch's exporter: %s", exc)
        except Exception as exc:  # ONNX Runtime rejected the writer's model: torch's exporter decides
            log.warning("ONNX Runtime rejects fxprune's ONNX model (%s); trying torch's exporter", exc)
    if outcome is None:
        try:
            blob, exporter = export_onnx(pruned, example, opset, exporter="torchscript")  # or dynamo
            sess = ort_session(blob, "basic", threads=torch.get_num_threads())
            got = _ort_run(sess, example)
        except Exception as exc:
            return Verification(False, float("inf"), float("inf"), rtol, "none", opset, None, None, str(exc))
        abs_err, scale, why = _compare(got, ref)
        if why is not None:
            return Verification(False, float("inf"), float("inf"), rtol, exporter, opset, None, None, why)
        outcome = (blob, {}, exporter, abs_err, scale)
    blob, externals, exporter, abs_err, scale = outcome
    rel = abs_err / scale if scale > 0 else abs_err
    ms_after = None
    if latency_runs:
        try:
            ms_after = _latency_ms(ort_session(blob, "all", externals), example, latency_runs)
        except Exception as exc:  # the check passed at "basic"; only the deployed-level timing failed
            log.warning("could not time the compiled model in ONNX Runtime: %s", exc)
    ms_before = None
    if original is not None and latency_runs:
        try:
            ms_before = _latency_ms(
                ort_session(export_onnx(original.cpu(), example, opset, table=table)[0]),
                example,
                latency_runs,
            )
        except Exception as exc:  # the original may use ops the exporter lacks; that is not our failure
            log.warning("could not time the original model in ONNX Runtime: %s", exc)
    return Verification(
        abs_err <= rtol * max(scale, 1e-12), abs_err, rel, rtol, exporter, opset, ms_before, ms_after
    )


def masked_model(
    model: torch.nn.Module, plan: PrunePlan, overrides: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """The oracle: a copy of ``model`` in which every removed channel's input columns are zeroed in every
    consumer (``plan.inputs``). The pruned model must compute the same function (shared/DESIGN.md).

    ``overrides`` (``result.compensation.overrides``: full-size tensors by qualified name) are written first,
    so the oracle covers compensated weights, folded biases and BatchNorm shifts too.
    Independent of the rewrite: it only reads the plan's consumer columns and writes values.
    """
    masked = copy.deepcopy(model, detached_caches(model))
    fold_parametrizations(masked)  # a parametrized weight is recomputed on access: mask its value instead
    with torch.no_grad():
        for name, value in (overrides or {}).items():
            owner, _, leaf = name.rpartition(".")
            getattr(masked.get_submodule(owner), leaf).copy_(value)
        for name, (dim, kept) in plan.inputs.items():
            owner, _, leaf = name.rpartition(".")
            t = getattr(masked.get_submodule(owner), leaf)
            keep = torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
            keep[list(kept)] = True
            shape = [1] * t.dim()
            shape[dim] = -1
            t.mul_(keep.view(shape).to(t.dtype))
    if plan.stats:
        return _StatsMasked(masked, plan.stats)
    return masked


class _StatsMasked(torch.nn.Module):
    """``model`` whose layer/group norms over a pruned channel dim normalise over the kept channels only.

    For every ``plan.stats`` entry (the norm's weight and the kept positions of its channels), a call
    ``F.layer_norm(x, (C,), weight, bias, eps)`` with that weight becomes
    ``y[..., K] = layer_norm(x[..., K], (|K|,), weight[K], bias[K], eps)`` and ``y[..., removed] = 0``,
    and ``F.group_norm(x, G, weight, bias, eps)`` becomes ``y[:, K] = group_norm(x[:, K], G, weight[K],
    bias[K], eps)`` (``K`` keeps the same slots of every group): exactly what the pruned model computes on
    the kept channels. The call is found by the identity of its weight tensor while ``forward`` runs
    (``nn.LayerNorm``/``nn.GroupNorm`` and functional calls all go through ``torch.nn.functional``); other
    norms are untouched.
    """

    def __init__(self, model: torch.nn.Module, stats: Mapping[str, tuple[int, tuple[int, ...]]]) -> None:
        super().__init__()
        self.model = model
        self.stats = dict(stats)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch.nn.functional as F

        sites: dict[int, torch.Tensor] = {}
        for name, (dim, kept) in self.stats.items():
            owner, _, leaf = name.rpartition(".")
            w = getattr(self.model.get_submodule(owner), leaf)
            if dim != 0 or w.dim() != 1:
                raise NotImplementedError(f"statistics site {name} on dim {dim} of a {w.dim()}-d weight")
            sites[id(w)] = torch.as_tensor(kept, dtype=torch.long, device=w.device)
        real_ln, real_gn = F.layer_norm, F.group_norm
        F.layer_norm = _over_kept(real_ln, sites, -1, lambda shape, idx: (len(idx),))  # type: ignore[assignment]
        F.group_norm = _over_kept(real_gn, sites, 1, lambda groups, idx: groups)  # type: ignore[assignment]
        try:
            return self.model(*args, **kwargs)
        finally:
            F.layer_norm, F.group_norm = real_ln, real_gn


def _over_kept(
    real: Callable[..., torch.Tensor],
    sites: Mapping[int, torch.Tensor],
    dim: int,
    shape_arg: Callable[[Any, torch.Tensor], Any],
) -> Callable[..., torch.Tensor]:
    """``real`` (``F.layer_norm`` or ``F.group_norm``: ``(input, arg, weight, bias, eps)``), computed over the
    kept channels ``sites[id(weight)]`` of ``dim`` only, with zeros at the removed ones; ``shape_arg`` gives
    the second argument for the kept channels. Calls whose weight is not a site are passed through."""

    def fn(input: torch.Tensor, arg: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
        idx = sites.get(id(weight)) if weight is not None else None
        if idx is None or weight is None:
            return real(input, arg, weight, bias, eps)
        y = real(input.index_select(dim, idx), shape_arg(arg, idx), weight[idx],
                 None if bias is None else bias[idx], eps)  # fmt: skip
        return input.new_zeros(input.shape).index_copy(dim, idx, y)

    return fn
