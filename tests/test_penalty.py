"""``fxprune.penalty``: the group norms over every site of a channel, their gradients, the onthefly choice
under the budget and its schedule, the wrapped models it reads (torch.compile, DDP), and that ``compile``
removes the channels it emptied; ``compile`` on a model mid-training gives a model that trains on."""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from fxprune.models_zoo.toy import ResidualNet

import fxprune
from fxprune.penalties import GroupPenalty, PenaltySchedule


class TwoConv(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> ReLU -> pool -> fc: two prunable groups (conv1's 6 channels, read by
    BN and conv2's columns; conv2's 5 channels, read by fc's columns)."""

    def __init__(self, c1: int = 6, c2: int = 5, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _net(seed: int = 0, **kw: Any) -> TwoConv:
    torch.manual_seed(seed)
    model = TwoConv(**kw)
    with torch.no_grad():  # BN affine parameters away from their (1, 0) start, so they weigh in the norms
        model.bn1.weight.copy_(torch.rand(6) + 0.5)
        model.bn1.bias.copy_(torch.randn(6) * 0.3)
    return model


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _by_producer(pen: GroupPenalty, node: str) -> int:
    return next(g.id for g in pen.groups if node in g.producers)


def test_group_lasso_equals_the_hand_computed_group_norms_weighted_by_flops_saved() -> None:
    model = _net()
    pen = fxprune.penalty(model, X, 0.5, kind="group_lasso", strength=0.3, round_to=1)
    # the FLOPs one channel saves, counted by torch on nets one channel narrower (an independent oracle)
    full = fxprune.count_flops(TwoConv(), (X,))
    saved1 = full - fxprune.count_flops(TwoConv(c1=5), (X,))
    saved2 = full - fxprune.count_flops(TwoConv(c2=4), (X,))
    mean = (6 * saved1 + 5 * saved2) / 11
    c1, b1, g1, be1 = model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias
    c2, b2, fc = model.conv2.weight, model.conv2.bias, model.fc.weight
    expected = 0.0
    for c in range(6):  # conv1's rows and bias, BN's scale and shift, conv2's columns (not BN's statistics)
        sq = c1[c].pow(2).sum() + b1[c] ** 2 + g1[c] ** 2 + be1[c] ** 2 + c2[:, c].pow(2).sum()
        expected += saved1 / mean * math.sqrt(float(sq.detach()))
    for c in range(5):  # conv2's rows and bias, fc's columns
        sq = c2[c].pow(2).sum() + b2[c] ** 2 + fc[:, c].pow(2).sum()
        expected += saved2 / mean * math.sqrt(float(sq.detach()))
    assert float(pen(model).detach()) == pytest.approx(0.3 * expected, rel=1e-5)
    assert saved1 != saved2  # the weights differ: an unweighted sum would fail the comparison


def test_the_traced_names_are_the_models_qualified_names() -> None:
    model = _net()
    pen = fxprune.penalty(model, X, 0.5, kind="group_lasso", round_to=1)
    names = {name for name, _ in pen.keys}
    assert names == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias",
                     "fc.weight"}  # fmt: skip
    assert names <= dict(model.named_parameters()).keys()


def _channel_grads(grad: torch.Tensor, dim: int, offset: int, repeat: int, n: int) -> torch.Tensor:
    """The gradient's norm at each of the ``n`` channels a site selects."""
    per_position = grad.pow(2).movedim(dim, 0).reshape(grad.shape[dim], -1).sum(1)
    return per_position[offset : offset + n * repeat].reshape(n, repeat).sum(1).sqrt()


@pytest.mark.parametrize("kind", ["group_lasso", "onthefly"])
def test_gradient_reaches_every_site(kind: str) -> None:
    model = _net()
    pen = fxprune.penalty(model, X, 0.5, kind=kind, round_to=1)
    pen(model).backward()
    params = dict(model.named_parameters())
    checked = 0
    for g in pen.groups:
        pushed = list(range(g.size)) if kind == "group_lasso" else list(pen.removable.get(g.id, ()))
        for s in g.sites:
            if s.param not in params:
                continue  # BatchNorm's running statistics: buffers, not weights
            grad = params[s.param].grad
            assert grad is not None and torch.isfinite(grad).all(), s.param
            per_channel = _channel_grads(grad, s.dim, s.offset, s.repeat, g.size)
            assert (per_channel[pushed] > 0).all(), (s.param, s.role)
            checked += len(pushed)
    assert checked > 0
    assert params["fc.bias"].grad is None  # not a channel site: the logits are pinned
    if kind == "onthefly":  # only the chosen channels are pushed; conv1's rows of the kept ones get nothing
        g = _by_producer(pen, "conv1")
        kept = [c for c in range(6) if c not in pen.removable[g]]
        assert kept and (params["conv1.weight"].grad[kept] == 0).all()


def test_zero_when_every_removable_channel_is_zero() -> None:
    model = _net()
    lasso = fxprune.penalty(model, X, 0.5, kind="group_lasso", round_to=1)
    otf = fxprune.penalty(model, X, 0.5, kind="onthefly", round_to=1)
    assert float(lasso(model).detach()) > 0 and float(otf(model).detach()) > 0
    zeroed = copy.deepcopy(model)
    with torch.no_grad():  # the channels onthefly chose, at every site they select
        for g in otf.groups:
            idx = list(otf.removable.get(g.id, ()))
            for s in g.sites:
                t = dict(zeroed.named_parameters()).get(s.param)
                if t is not None and idx:
                    t.index_fill_(
                        s.dim,
                        torch.tensor([s.offset + i * s.repeat + j for i in idx for j in range(s.repeat)]),
                        0.0,
                    )
    value = otf(zeroed)
    assert float(value.detach()) == 0.0
    value.backward()  # an emptied channel has a zero (sub)gradient, not NaN
    assert all(torch.isfinite(p.grad).all() for p in zeroed.parameters() if p.grad is not None)
    assert float(lasso(zeroed)) > 0  # the kept channels are still penalised by the group lasso
    with torch.no_grad():
        for p in zeroed.parameters():
            if p is not zeroed.fc.bias:
                p.zero_()
    assert float(lasso(zeroed)) == 0.0


def test_onthefly_chooses_the_least_norm_channels_under_the_budget() -> None:
    model = _net()
    with torch.no_grad():  # conv1's channels 0, 2 and 4 nearly empty
        for c in (0, 2, 4):
            for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
                t[c] *= 1e-3
            model.conv2.weight[:, c] *= 1e-3
    pen = fxprune.penalty(model, X, 0.7, kind="onthefly", round_to=1)
    g = _by_producer(pen, "conv1")
    removed = set(pen.removable[g])
    assert removed and (removed <= {0, 2, 4} or removed >= {0, 2, 4})
    # within every group the chosen channels are those of least norm
    norms = pen.split(pen.channel_norms(model))
    for gid, chosen in pen.removable.items():
        kept = [c for c in range(len(norms[gid])) if c not in chosen]
        assert norms[gid][list(chosen)].max() <= norms[gid][kept].min()
    # and they meet the budget: the cost model without them is at most the target
    sizes = dict(pen.cost.group_sizes)
    for gid, chosen in pen.removable.items():
        sizes[gid] -= len(chosen)
    assert pen.cost.at(sizes) <= 0.7 * pen.cost.total


def test_schedule_ramps_the_strength_and_rechooses_every_n_steps() -> None:
    schedule = PenaltySchedule(warmup=4, every=3, delay=2)
    assert [schedule.factor(s) for s in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    model = _net()
    pen = fxprune.penalty(model, X, 0.5, kind="onthefly", strength=1.0, schedule=schedule, round_to=1)
    chosen: list[int] = []
    original = pen.choose

    def spy(norms: torch.Tensor) -> dict[int, tuple[int, ...]]:
        chosen.append(int(pen.steps))
        return original(norms)

    pen.choose = spy  # type: ignore[method-assign]
    values = []
    for _ in range(9):
        values.append(float(pen(model)))
        pen(model)  # a second forward in the same step (gradient accumulation): no second choice
        pen.step()
    assert values[0] == values[1] == 0.0 and values[2] > 0
    assert chosen == [2, 5, 8]
    # the step count and the choice are in the state dict: a fresh penalty resumes them
    fresh = fxprune.penalty(model, X, 0.5, kind="onthefly", strength=1.0, schedule=schedule, round_to=1)
    fresh.load_state_dict(pen.state_dict())
    assert int(fresh.steps) == 9 and fresh.removable == pen.removable


def test_report_counts_channels_below_the_threshold_and_the_flops_without_them() -> None:
    model = _net()
    with torch.no_grad():
        for c in (1, 3):
            for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
                t[c] = 0.0
            model.conv2.weight[:, c] = 0.0
    pen = fxprune.penalty(model, X, 0.5, kind="group_lasso", round_to=1)
    report = pen.report(model)
    g = _by_producer(pen, "conv1")
    rows = {r.group: r for r in report.rows}
    assert rows[g].below == 2 and report.below == 2
    narrower = fxprune.count_flops(TwoConv(c1=4), (X,)) / fxprune.count_flops(TwoConv(), (X,))
    assert report.flops_ratio == pytest.approx(narrower, rel=1e-6)
    assert "below" in str(report)


def _train(model: nn.Module, pen: GroupPenalty | None, steps: int, lr: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(model(x), y) + (pen(model) if pen is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pen is not None:
            pen.step()
    model.eval()


def _removed(plan: fxprune.PrunePlan) -> set[tuple[int, int]]:
    return {(g, c) for g, kept in plan.kept.items() for c in range(plan.group_sizes[g]) if c not in kept}


def test_compile_removes_the_channels_the_penalty_emptied() -> None:
    """The measure: Jaccard overlap |A & B| / |A | B| of the (group, channel) sets the penalty emptied (its
    last choice) and compile(score="magnitude", compensate="bias") removed; here it is exact."""
    torch.manual_seed(0)
    model = ResidualNet(num_classes=2)
    x = torch.randn(2, 3, 8, 8)
    pen = fxprune.penalty(model, x, 0.5, kind="onthefly", strength=0.5, round_to=1,
                          schedule=PenaltySchedule(warmup=20, every=10))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 120)  # decays to 0, as training ends
    model.train()
    for _ in range(120):
        xb = torch.randn(16, 3, 8, 8, generator=g)
        yb = (xb[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(model(xb), yb) + pen(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        pen.step()
    model.eval()
    emptied = {(gid, c) for gid, cs in pen.removable.items() for c in cs}
    norms = pen.channel_norms(model).detach()
    mask = pen.penalised
    assert norms[mask].max() < 1e-2 * norms[~mask].min()  # emptied: far below every kept channel
    result = fxprune.compile(model, x, 0.5, score="magnitude", compensate="bias", data=[x], round_to=1,
                             verify=False, progress=False)  # fmt: skip
    removed = _removed(result.plan)
    assert len(emptied & removed) / len(emptied | removed) == 1.0


def test_compile_mid_training_gives_a_model_that_trains_on() -> None:
    """A model in train mode is compiled in eval mode on a copy (with a warning); the pruned GraphModule
    has trainable parameters, an optimizer over them lowers the loss, and its BatchNorm running statistics
    update in train mode."""
    model = _net()
    _train(model, None, 5)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        result = fxprune.compile(model, X, 0.5, round_to=1, verify=False, progress=False)
    assert model.training  # the user's model keeps its mode
    pruned = result.graph_module
    params = list(pruned.parameters())
    assert params and all(p.requires_grad for p in params)
    bn = next(m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    g = torch.Generator().manual_seed(3)
    xb = torch.randn(32, 3, 8, 8, generator=g)
    yb = (xb[:, 0].mean((1, 2)) > 0).long()
    pruned.train()
    with torch.no_grad():
        before = float(F.cross_entropy(pruned(xb), yb))
    assert not torch.equal(bn.running_mean, stats)  # statistics updated in train mode
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        loss = F.cross_entropy(pruned(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.8 * before


def test_a_torch_compiled_model_is_read_through_its_original_parameters() -> None:
    model = _net()
    t = time.perf_counter()
    try:
        compiled = torch.compile(model, backend="aot_eager")  # the eager backend: no C++ toolchain needed
        compiled(X)
    except Exception as exc:  # pragma: no cover - depends on the installation
        pytest.skip(f"torch.compile is not available here ({type(exc).__name__}: {exc})")
    if time.perf_counter() - t > 60:  # pragma: no cover
        pytest.skip("torch.compile took over a minute")
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    pen = fxprune.penalty(model, X, 0.5, kind="group_lasso", round_to=1)
    assert float(pen(compiled)) == float(pen(model))
    twin = copy.deepcopy(model)
    _train(twin, fxprune.penalty(twin, X, 0.5, kind="group_lasso", round_to=1), 3)
    pen_c = fxprune.penalty(model, X, 0.5, kind="group_lasso", round_to=1)
    g = torch.Generator().manual_seed(0)  # the same loop through the compiled model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    compiled.train()
    for _ in range(3):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(compiled(x), y) + pen_c(compiled)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


WORLD = 2


def _ddp_rank(rank: int, init: str, out: str) -> None:
    """One process: DDP over a BN-free TwoConv, its half of each batch, the penalty read through DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = TwoConv(bn=False)
        torch.manual_seed(0)
        model = TwoConv(bn=False)
        pen = fxprune.penalty(model, X, 0.5, kind="onthefly", strength=0.5, round_to=1)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randn(16, 3, 8, 8, generator=g)
            y = (x[:, 0].mean((1, 2)) > 0).long()
            shard = slice(rank * 8, (rank + 1) * 8)
            loss = F.cross_entropy(ddp(x[shard]), y[shard]) + pen(ddp)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pen.step()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_trains_as_one_process_over_the_whole_batch(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.manual_seed(0)
    one = TwoConv(bn=False)
    start = copy.deepcopy(one.state_dict())
    pen = fxprune.penalty(one, X, 0.5, kind="onthefly", strength=0.5, round_to=1)
    opt = torch.optim.SGD(one.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long()
        loss = F.cross_entropy(one(x), y) + pen(one)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pen.step()
    for k, v in one.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank holds the same model
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(start[k], v) for k, v in one.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"kind": "l1"}, fxprune.InputError, "kind="),
        ({"target_flops": 0.0}, fxprune.TargetError, "target_flops="),
        ({"target_flops": -0.5}, fxprune.TargetError, "target_flops="),
        ({"target_flops": 1e-6}, fxprune.TargetError, "unreachable"),
        ({"strength": -1.0}, fxprune.InputError, "strength="),
        ({"strength": float("nan")}, fxprune.InputError, "strength="),
        ({"units": [99]}, fxprune.InputError, "units="),
        ({"schedule": {"warmup": 5}}, fxprune.InputError, "schedule="),
    ],
)
def test_bad_arguments_are_typed_errors_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], word: str
) -> None:
    args = {"target_flops": 0.5, **kwargs}
    with pytest.raises(error, match=word):
        fxprune.penalty(_net(), X, **args)


def test_a_bad_schedule_and_a_model_without_the_traced_tensors_are_input_errors() -> None:
    with pytest.raises(fxprune.InputError, match="every="):
        PenaltySchedule(every=0)
    pen = fxprune.penalty(_net(), X, 0.5, kind="group_lasso", round_to=1)
    with pytest.raises(fxprune.InputError, match="conv1"):
        pen(nn.Sequential(nn.Linear(2, 2)))
