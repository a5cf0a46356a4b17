"""Op family ``attention``: ``F.scaled_dot_product_attention``, ``torch.einsum`` / ``matmul`` / ``bmm``, and
``nn.MultiheadAttention`` (what ``CanonicalizePass`` could not decompose is pinned; the attribute fix keeps
``embed_dim`` and ``num_heads`` true after a decomposed one lost heads).

``attention_units`` (run by ``DependencyPass`` before the rules) finds the linear layers whose output is
split into heads, so their channels are whole heads.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import AttrFix, OpFamily, Ops
from fxprune.passes.rule_context import (
    ParamRef,
    RuleContext,
    Tracked,
    flat_args,
    param_dim,
    tensor_shape,
    tie_on_one_dim,
)
from fxprune.passes.spaces import Seg

from fxprune.data import META_VALUE

__all__ = ["FAMILY", "attention_units"]


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

    With ``enable_gqa=True`` the key and value have ``H_kv`` heads for the query's ``H``: each of their
    heads stands for ``H / H_kv`` consecutive query heads (a repeat), as after ``repeat_kv``.

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
    sq = tensor_shape(ctx.value(q))
    taken: list[Any] = []
    for name, x in (("query", q), ("key", k), ("value", v)):
        t = ctx.tracked(x)
        if t is None:
            continue
        sx = tensor_shape(ctx.value(x))
        if (
            name != "query"
            and ctx.node.kwargs.get("enable_gqa")
            and sq is not None
            and sx is not None
            and (len(sx) == len(sq) == n and t.dim == n - 3 and sx[t.dim] < sq[t.dim])
        ):  # grouped-query attention: query head i reads key/value head i // (H / H_kv)
            t = Tracked(t.dim, ctx.spaces.scale(t.segs, sq[t.dim] // sx[t.dim]))
        if len(tensor_shape(ctx.value(x)) or ()) != n:
            ctx.pin(t, f"scaled_dot_product_attention {name} of another rank than the output")
        elif t.dim < n - 2:
            batch.append(t)
            taken.append(x)
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
            if _untracked_spans(ctx, x, D, n) or (ctx.tracked(x) is not None and x not in taken)
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

    From every ``scaled_dot_product_attention`` (or einsum/matmul), each of q, k and v is followed back
    (``_linears_behind``) to the linear layers behind it; when that path splits the features into heads (a
    view/reshape that adds dims and changes the last one), the linear's output space gets one channel per
    head of ``u`` = the head dim there. This only coarsens the space (its ``u`` positions are removed
    together), so it can never make a model wrong: the rules along the path still check every step. Two
    different head dims on one linear give their gcd.

    Grouped-query attention: when k or v reach the product with ``H`` heads but their linear makes
    ``H_kv < H`` (``repeat_kv``'s expand + reshape, ``repeat_interleave``, or ``enable_gqa``), query head
    ``i`` reads key/value head ``i // (H / H_kv)``, so the query's unit is ``H / H_kv`` heads: a key/value
    head and its query heads are removed together, and every key/value head keeps as many query heads.

    A linear reshaped straight to ``(..., 3, heads, head_dim)`` is a fused q/k/v projection: its heads
    are found from the reshape alone, since the attention may be reached through other ops than layout
    ones (MViT pools q, k and v, and scales q, before the product).
    """
    units: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        fused = _fused_qkv(gm, node)
        if fused is not None:
            units[fused[0]] = math.gcd(units.get(fused[0], 0), fused[1])
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            operands = node.args[:3]
        elif node.target in (torch.einsum, torch.matmul, operator.matmul, "matmul"):
            operands = tuple(a for a in flat_args(node) if isinstance(a, fx.Node))
        else:
            continue
        found = [f for x in operands for f in _linears_behind(gm, x)]
        so = tensor_shape(node.meta.get(META_VALUE))
        heads = so[-3] if so is not None and len(so) >= 3 else 0
        kv = [n for lin, u in found if heads and (n := _features(lin) // u) < heads and heads % n == 0]
        for lin, u in found:
            if kv and _features(lin) // u == heads:
                u *= heads // min(kv)
            units[lin] = math.gcd(units.get(lin, 0), u)
    return units


_PASS_METHODS = {"transpose", "permute", "contiguous", "view", "reshape", "split", "chunk", "unsqueeze",
                   "expand", "repeat_interleave", "to", "float", "type_as", "clone", "neg"}  # fmt: skip
_PASS_FUNCTIONS = {
    torch.transpose,
    torch.permute,
    torch.reshape,
    torch.split,
    torch.chunk,
    torch.unsqueeze,
    torch.repeat_interleave,
    torch.neg,
    operator.getitem,
    operator.neg,
}
# elementwise ops followed through their operands of the output's own shape (rotary embeddings
# ``q * cos + rotate_half(q) * sin``, a norm's ``x * rsqrt(...)``, a scaled query)
_ELEMENTWISE = {torch.add, torch.sub, torch.mul, torch.div, operator.add, operator.sub, operator.mul,
                operator.truediv, "add", "sub", "mul", "div"}  # fmt: skip


def _is_linear(gm: fx.GraphModule, x: fx.Node) -> bool:
    return (x.op == "call_module" and isinstance(gm.get_submodule(str(x.target)), nn.Linear)) or (
        x.op == "call_function" and x.target in (F.linear, torch.addmm)
    )


def _features(linear: fx.Node) -> int:
    s = tensor_shape(linear.meta.get(META_VALUE))
    return s[-1] if s else 0


def _linears_behind(gm: fx.GraphModule, x: Any) -> list[tuple[fx.Node, int]]:
    """The linear layers behind operand ``x`` with the head dim of the head split nearest to each, when
    only layout ops, a head split, elementwise ops on same-shaped operands and a ``cat`` along the last
    dim (rotary embeddings' ``rotate_half``) lie between them."""
    found: list[tuple[fx.Node, int]] = []
    seen: set[tuple[fx.Node, int]] = set()
    todo: list[tuple[Any, int]] = [(x, 0)]
    while todo:
        x, unit = todo.pop()
        if not isinstance(x, fx.Node) or (x, unit) in seen:
            continue
        seen.add((x, unit))
        if _is_linear(gm, x):
            if unit:
                found.append((x, unit))
            continue
        if not x.args or x.op not in ("call_method", "call_function"):
            continue
        if x.target in ("view", "reshape", torch.reshape):
            si, so = tensor_shape(_arg_value(x.args[0])), tensor_shape(x.meta.get(META_VALUE))
            if si is not None and so is not None and len(so) > len(si) and so[-1] != si[-1]:
                unit = so[-1]
        if (x.op == "call_method" and x.target in _PASS_METHODS) or (
            x.op == "call_function" and x.target in _PASS_FUNCTIONS
        ):
            todo.append((x.args[0], unit))
        elif x.target in _ELEMENTWISE:
            so = tensor_shape(x.meta.get(META_VALUE))
            todo.extend((a, unit) for a in x.args[:2] if so is not None and tensor_shape(_arg_value(a)) == so)
        elif x.target in (torch.cat, torch.concat) and _last_dim_cat(x):
            todo.extend((a, unit) for a in flat_args(x) if isinstance(a, fx.Node))
    return found


def _last_dim_cat(node: fx.Node) -> bool:
    """Whether ``torch.cat`` node ``node`` concatenates along the last dim."""
    so = tensor_shape(node.meta.get(META_VALUE))
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return so is not None and isinstance(dim, int) and dim in (-1, len(so) - 1)


def _fused_qkv(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(linear, head_dim)`` when ``node`` reshapes a linear's output features to ``(3, heads, head_dim)``."""
    if node.target not in ("view", "reshape", torch.reshape) or not node.args:
        return None
    x = node.args[0]
    si, so = tensor_shape(_arg_value(x)), tensor_shape(node.meta.get(META_VALUE))
    if si is None or so is None or len(so) != len(si) + 2 or so[-3] != 3:
        return None
    if so[-3] * so[-2] * so[-1] != si[-1] or tuple(so[: len(si) - 1]) != tuple(si[:-1]):
        return None
    modules = dict(gm.named_modules())
    linear = isinstance(x, fx.Node) and (
        (x.op == "call_module" and isinstance(modules.get(str(x.target)), nn.Linear))
        or (x.op == "call_function" and x.target is F.linear)
    )
    return (x, so[-1]) if linear else None  # type: ignore[return-value]


def _arg_value(a: Any) -> Any:
    return a.meta.get(META_VALUE) if isinstance(a, fx.Node) else None


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
    tie = tie_on_one_dim(ctx, tracked, lambda i, t: terms[i][t.dim],
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


def _fix_mha(m: nn.Module, before: Mapping[str, int]) -> None:
    """An ``nn.MultiheadAttention`` decomposed by ``CanonicalizePass``: the graph reads its parameters
    directly; its attributes are kept truthful for people (whole heads go, ``head_dim`` stays)."""
    assert isinstance(m, nn.MultiheadAttention)
    if m.in_proj_weight is not None:
        m.embed_dim = m.kdim = m.vdim = int(m.in_proj_weight.shape[1])
        m.num_heads = int(m.in_proj_weight.shape[0]) // 3 // m.head_dim


FAMILY = OpFamily(
    "attention",
    (
        Ops((F.scaled_dot_product_attention,), _sdpa),
        Ops((nn.MultiheadAttention,), _multihead_attention, attr_fix=AttrFix((), _fix_mha)),
        Ops((torch.einsum,), _einsum),
        Ops((torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"), _matmul),
    ),
)
