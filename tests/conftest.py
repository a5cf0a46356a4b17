"""Shared oracles for the test suite (shared/DESIGN.md, "Verification")."""

from __future__ import annotations

import copy

import pytest
import torch

import fxprune


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that an oracle that ignores a
    channel cannot pass by accident (a fresh BN is almost the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Everything the user could notice changing: a deep copy of the state dict, the code, the mode."""
    code = model.code if isinstance(model, torch.fx.GraphModule) else repr(model)
    return copy.deepcopy(model.state_dict()), code, model.training


def assert_unchanged(model: torch.nn.Module, snap: tuple[dict[str, torch.Tensor], str, bool]) -> None:
    state, code, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"compile mutated {k}"
    assert (model.code if isinstance(model, torch.fx.GraphModule) else repr(model)) == code
    assert model.training == training


def assert_masked_equivalent(
    model: torch.nn.Module, result: fxprune.CompileResult, x: torch.Tensor, rtol: float = 1e-5
) -> float:
    """The pruned model equals the original with removed channels zeroed in every consumer.

    Also checks the oracle is not vacuous: when channels were removed, masking changes the output.
    Returns the relative error.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = fxprune.masked_model(model, result.plan)(x)
        got = result.graph_module(x)
        orig = model(x)
    assert got.shape == ref.shape == orig.shape
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"pruned differs from masked original: {err:.3g} > {rtol} x {scale:.3g}"
    if result.plan.removed_channels:
        assert not torch.allclose(orig, ref, rtol=0, atol=1e-7 * scale), (
            "masking changed nothing: oracle is vacuous"
        )
    return err / scale


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
