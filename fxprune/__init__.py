"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

``fxprune.compile(model, example_input, target_flops)`` returns a physically smaller model with about
``target_flops`` of the original FLOPs; ``fxprune.inspect`` shows which channels are coupled and why; ``fxprune.save``/``load``/``apply_plan``
turn a result into deployable artefacts.
"""

from __future__ import annotations

from fxprune.compiler import STAGES, CompileResult, compile, count_flops, count_params, dependency_graph
from fxprune.data import ChannelDim, ChannelGroup, PrunePlan, Site
from fxprune.deploy import apply_plan, load, save
from fxprune.errors import (
    FxpruneError,
    InputError,
    TargetError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from fxprune.inspection import Inspection, inspect
from fxprune.passes.dependency import DependencyResult
from fxprune.verify import Verification, masked_model

__all__ = [
    "STAGES",
    "ChannelDim",
    "ChannelGroup",
    "CompileResult",
    "DependencyResult",
    "FxpruneError",
    "InputError",
    "Inspection",
    "PrunePlan",
    "Site",
    "TargetError",
    "TraceError",
    "UnsupportedOpError",
    "Verification",
    "VerificationError",
    "apply_plan",
    "compile",
    "count_flops",
    "count_params",
    "dependency_graph",
    "inspect",
    "load",
    "masked_model",
    "save",
]

__version__ = "0.1.0"
