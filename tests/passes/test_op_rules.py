"""One test per rule family: how channels flow, what is coupled, what is pinned (and why)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, randomize_norms
from fxprune.passes.dependency import DependencyPass, UnsupportedOpError

import fxprune
from fxprune.data import META_CHANNELS
from fxprune.trace import shape_propagate, trace

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _groups(model: nn.Module, *x: torch.Tensor) -> fxprune.DependencyResult:
    return fxprune.dependency_graph(model.eval(), x if len(x) > 1 else x[0])


def _group_with(dep: fxprune.DependencyResult, param: str, role: str = "out") -> fxprune.ChannelGroup:
    hits = [g for g in dep.groups if any(s.param == param and s.role == role for s in g.sites)]
    assert len(hits) == 1, f"{param} ({role}) in {len(hits)} groups"
    return hits[0]


def _prune_and_check(model: nn.Module, x: torch.Tensor = X, target: float = 0.6) -> fxprune.CompileResult:
    randomize_norms(model)
    r = fxprune.compile(model.eval(), x, target, latency_runs=0, score="magnitude")
    assert r.plan.removed_channels > 0
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, x)
    assert r.flops_after == pytest.approx(r.cost.flops(r.plan.kept_sizes()), rel=1e-9), (
        "cost model is not exact"
    )
    return r


class _Chain(nn.Module):
    def __init__(self, mid: nn.Module | None = None, c: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.mid = mid or nn.Identity()
        self.b = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mid(self.a(x)))


@pytest.mark.parametrize(
    "mid",
    [
        nn.ReLU(),
        nn.GELU(),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3),  # 8 % 3 != 0: exported by the dynamo fallback (onnxscript)
        nn.Upsample(scale_factor=2),
    ],
)
def test_passthrough_modules_keep_channels(mid: nn.Module) -> None:
    dep = _groups(_Chain(mid), X)
    g = _group_with(dep, "a.weight")
    assert g.prunable and g.consumers == ("b",)
    _prune_and_check(_Chain(mid))


def test_softmax_over_channels_pins_other_dims_do_not() -> None:
    class M(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.a, self.b, self.dim = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.softmax(self.a(x), dim=self.dim))

    assert "softmax normalises across the channels" in _group_with(_groups(M(1), X), "a.weight").pinned[0]
    assert _group_with(_groups(M(-1), X), "a.weight").prunable


@pytest.mark.parametrize(
    "norm",
    [
        lambda y, d: y / (y.norm(dim=d, keepdim=True) + 1),
        lambda y, d: y / (torch.linalg.vector_norm(y, dim=d, keepdim=True) + 1),
        lambda y, d: F.normalize(y, dim=d),
    ],
)
def test_norm_over_channels_pins_other_dims_do_not(norm: object) -> None:
    class M(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.a, self.b, self.dim = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(norm(self.a(x), self.dim))  # type: ignore[operator]

    why = _group_with(_groups(M(1), X), "a.weight").pinned
    assert any("across the channel dim" in w or "over the channel dim" in w for w in why), why
    assert _group_with(_groups(M(-1), X), "a.weight").prunable
    _prune_and_check(M(-1))


def test_residual_add_couples_producers() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.Conv2d(8, 2, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y = y + self.b(y)
            y += self.b(y)  # the same module twice: its weight is claimed twice, consistently
            return self.c(y)

    g = _group_with(_groups(M(), X), "a.weight")
    assert set(g.producers) >= {"a", "b"} and "c" in g.consumers
    _prune_and_check(M())


def test_parameter_operand_is_sliced_and_untracked_tensor_pins() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
            self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) * self.gamma + 1.0)

    g = _group_with(_groups(Scale(), X), "a.weight")
    assert any(s.param == "gamma" and s.role == "norm" for s in g.sites)
    r = _prune_and_check(Scale())
    assert r.graph_module.gamma.shape[0] == r.graph_module.a.out_channels < 8

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + y)

    g = _group_with(_groups(Other(), X, torch.randn(2, 8, 8, 8)), "a.weight")
    assert "untracked tensor 'y' spans the channel dim" in g.pinned[0]
    g = _group_with(_groups(Other(), X, torch.randn(2, 1, 8, 8)), "a.weight")
    assert g.prunable, "a broadcast (size-1) operand couples nothing"


def test_cat_offsets_and_concat_along_other_dim() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.cat([self.b(x), self.a(x)], 1)
            y = torch.cat([y, y], dim=2)  # along H: channels stay aligned
            return self.c(y)

    dep = _groups(M(), X)
    ga, gb = _group_with(dep, "a.weight"), _group_with(dep, "b.weight")
    assert [s.offset for s in ga.sites if s.param == "c.weight"] == [6]
    assert [s.offset for s in gb.sites if s.param == "c.weight"] == [0]
    _prune_and_check(M())


def test_split_chunk_slice_literals_follow_kept_counts() -> None:
    from fxprune.models_zoo.toy import SplitNet

    r = _prune_and_check(SplitNet(), torch.randn(2, 3, 16, 16))
    code = r.graph_module.code
    assert "split(" in code and "16" not in code.split("split(")[1].split(")")[0], "split size not rewritten"


def test_chunk_pieces_are_unified() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p, q = self.a(x).chunk(2, dim=1)
            return self.b(p * q)

    dep = _groups(M(), X)
    g = _group_with(dep, "a.weight")
    assert g.size == 4 and [s.offset for s in g.sites if s.param == "a.weight"] == [0, 4]
    _prune_and_check(M())


def test_indexing_one_channel_or_strided_pins() -> None:
    class M(nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.a, self.mode = nn.Conv2d(3, 8, 1), mode

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return y[:, 0] if self.mode == "int" else y[:, ::2]

    assert "indexing a single channel" in " ".join(_group_with(_groups(M("int"), X), "a.weight").pinned)
    assert "strided slice" in " ".join(_group_with(_groups(M("step"), X), "a.weight").pinned)


def test_flatten_linear_repeat_and_view_literal() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.adaptive_avg_pool2d(self.a(x), 4)
            return self.fc(y.view(-1, 8 * 4 * 4))

    g = _group_with(_groups(M(), X), "a.weight")
    (site,) = [s for s in g.sites if s.param == "fc.weight"]
    assert (site.dim, site.repeat) == (1, 16)
    r = _prune_and_check(M())
    assert f"view(-1, {r.graph_module.fc.in_features})" in r.graph_module.code


class _Shuffle(nn.Module):
    """ShuffleNet v2's channel shuffle between two convs (sizes read at run time, as torchvision does)."""

    def __init__(self, groups: int = 2, literal: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.g, self.literal = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), groups, literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        if self.literal:
            y = y.view(2, self.g, 8 // self.g, 8, 8).transpose(1, 2).reshape(2, 8, 8, 8)
        else:
            y = y.view(n, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(y)


@pytest.mark.parametrize("literal", [False, True])
def test_channel_shuffle_ties_slot_j_of_every_group(literal: bool) -> None:
    dep = _groups(_Shuffle(literal=literal), X)
    g = _group_with(dep, "a.weight")
    assert g.prunable and g.size == 4, "slot j of both groups is one channel unit"
    assert sorted(s.offset for s in g.sites if s.param == "a.weight") == [0, 4]
    (site,) = [s for s in g.sites if s.param == "b.weight"]
    assert site.repeat == 2, "after the shuffle, slot j sits at positions 2j and 2j+1"
    r = _prune_and_check(_Shuffle(literal=literal), target=0.5)
    assert r.graph_module.b.in_channels == r.graph_module.a.out_channels < 8
    if literal:
        kept = r.graph_module.a.out_channels
        assert f"view(2, 2, {kept // 2}, 8, 8)" in r.graph_module.code
        assert f"reshape(2, {kept}, 8, 8)" in r.graph_module.code


def test_reshape_merge_with_outer_groups_and_unflatten() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).view(n, c, h, w)  # split then merge back, no shuffle
            y = y.flatten(1).view(n, c, h, w)  # a repeated block back to channels
            return self.b(y)

    dep = _groups(M(), X)
    g = _group_with(dep, "a.weight")
    assert g.prunable and g.size == 4
    sites = sorted((s.offset, s.repeat) for s in g.sites if s.param == "b.weight")
    assert sites == [(0, 1), (4, 1)], "group i of the merged dim is channels [4i, 4i+4) again"
    _prune_and_check(M(), target=0.5)


def test_unflatten_and_view_as_of_other_channels_pin() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
            self.d, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).flatten(1).unflatten(1, (8, 8, 8))  # literal sizes that cannot be rewritten
            z = self.b(x).flatten(2).view_as(self.d(x))  # b's channels take d's shape: tied to d's
            return self.c(y) + self.e(z)

    dep = _groups(M(), X)
    assert "reshape splits or scatters the channel dim" in " ".join(_group_with(dep, "a.weight").pinned)
    assert _group_with(dep, "b.weight") == _group_with(dep, "d.weight")


def test_reshape_into_three_dims_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y.view(2, 2, 2, 2, 8, 8).sum(1).reshape(2, 4, 8, 8).repeat(1, 2, 1, 1))

    g = _group_with(_groups(M(), X), "a.weight")
    assert "reshape splits or scatters the channel dim" in " ".join(g.pinned)


def test_stochastic_depth_is_channelwise() -> None:
    from torchvision.ops import StochasticDepth, stochastic_depth

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
            self.sd = StochasticDepth(0.2, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y = y + self.sd(self.b(y))
            y = y + stochastic_depth(self.b(y), 0.1, "batch", self.training)
            return self.c(y)

    g = _group_with(_groups(M(), X), "a.weight")
    assert g.prunable and set(g.producers) == {"a", "b", "b_1"} and set(g.consumers) == {"b", "b_1", "c"}
    _prune_and_check(M())


def test_permute_transpose_and_channels_last_linear() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 6)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(self.a(x).permute(0, 2, 3, 1))
            return self.b(y.transpose(1, 3).transpose(2, 3))

    dep = _groups(M(), X)
    assert "fc" in _group_with(dep, "a.weight").consumers
    assert "b" in _group_with(dep, "fc.weight").consumers
    _prune_and_check(M())


def test_reductions() -> None:
    class M(nn.Module):
        def __init__(self, dims: tuple[int, ...]) -> None:
            super().__init__()
            self.a, self.fc, self.dims = nn.Conv2d(3, 8, 1), nn.Linear(8, 2), dims

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).mean(self.dims)
            return self.fc(y) if len(self.dims) == 2 else y

    assert _group_with(_groups(M((2, 3)), X), "a.weight").prunable
    assert "reduction over the channel dim" in _group_with(_groups(M((1,)), X), "a.weight").pinned[0]
    _prune_and_check(M((2, 3)))


def test_grouped_conv_ties_slots_and_depthwise_ties_in_out() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)  # 2 in, 3 out per group
            self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # multiplier 2
            self.b = nn.Conv2d(24, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.dw(self.g(self.a(x))))

    dep = _groups(M(), X)
    ga = _group_with(dep, "a.weight")
    assert ga.size == 2 and sorted(s.offset for s in ga.sites if s.param == "a.weight") == [0, 2, 4, 6]
    gg = _group_with(dep, "g.weight")
    assert gg.size == 3
    assert {(s.param, s.repeat) for s in gg.sites if s.param in ("dw.weight", "b.weight")} == {
        ("dw.weight", 2),
        ("b.weight", 2),
    }
    r = _prune_and_check(M(), target=0.5)
    gm = r.graph_module
    assert gm.g.groups == 4 and gm.dw.groups == gm.dw.in_channels == gm.g.out_channels
    assert gm.dw.out_channels == 2 * gm.dw.in_channels


def test_linear_on_non_last_dim_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.a(x))  # mixes W (=8), not channels

    assert (
        "linear applied along a non-channel dim"
        in _group_with(_groups(M(), torch.randn(2, 3, 8, 8)), "a.weight").pinned[0]
    )


def test_functional_forms() -> None:
    from fxprune.models_zoo.toy import FunctionalNet

    r = _prune_and_check(FunctionalNet(), torch.randn(2, 3, 8, 8), target=0.5)
    gm = r.graph_module
    kept = gm.w_dw.shape[0]
    assert kept < 16 and gm.scale.shape[1] == kept and gm.rm.shape[0] == kept
    assert f", {kept})" in gm.code.split("conv2d(relu")[1].split("\n")[0], (
        "depthwise groups literal not rewritten"
    )


def test_unknown_op_pins_with_reason_and_strict_raises() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cumsum(self.a(x), dim=1))

    g = _group_with(_groups(M(), X), "a.weight")
    assert g.pinned == ("no rule for torch.cumsum at node 'cumsum'",)
    gm = trace(M().eval())
    shape_propagate(gm, (X,))
    with pytest.raises(UnsupportedOpError, match="torch.cumsum at node %cumsum"):
        DependencyPass(strict=True)(gm)


def test_output_is_pinned_and_node_meta_written() -> None:
    dep = _groups(_Chain(), X)
    assert _group_with(dep, "b.weight").pinned == ("reaches the graph output at node 'output'",)
    gm = trace(_Chain().eval())
    shape_propagate(gm, (X,))
    DependencyPass()(gm)
    metas = {n.name: n.meta[META_CHANNELS] for n in gm.graph.nodes}
    assert metas["x"] is None and metas["a"].dim == 1 and metas["a"].segments == ((0, 1),)


class _ConvNeXtish(nn.Module):
    """A ConvNeXt stage in miniature: channels-first and channels-last layer norms on the residual stream,
    a depthwise conv, an inverted-bottleneck MLP, a ``[C, 1, 1]`` layer scale and stochastic depth."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) * 0.1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.sd = StochasticDepth(0.1, "row")
        self.head_norm, self.head = nn.LayerNorm(c), nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (8,), self.ln_w, self.ln_b, 1e-6).permute(0, 3, 1, 2)
        z = self.norm(self.dw(y).permute(0, 2, 3, 1))
        z = self.fc2(F.gelu(self.fc1(z))).permute(0, 3, 1, 2)
        y = y + self.sd(self.layer_scale * z)
        return self.head(self.head_norm(y.mean((2, 3))))


def test_layer_norm_over_channels_slices_and_normalises_kept_channels() -> None:
    import dataclasses

    model = _ConvNeXtish()
    dep = _groups(model, X)
    g = _group_with(dep, "stem.weight")
    assert g.prunable, g.pinned
    stats = {s.param for s in g.sites if s.role == "stats"}
    assert stats == {"ln_w", "norm.weight", "head_norm.weight"}
    assert set(g.consumers) == {"fc1", "head"} and set(g.producers) == {"stem", "dw", "fc2"}
    assert any(s.param == "layer_scale" for s in g.sites)
    r = _prune_and_check(model, target=0.5)
    gm = r.graph_module
    kept = gm.stem.out_channels
    assert kept < 8 and gm.norm.normalized_shape == (kept,) and gm.head_norm.normalized_shape == (kept,)
    assert f"layer_norm(permute, ({kept},)" in gm.code, "functional normalized_shape not rewritten"
    assert "ln_w" in r.plan.stats and len(r.plan.stats["ln_w"][1]) == kept
    # the statistics masking is what makes the oracle hold: without it, the pruned model differs
    plain = fxprune.masked_model(model.eval(), dataclasses.replace(r.plan, stats={}))
    with torch.no_grad():
        assert not torch.allclose(plain(X), gm(X), atol=1e-4)


def test_layer_norm_not_over_channels_is_channelwise_and_no_affine_pins() -> None:
    class M(nn.Module):
        def __init__(self, affine: bool) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
            self.spatial = nn.LayerNorm((8, 8))
            self.chan = nn.LayerNorm(8, elementwise_affine=affine)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.spatial(self.a(x))  # normalises each channel's H x W map on its own
            return self.b(self.chan(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    g = _group_with(_groups(M(False), X), "a.weight")
    assert "layer_norm over the channel dim without an affine weight" in " ".join(g.pinned)
    g = _group_with(_groups(M(True), X), "a.weight")
    assert g.prunable and not any(s.param.startswith("spatial") for s in g.sites)
    _prune_and_check(M(True))


def test_computed_sizes_follow_kept_counts_or_pin() -> None:
    class M(nn.Module):
        def __init__(self, other: bool) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
            self.other = other

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            n, c, h, w = y.shape
            z = self.b(y)
            if self.other:  # an op without a rule: z's channels are unknown, c is y's width
                z = torch.cumsum(z, dim=1)
            z = z.view(n, c, h * w).view(n, c, h, w)  # c is read from y, not from z
            return self.c(z)

    dep = _groups(M(other=True), X)
    assert "reshape to a size read from channels" in " ".join(_group_with(dep, "a.weight").pinned)
    dep = _groups(M(other=False), X)
    assert _group_with(dep, "a.weight").prunable and _group_with(dep, "b.weight").prunable
    r = _prune_and_check(M(other=False), target=0.4)
    kb = r.graph_module.b.out_channels
    assert kb < 8 and f"view(getitem, {kb}, mul)" in r.graph_module.code, "computed size not replaced"


@pytest.mark.parametrize("shuffle", [False, True])
def test_heads_split_on_the_last_dim_ties_slots(shuffle: bool) -> None:
    class M(nn.Module):
        """Tokens ``[N, L, 12]`` split into 3 heads of 4, optionally head-major -> slot-major, merged back."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 12), nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.gelu(self.a(x))
            n, length, c = y.shape
            y = y.view(n, length, 3, c // 3)
            y = y.transpose(2, 3).reshape(n, length, c) if shuffle else y.reshape(n, length, c)
            return self.b(y)

    x = torch.randn(2, 6, 5)
    g = _group_with(_groups(M(), x), "a.weight")
    assert g.prunable and g.size == 4
    assert sorted(s.offset for s in g.sites if s.param == "a.weight") == [0, 4, 8]
    b_sites = sorted((s.offset, s.repeat) for s in g.sites if s.param == "b.weight")
    assert b_sites == ([(0, 3)] if shuffle else [(0, 1), (4, 1), (8, 1)])
    r = _prune_and_check(M(), x, target=0.5)
    assert r.graph_module.b.in_features == r.graph_module.a.out_features == 3 * (4 - r.plan.removed_channels)


class _GroupNormNet(nn.Module):
    def __init__(self, groups: int, functional: bool, affine: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 2, 1)
        self.gn = nn.GroupNorm(groups, 16, affine=affine)
        self.functional = functional
        if affine:
            with torch.no_grad():
                self.gn.weight.uniform_(0.5, 1.5)
                self.gn.bias.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.functional:
            y = F.group_norm(y, self.gn.num_groups, self.gn.weight, self.gn.bias)
        else:
            y = self.gn(y)
        return self.b(F.relu(y))


@pytest.mark.parametrize("functional", [False, True])
def test_group_norm_one_channel_groups_slice(functional: bool) -> None:
    g = _group_with(_groups(_GroupNormNet(16, functional), X), "a.weight")
    assert g.prunable and {s.param for s in g.sites if s.role == "norm"} == {"gn.weight", "gn.bias"}
    r = _prune_and_check(_GroupNormNet(16, functional))
    kept = r.graph_module.a.out_channels
    if functional:
        assert f"group_norm(a, {kept}," in r.graph_module.code
    else:
        assert r.graph_module.gn.num_groups == r.graph_module.gn.num_channels == kept


@pytest.mark.parametrize("functional", [False, True])
def test_group_norm_wide_groups_keep_the_same_slots_in_every_group(functional: bool) -> None:
    """GroupNorm(4, 16): slot j of every group is one channel of a group of 4; num_groups stays 4 and each
    group's statistics run over its kept slots (role "stats": the oracle normalises over them too)."""
    g = _group_with(_groups(_GroupNormNet(4, functional), X), "a.weight")
    assert g.prunable and g.size == 4
    assert sorted(s.offset for s in g.sites if s.param == "a.weight") == [0, 4, 8, 12]
    assert {(s.param, s.role) for s in g.sites if s.param.startswith("gn.")} == {
        ("gn.weight", "stats"),
        ("gn.bias", "norm"),
    }
    model = _GroupNormNet(4, functional)
    r = _prune_and_check(model, target=0.5)
    k = 4 - r.plan.removed_channels
    assert 0 < k < 4 and r.graph_module.a.out_channels == 4 * k
    kept = r.plan.params["a.weight"][0]
    assert [i % 4 for i in kept] == [i % 4 for i in kept[:k]] * 4, "every group keeps the same slots"
    if functional:
        assert "group_norm(a, 4," in r.graph_module.code
    else:
        assert (r.graph_module.gn.num_groups, r.graph_module.gn.num_channels) == (4, 4 * k)
    # the oracle is not vacuous: masking the consumer columns alone (statistics over all 16) differs
    plain = fxprune.PrunePlan(r.plan.kept, r.plan.group_sizes, r.plan.params, r.plan.inputs, r.plan.modules)
    with torch.no_grad():
        assert not torch.allclose(fxprune.masked_model(model, plain)(X), r.graph_module(X), atol=1e-4)


def test_group_norm_wide_groups_without_affine_pin() -> None:
    g = _group_with(_groups(_GroupNormNet(4, False, affine=False), X), "a.weight")
    assert "group_norm with 4 groups of 4 channels and no affine weight" in " ".join(g.pinned)


def test_whole_shape_of_other_channels_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, z = self.a(x), self.b(x)
            z = z.flatten(2).view(y.shape)  # a packed shape read from y: cannot follow z's own pruning
            w = z.new_zeros(y.shape[1:])  # an op without a rule reads y's width
            return self.c(y + z + w)

    dep = _groups(M(), X)
    g = _group_with(dep, "a.weight")
    assert g == _group_with(dep, "b.weight")
    reasons = " ".join(g.pinned)
    assert "reshape to a size read from channels" in reasons and "channel count" in reasons


# -- up-sampling: transposed convs, pixel (un)shuffle, interpolation (ops_conv, ops_resample) ---------------------
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _x(rank: int, side: int = 6, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, *[side] * rank, generator=torch.Generator().manual_seed(rank))


class _UpChain(nn.Module):
    """``b(up(relu(a(x))))`` in ``rank`` spatial dims; ``up`` a transposed conv or any module between."""

    def __init__(self, rank: int, up: nn.Module, c: int = 8, c_up: int = 12) -> None:
        super().__init__()
        self.a, self.up, self.b = _CONV[rank](3, c, 1), up, _CONV[rank](c_up, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.up(F.relu(self.a(x))))


@pytest.mark.parametrize(
    ("rank", "kwargs"),
    [
        (1, {"kernel_size": 4, "stride": 3, "padding": 1, "output_padding": 2}),
        (2, {"kernel_size": 3, "stride": 2, "padding": (1, 0), "output_padding": 1, "dilation": (2, 1)}),
        (2, {"kernel_size": 2, "stride": 2, "bias": False}),
        (3, {"kernel_size": (2, 3, 2), "stride": (2, 1, 2), "padding": (0, 1, 0)}),
    ],
)
def test_conv_transpose_weight_rows_are_inputs_and_columns_outputs(rank: int, kwargs: dict) -> None:
    def make() -> _UpChain:
        return _UpChain(rank, _CONV_T[rank](8, 12, **kwargs))

    dep = _groups(make(), _x(rank))
    ga = _group_with(dep, "a.weight")
    assert {(s.param, s.dim, s.role) for s in ga.sites if s.param.startswith("up.")} == {
        ("up.weight", 0, "in")
    }
    gu = _group_with(dep, "up.weight")
    assert gu.size == 12 and ("b.weight", 1, "in") in {(s.param, s.dim, s.role) for s in gu.sites}
    assert ("up.weight", 1) in {(s.param, s.dim) for s in gu.sites if s.role == "out"}
    r = _prune_and_check(make(), _x(rank), target=0.5)
    up = r.graph_module.up
    assert up.in_channels == up.weight.shape[0] == r.graph_module.a.out_channels < 8
    assert up.out_channels == up.weight.shape[1] == r.graph_module.b.in_channels < 12


def test_grouped_transposed_conv_ties_input_slots_and_keeps_groups() -> None:
    def make() -> _UpChain:  # 4 groups: 2 inputs -> 3 outputs each
        return _UpChain(2, nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, groups=4))

    dep = _groups(make(), X)
    ga = _group_with(dep, "a.weight")
    assert ga.size == 2 and sorted(s.offset for s in ga.sites if s.param == "a.weight") == [0, 2, 4, 6]
    gu = _group_with(dep, "up.weight")
    assert gu.size == 3 and sorted(s.offset for s in gu.sites if s.param == "b.weight") == [0, 3, 6, 9]
    r = _prune_and_check(make(), target=0.4)
    up = r.graph_module.up
    assert up.groups == 4 and up.in_channels == up.weight.shape[0] == r.graph_module.a.out_channels
    assert up.out_channels == 4 * up.weight.shape[1] == r.graph_module.b.in_channels
    assert r.plan.removed_channels > 0


@pytest.mark.parametrize("functional", [False, True])
def test_depthwise_transposed_conv_repeats_its_input_channels(functional: bool) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(16, 4, 1)
            self.up = nn.ConvTranspose2d(8, 16, 2, stride=2, groups=8)  # multiplier 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            if functional:
                return self.b(F.conv_transpose2d(y, self.up.weight, self.up.bias, 2, 0, 0, 8))
            return self.b(self.up(y))

    dep = _groups(M(), X)
    g = _group_with(dep, "a.weight")
    assert g.size == 8 and ("up.weight", 0, 1) in {(s.param, s.dim, s.repeat) for s in g.sites}
    assert {(s.param, s.repeat) for s in g.sites if s.param in ("up.bias", "b.weight")} == {
        ("up.bias", 2),
        ("b.weight", 2),
    }
    r = _prune_and_check(M(), target=0.5)
    kept = r.graph_module.a.out_channels
    assert kept < 8
    if functional:
        assert f", 2, 0, 0, {kept})" in r.graph_module.code, "groups literal not rewritten"
    else:
        up = r.graph_module.up
        assert up.groups == up.in_channels == kept and up.out_channels == 2 * kept


class _Shuffled(nn.Module):
    """``b(shuffle(relu(a(x))))``: pixel_shuffle by 2 of a conv's 16 channels into 4, or of a cat."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.a2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.ps = nn.PixelShuffle(2)
        self.b = nn.Conv2d({"cat": 6, "slice": 5}.get(how, 4), 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        if self.how == "cat":  # two producers, each in whole blocks of 4
            y = torch.cat([y, self.a2(x)], 1)
        elif self.how == "slice":  # a cut inside a block: cannot be coarsened
            y = torch.cat([y, self.a2(x)[:, 2:]], 1)[:, 2:]
        if self.how == "functional":
            return self.b(F.pixel_shuffle(y, 2))
        return self.b(self.ps(y))


@pytest.mark.parametrize("how", ["module", "functional", "cat"])
def test_pixel_shuffle_makes_r2_input_channels_one_unit(how: str) -> None:
    dep = _groups(_Shuffled(how), X)
    g = _group_with(dep, "a.weight")
    assert g.prunable and g.size == 4, "16 conv outputs are 4 blocks of 4"
    assert {s.repeat for s in g.sites if s.param in ("a.weight", "a.bias")} == {4}
    assert {(s.param, s.repeat) for s in g.sites if s.role == "in"} == {("b.weight", 1)}
    if how == "cat":
        g2 = _group_with(dep, "a2.weight")
        assert g2.size == 2 and {(s.param, s.offset) for s in g2.sites if s.role == "in"} == {("b.weight", 4)}
    r = _prune_and_check(_Shuffled(how), target=0.5)
    gm = r.graph_module
    assert gm.a.out_channels % 4 == 0 and gm.a.out_channels < 16
    assert gm.b.in_channels == (gm.a.out_channels + (gm.a2.out_channels if how == "cat" else 0)) // 4


def test_pixel_shuffle_of_channels_cut_inside_a_block_pins() -> None:
    """The shuffle asks conv ``a`` for blocks of 4; the slice at channel 2 of its output then cuts a block."""
    dep = _groups(_Shuffled("slice"), X)
    g = _group_with(dep, "a.weight")
    assert not g.prunable and "slice inside a repeated channel block" in " ".join(g.pinned)


def test_pixel_shuffle_of_a_graph_input_pins_with_its_reason() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y + F.pixel_shuffle(torch.cat([y, y, y, y], 1), 2)[:, :, ::2, ::2])

    g = _group_with(_groups(M(), X), "a.weight")
    assert "pixel_shuffle(2) needs its input channels in whole blocks of 4" in " ".join(g.pinned)


@pytest.mark.parametrize("functional", [False, True])
def test_pixel_unshuffle_repeats_each_channel_r2_times(functional: bool) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.pu, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(24, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            return self.b(F.pixel_unshuffle(y, 2) if functional else self.pu(y))

    g = _group_with(_groups(M(), X), "a.weight")
    (site,) = [s for s in g.sites if s.param == "b.weight"]
    assert (g.size, site.dim, site.repeat) == (6, 1, 4)
    r = _prune_and_check(M(), target=0.5)
    assert r.graph_module.b.in_channels == 4 * r.graph_module.a.out_channels < 24


def _interp(rank: int, **kwargs: object) -> nn.Module:
    class Interp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, **kwargs)  # type: ignore[arg-type]

    return Interp()


#: (spatial rank, the module between the two convs): every interpolation mode and option
RESAMPLERS = [
    (1, _interp(1, scale_factor=2, mode="nearest")),
    (1, _interp(1, size=9, mode="nearest-exact")),
    (1, _interp(1, scale_factor=1.5, mode="linear", align_corners=True)),
    (1, _interp(1, size=4, mode="area")),
    (2, _interp(2, scale_factor=(2, 1.5), mode="nearest")),
    (2, _interp(2, scale_factor=1.7, mode="nearest-exact", recompute_scale_factor=True)),
    (2, _interp(2, size=(9, 7), mode="bilinear", align_corners=False)),
    (2, _interp(2, scale_factor=0.5, mode="bilinear", antialias=True)),
    (2, _interp(2, scale_factor=2, mode="bicubic", align_corners=True)),
    (2, _interp(2, size=(4, 5), mode="bicubic", antialias=True)),
    (2, _interp(2, size=(3, 4), mode="area")),
    (3, _interp(3, scale_factor=2, mode="trilinear", align_corners=False)),
    (3, _interp(3, size=(3, 7, 5), mode="nearest")),
    (2, nn.Upsample(scale_factor=2, mode="bilinear")),
    (2, nn.UpsamplingNearest2d(scale_factor=2)),
    (2, nn.UpsamplingBilinear2d(size=(9, 9))),
]
#: the ones the writer does not translate (area, antialias): torch's exporter writes them
_TORCH_EXPORTED = {3, 7, 9, 10}


@pytest.mark.parametrize(
    "i", range(len(RESAMPLERS)), ids=[f"{r}d-{i}" for i, (r, _) in enumerate(RESAMPLERS)]
)
def test_interpolation_keeps_channels_in_every_mode(i: int) -> None:
    rank, resample = RESAMPLERS[i]

    def make() -> _UpChain:
        return _UpChain(rank, resample, c=8, c_up=8)

    g = _group_with(_groups(make(), _x(rank)), "a.weight")
    assert g.prunable and g.consumers == ("b",)
    r = _prune_and_check(make(), _x(rank), target=0.5)
    assert r.verification is not None
    if i in _TORCH_EXPORTED:  # TorchScript, or dynamo where it fails
        assert r.verification.exporter in ("torchscript", "dynamo")
    else:
        assert r.verification.exporter == "fxprune"


def test_interpolation_of_a_dim_carrying_channels_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).permute(0, 2, 1, 3)  # channels on dim 2, resampled
            return self.b(F.interpolate(y, size=(8, 8), mode="bilinear").permute(0, 2, 1, 3))

    assert "interpolation resamples the dim that carries the channels" in " ".join(
        _group_with(_groups(M(), X), "a.weight").pinned
    )


class _Conv1DLike(nn.Module):
    """transformers' ``Conv1D``: a linear with its weight stored ``[in, out]``, applied by ``torch.addmm``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.shape[:-1] + (self.weight.shape[1],))


def test_addmm_with_a_parameter_matrix_is_a_linear() -> None:
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = _Conv1DLike(12, 32), _Conv1DLike(32, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(F.gelu(self.fc(x)))

    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    dep = _groups(MLP(), x)
    hidden = _group_with(dep, "fc.weight")
    assert hidden.prunable and {(s.param, s.dim) for s in hidden.sites} >= {
        ("fc.weight", 1),
        ("fc.bias", 0),
        ("proj.weight", 0),
    }
    _prune_and_check(MLP(), x, 0.6)


def test_scaled_addmm_pins() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.w = nn.Linear(6, 8), nn.Parameter(torch.randn(8, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(torch.zeros(4), self.a(x), self.w, beta=0.5)

    assert (
        "addmm with a computed matrix or bias, or scaled"
        in _group_with(_groups(M(), torch.randn(3, 6)), "a.weight").pinned[0]
    )
