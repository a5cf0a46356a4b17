"""The torch.export capture path (``fxprune.capture``): models symbolic tracing rejects compile through it,
the canonical graph is the vocabulary of the op rules, and when neither capture works one error lists every
untraceable module with the FLOPs floor they would leave."""

from __future__ import annotations

import io
import re
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import assert_masked_equivalent

import fxprune
from fxprune.capture import EXPORT, SYMBOLIC, export_capture
from fxprune.data import output_signature
from fxprune.errors import InputError, TargetError, TraceError


class ShapeBranch(nn.Module):
    """``if x.shape[-1] != 32``: Python control flow on a traced size, which symbolic tracing rejects."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 48, 3, padding=1)
        self.c = nn.Conv2d(48, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear")
        x = F.relu(self.bn(self.a(x)))
        y = self.c(F.relu(self.b(x)))
        return self.fc((x + y).mean((2, 3)))


class IterateChunks(nn.Module):
    """Iterates over ``x.chunk(2, dim=1)``: symbolic tracing cannot iterate a proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.branches = nn.ModuleList([nn.Conv2d(16, 24, 3, padding=1) for _ in range(2)])
        self.b = nn.Conv2d(48, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        parts = [F.relu(conv(p)) for conv, p in zip(self.branches, h.chunk(2, dim=1), strict=True)]
        return self.fc(F.relu(self.b(torch.cat(parts, 1))).mean((2, 3)))


class MaskFill(nn.Module):
    """A mask built from the input's shape by in-place fills of a zero tensor (as torchvision's Swin)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 16:
            x = F.interpolate(x, size=(16, 16))
        mask = x.new_zeros((16, 16))
        mask[:8, :8] = 1.0
        mask[8:, 4:] = 2.0
        h = F.relu(self.a(x)) * mask
        return self.fc(F.relu(self.b(h)).mean((2, 3)))


Pair = namedtuple("Pair", ["logits", "features"])


class Structured(ShapeBranch):
    """Returns an ``OrderedDict`` holding a namedtuple and a list."""

    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="nearest")
        h = F.relu(self.bn(self.a(x)))
        y = self.c(F.relu(self.b(h)))
        return OrderedDict(out=Pair(self.fc((h + y).mean((2, 3))), [y]))


class WSConv(nn.Conv2d):
    """A weight-standardised conv (its forward standardises the weight per output channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = WSConv(32, 48, 3, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # on a value: neither capture can follow it
            return self.c(x)
        return x


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x) * float(x.mean().item())


class Uncapturable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.g = Gate()
        self.s = Scale()
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.d = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s(self.g(torch.relu(self.a(x))))
        return self.fc(torch.relu(self.d(torch.relu(self.b(x)))).mean((2, 3)))


class WritesAConstant(ShapeBranch):
    """Writes the input's mean into a tensor it builds from a literal (a constant of the exported program)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32))
        t = torch.tensor([1.0, 2.0])
        t.add_(x.mean())
        return super().forward(x) * t.sum()


class Detector(nn.Module):
    """A traceable backbone inside a forward that branches on the scores' values (as NMS does)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.body(x)
        if scores.max() > 0:
            return self.head(scores)
        return self.head(-scores)


class InPlaceAndCumsum(ShapeBranch):
    """An in-place ``relu_`` (kept in place, as the tensor method) and a cumsum over the channels (an op
    without a rule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32))
        h = self.bn(self.a(x))
        h.relu_()
        y = self.c(F.relu(self.b(h)))
        return self.fc(torch.cumsum(y, dim=1).mean((2, 3)))


def _compile(model: nn.Module, x: torch.Tensor, target: float = 0.5, **kw: Any) -> fxprune.CompileResult:
    return fxprune.compile(model, x, target, score="magnitude", latency_runs=0, progress=False, **kw)


def test_a_shape_branch_compiles_through_export() -> None:
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(1, 3, 40, 40)
    with pytest.raises(TraceError):
        _compile(model, x, capture="fx")
    result = _compile(model, x)
    assert result.capture == EXPORT and "capture torch.export" in result.report
    assert result.flops_ratio <= 0.52
    assert result.verification is not None and result.verification.passed
    assert_masked_equivalent(model, result, x)
    kinds = {type(m) for m in result.graph_module.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds  # leaf modules are modules again
    buffer = io.BytesIO()  # a saved result loads like a traced one
    torch.save(result.graph_module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.graph_module(x))


def test_iterating_over_a_tensor_compiles_through_export() -> None:
    torch.manual_seed(0)
    model, x = IterateChunks().eval(), torch.randn(1, 3, 24, 24)
    with pytest.raises(TraceError, match="iterated"):
        _compile(model, x, capture="fx")
    result = _compile(model, x)
    assert result.capture == EXPORT and result.flops_ratio <= 0.52
    assert result.verification is not None and result.verification.passed
    assert_masked_equivalent(model, result, x)


def test_a_constant_built_by_inplace_fills_is_folded() -> None:
    torch.manual_seed(0)
    model, x = MaskFill().eval(), torch.randn(1, 3, 20, 20)
    result = _compile(model, x)
    graph = result.graph_module.graph
    assert not any("fill" in str(n.target) for n in graph.nodes)
    assert any(n.op == "get_attr" and "_fxprune_constant" in str(n.target) for n in graph.nodes)
    assert result.verification is not None and result.verification.passed
    assert_masked_equivalent(model, result, x)


def test_a_constant_the_input_writes_into_is_not_kept_between_calls() -> None:
    torch.manual_seed(0)
    model, x = WritesAConstant().eval(), torch.randn(1, 3, 40, 40)
    gm = export_capture(model, (x,))
    with torch.no_grad():
        want = model(x)
        for _ in range(3):
            torch.testing.assert_close(gm(x), want)
    result = _compile(model, x)
    with torch.no_grad():
        first = result.graph_module(x)
        torch.testing.assert_close(result.graph_module(x), first)
    assert_masked_equivalent(model, result, x)


def test_export_keeps_the_output_structure() -> None:
    torch.manual_seed(0)
    model, x = Structured().eval(), torch.randn(1, 3, 40, 40)
    result = _compile(model, x)
    assert result.capture == EXPORT
    with torch.no_grad():
        got, want = result.graph_module(x), model(x)
    assert type(got) is OrderedDict and type(got["out"]) is Pair and type(got["out"].features) is list
    assert output_signature(got) == output_signature(want)
    assert_masked_equivalent(model, result, x)


@pytest.mark.parametrize("name", ["resnet18", "vit", "ws"])
def test_export_of_a_traceable_model_gives_the_traced_plan(name: str) -> None:
    """The canonical export graph is the traced graph's vocabulary: same groups, same plan (the ViT's
    self-attention is an ``nn.MultiheadAttention`` call again, decomposed into heads as when traced; the
    standardised weight of a conv subclass is followed as when traced)."""
    torch.manual_seed(0)
    if name == "vit":
        model, x = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64).eval(), torch.randn(1, 3, 32, 32)
    elif name == "ws":  # a weight computed by a subclass's forward: the same weight expression rules apply
        model, x = WSNet().eval(), torch.randn(1, 3, 16, 16)
    else:
        model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    traced = _compile(model, x, round_to=1)
    exported = _compile(model, x, round_to=1, capture="export")
    assert (traced.capture, exported.capture) == (SYMBOLIC, EXPORT)
    assert [g.size for g in traced.dependency.groups] == [g.size for g in exported.dependency.groups]
    assert [g.prunable for g in traced.dependency.groups] == [g.prunable for g in exported.dependency.groups]
    assert traced.plan.kept == exported.plan.kept
    assert traced.flops_after == exported.flops_after
    assert exported.verification is not None and exported.verification.passed
    assert_masked_equivalent(model, exported, x, rtol=1e-4)  # against the user's model, not the other capture
    calls = [n for n in exported.graph_module.graph.nodes if n.op == "call_module"]
    assert len(calls) == len([n for n in traced.graph_module.graph.nodes if n.op == "call_module"])


def test_an_inplace_op_stays_inplace_and_an_op_without_a_rule_is_pinned() -> None:
    torch.manual_seed(0)
    model, x = InPlaceAndCumsum().eval(), torch.randn(1, 3, 40, 40)
    result = _compile(model, x, 0.8)
    reasons = " ".join(r for g in result.dependency.groups for r in g.pinned)
    assert "cumsum" in reasons
    assert any(n.op == "call_method" and n.target == "relu_" for n in result.graph_module.graph.nodes)
    assert result.capture == EXPORT and result.verification is not None and result.verification.passed
    assert_masked_equivalent(model, result, x)


def test_export_capture_checks_its_graph_and_leaves_the_model_alone() -> None:
    model, x = ShapeBranch().eval(), torch.randn(1, 3, 40, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = export_capture(model, (x,))
    assert isinstance(gm, fx.GraphModule)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(isinstance(t, torch._ops.OpOverload) for t in targets), targets  # all translated


@pytest.mark.filterwarnings("ignore:the target leaves")
def test_when_neither_capture_works_one_error_lists_every_module_and_the_floor() -> None:
    torch.manual_seed(0)
    model, x = Uncapturable().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TraceError) as info:
        _compile(model, x)
    message = str(info.value)
    assert "torch.export" in message
    assert "module 'g' (Gate)" in message and "module 's' (Scale)" in message
    assert "leaf_modules=['g', 's']" in message
    floor = float(re.search(r"has ([0-9.]+) of the FLOPs", message).group(1))  # type: ignore[union-attr]
    assert 0.0 < floor < 1.0
    ok = _compile(model, x, floor + 0.01, leaf_modules=["g", "s"])  # the floor is the true one
    assert ok.flops_ratio <= floor + 0.01
    with pytest.raises(TargetError):
        _compile(model, x, floor - 0.01, leaf_modules=["g", "s"])


def test_when_neither_capture_works_the_error_names_the_parts_that_trace() -> None:
    torch.manual_seed(0)
    model, x = Detector().eval(), torch.randn(1, 3, 32, 32)
    with pytest.raises(TraceError) as info:
        _compile(model, x)
    message = str(info.value)
    assert "submodules=['body']" in message and "'body' (Sequential" in message  # the largest first
    result = _compile(model, x, submodules="body")  # the hint works
    assert result.parts["body"].flops_ratio <= 0.52


def test_capture_value_is_checked() -> None:
    with pytest.raises(InputError, match="capture='onnx'"):
        _compile(ShapeBranch().eval(), torch.randn(1, 3, 32, 32), capture="onnx")


def test_timm_models_symbolic_tracing_rejects() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for name in ("mobilevit_xxs", "tf_mobilenetv3_small_100"):
        model, x = timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 64, 64)
        with pytest.raises(TraceError):
            _compile(model, x, capture="fx")
        result = _compile(model, x)
        assert result.capture == EXPORT, name
        assert result.flops_ratio <= 0.52, name
        assert result.verification is not None and result.verification.passed, name
        assert_masked_equivalent(model, result, x, rtol=1e-4)
