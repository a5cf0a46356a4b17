"""Magnitude score: the L2 norm of every weight slice a channel selects (producer rows, consumer columns).

Data-free. Scores are normalised by the group mean so that groups of different layers compare; they are
importance values, not loss changes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from fxprune.passes.score import GroupScore, ScorePass, register_score

from fxprune.data import ChannelGroup

__all__ = ["MagnitudeScore", "channel_sums"]


def channel_sums(t: torch.Tensor, dim: int, offset: int, repeat: int, n: int) -> torch.Tensor:
    """Sum of ``t**2`` over every position a group channel selects (``n`` channels)."""
    per_pos = t.detach().float().pow(2).movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)
    return per_pos[offset : offset + n * repeat].reshape(n, repeat).sum(1)


@register_score("magnitude")
class MagnitudeScore(ScorePass):
    """``score_c = sqrt(sum over weight sites of ||W[slice_c]||^2)``, divided by the group mean."""

    comparable = False
    cost_exponent = 0.0

    def score_groups(self, gm: fx.GraphModule, groups: list[ChannelGroup]) -> dict[int, GroupScore]:
        tensors = dict(gm.state_dict(keep_vars=True))
        out: dict[int, GroupScore] = {}
        for g in groups:
            acc = torch.zeros(g.size)
            for s in g.sites:
                if s.role in ("out", "in") and s.param in tensors:
                    acc += channel_sums(tensors[s.param], s.dim, s.offset, s.repeat, g.size)
            v = acc.sqrt().numpy().astype(np.float64)
            mean = float(v.mean())
            out[g.id] = GroupScore(v / mean if mean > 0 else v)
        return out
