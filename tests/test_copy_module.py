"""``fxprune.trace.copy_module`` / ``copy_graph_module``: the same result as ``copy.deepcopy``, faster."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision
from fxprune.models_zoo.toy import ResidualNet

from fxprune.trace import copy_graph_module, copy_module, trace


class Tied(nn.Module):
    """A shared submodule, a tied weight, a buffer, a hook, a list attribute and a custom-copy child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # the same module twice
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight  # tied
        self.register_buffer("steps", torch.zeros(3))
        self.notes = ["x", {"k": [1, 2]}]
        self.custom = Custom()
        self.calls = 0
        self.register_forward_hook(lambda m, i, o: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.custom(self.c(self.b(self.a(x)))) + self.steps.sum()


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.copied = False
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def __deepcopy__(self, memo: dict[int, Any]) -> Custom:
        new = Custom()
        new.scale = nn.Parameter(self.scale.detach().clone())
        new.copied = True
        memo[id(self)] = new
        return new


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [
        t for _, t in (*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False))
    ]


def test_copy_module_matches_deepcopy_and_is_independent() -> None:
    torch.manual_seed(0)
    m = Tied().eval()
    ref, new = copy.deepcopy(m), copy_module(m)
    x = torch.randn(2, 4)
    assert torch.equal(new(x), ref(x)) and torch.equal(new(x), m(x))
    # structure: sharing and ties survive, nothing is shared with the original
    assert new.b is new.a and new.c.weight is new.a.weight
    assert all(
        a is not b and a.data_ptr() != b.data_ptr() for a, b in zip(_tensors(new), _tensors(m), strict=True)
    )
    assert new.notes == m.notes and new.notes is not m.notes and new.notes[1] is not m.notes[1]
    assert new.custom.copied and not m.custom.copied  # a module's own __deepcopy__ is used
    assert len(new._forward_hooks) == 1 and new._forward_hooks is not m._forward_hooks
    assert type(new) is Tied and new.training is False
    # writing into the copy leaves the original alone
    with torch.no_grad():
        new.a.weight.add_(1.0)
        new.steps.fill_(5.0)
    new.notes[1]["k"].append(3)
    new.train()
    assert torch.equal(m.a.weight, ref.a.weight) and torch.equal(m.steps, ref.steps)
    assert m.notes[1]["k"] == [1, 2] and m.training is False
    assert sorted(new.state_dict()) == sorted(m.state_dict())


@pytest.mark.parametrize("make", [lambda: ResidualNet(), lambda: torchvision.models.mobilenet_v3_small()])
def test_copy_module_of_real_models_equals_deepcopy(make: Any) -> None:
    torch.manual_seed(0)
    m = make().eval()
    new, ref = copy_module(m), copy.deepcopy(m)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(new(x), ref(x))
    assert [type(a) for a in new.modules()] == [type(a) for a in ref.modules()]
    assert {k: v.shape for k, v in new.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert not {t.data_ptr() for t in _tensors(new)} & {t.data_ptr() for t in _tensors(m)}


def test_copy_graph_module_matches_deepcopy_and_honours_the_memo() -> None:
    torch.manual_seed(0)
    gm = trace(ResidualNet().eval())
    conv = next(name for name, m in gm.named_modules() if isinstance(m, nn.Conv2d))
    weight = gm.get_submodule(conv).weight
    swapped = nn.Parameter(torch.zeros_like(weight))
    memo: dict[int, Any] = {id(weight): swapped}  # what the rewrite does with sliced tensors
    new = copy_graph_module(gm, memo)
    assert new.get_submodule(conv).weight is swapped
    assert new.code == gm.code and isinstance(new, torch.fx.GraphModule) and new is not gm
    assert [n.format_node() for n in new.graph.nodes] == [n.format_node() for n in gm.graph.nodes]
    x = torch.randn(1, 3, 16, 16)
    plain = copy_graph_module(gm)
    with torch.no_grad():
        assert torch.equal(plain(x), gm(x))
    assert all(a is not b for a, b in zip(_tensors(plain), _tensors(gm), strict=True))
