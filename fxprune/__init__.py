"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

``fxprune.compile(model, example_input, target_flops)`` returns a physically smaller model with about
``target_flops`` of the original FLOPs; ``fxprune.dependency_graph`` shows which channels are coupled.
"""

from __future__ import annotations

from fxprune.compiler import STAGES, CompileResult, compile, count_flops, count_params, dependency_graph
from fxprune.data import ChannelDim, ChannelGroup, PrunePlan, Site
from fxprune.errors import FxpruneError, InputError, TargetError, TraceError
from fxprune.passes.dependency import DependencyResult, UnsupportedOpError
from fxprune.verify import Verification, masked_model

__all__ = [
    "STAGES",
    "ChannelDim",
    "ChannelGroup",
    "CompileResult",
    "DependencyResult",
    "FxpruneError",
    "InputError",
    "PrunePlan",
    "Site",
    "TargetError",
    "TraceError",
    "UnsupportedOpError",
    "Verification",
    "compile",
    "count_flops",
    "count_params",
    "dependency_graph",
    "masked_model",
]

__version__ = "0.1.0"
