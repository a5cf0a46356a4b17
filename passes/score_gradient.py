"""First-order data scores on the shared channel mask (shared/METHODS.md): ``taylor``, ``fisher``, ``inf_cp``.

All derivatives are taken with respect to the mask ``m`` of ``fxprune.passes.masking``: ``dL/dm_c`` is the
sum of ``w * dL/dw`` over channel ``c``'s columns in every consumer, so coupled channels are scored once.
"""

from __future__ import annotations

import torch
from fxprune.passes.masking import MaskedLoss, MaskScorePass, split_batch
from fxprune.passes.score import register_score

__all__ = ["FisherScore", "InfCPScore", "TaylorScore"]


@register_score("taylor")
class TaylorScore(MaskScorePass):
    """Loss preservation (Molchanov et al.; Lubana & Dick): ``|dL/dm_c|`` with the gradient over all data.

    The first-order loss change of removing channel ``c`` is ``-dL/dm_c``. At a weight-decayed optimum the
    gradient is ``-lambda * ||w_c||^2``, so on a converged model this ranks like magnitude.
    """

    defaults = {"weight_decay": 0.0}

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        (_, gm), _ = self.mean_grad(loss)
        return gm.abs(), None


@register_score("fisher")
class FisherScore(MaskScorePass):
    """Group Fisher / OBD on the mask (Liu et al. 2021): ``1/2 E[(dl/dm_c)^2]`` over micro-batches.

    ``chunk`` samples per micro-batch (1 = the per-sample empirical Fisher; larger is cheaper and noisier).
    """

    defaults = {"weight_decay": 0.0, "chunk": 4}

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, None]:
        acc = torch.zeros(loss.size, device=loss.device)
        count = 0
        for b in self.bar(loss.batches(), "fisher"):
            for mb in split_batch(b, int(self.options["chunk"])):
                acc += loss.grad(mb)[1].pow(2)
                count += 1
        return 0.5 * acc / max(count, 1), None


@register_score("inf_cp")
class InfCPScore(MaskScorePass):
    """Per-batch first-order influence (Lai et al. 2021): the loss change ``-dL_b/dm_c`` on each batch ``b``.

    ``mean`` is the mean of its magnitude over batches and ``spread`` its standard deviation: a channel whose
    influence changes sign from batch to batch is an uncertain decision.
    """

    defaults = {"weight_decay": 0.0}

    def estimate(self, loss: MaskedLoss, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _, per_batch = self.mean_grad(loss)
        stack = torch.stack([-g for g in per_batch])
        spread = stack.std(0) if len(per_batch) > 1 else torch.zeros_like(stack[0])
        return stack.abs().mean(0), spread
