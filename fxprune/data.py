"""The data model shared by the passes: frozen values, no references back to modules or graphs.

Metadata keys written into ``node.meta`` are the module constants ``META_*`` below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "META_CHANNELS",
    "META_COST_DIMS",
    "META_FLOPS",
    "META_LITERALS",
    "META_OUTPUT",
    "META_PREFIX",
    "META_VALUE",
    "ChannelDim",
    "ChannelGroup",
    "LiteralFix",
    "PrunePlan",
    "Site",
    "TensorValue",
    "cache_dir",
    "drop_metadata",
    "flatten_structure",
    "output_differences",
    "output_signature",
]


def cache_dir() -> Path:
    """fxprune's cache on disk (trained demo weights, latency tables): ``$FXPRUNE_CACHE``, else
    ``~/.cache/fxprune``."""
    return Path(os.environ.get("FXPRUNE_CACHE") or Path.home() / ".cache" / "fxprune")


#: ``TensorValue`` (or a tuple of them / None) describing a node's output, written by shape propagation.
META_VALUE = "fxprune.value"
#: FLOPs of the node at full width, counted by ``torch.utils.flop_counter.FlopCounterMode``.
META_FLOPS = "fxprune.flops"
#: ``ChannelDim`` (or tuple of them / None): which groups' channels flow through the node's output.
META_CHANNELS = "fxprune.channels"
#: tuple of segment tuples: the channel dims whose kept sizes scale the node's FLOPs multiplicatively.
META_COST_DIMS = "fxprune.cost_dims"
#: tuple of ``LiteralFix``: literal arguments that the rewrite must recompute from kept channel counts.
META_LITERALS = "fxprune.literals"
#: In ``GraphModule.meta``: the ``output_signature`` of the traced model's output on the example input.
META_OUTPUT = "fxprune.output"
#: In ``GraphModule.meta``: how the model was captured (``fxprune.capture``: ``SYMBOLIC`` or ``EXPORT``).
META_CAPTURE = "fxprune.capture"
#: every metadata key fxprune writes starts with this (node.meta and GraphModule.meta)
META_PREFIX = "fxprune."


def drop_metadata(gm: Any) -> None:
    """Remove every ``fxprune.*`` key from ``gm.meta`` and from each node's ``meta`` (in place).

    Analysis metadata describes the graph it was computed on: after the rewrite the channel groups,
    literals, costs and scores of the original no longer hold, and shapes and FLOPs changed. The rewrite
    drops them all from the graph it returns; a later ``shape_propagate`` writes fresh shapes and FLOPs.
    ``torch.save`` of the result then pickles no analysis metadata either.
    """
    for key in [k for k in gm.meta if k.startswith(META_PREFIX)]:
        del gm.meta[key]
    for node in gm.graph.nodes:
        for key in [k for k in node.meta if k.startswith(META_PREFIX)]:
            del node.meta[key]


#: A channel dimension's layout: consecutive segments ``(group_id, repeat)``; group channel ``i`` of a
#: segment occupies ``repeat`` consecutive positions ``[offset + i*repeat, offset + (i+1)*repeat)``.
Segments = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TensorValue:
    """Shape and dtype of a tensor produced by a node."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ChannelDim:
    """Dimension ``dim`` of a tensor carries the channels of ``segments`` (in order)."""

    dim: int
    segments: Segments

    def size(self, sizes: Mapping[int, int]) -> int:
        """Length of the dimension when group ``g`` keeps ``sizes[g]`` channels."""
        return sum(sizes[g] * r for g, r in self.segments)


@dataclass(frozen=True)
class Site:
    """One place where a group's channels index a parameter or buffer.

    Group channel ``i`` selects positions ``offset + i*repeat + j`` (``0 <= j < repeat``) of dimension
    ``dim`` of tensor ``param`` (a qualified name in the traced module). ``role`` is ``"out"`` for producer
    rows (conv/linear output), ``"in"`` for consumer columns (conv/linear input), ``"norm"`` for
    per-channel parameters (BatchNorm statistics, scales) that are sliced without computing anything new,
    and ``"stats"`` for the weight of a norm whose statistics run over the channels (LayerNorm over the
    channel dim): sliced like ``"norm"``, but the kept channels' values depend on which others are kept.
    """

    param: str
    dim: int
    offset: int
    repeat: int
    role: str
    node: str


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: one union-find class of channel spaces.

    Attributes:
        id: stable index in the order the graph first produces the group.
        size: number of channels (every member space has this many, aligned index by index).
        sites: every parameter slice the group's channels select.
        nodes: names of the nodes whose outputs carry the group's channels.
        pinned: reasons the group may not be pruned; empty when prunable.
    """

    id: int
    size: int
    sites: tuple[Site, ...]
    nodes: tuple[str, ...]
    pinned: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.pinned

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.node for s in self.sites if s.role == "out"))

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.node for s in self.sites if s.role == "in"))


@dataclass(frozen=True)
class LiteralFix:
    """A literal argument of a node that depends on channel counts; the rewrite recomputes it.

    The argument is ``args[index]`` (or ``kwargs[index]`` for a str), or element ``item`` of it. With
    ``size(s) = sum(kept[g] * repeat for g, repeat in s)`` the new value is, by ``kind``:

    - ``"size"``: ``size(segments[0]) // divisor`` (view/reshape sizes, ``groups`` of a depthwise conv);
    - ``"sizes"``: ``[size(s) for s in segments]`` (split sections);
    - ``"slice"``: ``slice(size(segments[0]), size(segments[0]) + size(segments[1]))`` (channel slicing).
    """

    index: int | str
    item: int | None
    kind: str
    segments: tuple[Segments, ...]
    divisor: int = 1

    def value(self, sizes: Mapping[int, int]) -> object:
        size = [sum(sizes[g] * r for g, r in s) for s in self.segments]
        if self.kind == "size":
            return size[0] // self.divisor
        if self.kind == "sizes":
            return size
        if self.kind == "slice":
            return slice(size[0], size[0] + size[1])
        raise ValueError(f"unknown LiteralFix kind {self.kind!r}")


@dataclass(frozen=True)
class PrunePlan:
    """What to keep: the result of selection, independent of any module or graph.

    Attributes:
        kept: group id -> sorted kept channel indices (only for groups that lose channels).
        group_sizes: group id -> original channel count, for every group.
        params: parameter/buffer qualified name -> {dim: sorted kept indices along that dim}.
        inputs: consumer parameter name -> (dim, kept indices): the input columns a consumer keeps.
        modules: module qualified name -> {"out": kept output rows, "in": kept input columns} (each
            optional), a per-module view of ``params`` for people and the masked oracle.
        stats: normalisation weight name -> (dim, kept indices) for norms whose statistics run over a
            pruned channel dim (LayerNorm over channels, ``Site.role == "stats"``): the masked oracle
            computes their statistics over the kept channels only.
    """

    kept: Mapping[int, tuple[int, ...]]
    group_sizes: Mapping[int, int]
    params: Mapping[str, Mapping[int, tuple[int, ...]]] = field(default_factory=dict)
    inputs: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    modules: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)
    stats: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)

    def kept_sizes(self) -> dict[int, int]:
        """Kept channel count of every group."""
        return {g: len(self.kept[g]) if g in self.kept else n for g, n in self.group_sizes.items()}

    @property
    def removed_channels(self) -> int:
        return sum(self.group_sizes[g] - len(k) for g, k in self.kept.items())


def _fields(out: Any) -> list[tuple[str, Any]]:
    """The fields of a dataclass instance, in declaration order (a dataclass output, e.g. ``ModelOutput``)."""
    return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]


def flatten_structure(out: Any, leaf: type) -> list[Any]:
    """The ``leaf`` instances of a nested output (tensors of a model's output, or the fx nodes of its graph's
    output) in one fixed order: dict values in order, then tuple/list items, dataclass fields in declaration
    order; anything else is left out.
    Both sides of the ONNX check (``fxprune.verify.flatten_outputs``, ``fxprune.onnx_writer``) use it, so
    the ONNX outputs and the eager outputs line up. A graph builds a dict subclass or a dataclass with a
    call to its class (``fxprune.trace``: the output keeps its type); ``onnx_writer`` looks through that
    call, whose arguments are in the same order."""
    if isinstance(out, leaf):
        return [out]
    if isinstance(out, dict):
        return [x for v in out.values() for x in flatten_structure(v, leaf)]
    if isinstance(out, (tuple, list)):
        return [x for v in out for x in flatten_structure(v, leaf)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [x for _, v in _fields(out) for x in flatten_structure(v, leaf)]
    return []


#: an ``output_signature``: nested tuples; a tensor's is ``("tensor", shape, dtype)``
Signature = tuple[Any, ...]


def output_signature(out: Any) -> Signature:
    """What a caller can see of a model's output without its values: container types (by qualified name),
    dict keys and their order, sequence lengths, dataclass fields; for every tensor its shape and dtype;
    numbers, strings and None by type and value, other objects by type. Hashable; ``output_differences``
    compares two.
    """
    if isinstance(out, _tensor_type()):
        t: Any = out
        return ("tensor", tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))
    cls = (
        _FX_IMMUTABLE.get(type(out).__qualname__, type(out))
        if type(out).__module__.startswith("torch.fx")
        else type(out)
    )
    kind = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(out, dict):
        return ("dict", kind, tuple((k, output_signature(v)) for k, v in out.items()))
    if isinstance(out, (tuple, list)):
        return ("seq", kind, tuple((i, output_signature(v)) for i, v in enumerate(out)))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return ("fields", kind, tuple((k, output_signature(v)) for k, v in _fields(out)))
    shown = repr(out) if isinstance(out, (int, float, complex, str, bytes, type(None))) else None
    return ("value", kind, shown)  # another object: by type (its repr may hold an address)


#: torch.fx's ``Interpreter`` returns these where the GraphModule itself returns a plain dict or list
_FX_IMMUTABLE = {"immutable_dict": dict, "immutable_list": list}


def _tensor_type() -> type:
    import torch  # the data model itself needs no torch; only signatures of real outputs do

    return torch.Tensor


def output_differences(before: Signature, after: Signature, path: str = "out") -> list[str]:
    """Each place where output signature ``after`` differs from ``before``, named by its path
    (``out['out']: dim 1 21 -> 15``, ``out[1]: dtype float32 -> float16``, ``out: OrderedDict -> dict``).
    Empty when the two are the same."""
    if before == after:
        return []
    if before[0] != after[0] or (before[0] != "tensor" and before[1] != after[1]):
        return [f"{path}: {_what(before)} -> {_what(after)}"]
    if before[0] == "tensor":
        diffs = []
        (_, s0, d0), (_, s1, d1) = before, after
        if len(s0) != len(s1):
            diffs.append(f"{path}: shape {list(s0)} -> {list(s1)} (rank {len(s0)} -> {len(s1)})")
        else:
            diffs += [
                f"{path}: dim {i} {a} -> {b}" for i, (a, b) in enumerate(zip(s0, s1, strict=True)) if a != b
            ]
        if d0 != d1:
            diffs.append(f"{path}: dtype {d0} -> {d1}")
        return diffs
    if before[0] == "value":
        return [f"{path}: {before[2]} -> {after[2]}"]
    items0, items1 = dict(before[2]), dict(after[2])
    keys0, keys1 = [k for k, _ in before[2]], [k for k, _ in after[2]]
    if keys0 != keys1:
        what = "keys" if before[0] == "dict" else ("fields" if before[0] == "fields" else "length")
        shown = (lambda ks: len(ks)) if before[0] == "seq" else (lambda ks: ks)
        return [f"{path}: {what} {shown(keys0)} -> {shown(keys1)}"]
    sub = (lambda k: f"{path}[{k!r}]") if before[0] == "dict" else (
        (lambda k: f"{path}.{k}") if before[0] == "fields" else (lambda k: f"{path}[{k}]"))  # fmt: skip
    return [d for k in keys0 for d in output_differences(items0[k], items1[k], sub(k))]


def _what(sig: Signature) -> str:
    if sig[0] == "tensor":
        return f"tensor {list(sig[1])} {sig[2]}"
    return str(sig[1]).removeprefix("builtins.")
