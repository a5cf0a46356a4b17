"""bench/penalty.py and bench/early_pruning.py: the parts that decide (the acceptance of the penalty bench,
the verdicts on the gradient-flow claims) and the signed gradient-norm criterion, against brute force."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_bench

import fxprune


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_grad_norm_raise_ranks_by_the_signed_first_order_change_of_the_gradient_norm() -> None:
    """score_c - score_d == a_c - a_d with a_c = w_c . (H g), w_c channel c's consumer columns, from autograd:
    removing channel c changes ||g||^2 / 2 by about -a_c, so the lowest score raises it most."""
    early = load_bench("early_pruning")
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    res = fxprune.compile(model, x[:1], 0.8, score=early.GradNormRaise, data=[(x, y)], compensate="none",
                          round_to=1, verify=False, progress=False)  # fmt: skip
    producers = {g.id: g.producers for g in fxprune.dependency_graph(model, x[:1]).groups}
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    got, want = [], []
    for g in sorted(res.scores):
        producer = next(p for p in ("conv1", "conv2") if p in producers[g])
        consumer, dim = ("conv2.weight", 1) if producer == "conv1" else ("fc.weight", 1)
        for c in range(len(res.scores[g].mean)):
            v = [torch.zeros_like(p) for p in params.values()]
            i = list(params).index(consumer)
            v[i].select(dim, c).copy_(params[consumer].detach().select(dim, c))
            hv = torch.autograd.grad(grads, list(params.values()), grad_outputs=v, retain_graph=True)
            want.append(float(sum((a * b.detach()).sum() for a, b in zip(hv, grads, strict=True))))
            got.append(float(res.scores[g].mean[c]))
    got_a, want_a = np.array(got), np.array(want)
    assert len(got_a) == 7 and np.ptp(want_a) > 0
    np.testing.assert_allclose(got_a - got_a[0], want_a - want_a[0], rtol=1e-3, atol=1e-4 * np.ptp(want_a))


def _cell(crit: str, **kw: Any) -> dict[str, Any]:
    row = {"model": "m", "seed": 0, "k": 1, "criterion": crit, "mean_train_loss": 0.5, "loss_after_prune": 1.0,
           "grad_norm_after": 1.0, "final_acc": 0.95}  # fmt: skip
    return {**row, **kw}


def test_gradient_flow_claims_are_decided_by_the_majority_of_cells() -> None:
    early = load_bench("early_pruning")

    def cells(
        k: int, seed: int, *, mag_fast: bool, lp_lowest: bool, raise_poor: bool
    ) -> list[dict[str, Any]]:
        common = {"k": k, "seed": seed}
        return [
            _cell("magnitude", mean_train_loss=0.3 if mag_fast else 0.6, **common),
            _cell("loss_preservation", loss_after_prune=0.5 if lp_lowest else 1.5, **common),
            _cell("grad_norm", **common),
            _cell("grad_norm_raise", grad_norm_after=3.0, final_acc=0.8 if raise_poor else 0.95, **common),
        ]

    rows = (cells(1, 0, mag_fast=True, lp_lowest=True, raise_poor=True)
            + cells(1, 1, mag_fast=True, lp_lowest=False, raise_poor=True)
            + cells(2, 0, mag_fast=False, lp_lowest=False, raise_poor=True))  # fmt: skip
    v = early.claims(rows, epochs=8)
    assert [(c["hits"], c["cells"], c["verdict"]) for c in v] == [
        (2, 3, "confirmed"),
        (1, 3, "refuted"),
        (3, 3, "confirmed"),
    ]
    # a final accuracy within the margin of the others is not "poor", and the end of training is no cell
    rows = cells(1, 0, mag_fast=True, lp_lowest=True, raise_poor=False) + [
        dict(r, k=8) for r in cells(8, 0, mag_fast=True, lp_lowest=True, raise_poor=True)
    ]
    v = early.claims(rows, epochs=8)
    assert (v[2]["hits"], v[2]["cells"], v[2]["verdict"]) == (0, 1, "refuted")
    assert v[0]["cells"] == 1 and v[1]["cells"] == 1


def _prow(arm: str, target: float, how: str, acc: float, seed: int = 0) -> dict[str, Any]:
    return {
        "model": "resnet20",
        "seed": seed,
        "arm": arm,
        "target": target,
        "how": how,
        "acc": acc,
        "flops": target,
    }


def test_penalty_acceptance_compares_seed_means_and_takes_the_best_tp_reg() -> None:
    pen = load_bench("penalty")
    rows = []
    for seed, (ref, ours5, ours3, plain3) in enumerate(
        [(0.99, 0.988, 0.97, 0.90), (0.97, 0.968, 0.95, 0.96)]
    ):
        rows += [
            _prow("plain", 1.0, "unpruned", ref, seed),
            _prow("plain", 0.3, "default", plain3, seed),
            _prow("onthefly@0.5", 1.0, "unpruned", ours5, seed),
            _prow("onthefly@0.5", 0.5, "magnitude+bias", ours5, seed),
            _prow("onthefly@0.3", 1.0, "unpruned", 0.975, seed),
            _prow("onthefly@0.3", 0.3, "magnitude+bias", ours3, seed),
            _prow("tp_sparse(0.001)", 0.3, "tp", 0.2, seed),
            _prow("tp_sparse(0.01)", 0.3, "tp", 0.961, seed),
        ]
    acc = {a["target"]: a for a in pen.summarise(rows, [0.5, 0.3])["acceptance"]}
    assert acc[0.5]["within_half_point"] is True  # 0.978 against 0.980
    assert acc[0.5]["penalty_cost_unpruned"] == pytest.approx(0.002)
    assert acc[0.3]["plain_fxprune"] == pytest.approx(0.93) and acc[0.3]["above_plain_fxprune"] is True
    assert acc[0.3]["tp_sparse_best_arm"] == "tp_sparse(0.01)" and acc[0.3]["above_tp_sparse"] is False
    rows[3] = _prow("onthefly@0.5", 0.5, "magnitude+bias", 0.97, 0)  # mean 0.969: 1.1 points below
    acc = {a["target"]: a for a in pen.summarise(rows, [0.5, 0.3])["acceptance"]}
    assert acc[0.5]["within_half_point"] is False


def test_batchnorm_recalibration_is_the_plain_average_over_the_training_set() -> None:
    """A BatchNorm on the input: after recalibration its running mean is the per-channel mean of the training
    images, and its variance the mean of the per-batch (unbiased) variances; mode and momentum are kept."""
    early = load_bench("early_pruning")
    from fxprune.models_zoo.digits import Digits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0])[:, None, None] + 5
    data = Digits(x, torch.zeros(40, dtype=torch.long), x[:2], torch.zeros(2, dtype=torch.long))
    bn = nn.BatchNorm2d(3, momentum=0.3).eval()
    early.recalibrate_batchnorm(bn, data, batch_size=10)
    assert not bn.training and bn.momentum == 0.3 and int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    want_var = torch.stack([x[i : i + 10].var((0, 2, 3), unbiased=True) for i in range(0, 40, 10)]).mean(0)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-5)
