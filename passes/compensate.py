"""Compensation without fine-tuning: adjust the surviving weights so the pruned model loses less.

Runs between selection and the rewrite, on a copy of the traced model, in the *original* coordinates; the
rewrite then slices the adjusted weights. Every change is also returned as ``overrides`` (qualified name ->
new full tensor) so the masked-equivalence oracle can apply the same change to the original model
(``fxprune.masked_model(model, plan, overrides)``). Methods (shared/METHODS.md):

- ``"bias"`` — mean-value recovery (Pruning On-the-Fly): each removed input channel is replaced by its mean
  over the calibration data, folded into the consumer's bias as ``W[:, c] . E[x_c]``.
- ``"lsq"`` — layer-wise least squares (ThiNet / OBS family), sequential: each consumer re-fits its kept
  input columns and its bias so that, fed what the *pruned and already compensated* network gives it, it
  reproduces its original output on the original network's input: ``W' = W C[:, S] (D[S, S] + delta I)^-1``
  with ``D`` the second-moment matrix of its pruned-network input (unfolded, plus a constant row) and ``C``
  the cross moment of the original input with it. Consumers are refitted in graph order while both networks
  are run over the calibration batches, so the error of the layers above is corrected where it arrives
  instead of accumulating through depth (SparseGPT / OBC refit on the pruned model's inputs). Held batches
  (a list) are walked node by node all at once, holding every batch's live activations of both networks
  (when they fit in ``WALK_BYTES``); streamed ones, or too many, are read once per wave of consumers
  (``_sequential_lsq``: the same refits).
- ``"lsq_independent"`` — the same refit of every consumer at once on the *original* network's inputs
  (``C = D``): one pass with hooks, nothing held, but the errors of consecutive layers add up (on the digits
  ResNet-20 at 10% of the FLOPs, fisher scores: 0.29 accuracy against 0.96 for ``"lsq"``).
- ``"newton"`` — the influence update ``dw = (H_ww + delta I)^-1 H_wm 1_S`` over all weights, the Newton step
  retraining would take, with a line search on the calibration loss.

A consumer without a bias folds its shift into the BatchNorm that follows it (``running_mean -= shift``);
consumers where neither is possible (grouped convs, functional calls) are left as they are and listed.

The data enters only through mergeable statistics (``fxprune.passes.stats``): per consumer a ``Sum`` of its
input rows (and, for lsq, of their Gram matrix) over the batches (``consumer_statistics``), and for newton the
curvature sums of ``MaskedLoss``. Statistics of two splits of the data, merged, give the compensation of all
of it; ``reduce`` (e.g. ``torch.distributed.all_reduce``) makes them global in a distributed run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes import op_table
from fxprune.passes.family import CompensationRole, OpTable
from fxprune.passes.masking import progress as show_progress
from fxprune.passes.oracle import StatsMasked, masked_model
from fxprune.passes.stats import Reduce, Sum

from fxprune.calib import Batch, Calibration
from fxprune.data import META_VALUE, ChannelGroup, PrunePlan, TensorValue
from fxprune.errors import InputError
from fxprune.trace import copy_graph_module

__all__ = [
    "COMPENSATIONS",
    "WALK_BYTES",
    "Compensation",
    "Consumer",
    "compensate",
    "consumer_statistics",
    "find_consumers",
    "live_bytes",
    "shift_target",
]

log = logging.getLogger(__name__)

COMPENSATIONS = ("none", "bias", "lsq", "lsq_independent", "newton")


@dataclass
class Compensation:
    """What compensation changed: full-size new tensors by qualified name, and consumers it had to skip."""

    method: str
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    step: float | None = None


@dataclass
class Consumer:
    node: fx.Node
    module: nn.Module
    removed: torch.Tensor  # removed input positions along the channel dim
    kept: torch.Tensor


def find_consumers(
    gm: fx.GraphModule, plan: PrunePlan, groups: Sequence[ChannelGroup], table: OpTable | None = None
) -> tuple[dict[str, Consumer], dict[str, str]]:
    """The module calls whose removed input columns compensation may fold or refit: the ``COLUMNS`` role
    of ``table`` (conv and linear modules; default ``op_table.DEFAULT_TABLE``), and the ones it must skip,
    with the reason."""
    table = table if table is not None else op_table.DEFAULT_TABLE
    by_name = {n.name: n for n in gm.graph.nodes}
    pruned = {g.id for g in groups if g.id in plan.kept}
    out: dict[str, Consumer] = {}
    skipped: dict[str, str] = {}
    for g in groups:
        if g.id not in pruned:
            continue
        for s in g.sites:
            if s.role != "in" or s.param not in plan.inputs:
                continue
            node = by_name[s.node]
            key = str(node.target)
            if key in out or key in skipped:
                continue
            mod = gm.get_submodule(key) if node.op == "call_module" else None
            if mod is None or table.compensation_role(mod) is not CompensationRole.COLUMNS:
                skipped[s.node] = "not an nn.Linear/nn.ConvNd module call"
                continue
            if isinstance(mod, nn.modules.conv._ConvNd) and (mod.groups != 1 or mod.padding_mode != "zeros"):
                skipped[key] = f"conv with groups={mod.groups}, padding_mode={mod.padding_mode!r}"
                continue
            if s.param != f"{key}.weight":
                skipped[key] = f"weight {s.param} is not the module's own"
                continue
            dim, kept = plan.inputs[s.param]
            n = _weight(mod).shape[dim]
            keep = torch.zeros(n, dtype=torch.bool)
            keep[list(kept)] = True
            out[key] = Consumer(node, mod, (~keep).nonzero().flatten(), keep.nonzero().flatten())
    return out, skipped


def _features(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of the consumer's input as its weight matrix sees them: ``(positions, in_features)``."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(mod, nn.modules.conv._ConvNd)
    if isinstance(mod, nn.Conv2d):
        if isinstance(mod.padding, str):
            raise NotImplementedError("string padding")
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # N, C*k*k, L
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise NotImplementedError(type(mod).__name__)


def consumer_statistics(gm: fx.GraphModule, consumers: Mapping[str, Consumer], batches: Iterable[Batch],
                        lsq: bool, max_rows: int) -> dict[str, Sum]:  # fmt: skip
    """One pass of ``gm`` over ``batches``: per consumer, a ``Sum`` of its input rows (one per position: per
    channel ``sum x``) and, for ``lsq``, of ``[X 1]^T [X 1]`` (float64, over at most ``max_rows`` rows of each
    call, a fixed random subset); count: the rows. Means and second moments are these sums over the count.
    A consumer never called has an empty sum."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    stats = {key: Sum() for key in consumers}
    hooks = []

    def hook(c: Consumer, stat: Sum):  # type: ignore[no-untyped-def]
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            chan = -1 if isinstance(c.module, nn.Linear) else 1
            flat = x.movedim(chan, -1).reshape(-1, x.shape[chan])
            parts = [flat.sum(0)]
            if lsq:
                rows = _rows(c.module, x, max_rows)
                parts.append(rows.T @ rows)
            stat.update(parts, count=flat.shape[0])

        return fn

    try:
        for key, c in consumers.items():
            hooks.append(c.module.register_forward_pre_hook(hook(c, stats[key])))
        with torch.no_grad():
            for b in batches:
                gm(*(t.to(device) for t in b.inputs))
    finally:
        for h in hooks:
            h.remove()
    return stats


def shift_target(gm: fx.GraphModule, c: Consumer, table: OpTable) -> tuple[str, float] | None:
    """Where a shift of the consumer's output goes: its bias (+1) or the following BatchNorm's mean (-1):
    a module of role ``RUNNING_MEAN`` in ``table``. ``None``: nowhere, so lsq refits the kept columns alone
    (no constant column in the least squares)."""
    if c.module.bias is not None:  # type: ignore[union-attr]
        return f"{c.node.target}.bias", 1.0
    users = list(c.node.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(str(users[0].target))
        running_mean = getattr(bn, "running_mean", None)
        if table.compensation_role(bn) is CompensationRole.RUNNING_MEAN and running_mean is not None:
            return f"{users[0].target}.running_mean", -1.0
    return None


def _shifted(gm: fx.GraphModule, target: tuple[str, float], shift: torch.Tensor) -> torch.Tensor:
    """The new value of a shift target (``shift_target``: the bias, or the BatchNorm mean, and its sign)
    once the consumer's output moves by ``shift``."""
    name, sign = target
    owner, _, leaf = name.rpartition(".")
    t = getattr(gm.get_submodule(owner), leaf)
    return (t.detach().double() + sign * shift.to(t.device)).to(t.dtype)


def _weight(mod: nn.Module) -> torch.Tensor:
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w


def _shift_conv_weight(mod: nn.Module) -> torch.Tensor:
    w = _weight(mod).detach().double()
    return w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # out x in: the weight seen by a constant input


def compensate(
    gm: fx.GraphModule,
    groups: Sequence[ChannelGroup],
    plan: PrunePlan,
    calib: Calibration,
    method: str,
    *,
    device: torch.device | None = None,
    damping: float = 1e-3,
    max_rows: int = 65536,
    newton_options: Mapping[str, object] | None = None,
    progress: bool = False,
    reduce: Reduce | None = None,
    table: OpTable | None = None,
) -> tuple[fx.GraphModule, Compensation]:
    """A copy of ``gm`` with compensated weights, and the record of what changed (``gm`` is untouched).

    ``progress`` reports the calibration batches and the consumers refitted (``passes.masking.progress``).
    ``reduce``: ``None`` in one process; in a distributed run (each process with its own ``calib``) the
    summing all-reduce (``torch.distributed.all_reduce``) applied to every statistic, so every process
    computes the compensation of all batches (each must call every consumer at least once).
    ``table``: whose compensation roles say which modules are consumers and which take a shift (None:
    ``op_table.DEFAULT_TABLE``).
    """
    table = table if table is not None else op_table.DEFAULT_TABLE
    if method not in COMPENSATIONS:
        raise InputError(f"compensate={method!r}: choose one of {', '.join(COMPENSATIONS)}")
    new = copy_graph_module(gm)
    result = Compensation(method)
    if method == "none" or not plan.kept:
        return new, result
    if method == "newton":
        return _newton(new, groups, plan, calib, device or torch.device("cpu"), damping, newton_options or {},
                       reduce)  # fmt: skip
    consumers, result.skipped = find_consumers(new, plan, groups, table)
    if method == "lsq":
        result.overrides = _sequential_lsq(new, consumers, plan, calib.batches, damping, max_rows, reduce, table,
                                           progress)  # fmt: skip
        _apply(new, result.overrides)
        return new, result
    lsq = method == "lsq_independent"
    batches = show_progress(calib.batches, progress, f"compensate {method}: batch")
    stats = consumer_statistics(new, consumers, batches, lsq, max_rows)
    if reduce is not None:
        stats = {key: stat.reduce(reduce) for key, stat in stats.items()}
    for key, c in show_progress(list(consumers.items()), progress, f"compensate {method}: consumer"):
        stat = stats[key]
        if stat.count == 0 or stat.empty:
            result.skipped[key] = "never called on the calibration data"
            continue
        target = shift_target(new, c, table)
        w2 = _weight(c.module).detach().double()
        if target is None and lsq:  # the kept columns alone re-fit (no shift to fold)
            _, refit = _lsq(c, stat, w2, damping, shift=False)
            result.overrides[f"{key}.weight"] = refit.to(w2.device, _weight(c.module).dtype)
            continue
        if target is None:
            result.skipped[key] = "no bias and no BatchNorm right after it to fold a shift into"
            continue
        mean = (stat.result()[0] / stat.count).double()
        weight_in = w2 if isinstance(c.module, nn.Linear) else _shift_conv_weight(c.module)
        new_weight: torch.Tensor | None = None
        if method == "bias":
            shift = weight_in[:, c.removed] @ mean[c.removed.to(mean.device)]
        else:
            fitted, new_weight = _lsq(c, stat, w2, damping)
            assert fitted is not None
            shift = fitted
        result.overrides[target[0]] = _shifted(new, target, shift)
        if new_weight is not None:
            result.overrides[f"{key}.weight"] = new_weight.to(w2.device, _weight(c.module).dtype)
    _apply(new, result.overrides)
    return new, result


def _lsq(
    c: Consumer, stat: Sum, w: torch.Tensor, damping: float, shift: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Re-fit kept columns + a bias shift from the consumer's statistics (``consumer_statistics`` with
    ``lsq``): returns (output shift, new full weight). ``shift=False`` (a consumer with no bias and no
    BatchNorm after it, e.g. a transformer's bias-free projections): the kept columns alone, no shift."""
    _, gram_sum = stat.result()
    gram = gram_sum / stat.count
    cols = _columns(c, w, shift).to(gram.device)
    return _solve(c, gram[cols][:, cols], gram[:, cols], w, damping, shift)


def _columns(c: Consumer, w: torch.Tensor, shift: bool) -> torch.Tensor:
    """The columns of the extended input ``[x 1]`` a refit keeps: the kept channels' (times the kernel
    taps of a conv), and the constant one when ``shift``."""
    per_chan = w[0].numel() // w.shape[1]  # unfolded positions per input channel (k*k for a conv)
    kept_cols = (c.kept[:, None] * per_chan + torch.arange(per_chan)[None, :]).reshape(-1)
    constant = torch.tensor([w[0].numel()]) if shift else torch.tensor([], dtype=torch.long)
    return torch.cat([kept_cols, constant])


def _solve(c: Consumer, gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, damping: float,
           shift: bool) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """The ridge refit ``W' = W_ext cross (gram + delta I)^-1`` of the kept columns ``S`` (``_columns``):
    ``gram`` the second moment of the input the consumer will see, over ``S`` (``|S| x |S|``), ``cross`` the
    moment of the extended input it saw in the original network against it (all columns x ``S``), ``delta =
    damping * mean(diag gram)``. Returns (output shift, new full weight)."""
    out_dim = w.shape[0]
    w_mat = w.reshape(out_dim, -1)
    cols = _columns(c, w, shift)
    kept_cols = cols[: len(cols) - int(shift)].to(gram.device)
    w_ext = torch.cat([w_mat, w_mat.new_zeros(out_dim, 1)], 1).to(gram.device)  # original: bias shift 0
    reg = damping * float(gram.diagonal().mean()) * torch.eye(len(cols), dtype=gram.dtype, device=gram.device)
    rhs = w_ext @ cross
    fitted = torch.linalg.solve(gram + reg, rhs.T).T  # out x |cols|
    new_w = w_mat.clone().to(gram.device)
    new_w[:, kept_cols] = fitted[:, : len(kept_cols)]
    return (fitted[:, -1] if shift else None), new_w.reshape(w.shape)


def _rows(mod: nn.Module, x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """The consumer's input rows (``_features``), at most ``max_rows`` of them (a fixed random subset, the
    same for two inputs of one shape), extended by a constant 1, in float64."""
    rows = _features(mod, x.detach().float())
    if rows.shape[0] > max_rows:
        idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        rows = rows[idx.to(rows.device)]
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1).double()


def _sequential_lsq(gm: fx.GraphModule, consumers: Mapping[str, Consumer], plan: PrunePlan,
                    batches: Iterable[Batch], damping: float, max_rows: int, reduce: Reduce | None, table: OpTable,
                    progress: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """``"lsq"``: the overrides of every consumer, refitted in graph order on the pruned network's inputs.

    Two networks see every batch: ``gm`` as it is (the target outputs) and the masked oracle of the plan
    (``passes.oracle.masked_model``: the pruned network, in the original coordinates). At the first call of
    each consumer, the sums of ``[x~ 1]^T [x~ 1]`` and ``[x 1]^T [x~ 1]`` over every batch (``x``: its input in
    ``gm``, ``x~``: in the pruned network, kept columns; one ``Sum``, all-reduced by ``reduce``) give its
    refit (``_solve``), which the pruned network takes (removed columns zero) before anything downstream of
    it is read; its shift goes to the bias or the BatchNorm after it (``shift_target``). A module called at
    several nodes is refitted from its first call.

    Held batches (a list or tuple) are walked node by node, all at once (``_walk``): one run of each
    network, holding every batch's live values of both, when their estimate (``live_bytes``) fits in
    ``WALK_BYTES``. Streamed batches, or held ones above it, are read once per wave of consumers (``_waves``:
    those with no consumer between them and the last wave), with hooks, one batch at a time: the same
    refits, at one pass over the data per wave."""
    masked = masked_model(gm, plan)
    inner = masked.model if isinstance(masked, StatsMasked) else masked
    assert isinstance(inner, fx.GraphModule)
    nodes = list(gm.graph.nodes)
    twin = dict(zip(nodes, inner.graph.nodes, strict=True))  # a deep copy: the same graph, in order
    refit_at: dict[fx.Node, str] = {}
    for n in nodes:
        if n.op == "call_module" and str(n.target) in consumers and str(n.target) not in refit_at.values():
            refit_at[n] = str(n.target)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    overrides: dict[str, torch.Tensor] = {}
    ticks = iter(show_progress(range(len(refit_at)), progress, "compensate lsq: consumer"))

    def refit(node: fx.Node, stat: Sum) -> None:
        key = refit_at[node]
        overrides.update(_refit(gm, inner, consumers[key], key, stat, damping, reduce, table))
        next(ticks, None)

    held = isinstance(batches, (list, tuple))
    if held:  # the walk holds every batch's live values of both networks: too many, and it goes in waves
        samples = sum(b.size for b in batches)
        too_big = torch.tensor([float(2 * live_bytes(gm, samples) > WALK_BYTES)])
        if reduce is not None:  # the same path in every process: their statistics are reduced in its order
            reduce(too_big)
        held = not bool(too_big.item())
    norms = masked.kept_norms() if isinstance(masked, StatsMasked) else nullcontext()
    with torch.no_grad(), norms:
        if held:
            _walk(gm, inner, twin, refit_at, consumers, [tuple(t.to(device) for t in b.inputs) for b in batches],
                  max_rows, refit)  # fmt: skip
        else:
            for wave in _waves(nodes, refit_at):
                stats = _wave_statistics(gm, inner, wave, refit_at, consumers, batches, device, max_rows)
                for node in wave:
                    refit(node, stats[node])
    for _ in ticks:  # the line of the last step is printed when the iterator finishes
        pass
    return overrides


#: the most bytes of live values the sequential lsq walk may hold (both networks, every batch), as estimated
#: by ``live_bytes``; above it, it reads the batches once per wave instead
WALK_BYTES = 4 * 2**30


def live_bytes(gm: fx.GraphModule, samples: int) -> int:
    """The peak bytes of the tensors alive at once while ``gm`` runs ``samples`` samples: from the shapes
    the last ``shape_propagate`` recorded (``META_VALUE``, at the example's batch size), scaled by the sample
    count over the example's. 0 when no shapes were recorded."""
    nodes = list(gm.graph.nodes)
    last_use = _last_use(nodes)

    def size(value: Any) -> int:
        if isinstance(value, TensorValue):
            return math.prod(value.shape) * torch.empty((), dtype=getattr(torch, value.dtype)).element_size()
        return sum(size(v) for v in value) if isinstance(value, tuple) else 0

    first = next((n for n in nodes if n.op == "placeholder"), None)
    value = first.meta.get(META_VALUE) if first is not None else None
    example = value.shape[0] if isinstance(value, TensorValue) and value.shape else 1
    live: dict[fx.Node, int] = {}
    total = peak = 0
    for i, n in enumerate(nodes):
        if n.op != "get_attr":  # parameters are not held per batch
            live[n] = size(n.meta.get(META_VALUE))
            total += live[n]
        peak = max(peak, total)
        for a in n.all_input_nodes:
            if last_use[a] == i:
                total -= live.pop(a, 0)
    return peak * samples // max(1, example)


def _last_use(nodes: Sequence[fx.Node]) -> dict[fx.Node, int]:
    """Per node, the position (in ``nodes``) of the last node that reads it."""
    return {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}


def _walk(gm: fx.GraphModule, inner: fx.GraphModule, twin: Mapping[fx.Node, fx.Node],
          refit_at: Mapping[fx.Node, str], consumers: Mapping[str, Consumer], inputs: Sequence[tuple[Any, ...]],
          max_rows: int, refit: Callable[[fx.Node, Sum], None]) -> None:  # fmt: skip
    """Run ``gm`` and ``inner`` node by node on every batch of ``inputs`` at once (``fx.Interpreter``),
    calling ``refit`` with a consumer's statistics (``_pair_rows``) before its first call runs; a value is
    dropped after its last use."""
    nodes = list(gm.graph.nodes)
    last_use = _last_use(nodes)
    placeholder_index = {n: i for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
    runners = (fx.Interpreter(gm), fx.Interpreter(inner))
    envs: list[tuple[dict[fx.Node, Any], dict[fx.Node, Any]]] = [({}, {}) for _ in inputs]
    for i, node in enumerate(nodes):
        if node in refit_at:
            arg = node.args[0]
            assert isinstance(arg, fx.Node)
            c, stat = consumers[refit_at[node]], Sum()
            for env, env_m in envs:
                stat.update(*_pair_rows(c, env[arg], env_m[twin[arg]], max_rows))
            refit(node, stat)
        for (env, env_m), args in zip(envs, inputs, strict=True):
            if node.op == "placeholder":
                k = placeholder_index[node]
                env[node] = env_m[twin[node]] = args[k] if k < len(args) else node.args[0]
                continue
            for runner, e, n in ((runners[0], env, node), (runners[1], env_m, twin[node])):
                runner.env = e
                e[n] = runner.run_node(n)
            for dead in node.all_input_nodes:
                if last_use[dead] == i:
                    env.pop(dead, None)
                    env_m.pop(twin[dead], None)


def _waves(nodes: Sequence[fx.Node], refit_at: Mapping[fx.Node, str]) -> list[list[fx.Node]]:
    """The refit nodes in waves: a node's wave is one more than the latest wave among the refit nodes it
    depends on, so no refit changes the input of another refit of its wave."""
    depth: dict[fx.Node, int] = {}
    waves: dict[int, list[fx.Node]] = {}
    for n in nodes:
        d = max((depth[a] for a in n.all_input_nodes), default=0)
        depth[n] = d + (n in refit_at)
        if n in refit_at:
            waves.setdefault(depth[n], []).append(n)
    return [waves[d] for d in sorted(waves)]


def _wave_statistics(gm: fx.GraphModule, inner: fx.GraphModule, wave: Sequence[fx.Node],
                     refit_at: Mapping[fx.Node, str], consumers: Mapping[str, Consumer], batches: Iterable[Batch],
                     device: torch.device, max_rows: int) -> dict[fx.Node, Sum]:  # fmt: skip
    """One pass over ``batches`` of both networks, with hooks on the wave's consumers (their first call in
    each run): per refit node, the statistics ``_walk`` collects for it."""
    stats = {n: Sum() for n in wave}
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def hook(key: str, side: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if (key, side) not in seen:  # a copy: an in-place op later in the run may change it
                seen[(key, side)] = args[0].detach().clone()

        return fn

    hooks = [net.get_submodule(refit_at[n]).register_forward_pre_hook(hook(refit_at[n], side))
             for n in wave for side, net in enumerate((gm, inner))]  # fmt: skip
    try:
        for b in batches:
            seen.clear()
            inputs = tuple(t.to(device) for t in b.inputs)
            gm(*inputs)
            inner(*inputs)
            for n in wave:
                key = refit_at[n]
                stats[n].update(*_pair_rows(consumers[key], seen[(key, 0)], seen[(key, 1)], max_rows))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _pair_rows(
    c: Consumer, x: torch.Tensor, xt: torch.Tensor, max_rows: int
) -> tuple[list[torch.Tensor], int]:
    """A consumer's statistics from one batch: ``[xt_S^T xt_S, x^T xt_S]`` over the extended rows
    (``_rows``; ``S``: the kept columns and the constant, ``_columns``), and the row count."""
    cols = _columns(c, _weight(c.module), shift=True)  # the constant is the last row: dropped by _refit
    x, xt = _rows(c.module, x, max_rows), _rows(c.module, xt, max_rows)[:, cols.to(x.device)]
    return [xt.T @ xt, x.T @ xt], x.shape[0]


def _refit(gm: fx.GraphModule, inner: fx.GraphModule, c: Consumer, key: str, stat: Sum, damping: float,
           reduce: Reduce | None, table: OpTable) -> dict[str, torch.Tensor]:  # fmt: skip
    """One consumer's refit from its statistics (``_pair_rows``), written into the pruned network ``inner``;
    returns its overrides (full-size tensors, original coordinates)."""
    if reduce is not None:
        stat = stat.reduce(reduce)
    gram, cross = (t / stat.count for t in stat.result())
    target = shift_target(gm, c, table)
    if target is None:  # no shift to fold: the kept columns alone (the constant is the last column)
        gram, cross = gram[:-1, :-1], cross[:, :-1]
    w = _weight(c.module).detach().double()
    shift, new_w = _solve(c, gram, cross, w, damping, shift=target is not None)
    dtype = _weight(c.module).dtype
    out = {f"{key}.weight": new_w.to(w.device, dtype)}
    if target is not None and shift is not None:
        out[target[0]] = _shifted(gm, target, shift)
    keep = torch.zeros(new_w.shape[1], dtype=torch.bool, device=new_w.device)
    keep[c.kept.to(new_w.device)] = True
    shape = [1, -1] + [1] * (new_w.dim() - 2)
    _weight(inner.get_submodule(key)).copy_((new_w * keep.view(shape)).to(dtype))  # removed columns zero
    for name, value in out.items():
        if name != f"{key}.weight":  # the shift: the bias, or the BatchNorm mean that runs after it
            owner, _, leaf = name.rpartition(".")
            getattr(inner.get_submodule(owner), leaf).copy_(value)
    return out


def _apply(gm: fx.GraphModule, overrides: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in overrides.items():
            owner, _, leaf = name.rpartition(".")
            getattr(gm.get_submodule(owner), leaf).copy_(value)


def _newton(gm: fx.GraphModule, groups: Sequence[ChannelGroup], plan: PrunePlan, calib: Calibration,
            device: torch.device, damping: float, options: Mapping[str, object],
            reduce: Reduce | None = None) -> tuple[fx.GraphModule, Compensation]:  # fmt: skip
    """The influence update: ``H_wm 1_S`` and ``(H_ww + damping I)^-1`` (CG) as combined curvature sums over
    the batches (``mask_products``, ``MaskedLoss.solve_ww``), then a line search on the summed loss."""
    from fxprune.passes.masking import MaskedLoss
    from fxprune.passes.score_hessian import mask_products

    curvature = str(options.get("curvature", "hessian"))
    damping = float(options.get("damping", damping))  # type: ignore[arg-type]
    iters = int(options.get("cg_iters", 20))  # type: ignore[call-overload]
    loss = MaskedLoss(gm, groups, calib, device, float(options.get("weight_decay", 0.0)), reduce)  # type: ignore[arg-type]
    removed = torch.zeros(loss.size, device=device)
    for gid, kept in plan.kept.items():
        if gid in loss.slices:
            sl = loss.slices[gid]
            mask = torch.ones(sl.stop - sl.start, device=device)
            mask[list(kept)] = 0
            removed[sl] = mask
    batches = loss.batches()
    ((hw, _),) = mask_products(loss, batches, [(loss.zeros_w(), removed)], curvature)
    (dw,) = loss.solve_ww([hw], batches, curvature, damping, iters)
    m = 1 - removed
    best, best_loss = 0.0, float("inf")
    for step in (0.0, 0.25, 0.5, 1.0):  # a line search on the calibration loss of the pruned model
        w = [p + step * d for p, d in zip(loss.w0, dw, strict=True)]
        total = Sum.zeros_like([torch.zeros((), dtype=torch.float64)])
        with torch.no_grad():
            for bd in (b.to(device) for b in batches):
                total.update(
                    [torch.tensor(float(calib.loss(loss.forward(w, m, bd), bd)), dtype=torch.float64)]
                )
        value = float(loss.combine(total).result()[0])
        if value < best_loss:
            best, best_loss = step, value
    result = Compensation("newton", step=best)
    if best > 0:
        for name, p, d in zip(loss.names, loss.w0, dw, strict=True):
            result.overrides[name] = (p + best * d).detach().to("cpu")
    _apply(gm, result.overrides)
    return gm, result
