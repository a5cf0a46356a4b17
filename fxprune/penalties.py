"""``fxprune.penalty``: a training-time penalty over fxprune's channel groups, so that a model trained with
it prunes without fine-tuning.

A channel of a group is every place its index selects a parameter: the producer rows (``Site.role ==
"out"``), the per-channel norm parameters (``"norm"``, ``"stats"``) and the consumer columns (``"in"``),
across residual adds, concatenations, heads and flatten -> linear. Its *group norm* is

    ||theta_c|| = sqrt(sum over the group's parameter sites s of ||param_s[slice_c]||^2)

(buffers such as BatchNorm running statistics are not weights and are left out). When every site of a
channel is zero the channel computes nothing: removing it changes nothing, and ``compile`` finds it first.

Two penalties (``kind=``):

1. ``"group_lasso"``: ``strength * sum_c w_c * ||theta_c||`` over every prunable channel, ``w_c`` the FLOPs
   removing channel ``c`` saves (the compile's cost model, ``fxprune.passes.cost``) divided by the mean over
   the penalised channels, so expensive channels are pushed harder. Its gradient on each channel's weights
   has norm ``strength * w_c``: a uniform pull towards zero that the loss resists where the channel matters.
   ``target_flops`` only sets what ``report`` measures against.
2. ``"onthefly"`` (after Pruning On-the-Fly, Liu & Liu 2022: weights that are pushed either far from zero or
   near zero, the near-zero ones removed with no retraining and their mean value folded into the next
   layer): every ``schedule.every`` steps the channels to remove are chosen as ``compile`` would choose them
   (``fxprune.select.select`` under the FLOPs budget, with compile's ``min_channels`` and kept-count steps;
   the score is the group norm divided by the group's mean norm, ``compile(score="magnitude")``'s ranking);
   only those are penalised, ``strength * sum_{c removed} ||theta_c||``, and the kept channels not at all,
   so the loss alone shapes them while the removed ones go to zero. The choice follows the weights as they
   train, so the budget steers it. Compile the trained model with ``compensate="bias"`` (the mean-value
   recovery). Unlike the paper, the weights are not normalised onto a hypersphere and the kept channels
   get no push away from zero: fxprune keeps the layers as the user wrote them (how much accuracy this
   form keeps against the paper's is what ``bench/penalty.py``, still to come, is for).

``schedule`` (``PenaltySchedule``): the strength is 0 for ``delay`` steps, then ramps linearly to full over
``warmup`` steps; ``GroupPenalty.step()`` counts the steps (call it after each optimizer step).

The penalty reads the *live* parameters of the model it is given at each call, by qualified name, so it
works in a plain loop, on a ``torch.compile``d model (its ``_orig_mod`` holds the same parameter objects)
and under ``DistributedDataParallel`` (its ``.module``; every process computes the same penalty from the
same weights, so the all-reduced gradient is that of one process).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.data import ChannelGroup
from fxprune.errors import InputError, TargetError, warn
from fxprune.passes.cost import CostModel
from fxprune.select import select
from fxprune.stages import COMPILE, CompileOptions, CompileState

__all__ = [
    "DEFAULT_STRENGTH",
    "KINDS",
    "GroupPenalty",
    "GroupRow",
    "PenaltyReport",
    "PenaltySchedule",
    "penalty",
]

#: the penalties ``penalty(kind=)`` builds
KINDS = ("group_lasso", "onthefly")
#: ``penalty(strength=None)``: per kind, the strength the digits bench uses (bench/penalty.py). onthefly's
#: pull acts on the channels to remove only; the group lasso's on every channel, times the FLOPs weight (several
#: times the mean on the expensive groups), so it is weaker: at 0.015 it collapsed the training of mobilenetv2
#: (0.44 test accuracy) and of resnet20 (0.82) on one seed of two; 0.005 trained mobilenetv2 on that seed (0.98).
DEFAULT_STRENGTH = {"group_lasso": 0.005, "onthefly": 0.1}


@dataclass(frozen=True)
class PenaltySchedule:
    """When the penalty acts, in optimizer steps (``GroupPenalty.step()`` counts them).

    Attributes:
        warmup: the strength ramps linearly from ``strength / warmup`` to ``strength`` over this many steps
            after ``delay`` (0: full strength at once). E.g. the first two epochs: ``2 * len(loader)``.
        every: ``"onthefly"`` re-chooses the channels to remove every this many steps (from the current
            weights), so that the choice follows training and the budget steers it.
        delay: steps with no penalty at all; the first choice of ``"onthefly"`` is made at this step, from
            weights that have trained that long.
    """

    warmup: int = 0
    every: int = 50
    delay: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("warmup", 0), ("every", 1), ("delay", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InputError(f"PenaltySchedule({name}={v!r}): pass an integer number of steps >= {lo}")

    def factor(self, step: int) -> float:
        """The fraction of ``strength`` applied at optimizer step ``step`` (0-based)."""
        if step < self.delay:
            return 0.0
        if self.warmup <= 0:
            return 1.0
        return min(1.0, (step - self.delay + 1) / self.warmup)


@dataclass(frozen=True)
class GroupRow:
    """One prunable group in a ``PenaltyReport``.

    Attributes:
        group: the group id (``fxprune.dependency_graph(...).groups``).
        size: its channel count.
        below: how many of its channels have a group norm below the report's threshold.
        producers: the nodes producing its channels (conv/linear outputs), for people.
        penalised: how many channels the penalty pushes to zero now (``"onthefly"``: the current choice;
            ``"group_lasso"``: all of them).
    """

    group: int
    size: int
    below: int
    producers: tuple[str, ...]
    penalised: int


@dataclass(frozen=True)
class PenaltyReport:
    """How far training has emptied the channels: per group, how many channels are below
    ``threshold`` x the group's largest channel norm, and the FLOPs left if those went.

    Attributes:
        rows: one per penalised group.
        threshold: the relative norm below which a channel counts as removable.
        flops_ratio: FLOPs of the model without the channels below the threshold (every group keeping at
            least ``min_channels``), as a fraction of the original's (the compile's cost model).
        target_flops: the fraction of FLOPs the penalty aims at.
        step: the optimizer steps counted so far.
    """

    rows: tuple[GroupRow, ...]
    threshold: float
    flops_ratio: float
    target_flops: float
    step: int

    @property
    def below(self) -> int:
        return sum(r.below for r in self.rows)

    def __str__(self) -> str:
        lines = [
            f"fxprune penalty at step {self.step}: {self.below} of {sum(r.size for r in self.rows)} channels "
            f"below {self.threshold:g} x their group's largest norm; without them {self.flops_ratio:.3f} of "
            f"the FLOPs (target {self.target_flops:.3f})",
            f"{'group':>6} {'size':>5} {'below':>6} {'penal.':>6}  producers",
        ]
        for r in self.rows:
            names = ", ".join(r.producers[:3]) + (
                f" (+{len(r.producers) - 3})" if len(r.producers) > 3 else ""
            )
            lines.append(f"{r.group:>6} {r.size:>5} {r.below:>6} {r.penalised:>6}  {names}")
        return "\n".join(lines)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: through ``DistributedDataParallel``/``DataParallel``
    (``.module``) and ``torch.compile`` (``._orig_mod``), in any nesting."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _tensor(root: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``name`` (a qualified name) of ``root`` as its module exposes it now: a parameter, a
    buffer, or a parametrized weight computed from its parametrization."""
    path, _, attr = name.rpartition(".")
    try:
        value = getattr(root.get_submodule(path), attr)
    except AttributeError as exc:
        raise InputError(
            f"the model has no tensor {name!r}, which fxprune's channel groups read: pass the model the penalty "
            "was built from (a torch.compile'd or DistributedDataParallel wrapper of it is fine)"
        ) from exc
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name!r} of the model is a {type(value).__name__}, not a tensor")
    return value


class GroupPenalty(nn.Module):
    """A loss term over the channel groups of one model (``fxprune.penalty`` builds it).

    ``forward(model)`` returns a scalar to add to the training loss; ``step()`` after each optimizer step
    advances the schedule; ``report(model)`` says how many channels are near zero and the FLOPs left without
    them; ``removable`` is the current choice of channels to remove (``"onthefly"``). It holds no
    parameters: only index tensors (buffers, moved by ``.to``) and the step count (in its ``state_dict``,
    with the current choice, so a checkpoint resumes it).

    Indexing: the channels of the penalised groups are numbered ``0..N-1`` (group by group, in group id
    order); for every parameter dim some group cuts (``keys``), ``positions_k`` lists the positions of that
    dim a channel selects and ``channels_k`` the channel each belongs to, so one ``index_add`` per key sums
    the squares of every site into ``N`` values.
    """

    steps: torch.Tensor
    channel_weight: torch.Tensor
    penalised: torch.Tensor

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        cost: CostModel,
        target: float,
        round_to: Mapping[int, int],
        *,
        kind: str,
        strength: float,
        schedule: PenaltySchedule,
        min_channels: int,
        cost_exponent: float,
        trainable: Iterable[str],
    ) -> None:
        super().__init__()
        self.groups = tuple(groups)
        self.cost = cost
        self.target = float(target)
        self.round_to = dict(round_to)
        self.kind, self.strength, self.schedule = kind, float(strength), schedule
        self.min_channels, self.cost_exponent = min_channels, float(cost_exponent)
        trainable = set(trainable)
        self.bounds: dict[int, tuple[int, int]] = {}  # group id -> [start, end) in the channel numbering
        n = 0
        for g in self.groups:
            self.bounds[g.id] = (n, n + g.size)
            n += g.size
        self.num_channels = n
        positions: dict[tuple[str, int], list[torch.Tensor]] = {}
        channels: dict[tuple[str, int], list[torch.Tensor]] = {}
        for g in self.groups:
            start = self.bounds[g.id][0]
            for s in g.sites:
                if s.param not in trainable:
                    continue
                pos = s.offset + torch.arange(g.size * s.repeat)
                positions.setdefault((s.param, s.dim), []).append(pos)
                channels.setdefault((s.param, s.dim), []).append(
                    start + torch.arange(g.size).repeat_interleave(s.repeat)
                )
        self.keys = tuple(positions)
        for i, key in enumerate(self.keys):
            self.register_buffer(f"positions_{i}", torch.cat(positions[key]), persistent=False)
            self.register_buffer(f"channels_{i}", torch.cat(channels[key]), persistent=False)
        saved = np.zeros(n)
        for g in self.groups:
            a, b = self.bounds[g.id]
            saved[a:b] = cost.step_savings(g.id, np.array([g.size, g.size - 1]), cost.group_sizes)[0]
        if not (saved > 0).any():
            raise InputError(
                "no penalised channel saves FLOPs (the groups' channels feed no counted op): nothing to train "
                "towards; check units= or the model's FLOPs (fxprune.inspect)"
            )
        weight = saved / saved.mean() if kind == "group_lasso" else np.ones(n)
        self.register_buffer("channel_weight", torch.tensor(weight, dtype=torch.float32), persistent=False)
        self.register_buffer("penalised", torch.ones(n, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._chosen_at = -1

    # -- the penalty ----------------------------------------------------------------------------------------

    def channel_norms(self, model: nn.Module) -> torch.Tensor:
        """``||theta_c||`` of every penalised channel (``N`` values, differentiable), read from ``model``'s
        live parameters (``model`` may be wrapped by ``torch.compile`` or DDP)."""
        root = _unwrap(model)
        squares: torch.Tensor | None = None
        for i, (name, dim) in enumerate(self.keys):
            t = _tensor(root, name)
            other = [d for d in range(t.dim()) if d != dim]
            per_position = t.pow(2).sum(other) if other else t.pow(2)
            if squares is None:
                squares = torch.zeros(self.num_channels, dtype=per_position.dtype, device=per_position.device)
            pos, ch = getattr(self, f"positions_{i}"), getattr(self, f"channels_{i}")
            squares = squares.index_add(
                0, ch.to(per_position.device), per_position[pos.to(per_position.device)]
            )
        if squares is None:
            return torch.zeros(self.num_channels)
        # sqrt with a zero (sub)gradient at 0, so an emptied channel stays finite and at rest
        nonzero = squares > 0
        return torch.where(nonzero, squares, torch.ones_like(squares)).sqrt() * nonzero

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The penalty on ``model``'s current weights: ``strength * schedule.factor(step) * sum_c w_c * m_c *
        ||theta_c||`` (``m_c``: 1 for a penalised channel), a scalar with gradients to every site. With
        ``"onthefly"`` the channels to remove are chosen again here when ``schedule.every`` steps have passed
        since the last choice."""
        norms = self.channel_norms(model)
        step = int(self.steps)
        factor = self.schedule.factor(step)
        if self.kind == "onthefly" and factor > 0 and self._due(step):
            self.choose(norms.detach())
            self._chosen_at = step
        weight = (self.channel_weight * self.penalised).to(norms)
        return (self.strength * factor) * (weight * norms).sum()

    def _due(self, step: int) -> bool:
        if self._chosen_at == step:
            return False  # several forwards in one step (gradient accumulation): one choice
        return self._chosen_at < 0 or (step - self.schedule.delay) % self.schedule.every == 0

    def step(self) -> None:
        """Count one optimizer step (call it after ``optimizer.step()``)."""
        self.steps += 1

    # -- the choice -----------------------------------------------------------------------------------------

    def split(self, values: torch.Tensor) -> dict[int, np.ndarray]:
        """Per group id, its channels' entries of ``values`` (``N`` values in the channel numbering)."""
        v = values.detach().double().cpu().numpy()
        return {gid: v[a:b] for gid, (a, b) in self.bounds.items()}

    def choose(self, norms: torch.Tensor) -> dict[int, tuple[int, ...]]:
        """Choose the channels to remove under the budget from ``norms`` (``channel_norms``) and penalise
        those (``"onthefly"``): ``fxprune.select.select`` with each channel's norm divided by its group's
        mean norm as the score, ``cost_exponent`` and compile's kept-count steps (any count when the steps
        cannot reach the target, as compile does). Returns the removed channels per group."""
        scores = {}
        for gid, v in self.split(norms).items():
            mean = float(v.mean())
            scores[gid] = v / mean if mean > 0 else v
        try:
            chosen = select(self.groups, scores, self.cost, self.target, min_channels=self.min_channels,
                            round_to=self.round_to, cost_exponent=self.cost_exponent)  # fmt: skip
        except TargetError:
            if all(r == 1 for r in self.round_to.values()):
                raise
            chosen = select(self.groups, scores, self.cost, self.target, min_channels=self.min_channels,
                            round_to=1, cost_exponent=self.cost_exponent)  # fmt: skip
        mask = torch.zeros(self.num_channels, dtype=torch.bool)
        removed: dict[int, tuple[int, ...]] = {}
        for g in self.groups:
            if g.id in chosen.kept:
                kept = set(chosen.kept[g.id])
                removed[g.id] = tuple(c for c in range(g.size) if c not in kept)
                a = self.bounds[g.id][0]
                mask[[a + c for c in removed[g.id]]] = True
        self.penalised.copy_(mask)
        return removed

    @property
    def removable(self) -> dict[int, tuple[int, ...]]:
        """The channels penalised now, per group id (groups with none left out): the current choice of
        ``"onthefly"``; every channel of every group for ``"group_lasso"``."""
        mask = self.penalised.cpu()
        out = {}
        for gid, (a, b) in self.bounds.items():
            idx = tuple(int(i) for i in torch.nonzero(mask[a:b]).flatten())
            if idx:
                out[gid] = idx
        return out

    # -- the report -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def report(self, model: nn.Module, threshold: float = 1e-2) -> PenaltyReport:
        """Per group, the channels whose norm is below ``threshold`` x the group's largest, and the
        fraction of the FLOPs left without them (each group keeping at least ``min_channels``, its
        largest)."""
        if not 0 < threshold < 1:
            raise InputError(f"threshold={threshold!r}: pass a fraction of the largest norm in (0, 1)")
        per_group = self.split(self.channel_norms(model))
        sizes = dict(self.cost.group_sizes)
        rows = []
        for g in self.groups:
            v = per_group[g.id]
            below = int((v < threshold * v.max()).sum()) if v.max() > 0 else g.size
            sizes[g.id] = max(g.size - below, min(self.min_channels, g.size))
            a, b = self.bounds[g.id]
            rows.append(GroupRow(g.id, g.size, below, g.producers, int(self.penalised[a:b].sum())))
        ratio = float(self.cost.at(sizes) / self.cost.total) if self.cost.total else 1.0
        target = self.target / self.cost.total if self.cost.total else 1.0
        return PenaltyReport(tuple(rows), threshold, ratio, target, int(self.steps))

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, strength={self.strength:g}, groups={len(self.groups)}, "
            f"channels={self.num_channels}, target={self.target / max(self.cost.total, 1):.3f} of the FLOPs"
        )

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._chosen_at = int(self.steps) if self.kind == "onthefly" else -1


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InputError(f"{name}={value!r}: pass a finite number >= 0")
    return float(value)


def penalty(
    model: nn.Module,
    example_input: Any,
    target_flops: float = 0.5,
    *,
    kind: str = "onthefly",
    strength: float | None = None,
    schedule: PenaltySchedule | None = None,
    units: Iterable[int] | None = None,
    min_channels: int = 1,
    round_to: int | None = None,
    cost_exponent: float = 0.0,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
    strict: bool = False,
) -> GroupPenalty:
    """A loss term that trains ``model`` towards a model ``fxprune.compile`` prunes to ``target_flops``
    without fine-tuning (see the module doc for the two penalties).

    ``model`` is analysed once, on a private copy, as ``compile`` analyses it (capture, channel groups,
    FLOPs cost model, kept-count steps); the returned ``GroupPenalty`` then reads the live weights of the
    model it is called with::

        pen = fxprune.penalty(model, x, 0.5, kind="onthefly", schedule=fxprune.PenaltySchedule(warmup=200))
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb) + pen(model)
            opt.zero_grad(); loss.backward(); opt.step(); pen.step()
        result = fxprune.compile(model.eval(), x, 0.5, score="magnitude", compensate="bias")

    Args:
        model: the model to train (not modified here).
        example_input: a tensor or tuple of tensors the model accepts.
        target_flops: the fraction of the FLOPs in (0, 1] (or an absolute count) the model will be compiled
            to: ``"onthefly"`` chooses its channels under it; ``report`` measures against it.
        kind: ``"onthefly"`` (default) or ``"group_lasso"``.
        strength: the penalty's coefficient (>= 0): the norm of its gradient on one penalised channel's
            weights (times ``w_c`` for ``"group_lasso"``); default ``DEFAULT_STRENGTH[kind]`` (0.1 for
            ``"onthefly"``, 0.005 for ``"group_lasso"``: what the digits bench uses, 8 epochs of 22 steps).
            A channel's norm falls by about ``lr * strength / (1 - momentum)`` a step against the loss.
        schedule: ``PenaltySchedule`` (default ``PenaltySchedule()``: full strength at once, a new choice every 50 steps).
        units: the group ids the penalty may act on (default: every prunable group).
        min_channels, round_to: as ``compile``'s; ``round_to=None`` uses compile's default kept-count steps
            (the runtime's channel alignment), so the choice is one compile can make.
        cost_exponent: ``"onthefly"`` ranks channels by ``score / FLOPs_saved ** cost_exponent``. The default
            0, ``compile(score="magnitude")``'s own, removes the channels of least relative norm until the
            budget is met: on the digits models it empties hundreds of channels at 50% FLOPs and compile
            removes exactly those; 1 (least norm per FLOP) concentrated the cut on a few expensive groups
            (mobilenetv2: 30 channels, 0.69 accuracy after the prune against 0.97 with 0).
        leaf_modules, concrete_args, capture, strict: how the model is captured, as ``compile``'s.

    Raises:
        InputError: an unknown ``kind``, a negative or non-finite ``strength``, ``units`` naming groups that
            do not exist or are pinned, or a model whose channel groups read tensors it does not expose.
        TargetError: ``target_flops`` out of range, or below what pruning can reach (with the minimum).
        TraceError: the model cannot be captured (as ``compile``).
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r} is not a penalty; choose one of {', '.join(map(repr, KINDS))}")
    strength = _positive("strength", DEFAULT_STRENGTH[kind] if strength is None else strength)
    cost_exponent = _positive("cost_exponent", cost_exponent)
    schedule = PenaltySchedule() if schedule is None else schedule
    if not isinstance(schedule, PenaltySchedule):
        raise InputError(f"schedule={schedule!r}: pass a fxprune.PenaltySchedule(warmup=, every=, delay=)")
    if target_flops is None:
        raise TargetError("target_flops=None: pass a fraction of the FLOPs in (0, 1], e.g. 0.5")
    options = CompileOptions(target_flops=target_flops, min_channels=min_channels, round_to=round_to,
                             leaf_modules=leaf_modules, concrete_args=concrete_args, capture=capture,
                             strict=strict, progress=False, verify=False)  # fmt: skip
    with warnings.catch_warnings():  # a model about to be trained is in training mode: no news
        warnings.filterwarnings("ignore", message="model is in training mode")
        state = COMPILE.until("latency").run(
            CompileState(model=model, example_input=example_input, options=options)
        )
    prunable = [g for g in state.dep.groups if g.prunable]
    if units is not None:
        wanted = sorted(set(units))
        by_id = {g.id: g for g in state.dep.groups}
        bad = [u for u in wanted if u not in by_id or not by_id[u].prunable]
        if bad:
            raise InputError(
                f"units={bad!r}: not prunable group ids of this model (prunable: {[g.id for g in prunable]}); "
                "see fxprune.inspect(model, x)"
            )
        prunable = [g for g in prunable if g.id in wanted]
    if not prunable:
        raise InputError("the model has no prunable channel group: nothing to penalise (see fxprune.inspect)")
    root = _unwrap(model)
    trainable = set()
    for g in prunable:
        for s in g.sites:
            t = _tensor(root, s.param)
            if t.dim() <= s.dim or t.shape[s.dim] < s.offset + g.size * s.repeat:
                raise InputError(
                    f"the model's {s.param!r} has shape {tuple(t.shape)}, but group {g.id} reads positions up to "
                    f"{s.offset + g.size * s.repeat} of its dim {s.dim}: build the penalty from this model"
                )
            if t.requires_grad:
                trainable.add(s.param)
    if not trainable:
        warn("no parameter of the prunable groups requires grad: the penalty has no gradient")
    pen = GroupPenalty(prunable, state.cost, state.target, state.round_to, kind=kind, strength=strength,
                       schedule=schedule, min_channels=min_channels, cost_exponent=cost_exponent,
                       trainable=trainable)  # fmt: skip
    if kind == "onthefly":
        with torch.no_grad():
            pen.choose(pen.channel_norms(model))  # a reachable target, checked now; chosen again at step 0
    return pen
