"""Op family ``shape``: ops that move, cut or join the channel dim without computing on values.

cat, split, chunk, unbind, indexing (``getitem``), view/reshape/flatten/squeeze/unsqueeze/expand,
permute/transpose, reductions over other dims (mean, sum, norm...), and shape queries (``x.shape``,
``x.size(1)``: a ``SizeOf`` the channels). The rules record the literal sizes the rewrite must follow.
Reshapes and reductions of parameters (a weight computed in a subclass's forward) are followed as a
``weight_expr.WeightExpr``. ONNX translations for cat, permute, reshape-likes and mean.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, input_node, reshape
from fxprune.passes.rule_context import (
    ParamView,
    Rule,
    RuleContext,
    SizeOf,
    Tracked,
    flat_args,
    has_sizes,
    norm_dim,
    param_dim,
    tensor_shape,
)
from fxprune.passes.spaces import Seg
from fxprune.passes.weight_expr import is_weight
from fxprune.passes.weight_expr import reduce as weight_reduce
from fxprune.passes.weight_expr import reshape as weight_reshape

__all__ = ["FAMILY"]


def _cat(ctx: RuleContext) -> Any:
    xs = list(ctx.arg(0, "tensors"))
    so = tensor_shape(ctx.out)
    if so is None:
        return None
    dim = norm_dim(ctx.arg(1, "dim", 0), len(so))
    infos = [ctx.tracked(x) for x in xs]
    tracked = [t for t in infos if t is not None]
    if not tracked:
        return None
    if any(t.dim != tracked[0].dim for t in tracked):
        for t in tracked:
            ctx.pin(t, "cat operands carry channels on different dims")
        return None
    D = tracked[0].dim
    if dim != D:  # cat along another dim: channels are aligned like an elementwise op
        for t in tracked[1:]:
            ctx.unify(tracked[0].segs, t.segs, "cat along a non-channel dim")
        for x, t in zip(xs, infos, strict=True):
            pd = param_dim(ctx.info(x), D)
            if t is None and pd is not None:  # a class token: sliced with the channels it joins
                ctx.claim(ctx.info(x).name, pd, tracked[0].segs, "norm")
            elif t is None:
                ctx.spaces.pin(tracked[0].segs, f"untracked tensor '{getattr(x, 'name', x)}' in cat")
        return Tracked(D, tracked[0].segs)
    segs: list[Seg] = []
    for x, t in zip(xs, infos, strict=True):
        if t is not None:
            segs.extend(t.segs)
            continue
        s = tensor_shape(ctx.value(x))
        if s is None:
            return None
        pd = param_dim(ctx.info(x), D)
        if pd is not None:  # learned channels: the parameter's rows are their producer
            new = ctx.new_space(s[D])
            ctx.claim(ctx.info(x).name, pd, new, "out")
            segs.extend(new)
            continue
        pin = f"untracked tensor '{getattr(x, 'name', x)}' concatenated at node '{ctx.node.name}'"
        segs.extend(ctx.new_space(s[D], pin=pin))
    return Tracked(D, tuple(segs))


def _pieces(ctx: RuleContext, x: Any, dim: int, sections: tuple[int | str, Any] | None) -> Any:
    """Outputs of split/chunk along ``dim``: slices of the channel segments.

    ``split`` takes its sizes from a literal (``sections`` = where it is, and the value), which the rewrite
    turns into the list of kept piece sizes. ``chunk`` always cuts equal pieces, so the
    pieces are unified (each keeps the same channels); uneven pieces then pin.
    """
    t = ctx.tracked(x)
    outs = ctx.out
    if t is None or not isinstance(outs, tuple):
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    dim = norm_dim(dim, ndim)
    if dim != t.dim:
        return tuple(t for _ in outs)
    pieces: list[tuple[Seg, ...]] = []
    start = 0
    for v in outs:
        stop = start + v.shape[dim]
        piece = ctx.spaces.slice(t.segs, start, stop) if stop > start else ()
        if piece is None or not piece:
            ctx.pin(t, "split inside a repeated channel block or into an empty piece")
            return tuple(None for _ in outs)
        pieces.append(piece)
        start = stop
    if sections is None:
        for p in pieces[1:]:
            ctx.unify(pieces[0], p, "chunk cuts equal pieces")
    elif isinstance(sections[1], (int, list, tuple)):
        ctx.literal(sections[0], None, *pieces, kind="sizes")
    else:
        ctx.pin(t, "split with computed sizes")
    return tuple(Tracked(dim, p) for p in pieces)


def _split(ctx: RuleContext) -> Any:
    where: int | str = (
        1
        if len(ctx.node.args) > 1
        else next(k for k in ("split_size_or_sections", "split_size") if k in ctx.node.kwargs)
    )
    sizes = ctx.node.args[1] if isinstance(where, int) else ctx.node.kwargs[where]
    return _pieces(ctx, ctx.arg(0, "input"), ctx.arg(2, "dim", 0), (where, sizes))


def _chunk(ctx: RuleContext) -> Any:
    return _pieces(ctx, ctx.arg(0, "input"), ctx.arg(2, "dim", 0), None)


def _unbind(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    outs = ctx.out
    if t is None or not isinstance(outs, tuple):
        return None
    dim = norm_dim(ctx.arg(1, "dim", 0), len(tensor_shape(ctx.value(x)) or ()))
    if dim == t.dim:
        ctx.pin(t, "unbind along the channel dim")
        return tuple(None for _ in outs)
    return tuple(Tracked(t.dim - (dim < t.dim), t.segs) for _ in outs)


def _getitem(ctx: RuleContext) -> Any:
    obj, idx = ctx.node.args[0], ctx.node.args[1]
    info = ctx.info(obj)
    if isinstance(info, tuple):
        if isinstance(idx, slice) and not any(
            isinstance(b, fx.Node) for b in (idx.start, idx.stop, idx.step)
        ):
            ctx.sizes_handled = True  # x.shape[1:]: the sizes flow on
            return info[idx]
        ctx.sizes_handled = isinstance(idx, int)  # x.shape[1]: picks one size; anything else pins them
        return info[idx] if isinstance(idx, int) and -len(info) <= idx < len(info) else None
    if not isinstance(info, Tracked):
        return None
    shape = tensor_shape(ctx.value(obj))
    if shape is None:
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        ctx.pin(info, "advanced indexing")
        return None
    if any(
        isinstance(i, slice) and any(isinstance(b, fx.Node) for b in (i.start, i.stop, i.step)) for i in items
    ):
        ctx.pin(info, "slice with computed bounds")
        return None
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None)))
    in_dim = out_dim = 0
    new_dim, segs = None, info.segs
    raw_pos = _raw_positions(items, len(shape))
    for pos, i in enumerate(expanded):
        if i is None:
            out_dim += 1
            continue
        if in_dim == info.dim:
            if isinstance(i, int):
                ctx.pin(info, "indexing a single channel")
                return None
            start, stop, step = i.indices(shape[in_dim])
            if step != 1:
                ctx.pin(info, "strided slice of the channel dim")
                return None
            if (start, stop) != (0, shape[in_dim]):
                piece = ctx.spaces.slice(info.segs, start, stop) if stop > start else None
                before = ctx.spaces.slice(info.segs, 0, start) if start > 0 else ()
                if piece is None or before is None or raw_pos[pos] is None:
                    ctx.pin(info, "slice inside a repeated channel block")
                    return None
                segs = piece
                ctx.literal(1, raw_pos[pos] if isinstance(idx, tuple) else None, before, piece, kind="slice")
            new_dim = out_dim
        in_dim += 1
        if not isinstance(i, int):
            out_dim += 1
    return Tracked(new_dim, segs) if new_dim is not None else None


def _raw_positions(items: list[Any], ndim: int) -> list[int | None]:
    """For each expanded index entry (Ellipsis expanded, trailing dims added), its position in ``items``."""
    out: list[int | None] = []
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    for p, i in enumerate(items):
        if i is Ellipsis:
            out.extend([None] * (ndim - n_real))
        else:
            out.append(p)
    target = ndim + sum(1 for i in items if i is None)
    return out + [None] * (target - len(out))


# ------------------------------------------------------------------------------------ shape-moving ops
def _reshape_like(literal_args: Callable[[RuleContext], tuple[int | str, bool]] | None) -> Rule:
    """view/reshape/flatten/squeeze/unsqueeze, decided from the input and output shapes alone.

    A contiguous reshape keeps the flat index, so with the channel dim ``d`` of size ``C``:

    1. **merge**: output dim ``e`` holds input dims ``[a, b)`` with ``a <= d < b`` (same element counts
       before and after): position ``(o * C + c) * inner + i`` of ``e`` is channel ``c``, with
       ``outer = prod(si[a:d])`` and ``inner = prod(si[d+1:b])``. The channels become the segments
       repeated ``inner`` times (``flatten``: ``[N, C, H, W] -> [N, C*H*W]``), tiled ``outer`` times
       (``[N, g, C/g, H, W] -> [N, C, H, W]`` after a channel shuffle's transpose).
    2. **unflatten of a repeated block**: output dims ``[e, f)`` hold ``d``, every segment's repeat is a
       multiple of ``inner = prod(so[e+1:f])``: dim ``e`` carries the segments with repeat ``r / inner``.
    3. **split into (groups, slots)**: output dims ``e, e+1`` of sizes ``(g, C/g)`` hold ``d`` (channel
       shuffle, attention heads): channel ``i*C/g + j`` is slot ``j`` of group ``i``. Slot ``j`` of every
       group is tied (every group keeps the same slots, so ``C/g`` shrinks and ``g`` stays), and dim
       ``e+1`` carries the slot channels; dim ``e`` indexes groups, not prunable channels.

    Anything else (a split into more than two dims, a cut inside a repeated block) pins.
    """

    def core(ctx: RuleContext, used: list[fx.Node]) -> Any:
        x = ctx.arg(0, "input")
        t = ctx.tracked(x)
        si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
        if t is None or si is None or so is None:
            return None
        d = t.dim
        if math.prod(si) != math.prod(so):  # expand: broadcast size-1 dims, aligned from the right
            e = d + len(so) - len(si)
            if e < 0 or so[e] != si[d]:
                ctx.pin(t, "expand of the channel dim")
                return None
            if literal_args is not None:
                used += _literal_at(ctx, literal_args, e, so[e], t.segs)
            return Tracked(e, t.segs)
        for e, a, b in _merges(si, so, d):
            inner, outer = math.prod(si[d + 1 : b]), math.prod(si[a:d])
            segs = (ctx.spaces.scale(t.segs, inner) if inner > 1 else t.segs) * outer
            if literal_args is not None:
                used += _literal_at(ctx, literal_args, e, so[e], segs)
            return Tracked(e, segs)
        for e, f in _splits(si, so, d):
            if literal_args is None:  # unflatten: sizes we cannot rewrite
                break
            inner = math.prod(so[e + 1 : f])
            if all(r % inner == 0 for _, r in t.segs):
                segs = tuple((atom, r // inner) for atom, r in t.segs)
                if literal_args is not None:
                    used += _literal_at(ctx, literal_args, e, so[e], segs)
                return Tracked(e, segs)
            if f != e + 2:
                continue
            g, slots = so[e], so[e + 1]
            pieces = [ctx.spaces.slice(t.segs, i * slots, (i + 1) * slots) for i in range(g)]
            if any(p is None for p in pieces):
                ctx.pin(t, "reshape splits a repeated channel block")
                return None
            first: tuple[Seg, ...] = pieces[0]  # type: ignore[assignment]
            for p in pieces[1:]:
                ctx.unify(first, p, "reshape into (groups, slots): slot j of every group")  # type: ignore[arg-type]
            if literal_args is not None:
                used += _literal_at(ctx, literal_args, e + 1, slots, first)
            return Tracked(e + 1, first)
        ctx.pin(t, "reshape splits or scatters the channel dim")
        return None

    def rule(ctx: RuleContext) -> Any:
        if ctx.node.target == "expand" and param_dim(ctx.info(ctx.arg(0, "input")), 0) is not None:
            return _expand_param(ctx)
        if is_weight(ctx.info(ctx.arg(0, "input"))):
            weight = _reshape_weight(ctx, literal_args)
            if weight is not None:
                _pin_other_sizes(ctx, [])
                return weight
        used: list[fx.Node] = []
        out = core(ctx, used)
        _pin_other_sizes(ctx, used)
        if ctx.node.target in ("view_as", "reshape_as", "expand_as"):
            out = _same_as(ctx, out)
        return out

    return rule


_WEIGHT_RESHAPES = {torch.flatten, "flatten", torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", "view",
                    "reshape", torch.reshape, "view_as", "reshape_as"}  # fmt: skip


def _reshape_weight(
    ctx: RuleContext, literal_args: Callable[[RuleContext], tuple[int | str, bool]] | None
) -> Any:
    """A reshape of a parameter or of a value computed from parameters (``weight_expr.reshape``): the int
    sizes the call writes (``literal_args``) follow the kept counts. ``expand`` and ``unflatten`` (sizes
    that are not followed) are not: None, and the call is ruled as any other reshape (untracked)."""
    if ctx.node.op == "call_module" or ctx.node.target not in _WEIGHT_RESHAPES:
        return None
    like = ctx.arg(1, "other") if ctx.node.target in ("view_as", "reshape_as") else None
    if literal_args is None:
        return weight_reshape(ctx, ctx.arg(0, "input"), like=like)
    index, packed = literal_args(ctx)

    def where(e: int) -> tuple[int | str, int | None] | None:
        if packed:
            arg = ctx.node.args[index] if isinstance(index, int) else ctx.node.kwargs[index]
            return (index, e) if isinstance(arg, (list, tuple)) and e < len(arg) else None
        pos = int(index) + e
        return (pos, None) if pos < len(ctx.node.args) else None

    return weight_reshape(ctx, ctx.arg(0, "input"), where, like)


def _expand_param(ctx: RuleContext) -> ParamView | None:
    """``param.expand(n, -1, -1)`` (ViT's class token): a ``ParamView`` that remembers which parameter dim
    each output dim reads. A dim of size > 1 that is kept must be sized ``-1``: a literal size there would
    not follow the parameter's pruning, so the view is then untracked (and whatever reads it pins)."""
    x = ctx.arg(0, "input")
    info = ctx.info(x)
    si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
    index, packed = _method_sizes(ctx)
    sizes = (ctx.node.args[index] if isinstance(index, int) else ctx.node.kwargs[index]) if packed else None
    sizes = list(sizes) if sizes is not None else list(ctx.node.args[1:])
    if si is None or so is None or len(so) < len(si) or len(sizes) != len(so):
        return None
    lead = len(so) - len(si)
    dims: list[int | None] = [None] * lead
    for i, n in enumerate(si):
        if n != so[i + lead]:
            dims.append(None)  # a size-1 dim broadcast
        elif n == 1 or sizes[i + lead] == -1:
            dims.append(param_dim(info, i))
        else:
            return None
    return ParamView(info.name, tuple(dims))


def _same_as(ctx: RuleContext, out: Any) -> Any:
    """``x.view_as(other)`` takes its shape from ``other``: the output's channels must be ``other``'s."""
    other = ctx.tracked(ctx.arg(1, "other"))
    if out is None and other is None:
        return None
    if out is None or other is None or other.dim != out.dim:
        ctx.pin(out, "view_as a tensor whose channels differ")
        ctx.pin(other, "view_as a tensor whose channels differ")
        return None
    ctx.unify(out.segs, other.segs, "view_as")
    return out


def _pin_other_sizes(ctx: RuleContext, used: Sequence[fx.Node]) -> None:
    """A computed size (``view(n, c // 2, h, w)``) at the position of the output's channel dim is replaced
    by a literal of the kept count (``_literal_at``), so its arithmetic no longer matters. A computed size
    read from channels anywhere else (MaxViT's ``reshape(B, G, P, D)``, ``D`` the residual width, applied
    to the attention's inner width) would silently change with pruning: its channels are pinned."""
    ctx.sizes_handled = True
    for a in flat_args(ctx.node)[1:]:
        info = ctx.info(a)
        if isinstance(a, fx.Node) and has_sizes(info) and a not in used:
            ctx.pin(info, "reshape to a size read from channels, at a position that does not carry them")


def _merges(si: Sequence[int], so: Sequence[int], d: int) -> Iterable[tuple[int, int, int]]:
    """``(e, a, b)``: output dim ``e`` is exactly input dims ``[a, b)``, ``a <= d < b``; ``a = d`` first."""
    for a in range(d, -1, -1):
        pre = math.prod(si[:a])
        for e in range(len(so)):
            if math.prod(so[:e]) != pre:
                continue
            for b in range(d + 1, len(si) + 1):
                if so[e] == math.prod(si[a:b]) and math.prod(so[e + 1 :]) == math.prod(si[b:]):
                    yield e, a, b


def _splits(si: Sequence[int], so: Sequence[int], d: int) -> Iterable[tuple[int, int]]:
    """``(e, f)``: output dims ``[e, f)`` (at least two) are exactly input dim ``d``."""
    pre, post = math.prod(si[:d]), math.prod(si[d + 1 :])
    for e in range(len(so)):
        if math.prod(so[:e]) != pre:
            continue
        for f in range(e + 2, len(so) + 1):
            if math.prod(so[e:f]) == si[d] and math.prod(so[f:]) == post:
                yield e, f


def _literal_at(
    ctx: RuleContext,
    where: Callable[[RuleContext], tuple[int | str, bool]],
    e: int,
    size: int,
    segs: Sequence[Seg],
) -> list[fx.Node]:
    """Record that the size argument for output dim ``e`` of view/reshape/expand must follow the channel
    count: an int literal equal to ``size``, or a computed size (``SizeOf``), which is replaced by the
    literal kept count. Returns the computed-size node it replaced, if any."""
    index, packed = where(ctx)
    if packed:
        arg = ctx.node.args[index] if isinstance(index, int) else ctx.node.kwargs[index]
        if isinstance(arg, (list, tuple)) and e < len(arg) and _is_size(ctx, arg[e], size):
            ctx.literal(index, e, segs)
            return [arg[e]] if isinstance(arg[e], fx.Node) else []
    else:
        pos = int(index) + e
        if pos < len(ctx.node.args) and _is_size(ctx, ctx.node.args[pos], size):
            ctx.literal(pos, None, segs)
            return [ctx.node.args[pos]] if isinstance(ctx.node.args[pos], fx.Node) else []
    return []


def _is_size(ctx: RuleContext, a: Any, size: int) -> bool:
    return (isinstance(a, int) and a == size) or isinstance(ctx.info(a), SizeOf)


def _method_sizes(ctx: RuleContext) -> tuple[int | str, bool]:
    """``x.view(a, b)`` (varargs from position 1) or ``x.view((a, b))`` / ``x.view(size=...)`` (packed)."""
    if len(ctx.node.args) == 2 and isinstance(ctx.node.args[1], (list, tuple)):
        return 1, True
    if "size" in ctx.node.kwargs or "shape" in ctx.node.kwargs:
        return ("size" if "size" in ctx.node.kwargs else "shape"), True
    return 1, False


def _function_shape(ctx: RuleContext) -> tuple[int | str, bool]:
    return (1 if len(ctx.node.args) > 1 else "shape"), True


def _permute(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    dims = (
        ctx.node.args[1:] if len(ctx.node.args) > 2 or isinstance(ctx.node.args[1], int) else ctx.node.args[1]
    )
    ndim = len(tensor_shape(ctx.value(x)) or ())
    perm = [norm_dim(int(d), ndim) for d in dims]
    return Tracked(perm.index(t.dim), t.segs)


def _transpose(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    a, b = norm_dim(ctx.arg(1, "dim0"), ndim), norm_dim(ctx.arg(2, "dim1"), ndim)
    return Tracked(b if t.dim == a else a if t.dim == b else t.dim, t.segs)


def _reduce(ctx: RuleContext) -> Any:
    keepdim = (
        ctx.arg(2, "keepdim", False)
        if ctx.node.target not in (torch.std, torch.var, "std", "var")
        else ctx.node.kwargs.get("keepdim", False)
    )
    return _reduction(ctx, ctx.arg(1, "dim", None), keepdim)


def _norm(ctx: RuleContext) -> Any:
    """``x.norm(p, dim, keepdim)``, ``torch.norm``, ``torch.linalg.vector_norm``: a reduction."""
    return _reduction(ctx, ctx.arg(2, "dim", None), ctx.arg(3, "keepdim", False))


def _reduction(ctx: RuleContext, dim: Any, keepdim: Any) -> Any:
    """A reduction over ``dim`` (None: all dims): channel-wise unless it runs over the channel dim (pinned);
    of a parameter or a value computed from parameters, ``weight_expr.reduce``."""
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        if is_weight(ctx.info(x)) and isinstance(keepdim, bool):
            return weight_reduce(ctx, x, dim, keepdim, _op_name(ctx))
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    if dim is None:
        ctx.pin(t, "reduction over all dims")
        return None
    dims = {norm_dim(d, ndim) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    if t.dim in dims:
        ctx.pin(t, "reduction over the channel dim")
        return None
    return Tracked(t.dim if keepdim else t.dim - sum(1 for d in dims if d < t.dim), t.segs)


def _op_name(ctx: RuleContext) -> str:
    t = ctx.node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# --------------------------------------------------------------------------------- shape queries
def _query(ctx: RuleContext) -> Any:
    """Metadata of a tensor. No channels flow into the result, but a size of a channel dim
    (``x.shape``, ``x.size()``, ``x.size(1)``, ``x.numel()``) is a ``SizeOf`` those channels: it changes
    with pruning, and the op that uses it must follow (see ``SizeOf``)."""
    x = ctx.node.args[0] if ctx.node.args else None
    t = ctx.tracked(x)
    if t is None:
        return None
    name = ctx.node.args[1] if ctx.node.target is builtins.getattr else ctx.node.target
    if name == "numel":
        return SizeOf(t.segs)
    if name not in ("shape", "size"):
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    dim = ctx.arg(1, "dim", None) if name == "size" else None
    if isinstance(dim, int):
        return SizeOf(t.segs) if norm_dim(dim, ndim) == t.dim else None
    return tuple(SizeOf(t.segs) if i == t.dim else None for i in range(ndim))


# -- ONNX -----------------------------------------------------------------------------------------------------
def _cat_onnx(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    tensors, dim = arg(n, 0, "tensors"), arg(n, 1, "dim", 0)
    rank = len(w.shape(n))
    w.emit("Concat", [t.name for t in tensors], n.name, axis=int(dim) % rank)


def _permute_onnx(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    # ints by permute's signature: torch.permute(x, dims); x.permute(*dims), x.permute(dims) or (dims=dims)
    dims: Sequence[Any]
    if n.op == "call_function":
        dims = arg(n, 1, "dims")
    else:
        dims = cast(Sequence[Any], n.args[1:] or n.kwargs.get("dims"))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
    rank = len(w.shape(n))
    w.emit("Transpose", [input_node(n).name], n.name, perm=[int(d) % rank for d in dims])


def _mean_onnx(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    dim, keepdim = arg(n, 1, "dim"), bool(arg(n, 2, "keepdim", False))
    if dim is None or "dtype" in n.kwargs:
        raise Unsupported(f"{n.name}: mean over all dims or with dtype")
    x = input_node(n)
    rank = len(w.shape(x))
    axes = [int(d) % rank for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    w.emit("ReduceMean", [x.name, w.const(axes, "axes", np.int64)], n.name, keepdims=int(keepdim))


_ONNX = {
    torch.cat: _cat_onnx,
    torch.concat: _cat_onnx,
    torch.permute: _permute_onnx,
    "permute": _permute_onnx,
    torch.flatten: reshape,
    "flatten": reshape,
    nn.Flatten: reshape,
    "view": reshape,
    "reshape": reshape,
    torch.reshape: reshape,
    torch.mean: _mean_onnx,
    "mean": _mean_onnx,
}

FAMILY = OpFamily(
    "shape",
    (
        Ops((torch.cat, torch.concat, torch.concatenate), _cat, onnx=_ONNX),
        Ops((torch.split, "split"), _split),
        Ops((torch.chunk, "chunk"), _chunk),
        Ops((torch.unbind, "unbind"), _unbind),
        Ops((operator.getitem,), _getitem),
        Ops(("view", "reshape", "expand"), _reshape_like(_method_sizes), onnx=_ONNX),
        Ops((torch.reshape,), _reshape_like(_function_shape), onnx=_ONNX),
        Ops(
            (
                torch.flatten,
                "flatten",
                nn.Flatten,
                torch.squeeze,
                "squeeze",
                torch.unsqueeze,
                "unsqueeze",
                nn.Unflatten,
                "unflatten",
                torch.unflatten,
                "view_as",
                "reshape_as",
                "expand_as",
            ),
            _reshape_like(None),
            onnx=_ONNX,
        ),  # fmt: skip
        Ops((torch.permute, "permute"), _permute, onnx=_ONNX),
        Ops(
            (torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims"), _transpose
        ),
        Ops(
            (
                torch.mean,
                torch.sum,
                torch.amax,
                torch.amin,
                torch.std,
                torch.var,
                "mean",
                "sum",
                "amax",
                "amin",
                "std",
                "var",
            ),
            _reduce,
            onnx=_ONNX,
        ),  # fmt: skip
        Ops((torch.norm, "norm", torch.linalg.vector_norm), _norm),
        Ops(
            (builtins.getattr, "size", "dim", "numel", "type", "stride", "is_contiguous", "get_device"),
            _query,
        ),
    ),
)
