"""What a model returns never changes (issue 12): structure, keys, types, shapes and dtypes of every output.

On ``9d0c8f2`` a tensor returned inside a dict lost channels (the output rule pinned only the direct
arguments of the graph output), and an ``OrderedDict`` came back as a ``dict`` (torch.fx lowers every dict to
a plain one). Each container form below is compiled at a low target where the unpinned output loses
channels, and checked by the oracles: same structure and shapes as the user's model, masked equivalence,
ONNX Runtime against eager.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_masked_equivalent, assert_unchanged, output_tree, snapshot

import fxprune
from fxprune.stages import Options

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
FAST: dict[str, Any] = {"score": "magnitude", "latency_runs": 0, "progress": False}


class Pair(NamedTuple):
    features: torch.Tensor
    logits: torch.Tensor


@dataclasses.dataclass
class Output:
    out: torch.Tensor
    aux: torch.Tensor | None = None


class Tagged(dict):  # type: ignore[type-arg]
    """A dict subclass that rebuilds from a plain dict."""


class TaggedList(list):  # type: ignore[type-arg]
    """A list subclass that rebuilds from a plain list."""


#: name -> how the net packs (dense map ``y``, pooled features ``f``, logits ``z``) into its output
FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]] = {
    "dict": lambda y, f, z: {"out": y},
    "ordered_dict": lambda y, f, z: collections.OrderedDict(out=y, aux=z),
    "dict_subclass": lambda y, f, z: Tagged(out=y),
    "list_subclass": lambda y, f, z: TaggedList([y, z]),
    "nested_dict_list": lambda y, f, z: {"maps": [y, {"deep": (y, z)}], "logits": z},
    "list": lambda y, f, z: [y],
    "tuple_of_dict": lambda y, f, z: ({"out": y}, z),
    "namedtuple": lambda y, f, z: Pair(f, z),
    "dict_of_namedtuple": lambda y, f, z: {"pair": Pair(f, z)},
    "dataclass": lambda y, f, z: Output(y, z),
    "dataclass_none": lambda y, f, z: Output(y),
    "features_and_logits": lambda y, f, z: (f, z),
    "middle_and_end": lambda y, f, z: {"mid": f, "end": y},
}


class Net(nn.Module):
    """Two convs to a dense map of 5 classes, and a pooled head; ``form`` packs the outputs."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 5, 1)
        self.fc = nn.Linear(16, 4)
        self.form = form

    def forward(self, x: torch.Tensor) -> Any:
        h = F.relu(self.a(x))
        f = F.relu(self.b(h))
        y = self.head(f)
        z = self.fc(f.mean((2, 3)))
        return FORMS[self.form](y, f.mean((2, 3)), z)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_output_keeps_its_structure_and_channels(form: str) -> None:
    torch.manual_seed(0)
    model = Net(form).eval()
    snap = snapshot(model)
    r = fxprune.compile(model, X, 0.3, **FAST)
    assert_unchanged(model, snap)
    assert r.plan.removed_channels > 0  # the inner channels were pruned: the check below is not vacuous
    with torch.no_grad():
        want, got = model(X), r.graph_module(X)
    assert type(got) is type(want)
    assert output_tree(got) == output_tree(want)
    assert r.verification is not None and r.verification.passed, r.verification
    assert_masked_equivalent(model, r, X)


def test_output_channels_are_pinned_with_the_reason() -> None:
    r = fxprune.compile(Net("dict").eval(), X, 0.3, **FAST)
    head = next(g for g in r.groups if any(s.param == "head.weight" and s.role == "out" for s in g.sites))
    assert not head.prunable and any("reaches the graph output" in p for p in head.pinned), head.pinned
    od = fxprune.compile(Net("ordered_dict").eval(), X, 0.3, **FAST)
    head = next(g for g in od.groups if any(s.param == "head.weight" and s.role == "out" for s in g.sites))
    assert any("packed into a OrderedDict" in p for p in head.pinned), head.pinned


@pytest.mark.parametrize("form", ["dataclass", "ordered_dict", "dict_of_namedtuple"])
def test_strict_mode_accepts_output_containers(form: str) -> None:
    """A container call is structural (it has a rule), so ``strict=True`` does not call it unsupported."""
    r = fxprune.compile(Net(form).eval(), X, 0.3, strict=True, **FAST)
    assert r.plan.removed_channels > 0


def test_a_container_that_cannot_be_rebuilt_is_a_trace_error() -> None:
    class Odd(dict):  # type: ignore[type-arg]
        def __init__(self, tag: str, **items: Any) -> None:
            super().__init__(**items)
            self.tag = tag

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> Any:
            return Odd("t", out=self.c(x))

    with pytest.raises(fxprune.TraceError, match=r"Odd .*cannot be rebuilt"):
        fxprune.compile(M().eval(), X, 0.5, **FAST)


def test_a_pruned_output_fails_verification_naming_its_path() -> None:
    """The check does not trust the rules: with the output rule broken (the 9d0c8f2 bug: it pins nothing),
    compile raises ``VerificationError`` naming the output path and the dim, with and without ``verify``."""
    from fxprune.passes import op_table
    from fxprune.passes.family import GraphOp

    from fxprune.stages import compile_pipeline

    broken = op_table.DEFAULT_TABLE.replace(GraphOp("output"), rule=lambda ctx: None)
    pipeline = compile_pipeline(broken)
    for verify in (False, True):
        with pytest.raises(fxprune.VerificationError, match=r"out\['out'\]: dim 1 5 -> [1-4]\b") as info:
            # round_to=1: any count, so the 5 output channels lose some
            fxprune.compile(Net("dict").eval(), X, 0.3, **{**FAST, "verify": verify, "round_to": 1},
                            pipeline=pipeline)  # fmt: skip
        assert isinstance(info.value.result, fxprune.CompileResult)


def test_output_differences_name_each_change() -> None:
    from fxprune.data import output_differences, output_signature

    t = torch.zeros
    before = output_signature(collections.OrderedDict(out=t(1, 21, 8, 8), aux=[t(2), 3]))
    assert output_differences(before, before) == []
    assert output_differences(before, output_signature({"out": t(1, 21, 8, 8), "aux": [t(2), 3]})) == [
        "out: collections.OrderedDict -> dict"
    ]
    after = output_signature(collections.OrderedDict(out=t(1, 15, 8, 8), aux=[t(2, dtype=torch.float16), 4]))
    assert output_differences(before, after) == [
        "out['out']: dim 1 21 -> 15",
        "out['aux'][0]: dtype float32 -> float16",
        "out['aux'][1]: 3 -> 4",
    ]
    assert output_differences(before, output_signature(collections.OrderedDict(aux=[t(2), 3]))) == [
        "out: keys ['out', 'aux'] -> ['aux']"
    ]
    assert output_differences(output_signature(Pair(t(3), t(2))), output_signature(Pair(t(3), t(2, 1)))) == [
        "out[1]: shape [2] -> [2, 1] (rank 1 -> 2)"
    ]
    assert output_differences(output_signature(Output(t(2))), output_signature(Output(t(3)))) == [
        "out.out: dim 0 2 -> 3"
    ]


# --------------------------------------------------------------------------------- segmentation models
@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_segmentation_keeps_its_classes(name: str) -> None:
    """torchvision's segmentation models return an ``OrderedDict`` (``out``, and ``aux`` with aux_loss)."""
    import torchvision

    torch.manual_seed(0)
    kw: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if name.startswith("deeplabv3"):
        kw["aux_loss"] = True
    model = getattr(torchvision.models.segmentation, name)(**kw).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    r = fxprune.compile(model, x, 0.5, **FAST)
    with torch.no_grad():
        want, got = model(x), r.graph_module(x)
    assert type(got) is collections.OrderedDict and list(got) == list(want)
    assert output_tree(got) == output_tree(want)
    assert got["out"].shape[1] == 21
    assert r.flops_ratio <= 0.5
    assert r.verification is not None and r.verification.passed and r.verification.max_rel_error <= 1e-4
    assert_masked_equivalent(model, r, x, rtol=1e-4)


# ----------------------------------------------------------------------------- inputs and model copies
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("verify", [False, True])
def test_non_finite_example_is_an_input_error_before_any_work(bad: float, verify: bool) -> None:
    class MustNotRun(Options):
        def run(self, state: fxprune.CompileState) -> None:
            raise AssertionError("compile went past the input checks before rejecting the example")

    pipeline = fxprune.COMPILE.replace("options", MustNotRun())
    x = X.clone()
    x[1, 2, 3, 4] = bad
    model = Net("dict").eval()
    with pytest.raises(
        fxprune.InputError, match=r"example_input\[1\] \(\(2, 3, 12, 12\) torch.float32\) contains"
    ):
        fxprune.compile(model, (X, x), 0.5, **{**FAST, "verify": verify}, pipeline=pipeline)
    with pytest.raises(fxprune.InputError, match=r"example_input\[0\] .* contains [01] NaN and [01] Inf"):
        fxprune.compile(model, x, 0.5, **{**FAST, "verify": verify}, pipeline=pipeline)


class CachingAttention(nn.Module):
    """Caches a tensor computed from a parameter in ``forward`` (timm EfficientFormer's attention-bias
    cache): after one forward with autograd on, the cache holds a non-leaf tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not isinstance(x, torch.fx.Proxy) and self.training is False:
            self.cache[str(x.device)] = self.bias * 2  # non-leaf when autograd is on
        return self.out(F.relu(self.conv(x)))


def test_a_model_caching_non_leaf_tensors_is_copied_not_refused() -> None:
    model = CachingAttention().eval()
    model(X)  # an ordinary forward with autograd on
    cached = model.cache["cpu"]
    assert not cached.is_leaf and cached.grad_fn is not None
    snap = snapshot(model)
    r = fxprune.compile(model, X, 0.5, **FAST)
    assert_unchanged(model, snap)
    assert model.cache["cpu"] is cached  # the user's cache is untouched
    assert r.plan.removed_channels > 0
    assert_masked_equivalent(model, r, X)


def test_detached_caches_copy_values_not_history() -> None:
    from fxprune.trace import copy_module, detached_caches

    model = CachingAttention().eval()
    model(X)
    model.extra = [model.bias * 3, (model.bias + 1,)]  # nested containers too
    memo = detached_caches(model)
    assert len(memo) == 3
    new = copy_module(model, memo)
    assert torch.equal(new.cache["cpu"], model.cache["cpu"]) and new.cache["cpu"].is_leaf
    assert new.extra[1][0].is_leaf and torch.equal(new.extra[1][0], model.extra[1][0])
    assert new.bias is not model.bias and torch.equal(new.bias, model.bias)


# ------------------------------------------------------------------------------------------- targets
def test_a_target_above_one_below_the_minimum_says_it_is_absolute() -> None:
    with pytest.raises(fxprune.TargetError) as info:
        fxprune.compile(Net("dict").eval(), X, 1.5, **FAST)
    msg = str(info.value)
    assert "unreachable" in msg and "target_flops=1.5 is above 1, so it is read as an absolute count" in msg
    assert "fraction in (0, 1] of the original was probably meant" in msg
    assert info.value.min_flops is not None and info.value.min_flops > 1.5


def test_a_target_that_leaves_a_handful_of_channels_warns_naming_them() -> None:
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(
        UserWarning, match=r"fewer than 4 channels: group \d+ \(layer\d[\w.]*.*: \d+ -> [1-3]\)"
    ) as rec:
        r = fxprune.compile(model, x, 0.01, **{**FAST, "verify": False, "round_to": 1})  # any count: 1 to 3
    msg = str(next(w.message for w in rec if "fewer than 4" in str(w.message)))
    assert "min_channels=4" in msg
    few = {gid: len(k) for gid, k in r.plan.kept.items() if len(k) < 4}
    assert few and f"{len(few)} channel group(s)" in msg
    for gid, n in list(few.items())[:6]:
        assert re.search(rf"group {gid} \([^)]*: {r.plan.group_sizes[gid]} -> {n}\)", msg), (gid, msg)
    with pytest.warns() as quiet:  # a moderate target keeps enough channels: no such warning
        fxprune.compile(model, x, 0.5, **{**FAST, "verify": False})
        warnings.warn("sentinel", UserWarning, stacklevel=1)
    assert not any("fewer than 4" in str(w.message) for w in quiet)


def test_apply_plan_keeps_the_output_and_refuses_a_plan_that_prunes_a_pinned_group() -> None:
    import dataclasses as dc

    torch.manual_seed(0)
    r = fxprune.compile(Net("ordered_dict").eval(), X, 0.3, **FAST)
    fresh = fxprune.apply_plan(Net("ordered_dict"), r.plan, X)
    with torch.no_grad():
        assert output_tree(fresh(X)) == output_tree(r.graph_module(X))
    head = next(g for g in r.groups if any(s.param == "head.weight" and s.role == "out" for s in g.sites))
    edited = dc.replace(r.plan, kept={**r.plan.kept, head.id: (0, 1)})
    with pytest.raises(fxprune.InputError, match=rf"plan prunes group {head.id}, which is pinned"):
        fxprune.apply_plan(Net("ordered_dict"), edited, X)
