"""Soak test: the property of ``tests/test_fuzz.py`` on thousands of random architectures.

    python bench/fuzz.py [--examples 2000] [--seed 0] [--data-every 10] [--upsampling] [--out bench/results/fuzz.json]

Each example draws a random net (``fxprune.models_zoo.random_nets``) and a target in [0.3, 1.0] and runs
``check_compile`` (every ``--data-every``-th example with a data-driven score and bias compensation, the
rest with ``score="magnitude"``). The nets return their outputs in every container form
(``random_nets.OUTPUTS``: tensor/tuple, list, dict, OrderedDict, nested, namedtuple, dataclass), one to
three of them, from the end or the middle of the net; the table counts each form. Outcomes: ``pruned`` / ``unpruned`` (all checks passed), a typed fxprune
error by class (only ``TargetError`` for an unreachable target is acceptable, and it is checked), or a
*failure*: any assertion of the property or any other exception, recorded with the readable spec.
``--upsampling`` draws dense-prediction nets (``net_specs(upsampling=True)``: transposed convs, pixel
(un)shuffle, interpolation, concatenated skips) and counts the up-sampling ops the nets hold.
Prints a markdown table and writes JSON; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fxprune.models_zoo.random_nets import NetSpec, net_specs  # noqa: E402
from test_fuzz import check_compile  # noqa: E402

import fxprune  # noqa: E402


def soak(examples: int, seed: int, data_every: int, upsampling: bool = False) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, str]] = []
    scores: collections.Counter[str] = collections.Counter()
    forms: collections.Counter[str] = collections.Counter()  # NetSpec.output: how the outputs are packed
    heads: collections.Counter[int] = collections.Counter()  # outputs per model
    ups: collections.Counter[str] = collections.Counter()  # up-sampling ops (variant, "+skip")
    up_outcomes: collections.Counter[str] = collections.Counter()  # outcomes of the nets that hold one

    @hyp_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(spec=net_specs(upsampling=upsampling), target=st.floats(0.3, 1.0),
           data_score=st.sampled_from(["taylor", "fisher"]))  # fmt: skip
    def one(spec: NetSpec, target: float, data_score: str) -> None:
        i = sum(outcomes.values())
        score = data_score if data_every and i % data_every == 0 else "magnitude"
        scores[score] += 1
        forms[spec.output] += 1
        heads[len(spec.heads)] += 1
        for op in spec.ops:
            if op.kind in ("up", "unshuffle"):
                ups[(op.variant or op.kind) + ("+skip" if len(op.src) > 1 else "")] += 1
        try:
            outcome = check_compile(spec, target, score)
        except fxprune.FxpruneError as exc:  # a typed error check_compile does not accept
            outcome = f"failure ({type(exc).__name__})"
            failures.append(_failure(spec, target, score, exc))
        except Exception as exc:  # noqa: BLE001 - an assertion of the property or a crash: a failure
            outcome = "failure"
            failures.append(_failure(spec, target, score, exc))
        outcomes[outcome] += 1
        if any(op.kind in ("up", "unshuffle") for op in spec.ops):
            up_outcomes[outcome] += 1
        if (i + 1) % 100 == 0:
            print(f"  {i + 1} examples, {dict(outcomes)}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    one()
    wall = time.perf_counter() - t
    n = sum(outcomes.values())
    return {
        "examples": n,
        "seed": seed,
        "wall_s": round(wall, 1),
        "outcomes": dict(outcomes),
        "scores": dict(scores),
        "output_forms": dict(forms),
        "outputs_per_model": dict(sorted(heads.items())),
        "upsampling_ops": dict(sorted(ups.items())),
        "upsampling_net_outcomes": dict(up_outcomes),
        "passed_oracle": outcomes["pruned"] + outcomes["unpruned"],
        "typed_errors": {k: v for k, v in outcomes.items() if k.endswith("Error")},
        "failures": sum(v for k, v in outcomes.items() if k.startswith("failure")),
        "failure_examples": failures[:20],
        "torch": torch.__version__,
    }


def _failure(spec: NetSpec, target: float, score: str, exc: BaseException) -> dict[str, str]:
    return {
        "spec": str(spec),
        "target": repr(target),
        "score": score,
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-3000:],
    }


def table(r: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r["typed_errors"].items())) or "none"
    rows = [
        "| examples | passed oracle (pruned / unpruned) | typed errors | failures | wall time |",
        "|---:|---:|---|---:|---:|",
        f"| {r['examples']} | {r['passed_oracle']} ({r['outcomes'].get('pruned', 0)} / "
        f"{r['outcomes'].get('unpruned', 0)}) | {errors} | {r['failures']} | {r['wall_s']:.0f} s |",
    ]
    rows += ["", "output forms: " + ", ".join(f"{k} {v}" for k, v in sorted(r["output_forms"].items())),
             "outputs per model: " + ", ".join(f"{k}: {v}" for k, v in r["outputs_per_model"].items())]  # fmt: skip
    if r["upsampling_ops"]:
        rows.append("up-sampling ops: " + ", ".join(f"{k} {v}" for k, v in r["upsampling_ops"].items()))
        rows.append("outcomes of the nets with one: "
                    + ", ".join(f"{k} {v}" for k, v in r["upsampling_net_outcomes"].items()))  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-every", type=int, default=10, help="every k-th example uses a data score (0: never)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--upsampling", action="store_true", help="draw dense-prediction nets (up-sampling ops)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    r = soak(args.examples, args.seed, args.data_every, args.upsampling)
    print(table(r))
    for f in r["failure_examples"][:5]:
        print(f"\n{f['spec']}\ntarget={f['target']} score={f['score']}\n{f['error'][:500]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(f"\nwrote {args.out}")
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
