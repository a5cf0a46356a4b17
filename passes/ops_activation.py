"""Op family ``activation``: channel-wise ops (activations, dropout, upsampling, identity, dtype/device
moves, ``torchvision.ops.stochastic_depth``) and softmax.

A channel-wise op keeps the input's channel dim as it is (``channelwise``); softmax does too unless it
normalises across the channels (then they are pinned). A pointwise op of a parameter (``w.abs()``,
``torch.sqrt(var + eps)`` in a weight computed by a subclass) is followed as a ``weight_expr.WeightExpr``.
ONNX translations for the common activations.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, identity, input_node, unary
from fxprune.passes.rule_context import Rule, RuleContext, norm_dim, self_arg, tensor_shape
from fxprune.passes.weight_expr import is_weight
from fxprune.passes.weight_expr import unary as weight_unary

__all__ = ["FAMILY", "channelwise"]


def channelwise(spatial: int = 0) -> Rule:
    """A channel-wise op: output keeps the input's channel dim; the last ``spatial`` dims may be pooled. Of a
    parameter or a value computed from parameters: ``weight_expr.unary`` (functions and methods only)."""

    def rule(ctx: RuleContext) -> Any:
        x = self_arg(ctx)
        t = ctx.tracked(x)
        if t is None:
            if ctx.module is None and is_weight(ctx.info(x)):
                return weight_unary(ctx, x, _op_name(ctx) in _ZERO_TO_ZERO)
            return None
        si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
        if (
            si is None
            or so is None
            or len(si) != len(so)
            or so[t.dim] != si[t.dim]
            or t.dim >= len(si) - spatial
        ):
            ctx.pin(t, "channel dim is pooled or reshaped")
            return None
        return t

    return rule


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.interpolate, F.upsample, torch.clamp,
    torch.clip, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, operator.neg, operator.pos,
    torch.nn.functional.logsigmoid, torch.erf, torch.square,
)  # fmt: skip
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "exp", "abs",
    "neg", "sqrt", "rsqrt", "square", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type_as", "cpu", "cuda", "requires_grad_", "erf", "hardtanh_",
)  # fmt: skip


#: pointwise functions and methods with f(0) = 0 (by name): a computed weight keeps zero input columns
_ZERO_TO_ZERO = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "tanh", "tanh_",
    "hardswish", "hardtanh", "hardtanh_", "abs", "neg", "pos", "sqrt", "square", "erf", "contiguous", "clone",
    "detach", "float", "half", "double", "bfloat16", "to", "type_as", "cpu", "cuda", "requires_grad_",
    "dropout", "dropout1d", "dropout2d", "dropout3d",
})  # fmt: skip


def _op_name(ctx: RuleContext) -> str:
    t = ctx.node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def _softmax(ctx: RuleContext) -> Any:
    x = self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        return None
    shape = tensor_shape(ctx.value(x)) or ()
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", None)
    if dim is None or norm_dim(dim, len(shape)) == t.dim:
        ctx.pin(t, "softmax normalises across the channels")
        return None
    return t


# -- ONNX -----------------------------------------------------------------------------------------------------
def _relu6(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    w.emit("Clip", [input_node(n).name, w.const(0.0), w.const(6.0)], n.name)


def _silu(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    x = input_node(n).name
    w.emit("Mul", [x, w.emit("Sigmoid", [x])], n.name)


def _gelu(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    approximate = m.approximate if m is not None else arg(n, 1, "approximate", "none")
    x = input_node(n).name
    if approximate == "none":  # 0.5 x (1 + erf(x / sqrt 2))
        inner = w.emit("Erf", [w.emit("Mul", [x, w.const(1 / math.sqrt(2))])])
    elif approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = w.emit("Mul", [w.emit("Mul", [x, x]), x])
        poly = w.emit("Add", [x, w.emit("Mul", [cube, w.const(0.044715)])])
        inner = w.emit("Tanh", [w.emit("Mul", [poly, w.const(math.sqrt(2 / math.pi))])])
    else:
        raise Unsupported(f"{n.name}: GELU approximate={approximate!r}")
    half = w.emit("Mul", [x, w.const(0.5)])
    w.emit("Mul", [half, w.emit("Add", [inner, w.const(1.0)])], n.name)


def _dropout_fn(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    if arg(n, 2, "training", True) is not False:
        raise Unsupported(f"{n.name}: dropout in training mode")
    identity(w, n)


def _stochastic_depth(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    p, training = arg(n, 1, "p"), arg(n, 3, "training", True)
    if training and p:
        raise Unsupported(f"{n.name}: stochastic depth in training mode")
    identity(w, n)  # eval: the identity


_ONNX: dict[Any, Any] = {
    nn.ReLU: unary("Relu"),
    F.relu: unary("Relu"),
    torch.relu: unary("Relu"),
    "relu": unary("Relu"),
    nn.ReLU6: _relu6,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    F.gelu: _gelu,
    nn.Sigmoid: unary("Sigmoid"),
    torch.sigmoid: unary("Sigmoid"),
    F.sigmoid: unary("Sigmoid"),
    "sigmoid": unary("Sigmoid"),
    nn.Tanh: unary("Tanh"),
    nn.Hardswish: unary("HardSwish"),
    nn.Hardsigmoid: unary("HardSigmoid", alpha=1 / 6, beta=0.5),  # relu6(x + 3) / 6
    nn.Dropout: identity,
    F.dropout: _dropout_fn,
    nn.Identity: identity,
    "contiguous": identity,
}


def _torchvision() -> tuple[Ops, ...]:
    """``torchvision.ops.stochastic_depth`` (fx-wrapped, so traced as one call) scales whole samples
    (``mode="row"``: a noise of shape ``[N, 1, ...]``) or the whole batch (``"batch"``); it is the
    identity in eval. Either way no channel is mixed with another: a channel-wise op."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        return ()
    return (
        Ops((StochasticDepth, stochastic_depth), channelwise(), onnx={stochastic_depth: _stochastic_depth}),
    )


FAMILY = OpFamily(
    "activation",
    (
        Ops((*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS), channelwise(), onnx=_ONNX),
        *_torchvision(),
        Ops(
            (
                nn.Softmax,
                nn.LogSoftmax,
                F.softmax,
                F.log_softmax,
                torch.softmax,
                torch.log_softmax,
                "softmax",
                "log_softmax",
            ),
            _softmax,
        ),  # fmt: skip
    ),
)
