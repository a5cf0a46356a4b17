"""Scoring on several processes, and streaming calibration: wall time and peak memory, measured in one run.

    python bench/distributed.py [--model resnet50] [--size 64] [--batches 16] [--batch-size 8] [--repeats 2]
                                [--out bench/results/distributed.json]

1. **Processes.** ``fxprune.compile(model, x, 0.5, data=shard)`` with the default score (``fisher``: the
   data are labelled) on a torchvision model at random init, ``--batches`` batches in all, with 1 process
   (no process group: today's path) and with 2 processes (``torch.distributed``, gloo on localhost, each rank
   its contiguous half of the batches; the statistics are all-reduced). Each process runs one thread, so 2
   processes use the 2 cores. Per rank: the scoring wall time (the ``calibrate`` and ``score`` stages of
   ``result.timings``) and the peak resident memory (``ru_maxrss``). The 1- and 2-process runs alternate,
   ``--repeats`` times; the table gives medians and ranges, and the ratio 2 processes / 1 process.
2. **Streaming.** Peak resident memory of a compile of ``models_zoo.toy.ResidualNet`` (a small net, so the
   data dominate) scored on 4 and on 64 batches of 32x3x128x128 (6.3 MB each; 64 held at once would be
   400 MB) given as a DataLoader-like re-iterable that makes each batch when asked, each in a fresh
   process, alternating, ``--repeats`` times.

Prints markdown tables and writes JSON. Time it with nothing else running; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Batches:
    """A re-iterable that makes batch ``i`` from seed ``i`` when asked (a DataLoader over generated data)."""

    def __init__(self, indices: range, batch: int, size: int, classes: int) -> None:
        self.indices, self.batch, self.size, self.classes = indices, batch, size, classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in self.indices:
            g = torch.Generator().manual_seed(1000 + i)
            yield (torch.randn(self.batch, 3, self.size, self.size, generator=g),
                   torch.randint(0, self.classes, (self.batch,), generator=g))  # fmt: skip

    def __len__(self) -> int:
        return len(self.indices)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _score_job(rank: int, world: int, init: str, args: dict[str, Any], out: str) -> None:
    """One process of part 1: its shard, one compile, its scoring time and peak memory."""
    import torchvision

    import fxprune

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(args["model"], weights=None).eval()
        n = args["batches"]
        shard = Batches(
            range(rank * n // world, (rank + 1) * n // world), args["batch_size"], args["size"], 1000
        )
        x = torch.randn(1, 3, args["size"], args["size"])
        t = time.perf_counter()
        r = fxprune.compile(model, x, 0.5, data=shard, compensate="none", verify=False, progress=False)
        row = {"rank": rank, "world": world, "score": r.score, "compile_s": time.perf_counter() - t,
               "scoring_s": r.timings["calibrate"] + r.timings["score"], "peak_mb": _peak_mb(),
               "kept": {str(k): list(v) for k, v in r.plan.kept.items()}}  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _stream_job(n_batches: int, out: str) -> None:
    """One process of part 2: a compile scored on ``n_batches`` streamed batches; its peak memory."""
    from fxprune.models_zoo.toy import ResidualNet

    import fxprune

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResidualNet().eval()
    before = _peak_mb()
    r = fxprune.compile(model, torch.randn(1, 3, 128, 128), 0.5, data=Batches(range(n_batches), 32, 128, 10),
                        compensate="lsq", verify=False, progress=False)  # fmt: skip
    Path(out, "stream.json").write_text(
        json.dumps({"batches": n_batches, "peak_mb": _peak_mb(), "before_mb": before, "score": r.score})
    )


def _run_scoring(world: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/rendezvous"
        mp.spawn(_score_job, args=(world, init, args, d), nprocs=world, join=True)
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]


def _run_stream(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_stream_process, args=(n, d), nprocs=1, join=True)
        return json.loads(Path(d, "stream.json").read_text())


def _stream_process(_rank: int, n: int, out: str) -> None:
    _stream_job(n, out)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/distributed.json")
    a = ap.parse_args()
    args = {"model": a.model, "size": a.size, "batches": a.batches, "batch_size": a.batch_size}
    load = os.getloadavg()
    runs: dict[int, list[list[dict[str, Any]]]] = {1: [], 2: []}
    for _ in range(a.repeats):
        for world in (1, 2):
            runs[world].append(_run_scoring(world, args))
            print(f"{world} process(es): " + ", ".join(f"rank {r['rank']} {r['scoring_s']:.2f} s, {r['peak_mb']:.0f} MB"
                                                       for r in runs[world][-1]), flush=True)  # fmt: skip
    streams: dict[int, list[dict[str, Any]]] = {4: [], 64: []}
    for _ in range(a.repeats):
        for n in (4, 64):
            streams[n].append(_run_stream(n))
            print(f"stream {n} batches: peak {streams[n][-1]['peak_mb']:.0f} MB", flush=True)
    # the kept channel indices of every rank of every run against the first single-process run
    same_plan = all(rank["kept"] == runs[1][0][0]["kept"] for w in (1, 2) for run in runs[w] for rank in run)
    one = [r[0]["scoring_s"] for r in runs[1]]
    two = [max(x["scoring_s"] for x in r) for r in runs[2]]  # the slower rank decides
    print(f"\n## Scoring: {a.model} {a.size}x{a.size}, {a.batches} batches of {a.batch_size}, "
          f"score {runs[1][0][0]['score']} (load before: {load[0]:.2f})\n")  # fmt: skip
    print("| processes | scoring s per rank (median [range]) | peak MB per rank (median [range]) |")
    print("|---|---|---|")
    for w in (1, 2):
        for rank in range(w):
            s = [r[rank]["scoring_s"] for r in runs[w]]
            m = [r[rank]["peak_mb"] for r in runs[w]]
            print(f"| {w} (rank {rank}) | {_spread(s)} | {_spread(m)} |")
    ratios = [t2 / t1 for t1, t2 in zip(one, two, strict=True)]
    print(f"\nratio 2 processes / 1 process (slower rank, per repeat): {_spread(ratios)}; same plan on every "
          f"run and rank: {same_plan}")  # fmt: skip
    p4 = [s["peak_mb"] for s in streams[4]]
    p64 = [s["peak_mb"] for s in streams[64]]
    sr = [b / a_ for a_, b in zip(p4, p64, strict=True)]
    print("\n## Streaming: ResidualNet, batches of 32x3x128x128 (6.3 MB), fisher + lsq\n")
    print("| batches | peak MB (median [range]) |\n|---|---|")
    print(f"| 4 | {_spread(p4)} |\n| 64 | {_spread(p64)} |")
    print(f"\npeak 64 / peak 4 (per repeat): {_spread(sr)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": args, "load_before": load, "scoring": runs, "ratio_2_over_1": ratios,
                               "same_plan": same_plan, "streaming": streams, "stream_ratio_64_over_4": sr,
                               "python": sys.version}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
