"""The scoring interface: a score is an analysis pass that estimates, per channel of every prunable group,
how much the loss rises if that channel is removed (higher = keep).

A score is a ``ScorePass`` subclass with a ``name``; ``fxprune.passes.scores.SCORES`` lists the built-in
ones explicitly (no import registers anything) and ``compile(score=NAME)`` looks the name up there, or takes
a ``ScorePass`` subclass itself (``compile(score=MyScore)``). Its result is written into
``node.meta[META_SCORES]`` of each group's producer nodes and returned as a dict.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from fxprune.passes.base import AnalysisPass
from fxprune.passes.stats import Reduce

from fxprune.calib import Calibration
from fxprune.data import ChannelGroup

__all__ = [
    "AUTO",
    "META_SCORES",
    "auto_score",
    "GroupScore",
    "ScoreContext",
    "ScorePass",
]

#: {group id: GroupScore} on the producer nodes of each scored group.
META_SCORES = "fxprune.scores"


@dataclass(frozen=True)
class GroupScore:
    """Per-channel estimate (``mean``) and, where the score has one, its spread across batches."""

    mean: np.ndarray
    spread: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreContext:
    """What a data-driven score needs besides the graph: calibration batches and where to compute.

    ``reduce`` is ``None`` in one process; in a distributed run (each process holding its own
    ``calibration``) the summing all-reduce, e.g. ``torch.distributed.all_reduce``, through which every
    statistic is combined (``MaskedLoss.combine``), so all processes compute the score of all batches.
    """

    calibration: Calibration | None = None
    device: torch.device = torch.device("cpu")
    progress: bool = False
    seed: int = 0
    reduce: Reduce | None = None


#: ``compile``'s default: ``fisher`` with labelled calibration data, else ``magnitude`` (``auto_score``).
AUTO = "auto"


def auto_score(labelled: bool) -> str:
    """The score ``score="auto"`` stands for, chosen by ``bench/quality.py`` on the digits nets.

    With labelled data, ``fisher`` (group Fisher / OBD on the shared mask): with the sequential lsq refit,
    0.984 / 0.967 / 0.980 accuracy at 0.5 of the FLOPs on ResNet-20 / MobileNetV2 / DenseNet, within 0.007 of
    ``obs`` (group OBS, joint), which wins at 0.1 of the FLOPs (0.980 / 0.920 / 0.911 against fisher's 0.962 /
    0.716 / 0.896) but whose greedy joint order grows with the cube of a layer's width: on a 1000-class
    ResNet-18 at 64x64 (one batch of 8, one thread) fisher scored in 0.4 s and obs in 57 s, most of it in the
    greedy order; and the best rank correlation with the measured loss change there, where ``influence``
    ranked worst. Without labels
    the label-free output-matching loss has a zero per-sample gradient at ``m = 1``, so its Fisher is
    identically zero; ``magnitude`` needs no data.
    """
    return "fisher" if labelled else "magnitude"


class ScorePass(AnalysisPass[dict[int, GroupScore]]):
    """Base class. Subclasses implement ``score_groups`` for the prunable groups they are given.

    ``comparable`` says whether values of different groups are on one scale (loss units); if False,
    selection still compares them globally, as Torch-Pruning does with normalised importances.
    """

    name: ClassVar[str] = ""
    comparable: ClassVar[bool] = True
    #: default ``cost_exponent`` for selection: 1.0 for scores in loss units (loss per FLOP saved); 0.0 for
    #: normalised importances, where dividing by FLOPs would only favour the heaviest groups.
    cost_exponent: ClassVar[float] = 1.0
    #: whether the score reads calibration data (``ScoreContext.calibration``).
    uses_data: ClassVar[bool] = False
    #: the score's own options and their defaults; anything else passed to ``compile`` is an error.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, groups: Sequence[ChannelGroup], context: ScoreContext | None = None, **options: Any
    ) -> None:
        self.check_options(options)
        self.groups = [g for g in groups if g.prunable]
        self.context = context or ScoreContext()
        self.options = {**self.defaults, **options}

    def run(self, gm: fx.GraphModule) -> dict[int, GroupScore]:
        scores = self.score_groups(gm, self.groups)
        by_node = {n.name: n for n in gm.graph.nodes}
        for g in self.groups:
            for prod in g.producers:
                if prod in by_node:
                    by_node[prod].meta.setdefault(META_SCORES, {})[g.id] = scores[g.id]
        return scores

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ``InputError`` naming any option the score does not have."""
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            from fxprune.errors import InputError

            known = ", ".join(sorted(cls.defaults)) or "none"
            raise InputError(
                f"option(s) {', '.join(unknown)} are not options of score={cls.name!r} (its options: {known})"
            )

    @abc.abstractmethod
    def score_groups(self, gm: fx.GraphModule, groups: list[ChannelGroup]) -> dict[int, GroupScore]: ...
