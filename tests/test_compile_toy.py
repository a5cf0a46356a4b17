"""The central oracles on every models_zoo toy net (shared/DESIGN.md, "Verification")."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_masked_equivalent, assert_unchanged, randomize_norms, snapshot
from fxprune.models_zoo.toy import TOY_MODELS

import fxprune

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
@pytest.mark.parametrize("target", [0.7, 0.4])
def test_pruned_equals_masked_and_ort(name: str, target: float) -> None:
    model = randomize_norms(TOY_MODELS[name]()).eval()
    snap = snapshot(model)
    r = fxprune.compile(model, X, target, latency_runs=0, score="magnitude")
    assert_unchanged(model, snap)
    assert r.plan.removed_channels > 0
    assert r.flops_after <= target * r.flops_before * (1 + 1e-9)
    assert r.flops_after == pytest.approx(r.cost.flops(r.plan.kept_sizes()), rel=1e-9)
    assert r.params_after < r.params_before
    assert r.verification is not None and r.verification.passed, r.verification
    assert r.verification.max_rel_error <= 1e-4
    assert_masked_equivalent(model, r, X)


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_target_one_is_bit_identical(name: str) -> None:
    model = randomize_norms(TOY_MODELS[name]()).eval()
    r = fxprune.compile(model, X, 1.0, verify=False, score="magnitude")
    assert r.plan.removed_channels == 0 and r.flops_after == r.flops_before
    with torch.no_grad():
        assert torch.equal(r.graph_module(X), model(X))


def test_training_mode_model_is_compiled_in_eval_on_a_copy() -> None:
    model = randomize_norms(TOY_MODELS["residual"]()).train()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        r = fxprune.compile(model, X, 0.5, verify=False, score="magnitude")
    assert_unchanged(model, snap)
    assert model.training and not r.graph_module.training
    assert_masked_equivalent(model, r, X)


def test_absolute_target_and_rounding() -> None:
    model = TOY_MODELS["residual"]().eval()
    total = fxprune.count_flops(model, (X,))
    r = fxprune.compile(model, X, total // 2, round_to=4, verify=False, score="magnitude")
    assert r.flops_after <= total // 2
    assert r.plan.kept
    for gid, kept in r.plan.kept.items():
        assert len(kept) % 4 == 0, (gid, len(kept), r.plan.group_sizes[gid])


def test_report_lists_pinned_and_pruned() -> None:
    r = fxprune.compile(TOY_MODELS["concat"]().eval(), X, 0.5, latency_runs=2, score="magnitude")
    text = r.report
    assert "reaches the graph output" in text and "## pruned modules" in text and "PASS" in text
    assert "latency ORT" in text
    assert tuple(r.timings) == fxprune.STAGES == fxprune.COMPILE.names  # every stage, timed, in order
    assert all(t >= 0 for t in r.timings.values())


def test_dependency_graph_networkx() -> None:
    dep = fxprune.dependency_graph(TOY_MODELS["residual"]().eval(), X)
    g = dep.to_networkx()
    groups = [n for n, d in g.nodes(data=True) if d["kind"] == "group"]
    assert len(groups) == len(dep.groups)
    stream = next(grp for grp in dep.groups if any(s.param == "stem.0.weight" for s in grp.sites))
    assert {"stem.0.weight", "b1.1.weight", "b2.0.0.weight", "down.0.weight"} <= set(
        g.successors(f"group:{stream.id}")
    )
