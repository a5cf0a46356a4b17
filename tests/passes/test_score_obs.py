"""``score="obs"`` (group OBS with K-FAC curvature) against brute force: the loss change after removing a
channel and applying lsq compensation (``fxprune.passes.compensate.compensate``, what ``compile`` runs).

1. Where K-FAC is exact (the consumer computes the output, a quadratic loss at its least-squares optimum, or
   the label-free output-matching loss), the score is the measured loss change after removal + lsq.
2. A 3x3 conv consumer (with a bias, with a BatchNorm after it, with neither) under cross-entropy: the score is
   ``1/2 tr(G dW A dW^T)`` with ``dW`` the refit compensation computed, ``A`` the unfolded input's second
   moment and ``G`` the K-FAC factor built from full per-sample Jacobians and loss Hessians.
3. On a small trained net the ranking follows the measured loss change after removal + lsq.
4. ``joint=True`` (the default): the scores are marginal costs along the greedy OBS order, whose running sums
   are the loss after removing those channels together + lsq, where K-FAC is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.compensate import compensate
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.plan import build_plan
from fxprune.passes.score import ScoreContext
from fxprune.passes.scores import get_score
from scipy import stats
from torch.autograd.functional import hessian, jacobian

from fxprune.calib import make_calibration
from fxprune.errors import InputError
from fxprune.trace import copy_graph_module, shape_propagate, trace


def _setup(model: nn.Module, batches: list) -> tuple:
    first = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    gm = trace(model)
    shape_propagate(gm, (first,))
    groups = DependencyPass()(gm).groups
    calib = make_calibration(gm, (first,), batches, None)
    return gm, groups, calib


def _scores(gm, groups, calib, **options) -> dict[int, np.ndarray]:
    got = get_score("obs")(groups, ScoreContext(calib, torch.device("cpu")), **options)(gm)
    return {gid: s.mean for gid, s in got.items()}


def _removed(gm, groups, calib, gid: int, removed: int | set[int], damping: float):
    """``gm`` after removing channel(s) ``removed`` of group ``gid``: lsq compensation, then the removed
    consumer columns set to zero (what the rewrite's slicing computes), and the compensation's overrides."""
    gone = {removed} if isinstance(removed, int) else removed
    size = next(g.size for g in groups if g.id == gid)
    plan = build_plan(groups, {gid: tuple(i for i in range(size) if i not in gone)})
    new, comp = compensate(gm, groups, plan, calib, "lsq", damping=damping)
    params = dict(new.named_parameters())
    with torch.no_grad():
        for name, (dim, kept) in plan.inputs.items():
            mask = torch.ones(params[name].shape[dim], dtype=torch.bool)
            mask[list(kept)] = False
            params[name].index_fill_(dim, mask.nonzero().flatten(), 0.0)
    return new, comp


def _loss(gm, calib) -> float:
    total = n = 0
    with torch.no_grad():
        for b in calib.batches:
            total += float(calib.loss(gm(*b.inputs), b)) * b.size
            n += b.size
    return total / n


class LinearHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class PointwiseHead(nn.Module):
    """A 1x1-conv consumer that computes a spatial output: every position is a row of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _fit_last_layer(model: nn.Module, batches: list) -> None:
    """Set the last layer (weight and bias) to the least-squares fit of the targets on the calibration data,
    so the MSE gradient in it is zero and its loss is exactly quadratic around it."""
    last = model.b
    with torch.no_grad():
        feats = [torch.tanh(model.a(x)) for x, _ in batches]
        if isinstance(last, nn.Conv2d):
            rows = torch.cat([f.movedim(1, -1).reshape(-1, f.shape[1]) for f in feats])
            ys = torch.cat([y.movedim(1, -1).reshape(-1, y.shape[1]) for _, y in batches])
        else:
            rows, ys = torch.cat(feats), torch.cat([y for _, y in batches])
        ext = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
        sol = torch.linalg.lstsq(ext, ys).solution
        last.weight.copy_(sol[:-1].T.reshape(last.weight.shape))
        last.bias.copy_(sol[-1])


@pytest.mark.parametrize("net", ["linear", "pointwise"])
@pytest.mark.parametrize("loss", ["mse", "label_free"])
@pytest.mark.parametrize("damping", [1e-10, 1e-3])
def test_score_is_the_loss_change_after_lsq_where_kfac_is_exact(net: str, loss: str, damping: float) -> None:
    """One consumer that computes the output: K-FAC's factors are exact, and so is the quadratic model for
    MSE at the least-squares fit (labelled) and for the output-matching loss (label-free). The score equals
    the loss measured after removal + lsq, to 1e-5 with negligible damping; with compile's damping (1e-3) to
    2%: lsq damps by the mean diagonal of the kept block, the score by that of the whole input."""
    torch.manual_seed(0)
    model = (LinearHead() if net == "linear" else PointwiseHead()).double().eval()
    shape = (6,) if net == "linear" else (3, 3, 3)
    data = []
    for n in (16, 12):
        x = torch.randn(n, *shape, dtype=torch.float64)
        y = torch.randn(n, 3, dtype=torch.float64) if net == "linear" else torch.randn(n, 2, 3, 3).double()
        data.append((x, y))
    _fit_last_layer(model, data)
    batches = data if loss == "mse" else [x for x, _ in data]
    gm, groups, calib = _setup(model, batches)
    (group,) = [g for g in groups if g.prunable]
    base = _loss(gm, calib)
    got = _scores(gm, groups, calib, damping=damping, rank=32, joint=False)[group.id]
    measured = np.array([_loss(_removed(gm, groups, calib, group.id, c, damping)[0], calib) - base
                         for c in range(group.size)])  # fmt: skip
    assert measured.min() > 0
    np.testing.assert_allclose(got, measured, rtol=1e-5 if damping < 1e-6 else 2e-2)


@pytest.mark.parametrize("loss", ["mse", "label_free"])
def test_joint_scores_sum_to_the_loss_after_removing_a_set_and_lsq(loss: str) -> None:
    """``joint=True``: removing the ``k`` lowest-scored channels together, then lsq, changes the loss by the sum
    of their scores (the greedy order's marginal costs; exact on the linear head, up to the first tie, where
    the running maximum that keeps them in order takes over), while the sum of single-channel scores
    misses it (channels that stand in for each other are each cheap alone)."""
    torch.manual_seed(0)
    model = LinearHead().double().eval()
    data = [
        (torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)) for n in (16, 12)
    ]
    _fit_last_layer(model, data)
    gm, groups, calib = _setup(model, data if loss == "mse" else [x for x, _ in data])
    (group,) = [g for g in groups if g.prunable]
    base = _loss(gm, calib)
    joint = _scores(gm, groups, calib, damping=1e-10)[group.id]
    singles = _scores(gm, groups, calib, damping=1e-10, joint=False)[group.id]
    order = np.argsort(joint, kind="stable")
    ties = np.flatnonzero(np.diff(joint[order]) <= 0)
    upto = int(ties[0]) + 1 if len(ties) else group.size - 1
    assert upto >= 3
    for k in range(1, upto + 1):
        measured = (
            _loss(_removed(gm, groups, calib, group.id, set(order[:k].tolist()), 1e-10)[0], calib) - base
        )
        np.testing.assert_allclose(joint[order[:k]].sum(), measured, rtol=1e-5)
        if k > 1:
            assert abs(singles[order[:k]].sum() - measured) > 1e-3 * measured


class ConvConsumer(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=variant == "bias")
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def tail(self, y: torch.Tensor) -> torch.Tensor:
        if self.variant == "batchnorm":
            y = self.bn(y)
        return self.fc(torch.tanh(y).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv2(torch.tanh(self.conv1(x))))


@pytest.mark.parametrize("variant", ["bias", "batchnorm", "neither"])
def test_conv_consumer_score_is_half_the_refit_output_change_weighted_by_g(variant: str) -> None:
    """``1/2 tr(G dW A dW^T)``, everything brute-forced: ``dW`` (with the shift column that lsq folds into the
    bias or the BatchNorm's running mean; none for a bias-free conv with nothing after it) from the
    compensation itself, ``A`` from ``F.unfold``, ``G = sum_b (N_b / N) sum_n sum_p (J_n^T H_n J_n)_pp`` from
    full per-sample Jacobians of the output in the conv's output and Hessians of the batch loss."""
    torch.manual_seed(1)
    model = ConvConsumer(variant).double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for n in (6, 4)]  # fmt: skip
    gm, groups, calib = _setup(model, batches)
    group = next(gr for gr in groups if gr.prunable and any(s.param == "conv2.weight" for s in gr.sites
                                                            if s.role == "in"))  # fmt: skip
    damping = 1e-9
    got = _scores(gm, groups, calib, damping=damping, joint=False)[group.id]

    total = sum(len(x) for x, _ in batches)
    kfac_g = torch.zeros(5, 5, dtype=torch.float64)
    rows = []
    for x, y in batches:
        with torch.no_grad():
            inp = torch.tanh(model.conv1(x))
            out2 = model.conv2(inp)
            logits = model.tail(out2)
        unfolded = F.unfold(inp, 3, padding=1).transpose(1, 2).reshape(-1, 36)
        rows.append(torch.cat([unfolded, torch.ones(len(unfolded), 1, dtype=unfolded.dtype)], 1))
        h_out = hessian(lambda o, y=y: F.cross_entropy(o, y), logits)  # N x 3 x N x 3
        for n in range(len(x)):
            jac = jacobian(lambda t: model.tail(t[None])[0], out2[n]).reshape(
                3, 5, 25
            )  # out x channel x position
            gn = torch.einsum("icp,ij,jdp->cd", jac, h_out[n, :, n, :], jac)
            kfac_g += gn * len(x) / total
    ext = torch.cat(rows)
    if variant == "neither":
        ext = ext[:, :36]
    second = ext.T @ ext / len(ext)

    want = []
    w = model.conv2.weight.detach().reshape(5, 36)
    for c in range(group.size):
        new, comp = _removed(gm, groups, calib, group.id, c, damping)
        dw = new.conv2.weight.detach().reshape(5, 36) - w
        if variant == "bias":
            shift = comp.overrides["conv2.bias"] - model.conv2.bias.detach()
        elif variant == "batchnorm":
            shift = model.bn.running_mean - comp.overrides["bn.running_mean"]
        if variant != "neither":
            dw = torch.cat([dw, shift[:, None]], 1)
        want.append(0.5 * float(torch.trace(kfac_g @ dw @ second @ dw.T)))
    assert min(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def trained() -> tuple:
    """SmallCNN trained to convergence (300 full-batch Adam steps, loss 1e-3) on 128 samples (6x6) labelled by
    a random teacher net; the calibration data are those samples, in 4 batches: the loss is near a minimum
    there, where a quadratic model without a gradient term describes it (as on the bench, whose calibration
    batches are training data)."""
    torch.manual_seed(0)
    x = torch.randn(128, 3, 6, 6)
    with torch.no_grad():
        y = SmallCNN().eval()(x * 2).argmax(1)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, [(x[32 * k : 32 * (k + 1)], y[32 * k : 32 * (k + 1)]) for k in range(4)]


def test_ranking_follows_the_loss_change_after_removal_and_lsq(trained) -> None:
    """Spearman of the score with the measured loss change (remove one channel, lsq, as compile does) over all
    16 channels of the two conv groups. Observed 0.88 (fisher, the no-compensation OBD diagonal: 0.80);
    asserted > 0.75. The magnitudes are 10-300x below the measured ones: K-FAC takes a conv's output
    gradients at different positions as uncorrelated, and a global mean pool correlates them."""
    model, batches = trained
    gm, groups, calib = _setup(model, batches)
    prunable = [g for g in groups if g.prunable]
    assert sum(g.size for g in prunable) == 16
    got = _scores(gm, groups, calib, joint=False)
    base = _loss(gm, calib)
    pred, measured = [], []
    for g in prunable:
        for c in range(g.size):
            pred.append(got[g.id][c])
            measured.append(_loss(_removed(gm, groups, calib, g.id, c, 1e-3)[0], calib) - base)
    rho = stats.spearmanr(pred, measured).statistic
    assert rho > 0.75, rho


def test_split_statistics_and_the_compile_path(trained) -> None:
    """The score runs through compile (lsq by default with data) and its result verifies; statistics of a
    split of the batches merge to those of the whole."""
    from fxprune.passes.masking import MaskedLoss
    from fxprune.passes.score_obs import OBSScore

    import fxprune

    model, batches = trained
    result = fxprune.compile(model, batches[0][0], 0.6, score="obs", data=batches, progress=False)
    assert result.flops_ratio <= 0.6 and result.scores
    gm, groups, calib = _setup(model, batches)
    loss = MaskedLoss(gm, groups, calib, torch.device("cpu"))
    score = OBSScore(groups, ScoreContext(calib, torch.device("cpu")))
    held = list(calib.batches)
    whole, _ = score.from_statistics(loss, score.statistics(loss, held))
    merged, _ = score.from_statistics(
        loss, score.statistics(loss, held[:1]).merge(score.statistics(loss, held[1:]))
    )
    torch.testing.assert_close(merged, whole, rtol=1e-6, atol=1e-12)


class FunctionalConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.a(x)), self.w)


def test_a_consumer_lsq_cannot_refit_is_an_input_error_naming_it() -> None:
    model = FunctionalConsumer().eval()
    gm, groups, calib = _setup(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    if not any(g.prunable for g in groups):
        pytest.skip("the functional consumer pins its group")
    with pytest.raises(InputError, match="score='obs'.*linear"):
        _scores(copy_graph_module(gm), groups, calib)


def _greedy_reference(reads: list, size: int) -> torch.Tensor:
    """The greedy OBS order with every downdate applied in full at once (``M -= M_:Q M_QQ^-1 M_Q:``,
    ``W -= W_Q M_QQ^-1 M_Q:``), one channel at a time, marginal costs as a running maximum."""
    ws = [f.w.clone() for f, _ in reads]
    ms = [f.m.clone() for f, _ in reads]
    left, out, floor = list(range(size)), torch.zeros(size, dtype=torch.float64), 0.0
    while left:
        costs = []
        for c in left:
            total = 0.0
            for (f, cols), w, m in zip(reads, ws, ms, strict=True):
                q = cols[c]
                total += 0.5 * float(torch.trace(f.g @ w[:, q] @ torch.linalg.inv(m[q][:, q]) @ w[:, q].T))
            costs.append(total)
        best = min(range(len(left)), key=costs.__getitem__)
        c = left.pop(best)
        floor = max(floor, costs[best])
        out[c] = floor
        for i, (_, cols) in enumerate(reads):
            q = cols[c]
            solve = torch.linalg.solve(ms[i][q][:, q], ms[i][q])
            ws[i] = ws[i] - ws[i][:, q] @ solve
            ms[i] = ms[i] - ms[i][:, q] @ solve
    return out


@pytest.mark.parametrize("flush", [1, 3, 1000])
def test_the_lazy_greedy_order_equals_full_downdates_at_every_step(flush: int) -> None:
    """``greedy_obs`` keeps ``M`` as ``M_0 - U U^T`` and brings ``M_0`` up to date every ``flush`` channels:
    the marginal costs equal those of the full downdate at every step (rtol 1e-9), on two consumers of
    random well-conditioned factors reading 12 channels of 4 columns each."""
    from fxprune.passes.score_obs import Factors, greedy_obs

    g = torch.Generator().manual_seed(0)
    reads = []
    for out, d in ((5, 48), (7, 49)):
        x = torch.randn(400, d, generator=g, dtype=torch.float64)
        a = x.T @ x / 400
        m = torch.linalg.inv(a + 1e-2 * torch.eye(d, dtype=torch.float64))
        root = torch.randn(out, out, generator=g, dtype=torch.float64)
        w = torch.randn(out, d, generator=g, dtype=torch.float64)
        cols = torch.arange(48).reshape(12, 4)
        reads.append((Factors(w, m, root @ root.T, 1e-2, ((0, cols),)), cols))
    want = _greedy_reference(reads, 12)
    got = greedy_obs(reads, 12, flush=flush)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)
    assert len(set(want.tolist())) > 6  # a real order, not ties
