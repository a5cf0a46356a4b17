"""The op rule table: how channels flow through each supported op.

A rule takes a ``RuleContext`` and returns the node's info (see ``dependency``). Rules are registered by
exact module type, by function object, or by Tensor method name; ``lookup`` finds them. Every rule here
has a test in ``tests/passes/test_op_rules.py``. An op with no rule pins the channels it reads.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.dependency import ParamRef, RuleContext, SizeOf, Tracked, _flat_args, has_sizes
from fxprune.passes.spaces import Seg

from fxprune.data import TensorValue

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "lookup", "register"]

Rule = Callable[[RuleContext], Any]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a rule for module types (exact type match), functions, or method names (strings)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                METHOD_RULES[t] = fn
            elif isinstance(t, type) and issubclass(t, nn.Module):
                MODULE_RULES[t] = fn
            else:
                FUNCTION_RULES[t] = fn
        return fn

    return deco


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        return MODULE_RULES.get(type(module))
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    return _STRUCTURAL[node.op]


# --------------------------------------------------------------------------------------------- helpers
def _shape(v: Any) -> tuple[int, ...] | None:
    return v.shape if isinstance(v, TensorValue) else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _self_arg(ctx: RuleContext) -> Any:
    """The primary tensor: the module input, or the first argument of a function/method."""
    return ctx.arg(0, "input") if ctx.node.args or "input" in ctx.node.kwargs else ctx.arg(0, "self")


# ------------------------------------------------------------------------------------------- structure
def _placeholder(ctx: RuleContext) -> Any:
    return None


def _get_attr(ctx: RuleContext) -> Any:
    return ParamRef(str(ctx.node.target)) if isinstance(ctx.out, TensorValue) else None


def _output(ctx: RuleContext) -> Any:
    ctx.pin_inputs("reaches the graph output")
    return None


_STRUCTURAL: dict[str, Rule] = {"placeholder": _placeholder, "get_attr": _get_attr, "output": _output}


# ----------------------------------------------------------------------------------- channel-wise ops
def _passthrough(spatial: int = 0) -> Rule:
    """Channel-wise op: output keeps the input's channel dim; the last ``spatial`` dims may be pooled."""

    def rule(ctx: RuleContext) -> Any:
        x = _self_arg(ctx)
        t = ctx.tracked(x)
        if t is None:
            return None
        si, so = _shape(ctx.value(x)), _shape(ctx.out)
        if (
            si is None
            or so is None
            or len(si) != len(so)
            or so[t.dim] != si[t.dim]
            or t.dim >= len(si) - spatial
        ):
            ctx.pin(t, "channel dim is pooled or reshaped")
            return None
        return t

    return rule


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.interpolate, F.upsample, torch.clamp,
    torch.clip, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, operator.neg, operator.pos,
    torch.nn.functional.logsigmoid, torch.erf, torch.square,
)  # fmt: skip
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "exp", "abs",
    "neg", "sqrt", "rsqrt", "square", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type_as", "cpu", "cuda", "requires_grad_", "erf", "hardtanh_",
)  # fmt: skip
register(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS)(_passthrough())


def _register_torchvision_passthrough() -> None:
    """``torchvision.ops.stochastic_depth`` (fx-wrapped, so traced as one call) scales whole samples
    (``mode="row"``: a noise of shape ``[N, 1, ...]``) or the whole batch (``"batch"``); it is the
    identity in eval. Either way no channel is mixed with another: a channel-wise op."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        return
    register(StochasticDepth, stochastic_depth)(_passthrough())


_register_torchvision_passthrough()

_POOL_MODULES = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
}
_POOL_FUNCTIONS = {
    1: (
        F.max_pool1d,
        F.avg_pool1d,
        F.adaptive_avg_pool1d,
        F.adaptive_max_pool1d,
        torch.max_pool1d,
        torch.avg_pool1d,
    ),
    2: (
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        torch.max_pool2d,
        F.lp_pool2d,
    ),
    3: (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d),
}
for _k in (1, 2, 3):
    register(*_POOL_MODULES[_k], *_POOL_FUNCTIONS[_k])(_passthrough(spatial=_k))


@register(
    nn.Softmax,
    nn.LogSoftmax,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    "softmax",
    "log_softmax",
)
def _softmax(ctx: RuleContext) -> Any:
    x = _self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        return None
    shape = _shape(ctx.value(x)) or ()
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", None)
    if dim is None or _norm_dim(dim, len(shape)) == t.dim:
        ctx.pin(t, "softmax normalises across the channels")
        return None
    return t


# ------------------------------------------------------------------------------------- elementwise ops
def _elementwise(operands: Callable[[RuleContext], Sequence[Any]]) -> Rule:
    """Broadcasting op: channels of every operand aligned with the output's channel dim are unified.

    Operands aligned from the right. A parameter operand (``x * self.scale``) is sliced with the channels;
    an untracked tensor that spans the channel dim pins it; a size-1 (broadcast) dim couples nothing.
    """

    def rule(ctx: RuleContext) -> Any:
        ops = list(operands(ctx))
        so = _shape(ctx.out)
        if so is None:
            return _size_math(ctx)
        n = len(so)
        tracked = [(x, ctx.tracked(x)) for x in ops if ctx.tracked(x) is not None]
        if not tracked:
            return _size_math(ctx) if isinstance(ctx.out, (int, float)) else None
        dims = {t.dim + n - len(_shape(ctx.value(x)) or ()) for x, t in tracked}
        if len(dims) != 1:
            for _, t in tracked:
                ctx.pin(t, "operands carry channels on different dims")
            return None
        (D,) = dims
        ref = tracked[0][1].segs
        for _, t in tracked[1:]:
            ctx.unify(ref, t.segs, "elementwise op")
        for x in ops:
            if not isinstance(x, fx.Node) or ctx.tracked(x) is not None:
                continue
            s = _shape(ctx.value(x))
            if s is None:
                continue
            d = D - (n - len(s))
            if d < 0 or s[d] == 1:
                continue
            info = ctx.info(x)
            if isinstance(info, ParamRef):
                ctx.claim(info.name, d, ref, "norm")
            else:
                ctx.spaces.pin(
                    ref, f"an untracked tensor '{x.name}' spans the channel dim at node '{ctx.node.name}'"
                )
        return Tracked(D, ref)

    return rule


def _two_operands(ctx: RuleContext) -> Sequence[Any]:
    return [ctx.arg(0, "input"), ctx.arg(1, "other")]


register(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
)(_elementwise(_two_operands))  # fmt: skip
register(torch.where)(
    _elementwise(lambda ctx: [ctx.arg(0, "condition"), ctx.arg(1, "input"), ctx.arg(2, "other")])
)
register(torch.addcmul, torch.addcdiv)(
    _elementwise(lambda ctx: [ctx.arg(0, "input"), ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")])
)


# --------------------------------------------------------------------------------- concat, split, index
@register(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: RuleContext) -> Any:
    xs = list(ctx.arg(0, "tensors"))
    so = _shape(ctx.out)
    if so is None:
        return None
    dim = _norm_dim(ctx.arg(1, "dim", 0), len(so))
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
            if t is None:
                ctx.spaces.pin(tracked[0].segs, f"untracked tensor '{getattr(x, 'name', x)}' in cat")
        return Tracked(D, tracked[0].segs)
    segs: list[Seg] = []
    for x, t in zip(xs, infos, strict=True):
        if t is not None:
            segs.extend(t.segs)
        else:
            s = _shape(ctx.value(x))
            if s is None:
                return None
            segs.extend(
                ctx.new_space(
                    s[D],
                    pin=f"untracked tensor '{getattr(x, 'name', x)}' concatenated at node '{ctx.node.name}'",
                )
            )
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
    ndim = len(_shape(ctx.value(x)) or ())
    dim = _norm_dim(dim, ndim)
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


@register(torch.split, "split")
def _split(ctx: RuleContext) -> Any:
    where: int | str = (
        1
        if len(ctx.node.args) > 1
        else next(k for k in ("split_size_or_sections", "split_size") if k in ctx.node.kwargs)
    )
    sizes = ctx.node.args[1] if isinstance(where, int) else ctx.node.kwargs[where]
    return _pieces(ctx, ctx.arg(0, "input"), ctx.arg(2, "dim", 0), (where, sizes))


@register(torch.chunk, "chunk")
def _chunk(ctx: RuleContext) -> Any:
    return _pieces(ctx, ctx.arg(0, "input"), ctx.arg(2, "dim", 0), None)


@register(torch.unbind, "unbind")
def _unbind(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    outs = ctx.out
    if t is None or not isinstance(outs, tuple):
        return None
    dim = _norm_dim(ctx.arg(1, "dim", 0), len(_shape(ctx.value(x)) or ()))
    if dim == t.dim:
        ctx.pin(t, "unbind along the channel dim")
        return tuple(None for _ in outs)
    return tuple(Tracked(t.dim - (dim < t.dim), t.segs) for _ in outs)


@register(operator.getitem)
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
    shape = _shape(ctx.value(obj))
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
        si, so = _shape(ctx.value(x)), _shape(ctx.out)
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
        used: list[fx.Node] = []
        out = core(ctx, used)
        _pin_other_sizes(ctx, used)
        if ctx.node.target in ("view_as", "reshape_as", "expand_as"):
            out = _same_as(ctx, out)
        return out

    return rule


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
    for a in _flat_args(ctx.node)[1:]:
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


register("view", "reshape", "expand")(_reshape_like(_method_sizes))
register(torch.reshape)(_reshape_like(_function_shape))
register(
    torch.flatten, "flatten", nn.Flatten, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", nn.Unflatten,
    "unflatten", torch.unflatten, "view_as", "reshape_as", "expand_as",
)(_reshape_like(None))  # fmt: skip


@register(torch.permute, "permute")
def _permute(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    dims = (
        ctx.node.args[1:] if len(ctx.node.args) > 2 or isinstance(ctx.node.args[1], int) else ctx.node.args[1]
    )
    ndim = len(_shape(ctx.value(x)) or ())
    perm = [_norm_dim(int(d), ndim) for d in dims]
    return Tracked(perm.index(t.dim), t.segs)


@register(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def _transpose(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    ndim = len(_shape(ctx.value(x)) or ())
    a, b = _norm_dim(ctx.arg(1, "dim0"), ndim), _norm_dim(ctx.arg(2, "dim1"), ndim)
    return Tracked(b if t.dim == a else a if t.dim == b else t.dim, t.segs)


@register(
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
)
def _reduce(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    ndim = len(_shape(ctx.value(x)) or ())
    dim = ctx.arg(1, "dim", None)
    if dim is None:
        ctx.pin(t, "reduction over all dims")
        return None
    dims = {_norm_dim(d, ndim) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    if t.dim in dims:
        ctx.pin(t, "reduction over the channel dim")
        return None
    keepdim = (
        ctx.arg(2, "keepdim", False)
        if ctx.node.target not in (torch.std, torch.var, "std", "var")
        else ctx.node.kwargs.get("keepdim", False)
    )
    return Tracked(t.dim if keepdim else t.dim - sum(1 for d in dims if d < t.dim), t.segs)


# --------------------------------------------------------------------------------- shape queries
@register(builtins.getattr, "size", "dim", "numel", "type", "stride", "is_contiguous", "get_device")
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
    ndim = len(_shape(ctx.value(x)) or ())
    dim = ctx.arg(1, "dim", None) if name == "size" else None
    if isinstance(dim, int):
        return SizeOf(t.segs) if _norm_dim(dim, ndim) == t.dim else None
    return tuple(SizeOf(t.segs) if i == t.dim else None for i in range(ndim))


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


register(
    operator.floordiv, operator.mod, operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
    "lt", "le", "gt", "ge", "eq", "ne",
)(_scalar_math)  # fmt: skip


# ---------------------------------------------------------------------------------- conv, linear, norm
def _param_name(ctx: RuleContext, attr: str) -> str | None:
    m = ctx.module
    if m is not None:
        return f"{ctx.node.target}.{attr}" if getattr(m, attr, None) is not None else None
    a = ctx.info(ctx.arg(*_FUNCTIONAL_PARAM_POS[attr], None)) if attr in _FUNCTIONAL_PARAM_POS else None
    return a.name if isinstance(a, ParamRef) else None


def _conv(
    ctx: RuleContext,
    x: Any,
    weight: str,
    bias: str | None,
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
    """
    t = ctx.tracked(x)
    xs = _shape(ctx.value(x))
    ch = 1 if xs is not None and len(xs) == len(w_shape) else 0
    if t is not None and t.dim != ch:
        ctx.pin(t, "conv input carries channels on a non-channel dim")
        t = None
    c_out, per_group = w_shape[0], w_shape[1]
    if groups == 1:
        out = ctx.new_space(c_out)
        if t is not None:
            ctx.claim(weight, 1, t.segs, "in")
        ctx.claim(weight, 0, out, "out")
        ctx.claim(bias, 0, out, "out")
        ctx.cost(t.segs if t is not None else None, out)
        return Tracked(ch, out)
    if per_group == 1:
        if t is None:
            return None
        out = ctx.spaces.scale(t.segs, c_out // groups)
        ctx.claim(weight, 0, out, "out")
        ctx.claim(bias, 0, out, "out")
        ctx.cost(out)
        if groups_literal is not None:
            ctx.literal(groups_literal, None, t.segs)
        return Tracked(ch, out)
    slot = None
    if t is not None:
        pieces = [ctx.spaces.slice(t.segs, i * per_group, (i + 1) * per_group) for i in range(groups)]
        if any(p is None for p in pieces):
            ctx.pin(t, "grouped conv cuts a repeated channel block")
        else:
            slot = pieces[0]
            for p in pieces[1:]:
                ctx.unify(slot, p, "grouped conv slots")  # type: ignore[arg-type]
            ctx.claim(weight, 1, slot, "in")  # type: ignore[arg-type]
    out = ctx.new_space(c_out // groups) * groups
    ctx.claim(weight, 0, out, "out")
    ctx.claim(bias, 0, out, "out")
    ctx.cost(slot, out)
    return Tracked(ch, out)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    return _conv(
        ctx,
        ctx.arg(0, "input"),
        f"{ctx.node.target}.weight",
        _param_name(ctx, "bias"),
        m.weight.shape,
        m.groups,
        None,
    )


_FUNCTIONAL_PARAM_POS = {"weight": (1, "weight"), "bias": (2, "bias")}


@register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def _conv_functional(ctx: RuleContext) -> Any:
    w = ctx.info(ctx.arg(1, "weight"))
    groups = ctx.arg(6, "groups", 1)
    if not isinstance(w, ParamRef) or not isinstance(groups, int):
        ctx.pin_inputs("functional conv with a computed weight or groups")
        return None
    b = ctx.arg(2, "bias", None)
    if b is not None and not isinstance(ctx.info(b), ParamRef):
        ctx.pin_inputs("functional conv with a computed bias")
        return None
    w_shape = _shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    literal: int | str | None = None
    if groups > 1:
        literal = 6 if len(ctx.node.args) > 6 else "groups"
    return _conv(ctx, ctx.arg(0, "input"), w.name, _param_name(ctx, "bias"), w_shape, groups, literal)


def _linear(ctx: RuleContext, x: Any, weight: str, bias: str | None, w_shape: Sequence[int]) -> Any:
    """Linear: the last dim of ``x`` cuts weight columns; the output's last dim is a new space."""
    t = ctx.tracked(x)
    xs = _shape(ctx.value(x)) or ()
    if t is not None and t.dim != len(xs) - 1:
        ctx.pin(t, "linear applied along a non-channel dim")
        t = None
    out = ctx.new_space(w_shape[0])
    if t is not None:
        ctx.claim(weight, 1, t.segs, "in")
    ctx.claim(weight, 0, out, "out")
    ctx.claim(bias, 0, out, "out")
    ctx.cost(t.segs if t is not None else None, out)
    return Tracked(len(xs) - 1, out)


@register(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def _linear_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.Linear)
    return _linear(
        ctx, ctx.arg(0, "input"), f"{ctx.node.target}.weight", _param_name(ctx, "bias"), m.weight.shape
    )


@register(F.linear)
def _linear_functional(ctx: RuleContext) -> Any:
    w = ctx.info(ctx.arg(1, "weight"))
    b = ctx.arg(2, "bias", None)
    if not isinstance(w, ParamRef) or (b is not None and not isinstance(ctx.info(b), ParamRef)):
        ctx.pin_inputs("functional linear with a computed weight or bias")
        return None
    w_shape = _shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    return _linear(ctx, ctx.arg(0, "input"), w.name, _param_name(ctx, "bias"), w_shape)


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


@register(
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
def _batchnorm_module(ctx: RuleContext) -> Any:
    return _per_channel(ctx, ctx.arg(0, "input"), [_param_name(ctx, a) for a in _BN_BUFFERS])


@register(F.batch_norm)
def _batchnorm_functional(ctx: RuleContext) -> Any:
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
    xs = _shape(ctx.value(x))
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


@register(nn.LayerNorm)
def _layer_norm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.LayerNorm)
    return _layer_norm(
        ctx, ctx.arg(0, "input"), m.normalized_shape, _param_name(ctx, "weight"), _param_name(ctx, "bias")
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


@register(F.layer_norm)
def _layer_norm_functional(ctx: RuleContext) -> Any:
    shape = ctx.arg(1, "normalized_shape")
    names = _functional_affine(ctx, "layer_norm")
    if names is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape):
        ctx.pin_inputs("functional layer_norm with a computed normalized_shape")
        return None
    out = _layer_norm(ctx, ctx.arg(0, "input"), shape, names[0], names[1])
    t = ctx.tracked(ctx.arg(0, "input"))
    if out is not None and t is not None and len(shape) == 1 and names[0] is not None:
        xs = _shape(ctx.value(ctx.arg(0, "input"))) or ()
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
    xs = _shape(ctx.value(x))
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


@register(nn.GroupNorm)
def _group_norm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.GroupNorm)
    names = [_param_name(ctx, "weight"), _param_name(ctx, "bias")]
    return _group_norm(ctx, ctx.arg(0, "input"), m.num_groups, names, None)


@register(F.group_norm)
def _group_norm_functional(ctx: RuleContext) -> Any:
    groups = ctx.arg(1, "num_groups")
    names = _functional_affine(ctx, "group_norm")
    if names is None:
        return None
    if not isinstance(groups, int):
        ctx.pin_inputs("functional group_norm with a computed num_groups")
        return None
    literal = 1 if len(ctx.node.args) > 1 else "num_groups"
    return _group_norm(ctx, ctx.arg(0, "input"), groups, names, literal)


from fxprune.passes import rules_swin  # noqa: E402, F401 - registers the Swin rules into these tables
