"""Pruning early in training on the digits bench: the gradient-flow claims of Lubana & Dick ("A Gradient Flow
Framework for Analyzing Network Pruning", ICLR 2021) tested with fxprune's channel pruning.

Per digits model and seed, one training run of ``--epochs`` epochs is snapshotted after ``k`` epochs (``k`` in
``--after``, 0 = at initialisation) and at the end. Each snapshot is compiled to ``--target`` FLOPs by each
criterion with ``compensate="none"`` (the paper masks; nothing is folded into the kept weights) and
``cost_exponent=0`` for every criterion (a global ranking by the measure, as the paper's), then trained on
for the remaining epochs with the learning rates and batch order those epochs have in the full run
(``digits.train(start_epoch=k)``; the optimizer's momentum starts afresh). The end snapshot is not trained.
Before the prune, each snapshot's BatchNorm running statistics are recomputed on the training set
(``recalibrate_batchnorm``): early in training, at a high learning rate, the running averages lag the
weights (resnet20 after one epoch: an eval-mode loss of 130 and gradient norm of 2,700, against 1.5 at the
end), and fxprune scores in eval mode, so without it every data-driven score reads noise.

Criteria (the three families the paper analyses, plus the direction it warns about):
- ``magnitude``: the channel's group norm relative to its group's mean (``compile(score="magnitude")``).
- ``loss_preservation``: ``|theta . g|`` over the channel (``score="taylor"``; SNIP's measure).
- ``grad_norm``: ``|theta^T H g|``, the first-order change of ``||g||^2`` on removal (``score="grad_norm"``;
  the paper's gradient-norm *preserving* measure).
- ``grad_norm_raise``: signed ``theta^T H g``, removing first the channels whose removal raises ``||g||^2``
  most (GraSP's direction, which the paper argues gives poor models).

Measured per (model, seed, k, criterion): the training-set loss right after the prune (eval mode), the norm
of the loss gradient on the calibration batches before and after it, the training loss of every later
epoch, the final test accuracy, and the convergence speed: the mean training loss over the epochs after
the prune (the area under the curve; lower converges faster).

The claims and how each is decided (over the cells: model x seed x k with k < epochs; the ``margin`` on
accuracy is 0.5 points, about two test images):
1. *Magnitude-based pruning early in training gives models that converge faster* than the magnitude-agnostic
   measures: magnitude's mean training loss after the prune is below both loss-preservation's and
   grad_norm's. Confirmed if so in most cells at k <= 2, refuted if in few (<= a third), else mixed.
2. *Loss-preservation suits minimally trained models* (it preserves the loss, which early on is what
   matters): at k = 1 and 2, loss-preservation's loss right after the prune is the lowest of the criteria and
   its final accuracy is within the margin of the best. Decided as 1.
3. *Pruning that raises the gradient norm can give poor models*: grad_norm_raise raised ``||g||`` more than
   the other criteria and ends below every other criterion's final accuracy by more than the margin.
   Decided as 1.

    python bench/early_pruning.py                # 3 models x 2 seeds: resnet20 and mobilenetv2 took about 15
                                                 # minutes a seed each at --threads 1 beside two other jobs on
                                                 # 2 cores, densenet about three times that
    python bench/early_pruning.py --quick        # resnet20, one seed, k in (0, 1) (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxprune.models_zoo.digits import DIGITS_MODELS, Digits, batches, evaluate, load_digits_32, train
from fxprune.passes.masking import MaskedLoss
from fxprune.passes.score_hessian import GradNormScore
from fxprune.passes.stats import Sum

import fxprune

RESULTS = Path(__file__).parent / "results"
WEIGHT_DECAY = 5e-4
MARGIN = 0.005


class GradNormRaise(GradNormScore):
    """Signed ``theta^T H g`` per channel, shifted to be >= 0: the lowest first, i.e. the channels whose
    removal raises ``||g||^2`` most (removing channel ``c`` changes ``||g||^2 / 2`` by about ``-theta_c^T (H
    g)_c``)."""

    name = "grad_norm_raise"
    cost_exponent = 0.0

    def from_statistics(self, loss: MaskedLoss, stat: Sum) -> tuple[torch.Tensor, None]:
        (acc,) = stat.result()
        return acc - acc.min(), None


CRITERIA: dict[str, Any] = {
    "magnitude": "magnitude",
    "loss_preservation": "taylor",
    "grad_norm": "grad_norm",
    "grad_norm_raise": GradNormRaise,
}


def grad_norm(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||dL/dw||`` of the mean cross-entropy over the calibration batches, in eval mode (no weight decay)."""
    model = copy.deepcopy(model).eval()
    model.zero_grad(set_to_none=True)
    for xb, yb in calib:
        (F.cross_entropy(model(xb), yb) / len(calib)).backward()
    sq = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return sq**0.5


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Digits, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance as the plain average over the training set
    (train-mode forward passes, no gradient), in place; the model's mode and the norms' momentum are kept."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was = model.training
    model.train()
    for xb, _ in batches(data.x_train, data.y_train, batch_size):
        model(xb)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was)
    return model


def run_model(name: str, seed: int, data: Digits, args: argparse.Namespace) -> list[dict[str, Any]]:
    x1 = data.x_test[:1]
    calib = list(batches(data.x_train, data.y_train, 64, seed=7))[: args.calib_batches]
    torch.manual_seed(seed)
    model = DIGITS_MODELS[name]()
    snapshots = {0: copy.deepcopy(model)} if 0 in args.after else {}
    curve: list[float] = []

    def keep(epoch: int, loss: float) -> None:
        curve.append(loss)
        if epoch + 1 in args.after or epoch + 1 == args.epochs:
            snapshots[epoch + 1] = copy.deepcopy(model)

    t = time.perf_counter()
    train(model, data, epochs=args.epochs, weight_decay=WEIGHT_DECAY, seed=seed, progress=keep)
    rows = [{"model": name, "seed": seed, "k": None, "criterion": "unpruned", "final_acc": _acc(model, data),
             "train_curve": curve, "mean_train_loss": float(np.mean(curve)),
             "seconds": time.perf_counter() - t}]  # fmt: skip
    print(f"  unpruned: acc {rows[0]['final_acc']:.4f} in {rows[0]['seconds']:.0f}s", flush=True)
    for k in sorted(snapshots):
        snap = recalibrate_batchnorm(snapshots[k], data).eval()
        g_before = grad_norm(snap, calib)
        loss_before = evaluate(snap, data.x_train, data.y_train)[1]  # once per snapshot, not per criterion
        for crit, score in CRITERIA.items():
            t = time.perf_counter()
            opts = {} if crit == "magnitude" else {"weight_decay": WEIGHT_DECAY}
            res = fxprune.compile(snap, x1, args.target, score=score, data=calib, compensate="none",
                                  cost_exponent=0.0, verify=False, progress=False, **opts)  # fmt: skip
            pruned = res.graph_module
            loss_after = evaluate(pruned, data.x_train, data.y_train)[1]
            g_after = grad_norm(pruned, calib)
            later: list[float] = []
            accs: list[float] = []
            if k < args.epochs:

                def record(epoch: int, loss: float, _p: nn.Module = pruned, _l: list[float] = later,
                           _a: list[float] = accs) -> None:  # fmt: skip
                    _l.append(loss)
                    _a.append(_acc(_p, data))

                train(pruned, data, epochs=args.epochs, weight_decay=WEIGHT_DECAY, seed=seed, start_epoch=k,
                      progress=record)  # fmt: skip
            row = {"model": name, "seed": seed, "k": k, "criterion": crit, "flops": res.flops_ratio,
                   "loss_before": loss_before, "loss_after_prune": loss_after,
                   "grad_norm_before": g_before, "grad_norm_after": g_after,
                   "train_curve": later, "test_acc_curve": accs,
                   "mean_train_loss": float(np.mean(later)) if later else None,
                   "final_acc": _acc(pruned, data), "seconds": time.perf_counter() - t}  # fmt: skip
            rows.append(row)
            mtl = "-" if row["mean_train_loss"] is None else f"{row['mean_train_loss']:.4f}"
            print(f"  k={k} {crit:>17}: FLOPs {row['flops']:.3f}, loss after prune {loss_after:.3f}, "
                  f"||g|| {g_before:.3f} -> {g_after:.3f}, mean train loss {mtl}, "
                  f"final acc {row['final_acc']:.4f} ({row['seconds']:.0f}s)", flush=True)  # fmt: skip
    return rows


def _acc(model: nn.Module, data: Digits) -> float:
    return evaluate(model, data.x_test, data.y_test)[0]


def _verdict(hits: int, cells: int) -> str:
    if cells == 0:
        return "not tested"
    if hits * 2 > cells:
        return "confirmed"
    if hits * 3 <= cells:
        return "refuted"
    return "mixed"


def claims(rows: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """The three claims, decided over the cells (see the module doc)."""
    cells: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["k"] is not None:
            cells.setdefault((r["model"], r["seed"], r["k"]), {})[r["criterion"]] = r
    out = []
    # 1: magnitude converges fastest early
    early = [c for (m, s, k), c in cells.items() if k <= 2 and k < epochs and len(c) == len(CRITERIA)]
    hits1 = sum(
        c["magnitude"]["mean_train_loss"] < min(c["loss_preservation"]["mean_train_loss"],
                                                c["grad_norm"]["mean_train_loss"])
        for c in early
    )  # fmt: skip
    out.append({"claim": "magnitude-based pruning early in training converges faster (mean training loss after "
                "the prune below loss-preservation's and grad_norm's)", "cells": len(early), "hits": hits1,
                "verdict": _verdict(hits1, len(early))})  # fmt: skip
    # 2: loss-preservation on minimally trained models
    minimal = [c for (m, s, k), c in cells.items() if k in (1, 2) and k < epochs and len(c) == len(CRITERIA)]
    hits2 = 0
    for c in minimal:
        lowest = min(c, key=lambda n: c[n]["loss_after_prune"]) == "loss_preservation"
        best = max(r["final_acc"] for r in c.values())
        hits2 += lowest and c["loss_preservation"]["final_acc"] >= best - MARGIN
    out.append({"claim": "loss-preservation suits minimally trained models (k = 1, 2: the lowest loss right after "
                "the prune, final accuracy within 0.5 points of the best)", "cells": len(minimal), "hits": hits2,
                "verdict": _verdict(hits2, len(minimal))})  # fmt: skip
    # 3: raising the gradient norm gives poor models
    trained_on = [c for (m, s, k), c in cells.items() if k < epochs and len(c) == len(CRITERIA)]
    hits3 = 0
    for c in trained_on:
        raise_ = c["grad_norm_raise"]
        others = [r for n, r in c.items() if n != "grad_norm_raise"]
        rose_most = raise_["grad_norm_after"] > max(r["grad_norm_after"] for r in others)
        poorer = raise_["final_acc"] < min(r["final_acc"] for r in others) - MARGIN
        hits3 += rose_most and poorer
    out.append({"claim": "pruning that raises the gradient norm gives poor models (grad_norm_raise raised ||g|| "
                "most and ends more than 0.5 points below every other criterion)", "cells": len(trained_on),
                "hits": hits3, "verdict": _verdict(hits3, len(trained_on))})  # fmt: skip
    return out


def print_tables(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> None:
    print("\n| model | k (epochs before the prune) | criterion | FLOPs | loss after prune | ||g|| before -> after "
          "| mean train loss after | final test acc (mean over seeds) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["k"], r["criterion"]), []).append(r)
    for (m, k, crit), rs in groups.items():
        if k is None:
            print(f"| {m} | - | unpruned | 1.000 | - | - | {np.mean([r['mean_train_loss'] for r in rs]):.4f} | "
                  f"{np.mean([r['final_acc'] for r in rs]):.4f} |")  # fmt: skip
            continue
        mtl = [r["mean_train_loss"] for r in rs if r["mean_train_loss"] is not None]
        mtl_s = f"{np.mean(mtl):.4f}" if mtl else "-"
        g0, g1 = np.mean([r["grad_norm_before"] for r in rs]), np.mean([r["grad_norm_after"] for r in rs])
        print(f"| {m} | {k} | {crit} | {np.mean([r['flops'] for r in rs]):.3f} | "
              f"{np.mean([r['loss_after_prune'] for r in rs]):.3f} | {g0:.3f} -> {g1:.3f} | {mtl_s} | "
              f"{np.mean([r['final_acc'] for r in rs]):.4f} |")  # fmt: skip
    print("\n| claim | cells where it holds | verdict |")
    print("|---|---|---|")
    for v in verdicts:
        print(f"| {v['claim']} | {v['hits']} / {v['cells']} | {v['verdict']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(DIGITS_MODELS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--after", nargs="*", type=int, default=[0, 1, 2], help="epochs before the prune")
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resume", action="store_true", help="keep the (model, seed) runs already in --out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "early_pruning.json")
    args = ap.parse_args()
    if args.quick:
        args.models, args.seeds, args.after = args.models[:1], [0], [0, 1]
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_digits_32()
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    done = set()
    if args.resume and args.out.exists():  # a long run stopped part-way: keep its (model, seed) runs
        rows += json.loads(args.out.read_text())["rows"]
        done = {(r["model"], r["seed"]) for r in rows}
        print(f"resumed {len(done)} (model, seed) runs from {args.out}", flush=True)
    for seed in args.seeds:  # seed by seed, so a run cut short has every model
        for name in args.models:
            if (name, seed) in done:
                continue
            print(f"## {name} seed {seed}", flush=True)
            rows += run_model(name, seed, data, args)
            verdicts = claims(rows, args.epochs)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                            "torch_threads": torch.get_num_threads(), "rows": rows,
                                            "claims": verdicts}, indent=1))  # fmt: skip
    print_tables(rows, claims(rows, args.epochs))
    print(f"\n{time.perf_counter() - start:.0f}s; wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
