"""The rewrite: a new GraphModule with physically sliced parameters and recomputed shape literals.

The only pass that changes weights or structure. It deep-copies its input, slices every parameter/buffer
dimension that a pruned group indexes (``Site``), updates module attributes (``out_channels``, ``groups``,
``num_features``...) from the new parameter shapes, rewrites literal arguments recorded by the op rules
(``LiteralFix``), then lints and recompiles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from fxprune.passes.base import TransformPass

from fxprune.data import META_LITERALS, ChannelGroup, PrunePlan
from fxprune.trace import copy_graph_module

__all__ = ["RewritePass", "build_plan", "param_indices"]


def param_indices(
    groups: Sequence[ChannelGroup], kept: Mapping[int, tuple[int, ...]]
) -> dict[tuple[str, int], tuple[np.ndarray, int]]:
    """``(param, dim) -> (kept positions, original length)`` for every dimension a pruned group indexes.

    Sites of one ``(param, dim)`` tile the dimension: each covers ``size * repeat`` positions from its offset.
    """
    tiles: dict[tuple[str, int], dict[int, tuple[int, int, int]]] = {}
    for g in groups:
        for s in g.sites:
            tiles.setdefault((s.param, s.dim), {})[s.offset] = (g.id, g.size, s.repeat)
    out: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    for key, by_offset in tiles.items():
        if not any(gid in kept for gid, _, _ in by_offset.values()):
            continue
        parts, pos = [], 0
        for offset in sorted(by_offset):
            gid, size, rep = by_offset[offset]
            if offset != pos:
                raise AssertionError(f"sites of {key} do not tile the dimension (gap at {pos})")
            k = np.asarray(kept[gid], dtype=np.int64) if gid in kept else np.arange(size, dtype=np.int64)
            parts.append((offset + k[:, None] * rep + np.arange(rep)[None, :]).reshape(-1))
            pos = offset + size * rep
        out[key] = (np.concatenate(parts), pos)
    return out


Indices = dict[tuple[str, int], tuple[np.ndarray, int]]


def build_plan(
    groups: Sequence[ChannelGroup], kept: Mapping[int, tuple[int, ...]], indices: Indices | None = None
) -> PrunePlan:
    """The plan: kept indices per group, per parameter dim, per consumer input, and per module.
    ``indices``: ``param_indices(groups, kept)`` if the caller has it (the rewrite needs it too)."""
    idx = param_indices(groups, kept) if indices is None else indices
    params: dict[str, dict[int, tuple[int, ...]]] = {}
    for (p, d), (k, _) in sorted(idx.items()):
        params.setdefault(p, {})[d] = tuple(k.tolist())
    in_params = {(s.param, s.dim) for g in groups for s in g.sites if s.role == "in"}
    inputs = {p: (d, params[p][d]) for p, d in sorted(in_params) if p in params and d in params[p]}
    stat_params = {(s.param, s.dim) for g in groups for s in g.sites if s.role == "stats"}
    stats = {p: (d, params[p][d]) for p, d in sorted(stat_params) if p in params and d in params[p]}
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for p, dims in params.items():
        owner, _, leaf = p.rpartition(".")
        entry = modules.setdefault(owner, {})
        if leaf == "weight" and 1 in dims and (p, 1) in in_params:
            entry["in"] = dims[1]
        if 0 in dims and leaf in ("weight", "running_mean"):
            entry["out"] = dims[0]
    return PrunePlan(
        kept={g: tuple(v) for g, v in sorted(kept.items())},
        group_sizes={g.id: g.size for g in groups},
        params=params,
        inputs=inputs,
        modules={m: e for m, e in sorted(modules.items()) if e},
        stats=stats,
    )


def _fix_conv(m: nn.Module, before: dict[str, int]) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    c_out = m.weight.shape[0]
    if before["groups"] > 1 and before["in_channels"] == before["groups"]:  # depthwise
        m.groups = c_out // (before["out_channels"] // before["groups"])
        m.in_channels = m.groups
    else:
        m.in_channels = m.weight.shape[1] * m.groups
    m.out_channels = c_out


def _fix_linear(m: nn.Module, before: dict[str, int]) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


def _fix_norm(m: nn.Module, before: dict[str, int]) -> None:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    if t is not None:
        m.num_features = int(t.shape[0])  # type: ignore[index,assignment,union-attr]


def _fix_layer_norm(m: nn.Module, before: dict[str, int]) -> None:
    assert isinstance(m, nn.LayerNorm)
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_group_norm(m: nn.Module, before: dict[str, int]) -> None:
    """One-channel groups lose whole groups; wider groups keep ``num_groups`` and lose the same slots in
    every group (``op_rules._group_norm``)."""
    assert isinstance(m, nn.GroupNorm)
    if m.weight is not None:
        m.num_channels = int(m.weight.shape[0])
        if before["num_groups"] == before["num_channels"]:
            m.num_groups = m.num_channels


def _fix_mha(m: nn.Module, before: dict[str, int]) -> None:
    """An ``nn.MultiheadAttention`` decomposed by ``CanonicalizePass``: the graph reads its parameters
    directly; its attributes are kept truthful for people (whole heads go, ``head_dim`` stays)."""
    assert isinstance(m, nn.MultiheadAttention)
    if m.in_proj_weight is not None:
        m.embed_dim = m.kdim = m.vdim = int(m.in_proj_weight.shape[1])
        m.num_heads = int(m.in_proj_weight.shape[0]) // 3 // m.head_dim


#: module type -> (attributes to remember before slicing, function that fixes them after)
_ATTR_FIXES: dict[type, tuple[tuple[str, ...], Callable[[nn.Module, dict[str, int]], None]]] = {
    nn.modules.conv._ConvNd: (("in_channels", "out_channels", "groups"), _fix_conv),
    nn.Linear: ((), _fix_linear),
    nn.modules.batchnorm._NormBase: ((), _fix_norm),
    nn.LayerNorm: ((), _fix_layer_norm),
    nn.GroupNorm: (("num_groups", "num_channels"), _fix_group_norm),
    nn.MultiheadAttention: ((), _fix_mha),
}


class RewritePass(TransformPass):
    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        kept: Mapping[int, tuple[int, ...]],
        indices: Indices | None = None,
    ) -> None:
        self.groups = list(groups)
        self.kept = dict(kept)
        self.indices = indices

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        indices = param_indices(self.groups, self.kept) if self.indices is None else self.indices
        new, touched = _copy_sliced(gm, indices)
        slice_in_copy = new is None  # a sliced tensor is not a registered parameter/buffer of its owner
        if new is None:
            new = copy_graph_module(gm)
        remembered: dict[str, dict[str, int]] = {}
        for name, m in new.named_modules():
            for typ, (attrs, _) in _ATTR_FIXES.items():
                if isinstance(m, typ):
                    remembered[name] = {a: int(getattr(m, a)) for a in attrs}
        if slice_in_copy:
            with torch.no_grad():
                for (param, dim), (index, length) in indices.items():
                    owner_name, _, leaf = param.rpartition(".")
                    owner = new.get_submodule(owner_name)
                    owner_leaf = _sliced(getattr(owner, leaf), param, dim, index, length)
                    if isinstance(owner_leaf, nn.Parameter):
                        setattr(owner, leaf, owner_leaf)
                    else:
                        owner._buffers[leaf] = owner_leaf
                    touched.add(owner_name)
        for name in touched:
            m = new.get_submodule(name)
            for typ, (_, fix) in _ATTR_FIXES.items():
                if isinstance(m, typ):
                    fix(m, remembered.get(name, {}))
        sizes = {g.id: len(self.kept[g.id]) if g.id in self.kept else g.size for g in self.groups}
        for node in new.graph.nodes:
            for fix in node.meta.get(META_LITERALS, ()):
                value = fix.value(sizes)
                if isinstance(fix.index, str):
                    kwargs = dict(node.kwargs)
                    kwargs[fix.index] = _put(kwargs[fix.index], fix.item, value)
                    node.kwargs = kwargs
                else:
                    args = list(node.args)
                    args[fix.index] = _put(args[fix.index], fix.item, value)
                    node.args = tuple(args)
        new.graph.lint()
        new.recompile()
        return new


def _sliced(old: torch.Tensor, param: str, dim: int, index: np.ndarray, length: int) -> torch.Tensor:
    """``old`` with the positions ``index`` of ``dim`` (of ``length``) kept: a new tensor, a new
    ``nn.Parameter`` for a parameter."""
    if old.shape[dim] != length:
        raise AssertionError(f"{param} has {old.shape[dim]} positions on dim {dim}, sites cover {length}")
    sliced = old.index_select(dim, torch.as_tensor(index, device=old.device))  # a new tensor
    if isinstance(old, nn.Parameter):
        return nn.Parameter(sliced, requires_grad=old.requires_grad)
    return sliced


@torch.no_grad()
def _copy_sliced(
    gm: fx.GraphModule, indices: Mapping[tuple[str, int], tuple[np.ndarray, int]]
) -> tuple[fx.GraphModule | None, set[str]]:
    """A deep copy of ``gm`` in which every tensor of ``indices`` is already sliced, and the owners touched.

    The same result as deep-copying and then slicing the copy's tensors, without cloning the tensors that
    are replaced: each is sliced from ``gm``'s own, the slice is put in its place during the deep copy
    (the memo hands it over as it is, so the copy holds it and nothing else does) and ``gm``'s tensor is
    put back right after. Tied tensors keep their behaviour: only the named owner's entry is swapped.
    Returns ``(None, set())``, with ``gm`` untouched, when a tensor is not a registered parameter or
    buffer of its owner (the caller then slices inside a full copy).
    """
    slices: dict[tuple[int, str], tuple[torch.nn.Module, str, str, torch.Tensor]] = {}
    for (param, dim), (index, length) in indices.items():
        owner_name, _, leaf = param.rpartition(".")
        owner = gm.get_submodule(owner_name)
        if leaf in owner.__dict__ or (leaf not in owner._parameters and leaf not in owner._buffers):
            return None, set()
        key = (id(owner), leaf)
        old = slices[key][3] if key in slices else getattr(owner, leaf)
        slices[key] = (owner, owner_name, leaf, _sliced(old, param, dim, index, length))
    saved: list[tuple[dict[str, Any], str, Any]] = []
    memo: dict[int, object] = {}
    try:
        for owner, _, leaf, t in slices.values():
            table: dict[str, Any] = owner._parameters if leaf in owner._parameters else owner._buffers
            saved.append((table, leaf, table[leaf]))
            table[leaf] = t
            memo[id(t)] = t
        new = copy_graph_module(gm, memo)
    finally:
        for table, leaf, original in reversed(saved):
            table[leaf] = original
    return new, {owner_name for _, owner_name, _, _ in slices.values()}


def _put(arg: object, item: int | None, value: object) -> object:
    if item is None:
        return value
    assert isinstance(arg, (list, tuple))
    seq = list(arg)
    seq[item] = value
    return type(arg)(seq)
