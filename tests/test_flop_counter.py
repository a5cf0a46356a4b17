"""``fxprune.trace.flop_counter``: torch's ``FlopCounterMode`` without per-module attribution, same totals;
and with torch's attention formula for the fused CPU kernel, which torch's counter counts as 0."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision
from fxprune.models_zoo.toy import ConcatNet, ResidualNet
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.stages import graph_flops
from fxprune.trace import EXTRA_FLOP_FORMULAS, flop_counter, mha_slow_path, shape_propagate, trace


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.flatten(2).transpose(1, 2)
        y = self.mha(q, q, q, need_weights=False)[0]
        y = torch.nn.functional.scaled_dot_product_attention(y[:, None], y[:, None], y[:, None])[:, 0]
        return self.fc(y.mean(1))


MODELS: list[tuple[str, Any, tuple[int, ...]]] = [
    ("residual", ResidualNet, (2, 3, 16, 16)),
    ("concat", ConcatNet, (2, 3, 16, 16)),
    ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, (1, 3, 32, 32)),
    ("resnet18", torchvision.models.resnet18, (1, 3, 32, 32)),
    ("attention", Attention, (2, 16, 4, 4)),
]


@pytest.mark.parametrize(("make", "shape"), [(m, s) for _, m, s in MODELS], ids=[n for n, _, _ in MODELS])
def test_flop_counter_totals_equal_torchs_counter(make: Any, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    with torch.no_grad(), mha_slow_path():
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as plain:
            model(x)
        with flop_counter() as slim:
            model(x)
    assert plain.get_total_flops() > 0
    assert slim.get_total_flops() == plain.get_total_flops()
    assert fxprune.count_flops(model, (x,)) == plain.get_total_flops()
    # the per-node counts of shape propagation add up to the same total
    gm = trace(model)
    shape_propagate(gm, (x,))
    assert graph_flops(gm) == plain.get_total_flops()


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_costs_on_the_cpu_what_torch_counts_on_a_gpu(gqa: bool) -> None:
    """torch's counter has formulas for the GPU attention kernels, none for the CPU one (0 FLOPs): fxprune's
    counter adds torch's own formula for it, so head pruning saves the attention FLOPs on every device."""
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 2 if gqa else 4, 16, 8)

    def run() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=gqa)

    with FlopCounterMode(display=False) as plain:
        run()
    with flop_counter() as ours:
        run()
    assert plain.get_total_flops() == 0  # the gap (a torch that counts it makes this test say so)
    assert ours.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q k^T and attn v, every query head
    if torch.cuda.is_available():
        with FlopCounterMode(display=False) as gpu:
            torch.nn.functional.scaled_dot_product_attention(q.cuda().half(), k.cuda().half(), k.cuda().half(),
                                                             enable_gqa=gqa)  # fmt: skip
        assert gpu.get_total_flops() == ours.get_total_flops()
