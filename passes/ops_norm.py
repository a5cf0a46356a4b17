"""Op family ``norm``: BatchNorm / InstanceNorm (per channel), LayerNorm and GroupNorm, modules and
functional calls.

Rules slice the affine parameters and statistics with the channels (LayerNorm over the channel dim and
GroupNorm with wide groups renormalise over the kept channels: role ``"stats"``); attribute fixes set
``num_features``, ``normalized_shape``, ``num_channels``/``num_groups``; ONNX emits
``BatchNormalization`` and ``LayerNormalization``; a BatchNorm takes a bias-free consumer's compensation
shift into its ``running_mean`` (``RUNNING_MEAN``). A functional norm of a parameter (timm's
``StdConv2d``: ``F.batch_norm(w.reshape(1, out, -1), None, None, training=True)``; ``F.normalize(w, dim=1)``
of a weight-normalised linear) is followed as a ``weight_expr.WeightExpr`` whose normalised dims are mixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import AttrFix, CompensationRole, OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, input_node
from fxprune.passes.rule_context import ParamRef, RuleContext, norm_dim, param_name, tensor_shape
from fxprune.passes.weight_expr import is_weight, normalise

__all__ = ["FAMILY"]


def _per_channel(ctx: RuleContext, x: Any, params: Iterable[str | None]) -> Any:
    """Per-channel statistics and affine parameters along dim 1 (BatchNorm, InstanceNorm)."""
    t = ctx.tracked(x)
    if t is None:
        return None
    if t.dim != 1:
        ctx.pin(t, "per-channel norm over a dim that is not the channel dim")
        return None
    for p in params:
        ctx.claim(p, 0, t.segs, "norm")
    return t


_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _batchnorm_module(ctx: RuleContext) -> Any:
    return _per_channel(ctx, ctx.arg(0, "input"), [param_name(ctx, a) for a in _BN_BUFFERS])


def _batchnorm_functional(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    if is_weight(ctx.info(x)):
        return _batchnorm_weight(ctx, x)
    names = []
    for pos, kw in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        a = ctx.arg(pos, kw, None)
        if a is None:
            continue
        info = ctx.info(a)
        if not isinstance(info, ParamRef):
            ctx.pin_inputs("functional batch_norm with computed statistics")
            return None
        names.append(info.name)
    return _per_channel(ctx, ctx.arg(0, "input"), names)


def _batchnorm_weight(ctx: RuleContext, x: Any) -> Any:
    """``F.batch_norm`` of a computed weight: per channel of dim 1; with batch statistics (``training`` or
    no running statistics) normalised over every other dim, which are mixed."""
    shape = tensor_shape(ctx.value(x))
    if shape is None or len(shape) < 2:
        return None
    stats = [ctx.arg(1, "running_mean", None), ctx.arg(2, "running_var", None)]
    training = ctx.arg(5, "training", False)
    batch = training is not False or any(a is None for a in stats)
    over = [d for d in range(len(shape)) if d != 1] if batch else []
    affine = [
        (a, (1,)) for a in (*([] if batch else stats), ctx.arg(3, "weight", None), ctx.arg(4, "bias", None))
    ]
    shift = ctx.arg(4, "bias", None) is not None or not batch
    return normalise(ctx, x, over, affine, shift, "batch_norm")


# ------------------------------------------------------------------------------------------ layer norm
def _layer_norm(
    ctx: RuleContext, x: Any, normalized: Sequence[int], weight: str | None, bias: str | None
) -> Any:
    """LayerNorm over the last ``k = len(normalized_shape)`` dims, with affine ``weight``/``bias``.

    Cases: (1) the channel dim is not normalised (``d < ndim - k``): every channel is normalised on its
    own, a channel-wise op; (2) ``k == 1`` and the channel dim is the last dim (channels-last ConvNeXt,
    ViT/Swin tokens): the statistics ``mean``/``var`` run over the kept channels only after pruning, and
    ``weight``/``bias`` are sliced. The weight's site has role ``"stats"``, so the masked oracle
    (``fxprune.masked_model``) normalises over the kept positions too: removing a channel changes the
    others' values, and the oracle defines that change as the pruned semantics. The rewrite fixes
    ``normalized_shape`` (module attribute or literal). (3) Anything else (several normalised dims that
    include the channel dim; no affine weight, which the oracle needs to find the call) pins.
    """
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x))
    if t is None or xs is None:
        return None
    k = len(normalized)
    if t.dim < len(xs) - k:
        return t
    if k != 1 or t.dim != len(xs) - 1:
        ctx.pin(t, "layer_norm over several dims including the channel dim")
        return None
    if weight is None:
        ctx.pin(t, "layer_norm over the channel dim without an affine weight")
        return None
    ctx.claim(weight, 0, t.segs, "stats")
    ctx.claim(bias, 0, t.segs, "norm")
    return t


def _layer_norm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.LayerNorm)
    return _layer_norm(
        ctx, ctx.arg(0, "input"), m.normalized_shape, param_name(ctx, "weight"), param_name(ctx, "bias")
    )


def _functional_affine(ctx: RuleContext, op: str) -> list[str | None] | None:
    """Names of the ``weight`` (arg 2) and ``bias`` (arg 3) parameters of a functional norm; None (inputs
    pinned) when either is computed rather than read with ``get_attr``."""
    names: list[str | None] = []
    for pos, kw in ((2, "weight"), (3, "bias")):
        a = ctx.arg(pos, kw, None)
        info = ctx.info(a) if a is not None else None
        if a is not None and not isinstance(info, ParamRef):
            ctx.pin_inputs(f"functional {op} with a computed weight or bias")
            return None
        names.append(info.name if isinstance(info, ParamRef) else None)
    return names


def _layer_norm_functional(ctx: RuleContext) -> Any:
    shape = ctx.arg(1, "normalized_shape")
    x = ctx.arg(0, "input")
    if is_weight(ctx.info(x)):  # a computed shape (``w.shape[1:]``) counts by its traced value
        dims = shape if isinstance(shape, (list, tuple)) else ctx.value(shape)
        return _norm_weight(ctx, x, len(dims), "layer_norm") if isinstance(dims, tuple | list) else None
    names = _functional_affine(ctx, "layer_norm")
    if names is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape):
        ctx.pin_inputs("functional layer_norm with a computed normalized_shape")
        return None
    out = _layer_norm(ctx, ctx.arg(0, "input"), shape, names[0], names[1])
    t = ctx.tracked(ctx.arg(0, "input"))
    if out is not None and t is not None and len(shape) == 1 and names[0] is not None:
        xs = tensor_shape(ctx.value(ctx.arg(0, "input"))) or ()
        if t.dim == len(xs) - 1:
            ctx.literal(1 if len(ctx.node.args) > 1 else "normalized_shape", 0, t.segs)
    return out


# ------------------------------------------------------------------------------------------ group norm
def _group_norm(
    ctx: RuleContext, x: Any, groups: int, params: Sequence[str | None], literal: int | str | None
) -> Any:
    """GroupNorm over dim 1 with ``groups`` groups of ``C / groups`` channels.

    Statistics are per group. Case (1) ``groups == C`` (one channel per group, InstanceNorm with affine):
    a per-channel op; weight and bias are sliced and ``num_groups`` becomes the kept count. (2) Several
    channels per group: slot ``j`` of every group is tied (as in a grouped conv), so every group keeps the
    same slots, ``num_groups`` stays and the group width shrinks. Each group's mean and variance then run
    over its kept channels: the weight's site has role ``"stats"`` (as for a LayerNorm over channels), and
    the masked oracle normalises over the kept channels too. (3) No affine weight (the oracle finds the call
    by it), or a layout that cannot be cut into whole groups: pinned.
    """
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x))
    if t is None or xs is None:
        return None
    if t.dim != 1:
        ctx.pin(t, "group_norm over a dim that is not the channel dim")
        return None
    if groups == xs[1]:
        for p in params:
            ctx.claim(p, 0, t.segs, "norm")
        if literal is not None:
            ctx.literal(literal, None, t.segs)
        return t
    if params[0] is None:
        ctx.pin(t, f"group_norm with {groups} groups of {xs[1] // groups} channels and no affine weight")
        return None
    width = xs[1] // groups
    pieces = [ctx.spaces.slice(t.segs, i * width, (i + 1) * width) for i in range(groups)]
    if any(p is None for p in pieces):
        ctx.pin(t, "group_norm groups cut a repeated channel block")
        return None
    for piece in pieces[1:]:
        ctx.unify(pieces[0], piece, "group_norm: slot j of every group")  # type: ignore[arg-type]
    ctx.claim(params[0], 0, t.segs, "stats")
    ctx.claim(params[1], 0, t.segs, "norm")
    return t


def _group_norm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.GroupNorm)
    names = [param_name(ctx, "weight"), param_name(ctx, "bias")]
    return _group_norm(ctx, ctx.arg(0, "input"), m.num_groups, names, None)


def _norm_weight(ctx: RuleContext, x: Any, k: int | None, op: str) -> Any:
    """``F.layer_norm`` (``k`` normalised trailing dims) or ``F.group_norm`` (``k`` None: every dim from 1)
    of a computed weight: the normalised dims are mixed; ``weight``/``bias`` align with the trailing ``k``
    dims (layer_norm) or dim 1 (group_norm)."""
    shape = tensor_shape(ctx.value(x))
    if shape is None or (k is not None and not 0 < k <= len(shape)) or len(shape) < 2:
        return None
    over = range(len(shape) - k, len(shape)) if k is not None else range(1, len(shape))
    aligned = tuple(over) if k is not None else (1,)
    weight, bias = ctx.arg(2, "weight", None), ctx.arg(3, "bias", None)
    return normalise(ctx, x, over, [(weight, aligned), (bias, aligned)], bias is not None, op)


def _normalize(ctx: RuleContext) -> Any:
    """``F.normalize(x, p, dim)``: ``x`` divided by its p-norm over ``dim``: channel-wise unless ``dim`` is
    the channel dim (pinned); of a computed weight, that dim is mixed (a weight-normalised linear's rows:
    ``F.normalize(w, dim=1)`` mixes its input channels)."""
    x = ctx.arg(0, "input")
    dim = ctx.arg(2, "dim", 1)
    shape = tensor_shape(ctx.value(x))
    if shape is None or not isinstance(dim, int):
        ctx.pin_inputs("normalize over a computed dim")
        return None
    t = ctx.tracked(x)
    if t is None:
        return (
            normalise(ctx, x, [norm_dim(dim, len(shape))], [], False, "normalize")
            if is_weight(ctx.info(x))
            else None
        )
    if norm_dim(dim, len(shape)) == t.dim:
        ctx.pin(t, "normalize across the channel dim")
        return None
    return t


def _group_norm_functional(ctx: RuleContext) -> Any:
    groups = ctx.arg(1, "num_groups")
    x = ctx.arg(0, "input")
    if is_weight(ctx.info(x)):
        return _norm_weight(ctx, x, None, "group_norm")
    names = _functional_affine(ctx, "group_norm")
    if names is None:
        return None
    if not isinstance(groups, int):
        ctx.pin_inputs("functional group_norm with a computed num_groups")
        return None
    literal = 1 if len(ctx.node.args) > 1 else "num_groups"
    return _group_norm(ctx, ctx.arg(0, "input"), groups, names, literal)


# -- attribute fixes -------------------------------------------------------------------------------------------
def _fix_norm(m: nn.Module, before: Mapping[str, int]) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    if t is not None:
        m.num_features = int(t.shape[0])  # type: ignore[index,assignment,union-attr]


def _fix_layer_norm(m: nn.Module, before: Mapping[str, int]) -> None:
    assert isinstance(m, nn.LayerNorm)
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_group_norm(m: nn.Module, before: Mapping[str, int]) -> None:
    """One-channel groups lose whole groups; wider groups keep ``num_groups`` and lose the same slots in
    every group (``_group_norm``)."""
    assert isinstance(m, nn.GroupNorm)
    if m.weight is not None:
        m.num_channels = int(m.weight.shape[0])
        if before["num_groups"] == before["num_channels"]:
            m.num_groups = m.num_channels


# -- ONNX -----------------------------------------------------------------------------------------------------
def _batch_norm_onnx(w: OnnxWriter, n: fx.Node, m: Any) -> None:
    if m.running_mean is None or m.running_var is None:
        raise Unsupported(f"{n.target}: BatchNorm without running statistics")
    c = m.num_features
    scale = w.tensor(f"{n.target}.weight", m.weight) if m.weight is not None else w.const(np.ones(c))
    bias = w.tensor(f"{n.target}.bias", m.bias) if m.bias is not None else w.const(np.zeros(c))
    mean, var = (
        w.tensor(f"{n.target}.running_mean", m.running_mean),
        w.tensor(f"{n.target}.running_var", m.running_var),
    )
    w.emit("BatchNormalization", [input_node(n).name, scale, bias, mean, var], n.name, epsilon=float(m.eps))


def _layer_norm_parts(w: OnnxWriter, n: fx.Node, x: fx.Node, shape: Sequence[int], scale: str | None,
                      bias: str | None, eps: float) -> None:  # fmt: skip
    k = len(shape)
    if tuple(w.shape(x)[-k:]) != tuple(shape):
        raise Unsupported(f"{n.name}: normalized_shape {shape} is not the trailing shape")
    scale = scale or w.const(np.ones(shape))
    w.emit(
        "LayerNormalization", [x.name, scale, *([bias] if bias else [])], n.name, axis=-k, epsilon=float(eps)
    )


def _layer_norm_module_onnx(w: OnnxWriter, n: fx.Node, m: Any) -> None:
    scale = w.tensor(f"{n.target}.weight", m.weight) if m.weight is not None else None
    bias = w.tensor(f"{n.target}.bias", m.bias) if getattr(m, "bias", None) is not None else None
    _layer_norm_parts(w, n, input_node(n), m.normalized_shape, scale, bias, m.eps)


def _layer_norm_fn_onnx(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    shape = arg(n, 1, "normalized_shape")
    weight, bias, eps = arg(n, 2, "weight"), arg(n, 3, "bias"), arg(n, 4, "eps", 1e-5)
    for t in (weight, bias):
        if t is not None and not isinstance(t, fx.Node):
            raise Unsupported(f"{n.name}: layer_norm with a constant tensor argument")
    _layer_norm_parts(
        w, n, input_node(n), list(shape), weight.name if weight else None, bias.name if bias else None, eps
    )


_NORM_FIX = AttrFix((), _fix_norm)

FAMILY = OpFamily(
    "norm",
    (
        Ops(
            (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
            _batchnorm_module,
            attr_fix=_NORM_FIX,
            onnx={
                nn.BatchNorm1d: _batch_norm_onnx,
                nn.BatchNorm2d: _batch_norm_onnx,
                nn.BatchNorm3d: _batch_norm_onnx,
            },
            compensation=CompensationRole.RUNNING_MEAN,
        ),
        Ops((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _batchnorm_module, attr_fix=_NORM_FIX),
        Ops((F.batch_norm,), _batchnorm_functional),
        Ops(
            (nn.LayerNorm,),
            _layer_norm_module,
            attr_fix=AttrFix((), _fix_layer_norm),
            onnx=_layer_norm_module_onnx,
        ),
        Ops((F.layer_norm,), _layer_norm_functional, onnx=_layer_norm_fn_onnx),
        Ops(
            (nn.GroupNorm,),
            _group_norm_module,
            attr_fix=AttrFix(("num_groups", "num_channels"), _fix_group_norm),
        ),
        Ops((F.group_norm,), _group_norm_functional),
        Ops((F.normalize,), _normalize),
    ),
)
