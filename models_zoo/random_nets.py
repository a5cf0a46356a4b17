"""Random fx-traceable CNNs for property tests: a drawn *spec* (readable) plus a seed build the module.

A ``NetSpec`` is a straight-line program over a list of values (tensors ``N x C x H x W``). The inputs are
values ``0 .. len(in_channels) - 1``; every ``Op`` reads values by index and appends its outputs. ``heads``
turn values into the model outputs (a tensor, or a tuple for several heads). Every value is consumed by
something, so no branch is dead and every input reaches an output (ONNX export keeps all inputs).

Op kinds (``Op.kind``) and their fields:

============  =================================================================================
``conv``      ``Conv2d(C, width, k, stride, k // 2, bias=flag)``
``gconv``     grouped conv, ``groups = arg`` (``C`` and ``width`` divisible by it, ``C/groups >= 2``)
``dwconv``    depthwise conv, ``groups = C``, ``width = C * multiplier``
``reuse``     the module of conv op ``arg`` applied again (shared weights)
``bn``        ``BatchNorm2d`` with random statistics
``act``       activation ``variant`` (``relu_`` is ``nn.ReLU(inplace=True)``)
``add``       ``a + b`` (residual), ``mul``: ``a * b``
``cat``       ``torch.cat(srcs, 1)``
``split``     ``torch.split(x, sections, 1)``; ``chunk``: ``x.chunk(arg, 1)``; ``slice``: ``x[:, lo:hi]``
``se``        ``x * sigmoid(fc2(relu(fc1(pool(x)))))`` (``flag``: Linear + view, else 1x1 convs)
``pool``      ``max_pool2d``/``avg_pool2d`` by 2 (``variant``)
``up``        up-sampling by 2 (``variant``): ``tconv`` ``ConvTranspose2d(C, width, k, 2, groups=arg)``
              (``k`` 2, or 3 with padding and output padding 1), ``subpixel`` ``Conv2d(C, 4 width, 1)`` then
              ``pixel_shuffle(2)``, ``shuffle`` ``pixel_shuffle(2)`` of the value (``C/4`` channels), or
              ``F.interpolate`` (``nearest``, ``bilinear``, ``bicubic``); with a second source (a value of
              twice the spatial size), the result is concatenated with it: a U-Net skip
``unshuffle`` ``pixel_unshuffle(2)`` (``4 C`` channels, half the spatial size)
============  =================================================================================

The ``up`` and ``unshuffle`` kinds are drawn only by ``net_specs(upsampling=True)`` (the default strategy
draws the nets it always drew).

Heads: ``gap_linear`` (global pool, flatten, Linear), ``flatten_linear`` (flatten ``C x H x W``, Linear),
``conv`` (1x1 conv, a 4-D output), ``raw`` (the value itself: an output taken from the middle of the net,
whose channels other ops read too), ``collect`` (pool each source, cat, Linear).

``NetSpec.output`` packs the heads' outputs (``OUTPUTS``): ``plain`` (one tensor, or a tuple of several),
``list``, ``dict``, ``ordered_dict``, ``nested`` (a dict holding a list, a tuple, a dict and an int),
``namedtuple`` (``HeadsN``), ``dataclass`` (``HeadOutputs``).

``net_specs(max_ops=...)`` is a hypothesis strategy of ``NetSpec``s; ``build(spec)`` returns the module
and ``example(spec)`` the inputs, both deterministic in ``spec.seed``. A failing example prints the spec
as a little program, one line per op, with each value's channels and spatial size.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "HEADS",
    "OUTPUTS",
    "UPSAMPLERS",
    "HeadOutputs",
    "NetSpec",
    "Op",
    "RandomNet",
    "build",
    "example",
    "net_specs",
]

ACTIVATIONS = ("relu", "relu_", "relu6", "sigmoid", "silu", "tanh", "gelu", "hardswish", "leaky_relu")
#: head kinds the strategy draws from (a global-pool classifier is the common case)
HEADS = ("gap_linear", "gap_linear", "flatten_linear", "conv", "raw")
#: op kinds the strategy draws from (conv, bn and act repeated: they are what real nets are made of)
_OPS = ("conv", "conv", "conv", "gconv", "dwconv", "reuse", "bn", "bn", "act", "act", "add", "mul", "cat",
        "split", "chunk", "slice", "se", "pool")  # fmt: skip

#: op kinds of ``net_specs(upsampling=True)``: the above, down-sampling more often, and up-sampling
_OPS_UP = (*_OPS, "pool", "up", "up", "up", "unshuffle")
#: ``up`` variants (``Op.variant``): transposed conv, conv + pixel shuffle, pixel shuffle, interpolation modes
UPSAMPLERS = ("tconv", "subpixel", "shuffle", "nearest", "bilinear", "bicubic")

#: how the heads' outputs are returned (``NetSpec.output``)
OUTPUTS = ("plain", "list", "dict", "ordered_dict", "nested", "namedtuple", "dataclass")

BATCH = 2
SPATIAL = 8

#: ``HeadsN``: a namedtuple of ``N`` head outputs (module-level, so a pruned model pickles)
Heads1 = collections.namedtuple("Heads1", ["h0"])
Heads2 = collections.namedtuple("Heads2", ["h0", "h1"])
Heads3 = collections.namedtuple("Heads3", ["h0", "h1", "h2"])
_NAMEDTUPLES = {1: Heads1, 2: Heads2, 3: Heads3}


@dataclass
class HeadOutputs:
    """A dataclass output (as ``transformers`` models return): the first head, then the rest."""

    first: torch.Tensor
    rest: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Op:
    """One step: reads values ``src``, appends its output(s). Unused fields keep their defaults."""

    kind: str
    src: tuple[int, ...]
    width: int = 0
    k: int = 1
    stride: int = 1
    arg: int = 0
    flag: bool = False
    variant: str = ""
    sections: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "slice":
            return f"slice(v{self.src[0]}[:, {self.width}:{self.arg}])"
        if self.kind == "reuse":
            return f"reuse(v{self.src[0]}, module of op {self.arg})"
        extras = {
            "width": self.width,
            "k": self.k if self.k != 1 else 0,
            "stride": self.stride if self.stride != 1 else 0,
            "arg": self.arg,
            "flag": self.flag,
            "variant": self.variant,
            "sections": self.sections,
        }
        shown = ", ".join(f"{k}={v!r}" for k, v in extras.items() if v)
        return f"{self.kind}({', '.join(f'v{i}' for i in self.src)}{', ' if shown else ''}{shown})"


@dataclass(frozen=True)
class NetSpec:
    """A random net: input channel counts, ops, heads, and the seed its weights are drawn from."""

    in_channels: tuple[int, ...]
    ops: tuple[Op, ...]
    heads: tuple[Op, ...]
    seed: int = 0
    shapes: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    output: str = "plain"

    def __str__(self) -> str:
        lines = [f"NetSpec(seed={self.seed}, inputs={list(self.in_channels)})"]
        v = len(self.in_channels)
        for op in self.ops:
            n = _n_outputs(op)
            outs = ", ".join(f"v{v + i}" for i in range(n))
            shapes = "".join(
                f"  # v{v + i}: {c}ch {h}x{h}" for i, (c, h) in enumerate(self.shapes[v : v + n])
            )
            lines.append(f"  {outs} = {op}{shapes}")
            v += n
        lines.extend(f"  out[{i}] = {h}" for i, h in enumerate(self.heads))
        lines.append(f"  return {self.output}(out)")
        return "\n".join(lines)

    __repr__ = __str__


def _n_outputs(op: Op) -> int:
    if op.kind == "split":
        return len(op.sections)
    if op.kind == "chunk":
        return op.arg
    return 1


def _act(variant: str) -> nn.Module:
    return {
        "relu": lambda: nn.ReLU(),
        "relu_": lambda: nn.ReLU(inplace=True),
        "relu6": lambda: nn.ReLU6(),
        "sigmoid": lambda: nn.Sigmoid(),
        "silu": lambda: nn.SiLU(),
        "tanh": lambda: nn.Tanh(),
        "gelu": lambda: nn.GELU(),
        "hardswish": lambda: nn.Hardswish(),
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
    }[variant]()


class _SE(nn.Module):
    """Squeeze-and-excitation gate; the gate is ``N x C x 1 x 1`` and broadcast-multiplied."""

    def __init__(self, c: int, hidden: int, linear: bool) -> None:
        super().__init__()
        self.c, self.linear = c, linear
        if linear:
            self.fc1: nn.Module = nn.Linear(c, hidden)
            self.fc2: nn.Module = nn.Linear(hidden, c)
        else:
            self.fc1 = nn.Conv2d(c, hidden, 1)
            self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            s = F.relu(self.fc1(x.mean((2, 3))))
            gate = torch.sigmoid(self.fc2(s)).view(-1, self.c, 1, 1)
        else:
            gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class RandomNet(nn.Module):
    """The module a ``NetSpec`` describes; ``forward`` replays the ops (a straight line for torch.fx)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        chans = list(spec.in_channels)
        sp = [SPATIAL] * len(chans)
        for i, op in enumerate(spec.ops):
            c, s = (chans[op.src[0]], sp[op.src[0]]) if op.src else (0, 0)
            key = str(i)
            if op.kind == "conv":
                self.layers[key] = nn.Conv2d(c, op.width, op.k, op.stride, op.k // 2, bias=op.flag)
                chans.append(op.width)
                sp.append(_out_spatial(s, op.stride))
            elif op.kind == "gconv":
                self.layers[key] = nn.Conv2d(c, op.width, op.k, 1, op.k // 2, groups=op.arg, bias=op.flag)
                chans.append(op.width)
                sp.append(s)
            elif op.kind == "dwconv":
                self.layers[key] = nn.Conv2d(c, op.width, op.k, 1, op.k // 2, groups=c, bias=op.flag)
                chans.append(op.width)
                sp.append(s)
            elif op.kind == "reuse":
                shared = self.layers[str(op.arg)]
                assert isinstance(shared, nn.Conv2d)
                chans.append(shared.out_channels)
                sp.append(_out_spatial(s, shared.stride[0]))
            elif op.kind == "bn":
                self.layers[key] = nn.BatchNorm2d(c)
                chans.append(c)
                sp.append(s)
            elif op.kind == "act":
                self.layers[key] = _act(op.variant)
                chans.append(c)
                sp.append(s)
            elif op.kind in ("add", "mul", "pool"):
                chans.append(c)
                sp.append(s // 2 if op.kind == "pool" else s)
            elif op.kind == "cat":
                chans.append(sum(chans[j] for j in op.src))
                sp.append(s)
            elif op.kind in ("split", "chunk"):
                pieces = op.sections if op.kind == "split" else (c // op.arg,) * op.arg
                chans.extend(pieces)
                sp.extend([s] * len(pieces))
            elif op.kind == "slice":
                chans.append(op.arg - op.width)  # hi - lo, see _draw_op
                sp.append(s)
            elif op.kind == "se":
                self.layers[key] = _SE(c, op.width, op.flag)
                chans.append(c)
                sp.append(s)
            elif op.kind == "up":
                if op.variant == "tconv":
                    pad = (op.k - 1) // 2
                    self.layers[key] = nn.ConvTranspose2d(
                        c, op.width, op.k, 2, pad, pad, groups=op.arg, bias=op.flag
                    )
                elif op.variant == "subpixel":
                    self.layers[key] = nn.Sequential(
                        nn.Conv2d(c, 4 * op.width, 1, bias=op.flag), nn.PixelShuffle(2)
                    )
                chans.append(_up_channels(op, c) + sum(chans[j] for j in op.src[1:]))
                sp.append(2 * s)
            elif op.kind == "unshuffle":
                chans.append(4 * c)
                sp.append(s // 2)
            else:  # pragma: no cover - the strategy only draws known kinds
                raise ValueError(f"unknown op kind {op.kind!r}")
        for i, h in enumerate(spec.heads):
            c, s = chans[h.src[0]], sp[h.src[0]]
            if h.kind == "gap_linear":
                self.heads[str(i)] = nn.Linear(c, h.width)
            elif h.kind == "flatten_linear":
                self.heads[str(i)] = nn.Linear(c * s * s, h.width)
            elif h.kind == "conv":
                self.heads[str(i)] = nn.Conv2d(c, h.width, 1)
            elif h.kind == "collect":
                self.heads[str(i)] = nn.Linear(sum(chans[j] for j in h.src), h.width)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        vals = list(inputs)
        for i, op in enumerate(self.spec.ops):
            x = vals[op.src[0]]
            key = str(i)
            if op.kind in ("conv", "gconv", "dwconv", "bn", "act", "se"):
                vals.append(self.layers[key](x))
            elif op.kind == "reuse":
                vals.append(self.layers[str(op.arg)](x))
            elif op.kind == "add":
                vals.append(x + vals[op.src[1]])
            elif op.kind == "mul":
                vals.append(x * vals[op.src[1]])
            elif op.kind == "pool":
                pool = F.max_pool2d if op.variant == "max" else F.avg_pool2d
                vals.append(pool(x, 2))
            elif op.kind == "cat":
                vals.append(torch.cat([vals[j] for j in op.src], 1))
            elif op.kind == "split":
                parts = torch.split(x, list(op.sections), 1)
                vals.extend(parts[j] for j in range(len(op.sections)))
            elif op.kind == "chunk":
                parts = x.chunk(op.arg, 1)
                vals.extend(parts[j] for j in range(op.arg))
            elif op.kind == "slice":
                vals.append(x[:, op.width : op.arg])
            elif op.kind == "up":
                if op.variant in ("tconv", "subpixel"):
                    y = self.layers[key](x)
                elif op.variant == "shuffle":
                    y = F.pixel_shuffle(x, 2)
                else:
                    y = F.interpolate(x, scale_factor=2, mode=op.variant)
                vals.append(torch.cat([y, *(vals[j] for j in op.src[1:])], 1) if op.src[1:] else y)
            elif op.kind == "unshuffle":
                vals.append(F.pixel_unshuffle(x, 2))
        outs = []
        for i, h in enumerate(self.spec.heads):
            x = vals[h.src[0]]
            if h.kind == "gap_linear":
                outs.append(self.heads[str(i)](F.adaptive_avg_pool2d(x, 1).flatten(1)))
            elif h.kind == "flatten_linear":
                outs.append(self.heads[str(i)](torch.flatten(x, 1)))
            elif h.kind == "conv":
                outs.append(self.heads[str(i)](x))
            elif h.kind == "raw":
                outs.append(x)
            elif h.kind == "collect":
                outs.append(self.heads[str(i)](torch.cat([vals[j].mean((2, 3)) for j in h.src], 1)))
        return pack(self.spec.output, outs)


def pack(form: str, outs: list[torch.Tensor]) -> Any:
    """The head outputs ``outs`` in the container ``form`` (``OUTPUTS``)."""
    if form == "plain":
        return outs[0] if len(outs) == 1 else tuple(outs)
    if form == "list":
        return list(outs)
    if form in ("dict", "ordered_dict"):
        d = {f"h{i}": o for i, o in enumerate(outs)}
        return collections.OrderedDict(d) if form == "ordered_dict" else d
    if form == "nested":
        return {"first": outs[0], "rest": [tuple(outs[1:]), {"count": len(outs), "last": outs[-1]}]}
    if form == "namedtuple":
        return _NAMEDTUPLES[len(outs)](*outs)
    if form == "dataclass":
        return HeadOutputs(outs[0], tuple(outs[1:]))
    raise ValueError(f"unknown output form {form!r}")  # pragma: no cover


class RandomNet1(RandomNet):
    def forward(self, x: torch.Tensor) -> Any:
        return self.run((x,))


class RandomNet2(RandomNet):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.run((x, y))


def _up_channels(op: Op, c: int) -> int:
    """Channels of an ``up`` op's up-sampled tensor (before a skip is concatenated)."""
    if op.variant in ("tconv", "subpixel"):
        return op.width
    return c // 4 if op.variant == "shuffle" else c


def _out_spatial(s: int, stride: int) -> int:
    return (s - 1) // stride + 1


def build(spec: NetSpec) -> RandomNet:
    """The eval-mode module of ``spec``: weights and BatchNorm statistics drawn from ``spec.seed``."""
    cls = {1: RandomNet1, 2: RandomNet2}[len(spec.in_channels)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = cls(spec)
        g = torch.Generator().manual_seed(spec.seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    n = m.num_features
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)  # type: ignore[union-attr]
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def example(spec: NetSpec, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    """Inputs for ``spec`` (``batch x C x 8 x 8`` each), deterministic in ``spec.seed``."""
    g = torch.Generator().manual_seed(spec.seed + 2)
    return tuple(torch.randn(batch, c, SPATIAL, SPATIAL, generator=g) for c in spec.in_channels)


# ------------------------------------------------------------------------------------------ strategy
def net_specs(max_ops: int = 8, max_width: int = 16, upsampling: bool = False) -> Any:
    """A hypothesis strategy of ``NetSpec``s (imported lazily so the zoo does not need hypothesis).

    ``upsampling``: also draw ``up`` and ``unshuffle`` ops (dense-prediction nets: down- and up-sampling with
    concatenated skips); False draws exactly the nets it drew before they existed."""
    from hypothesis import strategies as st

    @st.composite
    def draw_spec(draw: Any) -> NetSpec:
        n_in = draw(st.integers(1, 2))
        chans = [draw(st.integers(3, 8)) for _ in range(n_in)]
        sp = [SPATIAL] * n_in
        used = [False] * n_in
        ops: list[Op] = []
        if draw(st.integers(0, 4)):  # usually a stem conv, as real nets have
            ops.append(Op("conv", (0,), draw(st.integers(4, max_width)), 3, flag=draw(st.booleans())))
            used[0] = True
            chans.append(ops[0].width)
            sp.append(SPATIAL)
            used.append(False)
        n_ops = draw(st.integers(1, max_ops))
        for _ in range(n_ops):
            op = _draw_op(draw, st, ops, chans, sp, max_width, upsampling)
            if op is None:
                continue
            for j in op.src:
                used[j] = True
            ops.append(op)
            n = _n_outputs(op)
            chans.extend(_out_channels(op, ops, chans))
            s = sp[op.src[0]]
            if op.kind == "conv":
                s = _out_spatial(s, op.stride)
            elif op.kind == "reuse":
                s = _out_spatial(s, ops[op.arg].stride)
            elif op.kind in ("pool", "unshuffle"):
                s //= 2
            elif op.kind == "up":
                s *= 2
            sp.extend([s] * n)
            used.extend([False] * n)
        heads: list[Op] = []
        produced = list(range(n_in, len(chans))) or list(range(n_in))
        for _ in range(draw(st.integers(1, 2))):
            v = draw(st.sampled_from(produced))
            kind = draw(st.sampled_from(HEADS))
            if kind == "flatten_linear" and chans[v] * sp[v] ** 2 > 1024:
                kind = "gap_linear"
            heads.append(Op(kind, (v,), width=0 if kind == "raw" else draw(st.integers(2, 6))))
            used[v] = True
        rest = tuple(i for i, u in enumerate(used) if not u)
        if rest:
            heads.append(Op("collect", rest, width=draw(st.integers(2, 6))))
        seed = draw(st.integers(0, 2**16))
        output = draw(st.sampled_from(OUTPUTS))
        return NetSpec(
            tuple(chans[:n_in]), tuple(ops), tuple(heads), seed, tuple(zip(chans, sp, strict=True)), output
        )

    return draw_spec()


def _out_channels(op: Op, ops: list[Op], chans: list[int]) -> list[int]:
    c = chans[op.src[0]]
    if op.kind in ("conv", "gconv", "dwconv"):
        return [op.width]
    if op.kind == "reuse":
        return [ops[op.arg].width]
    if op.kind == "cat":
        return [sum(chans[j] for j in op.src)]
    if op.kind == "split":
        return list(op.sections)
    if op.kind == "chunk":
        return [c // op.arg] * op.arg
    if op.kind == "slice":
        return [op.arg - op.width]
    if op.kind == "up":
        return [_up_channels(op, c) + sum(chans[j] for j in op.src[1:])]
    if op.kind == "unshuffle":
        return [4 * c]
    return [c]


def _draw_op(
    draw: Any,
    st: Any,
    ops: list[Op],
    chans: list[int],
    sp: list[int],
    max_width: int,
    upsampling: bool = False,
) -> Op | None:
    """One op over the current values, or None when the drawn kind does not fit them."""
    kind = draw(st.sampled_from(_OPS_UP if upsampling else _OPS))
    n = len(chans)
    i = draw(st.integers(0, n - 1))
    c, s = chans[i], sp[i]
    width = st.integers(4, max_width)
    if kind == "conv":
        stride = draw(st.sampled_from((1, 2))) if s >= 4 else 1
        return Op("conv", (i,), draw(width), draw(st.sampled_from((1, 3))), stride, flag=draw(st.booleans()))
    if kind == "gconv":
        gs = [g for g in range(2, c // 2 + 1) if c % g == 0]
        if not gs:
            return None
        g = draw(st.sampled_from(gs))
        w = g * draw(st.integers(1, max(1, max_width // g)))
        return Op("gconv", (i,), w, draw(st.sampled_from((1, 3))), arg=g, flag=draw(st.booleans()))
    if kind == "dwconv":
        mult = draw(st.sampled_from((1, 2))) if c <= 12 else 1
        return Op("dwconv", (i,), c * mult, 3, flag=draw(st.booleans()))
    if kind == "reuse":
        convs = [j for j, o in enumerate(ops) if o.kind == "conv" and chans[o.src[0]] == c]
        if not convs:
            return None
        return Op("reuse", (i,), arg=draw(st.sampled_from(convs)))
    if kind == "bn":
        return Op("bn", (i,))
    if kind == "act":
        return Op("act", (i,), variant=draw(st.sampled_from(ACTIVATIONS)))
    if kind in ("add", "mul"):
        same = [j for j in range(n) if j != i and chans[j] == c and sp[j] == s]
        if not same:
            return None
        return Op(kind, (i, draw(st.sampled_from(same))))
    if kind == "cat":
        same = [j for j in range(n) if sp[j] == s]
        k = draw(st.integers(2, 3))
        srcs = (i, *(draw(st.sampled_from(same)) for _ in range(k - 1)))
        if sum(chans[j] for j in srcs) > 3 * max_width:
            return None
        return Op("cat", srcs)
    if kind == "split":
        if c < 2:
            return None
        cut = sorted(draw(st.sets(st.integers(1, c - 1), min_size=1, max_size=min(2, c - 1))))
        bounds = [0, *cut, c]
        return Op("split", (i,), sections=tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False)))
    if kind == "chunk":
        ks = [k for k in (2, 3) if c % k == 0]
        if not ks:
            return None
        return Op("chunk", (i,), arg=draw(st.sampled_from(ks)))
    if kind == "slice":
        if c < 2:
            return None
        lo = draw(st.integers(0, c - 1))
        hi = draw(st.integers(lo + 1, c))
        if (lo, hi) == (0, c):
            return None
        return Op("slice", (i,), width=lo, arg=hi)
    if kind == "se":
        return Op("se", (i,), max(2, math.ceil(c / 4)), flag=draw(st.booleans()))
    if kind == "pool":
        if s < 2:
            return None
        return Op("pool", (i,), variant=draw(st.sampled_from(("max", "avg"))))
    if kind == "up":
        return _draw_up(draw, st, i, chans, sp, max_width)
    if kind == "unshuffle":
        if s % 2 or s < 4 or 4 * c > 3 * max_width:
            return None
        return Op("unshuffle", (i,))
    raise AssertionError(kind)  # pragma: no cover


def _draw_up(draw: Any, st: Any, i: int, chans: list[int], sp: list[int], max_width: int) -> Op | None:
    """An ``up`` op on value ``i`` (at most ``2 * SPATIAL`` wide after it), with a skip from a value of the
    up-sampled size when there is one and the draw takes it. Half the time the source is redrawn among the
    down-sampled values, so that the skip exists: a U-Net's way back up."""
    small = [j for j in range(len(chans)) if sp[j] < SPATIAL]
    if small and draw(st.booleans()):
        i = draw(st.sampled_from(small))
    c, s = chans[i], sp[i]
    if 2 * s > 2 * SPATIAL:
        return None
    variant = draw(st.sampled_from(UPSAMPLERS))
    width, k, groups = 0, 1, 1
    if variant == "tconv":
        k = draw(st.sampled_from((2, 3)))
        gs = [g for g in (1, 2) if c % g == 0]
        groups = draw(st.sampled_from(gs))
        width = groups * draw(st.integers(2, max(2, max_width // groups)))
    elif variant == "subpixel":
        width = draw(st.integers(2, max(2, max_width // 2)))
    elif variant == "shuffle" and c % 4:
        return None
    up = Op("up", (i,), width, k, arg=groups, flag=draw(st.booleans()), variant=variant)
    skips = [j for j in range(len(chans)) if sp[j] == 2 * s]
    if skips and draw(st.booleans()):
        j = draw(st.sampled_from(skips))
        if _up_channels(up, c) + chans[j] <= 3 * max_width:
            return Op("up", (i, j), width, k, arg=groups, flag=up.flag, variant=variant)
    return up
