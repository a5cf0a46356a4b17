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


class InplaceOnAliased(nn.Module):
    """``relu_`` on a tensor whose chunks are read afterwards: eager sees the ReLU through the views, the
    TorchScript ONNX exporter does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 9, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(9, 2)
        self.side = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        a, b, c = y.chunk(3, 1)
        z = self.act(y)
        return self.head(z.mean((2, 3))), self.side(torch.cat([a, b, c], 1).mean((2, 3)))


def test_failed_onnx_verification_raises_and_blames_the_exporter() -> None:
    """Bug: compile returned such a model with ``verification.passed == False`` and no error at all."""
    model = InplaceOnAliased().eval()
    x = torch.randn(2, 4, 8, 8)
    snap = snapshot(model)
    with pytest.raises(fxprune.VerificationError) as info:
        fxprune.compile(model, x, 1.0, score="magnitude", latency_runs=0)
    msg = str(info.value)
    assert "ONNX Runtime disagrees" in msg and "rtol=0.0001" in msg
    assert "the original model fails the same check" in msg and "%act" in msg and "verify=False" in msg
    r = info.value.result
    assert isinstance(r, fxprune.CompileResult) and r.verification is not None and not r.verification.passed
    assert_unchanged(model, snap)
    with torch.no_grad():  # the eager model is still the original function
        assert torch.equal(r.graph_module(x.clone())[0], model(x.clone())[0])
    assert fxprune.compile(model, x, 1.0, score="magnitude", verify=False).verification is None


class InplaceOnSplitView(nn.Module):
    """``relu_`` on an output of ``torch.split`` (a view autograd forbids modifying in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), [5, 3], 1)
        return self.head(torch.cat([a, self.act(b)], 1).mean((2, 3)))


def test_data_score_on_inplace_split_view_is_input_error() -> None:
    """Bug: the second form of autograd's in-place error escaped as a raw RuntimeError."""
    with pytest.raises(fxprune.InputError, match=r"score='fisher' needs gradients.*%act"):
        fxprune.compile(
            InplaceOnSplitView().eval(), torch.randn(2, 3, 8, 8), 0.5, score="fisher", progress=False
        )


def test_shape_query_of_a_shared_parameter_does_not_pin() -> None:
    """The partial-claim safety net ignores readers that only query a parameter's shape."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.conv2d(x, self.w, None, 1, 1)
            return self.head(F.relu(y)).mean((2, 3)) * (self.w.shape[0] / 8)

    dep = fxprune.dependency_graph(M().eval(), torch.randn(2, 3, 8, 8))
    g = next(g for g in dep.groups if any(s.param == "w" and s.dim == 0 for s in g.sites))
    assert g.prunable, g.pinned


class SegOutputWithBN(nn.Module):
    """A BatchNorm net returning an ``OrderedDict`` (as torchvision's segmentation models do) with an op
    fxprune's ONNX writer does not translate (``leaky_relu``), so torch's exporter checks it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(11, 2)

    def forward(self, x: torch.Tensor) -> object:
        from collections import OrderedDict

        y = torch.cat([self.conv(x).mean((2, 3)), F.leaky_relu(self.bn(x), 0.1).mean((2, 3))], 1)
        return OrderedDict(out=self.head(y))


def test_export_leaves_the_compiled_model_in_eval_mode() -> None:
    """Bug: the exporter's wrapper for container outputs was a new module in training mode; torch's
    exporter restores the mode it found recursively, so the returned model's BatchNorm ran in training mode
    (found by the fuzzer: ``ordered_dict`` outputs differed from the masked original)."""
    torch.manual_seed(0)
    model = randomize_norms(SegOutputWithBN()).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    r = fxprune.compile(model, x, 0.6, score="magnitude", latency_runs=0, progress=False)
    assert r.verification is not None and r.verification.exporter != "fxprune"  # torch's exporter ran
    assert not any(m.training for m in r.graph_module.modules())
    assert_masked_equivalent(model, r, x)
