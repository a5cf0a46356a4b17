"""Pass infrastructure: an analysis pass may write namespaced node metadata and nothing else."""

from __future__ import annotations

import abc
from typing import Any, Generic, TypeVar

import torch.fx as fx

from fxprune.errors import PassContractError

__all__ = ["AnalysisPass", "PassContractError", "TransformPass"]

R = TypeVar("R")


def _fingerprint(gm: fx.GraphModule) -> tuple[Any, ...]:
    """The graph (by value: fx argument containers are immutable, a changed argument is a new one), every
    module's identity, and every parameter's and buffer's identity, storage, shape and version counter."""
    nodes = tuple((n, n.name, n.op, n.target, n.args, tuple(n.kwargs.items())) for n in gm.graph.nodes)
    tensors = tuple(
        (id(m), k, id(t), None if t is None else (t.data_ptr(), tuple(t.shape), t._version))
        for m in gm.modules()
        for table in (m._parameters, m._buffers)
        for k, t in table.items()
    )
    return nodes, tensors


class AnalysisPass(abc.ABC, Generic[R]):
    """Reads a GraphModule, writes only ``node.meta`` keys starting with ``fxprune.``, returns a result.

    ``__call__`` verifies the contract: graph structure, parameters (identity, shape and version counter)
    and non-fxprune metadata are unchanged after ``run``.
    """

    def __call__(self, gm: fx.GraphModule) -> R:
        before = _fingerprint(gm)
        foreign = {
            n.name: {k: id(v) for k, v in n.meta.items() if not k.startswith("fxprune.")}
            for n in gm.graph.nodes
        }
        result = self.run(gm)
        if _fingerprint(gm) != before:
            raise PassContractError(
                f"analysis pass {type(self).__name__} modified the graph or its parameters"
            )
        for n in gm.graph.nodes:
            now = {k: id(v) for k, v in n.meta.items() if not k.startswith("fxprune.")}
            if now != foreign.get(n.name, {}):
                raise PassContractError(
                    f"analysis pass {type(self).__name__} wrote non-fxprune meta on {n.name}"
                )
        return result

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule) -> R: ...


class TransformPass(abc.ABC):
    """Returns a new GraphModule; ``__call__`` checks that the input GraphModule is left untouched."""

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        before = _fingerprint(gm)
        out = self.run(gm)
        if out is gm or _fingerprint(gm) != before:
            raise PassContractError(f"transform pass {type(self).__name__} modified its input")
        return out

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule) -> fx.GraphModule: ...
