"""The ``fxprune`` command.

    fxprune compile SPEC --target-flops 0.5 [--score NAME] [--data digits|PATH.npz] --out DIR
    fxprune inspect SPEC [--format text|dot|html|json] [--out FILE] [--explain NAME]

Exit codes: 0 success; 2 bad usage (arguments, SPEC, missing or unreadable file); 3 fxprune refused the
model or target (``FxpruneError``: trace failure, unreachable target...); 4 the pruned model was written but
failed the ONNX Runtime check; 1 an unexpected error (a bug: rerun with ``--debug`` for the traceback).
Errors are one line on stderr: ``fxprune: error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXIT_FAILED_CHECK", "EXIT_INTERNAL", "EXIT_REFUSED", "EXIT_USAGE", "main"]

EXIT_INTERNAL, EXIT_USAGE, EXIT_REFUSED, EXIT_FAILED_CHECK = 1, 2, 3, 4

log = logging.getLogger("fxprune.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit code 2 (argparse's own convention)
        self.exit(EXIT_USAGE, f"fxprune: error: {message} (see fxprune {self.prog.split()[-1]} --help)\n")


class _Steps:
    """Progress over named steps on stderr: a bar on a terminal, else one line per step; nothing if quiet.

    ``bar_on`` is true when a person watches stderr (``passes.masking.interactive``). On a log or a pipe the
    steps inside a long step (epochs, calibration batches) print their own lines as they go
    (``passes.masking.progress``), and the step ends with ``fxprune: [k/N] desc (t s)``; a failed step
    prints no line, so an error stays the only line after the steps that completed.
    """

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        from fxprune.passes.masking import interactive

        self.quiet = quiet
        self.bar_on = not quiet and interactive()
        self.total, self.done = total, 0
        self.bar = tqdm(
            total=total,
            disable=not self.bar_on,
            file=sys.stderr,
            leave=False,
            bar_format="{desc:<28}{bar:20} {n}/{total} [{elapsed}]",
        )

    @contextmanager
    def step(self, desc: str, line: bool = True) -> Iterator[None]:
        """One step; ``line=False`` for a quick one (argument checks: an error after it is the only line)."""
        self.bar.set_description_str(desc)
        t0 = time.perf_counter()
        yield
        self.done += 1
        self.bar.update(1)
        if line and not self.quiet and not self.bar_on:
            took = time.perf_counter() - t0
            print(f"fxprune: [{self.done}/{self.total}] {desc} ({took:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fxprune", description="Structured pruning compiler for PyTorch (torch.fx).")
    ap.add_argument("--version", action="version", version=f"fxprune {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument(
        "spec", metavar="SPEC", help="torchvision:NAME, models_zoo:NAME or path/to/file.py:factory"
    )
    common.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the spec's)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars/lines or summary")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")

    c = sub.add_parser("compile", parents=[common], help="prune a model and write deployable artefacts")
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target-flops", type=float, help="fraction of FLOPs to keep (0, 1], or absolute count"
    )
    target.add_argument(
        "--target-latency",
        metavar="T",
        help="instead: fraction (0, 1] of the original's ONNX Runtime latency, or milliseconds such as 3.5ms "
        "(per-op latency tables are measured once per machine and cached)",
    )
    c.add_argument("--out", required=True, help="output directory (created)")
    c.add_argument("--score", default=None, help="scoring pass (default: fxprune.compile's default)")
    c.add_argument(
        "--data", help="'digits' (bundled, trains models_zoo nets) or PATH.npz (x_train/x_test or x, y)"
    )
    c.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="train on --data for N epochs first (default 5 for digits, 0 for .npz)",
    )
    c.add_argument(
        "--calib-samples", type=int, default=256, help="samples of --data passed to compile (default 256)"
    )
    c.add_argument(
        "--no-cache", action="store_true", help="retrain instead of reusing cached trained weights"
    )
    c.add_argument(
        "--latency-runs",
        type=int,
        default=20,
        help="minimum ONNX Runtime timing rounds, original and pruned interleaved (0: skip timing)",
    )
    c.add_argument(
        "--latency-threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads for the latency tables and timing (default: every CPU available)",
    )
    c.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="kept channel counts are multiples of N (default: the runtime's measured block; 1: any)",
    )
    c.add_argument(
        "--capture",
        choices=("auto", "fx", "export"),
        default="auto",
        help="torch.fx symbolic tracing, torch.export, or auto (default): torch.export when tracing fails",
    )
    c.add_argument(
        "--latency-provider",
        choices=("cpu", "cuda"),
        default=None,
        help="ONNX Runtime provider for the latency tables and timing (default: cuda when present, else cpu)",
    )

    i = sub.add_parser("inspect", parents=[common], help="show channel groups, couplings and pinned channels")
    i.add_argument("--format", choices=("text", "dot", "html", "json"), default="text")
    i.add_argument("--out", help="write to this file instead of stdout")
    i.add_argument("--explain", action="append", default=[], metavar="NAME",
                   help="also explain a node, module or group id (repeatable)")  # fmt: skip
    return ap


def _version() -> str:
    import fxprune

    return fxprune.__version__


def _cached_train(spec: Any, data: Any, epochs: int, no_cache: bool, steps: _Steps) -> str:
    """Train ``spec.model`` on digits-like data (cached by spec key and epochs); returns where it came from."""
    from tqdm import tqdm

    from fxprune.models_zoo.digits import Digits, train
    from fxprune.passes.masking import StepLines
    from fxprune.specs import cache_dir

    path = cache_dir() / f"{spec.key}-{data.name}-e{epochs}.pt"
    if path.is_file() and not no_cache:
        try:
            spec.model.load_state_dict(torch.load(path, weights_only=True))
            spec.model.eval()
            return f"cached weights {path}"
        except Exception as exc:  # a stale or foreign cache file: retrain and overwrite it
            log.warning("ignoring cache %s: %s", path, exc)
    if data.y_train is None:
        from fxprune.specs import SpecError

        raise SpecError(f"--epochs {epochs} needs labels: {data.name} has no y_train/y")
    d = Digits(data.x_train, data.y_train, data.x_test, data.y_test)
    lines = StepLines("train: epoch", epochs)

    def progress(_epoch: int, loss: float) -> None:
        if steps.bar_on:
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update(1)
        elif not steps.quiet:
            lines.step(f"loss {loss:.4f}")

    with tqdm(total=epochs, desc="  epochs", disable=not steps.bar_on, file=sys.stderr, leave=False) as bar:
        train(spec.model, d, epochs=epochs, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(spec.model.state_dict(), path)
    except OSError as exc:
        log.warning("could not cache trained weights at %s: %s", path, exc)
    return f"trained {epochs} epochs (cached at {path})"


@torch.no_grad()
def _evaluate(model: torch.nn.Module, data: Any) -> dict[str, float]:
    import torch.nn.functional as F

    model.eval()
    outs = torch.cat([model(data.x_test[i : i + 256]) for i in range(0, len(data.x_test), 256)])
    res: dict[str, float] = {}
    if data.y_test is None:
        return res
    if data.classification:
        res["accuracy"] = float((outs.argmax(1) == data.y_test).float().mean())
        res["loss"] = float(F.cross_entropy(outs, data.y_test))
    else:
        res["loss"] = float(F.mse_loss(outs, data.y_test.to(outs.dtype)))
    return res


def _calibration(data: Any, n: int) -> tuple[list[Any], Any]:
    """Batches for compile(data=...) and the matching loss_fn (None without labels)."""
    import torch.nn.functional as F

    x, y = data.x_train[:n], None if data.y_train is None else data.y_train[:n]
    batches: list[Any] = [
        x[i : i + 64] if y is None else (x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)
    ]
    if y is None:
        return batches, None
    return batches, (F.cross_entropy if data.classification else F.mse_loss)


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "int":
        return f"{v / 1e6:,.2f}M" if v >= 1e6 else f"{v:,}"
    return f"{v:.4f}"


def _row(name: str, b: Any, a: Any, kind: str) -> tuple[str, str, str, str]:
    """A summary-table row: name, before, after and the ratio after / before (blank without both)."""
    ratio = f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else ""
    return name, _fmt(b, kind), _fmt(a, kind), ratio


def _latency_row(lat: Any) -> tuple[str, str, str, str]:
    """The ``fxprune.verify.LatencyReport`` row: median [Q1-Q3] before and after, the median per-round
    ratio [its quartiles], the thread count and provider in the name."""

    def ms(x: float) -> str:  # two decimals; two significant digits below 0.1 ms
        return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"

    def cell(st: Any) -> str:
        return "-" if st is None else f"{ms(st.median_ms)} ms [{ms(st.q1_ms)}-{ms(st.q3_ms)}]"

    ratio = "" if lat.ratio is None else f"{lat.ratio:.3f} [{lat.ratio_q1:.2f}-{lat.ratio_q3:.2f}]"
    threads = f"{lat.threads} thread{'s' if lat.threads != 1 else ''}"
    return f"ORT latency ({lat.provider}, {threads})", cell(lat.before), cell(lat.after), ratio


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    """Rows under a ``before after ratio`` header; the columns widen to their longest cell (latency rows
    carry quartiles). A latency cell is ``median [Q1-Q3]``, its ratio the median per-round ratio."""
    w = [max([16 if i == 0 else 14 if i < 3 else 8] + [len(r[i]) for r in rows]) for i in range(4)]
    lines = [f"{'':{w[0]}} {'before':>{w[1]}} {'after':>{w[2]}} {'ratio':>{w[3]}}"]
    lines += [f"{n:{w[0]}} {b:>{w[1]}} {a:>{w[2]}} {r:>{w[3]}}" for n, b, a, r in rows]
    return "\n".join(lines)


def _compile(args: argparse.Namespace) -> int:
    from fxprune.specs import SpecError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out '{out}' exists and is not a directory")
    if args.epochs is not None and args.epochs < 0 or args.calib_samples < 1:
        raise SpecError("--epochs must be >= 0 and --calib-samples >= 1")
    if args.latency_runs < 0 or args.latency_threads is not None and args.latency_threads < 1:
        raise SpecError("--latency-runs must be >= 0 (0: no timing) and --latency-threads >= 1")
    t0 = time.perf_counter()
    with _Steps(4 + bool(args.data), args.quiet) as steps:  # load, [data], train/prepare, compile, write
        return _compile_steps(args, steps, out, t0)


def _compile_steps(args: argparse.Namespace, steps: _Steps, out: Path, t0: float) -> int:
    import fxprune
    from fxprune.passes.latency import resolve_latency_target
    from fxprune.plot import layer_widths, write_plots
    from fxprune.select import resolve_target
    from fxprune.specs import load_data, load_spec
    from fxprune.verify import export_onnx

    with steps.step("load model", line=False):
        spec = load_spec(args.spec, args.input_shape, need_example=not args.data)
    data = None
    if args.data:
        with steps.step(f"data {args.data}", line=False):
            data = load_data(args.data)
            example: tuple[torch.Tensor, ...] = (data.x_test[:1],)
    else:
        example = spec.example_input
    # argument errors before any heavy work: does the model run, is the target reachable in form
    flops = fxprune.count_flops(spec.model.eval(), example) if _runs(spec.model, example) else 0
    if args.target_latency is not None:
        target_latency: float | str = args.target_latency  # "3.5ms", or a fraction:
        with contextlib.suppress(ValueError):
            target_latency = float(args.target_latency)
        resolve_latency_target(target_latency, None)
    else:
        resolve_target(args.target_flops, max(flops, 1))
    epochs = args.epochs if args.epochs is not None else (5 if args.data == "digits" else 0)
    source = "as built (untrained)"
    training = data is not None and bool(epochs)
    with steps.step("train" if training else "prepare", line=training):
        if training:
            source = _cached_train(spec, data, epochs, args.no_cache, steps)
    spec.model.eval()
    before = _evaluate(spec.model, data) if data is not None else {}
    kwargs: dict[str, Any] = {
        "latency_runs": args.latency_runs, "latency_threads": args.latency_threads, "round_to": args.round_to,
        "latency_provider": args.latency_provider, "capture": args.capture,
        "progress": not args.quiet,
    }  # fmt: skip
    if args.score:
        kwargs["score"] = args.score
    if data is not None:  # data-driven score and compensation (lsq refit) in fxprune.compile
        kwargs["data"], loss_fn = _calibration(data, args.calib_samples)
        if loss_fn is not None:
            kwargs["loss_fn"] = loss_fn
    with steps.step("compile"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if args.target_latency is not None:
                kwargs["target_latency"] = target_latency
            result = fxprune.compile(spec.model, example, args.target_flops, **kwargs)
        except fxprune.VerificationError as exc:  # write the artefacts anyway; the exit code reports it
            assert isinstance(exc.result, fxprune.CompileResult)
            result = exc.result
    after = _evaluate(result.graph_module, data) if data is not None else {}
    with steps.step("write artefacts"):
        fxprune.save(result, out, onnx=False)
        v = result.verification  # the exporter whose model verification checked
        blob, _ = export_onnx(
            result.graph_module, example, 18, exporter=v.exporter if v and v.exporter != "none" else "auto"
        )
        (out / "model.onnx").write_bytes(blob)
        layers = layer_widths(spec.model, result.graph_module)
        write_plots(layers, out)
        v = result.verification
        report = {
            "spec": args.spec, "data": args.data, "model_source": source, "score": result.score,
            "capture": result.capture,
            "target_flops": args.target_flops, "target_latency": args.target_latency,
            "predicted_latency_ms": result.predicted_latency_ms, "flops_before": result.flops_before,
            "flops_after": result.flops_after, "flops_ratio": result.flops_ratio,
            "params_before": result.params_before, "params_after": result.params_after,
            "params_ratio": result.params_ratio, "metrics_before": before, "metrics_after": after,
            "ort_passed": None if v is None else v.passed,
            "ort_max_rel_error": None if v is None else v.max_rel_error,
            "ort_ms_before": None if v is None else v.ort_ms_before,
            "ort_ms_after": None if v is None else v.ort_ms_after,
            "latency": None if v is None or v.latency is None else dataclasses.asdict(v.latency),
            "layers": [{"name": n, "before": b, "after": a} for n, b, a in layers],
            "timings": result.timings, "seconds_total": time.perf_counter() - t0,
        }  # fmt: skip
        (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        rows: list[tuple[str, str, str, str]] = []
        for k in ("accuracy", "loss"):
            if k in before:
                rows.append(_row(k, before[k], after.get(k), "f"))
        rows += [_row("FLOPs", result.flops_before, result.flops_after, "int"),
                 _row("params", result.params_before, result.params_after, "int")]  # fmt: skip
        if v is not None and v.latency is not None:
            rows.append(_latency_row(v.latency))
        table = _table(rows)
        md = [
            f"# fxprune compile {args.spec}", "",
            f"target {'FLOPs ' + str(args.target_flops) if args.target_latency is None else 'latency ' + args.target_latency}, "
            f"data {args.data or 'none'}, model {source}", "",
            "```", table, "```", "", "![kept channels per layer](kept_channels.png)", "",
            "## layers (output channels kept / original)", "",
            *[f"{i}. `{n}`: {a} / {b}" for i, (n, b, a) in enumerate(layers)], "",
            "## compiler report", "", "```", result.report, "```", "",
        ]  # fmt: skip
        (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    steps.close()  # before printing, so the summary is not interleaved with the bar
    if not args.quiet:
        print(f"{args.spec}: {source}")
        print(table)
        print(f"wrote {out}/: model.onnx, graph_module.pt, state_dict.pt, code.py, plan.json, report.md, "
              f"report.json, kept_channels.png")  # fmt: skip
    if v is not None and not v.passed:
        print(f"fxprune: error: ONNX Runtime check failed ({v.error or f'rel err {v.max_rel_error:.3g}'}); "
              f"artefacts written to {out}", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED_CHECK
    return 0


def _runs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> bool:
    from fxprune.inputs import check_runs

    check_runs(model.eval(), example)  # raises InputError naming the shapes
    return True


def _inspect(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.specs import load_spec

    with _Steps(2, args.quiet or args.out is None) as steps:
        with steps.step("load model", line=False):
            spec = load_spec(args.spec, args.input_shape)
        with steps.step("analyse"):
            ins = fxprune.inspect(spec.model.eval(), spec.example_input)
    text = ins.render(args.format)
    for name in args.explain:
        text += "\n\n" + ins.explain(int(name) if name.isdigit() else name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        if not args.quiet:
            print(f"wrote {args.out} ({args.format}, {len(ins.groups)} groups, {len(ins.prunable)} prunable)")
    else:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxprune`` console script; returns the exit code."""
    from fxprune.errors import FxpruneError
    from fxprune.specs import SpecError

    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="fxprune: %(message)s")
    try:
        return _compile(args) if args.command == "compile" else _inspect(args)
    except SpecError as exc:
        print(f"fxprune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FxpruneError as exc:
        print(f"fxprune: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"fxprune: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
