"""Op families and the op table: one place per op.

An **op family** (one ``passes/ops_*.py`` module, e.g. ``ops_conv``) holds, for each op it supports, one
``OpEntry``: its channel rule (``RuleContext -> info``, run by ``DependencyPass``), its attribute fix after
slicing (``RewritePass``), its ONNX translation (``fxprune.onnx_writer``) and its role in compensation
(``compensate``). An **op table** is built from an explicit tuple of families (``fxprune.passes.op_table``
lists the default ones); the passes take a table and default to ``DEFAULT_TABLE``. Nothing is registered
by importing a module: a family is a value, and a table holds exactly the families it was given.

Entries are keyed by an nn.Module type (``call_module``), a function object (``call_function``), a Tensor
method name (``call_method``), or a ``GraphOp`` (the graph's own nodes: placeholder, get_attr, output, and
the call that builds an output container).

How to add an op
----------------
1. Pick the family module by what the op does (``ops_conv``, ``ops_linear``, ``ops_norm``,
   ``ops_activation``, ``ops_pool``, ``ops_elementwise``, ``ops_shape``, ``ops_attention``, ``ops_swin``,
   ``ops_graph``) or write a new ``ops_<name>.py`` and add its ``FAMILY`` to ``op_table.DEFAULT_TABLE``.
2. Add an ``Ops((targets...), rule, ...)`` to its ``FAMILY``: ``rule`` (required) says how channels flow
   (``rule_context.RuleContext``: claim parameter slices, unify, pin with a reason); ``attr_fix`` (an
   ``AttrFix``) when the module has size attributes (``out_channels``, ``num_heads``) that must follow its
   sliced parameters; ``onnx`` (``fxprune.passes.onnx_translate``) to let the direct ONNX writer emit it
   (else the writer falls back to torch's exporter); ``compensation`` when compensation may rewrite it.
3. One test (``tests/passes/test_op_rules.py``): a tiny model using the op, compiled, with
   ``assert_masked_equivalent`` (and a case in ``tests/test_onnx_writer.py`` when it has a translation:
   ``test_every_rule_is_exercised`` checks every translation has one).

Lookup follows the MRO
----------------------
``OpTable.module_entry(m)`` walks ``type(m).__mro__``: a subclass that keeps its parent's computation gets
the parent's entry (``NonDynamicallyQuantizableLinear`` gets ``nn.Linear``'s; a user's ``class
MyConv(nn.Conv2d)`` that only changes ``__init__`` gets ``nn.Conv2d``'s). A class that **overrides**
``forward``, or any other method the entry's class defines below ``nn.Module`` (``_conv_forward``,
``_check_input_dim``...), except the construction-time ones (``__init__`` and the other dunders,
``extra_repr``, ``reset_parameters``), computes something else: it is a different op and gets **no**
entry. When it is called as one module (a leaf), the channels it touches are pinned with the reason
"MyConv overrides forward of nn.Conv2d; make it traceable (not a leaf) or add an entry".

The tracer is not changed by the table: torch.fx traces into every module outside ``torch.nn`` (a user's
subclass, overriding or not), so its computation appears as the functional calls its ``forward`` makes
(``F.conv2d`` on its ``get_attr`` weight), which have their own entries; nothing is lost and an override is
followed exactly (a weight it computes from its parameters, e.g. weight standardisation, is followed to
the call by ``weight_expr``, so its parameters are sliced too). A subclass is a leaf only when the user asks (``leaf_modules=``): then it gets the
parent's entry by the rule above. (Making every subclass that keeps ``forward`` a leaf was rejected: the
core tracer would have to see the table, which lives a layer above it; the traced graphs of existing
models would change; and a helper the check cannot see, e.g. a method ``forward`` reaches through another
object, would be silently skipped, while tracing follows whatever the code does.) Attribute fixes follow ``isinstance`` whatever ``forward`` does
(``OpTable.attr_fix``): they describe the parameters, which a subclass shares, and a traced subclass's
parameters are sliced through its functional calls.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch.fx as fx
import torch.nn as nn
from fxprune.passes.onnx_translate import OnnxTranslation
from fxprune.passes.rule_context import Rule

from fxprune.trace import Expansion, is_container_call

__all__ = [
    "AttrFix",
    "CompensationRole",
    "GraphOp",
    "OpEntry",
    "OpFamily",
    "OpTable",
    "Ops",
]


class CompensationRole(enum.Enum):
    """What compensation (``fxprune.passes.compensate``) may do with a module of this op.

    ``NONE``: nothing. ``COLUMNS``: a consumer (conv, linear) whose removed input columns can be folded
    into its bias or re-fitted. ``RUNNING_MEAN``: a BatchNorm that takes the shift of a bias-free consumer
    right before it into its ``running_mean``.
    """

    NONE = "none"
    COLUMNS = "columns"
    RUNNING_MEAN = "running_mean"


@dataclass(frozen=True)
class AttrFix:
    """How the rewrite keeps a module's size attributes true after its parameters were sliced:
    ``remember`` names the int attributes read before slicing, ``fix(module, before)`` sets them after."""

    remember: tuple[str, ...]
    fix: Callable[[nn.Module, Mapping[str, int]], None]


@dataclass(frozen=True)
class OpEntry:
    """Everything fxprune knows about one op (see the module docstring)."""

    rule: Rule
    attr_fix: AttrFix | None = None
    onnx: OnnxTranslation | None = None
    compensation: CompensationRole = CompensationRole.NONE


@dataclass(frozen=True)
class GraphOp:
    """The key of a graph-structure entry: an fx node op (``"placeholder"``, ``"get_attr"``, ``"output"``)
    or ``"container"`` (a ``call_function`` that builds a container, ``fxprune.trace.is_container_call``)."""

    op: str


@dataclass(frozen=True)
class Ops:
    """Targets sharing one rule, as a family declares them. ``onnx`` is one translation for all targets or
    a mapping target -> translation (targets it leaves out have none)."""

    targets: tuple[Any, ...]
    rule: Rule
    attr_fix: AttrFix | None = None
    onnx: OnnxTranslation | Mapping[Any, OnnxTranslation] | None = None
    compensation: CompensationRole = CompensationRole.NONE

    def entries(self) -> Iterator[tuple[Any, OpEntry]]:
        for t in self.targets:
            onnx = self.onnx.get(t) if isinstance(self.onnx, Mapping) else self.onnx
            yield t, OpEntry(self.rule, self.attr_fix, onnx, self.compensation)


def _check_key(key: Any, family: str) -> None:
    if isinstance(key, type) and not issubclass(key, nn.Module):
        raise TypeError(f"family {family}: a type key must be an nn.Module subclass, got {key!r}")
    if isinstance(key, GraphOp) and key.op not in ("placeholder", "get_attr", "output", "container"):
        raise ValueError(f"family {family}: unknown graph op {key.op!r}")


class OpFamily:
    """A named set of entries (and of ``trace`` expansions whose calls it rules). Immutable."""

    def __init__(
        self, name: str, ops: Iterable[Ops], expansions: Mapping[Any, Expansion] | None = None
    ) -> None:
        self.name = name
        entries: dict[Any, OpEntry] = {}
        for group in ops:
            for key, entry in group.entries():
                _check_key(key, name)
                if key in entries and entries[key] != entry:
                    raise ValueError(f"family {name}: two entries for {_describe(key)}")
                entries[key] = entry
        self.entries: Mapping[Any, OpEntry] = MappingProxyType(entries)
        self.expansions: Mapping[Any, Expansion] = MappingProxyType(dict(expansions or {}))

    def __repr__(self) -> str:
        return f"OpFamily({self.name!r}, {len(self.entries)} entries)"


#: methods a subclass may define without changing what the op computes (beside dunders)
_CONSTRUCTION = frozenset({"extra_repr", "reset_parameters"})


def _overridden(cls: type, base: type) -> str | None:
    """The first method that ``cls`` (or a class between it and ``base``) defines anew and ``base`` (or a
    base of it below ``nn.Module``) defines too; None when ``cls`` computes what ``base`` computes."""
    own = [b for b in base.__mro__ if b not in nn.Module.__mro__]
    for c in cls.__mro__[: cls.__mro__.index(base)]:
        for name, v in vars(c).items():
            if (name.startswith("__") and name.endswith("__")) or name in _CONSTRUCTION:
                continue
            if not (inspect.isfunction(v) or isinstance(v, (staticmethod, classmethod, property))):
                continue
            if any(name in vars(b) for b in own):
                return name
    return None


def _describe(key: Any) -> str:
    if isinstance(key, type):
        mod = key.__module__
        return f"nn.{key.__name__}" if mod.startswith("torch.nn") else f"{mod}.{key.__qualname__}"
    if isinstance(key, str):
        return f"method Tensor.{key}"
    if isinstance(key, GraphOp):
        return f"graph {key.op}"
    return f"{getattr(key, '__module__', '') or ''}.{getattr(key, '__name__', str(key))}".lstrip(".")


class OpTable:
    """The entries of an explicit tuple of families; lookups by node, module, function or method name.

    Two families giving the same key (or expanding the same call) is a ``ValueError``: which one wins would
    depend on their order.
    """

    def __init__(self, families: Sequence[OpFamily]) -> None:
        self.families = tuple(families)
        owner: dict[Any, str] = {}
        entries: dict[Any, OpEntry] = {}
        expansions: dict[Any, Expansion] = {}
        for fam in self.families:
            for key, entry in fam.entries.items():
                if key in owner:
                    raise ValueError(f"{_describe(key)} is in families {owner[key]} and {fam.name}")
                owner[key], entries[key] = fam.name, entry
            for target, expand in fam.expansions.items():
                if target in expansions:
                    raise ValueError(f"two families expand {_describe(target)} (the second: {fam.name})")
                expansions[target] = expand
        self._entries: Mapping[Any, OpEntry] = MappingProxyType(entries)
        self._owner = owner
        self.expansions: Mapping[Any, Expansion] = MappingProxyType(expansions)

    # -- lookups -------------------------------------------------------------------------------------------
    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __getitem__(self, key: Any) -> OpEntry:
        return self._entries[key]

    def items(self) -> Iterator[tuple[Any, OpEntry]]:
        """Every ``(key, entry)``, in family order."""
        return iter(self._entries.items())

    def family_of(self, key: Any) -> str:
        return self._owner[key]

    def _module_match(self, module: nn.Module) -> tuple[OpEntry | None, str | None]:
        cls = type(module)
        for base in cls.__mro__:
            entry = self._entries.get(base)
            if entry is None:
                continue
            name = _overridden(cls, base)
            if name is None:
                return entry, None
            why = (
                f"{cls.__qualname__} overrides {name} of {_describe(base)}; make it traceable (not a leaf) "
                "or add an entry"
            )
            return None, why
        return None, None

    def module_entry(self, module: nn.Module) -> OpEntry | None:
        """The entry of ``module``'s class or of the nearest base whose computation it keeps (the MRO rule
        in the module docstring); None when there is none or the class overrides it."""
        return self._module_match(module)[0]

    def module_override(self, module: nn.Module) -> str | None:
        """Why ``module`` gets no entry although a base class has one (it overrides ``forward`` or another
        method of that base); None otherwise."""
        return self._module_match(module)[1]

    def function_entry(self, fn: Any) -> OpEntry | None:
        if isinstance(fn, (str, GraphOp)) or (isinstance(fn, type) and issubclass(fn, nn.Module)):
            return None
        try:
            return self._entries.get(fn)
        except TypeError:  # an unhashable target
            return None

    def method_entry(self, name: str) -> OpEntry | None:
        return self._entries.get(str(name))

    def node_entry(self, node: fx.Node, module: nn.Module | None) -> OpEntry | None:
        """The entry for ``node`` (``module``: the module a ``call_module`` node calls)."""
        if node.op == "call_module":
            return self.module_entry(module) if module is not None else None
        if node.op == "call_function":
            if is_container_call(node):
                return self._entries.get(GraphOp("container"))
            return self.function_entry(node.target)
        if node.op == "call_method":
            return self.method_entry(str(node.target))
        return self._entries.get(GraphOp(node.op))

    def attr_fix(self, module: nn.Module) -> AttrFix | None:
        """The attribute fix of the nearest class in ``module``'s MRO that has one (by ``isinstance``: a
        subclass shares its base's parameters and size attributes, whatever its ``forward``)."""
        for base in type(module).__mro__:
            entry = self._entries.get(base)
            if entry is not None and entry.attr_fix is not None:
                return entry.attr_fix
        return None

    def compensation_role(self, module: nn.Module | None) -> CompensationRole:
        """``module``'s role in compensation (``NONE`` for no module, or one without an entry)."""
        entry = self.module_entry(module) if module is not None else None
        return entry.compensation if entry is not None else CompensationRole.NONE

    # -- variants ------------------------------------------------------------------------------------------
    def replace(self, key: Any, **changes: Any) -> OpTable:
        """A new table in which ``key``'s entry has ``changes`` (``rule=``, ``onnx=``, ``attr_fix=``,
        ``compensation=``); this table is unchanged. A key not in the table is a ``KeyError``."""
        if key not in self._entries:
            raise KeyError(f"{_describe(key)} has no entry to replace")
        families = []
        for fam in self.families:
            if key in fam.entries:
                entries = dict(fam.entries)
                entries[key] = dataclasses.replace(entries[key], **changes)
                fam = _family_of(fam.name, entries, fam.expansions)
            families.append(fam)
        return OpTable(families)


def _family_of(name: str, entries: Mapping[Any, OpEntry], expansions: Mapping[Any, Expansion]) -> OpFamily:
    ops = [Ops((k,), e.rule, e.attr_fix, e.onnx, e.compensation) for k, e in entries.items()]
    return OpFamily(name, ops, expansions)
