"""Acceptance of the core issue: eight torchvision CNNs at 224x224, target 0.5, random init, eval mode."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_masked_equivalent, assert_unchanged, randomize_norms, snapshot

import fxprune

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "densenet121",
    "googlenet",
    "squeezenet1_1",
    "vgg11_bn",
    "alexnet",
]


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_at_half_flops(name: str) -> None:
    _check_half_flops(name, (1, 3, 224, 224))


def _check_half_flops(name: str, shape: tuple[int, ...]) -> None:
    """``name`` (random init, non-trivial norms) compiled at 0.5: the user's model unchanged, the FLOPs
    recounted by torch's counter, fewer parameters, ONNX Runtime and the masked oracle agree."""
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(*shape)
    snap = snapshot(model)
    r = fxprune.compile(model, x, 0.5, latency_runs=0, score="magnitude", progress=False)
    assert_unchanged(model, snap)
    recount = fxprune.count_flops(r.graph_module, (x,))
    assert recount == r.flops_after
    assert 0.48 <= recount / r.flops_before <= 0.50
    assert r.params_after < r.params_before
    v = r.verification
    assert v is not None and v.passed and v.max_rel_error <= 1e-4, v
    assert_masked_equivalent(model, r, x)


#: torchvision's 3-D CNN video classifiers at a tiny clip (4 frames of 32x32; they take any size): Conv3d,
#: BatchNorm3d, MaxPool3d, AdaptiveAvgPool3d, and r2plus1d's (2+1)-D factorised convs (mc3_18 has the same
#: ops as r3d_18). The others (mc3_18, s3d, mvit_v2_s, swin3d_t) run in ``bench/coverage.py --family
#: video``; the rules of swin3d_t and mvit_v2_s are tested on tiny models in
#: ``tests/passes/test_rules_swin.py`` and ``tests/passes/test_rules_mvit.py``.
VIDEO = ["r3d_18", "r2plus1d_18"]


@pytest.mark.parametrize("name", VIDEO)
def test_torchvision_video_at_half_flops(name: str) -> None:
    _check_half_flops(name, (1, 3, 4, 32, 32))
