"""Measured latency: a probe of the runtime's channel alignment, per-op latency tables cached on disk, and
``LatencyCost``, the ``Cost`` (``passes/cost.py``) selection budgets against for ``target_latency``.

What is measured, in the runtime the model is deployed on (ONNX Runtime, CPU EP by default, the CUDA EP
when asked for), at the deployed thread count:

* **The probe** (once per machine and runtime): a depthwise and a dense 3x3 convolution timed at every
  channel count of a range. ONNX Runtime's CPU EP runs a convolution in its blocked ``NCHWc`` layout only
  when its channel counts are multiples of a small number, and pads the channels to a block inside that
  layout; elsewhere it falls back to a slower path (here a depthwise conv of 57 channels took 3x the time
  of one of 60). ``Alignment.align`` is the smallest power of two whose multiples are all on the fast
  path; ``Alignment.block`` the period of the steps among those counts; ``Alignment.penalty`` how much
  slower an unaligned count is, per op kind. Nothing here is a fixed number.
* **Op tables** (once per op signature): each convolution and linear layer the channel groups cut, built
  as a one-op ONNX model at the shapes of the example and timed at a grid of kept counts (at most 4 per
  pruned dim, multiples of the block). A signature (op type, channels, kernel, stride, padding, dilation,
  groups, input shape, dtype) and its timings are cached in a JSON file per runtime fingerprint
  (``cache_dir()``: ``~/.cache/fxprune/latency`` or ``$FXPRUNE_CACHE/latency``), shared by every model
  with that op.
* **The model**: each op's latency is its table, interpolated bilinearly in the kept input and output
  counts padded up to the block (step-shaped: a count costs what the next multiple of the block costs),
  made non-decreasing in the counts, times the probe's penalty where a pruned count is unaligned. Ops with FLOPs but no table (matmuls of attention) cost the
  median milliseconds per FLOP of the tabled ops. The sum over ops is compared with the measured latency of
  the whole original model: ``LatencyModel.gap_ms`` (fusion, memory-bound ops, fixed overheads); the cost
  of a pruned model is the sum scaled by ``measured / sum`` (so the full model costs what was measured).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from fxprune.passes.cost import CostModel
from fxprune.passes.runtime import ort_session

from fxprune.data import META_FLOPS, META_VALUE, ChannelGroup, TensorValue
from fxprune.data import cache_dir as data_cache_dir
from fxprune.errors import InputError, TargetError

__all__ = [
    "CACHE_ENV",
    "Alignment",
    "LatencyCost",
    "LatencyModel",
    "OpLatency",
    "OpSignature",
    "Runtime",
    "TableCache",
    "alignment_from",
    "build_latency_model",
    "cache_dir",
    "group_alignment",
    "probe",
    "probe_times",
    "resolve_latency_target",
    "time_ms",
    "time_point",
]

#: environment variable naming fxprune's cache directory (``fxprune.data.cache_dir``); tables go in ``latency/``
CACHE_ENV = "FXPRUNE_CACHE"

#: a count is on the fast path when no larger count of the probe range is this much faster
_FAST = 1.25
#: the share of an alignment's multiples that must be fast (one count slowed by noise does not decide)
_ALIGNED_SHARE = 0.9
#: channel counts the probe times (every count), and the probe ops' spatial sizes
_PROBE_COUNTS = tuple(range(40, 89))
_PROBE_DW_HW, _PROBE_DENSE_HW = 112, 28


def cache_dir() -> Path:
    """Where latency tables are kept: ``latency/`` in fxprune's cache (``$FXPRUNE_CACHE``, else
    ``~/.cache/fxprune``)."""
    return data_cache_dir() / "latency"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    flags = [ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")]
    simd = sorted({f for f in (flags[0] if flags else []) if f.startswith(("avx", "sse4", "fma", "amx"))})
    return f"{names[0] if names else platform.machine()} [{' '.join(simd)}]"


@dataclass(frozen=True)
class Runtime:
    """Where latency is measured: ONNX Runtime's ``provider`` (``"cpu"`` or ``"cuda"``) with ``threads``
    intra-op threads."""

    provider: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.provider not in ("cpu", "cuda"):
            raise InputError(f"latency provider {self.provider!r}: choose 'cpu' or 'cuda'")
        if self.threads < 1:
            raise InputError(f"latency_threads={self.threads}: pass a thread count >= 1")

    @cached_property
    def fingerprint(self) -> str:
        """The machine and runtime a table was measured on; tables are never shared across fingerprints."""
        import onnxruntime as ort

        device = _cpu_name()
        if self.provider == "cuda" and torch.cuda.is_available():
            device += " / " + torch.cuda.get_device_name()
        return f"ort {ort.__version__} {self.provider} threads={self.threads} {platform.machine()} {device}"

    def session(self, blob: bytes) -> Any:
        """A session at ONNX Runtime's default (deployed) optimisation level on this runtime."""
        return ort_session(blob, "all", threads=self.threads, provider=self.provider)


def _time_session(sess: Any, feeds: Mapping[str, np.ndarray], min_runs: int = 5, min_ms: float = 30.0,
                  max_runs: int = 60, stat: Callable[[list[float]], float] = statistics.median) -> float:  # fmt: skip
    """``stat`` (median) of the milliseconds of ``sess.run`` after two warm-up runs: at least ``min_runs``
    runs and ``min_ms`` in all (short ops get more runs), at most ``max_runs``."""
    for _ in range(2):
        sess.run(None, feeds)
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < min_ms):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return stat(times)


class TableCache:
    """Latency measurements of one runtime fingerprint, in one JSON file under ``cache_dir()``.

    ``data`` holds ``"probe"`` (the probe's timings) and ``"ops"`` (signature key -> ``[[cin, cout, ms],
    ...]``). ``save`` re-reads the file and merges before writing (atomically: a temporary file renamed),
    so concurrent compiles only ever add entries."""

    def __init__(self, runtime: Runtime, directory: Path | None = None) -> None:
        self.runtime = runtime
        digest = hashlib.sha256(runtime.fingerprint.encode()).hexdigest()[:16]
        self.path = (directory or cache_dir()) / f"latency-{digest}.json"
        self.data: dict[str, Any] = self._read()
        self.data.setdefault("fingerprint", runtime.fingerprint)
        self.data.setdefault("ops", {})

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("fingerprint") == self.runtime.fingerprint else {}

    def save(self) -> None:
        disk = self._read()
        merged = {**disk, **self.data, "ops": {**disk.get("ops", {}), **self.data["ops"]}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, self.path)
        self.data = merged


# ---------------------------------------------------------------------------------------------- ONNX ops


def _conv_blob(cin: int, cout: int, groups: int, kernel: Sequence[int], stride: Sequence[int],
               pads: Sequence[int], dilation: Sequence[int], shape: Sequence[int]) -> bytes:  # fmt: skip
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cout, cin // groups, *kernel), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(kernel), strides=list(stride),
                            pads=list(pads), dilations=list(dilation), group=groups)  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [shape[0], cin, *shape[2:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "op", [x], [y], [w, b]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    model.ir_version = 9
    return model.SerializeToString()


def _linear_blob(cin: int, cout: int, shape: Sequence[int]) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((cin, cout), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*shape[:-1], cin])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "op", [x], [y], [w, b]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    model.ir_version = 9
    return model.SerializeToString()


@dataclass(frozen=True)
class OpSignature:
    """An op as the tables key it: ``kind`` (``"conv"`` or ``"linear"``), its full input and output
    channel counts, ``groups`` (conv), kernel/stride/pads/dilation (conv), the input shape and dtype.

    ``depthwise``: groups == input channels (the kept groups follow the kept channels); otherwise groups
    stay fixed and kept counts are multiples of them."""

    kind: str
    cin: int
    cout: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pads: tuple[int, ...]
    dilation: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.cin

    @property
    def key(self) -> str:
        return (f"{self.kind} in={self.cin} out={self.cout} g={self.groups} k={self.kernel} s={self.stride} "
                f"p={self.pads} d={self.dilation} x={self.shape} {self.dtype}")  # fmt: skip

    def blob(self, cin: int, cout: int) -> bytes:
        """The one-op ONNX model at ``cin`` input and ``cout`` output channels."""
        if self.kind == "linear":
            return _linear_blob(cin, cout, self.shape)
        groups = cin if self.depthwise else self.groups
        return _conv_blob(cin, cout, groups, self.kernel, self.stride, self.pads, self.dilation, self.shape)

    def feeds(self, cin: int) -> dict[str, np.ndarray]:
        shape = [*self.shape[:-1], cin] if self.kind == "linear" else [self.shape[0], cin, *self.shape[2:]]
        return {"x": np.random.default_rng(1).standard_normal(shape, dtype=np.float32)}


# --------------------------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class Alignment:
    """The runtime's channel alignment, learned by ``probe``: counts that are multiples of ``align`` run
    on the fast path; latency steps every ``block`` channels among them; an unaligned count costs
    ``penalty[kind]`` times the next aligned count (kinds ``"depthwise"``, ``"conv"``, ``"linear"``)."""

    align: int
    block: int
    penalty: Mapping[str, float] = field(default_factory=dict)


def alignment_from(times: Mapping[str, Mapping[int, float]]) -> Alignment:
    """The ``Alignment`` a probe's timings show: ``times[kind][count]`` in ms, every count of a range.

    A count is *fast* when no larger count in the range is more than ``1.25``x faster. ``align`` is the
    smallest power of two (up to 32) whose multiples are fast in every kind (90% of them: one count slowed
    by noise does not decide); ``block`` the step
    period (a multiple of ``align``, up to 64) that best fits ``t = a + b ceil(c / block)`` over the
    aligned counts (least squares, relative residual; a smaller period wins within 10%); the penalty the
    median ratio of an unaligned count's time to the next aligned count's.
    """
    fast: dict[str, set[int]] = {}
    for kind, t in times.items():
        counts = sorted(t)
        fast[kind] = {c for c in counts if t[c] <= _FAST * min(t[d] for d in counts if d >= c)}
    align = 32
    for a in (1, 2, 4, 8, 16, 32):
        multiples = [c in fast[k] for k, t in times.items() for c in t if c % a == 0]
        if multiples and sum(multiples) >= _ALIGNED_SHARE * len(multiples):
            align = a
            break
    residuals: dict[int, float] = {}
    for b in (align * m for m in (1, 2, 4, 8, 16)):
        if b > 64:
            break
        total = 0.0
        for t in times.values():
            cs = np.array([c for c in sorted(t) if c % align == 0], dtype=np.float64)
            ys = np.array([t[int(c)] for c in cs])
            if len(cs) < 3:
                continue
            x = np.stack([np.ones_like(cs), np.ceil(cs / b)], axis=1)
            coef, *_ = np.linalg.lstsq(x, ys, rcond=None)
            total += float(np.sum((x @ coef - ys) ** 2) / max(np.sum((ys - ys.mean()) ** 2), 1e-30))
        residuals[b] = total
    best = min(residuals.values()) if residuals else 0.0
    block = min((b for b, r in residuals.items() if r <= best * 1.1 + 1e-12), default=align)
    penalty: dict[str, float] = {}
    for kind, t in times.items():
        ratios = []
        for c in t:
            if c % align:
                nxt = [d for d in t if d >= c and d % align == 0]
                if nxt:
                    ratios.append(t[c] / t[min(nxt)])
        penalty[kind] = max(1.0, statistics.median(ratios)) if ratios else 1.0
    penalty.setdefault("linear", 1.0)
    return Alignment(align, block, penalty)


def probe_times(runtime: Runtime, passes: int = 2) -> dict[str, dict[int, float]]:
    """The fastest run of each probe op at each count over ``passes`` sweeps of the range: the systematic
    effect of the count, with interference from other work on the machine (always upwards) filtered out."""
    times: dict[str, dict[int, float]] = {"depthwise": {}, "conv": {}}
    for _ in range(passes):
        for c in _PROBE_COUNTS:
            for kind, groups, hw in (("depthwise", c, _PROBE_DW_HW), ("conv", 1, _PROBE_DENSE_HW)):
                blob = _conv_blob(c, c, groups, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (1, c, hw, hw))
                feeds = {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw), dtype=np.float32)}
                t = _time_session(runtime.session(blob), feeds, min_runs=5, min_ms=10.0, stat=min)
                times[kind][c] = min(t, times[kind].get(c, math.inf))
    return times


def probe(runtime: Runtime, cache: TableCache | None = None) -> Alignment:
    """The runtime's ``Alignment``, from the cache or measured (``probe_times``: a few seconds) and cached.

    The probe is measured once per machine and runtime: every later compile reads the same numbers, so
    the same model gets the same plan until the cache is removed."""
    cache = cache if cache is not None else TableCache(runtime)
    raw = cache.data.get("probe")
    if not raw:
        times = probe_times(runtime)
        cache.data["probe"] = {k: {str(c): v for c, v in t.items()} for k, t in times.items()}
        cache.save()
        raw = cache.data["probe"]
    return alignment_from({k: {int(c): float(v) for c, v in t.items()} for k, t in raw.items()})


def group_alignment(
    groups: Iterable[ChannelGroup], alignment: Alignment, *, blocks: bool = False
) -> dict[int, int]:
    """The kept-count step of every group, so that the tensor dims it cuts stay on the runtime's fast path.

    A group whose channels each cut ``r`` positions (``Site.repeat``; a head cuts ``head_dim``) steps by
    ``n / gcd(n, r)`` channels, ``n`` being ``alignment.align`` or, with ``blocks``, ``alignment.block``:
    counts between two blocks cost what the next block costs, so a FLOPs target, which cannot see that,
    keeps whole blocks. A group with fewer than 3 such steps steps by the alignment instead; a group of at
    most one aligned step by 1 (nothing aligned is left to choose)."""
    out = {}
    for g in groups:
        r = 0
        for s in g.sites:
            r = math.gcd(r, s.repeat)
        fine = alignment.align // math.gcd(alignment.align, r or 1)
        step = alignment.block // math.gcd(alignment.block, r or 1) if blocks else fine
        if g.size < 3 * step:
            step = fine
        out[g.id] = step if g.size > step else 1
    return out


# --------------------------------------------------------------------------------------------- op tables


@dataclass(frozen=True)
class OpLatency:
    """One op's latency as a function of the kept counts of the groups that cut it.

    ``cin_terms``/``cout_terms``: ``(group, repeat)`` pairs; the op keeps ``full - sum (size_g - kept_g) *
    repeat`` input (output) channels (``in_unit``: input channels per weight column, ``groups`` of a
    grouped conv). ``table[i][j]``: the measured ms at ``levels_in[i]`` input and ``levels_out[j]`` output
    channels (ascending; made non-decreasing along both, so noise never makes a smaller op dearer); a
    depthwise conv's output follows its input, so its ``levels_out`` is empty and each row one value.
    Between levels the latency is bilinear in the counts padded up to the ``block`` (step-shaped: a count
    costs what the next multiple of the block costs), flat below the smallest level."""

    node: str
    signature: OpSignature
    cin_terms: tuple[tuple[int, int], ...]
    cout_terms: tuple[tuple[int, int], ...]
    in_unit: int
    sizes0: Mapping[int, int]
    levels_in: tuple[int, ...]
    levels_out: tuple[int, ...]
    table: tuple[tuple[float, ...], ...]
    block: int
    align: int
    penalty: float

    def counts(self, sizes: Mapping[int, int]) -> tuple[int, int]:
        ci = self.signature.cin - self.in_unit * sum(
            (self.sizes0[g] - sizes[g]) * r for g, r in self.cin_terms
        )
        co = self.signature.cout - sum((self.sizes0[g] - sizes[g]) * r for g, r in self.cout_terms)
        return ci, co

    def _padded(self, c: int, full: int) -> float:
        return float(c if c >= full else min(full, math.ceil(c / self.block) * self.block))

    def ms(self, cin: int, cout: int) -> float:
        sig = self.signature
        pi = self._padded(cin, sig.cin)
        if self.levels_out:
            po = self._padded(cout, sig.cout)
            rows = [float(np.interp(po, self.levels_out, row)) for row in self.table]
        else:
            rows = [row[0] for row in self.table]
        t = float(np.interp(pi, self.levels_in, rows))
        if (cin != sig.cin and cin % self.align) or (cout != sig.cout and cout % self.align):
            t *= self.penalty  # a pruned count off the fast path (the full counts are what was measured)
        return t

    def at(self, sizes: Mapping[int, int]) -> float:
        return self.ms(*self.counts(sizes))


def _levels(full: int, unit: int, block: int, pruned: bool) -> list[int]:
    """Kept counts a table measures for one dim of ``full`` channels, ascending: the full count; ~3/4,
    1/2 and 1/4 of it rounded up to multiples of ``lcm(unit, block)`` (of ``unit`` where that exceeds the
    count); and that step itself, the smallest count a group is likely to keep."""
    if not pruned:
        return [full]
    step = math.lcm(unit, block)
    if step >= full:
        step = unit
    out = {full, step}
    for f in (0.75, 0.5, 0.25):
        out.add(min(full, max(step, math.ceil(full * f / step) * step)))
    return sorted(out)


def _monotone(values: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """``values`` made non-decreasing along every axis (a running maximum from the smallest counts)."""
    for axis in range(values.ndim):
        values = np.maximum.accumulate(values, axis=axis)
    return tuple(tuple(float(v) for v in row) for row in values)


def _signature(gm: fx.GraphModule, node: fx.Node) -> tuple[OpSignature, str] | None:
    """The op signature and weight name of a conv or linear node (module or functional), else None."""
    from torch import nn

    x = node.args[0] if node.args else None
    value = x.meta.get(META_VALUE) if isinstance(x, fx.Node) else None
    if not isinstance(value, TensorValue) or value.dtype != "float32":
        return None
    shape = tuple(int(s) for s in value.shape)
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            k = tuple(m.kernel_size)
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    pads = (0,) * (2 * len(k))
                else:  # "same": stride 1; the extra pixel goes to the end, as torch does
                    tot = [d * (kk - 1) for d, kk in zip(m.dilation, k, strict=True)]
                    pads = tuple(t // 2 for t in tot) + tuple(t - t // 2 for t in tot)
            else:
                pads = tuple(m.padding) * 2
            sig = OpSignature("conv", m.in_channels, m.out_channels, m.groups, k, tuple(m.stride), pads,
                              tuple(m.dilation), shape, value.dtype)  # fmt: skip
            return sig, f"{node.target}.weight"
        if isinstance(m, nn.Linear):
            sig = OpSignature("linear", m.in_features, m.out_features, 1, (), (), (), (), shape, value.dtype)
            return sig, f"{node.target}.weight"
    return None


def time_ms(sess: Any, example: Sequence[torch.Tensor]) -> float:
    """Median milliseconds of one run of ``sess`` on ``example``: at least 20 runs and 300 ms."""
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), example, strict=False)}
    return _time_session(sess, feeds, min_runs=20, min_ms=300.0, max_runs=500)


def time_point(sig: OpSignature, cin: int, cout: int, runtime: Runtime) -> float:
    """Median milliseconds of ``sig`` at ``cin`` input and ``cout`` output channels in ``runtime``."""
    return _time_session(runtime.session(sig.blob(cin, cout)), sig.feeds(cin))


def build_latency_model(
    gm: fx.GraphModule,
    groups: Sequence[ChannelGroup],
    cost: CostModel,
    example: Sequence[torch.Tensor],
    runtime: Runtime,
    *,
    measure_model: Callable[[], float],
    cache: TableCache | None = None,
    steps: Callable[[list[Any]], Iterable[Any]] = iter,
    time_op: Callable[[OpSignature, int, int, Runtime], float] | None = None,
) -> LatencyModel:
    """The ``LatencyModel`` of ``gm`` (shapes propagated, dependency metadata written): every conv and
    linear node the groups cut gets a table (from ``cache`` or measured and cached); ``measure_model()``
    returns the measured milliseconds of the whole original model, the scale the sum is calibrated to.
    ``steps`` wraps the list of ops to table (a progress bar); ``time_op(signature, cin, cout, runtime)``
    measures one table point (default: the one-op ONNX model timed in ``runtime``; a test passes a
    synthetic one)."""
    time_op = time_op or time_point
    cache = cache if cache is not None else TableCache(runtime)
    alignment = probe(runtime, cache)
    sites: dict[tuple[str, int], list[tuple[int, int]]] = {}
    sizes0 = {g.id: g.size for g in groups}
    for g in groups:
        for s in g.sites:
            sites.setdefault((s.param, s.dim), []).append((g.id, s.repeat))
    ops: list[OpLatency] = []
    other: list[tuple[str, float]] = []  # FLOPs-only nodes: name, full FLOPs
    todo: list[tuple[fx.Node, OpSignature, str]] = []
    for node in gm.graph.nodes:
        flops = int(node.meta.get(META_FLOPS, 0))
        if flops <= 0:
            continue
        found = _signature(gm, node)
        if found is None:
            other.append((node.name, float(flops)))
            continue
        todo.append((node, *found))
    measured = 0
    for node, sig, weight in steps(todo):
        cout_terms = tuple(sites.get((weight, 0), ()))
        cin_terms = tuple(sites.get((weight, 1), ()))
        in_unit = 1 if sig.kind == "linear" or sig.depthwise else sig.groups
        if sig.depthwise:  # the input channels follow the output's (a multiplier m keeps m rows each)
            m = sig.cout // sig.cin
            cin_terms = tuple((g, r // m) for g, r in cout_terms)
        block = alignment.block if sig.kind == "conv" else 1
        unit_in = sig.groups if sig.kind == "conv" and not sig.depthwise else 1
        unit_out = sig.groups if sig.kind == "conv" and not sig.depthwise else 1
        levels_in = _levels(sig.cin, unit_in, block, bool(cin_terms or (sig.depthwise and cout_terms)))
        levels_out = [] if sig.depthwise else _levels(sig.cout, unit_out, block, bool(cout_terms))
        if sig.depthwise:
            grid = [(c, c * (sig.cout // sig.cin)) for c in levels_in]
        else:
            grid = [(ci, co) for ci in levels_in for co in levels_out]
        table = {(int(a), int(b)): float(t) for a, b, t in cache.data["ops"].get(sig.key, [])}
        for ci, co in grid:
            if (ci, co) not in table:
                table[(ci, co)] = time_op(sig, ci, co, runtime)
                measured += 1
        cache.data["ops"][sig.key] = [[a, b, t] for (a, b), t in sorted(table.items())]
        values = np.array([table[p] for p in grid]).reshape(len(levels_in), max(1, len(levels_out)))
        kind = "depthwise" if sig.depthwise else sig.kind
        ops.append(OpLatency(node.name, sig, cin_terms, cout_terms, in_unit, sizes0, tuple(levels_in),
                             tuple(levels_out), _monotone(values), block,
                             alignment.align if sig.kind == "conv" else 1, alignment.penalty.get(kind, 1.0)))  # fmt: skip
    if measured:
        cache.save()
    full_ms = float(measure_model())
    return LatencyModel(tuple(ops), tuple(other), cost, alignment, full_ms, runtime)


# ------------------------------------------------------------------------------------------ the cost model


@dataclass(frozen=True)
class LatencyModel:
    """The tables of one model and the measured latency of the whole, with the ``LatencyCost`` over them.

    ``ops_ms``: the tables' sum at full width; ``other_ms``: the FLOPs-only nodes at the tabled ops' median
    ms per FLOP; ``full_ms``: the measured latency of the original; ``gap_ms = full_ms - ops_ms -
    other_ms`` (negative when isolated ops, each with its own layout conversions, sum to more than the
    fused model).

    The prediction is a function of the tables' sum ``S``: proportional (``full_ms * S / S_full``) until
    ``refit`` has measured a pruned model (``fit``: its ``S1`` and measured ``m1`` ms); then piecewise
    linear: the line through the original and that point for ``S >= S1``, and ``m1 * S / S1`` below it
    (smaller models scale like the tables from the last measured one). Isolated ops carry costs the
    fused model does not (layout conversions, a session run each) and the model has costs no table sees
    (memory-bound ops, fixed overheads), so a measured pruned point corrects the slope."""

    ops: tuple[OpLatency, ...]
    other: tuple[tuple[str, float], ...]
    flops: CostModel
    alignment: Alignment
    full_ms: float
    runtime: Runtime
    fit: tuple[float, float] | None = None

    @cached_property
    def ms_per_flop(self) -> float:
        rates = []
        nodes = {n.node: n for n in self.flops.nodes}
        for op in self.ops:
            n = nodes.get(op.node)
            if n is not None and n.flops > 0:
                rates.append(op.at(op.sizes0) / n.flops)
        return statistics.median(rates) if rates else 0.0

    @property
    def ops_ms(self) -> float:
        return math.fsum(op.at(op.sizes0) for op in self.ops)

    @property
    def other_ms(self) -> float:
        return self.ms_per_flop * math.fsum(f for _, f in self.other)

    @property
    def gap_ms(self) -> float:
        return self.full_ms - self.ops_ms - self.other_ms

    @cached_property
    def scale(self) -> float:
        """Predicted ms per ms of the tables' sum (the slope of the affine prediction)."""
        total = self.ops_ms + self.other_ms
        if self.fit is not None and total - self.fit[0] > 1e-9 * total and self.fit[1] < self.full_ms:
            return (self.full_ms - self.fit[1]) / (total - self.fit[0])
        return self.full_ms / total if total > 0 else 1.0

    def tables_ms(self, sizes: Mapping[int, int]) -> float:
        """The tables' sum ``S`` with ``sizes[g]`` channels kept in every group (uncalibrated)."""
        nodes = {n.node: n for n in self.flops.nodes}
        rate = self.ms_per_flop
        other = math.fsum(nodes[name].at(sizes) * rate for name, _ in self.other if name in nodes)
        return math.fsum(op.at(sizes) for op in self.ops) + other

    def predict_ms(self, sizes: Mapping[int, int]) -> float:
        """Predicted milliseconds with ``sizes[g]`` channels kept in every group."""
        s = self.tables_ms(sizes)
        if self.fit is not None and self.scale != self.full_ms / max(self.ops_ms + self.other_ms, 1e-30):
            s1, m1 = self.fit
            if s < s1:  # below the measured pruned model: proportional to the tables from there
                return m1 * s / s1
        return self.full_ms + self.scale * (s - self.ops_ms - self.other_ms)

    def refit(self, sizes: Mapping[int, int], measured_ratio: float) -> LatencyModel:
        """This model through one more measured point: the model with ``sizes`` kept ran at
        ``measured_ratio`` of the original (a paired, interleaved measurement). Ignored (``self``) when it
        says pruning made the model no faster or nothing was pruned: no slope can be read off it."""
        s = self.tables_ms(sizes)
        if not 0 < measured_ratio < 1 or self.ops_ms + self.other_ms - s <= 0:
            return self
        return dataclasses.replace(self, fit=(s, measured_ratio * self.full_ms))

    def cost(self) -> LatencyCost:
        return LatencyCost(self)

    def summary(self) -> str:
        return (
            f"latency model ({self.runtime.provider}, {self.runtime.threads} thread(s)): {len(self.ops)} tabled "
            f"ops {self.ops_ms:.3f} ms + {len(self.other)} other {self.other_ms:.3f} ms; measured "
            f"{self.full_ms:.3f} ms, gap {self.gap_ms:+.3f} ms; alignment {self.alignment.align}, "
            f"block {self.alignment.block}"
            + (
                f"; refit: a pruned model with tables {self.fit[0]:.3f} ms measured {self.fit[1]:.3f} ms"
                if self.fit is not None
                else ""
            )
        )


class LatencyCost:
    """``Cost`` in milliseconds (``passes/cost.py``): ``LatencyModel.predict_ms``; a step's saving is the
    exact difference of the ops it touches (latency is step-shaped: a step may save nothing)."""

    unit = "ms"

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.group_sizes = dict(model.flops.group_sizes)
        self._flops_nodes = {n.node: n for n in model.flops.nodes}
        touching: dict[int, list[int]] = {}
        for i, op in enumerate(model.ops):
            for g in {g for g, _ in op.cin_terms + op.cout_terms}:
                touching.setdefault(g, []).append(i)
        self._touching = touching
        self._other_touching: dict[int, list[str]] = {}
        for name, _ in model.other:
            n = self._flops_nodes.get(name)
            if n is None:
                continue
            for g in {g for segs in n.dims for g, _ in segs}:
                self._other_touching.setdefault(g, []).append(name)

    @property
    def total(self) -> float:
        return self.model.full_ms

    def at(self, sizes: Mapping[int, int]) -> float:
        return self.model.predict_ms(sizes)

    def interactions(self) -> dict[int, frozenset[int]]:
        out: dict[int, set[int]] = {}
        for gid, ids in self._touching.items():
            s = out.setdefault(gid, {gid})
            for i in ids:
                op = self.model.ops[i]
                s.update(g for g, _ in op.cin_terms + op.cout_terms)
        for gid, names in self._other_touching.items():
            s = out.setdefault(gid, {gid})
            for name in names:
                s.update(g for segs in self._flops_nodes[name].dims for g, _ in segs)
        return {g: frozenset(s) for g, s in out.items()}

    def _part(self, group: int, sizes: Mapping[int, int]) -> float:
        ops = self.model.ops
        rate = self.model.ms_per_flop
        own = math.fsum(ops[i].at(sizes) for i in self._touching.get(group, ()))
        other = math.fsum(self._flops_nodes[n].at(sizes) * rate for n in self._other_touching.get(group, ()))
        return self.model.scale * (own + other)

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        s = dict(sizes)
        parts = []
        for k in np.asarray(ladder).tolist():
            s[group] = int(k)
            parts.append(self._part(group, s))
        p = np.asarray(parts)
        return p[:-1] - p[1:]


def resolve_latency_target(target: float | str, total_ms: float | None) -> float:
    """``target_latency`` in milliseconds: a fraction in (0, 1] of ``total_ms`` (the measured original), or
    a string such as ``"3.5ms"``. ``total_ms=None`` checks the form only and returns the number."""
    if isinstance(target, str):
        text = target.strip().lower().removesuffix("ms").strip()
        try:
            ms = float(text)
        except ValueError:
            raise TargetError(
                f"target_latency={target!r} is not a latency: pass a fraction such as 0.5 or milliseconds "
                "as a string such as '3.5ms'"
            ) from None
        if not ms > 0 or math.isinf(ms):
            raise TargetError(f"target_latency={target!r} must be a positive number of milliseconds")
        return ms
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TargetError(f"target_latency must be a fraction or a string such as '3.5ms', got {target!r}")
    t = float(target)
    if not 0 < t <= 1 or math.isnan(t):
        raise TargetError(
            f"target_latency={target!r} is out of range: pass a fraction in (0, 1] of the original's measured "
            f"latency, or milliseconds as a string such as '{t:g}ms'"
        )
    return t if total_ms is None else t * total_ms
