"""Mergeable statistics: what the data-driven scores and compensation accumulate over calibration batches.

Every estimate fxprune computes from data is a function of a few sums over batches. Keeping those sums in
objects that ``merge`` lets the same code serve three ways of reading data:

1. one process, one pass (the default): ``update`` once per batch, in the order the batches come;
2. a split (shards, chunks, a stream read twice): statistics of each part, then ``merge``;
3. ``torch.distributed``: each process accumulates its own batches, then ``reduce(dist.all_reduce)`` sums the
   statistics of all processes in place (``Reduce``: a function that sums a tensor across processes).

``merge`` is associative and the empty statistic is its identity, so the estimate does not depend on how the
batches were split, up to floating-point rounding: the sums are added in another order (exact in real
arithmetic; the single-process path adds in the same order as before these objects existed).

Two kinds:

- ``Sum``: ``S = sum_i s_i x_i`` over updates (tensors ``x_i``, optional scale ``s_i``) and ``n = sum_i n_i``.
  Means, Gram matrices ``X^T X``, curvature products averaged over batches. Merge: ``S = S_a + S_b``,
  ``n = n_a + n_b``.
- ``Moments``: count ``n``, mean ``mu`` and ``M2 = sum (x - mu)^2`` (elementwise), for a mean and a spread
  across batches. Update by Welford, merge by Chan et al.:
  ``delta = mu_b - mu_a``, ``mu = mu_a + delta n_b / n``, ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

import torch

__all__ = ["Joint", "Moments", "Reduce", "Stat", "Sum", "process_group_sum", "process_rank"]

#: Sums a tensor across processes in place, e.g. ``torch.distributed.all_reduce`` (op SUM, the default).
Reduce = Callable[[torch.Tensor], object]


class Stat(Protocol):
    """What every statistic here offers: an associative ``merge`` with the empty statistic as identity, and
    ``reduce(fn)``, the merge of the same statistic over all processes by a summing all-reduce ``fn``."""

    def merge(self, other: Self) -> Self: ...

    def reduce(self, fn: Reduce) -> Self: ...


class Sum:
    """``S = sum_i s_i x_i`` (a list of tensors) and ``n = sum_i n_i`` over updates.

    Args:
        values: the starting tensors (kept, not copied), or ``None`` for the empty sum (the identity of
            ``merge``; its tensors take the shapes of the first update).
        count: the starting count.

    Cases of ``update(x, count=n, scale=s)``:
    1. empty: ``S = x`` (a copy) or ``s * x``;
    2. otherwise ``S += x`` or ``S += s * x`` in place (``Tensor.add_(x, alpha=s)``).

    A scale fixed in advance makes ``S`` itself the estimate: with ``s_b = n_b / N`` for a global sample count
    ``N``, ``S`` is the sample-weighted mean. In a split each part must use the same global ``N`` (a
    distributed run reduces the counts first); ``mean()`` (``S / n``) needs no ``N`` in advance.
    """

    __slots__ = ("count", "values")

    def __init__(self, values: Sequence[torch.Tensor] | None = None, count: float = 0) -> None:
        self.values: list[torch.Tensor] | None = None if values is None else list(values)
        self.count = count

    @classmethod
    def zeros_like(cls, tensors: Sequence[torch.Tensor]) -> Sum:
        """A sum of zeros shaped like ``tensors`` with count 0 (the identity, with shapes fixed)."""
        return cls([torch.zeros_like(t) for t in tensors])

    @property
    def empty(self) -> bool:
        return self.values is None

    def update(self, values: Sequence[torch.Tensor], count: float = 1, scale: float | None = None) -> Sum:
        """Add ``scale * values`` (``values`` when ``scale`` is None) and ``count``; returns ``self``.

        Raises:
            ValueError: ``values`` does not have as many tensors as the sum.
        """
        if self.values is None:
            self.values = [v.clone() if scale is None else v * scale for v in values]
        else:
            if len(values) != len(self.values):
                raise ValueError(f"Sum.update: {len(values)} tensors, but the sum holds {len(self.values)}")
            for acc, v in zip(self.values, values, strict=True):
                if scale is None:
                    acc.add_(v)
                else:
                    acc.add_(v, alpha=scale)
        self.count += count
        return self

    def merge(self, other: Sum) -> Sum:
        """A new sum of both (``S_a + S_b``, ``n_a + n_b``); an empty side is the identity (a copy of the other).

        Raises:
            ValueError: the two sums hold different numbers of tensors.
        """
        if other.values is None:
            return Sum(None if self.values is None else [v.clone() for v in self.values], self.count)
        if self.values is None:
            return Sum([v.clone() for v in other.values], other.count)
        if len(self.values) != len(other.values):
            raise ValueError(f"Sum.merge: {len(self.values)} tensors and {len(other.values)} tensors")
        return Sum([a + b for a, b in zip(self.values, other.values, strict=True)], self.count + other.count)

    def result(self) -> list[torch.Tensor]:
        """The sum ``S`` itself.

        Raises:
            ValueError: the sum is empty.
        """
        if self.values is None:
            raise ValueError("Sum.result: nothing was accumulated (no batch)")
        return self.values

    def mean(self) -> list[torch.Tensor]:
        """``S / n``.

        Raises:
            ValueError: the sum is empty or its count is 0.
        """
        if self.count == 0:
            raise ValueError("Sum.mean: the count is 0 (no batch)")
        return [v / self.count for v in self.result()]

    def tensors(self) -> list[torch.Tensor]:
        """What an all-reduce sums: the tensors of ``S`` and the count as a float64 scalar tensor (last)."""
        values = self.result()
        return [*values, torch.tensor(float(self.count), dtype=torch.float64, device=values[0].device)]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> Sum:
        """The inverse of ``tensors()`` (an integral count comes back as an ``int``)."""
        count = float(tensors[-1])
        return cls(list(tensors[:-1]), int(count) if count.is_integer() else count)

    def reduce(self, fn: Reduce) -> Sum:
        """Sum this statistic across processes: ``fn`` (e.g. ``dist.all_reduce``) on each of ``tensors()`` in
        place; returns ``self`` updated. Every process must hold tensors of the same shapes (start from
        ``zeros_like`` where a process may see no batch)."""
        parts = self.tensors()
        for t in parts:
            fn(t)
        merged = Sum.from_tensors(parts)
        self.values, self.count = merged.values, merged.count
        return self


class Moments:
    """Elementwise count, mean and ``M2 = sum (x_i - mean)^2`` of tensors ``x_i``, accumulated in float64.

    ``update(x)`` is Welford's step: ``n += 1``, ``delta = x - mu``, ``mu += delta / n``,
    ``M2 += delta * (x - mu)``. ``merge`` is Chan et al.'s pairwise formula (module docstring), so a split
    gives the moments of the concatenation. ``var(correction)`` is ``M2 / (n - correction)``.
    """

    __slots__ = ("count", "m2", "mu")

    def __init__(
        self, count: int = 0, mean: torch.Tensor | None = None, m2: torch.Tensor | None = None
    ) -> None:
        self.count = count
        self.mu = mean
        self.m2 = m2

    def update(self, x: torch.Tensor) -> Moments:
        """Add one observation (a tensor of the moments' shape); returns ``self``."""
        x = x.detach().double()
        self.count += 1
        if self.mu is None or self.m2 is None:
            self.mu, self.m2 = x.clone(), torch.zeros_like(x)
            return self
        delta = x - self.mu
        self.mu = self.mu + delta / self.count
        self.m2 = self.m2 + delta * (x - self.mu)
        return self

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of observations (Chan et al.); an empty side is the identity."""
        if other.count == 0 or other.mu is None or other.m2 is None:
            return Moments(self.count, self.mu, self.m2)
        if self.count == 0 or self.mu is None or self.m2 is None:
            return Moments(other.count, other.mu, other.m2)
        n = self.count + other.count
        delta = other.mu - self.mu
        mean = self.mu + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def mean(self) -> torch.Tensor:
        """The mean (float64).

        Raises:
            ValueError: no observation.
        """
        if self.mu is None:
            raise ValueError("Moments.mean: no observation")
        return self.mu

    def var(self, correction: int = 1) -> torch.Tensor:
        """``M2 / (n - correction)`` (1: the unbiased sample variance); zeros when ``n <= correction``."""
        if self.m2 is None:
            raise ValueError("Moments.var: no observation")
        if self.count <= correction:
            return torch.zeros_like(self.m2)
        return self.m2 / (self.count - correction)

    def std(self, correction: int = 1) -> torch.Tensor:
        return self.var(correction).sqrt()

    def tensors(self) -> list[torch.Tensor]:
        """``[n (float64 scalar), mean, M2]``: the state, for storage or a gather."""
        return [torch.tensor(float(self.count), dtype=torch.float64, device=self.mean.device), self.mean,
                self.m2 if self.m2 is not None else torch.zeros_like(self.mean)]  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor]) -> Moments:
        count, mean, m2 = tensors
        return cls(int(float(count)), mean, m2)

    def reduce(self, fn: Reduce) -> Moments:
        """The moments over all processes with a summing all-reduce ``fn`` only (two rounds): sum ``n`` and
        ``n * mu`` for the global mean ``mu_g``, then sum each process's ``M2 + n (mu - mu_g)^2`` (its ``M2``
        about ``mu_g``). Every process must hold observations of the same shape; returns ``self`` updated."""
        mean = self.mean
        first = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=mean.device),
                           (mean * self.count).reshape(-1)])  # fmt: skip
        fn(first)
        n = int(float(first[0]))
        mu_g = (first[1:] / n).reshape(mean.shape)
        m2 = self.m2 if self.m2 is not None else torch.zeros_like(mean)
        shifted = m2 + self.count * (mean - mu_g) ** 2
        fn(shifted)
        self.count, self.mu, self.m2 = n, mu_g, shifted
        return self


class Joint:
    """Several statistics accumulated together (e.g. a ``Sum`` and a ``Moments``), merged part by part.

    ``parts`` is a tuple of statistics; ``merge`` pairs them in order and ``reduce`` reduces each in order (every
    process must hold the same kinds in the same order).
    """

    __slots__ = ("parts",)

    def __init__(self, *parts: Any) -> None:
        self.parts: tuple[Any, ...] = parts

    def merge(self, other: Joint) -> Joint:
        """Part-wise merge.

        Raises:
            ValueError: the two hold different numbers of parts.
        """
        if len(self.parts) != len(other.parts):
            raise ValueError(f"Joint.merge: {len(self.parts)} parts and {len(other.parts)} parts")
        return Joint(*(a.merge(b) for a, b in zip(self.parts, other.parts, strict=True)))

    def reduce(self, fn: Reduce) -> Joint:
        for part in self.parts:
            part.reduce(fn)
        return self


def process_group_sum() -> Reduce | None:
    """The summing all-reduce of the default ``torch.distributed`` process group (in place, like every
    ``Reduce``), when one is initialised with more than one process; else ``None`` (one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    return all_reduce


def process_rank() -> int:
    """This process's rank in the default ``torch.distributed`` process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
