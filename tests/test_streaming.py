"""Streaming calibration: a re-iterable ``data`` (a DataLoader) is read batch by batch on every pass and never
held whole; ``max_batches`` bounds every pass; the result equals the one from a list of the same batches."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import randomize_norms
from fxprune.models_zoo.toy import ResidualNet

import fxprune

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Loader:
    """A DataLoader-like re-iterable: makes each batch when asked (seeded by its index), and records how
    many of the batches it made are alive at once and how many it made in each pass."""

    def __init__(self, n: int, labelled: bool = True, bad: int | None = None) -> None:
        self.n, self.labelled, self.bad = n, labelled, bad
        self.alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self.most_alive = 0
        self.passes: list[int] = []

    def batch(self, i: int) -> Any:
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(8, 3, 16, 16, generator=g)
        if i == self.bad:
            x[0, 0, 0, 0] = float("nan")
        return (x, torch.randint(0, 10, (8,), generator=g)) if self.labelled else x

    def __iter__(self) -> Iterator[Any]:
        self.passes.append(0)
        for i in range(self.n):
            b = self.batch(i)
            self.alive.add(b[0] if self.labelled else b)
            self.most_alive = max(self.most_alive, len(self.alive))
            self.passes[-1] += 1
            yield b

    def __len__(self) -> int:
        return self.n


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ResidualNet()).eval()


@pytest.mark.parametrize(
    "score, comp, labelled",
    [("fisher", "lsq", True), ("influence", "newton", True), ("taylor", "bias", False)],
)
def test_batches_are_read_one_at_a_time_on_every_pass(score: str, comp: str, labelled: bool) -> None:
    loader = Loader(12, labelled)
    opts = {"probes": 2, "cg_iters": 2, "hessian_batches": None} if score == "influence" else {}
    r = fxprune.compile(model(), X, 0.5, score=score, data=loader, compensate=comp, progress=False,
                        latency_runs=0, **opts)  # fmt: skip
    assert r.plan.kept
    assert len(loader.passes) >= 2 and all(p in (1, 12) for p in loader.passes), loader.passes
    # the user's batches are dropped after use: at most the one in hand and one being made
    assert loader.most_alive <= 2, loader.most_alive


def test_a_stream_gives_the_result_of_a_list_of_the_same_batches() -> None:
    loader = Loader(6)
    listed = [loader.batch(i) for i in range(6)]
    a = fxprune.compile(model(), X, 0.5, score="fisher", data=Loader(6), progress=False, latency_runs=0)
    b = fxprune.compile(model(), X, 0.5, score="fisher", data=listed, progress=False, latency_runs=0)
    assert a.plan == b.plan and a.plan.kept
    assert b.compensation is not None and b.compensation.overrides  # the refit did something to compare
    for k, v in b.graph_module.state_dict().items():
        assert torch.equal(a.graph_module.state_dict()[k], v), k


def test_max_batches_bounds_every_pass_and_a_generator_still_works() -> None:
    loader = Loader(20)
    r = fxprune.compile(model(), X, 0.5, score="fisher", data=loader, max_batches=3, progress=False,
                        latency_runs=0)  # fmt: skip
    assert max(loader.passes) == 3 and r.plan.kept
    gen = (Loader(6).batch(i) for i in range(6))  # one-shot: held, as before
    g = fxprune.compile(model(), X, 0.5, score="fisher", data=gen, progress=False, latency_runs=0)
    listed = fxprune.compile(model(), X, 0.5, score="fisher", data=[Loader(6).batch(i) for i in range(6)],
                             progress=False, latency_runs=0)  # fmt: skip
    assert g.plan == listed.plan


def test_a_bad_batch_later_in_a_stream_is_an_input_error_naming_it() -> None:
    with pytest.raises(fxprune.InputError, match=r"data\[4\] inputs contains NaN or Inf"):
        fxprune.compile(
            model(), X, 0.5, score="fisher", data=Loader(6, bad=4), progress=False, latency_runs=0
        )


def test_counting_a_stream_copies_no_batch() -> None:
    """The sample count that fixes the scores' normalisers reads batch sizes only: no copy, no model run."""
    from fxprune.calib import Batches, batch_sizes

    def make(i: int, item: Any) -> Any:
        raise AssertionError("a batch was made to count samples")

    loader = Loader(5)
    stream = Batches(loader, make, 4, 1)
    assert list(batch_sizes(stream)) == [8, 8, 8, 8] and loader.passes == [4]
