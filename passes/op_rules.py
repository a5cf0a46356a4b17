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
from fxprune.passes.rule_context import (
    ParamRef,
    ParamView,
    RuleContext,
    SizeOf,
    Tracked,
    flat_args,
    has_sizes,
    param_dim,
)
from fxprune.passes.spaces import Seg

from fxprune.data import META_VALUE, TensorValue
from fxprune.trace import is_container_call

__all__ = [
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "linear_rule",
    "lookup",
    "norm_dim",
    "register",
    "self_arg",
    "tensor_shape",
]

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
        return _container if is_container_call(node) else FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    return _STRUCTURAL[node.op]


# ------------------------------------------------------------- helpers (shared with the other rule modules)
def tensor_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of a ``TensorValue``; None for anything else (a literal, a tuple of values)."""
    return v.shape if isinstance(v, TensorValue) else None


def norm_dim(d: int, ndim: int) -> int:
    """``d`` as a non-negative dim of a tensor of rank ``ndim``."""
    return d + ndim if d < 0 else d


def self_arg(ctx: RuleContext) -> Any:
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


def _container(ctx: RuleContext) -> Any:
    """A container built by a call of its class (``fxprune.trace.is_container_call``: a dict/list subclass,
    a dataclass, a nested namedtuple; an output such as ``OrderedDict(out=x)``): channels are not followed
    through containers, so every space in it is pinned, however deeply nested."""
    ctx.pin_inputs(f"packed into a {ctx.node.target.__qualname__}")  # type: ignore[union-attr]
    return None


_STRUCTURAL: dict[str, Rule] = {"placeholder": _placeholder, "get_attr": _get_attr, "output": _output}


# ----------------------------------------------------------------------------------- channel-wise ops
def _passthrough(spatial: int = 0) -> Rule:
    """Channel-wise op: output keeps the input's channel dim; the last ``spatial`` dims may be pooled."""

    def rule(ctx: RuleContext) -> Any:
        x = self_arg(ctx)
        t = ctx.tracked(x)
        if t is None:
            return None
        si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
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
    x = self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        return None
    shape = tensor_shape(ctx.value(x)) or ()
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", None)
    if dim is None or norm_dim(dim, len(shape)) == t.dim:
        ctx.pin(t, "softmax normalises across the channels")
        return None
    return t


# ------------------------------------------------------------------------------------- elementwise ops


def _tie_on_one_dim(ctx: RuleContext, tracked: Sequence[tuple[Any, Tracked]], dim_of: Callable[[Any, Tracked], Any],
                    pin_why: str, unify_why: str) -> tuple[Any, tuple[Seg, ...]] | None:  # fmt: skip
    """Operands that all carry channels on one dim (``dim_of`` names it: an output dim, an einsum letter)
    share those channels: unify them and return that dim and the first operand's segments. Otherwise pin
    them all and return None."""
    dims = {dim_of(x, t) for x, t in tracked}
    if len(dims) != 1:
        for _, t in tracked:
            ctx.pin(t, pin_why)
        return None
    ref = tracked[0][1].segs
    for _, t in tracked[1:]:
        ctx.unify(ref, t.segs, unify_why)
    return next(iter(dims)), ref


def _elementwise(operands: Callable[[RuleContext], Sequence[Any]]) -> Rule:
    """Broadcasting op: channels of every operand aligned with the output's channel dim are unified.

    Operands aligned from the right. A parameter operand (``x * self.scale``) is sliced with the channels;
    an untracked tensor that spans the channel dim pins it; a size-1 (broadcast) dim couples nothing.
    """

    def rule(ctx: RuleContext) -> Any:
        ops = list(operands(ctx))
        so = tensor_shape(ctx.out)
        if so is None:
            return _size_math(ctx)
        n = len(so)
        tracked = [(x, ctx.tracked(x)) for x in ops if ctx.tracked(x) is not None]
        if not tracked:
            return _size_math(ctx) if isinstance(ctx.out, (int, float)) else None
        tie = _tie_on_one_dim(ctx, tracked, lambda x, t: t.dim + n - len(tensor_shape(ctx.value(x)) or ()),
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
    dim = norm_dim(ctx.arg(1, "dim", 0), len(tensor_shape(ctx.value(x)) or ()))
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
        used: list[fx.Node] = []
        out = core(ctx, used)
        _pin_other_sizes(ctx, used)
        if ctx.node.target in ("view_as", "reshape_as", "expand_as"):
            out = _same_as(ctx, out)
        return out

    return rule


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
    ndim = len(tensor_shape(ctx.value(x)) or ())
    perm = [norm_dim(int(d), ndim) for d in dims]
    return Tracked(perm.index(t.dim), t.segs)


@register(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def _transpose(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    t = ctx.tracked(x)
    if t is None:
        return None
    ndim = len(tensor_shape(ctx.value(x)) or ())
    a, b = norm_dim(ctx.arg(1, "dim0"), ndim), norm_dim(ctx.arg(2, "dim1"), ndim)
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
    ndim = len(tensor_shape(ctx.value(x)) or ())
    dim = ctx.arg(1, "dim", None)
    if dim is None:
        ctx.pin(t, "reduction over all dims")
        return None
    dims = {norm_dim(d, ndim) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
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
    ndim = len(tensor_shape(ctx.value(x)) or ())
    dim = ctx.arg(1, "dim", None) if name == "size" else None
    if isinstance(dim, int):
        return SizeOf(t.segs) if norm_dim(dim, ndim) == t.dim else None
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
    xs = tensor_shape(ctx.value(x))
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
        pieces = ctx.spaces.pieces(t.segs, groups)
        if pieces is None:
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
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    literal: int | str | None = None
    if groups > 1:
        literal = 6 if len(ctx.node.args) > 6 else "groups"
    return _conv(ctx, ctx.arg(0, "input"), w.name, _param_name(ctx, "bias"), w_shape, groups, literal)


def linear_rule(ctx: RuleContext, x: Any, weight: str, bias: str | None, w_shape: Sequence[int],
            out_dim: int | None = None) -> Any:  # fmt: skip
    """Linear: the last dim of ``x`` cuts weight columns; the output's last dim (or ``out_dim``, for an op
    that also reshapes, like Swin's window merge) is a new space."""
    t = ctx.tracked(x)
    xs = tensor_shape(ctx.value(x)) or ()
    if t is not None and t.dim != len(xs) - 1:
        ctx.pin(t, "linear applied along a non-channel dim")
        t = None
    out = ctx.new_space(w_shape[0])
    if t is not None:
        ctx.claim(weight, 1, t.segs, "in")
    ctx.claim(weight, 0, out, "out")
    ctx.claim(bias, 0, out, "out")
    ctx.cost(t.segs if t is not None else None, out)
    return Tracked(len(xs) - 1 if out_dim is None else out_dim, out)


@register(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def _linear_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.Linear)
    return linear_rule(
        ctx, ctx.arg(0, "input"), f"{ctx.node.target}.weight", _param_name(ctx, "bias"), m.weight.shape
    )


@register(F.linear)
def _linear_functional(ctx: RuleContext) -> Any:
    w = ctx.info(ctx.arg(1, "weight"))
    b = ctx.arg(2, "bias", None)
    if not isinstance(w, ParamRef) or (b is not None and not isinstance(ctx.info(b), ParamRef)):
        ctx.pin_inputs("functional linear with a computed weight or bias")
        return None
    w_shape = tensor_shape(ctx.value(ctx.arg(1, "weight")))
    assert w_shape is not None
    return linear_rule(ctx, ctx.arg(0, "input"), w.name, _param_name(ctx, "bias"), w_shape)


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


# ------------------------------------------------------------------------------------------- attention
def _untracked_spans(ctx: RuleContext, x: Any, d_out: int, n_out: int) -> bool:
    """Whether operand ``x`` (aligned from the right with an ``n_out``-d output) is an untracked tensor whose
    dim under output dim ``d_out`` has size > 1; a parameter there is sliced instead (``"norm"``)."""
    if not isinstance(x, fx.Node) or ctx.tracked(x) is not None:
        return False
    s = tensor_shape(ctx.value(x))
    if s is None:
        return False
    d = d_out - (n_out - len(s))
    if d < 0 or s[d] == 1:
        return False
    pd = param_dim(ctx.info(x), d)
    return pd is None


def _claim_param_operand(ctx: RuleContext, x: Any, d_out: int, n_out: int, segs: Sequence[Seg]) -> None:
    s = tensor_shape(ctx.value(x)) if isinstance(x, fx.Node) else None
    if s is None or ctx.tracked(x) is not None:
        return
    d = d_out - (n_out - len(s))
    pd = param_dim(ctx.info(x), d) if d >= 0 and s[d] != 1 else None
    if pd is not None:
        ctx.claim(ctx.info(x).name, pd, segs, "norm")


@register(F.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext) -> Any:
    """``softmax(q k^T * scale + mask) v`` over the last two dims; every dim before them is a batch dim.

    Cases, for the dim ``d`` of an operand that carries channels (``n`` = the output's rank):

    1. ``d < n - 2`` (attention heads after a head split): head ``h`` of q attends with head ``h`` of k
       and v only, so q, k and v are unified on ``d`` and the output carries the same channels there. An
       untracked q/k/v/mask spanning ``d`` pins them; a parameter mask (a per-head bias) is sliced.
    2. v on ``d = n - 1`` (its per-head features): each output feature is the attention-weighted sum of
       the same v feature, so the output carries v's channels on its last dim.
    3. q or k on ``n - 1`` (the contracted features), or anything on the sequence dim ``n - 2``, pins:
       removing a contracted feature changes every logit, and the masked oracle has no consumer column
       that could zero it.

    FLOPs scale with the kept heads in case 1; case 2 leaves the cost model conservative (unscaled).
    """
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask", None)
    so = tensor_shape(ctx.out)
    if so is None:
        ctx.pin_inputs("scaled_dot_product_attention without a tensor output")
        return None
    n = len(so)
    ctx.pin(ctx.tracked(mask), "channels in the attention mask")
    batch: list[Tracked] = []
    v_last: Tracked | None = None
    for name, x in (("query", q), ("key", k), ("value", v)):
        t = ctx.tracked(x)
        if t is None:
            continue
        if len(tensor_shape(ctx.value(x)) or ()) != n:
            ctx.pin(t, f"scaled_dot_product_attention {name} of another rank than the output")
        elif t.dim < n - 2:
            batch.append(t)
        elif name == "value" and t.dim == n - 1:
            v_last = t
        else:
            ctx.pin(t, f"scaled_dot_product_attention contracts the {name} channels (dim {t.dim})")
    if batch and len({t.dim for t in batch}) > 1:
        for t in batch:
            ctx.pin(t, "scaled_dot_product_attention operands carry channels on different dims")
        batch = []
    if batch:
        D, ref = batch[0].dim, batch[0].segs
        for t in batch[1:]:
            ctx.unify(ref, t.segs, "attention heads of query, key and value")
        spans = [
            x
            for x in (q, k, v, mask)
            if _untracked_spans(ctx, x, D, n) or ctx.tracked(x) not in (None, *batch)
        ]
        if spans:
            ctx.spaces.pin(
                ref,
                f"'{getattr(spans[0], 'name', spans[0])}' spans the head dim untracked at node '{ctx.node.name}'",
            )
            return v_last
        if mask is not None:
            _claim_param_operand(ctx, mask, D, n, ref)
        ctx.cost(ref)
        return Tracked(D, ref)
    return v_last


def attention_units(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Linear layers whose output feeds attention heads -> the head dim (``RuleContext.new_space``).

    From every ``scaled_dot_product_attention`` (or einsum/matmul), each of q, k and v is followed back through layout ops
    (transpose, permute, view/reshape, contiguous, split/chunk pieces) to a linear layer; when that path
    splits the features into heads (a view/reshape that adds dims), the linear's output space gets one
    channel per head of ``u`` = q/k/v's last dim. This only coarsens the space (its ``u`` positions are
    removed together), so it can never make a model wrong: the rules along the path still check every
    step. Two different head dims on one linear give their gcd.
    """
    units: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            operands = node.args[:3]
        elif node.target in (torch.einsum, torch.matmul, operator.matmul, "matmul"):
            operands = tuple(a for a in flat_args(node) if isinstance(a, fx.Node))
        else:
            continue
        for x in operands:
            found = _linear_through_heads(gm, x)
            if found is not None:
                units[found[0]] = math.gcd(units.get(found[0], 0), found[1])
    return units


_LAYOUT_METHODS = {"transpose", "permute", "contiguous", "view", "reshape", "split", "chunk"}
_LAYOUT_FUNCTIONS = {
    torch.transpose,
    torch.permute,
    torch.reshape,
    torch.split,
    torch.chunk,
    operator.getitem,
}


def _linear_through_heads(gm: fx.GraphModule, x: Any) -> tuple[fx.Node, int] | None:
    """The linear layer behind operand ``x`` and the head dim (the last dim after the head split nearest
    to it), when only layout ops and a head split lie between them."""
    modules = dict(gm.named_modules())
    unit = 0
    while isinstance(x, fx.Node):
        if (x.op == "call_module" and isinstance(modules.get(str(x.target)), nn.Linear)) or (
            x.op == "call_function" and x.target is F.linear
        ):
            return (x, unit) if unit else None
        layout = (x.op == "call_method" and x.target in _LAYOUT_METHODS) or (
            x.op == "call_function" and x.target in _LAYOUT_FUNCTIONS
        )
        if not layout or not x.args:
            return None
        if x.target in ("view", "reshape", torch.reshape):
            si, so = tensor_shape(_arg_value(x.args[0])), tensor_shape(x.meta.get(META_VALUE))
            if si is not None and so is not None and len(so) > len(si):
                unit = so[-1]
        x = x.args[0]
    return None


def _arg_value(a: Any) -> Any:
    return a.meta.get(META_VALUE) if isinstance(a, fx.Node) else None


@register(nn.MultiheadAttention)
def _multihead_attention(ctx: RuleContext) -> Any:
    """An ``nn.MultiheadAttention`` still in the graph is one that ``CanonicalizePass`` could not decompose
    into linear / head split / ``scaled_dot_product_attention`` (masks, attention weights used, separate
    key/value widths...): its channels are pinned with that reason."""
    from fxprune.passes.canonical import mha_unsupported

    assert isinstance(ctx.module, nn.MultiheadAttention)
    why = mha_unsupported(ctx.node, ctx.module) or "not decomposed"
    ctx.pin_inputs(f"nn.MultiheadAttention '{ctx.node.target}' kept whole ({why})")
    return None


# ------------------------------------------------------------------------------------ einsum, matmul
def _contraction(ctx: RuleContext, terms: Sequence[str], out: str, ops: Sequence[Any]) -> Any:
    """A product of tensors in einsum form (``terms[i]`` labels the dims of ``ops[i]``, ``out`` the output).

    The channels of every tracked operand must sit under one letter ``L`` (else they pin); those operands
    are unified on it. Cases: (1) ``L`` is in the output: it is a batch-like dim (attention heads in
    ``bhid,bhjd->bhij``); the output carries the channels there; an untracked operand spanning ``L`` pins
    them, a parameter there is sliced (``"norm"``). (2) ``L`` is contracted against a parameter (two
    operands, ``bnd,de->bne``): a linear layer; the parameter's ``L`` dim is the consumer (``"in"``) and
    its one free letter, if the output has it, is a new channel space (``"out"``). (3) ``L`` is contracted
    between two activations (``q k^T`` over the features): pinned, since no consumer column could zero
    a removed channel in the masked oracle.
    """
    tracked = [(i, t) for i, x in enumerate(ops) if (t := ctx.tracked(x)) is not None]
    if not tracked:
        return None
    tie = _tie_on_one_dim(ctx, tracked, lambda i, t: terms[i][t.dim],
                          "operands of a product carry channels under different dims", "product over the same dim")  # fmt: skip
    if tie is None:
        return None
    L, ref = tie
    others = [i for i in range(len(ops)) if ctx.tracked(ops[i]) is None and L in terms[i]]
    if L in out:
        for i in others:
            s = tensor_shape(ctx.value(ops[i])) or ()
            d = terms[i].index(L)
            pd = param_dim(ctx.info(ops[i]), d)
            if s and s[d] != 1 and pd is None:
                ctx.spaces.pin(
                    ref, f"an untracked tensor '{ops[i]}' spans the channel dim at node '{ctx.node.name}'"
                )
            elif s and s[d] != 1 and pd is not None:
                ctx.claim(ctx.info(ops[i]).name, pd, ref, "norm")
        ctx.cost(ref)
        return Tracked(out.index(L), ref)
    w = ctx.info(ops[others[0]]) if len(ops) == 2 and len(others) == 1 else None
    if not isinstance(w, ParamRef):
        ctx.spaces.pin(ref, f"product contracts the channels of two activations at node '{ctx.node.name}'")
        return None
    j = others[0]
    ctx.claim(w.name, terms[j].index(L), ref, "in")
    free = [c for c in terms[j] if c in out and c not in terms[1 - j]]
    if len(free) != 1:
        ctx.cost(ref)
        return None
    w_shape = tensor_shape(ctx.value(ops[j])) or ()
    new = ctx.new_space(w_shape[terms[j].index(free[0])])
    ctx.claim(w.name, terms[j].index(free[0]), new, "out")
    ctx.cost(ref, new)
    return Tracked(out.index(free[0]), new)


@register(torch.einsum)
def _einsum(ctx: RuleContext) -> Any:
    eq = ctx.node.args[0] if ctx.node.args else None
    ops = list(ctx.node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        ctx.pin_inputs("einsum without an explicit output or with an ellipsis")
        return None
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        ctx.pin_inputs("einsum with a different number of operands than terms")
        return None
    return _contraction(ctx, terms, out, ops)


@register(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
def _matmul(ctx: RuleContext) -> Any:
    """``a @ b`` as ``...ij,...jk->...ik`` (batch dims aligned from the right); 1-d operands pin."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other" if ctx.node.target not in (torch.bmm, "bmm") else "mat2")
    sa, sb, so = tensor_shape(ctx.value(a)), tensor_shape(ctx.value(b)), tensor_shape(ctx.out)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        ctx.pin_inputs("matmul of a vector or a non-tensor")
        return None
    batch = "abcdefgh"[: len(so) - 2]
    ta = batch[len(batch) - (len(sa) - 2) :] + "ij"
    tb = batch[len(batch) - (len(sb) - 2) :] + "jk"
    return _contraction(ctx, [ta, tb], batch + "ik", [a, b])


from fxprune.passes import rules_swin  # noqa: E402, F401 - registers the Swin rules into these tables
