"""Dependency analysis: which channels must be removed together, and which may not be removed at all.

Each node's output is described by an *info*: ``Tracked(dim, segs)`` for a tensor dimension carrying
channel spaces, ``ParamRef(name)`` for a parameter read by ``get_attr`` (``ParamView`` once broadcast by
``expand``), a tuple of infos for tuple/list
outputs, or None (no prunable channels flow there). Op rules (``op_rules``) compute a node's info from its
inputs' infos, unify spaces that must match, record which parameter slices a space cuts (*claims*), which
channel dims scale the node's FLOPs, and which literal arguments depend on channel counts. An op without a
rule pins every space it reads, with the reason, so a missing rule costs prunability, never correctness.

The pass writes ``META_CHANNELS``, ``META_COST_DIMS`` and ``META_LITERALS`` into node metadata and returns
a ``DependencyResult`` with the ``ChannelGroup``s.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from fxprune.passes.base import AnalysisPass
from fxprune.passes.spaces import Seg, SpaceTable

from fxprune.data import (
    META_CHANNELS,
    META_COST_DIMS,
    META_LITERALS,
    META_VALUE,
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
class Tracked:
    """Dimension ``dim`` (non-negative) of a tensor carries the channel segments ``segs``."""

    dim: int
    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class SizeOf:
    """A Python number computed from the size of channel dims (``x.shape[1]``, ``c // 2``).

    Its value changes when ``segs`` lose channels, so every use must follow the kept count: rules that
    can prove it does (shape arithmetic, the reshape of the same channels) set
    ``RuleContext.sizes_handled``; any other op that reads it pins ``segs``.
    """

    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer read with ``get_attr``."""

    name: str


@dataclass(frozen=True)
class ParamView:
    """A parameter read through ``expand`` (a class token broadcast over the batch): a value, not a weight.

    ``dims[i]`` is the parameter dim that dim ``i`` of the value indexes, or None where ``expand``
    broadcast a size-1 dim. Only ops that slice a parameter along the channels they meet (elementwise,
    ``cat``) accept it; weight-taking rules see something other than a ``ParamRef`` and pin.
    """

    name: str
    dims: tuple[int | None, ...]


def param_dim(info: Any, d: int) -> int | None:
    """The parameter dim that dim ``d`` of a ``ParamRef``/``ParamView`` value indexes (None: broadcast)."""
    if isinstance(info, ParamRef):
        return d
    if isinstance(info, ParamView):
        return info.dims[d] if 0 <= d < len(info.dims) else None
    return None


_MISSING = object()


@dataclass
class _Claim:
    param: str
    dim: int
    segs: tuple[Seg, ...]
    role: str
    node: str


@dataclass
class _LiteralClaim:
    index: int | str
    item: int | None
    kind: str
    segs: tuple[tuple[Seg, ...], ...]
    divisor: int


class RuleContext:
    """What an op rule sees of one node, and the only ways it may record facts."""

    def __init__(self, analysis: _Analysis, node: fx.Node, module: torch.nn.Module | None) -> None:
        self._a = analysis
        self.node = node
        self.module = module
        self.spaces = analysis.spaces
        self.sizes_handled = False

    # ------------------------------------------------------------- reading
    def arg(self, pos: int, name: str, default: Any = _MISSING) -> Any:
        """Positional argument ``pos`` (counting the tensor ``self`` of a method) or keyword ``name``."""
        if pos < len(self.node.args):
            return self.node.args[pos]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _MISSING:
            raise KeyError(name)
        return default

    def info(self, a: Any) -> Any:
        """The info of a node argument: a node's info; for a list/tuple (a namedtuple too) the tuple of its
        items' infos, for a dict the tuple of its values' infos (nested containers alike); None for
        anything else (literals, slices: rules read those themselves)."""
        if isinstance(a, fx.Node):
            return self._a.env.get(a)
        if isinstance(a, (list, tuple)):
            return tuple(self.info(x) for x in a)
        if isinstance(a, dict):
            return tuple(self.info(x) for x in a.values())
        return None

    def value(self, a: Any) -> Any:
        """``TensorValue`` (or tuple) of a node argument; None for non-tensors and literals."""
        return a.meta.get(META_VALUE) if isinstance(a, fx.Node) else None

    @property
    def out(self) -> Any:
        return self.node.meta.get(META_VALUE)

    def tracked(self, a: Any) -> Tracked | None:
        i = self.info(a)
        return i if isinstance(i, Tracked) else None

    def size(self, segs: Sequence[Seg]) -> int:
        return self.spaces.size(segs)

    # ------------------------------------------------------------ recording
    def new_space(self, length: int, pin: str | None = None) -> tuple[Seg, ...]:
        """A fresh channel space of ``length`` positions created by this node.

        When the node's output feeds attention heads (``_Analysis.units``: the head dim ``u``), the space
        is ``length / u`` channels of ``u`` consecutive positions each: one channel per head, so whole
        heads are the unit of pruning (``op_rules.attention_units``).
        """
        u = self._a.units.get(self.node, 1)
        if u > 1 and length % u == 0:
            return ((self.spaces.new(length // u, self.node.name, pin), u),)
        return ((self.spaces.new(length, self.node.name, pin), 1),)

    def pin(self, info: Any, reason: str) -> None:
        """Pin every space inside ``info`` (a Tracked, or nested tuples of them)."""
        if isinstance(info, (Tracked, SizeOf)):
            self.spaces.pin(info.segs, f"{reason} at node '{self.node.name}'")
        elif isinstance(info, tuple):
            for i in info:
                self.pin(i, reason)

    def pin_inputs(self, reason: str) -> None:
        """Pin every space of every node in the arguments, however nested (lists, tuples, dicts, slices)."""
        for a in _flat_args(self.node):
            self.pin(self.info(a), reason)

    def unify(self, s1: Sequence[Seg], s2: Sequence[Seg], why: str) -> bool:
        if self.spaces.unify(s1, s2):
            return True
        self.spaces.pin(s1, f"{why}: channel layouts cannot be aligned at node '{self.node.name}'")
        self.spaces.pin(s2, f"{why}: channel layouts cannot be aligned at node '{self.node.name}'")
        return False

    def claim(self, param: str | None, dim: int, segs: Sequence[Seg], role: str) -> None:
        """Channels ``segs`` index dimension ``dim`` of parameter/buffer ``param`` (None: nothing)."""
        if param is None:
            return
        self._a.claim(_Claim(param, dim, tuple(segs), role, self.node.name), self)

    def cost(self, *dims: Sequence[Seg] | None) -> None:
        """The node's FLOPs scale with the kept size of each (non-None) channel dim in ``dims``."""
        self._a.cost_dims[self.node] = tuple(tuple(d) for d in dims if d is not None)

    def literal(
        self, index: int | str, item: int | None, *segs: Sequence[Seg], kind: str = "size", divisor: int = 1
    ) -> None:
        """Argument ``index`` (or its element ``item``) is recomputed from kept counts (``LiteralFix``)."""
        claim = _LiteralClaim(index, item, kind, tuple(tuple(s) for s in segs), divisor)
        self._a.literals.setdefault(self.node, []).append(claim)


Rule = Callable[[RuleContext], Any]


@dataclass
class _Analysis:
    gm: fx.GraphModule
    strict: bool
    spaces: SpaceTable = field(default_factory=SpaceTable)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    claims: dict[tuple[str, int], list[_Claim]] = field(default_factory=dict)
    cost_dims: dict[fx.Node, tuple[tuple[Seg, ...], ...]] = field(default_factory=dict)
    literals: dict[fx.Node, list[_LiteralClaim]] = field(default_factory=dict)
    units: dict[fx.Node, int] = field(default_factory=dict)

    def claim(self, c: _Claim, ctx: RuleContext) -> None:
        key = (c.param, c.dim)
        if key in self.claims:  # a shared parameter: every use must keep the same rows/columns
            ctx.unify(self.claims[key][0].segs, c.segs, f"parameter '{c.param}' is used twice")
        self.claims.setdefault(key, []).append(c)


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
    """Builds channel groups with the op rule table (``fxprune.passes.op_rules``)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def run(self, gm: fx.GraphModule) -> DependencyResult:
        from fxprune.passes import op_rules

        a = _Analysis(gm, self.strict)
        a.units = op_rules.attention_units(gm)
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            ctx = RuleContext(a, node, module)
            rule = op_rules.lookup(node, module)
            a.env[node] = _no_rule(ctx, self.strict) if rule is None else rule(ctx)
            if not ctx.sizes_handled:
                for arg in _flat_args(node):
                    info = ctx.info(arg)
                    if isinstance(arg, fx.Node) and has_sizes(info):
                        ctx.pin(info, f"a channel count '{arg.name}' is used by {node.op} {node.target}")
        _pin_partial_claims(a, modules)
        return _finalize(a)


def _pin_partial_claims(a: _Analysis, modules: dict[str, torch.nn.Module]) -> None:
    """Pin the channels of a parameter dim that some reader of the same tensor does not claim.

    A parameter read by several nodes (a module called twice, a ``get_attr`` used twice) or under several
    names (tied weights: ``b.weight = a.weight``) is sliced once, so every reader must cut it with the same
    channels. Rules unify the claims of readers that track channels (``_Analysis.claim``); this catches the
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


def _value_readers(a: _Analysis, node: fx.Node) -> set[str]:
    """Nodes that read the values of ``node``'s parameter: its users, except shape queries (``w.shape``,
    ``w.size(0)``), and through an ``expand`` (a ``ParamView``) the users of the view instead."""
    out: set[str] = set()
    for u in node.users:
        if _is_query(u):
            continue
        if isinstance(a.env.get(u), ParamView):
            out |= _value_readers(a, u)
        else:
            out.add(u.name)
    return out


_QUERY_METHODS = {"size", "dim", "numel", "stride", "is_contiguous", "get_device"}


def _is_query(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is builtins.getattr
    return node.op == "call_method" and node.target in _QUERY_METHODS


def has_sizes(info: Any) -> bool:
    """Whether ``info`` is or holds (``x.shape``: a tuple) a ``SizeOf``."""
    if isinstance(info, SizeOf):
        return True
    return isinstance(info, tuple) and any(has_sizes(i) for i in info)


def describe_target(node: fx.Node, module: torch.nn.Module | None) -> str:
    if node.op == "call_module" and module is not None:
        return f"module {type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _no_rule(ctx: RuleContext, strict: bool) -> Any:
    touches = any(ctx.tracked(x) is not None for x in _flat_args(ctx.node))
    if touches and strict:
        raise UnsupportedOpError(
            f"no channel rule for {describe_target(ctx.node, ctx.module)} at node {ctx.node.format_node()}; "
            "use strict=False to pin its channels instead, or register a rule in fxprune.passes.op_rules"
        )
    ctx.pin_inputs(f"no rule for {describe_target(ctx.node, ctx.module)}")
    return None


def _flat_args(node: fx.Node) -> list[Any]:
    """Every leaf of ``node``'s arguments (positional and keyword), through lists, tuples (namedtuples),
    dicts and slices, in order: the one walk every check over "all arguments" uses."""
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)
        elif isinstance(a, slice):
            walk((a.start, a.stop, a.step))
        else:
            out.append(a)

    walk((node.args, node.kwargs))
    return out


def _finalize(a: _Analysis) -> DependencyResult:
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
