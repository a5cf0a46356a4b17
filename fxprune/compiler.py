"""``fxprune.compile``, ``dependency_graph``: configurations of the stage pipeline (``fxprune.stages``).

``compile`` runs ``fxprune.stages.COMPILE``:

    prepare -> options -> calibrate -> trace -> dependency -> cost -> score -> select -> compensate
            -> rewrite -> measure -> verify -> result

each stage a class in ``fxprune/stages.py`` that declares the fields of ``CompileState`` it reads and
writes; ``fxprune.pipeline`` checks the declarations and times every stage (``result.timings``).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

import torch

from fxprune.calib import LossFn
from fxprune.errors import InputError
from fxprune.inputs import count_flops, count_params
from fxprune.passes.dependency import DependencyResult
from fxprune.passes.score import AUTO, GroupScore, ScorePass
from fxprune.pipeline import Pipeline
from fxprune.stages import ANALYSE, COMPILE, CompileOptions, CompileResult, CompileState
from fxprune.submodules import SubmodulesResult, SubmoduleState, check_paths, submodules_pipeline

__all__ = [
    "STAGES",
    "CompileResult",
    "SubmodulesResult",
    "compile",
    "count_flops",
    "count_params",
    "dependency_graph",
]

#: the stages of ``compile``, in order (the keys of ``result.timings``)
STAGES = COMPILE.names

F = TypeVar("F", bound=Callable[..., Any])


def _gc_paused(fn: F) -> F:
    """Run ``fn`` with Python's cyclic garbage collector paused (re-enabled after, if it was on).

    A compile allocates many small objects (fx nodes, metadata, deep copies of module trees), which
    triggers full collections over everything the process holds (torch alone is about a million objects):
    up to a fifth of the compile time on densenet121. Memory is still freed by reference counting; the
    few cycles left are collected after the compile.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper  # type: ignore[return-value]


def dependency_graph(
    model: torch.nn.Module,
    example_input: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    strict: bool = False,
) -> DependencyResult:
    """Channel groups of ``model`` (``.groups``; ``.to_networkx()`` for a graph of them): ``ANALYSE``."""
    options = CompileOptions(leaf_modules=leaf_modules, concrete_args=concrete_args, strict=strict)
    return ANALYSE.run(CompileState(model=model, example_input=example_input, options=options)).dep


@overload
def compile(  # noqa: A001 - the product's name for it
    model: torch.nn.Module,
    example_input: Any,
    target_flops: float | None = None,
    *,
    submodules: None = None,
    **options: Any,
) -> CompileResult: ...


@overload
def compile(  # noqa: A001
    model: torch.nn.Module,
    example_input: Any,
    target_flops: float | None = None,
    *,
    submodules: str | Sequence[str],
    **options: Any,
) -> SubmodulesResult: ...


@_gc_paused
def compile(  # noqa: A001
    model: torch.nn.Module,
    example_input: Any,
    target_flops: float | None = None,
    *,
    submodules: str | Sequence[str] | None = None,
    target_latency: float | str | None = None,
    score: str | type[ScorePass] = AUTO,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    compensate: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    max_batches: int | None = None,
    scores: Mapping[int, GroupScore] | None = None,
    min_channels: int = 1,
    round_to: int | None = None,
    cost_exponent: float | None = None,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    capture: str = "auto",
    strict: bool = False,
    verify: bool = True,
    rtol: float = 1e-4,
    latency_runs: int = 15,
    latency_threads: int | None = None,
    latency_provider: str | None = None,
    pipeline: Pipeline[CompileState] | None = None,
    **score_options: Any,
) -> CompileResult | SubmodulesResult:
    """Prune ``model`` to about ``target_flops`` of its FLOPs; return a new, physically smaller model.

    Args:
        model: any ``nn.Module`` that torch.fx or torch.export can capture (never modified; compiled in eval
            mode); with ``submodules=``, any model whose named submodules can be captured.
        example_input: a tensor or tuple of tensors the model accepts; shapes come from it.
        target_flops: fraction of the original FLOPs in (0, 1], or an absolute FLOPs count (> 1). With
            ``submodules=``: a fraction of the *compiled submodules'* FLOPs (each compiled in turn at it;
            an absolute count is over their sum); ``result.model_flops_before``/``_after`` report the
            whole model's FLOPs on the example (torch's ``FlopCounterMode``).
        submodules: compile these parts of ``model`` (qualified names as in ``model.named_modules()``, one
            ``str`` or a sequence), e.g. ``submodules="backbone"`` for a torchvision detector whose pre- and
            post-processing torch.fx cannot trace. The model runs once on ``example_input`` with forward
            hooks recording each submodule's call (its example input), each calibration batch of ``data``
            (inputs of the whole model) likewise (its calibration data); each submodule is then compiled
            alone, keeping its output structure and channels, so the code around it needs no change.
            Returns a ``SubmodulesResult`` (``fxprune.submodules``): ``.model`` is a copy of the model with
            each submodule replaced by its pruned GraphModule (a drop-in replacement), ``.parts`` each
            submodule's ``CompileResult`` (its ONNX check), ``.plan`` their plans over the whole model.
            ``pipeline=`` is then the pipeline each submodule is compiled with; ``leaf_modules`` names and
            ``scores=`` (a mapping from each name to its part's ``.scores``) are per submodule.
        target_latency: instead of ``target_flops``: a fraction in (0, 1] of the original's latency measured
            in ONNX Runtime, or milliseconds as a string (``"3.5ms"``). Channels are then chosen by score per
            millisecond saved, from per-op latency tables measured at this model's shapes
            (``fxprune.passes.latency``: cached on disk per machine, runtime and op, so a second compile reuses
            them); ``result.predicted_latency_ms`` is the tables' prediction, ``result.latency_model`` the
            tables and how their sum compares with the measured whole (``.summary()``).
        score: name of the scoring pass (``fxprune.passes.scores.SCORES``), or a ``ScorePass`` subclass
            (``fxprune.passes.score``; your own score): ``influence`` (the retrained
            loss change), ``magnitude``, ``taylor``, ``fisher``, ``grad_norm``, ``sosp_h``, ``inf_cp``,
            ``ifso_code``, ``obs`` (group OBS with K-FAC curvature: the loss after lsq compensation,
            ``passes/score_obs.py``; the most accurate at high compression, and the slowest); or ``"auto"``
            (default): ``fisher`` with labelled ``data``, else ``magnitude`` (``passes.score.auto_score``:
            chosen on ``bench/quality.py``). ``result.score`` names the pass that ran. Score-specific
            options (``probes=``, ``damping=``...) go in ``**score_options``.
        data: calibration batches for data-driven scores and compensation: an iterable of model inputs, or
            of ``(inputs, targets)`` pairs. Without targets (or without data: the example input is then the
            only batch) scores use the label-free output-matching loss (``fxprune.calib``).
        loss_fn: ``loss_fn(output, targets) -> scalar`` for labelled data (default: cross-entropy for integer
            targets, MSE otherwise).
        compensate: ``"lsq"`` (layer-wise least squares), ``"lsq_independent"``, ``"bias"`` (mean-value
            fold), ``"newton"`` (influence update) or ``"none"``; default ``"lsq"`` when ``data`` is given,
            else ``"none"``. ``lsq`` re-fits each consumer's kept columns *and* its bias shift to reproduce its
            original output from the input the pruned, already refitted network gives it (consumers in graph
            order), so errors do not pile up through depth; ``lsq_independent`` refits every consumer on the
            original network's inputs (one pass, less memory; on the digits ResNet-20 at 0.1 of the FLOPs
            with fisher scores, 0.29 accuracy where ``lsq`` keeps 0.96). Either one's layer-wise error is at most the mean
            fold's (one feasible point of the same least-squares problem); on the digits bench
            (``bench/quality.py``) lsq was the only method that recovered accuracy without fine-tuning. A
            consumer with no bias and no BatchNorm after it (pre-activation convs, transformers' bias-free
            projections) re-fits its kept columns alone; ``bias`` skips it (``result.compensation.skipped``).
        device: where scoring runs (default: CUDA if available, else CPU); the result is on the CPU.
        seed: seeds random probes, so the same inputs give the same plan.
        progress: report scoring and compensation over calibration batches on stderr: a tqdm bar on a
            terminal, else a line per step (at most one every 5 s); nothing with ``progress=False``.
        max_batches: use at most this many batches of ``data``.
        scores: reuse ``result.scores`` of an earlier compile of the same model and input (same groups)
            instead of scoring again: score once, then sweep targets or compensation methods.
        min_channels: every group keeps at least this many channels (never removed whole).
        round_to: kept counts are multiples of this (or the original count). Default ``None``: counts that
            keep every tensor dim a multiple of the runtime's channel alignment, measured once per machine
            (``fxprune.passes.latency.probe``; e.g. 4 for ONNX Runtime's blocked convolutions on x86 CPUs,
            which are several times slower at other counts); when aligned counts cannot reach the target,
            any count is allowed, with a warning. ``round_to=1``: any count.
        cost_exponent: priority = score / FLOPs_saved ** cost_exponent (default: the score's own).
        leaf_modules: module types or qualified names to keep opaque (their channels are pinned).
        concrete_args: passed to torch.fx to specialise non-tensor forward arguments.
        capture: ``"auto"`` (default): torch.fx symbolic tracing, and ``torch.export`` (non-strict) when
            tracing fails (``fxprune.capture.export_capture``: its ATen graph is brought back to modules and
            torch functions, shapes specialised to the example's); ``"fx"`` or ``"export"``: that one only.
            ``result.capture`` says which one captured the model. When neither works, the ``TraceError``
            lists every module tracing rejects and the FLOPs floor with them in ``leaf_modules``.
        strict: raise ``UnsupportedOpError`` for an op without a rule instead of pinning its channels.
        verify: export to ONNX and compare ONNX Runtime with eager (``rtol`` x max |output|).
        latency_runs: the minimum number of ONNX Runtime timing rounds (0 to skip timing). Original and pruned
            are timed interleaved, one run each per round, after 3 untimed warm-up rounds, until both
            medians are stable to 1 % or 2 s have passed (at most 400 rounds); ``result.verification.latency``
            holds medians, quartiles and the median per-round ratio (``fxprune.verify.time_interleaved``).
        latency_threads: ONNX Runtime intra-op threads for every latency measurement, tables and timing
            (default: every CPU this process may use, ``fxprune.verify.default_threads``), as the model will
            be deployed.
        latency_provider: ``"cpu"``, ``"cuda"`` (ONNX Runtime's CUDA EP) or None (default): CUDA when torch
            sees a GPU and ``onnxruntime-gpu`` is installed, else the CPU.
        pipeline: the stages to run (default ``fxprune.stages.COMPILE``); a pipeline built from it with a
            stage replaced, e.g. ``COMPILE.replace("select", MySelect())``. It must provide ``result``.

    Raises:
        InputError, TraceError, TargetError, UnsupportedOpError: see ``fxprune.errors``. With
            ``submodules=``, an ``InputError`` names the submodule and the fix for a name that is not a
            submodule, names given twice or nested, a submodule the model never calls on the example, one
            called with non-tensor or keyword arguments or several times with different shapes, and a
            calibration batch that calls it at another size; an error compiling a part has a note naming it.
        VerificationError: ``verify`` is on and ONNX Runtime disagrees with the compiled model (the error
            carries the result; the message says whether the original model fails the same check).
    """
    options = CompileOptions(
        target_flops=target_flops, target_latency=target_latency, score=score, data=data, loss_fn=loss_fn, compensate=compensate,
        device=device, seed=seed, progress=progress, max_batches=max_batches, scores=scores,
        min_channels=min_channels, round_to=round_to, cost_exponent=cost_exponent, leaf_modules=leaf_modules,
        concrete_args=concrete_args, capture=capture, strict=strict, verify=verify, rtol=rtol, latency_runs=latency_runs,
        latency_threads=latency_threads, latency_provider=latency_provider, score_options=score_options,
        submodules=() if submodules is None else check_paths(submodules),
    )  # fmt: skip
    stages = COMPILE if pipeline is None else pipeline
    if not isinstance(stages, Pipeline) or "result" not in stages.provides:
        raise InputError(
            f"pipeline= must be a fxprune.Pipeline that provides 'result' (a CompileResult), got {stages!r}; "
            "build it from fxprune.COMPILE, e.g. COMPILE.replace('select', MySelect())"
        )
    if submodules is not None:
        state = SubmoduleState(model=model, example_input=example_input, options=options)
        return submodules_pipeline(stages).run(state).model_result
    return stages.run(CompileState(model=model, example_input=example_input, options=options)).result
