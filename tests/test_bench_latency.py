"""bench/latency.py and bench/latency_quality.py: the pure parts (timing rounds, acceptance, interpolation)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import load_bench

import fxprune.verify


class _Session:
    """An ONNX Runtime session stand-in that logs its runs."""

    def __init__(self, i: int, log: list[int]) -> None:
        self.i, self.log = i, log

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="x")]

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert set(feeds) == {"x"}
        self.log.append(self.i)
        return [feeds["x"]]


def test_interleaved_own_loop_rotates_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    lat = load_bench("latency")
    monkeypatch.delattr(fxprune.verify, "time_interleaved", raising=False)
    log: list[int] = []
    sessions = [_Session(i, log) for i in range(3)]
    times, timer = lat.interleaved(sessions, (torch.zeros(1),), warmup=2, min_runs=4, seconds=0.0)
    assert timer == "bench/latency.py"
    assert times.shape == (4, 3) and (times >= 0).all()
    rounds = [log[k : k + 3] for k in range(0, len(log), 3)]
    assert len(rounds) == 2 + 4  # warm-up rounds, then the timed ones
    assert all(sorted(r) == [0, 1, 2] for r in rounds)  # every session once per round
    assert [r[0] for r in rounds] == [0, 1, 2, 0, 1, 2]  # rotated by one each round


def test_interleaved_uses_fxprune_timer_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    lat = load_bench("latency")
    seen: dict[str, Any] = {}

    def fake(sessions: Any, example: Any, **kw: Any) -> list[list[float]]:
        seen.update(kw)
        return [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]  # times[session][round]

    monkeypatch.setattr(fxprune.verify, "time_interleaved", fake, raising=False)
    times, timer = lat.interleaved([object()] * 3, (), warmup=1, min_runs=2, max_runs=9, seconds=0.5)
    assert timer == "fxprune.verify.time_interleaved"
    assert times.tolist() == [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]  # rounds x sessions
    assert seen == {"warmup": 1, "min_runs": 2, "max_runs": 9, "max_seconds": 0.5}


def _row(
    ratio_a: float | None,
    flops_a: float,
    ratio_b: float | None,
    err: float | None,
    first: float | None,
    second: float | None,
) -> dict[str, dict[str, Any]]:
    a: dict[str, Any] = {"flops_ratio": flops_a, "table_seconds": 1e9}  # the probe: not an acceptance
    b: dict[str, Any] = {
        "predicted_ratio_error": err,
        "prediction_error": 0.5,
        "table_seconds": first,
        "again": {"table_seconds": second},
    }  # fmt: skip (the ratio error decides)
    if ratio_a is not None:
        a["latency_ratio"] = {"median": ratio_a}
    if ratio_b is not None:
        b["latency_ratio"] = {"median": ratio_b}
    return {"flops": a, "latency": b, "tp": {}}


def test_acceptance_bounds() -> None:
    lat = load_bench("latency")
    ok = lat.acceptance(_row(0.54, 0.5, 0.45, -0.099, 59.0, 5.0))
    assert ok == {
        "flops_latency_within_1.10": True,
        "latency_in_band": True,
        "prediction_within_10pct": True,
        "first_tables_le_60s": True,
        "second_tables_le_5s": True,
    }
    bad = lat.acceptance(_row(0.56, 0.5, 0.56, 0.11, 61.0, 5.1))
    assert not any(bad.values())
    assert lat.acceptance(_row(0.5, 0.5, 0.44, None, None, None)) == {
        "flops_latency_within_1.10": True,
        "latency_in_band": False,
        "prediction_within_10pct": None,
        "first_tables_le_60s": None,
        "second_tables_le_5s": None,
    }
    assert set(lat.acceptance(_row(None, 0.5, None, None, None, None)).values()) == {None}


def test_interpolate_brackets_on_the_latency_axis() -> None:
    q = load_bench("latency_quality")
    points = [(0.9, 1), (0.5, 2), (0.7, 3)]  # unsorted (latency ratio, index)
    assert q.interpolate(points, 0.6) == pytest.approx((2, 3, 0.5))
    i, j, w = q.interpolate(points, 0.85)
    assert (i, j) == (3, 1) and w == pytest.approx(0.75)
    assert q.interpolate(points, 0.5) == (2, 3, 0.0)
    assert q.interpolate(points, 0.95) is None and q.interpolate(points, 0.4) is None


def test_paired_bootstrap_difference_and_interval() -> None:
    q = load_bench("latency_quality")
    rng = np.random.default_rng(1)
    ours = rng.random(400) < 0.8
    mix = np.where(rng.random(400) < 0.7, 1.0, 0.0) * 0.5 + 0.25
    got = q.paired_bootstrap(ours, mix)
    d = ours.mean() - mix.mean()
    assert got["difference"] == pytest.approx(d)
    lo, hi = got["ci"]
    assert lo < d < hi and hi - lo < 0.2
    same = q.paired_bootstrap(ours, ours.astype(float))
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["share_above"] == 0.0
