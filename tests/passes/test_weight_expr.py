"""Subclasses that compute their weight (``fxprune.passes.weight_expr``): weight standardisation (mean/std,
timm's ``F.batch_norm`` form, NFNet's gain), a weight-normalised linear, and 'same'-padding convs.

Each compiles at half the FLOPs under the masked oracle and ONNX Runtime; the input channels of a conv
whose weight statistic runs across them are pinned with a reason naming the op, its output channels are
free, and the parameters (weight, gain, bias) are sliced together.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent

import fxprune

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class WSConv(nn.Conv2d):
    """Weight standardisation with mean and std over each output row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        m = w.mean(dim=(1, 2, 3), keepdim=True)
        s = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(
            x, (w - m) / (s + 1e-5), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d``: batch statistics of the weight reshaped to one row per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerNormWSConv(nn.Conv2d):
    """Standardisation by ``F.layer_norm`` over a shape read from the weight (``w.shape[1:]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.layer_norm(self.weight, self.weight.shape[1:])
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNet): a learned gain per output channel scales the standardised weight."""

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GainScaledWSConv(ScaledStdConv):
    """The older NFNet form: ``(w - mean) * gain * rsqrt(var * fan_in + eps)`` (the statistic has size-1
    dims, the gain its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), keepdim=True, unbiased=False)
        scale = self.gain * torch.rsqrt(var / self.scale**2 + 1e-4)  # var * fan_in
        return F.conv2d(
            x, (w - mean) * scale, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class InScaledConv(nn.Conv2d):
    """A learned scale per input channel: channel-wise on both dims, nothing is mixed."""

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.s = nn.Parameter(torch.rand(1, self.in_channels, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.s, self.bias, self.stride, self.padding, self.dilation)


class ShiftedConv(nn.Conv2d):
    """``w + delta``: the computed weight's input columns are not zero where ``w``'s are."""

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.delta = nn.Parameter(torch.randn(self.out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.delta, self.bias, self.stride, self.padding, self.dilation)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow 'same' padding computed from the input size, then a plain conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph = ((ih + sh - 1) // sh - 1) * sh + (kh - 1) * dh + 1 - ih
        pw = ((iw + sw - 1) // sw - 1) * sw + (kw - 1) * dw + 1 - iw
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ConvNet(nn.Module):
    """``a`` (3 -> 16), ``b`` (16 -> 16), then a plain 1x1 conv: ``b``'s output channels carry most FLOPs."""

    def __init__(self, conv: type[nn.Conv2d], stride: int = 1) -> None:
        super().__init__()
        self.a = conv(3, 16, 3, padding=1)
        self.b = conv(16, 16, 3, padding=1, stride=stride)
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def _group(dep: fxprune.DependencyResult, param: str, role: str) -> fxprune.ChannelGroup:
    hits = [g for g in dep.groups if any(s.param == param and s.role == role for s in g.sites)]
    assert len(hits) == 1, f"{param} ({role}) in {len(hits)} groups"
    return hits[0]


def _compile(model: nn.Module, x: torch.Tensor) -> fxprune.CompileResult:
    r = fxprune.compile(model.eval(), x, 0.5, latency_runs=0, score="magnitude", round_to=1)
    assert r.flops_after <= 0.5 * r.flops_before
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, x)
    assert r.flops_after == pytest.approx(r.cost.flops(r.plan.kept_sizes()), rel=1e-9), (
        "cost model is not exact"
    )
    return r


@pytest.mark.parametrize(
    ("conv", "stat", "sliced"),
    [
        (WSConv, "a mean across it", ("b.weight", "b.bias")),
        (StdConv, "a batch_norm across it", ("b.weight", "b.bias")),
        (ScaledStdConv, "a batch_norm across it", ("b.weight", "b.bias", "b.gain")),
        (LayerNormWSConv, "a layer_norm across it", ("b.weight", "b.bias")),
        (GainScaledWSConv, "a var across it", ("b.weight", "b.bias", "b.gain")),
    ],
)
def test_standardised_conv_prunes_its_outputs_and_pins_its_inputs(
    conv: type[nn.Conv2d], stat: str, sliced: tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    model = ConvNet(conv)
    dep = fxprune.dependency_graph(model.eval(), X)
    inputs = _group(dep, "b.weight", "in")  # a's output channels, read by b's standardised weight
    assert any(f"parameter 'b.weight' dim 1 has {stat}" in why for why in inputs.pinned), inputs.pinned
    outputs = _group(dep, "b.weight", "out")
    assert outputs.prunable, outputs.pinned
    assert {s.param for s in outputs.sites if s.role == "out"} == set(sliced)

    r = _compile(model, X)
    kept = len(r.plan.kept[outputs.id])
    assert 0 < kept < 16
    pruned = r.graph_module
    for name in sliced:
        assert pruned.get_parameter(name).shape[0] == kept, name
    assert pruned.c.in_channels == pruned.c.weight.shape[1] == kept
    assert pruned.b.weight.shape[1] == 16  # pinned input channels keep every column


def test_depthwise_standardised_conv_prunes_with_its_input() -> None:
    """Depthwise, each output row is standardised over its own kernel only: nothing is mixed, the channels
    are free, and ``reshape(1, self.out_channels, -1)``/``reshape_as`` (a size-1 input dim) follow them."""

    class DW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = StdConv(16, 16, 3, padding=1, groups=16)
            self.c = nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    torch.manual_seed(0)
    model = DW()
    g = _group(fxprune.dependency_graph(model.eval(), X), "b.weight", "out")
    assert g.prunable and {s.param for s in g.sites if s.role == "out"} == {
        "a.weight",
        "a.bias",
        "b.weight",
        "b.bias",
    }
    r = _compile(model, X)
    kept = r.graph_module.b.weight.shape[0]
    assert (
        kept < 16
        and r.graph_module.a.weight.shape[0] == kept
        and f"reshape(1, {kept}, -1)" in r.graph_module.code
    )


def test_per_input_channel_scale_prunes_both_dims() -> None:
    """``w * s`` with ``s`` per input channel mixes nothing: the input channels are free too, and ``s`` is
    sliced with them (the masked oracle zeroes the columns of both)."""
    torch.manual_seed(0)
    model = ConvNet(InScaledConv)
    dep = fxprune.dependency_graph(model.eval(), X)
    inputs = _group(dep, "b.weight", "in")
    assert inputs.prunable, inputs.pinned
    assert {s.param for s in inputs.sites if s.role == "in"} == {"b.weight", "b.s"}
    r = _compile(model, X)
    kept = r.graph_module.a.weight.shape[0]
    assert kept < 16 and r.graph_module.b.s.shape[1] == r.graph_module.b.weight.shape[1] == kept


def test_added_term_pins_the_input_channels() -> None:
    """``w + delta``: zeroing ``w``'s input columns (the masked oracle) does not zero the computed weight's,
    so the input channels are pinned; the output channels (``delta`` sliced with them) are free."""
    dep = fxprune.dependency_graph(ConvNet(ShiftedConv).eval(), X)
    inputs = _group(dep, "b.weight", "in")
    assert any("is not zero where its parameters' input columns are zero" in why for why in inputs.pinned)
    outputs = _group(dep, "b.weight", "out")
    assert outputs.prunable and {s.param for s in outputs.sites} >= {"b.weight", "b.delta", "b.bias"}


def test_same_padding_conv_is_channel_wise() -> None:
    """The pad of a 'same'-padding conv runs over the spatial dims: nothing is pinned on its account."""
    torch.manual_seed(0)
    model = ConvNet(Conv2dSame, stride=2)
    dep = fxprune.dependency_graph(model.eval(), X)
    for param in ("a.weight", "b.weight"):
        assert _group(dep, param, "out").prunable, _group(dep, param, "out").pinned
    r = _compile(model, X)
    assert r.graph_module.b.weight.shape[0] < 16


class WNLinear(nn.Linear):
    """A weight-normalised linear: every output row of the weight has norm ``g``."""

    def __init__(self, fin: int, fout: int, how: str) -> None:
        super().__init__(fin, fout)
        self.g = nn.Parameter(torch.rand(fout, 1) + 0.5)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.how == "normalize":
            v = F.normalize(w, dim=1)
        elif self.how == "norm":
            v = w / w.norm(dim=1, keepdim=True)
        else:  # over the whole weight: every row depends on every other
            v = w / w.norm()
        return F.linear(x, self.g * v, self.bias)


class MLP(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = WNLinear(32, 32, how)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


XL = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("how", "stat"), [("normalize", "a normalize across it"), ("norm", "a norm across it")]
)
def test_weight_normalised_linear_prunes_its_rows(how: str, stat: str) -> None:
    torch.manual_seed(0)
    model = MLP(how)
    dep = fxprune.dependency_graph(model.eval(), XL)
    inputs = _group(dep, "fc2.weight", "in")
    assert any(f"parameter 'fc2.weight' dim 1 has {stat}" in why for why in inputs.pinned), inputs.pinned
    outputs = _group(dep, "fc2.weight", "out")
    assert outputs.prunable, outputs.pinned
    assert {s.param for s in outputs.sites} == {"fc2.weight", "fc2.g", "fc2.bias", "fc3.weight"}
    r = _compile(model, XL)
    kept = len(r.plan.kept[outputs.id])
    pruned = r.graph_module
    assert pruned.fc2.weight.shape == (kept, 32) and pruned.fc2.g.shape == (kept, 1)
    assert pruned.fc3.in_features == pruned.fc3.weight.shape[1] == kept


def test_statistic_over_the_whole_weight_pins_both_dims() -> None:
    """``w / w.norm()``: every entry depends on every row and column, so the output channels are pinned
    too, with the same reason."""
    dep = fxprune.dependency_graph(MLP("all").eval(), XL)
    for role, dim in (("in", 1), ("out", 0)):
        g = _group(dep, "fc2.weight", role)
        assert any(f"parameter 'fc2.weight' dim {dim} has a norm across it" in why for why in g.pinned), (
            g.pinned
        )


def test_reshape_literal_follows_the_kept_rows() -> None:
    """``reshape(1, self.out_channels, -1)`` has the count as a literal: the rewrite writes the kept one."""
    torch.manual_seed(0)
    model = ConvNet(StdConv)
    r = _compile(model, X)
    kept = r.graph_module.b.weight.shape[0]
    assert kept < 16
    assert f"reshape(1, {kept}, -1)" in r.graph_module.code
    assert math.isfinite(r.verification.max_abs_error)
