"""First-order data scores on the shared channel mask (shared/METHODS.md): ``taylor``, ``fisher``, ``inf_cp``.

All derivatives are taken with respect to the mask ``m`` of ``fxprune.passes.masking``: ``dL/dm_c`` is the
sum of ``w * dL/dw`` over channel ``c``'s columns in every consumer, so coupled channels are scored once.

Each score is ``from_statistics(loss, statistics(loss, batches))``: ``statistics`` accumulates a mergeable
statistic (``fxprune.passes.stats``) over an iterable of batches, so the statistics of two splits of the data,
merged, give the score of all of it (and ``MaskedLoss.combine`` makes them global in a distributed run).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from fxprune.passes.masking import MaskedLoss, MaskScorePass, split_batch
from fxprune.passes.stats import Joint, Moments, Sum

from fxprune.calib import Batch
from fxprune.capture import EXPORT
from fxprune.data import META_CAPTURE

__all__ = ["FisherScore", "InfCPScore", "TaylorScore"]


class TaylorScore(MaskScorePass):
    """Loss preservation (Molchanov et al.; Lubana & Dick): ``|dL/dm_c|`` with the gradient over all data.

    The first-order loss change of removing channel ``c`` is ``-dL/dm_c``. At a weight-decayed optimum the
    gradient is ``-lambda * ||w_c||^2``, so on a converged model this ranks like magnitude.
    """

    name = "taylor"

    defaults = {"weight_decay": 0.0}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Sum:
        """``sum_b (n_b / N) dL_b/dm`` (``MaskedLoss.gradient_sum``, mask part only)."""
        return loss.gradient_sum(batches, weights=False)

    def from_statistics(self, loss: MaskedLoss, stat: Sum) -> tuple[torch.Tensor, None]:
        (gm,) = stat.result()
        return gm.abs(), None

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        stat = self.statistics(loss, self.bar(loss.batches(), "gradient"))
        return self.from_statistics(loss, loss.combine(stat))


class FisherScore(MaskScorePass):
    """Group Fisher / OBD on the mask (Liu et al. 2021): ``1/2 E[(dl/dm_c)^2]`` over micro-batches.

    ``chunk`` samples per micro-batch (1 = the per-sample empirical Fisher; larger is cheaper and noisier).
    A graph captured by torch.export runs only at the example's batch size: its micro-batches are whole
    batches (pass batches of ``chunk`` samples for ``chunk``-sample micro-batches; ``fxprune.hf`` does).
    """

    name = "fisher"

    defaults = {"weight_decay": 0.0, "chunk": 4}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Sum:
        """``sum over micro-batches of (dl/dm)^2``; count: the micro-batches."""
        stat = Sum.zeros_like([torch.zeros(loss.size, device=loss.device)])
        fixed = loss.model.meta.get(META_CAPTURE) == EXPORT  # shapes specialised to the example's
        for b in batches:
            for mb in split_batch(b, b.size if fixed else int(self.options["chunk"])):
                stat.update([loss.grad(mb)[1].pow(2)])
        return stat

    def from_statistics(self, loss: MaskedLoss, stat: Sum) -> tuple[torch.Tensor, None]:
        (acc,) = stat.result()
        return 0.5 * acc / max(stat.count, 1), None

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        return self.from_statistics(
            loss, loss.combine(self.statistics(loss, self.bar(loss.batches(), "fisher")))
        )


class InfCPScore(MaskScorePass):
    """Per-batch first-order influence (Lai et al. 2021): the loss change ``-dL_b/dm_c`` on each batch ``b``.

    ``mean`` is the mean of its magnitude over batches and ``spread`` its standard deviation: a channel whose
    influence changes sign from batch to batch is an uncertain decision.
    """

    name = "inf_cp"

    defaults = {"weight_decay": 0.0}

    def statistics(self, loss: MaskedLoss, batches: Iterable[Batch]) -> Joint:
        """``Joint(Sum of |dL_b/dm|, Moments of -dL_b/dm)`` over batches (one observation per batch)."""
        size = Sum.zeros_like([torch.zeros(loss.size, device=loss.device)])
        moments = Moments()
        for b in batches:
            _, gm = loss.grad(b)
            size.update([gm.abs()])
            moments.update(-gm)
        return Joint(size, moments)

    def from_statistics(self, loss: MaskedLoss, stat: Joint) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``|influence|`` over batches, and the (unbiased) standard deviation of the influence."""
        size, moments = stat.parts
        (total,) = size.result()
        return total / size.count, moments.std(1).to(total.dtype)

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        stat = self.statistics(loss, self.bar(loss.batches(), "gradient"))
        return self.from_statistics(loss, loss.combine(stat))
