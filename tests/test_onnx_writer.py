"""fxprune's direct fx -> ONNX writer (``fxprune.onnx_writer``), op by op against eager in ONNX Runtime.

Every ONNX translation of the default op table (``OpEntry.onnx``) is exercised by some case of ``CASES`` (checked
by ``test_every_rule_is_exercised``), with the non-default arguments the writer reads. Each case is traced,
written, run in ONNX Runtime with graph optimisations off (``"none"``: the nodes as written) and at the
deployed level (``"all"``: fusions and layout transformations), and compared with ``gm(*example)``.
Then: external initializers, the ``Unsupported`` signal, the fallback to torch's exporter in
``fxprune.verify``, regressions of writer bugs found by these tests, and compiles that are verified with
the writer's model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from conftest import randomize_norms
from fxprune.models_zoo.toy import ResidualNet
from fxprune.passes import op_table
from fxprune.passes.onnx_translate import unary
from torch import nn
from torchvision.ops import StochasticDepth

import fxprune
from fxprune import onnx_writer
from fxprune.onnx_writer import Unsupported, write_onnx
from fxprune.trace import shape_propagate, trace
from fxprune.verify import export_onnx, flatten_outputs, ort_session, verify_onnx

#: max |ORT - eager| <= RTOL x max |eager| for each output (float32 kernels that round differently)
RTOL = 1e-5


# -- helpers -------------------------------------------------------------------------------------------------
def _inputs(shapes: Sequence[tuple[int, ...]], scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) * scale for s in shapes)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerNorm affine parameters (fresh ones are the identity), eval."""
    randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()


def _ort_outputs(
    blob: bytes,
    example: Sequence[torch.Tensor],
    level: str = "none",
    externals: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """ORT's outputs, the example fed to the model's declared graph inputs in order."""
    names = [i.name for i in onnx.load_from_string(blob).graph.input]
    assert len(names) == len(example)
    sess = ort_session(blob, level, externals)
    return sess.run(None, {n: t.numpy() for n, t in zip(names, example, strict=True)})


def _errors(got: list[np.ndarray], out: Any) -> list[tuple[float, float]]:
    """(max abs error, max |eager|) per output; shapes and count must match."""
    ref = [t.detach().numpy() for t in flatten_outputs(out)]
    assert len(got) == len(ref), f"ONNX model has {len(got)} outputs, eager has {len(ref)}"
    res = []
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape, f"output {i}: ONNX shape {g.shape}, eager {r.shape}"
        assert g.dtype == np.float32, f"output {i}: {g.dtype}"
        res.append((float(np.abs(g.astype(np.float64) - r).max()), float(np.abs(r).max())))
    return res


def assert_writer_matches_eager(
    gm: fx.GraphModule,
    example: Sequence[torch.Tensor],
    rtol: float = RTOL,
    levels: Sequence[str] = ("none", "all"),
) -> bytes:
    """Write ``gm``, check the model, run it in ORT at each level and compare every output with eager."""
    blob, externals = write_onnx(gm, example)
    assert externals == {}
    # not full_check: ONNX's shape inference lacks torch's (and ORT's) ceil_mode rule for the last window
    onnx.checker.check_model(onnx.load_from_string(blob))
    with torch.no_grad():
        out = gm(*example)
    for level in levels:
        for i, (err, scale) in enumerate(_errors(_ort_outputs(blob, example, level), out)):
            assert scale > 0, f"output {i} is all zeros: the comparison would be vacuous"
            assert err <= rtol * scale, f"{level}: output {i}: max abs error {err:.3g} > {rtol} x {scale:.3g}"
    # ORT takes the placeholders as its inputs (no initializer shadows one)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert [i.name for i in ort_session(blob, "none").get_inputs()] == placeholders
    return blob


def _op_types(blob: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(blob).graph.node}


class Fn(nn.Module):
    """A one-off model: ``forward(x) = fn(self, x)``, with ``children`` as submodules."""

    def __init__(self, fn: Callable[..., Any], **children: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, v in children.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self, x)


class Fn2(Fn):
    """``forward(x, y) = fn(self, x, y)``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:  # type: ignore[override]
        return self.fn(self, x, y)


def _params(**shapes: tuple[int, ...]) -> nn.Module:
    """A child module holding random parameters (read in ``forward`` as nested ``get_attr`` nodes)."""
    m = nn.Module()
    for k, s in shapes.items():
        setattr(m, k, nn.Parameter(torch.rand(s) + 0.5))
    return m


def _graph_module(fn: Callable[..., Any], **attrs: Any) -> fx.GraphModule:
    """A GraphModule holding one ``call_function`` node, for targets that tracing never records."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(fn, (x,), attrs))
    return fx.GraphModule(nn.Module(), g)


# -- the cases ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    ops: set[str] = field(default_factory=set)  # ONNX op types the model must contain
    scale: float = 1.0  # input scale (activations: reach their saturated ranges)

    def build(self) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
        model = self.make()
        gm = model if isinstance(model, fx.GraphModule) else trace(_randomize(model))
        return gm.eval(), _inputs(self.shapes, self.scale)


CASES = [
    # -- convolution
    Case("conv2d_stride_pad_dilation_nobias", lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=(1, 2), dilation=2, bias=False)),
         ((2, 3, 11, 13),), {"Conv"}),
    Case("conv2d_groups_bias_rect", lambda: nn.Sequential(nn.Conv2d(4, 8, (3, 1), stride=(1, 2), padding=(1, 0), groups=2)),
         ((2, 4, 7, 9),), {"Conv"}),
    Case("conv2d_depthwise", lambda: nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)), ((1, 6, 5, 5),), {"Conv"}),
    Case("conv1d", lambda: nn.Sequential(nn.Conv1d(4, 6, 5, stride=2, padding=3, dilation=2, bias=False), nn.Conv1d(6, 3, 1)),
         ((2, 4, 17),), {"Conv"}),
    Case("conv3d_groups", lambda: nn.Sequential(nn.Conv3d(2, 4, (3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1), groups=2)),
         ((1, 2, 5, 6, 7),), {"Conv"}),
    # -- transposed convolution (weight [C_in, C_out/groups, *k]; output_padding read off the shapes)
    Case("conv_transpose2d_stride_pad_outpad_dilation", lambda: nn.Sequential(
             nn.ConvTranspose2d(3, 5, 3, stride=2, padding=(1, 2), output_padding=1, dilation=(2, 3))),
         ((2, 3, 5, 6),), {"ConvTranspose"}),
    Case("conv_transpose2d_groups_nobias", lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 1), groups=2, bias=False)),
         ((1, 4, 4, 5),), {"ConvTranspose"}),
    Case("conv_transpose2d_depthwise_multiplier", lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 2, stride=2, groups=3)),
         ((1, 3, 4, 4),), {"ConvTranspose"}),
    Case("conv_transpose2d_output_size", lambda: Fn(lambda s, x: s.up(x, output_size=[9, 11]), up=nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)),
         ((1, 3, 5, 6),), {"ConvTranspose"}),
    Case("conv_transpose1d", lambda: nn.Sequential(nn.ConvTranspose1d(4, 3, 4, stride=3, padding=1, output_padding=2)),
         ((2, 4, 7),), {"ConvTranspose"}),
    Case("conv_transpose3d_groups", lambda: nn.Sequential(nn.ConvTranspose3d(4, 2, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 0), groups=2)),
         ((1, 4, 3, 4, 3),), {"ConvTranspose"}),
    # -- pixel (un)shuffle: DepthToSpace (CRD); Reshape, Transpose, Reshape
    Case("pixel_shuffle", lambda: Fn(lambda s, x: (s.ps(x), F.pixel_shuffle(x, 3), torch.pixel_shuffle(x, upscale_factor=1)),
                                     ps=nn.PixelShuffle(3)),
         ((2, 18, 3, 4),), {"DepthToSpace"}),
    Case("pixel_unshuffle", lambda: Fn(lambda s, x: (s.pu(x), F.pixel_unshuffle(x, 3), torch.pixel_unshuffle(x, downscale_factor=1)),
                                       pu=nn.PixelUnshuffle(3)),
         ((2, 2, 6, 9),), {"Reshape", "Transpose"}),
    # -- interpolation: Resize (scales when torch uses the scale factor, else the static sizes)
    Case("interpolate_nearest", lambda: Fn(lambda s, x: (F.interpolate(x, scale_factor=2), F.interpolate(x, size=(7, 9)),
                                                         F.interpolate(x, scale_factor=(1.5, 0.5)),
                                                         F.interpolate(x, scale_factor=1.7, recompute_scale_factor=True))),
         ((1, 2, 5, 6),), {"Resize"}),
    Case("interpolate_nearest_exact", lambda: Fn(lambda s, x: (F.interpolate(x, scale_factor=2, mode="nearest-exact"),
                                                               F.interpolate(x, size=(7, 4), mode="nearest-exact"))),
         ((1, 2, 5, 6),), {"Resize"}),
    Case("interpolate_bilinear", lambda: Fn(lambda s, x: (F.interpolate(x, scale_factor=2, mode="bilinear"),
                                                          F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
                                                          F.interpolate(x, scale_factor=0.5, mode="bilinear"),
                                                          F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=True))),
         ((1, 2, 5, 6),), {"Resize"}),
    Case("interpolate_bicubic", lambda: Fn(lambda s, x: (F.interpolate(x, scale_factor=2, mode="bicubic"),
                                                         F.interpolate(x, size=(4, 9), mode="bicubic", align_corners=True))),
         ((1, 2, 5, 6),), {"Resize"}),
    Case("interpolate_linear_1d_trilinear_3d", lambda: Fn2(lambda s, x, y: (F.interpolate(x, scale_factor=3, mode="linear"),
                                                                           F.interpolate(x, size=4, mode="linear", align_corners=True),
                                                                           F.interpolate(y, scale_factor=2, mode="trilinear"),
                                                                           F.interpolate(y, size=(3, 5, 2), mode="nearest"))),
         ((2, 3, 5), (1, 2, 3, 4, 3)), {"Resize"}),
    Case("upsample_modules", lambda: Fn(lambda s, x: (s.a(x), s.b(x), s.c(x), s.d(x)), a=nn.Upsample(scale_factor=2, mode="bilinear"),
                                        b=nn.UpsamplingNearest2d(scale_factor=2), c=nn.UpsamplingBilinear2d(size=(9, 7)),
                                        d=nn.Upsample(size=(6, 4), mode="bicubic")),
         ((1, 2, 5, 6),), {"Resize"}),
    # -- linear
    Case("linear_2d_bias", lambda: nn.Sequential(nn.Linear(8, 5)), ((3, 8),), {"Gemm"}),
    Case("linear_2d_nobias", lambda: nn.Sequential(nn.Linear(8, 5, bias=False)), ((3, 8),), {"Gemm"}),
    Case("linear_3d_bias", lambda: nn.Sequential(nn.Linear(8, 5)), ((2, 3, 8),), {"MatMul", "Add"}),
    Case("linear_4d_nobias", lambda: nn.Sequential(nn.Linear(8, 5, bias=False)), ((2, 2, 3, 8),), {"MatMul"}),
    Case("linear_subclass", lambda: nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 5)), ((3, 8),), {"Gemm"}),
    # -- normalisation
    Case("batchnorm1d_2d_and_3d", lambda: Fn2(lambda s, x, y: (s.a(x), s.b(y)), a=nn.BatchNorm1d(4), b=nn.BatchNorm1d(4)),
         ((3, 4), (3, 4, 5)), {"BatchNormalization"}),
    Case("batchnorm2d_no_affine", lambda: nn.Sequential(nn.BatchNorm2d(5, affine=False, eps=1e-3)), ((2, 5, 3, 4),), {"BatchNormalization"}),
    Case("batchnorm2d_after_conv", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), ((2, 3, 6, 6),),
         {"Conv", "BatchNormalization"}),
    Case("batchnorm3d", lambda: nn.Sequential(nn.BatchNorm3d(3)), ((2, 3, 2, 3, 4),), {"BatchNormalization"}),
    Case("layernorm_2_trailing_dims", lambda: nn.Sequential(nn.LayerNorm((4, 5), eps=1e-3)), ((2, 3, 4, 5),), {"LayerNormalization"}),
    Case("layernorm_no_affine", lambda: nn.Sequential(nn.LayerNorm(5, elementwise_affine=False)), ((2, 3, 5),), {"LayerNormalization"}),
    Case("layernorm_no_bias", lambda: nn.Sequential(nn.LayerNorm(5, bias=False)), ((2, 3, 5),), {"LayerNormalization"}),
    # -- pooling
    Case("maxpool1d_pad_ceil", lambda: nn.Sequential(nn.MaxPool1d(3, 2, padding=1, ceil_mode=True)), ((2, 3, 10),), {"MaxPool"}),
    Case("maxpool2d_pad_dilation_ceil", lambda: nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)),
         ((1, 2, 10, 9),), {"MaxPool"}),
    Case("maxpool2d_ceil_last_window_in_pad", lambda: nn.Sequential(nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)), ((1, 2, 5, 5),),
         {"MaxPool"}),
    Case("maxpool2d_default_stride", lambda: nn.Sequential(nn.MaxPool2d((2, 3))), ((1, 2, 6, 7),), {"MaxPool"}),
    Case("maxpool3d_ceil", lambda: nn.Sequential(nn.MaxPool3d(2, ceil_mode=True)), ((1, 2, 3, 5, 4),), {"MaxPool"}),
    Case("avgpool1d_no_count_pad", lambda: nn.Sequential(nn.AvgPool1d(3, 2, padding=1, count_include_pad=False)), ((2, 3, 10),),
         {"AveragePool"}),
    Case("avgpool2d_pad_ceil_count_pad", lambda: nn.Sequential(nn.AvgPool2d(3, 2, padding=1, ceil_mode=True)), ((1, 2, 6, 7),),
         {"AveragePool"}),
    Case("avgpool2d_ceil_no_count_pad", lambda: nn.Sequential(nn.AvgPool2d((2, 3), stride=(2, 1), padding=1, ceil_mode=True,
                                                          count_include_pad=False)), ((1, 2, 7, 6),), {"AveragePool"}),
    Case("avgpool3d_ceil", lambda: nn.Sequential(nn.AvgPool3d(2, ceil_mode=True)), ((1, 2, 3, 5, 4),), {"AveragePool"}),
    Case("adaptive1d_to_1", lambda: nn.Sequential(nn.AdaptiveAvgPool1d(1)), ((2, 3, 9),), {"GlobalAveragePool"}),
    Case("adaptive1d_to_divisor", lambda: nn.Sequential(nn.AdaptiveAvgPool1d(3)), ((2, 3, 9),), {"AveragePool"}),
    Case("adaptive2d_to_1x1", lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1)), ((2, 3, 6, 5),), {"GlobalAveragePool"}),
    Case("adaptive2d_to_divisor", lambda: nn.Sequential(nn.AdaptiveAvgPool2d((2, 3))), ((2, 3, 6, 9),), {"AveragePool"}),
    Case("adaptive3d_to_1", lambda: nn.Sequential(nn.AdaptiveAvgPool3d((1, 1, 1))), ((1, 2, 4, 3, 6),), {"GlobalAveragePool"}),
    Case("adaptive3d_to_divisor", lambda: nn.Sequential(nn.AdaptiveAvgPool3d((2, 1, 2))), ((1, 2, 4, 3, 6),), {"AveragePool"}),
    # -- activations (inputs x4: ReLU6 clips at 6, the hard ones saturate beyond +-3)
    Case("relu", lambda: nn.Sequential(nn.ReLU()), ((2, 50),), {"Relu"}, 4.0),
    Case("relu6", lambda: nn.Sequential(nn.ReLU6()), ((2, 50),), {"Clip"}, 4.0),
    Case("silu", lambda: nn.Sequential(nn.SiLU()), ((2, 50),), {"Sigmoid", "Mul"}, 4.0),
    Case("gelu_erf", lambda: nn.Sequential(nn.GELU()), ((2, 50),), {"Erf"}, 4.0),
    Case("gelu_tanh", lambda: nn.Sequential(nn.GELU(approximate="tanh")), ((2, 50),), {"Tanh"}, 4.0),
    Case("sigmoid", lambda: nn.Sequential(nn.Sigmoid()), ((2, 50),), {"Sigmoid"}, 4.0),
    Case("tanh", lambda: nn.Sequential(nn.Tanh()), ((2, 50),), {"Tanh"}, 4.0),
    Case("hardswish", lambda: nn.Sequential(nn.Hardswish()), ((2, 50),), {"HardSwish"}, 4.0),
    Case("hardsigmoid", lambda: nn.Sequential(nn.Hardsigmoid()), ((2, 50),), {"HardSigmoid"}, 4.0),
    Case("dropout_identity_flatten", lambda: nn.Sequential(nn.Dropout(0.5), nn.Identity(), nn.Flatten()), ((2, 3, 4, 5),),
         {"Reshape"}),
    Case("flatten_module_dims", lambda: nn.Sequential(nn.Flatten(1, 2)), ((2, 3, 4, 5),), {"Reshape"}),
    # -- binary ops: node/node with broadcasting, a Python scalar on either side
    Case("add_mul_nodes", lambda: Fn2(lambda s, x, y: (x + y, x * y, torch.add(x, y), torch.mul(y, x), x.add(y), x.mul(y))),
         ((2, 3, 4), (4,)), {"Add", "Mul"}),
    Case("add_mul_scalars", lambda: Fn(lambda s, x: (x + 1, 2.5 + x, x * 3, 0.5 * x, torch.add(x, 2), torch.mul(x, -1.5),
                                                     x.add(0.25), x.mul(7))),
         ((2, 3),), {"Add", "Mul"}),
    Case("add_same_node", lambda: Fn(lambda s, x: (x + x) * x), ((2, 3),), {"Add", "Mul"}),
    # -- shape ops
    Case("cat", lambda: Fn2(lambda s, x, y: (torch.cat((x, y), dim=-1), torch.cat([y, x, y], 1),
                                             torch.concat([x, x], dim=-3), torch.cat(tensors=(x, y), dim=2))),
         ((2, 3, 4), (2, 3, 4)), {"Concat"}),
    Case("permute", lambda: Fn(lambda s, x: (torch.permute(x, (0, 2, 3, 1)), x.permute(0, 3, 1, 2),
                                             x.permute((2, 0, 1, 3)), x.permute(-1, 0, -3, 2), torch.permute(x, dims=(3, 2, 1, 0)))),
         ((2, 3, 4, 5),), {"Transpose"}),
    Case("flatten_view_reshape", lambda: Fn(lambda s, x: (torch.flatten(x, 1), x.flatten(2), x.flatten(), x.view(2, -1),
                                                          x.view(6, 4, 5), x.reshape(-1, 10), torch.reshape(x, (5, 4, 6)),
                                                          x.permute(0, 2, 1, 3).contiguous().view(2, 4, 15))),
         ((2, 3, 4, 5),), {"Reshape", "Transpose"}),
    Case("mean", lambda: Fn(lambda s, x: (x.mean((2, 3)), x.mean(dim=-1, keepdim=True), torch.mean(x, 1),
                                          torch.mean(x, (1, -2), keepdim=True), x.mean([0, 1, 2, 3]))),
         ((2, 3, 4, 5),), {"ReduceMean"}),
    # -- functional forms
    Case("f_layer_norm_get_attr", lambda: Fn(lambda s, x: (F.layer_norm(x, (5,), s.p.weight, s.p.bias, eps=1e-3),
                                                           F.layer_norm(x, [4, 5], s.q.weight),
                                                           F.layer_norm(x, (5,)),
                                                           F.layer_norm(x, (5,), None, s.p.bias, 1e-2)),
                                             p=_params(weight=(5,), bias=(5,)), q=_params(weight=(4, 5))),
         ((2, 3, 4, 5),), {"LayerNormalization"}),
    Case("f_linear_get_attr", lambda: Fn(lambda s, x: (F.linear(x, s.p.weight, s.p.bias), F.linear(x, s.p.weight),
                                                       F.linear(x.flatten(0, 1), s.p.weight, bias=s.p.bias)),
                                         p=_params(weight=(5, 8), bias=(5,))),
         ((2, 3, 8),), {"MatMul", "Gemm"}),
    Case("f_relu_sigmoid", lambda: Fn(lambda s, x: (F.relu(x), torch.relu(x), torch.sigmoid(x), x.sigmoid())),
         ((2, 50),), {"Relu", "Sigmoid"}, 4.0),
    Case("f_sigmoid", lambda: _graph_module(F.sigmoid), ((2, 50),), {"Sigmoid"}, 4.0),
    Case("f_gelu_and_relu_method", lambda: Fn(lambda s, x: (F.gelu(x), F.gelu(x, approximate="tanh"), x.relu())),
         ((2, 50),), {"Erf", "Tanh", "Relu"}, 4.0),
    Case("f_adaptive_avg_pool2d", lambda: Fn(lambda s, x: (F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, (2, 3)))),
         ((2, 3, 4, 6),), {"GlobalAveragePool", "AveragePool"}),
    Case("f_max_pool2d", lambda: Fn(lambda s, x: (F.max_pool2d(x, 3, 2, 1, ceil_mode=True), F.max_pool2d(x, kernel_size=2),
                                                  F.max_pool2d(x, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1)))),
         ((1, 2, 7, 8),), {"MaxPool"}),
    Case("f_avg_pool2d", lambda: Fn(lambda s, x: (F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
                                                  F.avg_pool2d(x, 2, ceil_mode=True),
                                                  F.avg_pool2d(x, (3, 2), (2, 1), (1, 0), True, True))),
         ((1, 2, 7, 8),), {"AveragePool"}),
    Case("f_dropout_eval", lambda: Fn(lambda s, x: F.dropout(x, 0.5, False) + F.dropout(x, p=0.3, training=False)),
         ((2, 3),), {"Add"}),
    Case("stochastic_depth_eval", lambda: Fn(lambda s, x: s.sd(x) + x, sd=StochasticDepth(0.3, "row")), ((4, 3, 2),),
         {"Add"}),
    # -- outputs
    Case("output_with_none", lambda: Fn(lambda s, x: (torch.relu(x), None, {"n": None})), ((2, 50),), {"Relu"}),
    Case("outputs_nested_and_input", lambda: Fn(lambda s, x: (s.c(x), {"a": torch.relu(x), "b": x}, [(x * 2,)]),
                                                c=nn.Conv2d(2, 2, 1)),
         ((1, 2, 3, 3),), {"Conv", "Relu", "Identity"}),
    Case("outputs_same_node_twice", lambda: Fn(lambda s, x: (lambda y: (y, {"again": y}, [y]))(torch.sigmoid(x))),
         ((2, 3),), {"Sigmoid"}),
    Case("output_dict", lambda: Fn2(lambda s, x, y: {"sum": x + y, "prod": x * y, "x": x}), ((2, 3), (2, 3)), {"Add"}),
]  # fmt: skip


def _params_of(cases: Sequence[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _params_of(CASES))
def test_writer_matches_eager(case: Case) -> None:
    gm, example = case.build()
    blob = assert_writer_matches_eager(gm, example)
    assert case.ops <= _op_types(blob), f"expected ONNX ops {case.ops - _op_types(blob)} missing"


def _table_key(gm: fx.GraphModule, n: fx.Node) -> Any:
    """The key of the default table's entry that translates ``n`` (a module: its class, or the base whose
    entry it inherits)."""
    if n.op == "call_module":
        cls = type(gm.get_submodule(str(n.target)))
        return next((c for c in cls.__mro__ if c in op_table.DEFAULT_TABLE), None)
    if n.op == "call_method":
        return str(n.target)
    if n.op == "call_function":
        return n.target
    return None


def test_every_rule_is_exercised() -> None:
    """Each ONNX translation of the default op table is used by some node in ``CASES`` (a new one needs a
    case)."""
    seen = set()
    for case in CASES:
        gm, _ = case.build()
        seen |= {k for n in gm.graph.nodes if (k := _table_key(gm, n)) is not None}
    expected = {k for k, e in op_table.DEFAULT_TABLE.items() if e.onnx is not None}
    assert not expected - seen, f"translations without a case: {sorted(map(str, expected - seen))}"


# -- external initializers ----------------------------------------------------------------------------------
def _big_model() -> fx.GraphModule:
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 10),
    )  # fmt: skip
    return trace(_randomize(model))


def test_external_initializers_same_outputs_much_smaller_blob() -> None:
    gm = _big_model()
    (x,) = _inputs([(2, 16, 8, 8)])
    inline, none = write_onnx(gm, (x,))
    blob, externals = write_onnx(gm, (x,), external=True)
    assert none == {}
    assert len(blob) < 0.1 * len(inline), (len(blob), len(inline))
    # what is left out: exactly the float32 initializers of EXTERNAL_MIN_BYTES or more, marked external
    graph = onnx.load_from_string(blob).graph
    marked = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert marked == set(externals) and "#0.weight" in marked and "#5.weight.T" in marked
    for t in graph.initializer:
        if t.name not in marked:
            assert len(t.raw_data) < onnx_writer.EXTERNAL_MIN_BYTES, t.name
    for name, arr in externals.items():
        assert arr.dtype == np.float32 and arr.nbytes >= onnx_writer.EXTERNAL_MIN_BYTES, name
    # weights are not copied (the transposed linear weight is a new array)
    assert np.shares_memory(externals["#0.weight"], gm.get_submodule("0").weight.detach().numpy())
    np.testing.assert_array_equal(externals["#5.weight.T"], gm.get_submodule("5").weight.detach().numpy().T)
    with torch.no_grad():
        out = gm(x)
    got_ext = _ort_outputs(blob, (x,), "basic", externals)
    got_inline = _ort_outputs(inline, (x,), "basic")
    for (err, scale), a, b in zip(_errors(got_ext, out), got_ext, got_inline, strict=True):
        assert err <= RTOL * scale
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale)
    # the blob really lacks the weights: without them ONNX Runtime cannot build a session
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own exception types
        ort_session(blob, "basic")


def test_example_none_uses_propagated_shapes() -> None:
    gm = _big_model()
    example = _inputs([(1, 16, 5, 5)])
    shape_propagate(gm, example, count_flops=False)
    assert write_onnx(gm)[0] == write_onnx(gm, example)[0]


# -- Unsupported --------------------------------------------------------------------------------------------
def _buffer(t: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.register_buffer("b", t)
    return m


def _pool_with_indices(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return s.pool(x)[0]


UNSUPPORTED = [
    # (id, model (eval mode unless the id ends with _training), input dtype, the message)
    ("interpolate_area", lambda: Fn(lambda s, x: F.interpolate(x, size=(2, 3), mode="area")), torch.float32,
     r"interpolate: interpolate mode='area'"),
    ("interpolate_antialias", lambda: Fn(lambda s, x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)),
     torch.float32, r"interpolate: .*antialias=True"),
    ("pixel_shuffle_rank_3", lambda: Fn(lambda s, x: F.pixel_shuffle(x.flatten(0, 1), 1)), torch.float32,
     r"pixel_shuffle: pixel_shuffle of a rank-3 input"),
    ("batchnorm_training", lambda: Fn(lambda s, x: s.bn(x), bn=nn.BatchNorm2d(3)), torch.float32,
     r"module bn \(BatchNorm2d, training\)"),
    ("layernorm_training", lambda: Fn(lambda s, x: s.ln(x), ln=nn.LayerNorm(6)), torch.float32,
     r"module ln \(LayerNorm, training\)"),
    ("dropout_module_training", lambda: Fn(lambda s, x: s.drop(x), drop=nn.Dropout(0.2)), torch.float32,
     r"module drop \(Dropout, training\)"),
    ("stochastic_depth_training", lambda: Fn(lambda s, x: s.sd(x), sd=StochasticDepth(0.2, "row")), torch.float32,
     r"stochastic_depth: stochastic depth in training mode"),
    ("f_dropout_training_true", lambda: Fn(lambda s, x: F.dropout(x, 0.2, training=True)), torch.float32,
     r"dropout: dropout in training mode"),
    ("conv_reflect", lambda: Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
     torch.float32, r"conv: transposed/padding_mode"),
    ("conv_padding_same", lambda: Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3, padding="same")),
     torch.float32, r"conv: .*string padding"),
    ("size_in_view", lambda: Fn(lambda s, x: x.view(x.size(1), -1)), torch.float32, r"^size is not a float32 tensor"),
    ("float64_input", lambda: Fn(lambda s, x: s.conv(x), conv=nn.Conv2d(3, 4, 3).double()), torch.float64,
     r"^x is not a float32 tensor"),
    ("float64_buffer", lambda: Fn(lambda s, x: x * s.p.b, p=_buffer(torch.ones(6, dtype=torch.float64))),
     torch.float32, r"^p_b is not a float32 tensor"),
    ("adaptive_not_divisor", lambda: Fn(lambda s, x: s.pool(x), pool=nn.AdaptiveAvgPool2d(4)), torch.float32,
     r"pool: adaptive pool \(5, 6\) -> \(4, 4\) \(not a divisor\)"),
    ("f_adaptive_not_divisor", lambda: Fn(lambda s, x: F.adaptive_avg_pool2d(x, (2, 4))), torch.float32,
     r"adaptive_avg_pool2d: adaptive pool \(5, 6\) -> \(2, 4\)"),
    ("avgpool_divisor_override", lambda: Fn(lambda s, x: s.pool(x), pool=nn.AvgPool2d(2, divisor_override=3)),
     torch.float32, r"pool: divisor_override"),
    ("f_avgpool_divisor_override", lambda: Fn(lambda s, x: F.avg_pool2d(x, 2, divisor_override=3)), torch.float32,
     r"avg_pool2d: divisor_override"),
    ("maxpool_indices", lambda: Fn(_pool_with_indices, pool=nn.MaxPool2d(2, return_indices=True)), torch.float32,
     r"^pool is not a float32 tensor"),
    ("mean_all_dims", lambda: Fn(lambda s, x: x.mean()), torch.float32, r"mean: mean over all dims"),
    ("add_alpha", lambda: Fn(lambda s, x: torch.add(x, x, alpha=2)), torch.float32, r"add: Add with \{'alpha': 2\}"),
    ("sub", lambda: Fn(lambda s, x: x - 1), torch.float32, r"call_function sub"),
    ("f_linear_computed_weight", lambda: Fn(lambda s, x: F.linear(x, s.p.w * 2), p=_params(w=(4, 6))),
     torch.float32, r"linear: linear with a computed weight"),
    ("output_size", lambda: Fn(lambda s, x: (torch.relu(x), x.size(1))), torch.float32, r"size is not a float32"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "dtype", "match"), [u[1:] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED]
)
def test_unsupported_raises_naming_the_node(
    make: Callable[[], nn.Module], dtype: torch.dtype, match: str, request: pytest.FixtureRequest
) -> None:
    model = make().train(request.node.callspec.id.endswith("_training"))
    gm = trace(model)
    (x,) = _inputs([(2, 3, 5, 6)])
    with pytest.raises(Unsupported, match=match):
        write_onnx(gm, (x.to(dtype),))


# -- fallback to torch's exporter (fxprune.verify) ----------------------------------------------------------
def _conv_relu() -> fx.GraphModule:
    return trace(
        _randomize(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        )
    )


def _with_sub() -> fx.GraphModule:
    """Supported ops around one the writer lacks (``operator.sub``)."""
    return trace(_randomize(Fn(lambda s, x: s.b(s.a(x) - 0.5), a=nn.Conv2d(3, 8, 3), b=nn.Conv2d(8, 4, 1))))


def _top_level_parameters() -> nn.Module:
    """Parameters of the root module read by ``get_attr`` nodes named like their targets."""
    m = Fn(lambda s, x: F.layer_norm(x, (6,), s.weight, s.bias) * s.scale)
    m.weight, m.bias, m.scale = (nn.Parameter(torch.rand(6) + 0.5) for _ in range(3))
    return m


def _parameter_named_like_input() -> nn.Module:
    """A root parameter ``x`` next to the forward argument ``x`` (the get_attr node becomes ``x_1``)."""
    m = Fn(lambda s, x: torch.relu(x) * s.x)
    m.x = nn.Parameter(torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(123)))
    return m


EXPORTS = [
    # (id, model, the exporter export_onnx must name)
    ("supported_graph_module", _conv_relu, "fxprune"),
    ("plain_module", lambda: _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), "torchscript"),
    ("unsupported_op", _with_sub, "torchscript"),
    # regressions: each of these once crashed the writer or gave an invalid or wrong model
    ("avgpool1d", lambda: trace(Fn(lambda s, x: s.pool(x.flatten(2)), pool=nn.AvgPool1d(3)).eval()), "fxprune"),
    ("permute_dims_kwarg", lambda: trace(Fn(lambda s, x: x.permute(dims=(0, 2, 3, 1))).eval()), "fxprune"),
    ("top_level_parameters", lambda: trace(_top_level_parameters().eval()), "fxprune"),
    ("parameter_named_like_input", lambda: trace(_parameter_named_like_input().eval()), "fxprune"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "exporter"),
    [pytest.param(m, e, id=i) for i, m, e in EXPORTS],
)
def test_export_onnx_names_its_exporter_and_matches_eager(
    make: Callable[[], nn.Module], exporter: str
) -> None:
    model = make().eval()
    example = _inputs([(2, 3, 5, 6)])
    blob, name = export_onnx(model, example)
    assert name == exporter
    with torch.no_grad():
        out = model(*example)
    for err, scale in _errors(_ort_outputs(blob, example, "basic"), out):
        assert err <= RTOL * scale


def test_verify_onnx_falls_back_for_an_unsupported_op() -> None:
    gm = _with_sub()
    with pytest.raises(Unsupported, match="sub"):
        write_onnx(gm, _inputs([(1, 3, 8, 8)]))
    v = verify_onnx(gm, _inputs([(1, 3, 8, 8)]), latency_runs=0)
    assert v.passed and v.exporter == "torchscript" and v.max_rel_error <= v.rtol, v


def test_verify_onnx_uses_the_writer_when_it_can() -> None:
    v = verify_onnx(_conv_relu(), _inputs([(1, 3, 8, 8)]), latency_runs=0)
    assert v.passed and v.exporter == "fxprune" and v.error is None, v


def test_broken_rule_is_caught_and_torchs_exporter_decides() -> None:
    gm = _conv_relu()
    example = _inputs([(1, 3, 8, 8)])
    broken = op_table.DEFAULT_TABLE.replace(nn.ReLU, onnx=unary("Sigmoid"))
    # the comparison can fail: the broken rule's model runs but differs from eager
    blob, _ = write_onnx(gm, example, table=broken)
    assert "Sigmoid" in _op_types(blob) and "Relu" not in _op_types(blob)
    with torch.no_grad():
        out = gm(*example)
    [(err, scale)] = _errors(_ort_outputs(blob, example, "basic"), out)
    assert err > 0.01 * scale, (err, scale)
    # verify_onnx writing with the broken table sees the mismatch and reports torch's exporter
    v = verify_onnx(gm, example, latency_runs=0, table=broken)
    assert v.passed and v.exporter == "torchscript", v
    assert v.max_rel_error <= v.rtol


def test_model_rejected_by_ort_falls_back() -> None:
    broken = op_table.DEFAULT_TABLE.replace(nn.ReLU, onnx=unary("NoSuchOp"))
    gm, example = _conv_relu(), _inputs([(1, 3, 8, 8)])
    blob, externals = write_onnx(gm, example, external=True, table=broken)
    with pytest.raises(Exception, match="NoSuchOp"):
        ort_session(blob, "basic", externals)
    v = verify_onnx(gm, example, latency_runs=0, table=broken)
    assert v.passed and v.exporter == "torchscript", v


# -- regressions (each was a writer bug: a crash, an invalid model or a wrong one) -----------------------------
def test_top_level_parameters_read_by_get_attr() -> None:
    """A root attribute's get_attr node is named like its target ('weight'): initializers get their own
    names, so 'weight' is not defined twice."""
    assert_writer_matches_eager(trace(_randomize(_top_level_parameters())), _inputs([(2, 3, 5, 6)]))


def test_parameter_named_like_the_input() -> None:
    """A root parameter 'x' must not become an initializer 'x' that shadows the graph input 'x'."""
    assert_writer_matches_eager(trace(_parameter_named_like_input().eval()), _inputs([(2, 3, 5, 6)]))


def test_method_permute_with_dims_keyword() -> None:
    assert_writer_matches_eager(
        trace(Fn(lambda s, x: x.permute(dims=(0, 2, 3, 1))).eval()), _inputs([(2, 3, 4, 5)])
    )


@pytest.mark.parametrize(
    "pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 4, 3)], ids=type
)
def test_unbatched_input_to_a_2d_op_is_unsupported(pool: nn.Module) -> None:
    """ONNX pooling and convolution take (N, C, ...) only; a (C, H, W) input is refused, not mistranslated
    as a 1-d op over W (it once was)."""
    gm = trace(Fn(lambda s, x: s.pool(x), pool=pool).eval())
    with pytest.raises(Unsupported, match="unbatched"):
        write_onnx(gm, _inputs([(3, 8, 8)]))


def test_reshape_of_an_empty_tensor() -> None:
    """A 0 in a static Reshape target is an empty dim (allowzero=1), not 'copy the input's dim'."""
    gm = trace(Fn(lambda s, x: x.reshape(0, 6)).eval())
    blob, _ = write_onnx(gm, (torch.zeros(2, 0, 3),))
    [got] = _ort_outputs(blob, (torch.zeros(2, 0, 3),))
    assert got.shape == (0, 6)


# -- compiles verified with the writer's model -------------------------------------------------------------
def test_compile_residual_net_is_verified_by_the_writer() -> None:
    example = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = fxprune.compile(
        ResidualNet().eval(), example, 0.5, score="magnitude", latency_runs=0, progress=False
    )
    v = result.verification
    assert v is not None and v.passed and v.exporter == "fxprune", v
    assert result.plan.removed_channels > 0
    assert_writer_matches_eager(result.graph_module, (example,))


@pytest.mark.parametrize(("name", "size"), [("mobilenet_v3_small", 32), ("squeezenet1_1", 64)])
def test_compile_torchvision_is_verified_by_the_writer(name: str, size: int) -> None:
    model = randomize_norms(getattr(torchvision.models, name)()).eval()
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = fxprune.compile(model, example, 0.5, score="magnitude", latency_runs=0, progress=False)
    v = result.verification
    assert v is not None and v.passed and v.exporter == "fxprune", v
    assert result.plan.removed_channels > 0
    assert_writer_matches_eager(result.graph_module, (example,))


def test_export_onnx_exporter_choice() -> None:
    """``exporter=`` picks the exporter (``fxprune.save`` passes the one verification used)."""
    gm, example = _conv_relu(), _inputs([(1, 3, 8, 8)])
    assert export_onnx(gm, example, exporter="auto")[1] == "fxprune"
    assert export_onnx(gm, example, exporter="fxprune")[1] == "fxprune"
    assert export_onnx(gm, example, exporter="torchscript")[1] == "torchscript"
    with pytest.raises(fxprune.InputError, match="exporter='onnx'"):
        export_onnx(gm, example, exporter="onnx")
