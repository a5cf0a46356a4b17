"""The stage pipeline (fxprune.pipeline, fxprune.stages): declarations checked when built and when run,
every stage timed, errors naming the stage, and compile/inspect/apply_plan as configurations of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_masked_equivalent, randomize_norms
from fxprune.models_zoo.toy import ResidualNet

import fxprune
from fxprune.data import META_PREFIX, META_VALUE
from fxprune.deploy import APPLY_PLAN
from fxprune.pipeline import UNSET, PipelineState
from fxprune.stages import Select

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
FAST: dict[str, Any] = {"score": "magnitude", "latency_runs": 0, "progress": False}


def residual() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ResidualNet()).eval()


def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]


class Toy(PipelineState):
    pass


class Stage(fxprune.Stage[Any]):
    """A stage declared at construction (for tests of the runner)."""

    def __init__(self, name: str, requires: tuple[str, ...], provides: tuple[str, ...], fn: Any = None):
        self.name, self.requires, self.provides, self.fn = name, requires, provides, fn  # type: ignore[misc]

    def run(self, state: Any) -> None:
        if self.fn is not None:
            self.fn(state)


# ----------------------------------------------------------------------------- the runner
def test_a_stage_requiring_what_no_earlier_stage_provides_is_refused_when_built() -> None:
    with pytest.raises(fxprune.PipelineError, match=r"stage 'score' requires dep.*stages before it: trace"):
        fxprune.Pipeline(
            [Stage("trace", ("model",), ("gm",)), Stage("score", ("gm", "dep"), ("s",))], ["model"]
        )
    with pytest.raises(fxprune.PipelineError, match="two stages are named 'trace'"):
        fxprune.Pipeline([Stage("trace", (), ()), Stage("trace", (), ())], [])
    with pytest.raises(fxprune.PipelineError, match=r"stage 'select' requires scores, which no earlier"):
        fxprune.COMPILE.without("score")
    with pytest.raises(fxprune.PipelineError, match=r"no stage 'nope' in this pipeline \(stages: prepare"):
        fxprune.COMPILE.replace("nope", Select())


def test_a_stage_that_does_not_provide_what_it_declares_is_refused_when_run() -> None:
    forgetful = fxprune.COMPILE.replace("select", Stage("select", Select.requires, Select.provides))
    with pytest.raises(
        fxprune.PipelineError, match=r"stage 'select' \(Stage\) did not provide kept, indices, plan"
    ):
        fxprune.compile(residual(), X, 0.5, pipeline=forgetful, **FAST)


def test_check_reads_catches_a_stage_reading_an_undeclared_field() -> None:
    @dataclass_state
    class S(PipelineState):
        a: Any = UNSET
        b: Any = UNSET

    def sneaky(state: Any) -> None:
        state.b = state.a + 1

    ok = fxprune.Pipeline([Stage("one", ("a",), ("b",), sneaky)], ["a"])
    assert ok.run(S(a=1), check_reads=True).b == 2

    def reads_b(state: Any) -> None:
        state.a = 0 if state.b is None else 1

    bad = fxprune.Pipeline([Stage("one", (), ("a",), reads_b)], [])
    assert bad.run(S(b=None)).a == 0  # unchecked, the undeclared read goes unnoticed
    with pytest.raises(
        fxprune.PipelineError, match=r"stage 'one' \(Stage\) read 'b', which it does not declare"
    ):
        bad.run(S(b=None), check_reads=True)


def dataclass_state(cls: type) -> type:
    from dataclasses import dataclass

    return dataclass(cls)


@pytest.mark.parametrize("score, compensate", [("magnitude", "none"), ("fisher", "lsq"), ("taylor", "bias")])
def test_every_compile_stage_declares_what_it_reads(score: str, compensate: str) -> None:
    """Each stage runs on a state holding only the fields it declares; the result is the same as an
    unchecked compile's (same plan, same weights)."""
    options = fxprune.CompileOptions(
        target_flops=0.5,
        score=score,
        data=calibration(),
        compensate=compensate,
        latency_runs=0,
        progress=False,
    )
    checked = fxprune.COMPILE.run(
        fxprune.CompileState(model=residual(), example_input=X, options=options), check_reads=True
    ).result
    plain = fxprune.compile(residual(), X, 0.5, score=score, data=calibration(), compensate=compensate,
                            latency_runs=0, progress=False)  # fmt: skip
    assert checked.plan == plain.plan and checked.plan.kept
    for k, v in plain.graph_module.state_dict().items():
        assert torch.equal(checked.graph_module.state_dict()[k], v), k


def test_every_stage_is_timed_and_an_error_names_its_stage() -> None:
    r = fxprune.compile(residual(), X, 0.5, **FAST)
    assert tuple(r.timings) == tuple(r.cpu_timings) == fxprune.COMPILE.names
    assert fxprune.COMPILE.names == (
        "prepare", "options", "calibrate", "trace", "dependency", "cost", "latency", "score", "select",
        "refit", "compensate", "rewrite", "measure", "verify", "result",
    )  # fmt: skip
    with pytest.raises(fxprune.TargetError) as info:
        fxprune.compile(residual(), X, 1e-6, **FAST)
    assert info.value.__notes__ == [
        "fxprune pipeline: raised in stage 'select' (after prepare, options, calibrate, trace, dependency, "
        "cost, latency, score)"
    ]


# ----------------------------------------------------------------------------- configurations
def test_stop_after_select_gives_the_plan_without_rewriting() -> None:
    options = fxprune.CompileOptions(target_flops=0.5, score="magnitude", progress=False)
    state = fxprune.COMPILE.until("select").run(
        fxprune.CompileState(model=residual(), example_input=X, options=options)
    )
    assert state.plan == fxprune.compile(residual(), X, 0.5, **FAST).plan
    assert state.pruned is UNSET and "rewrite" not in state.timings


def test_a_replaced_selection_stage_decides_the_plan() -> None:
    """A selection that keeps the first half of every prunable group, swapped in for the global one."""

    class FirstHalf(Select):
        def run(self, state: fxprune.CompileState) -> None:
            super().run(state)  # the plan machinery; then overwrite the choice
            kept = {g.id: tuple(range(g.size // 2)) for g in state.dep.prunable if g.size >= 2}
            from fxprune.passes.plan import build_plan, param_indices

            state.kept, state.indices = kept, param_indices(state.dep.groups, kept)
            state.plan = build_plan(state.dep.groups, kept, state.indices)

    model = residual()
    r = fxprune.compile(model, X, 0.5, pipeline=fxprune.COMPILE.replace("select", FirstHalf()), **FAST)
    assert r.plan.kept and all(k == tuple(range(r.plan.group_sizes[g] // 2)) for g, k in r.plan.kept.items())
    assert r.verification is not None and r.verification.passed
    assert_masked_equivalent(model, r, X)


def test_inspect_dependency_graph_and_apply_plan_are_pipelines_of_the_same_stages() -> None:
    assert fxprune.ANALYSE.names == ("prepare", "trace", "dependency")
    assert APPLY_PLAN.names == (
        "prepare",
        "trace",
        "dependency",
        "plan",
        "rewrite",
        "measure",
        "check_outputs",
    )
    assert [type(s) for s in APPLY_PLAN.stages[:3]] == [type(s) for s in fxprune.ANALYSE.stages]
    assert [type(s) for s in APPLY_PLAN.stages[4:6]] == [
        type(fxprune.COMPILE.stages[fxprune.COMPILE.index(n)]) for n in ("rewrite", "measure")
    ]
    model = residual()
    dep = fxprune.dependency_graph(model, X)
    assert [g.size for g in dep.groups] == [g.size for g in fxprune.inspect(model, X).groups]
    r = fxprune.compile(model, X, 0.5, **FAST)
    again = fxprune.apply_plan(residual(), r.plan, X)
    assert again.code == r.graph_module.code
    assert torch.equal(again(X), r.graph_module(X))


def test_compile_refuses_a_pipeline_without_a_result() -> None:
    with pytest.raises(
        fxprune.InputError, match=r"pipeline= must be a fxprune.Pipeline that provides 'result'"
    ):
        fxprune.compile(residual(), X, 0.5, pipeline=fxprune.COMPILE.until("select"), **FAST)
    with pytest.raises(fxprune.InputError, match=r"got \['prepare'\]; build it from fxprune.COMPILE"):
        fxprune.compile(residual(), X, 0.5, pipeline=["prepare"], **FAST)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- metadata after the rewrite
def test_analysis_metadata_is_dropped_by_the_rewrite_and_not_saved(tmp_path: Path) -> None:
    model = residual()
    state = fxprune.COMPILE.run(
        fxprune.CompileState(
            model=model, example_input=X,
            options=fxprune.CompileOptions(target_flops=0.5, score="magnitude", latency_runs=0, progress=False),
        )
    )  # fmt: skip
    gm, pruned = state.gm, state.pruned
    assert any(k.startswith(META_PREFIX) and k != META_VALUE for n in gm.graph.nodes for k in n.meta)
    # only what measure wrote on the pruned graph itself: shapes (and FLOPs) of the pruned tensors
    keys = {k for n in pruned.graph.nodes for k in n.meta if k.startswith(META_PREFIX)}
    assert keys <= {META_VALUE, "fxprune.flops"}, keys
    assert not [k for k in pruned.meta if k.startswith(META_PREFIX)]
    modules = dict(pruned.named_modules())
    for n in pruned.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], torch.nn.Conv2d):
            assert n.meta[META_VALUE].shape[1] == modules[n.target].out_channels
    fxprune.save(state.result, tmp_path, onnx=False)
    loaded = torch.load(tmp_path / "graph_module.pt", weights_only=False)
    assert not [k for k in loaded.meta if k.startswith(META_PREFIX)]
    assert not [k for n in loaded.graph.nodes for k in n.meta if k.startswith(META_PREFIX)]
    np.testing.assert_array_equal(loaded(X).detach().numpy(), pruned(X).detach().numpy())


def test_warnings_point_at_the_users_call_however_deep_the_stage() -> None:
    """The training-mode warning (prepare stage) and the few-channel warning (select stage) are attributed
    to the line that called fxprune, not to fxprune's own frames."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.compile(residual().train(), X, 0.05, **FAST)
        fxprune.inspect(residual().train(), X)
    messages = {str(w.message).split(";")[0][:40]: w.filename for w in caught}
    assert any(m.startswith("model is in training mode") for m in messages), messages
    assert any(m.startswith("the target leaves") for m in messages), messages
    assert set(messages.values()) == {__file__}, messages
