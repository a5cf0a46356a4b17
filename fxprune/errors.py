"""Typed errors. Every message names the node or argument at fault and says what to do about it."""

from __future__ import annotations

__all__ = [
    "FxpruneError",
    "InputError",
    "PassContractError",
    "TargetError",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
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
