"""Cost analysis: the FLOPs of every node as a function of the kept channel counts.

Per-node FLOPs at full width come from ``torch.utils.flop_counter.FlopCounterMode`` (shape propagation);
the op rules declare which channel dims scale them (conv/linear: input and output dims, depthwise: one).
A node's FLOPs are ``F0 * prod_d size_d(kept) / size_d(full)``, exact for conv, linear and matmul.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch.fx as fx
from fxprune.passes.base import AnalysisPass

from fxprune.data import META_COST_DIMS, META_FLOPS, Segments

__all__ = ["CostModel", "CostPass", "NodeCost"]


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
    """FLOPs of the whole graph as a function of kept sizes per group."""

    nodes: tuple[NodeCost, ...]
    group_sizes: Mapping[int, int]

    @property
    def total(self) -> int:
        return sum(n.flops for n in self.nodes)

    def flops(self, sizes: Mapping[int, int] | None = None) -> float:
        s = self.group_sizes if sizes is None else sizes
        return math.fsum(n.at(s) for n in self.nodes)

    def touching(self) -> dict[int, list[int]]:
        """Group id -> indices of the nodes whose cost depends on it."""
        out: dict[int, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for g in {g for segs in n.dims for g, _ in segs}:
                out.setdefault(g, []).append(i)
        return out


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
