"""Typed errors. Every message names the node or argument at fault and says what to do about it."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

__all__ = [
    "ExportError",
    "FxpruneError",
    "InputError",
    "NumericalError",
    "PassContractError",
    "PipelineError",
    "ScoreNotApplicable",
    "TargetError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "warn",
]


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError, RuntimeError):
    """torch.fx could not capture the model, or the captured graph does not run.

    The message names the offending call (file:line and source) and the module being traced, and suggests
    ``leaf_modules=`` (keep that module opaque; its channels are then pinned) or ``concrete_args=``.
    """


class TargetError(FxpruneError, ValueError):
    """``target_flops`` is malformed or cannot be reached; the message gives the smallest reachable FLOPs."""

    def __init__(self, message: str, *, min_flops: int | None = None, total_flops: int | None = None) -> None:
        super().__init__(message)
        self.min_flops = min_flops
        self.total_flops = total_flops


class InputError(FxpruneError, ValueError):
    """An argument passed to fxprune is unusable (wrong type, or the example input does not run)."""


class ScoreNotApplicable(InputError):
    """The chosen score cannot model this model (e.g. ``score="obs"``: a reader of a pruned channel that lsq
    cannot refit, or a per-sample output too large to factor its Hessian); the message says which and what
    to use instead."""


class VerificationError(FxpruneError, RuntimeError):
    """ONNX Runtime disagrees with the compiled model (or it does not export): the ONNX artefact would be wrong.

    The message gives the error against ``rtol``, says whether the *original* model fails the same check
    (then the exporter, not pruning, is at fault) and names in-place ops, a known cause. ``result`` holds the
    ``CompileResult`` (its eager ``graph_module`` and ``verification``) for inspection.
    """

    def __init__(self, message: str, *, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class UnsupportedOpError(FxpruneError, NotImplementedError):
    """With ``strict=True``: an op without a rule touches channels (names the node and the op)."""


class PassContractError(FxpruneError, RuntimeError):
    """A pass touched what it declared it would not (``fxprune.passes.base``): a bug in fxprune, never the
    user's fault. Not an ``AssertionError``, so ``python -O`` cannot hide it and a test's bare ``assert``
    failures stay distinct from it."""


class ExportError(FxpruneError, RuntimeError):
    """No ONNX exporter could write the model (fxprune's writer, then torch's TorchScript and dynamo
    exporters); the message gives each exporter's error."""


class NumericalError(FxpruneError, FloatingPointError):
    """A score or compensation produced non-finite values (NaN or Inf) on the calibration data; the message
    names the score and what to change (damping, data, loss)."""


class PipelineError(FxpruneError, RuntimeError):
    """A pipeline (``fxprune.pipeline``) is mis-assembled: a stage requires a field no earlier stage
    provides, does not provide what it declares, or reads a field it does not declare. Raised when the
    pipeline is built or run; the message names the stage and the stages before it."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside fxprune (the line of the user's code that
    called into fxprune), however deep in the pipeline the warning is raised."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level)


#: the source folders of fxprune (fxprune/ and passes/, installed as fxprune.passes; the same folder when
#: fxprune is installed as a wheel): frames there are fxprune's, not the user's
_PACKAGE_DIRS = tuple(
    str(p) + os.sep for p in dict.fromkeys((Path(__file__).parent, Path(__file__).parent.parent / "passes"))
)
