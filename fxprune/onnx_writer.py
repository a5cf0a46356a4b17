"""A direct torch.fx -> ONNX writer for the ops of convolutional networks, used before torch's exporter.

``write_onnx(gm, example)`` propagates ``example``'s shapes through ``gm`` and emits one
ONNX node, or a few, per fx node, with the parameters as initializers and every shape static (the example's
shapes, as torch's TorchScript exporter without ``dynamic_axes`` gives). It knows the calls
whose op entry has an ONNX translation (``OpEntry.onnx``, written with the op in its family,
``fxprune.passes.ops_*``: convolution, linear, BatchNorm, LayerNorm, pooling, the usual activations,
add/mul, cat, permute, flatten/view/reshape, mean, stochastic depth in eval mode...); any other node, a
float dtype other than float32, or a module state it does not model (training mode, ``padding_mode`` other
than zeros, ...) raises ``Unsupported`` naming the node, and the caller falls back to torch's exporter.

Why: torch's TorchScript exporter traces the model again through the JIT and runs its graph passes, which
takes longer than the whole pruning compile on small CNNs; this writer walks a graph fxprune already has.
It is checked the same way as the exporter, against eager outputs in ONNX Runtime (``fxprune.verify``),
and ``tests/test_onnx_writer.py`` compares it op by op with eager in ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper

from fxprune.data import META_VALUE, TensorValue, flatten_structure
from fxprune.passes import op_table
from fxprune.passes.family import OpTable
from fxprune.passes.onnx_translate import Unsupported, fetch
from fxprune.trace import is_container_call

__all__ = ["Unsupported", "write_onnx"]

#: the ONNX IR version written (ONNX Runtime >= 1.14 reads it; opset 18 needs >= 8)
IR_VERSION = 8
#: ``write_onnx(external=True)`` leaves out float32 initializers of at least this size; small constants
#: (shapes, axes, scalars) stay in the model, where ONNX Runtime's shape inference reads them
EXTERNAL_MIN_BYTES = 1024
_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}


def _float32(n: fx.Node) -> TensorValue | None:
    v = n.meta.get(META_VALUE)
    return v if isinstance(v, TensorValue) and v.dtype == "float32" else None


class _Writer:
    """The writer's state (``fxprune.passes.onnx_translate.OnnxWriter``): nodes and initializers so far."""

    def __init__(self, gm: fx.GraphModule, table: OpTable) -> None:
        self.gm = gm
        self.table = table
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
            t = fetch(self.gm, str(n.target))
            if not isinstance(t, torch.Tensor):
                raise Unsupported(f"get_attr {n.target} is not a tensor")
            self.emit("Identity", [self.tensor(str(n.target), t)], n.name)
            return
        if n.op == "call_module":
            m = self.modules[str(n.target)]
            entry = self.table.module_entry(
                m
            )  # by the MRO: a subclass keeping forward translates as its base
            if entry is None or entry.onnx is None or m.training:
                raise Unsupported(
                    f"module {n.target} ({type(m).__name__}{', training' if m.training else ''})"
                )
            entry.onnx(self, n, m)
            return
        if n.op == "call_function":
            entry = self.table.function_entry(n.target)
        else:
            entry = self.table.method_entry(str(n.target))
        if entry is None or entry.onnx is None:
            raise Unsupported(f"{n.op} {getattr(n.target, '__name__', n.target)}")
        entry.onnx(self, n, None)


def write_onnx(
    gm: fx.GraphModule,
    example: Sequence[torch.Tensor] | None = None,
    *,
    external: bool = False,
    table: OpTable | None = None,
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
    ``table``: the op table whose translations are used (None: ``op_table.DEFAULT_TABLE``).

    Raises:
        Unsupported: a node, dtype or module state without a translation (the caller falls back).
    """
    if example is not None:
        from fxprune.trace import shape_propagate

        shape_propagate(gm, tuple(example), count_flops=False)
    model, left_out = _Writer(gm, table if table is not None else op_table.DEFAULT_TABLE).run(external)
    return model.SerializeToString(), left_out


def _output_nodes(out: Any) -> list[fx.Node]:
    """The tensor nodes of the graph's output in ``flatten_structure`` order, looking through the calls
    that build output containers (their arguments hold the items in the container's own order)."""
    nodes: list[fx.Node] = []
    for n in flatten_structure(out, fx.Node):
        nodes += _output_nodes((n.args, n.kwargs)) if is_container_call(n) else [n]
    return nodes
