"""Scoring + compensation time and peak memory of score/compensation pairs on a torchvision model (issue 15).

    python bench/score_speed.py                      # resnet50, 224x224, 4 batches of 8, CPU, 2 repeats
    python bench/score_speed.py --model resnet18 --size 64 --configs fisher:lsq_independent obs:lsq

Each (score, compensate) configuration compiles the model (random init, eval mode, ``target_flops=0.5``,
``verify=False``) on the same calibration batches (seeded images, random labels) in a fresh child process,
so its peak resident memory (``ru_maxrss``) is its own; the configurations run interleaved, ``--repeats``
rounds in a rotating order. Reported per configuration: the median and range of the score and compensate
stages' wall seconds (``result.timings``) and their sum, its ratio to the baseline's (the first
configuration, by default fisher + ``lsq_independent``: the default of fxprune before the sequential lsq),
and the peak RSS. Prints a table and writes JSON. (``obs:lsq`` is not in the defaults: on resnet50 it took
285 s, 11x the default, with 5.8 GB peak RSS.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
CONFIGS = ["fisher:lsq_independent", "fisher:lsq"]


def child(args: argparse.Namespace) -> None:
    """One compile; prints one JSON line with the stage timings and what was chosen."""
    import torch
    import torchvision

    import fxprune

    torch.set_num_threads(args.threads)
    score, comp = args.child.split(":")
    model = getattr(torchvision.models, args.model)(num_classes=1000).eval()
    g = torch.Generator().manual_seed(0)
    size = args.size
    data = [(torch.randn(args.batch, 3, size, size, generator=g), torch.randint(0, 1000, (args.batch,), generator=g))
            for _ in range(args.batches)]  # fmt: skip
    t = time.perf_counter()
    r = fxprune.compile(model, data[0][0][:1], 0.5, score=score, data=data, compensate=comp, verify=False,
                        progress=False)  # fmt: skip
    total = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"score": r.score, "score_s": r.timings.get("score", 0.0),
                      "compensate_s": r.timings.get("compensate", 0.0), "compile_s": total,
                      "flops": r.flops_ratio, "peak_mb": peak_mb}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument(
        "--configs", nargs="*", default=CONFIGS, help="score:compensate; the first is the baseline"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "score_speed.json")
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    for r in range(args.repeats):
        order = args.configs[r % len(args.configs) :] + args.configs[: r % len(args.configs)]
        for config in order:
            cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--size", str(args.size),
                   "--batch", str(args.batch), "--batches", str(args.batches), "--threads", str(args.threads)]  # fmt: skip
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            runs[config].append(json.loads(out))
            print(f"  round {r} {config}: {out}", flush=True)
    base = statistics.median(x["score_s"] + x["compensate_s"] for x in runs[args.configs[0]])
    rows = []
    for config, xs in runs.items():
        both = [x["score_s"] + x["compensate_s"] for x in xs]
        rows.append({"config": config, "score": xs[0]["score"],
                     "score_s": statistics.median(x["score_s"] for x in xs),
                     "compensate_s": statistics.median(x["compensate_s"] for x in xs),
                     "both_s": statistics.median(both), "both_range": [min(both), max(both)],
                     "ratio": statistics.median(both) / base, "peak_mb": max(x["peak_mb"] for x in xs),
                     "flops": xs[0]["flops"]})  # fmt: skip
    print(f"\n{args.model}, {args.size}x{args.size}, {args.batches} batches of {args.batch}, CPU, "
          f"{args.threads} threads, {args.repeats} interleaved rounds (medians)")  # fmt: skip
    print(
        "| score:compensate | score used | score s | compensate s | both s (range) | × baseline | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["both_range"]
        print(f"| {r['config']} | {r['score']} | {r['score_s']:.1f} | {r['compensate_s']:.1f} | "
              f"{r['both_s']:.1f} ({lo:.1f}-{hi:.1f}) | {r['ratio']:.2f} | {r['peak_mb']:.0f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "runs": runs}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
