"""fxprune: a structured-pruning compiler for PyTorch built on torch.fx.

``fxprune.compile(model, example_input, target_flops)`` returns a physically smaller model with about
``target_flops`` of the original FLOPs; ``fxprune.inspect`` shows which channels are coupled and why; ``fxprune.save``/``load``/``apply_plan``
turn a result into deployable artefacts; ``fxprune.penalty`` is a loss term that trains a model so that it prunes
without fine-tuning. Each is a configuration of one stage pipeline
(``fxprune.COMPILE``, ``fxprune.pipeline.Pipeline``): replace a stage or stop after one to change what runs.
"""

from __future__ import annotations

from fxprune.compiler import STAGES, CompileResult, compile, count_flops, count_params, dependency_graph
from fxprune.data import ChannelDim, ChannelGroup, PrunePlan, Site
from fxprune.deploy import apply_plan, load, save
from fxprune.errors import (
    ExportError,
    FxpruneError,
    InputError,
    NumericalError,
    PassContractError,
    PipelineError,
    ScoreNotApplicable,
    TargetError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from fxprune.inspection import Inspection, inspect
from fxprune.passes.dependency import DependencyResult
from fxprune.penalties import GroupPenalty, PenaltyReport, PenaltySchedule, penalty
from fxprune.pipeline import Pipeline, Stage
from fxprune.stages import ANALYSE, COMPILE, CompileOptions, CompileState
from fxprune.submodules import SUBMODULES, SubmodulesResult
from fxprune.verify import Verification, masked_model

__all__ = [
    "ANALYSE",
    "COMPILE",
    "STAGES",
    "SUBMODULES",
    "ChannelDim",
    "ChannelGroup",
    "CompileOptions",
    "CompileResult",
    "CompileState",
    "DependencyResult",
    "ExportError",
    "FxpruneError",
    "GroupPenalty",
    "InputError",
    "Inspection",
    "NumericalError",
    "PassContractError",
    "PenaltyReport",
    "PenaltySchedule",
    "Pipeline",
    "PipelineError",
    "ScoreNotApplicable",
    "PrunePlan",
    "Site",
    "Stage",
    "SubmodulesResult",
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
    "penalty",
    "save",
]

__version__ = "0.1.0"
