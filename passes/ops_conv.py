"""Op family ``conv``: ``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d`` (plain, depthwise and grouped), and the
transposed ones, ``nn.ConvTranspose1d/2d/3d`` and ``F.conv_transpose1d/2d/3d``.

The rule cuts weight columns with the input's channels and makes the output rows a new space (grouped:
whole group structure kept); the attribute fix sets ``in_channels``, ``out_channels`` and ``groups`` from
the sliced weight; the ONNX translation emits ``Conv`` (``ConvTranspose``); a conv module is a compensation
consumer (``COLUMNS``: its removed input columns fold into its bias). A transposed conv is not one: a
removed input channel's constant mean reaches each output position through a different subset of kernel
taps (stride > 1: one per output phase), so its shift is no bias; compensation leaves it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    new space of ``C_out/groups`` — the group structure is never broken. (4) Channels on the batch dim of a
    batched input (MViT's pooling convs run on ``[batch * heads, head_dim, T, H, W]``: the heads are
    samples): every sample is convolved alike, the output carries them on the batch dim and the FLOPs
    scale with them; the weight is not cut.

    ``weight`` and ``bias`` are parameter names, or values computed from parameters (``WeightExpr``: a
    traced subclass's standardised weight), whose parameters ``claim_weight`` cuts.
    """
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x))
    ch = 1 if xs is not None and len(xs) == len(w_shape) else 0
    if t is not None and t.dim == 0 and ch == 1:
        ctx.cost(t.segs)
        return Tracked(0, t.segs)
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


#: the body of a conv-like rule: (ctx, input, weight, bias, weight shape, groups, groups literal)
ConvCore = Callable[[RuleContext, Any, Any, Any, Sequence[int], int, int | str | None], Any]


def _module_rule(core: ConvCore) -> Callable[[RuleContext], Any]:
    """The rule of a conv (or transposed conv) module: its own weight, bias and groups."""

    def rule(ctx: RuleContext) -> Any:
        m = ctx.module
        assert isinstance(m, nn.modules.conv._ConvNd)
        weight = f"{ctx.node.target}.weight"
        return core(ctx, ctx.arg(0, "input"), weight, param_name(ctx, "bias"), m.weight.shape, m.groups, None)

    return rule


def _functional_rule(core: ConvCore, what: str, computed: bool) -> Callable[[RuleContext], Any]:
    """The rule of ``F.<what>`` (``input, weight, bias, ...``, ``groups`` at position 6 in both conv and
    transposed conv): the weight and bias parameters, or with ``computed`` values computed from parameters
    (``WeightExpr``: a traced subclass's standardised weight); anything else pins its inputs."""
    usable: tuple[type, ...] = (ParamRef, WeightExpr) if computed else (ParamRef,)

    def rule(ctx: RuleContext) -> Any:
        w = ctx.info(ctx.arg(1, "weight"))
        groups = ctx.arg(6, "groups", 1)
        if not isinstance(w, usable) or not isinstance(groups, int):
            ctx.pin_inputs(f"functional {what} with a computed weight or groups")
            return None
        b = ctx.arg(2, "bias", None)
        if b is not None and not isinstance(ctx.info(b), usable):
            ctx.pin_inputs(f"functional {what} with a computed bias")
            return None
        w_shape = tensor_shape(ctx.value(ctx.arg(1, "weight")))
        assert w_shape is not None
        literal = (6 if len(ctx.node.args) > 6 else "groups") if groups > 1 else None
        bias = ctx.info(b) if isinstance(ctx.info(b), WeightExpr) else param_name(ctx, "bias")
        weight = w.name if isinstance(w, ParamRef) else w
        return core(ctx, ctx.arg(0, "input"), weight, bias, w_shape, groups, literal)

    return rule


def _conv_transpose(
    ctx: RuleContext,
    x: Any,
    weight: str,
    bias: str | None,
    w_shape: Sequence[int],
    groups: int,
    groups_literal: int | str | None,
) -> Any:
    """Transposed convolution: ``weight`` is ``[C_in, C_out/groups, *k]`` (the transpose of a conv's layout;
    input group ``i`` of ``C_in/groups`` channels makes output group ``i`` of ``C_out/groups``). Stride,
    padding, output padding and dilation only move positions: the channels flow as through a conv.

    Cases: (1) ``groups == 1``: input channels cut weight rows (dim 0), a new space of ``C_out`` columns
    (dim 1); (2) depthwise (``C_in/groups == 1``): output channel ``c*m + r`` comes from input channel ``c``
    only (repeat ``m = C_out/groups``): the weight rows go with the input channel and ``groups`` becomes the
    kept input count; (3) grouped: slot ``j`` of every input group is tied (every group keeps the same
    input slots), the weight rows are cut with all of them, and the output is ``groups`` copies of one new
    space of ``C_out/groups`` (weight dim 1) — the group structure is never broken.
    """
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x))
    ch = 1 if xs is not None and len(xs) == len(w_shape) else 0
    if t is not None and t.dim != ch:
        ctx.pin(t, "transposed conv input carries channels on a non-channel dim")
        t = None
    c_in, per_group = w_shape[0], w_shape[1]
    if groups == 1:
        out = ctx.new_space(per_group)
        if t is not None:
            ctx.claim(weight, 0, t.segs, "in")
        ctx.claim(weight, 1, out, "out")
        ctx.claim(bias, 0, out, "out")
        ctx.cost(t.segs if t is not None else None, out)
        return Tracked(ch, out)
    if c_in // groups == 1:
        if t is None:
            return None
        out = ctx.spaces.scale(t.segs, per_group)
        ctx.claim(weight, 0, t.segs, "out")
        ctx.claim(bias, 0, out, "out")
        ctx.cost(out)
        if groups_literal is not None:
            ctx.literal(groups_literal, None, t.segs)
        return Tracked(ch, out)
    slot = None
    if t is not None:
        pieces = ctx.spaces.pieces(t.segs, groups)
        if pieces is None:
            ctx.pin(t, "grouped transposed conv cuts a repeated channel block")
        else:
            slot = pieces[0]
            for p in pieces[1:]:
                ctx.unify(slot, p, "grouped transposed conv slots")  # type: ignore[arg-type]
            ctx.claim(weight, 0, t.segs, "in")
    new = ctx.new_space(per_group)
    out = new * groups
    ctx.claim(weight, 1, new, "out")
    ctx.claim(bias, 0, out, "out")
    ctx.cost(slot, out)
    return Tracked(ch, out)


def _fix_conv(m: nn.Module, before: Mapping[str, int]) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    c_out = m.weight.shape[0]
    if before["groups"] > 1 and before["in_channels"] == before["groups"]:  # depthwise
        m.groups = c_out // (before["out_channels"] // before["groups"])
        m.in_channels = m.groups
    else:
        m.in_channels = m.weight.shape[1] * m.groups
    m.out_channels = c_out


def _fix_conv_transpose(m: nn.Module, before: Mapping[str, int]) -> None:
    """``weight`` is ``[C_in, C_out/groups, *k]``; a depthwise one's ``groups`` is its kept input count."""
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    c_in = m.weight.shape[0]
    if before["groups"] > 1 and before["in_channels"] == before["groups"]:  # depthwise
        m.groups = c_in
    m.in_channels = c_in
    m.out_channels = m.weight.shape[1] * m.groups


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


def _conv_transpose_onnx(w: OnnxWriter, n: fx.Node, m: Any) -> None:
    """``ConvTranspose``; its ``output_padding`` is read off the static shapes (the module's own, or the one
    a call with ``output_size`` computes: ``out = (in - 1) s - 2 p + d (k - 1) + 1 + output_padding``)."""
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    if m.padding_mode != "zeros":
        raise Unsupported(f"{n.target}: padding_mode={m.padding_mode!r}")
    x = input_node(n)
    k = spatial(w, n, x, len(m.kernel_size))
    stride, pad, dil = ints(m.stride, k), ints(m.padding, k), ints(m.dilation, k)
    si, so = w.shape(x)[2:], w.shape(n)[2:]
    out_pad = [o - ((i - 1) * s - 2 * p + d * (kk - 1) + 1)
               for i, o, s, p, d, kk in zip(si, so, stride, pad, dil, m.kernel_size, strict=True)]  # fmt: skip
    ins = [x.name, w.tensor(f"{n.target}.weight", m.weight)]
    if m.bias is not None:
        ins.append(w.tensor(f"{n.target}.bias", m.bias))
    w.emit("ConvTranspose", ins, n.name, kernel_shape=list(m.kernel_size), strides=stride,
           pads=pair_pads(pad), dilations=dil, group=int(m.groups), output_padding=out_pad)  # fmt: skip


FAMILY = OpFamily(
    "conv",
    (
        Ops(
            (nn.Conv1d, nn.Conv2d, nn.Conv3d),
            _module_rule(_conv),
            attr_fix=AttrFix(("in_channels", "out_channels", "groups"), _fix_conv),
            onnx=_conv_onnx,
            compensation=CompensationRole.COLUMNS,
        ),
        Ops(
            (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d),
            _functional_rule(_conv, "conv", computed=True),
        ),
        Ops(
            (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
            _module_rule(_conv_transpose),
            attr_fix=AttrFix(("in_channels", "out_channels", "groups"), _fix_conv_transpose),
            onnx=_conv_transpose_onnx,
        ),
        Ops(
            (
                F.conv_transpose1d,
                F.conv_transpose2d,
                F.conv_transpose3d,
                torch.conv_transpose1d,
                torch.conv_transpose2d,
                torch.conv_transpose3d,
            ),
            _functional_rule(_conv_transpose, "transposed conv", computed=False),
        ),
    ),
)
