"""ONNX Runtime as the target runtime: which execution provider, how many threads, and a session on it.
Verification (``fxprune.verify``) and the latency tables (``fxprune.passes.latency``) both run models here."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fxprune.errors import InputError

__all__ = ["default_threads", "ort_provider", "ort_session", "session_provider"]

log = logging.getLogger(__name__)


#: ``ort_session(optimization=...)`` -> ONNX Runtime's graph optimisation level
_ORT_LEVELS = {
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


#: ``ort_provider``'s names -> ONNX Runtime's execution providers, in priority order
_ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_provider(requested: str | None) -> str:
    """The execution provider a session runs on: ``"cpu"`` or ``"cuda"``.

    Cases:
        1. ``requested="cpu"``: ``"cpu"``.
        2. ``requested="cuda"``: ``"cuda"`` when ``onnxruntime.get_available_providers()`` lists
           ``CUDAExecutionProvider`` (``onnxruntime-gpu``); else an ``InputError``.
        3. ``requested=None`` (auto): ``"cuda"`` when torch sees a GPU (``torch.cuda.is_available()``) and
           ONNX Runtime has the CUDA provider, else ``"cpu"``.

    Raises:
        InputError: ``requested`` is none of these, or ``"cuda"`` without ONNX Runtime's CUDA provider.
    """
    import onnxruntime as ort

    if requested not in (None, "cpu", "cuda"):
        raise InputError(f"provider={requested!r}: choose 'cpu', 'cuda' or None (CUDA when available)")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if requested == "cuda" and not has_cuda:
        raise InputError(
            f"provider='cuda', but this ONNX Runtime has no CUDAExecutionProvider (it has "
            f"{', '.join(available)}). Fix: install onnxruntime-gpu built for your CUDA version, or pass "
            "provider='cpu' (or None: CUDA when available)"
        )
    if requested is not None:
        return requested
    return "cuda" if has_cuda and torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where the platform
    lacks it): the intra-op thread count latencies are timed with unless told otherwise."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ort_session(
    onnx_bytes: bytes,
    optimization: str = "all",
    externals: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    provider: str | None = None,
    spinning: bool = False,
) -> Any:
    """An ONNX Runtime session. ``optimization`` is the graph optimisation level: ``"all"`` (ORT's
    default, as deployed: with layout transformations), ``"extended"``, ``"basic"`` (constant folding,
    redundant-node elimination and semantics-preserving fusions only) or ``"none"``. ``externals``: the
    initializers ``fxprune.onnx_writer.write_onnx(..., external=True)`` left out of the model.
    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core). ``provider``:
    ``"cpu"``, ``"cuda"`` or None (``ort_provider``: CUDA when torch sees a GPU and ONNX Runtime has the
    CUDA provider, else CPU). ``session.get_providers()[0]`` says where it runs: ONNX Runtime falls back
    to the CPU when its CUDA provider fails to load, which is reported (a warning) on auto.
    ``spinning``: whether idle intra-op threads spin waiting for work (ONNX Runtime's default) instead of
    sleeping. Off by default: fxprune times several sessions in one process, original and pruned
    interleaved, and a session's spinning threads take the cores the other session is timed on (with 2
    threads on 2 cores, interquartile ranges of 60% of the median were seen); one thread has none to spin.

    Raises:
        InputError: an unknown ``provider``, or ``provider="cuda"`` where ONNX Runtime cannot run CUDA.
    """
    import onnxruntime as ort

    name = ort_provider(provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization])
    if externals:
        opts.add_external_initializers(
            list(externals), [ort.OrtValue.ortvalue_from_numpy(a) for a in externals.values()]
        )
    sess = ort.InferenceSession(onnx_bytes, opts, providers=_ORT_PROVIDERS[name])
    if name == "cuda" and session_provider(sess) != "cuda":
        if provider == "cuda":
            raise InputError(
                "provider='cuda', but ONNX Runtime could not load its CUDA provider and fell back to the CPU. "
                "Fix: install the CUDA and cuDNN versions your onnxruntime-gpu was built for, or pass "
                "provider='cpu'"
            )
        log.warning("ONNX Runtime could not load its CUDA provider; the session runs on the CPU")
    return sess


def session_provider(sess: Any) -> str:
    """``"cuda"`` when ONNX Runtime session ``sess`` runs on its CUDA provider, else ``"cpu"``."""
    return "cuda" if sess.get_providers()[:1] == ["CUDAExecutionProvider"] else "cpu"
