"""Minimal reproducers of the bugs the random-architecture fuzzer (tests/test_fuzz.py) found."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, assert_unchanged, randomize_norms, snapshot

import fxprune


class SharedConvOnInput(nn.Module):
    """One conv applied to the graph input and again to its own output (the second call's input
    channels are prunable, the first call's are not: the weight's columns serve both)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(F.relu(self.conv(x))).mean((2, 3)))


class SharedBNOnInput(nn.Module):
    """One BatchNorm applied to the graph input and to a conv output of the same width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.bn(x), self.bn(self.conv(x))], 1)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("cls", [SharedConvOnInput, SharedBNOnInput])
def test_module_reused_on_an_untracked_input_is_pinned_not_broken(cls: type[nn.Module]) -> None:
    """Bug: the use on the graph input claimed nothing, so the other use's claim sliced the shared weight
    and the pruned model crashed (``expected input[2, 6, 8, 8] to have 2 channels``)."""
    model = randomize_norms(cls()).eval()
    x = torch.randn(2, model.conv.in_channels, 8, 8)
    dep = fxprune.dependency_graph(model, x)
    reasons = [p for g in dep.groups for p in g.pinned]
    assert any("also reads it without tracked channels" in p for p in reasons), reasons
    snap = snapshot(model)
    with pytest.raises(fxprune.TargetError, match="unreachable"):  # before the fix: a RuntimeError
        fxprune.compile(model, x, 0.5, score="magnitude", latency_runs=0)
    r = fxprune.compile(model, x, 1.0, score="magnitude", latency_runs=0)
    assert_unchanged(model, snap)
    assert r.verification is not None and r.verification.passed
    assert_masked_equivalent(model, r, x)


def test_shared_conv_still_prunes_when_every_use_is_tracked() -> None:
    """The fix pins only partial claims: a conv reused on two tracked tensors stays prunable (coupled)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(F.relu(self.conv(F.relu(self.stem(x))))).mean((2, 3)))

    model = M().eval()
    x = torch.randn(2, 3, 8, 8)
    r = fxprune.compile(model, x, 0.6, score="magnitude", latency_runs=0)
    assert r.plan.removed_channels > 0
    assert (
        r.graph_module.get_submodule("conv").weight.shape[1]
        == r.graph_module.get_submodule("conv").weight.shape[0]
    )
    assert r.verification is not None and r.verification.passed
    assert_masked_equivalent(model, r, x)


class InplaceOnSaved(nn.Module):
    """``relu_`` overwrites the input of a conv that autograd saved: not differentiable as written."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.a(s)
        z = self.act(s)  # overwrites s, which self.a saved for its weight gradient
        return self.head(torch.cat([y, z], 1).mean((2, 3)))


def test_data_score_on_non_differentiable_inplace_model_is_input_error() -> None:
    """Bug: a data-driven score on such a model crashed with autograd's raw RuntimeError."""
    model = InplaceOnSaved().eval()
    x = torch.randn(2, 3, 8, 8)
    snap = snapshot(model)
    with pytest.raises(
        fxprune.InputError, match=r"score='taylor' needs gradients.*in-place.*%act.*out-of-place"
    ):
        fxprune.compile(model, x, 0.5, score="taylor", data=[x], progress=False)
    assert_unchanged(model, snap)
    r = fxprune.compile(model, x, 0.5, score="magnitude", latency_runs=0)  # the suggested fix works
    assert r.verification is not None and r.verification.passed
    assert_masked_equivalent(model, r, x)
