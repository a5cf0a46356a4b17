"""Pruning quality on real data: fxprune's scores vs Torch-Pruning's importances on scikit-learn digits.

For each models_zoo digits net (trained from scratch here, cached under bench/results/cache/), each FLOPs
target and each criterion, report test accuracy with no fine-tuning (fxprune: with and without
compensation), after a fixed short fine-tune, and the compile time; and, per model, the Spearman / Kendall
correlation between each criterion's per-channel prediction and the loss change measured by removing that
channel alone (no retraining; and after a fixed short warm-start retrain, relative to the same retrain with
nothing removed; the retrain uses the largest learning rate in ``RETRAIN_LRS`` under which that reference
retrain does not raise the loss). Each Spearman gets a 95% bootstrap interval over the units, and a paired
bootstrap (the same resamples) compares the default score with every other criterion. FLOPs are counted by
torch's counter for every tool; Torch-Pruning's global ratio is searched so that its FLOPs match the target.
The measured changes are cached under bench/results/cache/ (deterministic; the slowest part).

    python bench/quality.py                 # full run (under an hour on 2 idle CPU cores)
    python bench/quality.py --quick         # one model, one target, a few criteria (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxprune.models_zoo.digits import DIGITS_MODELS, Digits, batches, evaluate, load_digits_32, train
from fxprune.passes.masking import MaskedLoss
from fxprune.passes.score import auto_score
from scipy import stats

import fxprune

RESULTS = Path(__file__).parent / "results"
FX_SCORES = [
    "influence",
    "magnitude",
    "taylor",
    "fisher",
    "grad_norm",
    "sosp_h",
    "inf_cp",
    "ifso_code",
    "obs",
]
#: scores that take no weight_decay option (obs models the data loss alone, as the measured changes are)
NO_WEIGHT_DECAY = ("magnitude", "obs")
#: options under which a criterion scores each channel alone, for the single-channel correlation study, where
#: its default differs (obs: the marginal costs of a greedy removal order, joint=True, for selection)
SINGLE_CHANNEL: dict[str, dict[str, Any]] = {"obs": {"joint": False}}
TP_SCORES = ["tp_magnitude", "tp_taylor", "tp_hessian"]
WEIGHT_DECAY = 5e-4


def trained(name: str, data: Digits, epochs: int) -> nn.Module:
    cache = RESULTS / "cache" / f"{name}-e{epochs}.pt"
    model = DIGITS_MODELS[name]()
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        return model.eval()
    torch.manual_seed(0)
    model = DIGITS_MODELS[name]()
    train(model, data, epochs=epochs, weight_decay=WEIGHT_DECAY)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def fine_tune(model: nn.Module, data: Digits, steps: int, lr: float = 0.01) -> nn.Module:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
    model.train()
    done = 0
    for epoch in range(100):
        for xb, yb in batches(data.x_train, data.y_train, 64, seed=100 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
            if done >= steps:
                return model.eval()
    return model.eval()


# --- Torch-Pruning -----------------------------------------------------------------------------------------


def tp_importance(kind: str, model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    import torch_pruning as tp

    if kind == "tp_magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "tp_taylor":
        imp = tp.importance.TaylorImportance()
        model.zero_grad()
        for xb, yb in calib:
            F.cross_entropy(model(xb), yb).backward()
        return imp
    imp = tp.importance.HessianImportance()
    xb, yb = calib[0]
    for i in range(len(xb)):  # per-sample gradients, as Torch-Pruning's examples do
        model.zero_grad()
        F.cross_entropy(model(xb[i : i + 1]), yb[i : i + 1]).backward()
        imp.accumulate_grad(model)
    return imp


def tp_prune(kind: str, base: nn.Module, x: torch.Tensor, calib: list[Any], ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    imp = tp_importance(kind, model, calib)
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                  ignored_layers=fc)  # fmt: skip
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_at_target(kind: str, base: nn.Module, x: torch.Tensor, calib: list[Any], target: float) -> tuple[
    nn.Module, float
]:  # fmt: skip
    """Search Torch-Pruning's global channel ratio so that its FLOPs (torch's counter) meet the target."""
    full = fxprune.count_flops(base, (x,))
    lo, hi, best = 0.0, 0.95, None
    for _ in range(7):
        mid = (lo + hi) / 2
        m = tp_prune(kind, base, x, calib, mid)
        r = fxprune.count_flops(m, (x,)) / full
        if r <= target:
            best, hi = (m, r), mid
        else:
            lo = mid
    if best is None:
        m = tp_prune(kind, base, x, calib, hi)
        best = (m, fxprune.count_flops(m, (x,)) / full)
    return best


def tp_channel_scores(kind: str, base: nn.Module, x: torch.Tensor, calib: list[Any],
                      groups: list[Any]) -> dict[tuple[int, int], float]:  # fmt: skip
    """Torch-Pruning's per-channel importance, mapped onto fxprune's (group, channel) units."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    imp = tp_importance(kind, model, calib)
    names = {m: n for n, m in model.named_modules()}
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, global_pruning=True,
                                  ignored_layers=fc)  # fmt: skip
    by_producer = {}
    for g in groups:
        for s in g.sites:
            if s.role == "out" and s.dim == 0 and s.param.endswith(".weight"):
                by_producer[s.param[: -len(".weight")]] = (g.id, s.offset)
    out: dict[tuple[int, int], float] = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):  # fmt: skip
        values = imp(group)
        if values is None:
            continue
        root = group[0].dep.target.module
        idxs = group[0].idxs
        name = names.get(root)
        if name not in by_producer:
            continue
        gid, offset = by_producer[name]
        for i, v in zip(idxs, values.tolist(), strict=False):
            out[(gid, int(i) - offset)] = float(v)
    del tp
    return out


# --- the correlation oracle --------------------------------------------------------------------------------


#: retrain learning rates tried, largest first: the first one under which the retrain with nothing removed
#: does not raise the calibration loss is used (0.01 diverges on ResNet-20 with frozen BatchNorm statistics)
RETRAIN_LRS = (0.01, 0.003, 0.001, 0.0003)


def measured_changes(gm: Any, groups: Any, calib: Any, units: list[tuple[int, int]], retrain_steps: int,
                     lrs: tuple[float, ...] = RETRAIN_LRS) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """Loss change of removing each unit alone: without retraining, and after a warm-start retrain of
    ``retrain_steps`` SGD steps (minus the same retrain with nothing removed), with the learning rate used:
    the largest of ``lrs`` under which no retrain ends above the loss it started from (at 0.01 some of
    ResNet-20's diverged, to NaN, while the retrain with nothing removed did not)."""
    loss = MaskedLoss(gm, groups, calib, torch.device("cpu"), WEIGHT_DECAY)
    held = list(calib.batches)  # this measurement revisits the few calibration batches thousands of times

    def total(w: list[torch.Tensor], m: torch.Tensor) -> float:
        with torch.no_grad():
            return sum(float(calib.loss(loss.forward(w, m, b), b)) for b in held) / len(held)

    def retrained(m: torch.Tensor, lr: float) -> float:
        w = [p.detach().clone().requires_grad_(True) for p in loss.w0]
        opt = torch.optim.SGD(w, lr=lr, momentum=0.9)
        for step in range(retrain_steps):
            b = held[step % len(held)]
            opt.zero_grad()
            loss.objective(loss.forward(w, m, b), w, b).backward()
            opt.step()
        return total([p.detach() for p in w], m)

    ones = torch.ones(loss.size)
    base = total(loss.w0, ones)
    d_now = []
    masks = []
    for gid, c in units:
        m = ones.clone()
        m[loss.slices[gid].start + c] = 0
        masks.append(m)
        d_now.append(total(loss.w0, m) - base)
    for lr in lrs:  # the largest lr under which no retrain, with or without a unit removed, raises its loss
        base_rt = retrained(ones, lr)
        if not (math.isfinite(base_rt) and base_rt <= base):
            continue
        d_rt = []
        for m, now in zip(masks, d_now, strict=True):
            after = retrained(m, lr)
            if not (math.isfinite(after) and after <= base + now):
                break
            d_rt.append(after - base_rt)
        else:
            return np.array(d_now), np.array(d_rt), lr
    raise RuntimeError(f"a warm-start retrain raises the loss at every lr in {lrs}")


BOOTSTRAP = 1000


def _resamples(n: int) -> np.ndarray:
    """The same bootstrap resamples of ``n`` units for every criterion, so differences are paired."""
    return np.random.default_rng(0).integers(0, n, (BOOTSTRAP, n))


def _spearman(pred: np.ndarray, measured: np.ndarray) -> float:
    return float(stats.spearmanr(pred, measured).statistic)


def correlations(pred: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    """Spearman and Kendall, and a 95% bootstrap interval of Spearman over the units."""
    rho = _spearman(pred, measured)
    tau = stats.kendalltau(pred, measured).statistic
    boot = [_spearman(pred[i], measured[i]) for i in _resamples(len(pred))]
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return {"spearman": rho, "kendall": float(tau), "spearman_ci": [float(lo), float(hi)]}


def paired_differences(corr: list[dict[str, Any]], measured: dict[str, dict[str, list[float]]],
                       reference: str) -> list[dict[str, Any]]:  # fmt: skip
    """Per model: Spearman of ``reference`` minus each other criterion's, with the retrained loss change, on
    the same bootstrap resamples of the units (95% interval; the share of resamples where it is > 0)."""
    out = []
    for model, m in measured.items():
        target = np.array(m["retrained"])
        preds = {c["criterion"]: np.array(c["pred"], dtype=float) for c in corr if c["model"] == model}
        if reference not in preds:
            continue
        ref = preds[reference]
        for crit, pred in preds.items():
            ok = ~(np.isnan(pred) | np.isnan(ref))
            if crit == reference or ok.sum() < 3:
                continue
            idx = _resamples(int(ok.sum()))
            a, b, t = ref[ok], pred[ok], target[ok]
            diff = np.array([_spearman(a[i], t[i]) - _spearman(b[i], t[i]) for i in idx])
            lo, hi = np.nanpercentile(diff, [2.5, 97.5])
            out.append({"model": model, "reference": reference, "other": crit,
                        "difference": _spearman(a, t) - _spearman(b, t), "ci": [float(lo), float(hi)],
                        "share_above": float(np.nanmean(diff > 0))})  # fmt: skip
    return out


# --- main --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(DIGITS_MODELS))
    ap.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--criteria", nargs="*", default=FX_SCORES + TP_SCORES)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--units", type=int, default=30, help="channels sampled for the correlation study")
    ap.add_argument("--retrain-steps", type=int, default=10)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = ap.parse_args()
    if args.quick:
        args.models, args.targets = args.models[:1], [0.5]
        args.criteria = ["influence", "magnitude", "tp_magnitude"]
        args.units, args.retrain_steps, args.finetune_steps = 12, 5, 10
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_digits_32()
    x1 = data.x_test[:1]
    calib_batches = list(batches(data.x_train, data.y_train, 64, seed=7))[: args.calib_batches]
    rows: list[dict[str, Any]] = []
    corr: list[dict[str, Any]] = []
    measured: dict[str, dict[str, list[float]]] = {}
    for name in args.models:
        t = time.perf_counter()
        model = trained(name, data, args.epochs)
        acc0, loss0 = evaluate(model, data.x_test, data.y_test)
        print(f"## {name}: test accuracy {acc0:.4f}, loss {loss0:.4f} (trained/loaded in "
              f"{time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
        # the compile pipeline up to the channel groups, with the calibration data validated
        options = fxprune.CompileOptions(score="fisher", data=calib_batches, progress=False, target_flops=0.5)
        state = fxprune.COMPILE.until("dependency").run(
            fxprune.CompileState(model=model, example_input=x1, options=options)
        )
        gm, dep, calib = state.gm, state.dep, state.calib
        prunable = [g for g in dep.groups if g.prunable]
        rng = np.random.default_rng(0)
        all_units = [(g.id, c) for g in prunable for c in range(g.size)]
        units = [all_units[i] for i in sorted(rng.choice(len(all_units), min(args.units, len(all_units)),
                                                          replace=False))]  # fmt: skip
        t = time.perf_counter()
        key = f"e{args.epochs}-measured2-u{args.units}-r{args.retrain_steps}-c{args.calib_batches}"
        cache = RESULTS / "cache" / f"{name}-{key}.npz"
        # deterministic and the slowest part: reused ("measured2": retrains that raise their loss are refused)
        if cache.exists():
            z = np.load(cache)
            d_now, d_rt, lr = z["now"], z["retrained"], float(z["lr"])
        else:
            d_now, d_rt, lr = measured_changes(gm, dep.groups, calib, units, args.retrain_steps)
            np.savez(cache, now=d_now, retrained=d_rt, lr=lr)
        measured[name] = {"now": d_now.tolist(), "retrained": d_rt.tolist()}
        print(f"measured {len(units)} single-channel removals in {time.perf_counter() - t:.0f}s "
              f"(retrain {args.retrain_steps} steps at lr {lr}; cache {cache.name})", flush=True)  # fmt: skip
        for crit in args.criteria:
            row_common = {"model": name, "criterion": crit, "acc_full": acc0}
            if crit.startswith("tp_"):
                t = time.perf_counter()
                ch = tp_channel_scores(crit, model, x1, calib_batches, dep.groups)
                pred = np.array([ch.get(u, np.nan) for u in units])
                ok = ~np.isnan(pred)
                c_now = correlations(pred[ok], d_now[ok]) if ok.sum() > 2 else {}
                c_rt = correlations(pred[ok], d_rt[ok]) if ok.sum() > 2 else {}
                corr.append({**row_common, "retrain_lr": lr, "units": int(ok.sum()), "pred": _listed(pred),
                             "no_retrain": c_now,
                             "retrained": c_rt})  # fmt: skip
                for target in args.targets:
                    t = time.perf_counter()
                    pruned, ratio = tp_at_target(crit, model, x1, calib_batches, target)
                    secs = time.perf_counter() - t
                    acc, _ = evaluate(pruned, data.x_test, data.y_test)
                    acc_ft, _ = evaluate(
                        fine_tune(pruned, data, args.finetune_steps), data.x_test, data.y_test
                    )
                    rows.append({**row_common, "target": target, "flops": ratio, "acc": acc, "acc_comp": None,
                                 "acc_ft": acc_ft, "seconds": secs})  # fmt: skip
                    _print_row(rows[-1])
                continue
            options: dict[str, Any] = {"weight_decay": WEIGHT_DECAY} if crit not in NO_WEIGHT_DECAY else {}
            t = time.perf_counter()  # the scores, once per criterion (compile time includes scoring)
            first = fxprune.compile(model, x1, 0.5, score=crit, data=calib_batches, compensate="none",
                                    verify=False, progress=False, **options)  # fmt: skip
            first_secs = time.perf_counter() - t
            single = first
            if crit in SINGLE_CHANNEL:  # the correlation study removes one channel at a time
                single = fxprune.compile(model, x1, 0.5, score=crit, data=calib_batches, compensate="none",
                                         verify=False, progress=False, **options, **SINGLE_CHANNEL[crit])  # fmt: skip
            pred = np.array([single.scores[g].mean[c] for g, c in units])
            corr.append({**row_common, "retrain_lr": lr, "units": len(units), "pred": _listed(pred),
                         "no_retrain": correlations(pred, d_now),
                         "retrained": correlations(pred, d_rt)})  # fmt: skip
            for target in args.targets:
                results = {
                    comp: fxprune.compile(model, x1, target, score=crit, data=calib_batches, compensate=comp,
                                          verify=False, progress=False, scores=first.scores, **options)
                    for comp in ("none", "bias", "lsq", "lsq_independent")
                }  # fmt: skip
                acc = evaluate(results["none"].graph_module, data.x_test, data.y_test)[0]
                acc_b = evaluate(results["bias"].graph_module, data.x_test, data.y_test)[0]
                acc_l = evaluate(results["lsq"].graph_module, data.x_test, data.y_test)[0]
                acc_li = evaluate(results["lsq_independent"].graph_module, data.x_test, data.y_test)[0]
                ft = fine_tune(results["none"].graph_module, data, args.finetune_steps)
                acc_ft = evaluate(ft, data.x_test, data.y_test)[0]
                rows.append({**row_common, "target": target, "flops": results["none"].flops_ratio, "acc": acc,
                             "acc_comp": acc_b, "acc_lsq": acc_l, "acc_lsq_ind": acc_li, "acc_ft": acc_ft, "seconds": first_secs})  # fmt: skip
                _print_row(rows[-1])
        _write(args, rows, corr, measured)  # after every model, so a long run leaves usable results
    _print_tables(rows, corr)
    _print_paired(paired_differences(corr, measured, auto_score(labelled=True)))
    print(f"\nwrote {args.out}")


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], corr: list[dict[str, Any]],
           measured: dict[str, dict[str, list[float]]]) -> None:  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    paired = paired_differences(corr, measured, auto_score(labelled=True))
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "correlations": corr, "measured": measured, "paired": paired},
                                   indent=1))  # fmt: skip


def _listed(pred: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in pred]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_row(r: dict[str, Any]) -> None:
    print("  ", " ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("acc_full",)), flush=True)


def _ci(c: dict[str, Any]) -> str:
    lo, hi = c.get("spearman_ci", (None, None))
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _print_paired(paired: list[dict[str, Any]]) -> None:
    print("\n| model | default minus | Spearman difference (retrained) | 95% bootstrap | share > 0 |")
    print("|---|---|---|---|---|")
    for p in paired:
        lo, hi = p["ci"]
        print(f"| {p['model']} | {p['other']} | {p['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
              f"{p['share_above']:.2f} |")  # fmt: skip


def _print_tables(rows: list[dict[str, Any]], corr: list[dict[str, Any]]) -> None:
    print(
        "\n| model | target | criterion | FLOPs | acc (no FT) | acc +bias | acc +lsq | acc +lsq_independent "
        "| acc FT | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['target']} | {r['criterion']} | {_fmt(r['flops'])} | {_fmt(r['acc'])} | "
            f"{_fmt(r.get('acc_comp'))} | {_fmt(r.get('acc_lsq'))} | {_fmt(r.get('acc_lsq_ind'))} | {_fmt(r['acc_ft'])} | {r['seconds']:.1f} |"
        )
    print(
        "\n| model | criterion | units | Spearman (no retrain) | Kendall | Spearman (retrained) | 95% bootstrap "
        "| Kendall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in corr:
        a, b = c["no_retrain"], c["retrained"]
        print(
            f"| {c['model']} | {c['criterion']} | {c['units']} | {_fmt(a.get('spearman'))} | "
            f"{_fmt(a.get('kendall'))} | {_fmt(b.get('spearman'))} | {_ci(b)} | {_fmt(b.get('kendall'))} |"
        )


if __name__ == "__main__":
    main()
