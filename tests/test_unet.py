"""Issue 16's acceptance: a U-Net (``fxprune.models_zoo.unet``: transposed conv, pixel shuffle and bilinear
interpolation up-sampling, concat skips over three levels) prunes to 30% of its FLOPs, exactly (the masked
original), ONNX Runtime-verified, with every conv prunable but the head's output."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_masked_equivalent, assert_unchanged, randomize_norms, snapshot
from fxprune.models_zoo.unet import UNet

import fxprune

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_every_group_but_the_output_is_prunable() -> None:
    dep = fxprune.dependency_graph(randomize_norms(UNet()).eval(), X)
    pinned = [g for g in dep.groups if g.pinned]
    assert len(pinned) == 1 and "reaches the graph output" in pinned[0].pinned[0], dep.pinned_reasons()
    shuffled = next(
        g for g in dep.groups if any(s.param == "up1.weight" and s.role == "out" for s in g.sites)
    )
    assert shuffled.size == 16 and {s.repeat for s in shuffled.sites if s.param == "up1.weight"} == {4}


@pytest.mark.parametrize("score", ["magnitude", "taylor"])
def test_unet_compiles_to_30_percent_verified_and_masked_equivalent(score: str) -> None:
    model = randomize_norms(UNet()).eval()
    snap = snapshot(model)
    data = [X] if score != "magnitude" else None
    r = fxprune.compile(model, X, 0.3, score=score, data=data, latency_runs=0)
    assert_unchanged(model, snap)
    assert r.flops_after <= 0.3 * r.flops_before * (1 + 1e-9)
    assert r.flops_after == fxprune.count_flops(r.graph_module, (X,))
    assert r.verification is not None and r.verification.passed, r.verification
    assert r.verification.max_rel_error <= 1e-4
    assert_masked_equivalent(model, r, X)
    gm = r.graph_module
    assert gm.up2.in_channels == gm.up2.weight.shape[0] and gm.up2.out_channels < 32
    skip = gm.get_submodule("enc1.3").out_channels
    assert (
        gm.up1.out_channels % 4 == 0
        and gm.get_submodule("dec1.0").in_channels == gm.up1.out_channels // 4 + skip
    )
    assert gm.head.out_channels == 2
