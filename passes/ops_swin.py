"""Op family ``swin``: the ops of Swin Transformer: ``torch.roll``, ``F.pad``, patch merging, relative
position bias, and shifted window attention (the family also holds the ``trace`` expansion of the latter).

Shifted window attention is not ruled as torchvision's one opaque call: ``fxprune.trace`` expands it into
the three calls of ``swin_ops`` (qkv, attention, merge), whose widths follow their weights. Their rules
make two kinds of groups:

- the **residual stream** ``C`` of the stage: qkv weight columns (``in``) on the way in; the merge's
  output is a new space of proj rows (``out``), unified with the stream by the residual add;
- the **heads** of each block, one group of ``num_heads`` channels, each channel a whole head of ``d``
  positions (repeat ``d``): rows of q, k and v in the qkv weight and bias (three segments), columns of
  the proj weight (``in``), the head column of the relative position bias table (or the rows of Swin V2's
  ``cpb_mlp`` output layer, which produces it), and Swin V2's ``logit_scale``. ``num_heads`` follows the
  kept count. A head is the unit because the attention of a head (a softmax over ``q.k`` scaled by
  ``d ** -0.5``, or cosine attention in V2) is not a sum over its ``d`` positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from fxprune.passes import swin_ops
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.ops_linear import linear_rule
from fxprune.passes.rule_context import ParamRef, RuleContext, Tracked, norm_dim, self_arg, tensor_shape
from fxprune.passes.spaces import Seg
from fxprune.passes.weight_expr import is_weight
from fxprune.passes.weight_expr import pad as weight_pad

from fxprune.trace import Expansion

__all__ = ["EXPANSIONS", "FAMILY"]


# ----------------------------------------------------------------------------- channel-agnostic moves
def _roll(ctx: RuleContext) -> Any:
    """``torch.roll`` moves elements along ``dims``: a channel-wise op unless it rolls the channel dim
    (or the flattened tensor, ``dims=None``), which moves channels to other positions."""
    x = self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        return None
    dims = ctx.arg(2, "dims", None)
    ndim = len(tensor_shape(ctx.value(x)) or ())
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        ctx.pin(t, "torch.roll of the flattened tensor")
        return None
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not all(isinstance(d, int) for d in dims):
        ctx.pin(t, "torch.roll with computed dims")
        return None
    if t.dim in {norm_dim(d, ndim) for d in dims}:
        ctx.pin(t, "torch.roll along the channel dim")
        return None
    return t


def _pad(ctx: RuleContext) -> Any:
    """``F.pad(x, pad)`` pads the last ``len(pad) // 2`` dims, last dim first. A channel-wise op when the
    channel dim's two entries are literal zeros; padding channels adds channels no rule tracks (pins). Any
    mode and fill: the pad of a 'same'-padding conv (timm's ``Conv2dSame``) is channel-wise. Of a parameter
    or a value computed from parameters: ``weight_expr.pad``."""
    x = self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        pad = ctx.arg(1, "pad")
        if not is_weight(ctx.info(x)) or not isinstance(pad, (list, tuple)):
            return None
        mode, value = ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
        return weight_pad(ctx, x, pad, mode != "constant" or not value)
    pad = ctx.arg(1, "pad")
    ndim = len(tensor_shape(ctx.value(x)) or ())
    if not isinstance(pad, (list, tuple)):
        ctx.pin(t, "F.pad with computed padding")
        return None
    k = ndim - 1 - t.dim  # the channel dim's pair is pad[2k], pad[2k + 1]
    if 2 * k < len(pad) and (pad[2 * k], pad[2 * k + 1]) != (0, 0):
        ctx.pin(t, "F.pad of the channel dim")
        return None
    return t


# --------------------------------------------------------------------------------------- patch merging
def _patch_merging_pad(ctx: RuleContext) -> Any:
    """torchvision's ``_patch_merging_pad``: ``[..., H, W, C] -> [..., H/2, W/2, 4C]``, the concat of four
    strided (2x2) samplings of the same tokens. The four segments are the same channels: the output
    carries the input's segments four times, so its consumers (``LayerNorm(4C)``, ``Linear(4C, 2C)``) are
    cut at four offsets with one kept set."""
    x = ctx.arg(0, "x")
    t = ctx.tracked(x)
    if t is None:
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    if t.dim != ndim - 1:
        ctx.pin(t, "patch merging samples the channel dim")
        return None
    return Tracked(t.dim, t.segs * 4)


def _relative_position_bias(ctx: RuleContext) -> Any:
    """torchvision's ``_get_relative_position_bias(table [M, heads], index, window)`` -> ``[1, heads, N, N]``.

    A table read with ``get_attr`` is one column per head: a new space of ``heads`` channels whose
    columns it claims (role ``norm``); the window attention ties it to its heads. A computed table (Swin
    V2: ``cpb_mlp(coords).view(-1, heads)``) brings its channels along."""
    table = ctx.arg(0, "relative_position_bias_table")
    info = ctx.info(table)
    shape = tensor_shape(ctx.value(table))
    if isinstance(info, ParamRef) and shape is not None and len(shape) == 2:
        heads = ctx.new_space(shape[1])
        ctx.claim(info.name, 1, heads, "norm")
        return Tracked(1, heads)
    if isinstance(info, Tracked):
        if shape is None or len(shape) != 2 or info.dim != 1:
            ctx.pin(info, "relative position bias table with channels on its position dim")
            return None
        return Tracked(1, info.segs)
    return None


# ----------------------------------------------------------------------------- shifted window attention
def _params(ctx: RuleContext, *where: tuple[int, str]) -> list[str | None] | None:
    """Names of the parameter arguments at ``where`` (position, keyword), read by ``get_attr``; an absent
    one (``bias=None``) is None. None when any is computed."""
    names: list[str | None] = []
    for pos, name in where:
        a = ctx.arg(pos, name, None)
        info = ctx.info(a) if a is not None else None
        if a is not None and not isinstance(info, ParamRef):
            return None
        names.append(info.name if isinstance(info, ParamRef) else None)
    return names


def _window_qkv(ctx: RuleContext) -> Any:
    """Windows of ``x [B, H, W, C]`` times the qkv weight ``[3*heads*d, C]``.

    The input's channels cut weight columns; the rows are q, k, v, each ``heads`` heads of ``d`` rows: a
    new space of ``heads`` channels with repeat ``d``, three times (one kept set for q, k and v)."""
    x = ctx.arg(0, "input")
    names = _params(ctx, (1, "qkv_weight"), (5, "qkv_bias"))
    heads = ctx.arg(3, "num_heads")
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "qkv_weight")))
    if names is None or names[0] is None or not isinstance(heads, int) or w_shape is None:
        ctx.pin_inputs("window attention with a computed weight, bias or num_heads")
        return None
    if w_shape[0] % (3 * heads):
        ctx.pin_inputs(f"window attention qkv rows {w_shape[0]} are not 3 x {heads} heads")
        return None
    t = ctx.tracked(x)
    if t is not None and t.dim != len(tensor_shape(ctx.value(x)) or ()) - 1:
        ctx.pin(t, "window attention input carries channels on a non-channel dim")
        t = None
    (head,) = ctx.new_space(heads)
    rows = ((head[0], w_shape[0] // (3 * heads)),) * 3
    weight, bias = names
    if t is not None:
        ctx.claim(weight, 1, t.segs, "in")
    ctx.claim(weight, 0, rows, "out")
    ctx.claim(bias, 0, rows, "out")
    ctx.literal(_index(ctx, 3, "num_heads"), None, (head,))
    ctx.cost(t.segs if t is not None else None, rows)
    return Tracked(2, rows)


def _index(ctx: RuleContext, pos: int, name: str) -> int | str:
    return pos if pos < len(ctx.node.args) else name


def _window_attention(ctx: RuleContext) -> Any:
    """Attention per head: ``qkv [.., 3*heads*d]`` -> ``[.., heads*d]``.

    The three thirds (q, k, v) are unified position by position, and must consist of whole heads
    (segments of repeat ``d``); the output carries the heads. The relative position bias (dim 1 of
    ``[1, heads, N, N]``) and ``logit_scale`` (``[heads, 1, 1]``) are tied to the heads; ``num_heads``
    follows the kept count. FLOPs (``q k^T`` and ``attn v``) scale with the heads."""
    qkv = ctx.arg(0, "qkv")
    t = ctx.tracked(qkv)
    heads = ctx.arg(4, "num_heads")
    if t is None or not isinstance(heads, int) or t.dim != 2:
        ctx.pin_inputs("window attention without tracked whole heads")
        return None
    n = ctx.size(t.segs)
    d = n // 3 // heads
    thirds = [ctx.spaces.slice(t.segs, i * n // 3, (i + 1) * n // 3) for i in range(3)]
    if n % (3 * heads) or any(p is None for p in thirds):
        ctx.pin(t, "window attention qkv rows are not three whole thirds")
        return None
    q: tuple[Seg, ...] = thirds[0]  # type: ignore[assignment]
    for p in thirds[1:]:
        ctx.unify(q, p, "q, k and v of a head")  # type: ignore[arg-type]
    q = ctx.spaces.leaves(q)  # type: ignore[assignment]
    if any(r != d for _, r in q):
        ctx.pin(t, f"window attention channels are not whole heads of {d}")
        return None
    per_head = tuple((a, 1) for a, _ in q)
    ok = _tie_bias(ctx, per_head) and _tie_logit_scale(ctx, per_head)
    if not ok:
        return None
    ctx.literal(_index(ctx, 4, "num_heads"), None, per_head)
    ctx.cost(per_head)
    return Tracked(2, tuple(q))


def _tie_bias(ctx: RuleContext, heads: tuple[Seg, ...]) -> bool:
    """The bias ``[.., heads, N, N]`` (broadcast to the attention) is tied to the heads."""
    b = ctx.arg(1, "relative_position_bias")
    info, shape = ctx.info(b), tensor_shape(ctx.value(b))
    if shape is None or len(shape) < 3 or shape[-3] == 1:
        return True  # no per-head bias
    dim = len(shape) - 3
    if isinstance(info, Tracked) and info.dim == dim:
        return ctx.unify(heads, info.segs, "relative position bias of a head")
    if isinstance(info, ParamRef):
        ctx.claim(info.name, dim, heads, "norm")
        return True
    ctx.spaces.pin(heads, f"an untracked relative position bias spans the heads at node '{ctx.node.name}'")
    ctx.pin(info, "relative position bias with channels on another dim")
    return False


def _tie_logit_scale(ctx: RuleContext, heads: tuple[Seg, ...]) -> bool:
    """Swin V2's ``logit_scale [heads, 1, 1]`` is sliced with the heads."""
    s = ctx.arg(7, "logit_scale", None)
    shape = tensor_shape(ctx.value(s))
    if s is None or shape is None or len(shape) < 3 or shape[-3] == 1:
        return True
    info = ctx.info(s)
    dim = len(shape) - 3
    if isinstance(info, ParamRef):
        ctx.claim(info.name, dim, heads, "norm")
        return True
    if isinstance(info, Tracked) and info.dim == dim:
        return ctx.unify(heads, info.segs, "logit scale of a head")
    ctx.spaces.pin(heads, f"a computed logit_scale spans the heads at node '{ctx.node.name}'")
    return False


def _window_merge(ctx: RuleContext) -> Any:
    """Proj ``[C_out, heads*d]`` on the attention output, windows back to ``[B, H, W, C_out]``: heads cut
    the proj columns; the output is a new space of ``C_out`` rows (the residual add unifies it)."""
    x = ctx.arg(0, "x")
    names = _params(ctx, (1, "proj_weight"), (6, "proj_bias"))
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "proj_weight")))
    if names is None or names[0] is None or w_shape is None:
        ctx.pin_inputs("window attention with a computed proj weight or bias")
        return None
    weight, bias = names
    return linear_rule(ctx, x, weight, bias, w_shape, out_dim=3)  # x: [B * windows, N, heads * d]


def _torchvision() -> tuple[tuple[Ops, ...], dict[Any, Expansion]]:
    """The entries of torchvision's Swin helpers and the expansions of its opaque calls (nothing when
    torchvision is missing)."""
    try:
        from torchvision.models import swin_transformer as tv
    except ImportError:  # pragma: no cover - torchvision is optional
        return (), {}
    ops = (
        Ops((tv._patch_merging_pad,), _patch_merging_pad),
        Ops((tv._get_relative_position_bias,), _relative_position_bias),
    )
    return ops, {tv.shifted_window_attention: swin_ops.expand_shifted_window_attention}


_TORCHVISION_OPS, _TORCHVISION_EXPANSIONS = _torchvision()

#: The calls ``fxprune.trace.trace(..., expansions=EXPANSIONS)`` replaces by finer calls with rules here:
#: torchvision's ``shifted_window_attention`` by the three calls of ``swin_ops`` (the pipeline passes it).
EXPANSIONS: Mapping[Any, Expansion] = MappingProxyType(_TORCHVISION_EXPANSIONS)

FAMILY = OpFamily(
    "swin",
    (
        Ops((torch.roll, "roll"), _roll),
        Ops((F.pad,), _pad),
        *_TORCHVISION_OPS,
        Ops((swin_ops.swin_window_qkv,), _window_qkv),
        Ops((swin_ops.swin_window_attention,), _window_attention),
        Ops((swin_ops.swin_window_merge,), _window_merge),
    ),
    EXPANSIONS,
)
