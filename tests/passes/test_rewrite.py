"""Golden code before/after the rewrite, and the pass contracts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxprune.passes.base import AnalysisPass, PassContractError
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.rewrite import RewritePass, build_plan

from fxprune.trace import shape_propagate, trace


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        p, q = torch.split(y, [2, 6], 1)
        y = torch.cat([q, p[:, 0:2]], 1)
        y = F.adaptive_avg_pool2d(y, 2)
        return self.fc(y.reshape(y.shape[0], 32))


def _prepared() -> tuple[torch.fx.GraphModule, DependencyPass]:
    gm = trace(Tiny().eval())
    shape_propagate(gm, (torch.randn(1, 3, 4, 4),))
    return gm, DependencyPass()


GOLDEN_AFTER = """
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    a = self.a(x);  x = None
    relu = torch.nn.functional.relu(a, inplace = False);  a = None
    split = torch.functional.split(relu, [1, 3], dim = 1);  relu = None
    getitem = split[0]
    getitem_1 = split[1];  split = None
    getitem_2 = getitem[(slice(None, None, None), slice(0, 2, None))];  getitem = None
    cat = torch.cat([getitem_1, getitem_2], 1);  getitem_1 = getitem_2 = None
    adaptive_avg_pool2d = torch.nn.functional.adaptive_avg_pool2d(cat, 2);  cat = None
    getattr_1 = adaptive_avg_pool2d.shape
    getitem_3 = getattr_1[0];  getattr_1 = None
    reshape = adaptive_avg_pool2d.reshape(getitem_3, 16);  adaptive_avg_pool2d = getitem_3 = None
    fc = self.fc(reshape);  reshape = None
    return fc
"""


def test_golden_code_after_rewrite() -> None:
    gm, dep_pass = _prepared()
    dep = dep_pass(gm)
    before = gm.code
    assert "[2, 6]" in before and "slice(0, 2, None)" in before and "reshape(getitem_3, 32)" in before
    # split sizes and the reshape literal follow the kept counts; the full-range slice 0:2 needs no change
    kept = {g.id: (0,) if g.size == 2 else (1, 3, 5) for g in dep.prunable}
    new = RewritePass(dep.groups, kept)(gm)
    assert new.code.strip() == GOLDEN_AFTER.strip()
    assert gm.code == before, "rewrite touched its input"
    assert new.a.out_channels == 4 and new.fc.in_features == 16
    plan = build_plan(dep.groups, kept)
    assert plan.modules["a"]["out"] == (0, 3, 5, 7)
    # fc reads cat([q, p]): q = group 1 at positions 0..5, p = group 0 at 6..7; 4 features per channel
    assert plan.inputs["fc.weight"][1] == tuple(i for c in (1, 3, 5, 6) for i in range(4 * c, 4 * c + 4))
    out = new(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 4)


def test_analysis_pass_contract_is_enforced() -> None:
    gm, _ = _prepared()

    class Sneaky(AnalysisPass[None]):
        def run(self, gm: torch.fx.GraphModule) -> None:
            with torch.no_grad():
                gm.a.weight.mul_(2)

    class Tagger(AnalysisPass[None]):
        def run(self, gm: torch.fx.GraphModule) -> None:
            next(iter(gm.graph.nodes)).meta["color"] = "red"

    class Rewirer(AnalysisPass[None]):  # adds a keyword argument to one node
        def run(self, gm: torch.fx.GraphModule) -> None:
            node = next(n for n in gm.graph.nodes if n.op == "call_module")
            node.kwargs = {**node.kwargs, "extra": 1}

    class Swapper(AnalysisPass[None]):  # replaces a parameter by an equal one
        def run(self, gm: torch.fx.GraphModule) -> None:
            gm.a.weight = torch.nn.Parameter(gm.a.weight.detach().clone())

    class Reader(AnalysisPass[int]):  # reads everything, changes nothing
        def run(self, gm: torch.fx.GraphModule) -> int:
            n = next(iter(gm.graph.nodes))
            n.args = tuple(n.args)  # an equal tuple: not a change
            return sum(p.numel() for p in gm.parameters())

    with pytest.raises(PassContractError, match="modified"):
        Sneaky()(gm)
    gm, _ = _prepared()
    with pytest.raises(PassContractError, match="non-fxprune meta"):
        Tagger()(gm)
    for bad in (Rewirer, Swapper):
        gm, _ = _prepared()
        with pytest.raises(PassContractError, match="modified"):
            bad()(gm)
    gm, _ = _prepared()
    assert Reader()(gm) > 0
