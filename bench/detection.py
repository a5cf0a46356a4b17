"""torchvision's detectors: the backbone (with its FPN or SSD extras) pruned inside the full model.

    python bench/detection.py [--models fasterrcnn_resnet50_fpn,...] [--size 320] [--target 0.5]
                              [--no-tp] [--out bench/results/detection.json]

A detector's forward does not trace (image resizing, anchors, NMS are data-dependent); its ``backbone``
does. Each model (random init: ``weights=None, weights_backbone=None``, eval mode, images resized to
``--size``) is compiled with ``fxprune.compile(model, x, target, submodules="backbone")`` on one fixed
``1 x 3 x size x size`` image and checked, each independently of fxprune's own verdict:

- **FLOPs**: the backbone + neck's FLOPs on its recorded call, before and after, counted by torch's
  ``FlopCounterMode`` (``fxprune.count_flops``) on the two modules themselves: must be <= ``MAX_FLOPS``
  (0.55) of the original's. The whole detector's FLOPs on the image are reported beside them, against
  the original and against the masked original: after the backbone, a detector's FLOPs depend on how
  many proposals survive NMS (the RoI heads run once per proposal), which pruning changes with the
  features; the masked original has the pruned model's proposals, so against it the whole model saves
  exactly the backbone's FLOPs;
- **oracle**: every output of the pruned detector (boxes, scores, labels; masks; keypoints and their
  scores) equals the *masked* original's (``fxprune.masked_model(model, result.plan)``: the original with
  the removed channels zeroed in every consumer): the same number of detections, labels equal, and every
  float output within ``ORACLE_RTOL`` x its max |value|. Random-init detectors score every box below the
  default thresholds, so the score thresholds are set to 0 (``box_score_thresh`` / ``score_thresh``) with
  the default detection caps: the comparison covers a full set of detections (``detections``, asserted
  > 0), and masking must change the original's boxes (``masking_changes``: else the oracle is vacuous);
  ``informative`` gives every BatchNorm non-trivial statistics first (SSDlite's small-init activations
  fade to nothing otherwise);
  detections are matched, not compared by position (candidates whose scores tie to float precision
  leave NMS / top-k in either order: ``reordered``);
- **ORT**: ONNX Runtime against eager on the compiled backbone (``result.verification``, ``rtol=1e-4``).

Torch-Pruning (``MetaPruner``, ``MagnitudeImportance(p=2)``, ``global_pruning=True``) runs on the same
backbone and recorded call, with the convolutions that produce the backbone's outputs ignored (found by
output identity; the heads need their channel counts), its ratio searched as in ``bench/coverage.py`` (a
first ratio, one power-law correction, one secant step) towards ``--target`` of the FLOPs: its FLOPs ratio,
whether every output keeps its shape (the detector's heads still fit), and its seconds.

``run_detection(name, ...)`` is one model (importable: ``bench/coverage.py --family detection``).
Prints a markdown table and writes JSON; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

import fxprune
from fxprune.data import output_signature
from fxprune.verify import flatten_outputs

ROOT = Path(__file__).resolve().parent.parent
#: constructor keywords that make every box a detection (random init scores everything near 1/classes)
MODELS: dict[str, dict[str, Any]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0},
    "fasterrcnn_resnet50_fpn": {"box_score_thresh": 0.0},
    "retinanet_resnet50_fpn": {"score_thresh": 0.0},
    "fcos_resnet50_fpn": {"score_thresh": 0.0},
    "ssdlite320_mobilenet_v3_large": {},  # its builder passes keywords to the backbone too: set after
    "maskrcnn_resnet50_fpn": {"box_score_thresh": 0.0},
    "keypointrcnn_resnet50_fpn": {"box_score_thresh": 0.0},
}
#: the submodule compiled: the backbone with its neck (FPN, or SSD's extra layers)
SUBMODULE = "backbone"
ORACLE_RTOL = 1e-4
MAX_FLOPS = 0.55


def build(name: str, size: int) -> torch.nn.Module:
    """The random-init detector ``name`` in eval mode, resizing images to ``size`` (SSDlite: 320 fixed),
    with score thresholds of 0 (every candidate up to the default detection cap is returned)."""
    torch.manual_seed(0)
    kwargs = dict(MODELS[name])
    if not name.startswith("ssd"):
        kwargs.update(min_size=size, max_size=size)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **kwargs)
    if name.startswith("ssd"):
        model.score_thresh = 0.0
    return model.eval()


def informative(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Non-trivial BatchNorm statistics, so that the backbone's channels matter to the detections.

    A random-init detector's fresh BatchNorms are near the identity and some builders initialise weights
    small (SSDlite: ``N(0, 0.03)``), so activations fade with depth and the detections barely depend on
    the backbone (masking a channel then changes nothing: a vacuous oracle). As ``bench/coverage.py``
    does, every BatchNorm takes per-channel running means and one layer-wide variance from its input on
    ``x`` (one eval pass with pre-hooks) and random affine parameters."""
    g = torch.Generator().manual_seed(0)

    def set_stats(m: Any, args: Any) -> None:
        t = args[0].detach().transpose(0, 1).reshape(m.num_features, -1)
        m.running_mean.copy_(t.mean(1))
        m.running_var.fill_(float(t.var(1, unbiased=False).mean()) + 1e-3)

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(set_stats) for m in bns if m.running_mean is not None]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def image(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def backbone_call(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The arguments the detector passes to its backbone on ``x`` (a forward hook)."""
    seen: list[tuple[torch.Tensor, ...]] = []

    def hook(module: Any, args: tuple[torch.Tensor, ...], output: Any) -> None:
        seen.append(tuple(a.detach().clone() for a in args))

    h = model.get_submodule(SUBMODULE).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0]


def _match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[int] | None:
    """For each detection of ``want``, in order, the first unused detection of ``got`` with the same label
    and score and box within ``ORACLE_RTOL`` x max |value|; None when one has no match. Candidates whose
    scores tie to float precision may come out of NMS / top-k in either order, so detections are matched,
    not compared by position."""
    tol_s = ORACLE_RTOL * max(float(want["scores"].abs().max()), 1e-12)
    tol_b = ORACLE_RTOL * max(float(want["boxes"].abs().max()), 1e-12)
    used: set[int] = set()
    order = []
    for k in range(len(want["boxes"])):
        close = (
            (got["labels"] == want["labels"][k])
            & ((got["scores"] - want["scores"][k]).abs() <= tol_s)
            & ((got["boxes"] - want["boxes"][k]).abs().amax(1) <= tol_b)
        )
        j = next((int(j) for j in close.nonzero().flatten() if int(j) not in used), None)
        if j is None:
            return None
        used.add(j)
        order.append(j)
    return order


def compare(got: Any, want: Any) -> dict[str, Any]:
    """Detections of the pruned model against the masked original's, image by image: the same count, each
    detection matched (``_match``: same label, score and box within ``ORACLE_RTOL``), and every float
    output of matched detections (boxes, scores, masks, keypoints, keypoint scores) within ``ORACLE_RTOL``
    x that output's max |value|; ``reordered`` counts detections matched at another position."""
    out: dict[str, Any] = {
        "keys": sorted({k for d in want for k in d}),
        "detections": sum(len(d["boxes"]) for d in want),
        "same_counts": [len(g["boxes"]) for g in got] == [len(w["boxes"]) for w in want],
        "matched": True,
        "reordered": 0,
        "max_rel_error": None,
    }
    worst = 0.0
    if out["same_counts"]:
        for g, w in zip(got, want, strict=True):
            order = _match(g, w)
            if order is None:
                out["matched"] = False
                break
            out["reordered"] += sum(1 for k, j in enumerate(order) if k != j)
            idx = torch.tensor(order, dtype=torch.long)
            for key, wt in w.items():
                gt = g[key][idx]
                if not wt.is_floating_point():
                    out["matched"] &= torch.equal(gt, wt)
                    continue
                scale = float(wt.abs().max()) if wt.numel() else 0.0
                err = float((gt - wt).abs().max()) if wt.numel() else 0.0
                worst = max(worst, err / scale if scale > 0 else err)
        out["max_rel_error"] = worst
    out["pass"] = bool(
        out["same_counts"] and out["matched"] and worst <= ORACLE_RTOL and out["detections"] > 0
    )
    return out


def _output_convs(backbone: torch.nn.Module, call: tuple[torch.Tensor, ...]) -> list[torch.nn.Module]:
    """The convolutions whose output tensors are outputs of ``backbone`` (Torch-Pruning must not prune
    them: the heads read those channels)."""
    produced: dict[int, torch.nn.Module] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o: produced.__setitem__(id(o), mod))
        for m in backbone.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            outs = backbone(*call)
    finally:
        for h in hooks:
            h.remove()
    return [produced[id(t)] for t in flatten_outputs(outs) if id(t) in produced]


def run_torch_pruning(
    backbone: torch.nn.Module, call: tuple[torch.Tensor, ...], target: float
) -> dict[str, Any]:
    """Torch-Pruning on a copy of ``backbone`` at the channel ratio whose FLOPs approach ``target``."""
    import torch_pruning as tp

    base = fxprune.count_flops(backbone, call)
    with torch.no_grad():
        want = output_signature(backbone(*call))
    runs: list[dict[str, Any]] = []

    def run(ratio: float) -> float:
        m = copy.deepcopy(backbone)
        t = time.perf_counter()
        pruner = tp.pruner.MetaPruner(m, call, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, global_pruning=True,
                                      ignored_layers=_output_convs(m, call))  # fmt: skip
        pruner.step()
        seconds = time.perf_counter() - t
        with torch.no_grad():
            same = output_signature(m(*call)) == want
        runs.append({"ratio": ratio, "flops_ratio": fxprune.count_flops(m, call) / base, "seconds": seconds,
                     "outputs_same": same})  # fmt: skip
        return float(runs[-1]["flops_ratio"])

    t0 = time.perf_counter()
    try:
        ratio = 1 - math.sqrt(target)
        f = run(ratio)
        if 0 < f < 1 and abs(f - target) > 0.01:
            alpha = math.log(f) / math.log(1 - ratio)
            run(min(0.95, max(0.01, 1 - target ** (1 / alpha))))
            (a, fa), (b, fb) = ((r["ratio"], r["flops_ratio"]) for r in runs)
            if abs(fb - target) > 0.01 and fa != fb:
                run(min(0.95, max(0.01, a + (target - fa) * (b - a) / (fb - fa))))
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400], "runs": runs}
    best = min(runs, key=lambda r: abs(r["flops_ratio"] - target))
    return {"ok": True, **best, "target_seconds": time.perf_counter() - t0, "runs": runs}


def run_detection(
    name: str, size: int = 320, target: float = 0.5, torch_pruning: bool = True
) -> dict[str, Any]:
    """Compile ``name``'s backbone inside the detector at ``target`` and check it (module doc); a dict of
    the measurements with ``pass``."""
    model, x = build(name, size), image(size)
    informative(model, x)
    call = backbone_call(model, x)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fxprune.compile(model, x, target, submodules=SUBMODULE, latency_runs=0, progress=False)
    seconds = time.perf_counter() - t
    pruned = r.model.get_submodule(SUBMODULE)
    before = fxprune.count_flops(model.get_submodule(SUBMODULE), call)
    after = fxprune.count_flops(pruned, call)
    oracle_model = fxprune.masked_model(model, r.plan)
    with torch.no_grad():
        got, masked, orig = r.model(x), oracle_model(x), model(x)
    masked_flops = fxprune.count_flops(oracle_model, (x,))
    oracle = compare(got, masked)
    changes = not (
        [len(d["boxes"]) for d in orig] == [len(d["boxes"]) for d in masked]
        and all(
            torch.equal(a, b) for a, b in zip(flatten_outputs(orig), flatten_outputs(masked), strict=True)
        )
    )
    v = r.verification[SUBMODULE]
    part = r.parts[SUBMODULE]
    row: dict[str, Any] = {
        "model": name,
        "input": list(x.shape),
        "backbone_input": [list(c.shape) for c in call],
        "backbone_flops_before": before,
        "backbone_flops_after": after,
        "backbone_flops_ratio": after / before,
        "fxprune_flops_ratio": part.flops_ratio,
        "model_flops_before": r.model_flops_before,
        "model_flops_after": r.model_flops_after,
        "model_flops_ratio": r.model_flops_ratio,
        "model_flops_masked": masked_flops,
        "model_flops_ratio_vs_masked": r.model_flops_after / masked_flops,
        "params_ratio": r.params_ratio,
        "backbone_params_ratio": part.params_ratio,
        "oracle": oracle,
        "masking_changes": changes,
        "ort_pass": v is not None and v.passed,
        "ort_max_rel_error": None if v is None else v.max_rel_error,
        "exporter": None if v is None else v.exporter,
        "pinned_groups": sum(1 for g in part.groups if not g.prunable),
        "seconds": seconds,
        "timings": r.timings,
        "part_timings": part.timings,
    }
    row["pass"] = bool(oracle["pass"] and changes and row["ort_pass"] and after <= MAX_FLOPS * before)
    if torch_pruning:
        row["torch_pruning"] = run_torch_pruning(model.get_submodule(SUBMODULE), call, target)
    return row


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | backbone FLOPs (torch) | model FLOPs (vs masked) | detections | max rel err vs masked | ORT | compile s "
        "| TP FLOPs | TP outputs kept | TP s | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} | | | | | | | | | FAIL |")
            continue
        o, tp = r["oracle"], r.get("torch_pruning") or {}
        tp_cells = (
            f"{_fmt(tp.get('flops_ratio'))} | {tp.get('outputs_same')} | {_fmt(tp.get('seconds'), '.1f')}"
            if tp.get("ok")
            else (f"{tp.get('error', '')[:40]} | | " if tp else "- | - | -")
        )
        lines.append(
            f"| {r['model']} | {r['backbone_flops_ratio']:.3f} | {r['model_flops_ratio']:.3f} "
            f"({r['model_flops_ratio_vs_masked']:.3f}) | {o['detections']} "
            f"({'matched' if o['matched'] and o['same_counts'] else 'DIFFER'}, {o['reordered']} reordered) | "
            f"{_fmt(o['max_rel_error'], '.2e')} | "
            f"{'pass' if r['ort_pass'] else 'FAIL'} | {r['seconds']:.1f} | {tp_cells} | "
            f"{'PASS' if r['pass'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def run_all(
    names: list[str], size: int, target: float, torch_pruning: bool, out: Path
) -> list[dict[str, Any]]:
    """``run_detection`` for every model of ``names``; prints a row as each finishes and the table at the
    end, writes JSON to ``out``. A model that raises is a failed row, not the end of the bench."""
    torch.set_num_threads(1)
    rows = []
    for name in names:
        try:
            row = run_detection(name, size, target, torch_pruning=torch_pruning)
        except Exception as exc:
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:400], "pass": False}
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"size": size, "target": target, "oracle_rtol": ORACLE_RTOL, "max_flops": MAX_FLOPS,
            "torch": torch.__version__, "torchvision": torchvision.__version__}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection.json"))
    args = p.parse_args()
    rows = run_all(args.models.split(","), args.size, args.target, not args.no_tp, Path(args.out))
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
