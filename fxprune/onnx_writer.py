"""A direct torch.fx -> ONNX writer for the ops of convolutional networks, used before torch's exporter.

``write_onnx(gm, example)`` propagates ``example``'s shapes through ``gm`` and emits one
ONNX node, or a few, per fx node, with the parameters as initializers and every shape static (the example's
shapes, as torch's TorchScript exporter without ``dynamic_axes`` gives). It knows the module and function
calls of ``_MODULES``, ``_FUNCTIONS`` and ``_FOREIGN`` (convolution, linear, BatchNorm, LayerNorm, pooling, the usual activations, add/mul,
cat, permute, flatten/view/reshape, mean, stochastic depth in eval mode...); any other node, a float
dtype other than float32, or a module state it does not model (training mode, ``padding_mode`` other
than zeros, ...) raises ``Unsupported`` naming the node, and the caller falls back to torch's exporter.

Why: torch's TorchScript exporter traces the model again through the JIT and runs its graph passes, which
takes longer than the whole pruning compile on small CNNs; this writer walks a graph fxprune already has.
It is checked the same way as the exporter, against eager outputs in ONNX Runtime (``fxprune.verify``),
and ``tests/test_onnx_writer.py`` compares it op by op with eager in ONNX Runtime.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from fxprune.data import META_VALUE, TensorValue, flatten_structure
from fxprune.trace import is_container_call

__all__ = ["Unsupported", "write_onnx"]

#: the ONNX IR version written (ONNX Runtime >= 1.14 reads it; opset 18 needs >= 8)
IR_VERSION = 8
#: ``write_onnx(external=True)`` leaves out float32 initializers of at least this size; small constants
#: (shapes, axes, scalars) stay in the model, where ONNX Runtime's shape inference reads them
EXTERNAL_MIN_BYTES = 1024
_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}


class Unsupported(Exception):  # noqa: N818 - a signal to fall back, not an error the user sees
    """The writer has no translation for this node; use torch's exporter instead."""


def _float32(n: fx.Node) -> TensorValue | None:
    v = n.meta.get(META_VALUE)
    return v if isinstance(v, TensorValue) and v.dtype == "float32" else None


class _Writer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.fresh = 0

    # -- helpers -------------------------------------------------------------------------------------------
    def name(self, hint: str) -> str:
        """A fresh value name: ``#`` never occurs in an fx node name (identifiers), so none collides."""
        self.fresh += 1
        return f"#{hint}{self.fresh}"

    def emit(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str] | str | None = None, **attrs: Any
    ) -> str:
        outs = [outputs] if isinstance(outputs, str) else list(outputs or [self.name(op.lower())])
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0]

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str:
        name = self.name(hint)
        self.initializers[name] = np.asarray(value, dtype=dtype)
        return name

    def tensor(
        self, qualname: str, t: torch.Tensor, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> str:
        if t.dtype != torch.float32:
            raise Unsupported(f"tensor {qualname} is {t.dtype}")
        key = f"#{qualname}" if transform is None else f"#{qualname}.T"  # not an fx node name
        if key not in self.initializers:
            arr = t.detach().cpu().numpy()
            self.initializers[key] = np.ascontiguousarray(arr if transform is None else transform(arr))
        return key

    def shape(self, n: Any) -> tuple[int, ...]:
        v = _float32(n) if isinstance(n, fx.Node) else None
        if v is None:
            raise Unsupported(f"{getattr(n, 'name', n)} is not a float32 tensor")
        return v.shape

    def operand(self, a: Any) -> str:
        """An fx argument as an ONNX value: a node's output, or a Python number as a float32 constant (every
        value the writer handles is float32)."""
        if isinstance(a, fx.Node):
            self.shape(a)
            return a.name
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.const(a)
        raise Unsupported(f"operand {a!r}")

    # -- the graph -----------------------------------------------------------------------------------------
    def run(self, external: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The model, and the initializers left out of it (``external``: see ``write_onnx``)."""
        inputs, outputs = [], []
        taken = {n.name for n in self.gm.graph.nodes}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                inputs.append(helper.make_tensor_value_info(n.name, TensorProto.FLOAT, list(self.shape(n))))
            elif n.op == "output":
                for i, o in enumerate(_output_nodes(n.args[0])):  # eager's order
                    # a graph output gets its own name: one value may be returned twice, or be an input
                    name = f"output_{i}" if f"output_{i}" not in taken else f"#output_{i}"
                    shape = list(self.shape(o))
                    self.emit("Identity", [o.name], name)
                    outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            elif is_container_call(n):  # an output container (OrderedDict, dataclass): no value to write
                continue
            else:
                self.shape(n)  # every computed value is a float32 tensor (no sizes, tuples, ints)
                self.write(n)
        # built in place: helper.make_graph/make_model copy every initializer's bytes once more each
        model = onnx.ModelProto(ir_version=IR_VERSION, producer_name="fxprune")
        model.opset_import.add(domain="", version=18)
        graph = model.graph
        graph.name = "fxprune"
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        graph.node.extend(self.nodes)
        left_out = {}
        for name, arr in self.initializers.items():
            t = graph.initializer.add(name=name, data_type=_DTYPES[arr.dtype], dims=arr.shape)
            if external and arr.dtype == np.float32 and arr.nbytes >= EXTERNAL_MIN_BYTES:
                t.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", "fxprune-in-memory"),
                    ("offset", "0"),
                    ("length", str(arr.nbytes)),
                ):
                    t.external_data.add(key=key, value=value)
                left_out[name] = arr
            else:
                t.raw_data = arr.tobytes()
        return model, left_out

    def write(self, n: fx.Node) -> None:
        if n.op == "get_attr":
            t = _fetch(self.gm, str(n.target))
            if not isinstance(t, torch.Tensor):
                raise Unsupported(f"get_attr {n.target} is not a tensor")
            self.emit("Identity", [self.tensor(str(n.target), t)], n.name)
            return
        if n.op == "call_module":
            m = self.modules[str(n.target)]
            fn = _MODULES.get(type(m))
            if fn is None:
                fn = next((f for t, f in _MODULES.items() if isinstance(m, t) and t in _SUBCLASSABLE), None)
            if fn is None or m.training:
                raise Unsupported(
                    f"module {n.target} ({type(m).__name__}{', training' if m.training else ''})"
                )
            fn(self, n, m)
            return
        key = n.target if n.op == "call_function" else ("method", n.target)
        fn = _FUNCTIONS.get(key)
        if fn is None and n.op == "call_function":
            fn = _FOREIGN.get((getattr(n.target, "__module__", ""), getattr(n.target, "__name__", "")))
        if fn is None:
            raise Unsupported(f"{n.op} {getattr(n.target, '__name__', n.target)}")
        fn(self, n)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(n: fx.Node, i: int, key: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(key, default)


def _input(n: fx.Node) -> fx.Node:
    """``n``'s tensor input ``n.args[0]``, a node: fx records a tensor operand as one (a constant tensor as a
    ``get_attr`` node). Anything else raises ``Unsupported`` as ``_Writer.shape`` does."""
    x = n.args[0]
    if not isinstance(x, fx.Node):
        raise Unsupported(f"{getattr(x, 'name', x)} is not a float32 tensor")
    return x


def _pair_pads(padding: Sequence[int]) -> list[int]:
    return [*padding, *padding]


def _ints(v: Any, k: int) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else [int(v)] * k


# -- modules ---------------------------------------------------------------------------------------------------
def _conv(w: _Writer, n: fx.Node, m: nn.modules.conv._ConvNd) -> None:
    if m.transposed or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise Unsupported(f"{n.target}: transposed/padding_mode/string padding")
    k = _spatial(w, n, _input(n), len(m.kernel_size))
    ins = [_input(n).name, w.tensor(f"{n.target}.weight", m.weight)]
    if m.bias is not None:
        ins.append(w.tensor(f"{n.target}.bias", m.bias))
    w.emit("Conv", ins, n.name, kernel_shape=list(m.kernel_size), strides=_ints(m.stride, k),
           pads=_pair_pads(_ints(m.padding, k)), dilations=_ints(m.dilation, k), group=int(m.groups))  # fmt: skip


def _linear_parts(w: _Writer, n: fx.Node, x: fx.Node, weight: str, bias: str | None) -> None:
    """``x @ weight.T + bias`` (``weight`` already transposed in its initializer)."""
    if len(w.shape(x)) == 2:
        w.emit("Gemm", [x.name, weight, *([bias] if bias else [])], n.name)
        return
    if bias is None:
        w.emit("MatMul", [x.name, weight], n.name)
    else:
        w.emit("Add", [w.emit("MatMul", [x.name, weight]), bias], n.name)


def _linear(w: _Writer, n: fx.Node, m: nn.Linear) -> None:
    weight = w.tensor(f"{n.target}.weight", m.weight, np.transpose)
    bias = w.tensor(f"{n.target}.bias", m.bias) if m.bias is not None else None
    _linear_parts(w, n, _input(n), weight, bias)


def _batch_norm(w: _Writer, n: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> None:
    if m.running_mean is None or m.running_var is None:
        raise Unsupported(f"{n.target}: BatchNorm without running statistics")
    c = m.num_features
    scale = w.tensor(f"{n.target}.weight", m.weight) if m.weight is not None else w.const(np.ones(c))
    bias = w.tensor(f"{n.target}.bias", m.bias) if m.bias is not None else w.const(np.zeros(c))
    mean, var = (
        w.tensor(f"{n.target}.running_mean", m.running_mean),
        w.tensor(f"{n.target}.running_var", m.running_var),
    )
    w.emit("BatchNormalization", [_input(n).name, scale, bias, mean, var], n.name, epsilon=float(m.eps))


def _layer_norm_parts(w: _Writer, n: fx.Node, x: fx.Node, shape: Sequence[int], scale: str | None,
                      bias: str | None, eps: float) -> None:  # fmt: skip
    k = len(shape)
    if tuple(w.shape(x)[-k:]) != tuple(shape):
        raise Unsupported(f"{n.name}: normalized_shape {shape} is not the trailing shape")
    scale = scale or w.const(np.ones(shape))
    w.emit(
        "LayerNormalization", [x.name, scale, *([bias] if bias else [])], n.name, axis=-k, epsilon=float(eps)
    )


def _layer_norm_module(w: _Writer, n: fx.Node, m: nn.LayerNorm) -> None:
    scale = w.tensor(f"{n.target}.weight", m.weight) if m.weight is not None else None
    bias = w.tensor(f"{n.target}.bias", m.bias) if getattr(m, "bias", None) is not None else None
    _layer_norm_parts(w, n, _input(n), m.normalized_shape, scale, bias, m.eps)


def _spatial(w: _Writer, n: fx.Node, x: fx.Node, k: int) -> int:
    """``k``, the op's number of spatial dims, when ``x`` is batched (N, C, *k dims): ONNX's pooling and
    convolution take no unbatched input."""
    if len(w.shape(x)) != k + 2:
        raise Unsupported(f"{n.name}: a {k}-d op on a rank-{len(w.shape(x))} input (unbatched)")
    return k


def _pool_common(w: _Writer, n: fx.Node, x: fx.Node, op: str, k: int, kernel: Any, stride: Any, padding: Any,
                 ceil_mode: bool, **extra: Any) -> None:  # fmt: skip
    k = _spatial(w, n, x, k)
    kernel = _ints(kernel, k)
    stride = _ints(stride, k) if stride not in (None, [], ()) else kernel
    w.emit(op, [x.name], n.name, kernel_shape=kernel, strides=stride, pads=_pair_pads(_ints(padding, k)),
           ceil_mode=int(bool(ceil_mode)), **extra)  # fmt: skip


def _max_pool(w: _Writer, n: fx.Node, m: nn.MaxPool2d) -> None:
    if m.return_indices:
        raise Unsupported(f"{n.target}: return_indices")
    k = _DIMS[type(m)]
    _pool_common(w, n, _input(n), "MaxPool", k, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 dilations=_ints(m.dilation, k))  # fmt: skip


def _avg_pool(w: _Writer, n: fx.Node, m: nn.AvgPool2d) -> None:
    if getattr(m, "divisor_override", None) is not None:  # AvgPool1d has none
        raise Unsupported(f"{n.target}: divisor_override")
    _pool_common(w, n, _input(n), "AveragePool", _DIMS[type(m)], m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 count_include_pad=int(m.count_include_pad))  # fmt: skip


def _adaptive_avg(w: _Writer, n: fx.Node, x: fx.Node, k: int) -> None:
    _spatial(w, n, x, k)
    ins, out = w.shape(x), w.shape(n)
    if all(o == 1 for o in out[2:]):
        w.emit("GlobalAveragePool", [x.name], n.name)
        return
    if any(i % o for i, o in zip(ins[2:], out[2:], strict=True)):
        raise Unsupported(f"{n.name}: adaptive pool {ins[2:]} -> {out[2:]} (not a divisor)")
    kernel = [i // o for i, o in zip(ins[2:], out[2:], strict=True)]
    w.emit("AveragePool", [x.name], n.name, kernel_shape=kernel, strides=kernel)


def _unary(op: str, **attrs: Any) -> Callable[..., None]:
    def write(w: _Writer, n: fx.Node, m: Any = None) -> None:
        w.emit(op, [_input(n).name], n.name, **attrs)

    return write


def _relu6(w: _Writer, n: fx.Node, m: Any = None) -> None:
    w.emit("Clip", [_input(n).name, w.const(0.0), w.const(6.0)], n.name)


def _silu(w: _Writer, n: fx.Node, m: Any = None) -> None:
    x = _input(n).name
    w.emit("Mul", [x, w.emit("Sigmoid", [x])], n.name)


def _gelu(w: _Writer, n: fx.Node, m: Any = None) -> None:
    approximate = m.approximate if m is not None else _arg(n, 1, "approximate", "none")
    x = _input(n).name
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


def _identity(w: _Writer, n: fx.Node, m: Any = None) -> None:
    w.emit("Identity", [_input(n).name], n.name)


def _reshape(w: _Writer, n: fx.Node, m: Any = None) -> None:
    # allowzero: a 0 in the (static) target shape is an empty dim, not "copy the input's"
    w.emit("Reshape", [_input(n).name, w.const(w.shape(n), "shape", np.int64)], n.name, allowzero=1)


_MODULES: dict[type, Callable[..., None]] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.LayerNorm: _layer_norm_module,
    nn.MaxPool1d: _max_pool,
    nn.MaxPool2d: _max_pool,
    nn.MaxPool3d: _max_pool,
    nn.AvgPool1d: _avg_pool,
    nn.AvgPool2d: _avg_pool,
    nn.AvgPool3d: _avg_pool,
    nn.AdaptiveAvgPool1d: lambda w, n, m: _adaptive_avg(w, n, _input(n), 1),
    nn.AdaptiveAvgPool2d: lambda w, n, m: _adaptive_avg(w, n, _input(n), 2),
    nn.AdaptiveAvgPool3d: lambda w, n, m: _adaptive_avg(w, n, _input(n), 3),
    nn.ReLU: _unary("Relu"),
    nn.ReLU6: _relu6,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Sigmoid: _unary("Sigmoid"),
    nn.Tanh: _unary("Tanh"),
    nn.Hardswish: _unary("HardSwish"),
    nn.Hardsigmoid: _unary("HardSigmoid", alpha=1 / 6, beta=0.5),  # relu6(x + 3) / 6
    nn.Dropout: _identity,
    nn.Identity: _identity,
    nn.Flatten: _reshape,
}

#: spatial dims of the pooling modules
_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
}  # fmt: skip

#: subclasses that keep the parent's forward (e.g. MHA's ``NonDynamicallyQuantizableLinear``)
_SUBCLASSABLE = (nn.Linear,)


# -- functions and methods -------------------------------------------------------------------------------------
def _binary(op: str) -> Callable[[_Writer, fx.Node], None]:
    def write(w: _Writer, n: fx.Node) -> None:
        a, b = n.args[0], n.args[1]
        if n.kwargs or not (isinstance(a, fx.Node) or isinstance(b, fx.Node)):
            raise Unsupported(f"{n.name}: {op} with {n.kwargs or 'no tensor operand'}")
        w.emit(op, [w.operand(a), w.operand(b)], n.name)

    return write


def _cat(w: _Writer, n: fx.Node) -> None:
    tensors, dim = _arg(n, 0, "tensors"), _arg(n, 1, "dim", 0)
    rank = len(w.shape(n))
    w.emit("Concat", [t.name for t in tensors], n.name, axis=int(dim) % rank)


def _permute(w: _Writer, n: fx.Node) -> None:
    # ints by permute's signature: torch.permute(x, dims); x.permute(*dims), x.permute(dims) or (dims=dims)
    dims: Sequence[Any]
    if n.op == "call_function":
        dims = _arg(n, 1, "dims")
    else:
        dims = cast(Sequence[Any], n.args[1:] or n.kwargs.get("dims"))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
    rank = len(w.shape(n))
    w.emit("Transpose", [_input(n).name], n.name, perm=[int(d) % rank for d in dims])


def _layer_norm_fn(w: _Writer, n: fx.Node) -> None:
    shape = _arg(n, 1, "normalized_shape")
    weight, bias, eps = _arg(n, 2, "weight"), _arg(n, 3, "bias"), _arg(n, 4, "eps", 1e-5)
    for t in (weight, bias):
        if t is not None and not isinstance(t, fx.Node):
            raise Unsupported(f"{n.name}: layer_norm with a constant tensor argument")
    _layer_norm_parts(
        w, n, _input(n), list(shape), weight.name if weight else None, bias.name if bias else None, eps
    )


def _mean(w: _Writer, n: fx.Node) -> None:
    dim, keepdim = _arg(n, 1, "dim"), bool(_arg(n, 2, "keepdim", False))
    if dim is None or "dtype" in n.kwargs:
        raise Unsupported(f"{n.name}: mean over all dims or with dtype")
    x = _input(n)
    rank = len(w.shape(x))
    axes = [int(d) % rank for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    w.emit("ReduceMean", [x.name, w.const(axes, "axes", np.int64)], n.name, keepdims=int(keepdim))


def _stochastic_depth(w: _Writer, n: fx.Node) -> None:
    p, training = _arg(n, 1, "p"), _arg(n, 3, "training", True)
    if training and p:
        raise Unsupported(f"{n.name}: stochastic depth in training mode")
    _identity(w, n)


def _relu_fn(w: _Writer, n: fx.Node) -> None:
    w.emit("Relu", [_input(n).name], n.name)


def _adaptive_fn(w: _Writer, n: fx.Node) -> None:
    _adaptive_avg(w, n, _input(n), 2)


def _max_pool_fn(w: _Writer, n: fx.Node) -> None:
    if _arg(n, 6, "return_indices", False):
        raise Unsupported(f"{n.name}: return_indices")
    x, kernel = _input(n), _arg(n, 1, "kernel_size")
    _pool_common(w, n, x, "MaxPool", 2, kernel, _arg(n, 2, "stride"), _arg(n, 3, "padding", 0),
                 _arg(n, 5, "ceil_mode", False), dilations=_ints(_arg(n, 4, "dilation", 1), 2))  # fmt: skip


def _avg_pool_fn(w: _Writer, n: fx.Node) -> None:
    if _arg(n, 6, "divisor_override") is not None:
        raise Unsupported(f"{n.name}: divisor_override")
    _pool_common(w, n, _input(n), "AveragePool", 2, _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                 _arg(n, 3, "padding", 0), _arg(n, 4, "ceil_mode", False),
                 count_include_pad=int(bool(_arg(n, 5, "count_include_pad", True))))  # fmt: skip


def _linear_fn(w: _Writer, n: fx.Node) -> None:
    weight, bias = _arg(n, 1, "weight"), _arg(n, 2, "bias")
    if (
        not isinstance(weight, fx.Node)
        or weight.op != "get_attr"
        or (bias is not None and not isinstance(bias, fx.Node))
    ):
        raise Unsupported(f"{n.name}: linear with a computed weight")
    wt = w.tensor(str(weight.target), _fetch(w.gm, str(weight.target)), np.transpose)
    _linear_parts(w, n, _input(n), wt, bias.name if bias is not None else None)


_FUNCTIONS: dict[Any, Callable[[_Writer, fx.Node], None]] = {
    operator.add: _binary("Add"),
    torch.add: _binary("Add"),
    operator.mul: _binary("Mul"),
    torch.mul: _binary("Mul"),
    ("method", "add"): _binary("Add"),
    ("method", "mul"): _binary("Mul"),
    torch.cat: _cat,
    torch.concat: _cat,
    torch.permute: _permute,
    ("method", "permute"): _permute,
    torch.flatten: _reshape,
    ("method", "flatten"): _reshape,
    ("method", "view"): _reshape,
    ("method", "reshape"): _reshape,
    torch.reshape: _reshape,
    ("method", "contiguous"): _identity,
    ("method", "mean"): _mean,
    torch.mean: _mean,
    F.layer_norm: _layer_norm_fn,
    F.linear: _linear_fn,
    F.relu: _relu_fn,
    ("method", "relu"): _relu_fn,
    F.gelu: lambda w, n: _gelu(w, n, None),
    torch.relu: _relu_fn,
    torch.sigmoid: _unary("Sigmoid"),
    F.sigmoid: _unary("Sigmoid"),
    ("method", "sigmoid"): _unary("Sigmoid"),
    F.adaptive_avg_pool2d: _adaptive_fn,
    F.max_pool2d: _max_pool_fn,
    F.avg_pool2d: _avg_pool_fn,
    F.dropout: lambda w, n: _identity(w, n) if _arg(n, 2, "training", True) is False else _raise(n),
}


def _raise(n: fx.Node) -> None:
    raise Unsupported(f"{n.name}: dropout in training mode")


#: functions of other packages by (module, name), so that writing ONNX does not import them
_FOREIGN: dict[tuple[str, str], Callable[[_Writer, fx.Node], None]] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): _stochastic_depth,  # eval: the identity
}


def write_onnx(
    gm: fx.GraphModule, example: Sequence[torch.Tensor] | None = None, *, external: bool = False
) -> tuple[bytes, dict[str, np.ndarray]]:
    """``gm`` as a serialized ONNX model (opset 18), its shapes those of ``example``, and the initializers
    kept out of it.

    With ``example=None`` the caller has just run ``fxprune.trace.shape_propagate(gm, example)``, whose
    ``META_VALUE`` shapes are then used as they are (a compile does, counting the pruned model's FLOPs);
    otherwise the shapes are propagated here first.
    ``external=False``: one self-contained model, the second item empty. ``external=True`` (for a session
    built at once, e.g. verification): the float32 weights of ``EXTERNAL_MIN_BYTES`` or more are not copied
    into the model but marked external and returned as arrays that share memory with ``gm``'s tensors;
    ``fxprune.verify.ort_session(blob, externals=...)`` hands them to ONNX Runtime, which copies them once.

    Raises:
        Unsupported: a node, dtype or module state without a translation (the caller falls back).
    """
    if example is not None:
        from fxprune.trace import shape_propagate

        shape_propagate(gm, tuple(example), count_flops=False)
    model, left_out = _Writer(gm).run(external)
    return model.SerializeToString(), left_out


def _output_nodes(out: Any) -> list[fx.Node]:
    """The tensor nodes of the graph's output in ``flatten_structure`` order, looking through the calls
    that build output containers (their arguments hold the items in the container's own order)."""
    nodes: list[fx.Node] = []
    for n in flatten_structure(out, fx.Node):
        nodes += _output_nodes((n.args, n.kwargs)) if is_container_call(n) else [n]
    return nodes
