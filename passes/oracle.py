"""The masked oracle (shared/DESIGN.md): the original model with every removed channel's input columns zeroed
in every consumer, which the pruned model must equal; ``fxprune.masked_model`` (re-exported by
``fxprune.verify``). Compensation also runs it, as the pruned network in the original coordinates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from fxprune.data import PrunePlan
from fxprune.trace import detached_caches, fold_parametrizations

__all__ = ["StatsMasked", "masked_model"]


def masked_model(
    model: torch.nn.Module, plan: PrunePlan, overrides: Mapping[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """The oracle: a copy of ``model`` in which every removed channel's input columns are zeroed in every
    consumer (``plan.inputs``). The pruned model must compute the same function (shared/DESIGN.md).

    ``overrides`` (``result.compensation.overrides``: full-size tensors by qualified name) are written first,
    so the oracle covers compensated weights, folded biases and BatchNorm shifts too.
    Independent of the rewrite: it only reads the plan's consumer columns and writes values.
    """
    masked = copy.deepcopy(model, detached_caches(model))
    fold_parametrizations(masked)  # a parametrized weight is recomputed on access: mask its value instead
    with torch.no_grad():
        for name, value in (overrides or {}).items():
            owner, _, leaf = name.rpartition(".")
            getattr(masked.get_submodule(owner), leaf).copy_(value)
        for name, (dim, kept) in plan.inputs.items():
            owner, _, leaf = name.rpartition(".")
            t = getattr(masked.get_submodule(owner), leaf)
            keep = torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
            keep[list(kept)] = True
            shape = [1] * t.dim()
            shape[dim] = -1
            t.mul_(keep.view(shape).to(t.dtype))
    if plan.stats:
        return StatsMasked(masked, plan.stats)
    return masked


class StatsMasked(torch.nn.Module):
    """``model`` whose layer/group norms over a pruned channel dim normalise over the kept channels only.

    For every ``plan.stats`` entry (the norm's weight and the kept positions of its channels), a call
    ``F.layer_norm(x, (C,), weight, bias, eps)`` with that weight becomes
    ``y[..., K] = layer_norm(x[..., K], (|K|,), weight[K], bias[K], eps)`` and ``y[..., removed] = 0``,
    and ``F.group_norm(x, G, weight, bias, eps)`` becomes ``y[:, K] = group_norm(x[:, K], G, weight[K],
    bias[K], eps)`` (``K`` keeps the same slots of every group): exactly what the pruned model computes on
    the kept channels. The call is found by the identity of its weight tensor while ``forward`` runs
    (``nn.LayerNorm``/``nn.GroupNorm`` and functional calls all go through ``torch.nn.functional``); other
    norms are untouched.
    """

    def __init__(self, model: torch.nn.Module, stats: Mapping[str, tuple[int, tuple[int, ...]]]) -> None:
        super().__init__()
        self.model = model
        self.stats = dict(stats)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.kept_norms():
            return self.model(*args, **kwargs)

    @contextmanager
    def kept_norms(self) -> Iterator[None]:
        """While it is open, ``F.layer_norm`` and ``F.group_norm`` calls with a site's weight run over the
        kept channels only (``model`` run another way, e.g. node by node, computes the pruned model)."""
        import torch.nn.functional as F

        sites: dict[int, torch.Tensor] = {}
        for name, (dim, kept) in self.stats.items():
            owner, _, leaf = name.rpartition(".")
            w = getattr(self.model.get_submodule(owner), leaf)
            if dim != 0 or w.dim() != 1:
                raise NotImplementedError(f"statistics site {name} on dim {dim} of a {w.dim()}-d weight")
            sites[id(w)] = torch.as_tensor(kept, dtype=torch.long, device=w.device)
        real_ln, real_gn = F.layer_norm, F.group_norm
        F.layer_norm = _over_kept(real_ln, sites, -1, lambda shape, idx: (len(idx),))  # type: ignore[assignment]
        F.group_norm = _over_kept(real_gn, sites, 1, lambda groups, idx: groups)  # type: ignore[assignment]
        try:
            yield
        finally:
            F.layer_norm, F.group_norm = real_ln, real_gn


def _over_kept(
    real: Callable[..., torch.Tensor],
    sites: Mapping[int, torch.Tensor],
    dim: int,
    shape_arg: Callable[[Any, torch.Tensor], Any],
) -> Callable[..., torch.Tensor]:
    """``real`` (``F.layer_norm`` or ``F.group_norm``: ``(input, arg, weight, bias, eps)``), computed over the
    kept channels ``sites[id(weight)]`` of ``dim`` only, with zeros at the removed ones; ``shape_arg`` gives
    the second argument for the kept channels. Calls whose weight is not a site are passed through."""

    def fn(input: torch.Tensor, arg: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
        idx = sites.get(id(weight)) if weight is not None else None
        if idx is None or weight is None:
            return real(input, arg, weight, bias, eps)
        y = real(input.index_select(dim, idx), shape_arg(arg, idx), weight[idx],
                 None if bias is None else bias[idx], eps)  # fmt: skip
        return input.new_zeros(input.shape).index_copy(dim, idx, y)

    return fn
