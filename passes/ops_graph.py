"""Op family ``graph``: the graph's own nodes (inputs, parameters read by ``get_attr``, the output, and the
calls that build output containers).

Inputs carry no prunable channels; a ``get_attr`` of a tensor is a ``ParamRef`` (a rule that reads it as
an operand slices it); everything that reaches the output is pinned, however deeply nested in containers.
The ONNX writer handles these nodes itself (inputs, initializers, outputs), so they have no translation.
"""

from __future__ import annotations

from typing import Any

from fxprune.passes.family import GraphOp, OpFamily, Ops
from fxprune.passes.rule_context import ParamRef, RuleContext

from fxprune.data import TensorValue

__all__ = ["FAMILY"]


def _placeholder(ctx: RuleContext) -> Any:
    return None


def _get_attr(ctx: RuleContext) -> Any:
    return ParamRef(str(ctx.node.target)) if isinstance(ctx.out, TensorValue) else None


def _output(ctx: RuleContext) -> Any:
    ctx.pin_inputs("reaches the graph output")
    return None


def _container(ctx: RuleContext) -> Any:
    """A container built by a call of its class (``fxprune.trace.is_container_call``: a dict/list subclass,
    a dataclass, a nested namedtuple; an output such as ``OrderedDict(out=x)``): channels are not followed
    through containers, so every space in it is pinned, however deeply nested."""
    ctx.pin_inputs(f"packed into a {ctx.node.target.__qualname__}")  # type: ignore[union-attr]
    return None


FAMILY = OpFamily(
    "graph",
    (
        Ops((GraphOp("placeholder"),), _placeholder),
        Ops((GraphOp("get_attr"),), _get_attr),
        Ops((GraphOp("output"),), _output),
        Ops((GraphOp("container"),), _container),
    ),
)
