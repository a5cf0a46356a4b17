"""Accuracy at equal measured latency: fxprune's target_latency against target_flops on the digits nets.

    python bench/latency_quality.py [--models resnet20 mobilenetv2 densenet] [--latency 0.7 0.5 0.3]
                                    [--flops 0.9 0.8 0.7 0.6 0.5 0.4 0.3 0.2 0.1] [--threads 1]
                                    [--out bench/results/latency_quality.json]

Issue 14's quality acceptance. For each models_zoo digits net of ``bench/quality.py`` (trained by its
``trained``, cached under bench/results/cache/), with its calibration batches (the first
``--calib-batches`` of 64 training samples, seed 7, as ``bench/quality.py``): one ``fxprune.compile`` per
target, the scores computed once (``scores=``) and shared by all, with fxprune's defaults otherwise (score
``auto`` = fisher with labelled data, compensation ``lsq``; ``--score``, ``--compensate`` override), no
fine-tuning, ``latency_runs=0``, ``latency_threads=T``, ``latency_provider="cpu"``:

- ``target_latency=L`` for each ``L`` of ``--latency`` (the latency-targeted models; a target the compile
  finds unreachable, as fixed per-run overheads can make it on these 32x32 nets, is recorded as its error);
- ``target_flops=F`` for each ``F`` of ``--flops`` (the FLOPs-targeted curve).

Every pruned model and the original are exported (``fxprune.verify.export_onnx``) and timed in one
interleaved loop (``bench/latency.py``'s ``interleaved``, i.e. ``fxprune.verify.time_interleaved``: ONNX
Runtime CPU EP, ``"all"`` optimisation level, ``T`` intra-op threads, **batch 1**: one 3x32x32 test image,
since ``bench/quality.py`` deploys nothing, as in issue 14; warm-up, then rounds in a rotating order); a
model's measured latency ratio is the median of its per-round paired ratios to the original. Accuracy is on
the held-out test split (450 images).

Comparison: the FLOPs-targeted points (measured latency ratio, accuracy), sorted by latency, are linearly
interpolated at each latency-targeted model's measured latency ratio (no extrapolation: outside the curve's
range the comparison is not made). The difference ``acc(latency-targeted) - acc(interpolated)`` gets a 95%
paired bootstrap interval over the test samples: each resample draws test images with replacement and
recomputes both accuracies on them (the interpolated one as the same weighted mix of the two bracketing
FLOPs-targeted models' per-image correctness). The interval covers the sampling of the test set only, not
the timing noise of the latency ratios that place the comparison.

Acceptance (issue 14): at equal measured latency, accuracy is at least that of the FLOPs-targeted model on
every comparison, and higher on at least one. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fxprune.models_zoo.digits import DIGITS_MODELS, batches, load_digits_32

import fxprune
from fxprune.verify import export_onnx

sys.path.insert(0, str(Path(__file__).parent))  # bench/ is no package: its sibling scripts by path
import latency as lat  # noqa: E402
import quality  # noqa: E402

BOOTSTRAP = 2000


def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Per-sample correctness (bool) of ``model`` in eval mode on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).numpy()
                for i in range(0, len(y), batch_size)
            ]
        )


def interpolate(points: list[tuple[float, int]], at: float) -> tuple[int, int, float] | None:
    """The two points bracketing ``at`` on the latency axis and the weight of the second: ``(i, j, w)`` with
    the value at ``at`` = ``(1 - w) * value[i] + w * value[j]``; ``points`` are ``(latency ratio, index)``.
    None when ``at`` is outside the points' range."""
    pts = sorted(points)
    for (la, i), (lb, j) in zip(pts, pts[1:], strict=False):
        if la <= at <= lb:
            return i, j, 0.0 if lb == la else (at - la) / (lb - la)
    return None


def paired_bootstrap(ours: np.ndarray, mix: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Mean of ``ours - mix`` over the test samples, its 95% bootstrap interval, and the share of resamples
    where it is > 0 (``ours``: 0/1 correctness; ``mix``: the interpolated correctness in [0, 1])."""
    d = ours.astype(float) - mix
    idx = np.random.default_rng(seed).integers(0, len(d), (BOOTSTRAP, len(d)))
    boot = d[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "difference": float(d.mean()),
        "ci": [float(lo), float(hi)],
        "share_above": float((boot > 0).mean()),
    }


def bench_model(name: str, args: argparse.Namespace, data: Any, calib: list[Any]) -> dict[str, Any]:
    """Compile every target of one digits net, time all pruned models with the original, compare."""
    model = quality.trained(name, data, args.epochs)
    x1 = data.x_test[:1]
    options: dict[str, Any] = {"weight_decay": quality.WEIGHT_DECAY} if args.score != "magnitude" else {}
    if args.compensate is not None:
        options["compensate"] = args.compensate
    params = set(inspect.signature(fxprune.compile).parameters)
    if "latency_threads" in params:
        options["latency_threads"] = args.threads
    if "latency_provider" in params:
        options["latency_provider"] = "cpu"
    common = {"score": args.score, "data": calib, "verify": False, "progress": False, "latency_runs": 0}
    t = time.perf_counter()
    first = fxprune.compile(model, x1, args.flops[0], **common, **options)
    score_seconds = time.perf_counter() - t
    entries: list[dict[str, Any]] = []
    pruned: list[torch.nn.Module] = []
    targets = [("flops", f) for f in args.flops] + [("latency", v) for v in args.latency]
    for kind, target in targets:
        kw = {"target_flops": target} if kind == "flops" else {"target_flops": None, "target_latency": target}
        t = time.perf_counter()
        try:
            lat.need(params, *kw)
            r = (
                first
                if kind == "flops" and target == args.flops[0]
                else fxprune.compile(model, x1, **kw, **common, scores=first.scores, **options)
            )
        except Exception as exc:
            entries.append({"kind": kind, "target": target, "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        secs = score_seconds if r is first else time.perf_counter() - t
        entries.append(
            {
                "kind": kind,
                "target": target,
                "seconds": secs,
                "flops_ratio": r.flops_ratio,
                **{k: f for k, f in lat.latency_figures(r).items() if k != "summary"},
                "table_seconds": r.timings.get("latency"),
            }
        )
        pruned.append(r.graph_module)
    ok = [e for e in entries if "error" not in e]
    # accuracy on the test split
    y = data.y_test
    hits = [correct(model, data.x_test, y)] + [correct(m, data.x_test, y) for m in pruned]
    # ORT latency, all models in one interleaved loop, batch 1
    sessions = []
    with torch.no_grad():
        for m in [model, *pruned]:
            sessions.append(lat.make_session(export_onnx(m, (x1,))[0], args.threads))
    load = os.getloadavg()
    t = time.perf_counter()
    times, timer = lat.interleaved(
        sessions, (x1,), warmup=args.warmup, min_runs=args.runs, max_runs=args.max_runs, seconds=args.seconds
    )
    row: dict[str, Any] = {
        "model": name,
        "acc_full": float(hits[0].mean()),
        "original_ms": lat.spread(times[:, 0]),
        "timing": {
            "rounds": len(times),
            "seconds": time.perf_counter() - t,
            "load_before": list(load),
            "load_after": list(os.getloadavg()),
        },
        "score_seconds": score_seconds,
        "score": first.score,
        "compensate": args.compensate,
    }
    for i, e in enumerate(ok, start=1):
        e["acc"] = float(hits[i].mean())
        e["ms"] = lat.spread(times[:, i])
        e["latency_ratio"] = lat.spread(times[:, i] / times[:, 0])
    curve = [(e["latency_ratio"]["median"], i) for i, e in enumerate(ok, start=1) if e["kind"] == "flops"]
    comparisons = []
    for i, e in enumerate(ok, start=1):
        if e["kind"] != "latency":
            continue
        at = e["latency_ratio"]["median"]
        br = interpolate(curve, at)
        c: dict[str, Any] = {"target_latency": e["target"], "latency_ratio": at, "acc": e["acc"]}
        if br is None:
            c["error"] = "outside the FLOPs-targeted curve's latency range"
        else:
            j, k, w = br
            mix = (1 - w) * hits[j] + w * hits[k]
            c.update(
                flops_between=[ok[j - 1]["target"], ok[k - 1]["target"]],
                weight=w,
                acc_flops_interpolated=float(mix.mean()),
                **paired_bootstrap(hits[i], mix),
            )
        comparisons.append(c)
    row["entries"] = entries
    row["comparisons"] = comparisons
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 14's check over every comparison made."""
    diffs = [c["difference"] for r in rows for c in r["comparisons"] if "difference" in c]
    return {
        "comparisons": len(diffs),
        "not_worse": sum(d >= 0 for d in diffs),
        "better": sum(d > 0 for d in diffs),
        "passes": bool(diffs) and all(d >= 0 for d in diffs) and any(d > 0 for d in diffs),
    }


def _f(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| model | target | FLOPs ratio | latency ratio [IQR] | predicted ratio | acc (no FT) | compile s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | original | 1 | 1 ({r['original_ms']['median']:.3f} ms) | | "
            f"{r['acc_full']:.3f} | |"
        )
        for e in r["entries"]:
            tgt = f"{e['kind']} {e['target']}"
            if "error" in e:
                print(f"| {r['model']} | {tgt} | | | | | {e['error'][:80]} |")
                continue
            lr = e["latency_ratio"]
            print(
                f"| {r['model']} | {tgt} | {e['flops_ratio']:.3f} | {lr['median']:.3f} [{lr['q1']:.3f}, "
                f"{lr['q3']:.3f}] | {_f(e.get('predicted_ratio'))} | {e['acc']:.3f} | {e['seconds']:.1f} |"
            )
    print(
        "\n| model | target_latency | measured latency ratio | acc | FLOPs-targeted acc there (between) "
        "| difference | 95% paired bootstrap | share > 0 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for c in r["comparisons"]:
            if "error" in c:
                print(
                    f"| {r['model']} | {c['target_latency']} | {c['latency_ratio']:.3f} | {c['acc']:.3f} | "
                    f"{c['error']} | | | |"
                )
                continue
            lo, hi = c["ci"]
            a, b = c["flops_between"]
            print(
                f"| {r['model']} | {c['target_latency']} | {c['latency_ratio']:.3f} | {c['acc']:.3f} | "
                f"{c['acc_flops_interpolated']:.3f} ({a}..{b}) | {c['difference']:+.3f} | "
                f"[{lo:+.3f}, {hi:+.3f}] | {c['share_above']:.2f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(DIGITS_MODELS))
    ap.add_argument("--latency", nargs="*", type=float, default=[0.7, 0.5, 0.3], help="target_latency values")
    ap.add_argument(
        "--flops",
        nargs="*",
        type=float,
        default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        help="target_flops grid (the first also computes the shared scores)",
    )
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (latency_threads)")
    ap.add_argument("--score", default="auto")
    ap.add_argument("--compensate", default=None, help="default: fxprune's (lsq with data)")
    ap.add_argument("--epochs", type=int, default=8, help="as bench/quality.py (its cached weights)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--runs", type=int, default=100, help="at least this many interleaved rounds")
    ap.add_argument("--max-runs", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=15.0, help="keep timing rounds for this long")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=quality.RESULTS / "latency_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_digits_32()
    calib = list(batches(data.x_train, data.y_train, 64, seed=7))[: args.calib_batches]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows.append(bench_model(name, args, data, calib))
        print_tables(rows[-1:])
        args.out.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "summary": summary(rows),
                },
                indent=1,
            )
        )
    print_tables(rows)
    print(json.dumps(summary(rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
