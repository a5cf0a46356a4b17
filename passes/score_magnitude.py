"""Magnitude score: the L2 norm of every weight slice a channel selects (producer rows, consumer columns).

Data-free. Scores are normalised by the group mean so that groups of different layers compare; they are
importance values, not loss changes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from fxprune.passes.score import GroupScore, ScorePass

from fxprune.data import ChannelGroup

__all__ = ["MagnitudeScore", "channel_sums", "position_sums"]


def position_sums(t: torch.Tensor, dim: int, squared: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``t**2`` over everything but ``dim``: one value per position of ``dim``.

    ``squared``: ``t.detach().float().pow(2)`` if the caller already has it.
    """
    sq = t.detach().float().pow(2) if squared is None else squared
    return sq.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)


def channel_sums(t: torch.Tensor, dim: int, offset: int, repeat: int, n: int) -> torch.Tensor:
    """Sum of ``t**2`` over every position a group channel selects (``n`` channels)."""
    return _channels(position_sums(t, dim), offset, repeat, n)


def _channels(per_pos: torch.Tensor, offset: int, repeat: int, n: int) -> torch.Tensor:
    return per_pos[offset : offset + n * repeat].reshape(n, repeat).sum(1)


class MagnitudeScore(ScorePass):
    """``score_c = sqrt(sum over weight sites of ||W[slice_c]||^2)``, divided by the group mean."""

    name = "magnitude"

    comparable = False
    cost_exponent = 0.0

    def score_groups(self, gm: fx.GraphModule, groups: list[ChannelGroup]) -> dict[int, GroupScore]:
        tensors = dict(gm.state_dict(keep_vars=True))
        # a weight read by many groups (the input columns of a conv after a concat: densenet, googlenet)
        # is reduced once, not once per group, and squared once for all its dims (one square at a time)
        dims: dict[str, list[int]] = {}
        for g in groups:
            for s in g.sites:
                if s.role in ("out", "in") and s.param in tensors and s.dim not in dims.get(s.param, []):
                    dims.setdefault(s.param, []).append(s.dim)
        per_pos: dict[tuple[str, int], torch.Tensor] = {}
        for param, ds in dims.items():
            t = tensors[param]
            squared = t.detach().float().pow(2)
            if squared.dim() > 2 and set(ds) <= {0, 1}:
                # conv weights (out, in, *kernel): one pass reduces the kernel dims, the rest is small;
                # moving dim 1 to the front (position_sums) would copy the whole squared weight
                squared = squared.sum(tuple(range(2, squared.dim())))
            for d in ds:
                if squared.dim() == 2 and d in (0, 1):
                    per_pos[param, d] = squared.sum(1 - d)
                else:
                    per_pos[param, d] = position_sums(t, d, squared)
            del squared
        out: dict[int, GroupScore] = {}
        for g in groups:
            acc = torch.zeros(g.size)
            for s in g.sites:
                if s.role in ("out", "in") and s.param in tensors:
                    acc += _channels(per_pos[s.param, s.dim], s.offset, s.repeat, g.size)
            v = acc.sqrt().numpy().astype(np.float64)
            mean = float(v.mean())
            out[g.id] = GroupScore(v / mean if mean > 0 else v)
        return out
