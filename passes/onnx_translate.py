"""What an op's ONNX translation sees: the ``OnnxWriter`` protocol, ``Unsupported``, and shared helpers.

A translation (``OpEntry.onnx``, written next to its op's rule in a ``passes/ops_*.py`` family) is
``fn(w, n, m)``: it emits ONNX nodes for fx node ``n`` through ``w`` (``m`` is the module a
``call_module`` node calls, else None), naming the node's own output ``n.name``. It raises
``Unsupported`` for a case it does not model; the writer (``fxprune.onnx_writer``) then falls back to
torch's exporter for the whole graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

__all__ = [
    "OnnxTranslation",
    "OnnxWriter",
    "Unsupported",
    "arg",
    "fetch",
    "identity",
    "input_node",
    "ints",
    "pair_pads",
    "reshape",
    "spatial",
    "unary",
]


class Unsupported(Exception):  # noqa: N818 - a signal to fall back, not an error the user sees
    """The writer has no translation for this node; use torch's exporter instead."""


class OnnxWriter(Protocol):
    """The writer's side of a translation (``fxprune.onnx_writer``'s writer implements it)."""

    gm: fx.GraphModule

    def emit(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str] | str | None = None, **attrs: Any
    ) -> str:
        """Append ONNX node ``op``; returns its (first) output name, fresh unless ``outputs`` names it."""
        ...

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        """A new initializer holding ``value``."""
        ...

    def tensor(
        self, qualname: str, t: torch.Tensor, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> str:
        """The initializer of parameter ``qualname`` (``transform``-ed once, e.g. transposed)."""
        ...

    def shape(self, n: Any) -> tuple[int, ...]:
        """The static shape of float32 node ``n``; ``Unsupported`` for anything else."""
        ...

    def operand(self, a: Any) -> str:
        """A node's output, or a Python number as a float32 constant."""
        ...


OnnxTranslation = Callable[[OnnxWriter, fx.Node, "nn.Module | None"], None]


def fetch(gm: fx.GraphModule, target: str) -> Any:
    """The attribute ``target`` (dotted) of ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def arg(n: fx.Node, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` of ``n``, or its keyword ``key``, or ``default``."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(key, default)


def input_node(n: fx.Node) -> fx.Node:
    """``n``'s tensor input ``n.args[0]``, a node: fx records a tensor operand as one (a constant tensor as a
    ``get_attr`` node). Anything else raises ``Unsupported`` as ``OnnxWriter.shape`` does."""
    x = n.args[0]
    if not isinstance(x, fx.Node):
        raise Unsupported(f"{getattr(x, 'name', x)} is not a float32 tensor")
    return x


def pair_pads(padding: Sequence[int]) -> list[int]:
    return [*padding, *padding]


def ints(v: Any, k: int) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else [int(v)] * k


def spatial(w: OnnxWriter, n: fx.Node, x: fx.Node, k: int) -> int:
    """``k``, the op's number of spatial dims, when ``x`` is batched (N, C, *k dims): ONNX's pooling and
    convolution take no unbatched input."""
    if len(w.shape(x)) != k + 2:
        raise Unsupported(f"{n.name}: a {k}-d op on a rank-{len(w.shape(x))} input (unbatched)")
    return k


def unary(op: str, **attrs: Any) -> OnnxTranslation:
    """One ONNX op ``op`` on the node's input."""

    def write(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
        w.emit(op, [input_node(n).name], n.name, **attrs)

    return write


def identity(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
    w.emit("Identity", [input_node(n).name], n.name)


def reshape(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
    """The node's input reshaped to its (static) output shape."""
    # allowzero: a 0 in the (static) target shape is an empty dim, not "copy the input's"
    w.emit("Reshape", [input_node(n).name, w.const(w.shape(n), "shape", np.int64)], n.name, allowzero=1)
