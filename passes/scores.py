"""The built-in scores by name: the table ``compile(score=NAME)`` reads. Listed explicitly; importing a
score module registers nothing.

A new score is a ``fxprune.passes.score.ScorePass`` subclass with a ``name`` (in its own
``passes/score_<kind>.py``; ``masking.MaskScorePass`` gives the shared channel mask and mergeable
statistics to data-driven ones). Add it to ``SCORES`` below to make its name known, or pass the class
itself: ``fxprune.compile(model, x, 0.5, score=MyScore)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from fxprune.passes.score import AUTO, ScorePass
from fxprune.passes.score_gradient import FisherScore, InfCPScore, TaylorScore
from fxprune.passes.score_hessian import GradNormScore, IFSOCodeScore, InfluenceScore, SOSPHScore
from fxprune.passes.score_magnitude import MagnitudeScore
from fxprune.passes.score_obs import OBSScore

from fxprune.errors import InputError

__all__ = ["SCORES", "get_score"]

#: name -> score pass, every built-in score
SCORES: Mapping[str, type[ScorePass]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            InfluenceScore,
            MagnitudeScore,
            TaylorScore,
            FisherScore,
            InfCPScore,
            GradNormScore,
            SOSPHScore,
            IFSOCodeScore,
            OBSScore,
        )
    }
)


def get_score(score: str | type[ScorePass]) -> type[ScorePass]:
    """The score pass named ``score`` in ``SCORES``, or ``score`` itself when it is a ``ScorePass`` subclass.

    Raises:
        InputError: an unknown name (the message lists the known ones) or an object that is not a
            ``ScorePass`` subclass.
    """
    if isinstance(score, type):
        if issubclass(score, ScorePass) and score.name:
            return score
        raise InputError(
            f"score={score.__name__} is not a fxprune.passes.score.ScorePass subclass with a name; "
            "subclass ScorePass (or masking.MaskScorePass), set name and implement score_groups"
        )
    if score not in SCORES:
        raise InputError(f"score={score!r} is not a known score; choose one of {sorted([AUTO, *SCORES])}")
    return SCORES[score]
