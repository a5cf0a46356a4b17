"""Compensation checked against its own promise, computed here from scratch (``passes/compensate.py``).

The masked oracle (``tests/test_compile_data.py``) applies fxprune's own ``compensation.overrides`` to both
sides, so it shows that the rewrite slices the compensated weights correctly, not that they are right. The
checks below read only the original model, the calibration batches and the pruned GraphModule, and compute
what each method promises independently:

1. ``"bias"``: the consumer's bias moves by ``sum_{c removed} W[:, c] . E[x_c]``, with ``E[x_c]`` the mean of
   input channel ``c`` over the calibration data (a conv sees a constant channel through the sum of its
   kernel), and the kept weights are unchanged;
2. ``"lsq"``: the kept columns and the bias solve the least-squares problem of reproducing the original
   layer output on the calibration data, ``min ||layer(x_S; W'_S, b') - layer(x; W, b)||^2``: the
   gradient of that residual (by autograd through the real layer) vanishes up to the method's ridge
   ``damping``, and on a linear layer the residual matches ``torch.linalg.lstsq``'s optimum;
3. ``"newton"``: the update lowers the calibration loss it models (cross-entropy on the labelled batches)
   below that of the same plan uncompensated.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

Layer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LinearNet(nn.Module):
    """``b`` is the only consumer of prunable channels (``a``'s outputs); ``b``'s outputs are the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class ConvNet(nn.Module):
    """The same with 3x3 convs (zero padding): the refit runs over unfolded patches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _setup(cls: type[nn.Module]) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    shape = (16, 6) if cls is LinearNet else (4, 3, 10, 10)
    return model, [torch.randn(shape, generator=g) for _ in range(3)]


def _compile(model: nn.Module, data: list, method: str, target: float = 0.6) -> fxprune.CompileResult:
    x = data[0][0] if isinstance(data[0], tuple) else data[0]
    return fxprune.compile(model, x, target, score="magnitude", data=data, compensate=method, verify=False,
                           progress=False, latency_runs=0)  # fmt: skip


def _inputs_of(model: nn.Module, name: str, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The input of module ``name`` on each calibration batch, read with a hook on the original model."""
    seen: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        h.remove()
    return seen


def _layer(mod: nn.Module) -> Layer:
    if isinstance(mod, nn.Linear):
        return F.linear
    assert isinstance(mod, nn.Conv2d)
    return lambda x, w, b: F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation)


def _keep(x: torch.Tensor, kept: list[int], linear: bool) -> torch.Tensor:
    return x[..., kept] if linear else x[:, kept]


def _kept_and_removed(r: fxprune.CompileResult, name: str, n: int) -> tuple[list[int], list[int]]:
    kept = list(r.plan.modules[name]["in"])
    removed = sorted(set(range(n)) - set(kept))
    assert kept and removed, (name, kept)
    return kept, removed


@pytest.mark.parametrize("cls", [LinearNet, ConvNet])
def test_bias_fold_is_the_mean_of_the_removed_inputs_times_their_weights(cls: type[nn.Module]) -> None:
    model, data = _setup(cls)
    r = _compile(model, data, "bias")
    orig, new = model.get_submodule("b"), r.graph_module.get_submodule("b")
    w = orig.weight.detach().double()
    kept, removed = _kept_and_removed(r, "b", w.shape[1])
    xs = torch.cat([x.movedim(1, -1).reshape(-1, w.shape[1]) if x.dim() > 2 else x
                    for x in _inputs_of(model, "b", data)]).double()  # fmt: skip  # (positions, channels)
    mean = xs.mean(0)
    w_in = w if w.dim() == 2 else w.sum((2, 3))  # what a constant channel sees through a conv kernel
    expected = orig.bias.detach().double() + w_in[:, removed] @ mean[removed]
    torch.testing.assert_close(new.bias.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert (new.bias - orig.bias).abs().max() > 1e-3  # the fold moved the bias
    assert torch.equal(new.weight, orig.weight[:, kept])  # only the bias moves


def _lsq_loss(
    layer: Layer, xs: list[torch.Tensor], kept: list[int], linear: bool, w: torch.Tensor, b: torch.Tensor,
    w_s: torch.Tensor, b_s: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``sum ||layer(x_S; w_s, b_s) - layer(x; w, b)||^2 / rows`` over the calibration inputs."""
    total = torch.zeros((), dtype=torch.float64)
    rows = 0
    for x in xs:
        x = x.double()
        ref = layer(x, w, b)
        diff = layer(_keep(x, kept, linear), w_s, b_s) - ref
        total = total + diff.pow(2).sum()
        rows += ref.numel() // ref.shape[1 if not linear else -1]
    return total / rows


@pytest.mark.parametrize("cls", [LinearNet, ConvNet])
def test_lsq_refit_solves_the_least_squares_problem_on_the_calibration_data(cls: type[nn.Module]) -> None:
    model, data = _setup(cls)
    linear = cls is LinearNet
    r = _compile(model, data, "lsq")
    orig, new = model.get_submodule("b"), r.graph_module.get_submodule("b")
    w, b = orig.weight.detach().double(), orig.bias.detach().double()
    kept, _ = _kept_and_removed(r, "b", w.shape[1])
    xs = _inputs_of(model, "b", data)
    layer = _layer(orig)

    def loss_and_grad(w_s: torch.Tensor, b_s: torch.Tensor) -> tuple[float, torch.Tensor]:
        w_s, b_s = w_s.detach().double().requires_grad_(), b_s.detach().double().requires_grad_()
        loss = _lsq_loss(layer, xs, kept, linear, w, b, w_s, b_s)
        gw, gb = torch.autograd.grad(loss, (w_s, b_s))
        return float(loss.detach()), torch.cat([gw.flatten(), gb])

    # the uncompensated plan: the kept columns as they were, the bias as it was
    loss0, grad0 = loss_and_grad(w[:, kept], b)
    loss_fit, grad_fit = loss_and_grad(new.weight, new.bias)
    # the refit is the minimiser: its gradient vanishes up to the ridge term (damping 1e-3 x mean diag of
    # the second moments); measured |grad_fit| / |grad0|: 2.0e-3 (LinearNet), 8.1e-4 (ConvNet), and the
    # loss 0.0776 -> 0.0458 (LinearNet, optimum 0.0458), 0.0925 -> 0.0529 (ConvNet)
    assert grad_fit.norm() <= 1e-2 * grad0.norm(), (float(grad_fit.norm()), float(grad0.norm()))
    assert loss_fit < 0.9 * loss0, (loss_fit, loss0)
    if linear:  # the exact optimum, by a solver fxprune does not use
        x = torch.cat(xs).double()
        a = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        sol = torch.linalg.lstsq(a, x @ w.T + b).solution
        loss_opt = float(_lsq_loss(layer, xs, kept, linear, w, b, sol[:-1].T, sol[-1]))
        assert loss_opt <= loss_fit <= loss_opt * 1.001 + 1e-12, (loss_opt, loss_fit, loss0)


class BiasFreeNet(nn.Module):
    """``b`` has no bias and no BatchNorm after it (a transformer's projections): the refit has no shift."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_lsq_refits_the_kept_columns_of_a_consumer_without_bias() -> None:
    """No bias to fold a shift into: the kept columns alone solve the least-squares problem (they were
    skipped before), to ``torch.linalg.lstsq``'s optimum without a constant column."""
    model, data = _setup(LinearNet)
    model = BiasFreeNet().eval()
    r = _compile(model, data, "lsq")
    assert "b" not in r.compensation.skipped and "b.weight" in r.compensation.overrides
    orig, new = model.get_submodule("b"), r.graph_module.get_submodule("b")
    w = orig.weight.detach().double()
    kept, _ = _kept_and_removed(r, "b", w.shape[1])
    x = torch.cat(_inputs_of(model, "b", data)).double()
    zero = torch.zeros(3, dtype=torch.float64)
    sol = torch.linalg.lstsq(x[:, kept], x @ w.T).solution
    loss_opt = float(_lsq_loss(F.linear, [x], kept, True, w, zero, sol.T, zero))
    loss_fit = float(_lsq_loss(F.linear, [x], kept, True, w, zero, new.weight.detach().double(), zero))
    loss0 = float(_lsq_loss(F.linear, [x], kept, True, w, zero, w[:, kept], zero))
    assert loss_opt <= loss_fit <= loss_opt * 1.001 + 1e-12 and loss_fit < 0.9 * loss0, (
        loss_opt,
        loss_fit,
        loss0,
    )


def _output_matching_loss(pruned: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """``sum ||pruned(x) - model(x)||^2`` over the batches: the label-free calibration loss, up to a factor."""
    with torch.no_grad():
        return sum(float((pruned(x) - model(x)).pow(2).sum()) for x in batches)


@pytest.mark.parametrize(
    "cls",
    [
        Classifier,
        pytest.param(
            ConvNet,
            marks=pytest.mark.xfail(
                strict=True,
                reason="bug in passes/compensate.py _newton: the step dw = H_ww^-1 H_wm 1_S is taken over all "
                "weights, and the quadratic model at m = 1 credits changes to the consumer columns of the "
                "removed channels (|dw| 0.53 there vs 0.005 on the kept columns of b), which the mask then "
                "zeroes; the real loss rises at every step, the line search picks 0 and nothing is folded",
            ),
        ),
    ],
)
def test_newton_update_lowers_the_calibration_loss_it_models(cls: type[nn.Module]) -> None:
    """Without labels the loss is output matching: zero gradient at the unpruned model, Gauss-Newton
    curvature, so the quadratic model is exact up to the mask's nonlinearity and its step must help."""
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    plain = _compile(model, data, "none", 0.5)
    newton = _compile(model, data, "newton", 0.5)
    assert newton.plan == plain.plan
    assert newton.compensation is not None and newton.compensation.step, newton.compensation
    before = _output_matching_loss(plain.graph_module, model, data)
    after = _output_matching_loss(newton.graph_module, model, data)
    # measured on Classifier: 0.0636 -> 0.0085
    assert after < 0.5 * before, (before, after)


# --- mergeable statistics: a split of the data, merged or all-reduced, compensates as the whole


@pytest.fixture(scope="module")
def split_setup():
    """Classifier traced and grouped, a plan keeping every other channel of every group, and label-free
    calibration data of three batches of different sizes: whole, and split into the first and the other two."""
    from fxprune.passes.dependency import DependencyPass
    from fxprune.passes.plan import build_plan

    from fxprune.calib import make_calibration
    from fxprune.trace import shape_propagate, trace

    torch.manual_seed(0)
    model = Classifier().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 3, 12, 12, generator=g) for n in (8, 4, 6)]
    gm = trace(model)
    shape_propagate(gm, (data[0],))
    groups = DependencyPass()(gm).groups
    plan = build_plan(groups, {grp.id: tuple(range(0, grp.size, 2)) for grp in groups if grp.prunable})
    whole = make_calibration(gm, (data[0],), data, None)
    parts = [make_calibration(gm, (data[0],), d, None) for d in (data[:1], data[1:])]
    return gm, groups, plan, whole, parts


def test_consumer_statistics_of_a_split_merge_to_those_of_the_whole(split_setup) -> None:
    """Per consumer, the input-row sums (float32: rtol 1e-5) and the lsq Gram matrices (float64: rtol 1e-10)
    of two parts of the data, merged, are those of all of it, with the same row count."""
    from fxprune.passes.compensate import consumer_statistics, find_consumers

    gm, groups, plan, whole, _ = split_setup
    consumers, _ = find_consumers(gm, plan, groups)
    assert set(consumers) == {"b", "fc"}
    batches = list(whole.batches)
    a = consumer_statistics(gm, consumers, batches[:1], True, 65536)
    b = consumer_statistics(gm, consumers, batches[1:], True, 65536)
    full = consumer_statistics(gm, consumers, batches, True, 65536)
    for key in consumers:
        merged = a[key].merge(b[key])
        assert merged.count == full[key].count == {"b": 18 * 144, "fc": 18}[key]
        (s, gram), (s_full, gram_full) = merged.result(), full[key].result()
        torch.testing.assert_close(s, s_full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gram, gram_full, rtol=1e-10, atol=1e-10)
        assert gram[-1, -1] == merged.count  # the constant row: its square summed is the row count


@pytest.mark.parametrize("method", ["bias", "lsq", "newton"])
def test_two_simulated_processes_compensate_as_the_whole_data(split_setup, method: str) -> None:
    """Each "process" compensates with its own batches and ``reduce`` a summing all-reduce
    (``test_stats.run_ranks``): both get the single-process overrides of all batches (rtol 1e-5; for newton
    the same line-search step), and one part alone gets different ones."""
    from fxprune.passes.compensate import compensate
    from test_stats import run_ranks

    gm, groups, plan, whole, parts = split_setup

    def job(calib):
        return lambda reduce: compensate(gm, groups, plan, calib, method, reduce=reduce)[1]

    ranks = run_ranks([job(p) for p in parts])
    want = compensate(gm, groups, plan, whole, method)[1]
    alone = compensate(gm, groups, plan, parts[1], method)[1]
    assert want.overrides and (method != "newton" or want.step)
    assert any(not torch.allclose(alone.overrides[k], v, rtol=1e-4) for k, v in want.overrides.items())
    for got in ranks:
        assert got.step == want.step and got.skipped == want.skipped
        assert list(got.overrides) == list(want.overrides)
        for key, value in want.overrides.items():
            torch.testing.assert_close(got.overrides[key], value, rtol=1e-5, atol=1e-6)


class Chain(nn.Module):
    """``b`` reads ``a``'s channels and ``c`` reads ``b``'s: with both pruned, ``b`` is refitted, so the input
    ``c`` sees in the pruned network differs from the original one on the kept channels too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 10)
        self.c = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_lsq_refits_each_consumer_on_the_input_the_pruned_network_gives_it() -> None:
    """``"lsq"``: ``c``'s kept columns and bias are ``torch.linalg.lstsq``'s optimum of reproducing the
    original ``c`` output from the input ``c`` receives *in the pruned model* (read with a hook on the pruned
    GraphModule); ``"lsq_independent"`` (the refit on the original network's inputs) is not, there. ``b``'s
    refit, whose input no refit changes, is the same under both."""
    torch.manual_seed(0)
    model = Chain().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 6, generator=g) for _ in range(3)]
    r = _compile(model, data, "lsq", target=0.4)
    independent = _compile(model, data, "lsq_independent", target=0.4)
    assert r.plan == independent.plan
    kept, _ = _kept_and_removed(r, "c", 10)
    _kept_and_removed(r, "b", 10)
    torch.testing.assert_close(r.graph_module.b.weight, independent.graph_module.b.weight)
    xt = torch.cat(_inputs_of(r.graph_module, "c", data)).double()  # the kept channels only
    assert xt.shape[1] == len(kept)
    x = torch.cat(_inputs_of(model, "c", data)).double()
    w, b = model.c.weight.detach().double(), model.c.bias.detach().double()
    target = x @ w.T + b
    assert (xt - x[:, kept]).abs().max() > 1e-2  # b's refit changed c's input

    def loss(mod: nn.Module) -> float:
        return float((xt @ mod.weight.detach().double().T + mod.bias.detach().double() - target).pow(2).sum())

    sol = torch.linalg.lstsq(torch.cat([xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1), target).solution
    loss_opt = float((xt @ sol[:-1] + sol[-1] - target).pow(2).sum())
    loss_fit, loss_independent = loss(r.graph_module.c), loss(independent.graph_module.c)
    assert loss_opt <= loss_fit <= loss_opt * 1.001 + 1e-12, (loss_opt, loss_fit)
    assert loss_independent > 1.05 * loss_fit, (loss_independent, loss_fit)


class NormedChain(nn.Module):
    """A LayerNorm over the pruned channels of ``a`` (the pruned model normalises over the kept ones), and
    ``c`` called twice on ``b``'s channels (refitted from its first call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.b = nn.Linear(12, 10)
        self.c = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.norm(self.a(x)))))
        return self.c(h) + self.c(h * h)


@pytest.mark.parametrize("method", ["lsq", "lsq_independent"])
def test_lsq_on_a_norm_over_pruned_channels_and_a_module_called_twice_keeps_the_oracle(method: str) -> None:
    """The pruned model equals the masked oracle with the compensation's overrides (1e-5), the norm over
    pruned channels is in the plan's statistics sites, both ``b`` and ``c`` are refitted, and the refit
    lowers the error of the output against the original on the calibration data."""
    torch.manual_seed(0)
    model = NormedChain().eval()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(32, 6, generator=g) for _ in range(3)]
    r = _compile(model, data, method, target=0.5)
    assert r.plan.stats and {"b.weight", "c.weight"} <= set(r.compensation.overrides)
    masked = fxprune.masked_model(model, r.plan, r.compensation.overrides)
    none = _compile(model, data, "none", target=0.5)
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(r.graph_module(x), masked(x), rtol=1e-5, atol=1e-5)
        err = sum(float((r.graph_module(x) - model(x)).pow(2).sum()) for x in data)
        err_none = sum(float((none.graph_module(x) - model(x)).pow(2).sum()) for x in data)
    assert err < 0.5 * err_none, (err, err_none)


def test_lsq_reads_held_batches_in_waves_when_the_walk_would_hold_too_much(monkeypatch) -> None:
    """Held batches whose live activations exceed ``WALK_BYTES`` are read one at a time, once per wave of
    consumers, as a stream is: the same overrides as the walk that holds them all (float64 sums in another
    order: rtol 1e-6)."""
    from fxprune.passes import compensate as comp

    torch.manual_seed(0)
    model = Chain().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 6, generator=g) for _ in range(3)]
    walked = _compile(model, data, "lsq", target=0.4)
    waves: list[int] = []
    real = comp._waves
    monkeypatch.setattr(comp, "_waves", lambda *a: waves.append(1) or real(*a))
    assert not waves
    monkeypatch.setattr(comp, "WALK_BYTES", 0)
    in_waves = _compile(model, data, "lsq", target=0.4)
    assert waves and in_waves.plan == walked.plan
    assert set(in_waves.compensation.overrides) == set(walked.compensation.overrides)
    for key, value in walked.compensation.overrides.items():
        torch.testing.assert_close(in_waves.compensation.overrides[key], value, rtol=1e-6, atol=1e-7)


def test_the_walks_memory_estimate_is_the_peak_of_live_activations_scaled_to_the_samples() -> None:
    """``Chain`` on 4 samples (float32): x (4x6), then a, relu, b, relu (4x10 each, two alive at a time) and
    c (4x3): the peak is two 4x10 tensors, 320 bytes; 8 samples hold twice that."""
    from fxprune.passes.compensate import live_bytes

    x = torch.randn(4, 6)
    state = fxprune.COMPILE.until("dependency").run(
        fxprune.CompileState(
            model=Chain().eval(),
            example_input=x,
            options=fxprune.CompileOptions(target_flops=0.5, progress=False),
        )  # fmt: skip
    )
    assert live_bytes(state.gm, 4) == 2 * 4 * 10 * 4
    assert live_bytes(state.gm, 8) == 2 * live_bytes(state.gm, 4)
