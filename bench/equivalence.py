"""Before/after check for pipeline changes that must not change results: same plans, bit-identical weights.

    PYTHONPATH=<old checkout> python bench/equivalence.py --save /tmp/eq_before [--set fast|core|coverage|all]
    PYTHONPATH=<new checkout> python bench/equivalence.py --save /tmp/eq_after --compare /tmp/eq_before [--set ...]

(``<old checkout>``: a ``git worktree`` of the old commit with the symlinks ``fxprune/passes -> ../passes`` and
``fxprune/models_zoo -> ../models_zoo``, so that ``fxprune.passes`` resolves to its own tree.)

Sets of cases (``--set``, default ``fast``; ``all`` is every set):
- ``fast``: torchvision models at 64x64 (small ViT/Swin configurations at 32x32) with
  ``score="magnitude"``, as ``bench/coverage.py`` prepares them, and models_zoo nets with calibration data
  for every data-driven score family and compensation method (fisher+lsq, taylor+bias, influence+newton).
- ``core``: the eight CNNs of ``tests/test_torchvision.py`` at 224x224, as that test compiles them.
- ``coverage``: the compile of every model of the coverage sweep (``bench/coverage.py``: every torchvision
  classification model but ``HEAVY`` unless ``--all-models``, its smallest input, ``_nontrivial``, target
  0.5, magnitude), without the ONNX check (plans do not depend on it); weights are stored as SHA-256
  digests to keep the records small.

Stores, per case, everything a result is made of: the plan, the selected groups and their scores, FLOPs
and parameter counts, the generated code, the state_dict (or its digests) and the output on the example.
``--compare`` fails (exit 1) on any difference; tensors and score arrays are compared exactly
(``torch.equal``/``np.array_equal``, dtypes included). Verification errors are printed, not compared:
they depend on ONNX Runtime's graph optimisation level, which is not a result of the compile. A case that
raises records the error's type and message, compared like the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

TORCHVISION = (
    "resnet18",
    "googlenet",
    "densenet121",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_x_400mf",
    "convnext_tiny",
    "vit_small",
    "swin_small",
)
#: (models_zoo.toy net, score, compensation): data-driven scores and compensation on small nets
ZOO = (
    ("ResidualNet", "fisher", "lsq"),
    ("ConcatNet", "taylor", "bias"),
    ("SENet", "magnitude", None),
    ("FunctionalNet", "influence", "newton"),
)


#: small configurations of torchvision's attention models (as tests/test_zoo.py), at 32x32
SMALL = {
    "vit_small": lambda: __import__("torchvision").models.VisionTransformer(32, 8, 2, 2, 32, 64),
    "swin_small": lambda: __import__("torchvision").models.SwinTransformer(
        [4, 4], 16, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.1
    ),
}


def _torchvision_case(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    import torchvision

    sys.path.insert(0, str(Path(__file__).parent))
    import coverage as cov

    torch.manual_seed(0)
    if name in SMALL:
        model, x = SMALL[name]().eval(), torch.randn(1, 3, 32, 32)
    else:
        model, x = torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 64, 64)
    cov._nontrivial(model, x)
    return model, x, {"score": "magnitude"}


def _zoo_case(
    name: str, score: str, comp: str | None
) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    from fxprune.models_zoo import toy

    torch.manual_seed(0)
    model = getattr(toy, name)().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as tests/conftest.py::randomize_norms
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_var is not None:
                assert m.running_mean is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(2, 3, 16, 16, generator=g)
    data = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]
    opts: dict[str, Any] = {"score": score}
    if score != "magnitude":
        opts.update(data=data, compensate=comp)
    if score == "influence":
        opts.update(probes=2, cg_iters=2)
    return model, x, opts


def _core_case(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    import torchvision

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import randomize_norms

    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(name, weights=None)).eval()
    return model, torch.randn(1, 3, 224, 224), {"score": "magnitude"}


def _coverage_case(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """As ``bench/coverage.py``'s worker prepares a model (its input and ``_nontrivial``)."""
    import torchvision

    sys.path.insert(0, str(Path(__file__).parent))
    import coverage as cov

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    floor = max((v for k, v in cov.MIN_SIZE.items() if name.startswith(k)), default=0)
    x = cov._smallest_input(model, tuple(s for s in cov.SIZES if s >= floor))
    cov._nontrivial(model, x)
    return model, x, {"score": "magnitude", "verify": False}


def _digest(t: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    return (
        str(t.dtype),
        tuple(t.shape),
        hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest(),
    )


def _compact(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with weights and scores as digests (the coverage set: 76 models' weights)."""
    rec = dict(rec)
    rec["state"] = {k: _digest(v) for k, v in rec["state"].items()}
    rec["scores"] = {
        g: tuple(None if a is None else (str(a.dtype), hashlib.sha256(a.tobytes()).hexdigest()) for a in s)
        for g, s in rec["scores"].items()
    }
    return rec


def _record(model: torch.nn.Module, x: torch.Tensor, opts: dict[str, Any]) -> dict[str, Any]:
    import fxprune

    try:
        r = fxprune.compile(model, x, 0.5, latency_runs=0, progress=False, **{**EXTRA, **opts})
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "timings": {}, "verify": None}
    with torch.no_grad():
        out = r.graph_module(x)
    v = r.verification
    return {
        "plan": r.plan,
        "scores": {g: (s.mean, s.spread) for g, s in r.scores.items()},
        "numbers": (r.flops_before, r.flops_after, r.params_before, r.params_after, r.target_flops),
        "cost": r.cost,
        "groups": r.dependency.groups,
        "code": r.graph_module.code,
        "state": {k: v.detach().clone() for k, v in r.graph_module.state_dict().items()},
        "layout": {
            k: (type(v).__name__, v.requires_grad, v.stride(), v.device.type)
            for k, v in r.graph_module.state_dict(keep_vars=True).items()
        },
        "output": out.detach().clone(),
        "verify": None if v is None else (v.passed, v.max_rel_error, v.exporter),
        "timings": r.timings,
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b, strict=True))
    return bool(a == b)


#: options every compile gets (``--round-to``)
EXTRA: dict[str, Any] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", required=True, help="directory for this checkout's records")
    ap.add_argument("--compare", default=None, help="directory of an earlier --save to compare against")
    ap.add_argument("--models", default=",".join(TORCHVISION), help="the torchvision models of the fast set")
    ap.add_argument("--set", default="fast", choices=("fast", "core", "coverage", "all"))
    ap.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="pass round_to=N to every compile (1: any kept count, as before the measured default)",
    )
    ap.add_argument("--all-models", action="store_true", help="the coverage set includes coverage.HEAVY")
    args = ap.parse_args()
    if args.round_to is not None:
        EXTRA["round_to"] = args.round_to
    torch.set_num_threads(1)
    out = Path(args.save)
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Any] = {}
    compact: set[str] = set()
    if args.set in ("fast", "all"):
        cases.update({n: (lambda n=n: _torchvision_case(n)) for n in args.models.split(",") if n})
        cases.update({f"{n}-{s}-{c}": (lambda n=n, s=s, c=c: _zoo_case(n, s, c)) for n, s, c in ZOO})
    if args.set in ("core", "all"):
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from test_torchvision import MODELS as CORE  # the core CNNs, compiled as that test does

        cases.update({f"core-{n}": (lambda n=n: _core_case(n)) for n in CORE})
    if args.set in ("coverage", "all"):
        import torchvision

        sys.path.insert(0, str(Path(__file__).parent))
        import coverage as cov

        names = [
            n
            for n in torchvision.models.list_models(module=torchvision.models)
            if args.all_models or n not in cov.HEAVY
        ]
        cases.update({f"coverage-{n}": (lambda n=n: _coverage_case(n)) for n in names})
        compact.update(f"coverage-{n}" for n in names)
    failed = []
    for key, make in cases.items():
        model, x, opts = make()
        rec = _record(model, x, opts)
        if key in compact and "error" not in rec:
            rec = _compact(rec)
        del model
        (out / f"{key}.pkl").write_bytes(pickle.dumps(rec))
        line = f"{key}: {rec.get('error') or ''}verify {rec['verify']}, " + ", ".join(
            f"{k} {v:.2f}" for k, v in rec["timings"].items()
        )
        if args.compare:
            ref = pickle.loads((Path(args.compare) / f"{key}.pkl").read_bytes())
            keys = set(rec) | set(ref)
            diff = sorted(
                k for k in keys if k not in ("timings", "verify") and not _same(rec.get(k), ref.get(k))
            )
            line += f" | {'SAME' if not diff else 'DIFFERENT: ' + ', '.join(diff)}"
            if diff:
                failed.append(key)
        print(line, flush=True)
    if args.compare:
        print(f"{len(cases) - len(failed)}/{len(cases)} cases the same")
    if failed:
        print(f"different results: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
