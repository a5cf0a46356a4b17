"""The user's inputs, checked and copied: a private eval-mode model and example (the first stage of every
pipeline), and the counted forward pass that tells whether an example runs through a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fxprune.errors import InputError, warn
from fxprune.trace import (
    as_example_tuple,
    copy_module,
    detached_caches,
    flop_counter,
    fold_parametrizations,
    mha_slow_path,
)

__all__ = ["check_runs", "clones", "count_flops", "count_params", "prepare"]


def count_flops(model: torch.nn.Module, example: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    ``nn.MultiheadAttention`` runs its slow path (``fxprune.trace.mha_slow_path``): its fused inference
    op counts as 0 FLOPs, which would hide every attention layer from the count.
    """
    with torch.no_grad(), mha_slow_path(), flop_counter() as counter:
        model(*example)
    return int(counter.get_total_flops())


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def prepare(model: Any, example_input: Any) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """A private eval-mode copy of the model and of the example (a tuple); checks both.

    Cases: (1) not an ``nn.Module``; (2) the example is not tensors, or is on the ``meta`` device, or holds
    NaN or Inf; (3) model tensors on ``meta`` (no data) or on another device than the example; (4) the
    deprecated hook-based ``torch.nn.utils.weight_norm``, or a model that cannot be deep-copied: all
    ``InputError``, raised before any work. Tensors a forward cached in the model's attributes with
    autograd on (not graph leaves, which ``deepcopy`` refuses) are copied detached
    (``fxprune.trace.detached_caches``). (5) parametrized tensors (``torch.nn.utils.parametrize``,
    ``parametrizations.weight_norm``) are folded into plain parameters in the copy, with a warning; (6) a model in training mode is compiled in
    eval mode, with a warning. The example is cloned, so a model that writes into its input in place never
    touches the caller's tensors.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in an nn.Module"
        )
    example = as_example_tuple(example_input)
    _check_devices(model, example)
    _check_finite_example(example)
    _check_no_weight_norm_hooks(model)
    try:
        work = copy_module(model, detached_caches(model))
    except Exception as exc:
        raise InputError(
            f"model cannot be deep-copied ({type(exc).__name__}: {exc}); fxprune compiles a private copy and "
            "never modifies yours. If the model uses the deprecated torch.nn.utils.weight_norm, call "
            "torch.nn.utils.remove_weight_norm(module) first or use torch.nn.utils.parametrizations.weight_norm"
        ) from exc
    folded = fold_parametrizations(work)
    if folded:
        warn(
            f"parametrized tensors {', '.join(folded)} are folded into plain parameters in the compiled model "
            "(pruning keeps their values, not the parametrization); your model is unchanged"
        )
    if model.training:
        warn(
            "model is in training mode; fxprune compiles an eval-mode copy (your model is unchanged). "
            "Call model.eval() first to silence this."
        )
    work.eval()
    return work, tuple(t.detach().clone() for t in example)


def _check_no_weight_norm_hooks(model: torch.nn.Module) -> None:
    """The deprecated hook-based ``torch.nn.utils.weight_norm`` recomputes ``weight`` from ``weight_g`` and
    ``weight_v`` before every forward, so slicing ``weight`` would be undone: refuse it, naming the fix."""
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            raise InputError(
                f"module '{name}' uses the deprecated torch.nn.utils.weight_norm, whose hook recomputes the "
                "weight on every call (the model cannot be deep-copied and pruned as it is); call "
                f"torch.nn.utils.remove_weight_norm(model.get_submodule('{name}')) first or use "
                "torch.nn.utils.parametrizations.weight_norm"
            )


def _check_finite_example(example: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(example):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise InputError(
                    f"example_input[{i}] ({tuple(t.shape)} {t.dtype}) contains {nan} NaN and {inf} Inf values; "
                    "shapes and FLOPs come from it and the ONNX check compares outputs on it: pass a finite "
                    f"input, e.g. torch.randn{tuple(t.shape)} or torch.nan_to_num(x)"
                )


def _check_devices(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    for i, t in enumerate(example):
        if t.device.type == "meta":
            raise InputError(
                f"example_input[{i}] is a meta tensor (a shape without data); pass a real tensor, e.g. "
                f"torch.randn{tuple(t.shape)}"
            )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.device.type == "meta":
            raise InputError(
                f"model tensor '{name}' is on the meta device (no data); materialise the weights first, e.g. "
                "model.to_empty(device='cpu') then model.load_state_dict(...)"
            )
    devices = {t.device for _, t in tensors}
    if len(devices) == 1:
        (dev,) = devices
        for i, t in enumerate(example):
            if t.device != dev:
                name = tensors[0][0]
                raise InputError(
                    f"example_input[{i}] is on {t.device} but the model's tensors are on {dev} (e.g. '{name}'); "
                    f"move one of them, e.g. example_input.to('{dev}') or model.to('{t.device}')"
                )


def clones(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Fresh copies of the example for one extra run: a model may write into its input in place."""
    return tuple(t.clone() for t in example)


def check_runs(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """The FLOPs of one run of ``model`` on ``example``; an example the model rejects is an ``InputError``
    naming its shapes, dtypes and devices."""
    try:
        return count_flops(model, example)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in example)
        raise InputError(
            f"example_input ({shapes}) does not run through the model: {type(exc).__name__}: {exc}; "
            "pass an input the model accepts (shape, dtype and device of its first layer)"
        ) from exc
