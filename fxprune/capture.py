"""The second capture path: ``torch.export`` for models that symbolic tracing rejects.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies, so Python control flow on a traced value
(``if x.shape[-1] != 32:``), iteration over a proxy, or a library call it cannot see through stops it.
``torch.export`` (non-strict: the model's Python runs as written, on fake tensors of the example's shapes)
captures the same model as a graph of ATen ops with every shape specialised to the example's.

``export_capture`` turns that graph into the vocabulary the op rules, the rewrite and the ONNX writer
understand, the one symbolic tracing produces:

1. **Leaf modules back as modules.** Every op of the export graph records the modules it ran inside
   (``nn_module_stack``). Where symbolic tracing would have kept a module whole (a ``torch.nn`` module that
   is not a container, as ``torch.fx.Tracer.is_leaf_module`` decides, or one the user names in
   ``leaf_modules``), the ops of each of its calls are collapsed into one ``call_module`` of a copy of the
   user's module, when the call has one tensor input, one output, and reads only that module's own
   parameters. An ``nn.Conv2d`` is then an ``nn.Conv2d`` again, with its attribute fixes, compensation
   role, ONNX translation and latency table. A call that does not fit stays as ops (step 2).
2. **ATen ops as torch functions.** ``aten.add.Tensor`` becomes ``torch.add``, ``aten.batch_norm`` becomes
   ``F.batch_norm`` with its arguments reordered, ``aten.slice.Tensor`` an indexing ``getitem``, and so on
   (``_ATEN``). An in-place op (``aten.add_``) becomes the tensor method of its name (``x.add_(y)``, the same
   mutation, which every alias of ``x`` sees) or, without one (``aten.hardswish_``), its out-of-place form
   when no other tensor can see the mutation (``_sole_owner``). An op with no translation stays as it is: the dependency pass has no rule for it and pins
   the channels it touches, with its name in the reason, so the model is never wrong.
3. **The output structure as symbolic tracing records it.** The export graph returns a flat tuple and
   rebuilds the user's structure with a pytree spec in generated code; the canonical graph returns the
   structure itself (dicts, lists, tuples; an ``OrderedDict`` or other container subclass as a call of its
   class, the convention of ``fxprune.trace``), so the output checks read it as they read a traced one.
4. **Constants folded.** What depends on neither an input nor a tensor of the model (an attention mask built
   from the example's shapes by in-place fills of a zero tensor, as torchvision's Swin does) is computed
   once and read as a buffer: the ONNX exporters mistranslate such in-place fills, and the rules have
   nothing to do there. Each is folded to its value when first read by an op that depends on the input,
   and only when every such read sees the same values (no mutation in between).

The canonical graph is run on the example and compared with the model's own output (``_check_same``); a
difference is a ``TraceError``, never a silently different model. Shapes are specialised: the captured
model takes inputs of the example's shapes only, as every reshape literal in it says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxprune.errors import TraceError
from fxprune.trace import copy_module

__all__ = ["CAPTURES", "EXPORT", "SYMBOLIC", "export_capture"]

#: ``CompileResult.capture`` of a model captured by ``torch.fx`` symbolic tracing
SYMBOLIC = "symbolic_trace"
#: ``CompileResult.capture`` of a model captured by ``torch.export`` (``export_capture``)
EXPORT = "torch.export"
#: the values of ``compile(capture=)``: torch.fx first and torch.export when it fails, or one of them only
CAPTURES = ("auto", "fx", "export")

aten = torch.ops.aten

# (op, target, args, kwargs) of the canonical node replacing an aten call
Call = tuple[str, Any, tuple[Any, ...], dict[str, Any]]
Translate = Callable[[tuple[Any, ...], dict[str, Any]], Call | None]


def _fn(target: Any, arity: int | None = None) -> Translate:
    """The aten op takes the same positional arguments (the first ``arity`` of them) as ``target``."""

    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return "call_function", target, tuple(args if arity is None else args[:arity]), dict(kwargs)

    return translate


def _method(name: str) -> Translate:
    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return "call_method", name, tuple(args), dict(kwargs)

    return translate


def _keywords(target: Any, names: Sequence[str], drop: Sequence[str] = ()) -> Translate:
    """The aten op's positional arguments are ``names``; ``target`` takes them as keywords after the first
    (those in ``drop`` are not passed on)."""

    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        first = bound.pop(names[0])
        return "call_function", target, (first,), {k: v for k, v in bound.items() if k not in drop}

    return translate


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    a = {**dict(zip(names, args, strict=False)), **kwargs}
    return (
        "call_function",
        F.batch_norm,
        (a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"], a["training"]),
        {"momentum": a["momentum"], "eps": a["eps"]},
    )


def _norm(target: Any, n: int) -> Translate:
    """``aten.layer_norm``/``group_norm``: the first ``n`` arguments as ``target`` takes them (the trailing
    ``cudnn_enable`` dropped)."""

    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        kwargs = {k: v for k, v in kwargs.items() if k != "cudnn_enable"}
        return "call_function", target, tuple(args[:n]), kwargs

    return translate


def _upsample(mode: str, align: bool) -> Translate:
    """``aten.upsample_<mode>.vec(input, output_size, [align_corners,] scale_factors)`` -> ``F.interpolate``."""

    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        names = ("input", "output_size", "align_corners", "scale_factors") if align else (
            "input", "output_size", "scale_factors")  # fmt: skip
        a = {**dict(zip(names, args, strict=False)), **kwargs}
        kw: dict[str, Any] = {"mode": mode}
        if a.get("output_size") is not None:
            kw["size"] = list(a["output_size"])
        else:
            kw["scale_factor"] = list(a["scale_factors"])
        if align:
            kw["align_corners"] = a.get("align_corners")
        return "call_function", F.interpolate, (a["input"],), kw

    return translate


_BIG = 2**62


def _slice(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
    a = {**dict(zip(("input", "dim", "start", "end", "step"), args, strict=False)), **kwargs}
    dim, start, end, step = a.get("dim", 0), a.get("start"), a.get("end"), a.get("step", 1)
    if not isinstance(dim, int) or dim < 0:
        return None
    start = None if start in (0, None) else start
    end = None if end is None or (isinstance(end, int) and end >= _BIG) else end
    step = None if step == 1 else step
    index = (slice(None),) * dim + (slice(start, end, step),)
    return "call_function", operator.getitem, (a["input"], index), {}


def _select(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
    x, dim, i = args[0], args[1], args[2]
    if not isinstance(dim, int) or dim < 0:
        return None
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (i,)), {}


def _dropout(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    a = {**dict(zip(("input", "p", "train"), args, strict=False)), **kwargs}
    return "call_function", F.dropout, (a["input"],), {"p": a["p"], "training": a["train"]}


def _pad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    a = {**dict(zip(("input", "pad", "mode", "value"), args, strict=False)), **kwargs}
    kw = {"mode": a.get("mode", "constant")}
    if a.get("value") is not None:
        kw["value"] = a["value"]
    return "call_function", F.pad, (a["input"], list(a["pad"])), kw


def _constant_pad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    a = {**dict(zip(("input", "pad", "value"), args, strict=False)), **kwargs}
    return "call_function", F.pad, (a["input"], list(a["pad"])), {"value": a.get("value", 0)}


def _to(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
    """``aten.to.<overload>`` -> ``x.to(...)``; its ``dtype_layout`` overload's strided layout and unpinned
    memory are what ``Tensor.to`` always gives (other layouts are not translated)."""
    if kwargs.get("layout") not in (None, torch.strided) or kwargs.get("pin_memory"):
        return None
    kwargs = {k: v for k, v in kwargs.items() if k not in ("layout", "pin_memory")}
    return "call_method", "to", tuple(args), kwargs


def _reduce(target: Any) -> Translate:
    """``aten.<r>.dim(input, dim, keepdim=False, *, dtype=None)`` -> ``torch.<r>(input, dim, keepdim)``."""

    def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        kwargs = {k: v for k, v in kwargs.items() if not (k == "dtype" and v is None)}
        return "call_function", target, tuple(args), kwargs

    return translate


#: aten op packet -> its translation into the vocabulary of the op rules (see the module docstring)
_ATEN: dict[Any, Translate] = {
    aten.conv1d: _fn(torch.conv1d),
    aten.conv2d: _fn(torch.conv2d),
    aten.conv3d: _fn(torch.conv3d),
    aten.conv_transpose1d: _fn(torch.conv_transpose1d),
    aten.conv_transpose2d: _fn(torch.conv_transpose2d),
    aten.conv_transpose3d: _fn(torch.conv_transpose3d),
    aten.linear: _fn(F.linear),
    aten.addmm: _fn(torch.addmm),
    aten.batch_norm: _batch_norm,
    aten.layer_norm: _norm(F.layer_norm, 5),
    aten.group_norm: _norm(F.group_norm, 5),
    aten.relu: _fn(torch.relu),
    aten.sigmoid: _fn(torch.sigmoid),
    aten.tanh: _fn(torch.tanh),
    aten.hardswish: _fn(F.hardswish),
    aten.hardsigmoid: _fn(F.hardsigmoid),
    aten.silu: _fn(F.silu),
    aten.mish: _fn(F.mish),
    aten.gelu: _fn(F.gelu),
    aten.hardtanh: _fn(F.hardtanh),
    aten.leaky_relu: _fn(F.leaky_relu),
    aten.softplus: _fn(F.softplus),
    aten.exp: _fn(torch.exp),
    aten.sqrt: _fn(torch.sqrt),
    aten.rsqrt: _fn(torch.rsqrt),
    aten.abs: _fn(torch.abs),
    aten.neg: _fn(torch.neg),
    aten.erf: _fn(torch.erf),
    aten.pow: _fn(torch.pow),
    aten.add: _fn(torch.add),
    aten.sub: _fn(torch.sub),
    aten.mul: _fn(torch.mul),
    aten.div: _fn(torch.div),
    aten.maximum: _fn(torch.maximum),
    aten.minimum: _fn(torch.minimum),
    aten.clamp: _fn(torch.clamp),
    aten.where: _fn(torch.where),
    aten.mean: _reduce(torch.mean),
    aten.sum: _reduce(torch.sum),
    aten.amax: _fn(torch.amax),
    aten.amin: _fn(torch.amin),
    aten.std: _fn(torch.std),  # arguments after dim by name (_BY_NAME): torch.std's overloads differ there
    aten.var: _fn(torch.var),
    aten.softmax: _fn(torch.softmax, 2),
    aten.log_softmax: _fn(torch.log_softmax, 2),
    aten.cat: _fn(torch.cat),
    aten.flatten: _fn(torch.flatten),
    aten.view: _method("view"),
    aten.reshape: _fn(torch.reshape),
    aten.permute: _fn(torch.permute),
    aten.transpose: _fn(torch.transpose),
    aten.unsqueeze: _fn(torch.unsqueeze),
    aten.squeeze: _fn(torch.squeeze),
    aten.split: _fn(torch.split),
    aten.split_with_sizes: _fn(torch.split),
    aten.chunk: _fn(torch.chunk),
    aten.unbind: _fn(torch.unbind),
    aten.unflatten: _fn(torch.unflatten),
    aten.expand: _method("expand"),
    aten.clone: _method("clone"),
    # a fresh copy of a constant of the program on every call: a copy, so that mutating it never changes
    # the stored constant (folded when nothing depends on the input)
    aten.lift_fresh_copy: _method("clone"),
    aten.to: _to,
    aten.contiguous: _method("contiguous"),
    aten.roll: _fn(torch.roll),
    aten.matmul: _fn(torch.matmul),
    aten.bmm: _fn(torch.bmm),
    aten.adaptive_avg_pool1d: _fn(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool3d: _fn(F.adaptive_avg_pool3d),
    aten.max_pool1d: _fn(F.max_pool1d),
    aten.max_pool2d: _fn(F.max_pool2d),
    aten.max_pool3d: _fn(F.max_pool3d),
    aten.avg_pool1d: _fn(F.avg_pool1d),
    aten.avg_pool2d: _fn(F.avg_pool2d),
    aten.avg_pool3d: _fn(F.avg_pool3d),
    aten.scaled_dot_product_attention: _fn(F.scaled_dot_product_attention),
    aten.dropout: _dropout,
    aten.pad: _pad,
    aten.constant_pad_nd: _constant_pad,
    aten.slice: _slice,
    aten.select: _select,
    aten.upsample_nearest1d: _upsample("nearest", False),
    aten.upsample_nearest2d: _upsample("nearest", False),
    aten.upsample_nearest3d: _upsample("nearest", False),
    aten._upsample_nearest_exact1d: _upsample("nearest-exact", False),
    aten._upsample_nearest_exact2d: _upsample("nearest-exact", False),
    aten._upsample_nearest_exact3d: _upsample("nearest-exact", False),
    aten.upsample_linear1d: _upsample("linear", True),
    aten.upsample_bilinear2d: _upsample("bilinear", True),
    aten.upsample_trilinear3d: _upsample("trilinear", True),
    aten.upsample_bicubic2d: _upsample("bicubic", True),
}

#: ops whose arguments after the first n are passed by name (the torch function's positional order differs
#: between overloads: ``torch.std(x, dim, unbiased, keepdim)`` and ``torch.std(x, dim, *, correction, ...)``)
_BY_NAME = {aten.std: 2, aten.var: 2}

#: ops that only check (shape guards, asserts) and compute nothing: dropped
_CHECKS = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size}
#: ops that return their input: their uses read the input
_IDENTITY = {aten.alias, aten.detach}


def _packet(target: Any) -> Any:
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else None


_NOISY = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


def _export(model: nn.Module, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """``torch.export.export(model, example, strict=False).module()``, a ``TraceError`` on failure."""
    quiet = [logging.getLogger(n) for n in _NOISY]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:  # a failed export logs the graph it got so far; the TraceError says what failed
            q.setLevel(logging.CRITICAL)
        # a failed export also prints the partial graph to stderr
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model, example, strict=False)
    except Exception as exc:  # export raises many types; all mean "not capturable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(f"torch.export could not capture the model: {type(exc).__name__}: {first}") from exc
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return program.module()  # type: ignore[return-value]


def _is_leaf(m: nn.Module, name: str, leaves: tuple[type, ...], names: set[str]) -> bool:
    if name in names or isinstance(m, leaves):
        return True
    return fx.Tracer().is_leaf_module(m, name)


def _single_input(m: nn.Module) -> bool:
    """``m.forward`` takes exactly one required argument."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 1 and not any(p.kind is p.VAR_POSITIONAL for p in params)


def _call_as(m: nn.Module, x: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any], bool] | None:
    """How a call of leaf ``m`` whose ops read one tensor ``x`` (and ``m``'s own tensors) and give one
    result is written as a module call: (args, kwargs, whether the result is item 0 of what ``m`` returns),
    or None when that is not known. An ``nn.MultiheadAttention`` reading one tensor is self-attention
    without masks (a mask would be a second input); its attention weights are not read (a second output)."""
    if isinstance(m, nn.MultiheadAttention):
        return (x, x, x), {"need_weights": False}, True
    return ((x,), {}, False) if _single_input(m) else None


def _calls(graph: fx.Graph) -> dict[tuple[str, str], list[fx.Node]]:
    """(stack key, module path) -> the nodes computed inside that module call, in graph order."""
    out: dict[tuple[str, str], list[fx.Node]] = {}
    for node in graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            out.setdefault((key, path), []).append(node)
    return out


def _collapse_leaves(gm: fx.GraphModule, model: nn.Module, leaf_modules: Iterable[type | str]) -> None:
    """Step 1 of the module docstring, in place on ``gm``."""
    leaves = list(leaf_modules)
    leaf_types = tuple(t for t in leaves if isinstance(t, type))
    leaf_names = {t for t in leaves if isinstance(t, str)}
    owned = dict(model.named_modules())
    graph = gm.graph
    collapsed: set[str] = set()
    gone: set[fx.Node] = set()
    memo: dict[int, Any] = {}
    for (_, path), nodes in _calls(graph).items():
        m = owned.get(path)
        if not path or m is None or not _is_leaf(m, path, leaf_types, leaf_names):
            continue
        if any(n in gone or n.op != "call_function" for n in nodes):
            continue  # a node already erased by an enclosing leaf, or not an op
        inside = set(nodes)
        prefix = path + "."
        inputs: list[fx.Node] = []
        ok = True
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                if a.op == "get_attr" and str(a.target).startswith(prefix):
                    continue
                if a.op == "get_attr":
                    ok = False  # reads another module's tensor: not this module's own computation
                if a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        call_as = _call_as(m, inputs[0]) if ok and len(inputs) == 1 and len(outputs) == 1 else None
        if call_as is None:
            continue
        if path not in collapsed:
            _put(gm, path, copy_module(m, memo))
            collapsed.add(path)
        args, kwargs, first = call_as
        with graph.inserting_before(outputs[0]):
            call = graph.call_module(path, args, kwargs)
            out = graph.call_function(operator.getitem, (call, 0)) if first else call
        out.meta.update(outputs[0].meta)
        outputs[0].replace_all_uses_with(out)
        for n in reversed(nodes):
            graph.erase_node(n)
            gone.add(n)
    for node in list(graph.nodes):  # parameters now read by the modules themselves
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """``root.set_submodule(path, module)``, creating empty parents the export graph did not need."""
    *parents, leaf = path.split(".")
    at = root
    for name in parents:
        child = at._modules.get(name)
        if child is None:
            child = nn.Module()
            at.add_module(name, child)
        at = child
    at.add_module(leaf, module)


#: ops whose output may share memory with their input
_VIEWS = {
    aten.view, aten.reshape, aten.flatten, aten.slice, aten.select, aten.transpose, aten.permute, aten.expand,
    aten.unsqueeze, aten.squeeze, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.alias,
    aten.detach, aten.t, aten.as_strided, aten.unflatten, aten.narrow, aten.diagonal, aten.movedim,
}  # fmt: skip


#: modules whose output is a new tensor (never their input, nor a view of it)
_FRESH = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _sole_owner(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An in-place ``node`` mutates a tensor nothing else can see: a new tensor (not a view of another one,
    nor an input of the model) with no other reader (torch.export routes every later use of the mutated
    tensor itself through ``node``; a view taken before the mutation would still read the old node)."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return False
    if x.op == "call_module":
        return isinstance(modules.get(str(x.target)), _FRESH)
    return x.op == "call_function" and x.target is not operator.getitem and _packet(x.target) not in _VIEWS


def _translate(gm: fx.GraphModule) -> None:
    """Step 2 of the module docstring, in place on ``gm``."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        packet = _packet(node.target) if node.op == "call_function" else None
        if packet is None:
            continue
        if packet in _CHECKS and not node.users:
            graph.erase_node(node)
            continue
        if packet in _IDENTITY:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
            continue
        schema = node.target._schema  # type: ignore[union-attr]
        name = packet.__name__
        if schema.is_mutable and name.endswith("_") and not name.startswith("_"):
            if hasattr(torch.Tensor, name):  # the tensor method: the same mutation, seen by every alias
                with graph.inserting_before(node):
                    new = graph.call_method(name, tuple(node.args), dict(node.kwargs))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                continue
            base = getattr(aten, name[:-1], None)
            if base is None or base not in _ATEN or not _sole_owner(node, modules):
                continue  # another tensor may see the mutation: left as is (no rule: pinned)
            packet = base
        translate = _ATEN.get(packet)
        args, kwargs = tuple(node.args), dict(node.kwargs)
        if packet in _BY_NAME:
            names = [a.name for a in schema.arguments]
            keep = _BY_NAME[packet]
            kwargs.update(zip(names[keep:], args[keep:], strict=False))
            args = args[:keep]
        call = translate(args, kwargs) if translate is not None else None
        if call is None:
            continue
        op, target, args, kwargs = call
        with graph.inserting_before(node):
            new = graph.create_node(op, target, args, kwargs, name=node.name + "_c")
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _children(spec: Any) -> list[Any]:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def _rebuild(graph: fx.Graph, spec: Any, leaves: list[Any]) -> Any:
    """The output structure ``spec`` over the flat ``leaves`` (consumed from the front), as graph args."""
    if spec.is_leaf():
        return leaves.pop(0)
    kids = [_rebuild(graph, c, leaves) for c in _children(spec)]
    cls = spec.type
    if cls is getattr(pytree, "namedtuple", None) and isinstance(spec.context, type):
        cls = spec.context  # pytree files every namedtuple under one type, the class in its context
    if cls is tuple or cls is list:
        return cls(kids)
    if cls is dict:
        return dict(zip(spec.context, kids, strict=True))
    if isinstance(cls, type) and issubclass(cls, dict):
        return graph.call_function(cls, (dict(zip(spec.context, kids, strict=True)),))
    if isinstance(cls, type) and issubclass(cls, list):
        return graph.call_function(cls, (list(kids),))
    if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return graph.call_function(cls, tuple(kids))
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        names = spec.context[0] if isinstance(spec.context, (list, tuple)) and spec.context else spec.context
        return graph.call_function(cls, (), dict(zip(names, kids, strict=False)))
    raise TraceError(
        f"torch.export capture: the model returns a {getattr(cls, '__qualname__', cls)}, which fxprune cannot "
        "rebuild in a graph; return a tuple, list or dict"
    )


def _plain_io(gm: fx.GraphModule) -> None:
    """Step 3 of the module docstring: positional placeholders, the output structure in the graph."""
    info = gm.graph._codegen.pytree_info  # type: ignore[attr-defined]
    out_spec = info.out_spec
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
    with graph.inserting_before(output):
        structure = _rebuild(graph, out_spec, flat) if out_spec is not None else flat
    output.args = (structure,)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            delattr(gm, attr)


#: ops that read only the shape, dtype and device of their tensor arguments (all fixed by the example)
_SHAPE_ONLY = {
    aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.zeros_like, aten.ones_like,
    aten.full_like, aten.empty_like,
}  # fmt: skip


class _Record(fx.Interpreter):
    """Runs the graph, keeping a copy of each watched node's value as the ``readers`` first read it, and
    which watched values a later reader saw changed (mutated in place in between)."""

    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node], readers: set[fx.Node]) -> None:
        super().__init__(gm)
        self.watch, self.readers = watch, readers
        self.seen: dict[fx.Node, Any] = {}
        self.changed: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        if n in self.readers:
            for a in n.all_input_nodes:
                if a not in self.watch:
                    continue
                value = self.env[a]
                now = value.detach().clone() if isinstance(value, torch.Tensor) else value
                if a not in self.seen:
                    self.seen[a] = now
                elif not (isinstance(now, torch.Tensor) and torch.equal(self.seen[a], now)):
                    self.changed.add(a)
        return super().run_node(n)


def _mutates(node: fx.Node) -> bool:
    """``node`` writes into one of its arguments (an in-place tensor method, or an ATen op whose schema
    mutates)."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _fold_constants(gm: fx.GraphModule, model: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    """Step 4 of the module docstring, in place on ``gm``: compute what depends on neither an input nor a
    tensor of the model once, as a buffer of ``gm``; nothing when the input-dependent part writes into one
    of those values (a buffer would then keep what one call wrote for the next)."""
    graph = gm.graph
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    live: set[fx.Node] = set()
    for n in graph.nodes:
        source = n.op in ("placeholder", "call_module", "output") or (n.op == "get_attr" and n.target in own)
        reads = _packet(n.target) not in _SHAPE_ONLY and any(a in live for a in n.all_input_nodes)
        if source or reads:
            live.add(n)
    const = [n for n in graph.nodes if n not in live and n.op in ("call_function", "call_method")]
    frontier = [n for n in const if any(u in live for u in n.users)]
    if not frontier or any(_mutates(u) for n in frontier for u in n.users):
        return  # a value the input-dependent part writes into stays computed on every call
    record = _Record(gm, set(frontier), live)
    with torch.no_grad():
        record.run(*example)
    # each value as every reader that depends on the input sees it (else: nothing folded)
    if record.changed or any(not isinstance(record.seen.get(n), torch.Tensor) for n in frontier):
        return
    for i, n in enumerate(frontier):
        name = f"_fxprune_constant_{i}"
        gm.register_buffer(name, record.seen[n])
        with graph.inserting_before(n):
            got = graph.get_attr(name)
        got.meta.update(n.meta)
        for u in [u for u in n.users if u in live]:
            u.replace_input_with(n, got)
    for n in reversed(const):
        graph.erase_node(n)
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)


def _check_same(gm: fx.GraphModule, model: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        want = model(*example)
        try:
            gm(*example)  # twice: a graph that keeps state between calls (a written constant) differs
            got = gm(*example)
        except Exception as exc:  # a translation the example rejects: never a crash of another type
            raise TraceError(
                f"torch.export capture: the canonical graph fails on the example: {type(exc).__name__}: "
                f"{(str(exc).strip().splitlines() or [''])[0]}"
            ) from exc
    w_leaves, w_spec = pytree.tree_flatten(want)
    g_leaves, g_spec = pytree.tree_flatten(got)
    if w_spec != g_spec or len(w_leaves) != len(g_leaves):
        raise TraceError(f"torch.export capture changed the output structure: {w_spec} became {g_spec}")
    for i, (a, b) in enumerate(zip(w_leaves, g_leaves, strict=True)):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            raise TraceError(
                f"torch.export capture changed output {i}: {a.shape} became {getattr(b, 'shape', b)}"
            )
        if a.is_floating_point():
            scale = float(a.abs().max()) if a.numel() else 0.0
            err = float((a - b).abs().max()) if a.numel() else 0.0
            if err > 1e-5 * max(scale, 1.0):
                raise TraceError(
                    f"torch.export capture computes a different output {i} (max |diff| {err:.3g} at scale "
                    f"{scale:.3g}); the captured graph is not used"
                )
        elif not torch.equal(a, b):
            raise TraceError(f"torch.export capture computes a different output {i}")


def export_capture(
    model: nn.Module, example: tuple[torch.Tensor, ...], leaf_modules: Sequence[type | str] = ()
) -> fx.GraphModule:
    """Capture ``model`` on ``example`` with ``torch.export`` (non-strict) in the vocabulary of the op
    rules (see the module docstring); never mutates ``model``.

    Raises:
        TraceError: torch.export fails, the output structure cannot be rebuilt in a graph, or the captured
            graph does not compute the model's output on ``example``.
    """
    gm = _export(model, example)
    for node in list(gm.graph.nodes):  # the input guards of the exported program: shapes are the example's
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    _collapse_leaves(gm, model, leaf_modules)
    _translate(gm)
    _plain_io(gm)
    gm.graph.lint()
    gm.recompile()
    _fold_constants(gm, model, example)
    # export's tracer: a saved GraphModule would need it (and its arguments) to load
    gm.graph._tracer_cls = None
    gm.graph._tracer_extras = {}
    gm.graph.lint()
    gm.recompile()
    new = fx.GraphModule(gm, gm.graph, type(model).__name__)
    _check_same(new, model, example)
    return new
