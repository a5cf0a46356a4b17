"""Op family ``mvit``: the ``torch.fx.wrap``-ped helpers of torchvision's MViT (``mvit_v2_s``).

MViT's multiscale attention is traced into ordinary ops (the fused qkv linear reshaped to ``(3, heads,
head_dim)``, pooling convs over ``[batch * heads, head_dim, T, H, W]``, two products) and four opaque
calls, ruled here:

- ``_unsqueeze(x, target_dim, expand_dim)`` -> ``(x, rank)``: adds a size-1 dim at ``expand_dim`` when ``x``
  has one dim less than ``target_dim``; ``_squeeze(x, target_dim, expand_dim, rank)`` removes it again.
  Channel-wise: the channels move with the dims around them.
- ``_add_rel_pos(attn, q, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t)``: adds to each head's attention
  logits products of that head's ``q`` with the relative position tables (``[positions, head_dim]``, shared
  by every head). With the heads on dim 1 of ``attn`` and ``q`` (``[B, heads, N, ...]``) it is computed head
  by head: the heads of both are unified and carried; its FLOPs scale with them.
- ``_add_shortcut(x, shortcut, residual_with_cls_embed)``: the residual pooling ``x += q`` (over the
  tokens after the class token): the heads of ``x`` and ``q`` are unified, as for an add.

What MViT does not prune, and why: ``head_dim`` is the unit of a head, never cut (its positions are
shared by every head's pooling conv, LayerNorm and relative position tables, and ``q k^T`` contracts them
between two activations, so no consumer column could zero a removed position in the masked oracle); a
one-head attention's q, k, v (the reshape to ``(3, 1, head_dim)`` leaves them on the q/k/v dim, which
``unbind`` pins); and the output classes.
"""

from __future__ import annotations

from typing import Any

from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.rule_context import RuleContext, Tracked, norm_dim, tensor_shape

__all__ = ["FAMILY"]


def _unsqueeze(ctx: RuleContext) -> Any:
    """``(x with a size-1 dim at expand_dim when it has one dim too few, x's rank)``."""
    x = ctx.arg(0, "x")
    t = ctx.tracked(x)
    out = ctx.out
    si = tensor_shape(ctx.value(x))
    so = tensor_shape(out[0]) if isinstance(out, tuple) and out else None
    if t is None or si is None or so is None:
        return None
    if len(so) == len(si):
        return (t, None)
    e = ctx.arg(2, "expand_dim")
    if not isinstance(e, int) or len(so) != len(si) + 1:
        ctx.pin(t, "_unsqueeze with a computed dim")
        return (None, None)
    e = norm_dim(e, len(so))
    return (Tracked(t.dim + (e <= t.dim), t.segs), None)


def _squeeze(ctx: RuleContext) -> Any:
    """``x`` without the size-1 dim at ``expand_dim`` when ``_unsqueeze`` added it."""
    x = ctx.arg(0, "x")
    t = ctx.tracked(x)
    si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
    if t is None or si is None or so is None:
        return None
    if len(so) == len(si):
        return t
    e = ctx.arg(2, "expand_dim")
    if not isinstance(e, int) or len(si) != len(so) + 1 or norm_dim(e, len(si)) == t.dim:
        ctx.pin(t, "_squeeze of the channel dim or at a computed dim")
        return None
    return Tracked(t.dim - (norm_dim(e, len(si)) < t.dim), t.segs)


def _heads_of(ctx: RuleContext, a: Any, b: Any, what: str) -> Tracked | None:
    """The heads of two ``[B, heads, N, ...]`` operands of a head-by-head op, unified; None (pinned) when
    either carries channels elsewhere or an untracked one spans the heads."""
    ta, tb = ctx.tracked(a), ctx.tracked(b)
    if ta is None and tb is None:
        return None
    for x, t in ((a, ta), (b, tb)):
        s = tensor_shape(ctx.value(x))
        if (t is not None and t.dim != 1) or (t is None and (s is None or len(s) < 2 or s[1] != 1)):
            ctx.pin_inputs(f"{what} with channels off the heads dim, or an untracked tensor over the heads")
            return None
    if ta is not None and tb is not None and not ctx.unify(ta.segs, tb.segs, what):
        return None
    return ta if ta is not None else tb


def _add_rel_pos(ctx: RuleContext) -> Any:
    """``attn [B, heads, Nq, Nk]`` plus the relative position terms of ``q [B, heads, Nq, d]``: head by head."""
    heads = _heads_of(ctx, ctx.arg(0, "attn"), ctx.arg(1, "q"), "relative position terms of a head")
    if heads is None:
        return None
    ctx.cost(heads.segs)
    return heads


def _add_shortcut(ctx: RuleContext) -> Any:
    """``x += shortcut`` (residual pooling): the heads of both are the same channels."""
    return _heads_of(ctx, ctx.arg(0, "x"), ctx.arg(1, "shortcut"), "residual pooling of a head")


def _torchvision() -> tuple[Ops, ...]:
    """The entries of torchvision's MViT helpers (nothing when torchvision is missing)."""
    try:
        from torchvision.models.video import mvit as tv
    except ImportError:  # pragma: no cover - torchvision is optional
        return ()
    return (
        Ops((tv._unsqueeze,), _unsqueeze),
        Ops((tv._squeeze,), _squeeze),
        Ops((tv._add_rel_pos,), _add_rel_pos),
        Ops((tv._add_shortcut,), _add_shortcut),
    )


FAMILY = OpFamily("mvit", _torchvision())
