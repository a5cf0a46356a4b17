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
from fxprune.passes.plan import Indices, build_plan, param_indices

from fxprune.data import META_LITERALS, ChannelGroup, drop_metadata
from fxprune.trace import copy_graph_module

# build_plan and param_indices live in fxprune.passes.plan; re-exported here for earlier imports
__all__ = ["RewritePass", "build_plan", "param_indices"]


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
        drop_metadata(new)  # the analysis of the original does not describe the pruned graph
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
