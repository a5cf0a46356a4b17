"""``compile(..., submodules=)``: traceable parts of a model whose own forward torch.fx cannot trace (a
detector's data-dependent pre/post-processing around a backbone) are pruned in place; the model around
them runs unchanged."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_unchanged, randomize_norms, snapshot

import fxprune
from fxprune.verify import flatten_outputs

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Backbone(nn.Module):
    """Traceable; returns an OrderedDict of two feature maps (as torchvision's ``BackboneWithFPN``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 16)
        self.layer1 = nn.Sequential(_block(16, 32, 2), _block(32, 32))
        self.layer2 = nn.Sequential(_block(32, 48, 2), _block(48, 48))
        self.out1 = nn.Conv2d(32, 8, 1)
        self.out2 = nn.Conv2d(48, 8, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        a = self.layer1(self.stem(x))
        b = self.layer2(a)
        return OrderedDict([("0", self.out1(a)), ("1", self.out2(b))])


class Neck(nn.Module):
    def forward(self, feats: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return feats


class TinyDetector(nn.Module):
    """Data-dependent around a traceable backbone: a branch on the input's values (torch.fx cannot trace
    it), a normalisation before the backbone, a head called once per feature map (two shapes), a top-k."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if float(x.abs().max()) > 1e6:  # data-dependent control flow
            x = x / float(x.abs().max())
        feats = self.neck(self.backbone((x - 0.5) * 2.0))
        scores = torch.cat([self.head(f).flatten(1) for f in feats.values()], 1)
        out = []
        for s in scores:
            top = torch.topk(s, 5)
            out.append({"scores": top.values, "index": top.indices})
        return out


def _tiny() -> TinyDetector:
    torch.manual_seed(0)
    return randomize_norms(TinyDetector()).eval()


def _max_rel(a: object, b: object) -> float:
    worst = 0.0
    for x, y in zip(flatten_outputs(a), flatten_outputs(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        scale = float(y.abs().max()) if y.is_floating_point() and y.numel() else 1.0
        worst = max(worst, float((x.double() - y.double()).abs().max()) / max(scale, 1e-12))
    return worst


def test_the_whole_tiny_detector_does_not_trace() -> None:
    with pytest.raises(fxprune.TraceError):
        fxprune.compile(_tiny(), X, 0.5, latency_runs=0, progress=False, verify=False)


def test_backbone_of_a_tiny_detector_equals_the_masked_original() -> None:
    model = _tiny()
    snap = snapshot(model)
    r = fxprune.compile(model, X, 0.5, submodules="backbone", latency_runs=0, progress=False)
    assert isinstance(r, fxprune.SubmodulesResult)
    assert_unchanged(model, snap)
    assert list(r.parts) == ["backbone"]
    assert isinstance(r.model.backbone, torch.fx.GraphModule)
    assert r.model.backbone is r.parts["backbone"].graph_module
    assert r.model.head is not model.head and torch.equal(r.model.head.weight, model.head.weight)
    # the budget is a fraction of the backbone's FLOPs; the whole model's are counted by torch's counter
    sub_before = fxprune.count_flops(model.backbone, ((X - 0.5) * 2.0,))
    sub_after = fxprune.count_flops(r.model.backbone, ((X - 0.5) * 2.0,))
    assert r.flops_before == sub_before and r.flops_after == sub_after
    assert sub_after <= 0.55 * sub_before
    assert r.model_flops_before == fxprune.count_flops(model, (X,))
    assert r.model_flops_after == fxprune.count_flops(r.model, (X,))
    assert r.model_flops_before - r.model_flops_after == sub_before - sub_after
    v = r.verification["backbone"]
    assert v is not None and v.passed
    # the drop-in model equals the original with the removed channels zeroed in every consumer
    with torch.no_grad():
        got, masked, orig = (
            r.model(X.clone()),
            fxprune.masked_model(model, r.plan)(X.clone()),
            model(X.clone()),
        )
    assert [list(o) for o in got] == [list(o) for o in orig]
    assert all(torch.equal(g["index"], m["index"]) for g, m in zip(got, masked, strict=True))
    assert _max_rel(got, masked) <= 1e-5
    assert _max_rel(masked, orig) > 1e-3, "masking changed nothing: the oracle is vacuous"
    assert set(r.plan.inputs) and all(k.startswith("backbone.") for k in r.plan.inputs)
    assert "model FLOPs" in r.report and "submodule 'backbone'" in r.report


def test_calibration_batches_reach_the_submodule_through_the_model() -> None:
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(3, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)]
    r = fxprune.compile(model, X, 0.6, submodules=["backbone"], data=data, compensate="none", score="taylor",
                        latency_runs=0, progress=False)  # fmt: skip
    calib = r.parts["backbone"].calibration
    assert calib is not None
    got = [b.inputs for b in calib.batches]
    assert len(got) == 2
    for (t,), x in zip(got, data, strict=True):  # the backbone's inputs: normalised by the model
        assert torch.equal(t, (x - 0.5) * 2.0)
    assert r.parts["backbone"].score == "taylor"


def test_several_submodules_are_compiled_each_at_the_target() -> None:
    two = nn.ModuleDict({"a": Backbone(), "b": Backbone()}).eval()

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = two

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > 1e9:
                return x
            return self.m["a"](x)["1"].sum((2, 3)) + self.m["b"](x[:, :, :16, :16])["0"].sum((2, 3))

    model2 = Two().eval()
    r2 = fxprune.compile(model2, X, 0.5, submodules=["m.a", "m.b"], latency_runs=0, progress=False,
                         verify=False)  # fmt: skip
    assert list(r2.parts) == ["m.a", "m.b"]
    assert all(0.4 <= p.flops_ratio <= 0.55 for p in r2.parts.values())
    absolute = fxprune.compile(model2, X, r2.flops_before // 2, submodules=["m.a", "m.b"], latency_runs=0,
                               progress=False, verify=False)  # fmt: skip
    assert all(0.4 <= p.flops_ratio <= 0.55 for p in absolute.parts.values())
    with torch.no_grad():
        assert _max_rel(r2.model(X), fxprune.masked_model(model2, r2.plan)(X)) <= 1e-5


@pytest.mark.parametrize(
    ("submodules", "match"),
    [
        ("backbon", "'backbon', which is not a submodule of TinyDetector.*children: backbone, neck"),
        ("backbone.layer3", "'backbone' \\(Backbone\\) has no child 'layer3'"),
        ("unused", "'unused' \\(Conv2d\\) is never called"),
        ("head", "'head' is called 2 times on example_input with different shapes"),
        (["backbone", "backbone.stem"], "'backbone.stem', which is inside 'backbone'"),
        (["head", "head"], "names 'head' twice"),
        (
            "neck",
            "'neck' \\(Neck\\) is called with a OrderedDict as argument 0.*name a submodule called with tensors",
        ),
        ("", "names the model itself"),
        (3, "must be a submodule's qualified name"),
        ([], "must be a submodule's qualified name"),
    ],
)
def test_submodule_errors_name_the_path_and_the_fix(submodules: object, match: str) -> None:
    with pytest.raises(fxprune.InputError, match=match):
        fxprune.compile(_tiny(), X, 0.5, submodules=submodules, latency_runs=0, progress=False)  # type: ignore[call-overload]


def test_calibration_errors_name_the_submodule() -> None:
    with pytest.raises(fxprune.InputError, match="data\\[1\\] calls submodule 'backbone' with .*16, 16"):
        fxprune.compile(_tiny(), X, 0.5, submodules="backbone", data=[X, torch.rand(2, 3, 16, 16)],
                        latency_runs=0, progress=False)  # fmt: skip
    with pytest.raises(fxprune.InputError, match="loss_fn= applies to the whole model"):
        fxprune.compile(_tiny(), X, 0.5, submodules="backbone", data=[X], loss_fn=lambda o, t: o,
                        latency_runs=0, progress=False)  # fmt: skip
    with pytest.raises(fxprune.InputError, match="targets are not used"):
        fxprune.compile(_tiny(), X, 0.5, submodules="backbone", data=[(X, torch.zeros(2))],
                        latency_runs=0, progress=False)  # fmt: skip


def test_an_error_compiling_a_part_names_it() -> None:
    with pytest.raises(fxprune.TargetError) as info:
        fxprune.compile(_tiny(), X, 1e-9, submodules="backbone", latency_runs=0, progress=False)
    assert any("compiling submodule 'backbone'" in n for n in info.value.__notes__)


def test_fasterrcnn_backbone_equals_the_masked_original() -> None:
    """A torchvision detector at a small image: boxes, scores and labels of the pruned detector equal the
    masked original's (every proposal kept: score threshold 0, a detection cap)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128, box_score_thresh=0.0,
        box_detections_per_img=20, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
    ).eval()  # fmt: skip
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    snap = snapshot(model)
    r = fxprune.compile(model, x, 0.5, submodules="backbone", latency_runs=0, progress=False)
    assert_unchanged(model, snap)
    assert r.flops_ratio <= 0.55 and r.model_flops_after < r.model_flops_before
    assert r.verification["backbone"] is not None and r.verification["backbone"].passed
    with torch.no_grad():
        got, masked, orig = r.model(x), fxprune.masked_model(model, r.plan)(x), model(x)
    assert len(got[0]["boxes"]) > 0
    assert set(got[0]) == {"boxes", "scores", "labels"}
    assert torch.equal(got[0]["labels"], masked[0]["labels"])
    assert _max_rel(got, masked) <= 1e-4
    assert not torch.equal(masked[0]["boxes"], orig[0]["boxes"])
