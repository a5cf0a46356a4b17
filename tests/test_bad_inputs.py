"""Bad inputs (issue 6): each is a typed ``FxpruneError`` raised early, naming the argument/node and the fix,
with the user's model unchanged — or a supported case, pruned and checked by the oracles.

Catalogue (case -> outcome):

- model not an ``nn.Module`` -> ``InputError``
- data-dependent control flow / untraceable call -> ``TraceError`` (file:line, source, fix)
- example input: wrong shape, wrong dtype, not a tensor, ``torch.device``, ``meta`` tensor -> ``InputError``
- ``target_flops``: <= 0, NaN, +-inf, bool, str, None, tensor, count > model FLOPs, unreachable ->
  ``TargetError``; numpy scalars accepted
- ``data=``: NaN/Inf inputs or targets, empty list or iterator, wrong shape/dtype, non-scalar or non-tensor
  loss -> ``InputError``; ``device='cuda'`` without CUDA -> ``InputError``
- model in training mode -> warning, compiled in eval mode on a copy (supported)
- parametrized weights, ``parametrizations.weight_norm`` -> folded into plain weights with a warning
  (supported); the deprecated hook-based ``torch.nn.utils.weight_norm`` -> ``InputError``
- tied weights (one Parameter in two modules), a module called twice -> supported (coupled or pinned)
- model tensors on the ``meta`` device -> ``InputError``
- in-place ops (``x += y``, ``relu(inplace=True)``, ``x.add_()``, writing into the model input) -> supported
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from conftest import assert_masked_equivalent, assert_unchanged, randomize_norms, snapshot
from fxprune.models_zoo.toy import ResidualNet

import fxprune

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
FAST: dict[str, Any] = {"score": "magnitude", "latency_runs": 0, "progress": False}


class MustNotTrace(fxprune.Stage[fxprune.CompileState]):
    """A trace stage that fails the test: argument errors must come before any tracing."""

    name = "trace"
    requires = ("work", "example", "options")
    provides = ("gm",)

    def run(self, state: fxprune.CompileState) -> None:
        raise AssertionError("compile traced the model before rejecting the argument")


@pytest.fixture
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``expect_error`` compiles with a pipeline whose trace stage fails the test."""
    monkeypatch.setitem(FAST, "pipeline", fxprune.COMPILE.replace("trace", MustNotTrace()))
    yield


def residual() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(ResidualNet()).eval()


def expect_error(
    cls: type[fxprune.FxpruneError], model: Any, example: Any, target: Any = 0.5, *, match: str, **kw: Any
) -> str:
    """``compile`` raises ``cls`` matching ``match``; the model (when a module) is unchanged."""
    meta = isinstance(model, nn.Module) and any(p.is_meta for p in model.parameters())
    snap = snapshot(model) if isinstance(model, nn.Module) and not meta else None  # no values to compare
    with pytest.raises(cls, match=match) as info:
        fxprune.compile(model, example, target, **{**FAST, **kw})
    if snap is not None:
        assert_unchanged(model, snap)
    assert isinstance(info.value, fxprune.FxpruneError)
    return str(info.value)


def check_supported(model: nn.Module, x: Any, target: float = 0.6, **kw: Any) -> fxprune.CompileResult:
    """Compiles, prunes something, passes ORT and the masked oracle, leaves the model unchanged."""
    snap = snapshot(model)
    r = fxprune.compile(model, x, target, **{**FAST, **kw})
    assert_unchanged(model, snap)
    assert r.plan.removed_channels > 0
    assert r.verification is not None and r.verification.passed, r.verification
    assert r.verification.max_rel_error <= 1e-4
    assert r.flops_after <= target * r.flops_before
    assert_masked_equivalent(model, r, x)
    return r


# ------------------------------------------------------------------------------------------- the model
def test_model_not_a_module(no_tracing: None) -> None:
    for bad in (lambda x: x, torch.randn(3), "resnet18", None):
        msg = expect_error(fxprune.InputError, bad, X, match="model must be a torch.nn.Module")
        assert "wrap a function in an nn.Module" in msg


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


class NumpyCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.from_numpy(np.ascontiguousarray(x.numpy())))  # untraceable call


@pytest.mark.parametrize(
    ("cls", "source"),
    [(TopLevelBranch, "if x.sum() > 0:"), (NumpyCall, "torch.from_numpy(np.ascontiguousarray(x.numpy()))")],
)
def test_untraceable_forward_is_trace_error_naming_the_line(cls: type[nn.Module], source: str) -> None:
    model = cls().eval()
    msg = expect_error(fxprune.TraceError, model, X, match="torch.fx could not trace the top-level forward")
    assert "test_bad_inputs.py:" in msg and source in msg
    assert "concrete_args=" in msg and "independent of tensor values" in msg


# ---------------------------------------------------------------------------------------- the example
@pytest.mark.parametrize(
    ("example", "match"),
    [
        (torch.device("cuda"), "example_input must be a tensor or a non-empty tuple of tensors, got device"),
        ((), "non-empty tuple of tensors"),
        ((X, 3), r"example_input\[1\] is a int, not a tensor.*concrete_args="),
        (
            torch.empty(2, 3, 8, 8, device="meta"),
            r"example_input\[0\] is a meta tensor.*torch.randn\(2, 3, 8, 8\)",
        ),
    ],
)
def test_bad_example_input_is_input_error(no_tracing: None, example: Any, match: str) -> None:
    expect_error(fxprune.InputError, residual(), example, match=match)


@pytest.mark.parametrize(
    ("example", "match"),
    [
        (
            torch.randn(2, 3, 8),
            r"example_input \(\(2, 3, 8\) torch.float32 on cpu\) does not run.*shape, dtype",
        ),
        (torch.randn(2, 5, 8, 8), r"example_input \(\(2, 5, 8, 8\).*does not run.*5 channels"),
        (torch.randint(0, 9, (2, 3, 8, 8)), r"torch.int64 on cpu\) does not run.*dtype"),
        (X.half(), r"torch.float16 on cpu\) does not run"),
    ],
)
def test_example_that_does_not_run_is_input_error(example: Any, match: str) -> None:
    """Found by the first (counted) run of the traced graph, which then runs the model itself: an example
    the model rejects too is an InputError about the example, not a TraceError, and nothing is changed."""
    msg = expect_error(fxprune.InputError, residual(), example, match=match)
    assert "traced graph" not in msg


def test_graph_that_fails_where_the_model_runs_stays_a_trace_error() -> None:
    """The example runs through the model, so a failing traced graph is a TraceError (not blamed on the
    example); the pipeline names the stage it was raised in."""

    class BrokenGraph(fxprune.Stage[fxprune.CompileState]):
        name = "trace"
        requires = ("work", "example", "options")
        provides = ("gm",)

        def run(self, state: fxprune.CompileState) -> None:
            raise fxprune.TraceError("the traced graph fails at node x")

    pipeline = fxprune.COMPILE.replace("trace", BrokenGraph())
    with pytest.raises(fxprune.TraceError, match="the traced graph fails at node x") as info:
        fxprune.compile(residual(), X, 0.5, pipeline=pipeline, **FAST)
    assert info.value.__notes__ == [
        "fxprune pipeline: raised in stage 'trace' (after prepare, options, calibrate)"
    ]


def test_model_on_meta_device_is_input_error(no_tracing: None) -> None:
    model = residual().to("meta")
    params = list(model.parameters())
    expect_error(
        fxprune.InputError, model, X, match=r"model tensor 'stem.0.weight' is on the meta device.*to_empty"
    )
    assert all(a is b and a.is_meta for a, b in zip(model.parameters(), params, strict=True))


def test_device_without_cuda_is_input_error(no_tracing: None) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expect_error(
        fxprune.InputError, residual(), X, match=r"device='cuda' but this machine has no CUDA", device="cuda"
    )


# ----------------------------------------------------------------------------------------- the target
@pytest.mark.parametrize(
    ("target", "match"),
    [
        (0, r"target_flops=0 is out of range: pass a fraction in \(0, 1\]"),
        (-0.5, "target_flops=-0.5 is out of range"),
        (float("nan"), "target_flops=nan is out of range"),
        (float("inf"), "target_flops=inf is out of range"),
        (-math.inf, "target_flops=-inf is out of range"),
        (True, "target_flops must be a number, got bool"),
        ("0.5", "target_flops must be a number, got str; pass e.g. 0.5"),
        (None, "pass exactly one of target_flops .* and target_latency"),
        (torch.tensor(0.5), "target_flops must be a number, got Tensor"),
    ],
)
def test_malformed_target_is_target_error(no_tracing: None, target: Any, match: str) -> None:
    expect_error(fxprune.TargetError, residual(), X, target, match=match)


def test_target_above_the_model_flops_is_target_error() -> None:
    """Needs the FLOPs count, so it comes after the first (counted) run, before scoring."""
    expect_error(fxprune.TargetError, residual(), X, 10**12,
                 match=r"target_flops=1000000000000 exceeds the model's \d+ FLOPs; pass at most \d+ or a fraction")  # fmt: skip


@pytest.mark.parametrize("target", [0.001, 1.5, 1000])  # 1.5 and 1000 are absolute FLOPs counts (> 1)
def test_unreachable_target_names_the_minimum(target: float) -> None:
    with pytest.raises(fxprune.TargetError, match="unreachable") as info:
        fxprune.compile(residual(), X, target, **FAST)
    e = info.value
    assert e.min_flops is not None and e.total_flops is not None
    absolute = target if target > 1 else target * e.total_flops
    assert e.min_flops > absolute and f"pass a target >= {e.min_flops}" in str(e)


def test_numpy_scalar_target_is_accepted() -> None:
    r = fxprune.compile(residual(), X, np.float32(0.6), verify=False, **{**FAST, "latency_runs": 0})
    assert r.flops_after <= 0.6 * r.flops_before and r.plan.removed_channels > 0


# ---------------------------------------------------------------------------------- calibration data
def _labels(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data": [X * float("nan")]}, r"data\[0\] inputs contains NaN or Inf; drop or clean that batch"),
        ({"data": [X, X.clone().fill_(float("inf"))]}, r"data\[1\] inputs contains NaN or Inf"),
        ({"data": [(X, torch.full((2, 10), float("nan")))]}, r"data\[0\] targets contains NaN or Inf"),
        ({"data": []}, "data is empty; pass at least one batch, or data=None"),
        ({"data": iter([])}, "data is empty"),
        (
            {"data": [torch.randn(2, 4, 8, 8)]},
            r"data\[0\] input 0 is \(2, 4, 8, 8\).*example_input\[0\] is \(2, 3, 8, 8\)",
        ),
        (
            {"data": [X, torch.randn(4, 3, 16, 16)]},
            r"data\[1\] input 0 is \(4, 3, 16, 16\).*except for the batch size",
        ),
        ({"data": [X.double()]}, r"data\[0\] input 0 is \(2, 3, 8, 8\) torch.float64"),
        (
            {"data": [(X, _labels())], "loss_fn": lambda o, t: F.cross_entropy(o, t, reduction="none")},
            r"loss_fn must return a scalar tensor, got \(2,\) on data\[0\]; reduce it",
        ),
        (
            {"data": [(X, _labels())], "loss_fn": lambda o, t: 1.0},
            "loss_fn must return a scalar tensor, got float",
        ),
        (
            {"data": [(X, _labels())], "loss_fn": lambda o, t: (o * float("inf")).sum()},
            "loss_fn returned .* the loss must be finite",
        ),
    ],
)
def test_bad_calibration_data_is_input_error(no_tracing: None, kwargs: dict[str, Any], match: str) -> None:
    expect_error(fxprune.InputError, residual(), X, match=match, **{"score": "taylor", **kwargs})


def test_calibration_data_is_never_modified() -> None:
    model = InplaceOnInput().eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    before = [d.clone() for d in data]
    fxprune.compile(model, X, 0.7, **{**FAST, "score": "taylor", "data": data})
    assert all(torch.equal(a, b) for a, b in zip(data, before, strict=True))


# ---------------------------------------------------------------------------------------- model state
class Chain(nn.Module):
    """conv -> conv -> conv -> linear, every group prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))).mean((2, 3)))


class Symmetric(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w + w.flip(0)) / 2


def test_training_mode_warns_and_compiles_eval_copy() -> None:
    model = Chain().train()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match=r"training mode.*your model is unchanged.*model.eval\(\)"):
        r = fxprune.compile(model, X, 0.6, **FAST)
    assert_unchanged(model, snap)
    assert model.training and not r.graph_module.training


@pytest.mark.parametrize("kind", ["identity", "symmetric", "weight_norm"])
def test_parametrized_weights_are_folded_and_pruned(kind: str) -> None:
    torch.manual_seed(0)
    model = Chain().eval()
    if kind == "weight_norm":
        nn.utils.parametrizations.weight_norm(model.b)
    else:
        parametrize.register_parametrization(
            model.b, "weight", nn.Identity() if kind == "identity" else Symmetric()
        )
    with torch.no_grad():
        before = model(X)
    with pytest.warns(UserWarning, match=r"parametrized tensors 'b.weight' are folded into plain parameters"):
        r = check_supported(model, X)
    assert parametrize.is_parametrized(model.b)  # the user's model keeps its parametrization and works
    with torch.no_grad():
        assert torch.equal(model(X), before)
    assert not parametrize.is_parametrized(r.graph_module.get_submodule("b"))


def test_deprecated_weight_norm_is_input_error(no_tracing: None) -> None:
    model = Chain().eval()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(model.b)
    model(X)  # the hook computes a non-leaf weight, which cannot be deep-copied
    expect_error(
        fxprune.InputError,
        model,
        X,
        match=r"module .b. uses the deprecated torch.nn.utils.weight_norm.*cannot be deep-copied.*remove_weight_norm.*parametrizations.weight_norm",
    )


class TiedWeights(nn.Module):
    """Two 1x1 convs sharing one Parameter, and a module called twice on tracked channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.t = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 6, 1)
        self.right = nn.Conv2d(8, 6, 1)
        self.right.weight = self.left.weight
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(F.relu(self.a(x))))
        h = self.c(F.relu(self.b(h)))  # self.b called twice: its in and out channels are one group
        t = F.relu(self.t(x))
        tied = self.left(t) + self.right(-t)
        return self.fc(torch.cat([h, tied], 1).mean((2, 3)))


def test_tied_weights_stay_tied_and_correct() -> None:
    model = TiedWeights().eval()
    dep = fxprune.dependency_graph(model, X)
    reasons = [p for g in dep.groups for p in g.pinned]
    assert any("is the same tensor as" in p and "tied weights" in p for p in reasons), reasons
    r = check_supported(model, X, 0.8)
    gm = r.graph_module
    assert gm.get_submodule("t").weight.shape[0] == 8  # pinned by the tied consumers
    assert gm.get_submodule("a").weight.shape[0] < 8
    assert gm.get_submodule("left").weight is gm.get_submodule("right").weight
    assert gm.get_submodule("b").weight.shape[0] == gm.get_submodule("b").weight.shape[1]


# -------------------------------------------------------------------------------------- in-place ops
class InplaceOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.a(x))
        z = self.b(y)
        z += y
        z = F.relu(z, inplace=True)
        z.add_(y)
        z.mul_(0.5)
        return self.fc(self.c(z).mean((2, 3)))


class InplaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += 1.0  # writes into the caller's tensor
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


def test_inplace_ops_are_supported() -> None:
    r = check_supported(InplaceOps().eval(), X)
    assert any(n.op == "call_method" and n.target == "add_" for n in r.graph_module.graph.nodes)


def test_model_writing_into_its_input_never_touches_the_callers_tensor() -> None:
    x = X.clone()
    check_supported(InplaceOnInput().eval(), x)  # the oracle feeds every model its own copy
    assert torch.equal(x, X)
