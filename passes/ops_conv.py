"""Op family ``conv``: ``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d`` (plain, depthwise and grouped).

The rule cuts weight columns with the input's channels and makes the output rows a new space (grouped:
whole group structure kept); the attribute fix sets ``in_channels``, ``out_channels`` and ``groups`` from
the sliced weight; the ONNX translation emits ``Conv``; a conv module is a compensation consumer
(``COLUMNS``: its removed input columns fold into its bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import AttrFix, CompensationRole, OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, input_node, ints, pair_pads, spatial
from fxprune.passes.rule_context import ParamRef, RuleContext, Tracked, param_name, tensor_shape
from fxprune.passes.weight_expr import WeightExpr, claim_weight

__all__ = ["FAMILY"]


def _conv(
    ctx: RuleContext,
    x: Any,
    weight: str | WeightExpr,
    bias: str | WeightExpr | None,
    w_shape: Sequence[int],
    groups: int,
    groups_literal: int | str | None,
) -> Any:
    """Convolution: ``weight`` is ``[C_out, C_in/groups, *k]``.

    Cases: (1) ``groups == 1``: input channels cut weight columns, a new space of ``C_out`` rows;
    (2) depthwise (``C_in/groups == 1``): output channel ``c*m + r`` belongs to input channel ``c``
    (repeat ``m = C_out/C_in``), ``groups`` becomes the kept input count; (3) grouped: slot ``j`` of every
    input group is tied (so every group keeps the same slots), and the output is ``groups`` copies of one
    new space of ``C_out/groups`` — the group structure is never broken.

    ``weight`` and ``bias`` are parameter names, or values computed from parameters (``WeightExpr``: a
    traced subclass's standardised weight), whose parameters ``claim_weight`` cuts.
    """
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x))
    ch = 1 if xs is not None and len(xs) == len(w_shape) else 0
    if t is not None and t.dim != ch:
        ctx.pin(t, "conv input carries channels on a non-channel dim")
        t = None
    c_out, per_group = w_shape[0], w_shape[1]
    if groups == 1:
        out = ctx.new_space(c_out)
        claim_weight(ctx, weight, [*([(1, t.segs, "in")] if t is not None else []), (0, out, "out")])
        claim_weight(ctx, bias, [(0, out, "out")])
        ctx.cost(t.segs if t is not None else None, out)
        return Tracked(ch, out)
    if per_group == 1:
        if t is None:
            return None
        out = ctx.spaces.scale(t.segs, c_out // groups)
        claim_weight(ctx, weight, [(0, out, "out")])
        claim_weight(ctx, bias, [(0, out, "out")])
        ctx.cost(out)
        if groups_literal is not None:
            ctx.literal(groups_literal, None, t.segs)
        return Tracked(ch, out)
    slot = None
    slot_claim: list[tuple[int, Any, str]] = []
    if t is not None:
        pieces = ctx.spaces.pieces(t.segs, groups)
        if pieces is None:
            ctx.pin(t, "grouped conv cuts a repeated channel block")
        else:
            slot = pieces[0]
            for p in pieces[1:]:
                ctx.unify(slot, p, "grouped conv slots")  # type: ignore[arg-type]
            slot_claim.append((1, slot, "in"))
            if isinstance(weight, str):  # claimed before the output space is made, as it always was
                claim_weight(ctx, weight, slot_claim)
                slot_claim = []
    out = ctx.new_space(c_out // groups) * groups
    claim_weight(ctx, weight, [*slot_claim, (0, out, "out")])
    claim_weight(ctx, bias, [(0, out, "out")])
    ctx.cost(slot, out)
    return Tracked(ch, out)


def _conv_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    return _conv(
        ctx,
        ctx.arg(0, "input"),
        f"{ctx.node.target}.weight",
        param_name(ctx, "bias"),
        m.weight.shape,
        m.groups,
        None,
    )


def _conv_functional(ctx: RuleContext) -> Any:
    """``F.conv*``: the weight (and bias) a parameter, or computed from parameters (``WeightExpr``)."""
    w = ctx.info(ctx.arg(1, "weight"))
    groups = ctx.arg(6, "groups", 1)
    if not isinstance(w, (ParamRef, WeightExpr)) or not isinstance(groups, int):
        ctx.pin_inputs("functional conv with a computed weight or groups")
        return None
    b = ctx.arg(2, "bias", None)
    if b is not None and not isinstance(ctx.info(b), (ParamRef, WeightExpr)):
        ctx.pin_inputs("functional conv with a computed bias")
        return None
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    literal: int | str | None = None
    if groups > 1:
        literal = 6 if len(ctx.node.args) > 6 else "groups"
    bias = ctx.info(b) if isinstance(ctx.info(b), WeightExpr) else param_name(ctx, "bias")
    weight = w.name if isinstance(w, ParamRef) else w
    return _conv(ctx, ctx.arg(0, "input"), weight, bias, w_shape, groups, literal)


def _fix_conv(m: nn.Module, before: Mapping[str, int]) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    c_out = m.weight.shape[0]
    if before["groups"] > 1 and before["in_channels"] == before["groups"]:  # depthwise
        m.groups = c_out // (before["out_channels"] // before["groups"])
        m.in_channels = m.groups
    else:
        m.in_channels = m.weight.shape[1] * m.groups
    m.out_channels = c_out


def _conv_onnx(w: OnnxWriter, n: fx.Node, m: Any) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    if m.transposed or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise Unsupported(f"{n.target}: transposed/padding_mode/string padding")
    k = spatial(w, n, input_node(n), len(m.kernel_size))
    ins = [input_node(n).name, w.tensor(f"{n.target}.weight", m.weight)]
    if m.bias is not None:
        ins.append(w.tensor(f"{n.target}.bias", m.bias))
    w.emit("Conv", ins, n.name, kernel_shape=list(m.kernel_size), strides=ints(m.stride, k),
           pads=pair_pads(ints(m.padding, k)), dilations=ints(m.dilation, k), group=int(m.groups))  # fmt: skip


FAMILY = OpFamily(
    "conv",
    (
        Ops(
            (nn.Conv1d, nn.Conv2d, nn.Conv3d),
            _conv_module,
            attr_fix=AttrFix(("in_channels", "out_channels", "groups"), _fix_conv),
            onnx=_conv_onnx,
            compensation=CompensationRole.COLUMNS,
        ),
        Ops((F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d), _conv_functional),
    ),
)
