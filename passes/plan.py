"""Plan building: which positions of every parameter dimension, consumer input and module a selection keeps.

A pure function of the channel groups and the kept channels per group (``select``'s output), used by the
compiler (the plan it returns, and the indices the rewrite slices with), by ``apply_plan`` (a saved plan
rebuilt against a model) and by the rewrite itself. Nothing here touches a graph or a module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fxprune.data import ChannelGroup, PrunePlan

__all__ = ["Indices", "build_plan", "param_indices"]


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
