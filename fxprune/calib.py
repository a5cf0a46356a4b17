"""Calibration data for the data-driven scores and for compensation.

``compile(..., data=, loss_fn=)`` takes an iterable of batches: each batch is the model's input (a tensor or a
tuple of tensors), or a pair ``(inputs, targets)``. With targets the scores use ``loss_fn(output, targets)``
(default: cross-entropy for integer targets, mean squared error otherwise). Without targets (or with no data
at all, when the example input is the only batch) they use the label-free output-matching loss
``L = 1/(2N) * sum ||f(x) - f0(x)||^2`` against the original model's outputs ``f0``: its gradient at the
unpruned model is zero and its Hessian is the Gauss-Newton matrix, so second-order scores carry the signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F

from fxprune.data import flatten_structure
from fxprune.errors import FxpruneError, InputError

__all__ = ["Batch", "Batches", "Calibration", "LossFn", "batch_sizes", "make_calibration"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One calibration batch: model inputs and targets (labels, or the original outputs when label-free)."""

    inputs: tuple[torch.Tensor, ...]
    targets: Any

    def to(self, device: torch.device) -> Batch:
        return Batch(tuple(t.to(device) for t in self.inputs), _to(self.targets, device))

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].dim() else 1


class Batches:
    """The calibration batches of a streamed source, validated and copied one at a time each time they are
    iterated.

    Re-iterable (a score's conjugate-gradient solve and the compensation each take their own passes) and
    never held whole: each pass iterates the user's data again (a DataLoader) up to ``limit`` batches and
    turns each item into a ``Batch`` (``make``), which is dropped once used. ``sizes`` reads only the batch
    sizes (no copy, no model run). ``len`` is the number of batches when the data has a length, else
    ``TypeError``.
    """

    def __init__(
        self, source: Iterable[Any], make: Callable[[int, Any], Batch], limit: int | None, n_inputs: int
    ) -> None:
        self.source, self.make, self.limit, self.n_inputs = source, make, limit, n_inputs

    def __iter__(self) -> Iterator[Batch]:
        for i, item in enumerate(islice(self.source, self.limit)):
            yield self.make(i, item)

    def sizes(self) -> Iterator[int]:
        """The sample count of each batch, in order (one pass over the data's items, nothing copied)."""
        for i, item in enumerate(islice(self.source, self.limit)):
            inputs, _ = _split(i, item, self.n_inputs)
            yield Batch(inputs, None).size

    def __len__(self) -> int:
        n = len(self.source)  # type: ignore[arg-type]  # TypeError without one, as the docstring says
        return n if self.limit is None else min(n, self.limit)


@dataclass(frozen=True)
class Calibration:
    """Validated batches (held: a tuple; streamed: ``Batches``) and the loss they are scored on
    (``labelled`` tells which kind)."""

    batches: Iterable[Batch]
    loss: Callable[[Any, Batch], torch.Tensor]
    labelled: bool

    @property
    def samples(self) -> int:
        """Samples over all batches."""
        return sum(batch_sizes(self.batches))


def batch_sizes(batches: Iterable[Batch]) -> Iterator[int]:
    """The sample count of each batch: read from held batches, or from a stream's items without copying
    (``Batches.sizes``) or from anything else that offers ``sizes()``."""
    sizes = getattr(batches, "sizes", None)
    return sizes() if callable(sizes) else (b.size for b in batches)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _output_matching(out: Any, batch: Batch) -> torch.Tensor:
    got, ref = flatten_structure(out, torch.Tensor), batch.targets
    n = max(batch.size, 1)
    return sum(((g.float() - r.float()) ** 2).sum() for g, r in zip(got, ref, strict=True)) / (2 * n)


def _default_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise InputError(
            "the model returns several outputs, so fxprune cannot pick a default loss; pass "
            "loss_fn=lambda output, target: ... returning a scalar"
        )
    if not targets.dtype.is_floating_point:
        return F.cross_entropy(out, targets)
    return F.mse_loss(out, targets)


def _check_finite(i: int, what: str, tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"data[{i}] {what} contains NaN or Inf; drop or clean that batch (fxprune scores on it "
                "and would return meaningless scores)"
            )


def _check_like_example(i: int, inputs: Sequence[torch.Tensor], example: Sequence[torch.Tensor]) -> None:
    """A batch must look like ``example_input`` except for the batch size: the model is analysed, and its
    shape literals rewritten, for the example's shapes."""
    for j, (t, e) in enumerate(zip(inputs, example, strict=True)):
        if t.dtype != e.dtype or t.dim() != e.dim() or t.shape[1:] != e.shape[1:] or t.device.type == "meta":
            raise InputError(
                f"data[{i}] input {j} is {tuple(t.shape)} {t.dtype} on {t.device}, but example_input[{j}] is "
                f"{tuple(e.shape)} {e.dtype}; calibration batches must match example_input except for the "
                "batch size (dim 0)"
            )


def _split(i: int, item: Any, n_inputs: int) -> tuple[tuple[torch.Tensor, ...], Any]:
    """(inputs, targets or None) from one batch as the user gave it."""
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, dict):
        raise InputError(f"data[{i}] is a dict; give batches as inputs or (inputs, targets) tuples")
    if isinstance(item, (tuple, list)):
        parts = list(item)
        if n_inputs == 1 and len(parts) == 2 and isinstance(parts[0], torch.Tensor):
            return (parts[0],), parts[1]
        if len(parts) == n_inputs and all(isinstance(p, torch.Tensor) for p in parts):
            return tuple(parts), None
        if len(parts) == 2 and isinstance(parts[0], (tuple, list)) and len(parts[0]) == n_inputs:
            return tuple(parts[0]), parts[1]
    raise InputError(
        f"data[{i}] is a {type(item).__name__}; each batch must be the model input "
        f"({n_inputs} tensor(s)) or a pair (inputs, targets)"
    )


def make_calibration(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    data: Iterable[Any] | None,
    loss_fn: LossFn | None,
    *,
    max_batches: int | None = None,
) -> Calibration:
    """Validate ``data`` (or fall back to the example input) and fix the loss scores are computed on.

    Streaming: a re-iterable ``data`` other than a list or tuple (a ``DataLoader``: ``iter(data)`` is a new
    iterator each time) is never held whole: its first batch is validated here, and every batch is
    validated and copied when a pass reads it (``Batches``), label-free targets (the original model's
    outputs, ``model`` in eval mode) computed then. A list or tuple (already in memory) and a one-shot
    iterator (a generator, which cannot be read twice) are validated and copied here, once, label-free
    targets computed once, so every error about them comes before any work.

    Raises:
        InputError: an empty iterable, a batch of the wrong form, NaN/Inf values, a loss that is not a
            finite scalar, or ``loss_fn`` without targets.
    """
    if data is None:
        source: Iterable[Any] = [example]
    elif isinstance(data, torch.Tensor):
        source = [data]
    else:
        if not isinstance(data, Iterable):
            raise InputError(
                f"data must be an iterable of batches (a list or a DataLoader), got {type(data).__name__}"
            )
        one_shot = isinstance(data, Iterator)  # a generator: read once, so held
        source = (data if max_batches is None else _take(data, max_batches)) if one_shot else data
        source = list(source) if one_shot else source
    limit = None if data is None or isinstance(data, torch.Tensor) else max_batches
    first = next(iter(islice(source, limit)), None)
    if first is None:
        raise InputError("data is empty; pass at least one batch, or data=None to score on example_input")
    labelled = _split(0, first, len(example))[1] is not None
    device = next((p.device for p in model.parameters()), example[0].device)

    def make(i: int, item: Any) -> Batch:
        inputs, targets = _split(i, item, len(example))
        if (targets is not None) != labelled:
            raise InputError("data mixes batches with and without targets; give targets for all or none")
        _check_like_example(i, inputs, example)
        _check_finite(i, "inputs", inputs)
        inputs = tuple(
            t.detach().clone() for t in inputs
        )  # a model writing into its input must not touch data
        if targets is not None:
            _check_finite(i, "targets", flatten_structure(targets, torch.Tensor))
        else:
            try:
                with torch.no_grad():
                    out = model(*(t.to(device).clone() for t in inputs))
            except Exception as exc:
                raise InputError(
                    f"data[{i}] does not run through the model: {type(exc).__name__}: {exc}; every batch must "
                    "be a model input like example_input"
                ) from exc
            targets = [t.detach() for t in flatten_structure(out, torch.Tensor)]
        return Batch(inputs, targets)

    held = isinstance(source, (list, tuple))
    batches: Iterable[Batch] = (
        tuple(make(i, item) for i, item in enumerate(islice(source, limit)))
        if held
        else Batches(source, make, limit, len(example))
    )
    if labelled:
        fn = loss_fn or _default_loss

        def loss(out: Any, batch: Batch) -> torch.Tensor:
            return fn(out, batch.targets)
    else:
        if loss_fn is not None:
            raise InputError(
                "loss_fn was given but data has no targets; pass (inputs, targets) batches, or drop loss_fn "
                "to use the label-free output-matching loss"
            )
        loss = _output_matching
    calib = Calibration(batches, loss, labelled)
    _check_loss(model, calib, device)
    return calib


def _take(data: Iterable[Any], n: int) -> list[Any]:
    out: list[Any] = []
    for item in data:
        if len(out) >= n:
            break
        out.append(item)
    return out


def _check_loss(model: torch.nn.Module, calib: Calibration, device: torch.device) -> None:
    batch = next(iter(calib.batches)).to(device)
    with torch.no_grad():
        try:
            value = calib.loss(model(*batch.inputs), batch)
        except FxpruneError:
            raise
        except Exception as exc:
            raise InputError(
                f"loss_fn(output, targets) failed on data[0]: {type(exc).__name__}: {exc}; it must accept "
                "the model output and the batch targets"
            ) from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(
            f"loss_fn must return a scalar tensor, got {shape} on data[0]; reduce it (e.g. .mean())"
        )
    if not math.isfinite(float(value)):
        raise InputError(f"loss_fn returned {float(value)} on data[0]; the loss must be finite")
