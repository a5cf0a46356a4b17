"""Stage 1: capture the model with torch.fx and annotate every node with its output shape and FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fxprune.data import META_FLOPS, META_VALUE, TensorValue
from fxprune.errors import InputError, TraceError

__all__ = [
    "Expansion",
    "as_example_tuple",
    "copy_graph_module",
    "copy_module",
    "detached_caches",
    "flop_counter",
    "fold_parametrizations",
    "is_container_call",
    "mha_slow_path",
    "shape_propagate",
    "trace",
    "traceable_children",
    "untraceable_modules",
]

log = logging.getLogger(__name__)

#: How ``trace`` replaces an opaque library call (a ``torch.fx.wrap``-ped function) by an equivalent sequence
#: of calls with op rules: ``expand(graph, node)`` inserts the calls before ``node`` and returns the node
#: that replaces it. Tables of them (``target -> expand``) live with the op families (``OpTable.expansions``,
#: e.g. ``fxprune.passes.ops_swin.EXPANSIONS``) and are passed to ``trace`` by its caller.
Expansion = Callable[[fx.Graph, fx.Node], fx.Node]

_OWN_DIR = os.path.dirname(__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)


@contextmanager
def mha_slow_path() -> Iterator[None]:
    """Switch off ``nn.MultiheadAttention``'s inference fast path while the block runs.

    Under ``no_grad`` in eval mode MHA calls one fused op (``aten::_native_multi_head_attention``) that
    ``FlopCounterMode`` counts as 0 FLOPs and the ONNX exporters cannot translate; the slow path computes
    the same function with plain ops (linear, attention), which both understand.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class _Tracer(fx.Tracer):
    """A tracer that keeps user-chosen modules opaque and remembers which module it is inside."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {t for t in leaves if isinstance(t, str)}
        self.fxprune_scope: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        """torch.fx's lowering, except that a container subclass keeps its type.

        torch.fx stores every dict as a plain dict and every list as a plain list, and a dataclass that is
        also a dict (``transformers``' ``ModelOutput``) as a plain dict: a model returning an
        ``OrderedDict`` (torchvision's segmentation models) would return a ``dict`` once traced. Such a
        container becomes a call of its class on the plain container (``OrderedDict({'out': x})``) when
        the class rebuilds one that way, else on its dataclass fields as keywords (as torch.fx does for
        other dataclasses); the op rules pin what flows into it (``ops_graph``: containers). A subclass that
        neither rebuilds is a ``TraceError``: returning it as a plain container would change the output.
        """
        cls = type(a)
        if isinstance(a, (dict, list)) and cls not in _PLAIN_CONTAINERS:
            plain: Any = dict(a) if isinstance(a, dict) else list(a)
            if _rebuilds(cls, plain):
                return self.create_node("call_function", cls, (super().create_arg(plain),), {})
            if dataclasses.is_dataclass(a):
                fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
                return self.create_node("call_function", cls, (), fields)
            raise TypeError(
                f"the model returns or passes a {cls.__module__}.{cls.__qualname__} (a {type(plain).__name__} "
                "subclass) that cannot be rebuilt from a plain one; fxprune would change its type"
            )
        return super().create_arg(a)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.fxprune_scope.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the failure first
                self.failed_in = self.fxprune_scope[-1]
            raise
        finally:
            self.fxprune_scope.pop()


_PLAIN_CONTAINERS = (
    dict,
    list,
    fx.immutable_collections.immutable_dict,
    fx.immutable_collections.immutable_list,
)


def _rebuilds(cls: Any, plain: Any) -> bool:
    """Whether ``cls(plain)`` gives a ``cls`` with the same keys (or length) as ``plain``."""
    probe = dict.fromkeys(plain) if isinstance(plain, dict) else [None] * len(plain)
    try:
        got = cls(probe)
    except Exception:
        return False
    return type(got) is cls and list(got) == list(probe)


def is_container_call(node: fx.Node) -> bool:
    """Whether ``node`` builds a container instead of computing a value: a dict/list subclass or a
    dataclass (``_Tracer.create_arg``), or a namedtuple nested in another container (torch.fx's own
    lowering)."""
    t = node.target
    return (
        node.op == "call_function"
        and isinstance(t, type)
        and (
            issubclass(t, (dict, list))
            or (issubclass(t, tuple) and hasattr(t, "_fields"))
            or dataclasses.is_dataclass(t)
        )
    )


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: where the user's code made tracing fail."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((_TORCH_DIR, _OWN_DIR))
    ]
    if not frames:
        return "<inside torch>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def as_example_tuple(example_input: Any) -> tuple[torch.Tensor, ...]:
    """Normalise ``example_input`` (a tensor or a tuple/list of tensors) into a tuple, checking types."""
    items = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(items, (tuple, list)) or not items:
        raise InputError(
            f"example_input must be a tensor or a non-empty tuple of tensors, got {type(example_input).__name__}; "
            "pass e.g. torch.randn(1, 3, 224, 224)"
        )
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"example_input[{i}] is a {type(t).__name__}, not a tensor; fxprune traces tensor inputs only "
                "(bind other arguments with concrete_args=)"
            )
    return tuple(items)


_ATOMIC = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size, torch.memory_format)
_STATE_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__", "__copy__")


def _plain_module(cls: type) -> bool:
    """``cls`` copies like ``nn.Module`` (``copy.deepcopy`` reconstructs it from its ``__dict__``)."""
    return all(getattr(cls, a, None) is getattr(nn.Module, a, None) for a in _STATE_HOOKS)


def copy_module(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, faster for trees of plain modules.

    The same result: every module whose class copies like ``nn.Module`` (no ``__deepcopy__``,
    ``__reduce__``/``__reduce_ex__`` or ``__getstate__``/``__setstate__`` of its own) is rebuilt from a copy
    of its ``__dict__``; tensors, and every attribute value that is not an immutable scalar, go through
    ``copy.deepcopy`` with the shared ``memo``, so tensors are cloned, shared modules and tied tensors stay
    shared, and any other module is deep-copied as it defines. It skips the generic
    ``__reduce_ex__``/``copyreg`` round trip per module and per empty hook dict, which is most of
    ``copy.deepcopy``'s time on a model of many small modules (about half on torchvision's MobileNetV2).
    """
    memo = {} if memo is None else memo
    seen = memo.get(id(model))
    if seen is not None:
        return seen  # type: ignore[no-any-return]
    cls = type(model)
    if not _plain_module(cls):
        return copy.deepcopy(model, memo)  # type: ignore[no-any-return]
    new = cls.__new__(cls)
    memo[id(model)] = new
    state = {}
    for k, v in model.__dict__.items():
        if k == "_compiled_call_impl":  # nn.Module.__getstate__ drops it
            continue
        t = type(v)
        if k == "_modules":
            state[k] = t((n, None if c is None else copy_module(c, memo)) for n, c in v.items())
        elif t in _ATOMIC or (t is tuple and all(type(x) in _ATOMIC for x in v)):
            state[k] = v
        elif t in (dict, OrderedDict, set) and not v:
            state[k] = t()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new


def detached_caches(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that copies every non-leaf tensor held by ``model``'s modules detached.

    A forward run with autograd on can leave tensors that are outputs of autograd ops in module attributes
    (caches such as timm EfficientFormer's ``attention_bias_cache``, a dict of them); ``copy.deepcopy``
    refuses those ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol"). Their values are what the copy needs, not their autograd history: each is mapped to
    ``t.detach().clone()`` (parameters and buffers are leaves and are copied as usual). Pass the result
    as ``memo`` to ``copy_module``/``copy.deepcopy``; nothing of ``model`` is changed.
    """
    memo: dict[int, Any] = {}

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if not v.is_leaf and id(v) not in memo:
                memo[id(v)] = v.detach().clone()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple, set, frozenset)):
            for x in v:
                walk(x)

    for m in model.modules():
        for k, v in m.__dict__.items():
            if k != "_modules":
                walk(v)
    return memo


def copy_graph_module(gm: fx.GraphModule, memo: dict[int, Any] | None = None) -> fx.GraphModule:
    """``copy.deepcopy(gm)``, its submodules copied by ``copy_module`` first (``GraphModule.__deepcopy__``
    then finds them in the memo: the same copy, faster)."""
    memo = {} if memo is None else memo
    for child in gm.children():
        copy_module(child, memo)
    return copy.deepcopy(gm, memo)  # type: ignore[no-any-return]


def fold_parametrizations(model: torch.nn.Module) -> list[str]:
    """Replace every parametrized tensor of ``model`` (in place) by a plain one holding its current value.

    ``torch.nn.utils.parametrize`` (and ``parametrizations.weight_norm``/``spectral_norm``/``orthogonal``)
    computes a weight from other parameters on every access, so it cannot be sliced; its value can.
    Returns the qualified names folded. Call it on a copy: it mutates ``model``.
    """
    from torch.nn.utils import parametrize

    folded = []
    for mname, m in list(model.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        plist = m.parametrizations  # type: ignore[union-attr]
        values = {}
        for tname in list(plist.keys()):
            with torch.no_grad():
                p = plist[tname]
                original = p.original if hasattr(p, "original") else p.original0  # weight_norm: original0/1
                values[tname] = (getattr(m, tname).detach().clone(), isinstance(original, nn.Parameter))
            folded.append(f"'{mname}.{tname}'" if mname else f"'{tname}'")
        # Not parametrize.remove_parametrizations: it deletes the property from the Parametrized* class,
        # which a deep copy shares with the original module (the user's model would lose its weight).
        del m._modules["parametrizations"]
        m.__class__ = type(m).__bases__[0]
        for tname, (value, is_param) in values.items():
            if is_param:
                m.register_parameter(tname, nn.Parameter(value))
            else:
                m.register_buffer(tname, value)
    return folded


def trace(
    model: torch.nn.Module,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    expansions: Mapping[Any, Expansion] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model``; never mutates it.

    ``expansions`` (``target -> Expansion``) replaces each call of a target in it by the finer calls its
    expansion inserts (the trace stage passes its op table's ``expansions``, e.g. ``ops_swin.EXPANSIONS``,
    which decomposes torchvision's shifted window attention); without it (the default) no call is replaced.

    Raises:
        TraceError: naming the call that broke tracing and the module being traced, with the fix.
    """
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types here; all mean "not capturable"
        inside = tracer.failed_in or ""
        where = (
            f"module '{inside}' ({type(model.get_submodule(inside)).__name__})"
            if inside
            else "the top-level forward"
        )
        hint = (
            f"pass leaf_modules=['{inside}'] to keep it opaque (its channels are then pinned)"
            if inside
            else "bind the offending argument with concrete_args={...}"
        )
        raise TraceError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\n  at {_user_frame(exc)}\n"
            f"  fix: {hint}, or make the control flow independent of tensor values"
        ) from exc
    _expand(graph, expansions or {})
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def untraceable_modules(
    model: torch.nn.Module,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    limit: int = 64,
) -> tuple[list[tuple[str, str, str]], str | None]:
    """Every module symbolic tracing stops inside, found at once: ``model`` is traced again with each
    module found kept opaque (the innermost module being traced when it failed), until tracing succeeds or
    fails in the top-level forward, which no ``leaf_modules`` can fix.

    Returns ``(qualified name, type name, why)`` per module, in the order found, and the top-level failure
    (None when tracing succeeds with the modules found kept opaque). Never mutates ``model``.
    """
    leaves = list(leaf_modules)
    found: list[tuple[str, str, str]] = []
    for _ in range(limit):
        tracer = _Tracer(leaves)
        try:
            tracer.trace(model, concrete_args=concrete_args)
            return found, None
        except Exception as exc:  # as in ``trace``: every type means "not capturable"
            inside = tracer.failed_in or ""
            first = (str(exc).strip().splitlines() or [""])[0]
            why = f"{type(exc).__name__}: {first} at {_user_frame(exc)}"
            if not inside or inside in leaves:
                return found, why
            found.append((inside, type(model.get_submodule(inside)).__name__, why))
            leaves.append(inside)
    return found, f"more than {limit} modules cannot be traced"


def traceable_children(model: torch.nn.Module) -> list[tuple[str, str, float]]:
    """The direct children of ``model`` holding at least 1% of its parameters that symbolic tracing
    captures alone: ``(name, type name, their share of the model's parameters)``, largest first. Never
    mutates ``model``."""
    total = sum(p.numel() for p in model.parameters()) or 1
    out = []
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n < 0.01 * total:
            continue
        try:
            _Tracer().trace(child)
        except Exception:  # as in ``trace``: every type means "not capturable"
            continue
        out.append((name, type(child).__name__, n / total))
    return sorted(out, key=lambda t: -t[2])


def _expand(graph: fx.Graph, expansions: Mapping[Any, Expansion]) -> None:
    """Replace every call of a target in ``expansions`` (same values, finer nodes for the rules)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in expansions:
            new = expansions[node.target](graph, node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorValue(tuple(int(s) for s in value.shape), str(value.dtype).removeprefix("torch."))
    if isinstance(value, (tuple, list)):
        return tuple(_describe(v) for v in value)
    return None


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP goes to ``"Global"`` only.

    The tracker hooks every module call to attribute FLOPs to each enclosing module as well, which fxprune
    never reads (it reads the total, ``get_total_flops``, i.e. the ``"Global"`` entry); without the hooks
    the counter's own dispatch, formulas and totals are unchanged and a counted run is 5-20% faster.
    """

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """torch's own attention formula (``sdpa_flop_count``: ``q k^T`` and ``attn v``, grouped-query heads
    broadcast), for the fused CPU kernel that torch's counter has no formula for (it counts it as 0 while
    counting the GPU kernels): attention then costs the same on every device. Operands of other ranks than
    4 are read as ``[batch, heads, length, dim]`` with the missing leading dims 1 (more dims: the leading
    ones multiplied into the batch)."""

    def four(shape: Any) -> tuple[int, ...]:
        s = tuple(int(v) for v in shape)
        return (1,) * (4 - len(s)) + s if len(s) <= 4 else (math.prod(s[:-3]), *s[-3:])

    return int(sdpa_flop_count(four(query_shape), four(key_shape), four(value_shape)))


_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
#: formulas ``flop_counter`` adds to torch's (``FlopCounterMode(custom_mapping=)``)
EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = (
    {_CPU_SDPA: _sdpa_cpu_flops} if _CPU_SDPA is not None else {}
)


def flop_counter(per_module: bool = False) -> FlopCounterMode:
    """``FlopCounterMode(display=False)`` with ``EXTRA_FLOP_FORMULAS``, counting only the total
    (``_GlobalOnly``; the same totals) unless ``per_module`` (``get_flop_counts()`` by module then)."""
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    if not per_module and hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    return counter


class _ShapeFlopProp(fx.Interpreter):
    """Runs the graph once under one ``FlopCounterMode``; a node's FLOPs are the counter's increase
    while it ran (the same integers as a counter per node, without entering and leaving one per node)."""

    def __init__(self, gm: fx.GraphModule, count_flops: bool) -> None:
        super().__init__(gm)
        self.counter = flop_counter() if count_flops else None
        self.counted = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.counter is None:
            return super().run(*args, **kwargs)
        with self.counter:
            return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
            if self.counter is not None:
                total = int(self.counter.get_total_flops())
                computes = n.op in ("call_module", "call_function", "call_method")
                n.meta[META_FLOPS] = total - self.counted if computes else 0
                self.counted = total
            else:
                n.meta[META_FLOPS] = 0
        except Exception as exc:
            raise TraceError(
                f"the traced graph fails at node {n.format_node()}: {type(exc).__name__}: {exc}\n"
                "  fix: the model likely specialises on a traced value; keep that module opaque with "
                "leaf_modules=[...] or pass concrete_args="
            ) from exc
        n.meta[META_VALUE] = _describe(out)
        return out


@torch.no_grad()
def shape_propagate(gm: fx.GraphModule, example: tuple[torch.Tensor, ...], count_flops: bool = True) -> Any:
    """Run ``gm`` on ``example``, writing ``META_VALUE`` and ``META_FLOPS`` into every node; returns the output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [p for p in placeholders if not p.args]  # concrete_args leave placeholders with defaults
    if not len(required) <= len(example) <= len(placeholders):
        names = ", ".join(p.name for p in placeholders)
        raise InputError(
            f"example_input has {len(example)} tensor(s) but the model's forward takes {len(required)} "
            f"({names}); pass one tensor per forward argument"
        )
    with mha_slow_path():
        return _ShapeFlopProp(gm, count_flops).run(*example)
