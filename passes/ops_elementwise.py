"""Op family ``elementwise``: broadcasting arithmetic on tensors (add, mul, where, addcmul...) and Python
arithmetic and comparisons, on tensors or on channel counts (``c // 2``, a ``SizeOf``).

Operands aligned with the output's channel dim share their channels (unified: a residual add ties both
branches); a parameter operand is sliced with them. Arithmetic on parameters alone (a weight computed in a
subclass's forward) is a ``weight_expr.WeightExpr``, cut by the conv or linear that reads it. ONNX
translations for add and mul.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxTranslation, OnnxWriter, Unsupported
from fxprune.passes.rule_context import (
    Rule,
    RuleContext,
    SizeOf,
    Tracked,
    param_dim,
    tensor_shape,
    tie_on_one_dim,
)
from fxprune.passes.weight_expr import combine, is_weight

__all__ = ["FAMILY"]


def _elementwise(operands: Callable[[RuleContext], Sequence[Any]]) -> Rule:
    """Broadcasting op: channels of every operand aligned with the output's channel dim are unified.

    Operands aligned from the right. A parameter operand (``x * self.scale``) is sliced with the channels;
    an untracked tensor that spans the channel dim pins it; a size-1 (broadcast) dim couples nothing.
    Without tracked channels, arithmetic of parameters (``gain * w``, ``(w - mean) / std``) is a
    ``WeightExpr`` (``weight_expr.combine``, with the op's kind from ``_WEIGHT_KIND``).
    """

    def rule(ctx: RuleContext) -> Any:
        ops = list(operands(ctx))
        so = tensor_shape(ctx.out)
        if so is None:
            return _size_math(ctx)
        n = len(so)
        tracked = [(x, ctx.tracked(x)) for x in ops if ctx.tracked(x) is not None]
        if not tracked:
            kind = _WEIGHT_KIND.get(ctx.node.target)
            if kind is not None and any(is_weight(ctx.info(x)) for x in ops):
                return combine(ctx, ops, kind)
            return _size_math(ctx) if isinstance(ctx.out, (int, float)) else None
        tie = tie_on_one_dim(ctx, tracked, lambda x, t: t.dim + n - len(tensor_shape(ctx.value(x)) or ()),
                              "operands carry channels on different dims", "elementwise op")  # fmt: skip
        if tie is None:
            return None
        D, ref = tie
        for x in ops:
            if not isinstance(x, fx.Node) or ctx.tracked(x) is not None:
                continue
            s = tensor_shape(ctx.value(x))
            if s is None:
                continue
            d = D - (n - len(s))
            if d < 0 or s[d] == 1:
                continue
            info = ctx.info(x)
            pd = param_dim(info, d)
            if pd is not None:
                ctx.claim(info.name, pd, ref, "norm")
            else:
                ctx.spaces.pin(
                    ref, f"an untracked tensor '{x.name}' spans the channel dim at node '{ctx.node.name}'"
                )
        return Tracked(D, ref)

    return rule


#: how zero flows through arithmetic on weights (``weight_expr.combine``); ops left out are not followed
_WEIGHT_KIND: dict[Any, str] = {
    **dict.fromkeys((operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
                     torch.subtract, torch.maximum, torch.minimum, "add", "add_", "sub", "sub_", "maximum",
                     "minimum"), "add"),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"), "mul"),
    **dict.fromkeys((operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide, "div",
                     "div_"), "div"),
    **dict.fromkeys((torch.pow, "pow"), "pow"),
}  # fmt: skip


def _two_operands(ctx: RuleContext) -> Sequence[Any]:
    return [ctx.arg(0, "input"), ctx.arg(1, "other")]


def _sizes_in(ctx: RuleContext, args: Iterable[Any]) -> list[SizeOf]:
    out: list[SizeOf] = []

    def collect(i: Any) -> None:
        if isinstance(i, SizeOf):
            out.append(i)
        elif isinstance(i, tuple):
            for j in i:
                collect(j)

    for a in args:
        collect(ctx.info(a))
    return out


def _scalar_math(ctx: RuleContext) -> Any:
    """Python arithmetic and comparisons: fine on sizes, elementwise on a tracked tensor."""
    if any(isinstance(a, fx.Node) and ctx.tracked(a) is not None for a in ctx.node.args):
        return _elementwise(_two_operands)(ctx)
    return _size_math(ctx)


def _size_math(ctx: RuleContext) -> Any:
    """Arithmetic on channel counts (``c // 2``) stays a ``SizeOf`` all the channels it read."""
    sizes = _sizes_in(ctx, (*ctx.node.args, *ctx.node.kwargs.values()))
    if not sizes:
        return None
    ctx.sizes_handled = True
    return SizeOf(tuple(seg for s in sizes for seg in s.segs))


# -- ONNX -----------------------------------------------------------------------------------------------------
def _binary(op: str) -> OnnxTranslation:
    def write(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
        a, b = n.args[0], n.args[1]
        if n.kwargs or not (isinstance(a, fx.Node) or isinstance(b, fx.Node)):
            raise Unsupported(f"{n.name}: {op} with {n.kwargs or 'no tensor operand'}")
        w.emit(op, [w.operand(a), w.operand(b)], n.name)

    return write


_ONNX = {
    operator.add: _binary("Add"),
    torch.add: _binary("Add"),
    "add": _binary("Add"),
    operator.mul: _binary("Mul"),
    torch.mul: _binary("Mul"),
    "mul": _binary("Mul"),
}

FAMILY = OpFamily(
    "elementwise",
    (
        Ops(
            (
                operator.add,
                operator.sub,
                operator.mul,
                operator.truediv,
                operator.iadd,
                operator.isub,
                operator.imul,
                operator.itruediv,
                torch.add,
                torch.sub,
                torch.subtract,
                torch.mul,
                torch.multiply,
                torch.div,
                torch.divide,
                torch.true_divide,
                torch.maximum,
                torch.minimum,
                torch.pow,
                "add",
                "add_",
                "sub",
                "sub_",
                "mul",
                "mul_",
                "div",
                "div_",
                "maximum",
                "minimum",
                "pow",
            ),
            _elementwise(_two_operands),
            onnx=_ONNX,
        ),  # fmt: skip
        Ops(
            (torch.where,),
            _elementwise(lambda ctx: [ctx.arg(0, "condition"), ctx.arg(1, "input"), ctx.arg(2, "other")]),
        ),
        Ops(
            (torch.addcmul, torch.addcdiv),
            _elementwise(lambda ctx: [ctx.arg(0, "input"), ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")]),
        ),
        Ops(
            (
                operator.floordiv,
                operator.mod,
                operator.lt,
                operator.le,
                operator.gt,
                operator.ge,
                operator.eq,
                operator.ne,
                "lt",
                "le",
                "gt",
                "ge",
                "eq",
                "ne",
            ),
            _scalar_math,
        ),  # fmt: skip
    ),
)
