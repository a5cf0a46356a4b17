"""Stage 6: verification. ONNX export + ONNX Runtime vs eager, latency, and the masked-equivalence oracle."""

from __future__ import annotations

import io
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fxprune.data import flatten_structure
from fxprune.errors import ExportError, InputError
from fxprune.onnx_writer import Unsupported, write_onnx
from fxprune.passes.family import OpTable
from fxprune.passes.oracle import masked_model  # re-exported: fxprune.verify.masked_model
from fxprune.passes.runtime import default_threads, ort_provider, ort_session, session_provider
from fxprune.trace import is_container_call, mha_slow_path

__all__ = [
    "LatencyReport",
    "LatencyStats",
    "Verification",
    "default_threads",
    "export_onnx",
    "flatten_outputs",
    "latency_report",
    "masked_model",
    "median_ci",
    "ort_provider",
    "ort_session",
    "session_provider",
    "time_interleaved",
    "verify_onnx",
]

log = logging.getLogger(__name__)


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3) of ``xs`` by linear interpolation between order statistics (``numpy.percentile``'s
    default; ``statistics.quantiles(method="inclusive")``). One value is its own three quartiles."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _ms(x: float) -> str:
    """Milliseconds with two decimals, more below 0.1 ms so that a small model's figure keeps two digits."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}" if x >= 0.01 else f"{x:.2g}"


@dataclass(frozen=True)
class LatencyStats:
    """The spread of one model's timed runs: median and quartiles (ms) of ``runs`` runs."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    runs: int

    @property
    def iqr_ms(self) -> float:
        """The interquartile range ``q3_ms - q1_ms``: where the middle half of the runs fell."""
        return self.q3_ms - self.q1_ms

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> LatencyStats:
        """The statistics of ``times_ms`` (at least one run).

        Raises:
            InputError: ``times_ms`` is empty.
        """
        if not times_ms:
            raise InputError("LatencyStats.of(times_ms) needs at least one timed run; got none")
        q1, med, q3 = _quartiles(list(times_ms))
        return cls(med, q1, q3, len(times_ms))


@dataclass(frozen=True)
class LatencyReport:
    """ONNX Runtime latency of the original (``before``) and the compiled model (``after``), timed
    interleaved in the same rounds (``time_interleaved``) after ``warmup`` untimed rounds, in sessions at the
    ``"all"`` optimisation level with ``threads`` intra-op threads on ``provider`` (``"cpu"`` or
    ``"cuda"``).

    ``ratio`` is the median over rounds of the paired ratio ``after[r] / before[r]`` (both timed in round
    ``r``, so load that drifts between rounds cancels), with its quartiles ``ratio_q1``/``ratio_q3``; it is
    not ``after.median_ms / before.median_ms``, though close to it on a quiet machine. ``before`` and the
    ratio are None when the original model could not be exported or timed (the compiled one was then
    timed alone). ``predicted_ms``: the compiled model's latency as a latency cost model predicts it, when
    one filled it in (else None).
    """

    before: LatencyStats | None
    after: LatencyStats
    threads: int
    provider: str
    warmup: int
    ratio: float | None
    ratio_q1: float | None
    ratio_q3: float | None
    predicted_ms: float | None = None

    def summary(self) -> str:
        """One line, e.g. ``ORT (cpu, 1 thread): 1.16 ms [IQR 1.12-1.20] -> 0.90 ms [0.88-0.93], ratio
        0.78 [0.76-0.80], 60 interleaved runs`` (``[a-b]``: the quartiles); the compiled model alone when
        ``before`` is None; ``; predicted 0.91 ms`` appended when ``predicted_ms`` is set."""
        a = self.after
        head = f"ORT ({self.provider}, {self.threads} thread{'s' if self.threads != 1 else ''}): "
        if self.before is None:
            line = f"{head}{_ms(a.median_ms)} ms [IQR {_ms(a.q1_ms)}-{_ms(a.q3_ms)}], {a.runs} runs"
        else:
            b = self.before
            line = (
                f"{head}{_ms(b.median_ms)} ms [IQR {_ms(b.q1_ms)}-{_ms(b.q3_ms)}] -> {_ms(a.median_ms)} ms "
                f"[{_ms(a.q1_ms)}-{_ms(a.q3_ms)}]"
            )
            if self.ratio is not None:
                line += f", ratio {self.ratio:.2f} [{self.ratio_q1:.2f}-{self.ratio_q3:.2f}]"
            line += f", {a.runs} interleaved runs"
        if self.predicted_ms is not None:
            line += f"; predicted {_ms(self.predicted_ms)} ms"
        return line


@dataclass(frozen=True)
class Verification:
    """ONNX Runtime against eager on the example input.

    ``max_abs_error`` is the largest |ORT - eager| over all outputs; ``max_rel_error`` divides it by
    max |eager output|. ``passed`` is ``max_abs_error <= rtol * max|output|`` (``rtol`` recorded).
    ``latency``: the timing (``LatencyReport``) when it was asked for and ran; ``ort_ms_before`` and
    ``ort_ms_after`` are its medians (kept for callers that read them).
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
    latency: LatencyReport | None = None


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


def _ort_run(sess: Any, example: Sequence[torch.Tensor]) -> list[np.ndarray]:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), example, strict=False)}
    return sess.run(None, feeds)


#: two-sided 95 % normal quantile, for the order-statistic confidence interval of a median
_Z95 = 1.959963984540054


def median_ci(times: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median of ``times``: the order statistics
    ``x_(j) <= median <= x_(k)`` (1-based ranks, sorted sample of size ``n``) with

        j = max(1, floor((n - 1.96 sqrt(n)) / 2)),   k = min(n, ceil(1 + (n + 1.96 sqrt(n)) / 2))

    (the normal approximation of the binomial count of samples below the median; Conover, *Practical
    Nonparametric Statistics*, 3.2). It assumes nothing about the shape of the distribution, so the long
    right tail of timings (a preempted run) widens it only by a rank or two. E.g. ``n = 15``: ``[x_(3),
    x_(13)]``; ``n = 100``: ``[x_(40), x_(61)]``. Empty ``times``: ``(nan, nan)``.
    """
    n = len(times)
    if n == 0:
        return math.nan, math.nan
    xs = sorted(times)
    half = _Z95 * math.sqrt(n)
    j = max(1, math.floor((n - half) / 2))
    k = min(n, math.ceil(1 + (n + half) / 2))
    return xs[j - 1], xs[k - 1]


def _stable(times: Sequence[float], rel_ci: float) -> bool:
    """Whether both ends of ``median_ci(times)`` lie within ``rel_ci`` x median of the median."""
    lo, hi = median_ci(times)
    med = statistics.median(times)
    return max(med - lo, hi - med) <= rel_ci * abs(med)


def time_interleaved(
    sessions: Sequence[Any],
    example: Sequence[torch.Tensor],
    *,
    warmup: int = 3,
    min_runs: int = 15,
    max_runs: int = 400,
    max_seconds: float = 2.0,
    rel_ci: float = 0.01,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Time ONNX Runtime ``sessions`` on ``example`` interleaved; ``times[s][r]``: session ``s``'s run in
    round ``r``, in milliseconds.

    A round runs every session once, in an order rotated by one each round (round ``r``, warm-up rounds
    counted, starts with session ``r mod len(sessions)``), so no session is always first after the pause between rounds, and
    load that comes and goes hits every session alike: the per-round ratio ``times[1][r] / times[0][r]``
    compares runs made moments apart. The inputs are converted to numpy once, outside the timed region;
    a timed run is ``session.run(None, feeds)`` from host memory, as a numpy caller deploys it (on CUDA
    that includes the copies to and from the device).

    Cases:
        1. ``warmup`` untimed rounds first (ONNX Runtime allocates its arenas and, on CUDA, picks kernels
           on the first runs).
        2. Then timed rounds until ``max_runs`` rounds are done, or at least ``min_runs`` are and either
           ``max_seconds`` have passed since the first timed round or every session's median is stable:
           both ends of its distribution-free 95 % confidence interval (``median_ci``) lie within
           ``rel_ci`` (default 1 %) of it. ``max_runs`` below ``min_runs`` counts as ``min_runs``.

    ``clock`` (seconds; default ``time.perf_counter``) is read around every run; a test passes a fake.

    Raises:
        InputError: no sessions, a negative ``warmup`` or a ``min_runs`` below 1.
    """
    if not sessions or warmup < 0 or min_runs < 1:
        raise InputError(
            f"time_interleaved needs at least one session, warmup >= 0 and min_runs >= 1; got "
            f"{len(sessions)} sessions, warmup={warmup}, min_runs={min_runs}"
        )
    arrays = [t.detach().cpu().numpy() for t in example]
    feeds = [{i.name: a for i, a in zip(s.get_inputs(), arrays, strict=False)} for s in sessions]
    n = len(sessions)
    max_runs = max(max_runs, min_runs)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(warmup):
        for k in range(n):
            s = (r + k) % n
            sessions[s].run(None, feeds[s])
    start = clock()
    for r in range(max_runs):
        for k in range(n):
            s = (warmup + r + k) % n  # the rotation goes on from the warm-up rounds
            t = clock()
            sessions[s].run(None, feeds[s])
            times[s].append((clock() - t) * 1e3)
        if r + 1 >= min_runs and (clock() - start >= max_seconds or all(_stable(ts, rel_ci) for ts in times)):
            break
    return times


def latency_report(
    times: Sequence[Sequence[float]], *, threads: int, provider: str, warmup: int
) -> LatencyReport:
    """The ``LatencyReport`` of ``time_interleaved``'s ``times``: ``[before, after]`` (paired by round),
    or ``[after]`` alone (the original could not be timed: ``before`` and the ratio are None)."""
    after = LatencyStats.of(times[-1])
    if len(times) == 1:
        return LatencyReport(None, after, threads, provider, warmup, None, None, None)
    ratios = [a / b for b, a in zip(times[0], times[-1], strict=True) if b > 0]
    q1, med, q3 = _quartiles(ratios) if ratios else (None, None, None)
    return LatencyReport(LatencyStats.of(times[0]), after, threads, provider, warmup, med, q1, q3)


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
    latency_runs: int = 15,
    latency_threads: int | None = None,
    provider: str | None = None,
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
    spinning, made a one-off check several times slower on a busy machine), always on the CPU.

    Latency (``latency_runs`` > 0; 0 skips it): original and pruned are timed *interleaved*
    (``time_interleaved``: 3 untimed warm-up rounds, then rounds of one run each in alternating order,
    at least ``latency_runs`` of them, until both medians are stable to 1 % or 2 s have passed, at most
    400) in sessions at the default level (``"all"``, as deployed) with ``latency_threads`` intra-op
    threads (default ``default_threads()``: the CPUs this process may use) on ``provider`` (``"cpu"``,
    ``"cuda"``, or None: CUDA when available, ``ort_provider``). ``latency`` reports medians, quartiles
    and the median per-round ratio (``LatencyReport``); ``ort_ms_before``/``ort_ms_after`` are the
    medians. Should the original fail to export or run, the pruned model is timed alone.
    ``eager_outputs``: ``pruned(*example)`` on the CPU if the caller already has it (saves one forward);
    ``shapes_propagated``: the caller has just run ``fxprune.trace.shape_propagate(pruned, example)``.
    """
    if latency_runs < 0:
        raise InputError(
            f"latency_runs={latency_runs}: pass the minimum number of timed rounds, or 0 to skip timing"
        )
    if latency_threads is not None and (not isinstance(latency_threads, int) or latency_threads < 1):
        raise InputError(
            f"latency_threads={latency_threads!r}: pass a thread count >= 1, or None for all CPUs"
        )
    if latency_runs:
        ort_provider(provider)  # an unusable provider is the caller's error, before any work
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
            sess = ort_session(blob, "basic", externals, threads=torch.get_num_threads(), provider="cpu")
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
            sess = ort_session(blob, "basic", threads=torch.get_num_threads(), provider="cpu")
            got = _ort_run(sess, example)
        except Exception as exc:
            return Verification(False, float("inf"), float("inf"), rtol, "none", opset, None, None, str(exc))
        abs_err, scale, why = _compare(got, ref)
        if why is not None:
            return Verification(False, float("inf"), float("inf"), rtol, exporter, opset, None, None, why)
        outcome = (blob, {}, exporter, abs_err, scale)
    blob, externals, exporter, abs_err, scale = outcome
    rel = abs_err / scale if scale > 0 else abs_err
    passed = abs_err <= rtol * max(scale, 1e-12)
    latency = None
    if latency_runs:
        latency = _time_models(blob, externals, original, example, opset, table, latency_runs,
                               latency_threads or default_threads(), provider)  # fmt: skip
    return Verification(
        passed, abs_err, rel, rtol, exporter, opset,
        None if latency is None or latency.before is None else latency.before.median_ms,
        None if latency is None else latency.after.median_ms,
        latency=latency,
    )  # fmt: skip


def _time_models(
    blob: bytes,
    externals: Mapping[str, np.ndarray],
    original: torch.nn.Module | None,
    example: tuple[torch.Tensor, ...],
    opset: int,
    table: OpTable | None,
    min_runs: int,
    threads: int,
    provider: str | None,
) -> LatencyReport | None:
    """``verify_onnx``'s timing: original (when it exports and runs) and pruned interleaved, or the
    pruned one alone; None (with a warning) when the pruned one cannot be timed. Provider errors raise."""
    try:
        after = ort_session(blob, "all", externals, threads=threads, provider=provider)
    except InputError:
        raise
    except Exception as exc:  # the check passed at "basic"; only the deployed-level session failed
        log.warning("could not time the compiled model in ONNX Runtime: %s", exc)
        return None
    sessions = [after]
    if original is not None:
        try:
            before = ort_session(export_onnx(original.cpu(), example, opset, table=table)[0], "all",
                                 threads=threads, provider=provider)  # fmt: skip
            before.run(None, {i.name: t.numpy() for i, t in zip(before.get_inputs(), example, strict=False)})
            sessions.insert(0, before)
        except InputError:
            raise
        except Exception as exc:  # the original may use ops the exporter lacks; that is not our failure
            log.warning("could not time the original model in ONNX Runtime (timing the compiled one alone): "
                        "%s", exc)  # fmt: skip
    warmup = 3
    try:
        times = time_interleaved(sessions, example, warmup=warmup, min_runs=min_runs)
    except Exception as exc:
        log.warning("could not time the models in ONNX Runtime: %s", exc)
        return None
    return latency_report(times, threads=threads, provider=session_provider(after), warmup=warmup)
