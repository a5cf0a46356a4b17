"""Coverage: every torchvision classification model at 50% FLOPs, fxprune and Torch-Pruning side by side.

    python bench/coverage.py [--family classification,segmentation,video,detection] [--models resnet18,...]
                             [--size 64] [--timeout 900] [--all] [--no-tp] [--out bench/results/coverage.json]

Families (``FAMILIES``: name -> its cases, each a ``Case``: builder, input, the outputs Torch-Pruning must
leave alone, which checks apply, and the two tool runners): ``classification`` (the default, every
torchvision classification model, as below), ``segmentation`` (``bench/segmentation.py``'s ``MODELS``) and
``video`` (``VIDEO``: torchvision's video classifiers at the smallest input each accepts), and
``detection``, which ``bench/detection.py`` drives (``run_detection``: the backbone + neck compiled inside
the full detector with ``submodules="backbone"``, its own checks and Torch-Pruning on the same backbone;
``--size`` is the image side, default 320; rows to ``--out`` with ``_detection`` added). A family other
than classification adds two checks independent of fxprune's verdict, as ``bench/segmentation.py`` does:
the pruned output's structure equals the original's (``output_signature``), and the pruned model equals
the masked original (``fxprune.masked_model``) within ``RTOL``; a case whose original model torch's ONNX
exporter cannot translate (``verify=False``, with the reason) is checked by that oracle alone. Rows of
classification go to ``--out``, of another family to ``--out`` with ``_<family>`` added to its stem.

Each model runs in two worker processes, fxprune then Torch-Pruning (eval mode, random init, batch 1), each
under a wall-clock ``--timeout`` and a resident-memory cap ``--max-gb``. Workers are forked from a
``multiprocessing`` fork server that has imported torch, torchvision, fxprune, Torch-Pruning and ONNX Runtime
once, so a worker starts in well under a second instead of importing them again.
The input is the smallest of ``SIZES`` the model accepts (or ``--size``; ``MIN_SIZE`` for windowed
attention); ``_nontrivial`` makes the random-init output informative (zero heads, BN statistics). fxprune:
``fxprune.compile(model, x, 0.5, score="magnitude", latency_runs=0)``; a model *passes* when it compiles,
ONNX Runtime agrees (max abs error <= 1e-4 x max|output|), achieved FLOPs <= 0.52 (torch's counter) and
the pruned model has strictly fewer parameters. The pinned-group reasons are recorded with node names
stripped, deduplicated and counted.

Torch-Pruning 1.6 (``MetaPruner``, ``MagnitudeImportance(p=2)``, ``global_pruning=True``, the 1000-way
classifier ignored) runs on the same model and input: a first ratio ``1 - sqrt(0.5)`` and one correction
that fits ``flops = (1 - ratio) ** alpha`` to the first outcome, so its FLOPs approach 0.5 as counted by
``fxprune.count_flops``. Its outcome (exception), achieved FLOPs ratio, and the wall time of the final run
are recorded. ``HEAVY`` models are recorded as not run unless ``--all``.

Timing, the same for both tools: one thread (``torch.set_num_threads(1)``), in a fresh worker that first
runs its tool once on a small toy net (``models_zoo.toy.ResidualNet``, 16x16; ``warmup_seconds``), so
neither timed call pays one-off costs (lazy imports, first-call initialisation of the dispatcher, the ONNX
exporter and ONNX Runtime). Wall time (``seconds``) and CPU time of the process (``cpu_seconds``; less
sensitive to other load on a shared machine) are recorded.
- fxprune: the whole ``fxprune.compile`` call: private copy of the model, input check with the FLOPs count,
  trace + shape/FLOPs propagation, dependency, cost, magnitude score, selection, rewrite, FLOPs count of
  the pruned model, and verification (TorchScript ONNX export, ONNX Runtime session and run, comparison);
  ``timings`` splits it by stage. "Without verify" subtracts ``timings["verify"]``.
- Torch-Pruning: ``MetaPruner(...)`` (its dependency graph, traced with a forward pass) and
  ``pruner.step()`` (importance and in-place pruning) of its final run; the deep copy of the model before
  it and the FLOPs count after it are not included. Every run's times are in ``runs``. This is the
  conservative comparison: the one call TP needs once the right ratio is known.
- Torch-Pruning "job" (``job_seconds``): that final run plus what it takes to get what one fxprune call
  gives when the ratio is known: a pruned model beside the untouched original (TP prunes in place: the
  deep copy) and its FLOPs (the count after it).
- Torch-Pruning "to target" (``target_seconds``): what it took here to get a model at 50% FLOPs out of
  Torch-Pruning, which takes a channel ratio, not a FLOPs target: counting the original FLOPs, then every
  run of the ratio search (a deep copy, since TP prunes in place; the pruning; the FLOPs count). fxprune
  takes the FLOPs target itself, so its one call is the whole job.
The summary gives the median fxprune/Torch-Pruning ratio with and without verify, in wall and CPU time,
against TP's final run, and against TP's time to target.

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZES = (64, 96, 128, 160, 224, 299)
#: windowed attention pads the token grid up to a multiple of the window below 224 (Swin: 64x64 gives a
#: 16x16 grid padded to 21x21, and 2x2 padded to 7x7 in the last stage), so most FLOPs would be padding
MIN_SIZE = {"swin_": 224}
HEAVY = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf")
FLOPS_OK = 0.52
RTOL = 1e-4


def _normalise_reason(reason: str) -> str:
    """A pin reason without node/tensor names, so the same cause counts once per kind."""
    return re.sub(r"'[^']*'", "'…'", reason)


def _exportable_pool(module: Any, args: Any, out: Any) -> None:
    """ONNX exports adaptive pooling only when the output size divides the input size."""
    hi, wi = args[0].shape[-2:]
    ho, wo = out.shape[-2:]
    if hi % ho or wi % wo:
        raise ValueError(f"adaptive pool {hi}x{wi} -> {ho}x{wo} is not exportable to ONNX")


def _smallest_input(model: Any, sizes: tuple[int, ...]) -> Any:
    """The smallest square input that runs and keeps every adaptive pool ONNX-exportable."""
    import torch

    pools = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)
    hooks = [m.register_forward_hook(_exportable_pool) for m in model.modules() if isinstance(m, pools)]
    last: Exception | None = None
    try:
        for s in sizes:
            x = torch.randn(1, 3, s, s)
            try:
                with torch.no_grad():
                    model(x)
                return x
            except Exception as exc:  # noqa: PERF203 - try the next size
                last = exc
    finally:
        for h in hooks:
            h.remove()
    raise RuntimeError(f"no input size in {sizes} runs: {last}")


def _nontrivial(model: Any, x: Any) -> None:
    """Make the random-init model's output informative, so that the ONNX Runtime check is not vacuous.

    torchvision zero-initialises some classifiers (ViT's head): every all-zero conv/linear weight gets
    ``N(0, 0.02)``. Deep BN nets at init shrink activations towards 0 (GoogLeNet's ``std=0.01`` weights):
    every BatchNorm takes its running means and one layer-wide variance from its input on ``x`` (one eval
    pass with pre-hooks) and random affine parameters, as ``tests/conftest.py::randomize_norms`` does.
    """
    import torch

    g = torch.Generator().manual_seed(0)

    def set_stats(m: Any, args: Any) -> None:
        # per-channel means, one variance for the layer: a quiet channel must not be amplified (a
        # per-channel variance near 0 makes deep nets chaotic, and ONNX Runtime's fused rounding then
        # differs from eager by O(1))
        t = args[0].detach().transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(t.mean(1))
        m.running_var.fill_(float(t.var(1, unbiased=False).mean()) + 1e-3)

    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (
                isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
                and w is not None
                and not w.any()
            ):
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        hooks = [m.register_forward_pre_hook(set_stats) for m in bns if m.running_mean is not None]
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _classifier(model: Any, num_classes: int = 1000) -> list[Any]:
    """The layers whose outputs are the model's outputs (their width is the number of classes)."""
    return [
        m
        for m in model.modules()
        if getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes
    ]


def _run_fxprune(model: Any, x: Any, case: Case | None = None) -> dict[str, Any]:
    """fxprune on ``model``; with a ``case`` that asks for them, the structure and masked-oracle checks."""
    import fxprune

    verify = case is None or case.verify
    t, c = time.perf_counter(), time.process_time()
    try:
        r = fxprune.compile(model, x, 0.5, score="magnitude", latency_runs=0, progress=False, verify=verify)
    except Exception as exc:
        return {
            "ok": False,
            "seconds": time.perf_counter() - t,
            "error": f"{type(exc).__name__}: {exc}"[:400],
        }
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    reasons: Counter[str] = Counter()
    pinned_channels = 0
    total_channels = 0
    for g in r.dependency.groups:
        total_channels += g.size
        if g.pinned:
            pinned_channels += g.size
            for why in dict.fromkeys(_normalise_reason(p) for p in g.pinned):
                reasons[why] += 1
    v = r.verification
    ort_ok = bool(v is not None and v.passed)
    flops = r.flops_ratio
    params = r.params_ratio
    row = {
        "ok": True,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "verify_cpu_seconds": r.cpu_timings["verify"],
        "flops_ratio": flops,
        "params_ratio": params,
        "ort_rel_error": None if v is None else v.max_rel_error,
        "ort_pass": ort_ok,
        "ort_error": None if v is None else v.error,
        "exporter": None if v is None else v.exporter,
        "passed": ort_ok and flops <= FLOPS_OK and r.params_after < r.params_before,
        "groups": len(r.dependency.groups),
        "prunable_groups": len(r.dependency.prunable),
        "pinned_channel_fraction": pinned_channels / max(1, total_channels),
        "pinned_reasons": dict(reasons.most_common()),
        "timings": r.timings,
    }
    if case is not None and case.oracle:
        try:
            checks = _oracle(model, x, r)
        except Exception as exc:  # recorded as a failed check, like a failed compile
            checks = {"structure_same": False, "differences": [], "oracle_pass": False,
                      "oracle_error": f"{type(exc).__name__}: {exc}"[:400]}  # fmt: skip
        ok = (ort_ok or not case.verify) and checks["structure_same"] and checks["oracle_pass"]
        row.update(checks, passed=ok and flops <= FLOPS_OK and r.params_after < r.params_before)
        if not case.verify:
            row["ort_error"] = f"not verified: {case.why_not_verified}"
    return row


def _oracle(model: Any, x: Any, r: Any) -> dict[str, Any]:
    """The pruned model against the user's: the same output structure (``output_signature``: containers,
    keys, shapes, dtypes), and equal to the masked original (``fxprune.masked_model``) within ``RTOL`` x
    max |output| over every output tensor."""
    import torch

    import fxprune
    from fxprune.data import output_differences, output_signature
    from fxprune.verify import flatten_outputs

    with torch.no_grad():
        want, got = model(x), r.graph_module(x)
        masked = fxprune.masked_model(model, r.plan)(x)
    diffs = output_differences(output_signature(want), output_signature(got))
    rel = max(
        float((g - m).abs().max() / m.abs().max().clamp_min(1e-12))
        for g, m in zip(flatten_outputs(got), flatten_outputs(masked), strict=True)
    )
    return {
        "structure_same": not diffs,
        "differences": diffs,
        "oracle_rel_error": rel,
        "oracle_pass": rel <= RTOL,
    }


def _tp_once(model: Any, x: Any, ratio: float, num_classes: int = 1000) -> dict[str, float]:
    """Torch-Pruning at ``ratio`` on a copy: FLOPs after, the pruning's wall and CPU seconds, and the
    seconds of the copy before it and of the FLOPs count after it."""
    import torch
    import torch_pruning as tp

    import fxprune

    t = time.perf_counter()
    m = copy.deepcopy(model)
    copy_s = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=True,
        ignored_layers=_classifier(m, num_classes),
    )
    pruner.step()
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    with torch.no_grad():
        flops = fxprune.count_flops(m, (x,))
    return {"flops": flops, "seconds": seconds, "cpu_seconds": cpu_seconds, "copy_seconds": copy_s,
            "count_seconds": time.perf_counter() - t}  # fmt: skip


def _run_tp(model: Any, x: Any, case: Case | None = None) -> dict[str, Any]:
    import fxprune

    num_classes = 1000 if case is None else case.num_classes
    t0, c0 = time.perf_counter(), time.process_time()
    base = fxprune.count_flops(model, (x,))
    ratio = 1 - math.sqrt(0.5)
    runs: list[dict[str, float]] = []

    def run(ratio: float) -> float:
        once = _tp_once(model, x, ratio, num_classes)
        runs.append({"ratio": ratio, "flops_ratio": once.pop("flops") / base, **once})
        return runs[-1]["flops_ratio"]

    try:
        f = run(ratio)
        if 0 < f < 1 and abs(f - 0.5) > 0.01:
            alpha = math.log(f) / math.log(1 - ratio)
            ratio = min(0.95, max(0.01, 1 - 0.5 ** (1 / alpha)))
            run(ratio)
            (a, fa), (b, fb) = ((r["ratio"], r["flops_ratio"]) for r in runs)
            if abs(fb - 0.5) > 0.01 and fa != fb:  # one secant step between the two runs
                run(min(0.95, max(0.01, a + (0.5 - fa) * (b - a) / (fb - fa))))
    except Exception as exc:
        return {
            "ok": False,
            "seconds": time.perf_counter() - t0,
            "error": f"{type(exc).__name__}: {exc}"[:400],
            "runs": runs,
        }
    best = min(runs, key=lambda r: abs(r["flops_ratio"] - 0.5))
    return {
        "ok": True,
        "seconds": runs[-1]["seconds"],
        "cpu_seconds": runs[-1]["cpu_seconds"],
        "job_seconds": runs[-1]["copy_seconds"] + runs[-1]["seconds"] + runs[-1]["count_seconds"],
        "target_seconds": time.perf_counter() - t0,
        "target_cpu_seconds": time.process_time() - c0,
        "flops_ratio": best["flops_ratio"],
        "ratio": best["ratio"],
        "runs": runs,
    }


def _warm_up(part: str) -> float:
    """Run the tool(s) of ``part`` once on a toy net (see the module docstring); returns the seconds."""
    import torch
    from fxprune.models_zoo.toy import ResidualNet

    t = time.perf_counter()
    toy, x = ResidualNet(num_classes=1000).eval(), torch.randn(1, 3, 16, 16)
    if part in ("fx", "both"):
        import fxprune

        fxprune.compile(toy, x, 0.5, score="magnitude", latency_runs=0, progress=False)
    if part in ("tp", "both"):
        _tp_once(toy, x, 0.3)
    return time.perf_counter() - t


def worker(name: str, size: int | None, part: str, family: str = "classification") -> dict[str, Any]:
    """One model in this process: ``part`` is ``"fx"`` (fxprune), ``"tp"`` (Torch-Pruning) or ``"both"``."""
    import torch

    case = cases(family)[name]
    warmup = _warm_up(part)
    torch.manual_seed(0)
    row: dict[str, Any] = {"model": name}
    model = case.build().eval()
    x = case.example(model, size)
    _nontrivial(model, x)
    row["input"] = list(x.shape)
    row["params"] = sum(p.numel() for p in model.parameters())
    if part in ("fx", "both"):
        row["fxprune"] = {**case.run_fx(model, x, case), "warmup_seconds": warmup}
    if part in ("tp", "both"):
        row["tp"] = {**case.run_tp(model, x, case), "warmup_seconds": warmup}
    return row


# --------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Case:
    """One model of a family.

    ``build()`` returns the model (random init); ``example(model, size)`` its input (``size``: ``--size``
    or None); ``num_classes``: the width of the layers whose outputs are the model's outputs, which
    Torch-Pruning leaves alone; ``verify``: fxprune's ONNX Runtime check (off only where torch's exporter
    cannot translate the *original* model: ``why_not_verified``); ``oracle``: the structure and
    masked-model checks (``_oracle``); ``run_fx`` / ``run_tp``: ``(model, x, case) -> row part`` (a
    family whose model needs another driver, e.g. a detector pruned inside the full model, brings its own).
    """

    build: Callable[[], Any]
    example: Callable[[Any, int | None], Any]
    num_classes: int = 1000
    verify: bool = True
    why_not_verified: str = ""
    oracle: bool = True
    run_fx: Callable[[Any, Any, Case], dict[str, Any]] = _run_fxprune
    run_tp: Callable[[Any, Any, Case], dict[str, Any]] = _run_tp


def _torchvision(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _square(floor: int = 0) -> Callable[[Any, int | None], Any]:
    """The smallest square of ``SIZES`` at or above ``floor`` that runs (``--size`` when given)."""

    def example(model: Any, size: int | None) -> Any:
        return _smallest_input(model, (size,) if size else tuple(s for s in SIZES if s >= floor))

    return example


def _fixed(shape: tuple[int, ...]) -> Callable[[Any, int | None], Any]:
    """A fixed input shape (video: ``N, C, T, H, W``; ``--size`` replaces ``H, W``)."""

    def example(model: Any, size: int | None) -> Any:
        import torch

        return torch.randn(*shape[:-2], *((size, size) if size else shape[-2:]))

    return example


def _classification() -> dict[str, Case]:
    import torchvision

    out = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        floor = max((v for k, v in MIN_SIZE.items() if name.startswith(k)), default=0)
        out[name] = Case(_torchvision(name), _square(floor), oracle=False)
    return out


def _segmentation() -> dict[str, Case]:
    from segmentation import MODELS

    return {
        name: Case(_torchvision(name, weights_backbone=None, **kw), _square(), num_classes=21)
        for name, kw in MODELS.items()
    }


#: video classifiers: the smallest input each accepts (r3d/mc3/r2plus1d downsample T by 8 and H, W by 16,
#: and take any size; s3d's last average pool is 2x7x7 over T/8 x H/32 x W/32; mvit_v2_s is built for
#: 16 x 224 x 224 only; swin3d_t: 4 x 56 x 56 has two windows along T, H, W in the first stage, so the
#: shifted windows and their mask are exercised)
VIDEO: dict[str, tuple[int, ...]] = {
    "r3d_18": (1, 3, 4, 32, 32),
    "mc3_18": (1, 3, 4, 32, 32),
    "r2plus1d_18": (1, 3, 4, 32, 32),
    "s3d": (1, 3, 16, 216, 216),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    "swin3d_t": (1, 3, 4, 56, 56),
}
#: torch's ONNX exporter mis-translates these original models (not fxprune's pruning): the masked oracle
#: is their check
NOT_EXPORTABLE = {
    "mvit_v2_s": "torch's exporter mis-translates the original model (ONNX Runtime: a Squeeze inside an If "
    "has shape {1,143,192}, computed {1,17,192})",
}


def _video() -> dict[str, Case]:
    return {
        name: Case(
            _torchvision(name),
            _fixed(shape),
            num_classes=400,
            verify=name not in NOT_EXPORTABLE,
            why_not_verified=NOT_EXPORTABLE.get(name, ""),
        )
        for name, shape in VIDEO.items()
    }


#: family name -> its cases (built on demand: torchvision is imported by the call)
FAMILIES: dict[str, Callable[[], dict[str, Case]]] = {
    "classification": _classification,
    "segmentation": _segmentation,
    "video": _video,
}


def cases(family: str) -> dict[str, Case]:
    """The cases of ``family`` (one of ``FAMILIES``)."""
    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    return FAMILIES[family]()


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


#: imported once by the fork server; every worker is forked from it with these already loaded
PRELOAD = [
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "torch_pruning",
    "fxprune",
    "fxprune.passes.op_table",
]
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _child(family: str, name: str, size: int | None, part: str, out: str, err: str) -> None:
    """Worker process body: stdout to /dev/null, stderr to ``err``, the row as JSON to ``out``."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_APPEND), 2)
    import torch

    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(worker(name, size, part, family)))


def run_part(
    name: str, part: str, args: argparse.Namespace, family: str = "classification"
) -> dict[str, Any]:
    """``worker(name, part)`` in a worker process under ``--timeout`` seconds and ``--max-gb`` of resident
    memory (polled; the machine is shared). A failure is returned as ``{"error": ...}``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        tmp = Path(f.name)
    with tempfile.NamedTemporaryFile(suffix=".err", delete=False) as f:
        err = Path(f.name)
    try:
        t = time.perf_counter()
        proc = _context().Process(target=_child, args=(family, name, args.size, part, str(tmp), str(err)))
        proc.start()
        why = None
        while proc.is_alive():
            proc.join(0.5)
            if not proc.is_alive():
                break
            if time.perf_counter() - t > args.timeout:
                why = f"timeout: over {args.timeout:.0f} s"
            elif _rss_gb(proc.pid) > args.max_gb:
                why = f"memory: over {args.max_gb:.0f} GB resident"
            if why:
                proc.kill()
                proc.join()
                break
        text = tmp.read_text()
        if text and why is None:
            return json.loads(text)
        if why is None:
            tail = err.read_text().strip().splitlines()[-1:] or ["no output"]
            why = f"crash rc={proc.exitcode}: {tail[0][:300]}"
        return {"error": why, "seconds": time.perf_counter() - t}
    finally:
        tmp.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], oracle: bool = False) -> str:
    """The markdown table; ``oracle`` adds the structure and masked-oracle columns (families other than
    classification)."""
    lines = [
        "| model | input | fxprune | FLOPs | params | ORT rel err | time s | w/o verify s | TP | TP FLOPs "
        "| TP time s | TP job s | TP to target s | exporter | why not |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if oracle:
        lines = [lines[0] + " structure = original | oracle rel err |", lines[1] + "---|---|"]
    for r in rows:
        fx_, tp = r.get("fxprune") or {}, r.get("tp") or {}
        status = r.get("status") or ("pass" if fx_.get("passed") else "fail")
        why = r.get("error") or fx_.get("error") or ""
        if not why and not fx_.get("passed") and fx_.get("pinned_reasons"):
            why = next(iter(fx_["pinned_reasons"]))
        tp_status = "" if not tp else ("ok" if tp.get("ok") else tp.get("error", "")[:60])
        inp = "x".join(str(s) for s in r.get("input", [])[2:])
        verify_s = (fx_.get("timings") or {}).get("verify", 0.0)
        no_verify = fx_["seconds"] - verify_s if fx_.get("ok") else None
        lines.append(
            f"| {r['model']} | {inp} | {status} | {_fmt(fx_.get('flops_ratio'))} | "
            f"{_fmt(fx_.get('params_ratio'))} | {_fmt(fx_.get('ort_rel_error'), '.1e')} | "
            f"{_fmt(fx_.get('seconds'), '.2f')} | {_fmt(no_verify, '.2f')} | {tp_status} | "
            f"{_fmt(tp.get('flops_ratio'))} | "
            f"{_fmt(tp.get('seconds'), '.2f')} | {_fmt(tp.get('job_seconds'), '.2f')} | "
            f"{_fmt(tp.get('target_seconds'), '.2f')} | "
            f"{fx_.get('exporter', '') if fx_.get('exporter', '') is not None else 'not verified'} | {why[:100]} |"
        )
        if oracle:
            same = fx_.get("structure_same")
            lines[-1] += (
                f" {'' if same is None else 'yes' if same else fx_.get('differences')} | "
                f"{_fmt(fx_.get('oracle_rel_error'), '.1e')} |"
            )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    fx_pass = [r["model"] for r in rows if (r.get("fxprune") or {}).get("passed")]
    tp_ok = [
        r["model"]
        for r in rows
        if (r.get("tp") or {}).get("ok") and abs(r["tp"]["flops_ratio"] - 0.5) <= 0.05
    ]
    both = [r for r in rows if (r.get("fxprune") or {}).get("ok") and (r.get("tp") or {}).get("ok")]

    def median_ratio(key: str, verify: bool, tp_key: str | None = None) -> float | None:
        ratios = []
        tp_key = tp_key or key
        for r in both:
            fx_, tp = r["fxprune"], r["tp"]
            if fx_.get(key) is None or not tp.get(tp_key):
                continue  # rows of runs before cpu_seconds / target_seconds were recorded
            stage = (
                fx_.get("timings", {}).get("verify", 0.0)
                if key == "seconds"
                else fx_.get("verify_cpu_seconds")
            )
            if stage is None:
                continue
            verify_s = 0.0 if verify else stage
            ratios.append((fx_[key] - verify_s) / tp[tp_key])
        return statistics.median(ratios) if ratios else None

    return {
        "models": n,
        "fxprune_pass": len(fx_pass),
        "tp_ok_flops_within_0.05_of_0.5": len(tp_ok),
        "tp_ran": sum(1 for r in rows if (r.get("tp") or {}).get("ok")),
        "timed_pairs": len(both),
        "median_time_ratio_fxprune_over_tp": median_ratio("seconds", True),
        "median_time_ratio_fxprune_over_tp_without_verify": median_ratio("seconds", False),
        "median_cpu_ratio_fxprune_over_tp": median_ratio("cpu_seconds", True),
        "median_cpu_ratio_fxprune_over_tp_without_verify": median_ratio("cpu_seconds", False),
        "median_time_ratio_fxprune_over_tp_job": median_ratio("seconds", True, "job_seconds"),
        "median_time_ratio_fxprune_over_tp_job_without_verify": median_ratio("seconds", False, "job_seconds"),
        "median_time_ratio_fxprune_over_tp_to_target": median_ratio("seconds", True, "target_seconds"),
        "median_cpu_ratio_fxprune_over_tp_to_target": median_ratio("cpu_seconds", True, "target_cpu_seconds"),
        "not_run": [r["model"] for r in rows if r.get("status") == "not run"],
    }


def merge(paths: list[str], out: Path, order: list[str]) -> None:
    """Rows of several runs (a later file wins for the same model), in ``order``; wall times add up."""
    by_model: dict[str, dict[str, Any]] = {}
    wall = 0.0
    for p in paths:
        d = json.loads(Path(p).read_text())
        wall += d.get("wall_seconds") or sum(r.get("wall_seconds", 0.0) for r in d["rows"])
        for r in d["rows"]:
            by_model[r["model"]] = r
    rows = [by_model[m] for m in order if m in by_model] + [r for m, r in by_model.items() if m not in order]
    result = {"rows": rows, "summary": summary(rows), "wall_seconds": wall, "merged_from": paths}
    out.write_text(json.dumps(result, indent=1))
    print(table(rows, oracle=any("structure_same" in (r.get("fxprune") or {}) for r in rows)))
    print(json.dumps(result["summary"], indent=1))
    print(f"wall time {wall:.0f} s (sum over the merged runs)")


def run_family(family: str, names: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every model of ``names`` (of ``family``): fxprune, then Torch-Pruning, each in a worker process;
    prints a row as each finishes and the table at the end, writes JSON to ``out`` as it goes."""
    oracle = family != "classification"
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in names:
        if name in HEAVY and not args.all:
            rows.append({"model": name, "status": "not run", "error": "heavy: pass --all"})
            continue
        t = time.perf_counter()
        row: dict[str, Any] = {"model": name}
        for part, key in (("fx", "fxprune"), ("tp", "tp")):
            if part == "tp" and args.no_tp:
                continue
            got = run_part(name, part, args, family)
            if "error" in got:
                row[key] = {"ok": False, "error": got["error"], "seconds": got["seconds"]}
            else:
                row.update({k: v for k, v in got.items() if k != "model"})
        row["wall_seconds"] = time.perf_counter() - t
        rows.append(row)
        print(table([row], oracle).splitlines()[-1], flush=True)
        out.write_text(json.dumps({"rows": rows, "summary": summary(rows)}, indent=1))
    result = {"rows": rows, "summary": summary(rows), "wall_seconds": time.perf_counter() - t_all}
    if oracle:
        result["family"] = family
    out.write_text(json.dumps(result, indent=1))
    print(table(rows, oracle))
    print(json.dumps(result["summary"], indent=1))
    print(f"wall time {result['wall_seconds']:.0f} s")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--family",
        default="classification",
        help=f"comma-separated families to run, of {', '.join([*FAMILIES, 'detection'])} (default: "
        "classification)",
    )
    ap.add_argument("--models", default=None, help="comma-separated (default: every model of the families)")
    ap.add_argument(
        "--size", type=int, default=None, help="input side (default: smallest of SIZES that runs)"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model (fxprune + TP)")
    ap.add_argument("--all", action="store_true", help=f"also run the heavy models {HEAVY}")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--max-gb", type=float, default=8.0, help="resident memory cap per subprocess (GB)")
    ap.add_argument("--part", default="both", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/coverage.json")
    ap.add_argument("--merge", nargs="+", default=None, help="merge the rows of earlier JSON runs into --out")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    families = args.family.split(",")

    if args.worker:
        import torch

        torch.set_num_threads(1)
        part = "fx" if args.no_tp and args.part == "both" else args.part
        row = worker(args.worker, args.size, part, families[0])
        Path(args.worker_out).write_text(json.dumps(row))
        return

    if args.merge:
        merge(args.merge, Path(args.out), list(cases(families[0])))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted = args.models.split(",") if args.models else None
    for family in families:
        if family == "detection":  # its own driver: the backbone pruned inside the full detector
            import detection

            names = [n for n in (wanted or list(detection.MODELS)) if n in detection.MODELS]
            if names:
                path = out.with_name(f"{out.stem}_detection{out.suffix}")
                detection.run_all(names, args.size or 320, 0.5, not args.no_tp, path)
            continue
        known = list(cases(family))
        names = known if wanted is None else [n for n in wanted if n in known or len(families) == 1]
        if not names:
            continue
        path = out if family == "classification" else out.with_name(f"{out.stem}_{family}{out.suffix}")
        run_family(family, names, args, path)


if __name__ == "__main__":
    main()
