"""Compile wall time per stage for the core torchvision CNNs, with Torch-Pruning timed in the same run.

    python bench/compile_speed.py [--models resnet18,resnet50] [--no-tp] [--out bench/results/compile_speed.json]

Prints a markdown table and writes JSON. Each model: eval mode, random init, 1x3x224x224, target 0.5.
Torch-Pruning (global magnitude, ratio 0.3, classifier ignored) is the peer; its time covers building its
dependency graph and one pruning step (not the copy of the model before it), and its achieved FLOPs ratio
is reported beside ours. fxprune's time is the whole ``compile`` call (``score="magnitude"``, ORT latency
timed with 5 runs of original and pruned); ``fx_vs_tp`` leaves out the verify stage (ONNX export, ONNX
Runtime sessions, latency runs), ``fx_vs_tp_with_verify`` includes it. Both tools run in this process,
alternately per model, after one warm-up run each on a toy net (one-off initialisation is not timed for
either).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

import fxprune

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "densenet121",
    "googlenet",
    "squeezenet1_1",
    "vgg11_bn",
    "alexnet",
]


def _classifier(model: torch.nn.Module, num_classes: int = 1000) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes
    ]


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> dict[str, object]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
            global_pruning=True, ignored_layers=_classifier(model),
        )  # fmt: skip
        pruner.step()
        seconds = time.perf_counter() - t
        return {"ok": True, "seconds": seconds, "flops": fxprune.count_flops(model, (x,))}
    except Exception as exc:  # the peer's failure is a result, not a crash of the bench
        return {
            "ok": False,
            "seconds": time.perf_counter() - t,
            "error": f"{type(exc).__name__}: {exc}"[:200],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", default="bench/results/compile_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from fxprune.models_zoo.toy import ResidualNet

    toy, toy_x = ResidualNet(num_classes=1000).eval(), torch.randn(1, 3, 16, 16)
    fxprune.compile(toy, toy_x, 0.5, latency_runs=5, score="magnitude")  # warm-up, not timed
    if not args.no_tp:
        run_torch_pruning(toy, toy_x)
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        t = time.perf_counter()
        r = fxprune.compile(model, x, 0.5, latency_runs=5, score="magnitude")
        total = time.perf_counter() - t
        row = {
            "model": name,
            "total_s": total,
            **{f"{k}_s": r.timings.get(k, 0.0) for k in fxprune.STAGES},
            "flops_ratio": r.flops_ratio,
            "params_ratio": r.params_ratio,
            "ort_ok": bool(r.verification and r.verification.passed),
            "ort_ms_before": r.verification.ort_ms_before if r.verification else None,
            "ort_ms_after": r.verification.ort_ms_after if r.verification else None,
        }
        if not args.no_tp:
            tp_res = run_torch_pruning(model, x)
            row["tp_ok"] = tp_res["ok"]
            row["tp_s"] = tp_res["seconds"]
            row["tp_flops_ratio"] = tp_res["flops"] / r.flops_before if tp_res.get("ok") else None
            # fxprune without verify (export + ORT) is the like-for-like number against the peer
            row["fx_vs_tp"] = (
                (total - r.timings.get("verify", 0.0)) / tp_res["seconds"] if tp_res["ok"] else None
            )
            row["fx_vs_tp_with_verify"] = total / tp_res["seconds"] if tp_res["ok"] else None
        rows.append(row)
        print(f"done {name}", flush=True)
    cols = ["model", *[f"{k}_s" for k in fxprune.STAGES], "total_s", "flops_ratio", "params_ratio", "ort_ok",
            "ort_ms_before", "ort_ms_after"]  # fmt: skip
    if not args.no_tp:
        cols += ["tp_s", "tp_flops_ratio", "fx_vs_tp", "fx_vs_tp_with_verify"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols]
        print("| " + " | ".join(cells) + " |")
    medians = {}
    for key in ("fx_vs_tp", "fx_vs_tp_with_verify"):
        values = [row[key] for row in rows if row.get(key) is not None]
        medians[f"median_{key}"] = statistics.median(values) if values else None
    print(", ".join(f"{k} {v:.2f}" for k, v in medians.items() if v is not None))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows, **medians},
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
