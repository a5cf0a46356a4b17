"""Every error is typed and names the argument or node at fault, and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from fxprune.models_zoo.toy import ResidualNet

import fxprune

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.inner = Branchy()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.inner(self.stem(x)).mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


def test_untraceable_names_call_module_and_fix() -> None:
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.compile(DataDependent().eval(), X, 0.5, score="magnitude")
    msg = str(info.value)
    assert "test_errors.py" in msg and "if y.sum() > 0" in msg
    assert "module 'inner'" in msg and "leaf_modules=['inner']" in msg


def test_leaf_module_fix_works_and_pins() -> None:
    r = fxprune.compile(
        DataDependent().eval(), X, 1.0, leaf_modules=["inner"], verify=False, score="magnitude"
    )
    assert any("no rule for module Branchy 'inner'" in p for g in r.groups for p in g.pinned)
    with pytest.raises(fxprune.TargetError, match="unreachable"):
        fxprune.compile(
            DataDependent().eval(), X, 0.5, leaf_modules=[Branchy], verify=False, score="magnitude"
        )


@pytest.mark.parametrize("target", [0, -1, float("nan"), 1e30, "0.5"])
def test_bad_target_is_target_error(target: object) -> None:
    with pytest.raises(fxprune.TargetError, match="target_flops"):
        fxprune.compile(ResidualNet().eval(), X, target, score="magnitude")  # type: ignore[arg-type]


def test_unreachable_target_reports_minimum() -> None:
    with pytest.raises(fxprune.TargetError, match="smallest model") as info:
        fxprune.compile(ResidualNet().eval(), X, 0.001, score="magnitude")
    e = info.value
    assert e.total_flops and e.min_flops and e.min_flops > 0.001 * e.total_flops
    assert str(e.min_flops) in str(e)


def test_not_a_module() -> None:
    with pytest.raises(fxprune.InputError, match="model must be a torch.nn.Module"):
        fxprune.compile(lambda x: x, X, 0.5, score="magnitude")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("example", "match"),
    [
        (torch.randn(1, 4, 16, 16), r"example_input \(\(1, 4, 16, 16\).*does not run"),
        (torch.randn(1, 3, 16, 16, dtype=torch.float64), "does not run"),
        ([1, 2], r"example_input\[0\] is a int"),
        ("x", "must be a tensor"),
        ((X, X), r"example_input has 2 tensor\(s\) but the model.s forward takes 1 \(x\)"),
    ],
)
def test_bad_example_input(example: object, match: str) -> None:
    with pytest.raises(fxprune.InputError, match=match):
        fxprune.compile(ResidualNet().eval(), example, 0.5, score="magnitude")


def test_unknown_score_and_bad_options() -> None:
    with pytest.raises(fxprune.InputError, match="score='nope'.*magnitude"):
        fxprune.compile(ResidualNet().eval(), X, 0.5, score="nope")
    with pytest.raises(fxprune.InputError, match="min_channels"):
        fxprune.compile(ResidualNet().eval(), X, 0.5, min_channels=0, score="magnitude")


def test_strict_mode_raises_on_missing_rule() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flip(self.a(x), [1]))

    with pytest.raises(fxprune.UnsupportedOpError, match="torch.flip"):
        fxprune.compile(M().eval(), X, 0.5, strict=True, score="magnitude")


def test_errors_share_a_base_class() -> None:
    for cls in (fxprune.TraceError, fxprune.TargetError, fxprune.InputError, fxprune.UnsupportedOpError):
        assert issubclass(cls, fxprune.FxpruneError)


def test_one_error_hierarchy() -> None:
    """Every error fxprune raises on purpose is defined in fxprune/errors.py (or subclasses one defined
    there), subclasses FxpruneError, and is importable from the package root."""
    import inspect as pyinspect

    import fxprune.errors as errors
    import fxprune.specs

    defined = [
        c for _, c in pyinspect.getmembers(errors, pyinspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(defined) >= 10
    for cls in defined:
        assert issubclass(cls, fxprune.FxpruneError), cls
        assert getattr(fxprune, cls.__name__) is cls, f"fxprune.{cls.__name__} is not exported"
    assert issubclass(fxprune.specs.SpecError, fxprune.InputError)
    # an AssertionError subclass could be hidden by python -O and confused with a failing test
    assert not any(issubclass(c, AssertionError) for c in defined)


def test_non_finite_scores_are_a_numerical_error() -> None:
    """A score that diverges is a typed error naming the score and the fix, not a bare FloatingPointError."""
    model = ResidualNet().eval()
    data = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((out * 0).sum())  # finite (0), but its gradient is inf * 0 = NaN

    with pytest.raises(fxprune.NumericalError, match=r"score='taylor' produced non-finite values.*damping="):
        fxprune.compile(
            model, X, 0.5, score="taylor", data=data, loss_fn=loss_fn, compensate="none", progress=False
        )
