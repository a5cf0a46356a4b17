"""Selection is a pure function: properties over random groups and costs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pytest
from fxprune.passes.cost import Cost, CostModel, NodeCost
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.data import ChannelGroup, Site
from fxprune.errors import TargetError
from fxprune.select import allowed_sizes, resolve_target, select


def _group(gid: int, n: int, pinned: bool = False) -> ChannelGroup:
    return ChannelGroup(
        gid, n, (Site(f"p{gid}", 0, 0, 1, "out", f"n{gid}"),), (f"n{gid}",), ("pin",) if pinned else ()
    )


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[ChannelGroup], dict[int, np.ndarray], CostModel]:
    n_groups = draw(st.integers(1, 6))
    sizes = [draw(st.integers(1, 24)) for _ in range(n_groups)]
    groups = [_group(i, n, pinned=draw(st.booleans()) and i > 0) for i, n in enumerate(sizes)]
    scores = {
        i: np.asarray(draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))) for i, n in enumerate(sizes)
    }
    nodes = []
    for j in range(draw(st.integers(1, 6))):
        a = draw(st.integers(0, n_groups - 1))
        b = draw(st.integers(0, n_groups - 1))
        dims = (((a, 1),), ((b, draw(st.integers(1, 3))),)) if draw(st.booleans()) else (((a, 1),),)
        full = tuple(sum(sizes[g] * r for g, r in d) for d in dims)
        nodes.append(NodeCost(f"c{j}", draw(st.integers(1, 10**6)), dims, full))
    if draw(st.booleans()):
        nodes.append(NodeCost("const", draw(st.integers(1, 10**5)), (), ()))
    return groups, scores, CostModel(tuple(nodes), dict(enumerate(sizes)))


@settings(max_examples=200, deadline=None)
@given(
    problem=problems(),
    frac=st.floats(0.05, 1.0),
    min_channels=st.integers(1, 3),
    round_to=st.sampled_from([1, 2, 4]),
)
def test_selection_meets_target_and_constraints(problem, frac, min_channels, round_to) -> None:  # type: ignore[no-untyped-def]
    groups, scores, cost = problem
    target = frac * cost.total
    try:
        sel = select(groups, scores, cost, target, min_channels=min_channels, round_to=round_to)
    except TargetError as e:
        assert e.min_flops is not None and e.min_flops > target
        return
    sizes = dict(cost.group_sizes)
    for gid, kept in sel.kept.items():
        g = groups[gid]
        assert g.prunable, "a pinned group lost channels"
        assert len(kept) in allowed_sizes(g.size, min_channels, round_to)
        assert len(kept) >= 1 and list(kept) == sorted(set(kept))
        removed = sorted(set(range(g.size)) - set(kept))
        assert max(scores[gid][removed]) <= min(scores[gid][list(kept)]) + 1e-12, (
            "kept a lower score than removed"
        )
        sizes[gid] = len(kept)
    assert cost.flops(sizes) == pytest.approx(sel.predicted_flops)
    assert sel.predicted_flops <= target * (1 + 1e-9)


def test_stops_just_under_target() -> None:
    groups = [_group(0, 100), _group(1, 100)]
    scores = {0: np.arange(100.0), 1: np.arange(100.0)}
    cost = CostModel((NodeCost("a", 10**6, (((0, 1),), ((1, 1),)), (100, 100)),), {0: 100, 1: 100})
    sel = select(groups, scores, cost, 0.5 * 10**6)
    assert 0.49 * 10**6 <= sel.predicted_flops <= 0.5 * 10**6


def test_unreachable_target_names_minimum() -> None:
    groups = [_group(0, 10)]
    cost = CostModel((NodeCost("a", 1000, (((0, 1),),), (10,)), NodeCost("k", 500, (), ())), {0: 10})
    with pytest.raises(TargetError, match="smallest model") as info:
        select(groups, {0: np.ones(10)}, cost, 100.0)
    assert info.value.min_flops == 600


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), "half", True, None])
def test_resolve_target_rejects(bad: object) -> None:
    with pytest.raises(TargetError, match="target_flops"):
        resolve_target(bad, 1000)  # type: ignore[arg-type]


def test_resolve_target_fraction_and_absolute() -> None:
    assert resolve_target(0.25, 1000) == 250
    assert resolve_target(400, 1000) == 400
    with pytest.raises(TargetError, match="exceeds"):
        resolve_target(5000, 1000)


def test_allowed_sizes() -> None:
    assert allowed_sizes(10, 1, 4) == [10, 8, 4]
    assert allowed_sizes(10, 5, 4) == [10, 8]
    assert allowed_sizes(5, 2, 1) == [5, 4, 3, 2]
    assert allowed_sizes(1, 1, 1) == [1]


@dataclass(frozen=True)
class StepLatency:
    """A second, independent ``Cost``: a toy latency, step-shaped in the channel counts as a measured table
    is (vector width 8). Op ``(a, b, ms)`` costs ``ms * ceil(size_a / 8) * ceil(size_b / 8)``; ``fixed`` is
    the overhead no channel count changes. Its step savings are exact differences, not linearised."""

    ops: tuple[tuple[int, int, float], ...]
    group_sizes: Mapping[int, int]
    fixed: float = 0.5
    unit = "ms"

    @property
    def total(self) -> float:
        return self.at(self.group_sizes)

    def at(self, sizes: Mapping[int, int]) -> float:
        return self.fixed + sum(
            ms * math.ceil(sizes[a] / 8) * math.ceil(sizes[b] / 8) for a, b, ms in self.ops
        )

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        costs = [self.at({**sizes, group: int(k)}) for k in ladder]
        return np.asarray(costs[:-1]) - np.asarray(costs[1:])

    def interactions(self) -> dict[int, frozenset[int]]:
        out: dict[int, set[int]] = {}
        for a, b, _ in self.ops:
            out.setdefault(a, {a}).update((a, b))
            out.setdefault(b, {b}).update((a, b))
        return {g: frozenset(v) for g, v in out.items()}


def test_flops_cost_model_is_a_cost() -> None:
    cost = CostModel((NodeCost("a", 1000, (((0, 1),),), (10,)),), {0: 10})
    assert isinstance(cost, Cost) and cost.unit == "FLOPs"
    assert cost.at({0: 5}) == cost.flops({0: 5}) == 500.0
    assert cost.step_savings(0, np.asarray([10, 8, 4]), {0: 10}).tolist() == [200.0, 400.0]
    assert cost.interactions() == {0: frozenset({0})}
    assert isinstance(StepLatency((), {}), Cost)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=5),
    data=st.data(),
    frac=st.floats(0.05, 1.0),
)
def test_selection_with_a_step_shaped_latency_cost(
    sizes: list[int], data: st.DataObject, frac: float
) -> None:
    """select knows the cost only through the protocol: a latency model lands under its budget too."""
    n = len(sizes)
    groups = [_group(i, k) for i, k in enumerate(sizes)]
    scores = {
        i: np.asarray(data.draw(st.lists(st.floats(0, 10), min_size=k, max_size=k)))
        for i, k in enumerate(sizes)
    }
    ops = tuple(
        (data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1)), data.draw(st.floats(0.01, 2.0)))
        for _ in range(data.draw(st.integers(1, 5)))
    )
    cost = StepLatency(ops, dict(enumerate(sizes)))
    target = frac * cost.total
    try:
        sel = select(groups, scores, cost, target, round_to=8)
    except TargetError as e:
        assert "ms is unreachable" in str(e) and e.min_flops is not None and e.min_flops >= target
        return
    kept = {g: len(sel.kept.get(g, range(k))) for g, k in enumerate(sizes)}
    for g, k in kept.items():
        assert k in allowed_sizes(sizes[g], 1, 8)
    # select's own tolerance: a target within 1e-12 (relative) of a reachable cost is reached (float rounding
    # of frac * total, e.g. frac = 0.9999999999999999 with nothing to prune)
    assert cost.at(kept) == sel.predicted_flops <= target * (1 + 1e-12)


def test_step_shaped_cost_prunes_to_whole_steps() -> None:
    """24 channels, 8 per step: a budget of 2/3 of the op's latency is met by one step of 8 channels of one
    of the two groups (the one of lower scores), landing exactly on the budget."""
    groups = [_group(0, 24), _group(1, 24)]
    scores = {0: np.arange(24.0), 1: np.arange(24.0) + 100}
    cost = StepLatency(((0, 1, 1.0),), {0: 24, 1: 24}, fixed=0.0)
    sel = select(groups, scores, cost, 6.0, round_to=8)
    assert {g: len(k) for g, k in sel.kept.items()} == {0: 16}
    assert sel.predicted_flops == 6.0


@settings(max_examples=100, deadline=None)
@given(problem=problems(), frac=st.floats(0.05, 1.0), round_to=st.sampled_from([1, 2]))
def test_bundles_keep_one_count_and_each_members_best(problem, frac, round_to) -> None:  # type: ignore[no-untyped-def]
    """Groups of one size in a bundle keep the same count, each its own highest-scored channels; the
    target is met as without bundles."""
    groups, scores, cost = problem
    by_size: dict[int, list[int]] = {}
    for g in groups:
        if g.prunable:
            by_size.setdefault(g.size, []).append(g.id)
    bundles = [tuple(ids) for ids in by_size.values() if len(ids) > 1]
    target = frac * cost.total
    try:
        sel = select(groups, scores, cost, target, round_to=round_to, bundles=bundles)
    except TargetError as e:
        assert e.min_flops is not None and e.min_flops > target
        return
    sizes = {g.id: len(sel.kept.get(g.id, range(g.size))) for g in groups}
    assert cost.at(sizes) <= target * (1 + 1e-9)
    for b in bundles:
        assert len({sizes[g] for g in b}) == 1, (b, sizes)
        for g in b:
            if g in sel.kept:
                k = len(sel.kept[g])
                best = set(np.argsort(scores[g], kind="stable")[len(scores[g]) - k :].tolist())
                assert set(sel.kept[g]) == best


def test_a_bundle_of_different_sizes_is_refused() -> None:
    groups = [_group(0, 4), _group(1, 6)]
    cost = CostModel(
        (NodeCost("a", 100, (((0, 1),),), (4,)), NodeCost("b", 100, (((1, 1),),), (6,))), {0: 4, 1: 6}
    )
    with pytest.raises(ValueError, match="different sizes"):
        select(groups, {0: np.ones(4), 1: np.ones(6)}, cost, 100, bundles=[(0, 1)])
