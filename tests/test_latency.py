"""Latency-aware pruning (``fxprune.passes.latency``): the probe's alignment, op tables and their cache,
the latency cost, selection under step-shaped costs, and ``compile(target_latency=...)``."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from conftest import assert_masked_equivalent, synthetic_probe
from fxprune.passes.cost import Cost
from fxprune.passes.latency import (
    CACHE_ENV,
    Alignment,
    LatencyCost,
    LatencyModel,
    OpSignature,
    Runtime,
    TableCache,
    alignment_from,
    build_latency_model,
    group_alignment,
    probe,
    probe_times,
    resolve_latency_target,
)
from torch import nn

import fxprune
from fxprune.data import ChannelGroup
from fxprune.errors import InputError, TargetError
from fxprune.select import select
from fxprune.verify import default_threads, ort_provider


def _times(align: int, block: int, slow: float) -> dict[str, dict[int, float]]:
    raw = synthetic_probe(align, block, slow)
    return {k: {int(c): v for c, v in t.items()} for k, t in raw.items()}


@pytest.mark.parametrize(("align", "block"), [(4, 16), (8, 8), (16, 16), (2, 8)])
def test_alignment_is_read_off_the_timings(align: int, block: int) -> None:
    a = alignment_from(_times(align, block, 3.0))
    assert (a.align, a.block) == (align, block)
    assert a.penalty["depthwise"] == pytest.approx(3.0, rel=0.2)


def test_one_noisy_count_does_not_change_the_alignment() -> None:
    times = _times(4, 16, 3.0)
    times["conv"][64] *= 2.0  # interference on one aligned count
    assert alignment_from(times).align == 4


def test_smooth_timings_have_no_alignment() -> None:
    times = {k: {c: 0.01 * c for c in range(40, 89)} for k in ("depthwise", "conv")}
    a = alignment_from(times)
    assert (a.align, a.block) == (1, 1)
    assert a.penalty["conv"] == 1.0


def test_real_probe_is_sane(tmp_path: os.PathLike[str]) -> None:
    """The probe measured on this machine: a power-of-two alignment, a block that is a multiple of it, and
    misaligned counts no faster than aligned ones."""
    runtime = Runtime("cpu", 1)
    times = probe_times(runtime, passes=1)
    assert set(times) == {"depthwise", "conv"} and all(len(t) == 49 for t in times.values())
    a = alignment_from(times)
    assert a.align in (1, 2, 4, 8, 16, 32) and a.block % a.align == 0
    assert min(a.penalty.values()) >= 1.0


def test_probe_is_measured_once_and_cached(tmp_path: os.PathLike[str]) -> None:
    runtime = Runtime("cpu", 3)
    cache = TableCache(runtime, directory=tmp_path)  # type: ignore[arg-type]
    cache.data["probe"] = synthetic_probe(8, 32)
    cache.save()
    again = TableCache(runtime, directory=tmp_path)  # type: ignore[arg-type]
    assert probe(runtime, again) == alignment_from(_times(8, 32, 3.0))
    other = TableCache(Runtime("cpu", 4), directory=tmp_path)  # type: ignore[arg-type]
    assert "probe" not in other.data  # another thread count is another fingerprint


def test_cache_merges_concurrent_writers(tmp_path: os.PathLike[str]) -> None:
    runtime = Runtime("cpu", 1)
    a = TableCache(runtime, directory=tmp_path)  # type: ignore[arg-type]
    b = TableCache(runtime, directory=tmp_path)  # type: ignore[arg-type]
    a.data["ops"]["x"] = [[1, 1, 0.5]]
    a.save()
    b.data["ops"]["y"] = [[2, 2, 0.7]]
    b.save()
    assert set(TableCache(runtime, directory=tmp_path).data["ops"]) == {"x", "y"}  # type: ignore[arg-type]


def test_target_forms() -> None:
    assert resolve_latency_target(0.5, 10.0) == 5.0
    assert resolve_latency_target("3.5ms", 10.0) == 3.5
    assert resolve_latency_target(" 2 MS", None) == 2.0
    for bad in (0, 1.5, -0.2, float("nan"), "fast", "-1ms", True):
        with pytest.raises(TargetError, match="target_latency"):
            resolve_latency_target(bad, 10.0)  # type: ignore[arg-type]


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ort_provider(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    cuda, cpu = Runtime("cuda", 1).fingerprint, Runtime("cpu", 1).fingerprint
    assert "cuda" in cuda and "Fake GPU" in cuda and "Fake GPU" not in cpu  # tables never shared across them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ort_provider(None) == "cpu"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        ort_provider("cuda")
    with pytest.raises(InputError, match="provider='tpu'"):
        ort_provider("tpu")


def test_group_alignment_respects_repeats() -> None:
    from fxprune.data import Site

    def group(gid: int, size: int, repeat: int) -> ChannelGroup:
        return ChannelGroup(gid, size, (Site("w", 0, 0, repeat, "out", "n"),), ("n",))

    steps = group_alignment(
        [group(0, 64, 1), group(1, 12, 2), group(2, 4, 1), group(3, 8, 64)], Alignment(4, 16)
    )
    assert steps == {0: 4, 1: 2, 2: 1, 3: 1}
    coarse = group_alignment(
        [group(0, 64, 1), group(1, 40, 1), group(2, 12, 2), group(3, 8, 64)], Alignment(4, 16), blocks=True
    )
    assert coarse == {0: 16, 1: 4, 2: 2, 3: 1}  # 40 channels hold fewer than 3 blocks: the alignment


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.b = nn.Conv2d(32, 48, 1)
        self.c = nn.Conv2d(48, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.fc(x.mean((2, 3)))


def _block_timer(sig: OpSignature, cin: int, cout: int, runtime: Runtime) -> float:
    """A synthetic runtime: time grows with 16-channel blocks of the counts."""
    k = math.prod(sig.kernel) if sig.kernel else 1
    return 0.01 + 1e-3 * k * math.ceil(cin / 16) * math.ceil(cout / 16) * (1 if sig.groups == 1 else 0.1)


def _analysed(model: nn.Module, x: torch.Tensor) -> tuple[object, list[ChannelGroup], object]:
    from fxprune.stages import ANALYSE, CompileOptions, CompileState
    from fxprune.stages import Cost as CostStage

    state = ANALYSE.run(CompileState(model=model, example_input=x, options=CompileOptions(target_flops=0.5)))
    CostStage().run(state)
    return state.gm, list(state.dep.groups), state.cost


def _synthetic_model(tmp_path: os.PathLike[str], full_ms: float) -> tuple[LatencyModel, list[ChannelGroup]]:
    """``Net``'s latency model from ``_block_timer``'s tables and the synthetic probe, the whole original
    measured at ``full_ms``."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    gm, groups, flops = _analysed(Net().eval(), x)
    cache = TableCache(Runtime("cpu", 1), directory=tmp_path)  # type: ignore[arg-type]
    cache.data["probe"] = synthetic_probe()
    model = build_latency_model(gm, groups, flops, (x,), Runtime("cpu", 1), measure_model=lambda: full_ms,  # type: ignore[arg-type]
                                cache=cache, time_op=_block_timer)  # fmt: skip
    return model, groups


def test_latency_cost_is_a_cost_and_steps_are_exact(tmp_path: os.PathLike[str]) -> None:
    model, groups = _synthetic_model(tmp_path, 1.0)
    cost = LatencyCost(model)
    assert isinstance(cost, Cost)
    assert {op.node for op in model.ops} == {"a", "dw", "b", "c", "fc"}
    assert cost.at(cost.group_sizes) == pytest.approx(1.0)  # calibrated to the measured whole
    # the fitted tables reproduce a block-bilinear timer exactly
    for op in model.ops:
        ci, co = op.counts(op.sizes0)
        assert op.ms(ci, co) == pytest.approx(_block_timer(op.signature, ci, co, model.runtime), rel=1e-6)
    sizes = dict(cost.group_sizes)
    for g in (g for g in groups if g.prunable):
        ladder = np.arange(g.size, 0, -4)
        saved = cost.step_savings(g.id, ladder, sizes)
        expected = []
        for hi, lo in zip(ladder[:-1], ladder[1:], strict=True):
            expected.append(cost.at({**sizes, g.id: int(hi)}) - cost.at({**sizes, g.id: int(lo)}))
        np.testing.assert_allclose(saved, expected, rtol=1e-9, atol=1e-12)
        others = cost.interactions()[g.id]
        assert g.id in others


class _Steps:
    """A step-shaped cost: group 0 saves 1.0 only when its count crosses a multiple of 4; group 1 saves
    0.25 per channel."""

    unit = "ms"
    group_sizes: Mapping[int, int] = {0: 16, 1: 16}

    @property
    def total(self) -> float:
        return self.at(self.group_sizes)

    def at(self, sizes: Mapping[int, int]) -> float:
        return math.ceil(sizes[0] / 4) * 1.0 + sizes[1] * 0.25

    def step_savings(self, group: int, ladder: np.ndarray, sizes: Mapping[int, int]) -> np.ndarray:
        vals = [self.at({**sizes, group: int(k)}) for k in ladder]
        return np.asarray(vals[:-1]) - np.asarray(vals[1:])

    def interactions(self) -> dict[int, frozenset[int]]:
        return {0: frozenset({0}), 1: frozenset({1})}


def test_select_reaches_savings_behind_steps_that_save_nothing() -> None:
    groups = [ChannelGroup(0, 16, (), ("a",)), ChannelGroup(1, 16, (), ("b",))]
    # group 0's channels are cheap (score 0.1 each), group 1's dear (1.0): removing 4 of group 0 saves 1.0 for
    # 0.4 of score, 4 of group 1 saves 1.0 for 4.0 of score. The first 3 steps of group 0 save nothing.
    scores = {0: np.full(16, 0.1), 1: np.full(16, 1.0)}
    cost = _Steps()
    chosen = select(groups, scores, cost, cost.total - 2.0)
    assert len(chosen.kept[0]) == 8 and 1 not in chosen.kept


def test_compile_under_a_latency_target() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fxprune.compile(model, x, target_latency=0.6, latency_threads=1, progress=False, latency_runs=0)
    assert r.target_flops is None and r.latency_model is not None and r.target_latency_ms is not None
    assert r.target_latency_ms == pytest.approx(0.6 * r.latency_model.full_ms)
    assert r.predicted_latency_ms is not None and r.predicted_latency_ms <= r.target_latency_ms * (1 + 1e-9)
    assert r.plan.kept, "nothing was pruned"
    assert_masked_equivalent(model, r, x)
    assert "latency target" in r.report
    # a second compile of the same model reuses every table: the cache file is not written again
    path = TableCache(Runtime("cpu", 1)).path
    before = (path.stat().st_mtime_ns, path.read_bytes())
    r2 = fxprune.compile(model, x, target_latency=0.6, latency_threads=1, progress=False, latency_runs=0)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert r2.latency_model is not None and len(r2.latency_model.ops) == len(r.latency_model.ops)


def test_default_counts_are_aligned_and_round_to_overrides() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 16, 16)
    r = fxprune.compile(model, x, 0.5, progress=False, latency_runs=0)  # the session's probe: alignment 4
    steps = group_alignment(r.groups, alignment_from(_times(4, 16, 3.0)), blocks=True)
    assert r.plan.kept
    for gid, kept in r.plan.kept.items():
        assert len(kept) % steps[gid] == 0, (gid, len(kept))
    free = fxprune.compile(model, x, 0.5, progress=False, latency_runs=0, round_to=1)
    assert any(len(k) % 4 for k in free.plan.kept.values())  # any count: some group lands off the grid


def test_aligned_counts_fall_back_when_the_target_needs_any_count() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="hardware-aligned"):
        r = fxprune.compile(Tiny().eval(), torch.randn(1, 3, 8, 8), 0.3, progress=False, latency_runs=0)
    assert r.flops_after <= 0.3 * r.flops_before


def test_target_arguments_are_checked_before_work() -> None:
    model, x = Net().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TargetError, match="exactly one"):
        fxprune.compile(model, x)
    with pytest.raises(TargetError, match="exactly one"):
        fxprune.compile(model, x, 0.5, target_latency=0.5)
    with pytest.raises(TargetError, match="'3.5ms'"):
        fxprune.compile(model, x, target_latency=3.5)
    with pytest.raises(InputError, match="latency_threads"):
        fxprune.compile(model, x, target_latency=0.5, latency_threads=0)


def test_tests_never_touch_the_users_cache() -> None:
    assert os.environ[CACHE_ENV] and "fxprune-cache" in os.environ[CACHE_ENV]
    assert default_threads() >= 1


def test_refit_passes_through_the_measured_pruned_model(tmp_path: os.PathLike[str]) -> None:
    model, groups = _synthetic_model(tmp_path, 2.0)
    full = {g.id: g.size for g in groups}
    half = {g.id: (g.size // 2 if g.prunable else g.size) for g in groups}
    quarter = {g.id: (g.size // 4 if g.prunable else g.size) for g in groups}
    proportional = model.predict_ms(half) / 2.0
    fitted = model.refit(half, 0.7)
    assert fitted.predict_ms(half) == pytest.approx(0.7 * 2.0)
    assert fitted.predict_ms(full) == pytest.approx(2.0)
    assert proportional != pytest.approx(0.7)  # the refit changed the prediction
    # piecewise linear in the tables' sum: on the line through both measured models above the pruned one,
    # proportional to the tables below it
    three = {g.id: (3 * g.size // 4 if g.prunable else g.size) for g in groups}
    s_full, s_half, s_q, s_3 = (model.tables_ms(z) for z in (full, half, quarter, three))
    assert fitted.predict_ms(three) == pytest.approx(2.0 - (2.0 - 1.4) * (s_full - s_3) / (s_full - s_half))
    assert fitted.predict_ms(quarter) == pytest.approx(1.4 * s_q / s_half)
    assert fitted.cost().at(quarter) == pytest.approx(fitted.predict_ms(quarter))
    for useless in (1.0, 1.3, 0.0):  # pruning made it no faster: no slope to read, the model is kept
        assert model.refit(half, useless) is model
    assert model.refit(full, 0.5) is model  # nothing pruned


def test_a_latency_floor_is_searched_not_read_at_the_smallest_sizes() -> None:
    """A measured cost need not be least at the smallest counts (an unaligned count can be slower than a
    larger aligned one): the target is judged by what the search reaches."""

    class Penalised(_Steps):
        group_sizes: Mapping[int, int] = {0: 16}

        def at(self, sizes: Mapping[int, int]) -> float:
            k = sizes[0]
            return float(k) if k >= 8 else 100.0  # below 8 channels the slow path

        def interactions(self) -> dict[int, frozenset[int]]:
            return {0: frozenset({0})}

    groups, scores, cost = [ChannelGroup(0, 16, (), ("a",))], {0: np.arange(16.0)}, Penalised()
    chosen = select(groups, scores, cost, 9.0)
    assert len(chosen.kept[0]) in (8, 9) and chosen.predicted_flops <= 9.0
    with pytest.raises(TargetError, match=r"ms is unreachable .* found costs 8 ms \(0\.500\)"):
        select(groups, scores, cost, 5.0)
