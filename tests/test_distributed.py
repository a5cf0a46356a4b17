"""Scoring on several processes: ``compile(data=shard)`` under a ``torch.distributed`` process group (gloo,
2 processes on localhost) gives every rank the plan and weights one process gets over the union of the
shards, for every data-driven score and every compensation method."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fxprune.models_zoo.toy import ResidualNet

import fxprune

#: (score, compensation, score options): every data-driven score, every compensation method. ``hessian_batches``
#: counts per process, so influence uses all batches (None) to compare with one process over the union.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("fisher", "lsq", {}),
    ("taylor", "bias", {}),
    ("inf_cp", "none", {}),
    ("grad_norm", "lsq", {}),
    ("sosp_h", "bias", {}),
    ("ifso_code", "none", {}),
    ("influence", "newton", {"probes": 2, "cg_iters": 3, "hessian_batches": None}),
    ("obs", "lsq", {}),
]
WORLD = 2
BATCHES = 4  # two per process


def _setup() -> tuple[torch.nn.Module, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # informative BatchNorm statistics (as conftest.randomize_norms)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)  # type: ignore[operator]
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)  # type: ignore[operator]
    x = torch.randn(2, 3, 16, 16, generator=g)
    data = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(BATCHES)
    ]
    return model, x, data


def _compile(
    model: torch.nn.Module, x: torch.Tensor, data: list[Any], score: str, comp: str, opts: dict[str, Any]
) -> dict[str, Any]:
    r = fxprune.compile(model, x, 0.5, score=score, data=data, compensate=comp, progress=False, verify=False,
                        device="cpu", **opts)  # fmt: skip
    return {
        "kept": dict(r.plan.kept),
        "state": {k: v.clone() for k, v in r.graph_module.state_dict().items()},
    }


def _rank(rank: int, init: str, out: str) -> None:
    """One process: its contiguous shard of the batches, every configuration."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model, x, data = _setup()
        shard = data[rank * BATCHES // WORLD : (rank + 1) * BATCHES // WORLD]
        results: dict[str, Any] = {f"{s}-{c}": _compile(model, x, shard, s, c, o) for s, c, o in CONFIGS}
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # progress lines: rank 0 only
            fxprune.compile(model, x, 0.5, score="fisher", data=shard, progress=True, verify=False)
        results["stderr"] = err.getvalue()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    init = f"file://{out / 'rendezvous'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank, args=(init, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("score, comp, opts", CONFIGS, ids=[f"{s}-{c}" for s, c, _ in CONFIGS])
def test_two_processes_give_the_plan_and_weights_of_one_over_the_union(
    ranks: list[dict[str, Any]], score: str, comp: str, opts: dict[str, Any]
) -> None:
    model, x, data = _setup()
    one = _compile(model, x, data, score, comp, opts)
    key = f"{score}-{comp}"
    first, second = ranks[0][key], ranks[1][key]
    # every rank returns the same model, bit for bit (the statistics were all-reduced before any choice)
    assert first["kept"] == second["kept"]
    assert all(torch.equal(first["state"][k], second["state"][k]) for k in first["state"])
    # the plan of one process over all batches; weights equal up to float summation order
    assert first["kept"] == one["kept"] and first["kept"]
    for k, v in one["state"].items():
        torch.testing.assert_close(first["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_progress_is_shown_by_rank_0_only(ranks: list[dict[str, Any]]) -> None:
    assert "fxprune: fisher" in ranks[0]["stderr"] and ranks[1]["stderr"] == "", [r["stderr"] for r in ranks]


def test_one_shard_alone_gives_another_plan_or_weights() -> None:
    """The comparison can fail: one process over only its own shard differs from the union's result."""
    model, x, data = _setup()
    whole = _compile(model, x, data, "fisher", "lsq", {})
    half = _compile(model, x, data[: BATCHES // WORLD], "fisher", "lsq", {})
    same_weights = whole["kept"] == half["kept"] and all(
        torch.allclose(whole["state"][k], half["state"][k], rtol=1e-4, atol=1e-5) for k in whole["state"]
    )
    assert not same_weights
