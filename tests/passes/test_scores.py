"""Every data score against a brute-force computation on a tiny model with explicit masks.

The reference model multiplies each prunable activation by an explicit mask vector in ``forward``; its exact
gradient and Hessian in ``(w, m)`` come from ``torch.autograd.functional`` and are compared with what the
score passes compute through fxprune's shared-mask machinery on the unmasked model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.score import ScoreContext
from fxprune.passes.scores import get_score
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from fxprune.calib import make_calibration
from fxprune.trace import shape_propagate, trace


class MaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, m1: torch.Tensor | None = None, m2: torch.Tensor | None = None):
        x = torch.tanh(self.conv1(x))
        if m1 is not None:
            x = x * m1[None, :, None, None]
        x = torch.tanh(self.conv2(x))
        if m2 is not None:
            x = x * m2[None, :, None, None]
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MaskNet().double().eval()
    batches = [(torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    gm = trace(model, (), {"m1": None, "m2": None})
    shape_propagate(gm, (batches[0][0],))
    dep = DependencyPass()(gm)
    calib = make_calibration(gm, (batches[0][0],), batches, None)
    prunable = [g for g in dep.groups if g.prunable]
    order = sorted(prunable, key=lambda g: g.id)
    assert [g.size for g in order] == [4, 5], [g.size for g in dep.groups]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    nw = w0.numel()

    def loss(z: torch.Tensor, batch) -> torch.Tensor:
        w, m = z[:nw], z[nw:]
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = functional_call(model, params, (batch[0],), {"m1": m[:4], "m2": m[4:]})
        return F.cross_entropy(out, batch[1])

    z0 = torch.cat([w0, torch.ones(9, dtype=torch.float64)])
    grads = torch.stack([torch.autograd.grad(loss(z0.clone().requires_grad_(), b), z0)[0] if False else
                         jacobian(lambda z, b=b: loss(z, b), z0) for b in batches])  # fmt: skip
    hess = torch.stack([hessian(lambda z, b=b: loss(z, b), z0) for b in batches])
    return model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess


def run(setup, name: str, **options) -> np.ndarray:
    model, gm, dep, calib, *_, order, _, _, _, _, _ = setup
    scores = get_score(name)(dep.groups, ScoreContext(calib, torch.device("cpu")), **options)(gm)
    return np.concatenate([scores[g.id].mean for g in order])


def test_taylor_is_the_mask_gradient(setup) -> None:
    *_, nw, z0, loss, grads, hess = setup
    expected = grads.mean(0)[nw:].abs().numpy()
    np.testing.assert_allclose(run(setup, "taylor"), expected, rtol=1e-5, atol=1e-10)


def test_inf_cp_mean_and_spread_over_batches(setup) -> None:
    model, gm, dep, calib, batches, order, nw, *_, grads, hess = setup
    per_batch = -grads[:, nw:]
    scores = get_score("inf_cp")(dep.groups, ScoreContext(calib, torch.device("cpu")))(gm)
    got_mean = np.concatenate([scores[g.id].mean for g in order])
    got_spread = np.concatenate([scores[g.id].spread for g in order])
    np.testing.assert_allclose(got_mean, per_batch.abs().mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(got_spread, per_batch.std(0).numpy(), rtol=1e-5)


def test_fisher_is_half_mean_squared_micro_batch_gradient(setup) -> None:
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    squares = []
    for x, y in batches:
        for i in range(0, len(x), 2):
            g = jacobian(lambda z, b=(x[i : i + 2], y[i : i + 2]): loss(z, b), z0)[nw:]
            squares.append(g**2)
    expected = 0.5 * torch.stack(squares).mean(0).numpy()
    np.testing.assert_allclose(run(setup, "fisher", chunk=2), expected, rtol=1e-5, atol=1e-12)


def test_grad_norm_is_w_times_hessian_gradient_over_consumer_columns(setup) -> None:
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    # channel c of conv1 is read by conv2's input columns c; of conv2, by fc's input column c
    acc = torch.zeros(9, dtype=torch.float64)
    for g, h in zip(grads, hess, strict=True):
        hg = h[:nw, :nw] @ g[:nw]
        prod = z0[:nw] * hg
        acc += _consumer_sums(model, prod) / len(batches)
    np.testing.assert_allclose(run(setup, "grad_norm"), acc.abs().numpy(), rtol=1e-5, atol=1e-12)


def _consumer_sums(model: MaskNet, flat: torch.Tensor) -> torch.Tensor:
    parts, i = {}, 0
    for n, p in model.named_parameters():
        parts[n] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    c1 = parts["conv2.weight"].sum((0, 2, 3))  # columns of conv2 read conv1's channels
    c2 = parts["fc.weight"].sum(0)  # columns of fc read conv2's channels
    return torch.cat([c1, c2])


def test_exact_mask_hessian_blocks_match_brute_force(setup) -> None:
    """The ingredients: H_mm and H_wm 1 from the score machinery equal the exact Hessian blocks."""
    from fxprune.passes.masking import MaskedLoss

    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    ml = MaskedLoss(gm, dep.groups, calib, torch.device("cpu"))
    h = hess.mean(0)
    ones = torch.ones(9)
    prods = [ml.hvp(b, [(ml.zeros_w(), ones.double())])[0] for b in calib.batches]
    hm = sum(p[1] for p in prods) / 2
    hw = torch.cat([sum(p[0][i] for p in prods).reshape(-1) / 2 for i in range(len(ml.w0))])
    np.testing.assert_allclose(hm.numpy(), (h[nw:, nw:] @ ones.double()).numpy(), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(hw.numpy(), (h[:nw, nw:] @ ones.double()).numpy(), rtol=1e-5, atol=1e-10)


def test_batched_and_looped_hessian_vector_products_agree(setup) -> None:
    """The vmap'd path (used off CPU) and the loop (used on CPU) compute the same products."""
    from fxprune.passes.masking import MaskedLoss

    model, gm, dep, calib, *_ = setup
    ml = MaskedLoss(gm, dep.groups, calib, torch.device("cpu"))
    assert not ml._batched
    g = torch.Generator().manual_seed(0)
    vectors = [([torch.randn(w.shape, generator=g, dtype=w.dtype) for w in ml.w0],
                torch.randn(ml.size, generator=g, dtype=torch.float64)) for _ in range(3)]  # fmt: skip
    first = next(iter(calib.batches))
    looped = ml.hvp(first, vectors)
    ml._batched = True
    batched = ml.hvp(first, vectors)
    assert ml._batched  # the batched path ran (no fallback)
    for (lw, lm), (bw, bm) in zip(looped, batched, strict=True):
        torch.testing.assert_close(bm, lm)
        for a, b in zip(bw, lw, strict=True):
            torch.testing.assert_close(a, b)


def test_influence_probe_chunks_fit_the_memory_budget_and_do_not_change_the_score(setup) -> None:
    from fxprune.passes.masking import MaskedLoss
    from fxprune.passes.score_hessian import probe_chunk

    model, gm, dep, calib, *_ = setup
    ml = MaskedLoss(gm, dep.groups, calib, torch.device("cpu"))
    w_bytes = sum(w.numel() * w.element_size() for w in ml.w0)
    assert probe_chunk(ml, 1.0) == 8  # a tiny model: the most
    assert probe_chunk(ml, 3 * 6 * w_bytes / 2**30) == 3
    assert probe_chunk(ml, 1e-12) == 1  # never zero
    one_at_a_time = run(setup, "influence", probes=5, memory_gb=1e-12)
    np.testing.assert_allclose(one_at_a_time, run(setup, "influence", probes=5), rtol=1e-10, atol=1e-14)


def test_influence_exact_diag_is_the_schur_complement(setup) -> None:
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    h = hess.mean(0)
    damping = 0.5  # keeps H_ww + damping I positive definite, so CG and the direct inverse agree
    hww = h[:nw, :nw] + damping * torch.eye(nw, dtype=h.dtype)
    schur = h[nw:, nw:] - h[nw:, :nw] @ torch.linalg.solve(hww, h[:nw, nw:])
    expected = (-grads.mean(0)[nw:] + 0.5 * schur.diagonal()).numpy()
    got = run(setup, "influence", diag="exact", damping=damping, cg_iters=400, hessian_batches=None)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    no_retrain = run(setup, "influence", diag="exact", retrained=False, hessian_batches=None)
    np.testing.assert_allclose(no_retrain, (-grads.mean(0)[nw:] + 0.5 * h[nw:, nw:].diagonal()).numpy(),
                               rtol=1e-5, atol=1e-10)  # fmt: skip


def test_mask_schur_complement_reduces_to_gradient_terms(setup) -> None:
    """Why ``influence`` ranks poorly on trained nets (bench/quality.py): a channel mask scales its consumer
    columns ``v_c``, so ``H_wm e_c = H_ww v_c + P_c g_w`` exactly (retraining ``v_c`` undoes the mask to first
    order), and the Schur complement's diagonal collapses to gradient terms alone,
    ``S_cc = -2 g_c - (P_c g_w)^T H_ww^-1 (P_c g_w)``: no curvature of the loss is left in it, and at a
    stationary point it is zero up to weight decay and damping."""
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    h, g = hess.mean(0), grads.mean(0)
    hww = h[:nw, :nw]
    schur = h[nw:, nw:] - h[nw:, :nw] @ torch.linalg.solve(hww, h[:nw, nw:])
    start, index = {}, 0
    for name, p in model.named_parameters():
        start[name] = (index, p.shape)
        index += p.numel()
    consumers = [("conv2.weight", c) for c in range(4)] + [("fc.weight", c) for c in range(5)]
    expected = []
    for k, (name, c) in enumerate(consumers):
        first, shape = start[name]
        cols = first + torch.arange(shape.numel()).reshape(shape)[:, c].reshape(-1)
        v, gc = torch.zeros(nw, dtype=h.dtype), torch.zeros(nw, dtype=h.dtype)
        v[cols], gc[cols] = z0[cols], g[cols]
        np.testing.assert_allclose(h[:nw, nw + k].numpy(), (hww @ v + gc).numpy(), atol=1e-12)
        assert abs(float(g[nw + k] - v @ g[:nw])) < 1e-12
        expected.append(float(-2 * g[nw + k] - gc @ torch.linalg.solve(hww, gc)))
    np.testing.assert_allclose(schur.diagonal().numpy(), expected, rtol=1e-6, atol=1e-12)
    assert np.abs(h[nw:, nw:].diagonal().numpy()).max() > 0  # while H_mm itself carries curvature


def test_influence_hutchinson_converges_to_the_exact_diagonal(setup) -> None:
    exact = run(
        setup, "influence", diag="exact", retrained=False, hessian_batches=None
    )  # the probes estimate diag(H_mm) here
    few = run(setup, "influence", probes=2, retrained=False, hessian_batches=None)
    many = run(setup, "influence", probes=400, retrained=False, hessian_batches=None)
    err_few, err_many = np.abs(few - exact).max(), np.abs(many - exact).max()
    assert err_many < err_few and err_many < 0.35 * np.abs(exact).max(), (err_few, err_many)


def test_ifso_code_is_the_cross_term_row_sum(setup) -> None:
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    h = hess.mean(0)
    expected = (h[nw:, :nw] @ (h[:nw, nw:] @ torch.ones(9, dtype=h.dtype))).abs() / 2.0
    np.testing.assert_allclose(run(setup, "ifso_code", damping=2.0), expected.numpy(), rtol=1e-5, atol=1e-12)


def test_sosp_h_uses_the_gauss_newton_product(setup) -> None:
    model, gm, dep, calib, batches, order, nw, z0, loss, grads, hess = setup
    acc = torch.zeros(9, dtype=torch.float64)
    for x, y in batches:

        def logits(z: torch.Tensor, x=x) -> torch.Tensor:
            w, m = z[:nw], z[nw:]
            params, i = {}, 0
            for n, p in model.named_parameters():
                params[n] = w[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
            return functional_call(model, params, (x,), {"m1": m[:4], "m2": m[4:]}).reshape(-1)

        j = jacobian(logits, z0)[:, nw:]  # outputs x masks
        out = logits(z0).detach().requires_grad_()
        h_out = hessian(lambda o, x=x, y=y: F.cross_entropy(o.reshape(len(x), -1), y), out)
        acc += (j.T @ h_out @ j @ torch.ones(9, dtype=torch.float64)) / len(batches)
    expected = (0.5 * acc - grads.mean(0)[nw:]).abs().numpy()
    np.testing.assert_allclose(run(setup, "sosp_h"), expected, rtol=1e-5, atol=1e-12)


def test_scores_are_deterministic_and_leave_the_graph_alone(setup) -> None:
    a = run(setup, "influence", probes=4)
    b = run(setup, "influence", probes=4)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "net", ["ResidualNet", "ConcatNet", "GroupedNet", "FlattenLinearNet", "DepthwiseNet"]
)
def test_magnitude_score_equals_brute_force(net: str) -> None:
    """``score_c = sqrt(sum over out/in sites of ||W[positions of c along dim]||^2) / group mean``, computed
    here position by position from the Site definition (``offset + c * repeat + j``)."""
    from fxprune.models_zoo import toy

    torch.manual_seed(0)
    model = getattr(toy, net)().eval()
    gm = trace(model)
    shape_propagate(gm, (torch.randn(2, 3, 16, 16),))
    groups = DependencyPass()(gm).prunable
    got = get_score("magnitude")(groups, ScoreContext(None, torch.device("cpu"), False, 0))(gm)
    tensors = dict(gm.state_dict())
    checked = 0
    for g in groups:
        want = np.zeros(g.size)
        for s in g.sites:
            if s.role not in ("out", "in"):
                continue
            t = tensors[s.param].double()
            for c in range(g.size):
                idx = torch.tensor([s.offset + c * s.repeat + j for j in range(s.repeat)])
                want[c] += float(t.index_select(s.dim, idx).pow(2).sum())
                checked += 1
        want = np.sqrt(want)
        want = want / want.mean() if want.mean() > 0 else want
        np.testing.assert_allclose(got[g.id].mean, want, rtol=1e-5, atol=1e-7)
    assert checked > 0


# --- mergeable statistics (passes/stats.py): a split of the data, merged or all-reduced, scores as the whole


@pytest.fixture(scope="module")
def split_setup():
    """MaskNet with three batches of different sizes: the whole calibration, and a split into the first batch
    and the other two (one calibration per simulated process)."""
    torch.manual_seed(1)
    model = MaskNet().double().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for n in (6, 4, 5)]  # fmt: skip
    gm = trace(model, (), {"m1": None, "m2": None})
    shape_propagate(gm, (batches[0][0],))
    dep = DependencyPass()(gm)
    whole = make_calibration(gm, (batches[0][0],), batches, None)
    parts = [make_calibration(gm, (batches[0][0],), part, None) for part in (batches[:1], batches[1:])]
    return gm, dep, whole, parts


#: options that make every score deterministic and use every batch (influence: the exact diagonal)
SPLIT_OPTIONS = {
    "taylor": {},
    "fisher": {"chunk": 4},
    "inf_cp": {},
    "grad_norm": {},
    "sosp_h": {},
    "ifso_code": {},
    "influence": {"diag": "exact", "hessian_batches": None, "damping": 0.5, "cg_iters": 6},
    "obs": {},
}


def _flat(stat) -> list[torch.Tensor]:
    from fxprune.passes.stats import Joint

    return [t for p in stat.parts for t in _flat(p)] if isinstance(stat, Joint) else stat.tensors()


def _scores(scores, dep) -> tuple[np.ndarray, np.ndarray | None]:
    order = sorted((g for g in dep.groups if g.prunable), key=lambda g: g.id)
    mean = np.concatenate([scores[g.id].mean for g in order])
    spreads = [scores[g.id].spread for g in order]
    return mean, None if spreads[0] is None else np.concatenate(spreads)


@pytest.mark.parametrize("name", ["taylor", "fisher", "inf_cp", "grad_norm", "sosp_h", "obs"])
def test_one_pass_score_statistics_of_a_split_merge_to_those_of_the_whole(split_setup, name: str) -> None:
    """statistics(A).merge(statistics(B)) == statistics(A + B) (float64 sums of float32 mask gradients added
    in another order: rtol 1e-6), and the score computed from the merged statistics is the whole-data score."""
    from fxprune.passes.masking import MaskedLoss

    gm, dep, whole, _ = split_setup
    ctx = ScoreContext(whole, torch.device("cpu"))
    score = get_score(name)(dep.groups, ctx, **SPLIT_OPTIONS[name])
    ml = MaskedLoss(gm, dep.groups, whole, torch.device("cpu"))
    batches = list(whole.batches)
    merged = score.statistics(ml, batches[:1]).merge(score.statistics(ml, batches[1:]))
    full = score.statistics(ml, batches)
    flat_merged, flat_full = _flat(merged), _flat(full)
    assert len(flat_merged) == len(flat_full)
    for a, b in zip(flat_merged, flat_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    mean, spread = score.from_statistics(ml, merged)
    want_mean, want_spread = _scores(get_score(name)(dep.groups, ctx, **SPLIT_OPTIONS[name])(gm), dep)
    np.testing.assert_allclose(mean.double().numpy(), want_mean, rtol=1e-5, atol=1e-9)
    assert np.abs(want_mean).max() > 0
    if want_spread is not None:
        assert spread is not None and np.abs(want_spread).max() > 0
        np.testing.assert_allclose(spread.double().numpy(), want_spread, rtol=1e-5, atol=1e-9)


def test_curvature_products_of_a_split_merge_to_those_of_the_whole(split_setup) -> None:
    """The stage every second-order score and CG iteration is made of: ``MaskedLoss.curvature_sum``."""
    from fxprune.passes.masking import MaskedLoss

    gm, dep, whole, _ = split_setup
    ml = MaskedLoss(gm, dep.groups, whole, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    vectors = [([torch.randn(w.shape, generator=g, dtype=w.dtype) for w in ml.w0], torch.randn(ml.size, generator=g))
               for _ in range(2)]  # fmt: skip
    batches = list(whole.batches)
    for curvature in ("hessian", "gn"):
        a = ml.curvature_sum(batches[:1], vectors, curvature, 1 / 3)
        b = ml.curvature_sum(batches[1:], vectors, curvature, 1 / 3)
        full = ml.curvature_sum(batches, vectors, curvature, 1 / 3)
        for x, y in zip(a.merge(b).result(), full.result(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        assert a.merge(b).count == full.count == 3


@pytest.mark.parametrize("name", list(SPLIT_OPTIONS))
def test_two_simulated_processes_compute_the_whole_data_score(split_setup, name: str) -> None:
    """Each "process" scores its own batches with ``ScoreContext.reduce`` a summing all-reduce
    (``test_stats.run_ranks``): both get the single-process score of all batches (rtol 1e-5: the sums are
    added in another order), including the multi-stage ``ifso_code`` and ``influence`` (CG)."""
    from test_stats import run_ranks

    from fxprune.trace import copy_graph_module

    gm, dep, whole, parts = split_setup
    opts = SPLIT_OPTIONS[name]

    def job(calib):
        def run_rank(reduce):
            ctx = ScoreContext(calib, torch.device("cpu"), reduce=reduce)
            return _scores(get_score(name)(dep.groups, ctx, **opts)(copy_graph_module(gm)), dep)

        return run_rank

    ranks = run_ranks([job(p) for p in parts])
    want_mean, want_spread = _scores(
        get_score(name)(dep.groups, ScoreContext(whole, torch.device("cpu")), **opts)(gm), dep
    )
    alone_mean, _ = _scores(
        get_score(name)(dep.groups, ScoreContext(parts[0], torch.device("cpu")), **opts)(gm), dep
    )
    assert not np.allclose(alone_mean, want_mean, rtol=1e-3)  # one process's batches alone score differently
    for mean, spread in ranks:
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-9)
        if want_spread is not None:
            np.testing.assert_allclose(spread, want_spread, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(ranks[0][0], ranks[1][0])  # the processes agree exactly
