"""torchvision's segmentation models at 50% FLOPs: the output (an ``OrderedDict``) keeps its structure.

    python bench/segmentation.py [--size 224] [--target 0.5] [--out bench/results/segmentation.json]

Each model (random init, ``weights=None``) is compiled at ``--target`` of its FLOPs on one
``1 x 3 x size x size`` input and checked three ways, each independent of fxprune's own verdict:

- **structure**: ``output_signature`` of the pruned model's output equals the user's model's (container
  type, keys and order, every shape and dtype);
- **oracle**: the pruned model equals the original with the removed channels zeroed in every consumer
  (``fxprune.masked_model``), max |difference| relative to max |output| over every output tensor;
- **ORT**: ONNX Runtime against eager (``result.verification``, ``rtol=1e-4``).

Prints a markdown table and writes JSON; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxprune
from fxprune.data import output_differences, output_signature
from fxprune.verify import flatten_outputs

ROOT = Path(__file__).resolve().parent.parent
MODELS: dict[str, dict[str, Any]] = {
    "fcn_resnet50": {},
    "deeplabv3_resnet50": {"aux_loss": True},
    "deeplabv3_mobilenet_v3_large": {"aux_loss": True},
    "lraspp_mobilenet_v3_large": {},
}
ORACLE_RTOL = 1e-4


def one(name: str, size: int, target: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, **MODELS[name]
    )
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fxprune.compile(model, x, target, latency_runs=0, progress=False)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        want, got = model(x), r.graph_module(x)
        masked = fxprune.masked_model(model, r.plan)(x)
    diffs = output_differences(output_signature(want), output_signature(got))
    rel = max(
        float((g - m).abs().max() / m.abs().max().clamp_min(1e-12))
        for g, m in zip(flatten_outputs(got), flatten_outputs(masked), strict=True)
    )
    v = r.verification
    assert v is not None
    return {
        "model": name,
        "input": [1, 3, size, size],
        "outputs": {k: list(o.shape) for k, o in got.items()},
        "output_type": type(got).__name__,
        "structure_same": not diffs,
        "differences": diffs,
        "oracle_max_rel_error": rel,
        "oracle_pass": rel <= ORACLE_RTOL,
        "ort_pass": v.passed,
        "ort_max_rel_error": v.max_rel_error,
        "exporter": v.exporter,
        "flops_ratio": r.flops_ratio,
        "params_ratio": r.params_ratio,
        "pinned_groups": sum(1 for g in r.groups if not g.prunable),
        "compile_s": round(seconds, 2),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | outputs (pruned) | structure = original | oracle rel err | ORT rel err (exporter) | FLOPs | "
        "params | compile |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        outs = ", ".join(f"{k} {tuple(s)}" for k, s in r["outputs"].items())
        out.append(
            f"| {r['model']} | {r['output_type']}: {outs} | {'yes' if r['structure_same'] else r['differences']} "
            f"| {r['oracle_max_rel_error']:.1e} | {r['ort_max_rel_error']:.1e} ({r['exporter']}) | "
            f"{r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {r['compile_s']:.1f} s |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "segmentation.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(one(name, args.size, args.target))
        print(f"  {name}: {rows[-1]['compile_s']} s", file=sys.stderr, flush=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1))
    print(f"\nwrote {args.out}")
    ok = all(r["structure_same"] and r["oracle_pass"] and r["ort_pass"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
