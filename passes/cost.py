"""Cost analysis: the ``Cost`` protocol selection budgets against, and its FLOPs implementation.

``Cost`` is all ``fxprune.select`` knows of a cost model: the cost of an assignment of kept counts, the
saving of each step of one group from the current assignment, and which groups interact (share an op). FLOPs
(``CostModel``, below) is one implementation; a parameter count or a measured latency (per-op tables,
step-shaped in the channel counts) are others, written against the same six members.

Per-node FLOPs at full width come from ``torch.utils.flop_counter.FlopCounterMode`` (shape propagation);
the op rules declare which channel dims scale them (conv/linear: input and output dims, depthwise: one).
A node's FLOPs are ``F0 * prod_d size_d(kept) / size_d(full)``, exact for conv, linear and matmul.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np
import torch.fx as fx
from fxprune.passes.base import AnalysisPass

from fxprune.data import META_COST_DIMS, META_FLOPS, Segments

__all__ = ["Cost", "CostModel", "CostPass", "NodeCost"]


@runtime_checkable
class Cost(Protocol):
    """A cost model as selection sees it: a cost for every assignment of kept channel counts to groups.

    ``sizes`` maps every group id in ``group_sizes`` to a kept count (``group_sizes`` itself is the full
    model). Selection only reads; an implementation must not mutate ``sizes``.
    """

    @property
    def unit(self) -> str:
        """What the costs count, for messages: ``"FLOPs"``, ``"parameters"``, ``"ms"``."""
        ...

    @property
    def group_sizes(self) -> Mapping[int, int]:
        """Group id -> full channel count, for every group: the assignment selection starts from."""
        ...

    @property
    def total(self) -> float:
        """The cost of the full model, ``at(group_sizes)``."""
        ...

    def at(self, sizes: Mapping[int, int]) -> float:
        """The cost of the model with ``sizes[g]`` channels kept in every group ``g``."""
        ...

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        """The cost saved by each step ``ladder[i] -> ladder[i + 1]`` of ``group`` (``ladder`` decreasing,
        ``ladder[0] == sizes[group]``), every other group at ``sizes``: what selection ranks steps by. An
        estimate is allowed (FLOPs linearises at ``sizes``); selection re-checks with ``at`` each round."""
        ...

    def interactions(self) -> Mapping[int, frozenset[int]]:
        """Group id -> the groups whose sizes its ``step_savings`` depend on (groups sharing an op with it,
        itself included); a group missing here interacts with none."""
        ...


@dataclass(frozen=True)
class NodeCost:
    node: str
    flops: int
    dims: tuple[Segments, ...]
    full: tuple[int, ...]

    def at(self, sizes: Mapping[int, int]) -> float:
        f = float(self.flops)
        for segs, full in zip(self.dims, self.full, strict=True):
            f *= sum(sizes[g] * r for g, r in segs) / full
        return f


@dataclass(frozen=True)
class CostModel:
    """FLOPs of the whole graph as a function of kept sizes per group: the ``Cost`` selection uses by default.

    A node's FLOPs are a product of width ratios of at most two groups, so a group's saving per channel
    depends only on the groups sharing its nodes; ``step_savings`` linearises at the current sizes (exact
    unless a node's two dims are the same group).
    """

    nodes: tuple[NodeCost, ...]
    group_sizes: Mapping[int, int]
    unit = "FLOPs"  # a class attribute, not a field

    @property
    def total(self) -> int:
        return sum(n.flops for n in self.nodes)

    def flops(self, sizes: Mapping[int, int] | None = None) -> float:
        s = self.group_sizes if sizes is None else sizes
        return math.fsum(n.at(s) for n in self.nodes)

    def at(self, sizes: Mapping[int, int]) -> float:
        return self.flops(sizes)

    def touching(self) -> dict[int, list[int]]:
        """Group id -> indices of the nodes whose cost depends on it."""
        out: dict[int, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for g in {g for segs in n.dims for g, _ in segs}:
                out.setdefault(g, []).append(i)
        return out

    @cached_property
    def _touching(self) -> dict[int, list[int]]:
        return self.touching()  # computed once per model (a frozen dataclass: cached in the instance dict)

    def interactions(self) -> dict[int, frozenset[int]]:
        nodes = self.nodes
        return {
            gid: frozenset({g for i in ids for segs in nodes[i].dims for g, _ in segs} | {gid})
            for gid, ids in self._touching.items()
        }

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        """``m * (ladder[i] - ladder[i + 1])``, ``m`` the FLOPs saved by removing one channel of ``group``
        at ``sizes`` (a difference of two ``fsum`` over the nodes touching it)."""
        ids = self._touching.get(group, [])
        s = dict(sizes)
        before = math.fsum(self.nodes[i].at(s) for i in ids)
        s[group] -= 1
        after = math.fsum(self.nodes[i].at(s) for i in ids)
        steps = np.asarray(ladder)
        return (before - after) * (steps[:-1] - steps[1:])


class CostPass(AnalysisPass[CostModel]):
    def __init__(self, group_sizes: Mapping[int, int]) -> None:
        self.group_sizes = dict(group_sizes)

    def run(self, gm: fx.GraphModule) -> CostModel:
        nodes = []
        for n in gm.graph.nodes:
            f = int(n.meta.get(META_FLOPS, 0))
            if f <= 0:
                continue
            dims: tuple[Segments, ...] = n.meta.get(META_COST_DIMS, ())
            full = tuple(sum(self.group_sizes[g] * r for g, r in segs) for segs in dims)
            nodes.append(NodeCost(n.name, f, dims, full))
        return CostModel(tuple(nodes), self.group_sizes)
