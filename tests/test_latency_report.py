"""Latency reporting (issue 14): interleaved timing, its stopping rules, the paired ratio, the provider
choice, and what compile, the report and the CLI show. Timing runs on fake sessions and a fake clock, so
every assertion is exact; the real-model tests check structure (threads, run counts), never speed."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import fxprune
import fxprune.verify as verify
from fxprune.cli import main
from fxprune.errors import InputError
from fxprune.verify import (
    LatencyReport,
    LatencyStats,
    latency_report,
    median_ci,
    ort_provider,
    ort_session,
    time_interleaved,
    verify_onnx,
)

X = torch.randn(1, 3, 8, 8)


class FakeClock:
    """Seconds that pass only when a fake session runs."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeSession:
    """An ONNX Runtime session stand-in: its ``i``-th run advances ``clock`` by ``cost(i)`` ms and logs."""

    def __init__(self, name: str, clock: FakeClock, log: list[str], cost: Callable[[int], float]) -> None:
        self.name, self.clock, self.log, self.cost = name, clock, log, cost
        self.calls = 0
        self.fed: list[dict[str, np.ndarray]] = []

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name=f"{self.name}_in")]

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert outputs is None
        self.fed.append(feeds)
        self.log.append(self.name)
        self.clock.t += self.cost(self.calls) / 1e3
        self.calls += 1
        return []


def _fakes(*costs: Callable[[int], float]) -> tuple[list[FakeSession], FakeClock, list[str]]:
    clock, log = FakeClock(), []
    return [FakeSession(chr(ord("a") + i), clock, log, c) for i, c in enumerate(costs)], clock, log


def test_rounds_rotate_the_order_and_warm_up_is_not_timed() -> None:
    sessions, clock, log = _fakes(lambda i: 1.0, lambda i: 2.0, lambda i: 3.0)
    times = time_interleaved(sessions, (X,), warmup=2, min_runs=4, max_runs=4, clock=clock)
    rounds = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]] * 2  # 2 warm-up + 4 timed
    assert [s.calls for s in sessions] == [6, 6, 6]
    assert [len(t) for t in times] == [4, 4, 4]
    for s, ts in zip(sessions, times, strict=True):  # feeds: the example as numpy, under the session's name
        assert all(
            list(f) == [f"{s.name}_in"] and np.array_equal(f[f"{s.name}_in"], X.numpy()) for f in s.fed
        )
        assert ts == pytest.approx([s.cost(0)] * 4)


def test_slow_warm_up_runs_leave_no_trace_in_the_times() -> None:
    sessions, clock, _ = _fakes(lambda i: 500.0 if i < 3 else 1.0)
    (times,) = time_interleaved(sessions, (X,), warmup=3, min_runs=10, max_runs=10, clock=clock)
    assert times == pytest.approx([1.0] * 10)


def test_stable_medians_stop_at_min_runs() -> None:
    sessions, clock, _ = _fakes(lambda i: 1.0, lambda i: 2.0)  # no spread: stable from the first round
    times = time_interleaved(sessions, (X,), warmup=0, min_runs=7, max_runs=400, max_seconds=1e9, clock=clock)
    assert [len(t) for t in times] == [7, 7]


def test_noisy_medians_run_until_max_runs() -> None:
    sessions, clock, _ = _fakes(lambda i: 1.0 + 2.0 * (i % 2))  # 1, 3, 1, 3 ms: the median never settles
    (times,) = time_interleaved(
        sessions, (X,), warmup=0, min_runs=5, max_runs=60, max_seconds=1e9, clock=clock
    )
    assert len(times) == 60


def test_the_time_budget_stops_noisy_timing() -> None:
    sessions, clock, _ = _fakes(lambda i: 1.0 + 2.0 * (i % 2))
    # after 49 rounds 97 ms have passed, after 50 rounds 100 ms >= 99 ms
    (times,) = time_interleaved(sessions, (X,), warmup=0, min_runs=5, max_seconds=0.099, clock=clock)
    assert len(times) == 50
    # min_runs wins over the budget, max_runs below min_runs counts as min_runs
    sessions, clock, _ = _fakes(lambda i: 1.0 + 2.0 * (i % 2))
    (times,) = time_interleaved(sessions, (X,), min_runs=30, max_runs=3, max_seconds=0.0, clock=clock)
    assert len(times) == 30


def test_bad_timing_arguments() -> None:
    sessions, clock, _ = _fakes(lambda i: 1.0)
    for kwargs in ({"warmup": -1}, {"min_runs": 0}):
        with pytest.raises(InputError, match="min_runs"):
            time_interleaved(sessions, (X,), clock=clock, **kwargs)
    with pytest.raises(InputError, match="session"):
        time_interleaved([], (X,), clock=clock)


def test_paired_ratio_of_a_twice_slower_model_under_varying_load() -> None:
    """Load that changes from round to round (a factor 1-8, shared by both runs of a round) scales both
    runs alike: the paired ratio is 2 in every round, its quartiles too."""
    load = np.random.default_rng(0).uniform(1.0, 8.0, size=64)
    sessions, clock, _ = _fakes(lambda i: float(load[i]), lambda i: 2.0 * float(load[i]))
    times = time_interleaved(sessions, (X,), warmup=0, min_runs=64, max_runs=64, clock=clock)
    rep = latency_report(times, threads=3, provider="cpu", warmup=0)
    assert rep.ratio == pytest.approx(2.0) and rep.ratio_q1 == pytest.approx(2.0)
    assert rep.ratio_q3 == pytest.approx(2.0)
    assert rep.before is not None and rep.before.runs == rep.after.runs == 64
    assert rep.before.median_ms == pytest.approx(float(np.median(load)))
    assert rep.after.q1_ms == pytest.approx(2.0 * float(np.percentile(load, 25)))
    assert rep.after.iqr_ms == pytest.approx(2.0 * float(np.percentile(load, 75) - np.percentile(load, 25)))
    # the median of the per-round ratios (3, 1, 1), not the ratio of the medians (3 / 2)
    assert (
        latency_report([[1.0, 2.0, 10.0], [3.0, 2.0, 10.0]], threads=1, provider="cpu", warmup=0).ratio == 1.0
    )
    alone = latency_report(times[1:], threads=3, provider="cpu", warmup=0)
    assert alone.before is None and alone.ratio is None and alone.after == rep.after


def test_median_ci_covers_the_median_with_95_percent_probability() -> None:
    """Exact coverage of ``[x_(j), x_(k)]`` for a continuous distribution: P(j <= #samples below the
    median < k) for a Binomial(n, 1/2) count; from n = 6 on (the smallest n where 95 % is possible)."""
    for n in range(6, 401):
        lo, hi = median_ci([float(i) for i in range(1, n + 1)])
        j, k = int(lo), int(hi)
        coverage = sum(math.comb(n, i) for i in range(j, k)) / 2**n
        assert coverage >= 0.95, n
        assert k - j <= 1.96 * math.sqrt(n) + 3, n  # and no wider: it narrows like sqrt(n) / n
    assert median_ci([5.0, 1.0, 3.0]) == (1.0, 5.0)  # sorted first
    assert all(math.isnan(v) for v in median_ci([]))


def test_summary_line() -> None:
    rep = LatencyReport(
        LatencyStats(1.16, 1.12, 1.20, 60), LatencyStats(0.9, 0.88, 0.93, 60), 1, "cpu", 3, 0.78, 0.76, 0.80
    )
    assert rep.summary() == (
        "ORT (cpu, 1 thread): 1.16 ms [IQR 1.12-1.20] -> 0.90 ms [0.88-0.93], ratio 0.78 [0.76-0.80], "
        "60 interleaved runs"
    )
    rep = LatencyReport(None, LatencyStats(0.0123, 0.012, 0.013, 15), 4, "cuda", 3, None, None, None, 0.011)
    assert rep.summary() == "ORT (cuda, 4 threads): 0.012 ms [IQR 0.012-0.013], 15 runs; predicted 0.011 ms"
    with pytest.raises(InputError, match="at least one"):
        LatencyStats.of([])


@pytest.fixture
def fake_ort(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str], bool, list[str] | None], list[Any]]:
    """Set what ONNX Runtime offers, whether torch sees CUDA and, optionally, the providers a created
    session reports; returns the ``providers=`` of every ``InferenceSession`` created."""
    made: list[Any] = []

    def setup(available: list[str], cuda: bool, loaded: list[str] | None = None) -> list[Any]:
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        if loaded is not None:

            def session(blob: bytes, opts: Any, providers: list[str]) -> Any:
                made.append(providers)
                return SimpleNamespace(get_providers=lambda: list(loaded))

            monkeypatch.setattr(onnxruntime, "InferenceSession", session)
        return made

    return setup


CUDA_EP = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_provider_auto_picks_cuda_only_with_both_a_gpu_and_the_ep(fake_ort: Any) -> None:
    fake_ort(CUDA_EP, True)
    assert ort_provider(None) == "cuda" and ort_provider("cpu") == "cpu"
    fake_ort(CUDA_EP, False)
    assert ort_provider(None) == "cpu" and ort_provider("cuda") == "cuda"  # explicit: the EP suffices
    fake_ort(["CPUExecutionProvider"], True)
    assert ort_provider(None) == "cpu"


def test_explicit_cuda_without_the_ep_is_an_input_error(fake_ort: Any) -> None:
    fake_ort(["AzureExecutionProvider", "CPUExecutionProvider"], True)
    with pytest.raises(InputError, match=r"provider='cuda'.*onnxruntime-gpu.*provider='cpu'"):
        ort_provider("cuda")
    with pytest.raises(InputError, match="provider='gpu'"):
        ort_provider("gpu")
    with pytest.raises(InputError, match="provider='cuda'"):  # verify_onnx: before any work
        verify_onnx(nn.ReLU(), (X,), provider="cuda")


def test_session_on_cuda_asks_for_cuda_then_cpu(fake_ort: Any, caplog: pytest.LogCaptureFixture) -> None:
    made = fake_ort(CUDA_EP, True, CUDA_EP)
    assert verify.session_provider(ort_session(b"", provider=None)) == "cuda"
    assert made == [CUDA_EP]
    made = fake_ort(CUDA_EP, True, ["CPUExecutionProvider"])  # the EP failed to load: ORT fell back
    with pytest.raises(InputError, match="could not load its CUDA provider"):
        ort_session(b"", provider="cuda")
    with caplog.at_level("WARNING", logger="fxprune.verify"):
        assert verify.session_provider(ort_session(b"", provider=None)) == "cpu"
    assert "runs on the CPU" in caplog.text
    made = fake_ort(CUDA_EP, True, ["CPUExecutionProvider"])
    ort_session(b"", provider="cpu")
    assert made[-1] == ["CPUExecutionProvider"]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def test_verify_onnx_times_both_models_interleaved_with_the_threads_asked_for() -> None:
    model = _net()
    v = verify_onnx(model, (X,), model, latency_runs=5, latency_threads=1, provider="cpu")
    lat = v.latency
    assert v.passed and lat is not None and lat.before is not None
    assert lat.threads == 1 and lat.provider == "cpu" and lat.warmup == 3
    assert lat.after.runs == lat.before.runs >= 5
    assert lat.ratio is not None and lat.ratio_q1 is not None and lat.ratio_q3 is not None
    assert lat.ratio_q1 <= lat.ratio <= lat.ratio_q3
    assert (v.ort_ms_before, v.ort_ms_after) == (lat.before.median_ms, lat.after.median_ms)
    v = verify_onnx(model, (X,), model, latency_runs=5, provider="cpu")
    assert v.latency is not None and v.latency.threads == verify.default_threads()
    v = verify_onnx(model, (X,), model, latency_runs=0)
    assert v.latency is None and v.ort_ms_after is None
    for bad in (0, -2):
        with pytest.raises(InputError, match="latency_threads"):
            verify_onnx(model, (X,), model, latency_threads=bad)
    with pytest.raises(InputError, match="latency_runs"):
        verify_onnx(model, (X,), model, latency_runs=-1)


def test_an_original_that_does_not_export_leaves_the_pruned_one_timed_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no exporter for this op")

    monkeypatch.setattr(verify, "export_onnx", broken)
    gm = torch.fx.symbolic_trace(_net())  # fxprune's writer exports the pruned one; the original breaks
    v = verify_onnx(gm, (X,), _net(), latency_runs=4, latency_threads=1, provider="cpu")
    assert v.latency is not None and v.latency.before is None and v.latency.ratio is None
    assert v.latency.after.runs >= 4 and v.ort_ms_before is None
    assert "runs;" not in v.latency.summary() and v.latency.summary().endswith(f"{v.latency.after.runs} runs")


def test_compile_report_shows_the_spread_and_the_threads() -> None:
    r = fxprune.compile(_net(), X, 0.6, score="magnitude", progress=False, latency_runs=5, latency_threads=1)
    assert r.verification is not None and r.verification.latency is not None
    assert r.verification.latency.threads == 1 and r.verification.latency.after.runs >= 5
    line = next(ln for ln in r.report.splitlines() if ln.startswith("latency"))
    assert "IQR" in line and "1 thread" in line and line == "latency " + r.verification.latency.summary()


TINY = """
import torch, torch.nn as nn

def with_example():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, 2, 1))
    return model, torch.randn(1, 3, 16, 16)
"""


def test_cli_reports_latency_spread_threads_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "tiny.py"
    spec.write_text(textwrap.dedent(TINY))
    out = tmp_path / "out"
    code = main(["compile", f"{spec}:with_example", "--target-flops", "0.6", "--out", str(out),
                 "--score", "magnitude", "--latency-runs", "4", "--latency-threads", "1"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    lat = rep["latency"]
    assert set(lat) == {"before", "after", "threads", "provider", "warmup", "ratio", "ratio_q1", "ratio_q3",
                        "predicted_ms"}  # fmt: skip
    assert lat["threads"] == 1 and lat["provider"] in ("cpu", "cuda") and lat["predicted_ms"] is None
    for side in ("before", "after"):
        assert set(lat[side]) == {"median_ms", "q1_ms", "q3_ms", "runs"} and lat[side]["runs"] >= 4
        assert lat[side]["q1_ms"] <= lat[side]["median_ms"] <= lat[side]["q3_ms"]
    assert (
        rep["ort_ms_before"] == lat["before"]["median_ms"]
        and rep["ort_ms_after"] == lat["after"]["median_ms"]
    )
    row = next(ln for ln in stdout.splitlines() if ln.startswith("ORT latency"))
    assert "1 thread)" in row and row.count("[") == 3  # before, after and the ratio with their quartiles
    assert "IQR" in (out / "report.md").read_text()
    assert main(["compile", f"{spec}:with_example", "--target-flops", "0.6", "--out", str(out),
                 "--latency-threads", "0"]) == 2  # fmt: skip
