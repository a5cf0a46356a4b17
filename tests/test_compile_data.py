"""compile with calibration data: scores, compensation (oracle extended to the folded shifts), bad data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_norms, snapshot
from fxprune.models_zoo.toy import ConcatNet, FlattenLinearNet, GroupedNet, ResidualNet
from fxprune.passes.score import GroupScore
from fxprune.passes.scores import SCORES, get_score

import fxprune
from fxprune.errors import InputError

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def labelled(n: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)
    ]


def model(cls: type[nn.Module] = ResidualNet) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(cls()).eval()


def oracle_error(m: nn.Module, r: fxprune.CompileResult, x: torch.Tensor) -> float:
    overrides = r.compensation.overrides if r.compensation else {}
    masked = fxprune.masked_model(m, r.plan, overrides)
    with torch.no_grad():
        return float((masked(x) - r.graph_module(x)).abs().max() / masked(x).abs().max())


@pytest.mark.parametrize(
    "score", ["taylor", "fisher", "inf_cp", "grad_norm", "sosp_h", "ifso_code", "influence", "obs"]
)
def test_every_data_score_compiles_to_a_verified_model(score: str) -> None:
    m = model()
    before = snapshot(m)
    opts = {"probes": 2, "cg_iters": 2} if score == "influence" else {}
    r = fxprune.compile(m, X, 0.5, score=score, data=labelled(1), progress=False, latency_runs=0, **opts)
    assert r.plan.removed_channels > 0
    assert r.verification is not None and r.verification.passed, r.verification
    assert r.flops_ratio <= 0.5
    assert all(torch.isfinite(torch.as_tensor(s.mean)).all() for s in r.scores.values())
    assert r.compensation is not None and r.compensation.method == "lsq"  # on by default with data
    assert oracle_error(m, r, X) < 1e-5
    assert_unchanged(m, before)


@pytest.mark.parametrize("cls", [ResidualNet, ConcatNet, FlattenLinearNet])
@pytest.mark.parametrize("method", ["bias", "lsq", "lsq_independent", "newton"])
def test_compensation_is_covered_by_the_masked_oracle(cls: type[nn.Module], method: str) -> None:
    m = model(cls)
    # round_to=1: the plans these expectations were measured on (with aligned counts the Newton step also
    # keeps step 0 on ConcatNet)
    r = fxprune.compile(m, X, 0.5, score="magnitude", data=labelled(), compensate=method, verify=False,
                        progress=False, round_to=1)  # fmt: skip
    assert r.compensation is not None
    if method != "newton" or cls is not ResidualNet:
        assert r.compensation.overrides, r.compensation.skipped  # something was folded
    else:  # at random init with labels the Newton step raises the loss here: the line search keeps step 0
        assert r.compensation.step == 0.0 and not r.compensation.overrides, r.compensation
    assert oracle_error(m, r, X) < 1e-5


def test_bias_fold_matches_the_mean_activation_on_a_linear_consumer() -> None:
    """With the removed channels' activations constant on the data, the fold is exact."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.a.weight[::2] = 0  # even channels output relu(bias): constant over the data
    x = torch.randn(16, 6)
    r = fxprune.compile(
        m, x, 0.75, score="magnitude", data=[x], compensate="bias", verify=False, progress=False
    )
    removed = set(range(8)) - set(r.plan.modules["a"]["out"])
    assert removed and removed <= set(range(0, 8, 2))
    torch.testing.assert_close(r.graph_module(x), m(x), rtol=1e-5, atol=1e-5)
    r0 = fxprune.compile(
        m, x, 0.75, score="magnitude", data=[x], compensate="none", verify=False, progress=False
    )
    assert (r0.graph_module(x) - m(x)).abs().max() > 1e-3  # without the fold the output moves


def test_lsq_beats_no_compensation_on_the_calibration_outputs() -> None:
    m = model()
    data = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    errs = {}
    for method in ("none", "bias", "lsq"):
        r = fxprune.compile(m, X, 0.6, score="magnitude", data=data, compensate=method, verify=False,
                            progress=False)  # fmt: skip
        with torch.no_grad():
            errs[method] = sum(float(F.mse_loss(r.graph_module(d), m(d))) for d in data)
    assert errs["lsq"] < errs["none"] and errs["bias"] < errs["none"], errs


def test_label_free_scoring_uses_the_example_input_alone() -> None:
    m = model()
    r = fxprune.compile(m, X, 0.5, score="influence", progress=False, latency_runs=0, probes=2, cg_iters=2)
    assert r.score == "influence" and r.calibration is not None and not r.calibration.labelled
    assert r.compensation is None  # no data given: no compensation by default
    assert r.verification is not None and r.verification.passed


def test_scoring_never_updates_batchnorm_statistics() -> None:
    m = model()
    m.train()  # compile warns and works on an eval copy
    before = snapshot(m)
    with pytest.warns(UserWarning, match="training mode"):
        fxprune.compile(m, X, 0.5, score="fisher", data=labelled(), verify=False, progress=False)
    assert_unchanged(m, before)
    assert m.training


def test_same_seed_same_plan_and_weights() -> None:
    m = model()
    runs = [fxprune.compile(m, X, 0.5, score="influence", data=labelled(1), seed=3, verify=False,
                            progress=False, probes=2, cg_iters=2) for _ in range(2)]  # fmt: skip
    assert runs[0].plan == runs[1].plan
    for a, b in zip(runs[0].graph_module.state_dict().values(), runs[1].graph_module.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_scores_can_be_reused_across_targets() -> None:
    m = model()
    first = fxprune.compile(m, X, 0.5, score="taylor", data=labelled(), verify=False, progress=False)
    fresh = fxprune.compile(m, X, 0.7, score="taylor", data=labelled(), verify=False, progress=False)
    again = fxprune.compile(m, X, 0.7, score="taylor", data=labelled(), verify=False, progress=False,
                            scores=first.scores)  # fmt: skip
    assert again.plan == fresh.plan != first.plan  # a sweep: the same scores give the fresh plan at 0.7
    with pytest.raises(InputError, match="scores="):
        fxprune.compile(model(ConcatNet), X, 0.5, scores=first.scores, verify=False, progress=False)


def test_given_scores_decide_the_plan() -> None:
    """Scores unlike the ones fresh scoring computes give the plan they imply, not the fresh plan.

    Reversing each group's scores keeps every group's sorted values (so selection keeps the same number of
    channels per group) but swaps which channels are the best; raising one group's scores far above the
    rest keeps that group whole.
    """
    m = model()
    kw: dict = {"score": "taylor", "data": labelled(), "verify": False, "progress": False}
    fresh = fxprune.compile(m, X, 0.5, **kw)
    assert fresh.plan.kept
    flipped = {g: GroupScore(s.mean[::-1].copy()) for g, s in fresh.scores.items()}
    r = fxprune.compile(m, X, 0.5, scores=flipped, **kw)
    assert r.plan.kept_sizes() == fresh.plan.kept_sizes() and r.plan.kept != fresh.plan.kept
    for g, kept in r.plan.kept.items():
        best = np.argsort(-flipped[g].mean, kind="stable")[: len(kept)]  # the highest given scores
        assert kept == tuple(sorted(int(i) for i in best)), g
    assert r.scores.keys() == flipped.keys()
    assert all(np.array_equal(r.scores[g].mean, s.mean) for g, s in flipped.items())
    most_cut = max(fresh.plan.kept, key=lambda g: fresh.plan.group_sizes[g] - len(fresh.plan.kept[g]))
    favoured = dict(fresh.scores)
    favoured[most_cut] = GroupScore(fresh.scores[most_cut].mean + 1e6)
    r2 = fxprune.compile(m, X, 0.5, scores=favoured, **kw)
    assert most_cut not in r2.plan.kept and r2.plan.kept  # kept whole; the budget is met elsewhere
    assert r2.flops_ratio <= 0.5


def test_custom_loss_fn_is_the_loss_that_scores() -> None:
    """README: ``loss_fn=`` works. The default loss given as ``loss_fn`` reproduces the default plan (and is
    called); a loss that looks at one logit only gives another plan; a regression loss on float targets runs."""
    m = model()
    kw: dict = {"score": "taylor", "data": labelled(), "verify": False, "progress": False}
    calls = 0

    def counted_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return F.cross_entropy(out, target)

    default = fxprune.compile(m, X, 0.5, **kw)
    same = fxprune.compile(m, X, 0.5, loss_fn=counted_ce, **kw)
    assert calls >= len(kw["data"]) and same.plan == default.plan
    first_logit = fxprune.compile(m, X, 0.5, loss_fn=lambda out, _t: out[:, 0].pow(2).mean(), **kw)
    assert first_logit.plan != default.plan
    assert first_logit.flops_ratio <= 0.5
    regression = [
        (x, torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(2))) for x, _ in kw["data"]
    ]
    r = fxprune.compile(
        m, X, 0.5, score="fisher", data=regression, loss_fn=F.mse_loss, verify=False, progress=False
    )
    assert r.plan.removed_channels > 0 and r.calibration is not None and r.calibration.labelled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": []}, "data is empty"),
        ({"data": [torch.full((2, 3, 16, 16), float("nan"))]}, r"data\[0\] inputs contains NaN"),
        ({"data": [(X, torch.tensor([0.0, float("inf")]))], "loss_fn": F.mse_loss}, r"data\[0\] targets"),
        (
            {
                "data": [(X, torch.tensor([1, 2]))],
                "loss_fn": lambda o, t: F.cross_entropy(o, t, reduction="none"),
            },
            "must return a scalar",
        ),
        ({"data": [X], "loss_fn": F.cross_entropy}, "no targets"),
        ({"data": [{"x": X}]}, r"data\[0\] is a dict"),
        ({"data": 3}, "iterable of batches"),
        ({"compensate": "magic"}, "compensate='magic'"),
        ({"score": "taylor", "probes": 3}, "not options of score='taylor'"),
        ({"score": "nope"}, "score='nope'"),
        pytest.param(
            {"device": "cuda:0"},
            "no CUDA device",
            id="cuda-without-cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        pytest.param({"device": "nope"}, r"device='nope' is not a device", id="unparseable-device"),
        pytest.param({"device": "cpu:x"}, r"device='cpu:x' is not a device", id="bad-device-index"),
    ],
)
def test_bad_calibration_arguments_raise_input_error(kwargs: dict, match: str) -> None:
    m = model()
    before = snapshot(m)
    with pytest.raises(InputError, match=match):
        fxprune.compile(m, X, 0.5, verify=False, progress=False, **kwargs)
    assert_unchanged(m, before)


def test_every_registered_score_is_tested_here() -> None:
    get_score("magnitude")
    assert set(SCORES) == {
        "magnitude",
        "taylor",
        "fisher",
        "inf_cp",
        "grad_norm",
        "sosp_h",
        "ifso_code",
        "influence",
        "obs",
    }


def test_auto_score_is_fisher_with_labels_and_magnitude_otherwise() -> None:
    m = model()
    before = snapshot(m)
    kw: dict = {"progress": False, "latency_runs": 0}
    labelled_run = fxprune.compile(m, X, 0.5, data=labelled(2), **kw)
    assert labelled_run.score == "fisher" and labelled_run.calibration.labelled  # type: ignore[union-attr]
    assert labelled_run.compensation is not None and labelled_run.compensation.method == "lsq"
    no_data = fxprune.compile(m, X, 0.5, **kw)
    assert no_data.score == "magnitude" and no_data.calibration is None and no_data.compensation is None
    inputs_only = fxprune.compile(m, X, 0.5, data=[d for d, _ in labelled(2)], **kw)
    assert inputs_only.score == "magnitude"  # label-free Fisher is identically zero at m = 1
    explicit = fxprune.compile(m, X, 0.5, data=labelled(2), score="fisher", compensate="lsq", **kw)
    assert explicit.plan.kept == labelled_run.plan.kept
    with pytest.raises(fxprune.InputError, match="probes"):
        fxprune.compile(m, X, 0.5, data=labelled(2), probes=2, **kw)  # fisher takes no probes=
    assert_unchanged(m, before)


def test_obs_on_a_reader_lsq_cannot_refit_is_a_typed_error_naming_it() -> None:
    """A grouped conv reads pruned channels, which lsq cannot refit: ``score="obs"`` raises
    ``ScoreNotApplicable`` (an ``InputError``) naming it and the score to use; fisher compiles it."""
    m = model(GroupedNet)
    kw: dict = {"progress": False, "latency_runs": 0, "data": labelled(2)}
    with pytest.raises(fxprune.ScoreNotApplicable, match=r"groups=4.*score='fisher'"):
        fxprune.compile(m, X, 0.5, score="obs", **kw)
    fisher = fxprune.compile(m, X, 0.5, score="fisher", **kw)
    assert fisher.plan.kept and fisher.verification is not None and fisher.verification.passed


def test_a_score_class_of_ones_own_decides_the_plan() -> None:
    """``score=`` takes a ScorePass subclass: here one that favours the last channels of every group, so
    the plan keeps exactly those; the built-in table is read-only and lists every built-in score."""
    from fxprune.passes.score import ScorePass

    class LastFirst(ScorePass):
        name = "last_first"

        def score_groups(self, gm: Any, groups: list[Any]) -> dict[int, GroupScore]:
            return {g.id: GroupScore(np.arange(g.size, dtype=np.float64)) for g in groups}

    r = fxprune.compile(ResidualNet().eval(), torch.randn(1, 3, 16, 16), 0.5, score=LastFirst, progress=False,
                        latency_runs=0)  # fmt: skip
    assert r.score == "last_first" and r.plan.kept
    for gid, kept in r.plan.kept.items():
        n = r.plan.group_sizes[gid]
        assert kept == tuple(range(n - len(kept), n)), (gid, kept)
    with pytest.raises(TypeError):
        SCORES["mine"] = LastFirst  # type: ignore[index]
    with pytest.raises(fxprune.InputError, match="is not a fxprune.passes.score.ScorePass subclass"):
        fxprune.compile(ResidualNet().eval(), torch.randn(1, 3, 16, 16), 0.5, score=int)  # type: ignore[arg-type]
