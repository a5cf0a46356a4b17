"""Weights computed from parameters: ``WeightExpr``, followed through the ops that compute them.

A traced subclass may compute the weight it passes to ``F.conv2d``/``F.linear`` instead of reading it:
weight standardisation ``(w - w.mean((1, 2, 3), keepdim=True)) / w.std(...)``, timm's
``F.batch_norm(w.reshape(1, out, -1), None, None, gain.view(-1), training=True).reshape_as(w)``, a
weight-normalised linear ``F.normalize(w, dim=1)``, NFNet's ``gain * standardised(w)``. The ops on the way
have no tracked channels (``Tracked``): their info is a ``WeightExpr`` that says, for every dim of the
value, which parameter dims index it position by position (``Axis.sites``), so that the consumer can cut
those parameters with its channels.

An ``Axis`` is one factor of a value dim: ``size`` positions, the parameter dims ``sites`` whose position
``i`` is the axis's position ``i``, and ``zero`` (position ``i`` of the value is zero whenever position
``i`` of every site is zero). A value dim is a row-major tuple of axes: one axis read from a parameter
dim, several after a reshape merges dims (``[out, in, kh, kw] -> [1, out, in*kh*kw]``), none for a
size-1 dim. Besides the dims a ``WeightExpr`` carries ``mixed``, the parameter dims some op reduced or
normalised across (with the reason), and ``literals``, the literal sizes of reshapes that must follow an
axis's kept count.

The consumer (``claim_weight``, called by the conv and linear rules with the channel spaces of its weight
dims) then, for each of those dims:

1. needs exactly one axis with sites (else the space is pinned: the dim is not read channel by channel);
2. claims every site with the space (the rewrite slices the raw parameters, gain and bias included);
3. pins the space where a site is ``mixed``: a statistic over that dim runs over every channel, so
   removing one changes the others' values (weight standardisation's ``mean((1, 2, 3))`` mixes the input
   channels: a WS conv keeps its input channels, while its output channels are free, each row
   standardised on its own);
4. pins an input-channel space whose axis is not ``zero``: the masked oracle zeroes the parameters'
   input columns, which zeroes the computed weight's columns only when zero maps to zero (``gain * w``
   does, ``w + b`` does not);
5. records the pending literals of the axes it binds (``reshape(1, self.out_channels, -1)``).

A parameter dim that some reader of the chain does not claim is pinned by the dependency pass's partial
claim check, which follows ``WeightExpr`` nodes to their readers, so an op that is not followed here (its
info is None) costs prunability, never correctness.

Worked example (``WSConv(32, 64, 3)``, input channels ``I``, new output space ``O``)::

    w    = get_attr b.weight           [(b.weight,0)] [(b.weight,1)] [(b.weight,2)] [(b.weight,3)]
    m    = w.mean((1, 2, 3), True)      [(b.weight,0)] [] [] []       mixed: b.weight dims 1, 2, 3
    s    = w.std((1, 2, 3), True)       likewise
    v    = (w - m) / (s + 1e-5)         the axes of w, mixed of m and s
    y    = F.conv2d(x, v, b.bias)       dim 0 ~ O: claims b.weight dim 0 and b.bias dim 0 (free)
                                        dim 1 ~ I: claims b.weight dim 1; mixed: I pinned
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from fxprune.passes.rule_context import ParamRef, RuleContext, tensor_shape
from fxprune.passes.spaces import Seg

__all__ = [
    "Axis",
    "PendingLiteral",
    "WeightExpr",
    "claim_weight",
    "combine",
    "is_weight",
    "normalise",
    "pad",
    "reduce",
    "reshape",
    "unary",
    "weight_of",
]

ParamDim = tuple[str, int]


@dataclass(frozen=True)
class Axis:
    """One factor of a value dim: ``size`` positions; position ``i`` is position ``i`` of every parameter
    dim in ``sites``; ``zero``: the value is zero there whenever all sites are zero there."""

    size: int
    sites: frozenset[ParamDim]
    zero: bool


@dataclass(frozen=True)
class PendingLiteral:
    """Argument ``index`` (element ``item``) of node ``node`` is the size of a dim made of ``axes``."""

    node: fx.Node
    index: int | str
    item: int | None
    axes: tuple[Axis, ...]


@dataclass(frozen=True)
class WeightExpr:
    """A tensor computed channel by channel from parameters (see the module docstring)."""

    dims: tuple[tuple[Axis, ...], ...]
    mixed: tuple[tuple[ParamDim, str], ...] = ()
    literals: tuple[PendingLiteral, ...] = ()


def is_weight(info: Any) -> bool:
    """Whether ``info`` is a parameter read with ``get_attr`` or a value computed from parameters."""
    return isinstance(info, (ParamRef, WeightExpr))


def weight_of(ctx: RuleContext, a: Any) -> WeightExpr | None:
    """``a`` as a ``WeightExpr``: a parameter becomes one axis per dim, its own dim; None when ``a`` is
    neither a parameter nor computed from parameters."""
    info = ctx.info(a)
    if isinstance(info, WeightExpr):
        return info
    shape = tensor_shape(ctx.value(a))
    if not isinstance(info, ParamRef) or shape is None:
        return None
    return WeightExpr(tuple((Axis(n, frozenset({(info.name, d)}), True),) for d, n in enumerate(shape)))


def _merge(items: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(x for t in items for x in t))


def _sizes(axes: Sequence[Axis]) -> tuple[int, ...]:
    return tuple(a.size for a in axes)


def _real(axes: Sequence[Axis]) -> tuple[Axis, ...]:
    """``axes`` without size-1 ones: a size-1 dim is one position whatever it was read from (``keepdim``
    leaves none, a parameter's own size-1 dim one), and no channel of it can be removed."""
    return tuple(a for a in axes if a.size > 1)


def _remap(e: WeightExpr, dims: Sequence[tuple[Axis, ...]], mixed: Iterable[tuple[ParamDim, str]] = (),
           extra: Sequence[WeightExpr] = ()) -> WeightExpr:  # fmt: skip
    """``e`` with new ``dims``, more ``mixed`` entries and the mixed/literals of ``extra`` joined in."""
    return WeightExpr(
        tuple(dims),
        _merge([e.mixed, tuple(mixed), *(x.mixed for x in extra)]),
        _merge([e.literals, *(x.literals for x in extra)]),
    )


def _mix(ctx: RuleContext, e: WeightExpr, dims: Iterable[int], what: str) -> list[tuple[ParamDim, str]]:
    """The sites of ``e``'s axes on ``dims`` (size > 1: a statistic over one position mixes nothing), each
    with the reason ``what`` at this node."""
    why = f"{what} at node '{ctx.node.name}'"
    return [(s, why) for d in dims for a in e.dims[d] if a.size > 1 for s in sorted(a.sites)]


# --------------------------------------------------------------------------------------------- the ops
def combine(ctx: RuleContext, operands: Sequence[Any], kind: str) -> WeightExpr | None:
    """Broadcasting arithmetic of parameters, values computed from them and Python numbers.

    Operands are aligned from the right; an operand whose dim is broadcast (absent or size 1 against a
    larger size) contributes nothing to that dim, the others must have the same axes there (size-1 axes
    left out), whose sites are joined. ``kind`` decides ``zero``: ``"add"`` (add, sub, maximum, minimum): every operand zero
    there, Python numbers 0; ``"mul"``: some operand zero there; ``"div"``/``"pow"``: the first operand
    zero there (``pow``: with a positive number exponent). None when an operand is another tensor.
    """
    so = tensor_shape(ctx.out)
    if so is None:
        return None
    exprs: list[tuple[int, WeightExpr, tuple[int, ...]]] = []
    numbers: list[Any] = []
    for pos, x in enumerate(operands):
        e = weight_of(ctx, x)
        shape = tensor_shape(ctx.value(x)) if isinstance(x, fx.Node) else None
        if e is not None and shape is not None:
            exprs.append((pos, e, shape))
        elif shape is not None:
            return None  # a tensor not computed from parameters
        else:
            numbers.append(x)
    if not exprs:
        return None
    n = len(so)
    dims: list[tuple[Axis, ...]] = []
    for j in range(n):
        present: list[tuple[int, tuple[Axis, ...]]] = []
        for pos, e, s in exprs:
            i = j - (n - len(s))
            if i >= 0 and (s[i] == so[j]):
                present.append((pos, _real(e.dims[i])))
        if not present:
            dims.append(())
            continue
        ref = _sizes(present[0][1])
        if any(_sizes(axes) != ref for _, axes in present):
            return None
        out: list[Axis] = []
        for k, size in enumerate(ref):
            zeros = {pos: axes[k].zero for pos, axes in present}
            if kind == "add":
                zero = len(zeros) == len(exprs) and all(zeros.values()) and all(x == 0 for x in numbers)
            elif kind == "mul":
                zero = any(zeros.values())
            elif kind == "pow":
                exp = operands[1] if len(operands) > 1 else None
                zero = zeros.get(0, False) and isinstance(exp, (int, float)) and exp > 0
            else:
                zero = zeros.get(0, False)
            sites = frozenset().union(*(axes[k].sites for _, axes in present))
            out.append(Axis(size, sites, zero))
        dims.append(tuple(out))
    first = exprs[0][1]
    return _remap(first, dims, (), [e for _, e, _ in exprs[1:]])


def unary(ctx: RuleContext, x: Any, zero_preserving: bool) -> WeightExpr | None:
    """A pointwise function of a value (``sqrt``, ``abs``, ``clone``): same axes; ``zero`` kept when
    ``f(0) = 0`` (``zero_preserving``). None when the shape changes."""
    e = weight_of(ctx, x)
    if e is None or tensor_shape(ctx.value(x)) != tensor_shape(ctx.out):
        return None
    dims = [tuple(Axis(a.size, a.sites, a.zero and zero_preserving) for a in axes) for axes in e.dims]
    return _remap(e, dims)


def reduce(ctx: RuleContext, x: Any, dim: Any, keepdim: bool, what: str) -> WeightExpr | None:
    """A reduction (mean, sum, std, var, amax, amin, norm) over ``dim`` (None: all dims): the sites of
    the reduced dims are mixed; the other axes keep ``zero`` (a statistic of zeros is zero)."""
    e = weight_of(ctx, x)
    shape = tensor_shape(ctx.value(x))
    if e is None or shape is None:
        return None
    nd = len(shape)
    dims_in = dim if isinstance(dim, (list, tuple)) else [] if dim is None else [dim]
    if not all(isinstance(d, int) for d in dims_in):
        return None
    over = {d % nd for d in dims_in} or set(range(nd))  # no dim (None, ()): every dim
    dims = [() if d in over else e.dims[d] for d in range(nd) if keepdim or d not in over]
    if tuple(math.prod(_sizes(a)) for a in dims) != tensor_shape(ctx.out):
        return None
    return _remap(e, dims, _mix(ctx, e, sorted(over), f"a {what} across it"))


def normalise(ctx: RuleContext, x: Any, over: Iterable[int], affine: Sequence[tuple[Any, Sequence[int]]],
              shift: bool, what: str) -> WeightExpr | None:  # fmt: skip
    """A normalisation of a value (batch/layer/group norm, ``F.normalize``) whose statistics run over the
    dims ``over``, scaled and shifted by ``affine`` operands (``(arg, dims of x its dims align with)``;
    their sites join those dims). The sites of ``over`` are mixed; the other axes stay ``zero`` unless a
    ``shift`` (a bias, running statistics) is added. None when an affine operand is not computed from
    parameters or does not align."""
    e = weight_of(ctx, x)
    if e is None or tensor_shape(ctx.value(x)) != tensor_shape(ctx.out):
        return None
    over = set(over)
    dims = [_real(axes) for axes in e.dims]
    extra: list[WeightExpr] = []
    for a, aligned in affine:
        if a is None:
            continue
        p = weight_of(ctx, a)
        if p is None or len(p.dims) != len(aligned):
            return None
        for pd, d in zip(p.dims, aligned, strict=True):
            if _sizes(_real(pd)) != _sizes(dims[d]):
                return None
            dims[d] = tuple(
                Axis(ax.size, ax.sites | pa.sites, ax.zero) for ax, pa in zip(dims[d], _real(pd), strict=True)
            )
        extra.append(p)
    out = [
        tuple(Axis(ax.size, ax.sites, ax.zero and not shift and d not in over) for ax in axes)
        for d, axes in enumerate(dims)
    ]
    return _remap(e, out, _mix(ctx, e, sorted(over), f"a {what} across it"), extra)


def reshape(ctx: RuleContext, x: Any, literal_at: Any = None, like: Any = None) -> WeightExpr | None:
    """view/reshape/flatten/squeeze/unsqueeze of a value: the axes in row-major order, regrouped into the
    output dims (size-1 axes dropped; an axis cut in two: None). ``literal_at(e)``: where the size of
    output dim ``e`` is written, ``(index, item)``, or None; an int there is recorded as a pending literal
    of the dim's axes. ``like``: the ``other`` of ``view_as``/``reshape_as``, whose shape the output
    takes: it must be computed from parameters with the same axes, whose sites join the output's."""
    e = weight_of(ctx, x)
    so = tensor_shape(ctx.out)
    if e is None or so is None:
        return None
    queue = [a for axes in e.dims for a in _real(axes)]
    dims: list[tuple[Axis, ...]] = []
    for size in so:
        taken: list[Axis] = []
        while math.prod(_sizes(taken)) < size and queue:
            taken.append(queue.pop(0))
        if math.prod(_sizes(taken)) != size:
            return None
        dims.append(tuple(taken))
    if queue:
        return None
    extra: list[WeightExpr] = []
    if like is not None:
        other = weight_of(ctx, like)
        shape_of = [_real(axes) for axes in other.dims] if other is not None else []
        if other is None or [_sizes(a) for a in shape_of] != [_sizes(a) for a in dims]:
            return None
        dims = [
            tuple(Axis(a.size, a.sites | b.sites, a.zero) for a, b in zip(axes, o, strict=True))
            for axes, o in zip(dims, shape_of, strict=True)
        ]
        extra.append(other)
    out = _remap(e, dims, (), extra)
    pending: list[PendingLiteral] = []
    for i, axes in enumerate(dims):
        where = literal_at(i) if literal_at is not None else None
        if where is None or not any(a.sites for a in axes):
            continue
        index, item = where
        arg = ctx.node.args[index] if isinstance(index, int) else ctx.node.kwargs[index]
        value = arg[item] if item is not None else arg
        if isinstance(value, int) and value == so[i]:
            pending.append(PendingLiteral(ctx.node, index, item, axes))
    return WeightExpr(out.dims, out.mixed, out.literals + tuple(pending))


def pad(ctx: RuleContext, x: Any, amounts: Sequence[Any], zero_fill: bool) -> WeightExpr | None:
    """``F.pad`` of a value: a padded dim (a nonzero or computed amount) is one new axis read from no
    parameter (its positions moved); the others keep their axes, ``zero`` when the fill keeps zeros
    (``zero_fill``: constant 0, or a reflect/replicate/circular mode)."""
    e = weight_of(ctx, x)
    shape, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
    if e is None or shape is None or so is None or len(amounts) % 2:
        return None
    nd = len(shape)
    padded = {nd - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] != 0 or amounts[2 * i + 1] != 0}
    dims = [
        (Axis(so[d], frozenset(), False),)
        if d in padded
        else tuple(Axis(a.size, a.sites, a.zero and zero_fill) for a in e.dims[d])
        for d in range(nd)
    ]
    return _remap(e, dims)


# ----------------------------------------------------------------------------------------- the consumer
def claim_weight(ctx: RuleContext, weight: str | WeightExpr | None,
                 claims: Sequence[tuple[int, Sequence[Seg], str]]) -> None:  # fmt: skip
    """Claim the channel spaces of a consumer's weight: ``claims`` holds ``(dim, segs, role)`` for each dim
    of the weight that carries channels. A parameter name is claimed as it is; a ``WeightExpr`` follows
    the numbered cases of the module docstring."""
    if weight is None:
        return
    if isinstance(weight, str):
        for d, segs, role in claims:
            ctx.claim(weight, d, segs, role)
        return
    here = f"the weight of node '{ctx.node.name}'"
    bound: list[tuple[Axis, tuple[Seg, ...]]] = []
    for d, segs, role in claims:
        axes = weight.dims[d] if d < len(weight.dims) else ()
        if len(axes) != 1 or not axes[0].sites:
            ctx.spaces.pin(
                segs, f"{here} is computed: its dim {d} is not read channel by channel from a parameter"
            )
            continue
        axis = axes[0]
        for p, pd in sorted(axis.sites):
            ctx.claim(p, pd, segs, role)
        mixed = [(site, why) for site, why in weight.mixed if site in axis.sites]
        for (p, pd), why in mixed:
            ctx.spaces.pin(segs, f"parameter '{p}' dim {pd} has {why}, and {here} reads it: removing a "
                                     "channel there would change the kept ones")  # fmt: skip
        if role == "in" and not axis.zero and not mixed:
            ctx.spaces.pin(segs, f"{here} is not zero where its parameters' input columns are zero (an added "
                                 "term): removing an input channel is not zeroing it")  # fmt: skip
        bound.append((axis, tuple(segs)))
    for lit in weight.literals:
        hits = [(k, segs) for k, a in enumerate(lit.axes) for b, segs in bound if a.sites & b.sites]
        if len(hits) > 1:
            for _, segs in hits:
                ctx.spaces.pin(segs, f"a literal size at node '{lit.node.name}' follows several channel dims")
        elif hits:
            k, segs = hits[0]
            inner, outer = math.prod(_sizes(lit.axes[k + 1 :])), math.prod(_sizes(lit.axes[:k]))
            ctx.literal(lit.index, lit.item, ctx.spaces.scale(segs, inner) * outer, node=lit.node)
