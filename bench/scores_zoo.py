"""Every score on every CNN of the core list (torchvision, random init, eval mode), on CPU: time, finiteness,
and peak memory; plus resnet50 at 224x224 scored on 4 batches of 8 with the default score (the issue's
memory check).

Each (model, score) runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own.

    python bench/scores_zoo.py                  # the matrix at --size (default 64) + resnet50 4x8 at 224
    python bench/scores_zoo.py --one resnet50 influence --size 224 --batches 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from fxprune.passes.score import auto_score

RESULTS = Path(__file__).parent / "results"
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "googlenet", "squeezenet1_1", "vgg11_bn",
          "alexnet"]  # fmt: skip
SCORES = ["magnitude", "taylor", "fisher", "inf_cp", "grad_norm", "sosp_h", "ifso_code", "influence"]


def one(model_name: str, score: str, size: int, n_batches: int, batch_size: int) -> dict[str, object]:
    import numpy as np
    import torch
    import torchvision

    import fxprune

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if model_name == "googlenet" else {}
    model = torchvision.models.get_model(model_name, weights=None, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, 1000, (batch_size,), generator=g))
            for _ in range(n_batches)]  # fmt: skip
    x = data[0][0][:1]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the compile pipeline up to the scores: seconds are its calibrate and score stages
    options = fxprune.CompileOptions(score=score, data=data, compensate="none", device="cpu", progress=False)
    state = fxprune.COMPILE.until("score").run(
        fxprune.CompileState(model=model, example_input=x, options=options)
    )
    scores, seconds = state.scores, state.timings["calibrate"] + state.timings["score"]
    values = np.concatenate([s.mean for s in scores.values()]) if scores else np.zeros(0)
    return {"model": model_name, "score": score, "size": size, "batches": n_batches, "batch_size": batch_size,
            "seconds": seconds, "finite": bool(np.isfinite(values).all()), "channels": int(values.size),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before, "params": fxprune.count_params(model)}  # fmt: skip


def run_child(model: str, score: str, size: int, batches: int, batch_size: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--one", model, score, "--size", str(size), "--batches", str(batches),
           "--batch-size", str(batch_size)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"model": model, "score": score, "size": size, "ok": False, "error": p.stderr.strip()[-300:]}
    return {"ok": True, **json.loads(p.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "SCORE"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--scores", nargs="*", default=SCORES)
    ap.add_argument("--skip-resnet50-224", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "scores_zoo.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.size, args.batches, args.batch_size)))
        return
    rows = []
    print("| model | score | input | batches | seconds | finite | channels | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    jobs = [(m, s, args.size, args.batches, args.batch_size) for m in args.models for s in args.scores]
    if not args.skip_resnet50_224:  # the memory check, with compile's default score on labelled data
        jobs.append(("resnet50", auto_score(labelled=True), 224, 4, 8))
    for job in jobs:
        r = run_child(*job)
        rows.append(r)
        if r["ok"]:
            print(
                f"| {r['model']} | {r['score']} | {r['size']} | {r['batches']}x{r['batch_size']} | "
                f"{r['seconds']:.1f} | {r['finite']} | {r['channels']} | {r['peak_rss_mb']:.0f} |",
                flush=True,
            )
        else:
            print(f"| {r['model']} | {r['score']} | {r['size']} | FAILED: {r['error'][-120:]} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    ok = sum(1 for r in rows if r.get("ok") and r.get("finite"))
    print(f"\n{ok}/{len(rows)} runs finished with finite scores; wrote {args.out}")


if __name__ == "__main__":
    main()
