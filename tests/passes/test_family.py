"""The op table (``passes/family.py``, ``passes/op_table.py``): MRO lookup, the forward-override rule, tables
with a replaced entry used by the passes, no import side effects, and the default table's consistency."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, randomize_norms
from fxprune.passes import ops_conv, ops_graph
from fxprune.passes.dependency import DependencyPass
from fxprune.passes.family import AttrFix, CompensationRole, OpFamily, Ops, OpTable
from fxprune.passes.op_table import DEFAULT_TABLE
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.rule_context import RuleContext

import fxprune
from fxprune.trace import shape_propagate, trace

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class KeepsForward(nn.Conv2d):
    """A user's conv that only changes construction: the same op as nn.Conv2d."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)

    def extra_repr(self) -> str:
        return "keeps forward"


class OverridesForward(nn.Conv2d):
    """A different op: a conv whose output is scaled and shifted."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


class OverridesHelper(nn.Conv2d):
    """Keeps ``forward`` but changes the ``_conv_forward`` it calls (weight standardisation)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)

    def _conv_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, b)


class Net(nn.Module):
    """a -> b (the conv under test) -> c -> d: three groups between four convs."""

    def __init__(self, conv: type[nn.Conv2d] = nn.Conv2d) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = conv(8, 12) if conv is not nn.Conv2d else nn.Conv2d(8, 12, 3, padding=1)
        self.c = nn.Conv2d(12, 10, 3, padding=1)
        self.d = nn.Conv2d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.bn(self.a(x))))))))


def _net(conv: type[nn.Conv2d]) -> Net:
    torch.manual_seed(0)
    return randomize_norms(Net(conv)).eval()


def _compile(model: nn.Module, leaf: bool, target: float = 0.6) -> fxprune.CompileResult:
    leaves = [type(model.b)] if leaf else []
    r = fxprune.compile(
        model, X, target, latency_runs=0, score="magnitude", leaf_modules=leaves, progress=False
    )
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, X)
    return r


# -- lookup by the MRO ----------------------------------------------------------------------------------------
def test_a_subclass_keeping_forward_gets_its_parents_entry() -> None:
    conv = DEFAULT_TABLE[nn.Conv2d]
    assert DEFAULT_TABLE.module_entry(KeepsForward(3, 4)) is conv
    assert DEFAULT_TABLE.module_override(KeepsForward(3, 4)) is None
    mha_out = nn.MultiheadAttention(8, 2).out_proj  # NonDynamicallyQuantizableLinear: no entry of its own
    assert type(mha_out) not in DEFAULT_TABLE
    assert DEFAULT_TABLE.module_entry(mha_out) is DEFAULT_TABLE[nn.Linear]


@pytest.mark.parametrize("cls, method", [(OverridesForward, "forward"), (OverridesHelper, "_conv_forward")])
def test_a_subclass_overriding_its_computation_gets_no_entry(cls: type[nn.Conv2d], method: str) -> None:
    m = cls(3, 4)
    assert DEFAULT_TABLE.module_entry(m) is None
    why = DEFAULT_TABLE.module_override(m)
    assert why == (
        f"{cls.__qualname__} overrides {method} of nn.Conv2d; make it traceable (not a leaf) or add an entry"
    )
    # attribute fixes follow isinstance: its parameters are a conv's, whatever it computes
    assert DEFAULT_TABLE.attr_fix(m) is DEFAULT_TABLE[nn.Conv2d].attr_fix
    assert DEFAULT_TABLE.compensation_role(m) is CompensationRole.NONE


def test_a_leaf_subclass_keeping_forward_is_pruned_exactly_like_its_parent() -> None:
    parent = _compile(_net(nn.Conv2d), leaf=False)
    child = _compile(_net(KeepsForward), leaf=True)
    assert "KeepsForward" in str(child.graph_module.get_submodule("b").__class__)
    assert child.plan.kept == parent.plan.kept
    assert child.graph_module.b.out_channels == parent.graph_module.b.out_channels < 12  # the attribute fix
    assert child.graph_module.b.in_channels == parent.graph_module.b.in_channels
    sd_p, sd_c = parent.graph_module.state_dict(), child.graph_module.state_dict()
    assert sd_p.keys() == sd_c.keys() and all(torch.equal(sd_p[k], sd_c[k]) for k in sd_p)
    assert child.verification is not None and child.verification.exporter == "fxprune"  # the ONNX entry too


def test_a_traced_subclass_keeping_forward_is_pruned_through_its_functional_call() -> None:
    r = _compile(_net(KeepsForward), leaf=False)
    assert any(g.id in r.plan.kept for g in r.groups if any(s.param == "b.weight" for s in g.sites))


@pytest.mark.parametrize("cls", [OverridesForward, OverridesHelper])
def test_a_leaf_subclass_overriding_forward_is_pinned_and_the_result_stays_right(
    cls: type[nn.Conv2d],
) -> None:
    model = _net(cls)
    dep = fxprune.dependency_graph(model, X, leaf_modules=[cls])
    reasons = [p for g in dep.groups for p in g.pinned if "overrides" in p]
    assert reasons and all(f"{cls.__qualname__} overrides" in p and "nn.Conv2d" in p for p in reasons)
    assert not any(s.param.startswith("b.") for g in dep.prunable for s in g.sites)
    r = _compile(model, leaf=True, target=0.85)
    assert r.graph_module.b.weight.shape == model.b.weight.shape  # untouched
    with pytest.raises(fxprune.UnsupportedOpError, match=f"{cls.__qualname__} overrides"):
        fxprune.dependency_graph(model, X, leaf_modules=[cls], strict=True)


@pytest.mark.parametrize("cls", [OverridesForward, OverridesHelper])
def test_a_traced_subclass_overriding_forward_is_followed_exactly(cls: type[nn.Conv2d]) -> None:
    r = _compile(_net(cls), leaf=False)
    assert r.plan.removed_channels > 0


# -- a table with one entry replaced --------------------------------------------------------------------------
def _pin_relu(ctx: RuleContext) -> Any:
    ctx.pin_inputs("test: relu pinned by the replaced entry")
    return None


def _traced() -> torch.fx.GraphModule:
    gm = trace(_net(nn.Conv2d))
    shape_propagate(gm, (X,))
    return gm


def test_a_replaced_rule_is_used_by_the_dependency_pass_and_the_default_is_unchanged() -> None:
    table = DEFAULT_TABLE.replace(F.relu, rule=_pin_relu)
    assert table[F.relu].rule is _pin_relu and DEFAULT_TABLE[F.relu].rule is not _pin_relu
    assert table[F.relu].onnx is DEFAULT_TABLE[F.relu].onnx  # only the rule changed
    gm = _traced()
    pinned = [p for g in DependencyPass(table=table)(gm).groups for p in g.pinned]
    assert any("test: relu pinned" in p for p in pinned)
    assert not any("test: relu pinned" in p for g in DependencyPass()(gm).groups for p in g.pinned)
    with pytest.raises(KeyError, match="no entry"):
        DEFAULT_TABLE.replace(torch.cumsum, rule=_pin_relu)


def test_a_replaced_attribute_fix_is_used_by_the_rewrite() -> None:
    fixed: list[nn.Module] = []
    table = DEFAULT_TABLE.replace(nn.Conv2d, attr_fix=AttrFix((), lambda m, before: fixed.append(m)))
    gm = _traced()
    dep = DependencyPass()(gm)
    g = next(g for g in dep.prunable if any(s.param == "b.weight" and s.role == "out" for s in g.sites))
    kept = {g.id: tuple(range(g.size - 4))}
    new = RewritePass(dep.groups, kept, table=table)(gm)
    assert new.get_submodule("b") in fixed and new.get_submodule("b").out_channels == 12  # not fixed
    assert RewritePass(dep.groups, kept)(gm).get_submodule("b").out_channels == 8


def test_a_replaced_compensation_role_is_used_by_compensation() -> None:
    from fxprune.passes.compensate import compensate
    from fxprune.passes.plan import build_plan

    from fxprune.calib import make_calibration

    gm = _traced()
    dep = DependencyPass()(gm)
    g = next(g for g in dep.prunable if any(s.param == "c.weight" and s.role == "in" for s in g.sites))
    plan = build_plan(dep.groups, {g.id: tuple(range(0, g.size, 2))})
    calib = make_calibration(gm, (X,), None, None)
    _, default = compensate(gm, dep.groups, plan, calib, "bias")
    assert "c.bias" in default.overrides
    table = DEFAULT_TABLE.replace(nn.Conv2d, compensation=CompensationRole.NONE)
    _, none = compensate(gm, dep.groups, plan, calib, "bias", table=table)
    assert not none.overrides and none.skipped


# -- no import side effects -----------------------------------------------------------------------------------
def test_importing_a_family_fills_no_table() -> None:
    """Executing a family module's code again (``runpy``, in a namespace of its own) changes neither the
    default table nor a table built by hand; the default table holds exactly the families op_table lists."""
    import importlib
    import runpy

    default = {k: id(e) for k, e in DEFAULT_TABLE.items()}
    mine = OpTable((ops_graph.FAMILY,))
    names = [f.name for f in DEFAULT_TABLE.families]
    assert names == ["graph", "activation", "pool", "elementwise", "shape", "conv", "linear", "norm",
                     "attention", "swin", "mvit", "resample"]  # fmt: skip
    for name in ("ops_activation", "ops_attention", "ops_conv", "ops_elementwise", "ops_graph", "ops_linear",
                 "ops_mvit", "ops_norm", "ops_pool", "ops_resample", "ops_shape", "ops_swin"):  # fmt: skip
        module = importlib.import_module(f"fxprune.passes.{name}")
        again = runpy.run_path(str(module.__file__), run_name=f"again_{name}")
        assert again["FAMILY"].name in names and again["FAMILY"] is not module.FAMILY
    assert {k: id(e) for k, e in DEFAULT_TABLE.items()} == default
    assert {k for k, _ in mine.items()} == set(DEFAULT_TABLE.families[0].entries)


def test_families_and_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        ops_conv.FAMILY.entries[nn.ConvTranspose2d] = DEFAULT_TABLE[nn.Conv2d]  # type: ignore[index]
    with pytest.raises(TypeError):
        DEFAULT_TABLE._entries[nn.ConvTranspose2d] = DEFAULT_TABLE[nn.Conv2d]  # type: ignore[index]


def test_two_families_with_one_key_are_an_error() -> None:
    twin = OpFamily("twin", (Ops((nn.Conv2d,), _pin_relu),))
    with pytest.raises(ValueError, match=r"nn.Conv2d is in families conv and twin"):
        OpTable((ops_conv.FAMILY, twin))
    assert len(list(OpTable((ops_graph.FAMILY,)).items())) == 4


# -- consistency of the default table -------------------------------------------------------------------------
#: constructor arguments that become size attributes following the parameters' shapes
SIZE_ATTRS = {"in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "normalized_shape", "num_channels", "num_groups", "embed_dim", "num_heads"}  # fmt: skip


def test_every_module_entry_with_size_attributes_has_an_attribute_fix() -> None:
    modules = [(k, e) for k, e in DEFAULT_TABLE.items() if isinstance(k, type)]
    assert len(modules) > 50
    for cls, entry in modules:
        sizes = SIZE_ATTRS & set(inspect.signature(cls.__init__).parameters)
        assert (entry.attr_fix is not None) == bool(sizes), (cls, sizes)
        if entry.attr_fix is not None:
            assert set(entry.attr_fix.remember) <= sizes, cls


def test_compensation_roles_and_attribute_fixes_belong_to_modules() -> None:
    roles = {}
    for key, entry in DEFAULT_TABLE.items():
        if not isinstance(key, type):  # a function or method call has no module to fix or compensate
            assert entry.attr_fix is None and entry.compensation is CompensationRole.NONE, key
            continue
        roles[key] = entry.compensation
        if entry.compensation is CompensationRole.COLUMNS:  # weight columns + bias: conv and linear
            assert issubclass(key, (nn.modules.conv._ConvNd, nn.Linear)) and entry.onnx is not None, key
        if entry.compensation is CompensationRole.RUNNING_MEAN:
            assert issubclass(key, nn.modules.batchnorm._BatchNorm), key
    assert {k for k, r in roles.items() if r is CompensationRole.COLUMNS} == {
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.Linear,
    }


def test_every_entry_has_a_rule_and_keys_are_well_formed() -> None:
    for key, entry in DEFAULT_TABLE.items():
        assert callable(entry.rule), key
        assert entry.onnx is None or callable(entry.onnx), key
        assert isinstance(DEFAULT_TABLE.family_of(key), str)
