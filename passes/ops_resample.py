"""Op family ``resample``: spatial up- and down-sampling of dense-prediction nets.

- ``F.interpolate`` (every mode: nearest, nearest-exact, linear, bilinear, bicubic, trilinear, area; with
  ``size`` or ``scale_factor``, ``align_corners``, ``recompute_scale_factor``, ``antialias``) and the
  modules ``nn.Upsample``, ``nn.UpsamplingNearest2d``, ``nn.UpsamplingBilinear2d``: each output channel is
  computed from the same input channel only, so the channels flow through as they are (``_resample``).
  ONNX ``Resize`` (nearest, nearest-exact, the linear modes and bicubic); ``area`` and ``antialias`` are
  not translated: the writer falls back to torch's exporter, which verification checks like any other.
- ``F.pixel_shuffle`` / ``nn.PixelShuffle`` (``(*, C r^2, H, W) -> (*, C, H r, W r)``: input channel
  ``c r^2 + i r + j`` is the pixel ``(i, j)`` of output channel ``c``): the ``r^2`` input channels of one
  output channel are one unit (``_pixel_shuffle``); ONNX ``DepthToSpace`` (mode ``CRD``, torch's order).
- ``F.pixel_unshuffle`` / ``nn.PixelUnshuffle``, the inverse: input channel ``c`` becomes the ``r^2``
  output channels ``c r^2 .. c r^2 + r^2 - 1`` (a repeat of ``r^2``); ONNX ``Reshape``, ``Transpose``,
  ``Reshape`` (``SpaceToDepth`` orders its output channels the other way round).

None of them has parameters, size attributes or FLOPs that follow the channels (torch's counter gives them
none), so there is no attribute fix, cost dim or compensation role.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.family import OpFamily, Ops
from fxprune.passes.onnx_translate import OnnxWriter, Unsupported, arg, input_node
from fxprune.passes.rule_context import RuleContext, Tracked, self_arg, tensor_shape

__all__ = ["FAMILY"]


def _resample(ctx: RuleContext) -> Any:
    """Interpolation over the spatial dims of ``(N, C, *spatial)``: channels on ``N`` or ``C`` flow through
    unchanged; channels on a spatial dim (after a permute) are resampled, mixed or dropped: pinned."""
    x = self_arg(ctx)
    t = ctx.tracked(x)
    if t is None:
        return None
    si, so = tensor_shape(ctx.value(x)), tensor_shape(ctx.out)
    if si is None or so is None or len(si) != len(so) or t.dim >= 2 or so[t.dim] != si[t.dim]:
        ctx.pin(t, "interpolation resamples the dim that carries the channels")
        return None
    return t


def _factor(ctx: RuleContext, key: str) -> int:
    """The module's ``upscale_factor``/``downscale_factor``, or the functional call's argument 1."""
    if ctx.module is not None:
        return int(getattr(ctx.module, key))
    return int(ctx.arg(1, key))


def _pixel_shuffle(ctx: RuleContext) -> Any:
    """``(*, C r^2, H, W) -> (*, C, H r, W r)``.

    Cases, for the input's channel dim ``d`` (rank ``n``; the channel dim of the op is ``n - 3``):

    1. ``d < n - 3`` (a batch dim): unchanged.
    2. ``d == n - 3`` and every segment's repeat is a multiple of ``r^2``: output channel ``c`` is input
       channels ``c r^2 .. c r^2 + r^2 - 1``, one block of a channel; the output carries the same channels
       with repeat ``/ r^2``.
    3. ``d == n - 3`` with finer channels (a conv's output, one position each): the rule asks the
       producers for blocks of ``r^2`` (``RuleContext.coarsen``) and pins for now; the next run of the
       rules sees case 2. What cannot be coarsened stays pinned: with this reason (channels that are not
       a producer's own, e.g. a cat of one tensor with itself), or with the reason of the op that then cuts
       a block of the coarse producer (a slice inside a block, a residual with another layout).
    4. ``d`` a spatial dim: the shuffle moves channels into it: pinned.
    """
    x = self_arg(ctx)
    t = ctx.tracked(x)
    si = tensor_shape(ctx.value(x))
    if t is None or si is None:
        return None
    r = _factor(ctx, "upscale_factor")
    c = len(si) - 3
    if t.dim < c:
        return t
    if t.dim > c:
        ctx.pin(t, "pixel_shuffle moves spatial positions that carry channels")
        return None
    rr = r * r
    if all(rep % rr == 0 for _, rep in t.segs):
        return Tracked(c, tuple((atom, rep // rr) for atom, rep in t.segs))
    ctx.coarsen(t.segs, rr)
    ctx.pin(t, f"pixel_shuffle({r}) needs its input channels in whole blocks of {rr}, one per output channel")
    return None


def _pixel_unshuffle(ctx: RuleContext) -> Any:
    """``(*, C, H r, W r) -> (*, C r^2, H, W)``: input channel ``c`` becomes output channels
    ``c r^2 .. c r^2 + r^2 - 1`` (the segments repeated ``r^2`` times more); a batch dim is unchanged; a
    spatial dim that carries channels is pinned."""
    x = self_arg(ctx)
    t = ctx.tracked(x)
    si = tensor_shape(ctx.value(x))
    if t is None or si is None:
        return None
    r = _factor(ctx, "downscale_factor")
    c = len(si) - 3
    if t.dim < c:
        return t
    if t.dim > c:
        ctx.pin(t, "pixel_unshuffle moves spatial positions that carry channels")
        return None
    return Tracked(c, ctx.spaces.scale(t.segs, r * r))


# -- ONNX -----------------------------------------------------------------------------------------------------
def _pixel_shuffle_onnx(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
    x = input_node(n)
    if len(w.shape(x)) != 4:
        raise Unsupported(f"{n.name}: pixel_shuffle of a rank-{len(w.shape(x))} input")
    r = int(m.upscale_factor) if isinstance(m, nn.PixelShuffle) else int(arg(n, 1, "upscale_factor"))
    w.emit("DepthToSpace", [x.name], n.name, blocksize=r, mode="CRD")


def _pixel_unshuffle_onnx(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
    """``[N, C, H r, W r] -> [N, C, H, r, W, r] -> [N, C, r, r, H, W] -> [N, C r^2, H, W]``."""
    x = input_node(n)
    si = w.shape(x)
    if len(si) != 4:
        raise Unsupported(f"{n.name}: pixel_unshuffle of a rank-{len(si)} input")
    r = int(m.downscale_factor) if isinstance(m, nn.PixelUnshuffle) else int(arg(n, 1, "downscale_factor"))
    N, C, H, W = si
    six = w.emit("Reshape", [x.name, w.const([N, C, H // r, r, W // r, r], "shape", np.int64)])
    moved = w.emit("Transpose", [six], perm=[0, 1, 3, 5, 2, 4])
    w.emit("Reshape", [moved, w.const(list(w.shape(n)), "shape", np.int64)], n.name)


def _resample_args(n: fx.Node, m: nn.Module | None) -> tuple[Any, Any, str, Any, Any, bool]:
    """``(size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)`` of an interpolation
    node: the module's attributes, or ``F.interpolate``'s arguments."""
    if isinstance(m, nn.Upsample):  # UpsamplingNearest2d/UpsamplingBilinear2d set mode and align_corners
        return m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor, False
    return (
        arg(n, 1, "size"),
        arg(n, 2, "scale_factor"),
        arg(n, 3, "mode", "nearest"),
        arg(n, 4, "align_corners"),
        arg(n, 5, "recompute_scale_factor"),
        bool(arg(n, 6, "antialias", False)),
    )


#: torch's interpolation mode -> ONNX ``Resize`` attributes (``align_corners`` picks the coordinate mode of
#: the linear and cubic ones)
_RESIZE: dict[str, dict[str, Any]] = {
    "nearest": {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    "nearest-exact": {
        "mode": "nearest",
        "coordinate_transformation_mode": "half_pixel",
        "nearest_mode": "round_prefer_ceil",
    },
    "linear": {"mode": "linear"},
    "bilinear": {"mode": "linear"},
    "trilinear": {"mode": "linear"},
    "bicubic": {"mode": "cubic", "cubic_coeff_a": -0.75},
}


def _interpolate_onnx(w: OnnxWriter, n: fx.Node, m: nn.Module | None = None) -> None:
    """ONNX ``Resize``. With a ``scale_factor`` (not recomputed) torch maps output position ``o`` to input
    ``o / scale_factor``, as ``Resize`` does with ``scales``; otherwise with the static output ``sizes``
    (``in / out``). ``area`` (an adaptive average pool) and ``antialias`` are not translated."""
    size, scale, mode, align_corners, recompute, antialias = _resample_args(n, m)
    if mode not in _RESIZE or antialias:
        raise Unsupported(f"{n.name}: interpolate mode={mode!r}, antialias={antialias}")
    x = input_node(n)
    k = len(w.shape(x)) - 2
    attrs = dict(_RESIZE[mode])
    if attrs["mode"] != "nearest":
        attrs["coordinate_transformation_mode"] = "align_corners" if align_corners else "half_pixel"
    if scale is not None and not recompute and not align_corners:
        scales = [1.0, 1.0, *([float(scale)] * k if isinstance(scale, (int, float)) else map(float, scale))]
        w.emit("Resize", [x.name, "", w.const(scales, "scales")], n.name, **attrs)
    else:
        w.emit("Resize", [x.name, "", "", w.const(list(w.shape(n)), "sizes", np.int64)], n.name, **attrs)


FAMILY = OpFamily(
    "resample",
    (
        Ops(
            (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample),
            _resample,
            onnx={
                k: _interpolate_onnx
                for k in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)
            },
        ),
        Ops(
            (nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle),
            _pixel_shuffle,
            onnx=_pixel_shuffle_onnx,
        ),
        Ops(
            (nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle),
            _pixel_unshuffle,
            onnx=_pixel_unshuffle_onnx,
        ),
    ),
)
