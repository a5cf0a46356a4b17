"""Canonicalisation: rewrite composite modules into plain ops that the op rules understand.

A transform pass on fxprune's private traced copy, run after a first shape propagation (it needs the rank of
each attention input) and before the one that counts FLOPs. Today it decomposes
``nn.MultiheadAttention`` (self-attention with packed ``in_proj_weight``, no masks, attention weights not
used) into the ops it computes::

    qkv = F.linear(x, in_proj_weight, in_proj_bias)           # x: [B, L, E] (transposed if not batch_first)
    q, k, v = qkv.split([E, E, E], dim=-1)
    q = q.view(B, L, H, d).transpose(1, 2)                    # same for k, v; d = E / H
    o = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
    o = o.transpose(1, 2).reshape(B, L, E)
    out = out_proj(o)

so the general rules apply: the linear's rows and the out projection's columns follow the heads
(``ops_attention.attention_units`` makes one channel per head), the head split is a reshape whose literal ``H``
follows the kept heads, and ``E`` (the residual width) is an ordinary consumer dimension. Parameters keep
their names (``<mha>.in_proj_weight``, ``<mha>.out_proj.weight``), so plans, the masked oracle and
compensation address the user's model unchanged; the module object stays in the tree, holding them.
Any other use of ``nn.MultiheadAttention`` is left whole; its rule pins it with ``mha_unsupported``'s
reason.
"""

from __future__ import annotations

import copy
import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.base import TransformPass

from fxprune.data import META_VALUE, TensorValue

__all__ = ["CanonicalizePass", "mha_unsupported"]


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip


def mha_unsupported(node: fx.Node, m: nn.MultiheadAttention) -> str | None:
    """Why the call ``node`` of ``m`` cannot be decomposed, or None when it can."""
    args = {**dict(zip(_MHA_ARGS, node.args, strict=False)), **node.kwargs}
    q, k, v = args.get("query"), args.get("key"), args.get("value")
    value = q.meta.get(META_VALUE) if isinstance(q, fx.Node) else None
    checks = (
        (not (q is k is v) or not isinstance(q, fx.Node), "query, key and value are not one tensor"),
        (not isinstance(value, TensorValue), "query shape unknown (shape propagation has not run)"),
        (isinstance(value, TensorValue) and len(value.shape) != 3, "unbatched (2-d) query"),
        (args.get("key_padding_mask") is not None or args.get("attn_mask") is not None, "attention mask"),
        (bool(args.get("is_causal", False)), "is_causal"),
        (not m._qkv_same_embed_dim or m.in_proj_weight is None, "separate kdim/vdim projections"),
        (m.bias_k is not None or m.add_zero_attn, "bias_k/bias_v or add_zero_attn"),
        (m.dropout != 0.0, f"attention dropout {m.dropout}"),
        (
            any(
                u.op != "call_function" or u.target is not operator.getitem or u.args[1] not in (0, 1)
                for u in node.users
            ),
            "its output tuple is used whole",
        ),  # fmt: skip
        (any(u.args[1] == 1 and u.users for u in node.users), "the attention weights are used"),
    )
    return next((why for bad, why in checks if bad), None)


def _decompose(graph: fx.Graph, node: fx.Node, m: nn.MultiheadAttention) -> None:
    """Insert the decomposition of ``node`` before it and reroute its users (see the module docstring)."""
    name = str(node.target)
    e, h = m.embed_dim, m.num_heads
    d = e // h
    x = node.args[0] if node.args else node.kwargs["query"]
    with graph.inserting_before(node):
        if not m.batch_first:
            x = graph.call_method("transpose", (x, 0, 1))
        shape = graph.call_function(getattr, (x, "shape"))
        b, n = (graph.call_function(operator.getitem, (shape, i)) for i in (0, 1))
        w = graph.get_attr(f"{name}.in_proj_weight")
        bias = graph.get_attr(f"{name}.in_proj_bias") if m.in_proj_bias is not None else None
        qkv = graph.call_function(F.linear, (x, w, bias))
        parts = graph.call_method("split", (qkv, [e, e, e]), {"dim": -1})
        heads = []
        for i in range(3):
            p = graph.call_function(operator.getitem, (parts, i))
            p = graph.call_method("view", (p, b, n, h, d))
            heads.append(graph.call_method("transpose", (p, 1, 2)))
        o = graph.call_function(F.scaled_dot_product_attention, tuple(heads), {"scale": d**-0.5})
        o = graph.call_method("transpose", (o, 1, 2))
        o = graph.call_method("reshape", (o, b, n, e))
        out = graph.call_module(f"{name}.out_proj", (o,))
        if not m.batch_first:
            out = graph.call_method("transpose", (out, 0, 1))
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        graph.erase_node(u)
    graph.erase_node(node)


class CanonicalizePass(TransformPass):
    """A new GraphModule (sharing the input's modules and parameters) with composite modules decomposed."""

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        graph = copy.deepcopy(gm.graph)
        modules = dict(gm.named_modules())
        done: dict[str, nn.Module] = {}
        for node in list(graph.nodes):
            m = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(m, nn.MultiheadAttention) and mha_unsupported(node, m) is None:
                _decompose(graph, node, m)
                done[str(node.target)] = m
        new = fx.GraphModule(gm, graph, type(gm).__name__)
        for name, m in done.items():  # GraphModule copied only the parameters it reads: put the module back
            new.set_submodule(name, m)
        new.graph.lint()
        new.recompile()
        return new
