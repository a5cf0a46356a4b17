"""The torch.export capture path against symbolic tracing, on models both can capture.

    python bench/export_capture.py [--models resnet18,...] [--out bench/results/export_capture.json]

Each model (random init, as ``bench/equivalence.py``'s fast set prepares it: 64x64, small ViT/Swin
configurations at 32x32, ``coverage._nontrivial``) is compiled twice at 50% FLOPs with
``score="magnitude"``, ``round_to=1`` and no timing: ``capture="fx"`` and ``capture="export"``
(``fxprune.capture.export_capture``). The export path is faithful when it finds the same channel groups
(sizes, pinned or not) and the same plan; the table says where it differs, with the pinned reasons only
one of them has, and whether ONNX Runtime verified each. A model torch.export cannot capture is recorded
with its error.

Prints a markdown table and writes JSON; exits 1 if a model compiles through both and the plans differ
without the export path pinning more (a pin is a missed rule, never a wrong model; a different plan with
the same pins would be a translation error).
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

import fxprune

sys.path.insert(0, str(Path(__file__).parent))
import equivalence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = equivalence.TORCHVISION


def _reasons(result: fxprune.CompileResult) -> set[str]:
    return {r.split(" at node")[0] for g in result.dependency.groups for r in g.pinned}


def run(name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    results = {}
    for capture in ("fx", "export"):
        model, x, _ = equivalence._torchvision_case(name)  # noqa: SLF001 - the bench's own case builder
        t = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = fxprune.compile(
                    model,
                    x,
                    0.5,
                    score="magnitude",
                    round_to=1,
                    latency_runs=0,
                    progress=False,
                    capture=capture,
                )
        except Exception as exc:  # recorded, as the coverage sweep does
            row[capture] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        results[capture] = r
        v = r.verification
        row[capture] = {
            "seconds": time.perf_counter() - t,
            "trace_seconds": r.timings.get("trace"),
            "flops_ratio": r.flops_ratio,
            "groups": len(r.dependency.groups),
            "prunable": len(r.dependency.prunable),
            "ort_passed": None if v is None else v.passed,
        }
    if len(results) == 2:
        fx_r, ex_r = results["fx"], results["export"]
        row["same_groups"] = [g.size for g in fx_r.dependency.groups] == [
            g.size for g in ex_r.dependency.groups
        ]
        row["same_plan"] = fx_r.plan.kept == ex_r.plan.kept
        row["only_fx_pins"] = sorted(_reasons(fx_r) - _reasons(ex_r))
        row["only_export_pins"] = sorted(_reasons(ex_r) - _reasons(fx_r))
        row["consistent"] = row["same_plan"] or bool(row["only_export_pins"] or row["only_fx_pins"])
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | fx: FLOPs, ORT, s | export: FLOPs, ORT, s (trace s) | same groups | same plan | pins only one has |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for c in ("fx", "export"):
            d = r.get(c, {})
            if "error" in d:
                cells.append(d["error"][:60])
            else:
                extra = f" ({d['trace_seconds']:.1f})" if c == "export" and d.get("trace_seconds") else ""
                cells.append(f"{d['flops_ratio']:.3f}, {d['ort_passed']}, {d['seconds']:.1f}{extra}")
        pins = "; ".join([*(f"fx: {p}" for p in r.get("only_fx_pins", [])),
                          *(f"export: {p}" for p in r.get("only_export_pins", []))])  # fmt: skip
        out.append(
            f"| {r['model']} | {cells[0]} | {cells[1]} | {r.get('same_groups', '-')} | "
            f"{r.get('same_plan', '-')} | {pins or '-'} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_capture.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        rows.append(run(name))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows))
    same = sum(1 for r in rows if r.get("same_plan"))
    both = sum(1 for r in rows if "same_plan" in r)
    print(f"\nsame plan through both captures: {same}/{both} of the models both capture ({len(rows)} run)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"rows": rows, "torch": torch.__version__}, indent=2), encoding="utf-8"
    )
    sys.exit(0 if all(r.get("consistent", True) for r in rows) else 1)


if __name__ == "__main__":
    main()
