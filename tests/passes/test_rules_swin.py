"""Swin rules (``passes/ops_swin.py``): roll, pad, strided-slice concat / patch merging, relative position
bias, shifted window attention (expanded by ``trace`` into ``passes/swin_ops.py``)."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent
from fxprune.passes import swin_ops
from fxprune.passes.ops_swin import EXPANSIONS
from torchvision.models import swin_transformer as tv
from torchvision.models.video import swin_transformer as tv3d

import fxprune
from fxprune.trace import trace

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _group_with(dep: fxprune.DependencyResult, param: str, role: str = "out") -> fxprune.ChannelGroup:
    hits = [g for g in dep.groups if any(s.param == param and s.role == role for s in g.sites)]
    assert len(hits) == 1, f"{param} ({role}) in {len(hits)} groups"
    return hits[0]


def _sites(g: fxprune.ChannelGroup, param: str) -> list[tuple[int, int, int, str]]:
    return sorted((s.dim, s.offset, s.repeat, s.role) for s in g.sites if s.param == param)


def _prune_and_check(model: nn.Module, x: torch.Tensor, target: float = 0.5) -> fxprune.CompileResult:
    r = fxprune.compile(model.eval(), x, target, latency_runs=0, score="magnitude", progress=False)
    assert r.plan.removed_channels > 0
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, x)
    assert fxprune.count_flops(r.graph_module, (x,)) == r.flops_after
    assert r.flops_after == pytest.approx(r.cost.flops(r.plan.kept_sizes()), rel=1e-9), "cost model not exact"
    return r


# ------------------------------------------------------------------------------------------------- roll
class _Rolled(nn.Module):
    def __init__(self, dims: object) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        y = torch.roll(y, (1, -2), self.dims) if isinstance(self.dims, tuple) else y.roll(3, self.dims)
        return self.b(y)


def test_roll_over_spatial_dims_is_channel_wise() -> None:
    g = _group_with(fxprune.dependency_graph(_Rolled((2, 3)).eval(), X), "a.weight")
    assert g.prunable and _sites(g, "b.weight") == [(1, 0, 1, "in")]
    _prune_and_check(_Rolled((-1, 2)), X)


@pytest.mark.parametrize(("dims", "why"), [(1, "torch.roll along the channel dim"), (None, "flattened")])
def test_roll_over_channels_pins(dims: object, why: str) -> None:
    g = _group_with(fxprune.dependency_graph(_Rolled(dims).eval(), X), "a.weight")
    assert why in " ".join(g.pinned)


# -------------------------------------------------------------------------------------------------- pad
class _Padded(nn.Module):
    def __init__(self, pad: tuple[int, ...]) -> None:
        super().__init__()
        extra = sum(pad[4:6])  # channels added by padding dim 1
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8 + extra, 2, 3)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.pad(self.a(x), self.pad, mode="constant", value=0.5))


def test_pad_of_spatial_dims_is_channel_wise_pad_of_channels_pins() -> None:
    assert _group_with(fxprune.dependency_graph(_Padded((1, 1, 2, 0)).eval(), X), "a.weight").prunable
    _prune_and_check(_Padded((1, 1, 2, 0, 0, 0)), X)
    g = _group_with(fxprune.dependency_graph(_Padded((0, 0, 0, 0, 1, 0)).eval(), X), "a.weight")
    assert "F.pad of the channel dim" in " ".join(g.pinned)


# ------------------------------------------------------------------------------ strided slices + concat
class _SpaceToDepth(nn.Module):
    """Patch merging written out: four strided samplings of the same tokens, concatenated on channels."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        if channels_last:
            self.a, self.norm, self.b = nn.Linear(3, 6), nn.LayerNorm(24), nn.Linear(24, 5)
        else:
            self.a, self.norm, self.b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(24), nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            y = self.a(x.permute(0, 2, 3, 1))
            parts = [y[..., i::2, j::2, :] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
            return self.b(self.norm(torch.cat(parts, -1)))
        y = self.a(x)
        parts = [y[:, :, i::2, j::2] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
        return self.b(F.relu(self.norm(torch.cat(parts, 1))))


@pytest.mark.parametrize("channels_last", [True, False])
def test_cat_of_strided_slices_reuses_the_space(channels_last: bool) -> None:
    model = _SpaceToDepth(channels_last).eval()
    g = _group_with(fxprune.dependency_graph(model, X), "a.weight")
    assert g.prunable and g.size == 6
    w_dim = 1
    assert _sites(g, "b.weight") == [(w_dim, o, 1, "in") for o in (0, 6, 12, 18)]
    assert [s[1] for s in _sites(g, "norm.weight")] == [0, 6, 12, 18]
    r = _prune_and_check(model, X)
    k = r.graph_module.a.weight.shape[0]
    assert k < 6 and r.graph_module.b.weight.shape[1] == 4 * k


# ---------------------------------------------------------------------------------------- patch merging
class _Merged(nn.Module):
    def __init__(self, v2: bool) -> None:
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.merge = (tv.PatchMergingV2 if v2 else tv.PatchMerging)(8)
        self.b = nn.Linear(16, 4)
        with torch.no_grad():
            self.merge.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.merge(self.a(x))))


@pytest.mark.parametrize("v2", [False, True])
def test_patch_merging_is_four_segments_of_its_input(v2: bool) -> None:
    x = torch.randn(2, 7, 6, 3)  # odd H: _patch_merging_pad pads
    dep = fxprune.dependency_graph(_Merged(v2).eval(), x)
    g = _group_with(dep, "a.weight")
    assert g.prunable
    assert _sites(g, "merge.reduction.weight") == [(1, o, 1, "in") for o in (0, 8, 16, 24)]
    if not v2:  # LayerNorm(4C) before the reduction: statistics over the four segments
        assert _sites(g, "merge.norm.weight") == [(0, o, 1, "stats") for o in (0, 8, 16, 24)]
    r = _prune_and_check(_Merged(v2), x)
    k = r.graph_module.a.out_features
    assert r.graph_module.merge.reduction.in_features == 4 * k


# ---------------------------------------------------------------------------- shifted window attention
def _attention(v2: bool, dim: int = 16, heads: int = 4, shift: int = 2) -> nn.Module:
    cls = tv.ShiftedWindowAttentionV2 if v2 else tv.ShiftedWindowAttention
    attn = cls(dim, [4, 4], [shift, shift], heads)
    with torch.no_grad():  # per-head biases far apart, so a bias sliced with the wrong head shows
        if v2:
            attn.cpb_mlp[2].weight.normal_(0, 0.5)
            attn.logit_scale.uniform_(1.0, 3.0)
        else:
            attn.relative_position_bias_table.normal_(0, 1.0)
    return attn


class _Block(nn.Module):
    """A Swin block: residual stream from a linear stem, window attention, MLP, patch merging, a head."""

    def __init__(self, v2: bool, shift: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 16)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = _attention(v2, shift=shift)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.merge = (tv.PatchMergingV2 if v2 else tv.PatchMerging)(16)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.attn(self.norm1(y))
        y = y + self.mlp(self.norm2(y))
        return self.head(self.merge(y).mean((1, 2)))


# 10x10 tokens: padded to 12x12 for 4x4 windows, 9 windows
XS = torch.randn(2, 10, 10, 3, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_expansion_is_bit_identical(v2: bool, shift: int) -> None:
    attn = _attention(v2, shift=shift).eval()
    x = torch.randn(2, 10, 10, 16)
    gm = trace(attn, expansions=EXPANSIONS)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert tv.shifted_window_attention not in targets
    assert swin_ops.swin_window_attention in targets
    with torch.no_grad():
        assert torch.equal(gm(x), attn(x))


def test_trace_without_expansions_keeps_the_opaque_call() -> None:
    targets = [n.target for n in trace(_attention(False, shift=0).eval()).graph.nodes]
    assert tv.shifted_window_attention in targets
    assert swin_ops.swin_window_attention not in targets


@pytest.mark.parametrize("v2", [False, True])
def test_window_attention_heads_are_one_group(v2: bool) -> None:
    dep = fxprune.dependency_graph(_Block(v2).eval(), XS)
    heads = _group_with(dep, "attn.qkv.weight")
    assert heads.prunable and heads.size == 4  # 4 heads of 4
    assert _sites(heads, "attn.qkv.weight") == [(0, o, 4, "out") for o in (0, 16, 32)]
    assert _sites(heads, "attn.qkv.bias") == [(0, o, 4, "out") for o in (0, 16, 32)]
    assert _sites(heads, "attn.proj.weight") == [(1, 0, 4, "in")]
    if v2:
        assert _sites(heads, "attn.cpb_mlp.2.weight") == [(0, 0, 1, "out")]
        assert _sites(heads, "attn.logit_scale") == [(0, 0, 1, "norm")]
    else:
        assert _sites(heads, "attn.relative_position_bias_table") == [(1, 0, 1, "norm")]
    stream = _group_with(dep, "stem.weight")  # the residual stream: stem, qkv columns, proj rows, mlp
    assert stream.prunable
    assert _sites(stream, "attn.qkv.weight") == [(1, 0, 1, "in")]
    assert _sites(stream, "attn.proj.weight") == [(0, 0, 1, "out")]
    assert [s[1] for s in _sites(stream, "merge.reduction.weight")] == [0, 16, 32, 48]


def _heads_group(r: fxprune.CompileResult) -> fxprune.ChannelGroup:
    return _group_with(r.dependency, "attn.qkv.weight")


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_prunes_heads_and_stream(v2: bool, shift: int) -> None:
    torch.manual_seed(0)
    model = _Block(v2, shift).eval()
    r = _prune_and_check(model, XS, target=0.45)
    g = _heads_group(r)
    assert g.id in r.plan.kept, "no head was removed"
    kept_heads = len(r.plan.kept[g.id])
    gm = r.graph_module
    assert (
        gm.attn.qkv.weight.shape[0] == 3 * 4 * kept_heads and gm.attn.proj.weight.shape[1] == 4 * kept_heads
    )
    calls = re.findall(r"swin_window_attention\([^)]*?\[4, 4\], (\d+),", gm.code)
    assert calls == [str(kept_heads)], "num_heads follows the kept heads"
    if not v2:
        assert gm.attn.relative_position_bias_table.shape[1] == kept_heads
    else:
        assert (
            gm.attn.logit_scale.shape[0] == gm.get_submodule("attn.cpb_mlp.2").weight.shape[0] == kept_heads
        )
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)  # unpickling traces the code again: the calls stay wrapped
    with torch.no_grad():
        assert torch.equal(again(XS), gm(XS))


def test_oracle_sees_a_relative_position_bias_sliced_with_the_wrong_heads() -> None:
    """The masked oracle is not blind to the bias table: the same plan with the table's columns taken from
    other heads than the kept ones must fail it."""
    torch.manual_seed(0)
    model = _Block(False).eval()
    r = _prune_and_check(model, XS, target=0.45)
    kept = r.plan.kept[_heads_group(r).id]
    wrong = [h for h in range(4) if h not in kept][: len(kept)]
    wrong += [h for h in range(4) if h not in wrong][: len(kept) - len(wrong)]
    assert sorted(wrong) != sorted(kept)
    table = r.graph_module.attn.relative_position_bias_table
    with torch.no_grad():
        table.copy_(model.attn.relative_position_bias_table[:, wrong])
    with pytest.raises(AssertionError, match="pruned differs from masked original"):
        assert_masked_equivalent(model, r, XS)


class _FunctionalSwin(nn.Module):
    """Calls torchvision's ``shifted_window_attention`` itself, with a bias parameter ``[1, heads, N, N]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 12)
        self.qkv, self.proj = nn.Linear(12, 36), nn.Linear(12, 12)
        self.bias = nn.Parameter(torch.randn(1, 3, 16, 16))
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a = tv.shifted_window_attention(
            y, self.qkv.weight, self.proj.weight, self.bias, [4, 4], 3, [2, 2],
            qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=False,
        )  # fmt: skip
        return self.head(F.relu(y + a).mean((1, 2)))


def test_functional_shifted_window_attention_with_a_bias_parameter() -> None:
    dep = fxprune.dependency_graph(_FunctionalSwin().eval(), XS)
    heads = _group_with(dep, "qkv.weight")
    assert heads.prunable and heads.size == 3 and _sites(heads, "bias") == [(1, 0, 1, "norm")]
    r = _prune_and_check(_FunctionalSwin(), XS, target=0.5)
    assert r.graph_module.bias.shape[1] == r.graph_module.qkv.weight.shape[0] // 12


def test_untracked_bias_over_heads_pins_the_heads() -> None:
    class M(_FunctionalSwin):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            a = tv.shifted_window_attention(
                y, self.qkv.weight, self.proj.weight, self.bias * 2.0, [4, 4], 3, [2, 2],
                qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=False,
            )  # fmt: skip
            return self.head(F.relu(y + a).mean((1, 2)))

    heads = _group_with(fxprune.dependency_graph(M().eval(), XS), "qkv.weight")
    assert "untracked relative position bias spans the heads" in " ".join(heads.pinned)


@pytest.mark.parametrize("v2", [False, True])
def test_tiny_torchvision_swin_pins_only_the_logits(v2: bool) -> None:
    """Every group of a (small) torchvision Swin is prunable but the classifier's output."""
    kw = {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2} if v2 else {}
    model = tv.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], **kw).eval()  # type: ignore[arg-type]
    dep = fxprune.dependency_graph(model, torch.randn(1, 3, 32, 32))
    assert [g.pinned for g in dep.groups if g.pinned] == [("reaches the graph output at node 'output'",)]
    heads = [
        g for g in dep.groups if any(s.param.endswith("attn.qkv.weight") for s in g.sites if s.role == "out")
    ]
    assert sorted(g.size for g in heads) == [2, 2, 4, 4]


# ---------------------------------------------------------------------------------- video Swin (3-D)
def _attention_3d(shift: int = 1, heads: int = 4) -> nn.Module:
    attn = tv3d.ShiftedWindowAttention3d(16, [2, 4, 4], [shift, 2 * shift, 2 * shift], heads)
    with torch.no_grad():  # per-head biases far apart, so a bias sliced with the wrong head shows
        attn.relative_position_bias_table.normal_(0, 1.0)
    return attn


class _Block3d(nn.Module):
    """A video Swin block on ``[B, T, H, W, C]``: linear stem, 3-D window attention, MLP, 2-D patch merging."""

    def __init__(self, shift: int = 1) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 16)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = _attention_3d(shift)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.merge = tv.PatchMerging(16)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.attn(self.norm1(y))
        y = y + self.mlp(self.norm2(y))
        return self.head(self.merge(y).mean((1, 2, 3)))


# 3x10x10 tokens: padded to 4x12x12 for 2x4x4 windows, 18 windows
XV = torch.randn(2, 3, 10, 10, 3, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("size", [(3, 10, 10), (2, 4, 3)], ids=["windows", "window-covers-input"])
def test_expansion_3d_is_bit_identical(shift: int, size: tuple[int, int, int]) -> None:
    """``shifted_window_attention_3d`` becomes the three 3-D calls with the same values; where a window
    covers the input along a dim (2 x 4 x 3 tokens), torchvision's ``_get_window_and_shift_size`` would
    assign into the graph's immutable lists when run node by node: the expansion's copying call runs."""
    attn = _attention_3d(shift).eval()
    x = torch.randn(2, *size, 16)
    gm = trace(attn, expansions=EXPANSIONS)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert tv3d.shifted_window_attention_3d not in targets and tv3d._get_window_and_shift_size not in targets
    assert swin_ops.swin3d_window_attention in targets and swin_ops.swin3d_window_and_shift_size in targets
    with torch.no_grad():
        assert torch.equal(gm(x), attn(x))


def test_unexpanded_window_and_shift_size_fails_where_a_window_covers_the_input() -> None:
    """Why the expansion exists: without it the graph cannot be run node by node (shape propagation) at
    such a size; with it, it can."""
    x = torch.randn(2, 2, 4, 3, 16)
    with pytest.raises(TypeError, match="immutable_list"):
        torch.fx.Interpreter(trace(_attention_3d(1).eval())).run(x)
    torch.fx.Interpreter(trace(_attention_3d(1).eval(), expansions=EXPANSIONS)).run(x)


def test_window_attention_3d_heads_and_stream_are_groups() -> None:
    dep = fxprune.dependency_graph(_Block3d().eval(), XV)
    heads = _group_with(dep, "attn.qkv.weight")
    assert heads.prunable and heads.size == 4  # 4 heads of 4
    assert _sites(heads, "attn.qkv.weight") == [(0, o, 4, "out") for o in (0, 16, 32)]
    assert _sites(heads, "attn.proj.weight") == [(1, 0, 4, "in")]
    assert _sites(heads, "attn.relative_position_bias_table") == [(1, 0, 1, "norm")]
    stream = _group_with(dep, "stem.weight")
    assert stream.prunable
    assert _sites(stream, "attn.qkv.weight") == [(1, 0, 1, "in")]
    assert _sites(stream, "attn.proj.weight") == [(0, 0, 1, "out")]


@pytest.mark.parametrize("shift", [0, 1])
def test_window_attention_3d_prunes_heads_and_stream(shift: int) -> None:
    torch.manual_seed(0)
    r = _prune_and_check(_Block3d(shift).eval(), XV, target=0.45)
    g = _heads_group(r)
    assert g.id in r.plan.kept, "no head was removed"
    kept_heads = len(r.plan.kept[g.id])
    gm = r.graph_module
    assert (
        gm.attn.qkv.weight.shape[0] == 3 * 4 * kept_heads and gm.attn.proj.weight.shape[1] == 4 * kept_heads
    )
    assert gm.attn.relative_position_bias_table.shape[1] == kept_heads
    calls = re.findall(r"swin3d_window_attention\([^)]*?, (\d+), [^)]*?\)", gm.code)
    assert calls == [str(kept_heads)], "num_heads follows the kept heads"


def test_tiny_torchvision_video_swin_pins_only_the_logits() -> None:
    model = tv3d.SwinTransformer3d([2, 4, 4], 16, [2, 2], [2, 4], [2, 4, 4], num_classes=7).eval()
    dep = fxprune.dependency_graph(model, torch.randn(1, 3, 4, 32, 32))
    assert [g.pinned for g in dep.groups if g.pinned] == [("reaches the graph output at node 'output'",)]
