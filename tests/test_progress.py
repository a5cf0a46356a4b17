"""Progress on stderr (issue 12): a tqdm bar for a person at a terminal, plain lines in a log or a pipe,
nothing with ``progress=False``. Under pytest's capture stderr is not a terminal, as in CI."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
from fxprune.models_zoo.toy import ResidualNet
from fxprune.passes import masking
from fxprune.passes.masking import StepLines, progress

import fxprune

LINE = re.compile(r"^fxprune: (?P<desc>.+) (?P<k>\d+)/(?P<n>\d+)(?:, (?P<note>.+))? \((?P<s>\d+\.\d) s\)$")


def _lines(err: str) -> list[re.Match[str]]:
    """The progress lines in ``err`` (a warning logged in between is not one)."""
    return [m for m in map(LINE.match, err.splitlines()) if m is not None]


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(n)
    ]


@pytest.fixture
def every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """No throttling: a line after every step."""
    monkeypatch.setattr(masking, "LINE_INTERVAL_S", 0.0)


def test_a_line_per_step_when_stderr_is_not_a_terminal(
    every_step: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not sys.stderr.isatty() and not masking.interactive()
    assert list(progress(range(4), True, "taylor: gradient")) == [0, 1, 2, 3]
    lines = _lines(capsys.readouterr().err)
    assert [(m["desc"], m["k"], m["n"]) for m in lines] == [
        ("taylor: gradient", str(k), "4") for k in (1, 2, 3, 4)
    ]
    steps = StepLines("train: epoch", 2)
    steps.step("loss 0.5000")
    steps.step("loss 0.2500")
    assert [m["note"] for m in _lines(capsys.readouterr().err)] == ["loss 0.5000", "loss 0.2500"]


def test_nothing_when_progress_is_off(every_step: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(4), False, "taylor: gradient")) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_a_fast_loop_is_throttled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """5,000 steps of 10 ms (a fake clock): the first, the last, and about one line per LINE_INTERVAL_S."""
    clock: Iterator[float] = (0.01 * i for i in range(10**6))
    monkeypatch.setattr(masking, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    list(progress(range(5000), True, "probes"))
    lines = _lines(capsys.readouterr().err)
    assert (lines[0]["k"], lines[-1]["k"]) == ("1", "5000")
    assert 10 <= len(lines) <= 13, [m[0] for m in lines]  # 50 s of steps / 5 s, plus first and last
    times = [float(m["s"]) for m in lines]
    assert all(b - a >= masking.LINE_INTERVAL_S - 0.1 for a, b in zip(times[1:-2], times[2:-1], strict=True))


def test_a_bar_not_lines_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(masking, "interactive", lambda: True)
    assert list(progress(range(3), True, "fisher")) == [0, 1, 2]
    assert "fxprune:" not in capsys.readouterr().err  # tqdm's bar (erased at the end), no log lines


def test_compile_prints_score_lines_and_respects_progress_false(
    every_step: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model, x = ResidualNet().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = {"score": "taylor", "data": _data(), "compensate": "none", "verify": False}
    fxprune.compile(model, x, 0.5, **kw)
    lines = _lines(capsys.readouterr().err)
    assert [m["k"] for m in lines if m["desc"] == "taylor: gradient"] == ["1", "2", "3"]
    fxprune.compile(model, x, 0.5, progress=False, **kw)
    assert _lines(capsys.readouterr().err) == []


@pytest.mark.parametrize("method", ["lsq", "lsq_independent"])
def test_compensation_prints_lines_when_asked(
    every_step: None, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    """lsq_independent reads the batches in one pass (a line per batch), then refits each consumer; lsq
    walks all batches at once, a line per consumer refitted."""
    model, x = ResidualNet().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = {"score": "magnitude", "data": _data(), "compensate": method, "verify": False}
    fxprune.compile(model, x, 0.5, progress=False, **kw)
    assert _lines(capsys.readouterr().err) == []  # progress=False: silent
    r = fxprune.compile(model, x, 0.5, progress=True, **kw)
    lines = _lines(capsys.readouterr().err)
    batches = [m["k"] for m in lines if m["desc"] == f"compensate {method}: batch"]
    assert batches == (["1", "2", "3"] if method == "lsq_independent" else [])
    consumers = [m for m in lines if m["desc"] == f"compensate {method}: consumer"]
    assert consumers and consumers[-1]["k"] == consumers[-1]["n"]
    assert r.compensation is not None and r.compensation.overrides
