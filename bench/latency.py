"""Measured latency of pruned models in ONNX Runtime: fxprune by FLOPs, fxprune by latency, Torch-Pruning.

    python bench/latency.py [--models resnet18,mobilenet_v2] [--threads 1,2] [--size 224]
                            [--cache DIR] [--out bench/results/latency.json]

Issue 14, deliverable 4 and its acceptance. For each torchvision model (random init, ``_nontrivial`` of
``bench/coverage.py`` so the ONNX Runtime check is informative, eval mode, batch 1, ``--size`` square input)
and each intra-op thread count ``T`` of ``--threads``, in one process:

- (a) ``flops``: ``fxprune.compile(model, x, 0.5, latency_threads=T, latency_provider=P, latency_runs=0,
  verify=False)``: the defaults (``round_to=None``: kept counts at the runtime's measured channel
  alignment). Its ``timings["latency"]`` is the alignment probe where the cache lacks it (the first model
  at each ``T`` of a run: a fresh cache directory per run, ``FXPRUNE_CACHE``, unless ``--cache``).
- (b) ``latency``: ``fxprune.compile(model, x, target_latency=0.5, ...)``, twice: the first builds the
  model's per-op tables (its ``timings["latency"]``: tables and the original's measurement; acceptance
  <= 60 s), the second finds them cached (acceptance <= 5 s; whether it chose the same kept counts is
  recorded). The first one's model is timed; its predicted latency (``result.predicted_latency_ms``) is
  compared with the measured one, and ``latency_model``'s figures (``full_ms``: the original as the compile
  measured it; ``ops_ms``, ``other_ms``, ``gap_ms``: the tables' sum and the gap to the whole) recorded.
- (c) ``tp``: Torch-Pruning (``MetaPruner``, ``MagnitudeImportance(p=2)``, global, the 1000-way classifier
  ignored) with its channel ratio bisected until its FLOPs match (a)'s within ``--tp-tol``.

FLOPs of every model are counted by ``fxprune.count_flops`` (``torch.utils.flop_counter``). The original,
(a), (b) and (c) are exported with ``fxprune.verify.export_onnx`` (``exporter="auto"``: fxprune's writer for
its GraphModules, torch's TorchScript exporter for the original and Torch-Pruning's model, as a user would
deploy each; the exporter is recorded), checked once against eager (max abs error / max |output|), and timed
interleaved in ONNX Runtime (CPU EP, or ``--provider cuda``; ``"all"`` optimisation level,
``intra_op_num_threads = T``) by ``fxprune.verify.time_interleaved`` (``interleaved``): ``--warmup`` rounds,
then rounds in which every session runs once (the order rotated by one each round), at least ``--runs``
rounds, until ``--seconds`` have passed or every median is stable (at most ``--max-runs``). Per session:
median and interquartile range (IQR) of its times; per pruned model: the median and IQR of the per-round
paired ratios ``t_pruned / t_original`` (the measured latency ratio), and latency ratio / FLOPs ratio.

Acceptance (issue 14), per model and thread count:
- (a): measured latency ratio <= 1.10 x its FLOPs ratio;
- (b): measured latency ratio in [0.45, 0.55], and predicted latency within 10% of measured: the
  predicted ratio (``predicted_ms / full_ms``, both from the compile) against the measured paired ratio,
  which cancels a change of load between the compile's measurement of the original and the bench's;
  also recorded and shown: the predicted milliseconds against the bench's measured median (``ms err``);
- tables: (b)'s first compile <= 60 s in its latency stage, the second <= 5 s.

Machine load (``os.getloadavg``) before and after each model, the CPU count, the thread counts and the
versions of ONNX Runtime, torch and Torch-Pruning are recorded. Prints a markdown table and writes JSON.
A feature that the installed fxprune lacks (``target_latency=``, ``latency_threads=``) is recorded as that
variant's error, so the rest of the row still runs.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODELS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "convnext_tiny",
)
#: acceptance bounds of issue 14
FLOPS_SLACK = 1.10
LATENCY_BAND = (0.45, 0.55)
PREDICTION_TOL = 0.10
FIRST_TABLES_S = 60.0
SECOND_TABLES_S = 5.0
#: the variants timed against the original, in the table's order
VARIANTS = ("flops", "latency", "tp")


# --- timing ------------------------------------------------------------------------------------------------


def interleaved(
    sessions: Sequence[Any],
    example: Sequence[Any],
    *,
    warmup: int = 5,
    min_runs: int = 30,
    max_runs: int = 1000,
    seconds: float = 10.0,
) -> tuple[np.ndarray, str]:
    """Per-round run times (ms) of ONNX Runtime sessions timed interleaved, ``rounds x len(sessions)``, and
    the name of the timer.

    ``fxprune.verify.time_interleaved`` where the installed fxprune has it (``warmup`` untimed rounds, then
    rounds in an order rotated by one each round, at least ``min_runs``, until ``seconds`` have passed or
    every session's median is stable, at most ``max_runs``); else this bench's loop: the same rounds and
    rotation, stopping after ``seconds`` (at least ``min_runs``, at most ``max_runs`` rounds). A row's
    times were taken moments apart, so per-row ratios cancel load that drifts between rounds.
    """
    from fxprune import verify

    if hasattr(verify, "time_interleaved"):
        times = verify.time_interleaved(
            sessions, example, warmup=warmup, min_runs=min_runs, max_runs=max_runs, max_seconds=seconds
        )
        return np.array(times, dtype=float).T, "fxprune.verify.time_interleaved"
    feeds = [feeds_for(s, example) for s in sessions]
    n = len(sessions)
    for r in range(warmup):
        for k in range(n):
            sessions[(r + k) % n].run(None, feeds[(r + k) % n])
    rows: list[list[float]] = []
    start = time.perf_counter()
    while len(rows) < max_runs and (len(rows) < min_runs or time.perf_counter() - start < seconds):
        row = [0.0] * n
        for k in range(n):
            i = (warmup + len(rows) + k) % n
            t = time.perf_counter()
            sessions[i].run(None, feeds[i])
            row[i] = (time.perf_counter() - t) * 1e3
        rows.append(row)
    return np.array(rows), "bench/latency.py"


def spread(values: np.ndarray) -> dict[str, float]:
    """Median and quartiles (``q1``, ``q3``) of ``values``."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def feeds_for(sess: Any, example: Sequence[Any]) -> dict[str, np.ndarray]:
    """The input dict of an ONNX Runtime session for the example tensors (in input order)."""
    return {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), example, strict=False)}


def ort_error(sess: Any, feeds: dict[str, np.ndarray], eager: Any) -> float:
    """max |ORT - eager| / max |eager| over the first output (a classifier's logits)."""
    got = np.asarray(sess.run(None, feeds)[0], dtype=np.float64)
    ref = eager.detach().double().numpy()
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))


def make_session(blob: bytes, threads: int, provider: str = "cpu") -> Any:
    """An ONNX Runtime session at the ``"all"`` optimisation level with ``threads`` intra-op threads on
    ``provider`` (``"cpu"`` or ``"cuda"``; an fxprune without ``ort_session(provider=)``: the CPU only)."""
    from fxprune.verify import ort_session

    kw: dict[str, Any] = {}
    if "provider" in inspect.signature(ort_session).parameters:
        kw["provider"] = provider
    elif provider != "cpu":
        raise RuntimeError(f"provider={provider!r}: this fxprune's ort_session has no provider= (CPU only)")
    return ort_session(blob, "all", threads=threads, **kw)


# --- the tools ---------------------------------------------------------------------------------------------


def compile_parameters() -> set[str]:
    """The keyword parameters of the installed ``fxprune.compile``."""
    import fxprune

    return set(inspect.signature(fxprune.compile).parameters)


def need(params: set[str], *names: str) -> None:
    """Raise a clear error if the installed ``fxprune.compile`` lacks one of ``names``."""
    missing = [n for n in names if n not in params]
    if missing:
        where = Path(inspect.getfile(__import__("fxprune"))).parent
        raise RuntimeError(
            f"no {', '.join(m + '=' for m in missing)} in fxprune.compile ({where}: before issue 14)"
        )


def latency_figures(result: Any) -> dict[str, Any]:
    """What a compile's latency model says: the predicted latency of the pruned model
    (``result.predicted_latency_ms``), the original's latency as the compile measured it (``full_ms``),
    the sum of the op tables and the gap to the whole (``ops_ms``, ``other_ms``, ``gap_ms``), the target
    in ms, and the predicted ratio (predicted / the compile's own measurement of the original). Empty where
    the compile ran under no latency model (``target_flops``)."""
    model = getattr(result, "latency_model", None)
    if model is None:
        return {}
    out: dict[str, Any] = {"predicted_ms": result.predicted_latency_ms, "target_ms": result.target_latency_ms}
    for key in ("full_ms", "ops_ms", "other_ms", "gap_ms"):
        out[key] = getattr(model, key, None)
    out["summary"] = model.summary() if hasattr(model, "summary") else None
    if out["predicted_ms"] is not None and out["full_ms"]:
        out["predicted_ratio"] = out["predicted_ms"] / out["full_ms"]
    return out


def run_fxprune(
    model: Any, x: Any, threads: int, provider: str, params: set[str], **target: Any
) -> dict[str, Any]:
    """One ``fxprune.compile`` at ``target`` (``target_flops=`` or ``target_latency=``) with ONNX Runtime
    measurements on ``threads`` and ``provider``; the pruned model is returned under ``"model"`` (dropped
    before the row is written). ``table_seconds``: its ``timings["latency"]`` (the alignment probe, the op
    tables and the original's measurement, whichever the cache did not hold)."""
    import fxprune

    t = time.perf_counter()
    # without latency_threads= (an fxprune before issue 14) (a) still runs, as the old defaults: recorded
    extra: dict[str, Any] = {"latency_threads": threads} if "latency_threads" in params else {}
    if "latency_provider" in params:
        extra["latency_provider"] = provider
    try:
        need(params, *target)
        r = fxprune.compile(model, x, **target, **extra, latency_runs=0, verify=False, progress=False)
    except Exception as exc:
        return {
            "ok": False,
            "seconds": time.perf_counter() - t,
            "error": f"{type(exc).__name__}: {exc}"[:400],
        }
    return {
        "ok": True,
        "latency_threads": extra.get("latency_threads"),
        "model": r.graph_module,
        "kept": {g: len(k) for g, k in r.plan.kept.items()},
        "seconds": time.perf_counter() - t,
        "table_seconds": r.timings.get("latency"),
        "timings": dict(r.timings),
        "compile_flops_ratio": r.flops_ratio,
        **latency_figures(r),
    }


def tp_prune(model: Any, x: Any, ratio: float) -> Any:
    """Torch-Pruning's ``MetaPruner`` with L2 magnitude, global, the classifier ignored, on a copy."""
    import torch_pruning as tp

    sys.path.insert(0, str(Path(__file__).parent))
    import coverage as cov

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=True,
        ignored_layers=cov._classifier(m),
    )
    pruner.step()
    return m.eval()


def run_tp(model: Any, x: Any, base_flops: int, target: float, tol: float, steps: int) -> dict[str, Any]:
    """Torch-Pruning with its channel ratio bisected on [0, 0.95] until its FLOPs ratio is within ``tol``
    of ``target`` (at most ``steps`` runs); the run closest to ``target`` is kept."""
    import fxprune

    t = time.perf_counter()
    lo, hi = 0.0, 0.95
    best: tuple[float, float, Any] | None = None
    tried = []
    try:
        for _ in range(steps):
            mid = (lo + hi) / 2
            m = tp_prune(model, x, mid)
            f = fxprune.count_flops(m, (x,)) / base_flops
            tried.append({"ratio": mid, "flops_ratio": f})
            if best is None or abs(f - target) < abs(best[1] - target):
                best = (mid, f, m)
            if abs(f - target) <= tol:
                break
            lo, hi = (mid, hi) if f > target else (lo, mid)
    except Exception as exc:
        return {
            "ok": False,
            "seconds": time.perf_counter() - t,
            "error": f"{type(exc).__name__}: {exc}"[:400],
            "runs": tried,
        }
    assert best is not None
    return {"ok": True, "model": best[2], "ratio": best[0], "seconds": time.perf_counter() - t, "runs": tried}


# --- one model ---------------------------------------------------------------------------------------------


def bench_model(name: str, threads: int, args: argparse.Namespace, params: set[str]) -> dict[str, Any]:
    """Compile (a) and (b), prune (c), export all four with the original, time them interleaved."""
    import torch
    import torchvision

    import fxprune
    from fxprune.verify import export_onnx

    sys.path.insert(0, str(Path(__file__).parent))
    import coverage as cov

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    cov._nontrivial(model, x)
    base_flops = fxprune.count_flops(model, (x,))
    row: dict[str, Any] = {"model": name, "threads": threads, "input": list(x.shape), "flops": base_flops}
    by_latency = {"target_flops": None, "target_latency": args.latency}
    v: dict[str, dict[str, Any]] = {
        "flops": run_fxprune(model, x, threads, args.provider, params, target_flops=args.flops),
        "latency": run_fxprune(model, x, threads, args.provider, params, **by_latency),
    }
    again = run_fxprune(model, x, threads, args.provider, params, **by_latency)  # the tables now cached
    v["latency"]["again"] = {k: again.get(k) for k in ("ok", "error", "seconds", "table_seconds", "full_ms")}
    if again["ok"] and v["latency"]["ok"]:
        v["latency"]["again"]["same_plan"] = again["kept"] == v["latency"]["kept"]
    a = v["flops"]
    tp_target = (fxprune.count_flops(a["model"], (x,)) / base_flops) if a["ok"] else args.flops
    v["tp"] = (
        run_tp(model, x, base_flops, tp_target, args.tp_tol, args.tp_steps)
        if not args.no_tp
        else {"ok": False, "error": "--no-tp"}
    )
    # export, check, time
    names = ["original", *(k for k in VARIANTS if v[k]["ok"])]
    models = {"original": model, **{k: v[k]["model"] for k in names[1:]}}
    sessions, exporters = [], {}
    with torch.no_grad():
        for k in list(names):
            try:
                blob, exporters[k] = export_onnx(models[k], (x,))
                sess = make_session(blob, threads, args.provider)
                f = feeds_for(sess, (x,))
                err = ort_error(sess, f, models[k](x))
            except Exception as exc:
                if k == "original":
                    raise
                v[k].update(ok=False, error=f"ONNX: {type(exc).__name__}: {exc}"[:400])
                names.remove(k)
                continue
            sessions.append(sess)
            (v[k] if k != "original" else row).update({"exporter": exporters[k], "ort_rel_error": err})
    t = time.perf_counter()
    times, timer = interleaved(
        sessions, (x,), warmup=args.warmup, min_runs=args.runs, max_runs=args.max_runs, seconds=args.seconds
    )
    row["timing"] = {
        "rounds": len(times),
        "seconds": time.perf_counter() - t,
        "warmup": args.warmup,
        "timer": timer,
        "provider": sessions[0].get_providers()[0],
    }
    row["original_ms"] = spread(times[:, 0])
    for i, k in enumerate(names[1:], start=1):
        flops_ratio = fxprune.count_flops(models[k], (x,)) / base_flops
        ratio = spread(times[:, i] / times[:, 0])
        v[k].update(
            flops_ratio=flops_ratio,
            ms=spread(times[:, i]),
            latency_ratio=ratio,
            latency_over_flops=ratio["median"] / flops_ratio,
        )
    lat = v["latency"]
    if lat.get("latency_ratio") and lat.get("predicted_ms") is not None:
        lat["prediction_error"] = lat["predicted_ms"] / lat["ms"]["median"] - 1
        lat["predicted_ratio_error"] = lat["predicted_ratio"] / lat["latency_ratio"]["median"] - 1
        lat["full_ms_error"] = lat["full_ms"] / row["original_ms"]["median"] - 1
    row["variants"] = {
        k: {kk: vv for kk, vv in d.items() if kk not in ("model", "kept")} for k, d in v.items()
    }
    row["acceptance"] = acceptance(row["variants"])
    row["load_before"], row["load_after"] = list(load_before), list(os.getloadavg())
    return row


def acceptance(v: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """Issue 14's checks on one row (None where the figure is missing)."""
    a, b = v["flops"], v["latency"]
    ar, br = a.get("latency_ratio"), b.get("latency_ratio")
    err = b.get("predicted_ratio_error")
    first, second = b.get("table_seconds"), (b.get("again") or {}).get("table_seconds")
    return {
        "flops_latency_within_1.10": None if ar is None else ar["median"] <= FLOPS_SLACK * a["flops_ratio"],
        "latency_in_band": None if br is None else LATENCY_BAND[0] <= br["median"] <= LATENCY_BAND[1],
        "prediction_within_10pct": None if err is None else abs(err) <= PREDICTION_TOL,
        "first_tables_le_60s": None if first is None else first <= FIRST_TABLES_S,
        "second_tables_le_5s": None if second is None else second <= SECOND_TABLES_S,
    }


# --- report ------------------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("pass" if ok else "FAIL")


def table(rows: list[dict[str, Any]]) -> str:
    """One line per model, thread count and variant."""
    lines = [
        "| model | T | variant | FLOPs ratio | latency ratio [IQR] | latency ÷ FLOPs | ms [IQR] | predicted "
        "ratio | predicted vs measured ratio | ms err | latency stage s (first / second) | exporter | acceptance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["original_ms"]
        lines.append(
            f"| {r['model']} | {r['threads']} | original | 1 | 1 | 1 | {o['median']:.2f} "
            f"[{o['q1']:.2f}, {o['q3']:.2f}] | | | | | {r.get('exporter', '')} | |"
        )
        acc = r["acceptance"]
        for k in VARIANTS:
            d = r["variants"][k]
            if not d.get("latency_ratio"):
                lines.append(
                    f"| {r['model']} | {r['threads']} | {k} | | | | | | | | | | {d.get('error', '')[:90]} |"
                )
                continue
            lr, ms = d["latency_ratio"], d["ms"]
            tables = _f(d.get("table_seconds"), ".1f")
            if k == "flops":
                verdict = _mark(acc["flops_latency_within_1.10"])
            elif k == "latency":
                tables += f" / {_f((d.get('again') or {}).get('table_seconds'), '.1f')}"
                verdict = (
                    f"{_mark(acc['latency_in_band'])}; predicted {_mark(acc['prediction_within_10pct'])}; "
                    f"tables {_mark(acc['first_tables_le_60s'])} / {_mark(acc['second_tables_le_5s'])}"
                )
            else:
                verdict = ""
            err, ms_err = d.get("predicted_ratio_error"), d.get("prediction_error")
            lines.append(
                f"| {r['model']} | {r['threads']} | {k} | {d['flops_ratio']:.3f} | {lr['median']:.3f} "
                f"[{lr['q1']:.3f}, {lr['q3']:.3f}] | {d['latency_over_flops']:.2f} | {ms['median']:.2f} "
                f"[{ms['q1']:.2f}, {ms['q3']:.2f}] | {_f(d.get('predicted_ratio'))} | "
                f"{'' if err is None else f'{err:+.1%}'} | {'' if ms_err is None else f'{ms_err:+.1%}'} | {tables} | {d.get('exporter', '')} | {verdict} |"
            )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many rows pass each check (of those where it could be decided)."""
    out: dict[str, Any] = {"rows": len(rows)}
    for key in rows[0]["acceptance"] if rows else ():
        got = [r["acceptance"][key] for r in rows if r["acceptance"][key] is not None]
        out[key] = f"{sum(got)}/{len(got)} (undecided {len(rows) - len(got)})"
    out["all_pass"] = bool(rows) and all(all(r["acceptance"].values()) for r in rows)
    return out


def environment(args: argparse.Namespace, cache: str) -> dict[str, Any]:
    """Versions, CPU and thread settings of this run."""
    import onnxruntime
    import torch

    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = None
    return {
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "torch_pruning": tp_version,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads,
        "cache_dir": cache,
        "fresh_cache": args.cache is None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--size", type=int, default=224, help="input side (batch 1, 3 channels)")
    ap.add_argument("--threads", default="1,2", help="comma-separated ONNX Runtime intra-op thread counts")
    ap.add_argument("--flops", type=float, default=0.5, help="target_flops of (a)")
    ap.add_argument("--latency", type=float, default=0.5, help="target_latency of (b)")
    ap.add_argument("--runs", type=int, default=30, help="at least this many interleaved rounds")
    ap.add_argument("--max-runs", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0, help="keep timing rounds for this long")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs of each session first")
    ap.add_argument("--tp-tol", type=float, default=0.005, help="Torch-Pruning FLOPs ratio tolerance")
    ap.add_argument("--tp-steps", type=int, default=10, help="at most this many Torch-Pruning runs")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument(
        "--provider", default="cpu", help="ONNX Runtime provider of the timed sessions: cpu or cuda"
    )
    ap.add_argument("--cache", default=None, help="latency table cache (default: a fresh temporary one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    cache = args.cache or tempfile.mkdtemp(prefix="fxprune-latency-cache-")
    os.environ["FXPRUNE_CACHE"] = cache  # before fxprune is imported: the first compile builds the tables
    try:
        params = compile_parameters()
        env = environment(args, cache)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        t0, load0 = time.perf_counter(), os.getloadavg()
        config = {k: str(a) for k, a in vars(args).items()}
        result: dict[str, Any] = {
            "environment": env,
            "config": config,
            "rows": rows,
            "load_start": list(load0),
        }
        for name in args.models.split(","):
            for threads in args.threads:
                rows.append(bench_model(name, threads, args, params))
                print(table(rows[-1:]).split("\n", 2)[2], flush=True)
                result["summary"] = summary(rows)
                args.out.write_text(
                    json.dumps(result, indent=1)
                )  # after every row: a long run leaves results
        result.update(load_end=list(os.getloadavg()), wall_seconds=time.perf_counter() - t0)
        args.out.write_text(json.dumps(result, indent=1))
        print()
        print(table(rows))
        print(json.dumps(summary(rows), indent=1))
        print(
            f"load average {load0[0]:.2f} -> {result['load_end'][0]:.2f}; "
            f"wall {result['wall_seconds']:.0f} s; wrote {args.out}"
        )
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
