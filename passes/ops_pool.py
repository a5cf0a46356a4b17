"""Op family ``pool``: max/average/adaptive/LP pooling over the spatial dims (channel-wise: the channel dim
must not be pooled), with ONNX translations for max, average and adaptive average pooling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, input_node, ints, pair_pads, spatial
from fxprune.passes.ops_activation import channelwise

__all__ = ["FAMILY"]


_POOL_MODULES = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
}
_POOL_FUNCTIONS = {
    1: (
        F.max_pool1d,
        F.avg_pool1d,
        F.adaptive_avg_pool1d,
        F.adaptive_max_pool1d,
        torch.max_pool1d,
        torch.avg_pool1d,
    ),
    2: (
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
        torch.max_pool2d,
        F.lp_pool2d,
    ),
    3: (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d),
}


# -- ONNX -----------------------------------------------------------------------------------------------------
def _pool_common(w: OnnxWriter, n: fx.Node, x: fx.Node, op: str, k: int, kernel: Any, stride: Any, padding: Any,
                 ceil_mode: bool, **extra: Any) -> None:  # fmt: skip
    k = spatial(w, n, x, k)
    kernel = ints(kernel, k)
    stride = ints(stride, k) if stride not in (None, [], ()) else kernel
    w.emit(op, [x.name], n.name, kernel_shape=kernel, strides=stride, pads=pair_pads(ints(padding, k)),
           ceil_mode=int(bool(ceil_mode)), **extra)  # fmt: skip


def _max_pool(k: int) -> Callable[..., None]:
    def write(w: OnnxWriter, n: fx.Node, m: Any) -> None:
        if m.return_indices:
            raise Unsupported(f"{n.target}: return_indices")
        _pool_common(w, n, input_node(n), "MaxPool", k, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     dilations=ints(m.dilation, k))  # fmt: skip

    return write


def _avg_pool(k: int) -> Callable[..., None]:
    def write(w: OnnxWriter, n: fx.Node, m: Any) -> None:
        if getattr(m, "divisor_override", None) is not None:  # AvgPool1d has none
            raise Unsupported(f"{n.target}: divisor_override")
        _pool_common(w, n, input_node(n), "AveragePool", k, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     count_include_pad=int(m.count_include_pad))  # fmt: skip

    return write


def _adaptive_avg(w: OnnxWriter, n: fx.Node, x: fx.Node, k: int) -> None:
    spatial(w, n, x, k)
    ins, out = w.shape(x), w.shape(n)
    if all(o == 1 for o in out[2:]):
        w.emit("GlobalAveragePool", [x.name], n.name)
        return
    if any(i % o for i, o in zip(ins[2:], out[2:], strict=True)):
        raise Unsupported(f"{n.name}: adaptive pool {ins[2:]} -> {out[2:]} (not a divisor)")
    kernel = [i // o for i, o in zip(ins[2:], out[2:], strict=True)]
    w.emit("AveragePool", [x.name], n.name, kernel_shape=kernel, strides=kernel)


def _adaptive(k: int) -> Callable[..., None]:
    def write(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
        _adaptive_avg(w, n, input_node(n), k)

    return write


def _max_pool_fn(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    if arg(n, 6, "return_indices", False):
        raise Unsupported(f"{n.name}: return_indices")
    x, kernel = input_node(n), arg(n, 1, "kernel_size")
    _pool_common(w, n, x, "MaxPool", 2, kernel, arg(n, 2, "stride"), arg(n, 3, "padding", 0),
                 arg(n, 5, "ceil_mode", False), dilations=ints(arg(n, 4, "dilation", 1), 2))  # fmt: skip


def _avg_pool_fn(w: OnnxWriter, n: fx.Node, m: Any = None) -> None:
    if arg(n, 6, "divisor_override") is not None:
        raise Unsupported(f"{n.name}: divisor_override")
    _pool_common(w, n, input_node(n), "AveragePool", 2, arg(n, 1, "kernel_size"), arg(n, 2, "stride"),
                 arg(n, 3, "padding", 0), arg(n, 4, "ceil_mode", False),
                 count_include_pad=int(bool(arg(n, 5, "count_include_pad", True))))  # fmt: skip


_ONNX: dict[Any, Callable[..., None]] = {
    nn.MaxPool1d: _max_pool(1),
    nn.MaxPool2d: _max_pool(2),
    nn.MaxPool3d: _max_pool(3),
    nn.AvgPool1d: _avg_pool(1),
    nn.AvgPool2d: _avg_pool(2),
    nn.AvgPool3d: _avg_pool(3),
    nn.AdaptiveAvgPool1d: _adaptive(1),
    nn.AdaptiveAvgPool2d: _adaptive(2),
    nn.AdaptiveAvgPool3d: _adaptive(3),
    F.adaptive_avg_pool2d: _adaptive(2),
    F.max_pool2d: _max_pool_fn,
    F.avg_pool2d: _avg_pool_fn,
}

FAMILY = OpFamily(
    "pool",
    tuple(
        Ops((*_POOL_MODULES[k], *_POOL_FUNCTIONS[k]), channelwise(spatial=k), onnx=_ONNX) for k in (1, 2, 3)
    ),
)
