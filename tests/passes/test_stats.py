"""Mergeable statistics (``passes/stats.py``): merge is associative with the empty statistic as identity,
``Moments`` equals numpy over the concatenation, and an all-reduce over simulated processes equals the merge.

``run_ranks`` simulates ``torch.distributed`` in one process: one thread per rank, and a summing all-reduce
built on a barrier (each rank's tensor becomes the sum of all ranks' in rank order); the score and
compensation tests (``test_scores.py``, ``test_compensate.py``) use it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from fxprune.passes.stats import Joint, Moments, Reduce, Sum


def run_ranks(jobs: Sequence[Callable[[Reduce], Any]], timeout: float = 120.0) -> list[Any]:
    """``job(reduce)`` for each rank, each in its own thread, with ``reduce`` a summing all-reduce over the
    ranks (in place, in rank order, like ``dist.all_reduce``); returns the ranks' results, re-raises the first
    error (the barrier is aborted so the other ranks do not wait forever)."""
    n = len(jobs)
    barrier = threading.Barrier(n, timeout=timeout)
    slots: list[torch.Tensor | None] = [None] * n
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def reducer(rank: int) -> Reduce:
        def reduce(t: torch.Tensor) -> None:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0].clone()  # type: ignore[union-attr]
            for s in slots[1:]:
                total += s
            barrier.wait()  # every rank has read the slots before any writes the next round
            t.copy_(total)

        return reduce

    def work(rank: int) -> None:
        try:
            results[rank] = jobs[rank](reducer(rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _data(n: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g, dtype=torch.float64) * (i + 1) + i for i in range(n)]


def _sum(xs: Sequence[torch.Tensor], scale: float | None = None) -> Sum:
    s = Sum()
    for x in xs:
        s.update([x, x.square()], count=2, scale=scale)
    return s


def test_sum_merge_is_associative_with_empty_as_identity() -> None:
    xs = _data()
    a, b, c = _sum(xs[:2]), _sum(xs[2:7]), _sum(xs[7:])
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    whole = _sum(xs)
    for got in (left, right):
        assert got.count == whole.count == 18
        for x, y in zip(got.result(), whole.result(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(whole.mean()[0], torch.stack(xs).mean(0) / 2)  # count 2 per update
    for same in (a.merge(Sum()), Sum().merge(a)):
        assert same.count == a.count
        assert all(torch.equal(x, y) for x, y in zip(same.result(), a.result(), strict=True))
    assert Sum().merge(Sum()).empty


def test_sum_update_copies_scales_and_checks_its_arity() -> None:
    x = torch.ones(3)
    s = Sum().update([x], scale=0.5)
    s.update([x], scale=0.25)
    assert torch.equal(s.result()[0], torch.full((3,), 0.75)) and torch.equal(x, torch.ones(3))
    with pytest.raises(ValueError, match="1 tensors"):
        Sum().update([x]).merge(Sum().update([x, x]))
    with pytest.raises(ValueError, match="2 tensors"):
        s.update([x, x])
    with pytest.raises(ValueError, match="count is 0"):
        Sum().mean()
    back = Sum.from_tensors(_sum(_data(2)).tensors())
    assert back.count == 4 and isinstance(back.count, int)


def _moments(xs: Sequence[torch.Tensor]) -> Moments:
    m = Moments()
    for x in xs:
        m.update(x)
    return m


@pytest.mark.parametrize("cuts", [(0, 9), (1, 4), (4, 5), (8, 9), (3, 3)])
def test_moments_merge_equals_numpy_over_the_concatenation(cuts: tuple[int, int]) -> None:
    xs = _data()
    i, j = cuts
    parts = [_moments(xs[:i]), _moments(xs[i:j]), _moments(xs[j:])]  # some parts empty
    merged = parts[0].merge(parts[1]).merge(parts[2])
    other = parts[0].merge(parts[1].merge(parts[2]))
    ref = np.stack([x.numpy() for x in xs])
    for m in (merged, other):
        assert m.count == len(xs)
        np.testing.assert_allclose(m.mean.numpy(), ref.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.var().numpy(), ref.var(0, ddof=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.std(0).numpy(), ref.std(0), rtol=1e-12, atol=1e-12)


def test_moments_of_one_observation_have_zero_spread_and_empty_is_the_identity() -> None:
    x = _data(1)[0]
    one = _moments([x])
    assert torch.equal(one.std(), torch.zeros_like(x)) and torch.equal(one.mean, x)
    assert Moments().merge(one).count == 1 and torch.equal(one.merge(Moments()).mean, x)
    with pytest.raises(ValueError, match="no observation"):
        _ = Moments().mean


def test_all_reduce_over_two_simulated_ranks_equals_the_merge() -> None:
    xs = _data()
    shards = [xs[:4], xs[4:]]

    def job(shard: list[torch.Tensor]) -> Callable[[Reduce], Joint]:
        return lambda reduce: Joint(_sum(shard, scale=0.5), _moments(shard)).reduce(reduce)

    ranks = run_ranks([job(s) for s in shards])
    merged = Joint(_sum(shards[0], 0.5), _moments(shards[0])).merge(
        Joint(_sum(shards[1], 0.5), _moments(shards[1]))
    )
    ref = np.stack([x.numpy() for x in xs])
    for got in ranks:
        s, m = got.parts
        assert s.count == merged.parts[0].count and m.count == len(xs)
        for x, y in zip(s.result(), merged.parts[0].result(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(m.mean.numpy(), ref.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.var().numpy(), ref.var(0, ddof=1), rtol=1e-12, atol=1e-12)
    # the ranks agree exactly: an all-reduce leaves the same tensors everywhere
    assert all(
        torch.equal(a, b)
        for a, b in zip(ranks[0].parts[1].tensors(), ranks[1].parts[1].tensors(), strict=True)
    )
