"""The rewrite: a new GraphModule with physically sliced parameters and recomputed shape literals.

The only pass that changes weights or structure. It deep-copies its input, slices every parameter/buffer
dimension that a pruned group indexes (``Site``), updates module attributes (``out_channels``, ``groups``,
``num_features``...) from the new parameter shapes (each module's ``AttrFix`` in the op table,
``fxprune.passes.family``), rewrites literal arguments recorded by the op rules (``LiteralFix``), then lints
and recompiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from fxprune.passes import op_table
from fxprune.passes.base import TransformPass
from fxprune.passes.family import OpTable
from fxprune.passes.plan import Indices, build_plan, param_indices

from fxprune.data import META_LITERALS, ChannelGroup, drop_metadata
from fxprune.trace import copy_graph_module

# build_plan and param_indices live in fxprune.passes.plan; re-exported here for earlier imports
__all__ = ["RewritePass", "build_plan", "param_indices"]


class RewritePass(TransformPass):
    """Slices the pruned channels out of a copy of the graph. ``table``: the op table whose attribute fixes
    apply (None: ``op_table.DEFAULT_TABLE`` as it is when the pass runs)."""

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        kept: Mapping[int, tuple[int, ...]],
        indices: Indices | None = None,
        table: OpTable | None = None,
    ) -> None:
        self.groups = list(groups)
        self.kept = dict(kept)
        self.indices = indices
        self.table = table

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        indices = param_indices(self.groups, self.kept) if self.indices is None else self.indices
        new, touched = _copy_sliced(gm, indices)
        slice_in_copy = new is None  # a sliced tensor is not a registered parameter/buffer of its owner
        if new is None:
            new = copy_graph_module(gm)
        table = self.table if self.table is not None else op_table.DEFAULT_TABLE
        remembered: dict[str, dict[str, int]] = {}
        for name, m in new.named_modules():
            fix = table.attr_fix(m)
            if fix is not None:
                remembered[name] = {a: int(getattr(m, a)) for a in fix.remember}
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
            fix = table.attr_fix(m)
            if fix is not None:
                fix.fix(m, remembered.get(name, {}))
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
