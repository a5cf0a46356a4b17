"""Stage 4: global channel selection under a cost budget (FLOPs by default). A pure function of groups,
scores and a cost model; the cost model is seen only through the ``Cost`` protocol of ``passes/cost.py``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fxprune.data import ChannelGroup
from fxprune.errors import TargetError
from fxprune.passes.cost import Cost

__all__ = ["Selection", "allowed_sizes", "resolve_target", "select"]


@dataclass(frozen=True)
class Selection:
    """The kept channels per pruned group, the cost they leave and the least cost reachable, in the cost
    model's unit (FLOPs for the default model, hence the field names)."""

    kept: dict[int, tuple[int, ...]]
    predicted_flops: float
    min_flops: float


def allowed_sizes(n: int, min_channels: int, round_to: int) -> list[int]:
    """Kept counts a group of ``n`` channels may have, largest first: ``n`` itself, then multiples of
    ``round_to`` below it, never fewer than ``min_channels`` (a group is never removed whole)."""
    lo = max(1, min_channels)
    if n <= lo:
        return [n]
    if round_to <= 1:
        return list(range(n, lo - 1, -1))
    sizes = [n] + [k for k in range((n - 1) // round_to * round_to, 0, -round_to) if k >= lo]
    return sizes


def resolve_target(target_flops: float, total: int | None) -> float:
    """A fraction in (0, 1] of ``total``, or an absolute FLOPs count (> 1). ``total=None`` checks the form
    only (before the FLOPs are counted) and returns the number."""
    if isinstance(target_flops, bool) or not isinstance(target_flops, numbers.Real):
        raise TargetError(f"target_flops must be a number, got {type(target_flops).__name__}; pass e.g. 0.5")
    t = float(target_flops)
    if math.isnan(t) or math.isinf(t) or t <= 0:
        raise TargetError(
            f"target_flops={target_flops!r} is out of range: pass a fraction in (0, 1] of the original FLOPs "
            "or an absolute FLOPs count" + (f" up to {total}" if total is not None else "")
        )
    if total is None:
        return t
    if t <= 1.0:
        return t * total
    if t > total:
        raise TargetError(
            f"target_flops={t:.0f} exceeds the model's {total} FLOPs; pass at most {total} or a fraction"
        )
    return t


def _lookahead(score: np.ndarray, saved: np.ndarray, cost_exponent: float) -> np.ndarray:
    """Priorities of a group's steps when some save nothing (or less than nothing, measurement noise): step
    ``i`` costs the scores of steps ``i..j`` over their saving, ``j`` the first step from ``i`` on after which
    the saving so far is positive; steps with no such ``j`` get ``inf`` (they are never worth taking)."""
    m = len(saved)
    out = np.full(m, np.inf)
    cum_score = np.concatenate([[0.0], np.cumsum(score)])
    cum_saved = np.concatenate([[0.0], np.cumsum(saved)])
    for i in range(m):
        ahead = np.nonzero(cum_saved[i + 1 :] - cum_saved[i] > 0)[0]
        if len(ahead):
            j = i + int(ahead[0])
            out[i] = (cum_score[j + 1] - cum_score[i]) / (cum_saved[j + 1] - cum_saved[i]) ** cost_exponent
    return out


def _refill(
    ladders: Mapping[int, list[int]],
    step: dict[int, int],
    sizes: dict[int, int],
    cumulative: Mapping[int, np.ndarray],
    cost: Cost,
    target: float,
    cost_now: float,
) -> float:
    """Give back taken steps while the cost stays within ``target``, the most valuable (largest score sum)
    first; returns the cost. Coarse steps (aligned counts) overshoot the target by up to a step of some
    group, and a step-shaped cost can leave a group between two blocks, where its last step saved nothing."""
    while True:
        undone = False
        last = {
            gid: cumulative[gid][lad[0] - lad[step[gid]]] - cumulative[gid][lad[0] - lad[step[gid] - 1]]
            for gid, lad in ladders.items()
            if step[gid] > 0
        }
        for gid in sorted(last, key=lambda g: -last[g]):
            step[gid] -= 1
            sizes[gid] = ladders[gid][step[gid]]
            c = cost.at(sizes)
            if c <= target:
                cost_now, undone = c, True
            else:
                step[gid] += 1
                sizes[gid] = ladders[gid][step[gid]]
        if not undone:
            return cost_now


def select(
    groups: Sequence[ChannelGroup],
    scores: Mapping[int, np.ndarray],
    cost: Cost,
    target: float,
    *,
    min_channels: int = 1,
    round_to: int | Mapping[int, int] = 1,
    cost_exponent: float = 1.0,
    bundles: Sequence[Sequence[int]] = (),
) -> Selection:
    """Remove the channels of least score per unit of cost saved until ``cost.at(sizes) <= target``.

    Each group removes channels in ascending score order, in steps that respect ``allowed_sizes``. A step's
    priority is ``sum(scores of its channels) / (cost it saves) ** cost_exponent``; priorities are made
    non-decreasing along each group so the global order respects every group's order. In each round all
    steps are ranked by ``cost.step_savings`` at the current sizes (FLOPs: linearised) and the cheapest steps
    covering half of the remaining excess are taken; the exact cost is then recomputed, so the last rounds
    take one step at a time and the result lands just under the target. A group whose steps save nothing
    at the current sizes waits for a later round. ``round_to``: one step for every group, or a step per
    group id (``passes.latency.group_alignment``).

    A step-shaped cost (latency) has steps that save nothing until a later step of the same group saves a
    block: such a step's priority is that of reaching the next step that saves, i.e. the scores of the
    channels up to there over the saving up to there (a step that saves nothing would otherwise never be
    taken, and the saving behind it never reached). When steps are coarse (a group's step above one
    channel) or the cost is not FLOPs, the taken steps that still fit are given back at the end, the most
    valuable first (``_refill``), so the result lands close under the target.

    ``bundles``: sets of groups of one size that keep the same *count* (each its own channels: the ones of
    least score in it), e.g. the MLP of every transformer layer, so that one config value describes them
    all. A bundle is selected as one group (``_Bundled``): its ``j``-th channel is the ``j``-th least
    scored channel of every member, with the sum of their scores, and a step changes every member's size.

    Raises:
        TargetError: the target is below the cost left with every prunable group at its minimum (FLOPs), or
            below the least cost the search reaches (another cost, which need not be least there).
        ValueError: a bundle joins groups of different sizes or rounding steps, or a group twice.
    """
    if bundles:
        return _select_bundled(groups, scores, cost, target, min_channels, round_to, cost_exponent, bundles)
    sizes = dict(cost.group_sizes)
    prunable = [g for g in groups if g.prunable and g.id in scores]
    steps = round_to if isinstance(round_to, Mapping) else {g.id: round_to for g in prunable}
    ladders = {g.id: allowed_sizes(g.size, min_channels, steps.get(g.id, 1)) for g in prunable}
    order = {g.id: np.argsort(np.asarray(scores[g.id], dtype=np.float64), kind="stable") for g in prunable}
    step = {gid: 0 for gid in ladders}

    min_sizes = dict(sizes)
    min_sizes.update({gid: lad[-1] for gid, lad in ladders.items()})
    min_flops = cost.at(min_sizes)
    # a cost that is not FLOPs need not be least at the smallest sizes (a measured latency: an unaligned
    # count can cost more than a larger aligned one), so its floor is what the search below reaches
    if min_flops > target * (1 + 1e-12) and cost.unit == "FLOPs":
        unit = cost.unit
        raise TargetError(
            f"target of {target:.4g} {unit} is unreachable: the smallest model fxprune can make has "
            f"{min_flops:.4g} {unit} ({min_flops / cost.total:.3f} of {cost.total}); pinned groups and "
            f"min_channels={min_channels} set that floor — pass a target >= {math.ceil(min_flops)}",
            min_flops=int(math.ceil(min_flops)),
            total_flops=int(math.ceil(cost.total)),
        )
    interactions = cost.interactions()
    # A group's step savings depend only on the sizes of the groups it interacts with: they are
    # recomputed when one of those changed in the last round (the same numbers, computed once).
    depends = {gid: interactions.get(gid, frozenset()) | {gid} for gid in ladders}
    cumulative = {
        gid: np.concatenate([[0.0], np.cumsum(np.asarray(scores[gid], dtype=np.float64)[order[gid]])])
        for gid in ladders
    }
    savings: dict[int, np.ndarray] = {}  # gid -> the savings of its remaining steps, at the current sizes
    ladder_arrays = {gid: np.asarray(lad) for gid, lad in ladders.items()}
    flops = cost.at(sizes)
    lowest = flops
    while flops > target:
        # every group's remaining steps, as arrays joined once per round (the same values and order as
        # extending Python lists step by step, so the stable sort below ranks them the same way)
        cand_gid: list[np.ndarray] = []
        cand_pri: list[np.ndarray] = []
        cand_save: list[np.ndarray] = []
        for gid, lad in ladders.items():
            if step[gid] + 1 >= len(lad):
                continue
            ladder = ladder_arrays[gid][step[gid] :]
            if gid not in savings:
                savings[gid] = cost.step_savings(gid, ladder, sizes)
            saved = savings[gid]
            if not (saved > 0).any():
                continue
            n = lad[0]
            hi, lo = ladder[:-1], ladder[1:]
            cs = cumulative[gid]
            if (saved > 0).all():
                pri = np.maximum.accumulate((cs[n - lo] - cs[n - hi]) / saved**cost_exponent)
            else:
                pri = np.maximum.accumulate(_lookahead(cs[n - lo] - cs[n - hi], saved, cost_exponent))
                # steps with no saving ahead (inf, a suffix: priorities only grow) are never worth taking
                finite = int(np.isfinite(pri).sum())
                if not finite:
                    continue
                pri, saved = pri[:finite], saved[:finite]
            cand_gid.append(np.full(len(pri), gid))
            cand_pri.append(pri)
            cand_save.append(saved)
        if not cand_gid:
            break
        excess = flops - target
        gids, saves = np.concatenate(cand_gid), np.concatenate(cand_save)
        idx = np.argsort(np.concatenate(cand_pri), kind="stable")
        budget, taken = 0.5 * excess, 0.0
        changed = set()
        for i in idx:  # most rounds take a few steps: index the arrays, do not convert them whole
            gid = int(gids[i])
            step[gid] += 1
            sizes[gid] = ladders[gid][step[gid]]
            changed.add(gid)
            taken += float(saves[i])
            if taken >= budget:
                break
        savings = {gid: m for gid, m in savings.items() if not depends[gid] & changed}
        flops = cost.at(sizes)
        lowest = min(lowest, flops)
    if flops > target * (1 + 1e-12):  # only a cost that is not FLOPs gets here (FLOPs: checked above)
        raise TargetError(
            f"target of {target:.4g} {cost.unit} is unreachable ({target / cost.total:.3f} of {cost.total:.4g} "
            f"{cost.unit}): the smallest model fxprune found costs {lowest:.4g} {cost.unit} "
            f"({lowest / cost.total:.3f}); pinned groups, min_channels={min_channels} and the kept-count steps "
            f"set that floor — pass a target of at least {lowest / cost.total:.3f} (or {lowest:.4g} {cost.unit})",
            min_flops=int(math.ceil(lowest)),
            total_flops=int(math.ceil(cost.total)),
        )
    if flops <= target and (any(len(lad) > 1 and lad[0] - lad[1] > 1 for lad in ladders.values())
                            or cost.unit != "FLOPs"):  # fmt: skip
        flops = _refill(ladders, step, sizes, cumulative, cost, target, flops)
    kept = {}
    for gid, lad in ladders.items():
        k = lad[step[gid]]
        if k < lad[0]:
            kept[gid] = tuple(sorted(int(i) for i in order[gid][lad[0] - k :]))
    return Selection(kept, flops, min_flops)


class _Bundled:
    """``cost`` seen with each bundle as one group (the id of its first member): a size for the bundle is
    the size of every member (the ``Cost`` protocol)."""

    def __init__(self, cost: Cost, bundles: Sequence[tuple[int, ...]]) -> None:
        self.cost = cost
        self.members = {b[0]: b for b in bundles}
        self.owner = {g: b[0] for b in bundles for g in b}
        self.unit = cost.unit
        self.total = cost.total
        self.group_sizes = {g: n for g, n in cost.group_sizes.items() if self.owner.get(g, g) == g}

    def expand(self, sizes: Mapping[int, int]) -> dict[int, int]:
        out = {g: sizes[self.owner.get(g, g)] for g in self.cost.group_sizes}
        return out

    def at(self, sizes: Mapping[int, int]) -> float:
        return self.cost.at(self.expand(sizes))

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        full = self.expand(sizes)
        return sum(  # type: ignore[return-value]
            (self.cost.step_savings(m, ladder, full) for m in self.members.get(group, (group,))),
            np.zeros(len(ladder) - 1),
        )

    def interactions(self) -> dict[int, frozenset[int]]:
        out: dict[int, frozenset[int]] = {}
        for g, near in self.cost.interactions().items():
            o = self.owner.get(g, g)
            out[o] = out.get(o, frozenset()) | frozenset(self.owner.get(n, n) for n in near)
        return out


def _select_bundled(
    groups: Sequence[ChannelGroup],
    scores: Mapping[int, np.ndarray],
    cost: Cost,
    target: float,
    min_channels: int,
    round_to: int | Mapping[int, int],
    cost_exponent: float,
    bundles: Sequence[Sequence[int]],
) -> Selection:
    by_id = {g.id: g for g in groups}
    live = [tuple(g for g in b if g in scores and by_id[g].prunable) for b in bundles]
    live = [b for b in live if len(b) > 1]
    seen: set[int] = set()
    for b in live:
        if len({by_id[g].size for g in b}) > 1 or (
            isinstance(round_to, Mapping) and len({round_to.get(g, 1) for g in b}) > 1
        ):
            raise ValueError(f"bundle {b} joins groups of different sizes or rounding steps")
        if seen & set(b):
            raise ValueError(f"bundle {b} shares a group with another bundle")
        seen |= set(b)
    if not live:
        return select(groups, scores, cost, target, min_channels=min_channels, round_to=round_to,
                      cost_exponent=cost_exponent)  # fmt: skip
    sorted_scores = {
        g: np.sort(np.asarray(scores[g], dtype=np.float64), kind="stable") for b in live for g in b
    }
    virtual = dict(scores)
    for b in live:
        for g in b[1:]:
            virtual.pop(g)
        virtual[b[0]] = np.sum([sorted_scores[g] for g in b], axis=0)
    bundled = _Bundled(cost, live)
    members = {g for b in live for g in b[1:]}
    chosen = select([g for g in groups if g.id not in members], virtual, bundled, target,  # type: ignore[arg-type]
                    min_channels=min_channels, round_to=round_to, cost_exponent=cost_exponent)  # fmt: skip
    kept = {g: k for g, k in chosen.kept.items() if g not in bundled.members}
    for b in live:
        if b[0] not in chosen.kept:
            continue
        k = len(chosen.kept[b[0]])
        for g in b:
            order = np.argsort(np.asarray(scores[g], dtype=np.float64), kind="stable")
            kept[g] = tuple(sorted(int(i) for i in order[len(order) - k :]))
    return Selection(kept, chosen.predicted_flops, chosen.min_flops)
