"""What an op rule sees and records: ``RuleContext`` over the state of one dependency analysis.

The infos rules compute for a node's output (``Tracked``, ``SizeOf``, ``ParamRef``, ``ParamView``, tuples of
them, None) are described in ``fxprune.passes.dependency``, which runs the rules (``OpEntry.rule`` of ``fxprune.passes.family``)
over a graph and turns the ``Analysis`` they fill into channel groups. The helpers at the end are shared by
the op families (``fxprune.passes.ops_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from fxprune.passes.spaces import Seg, SpaceTable

from fxprune.data import META_VALUE, TensorValue

__all__ = [
    "Analysis",
    "Claim",
    "LiteralClaim",
    "ParamRef",
    "ParamView",
    "Rule",
    "RuleContext",
    "SizeOf",
    "Tracked",
    "flat_args",
    "has_sizes",
    "norm_dim",
    "param_dim",
    "param_name",
    "self_arg",
    "tensor_shape",
    "tie_on_one_dim",
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
class Claim:
    """Channels ``segs`` index dim ``dim`` of parameter ``param`` (``role``: in, out, ...) at ``node``."""

    param: str
    dim: int
    segs: tuple[Seg, ...]
    role: str
    node: str


@dataclass
class LiteralClaim:
    """A literal argument recomputed from kept counts (``RuleContext.literal``; a ``LiteralFix``)."""

    index: int | str
    item: int | None
    kind: str
    segs: tuple[tuple[Seg, ...], ...]
    divisor: int


class RuleContext:
    """What an op rule sees of one node, and the only ways it may record facts."""

    def __init__(self, analysis: Analysis, node: fx.Node, module: torch.nn.Module | None) -> None:
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

        When the node's output feeds attention heads (``Analysis.units``: the head dim ``u``), the space
        is ``length / u`` channels of ``u`` consecutive positions each: one channel per head, so whole
        heads are the unit of pruning (``ops_attention.attention_units``).
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
        for a in flat_args(self.node):
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
        self._a.claim(Claim(param, dim, tuple(segs), role, self.node.name), self)

    def cost(self, *dims: Sequence[Seg] | None) -> None:
        """The node's FLOPs scale with the kept size of each (non-None) channel dim in ``dims``."""
        self._a.cost_dims[self.node] = tuple(tuple(d) for d in dims if d is not None)

    def literal(self, index: int | str, item: int | None, *segs: Sequence[Seg], kind: str = "size",
                divisor: int = 1, node: fx.Node | None = None) -> None:  # fmt: skip
        """Argument ``index`` (or its element ``item``) of this node, or of an earlier ``node`` whose size
        only the consumer of its value knows (a reshape of a computed weight), is recomputed from kept
        counts (``LiteralFix``); the same fix recorded twice is kept once."""
        claim = LiteralClaim(index, item, kind, tuple(tuple(s) for s in segs), divisor)
        fixes = self._a.literals.setdefault(self.node if node is None else node, [])
        if node is None or claim not in fixes:
            fixes.append(claim)


Rule = Callable[[RuleContext], Any]


@dataclass
class Analysis:
    """The state of one dependency analysis of ``gm``: the spaces, each node's info (``env``) and what the
    rules recorded (claims, cost dims, literals); ``units`` is the head dim of nodes that feed attention."""

    gm: fx.GraphModule
    strict: bool
    spaces: SpaceTable = field(default_factory=SpaceTable)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    claims: dict[tuple[str, int], list[Claim]] = field(default_factory=dict)
    cost_dims: dict[fx.Node, tuple[tuple[Seg, ...], ...]] = field(default_factory=dict)
    literals: dict[fx.Node, list[LiteralClaim]] = field(default_factory=dict)
    units: dict[fx.Node, int] = field(default_factory=dict)

    def claim(self, c: Claim, ctx: RuleContext) -> None:
        key = (c.param, c.dim)
        if key in self.claims:  # a shared parameter: every use must keep the same rows/columns
            ctx.unify(self.claims[key][0].segs, c.segs, f"parameter '{c.param}' is used twice")
        self.claims.setdefault(key, []).append(c)


def has_sizes(info: Any) -> bool:
    """Whether ``info`` is or holds (``x.shape``: a tuple) a ``SizeOf``."""
    if isinstance(info, SizeOf):
        return True
    return isinstance(info, tuple) and any(has_sizes(i) for i in info)


def flat_args(node: fx.Node) -> list[Any]:
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


# ------------------------------------------------------------------------ helpers shared by the op families
def tensor_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of a ``TensorValue``; None for anything else (a literal, a tuple of values)."""
    return v.shape if isinstance(v, TensorValue) else None


def norm_dim(d: int, ndim: int) -> int:
    """``d`` as a non-negative dim of a tensor of rank ``ndim``."""
    return d + ndim if d < 0 else d


def self_arg(ctx: RuleContext) -> Any:
    """The primary tensor: the module input, or the first argument of a function/method."""
    return ctx.arg(0, "input") if ctx.node.args or "input" in ctx.node.kwargs else ctx.arg(0, "self")


_FUNCTIONAL_PARAM_POS = {"weight": (1, "weight"), "bias": (2, "bias")}


def param_name(ctx: RuleContext, attr: str) -> str | None:
    """The qualified name of parameter ``attr`` (``"weight"``, ``"bias"``...) of the node's module, or, for
    a functional call, of its ``weight`` (arg 1) / ``bias`` (arg 2) read by ``get_attr``; None when absent
    or computed."""
    m = ctx.module
    if m is not None:
        return f"{ctx.node.target}.{attr}" if getattr(m, attr, None) is not None else None
    a = ctx.info(ctx.arg(*_FUNCTIONAL_PARAM_POS[attr], None)) if attr in _FUNCTIONAL_PARAM_POS else None
    return a.name if isinstance(a, ParamRef) else None


def tie_on_one_dim(ctx: RuleContext, tracked: Sequence[tuple[Any, Tracked]], dim_of: Callable[[Any, Tracked], Any],
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
