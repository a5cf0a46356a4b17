"""Op family ``linear``: ``nn.Linear`` (and subclasses that keep its forward, such as
``NonDynamicallyQuantizableLinear``), ``F.linear``, and ``torch.addmm`` with a parameter matrix (a linear
with its weight stored ``[in, out]``: transformers' ``Conv1D``).

The rule (``linear_rule``, shared with Swin's window merge) cuts weight columns with the last dim's
channels and makes the output features a new space; the attribute fix sets ``in_features`` and
``out_features``; ONNX emits ``Gemm`` or ``MatMul`` (+ ``Add``); a linear module is a compensation consumer
(``COLUMNS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import AttrFix, CompensationRole, OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, fetch, input_node
from fxprune.passes.rule_context import ParamRef, RuleContext, Tracked, param_name, tensor_shape
from fxprune.passes.weight_expr import WeightExpr, claim_weight

__all__ = ["FAMILY", "linear_rule"]


def linear_rule(ctx: RuleContext, x: Any, weight: str | WeightExpr, bias: str | WeightExpr | None,
                w_shape: Sequence[int], out_dim: int | None = None) -> Any:  # fmt: skip
    """Linear: the last dim of ``x`` cuts weight columns; the output's last dim (or ``out_dim``, for an op
    that also reshapes, like Swin's window merge) is a new space. ``weight``/``bias``: parameter names or
    values computed from parameters (``WeightExpr``, cut by ``claim_weight``)."""
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x)) or ()
    if t is not None and t.dim != len(xs) - 1:
        ctx.pin(t, "linear applied along a non-channel dim")
        t = None
    out = ctx.new_space(w_shape[0])
    claim_weight(ctx, weight, [*([(1, t.segs, "in")] if t is not None else []), (0, out, "out")])
    claim_weight(ctx, bias, [(0, out, "out")])
    ctx.cost(t.segs if t is not None else None, out)
    return Tracked(len(xs) - 1 if out_dim is None else out_dim, out)


def _linear_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.Linear)
    return linear_rule(
        ctx, ctx.arg(0, "input"), f"{ctx.node.target}.weight", param_name(ctx, "bias"), m.weight.shape
    )


def _linear_functional(ctx: RuleContext) -> Any:
    """``F.linear``: the weight (and bias) a parameter, or computed from parameters (``WeightExpr``)."""
    w = ctx.info(ctx.arg(1, "weight"))
    b = ctx.arg(2, "bias", None)
    usable = (ParamRef, WeightExpr)
    if not isinstance(w, usable) or (b is not None and not isinstance(ctx.info(b), usable)):
        ctx.pin_inputs("functional linear with a computed weight or bias")
        return None
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    bias = ctx.info(b) if isinstance(ctx.info(b), WeightExpr) else param_name(ctx, "bias")
    weight = w.name if isinstance(w, ParamRef) else w
    return linear_rule(ctx, ctx.arg(0, "input"), weight, bias, w_shape)


def _addmm(ctx: RuleContext) -> Any:
    """``torch.addmm(bias, x, weight)`` with ``weight`` a ``[in, out]`` parameter and ``bias`` an ``[out]``
    one (transformers' ``Conv1D``, GPT-2's projections): a linear whose weight is stored transposed. The
    channels of ``x``'s columns cut the weight's rows; its columns and the bias are a new space. Any other
    use (a computed matrix, ``beta``/``alpha`` other than 1, a broadcast bias) pins its inputs."""
    bias, x, weight = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    w, b = ctx.info(weight), ctx.info(bias)
    w_shape, b_shape = tensor_shape(ctx.value(weight)), tensor_shape(ctx.value(bias))
    scaled = ctx.node.kwargs.get("beta", 1) != 1 or ctx.node.kwargs.get("alpha", 1) != 1
    if not isinstance(w, ParamRef) or not isinstance(b, ParamRef) or scaled or w_shape is None:
        ctx.pin_inputs("addmm with a computed matrix or bias, or scaled")
        return None
    if b_shape != (w_shape[1],):
        ctx.pin_inputs("addmm with a bias that is not one value per output column")
        return None
    t = ctx.tracked(x)
    if t is not None and t.dim != 1:
        ctx.pin(t, "addmm applied along a non-channel dim")
        t = None
    out = ctx.new_space(w_shape[1])
    if t is not None:
        ctx.claim(w.name, 0, t.segs, "in")
    ctx.claim(w.name, 1, out, "out")
    ctx.claim(b.name, 0, out, "out")
    ctx.cost(t.segs if t is not None else None, out)
    return Tracked(1, out)


def _fix_linear(m: nn.Module, before: Mapping[str, int]) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


def _linear_parts(w: OnnxWriter, n: fx.Node, x: fx.Node, weight: str, bias: str | None) -> None:
    """``x @ weight.T + bias`` (``weight`` already transposed in its initializer)."""
    if len(w.shape(x)) == 2:
        w.emit("Gemm", [x.name, weight, *([bias] if bias else [])], n.name)
        return
    if bias is None:
        w.emit("MatMul", [x.name, weight], n.name)
    else:
        w.emit("Add", [w.emit("MatMul", [x.name, weight]), bias], n.name)


def _linear_onnx(w: OnnxWriter, n: fx.Node, m: Any) -> None:
    weight = w.tensor(f"{n.target}.weight", m.weight, np.transpose)
    bias = w.tensor(f"{n.target}.bias", m.bias) if m.bias is not None else None
    _linear_parts(w, n, input_node(n), weight, bias)


def _linear_fn_onnx(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    weight, bias = arg(n, 1, "weight"), arg(n, 2, "bias")
    if (
        not isinstance(weight, fx.Node)
        or weight.op != "get_attr"
        or (bias is not None and not isinstance(bias, fx.Node))
    ):
        raise Unsupported(f"{n.name}: linear with a computed weight")
    wt = w.tensor(str(weight.target), fetch(w.gm, str(weight.target)), np.transpose)
    _linear_parts(w, n, input_node(n), wt, bias.name if bias is not None else None)


FAMILY = OpFamily(
    "linear",
    (
        Ops(
            (nn.Linear,),
            _linear_module,
            attr_fix=AttrFix((), _fix_linear),
            onnx=_linear_onnx,
            compensation=CompensationRole.COLUMNS,
        ),
        Ops((F.linear,), _linear_functional, onnx=_linear_fn_onnx),
        Ops((torch.addmm,), _addmm),
    ),
)
