"""Dependency analysis: which channels must be removed together, and which may not be removed at all.

Each node's output is described by an *info*: ``Tracked(dim, segs)`` for a tensor dimension carrying
channel spaces, ``ParamRef(name)`` for a parameter read by ``get_attr`` (``ParamView`` once broadcast by
``expand``), ``WeightExpr`` for a value computed from parameters (a standardised weight:
``fxprune.passes.weight_expr``), a tuple of infos for tuple/list outputs, or None (no prunable channels
flow there). Op rules (the ``OpEntry.rule`` of each op in an op table, ``fxprune.passes.family``;
``op_table.DEFAULT_TABLE`` by default) compute a node's info from its inputs' infos, unify spaces that must match, record which parameter slices a space cuts (*claims*), which
channel dims scale the node's FLOPs, and which literal arguments depend on channel counts. An op without a
rule pins every space it reads, with the reason, so a missing rule costs prunability, never correctness.

The pass writes ``META_CHANNELS``, ``META_COST_DIMS`` and ``META_LITERALS`` into node metadata and returns
a ``DependencyResult`` with the ``ChannelGroup``s.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from fxprune.passes import op_table
from fxprune.passes.base import AnalysisPass
from fxprune.passes.family import OpTable
from fxprune.passes.ops_attention import attention_units
from fxprune.passes.rule_context import (
    Analysis,
    ParamRef,
    ParamView,
    RuleContext,
    SizeOf,
    Tracked,
    flat_args,
    has_sizes,
)
from fxprune.passes.spaces import Seg
from fxprune.passes.weight_expr import WeightExpr

from fxprune.data import (
    META_CHANNELS,
    META_COST_DIMS,
    META_LITERALS,
    ChannelDim,
    ChannelGroup,
    LiteralFix,
    Segments,
    Site,
    TensorValue,
)
from fxprune.errors import UnsupportedOpError

__all__ = [
    "DependencyPass",
    "DependencyResult",
    "ParamRef",
    "ParamView",
    "RuleContext",
    "SizeOf",
    "Tracked",
    "UnsupportedOpError",
]


@dataclass(frozen=True)
class DependencyResult:
    """The channel groups of a graph; node metadata holds the per-node channel layouts."""

    groups: tuple[ChannelGroup, ...]

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def pinned_reasons(self) -> dict[int, tuple[str, ...]]:
        return {g.id: g.pinned for g in self.groups if g.pinned}

    def to_networkx(self) -> nx.DiGraph:
        """Bipartite graph: ``group:<id>`` nodes and parameter nodes, edges labelled with the role."""
        g = nx.DiGraph()
        for grp in self.groups:
            gid = f"group:{grp.id}"
            g.add_node(gid, kind="group", size=grp.size, prunable=grp.prunable, pinned="; ".join(grp.pinned))
            for s in grp.sites:
                g.add_node(s.param, kind="param")
                g.add_edge(
                    gid, s.param, role=s.role, dim=s.dim, offset=s.offset, repeat=s.repeat, node=s.node
                )
        return g


class DependencyPass(AnalysisPass[DependencyResult]):
    """Builds channel groups with the rules of an op table (``table``; None: ``op_table.DEFAULT_TABLE`` as
    it is when the pass runs)."""

    def __init__(self, strict: bool = False, table: OpTable | None = None) -> None:
        self.strict = strict
        self.table = table

    def run(self, gm: fx.GraphModule) -> DependencyResult:
        table = self.table if self.table is not None else op_table.DEFAULT_TABLE
        a = Analysis(gm, self.strict)
        a.units = attention_units(gm)
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            ctx = RuleContext(a, node, module)
            entry = table.node_entry(node, module)
            if entry is None:
                why = table.module_override(module) if module is not None else None
                a.env[node] = _no_rule(ctx, self.strict, why)
            else:
                a.env[node] = entry.rule(ctx)
            if not ctx.sizes_handled:
                for arg in flat_args(node):
                    info = ctx.info(arg)
                    if isinstance(arg, fx.Node) and has_sizes(info):
                        ctx.pin(info, f"a channel count '{arg.name}' is used by {node.op} {node.target}")
        _pin_partial_claims(a, modules)
        return _finalize(a)


def _pin_partial_claims(a: Analysis, modules: dict[str, torch.nn.Module]) -> None:
    """Pin the channels of a parameter dim that some reader of the same tensor does not claim.

    A parameter read by several nodes (a module called twice, a ``get_attr`` used twice) or under several
    names (tied weights: ``b.weight = a.weight``) is sliced once, so every reader must cut it with the same
    channels. Rules unify the claims of readers that track channels (``Analysis.claim``); this catches the
    reader that claims nothing on that dim (its input is a graph input or untracked) and names that alias
    the same tensor. Example: ``conv(x)`` on the graph input and ``conv(conv(x))``: the second call claims the
    weight's input columns with the first call's output channels, the first call cannot lose columns, so
    those channels are pinned. Rule-independent: a rule that forgets a claim costs prunability only.
    """
    names_of: dict[int, list[str]] = {}
    for name, t in (
        *a.gm.named_parameters(remove_duplicate=False),
        *a.gm.named_buffers(remove_duplicate=False),
    ):
        names_of.setdefault(id(t), []).append(name)
    aliases = {n: names for names in names_of.values() for n in names}
    readers: dict[str, set[str]] = {}
    for node in a.gm.graph.nodes:
        if node.op == "call_module":
            m = modules[str(node.target)]
            for name, _ in (
                *m.named_parameters(prefix=str(node.target), remove_duplicate=False),
                *m.named_buffers(prefix=str(node.target), remove_duplicate=False),
            ):
                readers.setdefault(name, set()).add(node.name)
        elif node.op == "get_attr":
            readers.setdefault(str(node.target), set()).update(_value_readers(a, node))
    for (param, dim), claims in a.claims.items():
        names = aliases.get(param, [param])
        claimed = {c.node for n in names for c in a.claims.get((n, dim), ())}
        unclaimed = sorted(set().union(*(readers.get(n, set()) for n in names)) - claimed)
        tied = [n for n in names if n != param]
        if not unclaimed and not tied:
            continue
        why = (
            f"node '{unclaimed[0]}' also reads it without tracked channels"
            if unclaimed
            else f"it is the same tensor as '{tied[0]}' (tied weights)"
        )
        for c in claims:
            a.spaces.pin(c.segs, f"parameter '{param}' dim {dim} cannot be sliced: {why}")


def _value_readers(a: Analysis, node: fx.Node) -> set[str]:
    """Nodes that read the values of ``node``'s parameter: its users, except shape queries (``w.shape``,
    ``w.size(0)``), and through an ``expand`` (a ``ParamView``) or a value computed from it (a
    ``WeightExpr``: a standardised weight) the users of that value instead, down to the conv or linear that
    claims it."""
    out: set[str] = set()
    for u in node.users:
        if _is_query(u):
            continue
        if isinstance(a.env.get(u), (ParamView, WeightExpr)):
            out |= _value_readers(a, u)
        else:
            out.add(u.name)
    return out


_QUERY_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "get_device"}


def _is_query(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is builtins.getattr
    return node.op == "call_method" and node.target in _QUERY_METHODS


def describe_target(node: fx.Node, module: torch.nn.Module | None) -> str:
    if node.op == "call_module" and module is not None:
        return f"module {type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _no_rule(ctx: RuleContext, strict: bool, why: str | None = None) -> Any:
    """Pin what the node reads (``strict``: raise when it reads channels). ``why``: the reason a module whose
    base class has an entry does not get it (``OpTable.module_override``)."""
    touches = any(ctx.tracked(x) is not None for x in flat_args(ctx.node))
    what = describe_target(ctx.node, ctx.module) + (f": {why}" if why else "")
    if touches and strict:
        raise UnsupportedOpError(
            f"no channel rule for {what} at node {ctx.node.format_node()}; use strict=False to pin its "
            "channels instead, or add an entry to an op family (fxprune.passes.family)"
        )
    ctx.pin_inputs(f"no rule for {what}")
    return None


def _finalize(a: Analysis) -> DependencyResult:
    sp = a.spaces
    gid: dict[int, int] = {}

    def group_of(atom: int) -> int:
        root = sp.find(atom)
        if root not in gid:
            gid[root] = len(gid)
        return gid[root]

    def segments(segs: Sequence[Seg]) -> Segments:
        return tuple((group_of(x), r) for x, r in sp.leaves(segs))

    def convert(info: Any) -> Any:
        if isinstance(info, Tracked):
            return ChannelDim(info.dim, segments(info.segs))
        if isinstance(info, tuple):
            return tuple(convert(i) for i in info)
        return None

    nodes_of: dict[int, list[str]] = {}
    for node in a.gm.graph.nodes:
        ch = convert(a.env.get(node))
        node.meta[META_CHANNELS] = ch
        for cd in _channel_dims(ch):
            for g, _ in cd.segments:
                lst = nodes_of.setdefault(g, [])
                if not lst or lst[-1] != node.name:
                    lst.append(node.name)
        node.meta[META_COST_DIMS] = tuple(segments(d) for d in a.cost_dims.get(node, ()))
        node.meta[META_LITERALS] = tuple(
            LiteralFix(lc.index, lc.item, lc.kind, tuple(segments(x) for x in lc.segs), lc.divisor)
            for lc in a.literals.get(node, [])
        )

    sites: dict[int, list[Site]] = {}
    for (param, dim), claims in a.claims.items():
        for c in claims:
            offset = 0
            for atom, r in sp.leaves(c.segs):
                sites.setdefault(group_of(atom), []).append(Site(param, dim, offset, r, c.role, c.node))
                offset += sp.length[atom] * r

    roots = {sp.find(leaf) for members in sp.classes().values() for leaf in members}
    for root in sorted(roots, key=lambda r: gid.get(r, len(gid) + r)):
        group_of(root)
    groups = []
    for root, g in sorted(gid.items(), key=lambda kv: kv[1]):
        reasons = list(sp.reasons(root))
        gsites = tuple(sites.get(g, ()))
        if not reasons and not any(s.role == "out" for s in gsites):
            reasons.append("no producer: no conv/linear output rows create these channels")
        groups.append(ChannelGroup(g, sp.length[root], gsites, tuple(nodes_of.get(g, ())), tuple(reasons)))
    return DependencyResult(tuple(groups))


def _channel_dims(ch: Any) -> list[ChannelDim]:
    if isinstance(ch, ChannelDim):
        return [ch]
    if isinstance(ch, tuple):
        return [d for c in ch for d in _channel_dims(c)]
    return []


def is_tensor_value(v: Any) -> bool:
    return isinstance(v, TensorValue)
