"""Shared oracles for the test suite (shared/DESIGN.md, "Verification")."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import fxprune
from fxprune.trace import detached_caches
from fxprune.verify import flatten_outputs

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """A bench/ script as a module (bench/ is no package), registered under ``name``."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that an oracle that ignores a
    channel cannot pass by accident (a fresh BN is almost the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Everything the user could notice changing: a deep copy of the state dict, the code, the mode."""
    code = model.code if isinstance(model, torch.fx.GraphModule) else repr(model)
    return copy.deepcopy(model.state_dict()), code, model.training


def assert_unchanged(model: torch.nn.Module, snap: tuple[dict[str, torch.Tensor], str, bool]) -> None:
    state, code, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"compile mutated {k}"
    assert (model.code if isinstance(model, torch.fx.GraphModule) else repr(model)) == code
    assert model.training == training


def assert_masked_equivalent(
    model: torch.nn.Module,
    result: fxprune.CompileResult,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    rtol: float = 1e-5,
) -> float:
    """The pruned model equals the original with removed channels zeroed in every consumer.

    ``x`` is one input tensor or a tuple (one tensor per forward argument). Outputs may be a tensor or a
    (nested) tuple/list/dict of tensors: the structure must match, and *every* output tensor must match its
    masked counterpart within ``rtol`` x its own max |value|. Compensated results (``result.compensation``)
    are checked against the oracle with the same overrides written in.

    Also checks the oracle is not vacuous: when masking zeroes some consumer column, it changes some output.
    (Channels that no consumer reads, e.g. the rows of a conv output sliced away, are pruned for free:
    there is nothing to mask, and the output must not change.) Returns the largest relative error.
    """
    inputs = x if isinstance(x, tuple) else (x,)
    model = copy.deepcopy(model, detached_caches(model)).eval()
    overrides = result.compensation.overrides if result.compensation is not None else None
    with torch.no_grad():  # fresh copies of the inputs: a model may write into its input in place
        ref_out = fxprune.masked_model(model, result.plan, overrides)(*_clones(inputs))
        got_out = result.graph_module(*_clones(inputs))
        orig_out = model(*_clones(inputs))
    assert _structure(got_out) == _structure(ref_out) == _structure(orig_out)
    assert output_tree(got_out) == output_tree(orig_out), (
        "the pruned model's output differs from the original's"
    )
    refs, gots, origs = (flatten_outputs(o) for o in (ref_out, got_out, orig_out))
    assert refs, "the model has no tensor outputs"
    worst, changed = 0.0, False
    for i, (ref, got, orig) in enumerate(zip(refs, gots, origs, strict=True)):
        assert got.shape == ref.shape == orig.shape, (
            f"output {i}: shapes {got.shape} {ref.shape} {orig.shape}"
        )
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= rtol * scale, (
            f"output {i}: pruned differs from masked original: {err:.3g} > {rtol} x {scale:.3g}"
        )
        worst = max(worst, err / scale if scale > 0 else err)
        changed |= not torch.allclose(orig, ref, rtol=0, atol=1e-7 * scale)
    masks = any(
        len(kept) < _tensor(model, name).shape[dim] for name, (dim, kept) in result.plan.inputs.items()
    )
    if masks and not changed:
        # Removed channels can be dead on ``x`` (a ReLU that is zero for every sample, an SE gate over a
        # tiny batch): pruning them is free and masking them cannot show. Tell that apart from a vacuous
        # oracle with an independent perturbation: scaling the same columns by 3 must not matter either.
        with torch.no_grad():
            amp_out = _scale_removed_columns(model, result.plan, 3.0)(*_clones(inputs))
        for i, (orig, amp) in enumerate(zip(origs, flatten_outputs(amp_out), strict=True)):
            scale = orig.abs().max().item() if orig.numel() else 0.0
            assert torch.allclose(orig, amp, rtol=0, atol=1e-6 * scale), (
                f"masking changed nothing but the removed columns are live (output {i}): oracle is vacuous"
            )
    return worst


def _clones(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in inputs)


def _scale_removed_columns(model: torch.nn.Module, plan: fxprune.PrunePlan, factor: float) -> torch.nn.Module:
    """A copy of ``model`` whose removed consumer columns are multiplied by ``factor`` (not via the oracle)."""
    scaled = copy.deepcopy(model, detached_caches(model))
    with torch.no_grad():
        for name, (dim, kept) in plan.inputs.items():
            t = _tensor(scaled, name)
            f = torch.full((t.shape[dim],), factor, dtype=t.dtype)
            f[list(kept)] = 1.0
            shape = [1] * t.dim()
            shape[dim] = -1
            t.mul_(f.view(shape))
    return scaled


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    t = getattr(model.get_submodule(owner), leaf)
    assert isinstance(t, torch.Tensor), name
    return t


def output_tree(out: object) -> object:
    """What a caller sees of a model output, written independently of ``fxprune.data.output_signature``:
    the exact container class with its keys / fields / length, and each tensor's shape and dtype; other
    leaves by type and value. fx's immutable containers count as the plain ones they stand for."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.dtype)
    cls = {"immutable_dict": dict, "immutable_list": list}.get(type(out).__name__, type(out))
    if isinstance(out, dict):
        return (cls, [(k, output_tree(v)) for k, v in out.items()])
    if isinstance(out, (list, tuple)):
        return (cls, [output_tree(v) for v in out])
    if hasattr(out, "__dataclass_fields__"):
        return (cls, [(k, output_tree(getattr(out, k))) for k in out.__dataclass_fields__])
    return (cls, out)


def _structure(out: object) -> object:
    """The container structure of a model output with tensors replaced by their type."""
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, tuple(_structure(o) for o in out))
    if isinstance(out, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in out.items()))
    return type(out).__name__


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def synthetic_probe(align: int = 4, block: int = 16, slow: float = 3.0) -> dict[str, dict[str, float]]:
    """Probe timings of a runtime whose fast path needs multiples of ``align`` and steps every ``block``
    channels; other counts are ``slow`` times slower (``fxprune.passes.latency.alignment_from`` input)."""
    import math

    def t(c: int, base: float) -> float:
        return base * (1 + math.ceil(c / block)) * (1.0 if c % align == 0 else slow)

    return {
        kind: {str(c): t(c, base) for c in range(40, 89)}
        for kind, base in (("depthwise", 0.1), ("conv", 0.4))
    }


@pytest.fixture(scope="session", autouse=True)
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Latency tables in a fresh directory (never the user's ``~/.cache/fxprune``), with the runtime probe
    fixed to ``synthetic_probe()`` for every thread count a test may use: the default compile chooses kept
    counts by the measured alignment, and a test's plan must not depend on timing noise. The real probe
    is measured in tests/test_latency.py."""
    import os

    from fxprune.passes.latency import CACHE_ENV

    path = tmp_path_factory.mktemp("fxprune-cache")
    os.environ[CACHE_ENV] = str(path)  # subprocesses (CLI, torchrun) inherit it
    seed_probe(path)
    return path


def seed_probe(root: object) -> None:
    """Write ``synthetic_probe()`` as the measured probe of every CPU thread count a test may use into the
    fxprune cache at ``root`` (a test that points ``$FXPRUNE_CACHE`` elsewhere seeds it too)."""
    from pathlib import Path

    from fxprune.passes.latency import Runtime, TableCache

    from fxprune.verify import default_threads

    for threads in sorted({1, 2, default_threads()}):
        cache = TableCache(Runtime("cpu", threads), directory=Path(str(root)) / "latency")
        cache.data["probe"] = synthetic_probe()
        cache.save()
